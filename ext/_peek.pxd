# C-level declarations for _peek.pyx (the native twin of fastroute/peek.py).
#
# Types and constants only: setup.py compiles ext/_peek.pyx as fastroute._peek, so Cython
# does not pair this file with it by name; _peek.pyx cimports it explicitly instead (from
# include_path=["ext"]), which needs nothing at run time.
from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef enum:
    # Sequences nested deeper than this raise PeekError (fastroute.peek.MAX_DEPTH).
    DEPTH_LIMIT = 64
    UNDEFINED = 0xFFFFFFFF
    ITEM = 0xFFFEE000
    ITEM_DELIM = 0xFFFEE00D
    SEQ_DELIM = 0xFFFEE0DD
    VR_UN = 0x554E  # 'U' << 8 | 'N'
    VR_SQ = 0x5351
    VR_OB = 0x4F42
    VR_OW = 0x4F57
    PIXEL_DATA = 0x7FE00010


# Walk outcome; everything from TRUNC_HEADER on is an error described by Cursor.err_*.
cdef enum Status:
    END = 0           # the buffer ended cleanly between elements
    DONE = 1          # largest requested tag read, or a larger tag reached
    TRUNC_HEADER = 2  # err_pos, err_len = bytes needed, err_left
    TRUNC_VALUE = 3   # err_tag, err_pos = value offset, err_len = length, err_left
    BAD_ITEM = 4      # err_tag, err_pos
    UNEXPECTED = 5    # err_tag, err_pos
    TOO_DEEP = 6      # err_pos
    # validate() only:
    STRAY = 7             # err_tag, err_pos: a delimiter outside any sequence
    UNTERMINATED_SEQ = 8  # err_tag, err_pos = opening offset, err_aux = where data ends
    UNTERMINATED_ITEM = 9  # err_pos = opening offset, err_aux = where data ends
    BAD_FRAGMENT = 10     # err_tag = the encapsulated element, err_pos
    BAD_UNDEFINED = 11    # err_tag, err_vr, err_pos
    BAD_LENGTH = 12       # err_tag, err_vr, err_pos, err_len = length, err_aux = value size


cdef struct Cursor:
    const uint8_t* p
    Py_ssize_t n
    Py_ssize_t err_pos
    Py_ssize_t err_len
    Py_ssize_t err_left
    Py_ssize_t err_aux
    uint32_t err_tag
    uint16_t err_vr


cdef struct Header:
    uint16_t vr        # two VR bytes big-endian packed; 0 when read as implicit
    uint32_t length
    Py_ssize_t vpos    # offset of the value


# One level of the undefined-length walk.
cdef struct Level:
    bint in_item
    bint implicit
    bint little



# One level of validate()'s walk: the top-level dataset, a sequence, an item or an
# encapsulated value (kind 0..3, as in fastroute/dicom/peek.py).
cdef struct VLevel:
    Py_ssize_t end     # where this level's bytes end (the buffer's end when undefined)
    Py_ssize_t opos    # offset of the opening header, for "not terminated"
    uint32_t otag
    uint8_t kind
    bint implicit
    bint little
    bint undefined
