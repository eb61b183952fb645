"""``python -m bench --spool``: how commits into the spool scale with writer processes.

W writer processes, started together (a Barrier), each commit groups of values as fast as
they can for D seconds with LMDB's sync on, as listeners do: CT-sized (4 x 0.5 MB per commit)
and tiny (8 x 10 kB). Layouts:

``shared``         one LMDB environment, every writer commits into it (today's spool);
``sharded``        one environment per writer (what the sharded spool gives each listener);
``spool-shared``   the real ``Spool.put_many`` with realistic ``Incoming`` objects, one spool;
``spool-sharded``  the same through the sharded spool, when this fastroute has one (see
                   ``sharded_spool_option``; otherwise it is left out, and the output says so):
                   each group's bytes into the writer's shard and its records into the shared
                   environment before the call returns (the acknowledgement waited for both);
``spool-journal``  what a listener does since the receive journal (``fastroute.spool.journal``):
                   ``Spool.journal`` into its shard (the acknowledgement), an ``Applier`` thread
                   queueing the records in the shared environment. Its objects per second count
                   until the last object is *applied* (queued), not merely acknowledged.

Every writer's environment is a ``TimedEnv`` (:mod:`fastroute.spool.lockstats`), so each
reports how long it waited for the write lock and held it. Objects per second is the sum
over writers of what each committed in its own D seconds; the median of R rounds is
reported, and the ratio sharded/shared measured in the same run. Each run's files are
removed when it ends (CT runs write gigabytes).
"""
from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

VALUES = {"ct": (4, 512 * 1024), "tiny": (8, 10 * 1024)}    # values per commit, bytes each
RAW_LAYOUTS = ("shared", "sharded")
SPOOL_LAYOUTS = ("spool-shared", "spool-sharded", "spool-journal")
MAP_SIZE = 64 * 1024**3


@dataclass(slots=True)
class WriterResult:
    objects: int
    seconds: float
    commits: int
    wait_s: float
    hold_s: float
    by_env: dict[str, list[float]] | None = None    # "shared" / "shard": [wait_s, hold_s] (spool-* only)


def sharded_spool_option() -> str | None:
    """The name of ``Spool``'s constructor option that gives a process its own shard, if this
    fastroute has one (issue 16: a keyword containing "shard"); None otherwise."""
    from fastroute.spool import Spool

    names = [n for n in inspect.signature(Spool.__init__).parameters if "shard" in n]
    return names[0] if names else None


def _payload(size: int) -> bytes:
    """Random-looking bytes (LMDB does not compress; only the length matters)."""
    block = os.urandom(4096)
    return (block * (size // len(block) + 1))[:size]


def _raw_writer(layout: str, root: str, index: int, kind: str, duration: float, barrier: Any, out: Any) -> None:
    import lmdb

    from fastroute.spool.lockstats import TimedEnv, stats_for

    per, size = VALUES[kind]
    path = Path(root) / ("env" if layout == "shared" else f"env-{index}")
    path.mkdir(parents=True, exist_ok=True)
    label = "shared" if layout == "shared" else f"shard-{index}"
    env = TimedEnv(lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=2, sync=True, metasync=True,
                             readahead=False, meminit=False, max_readers=256), label)
    db = env.open_db(b"obj")
    value = _payload(size)
    prefix = index.to_bytes(2, "big")
    seq = 0
    barrier.wait()
    stats = stats_for(label)
    w0, h0, n0 = stats.wait_s, stats.hold_s, stats.transactions   # open_db's own commit excluded
    start = time.perf_counter()
    end = start + duration
    while time.perf_counter() < end:
        with env.begin(write=True, db=db) as txn:
            for _ in range(per):
                seq += 1
                txn.put(prefix + seq.to_bytes(8, "big"), value)
    elapsed = time.perf_counter() - start
    out.put((index, asdict(WriterResult(seq, elapsed, stats.transactions - n0, stats.wait_s - w0,
                                        stats.hold_s - h0))))
    env.close()


def _spool_writer(layout: str, root: str, index: int, kind: str, duration: float, barrier: Any,
                  out: Any) -> None:
    from fastroute.spool import Incoming, Spool
    from fastroute.spool.lockstats import snapshot

    per, size = VALUES[kind]
    option = sharded_spool_option()
    kwargs: dict[str, Any] = {option: index} if layout in ("spool-sharded", "spool-journal") and option else {}
    spool = Spool(Path(root) / "spool", map_size=MAP_SIZE, **kwargs)
    applier = None
    if layout == "spool-journal":
        from fastroute.spool.journal import Applier, Journaled
        applier = Applier(spool, None)
    value = _payload(size)
    study = f"1.2.826.0.1.3680043.10.1016.{os.getpid()}.{index}"
    seq = 0
    barrier.wait()
    before = snapshot()
    start = time.perf_counter()
    end = start + duration
    commits = 0
    while time.perf_counter() < end:
        items = []
        for _ in range(per):
            seq += 1
            items.append(Incoming(value, "1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.2",
                                  f"{study}.{seq}", ("pacs",),
                                  {"calling_ae": f"CT{index}", "called_ae": "FASTROUTE", "peer": "127.0.0.1",
                                   "study_instance_uid": study, "patient_id": f"P{index}",
                                   "accession_number": f"A{index}", "modality": "CT", "rules": []}))
        if applier is not None:
            done = spool.journal(items)
            applier.add([d for d in done if isinstance(d, Journaled)])
            results: list[Any] = list(done)
        else:
            results = spool.put_many(items)
        bad = [r for r in results if isinstance(r, BaseException)]
        if bad:
            raise RuntimeError(f"writer {index}: put_many failed: {bad[0]}")
        commits += 1
    if applier is not None:                 # counted until the last one is queued
        applier.wait_applied()
    elapsed = time.perf_counter() - start
    if applier is not None:
        applier.close()
    after = snapshot()
    wait = sum(s.wait_s for s in after.values()) - sum(s.wait_s for s in before.values())
    hold = sum(s.hold_s for s in after.values()) - sum(s.hold_s for s in before.values())
    by_env: dict[str, list[float]] = {}
    for label, st in after.items():         # shard-N -> "shard": a writer owns one
        old = before.get(label)
        key = "shared" if label == "shared" else "shard"
        w, h = by_env.setdefault(key, [0.0, 0.0])
        by_env[key] = [w + st.wait_s - (old.wait_s if old else 0.0), h + st.hold_s - (old.hold_s if old else 0.0)]
    out.put((index, asdict(WriterResult(seq, elapsed, commits, wait, hold, by_env))))
    spool.close()


def run_once(layout: str, kind: str, writers: int, duration: float, work: Path) -> dict[str, Any]:
    """One measurement: ``writers`` processes, started together; removed afterwards."""
    ctx = mp.get_context("spawn")
    root = work / f"{layout}-{kind}-{writers}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if layout.startswith("spool-"):       # created once, as the supervisor does before the children
        from fastroute.spool import Spool
        Spool(root / "spool", map_size=MAP_SIZE).close()
    target: Callable[..., None] = _spool_writer if layout.startswith("spool-") else _raw_writer
    barrier, out = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=target, args=(layout, str(root), i, kind, duration, barrier, out))
             for i in range(writers)]
    try:
        for p in procs:
            p.start()
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + duration + 120
        while len(got) < writers:
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError(f"spool bench {layout}/{kind}/W={writers}: a writer failed "
                                   f"(exit codes {[p.exitcode for p in procs]})")
            try:
                i, res = out.get(timeout=1.0)
            except Exception:           # queue.Empty: check the writers again
                continue
            got[i] = res
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(root, ignore_errors=True)
    per = [got[i] for i in range(writers)]
    return {"objects_per_s": sum(r["objects"] / r["seconds"] for r in per), "writers": per}


def default_layouts() -> list[str]:
    """shared and sharded; the real Spool's two as well when this fastroute has shards."""
    return [*RAW_LAYOUTS, *(SPOOL_LAYOUTS if sharded_spool_option() else ())]


def has_journal() -> bool:
    try:
        from fastroute.spool.journal import Applier  # noqa: F401
    except ImportError:
        return False
    return True


def run_spool(work: Path, writers: list[int], duration: float, rounds: int,
              log: Callable[[str], None], layouts: list[str] | None = None) -> dict[str, Any]:
    """Every (values, W, layout), R rounds each. A round measures every cell once, the layouts
    in alternating order, so a noisy minute on a shared machine spreads over the layouts
    instead of sinking one. With one writer, shared and sharded are the same layout (one
    environment, one writer): measured once, reported under both."""
    option = sharded_spool_option()
    chosen = layouts is not None
    layouts = list(layouts or default_layouts())
    if "spool-journal" in layouts and not has_journal():
        if chosen:
            raise RuntimeError("spool-journal: this fastroute has no receive journal")
        layouts.remove("spool-journal")
    if ("spool-sharded" in layouts or "spool-journal" in layouts) and not option:
        raise RuntimeError("spool-sharded: this fastroute's Spool has no shard option")
    twins = {"sharded": "shared", "spool-sharded": "spool-shared"}
    cells = [(kind, w, layout) for kind in VALUES for w in writers for layout in layouts
             if not (w == 1 and twins.get(layout) in layouts)]
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {c: [] for c in cells}
    for r in range(rounds):
        for kind, w, layout in (cells if r % 2 == 0 else _alternated(cells)):
            log(f"spool bench: round {r + 1}/{rounds}: {layout} {kind} W={w}")
            runs[(kind, w, layout)].append(run_once(layout, kind, w, duration, work))
    results: list[dict[str, Any]] = []
    for kind in VALUES:
        for w in writers:
            for layout in layouts:
                if (kind, w, layout) not in runs:
                    same = next(x for x in results if (x["layout"], x["values"], x["writers"])
                                == (twins[layout], kind, 1))
                    results.append({**same, "layout": layout, "same_as": twins[layout]})
                    continue
                mine = runs[(kind, w, layout)]
                rates = [x["objects_per_s"] for x in mine]
                mid = mine[rates.index(sorted(rates)[len(rates) // 2])]
                results.append({"layout": layout, "values": kind, "writers": w,
                                "objects_per_s": statistics.median(rates), "rounds": rates,
                                "wait_s": [round(x["wait_s"], 3) for x in mid["writers"]],
                                "hold_s": [round(x["hold_s"], 3) for x in mid["writers"]],
                                "by_env": [{k: [round(v, 3) for v in wh] for k, wh in (x.get("by_env") or {}).items()}
                                           for x in mid["writers"]],
                                "commits": [x["commits"] for x in mid["writers"]]})
    return {"duration_s": duration, "rounds": rounds, "writers": writers,
            "values": {k: {"per_commit": n, "bytes": b} for k, (n, b) in VALUES.items()},
            "layouts": layouts, "sharded_spool_option": option, "results": results}


def _alternated(cells: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """The same cells, the layouts of each (values, W) in reverse order."""
    out: list[tuple[str, int, str]] = []
    for key in dict.fromkeys((k, w) for k, w, _ in cells):
        out += reversed([c for c in cells if c[:2] == key])
    return out


def table(doc: dict[str, Any]) -> str:
    """obj/s per (values, W) and layout, the ratios sharded/shared, per-writer lock times,
    and every round's obj/s (the spread says how noisy the machine was)."""
    res = doc["results"]
    by = {(r["values"], r["writers"], r["layout"]): r for r in res}
    layouts = doc["layouts"]
    head = f"{'values':<6} {'W':>2} " + " ".join(f"{lay:>14}" for lay in layouts) + f" {'sharded/shared':>15}"
    if "spool-sharded" in layouts:
        head += f" {'spool s/s':>10}"
    if "spool-journal" in layouts:
        head += f" {'journal/s':>10}"
    lines = [f"spool commits, sync on, {doc['duration_s']:g} s per run, median of {doc['rounds']} round(s) "
             f"(obj/s; values per commit: ct 4 x 0.5 MB, tiny 8 x 10 kB)", head]
    for kind in doc["values"]:
        for w in doc["writers"]:
            row = f"{kind:<6} {w:>2} "
            row += " ".join(f"{by[(kind, w, lay)]['objects_per_s']:>14,.0f}" if (kind, w, lay) in by
                            else f"{'-':>14}" for lay in layouts)
            sh, sd = by.get((kind, w, "shared")), by.get((kind, w, "sharded"))
            row += f" {sd['objects_per_s'] / sh['objects_per_s']:>15.2f}" if sh and sd else f" {'-':>15}"
            ssh, ssd = by.get((kind, w, "spool-shared")), by.get((kind, w, "spool-sharded"))
            if "spool-sharded" in layouts:
                row += (f" {ssd['objects_per_s'] / ssh['objects_per_s']:>10.2f}" if ssh and ssd else f" {'-':>10}")
            sj = by.get((kind, w, "spool-journal"))
            if "spool-journal" in layouts:
                row += (f" {sj['objects_per_s'] / ssh['objects_per_s']:>10.2f}" if ssh and sj else f" {'-':>10}")
            lines.append(row)
    if "spool-sharded" not in layouts:
        lines.append("(spool-sharded: not measured, this fastroute's Spool has no shard option)")
    lines += ["", "every round (obj/s):"]
    for r in res:
        if not r.get("same_as"):
            lines.append(f"  {r['values']:<5} W={r['writers']} {r['layout']:<14} "
                         + ", ".join(f"{x:,.0f}" for x in r["rounds"]))
    lines += ["", "write lock per writer, seconds waited / held (the median round); spool-* layouts by "
              "environment (shard: the writer's own; shared: the records, for spool-journal its applier thread)"]
    for r in res:
        pairs = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(r["wait_s"], r["hold_s"]))
        envs = r.get("by_env") or []
        if any(envs):
            pairs = ", ".join(" ".join(f"{k} {wh[0]:.2f}/{wh[1]:.2f}" for k, wh in sorted(e.items())) for e in envs)
        lines.append(f"  {r['values']:<5} W={r['writers']} {r['layout']:<14} {pairs}")
    return "\n".join(lines)


__all__ = ["run_spool", "run_once", "table", "sharded_spool_option", "VALUES"]
