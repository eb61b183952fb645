"""Group commit on the send side: a sender's associations settle together in one transaction.

Each association (worker thread) of a destination's sender records what it delivered and
claims its next batch in one commit (``Spool.settle(..., claim=n)``). With four associations
that is four turns at the shared environment's write lock, and fsyncs, for what one could do:
the router bench showed a four-association sender waiting a third of its run for that lock
(issue 16: senders' commits must not become the next point of contention). So a worker hands
its (outcomes, claim) to the group: if no commit is running it commits at once, with whatever
the other workers handed in meanwhile; otherwise it waits for the running one to finish and
the first waiter commits the next group for everyone waiting. No worker waits for more than
the commit in progress and its own; a lone worker commits exactly as before.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from fastroute.spool.queues import Claimed, Outcome

if TYPE_CHECKING:
    from fastroute.spool.store import Spool


@dataclass(slots=True)
class _Request:
    outcomes: Sequence[Outcome]
    claim: int
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False                   # woken to commit the next group, not with a result
    result: tuple[list[Claimed], float | None] = ([], None)
    error: BaseException | None = None


class SettleGroup:
    """``Spool.settle`` for one destination's worker threads, grouped (see the module's doc)."""

    def __init__(self, spool: Spool, dest: str) -> None:
        self.spool = spool
        self.dest = dest
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._committing = False
        self.commits = 0
        self.settled = 0

    def settle(self, outcomes: Sequence[Outcome], claim: int = 0) -> tuple[list[Claimed], float | None]:
        """As ``Spool.settle(dest, outcomes, claim=claim)``; raises its SpoolError."""
        req = _Request(outcomes, claim)
        with self._lock:
            self._pending.append(req)
            lead = not self._committing
            if lead:
                self._committing = True
        if not lead:
            req.done.wait()
            if not req.lead:
                return self._answer(req)
        self._commit_group()
        return self._answer(req)

    @staticmethod
    def _answer(req: _Request) -> tuple[list[Claimed], float | None]:
        if req.error is not None:
            raise req.error
        return req.result

    def _commit_group(self) -> None:
        with self._lock:
            group, self._pending = self._pending, []
        try:
            results = self.spool.settle_many(self.dest, [(r.outcomes, r.claim) for r in group])
        except BaseException as exc:     # every member keeps its outcomes and retries
            for r in group:
                r.error = exc
        else:
            for r, res in zip(group, results):
                r.result = res
        self.commits += 1
        self.settled += len(group)
        with self._lock:
            nxt = self._pending[0] if self._pending else None
            if nxt is None:
                self._committing = False
            else:
                nxt.lead = True          # it commits the next group, its own included
        for r in group:
            r.done.set()
        if nxt is not None:
            nxt.done.set()


__all__ = ["SettleGroup"]
