"""Issue 13: the C-MOVEs in flight (``spool.moves``), and how moved objects find their job."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pydicom
import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

import peers
import synth
from fastroute.cli import read_part10
from fastroute.config import loads
from fastroute.dicom.dimse import CommandField, Message, Peer, Pending, Reply
from fastroute.dicom.pdu import (AFFECTED_SOP_CLASS_UID, AFFECTED_SOP_INSTANCE_UID,
                                 COMMAND_FIELD, MESSAGE_ID)
from fastroute.dicom.scp import Listener
from fastroute.routing.intake import StoreService
from fastroute.routing.rules import RuleSet
from fastroute.spool import QueueState, RoutingRecord, Spool, content_digest
from fastroute.spool.commit import Committer
from fastroute.spool.moves import Move, move_key
from peers import wait_until
from router import Router, destination


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    sp = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    yield sp
    sp.close()


def test_register_lookup_unregister(spool: Spool) -> None:
    t = 1000.0
    assert spool.moves.register("FASTROUTE", 7, "job1", "1.2.3", ("newpacs", "backup"), t + 60, now=t)
    move = spool.moves.lookup("FASTROUTE", 7, now=t + 1)
    assert move == Move("FASTROUTE", 7, "job1", "1.2.3", ("newpacs", "backup"), t + 60, t)
    # the AE title as it comes off the wire (space-padded) finds the same move
    assert spool.moves.lookup("FASTROUTE       ", 7, now=t + 1) == move
    assert spool.moves.lookup("FASTROUTE", 8, now=t + 1) is None      # another id
    assert spool.moves.lookup("OTHER", 7, now=t + 1) is None          # another originator
    assert spool.moves.unregister("FASTROUTE", 7)
    assert spool.moves.lookup("FASTROUTE", 7, now=t + 1) is None
    assert not spool.moves.unregister("FASTROUTE", 7)


def test_an_active_id_is_refused_and_an_expired_one_reused(spool: Spool) -> None:
    t = 1000.0
    assert spool.moves.register("FR", 1, "job1", "1.1", ("a",), t + 10, now=t)
    assert not spool.moves.register("FR", 1, "job2", "2.2", ("b",), t + 10, now=t + 5)
    move = spool.moves.lookup("FR", 1, now=t + 5)
    assert move is not None and move.job == "job1"                   # the refused one changed nothing
    assert spool.moves.register("OTHER", 1, "job2", "2.2", ("b",), t + 10, now=t + 5)   # key is (AE, id)
    # expired: invisible to lookups, and the id may be registered again
    assert spool.moves.lookup("FR", 1, now=t + 11) is None
    assert spool.moves.register("FR", 1, "job3", "3.3", ("c",), t + 30, now=t + 11)
    move = spool.moves.lookup("FR", 1, now=t + 12)
    assert move is not None and (move.job, move.study_uid, move.destinations) == ("job3", "3.3", ("c",))


def test_prune_removes_only_expired_moves(spool: Spool) -> None:
    t = 1000.0
    spool.moves.register("FR", 1, "j", "1.1", ("a",), t + 10, now=t)
    spool.moves.register("FR", 2, "j", "1.2", ("a",), t + 100, now=t)
    spool.moves.register("FR", 0xFFFF, "j", "1.3", ("a",), t + 5, now=t)
    assert [m.message_id for m in spool.moves.active(now=t + 20)] == [2]
    assert spool.moves.prune(now=t + 20) == 2
    assert spool.moves.prune(now=t + 20) == 0
    assert [m.message_id for m in spool.moves.active(now=t)] == [2]


def test_message_ids_are_16_bit(spool: Spool) -> None:
    with pytest.raises(ValueError):
        spool.moves.register("FR", 0x10000, "j", "1.1", ("a",), 2e9)
    with pytest.raises(ValueError):
        spool.moves.register("FR", -1, "j", "1.1", ("a",), 2e9)
    # ids that differ only in their high byte are different keys
    assert move_key("FR", 0x0102) != move_key("FR", 0x0201)


def test_another_process_sees_a_registration(tmp_path: Path) -> None:
    """The runner (another process) registers, the listener looks up."""
    import subprocess
    import sys
    listener = Spool(tmp_path / "s", map_size=64 * 1024**2)
    try:
        assert listener.moves.lookup("FR", 3) is None
        code = ("import sys; from fastroute.spool import Spool; s = Spool(sys.argv[1], map_size=1 << 26); "
                "print(s.moves.register('FR', 3, 'j', '1.1', ('a',), 2e9))")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        assert out.strip() == "True"
        move = listener.moves.lookup("FR", 3)
        assert move is not None and move.destinations == ("a",)
    finally:
        listener.close()


# -- the listener: moved objects attributed by their originator ------------------------------------

CT = "1.2.840.10008.5.1.4.1.1.2"


class _Listening:
    def __init__(self, tmp_path: Path) -> None:
        port = peers.free_port()
        self.cfg = loads(yaml.safe_dump({
            "ae_title": "FASTROUTE", "host": "127.0.0.1", "port": port, "spool": str(tmp_path / "lsp"),
            "min_free_bytes": 0, "spool_max_bytes": "256MiB",
            "destinations": {"clinical": {"ae_title": "CLIN", "host": "127.0.0.1", "port": 1},
                             "newpacs": {"ae_title": "NEWPACS", "host": "127.0.0.1", "port": 2}},
            "default": ["clinical"]}))
        self.port = port
        self.spool = Spool(self.cfg.spool, map_size=self.cfg.spool_max_bytes, min_free_bytes=0)
        self.committer = Committer(self.spool, None)
        self.store = StoreService(RuleSet.from_config(self.cfg), self.committer)
        # a low staging threshold: the large-object path attributes too
        self.receiver = Listener(self.cfg, {CommandField.C_STORE_RQ: self.store},
                                 stager=self.committer.stager(256 * 1024))
        self.receiver.start()

    def close(self) -> None:
        self.receiver.stop(1.0)
        self.store.close()
        self.committer.close()
        self.spool.close()

    def records(self) -> dict[str, RoutingRecord]:
        out = {}
        for oid in range(1, int(self.spool.counters().get("seq", 0)) + 1):
            rec = self.spool.record(oid)
            if rec is not None:
                out[rec.sop_instance_uid] = rec
        return out


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[_Listening]:
    s = _Listening(tmp_path)
    yield s
    s.close()


def _send(port: int, datasets: Sequence[pydicom.Dataset], originator: tuple[str, int] | None) -> list[int]:
    """pynetdicom as the source archive answering a C-MOVE: C-STOREs with the originator."""
    ae = AE(ae_title="OLDPACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="FASTROUTE")
    assert assoc.is_established
    try:
        if originator is None:
            return [int(assoc.send_c_store(ds).Status) for ds in datasets]
        return [int(assoc.send_c_store(ds, originator_aet=originator[0], originator_id=originator[1]).Status)
                for ds in datasets]
    finally:
        assoc.release()


def test_moved_objects_go_to_the_move_destinations_with_their_job(tmp_path: Path,
                                                                  listening: _Listening) -> None:
    paths = synth.make_tiny(tmp_path / "study", 5)
    big = synth.make_study(tmp_path / "big", n_instances=1, rows=768, cols=768)   # > 1 MiB: staged
    ds = [pydicom.dcmread(p) for p in [*paths, *big]]
    study = str(ds[0].StudyInstanceUID)
    assert listening.spool.moves.register("FASTROUTE", 7, "mig1", study, ("newpacs",), 2e9)
    # three of the move's objects (and the large one) with its originator
    assert _send(listening.port, [ds[0], ds[1], ds[2], ds[5]], ("FASTROUTE", 7)) == [0, 0, 0, 0]
    # someone else's C-MOVE (not registered), and an ordinary C-STORE
    assert _send(listening.port, [ds[3]], ("WORKSTATION", 7)) == [0]
    assert _send(listening.port, [ds[4]], None) == [0]

    recs = listening.records()
    for d in (ds[0], ds[1], ds[2], ds[5]):
        rec = recs[str(d.SOPInstanceUID)]
        assert rec.routed_to == ["newpacs"] and rec.rules == []
        assert rec.extra["migration"] == "mig1"
        assert (rec.extra["move_originator_ae"], rec.extra["move_originator_id"]) == ("FASTROUTE", 7)
        assert rec.calling_ae == "OLDPACS" and rec.study_instance_uid == str(d.StudyInstanceUID)
    other = recs[str(ds[3].SOPInstanceUID)]
    assert other.routed_to == ["clinical"] and "migration" not in other.extra
    assert (other.extra["move_originator_ae"], other.extra["move_originator_id"]) == ("WORKSTATION", 7)
    plain = recs[str(ds[4].SOPInstanceUID)]
    assert plain.routed_to == ["clinical"]
    assert not {"migration", "move_originator_ae", "move_originator_id"} & set(plain.extra)
    # the moved ones wait in the bulk class, the others as clinical objects
    assert len(listening.spool.entries("newpacs", QueueState.BULK)) == 4
    assert [e.state for e in listening.spool.entries("clinical", QueueState.PENDING)] == [QueueState.PENDING] * 2
    # the large one took the staged path and kept its bytes
    big_oid = next(oid for oid in range(1, 7) if (r := listening.spool.record(oid)) is not None
                   and r.sop_instance_uid == str(ds[5].SOPInstanceUID))
    assert listening.spool.read(big_oid) == read_part10(big[0])[1]

    # unregistered (the runner saw the final response): late arrivals go by the rules
    assert listening.spool.moves.unregister("FASTROUTE", 7)
    more = synth.make_tiny(tmp_path / "late", 1)
    late = pydicom.dcmread(more[0])
    assert _send(listening.port, [late], ("FASTROUTE", 7)) == [0]
    rec = listening.records()[str(late.SOPInstanceUID)]
    assert rec.routed_to == ["clinical"] and "migration" not in rec.extra
    assert rec.extra["move_originator_id"] == 7


# -- C-GET: the runner's own association ---------------------------------------------------------

def _store_rq(sop_uid: str, data: bytes, msg_id: int = 1) -> Message:
    return Message(1, {COMMAND_FIELD: int(CommandField.C_STORE_RQ), MESSAGE_ID: msg_id,
                       AFFECTED_SOP_CLASS_UID: CT, AFFECTED_SOP_INSTANCE_UID: sop_uid},
                   bytearray(data))


def _answer(reply: Reply | Pending) -> Reply:
    if isinstance(reply, Pending):
        done = threading.Event()
        reply.future.add_done_callback(lambda _f: done.set())
        assert done.wait(30)
        return reply.finish(reply.future)
    return reply


def test_retrieve_store_service_routes_to_fixed_destinations(tmp_path: Path) -> None:
    """The handler a C-GET's C-STOREs get (as scu.Connection calls it: the Peer is us calling
    the source): checked and peeked as usual, routed to the job's destinations."""
    sp = Spool(tmp_path / "g", map_size=64 * 1024**2)
    committer = Committer(sp, None)
    service = StoreService.for_retrieve(committer, job="mig2", destinations=("newpacs", "backup"))
    try:
        paths = synth.make_tiny(tmp_path / "get", 3)
        peer = Peer("FASTROUTE", "OLDPACS", "127.0.0.1", {1: ExplicitVRLittleEndian})
        uids = []
        for p in paths:
            ts, data = read_part10(p)
            uid = str(pydicom.dcmread(p).SOPInstanceUID)
            uids.append(uid)
            assert _answer(service(peer, _store_rq(uid, data))).status == 0
        # a broken one is refused as on a listener, and nothing is spooled for it
        ts, data = read_part10(paths[0])
        assert _answer(service(peer, _store_rq("1.2.3.999", data[:40]))).status == 0xC000
        recs = [sp.record(oid) for oid in range(1, 4)]
        assert [r.sop_instance_uid for r in recs if r] == uids
        for r in recs:
            assert r is not None and r.routed_to == ["newpacs", "backup"] and r.rules == []
            assert r.extra["migration"] == "mig2" and "move_originator_id" not in r.extra
            assert (r.calling_ae, r.called_ae) == ("OLDPACS", "FASTROUTE")   # the source sent it
        assert len(sp.entries("newpacs", QueueState.BULK)) == 3
        assert len(sp.entries("backup", QueueState.BULK)) == 3
        assert sp.counters().get("seq", 0) == 3
    finally:
        service.close()
        committer.close()
        sp.close()


def test_an_ordinary_store_does_not_look_up_moves(tmp_path: Path) -> None:
    """No originator, no lookup: the hot path pays nothing for migrations."""
    sp = Spool(tmp_path / "h", map_size=64 * 1024**2)
    committer = Committer(sp, None)

    class Counting:
        calls = 0

        def lookup(self, *a: object) -> None:
            Counting.calls += 1

    service = StoreService(RuleSet([], ("pacs",)), committer, moves=Counting())  # type: ignore[arg-type]
    try:
        [path] = synth.make_tiny(tmp_path / "one", 1)
        ts, data = read_part10(path)
        uid = str(pydicom.dcmread(path).SOPInstanceUID)
        peer = Peer("CT1", "FASTROUTE", "127.0.0.1", {1: ts})
        assert _answer(service(peer, _store_rq(uid, data))).status == 0
        assert Counting.calls == 0
        msg = _store_rq(uid, data, 2)
        msg.command[0x1030], msg.command[0x1031] = "FASTROUTE", 9
        assert _answer(service(peer, msg)).status == 0
        assert Counting.calls == 1
    finally:
        service.close()
        committer.close()
        sp.close()


# -- end to end: the real router, DCMTK destinations -----------------------------------------------

def test_router_delivers_moved_objects_to_the_job_destinations(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    """`fastroute serve` with a clinical default route; the runner (here: the test process)
    registers a C-MOVE in the spool; the source's C-STOREs carry its originator: they reach the
    migration's destination only, ordinary C-STOREs the clinical one."""
    clinical, newpacs = storescp("CLIN"), storescp("NEWPACS")
    r = router({"destinations": {"clinical": destination(clinical.port, "CLIN"),
                                 "newpacs": destination(newpacs.port, "NEWPACS")},
                "default": ["clinical"]})
    moved = [pydicom.dcmread(p) for p in synth.make_tiny(tmp_path / "moved", 4)]
    ordinary = synth.make_tiny(tmp_path / "ordinary", 2)
    runner = Spool(r.spool_path, map_size=64 * 1024**3)
    try:
        assert runner.moves.register("FASTROUTE", 11, "mig1", str(moved[0].StudyInstanceUID), ("newpacs",),
                                     time.time() + 300)
        assert _send(r.port, moved, ("FASTROUTE", 11)) == [0] * 4
        res = peers.storescu(r.port, ordinary)
        assert res.returncode == 0, res.stdout + res.stderr
        newpacs.wait_for(4, timeout=60)
        clinical.wait_for(2, timeout=60)
        wait_until(lambda: all(q["pending"] + q["in_flight"] == 0 for q in r.queue().values()), 30,
                   message="queues did not drain")
        assert len(clinical.files()) == 2
        got = {str(pydicom.dcmread(f).SOPInstanceUID) for f in newpacs.files()}
        assert got == {str(d.SOPInstanceUID) for d in moved}
        recs = runner.lookup(study_instance_uid=str(moved[0].StudyInstanceUID))
        assert len(recs) == 4
        by_uid = {rec.sop_instance_uid: (oid, rec) for oid, rec in recs}
        for d in moved:
            oid, rec = by_uid[str(d.SOPInstanceUID)]
            assert rec.extra["migration"] == "mig1" and rec.extra["move_originator_id"] == 11
            assert set(rec.delivered) == {"newpacs"}
            # the sender recorded what it delivered: a later copy is compared with it
            assert rec.digest == content_digest(_encoded(d)).hex()
        ordinary_uid = str(pydicom.dcmread(ordinary[0], stop_before_pixels=True).SOPInstanceUID)
        [(_, plain)] = [(o, x) for o, x in runner.lookup(patient_id=plain_pid(ordinary[0]))
                        if x.sop_instance_uid == ordinary_uid]
        assert plain.digest == ""          # clinical traffic: no hash (duplicate_window is off)

        # the source sends one of them again, changed: delivered, and reported as a conflict
        changed = moved[0]
        changed.PatientName = "CHANGED^NAME"
        assert _send(r.port, [changed], ("FASTROUTE", 11)) == [0]
        newest = max(oid for oid, x in runner.lookup(study_instance_uid=str(changed.StudyInstanceUID))
                     if x.sop_instance_uid == str(changed.SOPInstanceUID))
        again = runner.record(newest)
        assert again is not None
        first_oid, first = by_uid[str(changed.SOPInstanceUID)]
        assert again.extra["content_conflict"] == {"with_oid": first_oid, "digest": content_digest(_encoded(changed)).hex(),
                                                 "other_digest": first.digest}
        wait_until(lambda: "different content" in r.log_text(), 10, message="the conflict was not logged")
        line = next(x for x in r.log_text().splitlines() if "different content" in x)
        assert "migration=mig1" in line and str(changed.SOPInstanceUID) in line and "WARNING" in line.upper()
    finally:
        runner.close()


def plain_pid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)


def _encoded(ds: pydicom.Dataset) -> bytes:
    """The dataset's bytes as pynetdicom sends them (Explicit VR Little Endian, no file meta)."""
    from pynetdicom.dsutils import encode
    data = encode(ds, False, True)
    assert data is not None
    return data


def test_clinical_objects_are_sent_before_a_migration_backlog(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    """Both go to one destination: 200 moved objects wait (destination paused), then 10 clinical
    ones arrive; once resumed, the destination receives the 10 clinical ones first."""
    pacs = storescp("PACS")
    r = router({"destinations": {"pacs": destination(pacs.port, "PACS")}, "default": ["pacs"]})
    moved = [pydicom.dcmread(p) for p in synth.make_tiny(tmp_path / "moved", 200)]
    clinical = synth.make_tiny(tmp_path / "clinical", 10)
    clinical_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in clinical}
    runner = Spool(r.spool_path, map_size=64 * 1024**3)
    try:
        runner.set_paused("pacs", True)
        runner.moves.register("FASTROUTE", 12, "mig1", str(moved[0].StudyInstanceUID), ("pacs",),
                              time.time() + 300)
        assert _send(r.port, moved, ("FASTROUTE", 12)) == [0] * 200
        res = peers.storescu(r.port, clinical)
        assert res.returncode == 0, res.stdout + res.stderr
        [st] = [s for s in runner.stats(["pacs"]) if s.destination == "pacs"]
        assert (st.pending, st.bulk_pending) == (210, 200)
        runner.set_paused("pacs", False)
        pacs.wait_for(210, timeout=120)
        # The order the PACS confirmed them in, from the senders' own delivery records (the
        # receiver's reception log is written by commands storescp runs asynchronously, which
        # a loaded machine reorders).
        moved_uids = {str(ds.SOPInstanceUID) for ds in moved}

        def confirmed() -> dict[str, float] | None:
            at = {}
            for oid in range(1, 1000):
                rec = runner.record(oid)
                if rec is not None and "pacs" in rec.delivered:
                    at[rec.sop_instance_uid] = rec.delivered["pacs"].at
            return at if len(at) == 210 else None
        at = wait_until(confirmed, 30, message="not every delivery was recorded")
        assert set(at) == clinical_uids | moved_uids
        assert max(at[u] for u in clinical_uids) <= min(at[u] for u in moved_uids), \
            "a migrated object was confirmed before a clinical one"
    finally:
        runner.close()


class _QrScp(peers._Peer):
    """DCMTK dcmqrscp as the source archive, knowing the router as a move destination."""

    name = "dcmqrscp"

    def __init__(self, workdir: Path, ae_title: str, targets: dict[str, tuple[str, int]]) -> None:
        super().__init__(workdir)
        self.ae_title = ae_title
        self.targets = targets            # name -> (AE title, port)
        self.port = peers.free_port()

    def _argv(self) -> list[str]:
        db = self.workdir / "db"
        db.mkdir(parents=True, exist_ok=True)
        hosts = "\n".join(f"{name} = ({ae}, {peers.HOST}, {port})" for name, (ae, port) in self.targets.items())
        cfg = self.workdir / "dcmqrscp.cfg"
        cfg.write_text(f"NetworkTCPPort = {self.port}\nMaxPDUSize = 65536\nMaxAssociations = 4\n\n"
                       f"HostTable BEGIN\n{hosts}\nHostTable END\n\nVendorTable BEGIN\nVendorTable END\n\n"
                       f"AETable BEGIN\n{self.ae_title} {db} RW (1000, 256mb) ANY\nAETable END\n")
        return [str(peers.dcmtk_tool("dcmqrscp")), "-c", str(cfg), str(self.port)]

    def _ready(self) -> bool:
        return peers.is_listening(self.port)

    def _reassign_ports(self) -> bool:
        self.port = peers.free_port()
        return True


def test_a_real_c_move_from_dcmqrscp_is_attributed(
        tmp_path: Path, dcmtk: Any, router: Callable[..., Router],
        storescp: Callable[..., peers.StoreSCP]) -> None:
    """DCMTK's dcmqrscp answers a C-MOVE (movescu calling as FASTROUTE, Message ID 1) by sending
    the study to the router: its C-STOREs carry the originator, so the study reaches the job's
    destination, not the router's clinical default route."""
    import subprocess
    clinical, newpacs = storescp("CLIN"), storescp("NEWPACS")
    r = router({"destinations": {"clinical": destination(clinical.port, "CLIN"),
                                 "newpacs": destination(newpacs.port, "NEWPACS")},
                "default": ["clinical"]})
    files = synth.make_tiny(tmp_path / "archive", 3)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with _QrScp(tmp_path / "qr", "OLDPACS", {"fastroute": ("FASTROUTE", r.port)}) as archive:
        res = peers.storescu(archive.port, files, called_ae="OLDPACS")
        assert res.returncode == 0, res.stdout + res.stderr
        runner = Spool(r.spool_path, map_size=64 * 1024**3)
        try:
            assert runner.moves.register("FASTROUTE", 1, "mig1", study, ("newpacs",), time.time() + 300)
            move = subprocess.run(
                [str(peers.dcmtk_tool("movescu")), "-aet", "FASTROUTE", "-aec", "OLDPACS", "-aem", "FASTROUTE",
                 "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                 peers.HOST, str(archive.port)],
                capture_output=True, text=True, timeout=60, env=peers.dcmtk_env(), check=False)
            assert move.returncode == 0, move.stdout + move.stderr
            newpacs.wait_for(3, timeout=60)
            recs = runner.lookup(study_instance_uid=study)
            assert len(recs) == 3
            for _, rec in recs:
                assert rec.extra["migration"] == "mig1", rec.extra
                assert (rec.extra["move_originator_ae"], rec.extra["move_originator_id"]) == ("FASTROUTE", 1)
                assert rec.calling_ae == "OLDPACS" and rec.routed_to == ["newpacs"]
            assert clinical.files() == []
        finally:
            runner.close()


def test_reserve_takes_the_next_free_id(spool: Spool) -> None:
    t = 1000.0
    assert spool.moves.reserve("FR", "j", "1.1", ("a",), t + 10, start=5, now=t) == 5
    assert spool.moves.reserve("FR", "j", "1.2", ("a",), t + 10, start=5, now=t) == 6
    assert spool.moves.reserve("FR", "j", "1.3", ("a",), t + 10, start=0xFFFF, now=t) == 0xFFFF
    assert spool.moves.reserve("FR", "j", "1.4", ("a",), t + 10, start=0xFFFF, now=t) == 1   # wraps, skips 0
    move = spool.moves.lookup("FR", 6, now=t)
    assert move is not None and move.study_uid == "1.2"
    with pytest.raises(ValueError):
        spool.moves.register("FR", 9, "j", "1.1", (), t + 10, now=t)   # nowhere to send
