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


# -- issue 12 item 4: the traps an operator fell into ----------------------------------------------

import os
import random
import time

import pydicom
import pytest

from fastroute.cli import parse_args
from fastroute.config import DestinationConfig
from fastroute.ops import actions as ops
from fastroute.routing.schedule import decide
from fastroute.spool import Claimed, OutcomeKind, Spool
from test_ops import fill, make_config


def run_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fastroute", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("command", [
    ["queue"], ["queue", "--json"], ["retry", "pacs"], ["audit"], ["audit", "--verify"],
    ["purge", "unrouted", "--state", "unrouted", "--reason", "x"], ["send-now", "--all"],
])
def test_spool_commands_refuse_a_missing_spool_and_create_none(tmp_path: Path, command: list[str]) -> None:
    res = run_in(tmp_path, *command)              # no -c: the embedded default's ./fastroute-spool
    assert res.returncode == 1
    assert f"no spool at {(tmp_path / 'fastroute-spool').resolve()} " in one_line_error(res)
    assert "-c FILE" in res.stderr
    assert list(tmp_path.iterdir()) == []        # nothing was created
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"spool: {tmp_path / 'nowhere'}\n")
    res = run_in(tmp_path, *command, "-c", str(cfg))
    assert res.returncode == 1 and f"no spool at {(tmp_path / 'nowhere').resolve()} " in one_line_error(res)
    assert not (tmp_path / "nowhere").exists()


def test_route_test_reads_a_raw_dataset_without_meta(tmp_path: Path) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text(CONFIG)
    [ct] = synth.make_study(tmp_path / "ct", modality="CT", n_instances=1, tiny=True)
    ds = pydicom.dcmread(ct)
    for implicit, syntax in ((True, "1.2.840.10008.1.2"), (False, "1.2.840.10008.1.2.1")):
        raw = tmp_path / f"raw-{implicit}.dcm"
        bare = pydicom.Dataset()
        bare.update(ds)            # the dataset without preamble or file meta
        pydicom.dcmwrite(raw, bare, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
        assert raw.read_bytes()[128:132] != b"DICM"
        res = run("route-test", str(raw), "-c", str(cfg), "--calling-ae", "CT1")
        assert res.returncode == 0, res.stderr
        assert f"transfer syntax {syntax}" in res.stdout and "raw dataset" in res.stdout
        assert str(ds.SOPInstanceUID) in res.stdout and "=> pacs" in res.stdout


def test_route_test_bad_inputs_give_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text(CONFIG)
    text = tmp_path / "notes.txt"
    text.write_text("not a DICOM file at all, just some words\n" * 4)
    for target, fragment in ((tmp_path, "is a directory"), (tmp_path / "missing.dcm", "No such file"),
                             (text, "not a DICOM file")):
        res = run("route-test", "-c", str(cfg), str(target))
        assert res.returncode == 1 and fragment in one_line_error(res), res.stderr


def test_audit_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    cfg, path = make_config(tmp_path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, min_free_bytes=0)
    try:
        for i in range(3000):         # ~0.5 MB of JSON lines: far more than a pipe holds
            spool.audit_record("note", who="test", why=f"filler event {i:05d} " + "x" * 100)
    finally:
        spool.close()
    proc = subprocess.Popen([sys.executable, "-m", "fastroute", "audit", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert b"filler event 00000" in proc.stdout.readline()     # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""                        # no BrokenPipeError traceback, no "Exception ignored"


def _claimed(attempts: int) -> Claimed:
    return Claimed(oid=7, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.4",
                   transfer_syntax="1.2.840.10008.1.2.1", attempts=attempts, size=10, calling_ae="CT1")


def test_giving_up_always_names_the_last_failure() -> None:
    dest = DestinationConfig(name="pacs", ae_title="PACS", host="h", port=1, max_attempts=3)
    rng = random.Random(1)
    silent = decide(_claimed(2), dest, 0xA700, "", unknown=False, now=0.0, rng=rng)   # no comment from the peer
    assert silent.kind == OutcomeKind.FAILED
    assert silent.error == "gave up after 3 attempts: 0xA700 (Refused: Out of Resources)"
    aborted = decide(_claimed(2), dest, None, "", unknown=True, now=0.0, rng=rng)
    assert aborted.error == "gave up after 3 attempts: no response"
    said = decide(_claimed(2), dest, None, "association aborted by PACS", unknown=True, now=0.0, rng=rng)
    assert said.error == "gave up after 3 attempts: association aborted by PACS"
    # entries written before this fix are shown with their status instead of nothing
    assert ops.reason("gave up after 3 attempts: ", 0xA700).endswith("attempts: 0xA700 (Refused: Out of Resources)")
    assert ops.reason("gave up after 3 attempts: ", None).endswith("attempts: no response")


def test_retry_of_an_oid_that_is_not_failed_says_so(tmp_path: Path) -> None:
    cfg, path = make_config(tmp_path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, min_free_bytes=0)
    try:
        oids = fill(spool, time.time() - 60)      # pacs: oids[0] delivered, [1] failed, [2] pending
    finally:
        spool.close()
    res = run("retry", "pacs", "--oid", "999999", "-c", str(path))
    assert res.returncode == 1 and "oid 999999 does not exist" in one_line_error(res)
    res = run("retry", "-c", str(path), "pacs", "--oid", str(oids[2]), "--oid", str(oids[0]))
    line = one_line_error(res)
    assert res.returncode == 1
    assert f"oid {oids[2]} is not failed at pacs (pacs: pending; vna: pending)" in line
    assert f"oid {oids[0]} is not failed at pacs (pacs: delivered; vna: pending)" in line
    res = run("retry", "-c", str(path), "pacs", "--oid", str(oids[1]))
    assert res.returncode == 0 and "1 failed object(s) queued again (pacs: 1)" in res.stdout
    res = run("retry", "-c", str(path), "pacs", "--oid", str(oids[1]))    # now pending: not again
    assert res.returncode == 1 and "nothing retried" in res.stderr


def test_check_rejects_reserved_destination_names(tmp_path: Path) -> None:
    for name in ("unrouted", "Unrouted", "default"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(CONFIG.replace("  vna:", f"  {name}:").replace("[vna]", f"[{name}]"))
        res = run("check", "-c", str(bad))
        assert res.returncode == 2
        assert f"{bad}:3: destinations.{name}: '{name}' is reserved" in res.stderr, res.stderr
        assert "unknown destination" not in res.stderr     # the rules naming it are not errors too
    bad.write_text(CONFIG.replace("  vna:", "  ~unrouted:"))
    res = run("check", "-c", str(bad))
    assert res.returncode == 2 and "destination names use letters" in res.stderr


def test_check_reports_every_error_of_a_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("prot: 11112\n" + CONFIG
                   .replace("port: 4243", "port: 99999")
                   .replace("Modality: CT", "Modalty: CT")
                   .replace("send_to: [vna]\ndefault", "send_to: [vnaa]\ndefault"))
    res = run("check", "-c", str(bad))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 4, res.stderr
    assert lines[0].startswith(f"configuration error: {bad}:1: prot: unknown key") and "did you mean 'port'" in lines[0]
    assert f"{bad}:4: destinations.vna.port: expected a TCP port" in lines[1]
    assert f"{bad}:7: rules[0].match" in lines[2] and "Modality" in lines[2]
    assert f"{bad}:12: rules[1].send_to: unknown destination 'vnaa'" in lines[3]


def test_a_typo_of_a_required_key_is_one_error_not_two(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("pacs: {ae_title:", "pacs: {aetitle:"))
    res = run("check", "-c", str(bad))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "did you mean 'ae_title'" in res.stderr


COMMANDS: list[list[str]] = [
    ["serve"], ["check"], ["route-test", "a.dcm", "b.dcm"], ["queue", "--json"], ["retry", "pacs", "--oid", "3"],
    ["purge", "pacs", "--state", "failed", "--reason", "r"], ["echo", "pacs"], ["audit", "--verify"],
    ["send-now", "pacs"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_command_takes_c_before_or_after_its_arguments(command: list[str]) -> None:
    name, rest = command[0], command[1:]
    for argv in ([name, "-c", "x.yaml", *rest], [name, *rest, "-c", "x.yaml"], ["-c", "x.yaml", *command],
                 [name, *rest, "--config", "x.yaml"]):
        args = parse_args(argv)
        assert args.config == "x.yaml", argv
        assert args.func.__name__ == f"cmd_{name.replace('-', '_')}"
    if name == "route-test":
        assert parse_args(["route-test", "a.dcm", "-c", "x.yaml", "b.dcm"]).objects == ["a.dcm", "b.dcm"]


def test_c_twice_with_different_files_and_check_without_c_are_refused() -> None:
    for argv in (["-c", "a.yaml", "queue", "-c", "b.yaml"], ["check"]):
        res = run(*argv)
        assert res.returncode == 2 and "Traceback" not in res.stderr and "-c" in res.stderr
    res = run("-c", "a.yaml", "queue", "--config", "a.yaml")   # the same file twice is fine (it is missing)
    assert res.returncode == 2 and "cannot read configuration" in res.stderr


def test_retry_of_a_study_names_oids_outside_it(tmp_path: Path) -> None:
    from test_ops import STUDY_A, STUDY_B
    cfg, _ = make_config(tmp_path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, min_free_bytes=0)
    try:
        oids = fill(spool, time.time() - 60)      # oids[1] (study A) failed at pacs; oids[3] is study B
        with pytest.raises(ops.NotFound, match=f"oid {oids[3]} is not an object of study {STUDY_A}"):
            ops.retry(cfg, spool, study_instance_uid=STUDY_A, oids=[oids[1], oids[3]])
        entry = spool.entry("pacs", oids[1])
        assert entry is not None and entry.state == "failed"       # nothing was retried
        assert ops.retry(cfg, spool, study_instance_uid=STUDY_A, oids=[oids[1]])["count"] == 1
        with pytest.raises(ops.NotFound, match=f"oid {oids[3]} is not failed at any destination"):
            ops.retry(cfg, spool, study_instance_uid=STUDY_B, oids=[oids[3]])
    finally:
        spool.close()
