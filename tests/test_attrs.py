"""read_attributes / tags_for: value decoding, transfer syntaxes, character sets, on both twins.

The `twin` fixture points fastroute.native at each peek twin in turn (restored after each
test), so every behaviour here runs on the Python and the native peek.
"""
from __future__ import annotations

import glob
import os
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
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

import fastroute.dicom.peek as py_twin
from fastroute import native
from fastroute.dicom.attrs import read_attributes, tags_for
from fastroute.errors import PeekError

try:
    import fastroute.dicom._peek as native_twin
except ImportError:
    native_twin = None  # type: ignore[assignment]

REQUIRE = os.environ.get("FASTROUTE_REQUIRE_EXTENSIONS") == "1"
IMPLICIT, EXPLICIT, BIG = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
DEFLATED, JPEG = "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50"
SYNTAXES = {IMPLICIT: (True, True), EXPLICIT: (False, True), BIG: (False, False)}
ROUTING = ("Modality", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
           "SOPClassUID", "PatientID", "AccessionNumber", "StudyDescription", "PatientName",
           "InstitutionName", "BodyPartExamined")


@pytest.fixture(params=[
    pytest.param("python", id="python"),
    pytest.param("native", id="native", marks=pytest.mark.skipif(
        native_twin is None and not REQUIRE, reason="native twin not built")),
])
def twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A twin, also installed as fastroute.native's peek/validate for read_attributes and
    check_structure (test_structure uses this fixture too)."""
    mod = py_twin if request.param == "python" else native_twin
    if mod is None:
        pytest.fail("FASTROUTE_REQUIRE_EXTENSIONS=1 but fastroute.dicom._peek is not importable")
    monkeypatch.setattr(native, "validate", mod.validate)
    monkeypatch.setattr(native, "peek", mod.peek)
    monkeypatch.setattr(native, "peek_prefix", mod.peek_prefix)
    return mod


def encode(ds: Dataset, ts: str) -> bytes:
    imp, le = SYNTAXES.get(ts, (False, True))
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = imp, le
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(fp, ds)
    return fp.getvalue()


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def test_tags_for() -> None:
    assert tags_for(["PatientID", "Modality", "Modality"]) == (0x00080060, 0x00100020)
    with pytest.raises(KeyError, match="PatientNmae"):
        tags_for(["PatientID", "PatientNmae"])


def sample() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "", "AXIAL"]
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "MR"
    ds.RetrieveAETitle = "STORE"
    ds.InstitutionName = "Hôpital Saint-Éloi"
    ds.InstitutionAddress = " 1 rue\\du Port "
    ds.PatientName = "Müller^Jörg"
    ds.PatientID = "ID\\2"
    ds.PatientAge = "045Y"
    ds.PatientWeight = "72.5"
    ds.SeriesNumber = "7"
    ds.InstanceNumber = ""
    ds.ImageComments = "a\\b "
    ds.Rows = 512
    ds.SimpleFrameList = [1, 2, 0xFFFFFFFF]
    ds.ReferencePixelX0 = -5
    ds.RecommendedDisplayFrameRateInFloat = 2.5
    ds.SelectorFDValue = [1.25, -3.0]
    ds.SelectorSVValue = -(2**40)
    ds.SelectorUVValue = 2**40
    ds.FrameIncrementPointer = 0x00181063
    ds.PixelSpacing = ["0.5", "0.25"]
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.add_new(0x00091010, "LO", "ACME")
    ds.add_new(0x00091011, "OB", b"\x01\x02\x03")
    return ds


EXPECTED: dict[str, Any] = {
    "ImageType": ("ORIGINAL", "PRIMARY", "", "AXIAL"), "SOPInstanceUID": "1.2.3.4",
    "Modality": "MR", "RetrieveAETitle": "STORE", "InstitutionName": "Hôpital Saint-Éloi",
    "InstitutionAddress": " 1 rue\\du Port", "PatientName": "Müller^Jörg",
    "PatientID": ("ID", "2"), "PatientAge": "045Y", "PatientWeight": 72.5, "SeriesNumber": 7,
    "InstanceNumber": "", "ImageComments": "a\\b", "Rows": 512,
    "SimpleFrameList": (1, 2, 0xFFFFFFFF), "ReferencePixelX0": -5,
    "RecommendedDisplayFrameRateInFloat": 2.5, "SelectorFDValue": (1.25, -3.0),
    "SelectorSVValue": -(2**40), "SelectorUVValue": 2**40,
    "FrameIncrementPointer": 0x00181063, "PixelSpacing": (0.5, 0.25),
}


@pytest.mark.parametrize("ts", [IMPLICIT, EXPLICIT, BIG, JPEG, DEFLATED])
def test_decodes_by_vr(twin: ModuleType, ts: str) -> None:
    data = encode(sample(), ts)
    if ts == DEFLATED:
        data = deflate(data)
    tags = tags_for(EXPECTED)
    got = read_attributes(data, ts, tags)
    assert got == {tags_for([k])[0]: v for k, v in EXPECTED.items()}
    assert 0x00080005 not in got  # read for the charset, not returned unless asked


def test_sequences_private_and_missing(twin: ModuleType) -> None:
    for ts in SYNTAXES:
        data = encode(sample(), ts)
        got = read_attributes(data, ts, (0x00081140, 0x00091010, 0x00091011, 0x00100030))
        assert isinstance(got[0x00081140], bytes) and got[0x00091011] == b"\x01\x02\x03\0"
        # a private LO is text when the stream says so, bytes when implicit VR hides it
        assert got[0x00091010] == (b"ACME" if ts == IMPLICIT else "ACME")
        assert 0x00100030 not in got


def test_explicit_un_of_a_public_tag_uses_the_dictionary(twin: ModuleType) -> None:
    data = (b"\x08\x00\x60\x00UN\0\0\x02\0\0\0CT"
            + b"\x28\x00\x06\x01UN\0\0\x02\0\0\0\x05\x00")  # (0028,0106) is 'US or SS'
    assert read_attributes(data, EXPLICIT, (0x00080060, 0x00280106)) == {
        0x00080060: "CT", 0x00280106: b"\x05\x00"}


def test_strings_that_do_not_parse_stay_strings(twin: ModuleType) -> None:
    data = (b"\x18\x00\x50\x00DS\x04\x001_0 " + b"\x20\x00\x11\x00IS\x04\x00 +3 "
            + b"\x20\x00\x13\x00IS\x04\x002\\x ")
    assert read_attributes(data, EXPLICIT, (0x00180050, 0x00200011, 0x00200013)) == {
        0x00180050: "1_0", 0x00200011: 3, 0x00200013: (2, "x")}


def test_binary_with_a_partial_value_stays_bytes(twin: ModuleType) -> None:
    data = b"\x28\x00\x10\x00US\x03\x00\x01\x02\x03"
    assert read_attributes(data, EXPLICIT, (0x00280010,)) == {0x00280010: b"\x01\x02\x03"}


def test_requested_charset_is_returned_and_used(twin: ModuleType) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    for ts in SYNTAXES:
        got = read_attributes(encode(ds, ts), ts, (0x00080005, 0x00100010))
        assert got == {0x00080005: ("", "ISO 2022 IR 87"),
                       0x00100010: "Yamada^Tarou=山田^太郎=やまだ^たろう"}


def test_utf8_without_requesting_charset(twin: ModuleType) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDescription = "Thorax – 胸部 "
    assert read_attributes(encode(ds, EXPLICIT), EXPLICIT, tags_for(["StudyDescription"])) == {
        0x00081030: "Thorax – 胸部"}


def test_transfer_syntax_that_contradicts_the_bytes(twin: ModuleType) -> None:
    """pydicom reads by what the bytes are; so do we (some devices mislabel)."""
    ds = sample()
    tags = tags_for(["PatientName", "Rows"])
    want = {0x00100010: "Müller^Jörg", 0x00280010: 512}
    assert read_attributes(encode(ds, IMPLICIT), EXPLICIT + "\0", tags) == want
    assert read_attributes(encode(ds, EXPLICIT), IMPLICIT, tags) == want


def test_deflate_inflates_only_what_it_needs(twin: ModuleType) -> None:
    ds = sample()
    ds.add_new(0x7FE00010, "OB", os.urandom(1 << 20))  # incompressible, after the tags
    stream = deflate(encode(ds, EXPLICIT))
    half = len(stream) // 2
    broken = stream[:half] + b"\xff" * (len(stream) - half)  # an invalid block type there
    tags = tags_for(["PatientName", "Rows"])
    want = {0x00100010: "Müller^Jörg", 0x00280010: 512}
    assert read_attributes(broken, DEFLATED, tags) == want
    assert read_attributes(memoryview(stream), DEFLATED, tags) == want
    with pytest.raises(PeekError, match="deflated dataset is corrupt"):
        read_attributes(broken, DEFLATED, (0x7FE00010,))
    with pytest.raises(PeekError):
        read_attributes(stream[:1000], DEFLATED, (0x7FE00010,))


def test_truncated_and_empty(twin: ModuleType) -> None:
    data = encode(sample(), EXPLICIT)
    with pytest.raises(PeekError, match="offset"):
        read_attributes(data[:-1], EXPLICIT, (0x7FE00010,))
    for ts in (IMPLICIT, EXPLICIT, DEFLATED):
        assert read_attributes(b"" if ts != DEFLATED else deflate(b""), ts, (0x00100010,)) == {}


# --- generated and real datasets against pydicom's own decoding ----------------------------

LATIN1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\\"),
                 max_size=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patient=LATIN1, institution=st.lists(LATIN1, min_size=1, max_size=3),
       rows=st.integers(0, 0xFFFF), number=st.integers(-(2**31), 2**31 - 1),
       ts=st.sampled_from([IMPLICIT, EXPLICIT, BIG, DEFLATED]))
def test_generated_values_match_pydicom(patient: str, institution: list[str], rows: int,
                                        number: int, ts: str) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.InstitutionName, ds.Rows = patient, institution, rows
    ds.SeriesNumber = number
    data = encode(ds, ts)
    for mod in [py_twin] + ([native_twin] if native_twin else []):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(native, "peek", mod.peek)
            mp.setattr(native, "peek_prefix", mod.peek_prefix)
            got = read_attributes(deflate(data) if ts == DEFLATED else data, ts,
                                  tags_for(["PatientName", "InstitutionName", "Rows",
                                            "SeriesNumber"]))
        ref = read_dataset(BytesIO(data), ts == IMPLICIT, ts != BIG)
        assert got == {tags_for([k])[0]: pydicom_value(ref, k) for k in
                       ["PatientName", "InstitutionName", "Rows", "SeriesNumber"]}


def pydicom_value(ds: Dataset, keyword: str) -> Any:
    """pydicom's decoded value in read_attributes' shape (padding stripped, tuples)."""
    elem = ds[keyword]
    values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
    pad = str.rstrip if elem.VR == "PN" else str.strip
    out = tuple(v if isinstance(v, (int, float)) else pad("" if v is None else str(v), " \0")
                for v in values)
    return out[0] if len(out) == 1 else out


def _data_store_files() -> list[str]:
    try:
        import data_store
    except ImportError:
        return []
    root = os.path.join(os.path.dirname(data_store.__file__), "data")
    return sorted(glob.glob(os.path.join(root, "**", "*.dcm"), recursive=True))


REAL = sorted(set(f for f in get_testdata_files() + get_charset_files() + _data_store_files()
                  if f.endswith(".dcm") and os.path.isfile(f)))


@pytest.mark.parametrize("path", REAL, ids=os.path.basename)
def test_real_files_match_pydicom(twin: ModuleType, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, stop_before_pixels=True)
            expected = {tags_for([k])[0]: pydicom_value(ds, k) for k in ROUTING if k in ds}
        except Exception:
            pytest.skip("pydicom cannot read or decode it either")
        with open(path, "rb") as fp:
            read_preamble(fp, True)
            ts = _read_file_meta_info(fp).get("TransferSyntaxUID")
            data = fp.read()
        if ts is None:
            pytest.skip("no transfer syntax in the file meta")
        got = read_attributes(data, ts, tags_for(ROUTING))
    assert got == expected
