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
``minst``  job name 0x00 u64 seq 0x00 SOP Instance UID -> instance record (packed, _encode_inst)
``mwork``  job name 0x00 state code 0x00 u64 next_at (ms) u64 seq -> b"" : non-final studies by
           state, earliest due first, so the runner finds the next study to retrieve/verify
           without scanning the inventory
"""
from __future__ import annotations

import enum
import json
import re
import struct
import time
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

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
        """``[DAYS ]HH:MM-HH:MM``; DAYS is a comma list of days or day ranges (``mon-fri``,
        ``sat,sun``). A window that crosses midnight belongs to the day it opens on: ``fri
        19:00-07:00`` is open Saturday 03:00. ValueError naming the bad text."""
        raw = text.strip()
        days_text, _, span = raw.rpartition(" ")
        m = _SPAN_RE.fullmatch(span)
        if m is None:
            raise ValueError(f"bad time window {text!r}: expected [DAYS ]HH:MM-HH:MM, e.g. 19:00-07:00 "
                             "or 'sat,sun 00:00-24:00'")
        start, end = _minute(m[1], m[2], text, end=False), _minute(m[3], m[4], text, end=True)
        if start == end % 1440 and not (start == 0 and end == 1440):
            raise ValueError(f"bad time window {text!r}: it opens and closes at the same minute")
        days = _parse_days(days_text.strip(), text) if days_text.strip() else ()
        return Window(start, end, days)

    def contains(self, t: float) -> bool:
        """Whether local time ``t`` (epoch seconds) is inside the window."""
        lt = time.localtime(t)
        minute, day = lt.tm_hour * 60 + lt.tm_min, lt.tm_wday + 1
        if self.start_minute < self.end_minute:
            return self.start_minute <= minute < self.end_minute and self._opens(day)
        if minute >= self.start_minute:
            return self._opens(day)
        return minute < self.end_minute and self._opens(7 if day == 1 else day - 1)

    def _opens(self, day: int) -> bool:
        return not self.days or day in self.days

    def __str__(self) -> str:
        span = f"{_hhmm(self.start_minute)}-{_hhmm(self.end_minute)}"
        if not self.days:
            return span
        return ",".join(_DAY_NAMES[d - 1] for d in self.days) + " " + span


_SPAN_RE = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")
_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _minute(hh: str, mm: str, text: str, *, end: bool) -> int:
    h, m = int(hh), int(mm)
    if m > 59 or h > 24 or (h == 24 and (m or not end)):
        raise ValueError(f"bad time window {text!r}: {hh}:{mm} is not a time of day"
                         + (" (24:00 only as an end)" if h == 24 and not end and not m else ""))
    return h * 60 + m


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _day(word: str, text: str) -> int:
    w = word.strip().lower()[:3]
    if w not in _DAY_NAMES or len(word.strip()) < 3:
        raise ValueError(f"bad time window {text!r}: {word.strip()!r} is not a day (mon..sun)")
    return _DAY_NAMES.index(w) + 1


def _parse_days(days_text: str, text: str) -> tuple[int, ...]:
    days: set[int] = set()
    for part in days_text.split(","):
        if not part.strip():
            raise ValueError(f"bad time window {text!r}: empty day in {days_text!r}")
        first, dash, last = part.partition("-")
        a = _day(first, text)
        if not dash:
            days.add(a)
            continue
        b = _day(last, text)
        d = a
        while True:              # a range may wrap the week: fri-mon
            days.add(d)
            if d == b:
                break
            d = d % 7 + 1
    return tuple(sorted(days))


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
    inventory_notes: list[str] = field(default_factory=list)   # what the inventory could not do cleanly

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["state"] = str(self.state)
        out["destinations"] = list(self.destinations)
        out["studies_by_state"] = dict(self.studies_by_state)
        out["inventory_notes"] = list(self.inventory_notes)
        return out


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
        """The report's columns (:data:`REPORT_COLUMNS`), JSON-ready (unknown counts: None)."""
        return {"study_instance_uid": self.study_instance_uid, "patient_id": self.patient_id,
                "accession_number": self.accession_number, "study_date": self.study_date,
                "modalities": self.modalities, "source_instances": self.source_instances,
                "received": self.received, "delivered": self.delivered,
                "found_at_destination": self.found_at_destination, "state": str(self.state),
                "reason": self.reason}


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


_RATE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(h|hr|hour|s|sec|second|min|minute)\s*", re.IGNORECASE)


def parse_rate(text: str) -> tuple[float | None, float | None]:
    """``--rate``: ``N/h`` studies per hour, ``N/s`` or ``N/min`` instances per second.

    Returns ``(studies_per_hour, instances_per_s)`` with one of them set; ValueError naming
    the bad text otherwise."""
    m = _RATE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"bad rate {text!r}: expected N/h (studies per hour), N/s or N/min "
                         "(instances per second or minute), e.g. 500/h")
    n, unit = float(m[1]), m[2].lower()
    if n <= 0:
        raise ValueError(f"bad rate {text!r}: it must be more than 0")
    if unit in ("h", "hr", "hour"):
        return n, None
    return None, (n if unit in ("s", "sec", "second") else n / 60.0)


def in_windows(windows: Sequence[Window], t: float) -> bool:
    """Whether ``t`` is inside any window (no windows: always)."""
    return not windows or any(w.contains(t) for w in windows)


# -- storage --------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_U64 = struct.Struct(">Q")
_WORK = struct.Struct(">QQ")          # next_at (ms), seq
_INST = struct.Struct(">BQ")          # flags, oid
_F_RECEIVED, _F_DELIVERED, _F_FOUND, _F_CONFLICT, _F_HEXDIGEST = 1, 2, 4, 8, 16
_HEX_RE = re.compile(r"[0-9a-f]+")
_SPEC_SUFFIX = b"\x00spec"            # mjob: name -> job record, name 0x00 "spec" -> the spec
_FINAL_JOB = frozenset({JobState.DONE, JobState.DONE_WITH_ERRORS, JobState.CANCELLED})
_STATE_CODE = {StudyState.PENDING: b"p", StudyState.LISTED: b"l", StudyState.RETRIEVING: b"r",
               StudyState.DELIVERING: b"d", StudyState.VERIFYING: b"v"}
# Final states indexed in ``mwork`` too, in inventory order (next_at 0), so that operators'
# views list a million-study job's failures without scanning it; never "due".
_LISTED_CODE = {StudyState.FAILED: b"x"}
_RATE_WINDOW = 60.0                   # status' rate: instances received over the last minute
_SAMPLE_EVERY = 5.0                   # rate samples closer than this are merged
_BATCH = 500                          # studies per read transaction when streaming


def _dumps(obj: Any) -> bytes:
    """The module's one codec: compact JSON (the records are rewritten often, some millions kept)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _loads(raw: bytes | memoryview) -> Any:
    return json.loads(bytes(raw))


# study record <-> compact JSON (short keys, defaults left out)
_STUDY_KEYS = (("study_instance_uid", "u", ""), ("patient_id", "p", ""), ("accession_number", "a", ""),
               ("study_date", "d", ""), ("modalities", "m", ""), ("source_instances", "n", None),
               ("received", "r", 0), ("delivered", "dl", 0), ("found_at_destination", "f", None),
               ("state", "s", StudyState.PENDING), ("reason", "why", ""), ("attempts", "at", 0),
               ("verify_attempts", "va", 0), ("next_at", "nx", 0.0), ("updated_at", "t", 0.0),
               ("conflicts", "c", 0))


def _encode_study(st: StudyRecord) -> bytes:
    out: dict[str, Any] = {}
    for attr, short, default in _STUDY_KEYS:
        v = getattr(st, attr)
        if v != default:
            out[short] = str(v) if attr == "state" else v
    return _dumps(out)


def _decode_study(seq: int, raw: bytes | memoryview) -> StudyRecord:
    d = _loads(raw)
    kw: dict[str, Any] = {attr: d.get(short, default) for attr, short, default in _STUDY_KEYS}
    kw["state"] = StudyState(kw["state"])
    return StudyRecord(seq=seq, **kw)


def _common(a: str, b: str) -> int:
    n = min(len(a), len(b), 255)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _encode_inst(r: InstanceRecord) -> bytes:
    """Packed, as a migration may hold 100M of these: flags and oid; the Series UID as the
    length of its common prefix with the SOP UID (the key) plus the rest; the SOP Class UID;
    the digest as raw bytes when it is hex (half the size), else as text."""
    flags = ((_F_RECEIVED if r.received else 0) | (_F_DELIVERED if r.delivered else 0)
             | (_F_FOUND if r.found else 0) | (_F_CONFLICT if r.conflict else 0))
    series, sop_class = r.series_instance_uid.encode()[:255], r.sop_class_uid.encode()[:255]
    cp = _common(r.series_instance_uid, r.sop_instance_uid) if r.series_instance_uid.isascii() else 0
    digest = r.digest.encode()
    if r.digest and len(r.digest) % 2 == 0 and _HEX_RE.fullmatch(r.digest):
        flags |= _F_HEXDIGEST
        digest = bytes.fromhex(r.digest)
    rest = series[cp:]
    return b"".join((_INST.pack(flags, r.oid or 0), bytes((cp, len(rest))), rest,
                     bytes((len(sop_class),)), sop_class, digest))


def _decode_inst(sop: str, raw: bytes | memoryview) -> InstanceRecord:
    b = bytes(raw)
    flags, oid = _INST.unpack_from(b)
    i = _INST.size
    cp, n = b[i], b[i + 1]
    series = sop[:cp] + b[i + 2:i + 2 + n].decode()
    i += 2 + n
    n = b[i]
    sop_class = b[i + 1:i + 1 + n].decode()
    tail = b[i + 1 + n:]
    digest = tail.hex() if flags & _F_HEXDIGEST else tail.decode()
    received = bool(flags & _F_RECEIVED)
    return InstanceRecord(sop_instance_uid=sop, series_instance_uid=series, sop_class_uid=sop_class,
                          oid=oid if received else None, digest=digest,
                          delivered=bool(flags & _F_DELIVERED), found=bool(flags & _F_FOUND),
                          received=received, conflict=bool(flags & _F_CONFLICT))


def _spec_json(spec: JobSpec) -> dict[str, Any]:
    return {"name": spec.name, "source": spec.source, "destinations": list(spec.destinations),
            "query": dict(spec.query), "studies": list(spec.studies),
            "rate_studies_per_hour": spec.rate_studies_per_hour,
            "rate_instances_per_s": spec.rate_instances_per_s,
            "windows": [str(w) for w in spec.windows], "verify": spec.verify,
            "created_at": spec.created_at, "created_by": spec.created_by}


def _spec_from(d: Mapping[str, Any]) -> JobSpec:
    return JobSpec(name=d["name"], source=d["source"], destinations=tuple(d["destinations"]),
                   query=dict(d["query"]), studies=tuple(d["studies"]),
                   rate_studies_per_hour=d["rate_studies_per_hour"],
                   rate_instances_per_s=d["rate_instances_per_s"],
                   windows=tuple(Window.parse(w) for w in d["windows"]), verify=d["verify"],
                   created_at=d["created_at"], created_by=d["created_by"])


def _rate(samples: Sequence[Sequence[float]], received: int, now: float) -> float:
    """Instances per second over the last minute, from (time, received) samples: the value a
    minute ago is interpolated between the samples around it (flat before the first sample)."""
    if not samples:
        return 0.0
    t0 = max(now - _RATE_WINDOW, samples[0][0])
    if now - t0 <= 0.5:
        return 0.0
    base = float(samples[-1][1])
    for (ta, va), (tb, vb) in zip(samples, samples[1:]):
        if ta <= t0 <= tb:
            base = va + (vb - va) * ((t0 - ta) / (tb - ta) if tb > ta else 1.0)
            break
    else:
        if t0 <= samples[0][0]:
            base = float(samples[0][1])
    return max(0.0, (received - base) / (now - t0))


class Jobs:
    """Every job operation, each in its own transaction(s); opened by the Spool.

    Every write keeps the job record's totals (studies by state, instances expected/received/
    delivered/found) in the same transaction as the change it counts, and every runner write
    is idempotent: replaying it after a crash changes nothing twice."""

    def __init__(self, env: lmdb.Environment, dbs: Mapping[str, Any]) -> None:
        self.env = env
        self._job, self._study, self._stuid = dbs["mjob"], dbs["mstudy"], dbs["mstuid"]
        self._inst, self._work = dbs["minst"], dbs["mwork"]

    # -- records ------------------------------------------------------------------------------
    @staticmethod
    def _prefix(name: str) -> bytes:
        return name.encode() + b"\x00"

    def _load(self, txn: lmdb.Transaction, name: str) -> dict[str, Any]:
        raw = txn.get(name.encode(), db=self._job) if _NAME_RE.fullmatch(name) else None
        if raw is None:
            known = ", ".join(self._names(txn)) or "none"
            raise JobError(f"no migration job named {name!r} (known: {known})")
        job: dict[str, Any] = _loads(raw)
        return job

    def _save(self, txn: lmdb.Transaction, name: str, job: dict[str, Any], now: float) -> None:
        job["ua"] = now
        txn.put(name.encode(), _dumps(job), db=self._job)

    def _names(self, txn: lmdb.Transaction) -> list[str]:
        out = []
        for key in txn.cursor(db=self._job).iternext(keys=True, values=False):
            if b"\x00" not in key:
                out.append(bytes(key).decode())
        return out

    def _seq(self, txn: lmdb.Transaction, name: str, study: StudyRef) -> int | None:
        if isinstance(study, int):
            return study
        raw = txn.get(self._prefix(name) + study.encode(), db=self._stuid)
        return None if raw is None else int(_U64.unpack(raw)[0])

    def _get(self, txn: lmdb.Transaction, name: str, study: StudyRef) -> StudyRecord | None:
        seq = self._seq(txn, name, study)
        if seq is None:
            return None
        raw = txn.get(self._prefix(name) + _U64.pack(seq), db=self._study)
        return None if raw is None else _decode_study(seq, raw)

    def _need(self, txn: lmdb.Transaction, name: str, study: StudyRef) -> StudyRecord:
        st = self._get(txn, name, study)
        if st is None:
            raise JobError(f"job {name!r} has no study {study!r}")
        return st

    def _work_key(self, name: str, st: StudyRecord) -> bytes | None:
        code = _STATE_CODE.get(st.state)
        if code is None:
            listed = _LISTED_CODE.get(st.state)
            return None if listed is None else self._prefix(name) + listed + b"\x00" + _WORK.pack(0, st.seq)
        return self._prefix(name) + code + b"\x00" + _WORK.pack(max(0, int(st.next_at * 1000)), st.seq)

    def _put(self, txn: lmdb.Transaction, name: str, job: dict[str, Any], old: StudyRecord | None,
             new: StudyRecord) -> None:
        """Write a study, keeping ``mwork`` and the job's totals in step with old -> new."""
        by: dict[str, int] = job["by"]
        okey = self._work_key(name, old) if old is not None else None
        nkey = self._work_key(name, new)
        if okey != nkey:
            if okey is not None:
                txn.delete(okey, db=self._work)
            if nkey is not None:
                txn.put(nkey, b"", db=self._work)
        if old is not None:
            by[old.state] = by.get(old.state, 0) - 1
            if not by[old.state]:
                del by[old.state]
        by[new.state] = by.get(new.state, 0) + 1
        o = old if old is not None else StudyRecord(seq=new.seq, study_instance_uid="")
        job["exp"] += (new.source_instances or 0) - (o.source_instances or 0)
        job["rcv"] += new.received - o.received
        job["dlv"] += new.delivered - o.delivered
        job["fnd"] += (new.found_at_destination or 0) - (o.found_at_destination or 0)
        job["cfl"] += new.conflicts - o.conflicts
        txn.put(self._prefix(name) + _U64.pack(new.seq), _encode_study(new), db=self._study)

    def _inst_prefix(self, name: str, seq: int) -> bytes:
        return self._prefix(name) + _U64.pack(seq) + b"\x00"

    def _iter_inst(self, txn: lmdb.Transaction, name: str, seq: int) -> Iterator[InstanceRecord]:
        prefix = self._inst_prefix(name, seq)
        cur = txn.cursor(db=self._inst)
        if not cur.set_range(prefix):
            return
        for key, value in cur:
            key = bytes(key)
            if not key.startswith(prefix):
                break
            yield _decode_inst(key[len(prefix):].decode(), value)

    @staticmethod
    def _sample(job: dict[str, Any], now: float) -> None:
        """Append (now, received) to the rate ring; merge samples closer than _SAMPLE_EVERY and
        keep one sample older than the window (the interpolation's left end)."""
        rs: list[list[float]] = job["rs"]
        rs.append([round(now, 3), job["rcv"]])
        if len(rs) >= 3 and rs[-2][0] - rs[-3][0] < _SAMPLE_EVERY:
            del rs[-2]
        while len(rs) > 2 and rs[1][0] <= now - _RATE_WINDOW:
            del rs[0]

    def _status(self, name: str, job: dict[str, Any], now: float) -> JobStatus:
        state = JobState(job["state"])
        by: dict[str, int] = dict(job["by"])
        verified, failed = by.get(StudyState.VERIFIED, 0), by.get(StudyState.FAILED, 0)
        done = verified + failed + by.get(StudyState.DELIVERED, 0)
        rate = _rate(job["rs"], job["rcv"], now)
        eta: float | None
        if state in (JobState.DONE, JobState.DONE_WITH_ERRORS):
            eta = 0.0
        elif state in (JobState.INVENTORY, JobState.CANCELLED) or rate <= 0:
            eta = None
        else:
            eta = round(max(0, job["exp"] - job["rcv"]) / rate, 1)
        return JobStatus(name=name, state=state, studies_total=sum(by.values()), studies_verified=verified,
                         studies_failed=failed, instances_expected=job["exp"], instances_received=job["rcv"],
                         instances_delivered=job["dlv"], rate=round(rate, 3), eta_s=eta,
                         source=job["src"], destinations=tuple(job["dst"]), studies_done=done,
                         studies_by_state=by, error=job["err"], created_at=job["ca"], updated_at=job["ua"],
                         instances_found=job["fnd"], conflicts=job["cfl"], inventory_done=job["inv_done"],
                         inventory_notes=list(job["inv"].get("notes", ())))

    def _transition(self, name: str, allowed: Iterable[JobState], verb: str,
                    to: Callable[[dict[str, Any]], JobState]) -> JobStatus:
        now = time.time()
        with self.env.begin(write=True) as txn:
            job = self._load(txn, name)
            state = JobState(job["state"])
            if state not in allowed:
                if state in (JobState.DONE, JobState.DONE_WITH_ERRORS):
                    raise JobError(f"job {name} is {state}; nothing to {verb}")
                if state is JobState.CANCELLED:
                    raise JobError(f"job {name} is cancelled; nothing to {verb}"
                                   + (" (retry runs it again)" if verb == "resume" else ""))
                raise JobError(f"job {name} is {state}; cannot {verb} it"
                               + (" (it is not paused)" if verb == "resume" else ""))
            job["state"] = str(to(job))
            self._save(txn, name, job, now)
            return self._status(name, job, now)

    # -- operators --------------------------------------------------------------------------
    def create(self, spec: JobSpec) -> str:
        """Store a new job (state ``inventory``); its name (``spec.name`` or a generated one,
        ``<source>-<yyyymmdd-hhmmss>``); JobError when the name exists."""
        now = spec.created_at or time.time()
        with self.env.begin(write=True) as txn:
            name = spec.name
            if name:
                if not _NAME_RE.fullmatch(name):
                    raise JobError(f"bad job name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
                if txn.get(name.encode(), db=self._job) is not None:
                    raise JobError(f"a migration job named {name!r} exists already")
            else:
                base = f"{spec.source}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"[:60]
                name, n = base, 1
                while txn.get(name.encode(), db=self._job) is not None:
                    n += 1
                    name = f"{base}-{n}"
            stored = JobSpec(name=name, source=spec.source, destinations=tuple(spec.destinations),
                             query=dict(spec.query), studies=tuple(spec.studies),
                             rate_studies_per_hour=spec.rate_studies_per_hour,
                             rate_instances_per_s=spec.rate_instances_per_s, windows=tuple(spec.windows),
                             verify=spec.verify, created_at=now, created_by=spec.created_by)
            txn.put(name.encode() + _SPEC_SUFFIX, _dumps(_spec_json(stored)), db=self._job)
            job = {"state": str(JobState.INVENTORY), "inv_done": False, "inv": {}, "by": {},
                   "exp": 0, "rcv": 0, "dlv": 0, "fnd": 0, "cfl": 0, "seq": 0, "err": "",
                   "src": spec.source, "dst": list(spec.destinations), "ca": now, "ua": now,
                   "rs": [[round(now, 3), 0]]}
            self._save(txn, name, job, now)
        return name

    def names(self) -> list[str]:
        """Every job, by name (sorted)."""
        with self.env.begin() as txn:
            return self._names(txn)

    def spec(self, name: str) -> JobSpec:
        with self.env.begin() as txn:
            self._load(txn, name)
            raw = txn.get(name.encode() + _SPEC_SUFFIX, db=self._job)
            if raw is None:
                raise JobError(f"job {name} has no stored spec (damaged spool?)")
            return _spec_from(_loads(raw))

    def status(self, name: str, now: float | None = None) -> JobStatus:
        """From the job record alone (never scans the inventory)."""
        with self.env.begin() as txn:
            return self._status(name, self._load(txn, name), time.time() if now is None else now)

    def pause(self, name: str) -> JobStatus:
        """inventory/running/waiting-window -> paused; JobError when paused or final."""
        return self._transition(name, (JobState.INVENTORY, JobState.RUNNING, JobState.WAITING_WINDOW),
                                "pause", lambda job: JobState.PAUSED)

    def resume(self, name: str) -> JobStatus:
        """paused -> inventory (inventory not finished) or running; JobError otherwise."""
        return self._transition(name, (JobState.PAUSED,), "resume",
                                lambda job: JobState.RUNNING if job["inv_done"] else JobState.INVENTORY)

    def cancel(self, name: str) -> JobStatus:
        """Any non-final state -> cancelled (studies keep their states, for the report)."""
        return self._transition(name, (JobState.INVENTORY, JobState.RUNNING, JobState.WAITING_WINDOW,
                                       JobState.PAUSED), "cancel", lambda job: JobState.CANCELLED)

    def retry(self, name: str) -> int:
        """Failed and incomplete studies again (state -> listed/pending, attempts reset); how many.

        A finished or cancelled job runs again (``running``, or ``inventory`` when that had not
        finished); a paused job stays paused."""
        now = time.time()
        count, after = 0, b""
        prefix = self._prefix(name)
        while True:
            with self.env.begin(write=True) as txn:
                job = self._load(txn, name)
                cur = txn.cursor(db=self._study)
                found = cur.set_range(prefix + after) if after else cur.set_range(prefix)
                n = 0
                last = b""
                while found and n < _BATCH:
                    key = bytes(cur.key())
                    if not key.startswith(prefix):
                        break
                    last = key[len(prefix):]
                    old = _decode_study(_U64.unpack(last)[0], cur.value())
                    found = cur.next()
                    n += 1
                    if old.state in (StudyState.VERIFIED, StudyState.DELIVERED):
                        continue
                    if old.state is StudyState.FAILED:
                        listed = next(self._iter_inst(txn, name, old.seq), None) is not None
                        state = StudyState.LISTED if listed else StudyState.PENDING
                    else:
                        state = old.state
                    new = replace(old)
                    new.state, new.attempts, new.verify_attempts, new.next_at = state, 0, 0, 0.0
                    new.reason, new.updated_at = "", now
                    self._put(txn, name, job, old, new)
                    count += 1
                if not last or n < _BATCH or not found:
                    if JobState(job["state"]) in _FINAL_JOB:
                        job["state"] = str(JobState.RUNNING if job["inv_done"] else JobState.INVENTORY)
                        job["err"] = ""
                    self._save(txn, name, job, now)
                    return count
                self._save(txn, name, job, now)
                after = _U64.pack(_U64.unpack(last)[0] + 1)

    def report(self, name: str) -> Iterator[StudyRecord]:
        """Every study in inventory order, streamed (a read transaction per batch)."""
        prefix = self._prefix(name)
        start = prefix
        with self.env.begin() as txn:
            self._load(txn, name)
        while True:
            batch: list[StudyRecord] = []
            with self.env.begin() as txn:
                cur = txn.cursor(db=self._study)
                if cur.set_range(start):
                    for key, value in cur:
                        if not key.startswith(prefix):
                            break
                        batch.append(_decode_study(_U64.unpack(key[len(prefix):])[0], value))
                        if len(batch) >= _BATCH:
                            break
            yield from batch
            if len(batch) < _BATCH:
                return
            start = prefix + _U64.pack(batch[-1].seq + 1)

    def study(self, name: str, study_instance_uid: str) -> StudyRecord | None:
        with self.env.begin() as txn:
            self._load(txn, name)
            return self._get(txn, name, study_instance_uid)

    def instances(self, name: str, seq: int) -> list[InstanceRecord]:
        with self.env.begin() as txn:
            return list(self._iter_inst(txn, name, seq))

    # -- the runner ---------------------------------------------------------------------------
    def active(self) -> list[str]:
        """Names of the jobs not in a final state (done, done-with-errors, cancelled) and not
        paused: the ones a runner advances."""
        with self.env.begin() as txn:
            return [n for n in self._names(txn)
                    if JobState(self._load(txn, n)["state"]) not in _FINAL_JOB | {JobState.PAUSED}]

    def unfinished(self) -> list[str]:
        """Names of the jobs not in a final state (paused included)."""
        with self.env.begin() as txn:
            return [n for n in self._names(txn) if JobState(self._load(txn, n)["state"]) not in _FINAL_JOB]

    def state(self, name: str) -> JobState:
        with self.env.begin() as txn:
            return JobState(self._load(txn, name)["state"])

    def get_study(self, name: str, study: StudyRef) -> StudyRecord | None:
        """A study by seq or Study Instance UID."""
        with self.env.begin() as txn:
            self._load(txn, name)
            return self._get(txn, name, study)

    def inventory_progress(self, name: str) -> dict[str, Any]:
        """The inventory's own resume state (opaque JSON object, {} at first)."""
        with self.env.begin() as txn:
            progress: dict[str, Any] = self._load(txn, name)["inv"]
            return progress

    def add_studies(self, name: str, studies: Iterable[StudyRecord],
                    progress: Mapping[str, Any] | None = None, now: float | None = None) -> int:
        """One batch of the inventory, in one transaction: each study not yet in the job (by
        Study Instance UID; one without, by "#" + its Accession Number: a failed --studies
        entry) gets the next seq (``seq`` given is ignored) and keeps the given
        state (``pending``, or ``failed`` with a reason such as "not found at source");
        totals follow. ``progress`` (when given) replaces the inventory's resume state in the
        same transaction, so a crash never loses studies nor repeats a range. How many were new."""
        now = time.time() if now is None else now
        added = 0
        prefix = self._prefix(name)
        with self.env.begin(write=True) as txn:
            job = self._load(txn, name)
            for st in studies:
                # a --studies Accession Number found nowhere has no UID: kept under "#" + it
                ident = st.study_instance_uid or (f"#{st.accession_number}" if st.accession_number else "")
                if not ident:
                    continue
                ukey = prefix + ident.encode()
                if txn.get(ukey, db=self._stuid) is not None:
                    continue
                seq = job["seq"]
                job["seq"] = seq + 1
                new = replace(st)
                new.seq, new.updated_at = seq, now
                txn.put(ukey, _U64.pack(seq), db=self._stuid)
                self._put(txn, name, job, None, new)
                added += 1
            if progress is not None:
                job["inv"] = dict(progress)
            self._save(txn, name, job, now)
        return added

    def save_inventory_progress(self, name: str, progress: Mapping[str, Any]) -> None:
        self.add_studies(name, (), progress)

    def inventory_done(self, name: str, now: float | None = None) -> JobState:
        """The inventory finished: inventory -> running (a paused/cancelled job keeps its state,
        and resume then goes to running). Idempotent."""
        now = time.time() if now is None else now
        with self.env.begin(write=True) as txn:
            job = self._load(txn, name)
            if not job["inv_done"] or job["state"] == JobState.INVENTORY:
                job["inv_done"] = True
                if job["state"] == JobState.INVENTORY:
                    job["state"] = str(JobState.RUNNING)
                self._save(txn, name, job, now)
            return JobState(job["state"])

    def set_window(self, name: str, inside: bool) -> JobState:
        """running <-> waiting-window as the runner sees the time windows; other states unchanged."""
        with self.env.begin(write=True) as txn:
            job = self._load(txn, name)
            state = JobState(job["state"])
            to = {(JobState.RUNNING, False): JobState.WAITING_WINDOW,
                  (JobState.WAITING_WINDOW, True): JobState.RUNNING}.get((state, inside))
            if to is not None:
                job["state"] = str(to)
                self._save(txn, name, job, time.time())
                return to
            return state

    def due(self, name: str, state: StudyState, limit: int, now: float | None = None) -> list[StudyRecord]:
        """Up to ``limit`` studies in ``state`` (not final) whose ``next_at`` <= now, earliest
        first then inventory order; from ``mwork`` (no scan of the inventory)."""
        code = _STATE_CODE.get(state)
        if code is None:
            raise JobError(f"studies in final state {state} are never due")
        now = time.time() if now is None else now
        prefix = self._prefix(name) + code + b"\x00"
        limit_ms = int(now * 1000)
        out: list[StudyRecord] = []
        with self.env.begin() as txn:
            self._load(txn, name)
            cur = txn.cursor(db=self._work)
            if not cur.set_range(prefix):
                return out
            for key in cur.iternext(keys=True, values=False):
                if len(out) >= limit or not key.startswith(prefix):
                    break
                at_ms, seq = _WORK.unpack(key[len(prefix):])
                if at_ms > limit_ms:
                    break
                st = self._get(txn, name, seq)
                if st is not None:
                    out.append(st)
        return out

    def next_due(self, name: str, states: Iterable[StudyState] | None = None) -> float | None:
        """The earliest ``next_at`` among studies in ``states`` (default: every non-final
        state); None when there is none. For the runner's sleep."""
        best: float | None = None
        with self.env.begin() as txn:
            self._load(txn, name)
            cur = txn.cursor(db=self._work)
            for state in (states if states is not None else _STATE_CODE):
                code = _STATE_CODE.get(StudyState(state))
                if code is None:
                    continue
                prefix = self._prefix(name) + code + b"\x00"
                if cur.set_range(prefix) and bytes(cur.key()).startswith(prefix):
                    at = _WORK.unpack(bytes(cur.key())[len(prefix):])[0] / 1000.0
                    best = at if best is None else min(best, at)
        return best

    def in_state(self, name: str, state: StudyState, limit: int) -> list[StudyRecord]:
        """Up to ``limit`` studies in ``state`` (failed, or any non-final one), in inventory order
        for failed ones; from ``mwork``, without a scan of the inventory."""
        code = _STATE_CODE.get(state) or _LISTED_CODE.get(state)
        if code is None:
            raise JobError(f"studies in state {state} are not indexed; use report()")
        prefix = self._prefix(name) + code + b"\x00"
        out: list[StudyRecord] = []
        with self.env.begin() as txn:
            self._load(txn, name)
            cur = txn.cursor(db=self._work)
            if not cur.set_range(prefix):
                return out
            for key in cur.iternext(keys=True, values=False):
                if len(out) >= limit or not bytes(key).startswith(prefix):
                    break
                st = self._get(txn, name, _WORK.unpack(bytes(key)[len(prefix):])[1])
                if st is not None:
                    out.append(st)
        return out

    def count(self, name: str, state: StudyState) -> int:
        """Studies in ``state`` (from the totals)."""
        with self.env.begin() as txn:
            n: int = self._load(txn, name)["by"].get(state, 0)
            return n

    def _modify(self, name: str, study: StudyRef, now: float | None,
                change: Any) -> Any:
        """Read a study, let ``change(txn, job, new)`` edit a copy, write it back with totals."""
        now = time.time() if now is None else now
        with self.env.begin(write=True) as txn:
            job = self._load(txn, name)
            old = self._need(txn, name, study)
            new = replace(old)
            result = change(txn, job, new)
            if new != old:
                new.updated_at = now
                self._put(txn, name, job, old, new)
                if new.received != old.received:
                    self._sample(job, now)
                self._save(txn, name, job, now)
            return new if result is None else result

    def set_instances(self, name: str, study: StudyRef, instances: Sequence[InstanceRecord], *,
                      state: StudyState | None = StudyState.LISTED,
                      source_instances: int | None = None, now: float | None = None) -> StudyRecord:
        """The source's listing of a study (SERIES/IMAGE-level C-FIND): replaces ``minst``
        (received/delivered/found flags of instances listed again are kept), sets
        ``source_instances`` (``len(instances)``, or ``source_instances`` for a counts-only
        listing) and ``state``; totals follow. Zero instances is allowed (the runner fails it).

        Received instances the new listing lacks are kept (they arrived; they still count)."""
        def change(txn: lmdb.Transaction, job: dict[str, Any], st: StudyRecord) -> None:
            if st.state in FINAL_STUDY_STATES and state is not None and state not in FINAL_STUDY_STATES:
                raise JobError(f"study {st.study_instance_uid} of job {name} is {st.state}: "
                               "retry first")
            old = {r.sop_instance_uid: r for r in self._iter_inst(txn, name, st.seq)}
            prefix = self._inst_prefix(name, st.seq)
            for sop in old:
                txn.delete(prefix + sop.encode(), db=self._inst)
            merged: dict[str, InstanceRecord] = {}
            for r in instances:
                prev = old.pop(r.sop_instance_uid, None)
                if prev is not None:
                    r = InstanceRecord(r.sop_instance_uid, r.series_instance_uid or prev.series_instance_uid,
                                       r.sop_class_uid or prev.sop_class_uid, prev.oid, prev.digest,
                                       prev.delivered, prev.found, prev.received, prev.conflict)
                merged[r.sop_instance_uid] = r
            for sop, prev in old.items():
                if prev.received:
                    merged[sop] = prev
            for sop, r in merged.items():
                txn.put(prefix + sop.encode(), _encode_inst(r), db=self._inst)
            st.source_instances = len(instances) if source_instances is None else source_instances
            st.received = sum(1 for r in merged.values() if r.received)
            st.delivered = sum(1 for r in merged.values() if r.delivered)
            st.conflicts = sum(1 for r in merged.values() if r.conflict)
            if state is not None:
                st.state = state
        result: StudyRecord = self._modify(name, study, now, change)
        return result

    def mark_received(self, name: str, study: StudyRef, received: Mapping[str, int], *,
                      digests: Mapping[str, str] | None = None, now: float | None = None) -> list[str]:
        """Instances spooled for this job: {SOP Instance UID: spool oid}. Each counts once
        however often it is replayed; an instance the listing lacked is added. With ``digests``,
        an instance received again with a different digest is NOT overwritten: its SOP UID is
        returned (the caller reports it) and the study's ``conflicts`` grows. Feeds ``rate``."""
        conflicts: list[str] = []

        def change(txn: lmdb.Transaction, job: dict[str, Any], st: StudyRecord) -> list[str]:
            prefix = self._inst_prefix(name, st.seq)
            for sop, oid in received.items():
                key = prefix + sop.encode()
                raw = txn.get(key, db=self._inst)
                rec = _decode_inst(sop, raw) if raw is not None else InstanceRecord(sop)
                digest = (digests or {}).get(sop, "")
                if rec.received:
                    if rec.oid == oid or not digest or not rec.digest or digest == rec.digest:
                        continue
                    if not rec.conflict:
                        rec.conflict = True
                        st.conflicts += 1
                    conflicts.append(sop)
                else:
                    rec.received, rec.oid, rec.digest = True, oid, digest
                    st.received += 1
                txn.put(key, _encode_inst(rec), db=self._inst)
            return conflicts
        result: list[str] = self._modify(name, study, now, change)
        return result

    def mark_delivered(self, name: str, study: StudyRef, sop_uids: Iterable[str],
                       now: float | None = None) -> StudyRecord:
        """Instances delivered to every destination of the job (idempotent; SOP UIDs not
        received for this study are ignored)."""
        def change(txn: lmdb.Transaction, job: dict[str, Any], st: StudyRecord) -> None:
            prefix = self._inst_prefix(name, st.seq)
            for sop in sop_uids:
                key = prefix + sop.encode()
                raw = txn.get(key, db=self._inst)
                if raw is None:
                    continue
                rec = _decode_inst(sop, raw)
                if rec.delivered or not rec.received:
                    continue
                rec.delivered = True
                st.delivered += 1
                txn.put(key, _encode_inst(rec), db=self._inst)
        result: StudyRecord = self._modify(name, study, now, change)
        return result

    def mark_found(self, name: str, study: StudyRef, sop_uids: Iterable[str] | None = None, *,
                   count: int | None = None, now: float | None = None) -> StudyRecord:
        """A verification's result: the SOP UIDs the destination's IMAGE-level C-FIND found
        (exactly these are flagged ``found``; ``found_at_destination`` = how many of the listed
        ones), or only ``count`` (STUDY-level NumberOfStudyRelatedInstances)."""
        if (sop_uids is None) == (count is None):
            raise ValueError("mark_found takes either sop_uids or count")
        found_set = None if sop_uids is None else set(sop_uids)

        def change(txn: lmdb.Transaction, job: dict[str, Any], st: StudyRecord) -> None:
            if found_set is None:
                st.found_at_destination = count
                return
            prefix = self._inst_prefix(name, st.seq)
            n = 0
            for rec in list(self._iter_inst(txn, name, st.seq)):
                hit = rec.sop_instance_uid in found_set
                n += hit
                if hit != rec.found:
                    rec.found = hit
                    txn.put(prefix + rec.sop_instance_uid.encode(), _encode_inst(rec), db=self._inst)
            st.found_at_destination = n
        result: StudyRecord = self._modify(name, study, now, change)
        return result

    def update_study(self, name: str, study: StudyRef, *, state: StudyState | None = None,
                     reason: str | None = None, next_at: float | None = None,
                     attempts: int | None = None, verify_attempts: int | None = None,
                     add_attempt: bool = False, add_verify_attempt: bool = False,
                     now: float | None = None) -> StudyRecord:
        """Change a study's state/reason/next_at/attempts (None: unchanged); ``mwork`` and the
        totals follow in the same transaction. Leaving a final state is for :meth:`retry`
        only (JobError otherwise)."""
        def change(txn: lmdb.Transaction, job: dict[str, Any], st: StudyRecord) -> None:
            if state is not None and state != st.state:
                if st.state in FINAL_STUDY_STATES:
                    raise JobError(f"study {st.study_instance_uid} of job {name} is {st.state}; "
                                   f"it becomes {state} only by retry")
                st.state = state
            if reason is not None:
                st.reason = reason
            if next_at is not None:
                st.next_at = next_at
            if attempts is not None:
                st.attempts = attempts
            if verify_attempts is not None:
                st.verify_attempts = verify_attempts
            st.attempts += add_attempt
            st.verify_attempts += add_verify_attempt
        result: StudyRecord = self._modify(name, study, now, change)
        return result

    def missing(self, name: str, study: StudyRef, of: MissingOf = "received") -> list[InstanceRecord]:
        """Listed instances not yet received (or delivered, or found at the destination)."""
        if of not in ("received", "delivered", "found"):
            raise ValueError(f"missing(of={of!r}): received, delivered or found")
        with self.env.begin() as txn:
            self._load(txn, name)
            st = self._need(txn, name, study)
            return [r for r in self._iter_inst(txn, name, st.seq) if not getattr(r, of)]

    def set_error(self, name: str, text: str) -> None:
        """The job-level problem ``status`` shows (source down, 0xA801 ...); "" clears it."""
        with self.env.begin(write=True) as txn:
            job = self._load(txn, name)
            if job["err"] != text:
                job["err"] = text
                self._save(txn, name, job, time.time())

    def finish(self, name: str, now: float | None = None) -> JobState:
        """Every study final: done (none failed) or done-with-errors; JobError while studies
        remain unfinished or the inventory runs. Idempotent (a finished or cancelled job keeps
        its state)."""
        now = time.time() if now is None else now
        with self.env.begin(write=True) as txn:
            job = self._load(txn, name)
            state = JobState(job["state"])
            if state in _FINAL_JOB:
                return state
            by: dict[str, int] = job["by"]
            left = sum(n for s, n in by.items() if StudyState(s) not in FINAL_STUDY_STATES)
            if not job["inv_done"] or left:
                raise JobError(f"job {name} cannot finish: "
                               + ("its inventory is not done" if not job["inv_done"]
                                  else f"{left} studies are not finished"))
            to = JobState.DONE_WITH_ERRORS if by.get(StudyState.FAILED, 0) else JobState.DONE
            job["state"] = str(to)
            self._save(txn, name, job, now)
            return to


__all__ = ["JobState", "StudyState", "FINAL_STUDY_STATES", "Window", "JobSpec", "JobStatus",
           "REPORT_COLUMNS", "StudyRecord", "InstanceRecord", "JobError", "Jobs", "StudyRef",
           "MissingOf", "parse_rate", "in_windows"]
