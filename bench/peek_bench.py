"""Micro-benchmark: tag peek (native, python) vs pydicom.dcmread(stop_before_pixels=True).

Not a test. Prints the median time per object for each way of getting the routing tags from
the same in-memory files, and the ratio to dcmread measured in the same run (the target is
native >= 20x faster than dcmread). The `valid` column is the native whole-dataset structure
check (validate: every element header to the end, issue 11), `GB/s` its throughput over the
dataset bytes (values are skipped, not read), `py val` the pure-Python twin's. Usage: ``python bench/peek_bench.py [--repeat N]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from io import BytesIO

import pydicom
from pydicom.data import get_testdata_file
from pydicom.filereader import _read_file_meta_info, read_preamble

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastroute.dicom.peek as py_twin  # noqa: E402
from fastroute.dicom.attrs import read_attributes, tags_for  # noqa: E402
from fastroute.native import PEEK_IMPL  # noqa: E402

try:
    import fastroute.dicom._peek as native_twin
except ImportError:
    native_twin = None  # type: ignore[assignment]

ROUTING = ("Modality", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
           "SOPClassUID", "PatientID", "AccessionNumber", "StudyDescription", "PatientName",
           "InstitutionName", "BodyPartExamined")
# pydicom-data files first (real-world sizes), then pydicom's own small ones as a fallback.
FILES = ("MR2_UNCI.dcm", "RG1_UNCR.dcm", "US1_J2KR.dcm", "eCT_Supplemental.dcm",
         "693_J2KR.dcm", "CT_small.dcm", "rtplan.dcm", "MR_small_bigendian.dcm")


def load(name: str) -> tuple[bytes, bytes, bool, bool, str] | None:
    """(whole file, dataset bytes after file meta, implicit, little, transfer syntax)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        return None
    with open(path, "rb") as fp:
        whole = fp.read()
        fp.seek(0)
        read_preamble(fp, False)
        ts = str(_read_file_meta_info(fp).TransferSyntaxUID)
        data = fp.read()
    uid = pydicom.uid.UID(ts)
    return whole, data, uid.is_implicit_VR, uid.is_little_endian, ts


def median_us(fn: Callable[[], object], repeat: int) -> float:
    """Median microseconds per call over `repeat` batches sized to ~2 ms each."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    batch = max(1, int(0.002 / max(once, 1e-9)))
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch)
    return statistics.median(samples) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=25, help="batches per measurement")
    args = parser.parse_args()
    tags = tags_for(ROUTING)
    print(f"native twin: {'built' if native_twin else 'NOT BUILT (python only)'}; "
          f"pydicom {pydicom.__version__}; median us/object over {args.repeat} batches")
    header = (f"{'file':28} {'KiB':>6} {'dcmread':>9} {'python':>8} {'native':>8} "
              f"{'attrs':>8} {'py x':>6} {'nat x':>7} {'valid':>8} {'GB/s':>6} {'py val':>8}")
    print(header)
    print("-" * len(header))
    ratios = []
    for name in FILES:
        loaded = load(name)
        if loaded is None:
            print(f"{name:28} (not available)")
            continue
        whole, data, imp, le, ts = loaded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_dcm = median_us(lambda: pydicom.dcmread(BytesIO(whole), stop_before_pixels=True),
                              args.repeat)
        t_py = median_us(lambda: py_twin.peek(data, tags, imp, le), args.repeat)
        t_nat = t_attrs = float("nan")
        if native_twin is not None:
            t_nat = median_us(lambda: native_twin.peek(data, tags, imp, le), args.repeat)
            ratios.append(t_dcm / t_nat)
        t_attrs = median_us(lambda: read_attributes(data, ts, tags), args.repeat)
        t_val = float("nan")
        if native_twin is not None:
            t_val = median_us(lambda: native_twin.validate(data, imp, le), args.repeat)
        t_pyval = median_us(lambda: py_twin.validate(data, imp, le), args.repeat)
        print(f"{name:28} {len(whole) / 1024:6.0f} {t_dcm:9.1f} {t_py:8.1f} {t_nat:8.2f} "
              f"{t_attrs:8.1f} {t_dcm / t_py:6.1f} {t_dcm / t_nat:7.0f} {t_val:8.2f} "
              f"{len(data) / t_val / 1e3:6.1f} {t_pyval:8.1f}")
    if ratios:
        worst = min(ratios)
        verdict = "meets" if worst >= 20 else "MISSES"
        print(f"\nnative vs dcmread: worst {worst:.0f}x, median {statistics.median(ratios):.0f}x "
              f"-> {verdict} the >= 20x target ('attrs' = read_attributes with decoding, "
              f"via the {PEEK_IMPL} peek)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
