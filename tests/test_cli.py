"""The operator CLI: check, route-test and --version, as a user runs them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import synth


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastroute", *args], capture_output=True, text=True, timeout=120)


CONFIG = """\
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 4242}
  vna: {ae_title: VNA, host: 127.0.0.1, port: 4243}
rules:
  - name: ct-from-ct1
    match: {Modality: CT, calling_ae: CT1}
    send_to: [pacs]
    stop: true
  - name: everything
    match: 'SOPInstanceUID exists'
    send_to: [vna]
default: [vna]
"""


def test_check_ok_and_error(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(CONFIG)
    res = run("check", "-c", str(good))
    assert res.returncode == 0 and "OK" in res.stdout and "destination pacs" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("Modality: CT", "Modalty: CT"))
    res = run("check", "-c", str(bad))
    assert res.returncode == 2
    assert f"{bad}:6: rules[0].match" in res.stderr and "Modality" in res.stderr


def test_route_test_explains_each_rule(tmp_path: Path) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text(CONFIG)
    [ct] = synth.make_study(tmp_path / "ct", modality="CT", n_instances=1, tiny=True)
    res = run("route-test", "-c", str(cfg), str(ct), "--calling-ae", "CT1")
    assert res.returncode == 0, res.stderr
    assert "ct-from-ct1" in res.stdout and "=> pacs" in res.stdout
    res = run("route-test", "-c", str(cfg), str(ct), "--calling-ae", "OTHER")
    assert "=> vna" in res.stdout


def test_version_says_which_twin_is_loaded() -> None:
    res = run("--version")
    assert res.returncode == 0 and "fastroute" in res.stdout
    assert "peek=native" in res.stdout or "peek=python" in res.stdout, res.stdout


def test_serve_refuses_a_bad_config_without_starting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: nope\n")
    res = run("serve", "-c", str(bad))
    assert res.returncode == 2 and "port" in res.stderr
