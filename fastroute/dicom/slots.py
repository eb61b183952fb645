"""Association slots shared by every listener process of one spool: the global association cap.

Each listener process used to count only its own associations, so the real cap was
``listeners x max_associations`` and the per-AE / per-IP limits could not be enforced at all
(SO_REUSEPORT spreads one modality's associations over the processes). Here every established
association holds one fixed-size record in ``<spool>/run/associations.slots``: the owner's pid
and process start time, the calling AE title and the peer address. Admission reads the table,
counts the live records and writes its own under an exclusive ``fcntl`` lock held for
microseconds (the kernel drops it if the holder dies). A record whose process is gone, or
whose pid now belongs to a process that started at another time (pid reuse), is free: a
SIGKILLed listener cannot leak slots.
"""
from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["SlotTable", "process_start"]

R = TypeVar("R")

# pid, process start time (clock ticks after boot), calling AE (16), peer address (46: IPv6 text)
_RECORD = struct.Struct("<iQ16s46s")
_SIZE = 80                            # record size on disk (room to grow)
_FREE = b"\0" * _SIZE


def process_start(pid: int) -> int:
    """The start time of ``pid`` in clock ticks after boot (/proc/PID/stat field 22), 0 where
    /proc cannot say, -1 when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return -1
    except OSError:
        return _exists(pid)
    try:   # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return 0


def _exists(pid: int) -> int:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return -1
    except PermissionError:
        pass
    return 0


class SlotTable:
    """The live associations of every listener of one spool, and admission against them."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        self.pid = os.getpid()
        self.start = process_start(self.pid)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def admit(self, calling_ae: str, ip: str,
              decide: Callable[[int, int, int], R | None]) -> tuple[int | None, R | None]:
        """Claim a slot unless ``decide(total, same_ae, same_ip)`` (live counts, this request
        not included) returns a refusal: (slot, None) admitted, (None, refusal) refused."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            records = self._read()
            live = []
            free = None
            starts: dict[int, int] = {}
            for i, (pid, start, ae, addr) in enumerate(records):
                if pid and self._alive(pid, start, starts):
                    live.append((ae, addr))
                elif free is None:
                    free = i
            refusal = decide(len(live), sum(1 for ae, _ in live if ae == calling_ae),
                             sum(1 for _, a in live if a == ip))
            if refusal is not None:
                return None, refusal
            slot = len(records) if free is None else free
            record = _RECORD.pack(self.pid, self.start, calling_ae.encode("latin-1", "replace")[:16],
                                  ip.encode("latin-1", "replace")[:46])
            os.pwrite(self.fd, record.ljust(_SIZE, b"\0"), slot * _SIZE)
            return slot, None
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def release(self, slot: int) -> None:
        """Free a slot this process claimed."""
        if self.fd < 0:
            return
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self.fd, _RECORD.size, slot * _SIZE)
            if len(raw) == _RECORD.size and _RECORD.unpack(raw)[0] == self.pid:
                os.pwrite(self.fd, _FREE, slot * _SIZE)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def live(self) -> list[tuple[int, str, str]]:
        """(pid, calling AE, address) of every live association (for tests and status)."""
        fcntl.lockf(self.fd, fcntl.LOCK_SH)
        try:
            starts: dict[int, int] = {}
            return [(pid, ae, addr) for pid, start, ae, addr in self._read()
                    if pid and self._alive(pid, start, starts)]
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _read(self) -> list[tuple[int, int, str, str]]:
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0) if size else b""
        out = []
        for off in range(0, len(data) - _RECORD.size + 1, _SIZE):
            pid, start, ae, addr = _RECORD.unpack_from(data, off)
            out.append((pid, start, ae.rstrip(b"\0").decode("latin-1"),
                        addr.rstrip(b"\0").decode("latin-1")))
        return out

    def _alive(self, pid: int, start: int, cache: dict[int, int]) -> bool:
        if pid == self.pid:
            return start == self.start
        if pid not in cache:
            cache[pid] = process_start(pid)
        now = cache[pid]
        return now >= 0 and (now == start or now == 0 or start == 0)
