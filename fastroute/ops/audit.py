"""Audit trail: who did what, when and why, and where every object went.

The trail lives in the spool (``Spool.audit_*``): an append-only, SHA-256 hash-chained log in
which routing events commit in the same transaction as the state change they describe, and
operator/config events are appended through ``record``. Editing or deleting an event breaks
the chain and ``verify`` names the event.
"""
from __future__ import annotations

import getpass
import os
from typing import Any

from fastroute.spool import Spool


def whoami() -> str:
    try:
        return f"{getpass.getuser()}@{os.uname().nodename}"
    except Exception:
        return f"uid{os.getuid()}"


def record(spool: Spool, action: str, *, who: str | None = None, why: str = "", **details: Any) -> dict[str, Any]:
    return spool.audit_record(action, who=who or whoami(), why=why, **details)
