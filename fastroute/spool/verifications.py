"""Verification by C-FIND (issue 14, ``verify: find``): what a destination was delivered and
has not been seen to index yet, and each study's verification state, in the ``scmt``
sub-database beside storage commitment's records.

It shares storage commitment's *hold*: a delivered object's bytes stay in the spool while
``h`` oid(8) holder exists, and go once no holder is left (``Commitments._drop_if_done``). A
verification hold names its destination with a ``\\0verify`` suffix, so a destination with
both commitment and verification on keeps the bytes until both are satisfied, and neither
mechanism ends the other's hold.

Keys (by first byte, none shared with :mod:`commitments`):

``v`` dest                          -> b"1" while the destination verifies (its sender sets it)
``V`` dest 0 study 0 oid(8)         -> JSON [sop class, sop instance]: delivered, not verified
``Y`` dest 0 study                  -> JSON :class:`StudyVerification`
``W`` dest 0 study                  -> b"" while the study waits (the verifier's scan: verified
                                       studies are not read again every round)
``F`` dest 0 study                  -> failed at (>d) while the study is verify-failed: the views'
                                       count and the alert's reading (failures of the last
                                       FAILED_WINDOW seconds, so the alert clears by itself)
``u`` oid(8) dest                   -> the object's :class:`VerifyState` at ``dest``
``h`` oid(8) dest 0 "verify"        -> b"" the hold
"""
from __future__ import annotations

import enum
import json
import logging
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import lmdb

from fastroute.logsetup import fields
from fastroute.spool.audit import AuditChain
from fastroute.spool.commitments import Commitments, _prefix_items
from fastroute.spool.counters import CounterKind, incr

log = logging.getLogger("fastroute.spool")

_U64 = struct.Struct(">Q")
_HOLD = b"\0verify"
_AT = struct.Struct(">d")
FAILED_WINDOW = 86400.0      # a verify-failed study counts in the views and the alert for a day


class VerifyState(enum.StrEnum):
    WAITING = "waiting"              # delivered; the study has not settled or not been queried yet
    VERIFIED = "verified"            # the destination's C-FIND listed it (or the study's count sufficed)
    VERIFY_FAILED = "verify-failed"  # still missing after ``verify_attempts`` re-sends


@dataclass(slots=True)
class StudyVerification:
    """One study at one destination. ``last_delivered`` restarts the quiet period on every
    delivery (a re-send too); ``attempts`` counts verifications that found something missing."""

    destination: str
    study_instance_uid: str
    state: str = VerifyState.WAITING.value
    last_delivered: float = 0.0
    attempts: int = 0
    verified_total: int = 0          # instances verified at this destination (earlier rounds too)
    checked_at: float = 0.0
    missing: list[str] = field(default_factory=list)
    by_count: bool = False           # the last check compared NumberOfStudyRelatedInstances only

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @staticmethod
    def decode(raw: bytes | memoryview) -> StudyVerification:
        return StudyVerification(**json.loads(bytes(raw)))


@dataclass(frozen=True, slots=True)
class Delivered:
    oid: int
    sop_class_uid: str
    sop_instance_uid: str


def _oid(oid: int) -> bytes:
    return _U64.pack(oid)


def _skey(dest: str, study: str) -> bytes:
    return b"Y" + dest.encode() + b"\0" + study.encode()


def _wkey(dest: str, study: str) -> bytes:
    return b"W" + dest.encode() + b"\0" + study.encode()


def _vprefix(dest: str, study: str) -> bytes:
    return b"V" + dest.encode() + b"\0" + study.encode() + b"\0"


class Verifications:
    """Every verification record; each change in one write transaction (its own, or the
    settle's for what a delivery records)."""

    def __init__(self, env: lmdb.Environment, db: Any, info: Any, audit: AuditChain,
                 commitments: Commitments) -> None:
        self.env, self.db, self._info, self.audit = env, db, info, audit
        self.commitments = commitments

    # -- the destination's switch -----------------------------------------------------------

    def set_enabled(self, dest: str, on: bool) -> int:
        """Switch verification on or off for a destination (its sender, at start). Off, its
        holds end (their bytes go when nothing else needs them) and nothing waits any more.
        Returns how many objects were let go."""
        key = b"v" + dest.encode()
        name = dest.encode()
        released = 0
        with self.env.begin(write=True, db=self.db) as txn:
            if on:
                txn.put(key, b"1")
                return 0
            if not txn.delete(key):
                return 0
            for k, _ in _prefix_items(txn, self.db, b"V" + name + b"\0"):
                txn.delete(k)
                oid = _U64.unpack(k[-8:])[0]
                if txn.delete(b"h" + _oid(oid) + name + _HOLD):
                    self.commitments._drop_if_done(txn, oid)
                    released += 1
            for k, _ in _prefix_items(txn, self.db, b"W" + name + b"\0"):
                txn.delete(k)
                txn.delete(b"Y" + k[1:])
            for k, _ in _prefix_items(txn, self.db, b"F" + name + b"\0"):
                txn.delete(k)
        if released:
            log.warning("destination=%s: verification switched off; %d delivered object(s) no longer wait "
                        "for it", dest, released, extra=fields(destination=dest))
        return released

    def enabled(self, txn: lmdb.Transaction, dest: str) -> bool:
        return txn.get(b"v" + dest.encode(), db=self.db) is not None

    # -- delivery (inside the settle's transaction) ------------------------------------------

    def on_delivered(self, txn: lmdb.Transaction, oid: int, dest: str, record: bytes, now: float) -> bool:
        """A delivery to ``dest`` was recorded: when it verifies, hold the bytes, list the
        instance for its study's verification and restart the study's quiet period."""
        if not self.enabled(txn, dest):
            return False
        d = json.loads(record)
        study = str(d.get("study_instance_uid") or "")
        txn.put(b"h" + _oid(oid) + dest.encode() + _HOLD, b"", db=self.db)
        txn.put(_vprefix(dest, study) + _oid(oid),
                json.dumps([d["sop_class_uid"], d["sop_instance_uid"]]).encode(), db=self.db)
        txn.put(b"u" + _oid(oid) + dest.encode(), VerifyState.WAITING.value.encode(), db=self.db)
        raw = txn.get(_skey(dest, study), db=self.db)
        sv = StudyVerification.decode(raw) if raw is not None else StudyVerification(dest, study)
        if sv.state != VerifyState.WAITING.value:    # more of a finished study: a fresh round of re-sends
            sv.attempts, sv.missing = 0, []
        sv.state = VerifyState.WAITING.value
        sv.last_delivered = max(sv.last_delivered, now)
        txn.put(_skey(dest, study), sv.encode(), db=self.db)
        txn.put(_wkey(dest, study), b"", db=self.db)
        txn.delete(b"F" + _wkey(dest, study)[1:], db=self.db)    # delivered again: waits again
        return True

    def release(self, txn: lmdb.Transaction, oid: int, dest: str) -> None:
        """``dest`` no longer needs the object (superseded or purged there): its hold ends;
        the verifier skips a listed instance without a hold."""
        if txn.delete(b"h" + _oid(oid) + dest.encode() + _HOLD, db=self.db):
            txn.delete(b"u" + _oid(oid) + dest.encode(), db=self.db)

    # -- the verifier's reads ----------------------------------------------------------------

    def waiting_studies(self, dest: str) -> list[StudyVerification]:
        out = []
        with self.env.begin(db=self.db) as txn:
            for k, _ in _prefix_items(txn, self.db, b"W" + dest.encode() + b"\0"):
                raw = txn.get(b"Y" + k[1:])
                if raw is not None:
                    out.append(StudyVerification.decode(raw))
        return out

    def study(self, dest: str, study: str) -> StudyVerification | None:
        with self.env.begin(db=self.db) as txn:
            raw = txn.get(_skey(dest, study))
            return StudyVerification.decode(raw) if raw is not None else None

    def delivered(self, dest: str, study: str) -> list[Delivered]:
        """The study's instances delivered to ``dest`` and not verified yet (still held)."""
        prefix = _vprefix(dest, study)
        out = []
        with self.env.begin(db=self.db) as txn:
            for k, v in _prefix_items(txn, self.db, prefix):
                oid = _U64.unpack(k[-8:])[0]
                if txn.get(b"h" + _oid(oid) + dest.encode() + _HOLD) is None:
                    continue     # released (purged, superseded): nothing to verify any more
                sop_class, sop_uid = json.loads(v)
                out.append(Delivered(oid, sop_class, sop_uid))
        return out

    # -- outcomes ----------------------------------------------------------------------------

    def verified(self, dest: str, study: str, instances: Iterable[Delivered], now: float, *,
                 by_count: bool, calling: str = "") -> StudyVerification:
        """The destination lists them: their holds end and the study is ``verified``."""
        items = list(instances)
        with self.env.begin(write=True, db=self.db) as txn:
            sv = self._load(txn, dest, study)
            for i in items:
                self._settle_one(txn, dest, study, i.oid, VerifyState.VERIFIED)
            sv.verified_total += len(items)
            sv.checked_at, sv.missing, sv.by_count = now, [], by_count
            # a delivery since the query listed more: the study waits for its next settle
            sv.state = (VerifyState.WAITING.value if _prefix_items(txn, self.db, _vprefix(dest, study))
                        else VerifyState.VERIFIED.value)
            txn.put(_skey(dest, study), sv.encode())
            if sv.state == VerifyState.VERIFIED.value:
                txn.delete(_wkey(dest, study))
            incr(txn, self._info, CounterKind.VERIFIED, dest, by=len(items))
            self.audit.append(txn, {"action": "verified", "destination": dest, "study_instance_uid": study,
                                    "instances": len(items), "by_count": by_count, "verifier": calling}, now)
        return sv

    def resent(self, dest: str, study: str, missing: Iterable[Delivered], now: float, *,
               by_count: bool, queues: Any) -> StudyVerification:
        """What the destination lacks is queued again (its bytes are held); the study waits
        to settle again. ``attempts`` counts this."""
        items = list(missing)
        with self.env.begin(write=True) as txn:
            sv = self._load(txn, dest, study)
            sv.attempts += 1
            sv.checked_at, sv.by_count = now, by_count
            sv.missing = [i.sop_instance_uid for i in items]
            sv.last_delivered = now    # the quiet period starts again from the re-send
            for i in items:
                queues.requeue(txn, dest, i.oid, now, "not found at the destination by C-FIND; re-sent")
            txn.put(_skey(dest, study), sv.encode(), db=self.db)
            self.audit.append(txn, {"action": "verify-resent", "destination": dest, "study_instance_uid": study,
                                    "attempt": sv.attempts, "by_count": by_count,
                                    "missing": sv.missing[:1000]}, now)
        return sv

    def failed(self, dest: str, study: str, delivered: Iterable[Delivered], missing: Iterable[str],
               now: float, *, by_count: bool) -> StudyVerification:
        """Still missing after the re-sends: the study is ``verify-failed`` with the list; all
        its holds end (the bytes cannot stay forever; the routing records and the audit keep
        what was sent)."""
        lost = set(missing)
        with self.env.begin(write=True, db=self.db) as txn:
            sv = self._load(txn, dest, study)
            ok = 0
            for i in delivered:
                bad = by_count or i.sop_instance_uid in lost
                ok += not bad
                self._settle_one(txn, dest, study, i.oid, VerifyState.VERIFY_FAILED if bad else VerifyState.VERIFIED)
            sv.verified_total += ok
            if ok:     # listed ones are verified, also in a study that failed
                incr(txn, self._info, CounterKind.VERIFIED, dest, by=ok)
            sv.state, sv.checked_at, sv.by_count = VerifyState.VERIFY_FAILED.value, now, by_count
            sv.missing = sorted(lost)
            txn.put(_skey(dest, study), sv.encode())
            txn.delete(_wkey(dest, study))
            txn.put(b"F" + _wkey(dest, study)[1:], _AT.pack(now))
            incr(txn, self._info, CounterKind.VERIFY_FAILED, dest)
            self.audit.append(txn, {"action": "verify-failed", "destination": dest, "study_instance_uid": study,
                                    "attempts": sv.attempts, "by_count": by_count,
                                    "missing": sv.missing[:1000]}, now)
        return sv

    def _load(self, txn: lmdb.Transaction, dest: str, study: str) -> StudyVerification:
        raw = txn.get(_skey(dest, study), db=self.db)
        return StudyVerification.decode(raw) if raw is not None else StudyVerification(dest, study)

    def _settle_one(self, txn: lmdb.Transaction, dest: str, study: str, oid: int, state: VerifyState) -> None:
        txn.delete(_vprefix(dest, study) + _oid(oid), db=self.db)
        txn.put(b"u" + _oid(oid) + dest.encode(), state.value.encode(), db=self.db)
        if txn.delete(b"h" + _oid(oid) + dest.encode() + _HOLD, db=self.db):
            self.commitments._drop_if_done(txn, oid)

    # -- views -------------------------------------------------------------------------------

    def states(self, oid: int) -> dict[str, VerifyState]:
        """The object's verification state per destination that verifies."""
        prefix = b"u" + _oid(oid)
        with self.env.begin(db=self.db) as txn:
            return {k[len(prefix):].decode(): VerifyState(v.decode())
                    for k, v in _prefix_items(txn, self.db, prefix)}

    def counts(self, txn: lmdb.Transaction, dest: str, now: float) -> tuple[int, int]:
        """(studies waiting to be verified, studies verify-failed in the last FAILED_WINDOW) at
        ``dest``: the alert clears a day after the last failure without an operator's step."""
        waiting = len(_prefix_items(txn, self.db, b"W" + dest.encode() + b"\0"))
        failed = sum(1 for _, v in _prefix_items(txn, self.db, b"F" + dest.encode() + b"\0")
                     if len(v) == _AT.size and now - _AT.unpack(v)[0] < FAILED_WINDOW)
        return waiting, failed
