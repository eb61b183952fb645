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
from concurrent.futures import Future

from fastroute.config import Config, DestinationConfig
from fastroute.dicom import commitment as sc
from fastroute.dicom.dimse import CommandField, Handler, Message, Peer, Reply
from fastroute.dicom.scu import AssociationFailed, Connection, NoContextAccepted, OutcomeUnknown
from fastroute.dicom.status import Status, describe
from fastroute.logsetup import fields
from fastroute.spool import Spool
from fastroute.spool.commitments import InstanceState, ModalityRequest, Transaction, process_token

log = logging.getLogger("fastroute.commitment")

MAX_REFS = 1000            # instances per N-ACTION: a huge study is asked for in parts
KEEP_OPEN_POLL = 0.2       # how often an idle sender keeping an association for a report reads it


def report_handler(spool: Spool, on_requeue: Callable[[str], None] = lambda dest: None, *,
                   on_our_association: bool = False,
                   reporter_for: Callable[[str], str | None] = lambda dest: None) -> Handler:
    """The N-EVENT-REPORT-RQ service for storage commitment reports, on either association:
    applies the report to its transaction; ``on_requeue(dest)`` after failed instances were
    queued again (to wake that destination's sender). ``on_our_association``: served on the
    sender's own association, where the reporting AE is the called one. ``reporter_for(dest)``
    is the AE title a destination's reports must come from (None: not checked): a report
    "committed" lets the spool drop the bytes, so only the destination asked may give it."""

    def handle(peer: Peer, msg: Message) -> Reply:
        reporter = peer.called_ae if on_our_association else peer.calling_ae
        where = f"{reporter}@{peer.ip}"
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
            log.warning("%s: %s", where, exc, extra=fields(
                calling_ae=peer.calling_ae, called_ae=peer.called_ae, peer=peer.ip,
                status=int(Status.INVALID_ATTRIBUTE_VALUE)))
            return Reply(Status.INVALID_ATTRIBUTE_VALUE, str(exc))
        tx = spool.commitments.transaction(report.transaction_uid)
        expected = reporter_for(tx.destination) if tx is not None else None
        if expected is not None and reporter != expected:
            log.warning("%s: storage commitment report for transaction_uid=%s refused: it was asked of "
                        "%s (destination %s), not %s -> status 0x0110", where, report.transaction_uid,
                        expected, tx.destination if tx is not None else "", reporter,
                        extra=fields(calling_ae=peer.calling_ae, called_ae=peer.called_ae, peer=peer.ip,
                                     status=int(Status.PROCESSING_FAILURE)))
            spool.audit_record("commitment_report_refused", who=reporter, peer=peer.ip,
                               transaction_uid=report.transaction_uid, expected_ae=expected,
                               destination=tx.destination if tx is not None else "")
            return Reply(Status.PROCESSING_FAILURE, f"transaction not asked of {reporter}"[:64])
        done = spool.commitments.complete(
            report.transaction_uid, (r.sop_instance_uid for r in report.committed),
            ((f.sop_instance_uid, f.reason) for f in report.failed), time.time(), reporter=reporter)
        if not done.known:
            # A report for a transaction already answered (a re-request's second report) or
            # not ours: acknowledged, nothing to change.
            log.info("%s: storage commitment report for unknown transaction_uid=%s (%d committed, "
                     "%d failed): already answered or not ours", where, report.transaction_uid,
                     len(report.committed), len(report.failed),
                     extra=fields(calling_ae=peer.calling_ae, called_ae=peer.called_ae, peer=peer.ip))
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
        self.handler = report_handler(spool, on_requeue, on_our_association=True)
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


# -- storage commitment as SCP, for modalities ----------------------------------------------------

SendOnOpen = Callable[[str, str, Callable[[int, str], tuple[bytes, bytes | None]]], "Future[Message]"]
REPORT_POLL = 0.5          # how often the reporter looks at the open requests
REPORT_RETRY = 30.0        # a report that could not be sent (modality unreachable) is tried again


class ModalityService:
    """A modality's N-ACTION (Request Storage Commitment) is answered at once (success: the
    request is accepted and recorded in the spool); a reporter thread sends its N-EVENT-REPORT
    once every instance reached ``storage_commitment.commit_when`` (or ``timeout`` passed:
    the rest fail, 0x0110; an instance never received fails at once with 0x0112): on an open
    association from the modality (the one it asked on, while it keeps it, or its next one),
    else on a new association to its ``peers:`` address (SCP role proposed), else it waits for
    the modality's next association (PS3.4 J.3.3)."""

    def __init__(self, cfg: Config, spool: Spool, send_on_open: SendOnOpen) -> None:
        self.cfg = cfg
        self.spool = spool
        self.send_on_open = send_on_open
        self.token = process_token()
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        # per request: instances already found done (not read again; a big study waiting
        # for its destinations costs one read per instance still waiting, per round)
        self._done: dict[str, set[str]] = {}

    # the N-ACTION handler (on the listener's loop: one small commit) -------------------------

    def __call__(self, peer: Peer, msg: Message) -> Reply:
        where = f"{peer.calling_ae}@{peer.ip}"
        log_fields = fields(calling_ae=peer.calling_ae, called_ae=peer.called_ae, peer=peer.ip)
        if msg.sop_class_uid != sc.STORAGE_COMMITMENT_SOP_CLASS:
            return Reply(Status.SOP_CLASS_NOT_SUPPORTED)
        if msg.sop_instance_uid != sc.STORAGE_COMMITMENT_INSTANCE:
            return Reply(0x0117, "not the well-known Storage Commitment SOP instance")   # invalid instance
        action = msg.command.get(sc.ACTION_TYPE_ID)
        if action != sc.ACTION_REQUEST_COMMIT:
            return Reply(0x0123, f"no such action type {action}")    # PS3.7 10.1.4.1.10
        data = msg.data
        if not isinstance(data, (bytes, bytearray)):
            return Reply(Status.PROCESSING_FAILURE, "storage commitment request without a dataset")
        try:
            request = sc.decode_action(data, peer.contexts.get(msg.context_id, sc.SYNTAXES[0]))
        except ValueError as exc:
            log.warning("%s: %s", where, exc, extra=log_fields)
            return Reply(Status.INVALID_ATTRIBUTE_VALUE, str(exc))
        now = time.time()
        self.spool.modality_requests.add(ModalityRequest(
            request.transaction_uid, peer.calling_ae, peer.ip, peer.called_ae,
            [(r.sop_class_uid, r.sop_instance_uid) for r in request.refs], now,
            now + self.cfg.storage_commitment.timeout, self.token))
        log.info("%s: storage commitment requested, transaction_uid=%s, %d instance(s); reported when %s",
                 where, request.transaction_uid, len(request.refs), self.cfg.storage_commitment.commit_when,
                 extra=log_fields)
        self._wake.set()
        return Reply(Status.SUCCESS)

    # the reporter ---------------------------------------------------------------------------

    def start(self) -> None:
        self.spool.modality_requests.take_orphans(self.token)
        self._thread = threading.Thread(target=self._run, name="commitment-reporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        last_orphans = time.monotonic()
        while not self.stop_event.is_set():
            try:
                if time.monotonic() - last_orphans > 60:
                    last_orphans = time.monotonic()
                    self.spool.modality_requests.take_orphans(self.token)
                self.tick()
            except Exception:
                log.exception("storage commitment reporter failed; retrying")
            self._wake.wait(REPORT_POLL)
            self._wake.clear()

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        when = self.cfg.storage_commitment.commit_when
        for req in self.spool.modality_requests.all():
            if req.owner != self.token:
                continue
            # An open association from the modality is tried on every round (its next one
            # may come any time); a new association to it only every REPORT_RETRY.
            dial = not req.report_tries or now >= req.reported_at + REPORT_RETRY
            done = self._done.setdefault(req.uid, set())
            states = dict.fromkeys(done, InstanceState.DONE)
            states.update(self.spool.modality_requests.states((u for _, u in req.refs if u not in done), when))
            done.update(u for u, s in states.items() if s == InstanceState.DONE)
            if any(s == InstanceState.WAITING for s in states.values()) and now < req.deadline:
                continue
            report = sc.EventReport(
                req.uid, committed=tuple(sc.Ref(c, u) for c, u in req.refs if states[u] == InstanceState.DONE),
                failed=tuple(sc.Failed(c, u, sc.NO_SUCH_OBJECT_INSTANCE if states[u] == InstanceState.UNKNOWN
                                       else sc.PROCESSING_FAILURE)
                             for c, u in req.refs if states[u] != InstanceState.DONE),
                retrieve_ae=self.cfg.ae_title)
            how = self._send(req, report, dial)
            if how:
                self.spool.modality_requests.remove(req.uid)
                self._done.pop(req.uid, None)
                self.spool.audit_record("commitment-reported", who=req.calling_ae, transaction_uid=req.uid,
                                        committed=len(report.committed), failed=len(report.failed), via=how)
                log.log(logging.WARNING if report.failed else logging.INFO,
                        "%s@%s: storage commitment report sent (%s), transaction_uid=%s: %d committed, %d failed%s",
                        req.calling_ae, req.ip, how, req.uid, len(report.committed), len(report.failed),
                        "".join(f" {f.sop_instance_uid}=0x{f.reason:04X}" for f in report.failed[:20]),
                        extra=fields(calling_ae=req.calling_ae, peer=req.ip))
            elif dial:
                req.report_tries += 1
                req.reported_at = now
                self.spool.modality_requests.save(req)

    def _send(self, req: ModalityRequest, report: sc.EventReport, dial: bool = True) -> str:
        """Send the report: the way it went ("same association", "new association"), or ""
        when it could not go yet; ``dial``: a new association may be tried."""
        def build(msg_id: int, ts: str) -> tuple[bytes, bytes | None]:
            return sc.encode_n_event_report_rq(msg_id, report.event_type), sc.encode_event(report, ts)

        timeout = self.cfg.dimse_timeout
        try:
            rsp = self.send_on_open(req.calling_ae, sc.STORAGE_COMMITMENT_SOP_CLASS, build).result(timeout)
            self._check(req, rsp.status, "same association")
            return "same association"
        except LookupError:
            pass                           # no association from it open here
        except Exception as exc:
            log.warning("%s@%s: storage commitment report on its association failed: %s", req.calling_ae,
                        req.ip, exc, extra=fields(calling_ae=req.calling_ae, peer=req.ip))
        peer = self.cfg.peers.get(req.calling_ae)
        if not dial:
            return ""
        if peer is None:
            if not req.report_tries:
                log.info("%s@%s: transaction_uid=%s: the modality released its association and has no "
                         "peers: entry; the report waits for its next association", req.calling_ae, req.ip,
                         req.uid, extra=fields(calling_ae=req.calling_ae, peer=req.ip))
            return ""
        conn = Connection(peer, self.cfg.ae_title)
        try:
            assoc = conn.associate([(sc.STORAGE_COMMITMENT_SOP_CLASS, list(sc.SYNTAXES))],
                                   scp_roles=[sc.STORAGE_COMMITMENT_SOP_CLASS])
            granted = assoc.roles.get(sc.STORAGE_COMMITMENT_SOP_CLASS)
            if granted is not None and not granted[1]:
                log.warning("%s: refused us the SCP role for storage commitment; sending the report anyway",
                            assoc.where, extra=fields(calling_ae=req.calling_ae))
            ts = sc.pick_syntax(conn.accepted(sc.STORAGE_COMMITMENT_SOP_CLASS))
            cx = conn.context_for(sc.STORAGE_COMMITMENT_SOP_CLASS, ts) if ts else None
            if ts is None or cx is None:
                raise NoContextAccepted("Storage Commitment not accepted", {})
            msg_id = conn.next_id()
            command, data = build(msg_id, ts)
            conn.send(cx, command, data, f"N-EVENT-REPORT transaction {req.uid}")
            rsp = conn.response(msg_id, CommandField.N_EVENT_REPORT_RSP)
            self._check(req, rsp.status, "new association")
            return "new association"
        except (AssociationFailed, NoContextAccepted, OutcomeUnknown) as exc:
            log.warning("%s@%s:%d: storage commitment report for transaction_uid=%s not sent: %s; retrying in %gs",
                        req.calling_ae, peer.host, peer.port, req.uid, exc, REPORT_RETRY,
                        extra=fields(calling_ae=req.calling_ae, peer=peer.host))
            return ""
        finally:
            conn.release()

    @staticmethod
    def _check(req: ModalityRequest, status: int | None, how: str) -> None:
        if status not in (None, Status.SUCCESS):
            log.warning("%s: answered the storage commitment report (%s) for transaction_uid=%s with %s",
                        req.calling_ae, how, req.uid, describe(status),
                        extra=fields(calling_ae=req.calling_ae, status=status))


def commitment_warnings(cfg: Config) -> list[str]:
    """What ``fastroute check`` says about storage commitment settings that load but will not
    do what they seem to."""
    out = []
    asking = [d for d in cfg.destinations.values() if d.commitment != "off"]
    if cfg.storage_commitment.commit_when == "committed" and not asking:
        out.append("storage_commitment.commit_when is 'committed' but no destination has commitment on: "
                   "modalities are told 'committed' once delivered")
    for d in asking:
        if d.commitment == "new-association":
            out.append(f"destinations.{d.name}: commitment new-association: {d.ae_title} must know "
                       f"AE {d.calling_ae or cfg.ae_title} at this host, port {cfg.port}, to report")
        if d.commitment_timeout < 2 * d.dimse_timeout and d.commitment_timeout < 60:
            out.append(f"destinations.{d.name}: commitment_timeout {d.commitment_timeout:g}s is short: "
                       "requests are repeated, then alerted, before a slow archive has answered")
    return out
