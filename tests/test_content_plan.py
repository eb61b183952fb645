"""The per-destination content plan (issue 15): which steps an object gets, parsed and written once."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from fastroute.config import Config, loads
from fastroute.content.changes import Change
from fastroute.content.plan import ContentPlan, preview
from fastroute.routing.transcode import DEFLATED, _inflate
from dicomcompare import assert_same_dataset

IMPLICIT, EXPLICIT, BIG = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"

CONFIG = r"""ae_title: FR
spool: /tmp/unused
destinations:
  pacs:
    ae_title: PACS
    host: 127.0.0.1
    port: 104
    modify:
      - {set: {InstitutionName: "General Hospital"}, when: 'InstitutionName missing'}
      - {regex: {AccessionNumber: ['^GH-(.*)$', '\1']}}
      - {set: {IssuerOfPatientID: "GH"}}
  plain: {ae_title: PLAIN, host: 127.0.0.1, port: 105}
  ruled: {ae_title: RULED, host: 127.0.0.1, port: 106}
rules:
  - {name: ct, match: {Modality: CT}, send_to: [pacs, plain, ruled], modify: [{set: {StationName: CTROUTE}}]}
  - {name: mr, match: {Modality: MR}, send_to: [ruled], modify: [{set: {StationName: MRROUTE}}]}
  - {name: all, send_to: [plain]}
"""


def _cfg(text: str = CONFIG) -> Config:
    return loads(text, "<test>")


def _body(path: Path) -> tuple[bytes, str]:
    """A file's dataset bytes (no preamble, no file meta) and its transfer syntax."""
    with open(path, "rb") as f:
        pydicom.filereader.read_preamble(f, False)
        meta = pydicom.filereader._read_file_meta_info(f)
        return f.read(), str(meta.TransferSyntaxUID)


def _read(data: bytes, ts: str) -> Dataset:
    if ts == DEFLATED:
        data, ts = _inflate(data), EXPLICIT
    return read_dataset(io.BytesIO(data), ts == IMPLICIT, ts != BIG)


def test_build_only_for_destinations_with_steps() -> None:
    cfg = _cfg()
    assert ContentPlan.build(cfg, "plain") is not None            # rule ct's modify sends to it
    no_rules = _cfg(CONFIG.split("rules:")[0] + "rules:\n  - {name: all, send_to: [plain]}\n")
    assert ContentPlan.build(no_rules, "plain") is None
    pacs = ContentPlan.build(cfg, "pacs")
    assert pacs is not None and pacs.needs_rules and not pacs.has_lookups
    assert [s.modifier.by for s in pacs.steps] == ["rule:ct", "destination:pacs"]


def test_rule_steps_apply_only_when_that_rule_routed_the_object(synth_study: Callable[..., list[Path]]) -> None:
    cfg = _cfg()
    data, ts = _body(synth_study(n_instances=1, rows=8, cols=8, accession="GH-42")[0])
    ruled = ContentPlan.build(cfg, "ruled")
    assert ruled is not None and not ruled.applies(["all"])
    assert ruled.apply(data, ts, ["all"], {}) is None
    got = ruled.apply(data, ts, ["mr"], {})
    assert got is not None and got.by == ["rule:mr"]
    assert _read(got.data, ts).StationName == "MRROUTE"
    both = ruled.apply(data, ts, ["ct", "mr"], {})                 # rule order: mr's set wins
    assert both is not None and both.by == ["rule:ct", "rule:mr"]
    assert _read(both.data, ts).StationName == "MRROUTE"
    pacs = ContentPlan.build(cfg, "pacs")
    assert pacs is not None
    only_dest = pacs.apply(data, ts, ["all"], {})
    assert only_dest is not None and only_dest.by == ["destination:pacs"]


@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT, BIG, DEFLATED])
def test_apply_changes_exactly_the_named_elements_in_the_same_syntax(
        synth_study: Callable[..., list[Path]], ts: str) -> None:
    path = synth_study(n_instances=1, rows=16, cols=16, accession="GH-42", transfer_syntax=ts)[0]
    data, stored_ts = _body(path)
    assert stored_ts == ts
    plan = ContentPlan.build(_cfg(), "pacs")
    assert plan is not None
    got = plan.apply(data, ts, ["ct"], {"calling_ae": "CT1"})
    assert got is not None and not got.quarantine
    original, changed = _read(data, ts), _read(got.data, ts)
    assert got.sop_instance_uid == original.SOPInstanceUID
    assert {c.keyword for c in got.changes} == {"StationName", "AccessionNumber", "IssuerOfPatientID",
                                                "InstitutionName"} - ({"InstitutionName"} if "InstitutionName" in original else set())
    assert changed.AccessionNumber == "42" and changed.IssuerOfPatientID == "GH"
    assert changed.StationName == "CTROUTE"
    for c in got.changes:
        tag = int(c.path[1:5] + c.path[6:10], 16)
        original.pop(tag, None)
        changed.pop(tag, None)
    assert_same_dataset(original, changed)            # nothing else changed, pixel data included


def test_real_files_keep_encapsulated_pixel_data(pydicom_data_dir: Path) -> None:
    plan = ContentPlan.build(_cfg(), "pacs")
    assert plan is not None
    tried = 0
    for name in ("693_J2KR.dcm", "SC_rgb_rle.dcm", "JPEG2000.dcm", "CT_small.dcm", "MR_small_bigendian.dcm"):
        candidates = [p for p in (pydicom_data_dir / name, Path(pydicom.__file__).parent / "data" / "test_files" / name)
                      if p.exists()]
        if not candidates:
            continue
        data, ts = _body(candidates[0])
        got = plan.apply(data, ts, [], {})
        assert got is not None, name
        before, after = _read(data, ts), _read(got.data, ts)
        assert after.IssuerOfPatientID == "GH"
        assert after.get_item(0x7FE00010).value == before.get_item(0x7FE00010).value, name
        tried += 1
    assert tried >= 3


class _FakeDeid:
    """Deidentifier-shaped stand-in (the real one is fastroute.content.deidentify's)."""

    def __init__(self, quarantine: str = "", new_uid: str = "") -> None:
        self.by, self.quarantine, self.new_uid = "deidentify:basic", quarantine, new_uid

    def apply(self, ds: Dataset) -> tuple[list[Change], str]:
        if self.quarantine:
            return [], self.quarantine
        old = ds.SOPInstanceUID
        ds.SOPInstanceUID = self.new_uid
        return [Change("(0008,0018)", "SOPInstanceUID", "uid", old, self.new_uid, self.by)], ""


def test_deidentifier_step_runs_last_and_can_quarantine(synth_study: Callable[..., list[Path]]) -> None:
    data, ts = _body(synth_study(n_instances=1, rows=8, cols=8)[0])
    base = ContentPlan.build(_cfg(), "pacs")
    assert base is not None
    plan = ContentPlan("pacs", base.steps, _FakeDeid(new_uid="2.25.1234"))
    got = plan.apply(data, ts, [], {})
    assert got is not None and got.by == ["destination:pacs", "deidentify:basic"]
    assert got.sop_instance_uid == "2.25.1234" and _read(got.data, ts).SOPInstanceUID == "2.25.1234"
    held = ContentPlan("pacs", base.steps, _FakeDeid(quarantine="Burned In Annotation is YES")).apply(data, ts, [], {})
    assert held is not None and held.quarantine == "Burned In Annotation is YES" and held.data == b""
    assert held.sop_instance_uid == _read(data, ts).SOPInstanceUID


def test_preview_per_destination_writes_nothing(synth_study: Callable[..., list[Path]]) -> None:
    data, ts = _body(synth_study(n_instances=1, rows=8, cols=8, accession="GH-1")[0])
    before = bytes(data)
    out = preview(_cfg(), data, ts, ["all"], {}, ["pacs", "plain", "ruled"])
    assert out["plain"] is None and out["ruled"] is None
    pacs = out["pacs"]
    assert pacs is not None
    assert [(c.keyword, c.old, c.new) for c in pacs.changes if c.keyword == "AccessionNumber"] == [
        ("AccessionNumber", "GH-1", "1")]
    assert data == before


_TEXT = st.text(alphabet=st.characters(min_codepoint=0x41, max_codepoint=0x5A), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accession=_TEXT, institution=_TEXT, issuer=st.just("GH"))
def test_no_applicable_action_returns_none(accession: str, institution: str, issuer: str) -> None:
    """An object no action changes is not re-encoded: apply gives None (the zero-copy path)."""
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.AccessionNumber = accession                      # no GH- prefix: the regex does not match
    ds.InstitutionName = institution                    # present: the when: does not hold
    ds.IssuerOfPatientID = issuer                       # already GH: setting it changes nothing
    from fastroute.routing.transcode import _write
    data = _write(ds, implicit=False, little=True)
    text = CONFIG.split("rules:")[0] + "rules:\n  - {name: all, send_to: [pacs]}\n"
    plan = ContentPlan.build(_cfg(text), "pacs")
    assert plan is not None
    assert plan.apply(data, EXPLICIT, ["all"], {}) is None


def test_lookup_on_missing_fail_raises_from_apply(tmp_path: Path, synth_study: Callable[..., list[Path]]) -> None:
    from fastroute.content.modify import ModifyError
    (tmp_path / "ids.csv").write_text("old,new\nNOPE,X\n")
    text = CONFIG.replace("      - {set: {IssuerOfPatientID: \"GH\"}}\n",
                          "      - {lookup: {PatientID: ids.csv}, on_missing: fail}\n")
    cfg_path = tmp_path / "router.yaml"
    cfg_path.write_text(text)
    from fastroute.config import load
    plan = ContentPlan.build(load(str(cfg_path)), "pacs")
    assert plan is not None and plan.has_lookups
    data, ts = _body(synth_study(n_instances=1, rows=8, cols=8)[0])
    with pytest.raises(ModifyError, match="PatientID"):
        plan.apply(data, ts, [], {})




@pytest.mark.parametrize("ts", [IMPLICIT, EXPLICIT])
def test_private_creator_delete_on_parsed_bytes(ts: str) -> None:
    """Private elements read from the wire (raw, implicit VR: no VR known) are found by creator."""
    from fastroute.routing.transcode import _write
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientID = "P1"
    ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x08, "CS", "IMAGE NUM 4")
    ds.private_block(0x0029, "OTHER", create=True).add_new(0x01, "LO", "kept")
    data = _write(ds, implicit=ts == IMPLICIT, little=True)
    text = CONFIG.split("rules:")[0].replace(
        "      - {set: {IssuerOfPatientID: \"GH\"}}\n",
        "      - {delete: [\"private:SIEMENS CSA HEADER\"]}\n") + "rules:\n  - {name: all, send_to: [pacs]}\n"
    plan = ContentPlan.build(_cfg(text), "pacs")
    assert plan is not None
    got = plan.apply(data, ts, ["all"], {})
    assert got is not None
    assert {c.path for c in got.changes if c.action == "delete"} == {"(0029,0010)", "(0029,1008)"}
    out = _read(got.data, ts)
    assert 0x00290010 not in out and 0x00291008 not in out
    assert out[0x00291101].value in ("kept", b"kept")
