"""Queues: the key layout of ``q`` and every move of an object between states.

``q`` maps ``dest 0x00 state-letter oid`` to a :class:`QueueRecord`. Each destination's queue
holds only references; the state letter in the key lets a sender scan just its pending range
and lets ``stats`` count states without decoding values. Object ids are a big-endian u64
sequence, so key order is arrival order and the first pending key is the oldest object.

Duplicate policy: an object re-received with the same SOP Instance UID while an earlier copy
is still *pending* for a destination replaces that copy for that destination (one delivery,
of the newest bytes). A re-send of byte-identical content that a destination already
confirmed within ``duplicate_window`` is not sent again: counted as ``suppressed``, audited,
logged and recorded (``duplicate_of``: the earlier delivery's oid and time). The window is 0
(off) by default - a router forwards what it is sent. A re-send with different content (a
correction) is always delivered.

Priority (issue 13): a migration's objects (routing record ``migration``) wait in a BULK
pending class of their own (state letter ``B``); :meth:`Queues.claim` takes a destination's
due clinical (``P``) entries first and fills the rest of the batch from BULK only once no
clinical entry is due, so a backlog of a million migrated instances never delays a modality's
study by more than the batch already in flight. In flight and failed are shared; a retried or
released object returns to its own class. A migration object whose SOP Instance UID already
has a copy with different content is recorded (``content_conflict``) and logged, never
replaced silently.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import lmdb

from fastroute.logsetup import fields
from fastroute.spool.audit import AuditChain
from fastroute.spool.commitments import Commitments
from fastroute.spool.verifications import Verifications
from fastroute.spool.shards import Location, ShardSet, location_of
from fastroute.spool.staging import Manifest, StagedData, digest_parts
from fastroute.spool.counters import LATENCY_BUCKETS, CounterKind, bucket_label, incr, status_label
from fastroute.spool.records import (
    NEW_ENTRY,
    Delivery,
    Drop,
    DropReason,
    Failure,
    OutcomeKind,
    QueueRecord,
    QueueState,
    RecordFacts,
    RoutingRecord,
    Suppression,
    decode_claim_fields,
    decode_received_at,
    decode_record,
    encode_new_record,
    update_record,
)

log = logging.getLogger("fastroute.spool")

UNROUTED = "~unrouted"   # pseudo-destination for objects no rule routed; '~' is not a valid name
_U64 = struct.Struct(">Q")
_AT = struct.Struct("<d")
DIGEST_BYTES = 16
_P, _I, _F, _U, _B, _Q = (s.code for s in (QueueState.PENDING, QueueState.IN_FLIGHT, QueueState.FAILED,
                                            QueueState.UNROUTED, QueueState.BULK, QueueState.QUARANTINED))
# Enum members as module constants: the commit paths compare and count several per object.
_DELIVERED, _RETRY, _FAILED_KIND, _RELEASE, _QUARANTINE = (
    OutcomeKind.DELIVERED, OutcomeKind.RETRY, OutcomeKind.FAILED, OutcomeKind.RELEASE, OutcomeKind.QUARANTINE)
(_C_SEQ, _C_RECEIVED, _C_RECEIVED_BYTES, _C_RECEIVED_FROM, _C_DELIVERED, _C_DELIVERED_BYTES, _C_FAILED,
 _C_FAILED_STATUS, _C_RETRIES, _C_UNKNOWN, _C_TRANSCODED, _C_BUCKET, _C_SUM, _C_COUNT) = (
    CounterKind.SEQ, CounterKind.RECEIVED, CounterKind.RECEIVED_BYTES, CounterKind.RECEIVED_FROM,
    CounterKind.DELIVERED, CounterKind.DELIVERED_BYTES, CounterKind.FAILED, CounterKind.FAILED_STATUS,
    CounterKind.RETRIES, CounterKind.UNKNOWN_OUTCOMES, CounterKind.TRANSCODED, CounterKind.LATENCY_BUCKET,
    CounterKind.LATENCY_SUM_US, CounterKind.LATENCY_COUNT)
_BUCKETS = tuple((le, bucket_label(le)) for le in LATENCY_BUCKETS)
_ALL_STATES = (QueueState.PENDING, QueueState.IN_FLIGHT, QueueState.FAILED, QueueState.UNROUTED,
               QueueState.BULK, QueueState.QUARANTINED)
_MIGRATION = b'"migration"'     # the routing-record key of a migration's object (see _class_of)


def oid_key(oid: int) -> bytes:
    return _U64.pack(oid)


def qkey(dest: str, state: bytes, oid: int) -> bytes:
    return dest.encode() + b"\x00" + state + _U64.pack(oid)


def qprefix(dest: str, state: bytes) -> bytes:
    return dest.encode() + b"\x00" + state


def split_qkey(key: bytes) -> tuple[str, bytes, int]:
    dest, rest = bytes(key).split(b"\x00", 1)
    return dest.decode(), rest[:1], _U64.unpack(rest[1:9])[0]


def paused_key(dest: str) -> bytes:
    """The operator's runtime pause of a destination, in ``info``."""
    return b"paused:" + dest.encode()


def iter_prefix(txn: lmdb.Transaction, prefix: bytes, db: Any = None) -> Iterator[tuple[bytes, bytes]]:
    cur = txn.cursor(db=db)
    if cur.set_range(prefix):
        for key, value in cur:
            key = bytes(key)
            if not key.startswith(prefix):
                break
            yield key, bytes(value)


def content_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The duplicate policy's content key: the first 16 bytes of SHA-256.

    SHA-256 is hardware-accelerated (SHA-NI, ARMv8 SHA2) on current CPUs, yet on a 0.5 MB CT
    image it was a quarter of a listener's CPU. So it is taken lazily: on the receive path
    only for a re-send of a SOP Instance UID that a destination confirmed within
    ``duplicate_window`` (rare), and otherwise by the sender after a delivery, from the
    spool's own pages, off the modality's critical path (``Outcome.digest``).
    """
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


def _earlier_delivery(value: bytes | memoryview) -> Suppression:
    """A ``dlv`` value: digest, delivery time, and (since issue 12) the delivered copy's oid."""
    at = _AT.unpack_from(value, DIGEST_BYTES)[0]
    end = DIGEST_BYTES + _AT.size
    oid = _U64.unpack_from(value, end)[0] if len(value) >= end + _U64.size else None
    return Suppression(at, oid)


@dataclass(frozen=True, slots=True)
class Incoming:
    """An object accepted on the receive path, ready to be committed."""

    data: bytes | StagedData        # StagedData: a large object's chunks, already in the spool
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    destinations: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)   # identifiers, source, rules


@dataclass(frozen=True, slots=True)
class PutResult:
    oid: int
    queued: tuple[str, ...]        # destinations it was queued for
    superseded: tuple[int, ...]    # older oids whose pending copies it replaced
    suppressed: tuple[str, ...]    # destinations that already have these exact bytes
    loc: Location | None = None    # where its bytes are; oid 0: journalled, not yet applied (:mod:`journal`)


@dataclass(frozen=True, slots=True)
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
    unknown: int = 0               # its deliveries that ended without a response, in a row
    study_instance_uid: str = ""   # from the record the claim decodes anyway: for log lines
    bulk: bool = False             # a migration's (BULK class): its digest is recorded on delivery
    loc: Location | None = None    # the shard holding its bytes (None: the shared environment)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one claimed object at one destination."""

    oid: int
    kind: OutcomeKind
    status: int | None = None
    error: str = ""
    next_at: float = 0.0           # for RETRY
    unknown: bool = False          # outcome unknown (timeout/abort after data sent)
    transcoded: str = ""           # the syntax it was converted to, when it was
    digest: bytes = b""            # content_digest of the stored bytes, for the duplicate policy
    at: float = 0.0                # when the destination confirmed it (0: when settled)
    cause: str = ""                # for a failure without a DICOM status: why (FailureCause)
    # issue 15: the content plan changed what was sent (audited on delivery when non-empty)
    changed_by: tuple[str, ...] = ()       # the steps that changed it ("rule:X", "destination:Y", ...)
    changed_tags: tuple[str, ...] = ()     # the attributes changed, as tag paths (never values)
    sent_sop_instance_uid: str = ""        # the SOP Instance UID sent, when the plan replaced it


@dataclass(frozen=True, slots=True)
class QueueStats:
    destination: str
    pending: int
    in_flight: int
    failed: int
    oldest_age: float | None       # seconds since the oldest waiting clinical object arrived
    delivered: int
    failed_total: int
    suppressed: int
    unknown_outcomes: int
    bulk_pending: int = 0          # of ``pending``: a migration's objects (the BULK class)
    committed: int = 0             # storage commitment (issue 14): instances the destination committed
    commit_failed: int = 0         # ... and instances its reports failed (re-sent)
    commit_waiting: int = 0        # delivered instances whose commitment is not answered yet
    commit_overdue: int = 0        # of those: unanswered after a request and a re-request (alerted)
    verified: int = 0              # verify: find (issue 14): instances the destination's C-FIND listed
    verify_failed: int = 0         # ... studies marked verify-failed (counter, since the spool began)
    verify_waiting: int = 0        # studies delivered there and not verified yet
    verify_failed_now: int = 0     # studies verify-failed within the last day (the alert's reading)
    quarantined: int = 0           # entries held in the quarantined state now (issue 15)
    quarantined_total: int = 0     # objects quarantined there since the spool began (counter)


@dataclass(frozen=True, slots=True)
class QueueEntry:
    destination: str
    state: QueueState
    oid: int
    attempts: int
    next_at: float
    last_status: int | None
    error: str
    record: RoutingRecord | None   # None when the routing record was pruned


class Queues:
    """Every queue operation, each inside one write transaction (the caller's or its own)."""

    def __init__(self, env: lmdb.Environment, dbs: dict[str, Any], audit: AuditChain,
                 duplicate_window: float, shards: ShardSet | None = None) -> None:
        self.env = env
        self.shards = shards
        self._obj, self._meta, self._q = dbs["obj"], dbs["meta"], dbs["q"]
        self._sop, self._dlv, self._idx, self._info = dbs["sop"], dbs["dlv"], dbs["idx"], dbs["info"]
        self._objc, self._chunk, self._stage = dbs["objc"], dbs["chunk"], dbs["stage"]
        self._gc = dbs["gc"]
        self.audit = audit
        self.duplicate_window = duplicate_window
        self.commitments: Commitments | None = None    # set by the Spool: holds bytes until committed
        self.verifications: Verifications | None = None  # set by the Spool: holds bytes until verified

    def _incr(self, txn: lmdb.Transaction, kind: CounterKind, dest: str = "", by: int = 1) -> int:
        return incr(txn, self._info, kind, dest, by=by)

    # -- receive side ------------------------------------------------------------------------

    def put(self, txn: lmdb.Transaction, item: Incoming, now: float, loc: Location | None = None) -> PutResult:
        """Queue one object; ``loc``: its bytes are already in a shard there (else they are
        written here)."""
        oid = self._incr(txn, _C_SEQ)
        key = oid_key(oid)
        digest = b""              # taken only to compare with an earlier delivery
        sop = item.sop_instance_uid.encode()
        queued: list[str] = []
        suppressed: list[str] = []
        superseded: list[int] = []
        old_raw = txn.get(sop, db=self._sop)
        old_oid = _U64.unpack(old_raw)[0] if old_raw else None
        duplicate_of: dict[str, Suppression] = {}
        window = self.duplicate_window
        meta = item.meta
        pending = _P
        job = meta.get("migration")
        if job:
            pending = _B
            if old_oid is not None:   # a re-received instance (rare): compare the contents
                digest, conflict = self._content_conflict(txn, old_oid, item, loc)
                if conflict is not None:
                    meta = {**meta, "content_conflict": conflict}
                    self._conflict(txn, oid, item, str(job), conflict, now)
        for dest in item.destinations:
            # Off (0, the default): no lookup and no hash on the receive path.
            last = txn.get(dest.encode() + b"\x00" + sop, db=self._dlv) if window > 0 else None
            if last is not None and now - _AT.unpack_from(last, DIGEST_BYTES)[0] < window:
                digest = digest or self._content_digest(txn, item.data, loc)
                if last[:DIGEST_BYTES] == digest:
                    suppressed.append(dest)
                    duplicate_of[dest] = earlier = _earlier_delivery(last)
                    self._suppressed(txn, oid, dest, item, earlier, now)
                    continue
            if old_oid is not None and (txn.delete(qkey(dest, _P, old_oid), db=self._q)
                                        or txn.delete(qkey(dest, _B, old_oid), db=self._q)):
                self._drop_dest(txn, old_oid, dest, drop=Drop(now, DropReason.SUPERSEDED, by=oid))
                if old_oid not in superseded:
                    superseded.append(old_oid)
                self._incr(txn, CounterKind.SUPERSEDED, dest)
            txn.put(qkey(dest, pending, oid), NEW_ENTRY, db=self._q)
            queued.append(dest)
        outstanding = queued if item.destinations else [UNROUTED]
        if not item.destinations:
            txn.put(qkey(UNROUTED, _U, oid), NEW_ENTRY, db=self._q)
        data = item.data
        if loc is not None:
            meta = {**meta, "loc": loc.to_json()}
            if not outstanding:
                txn.put(loc.gc_key, b"", db=self._gc)
        elif isinstance(data, StagedData):
            # Link the staged chunks to the object (or drop them when nothing wants it).
            txn.delete(data.sid, db=self._stage)
            if outstanding:
                txn.put(key, data.manifest.encode(), db=self._objc)
            else:
                self._delete_chunks(txn, data.manifest)
        elif outstanding:
            txn.put(key, data, db=self._obj)
        raw, index_keys = encode_new_record(
            sop_class_uid=item.sop_class_uid, sop_instance_uid=item.sop_instance_uid,
            transfer_syntax=item.transfer_syntax, size=len(item.data), received_at=now, digest=digest.hex(),
            outstanding=outstanding, routed_to=list(item.destinations), suppressed=suppressed, meta=meta,
            duplicate_of=duplicate_of)
        txn.put(key, raw, db=self._meta)
        txn.put(sop, key, db=self._sop)
        for ikey in index_keys:
            txn.put(ikey, key, db=self._idx, dupdata=True)
        self._incr(txn, _C_RECEIVED)
        self._incr(txn, _C_RECEIVED_BYTES, by=len(item.data))
        incr(txn, self._info, _C_RECEIVED_FROM, extra=item.meta.get("calling_ae") or "")
        return PutResult(oid, tuple(queued), tuple(superseded), tuple(suppressed), loc)

    def _content_conflict(self, txn: lmdb.Transaction, old_oid: int, item: Incoming,
                          loc: Location | None = None) -> tuple[bytes, dict[str, Any] | None]:
        """A migration object re-received while ``old_oid`` holds the same SOP Instance UID:
        (its digest, the conflict to record or None). The old copy's digest is taken from its
        bytes, or from its routing record once the bytes are gone (delivered); with neither,
        nothing is compared (b"", None). Taken only here: migration re-receives are rare."""
        other = self.stored_digest(txn, old_oid)
        if not other:
            raw = txn.get(oid_key(old_oid), db=self._meta)
            recorded = json.loads(bytes(raw)).get("digest") if raw is not None else ""
            if not recorded:
                return b"", None
            other = bytes.fromhex(recorded)
        digest = self._content_digest(txn, item.data, loc)
        if digest == other:
            return digest, None
        return digest, {"with_oid": old_oid, "digest": digest.hex(), "other_digest": other.hex()}

    def _conflict(self, txn: lmdb.Transaction, oid: int, item: Incoming, job: str,
                  conflict: dict[str, Any], now: float) -> None:
        """Audit and log a migration object that differs from the copy the spool already had
        of its SOP Instance UID: it is delivered (newest wins, as for any correction) but the
        migration report must be able to say that the archive held two versions."""
        study = str(item.meta.get("study_instance_uid") or "")
        self.audit.append(txn, {
            "action": "content_conflict", "migration": job, "sop_instance_uid": item.sop_instance_uid,
            "study_instance_uid": study, "oid": oid, **conflict}, now)
        log.warning("migration=%s sop_instance_uid=%s study_instance_uid=%s oid=%d: different content "
                    "than the copy already in the spool (oid %d): digest %s, was %s; the newer copy is "
                    "delivered, the older one's routing record is kept", job, item.sop_instance_uid, study, oid,
                    conflict["with_oid"], conflict["digest"], conflict["other_digest"],
                    extra=fields(sop_uid=item.sop_instance_uid, study_uid=study or None, oid=oid))

    def _suppressed(self, txn: lmdb.Transaction, oid: int, dest: str, item: Incoming,
                    earlier: Suppression, now: float) -> None:
        """Count, audit (in the put's transaction) and log one suppressed re-send: an operator
        who turned duplicate_window on must be able to see every object it did not forward."""
        self._incr(txn, CounterKind.SUPPRESSED, dest)
        study = str(item.meta.get("study_instance_uid") or "")
        calling = str(item.meta.get("calling_ae") or "")
        self.audit.append(txn, {
            "action": "suppressed", "destination": dest, "sop_instance_uid": item.sop_instance_uid,
            "study_instance_uid": study, "calling_ae": calling, "oid": oid,
            "duplicate_of": earlier.oid, "delivered_at": earlier.delivered_at,
            "duplicate_window": self.duplicate_window}, now)
        log.info("destination=%s sop_instance_uid=%s study_instance_uid=%s calling_ae=%s oid=%d: "
                 "not forwarded: identical bytes were delivered there at %s (oid %s), within "
                 "duplicate_window %gs", dest, item.sop_instance_uid, study, calling, oid,
                 time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(earlier.delivered_at)),
                 earlier.oid if earlier.oid is not None else "unknown", self.duplicate_window,
                 extra=fields(destination=dest, sop_uid=item.sop_instance_uid, study_uid=study or None,
                              calling_ae=calling or None, oid=oid))

    def _drop_dest(self, txn: lmdb.Transaction, oid: int, dest: str, *,
                   delivery: Delivery | None = None, drop: Drop | None = None,
                   digest: bytes = b"") -> RecordFacts | None:
        """Remove ``dest`` from an object's outstanding list; drop the bytes when none remain.

        Returns what the caller needs of the updated record (None when the object is gone);
        ``digest`` is recorded in it when it has none yet, so the object's other senders
        need not hash."""
        key = oid_key(oid)
        raw = txn.get(key, db=self._meta)
        if raw is None:
            return None
        new, facts = update_record(raw, dest, delivery=delivery, drop=drop, digest=digest.hex())
        # Storage commitment (issue 14): bytes a destination has yet to commit stay.
        held = False
        commitments = self.commitments
        if commitments is not None:
            verifications = self.verifications
            if delivery is not None:
                held = commitments.on_delivered(txn, oid, dest, new, delivery.at)
                if verifications is not None:    # verify: find holds them too (issue 14)
                    held = verifications.on_delivered(txn, oid, dest, new, delivery.at) or held
            else:     # superseded or purged there: no commitment will be asked for it
                commitments.release(txn, oid, dest)
                if verifications is not None:
                    verifications.release(txn, oid, dest)
            # another destination's hold (read only when the bytes would go)
            held = held or (facts.finished and commitments.held(txn, oid))
        if facts.finished and not held:
            self.drop_bytes(txn, oid, raw)
        txn.put(key, new, db=self._meta)
        return facts

    def drop_bytes(self, txn: lmdb.Transaction, oid: int, raw: bytes | memoryview | None = None) -> None:
        """Remove an object's bytes (small or chunked); its routing record stays. Bytes in a
        listener's shard are listed in ``gc`` for the shard's owner to delete (a sender never
        writes into a shard, see :mod:`shards`). ``raw``: its routing record, when read."""
        key = oid_key(oid)
        if txn.delete(key, db=self._obj):
            return
        loc = location_of(raw if raw is not None else txn.get(key, db=self._meta))
        if loc is not None:
            txn.put(loc.gc_key, b"", db=self._gc)
        else:
            self._delete_chunked(txn, key)

    def requeue(self, txn: lmdb.Transaction, dest: str, oid: int, now: float, error: str) -> None:
        """Queue an object again for ``dest`` (its commitment failed), due now, unless it
        is already waiting there."""
        if any(txn.get(qkey(dest, s, oid), db=self._q) is not None for s in (_P, _B, _I)):
            return
        txn.put(qkey(dest, self._class_of(txn, oid), oid), QueueRecord.pack(0, now, None, 0, error), db=self._q)

    # -- chunked (large) objects, see :mod:`staging` ------------------------------------------

    def _content_digest(self, txn: lmdb.Transaction, data: bytes | StagedData,
                        loc: Location | None = None) -> bytes:
        if isinstance(data, StagedData) and loc is not None and self.shards is not None:
            return self.shards.digest(loc)   # linked in its shard (any process may apply a journal)
        if isinstance(data, StagedData):
            owner = self.shards.owner if self.shards is not None else None
            if owner is not None:        # staged into this listener's shard
                return owner.staged_digest(data)
            return digest_parts(txn.get(k, db=self._chunk) for k in data.manifest.keys())
        return content_digest(data)

    def _delete_chunks(self, txn: lmdb.Transaction, manifest: Manifest) -> None:
        for k in manifest.keys():
            txn.delete(k, db=self._chunk)

    def _delete_chunked(self, txn: lmdb.Transaction, key: bytes) -> None:
        raw = txn.get(key, db=self._objc)
        if raw is not None:
            self._delete_chunks(txn, Manifest.decode(raw))
            txn.delete(key, db=self._objc)

    def stored_digest(self, txn: lmdb.Transaction, oid: int) -> bytes:
        """content_digest of an object's stored bytes, small or chunked; b"" when gone."""
        key = oid_key(oid)
        stored = txn.get(key, db=self._obj)
        if stored is not None:
            return content_digest(stored)
        raw = txn.get(key, db=self._objc)
        if raw is None:
            loc = location_of(txn.get(key, db=self._meta))
            if loc is not None and self.shards is not None:
                return self.shards.digest(loc)
            return b""
        return digest_parts(txn.get(k, db=self._chunk) for k in Manifest.decode(raw).keys())

    # -- send side ---------------------------------------------------------------------------

    def _class_of(self, txn: lmdb.Transaction, oid: int) -> bytes:
        """The pending class an object returns to (retry, release, restart, operator retry):
        BULK for a migration's object, else PENDING. Reads its routing record, so it is only
        for these rarer moves, never for a first queueing or a claim."""
        raw = txn.get(oid_key(oid), db=self._meta)
        if raw is None or _MIGRATION not in raw:    # cheap test first: most objects are clinical
            return _P
        return _B if json.loads(bytes(raw)).get("migration") else _P

    def reset_inflight(self, dest: str) -> int:
        """Return a destination's in-flight entries to pending (its sender restarted)."""
        n = 0
        with self.env.begin(write=True) as txn:
            for key, value in list(iter_prefix(txn, qprefix(dest, _I), self._q)):
                _, _, oid = split_qkey(key)
                txn.delete(key, db=self._q)
                txn.put(qkey(dest, self._class_of(txn, oid), oid), value, db=self._q)
                n += 1
        if n:
            log.info("destination=%s: %d in-flight objects from a previous run are pending again", dest, n,
                     extra=fields(destination=dest))
        return n

    def claim(self, txn: lmdb.Transaction, dest: str, limit: int,
              now: float) -> tuple[list[Claimed], float | None]:
        """Move up to ``limit`` due pending entries to in-flight; also return the earliest
        future ``next_at`` among those not yet due (how long the sender may wait), or None.

        Clinical (PENDING) entries first; the batch is filled from BULK (a migration's
        objects) only when no clinical entry is due any more, so a full batch still goes out
        while the migration has work and the sender never idles between small batches."""
        out: list[Claimed] = []
        cur = txn.cursor(db=self._q)
        moves: list[tuple[bytes, bytes, int]] = []
        earliest = self._scan(cur, qprefix(dest, _P), limit, now, moves)
        if len(moves) < limit:
            bulk = self._scan(cur, qprefix(dest, _B), limit, now, moves)
            if bulk is not None:
                earliest = bulk if earliest is None else min(earliest, bulk)
        for key, value, oid in moves:
            raw = txn.get(oid_key(oid), db=self._meta)
            txn.delete(key, db=self._q)
            if raw is None:   # purged underneath us
                continue
            f = decode_claim_fields(raw)
            txn.put(qkey(dest, _I, oid), value, db=self._q)
            attempts, unknown = QueueRecord.counts_of(value)
            out.append(Claimed(oid, f.sop_class_uid, f.sop_instance_uid, f.transfer_syntax,
                               attempts, f.size, f.calling_ae, f.digest, unknown, f.study_instance_uid,
                               key[-9:-8] == _B, f.loc))
        return out, earliest

    @staticmethod
    def _scan(cur: lmdb.Cursor, prefix: bytes, limit: int, now: float,
              moves: list[tuple[bytes, bytes, int]]) -> float | None:
        """Append the due entries under ``prefix`` to ``moves`` (up to ``limit`` in all); the
        earliest ``next_at`` of those seen not yet due, or None."""
        earliest: float | None = None
        if cur.set_range(prefix):
            for raw_key, value in cur:
                key = bytes(raw_key)
                if not key.startswith(prefix) or len(moves) >= limit:
                    break
                next_at = QueueRecord.next_at_of(value)
                if next_at > now:
                    earliest = next_at if earliest is None else min(earliest, next_at)
                    continue
                moves.append((key, bytes(value), _U64.unpack(key[-8:])[0]))
        return earliest

    def settle(self, txn: lmdb.Transaction, dest: str, outcomes: Iterable[Outcome], now: float) -> None:
        for o in outcomes:
            ikey = qkey(dest, _I, o.oid)
            value = txn.get(ikey, db=self._q)
            if value is None:       # purged while in flight
                continue
            attempts, unknown = QueueRecord.counts_of(value)
            txn.delete(ikey, db=self._q)
            if o.unknown:
                unknown += 1
                self._incr(txn, _C_UNKNOWN, dest)
            if o.transcoded:
                self._incr(txn, _C_TRANSCODED, dest)
            if o.kind == _DELIVERED:
                self._delivered(txn, dest, o, now)
            elif o.kind == _RELEASE:   # not attempted (destination down, shutting down)
                txn.put(qkey(dest, self._class_of(txn, o.oid), o.oid),
                        QueueRecord.pack(attempts, o.next_at, o.status, unknown), db=self._q)
            elif o.kind == _RETRY:
                if not o.unknown:   # a response came: the run of unknown outcomes is broken
                    unknown = 0
                txn.put(qkey(dest, self._class_of(txn, o.oid), o.oid),
                        QueueRecord.pack(attempts + 1, o.next_at, o.status, unknown, o.error), db=self._q)
                self._incr(txn, _C_RETRIES, dest)
            elif o.kind == _FAILED_KIND:
                txn.put(qkey(dest, _F, o.oid),
                        QueueRecord.pack(attempts + 1, now, o.status, unknown, o.error), db=self._q)
                self._record_failure(txn, o.oid, dest, now, o.status, o.error)
                self._incr(txn, _C_FAILED, dest)
                incr(txn, self._info, _C_FAILED_STATUS, dest, status_label(o.status, o.cause))
            elif o.kind == _QUARANTINE:
                # held, never sent: the destination stays outstanding on the routing record, so
                # the bytes are kept (pruning and space never drop outstanding objects) until an
                # operator purges the entry like a failed one
                txn.put(qkey(dest, _Q, o.oid), QueueRecord.pack(attempts, now, None, unknown, o.error),
                        db=self._q)
                self._record_quarantine(txn, o.oid, dest, now, o.error)
                self._incr(txn, CounterKind.QUARANTINED, dest)
            else:
                raise ValueError(f"unknown outcome kind {o.kind!r}")

    def _delivered(self, txn: lmdb.Transaction, dest: str, o: Outcome, now: float) -> None:
        at = o.at or now
        digest = o.digest
        if not digest and self.duplicate_window > 0:   # a caller that did not hash it
            digest = self.stored_digest(txn, o.oid)
        rec = self._drop_dest(txn, o.oid, dest, delivery=Delivery(at, o.status, o.transcoded), digest=digest)
        if rec is not None:
            if rec.digest and self.duplicate_window > 0:   # the duplicate policy's record of what this got
                txn.put(dest.encode() + b"\x00" + rec.sop_instance_uid.encode(),
                        bytes.fromhex(rec.digest) + _AT.pack(at) + _U64.pack(o.oid), db=self._dlv)
            self._incr(txn, _C_DELIVERED_BYTES, dest, rec.size)
            self._observe_latency(txn, dest, at - rec.received_at)
            event: dict[str, Any] = {
                "action": "delivered", "destination": dest, "status": o.status,
                "sop_instance_uid": rec.sop_instance_uid, "study_instance_uid": rec.study_instance_uid,
                "calling_ae": rec.calling_ae, "oid": o.oid}
            if o.changed_by:
                event["changed_by"] = list(o.changed_by)
            if o.changed_tags:
                event["attributes_changed"] = list(o.changed_tags)
            if o.sent_sop_instance_uid:
                event["sent_sop_instance_uid"] = o.sent_sop_instance_uid
            self.audit.append(txn, event, at)
        self._incr(txn, _C_DELIVERED, dest)

    def _record_failure(self, txn: lmdb.Transaction, oid: int, dest: str, now: float,
                        status: int | None, error: str) -> None:
        key = oid_key(oid)
        raw = txn.get(key, db=self._meta)
        if raw is not None:
            new, rec = update_record(raw, dest, failure=Failure(now, status, error[:500]))
            txn.put(key, new, db=self._meta)
            self.audit.append(txn, {
                "action": "failed", "destination": dest, "status": status, "error": error[:500],
                "sop_instance_uid": rec.sop_instance_uid, "study_instance_uid": rec.study_instance_uid,
                "calling_ae": rec.calling_ae, "oid": oid}, now)

    def _record_quarantine(self, txn: lmdb.Transaction, oid: int, dest: str, now: float,
                           reason: str) -> None:
        """The routing record notes why (as a failure without status, so ``fastroute status``
        and the object view show it), and the audit chain says ``quarantined``."""
        key = oid_key(oid)
        raw = txn.get(key, db=self._meta)
        if raw is None:
            return
        new, rec = update_record(raw, dest, failure=Failure(now, None, f"quarantined: {reason}"[:500]))
        txn.put(key, new, db=self._meta)
        self.audit.append(txn, {
            "action": "quarantined", "destination": dest, "reason": reason[:500],
            "sop_instance_uid": rec.sop_instance_uid, "study_instance_uid": rec.study_instance_uid,
            "calling_ae": rec.calling_ae, "oid": oid}, now)
        log.warning("quarantined for %s: %s", dest, reason,
                    extra=fields(destination=dest, sop_uid=rec.sop_instance_uid,
                                 study_uid=rec.study_instance_uid or None, oid=oid))

    def _observe_latency(self, txn: lmdb.Transaction, dest: str, seconds: float) -> None:
        for le, label in _BUCKETS:
            if seconds <= le:
                incr(txn, self._info, _C_BUCKET, dest, label)
                break
        else:
            incr(txn, self._info, _C_BUCKET, dest, bucket_label(None))
        self._incr(txn, _C_SUM, dest, int(max(0.0, seconds) * 1e6))
        self._incr(txn, _C_COUNT, dest)

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

    def counts(self, txn: lmdb.Transaction, dest: str, now: float) -> tuple[dict[QueueState, int], float | None]:
        """Entries per state, and the age of the oldest one waiting (pending or in flight);
        a migration's BULK backlog is counted but does not age the queue (it may wait for
        days by design; alerts on the age are about clinical objects)."""
        counts: dict[QueueState, int] = {}
        first: list[int] = []
        for state in _ALL_STATES:
            n = 0
            for i, (key, _) in enumerate(iter_prefix(txn, qprefix(dest, state.code), self._q)):
                if i == 0 and state not in (QueueState.FAILED, QueueState.BULK, QueueState.QUARANTINED):
                    first.append(_U64.unpack(key[-8:])[0])
                n += 1
            counts[state] = n
        oldest = None
        if first:
            raw = txn.get(oid_key(min(first)), db=self._meta)
            if raw is not None:
                oldest = max(0.0, now - decode_received_at(raw))
        return counts, oldest

    def _entry(self, txn: lmdb.Transaction, dest: str, state: QueueState, oid: int,
               value: bytes) -> QueueEntry:
        q = QueueRecord.decode(value)
        raw = txn.get(oid_key(oid), db=self._meta)
        return QueueEntry(dest, state, oid, q.attempts, q.next_at, q.last_status, q.error,
                          decode_record(raw) if raw else None)

    def entries(self, dest: str, state: QueueState, limit: int = 1000) -> list[QueueEntry]:
        """Entries of ``dest`` in ``state``, oldest first; PENDING lists the clinical entries,
        then the BULK ones (each with its own state), as both are waiting to be sent."""
        out: list[QueueEntry] = []
        states = (QueueState.PENDING, QueueState.BULK) if state == QueueState.PENDING else (state,)
        with self.env.begin() as txn:
            for st in states:
                for key, value in iter_prefix(txn, qprefix(dest, st.code), self._q):
                    if len(out) >= limit:
                        break
                    out.append(self._entry(txn, dest, st, split_qkey(key)[2], value))
        return out

    def entry(self, dest: str, oid: int) -> QueueEntry | None:
        """One object's queue entry at one destination, whatever its state."""
        with self.env.begin() as txn:
            for state in _ALL_STATES:
                value = txn.get(qkey(dest, state.code, oid), db=self._q)
                if value is not None:
                    return self._entry(txn, dest, state, oid, bytes(value))
        return None

    def prune_history(self, before: float, batch: int = 10000) -> int:
        """Forget finished objects received before ``before`` (their routing records and index
        entries); objects still outstanding anywhere are never pruned."""
        n = 0
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=self._meta)
            doomed: list[tuple[bytes, RoutingRecord]] = []
            for key, raw in cur:
                rec = decode_record(raw)
                if rec.received_at >= before:
                    break
                if not rec.outstanding:
                    doomed.append((bytes(key), rec))
                if len(doomed) >= batch:
                    break
            for key, rec in doomed:
                txn.delete(key, db=self._meta)
                sop = rec.sop_instance_uid.encode()
                if txn.get(sop, db=self._sop) == key:
                    txn.delete(sop, db=self._sop)
                for ikey in rec.index_keys():
                    txn.delete(ikey, key, db=self._idx)
                n += 1
        return n

    def retry_failed(self, dest: str, oids: Iterable[int] | None = None) -> int:
        """Move failed entries back to pending with a fresh attempt count."""
        wanted = set(oids) if oids is not None else None
        n = 0
        with self.env.begin(write=True) as txn:
            for key, _ in list(iter_prefix(txn, qprefix(dest, _F), self._q)):
                _, _, oid = split_qkey(key)
                if wanted is not None and oid not in wanted:
                    continue
                txn.delete(key, db=self._q)
                txn.put(qkey(dest, self._class_of(txn, oid), oid), NEW_ENTRY, db=self._q)
                n += 1
        return n

    def make_due(self, dest: str, now: float) -> int:
        """Make a destination's pending entries that wait out their own backoff due now
        (send-now); their attempt counts are kept, so ``max_attempts`` still holds."""
        n = 0
        with self.env.begin(write=True, db=self._q) as txn:
            for key, value in [*iter_prefix(txn, qprefix(dest, _P)), *iter_prefix(txn, qprefix(dest, _B))]:
                if QueueRecord.next_at_of(value) > now:
                    txn.put(key, dataclasses.replace(QueueRecord.decode(value), next_at=0.0).encode())
                    n += 1
        return n

    def purge(self, dest: str, states: Sequence[QueueState], oids: Iterable[int] | None = None,
              reason: str = "") -> list[int]:
        """Remove entries of ``dest`` in ``states`` (PENDING includes BULK); an object's bytes
        go with its last reference."""
        wanted = set(oids) if oids is not None else None
        removed = []
        now = time.time()
        if QueueState.PENDING in states and QueueState.BULK not in states:
            states = [*states, QueueState.BULK]
        with self.env.begin(write=True) as txn:
            for state in states:
                for key, _ in list(iter_prefix(txn, qprefix(dest, state.code), self._q)):
                    _, _, oid = split_qkey(key)
                    if wanted is not None and oid not in wanted:
                        continue
                    txn.delete(key, db=self._q)
                    self._drop_dest(txn, oid, dest, drop=Drop(now, DropReason.PURGED, reason))
                    removed.append(oid)
            if removed:
                self._incr(txn, CounterKind.PURGED, dest, len(removed))
        return removed


__all__ = [
    "UNROUTED", "DIGEST_BYTES", "Incoming", "PutResult", "Claimed", "Outcome", "QueueStats", "QueueEntry",
    "Queues", "content_digest", "oid_key",
]
