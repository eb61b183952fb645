"""The spool: the only module that touches LMDB, and the only state processes share.

Layout (named sub-databases in one LMDB environment):

``obj``   oid -> encoded dataset bytes exactly as received (no file meta). One entry per
          object, however many destinations it goes to.
``meta``  oid -> JSON record: identifiers, source, routing decision, outstanding and finished
          destinations. Kept after delivery (without the bytes) for lookups until pruned.
``q``     ``dest 0x00 state oid`` -> packed retry record. Each destination's queue holds only
          references; the state letter in the key lets a sender scan just the pending range
          and lets ``stats`` count states without decoding values.
``sop``   SOP Instance UID -> oid of the newest copy (supersede / duplicate policy).
``dlv``   ``dest 0x00 sop uid`` -> content digest + time of the last delivery (duplicate
          policy; not kept when ``duplicate_window`` is 0).
``idx``   (dupsort) ``s|a|p`` + Study UID / Accession / Patient ID -> oid, for lookups.
``info``  counters (u64) and the oid sequence.

Object ids are a big-endian u64 sequence, so key order is arrival order and the first pending
key of a queue is its oldest object.

Duplicate policy: an object re-received with the same SOP Instance UID while an earlier copy
is still *pending* for a destination replaces that copy for that destination (one delivery,
of the newest bytes). A re-send of byte-identical content that a destination already
confirmed within ``duplicate_window`` is not sent again (counted as ``suppressed``). A re-send
with different content (a correction) is always delivered.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import lmdb

from fastroute.errors import SpoolError, SpoolFullError

log = logging.getLogger("fastroute.spool")

UNROUTED = "~unrouted"   # pseudo-destination for objects no rule routed; '~' is not a valid name
PENDING, INFLIGHT, FAILED, HELD = b"P", b"I", b"F", b"U"
STATE_NAMES = {PENDING: "pending", INFLIGHT: "in_flight", FAILED: "failed", HELD: "unrouted"}
_REC = struct.Struct("<IdiI")   # attempts, next_at, last_status (-1 none), unknown_outcomes
_U64 = struct.Struct(">Q")
DIGEST_BYTES = 16


def oid_key(oid: int) -> bytes:
    return _U64.pack(oid)


def _qkey(dest: str, state: bytes, oid: int) -> bytes:
    return dest.encode() + b"\x00" + state + _U64.pack(oid)


def _qprefix(dest: str, state: bytes) -> bytes:
    return dest.encode() + b"\x00" + state


def _paused_key(dest: str) -> bytes:
    """The operator's runtime pause of a destination, in ``info``."""
    return b"paused:" + dest.encode()


def _split_qkey(key: bytes) -> tuple[str, bytes, int]:
    dest, rest = bytes(key).split(b"\x00", 1)
    return dest.decode(), rest[:1], _U64.unpack(rest[1:9])[0]


@dataclass(frozen=True)
class Incoming:
    """An object accepted on the receive path, ready to be committed."""

    data: bytes
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    destinations: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)   # identifiers, source, rules


def content_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The duplicate policy's content key: the first 16 bytes of SHA-256.

    SHA-256 is hardware-accelerated (SHA-NI, ARMv8 SHA2) on current CPUs, yet on a 0.5 MB CT
    image it was a quarter of a listener's CPU. So it is taken lazily: on the receive path
    only for a re-send of a SOP Instance UID that a destination confirmed within
    ``duplicate_window`` (rare), and otherwise by the sender after a delivery, from the
    spool's own pages, off the modality's critical path (``Outcome.digest``).
    """
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


@dataclass(frozen=True)
class PutResult:
    oid: int
    queued: tuple[str, ...]        # destinations it was queued for
    superseded: tuple[int, ...]    # older oids whose pending copies it replaced
    suppressed: tuple[str, ...]    # destinations that already have these exact bytes


@dataclass(frozen=True)
class Claimed:
    """A queue entry a sender took: enough to negotiate and send without reading ``meta``."""

    oid: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    attempts: int
    size: int
    calling_ae: str
    digest: bytes = b""            # content_digest, when already known (else the sender takes it)


@dataclass(frozen=True)
class Outcome:
    """What happened to one claimed object at one destination."""

    oid: int
    kind: str                      # "delivered" | "retry" | "failed" | "release"
    status: int | None = None
    error: str = ""
    next_at: float = 0.0           # for "retry"
    unknown: bool = False          # outcome unknown (timeout/abort after data sent)
    transcoded: str = ""           # the syntax it was converted to, when it was
    digest: bytes = b""            # content_digest of the stored bytes, for the duplicate policy
    at: float = 0.0                # when the destination confirmed it (0: when settled)


@dataclass(frozen=True)
class QueueStats:
    destination: str
    pending: int
    in_flight: int
    failed: int
    oldest_age: float | None       # seconds since the oldest waiting object arrived
    delivered: int
    failed_total: int
    suppressed: int
    unknown_outcomes: int


@dataclass(frozen=True)
class QueueEntry:
    destination: str
    state: str
    oid: int
    attempts: int
    next_at: float
    last_status: int | None
    error: str
    meta: dict[str, Any]


class Spool:
    """An LMDB spool opened by one process (open it after fork/spawn, never before)."""

    def __init__(self, path: str | Path, *, map_size: int = 64 * 1024**3,
                 min_free_bytes: int = 0, duplicate_window: float = 86400.0,
                 readonly: bool = False, durable: bool = True) -> None:
        """``durable=False`` (the senders) makes this process's commits skip the second fsync
        (LMDB's MDB_NOMETASYNC): still atomic and consistent, but an OS crash may undo the
        last of them. A sender's commits can afford that: a lost claim is undone by
        ``reset_inflight`` on start anyway, a lost delivery record means one resend
        (at-least-once). The next fully synced commit (a listener's) makes them durable.
        Every commit that answers a modality stays fully synced."""
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes
        self.duplicate_window = duplicate_window
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not (self.path / "data.mdb").exists():
            raise SpoolError(f"no spool at {self.path}", hint="check the 'spool:' path of the configuration")
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=16, max_readers=1024,
                                 subdir=True, readonly=False, lock=True, sync=True,
                                 metasync=durable, readahead=False, meminit=False)
        except lmdb.Error as exc:
            raise SpoolError(f"cannot open spool at {self.path}: {exc}") from exc
        self._obj = self.env.open_db(b"obj")
        self._meta = self.env.open_db(b"meta")
        self._q = self.env.open_db(b"q")
        self._sop = self.env.open_db(b"sop")
        self._dlv = self.env.open_db(b"dlv")
        self._idx = self.env.open_db(b"idx", dupsort=True)
        self._info = self.env.open_db(b"info")
        self._audit = self.env.open_db(b"audit")
        self._free_checked = 0.0
        self._free_ok = True
        self._lock = threading.Lock()

    def close(self) -> None:
        self.env.close()

    # -- counters ---------------------------------------------------------------------------

    def _incr(self, txn: lmdb.Transaction, name: str, by: int = 1) -> int:
        key = name.encode()
        raw = txn.get(key, db=self._info)
        value = (_U64.unpack(raw)[0] if raw else 0) + by
        txn.put(key, _U64.pack(value), db=self._info)
        return value

    def counters(self) -> dict[str, int]:
        with self.env.begin(db=self._info) as txn:
            return {bytes(k).decode(): _U64.unpack(bytes(v))[0] for k, v in txn.cursor()
                    if len(v) == 8 and not bytes(k).startswith(b"paused:")}

    # -- free-space guard ------------------------------------------------------------------

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def check_space(self, incoming_bytes: int) -> None:
        """Refuse before writing when the disk is below its floor (checked at most every 100 ms)."""
        if self.min_free_bytes <= 0:
            return
        now = time.monotonic()
        if now - self._free_checked > 0.1 or not self._free_ok:
            self._free_ok = self.free_bytes() - incoming_bytes >= self.min_free_bytes
            self._free_checked = now
        if not self._free_ok:
            raise SpoolFullError(
                f"disk holding the spool {self.path} is below its free-space floor "
                f"({self.min_free_bytes} bytes)")

    # -- preallocation ---------------------------------------------------------------------

    def reusable_bytes(self) -> int:
        """Bytes of the spool file that hold no live page: LMDB reuses them without growing it."""
        psize = int(self.env.stat()["psize"])
        used = 2 + self._pages(self.env.stat())            # two meta pages + the main DB
        with self.env.begin() as txn:
            for db in (self._obj, self._meta, self._q, self._sop, self._dlv, self._idx,
                       self._info, self._audit):
                used += self._pages(txn.stat(db))
        return max(0, int(self.env.info()["last_pgno"]) + 1 - used) * psize

    @staticmethod
    def _pages(stat: Any) -> int:     # lmdb stat dict
        return int(stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"])

    def preallocate(self, nbytes: int, chunk: int = 4 * 1024**2) -> int:
        """Write zeros into the spool file until ``nbytes`` of it are free for reuse; return
        the bytes added.

        Growing the file is the expensive part of a commit on ext4 (measured here): fdatasync
        must then journal the new blocks, and a 0.5 MB object's commit took 1.5 ms instead of
        0.4 ms (fallocate does not help: its unwritten extents are converted at the same
        cost). So a new spool is grown once, up front, through LMDB itself (zero-filled
        values put, then deleted, leaving their pages on LMDB's free list), and the disk
        space is taken before the first object is accepted. The map size and the free-space
        floor still bound it."""
        prefix = b"~prealloc:"
        with self.env.begin(write=True, db=self._info) as txn:   # left by a crash in between
            for key, _ in list(self._iter_prefix(txn, prefix)):
                txn.delete(key)
        missing = nbytes - self.reusable_bytes()
        room = self.free_bytes() - self.min_free_bytes - chunk
        missing = min(missing, room, self.env.info()["map_size"] // 2)
        if missing <= 0:
            return 0
        keys = [prefix + b"%08d" % i for i in range(-(-missing // chunk))]
        zeros = bytes(chunk)
        try:
            with self.env.begin(write=True, db=self._info) as txn:
                for key in keys:
                    txn.put(key, zeros)
        except lmdb.MapFullError:
            return 0                               # aborted whole: nothing was written
        with self.env.begin(write=True, db=self._info) as txn:
            for key in keys:
                txn.delete(key)
        return len(keys) * chunk

    def usage(self) -> dict[str, int]:
        info = self.env.info()
        stat = self.env.stat()
        return {
            "map_size": info["map_size"],
            "used_bytes": (info["last_pgno"] + 1) * stat["psize"],
            "disk_free_bytes": self.free_bytes(),
            "disk_total_bytes": shutil.disk_usage(self.path).total,
        }

    # -- receive side ------------------------------------------------------------------------

    def put_many(self, items: Sequence[Incoming], now: float | None = None) -> list[PutResult | BaseException]:
        """Commit a group of objects durably in one transaction (group commit).

        Returns one result per item, in order: a PutResult, or the exception for that item.
        When the map is full the batch is retried item by item so that what fits is kept and
        only what does not fit is refused.
        """
        if not items:
            return []
        now = time.time() if now is None else now
        try:
            self.check_space(sum(len(i.data) for i in items))
        except SpoolFullError as exc:
            return [exc for _ in items]
        try:
            with self.env.begin(write=True) as txn:
                return [self._put(txn, item, now) for item in items]
        except lmdb.MapFullError:
            if len(items) == 1:
                return [SpoolFullError(f"spool {self.path} is full (spool_max_bytes reached)")]
            out: list[PutResult | BaseException] = []
            for item in items:
                out.extend(self.put_many([item], now))
            return out
        except lmdb.Error as exc:
            err = SpoolError(f"spool write failed: {exc}")
            return [err for _ in items]

    def _put(self, txn: lmdb.Transaction, item: Incoming, now: float) -> PutResult:
        oid = self._incr(txn, "seq")
        key = oid_key(oid)
        digest = b""              # taken only to compare with an earlier delivery
        sop = item.sop_instance_uid.encode()
        queued: list[str] = []
        suppressed: list[str] = []
        superseded: list[int] = []
        old_raw = txn.get(sop, db=self._sop)
        old_oid = _U64.unpack(old_raw)[0] if old_raw else None
        for dest in item.destinations:
            last = txn.get(dest.encode() + b"\x00" + sop, db=self._dlv)
            if last is not None and \
                    now - struct.unpack_from("<d", last, DIGEST_BYTES)[0] < self.duplicate_window:
                digest = digest or content_digest(item.data)
                if last[:DIGEST_BYTES] == digest:
                    suppressed.append(dest)
                    self._incr(txn, f"suppressed:{dest}")
                    continue
            if old_oid is not None and txn.delete(_qkey(dest, PENDING, old_oid), db=self._q):
                self._drop_dest(txn, old_oid, dest, "superseded", now, by=oid)
                if old_oid not in superseded:
                    superseded.append(old_oid)
                self._incr(txn, f"superseded:{dest}")
            txn.put(_qkey(dest, PENDING, oid), _REC.pack(0, 0.0, -1, 0), db=self._q)
            queued.append(dest)
        meta = dict(item.meta)
        meta.update({
            "sop_class_uid": item.sop_class_uid, "sop_instance_uid": item.sop_instance_uid,
            "transfer_syntax": item.transfer_syntax, "size": len(item.data),
            "digest": digest.hex(), "received_at": now, "outstanding": queued,
            "routed_to": list(item.destinations), "suppressed": suppressed,
            "delivered": {}, "failed": {},
        })
        if not item.destinations:
            txn.put(_qkey(UNROUTED, HELD, oid), _REC.pack(0, 0.0, -1, 0), db=self._q)
            meta["outstanding"] = [UNROUTED]
        if meta["outstanding"]:
            txn.put(key, item.data, db=self._obj)
        txn.put(key, _dumps(meta), db=self._meta)
        txn.put(sop, key, db=self._sop)
        for prefix, attr in ((b"s", "study_instance_uid"), (b"a", "accession_number"), (b"p", "patient_id")):
            value = meta.get(attr)
            if value:
                txn.put(prefix + str(value).encode()[:400], key, db=self._idx, dupdata=True)
        self._incr(txn, "received")
        self._incr(txn, "received_bytes", len(item.data))
        self._incr(txn, f"received_from:{meta.get('calling_ae', '')}")
        return PutResult(oid, tuple(queued), tuple(superseded), tuple(suppressed))

    def _drop_dest(self, txn: lmdb.Transaction, oid: int, dest: str, how: str, now: float,
                   by: int | None = None, status: int | None = None, error: str = "",
                   digest: bytes = b"") -> dict[str, Any] | None:
        """Remove ``dest`` from an object's outstanding list; drop the bytes when none remain.

        Returns the updated routing record (None when the object is gone); ``digest`` is
        recorded in it when it has none yet, so the object's other senders need not hash."""
        key = oid_key(oid)
        raw = txn.get(key, db=self._meta)
        if raw is None:
            return None
        meta = json.loads(bytes(raw))
        if digest and not meta.get("digest"):
            meta["digest"] = digest.hex()
        if dest in meta["outstanding"]:
            meta["outstanding"].remove(dest)
        if how == "delivered":
            meta["delivered"][dest] = [now, status] + ([error] if error else [])   # + syntax if converted
        else:   # superseded / purged: kept in the record so lookups can say why
            meta.setdefault("dropped", {})[dest] = [now, how, error] + ([by] if by else [])
        if not meta["outstanding"]:
            txn.delete(key, db=self._obj)
        txn.put(key, _dumps(meta), db=self._meta)
        return meta

    # -- send side ---------------------------------------------------------------------------

    def reset_inflight(self, dest: str) -> int:
        """Return a destination's in-flight entries to pending (its sender restarted)."""
        n = 0
        with self.env.begin(write=True, db=self._q) as txn:
            for key, value in list(self._iter_prefix(txn, _qprefix(dest, INFLIGHT))):
                _, _, oid = _split_qkey(key)
                txn.delete(key)
                txn.put(_qkey(dest, PENDING, oid), value)
                n += 1
        if n:
            log.info("destination=%s: %d in-flight objects from a previous run are pending again", dest, n)
        return n

    def claim(self, dest: str, limit: int, now: float | None = None) -> tuple[list[Claimed], float | None]:
        """Move up to ``limit`` due pending entries to in-flight.

        Returns the claimed entries and the earliest future ``next_at`` seen among those not
        yet due (so the sender knows how long it may wait), or None.
        """
        now = time.time() if now is None else now
        with self.env.begin(write=True) as txn:
            return self._claim(txn, dest, limit, now)

    def _claim(self, txn: lmdb.Transaction, dest: str, limit: int,
               now: float) -> tuple[list[Claimed], float | None]:
        out: list[Claimed] = []
        earliest: float | None = None
        prefix = _qprefix(dest, PENDING)
        cur = txn.cursor(db=self._q)
        moves: list[tuple[bytes, bytes, int]] = []
        if cur.set_range(prefix):
            for raw_key, value in cur:
                key = bytes(raw_key)
                if not key.startswith(prefix) or len(moves) >= limit:
                    break
                next_at = _REC.unpack_from(value)[1]
                if next_at > now:
                    earliest = next_at if earliest is None else min(earliest, next_at)
                    continue
                moves.append((key, bytes(value), _U64.unpack(key[-8:])[0]))
        for key, value, oid in moves:
            raw = txn.get(oid_key(oid), db=self._meta)
            txn.delete(key, db=self._q)
            if raw is None:   # purged underneath us
                continue
            meta = json.loads(bytes(raw))
            txn.put(_qkey(dest, INFLIGHT, oid), value, db=self._q)
            attempts = _REC.unpack_from(value)[0]
            out.append(Claimed(oid, meta["sop_class_uid"], meta["sop_instance_uid"],
                               meta["transfer_syntax"], attempts, meta["size"],
                               meta.get("calling_ae", ""), bytes.fromhex(meta.get("digest") or "")))
        return out, earliest

    def read(self, oid: int) -> bytes:
        with self.env.begin(db=self._obj) as txn:
            data = txn.get(oid_key(oid))
            if data is None:
                raise SpoolError(f"object {oid} has no data in the spool (purged?)")
            return bytes(data)

    @contextlib.contextmanager
    def view(self, oid: int) -> Iterator[memoryview]:
        """The object's bytes as a memoryview into the LMDB map, valid inside the block only.

        The send path uses this so an object goes from the map to the socket without a copy;
        the read transaction it holds only keeps those pages from being reused meanwhile.
        """
        with self.env.begin(db=self._obj, buffers=True) as txn:
            data = txn.get(oid_key(oid))
            if data is None:
                raise SpoolError(f"object {oid} has no data in the spool (purged?)")
            view = memoryview(data)
            try:
                yield view
            finally:
                view.release()

    @staticmethod
    def _iter_prefix(txn: lmdb.Transaction, prefix: bytes, db: Any = None) -> Iterator[tuple[bytes, bytes]]:
        cur = txn.cursor(db=db)
        if cur.set_range(prefix):
            for key, value in cur:
                key = bytes(key)
                if not key.startswith(prefix):
                    break
                yield key, bytes(value)

    def settle(self, dest: str, outcomes: Iterable[Outcome], now: float | None = None, *,
               claim: int = 0) -> tuple[list[Claimed], float | None]:
        """Record what happened to claimed objects, all in one transaction.

        With ``claim`` > 0 the same transaction then claims the next batch (as :meth:`claim`,
        unless the destination is paused): a busy sender pays one commit per batch, not two,
        and every commit is a turn at the write lock that the listeners' commits wait for.
        """
        now = time.time() if now is None else now
        with self.env.begin(write=True) as txn:
            self._settle(txn, dest, outcomes, now)
            if claim > 0 and txn.get(_paused_key(dest), db=self._info) is None:
                return self._claim(txn, dest, claim, now)
        return [], None

    def _settle(self, txn: lmdb.Transaction, dest: str, outcomes: Iterable[Outcome], now: float) -> None:
        for o in outcomes:
            ikey = _qkey(dest, INFLIGHT, o.oid)
            value = txn.get(ikey, db=self._q)
            if value is None:       # purged while in flight
                continue
            attempts, _, _, unknown = _REC.unpack_from(value)
            txn.delete(ikey, db=self._q)
            if o.unknown:
                unknown += 1
                self._incr(txn, f"unknown_outcomes:{dest}")
            status = -1 if o.status is None else o.status
            if o.transcoded:
                self._incr(txn, f"transcoded:{dest}")
            if o.kind == "delivered":
                at = o.at or now
                digest = o.digest
                if not digest and self.duplicate_window > 0:   # a caller that did not hash it
                    stored = txn.get(oid_key(o.oid), db=self._obj)
                    digest = content_digest(stored) if stored is not None else b""
                m = self._drop_dest(txn, o.oid, dest, "delivered", at, status=o.status,
                                    error=o.transcoded, digest=digest)
                if m is not None:
                    if m.get("digest"):   # the duplicate policy's record of what this got
                        txn.put(dest.encode() + b"\x00" + m["sop_instance_uid"].encode(),
                                bytes.fromhex(m["digest"]) + struct.pack("<d", at), db=self._dlv)
                    self._incr(txn, f"delivered_bytes:{dest}", int(m.get("size", 0)))
                    self._observe_latency(txn, dest, at - float(m["received_at"]))
                    self._audit_append(txn, {
                        "action": "delivered", "destination": dest, "status": o.status,
                        "sop_instance_uid": m["sop_instance_uid"],
                        "study_instance_uid": m.get("study_instance_uid", ""),
                        "calling_ae": m.get("calling_ae", ""), "oid": o.oid}, at)
                self._incr(txn, f"delivered:{dest}")
            elif o.kind == "release":   # not attempted (destination down, shutting down)
                txn.put(_qkey(dest, PENDING, o.oid), _REC.pack(attempts, o.next_at, status, unknown), db=self._q)
            elif o.kind == "retry":
                txn.put(_qkey(dest, PENDING, o.oid),
                        _REC.pack(attempts + 1, o.next_at, status, unknown) + o.error.encode()[:2000],
                        db=self._q)
                self._incr(txn, f"retries:{dest}")
            elif o.kind == "failed":
                txn.put(_qkey(dest, FAILED, o.oid),
                        _REC.pack(attempts + 1, now, status, unknown) + o.error.encode()[:2000],
                        db=self._q)
                self._record_failure(txn, o.oid, dest, now, o.status, o.error)
                self._incr(txn, f"failed:{dest}")
                self._incr(txn, f"failed_status:{dest}:{-1 if o.status is None else o.status}")
            else:
                raise ValueError(f"unknown outcome kind {o.kind!r}")

    def _record_failure(self, txn: lmdb.Transaction, oid: int, dest: str, now: float,
                        status: int | None, error: str) -> None:
        key = oid_key(oid)
        raw = txn.get(key, db=self._meta)
        if raw is not None:
            meta = json.loads(bytes(raw))
            meta["failed"][dest] = [now, status, error[:500]]
            txn.put(key, _dumps(meta), db=self._meta)
            self._audit_append(txn, {
                "action": "failed", "destination": dest, "status": status, "error": error[:500],
                "sop_instance_uid": meta["sop_instance_uid"],
                "study_instance_uid": meta.get("study_instance_uid", ""),
                "calling_ae": meta.get("calling_ae", ""), "oid": oid}, now)

    # -- runtime pause (operator), read by the destination's sender on every round ------------

    def set_paused(self, dest: str, paused: bool) -> None:
        with self.env.begin(write=True, db=self._info) as txn:
            if paused:
                txn.put(_paused_key(dest), b"1")
            else:
                txn.delete(_paused_key(dest))

    def is_paused(self, dest: str) -> bool:
        with self.env.begin(db=self._info) as txn:
            return txn.get(_paused_key(dest)) is not None

    # -- latency histogram (received -> delivered), counters readable by any process ----------

    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0)

    def _observe_latency(self, txn: lmdb.Transaction, dest: str, seconds: float) -> None:
        for le in self.LATENCY_BUCKETS:
            if seconds <= le:
                self._incr(txn, f"latency_bucket:{dest}:{le}")
                break
        else:
            self._incr(txn, f"latency_bucket:{dest}:inf")
        self._incr(txn, f"latency_sum_us:{dest}", int(max(0.0, seconds) * 1e6))
        self._incr(txn, f"latency_count:{dest}")

    # -- audit trail: hash-chained inside LMDB --------------------------------------------------
    # The LMDB write lock serialises every writer in every process, so one chain stays
    # consistent without a separate lock, and routing events commit with the state change.

    def _audit_append(self, txn: lmdb.Transaction, event: dict[str, Any], now: float) -> dict[str, Any]:
        seq = self._incr(txn, "audit_seq")
        prev_raw = txn.get(b"audit_head", db=self._info)
        prev = bytes(prev_raw).decode() if prev_raw else "0" * 64
        body = {"seq": seq, "time": now, **event, "prev": prev}
        digest = hashlib.sha256(_canonical(body)).hexdigest()
        body["hash"] = digest
        txn.put(_U64.pack(seq), _dumps(body), db=self._audit)
        txn.put(b"audit_head", digest.encode(), db=self._info)   # 64 bytes: not a counter
        return body

    def audit_record(self, action: str, **details: Any) -> dict[str, Any]:
        """Append an operator or configuration event (who/what/when/why) to the chain."""
        with self.env.begin(write=True) as txn:
            return self._audit_append(txn, {"action": action, **details}, time.time())

    def audit_events(self, since: float = 0.0, until: float = float("inf"),
                     study_instance_uid: str = "") -> Iterator[dict[str, Any]]:
        with self.env.begin(db=self._audit) as txn:
            for _, raw in txn.cursor():
                ev = json.loads(bytes(raw))
                if not since <= ev["time"] <= until:
                    continue
                if study_instance_uid and ev.get("study_instance_uid") != study_instance_uid:
                    continue
                yield ev

    def audit_verify(self) -> tuple[bool, str]:
        """Recompute the chain; the first retained event anchors it after pruning."""
        prev: str | None = None
        n = 0
        with self.env.begin(db=self._audit) as txn:
            for _, raw in txn.cursor():
                ev = json.loads(bytes(raw))
                n += 1
                claimed = ev.pop("hash", None)
                if prev is not None and ev.get("prev") != prev:
                    return False, f"event seq={ev.get('seq')}: chain broken (an event before it was removed or altered)"
                if hashlib.sha256(_canonical(ev)).hexdigest() != claimed:
                    return False, f"event seq={ev.get('seq')}: content was altered"
                prev = str(claimed)
        return True, f"{n} events, chain intact"

    def audit_prune(self, before: float) -> int:
        """Drop events older than ``before`` (retention); the chain stays verifiable."""
        n = 0
        with self.env.begin(write=True, db=self._audit) as txn:
            cur = txn.cursor()
            while cur.first():
                ev = json.loads(bytes(cur.value()))
                if ev["time"] >= before:
                    break
                cur.delete()
                n += 1
        return n

    # -- operator side -----------------------------------------------------------------------

    def destinations(self) -> list[str]:
        """Every destination that has queue entries (configured or not)."""
        names: set[str] = set()
        with self.env.begin(db=self._q) as txn:
            cur = txn.cursor()
            if not cur.first():
                return []
            while True:
                dest = bytes(cur.key()).split(b"\x00", 1)[0]
                names.add(dest.decode())
                if not cur.set_range(dest + b"\x01"):
                    break
        return sorted(names)

    def stats(self, dests: Iterable[str] | None = None, now: float | None = None) -> list[QueueStats]:
        now = time.time() if now is None else now
        names = sorted(set(dests or ()) | set(self.destinations()) | {UNROUTED})
        counters = self.counters()
        out = []
        with self.env.begin() as txn:
            for dest in names:
                counts = {}
                first: list[int] = []
                for state in (PENDING, INFLIGHT, FAILED, HELD):
                    n = 0
                    for i, (key, _) in enumerate(self._iter_prefix(txn, _qprefix(dest, state), self._q)):
                        if i == 0 and state != FAILED:
                            first.append(_U64.unpack(key[-8:])[0])
                        n += 1
                    counts[state] = n
                oldest = None
                if first:
                    raw = txn.get(oid_key(min(first)), db=self._meta)
                    if raw is not None:
                        oldest = max(0.0, now - json.loads(bytes(raw))["received_at"])
                out.append(QueueStats(
                    destination=dest, pending=counts[PENDING] + counts[HELD],
                    in_flight=counts[INFLIGHT], failed=counts[FAILED], oldest_age=oldest,
                    delivered=counters.get(f"delivered:{dest}", 0),
                    failed_total=counters.get(f"failed:{dest}", 0),
                    suppressed=counters.get(f"suppressed:{dest}", 0),
                    unknown_outcomes=counters.get(f"unknown_outcomes:{dest}", 0)))
        return out

    def entries(self, dest: str, state: bytes, limit: int = 1000) -> list[QueueEntry]:
        out: list[QueueEntry] = []
        with self.env.begin() as txn:
            for key, value in self._iter_prefix(txn, _qprefix(dest, state), self._q):
                if len(out) >= limit:
                    break
                _, _, oid = _split_qkey(key)
                attempts, next_at, status, _ = _REC.unpack_from(value)
                raw = txn.get(oid_key(oid), db=self._meta)
                out.append(QueueEntry(dest, STATE_NAMES[state], oid, attempts, next_at,
                                      None if status < 0 else status,
                                      value[_REC.size:].decode(errors="replace"),
                                      json.loads(bytes(raw)) if raw else {}))
        return out

    def entry(self, dest: str, oid: int) -> QueueEntry | None:
        """One object's queue entry at one destination, whatever its state."""
        with self.env.begin() as txn:
            for state in (PENDING, INFLIGHT, FAILED, HELD):
                value = txn.get(_qkey(dest, state, oid), db=self._q)
                if value is not None:
                    attempts, next_at, status, _ = _REC.unpack_from(value)
                    raw = txn.get(oid_key(oid), db=self._meta)
                    return QueueEntry(dest, STATE_NAMES[state], oid, attempts, next_at,
                                      None if status < 0 else status,
                                      bytes(value[_REC.size:]).decode(errors="replace"),
                                      json.loads(bytes(raw)) if raw else {})
        return None

    def prune_history(self, before: float, batch: int = 10000) -> int:
        """Forget finished objects received before ``before`` (their routing records and index
        entries); objects still outstanding anywhere are never pruned."""
        n = 0
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=self._meta)
            doomed: list[tuple[bytes, dict[str, Any]]] = []
            for key, raw in cur:
                meta = json.loads(bytes(raw))
                if meta["received_at"] >= before:
                    break
                if not meta["outstanding"]:
                    doomed.append((bytes(key), meta))
                if len(doomed) >= batch:
                    break
            for key, meta in doomed:
                txn.delete(key, db=self._meta)
                sop = meta["sop_instance_uid"].encode()
                if txn.get(sop, db=self._sop) == key:
                    txn.delete(sop, db=self._sop)
                for prefix, attr in ((b"s", "study_instance_uid"), (b"a", "accession_number"),
                                     (b"p", "patient_id")):
                    value = meta.get(attr)
                    if value:
                        txn.delete(prefix + str(value).encode()[:400], key, db=self._idx)
                n += 1
        return n

    def retry_failed(self, dest: str, oids: Iterable[int] | None = None) -> int:
        """Move failed entries back to pending with a fresh attempt count."""
        wanted = set(oids) if oids is not None else None
        n = 0
        with self.env.begin(write=True) as txn:
            for key, _ in list(self._iter_prefix(txn, _qprefix(dest, FAILED), self._q)):
                _, _, oid = _split_qkey(key)
                if wanted is not None and oid not in wanted:
                    continue
                txn.delete(key, db=self._q)
                txn.put(_qkey(dest, PENDING, oid), _REC.pack(0, 0.0, -1, 0), db=self._q)
                n += 1
        return n

    def purge(self, dest: str, states: Sequence[bytes] = (FAILED,), oids: Iterable[int] | None = None,
              reason: str = "") -> list[int]:
        """Remove entries of ``dest`` in ``states``; an object's bytes go with its last reference."""
        wanted = set(oids) if oids is not None else None
        removed = []
        now = time.time()
        with self.env.begin(write=True) as txn:
            for state in states:
                for key, _ in list(self._iter_prefix(txn, _qprefix(dest, state), self._q)):
                    _, _, oid = _split_qkey(key)
                    if wanted is not None and oid not in wanted:
                        continue
                    txn.delete(key, db=self._q)
                    self._drop_dest(txn, oid, dest, "purged", now, error=reason)
                    removed.append(oid)
            if removed:
                self._incr(txn, f"purged:{dest}", len(removed))
        return removed

    def meta(self, oid: int) -> dict[str, Any] | None:
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(oid_key(oid))
            return json.loads(bytes(raw)) if raw else None

    def lookup(self, *, study_instance_uid: str = "", accession_number: str = "",
               patient_id: str = "", limit: int = 10000) -> list[tuple[int, dict[str, Any]]]:
        """Objects (with their routing history) by Study UID, Accession Number or Patient ID."""
        key = (b"s" + study_instance_uid.encode() if study_instance_uid else
               b"a" + accession_number.encode() if accession_number else
               b"p" + patient_id.encode())
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._idx)
            if cur.set_key(key[:401]):
                for raw_oid in cur.iternext_dup():
                    oid = _U64.unpack(bytes(raw_oid))[0]
                    raw = txn.get(bytes(raw_oid), db=self._meta)
                    if raw is not None:
                        out.append((oid, json.loads(bytes(raw))))
                    if len(out) >= limit:
                        break
        return out

    def object_count(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self._obj)["entries"])


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
