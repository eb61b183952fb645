"""``python -m bench --deidentify``: what PS3.15 de-identification on one destination costs.

Two routed paths, alternating from round to round in the same run, the same CT workload
(``--mix``, default ``ct=100``): ``routed`` (dcmsend -> fastroute -> dest1, bytes forwarded
zero-copy) and ``routed-deid`` (the same, with dest1 de-identifying: the basic profile with the
options of the issue's example, a keyed file in the work folder). Reported: instances/s of each,
their ratio, and the CPU milliseconds per instance of dest1's sender process (where the
de-identification runs).

Then "where the time goes", in this process over the same generated objects: the destination's
``ContentPlan.apply`` timed plain (ms per instance), and one cProfile pass split into parse
(pydicom reading the stored bytes), de-identify (the Table E.1-1 walk), re-encode (pydicom
writing) and the rest, scaled to the plain time (the profiler's own overhead left out).
"""
from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from .runs import Bench, Options, Progress
from .workload import Workload

OPTIONS = ["retain-longitudinal-modified-dates", "retain-device-identity", "clean-descriptors"]
PATHS = ("routed", "routed-deid")


def deid_section(work: Path) -> dict[str, Any]:
    """dest1's ``deidentify:`` (the issue's example), its key in a file of the work folder."""
    key = work / "deid.key"
    if not key.exists():
        key.write_text("bench-deidentify-key-not-secret-0123456789\n")
        key.chmod(0o600)
    return {"profile": "basic", "options": list(OPTIONS), "key": f"file:{key}", "quarantine_burned_in": True}


def run_rounds(bench: Bench, wl: Workload, rounds: int) -> list[dict[str, Any]]:
    records = []
    total = rounds * len(PATHS)
    for rnd in range(1, rounds + 1):
        order = PATHS if rnd % 2 else tuple(reversed(PATHS))
        for i, path in enumerate(order):
            bench.progress.prefix = f"[{(rnd - 1) * len(PATHS) + i + 1}/{total}] round {rnd} {path}: "
            rec = bench.measure(wl, path, rnd)
            sender = (rec.get("processes") or {}).get("router sender-dest1", {})
            if rec["ok"] and sender:
                rec["sender_cpu_ms_per_inst"] = sender["cpu_s"] / rec["objects"] * 1000
            records.append(rec)
            if rec["ok"]:
                bench.progress.line(f"{rec['elapsed_s']:.2f} s, {rec['inst_per_s']:.1f} inst/s, sender CPU "
                                    f"{rec.get('sender_cpu_ms_per_inst', float('nan')):.2f} ms/inst")
            else:
                bench.progress.line(f"FAILED: {(rec['error'] or 'unknown error').splitlines()[0]}")
    bench.progress.prefix = ""
    return records


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in PATHS:
        ok = [r for r in records if r["path"] == path and r["ok"]]
        if not ok:
            continue
        out[path] = {"rounds": len(ok), "inst_per_s": statistics.median(r["inst_per_s"] for r in ok),
                     "mb_per_s": statistics.median(r["mb_per_s"] for r in ok),
                     "sender_cpu_ms_per_inst": statistics.median(r.get("sender_cpu_ms_per_inst", 0.0) for r in ok)}
    if len(out) == 2:
        out["ratio_deid_to_plain"] = out["routed-deid"]["inst_per_s"] / out["routed"]["inst_per_s"]
        out["sender_cpu_ms_added"] = (out["routed-deid"]["sender_cpu_ms_per_inst"]
                                      - out["routed"]["sender_cpu_ms_per_inst"])
    return out


# -- where the time goes ------------------------------------------------------------------------

def _plan(section: dict[str, Any]) -> Any:
    from fastroute.config import loads
    from fastroute.content.plan import ContentPlan

    cfg = loads("destinations:\n  dest1: {ae_title: DEST1, host: 127.0.0.1, port: 104}\n")
    import dataclasses
    from fastroute.content.deidentify import parse_deidentify
    dest = dataclasses.replace(cfg.destinations["dest1"], deidentify=parse_deidentify(section, None))
    cfg = dataclasses.replace(cfg, destinations={"dest1": dest})
    plan = ContentPlan.build(cfg, "dest1")
    assert plan is not None
    return plan


def _split(prof: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds in the plan's three stages, from the profile's function table."""
    stats = pstats.Stats(prof)
    table: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats    # type: ignore[attr-defined]
    def cum(file_end: str, name: str) -> float:
        return sum(v[3] for (f, _, fn), v in table.items() if f.endswith(file_end) and fn == name)
    return {"total": cum("content/plan.py", "apply"), "parse": cum("routing/transcode.py", "_parse"),
            "deidentify": cum("content/deidentify.py", "apply"), "encode": cum("routing/transcode.py", "_write")}


def where_the_time_goes(wl: Workload, section: dict[str, Any], log: Callable[[str], None],
                        limit: int = 200) -> dict[str, Any]:
    from fastroute.cli import read_part10

    plan = _plan(section)
    objects = [read_part10(path) for path, *_ in wl.files[:limit]]
    n = len(objects)
    context = {"calling_ae": "BENCH", "called_ae": "FASTROUTE", "peer_ip": "127.0.0.1"}
    for ts, data in objects[:5]:                      # warm: imports, dictionaries, the table
        plan.apply(data, ts, (), context)
    log(f"where the time goes: ContentPlan.apply over {n} generated objects")
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    changed = quarantined = 0
    for ts, data in objects:
        applied = plan.apply(data, ts, (), context)
        changed += applied is not None and not applied.quarantine
        quarantined += applied is not None and bool(applied.quarantine)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    prof = cProfile.Profile()
    prof.enable()
    for ts, data in objects:
        plan.apply(data, ts, (), context)
    prof.disable()
    split = _split(prof)
    scale = (cpu / n * 1000) / (split["total"] / n * 1000) if split["total"] else 0.0
    ms = {k: split[k] / n * 1000 * scale for k in ("parse", "deidentify", "encode")}
    ms["other"] = max(0.0, cpu / n * 1000 - sum(ms.values()))
    return {"objects": n, "changed": changed, "quarantined": quarantined,
            "apply_ms_per_inst": wall / n * 1000, "apply_cpu_ms_per_inst": cpu / n * 1000,
            "split_ms_per_inst": ms, "bytes_per_inst": sum(len(d) for _, d in objects) / n}


def table(summary: dict[str, Any], split: dict[str, Any], machine_line: str, smoke: str | None) -> str:
    lines = [f"machine: {machine_line}",
             "de-identification on one destination (PS3.15 basic + " + ", ".join(OPTIONS) + "), same run, "
             "alternating rounds", "",
             f"{'path':<14} {'rounds':>6} {'inst/s':>9} {'MB/s':>8} {'sender CPU ms/inst':>19}"]
    for path in PATHS:
        s = summary.get(path)
        if s:
            lines.append(f"{path:<14} {s['rounds']:>6} {s['inst_per_s']:>9.1f} {s['mb_per_s']:>8.1f} "
                         f"{s['sender_cpu_ms_per_inst']:>19.2f}")
    if "ratio_deid_to_plain" in summary:
        lines.append(f"ratio routed-deid / routed: {summary['ratio_deid_to_plain']:.2f}; de-identification adds "
                     f"{summary['sender_cpu_ms_added']:.2f} ms CPU per instance in the sender")
    m = split["split_ms_per_inst"]
    lines += ["", f"where the time goes (in-process, {split['objects']} objects of "
                  f"{split['bytes_per_inst'] / 1e6:.2f} MB, {split['changed']} changed, "
                  f"{split['quarantined']} quarantined):",
              f"  ContentPlan.apply: {split['apply_cpu_ms_per_inst']:.2f} ms CPU per instance "
              f"({split['apply_ms_per_inst']:.2f} ms wall)",
              f"  parse {m['parse']:.2f} ms, de-identify {m['deidentify']:.2f} ms, re-encode {m['encode']:.2f} ms, "
              f"other {m['other']:.2f} ms (cProfile split, scaled to the unprofiled CPU time)"]
    if smoke:
        lines.append(f"({smoke})")
    return "\n".join(lines)


def run(args: Any, progress: Progress, opts: Options, wl: Workload, work: Path,
        log: Callable[[str], None]) -> tuple[dict[str, Any], str]:
    """The rounds, the summary and the split; (document, table text)."""
    from . import machine

    section = deid_section(work)
    opts.deidentify = section
    bench = Bench(opts, progress)
    with bench:
        records = run_rounds(bench, wl, args.rounds)
    summary = summarise(records)
    split = where_the_time_goes(wl, section, progress.line)
    desc = machine.describe(work, False)
    doc = {"tool": "fastroute bench --deidentify", "format": 2, "deidentify": section | {"key": "file:(work)"},
           "machine": desc, "workloads": {wl.name: wl.summary()}, "rounds": records, "summary": summary,
           "where_the_time_goes": split, "ok": all(r["ok"] for r in records)}
    return doc, table(summary, split, machine.one_line(desc), getattr(args, "smoke", None))
