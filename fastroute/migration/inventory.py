"""The STUDY-level inventory of a migration: what the source holds, written into the spool.

Archives cap or time out large C-FIND answers, so the inventory never asks for "everything":
it walks the job's StudyDate range (or the whole archive, 18000101 to 99991231) and splits any
range whose answer reaches ``source.max_results`` matches, times out (``source.query_timeout``)
or is refused for lack of resources (0xA700): date ranges are halved, a single day still too
large is split by StudyTime (and said so in the job's error). Studies whose StudyDate is empty
match no range: they are asked for by empty-value matching (PS3.4 C.2.2.2.1, the value ``""``),
and where the answer does not show that the source honours it (refused, capped, dated matches,
or no match at all, which may mean ``""`` was taken literally), by one undated query with no
other key, keeping the empty-date matches: complete unless it too is capped. Then by undated
queries split by the first characters of PatientID, then of PatientName (keeping those without
a PatientID), of AccessionNumber (without either), then by ModalitiesInStudy (without any of
the three): each pass finds what the passes before it could not (their cost: about one more
pass over the archive each). A study with none of these keys can only come in the capped
undated answer: the job's notes then say the inventory may be incomplete, with the count.

Bounded memory: matches are written to the spool in batches as they arrive (duplicates across
overlapping answers are dropped there, by Study Instance UID); what is held is one batch and a
stack of pending ranges (its depth grows with the log of the range). The progress (pending
ranges, phase, position in a ``--studies`` list) is saved in the job record in the same
transaction as the batch that completes a range, so ``kill -9`` resumes, not restarts.

:func:`list_study` lists one study's instances (SERIES, then IMAGE level) for the runner.
"""
from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from fastroute.config import SourceConfig
from fastroute.dicom.qr import Level, QueryFailed
from fastroute.logsetup import fields
from fastroute.spool.jobs import InstanceRecord, Jobs, JobSpec, JobState, StudyRecord, StudyState

log = logging.getLogger(__name__)

# The whole archive, as dates go: modality clocks put studies decades off either way (a
# 1899 default, a 2036 typo, a study scheduled ahead), and a range ending "tomorrow" would
# never find them. The halving costs one empty answer per level for the unused years.
FIRST_DATE = dt.date(1800, 1, 1)
LAST_DATE = dt.date(9999, 12, 31)
BATCH = 500                      # studies per spool transaction
MAX_NOTES = 20                   # job-error notes kept in the progress (bounded)
# the fallback for sources without empty-value matching: PatientID prefixes, one character more
# each time an answer is still too large (a PatientID starting with another character, or
# empty, is found only by empty-value matching)
PATIENT_ID_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_."
MAX_PREFIX = 16
# the undated passes, in order: each keeps the undated studies whose earlier keys are empty
FALLBACK_KEYS = ("PatientID", "PatientName", "AccessionNumber")
# the last undated pass, for studies with none of FALLBACK_KEYS: one query per modality
MODALITIES = ("CT", "MR", "CR", "DX", "US", "XA", "RF", "MG", "NM", "PT", "OT", "SC", "SR", "KO", "PR",
              "SEG", "DOC", "ES", "XC", "IO", "PX", "OP", "OPT", "SM", "ECG", "HD", "AU", "BMD", "IVUS",
              "OCT", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTIMAGE", "RTRECORD", "PLAN", "M3D", "LS", "GM")
OUT_OF_RESOURCES = 0xA700
STUDY_RETURN_KEYS = ("StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "StudyTime",
                     "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)+")
NOT_FOUND = "not found at source"
EMPTY_VALUE = '""'               # empty-value matching (PS3.4 C.2.2.2.1)


class InventoryInterrupted(Exception):
    """The inventory stopped before it was complete (router stopping, job paused or
    cancelled): the job's inventory is NOT done; its progress is kept for the next run."""


class FindClient(Protocol):
    """What the inventory needs of :class:`fastroute.dicom.qr.QueryRetrieveClient`."""

    def find(self, level: Level, identifier: Dataset | Mapping[str, Any], *,
             timeout: float | None = None) -> Iterator[Dataset]: ...


class Listing(list[InstanceRecord]):
    """One study's instances as the source lists them. ``counts_only``: the source has no
    IMAGE level, so the list is empty and ``source_instances`` is the sum of its series'
    NumberOfSeriesRelatedInstances (or the study's NumberOfStudyRelatedInstances)."""

    __slots__ = ("source_instances", "counts_only")

    def __init__(self, items: Iterable[InstanceRecord] = (), *, source_instances: int | None = None,
                 counts_only: bool = False) -> None:
        super().__init__(items)
        self.source_instances = len(self) if source_instances is None else source_instances
        self.counts_only = counts_only


# -- values -----------------------------------------------------------------------------------

def _text(ds: Dataset | Mapping[str, Any], keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset | Mapping[str, Any], keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def study_record(ds: Dataset | Mapping[str, Any], state: StudyState = StudyState.PENDING) -> StudyRecord | None:
    """A STUDY-level match as an inventory row (None without a Study Instance UID)."""
    uid = _text(ds, "StudyInstanceUID")
    if not uid:
        return None
    return StudyRecord(seq=-1, study_instance_uid=uid, patient_id=_text(ds, "PatientID"),
                       accession_number=_text(ds, "AccessionNumber"), study_date=_text(ds, "StudyDate"),
                       modalities=_text(ds, "ModalitiesInStudy"),
                       source_instances=_int(ds, "NumberOfStudyRelatedInstances"), state=state)


def _ymd(d: dt.date) -> str:
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"     # strftime's %Y is not zero-padded everywhere


def _date(text: str) -> dt.date:
    return dt.datetime.strptime(text, "%Y%m%d").date()


def date_bounds(value: str | None, today: dt.date) -> tuple[dt.date, dt.date]:
    """The inclusive range a StudyDate key names (``A-B``, ``A-``, ``-B``, ``A``); none: the
    whole archive (FIRST_DATE to LAST_DATE: future dates included). ValueError naming the bad
    text. ``today`` is kept for callers; open ends no longer depend on it."""
    last = LAST_DATE
    if not value:
        return FIRST_DATE, last
    lo_text, dash, hi_text = value.strip().partition("-")
    try:
        lo = _date(lo_text) if lo_text else FIRST_DATE
        hi = (_date(hi_text) if hi_text else last) if dash else lo
    except ValueError:
        raise ValueError(f"bad StudyDate {value!r}: expected YYYYMMDD, YYYYMMDD-YYYYMMDD, "
                         "YYYYMMDD- or -YYYYMMDD") from None
    if hi < lo:
        raise ValueError(f"bad StudyDate {value!r}: the range ends before it starts")
    return lo, hi


def _hms(second: int) -> str:
    return f"{second // 3600:02d}{second // 60 % 60:02d}{second % 60:02d}"


def looks_like_uid(text: str) -> bool:
    return len(text) <= 64 and _UID_RE.fullmatch(text) is not None


# -- the inventory ----------------------------------------------------------------------------

class Inventory:
    """One job's inventory run; :func:`run_inventory` is the entry point.

    Progress (the job record's ``inv``): ``phase`` (studies, dates, empty, undated, fallback,
    modalities, done), ``todo`` (a stack of [first day, last day, first second, last second]
    still to ask; the seconds are None for whole days, -1 for the day's empty-StudyTime query),
    ``fbkey`` and ``fb`` (the undated pass's key, absent = PatientID, and its prefixes still to
    ask), ``mods`` (modalities still to ask), ``capped`` (how the unconstrained undated query
    ended when it was not complete, with its undated matches), ``next`` (position in the
    ``--studies`` list), ``queries``, ``notes``."""

    def __init__(self, client: FindClient, jobs: Jobs, name: str, spec: JobSpec, source: SourceConfig, *,
                 stop: threading.Event | None = None, batch: int = BATCH,
                 today: dt.date | None = None) -> None:
        self.client, self.jobs, self.name, self.spec, self.source = client, jobs, name, spec, source
        self.stop = stop
        self.batch = batch
        self.today = today or dt.date.today()
        self.added = 0
        self.kept = 0                # matches the last query kept
        base = {k: v for k, v in spec.query.items() if k not in ("StudyDate", "QueryRetrieveLevel")}
        self.keys: dict[str, Any] = {k: "" for k in STUDY_RETURN_KEYS}
        self.keys.update(base)
        self.progress: dict[str, Any] = dict(jobs.inventory_progress(name))

    # -- driving --------------------------------------------------------------------------------
    def _start(self) -> None:
        if self.progress.get("phase"):
            return
        if self.spec.studies:
            self.progress = {"phase": "studies", "next": 0}
        else:
            lo, hi = date_bounds(self.spec.query.get("StudyDate"), self.today)
            self.progress = {"phase": "dates", "todo": [[_ymd(lo), _ymd(hi), None, None]],
                             "dated": bool(self.spec.query.get("StudyDate"))}
        self.progress.update(queries=0, notes=[])
        self.jobs.save_inventory_progress(self.name, self.progress)

    def _stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def run(self) -> int:
        """Until the inventory is complete; how many studies were added. InventoryInterrupted
        when ``stop`` is set or the job leaves the ``inventory`` state (paused, cancelled)
        first: the progress is kept, and the next run continues from it."""
        self._start()
        t0 = time.monotonic()
        why = ""
        while self.progress["phase"] != "done":
            if self._stopped():
                why = "the router is stopping"
                break
            state = self.jobs.state(self.name)
            if state is not JobState.INVENTORY:
                why = f"the job is {state}"
                break
            step = {"studies": self._studies_step, "dates": self._dates_step,
                    "empty": self._empty_step, "undated": self._undated_step,
                    "fallback": self._fallback_step,
                    "modalities": self._modalities_step}[self.progress["phase"]]
            step()
        log.info("migration %s: inventory of %s %s: %d new studies, %d queries, %.1f s", self.name,
                 self.source.ae_title, f"interrupted ({why})" if why else "done",
                 self.added, self.progress.get("queries", 0), time.monotonic() - t0)
        if why:
            raise InventoryInterrupted(f"inventory of job {self.name} at {self.source.ae_title} interrupted: "
                                       f"{why}; it continues where it stopped")
        return self.added

    def _commit(self, studies: list[StudyRecord]) -> None:
        """The batch that completes a step, with the progress after it: one transaction. The
        progress lives in the job record, rewritten with every study update: once done, only
        its summary is kept."""
        if self.progress["phase"] == "done":
            for key in ("todo", "fb", "fbkey", "mods", "next"):
                self.progress.pop(key, None)
        self.added += self.jobs.add_studies(self.name, studies, progress=self.progress)

    def _note(self, text: str) -> None:
        notes: list[str] = self.progress.setdefault("notes", [])
        if text not in notes:
            notes.append(text)
            del notes[:-MAX_NOTES]
        log.warning("migration %s: %s", self.name, text)
        self.jobs.set_error(self.name, "inventory: " + "; ".join(notes[-3:]))

    # -- one query ----------------------------------------------------------------------------
    def _query(self, keys: Mapping[str, Any], keep: Callable[[StudyRecord, Dataset], bool] | None = None,
               level: Level = Level.STUDY) -> tuple[str, list[StudyRecord]]:
        """One C-FIND: full batches go to the spool as they come; returns how it ended (``ok``,
        ``capped``, ``timeout``, ``busy``) and the last, partial batch (the caller commits it
        with the progress). A capped answer is cancelled (closing the iterator)."""
        self.progress["queries"] = self.progress.get("queries", 0) + 1
        cap = self.source.max_results
        n = 0
        self.kept = 0
        buf: list[StudyRecord] = []
        answer: Iterator[Dataset] | None = None
        try:
            answer = self.client.find(level, identifier(keys), timeout=self.source.query_timeout)
            for ds in answer:
                n += 1
                rec = study_record(ds)
                if rec is not None and (keep is None or keep(rec, ds)):
                    self.kept += 1
                    buf.append(rec)
                    if len(buf) >= self.batch:
                        self.added += self.jobs.add_studies(self.name, buf)
                        buf = []
                if n >= cap:
                    return "capped", buf
        except QueryFailed as exc:
            if exc.status is not None and (exc.status & 0xFF00) == OUT_OF_RESOURCES:
                log.info("migration %s: %s out of resources after %d matches: splitting", self.name,
                         self.source.ae_title, n, extra=fields(status=exc.status))
                return "busy", buf
            if exc.status is None and exc.__cause__ is None and "timeout" in str(exc):
                log.info("migration %s: query to %s timed out after %d matches: splitting", self.name,
                         self.source.ae_title, n)
                return "timeout", buf
            raise
        finally:
            close = getattr(answer, "close", None)
            if close is not None:
                close()      # a capped answer: C-CANCEL and drain
        return "ok", buf

    # -- phases ---------------------------------------------------------------------------------
    def _dates_step(self) -> None:
        todo: list[list[Any]] = self.progress["todo"]
        if not todo:
            self.progress["phase"] = "done" if self.progress.get("dated") else "empty"
            self._commit([])
            return
        lo, hi, tlo, thi = todo[-1]
        keys = dict(self.keys)
        keys["StudyDate"] = lo if lo == hi else f"{lo}-{hi}"
        keep = None
        if tlo == -1:
            keys["StudyTime"] = EMPTY_VALUE
            keep = _no_time
        elif tlo is not None:
            keys["StudyTime"] = f"{_hms(tlo)}-{_hms(thi)}"
        outcome, rest = self._query(keys, keep)
        todo.pop()
        if outcome != "ok":
            todo.extend(self._split(lo, hi, tlo, thi, outcome))
        self._commit(rest)

    def _split(self, lo: str, hi: str, tlo: int | None, thi: int | None, why: str) -> list[list[Any]]:
        """The halves of a range whose answer was too large, the one to ask first LAST (a stack)."""
        if lo != hi:
            a, b = _date(lo), _date(hi)
            mid = a + dt.timedelta(days=(b - a).days // 2)
            return [[_ymd(mid + dt.timedelta(days=1)), hi, None, None], [lo, _ymd(mid), None, None]]
        if tlo is None:
            self._note(f"{self.source.ae_title} has more than {self.source.max_results} studies on "
                       f"{lo} ({why}): split by StudyTime")
            return [[lo, lo, -1, -1], [lo, lo, 43200, 86399], [lo, lo, 0, 43199]]
        if tlo == -1 or thi is None or thi <= tlo:
            self._note(f"{self.source.ae_title}: the studies of {lo} "
                       + ("without StudyTime" if tlo == -1 else f"at {_hms(tlo)}")
                       + f" still exceed one answer ({why}); some may be missing from the inventory")
            return []
        half = (tlo + thi) // 2
        return [[lo, lo, half + 1, thi], [lo, lo, tlo, half]]

    def _empty_step(self) -> None:
        """Studies with an empty StudyDate, by empty-value matching; the fallback when the
        source's answer shows it does not honour it (dated matches, capped, refused)."""
        keys = dict(self.keys)
        keys["StudyDate"] = EMPTY_VALUE
        honoured = True

        def keep(rec: StudyRecord, ds: Dataset) -> bool:
            nonlocal honoured
            if rec.study_date:
                honoured = False
            return not rec.study_date
        try:
            outcome, rest = self._query(keys, keep)
        except QueryFailed as exc:
            log.info("migration %s: %s refused empty-value matching on StudyDate (%s): "
                     "falling back to PatientID prefixes", self.name, self.source.ae_title, exc,
                     extra=fields(status=exc.status))
            outcome, rest, honoured = "refused", [], False
        if outcome == "ok" and honoured and self.kept:
            self.progress["phase"] = "done"
        else:
            # no match at all is ambiguous: no undated study, or "" taken literally (as some
            # archives do); only the fallback can tell, and completeness is the point
            log.info("migration %s: %s: empty-value matching on StudyDate not usable (%s): one "
                     "undated query", self.name, self.source.ae_title,
                     outcome if outcome != "ok" else "dated matches" if not honoured else "no match")
            self.progress["phase"] = "undated"
        self._commit(rest)

    def _passes(self) -> list[str]:
        """The undated passes' keys: those the job's own query does not constrain (a prefix
        would replace its value, and a key it constrains is never empty in its studies)."""
        return [k for k in FALLBACK_KEYS if not self.keys.get(k)]

    def _undated_step(self) -> None:
        """One undated query with no other key: every study the job's keys match, the undated
        kept. Complete when the source answers it whole; else split by the passes."""
        keys = dict(self.keys)
        keys["StudyDate"] = ""
        outcome, rest = self._query(keys, _no_date)
        if outcome == "ok":
            self.progress["phase"] = "done"
        else:
            log.info("migration %s: %s: the undated query ended %s after %d undated matches: split by %s",
                     self.name, self.source.ae_title, outcome, self.kept,
                     ", ".join([*self._passes(), "ModalitiesInStudy"]))
            self.progress["capped"] = [outcome, self.kept]
            self._next_pass(None)
        self._commit(rest)

    def _next_pass(self, done: str | None) -> None:
        """Move to the undated pass after ``done`` (None: the first)."""
        passes = self._passes()
        after = passes[passes.index(done) + 1:] if done in passes else passes if done is None else []
        if after:
            self.progress.update(phase="fallback", fbkey=after[0], fb=list(reversed(PATIENT_ID_CHARS)))
        elif not self.keys.get("ModalitiesInStudy"):
            self.progress.update(phase="modalities", mods=list(reversed(MODALITIES)))
        else:
            self._finish_undated()

    def _keep_undated(self, before: list[str]) -> Callable[[StudyRecord, Dataset], bool]:
        """Keep an undated match whose keys of the earlier passes are all empty (it was found
        by none of them)."""
        def keep(rec: StudyRecord, ds: Dataset) -> bool:
            return not rec.study_date and not any(_text(ds, k) for k in before)
        return keep

    def _fallback_step(self) -> None:
        key: str = self.progress.get("fbkey", "PatientID")
        fb: list[str] = self.progress["fb"]
        if not fb:
            self._next_pass(key)
            self._commit([])
            return
        prefix = fb[-1]
        keys = dict(self.keys)
        keys[key] = prefix + "*"
        passes = self._passes()
        outcome, rest = self._query(keys, self._keep_undated(passes[:passes.index(key)] if key in passes else []))
        fb.pop()
        if outcome != "ok":
            if len(prefix) >= MAX_PREFIX:
                self._note(f"{self.source.ae_title}: undated studies of {key} {prefix}* still "
                           f"exceed one answer ({outcome}); some may be missing from the inventory")
            else:
                fb.extend(prefix + c for c in reversed(PATIENT_ID_CHARS))
        self._commit(rest)

    def _modalities_step(self) -> None:
        mods: list[str] = self.progress["mods"]
        if not mods:
            self._finish_undated()
            self._commit([])
            return
        keys = dict(self.keys)
        keys["ModalitiesInStudy"] = mods[-1]
        outcome, rest = self._query(keys, self._keep_undated(self._passes()))
        if outcome != "ok":
            self._note(f"{self.source.ae_title}: undated studies of modality {mods[-1]} without "
                       f"{', '.join(self._passes())} exceed one answer ({outcome}); some may be "
                       "missing from the inventory")
        mods.pop()
        self._commit(rest)

    def _finish_undated(self) -> None:
        """The passes are done: what no pass can find is said, with the undated query's count."""
        self.progress["phase"] = "done"
        outcome, kept = self.progress.get("capped") or ("", 0)
        if outcome:
            self._note(f"{self.source.ae_title}: the undated query without other keys ended {outcome} "
                       f"after {kept} undated match(es); an undated study with none of "
                       f"{', '.join([*self._passes(), 'ModalitiesInStudy'])} cannot be asked for "
                       "otherwise: the inventory may be incomplete")

    def _studies_step(self) -> None:
        """``--studies``: each entry (a Study Instance UID, else an Accession Number) by its own
        STUDY-level C-FIND; one found nowhere becomes a failed row "not found at source"."""
        entries = self.spec.studies
        i = self.progress["next"]
        if i >= len(entries):
            self.progress["phase"] = "done"
            self._commit([])
            return
        out: list[StudyRecord] = []
        for entry in entries[i:i + self.batch]:
            if self._stopped():
                break
            entry = entry.strip()
            i += 1
            if not entry:
                continue
            found = self._lookup(entry)
            if found is None:
                log.warning("migration %s: study %s not found at %s", self.name, entry, self.source.ae_title,
                            extra=fields(study_uid=entry if looks_like_uid(entry) else None))
                if looks_like_uid(entry):
                    out.append(StudyRecord(seq=-1, study_instance_uid=entry, state=StudyState.FAILED,
                                           reason=NOT_FOUND))
                else:
                    out.append(StudyRecord(seq=-1, study_instance_uid="", accession_number=entry,
                                           state=StudyState.FAILED, reason=NOT_FOUND))
            else:
                out.extend(found)
        self.progress["next"] = i
        self._commit(out)

    def _lookup(self, entry: str) -> list[StudyRecord] | None:
        """The entry's studies not yet written (a large answer is written as it comes);
        None when the source has none."""
        wanted = ("StudyInstanceUID", "AccessionNumber") if looks_like_uid(entry) else ("AccessionNumber",)
        for key in wanted:
            keys = {k: "" for k in STUDY_RETURN_KEYS}
            keys[key] = entry
            def same(rec: StudyRecord, ds: Dataset, key: str = key) -> bool:
                return _matches(rec, key, entry)
            outcome, found = self._query(keys, same)
            if outcome != "ok":
                self._note(f"{self.source.ae_title}: looking up {entry} ended {outcome}")
            if self.kept:
                return found
        return None


def identifier(keys: Mapping[str, Any]) -> Dataset:
    """A C-FIND identifier from {keyword: value}; the empty-value key ``""`` is set without
    pydicom's value validation (it is valid in a query, not as a date, and would warn)."""
    ds = Dataset()
    for keyword, value in keys.items():
        if value == EMPTY_VALUE:
            tag = tag_for_keyword(keyword)
            if tag is None:
                raise KeyError(f"{keyword!r} is not a DICOM keyword")
            ds.add(DataElement(tag, dictionary_VR(tag), value, validation_mode=pydicom_config.IGNORE))
        else:
            setattr(ds, keyword, "" if value is None else value)
    return ds


def _no_date(rec: StudyRecord, ds: Dataset) -> bool:
    return not rec.study_date


def _no_time(rec: StudyRecord, ds: Dataset) -> bool:
    return not _text(ds, "StudyTime")


def _matches(rec: StudyRecord, key: str, entry: str) -> bool:
    """A lookup's match really is the entry (a source may treat the value loosely)."""
    return (rec.study_instance_uid if key == "StudyInstanceUID" else rec.accession_number) == entry


def run_inventory(client: FindClient, jobs: Jobs, name: str, spec: JobSpec, source: SourceConfig, *,
                  stop: threading.Event | None = None, batch: int = BATCH,
                  today: dt.date | None = None) -> int:
    """Inventory ``name``'s studies at ``source`` into the spool, resuming where a previous run
    stopped; returns how many studies it added, and only when the inventory is complete: the
    caller then marks it done (:meth:`Jobs.inventory_done`). InventoryInterrupted (``stop`` set,
    job paused or cancelled) and QueryFailed (source down, a failure status) propagate, with
    the progress kept; the caller must NOT mark the inventory done then."""
    return Inventory(client, jobs, name, spec, source, stop=stop, batch=batch, today=today).run()


def inventory_complete(jobs: Jobs, name: str) -> bool:
    """Whether the saved progress says the inventory finished."""
    return jobs.inventory_progress(name).get("phase") == "done"


def list_study(client: FindClient, study_uid: str, source: SourceConfig) -> Listing:
    """Every instance of a study at the source: SERIES-level C-FIND, then IMAGE level per series.

    A source without IMAGE level (``source.image_level`` false) gives a counts-only listing:
    the sum of NumberOfSeriesRelatedInstances (or the study's NumberOfStudyRelatedInstances when
    the series do not say). Pass ``listing.source_instances`` to :meth:`Jobs.set_instances`: it
    is more than ``len(listing)`` where a series listed fewer instances than it counts."""
    series: list[tuple[str, str, int | None]] = []
    for ds in client.find(Level.SERIES, {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "",
                                         "Modality": "", "NumberOfSeriesRelatedInstances": ""},
                          timeout=source.query_timeout):
        uid = _text(ds, "SeriesInstanceUID")
        if uid:
            series.append((uid, _text(ds, "Modality"), _int(ds, "NumberOfSeriesRelatedInstances")))
    if not source.image_level:
        counts = [n for _, _, n in series]
        if series and all(n is not None for n in counts):
            return Listing(source_instances=sum(n or 0 for n in counts), counts_only=True)
        total = 0
        for ds in client.find(Level.STUDY, {"StudyInstanceUID": study_uid, "NumberOfStudyRelatedInstances": ""},
                              timeout=source.query_timeout):
            if _text(ds, "StudyInstanceUID") == study_uid:
                total = _int(ds, "NumberOfStudyRelatedInstances") or 0
        return Listing(source_instances=total, counts_only=True)
    out: dict[str, InstanceRecord] = {}
    short = 0
    for series_uid, _modality, expected in series:
        got = 0
        for ds in client.find(Level.IMAGE, {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
                                            "SOPInstanceUID": "", "SOPClassUID": ""},
                              timeout=source.query_timeout):
            sop = _text(ds, "SOPInstanceUID")
            if sop and sop not in out:
                got += 1
                out[sop] = InstanceRecord(sop, series_instance_uid=series_uid,
                                          sop_class_uid=_text(ds, "SOPClassUID"))
        if expected is not None and got < expected:
            log.warning("study %s series %s: %s lists %d of the %d instances it counts", study_uid,
                        series_uid, source.ae_title, got, expected, extra=fields(study_uid=study_uid))
            short += expected - got
    # an archive that caps the IMAGE-level answer lists fewer than it counts: the count stays
    # the expectation, so such a study is never taken as complete on the short list alone
    return Listing(out.values(), source_instances=len(out) + short)


__all__ = ["run_inventory", "Inventory", "InventoryInterrupted", "list_study", "Listing", "study_record", "date_bounds",
           "looks_like_uid", "inventory_complete", "NOT_FOUND", "FindClient"]
