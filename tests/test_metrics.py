"""/metrics as an SRE reads it (issue 12 item 6), and the Grafana dashboard and Prometheus
alert rules under tuning/, checked against a real scrape of a real router."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import synth
from peers import echoscu, free_port, storescu, wait_until
from router import Router, destination

from fastroute.config import Config
from fastroute.ops.metrics import make_registry, render
from fastroute.spool import CounterKey, CounterKind, Spool
from fastroute.spool.counters import LATENCY_BUCKETS, EventTally

TUNING = Path(__file__).resolve().parent.parent / "tuning"
ALERTS = TUNING / "prometheus-alerts.yml"
DASHBOARD = TUNING / "grafana-dashboard.json"
# Names PromQL or Prometheus itself provides (not fastroute's to expose).
BUILTIN = {"up"}


def scrape(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}; a family without samples yet (nothing failed)
    is there too, empty: its HELP and TYPE say the router exposes it."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for suffix in suffixes.get(fam.type, ("",)):
            out.setdefault(fam.name + suffix, {})
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = float(s.value)
    return out


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    """The sum over the series of ``name`` whose labels include ``labels``."""
    return sum(v for k, v in samples.get(name, {}).items() if all((lk, lv) in k for lk, lv in labels.items()))


def series(samples: dict[str, Any], name: str, **labels: str) -> list[dict[str, str]]:
    return [dict(k) for k in samples.get(name, {}) if all((lk, lv) in k for lk, lv in labels.items())]


# -- counters in the spool -----------------------------------------------------------------------

def _cfg(tmp_path: Path) -> Config:
    from fastroute.config import loads
    return loads(f"spool: {tmp_path / 'spool'}\ndestinations: {{pacs: {{ae_title: PACS, host: 127.0.0.1, "
                 f"port: 11112}}}}\nrules: []\ndefault: [pacs]\n")


def test_latency_buckets_start_at_1ms_and_an_old_spools_buckets_still_count(tmp_path: Path) -> None:
    """A spool written with the buckets before 0.2 (lowest 50 ms) reads as a valid histogram."""
    assert LATENCY_BUCKETS[0] == 0.001 and list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    cfg = _cfg(tmp_path)
    spool = Spool(cfg.spool)
    try:
        old = {"0.05": 7, "0.25": 2, "86400.0": 1, "inf": 1}     # keys as the old layout wrote them
        spool.add_counters({CounterKey(CounterKind.LATENCY_BUCKET, "pacs", le): n for le, n in old.items()}
                           | {CounterKey(CounterKind.LATENCY_COUNT, "pacs"): 11,
                              CounterKey(CounterKind.LATENCY_SUM_US, "pacs"): 5_000_000})
        s = scrape(render(make_registry(cfg, spool)).decode())
    finally:
        spool.close()
    hist = "fastroute_delivery_latency_seconds"
    assert value(s, f"{hist}_bucket", destination="pacs", le="0.001") == 0
    assert value(s, f"{hist}_bucket", destination="pacs", le="0.05") == 7
    assert value(s, f"{hist}_bucket", destination="pacs", le="0.25") == 9
    assert value(s, f"{hist}_bucket", destination="pacs", le="+Inf") == 11
    assert value(s, f"{hist}_count", destination="pacs") == 11


def test_event_tally_writes_at_most_once_per_interval_and_keeps_counts_a_failed_write_lost(
        tmp_path: Path) -> None:
    writes: list[dict[CounterKey, int]] = []
    fail = [True]

    class Sink:
        def add_counters(self, deltas: Any, maxima: Any = None) -> None:
            if fail[0]:
                fail[0] = False
                raise OSError("MDB_MAP_FULL")
            writes.append({**deltas, **(maxima or {})})

    tally = EventTally(Sink(), every=3600)      # no background write within the test
    for _ in range(50):
        tally.add(CounterKind.ASSOC_IN, extra="accepted")
    tally.add(CounterKind.REFUSED, extra="42752")
    tally.set_max(CounterKind.LAST_SUCCESS, "pacs", 200)
    tally.set_max(CounterKind.LAST_SUCCESS, "pacs", 100)
    tally.flush()                                # fails: kept
    assert writes == []
    tally.add(CounterKind.ASSOC_IN, extra="accepted")
    tally.close()                                # one write with everything
    assert writes == [{CounterKey(CounterKind.ASSOC_IN, extra="accepted"): 51,
                       CounterKey(CounterKind.REFUSED, extra="42752"): 1,
                       CounterKey(CounterKind.LAST_SUCCESS, "pacs"): 200}]


def test_last_success_is_a_maximum_in_the_spool(tmp_path: Path) -> None:
    """A sender restarted (or a late flush from an older process) never moves it back."""
    spool = Spool(tmp_path / "spool")
    try:
        key = CounterKey(CounterKind.LAST_SUCCESS, "pacs")
        spool.add_counters({}, {key: 1_800_000_000})
        spool.add_counters({}, {key: 1_700_000_000})
        assert spool.counters().of(CounterKind.LAST_SUCCESS, "pacs") == 1_800_000_000
    finally:
        spool.close()


# -- a real router --------------------------------------------------------------------------------

def spool_counter(path: Path, kind: CounterKind, destination: str = "") -> int:
    spool = Spool(path, readonly=True)
    try:
        return spool.counters().of(kind, destination)
    finally:
        spool.close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def drive_router(tmp_path: Path, storescp: Any) -> dict[str, Any]:
    """Drive a real router through every event the new series count; its last scrape."""
    pacs = storescp("PACS")
    http_port = free_port()
    down = free_port()           # nothing listens there: associations out fail
    files = synth.make_tiny(tmp_path / "t", n=3)
    r = Router(tmp_path / "router", {
        "allowed_calling_aes": ["CT1"],
        "destinations": {"pacs": destination(pacs.port, "PACS"),
                         "down": destination(down, "DOWN", backoff_initial=0.2, backoff_max=0.5)},
        "default": ["pacs", "down"],
        "alerts": {"oldest_age": "1h"},
        "http": {"host": "127.0.0.1", "port": http_port}})
    url = f"http://127.0.0.1:{http_port}/metrics"
    try:
        r.start()
        assert storescu(r.port, files, calling_ae="CT1").returncode == 0
        assert storescu(r.port, files[:1], calling_ae="CT1", extra_args=["--abort"]).returncode == 0
        assert echoscu(r.port, calling_ae="INTRUDER").returncode != 0
        pacs.wait_for(3)

        def scraped_ok(predicate: Any) -> dict[str, Any] | None:
            try:
                s = scrape(_get(url))
            except OSError:
                return None
            return s if predicate(s) else None
        # the sender writes its association counts within a second; a SIGKILL loses what it has
        # not written yet, so wait for them before killing it
        wait_until(lambda: scraped_ok(lambda s: value(s, "fastroute_associations_out_total", destination="pacs",
                                                      outcome="accepted") >= 1
                                      and spool_counter(r.spool_path, CounterKind.LAST_SUCCESS, "pacs") > 0), 30,
                   message=lambda: f"no association out counted:\n{_get(url)}")
        # a sender killed: the supervisor restarts it and counts it
        state = json.loads((r.spool_path / "run" / "pacs.state").read_text())
        os.kill(int(state["pid"]), signal.SIGKILL)

        def ready() -> dict[str, Any] | None:
            try:
                s = scrape(_get(url))
            except OSError:
                return None
            done = (value(s, "fastroute_worker_restarts_total", role="sender") >= 1
                    and value(s, "fastroute_associations_out_total", destination="down", outcome="rejected") >= 1
                    and value(s, "fastroute_associations_in_total", outcome="rejected") >= 1
                    and value(s, "fastroute_associations_in_total", outcome="aborted") >= 1)
            return s if done else None
        first = wait_until(ready, 30, message=lambda: f"counters not there:\n{_get(url)}\n{r.log_tail()}")
        assert first is not None
        r.stop()
        # restarted with a free-space floor no disk has: every C-STORE is refused with 0xA700
        r.write_config(min_free_bytes="1000TiB")
        r.start()
        storescu(r.port, files[:2], calling_ae="CT1")     # refused: its exit code is not the point

        def refused() -> dict[str, Any] | None:
            try:
                s = scrape(_get(url))
            except OSError:
                return None
            done = value(s, "fastroute_refused_objects_total", status="0xA700") >= 1 and "fastroute_alert" in s
            return s if done else None
        return wait_until(refused, 30, message=lambda: f"no 0xA700 counted:\n{_get(url)}\n{r.log_tail()}")
    finally:
        if r.proc is not None:
            r.stop()


@pytest.mark.peers
def test_metrics_an_sre_expects_and_tuning_uses_only_what_is_exposed(tmp_path: Path, dcmtk: Any,
                                                                     storescp: Any) -> None:
    s = drive_router(tmp_path, storescp)
    check_tuning_against(s)
    build = series(s, "fastroute_build_info")
    assert len(build) == 1 and build[0]["twin"] in ("native", "python") and build[0]["version"]
    # inbound: 2 accepted (one released, one aborted by storescu --abort), 1 rejected with its reason,
    # counted across a restart (the counters live in the spool)
    assert value(s, "fastroute_associations_in_total", outcome="accepted") >= 2
    assert value(s, "fastroute_associations_in_total", outcome="aborted") == 1
    assert value(s, "fastroute_associations_in_total", outcome="rejected",
                 reason="calling_AE_title_not_recognised") == 1
    # outbound: accepted by PACS, failing to the port where nothing listens
    assert value(s, "fastroute_associations_out_total", destination="pacs", outcome="accepted") >= 1
    assert value(s, "fastroute_associations_out_total", destination="down", outcome="rejected",
                 reason="failed") >= 1
    assert value(s, "fastroute_refused_objects_total", status="0xA700") >= 1
    assert value(s, "fastroute_worker_restarts_total", role="sender") == 1
    # the received counter by calling AE (3 + 1 objects from CT1 before the floor was raised)
    assert value(s, "fastroute_received_objects_total", calling_ae="CT1") == 4
    # one state series per destination
    assert len(series(s, "fastroute_destination_state", destination="down")) == 1
    assert len(series(s, "fastroute_destination_state", destination="pacs")) == 1
    # from the spool: the pacs sender was killed and the router restarted since it delivered
    last = value(s, "fastroute_destination_last_success_timestamp_seconds", destination="pacs")
    assert time.time() - 600 < last <= time.time()
    assert value(s, "fastroute_destination_last_success_timestamp_seconds", destination="down") == 0
    assert value(s, "fastroute_delivery_latency_seconds_count", destination="pacs") >= 3


# -- tuning/: alert rules and dashboard ----------------------------------------------------------

def fastroute_names(expr: str) -> set[str]:
    # label values are quoted; names used as metrics are outside quotes
    unquoted = re.sub(r'"[^"]*"', '""', expr)
    return {m for m in re.findall(r"\bfastroute_[a-z0-9_]+\b", unquoted)}


def _balanced(expr: str) -> bool:
    depth = 0
    for ch in re.sub(r'"[^"]*"', '""', expr):
        depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"} and doc["groups"]
    rules = []
    for group in doc["groups"]:
        assert isinstance(group["name"], str) and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smhd]", rule["for"])
            assert _balanced(rule["expr"]), rule["expr"]
            rules.append(rule)
    return rules


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["panels"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    for e in exprs:
        assert _balanced(e), e
    return exprs


def test_alert_rules_and_dashboard_are_well_formed() -> None:
    assert len(alert_rules()) >= 8 and len(dashboard_exprs()) >= 10


def check_tuning_against(scraped: dict[str, Any]) -> None:
    """Every fastroute_* series the alert rules and the dashboard use is in ``scraped``."""
    exposed = set(scraped)
    for source, exprs in (("alerts", [r["expr"] for r in alert_rules()]), ("dashboard", dashboard_exprs())):
        used = set().union(*(fastroute_names(e) for e in exprs))
        assert used, source
        missing = used - exposed - BUILTIN
        assert not missing, f"{source} uses series /metrics does not have: {sorted(missing)}"
    # every series family the router exposes is on the dashboard or in an alert (nothing forgotten),
    # apart from the deprecated one
    fams = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in exposed}
    used_fams = {re.sub(r"_(total|bucket|count|sum)$", "", n)
                 for e in dashboard_exprs() + [r["expr"] for r in alert_rules()] for n in fastroute_names(e)}
    unused = fams - used_fams - {"fastroute_received_from_objects", "fastroute_received_bytes",
                                 "fastroute_delivered_bytes", "fastroute_retries", "fastroute_suppressed_objects",
                                 "fastroute_superseded_objects", "fastroute_unknown_outcomes",
                                 "fastroute_purged_objects", "fastroute_transcoded_objects",
                                 "fastroute_disk_total_bytes", "fastroute_destination_paused"}
    assert not unused, f"exposed but neither charted nor alerted on: {sorted(unused)}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (the parser above ran)")
def test_promtool_checks_the_alert_rules() -> None:
    res = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_failures_without_a_status_are_counted_by_cause(tmp_path: Path) -> None:
    """A failure with no DICOM status (no decoder, refused contexts, no response) is labelled
    by its cause, not one "none" for all; a status keeps its code and meaning."""
    from fastroute.spool import Incoming, Outcome, OutcomeKind
    from fastroute.spool.counters import FailureCause

    cfg = _cfg(tmp_path)
    spool = Spool(cfg.spool)
    try:
        items = [Incoming(b"\x08\x00\x18\x00\x02\x00\x00\x001\x00", "1.2.840.10008.1.2", "1.2.3", f"1.2.3.{i}",
                          ("pacs",)) for i in range(4)]
        spool.put_many(items)
        claimed, _ = spool.claim("pacs", 10)
        causes = [FailureCause.NO_DECODER, FailureCause.CONTEXT_REFUSED, FailureCause.NO_RESPONSE, ""]
        spool.settle("pacs", [Outcome(c.oid, OutcomeKind.FAILED, status=None if cause else 0xA900,
                                      error="x", cause=cause) for c, cause in zip(claimed, causes)])
        s = scrape(render(make_registry(cfg, spool)).decode())
    finally:
        spool.close()
    name = "fastroute_failed_by_status_total"
    assert value(s, name, destination="pacs", status="no-decoder") == 1
    assert value(s, name, destination="pacs", status="context-refused") == 1
    assert value(s, name, destination="pacs", status="no-response") == 1
    assert value(s, name, destination="pacs", status="0xA900") == 1
    assert not series(s, name, status="none")
    [row] = series(s, name, status="no-decoder")
    assert "no decoder" in row["meaning"]


def test_migration_gauges_per_job(tmp_path: Path) -> None:
    """Issue 13: per-job gauges (label ``migration``: Prometheus owns ``job``) from the job records (studies by state, instances by kind, rate,
    ETA only while known, one state series per job)."""
    from fastroute.spool.jobs import InstanceRecord, JobSpec, StudyRecord, StudyState

    cfg = _cfg(tmp_path)
    spool = Spool(cfg.spool)
    try:
        jobs = spool.jobs
        now = time.time()    # the job and the runner's calls half a minute ago and just now (the rate's window)
        jobs.create(JobSpec(name="y2019", source="oldpacs", destinations=("pacs",), verify=False,
                            created_at=now - 31))
        jobs.create(JobSpec(name="idle", source="oldpacs", destinations=("pacs",), verify=False))
        jobs.add_studies("y2019", [StudyRecord(seq=0, study_instance_uid=f"1.2.3.{i}") for i in range(4)], now=now - 31)
        jobs.inventory_done("y2019", now=now - 31)
        jobs.set_instances("y2019", "1.2.3.0", [InstanceRecord(f"1.2.3.0.{i}") for i in range(3)], now=now - 31)
        jobs.mark_received("y2019", "1.2.3.0", {"1.2.3.0.0": 1}, now=now - 30)
        jobs.mark_received("y2019", "1.2.3.0", {"1.2.3.0.1": 2, "1.2.3.0.2": 3}, now=now - 1)
        jobs.mark_delivered("y2019", "1.2.3.0", [f"1.2.3.0.{i}" for i in range(2)], now=now - 1)
        jobs.update_study("y2019", "1.2.3.1", state=StudyState.FAILED, reason="no instances at the source",
                          now=now - 1)
        s = scrape(render(make_registry(cfg, spool)).decode())
        jobs.pause("idle")
        after = scrape(render(make_registry(cfg, spool)).decode())
    finally:
        spool.close()
    assert value(s, "fastroute_migration_studies", migration="y2019") == 4          # states sum to the total
    assert value(s, "fastroute_migration_studies", migration="y2019", state="failed") == 1
    assert len(series(s, "fastroute_migration_studies", migration="idle")) == len(StudyState)   # seeded at 0
    assert value(s, "fastroute_migration_instances", migration="y2019", kind="expected") == 3
    assert value(s, "fastroute_migration_instances", migration="y2019", kind="received") == 3
    assert value(s, "fastroute_migration_instances", migration="y2019", kind="delivered") == 2
    assert 0.05 < value(s, "fastroute_migration_rate", migration="y2019") < 0.15   # ~3 in 31 s
    assert series(s, "fastroute_migration_eta_seconds", migration="y2019")     # known: all received
    assert series(s, "fastroute_migration_eta_seconds", migration="idle") == []      # unknown: absent, not 0
    assert series(s, "fastroute_migration_state", migration="y2019") == [{"migration": "y2019", "state": "running"}]
    assert series(s, "fastroute_migration_state", migration="idle") == [{"migration": "idle", "state": "inventory"}]
    assert series(after, "fastroute_migration_state", migration="idle") == [{"migration": "idle", "state": "paused"}]
