"""The receive journal (issue 16): a listener's commit goes into its own shard only (bytes and
journal entries) and is answered then; the records are applied to the shared environment by
the applier, after a crash by the shard's next owner or the supervisor, exactly once."""
from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from fastroute.errors import SpoolError, SpoolFullError
from fastroute.spool import Incoming, Spool
from fastroute.spool import lockstats
from fastroute.spool.commit import Committer
from fastroute.spool.commitments import InstanceState
from fastroute.spool.journal import Journaled, decode_entry, encode_entry
from fastroute.spool.shards import Location
from test_spool_shards import drain

TS = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MAP = 256 * 1024**2


def obj(uid: str, size: int = 3000, dests: tuple[str, ...] = ("a",)) -> Incoming:
    data = (uid.encode() * (size // len(uid) + 1))[:size]
    return Incoming(data, TS, CT, uid, dests, {"study_instance_uid": "9.9", "calling_ae": "CT1",
                                                "patient_id": "P1"})


def records(sp: Spool) -> int:
    with sp.env.begin() as txn:
        return int(txn.stat(sp._dbs["meta"])["entries"])


def _journal_and_die(path: str, shard: int, uids: list[str]) -> None:
    """A listener that acknowledged ``uids`` (journalled) and died before applying them."""
    sp = Spool(path, map_size=MAP)
    sp.own_shard(shard)
    done = sp.journal([obj(u) for u in uids])
    assert all(isinstance(d, Journaled) for d in done)
    os._exit(0)


def _crashed(path: Path, shard: int, uids: list[str]) -> None:
    Spool(path, map_size=MAP).close()
    p = multiprocessing.get_context("spawn").Process(target=_journal_and_die, args=(str(path), shard, uids))
    p.start()
    p.join(60)
    assert p.exitcode == 0


def test_the_receive_commit_writes_only_into_the_shard(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", map_size=MAP, shard=0)
    try:
        before = {k: v.transactions for k, v in lockstats.snapshot().items()}
        done = sp.journal([obj("1.1"), obj("1.2", 600_000)])
        after = {k: v.transactions for k, v in lockstats.snapshot().items()}
        # one write transaction, in the shard: no turn at the shared environment's write lock
        assert after.get(lockstats.SHARED, 0) == before.get(lockstats.SHARED, 0)
        assert after["shard-0"] == before.get("shard-0", 0) + 1
        assert all(isinstance(d, Journaled) for d in done)
        assert records(sp) == 0 and sp.stats(["a"])[0].pending == 0      # not queued yet
        results = sp.apply([d for d in done if isinstance(d, Journaled)])
        assert [r.oid for r in results] == [1, 2] and all(r.queued == ("a",) for r in results)
        rec = sp.record(1)
        assert rec is not None and rec.extra["loc"] == [0, 1]
        assert sp.stats(["a"])[0].pending == 2
        assert drain(sp) == {"1.1": obj("1.1").data, "1.2": obj("1.2", 600_000).data}
    finally:
        sp.close()


def test_a_journal_entry_round_trips_everything_but_the_bytes() -> None:
    item = obj("2.1", dests=("a", "b"))
    got = decode_entry(encode_entry(item, 1234.5), item.data, Location(3, 7))
    assert got == Journaled(Location(3, 7), item, 1234.5)


def test_acknowledged_objects_of_a_crashed_listener_are_queued_once_by_the_next_owner(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    uids = [f"3.{i}" for i in range(5)]
    _crashed(path, 0, uids)
    sp = Spool(path, map_size=MAP)
    try:
        assert records(sp) == 0
        assert sp.unapplied_sop_instance_uids() == set(uids)
        sp.own_shard(0)                               # the restarted listener
        assert records(sp) == 5 and sp.unapplied_sop_instance_uids() == set()
        assert [r.sop_instance_uid for _, r in sp.lookup(patient_id="P1")] == uids   # in arrival order
    finally:
        sp.close()
    again = Spool(path, map_size=MAP, shard=0)        # owning it again applies nothing twice
    try:
        assert records(again) == 5
        [res] = again.put_many([obj("3.new")])        # new keys follow the journalled ones
        assert not isinstance(res, BaseException) and res.loc == Location(0, 6)
        assert drain(again) == {u: obj(u).data for u in [*uids, "3.new"]}
    finally:
        again.close()


def test_the_supervisors_pass_applies_the_journal_of_a_shard_no_listener_owns(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    _crashed(path, 2, ["4.1", "4.2"])
    sup = Spool(path, map_size=MAP)
    try:
        assert sup.collect_unowned() == 1
        assert records(sup) == 2 and sup.stats(["a"])[0].pending == 2
        assert sup.collect_unowned() == 1 and records(sup) == 2
    finally:
        sup.close()


def test_the_committer_answers_from_the_journal_and_the_applier_queues(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", map_size=MAP, shard=0)
    woken: list[str] = []

    class Notified:
        def notify(self, dest: str) -> None:
            woken.append(dest)

        def close(self) -> None:
            pass

    committer = Committer(sp, Notified())  # type: ignore[arg-type]
    try:
        res = committer.submit(obj("5.1"))
        assert res.oid == 0 and res.loc == Location(0, 1) and res.queued == ("a",)
        assert committer.wait_applied(10)
        assert records(sp) == 1 and sp.stats(["a"])[0].pending == 1
        assert woken == ["a"]
        futs = [committer.submit_nowait(obj(f"5.{i}")) for i in range(2, 40)]
        assert all(f.result(10).oid == 0 for f in futs)
    finally:
        committer.close()                 # applies what is still waiting
    try:
        assert records(sp) == 39
    finally:
        sp.close()


def test_an_apply_that_fails_is_retried_and_loses_nothing(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    sp = Spool(tmp_path / "spool", map_size=MAP, shard=0)
    real = sp.apply
    fails = [SpoolFullError("spool full (test)"), SpoolError("disk error (test)")]

    def flaky(done: list[Journaled], now: float | None = None) -> list:  # type: ignore[type-arg]
        if fails:
            raise fails.pop(0)
        return real(done, now)

    sp.apply = flaky  # type: ignore[method-assign]
    committer = Committer(sp, None)
    try:
        assert committer.submit(obj("6.1")).oid == 0       # acknowledged: durable in the shard
        assert committer.wait_applied(10)
        assert committer.applier is not None and committer.applier.failures == 2
        assert records(sp) == 1
        assert "durable in the shard, retried" in caplog.text
    finally:
        committer.close()
        sp.close()


def test_put_many_takes_back_a_group_whose_records_fail(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", map_size=MAP, shard=0)
    try:
        def broken(done: list[Journaled], now: float | None = None) -> list:  # type: ignore[type-arg]
            raise SpoolError("disk error (test)")
        sp.apply = broken  # type: ignore[method-assign]
        results = sp.put_many([obj("7.1"), obj("7.2")])
        assert all(isinstance(r, SpoolError) for r in results)
        shard = sp.shards.owner
        assert shard is not None and shard.entries() == 0
        with shard.env.begin() as txn:
            assert txn.stat(shard.dbs["log"])["entries"] == 0
    finally:
        sp.close()


def test_a_storage_commitment_never_calls_an_acknowledged_object_unknown(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", map_size=MAP, shard=0)
    try:
        done = sp.journal([obj("8.1")])
        states = sp.modality_requests.states(["8.1", "8.404"], "spooled")
        assert states == {"8.1": InstanceState.WAITING, "8.404": InstanceState.UNKNOWN}
        sp.apply([d for d in done if isinstance(d, Journaled)])
        assert sp.modality_requests.states(["8.1"], "spooled") == {"8.1": InstanceState.DONE}
    finally:
        sp.close()


def test_two_processes_journal_at_once_into_their_own_shards(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    Spool(path, map_size=MAP).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_journal_and_die, args=(str(path), i, [f"9.{i}.{j}" for j in range(20)]))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    sup = Spool(path, map_size=MAP)
    try:
        assert sup.collect_unowned() == 2 and records(sup) == 40
        assert len(drain(sup)) == 40
    finally:
        sup.close()


def test_the_commit_thread_never_writes_into_the_shared_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Journal mode: only the applier thread takes turns at the shared write lock."""
    sp = Spool(tmp_path / "spool", map_size=MAP, shard=0)
    seen: set[str] = set()
    real_begin = lockstats.TimedEnv.begin

    def begin(self: lockstats.TimedEnv, *args: object, **kwargs: object) -> object:
        if kwargs.get("write") and self.label == lockstats.SHARED:
            seen.add(threading.current_thread().name)
        return real_begin(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lockstats.TimedEnv, "begin", begin)
    committer = Committer(sp, None)
    try:
        for i in range(20):
            committer.submit(obj(f"10.{i}"))
        assert committer.wait_applied(10)
    finally:
        committer.close()
        sp.close()
    assert "fastroute-committer" not in seen and "fastroute-applier" in seen


def _fill(path: str, limit: int, n: int) -> None:
    """Another listener: ``n`` MiB into shard 0, then gone (its bytes stay)."""
    sp = Spool(path, map_size=limit, shard=0)
    for i in range(n):
        [res] = sp.put_many([obj(f"11.0.{i}", 1024**2)])
        assert not isinstance(res, BaseException), res
    sp.close()


def test_spool_max_bytes_bounds_the_shared_file_and_every_shard_together(tmp_path: Path) -> None:
    """Each environment's map is spool_max_bytes; the limit is their sum of live pages."""
    path = tmp_path / "spool"
    limit = 24 * 1024**2
    Spool(path, map_size=limit).close()
    p = multiprocessing.get_context("spawn").Process(target=_fill, args=(str(path), limit, 14))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    two = Spool(path, map_size=limit, shard=1)
    try:
        two.budget.interval = 0.0
        refused = None
        for i in range(24):                      # shard 1 alone would take 24 MiB
            [res] = two.put_many([obj(f"11.1.{i}", 1024**2)])
            if isinstance(res, BaseException):
                refused = (i, res)
                break
        assert refused is not None and isinstance(refused[1], SpoolFullError)
        assert 5 <= refused[0] <= 10, refused    # what was left of the 24 MiB, not 24
        assert "spool_max_bytes" in str(refused[1])
        assert len(drain(two)) == 14 + refused[0]
        two.collect_unowned()                    # shard 0's delivered bytes deleted: room again
        two.collect_garbage(force=True)
        [res] = two.put_many([obj("11.1.again", 1024**2)])
        assert not isinstance(res, BaseException), res
    finally:
        two.close()


def test_spool_prealloc_is_shared_out_between_the_shared_file_and_the_shards() -> None:
    from fastroute.spool.space import prealloc_split
    assert prealloc_split(8 * 1024**3, 4, True) == (1024**3, 7 * 1024**3 // 4)
    assert prealloc_split(8 * 1024**3, 4, False) == (8 * 1024**3, 0)
    assert prealloc_split(0, 2, True) == (0, 0)


def test_metrics_show_what_is_acknowledged_and_not_yet_queued(tmp_path: Path) -> None:
    from fastroute.config import loads
    from fastroute.ops.metrics import make_registry, render
    from test_metrics import scrape, value

    cfg = loads(f"spool: {tmp_path / 'spool'}\ndestinations: {{a: {{ae_title: PACS, host: 127.0.0.1, "
                f"port: 11112}}}}\nrules: []\ndefault: [a]\n")
    sp = Spool(cfg.spool, map_size=MAP, shard=0)
    try:
        done = sp.journal([obj("12.1"), obj("12.2")], now=1000.0)
        assert sp.journal_backlog(now=1030.0) == {0: (2, 30.0)}
        s = scrape(render(make_registry(cfg, sp)).decode())
        assert value(s, "fastroute_spool_journal_unapplied_objects", shard="0") == 2
        assert value(s, "fastroute_spool_journal_oldest_unapplied_seconds", shard="0") > 60
        sp.apply([d for d in done if isinstance(d, Journaled)])
        s = scrape(render(make_registry(cfg, sp)).decode())
        assert value(s, "fastroute_spool_journal_unapplied_objects", shard="0") == 0
        assert value(s, "fastroute_spool_journal_oldest_unapplied_seconds", shard="0") == 0
    finally:
        sp.close()


def test_an_object_that_cannot_be_queued_is_kept_unrouted_and_the_rest_go_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bug that fails one object's records (not the spool) must not hold up the journal."""
    sp = Spool(tmp_path / "spool", map_size=MAP, shard=0)
    real_put = sp.queues.put

    def put(txn: object, item: Incoming, now: float, loc: object = None) -> object:
        if item.sop_instance_uid == "13.2" and item.destinations:
            raise ValueError("a rule produced something the record cannot hold (test)")
        return real_put(txn, item, now, loc)  # type: ignore[arg-type]

    sp.queues.put = put  # type: ignore[method-assign,assignment]
    committer = Committer(sp, None)
    try:
        for i in range(1, 5):
            committer.submit(obj(f"13.{i}"))
        assert committer.wait_applied(10)
        assert records(sp) == 4
        stats = {q.destination: q for q in sp.stats(["a"])}
        assert stats["a"].pending == 3 and stats["~unrouted"].pending == 1
        [(oid, rec)] = [(o, r) for o, r in sp.lookup(patient_id="P1") if r.sop_instance_uid == "13.2"]
        assert "ValueError" in rec.extra["apply_error"]
        assert sp.read(oid) == obj("13.2").data                 # its bytes are kept
        assert "could not be queued" in caplog.text
    finally:
        committer.close()
        sp.close()
