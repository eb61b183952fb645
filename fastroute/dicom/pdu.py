"""DICOM upper layer (PS3.8) and DIMSE command (PS3.7) codec for the data path, without I/O.

Why: pynetdicom's DUL and association reactors poll every millisecond and run every message
through pydicom, which caps a routed C-STORE stream at ~70 small objects/s. This module only
frames PDUs, splits P-DATA-TF into PDVs and encodes/decodes command sets, so the SCU's blocking
socket loop or the SCP's asyncio protocol can move dataset bytes without copying or decoding
them (DIMSE messages built from these pieces are :mod:`fastroute.dicom.dimse`'s).
Association negotiation is rare and intricate, so A-ASSOCIATE-RQ/AC stay pynetdicom's
(``pynetdicom.pdu``): the helpers here only wrap them and turn their errors into ProtocolError.

Everything is bytes in, values out: tests drive it with bytes, and malformed input raises
ProtocolError (never another exception) saying what is wrong and at which offset.
"""
from __future__ import annotations

import logging
import struct
import threading
from collections import deque
from collections.abc import Iterator, Mapping

from pynetdicom.pdu import A_ASSOCIATE_AC as _AssociateAC
from pynetdicom.pdu import A_ASSOCIATE_RQ as _AssociateRQ
from pynetdicom.pdu_primitives import A_ASSOCIATE

# PDU types, PS3.8 Table 9-1.
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = (
    1, 2, 3, 4, 5, 6, 7)
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF",
             5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}

# Command set elements used here (tag = 0x0000eeee).
COMMAND_GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000
MOVE_ORIGINATOR_AE_TITLE = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031
# Not a tag: decode_command's key for non-command elements after the declared group length.
TRAILING_ELEMENTS = 0x10000

# VRs of the command dictionary (PS3.7 Annex E, retired elements included): decode_command
# needs them because the command set is always Implicit VR Little Endian.
COMMAND_VRS: dict[int, str] = {
    0x0000: "UL", 0x0001: "UL", 0x0002: "UI", 0x0003: "UI", 0x0010: "SH", 0x0100: "US",
    0x0110: "US", 0x0120: "US", 0x0200: "AE", 0x0300: "AE", 0x0400: "AE", 0x0600: "AE",
    0x0700: "US", 0x0800: "US", 0x0850: "US", 0x0860: "US", 0x0900: "US", 0x0901: "AT",
    0x0902: "LO", 0x0903: "US", 0x1000: "UI", 0x1001: "UI", 0x1002: "US", 0x1005: "AT",
    0x1008: "US", 0x1020: "US", 0x1021: "US", 0x1022: "US", 0x1023: "US", 0x1030: "AE",
    0x1031: "US", 0x4000: "LT", 0x4010: "LT", 0x5010: "SH", 0x5020: "SH", 0x5110: "LT",
    0x5120: "LT", 0x5130: "CS", 0x5140: "CS", 0x5150: "CS", 0x5160: "CS", 0x5170: "IS",
    0x5180: "CS", 0x5190: "CS", 0x51A0: "CS", 0x51B0: "US",
}
_TEXT_VRS = frozenset({"UI", "AE", "LO", "SH", "LT", "CS", "IS"})
_MULTI_VALUED = frozenset({0x0901, 0x1005, 0x51B0})   # VM 1-n: returned as raw bytes
ERROR_COMMENT_MAX = 64                                # LO

_FIXED_LENGTH = frozenset({A_ASSOCIATE_RJ, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT})
_HEADER = struct.Struct(">BBI")         # PDU type, reserved, length
_PDV_HEADER = struct.Struct(">BBIIBB")  # PDU header + PDV item length, context id, control
_UINT32_BE = struct.Struct(">I")
_ELEMENT = struct.Struct("<HHI")        # implicit VR LE: group, element, length
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


class ProtocolError(Exception):
    """A malformed PDU or command set: the association must be aborted (PS3.8 9.2, AA-8)."""


# --------------------------------------------------------------------------------------------
# PDU framing


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat unsigned-byte view (indexing gives ints, slicing never copies)."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class PduReader:
    """Cut a byte stream into PDUs, whatever the receive boundaries were.

    A PDU that arrived inside one fed chunk is returned as a view into that chunk (no copy);
    one spread over several chunks is joined once. Non-``bytes`` input is copied on feed, so
    a caller may reuse its receive buffer.
    """

    def __init__(self, max_pdu_length: int = 64 * 1024 * 1024) -> None:
        self.max_pdu_length = max_pdu_length
        self._chunks: deque[memoryview] = deque()
        self._size = 0          # bytes buffered
        self._offset = 0        # stream offset of the first buffered byte (for messages)
        self._pending: tuple[int, int] | None = None   # parsed header of the next PDU

    def feed(self, data: bytes | memoryview) -> None:
        if type(data) is not bytes:
            data = bytes(data)
        if data:
            self._chunks.append(memoryview(data))
            self._size += len(data)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as PDUs."""
        return self._size

    def next(self) -> tuple[int, memoryview] | None:
        """The next complete PDU as (type, body without its 6-byte header), or None for now."""
        if self._pending is None:
            if self._size < 6:
                return None
            pdu_type, _, length = _HEADER.unpack(self._take(6))
            if pdu_type not in PDU_NAMES:
                raise ProtocolError(f"unknown PDU type 0x{pdu_type:02X} at stream offset "
                                    f"{self._offset - 6}")
            if pdu_type in _FIXED_LENGTH and length != 4:
                # PS3.8 9.3.4-9.3.8: these bodies are exactly 4 bytes; anything else is an
                # invalid PDU parameter (A-ABORT reason 6), not a reason to read on.
                raise ProtocolError(f"{PDU_NAMES[pdu_type]} at stream offset {self._offset - 6} "
                                    f"has length {length}, not 4")
            if length > self.max_pdu_length:
                raise ProtocolError(
                    f"{PDU_NAMES[pdu_type]} at stream offset {self._offset - 6} is {length} bytes "
                    f"long, more than the {self.max_pdu_length} accepted")
            self._pending = (pdu_type, length)
        pdu_type, length = self._pending
        if self._size < length:
            return None
        self._pending = None
        return pdu_type, self._take(length)

    def _take(self, n: int) -> memoryview:
        """Remove and return the first ``n`` buffered bytes (a view when in one chunk)."""
        if n == 0:                      # a zero-length PDU body (rejected by its decoder)
            return memoryview(b"")
        self._size -= n
        self._offset += n
        first = self._chunks[0] if self._chunks else memoryview(b"")
        if len(first) >= n:
            if len(first) == n:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[n:]
            return first[:n]
        parts = []
        while n:
            chunk = self._chunks[0]
            if len(chunk) <= n:
                parts.append(self._chunks.popleft())
                n -= len(chunk)
            else:
                parts.append(chunk[:n])
                self._chunks[0] = chunk[n:]
                n = 0
        return memoryview(b"".join(parts))


def iter_pdvs(body: bytes | bytearray | memoryview) -> Iterator[tuple[int, bool, bool, memoryview]]:
    """(context id, is command, is last fragment, fragment) of each PDV of a P-DATA-TF body."""
    view = _byte_view(body)
    end = len(view)
    if end == 0:
        raise ProtocolError("P-DATA-TF without any presentation data value item")
    pos = 0
    while pos < end:
        if end - pos < 6:
            raise ProtocolError(f"truncated PDV item header at offset {pos} of a {end}-byte "
                                "P-DATA-TF body")
        (length,) = _UINT32_BE.unpack_from(view, pos)
        if length < 2 or length > end - pos - 4:
            raise ProtocolError(f"PDV item length {length} at offset {pos} does not fit the "
                                f"{end}-byte P-DATA-TF body")
        control = view[pos + 5]
        yield view[pos + 4], bool(control & 1), bool(control & 2), view[pos + 6:pos + 4 + length]
        pos += 4 + length


def p_data_tf(context_id: int, is_command: bool, data: bytes | memoryview,
              max_pdu: int) -> Iterator[tuple[bytes, memoryview]]:
    """P-DATA-TF PDUs carrying ``data`` as fragments, one PDV per PDU, for ``sendmsg``.

    Yields (12 header bytes: PDU header + PDV length + context id + control, payload slice);
    the payload is a view of ``data``, never a copy. ``max_pdu`` is the *peer's* maximum PDU
    length (the PDU length field: PDV header + fragment, PS3.8 D.1), 0 meaning unlimited. Empty
    ``data`` still makes one (empty, last) PDV, so a receiver that was told a dataset follows
    gets its end.
    """
    if not 1 <= context_id <= 255:
        raise ValueError(f"presentation context ID {context_id} is outside 1..255")
    if max_pdu and max_pdu < 7:
        raise ValueError(f"maximum PDU length {max_pdu} cannot carry any data (minimum 7)")
    view = _byte_view(data)
    total = len(view)
    step = total if not max_pdu else max_pdu - 6
    step = max(step, 1)
    base = 1 if is_command else 0
    pos = 0
    while True:
        chunk = view[pos:pos + step]
        pos += len(chunk)
        last = pos >= total
        n = len(chunk)
        yield (_PDV_HEADER.pack(P_DATA_TF, 0, n + 6, n + 2, context_id, base | (2 if last else 0)),
               chunk)
        if last:
            return


# --------------------------------------------------------------------------------------------
# Fixed-size PDUs


def encode_release_rq() -> bytes:
    return b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def encode_release_rp() -> bytes:
    return b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def encode_abort(source: int = 0, reason: int = 0) -> bytes:
    """A-ABORT; source 0 = service user (reason then ignored), 2 = service provider."""
    return bytes((7, 0, 0, 0, 0, 4, 0, 0, source, reason))


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ; result 1 permanent / 2 transient, source and reason per PS3.8 9.3.4."""
    return bytes((3, 0, 0, 0, 0, 4, 0, result, source, reason))


def decode_abort(body: bytes | memoryview) -> tuple[int, int]:
    """(source, reason/diagnostic) of an A-ABORT body."""
    if len(body) < 4:
        raise ProtocolError(f"A-ABORT body is {len(body)} bytes, expected 4")
    return body[2], body[3]


def decode_associate_rj(body: bytes | memoryview) -> tuple[int, int, int]:
    """(result, source, reason/diagnostic) of an A-ASSOCIATE-RJ body."""
    if len(body) < 4:
        raise ProtocolError(f"A-ASSOCIATE-RJ body is {len(body)} bytes, expected 4")
    return body[1], body[2], body[3]


# --------------------------------------------------------------------------------------------
# Association negotiation: pynetdicom's PDU classes, wrapped


class _QuietWhileDecoding(logging.Filter):
    """Drop pynetdicom's own log records while this thread decodes a peer's A-ASSOCIATE PDU.

    pynetdicom logs every undecodable value (a non-ASCII UID, say) with a traceback before
    raising; the raise becomes one ProtocolError line and an A-ABORT here, so its traceback
    would only be a peer's garbage dressed up as our internal error.
    """

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "decoding", False)


_QUIET = _QuietWhileDecoding()
for _name in ("pynetdicom.utils", "pynetdicom.pdu", "pynetdicom.pdu_items", "pynetdicom.pdu_primitives",
              "pynetdicom.presentation"):
    logging.getLogger(_name).addFilter(_QUIET)


def _with_header(pdu_type: int, body: bytes | memoryview) -> bytes:
    return _HEADER.pack(pdu_type, 0, len(body)) + bytes(body)


def decode_associate_rq(body: bytes | memoryview) -> A_ASSOCIATE:
    """The A-ASSOCIATE primitive of an A-ASSOCIATE-RQ body (pynetdicom's decoder)."""
    if len(body) < 68:
        raise ProtocolError(f"A-ASSOCIATE-RQ body is {len(body)} bytes, shorter than its "
                            "68-byte fixed part")
    pdu = _AssociateRQ()
    _QUIET.local.decoding = True
    try:
        pdu.decode(_with_header(A_ASSOCIATE_RQ, body))
        return pdu.to_primitive()
    except Exception as exc:   # pynetdicom raises whatever its item decoders hit
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {exc!r}") from exc
    finally:
        _QUIET.local.decoding = False


def decode_associate_ac(body: bytes | memoryview) -> A_ASSOCIATE:
    """The A-ASSOCIATE primitive of an A-ASSOCIATE-AC body (pynetdicom's decoder).

    Its ``presentation_context_definition_results_list`` holds the results by context ID;
    ``pynetdicom.presentation.negotiate_as_requestor`` pairs them with what was proposed.
    """
    if len(body) < 68:
        raise ProtocolError(f"A-ASSOCIATE-AC body is {len(body)} bytes, shorter than its "
                            "68-byte fixed part")
    pdu = _AssociateAC()
    _QUIET.local.decoding = True
    try:
        pdu.decode(_with_header(A_ASSOCIATE_AC, body))
        return pdu.to_primitive()
    except Exception as exc:
        raise ProtocolError(f"malformed A-ASSOCIATE-AC: {exc!r}") from exc
    finally:
        _QUIET.local.decoding = False


def encode_associate_rq(primitive: A_ASSOCIATE) -> bytes:
    """The whole A-ASSOCIATE-RQ PDU (header included) for a request primitive."""
    return _AssociateRQ(primitive).encode()


def encode_associate_ac(primitive: A_ASSOCIATE) -> bytes:
    """The whole A-ASSOCIATE-AC PDU (header included) for an accept primitive."""
    return _AssociateAC(primitive).encode()


# --------------------------------------------------------------------------------------------
# DIMSE command sets (always Implicit VR Little Endian, PS3.7 6.3.1)


def decode_command(buf: bytes | bytearray | memoryview) -> dict[int, int | str | bytes]:
    """The elements of a command set by tag: UL/US as int, text (UI, AE, LO, ...) stripped of
    NUL/space padding, multi-valued and unknown elements as raw bytes."""
    view = _byte_view(buf)
    end = len(view)
    out: dict[int, int | str | bytes] = {}
    pos = 0
    while pos < end:
        if end - pos < 8:
            raise ProtocolError(f"truncated command element header at offset {pos} of a "
                                f"{end}-byte command set")
        group, elem, length = _ELEMENT.unpack_from(view, pos)
        pos += 8
        declared = out.get(COMMAND_GROUP_LENGTH)
        # the group length element comes first: 12 bytes, then the length it declares
        if group != 0x0000 and isinstance(declared, int) and pos - 8 == 12 + declared:
            # Past the end the group length declared: elements some peers wrongly append to
            # the command set (Orthanc puts a C-GET-RSP's Failed SOP Instance UID List here).
            # Kept as raw implicit VR LE bytes for whoever wants them, not an abort.
            out[TRAILING_ELEMENTS] = bytes(view[pos - 8:])
            break
        if group != 0x0000:
            raise ProtocolError(f"element ({group:04X},{elem:04X}) at offset {pos - 8} is not in "
                                "the command group (0000)")
        if length > end - pos:
            raise ProtocolError(f"command element (0000,{elem:04X}) at offset {pos - 8} has "
                                f"length {length}, past the end of the {end}-byte command set")
        value = view[pos:pos + length]
        pos += length
        vr = COMMAND_VRS.get(elem)
        if vr == "US" and elem not in _MULTI_VALUED:
            if length != 2:
                raise ProtocolError(f"US element (0000,{elem:04X}) has length {length}, not 2")
            out[elem] = _US.unpack(value)[0]
        elif vr == "UL":
            if length != 4:
                raise ProtocolError(f"UL element (0000,{elem:04X}) has length {length}, not 4")
            out[elem] = _UL.unpack(value)[0]
        elif vr in _TEXT_VRS:
            # Default repertoire; latin-1 never fails, so a stray byte cannot break decoding.
            out[elem] = bytes(value).decode("latin-1").strip("\x00 ")
        else:
            out[elem] = bytes(value)
    return out


def _encode_value(elem: int, value: int | str | bytes) -> bytes:
    vr = COMMAND_VRS.get(elem)
    if isinstance(value, bytes):
        raw = value
    elif vr == "US" or vr == "UL":
        if not isinstance(value, int):
            raise TypeError(f"(0000,{elem:04X}) {vr} needs an int, got {value!r}")
        raw = (_US if vr == "US" else _UL).pack(value)
    elif vr == "AT" and isinstance(value, int):
        raw = _US.pack(value >> 16) + _US.pack(value & 0xFFFF)
    elif vr in _TEXT_VRS and isinstance(value, str):
        raw = value.encode("ascii", "replace")
        if len(raw) % 2:
            raw += b"\x00" if vr == "UI" else b" "
    else:
        raise TypeError(f"cannot encode {value!r} as (0000,{elem:04X}) {vr or 'unknown VR'}")
    if len(raw) % 2:
        raise ValueError(f"(0000,{elem:04X}) value has odd length {len(raw)}")
    return raw


def encode_command(elements: Mapping[int, int | str | bytes]) -> bytes:
    """An Implicit VR LE command set with its (0000,0000) group length computed here (any
    given value is ignored); UIDs padded with NUL, other text with a space, to even length."""
    parts = []
    for elem in sorted(elements):
        if elem == COMMAND_GROUP_LENGTH:
            continue
        if not 0 <= elem <= 0xFFFF:
            raise ValueError(f"tag 0x{elem:08X} is not in the command group (0000)")
        raw = _encode_value(elem, elements[elem])
        parts.append(_ELEMENT.pack(0, elem, len(raw)))
        parts.append(raw)
    body = b"".join(parts)
    return _ELEMENT.pack(0, COMMAND_GROUP_LENGTH, 4) + _UL.pack(len(body)) + body
