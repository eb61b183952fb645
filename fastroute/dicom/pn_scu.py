"""Storage SCU: deliver spooled bytes to one destination and map each answer to an outcome.

The bytes are sent exactly as received (no decode/re-encode). pynetdicom's public
``send_c_store`` only takes a Dataset or a file, so ``send_raw`` drives its DIMSE layer
directly with the encoded dataset; pynetdicom is pinned to 3.0.x for that reason.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Iterable

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from fastroute.config import DestinationConfig
from fastroute.dicom.status import Category, category, describe

log = logging.getLogger("fastroute.send")

MAX_CONTEXTS = 128   # PS3.8: presentation context IDs are odd numbers 1..255

def classify_status(status: int) -> str:
    """Map a C-STORE response status to ``delivered``, ``transient`` or ``permanent``."""
    cat = category(status)
    if cat in (Category.SUCCESS, Category.WARNING):
        return "delivered"
    return "permanent" if cat is Category.PERMANENT else "transient"


status_text = describe


class AssociationFailed(Exception):
    """The destination could not be reached or refused the association (destination-level)."""


class NoContextAccepted(Exception):
    """The peer answered but accepted none of the proposed presentation contexts.

    Not a destination outage: these objects cannot go there as proposed, so they fail
    (or are converted) rather than backing off the whole destination.
    """

    def __init__(self, message: str, rejected: dict[str, str]) -> None:
        super().__init__(message)
        self.rejected = rejected


class OutcomeUnknown(Exception):
    """The data left, but no response came (DIMSE timeout or abort): resend, at-least-once."""


@dataclass(frozen=True)
class StoreResult:
    status: int
    comment: str


def _nodelay(event: Any) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class Connection:
    """One association slot to a destination, reused across batches by one sender thread."""

    def __init__(self, dest: DestinationConfig, calling_ae: str) -> None:
        self.dest = dest
        self.calling_ae = dest.calling_ae or calling_ae
        self.assoc: Association | None = None
        self.proposed: set[tuple[str, str]] = set()
        self.last_used = 0.0
        self.msg_id = 0

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.dest.acse_timeout
        ae.dimse_timeout = self.dest.dimse_timeout
        ae.network_timeout = self.dest.network_timeout
        ae.maximum_pdu_size = self.dest.max_pdu
        return ae

    def ensure(self, pairs: set[tuple[str, str]]) -> Association:
        """An established association that proposed every (SOP class, syntax) pair needed."""
        if self.assoc is not None and self.assoc.is_established and pairs <= self.proposed:
            return self.assoc
        wanted = set(pairs)
        if self.assoc is not None and self.assoc.is_established:
            # Keep what was already negotiated too, so alternating classes do not thrash.
            wanted |= self.proposed
            self.release()
        if len(wanted) > MAX_CONTEXTS:
            wanted = set(sorted(pairs)[:MAX_CONTEXTS])
        ae = self._ae()
        for sop_class, ts in sorted(wanted):
            ae.add_requested_context(sop_class, [ts])
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title,
                             max_pdu=self.dest.max_pdu, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
        if not assoc.is_established:
            rejected = getattr(assoc, "rejected_contexts", None) or []
            if rejected and not assoc.accepted_contexts:
                # A rejected context echoes no transfer syntax: key the reason by SOP class.
                reasons = {str(cx.abstract_syntax): _cx_result(cx.result) for cx in rejected}
                raise NoContextAccepted(
                    f"{self.dest.ae_title}@{self.dest.host}:{self.dest.port} accepted none of the "
                    f"{len(rejected)} presentation context(s) proposed", reasons)
            raise AssociationFailed(_why_failed(assoc, self))
        _pause_reactor(assoc)
        self.assoc = assoc
        self.proposed = wanted
        self.last_used = time.monotonic()
        return assoc

    def context_for(self, sop_class: str, ts: str) -> int | None:
        assert self.assoc is not None
        for cx in self.assoc.accepted_contexts:
            if cx.abstract_syntax == sop_class and cx.transfer_syntax and cx.transfer_syntax[0] == ts:
                return int(cx.context_id)  # type: ignore[arg-type]
        return None

    def accepted(self, sop_class: str) -> list[str]:
        assert self.assoc is not None
        return [str(cx.transfer_syntax[0]) for cx in self.assoc.accepted_contexts
                if cx.abstract_syntax == sop_class and cx.transfer_syntax]

    def send_raw(self, context_id: int, sop_class: str, sop_uid: str, data: bytes | memoryview) -> StoreResult:
        """C-STORE already-encoded bytes; raise OutcomeUnknown when no response arrives."""
        assoc = self.assoc
        if assoc is None or not assoc.is_established:
            raise AssociationFailed("association is not established")
        self.msg_id = (self.msg_id % 65535) + 1
        req = C_STORE()
        req.MessageID = self.msg_id
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_uid
        req.Priority = 2
        req.DataSet = BytesIO(data)
        if not assoc.dul.is_alive() or not assoc.dimse.msg_queue.empty():
            # The peer closed or aborted the association while it was idle: nothing was sent.
            self.abort()
            raise AssociationFailed("association closed by the peer while idle")
        try:
            assoc.dimse.send_msg(req, context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        except Exception as exc:
            raise OutcomeUnknown(f"connection failed while sending: {exc}") from exc
        self.last_used = time.monotonic()
        if rsp is None:
            assoc._handle_no_response()
            self.assoc = None
            raise OutcomeUnknown("no C-STORE response (DIMSE timeout or association aborted)")
        status = getattr(rsp, "Status", None)
        if status is None:
            raise OutcomeUnknown("C-STORE response without a status")
        comment = ""
        ident = getattr(rsp, "ErrorComment", None)
        if ident:
            comment = str(ident)
        return StoreResult(int(status), comment)

    def release(self) -> None:
        if self.assoc is not None:
            self.assoc._reactor_checkpoint.set()
            try:
                if self.assoc.is_established:
                    self.assoc.release()
            except Exception:   # the peer went away: nothing to release
                pass
        self.assoc = None
        self.proposed = set()

    def abort(self) -> None:
        if self.assoc is not None:
            self.assoc._reactor_checkpoint.set()
            try:
                self.assoc.abort()
            except Exception:
                pass
        self.assoc = None
        self.proposed = set()


def _cx_result(result: int | None) -> str:
    return {1: "user rejection", 2: "no reason (provider rejection)",
            3: "abstract syntax (SOP class) not supported",
            4: "transfer syntax not supported"}.get(result or 0, f"result {result}")


def _pause_reactor(assoc: Association) -> None:
    """Park pynetdicom's reactor for as long as we own the association.

    Its reactor polls the DIMSE queue every millisecond; pausing and resuming it around each
    C-STORE (as ``send_c_store`` does) leaves a window in which it takes our response off the
    queue ("Received unexpected C-STORE service message") and the send then waits for the DIMSE
    timeout. Parked once, it cannot race: it only checks for a peer release, which a Storage SCP
    does not send, and an abort still reaches us through the DIMSE queue as (None, None).
    """
    assoc._reactor_checkpoint.clear()
    # Paused means: seen blocked in its checkpoint for longer than one reactor iteration (1 ms).
    seen_since: float | None = None
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and assoc.is_established:
        if assoc._is_paused:
            now = time.monotonic()
            seen_since = seen_since or now
            if now - seen_since > 0.02:
                return
        else:
            seen_since = None
        time.sleep(0.001)


def _why_failed(assoc: Association, conn: Connection) -> str:
    d = conn.dest
    where = f"{conn.calling_ae} -> {d.ae_title}@{d.host}:{d.port}"
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        if rj is not None:
            return (f"association rejected by {where}: result={rj.result} source={rj.result_source} "
                    f"reason={rj.diagnostic} ({_reject_reason(rj.result_source, rj.diagnostic)})")
        return f"association rejected by {where}"
    if assoc.is_aborted and assoc.acceptor.primitive is not None:
        return f"association aborted by {where}"
    return f"cannot connect to {where} (connection refused or timed out)"


def _reject_reason(source: int | None, diag: int | None) -> str:
    table = {(1, 1): "no reason given", (1, 2): "application context not supported",
             (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
             (2, 1): "no reason given", (2, 2): "protocol version not supported",
             (3, 1): "temporary congestion", (3, 2): "local limit exceeded"}
    return table.get((source or 0, diag or 0), "unknown reason")


def echo(dest: DestinationConfig, calling_ae: str) -> tuple[bool, str]:
    """C-ECHO a destination; returns (ok, human-readable result)."""
    ae = AE(ae_title=dest.calling_ae or calling_ae)
    ae.acse_timeout = dest.acse_timeout
    ae.dimse_timeout = dest.dimse_timeout
    ae.network_timeout = dest.network_timeout
    ae.add_requested_context(Verification)
    conn = Connection(dest, calling_ae)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        return False, _why_failed(assoc, conn)
    try:
        status = assoc.send_c_echo()
        code = int(getattr(status, "Status", -1)) if status else None
    finally:
        assoc.release()
    if code == 0:
        return True, f"C-ECHO {conn.calling_ae} -> {dest.ae_title}@{dest.host}:{dest.port}: success"
    return False, f"C-ECHO {conn.calling_ae} -> {dest.ae_title}@{dest.host}:{dest.port}: {status_text(code)}"


def pairs_of(items: Iterable[Any]) -> set[tuple[str, str]]:
    return {(i.sop_class_uid, i.transfer_syntax) for i in items}
