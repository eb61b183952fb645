"""``modify`` end to end (issue 15): real DCMTK and Orthanc destinations, one changed, one not."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pydicom
import pytest
from pydicom.data import get_testdata_file

import peers
from dicomcompare import assert_same_dataset
from peers import storescu, wait_until
from router import Router, destination

pytestmark = pytest.mark.peers

ISSUE_MODIFY = [
    {"set": {"InstitutionName": "General Hospital"}, "when": "InstitutionName missing"},
    {"regex": {"AccessionNumber": ["^GH-(.*)$", "\\1"]}},
    {"set": {"IssuerOfPatientID": "GH"}},
]
# the attributes the modified destinations may see changed (by the list above and rule ct-fix)
NAMED = ("InstitutionName", "AccessionNumber", "IssuerOfPatientID", "StationName")


def _expected(original: pydicom.Dataset, ct_rule: bool) -> dict[str, str]:
    want = {"IssuerOfPatientID": "GH"}
    if not str(original.get("InstitutionName", "") or ""):
        want["InstitutionName"] = "General Hospital"
    acc = str(original.get("AccessionNumber", "") or "")
    if acc.startswith("GH-"):
        want["AccessionNumber"] = acc[3:]
    if ct_rule:
        want["StationName"] = "CTFIX"
    return want


def _without(ds: pydicom.Dataset, keywords: tuple[str, ...]) -> pydicom.Dataset:
    for k in keywords:
        if k in ds:
            delattr(ds, k)
    return ds


def _sent(f: Path) -> pydicom.Dataset:
    """The file as storescu sends it: DCMTK drops Data Set Trailing Padding (FFFC,FFFC)."""
    ds = pydicom.dcmread(f)
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    return ds


def _audit(r: Router) -> list[dict[str, Any]]:
    return [json.loads(line) for line in r.cli("audit").stdout.splitlines() if line.strip()]


def test_modified_destination_gets_exactly_the_named_changes_plain_one_the_originals(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP],
        orthanc: peers.Orthanc, pydicom_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import synth
    monkeypatch.setenv("TCP_NODELAY", "1")
    study = synth.make_study(tmp_path / "ct", modality="CT", n_instances=3, rows=32, cols=32,
                             accession="GH-777", seed=15)
    real = [Path(p) for p in (get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")) if p]
    compressed = [pydicom_data_dir / "693_J2KR.dcm"]
    assert len(real) == 2 and compressed[0].exists()
    files = study + real + compressed

    pacs, plain = storescp("PACS", accept="all"), storescp("PLAIN", accept="all")
    r = router({
        "destinations": {
            "pacs": destination(pacs.port, "PACS", modify=ISSUE_MODIFY),
            "plain": destination(plain.port, "PLAIN"),
            "orth": destination(orthanc.dicom_port, orthanc.ae_title, modify=ISSUE_MODIFY),
        },
        "rules": [
            {"name": "ct-fix", "match": {"Modality": "CT"}, "send_to": ["pacs"],
             "modify": [{"set": {"StationName": "CTFIX"}}]},
            {"name": "all", "match": None, "send_to": ["pacs", "plain", "orth"]},
        ],
    })
    res = storescu(r.port, study + real)
    assert res.returncode == 0, res.stdout + res.stderr
    res = storescu(r.port, compressed, propose="original")
    assert res.returncode == 0, res.stdout + res.stderr
    pacs.wait_for(len(files), timeout=120)
    plain.wait_for(len(files), timeout=120)

    for f in files:
        original = _sent(f)
        uid = str(original.SOPInstanceUID)
        got_plain, got_pacs = plain.file_for(uid), pacs.file_for(uid)
        assert got_plain is not None and got_pacs is not None, f.name
        assert_same_dataset(original, pydicom.dcmread(got_plain))          # untouched, element by element

        changed = pydicom.dcmread(got_pacs)
        want = _expected(original, ct_rule=original.Modality == "CT")
        assert {k: str(changed.get(k, "")) for k in want} == want, f.name
        for k in set(NAMED) - set(want):                  # not named for this object: as it was
            assert (k in changed) == (k in original), (f.name, k)
        assert_same_dataset(_without(_sent(f), tuple(want)),
                            _without(changed, tuple(want)))
        if f in compressed:                               # re-encoded in its own syntax, pixels as stored
            assert changed.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
            assert changed.PixelData == original.PixelData

    for f in study[:1] + real:                            # what Orthanc indexed
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        inst = orthanc.wait_for_instance(uid, timeout=60)
        tags = orthanc.get_json(f"/instances/{inst['ID']}/simplified-tags")
        assert tags["IssuerOfPatientID"] == "GH"
        assert tags["InstitutionName"] in ("General Hospital",
                                           str(pydicom.dcmread(f).get("InstitutionName", "")))
        assert tags.get("StationName") != "CTFIX"         # rule ct-fix does not send to orth

    def delivered() -> list[dict[str, Any]]:
        events = [e for e in _audit(r) if e["action"] == "delivered"]
        return events if len(events) == 3 * len(files) else []

    events = wait_until(delivered, 60, message="not every delivery was audited")
    for e in events:
        if e["destination"] == "plain":
            assert not {"changed_by", "attributes_changed", "sent_sop_instance_uid"} & set(e), e
            continue
        assert "changed_by" in e and "attributes_changed" in e, e
        assert set(e["changed_by"]) <= {"rule:ct-fix", f"destination:{e['destination']}"}
        assert "(0010,0021)" in e["attributes_changed"]                  # IssuerOfPatientID, a tag path
        assert "GH" not in json.dumps(e["attributes_changed"])           # never values
    ct = [e for e in events if e["destination"] == "pacs" and e["sop_instance_uid"] == str(
        pydicom.dcmread(study[0], stop_before_pixels=True).SOPInstanceUID)]
    assert ct and ct[0]["changed_by"] == ["rule:ct-fix", "destination:pacs"]
    assert "(0008,1010)" in ct[0]["attributes_changed"]                  # StationName
    assert "changed by rule:ct-fix, destination:pacs" in r.log_text()


def _sender_pid(r: Router, dest: str) -> int | None:
    try:
        return int(json.loads((r.spool_path / "run" / f"{dest}.state").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def test_lookup_on_missing_fail_keeps_the_object_failed_until_sighup_reloads_the_table(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal
    import synth
    monkeypatch.setenv("TCP_NODELAY", "1")
    known = synth.make_study(tmp_path / "a", n_instances=3, rows=16, cols=16, patient_id="P-KNOWN", seed=1)
    unknown = synth.make_study(tmp_path / "b", n_instances=2, rows=16, cols=16, patient_id="P-NEW", seed=2)
    (tmp_path / "router").mkdir()
    table = tmp_path / "router" / "ids.csv"        # beside router.yaml: a relative path
    table.write_text("old,new\nP-KNOWN,R-001\n")
    scp = storescp("LK", accept="all")
    r = router({"destinations": {"lk": destination(scp.port, "LK", modify=[
                    {"lookup": {"PatientID": "ids.csv"}, "on_missing": "fail"}])},
                "rules": [{"name": "all", "match": None, "send_to": ["lk"]}]})
    assert storescu(r.port, known + unknown).returncode == 0
    wait_until(lambda: r.queue()["lk"]["failed"] == 2 and r.queue()["lk"]["delivered"] == 3, 60,
               message=lambda: f"expected 3 delivered, 2 failed: {r.queue()['lk']}\n{r.log_tail()}")
    scp.wait_for(3, timeout=30)
    for f in known:
        got = scp.file_for(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
        assert got is not None and pydicom.dcmread(got).PatientID == "R-001"
    for f in unknown:                                 # never sent unmapped
        assert scp.file_for(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)) is None
    failed = [e for e in _audit(r) if e["action"] == "failed"]
    assert len(failed) == 2 and all("PatientID 'P-NEW'" in e["error"] and e["sop_instance_uid"] in e["error"]
                                    for e in failed)

    pid = _sender_pid(r, "lk")
    table.write_text("old,new\nP-KNOWN,R-001\nP-NEW,R-002\n")
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    wait_until(lambda: "lookup table" in r.log_text() and "reloaded (2 entries)" in r.log_text(), 30,
               message=lambda: f"the sender did not reload its table:\n{r.log_tail()}")
    assert _sender_pid(r, "lk") == pid                # reloaded in place, not restarted
    r.cli("retry", "lk", "--reason", "lookup table updated")
    scp.wait_for(5, timeout=60)
    for f in unknown:
        got = scp.file_for(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
        assert got is not None and pydicom.dcmread(got).PatientID == "R-002"


def test_deidentified_destination_through_the_router_and_burned_in_quarantine(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's research destination: its sender de-identifies (keyed UIDs, sent with the new
    SOP Instance UID), quarantines a burned-in object, and the clinical copy stays the original."""
    import synth
    from fastroute.content.deidentify import keyed_uid
    key = "a research key of enough length"
    monkeypatch.setenv("FASTROUTE_DEID_KEY", key)
    monkeypatch.setenv("TCP_NODELAY", "1")
    study = synth.make_study(tmp_path / "ct", modality="CT", n_instances=3, rows=16, cols=16,
                             patient_id="CLIN-1", patient_name="DOE^JANE", seed=5)
    burned = pydicom.dcmread(study[0])
    burned.SOPInstanceUID = pydicom.uid.generate_uid()
    burned.file_meta.MediaStorageSOPInstanceUID = burned.SOPInstanceUID
    burned.BurnedInAnnotation = "YES"
    burned_path = tmp_path / "burned.dcm"
    burned.save_as(burned_path, enforce_file_format=True)
    research, plain = storescp("AI", accept="all"), storescp("PLAIN", accept="all")
    r = router({
        "destinations": {
            "research": destination(research.port, "AI", deidentify={
                "profile": "basic", "key": "env:FASTROUTE_DEID_KEY", "quarantine_burned_in": True,
                "options": ["retain-longitudinal-modified-dates", "retain-device-identity", "clean-descriptors"]}),
            "plain": destination(plain.port, "PLAIN"),
        },
        "rules": [{"name": "ct-research", "match": {"Modality": "CT"}, "send_to": ["research", "plain"]}],
    })
    res = storescu(r.port, [*study, burned_path])
    assert res.returncode == 0, res.stdout + res.stderr
    plain.wait_for(4, timeout=60)
    research.wait_for(3, timeout=60)
    wait_until(lambda: r.queue()["research"].get("quarantined") == 1, 30,
               message=lambda: f"burned-in object not quarantined: {r.queue()['research']}")
    assert research.file_for(str(burned.SOPInstanceUID)) is None
    assert research.file_for(keyed_uid(key.encode(), str(burned.SOPInstanceUID))) is None
    for f in study:
        original = _sent(f)
        assert_same_dataset(original, pydicom.dcmread(plain.file_for(str(original.SOPInstanceUID))))
        got = research.file_for(keyed_uid(key.encode(), str(original.SOPInstanceUID)))
        assert got is not None, f.name
        deid = pydicom.dcmread(got)
        assert deid.SOPInstanceUID == deid.file_meta.MediaStorageSOPInstanceUID   # the C-STORE's UID
        assert deid.StudyInstanceUID == keyed_uid(key.encode(), str(original.StudyInstanceUID))
        assert deid.PatientID != "CLIN-1" and "DOE" not in str(deid.PatientName)
        assert deid.PatientIdentityRemoved == "YES" and deid.PixelData == original.PixelData

    def events() -> list[dict[str, Any]]:
        got = [e for e in _audit(r) if e["action"] in ("delivered", "quarantined")]
        return got if len(got) == 8 else []

    audited = wait_until(events, 30, message="deliveries and the quarantine not all audited")
    research_events = [e for e in audited if e["destination"] == "research"]
    assert [e["action"] for e in research_events].count("quarantined") == 1
    for e in research_events:
        if e["action"] == "delivered":
            assert e["changed_by"] == ["deidentify:basic"]
            assert e["sent_sop_instance_uid"] == keyed_uid(key.encode(), e["sop_instance_uid"])
            assert "(0010,0020)" in e["attributes_changed"] and "CLIN-1" not in json.dumps(e)
