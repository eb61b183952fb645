"""PS3.15 de-identification (issue 15) held to Table E.1-1 attribute by attribute.

The oracle here reads the shipped CSV itself (csv module, its own resolution of the option
columns), not the engine's compiled table, so a wrong compilation fails these tests.
"""
from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given, settings, strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from fastroute.config import loads
from fastroute.content import table
from fastroute.content.deidentify import (Deidentifier, DeidentifyConfig, deidentifier_for,
                                          keyed_uid, parse_deidentify, resolve_key)
from fastroute.errors import ConfigError
from tests.synth import make_study

KEY = b"test-key-0123456789abcdef"
ISSUE_OPTIONS = ("retain-longitudinal-modified-dates", "retain-device-identity", "clean-descriptors")
UI_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
PSEUDONYM_Z = {0x00100010, 0x00100020, 0x00080050, 0x00200010}
EMPTIED_D_SEQ = {0x00080082, 0x00401101}

PYDICOM_FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtstruct.dcm", "rtdose.dcm",
                 "test-SR.dcm"]
DATA_STORE_FILES = ["MR-SIEMENS-DICOM-WithOverlays.dcm", "US1_UNCR.dcm", "liver.dcm",
                    "emri_small.dcm", "OT-PAL-8-face.dcm", "explicit_VR-UN.dcm"]

COLUMN = {"retain-uids": "rtn_uids", "retain-device-identity": "rtn_dev_id",
          "retain-institution-identity": "rtn_inst_id",
          "retain-patient-characteristics": "rtn_pat_chars",
          "retain-longitudinal-full-dates": "rtn_long_full_dates",
          "retain-longitudinal-modified-dates": "rtn_long_modif_dates",
          "retain-safe-private": "rtn_safe_priv", "clean-descriptors": "clean_desc",
          "clean-structured-content": "clean_struct_cont", "clean-graphics": "clean_graph"}


# -- the oracle ------------------------------------------------------------------------------

def _table_rows() -> list[dict[str, str]]:
    text = resources.files("fastroute.content.profiles").joinpath(
        "ps3.15-table-e.1-1.csv").read_text(encoding="utf-8")
    return list(csv.DictReader(ln for ln in text.splitlines() if not ln.startswith("#")))


ROWS = _table_rows()


def expected(options: tuple[str, ...]) -> dict[int, str]:
    """Per exact tag: K, X, Z, D, U or C (any clean), by the table and the standard's rule that
    an option's K/C/X overrides the basic action; retain options win over clean ones."""
    out: dict[int, str] = {}
    cols = [COLUMN[o] for o in options if o.startswith("retain")] + \
           [COLUMN[o] for o in options if o.startswith("clean")]
    for r in ROWS:
        if "X" in r["tag"][1:5] or r["tag"].startswith("(GGGG"):
            continue
        act = next((r[c] for c in cols if r[c]), None) or r["basic"]
        act = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}.get(act, act)
        out[int(r["tag"][1:5] + r["tag"][6:10], 16)] = act
    return out


def walk(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, int, Any]]:
    """(path, tag, element) at every depth, items in order."""
    for elem in ds:
        tag = int(elem.tag)
        path = f"{prefix}({tag >> 16:04X},{tag & 0xFFFF:04X})"
        yield path, tag, elem
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from walk(item, f"{path}[{i}]")


def deid(ds: Dataset, options: tuple[str, ...] = ISSUE_OPTIONS, key: bytes = KEY,
         **kw: Any) -> tuple[Dataset, list[Any], str]:
    out = copy.deepcopy(ds)
    cfg = DeidentifyConfig(options=options, key="env:X", quarantine_burned_in=kw.pop("qb", False), **kw)
    changes, reason = Deidentifier(cfg, key).apply(out)
    return out, changes, reason


def check_against_table(orig: Dataset, out: Dataset, options: tuple[str, ...]) -> int:
    """Every attribute of ``orig`` (any depth) held to its row; returns how many were checked."""
    exp = expected(options)
    before = {p: e for p, _, e in walk(orig)}
    after = {p: e for p, _, e in walk(out)}
    # no attribute the profile removes survives at any depth, nor any private one
    for path, tag, _ in walk(out):
        assert exp.get(tag) != "X", f"{path} should have been removed"
        if "retain-safe-private" not in options:
            assert (tag >> 16) % 2 == 0, f"private {path} survived"
    checked = 0
    for path, elem in before.items():
        tag = int(elem.tag)
        act = exp.get(tag)
        if act is None or (tag >> 16) % 2 or "(0040,A730)" in path:
            continue
        if any(path.startswith(p) for p, e in before.items()
               if len(p) < len(path) and exp.get(int(e.tag)) in ("X", "Z") and e.VR == "SQ"):
            continue      # inside a removed or emptied sequence
        if any(path.startswith(p) for p, e in before.items()
               if len(p) < len(path) and int(e.tag) in EMPTIED_D_SEQ):
            continue
        checked += 1
        new = after.get(path)
        empty_before = elem.value in (None, "", b"") or (elem.VR == "SQ" and not elem.value)
        if act == "X":
            assert new is None, path
        elif act == "K":
            assert new is not None and new.value == elem.value, path
        elif act == "Z":
            assert new is not None, f"{path} (Z) must stay present"
            if tag in PSEUDONYM_Z:
                assert empty_before or new.value != elem.value, path
            else:
                assert new.value in (None, "", b"") or (new.VR == "SQ" and len(new.value) == 0), path
        elif act == "D":
            assert new is not None, f"{path} (D) must stay present"
            if elem.VR == "SQ":
                if tag in EMPTIED_D_SEQ:
                    assert len(new.value) == 0, path
                continue
            if not empty_before:
                assert new.value not in (None, ""), path
                assert str(new.value) != str(elem.value) or elem.VR in ("DA", "TM", "DT"), path
        elif act == "U":
            assert new is not None, path
            if elem.VR == "SQ":
                continue
            if not empty_before:
                vals = new.value if elem.VM > 1 else [new.value]
                olds = elem.value if elem.VM > 1 else [elem.value]
                for o, n in zip(olds, vals):
                    assert UI_RE.match(str(n)) and len(str(n)) <= 64, (path, n)
                    assert str(n) == keyed_uid(KEY, str(o)), path
        elif act == "C":
            assert new is not None, f"{path} (C) is kept, cleaned"
    return checked


def reencoded(ds: Dataset) -> Dataset:
    """``ds`` written as Explicit VR Little Endian with value validation on, and read back."""
    from pydicom import config
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_dataset
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.RAISE
    try:
        write_dataset(buf, ds)
    finally:
        config.settings.writing_validation_mode = old
    return read_dataset(io.BytesIO(buf.getvalue()), is_implicit_VR=False, is_little_endian=True)


def _real(name: str, data_dir: Path) -> Dataset:
    p = get_testdata_file(name)
    return dcmread(p if p else data_dir / name, force=True)


# -- real files --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PYDICOM_FILES + DATA_STORE_FILES)
@pytest.mark.parametrize("options", [(), ISSUE_OPTIONS,
                                     ("retain-uids", "retain-patient-characteristics",
                                      "retain-institution-identity", "clean-structured-content",
                                      "clean-graphics")])
def test_real_file_follows_table(name: str, options: tuple[str, ...], pydicom_data_dir: Path) -> None:
    orig = _real(name, pydicom_data_dir)
    out, changes, reason = deid(orig, options)
    assert reason == ""
    assert check_against_table(orig, out, options) > 0
    # pixel data never touched
    if "PixelData" in orig:
        assert out.PixelData == orig.PixelData
    assert out.PatientIdentityRemoved == "YES"
    codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert codes[0] == "113100"
    assert set(codes[1:]) == {table.OPTIONS[o][1] for o in options}
    assert all(i.CodingSchemeDesignator == "DCM" for i in out.DeidentificationMethodCodeSequence)
    assert all(len(v) <= 64 for v in out.DeidentificationMethod)
    # type 1/2 identifiers present
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "PatientName"):
        if kw in orig:
            assert kw in out, kw
    if "retain-uids" in options:
        assert out.SOPInstanceUID == orig.SOPInstanceUID
    else:
        assert out.SOPInstanceUID != orig.SOPInstanceUID
    # the sender re-encodes it: explicit VR little endian, values valid for their VRs
    back = reencoded(out)
    assert set(back.keys()) == set(out.keys())
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "PatientID", "PatientName", "StudyDate"):
        assert str(back.get(kw) or "") == str(out.get(kw) or ""), kw
    # changes name tag paths; every delete is gone from the output
    paths = {p for p, _, _ in walk(out)}
    for ch in changes:
        assert ch.by == "deidentify:basic"
        if ch.action == "delete":
            assert ch.path not in paths or ch.path.startswith("(0012")


def test_rtstruct_references_stay_consistent() -> None:
    """Referenced Frame of Reference / SOP Instance UIDs nested in sequences map like the top."""
    orig = dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    out, _, _ = deid(orig, ())
    olds = [e.value for _, t, e in walk(orig) if t == 0x00081155]
    news = [e.value for _, t, e in walk(out) if t == 0x00081155]
    assert olds and news == [keyed_uid(KEY, u) for u in olds]
    fors = [e.value for p, t, e in walk(out) if t in (0x00200052, 0x30060024)]
    assert fors and all(UI_RE.match(v) for v in fors)


def test_sr_content_sequence() -> None:
    """Content Sequence (D): items kept, person names pseudonymised, text values replaced
    (or cleaned with clean-structured-content), UIDs replaced."""
    orig = dcmread(get_testdata_file("test-SR.dcm"))
    pn_before = [e.value for _, _, e in walk(orig) if e.VR == "PN" and e.value]
    for opts in ((), ("clean-structured-content",)):
        out, _, _ = deid(orig, opts)
        assert len(out.ContentSequence) == len(orig.ContentSequence)
        pns = [str(e.value) for _, _, e in walk(out) if e.VR == "PN" and e.value]
        assert pns and all(v.startswith("ANON") for v in pns)
        assert not {str(v) for v in pn_before} & set(pns)
        texts_before = [e.value for _, t, e in walk(orig) if t == 0x0040A160]
        texts = [e.value for _, t, e in walk(out) if t == 0x0040A160]
        assert len(texts) == len(texts_before)
        if not opts:
            assert all(t != o for t, o in zip(texts, texts_before) if o)


# -- synthetic studies ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    paths = make_study(tmp_path_factory.mktemp("study"), modality="CT", n_series=2, n_instances=3,
                       tiny=True, patient_id="PID-77", patient_name="DOE^JANE",
                       study_description="CT thorax DOE Jane PID-77")
    return [dcmread(p) for p in paths]


def test_study_stays_consistent(study: list[Dataset]) -> None:
    outs = [deid(ds)[0] for ds in study]
    assert len({o.StudyInstanceUID for o in outs}) == 1
    assert len({o.SeriesInstanceUID for o in outs}) == 2
    assert len({o.SOPInstanceUID for o in outs}) == len(outs)
    assert len({o.FrameOfReferenceUID for o in outs if "FrameOfReferenceUID" in o}) <= 2
    assert len({str(o.PatientID) for o in outs}) == 1 and outs[0].PatientID != "PID-77"
    for o, ds in zip(outs, study):
        check_against_table(ds, o, ISSUE_OPTIONS)
        assert o.PixelData == ds.PixelData


def test_same_key_same_output_other_key_other(study: list[Dataset]) -> None:
    a = deid(study[0])[0]
    b = deid(study[0])[0]             # a second Deidentifier, same key: same pseudonyms
    c = deid(study[0], key=b"another-key-0000")[0]
    for kw in ("StudyInstanceUID", "SOPInstanceUID", "PatientID", "PatientName", "StudyDate"):
        assert a[kw].value == b[kw].value, kw
    for kw in ("StudyInstanceUID", "SOPInstanceUID", "PatientID", "PatientName"):
        assert a[kw].value != c[kw].value, kw


def test_dates_shift_per_patient(study: list[Dataset]) -> None:
    shifts = set()
    for ds in study:
        out = deid(ds)[0]
        for _, tag, elem in walk(ds):
            if elem.VR == "DA" and elem.value and tag != 0x00100030:   # birth date: Z, no option
                new = out[tag].value if tag in out else None
                assert new, f"{tag:08X} kept (shifted)"
                d0 = dt.datetime.strptime(elem.value, "%Y%m%d")
                shifts.add((dt.datetime.strptime(new, "%Y%m%d") - d0).days)
            if elem.VR == "TM" and elem.value and tag in out:
                assert out[tag].value == elem.value      # times of day are kept
        assert out.LongitudinalTemporalInformationModified == "MODIFIED"
        assert "PatientBirthDate" not in ds or not out.PatientBirthDate
    assert len(shifts) == 1 and -3650 <= shifts.pop() <= -1
    other = copy.deepcopy(study[0])
    other.PatientID = "SOMEONE-ELSE"
    a, b = deid(study[0])[0], deid(other)[0]
    assert a.StudyDate != b.StudyDate      # another patient, another offset (for these ids)


def test_clean_descriptors_removes_patient_identifiers(study: list[Dataset]) -> None:
    out = deid(study[0])[0]
    desc = str(out.StudyDescription)
    assert "CT thorax" in desc
    for word in ("DOE", "Jane", "PID-77"):
        assert word.lower() not in desc.lower()
    without = deid(study[0], ("retain-longitudinal-modified-dates",))[0]
    assert "StudyDescription" not in without


# -- each option changes the output as the table says -------------------------------------------

def _probe() -> Dataset:
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientAge = "ROE^RICHARD", "P1", "M", "042Y"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.Modality, ds.StudyDate, ds.StudyTime = "CT", "20240131", "101010"
    ds.InstitutionName, ds.StationName, ds.DeviceSerialNumber = "General Hospital", "CT01", "SN123"
    ds.StudyDescription = "Head RICHARD P1"
    ds.add_new(0x00291010, "LO", "GE private")
    ds.add_new(0x00290010, "LO", "ACME_01")
    ds.add_new(0x60003000, "OW", b"\x01\x02" * 8)
    ds.add_new(0x60000010, "US", 4)
    cs = Dataset()
    cs.ValueType, cs.TextValue = "TEXT", "Patient RICHARD seen"
    ds.ContentSequence = Sequence([cs])
    return ds


# option → (keyword or tag, what it is without the option, what with it)
TOGGLES: dict[str, tuple[Any, Any, Any]] = {
    "retain-uids": ("SeriesInstanceUID", "replaced", "kept"),
    "retain-device-identity": ("DeviceSerialNumber", "replaced", "kept"),
    "retain-institution-identity": ("InstitutionName", "replaced", "kept"),
    "retain-patient-characteristics": ("PatientAge", "absent", "kept"),
    "retain-longitudinal-full-dates": ("StudyDate", "empty", "kept"),
    "retain-longitudinal-modified-dates": ("StudyDate", "empty", "replaced"),
    "retain-safe-private": (0x00291010, "absent", "kept"),
    "clean-descriptors": ("StudyDescription", "absent", "replaced"),
    "clean-structured-content": ("ContentText", "replaced", "cleaned"),
    "clean-graphics": (0x60003000, "absent", "kept"),
}


@pytest.mark.parametrize("option", sorted(TOGGLES))
def test_option_toggles(option: str) -> None:
    what, off, on = TOGGLES[option]
    assert set(TOGGLES) == set(table.OPTIONS)
    kw: dict[str, Any] = {"safe_private": ("ACME_01|0029,xx10",)}

    def state(opts: tuple[str, ...]) -> str:
        orig = _probe()
        out = deid(orig, opts, **kw)[0]
        if what == "ContentText":
            new, old = out.ContentSequence[0].TextValue, orig.ContentSequence[0].TextValue
            return "cleaned" if new == "Patient seen" else "replaced" if new != old else "kept"
        if what not in out:
            return "absent"
        new, old = out[what].value, orig[what].value
        return "kept" if new == old else "empty" if new in (None, "", b"") else "replaced"

    assert state(()) == off
    assert state((option,)) == on
    if option == "retain-safe-private":
        assert 0x00290010 in deid(_probe(), (option,), **kw)[0]     # its creator kept with it


# -- burned-in quarantine -------------------------------------------------------------------------

def test_burned_in_quarantine(pydicom_data_dir: Path) -> None:
    ds = _probe()
    ds.BurnedInAnnotation = "YES"
    before = copy.deepcopy(ds)
    out, changes, reason = deid(ds, qb=True)
    assert reason == "BurnedInAnnotation YES" and changes == [] and out == before
    us = _real("US1_UNCR.dcm", pydicom_data_dir)
    if "BurnedInAnnotation" in us:
        del us.BurnedInAnnotation
    assert deid(us, qb=True)[2] == "BurnedInAnnotation absent for modality US"
    us.BurnedInAnnotation = "NO"
    assert deid(us, qb=True)[2] == ""
    del us.BurnedInAnnotation
    assert deid(us, qb=False)[2] == ""                       # quarantine_burned_in: false
    assert deid(us, qb=True, burned_in_modalities=("XC",))[2] == ""
    ct = _probe()                                            # CT without the attribute: sent
    assert deid(ct, qb=True)[2] == ""


# -- configuration ---------------------------------------------------------------------------------

ISSUE_YAML = """
destinations:
  research: {ae_title: AI, host: 10.0.0.20, port: 104,
             deidentify: {profile: basic,
                          options: [retain-longitudinal-modified-dates, retain-device-identity,
                                    clean-descriptors],
                          key: env:FASTROUTE_DEID_KEY_UNSET_IN_TESTS,
                          quarantine_burned_in: true}}
rules:
  - {name: ct-research, match: {Modality: CT}, send_to: [research]}
"""


def test_issue_example_parses_without_the_key_set() -> None:
    cfg = loads(ISSUE_YAML)
    de = cfg.destinations["research"].deidentify
    assert de is not None
    assert de.options == ISSUE_OPTIONS and de.quarantine_burned_in and de.profile == "basic"
    assert de.key == "env:FASTROUTE_DEID_KEY_UNSET_IN_TESTS"
    with pytest.raises(ConfigError, match="FASTROUTE_DEID_KEY_UNSET_IN_TESTS is not set"):
        resolve_key(de)


def test_unknown_option_did_you_mean() -> None:
    with pytest.raises(ValueError, match="did you mean retain-uids.*valid: retain-uids"):
        parse_deidentify({"options": ["retain-uid"], "key": "env:K"}, None)
    with pytest.raises(ConfigError, match=r"research\.deidentify.*did you mean clean-descriptors"):
        loads(ISSUE_YAML.replace("clean-descriptors", "clean-descriptor"))
    with pytest.raises(ValueError, match="env:NAME"):
        parse_deidentify({"key": "s3cr3t"}, None)
    with pytest.raises(ValueError, match="exclude each other"):
        parse_deidentify({"key": "env:K", "options": ["retain-longitudinal-full-dates",
                                                      "retain-longitudinal-modified-dates"]}, None)


def test_resolve_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FR_TEST_KEY", "abc")
    assert resolve_key(DeidentifyConfig(key="env:FR_TEST_KEY")) == b"abc"
    assert deidentifier_for(DeidentifyConfig(key="env:FR_TEST_KEY")).key == b"abc"
    monkeypatch.delenv("FR_TEST_KEY")
    with pytest.raises(ConfigError, match="FR_TEST_KEY is not set"):
        deidentifier_for(DeidentifyConfig(key="env:FR_TEST_KEY"))    # no engine without a key
    monkeypatch.setenv("FR_TEST_KEY", "abc")
    monkeypatch.setenv("FR_TEST_KEY", "")
    with pytest.raises(ConfigError, match="FR_TEST_KEY is empty"):
        resolve_key(DeidentifyConfig(key="env:FR_TEST_KEY"))
    f = tmp_path / "k"
    with pytest.raises(ConfigError, match=str(f)):
        resolve_key(DeidentifyConfig(key=f"file:{f}"))
    f.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_key(DeidentifyConfig(key=f"file:{f}"))
    f.write_text("filekey\n")
    cfg = parse_deidentify({"key": "file:k"}, tmp_path)       # relative to the config's folder
    assert resolve_key(cfg) == b"filekey"


@pytest.mark.parametrize("extra", ["commitment: same-association", "verify: find, query: true"])
def test_uid_changing_destination_refuses_commitment_and_verify(extra: str) -> None:
    text = ISSUE_YAML.replace("quarantine_burned_in: true}", f"quarantine_burned_in: true}}, {extra}")
    with pytest.raises(ConfigError, match="retain-uids"):
        loads(text)
    loads(text.replace("clean-descriptors]", "clean-descriptors, retain-uids]"))


# -- the UID function --------------------------------------------------------------------------

uids = st.lists(st.integers(0, 10**12), min_size=1, max_size=12).map(
    lambda xs: "1." + ".".join(str(x) for x in xs))


@settings(max_examples=300, deadline=None)
@given(uids, st.binary(min_size=1, max_size=64))
def test_keyed_uid_is_a_valid_deterministic_ui(uid: str, key: bytes) -> None:
    out = keyed_uid(key, uid)
    assert UI_RE.match(out) and out.startswith("2.25.") and len(out) <= 64
    assert keyed_uid(key, uid) == out


@settings(max_examples=50, deadline=None)
@given(st.sets(uids, min_size=2, max_size=200))
def test_keyed_uid_is_injective_on_random_uids(batch: set[str]) -> None:
    assert len({keyed_uid(KEY, u) for u in batch}) == len(batch)


@pytest.mark.parametrize("options, expect", [((), "19000101"),
                                              (("retain-longitudinal-full-dates",), "20240131"),
                                              (("retain-longitudinal-modified-dates",), "shifted")])
def test_dates_the_table_does_not_list(options: tuple[str, ...], expect: str) -> None:
    """Instance Creation Date is not in Table E.1-1: it is not left real without a date option."""
    ds = _probe()
    ds.InstanceCreationDate = ds.StudyDate = "20240131"
    out = deid(ds, options)[0]
    if expect == "shifted":
        assert out.InstanceCreationDate == out.StudyDate != "20240131"
    else:
        assert out.InstanceCreationDate == expect


def test_file_meta_follows_the_new_sop_instance_uid() -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    out = deid(ds, ())[0]
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID != ds.SOPInstanceUID


# -- a real peer accepts what comes out ------------------------------------------------------------

def test_deidentified_study_arrives_at_storescp(storescp: Any, tmp_path: Path) -> None:
    """De-identified copies written as files and sent by DCMTK storescu to DCMTK storescp: what
    arrived is the de-identified study (consistent new UIDs, no removed or private attribute,
    pixel data unchanged), so DCMTK reads and stores the engine's output as it is."""
    from tests import peers
    paths = make_study(tmp_path / "in", modality="CT", n_series=1, n_instances=3, tiny=True,
                       patient_id="E2E-1", patient_name="SMITH^ANNA")
    origs = [dcmread(p) for p in paths]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for i, ds in enumerate(origs):
        ds.add_new(0x00291010, "LO", "vendor secret")
        ds.add_new(0x00290010, "LO", "ACME_01")
        ds.OperatorsName = "NURSE^NINA"
        out = deid(ds)[0]
        out.save_as(out_dir / f"{i}.dcm")
    scp = storescp("DEID")
    res = peers.storescu(scp.port, [out_dir], called_ae="DEID")
    assert res.returncode == 0, res.stderr
    got = [dcmread(p) for p in scp.wait_for(3)]
    by_sop = {g.SOPInstanceUID: g for g in got}
    assert set(by_sop) == {keyed_uid(KEY, o.SOPInstanceUID) for o in origs}
    assert {g.StudyInstanceUID for g in got} == {keyed_uid(KEY, origs[0].StudyInstanceUID)}
    for o in origs:
        g = by_sop[keyed_uid(KEY, o.SOPInstanceUID)]
        assert g.PixelData == o.PixelData
        assert str(g.PatientName).startswith("ANON^") and g.PatientID != "E2E-1"
        assert str(g.OperatorsName).startswith("ANON^")       # X/Z/D → D: pseudonym
        assert g.PatientIdentityRemoved == "YES"
        assert not any(t.group % 2 for t in g.keys())
        text = " ".join(str(e.value) for e in g if e.VR in ("PN", "LO", "SH", "LT", "ST"))
        assert "SMITH" not in text and "ANNA" not in text and "NINA" not in text
