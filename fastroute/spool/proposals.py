"""Configuration proposals awaiting a second admin (issue 15, ``governance: two_person``).

A reload that changes a governed part of the configuration (destinations, a rule's
``modify``, ``governance``) is not applied: it is stored here as a :class:`Proposal` with its
full text, diff, who and why, and the digest of the governed part it would make running. A
different admin approves (the file is then written and the supervisor signalled) or rejects
it; the supervisor accepts a SIGHUP'd file whose governed part differs from the running one
only when an approved, not yet applied, proposal carries that digest, and marks it applied.

``cprop`` maps a proposal id (decimal, in order of creation, zero-padded so keys sort) to the
proposal (JSON). Proposals are kept after their decision, for the record.
"""
from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

import lmdb

_ID_WIDTH = 10


class ProposalState(enum.StrEnum):
    PENDING = "pending"      # waiting for a second admin
    APPROVED = "approved"    # written to the file; the supervisor applies it on its SIGHUP
    APPLIED = "applied"      # the supervisor runs it
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Proposal:
    """One proposed configuration and its decision."""

    id: str
    text: str                        # the whole new configuration file
    diff: str                        # unified diff against the text running when proposed
    who: str
    why: str
    created: float
    path: str                        # the configuration file it would replace
    digest: str                      # governance.digest of the new governed part
    base_digest: str                 # ... of the running one when proposed (stale if it moved)
    governed_changes: tuple[str, ...] = ()
    state: ProposalState = ProposalState.PENDING
    decided_by: str = ""
    decided_why: str = ""
    decided_at: float = 0.0
    applied_at: float = 0.0

    def encode(self) -> bytes:
        d = asdict(self)
        d["governed_changes"] = list(self.governed_changes)
        d["state"] = self.state.value
        return json.dumps(d, separators=(",", ":")).encode()

    @staticmethod
    def decode(raw: bytes | memoryview) -> Proposal:
        d: dict[str, Any] = json.loads(bytes(raw))
        d["governed_changes"] = tuple(d.get("governed_changes") or ())
        d["state"] = ProposalState(d["state"])
        return Proposal(**d)

    def view(self) -> dict[str, Any]:
        """As the API and CLI show it (the text included: an approver reads what they approve)."""
        d = asdict(self)
        d["governed_changes"] = list(self.governed_changes)
        d["state"] = self.state.value
        return d


def _key(pid: str) -> bytes:
    return str(int(pid)).rjust(_ID_WIDTH, "0").encode()


def _valid(pid: str) -> bool:
    return pid.isdigit() and len(pid) <= _ID_WIDTH


@dataclass(slots=True)
class Proposals:
    """Proposals in the spool (``spool.proposals``); each call is one LMDB transaction."""

    env: lmdb.Environment
    db: Any = field(repr=False)

    def add(self, proposal: Proposal) -> Proposal:
        """Store ``proposal`` under the next id (its own ``id`` is ignored); the stored one."""
        with self.env.begin(write=True, db=self.db) as txn:
            cur = txn.cursor()
            last = int(bytes(cur.key())) if cur.last() else 0
            stored = replace(proposal, id=str(last + 1))
            txn.put(_key(stored.id), stored.encode())
        return stored

    def get(self, pid: str) -> Proposal | None:
        if not _valid(pid):
            return None
        with self.env.begin(db=self.db) as txn:
            raw = txn.get(_key(pid))
            return Proposal.decode(raw) if raw is not None else None

    def all(self) -> Iterator[Proposal]:
        """Oldest first."""
        with self.env.begin(db=self.db) as txn:
            found = [Proposal.decode(v) for _, v in txn.cursor()]
        return iter(found)

    def decide(self, pid: str, expected: ProposalState, state: ProposalState, **changes: Any) -> Proposal | None:
        """Move proposal ``pid`` from ``expected`` to ``state`` with ``changes``, in one
        transaction (two admins deciding at once: one wins); None when it is not in ``expected``."""
        if not _valid(pid):
            return None
        with self.env.begin(write=True, db=self.db) as txn:
            raw = txn.get(_key(pid))
            if raw is None:
                return None
            p = Proposal.decode(raw)
            if p.state is not expected:
                return None
            new = replace(p, state=state, **changes)
            txn.put(_key(pid), new.encode())
        return new

    def approved_for(self, digest: str, base_digest: str) -> Proposal | None:
        """The newest approved, not yet applied, proposal that takes the governed part from
        ``base_digest`` (what runs now) to ``digest``: an approval is for one change from one
        configuration, so an old approval cannot bring back what a later one replaced."""
        hits = [p for p in self.all() if p.state is ProposalState.APPROVED and p.digest == digest
                and p.base_digest == base_digest]
        return hits[-1] if hits else None


__all__ = ["Proposal", "ProposalState", "Proposals"]
