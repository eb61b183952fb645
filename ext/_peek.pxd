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


# Walk outcome; everything from TRUNC_HEADER on is an error described by Cursor.err_*.
cdef enum Status:
    END = 0           # the buffer ended cleanly between elements
    DONE = 1          # largest requested tag read, or a larger tag reached
    TRUNC_HEADER = 2  # err_pos, err_len = bytes needed, err_left
    TRUNC_VALUE = 3   # err_tag, err_pos = value offset, err_len = length, err_left
    BAD_ITEM = 4      # err_tag, err_pos
    UNEXPECTED = 5    # err_tag, err_pos
    TOO_DEEP = 6      # err_pos


cdef struct Cursor:
    const uint8_t* p
    Py_ssize_t n
    Py_ssize_t err_pos
    Py_ssize_t err_len
    Py_ssize_t err_left
    uint32_t err_tag


cdef struct Header:
    uint16_t vr        # two VR bytes big-endian packed; 0 when read as implicit
    uint32_t length
    Py_ssize_t vpos    # offset of the value


# One level of the undefined-length walk.
cdef struct Level:
    bint in_item
    bint implicit
    bint little

