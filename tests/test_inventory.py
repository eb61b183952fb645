"""The migration inventory (migration/inventory.py) against an in-process fake C-FIND source:
adaptive splitting (cap, timeout, 0xA700, one day by StudyTime), empty StudyDates (empty-value
matching and the PatientID fallback), --studies lookups, resume after a crash, list_study, and
one scale run of 100,000 studies with bounded memory.

The fake is a Python object with ``find`` (the QueryRetrieveClient method the inventory uses),
not a network peer: what these tests measure is the inventory's splitting, memory and spool
writes, and pynetdicom would not answer 100,000 matches within the time budget.
"""
from __future__ import annotations

import bisect
import datetime as dt
import gc
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from fastroute.config import SourceConfig
from fastroute.dicom.qr import Level, QueryFailed
from fastroute.migration.inventory import NOT_FOUND, InventoryInterrupted, date_bounds, list_study, run_inventory
from fastroute.spool import Spool
from fastroute.spool.jobs import JobSpec, JobState, StudyState

TODAY = dt.date(2026, 12, 6)


@dataclass(slots=True)
class FakeStudy:
    uid: str
    date: str = ""
    time: str = ""
    patient_id: str = ""
    accession: str = ""
    patient_name: str = ""
    modalities: tuple[str, ...] = ("CT",)
    series: dict[str, list[str]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.series.values()) or 3


class Crash(Exception):
    """Stands in for kill -9 in the middle of an answer."""


class FakeSource:
    """Answers STUDY/SERIES/IMAGE C-FINDs from a list, like an archive that caps answers at
    ``limit`` (silently truncated), times out past ``timeout_over`` matches, or refuses with
    0xA700 past ``busy_over``. ``empty``: how it treats StudyDate "" (honour, ignore = as
    universal matching, literal = matches nothing, refuse = 0xC000)."""

    def __init__(self, studies: list[FakeStudy], *, limit: int = 10**9, timeout_over: int | None = None,
                 busy_over: int | None = None, empty: str = "honour") -> None:
        self.studies = sorted(studies, key=lambda s: (s.date, s.time))
        self.dates = [s.date for s in self.studies]
        self.by_pid = sorted(studies, key=lambda s: s.patient_id)    # undated PatientID* queries
        self.pids = [s.patient_id for s in self.by_pid]
        self.limit, self.timeout_over, self.busy_over, self.empty = limit, timeout_over, busy_over, empty
        self.queries: list[dict[str, Any]] = []
        self.answered = 0
        self.cancelled = 0
        self.crash_after: int | None = None
        self.stop_after: tuple[int, threading.Event] | None = None

    def _candidates(self, keys: Mapping[str, Any]) -> list[FakeStudy]:
        date = str(keys.get("StudyDate") or "")
        if date == '""':
            if self.empty == "refuse":
                raise QueryFailed("C-FIND failed with status 0xC000: unable to process", 0xC000)
            if self.empty == "literal":
                return []
            if self.empty == "honour":
                return self.studies[:bisect.bisect_right(self.dates, "")]
            date = ""
        if not date:
            pid = str(keys.get("PatientID") or "")
            if pid.endswith("*") and "*" not in pid[:-1]:
                a = bisect.bisect_left(self.pids, pid[:-1])
                b = bisect.bisect_left(self.pids, pid[:-1] + "\U0010ffff")
                return self.by_pid[a:b]
            return self.studies
        lo, _, hi = date.partition("-") if "-" in date else (date, "", date)
        a = bisect.bisect_left(self.dates, lo or "00000000")
        b = bisect.bisect_right(self.dates, hi or "99999999")
        return [s for s in self.studies[a:b] if s.date]

    @staticmethod
    def _match(s: FakeStudy, keys: Mapping[str, Any]) -> bool:
        t = str(keys.get("StudyTime") or "")
        if t == '""':
            if s.time:
                return False
        elif t:
            lo, _, hi = t.partition("-")
            if not s.time or not lo <= s.time <= hi:
                return False
        for key, value in (("PatientID", s.patient_id), ("PatientName", s.patient_name),
                           ("AccessionNumber", s.accession)):
            want = str(keys.get(key) or "")
            if want and not (value.startswith(want[:-1]) if want.endswith("*") else value == want):
                return False
        if keys.get("StudyInstanceUID") and keys["StudyInstanceUID"] != s.uid:
            return False
        mod = keys.get("ModalitiesInStudy")
        return not mod or mod in s.modalities

    def find(self, level: Level, identifier: Dataset | Mapping[str, Any], *,
             timeout: float | None = None) -> Iterator[Dataset]:
        keys = (dict(identifier) if isinstance(identifier, Mapping)
                else {e.keyword: e.value for e in identifier if e.keyword != "QueryRetrieveLevel"})
        self.queries.append(keys)
        if self.crash_after is not None and len(self.queries) > self.crash_after:
            raise Crash(f"killed at query {len(self.queries)}")
        if self.stop_after is not None and len(self.queries) >= self.stop_after[0]:
            self.stop_after[1].set()
        if level is Level.STUDY:
            return self._studies(keys)
        return self._lower(level, keys)

    def _studies(self, keys: dict[str, Any]) -> Iterator[Dataset]:
        matches = [s for s in self._candidates(keys) if self._match(s, keys)]
        if self.busy_over is not None and len(matches) > self.busy_over:
            raise QueryFailed("C-FIND failed with status 0xA700 out of resources", 0xA700)
        return self._answer(matches)

    def _answer(self, matches: list[FakeStudy]) -> Iterator[Dataset]:
        try:
            for n, s in enumerate(matches):
                if n >= self.limit:
                    return
                if self.timeout_over is not None and n >= self.timeout_over:
                    raise QueryFailed(f"C-FIND: no final response within the total timeout after {n} "
                                      "match(es); cancelled", None)
                self.answered += 1
                yield Dataset({tag: DataElement(tag, vr, value) for tag, vr, value in (
                    (0x0020000D, "UI", s.uid), (0x00100020, "LO", s.patient_id), (0x00080050, "SH", s.accession),
                    (0x00080020, "DA", s.date), (0x00080030, "TM", s.time), (0x00080061, "CS", list(s.modalities)),
                    (0x00100010, "PN", s.patient_name),
                    (0x00201208, "IS", s.count))})
        except GeneratorExit:
            self.cancelled += 1
            raise

    def _lower(self, level: Level, keys: dict[str, Any]) -> Iterator[Dataset]:
        [s] = [s for s in self.studies if s.uid == keys["StudyInstanceUID"]]
        for series_uid, sops in s.series.items():
            if level is Level.SERIES:
                ds = Dataset()
                ds.SeriesInstanceUID, ds.Modality, ds.NumberOfSeriesRelatedInstances = series_uid, "CT", len(sops)
                yield ds
            elif keys["SeriesInstanceUID"] == series_uid:
                for sop in sops:
                    ds = Dataset()
                    ds.SOPInstanceUID, ds.SOPClassUID = sop, "1.2.840.10008.5.1.4.1.1.2"
                    yield ds


def source(**kw: Any) -> SourceConfig:
    base: dict[str, Any] = dict(name="old", ae_title="OLDPACS", host="127.0.0.1", port=104, max_results=50,
                                query_timeout=5.0)
    base.update(kw)
    return SourceConfig(**base)


def spread(n: int, first: dt.date, days: int, *, prefix: str = "1.2.826.0.1.", pids: str = "ABC") -> list[FakeStudy]:
    return [FakeStudy(f"{prefix}{i}", date=(first + dt.timedelta(days=i * days // n)).strftime("%Y%m%d"),
                      time=f"{(i * 7) % 24:02d}{i % 60:02d}00", patient_id=f"{pids[i % len(pids)]}{i}",
                      accession=f"ACC{i}") for i in range(n)]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    sp = Spool(tmp_path / "spool", map_size=1024**3)
    yield sp
    sp.close()


def start(spool: Spool, **spec: Any) -> tuple[str, JobSpec]:
    js = JobSpec(name=spec.pop("name", "inv"), source="old", destinations=("new",), **spec)
    name = spool.jobs.create(js)
    return name, spool.jobs.spec(name)


def uids(spool: Spool, name: str) -> list[str]:
    return [s.study_instance_uid for s in spool.jobs.report(name)]


def test_date_bounds() -> None:
    assert date_bounds(None, TODAY) == (dt.date(1800, 1, 1), dt.date(9999, 12, 31))
    assert date_bounds("20190101-20191231", TODAY) == (dt.date(2019, 1, 1), dt.date(2019, 12, 31))
    assert date_bounds("20190101-", TODAY) == (dt.date(2019, 1, 1), dt.date(9999, 12, 31))
    assert date_bounds("-20000101", TODAY) == (dt.date(1800, 1, 1), dt.date(2000, 1, 1))
    assert date_bounds("20190102", TODAY) == (dt.date(2019, 1, 2),) * 2
    for bad in ("2019", "20191301", "20200101-20190101"):
        with pytest.raises(ValueError, match=f"bad StudyDate '{bad}'"):
            date_bounds(bad, TODAY)


def test_capped_answers_are_split_until_each_is_small(spool: Spool) -> None:
    # with studies dated in the future (a wrong modality clock) and long ago: the whole archive
    future = [FakeStudy("8.1", date="20270301", patient_id="F1"), FakeStudy("8.2", date="20361231", patient_id="F2"),
              FakeStudy("8.3", date="18991231", patient_id="F3")]
    studies = spread(300, dt.date(2020, 1, 1), 700) + future + [FakeStudy("9.1", patient_id="X1"), FakeStudy("9.2")]
    fake = FakeSource(studies, limit=50)
    name, spec = start(spool)
    added = run_inventory(fake, spool.jobs, name, spec, source(max_results=50), today=TODAY)
    assert added == 305 and sorted(uids(spool, name)) == sorted(s.uid for s in studies)
    st = spool.jobs.status(name)
    assert (st.studies_total, st.instances_expected, st.studies_by_state) == (305, 305 * 3, {"pending": 305})
    assert fake.cancelled > 0                      # capped answers were cancelled, not read to the end
    complete = [q for q in fake.queries if q.get("StudyDate") not in ('""',)]
    assert all(str(q["StudyDate"]) for q in complete)
    assert spool.jobs.inventory_progress(name)["phase"] == "done"
    assert st.error == ""
    # the whole archive was asked for, future dates included
    assert fake.queries[0]["StudyDate"] == "18000101-99991231" and fake.queries[0]["NumberOfStudyRelatedInstances"] == ""
    # a second run has nothing left to do
    before = len(fake.queries)
    assert run_inventory(fake, spool.jobs, name, spec, source(), today=TODAY) == 0 and len(fake.queries) == before


@pytest.mark.parametrize("how", ["timeout", "busy"])
def test_timeouts_and_out_of_resources_split_too(spool: Spool, how: str) -> None:
    studies = spread(200, dt.date(2021, 3, 1), 100)
    fake = FakeSource(studies, **({"timeout_over": 30} if how == "timeout" else {"busy_over": 30}))
    name, spec = start(spool, query={"StudyDate": "20210101-20211231"})
    run_inventory(fake, spool.jobs, name, spec, source(max_results=1000), today=TODAY)
    assert sorted(uids(spool, name)) == sorted(s.uid for s in studies)
    assert all(q["StudyDate"] != '""' for q in fake.queries)     # a dated job skips empty dates
    assert len(fake.queries) > 8


def test_one_day_too_large_is_split_by_study_time_and_said(spool: Spool) -> None:
    day = [FakeStudy(f"5.{i}", date="20220202", time=f"{i % 24:02d}{i % 60:02d}{i % 50:02d}", patient_id=f"P{i}")
           for i in range(180)]
    untimed = [FakeStudy(f"6.{i}", date="20220202", patient_id="Q") for i in range(5)]
    others = spread(40, dt.date(2022, 1, 1), 60, prefix="7.")
    fake = FakeSource(day + untimed + others, limit=40)
    name, spec = start(spool)
    run_inventory(fake, spool.jobs, name, spec, source(max_results=40), today=TODAY)
    assert sorted(uids(spool, name)) == sorted(s.uid for s in day + untimed + others)
    assert any(str(q.get("StudyTime", "")).count("-") == 1 for q in fake.queries)
    err = spool.jobs.status(name).error
    assert "OLDPACS has more than 40 studies on 20220202" in err and "StudyTime" in err
    # the note outlives the job error (which the runner clears when the inventory is done)
    spool.jobs.set_error(name, "")
    assert any("20220202" in n for n in spool.jobs.status(name).inventory_notes)


def test_a_time_slot_that_cannot_be_split_is_reported(spool: Spool) -> None:
    same = [FakeStudy(f"8.{i}", date="20230303", time="101010") for i in range(30)]
    fake = FakeSource(same, limit=10)
    name, spec = start(spool)
    run_inventory(fake, spool.jobs, name, spec, source(max_results=10), today=TODAY)
    assert spool.jobs.status(name).studies_total == 10           # what the capped answers gave
    assert "at 101010 still exceed one answer" in spool.jobs.status(name).error
    assert spool.jobs.inventory_progress(name)["phase"] == "done"


@pytest.mark.parametrize("empty", ["honour", "ignore", "refuse", "literal"])
def test_studies_without_study_date_are_found(spool: Spool, empty: str) -> None:
    dated = spread(120, dt.date(2019, 5, 1), 300)
    undated = [FakeStudy(f"4.{i}", patient_id=f"{'AZ0x'[i % 4]}{i}") for i in range(12)]
    fake = FakeSource(dated + undated, limit=30, empty=empty)
    name, spec = start(spool)
    run_inventory(fake, spool.jobs, name, spec, source(max_results=30), today=TODAY)
    got = uids(spool, name)
    assert len(got) == len(set(got)) == 132 and {s.uid for s in undated} <= set(got)
    fallback = [q for q in fake.queries if str(q.get("PatientID", "")).endswith("*")]
    assert bool(fallback) == (empty != "honour")
    if fallback:   # undated queries: no StudyDate key value, split by PatientID prefix
        assert all(q["StudyDate"] == "" for q in fallback)
        # 'A' has more than 30 studies (dated ones too): it was split to 'A0'...
        assert any(q["PatientID"] == "A1*" for q in fallback)


@pytest.mark.parametrize("empty", ["ignore", "literal", "refuse"])
def test_undated_studies_without_patient_id_are_found_whatever_keys_are_empty(spool: Spool, empty: str) -> None:
    """No StudyDate and no PatientID (pydicom's image_dfl.dcm, test-SR.dcm): the PatientName,
    AccessionNumber and ModalitiesInStudy passes find them; one with none of these keys only
    the capped undated query can, and the job's notes say so."""
    dated = spread(120, dt.date(2019, 5, 1), 300)
    undated = [FakeStudy(f"4.{i}", patient_id=f"P{i}") for i in range(40)]
    named = FakeStudy("5.1", patient_name="Test^S R")
    accessioned = FakeStudy("5.2", accession="A77")
    sr_only = FakeStudy("5.3", modalities=("SR",))
    bare = FakeStudy("5.4", modalities=())
    fake = FakeSource(dated + undated + [named, accessioned, sr_only, bare], limit=30, empty=empty)
    name, spec = start(spool)
    run_inventory(fake, spool.jobs, name, spec, source(max_results=30), today=TODAY)
    got = set(uids(spool, name))
    assert {s.uid for s in dated + undated} | {"5.1", "5.2", "5.3"} <= got
    assert any(q.get("PatientName") == "T*" for q in fake.queries)
    assert any(q.get("AccessionNumber") == "A*" for q in fake.queries)
    assert any(q.get("ModalitiesInStudy") == "SR" for q in fake.queries)
    error = spool.jobs.status(name).error
    assert "the undated query without other keys ended capped after" in error
    assert "the inventory may be incomplete" in error
    assert spool.jobs.inventory_progress(name)["phase"] == "done"


def test_an_undated_answer_that_fits_ends_the_inventory_with_every_study(spool: Spool) -> None:
    """A source that takes StudyDate "" literally but whose undated answer is not capped: one
    query finds every undated study, whatever keys they lack; no passes, no warning."""
    dated = spread(20, dt.date(2019, 5, 1), 300)
    bare = [FakeStudy("5.4", modalities=()), FakeStudy("5.5", patient_name="^^^^")]
    fake = FakeSource(dated + bare, limit=50, empty="literal")
    name, spec = start(spool)
    run_inventory(fake, spool.jobs, name, spec, source(max_results=50), today=TODAY)
    assert set(uids(spool, name)) == {s.uid for s in dated + bare}
    assert not any(str(q.get(k, "")).endswith("*") for q in fake.queries for k in ("PatientID", "PatientName"))
    assert not spool.jobs.status(name).error


def test_the_jobs_own_patient_id_is_never_replaced_by_a_prefix(spool: Spool) -> None:
    studies = [FakeStudy(f"6.{i}", patient_id="X1", accession=f"N{i}") for i in range(8)]
    others = [FakeStudy(f"7.{i}", patient_id=f"Y{i}") for i in range(40)]
    fake = FakeSource(studies + others, limit=5, empty="literal")
    name, spec = start(spool, query={"PatientID": "X1"})
    run_inventory(fake, spool.jobs, name, spec, source(max_results=5), today=TODAY)
    assert set(uids(spool, name)) == {s.uid for s in studies}
    assert all(q["PatientID"] == "X1" for q in fake.queries)


def test_query_keys_reach_every_query(spool: Spool) -> None:
    studies = spread(60, dt.date(2020, 1, 1), 100)
    for s in studies[::3]:
        s.modalities = ("MR",)
    fake = FakeSource(studies, limit=25)
    name, spec = start(spool, query={"ModalitiesInStudy": "MR"})
    run_inventory(fake, spool.jobs, name, spec, source(max_results=25), today=TODAY)
    assert sorted(uids(spool, name)) == sorted(s.uid for s in studies[::3])
    assert all(q["ModalitiesInStudy"] == "MR" for q in fake.queries)


def test_studies_file_entries_are_looked_up(spool: Spool) -> None:
    studies = spread(20, dt.date(2020, 1, 1), 10)
    studies.append(FakeStudy("1.2.826.0.1.99", date="20200101", accession="ACC1"))   # ACC1 names two studies
    fake = FakeSource(studies)
    entries = ("1.2.826.0.1.3", "ACC5", "ACC1", "1.2.3.404", "NOPE-7", "1.2.826.0.1.3")
    name, spec = start(spool, studies=entries)
    run_inventory(fake, spool.jobs, name, spec, source(), today=TODAY, batch=2)
    rows = {r.study_instance_uid or r.accession_number: r for r in spool.jobs.report(name)}
    assert set(rows) == {"1.2.826.0.1.3", "1.2.826.0.1.5", "1.2.826.0.1.1", "1.2.826.0.1.99", "1.2.3.404", "NOPE-7"}
    for missing in ("1.2.3.404", "NOPE-7"):
        assert (rows[missing].state, rows[missing].reason) == (StudyState.FAILED, NOT_FOUND)
    assert rows["1.2.826.0.1.5"].state is StudyState.PENDING and rows["1.2.826.0.1.5"].accession_number == "ACC5"
    st = spool.jobs.status(name)
    assert (st.studies_total, st.studies_failed) == (6, 2)
    # a UID that is not at the source is also tried as an Accession Number
    assert any(q["AccessionNumber"] == "1.2.3.404" for q in fake.queries)
    assert not any(q["StudyInstanceUID"] == "NOPE-7" for q in fake.queries)
    assert not any(q.get("StudyDate") for q in fake.queries)


def test_killed_mid_inventory_resumes_not_restarts(tmp_path: Path) -> None:
    studies = spread(400, dt.date(2018, 1, 1), 1500) + [FakeStudy("3.1"), FakeStudy("3.2")]
    full = FakeSource(studies, limit=40)
    sp = Spool(tmp_path / "ref", map_size=256 * 1024**2)
    name, spec = start(sp)
    run_inventory(full, sp.jobs, name, spec, source(max_results=40), today=TODAY)
    sp.close()
    total_queries = len(full.queries)

    path = tmp_path / "crash"
    sp = Spool(path, map_size=256 * 1024**2)
    name, spec = start(sp)
    fake = FakeSource(studies, limit=40)
    fake.crash_after = total_queries // 2
    with pytest.raises(Crash):
        run_inventory(fake, sp.jobs, name, spec, source(max_results=40), today=TODAY)
    partial = sp.jobs.status(name).studies_total
    sp.close()                                    # the process is gone; the spool is what is left
    assert 0 < partial < len(studies)

    sp = Spool(path, map_size=256 * 1024**2)
    try:
        again = FakeSource(studies, limit=40)
        run_inventory(again, sp.jobs, name, sp.jobs.spec(name), source(max_results=40), today=TODAY)
        got = uids(sp, name)
        assert len(got) == len(set(got)) == len(studies)
        # resumed: the second run asked only what the first had not finished
        assert len(again.queries) <= total_queries - total_queries // 2 + 1
        assert sp.jobs.status(name).studies_total == len(studies)
    finally:
        sp.close()


def test_stop_event_ends_the_run_and_keeps_the_place(spool: Spool) -> None:
    studies = spread(200, dt.date(2020, 1, 1), 300)
    stop = threading.Event()
    fake = FakeSource(studies, limit=20)
    fake.stop_after = (5, stop)
    name, spec = start(spool)
    with pytest.raises(InventoryInterrupted, match="router is stopping; it continues where it stopped"):
        run_inventory(fake, spool.jobs, name, spec, source(max_results=20), stop=stop, today=TODAY)
    assert len(fake.queries) == 5 and spool.jobs.inventory_progress(name)["phase"] == "dates"
    rest = FakeSource(studies, limit=20)
    run_inventory(rest, spool.jobs, name, spec, source(max_results=20), today=TODAY)
    assert sorted(uids(spool, name)) == sorted(s.uid for s in studies)
    assert spool.jobs.inventory_done(name) is JobState.RUNNING


def test_other_failures_propagate_with_progress_kept(spool: Spool) -> None:
    class Down(FakeSource):
        def find(self, level: Level, identifier: Dataset | Mapping[str, Any], *,
                 timeout: float | None = None) -> Iterator[Dataset]:
            raise QueryFailed("C-FIND OLDPACS: association rejected", None)
    name, spec = start(spool)
    with pytest.raises(QueryFailed, match="rejected"):
        run_inventory(Down([]), spool.jobs, name, spec, source(), today=TODAY)
    assert spool.jobs.inventory_progress(name)["todo"] == [["18000101", "99991231", None, None]]


def test_list_study_image_level_and_counts_only() -> None:
    s = FakeStudy("1.9", date="20200101", series={"1.9.1": ["1.9.1.1", "1.9.1.2"], "1.9.2": ["1.9.2.1"]})
    fake = FakeSource([s])
    listing = list_study(fake, "1.9", source())
    assert [(i.sop_instance_uid, i.series_instance_uid) for i in listing] == \
        [("1.9.1.1", "1.9.1"), ("1.9.1.2", "1.9.1"), ("1.9.2.1", "1.9.2")]
    assert listing.source_instances == 3 and not listing.counts_only
    assert [q["QueryRetrieveLevel"] if "QueryRetrieveLevel" in q else "" for q in fake.queries] == ["", "", ""]
    counts = list_study(FakeSource([s]), "1.9", source(image_level=False))
    assert list(counts) == [] and counts.counts_only and counts.source_instances == 3

    class Capped(FakeSource):       # IMAGE-level answers capped at one match
        def _lower(self, level: Level, keys: dict[str, Any]) -> Iterator[Dataset]:
            for n, ds in enumerate(super()._lower(level, keys)):
                if level is Level.SERIES or n < 1:
                    yield ds
    short = list_study(Capped([s]), "1.9", source())
    assert len(short) == 2 and short.source_instances == 3 and not short.counts_only


def _rss_anon() -> int:
    """This process's anonymous resident memory (the Python heap; not the LMDB map's file pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_scale_100k_studies_bounded_memory(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 studies over 4 years (100 without StudyDate, found by empty-value matching),
    max_results 1000: the process's anonymous memory (sampled
    every 20 ms: tracemalloc would slow this run several times) grows far less than holding
    the inventory would take (100,000 StudyRecords are ~50 MB); time printed. The time includes
    the fake source building ~230,000 pydicom Datasets (capped answers are read up to the cap
    before being split); pydicom's value validation is off here to keep that part cheap."""
    monkeypatch.setattr(pydicom_config.settings, "writing_validation_mode", pydicom_config.IGNORE)
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)
    n = 100_000
    studies = [FakeStudy(f"1.2.826.0.1.3680043.2.{i}", time="120000", patient_id=f"P{i % 9973}", accession=f"A{i}",
                         date="" if i % 1000 == 7 else (dt.date(2020, 1, 1) + dt.timedelta(days=i * 1461 // n)).strftime("%Y%m%d"))
               for i in range(n)]
    fake = FakeSource(studies, limit=1000)
    name, spec = start(spool)
    gc.collect()
    base = peak = _rss_anon()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, _rss_anon())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        run_inventory(fake, spool.jobs, name, spec, source(max_results=1000), today=TODAY)
    finally:
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
    peak = max(peak, _rss_anon())
    st = spool.jobs.status(name)
    print(f"\ninventory of {n} studies: {elapsed:.1f} s ({n / elapsed:.0f} studies/s), {len(fake.queries)} C-FINDs, "
          f"{fake.answered} matches read, anonymous memory growth {(peak - base) / 1e6:.1f} MB")
    assert st.studies_total == n and st.instances_expected == 3 * n
    assert not any(str(q.get("PatientID", "")).endswith("*") for q in fake.queries)   # "" was honoured
    assert peak - base < 20e6, f"the inventory grew the heap by {(peak - base) / 1e6:.1f} MB"


def test_inventory_over_the_network_against_the_fake_archive(spool: Spool) -> None:
    """End to end through dicom/qr.py: a pynetdicom archive of 500 generated studies (every
    97th without StudyDate; it takes StudyDate "" literally, so the PatientID fallback finds
    those) that silently caps answers at 50 matches, max_results 50. Every study is found
    once, and list_study lists a study's instances at SERIES then IMAGE level."""
    import qrpeers

    from fastroute.dicom.qr import QueryRetrieveClient

    gen = qrpeers.Generated(500, series=2, per_series=2, empty_date_every=97)
    with qrpeers.FakeArchive(generated=gen, max_matches=50) as pacs:
        src = source(ae_title="FAKEPACS", port=pacs.port, max_results=50, query_timeout=30.0,
                     acse_timeout=10.0, dimse_timeout=20.0, network_timeout=20.0)
        name, spec = start(spool)
        client = QueryRetrieveClient(src, "FASTROUTE")
        try:
            t0 = time.perf_counter()
            run_inventory(client, spool.jobs, name, spec, src, today=TODAY)
            elapsed = time.perf_counter() - t0
            listing = list_study(client, gen.study_uid(3), src)
        finally:
            client.close()
        finds = [r for r in pacs.requests if r.command == "C-FIND"]
    got = uids(spool, name)
    print(f"\nnetwork inventory of 500 studies: {elapsed:.1f} s, {len(finds)} C-FINDs, {pacs.cancels} cancelled")
    assert len(got) == len(set(got)) == 500 and set(got) == {gen.study_uid(i) for i in range(500)}
    undated = {gen.study_uid(i) for i in range(0, 500, 97)}
    assert {r.study_instance_uid for r in spool.jobs.report(name) if not r.study_date} == undated
    assert spool.jobs.status(name).instances_expected == 500 * 4
    # capped answers were split: every C-FIND answer but the capped ones stayed under the cap
    assert len(finds) > 20
    assert sorted(i.sop_instance_uid for i in listing) == sorted(
        f"{gen.study_uid(3)}.{s}.{k}" for s in range(2) for k in range(2))
    assert {i.series_instance_uid for i in listing} == {f"{gen.study_uid(3)}.{s}" for s in range(2)}


def test_studies_file_lookup_resumes_after_a_crash(tmp_path: Path) -> None:
    studies = spread(30, dt.date(2020, 1, 1), 30)
    entries = tuple(s.uid for s in studies) + ("1.2.3.404",)
    path = tmp_path / "s"
    sp = Spool(path, map_size=64 * 1024**2)
    name, spec = start(sp, studies=entries)
    fake = FakeSource(studies)
    fake.crash_after = 17
    with pytest.raises(Crash):
        run_inventory(fake, sp.jobs, name, spec, source(), today=TODAY, batch=5)
    done_before = sp.jobs.inventory_progress(name)["next"]
    sp.close()
    assert done_before == 15                     # three batches of five were committed
    sp = Spool(path, map_size=64 * 1024**2)
    try:
        again = FakeSource(studies)
        run_inventory(again, sp.jobs, name, sp.jobs.spec(name), source(), today=TODAY, batch=5)
        got = uids(sp, name)
        assert len(got) == len(set(got)) == 31
        asked = [q["StudyInstanceUID"] for q in again.queries if q["StudyInstanceUID"]]
        assert asked[0] == studies[15].uid and len(asked) == 15 + 1     # the rest, and 1.2.3.404
    finally:
        sp.close()


def test_pausing_the_job_interrupts_its_inventory(spool: Spool) -> None:
    studies = spread(200, dt.date(2020, 1, 1), 300)

    class PausedOnThird(FakeSource):
        def find(self, level: Level, identifier: Dataset | Mapping[str, Any], *,
                 timeout: float | None = None) -> Iterator[Dataset]:
            if len(self.queries) == 2:
                spool.jobs.pause(name)              # an operator, from another process
            return super().find(level, identifier, timeout=timeout)
    fake = PausedOnThird(studies, limit=20)
    name, spec = start(spool)
    with pytest.raises(InventoryInterrupted, match="the job is paused"):
        run_inventory(fake, spool.jobs, name, spec, source(max_results=20), today=TODAY)
    assert len(fake.queries) == 3 and not spool.jobs.status(name).inventory_done
    assert spool.jobs.resume(name).state is JobState.INVENTORY
    run_inventory(FakeSource(studies, limit=20), spool.jobs, name, spec, source(max_results=20), today=TODAY)
    assert sorted(uids(spool, name)) == sorted(s.uid for s in studies)
