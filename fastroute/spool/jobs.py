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
``mwork``  job name 0x00 state code 0x00 u64 seq -> b"" : studies by actionable state, so the
           runner finds the next study to retrieve/verify without scanning the inventory
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

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


class JobError(Exception):
    """A job operation that cannot be done as asked (unknown name, wrong state)."""


class Jobs:
    """Every job operation, each in its own transaction(s); opened by the Spool."""

    def __init__(self, env: lmdb.Environment, dbs: Mapping[str, Any]) -> None:
        raise NotImplementedError

    # -- operators --------------------------------------------------------------------------
    def create(self, spec: JobSpec) -> str:
        """Store a new job (state ``inventory``); its name (``spec.name`` or a generated one,
        ``<source>-<yyyymmdd-hhmmss>``); JobError when the name exists."""
        raise NotImplementedError

    def names(self) -> list[str]:
        raise NotImplementedError

    def spec(self, name: str) -> JobSpec:
        raise NotImplementedError

    def status(self, name: str, now: float | None = None) -> JobStatus:
        raise NotImplementedError

    def pause(self, name: str) -> JobStatus:
        raise NotImplementedError

    def resume(self, name: str) -> JobStatus:
        raise NotImplementedError

    def cancel(self, name: str) -> JobStatus:
        raise NotImplementedError

    def retry(self, name: str) -> int:
        """Failed and incomplete studies again (state -> listed/pending, attempts reset); how many."""
        raise NotImplementedError

    def report(self, name: str) -> Iterator[StudyRecord]:
        """Every study in inventory order, streamed (a read transaction per batch)."""
        raise NotImplementedError

    def study(self, name: str, study_instance_uid: str) -> StudyRecord | None:
        raise NotImplementedError

    def instances(self, name: str, seq: int) -> list[InstanceRecord]:
        raise NotImplementedError

    # -- the runner ---------------------------------------------------------------------------
    # (methods the migration runner needs are added on branch mig-store / mig-runner)


__all__ = ["JobState", "StudyState", "FINAL_STUDY_STATES", "Window", "JobSpec", "JobStatus",
           "REPORT_COLUMNS", "StudyRecord", "InstanceRecord", "JobError", "Jobs"]
