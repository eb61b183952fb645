"""The SCP: an asyncio (uvloop) acceptor that dispatches every DIMSE request to a handler.

pynetdicom's acceptor waits in 1 ms polling loops and runs every command set through pydicom,
which caps one association at ~70 tiny objects/s. Here one event loop thread serves every
association: :class:`fastroute.dicom.ul.UpperLayer` (I/O-free) turns bytes into events and
:class:`_Connection` (this thin asyncio shell) answers them, with access control from
:mod:`.access` and negotiation from :mod:`.acse`.

Services are handlers registered per command field (:data:`fastroute.dicom.dimse.Handler`):
C-ECHO is built in, C-STORE is the caller's (``fastroute.routing.intake.StoreService``), a
request without a handler is answered 0x0211 (unrecognised operation) and a C-CANCEL is
ignored while nothing is cancellable. A handler answers at once (:class:`~.dimse.Reply`) or
later (:class:`~.dimse.Pending`, e.g. after a group commit); requests pipelined behind it wait,
and reading pauses once too much is buffered, so memory stays bounded.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pynetdicom.pdu_primitives import A_ASSOCIATE

from fastroute.config import Config
from fastroute.dicom import acse, pdu
from fastroute.dicom.access import check_access, parse_networks
from fastroute.dicom.dimse import (CommandField, Handler, Message, MessageTooLarge,
                                   Peer, Pending, Reply, Stager, command_name, encode_response,
                                   message_buffers)
from fastroute.dicom.slots import SlotTable
from fastroute.dicom.status import Status, describe
from fastroute.dicom.tls import CertificateFacts, TlsSetupError, file_facts, peer_facts, server_context
from fastroute.dicom.ul import (AssociateRequest, PeerAbort, ReleaseRequest, Role, State, UnexpectedPdu,
                                UpperLayer)
from fastroute.logsetup import fields

log = logging.getLogger("fastroute.scp")

PAUSE_AT_BYTES = 4 * 1024 * 1024      # stop reading a peer that pipelines while a reply is pending

# A-ABORT (PS3.8 9.3.8): source 2 = service provider; reasons.
ABORT_USER = 0x00
ABORT_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNISED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PARAMETER = 0x06

_ECHO_OK = Reply(Status.SUCCESS)


def echo_handler(peer: Peer, msg: Message) -> Reply:
    """The Verification service: always success."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("C-ECHO from %s@%s", peer.calling_ae, peer.ip,
                  extra=fields(calling_ae=peer.calling_ae, called_ae=peer.called_ae, peer=peer.ip))
    return _ECHO_OK


# -- the asyncio shell --------------------------------------------------------------------------

@dataclass(slots=True)
class _Stats:
    stored: int = 0
    refused: int = 0
    bytes: int = 0


class _Connection(asyncio.Protocol):
    """One TCP connection: feeds :class:`UpperLayer`, answers its events, keeps the timers."""

    def __init__(self, listener: Listener) -> None:
        self.r = listener
        self.loop = listener.loop
        self.ul = UpperLayer(Role.ACCEPTOR, max_pdu_in=listener.cfg.max_pdu,
                             max_object=listener.max_object_bytes)
        self.ul.assembler.stager = listener.stager     # large datasets leave memory as they arrive
        self.transport: asyncio.Transport | None = None
        self.ip = "?"
        self.calling = self.called = "?"
        self.peer = Peer("?", "?", "?", {})
        self.peer_max_pdu = 0
        self.stats = _Stats()
        self.busy = False                 # a reply is pending (a commit): events wait
        self.paused = False
        self.pauses = 0                   # times reading paused behind a pending reply
        self.closing = False
        self.outcome = ""                 # released / aborted, once logged
        self.last_rx = 0.0
        self.rx_bytes = 0                 # received in all
        self.accept_rx = -1               # rx_bytes that the A-ASSOCIATE-RQ accounted for
        self.slot: int | None = None      # our record in the listeners' shared slot table
        self.timer: asyncio.TimerHandle | None = None
        # requests we send the peer (storage commitment reports): context id -> SOP class,
        # and the futures waiting for their responses by Message ID
        self.abstract: dict[int, str] = {}
        self.outgoing: dict[int, Future[Message]] = {}
        self.next_msg = 0
        self.certificate: CertificateFacts | None = None   # the TLS client's, once handshaken
        self.tls = False

    # asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls = True
            self.certificate = peer_facts(ssl_object)
        self.r._conns.add(self)
        self.last_rx = self.loop.time()
        self.timer = self.loop.call_later(self.r.cfg.acse_timeout, self._on_timer)

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        self.rx_bytes += len(data)
        self.ul.feed(data)
        self._pump()

    def eof_received(self) -> bool:
        return False                      # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.r._conns.discard(self)
        self.r._established.discard(self)
        if self.slot is not None:
            self.r.slots.release(self.slot)
            self.slot = None
        self.ul.assembler.discard()       # a large object cut off mid-way: its staging goes now
        for waiter in self.outgoing.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("the association ended before the response"))
        self.outgoing.clear()
        if not self.outcome and self.ul.state is State.ESTABLISHED:
            partial = " (an unacknowledged object was discarded)" if self.ul.in_message() else ""
            self._finish("aborted", f"connection closed by the peer{partial}", logging.WARNING)
        self.transport = None

    # the event loop of one association ------------------------------------------------

    def _pump(self) -> None:
        try:
            while not self.busy and not self.closing:
                event = self.ul.next_event()
                if event is None:
                    break
                self._handle(event)
        except MessageTooLarge as exc:
            self._abort(f"{exc}: object refused", REASON_NOT_SPECIFIED)
            return
        except UnexpectedPdu as exc:
            self._abort(f"protocol error: {exc}", REASON_UNEXPECTED_PDU)
            return
        except pdu.ProtocolError as exc:
            unknown = str(exc).startswith("unknown PDU type")
            self._abort(f"protocol error: {exc}",
                        REASON_UNRECOGNISED_PDU if unknown else REASON_INVALID_PARAMETER)
            return
        except Exception as exc:          # never let one peer's bytes take the loop down
            log.exception("association from %s@%s: internal error", self.calling, self.ip,
                          extra=self._fields())
            self._abort(f"internal error: {exc!r}", REASON_NOT_SPECIFIED)
            return
        transport = self.transport
        if transport is None or self.closing:
            return
        if self.busy and not self.paused and self.ul.buffered > self.r.pause_at_bytes:
            transport.pause_reading()
            self.paused = True
            self.pauses += 1
        elif self.paused and not self.busy:
            transport.resume_reading()
            self.paused = False

    def _handle(self, event: object) -> None:
        if type(event) is Message:
            self._on_request(event)
        elif isinstance(event, AssociateRequest):
            self._on_associate(event.primitive)
        elif isinstance(event, ReleaseRequest):
            self._write([self.ul.release_reply()])
            self._finish("released", "", logging.INFO)
            self._close()
        elif isinstance(event, PeerAbort):
            partial = " (an unacknowledged object was discarded)" if self.ul.in_message() else ""
            self._finish("aborted", f"A-ABORT from the peer{partial}", logging.WARNING)
            self._close()
        else:   # an acceptor's upper layer makes no other event
            raise UnexpectedPdu(f"unexpected {type(event).__name__}")

    def _on_request(self, msg: Message) -> None:
        """Dispatch a request to its handler; a response from the peer is a protocol error
        (we sent no request), a request without a handler gets 0x0211."""
        field = msg.field
        if field & 0x8000:
            waiter = self.outgoing.pop(msg.responds_to, None)
            if waiter is not None:        # the response to a request we sent (send_request)
                if not waiter.done():
                    waiter.set_result(msg)
                return
        handler = self.r.handlers.get(field)
        if handler is None:
            if field & 0x8000:
                raise UnexpectedPdu(f"{command_name(field)} to the SCP, which sent no request")
            if field == CommandField.C_CANCEL_RQ:
                return                    # nothing here is cancellable: requests are answered in order
            log.warning("association from %s@%s: %s (0x%04X) is not served -> status %s",
                        self.calling, self.ip, command_name(field), field,
                        describe(Status.UNRECOGNIZED_OPERATION),
                        extra=self._fields(status=Status.UNRECOGNIZED_OPERATION))
            self._send_command(msg.context_id, encode_response(msg.command, Status.UNRECOGNIZED_OPERATION))
            return
        try:
            reply = handler(self.peer, msg)
        except Exception as exc:          # a handler that raises must not cost the association
            log.exception("association from %s@%s: %s handler failed -> status %s", self.calling, self.ip,
                          command_name(field), describe(Status.OUT_OF_RESOURCES),
                          extra=self._fields(status=Status.OUT_OF_RESOURCES))
            reply = Reply(Status.OUT_OF_RESOURCES, f"internal error: {exc!r}")
        if type(reply) is Pending:
            self.busy = True
            pending = cast(Pending, reply)
            future = asyncio.wrap_future(pending.future, loop=self.loop)
            self.r._pending.add(future)
            future.add_done_callback(lambda f: self._finished(msg, pending, f))
        else:
            self._respond(msg, cast(Reply, reply))

    def _finished(self, msg: Message, pending: Pending, future: asyncio.Future[Any]) -> None:
        """On the loop once the handler's future is done: its reply, then what waited."""
        self.r._pending.discard(future)
        self.busy = False
        try:
            reply = pending.finish(pending.future)      # done, so this never blocks
        except Exception as exc:
            log.exception("association from %s@%s: finishing %s failed -> status %s", self.calling, self.ip,
                          command_name(msg.field), describe(Status.OUT_OF_RESOURCES),
                          extra=self._fields(status=Status.OUT_OF_RESOURCES))
            reply = Reply(Status.OUT_OF_RESOURCES, f"internal error: {exc!r}")
        self._respond(msg, reply)
        if self.transport is not None:
            self._pump()                  # events that arrived while the reply was pending

    def _respond(self, msg: Message, reply: Reply) -> None:
        if msg.field == CommandField.C_STORE_RQ:
            if reply.status == Status.SUCCESS:
                self.stats.stored += 1
                self.stats.bytes += len(msg.data or b"")
            else:
                self.stats.refused += 1
                self.r.on_refusal(reply.status)
        command = encode_response(msg.command, reply.status, reply.comment, reply.elements,
                                  reply.dataset is not None)
        self._send_command(msg.context_id, command, reply.dataset)

    def _on_associate(self, rq: A_ASSOCIATE) -> None:
        self.calling = str(rq.calling_ae_title).strip()
        self.called = str(rq.called_ae_title).strip()
        peer_max = int(rq.maximum_length_received or 0)
        self.peer_max_pdu = peer_max if peer_max >= 7 else 0   # below 7 nothing fits: ignore it
        cfg, networks = self.r.cfg, self.r.networks
        # Counts and the claim under one lock, across every listener process of the spool.
        self.slot, rejection = self.r.slots.admit(
            self.calling, self.ip, lambda total, same_ae, same_ip: check_access(
                cfg, networks, self.calling, self.called, self.ip, total, same_ae, same_ip,
                certificate=self.certificate))
        self.peer = Peer(self.calling, self.called, self.ip, {}, self.certificate)
        if rejection is not None:
            log.warning("rejecting association from %s@%s to %s: %s (A-ASSOCIATE-RJ %d/%d/%d)",
                        self.calling, self.ip, self.called, rejection.why,
                        rejection.result, rejection.source, rejection.reason, extra=self._fields())
            if rejection.audit:
                self.r.audit_denied(self.calling, self.called, self.ip, self.certificate, rejection.why)
            self._write([self.ul.reject(rejection.result, rejection.source, rejection.reason)])
            self.outcome = "rejected"
            self.r.on_association("rejected", rejection.source, rejection.reason)
            self._close()
            return
        ac, contexts = acse.negotiate(rq, self.r.contexts, self.r.cfg.max_pdu)
        self.peer.contexts = contexts
        self.abstract = {int(cx.context_id): str(cx.abstract_syntax)
                         for cx in rq.presentation_context_definition_list
                         if cx.context_id is not None and int(cx.context_id) in contexts}
        self._write([self.ul.accept(ac, contexts)])
        self.r._established.add(self)
        self.r.on_association("accepted", 0, 0)
        self.accept_rx = self.rx_bytes - self.ul.buffered
        self._restart_timer(min(self.r.cfg.network_timeout, self.r.cfg.association_idle_timeout))
        log.info("association from %s@%s to %s accepted (%d of %d contexts)%s", self.calling, self.ip,
                 self.called, len(contexts), len(rq.presentation_context_definition_list),
                 self._tls_note(), extra=self._fields())

    def _tls_note(self) -> str:
        if not self.tls:
            return ""
        if self.certificate is None:
            return " over TLS, no client certificate"
        return f" over TLS, client certificate {self.certificate.subject} ({self.certificate.fingerprint})"

    def _fields(self, status: int | None = None) -> dict[str, Any]:
        """The association's log fields (calling/called AE titles, peer address); the AE
        titles are left out until an A-ASSOCIATE-RQ has named them (they read "?" until then)."""
        named = self.ul.state is not State.AWAITING_ASSOCIATE_RQ
        return fields(calling_ae=self.calling if named else None, called_ae=self.called if named else None,
                      peer=self.ip, status=status)

    # output and teardown -----------------------------------------------------------------

    def _send_command(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        self._write(list(message_buffers(context_id, command, dataset, self.peer_max_pdu)))

    def _write(self, parts: list[Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(parts)

    def _close(self) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()        # after the buffered response is written

    def _abort(self, why: str, reason: int, level: int = logging.ERROR) -> None:
        """A-ABORT and close; whatever was not acknowledged is dropped."""
        if self.closing:
            return
        self._finish("aborted", why, level)
        if self.ul.state is State.AWAITING_ASSOCIATE_RQ:
            # PS3.8 Table 9-10, Sta2: an invalid or unexpected PDU before the A-ASSOCIATE-RQ
            # is AA-1, an A-ABORT from the service user whose reason is not significant (0).
            self._write([self.ul.abort(ABORT_USER, REASON_NOT_SPECIFIED)])
        else:   # AA-8: from the service provider, with the reason (PS3.8 9.3.8)
            self._write([self.ul.abort(ABORT_PROVIDER, reason)])
        self._close()

    def _finish(self, how: str, why: str, level: int) -> None:
        if self.outcome:
            return
        self.outcome = how
        if how == "aborted":
            self.r.on_association(how, 0, 0)
        st = self.stats
        log.log(level, "association from %s@%s to %s %s%s: %d stored (%d bytes), %d refused",
                self.calling, self.ip, self.called, how, f" ({why})" if why else "",
                st.stored, st.bytes, st.refused, extra=self._fields())

    def _restart_timer(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        """ARTIM before the A-ASSOCIATE-RQ; after it association_idle_timeout while the peer has
        sent nothing since the accept (a held slot doing nothing), else network_timeout.
        Re-armed, not reset per read."""
        self.timer = None
        if self.closing or self.transport is None:
            return
        if self.ul.state is State.AWAITING_ASSOCIATE_RQ:
            log.warning("connection from %s: no A-ASSOCIATE-RQ within %gs (ARTIM); closing",
                        self.ip, self.r.cfg.acse_timeout, extra=fields(peer=self.ip))
            self.outcome = "timed out"
            self._close()
            return
        timeout = self.r.cfg.network_timeout
        quiet_limit = self.r.cfg.association_idle_timeout
        idle = self.loop.time() - self.last_rx
        quiet = self.rx_bytes == self.accept_rx
        if quiet and not self.busy and idle >= quiet_limit:
            self._abort(f"nothing sent for {idle:.1f}s since the association was accepted "
                        "(association_idle_timeout)", REASON_NOT_SPECIFIED, logging.WARNING)
            return
        if self.busy or idle < timeout:   # our own commit is not the peer's silence
            left = timeout - (0.0 if self.busy else idle)
            if quiet and not self.busy:
                left = min(left, quiet_limit - idle)
            self._restart_timer(max(0.05, left))
            return
        self._abort(f"no data for {idle:.1f}s (network_timeout)", REASON_NOT_SPECIFIED, logging.WARNING)


def _handshake_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, in words an operator can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no client certificate (tls.require_client_cert)"
        return reason.lower().replace("_", " ")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionAbortedError)):
        return f"handshake not finished in time ({exc})"
    return f"{type(exc).__name__}: {exc}"


class Listener:
    """The SCP of one listener process: one asyncio loop thread serving every association.

    ``handlers`` maps a request's command field to its service (C-ECHO is added unless given);
    ``sop_classes`` are accepted besides Verification and Storage (those a new service needs).
    With ``cfg.tls`` a TLS port is served beside the plain one (or alone: ``port: 0``), by
    the same loop and handlers; ``reload_tls()`` (SIGHUP) gives new connections a context built
    from the files again, while open ones keep theirs.
    ``start()`` binds (raising OSError, or TlsSetupError for bad TLS files, in the caller)
    and starts the loop thread;
    ``stop(grace)`` stops accepting, lets associations finish for ``grace`` seconds, aborts the
    rest and waits for their pending replies (commits already queued).
    """

    def __init__(self, cfg: Config, handlers: Mapping[int, Handler], *, sop_classes: Iterable[str] = (),
                 max_object_bytes: int | None = None, pause_at_bytes: int = PAUSE_AT_BYTES,
                 stager: Stager | None = None) -> None:
        self.cfg = cfg
        self.stager = stager              # where datasets past its threshold are streamed
        self.handlers: dict[int, Handler] = {CommandField.C_ECHO_RQ: echo_handler, **handlers}
        # called with (outcome, A-ASSOCIATE-RJ source, reason) for metrics; must not block
        # (a failed TLS handshake: outcome "rejected/tls_handshake_failed", 0, 0)
        self.on_association: Callable[[str, int, int], None] = lambda outcome, source, reason: None
        self.on_refusal: Callable[[int], None] = lambda status: None   # a C-STORE answered with a failure
        self.max_object_bytes = cfg.max_object_bytes if max_object_bytes is None else max_object_bytes
        self.pause_at_bytes = pause_at_bytes
        self.networks = parse_networks(cfg)
        self.contexts = acse.supported_contexts(sop_classes)
        self.port = cfg.port
        self.tls_port = cfg.tls.port if cfg.tls is not None else 0
        # called (in an executor thread) with an audit event for a refused certificate binding
        self.on_denied: Callable[[dict[str, Any]], None] = lambda event: None
        self._tls_context: ssl.SSLContext | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._tls_accept: asyncio.Task[None] | None = None
        self._tls_sock: socket.socket | None = None
        # connections in their TLS handshake at once; past it new ones are closed at once
        self.max_handshakes = max(16, 4 * cfg.max_associations)
        self._shed = 0
        self._shed_logged = 0.0
        self.slots = SlotTable(cfg.spool / "run" / "associations.slots")
        self.loop = _new_loop()
        self._conns: set[_Connection] = set()
        self._established: set[_Connection] = set()
        self._pending: set[asyncio.Future[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    def send_request(self, calling_ae: str, sop_class: str,
                     build: Callable[[int, str], tuple[bytes, bytes | None]]) -> Future[Message]:
        """Send a request of our own (a storage commitment N-EVENT-REPORT) on an established
        association from ``calling_ae`` that accepted ``sop_class``; any thread. ``build``
        gets the Message ID and the context's transfer syntax and gives the command set and
        dataset. The future gets the response, or LookupError when no such association is
        open, ConnectionError when it ends first."""
        result: Future[Message] = Future()

        def run() -> None:
            for conn in list(self._established):
                if conn.calling != calling_ae or conn.closing or conn.transport is None:
                    continue
                cx = next((c for c, a in conn.abstract.items() if a == sop_class), None)
                if cx is None:
                    continue
                conn.next_msg = conn.next_msg % 65535 + 1
                try:
                    command, data = build(conn.next_msg, conn.peer.contexts[cx])
                except Exception as exc:
                    result.set_exception(exc)
                    return
                conn.outgoing[conn.next_msg] = result
                conn._send_command(cx, command, data)
                return
            result.set_exception(LookupError(f"no association from {calling_ae} with {sop_class} open"))

        self.loop.call_soon_threadsafe(run)
        return result

    def start(self) -> None:
        tls = self.cfg.tls
        if tls is not None:
            self._tls_context = server_context(tls)        # TlsSetupError: refuse to start
        sock = _listen_socket(self.cfg.host, self.cfg.port) if self.cfg.port else None
        try:
            tls_sock = _listen_socket(self.cfg.host, tls.port) if tls is not None else None
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        if sock is not None:
            self.port = int(sock.getsockname()[1])
        if tls_sock is not None:
            self.tls_port = int(tls_sock.getsockname()[1])
        self._thread = threading.Thread(target=self.loop.run_forever, name="fastroute-scp-loop",
                                        daemon=True)
        self._thread.start()

        async def serve() -> None:
            if sock is not None:
                self._server = await self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=128)
            if tls_sock is not None:
                self._tls_sock = tls_sock
                self._tls_accept = self.loop.create_task(self._accept_tls(tls_sock))

        try:
            asyncio.run_coroutine_threadsafe(serve(), self.loop).result(timeout=30)
        except BaseException:
            for s in (sock, tls_sock):
                if s is not None:
                    s.close()
            self._stop_loop()
            raise
        impl = type(self.loop).__module__.split(".")[0]
        if sock is not None:
            log.info("listening as %s on %s:%d (asyncio, %s)", self.cfg.ae_title, self.cfg.host,
                     self.port, impl)
        if tls is not None:
            log.info("listening as %s on %s:%d with DICOM TLS (min TLS %s, client certificates %s%s); %s",
                     self.cfg.ae_title, self.cfg.host, self.tls_port, tls.min_version,
                     "required" if tls.require_client_cert and tls.ca else
                     "optional" if tls.ca else "not asked for",
                     ", legacy ciphers allowed" if tls.legacy_ciphers else "", _cert_summary(tls.cert))

    async def _accept_tls(self, listen: socket.socket) -> None:
        """The TLS port's accept loop: it only accepts; each handshake is a task of its own,
        so a client that sends nothing, or slowly, delays no one else (pynetdicom's server
        handshakes in its accept loop) and ends at ``tls.handshake_timeout``."""
        while True:
            try:
                sock, _addr = await self.loop.sock_accept(listen)
            except asyncio.CancelledError:
                raise
            except OSError as exc:          # EMFILE and the like: do not spin
                log.error("TLS port %d: accept failed: %s", self.tls_port, exc)
                await asyncio.sleep(0.1)
                continue
            if len(self._handshakes) >= self.max_handshakes:
                self._shed_handshake(sock)
                continue
            task = self.loop.create_task(self._handshake(sock))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _shed_handshake(self, sock: socket.socket) -> None:
        """Too many connections mid-handshake (a flood of idle TCP clients): close this one
        at once rather than run out of file descriptors; logged at most once a second."""
        try:
            ip = str(sock.getpeername()[0])
        except OSError:
            ip = "?"
        self._shed += 1
        now = time.monotonic()
        if now - self._shed_logged >= 1.0:
            log.warning("TLS port %d: %d connection(s) still in their handshake (the most allowed); "
                        "closed %d new one(s), the last from %s", self.tls_port, len(self._handshakes),
                        self._shed, ip, extra=fields(peer=ip))
            self._shed, self._shed_logged = 0, now
        sock.close()
        self.on_association("rejected/tls_handshakes_full", 0, 0)

    async def _handshake(self, sock: socket.socket) -> None:
        """One TLS connection's handshake, then its association (a :class:`_Connection`,
        which the loop starts once the handshake is done)."""
        assert self.cfg.tls is not None and self._tls_context is not None
        try:
            ip = str(sock.getpeername()[0])
        except OSError:
            ip = "?"
        timeout = self.cfg.tls.handshake_timeout
        try:
            # the context current now: a reload between connections changes the next one's
            await asyncio.wait_for(self.loop.connect_accepted_socket(
                lambda: _Connection(self), sock, ssl=self._tls_context,
                ssl_handshake_timeout=timeout), timeout + 1.0)
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as exc:
            log.warning("TLS handshake from %s on port %d failed: %s; connection closed", ip,
                        self.tls_port, _handshake_failure(exc), extra=fields(peer=ip))
            sock.close()
            # fastroute_associations_in{outcome="rejected", reason="tls_handshake_failed"}
            self.on_association("rejected/tls_handshake_failed", 0, 0)

    def reload_tls(self) -> bool:
        """Build the TLS context again from the configured files (their contents may have
        changed under the same paths). A bad file keeps the running context. Any thread."""
        tls = self.cfg.tls
        if tls is None:
            return False
        try:
            ctx = server_context(tls)
        except TlsSetupError as exc:
            log.error("TLS certificates NOT reloaded, keeping the current ones: %s", exc)
            return False
        self._tls_context = ctx           # one reference swap: read per handshake on the loop
        log.info("TLS certificates reloaded for new connections (open associations keep theirs); %s",
                 _cert_summary(tls.cert))
        return True

    def audit_denied(self, calling: str, called: str, ip: str, cert: CertificateFacts | None,
                     why: str) -> None:
        """Hand a refused certificate binding to ``on_denied`` off the loop (a spool write)."""
        event: dict[str, Any] = {
            "action": "association_denied", "who": f"{calling}@{ip}", "why": why,
            "calling_ae": calling, "called_ae": called, "peer": ip,
            "cert_subject": cert.subject if cert else None,
            "cert_fingerprint": cert.fingerprint if cert else None}
        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.error("could not audit the refused association from %s@%s: %s", calling, ip,
                          f.exception(), extra=fields(calling_ae=calling, peer=ip))

        self.loop.run_in_executor(None, self.on_denied, event).add_done_callback(done)

    def active(self) -> int:
        """Established associations (safe to call from any thread)."""
        return len(self._established)

    def stop(self, grace: float) -> None:
        """Stop accepting, let running associations finish for ``grace`` s, then abort them."""
        if self._thread is None:
            self._stop_loop()             # never started: just release the loop
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(grace), self.loop).result(timeout=grace + 60)
        finally:
            self._stop_loop()

    async def _shutdown(self, grace: float) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._tls_accept is not None:
            self._tls_accept.cancel()
            self._tls_accept = None
        if self._tls_sock is not None:
            self._tls_sock.close()
            self._tls_sock = None
        for task in list(self._handshakes):   # not yet associations: nothing to finish
            task.cancel()
        deadline = time.monotonic() + grace
        while self._conns and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        left = [c for c in self._conns if not c.closing]
        if left:
            log.warning("aborting %d association(s) still open after %gs grace; their unacknowledged "
                        "objects were not accepted and will be re-sent by the modality", len(left), grace)
        for conn in left:
            conn._abort("listener stopping", REASON_NOT_SPECIFIED, logging.WARNING)
        if self._pending:                 # commits already queued finish before the loop goes
            await asyncio.wait(list(self._pending), timeout=60)
        deadline = time.monotonic() + 1.0  # a peer that reads nothing cannot hold the close up
        while self._conns and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)            # connection_lost callbacks

    def _stop_loop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            thread.join(timeout=30)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()
            self.slots.close()


def _cert_summary(path: Path) -> str:
    """The listener certificate's subject, fingerprint and expiry, for the log."""
    try:
        facts = file_facts(path)
    except (OSError, ValueError) as exc:
        return f"certificate {path}: unreadable ({exc})"
    if not facts:
        return f"certificate {path}: none found"
    f = facts[0]
    return (f"certificate {f.subject} ({f.fingerprint}), valid until {f.not_after:%Y-%m-%d %H:%M} UTC "
            f"({f.days_left():.0f} days)")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _listen_socket(host: str, port: int) -> socket.socket:
    """A bound listening socket several listener processes can share (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Accepted sockets inherit TCP_NODELAY on Linux; responses are small and latency-bound.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
