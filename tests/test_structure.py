"""The whole-dataset structure check (issue 11 items 1 and 2) on both twins.

`validate` must accept everything pydicom writes and every real file pydicom reads whole,
reject the poison objects of issue 11 with the offset and tag in the message, and the two
twins must agree on every input, message included. `check_structure` adds the transfer
syntax and the object size limit; the deflate bomb runs in a subprocess to measure its RSS.
"""
from __future__ import annotations

import json
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
from pydicom import Dataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

import fastroute.dicom.peek as py_twin
from fastroute import native
from fastroute.dicom.attrs import check_structure, read_attributes
from fastroute.errors import ObjectTooLarge, PeekError
from test_attrs import twin  # noqa: F401  (the fixture: both twins, installed in native)
from test_peek import (ENC_IDS, ENCODINGS, PIXEL_DATA, REAL_FILES, ROUTING_TAGS, UNDEF, datasets,
                       el, encode, item, nested, real_dataset, seq, simple, small_real)

try:
    import fastroute.dicom._peek as native_twin
except ImportError:
    native_twin = None  # type: ignore[assignment]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRE = os.environ.get("FASTROUTE_REQUIRE_EXTENSIONS") == "1"
IMPLICIT, EXPLICIT, BIG = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
DEFLATED, JPEG = "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50"
ROWS = 0x00280010

# Real files that are broken: pydicom reads them without complaint (it reads short values),
# but they end inside an element, so a destination parsing them whole fails.
BROKEN = {
    "MR_truncated.dcm": "truncated value of (7FE0,0010) at offset 1166",
    "rtplan_truncated.dcm": "truncated value of (300A,00B0) at offset 1118",
    "emri_small_jpeg_2k_lossless_too_short.dcm":
        "undefined-length (7FE0,0010) at offset 1954 has no sequence delimiter",
    "DICOMDIR-nooffset": "truncated value of (FFFE,E000) at offset 10538",
    # a stray byte before the first element: pydicom finds one element in it
    "no_meta.dcm": "truncated value of (0820,0500) at offset 8",
}


def both() -> list[ModuleType]:
    return [py_twin] + ([native_twin] if native_twin is not None else [])


def outcome(mod: ModuleType, buf: bytes, imp: bool, le: bool) -> str | None:
    """None when valid, else the PeekError message; anything else propagates."""
    try:
        mod.validate(buf, imp, le)
    except PeekError as exc:
        assert type(exc) is PeekError
        return str(exc)
    return None


def same(buf: bytes, imp: bool, le: bool) -> str | None:
    results = [outcome(mod, buf, imp, le) for mod in both()]
    assert all(r == results[0] for r in results), results
    return results[0]


def rejects(twin: ModuleType, buf: bytes, imp: bool, le: bool, message: str) -> None:
    with pytest.raises(PeekError) as info:
        twin.validate(buf, imp, le)
    assert str(info.value) == message
    assert same(buf, imp, le) == message


# --- well-formed input passes --------------------------------------------------------------

@pytest.mark.parametrize("undefined", [True, False], ids=["undefined", "defined"])
@pytest.mark.parametrize(("imp", "le"), ENCODINGS, ids=ENC_IDS)
def test_nested_sequences_pass(twin: ModuleType, imp: bool, le: bool, undefined: bool) -> None:
    twin.validate(nested(imp, le, undefined), imp, le)
    twin.validate(simple(imp, le), imp, le)
    twin.validate(b"", imp, le)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_bytes_like(twin: ModuleType, kind: type) -> None:
    twin.validate(kind(nested(False, True, True)), False, True)
    wide = memoryview(bytearray(simple(True, True))).cast("H")
    twin.validate(wide, True, True)
    with pytest.raises(TypeError):
        twin.validate("not bytes", True, True)


@pytest.mark.parametrize(("imp", "le"), ENCODINGS, ids=ENC_IDS)
def test_encapsulated_fragments_are_not_entered(twin: ModuleType, imp: bool, le: bool) -> None:
    """Fragment bytes that spell delimiters or headers are data, in any VR encoding."""
    frags = (item(b"", False, le) + item(b"\xfe\xff\xdd\xe0\0\0\0\0 fake", False, le)
             + item(b"\xff\xd8\xff\xee\x00\x0c" * 3, False, le))
    pixel = el(PIXEL_DATA, "OB", None, imp, le, frags) + el(0xFFFEE0DD, "", b"", le=le)
    twin.validate(simple(imp, le) + pixel + el(0xFFFCFFFC, "OB", b"\0\0", imp, le), imp, le)


def test_un_sequences_and_implicit_items(twin: ModuleType) -> None:
    inner = seq(0x00091011, [item(el(0x00091012, "", b"yyyy", True), True)], True, imp=True)
    un = seq(0x00091010, [item(el(0x00080100, "", b"XY", True) + inner, True)], True, imp=True)
    for le in (True, False):
        un_el = el(0x00091010, "UN", None, False, le, un[8:])  # explicit header, implicit body
        twin.validate(el(0x00090010, "LO", b"ACME", False, le) + un_el, False, le)
    body = el(0x00081150, "", b"1.2\0", True) + el(0x00081155, "", b"1.2.3\0", True)
    twin.validate(seq(0x00081140, [item(body, True), item(body, False)], False)
                  + el(0x00100020, "LO", b"P3"), False, True)


def test_odd_lengths_pydicom_reads_pass(twin: ModuleType) -> None:
    """Odd text and OB/OW/AT lengths are read by pydicom, so they must pass."""
    buf = (el(0x00090010, "LO", b"odd") + el(0x00091001, "OB", b"\1\2\3")
           + el(0x00091002, "OW", b"\1\2\3") + el(0x00091003, "AT", b"\1\2\3")
           + el(0x00100010, "PN", b"A^B^C"))
    twin.validate(buf, False, True)
    twin.validate(el(0x00280010, "", b"\1\2\3", True), True, True)  # implicit: VR unknown


def test_leading_file_meta_is_explicit_le(twin: ModuleType) -> None:
    meta = el(0x00020000, "UL", struct.pack("<I", 30)) + el(0x00020010, "UI", b"1.2\0")
    for imp, le in ENCODINGS:
        twin.validate(meta + nested(imp, le, True), imp, le)


# --- malformed input is rejected, with offset and tag -------------------------------------

def test_length_past_the_end(twin: ModuleType) -> None:
    buf = simple(False, True) + el(ROWS, "US", b"\0\2")
    rejects(twin, buf[:-1], False, True, f"truncated value of (0028,0010) at offset "
                                         f"{len(buf) - 2}: length 2 but only 1 bytes left")


@pytest.mark.parametrize(("imp", "le"), ENCODINGS, ids=ENC_IDS)
def test_rows_redeclared_as_ob(twin: ModuleType, imp: bool, le: bool) -> None:
    """Issue 11's poison object: routing tags fine, then Rows as OB of length 0x280000."""
    head = simple(imp, le)
    rows = el(ROWS, "OB", b"", False, le)[:-4] + struct.pack("<I" if le else ">I", 0x280000)
    buf = head + rows + b"\0\2" + el(0x00280011, "US", b"\0\2", imp, le)
    assert twin.peek(buf, ROUTING_TAGS, imp, le)  # the peek alone does not see it
    vpos = len(head) + (8 if imp else 12)  # implicit reads 'OB\0\0' as the length
    length = 0x280000 if not imp else struct.unpack("<I" if le else ">I", b"OB\0\0")[0]
    rejects(twin, buf, imp, le, f"truncated value of (0028,0010) at offset {vpos}: length "
                                f"{length} but only {len(buf) - vpos} bytes left")


def test_value_past_the_end_of_its_item(twin: ModuleType) -> None:
    """Inside a defined-length item: the buffer is long enough, the item is not."""
    inner = el(0x00081150, "UI", b"1.2\0")
    bad_item = el(0xFFFEE000, "", inner[:-2])  # item length cuts the value short
    buf = (el(0x00081140, "SQ", bad_item) + el(0x00100020, "LO", b"P1")
           + el(0x00100030, "DA", b"20260101"))
    assert twin.peek(buf, (0x00100020,), False, True) == {0x00100020: ("LO", b"P1")}
    rejects(twin, buf, False, True, "truncated value of (0008,1150) at offset 28: "
                                    "length 4 but only 2 bytes left")
    long_item = el(0xFFFEE000, "", inner + b"\0" * 4)[:8]
    buf = el(0x00081140, "SQ", long_item + inner) + el(0x00100020, "LO", b"P1")
    rejects(twin, buf, False, True, "truncated value of (FFFE,E000) at offset 20: "
                                    "length 16 but only 12 bytes left")


@pytest.mark.parametrize(("vr", "value", "size"), [
    ("US", b"\0\2\0", 2), ("SS", b"\1", 2), ("UL", b"\0" * 6, 4), ("FL", b"\0" * 5, 4),
    ("FD", b"\0" * 12, 8), ("SL", b"\0" * 3, 4)])
@pytest.mark.parametrize("le", [True, False], ids=["le", "be"])
def test_number_lengths_pydicom_rejects(twin: ModuleType, vr: str, value: bytes, size: int,
                                        le: bool) -> None:
    head = simple(False, le)
    buf = head + el(ROWS, vr, value, False, le)
    rejects(twin, buf, False, le, f"length {len(value)} of (0028,0010) with VR {vr} at offset "
                                  f"{len(head)} is not a multiple of {size}")


@pytest.mark.parametrize("vr", ["UT", "UC", "UR", "OD", "OF", "OL", "OV", "SV", "UV"])
def test_undefined_length_on_a_vr_that_cannot_have_one(twin: ModuleType, vr: str) -> None:
    buf = el(0x00100010, vr, None, body=b"") + el(0xFFFEE0DD, "", b"")
    rejects(twin, buf, False, True, f"undefined length on (0010,0010) with VR {vr} at offset 0")


@pytest.mark.parametrize("le", [True, False], ids=["le", "be"])
def test_unterminated_sequences_and_items(twin: ModuleType, le: bool) -> None:
    no_seq_delim = el(0x00081140, "SQ", None, le=le, body=item(b"", False, le))
    rejects(twin, no_seq_delim, False, le, "undefined-length (0008,1140) at offset 0 has no "
                                           "sequence delimiter before offset 20")
    code = el(0x00080100, "SH", b"X1", le=le)
    no_item_delim = el(0x00081140, "SQ", None, le=le, body=el(0xFFFEE000, "", None, le=le) + code)
    rejects(twin, no_item_delim, False, le,
            "item at offset 12 has no item delimiter before offset 30")
    in_defined = el(0x00081140, "SQ", el(0xFFFEE000, "", None, le=le) + code, le=le)
    rejects(twin, in_defined + el(0x00100020, "LO", b"P1", le=le), False, le,
            "item at offset 12 has no item delimiter before offset 30")
    pixel = el(PIXEL_DATA, "OB", None, le=le, body=item(b"\0\0", False, le))
    rejects(twin, pixel, False, le, "undefined-length (7FE0,0010) at offset 0 has no sequence "
                                    "delimiter before offset 22")


def test_misplaced_delimiters_and_items(twin: ModuleType) -> None:
    head = simple(False, True)
    rejects(twin, head + el(0xFFFEE00D, "", b""), False, True,
            f"unexpected (FFFE,E00D) outside a sequence at offset {len(head)}")
    rejects(twin, el(0x00081140, "SQ", el(0xFFFEE0DD, "", b"")), False, True,
            "expected an item or sequence delimiter at offset 12, found (FFFE,E0DD)")
    rejects(twin, el(0x00081140, "SQ", None, body=el(0xFFFEE000, "", None)
                     + el(0xFFFEE0DD, "", b"")), False, True,
            "unexpected (FFFE,E0DD) inside a sequence item at offset 20")
    in_defined_item = el(0x00081140, "SQ", item(el(0xFFFEE00D, "", b""), False))
    rejects(twin, in_defined_item, False, True,
            "unexpected (FFFE,E00D) inside a sequence item at offset 20")
    frag = el(PIXEL_DATA, "OB", None, body=el(0xFFFEE000, "", None)) + el(0xFFFEE0DD, "", b"")
    rejects(twin, frag, False, True,
            "undefined-length item inside encapsulated (7FE0,0010) at offset 12")


@pytest.mark.parametrize("undefined", [True, False], ids=["undefined", "defined"])
def test_nesting_limit(twin: ModuleType, undefined: bool) -> None:
    body = b""
    for _ in range(twin.MAX_DEPTH):
        body = seq(0x00081140, [item(body, undefined)], undefined)
    twin.validate(body, False, True)
    deeper = seq(0x00081140, [item(body, undefined)], undefined)
    offset = 20 * twin.MAX_DEPTH  # each level: a 12-byte SQ header and an 8-byte item header
    rejects(twin, deeper, False, True,
            f"sequences nested deeper than {twin.MAX_DEPTH} levels at offset {offset}")


def test_trailing_garbage_shorter_than_a_header(twin: ModuleType) -> None:
    head = nested(False, True, True)
    rejects(twin, head + b"\x08\x00\x10", False, True,
            f"truncated data element header at offset {len(head)}: need 4 bytes, 3 left")
    rejects(twin, head + b"\x08\x00\x10\x00LO", False, True,
            f"truncated data element header at offset {len(head)}: need 8 bytes, 6 left")
    rejects(twin, head + b"\x09\x00\x10\x00OB\0\0\1", False, True,
            f"truncated data element header at offset {len(head)}: need 12 bytes, 9 left")


# --- twins equal on generated, mutated and random input ------------------------------------

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_generated_datasets_pass(ds: Dataset) -> None:
    """Whatever pydicom writes, in any of the three encodings, passes both twins."""
    for imp, le in ENCODINGS:
        buf = encode(ds, imp, le)
        assert same(buf, imp, le) is None
        read_dataset(BytesIO(buf), imp, le)


def _mutate(data: st.DataObject, buf: bytes) -> bytes:
    out = bytearray(buf)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["truncate", "flip", "vr", "length"]))
        if not out:
            break
        pos = data.draw(st.integers(0, len(out) - 1))
        if kind == "truncate":
            del out[pos:]
        elif kind == "flip":
            out[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "vr":  # a bogus VR where a header might be
            out[pos:pos] = data.draw(st.sampled_from([b"OB\0\0", b"SQ\0\0", b"XX", b"UN\0\0",
                                                      b"US", b"\xfe\xff\x00\xe0"]))
        else:  # a length byte: large, undefined, odd
            out[pos:pos + 4] = data.draw(st.sampled_from(
                [b"\xff\xff\xff\xff", b"\x00\x00\x28\x00", b"\x03\x00\x00\x00", b"\x01\x00"]))
    return bytes(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets(), st.sampled_from(ENCODINGS), st.data())
def test_mutated_generated_datasets_twins_agree(ds: Dataset, enc: tuple[bool, bool],
                                                data: st.DataObject) -> None:
    buf = encode(ds, *enc)
    same(_mutate(data, buf), *enc)


@pytest.mark.timeout(300)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_real_datasets_twins_agree(data: st.DataObject) -> None:
    buf, imp, le, _ = data.draw(st.sampled_from(small_real()))
    same(_mutate(data, buf[:data.draw(st.sampled_from([len(buf), 4096, 1024]))]), imp, le)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(ENCODINGS))
def test_random_bytes_twins_agree(buf: bytes, enc: tuple[bool, bool]) -> None:
    same(buf, *enc)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x00081140, 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD,
                                            0x00100010, PIXEL_DATA]),
                          st.sampled_from(["SQ", "OB", "UN", "UT"]),
                          st.sampled_from([0, 2, 8, 16, UNDEF])), max_size=40),
       st.sampled_from(ENCODINGS))
def test_delimiter_soup_twins_agree(parts: list[tuple[int, str, int]],
                                    enc: tuple[bool, bool]) -> None:
    """Well-formed headers in hostile orders: the state machine, not the bounds."""
    imp, le = enc
    buf = b"".join(el(tag, vr, None, imp, le)[:-4] + struct.pack("<I" if le else ">I", length)
                   + b"\0" * (length % 9) for tag, vr, length in parts)
    same(buf, imp, le)


@pytest.mark.timeout(300)
def test_every_prefix_of_small_files_twins_agree() -> None:
    for data, imp, le, _ in small_real():
        assert same(data, imp, le) is None
        for cut in range(min(len(data), 3000)):
            same(data[:cut], imp, le)
        assert same(data[:-1], imp, le) is not None  # cut inside the last element


# --- real files ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", REAL_FILES, ids=os.path.basename)
def test_real_files_pass(twin: ModuleType, path: str) -> None:
    real = real_dataset(path)
    if real is None:
        pytest.skip("pydicom cannot read it either")
    data, imp, le, _ = real
    broken = BROKEN.get(os.path.basename(path))
    if broken is None:
        twin.validate(data, imp, le)
    else:
        with pytest.raises(PeekError, match=broken.replace("(", r"\(").replace(")", r"\)")):
            twin.validate(data, imp, le)


def file_dataset(path: str) -> tuple[bytes, str] | None:
    """(dataset bytes as stored, transfer syntax) for a file with file meta."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path, "rb") as fp:
            try:
                read_preamble(fp, False)
                ts = _read_file_meta_info(fp).get("TransferSyntaxUID")
            except Exception:
                return None
            return (fp.read(), str(ts)) if ts else None


@pytest.mark.parametrize("path", REAL_FILES, ids=os.path.basename)
def test_real_files_check_structure(twin: ModuleType, path: str) -> None:
    """The front: the file's own transfer syntax (deflated ones inflated) gives the same."""
    stored = file_dataset(path)
    real = real_dataset(path)
    if stored is None or real is None:
        pytest.skip("no file meta, or pydicom cannot read it")
    data, ts = stored
    expected = outcome(twin, *real[:3])
    try:
        check_structure(data, ts, max_bytes=len(real[0]) + 1)
        got = None
    except PeekError as exc:
        got = str(exc)
    assert got == expected


# --- check_structure: transfer syntaxes and the size limit ---------------------------------

def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize("ts", [IMPLICIT, EXPLICIT, BIG, JPEG, DEFLATED])
def test_check_structure_by_transfer_syntax(twin: ModuleType, ts: str) -> None:
    imp, le = (ts == IMPLICIT, ts != BIG)
    good = nested(imp, le, True)
    bad = good + el(ROWS, "OB", b"\0\0\0\0", imp, le)[:-2]
    if ts == DEFLATED:
        good, bad = deflate(good), deflate(bad)
    check_structure(good, ts + "\0")
    with pytest.raises(PeekError, match=r"truncated value of \(0028,0010\)"):
        check_structure(bad, ts)


def test_check_structure_trusts_the_bytes_over_the_syntax(twin: ModuleType) -> None:
    """Implicit bytes labelled explicit are read as implicit, as read_attributes does."""
    check_structure(nested(True, True, True), EXPLICIT)


def test_object_size_limit(twin: ModuleType) -> None:
    buf = nested(False, True, True)
    check_structure(buf, EXPLICIT, max_bytes=len(buf))
    with pytest.raises(ObjectTooLarge, match=f"dataset of {len(buf)} bytes exceeds the limit "
                                             f"of {len(buf) - 1}"):
        check_structure(buf, EXPLICIT, max_bytes=len(buf) - 1)
    packed = deflate(buf)
    check_structure(packed, DEFLATED, max_bytes=len(buf))
    with pytest.raises(ObjectTooLarge, match=f"inflates to more than the limit of {len(buf) - 1}"):
        check_structure(packed, DEFLATED, max_bytes=len(buf) - 1)
    assert issubclass(ObjectTooLarge, PeekError)


def test_broken_deflate_streams(twin: ModuleType) -> None:
    packed = deflate(nested(False, True, True))
    with pytest.raises(PeekError, match="ends inside its deflate stream"):
        check_structure(packed[:-3], DEFLATED)
    with pytest.raises(PeekError, match="ends inside its deflate stream"):
        check_structure(b"", DEFLATED)
    with pytest.raises(PeekError, match="corrupt"):
        check_structure(b"\xff" * 40, DEFLATED)


def test_read_attributes_inflate_is_bounded(twin: ModuleType) -> None:
    """read_attributes inflates only as far as the tags, and never past max_bytes."""
    buf = simple(False, True) + el(PIXEL_DATA, "OB", b"\0" * 200_000) + el(0xFFFCFFFC, "OB",
                                                                           b"\0\0")
    packed = deflate(buf)
    assert read_attributes(packed, DEFLATED, (0x00100020,), max_bytes=1000) == {
        0x00100020: "P1"}
    assert read_attributes(packed, DEFLATED, (0xFFFCFFFC,)) == {0xFFFCFFFC: b"\0\0"}
    with pytest.raises(ObjectTooLarge, match="limit of 100000 bytes"):
        read_attributes(packed, DEFLATED, (0xFFFCFFFC,), max_bytes=100_000)


BOMB = r"""
import json, resource, sys, time, zlib
from fastroute.dicom.attrs import check_structure, read_attributes
from fastroute.errors import ObjectTooLarge
from test_peek import el, simple

def bomb(size):
    # Full flushes make each 1 MiB block of zeros compress to the same bytes: the 1 GiB
    # stream is built by repetition, without ever holding 1 GiB here.
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = simple(False, True) + el(0x7FE00010, "OB", b"")[:-4] + size.to_bytes(4, "little")
    out = [c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)]
    zeros = bytes(1 << 20)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH) == block
    out.append(block * ((size >> 20) - 1))
    out.append(c.compress(zeros) + c.flush())
    return b"".join(out)

packed = bomb(1 << 30)
limit = int(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = {}
for name, call in [("check", lambda: check_structure(packed, "1.2.840.10008.1.2.1.99", limit)),
                   ("attrs", lambda: read_attributes(packed, "1.2.840.10008.1.2.1.99",
                                                     (0xFFFCFFFC,), limit))]:
    start = time.perf_counter()
    try:
        call()
        times[name] = "accepted"
    except ObjectTooLarge as exc:
        times[name] = time.perf_counter() - start
        message = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"packed": len(packed), "growth_kib": after - before, "times": times,
                  "message": message}))
"""


@pytest.mark.timeout(120)
def test_deflate_bomb_is_refused_with_bounded_memory() -> None:
    """1 MB that inflates to 1 GiB: refused at the limit, quickly, RSS growth ~ the limit."""
    limit = 32 * 1024 * 1024
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    run = subprocess.run([sys.executable, "-c", BOMB, str(limit)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr
    got: dict[str, Any] = json.loads(run.stdout)
    assert got["packed"] < 1_200_000  # it is a bomb: ~1000:1
    assert all(isinstance(t, float) and t < 5 for t in got["times"].values()), got
    assert got["growth_kib"] < limit // 1024 + 16 * 1024, got  # the limit, not 1 GiB
    assert f"limit of {limit} bytes" in got["message"]
