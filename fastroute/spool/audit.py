"""The audit trail: an append-only, SHA-256 hash-chained log inside the spool's LMDB.

Routing events are appended in the same write transaction as the state change they
describe; operator and configuration events (who/what/when/why) through :meth:`AuditChain.record`.
The LMDB write lock serialises every writer in every process, so one chain stays consistent
without a lock of its own. Editing or deleting an event breaks the chain and ``verify``
names the event; pruning keeps it verifiable (the first retained event anchors it).

Events stay JSON objects of free-form details: the hash is over their canonical JSON, so its
encoding here must never change or existing chains would stop verifying.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import struct
import time
from typing import Any, Iterator

import lmdb

from fastroute.spool.counters import CounterKind, incr

_U64 = struct.Struct(">Q")
_HEAD = b"audit_head"      # in ``info``: the hash of the last event (64 bytes, not a counter)


def whoami() -> str:
    """The operator named in events whose caller did not say who (user@host)."""
    try:
        return f"{getpass.getuser()}@{os.uname().nodename}"
    except Exception:
        return f"uid{os.getuid()}"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class AuditChain:
    """The chain's operations over the ``audit`` and ``info`` sub-databases of one environment."""

    def __init__(self, env: lmdb.Environment, audit_db: Any, info_db: Any) -> None:
        self.env = env
        self._audit = audit_db
        self._info = info_db

    def append(self, txn: lmdb.Transaction, event: dict[str, Any], now: float) -> dict[str, Any]:
        """Append inside the caller's write transaction (commits with the change it records)."""
        seq = incr(txn, self._info, CounterKind.AUDIT_SEQ)
        prev_raw = txn.get(_HEAD, db=self._info)
        prev = bytes(prev_raw).decode() if prev_raw else "0" * 64
        body = {"seq": seq, "time": now, **event, "prev": prev}
        digest = hashlib.sha256(_canonical(body)).hexdigest()
        body["hash"] = digest
        txn.put(_U64.pack(seq), _dumps(body), db=self._audit)
        txn.put(_HEAD, digest.encode(), db=self._info)
        return body

    def record(self, action: str, *, who: str | None = None, why: str = "", **details: Any) -> dict[str, Any]:
        """Append an operator or configuration event in a transaction of its own."""
        with self.env.begin(write=True) as txn:
            return self.append(txn, {"action": action, "who": who or whoami(), "why": why, **details},
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

    def verify(self) -> tuple[bool, str]:
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

    def prune(self, before: float) -> int:
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


__all__ = ["AuditChain", "whoami"]
