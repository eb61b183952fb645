"""Receive throughput: fastroute's asyncio SCP vs DCMTK dcmrecv, objects/s.

Not a test. Run: ``python bench/scp_bench.py [--tiny 200] [--ct 40] [--repeat 3]``.

DCMTK dcmsend pushes N tiny (~10 kB) and N CT (512x512, ~0.5 MB) objects, over one association
and over 4 concurrent ones (N/4 files each), into: ``fastroute.dicom.scp.Listener`` (in this
process, wired as ``workers.listener_main`` wires it: Spool + RuleSet + group-commit Committer
behind ``routing.intake.StoreService``, so every success is an fsynced LMDB commit; with
``--null-commit`` it answers at once without spooling, which shows the protocol ceiling), and
DCMTK ``dcmrecv`` writing files (no fsync) as the reference measured in the same run. Prints
the median of ``repeat`` runs per cell and the ratio fast/dcmrecv. (The pynetdicom engine it
was once compared with left the product; its figures are in the README's history.)
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import peers  # noqa: E402
from bench import synth  # noqa: E402
from fastroute.config import loads  # noqa: E402
from fastroute.dicom.dimse import CommandField  # noqa: E402
from fastroute.dicom.scp import Listener  # noqa: E402
from fastroute.routing.intake import StoreService  # noqa: E402
from fastroute.routing.rules import RuleSet  # noqa: E402
from fastroute.spool.commit import Committer  # noqa: E402
from fastroute.spool import Incoming, PutResult, Spool  # noqa: E402


class NullCommitter(Committer):
    """Answers every object at once without spooling it: the SCP's own ceiling, no fsync."""

    def __init__(self) -> None:   # no thread, no spool
        self.commits = self.objects = 0

    def submit(self, item: Incoming) -> PutResult:
        self.commits += 1
        self.objects += 1
        return PutResult(self.objects, (), (), ())

    def submit_nowait(self, item: Incoming) -> Future[PutResult]:
        fut: Future[PutResult] = Future()
        fut.set_result(self.submit(item))
        return fut

    def close(self) -> None:
        pass


class InProcess:
    """A fastroute listener on a fresh spool, started and stopped by us."""

    def __init__(self, workdir: Path, gather: float, null: bool = False) -> None:
        self.port = peers.free_port()
        cfg = loads(yaml.safe_dump({
            "ae_title": "FASTROUTE", "host": "127.0.0.1", "port": self.port,
            "spool": str(workdir / "spool"), "spool_max_bytes": "8GiB", "min_free_bytes": 0,
            "group_commit_delay": gather, "max_pdu": 262144}))
        self.spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, min_free_bytes=0)
        self.committer = (NullCommitter() if null else
                          Committer(self.spool, None, gather=cfg.group_commit_delay))
        service = StoreService(RuleSet.from_config(cfg), self.committer)
        self.receiver = Listener(cfg, {CommandField.C_STORE_RQ: service})
        if not null:   # as workers.listener_main: a lone association does not wait to gather
            self.committer.siblings = self.receiver.active
        self.receiver.start()

    def count(self) -> int:
        if isinstance(self.committer, NullCommitter):
            return self.committer.objects
        return self.spool.object_count()

    def close(self) -> None:
        self.receiver.stop(2.0)
        self.committer.close()
        self.spool.close()


class DcmRecvTarget:
    def __init__(self, workdir: Path) -> None:
        self.scp = peers.DcmRecv("FASTROUTE", workdir=workdir)
        self.scp.start()
        self.port = self.scp.port

    def count(self) -> int:
        return len(self.scp.files())

    def close(self) -> None:
        self.scp.stop()


def send(port: int, files: Sequence[Path], associations: int) -> float:
    """Seconds for ``associations`` concurrent dcmsend processes to deliver ``files``."""
    env = peers.dcmtk_env()
    groups = [files[i::associations] for i in range(associations)]
    argv = [str(peers.dcmtk_tool("dcmsend")), "-aet", "BENCH", "-aec", "FASTROUTE", "-dn", "-ma",
            "127.0.0.1", str(port)]
    start = time.perf_counter()
    procs = [subprocess.Popen([*argv, *map(str, g)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL) for g in groups]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"dcmsend failed ({p.returncode}): {err.decode()[-500:]}")
    return time.perf_counter() - start


def measure(make: Callable[[Path], Any], files: Sequence[Path], associations: int, repeat: int,
            tmp: Path) -> float:
    """Median objects/s over ``repeat`` runs, each into a fresh receiver."""
    rates = []
    for i in range(repeat):
        work = Path(tempfile.mkdtemp(dir=tmp))
        target = make(work)
        try:
            seconds = send(target.port, files, associations)
            n = target.count()
            if n != len(files):
                raise RuntimeError(f"{type(target).__name__}: {n} of {len(files)} objects arrived")
            rates.append(len(files) / seconds)
        finally:
            target.close()
            shutil.rmtree(work, ignore_errors=True)
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", type=int, default=200, help="tiny objects per run")
    ap.add_argument("--ct", type=int, default=40, help="512x512 CT objects per run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gather", type=float, default=0.002,
                    help="Committer group_commit_delay (config default 0.002)")
    ap.add_argument("--null-commit", action="store_true",
                    help="answer success without spooling: the SCP's ceiling without fsync")
    ap.add_argument("--only", choices=["fast", "dcmrecv"], action="append")
    args = ap.parse_args()
    engines: dict[str, Callable[[Path], Any]] = {
        "fast": lambda w: InProcess(w, args.gather, args.null_commit),
        "dcmrecv": DcmRecvTarget,
    }
    chosen = args.only or list(engines)
    with tempfile.TemporaryDirectory(prefix="fastroute-scp-bench-") as tmpdir:
        tmp = Path(tmpdir)
        workloads = {}       # --tiny 0 / --ct 0 leave a workload out
        if args.tiny:
            workloads[f"tiny x{args.tiny}"] = synth.make_tiny(tmp / "tiny", args.tiny)
        if args.ct:
            workloads[f"CT 512x512 x{args.ct}"] = synth.make_study(tmp / "ct", n_instances=args.ct)
        how = ("answer without spooling (--null-commit)" if args.null_commit else
               f"commit to LMDB with fsync, group_commit_delay={args.gather}")
        print(f"median of {args.repeat}, objects/s (dcmsend -> receiver; fastroute engines {how})")
        header = f"{'workload':<20} {'assocs':>6} " + " ".join(f"{e:>11}" for e in chosen)
        ratios = [r for r in ("fast/dcmrecv",)
                  if all(e in chosen for e in r.split("/"))]
        print(header + "".join(f" {r:>16}" for r in ratios))
        for name, files in workloads.items():
            for assocs in (1, 4):
                rates = {e: measure(engines[e], files, assocs, args.repeat, tmp) for e in chosen}
                row = f"{name:<20} {assocs:>6} " + " ".join(f"{rates[e]:>11.1f}" for e in chosen)
                for r in ratios:
                    a, b = r.split("/")
                    row += f" {rates[a] / rates[b]:>15.2f}x"
                print(row, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TCP_NODELAY", "1")
    main()
