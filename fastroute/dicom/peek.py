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
"""
from __future__ import annotations

import struct
from collections.abc import Iterable

from fastroute.errors import PeekError

__all__ = ["MAX_DEPTH", "peek", "peek_prefix"]

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
