"""The migration workload (``python -m bench --migration``): a PACS migration through fastroute
against the same archive moving straight to the destination, in the same run.

* archive: DCMTK ``dcmqrscp`` loaded with the generated studies (storescu), answering C-FIND
  and C-MOVE;
* reference ("direct move"): ``movescu`` asks the archive to C-MOVE every study (one query file
  per study, one association) straight to a DCMTK ``storescp --fork``;
* routed ("migration"): ``fastroute migrate start --from archive --to recv --no-verify`` on a
  running ``fastroute serve``: inventory by C-FIND, C-MOVE to fastroute's own AE, spool,
  senders -> the same receiver.

Each round measures both, alternating which goes first, from the command's start until the
receiver holds exactly the expected SOP instances. Reported: instances/s, MB/s, studies/hour,
and the ratio migration / direct move of the same round (medians over rounds). Verification is
off in the routed path (the receiver answers no C-FIND), so both paths do the same work.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .peers import Receiver, Router, python_env
from .procs import (HOST, BenchError, Managed, dcmtk_env, dcmtk_tool, free_port, group_listens,
                    start_ready, wait_until)
from .workload import Workload

ARCHIVE_AE = "QRSCP"
RECEIVER_AE = "DCMRECV"
ROUTER_AE = "FASTROUTE"
DIRECT_AE = "MOVESCU"


class Archive:
    """dcmqrscp with one storage area, knowing the router and the receiver as move targets."""

    def __init__(self, workdir: Path, targets: dict[str, tuple[str, int]]) -> None:
        self.workdir = workdir
        self.targets = targets            # name -> (AE title, port)
        self.port = 0
        self.proc: Managed | None = None

    def _config(self) -> Path:
        db = self.workdir / "db"
        db.mkdir(parents=True, exist_ok=True)
        hosts = "\n".join(f"{name} = ({ae}, {HOST}, {port})" for name, (ae, port) in self.targets.items())
        text = (f"NetworkTCPPort = {self.port}\nMaxPDUSize = 65536\nMaxAssociations = 16\n\n"
                f"HostTable BEGIN\n{hosts}\nHostTable END\n\nVendorTable BEGIN\nVendorTable END\n\n"
                f"AETable BEGIN\n{ARCHIVE_AE} {db} RW (100000, 4096mb) ANY\nAETable END\n")
        path = self.workdir / "dcmqrscp.cfg"
        path.write_text(text)
        return path

    def start(self) -> Archive:
        self.workdir.mkdir(parents=True, exist_ok=True)

        def launch() -> Managed:
            self.port = free_port()
            cfg = self._config()
            self.proc = Managed([str(dcmtk_tool("dcmqrscp")), "-c", str(cfg), str(self.port)], "dcmqrscp",
                                self.workdir / "dcmqrscp.log", env=dcmtk_env(), cwd=self.workdir)
            return self.proc.start()

        start_ready(launch, lambda proc: group_listens(proc.pid, self.port), 15,
                    message=lambda proc: f"dcmqrscp did not listen on {self.port}:\n{proc.log_tail()}")
        return self

    def load(self, files: list[Path], timeout: float) -> None:
        """Store every file into the archive with storescu (one association)."""
        listing = self.workdir / "load.txt"
        res = subprocess.run([str(dcmtk_tool("storescu")), "-aec", ARCHIVE_AE, "-aet", "LOADER", HOST,
                              str(self.port), *map(str, files)], capture_output=True, text=True,
                             env=dcmtk_env(), timeout=timeout, check=False)
        listing.write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise BenchError(f"loading the archive with storescu failed (exit {res.returncode}):\n"
                             f"{(res.stdout + res.stderr)[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(5.0)


def _query_files(work: Path, studies: list[str]) -> list[Path]:
    """One STUDY-level C-MOVE identifier file per study, for movescu."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian

    out = []
    qdir = work / "queries"
    qdir.mkdir(parents=True, exist_ok=True)
    for i, uid in enumerate(studies):
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = uid
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        path = qdir / f"q{i:05d}.dcm"
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        out.append(path)
    return out


def _wait_settled(receiver: Receiver, expected: set[str], timeout: float, stall: float,
                  check: Callable[[], None]) -> float:
    """Poll until the receiver holds exactly ``expected``; the time it did (monotonic)."""
    last, last_change = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while True:
        check()
        n = receiver.count()
        now = time.monotonic()
        if n != last:
            last, last_change = n, now
        if n >= len(expected):
            settled = receiver.settled(expected)
            if settled is True:
                return now
            if isinstance(settled, str) and now - last_change > 5:
                raise BenchError(settled)
        if now > deadline:
            raise BenchError(f"{receiver.label}: {n} of {len(expected)} objects after {timeout:.0f} s")
        if now - last_change > stall:
            raise BenchError(f"{receiver.label}: no progress for {stall:.0f} s at {n} of {len(expected)}")
        time.sleep(0.05)


def _direct(archive: Archive, receiver: Receiver, queries: list[Path], expected: set[str],
            timeout: float, stall: float) -> float:
    """movescu -> archive -> receiver; seconds until the receiver holds every instance."""
    receiver.clear()
    start = time.monotonic()
    proc = subprocess.Popen([str(dcmtk_tool("movescu")), "-S", "-aet", DIRECT_AE, "-aec", ARCHIVE_AE,
                             "-aem", RECEIVER_AE, HOST, str(archive.port), *map(str, queries)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dcmtk_env())

    def check() -> None:
        rc = proc.poll()
        if rc not in (None, 0):
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise BenchError(f"movescu exited with {rc}:\n{out[-2000:]}")
    try:
        end = _wait_settled(receiver, expected, timeout, stall, check)
    finally:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return end - start


def _routed(router: Router, receiver: Receiver, name: str, expected: set[str], timeout: float,
            stall: float) -> float:
    """fastroute migrate start -> inventory, C-MOVE, spool, send; seconds until delivered."""
    receiver.clear()
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "fastroute", "migrate", "start", "-c", str(router.path),
                          "--from", "archive", "--to", "recv", "--no-verify", "--name", name],
                         capture_output=True, text=True, env=python_env(), timeout=120, check=False)
    if res.returncode != 0:
        raise BenchError(f"fastroute migrate start failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
    end = _wait_settled(receiver, expected, timeout, stall, router.check)

    def done() -> bool:
        out = subprocess.run([sys.executable, "-m", "fastroute", "migrate", "status", name, "--json",
                              "-c", str(router.path)], capture_output=True, text=True,
                             env=python_env(), timeout=60, check=False)
        try:
            return json.loads(out.stdout).get("state") in ("done", "done-with-errors")
        except ValueError:
            return False
    # The job's own bookkeeping must agree (it ends once its studies are delivered).
    wait_until(done, 60, 0.2, message=lambda: f"job {name} did not finish:\n{router.log_tail()}")
    return end - start


def run_migration(workload: Workload, work: Path, rounds: int, timeout: float, stall: float,
                  progress: Callable[[str], None]) -> dict[str, Any]:
    """Measure both paths ``rounds`` times; the figures and medians as JSON-ready data."""
    files = [f[0] for f in workload.files]
    expected = workload.sop_uids
    studies = workload.study_uids
    nbytes = workload.bytes
    # storescp --fork: one process per association, so the router's sender keeping its
    # association open (idle_release) cannot hold up the direct move's association.
    receiver = Receiver("storescp", work / "receiver", RECEIVER_AE).start()
    router_port = free_port()
    archive = Archive(work / "archive", {"recv": (RECEIVER_AE, receiver.port),
                                         "fastroute": (ROUTER_AE, router_port)}).start()
    router: Router | None = None
    records: list[dict[str, Any]] = []
    try:
        progress(f"loading {len(files)} instances of {len(studies)} studies into dcmqrscp")
        archive.load(files, timeout)
        queries = _query_files(work, studies)
        config = {
            "ae_title": ROUTER_AE, "port": router_port, "host": HOST, "spool": str(work / "spool"),
            "min_free_bytes": "256MiB", "log_level": "INFO", "shutdown_grace": 5,
            "sources": {"archive": {"ae_title": ARCHIVE_AE, "host": HOST, "port": archive.port,
                                    "retrieve": "move", "max_associations": 2}},
            "destinations": {"recv": {"ae_title": RECEIVER_AE, "host": HOST, "port": receiver.port}},
            "rules": [],
        }
        router = Router(work / "router", config).start()
        for r in range(rounds):
            order = ["direct", "migration"] if r % 2 == 0 else ["migration", "direct"]
            for path in order:
                progress(f"round {r + 1}/{rounds}: {path}")
                if path == "direct":
                    seconds = _direct(archive, receiver, queries, expected, timeout, stall)
                else:
                    seconds = _routed(router, receiver, f"bench-{r + 1}", expected, timeout, stall)
                records.append({"round": r + 1, "path": path, "seconds": round(seconds, 3),
                                "instances_per_s": round(len(expected) / seconds, 1),
                                "mb_per_s": round(nbytes / seconds / 1e6, 2),
                                "studies_per_hour": round(len(studies) / seconds * 3600, 0)})
    finally:
        if router is not None:
            router.stop()
        archive.stop()
        receiver.stop()
    summary: dict[str, Any] = {}
    for path in ("direct", "migration"):
        rs = [x for x in records if x["path"] == path]
        summary[path] = {k: statistics.median(x[k] for x in rs)
                         for k in ("instances_per_s", "mb_per_s", "studies_per_hour", "seconds")}
    ratios = []
    for r in range(1, rounds + 1):
        d = next(x for x in records if x["round"] == r and x["path"] == "direct")
        m = next(x for x in records if x["round"] == r and x["path"] == "migration")
        ratios.append(round(m["instances_per_s"] / d["instances_per_s"], 3))
    return {"instances": len(expected), "studies": len(studies), "bytes": nbytes, "rounds": records,
            "summary": summary, "ratios": ratios, "ratio_median": statistics.median(ratios)}


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [f"migration workload: {result['studies']} studies, {result['instances']} instances, "
             f"{result['bytes'] / 1e6:.1f} MB (medians of {len(result['ratios'])} rounds)",
             f"{'path':<44} {'inst/s':>8} {'MB/s':>7} {'studies/h':>10} {'seconds':>8}"]
    names = {"direct": "direct move (movescu: dcmqrscp -> storescp)",
             "migration": "migration (dcmqrscp -> fastroute -> storescp)"}
    for path in ("direct", "migration"):
        x = s[path]
        lines.append(f"{names[path]:<44} {x['instances_per_s']:>8.1f} {x['mb_per_s']:>7.2f} "
                     f"{x['studies_per_hour']:>10.0f} {x['seconds']:>8.2f}")
    lines.append(f"ratio migration / direct move: median {result['ratio_median']:.2f} "
                 f"(rounds: {', '.join(f'{r:.2f}' for r in result['ratios'])})")
    return "\n".join(lines)
