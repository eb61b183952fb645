"""End-to-end: DCMTK/Orthanc -> fastroute (real processes) -> DCMTK/Orthanc, on 127.0.0.1."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pydicom
import pytest
from pydicom.data import get_testdata_file

import peers
import synth
from dicomcompare import assert_same_dataset
from peers import free_port, storescu, echoscu, wait_until
from router import Router, destination

pytestmark = pytest.mark.peers


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file as written bit-preserving by storescp (+B)."""
    from fastroute.cli import read_part10
    return read_part10(path)[1]


# ---------------------------------------------------------------------------------------------

def test_echo_and_calling_ae_allow_list(router: Callable[..., Router]) -> None:
    r = router({"allowed_calling_aes": ["CT1"]})
    ok = echoscu(r.port, calling_ae="CT1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = echoscu(r.port, calling_ae="INTRUDER")
    assert bad.returncode != 0
    out = bad.stdout + bad.stderr
    assert "Calling AE Title Not Recognized" in out or "calling AE" in out.lower(), out
    wait_until(lambda: "INTRUDER" in r.log_text() and "allowed_calling_aes" in r.log_text(), 10,
               message="the rejection was not logged with the calling AE title")
    wrong_called = echoscu(r.port, called_ae="NOTME", calling_ae="CT1")
    assert wrong_called.returncode != 0


def test_peer_address_allow_list(router: Callable[..., Router]) -> None:
    r = router({"allowed_peers": ["10.0.0.0/8"]})
    res = echoscu(r.port)
    assert res.returncode != 0
    wait_until(lambda: "allowed_peers" in r.log_text(), 10, message="peer rejection not logged")


# One file per SOP Instance UID (pydicom-data reuses UIDs across encodings of one image).
FIDELITY_FILES = [
    "693_J2KR.dcm",                      # JPEG 2000 lossless CT
    "MR2_J2KI.dcm",                      # JPEG 2000 lossy
    "emri_small_jpeg_ls_lossless.dcm",   # JPEG-LS, Enhanced MR multi-frame
    "OBXXXX1A_rle_2frame.dcm",           # RLE multi-frame
    "JPEG-LL.dcm",                       # JPEG lossless
    "color3d_jpeg_baseline.dcm",         # JPEG baseline colour, 120 frames
    "liver_expb.dcm",                    # Explicit VR big endian, Segmentation
    "gdcm-US-ALOKA-16.dcm",              # Implicit VR little endian
    "SC_rgb.dcm",                        # RGB, ISO_IR 192
    "US1_J2KR.dcm",
]
PYDICOM_TEST_FILES = ["chrH31.dcm", "chrX1.dcm", "chrRuss.dcm", "test-SR.dcm", "image_dfl.dcm"]


def _fidelity_inputs(pydicom_data_dir: Path, dest: Path) -> list[Path]:
    dest.mkdir()
    files = [pydicom_data_dir / n for n in FIDELITY_FILES]
    for name in PYDICOM_TEST_FILES:
        p = get_testdata_file(name)
        if p is not None:
            files.append(Path(p))
    out = []
    for f in files:
        assert f.exists(), f
        target = dest / f.name
        shutil.copy(f, target)
        out.append(target)
    return out


def test_fidelity_real_files_same_bytes_same_syntax(tmp_path: Path, router: Callable[..., Router],
                                                    storescp: Callable[..., peers.StoreSCP],
                                                    pydicom_data_dir: Path) -> None:
    """The received bytes are forwarded as they came, in their own transfer syntax."""
    files = _fidelity_inputs(pydicom_data_dir, tmp_path / "in")
    originals = {pydicom.dcmread(f).SOPInstanceUID: f for f in files}
    # Reference: the same storescu straight into a bit-preserving storescp.
    direct = storescp("DIRECT", bit_preserving=True)
    res = storescu(direct.port, files, called_ae="DIRECT", propose="original")
    assert res.returncode == 0, res.stdout + res.stderr
    direct.wait_for(len(originals))
    routed_dest = storescp("PACS", bit_preserving=True)
    r = router({"destinations": {"pacs": destination(routed_dest.port, "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    res = storescu(r.port, files, propose="original")
    assert res.returncode == 0, res.stdout + res.stderr
    routed_dest.wait_for(len(originals), timeout=60)
    for uid, original in originals.items():
        got = routed_dest.file_for(uid)
        ref = direct.file_for(uid)
        assert got is not None and ref is not None, uid
        a, b = pydicom.dcmread(got), pydicom.dcmread(original)
        assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID, original.name
        # fastroute forwards the bytes it received: equal to what storescu sends directly.
        assert dataset_bytes(got) == dataset_bytes(ref), f"{original.name}: routed bytes differ"
        assert_same_dataset(a, b)
    q = r.queue()["pacs"]
    assert (q["pending"], q["in_flight"], q["failed"], q["delivered"]) == (0, 0, 0, len(originals))


def test_fan_out_exactly_one_copy_each(tmp_path: Path, router: Callable[..., Router],
                                       storescp: Callable[..., peers.StoreSCP]) -> None:
    files = synth.make_tiny(tmp_path / "tiny", n=300)
    a, b = storescp("DESTA", fork=True), storescp("DESTB")   # fork: serves 2 associations at once
    r = router({"destinations": {"a": destination(a.port, "DESTA", max_associations=2),
                                 "b": destination(b.port, "DESTB")},
                "rules": [{"name": "both", "match": {"Modality": "CT"}, "send_to": ["a", "b"]}]})
    res = storescu(r.port, files)
    assert res.returncode == 0, res.stderr
    for scp in (a, b):
        scp.wait_for(300, timeout=120)
    wait_until(lambda: all(q["pending"] + q["in_flight"] == 0 for q in r.queue().values()), 30,
               message="queues did not drain")
    for scp in (a, b):
        names = scp.receptions()
        assert len(names) == 300 and len(set(names)) == 300, (len(names), len(set(names)))
    # Every object left the spool once both destinations confirmed it.
    from fastroute.spool import Spool
    sp = Spool(r.spool_path, map_size=64 * 1024**3)
    try:
        assert sp.object_count() == 0
    finally:
        sp.close()


def test_rule_selection_and_default_route(tmp_path: Path, router: Callable[..., Router],
                                          storescp: Callable[..., peers.StoreSCP]) -> None:
    ct = synth.make_study(tmp_path / "ct", modality="CT", n_instances=3, tiny=True)
    mr_brain = synth.make_study(tmp_path / "mrb", modality="MR", n_instances=2, tiny=True,
                                study_description="MRI BRAIN W/O")
    mr_knee = synth.make_study(tmp_path / "mrk", modality="MR", n_instances=2, tiny=True,
                               study_description="MRI KNEE")
    us = synth.make_study(tmp_path / "us", modality="OT", n_instances=1, tiny=True)
    pacs, vna, other = storescp("PACS"), storescp("VNA"), storescp("OTHER")
    r = router({
        "destinations": {"pacs": destination(pacs.port, "PACS"), "vna": destination(vna.port, "VNA"),
                         "other": destination(other.port, "OTHER")},
        "rules": [
            {"name": "ct-from-ct1", "match": {"Modality": "CT", "calling_ae": "CT1"}, "send_to": ["pacs", "vna"]},
            {"name": "mr-brain", "match": 'Modality == "MR" and StudyDescription matches "*BRAIN*"',
             "send_to": ["vna"]},
        ],
        "default": ["other"],
    })
    for files, calling in ((ct, "CT1"), (mr_brain, "MR1"), (mr_knee, "MR1"), (us, "X"), (ct[:1], "CT2")):
        res = storescu(r.port, files, calling_ae=calling)
        assert res.returncode == 0, res.stderr
    uid = lambda f: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)  # noqa: E731
    pacs.wait_for(3)
    vna.wait_for(5)
    other.wait_for(3)    # mr_knee (2) + OT (1); the CT re-sent from CT2 is a duplicate of a CT1 one
    wait_until(lambda: all(q["pending"] + q["in_flight"] == 0 for q in r.queue().values()), 30,
               message="queues did not drain")
    assert {p.name.split(".", 1)[1][:-4] for p in pacs.files()} == {uid(f) for f in ct}
    assert {p.name.split(".", 1)[1][:-4] for p in vna.files()} == {uid(f) for f in ct + mr_brain}
    assert {p.name.split(".", 1)[1][:-4] for p in other.files()} == {uid(f) for f in mr_knee + us + ct[:1]}


def test_unrouted_objects_are_kept(tmp_path: Path, router: Callable[..., Router]) -> None:
    files = synth.make_tiny(tmp_path / "t", n=5)
    r = router({})
    # The test config's spool_prealloc (8 MiB) was written before the listener took objects:
    # an eighth into the shared file (records), the rest into the listener's shard (bytes).
    assert "MiB preallocated" in r.log_text()
    shared = (r.spool_path / "data.mdb").stat().st_size
    shard = (r.spool_path / "shards" / "0" / "data.mdb").stat().st_size
    assert shared >= 1 << 20 and shard >= 7 << 20 and shared < shard
    assert storescu(r.port, files).returncode == 0
    q = r.queue()
    assert q["~unrouted"]["pending"] == 5
    res = r.cli("purge", "unrouted", "--state", "unrouted", "--reason", "test cleanup")
    assert "purged 5" in res.stdout
    assert r.queue()["~unrouted"]["pending"] == 0
    audit = r.cli("audit").stdout
    assert '"action": "purge"' in audit and "test cleanup" in audit
    assert "chain intact" in r.cli("audit", "--verify").stdout


def test_duplicate_policy_end_to_end(tmp_path: Path, router: Callable[..., Router],
                                     storescp: Callable[..., peers.StoreSCP]) -> None:
    """With duplicate_window on, an identical re-send after delivery is suppressed (logged with
    its Study UID, audited); a correction (same SOP Instance UID, other content) is delivered.
    The content digest is taken by the sender after delivery, so this holds the receive and
    send sides to the same key. The config is an old one that still names the pynetdicom
    engine: it runs on the one engine and says so."""
    files = synth.make_tiny(tmp_path / "t", n=3)
    scp = storescp("PACS")
    r = router({"engine": "pynetdicom", "duplicate_window": "1h",
                "destinations": {"pacs": destination(scp.port, "PACS", engine="pynetdicom")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    assert storescu(r.port, files).returncode == 0
    scp.wait_for(3, timeout=60)
    wait_until(lambda: r.queue()["pacs"]["delivered"] == 3, 30, message="not all delivered")
    log = r.log_text()
    assert "config key engine: pynetdicom is deprecated and ignored" in log
    assert "config key destinations.pacs.engine: pynetdicom is deprecated and ignored" in log
    assert storescu(r.port, files[:2]).returncode == 0             # identical: accepted, not sent
    wait_until(lambda: r.queue()["pacs"]["suppressed"] == 2, 30, message="re-sends not suppressed")
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    wait_until(lambda: r.log_text().count("not forwarded: identical bytes") == 2, 10,
               message="suppressions not logged")
    assert f"study_instance_uid={study}" in r.log_text() and "destination=pacs" in r.log_text()
    audit = [json.loads(line) for line in r.cli("audit").stdout.splitlines() if line.strip()]
    suppressed = [e for e in audit if e.get("action") == "suppressed"]
    assert len(suppressed) == 2 and {e["study_instance_uid"] for e in suppressed} == {study}
    assert all(e["destination"] == "pacs" and e["duplicate_of"] for e in suppressed)
    corrected = tmp_path / "corrected.dcm"
    ds = pydicom.dcmread(files[0])
    ds.StudyDescription = "CORRECTED"
    ds.save_as(corrected)
    assert storescu(r.port, [corrected]).returncode == 0
    wait_until(lambda: len(scp.receptions()) == 4, 60, message="correction not received")
    q = r.queue()["pacs"]
    assert (q["delivered"], q["suppressed"], q["pending"], q["in_flight"]) == (4, 2, 0, 0)
    stored = scp.file_for(str(ds.SOPInstanceUID))   # storescp names files by SOP Instance UID
    assert stored is not None and pydicom.dcmread(stored).StudyDescription == "CORRECTED"


def test_resend_is_forwarded_by_default(tmp_path: Path, router: Callable[..., Router],
                                        storescp: Callable[..., peers.StoreSCP]) -> None:
    """Issue 12: "PACS lost it, please resend" - with the default configuration an identical
    re-send of delivered objects reaches the destination again."""
    files = synth.make_tiny(tmp_path / "t", n=3)
    scp = storescp("PACS")
    r = router({"destinations": {"pacs": destination(scp.port, "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    assert storescu(r.port, files).returncode == 0
    wait_until(lambda: r.queue()["pacs"]["delivered"] == 3, 60, message="not all delivered")
    assert storescu(r.port, files).returncode == 0
    wait_until(lambda: r.queue()["pacs"]["delivered"] == 6, 60, message="re-send not forwarded")
    wait_until(lambda: len(scp.receptions()) == 6, 30, message="re-send not received")
    assert r.queue()["pacs"]["suppressed"] == 0
    assert "not forwarded" not in r.log_text()


def test_destination_down_then_up_delivers_everything(tmp_path: Path, router: Callable[..., Router],
                                                      storescp: Callable[..., peers.StoreSCP]) -> None:
    files = synth.make_tiny(tmp_path / "t", n=60)
    port = free_port()
    r = router({"destinations": {"pacs": destination(port, "PACS", backoff_initial=0.2, backoff_max=1)},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    res = storescu(r.port, files)
    assert res.returncode == 0, res.stderr      # accepted while the destination is down
    wait_until(lambda: r.queue()["pacs"]["state"]["state"] == "backing_off", 20,
               message="destination never reported backing off")
    q = r.queue()["pacs"]
    assert q["pending"] + q["in_flight"] == 60 and q["failed"] == 0
    scp = storescp("PACS", port=port)
    scp.wait_for(60, timeout=60)
    wait_until(lambda: r.queue()["pacs"]["pending"] == 0, 20, message="queue did not drain")
    assert r.queue()["pacs"]["failed"] == 0


def test_crash_after_ack_loses_nothing(tmp_path: Path, router: Callable[..., Router],
                                       storescp: Callable[..., peers.StoreSCP]) -> None:
    files = synth.make_tiny(tmp_path / "t", n=40)
    port = free_port()
    cfg = {"destinations": {"pacs": destination(port, "PACS", backoff_initial=0.2, backoff_max=1)},
           "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]}
    r = router(cfg)
    res = storescu(r.port, files)
    assert res.returncode == 0, res.stderr
    r.kill()                                   # SIGKILL every process of the router at once
    r.start()
    scp = storescp("PACS", port=port)
    got = scp.wait_for(40, timeout=60)
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in got} == expected


def test_orthanc_destination_indexes_objects(tmp_path: Path, router: Callable[..., Router],
                                             orthanc: Any) -> None:
    files = synth.make_study(tmp_path / "s", modality="MR", n_instances=4, rows=64, cols=64)
    with peers.Orthanc("ORTHANC", workdir=tmp_path / "orthanc") as pacs:
        r = router({"destinations": {"pacs": destination(pacs.dicom_port, "ORTHANC")},
                    "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
        assert storescu(r.port, files).returncode == 0
        for f in files:
            ds = pydicom.dcmread(f)
            found = pacs.wait_for_instance(str(ds.SOPInstanceUID), timeout=30)
            assert found
            delivered = pydicom.dcmread(__import__("io").BytesIO(pacs.get_instance_file(found["ID"])))
            assert_same_dataset(delivered, ds)


def test_free_space_floor_refuses_with_a700_and_keeps_earlier(tmp_path: Path, router: Callable[..., Router],
                                                              storescp: Callable[..., peers.StoreSCP]) -> None:
    first = synth.make_tiny(tmp_path / "a", n=10)
    second = synth.make_tiny(tmp_path / "b", n=3)
    port = free_port()
    cfg = {"destinations": {"pacs": destination(port, "PACS", backoff_initial=0.2, backoff_max=1)},
           "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]}
    r = router(cfg)
    assert storescu(r.port, first).returncode == 0
    r.stop()
    free = shutil.disk_usage(tmp_path).free
    r.write_config(min_free_bytes=free + 1024**4)   # the floor is now above what the disk has
    r.start()
    res = storescu(r.port, second)
    assert res.returncode != 0, "storescu saw success for objects that could not be spooled"
    wait_until(lambda: r.log_text().count("-> status 0xA700") >= 1, 10,
               message=lambda: f"refusals not logged with their status:\n{r.log_tail()}")
    q = r.queue()["pacs"]    # kept: pending, or in flight while the sender tries the dead PACS
    assert q["pending"] + q["in_flight"] == 10 and q["failed"] == 0
    r.stop()
    r.write_config(min_free_bytes="1MiB")
    r.start()
    scp = storescp("PACS", port=port)
    got = scp.wait_for(10, timeout=60)
    assert len(got) == 10
    originals = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in first}
    for p in got:
        ds = pydicom.dcmread(p)
        assert_same_dataset(ds, pydicom.dcmread(originals[str(ds.SOPInstanceUID)]))


def test_spool_map_full_refuses_with_a700(tmp_path: Path, router: Callable[..., Router]) -> None:
    files = synth.make_study(tmp_path / "big", modality="CT", n_instances=12, rows=512, cols=512)
    r = router({"spool_max_bytes": "4MiB",
                "destinations": {"pacs": destination(free_port(), "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    res = storescu(r.port, files)
    assert res.returncode != 0
    wait_until(lambda: "spool_max_bytes reached" in r.log_text() and "0xA700" in r.log_text(), 10,
               message=lambda: f"map-full refusal not logged:\n{r.log_tail()}")
    q = r.queue()["pacs"]
    assert 0 < q["pending"] + q["in_flight"] < 12     # what fit was kept, the rest refused


def test_permanent_failure_is_kept_and_retried_by_command(tmp_path: Path, router: Callable[..., Router],
                                                          storescp: Callable[..., peers.StoreSCP]) -> None:
    files = synth.make_tiny(tmp_path / "t", n=3)
    # A destination that accepts only MR: CT objects have no presentation context there.
    mr_only = storescp("PACS", accept=["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
                       sop_classes=["1.2.840.10008.5.1.4.1.1.4"])
    r = router({"destinations": {"pacs": destination(mr_only.port, "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    assert storescu(r.port, files).returncode == 0
    wait_until(lambda: r.queue()["pacs"]["failed"] == 3, 30, message="objects did not fail")
    listing = r.cli("queue", "--failed", "pacs").stdout
    assert "SOP class 1.2.840.10008.5.1.4.1.1.2" in listing and "not supported" in listing, listing
    assert r.queue()["pacs"]["failed"] == 3          # kept, not deleted
    mr_only.stop()
    any_scp = storescp("PACS", port=mr_only.port)
    r.cli("retry", "pacs", "--reason", "destination fixed")
    any_scp.wait_for(3, timeout=30)
    wait_until(lambda: r.queue()["pacs"]["failed"] == 0 and r.queue()["pacs"]["pending"] == 0, 20,
               message="retry did not drain")


def test_outcome_unknown_is_resent(tmp_path: Path, router: Callable[..., Router],
                                   storescp: Callable[..., peers.StoreSCP]) -> None:
    files = synth.make_tiny(tmp_path / "t", n=2)
    aborting = storescp("PACS", abort_after=True)
    # Every object is aborted on here: allow enough unknown outcomes to outlast the swap.
    r = router({"destinations": {"pacs": destination(aborting.port, "PACS", backoff_initial=0.2, backoff_max=1,
                                                     max_unknown_outcomes=1000)},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    assert storescu(r.port, files).returncode == 0
    wait_until(lambda: r.queue()["pacs"]["unknown_outcomes"] >= 1, 30, message="no unknown outcome counted")
    aborting.stop()
    good = storescp("PACS", port=aborting.port)
    good.wait_for(2, timeout=60)
    wait_until(lambda: r.queue()["pacs"]["pending"] + r.queue()["pacs"]["in_flight"] == 0, 30,
               message="queue did not drain")


def test_sigterm_is_graceful_and_restart_resumes(tmp_path: Path, router: Callable[..., Router],
                                                 storescp: Callable[..., peers.StoreSCP]) -> None:
    files = synth.make_tiny(tmp_path / "t", n=20)
    port = free_port()
    r = router({"destinations": {"pacs": destination(port, "PACS", backoff_initial=0.2, backoff_max=1)},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    assert storescu(r.port, files).returncode == 0
    assert r.stop() == 0
    assert "all processes stopped" in r.log_text()
    r.start()
    storescp("PACS", port=port).wait_for(20, timeout=60)
