"""The spool: the only code that touches LMDB, and the only state the processes share.

``store`` holds the LMDB environment and its sub-databases; ``commit`` the group commit that
the listeners' C-STOREs go through; ``wakeup`` the datagrams that tell a destination's sender
that its queue grew. Everything here is data plane and management plane alike: both read and
write the spool through :class:`Spool`.
"""
from __future__ import annotations

from fastroute.spool.store import (
    FAILED,
    HELD,
    INFLIGHT,
    PENDING,
    STATE_NAMES,
    UNROUTED,
    Claimed,
    Incoming,
    Outcome,
    PutResult,
    QueueEntry,
    QueueStats,
    Spool,
    content_digest,
)

__all__ = [
    "FAILED", "HELD", "INFLIGHT", "PENDING", "STATE_NAMES", "UNROUTED", "Claimed", "Incoming",
    "Outcome", "PutResult", "QueueEntry", "QueueStats", "Spool", "content_digest",
]
