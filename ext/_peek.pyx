# cython: language_level=3
"""Native twin of fastroute/dicom/peek.py: the same walks over raw pointers, no decode.

Behaviour, results and PeekError messages are identical to the pure-Python twin (the tests
compare them); see fastroute/dicom/peek.py for the rules. Two walks share the header reader:
the peek's (top level, stops at the largest requested tag) and validate's (vwalk: every
header to the end, one explicit stack of sequence/item levels, defined lengths included). The walk is C over a pinned buffer
(the header and sequence walkers are noexcept nogil functions); Python objects are made only
for a requested tag that was found. Every read is preceded by a hand-written bounds check
(the build leaves Cython's boundscheck off), and error details travel in a Cursor struct.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport uint8_t, uint16_t, uint32_t

from _peek cimport (
    BAD_FRAGMENT, BAD_ITEM, BAD_LENGTH, BAD_UNDEFINED, DEPTH_LIMIT, DONE, END, ITEM, ITEM_DELIM,
    PIXEL_DATA, SEQ_DELIM, STRAY, TOO_DEEP, TRUNC_HEADER, TRUNC_VALUE, UNDEFINED, UNEXPECTED,
    UNTERMINATED_ITEM, UNTERMINATED_SEQ, VR_OB, VR_OW, VR_SQ, VR_UN, Cursor, Header, Level,
    VLevel,
)

from fastroute.errors import PeekError

__all__ = ["MAX_DEPTH", "peek", "peek_prefix", "validate"]

MAX_DEPTH = DEPTH_LIMIT


cdef inline uint16_t rd16(const uint8_t* p, bint le) noexcept nogil:
    if le:
        return <uint16_t>(p[0] | (p[1] << 8))
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline uint32_t rd32(const uint8_t* p, bint le) noexcept nogil:
    if le:
        return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
                | (<uint32_t>p[3] << 24))
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8)
            | <uint32_t>p[3])


cdef inline bint is_cap(uint8_t b) noexcept nogil:
    return 0x40 < b < 0x5B


cdef inline bint is_long_vr(uint8_t a, uint8_t b) noexcept nogil:
    # OB OD OF OL OV OW SQ SV UC UN UR UT UV: 2 reserved bytes + a 4-byte length.
    if a == 0x4F:  # 'O'
        return b == 0x42 or b == 0x44 or b == 0x46 or b == 0x4C or b == 0x56 or b == 0x57
    if a == 0x53:  # 'S'
        return b == 0x51 or b == 0x56
    if a == 0x55:  # 'U'
        return b == 0x43 or b == 0x4E or b == 0x52 or b == 0x54 or b == 0x56
    return 0


cdef inline int trunc_header(Cursor* c, Py_ssize_t pos, Py_ssize_t need) noexcept nogil:
    return trunc_header_in(c, pos, need, c.n)


cdef inline int trunc_header_in(Cursor* c, Py_ssize_t pos, Py_ssize_t need,
                                Py_ssize_t end) noexcept nogil:
    c.err_pos = pos
    c.err_len = need
    c.err_left = end - pos
    return TRUNC_HEADER


cdef inline int trunc_value(Cursor* c, uint32_t tag, Py_ssize_t vpos,
                            uint32_t length) noexcept nogil:
    return trunc_value_in(c, tag, vpos, length, c.n)


cdef inline int trunc_value_in(Cursor* c, uint32_t tag, Py_ssize_t vpos, uint32_t length,
                               Py_ssize_t end) noexcept nogil:
    c.err_tag = tag
    c.err_pos = vpos
    c.err_len = length
    c.err_left = end - vpos
    return TRUNC_VALUE


cdef inline int at(Cursor* c, int status, uint32_t tag, Py_ssize_t pos) noexcept nogil:
    c.err_tag = tag
    c.err_pos = pos
    return status


cdef inline int read_header(Cursor* c, Py_ssize_t pos, uint16_t group, bint imp, bint le,
                            Header* h) noexcept nogil:
    return read_header_in(c, pos, c.n, group, imp, le, h)


cdef int read_header_in(Cursor* c, Py_ssize_t pos, Py_ssize_t end, uint16_t group, bint imp,
                        bint le, Header* h) noexcept nogil:
    """Decode the element header at `pos` (4 tag bytes before `end` checked) into `h`."""
    cdef const uint8_t* p = c.p + pos
    cdef Py_ssize_t left = end - pos
    if not imp and group != 0xFFFE:
        if left < 8:
            return trunc_header_in(c, pos, 8, end)
        if is_cap(p[4]) and is_cap(p[5]):
            h.vr = <uint16_t>((p[4] << 8) | p[5])
            if not is_long_vr(p[4], p[5]):
                h.length = rd16(p + 6, le)
                h.vpos = pos + 8
                return 0
            if left < 12:
                return trunc_header_in(c, pos, 12, end)
            h.length = rd32(p + 8, le)
            h.vpos = pos + 12
            return 0
        # Not a VR: this element is implicit (fall through).
    if left < 8:
        return trunc_header_in(c, pos, 8, end)
    h.vr = 0
    h.length = rd32(p + 4, le)
    h.vpos = pos + 8
    return 0


cdef inline bint looks_implicit(Cursor* c, Py_ssize_t pos, bint le) noexcept nogil:
    return looks_implicit_in(c, pos, c.n, le)


cdef inline bint looks_implicit_in(Cursor* c, Py_ssize_t pos, Py_ssize_t end,
                                   bint le) noexcept nogil:
    """pydicom's test for an item written implicit inside an explicit dataset."""
    if end - pos < 6 or rd16(c.p + pos, le) == 0xFFFE:
        return 0
    return not (is_cap(c.p[pos + 4]) and is_cap(c.p[pos + 5]))


cdef int skip_undefined(Cursor* c, Py_ssize_t pos, bint un, bint imp, bint le,
                        Py_ssize_t* vend, Py_ssize_t* next_pos) noexcept nogil:
    """Walk an undefined-length value from `pos`; set the value end and the next offset."""
    cdef Level stack[2 * DEPTH_LIMIT + 1]
    cdef Py_ssize_t top = 0
    cdef int depth = 1
    cdef int st
    cdef Level* lv
    cdef uint16_t group
    cdef uint32_t tag, length
    cdef Header h
    cdef Py_ssize_t n = c.n
    stack[0].in_item = 0
    stack[0].implicit = 1 if un else imp
    stack[0].little = 1 if un else le
    while True:
        lv = &stack[top]
        if n - pos < (4 if lv.in_item else 8):
            return trunc_header(c, pos, 4 if lv.in_item else 8)
        group = rd16(c.p + pos, lv.little)
        tag = (<uint32_t>group << 16) | rd16(c.p + pos + 2, lv.little)
        if not lv.in_item:
            length = rd32(c.p + pos + 4, lv.little)
            if tag == SEQ_DELIM:
                if top == 0:
                    vend[0] = pos
                    next_pos[0] = pos + 8
                    return 0
                top -= 1
                depth -= 1
                pos += 8
            elif tag != ITEM:
                return at(c, BAD_ITEM, tag, pos)
            elif length == UNDEFINED:
                pos += 8
                stack[top + 1].in_item = 1
                stack[top + 1].implicit = lv.implicit or looks_implicit(c, pos, lv.little)
                stack[top + 1].little = lv.little
                top += 1
            else:
                pos += 8
                if length > n - pos:
                    return trunc_value(c, tag, pos, length)
                pos += length
        elif group == 0xFFFE:
            if tag != ITEM_DELIM:
                return at(c, UNEXPECTED, tag, pos)
            if n - pos < 8:
                return trunc_header(c, pos, 8)
            top -= 1
            pos += 8
        else:
            st = read_header(c, pos, group, lv.implicit, lv.little, &h)
            if st:
                return st
            if h.length == UNDEFINED:
                if depth >= DEPTH_LIMIT:
                    return at(c, TOO_DEEP, tag, pos)
                depth += 1
                stack[top + 1].in_item = 0
                stack[top + 1].implicit = 1 if h.vr == VR_UN else lv.implicit
                stack[top + 1].little = 1 if h.vr == VR_UN else lv.little
                top += 1
                pos = h.vpos
            else:
                if h.length > n - h.vpos:
                    return trunc_value(c, tag, h.vpos, h.length)
                pos = h.vpos + h.length


cdef inline bint contains(const uint32_t* a, Py_ssize_t n, uint32_t tag) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < tag:
            lo = mid + 1
        else:
            hi = mid
    return lo < n and a[lo] == tag


cdef int walk(Cursor* c, const uint32_t* wanted, Py_ssize_t nw, bint implicit_vr,
              bint little_endian, dict found) except -1:
    """Walk the top level into `found`; returns a Status (errors described in `c`)."""
    cdef const uint8_t* p = c.p
    cdef Py_ssize_t n = c.n, pos = 0, vend
    cdef uint32_t last = wanted[nw - 1], tag
    cdef uint16_t group
    cdef Header h
    cdef int st
    # A leading run of group 0002 (file meta) is always Explicit VR Little Endian.
    cdef bint meta = n >= 2 and p[0] == 2 and p[1] == 0
    cdef bint imp = 0 if meta else implicit_vr
    cdef bint le = 1 if meta else little_endian
    while pos < n:
        if meta and not (n - pos >= 2 and p[pos] == 2 and p[pos + 1] == 0):
            meta = 0
            imp = implicit_vr
            le = little_endian
        if n - pos < 4:
            return trunc_header(c, pos, 4)
        group = rd16(p + pos, le)
        tag = (<uint32_t>group << 16) | rd16(p + pos + 2, le)
        if tag > last:
            return DONE
        st = read_header(c, pos, group, imp, le, &h)
        if st:
            return st
        if h.length == UNDEFINED:
            st = skip_undefined(c, h.vpos, h.vr == VR_UN, imp, le, &vend, &pos)
            if st:
                return st
        else:
            if h.length > n - h.vpos:
                return trunc_value(c, tag, h.vpos, h.length)
            vend = pos = h.vpos + h.length
        if contains(wanted, nw, tag):
            found[tag] = (
                "" if h.vr == 0 else vr_str(h.vr),
                PyBytes_FromStringAndSize(<const char*>p + h.vpos, vend - h.vpos),
            )
            if tag == last:
                return DONE
    return END


cdef inline int number_size(uint16_t vr) noexcept nogil:
    """Bytes per value of the number VRs pydicom unpacks strictly (peek.py _NUMBER_SIZES)."""
    if vr == 0x5553 or vr == 0x5353:  # US SS
        return 2
    if vr == 0x554C or vr == 0x534C or vr == 0x464C:  # UL SL FL
        return 4
    if vr == 0x4644 or vr == 0x5356 or vr == 0x5556:  # FD SV UV
        return 8
    return 0


cdef inline bint binary_group(uint16_t group) noexcept nogil:
    """Pixel, overlay, curve, waveform groups (peek.py _binary_group)."""
    return group == 0x7FE0 or group == 0x5400 or (group >> 8) == 0x50 or (group >> 8) == 0x60


cdef inline VLevel* push(VLevel* stack, Py_ssize_t* top, uint8_t kind, bint imp, bint le,
                         Py_ssize_t end, bint undefined, uint32_t tag,
                         Py_ssize_t pos) noexcept nogil:
    cdef VLevel* lv = &stack[top[0] + 1]
    top[0] += 1
    lv.kind = kind
    lv.implicit = imp
    lv.little = le
    lv.end = end
    lv.undefined = undefined
    lv.otag = tag
    lv.opos = pos
    return lv


cdef int vwalk(Cursor* c, bint implicit_vr, bint little_endian) noexcept nogil:
    """validate()'s walk (fastroute/dicom/peek.py _validate, step for step); 0 or a Status."""
    cdef VLevel stack[2 * DEPTH_LIMIT + 1]
    cdef Py_ssize_t top = 0, n = c.n, pos = 0, left, end
    cdef int depth = 0, size, st
    cdef VLevel* lv = &stack[0]
    cdef uint16_t group
    cdef uint32_t tag, length
    cdef Header h
    cdef const uint8_t* p = c.p
    cdef bint meta = n >= 2 and p[0] == 2 and p[1] == 0
    lv.kind = 0
    lv.implicit = 0 if meta else implicit_vr
    lv.little = 1 if meta else little_endian
    lv.end = n
    lv.undefined = 0
    while True:
        lv = &stack[top]
        end = lv.end
        if top == 0 and meta and not (n - pos >= 2 and p[pos] == 2 and p[pos + 1] == 0):
            meta = 0
            lv.implicit = implicit_vr
            lv.little = little_endian
        if pos == end:
            if top == 0:
                return 0
            if lv.undefined:
                c.err_tag = lv.otag
                c.err_pos = lv.opos
                c.err_aux = end
                return UNTERMINATED_ITEM if lv.kind == 2 else UNTERMINATED_SEQ
            if lv.kind != 2:
                depth -= 1
            top -= 1
            continue
        left = end - pos
        if lv.kind == 1 or lv.kind == 3:  # a sequence, or encapsulated fragments
            if left < 8:
                return trunc_header_in(c, pos, 8, end)
            tag = (<uint32_t>rd16(p + pos, lv.little) << 16) | rd16(p + pos + 2, lv.little)
            length = rd32(p + pos + 4, lv.little)
            if tag == SEQ_DELIM and lv.undefined:
                top -= 1
                depth -= 1
                pos += 8
            elif tag != ITEM:
                return at(c, BAD_ITEM, tag, pos)
            elif length == UNDEFINED:
                if lv.kind == 3:
                    return at(c, BAD_FRAGMENT, lv.otag, pos)
                push(stack, &top, 2, lv.implicit or looks_implicit_in(c, pos + 8, end, lv.little),
                     lv.little, end, 1, tag, pos)
                pos += 8
            else:
                if length > left - 8:
                    return trunc_value_in(c, tag, pos + 8, length, end)
                if lv.kind == 1 and length:
                    push(stack, &top, 2,
                         lv.implicit or looks_implicit_in(c, pos + 8, pos + 8 + length, lv.little),
                         lv.little, pos + 8 + length, 0, tag, pos)
                    pos += 8
                else:
                    pos += 8 + length
            continue
        # A dataset: the top level or an item's.
        if left < 4:
            return trunc_header_in(c, pos, 4, end)
        group = rd16(p + pos, lv.little)
        tag = (<uint32_t>group << 16) | rd16(p + pos + 2, lv.little)
        if group == 0xFFFE:
            if lv.kind == 2 and lv.undefined and tag == ITEM_DELIM:
                if left < 8:
                    return trunc_header_in(c, pos, 8, end)
                top -= 1
                pos += 8
                continue
            return at(c, UNEXPECTED if lv.kind else STRAY, tag, pos)
        st = read_header_in(c, pos, end, group, lv.implicit, lv.little, &h)
        if st:
            return st
        if h.length == UNDEFINED:
            if h.vr != 0 and not (h.vr == VR_SQ or h.vr == VR_UN or h.vr == VR_OB
                                  or h.vr == VR_OW):
                c.err_vr = h.vr
                return at(c, BAD_UNDEFINED, tag, pos)
            if depth >= DEPTH_LIMIT:
                return at(c, TOO_DEEP, tag, pos)
            depth += 1
            if tag == PIXEL_DATA or h.vr == VR_OB or h.vr == VR_OW:
                push(stack, &top, 3, lv.implicit, lv.little, end, 1, tag, pos)
            elif h.vr == VR_UN:
                push(stack, &top, 1, 1, 1, end, 1, tag, pos)
            else:
                push(stack, &top, 1, lv.implicit, lv.little, end, 1, tag, pos)
            pos = h.vpos
            continue
        if h.length > end - h.vpos:
            return trunc_value_in(c, tag, h.vpos, h.length, end)
        size = number_size(h.vr)
        if size and h.length % size:
            c.err_vr = h.vr
            c.err_len = h.length
            c.err_aux = size
            return at(c, BAD_LENGTH, tag, pos)
        if h.vr == VR_SQ or (h.vr == 0 and h.length >= 8 and not binary_group(group)
                             and rd16(p + h.vpos, lv.little) == 0xFFFE
                             and rd16(p + h.vpos + 2, lv.little) == 0xE000):
            if depth >= DEPTH_LIMIT:
                return at(c, TOO_DEEP, tag, pos)
            depth += 1
            push(stack, &top, 1, lv.implicit, lv.little, h.vpos + h.length, 0, tag, pos)
            pos = h.vpos
        else:
            pos = h.vpos + h.length


cdef str vr_str(uint16_t vr):
    cdef char s[2]
    s[0] = <char>(vr >> 8)
    s[1] = <char>(vr & 0xFF)
    return PyUnicode_DecodeASCII(s, 2, NULL)


cdef str message(int st, Cursor* c):
    """The PeekError text; identical to fastroute/peek.py's helpers."""
    cdef uint32_t tag = c.err_tag
    if st == TRUNC_HEADER:
        return (f"truncated data element header at offset {c.err_pos}: "
                f"need {c.err_len} bytes, {c.err_left} left")
    if st == TRUNC_VALUE:
        return (f"truncated value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset "
                f"{c.err_pos}: length {c.err_len} but only {c.err_left} bytes left")
    if st == BAD_ITEM:
        return (f"expected an item or sequence delimiter at offset {c.err_pos}, "
                f"found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    if st == UNEXPECTED:
        return (f"unexpected ({tag >> 16:04X},{tag & 0xFFFF:04X}) inside a sequence item "
                f"at offset {c.err_pos}")
    if st == TOO_DEEP:
        return f"sequences nested deeper than {DEPTH_LIMIT} levels at offset {c.err_pos}"
    if st == STRAY:
        return (f"unexpected ({tag >> 16:04X},{tag & 0xFFFF:04X}) outside a sequence "
                f"at offset {c.err_pos}")
    if st == UNTERMINATED_ITEM:
        return f"item at offset {c.err_pos} has no item delimiter before offset {c.err_aux}"
    if st == UNTERMINATED_SEQ:
        return (f"undefined-length ({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset "
                f"{c.err_pos} has no sequence delimiter before offset {c.err_aux}")
    if st == BAD_FRAGMENT:
        return (f"undefined-length item inside encapsulated ({tag >> 16:04X},"
                f"{tag & 0xFFFF:04X}) at offset {c.err_pos}")
    if st == BAD_UNDEFINED:
        return (f"undefined length on ({tag >> 16:04X},{tag & 0xFFFF:04X}) with VR "
                f"{vr_str(c.err_vr)} at offset {c.err_pos}")
    return (f"length {c.err_len} of ({tag >> 16:04X},{tag & 0xFFFF:04X}) with VR "
            f"{vr_str(c.err_vr)} at offset {c.err_pos} is not a multiple of {c.err_aux}")


cdef int scan(object buf, object tags, bint implicit_vr, bint little_endian, dict found,
              Cursor* c) except -1:
    """Validate `tags`, pin `buf`'s buffer and walk it; returns a Status."""
    cdef frozenset wanted_set = frozenset(tags)
    cdef Py_ssize_t nw = len(wanted_set), i, j
    cdef uint32_t small[32]
    cdef uint32_t* wanted = small
    cdef uint32_t t
    cdef Py_buffer view
    for tag in wanted_set:
        if not isinstance(tag, int) or not 0 <= tag <= 0xFFFFFFFF:
            raise ValueError(
                f"tag {tag!r} is not a 32-bit DICOM tag (group << 16 | element)")
    if nw == 0:
        return DONE
    if not isinstance(buf, (bytes, bytearray)):
        buf = memoryview(buf).cast("B")
    if nw > 32:
        wanted = <uint32_t*>PyMem_Malloc(nw * sizeof(uint32_t))
        if wanted == NULL:
            raise MemoryError()
    try:
        i = 0
        for tag in wanted_set:  # insertion sort: a handful of tags
            t = tag
            j = i
            while j > 0 and wanted[j - 1] > t:
                wanted[j] = wanted[j - 1]
                j -= 1
            wanted[j] = t
            i += 1
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            c.p = <const uint8_t*>view.buf
            c.n = view.len
            return walk(c, wanted, nw, implicit_vr, little_endian, found)
        finally:
            PyBuffer_Release(&view)
    finally:
        if wanted != small:
            PyMem_Free(wanted)


def peek(buf, tags, bint implicit_vr, bint little_endian):
    """Return ``{tag: (vr, value_bytes)}`` for the requested top-level tags present in `buf`.

    Same contract as :func:`fastroute.peek.peek`.
    """
    cdef Cursor c
    cdef dict found = {}
    cdef int st = scan(buf, tags, implicit_vr, little_endian, found, &c)
    if st >= TRUNC_HEADER:
        raise PeekError(message(st, &c))
    return found


def peek_prefix(buf, tags, bint implicit_vr, bint little_endian):
    """Peek a buffer that may hold only the start of a dataset: ``(found, complete)``.

    Same contract as :func:`fastroute.peek.peek_prefix`.
    """
    cdef Cursor c
    cdef dict found = {}
    cdef int st = scan(buf, tags, implicit_vr, little_endian, found, &c)
    if st == TRUNC_HEADER or st == TRUNC_VALUE:
        return found, False
    if st >= BAD_ITEM:
        raise PeekError(message(st, &c))
    return found, st == DONE


def validate(buf, bint implicit_vr, bint little_endian):
    """Walk every element header of the dataset in `buf` to its end; PeekError if malformed.

    Same contract as :func:`fastroute.dicom.peek.validate`. The walk runs without the GIL
    for large buffers, so a thread pool can check objects off the event loop in parallel.
    """
    cdef Cursor c
    cdef Py_buffer view
    cdef int st
    if not isinstance(buf, (bytes, bytearray)):
        buf = memoryview(buf).cast("B")
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        c.p = <const uint8_t*>view.buf
        c.n = view.len
        if c.n > 65536:
            with nogil:
                st = vwalk(&c, implicit_vr, little_endian)
        else:
            st = vwalk(&c, implicit_vr, little_endian)
    finally:
        PyBuffer_Release(&view)
    if st:
        raise PeekError(message(st, &c))
