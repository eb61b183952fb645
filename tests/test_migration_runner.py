"""The migration runner's pure parts: which retrieves a study needs, backoff, rate, Message IDs."""
from __future__ import annotations

from fastroute.dicom.qr import Level
from fastroute.migration.runner import Backoff, MessageIds, Throttle, plan_units, split_classes
from fastroute.spool.jobs import InstanceRecord

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


def _instances(series: int, per: int, cls: str = CT) -> list[InstanceRecord]:
    return [InstanceRecord(f"1.2.3.{s}.{i}", f"1.2.3.{s}", cls) for s in range(series) for i in range(per)]


def test_a_small_study_missing_everything_is_one_study_level_retrieve() -> None:
    insts = _instances(2, 3)
    units = plan_units("1.2.3", insts, len(insts), series_threshold=10)
    assert [u.level for u in units] == [Level.STUDY]
    assert units[0].identifier == {"StudyInstanceUID": "1.2.3"}
    assert set(units[0].sop_uids) == {i.sop_instance_uid for i in insts}
    assert units[0].sop_classes == {CT}


def test_a_large_study_goes_series_by_series() -> None:
    insts = _instances(3, 5)
    units = plan_units("1.2.3", insts, len(insts), series_threshold=10)
    assert [u.level for u in units] == [Level.SERIES] * 3
    assert {u.identifier["SeriesInstanceUID"] for u in units} == {"1.2.3.0", "1.2.3.1", "1.2.3.2"}
    assert sum(len(u.sop_uids) for u in units) == 15


def test_only_what_is_missing_is_fetched_again_by_uid_lists() -> None:
    insts = _instances(2, 5)
    missing = [insts[1], insts[7], insts[8]]
    units = plan_units("1.2.3", missing, len(insts), series_threshold=1000, image_chunk=1)
    assert all(u.level is Level.IMAGE for u in units)
    assert sorted(uid for u in units for uid in u.sop_uids) == sorted(i.sop_instance_uid for i in missing)
    assert units[0].identifier == {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.0",
                                   "SOPInstanceUID": "1.2.3.0.1"}
    chunked = plan_units("1.2.3", missing, len(insts), series_threshold=1000, image_chunk=2)
    assert [u.identifier["SOPInstanceUID"] for u in chunked] == ["1.2.3.0.1", "1.2.3.1.2\\1.2.3.1.3"]
    assert plan_units("1.2.3", [], len(insts), 1000) == []


def test_c_get_with_more_storage_classes_than_one_association_holds_is_split() -> None:
    insts = [InstanceRecord(f"1.2.3.0.{i}", "1.2.3.0", f"1.2.840.99.{i}") for i in range(300)]
    unit = plan_units("1.2.3", insts, len(insts), series_threshold=1000)[0]
    parts = split_classes(unit, insts, limit=127)
    assert len(parts) == 3
    assert all(len(p.sop_classes) <= 127 for p in parts)
    assert sorted(uid for p in parts for uid in p.sop_uids) == sorted(unit.sop_uids)
    assert split_classes(unit, insts, limit=300) == [unit]


def test_c_get_units_fit_one_association_of_per_syntax_contexts() -> None:
    """Each class is offered once per stored syntax: the default split keeps a unit's
    contexts within one association (127 beside the C-GET context)."""
    from fastroute.dicom.qr import MAX_STORAGE_CLASSES, QueryRetrieveClient, storage_contexts
    from fastroute.dicom.dimse import Reply
    from fastroute.config import SourceConfig

    insts = [InstanceRecord(f"1.2.3.0.{i}", "1.2.3.0", f"1.2.840.99.{i % 20}") for i in range(40)]
    unit = plan_units("1.2.3", insts, len(insts), series_threshold=1000)[0]
    parts = split_classes(unit, insts)
    assert len(parts) == 3 and sorted(u for p in parts for u in p.sop_uids) == sorted(unit.sop_uids)
    src = SourceConfig(name="s", ae_title="X", host="127.0.0.1", port=1)
    for part in parts:
        contexts = storage_contexts(sorted(part.sop_classes))
        assert len(contexts) <= MAX_STORAGE_CLASSES
        QueryRetrieveClient(src, "ME", store=lambda p, m: Reply(0), storage=contexts)


def test_backoff_is_exponential_and_capped() -> None:
    b = Backoff(initial=5, cap=30)
    assert [b.failed(100.0) for _ in range(5)] == [5, 10, 20, 30, 30]
    assert b.until == 130.0
    b.succeeded()
    assert b.failed(0.0) == 5


def test_throttle_spaces_retrieves_by_studies_per_hour_or_instances_per_second() -> None:
    t = Throttle(studies_per_hour=360)
    assert t.ready(0.0)
    t.started(0.0, 100)
    assert not t.ready(9.9) and t.ready(10.0)
    t = Throttle(instances_per_s=50)
    t.started(0.0, 100)
    assert not t.ready(1.9) and t.ready(2.0)
    assert Throttle().ready(0.0)


def test_message_ids_are_unique_and_wrap_within_16_bits() -> None:
    ids = MessageIds(65534)
    assert [ids.take() for _ in range(4)] == [65534, 65535, 1, 2]


def test_a_copy_a_destination_gave_up_on_names_the_destination_and_status() -> None:
    from fastroute.migration.runner import _delivered_everywhere, _refused
    from fastroute.spool.records import Delivery, Failure, RoutingRecord

    rec = RoutingRecord(CT, "1.2.3.4", "1.2.840.10008.1.2.1", 10, 0.0, outstanding=[], routed_to=["a", "b"],
                        delivered={"a": Delivery(1.0, 0)}, failed={"b": Failure(2.0, 0x0122, "no context\n")})
    assert not _delivered_everywhere(rec, ["a", "b"]) and _delivered_everywhere(rec, ["a"])
    why = _refused(rec, ["a", "b"])
    assert why.startswith("b refused 1.2.3.4 (1.2.840.10008.5.1.4.1.1.2): 0x0122") and "\\n" in why
    still_trying = RoutingRecord(CT, "1.2.3.4", "1.2.840.10008.1.2.1", 10, 0.0, outstanding=["b"],
                                 failed={"b": Failure(2.0, 0xA700, "busy")})
    assert _refused(still_trying, ["b"]) == ""      # a retry is still due: not refused yet
