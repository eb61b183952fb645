"""Write-lock wait and hold times per process (issue 16 item 2): measured by the spool's
``TimedEnv``, published under ``<spool>/run``, exposed on ``/metrics``."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest

import synth
from peers import free_port, storescu, wait_until
from router import Router, destination
from test_metrics import _get, scrape, series, value

from fastroute.spool import Spool, lockstats
from fastroute.spool.lockstats import TimedEnv, WriteLockStats

HOLD = 0.3    # seconds the other process keeps the write lock (a lower bound the test controls)


def _open(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), map_size=64 * 1024**2, max_dbs=4, sync=True)


def _hold_write_lock(path: str, held: Any, release: Any, out: Any) -> None:
    """Child: take the write lock, say so, keep it until told, then report its own totals."""
    env = TimedEnv(_open(Path(path)), "shared")
    with env.begin(write=True) as txn:
        held.set()
        txn.put(b"k", b"child")
        release.wait(60)
    st = lockstats.stats_for("shared")
    out.put((st.wait_s, st.hold_s, st.transactions))
    env.close()


def test_waiting_for_another_process_holding_the_write_lock_is_counted(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    _open(tmp_path).close()
    held, release, out = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_hold_write_lock, args=(str(tmp_path), held, release, out))
    child.start()
    env = TimedEnv(_open(tmp_path), "test-wait")
    try:
        assert held.wait(60), "the child never took the write lock"
        with env.begin() as txn:                 # a reader does not wait, and is not counted
            assert txn.get(b"k") is None
        assert lockstats.stats_for("test-wait") == WriteLockStats()
        timer = threading.Timer(HOLD, release.set)   # the child's hold: at least HOLD from here
        start = time.perf_counter()
        timer.start()
        with env.begin(write=True) as txn:       # blocks until the child commits
            assert txn.get(b"k") == b"child"
            txn.put(b"k", b"parent")
        elapsed = time.perf_counter() - start
        child_wait, child_hold, child_n = out.get(timeout=60)
    finally:
        release.set()
        child.join(60)
        env.close()
    mine = lockstats.stats_for("test-wait")
    assert mine.transactions == 1
    assert 0 < mine.wait_s <= elapsed
    # the wait ended when the child committed, at least HOLD after the timer started (the
    # few microseconds from starting the timer to calling begin are the only slack)
    assert mine.wait_s >= HOLD - 0.05, mine
    assert 0 < mine.hold_s < elapsed
    assert child_n == 1 and child_wait >= 0
    assert child_hold >= HOLD                    # it held the lock from before the timer started


def test_an_aborted_write_and_a_commit_without_with_are_counted(tmp_path: Path) -> None:
    env = TimedEnv(_open(tmp_path), "test-abort")
    try:
        with pytest.raises(KeyError):
            with env.begin(write=True) as txn:
                txn.put(b"a", b"1")
                raise KeyError("aborts")
        txn2 = env.begin(write=True)
        txn2.put(b"b", b"2")
        txn2.commit()
        with env.begin() as txn:
            assert txn.get(b"a") is None and txn.get(b"b") == b"2"
    finally:
        env.close()
    st = lockstats.stats_for("test-abort")
    assert st.transactions == 2 and st.hold_s > 0


def test_every_spool_write_is_timed(tmp_path: Path) -> None:
    """The Spool's environment is timed: its commits add to this process's ``shared`` totals."""
    before = lockstats.snapshot().get(lockstats.SHARED, WriteLockStats())
    spool = Spool(tmp_path / "spool")
    try:
        spool.set_paused("pacs", True)
        spool.set_paused("pacs", False)
        assert not spool.is_paused("pacs")
    finally:
        spool.close()
    after = lockstats.stats_for(lockstats.SHARED)
    assert after.transactions >= before.transactions + 2
    assert after.hold_s > before.hold_s


def _publish_and_exit(spool: str) -> None:
    lockstats.start_publishing(Path(spool), "listener-7")
    env = TimedEnv(_open(Path(spool) / "env"), "shard-7")
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()          # no explicit publish: the totals are written at exit


def test_totals_are_published_at_exit_and_a_dead_processes_file_is_not_live(tmp_path: Path) -> None:
    (tmp_path / "env").mkdir()
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_publish_and_exit, args=(str(tmp_path),))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    path = lockstats.stats_path(tmp_path / "run", "listener-7", child.pid)
    assert path.exists()
    [rec] = lockstats.read_all(tmp_path / "run", live_only=False)
    assert rec.process == "listener-7" and rec.pid == child.pid
    assert rec.envs["shard-7"].transactions == 1 and rec.envs["shard-7"].hold_s > 0
    assert lockstats.read_all(tmp_path / "run") == []     # its process is gone
    (tmp_path / "run" / "lockstats-broken.json").write_text("{not json")
    assert len(lockstats.read_all(tmp_path / "run", live_only=False)) == 1
    # the next listener-7 removes its dead predecessor's file; another name's stays
    other = lockstats.stats_path(tmp_path / "run", "sender-pacs", child.pid)
    other.write_text(path.read_text().replace("listener-7", "sender-pacs"))
    pub = lockstats.Publisher(tmp_path / "run", "listener-7").start()
    pub.close()
    assert not path.exists() and other.exists()
    assert lockstats.stats_path(tmp_path / "run", "listener-7").exists()     # this process's
    lockstats.Publisher(tmp_path / "run", "supervisor").start(sweep_all=True).close()
    assert not other.exists()


def _fake(run: Path, process: str, pid: int, **envs: WriteLockStats) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lockstats.stats_path(run, process, pid).write_text(json.dumps({
        "process": process, "pid": pid, "started": 0.0, "at": 0.0,
        "envs": {k: {"wait_s": v.wait_s, "hold_s": v.hold_s, "transactions": v.transactions}
                 for k, v in envs.items()}}))


def test_totals_sum_live_processes_of_one_name_and_leave_out_dead_ones(tmp_path: Path) -> None:
    """A reload's handover: the old and the new listener-0 both run for a while."""
    run = tmp_path / "run"
    dead = mp.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    _fake(run, "listener-0", os.getppid(), shared=WriteLockStats(1.0, 2.0, 3))     # a live process
    _fake(run, "listener-0", 1, **{"shared": WriteLockStats(0.5, 0.5, 1), "shard-0": WriteLockStats(0, 1, 1)})
    _fake(run, "listener-0", dead.pid, shared=WriteLockStats(100, 100, 100))
    t = lockstats.totals(run)
    assert t[("listener-0", "shared")] == WriteLockStats(1.5, 2.5, 4)
    assert t[("listener-0", "shard-0")] == WriteLockStats(0, 1, 1)
    assert lockstats.totals(run, live_only=False)[("listener-0", "shared")] == WriteLockStats(101.5, 102.5, 104)


@pytest.mark.peers
def test_metrics_of_a_running_router_show_the_listener_and_sender_lock_times(
        tmp_path: Path, dcmtk: Any, storescp: Any) -> None:
    pacs = storescp("PACS")
    http_port = free_port()
    files = synth.make_tiny(tmp_path / "t", n=4)
    r = Router(tmp_path / "router", {"destinations": {"pacs": destination(pacs.port, "PACS")},
                                     "default": ["pacs"], "http": {"host": "127.0.0.1", "port": http_port}})
    url = f"http://127.0.0.1:{http_port}/metrics"
    try:
        r.start()
        assert storescu(r.port, files).returncode == 0
        pacs.wait_for(4)

        def published() -> dict[str, Any] | None:
            try:
                s = scrape(_get(url))
            except OSError:
                return None
            n = "fastroute_spool_write_transactions_total"
            ok = (value(s, n, process="listener-0", env="shared") >= 1
                  and value(s, n, process="sender-pacs", env="shared") >= 1)
            return s if ok else None
        s = wait_until(published, 30, message=lambda: f"no lock series:\n{_get(url)}\n{r.log_tail()}")
    finally:
        r.stop()
    assert s is not None
    for name in ("fastroute_spool_write_lock_wait_seconds_total", "fastroute_spool_write_lock_hold_seconds_total"):
        procs = {x["process"] for x in series(s, name, env="shared")}
        assert {"listener-0", "sender-pacs", "supervisor"} <= procs, procs
    assert value(s, "fastroute_spool_write_lock_hold_seconds_total", process="listener-0") > 0
    assert value(s, "fastroute_spool_write_lock_wait_seconds_total", process="sender-pacs") >= 0
    # every process published one file, named by its role, under the run folder
    names = {rec.process for rec in lockstats.read_all(r.spool_path / "run", live_only=False)}
    assert {"listener-0", "sender-pacs", "http", "supervisor"} <= names
    assert len(list((r.spool_path / "run").glob("lockstats-listener-0.*.json"))) == 1
