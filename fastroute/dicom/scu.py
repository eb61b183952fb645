"""Storage SCU on a plain blocking socket: the data path of ``send.Connection`` without
pynetdicom's reactor threads.

Why: pynetdicom's DUL and association reactors poll every millisecond and encode every
message through pydicom, which caps a routed stream at ~70 small objects/s. Here the sender
thread owns its socket: it writes the C-STORE command and the dataset with ``sendmsg``
straight from the caller's buffer (a memoryview into an LMDB read transaction is fine: nothing
is copied) and reads the response itself, with a deadline on every wait. Association
negotiation is still pynetdicom's PDU code (``pdu.encode_associate_rq``/``decode_associate_ac``
and ``negotiate_as_requestor``). The interface and the exceptions are ``send.Connection``'s,
so ``schedule`` can use either.

We identify as implementation class UID ``IMPLEMENTATION_CLASS_UID`` (a fixed UID under
pydicom's root, derived once from the name "fastroute") with version name ``FASTROUTE_010``.
"""
from __future__ import annotations

import logging
import select
import socket
import time
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification,
                                       MaximumLengthNotification)
from pynetdicom.presentation import PresentationContext, negotiate_as_requestor

from fastroute import __version__

from fastroute.dicom import pdu
from fastroute.config import DestinationConfig
from fastroute.dicom.pn_scu import (MAX_CONTEXTS, AssociationFailed, NoContextAccepted, OutcomeUnknown,
                   StoreResult, _cx_result, _reject_reason, status_text)

log = logging.getLogger("fastroute.send")

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"   # DICOM application context, PS3.7 A.2.1
# pydicom.uid.generate_uid(entropy_srcs=["fastroute", "implementation class UID"]), frozen.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.10887796605032696485799925401341379173"
IMPLEMENTATION_VERSION_NAME = "FASTROUTE_" + __version__.replace(".", "")[:6]
SOCKET_BUFFER = 4 * 1024 * 1024
RECV_SIZE = 256 * 1024
IOV_BATCH = 256             # buffers per sendmsg call (Linux IOV_MAX is 1024)
RELEASE_TIMEOUT = 10.0      # cap on waiting for A-RELEASE-RP: a release must not stall a thread
MIN_READER_PDU = 1024 * 1024


class _Timeout(Exception):
    """A deadline passed while waiting for the peer."""


class _Closed(Exception):
    """The peer closed the TCP connection."""


@dataclass
class FastAssociation:
    """One established association: its socket, the negotiated contexts and the peer's limits."""

    sock: socket.socket
    reader: pdu.PduReader
    where: str                                   # "CALLING -> CALLED@host:port" for messages
    peer_max_pdu: int                            # 0 = unlimited
    contexts: list[PresentationContext] = field(default_factory=list)   # accepted only
    by_pair: dict[tuple[str, str], int] = field(default_factory=dict)
    peer_implementation: str = ""
    is_established: bool = True                  # send.Connection's Association has it too


def _where(calling_ae: str, dest: DestinationConfig) -> str:
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


def _read_pdu(assoc: FastAssociation, deadline: float) -> tuple[int, memoryview]:
    """The next PDU, waiting at most until ``deadline``; _Timeout, _Closed or ProtocolError."""
    while True:
        item = assoc.reader.next()
        if item is not None:
            return item
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
        assoc.reader.feed(data)


class FastConnection:
    """One association slot to a destination, reused across batches by one sender thread.

    Same contract as ``send.Connection``: ``ensure`` raises AssociationFailed (destination
    level) or NoContextAccepted; ``send_raw`` raises OutcomeUnknown once any byte of the
    message may have left, AssociationFailed when the peer had closed an idle association.
    """

    def __init__(self, dest: DestinationConfig, calling_ae: str) -> None:
        self.dest = dest
        self.calling_ae = dest.calling_ae or calling_ae
        self.assoc: FastAssociation | None = None
        self.proposed: set[tuple[str, str]] = set()
        self.last_used = 0.0
        self.msg_id = 0

    # -- association ------------------------------------------------------------------------

    def ensure(self, pairs: set[tuple[str, str]]) -> FastAssociation:
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

    def _request(self, pairs: list[tuple[str, str]]) -> tuple[A_ASSOCIATE, list[PresentationContext]]:
        """The A-ASSOCIATE request primitive: one context per pair, odd IDs from 1."""
        contexts = []
        for i, (sop_class, ts) in enumerate(pairs):
            cx = PresentationContext()
            cx.context_id = 2 * i + 1
            cx.abstract_syntax = UID(sop_class)
            cx.transfer_syntax = [UID(ts)]
            contexts.append(cx)
        rq = A_ASSOCIATE()
        rq.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        rq.calling_ae_title = self.calling_ae
        rq.called_ae_title = self.dest.ae_title
        rq.presentation_context_definition_list = contexts
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.dest.max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        impl_name = ImplementationVersionNameNotification()
        impl_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        rq.user_information = [max_length, impl_uid, impl_name]
        return rq, contexts

    def _associate(self, pairs: list[tuple[str, str]]) -> FastAssociation:
        d = self.dest
        where = _where(self.calling_ae, d)
        rq, rq_contexts = self._request(pairs)
        encoded = pdu.encode_associate_rq(rq)
        try:
            sock = _connect(d.host, d.port, d.acse_timeout)
        except OSError as exc:
            # The OS's own words: refused, timed out, or reset by a peer that accepted and
            # closed at once (a proxy or load balancer in front of a dead PACS).
            why = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
            raise AssociationFailed(f"cannot connect to {where}: {why}") from exc
        reader_max = max(d.max_pdu or pdu.PduReader().max_pdu_length, MIN_READER_PDU)
        assoc = FastAssociation(sock, pdu.PduReader(reader_max), where, 0)
        deadline = time.monotonic() + d.acse_timeout
        try:
            sock.settimeout(d.acse_timeout)
            sock.sendall(encoded)
            pdu_type, body = _read_pdu(assoc, deadline)
        except (OSError, _Timeout, _Closed, pdu.ProtocolError) as exc:
            self._drop(assoc, abort=not isinstance(exc, _Closed))
            why = {_Timeout: f"no answer within the ACSE timeout ({d.acse_timeout:g} s)",
                   _Closed: "the peer closed the connection"}.get(type(exc), str(exc))
            raise AssociationFailed(f"association with {where} failed: {why}") from exc
        if pdu_type == pdu.A_ASSOCIATE_RJ:
            self._drop(assoc, abort=False)
            try:
                result, source, reason = pdu.decode_associate_rj(body)
            except pdu.ProtocolError as exc:
                raise AssociationFailed(f"association rejected by {where}: {exc}") from exc
            raise AssociationFailed(
                f"association rejected by {where}: result={result} source={source} "
                f"reason={reason} ({_reject_reason(source, reason)})")
        if pdu_type == pdu.A_ABORT:
            self._drop(assoc, abort=False)
            raise AssociationFailed(f"association aborted by {where}")
        if pdu_type != pdu.A_ASSOCIATE_AC:
            self._drop(assoc, abort=True)
            raise AssociationFailed(f"association with {where} failed: unexpected "
                                    f"{pdu.PDU_NAMES[pdu_type]} in answer to A-ASSOCIATE-RQ")
        try:
            ac = pdu.decode_associate_ac(body)
            results = negotiate_as_requestor(rq_contexts,
                                             ac.presentation_context_definition_results_list)
        except (pdu.ProtocolError, ValueError, KeyError) as exc:
            self._drop(assoc, abort=True)
            raise AssociationFailed(f"association with {where} failed: {exc}") from exc
        assoc.peer_max_pdu = int(ac.maximum_length_received or 0)
        assoc.peer_implementation = str(ac.implementation_class_uid or "")
        for cx in results:
            if cx.result == 0 and cx.transfer_syntax:
                assoc.contexts.append(cx)
                assoc.by_pair[(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))] = int(
                    cx.context_id or 0)
        if not assoc.contexts:
            self._drop(assoc, abort=True)
            # A rejected context echoes no transfer syntax: key the reason by SOP class.
            reasons = {str(cx.abstract_syntax): _cx_result(cx.result) for cx in results}
            raise NoContextAccepted(
                f"{d.ae_title}@{d.host}:{d.port} accepted none of the {len(results)} "
                "presentation context(s) proposed", reasons)
        log.debug("associated %s: %d of %d contexts accepted, peer max PDU %d, implementation %s",
                  where, len(assoc.contexts), len(results), assoc.peer_max_pdu,
                  assoc.peer_implementation)
        return assoc

    def context_for(self, sop_class: str, ts: str) -> int | None:
        assert self.assoc is not None
        return self.assoc.by_pair.get((sop_class, ts))

    def accepted(self, sop_class: str) -> list[str]:
        assert self.assoc is not None
        return [str(cx.transfer_syntax[0]) for cx in self.assoc.contexts
                if cx.abstract_syntax == sop_class]

    # -- C-STORE ----------------------------------------------------------------------------

    def send_raw(self, context_id: int, sop_class: str, sop_uid: str,
                 data: bytes | memoryview) -> StoreResult:
        """C-STORE already-encoded bytes; OutcomeUnknown when no response arrives."""
        assoc = self.assoc
        if assoc is None:
            raise AssociationFailed("association is not established")
        if self._closed_while_idle(assoc):
            raise AssociationFailed(f"association closed by the peer while idle ({assoc.where})")
        self.msg_id = (self.msg_id % 65535) + 1
        msg_id = self.msg_id
        command = pdu.encode_c_store_rq(msg_id, sop_class, sop_uid)
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
                                 f"{sop_uid}: {exc}") from exc
        try:
            rsp = self._response(assoc, msg_id, time.monotonic() + self.dest.dimse_timeout)
        except OutcomeUnknown:
            raise
        except OSError as exc:
            self._drop(assoc, abort=True)
            raise OutcomeUnknown(f"connection to {assoc.where} failed waiting for the C-STORE "
                                 f"response to {sop_uid}: {exc}") from exc
        self.last_used = time.monotonic()
        status = rsp.get(pdu.STATUS)
        if not isinstance(status, int):
            self._drop(assoc, abort=True)
            raise OutcomeUnknown(f"C-STORE response from {assoc.where} without a status")
        comment = rsp.get(pdu.ERROR_COMMENT, "")
        comment = comment if isinstance(comment, str) else ""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("C-STORE %s sop_class=%s sop_instance_uid=%s bytes=%d context=%d: %s %s",
                      assoc.where, sop_class, sop_uid, len(data), context_id,
                      status_text(status), comment)
        return StoreResult(status, comment)

    @staticmethod
    def _send_message(assoc: FastAssociation, context_id: int, command: bytes,
                      data: bytes | memoryview, sent: list[int]) -> None:
        """Command then dataset PDUs, IOV_BATCH buffers per sendmsg, payloads never copied.

        A stalled peer fails a sendmsg after ``network_timeout`` without progress."""
        batch: list[bytes | memoryview] = []
        for is_command, payload in ((True, command), (False, data)):
            for header, fragment in pdu.p_data_tf(context_id, is_command, payload,
                                                  assoc.peer_max_pdu):
                batch.append(header)
                if fragment:
                    batch.append(fragment)
                if len(batch) >= IOV_BATCH:
                    _send_all(assoc.sock, batch, sent)
                    batch = []
        if batch:
            _send_all(assoc.sock, batch, sent)

    def _closed_while_idle(self, assoc: FastAssociation) -> bool:
        """Whether the peer aborted, released or closed while we were not sending.

        A readable socket between messages can only mean that (a Storage SCP sends nothing
        unasked). Such an association is dropped here, before any byte of the next message.
        """
        try:
            readable, _, _ = select.select([assoc.sock], [], [], 0)
        except (OSError, ValueError):
            readable = [assoc.sock]
        if not readable:
            return False
        why = "sent data while idle"
        try:
            assoc.sock.settimeout(0.0)
            data = assoc.sock.recv(RECV_SIZE)
            if not data:
                why = "closed the connection"
            else:
                assoc.reader.feed(data)
                item = assoc.reader.next()
                if item is not None and item[0] == pdu.A_RELEASE_RQ:
                    assoc.sock.sendall(pdu.encode_release_rp())
                    why = "requested release"
                elif item is not None and item[0] == pdu.A_ABORT:
                    why = "aborted"
                elif item is not None:
                    why = f"sent an unexpected {pdu.PDU_NAMES[item[0]]}"
        except (OSError, pdu.ProtocolError) as exc:
            why = f"connection error: {exc}"
        log.info("%s: the peer %s while the association was idle; reassociating",
                 assoc.where, why)
        self._drop(assoc, abort=why.startswith(("sent", "connection")))
        return True

    def _response(self, assoc: FastAssociation, msg_id: int,
                  deadline: float) -> dict[int, int | str | bytes]:
        """Read until the C-STORE-RSP to ``msg_id``; anything else ends the association."""
        command = bytearray()
        command_done: dict[int, int | str | bytes] | None = None
        while True:
            try:
                pdu_type, body = _read_pdu(assoc, deadline)
            except _Timeout:
                self._drop(assoc, abort=True)
                raise OutcomeUnknown(f"no C-STORE response from {assoc.where} within the DIMSE "
                                     f"timeout ({self.dest.dimse_timeout:g} s)") from None
            except _Closed:
                self._drop(assoc, abort=False)
                raise OutcomeUnknown(f"{assoc.where} closed the connection before the C-STORE "
                                     "response") from None
            except pdu.ProtocolError as exc:
                self._drop(assoc, abort=True)
                raise OutcomeUnknown(f"malformed PDU from {assoc.where}: {exc}") from exc
            if pdu_type == pdu.P_DATA_TF:
                try:
                    for _cx, is_command, is_last, fragment in pdu.iter_pdvs(body):
                        if not is_command:
                            if command_done is not None and is_last:
                                return command_done     # a dataset we never asked for: skipped
                            continue
                        command += fragment
                        if is_last:
                            rsp = pdu.decode_command(command)
                            command = bytearray()
                            field_, answers = (rsp.get(pdu.COMMAND_FIELD),
                                               rsp.get(pdu.MESSAGE_ID_BEING_RESPONDED_TO))
                            if field_ != pdu.C_STORE_RSP or answers != msg_id:
                                raise pdu.ProtocolError(
                                    f"expected the C-STORE-RSP to message {msg_id}, got command "
                                    f"field {field_!r} answering message {answers!r}")
                            if not pdu.has_dataset(rsp):
                                return rsp
                            command_done = rsp
                except pdu.ProtocolError as exc:
                    self._drop(assoc, abort=True)
                    raise OutcomeUnknown(f"bad C-STORE response from {assoc.where}: {exc}") from exc
                continue
            if pdu_type == pdu.A_ABORT:
                self._drop(assoc, abort=False)
                try:
                    source, reason = pdu.decode_abort(body)
                except pdu.ProtocolError:
                    source = reason = -1
                raise OutcomeUnknown(f"association aborted by {assoc.where} (source={source} "
                                     f"reason={reason}) before the C-STORE response")
            if pdu_type == pdu.A_RELEASE_RQ:
                try:
                    assoc.sock.sendall(pdu.encode_release_rp())
                except OSError:
                    pass
                self._drop(assoc, abort=False)
                raise OutcomeUnknown(f"{assoc.where} released the association before the "
                                     "C-STORE response")
            self._drop(assoc, abort=True)
            raise OutcomeUnknown(f"unexpected {pdu.PDU_NAMES[pdu_type]} from {assoc.where} "
                                 "while waiting for the C-STORE response")

    # -- ending -----------------------------------------------------------------------------

    def _drop(self, assoc: FastAssociation, abort: bool) -> None:
        """Close the socket (after an A-ABORT when asked) and forget the association."""
        assoc.is_established = False
        if abort:
            try:
                assoc.sock.settimeout(1.0)
                assoc.sock.sendall(pdu.encode_abort(0, 0))
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
            assoc.sock.sendall(pdu.encode_release_rq())
            while True:
                pdu_type, _ = _read_pdu(assoc, deadline)
                if pdu_type in (pdu.A_RELEASE_RP, pdu.A_RELEASE_RQ, pdu.A_ABORT):
                    break          # RQ: a release collision (PS3.8 9.2.5), closing is enough
        except _Timeout:
            log.info("%s: no A-RELEASE-RP within %g s; aborting", assoc.where, wait)
            abort = True
        except (OSError, _Closed, pdu.ProtocolError):
            pass               # the peer went away: nothing left to release
        self._drop(assoc, abort=abort)

    def abort(self) -> None:
        if self.assoc is not None:
            self._drop(self.assoc, abort=True)
        self.proposed = set()

