"""Transfer syntax conversion: encoded dataset bytes in one syntax -> bytes in another.

A router forwards objects unchanged whenever it can; this module is only used when a
destination cannot take the stored syntax (or its configuration asks for compression).
``candidates`` says what to propose, ``choose`` picks from what the peer accepted and
``transcode`` converts. All three are pure functions of their arguments, so they are safe to
call from any thread or sender process.

What a conversion may change is exactly what the target syntax forces:

* element encoding (implicit/explicit VR, byte order; deflate), with text values copied as
  raw bytes - never decoded and re-encoded - so character sets, padding and private text
  survive byte for byte;
* the Pixel Data encoding, plus the attributes PS3.3/PS3.5 tie to it: Photometric
  Interpretation (when the decoder changed the colour space), Planar Configuration, the
  Pixel Data VR, the Extended Offset Table, and the Lossy Image Compression attributes
  (C.7.6.1.1.5: once lossy, always marked lossy).

Group length elements (gggg,0000) are dropped: they are retired and would be wrong after
re-encoding. SOP Instance UID and every other attribute stay as received. Input whose element
framing is truncated is refused rather than forwarded shortened. Lossless is the default: a lossy
target needs ``allow_lossy`` and data that was already lossy is not lossily compressed again
unless ``lossy_source_ok``.

Codecs come from pydicom 3's pixel data plugins: by default pylibjpeg-openjpeg (JPEG 2000,
HTJ2K), pylibjpeg-rle and pydicom's own RLE, python-gdcm (JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000) and pyjpegls (JPEG-LS), all permissively licensed; the GPL
pylibjpeg-libjpeg is optional. Which ones may be used, and in which order, is a ``Codecs``
value, detected once per process, that every function accepts explicitly so tests (and
diagnostics) can ask "what if this plugin were missing" without touching the environment.
"""
from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import correct_ambiguous_vr_element, write_dataset
from pydicom.hooks import hooks as _pydicom_hooks
from pydicom.pixels import get_decoder, get_encoder
from pydicom.pixels.utils import expand_ybr422
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEG2000MC,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    MPEGTransferSyntaxes,
    RLELossless,
)
from pydicom.valuerep import DSfloat

from fastroute.config import DestinationConfig
from fastroute.errors import NoCodecError, TranscodeError

__all__ = [
    "Codecs", "installed_codecs", "decoders_available", "encoders_available",
    "candidates", "choose", "transcode", "syntax_label", "undecodable_reason",
]

IMPLICIT = ImplicitVRLittleEndian
EXPLICIT = ExplicitVRLittleEndian
DEFLATED = DeflatedExplicitVRLittleEndian
BIG_ENDIAN = ExplicitVRBigEndian
_NATIVE = frozenset({IMPLICIT, EXPLICIT, DEFLATED, BIG_ENDIAN})

# Syntaxes whose codestreams are (or may be) lossy. Producing one is lossy compression;
# receiving one means the pixel data may already have lost information.
_LOSSY = frozenset({
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, JPEG2000MC, HTJ2K,
    *MPEGTransferSyntaxes,
})
# (0028,2114) Lossy Image Compression Method defined terms, PS3.3 C.7.6.1.1.5.1.
_LOSSY_METHOD: dict[str, str] = {
    JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1", JPEG2000: "ISO_15444_1", JPEG2000MC: "ISO_15444_2",
    HTJ2K: "ISO_15444_15",
}
# DestinationConfig.compress names (config.py validates them).
_COMPRESS = {"rle": RLELossless, "j2k-lossless": JPEG2000Lossless, "j2k": JPEG2000,
             "jpeg": JPEGBaseline8Bit}
# Fallbacks offered by default, best first: explicit keeps VRs for the peer, implicit is the
# one syntax every SCP must accept, then lossless compression if an encoder exists.
_FALLBACKS = (EXPLICIT, IMPLICIT, RLELossless, JPEG2000Lossless)
# Producible but offered only when named in transfer_syntaxes/prefer (retired or unusual).
_OPT_IN = frozenset({DEFLATED, BIG_ENDIAN})

# A default install decodes JPEG with python-gdcm and JPEG-LS with pyjpegls (both BSD);
# pylibjpeg-libjpeg (GPL-3.0) is the opt-in alternative.
_JPEG_HINT = ("pip install python-gdcm (a default dependency of fastroute; or the GPL-3.0 "
              "pylibjpeg-libjpeg via the 'fastroute[libjpeg]' extra)")
_JPEGLS_HINT = ("pip install pyjpegls or python-gdcm (default dependencies of fastroute; or the "
                "GPL-3.0 pylibjpeg-libjpeg via the 'fastroute[libjpeg]' extra)")
_JPEG12_HINT = ("12-bit JPEG Extended is decoded by python-gdcm (a default dependency of "
                "fastroute: pip install python-gdcm) or the GPL-3.0 pylibjpeg-libjpeg "
                "('fastroute[libjpeg]' extra)")
# Plugin preference, best first, decided here once rather than by pydicom's registration order:
# the long-standing pure/pylibjpeg codecs first, then CharLS, then GDCM as the broad fallback.
_PLUGIN_ORDER = ("pydicom", "pylibjpeg", "pyjpegls", "gdcm", "pillow")
# GDCM is used only for decoding: its RLE encoder aborts the whole process (a C++ assert, not
# an exception) on odd-sized 8-bit images, and the other encoders cover what it would add.
_NO_ENCODE_PLUGINS = frozenset({"gdcm"})
_PLUGIN_PACKAGES = {"pydicom": "pydicom", "gdcm": "python-gdcm", "pillow": "pillow",
                    "pyjpegls": "pyjpegls"}

_J2K_MIN_SIZE = 32  # pylibjpeg-openjpeg encodes with 6 resolutions: 2**5 pixels a side
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
# VRs whose encoded bytes do not depend on byte order or on implicit/explicit VR: copied raw.
_STABLE_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
                         "ST", "TM", "UC", "UI", "UR", "UT", "OB"})
# Binary VRs pydicom keeps as bytes: they must be byte-swapped when the byte order changes.
_SWAP_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def syntax_label(uid: str) -> str:
    """``Name (UID)`` for messages: operators know names, tools grep UIDs."""
    u = UID(uid)
    return f"{u.name} ({uid})" if u.is_transfer_syntax or u.name != uid else uid


# -- codec availability ---------------------------------------------------------------------------

def _plugin_package(ts: str, plugin: str) -> str:
    """The distribution a pydicom plugin needs for ``ts`` (pylibjpeg is a front for three)."""
    if plugin == "pylibjpeg":
        if ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes:
            return "pylibjpeg-libjpeg"
        if ts in JPEG2000TransferSyntaxes:
            return "pylibjpeg-openjpeg"
        if ts == RLELossless:
            return "pylibjpeg-rle"
    return _PLUGIN_PACKAGES.get(plugin, plugin)


def _plugin_rank(plugin: str) -> int:
    return _PLUGIN_ORDER.index(plugin) if plugin in _PLUGIN_ORDER else len(_PLUGIN_ORDER)


@dataclass(frozen=True)
class Codecs:
    """The pydicom pixel plugins usable per compressed transfer syntax (UID -> plugin names).

    Native syntaxes need no codec and are always usable. ``Codecs.detect(without=...)``
    describes this host as if some packages were absent, which is how tests check the
    behaviour (and error messages) of a deployment without the optional GPL plugin.
    """

    decoders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    encoders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def can_decode(self, ts: str) -> bool:
        return ts in _NATIVE or bool(self.decoders.get(ts))

    def can_encode(self, ts: str) -> bool:
        return ts in _NATIVE or bool(self.encoders.get(ts))

    @classmethod
    def detect(cls, *, without: Collection[str] = ()) -> Codecs:
        """Ask pydicom which plugins are importable, minus packages named in ``without``."""
        drop = {name.lower() for name in without}
        tables: tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]] = ({}, {})
        for ts in AllTransferSyntaxes:
            if ts in _NATIVE:
                continue
            for table, getter in zip(tables, (get_decoder, get_encoder)):
                try:
                    codec: Any = getter(UID(ts))
                except NotImplementedError:
                    continue
                usable = tuple(sorted(
                    (p for p in codec.available_plugins
                     if _plugin_package(ts, p) not in drop
                     and (getter is get_decoder or p not in _NO_ENCODE_PLUGINS)),
                    key=_plugin_rank))
                if usable:
                    table[ts] = usable
        return cls(decoders=tables[0], encoders=tables[1])


@functools.lru_cache(maxsize=1)
def installed_codecs() -> Codecs:
    """The codecs of this process, detected once: plugins cannot appear without a restart."""
    return Codecs.detect()


def decoders_available(codecs: Codecs | None = None) -> dict[str, bool]:
    """Per transfer syntax UID: can pixel data in it be decoded here? (for diagnostics)"""
    c = codecs or installed_codecs()
    return {ts: c.can_decode(ts) for ts in AllTransferSyntaxes}


def encoders_available(codecs: Codecs | None = None) -> dict[str, bool]:
    """Per transfer syntax UID: can pixel data be encoded into it here? (for diagnostics)"""
    c = codecs or installed_codecs()
    return {ts: c.can_encode(ts) for ts in AllTransferSyntaxes}


def _install_hint(ts: str, direction: str) -> str:
    if direction == "decoder":
        try:
            get_decoder(UID(ts))
        except NotImplementedError:   # MPEG video, JPEG 2000 Part 2: no plugin would help
            return ("pydicom 3.0 has no decoder for this syntax; send it only to destinations "
                    "that accept it as is")
        if ts in JPEGLSTransferSyntaxes:
            return _JPEGLS_HINT
        if ts in JPEGTransferSyntaxes:
            return _JPEG_HINT
        if ts in JPEG2000TransferSyntaxes:
            return "pip install pylibjpeg-openjpeg"
        if ts == RLELossless:
            return "pydicom's own RLE decoder should always load: check the pydicom install"
        return ("pydicom 3.0 has no decoder for this syntax; send it only to destinations "
                "that accept it as is")
    if ts in (JPEG2000Lossless, JPEG2000):
        return "pip install pylibjpeg-openjpeg"
    if ts in JPEGLSTransferSyntaxes:
        return "pip install pyjpegls"
    if ts == RLELossless:
        return "pydicom's own RLE encoder should always load: check the pydicom install"
    return ("pydicom 3.0 has no encoder for this syntax; use compress: rle or j2k-lossless "
            "(or j2k with allow_lossy)")


def undecodable_reason(ts: str, codecs: Codecs | None = None) -> str:
    """Why an object in ``ts`` can only be offered as is ("" when it can be decoded here).

    For a destination that refuses the original, this is the real cause, with the package
    to install, rather than the destination's SOP class support."""
    c = codecs or installed_codecs()
    if c.can_decode(ts):
        return ""
    return (f"no decoder for {syntax_label(ts)} is installed, so it could not be offered in "
            f"another syntax (hint: {_install_hint(ts, 'decoder')})")


def _no_codec(ts: str, direction: str) -> NoCodecError:
    return NoCodecError(f"{syntax_label(ts)}: no {direction} installed",
                        hint=_install_hint(ts, direction))


# -- negotiation ----------------------------------------------------------------------------------

def _producible(src: str, dst: str, c: Codecs, *, allow_lossy: bool, lossy_source: bool) -> bool:
    if dst == src:
        return True
    if not c.can_decode(src) or not c.can_encode(dst):
        return False
    if dst in _LOSSY:
        return allow_lossy and not lossy_source and src not in _LOSSY
    return True


def candidates(src_ts: str, dest: DestinationConfig, *, lossy_source: bool = False,
               codecs: Codecs | None = None) -> tuple[str, ...]:
    """Transfer syntaxes to propose for an object stored in ``src_ts``, best first.

    The original leads (a router should pass data through untouched) unless ``dest.compress``
    asks for a syntax we can produce; then come lossless fallbacks we can produce, ordered
    by ``dest.prefer`` and then ``dest.transfer_syntaxes``. A non-empty
    ``dest.transfer_syntaxes`` is a whitelist. ``lossy_source`` says the object itself is
    marked lossy (LossyImageCompression '01'), which rules out lossy targets like a lossy
    source syntax does. Empty when nothing allowed can be produced.
    """
    c = codecs or installed_codecs()
    src = str(src_ts)
    named = (*dest.transfer_syntaxes, *dest.prefer)
    head: list[str] = []
    want = _COMPRESS.get(dest.compress) if dest.compress else None
    if want is not None and _producible(src, want, c, allow_lossy=dest.allow_lossy,
                                        lossy_source=lossy_source):
        head.append(want)
    head.append(src)
    pool = [*_FALLBACKS, *(ts for ts in named if ts not in _FALLBACKS)]
    tail = [ts for ts in pool
            if (ts not in _OPT_IN or ts in named)
            and _producible(src, ts, c, allow_lossy=dest.allow_lossy, lossy_source=lossy_source)]

    def rank(ts: str) -> tuple[int, int, int]:
        prefer = dest.prefer.index(ts) if ts in dest.prefer else len(dest.prefer)
        listed = (dest.transfer_syntaxes.index(ts) if ts in dest.transfer_syntaxes
                  else len(dest.transfer_syntaxes))
        return prefer, listed, pool.index(ts)

    out: list[str] = []
    for ts in [*head, *sorted(tail, key=rank)]:
        if ts not in out and (not dest.transfer_syntaxes or ts in dest.transfer_syntaxes):
            out.append(ts)
    return tuple(out)


def choose(src_ts: str, accepted: Collection[str], dest: DestinationConfig, *,
           lossy_source: bool = False, codecs: Codecs | None = None) -> str:
    """Pick the syntax to send in from those the destination accepted for this SOP class.

    The first of ``candidates`` that was accepted: the original when accepted (unless
    ``dest.compress`` applies), else the best conversion. Raises TranscodeError (NoCodecError
    when a missing plugin is the reason) naming the source syntax, what was accepted and why
    each accepted syntax cannot be produced.
    """
    c = codecs or installed_codecs()
    src = str(src_ts)
    acc = set(accepted)
    for ts in candidates(src, dest, lossy_source=lossy_source, codecs=c):
        if ts in acc:
            return ts
    where = f"destination {dest.name!r} (AE {dest.ae_title})"
    if not acc and not c.can_decode(src):
        # The planner proposed only the original (nothing else can be produced without a
        # decoder) and the destination refused it: the missing decoder is the reason.
        raise NoCodecError(
            f"cannot send {syntax_label(src)} to {where}: it does not accept "
            f"{syntax_label(src)} for this SOP class, and no decoder for {syntax_label(src)} "
            "is installed to convert it", hint=_install_hint(src, "decoder"))
    if not acc:
        raise TranscodeError(
            f"cannot send {syntax_label(src)} to {where}: it accepted no transfer syntax "
            "for this SOP class", hint="check that the destination supports this SOP class")
    listed = sorted(acc)
    why = {ts: _why_not(src, ts, dest, c) for ts in listed}
    message = (f"cannot send {syntax_label(src)} to {where}: it accepts "
               f"{', '.join(syntax_label(ts) for ts in listed)}; "
               + "; ".join(f"{syntax_label(ts)}: {text}" for ts, (_, text) in why.items()))
    if not c.can_decode(src):
        raise NoCodecError(message, hint=_install_hint(src, "decoder"))
    if all(code == "encoder" for code, _ in why.values()):
        raise NoCodecError(message, hint=_install_hint(listed[0], "encoder"))
    raise TranscodeError(message, hint="allow the original or a producible syntax in "
                         "transfer_syntaxes, or set allow_lossy if lossy images are acceptable")


def _why_not(src: str, ts: str, dest: DestinationConfig, c: Codecs) -> tuple[str, str]:
    """(reason code, words) for why accepted syntax ``ts`` is not a candidate."""
    if dest.transfer_syntaxes and ts not in dest.transfer_syntaxes:
        return "config", "not in this destination's transfer_syntaxes"
    if not c.can_decode(src):
        return "decoder", "needs the source decoded and no decoder is installed"
    if ts in _LOSSY and not dest.allow_lossy:
        return "lossy", "lossy and allow_lossy is false"
    if not c.can_encode(ts):
        return "encoder", "no encoder installed"
    if ts in _LOSSY:
        return "lossy", "lossy, and the source is already lossy"
    if ts in _OPT_IN:
        return "config", "offered only when named in transfer_syntaxes or prefer"
    return "config", "not a candidate"


# -- conversion -----------------------------------------------------------------------------------

@overload
def transcode(data: bytes, src_ts: str, dst_ts: str, *, allow_lossy: bool = ...,
              lossy_source_ok: bool = ..., codecs: Codecs | None = ...,
              j2k_ratio: float = ...) -> bytes: ...
@overload
def transcode(data: memoryview, src_ts: str, dst_ts: str, *, allow_lossy: bool = ...,
              lossy_source_ok: bool = ..., codecs: Codecs | None = ...,
              j2k_ratio: float = ...) -> bytes | memoryview: ...
def transcode(data: bytes | memoryview, src_ts: str, dst_ts: str, *, allow_lossy: bool = False,
              lossy_source_ok: bool = False, codecs: Codecs | None = None,
              j2k_ratio: float = 10.0) -> bytes | memoryview:
    """Re-encode a dataset (no preamble, no file meta) from ``src_ts`` into ``dst_ts``.

    Returns ``data`` itself when the syntaxes are equal. ``j2k_ratio`` is the target
    compression ratio for lossy JPEG 2000 (only with ``allow_lossy``). Raises NoCodecError
    when a plugin is missing and TranscodeError for anything else that makes the
    conversion impossible or not allowed; the same input always fails the same way.
    """
    if src_ts == dst_ts:
        return data
    src, dst = _known_syntax(src_ts), _known_syntax(dst_ts)
    c = codecs or installed_codecs()
    if dst in _LOSSY and not allow_lossy:
        raise TranscodeError(f"{syntax_label(src)} -> {syntax_label(dst)}: lossy compression "
                             "refused", hint="set allow_lossy: true for this destination if "
                             "lossy images are acceptable")
    if src not in _NATIVE and not c.can_decode(src):
        raise _no_codec(src, "decoder")
    if dst not in _NATIVE and not c.can_encode(dst):
        raise _no_codec(dst, "encoder")
    try:
        # Explicit VR LE and its deflated form differ only by the deflate: frame, no parse.
        if src == EXPLICIT and dst == DEFLATED:
            _check_framing(data, False, True)
            return _deflate(data)
        if src == DEFLATED and dst == EXPLICIT:
            out = _inflate(data)
            _check_framing(out, False, True)
            return out
        ds = _parse(_inflate(data) if src == DEFLATED else data, src)
        if dst in _LOSSY and not lossy_source_ok and _is_lossy(ds, src):
            raise TranscodeError(
                f"{syntax_label(src)} -> {syntax_label(dst)}: refusing to lossily re-compress "
                "pixel data that is already lossy (LossyImageCompression 01 or a lossy "
                "source syntax)", hint="send the original or a lossless syntax, or pass "
                "lossy_source_ok=True to accept generational loss")
        if src not in _NATIVE:
            _decode_all(ds, src, c)
        if dst not in _NATIVE:
            _to_encoding(ds, implicit=False, little=True)
            _encode(ds, dst, c, j2k_ratio)
        implicit, little = dst == IMPLICIT, dst != BIG_ENDIAN
        _to_encoding(ds, implicit=implicit, little=little)
        out = _write(ds, implicit=implicit, little=little)
        return _deflate(out) if dst == DEFLATED else out
    except (TranscodeError, MemoryError):
        raise
    except Exception as exc:  # pydicom/codec failures on this object: report, don't crash
        raise TranscodeError(f"{syntax_label(src)} -> {syntax_label(dst)}: "
                             f"{type(exc).__name__}: {exc}") from exc


def _known_syntax(ts: str) -> str:
    if ts not in AllTransferSyntaxes:
        raise NoCodecError(f"{syntax_label(ts)}: not a transfer syntax pydicom "
                           f"{pydicom.__version__} knows", hint="send it unchanged")
    return str(ts)


def _deflate(data: bytes | memoryview) -> bytes:
    """PS3.5 A.5: raw deflate (RFC 1951, no zlib header) of the explicit VR LE dataset."""
    z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    return z.compress(data) + z.flush()


def _inflate(data: bytes | memoryview) -> bytes:
    try:
        z = zlib.decompressobj(-15)
        out = z.decompress(data) + z.flush()
    except zlib.error:
        # Some old senders wrap the stream with a zlib/gzip header; accept that too.
        z = zlib.decompressobj(47)
        out = z.decompress(data) + z.flush()
    if not z.eof:
        raise TranscodeError("deflated dataset is truncated (no end of deflate stream)")
    return out


def _parse(data: bytes | memoryview, ts: str) -> Dataset:
    implicit, little = ts == IMPLICIT, ts != BIG_ENDIAN
    # pydicom's reader stops quietly (it only logs) at a truncation and returns what it had:
    # check the framing first so a damaged object can never lose elements in transit.
    _check_framing(data, implicit, little)
    return read_dataset(io.BytesIO(data), implicit, little)


_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                              b"UN", b"UR", b"UT", b"UV"})


class _Framing(Exception):
    pass


def _check_framing(buf: bytes | memoryview, implicit: bool, little: bool) -> None:
    """Walk element headers (not values) to the end; raise if the bytes do not frame."""
    view = memoryview(buf).cast("B")
    try:
        _scan_elements(view, 0, len(view), implicit, "<" if little else ">", in_item=False)
    except (_Framing, struct.error) as exc:
        raise TranscodeError(f"dataset is truncated or malformed: {exc}",
                             hint="the stored object is damaged; ask the sender to resend it"
                             ) from None


def _scan_elements(buf: memoryview, off: int, end: int, implicit: bool, order: str, *,
                   in_item: bool) -> int:
    while off < end:
        group, element = struct.unpack_from(order + "HH", buf, off)
        if group == 0xFFFE:
            if element == 0xE00D and in_item:  # item delimitation item
                return off + 8
            raise _Framing(f"unexpected ({group:04X},{element:04X}) at byte {off}")
        if implicit:
            (length,), off, vr = struct.unpack_from(order + "I", buf, off + 4), off + 8, b""
        else:
            vr = bytes(buf[off + 4:off + 6])
            if vr in _LONG_LENGTH_VRS:
                (length,), off = struct.unpack_from(order + "I", buf, off + 8), off + 12
            else:
                (length,), off = struct.unpack_from(order + "H", buf, off + 6), off + 8
        if length == _UNDEFINED:
            # PS3.5 6.2.2: an undefined-length UN holds implicit VR little endian items
            off = _scan_items(buf, off, end, implicit or vr == b"UN",
                              "<" if vr == b"UN" else order)
        else:
            off += length
        if off > end:
            raise _Framing(f"element ({group:04X},{element:04X}) runs past the end ({end})")
    if in_item:
        raise _Framing("an undefined-length item has no delimiter")
    return off


def _scan_items(buf: memoryview, off: int, end: int, implicit: bool, order: str) -> int:
    while True:
        group, element, length = struct.unpack_from(order + "HHI", buf, off)
        off += 8
        if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimitation item
            return off
        if (group, element) != (0xFFFE, 0xE000):
            raise _Framing(f"expected an item at byte {off - 8}, found "
                           f"({group:04X},{element:04X})")
        if length == _UNDEFINED:
            off = _scan_elements(buf, off, end, implicit, order, in_item=True)
        else:
            off += length
            if off > end:
                raise _Framing(f"an item runs past the end ({end})")


def _write(ds: Dataset, *, implicit: bool, little: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_dataset(fp, ds)
    return fp.getvalue()


def _is_encapsulated(elem: DataElement | RawDataElement) -> bool:
    if isinstance(elem, RawDataElement):
        return elem.length == _UNDEFINED
    return elem.is_undefined_length


def _first_fragment(value: bytes, limit: int = 1 << 16) -> bytes:
    """The start of the first fragment after the Basic Offset Table (enough for headers)."""
    offset = 0
    for index in range(2):
        if offset + 8 > len(value):
            return b""
        group, element, length = struct.unpack_from("<HHI", value, offset)
        if (group, element) != (0xFFFE, 0xE000):
            return b""
        offset += 8
        if index == 1:
            return value[offset:offset + min(length, limit)]
        offset += length
    return b""


def _j2k_irreversible(cs: bytes) -> bool:
    """Does the J2K main header's COD select the irreversible 9-7 wavelet (always lossy)?"""
    i = cs.find(b"\xff\x4f\xff\x51")  # SOC then SIZ; also finds a codestream in a JP2 box
    if i < 0:
        return False
    i += 2
    while i + 4 <= len(cs):
        marker = cs[i:i + 2]
        if marker == b"\xff\x52":  # COD: transform is byte 13 (0 = 9-7 irreversible)
            return i + 13 < len(cs) and cs[i + 13] == 0
        if marker == b"\xff\x90":  # SOT: main header over, no COD
            return False
        i += 2 + int.from_bytes(cs[i + 2:i + 4], "big")
    return False


def _jls_near(cs: bytes) -> int:
    """NEAR of the first JPEG-LS scan: 0 means that scan is lossless."""
    i = 2  # after SOI
    while i + 4 <= len(cs):
        if cs[i] != 0xFF:
            return 0
        if cs[i + 1] == 0xFF:  # fill byte
            i += 1
            continue
        if cs[i + 1] == 0xDA:  # SOS: Ls, Ns, Ns x (Ci, Tmi), NEAR
            ns = cs[i + 4] if i + 4 < len(cs) else 0
            at = i + 5 + 2 * ns
            return cs[at] if at < len(cs) else 0
        i += 2 + int.from_bytes(cs[i + 2:i + 4], "big")
    return 0


def _is_lossy(ds: Dataset, ts: str) -> bool:
    """Has this object's pixel data been through lossy compression (now or before)?"""
    if str(ds.get("LossyImageCompression", "") or "").strip() == "01":
        return True
    if ts in _NATIVE or ts not in _LOSSY or "PixelData" not in ds:
        return False
    if ts in (JPEG2000, JPEG2000MC, HTJ2K):
        return _j2k_irreversible(_first_fragment(ds["PixelData"].value))
    if ts == JPEGLSNearLossless:
        return _jls_near(_first_fragment(ds["PixelData"].value)) > 0
    return True  # JPEG baseline/extended (DCT) and video are always lossy


def _decode_frames(decoder: Any, plugin: str, ds: Dataset, src: str, out: np.ndarray, *,
                   as_rgb: bool) -> dict[str, Any]:
    """Decode every frame of ``ds`` with one named plugin into ``out``; the last frame's props."""
    frames, dtype = out.shape[0], out.dtype
    props: dict[str, Any] = {}
    index = -1
    if plugin == "gdcm" and src == JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8:
        source: Iterator[tuple[np.ndarray, dict[str, Any]]] = _gdcm_jpeg12_frames(ds, frames)
    else:
        source = decoder.iter_array(ds, decoding_plugin=plugin, as_rgb=as_rgb)
    for index, (arr, props) in enumerate(source):
        if index >= frames:
            raise TranscodeError(f"{syntax_label(src)}: more frames than Number of Frames")
        if arr.dtype.itemsize > dtype.itemsize and arr.size and (
                arr.max() > np.iinfo(dtype).max or arr.min() < np.iinfo(dtype).min):
            raise TranscodeError(f"{syntax_label(src)}: decoded values do not fit Bits "
                                 f"Allocated {dtype.itemsize * 8}")
        out[index] = arr.reshape(out.shape[1:])
    if index + 1 != frames:
        raise TranscodeError(f"{syntax_label(src)}: decoded {index + 1} frame(s), Number of "
                             f"Frames says {frames}")
    return props


def _gdcm_jpeg12_frames(ds: Dataset, frames: int) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """12-bit JPEG Extended frames decoded by GDCM's own image API.

    pydicom 3.0's gdcm plugin refuses 12-bit JPEG Extended outright, yet GDCM ships the 12-bit
    IJG codec and decodes it exactly as DCMTK does (tests compare with dcmdjpeg); without this
    only the GPL pylibjpeg-libjpeg would. Monochrome only: the one 12-bit use in practice.
    """
    import gdcm  # type: ignore[import-not-found,unused-ignore]
    rows, cols = int(ds.Rows), int(ds.Columns)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ValueError("GDCM's 12-bit JPEG Extended path takes monochrome images only")
    stored = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0) or 0)
    dtype = np.dtype("<i2" if signed else "<u2")
    pi = gdcm.PhotometricInterpretation.GetPIType(str(ds.PhotometricInterpretation))
    ts = gdcm.TransferSyntax.GetTSType(str(JPEGExtended12Bit))
    for frame in generate_frames(ds.PixelData, number_of_frames=frames):
        fragment = gdcm.Fragment()
        fragment.SetByteStringValue(frame)
        fragments = gdcm.SequenceOfFragments.New()
        fragments.AddFragment(fragment)
        elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
        elem.SetValue(fragments.__ref__())
        img = gdcm.Image()
        img.SetNumberOfDimensions(2)
        img.SetDimensions((cols, rows, 1))
        img.SetDataElement(elem)
        img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
        img.SetTransferSyntax(gdcm.TransferSyntax(ts))
        img.SetPixelFormat(gdcm.PixelFormat(1, 16, stored, stored - 1, signed))
        out = img.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM hands char* as str
        if len(out) != rows * cols * 2:
            raise ValueError(f"GDCM returned {len(out)} bytes for a {cols}x{rows} 16-bit frame")
        yield np.frombuffer(out, dtype=dtype).reshape(rows, cols), {}


def _decode_all(ds: Dataset, src: str, c: Codecs) -> None:
    """Decode the main Pixel Data and any encapsulated Pixel Data nested in sequences (icons):
    none of it may stay in ``src``'s encoding once the dataset is in another syntax."""
    lossy = _is_lossy(ds, src)
    _decode_nested(ds, src, c)
    if "PixelData" in ds and _is_encapsulated(ds.get_item(_PIXEL_DATA)):
        _decode_pixels(ds, src, c)
        if lossy:
            _mark_decoded_lossy(ds, src)


def _decode_nested(ds: Dataset, src: str, c: Codecs) -> None:
    for tag in list(ds.keys()):
        if ds.get_item(tag).VR == "SQ":
            for item in ds[tag].value:  # ds[tag] parses a sequence still in raw form
                _decode_nested(item, src, c)
                if "PixelData" in item and _is_encapsulated(item.get_item(_PIXEL_DATA)):
                    _decode_pixels(item, src, c)


def _decode_pixels(ds: Dataset, src: str, c: Codecs) -> None:
    """Replace encapsulated Pixel Data with native little endian Pixel Data.

    Frames are written straight into one preallocated buffer in the dataset's own container
    size: pydicom's ``decompress`` would instead use the J2K/JPEG-LS precision as container,
    which is wrong when Bits Allocated is larger than the codestream precision.
    """
    decoder: Any = get_decoder(UID(src))
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if bits not in (8, 16, 32, 64):
        raise TranscodeError(f"{syntax_label(src)}: cannot decode Bits Allocated {bits}")
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    count = frames * rows * cols * spp
    nbytes = count * dtype.itemsize
    buf = bytearray(nbytes + nbytes % 2)
    out = np.frombuffer(buf, dtype=dtype, count=count).reshape(frames, rows, cols, spp)
    # JPEG baseline/extended YCbCr is converted to RGB (the data is lossy anyway, and RGB is
    # what most native-only receivers render right); every other codec keeps its samples
    # exactly, so a lossless source stays lossless.
    as_rgb = src in (JPEGBaseline8Bit, JPEGExtended12Bit)
    props: dict[str, Any] = {}
    failures: list[str] = []
    for plugin in c.decoders[src]:  # in _PLUGIN_ORDER; the next one gets a stream one refuses
        try:
            props = _decode_frames(decoder, plugin, ds, src, out, as_rgb=as_rgb)
            break
        except TranscodeError:
            raise
        except Exception as exc:  # plugins raise anything from RuntimeError to ValueError
            failures.append(f"{plugin}: {exc}")
    else:
        message = (f"{syntax_label(src)}: pixel data could not be decoded ("
                   + "; ".join(failures) + ")")
        if src == JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8:
            # Only GDCM (driven directly, above) and the GPL libjpeg decode 12-bit JPEG Extended.
            raise NoCodecError(f"{syntax_label(src)}: 12-bit JPEG Extended needs a decoder "
                               "that is not installed", hint=_JPEG12_HINT)
        raise TranscodeError(message)
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]
    # bytes, not bytearray: pydicom would take a bytearray for a multi-valued element.
    ds[_PIXEL_DATA] = DataElement(_PIXEL_DATA, "OW" if bits > 8 else "OB", bytes(buf))
    pi = str(props.get("photometric_interpretation", ds.PhotometricInterpretation))
    # The frames now hold one full sample set per pixel: 4:2:2 subsampling is gone.
    ds.PhotometricInterpretation = "YBR_FULL" if pi == "YBR_FULL_422" else pi
    if spp > 1:
        ds.PlanarConfiguration = 0  # decoders return colour-by-pixel


def _mark_decoded_lossy(ds: Dataset, src: str) -> None:
    """Keep the lossy history the source syntax carried implicitly (PS3.3 C.7.6.1.1.5)."""
    if str(ds.get("LossyImageCompression", "") or "").strip() == "01":
        return
    ds.LossyImageCompression = "01"
    if ("LossyImageCompressionMethod" not in ds and "LossyImageCompressionRatio" not in ds
            and src in _LOSSY_METHOD):
        ds.LossyImageCompressionMethod = _LOSSY_METHOD[src]


def _encode(ds: Dataset, dst: str, c: Codecs, j2k_ratio: float) -> None:
    """Replace native Pixel Data (little endian) with encapsulated ``dst`` frames."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise TranscodeError(f"{syntax_label(dst)}: float pixel data cannot be encapsulated")
        return  # no pixel data: the dataset is valid as is in any explicit LE based syntax
    rows, cols = int(ds.Rows), int(ds.Columns)
    if dst in JPEG2000TransferSyntaxes and min(rows, cols) < _J2K_MIN_SIZE:
        raise TranscodeError(
            f"{syntax_label(dst)}: cannot encode a {cols}x{rows} image: pylibjpeg-openjpeg "
            f"always uses 6 resolution levels, so both sides must be at least {_J2K_MIN_SIZE}",
            hint="send such images uncompressed or RLE")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        # No encoder takes 4:2:2 native data; its full-resolution form is the same image.
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        size = frames * rows * cols * 2 * int(ds.BitsAllocated) // 8
        full = expand_ybr422(ds.PixelData[:size], int(ds.BitsAllocated))
        ds[_PIXEL_DATA] = DataElement(_PIXEL_DATA, ds[_PIXEL_DATA].VR, full)
        ds.PhotometricInterpretation = "YBR_FULL"
    elif spp > 1 and int(ds.get("PlanarConfiguration", 0) or 0) == 1:
        _interleave(ds, rows, cols, spp)
    encoder: Any = get_encoder(UID(dst))
    plugin = c.encoders[dst][0]  # named: pydicom's own order would pick GDCM first
    options: dict[str, Any] = {}
    if dst in (JPEG2000, HTJ2K):
        options["j2k_cr"] = [float(j2k_ratio)]
    encoded_frames = [bytes(f) for f in encoder.iter_encode(ds, encoding_plugin=plugin,
                                                               **options)]
    native = (int(ds.get("NumberOfFrames", 1) or 1) * rows * cols * spp
              * int(ds.BitsAllocated) // 8)
    encoded = sum(len(f) for f in encoded_frames)
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]
    if encoded + 8 * len(encoded_frames) > 2**32 - 2:  # offsets overflow the Basic Offset Table
        pixel_data, table, lengths = encapsulate_extended(encoded_frames)
        ds.ExtendedOffsetTable = table
        ds.ExtendedOffsetTableLengths = lengths
    else:
        pixel_data = encapsulate(encoded_frames, has_bot=True)
    ds[_PIXEL_DATA] = DataElement(_PIXEL_DATA, "OB", pixel_data, is_undefined_length=True)
    if spp > 1 and dst != RLELossless:
        ds.PlanarConfiguration = 0  # PS3.5 8.2.1/8.2.4: irrelevant to JPEG/J2K, shall be 0
    if dst in _LOSSY:
        ratios = _values(ds.get("LossyImageCompressionRatio"))
        methods = _values(ds.get("LossyImageCompressionMethod"))
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = [*ratios, DSfloat(f"{native / max(encoded, 1):.2f}")]
        ds.LossyImageCompressionMethod = [*methods, _LOSSY_METHOD[dst]]


def _interleave(ds: Dataset, rows: int, cols: int, spp: int) -> None:
    """Planar (colour-by-plane) native data -> colour-by-pixel, Planar Configuration 0.

    pydicom 3.0's encoders read native frames as colour-by-pixel whatever Planar
    Configuration says, so planar data would be encoded scrambled.
    """
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    itemsize = int(ds.BitsAllocated) // 8
    count = frames * spp * rows * cols
    planes = np.frombuffer(ds.PixelData, dtype=f"u{itemsize}", count=count)
    pixels = planes.reshape(frames, spp, rows, cols).transpose(0, 2, 3, 1)
    ds[_PIXEL_DATA] = DataElement(_PIXEL_DATA, ds[_PIXEL_DATA].VR, pixels.tobytes())
    ds.PlanarConfiguration = 0


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _to_encoding(ds: Dataset, *, implicit: bool, little: bool,
                 ancestors: tuple[Dataset, ...] = ()) -> None:
    """Make every element of ``ds`` (recursively) writable in the target encoding.

    Elements whose bytes are the same in both encodings (text, OB) stay raw with their VR
    resolved; only numbers and word-oriented binary values are decoded, byte-swapped where
    the byte order changes, and re-encoded by pydicom's writer.
    """
    src_implicit, src_little = ds.original_encoding
    if src_implicit is None or src_little is None:
        raise TranscodeError("dataset has no recorded encoding")
    if (src_implicit, src_little) == (implicit, little):
        return
    flip = src_little != little
    chain = [ds, *ancestors]
    charset = ds.original_character_set or ds._character_set
    for tag in list(ds.keys()):
        elem: DataElement | RawDataElement = ds.get_item(tag)
        if (isinstance(elem, RawDataElement) and elem.length != _UNDEFINED
                and tag != _PIXEL_DATA):  # native Pixel Data: swapped by sample size below
            data: dict[str, Any] = {}
            _pydicom_hooks.raw_element_vr(elem, data, encoding=charset, ds=ds)
            vr = data["VR"]
            if vr in _STABLE_VRS or (vr == "UN" and not flip):
                if vr != elem.VR:
                    # Dataset.__setitem__ would convert private raw elements (decoding their
                    # text); storing the raw tuple keeps the bytes untouched.
                    ds._dict[tag] = elem._replace(VR=vr)
                continue
        converted = ds[tag]
        if converted.VR == "SQ":
            for item in converted.value:
                _to_encoding(item, implicit=implicit, little=little, ancestors=tuple(chain))
            continue
        if " or " in converted.VR:
            fixed = correct_ambiguous_vr_element(converted, ds, src_little, chain)
            converted = fixed if isinstance(fixed, DataElement) else ds[tag]
        if tag == _PIXEL_DATA and not converted.is_undefined_length:
            _native_pixel_data(ds, converted, src_little, flip)
        elif flip and converted.VR in _SWAP_SIZE and converted.value:
            converted.value = _swap(converted.value, _SWAP_SIZE[converted.VR])
    ds.set_original_encoding(implicit, little, ds.original_character_set)


def _native_pixel_data(ds: Dataset, elem: DataElement, src_little: bool, flip: bool) -> None:
    """Byte-swap native Pixel Data by sample size, as pydicom reads it, and set OB/OW.

    Big endian data is swapped per Bits Allocated whatever its VR says (some writers use
    OB for 16-bit data); 8-bit data encoded as OW in big endian is swapped pairwise.
    """
    bits = int(ds.get("BitsAllocated", 8) or 8)
    if flip and elem.value:
        if bits > 8:
            elem.value = _swap(elem.value, bits // 8)
        elif bits == 8 and not src_little and elem.VR == "OW":
            elem.value = _swap(elem.value, 2)
    elem.VR = "OW" if bits > 8 else "OB"


def _swap(value: bytes, size: int) -> bytes:
    whole = len(value) // size * size
    arr = np.frombuffer(value, dtype=f"u{size}", count=whole // size).byteswap()
    return arr.tobytes() + bytes(value[whole:])
