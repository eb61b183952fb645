"""Soak: send at a steady rate for a while and watch every process's resident memory.

Once a second, a dcmsend is started with ``rate`` objects taken in turn from the workload
(at most ``senders`` at a time; a tick with every sender still busy is skipped and counted, so
a router that cannot keep up shows as a lower achieved rate and a growing backlog). Objects
are re-sent as they come round again, so the router runs with ``duplicate_window: 0`` (else
identical re-sends would be suppressed, not sent) and the receivers with ``--ignore`` (they
receive but do not store, so the disk does not fill). Delivery is checked with the spool's
counters. Memory is sampled every ``sample_every`` seconds: VmRSS, and RssAnon (private memory:
heap, arenas), which is what a leak grows; RSS also counts mapped file pages, and the LMDB
spool's map grows with every object's record, so it is reported but not judged. A process's
memory counts as bounded when the least-squares growth of its RssAnon over the second half of
the soak is below max(2 MiB, 5 % of its mean there).
"""
from __future__ import annotations

import itertools
import os
import shutil
import time
from typing import Any

from .peers import Receiver, Router
from .procs import BenchError, SendJob, dcmsend_argv, memory_kib
from .runs import Bench, Options, Progress, latency_summary, spool_latencies
from .workload import Workload


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope dy/dx; 0 for fewer than two points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def memory_verdicts(samples: dict[str, list[tuple[float, float]]], duration: float) -> dict[str, Any]:
    out = {}
    for role, pts in samples.items():
        half = [p for p in pts if p[0] >= duration / 2]
        slope = _slope(half)                          # MiB per second
        growth = slope * (duration / 2)
        mean = sum(y for _, y in half) / len(half) if half else 0.0
        limit = max(2.0, 0.05 * mean)
        out[role] = {
            "first_mib": pts[0][1] if pts else 0.0, "last_mib": pts[-1][1] if pts else 0.0,
            "max_mib": max((y for _, y in pts), default=0.0), "slope_mib_per_h": slope * 3600,
            "second_half_growth_mib": growth, "limit_mib": limit,
            "verdict": "bounded" if len(half) >= 3 and growth < limit else
                       "too few samples" if len(half) < 3 else "GROWING",
            "samples": pts,
        }
    return out


def soak(opts: Options, wl: Workload, minutes: float, rate: int, sample_every: float,
         progress: Progress) -> dict[str, Any]:
    duration = minutes * 60
    workdir = opts.run_dir / "soak"
    shutil.rmtree(workdir, ignore_errors=True)
    receivers = {"dest1": Receiver(opts.receiver, workdir / "dest1", "DEST1", ignore=True)}
    if opts.fanout:
        receivers["dest2"] = Receiver(opts.receiver, workdir / "dest2", "DEST2", ignore=True)
    jobs: list[SendJob] = []
    router: Router | None = None
    spool = None
    result: dict[str, Any] = {"minutes": minutes, "rate": rate, "workload": wl.description,
                              "sample_every_s": sample_every}
    try:
        for r in receivers.values():
            r.start()
        helper = Bench(opts, progress)
        cfg = helper.router_config(workdir, receivers)
        cfg["duplicate_window"] = 0
        result["router_config"] = {k: v for k, v in cfg.items() if k not in ("spool", "port")}
        progress.update("starting the router", force=True)
        router = Router(workdir, cfg).start()
        from fastroute.spool import CounterKind, Spool
        spool = Spool(router.spool, readonly=True)
        data_mdb = router.spool / "data.mdb"
        files = itertools.cycle([f[0] for f in wl.files])
        samples: dict[str, list[tuple[float, float]]] = {}     # VmRSS
        anon: dict[str, list[tuple[float, float]]] = {}        # RssAnon: what a leak grows
        backlog: list[tuple[float, int]] = []
        submitted = skipped = failures = 0
        max_backlog = 0
        spool_start = data_mdb.stat().st_size / 2**20
        t0 = time.monotonic()
        next_tick = t0
        next_sample = t0
        n_job = 0
        while True:
            now = time.monotonic()
            elapsed = now - t0
            if elapsed >= duration:
                break
            router.check()
            running = [j for j in jobs if not j.done()]
            for j in jobs:
                if j.done() and j.returncode != 0:
                    failures += 1
            jobs = running
            if now >= next_tick:
                next_tick += 1.0
                if len(running) < opts.senders:
                    batch = [next(files) for _ in range(rate)]
                    n_job += 1
                    jobs.append(SendJob(dcmsend_argv(router.port, "FASTROUTE", batch), f"dcmsend{n_job}",
                                        workdir / f"send{n_job % 8}.log").start())
                    submitted += len(batch)
                else:
                    skipped += 1
            if now >= next_sample:
                next_sample += sample_every
                pids: dict[int, str] = {}
                for r in receivers.values():
                    pids.update(r.pids())
                pids.update(router.pids())
                pids[os.getpid()] = "bench harness"
                for pid, role in pids.items():
                    mem = memory_kib(pid)
                    if "VmRSS" in mem:
                        samples.setdefault(role, []).append((round(elapsed, 2), round(mem["VmRSS"] / 1024, 2)))
                        anon.setdefault(role, []).append((round(elapsed, 2), round(mem.get("RssAnon", 0) / 1024, 2)))
                stats = spool.stats(list(receivers))
                b = sum(q.pending + q.in_flight for q in stats if q.destination in receivers)
                backlog.append((round(elapsed, 2), b))
                max_backlog = max(max_backlog, b)
                c = spool.counters()
                progress.update(f"soak {elapsed / 60:.1f}/{minutes} min: sent {submitted}, "
                                f"received {c.of(CounterKind.RECEIVED)}, backlog {b}, skipped ticks {skipped}")
            time.sleep(max(0.0, min(next_tick, next_sample) - time.monotonic()))
        progress.update("soak: waiting for the last senders and the backlog to drain", force=True)
        for j in jobs:
            j.wait(120)
            if j.returncode != 0:
                failures += 1
        drain_deadline = time.monotonic() + max(60.0, opts.stall)
        drained = False
        while time.monotonic() < drain_deadline:
            stats = spool.stats(list(receivers))
            if all(q.pending + q.in_flight == 0 for q in stats if q.destination in receivers):
                drained = True
                break
            time.sleep(0.2)
        counters = spool.counters()
        delivered = {d: counters.of(CounterKind.DELIVERED, d) for d in receivers}
        failed = {d: counters.of(CounterKind.FAILED, d) for d in receivers}
        superseded = {d: counters.of(CounterKind.SUPERSEDED, d) for d in receivers}
        accepted = counters.of(CounterKind.RECEIVED)
        memory = memory_verdicts(anon, duration)
        for role, v in memory.items():
            rss = samples.get(role, [])
            v.update(rss_first_mib=rss[0][1] if rss else 0.0, rss_last_mib=rss[-1][1] if rss else 0.0,
                     rss_max_mib=max((y for _, y in rss), default=0.0), rss_samples=rss)
        spool.close()
        spool = None
        router.stop()
        values, undelivered = spool_latencies(router.spool, wl.study_uids, list(receivers))
        result.update(
            submitted=submitted, accepted=accepted, delivered=delivered, failed=failed,
            superseded=superseded,
            achieved_rate=accepted / duration, skipped_ticks=skipped, sender_failures=failures,
            max_backlog=max_backlog, drained=drained, backlog_samples=backlog,
            spool_mib_start=spool_start, spool_mib_end=data_mdb.stat().st_size / 2**20,
            memory=memory, latency_ms=latency_summary(values) if values else None,
            records_without_delivery=undelivered,
            router_build=router.build(),
            bounded=all(v["verdict"] == "bounded" for k, v in memory.items() if k != "bench harness"),
            ok=drained and not failures and all(delivered[d] + superseded[d] == accepted for d in receivers),
        )
    except BenchError as exc:
        result.update(ok=False, error=str(exc))
        raise
    finally:
        if spool is not None:
            spool.close()
        for j in jobs:
            j.kill()
        if router is not None:
            router.stop()
        for r in receivers.values():
            r.stop()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result

