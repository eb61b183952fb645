"""The upper-layer state machine (PS3.8 9.2) of one association, for either role, without I/O.

Bytes in (:meth:`UpperLayer.feed`), :data:`Event` s out (:meth:`UpperLayer.next_event`); the
PDUs this side sends are made by methods that also move the state (:meth:`~UpperLayer.accept`,
:meth:`~UpperLayer.release`, ...), like h11 or asyncpg's CoreProtocol. No sockets, no clock:
the shells (:mod:`.scp` on asyncio, :mod:`.scu` on a blocking socket) own the I/O and the
timers, tests drive this with bytes. DIMSE data is the one thing not sent through here: the
shells frame it with :func:`pdu.p_data_tf` straight from the caller's buffer.

Anything a peer must be aborted for raises ``pdu.ProtocolError`` (UnexpectedPdu for a
well-formed PDU in the wrong state, MessageTooLarge for a dataset past the cap).
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Union

from pynetdicom.pdu_primitives import A_ASSOCIATE

from fastroute.dicom import pdu
from fastroute.dicom.dimse import MAX_OBJECT_BYTES, Assembler, Message, MessageTooLarge

MAX_ASSOCIATE_BYTES = 1024 * 1024     # an A-ASSOCIATE-RQ with every context is ~60 kB

__all__ = ["Role", "State", "UpperLayer", "UnexpectedPdu", "MessageTooLarge", "Event",
           "AssociateRequest", "AssociateAccept", "AssociateReject", "Message", "ReleaseRequest",
           "ReleaseReply", "PeerAbort"]


class UnexpectedPdu(pdu.ProtocolError):
    """A well-formed PDU that is wrong in the association's state (A-ABORT reason 2)."""


class Role(enum.StrEnum):
    ACCEPTOR = "acceptor"      # the SCP side: waits for an A-ASSOCIATE-RQ
    REQUESTOR = "requestor"    # the SCU side: sends one


class State(enum.StrEnum):
    """PS3.8 Table 9-10's states, those a fastroute association can be in."""

    IDLE = "idle"                                      # Sta1, requestor before its RQ
    AWAITING_ASSOCIATE_RQ = "awaiting-associate-rq"    # Sta2
    AWAITING_LOCAL_RESPONSE = "awaiting-local-response"  # Sta3: RQ decoded, accept or reject
    AWAITING_ASSOCIATE_AC = "awaiting-associate-ac"    # Sta5
    ESTABLISHED = "established"                        # Sta6
    AWAITING_RELEASE_RP = "awaiting-release-rp"        # Sta7: we asked to release
    RELEASE_REQUESTED = "release-requested"            # Sta8: the peer asked; answer RP
    CLOSED = "closed"                                  # Sta13/Sta1: nothing more to read


@dataclass(slots=True)
class AssociateRequest:
    primitive: A_ASSOCIATE


@dataclass(slots=True)
class AssociateAccept:
    primitive: A_ASSOCIATE


@dataclass(slots=True)
class AssociateReject:
    result: int
    source: int
    reason: int


@dataclass(slots=True)
class ReleaseRequest:
    pass


@dataclass(slots=True)
class ReleaseReply:
    pass


@dataclass(slots=True)
class PeerAbort:
    source: int
    reason: int


Event = Union[AssociateRequest, AssociateAccept, AssociateReject, Message, ReleaseRequest,
              ReleaseReply, PeerAbort]

class UpperLayer:
    """One association: bytes in, events out, the state in :attr:`state`.

    Events come one at a time so a shell can stop taking them while a reply is outstanding;
    PDUs stay buffered meanwhile. Memory is bounded: one PDU of at most ``max_pdu_in`` bytes
    (what we announced; 6 bytes of slack for peers that count the header in), one command
    set and one dataset of ``max_object`` bytes.
    """

    __slots__ = ("role", "state", "reader", "assembler", "contexts", "max_pdu_in", "_events")

    def __init__(self, role: Role, *, max_pdu_in: int, max_object: int = MAX_OBJECT_BYTES) -> None:
        self.role = role
        self.state = State.AWAITING_ASSOCIATE_RQ if role is Role.ACCEPTOR else State.IDLE
        self.reader = pdu.PduReader(max_pdu_length=MAX_ASSOCIATE_BYTES)
        self.assembler = Assembler(max_object=max_object)
        self.contexts: dict[int, str] = {}
        self.max_pdu_in = max_pdu_in + 6 if max_pdu_in > 0 else max_object + 64
        self._events: deque[Event] = deque()

    # -- input -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.reader.feed(data)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        return self.reader.buffered

    def in_message(self) -> bool:
        """True while part of a DIMSE message has arrived (a stalled peer mid-object)."""
        return self.assembler.in_message()

    def next_event(self) -> Event | None:
        """The next complete event, or None until more bytes are fed."""
        while not self._events:
            state = self.state          # identity tests: an enum's __hash__/__eq__ cost per PDU
            if state is State.CLOSED or state is State.RELEASE_REQUESTED:
                return None
            item = self.reader.next()     # raises for unknown types and oversized PDUs
            if item is None:
                return None
            self._on_pdu(*item)
        return self._events.popleft()

    def _on_pdu(self, kind: int, body: memoryview) -> None:
        state = self.state
        if kind == pdu.P_DATA_TF:
            if state is not State.ESTABLISHED and state is not State.AWAITING_RELEASE_RP:
                raise UnexpectedPdu("P-DATA-TF before the association was established")
            self.assembler.feed(body, self._events)
        elif kind == pdu.A_ASSOCIATE_RQ:
            if state is not State.AWAITING_ASSOCIATE_RQ:
                raise UnexpectedPdu("A-ASSOCIATE-RQ on an established association"
                                    if self.role is Role.ACCEPTOR else
                                    "A-ASSOCIATE-RQ sent to an association requestor")
            request = pdu.decode_associate_rq(body)   # undecodable: still Sta2 (Evt19, AA-1)
            self.state = State.AWAITING_LOCAL_RESPONSE
            self._events.append(AssociateRequest(request))
        elif kind == pdu.A_ASSOCIATE_AC:
            if state is not State.AWAITING_ASSOCIATE_AC:
                raise UnexpectedPdu("unexpected A-ASSOCIATE-AC")
            self._events.append(AssociateAccept(pdu.decode_associate_ac(body)))
        elif kind == pdu.A_ASSOCIATE_RJ:
            if state is not State.AWAITING_ASSOCIATE_AC:
                raise UnexpectedPdu("unexpected A-ASSOCIATE-RJ")
            self.state = State.CLOSED
            self._events.append(AssociateReject(*pdu.decode_associate_rj(body)))
        elif kind == pdu.A_RELEASE_RQ:
            if state is not State.ESTABLISHED and state is not State.AWAITING_RELEASE_RP:
                raise UnexpectedPdu("A-RELEASE-RQ before the association was established")
            # In Sta7 this is a release collision (PS3.8 9.2.5); answering RP is enough.
            self.state = State.RELEASE_REQUESTED
            self._events.append(ReleaseRequest())
        elif kind == pdu.A_RELEASE_RP:
            if state is not State.AWAITING_RELEASE_RP:
                raise UnexpectedPdu("A-RELEASE-RP without an A-RELEASE-RQ")
            self.state = State.CLOSED
            self._events.append(ReleaseReply())
        else:   # A-ABORT: PduReader knows no other types
            self.state = State.CLOSED
            self._events.append(PeerAbort(*pdu.decode_abort(body)))

    # -- output: what this side sends, and the state it moves to ---------------------------

    def associate(self, rq: A_ASSOCIATE) -> bytes:
        """Requestor: the A-ASSOCIATE-RQ PDU."""
        if self.state is not State.IDLE:
            raise RuntimeError(f"cannot request an association in state {self.state}")
        self.state = State.AWAITING_ASSOCIATE_AC
        return pdu.encode_associate_rq(rq)

    def accept(self, ac: A_ASSOCIATE, contexts: dict[int, str]) -> bytes:
        """Acceptor: the A-ASSOCIATE-AC PDU; ``contexts`` are those accepted (ID -> syntax)."""
        if self.state is not State.AWAITING_LOCAL_RESPONSE:
            raise RuntimeError(f"cannot accept an association in state {self.state}")
        self.established(contexts)
        return pdu.encode_associate_ac(ac)

    def reject(self, result: int, source: int, reason: int) -> bytes:
        """Acceptor: the A-ASSOCIATE-RJ PDU."""
        self.state = State.CLOSED
        return pdu.encode_associate_rj(result, source, reason)

    def established(self, contexts: dict[int, str]) -> None:
        """Data transfer from now on over ``contexts`` (the requestor calls this with what the
        A-ASSOCIATE-AC accepted)."""
        self.contexts = contexts
        self.assembler.contexts = contexts
        self.state = State.ESTABLISHED
        self.reader.max_pdu_length = self.max_pdu_in

    def release(self) -> bytes:
        """The A-RELEASE-RQ PDU (then wait for :class:`ReleaseReply`)."""
        self.state = State.AWAITING_RELEASE_RP
        return pdu.encode_release_rq()

    def release_reply(self) -> bytes:
        """The A-RELEASE-RP answering the peer's :class:`ReleaseRequest`."""
        self.state = State.CLOSED
        return pdu.encode_release_rp()

    def abort(self, source: int = 0, reason: int = 0) -> bytes:
        """An A-ABORT PDU (source 0 service user, 2 service provider)."""
        self.state = State.CLOSED
        return pdu.encode_abort(source, reason)
