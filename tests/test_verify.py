"""verify: find (issue 14 section 3): a study is done at a destination when its C-FIND lists it.

Against Orthanc (query-able; an instance deleted through its REST API after delivery is
re-sent by the verification) and the pynetdicom FakeArchive, given a Storage SCP here, for
what real peers do not do on demand: refusing IMAGE-level C-FIND (verified by count) and
losing an instance every time it is sent (verify-failed, alerted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Self

import pydicom
import pytest
import yaml
from pynetdicom import evt

import peers
import synth
from conftest import unavailable
from fastroute.config import Config, loads
from fastroute.errors import SpoolError
from fastroute.ops import actions as ops
from fastroute.ops.alerts import Reading, evaluate
from fastroute.ops.metrics import make_registry, render
from fastroute.routing.schedule import DestinationSender
from fastroute.routing.verify import settled, verify_warnings
from fastroute.spool import OutcomeKind, Spool
from fastroute.spool.queues import Outcome
from fastroute.spool.counters import CounterKind
from fastroute.spool.verifications import StudyVerification, VerifyState
from peers import storescu, wait_until
from qrpeers import FakeArchive
from router import Router, destination
from test_commitment import queue_files, running_sender


@dataclass
class StoringArchive(FakeArchive):
    """FakeArchive that also takes C-STOREs (and then answers C-FIND for them); the SOP
    Instance UIDs in ``lose`` are answered with Success and never indexed."""

    lose: set[str] = field(default_factory=set)
    stored: list[str] = field(default_factory=list)

    def start(self) -> Self:
        super().start()
        self._server.bind(evt.EVT_C_STORE, self._on_store)
        return self

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.stored.append(uid)
        if uid not in self.lose:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.datasets[uid] = ds
        return 0


def config(tmp_path: Path, port: int, **dest: Any) -> Config:
    doc = {"spool": str(tmp_path / "spool"), "spool_max_bytes": "256MiB",
           "destinations": {"pacs": destination(port, "FAKEPACS", **{"verify": "find", "verify_quiet": 0.5, **dest})},
           "default": ["pacs"]}
    return loads(yaml.safe_dump(doc))




def _study(tmp_path: Path, n: int) -> tuple[list[Path], list[str], str]:
    files = synth.make_study(tmp_path / "s", modality="CT", n_instances=n, rows=32, cols=32)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return files, [str(h.SOPInstanceUID) for h in headers], str(headers[0].StudyInstanceUID)


def _seed(cfg: Config, files: list[Path]) -> list[int]:
    # the sender first, so that verification is switched on before anything is delivered
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        spool.verifications.set_enabled("pacs", True)
        return queue_files(spool, files)
    finally:
        spool.close()


def _has_bytes(spool: Spool, oid: int) -> bool:
    try:
        spool.read(oid)
        return True
    except SpoolError:
        return False


def _state(spool: Spool, study: str) -> StudyVerification | None:
    return spool.verifications.study("pacs", study)


def test_refused_image_level_verified_by_count(tmp_path: Path) -> None:
    files, uids, study = _study(tmp_path, 3)
    with StoringArchive(image_level=False) as pacs:
        cfg = config(tmp_path, pacs.port)
        oids = _seed(cfg, files)
        with running_sender(cfg) as spool:
            wait_until(lambda: (s := _state(spool, study)) is not None and s.state == VerifyState.VERIFIED, 30,
                       message=lambda: f"not verified: {_state(spool, study)}")
            sv = _state(spool, study)
            assert sv is not None and sv.by_count and sv.verified_total == 3 and sv.attempts == 0
            # IMAGE level refused (0xA900), then the study's count
            finds = [(str(r.identifier.QueryRetrieveLevel), r.status) for r in pacs.requests if r.command == "C-FIND"]
            assert finds[0] == ("IMAGE", 0xA900) and finds[1][0] == "STUDY"
            assert sorted(pacs.stored) == sorted(uids)        # nothing re-sent
            assert [spool.verifications.states(o)["pacs"] for o in oids] == [VerifyState.VERIFIED] * 3
            assert not any(_has_bytes(spool, o) for o in oids)    # verified: the hold ended
            assert spool.counters().of(CounterKind.VERIFIED, "pacs") == 3


def test_lost_instance_resent_then_verify_failed_and_alerted(tmp_path: Path) -> None:
    files, uids, study = _study(tmp_path, 3)
    with StoringArchive(lose={uids[1]}) as pacs:
        cfg = config(tmp_path, pacs.port, verify_attempts=2)
        oids = _seed(cfg, files)
        with running_sender(cfg) as spool:
            wait_until(lambda: (s := _state(spool, study)) is not None and s.state == VerifyState.VERIFY_FAILED,
                       30, message=lambda: f"not verify-failed: {_state(spool, study)}")
            sv = _state(spool, study)
            assert sv is not None and sv.missing == [uids[1]] and sv.attempts == 2 and not sv.by_count
            # sent once and re-sent twice; the others once
            assert sorted(pacs.stored) == sorted(uids + [uids[1]] * 2)
            states = {o: spool.verifications.states(o)["pacs"] for o in oids}
            assert states == {oids[0]: VerifyState.VERIFIED, oids[1]: VerifyState.VERIFY_FAILED,
                              oids[2]: VerifyState.VERIFIED}
            assert not any(_has_bytes(spool, o) for o in oids)    # no hold is kept for ever
            events = list(spool.audit_events(study_instance_uid=study))
            resent = [e for e in events if e["action"] == "verify-resent"]
            assert [e["missing"] for e in resent] == [[uids[1]], [uids[1]]]
            (failed,) = [e for e in events if e["action"] == "verify-failed"]
            assert failed["missing"] == [uids[1]] and failed["destination"] == "pacs"
            # views: trace, rollup, queue, /metrics, alert
            found = ops.lookup(cfg, spool, study_instance_uid=study)
            assert sorted(step["verification"] for o in found["objects"] for step in o["path"]) == \
                ["verified", "verified", "verify-failed"]
            (rollup,) = ops.study_rollup(found["objects"])
            (d,) = rollup["destinations"]
            assert (d["routed"], d["delivered"], d["verified"], d["verify_failed"]) == (3, 3, 2, 1)
            (q,) = [q for q in ops.destination_status(cfg, spool) if q["destination"] == "pacs"]
            assert (q["verified"], q["verify_failed"], q["verify_failed_now"], q["verify_waiting"]) == (2, 1, 1, 0)
            text = render(make_registry(cfg, spool)).decode()
            assert 'fastroute_verify_failed_studies_total{destination="pacs"} 1.0' in text
            assert 'fastroute_verified_total{destination="pacs"} 2.0' in text
            checks = evaluate(cfg.alerts, [Reading("pacs", None, 0, 0, q["verify_failed_now"])], None)
            alert = checks[("verify_failed", "pacs")]
            assert alert is not None and alert.value == 1


def test_a_study_settles_only_when_quiet_and_drained(tmp_path: Path) -> None:
    """The documented rule: pending keeps a study unsettled, a failed entry does not; a
    receipt or delivery within verify_quiet does."""
    files, _uids, study = _study(tmp_path, 2)
    cfg = config(tmp_path, 1, verify_quiet=10)
    oids = _seed(cfg, files)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        received = max(rec.received_at for _, rec in spool.lookup(study_instance_uid=study))
        sv = StudyVerification("pacs", study, last_delivered=received)
        assert settled(spool, "pacs", sv, 10, received + 5) == (False, "delivered within the quiet period")
        ok, why = settled(spool, "pacs", sv, 10, received + 11)
        assert not ok and "pending" in why
        claimed, _ = spool.claim("pacs", 10)
        assert sorted(c.oid for c in claimed) == sorted(oids)
        ok, why = settled(spool, "pacs", sv, 10, received + 11)
        assert not ok and "in_flight" in why
        # both out of attempts: failed entries do not keep the study from settling
        spool.settle("pacs", [Outcome(o, OutcomeKind.FAILED, 0xA700, "test") for o in oids])
        assert settled(spool, "pacs", sv, 10, received + 11) == (True, "")
        sv2 = StudyVerification("pacs", study, last_delivered=received - 100)
        assert settled(spool, "pacs", sv2, 10, received + 5) == (False, "received within the quiet period")
    finally:
        spool.close()


def test_orthanc_instance_deleted_after_delivery_is_resent_and_verified(
        tmp_path: Path, router: Callable[..., Router], peer_check: peers.PeerCheck) -> None:
    if peer_check.orthanc_missing:
        unavailable(peer_check.orthanc_missing)
    files, uids, study = _study(tmp_path, 3)
    pacs = peers.Orthanc("ORTHANC", workdir=tmp_path / "orthanc")
    r = router({"destinations": {"pacs": destination(pacs.dicom_port, "ORTHANC", verify="find", verify_quiet=3)},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]}, start=False)
    # Orthanc answers C-FIND only to modalities it knows
    pacs.config["DicomModalities"] = {"fastroute": ["FASTROUTE", "127.0.0.1", r.port]}
    with pacs:
        r.start()
        assert storescu(r.port, files).returncode == 0
        ids = [pacs.wait_for_instance(u, timeout=30)["ID"] for u in uids]
        pacs.request("DELETE", f"/instances/{ids[1]}")     # the archive "loses" one after the C-STORE-RSP
        assert pacs.find_instance(uids[1]) is None
        spool = Spool(r.spool_path)
        try:
            wait_until(lambda: (s := _state(spool, study)) is not None and s.state == VerifyState.VERIFIED, 60,
                       message=lambda: f"not verified: {_state(spool, study)}\n{r.log_tail()}")
            sv = _state(spool, study)
            assert sv is not None and sv.attempts == 1 and sv.verified_total == 3 and not sv.by_count
            resent = [e for e in spool.audit_events(study_instance_uid=study) if e["action"] == "verify-resent"]
            assert [e["missing"] for e in resent] == [[uids[1]]]
            assert spool.counters().of(CounterKind.VERIFIED, "pacs") == 3
        finally:
            spool.close()
        assert pacs.find_instance(uids[1]) is not None      # it is back
        q = r.queue()["pacs"]
        assert (q["verified"], q["verify_waiting"], q["verify_failed_now"]) == (3, 0, 0)
        assert "verification (find, quiet 3s): 3 verified, 0 study(ies) waiting, 0 verify-failed" in \
            r.cli("queue").stdout


def test_bytes_held_until_verified_and_let_go_when_switched_off(tmp_path: Path) -> None:
    """Delivered, not settled yet (a long quiet period): the bytes stay for a re-send; with
    verify switched off nothing waits any more and they go."""
    files, uids, study = _study(tmp_path, 2)
    with StoringArchive() as pacs:
        cfg = config(tmp_path, pacs.port, verify_quiet=3600)
        oids = _seed(cfg, files)
        with running_sender(cfg) as spool:
            wait_until(lambda: sorted(pacs.stored) == sorted(uids), 30, message=lambda: f"stored {pacs.stored}")
            wait_until(lambda: not any(q["pending"] or q["in_flight"] for q in ops.destination_status(cfg, spool)
                                       if q["destination"] == "pacs"), 30, message="delivery not settled")
            assert all(_has_bytes(spool, o) for o in oids)
            assert [spool.verifications.states(o)["pacs"] for o in oids] == [VerifyState.WAITING] * 2
            (q,) = [q for q in ops.destination_status(cfg, spool) if q["destination"] == "pacs"]
            assert (q["verify_waiting"], q["verified"]) == (1, 0)
            assert not [r for r in pacs.requests if r.command == "C-FIND"]     # not settled: not queried
    off = config(tmp_path, pacs.port, verify="off")
    spool = Spool(off.spool, map_size=off.spool_max_bytes)
    try:
        DestinationSender(off, off.destinations["pacs"], spool)
        assert not any(_has_bytes(spool, o) for o in oids)
        assert spool.verifications.waiting_studies("pacs") == []
        assert spool.verifications.study("pacs", study) is None
    finally:
        spool.close()


def test_config_keys_defaults_and_banner(tmp_path: Path) -> None:
    from fastroute.cli import describe
    from fastroute.errors import ConfigError

    plain = loads(yaml.safe_dump({"spool": str(tmp_path / "spool"), "destinations": {"pacs": destination(104)}}))
    d = plain.destinations["pacs"]
    assert (d.verify, d.verify_quiet, d.verify_attempts) == ("off", 120.0, 3)
    assert "verification" not in describe(plain)
    cfg = config(tmp_path, 104, verify_quiet="2m", verify_attempts=5, query_level="study")
    d = cfg.destinations["pacs"]
    assert (d.verify, d.verify_quiet, d.verify_attempts) == ("find", 120.0, 5)
    assert ("destination pacs: verification by C-FIND (study level) once a study settled (120s quiet), "
            "5 re-send(s)") in describe(cfg)
    assert verify_warnings(plain) == []
    assert verify_warnings(cfg) == [
        "destinations.pacs: verify: find: FAKEPACS must answer Study Root C-FIND (study level) from AE FASTROUTE"]
    (_, quiet) = verify_warnings(config(tmp_path, 104))
    assert quiet.startswith("destinations.pacs: verify_quiet 0.5s: an archive that indexes in the background")
    for bad in ({"verify": "sometimes"}, {"verify_attempts": 0}):
        with pytest.raises(ConfigError, match="verify"):
            config(tmp_path, 104, **bad)
