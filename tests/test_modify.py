"""The ``modify:`` actions (issue 15): parsing with operator-facing errors, and applying them."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from pydicom.dataset import Dataset

from fastroute.config import loads
from fastroute.content.modify import ModifyError, Modifier, parse_modify
from fastroute.errors import ConfigError

ISSUE_EXAMPLE = r"""
- {set: {InstitutionName: "General Hospital"}, when: 'InstitutionName missing'}
- {regex: {AccessionNumber: ['^GH-(.*)$', '\1']}}
- {set: {IssuerOfPatientID: "GH"}}
"""


def _ds(**kw: object) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.PatientID = "P1"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _modifier(text: str, base_dir: Path | None = None, by: str = "destination:pacs") -> Modifier:
    return Modifier(parse_modify(yaml.safe_load(text), base_dir), by)


def _paths(changes: list) -> list[tuple[str, str, str | None, str | None]]:
    return [(c.keyword or c.path, c.action, c.old, c.new) for c in changes]


def test_issue_example_parses_and_applies() -> None:
    m = _modifier(ISSUE_EXAMPLE)
    ds = _ds(AccessionNumber="GH-123", IssuerOfPatientID="X")
    changes = m.apply(ds, {})
    assert _paths(changes) == [("InstitutionName", "set", None, "General Hospital"),
                               ("AccessionNumber", "regex", "GH-123", "123"),
                               ("IssuerOfPatientID", "set", "X", "GH")]
    assert all(c.by == "destination:pacs" for c in changes)
    assert (ds.InstitutionName, ds.AccessionNumber, ds.IssuerOfPatientID) == ("General Hospital", "123", "GH")


def test_when_missing_holds_for_absent_and_empty_not_for_present() -> None:
    m = _modifier("[{set: {InstitutionName: Fixed}, when: 'InstitutionName missing'}]")
    for present in (None, ""):
        ds = _ds() if present is None else _ds(InstitutionName=present)
        assert _paths(m.apply(ds, {})) == [("InstitutionName", "set", None if present is None else "", "Fixed")]
    ds = _ds(InstitutionName="Their Hospital")
    assert m.apply(ds, {}) == [] and ds.InstitutionName == "Their Hospital"


def test_when_sees_the_dataset_as_earlier_actions_left_it_and_the_context() -> None:
    m = _modifier("""
- {set: {StudyDescription: FIRST}}
- {set: {SeriesDescription: SECOND}, when: 'StudyDescription == "FIRST" and calling_ae == "CT1"'}
""")
    ds = _ds()
    assert [c.keyword for c in m.apply(ds, {"calling_ae": "CT1"})] == ["StudyDescription", "SeriesDescription"]
    ds = _ds()
    assert [c.keyword for c in m.apply(ds, {"calling_ae": "MR1"})] == ["StudyDescription"]
    assert "SeriesDescription" not in ds


def test_set_multivalued_numbers_and_private_with_vr() -> None:
    m = _modifier("""
- set: {ImageType: [ORIGINAL, PRIMARY], Rows: 16, "(0009,1001)": {value: X, vr: LO}, PatientComments: null}
""")
    ds = _ds()
    m.apply(ds, {})
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY"] and ds.Rows == 16
    assert ds[0x00091001].VR == "LO" and ds[0x00091001].value == "X"
    assert ds.PatientComments == ""


def test_set_the_same_value_is_no_change() -> None:
    assert _modifier("[{set: {PatientID: P1}}]").apply(_ds(), {}) == []


def _private(ds: Dataset) -> Dataset:
    siemens = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    siemens.add_new(0x08, "CS", "IMAGE NUM 4")
    siemens.add_new(0x10, "OB", b"\x00\x01")
    other = ds.private_block(0x0029, "OTHER VENDOR", create=True)
    other.add_new(0x01, "LO", "keep me")
    return ds


def test_delete_keywords_tags_one_private_creator_or_all_private() -> None:
    ds = _private(_ds(PatientComments="c", StudyComments="s"))
    changes = _modifier('[{delete: [PatientComments, "(0032,4000)", "private:SIEMENS CSA HEADER"]}]').apply(ds, {})
    assert {c.path for c in changes} == {"(0010,4000)", "(0032,4000)", "(0029,0010)", "(0029,1008)", "(0029,1010)"}
    assert all(c.new is None for c in changes)
    assert ds[0x00290011].value == "OTHER VENDOR" and ds[0x00291101].value == "keep me"
    assert "PatientComments" not in ds and "StudyComments" not in ds
    ds = _private(_ds())
    _modifier("[{delete: private}]").apply(ds, {})
    assert not [t for t in ds.keys() if t.group & 1] and ds.PatientID == "P1"
    assert _modifier("[{delete: PatientComments}]").apply(_ds(), {}) == []      # absent: nothing


def test_regex_backrefs_each_value_of_a_multivalued_attribute() -> None:
    m = _modifier(r"""[{regex: {OtherPatientIDs: ['^(\w+)-(\d+)$', '\2.\1']}}]""")
    ds = _ds(OtherPatientIDs=["A-1", "B-2", "plain"])
    changes = m.apply(ds, {})
    assert list(ds.OtherPatientIDs) == ["1.A", "2.B", "plain"]
    assert _paths(changes) == [("OtherPatientIDs", "regex", "A-1\\B-2\\plain", "1.A\\2.B\\plain")]
    assert m.apply(_ds(), {}) == []          # absent: nothing


def test_copy_converts_to_the_target_vr_and_skips_an_absent_source() -> None:
    m = _modifier("[{copy: {StudyID: AccessionNumber}}]")
    ds = _ds(AccessionNumber="A77")
    assert _paths(m.apply(ds, {})) == [("StudyID", "copy", None, "A77")]
    assert ds.StudyID == "A77" and ds["StudyID"].VR == "SH"
    assert m.apply(_ds(), {}) == []
    too_long = _ds(StudyDescription="x" * 40)
    with pytest.raises(ModifyError, match=r"StudyID of SOP Instance UID 1\.2\.826.*VR SH allows 16"):
        _modifier("[{copy: {StudyID: StudyDescription}}]").apply(too_long, {})


def _table(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_lookup_header_comments_relative_path_and_reload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = _table(tmp_path / "ids.csv", "old,new\n# a comment\nP1,NEW1\n\nP2 , NEW2\n")
    m = _modifier("[{lookup: {PatientID: ids.csv}}]", base_dir=tmp_path)
    ds = _ds()
    assert _paths(m.apply(ds, {})) == [("PatientID", "lookup", "P1", "NEW1")]
    unmapped = _ds(PatientID="P9")
    assert m.apply(unmapped, {}) == [] and unmapped.PatientID == "P9"     # on_missing: keep
    _table(table, "P1,NEWER\n")                                           # no header: data
    m.reload()
    ds = _ds()
    m.apply(ds, {})
    assert ds.PatientID == "NEWER"
    _table(table, "P1,A,B\n")                                             # bad: the old table stays
    with caplog.at_level(logging.ERROR, logger="fastroute.content"):
        m.reload()
    assert f"{table}:1: expected 2 columns" in caplog.text and "previous one is kept" in caplog.text
    ds = _ds()
    m.apply(ds, {})
    assert ds.PatientID == "NEWER"


def test_lookup_on_missing_fail_names_the_attribute_and_sop_uid(tmp_path: Path) -> None:
    _table(tmp_path / "ids.csv", "P1,NEW1\n")
    m = _modifier("[{lookup: {PatientID: ids.csv}, on_missing: fail}]", base_dir=tmp_path)
    with pytest.raises(ModifyError, match=r"PatientID 'P9'.*1\.2\.826\.0\.1\.3680043\.8\.498\.1.*not sent unmapped"):
        m.apply(_ds(PatientID="P9"), {})


def test_lookup_table_errors_name_file_and_line(tmp_path: Path) -> None:
    _table(tmp_path / "dup.csv", "old,new\nP1,A\nP1,B\n")
    with pytest.raises(ValueError, match=r"dup\.csv:3: 'P1' is mapped again.*line 2"):
        parse_modify(yaml.safe_load("[{lookup: {PatientID: dup.csv}}]"), tmp_path)
    with pytest.raises(ValueError, match=r"lookup table .*absent\.csv: No such file"):
        parse_modify(yaml.safe_load("[{lookup: {PatientID: absent.csv}}]"), tmp_path)


def test_record_original_appends_a_coerce_item_with_the_old_values() -> None:
    m = _modifier("""
- {set: {InstitutionName: New, StationName: ST1}, record_original: true}
- {set: {PatientID: P2}, record_original: true}
""")
    ds = _ds(InstitutionName="Old")
    changes = m.apply(ds, {})
    assert [c.action for c in changes].count("record") == 2
    items = ds.OriginalAttributesSequence
    assert len(items) == 2
    first = items[0]
    assert first.ModifyingSystem == "fastroute" and first.ReasonForTheAttributeModification == "COERCE"
    assert len(first.AttributeModificationDateTime) >= 14
    old = first.ModifiedAttributesSequence[0]
    # the old value of what was replaced; StationName was absent, so it had no previous value
    assert old.InstitutionName == "Old" and "StationName" not in old
    assert items[1].ModifiedAttributesSequence[0].PatientID == "P1"
    ds = _ds()
    assert all(c.action != "record" for c in _modifier(
        "[{set: {StationName: S}, record_original: true}]").apply(ds, {}))   # nothing old: no item
    assert "OriginalAttributesSequence" not in ds


@pytest.mark.parametrize("text, message", [
    ("[{set: {InstitutionNme: x}}]", "unknown attribute 'InstitutionNme'; did you mean 'InstitutionName'"),
    ("[{sett: {PatientID: x}}]", "unknown key 'sett'; did you mean 'set'"),
    ("[{set: {PatientID: x}, delete: [PatientName]}]", "exactly one action"),
    ("[{set: {PatientID: x}, when: 'Modality =='}]", "when: expected a value after '=='"),
    ("[{set: {AccessionNumber: 'xxxxxxxxxxxxxxxxx'}}]", "17 characters, VR SH allows 16"),
    ("[{set: {'(0009,1001)': x}}]", "a private tag needs its VR"),
    ("[{set: {Rows: ten}}]", "VR US needs an integer"),
    ("[{regex: {AccessionNumber: ['(', x]}}]", "regex AccessionNumber: missing )"),
    ("[{regex: {AccessionNumber: '^x'}}]", "expected [pattern, replacement]"),
    ("[{delete: ['private:']}]", "needs a private creator"),
    ("[{set: {PatientID: x}, on_missing: fail}]", "only with lookup"),
    ("[{set: {PatientID: x}, record_original: maybe}]", "record_original: expected true or false"),
])
def test_parse_errors_speak_to_the_operator(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^modify\\[0\\]: .*" + _re(message)):
        parse_modify(yaml.safe_load(text), None)


def _re(text: str) -> str:
    import re
    return re.escape(text)


def test_config_errors_carry_file_line_and_key() -> None:
    text = """ae_title: FR
spool: /tmp/x
destinations:
  pacs:
    ae_title: PACS
    host: 127.0.0.1
    port: 104
    modify:
      - {set: {InstitutionNme: X}}
rules:
  - {name: all, send_to: [pacs]}
"""
    with pytest.raises(ConfigError) as err:
        loads(text, "router.yaml")
    assert "router.yaml:9: destinations.pacs.modify:" in str(err.value)
    assert "did you mean 'InstitutionName'" in str(err.value)
    rule = text.replace("      - {set: {InstitutionNme: X}}\n", "      - {set: {InstitutionName: X}}\n") \
        .replace("{name: all, send_to: [pacs]}", "{name: all, send_to: [pacs], modify: [{delete: [Nope]}]}")
    with pytest.raises(ConfigError, match=r"router\.yaml:11: rules.*modify.*unknown attribute 'Nope'"):
        loads(rule, "router.yaml")


def test_modifying_instance_uids_with_commitment_or_verify_is_a_config_error() -> None:
    base = """ae_title: FR
spool: /tmp/x
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 104, commitment: %s, modify: %s}
rules:
  - {name: all, send_to: [pacs], modify: %s}
"""
    uid = "[{set: {StudyInstanceUID: '1.2.3'}}]"
    with pytest.raises(ConfigError, match=r"router\.yaml:4: destinations\.pacs\.modify: modify changes "
                                          r"StudyInstanceUID while destination 'pacs' has commitment"):
        loads(base % ("same-association", uid, "[]"), "router.yaml")
    with pytest.raises(ConfigError, match=r"router\.yaml:6: rules\.all\.modify: rule 'all': modify changes "
                                          r"SOPInstanceUID") as err:
        loads(base % ("same-association", "[]", "[{delete: [SOPInstanceUID]}]"), "router.yaml")
    assert "commitment: off" in (err.value.hint or "")
    assert loads(base % ("'off'", uid, "[]"), "router.yaml").destinations["pacs"].modify
    assert loads(base % ("same-association", "[{set: {InstitutionName: X}}]", "[]"), "router.yaml")


def test_non_ascii_values_need_a_character_set_that_can_write_them() -> None:
    m = _modifier("[{set: {InstitutionName: 'Hôpital Général'}}]")
    with pytest.raises(ModifyError, match="declares no Specific Character Set"):
        m.apply(_ds(), {})
    latin = _ds(SpecificCharacterSet="ISO_IR 100")
    m.apply(latin, {})
    assert latin.InstitutionName == "Hôpital Général"
    with pytest.raises(ModifyError, match=r"'東京' cannot be written in the object's Specific Character Set"):
        _modifier("[{set: {InstitutionName: '東京'}}]").apply(_ds(SpecificCharacterSet="ISO_IR 100"), {})
    utf8 = _ds(SpecificCharacterSet="ISO_IR 192")
    _modifier("[{set: {InstitutionName: '東京'}}]").apply(utf8, {})
    assert utf8.InstitutionName == "東京"
