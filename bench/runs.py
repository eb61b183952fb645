"""Timed transfers: one workload along one path, and the alternating rounds around them.

Paths (``PATHS``):

* ``reference`` — dcmsend -> dcmrecv (or storescp --fork), DCMTK straight to DCMTK;
* ``reference-storescu`` — storescu -> storescp --fork (``--storescu``);
* ``reference-orthanc`` — dcmsend -> Orthanc (``--orthanc``);
* ``routed`` — dcmsend -> ``fastroute serve`` -> the same receiver (plus a second one with
  ``--fanout``, plus Orthanc with ``--orthanc``).

With ``--tls`` (DICOM TLS, mutual, on every leg) the two paths are ``reference`` = storescu
+tls -> storescp +tls --fork and ``routed`` = storescu +tls -> the router's TLS listener ->
the router's TLS sender -> the same storescp +tls: the ratio is then the cost of routing
under TLS, both sides paying for the encryption. Certificates: bench/tlspki.py, made once in
the work folder.

The clock starts when the first sender is started, after every peer (and, for routed runs, the
router: listening, every destination's sender process ready) is up, and stops when every
destination holds every object (complete files, none still open) and, for routed runs, the
router's spool says nothing is pending or in flight. Every routed run gets a fresh router with a
fresh spool.
"""
from __future__ import annotations

import copy
import functools
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .peers import Orthanc, Receiver, Router
from .procs import (HOST, BenchError, SendJob, dcmsend_argv, free_port, memory_kib, sample, self_cpu,
                    storescu_argv, usage)
from .workload import Workload

SAMPLE_EVERY = 0.25   # seconds between throughput samples during a measurement
PATHS = ("reference", "reference-storescu", "reference-orthanc", "routed")
DESCRIPTIONS = {
    "reference": "dcmsend -> {recv}",
    "reference-storescu": "storescu -> storescp --fork",
    "reference-orthanc": "dcmsend -> Orthanc",
    "routed": "dcmsend -> fastroute -> {dests}",
}


class Target(Protocol):
    """A destination: a DCMTK Receiver or an Orthanc."""

    @property
    def ae_title(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def label(self) -> str: ...

    def count(self) -> int: ...
    def settled(self, expected: set[str]) -> bool | str: ...
    def clear(self) -> None: ...
    def pids(self) -> dict[int, str]: ...


@dataclass
class Options:
    senders: int = 1
    listeners: int | None = None
    associations: int | None = None
    receiver: str = "dcmrecv"
    fanout: bool = False
    orthanc: bool = False
    storescu: bool = False
    profile: dict[str, Any] = field(default_factory=dict)
    timeout: float = 600.0
    stall: float = 60.0
    keep: bool = False
    run_dir: Path = Path("bench/results/run")
    receiver_dir: Path | None = None      # where receivers write; None: run_dir / "peers"
    tls: Path | None = None               # --tls: the PKI folder (bench/tlspki.py)


class Progress:
    """One updating line on stderr (a terminal), or a line per finished step (a log file)."""

    def __init__(self, stream: Any = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.quiet = quiet
        self.prefix = ""
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        if self.quiet or not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        line = f"{self.prefix}{text}"[:150]
        self.stream.write("\r" + line + " " * max(0, self._width - len(line)))
        self.stream.flush()
        self._width = len(line)

    def line(self, text: str) -> None:
        """A line that stays (a finished step)."""
        if self.quiet:
            return
        self.clear()
        self.stream.write(f"{self.prefix}{text}\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class RunFailed(BenchError):
    """A measurement could not complete (an object missing, a process died, a stall)."""


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Bench:
    """The long-lived receivers, and ``measure()`` for one (workload, path, round)."""

    def __init__(self, opts: Options, progress: Progress) -> None:
        self.opts = opts
        self.progress = progress
        peers = opts.receiver_dir or opts.run_dir / "peers"
        if opts.tls is not None:
            self.dest1 = Receiver("storescp", peers / "dest1", "DEST1", tls_args=tls_server_args(opts.tls))
            self.dest2 = self.storescp = None
            return
        self.dest1 = Receiver(opts.receiver, peers / "dest1", "DEST1")
        self.dest2 = Receiver(opts.receiver, peers / "dest2", "DEST2") if opts.fanout else None
        self.storescp = Receiver("storescp", peers / "storescp", "STORESCP") if opts.storescu else None

    def paths(self) -> list[str]:
        if self.opts.tls is not None:
            return ["reference", "routed"]
        out = ["reference"]
        out += ["reference-storescu"] if self.opts.storescu else []
        out += ["reference-orthanc"] if self.opts.orthanc else []
        return [*out, "routed"]

    def describe(self, path: str) -> str:
        if self.opts.tls is not None:
            return {"reference": f"storescu +tls -> {self.dest1.label}",
                    "routed": f"storescu +tls -> fastroute (TLS in, TLS out) -> {self.dest1.label}"}[path]
        dests = [self.dest1.label] + ([self.dest2.label] if self.dest2 else []) + \
            (["Orthanc"] if self.opts.orthanc else [])
        return DESCRIPTIONS[path].format(recv=self.dest1.label, dests=" + ".join(dests))

    def __enter__(self) -> "Bench":
        for r in (self.dest1, self.dest2, self.storescp):
            if r is not None:
                r.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for r in (self.dest1, self.dest2, self.storescp):
            if r is not None:
                r.stop()

    # -- the router's configuration ---------------------------------------------------------

    def router_config(self, workdir: Path, targets: Mapping[str, Target]) -> dict[str, Any]:
        """The profile's keys, then what the harness owns: address, spool, destinations, and
        one catch-all route to every destination."""
        profile = copy.deepcopy(self.opts.profile)
        per_dest = profile.pop("destinations", None) or {}
        profile.pop("rules", None)
        cfg = deep_merge({"shutdown_grace": 5, "log_level": "INFO"}, profile)
        cfg.update(ae_title="FASTROUTE", host=HOST, port=free_port(), spool=str(workdir / "spool"))
        if self.opts.listeners is not None:
            cfg["listeners"] = self.opts.listeners
        if self.opts.senders > 12:     # the router's association limits (32, per AE 16, per IP 24)
            for k, default in (("max_associations", 32), ("max_associations_per_ae", 16),
                               ("max_associations_per_ip", 24)):
                cfg[k] = max(int(cfg.get(k, default)), self.opts.senders + 8)
        dests = {}
        for name, t in targets.items():
            d = deep_merge(dict(per_dest.get("*") or {}), per_dest.get(name) or {})
            d.update(ae_title=t.ae_title, host=HOST, port=t.port)
            if self.opts.associations is not None:
                d["max_associations"] = self.opts.associations
            dests[name] = d
        if self.opts.tls is not None:
            pki = self.opts.tls
            cfg["tls"] = {"port": free_port(), "cert": str(pki / "server.pem"), "key": str(pki / "server.key"),
                          "ca": str(pki / "ca.pem"), "require_client_cert": True}
            for d in dests.values():
                d["tls"] = {"ca": str(pki / "ca.pem"), "cert": str(pki / "client.pem"),
                            "key": str(pki / "client.key")}
        cfg["destinations"] = dests
        cfg["rules"] = []
        cfg["default"] = list(targets)
        return cfg

    # -- one measurement --------------------------------------------------------------------

    def measure(self, wl: Workload, path: str, rnd: int) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "workload": wl.name, "path": path, "round": rnd, "objects": len(wl.files),
            "bytes": wl.bytes, "studies": len(wl.studies), "ok": False, "error": None,
            "load_before": os.getloadavg()[0],
        }
        workdir = self.opts.run_dir / "runs" / f"round{rnd}-{wl.name}-{path}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        router: Router | None = None
        orthanc: Orthanc | None = None
        jobs: list[SendJob] = []
        spool = None
        try:
            targets: dict[str, Target] = {}
            if path in ("reference", "routed"):
                targets["dest1"] = self.dest1
            if path == "routed" and self.dest2 is not None:
                targets["dest2"] = self.dest2
            if path == "reference-storescu":
                assert self.storescp is not None
                targets["storescp"] = self.storescp
            if path == "reference-orthanc" or (path == "routed" and self.opts.orthanc):
                self.progress.update("starting Orthanc", force=True)
                orthanc = Orthanc(workdir / "orthanc").start()
                targets["orthanc"] = orthanc
            for t in targets.values():
                t.clear()
            dirs = wl.split(self.opts.senders, workdir / "send")
            if path == "routed":
                self.progress.update("starting the router", force=True)
                cfg = self.router_config(workdir, targets)
                rec["router_config"] = {k: v for k, v in cfg.items() if k not in ("spool", "port")}
                router = Router(workdir, cfg).start()
                from fastroute.spool import Spool
                spool = Spool(router.spool, readonly=True)
                port, called = router.tls_port or router.port, str(cfg["ae_title"])
            else:
                (only,) = targets.values()
                port, called = only.port, only.ae_title
            make_argv: Callable[..., list[str]] = (storescu_argv if path == "reference-storescu"
                                                   else dcmsend_argv)
            sender_name = "storescu" if path == "reference-storescu" else "dcmsend"
            if self.opts.tls is not None:       # dcmsend has no TLS: storescu +tls on both paths
                make_argv, sender_name = functools.partial(tls_storescu_argv, self.opts.tls), "storescu"

            def pids() -> dict[int, str]:
                named: dict[int, str] = {}
                for t in targets.values():
                    named.update(t.pids())
                if router is not None:
                    named.update(router.pids())
                return named

            before = sample(pids())
            locks_before = router.write_lock() if router is not None else {}
            cpu0 = self_cpu()
            t0 = time.monotonic()
            for i, d in enumerate(dirs):
                jobs.append(SendJob(make_argv(port, called, [d]), f"{sender_name}{i}",
                                    workdir / f"{sender_name}{i}.log").start())
            samples: list[tuple[float, int]] = []
            end = self._wait(wl, path, rnd, t0, jobs, targets, router, spool, samples)
            after = sample(pids())
            cpu1 = self_cpu()
            elapsed = end - t0
            accepted = max(j.ended or end for j in jobs) - t0
            procs = usage(before, after)
            procs[sender_name] = {"cpu_s": round(sum(j.cpu_s for j in jobs), 3),
                                  "peak_rss_mib": round(max(j.peak_kib for j in jobs) / 1024, 1)}
            procs["bench harness"] = {"cpu_s": round(cpu1 - cpu0, 3),
                                      "peak_rss_mib": round(memory_kib(os.getpid()).get("VmRSS", 0) / 1024, 1)}   # now: its
            # peak would be the data generation's
            rec.update(
                elapsed_s=round(elapsed, 4), senders_done_s=round(accepted, 4),
                inst_per_s=len(wl.files) / elapsed, mb_per_s=wl.bytes / elapsed / 1e6,
                studies_per_h=len(wl.studies) / elapsed * 3600, processes=procs,
                destinations={n: t.label for n, t in targets.items()}, senders=len(jobs),
                listeners=self.opts.listeners, associations=self.opts.associations,
                throughput=[[round(t, 3), c] for t, c in samples],
            )
            sustained = sustained_rate(samples, len(wl.files))
            rec["sustained_inst_per_s"] = sustained
            rec["sustained_studies_per_h"] = (sustained * len(wl.studies) / len(wl.files) * 3600
                                              if sustained and wl.studies else None)
            if spool is not None:
                spool.close()
                spool = None
            if router is not None:
                router.stop()
                code = router.proc.popen.returncode if router.proc and router.proc.popen else None
                if code not in (0, None):
                    raise RunFailed(f"the router exited with status {code} on SIGTERM:\n{router.log_tail()}")
                rec["latency_ms"] = self._latency(router.spool, wl, list(targets))
                rec["write_lock"] = lock_delta(locks_before, router.write_lock())
                rec["router_build"] = router.build()     # which fastroute and twin actually ran
            rec["ok"] = True
        except BenchError as exc:
            rec["error"] = str(exc)
        finally:
            if spool is not None:
                spool.close()
            for j in jobs:
                j.kill()
            if router is not None:
                try:
                    router.stop()
                except BenchError as exc:
                    rec["ok"], rec["error"] = False, rec["error"] or str(exc)
            if orthanc is not None:
                orthanc.stop()
            if not self.opts.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        rec["load_after"] = os.getloadavg()[0]
        return rec

    def _wait(self, wl: Workload, path: str, rnd: int, t0: float, jobs: list[SendJob],
              targets: Mapping[str, Target], router: Router | None, spool: Any,
              samples: list[tuple[float, int]] | None = None) -> float:
        """Poll until every destination holds every object; return the monotonic end time.

        ``samples`` gets (seconds since t0, objects at every destination) about every
        SAMPLE_EVERY seconds and at the end: the throughput over time."""
        expected = wl.sop_uids
        n = len(expected)
        last_state: tuple[Any, ...] | None = None
        last_change = t0
        counts = dict.fromkeys(targets, 0)
        tick = 0
        next_sample = t0
        out = samples if samples is not None else []
        while True:
            now = time.monotonic()
            tick += 1
            for j in jobs:
                j.poll_memory()
                if j.done() and j.returncode != 0:
                    raise RunFailed(f"{j.name} exited with status {j.returncode}:\n{j.log_tail()}"
                                    + (f"\nrouter log:\n{router.log_tail(15)}" if router else ""))
            if router is not None:
                router.check()
            for name, t in targets.items():
                if isinstance(t, Orthanc) and tick % 5 and counts[name] < n:
                    continue          # its REST API is polled 5x less often
                counts[name] = t.count()
            done = sum(j.done() for j in jobs)
            if now >= next_sample:
                out.append((now - t0, min(counts.values())))
                next_sample = now + SAMPLE_EVERY
            self.progress.update(f"{min(counts.values())}/{n} objects at every destination, "
                                 f"senders done {done}/{len(jobs)}, {now - t0:.1f} s")
            if done == len(jobs) and all(c >= n for c in counts.values()):
                verdicts = [t.settled(expected) for t in targets.values()]
                errors = [v for v in verdicts if isinstance(v, str)]
                if errors and now - last_change > 2.0:     # not a file still being renamed
                    raise RunFailed("; ".join(errors))
                if all(v is True for v in verdicts):
                    stats = spool.stats(list(targets)) if spool is not None else []
                    if all(q.pending + q.in_flight == 0 for q in stats if q.destination in targets):
                        out.append((now - t0, n))
                        return now
            state = (tuple(counts.values()), done)
            if state != last_state:
                last_state, last_change = state, now
            if now - last_change > self.opts.stall or now - t0 > self.opts.timeout:
                why = "no progress for" if now - last_change > self.opts.stall else "not done after"
                secs = now - last_change if why.startswith("no") else now - t0
                detail = ", ".join(f"{k}: {v}/{n}" for k, v in counts.items())
                queue = ""
                if spool is not None:
                    queue = "; router queue: " + ", ".join(
                        f"{q.destination} pending {q.pending} in flight {q.in_flight} failed {q.failed}"
                        for q in spool.stats(list(targets)) if q.destination in targets)
                raise RunFailed(f"{why} {secs:.0f} s ({detail}; senders done {done}/{len(jobs)}{queue})"
                                + (f"\nrouter log:\n{router.log_tail(15)}" if router else ""))
            time.sleep(0.02)

    @staticmethod
    def _latency(spool_path: Path, wl: Workload, dests: list[str]) -> dict[str, Any]:
        """received -> delivered per (object, destination), from the spool's records."""
        values, missing = spool_latencies(spool_path, wl.study_uids, dests)
        expected = len(wl.files) * len(dests)
        if missing or len(values) != expected:
            raise RunFailed(f"the spool records {len(values)} deliveries, {expected} expected "
                            f"({missing} recorded without delivery)")
        return latency_summary(values)


def tls_server_args(pki: Path) -> list[str]:
    """DCMTK acceptor TLS options: its key and certificate, client certificates required
    and checked against the CA (DCMTK's default profile: non-downgrading BCP 195)."""
    return ["+tls", str(pki / "server.key"), str(pki / "server.pem"), "+cf", str(pki / "ca.pem"), "-rc"]


def tls_client_args(pki: Path) -> list[str]:
    """DCMTK requestor TLS options: our client key and certificate, the server's CA."""
    return ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]


def tls_storescu_argv(pki: Path, port: int, called_ae: str, paths: Iterable[Path]) -> list[str]:
    """storescu_argv with the client's TLS options (before the address)."""
    argv = storescu_argv(port, called_ae, paths)
    at = argv.index(HOST)
    return [*argv[:at], *tls_client_args(pki), *argv[at:]]


def lock_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per router process, its write-lock totals at exit less those published before the first
    send (up to 2 s old: the idle router's few commits are all that can slip in)."""
    out = {}
    for role, a in after.items():
        b = before.get(role, {})
        out[role] = {k: round(v - b.get(k, 0.0), 4) for k, v in a.items()}
    return out


def sustained_rate(samples: list[tuple[float, int]], n: int) -> float | None:
    """Objects per second between 10 % and 90 % delivered: the steady rate, without the
    start (connecting, the first fsyncs) or the tail (the last sender finishing alone).
    None when the run is too short to have samples in that window."""
    def when(target: float) -> float | None:
        for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
            if c0 <= target <= c1 and c1 > c0:
                return t0 + (t1 - t0) * (target - c0) / (c1 - c0)
        return None
    lo, hi = when(0.1 * n), when(0.9 * n)
    if lo is None or hi is None or hi - lo < 0.2:
        return None
    return 0.8 * n / (hi - lo)


def spool_latencies(spool_path: Path, study_uids: list[str], dests: list[str]) -> tuple[list[float], int]:
    """(seconds from received to delivered for every object record and destination, how many
    records lack a delivery), read from the spool's records of the given studies."""
    from fastroute.spool import Spool

    spool = Spool(spool_path, readonly=True)
    try:
        values: list[float] = []
        missing = 0
        for uid in study_uids:
            for _, rec in spool.lookup(study_instance_uid=uid, limit=10_000_000):
                for d in dests:
                    got = rec.delivered.get(d)
                    if got is None:
                        missing += 1
                    else:
                        values.append(got.at - rec.received_at)
    finally:
        spool.close()
    return values, missing


def latency_summary(values: list[float]) -> dict[str, Any]:
    """Percentiles in milliseconds."""
    return {"n": len(values), "p50": percentile(values, 50) * 1000,
            "p95": percentile(values, 95) * 1000, "p99": percentile(values, 99) * 1000,
            "max": max(values) * 1000, "mean": statistics.fmean(values) * 1000}


def run_rounds(bench: Bench, workloads: list[Workload], rounds: int) -> list[dict[str, Any]]:
    """Every path for every workload, ``rounds`` times; the order of the paths alternates
    from round to round (reference first, then routed first, ...) so that drift in the
    machine's load does not favour one side."""
    records = []
    paths = bench.paths()
    total = rounds * len(workloads) * len(paths)
    step = 0
    for rnd in range(1, rounds + 1):
        order = paths if rnd % 2 else list(reversed(paths))
        for wl in workloads:
            for path in order:
                step += 1
                bench.progress.prefix = f"[{step}/{total}] round {rnd} {wl.name} {path}: "
                rec = bench.measure(wl, path, rnd)
                records.append(rec)
                if rec["ok"]:
                    lat = rec.get("latency_ms")
                    bench.progress.line(
                        f"{rec['elapsed_s']:.2f} s, {rec['inst_per_s']:.1f} inst/s, {rec['mb_per_s']:.1f} MB/s"
                        + (f", latency p50 {lat['p50']:.0f} ms p99 {lat['p99']:.0f} ms" if lat else ""))
                else:
                    first = (rec["error"] or "").splitlines()[0] if rec["error"] else "unknown error"
                    bench.progress.line(f"FAILED: {first}")
    bench.progress.prefix = ""
    return records
