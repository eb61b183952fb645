"""Storage commitment as SCU (issue 14, PS3.4 Annex J): ask a destination to commit what it
was delivered, and take its answer.

A destination with ``commitment`` on gets, after delivery, one N-ACTION-RQ per study with the
instances delivered and not yet requested (the spool's ``waiting`` list, written by the same
commit that recorded the delivery). Its N-EVENT-REPORT-RQ comes back either on the sending
association (``same-association``: the sender keeps it open while a transaction is open, and
``scu.Connection`` serves the report whenever it reads the socket) or on a new association to
the listener (``new-association``: :class:`ReportService`, with the SCP role the destination
proposes for it answered in the A-ASSOCIATE-AC). Both end in ``Commitments.complete``.

No report within ``commitment_timeout``: the request is sent again (same Transaction UID, so a
late report still matches); no report again: an error is logged and the transaction is marked
``alerted`` (the alerts' ``commit_overdue`` check); it stays open for a late report.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fastroute.config import DestinationConfig
from fastroute.dicom import commitment as sc
from fastroute.dicom.dimse import CommandField, Handler, Message, Peer, Reply
from fastroute.dicom.scu import AssociationFailed, Connection, NoContextAccepted, OutcomeUnknown
from fastroute.dicom.status import Status, describe
from fastroute.logsetup import fields
from fastroute.spool import Spool
from fastroute.spool.commitments import Transaction

log = logging.getLogger("fastroute.commitment")

MAX_REFS = 1000            # instances per N-ACTION: a huge study is asked for in parts
KEEP_OPEN_POLL = 0.2       # how often an idle sender keeping an association for a report reads it


def report_handler(spool: Spool, on_requeue: Callable[[str], None] = lambda dest: None) -> Handler:
    """The N-EVENT-REPORT-RQ service for storage commitment reports, on either association:
    applies the report to its transaction; ``on_requeue(dest)`` after failed instances were
    queued again (to wake that destination's sender)."""

    def handle(peer: Peer, msg: Message) -> Reply:
        where = f"{peer.calling_ae}@{peer.ip} -> {peer.called_ae}"
        if msg.sop_class_uid != sc.STORAGE_COMMITMENT_SOP_CLASS:
            return Reply(Status.SOP_CLASS_NOT_SUPPORTED, "only storage commitment reports are served")
        event = msg.command.get(sc.EVENT_TYPE_ID)
        if event not in (sc.EVENT_ALL_COMMITTED, sc.EVENT_FAILURES):
            return Reply(0x0113, f"no such event type {event}")      # PS3.7 10.1.1.1.8
        data = msg.data
        if not isinstance(data, (bytes, bytearray)):
            return Reply(Status.PROCESSING_FAILURE, "storage commitment report without a dataset")
        try:
            report = sc.decode_event(data, peer.contexts.get(msg.context_id, sc.SYNTAXES[0]))
        except ValueError as exc:
            log.warning("%s: %s", where, exc, extra=fields(calling_ae=peer.calling_ae, peer=peer.ip,
                                                           status=int(Status.INVALID_ATTRIBUTE_VALUE)))
            return Reply(Status.INVALID_ATTRIBUTE_VALUE, str(exc))
        done = spool.commitments.complete(
            report.transaction_uid, (r.sop_instance_uid for r in report.committed),
            ((f.sop_instance_uid, f.reason) for f in report.failed), time.time(), reporter=peer.calling_ae)
        if not done.known:
            # A report for a transaction already answered (a re-request's second report) or
            # not ours: acknowledged, nothing to change.
            log.info("%s: storage commitment report for unknown transaction_uid=%s (%d committed, "
                     "%d failed): already answered or not ours", where, report.transaction_uid,
                     len(report.committed), len(report.failed),
                     extra=fields(calling_ae=peer.calling_ae, peer=peer.ip))
        elif done.failed:
            on_requeue(done.destination)
        return Reply(Status.SUCCESS)

    return handle


class Requester:
    """One destination's commitment requests, made by its first association thread (the
    one whose association a same-association report comes back on)."""

    def __init__(self, spool: Spool, dest: DestinationConfig, on_requeue: Callable[[str], None]) -> None:
        self.spool = spool
        self.dest = dest
        self.handler = report_handler(spool, on_requeue)
        self._lock = threading.Lock()
        self._refused_until = 0.0
        spool.commitments.set_enabled(dest.name, True)

    @property
    def same_association(self) -> bool:
        return self.dest.commitment == "same-association"

    def pairs(self) -> set[tuple[str, str]]:
        """The Storage Commitment context, proposed with the storage contexts."""
        return {(sc.STORAGE_COMMITMENT_SOP_CLASS, ts) for ts in sc.SYNTAXES}

    def serve_on(self, conn: Connection) -> None:
        conn.handlers[CommandField.N_EVENT_REPORT_RQ] = self.handler

    def keep_open(self) -> bool:
        """Whether an idle association must stay for a report (same-association, one open)."""
        return self.same_association and bool(self.spool.commitments.transactions(self.dest.name))

    def _fields(self, study: str = "", status: int | None = None) -> dict[str, object]:
        return fields(destination=self.dest.name, called_ae=self.dest.ae_title, study_uid=study or None,
                      status=status)

    def tick(self, conn: Connection, now: float | None = None) -> None:
        """Request what waits, re-request what is overdue, alert on what is overdue twice.
        Errors are logged: the requests stay and the next tick tries again."""
        now = time.time() if now is None else now
        if now < self._refused_until:
            return
        with self._lock:
            try:
                self._tick(conn, now)
            except (AssociationFailed, OutcomeUnknown, NoContextAccepted) as exc:
                log.warning("destination=%s ae=%s: storage commitment request not made: %s; retrying later",
                            self.dest.name, self.dest.ae_title, exc, extra=self._fields())
                self._refused_until = now + self.dest.backoff_initial

    def _tick(self, conn: Connection, now: float) -> None:
        commitments = self.spool.commitments
        for tx in commitments.transactions(self.dest.name):
            if now - tx.requested_at < self.dest.commitment_timeout:
                continue
            if tx.attempts < 2:
                log.warning("destination=%s ae=%s transaction_uid=%s study_instance_uid=%s: no storage "
                            "commitment report within %gs; requesting again", self.dest.name,
                            self.dest.ae_title, tx.uid, tx.study_instance_uid, self.dest.commitment_timeout,
                            extra=self._fields(tx.study_instance_uid))
                if self._send(conn, tx):
                    commitments.rerequested(tx, now)
            elif not tx.alerted:
                log.error("destination=%s ae=%s transaction_uid=%s study_instance_uid=%s: no storage "
                          "commitment report for %d instance(s) after %d requests; alerting, the "
                          "transaction stays open", self.dest.name, self.dest.ae_title, tx.uid,
                          tx.study_instance_uid, len(tx.instances), tx.attempts,
                          extra=self._fields(tx.study_instance_uid))
                tx.alerted = True
                commitments.update(tx)
        for study, instances in commitments.waiting(self.dest.name).items():
            for start in range(0, len(instances), MAX_REFS):
                part = instances[start:start + MAX_REFS]
                tx = Transaction(sc.new_transaction_uid(), self.dest.name, study, now, part)
                # Recorded before it is sent: a report may come back before send() returns.
                commitments.open(self.dest.name, study, part, tx.uid, now)
                self._send(conn, tx)

    def _send(self, conn: Connection, tx: Transaction) -> bool:
        """One N-ACTION-RQ; True when the destination accepted the request (status 0)."""
        conn.ensure(self.pairs())
        ts = sc.pick_syntax(conn.accepted(sc.STORAGE_COMMITMENT_SOP_CLASS))
        cx = conn.context_for(sc.STORAGE_COMMITMENT_SOP_CLASS, ts) if ts else None
        if ts is None or cx is None:
            raise NoContextAccepted(f"{self.dest.ae_title} did not accept the Storage Commitment "
                                    "Push Model SOP class", {})
        data = sc.encode_action(sc.ActionRequest(tx.uid, tuple(
            sc.Ref(i.sop_class_uid, i.sop_instance_uid) for i in tx.instances)), ts)
        msg_id = conn.next_id()
        conn.send(cx, sc.encode_n_action_rq(msg_id), data, f"N-ACTION transaction {tx.uid}")
        rsp = conn.response(msg_id, CommandField.N_ACTION_RSP)
        status = rsp.status
        if status == Status.SUCCESS:
            log.info("destination=%s ae=%s transaction_uid=%s study_instance_uid=%s: storage commitment "
                     "requested for %d instance(s) (%s)", self.dest.name, self.dest.ae_title, tx.uid,
                     tx.study_instance_uid, len(tx.instances), self.dest.commitment,
                     extra=self._fields(tx.study_instance_uid, 0))
            return True
        log.error("destination=%s ae=%s transaction_uid=%s study_instance_uid=%s: storage commitment "
                  "request refused: %s %s; asked again after commitment_timeout", self.dest.name,
                  self.dest.ae_title, tx.uid, tx.study_instance_uid, describe(status),
                  rsp.error_comment, extra=self._fields(tx.study_instance_uid, status))
        return False
