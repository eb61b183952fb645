"""Element-by-element dataset comparison that tolerates only what a faithful peer may change.

A Storage SCP such as DCMTK re-encodes what it receives: sequences and items may switch
between defined and undefined length, group lengths are recalculated, values may gain or
lose their trailing padding byte. None of that is visible after pydicom decodes values, except
padding, which is normalised here. Everything else must be equal, and the failure names the
first differing tag path, e.g. ``(0040,0275)[0] > (0040,0008)[0] > (0008,0100) CodeValue``.
File meta (group 0x0002) is ignored: it describes the file, not the object.
"""
from __future__ import annotations

from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

_PAD = (b"\x00", b" ")


class DatasetMismatch(AssertionError):
    """Two datasets differ; ``path`` is the first differing tag path."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"datasets differ at {path}: {detail}")
        self.path = path


def _name(tag: BaseTag, elem: DataElement | None) -> str:
    keyword = elem.keyword if elem is not None and elem.keyword else ""
    text = f"({tag.group:04X},{tag.element:04X})"
    return f"{text} {keyword}" if keyword else text


def _ignored(tag: BaseTag) -> bool:
    # File meta, and group lengths (gggg,0000), which encoders legitimately recalculate.
    return tag.group == 0x0002 or tag.element == 0x0000


def _norm(value: Any) -> Any:
    """Strip the trailing padding that encoders may add or drop."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, tuple, MultiValue)):
        return [_norm(v) for v in value]
    if isinstance(value, (str, PersonName)):
        return str(value).rstrip(" \x00")
    if value is None:
        return ""
    return value


def _bytes_equal(a: bytes, b: bytes) -> bool:
    """Equal, or equal but for one trailing pad byte (odd-length value padded to even)."""
    if a == b:
        return True
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return len(long_) - len(short) == 1 and long_[-1:] in _PAD and long_.startswith(short)


def _values_equal(a: Any, b: Any) -> bool:
    a, b = _norm(a), _norm(b)
    if isinstance(a, bytes) and isinstance(b, bytes):
        return _bytes_equal(a, b)
    # Empty string and empty multi-value are the same zero-length element.
    if a in ("", []) and b in ("", []):
        return True
    if isinstance(a, list) != isinstance(b, list):
        a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
    return bool(a == b)


def _encapsulated_pixel_vr(tag: BaseTag, a: DataElement, b: DataElement) -> bool:
    """Encapsulated Pixel Data must be OB; DCMTK corrects a file that says OW."""
    return (tag == 0x7FE00010 and {a.VR, b.VR} == {"OB", "OW"}
            and isinstance(a.value, bytes) and a.value[:4] == b"\xfe\xff\x00\xe0")


def _show(value: Any, limit: int = 80) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes {bytes(value[:16]).hex()}...>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _compare(a: Dataset, b: Dataset, prefix: str) -> None:
    tags_a = {t for t in a.keys() if not _ignored(t)}
    tags_b = {t for t in b.keys() if not _ignored(t)}
    for tag in sorted(tags_a | tags_b):
        ea = a[tag] if tag in tags_a else None
        eb = b[tag] if tag in tags_b else None
        path = prefix + _name(tag, ea or eb)
        if ea is None or eb is None:
            side = "first" if ea is None else "second"
            raise DatasetMismatch(path, f"missing from the {side} dataset")
        if ea.VR == "SQ" or eb.VR == "SQ":
            if ea.VR != eb.VR:
                raise DatasetMismatch(path, f"VR {ea.VR} != {eb.VR}")
            items_a, items_b = ea.value or [], eb.value or []
            if len(items_a) != len(items_b):
                raise DatasetMismatch(path, f"{len(items_a)} items != {len(items_b)} items")
            for i, (ia, ib) in enumerate(zip(items_a, items_b)):
                _compare(ia, ib, f"{path}[{i}] > ")
            continue
        if ea.VR != eb.VR and not _encapsulated_pixel_vr(tag, ea, eb):
            raise DatasetMismatch(path, f"VR {ea.VR} != {eb.VR}")
        if not _values_equal(ea.value, eb.value):
            raise DatasetMismatch(path, f"{_show(ea.value)} != {_show(eb.value)}")


def assert_same_dataset(a: Dataset, b: Dataset) -> None:
    """Raise DatasetMismatch (an AssertionError) naming the first differing tag path.

    Sequences are compared item by item, recursively. Tolerated: file meta, group lengths,
    sequence/item length encoding and trailing padding of values.
    """
    _compare(a, b, "")
