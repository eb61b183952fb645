"""The benchmark harness must not rot: a tiny run end to end through real DCMTK peers.

Not a timing test: it asserts that every object of every path arrived (the harness checks
that, or reports the round as FAILED) and that the report carries the figures a capacity
planner reads, never that anything was fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.peers, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


def test_quick_bench_delivers_everything_and_reports_ratios(tmp_path: Path, dcmtk: object) -> None:
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "bench", "--quick", "--tiny", "40", "--fanout",
                          "--work-dir", str(tmp_path / "work"), "--out", str(out),
                          "--receiver-dir", str(tmp_path / "received")],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    for name in ("tiny", "mix"):
        paths = doc["summary"][name]["paths"]
        for path in ("reference", "routed"):
            assert paths[path]["ok"] == paths[path]["rounds"] == 1, (name, path, paths[path]["failures"])
            assert paths[path]["median"]["inst_per_s"] > 0
        routed = paths["routed"]
        assert routed["router_cpu_ms_per_object"] > 0
        assert set(routed["median"]["latency_ms"]) >= {"p50", "p95", "p99"}
        assert any(p.startswith("router listener") for p in routed["processes"])
    assert "ratio routed/reference" in res.stdout
    assert (out / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
    assert doc["machine"]
    assert doc["settings"]["receiver_dir"] == str(tmp_path / "received")
    assert (tmp_path / "received").is_dir() and not any((tmp_path / "received").iterdir())  # cleaned
