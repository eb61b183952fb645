"""Prometheus exposition, multiprocess-correct by construction.

Every counter lives in the spool (LMDB), written by whichever listener or sender process did
the work, so a custom Collector reads them at scrape time instead of keeping per-process
``prometheus_client`` values that would need merging (and would reset on restarts). Queue
depth, destination state, disk usage and alerts are read the same way. A private registry
keeps the process's default collectors (and anything else imported) out of the output.

Series changed in 0.2 (see README "Metrics"): ``fastroute_received_objects`` has a
``calling_ae`` label, ``fastroute_received_from_objects`` is kept one release (deprecated);
``fastroute_destination_state`` has one series per destination (its current state) instead
of one per possible state; latency buckets start at 1 ms.
"""
from __future__ import annotations

import platform
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

import fastroute
from fastroute import native
from fastroute.config import Config
from fastroute.dicom.status import meaning
from fastroute.ops.actions import DestinationStatus, destination_status, display_name
from fastroute.ops.alerts import AlertBook
from fastroute.ops.migrations import jobs_of
from fastroute.spool import CounterKey, CounterKind, Counters, Spool, lockstats
from fastroute.spool.counters import LATENCY_BUCKETS, FailureCause
from fastroute.spool.jobs import JobState, StudyState

# Failures without a DICOM status, by cause (the ``status`` label then holds the cause).
_CAUSES: dict[str, str] = {
    FailureCause.NO_RESPONSE: "no response (timeouts or aborts in a row)",
    FailureCause.CONTEXT_REFUSED: "destination accepted none of the presentation contexts",
    FailureCause.NO_DECODER: "no decoder installed for the syntax the destination needs converted",
    FailureCause.NOT_CONVERTIBLE: "cannot be converted to a syntax the destination accepts",
    FailureCause.SPOOL_ERROR: "could not be read from the spool",
    FailureCause.CONTENT_CHANGE: "the destination's modify refused it (e.g. a lookup with on_missing: fail)",
}

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# counter kind -> (metric name without _total, help, label of the counter's subject)
_LABELLED = {
    CounterKind.RECEIVED_FROM: ("fastroute_received_from_objects",
                                "DEPRECATED (removed in 0.3): use fastroute_received_objects by calling_ae",
                                "calling_ae"),
    CounterKind.DELIVERED: ("fastroute_delivered_objects", "Objects delivered (success or warning status)",
                            "destination"),
    CounterKind.DELIVERED_BYTES: ("fastroute_delivered_bytes", "Bytes of the objects delivered", "destination"),
    CounterKind.FAILED: ("fastroute_failed_objects", "Objects moved to the failed state", "destination"),
    CounterKind.RETRIES: ("fastroute_retries", "Object-level retries scheduled", "destination"),
    CounterKind.SUPPRESSED: ("fastroute_suppressed_objects",
                             "Identical re-sends not sent again (already delivered within duplicate_window)",
                             "destination"),
    CounterKind.SUPERSEDED: ("fastroute_superseded_objects",
                             "Pending copies replaced by a newer copy of the same SOP instance", "destination"),
    CounterKind.UNKNOWN_OUTCOMES: ("fastroute_unknown_outcomes",
                                   "Sends whose outcome was unknown (timeout/abort after the data left); resent",
                                   "destination"),
    CounterKind.PURGED: ("fastroute_purged_objects", "Queue entries purged by an operator", "destination"),
    CounterKind.TRANSCODED: ("fastroute_transcoded_objects", "Objects transcoded before sending", "destination"),
    # storage commitment (issue 14): committed is counted apart from delivered
    CounterKind.COMMITTED: ("fastroute_committed", "Delivered instances the destination committed "
                            "(Storage Commitment N-EVENT-REPORT)", "destination"),
    CounterKind.COMMIT_FAILED: ("fastroute_commit_failed",
                                "Delivered instances a commitment report failed (re-sent)", "destination"),
    CounterKind.COMMIT_REQUESTS: ("fastroute_commit_requests",
                                  "Storage commitment requests (N-ACTION) sent, re-requests included",
                                  "destination"),
    # verify: find (issue 14): "indexed", not "sent"
    CounterKind.VERIFIED: ("fastroute_verified", "Delivered instances the destination listed by C-FIND "
                           "(verify: find)", "destination"),
    CounterKind.QUARANTINED: ("fastroute_quarantined_objects",
                              "Objects held back from a destination by its content plan (burned-in "
                              "annotation under deidentify); kept, never sent", "destination"),
    CounterKind.VERIFY_FAILED: ("fastroute_verify_failed_studies",
                                "Studies still missing instances at the destination after re-sending them "
                                "(verify: find)", "destination"),
}
STATES = tuple(s.value for s in DestinationStatus)
# Seeded at zero so that rate() and absent-free alert expressions work from the first scrape.
ASSOC_OUTCOMES = ("accepted", "rejected", "aborted")


def _outcome(extra: str) -> tuple[str, str]:
    """``rejected/calling-ae-not-recognized`` -> (outcome, reason)."""
    outcome, _, reason = extra.partition("/")
    return outcome, reason


class SpoolCollector(Collector):
    """Reads the spool (and the alert book) on every scrape; holds no values itself."""

    def __init__(self, cfg: Config, spool: Spool, alerts: AlertBook | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.alerts = alerts

    def collect(self) -> Iterator[Metric]:
        counters = self.spool.counters()
        queues = destination_status(self.cfg, self.spool)
        yield self._build_info()
        yield self._certificates()
        yield from self._counters(counters)
        yield from self._events(counters)
        yield self._latency(counters)
        yield from self._queues(queues, counters)
        yield from self._usage()
        yield from self._migrations()
        yield from self._write_lock()
        if self.alerts is not None:
            yield self._alerts(self.alerts)

    def _certificates(self) -> Metric:
        """Days left per configured TLS certificate (own and CA; negative: expired). A file
        that cannot be read has no series here (the certificate_expiry alert names it)."""
        from fastroute.ops.certificates import certificate_expiry
        fam = GaugeMetricFamily("fastroute_tls_certificate_expiry_days",
                                "Days until the certificate's notAfter, per configured TLS certificate",
                                labels=["role", "name", "subject"])
        for c in certificate_expiry(self.cfg):
            if c.days_left is not None:
                fam.add_metric([c.role, c.name, c.subject], round(c.days_left, 3))
        return fam

    @staticmethod
    def _build_info() -> Metric:
        info = GaugeMetricFamily("fastroute_build_info", "Always 1: the version and the twin (native or python) "
                                 "of the peek parser in use", labels=["version", "twin", "python"])
        info.add_metric([fastroute.__version__, native.PEEK_IMPL, platform.python_version()], 1.0)
        return info

    def _counters(self, counters: Counters) -> Iterator[Metric]:
        received = CounterMetricFamily("fastroute_received_objects", "Objects accepted and spooled, by calling AE title",
                                       labels=["calling_ae"])
        by_ae = dict(sorted((k.extra, v) for k, v in counters.items_of(CounterKind.RECEIVED_FROM)))
        rest = counters.of(CounterKind.RECEIVED) - sum(by_ae.values())
        if rest > 0:    # received before the per-AE counter existed: no AE title known
            by_ae[""] = by_ae.get("", 0) + rest
        for ae, value in by_ae.items():
            received.add_metric([ae], value)
        yield received
        received_bytes = CounterMetricFamily("fastroute_received_bytes", "Bytes of the objects accepted")
        received_bytes.add_metric([], counters.of(CounterKind.RECEIVED_BYTES))
        yield received_bytes
        for kind, (name, doc, label) in _LABELLED.items():
            fam = CounterMetricFamily(name, doc, labels=[label])
            if label == "destination":   # a zero from the start makes rate() work at once
                values = {d: 0 for d in self.cfg.destinations}
                values.update(counters.per_destination(kind))
                for dest, value in sorted(values.items()):
                    fam.add_metric([display_name(dest)], value)
            else:
                for key, value in sorted(counters.items_of(kind), key=lambda kv: kv[0].extra):
                    fam.add_metric([key.extra], value)
            yield fam
        by_status = CounterMetricFamily("fastroute_failed_by_status",
                                        "Objects failed, by destination and last DICOM status (or, without one, its cause)",
                                        labels=["destination", "status", "meaning"])
        for key, value in sorted(counters.items_of(CounterKind.FAILED_STATUS),
                                 key=lambda kv: (kv[0].destination, kv[0].extra)):
            try:
                status = int(key.extra)
            except ValueError:        # no DICOM status: the failure's cause names it
                cause = _CAUSES.get(key.extra)
                if cause is not None:
                    by_status.add_metric([display_name(key.destination), key.extra, cause], value)
                continue
            by_status.add_metric([display_name(key.destination), "none" if status < 0 else f"0x{status:04X}",
                                  meaning(status)], value)
        yield by_status

    def _events(self, counters: Counters) -> Iterator[Metric]:
        inbound = CounterMetricFamily("fastroute_associations_in", "Associations from peers: accepted, rejected "
                                      "(reason: the A-ASSOCIATE-RJ reason) or aborted after acceptance",
                                      labels=["outcome", "reason"])
        values = {(o, ""): 0 for o in ASSOC_OUTCOMES}
        values.update({_outcome(k.extra): v for k, v in counters.items_of(CounterKind.ASSOC_IN)})
        for (outcome, reason), value in sorted(values.items()):
            inbound.add_metric([outcome, reason], value)
        yield inbound
        outbound = CounterMetricFamily("fastroute_associations_out", "Associations to destinations: accepted, "
                                       "rejected or failed (reason), aborted while in use",
                                       labels=["destination", "outcome", "reason"])
        out = {(d, o, ""): 0 for d in self.cfg.destinations for o in ASSOC_OUTCOMES}
        out.update({(k.destination, *_outcome(k.extra)): v for k, v in counters.items_of(CounterKind.ASSOC_OUT)})
        for (dest, outcome, reason), value in sorted(out.items()):
            outbound.add_metric([display_name(dest), outcome, reason], value)
        yield outbound
        refused = CounterMetricFamily("fastroute_refused_objects", "C-STORE requests answered with a failure "
                                      "status (0xA700: spool full or write failed)", labels=["status", "meaning"])
        for key, value in sorted(counters.items_of(CounterKind.REFUSED), key=lambda kv: kv[0].extra):
            try:
                status = int(key.extra)
            except ValueError:
                continue
            refused.add_metric([f"0x{status:04X}", meaning(status)], value)
        yield refused
        restarts = CounterMetricFamily("fastroute_worker_restarts", "Worker processes restarted by the supervisor "
                                       "after they died", labels=["role"])
        roles = {"listener": 0, "sender": 0, "http": 0}
        roles.update({k.extra: v for k, v in counters.items_of(CounterKind.WORKER_RESTARTS)})
        for role, value in sorted(roles.items()):
            restarts.add_metric([role], value)
        yield restarts

    def _latency(self, counters: Counters) -> Metric:
        """Cumulative buckets from the spool's per-bucket counts (which are not cumulative)."""
        fam = HistogramMetricFamily("fastroute_delivery_latency_seconds",
                                    "Time from receipt to confirmed delivery", labels=["destination"])
        names = set(self.cfg.destinations) | set(counters.per_destination(CounterKind.LATENCY_COUNT))
        for dest in sorted(names):
            cumulative = 0
            buckets = []
            for le in (*LATENCY_BUCKETS, None):
                key = CounterKey.latency_bucket(dest, le)
                cumulative += counters.of(key.kind, dest, key.extra)
                buckets.append(("+Inf" if le is None else floatToGoString(le), float(cumulative)))
            fam.add_metric([display_name(dest)], buckets, counters.of(CounterKind.LATENCY_SUM_US, dest) / 1e6)
        return fam

    def _queues(self, queues: list[dict[str, Any]], counters: Counters) -> Iterator[Metric]:
        depth = GaugeMetricFamily("fastroute_queue_objects", "Objects queued, by destination and state",
                                  labels=["destination", "state"])
        age = GaugeMetricFamily("fastroute_queue_oldest_age_seconds",
                                "Age of the oldest object waiting (pending or in flight); 0 when empty",
                                labels=["destination"])
        state = GaugeMetricFamily("fastroute_destination_state",
                                  "Always 1, one series per destination: its current state in the label "
                                  f"({', '.join(STATES)})", labels=["destination", "state"])
        last_ok = GaugeMetricFamily("fastroute_destination_last_success_timestamp_seconds",
                                    "Unix time of the last confirmed delivery (0: none recorded)",
                                    labels=["destination"])
        fails = GaugeMetricFamily("fastroute_destination_consecutive_failures",
                                  "Destination-level failures (connect/associate) in a row", labels=["destination"])
        paused = GaugeMetricFamily("fastroute_destination_paused", "1 when paused (config or operator)",
                                   labels=["destination"])
        waiting = GaugeMetricFamily("fastroute_commit_waiting_objects",
                                    "Delivered instances whose storage commitment is not answered yet "
                                    "(their bytes stay in the spool)", labels=["destination"])
        verify_waiting = GaugeMetricFamily("fastroute_verify_waiting_studies",
                                           "Studies delivered and not verified by C-FIND yet (verify: find; "
                                           "their bytes stay in the spool)", labels=["destination"])
        for q in queues:
            name = str(q["name"])
            for key in ("pending", "in_flight", "failed", "quarantined"):
                depth.add_metric([name, key], float(q[key]))
            age.add_metric([name], float(q["oldest_age"] or 0.0))
            if q["configured"]:
                state.add_metric([name, str(q["status"])], 1.0)
                last_ok.add_metric([name], max(float(q["last_success"] or 0.0),   # the sender's, or the spool's
                                               float(counters.of(CounterKind.LAST_SUCCESS, q["destination"]))))
                fails.add_metric([name], float(q["consecutive_failures"]))
                paused.add_metric([name], 1.0 if q["paused"] else 0.0)
                waiting.add_metric([name], float(q.get("commit_waiting", 0)))
                verify_waiting.add_metric([name], float(q.get("verify_waiting", 0)))
        yield from (depth, age, state, last_ok, fails, paused, waiting, verify_waiting)

    def _usage(self) -> Iterator[Metric]:
        usage = self.spool.usage()
        for key, name, doc in (
                ("used_bytes", "fastroute_spool_used_bytes", "Bytes used by the spool's LMDB maps (shared and shards)"),
                ("map_size", "fastroute_spool_max_bytes", "Size limit of the spool (spool_max_bytes)"),
                ("disk_free_bytes", "fastroute_disk_free_bytes", "Free bytes on the spool's disk"),
                ("disk_total_bytes", "fastroute_disk_total_bytes", "Size of the spool's disk")):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(usage[key]))
            yield g
        unapplied = GaugeMetricFamily("fastroute_spool_journal_unapplied_objects",
                                      "Objects acknowledged into a listener's spool shard and not yet queued "
                                      "(normally 0: applied within milliseconds)", labels=["shard"])
        unapplied_age = GaugeMetricFamily("fastroute_spool_journal_oldest_unapplied_seconds",
                                          "Age of the oldest object acknowledged into a shard and not yet "
                                          "queued (0 when none)", labels=["shard"])
        for index, (count, age) in sorted(self.spool.journal_backlog().items()):
            unapplied.add_metric([str(index)], float(count))
            unapplied_age.add_metric([str(index)], age)
        yield unapplied
        yield unapplied_age
        floor = GaugeMetricFamily("fastroute_min_free_bytes",
                                  "Free-space floor below which new objects are refused (0xA700)")
        floor.add_metric([], float(self.cfg.min_free_bytes))
        yield floor

    def _migrations(self) -> Iterator[Metric]:
        """Per migration job, from its record's totals (no inventory scan per scrape). Every
        study state is seeded at zero so that a sum over states is the job's total. The job's
        label is ``migration``, not ``job``: Prometheus sets ``job`` on every scraped series
        itself and would rename ours to ``exported_job``."""
        studies = GaugeMetricFamily("fastroute_migration_studies", "Studies of a migration job, by state",
                                    labels=["migration", "state"])
        instances = GaugeMetricFamily("fastroute_migration_instances", "Instances of a migration job: expected "
                                      "(listed at the source), received (spooled), delivered (to every "
                                      "destination)", labels=["migration", "kind"])
        rate = GaugeMetricFamily("fastroute_migration_rate", "Instances received per second over the last "
                                 "minute", labels=["migration"])
        eta = GaugeMetricFamily("fastroute_migration_eta_seconds", "Estimated seconds to the end of the job "
                                "(absent while unknown)", labels=["migration"])
        state = GaugeMetricFamily("fastroute_migration_state", "Always 1, one series per job: its current state "
                                  f"in the label ({', '.join(JobState)})", labels=["migration", "state"])
        jobs = jobs_of(self.spool)
        for name in jobs.names():
            st = jobs.status(name)
            by_state = {s.value: 0 for s in StudyState}
            by_state.update(st.studies_by_state)
            for key, value in sorted(by_state.items()):
                studies.add_metric([name, key], float(value))
            for kind, value in (("expected", st.instances_expected), ("received", st.instances_received),
                                ("delivered", st.instances_delivered)):
                instances.add_metric([name, kind], float(value))
            rate.add_metric([name], float(st.rate))
            if st.eta_s is not None:
                eta.add_metric([name], float(st.eta_s))
            state.add_metric([name, str(st.state)], 1.0)
        yield from (studies, instances, rate, eta, state)

    def _write_lock(self) -> Iterator[Metric]:
        """Per process and environment: time waiting for LMDB's write lock, time holding it,
        write transactions (:mod:`fastroute.spool.lockstats`), from the files the running
        processes publish every 2 s; this process's own totals live. A restarted process
        starts again from zero (a counter reset)."""
        labels = ["process", "env"]
        wait = CounterMetricFamily("fastroute_spool_write_lock_wait_seconds",
                                   "Seconds spent waiting for the spool's LMDB write lock, by process and "
                                   "environment", labels=labels)
        hold = CounterMetricFamily("fastroute_spool_write_lock_hold_seconds",
                                   "Seconds the spool's LMDB write lock was held (from begin to the end of "
                                   "commit, fsync included), by process and environment", labels=labels)
        count = CounterMetricFamily("fastroute_spool_write_transactions",
                                    "Write transactions committed or aborted on the spool, by process and "
                                    "environment", labels=labels)
        for (process, env), st in lockstats.totals(self.cfg.spool / "run").items():
            wait.add_metric([process, env], st.wait_s)
            hold.add_metric([process, env], st.hold_s)
            count.add_metric([process, env], st.transactions)
        yield from (wait, hold, count)

    @staticmethod
    def _alerts(book: AlertBook) -> Metric:
        fam = GaugeMetricFamily("fastroute_alert", "1 while an alert threshold is crossed, 0 when checked and fine",
                                labels=["name", "destination"])
        active = set(book.active)
        for name, dest in sorted(book.checked | active):
            fam.add_metric([name, display_name(dest)], 1.0 if (name, dest) in active else 0.0)
        return fam


def make_registry(cfg: Config, spool: Spool, alerts: AlertBook | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SpoolCollector(cfg, spool, alerts))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


__all__ = ["SpoolCollector", "make_registry", "render", "CONTENT_TYPE"]
