"""PACS migration end to end (issue 13): `fastroute serve` migrates real archives into a real one.

Sources: Orthanc (C-MOVE and C-GET), DCMTK dcmqrscp, and the fault-injecting FakeArchive for
what real archives do not do on demand (0xA702, 0xB000 with a failed list). Destination: the
session's Orthanc with `query: true`, whose own C-FIND decides `verified`, checked again here
through its REST API (every SOP Instance UID) and element by element for a few objects.
"""
from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peers
import pydicom
import pytest
import qrpeers
from dicomcompare import assert_same_dataset
from pydicom.data import get_testdata_file
from router import Router, destination

from fastroute.spool.store import Spool

ROUTER_AE = "FASTROUTE"
TRAILING_PADDING = 0xFFFCFFFC
DATA_STORE_FILES = ["693_J2KR.dcm", "JPEG-LL.dcm", "SC_rgb.dcm", "OBXXXX1A_expb.dcm", "emri_small_RLE.dcm"]
PYDICOM_FILES = ["CT_small.dcm", "MR_small.dcm", "test-SR.dcm", "image_dfl.dcm"]


# -- helpers -------------------------------------------------------------------------------------

def real_files(pydicom_data_dir: Path) -> list[Path]:
    """Real objects, one per SOP Instance UID (some pydicom-data files share theirs)."""
    files = [pydicom_data_dir / n for n in DATA_STORE_FILES] + [Path(str(get_testdata_file(n))) for n in PYDICOM_FILES]
    seen: dict[str, Path] = {}
    for f in files:     # image_dfl.dcm, test-SR.dcm: neither StudyDate nor PatientID
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        seen.setdefault(str(ds.SOPInstanceUID), f)
    return list(seen.values())


def sop_uids(files: list[Path]) -> dict[str, Path]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}


def study_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}


def config(dest: peers.Orthanc, sources: dict[str, dict[str, Any]], **dest_extra: Any) -> dict[str, Any]:
    return {"destinations": {"newpacs": {**destination(dest.dicom_port, dest.ae_title), "query": True, **dest_extra}},
            "sources": sources}


def source(ae: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"ae_title": ae, "host": "127.0.0.1", "port": port, **extra}


def start_job(r: Router, src: str, *args: str) -> str:
    out = r.cli("migrate", "start", "--from", src, "--to", "newpacs", *args).stdout.strip()
    assert out, "migrate start printed no job name"
    return out.splitlines()[-1]


def status(r: Router, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(r.cli("migrate", "status", name, "--json").stdout)
    return doc


def wait_state(r: Router, name: str, states: set[str], timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = status(r, name)
        if last["state"] in states:
            return last
        time.sleep(0.5)
    raise AssertionError(f"job {name} not in {states} after {timeout}s: {last}\n{r.log_tail(80)}")


def report(r: Router, name: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(r.cli("migrate", "report", name, "--format", "json").stdout)
    return rows


def job_records(r: Router, name: str, study_uid: str) -> list[tuple[int, str]]:
    """(oid, SOP Instance UID) of every object spooled for this job and study."""
    spool = Spool(r.spool_path)
    try:
        return [(oid, rec.sop_instance_uid) for oid, rec in spool.lookup(study_instance_uid=study_uid)
                if rec.extra.get("migration") == name]
    finally:
        spool.close()


def assert_all_at(dest: peers.Orthanc, files: dict[str, Path], compare: int = 3) -> None:
    """Every SOP Instance UID is in the destination; the first ``compare`` are equal element by
    element to what the source archive was loaded with."""
    missing = [uid for uid in files if dest.find_instance(uid) is None]
    assert not missing, f"{len(missing)} instance(s) lost: {missing[:5]}"
    for uid, path in list(files.items())[:compare]:
        found = dest.find_instance(uid)
        assert found is not None
        got = pydicom.dcmread(io.BytesIO(dest.get_instance_file(found["ID"])))
        sent = pydicom.dcmread(path)
        if TRAILING_PADDING in sent:    # Orthanc (the destination) drops it when it stores
            del sent[TRAILING_PADDING]
        assert_same_dataset(sent, got)


def assert_done_verified(r: Router, name: str, studies: set[str], timeout: float = 180.0) -> dict[str, Any]:
    st = wait_state(r, name, {"done", "done-with-errors", "cancelled"}, timeout)
    rows = report(r, name)
    bad = [row for row in rows if row["state"] != "verified"]
    assert st["state"] == "done" and not bad, f"{st}\n{bad}\n{r.log_tail(80)}"
    assert {row["study_instance_uid"] for row in rows} >= studies
    for row in rows:
        assert row["found_at_destination"] == row["source_instances"] == row["received"] > 0
    return st


@pytest.fixture
def oldpacs(orthanc: peers.Orthanc, tmp_path: Path) -> Iterator[peers.Orthanc]:
    """An Orthanc of its own as the source archive (the session's Orthanc is the destination)."""
    src = peers.Orthanc("OLDPACS", workdir=tmp_path / "oldpacs")
    src.start()
    yield src
    src.kill()
    src.stop()


def serve(router: Callable[..., Router], dest: peers.Orthanc, sources: dict[str, dict[str, Any]],
          **dest_extra: Any) -> Router:
    r = router(config(dest, sources, **dest_extra), start=False)
    qrpeers.register_modality(dest, "fastroute", ROUTER_AE, r.port)      # it may C-FIND there
    return r.start()


# -- Orthanc -> fastroute -> Orthanc ----------------------------------------------------------

@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_orthanc_to_orthanc_every_study_verified(retrieve: str, router: Callable[..., Router],
                                                  orthanc: peers.Orthanc, oldpacs: peers.Orthanc,
                                                  pydicom_data_dir: Path,
                                                  synth_study: Callable[..., list[Path]]) -> None:
    orthanc.clear()
    files = real_files(pydicom_data_dir)
    files += synth_study(n_series=2, n_instances=4, tiny=True) + synth_study(modality="MR", n_instances=3, tiny=True)
    qrpeers.load_orthanc(oldpacs, files)
    r = serve(router, orthanc, {"oldpacs": source("OLDPACS", oldpacs.dicom_port, retrieve=retrieve)})
    qrpeers.register_modality(oldpacs, "fastroute", ROUTER_AE, r.port)
    name = start_job(r, "oldpacs", "--name", f"orthanc-{retrieve}")
    st = assert_done_verified(r, name, study_uids(files))
    assert st["instances_expected"] == st["instances_received"] == len(files)
    # C-MOVE and C-GET alike: every object arrives as stored (C-GET offers each class once per
    # stored syntax), compressed ones included
    assert_all_at(orthanc, sop_uids(files), compare=len(files))


def _dataset_bytes(path: Path) -> tuple[str, bytes]:
    """A file's transfer syntax and the bytes of its dataset (what follows the file meta)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    # preamble + "DICM", the (0002,0000) element, then the group length it declares
    return str(meta.TransferSyntaxUID), path.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def assert_same_as_stored(got: bytes, stored: bytes, ts: str) -> None:
    """The dataset as stored: same length, the compressed pixel data (every fragment) byte for
    byte, every other element with the same value. Orthanc's network layer (DCMTK) rewrites a
    dataset as it sends it: it recomputes (gggg,0000) group lengths and writes encapsulated
    Pixel Data with VR OB where the file said OW, so a few header bytes may differ."""
    assert len(got) == len(stored)

    def read(raw: bytes) -> pydicom.Dataset:
        ds = pydicom.dcmread(io.BytesIO(raw), force=True)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
        return ds

    a, b = read(got), read(stored)
    assert a.PixelData == b.PixelData
    tags = {t for t in b.keys() if t.element != 0}
    assert {t for t in a.keys() if t.element != 0} == tags
    for tag in tags:
        assert a[tag].value == b[tag].value, tag


@pytest.mark.parametrize("name", ["693_J2KR.dcm", "emri_small_jpeg_ls_lossless.dcm", "emri_small_RLE.dcm"])
def test_c_get_from_orthanc_sends_compressed_objects_as_stored(name: str, oldpacs: peers.Orthanc,
                                                               pydicom_data_dir: Path) -> None:
    """One context per (class, syntax): Orthanc sends each object in its stored syntax, byte for
    byte. Offered only Explicit VR Little Endian it must transcode, and cannot for JPEG 2000:
    that sub-operation fails and the final response lists the instance (Orthanc puts the list
    in the command set, past its group length: read, not a malformed PDU)."""
    from fastroute.config import SourceConfig
    from fastroute.dicom.dimse import Message, Peer, Reply
    from fastroute.dicom.qr import Level, QueryRetrieveClient, storage_contexts

    f = pydicom_data_dir / name
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    stored_ts, stored = _dataset_bytes(f)
    qrpeers.load_orthanc(oldpacs, [f])
    qrpeers.register_modality(oldpacs, "getter", "GETTER", 1)
    got: list[tuple[str, str, bytes]] = []

    def store(peer: Peer, msg: Message) -> Reply:
        assert isinstance(msg.data, bytearray)
        got.append((msg.sop_instance_uid, peer.contexts[msg.context_id], bytes(msg.data)))
        return Reply(0)

    src = SourceConfig(name="s", ae_title="OLDPACS", host="127.0.0.1", port=oldpacs.dicom_port)
    with QueryRetrieveClient(src, "GETTER", store=store, storage=storage_contexts([str(ds.SOPClassUID)])) as c:
        result = c.get({"StudyInstanceUID": str(ds.StudyInstanceUID)})
        assert result.status == 0 and result.counts.completed == 1, result
    assert [(uid, ts) for uid, ts, _ in got] == [(str(ds.SOPInstanceUID), stored_ts)]
    assert_same_as_stored(got[0][2], stored, stored_ts)

    if stored_ts == "1.2.840.10008.1.2.4.90":
        got.clear()
        with QueryRetrieveClient(src, "GETTER", store=store,
                                 storage=[(str(ds.SOPClassUID), ("1.2.840.10008.1.2.1",))]) as c:
            result = c.get({"StudyInstanceUID": str(ds.StudyInstanceUID)})
            assert result.status != 0 and result.failed_sop_instance_uids == [str(ds.SOPInstanceUID)]
            assert list(c.find(Level.STUDY, {"StudyInstanceUID": str(ds.StudyInstanceUID)}))   # still usable
        assert got == []


def test_kill_9_mid_job_then_serve_again_continues_and_fetches_nothing_verified_twice(
        router: Callable[..., Router], orthanc: peers.Orthanc, oldpacs: peers.Orthanc,
        synth_study: Callable[..., list[Path]]) -> None:
    studies = [synth_study(n_instances=5, tiny=True, seed=i) for i in range(8)]
    files = [f for s in studies for f in s]
    qrpeers.load_orthanc(oldpacs, files)
    # max_associations 1 and a rate keep the job slow enough to be killed in the middle.
    r = serve(router, orthanc, {"oldpacs": source("OLDPACS", oldpacs.dicom_port, max_associations=1)})
    qrpeers.register_modality(oldpacs, "fastroute", ROUTER_AE, r.port)
    name = start_job(r, "oldpacs", "--name", "crash", "--rate", "1800/h")
    deadline = time.monotonic() + 120
    while status(r, name)["studies_verified"] < 2:
        assert time.monotonic() < deadline, r.log_tail(80)
        time.sleep(0.2)
    r.kill()
    verified_before = {row["study_instance_uid"] for row in report(r, name) if row["state"] == "verified"}
    assert 2 <= len(verified_before) < len(studies)
    copies_before = {uid: sorted(job_records(r, name, uid)) for uid in verified_before}
    r.start()
    assert_done_verified(r, name, study_uids(files), timeout=240)
    for uid in verified_before:    # nothing verified was fetched (or spooled) again
        assert sorted(job_records(r, name, uid)) == copies_before[uid]
    for uid in study_uids(files):  # and every study came exactly once per instance
        recs = job_records(r, name, uid)
        assert len({sop for _, sop in recs}) == len(recs) == 5
    assert_all_at(orthanc, sop_uids(files), compare=2)


def test_a_closed_time_window_waits_and_retrieves_nothing(router: Callable[..., Router], orthanc: peers.Orthanc,
                                                          oldpacs: peers.Orthanc,
                                                          synth_study: Callable[..., list[Path]]) -> None:
    files = synth_study(n_instances=3, tiny=True)
    qrpeers.load_orthanc(oldpacs, files)
    r = serve(router, orthanc, {"oldpacs": source("OLDPACS", oldpacs.dicom_port)})
    qrpeers.register_modality(oldpacs, "fastroute", ROUTER_AE, r.port)
    now = time.localtime()
    start = (now.tm_hour * 60 + now.tm_min + 120) % 1440     # opens in two hours, for an hour
    window = f"{start // 60:02d}:{start % 60:02d}-{(start + 60) // 60 % 24:02d}:{(start + 60) % 60:02d}"
    name = start_job(r, "oldpacs", "--name", "nightly", "--window", window)
    st = wait_state(r, name, {"waiting-window"}, timeout=60)
    time.sleep(3)       # not synchronisation: a period in which nothing may happen
    st = status(r, name)
    assert st["state"] == "waiting-window" and st["instances_received"] == 0
    assert not job_records(r, name, next(iter(study_uids(files))))
    r.cli("migrate", "cancel", name)


# -- dcmqrscp as a second source; a destination verified by counts ------------------------------

class DcmQrScp(qrpeers.DcmQrScp):
    """qrpeers' dcmqrscp in its default fork mode: DCMTK 3.6.7's dcmqrscp in single-process
    mode (-s) with a host table exits (SIGSEGV) after its first association (reported to
    branch mig-qr). Each association's child ends with it; the parent is stopped by PID."""

    def _argv(self) -> list[str]:
        return [a for a in super()._argv() if a != "-s"]


def test_dcmqrscp_source_and_a_study_level_destination_verified_by_counts(
        router: Callable[..., Router], orthanc: peers.Orthanc, tmp_path: Path,
        synth_study: Callable[..., list[Path]]) -> None:
    files = synth_study(n_series=2, n_instances=3, tiny=True) + synth_study(modality="CR", n_instances=2, tiny=True)
    r = router(config(orthanc, {}), start=False)
    qr = DcmQrScp("DCMQRSCP", destinations={ROUTER_AE: ("127.0.0.1", r.port)}, workdir=tmp_path / "qr")
    qr.start()
    try:
        qr.load(files)
        r.write_config(**config(orthanc, {"archive2": source("DCMQRSCP", qr.port)}, query_level="study"))
        qrpeers.register_modality(orthanc, "fastroute", ROUTER_AE, r.port)
        r.start()
        name = start_job(r, "archive2", "--name", "from-dcmqrscp")
        assert_done_verified(r, name, study_uids(files))
        assert_all_at(orthanc, sop_uids(files), compare=2)
    finally:
        r.stop()
        qr.stop()


def _uid_values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [u for u in str(value).split("\\") if u]


# -- faults real archives do not produce on demand ----------------------------------------------

@pytest.fixture
def fake_archive() -> Iterator[Callable[..., qrpeers.FakeArchive]]:
    started: list[qrpeers.FakeArchive] = []

    def make(kind: type[qrpeers.FakeArchive] = qrpeers.FakeArchive, **kw: Any) -> qrpeers.FakeArchive:
        pacs = kind(**kw)
        started.append(pacs)
        return pacs

    yield make
    for pacs in started:
        pacs.stop()


@pytest.mark.parametrize("uid_lists", ["matched", "ignored"])
def test_busy_source_is_backed_off_then_a_failed_list_is_fetched_again_alone(
        uid_lists: str, router: Callable[..., Router], orthanc: peers.Orthanc,
        fake_archive: Callable[..., qrpeers.FakeArchive], synth_study: Callable[..., list[Path]]) -> None:
    files = synth_study(n_instances=6, tiny=True)
    r = router(config(orthanc, {}), start=False)
    pacs = fake_archive(ae_title="FAKEPACS", destinations={ROUTER_AE: ("127.0.0.1", r.port)},
                        ignore_uid_lists=uid_lists == "ignored")
    pacs.add_files(files)
    uids = list(sop_uids(files))
    pacs.busy_moves = 1                         # 0xA702 first
    pacs.fail_instances = set(uids[:2])         # then 0xB000 with these two in the failed list
    pacs.start()
    r.write_config(**config(orthanc, {"fake": source("FAKEPACS", pacs.port)}))
    qrpeers.register_modality(orthanc, "fastroute", ROUTER_AE, r.port)
    r.start()
    name = start_job(r, "fake", "--name", "faults")
    deadline = time.monotonic() + 60
    while not any(q.command == "C-MOVE" and q.status == 0xB000 for q in pacs.requests):
        assert time.monotonic() < deadline, f"{pacs.requests}\n{r.log_tail(60)}"
        time.sleep(0.1)
    pacs.fail_instances = set()                 # the archive recovers
    assert_done_verified(r, name, study_uids(files), timeout=120)
    moves = [q for q in pacs.requests if q.command == "C-MOVE"]
    assert [q.status for q in moves[:2]] == [0xA702, 0xB000]
    again = moves[2:]
    # (FakeArchive records no status for a retrieve that matched nothing: None)
    assert again and all(q.status in (0, None) for q in again), [(q.status, q.message_id) for q in moves]
    refetched = {u for q in again for u in _uid_values(q.identifier.get("SOPInstanceUID"))}
    # Only the failed instances are fetched again: by IMAGE level, by their UIDs as a list;
    # an archive that ignores UID lists (it answers the list with nothing) one by one after.
    assert refetched == set(uids[:2]), "only the failed instances are fetched again"
    assert all(q.identifier.QueryRetrieveLevel == "IMAGE" for q in again)
    asked = [sorted(_uid_values(q.identifier.get("SOPInstanceUID"))) for q in again]
    one_by_one = "retrieving them one by one" in r.log_text()
    if uid_lists == "matched":
        assert asked == [sorted(uids[:2])] and again[0].status == 0 and not one_by_one
    else:
        assert asked[0] == sorted(uids[:2]) and again[0].status in (0, None)
        assert sorted(map(tuple, asked[1:])) == sorted((u,) for u in uids[:2]) and one_by_one
    assert "0xA702" in r.log_text()
    assert_all_at(orthanc, sop_uids(files), compare=1)


class MoveHangingArchive(qrpeers.FakeArchive):
    """``hang`` for C-MOVE only: the inventory's and the listing's C-FINDs are answered."""

    def _on_find(self, event: Any) -> Iterator[tuple[int, Any]]:
        hang, self.hang = self.hang, False       # one association at a time (max_associations 1)
        try:
            yield from super()._on_find(event)
        finally:
            self.hang = hang


def _fake_source(router: Callable[..., Router], orthanc: peers.Orthanc,
                 fake_archive: Callable[..., qrpeers.FakeArchive], files: list[Path],
                 knobs: dict[str, Any] | None = None, *, max_attempts: int | None = None,
                 **src: Any) -> tuple[Router, qrpeers.FakeArchive]:
    """A started FakeArchive (with ``knobs`` set) and a router configured for it (not started)."""
    r = router(config(orthanc, {}), start=False)
    kind = MoveHangingArchive if (knobs or {}).get("hang") else qrpeers.FakeArchive
    pacs = fake_archive(kind, ae_title="FAKEPACS", destinations={ROUTER_AE: ("127.0.0.1", r.port)},
                        **(knobs or {}))
    pacs.add_files(files)
    pacs.start()
    dest_extra = {} if max_attempts is None else {"max_attempts": max_attempts}
    r.write_config(**config(orthanc, {"fake": source("FAKEPACS", pacs.port, **src)}, **dest_extra))
    qrpeers.register_modality(orthanc, "fastroute", ROUTER_AE, r.port)
    return r, pacs


def test_a_final_response_before_the_last_c_store_waits_for_it(
        router: Callable[..., Router], orthanc: peers.Orthanc,
        fake_archive: Callable[..., qrpeers.FakeArchive], synth_study: Callable[..., list[Path]]) -> None:
    files = synth_study(n_instances=4, tiny=True)
    r, pacs = _fake_source(router, orthanc, fake_archive, files, {"early_final": True, "early_final_delay": 2.0})
    r.start()
    name = start_job(r, "fake", "--name", "early")
    assert_done_verified(r, name, study_uids(files), timeout=120)
    # One C-MOVE: the late C-STORE was waited for, attributed by its Move Originator, not re-fetched.
    assert [q.command for q in pacs.requests if q.command == "C-MOVE"] == ["C-MOVE"]
    assert "still missing" not in r.log_text(), "waited for within the same attempt"
    assert_all_at(orthanc, sop_uids(files), compare=1)
    spool = Spool(r.spool_path)
    try:    # everything arrived: its registration was removed, not left to expire
        assert list(spool.moves.active()) == []
    finally:
        spool.close()


def test_a_retrieve_past_its_timeout_is_cancelled_and_what_is_missing_fetched_again(
        router: Callable[..., Router], orthanc: peers.Orthanc,
        fake_archive: Callable[..., qrpeers.FakeArchive], synth_study: Callable[..., list[Path]]) -> None:
    files = synth_study(n_instances=4, tiny=True)
    # the first C-MOVE sends all but its last object, then hangs
    r, pacs = _fake_source(router, orthanc, fake_archive, files, {"hang": True}, retrieve_timeout=3,
                           max_associations=1)
    r.start()
    name = start_job(r, "fake", "--name", "slow")
    deadline = time.monotonic() + 60
    while pacs.cancels == 0 and not any(q.status == 0xFE00 for q in pacs.requests):
        assert time.monotonic() < deadline, f"{pacs.requests}\n{r.log_tail(40)}"
        time.sleep(0.1)
    pacs.hang = False
    assert_done_verified(r, name, study_uids(files), timeout=120)
    moves = [q for q in pacs.requests if q.command == "C-MOVE"]
    assert moves[0].status == 0xFE00 and len(moves) >= 2
    last = _uid_values(moves[-1].identifier.get("SOPInstanceUID"))
    assert len(last) == 1, "only the instance the cancelled move did not send is fetched again"
    assert "retrieve_timeout" in r.log_text()


def test_an_unknown_move_destination_is_a_job_error_naming_the_ae_to_register(
        router: Callable[..., Router], orthanc: peers.Orthanc,
        fake_archive: Callable[..., qrpeers.FakeArchive], synth_study: Callable[..., list[Path]]) -> None:
    files = synth_study(n_instances=2, tiny=True)
    r, pacs = _fake_source(router, orthanc, fake_archive, files, {"unknown_destination": True})
    r.start()
    name = start_job(r, "fake", "--name", "unregistered")
    deadline = time.monotonic() + 60
    while "0xA801" not in (err := status(r, name)["error"]):
        assert time.monotonic() < deadline, r.log_tail(40)
        time.sleep(0.2)
    assert ROUTER_AE in err and str(r.port) in err and "FAKEPACS" in err
    assert status(r, name)["studies_failed"] == 0      # the source's setup, not the study's fault
    pacs.unknown_destination = False                   # the operator registered us
    assert_done_verified(r, name, study_uids(files), timeout=900)


def test_pause_stops_new_retrieves_and_resume_finishes(
        router: Callable[..., Router], orthanc: peers.Orthanc,
        fake_archive: Callable[..., qrpeers.FakeArchive], synth_study: Callable[..., list[Path]]) -> None:
    studies = [synth_study(n_instances=2, tiny=True, seed=i) for i in range(4)]
    files = [f for s in studies for f in s]
    r, pacs = _fake_source(router, orthanc, fake_archive, files, max_associations=1)
    r.start()
    name = start_job(r, "fake", "--name", "pausable", "--rate", "1200/h")   # a study per 3 s
    deadline = time.monotonic() + 60
    while not any(q.command == "C-MOVE" for q in pacs.requests):
        assert time.monotonic() < deadline, r.log_tail(40)
        time.sleep(0.1)
    r.cli("migrate", "pause", name)
    time.sleep(1.0)    # a retrieve that had already started may finish
    moves = len([q for q in pacs.requests if q.command == "C-MOVE"])
    time.sleep(5.0)    # not synchronisation: a period in which no retrieve may start
    assert len([q for q in pacs.requests if q.command == "C-MOVE"]) == moves
    assert status(r, name)["state"] == "paused"
    r.cli("migrate", "resume", name)
    assert_done_verified(r, name, study_uids(files), timeout=120)


# -- the process -------------------------------------------------------------------------------

def _started(r: Router, name: str) -> list[int]:
    import re
    return [int(p) for p in re.findall(rf"started {name} \(pid (\d+)\)", r.log_text())]


def _alive(pid: int) -> bool:
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_the_migration_process_runs_with_sources_and_restarts_when_they_change(
        router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    import os
    import signal

    from peers import wait_until

    scp = storescp("DEST")
    dests = {"newpacs": destination(scp.port, "DEST")}
    r = router({"destinations": dests, "sources": {"oldpacs": source("OLDPACS", 104)}})
    wait_until(lambda: _started(r, "migration"), 30, message=lambda: r.log_tail())
    first = _started(r, "migration")[0]
    assert _alive(first)
    wait_until(lambda: b"fastroute: migration" in Path(f"/proc/{first}/cmdline").read_bytes(), 30,
               message="the migration process has no title of its own")
    listeners = _started(r, "listener-0")
    assert r.proc is not None
    r.write_config(sources={"oldpacs": source("OLDPACS", 104, max_associations=4)})
    os.kill(r.proc.pid, signal.SIGHUP)
    wait_until(lambda: len(_started(r, "migration")) == 2, 30, message=lambda: r.log_tail())
    wait_until(lambda: not _alive(first), 30, message="the old migration process kept running")
    assert "migration (sources)" in r.log_text()
    assert _started(r, "listener-0") == listeners           # nothing else restarted
    second = _started(r, "migration")[1]
    r.write_config(sources={})
    os.kill(r.proc.pid, signal.SIGHUP)
    wait_until(lambda: not _alive(second), 30, message="the migration process outlived its sources")
    wait_until(lambda: "reload applied" in r.log_text().rsplit("reloading configuration", 1)[-1], 30)
    assert len(_started(r, "migration")) == 2


# -- verification ------------------------------------------------------------------------------

LOSE_ONCE = """
lost = {}
function OnStoredInstance(instanceId, tags, metadata, origin)
  local uid = tags['SOPInstanceUID']
  if uid == '%s' and not lost[uid] then
    lost[uid] = true
    Delete(instanceId)
  end
end
"""


def test_an_instance_the_destination_lost_is_fetched_again_and_then_verified(
        router: Callable[..., Router], fake_archive: Callable[..., qrpeers.FakeArchive], tmp_path: Path,
        synth_study: Callable[..., list[Path]]) -> None:
    files = synth_study(n_instances=4, tiny=True)
    lost = list(sop_uids(files))[2]
    lua = tmp_path / "lose-once.lua"
    lua.write_text(LOSE_ONCE % lost)       # acknowledged, then silently dropped, the first time
    dest = peers.Orthanc("NEWPACS", workdir=tmp_path / "newpacs", extra_config={"LuaScripts": [str(lua)]})
    dest.start()
    try:
        r, pacs = _fake_source(router, dest, fake_archive, files)
        r.start()
        name = start_job(r, "fake", "--name", "lossy-destination")
        assert_done_verified(r, name, study_uids(files), timeout=120)
        moves = [q for q in pacs.requests if q.command == "C-MOVE"]
        assert len(moves) == 2 and _uid_values(moves[1].identifier.get("SOPInstanceUID")) == [lost]
        assert "not found at the destination" in r.log_text()
        assert_all_at(dest, sop_uids(files), compare=1)
        r.stop()
    finally:
        dest.stop()


def test_no_verify_ends_each_study_delivered(router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP],
                                             fake_archive: Callable[..., qrpeers.FakeArchive],
                                             synth_study: Callable[..., list[Path]]) -> None:
    files = synth_study(n_instances=3, tiny=True) + synth_study(modality="MR", n_instances=2, tiny=True)
    scp = storescp("STORESCP")
    r = router({"destinations": {"newpacs": destination(scp.port)}}, start=False)
    pacs = fake_archive(ae_title="FAKEPACS", destinations={ROUTER_AE: ("127.0.0.1", r.port)})
    pacs.add_files(files).start()
    r.write_config(sources={"fake": source("FAKEPACS", pacs.port)})
    r.start()
    name = start_job(r, "fake", "--name", "unverified", "--no-verify")
    st = wait_state(r, name, {"done", "done-with-errors"}, timeout=120)
    rows = report(r, name)
    assert st["state"] == "done" and {row["state"] for row in rows} == {"delivered"}, rows
    assert all(row["found_at_destination"] in (None, "") for row in rows)
    assert sorted(p.name for p in scp.wait_for(len(files))) and len(scp.files()) == len(files)


def test_cancel_aborts_the_retrieve_in_flight_and_starts_no_other(
        router: Callable[..., Router], orthanc: peers.Orthanc,
        fake_archive: Callable[..., qrpeers.FakeArchive], synth_study: Callable[..., list[Path]]) -> None:
    studies = [synth_study(n_instances=2, tiny=True, seed=i) for i in range(3)]
    files = [f for s in studies for f in s]
    # Every C-MOVE hangs (never ends by itself): only the cancel can end the first one.
    r, pacs = _fake_source(router, orthanc, fake_archive, files, {"hang": True, "ignore_cancel": True},
                           max_associations=1)
    r.start()
    name = start_job(r, "fake", "--name", "cancelled")
    deadline = time.monotonic() + 60
    while not any(q.command == "C-MOVE" for q in pacs.requests):
        assert time.monotonic() < deadline, r.log_tail(40)
        time.sleep(0.1)
    r.cli("migrate", "cancel", name)
    wait_until_log = time.monotonic() + 30
    while "cancelled: aborting its retrieve in flight" not in r.log_text():
        assert time.monotonic() < wait_until_log, r.log_tail(40)
        time.sleep(0.2)
    time.sleep(3.0)    # not synchronisation: a period in which no retrieve may start
    assert len([q for q in pacs.requests if q.command == "C-MOVE"]) == 1
    st = status(r, name)
    assert st["state"] == "cancelled" and st["studies_verified"] == 0


DISCARD = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.SOPInstanceUID ~= '%s'
end
"""


def test_an_instance_the_destination_always_discards_fails_its_study_with_the_list(
        router: Callable[..., Router], fake_archive: Callable[..., qrpeers.FakeArchive], tmp_path: Path,
        synth_study: Callable[..., list[Path]]) -> None:
    lossy = synth_study(n_instances=3, tiny=True)
    fine = synth_study(modality="MR", n_instances=2, tiny=True)
    lost = list(sop_uids(lossy))[1]
    lua = tmp_path / "discard.lua"
    lua.write_text(DISCARD % lost)     # Orthanc 1.10 answers Success and keeps nothing
    dest = peers.Orthanc("NEWPACS", workdir=tmp_path / "newpacs", extra_config={"LuaScripts": [str(lua)]})
    dest.start()
    try:
        r, pacs = _fake_source(router, dest, fake_archive, lossy + fine)
        r.start()
        name = start_job(r, "fake", "--name", "discarding-destination")
        st = wait_state(r, name, {"done", "done-with-errors"}, timeout=180)
        rows = {row["study_instance_uid"]: row for row in report(r, name)}
        bad, good = rows[next(iter(study_uids(lossy)))], rows[next(iter(study_uids(fine)))]
        assert st["state"] == "done-with-errors" and st["studies_failed"] == 1, st
        assert good["state"] == "verified"
        assert bad["state"] == "failed" and bad["found_at_destination"] == 2
        assert bad["reason"] == f"1 of 3 instance(s) not found at the destination: {lost}", bad
        # fetched again after each failed verification, by its UID alone
        again = [q for q in pacs.requests if q.command == "C-MOVE"
                 and _uid_values(q.identifier.get("SOPInstanceUID")) == [lost]]
        assert len(again) == 2, pacs.requests
        r.stop()
    finally:
        dest.stop()


def test_a_source_without_image_level_is_retrieved_by_study_and_counted(
        router: Callable[..., Router], orthanc: peers.Orthanc,
        fake_archive: Callable[..., qrpeers.FakeArchive], synth_study: Callable[..., list[Path]]) -> None:
    files = synth_study(n_series=2, n_instances=3, tiny=True)
    r, pacs = _fake_source(router, orthanc, fake_archive, files, {"image_level": False}, image_level=False)
    r.start()
    name = start_job(r, "fake", "--name", "counts-only")
    assert_done_verified(r, name, study_uids(files), timeout=120)
    assert not any(q.command == "C-FIND" and q.identifier.QueryRetrieveLevel == "IMAGE" for q in pacs.requests)
    moves = [q for q in pacs.requests if q.command == "C-MOVE"]
    assert [q.identifier.QueryRetrieveLevel for q in moves] == ["STUDY"]
    assert_all_at(orthanc, sop_uids(files), compare=1)


def test_a_study_above_the_series_threshold_is_retrieved_series_by_series(
        router: Callable[..., Router], orthanc: peers.Orthanc,
        fake_archive: Callable[..., qrpeers.FakeArchive], synth_study: Callable[..., list[Path]]) -> None:
    files = synth_study(n_series=3, n_instances=2, tiny=True)
    r, pacs = _fake_source(router, orthanc, fake_archive, files, series_threshold=4)
    r.start()
    name = start_job(r, "fake", "--name", "by-series")
    assert_done_verified(r, name, study_uids(files), timeout=120)
    moves = [q for q in pacs.requests if q.command == "C-MOVE"]
    assert [q.identifier.QueryRetrieveLevel for q in moves] == ["SERIES"] * 3
    assert len({str(q.identifier.SeriesInstanceUID) for q in moves}) == 3


def test_fastroute_retrieve_moves_one_study_and_waits_for_its_verification(
        router: Callable[..., Router], orthanc: peers.Orthanc, oldpacs: peers.Orthanc,
        synth_study: Callable[..., list[Path]]) -> None:
    wanted, other = synth_study(n_instances=3, tiny=True), synth_study(n_instances=2, tiny=True)
    qrpeers.load_orthanc(oldpacs, wanted + other)
    r = serve(router, orthanc, {"oldpacs": source("OLDPACS", oldpacs.dicom_port)})
    qrpeers.register_modality(oldpacs, "fastroute", ROUTER_AE, r.port)
    uid = next(iter(study_uids(wanted)))
    res = r.cli("retrieve", "oldpacs", "--study", uid, "--to", "newpacs", "--wait", "--timeout", "120")
    assert res.returncode == 0, res.stdout + res.stderr
    assert_all_at(orthanc, sop_uids(wanted), compare=1)
    assert all(orthanc.find_instance(s) is None for s in sop_uids(other)), "only the study asked for"


def test_a_destination_refusing_image_level_is_verified_by_its_study_count(
        tmp_path: Path, fake_archive: Callable[..., qrpeers.FakeArchive],
        synth_study: Callable[..., list[Path]]) -> None:
    """query_level image (the default) against an archive that refuses IMAGE-level C-FIND:
    the verification falls back to NumberOfStudyRelatedInstances by itself."""
    from fastroute.config import loads
    from fastroute.migration.runner import MigrationRunner

    files = synth_study(n_series=2, n_instances=2, tiny=True)
    pacs = fake_archive(ae_title="NEWPACS", image_level=False)
    pacs.add_files(files).start()
    cfg = loads(f"""
ae_title: {ROUTER_AE}
spool: {tmp_path / 'spool'}
destinations:
  newpacs: {{ae_title: NEWPACS, host: 127.0.0.1, port: {pacs.port}, query: true}}
""")
    spool = Spool(cfg.spool)
    try:
        runner = MigrationRunner(cfg, spool)
        found, count = runner._query_destination(cfg.destinations["newpacs"], next(iter(study_uids(files))))
        runner.close()
    finally:
        spool.close()
    assert found is None and count == len(files)
    levels = [str(q.identifier.QueryRetrieveLevel) for q in pacs.requests]
    assert levels == ["IMAGE", "STUDY"] and pacs.requests[0].status == 0xA900
