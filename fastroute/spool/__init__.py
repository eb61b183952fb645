"""The spool: the only code that touches LMDB, and the only state the processes share.

``store``   the :class:`Spool` facade: opens LMDB (``open_spool``) and composes the parts below;
``records`` the typed routing and queue records, and their one codec;
``queues``  queue key layout and every move between states (put, claim, settle, retry, purge);
``counters`` typed counter keys and the counters' reader;
``audit``   the hash-chained audit trail;
``space``   the free-space floor and preallocation;
``senderstate`` the state file a destination's sender publishes for the management plane;
``lockstats`` the write lock's wait and hold times, per process (every write transaction timed);
``commit``  the group commit the listeners' C-STOREs go through;
``wakeup``  the datagrams that tell a destination's sender that its queue grew.
``shards``  the listeners' own environments for object bytes, and their deferred deletes.
"""
from __future__ import annotations

from fastroute.spool.counters import CounterKey, CounterKind, Counters
from fastroute.spool.queues import (
    UNROUTED,
    Claimed,
    Incoming,
    Outcome,
    PutResult,
    QueueEntry,
    QueueStats,
    content_digest,
)
from fastroute.spool.records import (
    Delivery,
    Drop,
    DropReason,
    Failure,
    OutcomeKind,
    QueueRecord,
    QueueState,
    RoutingRecord,
)
from fastroute.spool.store import Spool, open_spool

# The one-letter state codes of queue keys, as exported before QueueState (still accepted).
PENDING, INFLIGHT, FAILED, HELD = (s.code for s in (QueueState.PENDING, QueueState.IN_FLIGHT,
                                                     QueueState.FAILED, QueueState.UNROUTED))
STATE_NAMES = {s.code: s for s in QueueState}

__all__ = [
    "FAILED", "HELD", "INFLIGHT", "PENDING", "STATE_NAMES", "UNROUTED", "Claimed", "Incoming",
    "Outcome", "PutResult", "QueueEntry", "QueueStats", "Spool", "content_digest", "open_spool",
    "CounterKey", "CounterKind", "Counters", "Delivery", "Drop", "DropReason", "Failure", "OutcomeKind",
    "QueueRecord", "QueueState", "RoutingRecord",
]
