"""Operator views and actions (fastroute.ops.actions) on a real spool, and the CLI commands sharing them.

The spool is filled through its public receive/send API (``put_many``, ``claim``, ``settle``)
so every view is checked against states the data plane really produces. The helpers here are
imported by test_api.py and test_dashboard.py.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from fastroute.ops import actions as ops
from fastroute.ops.alerts import AlertBook, Reading, evaluate
from fastroute.cli import main as cli_main
from fastroute.config import AlertsConfig, Config, load
from fastroute.errors import ConfigError
from fastroute.spool import Counters, Incoming, Outcome, OutcomeKind, Spool
from fastroute.spool.senderstate import DestinationState, SenderState, read_send_now
from fastroute.spool.wakeup import Waker

STUDY_A = "1.2.826.0.1.3680043.10.1"
STUDY_B = "1.2.826.0.1.3680043.10.2"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
AGE = 120.0   # seconds since the scenario's objects arrived


def config_text(spool: Path, token: str | None = "s3cret", port: int = 11112, sources: bool = False) -> str:
    """``sources``: with an archive to migrate from (issue 13), before ``alerts:`` (which
    tests append to, and whose line numbers they check without it)."""
    http = f"http: {{host: 127.0.0.1, port: 8080, token: {token}}}" if token else "http: {host: 127.0.0.1}"
    if sources:
        http += "\nsources:\n  oldpacs: {ae_title: OLDPACS, host: 127.0.0.1, port: 1}"
    return f"""\
spool: {spool}
port: {port}
spool_max_bytes: 256MiB
min_free_bytes: 0
destinations:
  pacs: {{ae_title: PACS, host: 127.0.0.1, port: 1, query: true}}
  vna: {{ae_title: VNA, host: 127.0.0.1, port: 1}}
rules:
  - name: ct-to-pacs
    match: {{Modality: CT}}
    send_to: [pacs, vna]
{http}
alerts:
  oldest_age: {{default: 1h, pacs: 60s}}
  consecutive_failures: 3
"""


def make_config(tmp_path: Path, **kw: Any) -> tuple[Config, Path]:
    path = tmp_path / "router.yaml"
    path.write_text(config_text(tmp_path / "spool", **kw))
    return load(path), path


def incoming(sop: str, study: str, dests: tuple[str, ...], *, calling: str = "CT1",
             accession: str = "ACC1", patient: str = "PAT1") -> Incoming:
    return Incoming(data=b"\0" * 128, transfer_syntax=EXPLICIT, sop_class_uid=CT_IMAGE, sop_instance_uid=sop,
                    destinations=dests, meta={
                        "study_instance_uid": study, "patient_id": patient, "accession_number": accession,
                        "modality": "CT", "calling_ae": calling, "called_ae": "FASTROUTE", "peer": "10.0.0.5",
                        "rules": ["ct-to-pacs"] if dests else []})


def fill(spool: Spool, t0: float) -> list[int]:
    """Study A (3 objects) to pacs+vna, study B (1) to pacs, one unrouted object; then:
    pacs delivers A1 and fails A2 with 0xA900; vna gets 0xA700 for A1 (retry in an hour)."""
    results = spool.put_many([
        incoming(f"{STUDY_A}.1", STUDY_A, ("pacs", "vna")),
        incoming(f"{STUDY_A}.2", STUDY_A, ("pacs", "vna")),
        incoming(f"{STUDY_A}.3", STUDY_A, ("pacs", "vna")),
        incoming(f"{STUDY_B}.1", STUDY_B, ("pacs",), accession="ACC2", patient="PAT2"),
        incoming("1.2.3.99", "1.2.3", (), calling="MR1", accession="ACC3", patient="PAT3"),
    ], now=t0)
    oids = [r.oid for r in results]   # type: ignore[union-attr]
    claimed, _ = spool.claim("pacs", 2, now=t0 + 1)
    assert [c.oid for c in claimed] == oids[:2]
    spool.settle("pacs", [Outcome(oids[0], OutcomeKind.DELIVERED, status=0),
                          Outcome(oids[1], OutcomeKind.FAILED, status=0xA900, error="dataset does not match")], now=t0 + 2)
    claimed, _ = spool.claim("vna", 1, now=t0 + 1)
    spool.settle("vna", [Outcome(oids[0], OutcomeKind.RETRY, status=0xA700, error="out of resources",
                                 next_at=t0 + 3600)], now=t0 + 2)
    return oids


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Config, Path, Spool, list[int]]]:
    cfg, path = make_config(tmp_path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, min_free_bytes=0)
    oids = fill(spool, time.time() - AGE)
    yield cfg, path, spool, oids
    spool.close()


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows}


def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- views --------------------------------------------------------------------------------------

def test_destination_status_counts_ages_and_states(env: Any) -> None:
    cfg, _, spool, _ = env
    rows = by_name(ops.destination_status(cfg, spool))
    assert set(rows) == {"pacs", "vna", "unrouted"}
    pacs, vna, unrouted = rows["pacs"], rows["vna"], rows["unrouted"]
    assert (pacs["pending"], pacs["in_flight"], pacs["failed"], pacs["delivered"]) == (2, 0, 1, 1)
    assert (vna["pending"], vna["failed"], vna["delivered"]) == (3, 0, 0)
    assert AGE - 5 < pacs["oldest_age"] < AGE + 30
    assert unrouted["pending"] == 1 and unrouted["status"] == "unrouted" and not unrouted["configured"]
    assert pacs["status"] == "unknown"          # no sender has published a state yet
    assert pacs["peer"]["ae_title"] == "PACS"

    (cfg.spool / "run").mkdir(exist_ok=True)
    DestinationState("pacs", state=SenderState.BACKING_OFF, down_since=time.time() - 30, consecutive_failures=4,
                     last_error="connection refused").write(cfg.spool)
    pacs = by_name(ops.destination_status(cfg, spool))["pacs"]
    assert pacs["status"] == "backing_off" and pacs["consecutive_failures"] == 4
    assert pacs["last_error"] == "connection refused" and pacs["down_since"] is not None

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    DestinationState("vna", state=SenderState.UP, pid=dead.pid).write(cfg.spool)
    assert by_name(ops.destination_status(cfg, spool))["vna"]["status"] == "stopped"


def test_failures_carry_dicom_status_and_meaning(env: Any) -> None:
    cfg, _, spool, oids = env
    rows = ops.failures(cfg, spool)
    assert len(rows) == 1
    f = rows[0]
    assert (f["destination"], f["oid"], f["status"]) == ("pacs", oids[1], 0xA900)
    assert f["status_text"] == "0xA900 (Error: Data Set does not match SOP Class)"
    assert f["sop_instance_uid"] == f"{STUDY_A}.2" and f["calling_ae"] == "CT1"
    assert f["error"] == "dataset does not match" and f["attempts"] == 1
    assert ops.failures(cfg, spool, "vna") == []
    with pytest.raises(ops.NotFound):
        ops.failures(cfg, spool, "nope")


def test_lookup_shows_each_objects_path(env: Any) -> None:
    cfg, _, spool, oids = env
    result = ops.lookup(cfg, spool, study_instance_uid=STUDY_A)
    assert result["count"] == 3 and not result["truncated"]
    first, second, third = result["objects"]
    assert first["received_from"] == {"calling_ae": "CT1", "called_ae": "FASTROUTE", "peer": "10.0.0.5"}
    assert first["rules"] == ["ct-to-pacs"] and first["routed_to"] == ["pacs", "vna"]
    steps = {s["destination"]: s for s in first["path"]}
    assert steps["pacs"]["state"] == "delivered" and steps["pacs"]["status"] == 0 and steps["pacs"]["at"]
    assert steps["vna"]["state"] == "pending" and steps["vna"]["attempts"] == 1
    assert steps["vna"]["status_text"].startswith("0xA700") and steps["vna"]["error"] == "out of resources"
    failed = {s["destination"]: s for s in second["path"]}["pacs"]
    assert failed["state"] == "failed" and failed["status"] == 0xA900 and failed["attempts"] == 1
    assert failed["last_failure"]["error"] == "dataset does not match"
    assert {s["state"] for s in third["path"]} == {"pending"}

    assert ops.lookup(cfg, spool, accession_number="ACC2")["objects"][0]["oid"] == oids[3]
    assert ops.lookup(cfg, spool, patient_id="PAT1")["count"] == 3
    held = ops.lookup(cfg, spool, patient_id="PAT3")["objects"][0]
    assert held["path"] == [{"destination": "unrouted", "state": "unrouted", "attempts": 0, "at": None,
                             "status": None, "error": "", "next_at": None, "status_text": ""}]
    assert ops.lookup(cfg, spool, study_instance_uid="9.9.9")["count"] == 0
    with pytest.raises(ops.BadRequest):
        ops.lookup(cfg, spool)
    with pytest.raises(ops.BadRequest):
        ops.lookup(cfg, spool, study_instance_uid=STUDY_A, patient_id="PAT1")
    assert ops.get_object(spool, oids[0])["sop_instance_uid"] == f"{STUDY_A}.1"
    with pytest.raises(ops.NotFound):
        ops.get_object(spool, 999999)


def test_study_trace_shows_a_suppressed_resend_and_the_delivery_it_matched(tmp_path: Path) -> None:
    """With duplicate_window on, the trace says why a re-send went nowhere: the earlier
    delivery's oid and time, on the lookup and on the object view."""
    cfg, _ = make_config(tmp_path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, min_free_bytes=0, duplicate_window=3600)
    try:
        t0 = time.time() - AGE
        [first] = spool.put_many([incoming(f"{STUDY_A}.1", STUDY_A, ("pacs", "vna"))], now=t0)
        assert first is not None
        spool.claim("pacs", 1, now=t0 + 1)
        spool.settle("pacs", [Outcome(first.oid, OutcomeKind.DELIVERED, status=0, at=t0 + 2)], now=t0 + 2)
        [again] = spool.put_many([incoming(f"{STUDY_A}.1", STUDY_A, ("pacs", "vna"))], now=t0 + 60)
        assert again is not None and again.suppressed == ("pacs",)
        objects = {o["oid"]: o for o in ops.lookup(cfg, spool, study_instance_uid=STUDY_A)["objects"]}
        for view in (objects[again.oid], ops.get_object(spool, again.oid)):
            steps = {s["destination"]: s for s in view["path"]}
            assert steps["pacs"]["state"] == "suppressed"
            assert steps["pacs"]["duplicate_of"] == {"oid": first.oid, "delivered_at": t0 + 2}
            assert f"(oid {first.oid})" in steps["pacs"]["error"]
            assert "duplicate_window" in steps["pacs"]["error"]
            assert steps["vna"]["state"] == "pending"   # the copy still owed to vna supersedes
        assert "duplicate_of" not in {s["destination"]: s for s in objects[first.oid]["path"]}["pacs"]
    finally:
        spool.close()


# -- actions ------------------------------------------------------------------------------------

def last_event(spool: Spool) -> dict[str, Any]:
    return list(spool.audit_events())[-1]


def test_retry_per_destination_is_audited_and_wakes_the_sender(env: Any) -> None:
    cfg, _, spool, oids = env
    waker = Waker(cfg.spool, "pacs")
    try:
        result = ops.retry(cfg, spool, destination="pacs", who="alice", why="PACS fixed")
        assert result == {"retried": {"pacs": 1}, "count": 1}
        assert waker.wait(2.0)
    finally:
        waker.close()
    pacs = by_name(ops.destination_status(cfg, spool))["pacs"]
    assert (pacs["pending"], pacs["failed"]) == (3, 0)
    ev = last_event(spool)
    assert (ev["action"], ev["who"], ev["why"], ev["destination"], ev["count"]) == \
        ("retry", "alice", "PACS fixed", "pacs", 1)
    with pytest.raises(ops.BadRequest):
        ops.retry(cfg, spool)
    with pytest.raises(ops.NotFound):
        ops.retry(cfg, spool, destination="nope")


def test_retry_per_study(env: Any) -> None:
    cfg, _, spool, oids = env
    assert ops.retry(cfg, spool, study_instance_uid=STUDY_B)["count"] == 0
    result = ops.retry(cfg, spool, study_instance_uid=STUDY_A, why="re-run")
    assert result["retried"] == {"pacs": 1}
    assert last_event(spool)["study_instance_uid"] == STUDY_A
    with pytest.raises(ops.NotFound):
        ops.retry(cfg, spool, study_instance_uid="9.9.9")


def test_purge_needs_states_and_a_reason(env: Any) -> None:
    cfg, _, spool, oids = env
    with pytest.raises(ops.BadRequest, match="reason"):
        ops.purge(cfg, spool, destination="pacs", states=["failed"], reason=" ")
    with pytest.raises(ops.BadRequest, match="states"):
        ops.purge(cfg, spool, destination="pacs", states=[], reason="x")
    with pytest.raises(ops.BadRequest, match="unknown state"):
        ops.purge(cfg, spool, destination="pacs", states=["in_flight"], reason="x")

    result = ops.purge(cfg, spool, destination="pacs", states=["failed"], reason="bad object", who="bob")
    assert result["purged"] == [oids[1]]
    ev = last_event(spool)
    assert (ev["action"], ev["why"], ev["who"], ev["oids"]) == ("purge", "bad object", "bob", [oids[1]])
    step = {s["destination"]: s for s in ops.get_object(spool, oids[1])["path"]}["pacs"]
    assert step["state"] == "purged" and step["error"] == "bad object"

    only_b = ops.purge(cfg, spool, destination="pacs", states=["pending"], reason="wrong patient",
                       study_instance_uid=STUDY_B)
    assert only_b["purged"] == [oids[3]]
    assert ops.purge(cfg, spool, destination="unrouted", states=["unrouted"], reason="junk")["count"] == 1
    assert by_name(ops.destination_status(cfg, spool))["unrouted"]["pending"] == 0


def test_pause_and_resume(env: Any) -> None:
    cfg, _, spool, _ = env
    assert ops.set_paused(cfg, spool, "pacs", True, who="carol", why="maintenance")["paused"]
    assert spool.is_paused("pacs")
    assert by_name(ops.destination_status(cfg, spool))["pacs"]["status"] == "paused"
    assert (last_event(spool)["action"], last_event(spool)["why"]) == ("pause", "maintenance")
    waker = Waker(cfg.spool, "pacs")
    try:
        assert ops.set_paused(cfg, spool, "pacs", False) == {"destination": "pacs", "paused": False}
        assert waker.wait(2.0)
    finally:
        waker.close()
    assert not spool.is_paused("pacs") and last_event(spool)["action"] == "resume"
    with pytest.raises(ops.NotFound):
        ops.set_paused(cfg, spool, "nope", True)
    with pytest.raises(ops.BadRequest):
        ops.set_paused(cfg, spool, "unrouted", True)


def test_send_now_makes_waiting_objects_due_audits_and_wakes(env: Any) -> None:
    """vna's A1 waits an hour after 0xA700: send-now makes it due (attempts kept), leaves the
    sender its request (who/why) and a wake-up, and is audited."""
    cfg, _, spool, oids = env
    assert spool.entry("vna", oids[0]).next_at > time.time() + 3000   # type: ignore[union-attr]
    waker = Waker(cfg.spool, "vna")
    try:
        result = ops.send_now(cfg, spool, "vna", who="dave", why="VNA back")
        assert waker.wait(2.0)
    finally:
        waker.close()
    [vna] = result["destinations"]
    assert (result["made_due"], vna["destination"], vna["was"]) == (1, "vna", "unknown")
    assert "no sender is running" in vna["note"]
    e = spool.entry("vna", oids[0])
    assert e is not None and e.next_at == 0 and e.attempts == 1 and e.last_status == 0xA700
    request = read_send_now(cfg.spool, "vna")
    assert request is not None and (request.source, request.who, request.why) == ("send-now", "dave", "VNA back")
    ev = last_event(spool)
    assert (ev["action"], ev["who"], ev["why"], ev["destination"], ev["count"]) == \
        ("send_now", "dave", "VNA back", "vna", 1)
    assert ops.send_now(cfg, spool, all_destinations=True)["made_due"] == 0   # nothing waits any more
    assert [e["destination"] for e in list(spool.audit_events())[-2:]] == ["pacs", "vna"]
    with pytest.raises(ops.BadRequest):
        ops.send_now(cfg, spool)
    with pytest.raises(ops.BadRequest):
        ops.send_now(cfg, spool, "pacs", all_destinations=True)
    with pytest.raises(ops.NotFound):
        ops.send_now(cfg, spool, "nope")
    with pytest.raises(ops.BadRequest):
        ops.send_now(cfg, spool, "unrouted")


def test_pause_wakes_the_sender_and_resume_asks_it_to_send_now(env: Any) -> None:
    cfg, _, spool, _ = env
    waker = Waker(cfg.spool, "pacs")
    try:
        ops.set_paused(cfg, spool, "pacs", True, who="carol")
        assert waker.wait(2.0)                      # the sender shows "paused" at once
        assert read_send_now(cfg.spool, "pacs") is None
        ops.set_paused(cfg, spool, "pacs", False, who="carol", why="done")
        assert waker.wait(2.0)
    finally:
        waker.close()
    request = read_send_now(cfg.spool, "pacs")
    assert request is not None and (request.source, request.who, request.why) == ("resume", "carol", "done")


def test_cli_send_now(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, path, spool, _ = env
    spool.close()
    c = str(path)
    assert cli_main(["send-now", "-c", c, "vna", "--reason", "VNA back"]) == 0
    out = capsys.readouterr().out
    assert "vna: backoff reset (was unknown, 0 failure(s) in a row); 1 object(s) waiting out a retry delay " \
           "are due now" in out and "audited" in out
    assert cli_main(["send-now", "-c", c, "--all"]) == 0
    assert [ln.split(":")[0] for ln in capsys.readouterr().out.splitlines()[:2]] == ["pacs", "vna"]
    assert cli_main(["send-now", "-c", c]) == 1
    assert "name one destination, or all of them" in capsys.readouterr().err
    assert cli_main(["send-now", "-c", c, "nope"]) == 1
    assert "unknown destination 'nope'" in capsys.readouterr().err


# -- configuration ------------------------------------------------------------------------------

def test_validate_config_names_line_and_key(tmp_path: Path) -> None:
    good = config_text(tmp_path / "spool")
    assert ops.validate_config(good)["valid"]
    assert ops.validate_config(good)["summary"]["destinations"] == ["pacs", "vna"]
    bad = good.replace("port: 11112", "port: 99999")
    result = ops.validate_config(bad)
    assert not result["valid"]
    err = result["errors"][0]
    assert (err["line"], err["key"]) == (2, "port") and "between 0 and 65535" in err["message"]
    typo = good.replace("  consecutive_failures: 3", "  consecutive_failure: 3")
    err = ops.validate_config(typo)["errors"][0]
    assert err["key"] == "alerts.consecutive_failure" and err["line"] == typo.splitlines().index(
        "  consecutive_failure: 3") + 1


class Hup:
    """Counts SIGHUPs delivered to this process (stands in for the supervisor)."""

    def __init__(self) -> None:
        self.count = 0
        self.previous: Any = None

    def __enter__(self) -> "Hup":
        self.previous = signal.signal(signal.SIGHUP, self._on)
        return self

    def _on(self, *_: Any) -> None:
        self.count += 1

    def __exit__(self, *_: Any) -> None:
        signal.signal(signal.SIGHUP, self.previous)


def test_reload_validates_writes_atomically_audits_and_signals(env: Any) -> None:
    cfg, path, spool, _ = env
    applied = path.read_text()
    with pytest.raises(ops.Conflict, match="no running supervisor"):
        ops.reload_config(cfg, spool, str(path), applied_text=applied)
    (cfg.spool / "run").mkdir(exist_ok=True)
    (cfg.spool / "run" / "supervisor.pid").write_text(f"{os.getpid()}\n")
    events_before = len(list(spool.audit_events()))
    with Hup() as hup:
        bad = applied.replace("port: 11112", "port: nope")
        with pytest.raises(ConfigError) as info:
            ops.reload_config(cfg, spool, str(path), text=bad, applied_text=applied)
        assert info.value.line == 2 and info.value.key == "port"
        assert path.read_text() == applied and hup.count == 0
        assert len(list(spool.audit_events())) == events_before

        moved = applied.replace(f"spool: {cfg.spool}", f"spool: {cfg.spool}-elsewhere")
        with pytest.raises(ConfigError, match="spool path cannot change"):
            ops.reload_config(cfg, spool, str(path), text=moved, applied_text=applied)

        new = applied.replace("port: 11112", "port: 11113")
        result = ops.reload_config(cfg, spool, str(path), text=new, applied_text=applied, who="dave",
                                   why="new port")
        wait_for(lambda: hup.count == 1, what="SIGHUP")
    assert path.read_text() == new and result["changed"] and result["supervisor_pid"] == os.getpid()
    assert "-port: 11112" in result["diff"] and "+port: 11113" in result["diff"]
    ev = last_event(spool)
    assert (ev["action"], ev["who"], ev["why"]) == ("config_change", "dave", "new port")
    assert ev["diff"] == result["diff"]
    assert not list(path.parent.glob(".router.yaml.*"))   # no temporary file left behind
    with pytest.raises(ops.Conflict, match="embedded default"):
        ops.reload_config(cfg, spool, None)


# -- audit trail and retention ------------------------------------------------------------------

def test_audit_export_jsonl_csv_and_filters(env: Any) -> None:
    cfg, _, spool, _ = env
    ops.retry(cfg, spool, destination="pacs", who="alice", why="fixed")
    buf = io.StringIO()
    n = ops.audit_export(spool, buf, fmt="jsonl")
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert n == len(events) == 6   # a receipt per study and sender of the group commit (issue 14)
    assert [e["action"] for e in events] == ["received"] * 3 + ["delivered", "failed", "retry"]

    buf = io.StringIO()
    ops.audit_export(spool, buf, fmt="csv", study_instance_uid=STUDY_A)
    rows = [r for r in csv.DictReader(io.StringIO(buf.getvalue())) if r["action"] != "received"]
    assert [r["action"] for r in rows] == ["delivered", "failed"]
    assert rows[1]["status"] == str(0xA900) and rows[1]["error"] == "dataset does not match"
    assert rows[0]["time"].endswith("Z") and json.loads(rows[0]["details"])["oid"] > 0

    recent = time.time() - AGE / 2
    buf = io.StringIO()
    assert ops.audit_export(spool, buf, since=recent) == 1
    assert ops.parse_time("2024-05-31") == ops.parse_time("2024-05-31T00:00:00Z")
    assert ops.parse_time("2024-05-31", end=True) == pytest.approx(ops.parse_time("2024-06-01T00:00:00+00:00"))
    with pytest.raises(ops.BadRequest):
        ops.parse_time("yesterday")


def test_retention_prunes_old_events_and_keeps_the_chain(tmp_path: Path) -> None:
    cfg, _ = make_config(tmp_path)
    import dataclasses
    cfg = dataclasses.replace(cfg, audit_retention=AGE / 2)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        fill(spool, time.time() - AGE)
        ops.retry(cfg, spool, destination="pacs")
        done = ops.apply_retention(cfg, spool)
        assert done["audit_pruned"] == 5   # 3 receipts, a delivery, a failure
        # the prune anchors the chain's new start in an event of its own (issue 11 item 9)
        assert [e["action"] for e in spool.audit_events()] == ["retry", "audit_prune", "retention"]
        assert spool.audit_verify()[0]
        report = spool.audit_report()
        assert report.ok and report.events == 3, report.text
        assert ops.apply_retention(cfg, spool)["audit_pruned"] == 0
    finally:
        spool.close()


def test_throughput_history_rates() -> None:
    h = ops.ThroughputHistory(keep=10)
    h.add(100.0, Counters.from_text({"received": 0, "delivered:pacs": 0, "failed:pacs": 3}))
    h.add(102.0, Counters.from_text({"received": 10, "delivered:pacs": 4}))
    h.add(102.0, Counters.from_text({"received": 99}))                     # same instant: ignored
    h.add(104.0, Counters.from_text({"received": 10, "delivered:pacs": 10, "delivered:~unrouted": 0}))
    s = h.series()
    assert s["t"] == [102.0, 104.0] and s["received"] == [5.0, 0.0]
    assert s["delivered"]["pacs"] == [2.0, 3.0] and "unrouted" in s["delivered"]
    h.add(120.0, Counters.from_text({"received": 10}))
    assert len(h.samples) == 1                         # older than ``keep`` dropped


# -- alerts (pure) ------------------------------------------------------------------------------

def test_alert_evaluation_and_transitions(caplog: pytest.LogCaptureFixture) -> None:
    cfg = AlertsConfig(oldest_age=600, oldest_age_for={"pacs": 60}, consecutive_failures=3,
                       spool_min_free=10 * 1024**3)
    readings = [Reading("pacs", 90, 0), Reading("vna", 90, 5)]
    checks = evaluate(cfg, readings, disk_free=1024**3)
    assert {k for k, v in checks.items() if v} == {("oldest_age", "pacs"), ("consecutive_failures", "vna"),
                                                    ("spool_free", "")}
    assert set(checks) == {("oldest_age", "pacs"), ("oldest_age", "vna"), ("consecutive_failures", "pacs"),
                           ("consecutive_failures", "vna"), ("spool_free", "")}
    assert evaluate(AlertsConfig(), readings, 0) == {}

    book = AlertBook()
    with caplog.at_level(logging.INFO, logger="fastroute.alerts"):
        raised = book.update(checks, now=1000)
        again = book.update(evaluate(cfg, [Reading("pacs", 95, 0), Reading("vna", 90, 5)], 1024**3), now=1002)
        cleared = book.update(evaluate(cfg, [Reading("pacs", 10, 0), Reading("vna", 90, 5)], 1024**3), now=1004)
    assert [t.event for t in raised] == ["raised"] * 3 and again == []
    assert [(t.event, t.alert.name, t.since) for t in cleared] == [("cleared", "oldest_age", 1000)]
    assert book.active[("consecutive_failures", "vna")][1] == 1000
    messages = [r.getMessage() for r in caplog.records]
    assert sum("alert raised" in m for m in messages) == 3 and sum("alert cleared" in m for m in messages) == 1


# -- the CLI shares the implementation ------------------------------------------------------------

def test_cli_queue_retry_purge_audit(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, path, spool, oids = env
    spool.close()   # the CLI opens its own (one LMDB environment per process); closing twice is harmless
    c = str(path)
    assert cli_main(["queue", "-c", c, "--json", "--failed", "pacs"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert by_name(doc["queues"])["pacs"]["pending"] == 2 and doc["failed"][0]["oid"] == oids[1]
    assert cli_main(["queue", "-c", c]) == 0
    out = capsys.readouterr().out
    assert "pacs" in out and "unrouted" in out
    assert cli_main(["retry", "-c", c, "--study", STUDY_A, "--reason", "fixed"]) == 0
    assert "1 failed object(s) queued again (pacs: 1)" in capsys.readouterr().out
    assert cli_main(["purge", "-c", c, "unrouted", "--state", "unrouted", "--reason", "junk"]) == 0
    assert "purged 1" in capsys.readouterr().out
    assert cli_main(["retry", "-c", c, "nope"]) == 1
    assert "unknown destination 'nope'" in capsys.readouterr().err
    assert cli_main(["audit", "-c", c, "--format", "csv", "--study", STUDY_A]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["action"] for r in rows] == ["received", "delivered", "failed", "retry"]
    assert cli_main(["audit", "-c", c, "--since", "2000-01-01", "--until", "2000-12-31"]) == 0
    assert capsys.readouterr().out == ""
    assert cli_main(["audit", "-c", c, "--verify"]) == 0
    assert "chain intact" in capsys.readouterr().out


@pytest.mark.parametrize("section, line, key, text", [
    ("alerts:\n  oldest_age: {default: 10m, vna: soon}\n", 14, "alerts.oldest_age.vna", "a duration"),
    ("alerts:\n  oldest_age: {ris: 1h}\n", 14, "alerts.oldest_age.ris", "unknown destination 'ris'"),
    ("alerts:\n  webhook: ftp://x\n", 14, "alerts.webhook", "http:// or https://"),
    ("alerts:\n  consecutive_failures: 0\n", 14, "alerts.consecutive_failures", "between 1"),
    ("audit_retention: forever\n", 13, "audit_retention", "a duration"),
])
def test_alerts_and_retention_config_errors(tmp_path: Path, section: str, line: int, key: str, text: str) -> None:
    base = config_text(tmp_path / "spool").split("alerts:")[0]
    with pytest.raises(ConfigError) as info:
        ops.parse_config(base + section, "router.yaml")
    assert (info.value.line, info.value.key) == (line, key) and text in str(info.value)


def test_alerts_and_retention_config_values(tmp_path: Path) -> None:
    text = config_text(tmp_path / "spool") + "  spool_min_free: 2GiB\n  webhook: http://127.0.0.1:9/hook\n" \
        "audit_retention: 365d\nhistory_retention: 30d\n"
    cfg = ops.parse_config(text, "<test>")
    assert cfg.alerts.oldest_age_limit("pacs") == 60 and cfg.alerts.oldest_age_limit("vna") == 3600
    assert cfg.alerts.spool_min_free == 2 * 1024**3 and cfg.alerts.webhook == "http://127.0.0.1:9/hook"
    assert (cfg.audit_retention, cfg.history_retention) == (365 * 86400, 30 * 86400)
    assert ops.parse_config(config_text(tmp_path / "s").split("alerts:")[0], "<test>").alerts == AlertsConfig()


def test_quarantined_state_in_queue_cli_metrics_and_purge(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15: a quarantined object is counted and listed by `fastroute queue` (text and
    --json), exported as a gauge and a counter, and purged with --state quarantined (audited)."""
    from fastroute.ops.metrics import make_registry, render
    cfg, path, spool, oids = env
    [c], _ = spool.claim("pacs", 1)
    spool.settle("pacs", [Outcome(c.oid, OutcomeKind.QUARANTINE, error="BurnedInAnnotation YES")])
    text = render(make_registry(cfg, spool)).decode()
    assert 'fastroute_queue_objects{destination="pacs",state="quarantined"} 1.0' in text
    assert 'fastroute_quarantined_objects_total{destination="pacs"} 1.0' in text
    spool.close()
    p = str(path)
    assert cli_main(["queue", "-c", p, "--json", "--quarantined", "pacs"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert by_name(doc["queues"])["pacs"]["quarantined"] == 1
    [q] = doc["quarantined"]
    assert (q["oid"], q["state"], q["error"]) == (c.oid, "quarantined", "BurnedInAnnotation YES")
    assert cli_main(["queue", "-c", p, "--quarantined", "pacs"]) == 0
    out = capsys.readouterr().out
    assert "quarantined (not sent, kept): 1" in out and f"quarantined oid={c.oid}" in out
    assert "reason=BurnedInAnnotation YES" in out
    assert cli_main(["purge", "-c", p, "pacs", "--state", "quarantined", "--reason", "reviewed"]) == 0
    assert "purged 1" in capsys.readouterr().out
    assert cli_main(["queue", "-c", p, "--json", "--quarantined", "pacs"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["quarantined"] == [] and by_name(doc["queues"])["pacs"]["quarantined"] == 0


def test_quarantined_objects_raise_an_alert_until_purged() -> None:
    """Issue 15: quarantined objects wait for a person; the alert names the destination and how
    to list them, and clears when none is left."""
    cfg = AlertsConfig()
    [(key, alert)] = [(k, v) for k, v in evaluate(cfg, [Reading("ai", None, 0, quarantined=2)], None).items()]
    assert key == ("quarantined", "ai") and alert is not None and alert.value == 2
    assert "fastroute queue --quarantined ai" in alert.message
    assert evaluate(cfg, [Reading("ai", None, 0, quarantined=0)], None) == {}
