"""How long each process waits for LMDB's write lock, and how long it holds it (issue 16).

LMDB lets one writer in at a time: ``env.begin(write=True)`` blocks on the environment's
writer mutex until the previous writer commits, and the commit (its fsync included) is the
end of the turn. Every listener and sender commits into the spool, so the time they spend
waiting for one another is the cost of sharing an environment; this module makes it visible.

``TimedEnv`` wraps an ``lmdb.Environment`` (the one change point per environment):
``begin(write=True)`` is timed around the real ``begin`` (the wait) and from its return to
the end of the ``with`` block, commit or abort included (the hold). Readers pass through
untouched. Totals are per process and per environment label (``shared``; ``shard-N`` for
shards), kept without locks: two ``perf_counter`` calls and three additions per write
transaction, under the GIL, which (in CPython 3.11) cannot switch threads inside a ``+=`` of
floats; a write transaction costs at least a commit's fsync, hundreds of microseconds.

``Publisher`` writes this process's totals to ``<spool>/run/lockstats-<process>.<pid>.json``
every two seconds and at exit (atomic replace, JSON), as the senders publish their state
(:mod:`senderstate`). Stale files: ``/metrics`` shows only the files whose process still runs
(``totals(live_only=True)``), so the totals are those of the current incarnation: a restarted
process starts again from zero, which Prometheus' ``rate()`` takes as a counter reset; during
a reload's listener handover the old and the new ``listener-0`` are summed. A process removes
its dead predecessors' files when it starts (the supervisor: every dead process's), so a
sender removed by a reload leaves no series and the folder does not grow; the bench reads
them all (``live_only=False``) after the router stopped. (A dead process's pid reused by
another process would show its last totals until the name's next start: pids are rarely
reused that soon.)
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import lmdb

log = logging.getLogger("fastroute.spool.lockstats")

PUBLISH_EVERY = 2.0        # seconds between two publications of a process's totals
SHARED = "shared"          # the label of the one environment every process commits into
_PREFIX, _SUFFIX = "lockstats-", ".json"


@dataclass(slots=True)
class WriteLockStats:
    """One process's totals for one environment."""

    wait_s: float = 0.0        # in env.begin(write=True): waiting for the writer mutex
    hold_s: float = 0.0        # from begin's return to the end of commit/abort (fsync included)
    transactions: int = 0


_process = f"pid-{os.getpid()}"
_stats: dict[str, WriteLockStats] = {}


def set_process_name(name: str) -> None:
    """Name this process in the totals (``listener-0``, ``sender-pacs``, ``http``, ...);
    called once at process start, before any write transaction."""
    global _process
    _process = name


def process_name() -> str:
    return _process


def stats_for(label: str) -> WriteLockStats:
    """This process's (live) totals for the environment ``label``."""
    st = _stats.get(label)
    if st is None:
        st = _stats.setdefault(label, WriteLockStats())
    return st


def snapshot() -> dict[str, WriteLockStats]:
    """A copy of this process's totals, by environment label."""
    return {label: WriteLockStats(s.wait_s, s.hold_s, s.transactions) for label, s in list(_stats.items())}


class _TimedWrite:
    """What ``TimedEnv.begin(write=True)`` returns: the write transaction, whose ``with``
    block (or ``commit``/``abort``) ends the hold. ``with ... as txn`` gives the real
    ``lmdb.Transaction``, so the block itself runs at native speed."""

    __slots__ = ("txn", "_stats", "_start", "_open")

    def __init__(self, txn: Any, stats: WriteLockStats, start: float) -> None:
        self.txn, self._stats, self._start, self._open = txn, stats, start, True

    def _done(self) -> None:
        if self._open:
            self._open = False
            st = self._stats
            st.hold_s += time.perf_counter() - self._start
            st.transactions += 1

    def __enter__(self) -> Any:
        return self.txn.__enter__()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.txn.__exit__(exc_type, exc, tb)
        finally:
            self._done()

    def commit(self) -> None:
        try:
            self.txn.commit()
        finally:
            self._done()

    def abort(self) -> None:
        try:
            self.txn.abort()
        finally:
            self._done()

    def __getattr__(self, name: str) -> Any:     # put/get/cursor... used without ``with``
        return getattr(self.txn, name)


class TimedEnv:
    """An ``lmdb.Environment`` whose write transactions are timed (see the module's doc).

    Everything but ``begin`` is the environment's own (``open_db``, ``stat``, ``info``,
    ``close``...). py-lmdb's ``Environment`` cannot be subclassed, hence a wrapper; the
    spool's parts take it where they are typed for an ``lmdb.Environment``."""

    __slots__ = ("env", "label", "_stats")

    def __init__(self, env: Any, label: str = SHARED) -> None:
        self.env = env
        self.label = label
        self._stats = stats_for(label)

    def begin(self, db: Any = None, parent: Any = None, write: bool = False,
              buffers: bool = False) -> Any:
        if not write:
            return self.env.begin(db=db, parent=parent, write=False, buffers=buffers)
        t0 = time.perf_counter()
        txn = self.env.begin(db=db, parent=parent, write=True, buffers=buffers)
        t1 = time.perf_counter()
        self._stats.wait_s += t1 - t0
        return _TimedWrite(txn, self._stats, t1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def __enter__(self) -> TimedEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.env.close()


def timed_open(path: str, label: str = SHARED, **kwargs: Any) -> lmdb.Environment:
    """``lmdb.open(path, **kwargs)`` with its write transactions timed under ``label``.

    Typed as the environment it stands for: the spool's parts only ``begin`` transactions
    (with ``with``) and call the environment's own methods, all of which it forwards."""
    return cast(lmdb.Environment, TimedEnv(lmdb.open(path, **kwargs), label))


# -- publication: one small file per process under <spool>/run ----------------------------------

@dataclass(slots=True)
class ProcessLockStats:
    """What one process published: its totals by environment label."""

    process: str
    pid: int
    started: float
    at: float
    envs: dict[str, WriteLockStats] = field(default_factory=dict)


def stats_path(run: Path, process: str, pid: int | None = None) -> Path:
    return run / f"{_PREFIX}{process}.{os.getpid() if pid is None else pid}{_SUFFIX}"


def write_stats(run: Path, process: str, started: float, envs: dict[str, WriteLockStats]) -> None:
    """Atomically (write + rename), so a reader never sees half a file."""
    path = stats_path(run, process)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"process": process, "pid": os.getpid(), "started": started, "at": time.time(),
                               "envs": {k: asdict(v) for k, v in envs.items()}}))
    os.replace(tmp, path)


def remove_dead(run: Path, process: str | None = None) -> int:
    """Remove the files of processes that are gone (of ``process`` only, if given); how many."""
    removed = 0
    for path in run.glob(f"{_PREFIX}{'*' if process is None else process}.*{_SUFFIX}"):
        stem = path.name[len(_PREFIX):-len(_SUFFIX)]
        name, _, pid = stem.rpartition(".")
        if not pid.isdigit() or (process is not None and name != process):
            continue
        if int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def read_all(run: Path, *, live_only: bool = True) -> list[ProcessLockStats]:
    """Every process's published totals, by process name; with ``live_only`` only those
    whose process still runs. Unreadable files are skipped (a metric never fails a scrape)."""
    out = []
    try:
        paths = sorted(run.glob(f"{_PREFIX}*{_SUFFIX}"))
    except OSError:
        return []
    for path in paths:
        try:
            raw = json.loads(path.read_text())
            envs = {str(k): WriteLockStats(float(v["wait_s"]), float(v["hold_s"]), int(v["transactions"]))
                    for k, v in raw["envs"].items()}
            rec = ProcessLockStats(str(raw["process"]), int(raw["pid"]), float(raw["started"]),
                                   float(raw["at"]), envs)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
        if live_only and rec.pid != os.getpid() and not _alive(rec.pid):
            continue
        out.append(rec)
    return out


def totals(run: Path, *, live_only: bool = True) -> dict[tuple[str, str], WriteLockStats]:
    """(process name, environment label) -> totals, summed over the files of that name (the
    processes of one name alive together: a reload's handover); this process's own live."""
    out: dict[tuple[str, str], WriteLockStats] = {}
    for rec in read_all(run, live_only=live_only):
        envs = snapshot() if rec.pid == os.getpid() else rec.envs
        for env, st in envs.items():
            t = out.setdefault((rec.process, env), WriteLockStats())
            t.wait_s += st.wait_s
            t.hold_s += st.hold_s
            t.transactions += st.transactions
    return dict(sorted(out.items()))


class Publisher:
    """Writes this process's totals every ``every`` seconds (when they changed) and at exit."""

    def __init__(self, run: Path, process: str, every: float = PUBLISH_EVERY) -> None:
        self.run, self.process, self.every = Path(run), process, every
        self.started = time.time()
        self._stop = threading.Event()
        self._last: dict[str, tuple[float, float, int]] | None = None
        self._thread = threading.Thread(target=self._loop, name="fastroute-lockstats", daemon=True)

    def start(self, *, sweep_all: bool = False) -> Publisher:
        """Publish now and every ``every`` seconds; remove the files of this name's dead
        predecessors first (``sweep_all``: of every dead process, for the supervisor)."""
        remove_dead(self.run, None if sweep_all else self.process)
        self.publish(force=True)
        self._thread.start()
        atexit.register(self.close)
        return self

    def publish(self, force: bool = False) -> None:
        envs = snapshot()
        key = {k: (v.wait_s, v.hold_s, v.transactions) for k, v in envs.items()}
        if not force and key == self._last:
            return
        try:
            write_stats(self.run, self.process, self.started, envs)
            self._last = key
        except OSError as exc:       # the run folder removed under us: a metric, never an error
            log.debug("cannot publish write-lock totals to %s: %s", self.run, exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.publish()

    def close(self) -> None:
        """The last totals (idempotent; also run at exit)."""
        self._stop.set()
        self.publish()
        atexit.unregister(self.close)


_publisher: Publisher | None = None


def start_publishing(spool: Path, process: str, *, sweep_all: bool = False) -> Publisher:
    """Name this process and publish its totals under ``<spool>/run``: once per process
    (a second call for another spool or name, as in tests, moves the publication there).
    ``sweep_all`` (the supervisor) removes every dead process's file first."""
    global _publisher
    set_process_name(process)
    run = Path(spool) / "run"
    if _publisher is not None and (_publisher.run, _publisher.process) != (run, process):
        _publisher.close()
        _publisher = None
    if _publisher is None:
        run.mkdir(parents=True, exist_ok=True)
        _publisher = Publisher(run, process).start(sweep_all=sweep_all)
    return _publisher


__all__ = ["TimedEnv", "WriteLockStats", "ProcessLockStats", "Publisher", "SHARED", "PUBLISH_EVERY",
           "set_process_name", "process_name", "stats_for", "snapshot", "stats_path", "write_stats",
           "read_all", "totals", "remove_dead", "start_publishing", "timed_open"]
