"""Transcoding end to end: fastroute converts only when the destination refuses the original."""
from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

import peers
from dicomcompare import assert_same_dataset
from peers import storescu, wait_until
from router import Router, destination

pytestmark = pytest.mark.peers

EXPLICIT_LE = "1.2.840.10008.1.2.1"
COMPRESSED_SOURCES = [
    ("693_J2KR.dcm", True),                     # JPEG 2000 lossless
    ("MR2_J2KI.dcm", False),                    # JPEG 2000 lossy
    ("OBXXXX1A_rle_2frame.dcm", True),          # RLE, multi-frame colour
    # decoded on the default install by python-gdcm / pyjpegls (no GPL plugin):
    ("JPEG-LL.dcm", True),                      # JPEG lossless SV1
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", False),      # JPEG baseline, YCbCr
    ("emri_small_jpeg_ls_lossless.dcm", True),  # JPEG-LS lossless
    ("JPEGLSNearLossless_08.dcm", False),       # JPEG-LS near-lossless
]


def _sample(data_dir: Path, name: str) -> Path:
    """A pydicom-data file, else one of pydicom's own test files."""
    if (data_dir / name).exists():
        return data_dir / name
    found = get_testdata_file(name)
    assert found is not None, name
    return Path(found)


def _route_all(dest: dict[str, Any]) -> dict[str, Any]:
    return {"destinations": {"pacs": dest}, "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]}


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array


def test_explicit_only_destination_gets_decoded_pixels(tmp_path: Path, router: Callable[..., Router],
                                                       storescp: Callable[..., peers.StoreSCP],
                                                       pydicom_data_dir: Path) -> None:
    files = [_sample(pydicom_data_dir, name) for name, _ in COMPRESSED_SOURCES]
    deflated = get_testdata_file("image_dfl.dcm")
    assert deflated is not None
    files.append(Path(deflated))
    scp = storescp("PACS", accept=[EXPLICIT_LE])
    r = router(_route_all(destination(scp.port, "PACS")))
    res = storescu(r.port, files, propose="original")
    assert res.returncode == 0, res.stdout + res.stderr
    scp.wait_for(len(files), timeout=120)
    lossless = dict(COMPRESSED_SOURCES)
    for f in files:
        original = pydicom.dcmread(f)
        got = scp.file_for(str(original.SOPInstanceUID))
        assert got is not None, f.name
        delivered = pydicom.dcmread(got)
        assert delivered.file_meta.TransferSyntaxUID == EXPLICIT_LE, f.name
        assert delivered.SOPInstanceUID == original.SOPInstanceUID
        assert delivered.get("StudyInstanceUID") == original.get("StudyInstanceUID")
        assert delivered.get("PatientID") == original.get("PatientID")
        if "PixelData" in original:
            expected = _pixels(original)
            if lossless.get(f.name, True):
                np.testing.assert_array_equal(_pixels(delivered), expected, err_msg=f.name)
            else:   # lossy source: still exactly the decoder's output, and marked lossy
                np.testing.assert_array_equal(_pixels(delivered), expected, err_msg=f.name)
                assert delivered.get("LossyImageCompression") == "01"
    q = r.queue()["pacs"]
    assert q["failed"] == 0
    counters = r.cli("queue", "--json").stdout
    assert '"transcoded:pacs"' in counters


def test_destination_accepting_original_gets_it_untouched(tmp_path: Path, router: Callable[..., Router],
                                                          storescp: Callable[..., peers.StoreSCP],
                                                          pydicom_data_dir: Path) -> None:
    files = [pydicom_data_dir / "693_J2KR.dcm", pydicom_data_dir / "emri_small_RLE.dcm"]
    direct = storescp("DIRECT", bit_preserving=True)
    assert storescu(direct.port, files, called_ae="DIRECT", propose="original").returncode == 0
    direct.wait_for(2)
    scp = storescp("PACS", bit_preserving=True)
    r = router(_route_all(destination(scp.port, "PACS",
                                      transfer_syntaxes=[EXPLICIT_LE, "1.2.840.10008.1.2.4.90",
                                                         "1.2.840.10008.1.2.5"])))
    assert storescu(r.port, files, propose="original").returncode == 0
    scp.wait_for(2, timeout=60)
    from fastroute.cli import read_part10
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        got, ref = scp.file_for(uid), direct.file_for(uid)
        assert got is not None and ref is not None
        assert read_part10(got) == read_part10(ref)      # same syntax, same bytes


@pytest.mark.parametrize("compress,ts", [("rle", "1.2.840.10008.1.2.5"),
                                         ("j2k-lossless", "1.2.840.10008.1.2.4.90")])
def test_compressing_destination_round_trips_exactly(tmp_path: Path, router: Callable[..., Router],
                                                     storescp: Callable[..., peers.StoreSCP],
                                                     compress: str, ts: str) -> None:
    import synth
    files = synth.make_study(tmp_path / "ct", modality="CT", n_instances=3, rows=128, cols=96, seed=3)
    files += synth.make_study(tmp_path / "us", modality="US", n_instances=1, rows=64, cols=48, frames=2, seed=4)
    scp = storescp("PACS", accept="all")
    r = router(_route_all(destination(scp.port, "PACS", compress=compress)), name=f"router-{compress}")
    assert storescu(r.port, files).returncode == 0
    scp.wait_for(len(files), timeout=60)
    for f in files:
        original = pydicom.dcmread(f)
        delivered = pydicom.dcmread(scp.file_for(str(original.SOPInstanceUID)))
        assert delivered.file_meta.TransferSyntaxUID == ts
        np.testing.assert_array_equal(delivered.pixel_array, original.pixel_array)
        assert "LossyImageCompression" not in delivered or delivered.LossyImageCompression == "00"
        for kw in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber"):
            assert delivered.get(kw) == original.get(kw), kw


def test_no_decoder_fails_with_a_clear_message(tmp_path: Path, router: Callable[..., Router],
                                               storescp: Callable[..., peers.StoreSCP],
                                               pydicom_data_dir: Path) -> None:
    # Relabel a JPEG 2000 object as JPEG 2000 Part 2 multi-component: nothing installed decodes it.
    src = pydicom.dcmread(pydicom_data_dir / "693_J2KR.dcm")
    src.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.92"
    f = tmp_path / "part2.dcm"
    src.save_as(f, enforce_file_format=True)
    scp = storescp("PACS", accept=[EXPLICIT_LE])
    r = router(_route_all(destination(scp.port, "PACS")))
    assert storescu(r.port, [f], propose="original").returncode == 0
    wait_until(lambda: r.queue()["pacs"]["failed"] == 1, 30, message="object did not fail")
    listing = r.cli("queue", "--failed", "pacs").stdout
    assert "1.2.840.10008.1.2.4.92" in listing, listing
    assert scp.files() == []


def test_missing_decoder_failure_names_syntax_and_package(tmp_path: Path, router: Callable[..., Router],
                                                          storescp: Callable[..., peers.StoreSCP],
                                                          pydicom_data_dir: Path) -> None:
    """JPEG 2000 Part 2 has no pydicom decoder: for a destination that refuses it, the failed
    entry and the log name the syntax instead of blaming the destination's SOP class support
    ("accepted no transfer syntax"), and say that no decoder is installed for it."""
    part2 = "1.2.840.10008.1.2.4.92"
    ds = pydicom.dcmread(pydicom_data_dir / "693_J2KR.dcm")
    ds.file_meta.TransferSyntaxUID = part2   # a Part 1 codestream is a valid Part 2 one
    source = tmp_path / "part2.dcm"
    ds.save_as(source)
    scp = storescp("PACS", accept=[EXPLICIT_LE])
    r = router(_route_all(destination(scp.port, "PACS")))
    res = storescu(r.port, [source], propose="original")
    assert res.returncode == 0, res.stdout + res.stderr
    wait_until(lambda: r.queue()["pacs"]["failed"] == 1, 60, message="object did not fail")
    report = r.cli("queue", "--json", "--failed", "pacs").stdout
    for text in (part2, "no decoder"):
        assert text in report, report
        wait_until(lambda: text in r.log_text(), 10, message=f"log lacks {text!r}")
    assert "accepted no transfer syntax" not in report


def test_12bit_jpeg_extended_reaches_an_explicit_only_destination(tmp_path: Path, router: Callable[..., Router],
                                                                  storescp: Callable[..., peers.StoreSCP]) -> None:
    """12-bit JPEG Extended (CT/MR from older modalities) is decoded by GDCM on the default
    install; the pixels are DCMTK's (dcmdjpeg), and the result is marked lossy."""
    import subprocess
    if shutil.which("dcmdjpeg") is None:
        pytest.skip("DCMTK's dcmdjpeg is not installed")
    source = get_testdata_file("JPGExtended.dcm")
    assert source is not None
    reference = tmp_path / "ref.dcm"
    subprocess.run(["dcmdjpeg", source, str(reference)], check=True, timeout=60)
    scp = storescp("PACS", accept=[EXPLICIT_LE])
    r = router(_route_all(destination(scp.port, "PACS")))
    res = storescu(r.port, [Path(source)], propose="original")
    assert res.returncode == 0, res.stdout + res.stderr
    scp.wait_for(1, timeout=60)
    original = pydicom.dcmread(source, stop_before_pixels=True)
    got = scp.file_for(str(original.SOPInstanceUID))
    assert got is not None
    delivered = pydicom.dcmread(got)
    assert delivered.file_meta.TransferSyntaxUID == EXPLICIT_LE
    np.testing.assert_array_equal(delivered.pixel_array, pydicom.dcmread(reference).pixel_array)
    assert delivered.LossyImageCompression == "01"
    assert r.queue()["pacs"]["failed"] == 0
