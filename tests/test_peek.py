"""The tag peek: both twins (fastroute.dicom.peek, fastroute.dicom._peek) against each other and pydicom.

Every behaviour runs on both twins; the native one is skipped only when it is not built and
FASTROUTE_REQUIRE_EXTENSIONS is not 1. Outcomes are compared whole: the same dict, or a
PeekError with the same message.
"""
from __future__ import annotations

import functools
import glob
import os
import struct
import subprocess
import sys
import warnings
import zlib
from io import BytesIO
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble, read_sequence
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

import fastroute.dicom.peek as py_twin
from fastroute.dicom.attrs import tags_for
from fastroute.errors import PeekError

try:
    import fastroute.dicom._peek as native_twin
except ImportError:  # not built
    native_twin = None  # type: ignore[assignment]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRE = os.environ.get("FASTROUTE_REQUIRE_EXTENSIONS") == "1"
ENCODINGS = [(True, True), (False, True), (False, False)]
ENC_IDS = ["implicit-le", "explicit-le", "explicit-be"]
ROUTING = ("Modality", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
           "SOPClassUID", "PatientID", "AccessionNumber", "StudyDescription", "PatientName",
           "InstitutionName", "BodyPartExamined")
ROUTING_TAGS = tags_for(ROUTING)
PIXEL_DATA = 0x7FE00010


def _twins() -> list[Any]:
    skip = pytest.mark.skipif(native_twin is None and not REQUIRE,
                              reason="native twin not built (python setup.py build_ext --inplace)")
    return [pytest.param("python", id="python"), pytest.param("native", id="native", marks=skip)]


@pytest.fixture(params=_twins())
def twin(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "python":
        return py_twin
    if native_twin is None:
        pytest.fail("FASTROUTE_REQUIRE_EXTENSIONS=1 but fastroute.dicom._peek is not importable")
    return native_twin


def both() -> list[ModuleType]:
    """The twins for property tests, which compare them within one example."""
    return [py_twin] + ([native_twin] if native_twin is not None else [])


def outcome(mod: ModuleType, *args: Any) -> Any:
    """A twin's result, or ('PeekError', message); any other exception propagates."""
    try:
        return mod.peek(*args)
    except PeekError as exc:
        assert type(exc) is PeekError
        return ("PeekError", str(exc))


def same_outcome(*args: Any) -> Any:
    results = [outcome(mod, *args) for mod in both()]
    assert all(r == results[0] for r in results), results
    return results[0]


# --- a tiny independent encoder for hand-built cases --------------------------------------

LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEF = 0xFFFFFFFF


def el(tag: int, vr: str, value: bytes | None, imp: bool = False, le: bool = True,
       body: bytes = b"") -> bytes:
    """One element; `value` None means undefined length followed by `body` (no delimiter)."""
    e = "<" if le else ">"
    length = UNDEF if value is None else len(value)
    head = struct.pack(e + "HH", tag >> 16, tag & 0xFFFF)
    if imp or tag >> 16 == 0xFFFE:
        head += struct.pack(e + "I", length)
    elif vr in LONG:
        head += vr.encode() + b"\0\0" + struct.pack(e + "I", length)
    else:
        head += vr.encode() + struct.pack(e + "H", length)
    return head + (body if value is None else value)


def item(body: bytes, undefined: bool, le: bool = True) -> bytes:
    if undefined:
        return el(0xFFFEE000, "", None, le=le, body=body) + el(0xFFFEE00D, "", b"", le=le)
    return el(0xFFFEE000, "", body, le=le)


def seq(tag: int, items: list[bytes], undefined: bool, imp: bool = False, le: bool = True,
        vr: str = "SQ") -> bytes:
    body = b"".join(items)
    if undefined:
        return el(tag, vr, None, imp, le, body) + el(0xFFFEE0DD, "", b"", le=le)
    return el(tag, vr, body, imp, le)


def simple(imp: bool, le: bool) -> bytes:
    return (el(0x00080005, "CS", b"ISO_IR 100", imp, le)
            + el(0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.2\0", imp, le)
            + el(0x00080060, "CS", b"CT", imp, le)
            + el(0x00100010, "PN", b"Doe^Jane", imp, le)
            + el(0x00100020, "LO", b"P1", imp, le))


# --- basic behaviour -----------------------------------------------------------------------

@pytest.mark.parametrize(("imp", "le"), ENCODINGS, ids=ENC_IDS)
def test_reads_requested_tags(twin: ModuleType, imp: bool, le: bool) -> None:
    got = twin.peek(simple(imp, le), (0x00080060, 0x00100020, 0x00200010), imp, le)
    vr = ("", "") if imp else ("CS", "LO")
    assert got == {0x00080060: (vr[0], b"CT"), 0x00100020: (vr[1], b"P1")}


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_bytes_like(twin: ModuleType, kind: type) -> None:
    buf = simple(False, True)
    assert twin.peek(kind(buf), (0x00100010,), False, True) == {0x00100010: ("PN", b"Doe^Jane")}
    view = memoryview(b"\xff" * 3 + buf)[3:]
    assert twin.peek(view, (0x00100010,), False, True) == {0x00100010: ("PN", b"Doe^Jane")}
    wide = memoryview(bytearray(buf + b"\0" * (len(buf) % 2))).cast("H")
    assert twin.peek(wide, (0x00100010,), False, True) == {0x00100010: ("PN", b"Doe^Jane")}


def test_empty_and_unsorted_tags(twin: ModuleType) -> None:
    buf = simple(True, True)
    assert twin.peek(buf, (), True, True) == {}
    assert twin.peek(b"", (0x00100010,), True, True) == {}
    assert twin.peek(buf, [0x00100020, 0x00080060], True, True) == twin.peek(
        buf, (0x00080060, 0x00100020), True, True)


@pytest.mark.parametrize("bad", [-1, 1 << 32, "00100010", 1.5])
def test_rejects_bad_tags(twin: ModuleType, bad: Any) -> None:
    with pytest.raises(ValueError, match="not a 32-bit DICOM tag"):
        twin.peek(simple(True, True), (0x00100010, bad), True, True)


def test_rejects_non_buffer(twin: ModuleType) -> None:
    with pytest.raises(TypeError):
        twin.peek("not bytes", (0x00100010,), True, True)


@pytest.mark.parametrize(("imp", "le"), ENCODINGS, ids=ENC_IDS)
def test_long_and_short_length_vrs(twin: ModuleType, imp: bool, le: bool) -> None:
    buf = b"".join(el(0x00090010 + i, vr, b"x" * (i + 1), imp, le)
                   for i, vr in enumerate(["OB", "UT", "LO", "UN", "SH", "OW", "UC", "ST",
                                           "UR", "OD", "SV", "UV", "OL", "OV", "OF"]))
    tags = tuple(range(0x00090010, 0x00090010 + 15))
    got = twin.peek(buf, tags, imp, le)
    assert [v for _, v in got.values()] == [b"x" * (i + 1) for i in range(15)]


def test_unknown_alpha_vr_has_short_length(twin: ModuleType) -> None:
    buf = el(0x00090010, "XX", b"abc") + el(0x00090011, "LO", b"ok")
    assert twin.peek(buf, (0x00090011,), False, True) == {0x00090011: ("LO", b"ok")}


def test_private_tags_and_odd_lengths(twin: ModuleType) -> None:
    buf = (el(0x00090010, "LO", b"ACME 1.0") + el(0x00091001, "OB", b"\x01\x02\x03")
           + el(0x00091002, "LO", b"odd") + el(0x00100020, "LO", b"P1"))
    got = twin.peek(buf, (0x00091001, 0x00091002, 0x00100020), False, True)
    assert got == {0x00091001: ("OB", b"\x01\x02\x03"), 0x00091002: ("LO", b"odd"),
                   0x00100020: ("LO", b"P1")}


def test_stops_after_largest_tag(twin: ModuleType) -> None:
    """Garbage after the largest requested tag is never read: Pixel Data is not touched."""
    buf = simple(False, True) + el(PIXEL_DATA, "OW", b"\0" * 16)[:12] + b"\xde\xad"
    assert twin.peek(buf, (0x00100010, 0x00280010), False, True) == {
        0x00100010: ("PN", b"Doe^Jane")}
    tail = b"\x11\x00\x10\x00"  # (0011,0010) tag only: larger than requested, so stop
    assert twin.peek(simple(True, True) + tail, (0x00100030,), True, True) == {}
    # once the largest tag is read the next header is not needed either
    assert twin.peek(simple(True, True) + b"\x11", (0x00100020,), True, True) == {
        0x00100020: ("", b"P1")}


def test_leading_file_meta_is_explicit_le(twin: ModuleType) -> None:
    meta = (el(0x00020000, "UL", struct.pack("<I", 30)) + el(0x00020001, "OB", b"\0\1")
            + el(0x00020010, "UI", b"1.2.840.10008.1.2.2\0"))
    for imp, le in ENCODINGS:
        got = twin.peek(meta + simple(imp, le), (0x00020010, 0x00100020), imp, le)
        assert got == {0x00020010: ("UI", b"1.2.840.10008.1.2.2\0"),
                       0x00100020: ("" if imp else "LO", b"P1")}


# --- sequences and undefined lengths ----------------------------------------------------

def nested(imp: bool, le: bool, undefined: bool) -> bytes:
    """SQ > item > SQ > item, lengths all undefined or all defined, then (0010,0020)."""
    code = el(0x00080100, "SH", b"X1", imp, le) + el(0x00080102, "SH", b"DCM ", imp, le)
    inner = seq(0x0040A170, [item(code, undefined, le), item(code, not undefined, le)],
                undefined, imp, le)
    ref = el(0x00081150, "UI", b"1.2\0", imp, le) + inner
    outer = seq(0x00081140, [item(ref, undefined, le), item(b"", undefined, le)], undefined,
                imp, le)
    return (el(0x00080060, "CS", b"MR", imp, le) + outer + el(0x00100010, "PN", b"A^B", imp, le)
            + el(0x00100020, "LO", b"P2", imp, le))


@pytest.mark.parametrize("undefined", [True, False], ids=["undefined", "defined"])
@pytest.mark.parametrize(("imp", "le"), ENCODINGS, ids=ENC_IDS)
def test_skips_nested_sequences(twin: ModuleType, imp: bool, le: bool, undefined: bool) -> None:
    buf = nested(imp, le, undefined)
    got = twin.peek(buf, (0x00080060, 0x00100020), imp, le)
    assert {t: v for t, (_, v) in got.items()} == {0x00080060: b"MR", 0x00100020: b"P2"}


@pytest.mark.parametrize("undefined", [True, False], ids=["undefined", "defined"])
@pytest.mark.parametrize(("imp", "le"), ENCODINGS, ids=ENC_IDS)
def test_requested_sequence_returns_raw_value(twin: ModuleType, imp: bool, le: bool,
                                              undefined: bool) -> None:
    buf = nested(imp, le, undefined)
    vr, value = twin.peek(buf, (0x00081140,), imp, le)[0x00081140]
    assert vr == ("" if imp else "SQ")
    start = buf.index(b"\xfe\xff\x00\xe0" if le else b"\xff\xfe\xe0\x00")
    end = buf.index(el(0x00100010, "PN", b"A^B", imp, le)) - (8 if undefined else 0)
    assert value == buf[start:end]
    parsed = read_sequence(BytesIO(value), imp, le, len(value), "iso8859")
    assert len(parsed) == 2 and parsed[0].ReferencedSOPClassUID == "1.2"


@pytest.mark.parametrize("le", [True, False], ids=["le", "be"])
def test_un_with_undefined_length_is_implicit_le(twin: ModuleType, le: bool) -> None:
    """PS3.5 6.2.2: a UN of undefined length holds an Implicit VR Little Endian sequence."""
    inner = seq(0x00091011, [item(el(0x00091012, "", b"yyyy", True), True)], True, imp=True)
    body = el(0x00080100, "", b"XY", True) + inner
    un = seq(0x00091010, [item(body, True), item(b"\x08\0\0\1\0\0\0\0", False)], True,
             imp=True)
    un = el(0x00091010, "UN", None, False, le, un[8:])  # explicit header, implicit-LE body
    buf = el(0x00090010, "LO", b"ACME", False, le) + un + el(0x00100020, "LO", b"P", False, le)
    got = twin.peek(buf, (0x00091010, 0x00100020), False, le)
    assert got[0x00100020] == ("LO", b"P")
    assert got[0x00091010][1] == un[12:-8]


def test_encapsulated_pixel_data(twin: ModuleType) -> None:
    frags = item(b"", False) + item(b"\xfe\xff\xdd\xe0\0\0\0\0 fake delimiter", False)
    pixel = el(PIXEL_DATA, "OB", None, body=frags) + el(0xFFFEE0DD, "", b"")
    buf = simple(False, True) + pixel + el(0xFFFCFFFC, "OB", b"\0\0")
    got = twin.peek(buf, (PIXEL_DATA, 0xFFFCFFFC), False, True)
    assert got == {PIXEL_DATA: ("OB", frags), 0xFFFCFFFC: ("OB", b"\0\0")}


def test_implicit_items_inside_explicit_dataset(twin: ModuleType) -> None:
    """Some writers switch to implicit VR inside sequences; pydicom reads them, so do we."""
    body = el(0x00081150, "", b"1.2\0", True) + el(0x00081155, "", b"1.2.3\0", True)
    sq = seq(0x00081140, [item(body, True)], True)
    buf = sq + el(0x00100020, "LO", b"P3") + el(0x00100021, "", b"xyz", True)
    got = twin.peek(buf, (0x00100020, 0x00100021), False, True)
    assert got == {0x00100020: ("LO", b"P3"), 0x00100021: ("", b"xyz")}
    ref = read_dataset(BytesIO(buf), False, True)
    assert ref.get_item(0x00100021).value == b"xyz"


# --- truncated and malformed input --------------------------------------------------------

def test_truncated_header_and_value(twin: ModuleType) -> None:
    buf = simple(False, True)
    with pytest.raises(PeekError, match=r"header at offset 0: need 4 bytes, 3 left"):
        twin.peek(buf[:3], (0x00100020,), False, True)
    with pytest.raises(PeekError, match=r"truncated value of \(0010,0020\) at offset "
                                        rf"{len(buf) - 2}: length 2 but only 1 bytes left"):
        twin.peek(buf[:-1], (0x00100020,), False, True)
    with pytest.raises(PeekError, match="need 12 bytes"):
        twin.peek(el(0x00090010, "OB", b"abc")[:10], (0x00090010,), False, True)


def test_malformed_sequences(twin: ModuleType) -> None:
    bad_item = el(0x00081140, "SQ", None, body=el(0x00100010, "PN", b"AB"))
    with pytest.raises(PeekError, match=r"expected an item .* offset 12, found \(0010,0010\)"):
        twin.peek(bad_item, (0x00100020,), False, True)
    stray = el(0x00081140, "SQ", None, body=el(0xFFFEE000, "", None) + el(0xFFFEE0DD, "", b""))
    with pytest.raises(PeekError, match=r"unexpected \(FFFE,E0DD\) inside a sequence item"):
        twin.peek(stray, (0x00100020,), False, True)
    huge = el(0x00100010, "UT", b"")[:8] + struct.pack("<I", 0xFFFFFFFE)
    with pytest.raises(PeekError, match="length 4294967294"):
        twin.peek(huge, (0x00100020,), False, True)


def test_nesting_limit(twin: ModuleType) -> None:
    depth = twin.MAX_DEPTH
    body = b""
    for _ in range(depth):
        body = seq(0x00081140, [item(body, True)], True)
    assert twin.peek(body + el(0x00100020, "LO", b"ok"), (0x00100020,), False, True)
    body = seq(0x00081140, [item(body, True)], True)
    with pytest.raises(PeekError, match=f"deeper than {depth} levels"):
        twin.peek(body, (0x00100020,), False, True)


def test_peek_prefix(twin: ModuleType) -> None:
    buf = nested(False, True, True)
    tags = (0x00080060, 0x00100020)
    assert twin.peek_prefix(buf, tags, False, True) == (
        {0x00080060: ("CS", b"MR"), 0x00100020: ("LO", b"P2")}, True)
    assert twin.peek_prefix(buf + b"\xff", tags, False, True)[1] is True
    assert twin.peek_prefix(buf, (0x00100030,), False, True) == ({}, False)
    for cut in range(len(buf)):
        found, complete = twin.peek_prefix(buf[:cut], tags, False, True)
        assert not complete and found == ({0x00080060: ("CS", b"MR")} if cut >= 10 else {})
    with pytest.raises(PeekError, match="expected an item"):
        twin.peek_prefix(el(0x00081140, "SQ", None, body=b"\x10\0\x10\0AB\2\0AB"),
                         tags, False, True)


# --- the implementation chooser ------------------------------------------------------------

STALE = "import types; sys.modules['fastroute.dicom._peek'] = types.ModuleType('fastroute.dicom._peek')\n"


def _chooser(env: dict[str, str], block_native: bool = False,
             stale: bool = False) -> subprocess.CompletedProcess[str]:
    code = ("import sys\n" + ("sys.modules['fastroute.dicom._peek'] = None\n" if block_native else "")
            + (STALE if stale else "")
            + "import fastroute.native as n\nprint(n.PEEK_IMPL, n.implementations(),"
            " n.peek.__module__)")
    full = {k: v for k, v in os.environ.items() if not k.startswith("FASTROUTE_")}
    full.update(env, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full, text=True,
                          capture_output=True, timeout=60)


def test_no_extensions_env_forces_python() -> None:
    run = _chooser({"FASTROUTE_NO_EXTENSIONS": "1", "FASTROUTE_REQUIRE_EXTENSIONS": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "python" and "{'fastroute.dicom.peek': 'python'}" in run.stdout


def test_require_extensions_env_fails_without_native() -> None:
    run = _chooser({"FASTROUTE_REQUIRE_EXTENSIONS": "1"}, block_native=True)
    assert run.returncode != 0 and "FASTROUTE_REQUIRE_EXTENSIONS=1" in run.stderr
    run = _chooser({}, block_native=True)
    assert run.returncode == 0 and run.stdout.startswith("python"), run.stderr
    # a native module built from an older .pyx counts as missing
    run = _chooser({}, stale=True)
    assert run.returncode == 0 and run.stdout.startswith("python"), run.stderr
    run = _chooser({"FASTROUTE_REQUIRE_EXTENSIONS": "1"}, stale=True)
    assert run.returncode != 0 and "stale build lacks" in run.stderr


def test_native_loaded_when_required() -> None:
    """Fails the CI job that builds the extension if fastroute.native fell back anyway."""
    if not REQUIRE or os.environ.get("FASTROUTE_NO_EXTENSIONS") == "1":
        pytest.skip("FASTROUTE_REQUIRE_EXTENSIONS=1 not set")
    import fastroute.native as native
    assert native.PEEK_IMPL == "native"
    assert native.implementations()["fastroute.dicom.peek"] == "native"
    assert native_twin is not None and native.peek is native_twin.peek


def test_native_chosen_by_default_when_built() -> None:
    run = _chooser({})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == ("native" if native_twin is not None else "python")


# --- real files ----------------------------------------------------------------------------

def _data_store_files() -> list[str]:
    try:
        import data_store
    except ImportError:
        return []
    root = os.path.join(os.path.dirname(data_store.__file__), "data")
    return sorted(f for f in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                  if os.path.isfile(f))


REAL_FILES = sorted(f for f in set(get_testdata_files() + get_charset_files()
                                   + _data_store_files())
                    if os.path.isfile(f) and not f.endswith((".txt", ".json", ".dump", ".gz",
                                                             ".icc", "README")))
BY_NAME = {os.path.basename(f): f for f in REAL_FILES}


@functools.lru_cache(maxsize=None)
def real_dataset(path: str) -> tuple[bytes, bool, bool, Dataset] | None:
    """(dataset bytes after any file meta, inflated; implicit; little; pydicom's reading)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, stop_before_pixels=True, force=path.endswith(".dcm"))
        except Exception:
            return None  # not DICOM, or broken beyond pydicom's tolerance
        with open(path, "rb") as fp:
            read_preamble(fp, True)
            meta = _read_file_meta_info(fp)
            data = fp.read()
    # pydicom reads by what the bytes are when they contradict the transfer syntax
    raws = raw_elements(ds)
    imp, le = (raws[0].is_implicit_VR, raws[0].is_little_endian) if raws else (
        ds.original_encoding)
    if imp is None or le is None:
        return None
    if meta.get("TransferSyntaxUID") == "1.2.840.10008.1.2.1.99":
        data = zlib.decompress(data, -15)
    return data, imp, le, ds


def raw_values(ds: Dataset, tags: tuple[int, ...]) -> dict[int, bytes]:
    out = {}
    for tag in tags:
        if tag in ds:
            value = ds.get_item(tag).value or b""  # pydicom gives None or '' when empty
            assert isinstance(value, bytes)
            out[tag] = value
    return out


@pytest.mark.parametrize("path", REAL_FILES, ids=os.path.basename)
def test_real_files_match_pydicom(twin: ModuleType, path: str) -> None:
    real = real_dataset(path)
    if real is None:
        pytest.skip("pydicom cannot read it either")
    data, imp, le, ds = real
    got = twin.peek(data, ROUTING_TAGS, imp, le)
    assert {t: v for t, (_, v) in got.items()} == raw_values(ds, ROUTING_TAGS)
    if not imp:
        # (pydicom swaps UN for the dictionary VR of empty values; compare the rest)
        assert all(vr == ds.get_item(t).VR for t, (vr, v) in got.items() if v)


def small_real() -> list[tuple[bytes, bool, bool, Dataset]]:
    out = []
    for name in ("rtplan.dcm", "MR_small.dcm", "MR_small_bigendian.dcm",
                 "SC_rgb_rle.dcm", "emri_small_jpeg_2k_lossless.dcm", "image_dfl.dcm"):
        real = real_dataset(BY_NAME[name])
        assert real is not None
        out.append(real)
    return out


def raw_elements(ds: Dataset) -> list[RawDataElement]:
    """The elements pydicom left undecoded (all but undefined-length sequences)."""
    out: list[RawDataElement] = []
    for tag in ds.keys():
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            out.append(elem)
    return out


def element_ends(data: bytes, imp: bool, le: bool) -> dict[int, int]:
    """pydicom's offset just past each defined-length top-level element."""
    return {e.tag: e.value_tell + e.length
            for e in raw_elements(read_dataset(BytesIO(data), imp, le)) if e.length != UNDEF}


@pytest.mark.timeout(300)
def test_every_prefix_is_right_or_peek_error() -> None:
    """Each prefix yields exactly the requested tags it fully holds, or PeekError."""
    for data, imp, le, ds in small_real():
        ends = element_ends(data, imp, le)
        want = tuple(t for t in ROUTING_TAGS if t in ends)
        full = raw_values(ds, want)
        stop = min(len(data), max(ends[t] for t in want) + 64)
        for cut in range(stop + 1):
            got = same_outcome(data[:cut], want, imp, le)
            if isinstance(got, tuple):  # PeekError
                continue
            assert {t: v for t, (_, v) in got.items()} == {
                t: v for t, v in full.items() if ends[t] <= cut}
            for mod in both():
                found, complete = mod.peek_prefix(data[:cut], want, imp, le)
                assert found == got and complete == (max(want) in found)
        if len(data) > 10_000:
            continue
        # a full walk: through every sequence and the (encapsulated) Pixel Data
        tags = (0x00100020, PIXEL_DATA, 0xFFFCFFFC)
        full = same_outcome(data, tags, imp, le)
        for cut in range(len(data)):
            got = same_outcome(data[:cut], tags, imp, le)
            if isinstance(got, dict):
                assert all(full[t] == v for t, v in got.items())
                assert all(t in got for t, end in ends.items() if t in full and end <= cut)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_prefixes_with_pixel_data(data: st.DataObject) -> None:
    """Prefixes anywhere in a dataset, asking for tags behind sequences and Pixel Data."""
    buf, imp, le, _ = data.draw(st.sampled_from(small_real()))
    cut = data.draw(st.integers(0, len(buf)))
    tags = (0x00100020, PIXEL_DATA, 0xFFFCFFFC)
    got = same_outcome(buf[:cut], tags, imp, le)
    full = same_outcome(buf, tags, imp, le)
    if isinstance(got, dict):
        assert all(full[t] == v for t, v in got.items())


@pytest.mark.timeout(300)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_byte_flips_never_crash(data: st.DataObject) -> None:
    buf, imp, le, _ = data.draw(st.sampled_from(small_real()))
    flipped = bytearray(buf[:data.draw(st.sampled_from([len(buf), 4096, 1024]))])
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(flipped) - 1))
        flipped[pos] ^= data.draw(st.integers(1, 255))
    tags = data.draw(st.sampled_from([ROUTING_TAGS, (PIXEL_DATA,), (0xFFFFFFFF,)]))
    same_outcome(bytes(flipped), tags, imp, le)
    for mod in both():
        try:
            mod.peek_prefix(bytes(flipped), tags, imp, le)
        except PeekError:
            pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(ENCODINGS),
       st.sampled_from([ROUTING_TAGS, (0xFFFFFFFF,), (0x00000000, 0xFFFEE0DD)]))
def test_random_bytes_never_crash(buf: bytes, enc: tuple[bool, bool],
                                  tags: tuple[int, ...]) -> None:
    same_outcome(buf, tags, *enc)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x00081140, 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD,
                                            0x00100010]),
                          st.sampled_from([0, 2, 8, UNDEF])), max_size=40),
       st.sampled_from(ENCODINGS))
def test_random_delimiter_soup(parts: list[tuple[int, int]], enc: tuple[bool, bool]) -> None:
    """Well-formed headers in hostile orders: the walk's state machine, not its bounds."""
    imp, le = enc
    buf = b"".join(el(tag, "SQ", None, imp, le)[:-4] + struct.pack("<I" if le else ">I", length)
                   + b"\0" * (length % 9) for tag, length in parts)
    same_outcome(buf, (0x00100020,), imp, le)


# --- generated datasets against pydicom ----------------------------------------------------

UID = st.from_regex(r"[1-9][0-9]{0,5}(\.(0|[1-9][0-9]{0,8})){1,8}", fullmatch=True)
TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
               max_size=24)
LATIN1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40)
CODE = st.from_regex(r"[A-Z0-9_ ]{0,16}", fullmatch=True)
US = st.integers(0, 0xFFFF)
SIMPLE = {
    "ImageType": st.lists(CODE, min_size=1, max_size=4),
    "SOPClassUID": UID, "SOPInstanceUID": UID, "StudyInstanceUID": UID,
    "SeriesInstanceUID": UID, "StudyDate": st.just("20240229"), "StudyTime": st.just("120000.5"),
    "AcquisitionDateTime": st.just("20240229120000"), "AccessionNumber": TEXT.map(lambda s: s[:16]),
    "Modality": st.sampled_from(["CT", "MR", "US", ""]), "InstitutionName": TEXT,
    "InstitutionAddress": TEXT, "ReferringPhysicianName": TEXT, "StudyDescription": TEXT,
    "RetrieveAETitle": st.just("STORESCP"), "PatientName": TEXT, "PatientID": TEXT,
    "PatientAge": st.just("045Y"), "PatientWeight": st.integers(0, 300).map(str),
    "BodyPartExamined": CODE, "SliceThickness": st.just("2.5"),
    "SeriesNumber": st.integers(-99, 9999).map(str), "InstanceNumber": st.integers(0, 99),
    "ImageComments": LATIN1, "Rows": US, "Columns": US,
    "PixelSpacing": st.lists(st.sampled_from(["0.5", "1", "-2e3"]), min_size=1, max_size=3),
    "SimpleFrameList": st.lists(st.integers(0, 2**32 - 1), max_size=3),
    "ReferencePixelX0": st.integers(-(2**31), 2**31 - 1),
    "RecommendedDisplayFrameRateInFloat": st.floats(width=32, allow_nan=False),
    "SelectorFDValue": st.floats(allow_nan=False), "TextValue": LATIN1,
    "LongCodeValue": TEXT, "URNCodeValue": st.just("urn:oid:1.2.3"),
    "RedPaletteColorLookupTableData": st.binary(max_size=8).map(lambda b: b[: len(b) // 2 * 2]),
}
SIMPLE_TAGS = tags_for(SIMPLE)


@st.composite
def sequence(draw: st.DrawFn, depth: int) -> Sequence:
    items = []
    for _ in range(draw(st.integers(0, 3))):
        ds = Dataset()
        ds.ReferencedSOPClassUID = draw(UID)
        if draw(st.booleans()):
            ds.ReferencedSOPInstanceUID = draw(UID)
        if depth and draw(st.booleans()):
            ds.PurposeOfReferenceCodeSequence = draw(sequence(depth - 1))
            ds["PurposeOfReferenceCodeSequence"].is_undefined_length = draw(st.booleans())
        ds.is_undefined_length_sequence_item = draw(st.booleans())
        items.append(ds)
    return Sequence(items)


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    ds = Dataset()
    for keyword in sorted(draw(st.sets(st.sampled_from(sorted(SIMPLE)), max_size=20))):
        setattr(ds, keyword, draw(SIMPLE[keyword]))
    for keyword in draw(st.sets(st.sampled_from(["ReferencedImageSequence", "ContentSequence"]))):
        setattr(ds, keyword, draw(sequence(2)))
        ds[keyword].is_undefined_length = draw(st.booleans())
    if draw(st.booleans()):
        block = ds.private_block(0x0009, "FASTROUTE TEST", create=True)
        block.add_new(0x01, "LO", draw(TEXT))
        block.add_new(0x02, "OB", draw(st.binary(max_size=9)))  # odd lengths too
    if draw(st.booleans()):
        ds.add_new(PIXEL_DATA, "OB", draw(st.binary(max_size=32)))
    return ds


def encode(ds: Dataset, imp: bool, le: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = imp, le
    write_dataset(fp, ds)
    return fp.getvalue()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets(), st.data())
def test_generated_datasets_match_pydicom(ds: Dataset, data: st.DataObject) -> None:
    present = sorted(int(t) for t in ds.keys())
    absent = list(SIMPLE_TAGS)
    tags = tuple(sorted(set(data.draw(st.lists(st.sampled_from(present + absent), min_size=1)))))
    for imp, le in ENCODINGS:
        buf = encode(ds, imp, le)
        got = same_outcome(buf, tags, imp, le)
        assert isinstance(same_outcome(buf, tuple(present) or (0,), imp, le), dict)
        ref = read_dataset(BytesIO(buf), imp, le)
        assert set(got) == {t for t in tags if t in ref}
        for tag, (vr, value) in got.items():
            elem = ref.get_item(tag)
            assert vr == ("" if imp else elem.VR)
            if isinstance(elem.value, Sequence):  # undefined length: pydicom parsed it
                parsed = read_sequence(BytesIO(value), imp, le, len(value), "iso8859")
                assert list(parsed) == list(elem.value)
            else:
                assert value == (elem.value or b"")
