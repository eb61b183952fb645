"""The migration process's loop (issue 13): advance every job in the spool, study by study.

A study goes pending -> listed -> retrieving -> delivering -> verifying -> verified (or
delivered with ``--no-verify``, or failed with its reason). Every change is a
:mod:`fastroute.spool.jobs` transaction and every step starts from what the spool says, so a
``kill -9`` at any point and a restart continue where it stopped: arrivals already spooled are
attributed again (idempotently) before anything is fetched, and a final study is never touched.

Why these choices:

* Arrivals are attributed by the Move Originator of their C-STORE (the listener puts the job's
  name in the routing record of a C-STORE whose Move Originator AE/Message ID match a move
  registered here *before* it was sent), never by guessing from the Study UID alone: a study
  can arrive through the clinical path at the same time.
* One association per source slot (``max_associations``), each a thread: the work is waiting on
  archives, not CPU. A source that answers 0xA701/0xA702 is backed off as a whole (exponential,
  capped): its other slots would get the same answer.
* The destination's own C-FIND decides ``verified``: a study is not migrated because it was
  sent, only when the new archive lists every instance the old one did.
"""
from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastroute.config import Config, DestinationConfig, SourceConfig
from fastroute.dicom.qr import (Level, QueryFailed, QueryRetrieveClient, RetrieveFailed, RetrieveResult,
                                SubOperations, classes_per_association, storage_contexts)
from fastroute.dicom.scu import AssociationFailed, NoContextAccepted
from fastroute.dicom.status import describe
from fastroute.logsetup import escape_control, fields
from fastroute.routing.verify import query_destination
from fastroute.spool.jobs import (FINAL_STUDY_STATES, InstanceRecord, JobError, JobSpec, JobState, Jobs,
                                  StudyRecord, StudyState, in_windows)
from fastroute.spool.records import RoutingRecord
from fastroute.spool.store import Spool

log = logging.getLogger("fastroute.migration")

POLL = 1.0                  # seconds between rounds when nothing wakes the loop earlier
ARRIVAL_WAIT = 30.0         # a final response before its last C-STORE is spooled: wait this long
MAX_ATTEMPTS = 5            # retrieves of one study before it fails with the list of what is missing
MAX_VERIFY_ATTEMPTS = 3     # verifications (each mismatch re-fetches what is missing) before failing
VERIFY_DELAY = 2.0          # after delivery, before the first C-FIND (the archive indexes first)
RETRY_DELAY = 5.0           # before fetching missing instances again (0xB000, a timeout), doubling
BACKOFF_INITIAL = 5.0       # 0xA701/0xA702 or a source that cannot be reached
BACKOFF_MAX = 600.0
IMAGE_CHUNK = 200           # SOP Instance UIDs per IMAGE-level retrieve of a few missing instances
# storage SOP classes per C-GET association: 128 contexts, one for C-GET, the rest one per
# (class, stored syntax)
MAX_GET_CLASSES = classes_per_association()
DUE_BATCH = 64              # studies read from the work index per state per round
MOVE_EXPIRY_MARGIN = 600.0  # a registered move outlives its retrieve timeout by this much
# A source's FIND/MOVE association is kept for the next study rather than released after
# each: an archive forking a process per association (dcmqrscp) or checking its AE table
# costs tens of milliseconds an association, a study's listing and move two of them.
KEEP_IDLE = 10.0            # a kept association unused this long is released

TRANSIENT = frozenset({0xA700, 0xA701, 0xA702})
UNKNOWN_DESTINATION = 0xA801
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"



# -- pure parts ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Unit:
    """One C-MOVE/C-GET of a study's plan: its level, identifier and what it should bring."""

    level: Level
    identifier: dict[str, str]
    sop_uids: tuple[str, ...]
    sop_classes: frozenset[str]


def plan_units(study_uid: str, missing: Sequence[InstanceRecord], listed: int,
               series_threshold: int, image_chunk: int = IMAGE_CHUNK) -> list[Unit]:
    """The retrieves that bring exactly ``missing``: the whole study at once when nothing of it
    is here and it is small; else each series that is missing as a whole, and the instances of
    partly received series by SOP Instance UID lists (IMAGE level, ``image_chunk`` at a time)."""
    if not missing:
        return []
    classes = frozenset(i.sop_class_uid for i in missing if i.sop_class_uid)
    if len(missing) >= listed and listed <= series_threshold:
        return [Unit(Level.STUDY, {"StudyInstanceUID": study_uid},
                     tuple(i.sop_instance_uid for i in missing), classes)]
    by_series: dict[str, list[InstanceRecord]] = {}
    for inst in missing:
        by_series.setdefault(inst.series_instance_uid, []).append(inst)
    units = []
    for series_uid, insts in by_series.items():
        uids = tuple(i.sop_instance_uid for i in insts)
        cls = frozenset(i.sop_class_uid for i in insts if i.sop_class_uid)
        whole = series_uid and len(missing) >= listed
        if whole:
            units.append(Unit(Level.SERIES, {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid},
                              uids, cls))
            continue
        for start in range(0, len(insts), image_chunk):
            part = insts[start:start + image_chunk]
            ident = {"StudyInstanceUID": study_uid, "SOPInstanceUID": "\\".join(i.sop_instance_uid for i in part)}
            if series_uid:
                ident["SeriesInstanceUID"] = series_uid
            units.append(Unit(Level.IMAGE, ident, tuple(i.sop_instance_uid for i in part),
                              frozenset(i.sop_class_uid for i in part if i.sop_class_uid)))
    return units


def split_classes(unit: Unit, instances: Sequence[InstanceRecord],
                  limit: int = MAX_GET_CLASSES) -> list[Unit]:
    """A C-GET unit whose storage classes do not fit one association, split into IMAGE-level
    units of at most ``limit`` classes each (the source sends what the association accepts)."""
    if len(unit.sop_classes) <= limit:
        return [unit]
    wanted = set(unit.sop_uids)
    by_class: dict[str, list[InstanceRecord]] = {}
    for inst in instances:
        if inst.sop_instance_uid in wanted:
            by_class.setdefault(inst.sop_class_uid, []).append(inst)
    classes = sorted(by_class)
    study_uid = unit.identifier["StudyInstanceUID"]
    out = []
    for start in range(0, len(classes), limit):
        group = classes[start:start + limit]
        insts = [i for c in group for i in by_class[c]]
        for part in plan_units(study_uid, insts, len(insts) + 1, 1):
            out.append(Unit(part.level, part.identifier, part.sop_uids, frozenset(group) & part.sop_classes))
    return out


@dataclass(slots=True)
class Backoff:
    """Exponential, capped: how long a source is left alone after it said it is overloaded."""

    initial: float = BACKOFF_INITIAL
    cap: float = BACKOFF_MAX
    failures: int = 0
    until: float = 0.0

    def failed(self, now: float) -> float:
        delay = min(self.cap, self.initial * (2 ** self.failures))
        self.failures += 1
        self.until = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.until = 0.0


@dataclass(slots=True)
class Throttle:
    """``--rate``: the earliest time the job's next retrieve may start."""

    studies_per_hour: float | None = None
    instances_per_s: float | None = None
    next_start: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_start

    def started(self, now: float, instances: int) -> None:
        gap = 0.0
        if self.studies_per_hour:
            gap = max(gap, 3600.0 / self.studies_per_hour)
        if self.instances_per_s:
            gap = max(gap, instances / self.instances_per_s)
        self.next_start = max(self.next_start, now) + gap


class MessageIds:
    """Message IDs unique across this process's associations to one source: the listener tells
    moves apart by (Move Originator AE, Move Originator Message ID), and every association of
    ours has the same calling AE. Starts past the ids of the previous run (a restart's fresh
    associations would otherwise reuse ids whose registrations have not expired yet)."""

    def __init__(self, start: int = 1) -> None:
        self._next = max(1, start)
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            n = self._next
            self._next = n % 65535 + 1
            return n


def _job_records(spool: Spool, job: str, study_uid: str) -> dict[str, tuple[int, RoutingRecord]]:
    """The newest spooled copy of each SOP instance of ``study_uid`` that arrived for ``job``
    (its routing record says so: the listener matched its Move Originator, or a C-GET of ours
    stored it)."""
    out: dict[str, tuple[int, RoutingRecord]] = {}
    for oid, rec in spool.lookup(study_instance_uid=study_uid, limit=10_000_000):
        if rec.extra.get("migration") != job:
            continue
        have = out.get(rec.sop_instance_uid)
        if have is None or have[0] < oid:
            out[rec.sop_instance_uid] = (oid, rec)
    return out


def _delivered_everywhere(rec: RoutingRecord, destinations: Iterable[str]) -> bool:
    return all(d in rec.delivered or d in rec.suppressed for d in destinations)


def _refused(rec: RoutingRecord, destinations: Iterable[str]) -> str:
    """Why a destination gave up on this copy (its failed queue entry), "" when none did."""
    for d in destinations:
        failure = rec.failed.get(d)
        if failure is not None and d not in rec.outstanding and d not in rec.delivered:
            return (f"{d} refused {rec.sop_instance_uid} ({rec.sop_class_uid}): {describe(failure.status)}"
                    + (f" {escape_control(failure.error)}" if failure.error else ""))
        drop = rec.dropped.get(d)
        if drop is not None and d not in rec.delivered:
            return f"{rec.sop_instance_uid} dropped at {d}: {drop.how} {escape_control(drop.reason)}".rstrip()
    return ""


def _uid_list(uids: Iterable[str], limit: int = 20) -> str:
    items = sorted(uids)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# -- the process -----------------------------------------------------------------------------

ClientFactory = Callable[..., QueryRetrieveClient]


@dataclass(slots=True)
class _SourceSlots:
    """One source's associations: a thread per slot, and its backoff."""

    config: SourceConfig
    pool: ThreadPoolExecutor
    busy: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    ids: MessageIds = field(default_factory=MessageIds)
    single_uids: bool = False      # it ignores SOP Instance UID lists: one UID per retrieve


class MigrationRunner:
    """Advance every job (``run`` until ``stop`` is set); ``round`` is one pass, for tests."""

    def __init__(self, cfg: Config, spool: Spool, stop: threading.Event | None = None, *,
                 client: ClientFactory = QueryRetrieveClient, clock: Callable[[], float] = time.time,
                 get_store: Callable[[str, tuple[str, ...]], Any] | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.jobs: Jobs = spool.jobs
        self.stop = stop or threading.Event()
        self.client = client
        self.clock = clock
        self._get_store = get_store
        self._lock = threading.Lock()
        self._busy: set[tuple[str, int]] = set()            # (job, seq) being worked on
        self._inventory: set[str] = set()                   # jobs whose inventory runs
        self._refetch: dict[tuple[str, int], int] = {}      # (job, seq) -> oid an arrival must pass
        self._throttles: dict[str, Throttle] = {}
        self._open: dict[tuple[str, int], QueryRetrieveClient] = {}   # in flight, for cancel
        start = int(clock()) % 30000 + 1
        self._sources = {name: _SourceSlots(src, ThreadPoolExecutor(
            max_workers=src.max_associations, thread_name_prefix=f"migrate-{name}"), ids=MessageIds(start))
            for name, src in cfg.sources.items()}
        self._verifiers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="migrate-verify")
        self._verifying: set[tuple[str, int]] = set()
        self._wake = threading.Event()
        self._committer: Any = None           # C-GET's group commit, made on first use
        self._get_services: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._prune_at = 0.0
        self._idle: dict[str, list[tuple[QueryRetrieveClient, float]]] = {}   # source -> kept, idle

    # -- loop ------------------------------------------------------------------------------

    def run(self) -> None:
        log.info("migration: %d source(s) configured (%s)", len(self._sources), ", ".join(self._sources))
        while not self.stop.is_set():
            try:
                delay = self.round()
            except Exception:    # one bad round must not end months of migration
                log.exception("migration: round failed; trying again")
                delay = 5.0
            self._wake.wait(min(POLL, delay))
            self._wake.clear()
            if self.stop.is_set():
                break

    def wake(self) -> None:
        """Run the next round now (a job was started or changed by an operator)."""
        self._wake.set()

    def close(self) -> None:
        self.stop.set()
        with self._lock:
            for client in list(self._open.values()):
                _abort_quietly(client)
        self._release_idle(float("inf"))
        for slots in self._sources.values():
            slots.pool.shutdown(wait=True, cancel_futures=True)
        self._verifiers.shutdown(wait=True, cancel_futures=True)
        for service in self._get_services.values():
            service.close()
        if self._committer is not None:
            notifier = self._committer.notifier
            self._committer.close()
            if notifier is not None:
                notifier.close()

    def round(self) -> float:
        """One pass over every unfinished job; how long until something may be due."""
        now = self.clock()
        delay = POLL
        for name in self.jobs.unfinished():
            try:
                delay = min(delay, self._advance(name, now))
            except JobError as exc:
                log.warning("migration %s: %s", name, exc)
        self._release_cancelled()
        self._release_idle(KEEP_IDLE)
        if now >= self._prune_at:
            self._prune_at = now + 300.0
            pruned = self.spool.moves.prune(now=now)
            if pruned:
                log.info("migration: %d expired C-MOVE registration(s) removed", pruned)
        return delay

    def _advance(self, name: str, now: float) -> float:
        spec = self.jobs.spec(name)
        state = self.jobs.state(name)
        source = self.cfg.sources.get(spec.source)
        if source is None:
            self.jobs.set_error(name, f"source {spec.source!r} is not configured (sources:)")
            return POLL
        missing = [d for d in spec.destinations if d not in self.cfg.destinations]
        if missing:
            self.jobs.set_error(name, f"destination(s) {', '.join(missing)} not configured (destinations:)")
            return POLL
        # Delivery is the senders' work: follow it whatever the state, windows and pauses
        # included (nothing is retrieved by following it).
        self._follow_delivery(name, spec, now)
        if state is JobState.PAUSED:
            return POLL
        inside = in_windows(spec.windows, now)
        if state in (JobState.RUNNING, JobState.WAITING_WINDOW):
            if (state is JobState.WAITING_WINDOW) == inside:
                state = self.jobs.set_window(name, inside)
                log.info("migration %s: %s", name, "window open: running" if inside else
                         "outside its time windows: waiting", extra=fields())
        if state is JobState.INVENTORY:
            # Queries only (no retrieve): done whatever the windows, so that the job's size is
            # known at once and the first window is spent moving studies.
            self._start_inventory(name, spec, source)
            return POLL
        if not inside:
            self._start_verifications(name, spec, now)   # the destination's C-FIND, not the source
            return POLL
        if state is not JobState.RUNNING:
            return POLL
        self._start_verifications(name, spec, now)
        self._start_retrieves(name, spec, source, now)
        self._maybe_finish(name)
        due = self.jobs.next_due(name)
        return POLL if due is None else max(0.05, due - now)

    # -- inventory ---------------------------------------------------------------------------

    def _start_inventory(self, name: str, spec: JobSpec, source: SourceConfig) -> None:
        slots = self._sources[source.name]
        with self._lock:
            if name in self._inventory or slots.busy >= source.max_associations:
                return
            if self.clock() < slots.backoff.until:
                return
            self._inventory.add(name)
            slots.busy += 1
        fut = slots.pool.submit(self._inventory_task, name, spec, source)
        fut.add_done_callback(lambda _f: self._done(slots, inventory=name))

    def _inventory_task(self, name: str, spec: JobSpec, source: SourceConfig) -> None:
        from fastroute.migration import inventory
        calling = source.calling_ae or self.cfg.ae_title
        client = self.client(source, calling)
        try:
            inventory.run_inventory(client, self.jobs, name, spec, source, stop=self.stop)
        except inventory.InventoryInterrupted:
            return            # stopping, paused or cancelled: its progress is kept for the next run
        except (QueryFailed, RetrieveFailed, OSError) as exc:
            self._source_trouble(name, source, getattr(exc, "status", None), f"inventory: {exc}")
            return
        finally:
            _close_quietly(client)
        if self.stop.is_set():
            return            # stopped mid-way: its progress is in the spool, the next run resumes
        state = self.jobs.inventory_done(name, self.clock())
        self.jobs.set_error(name, "")
        log.info("migration %s: inventory of %s done: %d studies; %s", name, source.ae_title,
                 self.jobs.status(name).studies_total, state)

    # -- retrieve ----------------------------------------------------------------------------

    def _start_retrieves(self, name: str, spec: JobSpec, source: SourceConfig, now: float) -> None:
        slots = self._sources[source.name]
        if now < slots.backoff.until:
            return
        throttle = self._throttles.setdefault(name, Throttle(spec.rate_studies_per_hour,
                                                             spec.rate_instances_per_s))
        for state in (StudyState.RETRIEVING, StudyState.LISTED, StudyState.PENDING):
            if slots.busy >= source.max_associations or not throttle.ready(now):
                return
            for study in self.jobs.due(name, state, DUE_BATCH, now):
                key = (name, study.seq)
                with self._lock:
                    if slots.busy >= source.max_associations or not throttle.ready(now):
                        return
                    if key in self._busy:
                        continue
                    self._busy.add(key)
                    slots.busy += 1
                throttle.started(now, study.source_instances or 1)
                fut = slots.pool.submit(self._study_task, name, spec, source, study.seq)
                fut.add_done_callback(functools.partial(self._study_done, slots, key))

    def _study_done(self, slots: _SourceSlots, key: tuple[str, int], _fut: Future[None]) -> None:
        self._done(slots, study=key)

    def _done(self, slots: _SourceSlots, *, study: tuple[str, int] | None = None,
              inventory: str | None = None) -> None:
        with self._lock:
            slots.busy -= 1
            if study is not None:
                self._busy.discard(study)
                self._open.pop(study, None)
            if inventory is not None:
                self._inventory.discard(inventory)
        self._wake.set()

    def _study_task(self, name: str, spec: JobSpec, source: SourceConfig, seq: int) -> None:
        """List (when pending) then retrieve what is missing of one study, on one association."""
        try:
            self._study(name, spec, source, seq)
        except Exception:
            log.exception("migration %s: study #%d failed unexpectedly; it is tried again", name, seq)
            try:
                self.jobs.update_study(name, seq, next_at=self.clock() + RETRY_DELAY)
            except JobError:
                pass

    def _study(self, name: str, spec: JobSpec, source: SourceConfig, seq: int) -> None:
        study = self.jobs.get_study(name, seq)
        if study is None or study.state in FINAL_STUDY_STATES or not self._may_retrieve(name):
            return
        calling = source.calling_ae or self.cfg.ae_title
        uid = study.study_instance_uid
        if study.state is StudyState.PENDING:
            client = self._open_client(name, seq, source, calling)
            try:
                study = self._list(name, source, client, study)
            except (QueryFailed, RetrieveFailed, OSError) as exc:
                self._source_trouble(name, source, getattr(exc, "status", None),
                                     f"listing study {uid}: {exc}", seq)
                return
            finally:
                self._close_client(name, seq, client, source=source)
            if study.state is not StudyState.LISTED:
                return
        if study.verify_attempts and (name, seq) not in self._refetch:
            # A re-fetch after a failed verification that a restart interrupted: only copies
            # newer than what is spooled now count for the instances the destination lacked.
            self._refetch[(name, seq)] = self._newest_oid(name, uid)
        # Arrivals already spooled (a crash mid-retrieve, a final response that came early)
        # count before anything is fetched again.
        missing = self._attribute(name, study)
        if not missing and not self._short(name, seq):
            self._received_all(name, spec, study)
            return
        if study.attempts >= MAX_ATTEMPTS:
            last = f" (last: {study.reason})" if study.reason else ""
            what = (f"{len(missing)} instance(s) not received after {study.attempts} retrieve(s){last}: "
                    f"{_uid_list(i.sop_instance_uid for i in missing)}" if missing else
                    f"{self._short(name, seq)} instance(s) the source counts but never sent or listed "
                    f"({study.attempts} retrieve(s)){last}")
            self.jobs.update_study(name, seq, state=StudyState.FAILED, reason=what)
            log.error("migration %s: study %s failed: %d instance(s) missing after %d retrieves from %s",
                      name, uid, len(missing), study.attempts, source.ae_title, extra=fields(study_uid=uid))
            return
        study = self.jobs.update_study(name, seq, state=StudyState.RETRIEVING, add_attempt=True,
                                       now=self.clock())
        listed = study.source_instances or len(missing)
        slots = self._sources[source.name]
        if missing:
            units = plan_units(uid, missing, listed, source.series_threshold,
                               image_chunk=1 if slots.single_uids else IMAGE_CHUNK)
        else:
            # Counts only (a source without IMAGE level): no UIDs to ask for, the whole study
            # again; what arrives is attributed by its Move Originator all the same.
            units = [Unit(Level.STUDY, {"StudyInstanceUID": uid}, (), frozenset())]
        outcome = self._retrieve(name, spec, source, calling, study, units)
        if self.stop.is_set() or self.jobs.state(name) is JobState.CANCELLED:
            # Our own shutdown or a cancel aborted it: not the study's fault. What arrived is
            # attributed by the next run (or stays in the report of the cancelled job).
            self.jobs.update_study(name, seq, attempts=max(0, study.attempts - 1))
            return
        missing = self._attribute(name, study, wait_for=outcome.expected, since=outcome.started)
        if not missing and not self._short(name, seq):
            self._received_all(name, spec, study)
            backoff = self._sources[source.name].backoff
            if backoff.failures:
                backoff.succeeded()
                self.jobs.set_error(name, "")     # the source answers again
            return
        if outcome.transient:
            delay = self._backoff(name, source, outcome.status, outcome.why)
            # Backing off is not the study's fault: the attempt is given back.
            self.jobs.update_study(name, seq, attempts=max(0, study.attempts - 1),
                                   next_at=self.clock() + delay, reason=outcome.why)
            return
        why = outcome.why or f"{len(missing)} instance(s) did not arrive"
        delay = min(BACKOFF_MAX, RETRY_DELAY * 2 ** max(0, study.attempts - 1))
        self.jobs.update_study(name, seq, next_at=self.clock() + delay, reason=why)
        log.warning("migration %s: study %s: %d of %d instance(s) still missing after attempt %d (%s); "
                    "fetching them again in %.0fs", name, uid, len(missing), listed, study.attempts,
                    escape_control(why), delay, extra=fields(study_uid=uid))

    def _short(self, name: str, seq: int) -> int:
        """How many instances a counts-only study still lacks (0 for a listed one: its missing
        list says it all)."""
        study = self.jobs.get_study(name, seq)
        if study is None or study.source_instances is None:
            return 0
        return max(0, study.source_instances - study.received)

    def _may_retrieve(self, name: str) -> bool:
        """Pause, cancel and windows are read again before each retrieve: a pause is prompt."""
        try:
            return self.jobs.state(name) is JobState.RUNNING and not self.stop.is_set()
        except JobError:
            return False

    def _list(self, name: str, source: SourceConfig, client: QueryRetrieveClient,
              study: StudyRecord) -> StudyRecord:
        from fastroute.migration import inventory
        instances = inventory.list_study(client, study.study_instance_uid, source)
        now = self.clock()
        counts_only = instances.counts_only
        # The source's own count: more than the list where a series listed short of it.
        study = self.jobs.set_instances(name, study.seq, instances, now=now,
                                        source_instances=instances.source_instances)
        uid = study.study_instance_uid
        if counts_only and study.source_instances:
            log.info("migration %s: study %s: %d instance(s) by count (%s has no IMAGE level)", name, uid,
                     study.source_instances, source.ae_title, extra=fields(study_uid=uid))
            return study
        if not instances:
            log.warning("migration %s: study %s lists no instances at %s", name, uid, source.ae_title,
                        extra=fields(study_uid=uid))
            return self.jobs.update_study(name, study.seq, state=StudyState.FAILED,
                                          reason=f"no instances at the source ({source.ae_title})", now=now)
        log.info("migration %s: study %s listed: %d instance(s) in %d series", name, uid, len(instances),
                 len({i.series_instance_uid for i in instances}), extra=fields(study_uid=uid))
        return study

    @dataclass(slots=True)
    class _Outcome:
        started: float
        expected: int = 0            # sub-operations the source reported completed (or warning)
        transient: bool = False      # back off the source, then again
        status: int | None = None
        why: str = ""

    def _retrieve(self, name: str, spec: JobSpec, source: SourceConfig, calling: str,
                  study: StudyRecord, units: list[Unit]) -> MigrationRunner._Outcome:
        uid = study.study_instance_uid
        out = MigrationRunner._Outcome(started=self.clock())
        if source.retrieve == "get":
            instances = self.jobs.instances(name, study.seq)
            units = [part for unit in units for part in split_classes(unit, instances)]
        deadline_each = source.retrieve_timeout
        client: QueryRetrieveClient | None = None
        try:
            todo = collections.deque(units)
            while todo:
                unit = todo.popleft()
                if not self._may_retrieve(name):
                    out.why = "paused or cancelled before the retrieve ended"
                    return out
                if source.retrieve == "get":
                    client = self._get_client(name, spec, source, calling, study.seq, unit)
                elif client is None:
                    client = self._open_client(name, study.seq, source, calling)
                result = self._one(name, spec, source, calling, client, study, unit, deadline_each)
                if source.retrieve == "get":
                    self._close_client(name, study.seq, client)
                    client = None
                c = result.counts
                done = (c.completed or 0) + (c.warning or 0)
                if result.status == 0 and unit.sop_uids:
                    # Success says every instance asked for was sent, whatever counts a final
                    # response that overtook its last C-STOREs reports: wait for them all.
                    done = max(done, len(unit.sop_uids) - (c.failed or 0))
                out.expected += done
                if (unit.level is Level.IMAGE and len(unit.sop_uids) > 1 and result.status == 0
                        and not (c.completed or c.failed or c.warning)):
                    # A success that moved nothing for a list of UIDs: this archive does not
                    # take UID lists (PS3.4 C.4.2.2.1 allows them, not all implement them).
                    # From now on one SOP Instance UID per retrieve from this source.
                    self._sources[source.name].single_uids = True
                    log.warning("migration %s: %s matched none of %d SOP Instance UIDs given as a list: "
                                "retrieving them one by one from now on", name, source.ae_title,
                                len(unit.sop_uids), extra=fields(study_uid=uid, called_ae=source.ae_title))
                    series = unit.identifier.get("SeriesInstanceUID", "")
                    for sop in unit.sop_uids:
                        ident = {"StudyInstanceUID": uid, "SOPInstanceUID": sop}
                        if series:
                            ident["SeriesInstanceUID"] = series
                        todo.append(Unit(Level.IMAGE, ident, (sop,), unit.sop_classes))
                    continue
                out.status = result.status
                if result.timed_out:
                    out.why = (f"{unit.level} retrieve of study {uid} not finished within "
                               f"retrieve_timeout ({source.retrieve_timeout:g}s): cancelled")
                    log.warning("migration %s: %s", name, out.why, extra=fields(study_uid=uid))
                elif result.status in TRANSIENT:
                    out.transient = True
                    out.why = f"{source.ae_title} answered {describe(result.status)}"
                    return out
                elif result.status == UNKNOWN_DESTINATION:
                    self._unknown_destination(name, source, uid)
                    out.transient, out.status = True, UNKNOWN_DESTINATION
                    out.why = self.jobs.status(name).error
                    return out
                elif result.status not in (0x0000,) and (result.status & 0xF000) != 0xB000:
                    out.why = (f"{source.ae_title} ended the {unit.level} retrieve with "
                               f"{describe(result.status)}"
                               + (f": {escape_control(result.comment)}" if result.comment else ""))
                elif result.failed_sop_instance_uids:
                    out.why = (f"{source.ae_title} could not send {len(result.failed_sop_instance_uids)}: "
                               f"{_uid_list(result.failed_sop_instance_uids, 5)}")
        except RetrieveFailed as exc:
            out.status = exc.status
            if exc.result is not None:
                c = exc.result.counts
                out.expected += (c.completed or 0) + (c.warning or 0)
            out.why = f"retrieve from {source.ae_title} failed: {escape_control(str(exc))}"
            if exc.status == UNKNOWN_DESTINATION:
                self._unknown_destination(name, source, uid)
                out.transient = True
                out.why = self.jobs.status(name).error
            else:
                # Out of resources, or the source cannot be reached (association refused or
                # failed): the source's trouble, not the study's. Anything else that ended the
                # retrieve without a status (an abort, a protocol error mid-way) may be this
                # study's own doing: it spends an attempt, so a study that always breaks the
                # association ends failed with the reason instead of blocking the job.
                out.transient = exc.back_off or isinstance(exc.__cause__, (AssociationFailed, NoContextAccepted))
                if not out.transient:
                    self._backoff(name, source, exc.status, out.why)
        except (QueryFailed, OSError) as exc:
            out.transient = True
            out.why = f"retrieve from {source.ae_title} failed: {escape_control(str(exc))}"
        finally:
            if client is not None:
                self._close_client(name, study.seq, client,
                                   source=source if source.retrieve != "get" else None)
        return out

    def _one(self, name: str, spec: JobSpec, source: SourceConfig, calling: str,
             client: QueryRetrieveClient, study: StudyRecord, unit: Unit, timeout: float) -> RetrieveResult:
        uid = study.study_instance_uid
        destination = source.move_destination or self.cfg.ae_title

        def pending(counts: SubOperations) -> None:
            log.debug("migration %s: study %s: %s remaining, %s completed, %s failed", name, uid,
                      counts.remaining, counts.completed, counts.failed, extra=fields(study_uid=uid))

        if source.retrieve == "get":
            result = client.get(unit.identifier, level=unit.level, timeout=timeout, on_pending=pending)
        else:
            self._register_move(name, spec, source, calling, client, uid, timeout)
            # Not unregistered here: C-STOREs committed after the final response (or after a
            # cancel) must still find their job. _received_all unregisters once everything
            # arrived; otherwise the entry expires after the retrieve timeout.
            result = client.move(unit.identifier, destination, level=unit.level, timeout=timeout,
                                 on_pending=pending)
        c = result.counts
        log.info("migration %s: %s %s of study %s from %s: status %s, %s completed, %s failed, %s warning%s",
                 name, "C-GET" if source.retrieve == "get" else f"C-MOVE (to {destination})", unit.level, uid,
                 source.ae_title, describe(result.status), c.completed, c.failed, c.warning,
                 " (timed out, cancelled)" if result.timed_out else "",
                 extra=fields(study_uid=uid, status=result.status, called_ae=source.ae_title, calling_ae=calling))
        return result

    def _register_move(self, name: str, spec: JobSpec, source: SourceConfig, calling: str,
                       client: QueryRetrieveClient, study_uid: str, timeout: float) -> list[tuple[str, int]]:
        """Register the move under the Message ID it will carry, before it is sent (the keys
        registered are returned): an id unique among this process's moves to ``source`` (the listener tells moves apart by
        Move Originator AE + Message ID, and all our associations share the calling AE)."""
        ids = self._sources[source.name].ids
        expires = self.clock() + timeout + MOVE_EXPIRY_MARGIN
        for _ in range(64):
            msg_id = ids.take()
            client.set_next_message_id(msg_id)
            if self.spool.moves.register(calling, msg_id, name, study_uid, tuple(spec.destinations), expires):
                keys = [(calling, msg_id)]
                # Some archives (pynetdicom-based ones among them) put their OWN AE title in
                # the Move Originator AE Title of the C-STOREs: the same Message ID under the
                # source's title finds the move too. Still keyed by our Message ID.
                if source.ae_title.strip() != calling.strip() and self.spool.moves.register(
                        source.ae_title, msg_id, name, study_uid, tuple(spec.destinations), expires):
                    keys.append((source.ae_title, msg_id))
                return keys
        raise RetrieveFailed(f"no free Move Originator Message ID for {calling} (64 tried): too many "
                             "moves registered at once", None)

    def _open_client(self, name: str, seq: int, source: SourceConfig, calling: str) -> QueryRetrieveClient:
        """A FIND/MOVE client for ``source``: a kept one (its association still open) when
        there is one, else a new one; :meth:`_close_client` keeps it again."""
        client = None
        with self._lock:
            idle = self._idle.get(source.name, [])
            while idle and client is None:
                kept, _ = idle.pop()
                if kept.calling_ae == calling:
                    client = kept
                else:
                    _close_quietly(kept)
        if client is None:
            client = self.client(source, calling)
        with self._lock:
            self._open[(name, seq)] = client
        return client

    def _release_idle(self, older_than: float) -> None:
        """Release kept associations unused for ``older_than`` seconds (inf: every one)."""
        now = time.monotonic()
        gone: list[QueryRetrieveClient] = []
        with self._lock:
            for name, idle in self._idle.items():
                keep = [(c, t) for c, t in idle if older_than != float("inf") and now - t < older_than]
                gone += [c for c, t in idle if (c, t) not in keep]
                self._idle[name] = keep
        for client in gone:
            _close_quietly(client)

    def _get_client(self, name: str, spec: JobSpec, source: SourceConfig, calling: str, seq: int,
                    unit: Unit) -> QueryRetrieveClient:
        if self._get_store is None:
            self._get_store = self._default_get_store()
        store = self._get_store(name, tuple(spec.destinations))
        # One context per (class, syntax): the source sends each object in the syntax it is
        # stored in, byte for byte (a context with every syntax accepts one, and the source
        # would transcode the rest). split_classes kept the unit within one association.
        storage = storage_contexts(sorted(unit.sop_classes))
        client = self.client(source, calling, store=store, storage=storage)
        with self._lock:
            self._open[(name, seq)] = client
        return client

    def _default_get_store(self) -> Callable[[str, tuple[str, ...]], Any]:
        """C-GET's C-STOREs arrive on our own association: they are spooled here, through the
        same checks and group commit as the listener's, for the job's destinations."""
        from fastroute.routing.intake import StoreService
        from fastroute.spool.commit import Committer
        from fastroute.spool.wakeup import Notifier

        committer = Committer(self.spool, Notifier(self.cfg.spool), gather=self.cfg.group_commit_delay)
        self._committer = committer
        services = self._get_services

        def make(job: str, destinations: tuple[str, ...]) -> Any:
            key = (job, destinations)
            if key not in services:
                services[key] = StoreService.for_retrieve(committer, job=job, destinations=destinations,
                                                          max_object_bytes=self.cfg.max_object_bytes)
            return services[key]
        return make

    def _close_client(self, name: str, seq: int, client: QueryRetrieveClient, *,
                      source: SourceConfig | None = None) -> None:
        """Done with ``client``: kept for the next study of ``source`` while its association is
        usable and the runner goes on (a C-GET client, made for one study's classes, is not)."""
        with self._lock:
            if self._open.get((name, seq)) is client:
                del self._open[(name, seq)]
        if source is not None and not self.stop.is_set() and _usable(client):
            with self._lock:
                self._idle.setdefault(source.name, []).append((client, time.monotonic()))
            return
        _close_quietly(client)

    def _attribute(self, name: str, study: StudyRecord, *, wait_for: int = 0,
                   since: float | None = None) -> list[InstanceRecord]:
        """Mark what the spool holds for this job and study as received; what is still missing.

        ``wait_for``: the source reported that many sub-operations done; their C-STOREs may be
        committed after its final response, so wait (bounded) until that many arrived."""
        key = (name, study.seq)
        uid = study.study_instance_uid
        deadline = time.monotonic() + ARRIVAL_WAIT
        while True:
            records = _job_records(self.spool, name, uid)
            floor = self._refetch.get(key)
            if floor is not None:
                wanted = {i.sop_instance_uid for i in self.jobs.missing(name, study.seq, "found")}
                fresh = {s: r for s, r in records.items() if s not in wanted or r[0] > floor}
            else:
                fresh = records
            arrived_since = sum(1 for oid, rec in fresh.values()
                                if since is not None and rec.received_at >= since - 1.0)
            if not wait_for or arrived_since >= wait_for or time.monotonic() >= deadline or self.stop.is_set():
                break
            time.sleep(0.2)
        if floor is not None:
            missing_refetch = [i for i in self.jobs.missing(name, study.seq, "found")
                               if i.sop_instance_uid not in fresh or fresh[i.sop_instance_uid][0] <= floor]
        else:
            missing_refetch = []
        if fresh:
            got = {s: oid for s, (oid, _r) in fresh.items()}
            digests = {s: r.digest for s, (_o, r) in fresh.items() if r.digest}
            conflicts = self.jobs.mark_received(name, study.seq, got, digests=digests or None, now=self.clock())
            for sop in conflicts:
                log.warning("migration %s: study %s: SOP instance %s received again with different content "
                            "(kept the first; see the report)", name, uid, sop, extra=fields(study_uid=uid, sop_uid=sop))
        missing = self.jobs.missing(name, study.seq, "received")
        known = {i.sop_instance_uid for i in missing}
        return missing + [i for i in missing_refetch if i.sop_instance_uid not in known]

    def _received_all(self, name: str, spec: JobSpec, study: StudyRecord) -> None:
        self._refetch.pop((name, study.seq), None)
        # Nothing more can come for this study: free its moves' Message IDs (16-bit) now
        # rather than when they expire.
        for move in self.spool.moves.active():
            if move.job == name and move.study_uid == study.study_instance_uid:
                self.spool.moves.unregister(move.originator_ae, move.message_id)
        self.jobs.update_study(name, study.seq, state=StudyState.DELIVERING, reason="", now=self.clock())
        log.info("migration %s: study %s: every instance received; delivering to %s", name,
                 study.study_instance_uid, ", ".join(spec.destinations), extra=fields(study_uid=study.study_instance_uid))

    # -- source trouble ----------------------------------------------------------------------

    def _backoff(self, name: str, source: SourceConfig, status: int | None, why: str) -> float:
        slots = self._sources[source.name]
        with self._lock:
            delay = slots.backoff.failed(self.clock())
        log.warning("migration %s: %s; leaving source %s (%s@%s:%d) alone for %.0fs", name, escape_control(why),
                    source.name, source.ae_title, source.host, source.port, delay,
                    extra=fields(called_ae=source.ae_title, status=status))
        if status != UNKNOWN_DESTINATION:
            self.jobs.set_error(name, f"{why} (backing off {delay:.0f}s)")
        return delay

    def _source_trouble(self, name: str, source: SourceConfig, status: int | None, why: str,
                        seq: int | None = None) -> None:
        delay = self._backoff(name, source, status, why)
        if seq is not None:
            self.jobs.update_study(name, seq, next_at=self.clock() + delay)

    def _unknown_destination(self, name: str, source: SourceConfig, study_uid: str) -> None:
        dest = source.move_destination or self.cfg.ae_title
        text = (f"{source.ae_title} does not know the move destination {dest!r} (0xA801): register AE "
                f"{dest} at host {self._our_host()} port {self.cfg.port} in {source.ae_title}'s "
                f"configuration (source {source.name})")
        self.jobs.set_error(name, text)
        log.error("migration %s: %s", name, text, extra=fields(study_uid=study_uid, called_ae=source.ae_title,
                                                               status=UNKNOWN_DESTINATION))

    def _our_host(self) -> str:
        host = self.cfg.host
        if host in ("", "0.0.0.0", "::"):
            import socket
            try:
                return socket.gethostname()
            except OSError:
                return host
        return host

    # -- delivery and verification -----------------------------------------------------------

    def _follow_delivery(self, name: str, spec: JobSpec, now: float) -> None:
        batch = self.jobs.due(name, StudyState.DELIVERING, DUE_BATCH, now)
        rotate = len(batch) >= DUE_BATCH
        for study in batch:
            uid = study.study_instance_uid
            records = _job_records(self.spool, name, uid)
            delivered, refused = [], ""
            for inst in self.jobs.instances(name, study.seq):
                have = records.get(inst.sop_instance_uid)
                if have is None:
                    if inst.delivered or (inst.received and inst.oid is not None
                                          and self.spool.record(inst.oid) is None):
                        # Its routing record was pruned (history_retention), which happens
                        # only once no destination is outstanding: the verification decides.
                        delivered.append(inst.sop_instance_uid)
                    continue
                rec = have[1]
                if _delivered_everywhere(rec, spec.destinations):
                    delivered.append(inst.sop_instance_uid)
                elif not refused:
                    refused = _refused(rec, spec.destinations)
            if len(delivered) != study.delivered:
                study = self.jobs.mark_delivered(name, study.seq, delivered, now=now)
            listed = study.source_instances or 0
            if refused:
                self.jobs.update_study(name, study.seq, state=StudyState.FAILED, reason=refused, now=now)
                log.error("migration %s: study %s failed: %s", name, uid, refused, extra=fields(study_uid=uid))
            elif len(delivered) >= listed:
                if spec.verify:
                    self.jobs.update_study(name, study.seq, state=StudyState.VERIFYING,
                                           next_at=now + VERIFY_DELAY, now=now)
                else:
                    self.jobs.update_study(name, study.seq, state=StudyState.DELIVERED, reason="", now=now)
                    log.info("migration %s: study %s delivered (%d instances; not verified: --no-verify)",
                             name, uid, listed, extra=fields(study_uid=uid))
            elif rotate:
                # More studies wait than one batch reads: let the others come first next round.
                self.jobs.update_study(name, study.seq, next_at=now + POLL, now=now)

    def _start_verifications(self, name: str, spec: JobSpec, now: float) -> None:
        cannot = [d for d in spec.destinations if not self.cfg.destinations[d].query]
        if cannot:
            # `migrate start` refuses this; a reload may have turned `query` off since.
            self.jobs.set_error(name, f"cannot verify at {', '.join(cannot)}: 'query: true' is not set there "
                                      "(studies wait in verifying until it is)")
            return
        for study in self.jobs.due(name, StudyState.VERIFYING, DUE_BATCH, now):
            key = (name, study.seq)
            with self._lock:
                if key in self._verifying or len(self._verifying) >= 4:
                    continue
                self._verifying.add(key)
            fut = self._verifiers.submit(self._verify_task, name, spec, study.seq)
            fut.add_done_callback(functools.partial(self._verified, key))

    def _verified(self, key: tuple[str, int], _fut: Future[None]) -> None:
        with self._lock:
            self._verifying.discard(key)
        self._wake.set()

    def _verify_task(self, name: str, spec: JobSpec, seq: int) -> None:
        try:
            self._verify(name, spec, seq)
        except Exception:
            log.exception("migration %s: verification of study #%d failed unexpectedly; tried again", name, seq)
            self.jobs.update_study(name, seq, next_at=self.clock() + RETRY_DELAY)

    def _verify(self, name: str, spec: JobSpec, seq: int) -> None:
        study = self.jobs.get_study(name, seq)
        if study is None or study.state is not StudyState.VERIFYING:
            return
        uid = study.study_instance_uid
        listed = study.source_instances or 0
        found_min: int | None = None
        not_found: set[str] = set()
        by_count: list[str] = []
        instances = self.jobs.instances(name, seq)
        for dest_name in spec.destinations:
            dest = self.cfg.destinations[dest_name]
            try:
                found_uids, count = self._query_destination(dest, uid)
            except (QueryFailed, RetrieveFailed, OSError) as exc:
                why = f"verification C-FIND at {dest.ae_title} ({dest_name}) failed: {escape_control(str(exc))}"
                log.warning("migration %s: study %s: %s; again in %.0fs", name, uid, why, RETRY_DELAY,
                            extra=fields(study_uid=uid, called_ae=dest.ae_title, status=getattr(exc, "status", None)))
                self.jobs.update_study(name, seq, reason=why, next_at=self.clock() + RETRY_DELAY)
                return
            if found_uids is None:
                by_count.append(dest_name)
                n = count or 0
            else:
                missing_here = {i.sop_instance_uid for i in instances} - found_uids
                not_found |= missing_here
                n = listed - len(missing_here)
            found_min = n if found_min is None else min(found_min, n)
        if not by_count:
            self.jobs.mark_found(name, seq, [i.sop_instance_uid for i in instances
                                             if i.sop_instance_uid not in not_found], now=self.clock())
        else:
            self.jobs.mark_found(name, seq, count=found_min, now=self.clock())
        ok = not not_found and (found_min or 0) >= listed
        now = self.clock()
        if ok:
            self.jobs.update_study(name, seq, state=StudyState.VERIFIED, reason="", now=now)
            self._refetch.pop((name, seq), None)
            log.info("migration %s: study %s verified at %s: %d of %d instance(s) found%s", name, uid,
                     ", ".join(spec.destinations), found_min, listed,
                     f" (by count at {', '.join(by_count)})" if by_count else "", extra=fields(study_uid=uid))
            return
        short = f"{listed - (found_min or 0)} of {listed} instance(s) not found at the destination"
        if not_found:
            short += f": {_uid_list(not_found)}"
        study = self.jobs.update_study(name, seq, add_verify_attempt=True, now=now)
        # By count nothing says which instances are missing: everything is fetched again, once.
        limit = MAX_VERIFY_ATTEMPTS if not_found else 2
        if study.verify_attempts >= limit:
            self.jobs.update_study(name, seq, state=StudyState.FAILED, reason=short, now=now)
            log.error("migration %s: study %s failed verification: %s", name, uid, short,
                      extra=fields(study_uid=uid))
            return
        # The spool deletes delivered bytes: what the destination lacks comes from the source again.
        self._refetch[(name, seq)] = self._newest_oid(name, uid)
        self.jobs.update_study(name, seq, state=StudyState.RETRIEVING, reason=short, next_at=now, now=now)
        log.warning("migration %s: study %s: %s; fetching them again from the source", name, uid, short,
                    extra=fields(study_uid=uid))

    def _newest_oid(self, name: str, study_uid: str) -> int:
        return max((oid for oid, _ in _job_records(self.spool, name, study_uid).values()), default=0)

    def _query_destination(self, dest: DestinationConfig, study_uid: str) -> tuple[set[str] | None, int | None]:
        """IMAGE level: the SOP Instance UIDs found. Study level (``query_level: study``, or the
        destination refused IMAGE level): only NumberOfStudyRelatedInstances. The same C-FIND
        as a destination's ``verify: find`` (:func:`fastroute.routing.verify.query_destination`)."""
        found = query_destination(self.client, dest, dest.calling_ae or self.cfg.ae_title, study_uid)
        return found.uids, found.count

    # -- the end -----------------------------------------------------------------------------

    def _maybe_finish(self, name: str) -> None:
        status = self.jobs.status(name)
        if not status.inventory_done or status.studies_done < status.studies_total:
            return
        with self._lock:
            if any(job == name for job, _ in self._busy | self._verifying):
                return
        try:
            state = self.jobs.finish(name, self.clock())
        except JobError:
            return
        log.info("migration %s: %s: %d studies, %d verified, %d failed", name, state, status.studies_total,
                 status.studies_verified, status.studies_failed)

    def _release_cancelled(self) -> None:
        """A cancelled (or paused) job's retrieves in flight: cancelled by closing their
        associations (the source stops its sub-operations); their studies keep their states."""
        with self._lock:
            open_ = list(self._open.items())
        for (name, _seq), client in open_:
            try:
                state = self.jobs.state(name)
            except JobError:
                state = JobState.CANCELLED
            if state is JobState.CANCELLED:
                log.info("migration %s: cancelled: aborting its retrieve in flight", name)
                _abort_quietly(client)


def _usable(client: Any) -> bool:
    """Whether a client's association can serve the next operation as it is (a test's fake
    client without a connection: never kept)."""
    conn = getattr(client, "conn", None)
    usable = getattr(conn, "usable", None)
    try:
        return bool(usable()) if usable is not None else False
    except Exception:
        return False


def _close_quietly(client: QueryRetrieveClient) -> None:
    try:
        client.close()
    except Exception as exc:   # closing is best effort: the peer may be gone
        log.debug("closing a Q/R association: %s", exc)


def _abort_quietly(client: QueryRetrieveClient) -> None:
    """From another thread than the one waiting in it: the blocked wait fails at once."""
    try:
        client.abort()
    except Exception as exc:
        log.debug("aborting a Q/R association: %s", exc)


__all__ = ["MigrationRunner", "Unit", "plan_units", "split_classes", "Backoff", "Throttle", "MessageIds"]
