"""Migration job storage (spool/jobs.py): states, totals kept in step, idempotent runner writes,
windows, rates, report order, and everything surviving a reopen of the spool."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastroute.spool import Spool
from fastroute.spool.jobs import (
    REPORT_COLUMNS,
    InstanceRecord,
    JobError,
    Jobs,
    JobSpec,
    JobState,
    StudyRecord,
    StudyState,
    Window,
    in_windows,
    parse_rate,
)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    sp = Spool(tmp_path / "spool", map_size=256 * 1024**2)
    yield sp
    sp.close()


def make_job(jobs: Jobs, name: str = "j1", n: int = 3, counts: int | None = 2) -> str:
    name = jobs.create(JobSpec(name=name, source="old", destinations=("new",), query={"ModalitiesInStudy": "CT"},
                               windows=(Window.parse("sat,sun 00:00-24:00"),), rate_studies_per_hour=500))
    jobs.add_studies(name, [StudyRecord(seq=-1, study_instance_uid=f"1.2.{i}", patient_id=f"P{i}",
                                        source_instances=counts) for i in range(n)])
    return name


def insts(study: int, n: int) -> list[InstanceRecord]:
    return [InstanceRecord(f"1.2.{study}.{k}", series_instance_uid=f"1.2.{study}.s", sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
            for k in range(n)]


def test_create_spec_round_trip_and_names(spool: Spool) -> None:
    jobs = spool.jobs
    name = make_job(jobs)
    spec = jobs.spec(name)
    assert spec.source == "old" and spec.destinations == ("new",) and dict(spec.query) == {"ModalitiesInStudy": "CT"}
    assert [str(w) for w in spec.windows] == ["sat,sun 00:00-24:00"] and spec.rate_studies_per_hour == 500
    assert spec.created_at > 0
    with pytest.raises(JobError, match="exists already"):
        jobs.create(JobSpec(name=name, source="old", destinations=("new",)))
    gen = jobs.create(JobSpec(name="", source="old", destinations=("new",), created_at=1.7e9))
    gen2 = jobs.create(JobSpec(name="", source="old", destinations=("new",), created_at=1.7e9))
    assert gen.startswith("old-") and gen2 == gen + "-2"
    assert jobs.names() == sorted([name, gen, gen2])
    with pytest.raises(JobError, match="no migration job named 'nope'"):
        jobs.status("nope")
    with pytest.raises(JobError, match="bad job name"):
        jobs.create(JobSpec(name="a b", source="old", destinations=("new",)))


def test_totals_follow_every_change_without_scanning(spool: Spool) -> None:
    jobs = spool.jobs
    name = make_job(jobs, n=3, counts=2)
    st = jobs.status(name)
    assert (st.state, st.studies_total, st.instances_expected) == (JobState.INVENTORY, 3, 6)
    assert st.studies_by_state == {"pending": 3}
    # dedup by Study UID: a replayed batch adds nothing
    assert jobs.add_studies(name, [StudyRecord(seq=-1, study_instance_uid="1.2.0"),
                                   StudyRecord(seq=-1, study_instance_uid="1.2.9")]) == 1
    assert jobs.status(name).studies_total == 4
    assert jobs.inventory_done(name) is JobState.RUNNING and jobs.inventory_done(name) is JobState.RUNNING

    rec = jobs.set_instances(name, "1.2.0", insts(0, 3))
    assert rec.state is StudyState.LISTED and rec.source_instances == 3
    assert jobs.status(name).instances_expected == 7       # 2 -> 3 for study 0
    assert jobs.mark_received(name, "1.2.0", {"1.2.0.0": 10, "1.2.0.1": 11}) == []
    assert jobs.mark_received(name, "1.2.0", {"1.2.0.0": 10, "1.2.0.1": 11}) == []   # replay
    assert jobs.get_study(name, "1.2.0").received == 2          # type: ignore[union-attr]
    assert jobs.status(name).instances_received == 2
    assert [r.sop_instance_uid for r in jobs.missing(name, "1.2.0")] == ["1.2.0.2"]
    jobs.mark_delivered(name, "1.2.0", ["1.2.0.0", "1.2.0.0", "1.2.0.2"])   # 1.2.0.2 not received: ignored
    st = jobs.status(name)
    assert st.instances_delivered == 1
    jobs.mark_received(name, 0, {"1.2.0.2": 12})
    jobs.mark_delivered(name, 0, ["1.2.0.1", "1.2.0.2"])
    jobs.update_study(name, 0, state=StudyState.VERIFYING)
    rec = jobs.mark_found(name, 0, ["1.2.0.0", "1.2.0.2", "9.9.9"])
    assert rec.found_at_destination == 2
    assert [r.sop_instance_uid for r in jobs.missing(name, 0, "found")] == ["1.2.0.1"]
    rec = jobs.mark_found(name, 0, ["1.2.0.0", "1.2.0.1", "1.2.0.2"])
    assert rec.found_at_destination == 3 and jobs.missing(name, 0, "found") == []
    jobs.update_study(name, 0, state=StudyState.VERIFIED)
    st = jobs.status(name)
    assert (st.instances_received, st.instances_delivered, st.instances_found, st.studies_verified) == (3, 3, 3, 1)
    assert st.studies_by_state == {"verified": 1, "pending": 3}
    # a re-listing keeps what was received/delivered/found
    with pytest.raises(JobError, match="retry"):
        jobs.set_instances(name, 0, insts(0, 3))
    # the totals equal a full recount
    studies = list(jobs.report(name))
    assert sum(s.received for s in studies) == st.instances_received
    assert sum(s.source_instances or 0 for s in studies) == st.instances_expected


def test_relisting_keeps_flags_and_received_unlisted(spool: Spool) -> None:
    jobs = spool.jobs
    name = make_job(jobs, n=1)
    jobs.set_instances(name, 0, insts(0, 2))
    jobs.mark_received(name, 0, {"1.2.0.0": 1, "x.unlisted": 2})
    rec = jobs.get_study(name, 0)
    assert rec is not None and rec.received == 2
    rec = jobs.set_instances(name, 0, insts(0, 3), state=StudyState.RETRIEVING)
    assert (rec.received, rec.source_instances, rec.state) == (2, 3, StudyState.RETRIEVING)
    by_sop = {r.sop_instance_uid: r for r in jobs.instances(name, 0)}
    assert by_sop["1.2.0.0"].oid == 1 and by_sop["x.unlisted"].received and by_sop["1.2.0.2"].oid is None
    # a counts-only listing (source without IMAGE level)
    rec = jobs.set_instances(name, 0, [], source_instances=40)
    assert rec.source_instances == 40 and rec.received == 2
    assert jobs.status(name).instances_expected == 40


def test_conflicting_digest_is_reported_not_overwritten(spool: Spool) -> None:
    jobs = spool.jobs
    name = make_job(jobs, n=1)
    jobs.set_instances(name, 0, insts(0, 2))
    assert jobs.mark_received(name, 0, {"1.2.0.0": 1}, digests={"1.2.0.0": "aa"}) == []
    assert jobs.mark_received(name, 0, {"1.2.0.0": 1}, digests={"1.2.0.0": "aa"}) == []   # replay
    assert jobs.mark_received(name, 0, {"1.2.0.0": 5}, digests={"1.2.0.0": "aa"}) == []   # same content
    assert jobs.mark_received(name, 0, {"1.2.0.0": 7}, digests={"1.2.0.0": "bb"}) == ["1.2.0.0"]
    assert jobs.mark_received(name, 0, {"1.2.0.0": 8}, digests={"1.2.0.0": "cc"}) == ["1.2.0.0"]
    [first, _] = jobs.instances(name, 0)
    assert first.oid == 1 and first.digest == "aa" and first.conflict
    rec = jobs.get_study(name, 0)
    assert rec is not None and rec.received == 1 and rec.conflicts == 1
    assert jobs.status(name).conflicts == 1


def test_due_uses_next_at_and_state_and_keeps_mwork_in_sync(spool: Spool) -> None:
    jobs = spool.jobs
    name = make_job(jobs, n=5)
    now = 1000.0
    assert [s.seq for s in jobs.due(name, StudyState.PENDING, 3, now)] == [0, 1, 2]
    jobs.update_study(name, 1, next_at=now + 60, reason="0xA702 out of resources", add_attempt=True)
    jobs.update_study(name, 3, state=StudyState.LISTED)
    assert [s.seq for s in jobs.due(name, StudyState.PENDING, 10, now)] == [0, 2, 4]
    assert [s.seq for s in jobs.due(name, StudyState.PENDING, 10, now + 61)] == [0, 2, 4, 1]
    assert [s.seq for s in jobs.due(name, StudyState.LISTED, 10, now)] == [3]
    assert jobs.next_due(name, [StudyState.LISTED]) == 0.0
    jobs.update_study(name, 0, next_at=now + 5)
    jobs.update_study(name, 2, next_at=now + 5)
    jobs.update_study(name, 4, next_at=now + 5)
    jobs.update_study(name, 3, next_at=now + 30)
    assert jobs.next_due(name) == now + 5 and jobs.next_due(name, [StudyState.LISTED]) == now + 30
    rec = jobs.get_study(name, 1)
    assert rec is not None and rec.attempts == 1 and rec.reason.startswith("0xA702")
    jobs.update_study(name, 3, state=StudyState.FAILED, reason="empty study")
    assert jobs.due(name, StudyState.LISTED, 10, now + 100) == []
    assert jobs.next_due(name, [StudyState.LISTED]) is None
    with pytest.raises(JobError, match="only by retry"):
        jobs.update_study(name, 3, state=StudyState.LISTED)
    with pytest.raises(JobError, match="never due"):
        jobs.due(name, StudyState.FAILED, 1)
    assert jobs.count(name, StudyState.PENDING) == 4 and jobs.count(name, StudyState.FAILED) == 1
    # one mwork entry per non-final study, always, and one per failed study (operators' list)
    with spool.env.begin() as txn:
        assert txn.stat(spool._dbs["mwork"])["entries"] == 4 + 1


def test_job_states_pause_resume_cancel_retry_finish(spool: Spool) -> None:
    jobs = spool.jobs
    name = make_job(jobs, n=2)
    with pytest.raises(JobError, match="cannot resume.*not paused"):
        jobs.resume(name)
    assert jobs.pause(name).state is JobState.PAUSED
    with pytest.raises(JobError, match="is paused; cannot pause"):
        jobs.pause(name)
    assert jobs.active() == [] and jobs.unfinished() == [name]
    assert jobs.resume(name).state is JobState.INVENTORY       # the inventory had not finished
    jobs.pause(name)
    assert jobs.inventory_done(name) is JobState.PAUSED
    assert jobs.resume(name).state is JobState.RUNNING
    assert jobs.set_window(name, False) is JobState.WAITING_WINDOW
    assert jobs.set_window(name, False) is JobState.WAITING_WINDOW
    assert jobs.set_window(name, True) is JobState.RUNNING
    with pytest.raises(JobError, match="2 studies are not finished"):
        jobs.finish(name)
    jobs.set_instances(name, 0, insts(0, 1))
    jobs.update_study(name, 0, state=StudyState.FAILED, reason="missing at destination: 1.2.0.0", add_attempt=True)
    jobs.update_study(name, 1, state=StudyState.FAILED, reason="not found at source")
    assert jobs.finish(name) is JobState.DONE_WITH_ERRORS and jobs.finish(name) is JobState.DONE_WITH_ERRORS
    with pytest.raises(JobError, match=f"job {name} is done-with-errors; nothing to resume"):
        jobs.resume(name)
    assert jobs.active() == []
    assert jobs.retry(name) == 2
    st = jobs.status(name)
    assert st.state is JobState.RUNNING and st.studies_by_state == {"listed": 1, "pending": 1}
    rec = jobs.get_study(name, 0)
    assert rec is not None and (rec.attempts, rec.reason) == (0, "")
    assert jobs.active() == [name]
    jobs.set_error(name, "source OLDPACS refused: 0xA801 move destination unknown")
    assert "0xA801" in jobs.status(name).error
    assert jobs.cancel(name).state is JobState.CANCELLED
    with pytest.raises(JobError, match="cancelled; nothing to resume"):
        jobs.resume(name)
    with pytest.raises(JobError, match="cancelled; nothing to cancel"):
        jobs.cancel(name)
    assert jobs.finish(name) is JobState.CANCELLED


def test_finish_done_when_every_study_verified(spool: Spool) -> None:
    jobs = spool.jobs
    name = make_job(jobs, n=1)
    with pytest.raises(JobError, match="inventory is not done"):
        jobs.finish(name)
    jobs.inventory_done(name)
    jobs.update_study(name, 0, state=StudyState.VERIFIED)
    assert jobs.finish(name) is JobState.DONE
    st = jobs.status(name)
    assert st.eta_s == 0.0 and st.studies_done == 1
    assert set(st.to_json()) >= {"state", "studies_total", "studies_verified", "studies_failed",
                                 "instances_expected", "instances_received", "instances_delivered",
                                 "rate", "eta_s"}
    assert st.to_json()["state"] == "done"


def test_rate_over_the_last_minute_and_eta(spool: Spool) -> None:
    jobs = spool.jobs
    t0 = 1_000_000.0
    name = jobs.create(JobSpec(name="r", source="old", destinations=("new",), created_at=t0))
    jobs.add_studies(name, [StudyRecord(seq=-1, study_instance_uid="1.1", source_instances=10_000)], now=t0)
    jobs.inventory_done(name, now=t0)
    assert jobs.status(name, now=t0 + 1).eta_s is None            # no rate yet
    for i in range(120):                                         # 10 instances/s for 2 minutes
        t = t0 + 100 + i
        jobs.mark_received(name, 0, {f"1.1.{i}.{k}": i * 10 + k + 1 for k in range(10)}, now=t)
    st = jobs.status(name, now=t0 + 220)
    assert st.instances_received == 1200
    assert st.rate == pytest.approx(10.0, rel=0.1)
    assert st.eta_s == pytest.approx((10_000 - 1200) / st.rate, rel=0.01)
    # no arrivals for 30 s: the last minute holds 30 s of it
    assert jobs.status(name, now=t0 + 250).rate == pytest.approx(5.0, rel=0.15)
    assert jobs.status(name, now=t0 + 400).rate == 0.0
    # the ring stays small however long it runs
    with spool.env.begin() as txn:
        import json
        assert len(json.loads(bytes(txn.get(b"r", db=spool._dbs["mjob"])))["rs"]) <= 16


def test_report_order_and_columns_streamed(spool: Spool) -> None:
    jobs = spool.jobs
    name = jobs.create(JobSpec(name="rep", source="old", destinations=("new",)))
    uids = [f"2.{i}" for i in range(1203)]
    for k in range(0, len(uids), 400):
        jobs.add_studies(name, [StudyRecord(seq=-1, study_instance_uid=u, accession_number="A" + u)
                                for u in uids[k:k + 400]])
    jobs.add_studies(name, [StudyRecord(seq=-1, study_instance_uid="3.0", state=StudyState.FAILED,
                                        reason="not found at source")])
    rows = list(jobs.report(name))
    assert [r.study_instance_uid for r in rows] == uids + ["3.0"]
    assert [r.seq for r in rows] == list(range(1204))
    row = rows[-1].report_row()
    assert tuple(row) == REPORT_COLUMNS
    assert row["state"] == "failed" and row["reason"] == "not found at source" and row["source_instances"] is None
    assert jobs.status(name).studies_failed == 1
    # another job's studies never show up
    other = make_job(jobs, "other", n=2)
    assert len(list(jobs.report(other))) == 2 and len(list(jobs.report(name))) == 1204


def test_everything_survives_reopen(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s", map_size=64 * 1024**2)
    name = make_job(sp.jobs, n=3)
    sp.jobs.add_studies(name, [], progress={"ranges_done": [["19000101", "20000101"]]})
    sp.jobs.set_instances(name, 1, insts(1, 2))
    sp.jobs.mark_received(name, 1, {"1.2.1.0": 9})
    sp.jobs.update_study(name, 2, next_at=time.time() + 3600)
    before = sp.jobs.status(name)
    sp.close()
    sp = Spool(tmp_path / "s", map_size=64 * 1024**2)
    try:
        after = sp.jobs.status(name, now=before.updated_at)
        assert (after.state, after.studies_by_state, after.instances_expected, after.instances_received) == \
            (before.state, before.studies_by_state, before.instances_expected, before.instances_received)
        assert sp.jobs.inventory_progress(name) == {"ranges_done": [["19000101", "20000101"]]}
        assert [s.seq for s in sp.jobs.due(name, StudyState.PENDING, 10)] == [0]
        assert [r.sop_instance_uid for r in sp.jobs.missing(name, 1)] == ["1.2.1.1"]
        assert sp.jobs.spec(name).windows == (Window.parse("sat,sun 00:00-24:00"),)
    finally:
        sp.close()


def local(day: int, hh: int, mm: int) -> float:
    """Epoch seconds of local time on ISO weekday ``day`` of the week of 2026-11-30 (a Monday)."""
    return time.mktime((2026, 11, 29 + day, hh, mm, 0, 0, 0, -1))


def test_windows_parse_and_contain() -> None:
    w = Window.parse("19:00-07:00")
    assert (w.start_minute, w.end_minute, w.days) == (1140, 420, ()) and str(w) == "19:00-07:00"
    assert w.contains(local(3, 23, 0)) and w.contains(local(3, 6, 59)) and not w.contains(local(3, 7, 0))
    assert not w.contains(local(3, 12, 0)) and w.contains(local(3, 19, 0))
    we = Window.parse("sat,sun 00:00-24:00")
    assert we.days == (6, 7) and we.end_minute == 1440 and str(we) == "sat,sun 00:00-24:00"
    assert we.contains(local(6, 0, 0)) and we.contains(local(7, 23, 59)) and not we.contains(local(1, 0, 0))
    wk = Window.parse("mon-fri 19:00-07:00")
    assert wk.days == (1, 2, 3, 4, 5)
    assert wk.contains(local(6, 3, 0))          # opened Friday 19:00
    assert not wk.contains(local(7, 3, 0))      # Saturday night: closed
    assert not wk.contains(local(1, 3, 0))      # Monday 03:00: Sunday did not open it
    assert wk.contains(local(1, 20, 0))
    assert Window.parse("fri-mon 10:00-11:00").days == (1, 5, 6, 7)
    assert Window.parse(str(wk)) == wk
    assert in_windows((), 0) and in_windows((w, we), local(6, 12, 0)) and not in_windows((w,), local(6, 12, 0))
    for bad, why in [("7-19", "expected"), ("25:00-07:00", "25:00"), ("19:60-07:00", "19:60"),
                     ("24:00-07:00", "24:00"), ("caturday 19:00-07:00", "'caturday'"),
                     ("10:00-10:00", "same minute"), ("mon,,tue 10:00-11:00", "empty day")]:
        with pytest.raises(ValueError, match=why) as info:
            Window.parse(bad)
        assert repr(bad) in str(info.value)


def test_parse_rate() -> None:
    assert parse_rate("500/h") == (500.0, None)
    assert parse_rate("20/s") == (None, 20.0)
    assert parse_rate("600/min") == (None, 10.0)
    assert parse_rate(" 1.5/hour ") == (1.5, None)
    for bad in ("500", "fast", "0/h", "-3/s", "5/day"):
        with pytest.raises(ValueError, match="bad rate") as info:
            parse_rate(bad)
        assert repr(bad) in str(info.value)


def test_instance_records_are_compact_and_round_trip(spool: Spool) -> None:
    """A migration may hold 100M instance records: the packed value stays near its content."""
    from fastroute.spool.jobs import _decode_inst, _encode_inst

    sop = "1.2.826.0.1.3680043.8.498.12345678901234567890.1.2.3.4.5.6.7"
    series = "1.2.826.0.1.3680043.8.498.12345678901234567890.1.2.3.4.5"
    digest = "ab" * 32
    rec = InstanceRecord(sop, series, "1.2.840.10008.5.1.4.1.1.2", oid=2**40 + 3, digest=digest,
                         delivered=True, found=False, received=True, conflict=True)
    raw = _encode_inst(rec)
    assert _decode_inst(sop, raw) == rec
    assert len(raw) <= 9 + 2 + 3 + 1 + 25 + 32          # flags+oid, series suffix, class, digest
    odd = InstanceRecord("9.9", "1.2.3", "", digest="not hex é")
    assert _decode_inst("9.9", _encode_inst(odd)) == odd
    bare = InstanceRecord("9.8")
    assert _decode_inst("9.8", _encode_inst(bare)) == bare and len(_encode_inst(bare)) == 12


def test_retry_crosses_batches_and_leaves_final_successes(spool: Spool) -> None:
    jobs = spool.jobs
    name = jobs.create(JobSpec(name="many", source="old", destinations=("new",)))
    jobs.add_studies(name, [StudyRecord(seq=-1, study_instance_uid=f"5.{i}") for i in range(1203)])
    other = make_job(jobs, "zz-other", n=3)
    jobs.update_study(other, 0, state=StudyState.FAILED, reason="x")
    jobs.inventory_done(name)
    for seq in range(1203):
        jobs.update_study(name, seq, state=StudyState.VERIFIED if seq % 3 == 0 else StudyState.FAILED,
                          reason="" if seq % 3 == 0 else "no answer", add_attempt=True)
    assert jobs.finish(name) is JobState.DONE_WITH_ERRORS
    assert jobs.retry(name) == 802
    st = jobs.status(name)
    assert st.state is JobState.RUNNING and st.studies_by_state == {"verified": 401, "pending": 802}
    assert all(r.reason == "" and r.attempts == 0 for r in jobs.report(name) if r.state is StudyState.PENDING)
    assert jobs.count(other, StudyState.FAILED) == 1          # another job's studies untouched
    assert len(jobs.due(name, StudyState.PENDING, 2000)) == 802


def test_failed_studies_are_listed_from_the_index_in_inventory_order(spool: Spool) -> None:
    """Operators' views list failures without scanning the inventory (a million-study job):
    the index follows every change, a retry takes a study out of it."""
    jobs = spool.jobs
    name = jobs.create(JobSpec(name="idx", source="old", destinations=("new",)))
    jobs.add_studies(name, [StudyRecord(seq=0, study_instance_uid=f"1.2.{i}") for i in range(30)])
    for uid in ("1.2.25", "1.2.3", "1.2.17"):
        jobs.update_study(name, uid, state=StudyState.FAILED, reason=f"lost {uid}")
    failed = jobs.in_state(name, StudyState.FAILED, 10)
    assert [s.study_instance_uid for s in failed] == ["1.2.3", "1.2.17", "1.2.25"]
    assert [s.reason for s in failed] == ["lost 1.2.3", "lost 1.2.17", "lost 1.2.25"]
    assert len(jobs.in_state(name, StudyState.FAILED, 2)) == 2
    jobs.retry(name)
    assert jobs.in_state(name, StudyState.FAILED, 10) == []
    assert len(jobs.due(name, StudyState.PENDING, 100)) == 30      # the index is not "due"
