"""Storage SCP fast path: an asyncio (uvloop) acceptor for the P-DATA / C-STORE data flow.

pynetdicom's acceptor waits in 1 ms polling loops and runs every command set through pydicom,
which caps one association at ~70 tiny objects/s. Here one event loop thread serves every
association: :mod:`fastroute.dicom.pdu` (I/O-free) frames PDUs and encodes command sets,
:class:`UpperLayer` (I/O-free) turns bytes into events, and :class:`_Connection` (the thin
asyncio shell) answers them. pynetdicom is kept where it is good and not hot: the
A-ASSOCIATE-RQ is decoded into its primitive and the presentation contexts are negotiated by
``pynetdicom.presentation.negotiate_as_acceptor``.

What a C-STORE does is :class:`receive.Receiver`'s, in pure functions: access control
(:func:`check_access`), peek + UID check + routing (:func:`prepare_store`), then a group commit
through the shared ``Committer`` without blocking the loop (:func:`submit_nowait`); success is
answered only after the commit, so an aborted association never loses an acknowledged object.
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple, Union, cast

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
    negotiate_as_acceptor,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from fastroute.dicom import pdu
from fastroute.dicom.attrs import read_attributes
from fastroute.config import Config
from fastroute.errors import PeekError, SpoolError, SpoolFullError
from fastroute.dicom.pn_scp import (
    ACCEPTED_SYNTAXES,
    INDEX_KEYWORDS,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    _text,
)
from fastroute.routing.rules import RuleSet
from fastroute.spool import Incoming, PutResult, Spool
from fastroute.spool.commit import Committer

log = logging.getLogger("fastroute.receive.fast")

IMPLEMENTATION_UID = str(PYNETDICOM_IMPLEMENTATION_UID)   # shared with fastroute's SCU side
IMPLEMENTATION_VERSION = "FASTROUTE_010"
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"

MAX_OBJECT_BYTES = 4 * 1024**3        # one dataset larger than this is aborted, not buffered
MAX_COMMAND_BYTES = 64 * 1024         # command sets are a few hundred bytes
MAX_ASSOCIATE_BYTES = 1024 * 1024     # an A-ASSOCIATE-RQ with every context is ~60 kB
PAUSE_AT_BYTES = 4 * 1024 * 1024      # stop reading a peer that pipelines while we commit

STATUS_SUCCESS = 0x0000
STATUS_UNRECOGNISED_OPERATION = 0x0211

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101

# Command set tags (PS3.7 E.1).
AFFECTED_SOP_CLASS = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
DATASET_TYPE = 0x00000800
AFFECTED_SOP_INSTANCE = 0x00001000
REQUESTED_SOP_CLASS = 0x00001003

# A-ABORT (PS3.8 9.3.8): source 2 = service provider; reasons.
ABORT_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNISED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PARAMETER = 0x06


class ObjectTooLarge(pdu.ProtocolError):
    """A dataset grew past the per-object cap; the association is aborted, nothing buffered."""


class UnexpectedPdu(pdu.ProtocolError):
    """A well-formed PDU that is wrong in the association's state (A-ABORT reason 2)."""


# -- access control and negotiation (pure) ------------------------------------------------------

class Rejection(NamedTuple):
    """An A-ASSOCIATE-RJ (result, source, reason) and why, for the log."""

    result: int
    source: int
    reason: int
    why: str


def parse_networks(cfg: Config) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None:
    return ([ipaddress.ip_network(p, strict=False) for p in cfg.allowed_peers]
            if cfg.allowed_peers is not None else None)


def check_access(cfg: Config, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None,
                 calling: str, called: str, ip: str, others: int) -> Rejection | None:
    """Decide an association request as ``receive.Receiver`` (and pynetdicom behind it) does.

    ``others`` is the number of associations already established on this listener. The
    precedence is the pynetdicom acceptor's: peer address, calling AE, then the association
    limit over the called AE title.
    """
    if networks is not None:
        try:
            addr = ipaddress.ip_address(ip)
            allowed = any(addr in net for net in networks)
        except ValueError:
            allowed = False
        if not allowed:
            return Rejection(0x01, 0x01, 0x01, "peer address not in allowed_peers")
    if cfg.allowed_calling_aes is not None and calling not in cfg.allowed_calling_aes:
        return Rejection(0x01, 0x01, 0x03, "calling AE title not in allowed_calling_aes")
    if others >= cfg.max_associations:
        return Rejection(0x02, 0x03, 0x02,
                         f"max_associations ({cfg.max_associations}) reached: local limit exceeded")
    if cfg.require_called_ae and called != cfg.ae_title:
        return Rejection(0x01, 0x01, 0x07, f"called AE title {called!r} is not {cfg.ae_title!r}")
    return None


def supported_contexts() -> list[PresentationContext]:
    """The contexts ``receive.Receiver`` supports: Verification and all Storage, as sent."""
    out = [build_context(Verification, ACCEPTED_SYNTAXES)]
    out += [build_context(str(cx.abstract_syntax), ACCEPTED_SYNTAXES)
            for cx in AllStoragePresentationContexts]
    return out


def negotiate(rq: A_ASSOCIATE, supported: list[PresentationContext],
              max_pdu: int) -> tuple[A_ASSOCIATE, dict[int, str]]:
    """Build the A-ASSOCIATE-AC primitive for ``rq``; return it and {context id: transfer syntax}.

    Role selection is answered by pynetdicom's negotiation (our contexts have default roles,
    so no reply items); an asynchronous operations window is answered (1, 1), i.e.
    synchronous; user identity gets no response item (allowed: the peer asked, we don't verify).
    """
    roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in rq.user_information
             if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid}
    results, role_items = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                                supported, roles or None)
    ac = A_ASSOCIATE()
    ac.application_context_name = APPLICATION_CONTEXT_NAME
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = results
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    info: list[Any] = [max_len, impl, version, *role_items]
    if any(isinstance(i, AsynchronousOperationsWindowNegotiation) for i in rq.user_information):
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        info.append(window)
    ac.user_information = info
    accepted = {int(cx.context_id): str(cx.transfer_syntax[0]) for cx in results
                if cx.result == 0x00 and cx.context_id is not None}
    return ac, accepted


# -- the C-STORE decision (pure) ----------------------------------------------------------------

class Refusal(NamedTuple):
    """A C-STORE answered with a failure status before anything was spooled."""

    status: int
    comment: str
    why: str


def prepare_store(data: bytearray | bytes, transfer_syntax: str, sop_class: str, sop_uid: str,
                  tags: Sequence[int], rules: RuleSet, calling: str, called: str,
                  ip: str) -> Incoming | Refusal:
    """Peek, check and route one received dataset: ``receive.Receiver._on_store`` up to the commit.

    Returns the item to commit, or why it is refused (0xC000 unreadable, 0xA900 UID mismatch).
    """
    try:
        attrs = read_attributes(data, transfer_syntax, tags)
    except PeekError as exc:
        return Refusal(STATUS_CANNOT_UNDERSTAND, f"dataset could not be parsed: {exc}"[:64],
                       f"unreadable dataset ({exc})")
    ds_sop = attrs.get(0x00080018)
    if ds_sop is not None and str(ds_sop) != sop_uid:
        return Refusal(STATUS_DATASET_MISMATCH, "SOP Instance UID in command and dataset differ",
                       f"Affected SOP Instance UID {sop_uid} differs from the dataset's {ds_sop!s}")
    decision = rules.route(attrs, {"calling_ae": calling, "called_ae": called, "peer_ip": ip})
    meta: dict[str, Any] = {name: _text(attrs.get(tag)) for tag, name in INDEX_KEYWORDS.items()
                            if tag not in (0x00080016, 0x00080018)}
    meta.update(calling_ae=calling, called_ae=called, peer=ip, rules=list(decision.matched))
    # bytearray on purpose: LMDB and hashlib take any buffer, so the received bytes are
    # copied once (into the bytearray) on their way to the spool.
    return Incoming(data, transfer_syntax, sop_class, sop_uid,  # type: ignore[arg-type]
                    decision.destinations, meta)


def refusal_for(exc: BaseException) -> Refusal:
    """The C-STORE status for a failed commit: always 0xA700, so the modality retries."""
    if isinstance(exc, SpoolFullError):
        return Refusal(STATUS_OUT_OF_RESOURCES, "spool full or disk below free-space floor", f"refused: {exc}")
    if isinstance(exc, (SpoolError, OSError)):
        return Refusal(STATUS_OUT_OF_RESOURCES, "spool write failed", f"could not be spooled: {exc}")
    return Refusal(STATUS_OUT_OF_RESOURCES, "internal error", f"could not be spooled (internal error): {exc!r}")


def submit_nowait(committer: Committer, item: Incoming) -> Future[PutResult]:
    """Queue ``item`` for the next group commit and return its future at once.

    ``Committer.submit`` blocks its caller until the fsync; the event loop must not. Until
    receive.py grows a public ``Committer.submit_nowait``, this puts onto its queue directly.
    """
    public: Callable[[Incoming], Future[PutResult]] | None = getattr(committer, "submit_nowait", None)
    if public is not None:
        return public(item)
    fut: Future[PutResult] = Future()
    committer._q.put((item, fut))
    return fut


# -- the upper layer, I/O-free ------------------------------------------------------------------

@dataclass(slots=True)
class AssociateRequest:
    primitive: A_ASSOCIATE


@dataclass(slots=True)
class StoreRequest:
    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    data: bytearray


@dataclass(slots=True)
class EchoRequest:
    context_id: int
    message_id: int


@dataclass(slots=True)
class OtherRequest:
    """A DIMSE request we do not serve; answered 0x0211 unless it is a C-CANCEL."""

    context_id: int
    command: dict[int, Any]


@dataclass(slots=True)
class ReleaseRequest:
    pass


@dataclass(slots=True)
class PeerAbort:
    pass


Event = Union[AssociateRequest, StoreRequest, EchoRequest, OtherRequest, ReleaseRequest, PeerAbort]

AWAITING_RQ, ESTABLISHED, CLOSED = "awaiting-rq", "established", "closed"


def _uid(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("ascii", "replace")
    return str(value).rstrip("\0 ")


class UpperLayer:
    """One association's acceptor side: bytes in, :data:`Event` s out, no I/O and no clock.

    Events come one at a time (:meth:`next_event`) so the shell can stop taking them while a
    commit is outstanding; PDUs stay buffered meanwhile. Raises ``pdu.ProtocolError`` for
    anything a peer must be aborted for. Memory is bounded: one PDU of at most
    ``max_pdu_in`` bytes in the reader, one command set, one dataset of ``max_object`` bytes.
    """

    def __init__(self, *, max_pdu_in: int, max_object: int = MAX_OBJECT_BYTES) -> None:
        self.reader = pdu.PduReader(max_pdu_length=MAX_ASSOCIATE_BYTES)
        self.state = AWAITING_RQ
        self.contexts: dict[int, str] = {}
        self.max_object = max_object
        # The peer must keep P-DATA-TF within what we announced (0: unlimited); 6 bytes of
        # slack for peers that count the PDU header in.
        self.max_pdu_in = max_pdu_in + 6 if max_pdu_in > 0 else max_object + 64
        self._events: collections.deque[Event] = collections.deque()
        self._cmd = bytearray()
        self._cmd_ctx: int | None = None
        self._command: dict[int, Any] | None = None   # decoded, waiting for its dataset
        self._data: bytearray | None = None

    def feed(self, data: bytes) -> None:
        self.reader.feed(data)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        return self.reader.buffered

    def in_message(self) -> bool:
        """True while part of a DIMSE message has arrived (a stalled peer mid-object)."""
        return self._cmd_ctx is not None

    def established(self, contexts: dict[int, str]) -> None:
        self.contexts = contexts
        self.state = ESTABLISHED
        self.reader.max_pdu_length = self.max_pdu_in

    def next_event(self) -> Event | None:
        """The next complete event, or None until more bytes are fed."""
        while not self._events:
            if self.state == CLOSED:
                return None
            item = self.reader.next()     # raises for unknown types and oversized PDUs
            if item is None:
                return None
            self._on_pdu(*item)
        return self._events.popleft()

    def _on_pdu(self, kind: int, body: memoryview) -> None:
        if kind == pdu.P_DATA_TF:
            if self.state != ESTABLISHED:
                raise UnexpectedPdu("P-DATA-TF before the association was established")
            self._on_pdata(body)
        elif kind == pdu.A_ASSOCIATE_RQ:
            if self.state != AWAITING_RQ:
                raise UnexpectedPdu("A-ASSOCIATE-RQ on an established association")
            self._events.append(AssociateRequest(pdu.decode_associate_rq(body)))
        elif kind == pdu.A_RELEASE_RQ:
            if self.state != ESTABLISHED:
                raise UnexpectedPdu("A-RELEASE-RQ before the association was established")
            self.state = CLOSED
            self._events.append(ReleaseRequest())
        elif kind == pdu.A_ABORT:
            self.state = CLOSED
            self._events.append(PeerAbort())
        else:
            raise UnexpectedPdu(f"unexpected PDU type 0x{kind:02X} for an association acceptor")

    def _on_pdata(self, body: memoryview) -> None:
        for ctx, is_command, is_last, fragment in pdu.iter_pdvs(body):
            if ctx not in self.contexts:
                raise pdu.ProtocolError(f"PDV on presentation context {ctx}, which was not accepted")
            if self._cmd_ctx is not None and ctx != self._cmd_ctx:
                raise pdu.ProtocolError(f"PDV on context {ctx} in the middle of a message on context {self._cmd_ctx}")
            if is_command:
                if self._command is not None:
                    raise pdu.ProtocolError("command fragment where a dataset fragment was expected")
                self._cmd_ctx = ctx
                if is_last and not self._cmd:
                    command = pdu.decode_command(fragment)   # the usual case: one fragment, no copy
                else:
                    self._cmd += fragment
                    if len(self._cmd) > MAX_COMMAND_BYTES:
                        raise pdu.ProtocolError(f"command set longer than {MAX_COMMAND_BYTES} bytes")
                    if not is_last:
                        continue
                    command = pdu.decode_command(memoryview(self._cmd))
                    self._cmd = bytearray()
                self._on_command(ctx, command)
            else:
                if self._command is None:
                    raise pdu.ProtocolError("dataset fragment without a command")
                if self._data is None:
                    self._data = bytearray(fragment)
                else:
                    self._data += fragment
                if len(self._data) > self.max_object:
                    raise ObjectTooLarge(f"dataset larger than {self.max_object} bytes")
                if is_last:
                    command, data = self._command, self._data
                    self._command = self._data = None
                    self._cmd_ctx = None
                    self._events.append(self._request(ctx, command, data))

    def _on_command(self, ctx: int, command: dict[int, Any]) -> None:
        if command.get(DATASET_TYPE, NO_DATASET) != NO_DATASET:
            self._command = command          # the dataset follows
            return
        self._cmd_ctx = None
        if command.get(COMMAND_FIELD) == C_STORE_RQ:
            raise pdu.ProtocolError("C-STORE-RQ without a dataset")
        self._events.append(self._request(ctx, command, None))

    @staticmethod
    def _request(ctx: int, command: dict[int, Any], data: bytearray | None) -> Event:
        field = command.get(COMMAND_FIELD)
        msg_id = int(command.get(MESSAGE_ID, 0))
        if field == C_STORE_RQ and data is not None:
            return StoreRequest(ctx, msg_id, _uid(command.get(AFFECTED_SOP_CLASS, "")),
                                _uid(command.get(AFFECTED_SOP_INSTANCE, "")), data)
        if field == C_ECHO_RQ:
            return EchoRequest(ctx, msg_id)
        return OtherRequest(ctx, command)


def failure_response(command: dict[int, Any], status: int) -> bytes:
    """A response to a request we do not serve, with ``status`` (0x0211 unrecognised operation)."""
    rsp: dict[int, Any] = {COMMAND_FIELD: (int(command.get(COMMAND_FIELD, 0)) | 0x8000) & 0xFFFF,
                           0x00000120: int(command.get(MESSAGE_ID, 0)),
                           DATASET_TYPE: NO_DATASET, 0x00000900: status}
    sop_class = command.get(AFFECTED_SOP_CLASS, command.get(REQUESTED_SOP_CLASS))
    if sop_class:
        rsp[AFFECTED_SOP_CLASS] = _uid(sop_class)
    return pdu.encode_command(rsp)


# -- the asyncio shell --------------------------------------------------------------------------

@dataclass
class _Stats:
    stored: int = 0
    refused: int = 0
    bytes: int = 0


class _Connection(asyncio.Protocol):
    """One TCP connection: feeds :class:`UpperLayer`, answers its events, keeps the timers."""

    def __init__(self, receiver: FastReceiver) -> None:
        self.r = receiver
        self.loop = receiver.loop
        self.ul = UpperLayer(max_pdu_in=receiver.cfg.max_pdu, max_object=receiver.max_object_bytes)
        self.transport: asyncio.Transport | None = None
        self.ip = "?"
        self.calling = self.called = "?"
        self.peer_max_pdu = 0
        self.stats = _Stats()
        self.busy = False                 # a commit is outstanding: events wait
        self.paused = False
        self.pauses = 0                   # times reading paused behind a commit
        self.closing = False
        self.outcome = ""                 # released / aborted, once logged
        self.last_rx = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        self.r._conns.add(self)
        self.last_rx = self.loop.time()
        self.timer = self.loop.call_later(self.r.cfg.acse_timeout, self._on_timer)

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
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
        if not self.outcome and self.ul.state == ESTABLISHED:
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
        except ObjectTooLarge as exc:
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
            log.exception("association from %s@%s: internal error", self.calling, self.ip)
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

    def _handle(self, event: Event) -> None:
        if isinstance(event, StoreRequest):
            self._on_store(event)
        elif isinstance(event, EchoRequest):
            log.debug("C-ECHO from %s@%s", self.calling, self.ip)
            self._send_command(event.context_id, pdu.encode_c_echo_rsp(event.message_id, STATUS_SUCCESS))
        elif isinstance(event, AssociateRequest):
            self._on_associate(event.primitive)
        elif isinstance(event, OtherRequest):
            field = int(event.command.get(COMMAND_FIELD, 0))
            if field == C_CANCEL_RQ:
                return
            log.warning("association from %s@%s: DIMSE command 0x%04X is not served -> status 0x%04X",
                        self.calling, self.ip, field, STATUS_UNRECOGNISED_OPERATION)
            self._send_command(event.context_id, failure_response(event.command, STATUS_UNRECOGNISED_OPERATION))
        elif isinstance(event, ReleaseRequest):
            self._write([pdu.encode_release_rp()])
            self._finish("released", "", logging.INFO)
            self._close()
        elif isinstance(event, PeerAbort):
            partial = " (an unacknowledged object was discarded)" if self.ul.in_message() else ""
            self._finish("aborted", f"A-ABORT from the peer{partial}", logging.WARNING)
            self._close()

    def _on_associate(self, rq: A_ASSOCIATE) -> None:
        self.calling = str(rq.calling_ae_title).strip()
        self.called = str(rq.called_ae_title).strip()
        peer_max = int(rq.maximum_length_received or 0)
        self.peer_max_pdu = peer_max if peer_max >= 7 else 0   # below 7 nothing fits: ignore it
        rejection = check_access(self.r.cfg, self.r.networks, self.calling, self.called, self.ip,
                                 len(self.r._established))
        if rejection is not None:
            log.warning("rejecting association from %s@%s to %s: %s (A-ASSOCIATE-RJ %d/%d/%d)",
                        self.calling, self.ip, self.called, rejection.why,
                        rejection.result, rejection.source, rejection.reason)
            self._write([pdu.encode_associate_rj(rejection.result, rejection.source, rejection.reason)])
            self.outcome = "rejected"
            self._close()
            return
        ac, contexts = negotiate(rq, self.r.contexts, self.r.cfg.max_pdu)
        self._write([pdu.encode_associate_ac(ac)])
        self.ul.established(contexts)
        self.r._established.add(self)
        self._restart_timer(self.r.cfg.network_timeout)
        log.info("association from %s@%s to %s accepted (%d of %d contexts)", self.calling, self.ip,
                 self.called, len(contexts), len(rq.presentation_context_definition_list))

    def _on_store(self, rq: StoreRequest) -> None:
        ts = self.ul.contexts[rq.context_id]
        try:
            outcome = prepare_store(rq.data, ts, rq.sop_class_uid, rq.sop_instance_uid, self.r.tags,
                                    self.r.rules, self.calling, self.called, self.ip)
        except Exception as exc:          # a rule that raises must not cost the association
            log.exception("C-STORE from %s@%s sop_instance_uid=%s: routing failed",
                          self.calling, self.ip, rq.sop_instance_uid)
            outcome = refusal_for(exc)
        if isinstance(outcome, Refusal):
            self._refuse(rq, outcome)
            return
        self.busy = True
        future = asyncio.wrap_future(submit_nowait(self.r.committer, outcome), loop=self.loop)
        self.r._pending.add(future)
        future.add_done_callback(lambda f: self._committed(rq, f))

    def _committed(self, rq: StoreRequest, future: asyncio.Future[PutResult]) -> None:
        self.r._pending.discard(future)
        self.busy = False
        exc = future.exception()
        if exc is not None:
            self._refuse(rq, refusal_for(exc))
        else:
            result = future.result()
            self.stats.stored += 1
            self.stats.bytes += len(rq.data)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("C-STORE from %s@%s sop_instance_uid=%s stored oid=%d -> %s%s", self.calling,
                          self.ip, rq.sop_instance_uid, result.oid, ",".join(result.queued) or "unrouted",
                          f" suppressed for {','.join(result.suppressed)}" if result.suppressed else "")
            self._send_command(rq.context_id, pdu.encode_c_store_rsp(
                rq.message_id, rq.sop_class_uid, rq.sop_instance_uid, STATUS_SUCCESS))
        if self.transport is not None:
            self._pump()                  # events that arrived while committing

    def _refuse(self, rq: StoreRequest, refusal: Refusal) -> None:
        self.stats.refused += 1
        log.error("C-STORE from %s@%s to %s sop_instance_uid=%s: %s -> status 0x%04X", self.calling,
                  self.ip, self.called, rq.sop_instance_uid, refusal.why, refusal.status)
        self._send_command(rq.context_id, pdu.encode_c_store_rsp(
            rq.message_id, rq.sop_class_uid, rq.sop_instance_uid, refusal.status, refusal.comment))

    # output and teardown -----------------------------------------------------------------

    def _send_command(self, context_id: int, command: bytes) -> None:
        parts: list[Any] = []
        for header, payload in pdu.p_data_tf(context_id, True, command, self.peer_max_pdu):
            parts += (header, payload)
        self._write(parts)

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
        """A-ABORT (service provider) and close; whatever was not acknowledged is dropped."""
        if self.closing:
            return
        self._finish("aborted", why, level)
        self._write([pdu.encode_abort(ABORT_PROVIDER, reason)])
        self._close()

    def _finish(self, how: str, why: str, level: int) -> None:
        if self.outcome:
            return
        self.outcome = how
        st = self.stats
        log.log(level, "association from %s@%s to %s %s%s: %d stored (%d bytes), %d refused",
                self.calling, self.ip, self.called, how, f" ({why})" if why else "",
                st.stored, st.bytes, st.refused)

    def _restart_timer(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        """ARTIM before the A-ASSOCIATE-RQ, network_timeout after; re-armed, not reset per read."""
        self.timer = None
        if self.closing or self.transport is None:
            return
        if self.ul.state == AWAITING_RQ:
            log.warning("connection from %s: no A-ASSOCIATE-RQ within %gs (ARTIM); closing",
                        self.ip, self.r.cfg.acse_timeout)
            self.outcome = "timed out"
            self._close()
            return
        timeout = self.r.cfg.network_timeout
        idle = self.loop.time() - self.last_rx
        if self.busy or idle < timeout:   # our own commit is not the peer's silence
            self._restart_timer(max(0.05, timeout - (0.0 if self.busy else idle)))
            return
        self._abort(f"no data for {idle:.1f}s (network_timeout)", REASON_NOT_SPECIFIED, logging.WARNING)


class FastReceiver:
    """A listener on one asyncio loop thread; same surface as ``receive.Receiver``.

    ``start()`` binds (raising OSError in the caller, as the pynetdicom receiver does) and
    starts the loop thread; ``stop(grace)`` stops accepting, lets associations finish for
    ``grace`` seconds, aborts the rest and waits for their outstanding commits.
    """

    def __init__(self, cfg: Config, spool: Spool, rules: RuleSet, committer: Committer, *,
                 max_object_bytes: int = MAX_OBJECT_BYTES, pause_at_bytes: int = PAUSE_AT_BYTES) -> None:
        self.cfg = cfg
        self.spool = spool
        self.rules = rules
        self.committer = committer
        self.max_object_bytes = max_object_bytes
        self.pause_at_bytes = pause_at_bytes
        self.tags = tuple(sorted(set(rules.tags) | set(INDEX_KEYWORDS)))
        self.networks = parse_networks(cfg)
        self.contexts = supported_contexts()
        self.port = cfg.port
        self.loop = _new_loop()
        self._conns: set[_Connection] = set()
        self._established: set[_Connection] = set()
        self._pending: set[asyncio.Future[PutResult]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        sock = _listen_socket(self.cfg.host, self.cfg.port)
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self.loop.run_forever, name="fastroute-scp-loop",
                                        daemon=True)
        self._thread.start()

        async def serve() -> asyncio.AbstractServer:
            return await self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=128)

        try:
            self._server = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(timeout=30)
        except BaseException:
            sock.close()
            self._stop_loop()
            raise
        log.info("listening as %s on %s:%d (asyncio fast path, %s)", self.cfg.ae_title, self.cfg.host,
                 self.port, type(self.loop).__module__.split(".")[0])

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
