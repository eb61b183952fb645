"""The C-MOVEs in flight, by Move Originator (issue 13): how a moved object finds its job.

A migration's C-MOVE makes the source open its own association to fastroute's listeners and
send each instance there with a C-STORE that carries the Move Originator AE Title
(0000,1030) and Move Originator Message ID (0000,1031) of the C-MOVE that caused it. The
runner (another process) registers each C-MOVE here before it sends it; a listener looks the
pair up for each such C-STORE and routes the object to the move's destinations, attributed
to its job. Nothing is guessed from the object itself.

``mmove`` maps ``AE title 0x00 u16 message id`` to the move (JSON). Message IDs are 16-bit
and the runner reuses them, so the key is the pair and :meth:`MoveTable.register` refuses a
pair that is still active: the runner picks another id. Entries expire (``expires_at``) so a
runner killed mid-move leaves nothing that would claim a later move's objects forever;
:meth:`MoveTable.prune` removes them.
"""
from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import lmdb

_ID = struct.Struct(">H")


def move_key(originator_ae: str, message_id: int) -> bytes:
    """``mmove`` key: the AE title as on the wire (trailing spaces are padding), 0x00, u16."""
    return originator_ae.strip().encode() + b"\x00" + _ID.pack(message_id & 0xFFFF)


@dataclass(frozen=True, slots=True)
class Move:
    """One C-MOVE in flight: the job it serves, the study it retrieves, where its objects go."""

    originator_ae: str
    message_id: int
    job: str
    study_uid: str
    destinations: tuple[str, ...]
    expires_at: float
    registered_at: float = 0.0

    def encode(self) -> bytes:
        return json.dumps({"job": self.job, "study": self.study_uid, "dest": list(self.destinations),
                           "exp": self.expires_at, "at": self.registered_at},
                          separators=(",", ":")).encode()

    @staticmethod
    def decode(key: bytes, raw: bytes | memoryview) -> Move:
        key = bytes(key)
        d: dict[str, Any] = json.loads(bytes(raw))
        return Move(key[:-3].decode(), _ID.unpack(key[-2:])[0], d["job"], d.get("study") or "",
                    tuple(d.get("dest") or ()), float(d["exp"]), float(d.get("at") or 0.0))


class MoveTable:
    """Register, look up and forget C-MOVEs in flight (``spool.moves``); any process may use it.

    Each call is one LMDB transaction: a lookup is one read transaction (microseconds), so a
    listener need not cache, and never sees a move the runner has already unregistered.
    """

    def __init__(self, env: lmdb.Environment, db: Any) -> None:
        self.env = env
        self._db = db

    def register(self, originator_ae: str, message_id: int, job: str, study_uid: str,
                 destinations: Sequence[str], expires_at: float, *, now: float | None = None) -> bool:
        """Record a C-MOVE about to be sent. False (nothing written) when the same AE title and
        Message ID are still active (not unregistered, not expired): pick another id."""
        if not 0 <= message_id <= 0xFFFF:
            raise ValueError(f"Message ID {message_id} is not a 16-bit value")
        if not destinations:
            raise ValueError("a move needs at least one destination")
        now = time.time() if now is None else now
        key = move_key(originator_ae, message_id)
        move = Move(originator_ae.strip(), message_id, job, study_uid, tuple(destinations), expires_at, now)
        with self.env.begin(write=True, db=self._db) as txn:
            old = txn.get(key)
            if old is not None and Move.decode(key, old).expires_at > now:
                return False
            txn.put(key, move.encode())
        return True

    def reserve(self, originator_ae: str, job: str, study_uid: str, destinations: Sequence[str],
                expires_at: float, *, start: int = 1, now: float | None = None) -> int:
        """Register under the first Message ID from ``start`` on (wrapping, 0 skipped) that is
        not active, and return it: for a runner with several associations under one AE title,
        whose client lets it choose the next request's Message ID. RuntimeError when all
        65,535 are active."""
        now = time.time() if now is None else now
        mid = max(1, start & 0xFFFF)
        for _ in range(0xFFFF):
            if self.register(originator_ae, mid, job, study_uid, destinations, expires_at, now=now):
                return mid
            mid = mid % 0xFFFF + 1
        raise RuntimeError(f"every Message ID of {originator_ae} has a C-MOVE in flight")

    def unregister(self, originator_ae: str, message_id: int) -> bool:
        """Forget a C-MOVE (its final response came); False when it was not registered.

        Objects of that move that arrive later (a final response before the last C-STORE)
        are routed by the rules, with their originator still recorded: the runner should
        unregister only after it has waited for them (or let the entry expire)."""
        with self.env.begin(write=True, db=self._db) as txn:
            return bool(txn.delete(move_key(originator_ae, message_id)))

    def lookup(self, originator_ae: str, message_id: int, *, now: float | None = None) -> Move | None:
        """The active move of this originator pair, or None (unknown, or expired)."""
        key = move_key(originator_ae, message_id)
        with self.env.begin(db=self._db) as txn:
            raw = txn.get(key)
            if raw is None:
                return None
            move = Move.decode(key, raw)
        return move if move.expires_at > (time.time() if now is None else now) else None

    def active(self, *, now: float | None = None) -> Iterator[Move]:
        """Every registered move not yet expired (a small table: one entry per C-MOVE running)."""
        now = time.time() if now is None else now
        with self.env.begin(db=self._db) as txn:
            moves = [Move.decode(bytes(k), v) for k, v in txn.cursor()]
        return iter([m for m in moves if m.expires_at > now])

    def prune(self, *, now: float | None = None) -> int:
        """Remove expired moves (a runner that died mid-move); how many."""
        now = time.time() if now is None else now
        with self.env.begin(write=True, db=self._db) as txn:
            doomed = [bytes(k) for k, v in txn.cursor() if Move.decode(bytes(k), v).expires_at <= now]
            for k in doomed:
                txn.delete(k)
        return len(doomed)


__all__ = ["Move", "MoveTable", "move_key"]
