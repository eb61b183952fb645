"""The spool's typed records and their ONE codec (``encode_*`` / ``decode_*``).

Two kinds of value live in LMDB:

* the routing record of an object (``meta`` sub-database): JSON, because operators read it
  through the API and it changes shape rarely. Version 2 writes each delivery, failure and
  drop as an object with named fields; the decoder still reads version 1, written before the
  package was split, where they were lists (``delivered[dest] = [t, status, syntax?]``: the
  third slot, named ``error`` then, carried the transcoded syntax; ``failed[dest] = [t,
  status, error]``; ``dropped[dest] = [t, how, error, by?]``). Old spools are read as they
  are, without a migration: a record is rewritten in version 2 the next time it changes.
* a queue entry (``q`` sub-database): a packed struct plus the last error text, unchanged
  from the first spool format.

Nothing outside this module builds or parses those bytes.
"""
from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

from fastroute.spool.shards import Location

RECORD_VERSION = 2


class QueueState(enum.StrEnum):
    """Where an object stands at one destination; the one-letter code is part of its queue key."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    FAILED = "failed"
    UNROUTED = "unrouted"     # held at the pseudo-destination of objects no rule routed
    # pending, of a migration (routing record ``migration``): the BULK class, claimed only
    # once the destination has no clinical (PENDING) object due, so a migration never
    # starves the clinical traffic through the same router (issue 13)
    BULK = "bulk"
    # held back from this destination by its content plan (issue 15: a de-identified copy of
    # an object with burned-in annotation): listed, audited, never sent, purged by an operator
    QUARANTINED = "quarantined"

    @property
    def code(self) -> bytes:
        return _STATE_CODES[self]

    @classmethod
    def from_code(cls, code: bytes) -> QueueState:
        return _CODE_STATES[bytes(code)]


_STATE_CODES = {QueueState.PENDING: b"P", QueueState.IN_FLIGHT: b"I", QueueState.FAILED: b"F",
                QueueState.UNROUTED: b"U", QueueState.BULK: b"B", QueueState.QUARANTINED: b"Q"}
_CODE_STATES = {v: k for k, v in _STATE_CODES.items()}


class OutcomeKind(enum.StrEnum):
    """What a sender reports for one claimed object."""

    DELIVERED = "delivered"   # success or warning status
    RETRY = "retry"           # transient failure: pending again after its backoff, one attempt spent
    FAILED = "failed"         # permanent failure, or out of attempts: kept in the failed state
    RELEASE = "release"       # not attempted (destination down, stopping): pending, no attempt spent
    QUARANTINE = "quarantine"  # not to be sent there (issue 15): kept in the quarantined state


class DropReason(enum.StrEnum):
    """Why a destination was taken off an object without a delivery."""

    SUPERSEDED = "superseded"  # a newer copy of the same SOP instance replaced it while pending
    PURGED = "purged"          # an operator removed it


@dataclass(frozen=True, slots=True)
class Delivery:
    at: float
    status: int | None
    syntax: str = ""           # the transfer syntax it was converted to, when it was


@dataclass(frozen=True, slots=True)
class Failure:
    at: float
    status: int | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Drop:
    at: float
    how: DropReason
    reason: str = ""
    by: int | None = None      # the oid of the copy that superseded it


@dataclass(frozen=True, slots=True)
class Suppression:
    """The earlier delivery a suppressed re-send matched (duplicate_window): its copy and time."""

    delivered_at: float
    oid: int | None = None     # None for deliveries recorded before the oid was kept


# Routing-record keys with a field of their own; any other key read is kept in ``extra``.
_NAMED = frozenset(("sop_class_uid", "sop_instance_uid", "transfer_syntax", "size", "digest", "received_at",
          "outstanding", "routed_to", "suppressed", "duplicate_of", "delivered", "failed", "dropped",
          "study_instance_uid", "series_instance_uid", "patient_id", "accession_number", "modality",
          "calling_ae", "called_ae", "peer", "rules", "v"))


@dataclass(slots=True)
class RoutingRecord:
    """Everything the router knows about one object: identifiers, source, and where it went."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    size: int
    received_at: float
    digest: str = ""                                       # content_digest, hex; "" until taken
    outstanding: list[str] = field(default_factory=list)   # destinations still to deliver to
    routed_to: list[str] = field(default_factory=list)
    suppressed: list[str] = field(default_factory=list)    # identical bytes already delivered there
    duplicate_of: dict[str, Suppression] = field(default_factory=dict)  # per suppressed destination
    delivered: dict[str, Delivery] = field(default_factory=dict)
    failed: dict[str, Failure] = field(default_factory=dict)   # the last failure, per destination
    dropped: dict[str, Drop] = field(default_factory=dict)
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    patient_id: str = ""
    accession_number: str = ""
    modality: str = ""
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""
    rules: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def index_keys(self) -> list[bytes]:
        """The ``idx`` keys of this object: Study UID, Accession Number, Patient ID."""
        return [prefix + value.encode()[:400] for prefix, value in
                ((b"s", self.study_instance_uid), (b"a", self.accession_number), (b"p", self.patient_id))
                if value]

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data (the API's and the codec's form)."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            v=RECORD_VERSION, sop_class_uid=self.sop_class_uid, sop_instance_uid=self.sop_instance_uid,
            transfer_syntax=self.transfer_syntax, size=self.size, digest=self.digest,
            received_at=self.received_at, outstanding=self.outstanding, routed_to=self.routed_to,
            suppressed=self.suppressed,
            delivered={d: _delivery_json(e) for d, e in self.delivered.items()},
            failed={d: _failure_json(e) for d, e in self.failed.items()},
            study_instance_uid=self.study_instance_uid, series_instance_uid=self.series_instance_uid,
            patient_id=self.patient_id, accession_number=self.accession_number, modality=self.modality,
            calling_ae=self.calling_ae, called_ae=self.called_ae, peer=self.peer, rules=self.rules)
        if self.dropped:   # rare: written only when there is one, as in version 1
            out["dropped"] = {d: _drop_json(e) for d, e in self.dropped.items()}
        if self.duplicate_of:   # only with duplicate_window on, and then rare
            out["duplicate_of"] = {d: suppression_json(e) for d, e in self.duplicate_of.items()}
        return out


def _delivery_json(e: Delivery) -> dict[str, Any]:
    out: dict[str, Any] = {"at": e.at, "status": e.status}
    if e.syntax:
        out["syntax"] = e.syntax
    return out


def _failure_json(e: Failure) -> dict[str, Any]:
    return {"at": e.at, "status": e.status, "error": e.error}


def _drop_json(e: Drop) -> dict[str, Any]:
    out: dict[str, Any] = {"at": e.at, "how": str(e.how), "reason": e.reason}
    if e.by is not None:
        out["by"] = e.by
    return out


def suppression_json(e: Suppression) -> dict[str, Any]:
    return {"delivered_at": e.delivered_at, "oid": e.oid}


def _suppression(raw: Any) -> Suppression:
    oid = raw.get("oid")
    return Suppression(float(raw["delivered_at"]), None if oid is None else int(oid))


def _status(value: Any) -> int | None:
    return None if value is None else int(value)


def _delivery(raw: Any) -> Delivery:
    if isinstance(raw, dict):
        return Delivery(float(raw["at"]), _status(raw.get("status")), raw.get("syntax") or "")
    rec = list(raw) + [None, None, ""]          # version 1: [t, status, syntax?]
    return Delivery(float(rec[0]), _status(rec[1]), rec[2] or "")


def _failure(raw: Any) -> Failure:
    if isinstance(raw, dict):
        return Failure(float(raw["at"]), _status(raw.get("status")), raw.get("error") or "")
    rec = list(raw) + [None, None, ""]          # version 1: [t, status, error]
    return Failure(float(rec[0]), _status(rec[1]), rec[2] or "")


def _drop(raw: Any) -> Drop:
    if isinstance(raw, dict):
        by = raw.get("by")
        return Drop(float(raw["at"]), DropReason(raw["how"]), raw.get("reason") or "",
                    None if by is None else int(by))
    rec = list(raw) + [None, None, "", None]    # version 1: [t, how, error, by?]
    return Drop(float(rec[0]), DropReason(rec[1]), rec[2] or "", int(rec[3]) if rec[3] else None)


def record_from_json(d: dict[str, Any]) -> RoutingRecord:
    """A record from its JSON form, version 1 (lists) or 2 (objects)."""
    return RoutingRecord(
        sop_class_uid=d["sop_class_uid"], sop_instance_uid=d["sop_instance_uid"],
        transfer_syntax=d["transfer_syntax"], size=int(d.get("size", 0)),
        received_at=float(d["received_at"]), digest=d.get("digest") or "",
        outstanding=list(d.get("outstanding") or ()), routed_to=list(d.get("routed_to") or ()),
        suppressed=list(d.get("suppressed") or ()),
        duplicate_of={k: _suppression(v) for k, v in (d.get("duplicate_of") or {}).items()},
        delivered={k: _delivery(v) for k, v in (d.get("delivered") or {}).items()},
        failed={k: _failure(v) for k, v in (d.get("failed") or {}).items()},
        dropped={k: _drop(v) for k, v in (d.get("dropped") or {}).items()},
        study_instance_uid=d.get("study_instance_uid") or "",
        series_instance_uid=d.get("series_instance_uid") or "",
        patient_id=d.get("patient_id") or "", accession_number=d.get("accession_number") or "",
        modality=d.get("modality") or "", calling_ae=d.get("calling_ae") or "",
        called_ae=d.get("called_ae") or "", peer=d.get("peer") or "", rules=list(d.get("rules") or ()),
        extra={k: v for k, v in d.items() if k not in _NAMED})


def _dumps(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()


def encode_record(rec: RoutingRecord) -> bytes:
    return _dumps(rec.to_json())


# -- the commit paths' forms: the same JSON, without building a RoutingRecord -----------------
# put, claim and settle run once per object (settle once per destination), so they read and
# edit the JSON form directly; tests hold them to decode_record/encode_record.



def encode_new_record(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, size: int,
                      received_at: float, digest: str, outstanding: list[str], routed_to: list[str],
                      suppressed: list[str], meta: Mapping[str, Any],
                      duplicate_of: Mapping[str, Suppression] | None = None) -> tuple[bytes, list[bytes]]:
    """A new object's record (``meta``: the receive path's identifiers, source and rules;
    keys without a field are kept as ``extra``), and its ``idx`` keys."""
    d: dict[str, Any] = dict(meta)    # identifiers, source, rules (absent ones decode as "" / [])
    d.update(v=RECORD_VERSION, sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
             transfer_syntax=transfer_syntax, size=size, digest=digest, received_at=received_at,
             outstanding=outstanding, routed_to=routed_to, suppressed=suppressed, delivered={}, failed={})
    if duplicate_of:
        d["duplicate_of"] = {dest: suppression_json(e) for dest, e in duplicate_of.items()}
    keys = [prefix + str(value).encode()[:400] for prefix, value in
            ((b"s", d.get("study_instance_uid")), (b"a", d.get("accession_number")), (b"p", d.get("patient_id")))
            if value]
    return _dumps(d), keys


class ClaimFields(NamedTuple):
    """What a sender needs of a record to send the object."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    size: int
    calling_ae: str
    digest: bytes
    study_instance_uid: str = ""    # for the sender's log lines (already decoded: no extra read)
    loc: Location | None = None     # the shard holding its bytes (``loc``; none: the shared env)


def decode_claim_fields(raw: bytes | memoryview) -> ClaimFields:
    d = json.loads(bytes(raw))
    return ClaimFields(d["sop_class_uid"], d["sop_instance_uid"], d["transfer_syntax"], int(d.get("size", 0)),
                       d.get("calling_ae") or "", bytes.fromhex(d.get("digest") or ""),
                       d.get("study_instance_uid") or "", _location(d.get("loc")))


def _location(raw: Any) -> Location | None:
    """A record's ``loc`` ([shard, key], written by a shard owner's put); absent in records
    written without shards, whose bytes are in the shared environment."""
    return Location(int(raw[0]), int(raw[1])) if raw else None


class RecordFacts(NamedTuple):
    """What the commit paths need of a record they have just updated."""

    sop_instance_uid: str
    study_instance_uid: str
    calling_ae: str
    size: int
    received_at: float
    digest: str
    finished: bool          # no destination outstanding: the object's bytes can go


def update_record(raw: bytes | memoryview, dest: str, *, delivery: Delivery | None = None,
                  failure: Failure | None = None, drop: Drop | None = None,
                  digest: str = "") -> tuple[bytes, RecordFacts]:
    """Record a delivery, failure or drop at ``dest`` (a delivery or drop also takes it off
    the outstanding list); ``digest`` is kept when the record has none yet. A version-1
    record is rewritten in version 2 on the way."""
    d = json.loads(bytes(raw))
    if d.get("v") != RECORD_VERSION:
        d = record_from_json(d).to_json()
    if digest and not d.get("digest"):
        d["digest"] = digest
    if delivery is not None or drop is not None:
        outstanding = d["outstanding"]
        if dest in outstanding:
            outstanding.remove(dest)
    if delivery is not None:
        d["delivered"][dest] = _delivery_json(delivery)
    if failure is not None:
        d["failed"][dest] = _failure_json(failure)
    if drop is not None:
        d.setdefault("dropped", {})[dest] = _drop_json(drop)
    return _dumps(d), RecordFacts(d["sop_instance_uid"], d.get("study_instance_uid") or "",
                                  d.get("calling_ae") or "", int(d.get("size", 0)), float(d["received_at"]),
                                  d.get("digest") or "", not d["outstanding"])


def decode_record(raw: bytes | memoryview) -> RoutingRecord:
    return record_from_json(json.loads(bytes(raw)))


def decode_received_at(raw: bytes | memoryview) -> float:
    """Only the arrival time (queue ages), without building the whole record."""
    return float(json.loads(bytes(raw))["received_at"])


# -- queue entries --------------------------------------------------------------------------

_REC = struct.Struct("<IdiI")   # attempts, next_at, last_status (-1 none), unknown_outcomes
ERROR_LIMIT = 2000              # bytes of error text kept with a queue entry


@dataclass(frozen=True, slots=True)
class QueueRecord:
    """The value of a queue entry: the retry bookkeeping of one object at one destination."""

    attempts: int = 0
    next_at: float = 0.0
    last_status: int | None = None
    # deliveries that ended without a response IN A ROW (a response resets it; the
    # destination's total is the ``unknown_outcomes`` counter)
    unknown_outcomes: int = 0
    error: str = ""

    def encode(self) -> bytes:
        return QueueRecord.pack(self.attempts, self.next_at, self.last_status, self.unknown_outcomes, self.error)

    @staticmethod
    def pack(attempts: int, next_at: float, last_status: int | None, unknown_outcomes: int,
             error: str = "") -> bytes:
        """``QueueRecord(...).encode()`` without the object, for the settle path."""
        head = _REC.pack(attempts, next_at, -1 if last_status is None else last_status, unknown_outcomes)
        return head + error.encode()[:ERROR_LIMIT] if error else head

    @staticmethod
    def decode(raw: bytes | memoryview) -> QueueRecord:
        attempts, next_at, status, unknown = _REC.unpack_from(raw)
        error = bytes(raw[_REC.size:]).decode(errors="replace")
        return QueueRecord(attempts, next_at, None if status < 0 else status, unknown, error)

    @staticmethod
    def counts_of(raw: bytes | memoryview) -> tuple[int, int]:
        """(attempts, unknown_outcomes) alone: what settling reads of the entry it removes."""
        attempts, _, _, unknown = _REC.unpack_from(raw)
        return attempts, unknown

    @staticmethod
    def next_at_of(raw: bytes | memoryview) -> float:
        """The due time alone: the claim scan reads only this."""
        return float(_REC.unpack_from(raw)[1])


NEW_ENTRY = QueueRecord().encode()

__all__ = [
    "RECORD_VERSION", "QueueState", "OutcomeKind", "DropReason", "Delivery", "Failure", "Drop",
    "RoutingRecord", "record_from_json", "encode_record", "decode_record", "decode_received_at",
    "encode_new_record", "ClaimFields", "decode_claim_fields", "RecordFacts", "update_record",
    "QueueRecord", "NEW_ENTRY",
]
