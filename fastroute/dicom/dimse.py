"""DIMSE messages (PS3.7): command fields, a typed message, its assembly from PDVs, responses.

Both roles use this: the SCP assembles requests, the SCU assembles responses *and* the requests
a peer may send on the SCU's own association (C-GET's C-STORE sub-operations, storage
commitment's N-EVENT-REPORT). A service is a :data:`Handler`: it gets the association's
:class:`Peer` and the request :class:`Message`, and answers with a :class:`Reply` (or a
:class:`Pending` one, for work done on another thread such as a group commit).

The dataset of a message arrives as one ``bytearray`` built from its fragments as they come
(one copy out of the receive buffer, none after), so C-STORE stays the zero-copy hot path.
A dataset that grows past a :class:`Stager`'s threshold is handed to a :class:`DatasetSink`
instead (the spool's staging, issue 11 item 3), so an association holds at most the
threshold in memory whatever the object's size.
"""
from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from fastroute.dicom import pdu

if TYPE_CHECKING:
    from fastroute.dicom.tls import CertificateFacts
from fastroute.dicom.acse import VERIFICATION_SOP_CLASS
from fastroute.dicom.attrs import MAX_OBJECT_BYTES   # one dataset larger than this is aborted
from fastroute.dicom.pdu import (AFFECTED_SOP_CLASS_UID, AFFECTED_SOP_INSTANCE_UID, COMMAND_DATA_SET_TYPE,
                                 COMMAND_FIELD, ERROR_COMMENT, ERROR_COMMENT_MAX, MESSAGE_ID,
                                 MESSAGE_ID_BEING_RESPONDED_TO, MOVE_ORIGINATOR_AE_TITLE,
                                 MOVE_ORIGINATOR_MESSAGE_ID, PRIORITY, STATUS)

REQUESTED_SOP_CLASS_UID = 0x0003   # PS3.7 E.1-1 (was 0x1003, no such element)
REQUESTED_SOP_INSTANCE_UID = 0x1001
NO_DATASET = 0x0101       # CommandDataSetType: anything else means a dataset follows
DATASET_PRESENT = 0x0001  # what pynetdicom sends (DCMTK sends 0x0102): any value but 0x0101
MAX_COMMAND_BYTES = 64 * 1024         # command sets are a few hundred bytes


class CommandField(enum.IntEnum):
    """(0000,0100) Command Field, PS3.7 E.1-1: a response is its request | 0x8000."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RQ = 0x0110
    N_GET_RSP = 0x8110
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140
    N_DELETE_RQ = 0x0150
    N_DELETE_RSP = 0x8150
    C_CANCEL_RQ = 0x0FFF


def command_name(field: int) -> str:
    """``C-STORE-RQ`` for 0x0001; ``command 0x1234`` for a code the standard does not define."""
    try:
        return CommandField(field).name.replace("_", "-")
    except ValueError:
        return f"command 0x{field:04X}"


class MessageTooLarge(pdu.ProtocolError):
    """A message's dataset grew past the per-object cap while arriving: the association is
    aborted (unlike ``errors.ObjectTooLarge``, a stored dataset too large to inflate)."""


class DatasetSink(Protocol):
    """Where a large dataset's fragments go as they arrive (not memory). The handler that
    gets the message owns it; one never handed over is discarded (association aborted)."""

    def write(self, fragment: memoryview) -> None: ...

    def discard(self) -> None: ...

    def __len__(self) -> int: ...


class Stager(Protocol):
    """Opens a :class:`DatasetSink` for a dataset that grew past ``threshold`` bytes."""

    threshold: int

    def open(self, head: bytearray, sop_instance_uid: str) -> DatasetSink: ...


@dataclass(slots=True)
class Message:
    """One DIMSE message: its presentation context, decoded command set and dataset bytes
    (a :class:`DatasetSink` for a dataset that was streamed out of memory)."""

    context_id: int
    command: dict[int, Any]
    data: bytearray | DatasetSink | None = None

    @property
    def field(self) -> int:
        return int(self.command.get(COMMAND_FIELD, 0))

    @property
    def is_request(self) -> bool:
        return not self.field & 0x8000

    @property
    def message_id(self) -> int:
        return int(self.command.get(MESSAGE_ID, 0))

    @property
    def responds_to(self) -> int:
        return int(self.command.get(MESSAGE_ID_BEING_RESPONDED_TO, -1))

    @property
    def sop_class_uid(self) -> str:
        return str(self.command.get(AFFECTED_SOP_CLASS_UID)
                   or self.command.get(REQUESTED_SOP_CLASS_UID) or "")

    @property
    def sop_instance_uid(self) -> str:
        return str(self.command.get(AFFECTED_SOP_INSTANCE_UID)
                   or self.command.get(REQUESTED_SOP_INSTANCE_UID) or "")

    @property
    def status(self) -> int | None:
        value = self.command.get(STATUS)
        return value if isinstance(value, int) else None

    @property
    def error_comment(self) -> str:
        value = self.command.get(ERROR_COMMENT, "")
        return value if isinstance(value, str) else ""


@dataclass(slots=True)
class Peer:
    """The association a request arrived on, as a handler sees it."""

    calling_ae: str
    called_ae: str
    ip: str                           # the peer's address (for the SCU: the destination host)
    contexts: dict[int, str]          # accepted presentation context ID -> transfer syntax
    # the client certificate of a TLS association (subject, fingerprint), for access and audit
    certificate: CertificateFacts | None = None


@dataclass(slots=True)
class Reply:
    """A handler's answer: the response status, an error comment, optional response elements
    (e.g. Number of Remaining Sub-operations) and an optional response dataset."""

    status: int
    comment: str = ""
    elements: dict[int, int | str | bytes] | None = None
    dataset: bytes | None = None


@dataclass(slots=True)
class Pending:
    """A reply that another thread finishes: ``finish(future)`` runs on the association's own
    thread once ``future`` is done and gives the :class:`Reply` to send. Requests behind it on
    the same association wait (the peer gets its responses in order)."""

    future: Future[Any]
    finish: Callable[[Future[Any]], Reply]


Handler = Callable[[Peer, Message], "Reply | Pending"]


class Assembler:
    """PDVs in, :class:`Message` s out: command fragments joined, dataset fragments appended.

    Limits: a command set of at most ``max_command`` bytes, a dataset of at most ``max_object``
    (MessageTooLarge), one message at a time (PS3.8 9.3.5: fragments of two messages do not
    interleave). ``contexts`` are the accepted presentation context IDs.
    """

    __slots__ = ("contexts", "max_object", "max_command", "stager", "_cmd", "_ctx", "_command", "_data",
                 "_sink")

    def __init__(self, *, max_object: int = MAX_OBJECT_BYTES,
                 max_command: int = MAX_COMMAND_BYTES) -> None:
        self.contexts: Mapping[int, str] = {}
        self.max_object = max_object
        self.max_command = max_command
        self.stager: Stager | None = None    # set by a receiver that streams large datasets
        self._cmd = bytearray()
        self._ctx: int | None = None
        self._command: dict[int, Any] | None = None     # decoded, waiting for its dataset
        self._data: bytearray | None = None
        self._sink: DatasetSink | None = None

    def in_message(self) -> bool:
        """True while part of a message has arrived (a stalled peer mid-object)."""
        return self._ctx is not None

    def discard(self) -> None:
        """Drop a message that will never complete (the association ended): a streamed
        dataset's staging is removed now, not at the next start."""
        sink, self._sink, self._data = self._sink, None, None
        if sink is not None:
            sink.discard()

    def feed(self, body: memoryview, out: deque[Any]) -> None:
        """Append to ``out`` every message a P-DATA-TF body completes; ProtocolError if bad."""
        for ctx, is_command, is_last, fragment in pdu.iter_pdvs(body):
            if ctx not in self.contexts:
                raise pdu.ProtocolError(f"PDV on presentation context {ctx}, which was not accepted")
            if self._ctx is not None and ctx != self._ctx:
                raise pdu.ProtocolError(
                    f"PDV on context {ctx} in the middle of a message on context {self._ctx}")
            if is_command:
                if self._command is not None:
                    raise pdu.ProtocolError("command fragment where a dataset fragment was expected")
                self._ctx = ctx
                if is_last and not self._cmd:
                    command = pdu.decode_command(fragment)   # the usual case: one fragment, no copy
                else:
                    self._cmd += fragment
                    if len(self._cmd) > self.max_command:
                        raise pdu.ProtocolError(f"command set longer than {self.max_command} bytes")
                    if not is_last:
                        continue
                    command = pdu.decode_command(memoryview(self._cmd))
                    self._cmd = bytearray()
                if command.get(COMMAND_DATA_SET_TYPE, NO_DATASET) != NO_DATASET:
                    self._command = command          # the dataset follows
                    continue
                self._ctx = None
                if command.get(COMMAND_FIELD) == CommandField.C_STORE_RQ:
                    raise pdu.ProtocolError("C-STORE-RQ without a dataset")
                out.append(Message(ctx, command))
            else:
                if self._command is None:
                    raise pdu.ProtocolError("dataset fragment without a command")
                data: bytearray | DatasetSink
                if self._sink is not None:
                    self._sink.write(fragment)
                    data = self._sink
                elif self._data is None:
                    data = self._data = bytearray(fragment)
                else:
                    self._data += fragment
                    data = self._data
                    stager = self.stager
                    if stager is not None and len(data) > stager.threshold and not is_last:
                        # Out of memory from here on: the association holds one threshold.
                        data = self._sink = stager.open(
                            self._data, str(self._command.get(AFFECTED_SOP_INSTANCE_UID) or ""))
                        self._data = None
                if len(data) > self.max_object:
                    self.discard()
                    raise MessageTooLarge(f"dataset larger than {self.max_object} bytes")
                if is_last:
                    out.append(Message(ctx, self._command, data))
                    self._command = self._data = self._sink = None
                    self._ctx = None


def message_buffers(context_id: int, command: bytes,
                    dataset: bytes | memoryview | Sequence[memoryview] | None,
                    max_pdu: int) -> Iterator[bytes | memoryview]:
    """One message as P-DATA-TF PDUs, in buffers for ``writelines`` / ``sendmsg``: 12-byte
    headers and payload views of ``command`` and ``dataset`` (never copies). ``max_pdu`` is
    the peer's maximum PDU length, 0 for unlimited. A dataset given as a list of parts (a
    chunked spool object's pages) is sent as one: a PDV may span two parts."""
    for header, fragment in pdu.p_data_tf(context_id, True, command, max_pdu):
        yield header
        if fragment:
            yield fragment
    if dataset is None:
        return
    if isinstance(dataset, (bytes, bytearray, memoryview)):
        for header, fragment in pdu.p_data_tf(context_id, False, dataset, max_pdu):
            yield header
            if fragment:
                yield fragment
        return
    yield from _parts_buffers(context_id, dataset, max_pdu)


def _parts_buffers(context_id: int, parts: Sequence[memoryview], max_pdu: int) -> Iterator[bytes | memoryview]:
    """P-DATA-TF PDUs of a dataset held in several buffers, one PDV per PDU as ``p_data_tf``
    makes them; the payloads are views of the parts (a PDV may span two)."""
    total = sum(len(p) for p in parts)
    step = max(1, total if not max_pdu else max_pdu - 6)
    index, offset, sent = 0, 0, 0
    while True:
        n = min(step, total - sent)
        sent += n
        last = sent >= total
        yield _PDV.pack(pdu.P_DATA_TF, 0, n + 6, n + 2, context_id, 2 if last else 0)
        while n:
            part = parts[index]
            take = min(n, len(part) - offset)
            if take:
                yield part[offset:offset + take]
            n -= take
            offset += take
            if offset == len(part):
                index, offset = index + 1, 0
        if last:
            return


_PDV = struct.Struct(">BBIIBB")   # PDU type, reserved, PDU length, PDV length, context, control


# -- command sets -------------------------------------------------------------------------------

def has_dataset(command: Mapping[int, int | str | bytes]) -> bool:
    """Whether a dataset follows this command (CommandDataSetType other than 0x0101)."""
    return command.get(COMMAND_DATA_SET_TYPE, NO_DATASET) != NO_DATASET


def encode_response(request: Mapping[int, Any], status: int, comment: str = "",
                    elements: Mapping[int, int | str | bytes] | None = None,
                    with_dataset: bool = False) -> bytes:
    """The response command set to any request: its field | 0x8000, the message ID it answers,
    the SOP class and instance it named (affected, or requested as in N-ACTION), ``status``
    and, when given, an Error Comment cut to LO's 64 characters."""
    get = request.get              # per C-STORE: kept to plain dict lookups
    rsp: dict[int, int | str | bytes] = {
        COMMAND_FIELD: (int(get(COMMAND_FIELD, 0)) | 0x8000) & 0xFFFF,
        MESSAGE_ID_BEING_RESPONDED_TO: get(MESSAGE_ID, 0),
        COMMAND_DATA_SET_TYPE: DATASET_PRESENT if with_dataset else NO_DATASET, STATUS: status}
    sop_class = get(AFFECTED_SOP_CLASS_UID) or get(REQUESTED_SOP_CLASS_UID)
    if sop_class:
        rsp[AFFECTED_SOP_CLASS_UID] = sop_class
    sop_instance = get(AFFECTED_SOP_INSTANCE_UID) or get(REQUESTED_SOP_INSTANCE_UID)
    if sop_instance:
        rsp[AFFECTED_SOP_INSTANCE_UID] = sop_instance
    if comment:
        rsp[ERROR_COMMENT] = comment[:ERROR_COMMENT_MAX]
    if elements:
        rsp.update(elements)
    return pdu.encode_command(rsp)


def encode_c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str,
                      priority: int = 2, move_originator_ae: str | None = None,
                      move_originator_id: int | None = None) -> bytes:
    """C-STORE-RQ command set (PS3.7 9.3.1.1); priority 0 medium, 1 high, 2 low."""
    elements: dict[int, int | str | bytes] = {
        AFFECTED_SOP_CLASS_UID: sop_class_uid, COMMAND_FIELD: CommandField.C_STORE_RQ,
        MESSAGE_ID: message_id, PRIORITY: priority, COMMAND_DATA_SET_TYPE: DATASET_PRESENT,
        AFFECTED_SOP_INSTANCE_UID: sop_instance_uid}
    if move_originator_ae is not None:
        elements[MOVE_ORIGINATOR_AE_TITLE] = move_originator_ae
    if move_originator_id is not None:
        elements[MOVE_ORIGINATOR_MESSAGE_ID] = move_originator_id
    return pdu.encode_command(elements)


def encode_c_store_rsp(message_id_responded: int, sop_class_uid: str, sop_instance_uid: str,
                       status: int, error_comment: str | None = None) -> bytes:
    """C-STORE-RSP command set (PS3.7 9.3.1.2); the error comment is cut to LO's 64 chars."""
    return encode_response({COMMAND_FIELD: CommandField.C_STORE_RQ, MESSAGE_ID: message_id_responded,
                            AFFECTED_SOP_CLASS_UID: sop_class_uid,
                            AFFECTED_SOP_INSTANCE_UID: sop_instance_uid},
                           status, error_comment or "")


def encode_c_echo_rq(message_id: int) -> bytes:
    """C-ECHO-RQ command set (PS3.7 9.3.5.1)."""
    return pdu.encode_command({AFFECTED_SOP_CLASS_UID: VERIFICATION_SOP_CLASS,
                               COMMAND_FIELD: CommandField.C_ECHO_RQ, MESSAGE_ID: message_id,
                               COMMAND_DATA_SET_TYPE: NO_DATASET})


def encode_c_echo_rsp(message_id_responded: int, status: int = 0) -> bytes:
    """C-ECHO-RSP command set (PS3.7 9.3.5.2)."""
    return encode_response({COMMAND_FIELD: CommandField.C_ECHO_RQ, MESSAGE_ID: message_id_responded,
                            AFFECTED_SOP_CLASS_UID: VERIFICATION_SOP_CLASS}, status)


# -- Query/Retrieve (PS3.7 9.1.2-9.1.4, 9.3.2-9.3.4): identifiers are small, pydicom encodes them

MOVE_DESTINATION = 0x0600
NUMBER_OF_REMAINING_SUB_OPERATIONS = 0x1020
NUMBER_OF_COMPLETED_SUB_OPERATIONS = 0x1021
NUMBER_OF_FAILED_SUB_OPERATIONS = 0x1022
NUMBER_OF_WARNING_SUB_OPERATIONS = 0x1023
PRIORITY_MEDIUM = 0x0000


def _qr_rq(field: CommandField, message_id: int, sop_class_uid: str,
           priority: int, extra: Mapping[int, int | str | bytes] | None = None) -> bytes:
    elements: dict[int, int | str | bytes] = {
        AFFECTED_SOP_CLASS_UID: sop_class_uid, COMMAND_FIELD: field, MESSAGE_ID: message_id,
        PRIORITY: priority, COMMAND_DATA_SET_TYPE: DATASET_PRESENT}
    elements.update(extra or {})
    return pdu.encode_command(elements)


def encode_c_find_rq(message_id: int, sop_class_uid: str, priority: int = PRIORITY_MEDIUM) -> bytes:
    """C-FIND-RQ command set (PS3.7 9.3.2.1); the identifier follows as the dataset."""
    return _qr_rq(CommandField.C_FIND_RQ, message_id, sop_class_uid, priority)


def encode_c_move_rq(message_id: int, sop_class_uid: str, move_destination: str,
                     priority: int = PRIORITY_MEDIUM) -> bytes:
    """C-MOVE-RQ command set (PS3.7 9.3.4.1): the source sends to ``move_destination`` (an AE
    title it must know, with host and port, or it answers 0xA801)."""
    return _qr_rq(CommandField.C_MOVE_RQ, message_id, sop_class_uid, priority,
                  {MOVE_DESTINATION: move_destination})


def encode_c_get_rq(message_id: int, sop_class_uid: str, priority: int = PRIORITY_MEDIUM) -> bytes:
    """C-GET-RQ command set (PS3.7 9.3.3.1): the C-STOREs come back on this association."""
    return _qr_rq(CommandField.C_GET_RQ, message_id, sop_class_uid, priority)


def encode_c_cancel_rq(message_id_being_responded_to: int) -> bytes:
    """C-CANCEL-RQ command set (PS3.7 9.3.2.3): no response of its own; the cancelled
    operation ends with its final response (0xFE00 Cancel, usually)."""
    return pdu.encode_command({COMMAND_FIELD: CommandField.C_CANCEL_RQ,
                               MESSAGE_ID_BEING_RESPONDED_TO: message_id_being_responded_to,
                               COMMAND_DATA_SET_TYPE: NO_DATASET})


def _syntax_flags(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of an uncompressed transfer syntax: identifiers
    travel in the context's syntax, which for Q/R is one of these (ValueError otherwise)."""
    flags = {"1.2.840.10008.1.2": (True, True, False), "1.2.840.10008.1.2.1": (False, True, False),
             "1.2.840.10008.1.2.2": (False, False, False),
             "1.2.840.10008.1.2.1.99": (False, True, True)}
    try:
        return flags[transfer_syntax]
    except KeyError:
        raise ValueError(f"transfer syntax {transfer_syntax} cannot carry an identifier") from None


def encode_identifier(dataset: Any, transfer_syntax: str) -> bytes:
    """A C-FIND/C-MOVE/C-GET identifier (a pydicom Dataset) in the context's transfer syntax."""
    from pynetdicom.dsutils import encode

    implicit, little, deflated = _syntax_flags(transfer_syntax)
    data = encode(dataset, implicit, little, deflated)
    if data is None:
        raise ValueError("the identifier could not be encoded")
    return data


def decode_identifier(data: bytes | bytearray | memoryview, transfer_syntax: str) -> Any:
    """A response identifier (C-FIND match, C-MOVE/C-GET failed-instance list) as a pydicom
    Dataset; pydicom decodes lazily, so a malformed element raises only when read."""
    from io import BytesIO

    from pynetdicom.dsutils import decode

    implicit, little, deflated = _syntax_flags(transfer_syntax)
    return decode(BytesIO(bytes(data)), implicit, little, deflated)
