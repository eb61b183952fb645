"""Disk space: the free-space floor checked before a write, and preallocation of the spool file."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import lmdb

from fastroute.errors import SpoolFullError

_PREALLOC = b"~prealloc:"


class SpaceGuard:
    """Refuses objects before they are written when the spool's disk is below its floor.

    Free room is the disk's free space plus the spool file's pages LMDB can reuse
    (``reusable``): the file never shrinks, so once a backlog has drained the disk alone would
    stay below the floor forever although new objects fit in the file without growing it."""

    def __init__(self, path: Path, min_free_bytes: int, reusable: Callable[[], int] | None = None) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._reusable = reusable
        self.interval = 0.1          # seconds a fine answer is reused (the receive path asks)
        self._checked = 0.0
        self._ok = True

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def check(self, incoming_bytes: int) -> None:
        """Raise SpoolFullError below the floor (statvfs at most every 100 ms while fine).

        Reusable pages are counted only when the disk alone is below the floor (reading
        them takes a read transaction), so the common case stays one statvfs per 100 ms."""
        if self.min_free_bytes <= 0:
            return
        now = time.monotonic()
        if now - self._checked > self.interval or not self._ok:
            free = self.free_bytes() - incoming_bytes
            if free < self.min_free_bytes and self._reusable is not None:
                free += self._reusable()
            self._ok = free >= self.min_free_bytes
            self._checked = now
        if not self._ok:
            raise SpoolFullError(
                f"disk holding the spool {self.path} is below its free-space floor "
                f"({self.min_free_bytes} bytes, counting the spool's reusable pages)")

    def usage(self, env: lmdb.Environment) -> dict[str, int]:
        info = env.info()
        stat = env.stat()
        return {
            "map_size": info["map_size"],
            "used_bytes": (info["last_pgno"] + 1) * stat["psize"],
            "disk_free_bytes": self.free_bytes(),
            "disk_total_bytes": shutil.disk_usage(self.path).total,
        }


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def space_warnings(path: Path, min_free_bytes: int, max_bytes: int) -> list[str]:
    """Limits the spool's disk cannot honour (said at start and by ``fastroute check``): a
    floor above the disk's size refuses every object; a map larger than the disk can hold
    ends in ENOSPC, not in the orderly 0xA700 of a full spool."""
    disk = shutil.disk_usage(_existing(path))
    data = path / "data.mdb"
    size = data.stat().st_size if data.exists() else 0
    out = []
    if min_free_bytes > disk.total:
        out.append(f"min_free_bytes ({min_free_bytes} bytes) exceeds the size of the disk holding the "
                   f"spool {path} ({disk.total} bytes): every object will be refused (0xA700)")
    if max_bytes > disk.free + size:
        out.append(f"spool_max_bytes ({max_bytes} bytes) exceeds the free disk plus the spool file "
                   f"({disk.free} + {size} bytes) at {path}: the disk can fill before the spool does")
    return out


def _pages(stat: Any) -> int:     # lmdb stat dict
    return int(stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"])


def reusable_bytes(env: lmdb.Environment, dbs: Iterable[Any]) -> int:
    """Bytes of the spool file that hold no live page: LMDB reuses them without growing it."""
    psize = int(env.stat()["psize"])
    used = 2 + _pages(env.stat())            # two meta pages + the main DB
    with env.begin() as txn:
        for db in dbs:
            used += _pages(txn.stat(db))
    return max(0, int(env.info()["last_pgno"]) + 1 - used) * psize


def live_bytes(env: lmdb.Environment, dbs: Iterable[Any]) -> int:
    """Bytes of an environment's file that hold live pages (what ``spool_max_bytes`` counts:
    free pages are reused in place, so a drained spool is empty again)."""
    psize = int(env.stat()["psize"])
    used = 2 + _pages(env.stat())
    with env.begin() as txn:
        for db in dbs:
            used += _pages(txn.stat(db))
    return used * psize


class SpoolBudget:
    """``spool_max_bytes`` across the shared file and every shard.

    Each environment's map is ``spool_max_bytes`` (a sparse reservation), so without this a
    sharded spool could hold up to (listeners + 1) times it. The live pages of all of them are
    summed at most every ``interval`` seconds while there is room (a few ``stat`` calls per
    environment) and on every object once it is within ``interval``'s worth of the limit."""

    def __init__(self, max_bytes: int, envs: Callable[[], Iterable[tuple[lmdb.Environment, Iterable[Any]]]],
                 where: str, interval: float = 0.1) -> None:
        self.max_bytes = max_bytes
        self._envs = envs
        self.where = where
        self.interval = interval
        self._checked = -1e9
        self._used = 0

    def used(self) -> int:
        return sum(live_bytes(env, dbs) for env, dbs in self._envs())

    def check(self, incoming_bytes: int) -> None:
        now = time.monotonic()
        if now - self._checked > self.interval or self._used + incoming_bytes > self.max_bytes * 0.95:
            self._used = self.used()
            self._checked = now
        else:
            self._used += incoming_bytes        # until the next reading
        if self._used + incoming_bytes > self.max_bytes:
            raise SpoolFullError(
                f"spool {self.where} is full (spool_max_bytes reached: {self._used} of {self.max_bytes} bytes "
                f"live across the shared file and its shards)")


def prealloc_split(total: int, listeners: int, sharded: bool) -> tuple[int, int]:
    """``spool_prealloc`` shared out: (bytes for the shared file, bytes for each listener's
    shard). With shards the objects' bytes go to the shards and the shared file holds only
    records (about 2 kB an object against 0.5 MB of CT bytes): it gets an eighth."""
    if not sharded or total <= 0:
        return total, 0
    shared = total // 8
    return shared, (total - shared) // max(1, listeners)


def _keys(txn: lmdb.Transaction, prefix: bytes) -> Iterator[bytes]:
    cur = txn.cursor()
    if cur.set_range(prefix):
        for key in cur.iternext(keys=True, values=False):
            key = bytes(key)
            if not key.startswith(prefix):
                break
            yield key


def preallocate(env: lmdb.Environment, info_db: Any, dbs: Iterable[Any], guard: SpaceGuard,
                nbytes: int, chunk: int = 4 * 1024**2) -> int:
    """Write zeros into the spool file until ``nbytes`` of it are free for reuse; return
    the bytes added.

    Growing the file is the expensive part of a commit on ext4 (measured here): fdatasync
    must then journal the new blocks, and a 0.5 MB object's commit took 1.5 ms instead of
    0.4 ms (fallocate does not help: its unwritten extents are converted at the same
    cost). So a new spool is grown once, up front, through LMDB itself (zero-filled
    values put, then deleted, leaving their pages on LMDB's free list), and the disk
    space is taken before the first object is accepted. The map size and the free-space
    floor still bound it."""
    dbs = list(dbs)
    with env.begin(write=True, db=info_db) as txn:   # left by a crash in between
        for key in list(_keys(txn, _PREALLOC)):
            txn.delete(key)
    missing = nbytes - reusable_bytes(env, dbs)
    room = guard.free_bytes() - guard.min_free_bytes - chunk
    missing = min(missing, room, env.info()["map_size"] // 2)
    if missing <= 0:
        return 0
    keys = [_PREALLOC + b"%08d" % i for i in range(-(-missing // chunk))]
    zeros = bytes(chunk)
    try:
        with env.begin(write=True, db=info_db) as txn:
            for key in keys:
                txn.put(key, zeros)
    except lmdb.MapFullError:
        return 0                               # aborted whole: nothing was written
    with env.begin(write=True, db=info_db) as txn:
        for key in keys:
            txn.delete(key)
    return len(keys) * chunk


__all__ = ["SpaceGuard", "SpoolBudget", "live_bytes", "prealloc_split", "reusable_bytes", "preallocate",
           "space_warnings"]
