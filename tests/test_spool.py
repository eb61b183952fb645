"""The spool's contract, driven with bytes: durability states, duplicates, limits, audit chain."""
from __future__ import annotations

import json
from pathlib import Path


import pytest

from fastroute.errors import SpoolFullError
from fastroute.spool import (
    UNROUTED,
    CounterKind,
    DropReason,
    Incoming,
    Outcome,
    OutcomeKind,
    QueueState,
    Spool,
    content_digest,
)

TS = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def obj(uid: str, dests: tuple[str, ...] = ("a",), data: bytes | None = None, study: str = "9.9") -> Incoming:
    return Incoming(data or uid.encode() * 10, TS, CT, uid, dests,
                    {"study_instance_uid": study, "calling_ae": "CT1", "patient_id": "P1"})


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    sp = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    yield sp
    sp.close()


@pytest.fixture
def windowed(tmp_path: Path) -> Spool:
    """A spool with the duplicate policy turned on (it is off by default)."""
    sp = Spool(tmp_path / "spool-w", map_size=64 * 1024**2, duplicate_window=3600)
    yield sp
    sp.close()


def test_one_copy_many_queues_and_removal_after_all_delivered(spool: Spool) -> None:
    [res] = spool.put_many([obj("1.1", ("a", "b"))])
    assert res.queued == ("a", "b") and spool.object_count() == 1
    (ca, _), (cb, _) = spool.claim("a", 10), spool.claim("b", 10)
    spool.settle("a", [Outcome(ca[0].oid, OutcomeKind.DELIVERED, 0)])
    assert spool.object_count() == 1                  # b still needs it
    spool.settle("b", [Outcome(cb[0].oid, OutcomeKind.DELIVERED, 0)])
    assert spool.object_count() == 0
    rec = spool.record(res.oid)
    assert rec is not None and set(rec.delivered) == {"a", "b"} and rec.outstanding == []


def test_claim_is_fifo_and_skips_not_yet_due(spool: Spool) -> None:
    spool.put_many([obj(f"1.{i}") for i in range(5)])
    first, _ = spool.claim("a", 2)
    assert [c.sop_instance_uid for c in first] == ["1.0", "1.1"]
    spool.settle("a", [Outcome(first[0].oid, OutcomeKind.RETRY, 0xA700, "busy", next_at=2e9),
                       Outcome(first[1].oid, OutcomeKind.RELEASE)])
    rest, earliest = spool.claim("a", 10, now=1e9)
    assert [c.sop_instance_uid for c in rest] == ["1.1", "1.2", "1.3", "1.4"]
    assert earliest == 2e9
    [st] = [s for s in spool.stats(["a"]) if s.destination == "a"]
    assert (st.pending, st.in_flight) == (1, 4)


def test_restart_returns_in_flight_to_pending(spool: Spool) -> None:
    spool.put_many([obj("1.1"), obj("1.2")])
    spool.claim("a", 10)
    assert spool.reset_inflight("a") == 2
    claimed, _ = spool.claim("a", 10)
    assert len(claimed) == 2


def test_failed_is_kept_listed_and_retried(spool: Spool) -> None:
    spool.put_many([obj("1.1")])
    [c], _ = spool.claim("a", 1)
    spool.settle("a", [Outcome(c.oid, OutcomeKind.FAILED, 0xA900, "does not match SOP class")])
    [e] = spool.entries("a", QueueState.FAILED)
    assert e.last_status == 0xA900 and "does not match" in e.error and spool.object_count() == 1
    assert spool.retry_failed("a") == 1
    [c2], _ = spool.claim("a", 1)
    assert c2.oid == c.oid and c2.attempts == 0


def test_retry_record_survives_with_its_error(spool: Spool) -> None:
    spool.put_many([obj("1.1")])
    [c], _ = spool.claim("a", 1)
    spool.settle("a", [Outcome(c.oid, OutcomeKind.RETRY, 0xA700, "out of resources", next_at=0)])
    [c2], _ = spool.claim("a", 1)
    assert c2.attempts == 1
    assert spool.entry("a", c2.oid) is not None


def test_resend_while_pending_supersedes(spool: Spool) -> None:
    [old] = spool.put_many([obj("1.1", data=b"old" * 10)])
    [new] = spool.put_many([obj("1.1", data=b"new" * 10)])
    assert new.superseded == (old.oid,)
    claimed, _ = spool.claim("a", 10)
    assert [c.oid for c in claimed] == [new.oid]        # one delivery, the newest bytes
    assert spool.read(new.oid) == b"new" * 10
    assert spool.object_count() == 1                    # the old bytes are gone


def test_identical_resend_after_delivery_is_suppressed_but_a_correction_is_not(windowed: Spool) -> None:
    spool = windowed
    spool.put_many([obj("1.1", data=b"same" * 10)])
    [c], _ = spool.claim("a", 1)
    spool.settle("a", [Outcome(c.oid, OutcomeKind.DELIVERED, 0)])
    [dup] = spool.put_many([obj("1.1", data=b"same" * 10)])
    assert dup.suppressed == ("a",) and dup.queued == ()
    [fix] = spool.put_many([obj("1.1", data=b"fixed" * 10)])
    assert fix.queued == ("a",)


def test_a_deliberate_resend_is_forwarded_by_default(spool: Spool) -> None:
    """Issue 12: "PACS lost it, please resend" must arrive; the window is off by default,
    and then the receive path neither looks up earlier deliveries nor hashes."""
    from fastroute.config import Config
    assert Config.__dataclass_fields__["duplicate_window"].default == 0
    assert spool.duplicate_window == 0
    spool.put_many([obj("1.1", data=b"same" * 10)])
    [c], _ = spool.claim("a", 1)
    spool.settle("a", [Outcome(c.oid, OutcomeKind.DELIVERED, 0)])
    [again] = spool.put_many([obj("1.1", data=b"same" * 10)])
    assert again.queued == ("a",) and again.suppressed == ()
    rec = spool.record(again.oid)
    assert rec is not None and rec.digest == "" and rec.duplicate_of == {}
    assert spool.counters().per_destination(CounterKind.SUPPRESSED) == {}


def test_suppression_is_logged_audited_counted_and_recorded(windowed: Spool,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    spool = windowed
    spool.put_many([obj("1.1", ("a", "b"), data=b"same" * 10, study="7.7")])
    [ca], _ = spool.claim("a", 1)
    spool.settle("a", [Outcome(ca.oid, OutcomeKind.DELIVERED, 0, at=1_000.0 + 0)])  # long ago...
    [ca2], _ = spool.claim("b", 1)
    spool.settle("b", [Outcome(ca2.oid, OutcomeKind.DELIVERED, 0)])                 # ...and just now
    first = spool.record(ca.oid)
    assert first is not None
    delivered_b = first.delivered["b"].at
    with caplog.at_level("INFO", logger="fastroute.spool"):
        [dup] = spool.put_many([obj("1.1", ("a", "b"), data=b"same" * 10, study="7.7")])
    # "a" was delivered outside the window: sent again; "b" within it: suppressed
    assert dup.queued == ("a",) and dup.suppressed == ("b",)
    assert spool.counters().per_destination(CounterKind.SUPPRESSED) == {"b": 1}
    rec = spool.record(dup.oid)
    assert rec is not None and rec.suppressed == ["b"]
    assert rec.duplicate_of["b"].oid == ca.oid and rec.duplicate_of["b"].delivered_at == delivered_b
    [event] = [e for e in spool.audit_events() if e["action"] == "suppressed"]
    assert event["destination"] == "b" and event["sop_instance_uid"] == "1.1"
    assert event["study_instance_uid"] == "7.7" and event["calling_ae"] == "CT1"
    assert event["oid"] == dup.oid and event["duplicate_of"] == ca.oid
    assert event["delivered_at"] == delivered_b
    ok, msg = spool.audit_verify()
    assert ok, msg
    [line] = [r.getMessage() for r in caplog.records if "not forwarded" in r.getMessage()]
    for text in ("destination=b", "sop_instance_uid=1.1", "study_instance_uid=7.7",
                 f"oid={dup.oid}", f"(oid {ca.oid})", "duplicate_window 3600s"):
        assert text in line, line
    [record] = [r for r in caplog.records if "not forwarded" in r.getMessage()]
    assert {k: getattr(record, k, None) for k in ("destination", "sop_uid", "study_uid", "calling_ae", "oid")} == {
        "destination": "b", "sop_uid": "1.1", "study_uid": "7.7", "calling_ae": "CT1", "oid": dup.oid}


def test_earlier_delivery_without_oid_from_an_older_spool() -> None:
    """Delivery keys written before the oid was kept (digest + time) still match."""
    import struct
    from fastroute.spool.queues import _earlier_delivery
    old = b"d" * 16 + struct.pack("<d", 12.5)
    assert _earlier_delivery(old).delivered_at == 12.5 and _earlier_delivery(old).oid is None
    new = old + struct.pack(">Q", 7)
    assert _earlier_delivery(new).oid == 7


def test_unrouted_is_held_and_purge_is_explicit(spool: Spool) -> None:
    [res] = spool.put_many([obj("1.1", ())])
    [st] = [s for s in spool.stats() if s.destination == UNROUTED]
    assert st.pending == 1
    assert spool.purge(UNROUTED, (QueueState.UNROUTED,), reason="test") == [res.oid]
    assert spool.object_count() == 0
    rec = spool.record(res.oid)
    assert rec is not None and rec.dropped[UNROUTED].how is DropReason.PURGED
    assert rec.dropped[UNROUTED].reason == "test"


def test_map_full_keeps_what_fits(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "small", map_size=1024 * 1024)
    try:
        results = sp.put_many([obj(f"1.{i}", data=bytes(200_000)) for i in range(10)])
        ok = [r for r in results if not isinstance(r, BaseException)]
        full = [r for r in results if isinstance(r, SpoolFullError)]
        assert ok and full and len(ok) + len(full) == 10
        assert sp.object_count() == len(ok)
    finally:
        sp.close()


def test_free_space_floor(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s", map_size=1 << 26, min_free_bytes=1 << 60)
    try:
        [res] = sp.put_many([obj("1.1")])
        assert isinstance(res, SpoolFullError) and "free-space floor" in str(res)
        assert sp.object_count() == 0
    finally:
        sp.close()


def test_lookup_and_history(spool: Spool) -> None:
    spool.put_many([obj("1.1", study="7.7"), obj("1.2", study="7.7"), obj("1.3", study="8.8")])
    assert sorted(r.sop_instance_uid for _, r in spool.lookup(study_instance_uid="7.7")) == ["1.1", "1.2"]
    assert len(spool.lookup(patient_id="P1")) == 3


def test_audit_chain_detects_tampering(spool: Spool) -> None:
    spool.put_many([obj("1.1")])
    [c], _ = spool.claim("a", 1)
    spool.settle("a", [Outcome(c.oid, OutcomeKind.DELIVERED, 0)])
    spool.audit_record("purge", who="alice", why="duplicate study")
    ok, msg = spool.audit_verify()
    assert ok, msg
    events = list(spool.audit_events())
    assert [e["action"] for e in events] == ["received", "delivered", "purge"]   # receipt per study batch
    # Alter the first event behind the spool's back.
    env = spool.env
    db = env.open_db(b"audit")
    with env.begin(write=True, db=db) as txn:
        key, raw = next(iter(txn.cursor()))
        ev = json.loads(bytes(raw))
        ev["destination"] = "elsewhere"
        txn.put(key, json.dumps(ev).encode())
    ok, msg = spool.audit_verify()
    assert not ok and "altered" in msg


def test_counters_and_latency_histogram(spool: Spool) -> None:
    spool.put_many([obj("1.1")], now=1000.0)
    [c], _ = spool.claim("a", 1, now=1000.0)
    spool.settle("a", [Outcome(c.oid, OutcomeKind.DELIVERED, 0, transcoded="1.2.840.10008.1.2")], now=1003.0)
    counters = spool.counters()
    assert counters["received"] == 1 and counters["delivered:a"] == 1
    assert counters["latency_bucket:a:5.0"] == 1 and counters["transcoded:a"] == 1
    assert counters["received_from:CT1"] == 1
    assert counters.of(CounterKind.DELIVERED, "a") == 1 and counters.of(CounterKind.RECEIVED_FROM, extra="CT1") == 1
    assert counters.per_destination(CounterKind.TRANSCODED) == {"a": 1}
    assert spool.record(c.oid).delivered["a"].syntax == "1.2.840.10008.1.2"   # type: ignore[union-attr]


def test_delivery_is_recorded_at_the_destinations_time(spool: Spool) -> None:
    """A sender may record a delivery after a short hold: times come from Outcome.at."""
    [res] = spool.put_many([obj("1.1")], now=1000.0)
    [c], _ = spool.claim("a", 1, now=1000.0)
    spool.settle("a", [Outcome(c.oid, OutcomeKind.DELIVERED, 0, at=1000.2)], now=1003.0)
    assert spool.record(res.oid).delivered["a"].at == 1000.2   # type: ignore[union-attr]
    counters = spool.counters()
    assert counters["latency_bucket:a:0.25"] == 1 and "latency_bucket:a:5.0" not in counters
    assert [e["time"] for e in spool.audit_events() if e["action"] == "delivered"] == [1000.2]


def test_another_process_sees_the_same_queue(tmp_path: Path) -> None:
    import subprocess
    import sys
    a = Spool(tmp_path / "s", map_size=1 << 26)
    try:
        a.put_many([obj("1.1")])
        code = ("import sys; from fastroute.spool import Spool; "
                "s = Spool(sys.argv[1], map_size=1 << 26); c, _ = s.claim('a', 5); print(len(c))")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        assert out.strip() == "1"
        [st] = [s for s in a.stats(["a"]) if s.destination == "a"]
        assert st.in_flight == 1
    finally:
        a.close()


def test_view_is_the_stored_bytes_without_a_copy_and_dies_with_its_block(spool: Spool) -> None:
    from fastroute.errors import SpoolError
    data = bytes(range(256)) * 64
    [res] = spool.put_many([obj("1.7", data=data)])
    with spool.view(res.oid) as view:
        assert isinstance(view, memoryview) and view.readonly
        assert view == data and bytes(view) == spool.read(res.oid)
    with pytest.raises(ValueError):      # released: nothing can read the map after the txn
        len(view.tobytes())
    with pytest.raises(SpoolError, match="no data"):
        with spool.view(res.oid + 1000):
            pass


def test_settle_claims_the_next_batch_in_the_same_commit(spool: Spool) -> None:
    spool.put_many([obj(f"1.{i}") for i in range(4)])
    [first], _ = spool.claim("a", 1)
    before = spool.env.info()["last_txnid"]
    nxt, _ = spool.settle("a", [Outcome(first.oid, OutcomeKind.DELIVERED, 0)], claim=2)
    assert spool.env.info()["last_txnid"] == before + 1          # one commit for both
    assert [c.sop_instance_uid for c in nxt] == ["1.1", "1.2"]
    [st] = [s for s in spool.stats(["a"]) if s.destination == "a"]
    assert (st.pending, st.in_flight, st.delivered) == (1, 2, 1)
    spool.set_paused("a", True)                                   # paused: settle only
    assert spool.settle("a", [Outcome(c.oid, OutcomeKind.RELEASE) for c in nxt], claim=5) == ([], None)
    [st] = [s for s in spool.stats(["a"]) if s.destination == "a"]
    assert (st.pending, st.in_flight) == (3, 0)


def test_content_digest_is_not_taken_on_receive(windowed: Spool) -> None:
    """The hash is the sender's job (after delivery); the receive path only takes it to
    compare a re-send with an earlier delivery."""
    spool = windowed
    data = b"pixels" * 1000
    [res] = spool.put_many([obj("1.1", ("a", "b"), data=data)])
    assert spool.record(res.oid).digest == ""   # type: ignore[union-attr]
    [ca], _ = spool.claim("a", 1)
    assert ca.digest == b""
    digest = content_digest(data)
    spool.settle("a", [Outcome(ca.oid, OutcomeKind.DELIVERED, 0, digest=digest)])
    assert spool.record(res.oid).digest == digest.hex()   # type: ignore[union-attr]
    [cb], _ = spool.claim("b", 1)                 # the other sender need not hash again
    assert cb.digest == digest
    spool.settle("b", [Outcome(cb.oid, OutcomeKind.DELIVERED, 0, digest=cb.digest)])
    [dup] = spool.put_many([obj("1.1", ("a", "b"), data=data)])
    assert dup.suppressed == ("a", "b") and dup.queued == ()


def test_no_duplicate_window_keeps_no_delivery_digests(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s", map_size=1 << 26, duplicate_window=0)
    try:
        sp.put_many([obj("1.1", data=b"same" * 10)])
        [c], _ = sp.claim("a", 1)
        sp.settle("a", [Outcome(c.oid, OutcomeKind.DELIVERED, 0)])
        with sp.env.begin() as txn:
            assert txn.stat(sp._dbs["dlv"])["entries"] == 0
        [again] = sp.put_many([obj("1.1", data=b"same" * 10)])
        assert again.queued == ("a",) and again.suppressed == ()
    finally:
        sp.close()


def test_sender_commits_skip_only_the_meta_sync(tmp_path: Path) -> None:
    """Listeners answer modalities after their commit: fully synced. Senders' commits keep
    LMDB's integrity (data synced before the meta page) but not the last one's durability."""
    from fastroute.config import loads
    from fastroute.spool import open_spool
    cfg = loads(f"spool: {tmp_path / 's'}\nspool_max_bytes: 64MiB\n")
    for durable in (True, False):
        sp = open_spool(cfg, durable=durable)
        try:
            assert sp.env.flags()["sync"] and sp.env.flags()["metasync"] is durable
        finally:
            sp.close()
    import inspect
    from fastroute import workers
    assert "open_spool(cfg, durable=False)" in inspect.getsource(workers.sender_main)
    assert "open_spool(cfg)" in inspect.getsource(workers.listener_main)


def test_preallocation_writes_room_ahead_once(tmp_path: Path) -> None:
    """A new spool's file is grown up front (zeros through LMDB, then freed), so commits
    reuse written pages instead of growing the file; a second start adds nothing, and the
    free-space floor still wins."""
    sp = Spool(tmp_path / "s", map_size=1 << 30)
    try:
        assert sp.reusable_bytes() < 1 << 20
        added = sp.preallocate(32 << 20, chunk=1 << 20)
        assert added >= (32 << 20) - sp.reusable_bytes() - (1 << 20)
        assert sp.reusable_bytes() >= 32 << 20
        assert (tmp_path / "s" / "data.mdb").stat().st_size >= 32 << 20
        size = (tmp_path / "s" / "data.mdb").stat().st_size
        assert sp.preallocate(32 << 20) == 0
        for i in range(8):                  # one commit each (LMDB places a second large value
            sp.put_many([obj(f"1.{i}", data=bytes(1 << 20))])   # of one commit at the end)
        assert (tmp_path / "s" / "data.mdb").stat().st_size <= size + (2 << 20)   # filled room
        assert sp.reusable_bytes() < 28 << 20 and sp.counters()["received"] == 8
        assert not [k for k in sp.counters() if "prealloc" in k]
    finally:
        sp.close()
    floor = Spool(tmp_path / "t", map_size=1 << 30, min_free_bytes=1 << 60)
    try:
        assert floor.preallocate(32 << 20) == 0
    finally:
        floor.close()


def test_preallocation_cleans_up_after_a_crash_in_between(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s", map_size=1 << 30)
    try:
        with sp.env.begin(write=True, db=sp._info) as txn:      # as if killed before the delete
            txn.put(b"~prealloc:00000000", bytes(1 << 20))
        sp.preallocate(0)
        with sp.env.begin(db=sp._info) as txn:
            assert txn.get(b"~prealloc:00000000") is None
    finally:
        sp.close()


# -- typed records: one codec, old records still read -------------------------------------------

def test_routing_record_round_trip() -> None:
    from fastroute.spool.records import (
        Delivery,
        Drop,
        Failure,
        RoutingRecord,
        Suppression,
        decode_record,
        encode_record,
    )
    rec = RoutingRecord(
        sop_class_uid=CT, sop_instance_uid="1.1", transfer_syntax=TS, size=10, received_at=5.5,
        digest="ab" * 16, outstanding=["c"], routed_to=["a", "b", "c", "d"], suppressed=["e"],
        delivered={"a": Delivery(6.0, 0), "b": Delivery(7.0, 0xB000, "1.2.840.10008.1.2.4.80")},
        failed={"c": Failure(8.0, None, "timeout")},
        dropped={"d": Drop(9.0, DropReason.SUPERSEDED, by=42), "x": Drop(9.5, DropReason.PURGED, "bad")},
        duplicate_of={"e": Suppression(4.0, 3)},
        study_instance_uid="7.7", patient_id="P1", calling_ae="CT1", rules=["ct"],
        extra={"future_key": [1, 2]})
    assert decode_record(encode_record(rec)) == rec
    doc = json.loads(encode_record(rec))
    assert doc["v"] == 2 and doc["delivered"]["b"] == {"at": 7.0, "status": 0xB000,
                                                       "syntax": "1.2.840.10008.1.2.4.80"}


def test_routing_record_decodes_the_list_records_of_the_first_format() -> None:
    from fastroute.spool.records import decode_record
    legacy = {
        "study_instance_uid": "7.7", "calling_ae": "CT1", "sop_class_uid": CT, "sop_instance_uid": "1.1",
        "transfer_syntax": TS, "size": 10, "digest": "", "received_at": 5.0, "outstanding": ["c"],
        "routed_to": ["a", "b", "c"], "suppressed": [],
        "delivered": {"a": [6.0, 0], "b": [7.0, 0xB000, "1.2.840.10008.1.2.4.80"]},
        "failed": {"c": [8.0, None, "timeout"]},
        "dropped": {"d": [9.0, "superseded", "", 42], "e": [9.5, "purged", "bad"]},
    }
    rec = decode_record(json.dumps(legacy).encode())
    assert rec.delivered["a"].syntax == "" and rec.delivered["b"].syntax == "1.2.840.10008.1.2.4.80"
    assert rec.delivered["b"].status == 0xB000 and rec.failed["c"].status is None
    assert rec.failed["c"].error == "timeout"
    assert rec.dropped["d"].how is DropReason.SUPERSEDED and rec.dropped["d"].by == 42
    assert rec.dropped["e"].reason == "bad" and rec.dropped["e"].by is None
    assert rec.extra == {} and rec.study_instance_uid == "7.7"


def test_queue_record_codec() -> None:
    from fastroute.spool.records import QueueRecord
    q = QueueRecord(3, 12.5, 0xA700, 1, "Refused: Out of Resources")
    assert QueueRecord.decode(q.encode()) == q and QueueRecord.next_at_of(q.encode()) == 12.5
    assert QueueRecord.decode(QueueRecord().encode()) == QueueRecord()   # -1 on disk is "no status"


def test_counter_keys_encode_and_decode_in_one_place() -> None:
    from fastroute.spool.counters import CounterKey
    cases = {
        "received": CounterKey(CounterKind.RECEIVED),
        "received_from:CT1": CounterKey(CounterKind.RECEIVED_FROM, extra="CT1"),
        "received_from:": CounterKey(CounterKind.RECEIVED_FROM),
        "delivered:pacs": CounterKey(CounterKind.DELIVERED, "pacs"),
        "failed_status:pacs:-1": CounterKey.failed_status("pacs", None),
        "failed_status:pacs:43264": CounterKey.failed_status("pacs", 0xA900),
        "latency_bucket:pacs:0.25": CounterKey.latency_bucket("pacs", 0.25),
        "latency_bucket:pacs:inf": CounterKey.latency_bucket("pacs", None),
    }
    for text, key in cases.items():
        assert key.encode() == text.encode() and CounterKey.decode(text) == key
    for other in ("paused:pacs", "audit_head", "received:x", "delivered", "nonsense:x"):
        assert CounterKey.decode(other) is None


LEGACY = Path(__file__).parent / "data" / "legacy_spool.tar.xz"
JPEG_LS = "1.2.840.10008.1.2.4.80"


def test_legacy_spool_opens_reads_and_drains(tmp_path: Path) -> None:
    """A spool written by the code before the split (tests/data/make_legacy_spool.py)."""
    import tarfile
    with tarfile.open(LEGACY) as tar:
        tar.extractall(tmp_path, filter="data")
    sp = Spool(tmp_path / "spool", map_size=16 * 1024**2)
    try:
        ok, msg = sp.audit_verify()
        assert ok and msg.startswith("7 events, chain intact;")
        assert [e["action"] for e in sp.audit_events()][-2:] == ["pause", "purge"]
        c = sp.counters()
        assert c.of(CounterKind.RECEIVED) == 11 and c.of(CounterKind.RECEIVED_FROM, extra="MR1") == 1
        assert c.per_destination(CounterKind.DELIVERED) == {"pacs": 2, "vna": 1}
        assert c.of(CounterKind.FAILED_STATUS, "pacs", "43264") == 1 and c.of(CounterKind.FAILED_STATUS, "pacs", "-1") == 1
        assert c.per_destination(CounterKind.SUPPRESSED) == {"pacs": 1, "vna": 1}
        assert c.of(CounterKind.LATENCY_BUCKET, "pacs", "30.0") == 2 and c.of(CounterKind.PURGED, "vna") == 1
        assert sp.is_paused("vna")

        by_uid = {r.sop_instance_uid: (oid, r) for oid, r in sp.lookup(study_instance_uid="1.2.3.4")}
        assert len(sp.lookup(patient_id="PAT1")) == 11
        delivered = by_uid["1.1"][1]     # the suppressed re-send is newer: lookup lists both
        first = sp.record(1)
        assert first is not None and first.delivered["pacs"].at == 1_700_000_021.0
        assert first.delivered["pacs"].syntax == "" and set(first.delivered) == {"pacs", "vna"}
        assert delivered.suppressed == ["pacs", "vna"] and delivered.outstanding == []
        transcoded = by_uid["1.2"][1]
        assert transcoded.delivered["pacs"].syntax == JPEG_LS and transcoded.delivered["pacs"].status == 0xB000
        assert by_uid["1.3"][1].failed["pacs"].status == 0xA900
        assert by_uid["1.4"][1].failed["pacs"].status is None
        assert by_uid["1.7"][1].dropped["vna"].how is DropReason.PURGED
        assert by_uid["1.7"][1].dropped["vna"].reason == "wrong study"
        superseded = sp.record(9)
        assert superseded is not None and superseded.dropped["vna"].how is DropReason.SUPERSEDED
        assert superseded.dropped["vna"].by == 10

        stats = {s.destination: s for s in sp.stats(["pacs", "vna"])}
        assert (stats["pacs"].pending, stats["pacs"].in_flight, stats["pacs"].failed) == (1, 1, 2)
        assert (stats["vna"].pending, stats["vna"].failed, stats[UNROUTED].pending) == (1, 0, 1)
        [retry] = sp.entries("pacs", QueueState.PENDING)
        assert retry.attempts == 1 and retry.last_status == 0xA700 and "Out of Resources" in retry.error
        failed = {e.oid: e for e in sp.entries("pacs", b"F")}       # the old code letters still work
        assert {e.last_status for e in failed.values()} == {0xA900, None}
        assert sp.entry("pacs", by_uid["1.5"][0]).state is QueueState.IN_FLIGHT   # type: ignore[union-attr]

        # Drain it all: the crashed sender's in-flight, the retry, the failed ones, vna, unrouted.
        assert sp.reset_inflight("pacs") == 1 and sp.retry_failed("pacs") == 2
        claimed, _ = sp.claim("pacs", 10, now=1_800_000_000.0)
        assert len(claimed) == 4
        sp.settle("pacs", [Outcome(x.oid, OutcomeKind.DELIVERED, 0, at=1_800_000_001.0) for x in claimed])
        sp.set_paused("vna", False)
        [v], _ = sp.claim("vna", 10)
        assert v.sop_instance_uid == "1.9" and v.oid == 10
        sp.settle("vna", [Outcome(v.oid, OutcomeKind.DELIVERED, 0)])
        assert sp.purge(UNROUTED, (QueueState.UNROUTED,), reason="drained") == [8]
        assert sp.object_count() == 0
        assert all(s.pending + s.in_flight + s.failed == 0 for s in sp.stats())
        rec = sp.record(by_uid["1.3"][0])
        assert rec is not None and rec.delivered["pacs"].status == 0 and rec.failed["pacs"].status == 0xA900
        assert sp.counters().of(CounterKind.DELIVERED, "pacs") == 6
        ok, msg = sp.audit_verify()
        assert ok and msg.startswith("12 events, chain intact;")   # 7 + five deliveries
        # new objects go on after the old sequence
        [new] = sp.put_many([obj("2.1")])
        assert new.oid == 12
    finally:
        sp.close()


def test_commit_path_forms_agree_with_the_codec() -> None:
    """put/claim/settle edit the JSON form directly (no RoutingRecord per object): what they
    write must decode to what the typed record says."""
    from fastroute.spool.records import (
        Delivery,
        Drop,
        Failure,
        RoutingRecord,
        decode_claim_fields,
        decode_record,
        encode_new_record,
        encode_record,
        update_record,
    )
    meta = {"study_instance_uid": "7.7", "patient_id": "P1", "calling_ae": "CT1", "rules": ["ct"], "custom": 1}
    raw, keys = encode_new_record(sop_class_uid=CT, sop_instance_uid="1.1", transfer_syntax=TS, size=10,
                                  received_at=5.0, digest="", outstanding=["a", "b"], routed_to=["a", "b"],
                                  suppressed=[], meta=meta)
    expected = RoutingRecord(CT, "1.1", TS, 10, 5.0, outstanding=["a", "b"], routed_to=["a", "b"],
                             study_instance_uid="7.7", patient_id="P1", calling_ae="CT1", rules=["ct"],
                             extra={"custom": 1})
    assert decode_record(raw) == expected and keys == expected.index_keys() == [b"s7.7", b"pP1"]
    assert decode_claim_fields(raw) == (CT, "1.1", TS, 10, "CT1", b"", "7.7", None)   # the Study UID: for log lines
    raw, facts = update_record(raw, "a", delivery=Delivery(6.0, 0, "1.2.840.10008.1.2"), digest="ab" * 16)
    raw, _ = update_record(raw, "b", failure=Failure(7.0, 0xA700, "busy"))
    raw, facts = update_record(raw, "b", drop=Drop(8.0, DropReason.PURGED, "why"))
    assert facts.finished and facts.digest == "ab" * 16 and facts.received_at == 5.0
    expected.outstanding = []
    expected.digest = "ab" * 16
    expected.delivered = {"a": Delivery(6.0, 0, "1.2.840.10008.1.2")}
    expected.failed = {"b": Failure(7.0, 0xA700, "busy")}
    expected.dropped = {"b": Drop(8.0, DropReason.PURGED, "why")}
    assert decode_record(raw) == expected and decode_record(encode_record(expected)) == expected
    # a version-1 record is upgraded when it is next updated
    v1 = json.dumps({"sop_class_uid": CT, "sop_instance_uid": "1.2", "transfer_syntax": TS, "size": 1,
                     "received_at": 1.0, "outstanding": ["a"], "delivered": {"x": [0.5, 0, "1.2.840.10008.1.2"]},
                     "failed": {}}).encode()
    raw, facts = update_record(v1, "a", delivery=Delivery(2.0, 0))
    doc = json.loads(raw)
    assert doc["v"] == 2 and doc["delivered"]["x"] == {"at": 0.5, "status": 0, "syntax": "1.2.840.10008.1.2"}
    assert facts.finished and decode_record(raw).delivered["a"] == Delivery(2.0, 0)


def test_quarantine_keeps_bytes_lists_audits_and_purges_like_failed(spool: Spool) -> None:
    """Issue 15: a quarantined object is held (not delivered, bytes kept, listed, counted,
    audited with its reason) until an operator purges it; other destinations are unaffected."""
    [res] = spool.put_many([obj("1.1", ("a", "b"))])
    [c], _ = spool.claim("a", 1)
    spool.settle("a", [Outcome(c.oid, OutcomeKind.QUARANTINE, None, "BurnedInAnnotation YES")])
    [e] = spool.entries("a", QueueState.QUARANTINED)
    assert e.oid == res.oid and e.error == "BurnedInAnnotation YES"
    assert spool.entries("a", QueueState.FAILED) == []
    assert spool.claim("a", 10)[0] == []                      # never sent
    [st] = [s for s in spool.stats(["a"]) if s.destination == "a"]
    assert (st.quarantined, st.quarantined_total, st.pending, st.failed) == (1, 1, 0, 0)
    assert spool.counters().of(CounterKind.QUARANTINED, "a") == 1
    rec = spool.record(res.oid)
    assert rec is not None and "a" in rec.outstanding and "a" not in rec.delivered
    [ev] = [ev for ev in spool.audit_events() if ev.get("action") == "quarantined"]
    assert (ev["destination"], ev["sop_instance_uid"], ev["study_instance_uid"], ev["calling_ae"],
            ev["oid"], ev["reason"]) == ("a", "1.1", "9.9", "CT1", res.oid, "BurnedInAnnotation YES")
    # b delivers; the bytes stay for the quarantined entry, and pruning does not take them
    [cb], _ = spool.claim("b", 1)
    spool.settle("b", [Outcome(cb.oid, OutcomeKind.DELIVERED, 0)])
    assert spool.prune_history(before=2e9) == 0
    assert spool.object_count() == 1 and spool.read(res.oid) == b"1.1" * 10
    assert spool.entry("a", res.oid) is not None
    # purge of the quarantined state drops it like a failed entry: the bytes go with it
    assert spool.purge("a", [QueueState.QUARANTINED], reason="reviewed") == [res.oid]
    assert spool.object_count() == 0 and spool.entries("a", QueueState.QUARANTINED) == []
