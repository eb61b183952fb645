"""Tag peek: read only the attributes routing needs straight from encoded dataset bytes.

Pure-Python twin of ``ext/_peek.pyx``; :mod:`fastroute.native` picks one and the tests hold
them equal (results *and* error messages). Neither decodes the dataset: elements are walked
by their headers, values are sliced out only for the requested tags, and the walk stops as
soon as the largest requested tag has been read or a larger one is reached, so Pixel Data is
never touched unless asked for.

Tolerances follow pydicom's reader where real-world writers need them: a leading run of
group 0002 elements is read as Explicit VR Little Endian whatever the dataset's encoding; in
explicit VR an element whose VR bytes are not two capitals is read as implicit (some writers
switch inside sequences), and so is a whole undefined-length item whose first element looks
implicit; the contents of a UN element of undefined length are Implicit VR Little Endian
(PS3.5 6.2.2). Undefined-length values are skipped by walking items and delimiters, never by
searching for delimiter bytes, so fragment data cannot fool the walk.

Every read is bounds-checked: truncated or malformed input raises
:class:`~fastroute.errors.PeekError` naming the byte offset. Each step consumes at least
eight bytes, so the walk always terminates; nesting is capped at :data:`MAX_DEPTH`.

:func:`validate` is the strict sibling: it walks *every* element header to the end of the
dataset, into sequences and items of defined length too, so a receiver can refuse an object
a destination would choke on (issue 11) before acknowledging it.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable

from fastroute.errors import PeekError

__all__ = ["MAX_DEPTH", "peek", "peek_prefix", "validate"]

#: Sequences nested deeper than this raise PeekError (real data rarely exceeds 5).
MAX_DEPTH = 64

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
# Explicit VRs with 2 reserved bytes and a 4-byte length (PS3.5 table 7.1-1).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())

_TAG = (struct.Struct(">HH"), struct.Struct("<HH"))  # indexed by little_endian
_IMPLICIT = (struct.Struct(">HHI"), struct.Struct("<HHI"))
_EXPLICIT = (struct.Struct(">2sH"), struct.Struct("<2sH"))  # VR, 2-byte length
_LEN32 = (struct.Struct(">I"), struct.Struct("<I"))

Found = dict[int, tuple[str, bytes]]


class _Truncated(Exception):
    """The buffer ended inside an element: a peek fails, a prefix peek asks for more."""


def peek(buf: bytes | bytearray | memoryview, tags: Iterable[int], implicit_vr: bool,
         little_endian: bool) -> Found:
    """Return ``{tag: (vr, value_bytes)}`` for the requested top-level tags present in `buf`.

    `buf` is an encoded dataset (what a C-STORE carries, or a file's bytes after the file
    meta; a leading group 0002 is also accepted). `tags` is a sorted tuple of
    ``group << 16 | element`` ints. `vr` is the VR from the stream, ``''`` for implicit VR.
    A buffer that ends cleanly between elements yields what it holds; one that ends inside
    an element, or is malformed where the walk had to read it, raises PeekError.
    """
    found: Found = {}
    try:
        _scan(buf, tags, implicit_vr, little_endian, found)
    except _Truncated as exc:
        raise PeekError(str(exc)) from None
    return found


def peek_prefix(buf: bytes | bytearray | memoryview, tags: Iterable[int], implicit_vr: bool,
                little_endian: bool) -> tuple[Found, bool]:
    """Peek a buffer that may hold only the start of a dataset (streamed or being inflated).

    Returns ``(found, complete)``: `complete` is True when the answer is final (the largest
    requested tag was read or a larger tag reached) and False when the buffer ended first,
    so more bytes may add tags; then call again with a longer prefix, or :func:`peek` once
    the data is all there. Only malformed input raises PeekError.
    """
    found: Found = {}
    try:
        return found, _scan(buf, tags, implicit_vr, little_endian, found)
    except _Truncated:
        return found, False


def _wanted(tags: Iterable[int]) -> frozenset[int]:
    wanted = frozenset(tags)
    for tag in wanted:
        if not isinstance(tag, int) or not 0 <= tag <= 0xFFFFFFFF:
            raise ValueError(f"tag {tag!r} is not a 32-bit DICOM tag (group << 16 | element)")
    return wanted


def _scan(buf: bytes | bytearray | memoryview, tags: Iterable[int], implicit_vr: bool,
          little_endian: bool, found: Found) -> bool:
    """Walk the top level into `found`; True if stopped by the tag limit, False at the end."""
    wanted = _wanted(tags)
    if not wanted:
        return True
    last = max(wanted)
    data = buf if isinstance(buf, (bytes, bytearray)) else memoryview(buf).cast("B")
    n = len(data)
    pos = 0
    # A leading run of group 0002 (file meta) is always Explicit VR Little Endian.
    meta = n >= 2 and data[0] == 2 and data[1] == 0
    imp, le = (False, True) if meta else (implicit_vr, little_endian)
    while pos < n:
        if meta and not (n - pos >= 2 and data[pos] == 2 and data[pos + 1] == 0):
            meta = False
            imp, le = implicit_vr, little_endian
        if n - pos < 4:
            raise _Truncated(_trunc_header(pos, 4, n - pos))
        group, elem = _TAG[le].unpack_from(data, pos)
        tag = group << 16 | elem
        if tag > last:
            return True
        vr, length, vpos = _header(data, pos, n, group, imp, le)
        if length == _UNDEFINED:
            vend, pos = _skip_undefined(data, vpos, n, vr == "UN", imp, le)
        else:
            if length > n - vpos:
                raise _Truncated(_trunc_value(tag, vpos, length, n - vpos))
            vend = pos = vpos + length
        if tag in wanted:
            found[tag] = (vr, bytes(data[vpos:vend]))
            if tag == last:
                return True
    return False


def _header(data: bytes | bytearray | memoryview, pos: int, n: int, group: int, imp: bool,
            le: bool) -> tuple[str, int, int]:
    """Decode the element header at `pos` (tag known): ``(vr, length, value_offset)``."""
    if not imp and group != 0xFFFE:
        if n - pos < 8:
            raise _Truncated(_trunc_header(pos, 8, n - pos))
        vr_b, length = _EXPLICIT[le].unpack_from(data, pos + 4)
        a, b = vr_b[0], vr_b[1]
        if 0x40 < a < 0x5B and 0x40 < b < 0x5B:
            if vr_b not in _LONG_VRS:
                return vr_b.decode("ascii"), length, pos + 8
            if n - pos < 12:
                raise _Truncated(_trunc_header(pos, 12, n - pos))
            return vr_b.decode("ascii"), _LEN32[le].unpack_from(data, pos + 8)[0], pos + 12
        # Not a VR: this element is implicit (fall through).
    if n - pos < 8:
        raise _Truncated(_trunc_header(pos, 8, n - pos))
    return "", _LEN32[le].unpack_from(data, pos + 4)[0], pos + 8


def _skip_undefined(data: bytes | bytearray | memoryview, pos: int, n: int, un: bool,
                    imp: bool, le: bool) -> tuple[int, int]:
    """Walk an undefined-length value starting at `pos`: ``(value_end, next_offset)``.

    Iterative (an explicit stack, not recursion) so hostile nesting cannot exhaust the
    interpreter stack. Each entry is (in_item, implicit, little_endian).
    """
    stack = [(False, True, True) if un else (False, imp, le)]
    depth = 1
    while True:
        in_item, imp, le = stack[-1]
        need = 4 if in_item else 8  # an item's element header is finished by _header
        if n - pos < need:
            raise _Truncated(_trunc_header(pos, need, n - pos))
        group, elem = _TAG[le].unpack_from(data, pos)
        tag = group << 16 | elem
        if not in_item:
            length = _LEN32[le].unpack_from(data, pos + 4)[0]
            if tag == _SEQ_DELIM:
                stack.pop()
                depth -= 1
                if not stack:
                    return pos, pos + 8
                pos += 8
            elif tag != _ITEM:
                raise PeekError(_bad_item(tag, pos))
            elif length == _UNDEFINED:
                pos += 8
                stack.append((True, imp or _looks_implicit(data, pos, n, le), le))
            else:
                pos += 8
                if length > n - pos:
                    raise _Truncated(_trunc_value(tag, pos, length, n - pos))
                pos += length
        elif group == 0xFFFE:
            if tag != _ITEM_DELIM:
                raise PeekError(_unexpected(tag, pos))
            if n - pos < 8:
                raise _Truncated(_trunc_header(pos, 8, n - pos))
            stack.pop()
            pos += 8
        else:
            vr, length, vpos = _header(data, pos, n, group, imp, le)
            if length == _UNDEFINED:
                if depth >= MAX_DEPTH:
                    raise PeekError(_too_deep(pos))
                depth += 1
                stack.append((False, True, True) if vr == "UN" else (False, imp, le))
                pos = vpos
            else:
                if length > n - vpos:
                    raise _Truncated(_trunc_value(tag, vpos, length, n - vpos))
                pos = vpos + length


# validate(): the kinds of level on its stack (the top level is a dataset, 0).
_SEQ, _ITEM_LEVEL, _FRAGMENTS = 1, 2, 3
# Explicit VRs pydicom unpacks as fixed-size numbers: any other length makes pydicom raise
# (BytesLengthException) when the value is read, so a destination using it would fail too.
# OW/OF/OD/OL/OV and AT are not here: pydicom hands those back without such a check.
_NUMBER_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "SV": 8, "UV": 8}
# Explicit VRs that may have an undefined length (PS3.5 7.1.1, 7.5, A.4).
_UNDEFINED_OK = frozenset({"SQ", "UN", "OB", "OW"})
# Of undefined length, this holds fragments (PS3.5 A.4) whatever the VR says.
_PIXEL_DATA = 0x7FE00010


def _binary_group(group: int) -> bool:
    """Pixel, overlay, curve and waveform groups: implicit VR values here are never items,
    even when their first bytes happen to spell an item tag."""
    return group == 0x7FE0 or group == 0x5400 or group >> 8 == 0x50 or group >> 8 == 0x60


def validate(buf: bytes | bytearray | memoryview, implicit_vr: bool, little_endian: bool) -> None:
    """Walk every element header of the dataset in `buf` to its end; PeekError if malformed.

    Nothing is decoded. Sequences and items are entered whatever their length (explicit VR
    SQ; in implicit VR a defined-length value that starts with an item tag), encapsulated
    fragments are walked as items but not entered. Beyond what :func:`peek` rejects where it
    reads, this rejects: a value or item running past its enclosing sequence or item, an
    undefined length on a VR that cannot have one, a number VR whose length is not a whole
    number of values, a delimiter outside a sequence, a sequence or item that is not
    terminated, and anything left over at the end that is shorter than an element header.
    The same tolerances as the peek apply (file meta, implicit items, UN sequences).
    """
    data = buf if isinstance(buf, (bytes, bytearray)) else memoryview(buf).cast("B")
    try:
        _validate(data, implicit_vr, little_endian)
    except _Truncated as exc:
        raise PeekError(str(exc)) from None


def _validate(data: bytes | bytearray | memoryview, implicit_vr: bool,
              little_endian: bool) -> None:
    n = len(data)
    meta = n >= 2 and data[0] == 2 and data[1] == 0
    imp, le = (False, True) if meta else (implicit_vr, little_endian)
    # (kind, implicit, little_endian, end, undefined length, opening tag, opening offset)
    stack = [(0, imp, le, n, False, 0, 0)]
    depth = 0  # open sequences (and encapsulated values), as in the peek
    pos = 0
    while True:
        kind, imp, le, end, undefined, otag, opos = stack[-1]
        if (kind == 0 and meta
                and not (n - pos >= 2 and data[pos] == 2 and data[pos + 1] == 0)):
            meta = False
            imp, le = implicit_vr, little_endian
            stack[0] = (0, imp, le, n, False, 0, 0)
        if pos == end:
            if kind == 0:
                return
            if undefined:
                raise PeekError(_unterminated(kind == _ITEM_LEVEL, otag, opos, end))
            stack.pop()
            if kind != _ITEM_LEVEL:
                depth -= 1
            continue
        left = end - pos
        if kind == _SEQ or kind == _FRAGMENTS:
            if left < 8:
                raise PeekError(_trunc_header(pos, 8, left))
            group, elem, length = _IMPLICIT[le].unpack_from(data, pos)
            tag = group << 16 | elem
            if tag == _SEQ_DELIM and undefined:
                stack.pop()
                depth -= 1
                pos += 8
            elif tag != _ITEM:
                raise PeekError(_bad_item(tag, pos))
            elif length == _UNDEFINED:
                if kind == _FRAGMENTS:
                    raise PeekError(_bad_fragment(otag, pos))
                stack.append((_ITEM_LEVEL, imp or _looks_implicit(data, pos + 8, end, le), le,
                              end, True, tag, pos))
                pos += 8
            else:
                if length > left - 8:
                    raise PeekError(_trunc_value(tag, pos + 8, length, left - 8))
                if kind == _SEQ and length:
                    stack.append((_ITEM_LEVEL,
                                  imp or _looks_implicit(data, pos + 8, pos + 8 + length, le),
                                  le, pos + 8 + length, False, tag, pos))
                    pos += 8
                else:
                    pos += 8 + length
            continue
        # A dataset: the top level or an item's.
        if left < 4:
            raise PeekError(_trunc_header(pos, 4, left))
        group, elem = _TAG[le].unpack_from(data, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:
            if kind == _ITEM_LEVEL and undefined and tag == _ITEM_DELIM:
                if left < 8:
                    raise PeekError(_trunc_header(pos, 8, left))
                stack.pop()
                pos += 8
                continue
            raise PeekError(_unexpected(tag, pos) if kind else _stray(tag, pos))
        vr, length, vpos = _header(data, pos, end, group, imp, le)
        if length == _UNDEFINED:
            if vr and vr not in _UNDEFINED_OK:
                raise PeekError(_bad_undefined(tag, vr, pos))
            if depth >= MAX_DEPTH:
                raise PeekError(_too_deep(pos))
            depth += 1
            if tag == _PIXEL_DATA or vr == "OB" or vr == "OW":
                stack.append((_FRAGMENTS, imp, le, end, True, tag, pos))
            elif vr == "UN":
                stack.append((_SEQ, True, True, end, True, tag, pos))
            else:
                stack.append((_SEQ, imp, le, end, True, tag, pos))
            pos = vpos
            continue
        if length > end - vpos:
            raise PeekError(_trunc_value(tag, vpos, length, end - vpos))
        size = _NUMBER_SIZES.get(vr, 0)
        if size and length % size:
            raise PeekError(_bad_length(tag, vr, pos, length, size))
        if vr == "SQ" or (not vr and length >= 8 and not _binary_group(group)
                          and _TAG[le].unpack_from(data, vpos) == (0xFFFE, 0xE000)):
            if depth >= MAX_DEPTH:
                raise PeekError(_too_deep(pos))
            depth += 1
            stack.append((_SEQ, imp, le, vpos + length, False, tag, pos))
            pos = vpos
        else:
            pos = vpos + length


def _looks_implicit(data: bytes | bytearray | memoryview, pos: int, n: int, le: bool) -> bool:
    """pydicom's test for an item written implicit inside an explicit dataset."""
    if n - pos < 6 or _TAG[le].unpack_from(data, pos)[0] == 0xFFFE:
        return False
    a, b = data[pos + 4], data[pos + 5]
    return not (0x40 < a < 0x5B and 0x40 < b < 0x5B)


# Messages are built identically in ext/_peek.pyx; the tests compare them.
def _trunc_header(pos: int, need: int, left: int) -> str:
    return f"truncated data element header at offset {pos}: need {need} bytes, {left} left"


def _trunc_value(tag: int, pos: int, length: int, left: int) -> str:
    return (f"truncated value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset {pos}: "
            f"length {length} but only {left} bytes left")


def _bad_item(tag: int, pos: int) -> str:
    return (f"expected an item or sequence delimiter at offset {pos}, "
            f"found ({tag >> 16:04X},{tag & 0xFFFF:04X})")


def _unexpected(tag: int, pos: int) -> str:
    return f"unexpected ({tag >> 16:04X},{tag & 0xFFFF:04X}) inside a sequence item at offset {pos}"


def _too_deep(pos: int) -> str:
    return f"sequences nested deeper than {MAX_DEPTH} levels at offset {pos}"


def _stray(tag: int, pos: int) -> str:
    return f"unexpected ({tag >> 16:04X},{tag & 0xFFFF:04X}) outside a sequence at offset {pos}"


def _unterminated(item: bool, tag: int, pos: int, end: int) -> str:
    if item:
        return f"item at offset {pos} has no item delimiter before offset {end}"
    return (f"undefined-length ({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset {pos} has no "
            f"sequence delimiter before offset {end}")


def _bad_fragment(tag: int, pos: int) -> str:
    return (f"undefined-length item inside encapsulated ({tag >> 16:04X},{tag & 0xFFFF:04X}) "
            f"at offset {pos}")


def _bad_undefined(tag: int, vr: str, pos: int) -> str:
    return (f"undefined length on ({tag >> 16:04X},{tag & 0xFFFF:04X}) with VR {vr} "
            f"at offset {pos}")


def _bad_length(tag: int, vr: str, pos: int, length: int, size: int) -> str:
    return (f"length {length} of ({tag >> 16:04X},{tag & 0xFFFF:04X}) with VR {vr} "
            f"at offset {pos} is not a multiple of {size}")
