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
                          "--fastroute", "checkout",
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
        # the write lock per router process, from the files it published (issue 16)
        assert routed["write_lock"]["router listener-0"]["transactions"] > 0
        assert routed["write_lock"]["router listener-0"]["hold_s"] > 0
        assert any(p.startswith("router sender-") for p in routed["write_lock"])
    assert "ratio routed/reference" in res.stdout
    assert "spool write lock: s waited / s held / commits" in res.stdout
    assert (out / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
    assert doc["machine"]
    assert doc["settings"]["receiver_dir"] == str(tmp_path / "received")
    assert (tmp_path / "received").is_dir() and not any((tmp_path / "received").iterdir())  # cleaned
    # a smoke run says so in every output
    smoke = "smoke run, not for sizing"
    assert doc["note"] == smoke
    assert res.stdout.lower().count(smoke) >= 2 and smoke in (out / "table.txt").read_text().lower()
    assert smoke.upper() in (out / "report.html").read_text()
    # the twin named is the one the router's listener ran (this checkout, built in place)
    build = doc["summary"]["mix"]["paths"]["routed"]["router_build"]
    assert build["twin"] == "native" and Path(build["from"]) == REPO / "fastroute"
    assert f"peek={build['twin']}" in res.stdout
    # throughput over time, sampled during each run, and the studies/hour headline
    samples = doc["summary"]["mix"]["paths"]["routed"]["throughput"][0]["samples"]
    assert samples[-1][1] == doc["summary"]["mix"]["objects"] and len(samples) >= 2
    assert [t for t, _ in samples] == sorted(t for t, _ in samples)
    assert "throughput over time, routed" in res.stdout
    assert doc["headline"]["studies_per_h"] > 0 and "studies/hour on this machine:" in res.stdout


def test_tls_bench_routes_over_tls_on_both_legs(tmp_path: Path, dcmtk: object) -> None:
    """``--tls``: storescu +tls -> storescp +tls against storescu +tls -> fastroute (TLS
    listener, TLS destination) -> the same storescp, with the ratio (issue 14)."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "bench", "--tls", "--quick", "--tiny", "30", "--studies", "0",
                          "--fastroute", "checkout", "--work-dir", str(tmp_path / "work"), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    paths = doc["summary"]["tiny"]["paths"]
    assert set(paths) == {"reference", "routed"}
    assert paths["reference"]["description"].startswith("storescu +tls -> storescp +tls --fork")
    assert "TLS in, TLS out" in paths["routed"]["description"]
    assert doc["summary"]["tiny"]["ratio"]["value"] > 0
    routed = [r for r in doc["rounds"] if r["path"] == "routed"][0]
    assert routed["router_config"]["tls"]["require_client_cert"] is True
    assert all("tls" in d for d in routed["router_config"]["destinations"].values())
    assert "DICOM TLS on every leg" in doc["settings"]["router"]
    bad = subprocess.run([sys.executable, "-m", "bench", "--tls", "--fanout"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--tls measures its own two paths" in bad.stderr


def test_deidentify_bench_compares_both_routed_paths_and_splits_the_time(tmp_path: Path, dcmtk: object) -> None:
    """``--deidentify`` (issue 15): routed with and without de-identification on the destination,
    alternating in one run; every de-identified copy arrives under its keyed UID (checked by the
    harness); the sender's CPU per instance and the parse / de-identify / re-encode split."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "bench", "--deidentify", "--quick", "--tiny", "20",
                          "--rounds", "2", "--fastroute", "checkout", "--work-dir", str(tmp_path / "work"),
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    assert [r["path"] for r in doc["rounds"]] == ["routed", "routed-deid", "routed-deid", "routed"]
    deid = [r for r in doc["rounds"] if r["path"] == "routed-deid"][0]
    assert deid["router_config"]["destinations"]["dest1"]["deidentify"]["profile"] == "basic"
    assert all("deidentify" not in r["router_config"]["destinations"]["dest1"]
               for r in doc["rounds"] if r["path"] == "routed")
    s = doc["summary"]
    assert s["routed"]["inst_per_s"] > 0 and s["routed-deid"]["inst_per_s"] > 0 and s["ratio_deid_to_plain"] > 0
    assert s["routed-deid"]["sender_cpu_ms_per_inst"] > 0
    split = doc["where_the_time_goes"]
    assert split["objects"] == 20 and split["changed"] == 20 and split["quarantined"] == 0
    assert all(split["split_ms_per_inst"][k] > 0 for k in ("parse", "deidentify", "encode"))
    assert "ratio routed-deid / routed" in res.stdout and "where the time goes" in res.stdout
    assert "bench-deidentify-key" not in (out / "bench.json").read_text()     # the key is not reported
    bad = subprocess.run([sys.executable, "-m", "bench", "--deidentify", "--tls"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--deidentify measures its own two routed paths" in bad.stderr


def test_a_sweep_prints_a_scaling_table_and_work_files_go_to_a_temporary_folder(tmp_path: Path,
                                                                                dcmtk: object) -> None:
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    res = subprocess.run([sys.executable, "-m", "bench", "--quick", "--tiny", "20", "--studies", "0",
                          "--listeners", "1,2", "--fastroute", "checkout", "--out", str(out), "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    cells = doc["scaling"]["tiny"]
    assert [(c["listeners"], c["associations"]) for c in cells] == [(1, None), (2, None)]
    assert all(c["inst_per_s"] > 0 for c in cells)
    assert "scaling, tiny" in res.stdout
    assert {r["listeners"] for r in doc["rounds"] if r["path"] == "routed"} == {1, 2}
    assert doc["settings"]["work_dir"].startswith(str(tmp / "fastroute-bench-"))
    assert not list(tmp.glob("fastroute-bench-*"))        # used, then removed
    assert "studies/hour on this machine: not measured" in res.stdout   # no study mix: said, not invented


def test_sustained_rate_leaves_out_the_start_and_the_tail() -> None:
    from bench.runs import sustained_rate
    # 100 objects: a slow start (10 in 1 s), then 80 in 1 s, then a slow tail (10 in 2 s)
    samples = [(0.0, 0), (1.0, 10), (2.0, 90), (4.0, 100)]
    assert sustained_rate(samples, 100) == 80.0
    assert sustained_rate([(0.0, 0), (0.1, 100)], 100) is None        # too short to say


def test_throughput_bins_and_comma_lists() -> None:
    import argparse

    from bench.cli import int_list
    from bench.report import throughput_bins
    bins = throughput_bins([[0.0, 0], [1.0, 10], [2.0, 30]], bins=2)
    assert bins == [(1.0, 10.0), (2.0, 20.0)]
    assert int_list("1,2,2,4") == [1, 2, 4] and int_list("3") == [3]
    with pytest.raises(argparse.ArgumentTypeError):
        int_list("0,2")


def test_installed_mode_takes_the_checkout_off_the_routers_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import peers
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), "/elsewhere"]))
    monkeypatch.setattr(peers, "SOURCE", "installed")
    assert peers.python_env()["PYTHONPATH"] == "/elsewhere"
    monkeypatch.setattr(peers, "SOURCE", "checkout")
    assert peers.python_env()["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]


def test_spool_bench_measures_shared_and_sharded_commits_with_their_lock_times(tmp_path: Path) -> None:
    """``--spool``, tiny: every layout asked for is measured, each writer committed and reports
    its lock times; two writers in one environment wait for each other (never asserted fast)."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "bench", "--spool", "--fastroute", "checkout",
                          "--writers", "1,2", "--duration", "0.3", "--rounds", "1",
                          "--layouts", "shared,sharded,spool-shared,spool-journal",
                          "--work-dir", str(tmp_path / "work"), "--out", str(out), "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    results = {(r["layout"], r["values"], r["writers"]): r for r in doc["spool"]["results"]}
    assert set(results) == {(lay, v, w) for lay in ("shared", "sharded", "spool-shared", "spool-journal")
                            for v in ("ct", "tiny") for w in (1, 2)}
    for (layout, _, w), r in results.items():
        assert r["objects_per_s"] > 0 and len(r["wait_s"]) == len(r["hold_s"]) == w
        assert all(c > 0 for c in r["commits"]) and all(h > 0 for h in r["hold_s"])
    assert results[("sharded", "tiny", 1)]["same_as"] == "shared"     # one writer: one layout
    assert sum(results[("shared", "ct", 2)]["wait_s"]) > 0
    assert not list((tmp_path / "work" / "spool-bench").iterdir())      # gigabytes not left behind
    assert "sharded/shared" in res.stdout and "write lock per writer" in res.stdout
    assert "journal/s" in res.stdout            # the receive journal against one shared spool
    assert doc["machine"]["usable_cpus"] >= 1
