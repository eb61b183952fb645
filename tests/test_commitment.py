"""Storage commitment as SCU (issue 14 section 2): a destination commits what it was delivered.

Against Orthanc (a storage-commitment SCP that reports on a new association to the modality
it knows, here fastroute's listener) and a small pynetdicom peer for what real peers do not
produce on demand: a report on the same association, and a partial failure.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom import build_role

import peers
import synth
from fastroute.config import Config, loads
from fastroute.dicom import commitment as sc
from fastroute.errors import SpoolError
from fastroute.ops import actions as ops
from fastroute.ops.alerts import Reading, evaluate
from fastroute.ops.metrics import make_registry, render
from fastroute.routing.schedule import DestinationSender
from fastroute.spool import Spool
from fastroute.spool.commitments import CommitState
from fastroute.spool.counters import CounterKind
from peers import free_port, storescu, wait_until
from conftest import unavailable
from router import Router, destination
from fastroute.cli import read_part10
from fastroute.spool import Incoming


class CommitPeer:
    """A pynetdicom Storage SCP and Storage Commitment SCP that reports on the same
    association; the instances in ``fail_once`` fail (0x0110) the first time they are asked."""

    def __init__(self, ae_title: str = "PACS", fail_once: set[str] | None = None, *,
                 silent: bool = False, report_to: tuple[str, int, str] | None = None) -> None:
        self.port = free_port()
        self.silent = silent            # accepts the request, never reports
        # (host, port, AE title): report on a new association there, asking the SCP role
        # with a role selection item and refusing to send unless the AC granted it
        self.report_to = report_to
        self.report_ae = ae_title       # the calling AE of a report on a new association
        self.report_status: list[Any] = []
        self.stored: list[str] = []
        self.requests: list[str] = []
        self.fail_once = set(fail_once or ())
        self.lock = threading.Lock()
        ae = AE(ae_title)
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(sc.STORAGE_COMMITMENT_SOP_CLASS)
        self.ae = ae
        self.server: Any = None

    def _store(self, event: Any) -> int:
        with self.lock:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    def _action(self, event: Any) -> tuple[int, None]:
        ds = event.action_information
        uid = str(ds.TransactionUID)
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in ds.ReferencedSOPSequence]
        with self.lock:
            self.requests.append(uid)
            failed = [r for r in refs if r[1] in self.fail_once]
            self.fail_once -= {r[1] for r in failed}
        ok = [r for r in refs if r not in failed]
        assoc = event.assoc
        if self.silent:
            return 0, None

        def report() -> None:
            time.sleep(0.05)   # after the N-ACTION-RSP: a report is a request of its own
            out = Dataset()
            out.TransactionUID = uid
            if ok:
                out.ReferencedSOPSequence = [_item(c, s) for c, s in ok]
            if failed:
                items = [_item(c, s) for c, s in failed]
                for item in items:
                    item.FailureReason = 0x0110
                out.FailedSOPSequence = items
            assoc.send_n_event_report(out, 2 if failed else 1, sc.STORAGE_COMMITMENT_SOP_CLASS,
                                      sc.STORAGE_COMMITMENT_INSTANCE)

        def report_new() -> None:
            assert self.report_to is not None
            host, port, called = self.report_to
            out = Dataset()
            out.TransactionUID = uid
            out.ReferencedSOPSequence = [_item(c, s) for c, s in ok]
            ae = AE(self.report_ae)
            ae.add_requested_context(sc.STORAGE_COMMITMENT_SOP_CLASS)
            role = build_role(sc.STORAGE_COMMITMENT_SOP_CLASS, scu_role=False, scp_role=True)
            other = ae.associate(host, port, ae_title=called, ext_neg=[role])
            try:
                cx = other.accepted_contexts[0] if other.accepted_contexts else None
                if cx is None or not cx.as_scp:
                    self.report_status.append("role not granted")
                    return
                rsp = other.send_n_event_report(out, 1, sc.STORAGE_COMMITMENT_SOP_CLASS,
                                                sc.STORAGE_COMMITMENT_INSTANCE)
                self.report_status.append(rsp[0].Status if rsp[0] else None)
            finally:
                other.release()

        threading.Thread(target=report if self.report_to is None else report_new, daemon=True).start()
        return 0, None

    def __enter__(self) -> CommitPeer:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def queue_files(spool: Spool, files: list[Path]) -> list[int]:
    """Queue files for "pacs" as the listener would (with their Study Instance UID); their oids."""
    items = []
    for f in files:
        ts, data = read_part10(f)
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        items.append(Incoming(data, ts, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ("pacs",),
                              {"calling_ae": "CT1", "study_instance_uid": str(ds.StudyInstanceUID)}))
    results = spool.put_many(items)
    oids = [r.oid for r in results if not isinstance(r, BaseException)]
    assert len(oids) == len(items)
    return oids


def _item(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def config(tmp_path: Path, port: int, **dest: Any) -> Config:
    doc = {"spool": str(tmp_path / "spool"), "spool_max_bytes": "256MiB",
           "destinations": {"pacs": destination(port, "PACS", **dest)}, "default": ["pacs"]}
    return loads(yaml.safe_dump(doc))


@contextlib.contextmanager
def running_sender(cfg: Config) -> Iterator[Spool]:
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, durable=False)
    sender = DestinationSender(cfg, cfg.destinations["pacs"], spool)
    thread = threading.Thread(target=sender.run, daemon=True)
    thread.start()
    try:
        yield spool
    finally:
        sender.stop()
        thread.join(30)
        spool.close()


def _states(spool: Spool, oids: list[int]) -> list[CommitState | None]:
    out = []
    for oid in oids:
        st = spool.commitments.states(oid).get("pacs")
        out.append(st.state if st else None)
    return out


def _has_bytes(spool: Spool, oid: int) -> bool:
    try:
        spool.read(oid)
        return True
    except SpoolError:
        return False


def test_same_association_partial_failure_resent_and_committed(tmp_path: Path) -> None:
    files = synth.make_study(tmp_path / "s", modality="CT", n_instances=3, rows=32, cols=32)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with CommitPeer(fail_once={uids[1]}) as peer:
        cfg = config(tmp_path, peer.port, commitment="same-association", commitment_timeout=30)
        seed = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
        oids = queue_files(seed, files)
        seed.close()
        assert len(oids) == 3
        with running_sender(cfg) as spool:
            wait_until(lambda: _states(spool, oids) == [CommitState.COMMITTED] * 3, 30,
                       message=lambda: f"not all committed: {_states(spool, oids)}")
            # the failed instance was sent again and asked for again, in a second transaction
            assert sorted(peer.stored) == sorted(uids + [uids[1]])
            assert len(peer.requests) == 2
            counters = spool.counters()
            assert counters.of(CounterKind.COMMITTED, "pacs") == 3
            assert counters.of(CounterKind.COMMIT_FAILED, "pacs") == 1
            # committed and delivered everywhere: the held bytes are gone now
            assert not any(_has_bytes(spool, oid) for oid in oids)
            actions = [e["action"] for e in spool.audit_events(study_instance_uid=study)]
            assert actions.count("committed") == 3 and actions.count("commit-failed") == 1
            reports = [e for e in spool.audit_events(study_instance_uid=study) if e["action"] == "commitment-report"]
            assert [r["failed"] for r in reports if r["failed"]] == [[{"sop_instance_uid": uids[1], "reason": 0x0110}]]
            assert sum(r["committed"] for r in reports) == 3 and {r["reporter"] for r in reports} == {"PACS"}
            assert not spool.commitments.transactions("pacs")
            # views: the study trace, its rollup, the queue view and /metrics show committed
            # apart from delivered
            found = ops.lookup(cfg, spool, study_instance_uid=study)
            steps = [step for o in found["objects"] for step in o["path"]]
            assert [st["state"] for st in steps] == ["delivered"] * 3
            assert [st["commitment"]["state"] for st in steps] == ["committed"] * 3
            (rollup,) = ops.study_rollup(found["objects"])
            assert rollup["destinations"][0]["delivered"] == 3 and rollup["destinations"][0]["committed"] == 3
            (q,) = [q for q in ops.destination_status(cfg, spool) if q["destination"] == "pacs"]
            assert (q["delivered"], q["committed"], q["commit_failed"], q["commit_waiting"]) == (4, 3, 1, 0)
            text = render(make_registry(cfg, spool)).decode()
            assert 'fastroute_committed_total{destination="pacs"} 3.0' in text
            assert 'fastroute_commit_failed_total{destination="pacs"} 1.0' in text
            assert 'fastroute_commit_waiting_objects{destination="pacs"} 0.0' in text


def test_bytes_held_until_committed(tmp_path: Path) -> None:
    """A destination that never reports: delivered, requested, asked again, alerted; the
    bytes stay in the spool (a re-send may need them)."""
    files = synth.make_study(tmp_path / "s", modality="CT", n_instances=2, rows=32, cols=32)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with CommitPeer(silent=True) as peer:
        cfg = config(tmp_path, peer.port, commitment="same-association", commitment_timeout=1)
        seed = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
        oids = queue_files(seed, files)
        seed.close()
        with running_sender(cfg) as spool:
            wait_until(lambda: any(t.alerted for t in spool.commitments.transactions("pacs")), 30,
                       message=lambda: f"no alert: {spool.commitments.transactions('pacs')}")
            (tx,) = spool.commitments.transactions("pacs")
            assert tx.attempts == 2 and peer.requests == [tx.uid, tx.uid]
            assert _states(spool, oids) == [CommitState.REQUESTED] * 2
            assert all(_has_bytes(spool, oid) for oid in oids)
            assert spool.counters().of(CounterKind.COMMIT_REQUESTS, "pacs") == 2
            (q,) = [q for q in ops.destination_status(cfg, spool) if q["destination"] == "pacs"]
            assert (q["commit_waiting"], q["commit_overdue"]) == (2, 2)
            checks = evaluate(cfg.alerts, [Reading("pacs", None, 0, q["commit_overdue"])], None)
            alert = checks[("commit_overdue", "pacs")]
            assert alert is not None and alert.value == 2
        # switched off: nothing waits for a report any more, the bytes go
        off = config(tmp_path, peer.port, commitment="off")
        spool = Spool(off.spool, map_size=off.spool_max_bytes)
        try:
            DestinationSender(off, off.destinations["pacs"], spool)
            assert not any(_has_bytes(spool, oid) for oid in oids)
            assert not spool.commitments.transactions("pacs")
        finally:
            spool.close()


def test_orthanc_reports_on_a_new_association(tmp_path: Path, router: Callable[..., Router],
                                              peer_check: peers.PeerCheck) -> None:
    """Orthanc commits what fastroute delivered and reports on a new association to the
    listener (as SCP of the Storage Commitment class, role negotiated)."""
    if peer_check.orthanc_missing:
        unavailable(peer_check.orthanc_missing)
    files = synth.make_study(tmp_path / "s", modality="MR", n_instances=3, rows=32, cols=32)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    pacs = peers.Orthanc("ORTHANC", workdir=tmp_path / "orthanc")
    r = router({"destinations": {"pacs": destination(pacs.dicom_port, "ORTHANC", commitment="new-association",
                                                     commitment_timeout=60)},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]}, start=False)
    pacs.config["DicomModalities"] = {"fastroute": ["FASTROUTE", "127.0.0.1", r.port]}
    with pacs:
        r.start()
        assert storescu(r.port, files).returncode == 0
        spool = Spool(r.spool_path)
        try:
            def states() -> list[Any]:
                return [st.state for oid, _ in spool.lookup(study_instance_uid=study)
                        for st in spool.commitments.states(oid).values()]
            wait_until(lambda: states() == [CommitState.COMMITTED] * 3, 60,
                       message=lambda: f"not committed: {states()}\n{r.log_tail()}")
            assert spool.counters().of(CounterKind.COMMITTED, "pacs") == 3
        finally:
            spool.close()
        q = r.queue()["pacs"]
        assert (q["delivered"], q["committed"], q["commit_waiting"]) == (3, 3, 0)
        assert "storage commitment: 3 committed, 0 failed (re-sent), 0 waiting" in r.cli("queue").stdout


def test_report_on_a_new_association_with_strict_role_checks(tmp_path: Path, router: Callable[..., Router]) -> None:
    """The destination reports on a new association to the listener, proposing the SCP role
    for the Storage Commitment class and sending only when the A-ASSOCIATE-AC grants it."""
    files = synth.make_study(tmp_path / "s", modality="CT", n_instances=2, rows=32, cols=32)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    peer = CommitPeer()
    r = router({"destinations": {"pacs": destination(peer.port, "PACS", commitment="new-association",
                                                     commitment_timeout=60)},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]}, start=False)
    peer.report_to = ("127.0.0.1", r.port, "FASTROUTE")
    with peer:
        r.start()
        assert storescu(r.port, files).returncode == 0
        wait_until(lambda: peer.report_status, 30, message=lambda: f"no report sent\n{r.log_tail()}")
        assert peer.report_status == [0x0000]
        spool = Spool(r.spool_path)
        try:
            def states() -> list[Any]:
                return [st.state for oid, _ in spool.lookup(study_instance_uid=study)
                        for st in spool.commitments.states(oid).values()]
            wait_until(lambda: states() == [CommitState.COMMITTED] * 2, 30,
                       message=lambda: f"not committed: {states()}\n{r.log_tail()}")
        finally:
            spool.close()


def test_a_report_from_another_ae_than_the_destination_is_refused(tmp_path: Path, router: Any) -> None:
    """A report marks instances committed, which lets the spool drop their bytes: one from an
    AE the transaction was not asked of is refused (0x0110), logged and audited, and changes
    nothing."""
    files = synth.make_study(tmp_path / "s", modality="CT", n_instances=2, rows=32, cols=32)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    peer = CommitPeer()
    peer.report_ae = "ROGUE"
    r = router({"destinations": {"pacs": destination(peer.port, "PACS", commitment="new-association",
                                                     commitment_timeout=60)},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]}, start=False)
    peer.report_to = ("127.0.0.1", r.port, "FASTROUTE")
    with peer:
        r.start()
        assert storescu(r.port, files).returncode == 0
        wait_until(lambda: peer.report_status, 30, message=lambda: f"no report sent\n{r.log_tail()}")
        assert peer.report_status == [0x0110]
        wait_until(lambda: "refused: it was asked of PACS" in r.log_text(), 10, message=r.log_tail)
        spool = Spool(r.spool_path)
        try:
            states = [st.state for oid, _ in spool.lookup(study_instance_uid=study)
                      for st in spool.commitments.states(oid).values()]
            assert CommitState.COMMITTED not in states and len(states) == 2
            refused = [e for e in spool.audit_events() if e["action"] == "commitment_report_refused"]
            assert [(e["who"], e["expected_ae"], e["destination"]) for e in refused] == [("ROGUE", "PACS", "pacs")]
        finally:
            spool.close()


def test_codecs_round_trip_and_n_action_response_names_its_class() -> None:
    refs = (sc.Ref("1.2.840.10008.5.1.4.1.1.2", "1.2.3.1"), sc.Ref("1.2.840.10008.5.1.4.1.1.4", "1.2.3.2"))
    for ts in sc.SYNTAXES:
        action = sc.decode_action(sc.encode_action(sc.ActionRequest("1.2.9", refs), ts), ts)
        assert action == sc.ActionRequest("1.2.9", refs)
        report = sc.EventReport("1.2.9", refs[:1], (sc.Failed(refs[1].sop_class_uid, refs[1].sop_instance_uid,
                                                               sc.NO_SUCH_OBJECT_INSTANCE),), "FASTROUTE")
        assert sc.decode_event(sc.encode_event(report, ts), ts) == report
        assert report.event_type == sc.EVENT_FAILURES
    with pytest.raises(ValueError, match="Transaction UID"):
        sc.decode_action(sc.encode_action(sc.ActionRequest("", refs)), sc.SYNTAXES[0])
    # an N-ACTION-RSP carries the Affected SOP Class/Instance UIDs the request named as
    # Requested (PS3.7 10.3.4.2): (0000,0003) was read as (0000,1003) before
    from fastroute.dicom import pdu
    from fastroute.dicom.dimse import encode_response
    rq = pdu.decode_command(memoryview(sc.encode_n_action_rq(7)))
    rsp = pdu.decode_command(memoryview(encode_response(rq, 0)))
    assert rsp[pdu.AFFECTED_SOP_CLASS_UID] == sc.STORAGE_COMMITMENT_SOP_CLASS
    assert rsp[pdu.AFFECTED_SOP_INSTANCE_UID] == sc.STORAGE_COMMITMENT_INSTANCE
    assert rsp[pdu.MESSAGE_ID_BEING_RESPONDED_TO] == 7


# -- storage commitment as SCP, for modalities -----------------------------------------------------

class Modality:
    """A pynetdicom modality: C-STOREs to the router, asks it to commit (N-ACTION), collects
    the N-EVENT-REPORTs it gets, on its own association or (``listen``) on a new one."""

    def __init__(self, ae_title: str = "CT1", *, listen: bool = False) -> None:
        self.ae_title = ae_title
        self.reports: list[tuple[str, int, Dataset]] = []     # (how, event type, dataset)
        self.port = free_port()
        self.server: Any = None
        self.listen = listen

    def _on_report(self, how: str) -> Callable[[Any], tuple[int, None]]:
        def handle(event: Any) -> tuple[int, None]:
            self.reports.append((how, int(event.event_type), event.event_information))
            return 0, None
        return handle

    def __enter__(self) -> Modality:
        if self.listen:
            ae = AE(self.ae_title)
            # accepts fastroute as SCP of the class (the role selection it proposes)
            ae.add_supported_context(sc.STORAGE_COMMITMENT_SOP_CLASS, scu_role=True, scp_role=True)
            self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
                (evt.EVT_N_EVENT_REPORT, self._on_report("new"))])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.shutdown()

    def associate(self, port: int) -> Any:
        ae = AE(self.ae_title)
        ae.requested_contexts = StoragePresentationContexts[:120]
        ae.add_requested_context(sc.STORAGE_COMMITMENT_SOP_CLASS)
        assoc = ae.associate("127.0.0.1", port, ae_title="FASTROUTE",
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report("same"))])
        assert assoc.is_established
        return assoc

    @staticmethod
    def store_and_request(assoc: Any, files: list[Path], extra_uids: tuple[str, ...] = ()) -> str:
        refs = []
        for f in files:
            ds = pydicom.dcmread(f)
            assert assoc.send_c_store(ds).Status == 0
            refs.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        refs += [(refs[0][0], uid) for uid in extra_uids]
        request = Dataset()
        request.TransactionUID = sc.new_transaction_uid()
        request.ReferencedSOPSequence = [_item(c, s) for c, s in refs]
        status, _ = assoc.send_n_action(request, 1, sc.STORAGE_COMMITMENT_SOP_CLASS, sc.STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0
        return str(request.TransactionUID)


def _uids(ds: Dataset, keyword: str) -> dict[str, int | None]:
    return {str(i.ReferencedSOPInstanceUID): (int(i.FailureReason) if "FailureReason" in i else None)
            for i in getattr(ds, keyword, [])}


def test_modality_report_on_its_association_unknown_instance_fails_0112(
        tmp_path: Path, router: Callable[..., Router]) -> None:
    files = synth.make_tiny(tmp_path / "s", n=2)
    r = router({"storage_commitment": {"commit_when": "spooled"}})
    with Modality() as ct:
        assoc = ct.associate(r.port)
        try:
            uid = ct.store_and_request(assoc, files, extra_uids=("1.2.3.4.5.6.7.8.9",))
            wait_until(lambda: ct.reports, 20, message=lambda: f"no report\n{r.log_tail()}")
        finally:
            assoc.release()
    ((how, event_type, ds),) = ct.reports
    assert how == "same" and event_type == 2 and str(ds.TransactionUID) == uid
    stored = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert set(_uids(ds, "ReferencedSOPSequence")) == stored
    assert _uids(ds, "FailedSOPSequence") == {"1.2.3.4.5.6.7.8.9": 0x0112}


def test_modality_released_early_report_on_new_association_when_delivered(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    """commit_when: delivered -- the report waits for the destination's confirmation and,
    the modality having released, goes to its peers: address on a new association."""
    files = synth.make_tiny(tmp_path / "s", n=3)
    port = free_port()
    with Modality(listen=True) as ct:
        r = router({"storage_commitment": {"commit_when": "delivered", "timeout": "60s"},
                    "peers": {"CT1": {"host": "127.0.0.1", "port": ct.port}},
                    "destinations": {"pacs": destination(port, "PACS", backoff_initial=0.2, backoff_max=0.5)},
                    "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
        assoc = ct.associate(r.port)
        uid = ct.store_and_request(assoc, files)
        assoc.release()                                   # an SCU that does not wait
        assert not ct.reports
        scp = storescp("PACS", port=port)                 # the destination comes up
        scp.wait_for(3, timeout=60)
        wait_until(lambda: ct.reports, 30, message=lambda: f"no report\n{r.log_tail()}")
    ((how, event_type, ds),) = ct.reports
    assert how == "new" and event_type == 1 and str(ds.TransactionUID) == uid
    assert len(_uids(ds, "ReferencedSOPSequence")) == 3 and not _uids(ds, "FailedSOPSequence")


def test_modality_without_peers_entry_gets_report_on_its_next_association(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    """Ready only after the modality released (its destination was down), with no peers:
    entry: the report waits for the modality's next association and goes on it."""
    files = synth.make_tiny(tmp_path / "s", n=1)
    port = free_port()
    r = router({"storage_commitment": {"commit_when": "delivered"},
                "destinations": {"pacs": destination(port, "PACS", backoff_initial=0.2, backoff_max=0.5)},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    with Modality() as ct:
        first = ct.associate(r.port)
        uid = ct.store_and_request(first, files)
        first.release()
        storescp("PACS", port=port).wait_for(1, timeout=60)
        wait_until(lambda: "waits for its next association" in r.log_text(), 20,
                   message=lambda: f"not waiting\n{r.log_tail()}")
        assert not ct.reports
        second = ct.associate(r.port)
        try:
            wait_until(lambda: ct.reports, 20, message=lambda: f"no report\n{r.log_tail()}")
        finally:
            second.release()
    ((how, event_type, ds),) = ct.reports
    assert how == "same" and event_type == 1 and str(ds.TransactionUID) == uid


def test_modality_commit_when_committed_waits_for_the_destinations_report(
        tmp_path: Path, router: Callable[..., Router]) -> None:
    """End to end: the modality's report says committed only after the destination's own
    storage commitment report committed every instance (one failed once, re-sent first)."""
    files = synth.make_tiny(tmp_path / "s", n=2)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    with CommitPeer(fail_once={uids[0]}) as pacs, Modality() as ct:
        r = router({"storage_commitment": {"commit_when": "committed", "timeout": "60s"},
                    "destinations": {"pacs": destination(pacs.port, "PACS", commitment="same-association",
                                                         commitment_timeout=30)},
                    "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
        assoc = ct.associate(r.port)
        try:
            uid = ct.store_and_request(assoc, files)
            wait_until(lambda: ct.reports, 30, message=lambda: f"no report\n{r.log_tail()}")
        finally:
            assoc.release()
        # the failed one was re-sent and asked for again before the modality heard "committed"
        # (how many requests the first deliveries took depends on how they were batched)
        assert len(pacs.requests) >= 2 and sorted(pacs.stored) == sorted(uids + [uids[0]])
    ((how, event_type, ds),) = ct.reports
    assert how == "same" and event_type == 1 and str(ds.TransactionUID) == uid
    assert set(_uids(ds, "ReferencedSOPSequence")) == set(uids)


def test_check_warns_about_commitment_settings_that_cannot_work_as_written(tmp_path: Path) -> None:
    from fastroute.routing.commitment import commitment_warnings

    def warnings(**doc: Any) -> list[str]:
        return commitment_warnings(loads(yaml.safe_dump({"spool": str(tmp_path / "spool"), **doc})))

    assert warnings() == []
    (w,) = warnings(storage_commitment={"commit_when": "committed"})
    assert "no destination has commitment on" in w
    (w,) = warnings(destinations={"pacs": destination(104, "PACS", commitment="new-association")})
    assert "PACS must know AE FASTROUTE" in w and "port 11112" in w
    (w,) = warnings(destinations={"pacs": destination(104, "PACS", commitment="same-association",
                                                      commitment_timeout="10s")})
    assert "commitment_timeout 10s is short" in w
