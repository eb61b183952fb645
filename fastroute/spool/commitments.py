"""Storage commitment as SCU (issue 14): which delivered objects a destination still has to
commit, the transactions asked for, and each object's commitment state, in the ``scmt``
sub-database.

An object delivered to a destination with ``commitment`` on is ``delivered`` there; its
sender asks for commitment per study (a Transaction UID -> instances record, ``requested``);
the destination's N-EVENT-REPORT makes each instance ``committed`` or ``commit-failed`` (then
it is queued again for that destination, re-sent and re-requested). Until committed its bytes
stay in the spool (a *hold*): the delivery that would have removed them keeps them, and the
commitment that follows removes them once nothing else needs them.

Keys (one sub-database, by first byte):

``c`` dest                 -> b"1" while the destination asks for commitment (its sender sets it)
``h`` oid(8) dest          -> b""  hold: the object's bytes stay until ``dest`` committed it
``o`` oid(8) dest          -> JSON {s: state, tx, at, reason}: the object's state at ``dest``
``w`` dest 0 study 0 oid(8) -> JSON [sop class, sop instance]: delivered, not yet requested
``t`` transaction uid      -> JSON :class:`Transaction`
"""
from __future__ import annotations

import enum
import json
import logging
import os
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import lmdb

from fastroute.logsetup import fields
from fastroute.spool.audit import AuditChain
from fastroute.spool.counters import CounterKind, incr
from fastroute.spool.staging import owner_alive

log = logging.getLogger("fastroute.spool")

_U64 = struct.Struct(">Q")


class CommitState(enum.StrEnum):
    DELIVERED = "delivered"            # delivered, commitment not asked for yet
    REQUESTED = "requested"            # in a transaction the destination has not answered
    COMMITTED = "committed"
    COMMIT_FAILED = "commit-failed"    # the report failed it: queued again, re-sent, re-requested


@dataclass(frozen=True, slots=True)
class Instance:
    oid: int
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(slots=True)
class Transaction:
    """One N-ACTION's worth: a destination, one study's delivered instances, when asked."""

    uid: str
    destination: str
    study_instance_uid: str
    requested_at: float
    instances: list[Instance]
    attempts: int = 1                  # N-ACTIONs sent for it (a re-request reuses the UID)
    alerted: bool = False              # unanswered after the re-request: alerted, still open

    def encode(self) -> bytes:
        d = asdict(self)
        d["instances"] = [[i.oid, i.sop_class_uid, i.sop_instance_uid] for i in self.instances]
        return json.dumps(d, separators=(",", ":")).encode()

    @staticmethod
    def decode(raw: bytes | memoryview) -> Transaction:
        d = json.loads(bytes(raw))
        d["instances"] = [Instance(int(o), c, s) for o, c, s in d["instances"]]
        return Transaction(**d)


@dataclass(frozen=True, slots=True)
class ObjectCommit:
    """One object's commitment state at one destination."""

    destination: str
    state: CommitState
    transaction_uid: str = ""
    at: float = 0.0
    reason: int | None = None          # the Failure Reason of a commit-failed instance


@dataclass(slots=True)
class Completion:
    """What a report did: for the log line, the counters and the caller's wake-up."""

    destination: str = ""
    study_instance_uid: str = ""
    committed: list[str] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)
    known: bool = True                 # False: no such transaction (late, duplicate or foreign)


def _oid(oid: int) -> bytes:
    return _U64.pack(oid)


def _prefix_items(txn: lmdb.Transaction, db: Any, prefix: bytes) -> list[tuple[bytes, bytes]]:
    cur = txn.cursor(db=db)
    out = []
    if cur.set_range(prefix):
        for k, v in cur:
            k = bytes(k)
            if not k.startswith(prefix):
                break
            out.append((k, bytes(v)))
    return out


class Commitments:
    """Every storage-commitment record, each change in one write transaction (its own, or the
    settle's for the hold taken on delivery). ``queues`` gives the two moves it needs of the
    queue: queue an object again for a destination, and drop an object's bytes."""

    def __init__(self, env: lmdb.Environment, db: Any, info: Any, meta: Any, audit: AuditChain,
                 queues: Any) -> None:
        self.env, self.db, self._info, self._meta = env, db, info, meta
        self.audit = audit
        self.queues = queues

    # -- the destination's switch -----------------------------------------------------------

    def set_enabled(self, dest: str, on: bool) -> int:
        """Switch a destination's commitment on or off (its sender, at start). Switched off,
        whatever it still held is let go: no report will come for it. Returns how many
        objects were let go."""
        key = b"c" + dest.encode()
        released = 0
        with self.env.begin(write=True) as txn:
            if on:
                txn.put(key, b"1", db=self.db)
                return 0
            if not txn.delete(key, db=self.db):
                return 0
            name = dest.encode()
            for k, v in _prefix_items(txn, self.db, b"h"):
                if k[9:] == name:
                    txn.delete(k, db=self.db)
                    self._drop_if_done(txn, _U64.unpack(k[1:9])[0])
                    released += 1
            for k, _ in _prefix_items(txn, self.db, b"w" + name + b"\0"):
                txn.delete(k, db=self.db)
            for k, v in _prefix_items(txn, self.db, b"t"):
                if Transaction.decode(v).destination == dest:
                    txn.delete(k, db=self.db)
        if released:
            log.warning("destination=%s: storage commitment switched off; %d delivered object(s) no longer "
                        "wait for a report", dest, released, extra=fields(destination=dest))
        return released

    def enabled(self, txn: lmdb.Transaction, dest: str) -> bool:
        return txn.get(b"c" + dest.encode(), db=self.db) is not None

    # -- delivery (inside the settle's transaction) ------------------------------------------

    def on_delivered(self, txn: lmdb.Transaction, oid: int, dest: str, record: bytes, now: float) -> bool:
        """A delivery to ``dest`` was recorded: when it asks for commitment, hold the bytes
        and wait for a request. True when this destination holds them."""
        if self.enabled(txn, dest):
            d = json.loads(record)
            study = str(d.get("study_instance_uid") or "")
            txn.put(b"h" + _oid(oid) + dest.encode(), b"", db=self.db)
            txn.put(b"w" + dest.encode() + b"\0" + study.encode() + b"\0" + _oid(oid),
                    json.dumps([d["sop_class_uid"], d["sop_instance_uid"]]).encode(), db=self.db)
            self._set_state(txn, oid, dest, CommitState.DELIVERED, "", now)
            return True
        return False

    def release(self, txn: lmdb.Transaction, oid: int, dest: str) -> None:
        """``dest`` no longer needs the object (dropped there): its hold, if any, ends."""
        if txn.delete(b"h" + _oid(oid) + dest.encode(), db=self.db):
            txn.delete(b"o" + _oid(oid) + dest.encode(), db=self.db)

    def held(self, txn: lmdb.Transaction, oid: int) -> bool:
        cur = txn.cursor(db=self.db)
        prefix = b"h" + _oid(oid)
        return bool(cur.set_range(prefix)) and bytes(cur.key()).startswith(prefix)

    def _set_state(self, txn: lmdb.Transaction, oid: int, dest: str, state: CommitState, tx: str,
                   now: float, reason: int | None = None) -> None:
        value: dict[str, Any] = {"s": state.value, "tx": tx, "at": now}
        if reason is not None:
            value["reason"] = reason
        txn.put(b"o" + _oid(oid) + dest.encode(), json.dumps(value).encode(), db=self.db)

    # -- requests ----------------------------------------------------------------------------

    def waiting(self, dest: str) -> dict[str, list[Instance]]:
        """Delivered instances not yet asked for, by Study Instance UID."""
        prefix = b"w" + dest.encode() + b"\0"
        out: dict[str, list[Instance]] = {}
        with self.env.begin(db=self.db) as txn:
            for k, v in _prefix_items(txn, self.db, prefix):
                study = k[len(prefix):-9].decode()
                sop_class, sop_uid = json.loads(v)
                out.setdefault(study, []).append(Instance(_U64.unpack(k[-8:])[0], sop_class, sop_uid))
        return out

    def waiting_count(self, txn: lmdb.Transaction, dest: str) -> int:
        """How many delivered instances wait for a request (inside the caller's read)."""
        return len(_prefix_items(txn, self.db, b"w" + dest.encode() + b"\0"))

    def open(self, dest: str, study: str, instances: list[Instance], uid: str, now: float) -> Transaction:
        """Record a transaction about to be requested; its instances stop waiting."""
        tx = Transaction(uid, dest, study, now, instances)
        with self.env.begin(write=True, db=self.db) as txn:
            for i in instances:
                txn.delete(b"w" + dest.encode() + b"\0" + study.encode() + b"\0" + _oid(i.oid))
                self._set_state(txn, i.oid, dest, CommitState.REQUESTED, uid, now)
            txn.put(b"t" + uid.encode(), tx.encode())
            incr(txn, self._info, CounterKind.COMMIT_REQUESTS, dest)
        return tx

    def update(self, tx: Transaction) -> None:
        """Store a transaction's re-request count or alert flag."""
        with self.env.begin(write=True, db=self.db) as txn:
            if txn.get(b"t" + tx.uid.encode()) is not None:
                txn.put(b"t" + tx.uid.encode(), tx.encode())

    def rerequested(self, tx: Transaction, now: float) -> None:
        tx.attempts += 1
        tx.requested_at = now
        with self.env.begin(write=True, db=self.db) as txn:
            txn.put(b"t" + tx.uid.encode(), tx.encode())
            incr(txn, self._info, CounterKind.COMMIT_REQUESTS, tx.destination)

    def transaction(self, uid: str) -> Transaction | None:
        with self.env.begin(db=self.db) as txn:
            raw = txn.get(b"t" + uid.encode())
            return Transaction.decode(raw) if raw is not None else None

    def transactions(self, dest: str | None = None) -> list[Transaction]:
        with self.env.begin(db=self.db) as txn:
            txs = [Transaction.decode(v) for _, v in _prefix_items(txn, self.db, b"t")]
        return [t for t in txs if dest is None or t.destination == dest]

    # -- reports -----------------------------------------------------------------------------

    def complete(self, uid: str, committed: Iterable[str], failed: Iterable[tuple[str, int]],
                 now: float, reporter: str = "") -> Completion:
        """Apply a destination's N-EVENT-REPORT. A committed instance is ``committed`` and its
        hold released (its bytes go when nothing else needs them); a failed one, or one the
        report does not mention, is ``commit-failed`` and queued again for the destination."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(b"t" + uid.encode(), db=self.db)
            if raw is None:
                return Completion(known=False)
            tx = Transaction.decode(raw)
            dest = tx.destination
            ok = set(committed)
            reasons = dict(failed)
            done = Completion(dest, tx.study_instance_uid)
            for i in tx.instances:
                base = {"destination": dest, "sop_instance_uid": i.sop_instance_uid,
                        "study_instance_uid": tx.study_instance_uid, "oid": i.oid,
                        "transaction_uid": uid, "reporter": reporter}
                if i.sop_instance_uid in ok and i.sop_instance_uid not in reasons:
                    self._set_state(txn, i.oid, dest, CommitState.COMMITTED, uid, now)
                    txn.delete(b"h" + _oid(i.oid) + dest.encode(), db=self.db)
                    self._drop_if_done(txn, i.oid)
                    done.committed.append(i.sop_instance_uid)
                    self.audit.append(txn, {"action": "committed", **base}, now)
                else:
                    reason = reasons.get(i.sop_instance_uid, 0x0110)
                    self._set_state(txn, i.oid, dest, CommitState.COMMIT_FAILED, uid, now, reason)
                    self.queues.requeue(txn, dest, i.oid, now,
                                        f"storage commitment failed (reason 0x{reason:04X}); re-sent")
                    done.failed.append((i.sop_instance_uid, reason))
                    self.audit.append(txn, {"action": "commit-failed", "reason": reason, **base}, now)
            txn.delete(b"t" + uid.encode(), db=self.db)
            # the study's line: what the report said as a whole, failed instances listed
            self.audit.append(txn, {
                "action": "commitment-report", "destination": dest, "study_instance_uid": tx.study_instance_uid,
                "transaction_uid": uid, "reporter": reporter, "committed": len(done.committed),
                "failed": [{"sop_instance_uid": s, "reason": r} for s, r in done.failed]}, now)
            if done.committed:
                incr(txn, self._info, CounterKind.COMMITTED, dest, by=len(done.committed))
            if done.failed:
                incr(txn, self._info, CounterKind.COMMIT_FAILED, dest, by=len(done.failed))
        log.log(logging.WARNING if done.failed else logging.INFO,
                "destination=%s transaction_uid=%s study_instance_uid=%s: %d committed, %d failed%s",
                dest, uid, tx.study_instance_uid, len(done.committed), len(done.failed),
                "".join(f" {s}=0x{r:04X}" for s, r in done.failed[:20]),
                extra=fields(destination=dest, study_uid=tx.study_instance_uid or None))
        return done

    def _drop_if_done(self, txn: lmdb.Transaction, oid: int) -> None:
        """Remove the bytes of an object no destination still needs or holds."""
        if self.held(txn, oid):
            return
        raw = txn.get(_oid(oid), db=self._meta)
        # no record (history pruned meanwhile) or nothing outstanding: the bytes can go
        if raw is None or not json.loads(bytes(raw)).get("outstanding"):
            self.queues.drop_bytes(txn, oid)

    # -- views -------------------------------------------------------------------------------

    def states(self, oid: int) -> dict[str, ObjectCommit]:
        """The object's commitment state per destination that asks for commitment."""
        prefix = b"o" + _oid(oid)
        out = {}
        with self.env.begin(db=self.db) as txn:
            for k, v in _prefix_items(txn, self.db, prefix):
                dest = k[len(prefix):].decode()
                d = json.loads(v)
                out[dest] = ObjectCommit(dest, CommitState(d["s"]), d.get("tx", ""), float(d.get("at", 0.0)),
                                         d.get("reason"))
        return out

    def summary(self, oids: Iterable[int]) -> dict[str, dict[str, int]]:
        """Per destination, how many of ``oids`` are in each commitment state (a study's trace)."""
        out: dict[str, dict[str, int]] = {}
        for oid in oids:
            for dest, st in self.states(oid).items():
                counts = out.setdefault(dest, {s.value: 0 for s in CommitState})
                counts[st.state.value] += 1
        return out


# -- storage commitment as SCP: what modalities asked fastroute to commit -----------------------
#
# ``m`` transaction uid -> JSON :class:`ModalityRequest`. Kept until its report was sent (on the
# modality's association, a new one to its ``peers:`` address, or its next association).

_OWNER = struct.Struct(">IQ")   # pid, start time: as staging's owners (a recycled pid is not us)


def process_token() -> str:
    """This process, as a request's owner: pid and start time, hex."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
        started = int(raw[raw.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        started = 0
    return _OWNER.pack(pid, started).hex()


def token_alive(token: str) -> bool:
    try:
        return owner_alive(bytes.fromhex(token))
    except (ValueError, struct.error):
        return False


class InstanceState(enum.StrEnum):
    """Where an instance a modality asked about stands against ``commit_when``."""

    DONE = "done"            # reached the condition: reported committed
    WAITING = "waiting"      # not yet (until the timeout)
    UNKNOWN = "unknown"      # never received: failed, 0x0112 no such object instance


@dataclass(slots=True)
class ModalityRequest:
    uid: str
    calling_ae: str
    ip: str
    called_ae: str
    refs: list[tuple[str, str]]                 # (SOP class, SOP instance)
    received_at: float
    deadline: float
    owner: str                                  # the listener process answering it
    reported_at: float = 0.0                    # 0: not yet
    report_tries: int = 0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @staticmethod
    def decode(raw: bytes | memoryview) -> ModalityRequest:
        d = json.loads(bytes(raw))
        d["refs"] = [tuple(r) for r in d["refs"]]
        return ModalityRequest(**d)


class ModalityRequests:
    """The requests modalities made, and the state of what they named (read from ``sop`` and
    ``meta``, and the destinations' commitment states)."""

    def __init__(self, env: lmdb.Environment, db: Any, sop: Any, meta: Any, commitments: Commitments) -> None:
        self.env, self.db, self._sop, self._meta = env, db, sop, meta
        self.commitments = commitments
        # SOP Instance UIDs acknowledged but still in a listener's journal (:mod:`journal`)
        self.unapplied: Callable[[], set[str]] | None = None

    def add(self, req: ModalityRequest) -> None:
        with self.env.begin(write=True, db=self.db) as txn:
            txn.put(b"m" + req.uid.encode(), req.encode())

    def save(self, req: ModalityRequest) -> None:
        self.add(req)

    def remove(self, uid: str) -> None:
        with self.env.begin(write=True, db=self.db) as txn:
            txn.delete(b"m" + uid.encode())

    def all(self) -> list[ModalityRequest]:
        with self.env.begin(db=self.db) as txn:
            return [ModalityRequest.decode(v) for _, v in _prefix_items(txn, self.db, b"m")]

    def take_orphans(self, token: str) -> int:
        """Requests whose listener process is gone become this one's; how many."""
        n = 0
        with self.env.begin(write=True, db=self.db) as txn:
            for k, v in _prefix_items(txn, self.db, b"m"):
                req = ModalityRequest.decode(v)
                if req.owner != token and not token_alive(req.owner):
                    req.owner = token
                    txn.put(k, req.encode())
                    n += 1
        return n

    def state(self, sop_instance_uid: str, commit_when: str) -> InstanceState:
        """``commit_when``: spooled | delivered | committed (see StorageCommitmentConfig)."""
        return self.states([sop_instance_uid], commit_when)[sop_instance_uid]

    def states(self, sop_instance_uids: Iterable[str], commit_when: str) -> dict[str, InstanceState]:
        """:meth:`state` of each, in one read transaction."""
        with self.env.begin() as txn:
            out = {uid: self._state(txn, uid, commit_when) for uid in sop_instance_uids}
        if self.unapplied is not None and InstanceState.UNKNOWN in out.values():
            # acknowledged, not yet queued (applied within milliseconds): waiting, not unknown
            journalled = self.unapplied()
            for uid, state in out.items():
                if state == InstanceState.UNKNOWN and uid in journalled:
                    out[uid] = InstanceState.WAITING
        return out

    def _state(self, txn: lmdb.Transaction, sop_instance_uid: str, commit_when: str) -> InstanceState:
        raw_oid = txn.get(sop_instance_uid.encode(), db=self._sop)
        if raw_oid is None:
            return InstanceState.UNKNOWN
        oid_bytes = bytes(raw_oid)[:8]
        raw = txn.get(oid_bytes, db=self._meta)
        if raw is None:
            return InstanceState.UNKNOWN
        if commit_when == "spooled":
            return InstanceState.DONE
        rec = json.loads(bytes(raw))
        dropped = rec.get("dropped") or {}
        if rec.get("outstanding") or any(d.get("how") == "purged" for d in dropped.values()
                                        if isinstance(d, dict)):
            return InstanceState.WAITING
        if commit_when == "committed":
            oid = _U64.unpack(oid_bytes)[0]
            for _, v in _prefix_items(txn, self.db, b"o" + _oid(oid)):
                if json.loads(v).get("s") != CommitState.COMMITTED.value:
                    return InstanceState.WAITING
        return InstanceState.DONE
