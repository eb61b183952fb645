"""Transcoding throughput, objects/s on one core, against pydicom's own path in the same run.

Not a test. Run: ``python bench/transcode_bench.py [--rounds 5] [--objects 20]``.

Each row converts the same encoded dataset (no file meta, as a C-STORE carries it) ``objects``
times per round and reports the median of ``rounds`` rounds. The reference is the obvious
pydicom 3 code (parse, ``Dataset.decompress``/``compress``, write), so the ratio shows what
fastroute.routing.transcode costs or saves on top of the codec, which dominates for JPEG 2000.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.uid import (UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless,
                         generate_uid)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fastroute.routing.transcode import transcode  # noqa: E402

warnings.simplefilter("ignore")


def c_store_body(path: str) -> tuple[bytes, str]:
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        return fp.read(), str(meta.TransferSyntaxUID)


def synthetic_ct(seed: int = 0) -> bytes:
    """512x512 signed 16-bit CT-like slice (body ellipse, organs, noise), Explicit VR LE."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-256:256, -256:256]
    img = np.full((512, 512), -1000.0)
    img[(x / 200.0) ** 2 + (y / 150.0) ** 2 < 1] = 40.0
    for cx, cy, r, hu in ((-80, 0, 50, -800), (80, 0, 50, -800), (0, 60, 25, 700)):
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = hu
    img += rng.normal(0, 12, img.shape)
    arr = np.clip(img, -1024, 3071).astype("<i2")
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "BENCH^CT", "BENCH", "CT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OW"
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def pydicom_reference(data: bytes, src: str, dst: str) -> bytes:
    """What one would write with pydicom 3 alone."""
    ds = read_dataset(io.BytesIO(data), False, True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(src)
    if dst == ExplicitVRLittleEndian:
        ds.decompress(generate_instance_uid=False)
    else:
        ds.compress(dst, generate_instance_uid=False)
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def rates(ours: Callable[[], object], ref: Callable[[], object], objects: int,
          rounds: int) -> tuple[float, float]:
    """Median objects/s of both, rounds interleaved so background load hits both alike."""
    ours(), ref()  # warm-up: imports, plugin discovery
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((ours, samples[0]), (ref, samples[1])):
            start = time.perf_counter()
            for _ in range(objects):
                fn()
            out.append(objects / (time.perf_counter() - start))
    return statistics.median(samples[0]), statistics.median(samples[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--objects", type=int, default=20)
    args = parser.parse_args()

    import data_store
    j2kr, j2kr_ts = c_store_body(os.path.join(os.path.dirname(data_store.__file__), "data",
                                              "693_J2KR.dcm"))
    ct = synthetic_ct()
    ct_j2k = transcode(ct, ExplicitVRLittleEndian, JPEG2000Lossless)
    ct_rle = transcode(ct, ExplicitVRLittleEndian, RLELossless)
    rows = [
        ("693_J2KR.dcm 512x512 J2K lossless -> Explicit VR LE", j2kr, j2kr_ts,
         ExplicitVRLittleEndian),
        ("synthetic CT 512x512 J2K lossless -> Explicit VR LE", ct_j2k, JPEG2000Lossless,
         ExplicitVRLittleEndian),
        ("synthetic CT 512x512 RLE -> Explicit VR LE", ct_rle, RLELossless,
         ExplicitVRLittleEndian),
        ("synthetic CT 512x512 Explicit VR LE -> J2K lossless", ct, ExplicitVRLittleEndian,
         JPEG2000Lossless),
    ]
    print(f"one core, median of {args.rounds} rounds x {args.objects} objects")
    print(f"{'conversion':56s} {'fastroute/s':>12s} {'pydicom/s':>10s} {'ratio':>6s}")
    for label, data, src, dst in rows:
        ours, ref = rates(lambda: transcode(data, src, dst),
                          lambda: pydicom_reference(data, src, dst), args.objects, args.rounds)
        print(f"{label:56s} {ours:12.1f} {ref:10.1f} {ours / ref:6.2f}")
    print(f"(synthetic CT: {len(ct)} bytes native, {len(ct_j2k)} as J2K lossless, "
          f"{len(ct_rle)} as RLE)")


if __name__ == "__main__":
    main()
