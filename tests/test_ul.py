"""The upper-layer state machine (fastroute.dicom.ul) driven with bytes, in both roles.

No sockets: what one side's methods return is fed to the other side, or to hand-made PDUs,
and the states and events are checked at every step. Also: the implementation identity is
the same whichever role fastroute plays.
"""
from __future__ import annotations

import struct

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.pdu_primitives import ImplementationVersionNameNotification

from fastroute.dicom import acse, dimse, pdu
from fastroute.dicom.dimse import CommandField, Message, MessageTooLarge
from fastroute.dicom.ul import (AssociateAccept, AssociateReject, AssociateRequest, PeerAbort, ReleaseReply,
                                ReleaseRequest, Role, State, UnexpectedPdu, UpperLayer)

CT = "1.2.840.10008.5.1.4.1.1.2"


def frames(context_id: int, is_command: bool, data: bytes, max_pdu: int = 0) -> bytes:
    return b"".join(h + bytes(p) for h, p in pdu.p_data_tf(context_id, is_command, data, max_pdu))


def drain(ul: UpperLayer) -> list[object]:
    out = []
    while (event := ul.next_event()) is not None:
        out.append(event)
    return out


def pair() -> tuple[UpperLayer, UpperLayer]:
    """A requestor and an acceptor taken to ESTABLISHED by feeding each other's PDUs."""
    scu = UpperLayer(Role.REQUESTOR, max_pdu_in=16384)
    scp = UpperLayer(Role.ACCEPTOR, max_pdu_in=16384)
    assert (scu.state, scp.state) == (State.IDLE, State.AWAITING_ASSOCIATE_RQ)
    pairs = [(CT, ExplicitVRLittleEndian), (CT, ImplicitVRLittleEndian)]
    rq, proposed = acse.request("SCU", "SCP", pairs, 16384)
    scp.feed(scu.associate(rq))
    assert scu.state is State.AWAITING_ASSOCIATE_AC
    [event] = drain(scp)
    assert isinstance(event, AssociateRequest) and scp.state is State.AWAITING_LOCAL_RESPONSE
    assert event.primitive.calling_ae_title == "SCU"
    ac, contexts = acse.negotiate(event.primitive, acse.supported_contexts(), 16384)
    assert contexts == {1: ExplicitVRLittleEndian, 3: ImplicitVRLittleEndian}
    scu.feed(scp.accept(ac, contexts))
    assert scp.state is State.ESTABLISHED
    [answer] = drain(scu)
    assert isinstance(answer, AssociateAccept)
    accepted = [cx for cx in acse.accepted_contexts(proposed, answer.primitive) if cx.result == 0]
    scu.established({int(cx.context_id or 0): str(cx.transfer_syntax[0]) for cx in accepted})
    assert scu.state is State.ESTABLISHED and scu.contexts == contexts
    return scu, scp


def test_both_roles_associate_exchange_messages_and_release() -> None:
    scu, scp = pair()
    data = bytes(range(256)) * 40
    scp.feed(frames(1, True, dimse.encode_c_store_rq(1, CT, "1.2.3")) + frames(1, False, data, 1000))
    [store] = drain(scp)
    assert isinstance(store, Message) and store.field == CommandField.C_STORE_RQ and store.is_request
    assert type(store.data) is bytearray and store.data == data
    scu.feed(frames(1, True, dimse.encode_c_store_rsp(1, CT, "1.2.3", 0xB000, "coerced")))
    [rsp] = drain(scu)
    assert isinstance(rsp, Message) and not rsp.is_request
    assert (rsp.field, rsp.responds_to, rsp.status, rsp.error_comment, rsp.sop_instance_uid) == (
        CommandField.C_STORE_RSP, 1, 0xB000, "coerced", "1.2.3")
    scp.feed(scu.release())
    assert scu.state is State.AWAITING_RELEASE_RP
    [release] = drain(scp)
    assert isinstance(release, ReleaseRequest) and scp.state is State.RELEASE_REQUESTED
    scu.feed(scp.release_reply())
    assert scp.state is State.CLOSED
    assert [type(e) for e in drain(scu)] == [ReleaseReply] and scu.state is State.CLOSED


def test_requestor_hears_reject_abort_and_a_peer_request() -> None:
    scu = UpperLayer(Role.REQUESTOR, max_pdu_in=0)
    rq, _ = acse.request("SCU", "SCP", [(CT, ExplicitVRLittleEndian)], 0)
    scu.associate(rq)
    scu.feed(pdu.encode_associate_rj(1, 1, 3))
    [reject] = drain(scu)
    assert isinstance(reject, AssociateReject) and (reject.result, reject.source, reject.reason) == (1, 1, 3)
    assert scu.state is State.CLOSED

    scu, scp = pair()
    # A request from the acceptor on the requestor's association (N-EVENT-REPORT, C-GET's
    # C-STORE): the requestor's upper layer delivers it like any message.
    report = pdu.encode_command({0x0002: "1.2.840.10008.1.20.1", 0x0100: CommandField.N_EVENT_REPORT_RQ,
                                 0x0110: 9, 0x0800: 0x0101, 0x1000: "1.2.840.10008.1.20.1.1",
                                 0x1002: 1})
    scu.feed(frames(1, True, report))
    [event] = drain(scu)
    assert isinstance(event, Message) and event.is_request and event.field == CommandField.N_EVENT_REPORT_RQ
    response = dimse.encode_response(event.command, 0)
    decoded = pdu.decode_command(response)
    assert (decoded[0x0100], decoded[0x0120], decoded[0x0900], decoded[0x1000]) == (
        0x8100, 9, 0, "1.2.840.10008.1.20.1.1")
    scu.feed(pdu.encode_abort(2, 6))
    [abort] = drain(scu)
    assert isinstance(abort, PeerAbort) and (abort.source, abort.reason) == (2, 6)
    assert scu.state is State.CLOSED and scu.next_event() is None


def test_release_collision_is_answered() -> None:
    scu, scp = pair()
    scu.release()
    scu.feed(pdu.encode_release_rq())          # the peer asked at the same time (PS3.8 9.2.5)
    assert [type(e) for e in drain(scu)] == [ReleaseRequest]
    assert scu.release_reply() == pdu.encode_release_rp() and scu.state is State.CLOSED


@pytest.mark.parametrize("role, stream, error", [
    (Role.REQUESTOR, pdu.encode_associate_rj(1, 1, 1), UnexpectedPdu),   # before its own RQ
    (Role.REQUESTOR, pdu.encode_release_rp(), UnexpectedPdu),
    (Role.ACCEPTOR, pdu.encode_release_rq(), UnexpectedPdu),
    (Role.ACCEPTOR, frames(1, True, dimse.encode_c_echo_rq(1)), UnexpectedPdu),
    (Role.ACCEPTOR, b"\x09\x00\x00\x00\x00\x02\x00\x00", pdu.ProtocolError),
    (Role.ACCEPTOR, struct.pack(">BBI", 1, 0, 2 * 1024 * 1024), pdu.ProtocolError),   # RQ too big
])
def test_pdus_wrong_in_the_state_raise(role: Role, stream: bytes, error: type[Exception]) -> None:
    ul = UpperLayer(role, max_pdu_in=1024)
    ul.feed(stream)
    with pytest.raises(error):
        drain(ul)


def test_established_limits_apply_to_both_roles() -> None:
    for established in pair():
        established.assembler.max_object = 100
        established.feed(frames(1, True, dimse.encode_c_store_rq(1, CT, "1.2.3"))
                         + frames(1, False, b"\0" * 200))
        with pytest.raises(MessageTooLarge):
            drain(established)
    scu, _ = pair()
    scu.feed(frames(5, True, dimse.encode_c_echo_rq(1)))       # context 5 was never accepted
    with pytest.raises(pdu.ProtocolError, match="context 5"):
        drain(scu)
    scu, _ = pair()
    scu.feed(struct.pack(">BBI", 4, 0, 16384 + 7))              # P-DATA beyond what we announced
    with pytest.raises(pdu.ProtocolError, match="more than"):
        drain(scu)


def test_one_implementation_identity_on_both_sides() -> None:
    """The SCP's A-ASSOCIATE-AC and the SCU's A-ASSOCIATE-RQ name the same implementation."""
    rq, _ = acse.request("SCU", "SCP", [(CT, ExplicitVRLittleEndian)], 16384)
    ac, _ = acse.negotiate(pdu.decode_associate_rq(pdu.encode_associate_rq(rq)[6:]),
                           acse.supported_contexts(), 16384)
    sent_rq = pdu.decode_associate_rq(pdu.encode_associate_rq(rq)[6:])
    sent_ac = pdu.decode_associate_ac(pdu.encode_associate_ac(ac)[6:])
    for primitive in (sent_rq, sent_ac):
        assert primitive.implementation_class_uid == acse.IMPLEMENTATION_CLASS_UID
        names = [item.implementation_version_name for item in primitive.user_information
                 if isinstance(item, ImplementationVersionNameNotification)]
        assert names == [acse.IMPLEMENTATION_VERSION_NAME]
    assert acse.IMPLEMENTATION_CLASS_UID.startswith("1.2.826.0.1.3680043.8.498.")   # pydicom's root
    assert acse.IMPLEMENTATION_VERSION_NAME.startswith("FASTROUTE_")
    assert len(acse.IMPLEMENTATION_VERSION_NAME) <= 16                             # SH


def test_an_undecodable_associate_rq_leaves_the_acceptor_awaiting_one() -> None:
    """PS3.8 Table 9-10: an invalid A-ASSOCIATE-RQ is Evt19 in Sta2 (answered AA-1), so the
    state must not move to Sta3 before the request decodes."""
    ul = UpperLayer(Role.ACCEPTOR, max_pdu_in=16384)
    ul.feed(struct.pack(">BBI", pdu.A_ASSOCIATE_RQ, 0, 0))
    with pytest.raises(pdu.ProtocolError, match="shorter than its 68-byte fixed part"):
        ul.next_event()
    assert ul.state is State.AWAITING_ASSOCIATE_RQ
