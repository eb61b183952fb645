"""fastroute.dicom.qr (the Q/R SCU) against real archives and a fault-injecting fake one.

What must hold: C-FIND at STUDY/SERIES/IMAGE finds what Orthanc and dcmqrscp hold; C-MOVE
delivers every instance to a DCMTK receiver (checked by its files); C-GET hands every
instance to the store handler byte-equal to what the archive holds (element by element);
and each way a retrieve goes wrong (0xA702, 0xB000 with its list, 0xA801, a total timeout,
a find closed early) ends the way the migration runner depends on: a clear RetrieveFailed, a
result with the failed list, or a C-CANCEL after which the association is still usable.
"""
from __future__ import annotations

import select
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


def wait_readable(sock: Any, timeout: float) -> bool:
    """Whether ``sock`` has bytes to read within ``timeout`` s."""
    return bool(select.select([sock], [], [], timeout)[0])


def test_find_closed_early_cancels_and_drains(tmp_path: Path) -> None:
    pacs = FakeArchive()
    pacs.add_files(p for s in make_studies(tmp_path, 5, per_study=1) for p in s)
    pacs.hang = True            # after its matches it would wait for a cancel forever
    pacs.match_delay = 0.2      # one match at a time: the next arrives after the first is read
    with pacs, QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        matches = client.find(Level.STUDY, STUDY_KEYS)
        first = next(matches)
        assert first.StudyInstanceUID
        # the next match is on the wire, unread, when the C-CANCEL goes: it is the find's,
        # not a sign that the peer ended the association
        assert wait_readable(client.conn.assoc.sock, 10)
        matches.close()
        assert client.closed_early and pacs.cancels == 1 and client.conn.assoc is not None
        assert pacs.requests[-1].status == 0xFE00
        pacs.hang, pacs.match_delay = False, 0.0
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
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

    roles = [i for i in rq.user_information if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    assert [(str(r.sop_class_uid), r.scu_role, r.scp_role) for r in roles] == [(ct, False, True)]


# --------------------------------------------------------------------------------------------
# Real archives: Orthanc and DCMTK dcmqrscp

REAL_FILES = ["MR2_UNCR.dcm", "emri_small_RLE.dcm", "MR2_J2KR.dcm"]


def decode_received(data: bytes, ts: str) -> Dataset:
    """A C-STORE dataset as pydicom reads it in its context's transfer syntax."""
    from io import BytesIO

    from pydicom.filereader import read_dataset
    from pydicom.uid import UID

    uid = UID(ts)
    return read_dataset(BytesIO(data), uid.is_implicit_VR, uid.is_little_endian)


def check_levels(client: QueryRetrieveClient, files: list[Path], *, counts: bool) -> None:
    """C-FIND at STUDY, SERIES and IMAGE finds exactly the study in ``files``."""
    study = uid_of(files[0], "StudyInstanceUID")
    studies = list(client.find(Level.STUDY, {**STUDY_KEYS, "StudyInstanceUID": study}))
    assert [str(d.StudyInstanceUID) for d in studies] == [study]
    assert str(studies[0].PatientID) == uid_of(files[0], "PatientID")
    if counts:
        assert int(studies[0].NumberOfStudyRelatedInstances) == len(files)
    series = list(client.find(Level.SERIES, {"StudyInstanceUID": study, "SeriesInstanceUID": None,
                                              "Modality": None}))
    assert {str(d.SeriesInstanceUID) for d in series} == {uid_of(p, "SeriesInstanceUID") for p in files}
    for one in series:
        uid = str(one.SeriesInstanceUID)
        images = list(client.find(Level.IMAGE, {"StudyInstanceUID": study, "SeriesInstanceUID": uid,
                                                 "SOPInstanceUID": None, "SOPClassUID": None}))
        assert sorted(str(d.SOPInstanceUID) for d in images) == sorted(
            uid_of(p) for p in files if uid_of(p, "SeriesInstanceUID") == uid)


@pytest.fixture
def orthanc_source(orthanc: peers.Orthanc, tmp_path: Path, pydicom_data_dir: Path) -> tuple[peers.Orthanc, list[Path], list[Path]]:
    """The session Orthanc holding a fresh synthetic study and some real files; QRSCU known."""
    qrpeers.register_modality(orthanc, "qrscu", CALLING, 104)
    study = synth.make_study(tmp_path / "study", modality="CT", n_instances=3, tiny=True)
    real = [pydicom_data_dir / name for name in REAL_FILES]
    qrpeers.load_orthanc(orthanc, [*study, *real])
    return orthanc, study, real


def test_orthanc_find_levels_and_move(orthanc_source: Any, storescp: Callable[..., peers.StoreSCP]) -> None:
    orthanc, study, real = orthanc_source
    dest = storescp(DEST_AE)
    qrpeers.register_modality(orthanc, "movedest", DEST_AE, dest.port)
    with QueryRetrieveClient(source(orthanc.ae_title, orthanc.dicom_port), CALLING) as client:
        check_levels(client, study, counts=True)
        # a real archive's answer closed early: cancelled and drained, the association goes on
        images = client.find(Level.IMAGE, {"StudyInstanceUID": uid_of(study[0], "StudyInstanceUID"),
                                           "SOPInstanceUID": None})
        assert next(images).SOPInstanceUID
        images.close()
        assert client.closed_early and client.conn.assoc is not None
        pending: list[SubOperations] = []
        result = client.move({"StudyInstanceUID": uid_of(study[0], "StudyInstanceUID")}, DEST_AE,
                             on_pending=pending.append)
        assert result.status == Status.SUCCESS, result
        assert result.counts.completed == 3 and not result.counts.failed
        assert pending and pending[-1].completed is not None
        # one instance by IMAGE level, identifier's own level
        one = Dataset()
        one.QueryRetrieveLevel = "IMAGE"
        one.StudyInstanceUID = uid_of(real[0], "StudyInstanceUID")
        one.SeriesInstanceUID = uid_of(real[0], "SeriesInstanceUID")
        one.SOPInstanceUID = uid_of(real[0])
        assert client.move(one, DEST_AE).counts.completed == 1
    got = dest.wait_for(4)
    assert {uid_of(p) for p in got} == {uid_of(p) for p in [*study, real[0]]}
    for path in study:
        from dicomcompare import assert_same_dataset
        received = dest.file_for(uid_of(path))
        assert received is not None
        assert_same_dataset(pydicom.dcmread(received), pydicom.dcmread(path))


def test_orthanc_get_hands_every_instance_to_the_handler(orthanc_source: Any) -> None:
    from dicomcompare import assert_same_dataset

    orthanc, study, real = orthanc_source
    got: dict[str, tuple[bytes, str]] = {}

    def store(peer: Peer, msg: Message) -> Reply:
        assert isinstance(msg.data, bytearray)
        got[msg.sop_instance_uid] = (bytes(msg.data), peer.contexts[msg.context_id])
        return Reply(Status.SUCCESS)

    files = [*study, *real]
    # each class in any syntax, and once more in each syntax it is stored in (sent as stored)
    stored = sorted({(uid_of(p, "SOPClassUID"), str(pydicom.dcmread(p).file_meta.TransferSyntaxUID))
                     for p in files})
    storage = [(c, ()) for c in sorted({c for c, _ in stored})] + [(c, (ts,)) for c, ts in stored]
    with QueryRetrieveClient(source(orthanc.ae_title, orthanc.dicom_port), CALLING, store=store,
                             storage=storage) as client:
        assert not client.refused_storage or client.conn.assoc is None
        for path in (study[0], *real):
            result = client.get({"StudyInstanceUID": uid_of(path, "StudyInstanceUID")})
            assert result.status == Status.SUCCESS, result
        assert not client.refused_storage
    assert set(got) == {uid_of(p) for p in files}
    for path in files:
        data, ts = got[uid_of(path)]
        original = pydicom.dcmread(path)
        assert ts == str(original.file_meta.TransferSyntaxUID)       # sent as stored
        if 0xFFFCFFFC in original:        # Data Set Trailing Padding: Part 10 only, dropped
            del original[0xFFFCFFFC]
        assert_same_dataset(decode_received(data, ts), original)


def test_dcmqrscp_find_levels_move_and_get(tmp_path: Path, dcmrecv: Callable[..., peers.DcmRecv],
                                           pydicom_data_dir: Path) -> None:
    dest = dcmrecv(DEST_AE)
    study = synth.make_study(tmp_path / "study", modality="MR", n_series=2, n_instances=2, tiny=True)
    real = pydicom_data_dir / "MR2_UNCR.dcm"
    with DcmQrScp(destinations={DEST_AE: ("127.0.0.1", dest.port)},
                  workdir=tmp_path / "dcmqrscp") as qr:
        qr.load([*study, real])
        with QueryRetrieveClient(source(qr.ae_title, qr.port), CALLING) as client:
            check_levels(client, study, counts=False)
            found = list(client.find(Level.STUDY, {"StudyInstanceUID": uid_of(real, "StudyInstanceUID")}))
            assert len(found) == 1
            result = client.move({"StudyInstanceUID": uid_of(study[0], "StudyInstanceUID")}, DEST_AE)
            assert result.status == Status.SUCCESS and result.counts.completed == 4, result
            with pytest.raises(RetrieveFailed) as info:
                client.move({"StudyInstanceUID": uid_of(study[0], "StudyInstanceUID")}, "UNKNOWNAE")
            assert info.value.status == 0xA801 and "register AE UNKNOWNAE at DCMQRSCP" in str(info.value)
        got = dest.wait_for(4)
        assert {uid_of(p) for p in got} == {uid_of(p) for p in study}
        handed: dict[str, bytes] = {}

        def store(peer: Peer, msg: Message) -> Reply:
            assert isinstance(msg.data, bytearray)
            handed[msg.sop_instance_uid] = bytes(msg.data)
            return Reply(Status.SUCCESS)

        mr = uid_of(study[0], "SOPClassUID")
        with QueryRetrieveClient(source(qr.ae_title, qr.port), CALLING, store=store,
                                 storage=[(mr, ())]) as client:
            result = client.get({"StudyInstanceUID": uid_of(study[0], "StudyInstanceUID")})
        assert result.status == Status.SUCCESS and result.counts.completed == 4, result
        assert set(handed) == {uid_of(p) for p in study}


# --------------------------------------------------------------------------------------------
# fastroute query


def test_cli_query_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fastroute.cli import main

    studies = make_studies(tmp_path, 3, per_study=2)
    pacs = FakeArchive().add_files(p for s in studies for p in s)
    with pacs:
        cfg = tmp_path / "fastroute.yaml"
        cfg.write_text(f"ae_title: QRSCU\nspool: {tmp_path / 'spool'}\nsources:\n"
                       f"  oldpacs: {{ae_title: {pacs.ae_title}, host: 127.0.0.1, port: {pacs.port}}}\n")
        assert main(["query", "oldpacs", "PatientID=PAT1", "--json", "-c", str(cfg)]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == 1 and rows[0]["PatientID"] == "PAT1"
        assert rows[0]["StudyInstanceUID"] == uid_of(studies[1][0], "StudyInstanceUID")
        assert rows[0]["NumberOfStudyRelatedInstances"] == "2" and rows[0]["ModalitiesInStudy"] == "CT"
        # -c first, a range and a wildcard, the table
        assert main(["-c", str(cfg), "query", "oldpacs", "PatientID=PAT*", "StudyDate=19000101-"]) == 0
        out = capsys.readouterr()
        lines = out.out.splitlines()
        assert lines[0].split()[:2] == ["StudyInstanceUID", "PatientID"] and len(lines) == 4
        assert "3 match(es) at STUDY level from FAKEPACS" in out.err
        assert main(["query", "oldpacs", "--level", "image", "-c", str(cfg),
                     f"StudyInstanceUID={uid_of(studies[0][0], 'StudyInstanceUID')}", "--json"]) == 0
        images = json.loads(capsys.readouterr().out)
        assert sorted(r["SOPInstanceUID"] for r in images) == sorted(uid_of(p) for p in studies[0])
        assert pacs.requests[-1].identifier.QueryRetrieveLevel == "IMAGE"
        assert main(["query", "oldpacs", "NoSuchKeyword=1", "-c", str(cfg)]) == 1
        assert "not KEYWORD=VALUE" in capsys.readouterr().err
        pacs.max_matches, pacs.cap_status = 1, 0xC000
        assert main(["query", "oldpacs", "-c", str(cfg)]) == 1
        assert "0xC000" in capsys.readouterr().err


def test_get_refused_role_is_said_clearly(tmp_path: Path) -> None:
    files = make_studies(tmp_path, 1, per_study=1)[0]
    pacs = FakeArchive(refuse_get_role=True).add_files(files)
    ct = "1.2.840.10008.5.1.4.1.1.2"
    with pacs, QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING,
                                   store=lambda p, m: Reply(0), storage=[(ct, ())]) as client:
        with pytest.raises(RetrieveFailed, match="refused to send any of the 1 storage SOP class") as info:
            client.get({"StudyInstanceUID": uid_of(files[0], "StudyInstanceUID")})
        assert "use retrieve: move" in str(info.value)
        assert client.refused_storage == {ct: "SCP role not granted (role selection refused)"}
        assert not [r for r in pacs.requests if r.command == "C-GET"]        # never sent


def test_association_rejected_names_the_called_ae(orthanc: peers.Orthanc) -> None:
    client = QueryRetrieveClient(source("NOTORTHANC", orthanc.dicom_port), CALLING)
    with pytest.raises(RetrieveFailed, match="association rejected by QRSCU -> NOTORTHANC@127.0.0.1"):
        client.move({"StudyInstanceUID": "1.2.3"}, DEST_AE)
    with pytest.raises(QueryFailed, match="called AE title not recognised"):
        list(client.find(Level.STUDY, STUDY_KEYS))


def test_command_elements_past_the_group_length_are_kept_not_fatal() -> None:
    """Orthanc appends the C-GET-RSP's failed list to the command set itself."""
    command = dimse.encode_response({pdu.COMMAND_FIELD: CommandField.C_GET_RQ, pdu.MESSAGE_ID: 3},
                                    0xB000)
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = ["1.2.3", "1.2.4"]
    trailing = dimse.encode_identifier(ds, "1.2.840.10008.1.2")
    decoded = pdu.decode_command(memoryview(command + trailing))
    assert decoded[pdu.STATUS] == 0xB000 and decoded[pdu.TRAILING_ELEMENTS] == trailing
    with pytest.raises(pdu.ProtocolError, match="not in the command group"):
        pdu.decode_command(memoryview(trailing))      # without a group length: still refused


def test_orthanc_get_failure_lists_what_it_could_not_send(orthanc_source: Any) -> None:
    """One context per class, accepted uncompressed: Orthanc cannot send its JPEG 2000 copy
    and says so in the failed list (which it puts in the command set)."""
    orthanc, study, real = orthanc_source
    j2k = next(p for p in real if p.name == "MR2_J2KR.dcm")
    got: list[str] = []

    def store(peer: Peer, msg: Message) -> Reply:
        got.append(msg.sop_instance_uid)
        return Reply(Status.SUCCESS)

    with QueryRetrieveClient(source(orthanc.ae_title, orthanc.dicom_port), CALLING, store=store,
                             storage=[(uid_of(j2k, "SOPClassUID"), ("1.2.840.10008.1.2.1",))]) as client:
        result = client.get({"QueryRetrieveLevel": "IMAGE",
                             "StudyInstanceUID": uid_of(j2k, "StudyInstanceUID"),
                             "SeriesInstanceUID": uid_of(j2k, "SeriesInstanceUID"),
                             "SOPInstanceUID": uid_of(j2k)})
        assert result.status != Status.SUCCESS and result.counts.failed == 1, result
        assert result.failed_sop_instance_uids == [uid_of(j2k)] and got == []
        assert client.conn.assoc is not None          # the association survived it


def test_generated_archive_answers_date_ranges_and_moves(storescp: Callable[..., peers.StoreSCP]) -> None:
    """The lazily generated archive the migration's scale test uses: a date-range C-FIND
    costs its matches, empty StudyDates exist, and a generated study can be moved."""
    gen = qrpeers.Generated(20_000, series=2, per_series=2)
    dest = storescp(DEST_AE)
    pacs = FakeArchive(generated=gen, destinations={DEST_AE: ("127.0.0.1", dest.port)})
    in_2001 = {gen.study_uid(i) for i in range(gen.n_studies) if gen.study_date(i).startswith("2001")}
    empty = [i for i in range(gen.n_studies) if not gen.study_date(i)]
    assert in_2001 and empty
    with pacs, QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        started = time.monotonic()
        found = list(client.find(Level.STUDY, {**STUDY_KEYS, "StudyDate": "20010101-20011231"}))
        assert {str(d.StudyInstanceUID) for d in found} == in_2001
        assert all(int(d.NumberOfStudyRelatedInstances) == 4 for d in found)
        assert time.monotonic() - started < 30
        one = list(client.find(Level.STUDY, {**STUDY_KEYS, "StudyInstanceUID": gen.study_uid(empty[1])}))
        assert len(one) == 1 and str(one[0].StudyDate) == ""
        images = list(client.find(Level.IMAGE, {"StudyInstanceUID": gen.study_uid(7), "SOPInstanceUID": None}))
        assert len(images) == 4
        result = client.move({"StudyInstanceUID": gen.study_uid(7)}, DEST_AE)
        assert result.status == Status.SUCCESS and result.counts.completed == 4
    assert {uid_of(p) for p in dest.wait_for(4)} == {str(d.SOPInstanceUID) for d in images}


@pytest.mark.parametrize("archive_kind", ["orthanc", "dcmqrscp", "fake"])
def test_move_originator_of_the_sub_operations_is_ours(archive_kind: str, request: pytest.FixtureRequest,
                                                       tmp_path: Path) -> None:
    """What the migration attributes arriving objects by: each C-STORE a C-MOVE causes carries
    our AE title and the C-MOVE's Message ID as Move Originator (checked per archive)."""
    from pynetdicom import AE, StoragePresentationContexts, evt

    seen: list[tuple[str, int | None]] = []

    def on_store(event: Any) -> int:
        rq = event.request
        seen.append((str(rq.MoveOriginatorApplicationEntityTitle or "").strip(),
                     rq.MoveOriginatorMessageID))
        return 0

    receiver = AE(ae_title=DEST_AE)
    receiver.supported_contexts = StoragePresentationContexts
    port = peers.free_port()
    server = receiver.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    files = synth.make_study(tmp_path / "study", modality="CT", n_instances=2, tiny=True)
    study = uid_of(files[0], "StudyInstanceUID")
    try:
        if archive_kind == "orthanc":
            orthanc: peers.Orthanc = request.getfixturevalue("orthanc")
            qrpeers.register_modality(orthanc, "qrscu", CALLING, 104)
            qrpeers.register_modality(orthanc, "movedest", DEST_AE, port)   # replaces an earlier test's
            qrpeers.load_orthanc(orthanc, files)
            src = source(orthanc.ae_title, orthanc.dicom_port)
            ctx: Any = None
        elif archive_kind == "dcmqrscp":
            request.getfixturevalue("dcmtk")
            ctx = DcmQrScp(destinations={DEST_AE: ("127.0.0.1", port)}, workdir=tmp_path / "qr").start()
            ctx.load(files)
            src = source(ctx.ae_title, ctx.port)
        else:
            ctx = FakeArchive(destinations={DEST_AE: ("127.0.0.1", port)}).add_files(files).start()
            src = source(ctx.ae_title, ctx.port)
        try:
            with QueryRetrieveClient(src, CALLING) as client:
                client.move({"StudyInstanceUID": study}, DEST_AE)        # message 1
                expected = client.next_message_id()
                result = client.move({"StudyInstanceUID": study}, DEST_AE)
            assert result.message_id == expected and result.counts.completed == 2
            peers.wait_until(lambda: len(seen) >= 4, 10, message=lambda: f"C-STOREs seen: {seen}")
            assert seen[2:] == [(CALLING, expected)] * 2, seen
        finally:
            if ctx is not None:
                ctx.stop()
    finally:
        server.shutdown()


def test_each_wait_is_bounded_by_the_dimse_timeout(archive: Any) -> None:
    """A source silent for longer than dimse_timeout (total not reached) loses the association."""
    pacs, dest, studies = archive
    pacs.hang = True
    with QueryRetrieveClient(source(pacs.ae_title, pacs.port, dimse_timeout=1.0), CALLING) as client:
        started = time.monotonic()
        with pytest.raises(RetrieveFailed, match=r"within the DIMSE timeout \(1 s\)"):
            client.move({"StudyInstanceUID": uid_of(studies[0][0], "StudyInstanceUID")}, DEST_AE,
                         timeout=60)
        assert time.monotonic() - started < 30 and client.conn.assoc is None


def test_on_pending_raising_cancels_the_retrieve(archive: Any) -> None:
    """A caller that gives up from its on_pending callback (a job paused) cancels the move."""
    pacs, dest, studies = archive
    pacs.hang = True                         # it would never finish by itself

    def give_up(counts: SubOperations) -> None:
        raise KeyboardInterrupt("paused")

    with QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        with pytest.raises(KeyboardInterrupt):
            client.move({"StudyInstanceUID": uid_of(studies[0][0], "StudyInstanceUID")}, DEST_AE,
                        on_pending=give_up)
        assert pacs.cancels == 1 and pacs.requests[-1].status == 0xFE00
        pacs.hang = False
        assert len(list(client.find(Level.STUDY, STUDY_KEYS))) == 2      # still usable


def test_storage_batches_keep_a_class_together() -> None:
    from fastroute.dicom.qr import storage_batches

    classes = [(f"1.2.3.{i}", ()) for i in range(300)] + [("1.2.3.5", ("1.2.840.10008.1.2.4.90",))]
    batches = storage_batches(classes)
    assert [len(b) for b in batches] == [127, 127, 47]
    assert sum(1 for b in batches for c, _ in b if c == "1.2.3.5") == 2
    assert any(("1.2.3.5", ()) in b and ("1.2.3.5", ("1.2.840.10008.1.2.4.90",)) in b for b in batches)
    for batch in batches:
        QueryRetrieveClient(source("X", 1), CALLING, store=lambda p, m: Reply(0), storage=batch)


def test_storage_contexts_one_per_class_and_stored_syntax_split_by_whole_classes() -> None:
    from fastroute.dicom.qr import (STORED_SYNTAXES, classes_per_association, storage_batches,
                                    storage_contexts)

    contexts = storage_contexts([f"1.2.3.{i}" for i in range(20)] + ["1.2.3.0"])
    assert len(contexts) == 20 * len(STORED_SYNTAXES)
    assert all(len(ts) == 1 for _, ts in contexts)
    assert {ts[0] for c, ts in contexts if c == "1.2.3.7"} == set(STORED_SYNTAXES)
    per = classes_per_association()
    assert per * len(STORED_SYNTAXES) <= MAX_STORAGE_CLASSES < (per + 1) * len(STORED_SYNTAXES)
    batches = storage_batches(contexts)
    assert [len({c for c, _ in b}) for b in batches] == [per, per, 20 - 2 * per]
    for batch in batches:       # each fits one association beside the C-GET context
        QueryRetrieveClient(source("X", 1), CALLING, store=lambda p, m: Reply(0), storage=batch)


def test_set_next_message_id_is_the_id_the_next_request_carries(archive: Any) -> None:
    pacs, dest, studies = archive
    study = uid_of(studies[0][0], "StudyInstanceUID")
    with QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        client.set_next_message_id(4242)
        assert client.next_message_id() == 4242
        result = client.move({"StudyInstanceUID": study}, DEST_AE)
        assert result.message_id == 4242 and pacs.requests[-1].message_id == 4242
        client.set_next_message_id(65535)
        assert client.move({"StudyInstanceUID": study}, DEST_AE).message_id == 65535
        assert client.next_message_id() == 1                  # wraps past 65535
        with pytest.raises(ValueError):
            client.set_next_message_id(0)


def test_fake_archive_matches_a_list_of_uids_in_one_request(archive: Any) -> None:
    """PS3.4 C.2.2.2.2: a UID key with several values matches any of them."""
    pacs, dest, studies = archive
    wanted = [uid_of(studies[0][0]), uid_of(studies[1][2])]
    with QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        found = list(client.find(Level.IMAGE, {"StudyInstanceUID": None, "SOPInstanceUID": wanted}))
        assert sorted(str(d.SOPInstanceUID) for d in found) == sorted(wanted)
        studies_found = list(client.find(Level.STUDY, {"StudyInstanceUID": [uid_of(s[0], "StudyInstanceUID")
                                                                             for s in studies]}))
        assert len(studies_found) == 2
        pacs.ignore_uid_lists = True           # like archives that take the list as one value
        assert list(client.find(Level.IMAGE, {"StudyInstanceUID": None, "SOPInstanceUID": wanted})) == []


def test_slow_archive_find_ends_at_its_total_timeout(tmp_path: Path) -> None:
    pacs = FakeArchive(match_delay=0.3)
    pacs.add_files(p for s in make_studies(tmp_path, 10, per_study=1) for p in s)
    with pacs, QueryRetrieveClient(source(pacs.ae_title, pacs.port), CALLING) as client:
        got: list[Dataset] = []
        with pytest.raises(QueryFailed, match="total timeout") as info:
            for ds in client.find(Level.STUDY, STUDY_KEYS, timeout=1.0):
                got.append(ds)
        assert info.value.status is None and 1 <= len(got) < 10 and pacs.cancels == 1


@pytest.mark.parametrize("archive_kind", ["orthanc", "dcmqrscp"])
def test_real_archive_failed_sub_operations_are_listed(archive_kind: str, request: pytest.FixtureRequest,
                                                       tmp_path: Path,
                                                       storescp: Callable[..., peers.StoreSCP]) -> None:
    """A destination refusing the SOP class: dcmqrscp's final response lists what failed;
    Orthanc ends the whole move 0xC000 without counts or list (recorded here: the migration
    cannot rely on the list and must verify at the destination)."""
    dest = storescp(DEST_AE, accept=["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
                    sop_classes=["1.2.840.10008.5.1.4.1.1.4"])       # MR only
    ct = synth.make_study(tmp_path / "ct", modality="CT", n_instances=2, tiny=True)
    study = uid_of(ct[0], "StudyInstanceUID")
    qr: Any = None
    if archive_kind == "orthanc":
        orthanc: peers.Orthanc = request.getfixturevalue("orthanc")
        qrpeers.register_modality(orthanc, "qrscu", CALLING, 104)
        qrpeers.register_modality(orthanc, "movedest", DEST_AE, dest.port)
        qrpeers.load_orthanc(orthanc, ct)
        src = source(orthanc.ae_title, orthanc.dicom_port)
    else:
        qr = DcmQrScp(destinations={DEST_AE: ("127.0.0.1", dest.port)}, workdir=tmp_path / "qr").start()
        qr.load(ct)
        src = source(qr.ae_title, qr.port)
    try:
        with QueryRetrieveClient(src, CALLING) as client:
            try:
                result = client.move({"StudyInstanceUID": study}, DEST_AE)
            except RetrieveFailed as exc:          # 0xA702: every sub-operation failed
                assert exc.result is not None, exc
                result = exc.result
        assert result.status != Status.SUCCESS and result.counts.completed in (0, None), result
        if archive_kind == "orthanc":
            # Orthanc gives up the whole move (0xC000, no counts, no list): what arrived must
            # be found out by the caller (C-FIND at the destination), not read from the list
            assert result.status == 0xC000 and result.failed_sop_instance_uids == [], result
        else:
            assert sorted(result.failed_sop_instance_uids) == sorted(uid_of(p) for p in ct), result
    finally:
        if qr is not None:
            qr.stop()


def test_orthanc_get_with_a_full_association_of_storage_classes(orthanc_source: Any) -> None:
    """127 storage classes, every syntax each (the largest C-GET association): accepted, and
    the study arrives."""
    from pynetdicom.presentation import AllStoragePresentationContexts

    orthanc, study, real = orthanc_source
    ct = uid_of(study[0], "SOPClassUID")
    classes = [ct] + [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
                      if str(cx.abstract_syntax) != ct][:MAX_STORAGE_CLASSES - 1]
    got: list[str] = []

    def store(peer: Peer, msg: Message) -> Reply:
        got.append(msg.sop_instance_uid)
        return Reply(Status.SUCCESS)

    with QueryRetrieveClient(source(orthanc.ae_title, orthanc.dicom_port), CALLING, store=store,
                             storage=[(c, ()) for c in classes]) as client:
        result = client.get({"StudyInstanceUID": uid_of(study[0], "StudyInstanceUID")})
        assert len(client.conn.assoc.contexts if client.conn.assoc else []) >= 100
        assert ct not in client.refused_storage
    assert result.status == Status.SUCCESS and sorted(got) == sorted(uid_of(p) for p in study)
