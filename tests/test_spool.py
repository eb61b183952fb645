"""The spool's contract, driven with bytes: durability states, duplicates, limits, audit chain."""
from __future__ import annotations

import json
from pathlib import Path


import pytest

from fastroute.errors import SpoolFullError
from fastroute.spool import FAILED, HELD, PENDING, UNROUTED, Incoming, Outcome, Spool, content_digest

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


def test_one_copy_many_queues_and_removal_after_all_delivered(spool: Spool) -> None:
    [res] = spool.put_many([obj("1.1", ("a", "b"))])
    assert res.queued == ("a", "b") and spool.object_count() == 1
    (ca, _), (cb, _) = spool.claim("a", 10), spool.claim("b", 10)
    spool.settle("a", [Outcome(ca[0].oid, "delivered", 0)])
    assert spool.object_count() == 1                  # b still needs it
    spool.settle("b", [Outcome(cb[0].oid, "delivered", 0)])
    assert spool.object_count() == 0
    meta = spool.meta(res.oid)
    assert meta is not None and set(meta["delivered"]) == {"a", "b"} and meta["outstanding"] == []


def test_claim_is_fifo_and_skips_not_yet_due(spool: Spool) -> None:
    spool.put_many([obj(f"1.{i}") for i in range(5)])
    first, _ = spool.claim("a", 2)
    assert [c.sop_instance_uid for c in first] == ["1.0", "1.1"]
    spool.settle("a", [Outcome(first[0].oid, "retry", 0xA700, "busy", next_at=2e9),
                       Outcome(first[1].oid, "release")])
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
    spool.settle("a", [Outcome(c.oid, "failed", 0xA900, "does not match SOP class")])
    [e] = spool.entries("a", FAILED)
    assert e.last_status == 0xA900 and "does not match" in e.error and spool.object_count() == 1
    assert spool.retry_failed("a") == 1
    [c2], _ = spool.claim("a", 1)
    assert c2.oid == c.oid and c2.attempts == 0


def test_retry_record_survives_with_its_error(spool: Spool) -> None:
    spool.put_many([obj("1.1")])
    [c], _ = spool.claim("a", 1)
    spool.settle("a", [Outcome(c.oid, "retry", 0xA700, "out of resources", next_at=0)])
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


def test_identical_resend_after_delivery_is_suppressed_but_a_correction_is_not(spool: Spool) -> None:
    spool.put_many([obj("1.1", data=b"same" * 10)])
    [c], _ = spool.claim("a", 1)
    spool.settle("a", [Outcome(c.oid, "delivered", 0)])
    [dup] = spool.put_many([obj("1.1", data=b"same" * 10)])
    assert dup.suppressed == ("a",) and dup.queued == ()
    [fix] = spool.put_many([obj("1.1", data=b"fixed" * 10)])
    assert fix.queued == ("a",)


def test_unrouted_is_held_and_purge_is_explicit(spool: Spool) -> None:
    [res] = spool.put_many([obj("1.1", ())])
    [st] = [s for s in spool.stats() if s.destination == UNROUTED]
    assert st.pending == 1
    assert spool.purge(UNROUTED, (HELD,), reason="test") == [res.oid]
    assert spool.object_count() == 0
    assert spool.meta(res.oid)["dropped"][UNROUTED][1] == "purged"


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
    assert sorted(m["sop_instance_uid"] for _, m in spool.lookup(study_instance_uid="7.7")) == ["1.1", "1.2"]
    assert len(spool.lookup(patient_id="P1")) == 3


def test_audit_chain_detects_tampering(spool: Spool) -> None:
    spool.put_many([obj("1.1")])
    [c], _ = spool.claim("a", 1)
    spool.settle("a", [Outcome(c.oid, "delivered", 0)])
    spool.audit_record("purge", who="alice", why="duplicate study")
    ok, msg = spool.audit_verify()
    assert ok, msg
    events = list(spool.audit_events())
    assert [e["action"] for e in events] == ["delivered", "purge"]
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
    spool.settle("a", [Outcome(c.oid, "delivered", 0, transcoded="1.2.840.10008.1.2")], now=1003.0)
    counters = spool.counters()
    assert counters["received"] == 1 and counters["delivered:a"] == 1
    assert counters["latency_bucket:a:5.0"] == 1 and counters["transcoded:a"] == 1
    assert counters["received_from:CT1"] == 1


def test_delivery_is_recorded_at_the_destinations_time(spool: Spool) -> None:
    """A sender may record a delivery after a short hold: times come from Outcome.at."""
    [res] = spool.put_many([obj("1.1")], now=1000.0)
    [c], _ = spool.claim("a", 1, now=1000.0)
    spool.settle("a", [Outcome(c.oid, "delivered", 0, at=1000.2)], now=1003.0)
    assert spool.meta(res.oid)["delivered"]["a"][0] == 1000.2
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
    nxt, _ = spool.settle("a", [Outcome(first.oid, "delivered", 0)], claim=2)
    assert spool.env.info()["last_txnid"] == before + 1          # one commit for both
    assert [c.sop_instance_uid for c in nxt] == ["1.1", "1.2"]
    [st] = [s for s in spool.stats(["a"]) if s.destination == "a"]
    assert (st.pending, st.in_flight, st.delivered) == (1, 2, 1)
    spool.set_paused("a", True)                                   # paused: settle only
    assert spool.settle("a", [Outcome(c.oid, "release") for c in nxt], claim=5) == ([], None)
    [st] = [s for s in spool.stats(["a"]) if s.destination == "a"]
    assert (st.pending, st.in_flight) == (3, 0)


def test_content_digest_is_not_taken_on_receive(spool: Spool) -> None:
    """The hash is the sender's job (after delivery); the receive path only takes it to
    compare a re-send with an earlier delivery."""
    data = b"pixels" * 1000
    [res] = spool.put_many([obj("1.1", ("a", "b"), data=data)])
    assert spool.meta(res.oid)["digest"] == ""
    [ca], _ = spool.claim("a", 1)
    assert ca.digest == b""
    digest = content_digest(data)
    spool.settle("a", [Outcome(ca.oid, "delivered", 0, digest=digest)])
    assert spool.meta(res.oid)["digest"] == digest.hex()
    [cb], _ = spool.claim("b", 1)                 # the other sender need not hash again
    assert cb.digest == digest
    spool.settle("b", [Outcome(cb.oid, "delivered", 0, digest=cb.digest)])
    [dup] = spool.put_many([obj("1.1", ("a", "b"), data=data)])
    assert dup.suppressed == ("a", "b") and dup.queued == ()


def test_no_duplicate_window_keeps_no_delivery_digests(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s", map_size=1 << 26, duplicate_window=0)
    try:
        sp.put_many([obj("1.1", data=b"same" * 10)])
        [c], _ = sp.claim("a", 1)
        sp.settle("a", [Outcome(c.oid, "delivered", 0)])
        with sp.env.begin(db=sp._dlv) as txn:
            assert txn.stat(sp._dlv)["entries"] == 0
        [again] = sp.put_many([obj("1.1", data=b"same" * 10)])
        assert again.queued == ("a",) and again.suppressed == ()
    finally:
        sp.close()


def test_sender_commits_skip_only_the_meta_sync(tmp_path: Path) -> None:
    """Listeners answer modalities after their commit: fully synced. Senders' commits keep
    LMDB's integrity (data synced before the meta page) but not the last one's durability."""
    from fastroute.config import loads
    from fastroute.workers import open_spool
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
