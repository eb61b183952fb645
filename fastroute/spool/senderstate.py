"""The sender's state file ``<spool>/run/<dest>.state``: written by a destination's sender,
read by the management plane, which thus needs nothing of the scheduler."""
from __future__ import annotations

import enum
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


class SenderState(enum.StrEnum):
    IDLE = "idle"
    UP = "up"
    BACKING_OFF = "backing_off"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(slots=True)
class DestinationState:
    """What the management plane shows for a destination."""

    destination: str
    state: SenderState = SenderState.IDLE
    down_since: float | None = None
    retry_at: float | None = None
    consecutive_failures: int = 0
    last_error: str = ""
    last_success: float | None = None
    sent: int = 0
    pid: int = field(default_factory=os.getpid)

    def write(self, spool: Path) -> None:
        """Atomically (write + rename), so a reader never sees half a file."""
        path = state_path(spool, self.destination)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)


_FIELDS = frozenset(f.name for f in fields(DestinationState))


def state_path(spool: Path, dest: str) -> Path:
    return spool / "run" / f"{dest}.state"


def read_state(spool: Path, dest: str) -> DestinationState | None:
    """The destination's last published state; None when there is none or it is unreadable."""
    try:
        raw = json.loads(state_path(spool, dest).read_text())
        known = {k: v for k, v in raw.items() if k in _FIELDS}
        st = DestinationState(**known)
        st.state = SenderState(st.state)
        return st
    except (OSError, ValueError, TypeError, AttributeError):
        return None


@dataclass(slots=True)
class SendNowRequest:
    """An operator's (or a successful echo's) request that a destination's sender end its
    backoff now, in ``<spool>/run/<dest>.sendnow``. A file rather than only a wake-up
    datagram: a datagram is dropped when the sender's queue is full, while the sender reads
    this file on every wake-up and at least once a second, and acts on a newer ``at``."""

    at: float
    source: str              # "send-now", "resume" or "echo"
    who: str = ""
    why: str = ""

    def describe(self) -> str:
        return f"{self.source} by {self.who or 'unknown'}" + (f": {self.why}" if self.why else "")


def send_now_path(spool: Path, dest: str) -> Path:
    return spool / "run" / f"{dest}.sendnow"


def request_send_now(spool: Path, dest: str, request: SendNowRequest) -> bool:
    """Leave the request for the destination's sender; False when the router never ran on
    this spool (no ``run/`` folder: no sender to tell, and nothing is created)."""
    path = send_now_path(spool, dest)
    if not path.parent.is_dir():
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(request)))
    os.replace(tmp, path)
    return True


def read_send_now(spool: Path, dest: str) -> SendNowRequest | None:
    try:
        raw = json.loads(send_now_path(spool, dest).read_text())
        return SendNowRequest(float(raw["at"]), str(raw["source"]), str(raw.get("who", "")), str(raw.get("why", "")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


__all__ = ["SenderState", "DestinationState", "read_state", "state_path", "SendNowRequest",
           "request_send_now", "read_send_now", "send_now_path"]
