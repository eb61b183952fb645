"""Byte shards: each listener process writes object bytes into an LMDB environment of its own.

LMDB lets one writer in at a time, and on a CT workload the expensive part of a receive commit
is the object's bytes (0.5 MB each: page allocation, copying, dirty pages, fsync), not its
records. Measured on a 2-core machine, four writer processes committing 0.5 MB values into
one environment reached 742 obj/s, into one environment each 2,916 obj/s (issue 16). So a
listener that owns a shard commits a group in two transactions:

1. the group's bytes into its shard ``<spool>/shards/<n>/`` (synced), each under a shard-local
   key from the shard's own sequence (a staged large object: its manifest, its chunks having
   been staged into the shard as they arrived);
2. the records into the shared environment (synced), exactly as without shards; the routing
   record says where the bytes are (``loc``: shard, key, see :class:`Location`), and the
   shared ``shard`` db keeps per shard the highest key linked so far.

The C-STOREs are answered only after (2). A crash between (1) and (2) leaves bytes above the
linked high-water mark: never acknowledged, deleted when the shard is next owned (``recover``).

Deletes: the last settle of an object must not write into a listener's shard (that would
put every sender back on the listeners' write locks), so it records ``gc[shard, key]`` in the
shared environment, in the settle's own transaction; the shard's owner deletes those bytes
in batches (its committer thread, about once a second, or at start) in two transactions:
bytes from the shard, then the ``gc`` entries (a crash in between re-deletes harmlessly).

Ownership is an exclusive ``flock`` on ``<spool>/shards/<n>.lock``: the kernel releases it
when the process dies, so a shard whose listener crashed is free to be taken. A listener
takes the lowest free shard number, so listeners overlapping during a reload never share a
shard. A shard left without an owner (fewer listeners after a reload) is recovered and
collected by the supervisor's housekeeping (``collect_unowned``) and by any later owner.

Readers in any process open a shard's environment for reading on first use (cached: LMDB
forbids opening one environment twice in a process). Objects written without shards (no
``loc``) are read from the shared ``obj``/``objc`` dbs as before, so a spool written by the
one-environment layout opens and drains.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lmdb

from fastroute.errors import SpoolError
from fastroute.spool.lockstats import timed_open
from fastroute.spool.staging import (ChunkedView, Manifest, StagedData, digest_parts, owner_alive,
                                      stored_view)

SHARDS_DIR = "shards"
GC_BATCH = 4096                 # gc entries one collection pass deletes at most
# info: preallocation's scratch keys; log: the journal (an object's records until applied,
# under its bytes' key, see :mod:`journal`)
_DB_NAMES = ("obj", "objc", "chunk", "stage", "info", "log")
_U64 = struct.Struct(">Q")
_SHARD = struct.Struct(">I")
_GC = struct.Struct(">IQ")      # shard, key
_LOC_RE = re.compile(rb'"loc":\[(\d+),(\d+)\]')


@dataclass(frozen=True, slots=True)
class Location:
    """Where an object's bytes are: a shard and its key there (``loc`` in the routing record)."""

    shard: int
    key: int

    def to_json(self) -> list[int]:
        return [self.shard, self.key]

    @property
    def gc_key(self) -> bytes:
        return _GC.pack(self.shard, self.key)


def location_of(raw: bytes | memoryview | None) -> Location | None:
    """The ``loc`` of an encoded routing record, without decoding the rest; None: the bytes
    are in the shared environment (or the record predates shards)."""
    if raw is None:
        return None
    m = _LOC_RE.search(bytes(raw))
    return Location(int(m.group(1)), int(m.group(2))) if m else None


def hw_key(shard: int) -> bytes:
    """The shared ``shard`` db's key for a shard's highest linked key."""
    return _SHARD.pack(shard)


def split_gc_key(raw: bytes) -> Location:
    shard, key = _GC.unpack(raw)
    return Location(shard, key)


class Shard:
    """One shard environment as opened by this process (for reading, or as its owner)."""

    def __init__(self, root: Path, index: int, map_size: int, *, create: bool) -> None:
        self.index = index
        self.path = root / str(index)
        if not create and not (self.path / "data.mdb").exists():
            raise SpoolError(f"spool shard {self.path} is missing",
                             hint="the spool's shards/ folder must be kept with the spool")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.env = timed_open(str(self.path), f"shard-{index}", map_size=map_size, max_dbs=8,
                                  max_readers=1024, subdir=True, lock=True, sync=True, metasync=True,
                                  readahead=False, meminit=False)
        except lmdb.Error as exc:
            raise SpoolError(f"cannot open spool shard {self.path}: {exc}") from exc
        self.dbs = {name: self.env.open_db(name.encode()) for name in _DB_NAMES}
        self._lock_fd = -1
        self._next = 0
        self.stage_owner = b"\x00" * 12     # this process's staging owner, once it staged

    # -- ownership ------------------------------------------------------------------------------

    @property
    def owned(self) -> bool:
        return self._lock_fd >= 0

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)        # drops the flock
            self._lock_fd = -1

    def close(self) -> None:
        self.release()
        self.env.close()

    # -- the owner's writes ---------------------------------------------------------------------

    def write(self, items: Sequence[Any], journal: Sequence[bytes] | None = None) -> list[Location]:
        """Commit the bytes of ``items`` (bytes, or StagedData already staged here) in one synced
        transaction, with each one's ``journal`` entry (its records, until applied) when given;
        their locations, in order."""
        obj, objc, stage, log_db = self.dbs["obj"], self.dbs["objc"], self.dbs["stage"], self.dbs["log"]
        out = []
        with self.env.begin(write=True) as txn:
            seq = self._next
            for n, data in enumerate(items):
                seq += 1
                key = _U64.pack(seq)
                if isinstance(data, StagedData):
                    txn.put(key, data.manifest.encode(), db=objc)
                    txn.delete(data.sid, db=stage)     # the chunks now belong to this key
                else:
                    txn.put(key, data, db=obj, append=True)
                if journal is not None:
                    txn.put(key, journal[n], db=log_db, append=True)
                out.append(Location(self.index, seq))
        self._next = seq
        return out

    def journal_after(self, linked: int, limit: int = 1 << 30) -> list[tuple[int, bytes]]:
        """The journal entries above ``linked`` (written and acknowledged, not yet applied to
        the shared records), in order: (key, entry)."""
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs["log"])
            if cur.set_range(_U64.pack(linked + 1)):
                for k, v in cur:
                    out.append((_U64.unpack(k)[0], bytes(v)))
                    if len(out) >= limit:
                        break
        return out

    def data_at(self, key: int) -> bytes | StagedData | None:
        """An object's bytes as :meth:`write` took them (bytes, or a chunked one's StagedData):
        what replaying its journal entry needs. None when gone."""
        k = _U64.pack(key)
        with self.env.begin() as txn:
            raw = txn.get(k, db=self.dbs["obj"])
            if raw is not None:
                return bytes(raw)
            raw = txn.get(k, db=self.dbs["objc"])
        if raw is None:
            return None
        m = Manifest.decode(raw)
        return StagedData(m.sid, m.size, m.chunks)

    def stage_chunk(self, sid: bytes, chunk: bytes, data: Any, owner: bytes) -> None:
        self.stage_owner = owner
        with self.env.begin(write=True) as txn:
            txn.put(sid, owner, db=self.dbs["stage"])
            txn.put(chunk, data, db=self.dbs["chunk"])

    def discard_staged(self, sid: bytes, keys: Iterator[bytes]) -> int:
        with self.env.begin(write=True) as txn:
            n = sum(1 for k in keys if txn.delete(k, db=self.dbs["chunk"]))
            txn.delete(sid, db=self.dbs["stage"])
        return n

    def unwrite(self, locs: Sequence[Location]) -> None:
        """Undo :meth:`write` for objects whose records were not committed: small objects'
        bytes go; a staged object's chunks stay, registered as staged again (its caller
        retries or discards them, or the next start removes them with its dead owner)."""
        with self.env.begin(write=True) as txn:
            for loc in locs:
                key = _U64.pack(loc.key)
                txn.delete(key, db=self.dbs["log"])
                if txn.delete(key, db=self.dbs["obj"]):
                    continue
                raw = txn.get(key, db=self.dbs["objc"])
                if raw is not None:
                    txn.put(Manifest.decode(raw).sid, self.stage_owner, db=self.dbs["stage"])
                    txn.delete(key, db=self.dbs["objc"])

    def delete(self, keys: Sequence[int]) -> int:
        """Delete objects' bytes (small or chunked) by shard key, in one transaction."""
        n = 0
        with self.env.begin(write=True) as txn:
            for k in keys:
                n += self._delete(txn, _U64.pack(k))
        return n

    def _delete(self, txn: lmdb.Transaction, key: bytes) -> int:
        txn.delete(key, db=self.dbs["log"])
        if txn.delete(key, db=self.dbs["obj"]):
            return 1
        raw = txn.get(key, db=self.dbs["objc"])
        if raw is None:
            return 0
        for k in Manifest.decode(raw).keys():
            txn.delete(k, db=self.dbs["chunk"])
        txn.delete(key, db=self.dbs["objc"])
        return 1

    def recover(self, linked: int) -> tuple[int, int]:
        """As a new owner: delete the bytes above ``linked`` that have no journal entry
        (written, never linked: a crash between the two commits of a spool written before the
        journal) and the staged chunks of dead processes; returns (orphan objects, orphan
        staged objects). Journalled objects above ``linked`` stay: they were acknowledged, and
        the caller applies them. Sets the sequence past every key in use."""
        obj, objc, chunk, stage, log_db = (self.dbs[n] for n in ("obj", "objc", "chunk", "stage", "log"))
        start = _U64.pack(linked + 1)
        with self.env.begin(write=True) as txn:
            above = [bytes(k) for db in (obj, objc) for k in _keys_from(txn, db, start)]
            orphans = {k for k in above if txn.get(k, db=log_db) is None}
            for key in orphans:
                self._delete(txn, key)
            kept = [_U64.unpack(k)[0] for k in above if k not in orphans]
            dead = [bytes(k) for k, owner in txn.cursor(db=stage) if not owner_alive(bytes(owner))]
            for sid in dead:
                doomed = []
                for k in _keys_from(txn, chunk, sid):
                    if not k.startswith(sid):
                        break
                    doomed.append(k)
                for k in doomed:
                    txn.delete(k, db=chunk)
                txn.delete(sid, db=stage)
            self._next = max([linked, *kept])
        return len(orphans), len(dead)

    # -- reads (any process) --------------------------------------------------------------------

    @contextlib.contextmanager
    def view(self, loc: Location, oid: int) -> Iterator[memoryview | ChunkedView]:
        with stored_view(self.env, _U64.pack(loc.key), self.dbs["obj"], self.dbs["objc"], self.dbs["chunk"],
                         f"spool shard {loc.shard}", oid) as view:
            yield view

    def digest(self, loc: Location) -> bytes:
        """content_digest of the bytes at ``loc``; b"" when gone."""
        try:
            with self.view(loc, 0) as data:
                return digest_parts(data.parts if isinstance(data, ChunkedView) else [data])
        except SpoolError:
            return b""

    def staged_digest(self, data: StagedData) -> bytes:
        with self.env.begin(buffers=True) as txn:
            return digest_parts(txn.get(k, db=self.dbs["chunk"]) for k in data.manifest.keys())

    def holds(self, key: int) -> bool:
        k = _U64.pack(key)
        with self.env.begin() as txn:
            return txn.get(k, db=self.dbs["obj"]) is not None or txn.get(k, db=self.dbs["objc"]) is not None

    def entries(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self.dbs["obj"])["entries"]) + int(txn.stat(self.dbs["objc"])["entries"])


def _keys_from(txn: lmdb.Transaction, db: Any, start: bytes) -> Iterator[bytes]:
    cur = txn.cursor(db=db)
    if cur.set_range(start):
        for k in cur.iternext(keys=True, values=False):
            yield bytes(k)


class ShardSet:
    """The shards of one spool as seen by one process: opened on first use, at most one owned."""

    def __init__(self, spool_path: Path, map_size: int) -> None:
        self.root = Path(spool_path) / SHARDS_DIR
        self.map_size = map_size
        self._open: dict[int, Shard] = {}
        # a sender's worker threads read the same shard at once on first use, and LMDB
        # refuses to open one environment twice in a process: opening is serialised
        self._opening = threading.Lock()
        self.owner: Shard | None = None

    def indexes(self) -> list[int]:
        """The shards present on disk."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit() and (p / "data.mdb").exists())

    def get(self, index: int, *, create: bool = False) -> Shard:
        shard = self._open.get(index)
        if shard is None:
            with self._opening:
                shard = self._open.get(index)
                if shard is None:
                    shard = self._open[index] = Shard(self.root, index, self.map_size, create=create)
        return shard

    def try_lock(self, index: int) -> int:
        """An fd holding shard ``index``'s ownership lock, or -1 when another process owns it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f"{index}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return -1
        return fd

    def take(self, prefer: int = 0) -> Shard:
        """Own a shard: ``prefer`` when free, else the lowest free number."""
        candidates = [prefer, *(i for i in range(prefer + 1 + 4096) if i != prefer)]
        for index in candidates:
            fd = self.try_lock(index)
            if fd >= 0:
                shard = self.get(index, create=True)
                shard._lock_fd = fd
                self.owner = shard
                return shard
        raise SpoolError("no free spool shard")

    def view(self, loc: Location, oid: int) -> contextlib.AbstractContextManager[memoryview | ChunkedView]:
        return self.get(loc.shard).view(loc, oid)

    def digest(self, loc: Location) -> bytes:
        try:
            return self.get(loc.shard).digest(loc)
        except SpoolError:
            return b""

    def each(self) -> Iterator[Shard]:
        for index in self.indexes():
            yield self.get(index)

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()
        self.owner = None


def collect(shard: Shard, shared_env: lmdb.Environment, gc_db: Any,
            begin: Callable[..., Any] | None = None) -> int:
    """Delete the bytes the shared ``gc`` db lists for ``shard`` (its owner only): at most
    GC_BATCH per call, bytes first, then the entries; returns how many were listed."""
    prefix = _SHARD.pack(shard.index)
    with shared_env.begin(db=gc_db) as txn:
        keys: list[bytes] = []
        cur = txn.cursor()
        if cur.set_range(prefix):
            for k in cur.iternext(keys=True, values=False):
                k = bytes(k)
                if not k.startswith(prefix) or len(keys) >= GC_BATCH:
                    break
                keys.append(k)
    if not keys:
        return 0
    # Senders settle without syncing the meta page (Spool(durable=False)): an OS crash could
    # undo the settles that listed these bytes and make their objects due again. Make them
    # durable before the bytes go (one fdatasync a pass, about once a second).
    shared_env.sync(True)
    shard.delete([split_gc_key(k).key for k in keys])
    with shared_env.begin(write=True, db=gc_db) as txn:
        for k in keys:
            txn.delete(k)
    return len(keys)


__all__ = ["SHARDS_DIR", "Location", "Shard", "ShardSet", "collect", "hw_key", "location_of", "split_gc_key"]
