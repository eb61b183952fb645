"""fastroute.routing.transcode: negotiation rules, lossless conversions, lossy policy, clear errors.

Reference decoder is pydicom itself: a converted object must decode to exactly the pixels
pydicom decodes from the original, and every non-pixel element must be unchanged. Elements
a conversion may legitimately touch (documented in fastroute/transcode.py):
Pixel Data, Photometric Interpretation, Planar Configuration, the Lossy Image Compression
attributes, the Extended Offset Table, and group lengths (retired; never written by pydicom).

JPEG and JPEG-LS decode on the default install (python-gdcm, pyjpegls; no GPL plugin): those
tests never skip, so a default install that cannot decode them fails here. The "plugin
missing" behaviour is tested on every host by giving the functions a ``Codecs`` that excludes
the plugins.
"""
from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    UID,
    RLELossless,
    generate_uid,
)

from fastroute.config import DestinationConfig
from fastroute.errors import NoCodecError, TranscodeError
from fastroute.routing.transcode import (
    Codecs,
    candidates,
    choose,
    decoders_available,
    encoders_available,
    installed_codecs,
    transcode,
)

EXPLICIT, IMPLICIT, BIG, DEFLATED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                     ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
NATIVE = (EXPLICIT, IMPLICIT, BIG, DEFLATED)
# A host where no JPEG / JPEG-LS decoder is installed (the pre-issue-12 default install).
NO_JPEG = Codecs.detect(without={"pylibjpeg-libjpeg", "python-gdcm", "pillow", "pyjpegls"})
# Attributes a conversion may change; see the module docstring.
MAY_CHANGE = {0x7FE00010, 0x00280004, 0x00280006, 0x00282110, 0x00282112, 0x00282114,
              0x7FE00001, 0x7FE00002}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- helpers --------------------------------------------------------------------------------------

def data_path(name: str) -> str:
    import data_store
    path = os.path.join(os.path.dirname(data_store.__file__), "data", name)
    if os.path.exists(path):
        return path
    found = pydicom.data.get_testdata_file(name)
    assert found, f"test file {name} not found in pydicom-data or pydicom's test files"
    return str(found)


def c_store_body(name: str) -> tuple[bytes, str]:
    """A Part 10 file as a C-STORE carries it: the dataset bytes after the file meta."""
    with open(data_path(name), "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        return fp.read(), str(meta.TransferSyntaxUID)


def decode(data: bytes, ts: str) -> Dataset:
    """Parse encoded dataset bytes with pydicom, ready for ``pixel_array``."""
    if ts == DEFLATED:
        data = zlib.decompress(data, -15)
    ds = read_dataset(io.BytesIO(data), ts == IMPLICIT, ts != BIG)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    return ds


def encode(ds: Dataset, ts: str = EXPLICIT) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = ts == IMPLICIT, ts != BIG
    write_dataset(fp, ds)
    return fp.getvalue()


def raw_values(ds: Dataset, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(tag path, encoded little endian value bytes) for every element but those allowed to
    change; sequences are walked, not compared as blobs."""
    for tag in sorted(ds.keys()):
        if tag.element == 0 or tag in MAY_CHANGE:
            continue
        elem = ds.get_item(tag)
        path = (*prefix, f"{tag}")
        if isinstance(elem, DataElement) and elem.VR == "SQ":
            yield path, ("SQ", len(elem.value))
            for i, item in enumerate(elem.value):
                yield from raw_values(item, (*path, i))
        elif isinstance(elem, RawDataElement):
            yield path, bytes(elem.value or b"")
        elif elem.is_empty:  # pydicom's reader hands out some empty elements pre-converted
            yield path, b""
        else:
            yield path, elem.value


def assert_same_elements(a: bytes, a_ts: str, b: bytes, b_ts: str) -> None:
    """Element by element, byte for byte (both little endian encodings)."""
    left = dict(raw_values(decode(a, a_ts)))
    right = dict(raw_values(decode(b, b_ts)))
    assert left.keys() == right.keys()
    different = [path for path in left if left[path] != right[path]]
    assert not different, f"elements changed: {different[:5]}"


def assert_same_values(a: Dataset, b: Dataset) -> None:
    """Element by element on decoded values (for byte-order changes)."""
    for elem in a:
        if elem.tag.element == 0 or elem.tag in MAY_CHANGE:
            continue
        other = b[elem.tag]
        if elem.VR == "SQ":
            assert len(elem.value) == len(other.value), elem.tag
            for x, y in zip(elem.value, other.value):
                assert_same_values(x, y)
        else:
            assert elem.value == other.value, elem.tag
    assert {e.tag for e in a if e.tag not in MAY_CHANGE} == \
        {e.tag for e in b if e.tag not in MAY_CHANGE}


def pixels(data: bytes, ts: str) -> np.ndarray:
    return decode(data, ts).pixel_array


def dest(**kw: Any) -> DestinationConfig:
    return DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, **kw)


def synth(rows: int = 7, cols: int = 5, *, bits: int = 16, stored: int = 12,
          signed: bool = False, spp: int = 1, frames: int = 1, planar: int = 0,
          seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A small Secondary Capture image in Explicit VR LE plus its pixel array.

    Carries what a router must not disturb: a charset, text with trailing padding, a
    sequence, a private block and a US/SS-ambiguous attribute.
    """
    rng = np.random.default_rng(seed)
    lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed else (0, (1 << stored) - 1)
    shape = (frames, rows, cols, spp)
    arr = rng.integers(lo, hi + 1, size=shape, endpoint=False).astype(
        f"<{'i' if signed else 'u'}{bits // 8}")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "ID 1"
    ds.StudyDescription = "padded "
    ds.ReferencedSeriesSequence = Sequence([Dataset()])
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
    block = ds.private_block(0x0099, "FASTROUTE TEST", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "UL", 123456)
    ds.SamplesPerPixel = spp
    ds.PhotometricInterpretation = "RGB" if spp == 3 else "MONOCHROME2"
    if spp > 1:
        ds.PlanarConfiguration = planar
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation = int(signed)
    ds.SmallestImagePixelValue = int(arr.min())  # 'US or SS': resolved by Pixel Representation
    out = arr.transpose(0, 3, 1, 2) if (spp > 1 and planar) else arr
    raw = out.tobytes()
    ds.PixelData = raw + b"\x00" * (len(raw) % 2)
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    expected = arr.reshape(shape if frames > 1 else shape[1:])
    if spp == 1:
        expected = expected[..., 0]
    return encode(ds), expected


# -- originals from pydicom-data -> Explicit VR Little Endian -----------------------------------

LOSSLESS_FILES = ["693_J2KR.dcm", "MR2_J2KR.dcm", "emri_small_RLE.dcm", "OBXXXX1A_rle.dcm",
                  "OBXXXX1A_rle_2frame.dcm", "OBXXXX1A_expb.dcm",
                  "SC_rgb_expb_16bit_2frame.dcm", "image_dfl.dcm"]
JPEG_FILES = ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
                 "emri_small_jpeg_ls_lossless.dcm"]
LOSSY_FILES = ["MR2_J2KI.dcm"]
LOSSY_JPEG_FILES = ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_small_odd_jpeg.dcm"]


def _to_explicit_checks(name: str) -> tuple[bytes, bytes, str]:
    data, ts = c_store_body(name)
    out = transcode(data, ts, EXPLICIT)
    ref = pydicom.dcmread(data_path(name)).pixel_array
    np.testing.assert_array_equal(pixels(out, EXPLICIT), ref)
    result = decode(out, EXPLICIT)
    bits = int(result.BitsAllocated)
    assert result["PixelData"].VR == ("OW" if bits > 8 else "OB")
    assert not result["PixelData"].is_undefined_length
    assert "ExtendedOffsetTable" not in result
    if ts != BIG:
        assert_same_elements(data, ts, out, EXPLICIT)
    return data, out, ts


@pytest.mark.parametrize("name", LOSSLESS_FILES)
def test_lossless_original_to_explicit_is_exact(name: str) -> None:
    _, out, ts = _to_explicit_checks(name)
    if ts not in NATIVE:  # decoding a lossless codestream must not mark the image lossy
        assert decode(out, EXPLICIT).get("LossyImageCompression") in (None, "00")


@pytest.mark.parametrize("name", JPEG_FILES)
def test_jpeg_lossless_original_to_explicit_is_exact(name: str) -> None:
    _to_explicit_checks(name)


@pytest.mark.parametrize("name", JPEG_FILES + LOSSY_JPEG_FILES)
def test_jpeg_without_decoder_is_a_clear_permanent_error(name: str) -> None:
    data, ts = c_store_body(name)
    with pytest.raises(NoCodecError) as info:
        transcode(data, ts, EXPLICIT, codecs=NO_JPEG)
    msg = str(info.value)
    assert ts in msg and pydicom.uid.UID(ts).name in msg and "no decoder installed" in msg
    assert "pip install " in msg and "python-gdcm" in msg and "fastroute[libjpeg]" in msg
    if ts in JPEGLSTransferSyntaxes:
        assert "pyjpegls" in msg
    assert info.value.permanent is True
    assert decoders_available(NO_JPEG)[ts] is False


@pytest.mark.parametrize("name", LOSSY_FILES)
def test_lossy_original_decodes_like_pydicom_and_stays_marked_lossy(name: str) -> None:
    _, out, _ = _to_explicit_checks(name)
    assert decode(out, EXPLICIT).LossyImageCompression == "01"


@pytest.mark.parametrize("name", LOSSY_JPEG_FILES)
def test_colour_jpeg_baseline_becomes_rgb_and_lossy(name: str) -> None:
    data, ts = c_store_body(name)
    assert pydicom.dcmread(data_path(name)).PhotometricInterpretation.startswith("YBR")
    out = transcode(data, ts, EXPLICIT)
    result = decode(out, EXPLICIT)
    assert result.PhotometricInterpretation == "RGB"  # the decoder converted YCbCr
    assert result.PlanarConfiguration == 0
    assert result.LossyImageCompression == "01"
    np.testing.assert_array_equal(result.pixel_array,
                                  pydicom.dcmread(data_path(name)).pixel_array)
    assert_same_elements(data, ts, out, EXPLICIT)


# -- every compressed syntax the router accepts decodes on the default install ---------------

# A pydicom/pydicom-data sample per syntax; "uncompressed twin" where one exists proves the
# decode lossless (otherwise pydicom's own pixel_array is the reference, as above).
DEFAULT_INSTALL_SAMPLES: dict[str, tuple[str, str | None]] = {
    "1.2.840.10008.1.2.4.50": ("SC_rgb_dcmtk_+eb+cy+n1.dcm", None),
    "1.2.840.10008.1.2.4.70": ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),
    "1.2.840.10008.1.2.4.80": ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    "1.2.840.10008.1.2.4.81": ("JPEGLSNearLossless_16.dcm", None),
    "1.2.840.10008.1.2.4.90": ("MR2_J2KR.dcm", None),
    "1.2.840.10008.1.2.4.91": ("MR2_J2KI.dcm", None),
    "1.2.840.10008.1.2.5": ("MR_small_RLE.dcm", "MR_small.dcm"),
}
# No sample file: made with DCMTK from an uncompressed one (JPEG Lossless Process 14 with
# another predictor than SV1; 8-bit JPEG Extended, the precision the default plugins decode).
GENERATED = {"1.2.840.10008.1.2.4.57": (["+el", "+sv", "2"], "MR_small.dcm"),
             "1.2.840.10008.1.2.4.51": (["+ee"], "SC_rgb.dcm")}
# Decodable here but no encoder exists to make a sample (pylibjpeg-openjpeg decodes HTJ2K).
DECODER_ONLY = {"1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
# pydicom 3.0 has no decoder at all: forwarded as is, and the failure says so.
NO_DECODER = {"1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.100",
              "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.103",
              "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.106",
              "1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108"}


def _accepted_compressed() -> list[str]:
    from fastroute.dicom.acse import ACCEPTED_SYNTAXES
    return [ts for ts in ACCEPTED_SYNTAXES if ts not in NATIVE]


def test_every_accepted_compressed_syntax_is_covered() -> None:
    """A syntax added to what the router accepts must get a decode test (or a stated reason)."""
    covered = {*DEFAULT_INSTALL_SAMPLES, *GENERATED, *DECODER_ONLY, *NO_DECODER}
    assert set(_accepted_compressed()) <= covered
    for ts in (*DEFAULT_INSTALL_SAMPLES, *GENERATED, *DECODER_ONLY):
        assert installed_codecs().can_decode(ts), ts
    for ts in set(_accepted_compressed()) & NO_DECODER:
        assert not installed_codecs().can_decode(ts), ts


@pytest.mark.parametrize("ts", sorted(DEFAULT_INSTALL_SAMPLES))
def test_accepted_syntax_decodes_on_the_default_install(ts: str) -> None:
    name, twin = DEFAULT_INSTALL_SAMPLES[ts]
    data, file_ts = c_store_body(name)
    assert file_ts == ts
    _, out, _ = _to_explicit_checks(name)
    if twin is not None:
        np.testing.assert_array_equal(pixels(out, EXPLICIT),
                                      pydicom.dcmread(data_path(twin)).pixel_array)


@pytest.mark.parametrize("ts", sorted(GENERATED))
def test_generated_jpeg_decodes_on_the_default_install(ts: str, tmp_path: Any) -> None:
    import shutil
    import subprocess
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("DCMTK's dcmcjpeg is not installed")
    options, name = GENERATED[ts]
    src, made = data_path(name), tmp_path / "made.dcm"
    subprocess.run(["dcmcjpeg", *options, src, str(made)], check=True, timeout=60)
    data, made_ts = c_store_body(str(made))
    assert made_ts == ts
    out = transcode(data, ts, EXPLICIT)
    got, ref = pixels(out, EXPLICIT), pydicom.dcmread(src).pixel_array
    if ts == JPEGExtended12Bit:  # lossy: close to the original, and marked lossy
        assert np.abs(got.astype(int) - ref.astype(int)).mean() < 4
        assert decode(out, EXPLICIT).LossyImageCompression == "01"
    else:
        np.testing.assert_array_equal(got, ref)
        assert decode(out, EXPLICIT).get("LossyImageCompression") in (None, "00")


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG-lossy.dcm"])
def test_12bit_jpeg_extended_decodes_like_dcmtk(name: str, tmp_path: Any) -> None:
    """pydicom's gdcm plugin refuses 12-bit JPEG Extended; fastroute drives GDCM itself and
    must get exactly what DCMTK's decoder gets."""
    import shutil
    import subprocess
    if shutil.which("dcmdjpeg") is None:
        pytest.skip("DCMTK's dcmdjpeg is not installed")
    ref_file = tmp_path / "ref.dcm"
    subprocess.run(["dcmdjpeg", data_path(name), str(ref_file)], check=True, timeout=60)
    data, ts = c_store_body(name)
    assert ts == JPEGExtended12Bit and int(pydicom.dcmread(data_path(name)).BitsStored) == 12
    gdcm_only = Codecs(decoders={JPEGExtended12Bit: ("gdcm",)})
    out = transcode(data, ts, EXPLICIT, codecs=gdcm_only)
    np.testing.assert_array_equal(pixels(out, EXPLICIT), pydicom.dcmread(ref_file).pixel_array)
    result = decode(out, EXPLICIT)
    assert result.LossyImageCompression == "01" and result["PixelData"].VR == "OW"
    assert_same_elements(data, ts, out, EXPLICIT)


@pytest.mark.parametrize("name", ["SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "JPEGLSNearLossless_16.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_default_decoders_match_dcmtk(name: str, tmp_path: Any) -> None:
    """An independent reference for GDCM/CharLS: DCMTK's decoders (YCbCr converted to RGB)."""
    import shutil
    import subprocess
    tool = "dcmdjpls" if "JPEGLS" in name else "dcmdjpeg"
    if shutil.which(tool) is None:
        pytest.skip(f"DCMTK's {tool} is not installed")
    ref_file = tmp_path / "ref.dcm"
    subprocess.run([tool, data_path(name), str(ref_file)], check=True, timeout=60)
    data, ts = c_store_body(name)
    np.testing.assert_array_equal(pixels(transcode(data, ts, EXPLICIT), EXPLICIT),
                                  pydicom.dcmread(ref_file).pixel_array)


def test_12bit_jpeg_extended_without_a_capable_decoder_names_the_package() -> None:
    """Pillow (as pydicom drives it) decodes only 8-bit JPEG Extended: a host with only it
    (or with a plugin that fails) gets the syntax and what to install."""
    data, ts = c_store_body("JPGExtended.dcm")
    with pytest.raises(NoCodecError) as info:
        transcode(data, ts, EXPLICIT, codecs=Codecs(decoders={JPEGExtended12Bit: ("pillow",)}))
    msg = str(info.value)
    assert "JPEG Extended (Process 2 and 4) (1.2.840.10008.1.2.4.51)" in msg
    assert "12-bit" in msg and "python-gdcm" in msg and info.value.permanent


@pytest.mark.parametrize("ts", sorted(NO_DECODER))
def test_syntax_without_any_decoder_names_it(ts: str) -> None:
    data, _ = synth(40, 40, bits=8, stored=8)
    with pytest.raises(NoCodecError) as info:
        choose(ts, [EXPLICIT], dest())
    msg = str(info.value)
    assert ts in msg and "no decoder" in msg and info.value.permanent


def test_big_endian_matches_its_little_endian_twin() -> None:
    """OBXXXX1A_expb is OBXXXX1A in big endian: palette LUTs (OW) must come back swapped."""
    big, ts = c_store_body("OBXXXX1A_expb.dcm")
    little, _ = c_store_body("OBXXXX1A.dcm")
    out = transcode(big, ts, EXPLICIT)
    got, twin = decode(out, EXPLICIT), decode(little, EXPLICIT)
    assert got.RedPaletteColorLookupTableData == twin.RedPaletteColorLookupTableData
    assert_same_values(twin, got)
    np.testing.assert_array_equal(got.pixel_array, twin.pixel_array)


def test_big_endian_16bit_rgb_matches_its_twin() -> None:
    big, ts = c_store_body("SC_rgb_expb_16bit_2frame.dcm")
    little, _ = c_store_body("SC_rgb_16bit_2frame.dcm")
    out = transcode(big, ts, EXPLICIT)
    np.testing.assert_array_equal(pixels(out, EXPLICIT), pixels(little, EXPLICIT))
    assert_same_values(decode(little, EXPLICIT), decode(out, EXPLICIT))


def test_sop_instance_uid_and_charset_text_are_untouched() -> None:
    data, ts = c_store_body("693_J2KR.dcm")
    before = decode(data, ts)
    after = decode(transcode(data, ts, IMPLICIT), IMPLICIT)
    assert after.SOPInstanceUID == before.SOPInstanceUID
    # ISO 2022 multi-byte text stays byte-identical across an encoding change.
    body = pydicom.dcmread(pydicom.data.get_charset_files("chrH31.dcm")[0])
    raw = encode(body)
    for dst in (IMPLICIT, RLELossless):
        assert_same_elements(raw, EXPLICIT, transcode(raw, EXPLICIT, dst), dst)


# -- native <-> native ----------------------------------------------------------------------------

def test_same_syntax_returns_the_same_object() -> None:
    data = b"\x08\x00\x16\x00"
    assert transcode(data, EXPLICIT, EXPLICIT) is data
    view = memoryview(data)
    assert transcode(view, RLELossless, RLELossless) is view


@pytest.mark.parametrize("dst", [IMPLICIT, BIG, DEFLATED])
def test_native_round_trip_is_byte_identical(dst: str) -> None:
    data, arr = synth(9, 11, bits=16, stored=12, signed=True, frames=2)
    there = transcode(memoryview(data), EXPLICIT, dst)
    assert isinstance(there, bytes)  # a memoryview comes back only when nothing changes
    np.testing.assert_array_equal(pixels(there, dst), arr)
    back = transcode(there, dst, EXPLICIT)
    if dst == IMPLICIT:  # private VRs cannot survive implicit VR: they come back as UN
        assert_same_elements(data, EXPLICIT, back, EXPLICIT)
    else:
        assert back == data


def test_deflated_is_raw_deflate() -> None:
    data, ts = c_store_body("image_dfl.dcm")
    out = transcode(data, ts, EXPLICIT)
    assert out == zlib.decompress(data, -15)
    assert transcode(transcode(out, EXPLICIT, DEFLATED), DEFLATED, EXPLICIT) == out


def test_implicit_to_explicit_resolves_ambiguous_vrs() -> None:
    data, _ = synth(bits=16, stored=12, signed=True)
    implicit = transcode(data, EXPLICIT, IMPLICIT)
    explicit = decode(transcode(implicit, IMPLICIT, EXPLICIT), EXPLICIT)
    assert explicit["SmallestImagePixelValue"].VR == "SS"
    assert explicit["PixelData"].VR == "OW"
    assert explicit[0x00991002].VR == "UN"  # unknown private VR: UN, bytes kept
    assert explicit[0x00991002].value == (123456).to_bytes(4, "little")


# -- compression round trips (synthetic) ----------------------------------------------------------

SHAPES = [
    dict(rows=7, cols=5, bits=16, stored=12, signed=True),
    dict(rows=7, cols=5, bits=16, stored=16, signed=True),
    dict(rows=7, cols=5, bits=8, stored=8),
    dict(rows=33, cols=35, bits=16, stored=12),
    dict(rows=33, cols=35, bits=16, stored=16, signed=True, frames=3),
    dict(rows=40, cols=37, bits=8, stored=8, spp=3),
    dict(rows=40, cols=37, bits=8, stored=8, spp=3, planar=1, frames=2),
    dict(rows=34, cols=32, bits=16, stored=16, spp=3),
]


@pytest.mark.parametrize("dst", [RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_lossless_compression_round_trip(shape: dict[str, Any], dst: str) -> None:
    data, arr = synth(**shape)
    if dst == JPEG2000Lossless and min(shape["rows"], shape["cols"]) < 32:
        with pytest.raises(TranscodeError, match="at least 32"):
            transcode(data, EXPLICIT, dst)
        return
    packed = transcode(data, EXPLICIT, dst)
    result = decode(packed, dst)
    assert result["PixelData"].is_undefined_length
    np.testing.assert_array_equal(result.pixel_array, arr)
    assert_same_elements(data, EXPLICIT, packed, dst)
    unpacked = transcode(packed, dst, EXPLICIT)
    np.testing.assert_array_equal(pixels(unpacked, EXPLICIT), arr)
    if shape.get("spp", 1) == 3:
        assert decode(unpacked, EXPLICIT).PlanarConfiguration == 0
        assert decode(unpacked, EXPLICIT).PhotometricInterpretation == "RGB"
    assert "LossyImageCompression" not in result


def test_compressed_to_other_compressed() -> None:
    data, ts = c_store_body("693_J2KR.dcm")
    ref = pydicom.dcmread(data_path("693_J2KR.dcm")).pixel_array
    rle = transcode(data, ts, RLELossless)
    np.testing.assert_array_equal(pixels(rle, RLELossless), ref)
    j2k = transcode(rle, RLELossless, JPEG2000Lossless)
    np.testing.assert_array_equal(pixels(j2k, JPEG2000Lossless), ref)


def test_j2k_precision_below_bits_allocated_keeps_the_container() -> None:
    """Bits Stored 8 in Bits Allocated 16: openjpeg decodes to 8-bit, the dataset says 16."""
    data, arr = synth(32, 33, bits=16, stored=8)
    j2k = transcode(data, EXPLICIT, JPEG2000Lossless)
    out = transcode(j2k, JPEG2000Lossless, EXPLICIT)
    result = decode(out, EXPLICIT)
    assert len(result.PixelData) == 32 * 33 * 2
    np.testing.assert_array_equal(result.pixel_array, arr)


def test_ybr_full_422_native_is_expanded_before_compression() -> None:
    data, ts = c_store_body("SC_ybr_full_422_uncompressed.dcm")
    ref = pydicom.dcmread(data_path("SC_ybr_full_422_uncompressed.dcm")).pixel_array
    out = transcode(data, ts, RLELossless)
    result = decode(out, RLELossless)
    assert result.PhotometricInterpretation == "YBR_FULL"
    np.testing.assert_array_equal(result.pixel_array, ref)


def test_encapsulated_icon_is_decoded_too() -> None:
    """Pixel Data nested in the Icon Image Sequence is in the source encoding as well."""
    main, _ = synth(33, 34, bits=8, stored=8)
    icon_bytes, icon_arr = synth(4, 6, bits=8, stored=8, seed=1)
    ds = decode(transcode(main, EXPLICIT, RLELossless), RLELossless)
    icon = decode(transcode(icon_bytes, EXPLICIT, RLELossless), RLELossless)
    item = Dataset()
    for kw in ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
               "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(item, kw, icon[kw].value)
    item["PixelData"] = icon["PixelData"]
    ds.IconImageSequence = Sequence([item])
    out = decode(transcode(encode(ds), RLELossless, EXPLICIT), EXPLICIT)
    got = out.IconImageSequence[0]
    assert not got["PixelData"].is_undefined_length
    assert got.PixelData == icon_arr.tobytes()


@settings(max_examples=int(os.environ.get("FASTROUTE_HYPOTHESIS_EXAMPLES", "25")),
          deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), bits=st.sampled_from([8, 16]),
       signed=st.booleans(), spp=st.sampled_from([1, 3]), frames=st.integers(1, 3),
       planar=st.sampled_from([0, 1]), seed=st.integers(0, 2**16),
       route=st.sampled_from([(IMPLICIT, BIG, RLELossless), (RLELossless, BIG, IMPLICIT),
                              (BIG, RLELossless, DEFLATED)]))
def test_property_conversion_chains_preserve_pixels(
        rows: int, cols: int, bits: int, signed: bool, spp: int, frames: int, planar: int,
        seed: int, route: tuple[str, ...]) -> None:
    signed = signed and spp == 1  # colour is unsigned by definition
    data, arr = synth(rows, cols, bits=bits, stored=bits if bits == 8 else 13, signed=signed,
                      spp=spp, frames=frames, planar=planar, seed=seed)
    src: str = EXPLICIT
    for dst in route:
        data = transcode(data, src, dst)
        np.testing.assert_array_equal(pixels(data, dst), arr)  # pydicom as the reference
        src = dst


# -- lossy policy ---------------------------------------------------------------------------------

def test_lossy_target_needs_allow_lossy() -> None:
    data, _ = synth(40, 40)
    with pytest.raises(TranscodeError, match="lossy compression refused"):
        transcode(data, EXPLICIT, JPEG2000)


def test_lossy_compression_sets_the_lossy_attributes() -> None:
    data, arr = synth(64, 64, bits=16, stored=12)
    out = transcode(data, EXPLICIT, JPEG2000, allow_lossy=True, j2k_ratio=5)
    ds = decode(out, JPEG2000)
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_15444_1"
    assert 3 < float(ds.LossyImageCompressionRatio) < 8  # the measured ratio
    assert ds.pixel_array.shape == arr.shape
    assert_same_elements(data, EXPLICIT, out, JPEG2000)


def test_lossy_recompression_of_lossy_data_is_refused_unless_allowed() -> None:
    data, ts = c_store_body("MR2_J2KI.dcm")  # LossyImageCompression 01 already
    assert transcode(data, ts, JPEG2000, allow_lossy=True) is data  # same syntax: untouched
    native = transcode(data, ts, EXPLICIT)
    with pytest.raises(TranscodeError, match="already lossy"):
        transcode(native, EXPLICIT, JPEG2000, allow_lossy=True)
    before = decode(native, EXPLICIT)
    out = decode(transcode(native, EXPLICIT, JPEG2000, allow_lossy=True, lossy_source_ok=True),
                 JPEG2000)
    old_ratios = before.get("LossyImageCompressionRatio")
    old = [] if old_ratios is None else list(np.atleast_1d(old_ratios))
    assert len(list(np.atleast_1d(out.LossyImageCompressionRatio))) == len(old) + 1
    assert list(np.atleast_1d(out.LossyImageCompressionMethod))[-1] == "ISO_15444_1"


def test_decoding_an_unmarked_lossy_codestream_marks_it() -> None:
    """A J2K 9-7 codestream without (0028,2110) decodes to pixels marked lossy."""
    data, _ = synth(48, 48, bits=16, stored=12)
    lossy = decode(transcode(data, EXPLICIT, JPEG2000, allow_lossy=True), JPEG2000)
    for kw in ("LossyImageCompression", "LossyImageCompressionRatio",
               "LossyImageCompressionMethod"):
        del lossy[kw]
    out = decode(transcode(encode(lossy), JPEG2000, EXPLICIT), EXPLICIT)
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == "ISO_15444_1"
    lossless = transcode(data, EXPLICIT, JPEG2000Lossless)
    assert "LossyImageCompression" not in decode(
        transcode(lossless, JPEG2000Lossless, EXPLICIT), EXPLICIT)


# -- codec availability ---------------------------------------------------------------------------

def test_missing_openjpeg_is_a_clear_permanent_error() -> None:
    no_openjpeg = Codecs.detect(without={"pylibjpeg-openjpeg", "python-gdcm", "pillow"})
    data, ts = c_store_body("693_J2KR.dcm")
    with pytest.raises(NoCodecError, match=r"\(1\.2\.840\.10008\.1\.2\.4\.90\): no decoder "
                       r"installed.*pip install pylibjpeg-openjpeg") as info:
        transcode(data, ts, EXPLICIT, codecs=no_openjpeg)
    assert info.value.permanent
    native, _ = synth(40, 40)
    with pytest.raises(NoCodecError, match="no encoder installed"):
        transcode(native, EXPLICIT, JPEG2000Lossless, codecs=no_openjpeg)
    # RLE keeps working: pydicom's own RLE codec needs no plugin.
    assert no_openjpeg.can_decode(RLELossless) and no_openjpeg.can_encode(RLELossless)


def test_no_encoder_for_jpeg_baseline() -> None:
    data, _ = synth(40, 40, bits=8, stored=8)
    with pytest.raises(NoCodecError, match="no encoder"):
        transcode(data, EXPLICIT, JPEGBaseline8Bit, allow_lossy=True)


def test_codec_tables() -> None:
    dec, enc = decoders_available(), encoders_available()
    for ts in (*NATIVE, RLELossless, JPEG2000Lossless, JPEG2000, HTJ2KLossless):
        assert dec[ts], ts
    for ts in (*NATIVE, RLELossless, JPEG2000Lossless, JPEG2000):
        assert enc[ts], ts
    assert not enc[JPEGBaseline8Bit] and not enc[HTJ2KLossless]
    # the default install decodes every JPEG and JPEG-LS syntax, without the GPL plugin
    for ts in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes):
        assert dec[ts], ts
        assert "gdcm" in installed_codecs().decoders[ts], ts  # picked up by pydicom as is
    for ts in JPEGLSTransferSyntaxes:
        assert "pyjpegls" in installed_codecs().decoders[ts], ts
    assert not decoders_available(NO_JPEG)[JPEGLosslessSV1]


# -- candidates / choose --------------------------------------------------------------------------

def test_candidates_default_order() -> None:
    assert candidates(EXPLICIT, dest()) == (EXPLICIT, IMPLICIT, RLELossless, JPEG2000Lossless)
    assert candidates(JPEG2000Lossless, dest()) == (JPEG2000Lossless, EXPLICIT, IMPLICIT,
                                                    RLELossless)
    assert candidates(IMPLICIT, dest())[:2] == (IMPLICIT, EXPLICIT)


def test_candidates_undecodable_source_offers_only_itself() -> None:
    assert candidates(JPEGLSLossless, dest(), codecs=NO_JPEG) == (JPEGLSLossless,)


def test_candidates_compress_first_then_original() -> None:
    assert candidates(EXPLICIT, dest(compress="rle"))[:3] == (RLELossless, EXPLICIT, IMPLICIT)
    lossy = dest(compress="j2k", allow_lossy=True)
    assert candidates(EXPLICIT, lossy)[:2] == (JPEG2000, EXPLICIT)
    # never lossily compress lossy data: by source syntax or by the object's own marking
    assert JPEG2000 not in candidates(HTJ2K, lossy)  # HTJ2K lossy source
    assert candidates(JPEG2000Lossless, lossy)[0] == JPEG2000
    assert candidates(EXPLICIT, lossy, lossy_source=True)[0] == EXPLICIT
    assert JPEG2000 not in candidates(EXPLICIT, lossy, lossy_source=True)
    # no encoder: the request is dropped, the original leads
    assert candidates(EXPLICIT, dest(compress="jpeg", allow_lossy=True))[0] == EXPLICIT


def test_candidates_filter_and_prefer() -> None:
    only = dest(transfer_syntaxes=(IMPLICIT, JPEG2000Lossless))
    assert candidates(EXPLICIT, only) == (IMPLICIT, JPEG2000Lossless)
    preferring = dest(prefer=(JPEG2000Lossless, RLELossless))
    assert candidates(EXPLICIT, preferring) == (EXPLICIT, JPEG2000Lossless, RLELossless,
                                                IMPLICIT)
    assert DEFLATED not in candidates(EXPLICIT, dest())
    assert DEFLATED in candidates(EXPLICIT, dest(prefer=(DEFLATED,)))
    assert candidates(EXPLICIT, dest(transfer_syntaxes=(JPEG2000,), allow_lossy=True)) == \
        (JPEG2000,)
    assert candidates(EXPLICIT, dest(transfer_syntaxes=(JPEG2000,))) == ()


def test_choose() -> None:
    assert choose(EXPLICIT, {IMPLICIT, EXPLICIT}, dest()) == EXPLICIT
    assert choose(JPEG2000Lossless, {IMPLICIT}, dest()) == IMPLICIT
    assert choose(EXPLICIT, {EXPLICIT, RLELossless}, dest(compress="rle")) == RLELossless
    assert choose(EXPLICIT, {EXPLICIT}, dest(compress="rle")) == EXPLICIT
    assert choose(EXPLICIT, [IMPLICIT, RLELossless], dest(prefer=(RLELossless,))) == RLELossless


def test_choose_without_decoder_names_everything() -> None:
    with pytest.raises(NoCodecError) as info:
        choose(JPEGLSLossless, [EXPLICIT, IMPLICIT], dest(), codecs=NO_JPEG)
    msg = str(info.value)
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in msg
    assert "Explicit VR Little Endian (1.2.840.10008.1.2.1)" in msg
    assert "Implicit VR Little Endian (1.2.840.10008.1.2)" in msg
    assert "'pacs'" in msg and "PACS" in msg
    assert "pip install pyjpegls or python-gdcm" in msg and info.value.permanent


def test_choose_explains_policy_refusals() -> None:
    with pytest.raises(TranscodeError, match="lossy and allow_lossy is false") as info:
        choose(EXPLICIT, [JPEG2000], dest())
    assert not isinstance(info.value, NoCodecError)
    with pytest.raises(TranscodeError, match="not in this destination's transfer_syntaxes"):
        choose(EXPLICIT, [IMPLICIT], dest(transfer_syntaxes=(RLELossless,)))
    with pytest.raises(TranscodeError, match="accepted no transfer syntax"):
        choose(EXPLICIT, [], dest())
    with pytest.raises(NoCodecError, match="no encoder installed"):
        choose(EXPLICIT, [JPEGBaseline8Bit], dest(allow_lossy=True))


def test_refused_original_without_decoder_names_syntax_and_package() -> None:
    """Without a decoder only the original is proposed; its refusal must not read as a SOP
    class problem ("accepted no transfer syntax") but name the decoder to install."""
    with pytest.raises(NoCodecError) as info:
        choose(JPEGLSLossless, [], dest(), codecs=NO_JPEG)
    msg = str(info.value)
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in msg
    assert "no decoder" in msg and "pip install pyjpegls" in msg
    assert "accepted no transfer syntax" not in msg and info.value.permanent
    with pytest.raises(NoCodecError, match=r"1\.2\.840\.10008\.1\.2\.4\.57.*python-gdcm"):
        choose("1.2.840.10008.1.2.4.57", [], dest(), codecs=NO_JPEG)


def test_undecodable_reason_for_a_refused_original() -> None:
    from fastroute.routing.syntax import SyntaxPlanner
    from fastroute.spool import Claimed
    from fastroute.routing.transcode import undecodable_reason
    assert undecodable_reason(EXPLICIT) == "" and undecodable_reason(JPEGLSLossless) == ""
    text = undecodable_reason(JPEGLSLossless, NO_JPEG)
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in text
    assert "pip install pyjpegls" in text
    part2 = "1.2.840.10008.1.2.4.92"
    item = Claimed(oid=1, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.1",
                   transfer_syntax=part2, attempts=0, size=10, calling_ae="CT1")
    reason = SyntaxPlanner(dest()).refusal_reason(item)
    assert part2 in reason and "no decoder" in reason and "accept it as is" in reason
    assert "openjpeg" not in reason   # no plugin decodes Part 2: do not send operators to one


def test_unknown_syntax() -> None:
    with pytest.raises(NoCodecError, match="not a transfer syntax"):
        transcode(b"", "1.2.3.4", EXPLICIT)
    # a codec-free destination config must not crash candidates on unknown syntaxes either
    assert candidates("1.2.3.4", dest()) == ("1.2.3.4",)


def test_truncated_input_is_refused_not_silently_shortened() -> None:
    """pydicom's reader stops quietly at a truncation; transcode must not forward the rest."""
    data, ts = c_store_body("693_J2KR.dcm")
    with pytest.raises(TranscodeError, match="truncated"):
        transcode(data[: len(data) // 2] + b"\xff" * 16, ts, EXPLICIT)
    native, _ = synth(8, 8)
    for dst in (IMPLICIT, DEFLATED, RLELossless):
        with pytest.raises(TranscodeError, match="truncated"):
            transcode(native[:-10], EXPLICIT, dst)
    deflated = transcode(native, EXPLICIT, DEFLATED)
    with pytest.raises(TranscodeError, match="truncated"):
        transcode(deflated[:-5], DEFLATED, EXPLICIT)

