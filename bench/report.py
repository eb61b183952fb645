"""Summaries of the raw rounds: the printed table, the JSON document and the HTML report.

Medians are over the rounds that completed. A path with a failed round shows how many failed
and why, and no ratio is computed from it: a number is only printed for what was measured.
"""
from __future__ import annotations

import html
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .machine import one_line

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")
METRICS = ("elapsed_s", "senders_done_s", "inst_per_s", "mb_per_s", "studies_per_h")


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _group(r: dict[str, Any], sweep: bool) -> str:
    if not sweep:
        return str(r["workload"])
    return f"{r['workload']} [listeners={r.get('listeners') or 'default'}, associations={r.get('associations') or 'default'}]"


def summarise(records: list[dict[str, Any]], descriptions: dict[str, str], *, sweep: bool = False) -> dict[str, Any]:
    """Per workload (per workload and router configuration in a sweep), per path: medians."""
    out: dict[str, Any] = {}
    for wl in dict.fromkeys(_group(r, sweep) for r in records):
        mine = [r for r in records if _group(r, sweep) == wl]
        paths: dict[str, Any] = {}
        for path in dict.fromkeys(r["path"] for r in mine):
            rows = [r for r in mine if r["path"] == path]
            ok = [r for r in rows if r["ok"]]
            med: dict[str, Any] = {m: _median([r[m] for r in ok]) for m in METRICS}
            for m in ("sustained_inst_per_s", "sustained_studies_per_h"):
                med[m] = _median([r[m] for r in ok if r.get(m)])
            lats = [r["latency_ms"] for r in ok if r.get("latency_ms")]
            if lats:
                med["latency_ms"] = {q: _median([x[q] for x in lats]) for q in ("p50", "p95", "p99", "max")}
            procs: dict[str, Any] = {}
            for role in dict.fromkeys(k for r in ok for k in r["processes"]):
                cpu = [r["processes"][role]["cpu_s"] for r in ok if role in r["processes"]]
                rss = [r["processes"][role]["peak_rss_mib"] for r in ok if role in r["processes"]]
                cpu_med = statistics.median(cpu)
                procs[role] = {"cpu_s": cpu_med, "cpu_ms_per_object": cpu_med * 1000 / rows[0]["objects"],
                               "peak_rss_mib": max(rss)}
            locks: dict[str, Any] = {}
            for role in dict.fromkeys(k for r in ok for k in (r.get("write_lock") or {})):
                vals = [r["write_lock"][role] for r in ok if role in (r.get("write_lock") or {})]
                locks[role] = {k: statistics.median(v[k] for v in vals) for k in ("wait_s", "hold_s", "transactions")}
            router_ms = sum(v["cpu_ms_per_object"] for k, v in procs.items() if k.startswith("router "))
            paths[path] = {
                "description": descriptions.get(path, path), "rounds": len(rows), "ok": len(ok),
                "router_cpu_ms_per_object": router_ms if path == "routed" and ok else None,
                "failures": [{"round": r["round"], "error": r["error"]} for r in rows if not r["ok"]],
                "median": med, "processes": procs, "write_lock": locks,
                "rounds_inst_per_s": [r["inst_per_s"] for r in ok],
                "rounds_mb_per_s": [r["mb_per_s"] for r in ok],
                "router_build": next((r["router_build"] for r in ok if r.get("router_build")), None),
                "throughput": [{"round": r["round"], "samples": r.get("throughput", [])} for r in ok],
            }
        first = mine[0]
        entry: dict[str, Any] = {"workload": first["workload"], "objects": first["objects"],
                                 "bytes": first["bytes"], "studies": first["studies"], "paths": paths,
                                 "listeners": first.get("listeners"), "associations": first.get("associations")}
        entry["ratio"] = _ratio(mine, paths)
        out[wl] = entry
    return out


def _ratio(records: list[dict[str, Any]], paths: dict[str, Any]) -> dict[str, Any]:
    ref, routed = paths.get("reference"), paths.get("routed")
    if ref is None or routed is None:
        return {"value": None, "why": "needs both a reference and a routed path"}
    bad = [f"{p} failed in {s['rounds'] - s['ok']} of {s['rounds']} round(s)"
           for p, s in (("reference", ref), ("routed", routed)) if s["ok"] < s["rounds"]]
    if bad:
        return {"value": None, "why": "not computed: " + "; ".join(bad)}
    per_round = []
    for rnd in sorted({r["round"] for r in records}):
        a = [r for r in records if r["round"] == rnd and r["path"] == "routed"]
        b = [r for r in records if r["round"] == rnd and r["path"] == "reference"]
        if a and b:
            per_round.append(a[0]["inst_per_s"] / b[0]["inst_per_s"])
    r_med, ref_med = routed["median"]["inst_per_s"], ref["median"]["inst_per_s"]
    return {"value": r_med / ref_med, "routed_inst_per_s": r_med, "reference_inst_per_s": ref_med,
            "routed_mb_per_s": routed["median"]["mb_per_s"], "reference_mb_per_s": ref["median"]["mb_per_s"],
            "per_round": per_round}


def scaling(summary: dict[str, Any]) -> dict[str, Any]:
    """listeners x associations -> the routed median (instances/s, studies/h, ratio), per workload."""
    out: dict[str, Any] = {}
    for entry in summary.values():
        routed = entry["paths"].get("routed") or {}
        med = routed.get("median") or {}
        cell = {"listeners": entry["listeners"], "associations": entry["associations"],
                "inst_per_s": med.get("inst_per_s"), "studies_per_h": med.get("studies_per_h"),
                "sustained_inst_per_s": med.get("sustained_inst_per_s"), "ratio": entry["ratio"]["value"]}
        out.setdefault(entry["workload"], []).append(cell)
    return out


def headline(doc: dict[str, Any]) -> dict[str, Any] | None:
    """Sustained studies/hour of the routed path on the study mix; in a sweep, the best
    configuration (named). None when no mix was routed successfully."""
    best: tuple[float, dict[str, Any]] | None = None
    for entry in doc["summary"].values():
        if entry["workload"] == "tiny" or not entry["studies"]:
            continue
        med = (entry["paths"].get("routed") or {}).get("median") or {}
        value = med.get("sustained_studies_per_h") or med.get("studies_per_h")
        if value and (best is None or value > best[0]):
            best = (value, entry)
    if best is None:
        return None
    value, entry = best
    routed = entry["paths"]["routed"]
    build = routed.get("router_build") or {}
    return {"studies_per_h": value, "sustained": bool(routed["median"].get("sustained_studies_per_h")),
            "workload": entry["workload"], "listeners": entry["listeners"], "associations": entry["associations"],
            "rounds": routed["ok"], "twin": build.get("twin", "unknown"), "note": doc.get("note")}


def headline_text(h: dict[str, Any] | None) -> str:
    if h is None:
        return "studies/hour on this machine: not measured (no study mix routed successfully)"
    how = "sustained (10-90 % delivered)" if h["sustained"] else "whole run"
    conf = ""
    if h["listeners"] or h["associations"]:
        conf = f", listeners={h['listeners'] or 'default'}, associations={h['associations'] or 'default'}"
    text = (f"studies/hour on this machine: {h['studies_per_h']:,.0f} ({how}, routed, workload "
            f"{h['workload']}{conf}, peek={h['twin']}, median of {h['rounds']} round(s))")
    return text + (f" — {h['note'].upper()}" if h.get("note") else "")


def throughput_bins(samples: list[list[float]], bins: int = 10) -> list[tuple[float, float]]:
    """(end of interval s, objects/s in it) over about ``bins`` equal intervals of the run."""
    if len(samples) < 2:
        return []
    end = samples[-1][0]
    width = max(end / bins, 0.25)
    out = []
    prev_t, prev_c = 0.0, 0.0
    t = width
    i = 0
    while prev_t < end - 1e-9:
        t = min(t, end)
        while i < len(samples) - 1 and samples[i][0] < t:
            i += 1
        a, b = samples[max(i - 1, 0)], samples[i]
        c = a[1] + (b[1] - a[1]) * ((t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 1.0)
        out.append((t, (c - prev_c) / (t - prev_t)))
        prev_t, prev_c = t, c
        t += width
    return out


# -- text ----------------------------------------------------------------------------------------

def _f(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _lat(lat: dict[str, float] | None, sep: str) -> str:
    return sep.join(f"{lat[q]:.0f}" for q in ("p50", "p95", "p99")) if lat else "-"


def table(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    what = (f"soak {doc['settings']['soak']} min" if doc.get("soak") else f"{doc['settings']['rounds']} round(s)")
    note = doc.get("note")
    lines = ([f"*** {note.upper()} ***"] if note else []) + [
        f"fastroute bench — {doc['started']} — {what}, up to {doc['settings']['senders']} concurrent sender(s)",
        f"machine: {one_line(doc['machine'])}",
        f"router: {doc['settings']['router']}; ran {_builds(doc)}"]
    if not doc.get("soak"):
        lines.append(headline_text(doc.get("headline")))
    descriptions = {path: p["description"] for e in s.values() for path, p in e["paths"].items()}
    lines += [f"  {path} = {d}" for path, d in descriptions.items()]
    lines.append("")
    for wl, entry in s.items():
        lines.append(f"{wl}: {doc['workloads'][entry['workload']]['description']} — {entry['objects']} objects, "
                     f"{entry['bytes'] / 1e6:.1f} MB, {entry['studies']} studies")
        head = (f"  {'path':<20} {'ok':>5} {'time s':>7} {'accepted s':>10} {'inst/s':>9} {'MB/s':>7} "
                f"{'studies/h':>9}  {'latency p50/p95/p99 ms':>22}")
        lines.append(head)
        for path, p in entry["paths"].items():
            m = p["median"]
            lat = m.get("latency_ms")
            lat_s = _lat(lat, "/")
            ok = f"{p['ok']}/{p['rounds']}"
            label = path
            if p["ok"] == 0:
                lines.append(f"  {label:<20} {ok:>5} FAILED")
            else:
                sph = _f(m["studies_per_h"], 0) if entry["workload"] != "tiny" else "-"
                acc = _f(m["senders_done_s"], 2) if path == "routed" else "-"
                lines.append(f"  {label:<20} {ok:>5} {_f(m['elapsed_s'], 2):>7} {acc:>10} {_f(m['inst_per_s']):>9} "
                             f"{_f(m['mb_per_s']):>7} {sph:>9}  {lat_s:>22}")
            for fail in p["failures"]:
                first = (fail["error"] or "").splitlines()
                lines.append(f"    round {fail['round']} FAILED: {first[0] if first else 'unknown error'}")
        r = entry["ratio"]
        if r["value"] is None:
            lines.append(f"  ratio routed/reference: {r['why']}")
        else:
            per = ", ".join(f"{x:.3f}" for x in r["per_round"])
            lines.append(f"  ratio routed/reference (instances/s, medians): {r['value']:.3f} — routed "
                         f"{_f(r['routed_inst_per_s'])} inst/s ({_f(r['routed_mb_per_s'])} MB/s) vs reference "
                         f"{_f(r['reference_inst_per_s'])} inst/s ({_f(r['reference_mb_per_s'])} MB/s); "
                         f"per round: {per}")
        rt = entry["paths"].get("routed", {}).get("router_cpu_ms_per_object")
        if rt:
            lines.append(f"  router CPU per object (all router processes): {rt:.2f} ms, i.e. at most "
                         f"{1000 / rt:,.0f} objects per CPU-second of this machine")
        for path, p in entry["paths"].items():
            if p["throughput"] and p["throughput"][0]["samples"]:
                first = p["throughput"][0]
                bins = throughput_bins(first["samples"])
                if bins:
                    cells = ", ".join(f"{v:.0f}" for _, v in bins)
                    lines.append(f"  throughput over time, {path} round {first['round']} (inst/s in each "
                                 f"{bins[0][0]:.2f} s of the run): {cells}")
        lines.append("")
        lines += _process_table(entry)
        lines += _lock_table(entry)
        lines.append("")
    if doc.get("scaling"):
        lines += scaling_table(doc["scaling"])
    if doc.get("soak"):
        lines += soak_table(doc["soak"])
    if note:
        lines.append(f"*** {note.upper()} ***")
    lines.append("time: first send -> every object at every destination; accepted: when the senders had "
                 "their last response from the router;\nlatency: received -> delivered per object and "
                 "destination (router's spool records); CPU/RSS: per process, medians of the rounds.")
    return "\n".join(lines)


def _builds(doc: dict[str, Any]) -> str:
    """Which fastroute the routed runs ran, as the router's listener logged it."""
    seen = {(b["version"], b["twin"], b["from"]) for e in doc["summary"].values()
            for b in [(e["paths"].get("routed") or {}).get("router_build")] if b}
    if doc.get("soak") and doc["soak"].get("router_build"):
        b = doc["soak"]["router_build"]
        seen.add((b["version"], b["twin"], b["from"]))
    if not seen:
        return "fastroute (no routed run completed)"
    return "; ".join(f"fastroute {v} peek={t} from {w}" if t != "unknown" else
                     f"a fastroute whose listener does not log its build (older than this bench); "
                     f"`fastroute --version` with the same environment says: {doc['machine'].get('fastroute')}"
                     for v, t, w in sorted(seen))


def scaling_table(scaling: dict[str, Any]) -> list[str]:
    """Rows: listeners; columns: associations per destination; cells: routed median inst/s (ratio)."""
    lines = []
    for wl, cells in scaling.items():
        ls = sorted({c["listeners"] or 0 for c in cells})
        as_ = sorted({c["associations"] or 0 for c in cells})
        lines.append(f"scaling, {wl}: routed instances/s, median (ratio routed/reference); rows: listeners, "
                     f"columns: associations per destination")
        lines.append(f"  {'listeners':>9}" + "".join(f" {('assoc=' + str(a or 'default')):>18}" for a in as_))
        for lv in ls:
            row = f"  {lv or 'default':>9}"
            for a in as_:
                c = next((c for c in cells if (c["listeners"] or 0) == lv and (c["associations"] or 0) == a), None)
                text = "-" if c is None or c["inst_per_s"] is None else (
                    f"{_f(c['inst_per_s'])}" + (f" ({c['ratio']:.2f})" if c["ratio"] else ""))
                row += f" {text:>18}"
            lines.append(row)
        lines.append("")
    return lines


def _process_table(entry: dict[str, Any]) -> list[str]:
    paths = [p for p, v in entry["paths"].items() if v["ok"]]
    roles = list(dict.fromkeys(r for p in paths for r in entry["paths"][p]["processes"]))
    if not roles:
        return []
    head = f"  {'CPU s / CPU ms per object / peak RSS MiB':<42}" + "".join(f" {p:>26.26}" for p in paths)
    lines = [head]
    for role in roles:
        cells = []
        for p in paths:
            v = entry["paths"][p]["processes"].get(role)
            cells.append(f"{v['cpu_s']:.2f} / {v['cpu_ms_per_object']:.2f} / {v['peak_rss_mib']:.0f}"
                         if v else "")
        lines.append(f"  {role:<42.42}" + "".join(f" {c:>26}" for c in cells))
    return lines


def _lock_table(entry: dict[str, Any]) -> list[str]:
    """The routed runs' spool write lock per router process (medians of the rounds)."""
    locks = (entry["paths"].get("routed") or {}).get("write_lock") or {}
    if not locks:
        return []
    lines = [f"  {'spool write lock: s waited / s held / commits':<42} {'routed':>26}"]
    for role, v in locks.items():
        cell = f"{v['wait_s']:.2f} / {v['hold_s']:.2f} / {v['transactions']:.0f}"
        lines.append(f"  {role:<42.42} {cell:>26}")
    return lines


def soak_table(soak: dict[str, Any]) -> list[str]:
    lines = [f"soak: {soak['minutes']} min at {soak['rate']} objects/s target ({soak['workload']}), "
             f"sent {soak['submitted']} objects, accepted {soak['accepted']}, delivered {soak['delivered']}, "
             f"achieved {soak['achieved_rate']:.1f} objects/s, max backlog {soak['max_backlog']}, "
             f"skipped ticks {soak['skipped_ticks']}, sender failures {soak['sender_failures']}",
             f"  drained after the end: {soak['drained']}; spool data.mdb "
             f"{soak['spool_mib_start']:.0f} -> {soak['spool_mib_end']:.0f} MiB; latency received -> delivered "
             f"p50/p95/p99 {_lat(soak.get('latency_ms'), '/')} ms",
             f"  {'process':<36} {'RSS start':>9} {'end':>6} {'max':>6}   {'private start':>13} {'end':>6} "
             f"{'2nd-half slope':>16}  verdict"]
    for role, v in soak["memory"].items():
        lines.append(f"  {role:<36.36} {v['rss_first_mib']:>9.1f} {v['rss_last_mib']:>6.1f} {v['rss_max_mib']:>6.1f}   "
                     f"{v['first_mib']:>13.1f} {v['last_mib']:>6.1f} {v['slope_mib_per_h']:>11.1f} MiB/h  {v['verdict']}")
    lines.append(f"  memory {'stays bounded' if soak['bounded'] else 'is NOT shown to be bounded'} (MiB; private = "
                 f"RssAnon; rule: its growth over the second half < max(2 MiB, 5% of its mean there))")
    lines.append("")
    return lines


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1, default=str))


# -- HTML with inline SVG ------------------------------------------------------------------------

def _e(x: Any) -> str:
    return html.escape(str(x))


def hbar_chart(title: str, unit: str, rows: list[tuple[str, float | None, list[float], str]],
               width: int = 720) -> str:
    """Horizontal bars (label, median, per-round values, colour); round values are dots."""
    label_w, pad, row_h = 250, 10, 26
    plot_w = width - label_w - 90
    top = 28
    height = top + row_h * len(rows) + 24
    vmax = max([v for _, v, pts, _ in rows if v is not None] + [p for *_, pts, _ in rows for p in pts] + [1e-9])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<text x="{pad}" y="18" font-weight="bold">{_e(title)}</text>']
    for i, (label, value, pts, colour) in enumerate(rows):
        y = top + i * row_h
        out.append(f'<text x="{label_w - 6}" y="{y + 16}" text-anchor="end">{_e(label)}</text>')
        if value is None:
            out.append(f'<text x="{label_w + 4}" y="{y + 16}" fill="#c00">FAILED</text>')
            continue
        w = plot_w * value / vmax
        out.append(f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" fill="{colour}"/>')
        for p in pts:
            out.append(f'<circle cx="{label_w + plot_w * p / vmax:.1f}" cy="{y + row_h / 2:.1f}" r="3" '
                       f'fill="none" stroke="#222"/>')
        out.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 16}">{_e(_f(value))} {_e(unit)}</text>')
    axis_y = top + row_h * len(rows) + 4
    out.append(f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + plot_w}" y2="{axis_y}" stroke="#888"/>')
    out.append(f'<text x="{label_w}" y="{axis_y + 14}" fill="#666">0</text>')
    out.append(f'<text x="{label_w + plot_w}" y="{axis_y + 14}" fill="#666" text-anchor="end">'
               f'{_e(_f(vmax))} {_e(unit)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def stacked_chart(title: str, unit: str, rows: list[tuple[str, dict[str, float]]], width: int = 720) -> str:
    """Horizontal stacked bars (label, {part: value}) with a legend."""
    label_w, row_h, top = 250, 26, 28
    plot_w = width - label_w - 90
    parts = list(dict.fromkeys(k for _, d in rows for k in d))
    colours = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(parts)}
    legend_rows = (len(parts) + 2) // 3
    height = top + row_h * len(rows) + 20 + 18 * legend_rows
    vmax = max([sum(d.values()) for _, d in rows] + [1e-9])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="18" font-weight="bold">{_e(title)}</text>']
    for i, (label, d) in enumerate(rows):
        y = top + i * row_h
        out.append(f'<text x="{label_w - 6}" y="{y + 16}" text-anchor="end">{_e(label)}</text>')
        x = float(label_w)
        for k, v in d.items():
            w = plot_w * max(v, 0.0) / vmax
            out.append(f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" fill="{colours[k]}">'
                       f'<title>{_e(k)}: {v:.3f} {_e(unit)}</title></rect>')
            x += w
        out.append(f'<text x="{x + 6:.1f}" y="{y + 16}">{sum(d.values()):.2f} {_e(unit)}</text>')
    ly = top + row_h * len(rows) + 12
    for i, k in enumerate(parts):
        lx = 10 + (i % 3) * (width // 3)
        yy = ly + (i // 3) * 18
        out.append(f'<rect x="{lx}" y="{yy}" width="10" height="10" fill="{colours[k]}"/>'
                   f'<text x="{lx + 14}" y="{yy + 9}">{_e(k)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def line_chart(title: str, unit: str, series: dict[str, list[tuple[float, float]]], width: int = 720) -> str:
    """Lines (name -> [(x seconds, y)]) with a legend; x in minutes on the axis."""
    left, right, top, bottom = 60, 20, 28, 40
    legend_rows = (len(series) + 2) // 3
    height = 260 + 18 * legend_rows
    plot_h = height - top - bottom - 18 * legend_rows
    plot_w = width - left - right
    pts = [p for s in series.values() for p in s]
    xmax = max([x for x, _ in pts] + [1e-9])
    ymax = max([y for _, y in pts] + [1e-9]) * 1.1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="18" font-weight="bold">{_e(title)}</text>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#888"/>',
           f'<text x="{left - 4}" y="{top + 10}" text-anchor="end" fill="#666">{ymax:.0f}</text>',
           f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" fill="#666">0 {_e(unit)}</text>',
           f'<text x="{left + plot_w}" y="{top + plot_h + 14}" text-anchor="end" fill="#666">{xmax / 60:.1f} min</text>']
    for i, (name, s) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{left + plot_w * x / xmax:.1f},{top + plot_h - plot_h * y / ymax:.1f}" for x, y in s)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        lx = 10 + (i % 3) * (width // 3)
        ly = top + plot_h + 24 + (i // 3) * 18
        out.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{lx + 14}" y="{ly + 9}">{_e(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


_CSS = """
body { font-family: sans-serif; max-width: 980px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
table.kv td { text-align: left; }
.fail { color: #b00; font-weight: bold; }
.note { color: #555; font-size: 13px; }
pre { background: #f6f6f6; padding: 8px; font-size: 12px; white-space: pre-wrap; }
"""


def _colour(path: str) -> str:
    return {"reference": PALETTE[0], "reference-storescu": PALETTE[4], "reference-orthanc": PALETTE[6],
            "routed": PALETTE[1]}.get(path, PALETTE[9])


def html_report(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    m = doc["machine"]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>fastroute capacity benchmark {_e(doc['started'])}</title>",
             f"<style>{_CSS}</style></head><body>",
             "<h1>fastroute capacity benchmark</h1>",
             (f"<p class=fail>{_e(doc['note'].upper())}</p>" if doc.get("note") else ""),
             (f"<p><b>{_e(headline_text(doc.get('headline')))}</b></p>" if not doc.get("soak") else ""),
             f"<p class=note>ran {_e(_builds(doc))}</p>",
             f"<p class=note>{_e(doc['started'])} — "
             f"{'soak ' + str(doc['settings']['soak']) + ' min' if doc.get('soak') else str(doc['settings']['rounds']) + ' round(s)'}, "
             f"up to {doc['settings']['senders']} concurrent sender(s); router: {_e(doc['settings']['router'])}</p>",
             "<h2>Machine</h2><table class=kv>"]
    for k, v in m.items():
        parts.append(f"<tr><td>{_e(k.replace('_', ' '))}</td><td>{_e(v)}</td></tr>")
    parts.append("</table>")
    for wl, entry in s.items():
        parts.append(f"<h2>Workload {_e(wl)}: {_e(doc['workloads'][entry['workload']]['description'])}</h2>")
        parts.append(f"<p class=note>{entry['objects']} objects, {entry['bytes'] / 1e6:.1f} MB, "
                     f"{entry['studies']} studies; medians of the rounds that completed.</p>")
        parts.append("<table><tr><th>path</th><th>ok</th><th>time s</th><th>accepted s</th><th>instances/s</th><th>MB/s</th>"
                     "<th>studies/h</th><th>latency p50 / p95 / p99 ms</th></tr>")
        for path, p in entry["paths"].items():
            med = p["median"]
            lat = med.get("latency_ms")
            cls = "" if p["ok"] == p["rounds"] else " class=fail"
            if p["ok"] == 0:
                parts.append(f"<tr><td>{_e(path)}: {_e(p['description'])}</td><td{cls}>0/{p['rounds']}</td>"
                             f"<td colspan=6 class=fail>FAILED</td></tr>")
                continue
            parts.append(
                f"<tr><td>{_e(path)}: {_e(p['description'])}</td><td{cls}>{p['ok']}/{p['rounds']}</td>"
                f"<td>{_f(med['elapsed_s'], 2)}</td><td>{_f(med['senders_done_s'], 2) if path == 'routed' else '-'}</td>"
                f"<td>{_f(med['inst_per_s'])}</td><td>{_f(med['mb_per_s'])}</td>"
                f"<td>{_f(med['studies_per_h'], 0) if entry['workload'] != 'tiny' else '-'}</td>"
                f"<td>{_lat(lat, ' / ')}</td></tr>")
        parts.append("</table>")
        for path, p in entry["paths"].items():
            for fail in p["failures"]:
                parts.append(f"<p class=fail>{_e(path)} round {fail['round']} FAILED:</p><pre>{_e(fail['error'])}</pre>")
        r = entry["ratio"]
        if r["value"] is None:
            parts.append(f"<p><b>ratio routed/reference:</b> {_e(r['why'])}</p>")
        else:
            parts.append(f"<p><b>ratio routed/reference (instances/s, medians): {r['value']:.3f}</b> — routed "
                         f"{_f(r['routed_inst_per_s'])} inst/s ({_f(r['routed_mb_per_s'])} MB/s) vs reference "
                         f"{_f(r['reference_inst_per_s'])} inst/s ({_f(r['reference_mb_per_s'])} MB/s), measured "
                         f"in the same run; per round: {', '.join(f'{x:.3f}' for x in r['per_round'])}</p>")
        rt = entry["paths"].get("routed", {}).get("router_cpu_ms_per_object")
        if rt:
            parts.append(f"<p>router CPU per object (all router processes): <b>{rt:.2f} ms</b>, i.e. at most "
                         f"{1000 / rt:,.0f} objects per CPU-second of this machine</p>")
        rows = [(path, p["median"]["inst_per_s"] if p["ok"] else None, p["rounds_inst_per_s"], _colour(path))
                for path, p in entry["paths"].items()]
        parts.append(hbar_chart(f"{wl}: instances per second (bars: median, circles: rounds)", "inst/s", rows))
        over_time = {f"{path} round {t['round']}": [(x, v) for x, v in throughput_bins(t["samples"], 20)]
                     for path, p in entry["paths"].items() for t in p["throughput"][:1] if len(t["samples"]) > 1}
        if over_time:
            parts.append(line_chart(f"{wl}: throughput over time (objects at every destination per second)",
                                    "inst/s", over_time))
        rows = [(path, p["median"]["mb_per_s"] if p["ok"] else None, p["rounds_mb_per_s"], _colour(path))
                for path, p in entry["paths"].items()]
        parts.append(hbar_chart(f"{wl}: MB per second", "MB/s", rows))
        lat_rows: list[tuple[str, float | None, list[float], str]] = []
        for path, p in entry["paths"].items():
            lat = p["median"].get("latency_ms")
            if lat:
                for i, q in enumerate(("p50", "p95", "p99")):
                    lat_rows.append((f"{path} {q}", lat[q], [], PALETTE[(i + 1) % len(PALETTE)]))
        if lat_rows:
            parts.append(hbar_chart(f"{wl}: latency received -> delivered", "ms", lat_rows))
        cpu_rows = [(path, {role: v["cpu_ms_per_object"] for role, v in p["processes"].items()})
                    for path, p in entry["paths"].items() if p["ok"]]
        if cpu_rows:
            parts.append(stacked_chart(f"{wl}: CPU milliseconds per object, by process", "ms", cpu_rows))
        parts.append("<table><tr><th>process</th>" + "".join(
            f"<th>{_e(p)}: CPU s</th><th>ms/object</th><th>peak RSS MiB</th>" for p, v in entry["paths"].items() if v["ok"])
            + "</tr>")
        roles = list(dict.fromkeys(r for v in entry["paths"].values() if v["ok"] for r in v["processes"]))
        for role in roles:
            cells = ""
            for v in (v for v in entry["paths"].values() if v["ok"]):
                x = v["processes"].get(role)
                cells += (f"<td>{x['cpu_s']:.2f}</td><td>{x['cpu_ms_per_object']:.2f}</td><td>{x['peak_rss_mib']:.0f}</td>"
                          if x else "<td></td><td></td><td></td>")
            parts.append(f"<tr><td>{_e(role)}</td>{cells}</tr>")
        parts.append("</table>")
    if doc.get("scaling"):
        parts.append("<h2>Scaling: listeners x associations</h2><pre>" + _e("\n".join(scaling_table(doc["scaling"])))
                     + "</pre>")
    if doc.get("note"):
        parts.append(f"<p class=fail>{_e(doc['note'].upper())}</p>")
    if doc.get("soak"):
        soak = doc["soak"]
        parts.append("<h2>Soak</h2><pre>" + _e("\n".join(soak_table(soak))) + "</pre>")
        series = {role: [(t, mib) for t, mib in v["rss_samples"]] for role, v in soak["memory"].items()}
        parts.append(line_chart("resident memory (VmRSS) per process, MiB", "MiB", series))
        series = {role: [(t, mib) for t, mib in v["samples"]] for role, v in soak["memory"].items()}
        parts.append(line_chart("private memory (RssAnon) per process, MiB: what a leak grows", "MiB", series))
        parts.append(line_chart("backlog (objects pending or in flight)", "objects",
                                {"backlog": [(t, b) for t, b in soak["backlog_samples"]]}))
    parts.append("<h2>How to read this</h2><p class=note>time: from the first sender's start to the "
                 "moment every destination holds every object (complete files) and, when routed, the "
                 "router's spool has nothing pending or in flight. instances/s and MB/s count each object "
                 "once (file bytes, 1 MB = 10^6 bytes), also when it is fanned out to several destinations. "
                 "Latency: received (committed to the spool) -> delivered (destination's response recorded), "
                 "per object and destination, from the spool's records. CPU: user+system seconds of each "
                 "process during the timed window (/proc; dcmsend from wait4); peak RSS: VmHWM. The ratio "
                 "routed/reference compares medians measured in the same run, with rounds alternating "
                 "between the paths.</p>")
    parts.append("<h2>Settings</h2><pre>" + _e(json.dumps(doc["settings"], indent=1)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
