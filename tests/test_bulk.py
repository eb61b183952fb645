"""Issue 13 in the spool: a migration's objects queue in the BULK class behind clinical ones,
and a re-received migration object with different content is recorded as a conflict."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest

from fastroute.spool import Incoming, Outcome, OutcomeKind, QueueState, Spool, content_digest

TS = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def clinical(uid: str, dests: tuple[str, ...] = ("pacs",), data: bytes | None = None) -> Incoming:
    return Incoming(data or uid.encode() * 10, TS, CT, uid, dests,
                    {"study_instance_uid": "9.9", "calling_ae": "CT1"})


def moved(uid: str, dests: tuple[str, ...] = ("pacs",), data: bytes | None = None,
          job: str = "mig1") -> Incoming:
    return Incoming(data or uid.encode() * 10, TS, CT, uid, dests,
                    {"study_instance_uid": "8.8", "calling_ae": "OLDPACS", "migration": job,
                     "move_originator_ae": "FASTROUTE", "move_originator_id": 5})


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    sp = Spool(tmp_path / "spool", map_size=256 * 1024**2)
    yield sp
    sp.close()


def _pending_class(sp: Spool, dest: str, oid: int) -> QueueState:
    e = sp.entry(dest, oid)
    assert e is not None
    return e.state


def test_clinical_objects_overtake_a_migration_backlog(spool: Spool) -> None:
    """1,000 bulk objects queued, then 10 clinical ones arrive: those are claimed next."""
    for start in range(0, 1000, 250):
        spool.put_many([moved(f"5.{i}") for i in range(start, start + 250)])
    [first], _ = spool.claim("pacs", 1)
    assert first.sop_instance_uid == "5.0"                # nothing clinical yet: bulk flows
    spool.settle("pacs", [Outcome(first.oid, OutcomeKind.DELIVERED, 0)])
    results = spool.put_many([clinical(f"1.{i}") for i in range(10)])
    batch, _ = spool.claim("pacs", 32)
    # all ten clinical ones first, in arrival order, then the batch is filled from the backlog
    assert [c.sop_instance_uid for c in batch[:10]] == [f"1.{i}" for i in range(10)]
    assert [c.oid for c in batch[:10]] == [r.oid for r in results]   # type: ignore[union-attr]
    assert [c.sop_instance_uid for c in batch[10:]] == [f"5.{i}" for i in range(1, 23)]
    [st] = [s for s in spool.stats(["pacs"]) if s.destination == "pacs"]
    assert (st.pending, st.bulk_pending, st.in_flight) == (999 - 22, 999 - 22, 32)


def test_bulk_waits_while_clinical_is_due(spool: Spool) -> None:
    spool.put_many([moved("5.1"), moved("5.2")])
    spool.put_many([clinical(f"1.{i}") for i in range(4)])
    batch, _ = spool.claim("pacs", 3)
    assert [c.sop_instance_uid for c in batch] == ["1.0", "1.1", "1.2"]
    # the settle+claim path takes the same order
    batch2, _ = spool.settle("pacs", [Outcome(c.oid, OutcomeKind.DELIVERED, 0) for c in batch], claim=2)
    assert [c.sop_instance_uid for c in batch2] == ["1.3", "5.1"]


def test_a_retry_returns_to_its_own_class_and_waits_its_backoff(spool: Spool) -> None:
    [b] = spool.put_many([moved("5.1")])
    [c] = spool.put_many([clinical("1.1")])
    batch, _ = spool.claim("pacs", 10, now=100.0)
    assert {x.sop_instance_uid for x in batch} == {"1.1", "5.1"}
    spool.settle("pacs", [Outcome(x.oid, OutcomeKind.RETRY, 0xA700, "busy", next_at=200.0) for x in batch],
                 now=100.0)
    assert _pending_class(spool, "pacs", b.oid) == QueueState.BULK     # type: ignore[union-attr]
    assert _pending_class(spool, "pacs", c.oid) == QueueState.PENDING  # type: ignore[union-attr]
    # nothing due: the earliest backoff is reported (from either class)
    assert spool.claim("pacs", 10, now=150.0) == ([], 200.0)
    # a clinical one in backoff does not hold a due bulk one back
    spool.settle("pacs", [], now=150.0)
    assert spool.make_due("pacs", now=150.0) == 2
    batch, _ = spool.claim("pacs", 10, now=150.0)
    assert [x.sop_instance_uid for x in batch] == ["1.1", "5.1"]
    spool.settle("pacs", [Outcome(x.oid, OutcomeKind.RELEASE) for x in batch])
    assert _pending_class(spool, "pacs", b.oid) == QueueState.BULK     # type: ignore[union-attr]


def test_restart_failed_retry_entries_and_purge_keep_the_class(spool: Spool) -> None:
    [b1, b2] = spool.put_many([moved("5.1"), moved("5.2")])
    [c] = spool.put_many([clinical("1.1")])
    batch, _ = spool.claim("pacs", 10)
    assert len(batch) == 3
    assert spool.reset_inflight("pacs") == 3      # a sender restarted
    assert [(e.sop, e.state) for e in _entries(spool)] == [
        ("1.1", QueueState.PENDING), ("5.1", QueueState.BULK), ("5.2", QueueState.BULK)]
    batch, _ = spool.claim("pacs", 10)
    spool.settle("pacs", [Outcome(x.oid, OutcomeKind.FAILED, 0xA900, "refused") for x in batch])
    assert spool.retry_failed("pacs") == 3
    assert [(e.sop, e.state) for e in _entries(spool)] == [
        ("1.1", QueueState.PENDING), ("5.1", QueueState.BULK), ("5.2", QueueState.BULK)]
    assert [e.oid for e in spool.entries("pacs", QueueState.BULK)] == [b1.oid, b2.oid]  # type: ignore[union-attr]
    # purging "pending" takes both classes; the objects go with their last reference
    assert sorted(spool.purge("pacs", (QueueState.PENDING,))) == sorted(
        [b1.oid, b2.oid, c.oid])                                          # type: ignore[union-attr]
    assert spool.object_count() == 0
    [st] = [s for s in spool.stats(["pacs"]) if s.destination == "pacs"]
    assert (st.pending, st.bulk_pending) == (0, 0)


class _E:
    def __init__(self, sop: str, state: QueueState) -> None:
        self.sop, self.state = sop, state


def _entries(sp: Spool) -> list[_E]:
    out = []
    for e in sp.entries("pacs", QueueState.PENDING):
        assert e.record is not None
        out.append(_E(e.record.sop_instance_uid, e.state))
    return out


def test_bulk_backlog_does_not_age_the_clinical_queue(spool: Spool) -> None:
    spool.put_many([moved("5.1")], now=1000.0)
    [st] = [s for s in spool.stats(["pacs"], now=5000.0) if s.destination == "pacs"]
    assert st.pending == 1 and st.oldest_age is None
    spool.put_many([clinical("1.1")], now=4000.0)
    [st] = [s for s in spool.stats(["pacs"], now=5000.0) if s.destination == "pacs"]
    assert st.pending == 2 and st.oldest_age == 1000.0


def test_a_clinical_resend_supersedes_a_pending_bulk_copy(spool: Spool) -> None:
    [b] = spool.put_many([moved("5.1")])
    [c] = spool.put_many([clinical("5.1", data=b"corrected" * 4)])
    assert c.superseded == (b.oid,)                                    # type: ignore[union-attr]
    [x], _ = spool.claim("pacs", 10)
    assert x.oid == c.oid                                              # type: ignore[union-attr]
    assert spool.stats(["pacs"])[0].bulk_pending == 0


# -- duplicates with different content -------------------------------------------------------------

def test_migration_copy_with_different_content_is_recorded_and_logged(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    [old] = spool.put_many([clinical("5.1", data=b"version one " * 8)])
    with caplog.at_level(logging.WARNING, logger="fastroute.spool"):
        [new] = spool.put_many([moved("5.1", data=b"version two " * 8)])
    rec = spool.record(new.oid)                                        # type: ignore[union-attr]
    assert rec is not None
    assert rec.extra["content_conflict"] == {
        "with_oid": old.oid, "digest": content_digest(b"version two " * 8).hex(),   # type: ignore[union-attr]
        "other_digest": content_digest(b"version one " * 8).hex()}
    assert rec.digest == content_digest(b"version two " * 8).hex()    # the sender need not hash it
    assert rec.extra["migration"] == "mig1"
    [line] = [r for r in caplog.records if "different content" in r.getMessage()]
    text = line.getMessage()
    assert "migration=mig1" in text and "sop_instance_uid=5.1" in text and "study_instance_uid=8.8" in text
    spool.flush_receipts()        # receipts are gathered for a second (Spool.put_many)
    assert [e["action"] for e in spool.audit_events()][-2:] == ["content_conflict", "received"]
    # still one delivery: the newer copy superseded the pending older one
    assert new.superseded == (old.oid,)                                # type: ignore[union-attr]
    [x], _ = spool.claim("pacs", 10)
    assert x.oid == new.oid                                            # type: ignore[union-attr]


def test_conflict_with_a_delivered_copy_uses_its_recorded_digest(spool: Spool) -> None:
    data = b"delivered bytes " * 4
    [old] = spool.put_many([moved("5.1", data=data)])
    [x], _ = spool.claim("pacs", 10)
    spool.settle("pacs", [Outcome(x.oid, OutcomeKind.DELIVERED, 0, digest=content_digest(data))])
    assert spool.object_count() == 0                                   # its bytes are gone
    [same] = spool.put_many([moved("5.1", data=data)])
    rec = spool.record(same.oid)                                       # type: ignore[union-attr]
    assert rec is not None and "content_conflict" not in rec.extra and same.queued == ("pacs",)  # type: ignore[union-attr]
    [y], _ = spool.claim("pacs", 10)
    spool.settle("pacs", [Outcome(y.oid, OutcomeKind.DELIVERED, 0, digest=content_digest(data))])
    [other] = spool.put_many([moved("5.1", data=b"changed " * 8)])
    rec = spool.record(other.oid)                                      # type: ignore[union-attr]
    assert rec is not None
    assert rec.extra["content_conflict"]["with_oid"] == same.oid      # type: ignore[union-attr]
    assert rec.extra["content_conflict"]["other_digest"] == content_digest(data).hex()
    assert old.oid != same.oid                                         # type: ignore[union-attr]


def test_no_comparison_without_either_digest(spool: Spool) -> None:
    """Old copy delivered without a recorded digest and its bytes gone: nothing to compare."""
    spool.put_many([moved("5.1", data=b"a" * 40)])
    [x], _ = spool.claim("pacs", 10)
    spool.settle("pacs", [Outcome(x.oid, OutcomeKind.DELIVERED, 0)])   # no digest recorded
    [new] = spool.put_many([moved("5.1", data=b"b" * 40)])
    rec = spool.record(new.oid)                                        # type: ignore[union-attr]
    assert rec is not None and "content_conflict" not in rec.extra and rec.digest == ""


def test_identical_migration_copy_is_no_conflict(spool: Spool) -> None:
    data = b"same" * 20
    [old] = spool.put_many([clinical("5.1", data=data)])
    [new] = spool.put_many([moved("5.1", data=data)])
    rec = spool.record(new.oid)                                        # type: ignore[union-attr]
    assert rec is not None and "content_conflict" not in rec.extra
    assert new.superseded == (old.oid,)                                # type: ignore[union-attr]
    assert spool.object_count() == 1


def test_operator_views_show_a_bulk_object_as_pending(tmp_path: Path) -> None:
    """The study trace, the entries and the queue view of a migration's waiting object."""
    import yaml

    from fastroute.config import loads
    from fastroute.ops import actions as ops
    cfg = loads(yaml.safe_dump({"ae_title": "FASTROUTE", "port": 11112, "spool": str(tmp_path / "s"),
                                "min_free_bytes": 0, "spool_max_bytes": "64MiB",
                                "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}}))
    sp = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        sp.put_many([moved("5.1"), clinical("1.1")])
        [obj] = ops.lookup(cfg, sp, study_instance_uid="8.8")["objects"]
        assert [s["state"] for s in obj["path"]] == ["pending"]
        rows = ops.entries(cfg, sp, "pacs", "pending")
        assert [(r["sop_instance_uid"], r["state"]) for r in rows] == [("1.1", "pending"), ("5.1", "bulk")]
        assert [r["sop_instance_uid"] for r in ops.entries(cfg, sp, "pacs", "bulk")] == ["5.1"]
    finally:
        sp.close()


def test_a_claimed_bulk_object_says_so_and_its_digest_is_kept(spool: Spool) -> None:
    """The sender hashes what it delivered of a migration (``Claimed.bulk``), so a later copy
    can be compared; with duplicate_window off that is all: no ``dlv`` entry."""
    spool.put_many([moved("5.1", data=b"m" * 50), clinical("1.1")])
    batch, _ = spool.claim("pacs", 10)
    assert [(c.sop_instance_uid, c.bulk) for c in batch] == [("1.1", False), ("5.1", True)]
    spool.settle("pacs", [Outcome(c.oid, OutcomeKind.DELIVERED, 0,
                                  digest=content_digest(b"m" * 50) if c.bulk else b"") for c in batch])
    rec = spool.record(batch[1].oid)
    assert rec is not None and rec.digest == content_digest(b"m" * 50).hex()
    with spool.env.begin() as txn:
        assert txn.stat(spool._dbs["dlv"])["entries"] == 0
