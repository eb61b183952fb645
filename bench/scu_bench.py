"""Storage SCU throughput: fastroute.dicom.scu.Connection vs DCMTK storescu.

Not a test. Run: ``python bench/scu_bench.py [--tiny 300] [--ct 60] [--rounds 3]
[--receiver storescp dcmrecv] [--store]``.

Each row sends the same objects over one association (association set-up and release
included) into a DCMTK receiver on 127.0.0.1 and reports the median of ``rounds`` rounds as
objects/s and MB/s, with the ratio to DCMTK storescu measured in the same run (storescu's time
includes its process start and reading the files, which is what "DCMTK direct" costs). By
default receivers run with --ignore (receive, do not write) so the sender is what is timed;
``--store`` writes the files as a real destination would.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import peers  # noqa: E402
from pydicom.filereader import _read_file_meta_info, read_preamble  # noqa: E402

from bench.synth import make_study, make_tiny  # noqa: E402
from fastroute.config import DestinationConfig  # noqa: E402
from fastroute.dicom.scu import Connection  # noqa: E402

Body = tuple[str, str, str, bytes]


def c_store_body(path: Path) -> Body:
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        return (str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                str(meta.TransferSyntaxUID), fp.read())


def send_with(cls: type[Connection], port: int, ae_title: str, bodies: list[Body]) -> None:
    dest = DestinationConfig(name="bench", ae_title=ae_title, host=peers.HOST, port=port)
    conn = cls(dest, "BENCH")
    conn.ensure({(b[0], b[2]) for b in bodies})
    for sop_class, sop_uid, ts, data in bodies:
        cx = conn.context_for(sop_class, ts)
        assert cx is not None
        result = conn.send_raw(cx, sop_class, sop_uid, data)
        if result.status != 0:
            raise RuntimeError(f"{cls.__name__}: status 0x{result.status:04X} for {sop_uid}")
    conn.release()


def send_storescu(port: int, ae_title: str, files: list[Path]) -> None:
    done = peers.storescu(port, files, ae_title, "BENCH", propose="original", timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-500:]}")


def median_seconds(run: Callable[[], None], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", type=int, default=300, help="number of ~10 kB objects")
    parser.add_argument("--ct", type=int, default=60, help="number of 512x512 CT objects")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--receiver", nargs="+", default=["storescp", "dcmrecv"],
                        choices=["storescp", "dcmrecv"])
    parser.add_argument("--store", action="store_true", help="receivers write what they get")
    args = parser.parse_args()
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory(prefix="scu-bench-") as tmp:
        work = Path(tmp)
        sets = {"tiny": make_tiny(work / "tiny", n=args.tiny),
                "CT": make_study(work / "ct", n_instances=args.ct)}
        print(f"{'receiver':9} {'objects':8} {'sender':12} {'obj/s':>8} {'MB/s':>7} {'vs DCMTK':>9}")
        for receiver in args.receiver:
            for label, files in sets.items():
                bodies = [c_store_body(f) for f in files]
                megabytes = sum(len(b[3]) for b in bodies) / 1e6
                scp: peers.StoreSCP | peers.DcmRecv
                where = work / f"{receiver}-{label}"
                if receiver == "storescp":   # track=False: no shell forked per object
                    scp = peers.StoreSCP("BENCHSCP", workdir=where, ignore=not args.store,
                                         track=False)
                else:
                    scp = peers.DcmRecv("BENCHSCP", workdir=where, ignore=not args.store)
                scp.start()
                try:
                    runs: dict[str, Callable[[], None]] = {
                        "DCMTK": lambda: send_storescu(scp.port, "BENCHSCP", files),
                        "fastroute": lambda: send_with(Connection, scp.port, "BENCHSCP", bodies),
                    }
                    reference = None
                    for name, run in runs.items():
                        if args.store:
                            scp.clear()
                        seconds = median_seconds(run, args.rounds)
                        reference = reference or seconds
                        print(f"{receiver:9} {label:8} {name:12} {len(bodies) / seconds:8.0f} "
                              f"{megabytes / seconds:7.1f} {reference / seconds:8.2f}x", flush=True)
                finally:
                    scp.stop()


if __name__ == "__main__":
    main()
