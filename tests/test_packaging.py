"""Packaging and deployment (issue 12 item 10): licence, metadata, the systemd unit, the
container recipe, and tuning profiles that travel in the wheel."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

from fastroute.config import load

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "fastroute.service"
CONTAINERFILE = DEPLOY / "Containerfile"
PROFILES = sorted(p.name for p in (REPO / "tuning").glob("*.yaml"))


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# -- licence and metadata -------------------------------------------------------------------------

def test_license_file_matches_the_declared_licence() -> None:
    project = pyproject()["project"]
    assert project["license"] == {"text": "MIT"}
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Copyright (c) " in text and "fastroute contributors" in text
    assert "Permission is hereby granted, free of charge" in text and 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    assert "License :: OSI Approved :: MIT License" in project["classifiers"]
    assert pyproject()["tool"]["setuptools"]["license-files"] == ["LICENSE"]


def test_classifiers_and_no_made_up_urls() -> None:
    # fastroute has no public home yet: [project.urls] stays out until it does, rather than
    # pointing operators at an address nobody owns.
    project = pyproject()["project"]
    assert "urls" not in project
    classifiers = project["classifiers"]
    versions = re.findall(r"Python :: (3\.\d+)$", "\n".join(classifiers), re.M)
    assert versions and min(versions) == project["requires-python"].removeprefix(">=")
    assert "Topic :: Scientific/Engineering :: Medical Science Apps." in classifiers
    assert all(" :: " in c for c in classifiers)


# -- systemd --------------------------------------------------------------------------------------

def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: [Section], Key=value (keys may repeat), # and ; comments,
    backslash continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = re.sub(r"\\\n", " ", text)
    for n, line in enumerate(logical.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if m := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            current = sections.setdefault(m.group(1), {})
            continue
        m = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", line)
        assert m and current is not None, f"line {n} is not Key=value inside a section: {line!r}"
        current.setdefault(m.group(1), []).append(m.group(2).strip())
    return sections


def test_systemd_unit_is_hardened() -> None:
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc["User"] == "fastroute" and svc["Group"] == "fastroute"
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes" and svc["PrivateTmp"] == "yes"
    assert svc["Restart"] == "on-failure"
    assert int(svc["LimitNOFILE"]) >= 4 * 1024
    assert re.fullmatch(r"\S*kill -(HUP|SIGHUP) \$MAINPID", svc["ExecReload"])
    assert svc["CapabilityBoundingSet"] == ""        # no capabilities at all by default
    start = svc["ExecStart"].split()
    assert start[0].endswith("/fastroute") and start[1:3] == ["serve", "-c"]
    # the spool of the configuration it starts is the one place it may write
    cfg = load(DEPLOY / Path(start[3]).name)
    writable = [Path(p) for p in svc["ReadWritePaths"].split()]
    assert any(cfg.spool == w or w in cfg.spool.parents for w in writable), (cfg.spool, writable)
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    sysusers = (DEPLOY / "fastroute.sysusers").read_text()
    assert re.search(r"^u fastroute - .* /var/lib/fastroute ", sysusers, re.M)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants the programs to exist: point them at one that does, nothing else changes
    text = UNIT.read_text().replace("/opt/fastroute/bin/fastroute", shutil.which("true") or "/bin/true")
    unit = tmp_path / "fastroute.service"
    unit.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "fastroute.service" not in out, out     # unknown keys and bad values are only warnings


# -- the container recipe -----------------------------------------------------------------------

def parse_containerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuations joined, comments dropped."""
    out = []
    for line in re.sub(r"\\\n(\s*#.*\n)*", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_containerfile_has_what_a_deployment_needs() -> None:
    steps = parse_containerfile(CONTAINERFILE.read_text())
    by = lambda word: [a for w, a in steps if w == word]   # noqa: E731
    stages = [i for i, (w, _) in enumerate(steps) if w == "FROM"]
    final = steps[stages[-1]:]
    base = final[0][1]
    assert re.match(r"(docker\.io/)?(library/)?(debian:\S*-slim|python:\S*-slim(-\S+)?)$", base), base
    final_runs = " ".join(a for w, a in final if w == "RUN")
    assert "pip install" in final_runs and "useradd" in final_runs
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_user = max(i for i, (w, _) in enumerate(final) if w == "USER")
    assert all(w != "RUN" for w, _ in final[last_user:])        # nothing runs as root after it
    cfg = load(DEPLOY / "router.yaml")
    assert any(f"COPY deploy/router.yaml /etc/fastroute/router.yaml" == f"COPY {a}" for a in by("COPY"))
    volumes = " ".join(by("VOLUME"))
    assert any(str(cfg.spool).startswith(v) for v in re.findall(r"/[\w/.-]+", volumes)), volumes
    exposed = {int(p.split("/")[0]) for a in by("EXPOSE") for p in a.split()}
    assert cfg.port in exposed and cfg.http is not None and cfg.http.port in exposed
    [health] = by("HEALTHCHECK")
    assert "CMD" in health and ("/healthz" in health or "fastroute echo" in health)
    if "/healthz" in health:
        assert f":{cfg.http.port}/healthz" in health and cfg.http.host in ("0.0.0.0", "127.0.0.1")
    assert by("ENTRYPOINT") == ['["fastroute"]']
    assert by("CMD")[-1] == '["serve", "-c", "/etc/fastroute/router.yaml"]'


def test_deployed_config_is_valid() -> None:
    res = subprocess.run([sys.executable, "-m", "fastroute", "check", "-c", str(DEPLOY / "router.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


# -- tuning profiles in the wheel -----------------------------------------------------------------

@pytest.mark.slow
def test_wheel_ships_tuning_profiles_and_profile_names_resolve(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(wheels)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    [wheel] = wheels.glob("fastroute-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert PROFILES and {f"fastroute/tuning/{p}" for p in PROFILES} <= names
    # issue 15: the content packages and PS3.15 Table E.1-1, read with importlib.resources
    assert {"fastroute/content/deidentify.py", "fastroute/content/profiles/ps3.15-table-e.1-1.csv"} <= names
    # every package of the checkout (a subpackage missing from pyproject's list installs nothing)
    packages = {p.relative_to(REPO).as_posix() for p in (REPO / "fastroute").rglob("__init__.py")}
    assert packages and packages <= names, sorted(packages - names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    # installed (not the checkout): --profile 8-cores is found inside the package
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target",
                          str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = tmp_path / "router.yaml"
    cfg.write_text("spool: ./spool\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", "import fastroute; print(fastroute.__file__)"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert res.stdout.startswith(str(site)), res.stdout + res.stderr
    res = subprocess.run([sys.executable, "-m", "fastroute", "check", "-c", str(cfg), "--profile", "8-cores"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "(4 listener processes)" in res.stdout and f"+ {site}" in res.stdout
