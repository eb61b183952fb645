"""The SCU: associations on a plain blocking socket, owned by one sender thread each.

Why: pynetdicom's DUL and association reactors poll every millisecond and encode every
message through pydicom, which caps a routed stream at ~70 small objects/s. Here the sender
thread owns its socket: it writes the C-STORE command and the dataset with ``sendmsg``
straight from the caller's buffer (a memoryview into an LMDB read transaction is fine: nothing
is copied) and reads the response itself, with a deadline on every wait. The protocol is
:class:`fastroute.dicom.ul.UpperLayer`'s (requestor role), negotiation :mod:`.acse`'s.

While it waits for a response the association also serves requests the peer sends on it
(C-GET's C-STORE sub-operations, storage commitment's N-EVENT-REPORT): each goes to the
handler registered for its command field in ``Connection.handlers`` and is answered before
the wait goes on; one without a handler gets 0x0211. A new DIMSE service the SCU *sends* is a
method here beside :meth:`Connection.send_raw` and :meth:`Connection.echo`.

DICOM TLS (a peer config with ``tls:``, issue 14): the socket is wrapped after the TCP connect
with :func:`fastroute.dicom.tls.client_context` (SNI and, unless ``verify_hostname: false``,
the certificate's name checked against ``host``). SSL sockets have no ``sendmsg``: the PDUs'
12-byte headers and small payloads are gathered into whole TLS records (one copy, up to
TLS_GATHER per write), and payload runs of whole records go to ``sendall`` as views, uncopied
by us (OpenSSL encrypts them straight from the buffer).

We identify as ``acse.IMPLEMENTATION_CLASS_UID`` / ``acse.IMPLEMENTATION_VERSION_NAME``, as the
SCP does.
"""
from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Protocol

from pynetdicom.presentation import PresentationContext

from fastroute.dicom import acse, pdu
from fastroute.dicom.acse import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, MAX_CONTEXTS
from fastroute.dicom.dimse import (CommandField, Handler, Message, Peer, Pending, Reply, command_name,
                                   encode_c_echo_rq, encode_c_store_rq, encode_response,
                                   message_buffers)
from fastroute.dicom.status import Status, describe
from fastroute.config import TlsPeerConfig
from fastroute.dicom.tls import TlsSetupError, client_context, file_facts
from fastroute.logsetup import fields
from fastroute.dicom.ul import (AssociateAccept, AssociateReject, Event, PeerAbort, ReleaseReply,
                                ReleaseRequest, Role, UnexpectedPdu, UpperLayer)

__all__ = ["Remote", "Connection", "Association", "AssociationFailed", "NoContextAccepted", "OutcomeUnknown",
           "ResponseOverdue", "StoreResult", "echo", "IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION_NAME"]

log = logging.getLogger("fastroute.send")

SOCKET_BUFFER = 4 * 1024 * 1024
RECV_SIZE = 256 * 1024
IOV_BATCH = 256             # buffers per sendmsg call (Linux IOV_MAX is 1024)
RELEASE_TIMEOUT = 10.0      # cap on waiting for A-RELEASE-RP: a release must not stall a thread
MIN_READER_PDU = 1024 * 1024
IDLE_REQUEST_TIMEOUT = 10.0  # cap on waiting for the rest of a request the peer began while idle
TLS_RECORD = 16384          # the TLS maximum plaintext record (RFC 8446 5.1)
TLS_GATHER = 4 * TLS_RECORD  # small buffers are copied together up to this, one SSL_write each


class Remote(Protocol):
    """What an association needs of a peer: a source or a destination config fits
    (``fastroute.dicom.qr.Remote``, the Q/R contract's name for it, is this).

    Read-only members (properties), so the frozen config dataclasses match the protocol.
    A ``tls`` attribute (TlsPeerConfig, the configs' ``tls:``) makes associations DICOM TLS;
    it is read with getattr, so a remote without one is plain TCP."""

    @property
    def ae_title(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def calling_ae(self) -> str | None: ...
    @property
    def acse_timeout(self) -> float: ...
    @property
    def dimse_timeout(self) -> float: ...
    @property
    def network_timeout(self) -> float: ...
    @property
    def max_pdu(self) -> int: ...


class AssociationFailed(Exception):
    """The destination could not be reached or refused the association (destination-level)."""


class NoContextAccepted(Exception):
    """The peer answered but accepted none of the proposed presentation contexts.

    Not a destination outage: these objects cannot go there as proposed, so they fail
    (or are converted) rather than backing off the whole destination.
    """

    def __init__(self, message: str, rejected: dict[str, str]) -> None:
        super().__init__(message)
        self.rejected = rejected


class OutcomeUnknown(Exception):
    """The data left, but no response came (DIMSE timeout or abort): resend, at-least-once."""


@dataclass(frozen=True, slots=True)
class StoreResult:
    status: int
    comment: str


class ResponseOverdue(Exception):
    """A caller's own deadline (an operation's total timeout) passed while waiting for a
    response; unlike a DIMSE timeout the association is kept, so the caller can C-CANCEL."""


class _Timeout(Exception):
    """A deadline passed while waiting for the peer."""


class _Closed(Exception):
    """The peer closed the TCP connection."""


@dataclass(slots=True)
class Association:
    """One established association: its socket, upper layer, negotiated contexts, peer limits."""

    sock: socket.socket
    ul: UpperLayer
    where: str                                   # "CALLING -> CALLED@host:port" for messages
    peer_max_pdu: int                            # 0 = unlimited
    peer: Peer                                   # what a handler is told about the association
    contexts: list[PresentationContext] = field(default_factory=list)   # accepted only
    by_pair: dict[tuple[str, str], int] = field(default_factory=dict)
    peer_implementation: str = ""
    is_established: bool = True
    # SOP class -> (SCU role, SCP role) from the AC's role selection items (C-GET's storage)
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    tls: bool = False                            # sock is an ssl.SSLSocket


def _fields(assoc: Association | None, *, sop_uid: str | None = None, status: int | None = None) -> dict[str, object]:
    """The association's AE titles and address as log fields (logsetup.FIELDS)."""
    if assoc is None:
        return fields(sop_uid=sop_uid, status=status)
    p = assoc.peer
    return fields(calling_ae=p.calling_ae, called_ae=p.called_ae, peer=p.ip, sop_uid=sop_uid, status=status)


def _where(calling_ae: str, dest: Remote) -> str:
    return f"{calling_ae} -> {dest.ae_title}@{dest.host}:{dest.port}"


def _tune(sock: socket.socket) -> None:
    """TCP_NODELAY (a response must not wait for Nagle + delayed ACK: ~40 ms per object) and
    large buffers, set before connecting so the window scale can use them. Buffers are set
    only where the kernel lets them reach SOCKET_BUFFER; otherwise autotuning does better."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt, name in ((socket.SO_SNDBUF, "wmem_max"), (socket.SO_RCVBUF, "rmem_max")):
        try:
            with open(f"/proc/sys/net/core/{name}") as fh:
                cap = int(fh.read())
        except (OSError, ValueError):
            continue
        if cap >= SOCKET_BUFFER:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """A connected, tuned TCP socket; OSError (socket.timeout included) when impossible."""
    deadline = time.monotonic() + timeout
    error: OSError | None = None
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            _tune(sock)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(addr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"no address for {host}")


# -- TLS ------------------------------------------------------------------------------------------

_contexts: dict[tuple[TlsPeerConfig, tuple[int, ...]], ssl.SSLContext] = {}
# the last TLS session per (context, host, port): the next association resumes it (no
# certificate exchange, no signature: a PACS that ends each association after a study costs a
# full handshake only once); a renewed context starts its own sessions
_sessions: dict[tuple[ssl.SSLContext, str, int], ssl.SSLSession] = {}


def tls_context(cfg: TlsPeerConfig) -> ssl.SSLContext:
    """The client context of a peer's ``tls:``, built once per content of its files (keyed by
    their modification times too): a certificate renewed in place is used by the next
    association, without a restart, and none of the open ones is dropped. TlsSetupError
    names the file that is wrong."""
    stamps: list[int] = []
    for path in cfg.files().values():
        try:
            stamps.append(path.stat().st_mtime_ns)
        except OSError:
            stamps.append(-1)            # client_context says what is wrong with it
    key = (cfg, tuple(stamps))
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = client_context(cfg)
        for old in [k for k in list(_contexts) if k[0] == cfg]:
            _contexts.pop(old, None)    # sender threads may race here: both build, one stays
        _contexts[key] = ctx
    return ctx


def tls_failure(exc: BaseException) -> str:
    """A TLS failure in words: which verification check failed (ours of the peer's
    certificate), or which alert the peer sent (its check of ours), or the OpenSSL reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"certificate verify failed: {exc.verify_message} "
                f"(X509 verify code {exc.verify_code})")
    reason = str(getattr(exc, "reason", "") or "")
    if "ALERT" in reason:
        words = reason.lower().replace("_", " ")
        if any(w in reason for w in ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED")):
            return f"the peer refused our certificate or its absence ({words})"
        return f"the peer ended the handshake ({words})"
    if reason == "WRONG_VERSION_NUMBER":
        return "the peer does not speak TLS on this port (wrong version number)"
    if reason:
        return reason.lower().replace("_", " ")
    if isinstance(exc, ssl.SSLEOFError) or isinstance(exc, ConnectionResetError):
        return "the peer closed the connection during the TLS handshake"
    return str(exc)


def _presented(cfg: object) -> str:
    """Which client certificate we presented, in words, for an error message."""
    if not isinstance(cfg, TlsPeerConfig) or cfg.cert is None:
        return "we presented none"
    try:
        return f"we presented {file_facts(cfg.cert)[0].describe()}"
    except (OSError, ValueError, IndexError):
        return f"we presented {cfg.cert}"


def _wrap_tls(sock: socket.socket, ctx: ssl.SSLContext, host: str, port: int, where: str,
              timeout: float) -> ssl.SSLSocket:
    """The TLS handshake on a connected socket (closed on failure), resuming the last session
    with the peer where it has one; AssociationFailed naming the peer and the TLS failure."""
    try:
        sock.settimeout(timeout)
        return ctx.wrap_socket(sock, server_hostname=host, session=_sessions.get((ctx, host, port)))
    except socket.timeout as exc:
        sock.close()
        raise AssociationFailed(f"TLS handshake with {where} failed: no answer within the ACSE "
                                f"timeout ({timeout:g} s)") from exc
    except OSError as exc:                        # ssl.SSLError is one
        sock.close()
        raise AssociationFailed(f"TLS handshake with {where} failed: {tls_failure(exc)}") from exc


def _send_tls(sock: socket.socket, buffers: Iterable[bytes | memoryview], sent: list[int]) -> None:
    """``_send_all`` for an SSL socket (no ``sendmsg``). Small buffers (PDU headers, the
    payloads of small PDUs) are gathered, up to TLS_GATHER, into whole TLS records, so a
    12-byte header does not cost a record, a MAC and a syscall of its own; the whole-record
    middle of a large payload is written from its own memory (bench/tls_send.py measures
    the alternatives). ``sent[0]``: as in _send_all, but a failed SSL write may have sent
    part of its data, so it counts as sent unless the peer was gone before it (EPIPE, reset)."""
    pending = bytearray()

    def write(data: bytes | bytearray | memoryview) -> None:
        try:
            sock.sendall(data)
        except OSError as exc:
            if not (sent[0] == 0 and exc.errno in (errno.EPIPE, errno.ECONNRESET)):
                sent[0] += 1
            raise
        sent[0] += len(data)

    for buf in buffers:
        if len(pending) + len(buf) < TLS_GATHER:
            pending += buf
            continue
        view = memoryview(buf)
        if pending:                    # complete the record begun, then write what is gathered
            take = -len(pending) % TLS_RECORD
            pending += view[:take]
            view = view[take:]
            write(pending)
            pending = bytearray()
        whole = len(view) - len(view) % TLS_RECORD
        if whole:
            write(view[:whole])
        if whole < len(view):
            pending += view[whole:]
    if pending:
        write(pending)


def _send_all(sock: socket.socket, buffers: list[bytes | memoryview], sent: list[int]) -> None:
    """sendmsg until every buffer left, resuming after partial sends (a socket with a timeout
    may take part of it); ``sent[0]`` counts the bytes the kernel took, even on error."""
    while buffers:
        n = sock.sendmsg(buffers)
        sent[0] += n
        while n:
            first = len(buffers[0])
            if n >= first:
                n -= first
                buffers.pop(0)
            else:
                buffers[0] = memoryview(buffers[0])[n:]
                n = 0
        # a zero-length buffer at the end (an empty last PDV payload) was sent with its header
        while buffers and not len(buffers[0]):
            buffers.pop(0)


def _next_event(assoc: Association, deadline: float) -> Event:
    """The next upper-layer event, waiting at most until ``deadline``; _Timeout, _Closed or
    ProtocolError (UnexpectedPdu for a PDU wrong in the state)."""
    while True:
        event = assoc.ul.next_event()
        if event is not None:
            return event
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout()
        assoc.sock.settimeout(remaining)
        try:
            data = assoc.sock.recv(RECV_SIZE)
        except socket.timeout:
            raise _Timeout() from None
        if not data:
            raise _Closed()
        assoc.ul.feed(data)


class Connection:
    """One association slot to a peer, reused across batches by one sender thread.

    ``dest`` is any :class:`fastroute.dicom.qr.Remote` (a destination or a source config).

    ``ensure`` raises AssociationFailed (destination level) or NoContextAccepted; ``send_raw``
    raises OutcomeUnknown once any byte of the message may have left, AssociationFailed when
    the peer had closed an idle association. ``handlers`` serve requests the peer sends on
    the association (see the module's docstring).
    """

    def __init__(self, dest: Remote, calling_ae: str,
                 handlers: Mapping[int, Handler] | None = None) -> None:
        self.dest = dest
        self.calling_ae = dest.calling_ae or calling_ae
        self.handlers: dict[int, Handler] = dict(handlers or {})
        self.assoc: Association | None = None
        self.proposed: set[tuple[str, str]] = set()
        self.last_used = 0.0
        self.msg_id = 0

    # -- association ------------------------------------------------------------------------

    def ensure(self, pairs: set[tuple[str, str]]) -> Association:
        """An established association that proposed every (SOP class, syntax) pair needed.

        One the peer ended while idle (a PACS idle timeout) is replaced here, before any
        object is handed to it, rather than failing the next send_raw."""
        wanted = set(pairs)
        if self.assoc is not None:
            kept = self.proposed
            if not self._closed_while_idle(self.assoc) and pairs <= kept:
                return self.assoc
            # Keep what was already negotiated too, so alternating classes do not thrash.
            wanted |= kept
            self.release()          # nothing left to release if the peer ended it
        if len(wanted) > MAX_CONTEXTS:
            wanted = set(sorted(pairs)[:MAX_CONTEXTS])
        self.assoc = self._associate(sorted(wanted))
        self.proposed = wanted
        self.last_used = time.monotonic()
        return self.assoc

    def associate(self, contexts: Sequence[tuple[str, Sequence[str]]],
                  scp_roles: Sequence[str] = ()) -> Association:
        """A fresh association proposing ``contexts`` (SOP class, transfer syntaxes offered),
        asking the SCP role for ``scp_roles`` (C-GET); any current one is released first.
        The granted roles are in ``Association.roles``."""
        if self.assoc is not None:
            self.release()
        self.assoc = self._associate(list(contexts), scp_roles)
        self.proposed = {(sop, ts) for sop, tss in contexts for ts in tss}
        self.last_used = time.monotonic()
        return self.assoc

    def _associate(self, pairs: Sequence[tuple[str, str | Sequence[str]]],
                   scp_roles: Sequence[str] = ()) -> Association:
        d = self.dest
        where = _where(self.calling_ae, d)
        rq, rq_contexts = acse.request(self.calling_ae, d.ae_title, pairs, d.max_pdu,
                                       scp_roles=scp_roles)
        reader_max = max(d.max_pdu or pdu.PduReader().max_pdu_length, MIN_READER_PDU)
        ul = UpperLayer(Role.REQUESTOR, max_pdu_in=reader_max)
        encoded = ul.associate(rq)
        tls_cfg = getattr(d, "tls", None)
        ctx: ssl.SSLContext | None = None
        if isinstance(tls_cfg, TlsPeerConfig):
            try:                   # before connecting: a wrong file is no network problem
                ctx = tls_context(tls_cfg)
            except TlsSetupError as exc:
                raise AssociationFailed(f"TLS to {where} not possible: {exc}") from exc
        try:
            sock = _connect(d.host, d.port, d.acse_timeout)
        except OSError as exc:
            # The OS's own words: refused, timed out, or reset by a peer that accepted and
            # closed at once (a proxy or load balancer in front of a dead PACS).
            why = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
            raise AssociationFailed(f"cannot connect to {where}: {why}") from exc
        if ctx is not None:
            where = f"{where} (TLS)"
            sock = _wrap_tls(sock, ctx, d.host, d.port, where, d.acse_timeout)
        assoc = Association(sock, ul, where, 0, Peer(self.calling_ae, d.ae_title, d.host, {}),
                            tls=isinstance(sock, ssl.SSLSocket))
        deadline = time.monotonic() + d.acse_timeout
        try:
            sock.settimeout(d.acse_timeout)
            sock.sendall(encoded)
            event = _next_event(assoc, deadline)
        except (OSError, _Timeout, _Closed, pdu.ProtocolError) as exc:
            self._drop(assoc, abort=not isinstance(exc, _Closed))
            why = {_Timeout: f"no answer within the ACSE timeout ({d.acse_timeout:g} s)",
                   _Closed: "the peer closed the connection"}.get(type(exc), str(exc))
            if isinstance(exc, ssl.SSLError) and "ALERT" in str(getattr(exc, "reason", "")):
                why = f"TLS: {tls_failure(exc)}"
            elif assoc.tls and isinstance(exc, (_Closed, ssl.SSLError, ConnectionError)):
                # TLS 1.3: the server checks our certificate after our handshake ended; its
                # alert may be lost to the reset that follows it
                why = ("the peer closed the TLS connection before answering; it may refuse our "
                       f"client certificate ({_presented(tls_cfg)})")
            raise AssociationFailed(f"association with {where} failed: {why}") from exc
        if isinstance(event, AssociateReject):
            self._drop(assoc, abort=False)
            raise AssociationFailed(
                f"association rejected by {where}: result={event.result} source={event.source} "
                f"reason={event.reason} ({acse.reject_reason(event.source, event.reason)})")
        if isinstance(event, PeerAbort):
            self._drop(assoc, abort=False)
            raise AssociationFailed(f"association aborted by {where}")
        assert isinstance(event, AssociateAccept)   # the only other event in this state
        ac = event.primitive
        try:
            results = acse.accepted_contexts(rq_contexts, ac)
        except (ValueError, KeyError) as exc:
            self._drop(assoc, abort=True)
            raise AssociationFailed(f"association with {where} failed: {exc}") from exc
        assoc.peer_max_pdu = int(ac.maximum_length_received or 0)
        assoc.roles = acse.accepted_roles(ac)
        assoc.peer_implementation = str(ac.implementation_class_uid or "")
        for cx in results:
            if cx.result == 0 and cx.transfer_syntax:
                assoc.contexts.append(cx)
                assoc.by_pair[(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))] = int(
                    cx.context_id or 0)
        if not assoc.contexts:
            self._drop(assoc, abort=True)
            # A rejected context echoes no transfer syntax: key the reason by SOP class.
            reasons = {str(cx.abstract_syntax): acse.context_result(cx.result) for cx in results}
            raise NoContextAccepted(
                f"{d.ae_title}@{d.host}:{d.port} accepted none of the {len(results)} "
                "presentation context(s) proposed", reasons)
        assoc.peer.contexts = {int(cx.context_id or 0): str(cx.transfer_syntax[0])
                               for cx in assoc.contexts}
        if ctx is not None and isinstance(sock, ssl.SSLSocket):
            self._keep_session(ctx, sock)
        ul.established(assoc.peer.contexts)
        log.debug("associated %s: %d of %d contexts accepted, peer max PDU %d, implementation %s",
                  where, len(assoc.contexts), len(results), assoc.peer_max_pdu,
                  assoc.peer_implementation, extra=_fields(assoc))
        return assoc

    def _keep_session(self, ctx: ssl.SSLContext, sock: ssl.SSLSocket) -> None:
        """Remember the association's TLS session for the next one (TLS 1.3: its ticket came
        with the A-ASSOCIATE-AC, so it is there now); drop sessions of replaced contexts."""
        session = sock.session
        if session is None:
            return
        live = set(_contexts.values())
        for key in [k for k in list(_sessions) if k[0] not in live]:
            _sessions.pop(key, None)
        _sessions[(ctx, self.dest.host, self.dest.port)] = session
        if sock.session_reused:
            log.debug("%s: TLS session resumed", _where(self.calling_ae, self.dest))

    def usable(self) -> bool:
        """Whether there is an association the peer has not ended while it was idle."""
        return self.assoc is not None and not self._closed_while_idle(self.assoc)

    def context_for(self, sop_class: str, ts: str) -> int | None:
        assert self.assoc is not None
        return self.assoc.by_pair.get((sop_class, ts))

    def accepted(self, sop_class: str) -> list[str]:
        assert self.assoc is not None
        return [str(cx.transfer_syntax[0]) for cx in self.assoc.contexts
                if cx.abstract_syntax == sop_class]

    # -- C-STORE, C-ECHO --------------------------------------------------------------------

    def send_raw(self, context_id: int, sop_class: str, sop_uid: str,
                 data: bytes | memoryview | list[memoryview]) -> StoreResult:
        """C-STORE already-encoded bytes; OutcomeUnknown when no response arrives."""
        rsp = self._request(context_id, encode_c_store_rq(self._next_id(), sop_class, sop_uid),
                            data, sop_uid, CommandField.C_STORE_RSP)
        command = rsp.command              # dict lookups, not properties: once per object
        status = command.get(pdu.STATUS)
        if not isinstance(status, int):
            assert self.assoc is not None
            where = self.assoc.where
            self._drop(self.assoc, abort=True)
            raise OutcomeUnknown(f"C-STORE response from {where} without a status")
        comment = command.get(pdu.ERROR_COMMENT, "")
        if not isinstance(comment, str):
            comment = ""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("C-STORE %s sop_class=%s sop_instance_uid=%s bytes=%d context=%d: %s %s",
                      self.assoc.where if self.assoc else "", sop_class, sop_uid, len(data),
                      context_id, describe(status), comment,
                      extra=_fields(self.assoc, sop_uid=sop_uid, status=status))
        return StoreResult(status, comment)

    def echo(self) -> int | None:
        """C-ECHO on an association that proposed Verification; the status, None if absent."""
        assoc = self.assoc
        context_id = self.context_for(acse.VERIFICATION_SOP_CLASS, acse.IMPLICIT_VR_LITTLE_ENDIAN)
        if assoc is None or context_id is None:
            raise AssociationFailed("no association with the Verification context")
        return self._request(context_id, encode_c_echo_rq(self._next_id()), None, "C-ECHO",
                             CommandField.C_ECHO_RSP).status

    def _next_id(self) -> int:
        self.msg_id = (self.msg_id % 65535) + 1
        return self.msg_id

    def next_id(self) -> int:
        """Take the next Message ID (1..65535, wrapping) for a request sent with :meth:`send`."""
        return self._next_id()

    def peek_id(self) -> int:
        """The Message ID :meth:`next_id` will give, without taking it."""
        return (self.msg_id % 65535) + 1

    def _request(self, context_id: int, command: bytes, data: bytes | memoryview | list[memoryview] | None,
                 what: str, rsp_field: CommandField) -> Message:
        """Send one request (command + optional dataset) and wait for its response."""
        assoc = self.send(context_id, command, data, what)
        try:
            rsp = self._response(assoc, self.msg_id, rsp_field,
                                 time.monotonic() + self.dest.dimse_timeout)
        except OSError as exc:
            self._drop(assoc, abort=True)
            raise OutcomeUnknown(f"connection to {assoc.where} failed waiting for the "
                                 f"{_request_name(rsp_field)} response to {what}: {exc}") from exc
        self.last_used = time.monotonic()
        return rsp

    def send(self, context_id: int, command: bytes,
             data: bytes | memoryview | list[memoryview] | None, what: str, *,
             in_operation: bool = False) -> Association:
        """Send one message (a request whose Message ID the caller took with :meth:`next_id`,
        or a C-CANCEL); AssociationFailed when nothing left, OutcomeUnknown when part did.

        ``in_operation``: the association is not idle (a C-CANCEL while the peer may still be
        sending pending responses): whatever it has sent is that operation's, read later,
        not a sign that it ended the association."""
        assoc = self.assoc
        if assoc is None:
            raise AssociationFailed("association is not established")
        if not in_operation and self._closed_while_idle(assoc):
            raise AssociationFailed(f"association closed by the peer while idle ({assoc.where})")
        sent = [0]
        try:
            assoc.sock.settimeout(self.dest.network_timeout)
            self._send_message(assoc, context_id, command, data, sent)
        except OSError as exc:
            self._drop(assoc, abort=True)
            if not sent[0]:
                # Nothing was accepted by the kernel: the peer is gone, nothing was delivered.
                raise AssociationFailed(
                    f"association with {assoc.where} lost before sending: {exc}") from exc
            raise OutcomeUnknown(f"connection to {assoc.where} failed while sending "
                                 f"{what}: {exc}") from exc
        return assoc

    def response(self, msg_id: int, rsp_field: CommandField, *, until: float | None = None) -> Message:
        """The next response to request ``msg_id`` (a pending one or the final), serving the
        peer's own requests (C-GET's C-STOREs) meanwhile. Silence longer than the DIMSE timeout
        (no response, no request from the peer) aborts the association (OutcomeUnknown); a
        source that sends no pending C-MOVE responses needs a DIMSE timeout longer than its
        moves. ``until`` (a time.monotonic() deadline, an operation's total) raises
        ResponseOverdue instead and keeps the association."""
        assoc = self.assoc
        if assoc is None:
            raise AssociationFailed("association is not established")
        try:
            rsp = self._response(assoc, msg_id, rsp_field,
                                 time.monotonic() + self.dest.dimse_timeout, until)
        except OSError as exc:
            self._drop(assoc, abort=True)
            raise OutcomeUnknown(f"connection to {assoc.where} failed waiting for the "
                                 f"{_request_name(rsp_field)} response: {exc}") from exc
        self.last_used = time.monotonic()
        return rsp

    @staticmethod
    def _send_message(assoc: Association, context_id: int, command: bytes,
                      data: bytes | memoryview | list[memoryview] | None, sent: list[int]) -> None:
        """Command then dataset PDUs, IOV_BATCH buffers per sendmsg, payloads never copied.

        A stalled peer fails a sendmsg after ``network_timeout`` without progress."""
        if assoc.tls:
            _send_tls(assoc.sock, message_buffers(context_id, command, data, assoc.peer_max_pdu), sent)
            return
        batch: list[bytes | memoryview] = []
        for buffer in message_buffers(context_id, command, data, assoc.peer_max_pdu):
            batch.append(buffer)
            if len(batch) >= IOV_BATCH:
                _send_all(assoc.sock, batch, sent)
                batch = []
        if batch:
            _send_all(assoc.sock, batch, sent)

    # -- requests from the peer -------------------------------------------------------------

    def _serve(self, assoc: Association, msg: Message) -> None:
        """Answer a request the peer sent on our association with its handler's reply."""
        field_ = msg.field
        handler = self.handlers.get(field_)
        if handler is None:
            if field_ == CommandField.C_CANCEL_RQ:
                return                   # we run nothing the peer could cancel
            log.warning("%s: the peer sent %s (0x%04X), which is not served -> status %s",
                        assoc.where, command_name(field_), field_,
                        describe(Status.UNRECOGNIZED_OPERATION), extra=_fields(assoc))
            reply = Reply(Status.UNRECOGNIZED_OPERATION)
        else:
            try:
                answer = handler(assoc.peer, msg)
                if isinstance(answer, Pending):
                    # Bounded like a response we wait for: the peer is waiting for this one.
                    done, _ = wait_futures([answer.future], timeout=self.dest.dimse_timeout)
                    answer = (answer.finish(answer.future) if done else Reply(
                        Status.OUT_OF_RESOURCES, f"not done within {self.dest.dimse_timeout:g} s"))
                reply = answer
            except Exception as exc:
                log.exception("%s: %s handler failed", assoc.where, command_name(field_))
                reply = Reply(Status.OUT_OF_RESOURCES, f"internal error: {exc!r}")
        command = encode_response(msg.command, reply.status, reply.comment, reply.elements,
                                  reply.dataset is not None)
        assoc.sock.settimeout(self.dest.network_timeout)
        self._send_message(assoc, msg.context_id, command, reply.dataset, [0])

    def _closed_while_idle(self, assoc: Association) -> bool:
        """Whether the peer aborted, released or closed while we were not sending.

        Between our messages a peer may only send requests of its own (served here) or end
        the association; one that did is dropped here, before any byte of the next message.
        """
        readable: list[socket.socket]
        if isinstance(assoc.sock, ssl.SSLSocket) and assoc.sock.pending():
            readable = [assoc.sock]           # decrypted already, held in OpenSSL
        else:
            try:
                readable, _, _ = select.select([assoc.sock], [], [], 0)
            except (OSError, ValueError):
                readable = [assoc.sock]
        if not readable:
            return False
        why = ""
        deadline = time.monotonic() + min(self.dest.network_timeout, IDLE_REQUEST_TIMEOUT)
        try:
            assoc.sock.settimeout(0.0)
            try:
                data: bytes | None = assoc.sock.recv(RECV_SIZE)
            except ssl.SSLWantReadError:
                # TLS: only a record without data for us (a TLS 1.3 session ticket) or part
                # of one arrived; nothing the association has to act on yet
                data = None
            if data is None:
                pass
            elif not data:
                why = "closed the connection"
            else:
                assoc.ul.feed(data)
                while not why:
                    event = assoc.ul.next_event()
                    if event is None:
                        if not assoc.ul.buffered and not assoc.ul.in_message():
                            break        # all the peer sent is served: the association goes on
                        event = _next_event(assoc, deadline)   # the rest of what it began
                    if isinstance(event, ReleaseRequest):
                        assoc.sock.sendall(assoc.ul.release_reply())
                        why = "requested release"
                    elif isinstance(event, PeerAbort):
                        why = "aborted"
                    elif isinstance(event, Message) and event.is_request:
                        self._serve(assoc, event)
                    else:
                        why = f"sent an unexpected {type(event).__name__}"
        except _Timeout:
            why = "sent part of a PDU or message and stopped"
        except _Closed:
            why = "closed the connection"
        except (OSError, pdu.ProtocolError) as exc:
            why = f"connection error: {exc}"
        if not why:
            return False
        log.info("%s: the peer %s while the association was idle; reassociating",
                 assoc.where, why, extra=_fields(assoc))
        self._drop(assoc, abort=why.startswith(("sent", "connection")))
        return True

    def _response(self, assoc: Association, msg_id: int, rsp_field: CommandField,
                  deadline: float, until: float | None = None) -> Message:
        """Read until the response to ``msg_id``, serving the peer's own requests meanwhile;
        anything else ends the association (OutcomeUnknown: the request may have been done).
        ``until``: the caller's earlier deadline (ResponseOverdue, association kept), unless
        it passes in the middle of a message, which then gets the rest of ``deadline``."""
        while True:
            try:
                event = _next_event(assoc, deadline if until is None else min(until, deadline))
            except _Timeout:
                if until is not None and time.monotonic() < deadline:
                    if not assoc.ul.in_message() and not assoc.ul.buffered:
                        raise ResponseOverdue(f"no {_request_name(rsp_field)} response from "
                                              f"{assoc.where} in time") from None
                    until = None
                    continue
                self._drop(assoc, abort=True)
                raise OutcomeUnknown(f"no {_request_name(rsp_field)} response from {assoc.where} "
                                     f"within the DIMSE timeout ({self.dest.dimse_timeout:g} s)") from None
            except _Closed:
                self._drop(assoc, abort=False)
                raise OutcomeUnknown(f"{assoc.where} closed the connection before the "
                                     f"{_request_name(rsp_field)} response") from None
            except UnexpectedPdu as exc:
                self._drop(assoc, abort=True)
                raise OutcomeUnknown(f"{exc} from {assoc.where} while waiting for the "
                                     f"{_request_name(rsp_field)} response") from exc
            except pdu.ProtocolError as exc:
                self._drop(assoc, abort=True)
                raise OutcomeUnknown(f"malformed PDU from {assoc.where}: {exc}") from exc
            if type(event) is Message:
                command = event.command
                if not command.get(pdu.COMMAND_FIELD, 0) & 0x8000:
                    self._serve(assoc, event)      # the peer's own request, then wait on
                    # it is alive and working for us (C-GET's C-STOREs): the DIMSE timeout
                    # bounds silence, not a whole retrieve's worth of sub-operations
                    deadline = max(deadline, time.monotonic() + self.dest.dimse_timeout)
                    continue
                if (command.get(pdu.COMMAND_FIELD) == rsp_field
                        and command.get(pdu.MESSAGE_ID_BEING_RESPONDED_TO) == msg_id):
                    return event      # a dataset with it, which we never asked for, is ignored
                self._drop(assoc, abort=True)
                name = _request_name(rsp_field)
                raise OutcomeUnknown(
                    f"bad {name} response from {assoc.where}: expected the {name}-RSP to message "
                    f"{msg_id}, got {command_name(event.field)} answering message {event.responds_to}")
            name = _request_name(rsp_field)
            if isinstance(event, PeerAbort):
                self._drop(assoc, abort=False)
                raise OutcomeUnknown(f"association aborted by {assoc.where} (source={event.source} "
                                     f"reason={event.reason}) before the {name} response")
            if isinstance(event, ReleaseRequest):
                try:
                    assoc.sock.sendall(assoc.ul.release_reply())
                except OSError:
                    pass
                self._drop(assoc, abort=False)
                raise OutcomeUnknown(f"{assoc.where} released the association before the {name} response")
            self._drop(assoc, abort=True)
            raise OutcomeUnknown(f"unexpected {type(event).__name__} from {assoc.where} "
                                 f"while waiting for the {name} response")

    # -- ending -----------------------------------------------------------------------------

    def _drop(self, assoc: Association, abort: bool) -> None:
        """Close the socket (after an A-ABORT when asked) and forget the association."""
        assoc.is_established = False
        if abort:
            try:
                assoc.sock.settimeout(1.0)
                assoc.sock.sendall(assoc.ul.abort(0, 0))
            except OSError:
                pass
        try:
            assoc.sock.close()
        except OSError:
            pass
        if self.assoc is assoc:
            self.assoc = None
            self.proposed = set()

    def release(self) -> None:
        """A-RELEASE-RQ and wait (bounded) for the RP; on a release collision just close."""
        assoc = self.assoc
        if assoc is None:
            self.proposed = set()
            return
        wait = min(self.dest.acse_timeout, RELEASE_TIMEOUT)
        deadline = time.monotonic() + wait
        abort = False
        try:
            assoc.sock.settimeout(wait)
            assoc.sock.sendall(assoc.ul.release())
            while True:
                event = _next_event(assoc, deadline)
                if isinstance(event, (ReleaseReply, ReleaseRequest, PeerAbort)):
                    break          # RQ: a release collision (PS3.8 9.2.5), closing is enough
        except _Timeout:
            log.info("%s: no A-RELEASE-RP within %g s; aborting", assoc.where, wait, extra=_fields(assoc))
            abort = True
        except (OSError, _Closed, pdu.ProtocolError):
            pass               # the peer went away: nothing left to release
        self._drop(assoc, abort=abort)

    def abort(self) -> None:
        if self.assoc is not None:
            self._drop(self.assoc, abort=True)
        self.proposed = set()


def _request_name(rsp_field: int) -> str:
    """``C-STORE`` for C-STORE-RSP: how messages name the exchange."""
    return command_name(rsp_field).removesuffix("-RSP")


def echo(dest: Remote, calling_ae: str) -> tuple[bool, str]:
    """C-ECHO a destination on a fresh association; (ok, what happened in words)."""
    conn = Connection(dest, calling_ae)
    head = f"C-ECHO {conn.calling_ae} -> {dest.ae_title}@{dest.host}:{dest.port}"
    if isinstance(getattr(dest, "tls", None), TlsPeerConfig):
        head += " (TLS)"
    try:
        conn.ensure({(acse.VERIFICATION_SOP_CLASS, acse.IMPLICIT_VR_LITTLE_ENDIAN)})
        status = conn.echo()
    except NoContextAccepted as exc:
        return False, f"{head}: Verification not accepted ({exc})"
    except (AssociationFailed, OutcomeUnknown) as exc:
        return False, str(exc)
    finally:
        conn.release()
    if status == Status.SUCCESS:
        return True, f"{head}: success"
    return False, f"{head}: {describe(status)}"
