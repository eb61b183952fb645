"""fastroute.dicom.qr (the Q/R SCU) against real archives and a fault-injecting fake one.

What must hold: C-FIND at STUDY/SERIES/IMAGE finds what Orthanc and dcmqrscp hold; C-MOVE
delivers every instance to a DCMTK receiver (checked by its files); C-GET hands every
instance to the store handler byte-equal to what the archive holds (element by element);
and each way a retrieve goes wrong (0xA702, 0xB000 with its list, 0xA801, a total timeout,
a find closed early) ends the way the migration runner depends on: a clear RetrieveFailed, a
result with the failed list, or a C-CANCEL after which the association is still usable.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peers
import pydicom
import pytest
import qrpeers
import synth
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from qrpeers import DcmQrScp, FakeArchive

from fastroute.config import SourceConfig
from fastroute.dicom import acse, dimse, pdu
from fastroute.dicom.dimse import CommandField, Message, Peer, Pending, Reply
from fastroute.dicom.qr import (MAX_STORAGE_CLASSES, Level, QueryFailed, QueryRetrieveClient,
                                RetrieveFailed, SubOperations)
from fastroute.dicom.status import Status

CALLING = "QRSCU"
DEST_AE = "MOVEDEST"
STUDY_KEYS = {"StudyInstanceUID": None, "PatientID": None, "NumberOfStudyRelatedInstances": None,
              "ModalitiesInStudy": None, "StudyDate": None}


def source(ae: str, port: int, **kw: Any) -> SourceConfig:
    base: dict[str, Any] = dict(name=ae.lower(), ae_title=ae, host="127.0.0.1", port=port,
                                acse_timeout=10.0, dimse_timeout=20.0, network_timeout=20.0)
    base.update(kw)
    return SourceConfig(**base)


def make_studies(tmp: Path, n: int, per_study: int = 3) -> list[list[Path]]:
    return [synth.make_study(tmp / f"s{i}", modality="CT", n_instances=per_study, tiny=True,
                             patient_id=f"PAT{i}") for i in range(n)]


def uid_of(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True)[keyword].value)


# --------------------------------------------------------------------------------------------
# The fake archive: normal behaviour first, then each fault


@pytest.fixture
def archive(tmp_path: Path, storescp: Callable[..., peers.StoreSCP]) -> Iterator[tuple[FakeArchive, peers.StoreSCP, list[list[Path]]]]:
    dest = storescp(DEST_AE)
    studies = make_studies(tmp_path, 2)
    pacs = FakeArchive(destinations={DEST_AE: ("127.0.0.1", dest.port)})
    pacs.add_files([p for s in studies for p in s])
    with pacs:
        yield pacs, dest, studies


def test_find_levels_and_move_from_fake_archive(archive: Any) -> None:
    pacs, dest, studies = archive
    client = QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING)
    try:
        found = {str(d.StudyInstanceUID): d for d in client.find(Level.STUDY, STUDY_KEYS)}
        assert set(found) == {uid_of(s[0], "StudyInstanceUID") for s in studies}
        assert all(int(d.NumberOfStudyRelatedInstances) == 3 for d in found.values())
        study = uid_of(studies[0][0], "StudyInstanceUID")
        images = list(client.find(Level.IMAGE, {"StudyInstanceUID": study, "SOPInstanceUID": None}))
        assert sorted(str(d.SOPInstanceUID) for d in images) == sorted(uid_of(p) for p in studies[0])
        pending: list[SubOperations] = []
        expected_id = client.next_message_id()
        result = client.move({"StudyInstanceUID": study}, DEST_AE, on_pending=pending.append)
        assert result.status == Status.SUCCESS and result.message_id == expected_id
        assert result.counts.completed == 3 and result.counts.failed == 0
        assert [p.remaining for p in pending] == [2, 1, 0]
        dest.wait_for(3)
        assert sorted(dest.file_for(uid_of(p)) is not None for p in studies[0]) == [True] * 3
    finally:
        client.close()


def test_busy_source_a702_raises_back_off_then_succeeds(archive: Any) -> None:
    pacs, dest, studies = archive
    pacs.busy_moves = 1
    study = uid_of(studies[0][0], "StudyInstanceUID")
    with QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        with pytest.raises(RetrieveFailed) as info:
            client.move({"StudyInstanceUID": study}, DEST_AE)
        assert info.value.status == 0xA702 and info.value.back_off
        assert "out of resources" in str(info.value) and pacs.ae_title in str(info.value)
        result = client.move({"StudyInstanceUID": study}, DEST_AE)     # same association
        assert result.status == Status.SUCCESS and result.counts.completed == 3


def test_b000_final_carries_the_failed_instance_list(archive: Any) -> None:
    pacs, dest, studies = archive
    lost = uid_of(studies[0][1])
    pacs.fail_instances = {lost}
    with QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        result = client.move({"StudyInstanceUID": uid_of(studies[0][0], "StudyInstanceUID")}, DEST_AE)
    assert result.status == 0xB000
    assert result.failed_sop_instance_uids == [lost]
    dest.wait_for(2)


def test_unknown_move_destination_names_the_ae_to_register(archive: Any) -> None:
    pacs, dest, studies = archive
    with QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        with pytest.raises(RetrieveFailed) as info:
            client.move({"StudyInstanceUID": uid_of(studies[0][0], "StudyInstanceUID")}, "NOSUCHAE")
    text = str(info.value)
    assert info.value.status == 0xA801
    assert "register AE NOSUCHAE at FAKEPACS" in text and f"127.0.0.1:{pacs.port}" in text


def test_total_timeout_cancels_and_association_stays_usable(archive: Any) -> None:
    pacs, dest, studies = archive
    pacs.hang = True
    study = uid_of(studies[0][0], "StudyInstanceUID")
    with QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        started = time.monotonic()
        result = client.move({"StudyInstanceUID": study}, DEST_AE, timeout=1.0)
        assert time.monotonic() - started < 10
        assert result.timed_out and result.status == Status.CANCEL and pacs.cancels == 1
        assert result.counts.completed == 2 and result.counts.remaining == 1
        assoc = client.conn.assoc
        with pytest.raises(QueryFailed, match="total timeout"):
            list(client.find(Level.STUDY, STUDY_KEYS, timeout=1.0))
        assert pacs.cancels == 2
        pacs.hang = False
        assert len(list(client.find(Level.STUDY, STUDY_KEYS))) == 2
        assert client.conn.assoc is assoc           # never re-associated


def test_peer_ignoring_cancel_is_aborted(archive: Any) -> None:
    pacs, dest, studies = archive
    pacs.hang = pacs.ignore_cancel = True
    src = source(pacs.ae_title, pacs.port, dimse_timeout=2.0)
    with QueryRetrieveClient(src, CALLING) as client:
        with pytest.raises(QueryFailed, match="association aborted"):
            list(client.find(Level.STUDY, STUDY_KEYS, timeout=0.5))
        assert client.conn.assoc is None
        pacs.hang = pacs.ignore_cancel = False
        assert len(list(client.find(Level.STUDY, STUDY_KEYS))) == 2   # a fresh association


def test_find_closed_early_cancels_and_drains(tmp_path: Path) -> None:
    pacs = FakeArchive()
    pacs.add_files(p for s in make_studies(tmp_path, 5, per_study=1) for p in s)
    pacs.hang = True            # after its matches it would wait for a cancel forever
    with pacs, QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        matches = client.find(Level.STUDY, STUDY_KEYS)
        first = next(matches)
        assert first.StudyInstanceUID
        matches.close()
        assert client.closed_early and pacs.cancels == 1
        assert pacs.requests[-1].status == 0xFE00
        pacs.hang = False
        assert len(list(client.find(Level.STUDY, STUDY_KEYS))) == 5


def test_capped_find_and_refused_image_level(tmp_path: Path) -> None:
    pacs = FakeArchive(max_matches=2, cap_status=0xA700, image_level=False)
    pacs.add_files(p for s in make_studies(tmp_path, 4, per_study=1) for p in s)
    with pacs, QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        got: list[Dataset] = []
        with pytest.raises(QueryFailed) as info:
            for ds in client.find(Level.STUDY, STUDY_KEYS):
                got.append(ds)
        assert info.value.status == 0xA700 and len(got) == 2
        with pytest.raises(QueryFailed) as info:
            list(client.find(Level.IMAGE, {"SOPInstanceUID": None}))
        assert info.value.status == 0xA900
        pacs.cap_status = None          # silently capped: success with N matches
        assert len(list(client.find(Level.STUDY, STUDY_KEYS))) == 2


def test_final_before_last_store_arrives(archive: Any) -> None:
    pacs, dest, studies = archive
    pacs.early_final = True
    with QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        result = client.move({"StudyInstanceUID": uid_of(studies[0][0], "StudyInstanceUID")}, DEST_AE)
    assert result.status == Status.SUCCESS and result.counts.completed == 2
    dest.wait_for(3)        # the last one arrives after the final response


def test_get_from_fake_archive_with_pending_store_handler(tmp_path: Path) -> None:
    """C-GET's C-STOREs go to the handler, which may answer on another thread (Pending)."""
    from concurrent.futures import ThreadPoolExecutor

    files = make_studies(tmp_path, 1)[0]
    pacs = FakeArchive().add_files(files)
    got: dict[str, bytes] = {}
    pool = ThreadPoolExecutor(1)

    def store(peer: Peer, msg: Message) -> Pending:
        assert isinstance(msg.data, bytearray)
        got[msg.sop_instance_uid] = bytes(msg.data)
        return Pending(pool.submit(lambda: 0), lambda fut: Reply(fut.result()))

    ct = "1.2.840.10008.5.1.4.1.1.2"
    with pacs, QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING, store=store,
                                   storage=[(ct, ())]) as client:
        result = client.get({"StudyInstanceUID": uid_of(files[0], "StudyInstanceUID")})
    pool.shutdown()
    assert result.status == Status.SUCCESS and result.counts.completed == 3
    assert sorted(got) == sorted(uid_of(p) for p in files)


def test_too_many_storage_classes_is_the_callers_to_split() -> None:
    classes = [(f"1.2.3.{i}", ()) for i in range(MAX_STORAGE_CLASSES + 1)]
    with pytest.raises(ValueError, match="split"):
        QueryRetrieveClient(source("X", 1), CALLING, store=lambda p, m: Reply(0), storage=classes)


def test_association_rejected_is_a_clear_retrieve_failure() -> None:
    port = peers.free_port()        # nothing listens
    client = QueryRetrieveClient(source("NOBODY", port), CALLING)
    with pytest.raises(RetrieveFailed, match=f"NOBODY@127.0.0.1:{port}"):
        client.move({"StudyInstanceUID": "1.2.3"}, DEST_AE)


# --------------------------------------------------------------------------------------------
# Unit: encoders and role negotiation


def test_request_encoders_round_trip() -> None:
    move = pdu.decode_command(memoryview(dimse.encode_c_move_rq(7, qrpeers.STUDY_ROOT_MOVE, "DEST")))
    assert move[pdu.COMMAND_FIELD] == CommandField.C_MOVE_RQ and move[dimse.MOVE_DESTINATION] == "DEST"
    assert move[pdu.MESSAGE_ID] == 7 and dimse.has_dataset(move)
    cancel = pdu.decode_command(memoryview(dimse.encode_c_cancel_rq(7)))
    assert cancel[pdu.COMMAND_FIELD] == 0x0FFF and cancel[pdu.MESSAGE_ID_BEING_RESPONDED_TO] == 7
    assert not dimse.has_dataset(cancel)
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Doe^J"
    for ts in ("1.2.840.10008.1.2", ExplicitVRLittleEndian):
        back = dimse.decode_identifier(dimse.encode_identifier(ds, ts), ts)
        assert back.PatientName == "Doe^J" and back.QueryRetrieveLevel == "STUDY"


def test_request_proposes_several_syntaxes_and_scp_roles() -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    rq, contexts = acse.request("A", "B", [(qrpeers.STUDY_ROOT_GET, ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")),
                                           (ct, tuple(acse.ACCEPTED_SYNTAXES))], 0, scp_roles=[ct])
    assert [len(cx.transfer_syntax) for cx in contexts] == [2, len(acse.ACCEPTED_SYNTAXES)]
    roles = [i for i in rq.user_information if type(i).__name__ == "SCP_SCU_RoleSelectionNegotiation"]
    assert [(str(r.sop_class_uid), r.scu_role, r.scp_role) for r in roles] == [(ct, False, True)]
