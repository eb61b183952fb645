"""Wake a destination's sender when the receive path queued work for it.

A Unix datagram socket per destination under ``<spool>/run/``: the listener sends one byte
after each commit; the sender blocks in ``wait`` instead of polling LMDB. A lost datagram
only delays work until the sender's safety timeout, so sending never blocks or fails.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path

# sockaddr_un.sun_path is 108 bytes on Linux (104 on the BSDs), terminating NUL included.
MAX_UNIX_PATH = 103


# The migration process's wake-up name: '@' is not allowed in a destination name, so it can
# never be a destination's (operators' job changes wake it rather than waiting for its poll).
MIGRATION = "@migration"


def socket_path(spool: Path, dest: str) -> Path:
    return spool / "run" / f"{dest}.wake"


def socket_address(spool: Path, dest: str) -> str:
    """Where a destination's sender listens: its file under ``<spool>/run/`` when the path
    fits in a sockaddr_un, else (a deep spool folder) a Linux abstract-namespace name derived
    from the absolute path, so both processes arrive at the same one. A wake-up carries no
    data, so the abstract name's lack of file permissions costs nothing."""
    path = socket_path(spool, dest)
    if len(os.fsencode(str(path))) <= MAX_UNIX_PATH or not sys.platform.startswith("linux"):
        return str(path)
    key = hashlib.sha256(os.fsencode(str(path.absolute()))).hexdigest()[:32]
    return f"\0fastroute-wake-{key}"


class Waker:
    """Sender side: a bound datagram socket to wait on."""

    def __init__(self, spool: Path, dest: str) -> None:
        path = socket_path(spool, dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        self.path = path
        self.address = socket_address(spool, dest)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)

    def wait(self, timeout: float | None) -> bool:
        """Block until woken or ``timeout``; drain queued wake-ups. True if woken."""
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(64)
        except (TimeoutError, socket.timeout):
            return False
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(64)
        except (BlockingIOError, InterruptedError):
            pass
        return True

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class Notifier:
    """Receive side: fire-and-forget wake-ups."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self._addresses: dict[str, str] = {}   # notify() runs after every commit
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def notify(self, dest: str) -> None:
        try:
            address = self._addresses.get(dest)
            if address is None:
                address = self._addresses[dest] = socket_address(self.spool, dest)
            self.sock.sendto(b"!", address)
        except OSError:   # no sender yet, or its queue is full: it will find the work anyway
            pass

    def close(self) -> None:
        self.sock.close()


def run_dir(spool: Path) -> Path:
    p = spool / "run"
    p.mkdir(parents=True, exist_ok=True)
    return p


__all__ = ["Waker", "Notifier", "socket_address", "socket_path", "run_dir"]
