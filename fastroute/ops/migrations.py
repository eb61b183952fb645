"""Operator views and actions over migration jobs (issue 13), shared by the CLI and the REST API.

Like :mod:`.actions`: one implementation per action, so ``fastroute migrate pause`` and
``POST /api/migrations/{name}/pause`` cannot drift apart. Each function validates against the
configuration, acts on the job through :mod:`fastroute.spool.jobs` only (ops never runs a job:
the migration process does, and reads what these functions wrote), audits the change and
returns plain JSON-ready data. Reports are streamed: a 1,000,000-study report is written row
by row, never built in memory.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Generator, Iterable, Iterator, Mapping, Sequence, TextIO

from fastroute.config import Config
from fastroute.ops.actions import BadRequest, Conflict, NotFound
from fastroute.spool import Spool
from fastroute.spool.audit import whoami
from fastroute.spool.wakeup import MIGRATION, Notifier
from fastroute.spool.jobs import (FINAL_STUDY_STATES, REPORT_COLUMNS, JobError, Jobs, JobSpec, JobState,
                                  StudyRecord, StudyState, Window)
from fastroute.spool.jobs import parse_rate as jobs_parse_rate

log = logging.getLogger("fastroute.ops.migrations")

# Study Root C-FIND keys an operator may give at STUDY level (PS3.4 C.6.2.1.2: the study's and,
# in the Study Root model, the patient's attributes). A SERIES/IMAGE key here would match
# nothing the archive answers at STUDY level, so it is refused rather than silently ignored.
STUDY_QUERY_KEYS = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDs",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyInstanceUID", "ModalitiesInStudy",
    "SOPClassesInStudy", "ReferringPhysicianName", "StudyDescription", "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight", "Occupation",
    "AdditionalPatientHistory",
})
# A studies CSV's column, by its header (lower case, spaces and '_' removed): UIDs preferred.
STUDIES_HEADERS = {"studyinstanceuid": 0, "studyuid": 0, "study": 0, "uid": 0,
                   "accessionnumber": 1, "accession": 1, "accessionno": 1}
FINAL_JOB_STATES = frozenset({JobState.DONE, JobState.DONE_WITH_ERRORS, JobState.CANCELLED})
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
REPORT_BATCH = 500               # rows per chunk of a streamed report


def jobs_of(spool: Spool) -> Jobs:
    """The spool's job store (one per Spool, opened with it)."""
    return spool.jobs


# -- parsing what an operator typed -------------------------------------------------------------

def parse_rate(text: str | None) -> tuple[float | None, float | None]:
    """``--rate 600/h`` (studies per hour) or ``20/s`` / ``1200/min`` (instances per second)."""
    if text is None or text == "":
        return None, None
    try:
        return jobs_parse_rate(str(text))
    except ValueError as exc:
        raise BadRequest(f"bad rate {text!r}: {exc}",
                         hint="studies per hour (e.g. 600/h) or instances per second (e.g. 20/s)") from None


def parse_windows(texts: Iterable[str]) -> tuple[Window, ...]:
    """Each ``[DAYS ]HH:MM-HH:MM``; a days-only item (``sat,sun`` typed unquoted, so the shell
    split it from its span) is joined to the span after it."""
    items: list[str] = []
    pending = ""
    for text in (str(t).strip() for t in texts):
        if text and ":" not in text:
            pending = f"{pending},{text}" if pending else text
            continue
        items.append(f"{pending} {text}" if pending else text)
        pending = ""
    if pending:
        items.append(pending)          # days without a span: Window.parse says what is missing
    out = []
    for text in items:
        try:
            out.append(Window.parse(text))
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"bad window {text!r}: {exc}",
                             hint="HH:MM-HH:MM local time (19:00-07:00 crosses midnight), optionally "
                                  "after days: 'sat,sun 00:00-24:00'") from None
    return tuple(out)


def parse_query(pairs: Iterable[str] | Mapping[str, Any]) -> dict[str, str]:
    """``KEY=VALUE`` pairs (or a mapping) -> STUDY-level C-FIND keys, keywords checked."""
    from pydicom.datadict import dictionary_has_tag, tag_for_keyword

    items: list[tuple[str, str]] = []
    if isinstance(pairs, Mapping):
        items = [(str(k), "" if v is None else str(v)) for k, v in pairs.items()]
    else:
        for pair in pairs:
            key, sep, value = str(pair).partition("=")
            if not sep or not key.strip():
                raise BadRequest(f"bad query {pair!r}: give KEY=VALUE with a DICOM keyword, "
                                 "e.g. StudyDate=20190101-20191231")
            items.append((key.strip(), value.strip()))
    out: dict[str, str] = {}
    for key, value in items:
        if key not in STUDY_QUERY_KEYS:
            tag = tag_for_keyword(key)
            if tag is not None and dictionary_has_tag(tag):
                raise BadRequest(f"query key {key} is not a STUDY-level key: a migration's inventory asks "
                                 "the source at STUDY level", hint="study-level keys include StudyDate, "
                                 "ModalitiesInStudy, PatientID, AccessionNumber, StudyDescription")
            close = difflib.get_close_matches(key, sorted(STUDY_QUERY_KEYS), n=1)
            raise BadRequest(f"query key {key!r} is not a DICOM keyword"
                             + (f" (did you mean {close[0]}?)" if close else ""))
        if key in out:
            raise BadRequest(f"query key {key} given twice")
        out[key] = value
    return out


def read_studies(path: str | Path) -> tuple[str, ...]:
    """A studies file: one Study Instance UID or Accession Number a line, or CSV with a header
    naming the column (StudyInstanceUID / AccessionNumber). Blank lines and '#' lines skipped."""
    p = Path(path)
    try:
        f = p.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise BadRequest(f"studies file {p}: cannot read: {exc.strerror}") from None
    out: list[str] = []
    with f:
        try:
            first = ""
            for line in f:
                if line.strip() and not line.lstrip().startswith("#"):
                    first = line
                    break
            head = [re.sub(r"[\s_]", "", c.lower()) for c in next(csv.reader([first]))] if first else []
            named = sorted((STUDIES_HEADERS[c], i) for i, c in enumerate(head) if c in STUDIES_HEADERS)
            column = named[0][1] if named else None
            if column is not None:
                for row in csv.reader(f):
                    if len(row) > column and row[column].strip():
                        out.append(row[column].strip())
            else:
                if "," in first:
                    raise BadRequest(f"studies file {p}: CSV without a header naming its column",
                                     hint="first row: StudyInstanceUID or AccessionNumber")
                for line in ([first] if first else []) + list(f):
                    value = line.strip()
                    if value and not value.startswith("#"):
                        out.append(value)
        except UnicodeDecodeError:
            raise BadRequest(f"studies file {p}: not UTF-8 text") from None
    if not out:
        raise BadRequest(f"studies file {p}: lists no study",
                         hint="one Study Instance UID or Accession Number a line")
    return tuple(dict.fromkeys(out))


def _job_name(name: str) -> str:
    if name and not _NAME_RE.fullmatch(name):
        raise BadRequest(f"bad job name {name!r}: letters, digits, '_', '.', '-' (max 64), starting "
                         "with a letter or digit")
    return name


# -- views --------------------------------------------------------------------------------------

def _known(jobs: Jobs, name: str) -> None:
    if name not in jobs.names():
        known = ", ".join(jobs.names()[:20]) or "none yet"
        raise NotFound(f"unknown migration job {name!r} (jobs: {known})",
                       hint="`fastroute migrate list` shows the jobs")


def job_view(jobs: Jobs, name: str, now: float | None = None) -> dict[str, Any]:
    """``status --json``: the job's status, and what it was asked for."""
    _known(jobs, name)
    doc = jobs.status(name, now).to_json()
    spec = jobs.spec(name)
    doc.setdefault("verify", spec.verify)
    doc.setdefault("windows", [str(w) for w in spec.windows])
    doc.setdefault("rate_limit", (f"{spec.rate_studies_per_hour:g}/h" if spec.rate_studies_per_hour
                                  else f"{spec.rate_instances_per_s:g}/s" if spec.rate_instances_per_s else ""))
    doc.setdefault("query", dict(spec.query))
    doc.setdefault("studies_listed", len(spec.studies))
    return doc


def list_jobs(spool: Spool, now: float | None = None) -> list[dict[str, Any]]:
    jobs = jobs_of(spool)
    return [job_view(jobs, n, now) for n in jobs.names()]


def status(spool: Spool, name: str, now: float | None = None) -> dict[str, Any]:
    return job_view(jobs_of(spool), name, now)


def failures(spool: Spool, name: str, limit: int = 50) -> list[dict[str, Any]]:
    """The job's failed studies with their reasons, in inventory order (from the job's index
    of failed studies: a million-study job's are listed without reading its inventory)."""
    jobs = jobs_of(spool)
    _known(jobs, name)
    return [rec.report_row() for rec in jobs.in_state(name, StudyState.FAILED, limit)]


def report_rows(spool: Spool, name: str) -> Iterator[dict[str, Any]]:
    jobs = jobs_of(spool)
    _known(jobs, name)
    return (_row(rec) for rec in jobs.report(name))


def _row(rec: StudyRecord) -> dict[str, Any]:
    row = rec.report_row()
    return {k: row.get(k) for k in REPORT_COLUMNS}


def report_chunks(spool: Spool, name: str, fmt: str = "csv") -> Generator[str, None, None]:
    """The report as text chunks of REPORT_BATCH rows: CSV with its header, or a JSON list."""
    if fmt not in ("csv", "json"):
        raise BadRequest(f"unknown report format {fmt!r} (csv or json)")
    rows = report_rows(spool, name)   # NotFound now, before the first chunk is sent

    def chunks() -> Generator[str, None, None]:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if fmt == "csv":
            writer.writerow(REPORT_COLUMNS)
        else:
            buf.write("[")
        n = 0
        for row in rows:
            if fmt == "csv":
                writer.writerow(["" if row[k] is None else row[k] for k in REPORT_COLUMNS])
            else:
                buf.write(("," if n else "") + "\n" + json.dumps(row, ensure_ascii=False))
            n += 1
            if n % REPORT_BATCH == 0:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        if fmt == "json":
            buf.write("\n]\n" if n else "]\n")
        yield buf.getvalue()
    return chunks()


def write_report(spool: Spool, name: str, out: TextIO, fmt: str = "csv") -> None:
    for chunk in report_chunks(spool, name, fmt):
        out.write(chunk)


# -- actions ------------------------------------------------------------------------------------

def start(cfg: Config, spool: Spool, *, source: str, destinations: Sequence[str], name: str = "",
          query: Iterable[str] | Mapping[str, Any] = (), studies: Sequence[str] = (),
          studies_file: str | None = None, rate: str | None = None, windows: Sequence[str] = (),
          verify: bool = True, who: str | None = None, why: str = "",
          now: float | None = None) -> dict[str, Any]:
    """Validate a migration against the configuration and create it in the spool (state
    ``inventory``): the migration process picks it up from there."""
    if source not in cfg.sources:
        known = ", ".join(sorted(cfg.sources)) or "none configured"
        raise NotFound(f"unknown source {source!r} (configured: {known})",
                       hint="add the archive under 'sources:' in the configuration")
    dests = list(dict.fromkeys(destinations))
    if not dests:
        raise BadRequest("name at least one destination (--to DEST)")
    for d in dests:
        if d not in cfg.destinations:
            known = ", ".join(sorted(cfg.destinations)) or "none configured"
            raise NotFound(f"unknown destination {d!r} (configured: {known})",
                           hint="check the name, or the 'destinations:' section of the configuration")
    if verify:
        cannot = [d for d in dests if not cfg.destinations[d].query]
        if cannot:
            raise BadRequest(f"cannot verify at {', '.join(cannot)}: no 'query: true' in its configuration "
                             "(verification asks the destination by C-FIND)",
                             hint="set query: true on the destination if it answers C-FIND, or start "
                                  "with --no-verify (studies then end 'delivered', not 'verified')")
    keys = parse_query(query)
    listed = tuple(dict.fromkeys(str(s).strip() for s in studies if str(s).strip()))
    if studies_file:
        listed = tuple(dict.fromkeys(listed + read_studies(studies_file)))
    per_hour, per_s = parse_rate(rate)
    spec = JobSpec(name=_job_name(name), source=source, destinations=tuple(dests), query=keys, studies=listed,
                   rate_studies_per_hour=per_hour, rate_instances_per_s=per_s, windows=parse_windows(windows),
                   verify=verify, created_at=time.time() if now is None else now, created_by=who or whoami())
    jobs = jobs_of(spool)
    try:
        created = jobs.create(spec)
    except JobError as exc:
        raise Conflict(str(exc), hint="choose another --name, or `fastroute migrate list`") from None
    _wake(spool)
    spool.audit_record("migration_start", who=who, why=why, job=created, source=source,
                       destinations=dests, query=keys, studies=len(listed), rate=rate or "",
                       windows=[str(w) for w in spec.windows], verify=verify)
    what = (f"{len(listed)} listed stud{'y' if len(listed) == 1 else 'ies'}" if listed else "") + \
        (f"{' matching ' if listed else 'studies matching '}{keys}" if keys else "")
    log.info("migration %s started by %s: source=%s (AE %s) -> %s: %s", created, who or whoami(), source,
             cfg.sources[source].ae_title, ", ".join(dests), what or "the whole archive")
    return job_view(jobs, created, now)


def _wake(spool: Spool) -> None:
    """Tell the migration process a job changed, so it acts now rather than at its next poll
    (fire and forget: a router that is not running finds the job when it starts)."""
    try:
        notifier = Notifier(spool.path)
    except OSError:
        return
    try:
        notifier.notify(MIGRATION)
    finally:
        notifier.close()


def _act(spool: Spool, name: str, verb: str) -> tuple[Jobs, Any]:
    jobs = jobs_of(spool)
    _known(jobs, name)
    try:
        result = getattr(jobs, verb)(name)
    except JobError as exc:
        raise Conflict(f"cannot {verb} migration {name}: {exc}") from None
    _wake(spool)
    return jobs, result


def pause(spool: Spool, name: str, *, who: str | None = None, why: str = "") -> dict[str, Any]:
    return _change(spool, name, "pause", who, why)


def resume(spool: Spool, name: str, *, who: str | None = None, why: str = "") -> dict[str, Any]:
    return _change(spool, name, "resume", who, why)


def cancel(spool: Spool, name: str, *, who: str | None = None, why: str = "") -> dict[str, Any]:
    return _change(spool, name, "cancel", who, why)


def _change(spool: Spool, name: str, verb: str, who: str | None, why: str) -> dict[str, Any]:
    jobs, st = _act(spool, name, verb)
    spool.audit_record(f"migration_{verb}", who=who, why=why, job=name, state=str(st.state))
    done = {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}[verb]
    log.info("migration %s %s by %s%s: now %s", name, done, who or whoami(), f" ({why})" if why else "", st.state)
    return job_view(jobs, name)


def retry(spool: Spool, name: str, *, who: str | None = None, why: str = "") -> dict[str, Any]:
    """Failed and incomplete studies again; how many, and the job's status."""
    jobs, count = _act(spool, name, "retry")
    spool.audit_record("migration_retry", who=who, why=why, job=name, count=int(count))
    log.info("migration %s: %d failed or incomplete stud%s queued again by %s%s", name, count,
             "y" if count == 1 else "ies", who or whoami(), f" ({why})" if why else "")
    doc = job_view(jobs, name)
    doc["retried"] = int(count)
    return doc


def study_outcome(spool: Spool, name: str, study_instance_uid: str) -> dict[str, Any] | None:
    """One study's report row (``retrieve --wait``), None while the inventory has not found it."""
    rec = jobs_of(spool).study(name, study_instance_uid)
    return None if rec is None else _row(rec)


def is_final(state: str) -> bool:
    return state in FINAL_JOB_STATES


def retrieve(cfg: Config, spool: Spool, *, source: str, study_instance_uid: str, destinations: Sequence[str],
             verify: bool = True, who: str | None = None, why: str = "",
             now: float | None = None) -> dict[str, Any]:
    """``fastroute retrieve``: a one-study job named ``retrieve-<yyyymmdd-hhmmss>`` (a suffix
    when two start in the same second)."""
    uid = study_instance_uid.strip()
    if not uid:
        raise BadRequest("name the study to retrieve (--study UID)")
    now = time.time() if now is None else now
    stem = "retrieve-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    taken = set(jobs_of(spool).names())
    name = next(n for n in (stem if i == 1 else f"{stem}-{i}" for i in range(1, 10**6)) if n not in taken)
    return start(cfg, spool, source=source, destinations=destinations, name=name, studies=[uid],
                 verify=verify, who=who, why=why or f"retrieve study {uid}", now=now)


__all__ = ["jobs_of", "parse_rate", "parse_windows", "parse_query", "read_studies", "list_jobs", "status",
           "failures", "report_rows", "report_chunks", "write_report", "start", "pause", "resume", "cancel",
           "retry", "retrieve", "study_outcome", "is_final", "STUDY_QUERY_KEYS", "FINAL_JOB_STATES", "FINAL_STUDY_STATES"]
