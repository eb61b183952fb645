"""Migration jobs in the spool (issue 13): the job, its inventory of studies and instances.

CONTRACT SKELETON (lead engineer): the dataclasses, enums and method signatures below are
the interface other modules (migration runner, CLI, API, dashboard, metrics) code against.
Bodies marked ``NotImplementedError`` are being written on branch ``mig-store``.

Why in the spool: a migration runs for months and must survive ``kill -9`` at any point, and
a 1,000,000-study inventory must not live in RAM. Every state change is an LMDB transaction;
the job's totals are counters kept in the same transactions as the changes they count, so
``status`` never scans the inventory.

Sub-databases (opened by :class:`fastroute.spool.store.Spool`):

``mjob``   job name -> job record (JSON: spec, state, totals, rate samples)
``mstudy`` job name 0x00 u64 seq -> study record (JSON), seq = inventory order
``mstuid`` job name 0x00 Study Instance UID -> u64 seq (one study once per job)
``minst``  job name 0x00 u64 seq 0x00 SOP Instance UID -> instance record (packed/JSON)
``mwork``  job name 0x00 state code 0x00 u64 next_at (ms) u64 seq -> b"" : non-final studies by
           state, earliest due first, so the runner finds the next study to retrieve/verify
           without scanning the inventory
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Mapping, Sequence

if TYPE_CHECKING:
    import lmdb


class JobState(enum.StrEnum):
    """A job's state as ``migrate status`` prints it (the issue fixes these words)."""

    INVENTORY = "inventory"                # querying the source for what to migrate
    RUNNING = "running"
    PAUSED = "paused"                      # by an operator
    WAITING_WINDOW = "waiting-window"      # outside every --window: nothing is retrieved
    DONE = "done"                          # every study verified (or delivered, --no-verify)
    DONE_WITH_ERRORS = "done-with-errors"  # finished, some studies failed
    CANCELLED = "cancelled"


class StudyState(enum.StrEnum):
    """One study's progress through a job; ``verified`` and ``failed`` are final."""

    PENDING = "pending"          # found by the STUDY-level inventory, instances not listed yet
    LISTED = "listed"            # every SOP Instance UID known (SERIES/IMAGE-level C-FIND)
    RETRIEVING = "retrieving"    # a C-MOVE/C-GET is running or due again (missing instances)
    DELIVERING = "delivering"    # every instance received, waiting for the senders
    VERIFYING = "verifying"      # delivered, waiting for/doing the destination's C-FIND
    VERIFIED = "verified"        # the destination found every instance the source listed
    DELIVERED = "delivered"      # final with --no-verify: delivered to every destination
    FAILED = "failed"            # final: ``reason`` says why (missing list, refused, empty...)


FINAL_STUDY_STATES = frozenset({StudyState.VERIFIED, StudyState.DELIVERED, StudyState.FAILED})


@dataclass(frozen=True, slots=True)
class Window:
    """A daily time window (local time), e.g. 19:00-07:00 (crosses midnight) or with days
    ``sat,sun 00:00-24:00``. Parsed from the CLI's ``--window``."""

    start_minute: int            # minutes after midnight, 0..1439
    end_minute: int              # 1..1440; end < start crosses midnight
    days: tuple[int, ...] = ()   # ISO weekdays 1=Mon..7=Sun on which it opens; () = every day

    @staticmethod
    def parse(text: str) -> Window:
        raise NotImplementedError

    def contains(self, t: float) -> bool:
        """Whether local time ``t`` (epoch seconds) is inside the window."""
        raise NotImplementedError

    def __str__(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What ``fastroute migrate start`` asks for (immutable once created)."""

    name: str
    source: str                                   # a key of ``sources:``
    destinations: tuple[str, ...]                 # keys of ``destinations:``
    query: Mapping[str, str] = field(default_factory=dict)   # STUDY-level C-FIND keys
    studies: tuple[str, ...] = ()                 # Study Instance UIDs / Accession Numbers to take
    rate_studies_per_hour: float | None = None    # --rate N/h
    rate_instances_per_s: float | None = None     # --rate N/s
    windows: tuple[Window, ...] = ()              # () = always
    verify: bool = True
    created_at: float = 0.0
    created_by: str = ""


@dataclass(slots=True)
class JobStatus:
    """``migrate status --json`` (the issue fixes the first keys; more may follow)."""

    name: str
    state: JobState
    studies_total: int
    studies_verified: int
    studies_failed: int
    instances_expected: int
    instances_received: int
    instances_delivered: int
    rate: float                 # instances received per second over the last minute
    eta_s: float | None         # None while unknown (inventory, no rate yet)
    source: str = ""
    destinations: tuple[str, ...] = ()
    studies_done: int = 0       # verified + delivered(--no-verify) + failed
    studies_by_state: dict[str, int] = field(default_factory=dict)
    error: str = ""             # the last job-level problem (source down, 0xA801...), "" if none
    created_at: float = 0.0
    updated_at: float = 0.0
    instances_found: int = 0    # found at the destination by the last verifications
    conflicts: int = 0          # SOP UIDs received twice with different content
    inventory_done: bool = False

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError


# The report's columns, in order (the issue fixes them): CSV header and JSON keys.
REPORT_COLUMNS = ("study_instance_uid", "patient_id", "accession_number", "study_date", "modalities",
                  "source_instances", "received", "delivered", "found_at_destination", "state", "reason")


@dataclass(slots=True)
class StudyRecord:
    """One study of a job's inventory."""

    seq: int
    study_instance_uid: str
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    modalities: str = ""                   # backslash-joined, as ModalitiesInStudy
    source_instances: int | None = None    # NumberOfStudyRelatedInstances, then the listing's count
    received: int = 0                      # distinct listed instances spooled for this job
    delivered: int = 0                     # ... delivered to every destination of the job
    found_at_destination: int | None = None   # the last verification's count (min over destinations)
    state: StudyState = StudyState.PENDING
    reason: str = ""
    attempts: int = 0                      # retrieves started
    verify_attempts: int = 0
    next_at: float = 0.0                   # not before (backoff after 0xA701/0xA702, re-verify)
    updated_at: float = 0.0
    conflicts: int = 0                     # SOP UIDs received again with different content

    def report_row(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(slots=True)
class InstanceRecord:
    """One SOP instance the source listed for a study."""

    sop_instance_uid: str
    series_instance_uid: str = ""
    sop_class_uid: str = ""
    oid: int | None = None                 # the spool object it arrived as
    digest: str = ""                       # content digest (hex) once compared
    delivered: bool = False
    found: bool = False                    # seen by the destination's IMAGE-level C-FIND
    received: bool = False                 # spooled for this job (``oid`` set)
    conflict: bool = False                 # received again with another digest (kept the first)


class JobError(Exception):
    """A job operation that cannot be done as asked (unknown name, wrong state)."""


#: A study named by its inventory ``seq`` or its Study Instance UID.
StudyRef = int | str

#: Which flag :meth:`Jobs.missing` looks at.
MissingOf = Literal["received", "delivered", "found"]


def parse_rate(text: str) -> tuple[float | None, float | None]:
    """``--rate``: ``N/h`` studies per hour, ``N/s`` or ``N/min`` instances per second.

    Returns ``(studies_per_hour, instances_per_s)`` with one of them set; ValueError naming
    the bad text otherwise."""
    raise NotImplementedError


def in_windows(windows: Sequence[Window], t: float) -> bool:
    """Whether ``t`` is inside any window (no windows: always)."""
    raise NotImplementedError


class Jobs:
    """Every job operation, each in its own transaction(s); opened by the Spool.

    Every write keeps the job record's totals (studies by state, instances expected/received/
    delivered/found) in the same transaction as the change it counts, and every runner write
    is idempotent: replaying it after a crash changes nothing twice."""

    def __init__(self, env: lmdb.Environment, dbs: Mapping[str, Any]) -> None:
        raise NotImplementedError

    # -- operators --------------------------------------------------------------------------
    def create(self, spec: JobSpec) -> str:
        """Store a new job (state ``inventory``); its name (``spec.name`` or a generated one,
        ``<source>-<yyyymmdd-hhmmss>``); JobError when the name exists."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """Every job, by name (sorted)."""
        raise NotImplementedError

    def spec(self, name: str) -> JobSpec:
        raise NotImplementedError

    def status(self, name: str, now: float | None = None) -> JobStatus:
        """From the job record alone (never scans the inventory)."""
        raise NotImplementedError

    def pause(self, name: str) -> JobStatus:
        """inventory/running/waiting-window -> paused; JobError when paused or final."""
        raise NotImplementedError

    def resume(self, name: str) -> JobStatus:
        """paused -> inventory (inventory not finished) or running; JobError otherwise."""
        raise NotImplementedError

    def cancel(self, name: str) -> JobStatus:
        """Any non-final state -> cancelled (studies keep their states, for the report)."""
        raise NotImplementedError

    def retry(self, name: str) -> int:
        """Failed and incomplete studies again (state -> listed/pending, attempts reset); how many.

        A finished or cancelled job runs again (``running``, or ``inventory`` when that had not
        finished); a paused job stays paused."""
        raise NotImplementedError

    def report(self, name: str) -> Iterator[StudyRecord]:
        """Every study in inventory order, streamed (a read transaction per batch)."""
        raise NotImplementedError

    def study(self, name: str, study_instance_uid: str) -> StudyRecord | None:
        raise NotImplementedError

    def instances(self, name: str, seq: int) -> list[InstanceRecord]:
        raise NotImplementedError

    # -- the runner ---------------------------------------------------------------------------
    def active(self) -> list[str]:
        """Names of the jobs not in a final state (done, done-with-errors, cancelled) and not
        paused: the ones a runner advances."""
        raise NotImplementedError

    def unfinished(self) -> list[str]:
        """Names of the jobs not in a final state (paused included)."""
        raise NotImplementedError

    def state(self, name: str) -> JobState:
        raise NotImplementedError

    def get_study(self, name: str, study: StudyRef) -> StudyRecord | None:
        """A study by seq or Study Instance UID."""
        raise NotImplementedError

    def inventory_progress(self, name: str) -> dict[str, Any]:
        """The inventory's own resume state (opaque JSON object, {} at first)."""
        raise NotImplementedError

    def add_studies(self, name: str, studies: Iterable[StudyRecord],
                    progress: Mapping[str, Any] | None = None, now: float | None = None) -> int:
        """One batch of the inventory, in one transaction: each study not yet in the job (by
        Study Instance UID) gets the next seq (``seq`` given is ignored) and keeps the given
        state (``pending``, or ``failed`` with a reason such as "not found at source");
        totals follow. ``progress`` (when given) replaces the inventory's resume state in the
        same transaction, so a crash never loses studies nor repeats a range. How many were new."""
        raise NotImplementedError

    def save_inventory_progress(self, name: str, progress: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def inventory_done(self, name: str, now: float | None = None) -> JobState:
        """The inventory finished: inventory -> running (a paused/cancelled job keeps its state,
        and resume then goes to running). Idempotent."""
        raise NotImplementedError

    def set_window(self, name: str, inside: bool) -> JobState:
        """running <-> waiting-window as the runner sees the time windows; other states unchanged."""
        raise NotImplementedError

    def due(self, name: str, state: StudyState, limit: int, now: float | None = None) -> list[StudyRecord]:
        """Up to ``limit`` studies in ``state`` (not final) whose ``next_at`` <= now, earliest
        first then inventory order; from ``mwork`` (no scan of the inventory)."""
        raise NotImplementedError

    def next_due(self, name: str, states: Iterable[StudyState] | None = None) -> float | None:
        """The earliest ``next_at`` among studies in ``states`` (default: every non-final
        state); None when there is none. For the runner's sleep."""
        raise NotImplementedError

    def count(self, name: str, state: StudyState) -> int:
        """Studies in ``state`` (from the totals)."""
        raise NotImplementedError

    def set_instances(self, name: str, study: StudyRef, instances: Sequence[InstanceRecord], *,
                      state: StudyState | None = StudyState.LISTED,
                      source_instances: int | None = None, now: float | None = None) -> StudyRecord:
        """The source's listing of a study (SERIES/IMAGE-level C-FIND): replaces ``minst``
        (received/delivered/found flags of instances listed again are kept), sets
        ``source_instances`` (``len(instances)``, or ``source_instances`` for a counts-only
        listing) and ``state``; totals follow. Zero instances is allowed (the runner fails it)."""
        raise NotImplementedError

    def mark_received(self, name: str, study: StudyRef, received: Mapping[str, int], *,
                      digests: Mapping[str, str] | None = None, now: float | None = None) -> list[str]:
        """Instances spooled for this job: {SOP Instance UID: spool oid}. Each counts once
        however often it is replayed; an instance the listing lacked is added. With ``digests``,
        an instance received again with a different digest is NOT overwritten: its SOP UID is
        returned (the caller reports it) and the study's ``conflicts`` grows. Feeds ``rate``."""
        raise NotImplementedError

    def mark_delivered(self, name: str, study: StudyRef, sop_uids: Iterable[str],
                       now: float | None = None) -> StudyRecord:
        """Instances delivered to every destination of the job (idempotent)."""
        raise NotImplementedError

    def mark_found(self, name: str, study: StudyRef, sop_uids: Iterable[str] | None = None, *,
                   count: int | None = None, now: float | None = None) -> StudyRecord:
        """A verification's result: the SOP UIDs the destination's IMAGE-level C-FIND found
        (exactly these are flagged ``found``; ``found_at_destination`` = how many of the listed
        ones), or only ``count`` (STUDY-level NumberOfStudyRelatedInstances)."""
        raise NotImplementedError

    def update_study(self, name: str, study: StudyRef, *, state: StudyState | None = None,
                     reason: str | None = None, next_at: float | None = None,
                     attempts: int | None = None, verify_attempts: int | None = None,
                     add_attempt: bool = False, add_verify_attempt: bool = False,
                     now: float | None = None) -> StudyRecord:
        """Change a study's state/reason/next_at/attempts (None: unchanged); ``mwork`` and the
        totals follow in the same transaction. Leaving a final state is for :meth:`retry`
        only (JobError otherwise)."""
        raise NotImplementedError

    def missing(self, name: str, study: StudyRef, of: MissingOf = "received") -> list[InstanceRecord]:
        """Listed instances not yet received (or delivered, or found at the destination)."""
        raise NotImplementedError

    def set_error(self, name: str, text: str) -> None:
        """The job-level problem ``status`` shows (source down, 0xA801 ...); "" clears it."""
        raise NotImplementedError

    def finish(self, name: str, now: float | None = None) -> JobState:
        """Every study final: done (none failed) or done-with-errors; JobError while studies
        remain unfinished. Idempotent (a finished job keeps its state)."""
        raise NotImplementedError


__all__ = ["JobState", "StudyState", "FINAL_STUDY_STATES", "Window", "JobSpec", "JobStatus",
           "REPORT_COLUMNS", "StudyRecord", "InstanceRecord", "JobError", "Jobs", "StudyRef",
           "MissingOf", "parse_rate", "in_windows"]
