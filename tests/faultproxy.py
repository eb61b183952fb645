"""A TCP proxy on 127.0.0.1 that injects network faults in front of a real peer.

It runs an asyncio loop in one background thread. The fault in force is one immutable
``Fault`` value, swapped atomically by ``set_fault()``; every forwarded chunk consults the
current value, so a switch also affects connections already open (byte counts are per
connection, from its start). Used to test outages, slow links and the "outcome unknown" case
(the connection dies after the data went out but before the response came back).

No pytest dependency: the benchmark harness may import it too.
"""
from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Literal, Self

HOST = "127.0.0.1"
_CHUNK = 65536

Direction = Literal["up", "down"]  # up: client -> upstream; down: upstream -> client


@dataclasses.dataclass(frozen=True)
class Fault:
    """What the proxy does to traffic. The default passes everything through.

    refuse: new connections are accepted and closed at once (port kept, peer "down").
    blackhole: new connections are accepted and held open but nothing is forwarded
        (a hung peer); data sent into it is read and dropped.
    delay: seconds to wait before forwarding each chunk, both directions (a slow link).
    cut_up_after / cut_down_after: forward exactly this many bytes in that direction since
        the connection started, then cut (0 at runtime: cut at the next byte). The receiver
        of that direction loses the connection; its sender is half-closed and drained, so its
        writes succeed and it only sees end-of-stream when it next reads.
    cut_up_at_pdu / cut_down_at_pdu: DICOM-aware cut just before the first upper-layer PDU of
        this type in that direction. ``cut_down_at_pdu=P_DATA_TF`` lets the association and
        the whole C-STORE through but drops the response: the destination stored the
        object, the sender cannot know ("outcome unknown").
    cut_with: "reset" (RST, an abort) or "close" (FIN, an orderly close) when cutting.
    """

    refuse: bool = False
    blackhole: bool = False
    delay: float = 0.0
    cut_up_after: int | None = None
    cut_down_after: int | None = None
    cut_up_at_pdu: int | None = None
    cut_down_at_pdu: int | None = None
    cut_with: Literal["reset", "close"] = "reset"

    def cut_after(self, direction: Direction) -> int | None:
        return self.cut_up_after if direction == "up" else self.cut_down_after

    def cut_at_pdu(self, direction: Direction) -> int | None:
        return self.cut_up_at_pdu if direction == "up" else self.cut_down_at_pdu


PASS = Fault()

# DICOM upper layer PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07


class _PduFramer:
    """Tracks PDU boundaries in one direction of a byte stream (6-byte headers, BE length)."""

    def __init__(self) -> None:
        self.skip = 0  # body bytes left in the current PDU
        self.header = bytearray()

    def find(self, data: bytes, pdu_type: int | None) -> int | None:
        """Offset in ``data`` where a PDU of ``pdu_type`` starts, consuming up to there."""
        pos = 0
        while pos < len(data):
            if self.skip:
                step = min(self.skip, len(data) - pos)
                self.skip -= step
                pos += step
                continue
            if not self.header and data[pos] == pdu_type:
                return pos
            take = min(6 - len(self.header), len(data) - pos)
            self.header += data[pos:pos + take]
            pos += take
            if len(self.header) == 6:
                self.skip = int.from_bytes(self.header[2:6], "big")
                self.header.clear()
        return None


@dataclasses.dataclass(eq=False)  # identity hash: kept in a set
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    sent: dict[str, int] = dataclasses.field(default_factory=lambda: {"up": 0, "down": 0})
    framers: dict[str, _PduFramer] = dataclasses.field(
        default_factory=lambda: {"up": _PduFramer(), "down": _PduFramer()})
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    cut: bool = False  # a fault cut it: the surviving side is being drained, not aborted


def _abort(writer: asyncio.StreamWriter, reset: bool) -> None:
    """Close a connection now: with RST (SO_LINGER 0) or with FIN after buffered data."""
    sock = writer.get_extra_info("socket")
    if reset and sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        writer.transport.abort()
    else:
        writer.close()


class FaultProxy:
    """Listen on 127.0.0.1:``port`` (free if None) and forward to ``target_host:target_port``.

    Counters (``connections``, ``bytes_up``, ``bytes_down``, ``cuts``) let tests assert that a
    fault really happened rather than infer it.
    """

    def __init__(self, target_port: int, target_host: str = HOST, port: int | None = None,
                 fault: Fault = PASS) -> None:
        self.target = (target_host, target_port)
        self._fault = fault
        self._requested_port = port
        self.port = 0
        self.connections = 0
        self.refused = 0
        self.cuts = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()

    # Control (any thread) ---------------------------------------------------------------

    @property
    def fault(self) -> Fault:
        return self._fault

    def set_fault(self, fault: Fault = PASS, *, drop_open: bool = False) -> None:
        """Switch behaviour at runtime; ``drop_open`` also cuts every open connection."""
        self._fault = fault
        if drop_open:
            self.drop_connections(reset=fault.cut_with == "reset")

    def drop_connections(self, reset: bool = True) -> None:
        """Cut every open connection (both sides) now, and wait until that is done."""
        self._call(lambda: self._drop_all(reset))

    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def start(self) -> Self:
        """Bind, then serve from a daemon thread; returns once the port is listening."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # reported to start()'s caller
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"faultproxy->{self.target[1]}",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("fault proxy did not start within 10 s")
        if errors:
            self._thread.join(5)
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and join its thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        self._call(self._shutdown)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if thread.is_alive():
            raise RuntimeError("fault proxy thread did not stop within 10 s")
        self._thread = None
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` (sync, or returning an awaitable) on the loop and wait for it."""
        loop = self._loop
        if loop is None:
            return

        async def wrapper() -> None:
            result = fn()
            if asyncio.iscoroutine(result):
                await result

        asyncio.run_coroutine_threadsafe(wrapper(), loop).result(10)

    # Loop side ----------------------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, HOST, self._requested_port or 0, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._drop_all(reset=True)  # before wait_closed(), which waits for them on 3.12+
        if self._server is not None:
            await self._server.wait_closed()
        tasks = [t for c in list(self._conns) for t in c.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _drop_all(self, reset: bool) -> None:
        for conn in list(self._conns):
            self._cut(conn, reset)

    def _cut(self, conn: _Conn, reset: bool) -> None:
        _abort(conn.client, reset)
        if conn.upstream is not None:
            _abort(conn.upstream, reset)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        fault = self._fault
        if fault.refuse:
            self.refused += 1
            _abort(writer, reset=True)
            return
        conn = _Conn(client=writer)
        with self._lock:
            self._conns.add(conn)
        try:
            if fault.blackhole:
                while await reader.read(_CHUNK):
                    pass
                return
            try:
                up_reader, conn.upstream = await asyncio.open_connection(*self.target)
            except OSError:
                _abort(writer, reset=True)  # upstream down: the client sees a reset
                return
            conn.tasks = [
                asyncio.ensure_future(self._pump(conn, reader, conn.upstream, "up")),
                asyncio.ensure_future(self._pump(conn, up_reader, writer, "down")),
            ]
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            with self._lock:
                self._conns.discard(conn)
            for w in (writer, conn.upstream):
                if w is not None and not w.is_closing():
                    w.close()

    async def _pump(self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    direction: Direction) -> None:
        try:
            while True:
                data = await src.read(_CHUNK)
                if not data:
                    # Orderly half-close: pass the FIN on, keep the other direction open.
                    if dst.can_write_eof() and not dst.is_closing():
                        dst.write_eof()
                    return
                fault = self._fault
                if fault.delay:
                    await asyncio.sleep(fault.delay)  # injected latency, not synchronisation
                limit = fault.cut_after(direction)
                at_pdu = conn.framers[direction].find(data, fault.cut_at_pdu(direction))
                if at_pdu is not None:
                    limit = min(limit, conn.sent[direction] + at_pdu) if limit is not None \
                        else conn.sent[direction] + at_pdu
                cut = limit is not None and conn.sent[direction] + len(data) >= limit
                if cut and limit is not None:
                    data = data[: max(0, limit - conn.sent[direction])]
                if data:
                    dst.write(data)
                    await dst.drain()
                    conn.sent[direction] += len(data)
                    if direction == "up":
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                if cut:
                    self.cuts += 1
                    conn.cut = True
                    await self._cut_direction(conn, src, dst, direction, fault)
                    return
        except (ConnectionError, OSError):
            if not conn.cut:
                self._cut(conn, reset=True)  # one side died: the other must see it too

    async def _cut_direction(self, conn: _Conn, src: asyncio.StreamReader,
                             dst: asyncio.StreamWriter, direction: Direction,
                             fault: Fault) -> None:
        """Lose the rest of this direction's bytes, as a broken network would.

        The receiving side is cut (RST or FIN, per ``fault.cut_with``). The sending side is
        half-closed and drained, so each of its writes succeeds: a destination whose
        response is lost still believes it answered (and DCMTK storescp, which deletes the
        file when its response fails, keeps it).
        """
        _abort(dst, fault.cut_with == "reset")
        sender = conn.client if direction == "up" else conn.upstream
        if sender is None or sender.is_closing():
            return
        try:
            if sender.can_write_eof():
                sender.write_eof()
            while await src.read(_CHUNK):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            sender.close()
