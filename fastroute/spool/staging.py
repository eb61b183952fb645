"""Large objects in bounded memory (issue 11 item 3): staged in chunks, linked at commit.

A dataset that grows past ``stream_threshold`` while it arrives leaves the listener's memory:

1. its P-DATA fragments are appended, as they come, to an unlinked file in ``<spool>/staging``
   (page cache: file-backed memory the kernel can write out and reclaim, not the listener's
   anonymous memory), and every full ``CHUNK`` of it is copied by the committer thread into
   LMDB as one bounded value, ``chunk[sid + index]``, in a transaction of its own that also
   registers the staging id in ``stage`` (with the owning process);
2. when the last fragment is in and its last chunk is staged (``Committer.seal``), the
   structure check and the peek run over a read-only memory map of that file (the walkers
   need one contiguous buffer; the pages are the file's, so they count as RssFile, not
   RssAnon), on the listener's check threads;
3. the final commit (``Committer.commit_staged``) writes the routing record and ``objc[oid]`` (the chunk list's
   manifest) and deletes ``stage[sid]``: from then on the chunks belong to the object. Only
   then is the C-STORE acknowledged. A refused or aborted object's chunks are deleted at once;
   a crash leaves them registered in ``stage`` under a process that is gone, and the next
   listener to start removes them.

The sender reads a chunked object as a list of memoryviews into LMDB's pages and sends it
with ``sendmsg`` as it does a small one (no copy). The transcoder, when a destination needs
another syntax, assembles the whole object in memory: that is the one place a large object
is held whole.

An association thus holds at most ``stream_threshold`` bytes of a dataset in memory (plus
one PDU), and the committer one ``CHUNK`` at a time while it copies.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from fastroute.errors import SpoolError

CHUNK = 4 * 1024 * 1024            # bytes per LMDB value of a staged object (a multiple of the page size)
STAGING_DIR = "staging"

_SID = struct.Struct(">IQI")        # pid, the process's start time (clock ticks), a counter
_MANIFEST = struct.Struct(">16sQI")  # staging id, size, chunks
_OWNER = struct.Struct(">IQ")        # pid, start time
_IDX = struct.Struct(">I")


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (field 22 of /proc/pid/stat), so a
    recycled pid is not mistaken for the process that staged; 0 when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
        return int(raw[raw.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def owner_alive(owner: bytes) -> bool:
    """Whether the process that registered a staging id still runs (and is that process)."""
    pid, started = _OWNER.unpack(owner[:_OWNER.size])
    if pid == os.getpid() and started == _start_time(pid):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _start_time(pid) == started


def chunk_key(sid: bytes, index: int) -> bytes:
    return sid + _IDX.pack(index)


@dataclass(frozen=True, slots=True)
class Manifest:
    """``objc[oid]``: where a chunked object's bytes are."""

    sid: bytes
    size: int
    chunks: int

    def encode(self) -> bytes:
        return _MANIFEST.pack(self.sid, self.size, self.chunks)

    @staticmethod
    def decode(raw: bytes | memoryview) -> Manifest:
        sid, size, chunks = _MANIFEST.unpack_from(raw)
        return Manifest(bytes(sid), size, chunks)

    def keys(self) -> Iterator[bytes]:
        return (chunk_key(self.sid, i) for i in range(self.chunks))


@dataclass(frozen=True, slots=True)
class StagedData:
    """An :class:`~fastroute.spool.queues.Incoming`'s bytes when they are staged chunks: what
    the final commit links (``len()`` is the object's size, as for bytes)."""

    sid: bytes
    size: int
    chunks: int

    def __len__(self) -> int:
        return self.size

    @property
    def manifest(self) -> Manifest:
        return Manifest(self.sid, self.size, self.chunks)


class ChunkedView:
    """A chunked object's bytes as views into LMDB's pages, valid inside ``Spool.view``."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def join(self) -> bytes:
        """The whole object in memory (the transcoder's input)."""
        return b"".join(self.parts)


def digest_parts(parts: Iterator[bytes | memoryview | None] | list[memoryview]) -> bytes:
    """``content_digest`` over an object held in several buffers."""
    h = hashlib.sha256()
    for part in parts:
        if part is not None:
            h.update(part)
    return h.digest()[:16]


class StagedFile:
    """A :class:`fastroute.dicom.dimse.DatasetSink`: one large dataset on its way in.

    Lives on the listener's event loop; hands each full chunk to ``stage`` (the committer
    thread's queue), which copies it from the file into LMDB.
    """

    def __init__(self, stager: Stager, head: bytearray, sop_instance_uid: str = "") -> None:
        self.stager = stager
        self.sop_instance_uid = sop_instance_uid   # for the log lines
        self.sid = stager.new_sid()
        self.size = 0
        self.staged = 0                # chunks handed to the committer
        self.closed = False
        # A write or a chunk that failed (a full disk or spool): the rest is only counted, and
        # the C-STORE is answered 0xA700 once complete (the association is not lost over it).
        self.error: BaseException | None = None
        try:
            self.fd = _open_unlinked(stager.directory)
        except OSError as exc:
            self.fd, self.closed, self.error = -1, True, exc
        self.write(memoryview(head))

    def __len__(self) -> int:
        return self.size

    def write(self, fragment: memoryview) -> None:
        self.size += len(fragment)
        if self.error is not None:
            return
        view = fragment
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            self.error = exc
            return
        while self.size - self.staged * CHUNK >= CHUNK:
            self.stager.stage(self, self.staged, CHUNK)
            self.staged += 1

    def map(self) -> mmap.mmap | bytes:
        """The whole dataset, read-only, mapped from the file."""
        if not self.size:
            return b""
        return mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)

    def chunk(self, index: int, length: int) -> mmap.mmap:
        """One chunk of the file, mapped (CHUNK is a multiple of the allocation granularity)."""
        return mmap.mmap(self.fd, length, prot=mmap.PROT_READ, offset=index * CHUNK)

    def tail(self) -> tuple[int, int] | None:
        """(index, length) of the last, partial chunk not yet staged; None when there is none."""
        left = self.size - self.staged * CHUNK
        return (self.staged, left) if left > 0 else None

    def close(self) -> None:
        """Forget the file (it was unlinked: its blocks are freed with the descriptor)."""
        if not self.closed and self.fd >= 0:
            self.closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass

    def discard(self) -> None:
        """The dataset will not be committed: remove its staged chunks, close the file."""
        self.stager.discard(self)


class Stager:
    """A listener's :class:`fastroute.dicom.dimse.Stager`: opens :class:`StagedFile` s.

    ``stage(file, index, length)`` and ``discard(file)`` are the committer's (they run on its
    thread, in order with the commits)."""

    def __init__(self, spool_path: Path, threshold: int,
                 stage: Callable[[StagedFile, int, int], None],
                 discard: Callable[[StagedFile], None]) -> None:
        self.threshold = threshold
        self.directory = Path(spool_path) / STAGING_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.discard = discard
        self._counter = itertools.count(1)
        self._pid = os.getpid()
        self._started = _start_time(self._pid)

    def owner(self) -> bytes:
        return _OWNER.pack(self._pid, self._started)

    def new_sid(self) -> bytes:
        return _SID.pack(self._pid, self._started, next(self._counter) & 0xFFFFFFFF)

    def open(self, head: bytearray, sop_instance_uid: str = "") -> StagedFile:
        return StagedFile(self, head, sop_instance_uid)


def _open_unlinked(directory: Path) -> int:
    """A file nobody can open by name and that vanishes with its descriptor (a crash too)."""
    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
    if hasattr(os, "O_TMPFILE"):
        try:
            return os.open(directory, flags | os.O_TMPFILE, 0o600)
        except OSError:
            pass                       # a file system without O_TMPFILE
    path = directory / f"stage-{os.getpid()}-{os.urandom(8).hex()}"
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    return fd


__all__ = ["CHUNK", "Manifest", "StagedData", "ChunkedView", "StagedFile", "Stager", "chunk_key",
           "digest_parts", "owner_alive"]


@contextlib.contextmanager
def stored_view(env: Any, key: bytes, obj_db: Any, objc_db: Any, chunk_db: Any,
                where: str, oid: int) -> Iterator[memoryview | ChunkedView]:
    """An object's bytes in ``env`` as a memoryview into the map (valid inside the block only),
    or a chunked one's as a :class:`ChunkedView`: the one reader of both layouts, for the shared
    environment and for a shard (``where`` names it in errors)."""
    with env.begin(buffers=True) as txn:
        data = txn.get(key, db=obj_db)
        if data is not None:
            view = memoryview(data)
            try:
                yield view
            finally:
                view.release()
            return
        raw = txn.get(key, db=objc_db)
        if raw is None:
            raise SpoolError(f"object {oid} has no data in {where} (purged?)")
        parts = []
        for k in Manifest.decode(bytes(raw)).keys():
            part = txn.get(k, db=chunk_db)
            if part is None:
                raise SpoolError(f"object {oid} is missing a chunk in {where}")
            parts.append(memoryview(part))
        try:
            yield ChunkedView(parts)
        finally:
            for p in parts:
                p.release()
