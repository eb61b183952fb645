"""Type stub for the native tag peek built from ext/_peek.pyx (twin of fastroute.dicom.peek)."""
from collections.abc import Iterable

MAX_DEPTH: int

def peek(
    buf: bytes | bytearray | memoryview,
    tags: Iterable[int],
    implicit_vr: bool,
    little_endian: bool,
) -> dict[int, tuple[str, bytes]]: ...
def peek_prefix(
    buf: bytes | bytearray | memoryview,
    tags: Iterable[int],
    implicit_vr: bool,
    little_endian: bool,
) -> tuple[dict[int, tuple[str, bytes]], bool]: ...
def validate(
    buf: bytes | bytearray | memoryview,
    implicit_vr: bool,
    little_endian: bool,
) -> None: ...
