"""Decode the few attributes routing needs from encoded dataset bytes, via the tag peek.

:func:`read_attributes` turns a transfer syntax into the peek's encoding flags, inflates a
deflated dataset only as far as the requested tags need, and converts the raw values into
plain Python values (str, int, float, bytes, or a tuple of them when VM > 1) that rules can
compare. Character sets are pydicom's (``decode_bytes`` / ``convert_encodings``), so text
matches what pydicom would show; nothing here builds a pydicom Dataset.

:func:`check_structure` is the receive-side gate of issue 11: the whole dataset's element
structure, walked by the native validator, and the object size limit, which a deflated
dataset must respect while it is being inflated (a deflate bomb is refused, not built).
"""
from __future__ import annotations

import logging
import re
import struct
import zlib
from collections.abc import Iterable
from functools import lru_cache

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.valuerep import TEXT_VR_DELIMS

from fastroute import native
from fastroute.errors import ObjectTooLarge, PeekError

__all__ = ["MAX_OBJECT_BYTES", "Scalar", "Value", "check_structure", "read_attributes", "tags_for"]

log = logging.getLogger("fastroute.peek")

Scalar = str | int | float | bytes
Value = Scalar | tuple[Scalar, ...]
Buffer = bytes | bytearray | memoryview

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
# Syntaxes whose whole dataset is raw-deflated: Deflated Explicit VR LE, JPIP Referenced
# Deflate. (Deflated Image Frame Compression deflates frames only, not the dataset.)
DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})
SPECIFIC_CHARACTER_SET = 0x00080005

_TEXT_VRS = frozenset(
    "AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
# Values of these may use (0008,0005); the rest are the default repertoire.
_CHARSET_VRS = frozenset("LO LT PN SH ST UC UT".split())
# Backslash is part of the value for these, never a VM separator.
_SINGLE_VALUED = frozenset("LT ST UT UR".split())
# Leading spaces are padding too for these (PS3.5 table 6.2-1).
_STRIP_BOTH = frozenset("AE AS CS DA DS DT IS LO SH TM UI".split())
_NUMBER_CODES = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d",
                 "SV": "q", "UV": "Q", "AT": "HH"}
_IS = re.compile(r"[+-]?[0-9]+")
_DS = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")

_INFLATE_FIRST = 16 * 1024  # bytes of inflated output tried first; doubles per round
_INFLATE_STEP = 1024 * 1024  # bytes of inflated output per step when inflating it all
#: Default object size limit; callers pass the configured ``max_object_bytes``.
MAX_OBJECT_BYTES = 4 * 1024**3


def tags_for(keywords: Iterable[str]) -> tuple[int, ...]:
    """Sorted tags for DICOM keywords (e.g. ``"StudyInstanceUID"``), as the peek wants them.

    Raises KeyError naming the first unknown keyword, so a typo in a rule fails at load.
    """
    tags = set()
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(f"unknown DICOM keyword {keyword!r}")
        tags.add(tag)
    return tuple(sorted(tags))


def check_structure(buf: Buffer, transfer_syntax_uid: str,
                    max_bytes: int = MAX_OBJECT_BYTES) -> None:
    """Refuse a dataset a destination could not parse, before it is acknowledged.

    Walks every element header of `buf` (the encoded dataset in `transfer_syntax_uid`) to
    the end, sequences and items included, without decoding values; see
    :func:`fastroute.dicom.peek.validate` for what is rejected. Encapsulated syntaxes are
    Explicit VR LE; a deflated dataset is inflated step by step and refused as soon as it
    would exceed `max_bytes`, so at most `max_bytes` is ever held.

    Raises ObjectTooLarge when `buf`, or its inflated form, exceeds `max_bytes`, and
    PeekError (with offset and tag) for any other malformation. Holds the GIL only for
    small objects: run it in a thread for large ones to keep an event loop answering.
    """
    if len(buf) > max_bytes:
        raise ObjectTooLarge(f"dataset of {len(buf)} bytes exceeds the limit of {max_bytes}")
    ts = transfer_syntax_uid.rstrip("\0 ")
    if ts in DEFLATED:
        data: Buffer = _inflate_all(buf, max_bytes)
        native.validate(data, _actual_implicit(data, False, "deflated"), True)
    else:
        native.validate(buf, _actual_implicit(buf, ts == IMPLICIT_VR_LE, ts),
                        ts != EXPLICIT_VR_BE)


def _inflate_all(buf: Buffer, max_bytes: int) -> bytearray:
    """Inflate a raw-deflated dataset in bounded steps; never holds more than `max_bytes` + 1."""
    inflater = zlib.decompressobj(-15)
    data = bytearray()
    pending: Buffer = buf
    try:
        while not inflater.eof:
            chunk = inflater.decompress(pending, min(_INFLATE_STEP, max_bytes + 1 - len(data)))
            pending = inflater.unconsumed_tail
            data += chunk
            if len(data) > max_bytes:
                raise _too_large(buf, max_bytes)
            if not chunk and not pending:
                raise PeekError(f"deflated dataset ends inside its deflate stream after "
                                f"{len(data)} inflated bytes")
    except zlib.error as exc:
        raise PeekError(f"deflated dataset is corrupt after {len(data)} inflated bytes: "
                        f"{exc}") from None
    return data


def _too_large(buf: Buffer, max_bytes: int) -> ObjectTooLarge:
    return ObjectTooLarge(f"deflated dataset of {len(buf)} bytes inflates to more than the "
                          f"limit of {max_bytes} bytes")


def read_attributes(buf: Buffer, transfer_syntax_uid: str, tags: Iterable[int],
                    max_bytes: int = MAX_OBJECT_BYTES) -> dict[int, Value]:
    """Return ``{tag: value}`` for the requested top-level tags present in dataset `buf`.

    `buf` is the encoded dataset (no preamble or file meta) in `transfer_syntax_uid`.
    Missing tags are absent. Text is decoded with the dataset's (0008,0005), read along
    whenever a requested tag may be text. Raises PeekError for truncated or malformed
    bytes, including a corrupt deflate stream, and ObjectTooLarge when a deflated dataset
    would have to be inflated past `max_bytes` to find the tags.
    """
    ts = transfer_syntax_uid.rstrip("\0 ")
    wanted = frozenset(tags)
    query = wanted
    if SPECIFIC_CHARACTER_SET not in wanted and any(_may_need_charset(t) for t in wanted):
        query = wanted | {SPECIFIC_CHARACTER_SET}
    peek_tags = tuple(sorted(query))
    little = ts != EXPLICIT_VR_BE
    if ts in DEFLATED:
        raw = _peek_deflated(buf, peek_tags, max_bytes)
    else:
        implicit = _actual_implicit(buf, ts == IMPLICIT_VR_LE, ts)
        raw = native.peek(buf, peek_tags, implicit, little)
    encodings = _encodings(raw.get(SPECIFIC_CHARACTER_SET))
    return {tag: _decode(tag, vr, value, little, encodings)
            for tag, (vr, value) in raw.items() if tag in wanted}


def _peek_deflated(buf: Buffer, tags: tuple[int, ...],
                   max_bytes: int = MAX_OBJECT_BYTES) -> dict[int, tuple[str, bytes]]:
    """Inflate only as much of a raw-deflated Explicit VR LE dataset as `tags` need.

    The routing tags sit near the start; Pixel Data, which dominates the size, is at the
    end and is never inflated unless a requested tag lies beyond it. Never inflates more than
    `max_bytes`: if the tags lie beyond, ObjectTooLarge.
    """
    inflater = zlib.decompressobj(-15)
    data = bytearray()
    pending: Buffer = buf
    limit = _INFLATE_FIRST
    checked = False
    implicit = False
    try:
        while True:
            # Inflate `limit` more bytes, in steps of at most _INFLATE_STEP so that a step's
            # output and the growing buffer never add up to twice what the limit allows.
            if len(data) >= max_bytes:  # the tags need more than the limit allows
                raise _too_large(buf, max_bytes)
            target = min(len(data) + limit, max_bytes)
            done = False
            while len(data) < target and not done:
                data += inflater.decompress(
                    pending, min(_INFLATE_STEP, target - len(data)))
                pending = inflater.unconsumed_tail
                done = inflater.eof or not pending
            if done:
                data += inflater.flush()  # what zlib holds back: a few KiB at most
                if len(data) > max_bytes:
                    raise _too_large(buf, max_bytes)
            if not checked and (len(data) >= 6 or done):
                implicit = _actual_implicit(data, False, "deflated")
                checked = True
            if done:
                return native.peek(data, tags, implicit, True)
            found, complete = native.peek_prefix(data, tags, implicit, True)
            if complete:
                return found
            limit *= 2
    except zlib.error as exc:
        raise PeekError(f"deflated dataset is corrupt after {len(data)} inflated bytes: "
                        f"{exc}") from None


def _actual_implicit(buf: Buffer, implicit: bool, ts: str) -> bool:
    """Trust the bytes over the transfer syntax for implicit vs explicit VR, as pydicom does.

    Explicit VR has two capitals at offset 4 (the VR); implicit has the low bytes of a
    length there, which look like capitals only for a first element over 16 KiB.
    """
    head = bytes(buf[:6])
    if len(head) < 6 or head[:2] == b"\x02\x00":  # empty, or file meta (always explicit)
        return implicit
    explicit = 0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B
    if explicit == implicit:
        log.debug("dataset in transfer syntax %s is %s VR; reading it as such",
                  ts, "explicit" if explicit else "implicit")
    return not explicit


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    """The single dictionary VR of `tag`; 'UN' (raw bytes) for private, unknown, ambiguous."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr if len(vr) == 2 else "UN"


def _may_need_charset(tag: int) -> bool:
    vr = _dictionary_vr(tag)
    return vr in _CHARSET_VRS or (vr == "UN" and tag >> 16 & 1 == 1)  # private: may be LO


def _encodings(raw: tuple[str, bytes] | None) -> list[str]:
    if raw is None:
        return convert_encodings(None)
    terms = [term.strip(" \0") for term in raw[1].decode("latin-1").split("\\")]
    return convert_encodings(terms)


def _decode(tag: int, vr: str, value: bytes, little: bool, encodings: list[str]) -> Value:
    """Convert one raw value by its VR (the stream's, or the dictionary's for implicit/UN)."""
    if not vr or vr == "UN":
        vr = _dictionary_vr(tag)
    if vr in _TEXT_VRS:
        return _decode_text(vr, value, encodings)
    code = _NUMBER_CODES.get(vr)
    if code is None:
        return value
    return _decode_numbers(vr, code, value, little)


def _decode_text(vr: str, value: bytes, encodings: list[str]) -> Value:
    if vr in _CHARSET_VRS:
        text = decode_bytes(value, encodings, TEXT_VR_DELIMS)
    else:
        text = value.decode("latin-1")  # default repertoire; never fails on bad bytes
    parts = [text] if vr in _SINGLE_VALUED else text.split("\\")
    strip = str.strip if vr in _STRIP_BOTH else str.rstrip
    pad = " \0=" if vr == "PN" else " \0"  # empty trailing PN component groups too
    values: list[Scalar] = []
    for part in parts:
        part = strip(part, pad)
        if vr == "IS" and _IS.fullmatch(part):
            values.append(int(part))
        elif vr == "DS" and _DS.fullmatch(part):
            values.append(float(part))
        else:
            values.append(part)
    return values[0] if len(values) == 1 else tuple(values)


def _decode_numbers(vr: str, code: str, value: bytes, little: bool) -> Value:
    size = struct.calcsize(code)
    count, rest = divmod(len(value), size)
    if rest:
        return value  # not a whole number of values: hand back the bytes
    fmt = f"{'<' if little else '>'}{code * count}"
    numbers: tuple[int | float, ...]
    if vr == "AT":  # (group, element) pairs -> group << 16 | element
        pairs: tuple[int, ...] = struct.unpack(fmt, value)
        numbers = tuple(g << 16 | e for g, e in zip(pairs[::2], pairs[1::2]))
    else:
        numbers = struct.unpack(fmt, value)
    return numbers[0] if len(numbers) == 1 else numbers
