"""fastroute.dicom.pdu and dimse against pynetdicom's own encoders, plus fuzzing and fragmentation edges.

pynetdicom is the reference: the DIMSE command sets we encode must be byte-identical to what
``dimse_messages`` builds from a primitive, our P-DATA-TF fragments identical to its
``encode_msg`` + ``pdu.P_DATA_TF``, and everything it encodes must decode here. Arbitrary bytes
must give a result or ProtocolError, never another exception.
"""
from __future__ import annotations

import random
import struct
from io import BytesIO
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu import A_RELEASE_RP, A_RELEASE_RQ
from pynetdicom.pdu_primitives import (A_ABORT, A_ASSOCIATE, ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification,
                                       MaximumLengthNotification, P_DATA)
from pynetdicom.presentation import PresentationContext

from fastroute.dicom import acse, dimse, pdu

CT = "1.2.840.10008.5.1.4.1.1.2"
uids = st.lists(st.integers(0, 2**40), min_size=1, max_size=5).map(
    lambda parts: "1." + ".".join(map(str, parts)))
ae_titles = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"), min_size=1,
                    max_size=16)
message_ids = st.integers(0, 0xFFFF)


def _pynetdicom_command(message: object, primitive: object) -> bytes:
    message.primitive_to_message(primitive)  # type: ignore[attr-defined]
    return bytes(encode(message.command_set, True, True))  # type: ignore[attr-defined,arg-type]


# -- command sets --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(msg_id=message_ids, sop_class=uids, sop_uid=uids, priority=st.sampled_from([0, 1, 2]),
       originator=st.none() | st.tuples(ae_titles, message_ids))
def test_c_store_rq_matches_pynetdicom(msg_id: int, sop_class: str, sop_uid: str, priority: int,
                                       originator: tuple[str, int] | None) -> None:
    p = C_STORE()
    p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID = msg_id, sop_class, sop_uid
    p.Priority = priority
    p.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    if originator:
        p.MoveOriginatorApplicationEntityTitle, p.MoveOriginatorMessageID = originator
    ours = dimse.encode_c_store_rq(msg_id, sop_class, sop_uid, priority,
                                 originator[0] if originator else None,
                                 originator[1] if originator else None)
    assert ours == _pynetdicom_command(C_STORE_RQ(), p)
    decoded = pdu.decode_command(ours)
    assert decoded[pdu.COMMAND_FIELD] == 0x0001 and dimse.has_dataset(decoded)
    assert decoded[pdu.AFFECTED_SOP_INSTANCE_UID] == sop_uid
    assert decoded[pdu.AFFECTED_SOP_CLASS_UID] == sop_class
    assert decoded[pdu.MESSAGE_ID] == msg_id and decoded[pdu.PRIORITY] == priority
    assert decoded[pdu.COMMAND_GROUP_LENGTH] == len(ours) - 12
    if originator:
        assert decoded[pdu.MOVE_ORIGINATOR_AE_TITLE] == originator[0]
        assert decoded[pdu.MOVE_ORIGINATOR_MESSAGE_ID] == originator[1]


@settings(max_examples=60, deadline=None)
@given(msg_id=message_ids, sop_class=uids, sop_uid=uids, status=st.integers(0, 0xFFFF),
       comment=st.none() | st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                   min_size=1, max_size=64).filter(lambda s: s.strip()))
def test_c_store_rsp_matches_pynetdicom(msg_id: int, sop_class: str, sop_uid: str, status: int,
                                        comment: str | None) -> None:
    p = C_STORE()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID = msg_id, sop_class
    p.AffectedSOPInstanceUID, p.Status = sop_uid, status
    if comment:
        p.ErrorComment = comment  # type: ignore[assignment]
    ours = dimse.encode_c_store_rsp(msg_id, sop_class, sop_uid, status, comment)
    assert ours == _pynetdicom_command(C_STORE_RSP(), p)
    decoded = pdu.decode_command(ours)
    assert decoded[pdu.COMMAND_FIELD] == 0x8001 and not dimse.has_dataset(decoded)
    assert decoded[pdu.STATUS] == status and decoded[pdu.MESSAGE_ID_BEING_RESPONDED_TO] == msg_id
    assert decoded.get(pdu.ERROR_COMMENT) == (comment.strip() if comment else None)


@given(msg_id=message_ids, status=st.integers(0, 0xFFFF))
def test_c_echo_matches_pynetdicom(msg_id: int, status: int) -> None:
    rq = C_ECHO()
    rq.MessageID, rq.AffectedSOPClassUID = msg_id, acse.VERIFICATION_SOP_CLASS
    rsp = C_ECHO()
    rsp.MessageIDBeingRespondedTo, rsp.Status = msg_id, status
    rsp.AffectedSOPClassUID = acse.VERIFICATION_SOP_CLASS
    assert dimse.encode_c_echo_rq(msg_id) == _pynetdicom_command(C_ECHO_RQ(), rq)
    assert dimse.encode_c_echo_rsp(msg_id, status) == _pynetdicom_command(C_ECHO_RSP(), rsp)
    assert pdu.decode_command(dimse.encode_c_echo_rq(msg_id))[pdu.COMMAND_FIELD] == 0x0030
    assert pdu.decode_command(dimse.encode_c_echo_rsp(msg_id, status))[pdu.STATUS] == status


def test_pynetdicom_decodes_ours_and_padding() -> None:
    ours = dimse.encode_c_store_rsp(3, "1.2.3", "1.2.34", 0xB000, "odd")   # odd UID, odd comment
    ds = decode(BytesIO(ours), True, True)
    assert ds.AffectedSOPClassUID == "1.2.3" and ds.AffectedSOPInstanceUID == "1.2.34"
    assert ds.ErrorComment == "odd" and ds.Status == 0xB000
    assert b"1.2.3\x00" in ours and b"odd " in ours          # UI pads with NUL, LO with space
    assert len(dimse.encode_c_store_rsp(1, "1.2", "1.2", 0xC000, "x" * 100)) % 2 == 0
    assert pdu.decode_command(dimse.encode_c_store_rsp(1, "1.2", "1.2", 0xC000, "x" * 100))[
        pdu.ERROR_COMMENT] == "x" * 64                       # LO is at most 64 characters


def test_encode_command_ignores_given_group_length_and_sorts() -> None:
    a = pdu.encode_command({pdu.STATUS: 0, pdu.COMMAND_FIELD: 0x8030, pdu.COMMAND_GROUP_LENGTH: 9})
    b = pdu.encode_command({pdu.COMMAND_FIELD: 0x8030, pdu.STATUS: 0})
    assert a == b and pdu.decode_command(a)[0] == len(a) - 12
    with pytest.raises(TypeError):
        pdu.encode_command({pdu.STATUS: "zero"})
    with pytest.raises(ValueError):
        pdu.encode_command({0x00080016: "1.2"})


@pytest.mark.parametrize("bad, where", [
    (b"\x00\x00\x00\x00\x04\x00", "truncated"),
    (struct.pack("<HHI", 8, 0x16, 2) + b"12", "not in the command group"),
    (struct.pack("<HHI", 0, 0x100, 4) + b"1234", "US element"),
    (struct.pack("<HHI", 0, 0x0, 2) + b"12", "UL element"),
    (struct.pack("<HHI", 0, 0x2, 10) + b"12", "past the end"),
])
def test_decode_command_errors_say_what_and_where(bad: bytes, where: str) -> None:
    with pytest.raises(pdu.ProtocolError, match=where):
        pdu.decode_command(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decode_command_fuzz(data: bytes) -> None:
    try:
        out = pdu.decode_command(data)
    except pdu.ProtocolError:
        return
    assert all(isinstance(v, (int, str, bytes)) for v in out.values())


# -- P-DATA-TF -----------------------------------------------------------------------------


def _pynetdicom_pdus(data: bytes, max_pdu: int) -> list[bytes]:
    p = C_STORE()
    p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, p.Priority = 1, CT, "1.2.3", 2
    p.DataSet = BytesIO(data)
    msg = C_STORE_RQ()
    msg.primitive_to_message(p)
    return [P_DATA_TF(pd).encode() for pd in msg.encode_msg(3, max_pdu)]


def _ours(data: bytes, max_pdu: int) -> list[bytes]:
    command = dimse.encode_c_store_rq(1, CT, "1.2.3")
    return [h + bytes(b) for is_cmd, payload in ((True, command), (False, data))
            for h, b in pdu.p_data_tf(3, is_cmd, payload, max_pdu)]


@pytest.mark.parametrize("max_pdu", [0, 7, 8, 13, 100, 4096, 16384])
@pytest.mark.parametrize("size", [1, 2, 7, 1000, 40001])
def test_p_data_tf_matches_pynetdicom(max_pdu: int, size: int) -> None:
    data = random.Random(size).randbytes(size)
    ours = _ours(data, max_pdu)
    assert ours == _pynetdicom_pdus(data, max_pdu)
    for raw in ours:
        assert raw[0] == pdu.P_DATA_TF and len(raw) - 6 == struct.unpack(">I", raw[2:6])[0]
        assert not max_pdu or len(raw) - 6 <= max_pdu


def test_p_data_tf_payload_is_a_view_not_a_copy() -> None:
    data = bytearray(b"abcdefgh" * 100)
    frags = list(pdu.p_data_tf(1, False, memoryview(data), 106))
    assert len(frags) == 8 and all(len(b) == 100 for _, b in frags)
    data[0:1] = b"Z"
    assert bytes(frags[0][1][:1]) == b"Z"      # a view of the caller's buffer
    assert [h[11] for h, _ in frags] == [0] * 7 + [2]


def test_zero_length_dataset_is_one_empty_last_pdv() -> None:
    [(header, payload)] = list(pdu.p_data_tf(5, False, b"", 16384))
    assert len(payload) == 0
    body = memoryview(header)[6:]
    assert list((c, cmd, last, bytes(f)) for c, cmd, last, f in pdu.iter_pdvs(body)) == [
        (5, False, True, b"")]


def test_p_data_tf_rejects_impossible_arguments() -> None:
    with pytest.raises(ValueError):
        list(pdu.p_data_tf(0, True, b"x", 100))
    with pytest.raises(ValueError):
        list(pdu.p_data_tf(1, True, b"x", 6))


def _reassemble(stream: bytes, cut: list[int]) -> tuple[bytes, bytes]:
    reader = pdu.PduReader()
    command, dataset = bytearray(), bytearray()
    pos = 0
    for end in [*sorted(cut), len(stream)]:
        reader.feed(stream[pos:end])
        pos = end
        while (item := reader.next()) is not None:
            assert item[0] == pdu.P_DATA_TF
            for cx, is_cmd, _last, frag in pdu.iter_pdvs(item[1]):
                assert cx == 3
                (command if is_cmd else dataset).extend(frag)
    assert reader.buffered == 0
    return bytes(command), bytes(dataset)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 5000), max_pdu=st.integers(7, 3000), seed=st.integers(0, 2**32),
       n_cuts=st.integers(0, 30))
def test_reader_reassembles_pynetdicom_stream_at_any_split(size: int, max_pdu: int, seed: int,
                                                           n_cuts: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(size)
    stream = b"".join(_pynetdicom_pdus(data, max_pdu))
    cuts = [rng.randrange(len(stream)) for _ in range(n_cuts)]
    command, dataset = _reassemble(stream, cuts)
    assert dataset == data
    assert pdu.decode_command(command)[pdu.AFFECTED_SOP_INSTANCE_UID] == "1.2.3"


def test_reader_is_zero_copy_within_a_chunk_and_copies_fed_views() -> None:
    chunk = pdu.encode_release_rq() + pdu.encode_release_rp()
    reader = pdu.PduReader()
    reader.feed(chunk)
    t1, b1 = reader.next()  # type: ignore[misc]
    t2, b2 = reader.next()  # type: ignore[misc]
    assert (t1, t2) == (pdu.A_RELEASE_RQ, pdu.A_RELEASE_RP) and b1.obj is chunk
    assert reader.next() is None
    buf = bytearray(pdu.encode_abort(2, 6))
    reader.feed(memoryview(buf))
    buf[:] = b"\x00" * len(buf)                 # the caller reuses its buffer
    t, body = reader.next()  # type: ignore[misc]
    assert t == pdu.A_ABORT and pdu.decode_abort(body) == (2, 6)


def test_reader_errors_say_what_and_where() -> None:
    reader = pdu.PduReader(max_pdu_length=100)
    reader.feed(pdu.encode_release_rq() + b"\x09\x00\x00\x00\x00\x00")
    assert reader.next() is not None
    with pytest.raises(pdu.ProtocolError, match="type 0x09 at stream offset 10"):
        reader.next()
    reader = pdu.PduReader(max_pdu_length=100)
    reader.feed(b"\x04\x00\x00\x00\x01\x00")
    with pytest.raises(pdu.ProtocolError, match="256 bytes long"):
        reader.next()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
def test_reader_and_pdvs_fuzz(data: bytes, cuts: list[int]) -> None:
    reader = pdu.PduReader(max_pdu_length=1000)
    pos = 0
    try:
        for end in [*sorted(c for c in cuts if c <= len(data)), len(data)]:
            reader.feed(data[pos:end])
            pos = end
            while (item := reader.next()) is not None:
                assert 1 <= item[0] <= 7
                if item[0] == pdu.P_DATA_TF:
                    for cx, is_cmd, last, frag in pdu.iter_pdvs(item[1]):
                        assert 0 <= cx <= 255 and isinstance(frag, memoryview)
    except pdu.ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_iter_pdvs_fuzz(data: bytes) -> None:
    try:
        total = sum(len(f) + 6 for *_, f in pdu.iter_pdvs(data))
    except pdu.ProtocolError:
        return
    assert total == len(data)


# -- association and the fixed-size PDUs ---------------------------------------------------


def _request() -> A_ASSOCIATE:
    rq = A_ASSOCIATE()
    rq.application_context_name = UID("1.2.840.10008.3.1.1.1")
    rq.calling_ae_title, rq.called_ae_title = "CALLING", "CALLED"
    contexts = []
    for i, ts in enumerate((ExplicitVRLittleEndian, ImplicitVRLittleEndian)):
        cx = PresentationContext()
        cx.context_id, cx.abstract_syntax, cx.transfer_syntax = 2 * i + 1, UID(CT), [ts]
        contexts.append(cx)
    rq.presentation_context_definition_list = contexts
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    name = ImplementationVersionNameNotification()
    name.implementation_version_name = "FASTROUTE_010"
    rq.user_information = [ml, uid, name]
    return rq


def test_associate_rq_round_trip() -> None:
    encoded = pdu.encode_associate_rq(_request())
    assert encoded == A_ASSOCIATE_RQ(_request()).encode()
    reader = pdu.PduReader()
    reader.feed(encoded)
    kind, body = reader.next()  # type: ignore[misc]
    assert kind == pdu.A_ASSOCIATE_RQ
    got = pdu.decode_associate_rq(body)
    assert (got.calling_ae_title, got.called_ae_title) == ("CALLING", "CALLED")
    assert got.maximum_length_received == 16384
    assert any(getattr(item, "implementation_version_name", None) == "FASTROUTE_010"
               for item in got.user_information)
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntax)
            for c in got.presentation_context_definition_list] == [
        (1, CT, [ExplicitVRLittleEndian]), (3, CT, [ImplicitVRLittleEndian])]


def test_associate_ac_round_trip() -> None:
    ac = A_ASSOCIATE()
    ac.application_context_name = UID("1.2.840.10008.3.1.1.1")
    ac._called_ae_title, ac._calling_ae_title = "CALLED", "CALLING"
    results = []
    for cid, result in ((1, 0), (3, 4)):
        cx = PresentationContext()
        cx.context_id, cx.result, cx.transfer_syntax = cid, result, [ExplicitVRLittleEndian]
        results.append(cx)
    ac.presentation_context_definition_results_list = results
    ac.result = 0
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 32768
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    ac.user_information = [ml, uid]
    encoded = pdu.encode_associate_ac(ac)
    assert encoded == A_ASSOCIATE_AC(ac).encode()
    got = pdu.decode_associate_ac(memoryview(encoded)[6:])
    assert got.maximum_length_received == 32768
    assert [(c.context_id, c.result) for c in got.presentation_context_definition_results_list] == [
        (1, 0), (3, 4)]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=60, max_size=200))
def test_associate_decoders_fuzz(body: bytes) -> None:
    for decoder in (pdu.decode_associate_rq, pdu.decode_associate_ac):
        try:
            decoder(body)
        except pdu.ProtocolError:
            pass


def test_fixed_pdus_match_pynetdicom() -> None:
    assert pdu.encode_release_rq() == A_RELEASE_RQ().encode()
    assert pdu.encode_release_rp() == A_RELEASE_RP().encode()
    abort = A_ABORT()
    abort.abort_source = 2
    ours = pdu.encode_abort(2, 0)
    assert ours == A_ABORT_RQ(abort).encode()
    rj = A_ASSOCIATE()
    rj.result, rj.result_source, rj.diagnostic = 1, 1, 7
    assert pdu.encode_associate_rj(1, 1, 7) == A_ASSOCIATE_RJ(rj).encode()
    assert pdu.decode_associate_rj(memoryview(pdu.encode_associate_rj(2, 3, 1))[6:]) == (2, 3, 1)
    for short in (pdu.decode_abort, pdu.decode_associate_rj):
        with pytest.raises(pdu.ProtocolError):
            short(b"\x00")


def test_pdata_primitive_reference() -> None:
    """Our PDV parser reads what pynetdicom's P_DATA_TF encoder writes, several PDVs per PDU."""
    p = P_DATA()
    pdvs: list[Any] = [[1, b"\x03abcd"], [1, b"\x00ef"], [3, b"\x02"]]  # lists, not tuples
    p.presentation_data_value_list = pdvs
    body = memoryview(P_DATA_TF(p).encode())[6:]
    assert [(c, cmd, last, bytes(f)) for c, cmd, last, f in pdu.iter_pdvs(body)] == [
        (1, True, True, b"abcd"), (1, False, False, b"ef"), (3, False, True, b"")]


@pytest.mark.parametrize("kind", range(1, 8))
def test_reader_zero_length_pdus_are_protocol_errors_not_crashes(kind: int) -> None:
    """A zero-length body used to pop an empty deque (IndexError, logged as internal error):
    it is returned (empty) for types with variable bodies, whose decoders refuse it, and the
    4-byte fixed PDUs refuse any other length outright (PS3.8 9.3.4-9.3.8)."""
    reader = pdu.PduReader()
    reader.feed(struct.pack(">BBI", kind, 0, 0))
    if kind in (pdu.A_ASSOCIATE_RJ, pdu.A_RELEASE_RQ, pdu.A_RELEASE_RP, pdu.A_ABORT):
        with pytest.raises(pdu.ProtocolError, match="has length 0, not 4"):
            reader.next()
        return
    got = reader.next()
    assert got is not None and got[0] == kind and len(got[1]) == 0 and reader.buffered == 0
    decoder = {pdu.A_ASSOCIATE_RQ: pdu.decode_associate_rq, pdu.A_ASSOCIATE_AC: pdu.decode_associate_ac,
               pdu.P_DATA_TF: lambda b: list(pdu.iter_pdvs(b))}[kind]
    with pytest.raises(pdu.ProtocolError):
        decoder(got[1])


def test_malformed_associate_rq_raises_without_pynetdicom_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    """A non-ASCII UID: pynetdicom logs a traceback before raising; we log nothing."""
    rq = A_ASSOCIATE()
    rq.application_context_name = "1.2.840.10008.3.1.1.1"
    rq.calling_ae_title, rq.called_ae_title = "A", "B"
    cx = PresentationContext()
    cx.context_id = 1
    cx.abstract_syntax = UID("1.2.840.10008.1.1")
    cx.transfer_syntax = [ImplicitVRLittleEndian]
    rq.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    rq.user_information = [ml]
    raw = bytearray(pdu.encode_associate_rq(rq))
    at = raw.index(b"1.2.840.10008.1.1")
    raw[at + 5] = 0xFF
    with pytest.raises(pdu.ProtocolError, match="malformed A-ASSOCIATE-RQ"):
        pdu.decode_associate_rq(bytes(raw[6:]))
    assert not [r for r in caplog.records if r.exc_info], caplog.text
