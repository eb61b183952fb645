"""The audit trail: an append-only, hash-chained log inside the spool's LMDB.

Routing events are appended in the same write transaction as the state change they
describe; operator and configuration events (who/what/when/why) through :meth:`AuditChain.record`.
The LMDB write lock serialises every writer in every process, so one chain stays consistent
without a lock of its own.

What ``verify`` checks, and names when it fails (:class:`AuditCheck`):

* each event's hash over its canonical JSON (an event altered in place);
* each event's ``prev`` against the hash before it (an event removed from the middle);
* the stored head against the last event (events removed from the end);
* the first event against the anchor the last prune recorded, or seq 1 and the zero hash when
  nothing was pruned (events removed from the start). A prune is itself an event
  (``audit_prune``) naming the new first event, so a legitimate prune verifies;
* with ``audit_key`` configured, the chain is HMAC-SHA256 keyed from the first keyed event on
  (``"alg": "hmac-sha256"`` in the event): rewriting history and re-hashing it without the key
  is detected. Events without ``alg`` are plain SHA-256 (chains written before keys existed);
  none may follow a keyed one, and with a key configured the head must be keyed. Without a key,
  a re-hashed chain cannot be told from the original, and ``verify`` says so.

Events stay JSON objects of free-form details: the hash is over their canonical JSON, so its
encoding here must never change or existing chains would stop verifying.
"""
from __future__ import annotations

import enum
import getpass
import hashlib
import hmac
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import lmdb

from fastroute.errors import ConfigError
from fastroute.spool.counters import CounterKind, incr, key_bytes

_U64 = struct.Struct(">Q")
_HEAD = b"audit_head"      # in ``info``: the hash of the last event (64 bytes, not a counter)
_ANCHOR = b"audit_anchor"  # in ``info``: JSON {"seq", "prev"} of the first event kept by the last prune
_ZERO = "0" * 64
HMAC_ALG = "hmac-sha256"
PRUNE_ACTION = "audit_prune"
KEYED_ACTION = "audit_keyed"
RECEIVED_ACTION = "received"   # a receipt: one per study and sender per group commit


def whoami() -> str:
    """The operator named in events whose caller did not say who (user@host)."""
    try:
        return f"{getpass.getuser()}@{os.uname().nodename}"
    except Exception:
        return f"uid{os.getuid()}"


def read_key(spec: str) -> bytes:
    """The chain's key from ``env:NAME`` or ``file:PATH`` (kept outside the spool on purpose:
    whoever can rewrite the spool must not also hold the key)."""
    how, _, where = spec.partition(":")
    if how == "env":
        value = os.environ.get(where)
        if not value:
            raise ConfigError(f"audit_key: environment variable {where} is not set or empty")
        return value.encode()
    if how == "file":
        try:
            data = Path(where).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"audit_key: cannot read {where}: {exc.strerror}") from None
        if not data:
            raise ConfigError(f"audit_key: {where} is empty")
        return data
    raise ConfigError(f"audit_key: expected env:NAME or file:PATH, got {spec!r}")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class AuditCheck(enum.StrEnum):
    """Which of ``verify``'s checks failed."""

    OK = "ok"
    ALTERED = "altered event"
    BROKEN_LINK = "broken link"
    TRUNCATED_HEAD = "truncated head"
    MISSING_FIRST = "missing first events"
    WRONG_KEY = "wrong key / re-hashed"
    NO_KEY = "keyed chain, no key"


@dataclass(frozen=True, slots=True)
class AuditReport:
    """The outcome of ``verify``: ``text`` is what ``audit --verify`` prints."""

    ok: bool
    check: AuditCheck
    text: str
    events: int = 0
    head_seq: int = 0
    head: str = ""


class AuditChain:
    """The chain's operations over the ``audit`` and ``info`` sub-databases of one environment."""

    def __init__(self, env: lmdb.Environment, audit_db: Any, info_db: Any, key: bytes | None = None) -> None:
        self.env = env
        self._audit = audit_db
        self._info = info_db
        self._key = key

    def _digest(self, body: dict[str, Any]) -> str:
        if body.get("alg") == HMAC_ALG:
            assert self._key is not None
            return hmac.new(self._key, _canonical(body), hashlib.sha256).hexdigest()
        return hashlib.sha256(_canonical(body)).hexdigest()

    def append(self, txn: lmdb.Transaction, event: dict[str, Any], now: float) -> dict[str, Any]:
        """Append inside the caller's write transaction (commits with the change it records)."""
        seq = incr(txn, self._info, CounterKind.AUDIT_SEQ)
        prev_raw = txn.get(_HEAD, db=self._info)
        prev = bytes(prev_raw).decode() if prev_raw else _ZERO
        body = {"seq": seq, "time": now, **event, "prev": prev}
        if self._key is not None:
            body["alg"] = HMAC_ALG
        digest = self._digest(body)
        body["hash"] = digest
        txn.put(_U64.pack(seq), _dumps(body), db=self._audit)
        txn.put(_HEAD, digest.encode(), db=self._info)
        return body

    @staticmethod
    def gather_receipts(groups: dict[tuple[str, str, str, str], list[int]], items: Sequence[Any],
                        results: Sequence[Any]) -> int:
        """Add a group commit's accepted objects to ``groups`` (per sender and study); how many."""
        n = 0
        for item, res in zip(items, results):
            oid = getattr(res, "oid", None)
            if oid is None:
                continue
            m = item.meta
            key = (str(m.get("calling_ae") or ""), str(m.get("called_ae") or ""), str(m.get("peer") or ""),
                   str(m.get("study_instance_uid") or ""))
            groups.setdefault(key, []).append(int(oid))
            n += 1
        return n

    def append_receipt_groups(self, txn: lmdb.Transaction, groups: dict[tuple[str, str, str, str], list[int]],
                              now: float) -> int:
        """One ``received`` event per sender and study gathered: who sent (calling/called AE,
        address), which study, how many objects and their oids (the first and last of more
        than 16). Written in the caller's transaction (a group commit's own, see put_many)."""
        for (calling, called, peer, study), oids in groups.items():
            self.append(txn, {"action": RECEIVED_ACTION, "who": calling, "calling_ae": calling, "called_ae": called,
                              "peer": peer, "study_instance_uid": study, "objects": len(oids),
                              "oids": oids if len(oids) <= 16 else [oids[0], oids[-1]]}, now)
        return len(groups)

    def append_receipts(self, txn: lmdb.Transaction, items: Sequence[Any], results: Sequence[Any],
                        now: float) -> int:
        """One ``received`` event per study and sender of these objects, in ``txn``."""
        groups: dict[tuple[str, str, str, str], list[int]] = {}
        self.gather_receipts(groups, items, results)
        return self.append_receipt_groups(txn, groups, now)

    def record(self, action: str, *, who: str | None = None, why: str = "", **details: Any) -> dict[str, Any]:
        """Append an operator or configuration event in a transaction of its own."""
        with self.env.begin(write=True) as txn:
            return self.append(txn, {"action": action, "who": who or whoami(), "why": why, **details},
                               time.time())

    def ensure_keyed(self) -> None:
        """With a key, make sure the head is keyed: a chain whose last event is plain SHA-256
        gets an ``audit_keyed`` event, so a key configured on an existing spool protects it from
        here on (and ``verify`` can require a keyed head)."""
        if self._key is None:
            return
        with self.env.begin(db=self._audit) as txn:
            cur = txn.cursor()
            if cur.last() and json.loads(bytes(cur.value())).get("alg") == HMAC_ALG:
                return
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=self._audit)
            if cur.last() and json.loads(bytes(cur.value())).get("alg") == HMAC_ALG:
                return             # another process did it meanwhile
            self.append(txn, {"action": KEYED_ACTION, "who": "fastroute",
                              "why": "audit_key configured: the chain is HMAC-SHA256 keyed from here"},
                        time.time())

    def events(self, since: float = 0.0, until: float = float("inf"),
               study_instance_uid: str = "") -> Iterator[dict[str, Any]]:
        with self.env.begin(db=self._audit) as txn:
            for _, raw in txn.cursor():
                ev = json.loads(bytes(raw))
                if not since <= ev["time"] <= until:
                    continue
                if study_instance_uid and ev.get("study_instance_uid") != study_instance_uid:
                    continue
                yield ev

    def verify(self) -> AuditReport:
        """Recompute the chain and compare both of its ends with their anchors (module doc)."""
        def fail(check: AuditCheck, text: str) -> AuditReport:
            return AuditReport(False, check, f"FAILED ({check}): {text}", n)

        n = 0
        prev: str | None = None
        prev_seq = 0
        first: dict[str, Any] | None = None
        first_keyed: int | None = None
        keyed_ok = 0
        last_prune: dict[str, Any] | None = None
        legacy_prune = False
        bad_hmac: tuple[int, bool] | None = None
        with self.env.begin() as txn:
            head_raw = txn.get(_HEAD, db=self._info)
            anchor_raw = txn.get(_ANCHOR, db=self._info)
            for _, raw in txn.cursor(db=self._audit):
                ev = json.loads(bytes(raw))
                n += 1
                seq = ev.get("seq")
                claimed = ev.pop("hash", None)
                if first is None:
                    first = ev
                elif ev.get("prev") != prev or seq != prev_seq + 1:
                    return fail(AuditCheck.BROKEN_LINK,
                                f"event seq={seq} does not follow seq={prev_seq} (an event between "
                                f"them was removed, or one was altered)")
                keyed = ev.get("alg") == HMAC_ALG
                if keyed:
                    if self._key is None:
                        return fail(AuditCheck.NO_KEY,
                                    f"the chain is keyed from seq={first_keyed or seq} but no audit_key "
                                    f"is configured: cannot verify it")
                    first_keyed = first_keyed or seq
                    if hmac.compare_digest(self._digest(ev), str(claimed)):
                        keyed_ok += 1
                    elif bad_hmac is None:      # decided at the end: one event, or the key?
                        bad_hmac = (int(seq), hashlib.sha256(_canonical(ev)).hexdigest() == claimed)
                else:
                    if first_keyed is not None:
                        return fail(AuditCheck.WRONG_KEY,
                                    f"event seq={seq} is not keyed but follows keyed seq={first_keyed}: "
                                    f"history was rewritten and re-hashed without the key")
                    if hashlib.sha256(_canonical(ev)).hexdigest() != claimed:
                        return fail(AuditCheck.ALTERED, f"event seq={seq}: content was altered")
                if ev.get("action") == PRUNE_ACTION:
                    last_prune = ev
                elif ev.get("action") == "retention" and ev.get("audit_pruned") and not keyed:
                    legacy_prune = True     # pruned by the code before anchors: start unknown
                prev, prev_seq = str(claimed), int(seq)
        if bad_hmac is not None:
            bad_seq, plain = bad_hmac
            if plain or not keyed_ok:
                return fail(AuditCheck.WRONG_KEY,
                            f"event seq={bad_seq}: its HMAC does not match audit_key (the key differs "
                            f"from the one the chain was written with, or history was rewritten and "
                            f"re-hashed without it)")
            return fail(AuditCheck.ALTERED, f"event seq={bad_seq}: content was altered (its HMAC does "
                                            f"not match; re-hashing without the key does not help)")
        head = bytes(head_raw).decode() if head_raw else None
        if head != prev:
            if prev is None:
                return fail(AuditCheck.TRUNCATED_HEAD, "the trail is empty but the spool recorded events")
            return fail(AuditCheck.TRUNCATED_HEAD,
                        f"the stored head is not the last event's (seq={prev_seq}) hash: the last "
                        f"event(s) were removed")
        if first is not None:
            anchor = json.loads(bytes(anchor_raw)) if anchor_raw else None
            start = (first.get("seq"), first.get("prev"))
            if anchor is None and last_prune is not None:
                return fail(AuditCheck.MISSING_FIRST, f"the prune anchor recorded by the audit_prune "
                                                      f"event seq={last_prune.get('seq')} was removed")
            if anchor is not None:
                if last_prune is None or (last_prune.get("first_seq"), last_prune.get("first_prev")) != \
                        (anchor.get("seq"), anchor.get("prev")):
                    return fail(AuditCheck.MISSING_FIRST,
                                "the prune anchor is not the one the last audit_prune event recorded")
                if start != (anchor.get("seq"), anchor.get("prev")):
                    return fail(AuditCheck.MISSING_FIRST,
                                f"the trail starts at seq={start[0]}, the last prune kept it from "
                                f"seq={anchor.get('seq')}: the first event(s) were removed")
            elif start != (1, _ZERO) and not legacy_prune:
                return fail(AuditCheck.MISSING_FIRST,
                            f"the trail starts at seq={start[0]} and no prune was recorded: the first "
                            f"event(s) were removed")
        if self._key is not None and n and first_keyed is None:
            return fail(AuditCheck.WRONG_KEY, "audit_key is configured but no event is keyed: the "
                                              "chain was rewritten without the key")
        text = f"{n} events, chain intact"
        if n:
            text += f"; head seq={prev_seq} hash={prev}"
        if first_keyed is not None:
            text += f"; HMAC-SHA256 keyed from seq={first_keyed}"
            if first is not None and first_keyed != first.get("seq"):
                text += " (events before it are plain SHA-256: re-hashing them cannot be detected)"
        else:
            text += "; plain SHA-256 (no audit_key): a chain re-hashed after an edit cannot be detected"
        return AuditReport(True, AuditCheck.OK, text, n, prev_seq, prev or "")

    def prune(self, before: float) -> int:
        """Drop events older than ``before`` (retention); the chain stays verifiable: the same
        transaction records the new first event as the anchor, and an ``audit_prune`` event."""
        n = 0
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=self._audit)
            while cur.first():
                ev = json.loads(bytes(cur.value()))
                if ev["time"] >= before:
                    break
                cur.delete()
                n += 1
            if not n:
                return 0
            if cur.first():
                ev = json.loads(bytes(cur.value()))
                anchor = {"seq": ev["seq"], "prev": ev["prev"]}
            else:                     # everything went: the prune event below comes first
                head = txn.get(_HEAD, db=self._info)
                seq_raw = txn.get(key_bytes(CounterKind.AUDIT_SEQ), db=self._info)
                anchor = {"seq": (_U64.unpack(bytes(seq_raw))[0] if seq_raw else 0) + 1,
                          "prev": bytes(head).decode() if head else _ZERO}
            txn.put(_ANCHOR, _dumps(anchor), db=self._info)
            self.append(txn, {"action": PRUNE_ACTION, "who": "fastroute", "why": "audit retention",
                              "pruned": n, "before": before, "first_seq": anchor["seq"],
                              "first_prev": anchor["prev"]}, time.time())
        return n


__all__ = ["AuditChain", "AuditCheck", "AuditReport", "read_key", "whoami"]
