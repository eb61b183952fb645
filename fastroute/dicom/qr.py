"""Query/Retrieve as an SCU (PS3.4 Annex C): C-FIND, C-MOVE and C-GET over :mod:`.scu`.

The migration runner and the CLI code against these names (the issue 13 contract).

Not the hot path: identifiers are small, so they are encoded and decoded with pydicom. Every
wait is bounded (``dimse_timeout`` per response, a total timeout per operation); an operation
that runs past its total is cancelled (C-CANCEL) and drained, so the association stays usable.
"""
from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from fastroute.dicom import acse
from fastroute.dicom.pdu import TRAILING_ELEMENTS
from fastroute.dicom.dimse import (NUMBER_OF_COMPLETED_SUB_OPERATIONS, NUMBER_OF_FAILED_SUB_OPERATIONS,
                                   NUMBER_OF_REMAINING_SUB_OPERATIONS, NUMBER_OF_WARNING_SUB_OPERATIONS,
                                   CommandField, Handler, Message, decode_identifier,
                                   encode_c_cancel_rq, encode_c_find_rq, encode_c_get_rq,
                                   encode_c_move_rq, encode_identifier)
from fastroute.dicom.scu import (Association, AssociationFailed, Connection, NoContextAccepted,
                                 OutcomeUnknown, Remote, ResponseOverdue)
from fastroute.dicom.status import Status, describe
from fastroute.logsetup import escape_control, fields

log = logging.getLogger("fastroute.qr")

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

# Identifiers are small: offered in both little-endian uncompressed syntaxes, the peer picks.
QR_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
MAX_STORAGE_CLASSES = acse.MAX_CONTEXTS - 1     # storage contexts beside the C-GET context itself
#: The transfer syntaxes archives commonly store objects in. A presentation context accepts ONE
#: syntax, so a class offered once with many syntaxes gets one of them and the source must
#: transcode everything else (or fail: Orthanc cannot convert JPEG 2000). C-GET offers each
#: storage class once per syntax here (:func:`storage_contexts`) so that every object stored
#: in one of them can be sent as stored, byte for byte; the uncompressed ones come first and
#: serve as the fallback for a source that stores something else and converts it.
STORED_SYNTAXES = (
    "1.2.840.10008.1.2.1",      # Explicit VR Little Endian
    "1.2.840.10008.1.2",        # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",      # Explicit VR Big Endian (retired, still stored)
    "1.2.840.10008.1.2.1.99",   # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5",      # RLE Lossless
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline
    "1.2.840.10008.1.2.4.51",   # JPEG Extended
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",   # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
)
CANCEL_DRAIN_TIMEOUT = 30.0   # cap on waiting for the final response after a C-CANCEL
DEFAULT_QUERY_TIMEOUT = 300.0
DEFAULT_RETRIEVE_TIMEOUT = 3600.0
PENDING = (Status.PENDING, Status.PENDING_WARNING)


class Level(enum.StrEnum):
    """QueryRetrieveLevel (0008,0052)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class QueryFailed(Exception):
    """A C-FIND ended with a failure status (``status``), or timed out (``status`` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetrieveFailed(Exception):
    """A C-MOVE/C-GET could not start or ended without a usable final response.

    ``status`` is the DICOM status when one came: 0xA801 means the source does not know the
    move destination (the message names the AE to register there), 0xA701/0xA702 out of
    resources (back off and try again). ``result`` is the final response when there was one
    (its counts and failed-instance list: a 0xA702 may come after some sub-operations)."""

    def __init__(self, message: str, status: int | None = None,
                 result: RetrieveResult | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.result = result

    @property
    def back_off(self) -> bool:
        """Whether the source said it is out of resources (0xA7xx): try again later."""
        return self.status is not None and (self.status & 0xFF00) == 0xA700


@dataclass(slots=True)
class SubOperations:
    """The sub-operation counts of a C-MOVE/C-GET response (None where the peer left one out)."""

    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None


@dataclass(slots=True)
class RetrieveResult:
    """How a C-MOVE/C-GET ended: the final status and counts, the failed SOP Instance UIDs
    (0008,0058) of a 0xB000/0xA7xx/0xC000 final response, whether it was cancelled for its
    total timeout, and the Message ID it was sent with (the Move Originator Message ID of the
    C-STOREs it caused)."""

    status: int
    comment: str
    counts: SubOperations
    failed_sop_instance_uids: list[str] = field(default_factory=list)
    timed_out: bool = False
    message_id: int = 0


class QueryRetrieveClient:
    """One association to a peer for Q/R, reused across operations by one thread.

    ``store`` (C-GET only) is the handler for the C-STORE sub-operations that arrive on this
    association; ``storage`` the (SOP class, transfer syntaxes) to propose with the SCP role
    for them (at most 127 classes per association: the caller splits larger sets). Empty
    transfer syntaxes mean every syntax fastroute accepts (``acse.ACCEPTED_SYNTAXES``). The
    acceptor picks ONE syntax per context, usually uncompressed, and a source that cannot
    convert what it stores (Orthanc with JPEG 2000) then fails that sub-operation: to get
    objects as stored, offer each class once per syntax (:func:`storage_contexts`).

    The association is made on the first operation and kept; one the peer closed while idle
    is made again. ``refused_storage`` says, after it is made, which storage classes cannot be
    C-GET here (context rejected, or the SCP role not granted) and why.
    """

    def __init__(self, remote: Remote, calling_ae: str, *, store: Handler | None = None,
                 storage: Iterable[tuple[str, Iterable[str]]] = ()) -> None:
        self.remote = remote
        self.storage: list[tuple[str, tuple[str, ...]]] = []
        for sop_class, syntaxes in storage:
            offered = tuple(str(ts) for ts in syntaxes) or tuple(acse.ACCEPTED_SYNTAXES)
            if (str(sop_class), offered) not in self.storage:
                self.storage.append((str(sop_class), offered))
        if len(self.storage) > MAX_STORAGE_CLASSES:
            raise ValueError(
                f"{len(self.storage)} storage contexts for one C-GET association: at most "
                f"{MAX_STORAGE_CLASSES} fit beside the C-GET context (PS3.8: 128 contexts); split "
                "them over several associations")
        handlers: dict[int, Handler] = {CommandField.C_STORE_RQ: store} if store is not None else {}
        self.conn = Connection(remote, calling_ae, handlers)
        self.calling_ae = self.conn.calling_ae
        self.where = f"{self.calling_ae} -> {remote.ae_title}@{remote.host}:{remote.port}"
        self.refused_storage: dict[str, str] = {}
        # whether an operation was given up before its final response (find()'s iterator
        # closed, or on_pending raised): it was cancelled (C-CANCEL) and drained
        self.closed_early = False

    # -- association ------------------------------------------------------------------------

    def _contexts(self) -> list[tuple[str, tuple[str, ...]]]:
        qr = [(STUDY_ROOT_FIND, QR_SYNTAXES), (STUDY_ROOT_MOVE, QR_SYNTAXES)]
        if not self.storage:
            return [*qr, (STUDY_ROOT_GET, QR_SYNTAXES)]
        # C-GET and its storage classes first; FIND/MOVE where room is left.
        return [(STUDY_ROOT_GET, QR_SYNTAXES), *self.storage, *qr][:acse.MAX_CONTEXTS]

    def _scp_roles(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.storage))

    def _association(self, error: type[QueryFailed] | type[RetrieveFailed]) -> Association:
        if self.conn.usable():
            assert self.conn.assoc is not None
            return self.conn.assoc
        try:
            assoc = self.conn.associate(self._contexts(), self._scp_roles())
        except NoContextAccepted as exc:
            raise error(f"{self.where}: no Query/Retrieve context accepted "
                        f"({'; '.join(f'{k}: {v}' for k, v in exc.rejected.items())})") from exc
        except AssociationFailed as exc:
            raise error(str(exc)) from exc
        self.refused_storage = {}
        for sop_class in dict.fromkeys(s for s, _ in self.storage):
            if not self.conn.accepted(sop_class):
                self.refused_storage[sop_class] = "presentation context rejected"
            elif not assoc.roles.get(sop_class, (True, False))[1]:
                self.refused_storage[sop_class] = "SCP role not granted (role selection refused)"
        if self.refused_storage:
            log.warning("%s: %d storage SOP class(es) cannot be C-GET on this association: %s",
                        self.where, len(self.refused_storage),
                        ", ".join(f"{k} ({v})" for k, v in sorted(self.refused_storage.items())),
                        extra=self._fields())
        return assoc

    def _context(self, sop_class: str, error: type[QueryFailed] | type[RetrieveFailed]) -> tuple[int, str]:
        """The accepted context for a Q/R SOP class: (ID, transfer syntax)."""
        for ts in self.conn.accepted(sop_class):
            context_id = self.conn.context_for(sop_class, ts)
            if context_id is not None:
                return context_id, ts
        name = {STUDY_ROOT_FIND: "Study Root C-FIND", STUDY_ROOT_MOVE: "Study Root C-MOVE",
                STUDY_ROOT_GET: "Study Root C-GET"}.get(sop_class, sop_class)
        raise error(f"{self.where}: the peer did not accept {name} ({sop_class})")

    def _fields(self, study_uid: str | None = None, status: int | None = None) -> dict[str, object]:
        return fields(calling_ae=self.calling_ae, called_ae=self.remote.ae_title,
                      peer=f"{self.remote.host}:{self.remote.port}", study_uid=study_uid, status=status)

    def next_message_id(self) -> int:
        """The Message ID the next request will carry (register it before a C-MOVE)."""
        return self.conn.peek_id()

    def set_next_message_id(self, message_id: int) -> None:
        """Make ``message_id`` (1..65535) the Message ID of the next request: a caller that
        keeps several associations' moves apart chooses the ids (Move Originator Message ID)."""
        if not 1 <= message_id <= 0xFFFF:
            raise ValueError(f"Message ID {message_id} is not in 1..65535")
        self.conn.msg_id = message_id - 1       # the last id taken; the next is one more

    def close(self) -> None:
        """Release the association (abort when the release is not answered)."""
        self.conn.release()

    def abort(self) -> None:
        """A-ABORT the association (an operation in flight is given up)."""
        self.conn.abort()

    def __enter__(self) -> QueryRetrieveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the exchange every operation shares --------------------------------------------------

    def _exchange(self, sop_class: str, command: Callable[[int], bytes], ds: Dataset,
                  rsp_field: CommandField, total: float, what: str, op: _Op,
                  error: type[QueryFailed] | type[RetrieveFailed]) -> Generator[Message, None, None]:
        """Send one request, yield every response to it (pending ones, then the final).

        Each wait is bounded by the DIMSE timeout (association aborted); the whole by
        ``total``: past it a C-CANCEL is sent and the responses drained (bounded by
        CANCEL_DRAIN_TIMEOUT; the association is aborted if the final one never comes).
        Closing the generator early cancels and drains the same way."""
        self._association(error)
        context_id, ts = self._context(sop_class, error)
        op.message_id = msg_id = self.conn.next_id()
        data = encode_identifier(ds, ts)
        try:
            self.conn.send(context_id, command(msg_id), data, what)
        except (AssociationFailed, OutcomeUnknown) as exc:
            raise error(f"{what}: {exc}") from exc
        deadline = time.monotonic() + total
        final = False
        try:
            while True:
                try:
                    rsp = self.conn.response(msg_id, rsp_field,
                                             until=op.drain_until if op.cancelled else deadline)
                except ResponseOverdue:
                    if op.cancelled:
                        self.conn.abort()
                        raise error(f"{what}: cancelled after {total:g} s, and no final response "
                                    f"within {CANCEL_DRAIN_TIMEOUT:g} s of the C-CANCEL; association "
                                    "aborted") from None
                    op.timed_out = True
                    log.warning("%s: not finished within its total timeout (%g s): C-CANCEL",
                                what, total, extra=self._fields(op.study_uid))
                    self._cancel(context_id, msg_id, op, what, error)
                    continue
                except OutcomeUnknown as exc:
                    if op.cancelled:
                        raise error(f"{what}: cancelled after {total:g} s, and no final response "
                                    f"after the C-CANCEL ({exc}); association aborted") from exc
                    raise error(f"{what}: {exc}") from exc
                status = rsp.status
                final = status not in PENDING
                yield rsp
                if final:
                    return
        except GeneratorExit:
            if not final and self.conn.assoc is not None:
                self.closed_early = True
                log.info("%s: closed before its final response: C-CANCEL", what,
                         extra=self._fields(op.study_uid))
                try:
                    self._cancel(context_id, msg_id, op, what, error)
                    while True:
                        try:
                            rsp = self.conn.response(msg_id, rsp_field, until=op.drain_until)
                        except ResponseOverdue:
                            log.warning("%s: no final response within %g s of the C-CANCEL; "
                                        "aborting", what, CANCEL_DRAIN_TIMEOUT, extra=self._fields(op.study_uid))
                            self.conn.abort()
                            break
                        if rsp.status not in PENDING:
                            break
                except (QueryFailed, RetrieveFailed, OutcomeUnknown, AssociationFailed) as exc:
                    log.warning("%s: draining after C-CANCEL failed: %s", what, exc,
                                extra=self._fields(op.study_uid))
            raise

    def _cancel(self, context_id: int, msg_id: int, op: _Op, what: str,
                error: type[QueryFailed] | type[RetrieveFailed]) -> None:
        op.cancelled = True
        op.drain_until = time.monotonic() + min(CANCEL_DRAIN_TIMEOUT, self.remote.dimse_timeout)
        try:
            self.conn.send(context_id, encode_c_cancel_rq(msg_id), None, f"C-CANCEL of {what}",
                           in_operation=True)
        except (AssociationFailed, OutcomeUnknown) as exc:
            raise error(f"{what}: C-CANCEL could not be sent: {exc}") from exc

    # -- C-FIND -----------------------------------------------------------------------------

    def find(self, level: Level, identifier: Dataset | Mapping[str, Any], *,
             timeout: float | None = None) -> Generator[Dataset, None, None]:
        """The matches, as they arrive. Closing the iterator early sends C-CANCEL and drains
        to the final response. QueryFailed on a failure status or ``timeout`` (total;
        default the remote's ``query_timeout``, else 300 s)."""
        ds = make_identifier(identifier, level, override=True)
        total = timeout if timeout is not None else float(getattr(self.remote, "query_timeout",
                                                                  DEFAULT_QUERY_TIMEOUT))
        what = f"C-FIND {self.where} level={ds.QueryRetrieveLevel}"
        op = _Op(study_uid=_study_uid(ds))
        n = 0
        exchange = self._exchange(STUDY_ROOT_FIND, lambda mid: encode_c_find_rq(mid, STUDY_ROOT_FIND),
                                  ds, CommandField.C_FIND_RSP, total, what, op, QueryFailed)
        try:
            for rsp in exchange:
                status = rsp.status
                if status in PENDING:
                    if isinstance(rsp.data, (bytes, bytearray)) and rsp.data:
                        n += 1
                        yield decode_identifier(rsp.data, self._syntax(rsp))
                    continue
                if op.timed_out:
                    raise QueryFailed(f"{what}: no final response within the total timeout "
                                      f"({total:g} s) after {n} match(es); cancelled, "
                                      f"final {describe(status)}", None)
                if status in (Status.SUCCESS, Status.CANCEL):
                    log.debug("%s: %d match(es), %s", what, n, describe(status),
                              extra=self._fields(op.study_uid, status))
                    return
                comment = escape_control(rsp.error_comment)
                log.warning("%s: failed after %d match(es): %s %s", what, n, describe(status), comment,
                            extra=self._fields(op.study_uid, status))
                raise QueryFailed(f"{what}: failed after {n} match(es) with status {describe(status)}"
                                  + (f": {comment}" if comment else ""), status)
        finally:
            exchange.close()     # before the final response: C-CANCEL and drain

    def _syntax(self, rsp: Message) -> str:
        """The transfer syntax of the context a response's identifier came on."""
        assoc = self.conn.assoc
        return assoc.peer.contexts.get(rsp.context_id, QR_SYNTAXES[0]) if assoc else QR_SYNTAXES[0]

    # -- C-MOVE / C-GET -----------------------------------------------------------------------

    def move(self, identifier: Dataset | Mapping[str, Any], destination_ae: str, *,
             level: Level = Level.STUDY, timeout: float | None = None,
             on_pending: Callable[[SubOperations], None] | None = None) -> RetrieveResult:
        """C-MOVE: the source sends to ``destination_ae``; pending responses go to ``on_pending``.

        ``identifier``'s own QueryRetrieveLevel wins over ``level``. The result carries the
        Message ID (the Move Originator Message ID of the C-STOREs it causes)."""
        ds = make_identifier(identifier, level)
        what = (f"C-MOVE {self.where} to {destination_ae} level={ds.QueryRetrieveLevel} "
                f"study={_study_uid(ds) or '-'}")
        return self._retrieve(STUDY_ROOT_MOVE,
                              lambda mid: encode_c_move_rq(mid, STUDY_ROOT_MOVE, destination_ae),
                              ds, CommandField.C_MOVE_RSP, timeout, what, on_pending, destination_ae)

    def get(self, identifier: Dataset | Mapping[str, Any], *, level: Level = Level.STUDY,
            timeout: float | None = None,
            on_pending: Callable[[SubOperations], None] | None = None) -> RetrieveResult:
        """C-GET: the C-STOREs arrive on this association and go to ``store``."""
        if CommandField.C_STORE_RQ not in self.conn.handlers:
            raise RetrieveFailed(f"C-GET {self.where}: no store handler for the C-STOREs it brings")
        if not self.storage:
            raise RetrieveFailed(f"C-GET {self.where}: no storage SOP classes proposed "
                                 "(pass storage=[(sop_class, syntaxes), ...])")
        ds = make_identifier(identifier, level)
        what = f"C-GET {self.where} level={ds.QueryRetrieveLevel} study={_study_uid(ds) or '-'}"
        self._association(RetrieveFailed)
        classes = {s for s, _ in self.storage}
        if len(self.refused_storage) == len(classes):
            raise RetrieveFailed(
                f"{what}: {self.remote.ae_title} refused to send any of the {len(classes)} "
                "storage SOP class(es) on our association (SCP/SCU role selection refused or "
                "contexts rejected): it cannot C-GET them; use retrieve: move")
        return self._retrieve(STUDY_ROOT_GET, lambda mid: encode_c_get_rq(mid, STUDY_ROOT_GET),
                              ds, CommandField.C_GET_RSP, timeout, what, on_pending, None)

    def _retrieve(self, sop_class: str, command: Callable[[int], bytes], ds: Dataset,
                  rsp_field: CommandField, timeout: float | None, what: str,
                  on_pending: Callable[[SubOperations], None] | None,
                  destination_ae: str | None) -> RetrieveResult:
        total = timeout if timeout is not None else float(getattr(self.remote, "retrieve_timeout",
                                                                  DEFAULT_RETRIEVE_TIMEOUT))
        op = _Op(study_uid=_study_uid(ds))
        counts = SubOperations()
        last: Message | None = None
        exchange = self._exchange(sop_class, command, ds, rsp_field, total, what, op, RetrieveFailed)
        try:
            for rsp in exchange:
                if rsp.status not in PENDING:
                    # a final response without Remaining has none left to tell (not the
                    # last pending's count)
                    counts = SubOperations(None, counts.completed, counts.failed, counts.warning)
                counts = _counts(rsp.command, counts)
                if rsp.status in PENDING:
                    if on_pending is not None:
                        on_pending(SubOperations(counts.remaining, counts.completed, counts.failed,
                                                 counts.warning))
                    continue
                last = rsp
        finally:
            exchange.close()     # on_pending raised: C-CANCEL and drain
        if last is None or last.status is None:
            raise RetrieveFailed(f"{what}: final response without a status")
        status = last.status
        failed: list[str] = []
        if isinstance(last.data, (bytes, bytearray)) and last.data:
            failed = _failed_uids(last.data, self._syntax(last))
        elif isinstance(last.command.get(TRAILING_ELEMENTS), bytes):
            # Orthanc sends the failed list inside the command set (implicit VR LE there)
            failed = _failed_uids(last.command[TRAILING_ELEMENTS], "1.2.840.10008.1.2")
        result = RetrieveResult(status, escape_control(last.error_comment), counts, failed,
                                op.timed_out, op.message_id)
        said = (f"{what}: {describe_retrieve(status)} completed={counts.completed} failed={counts.failed} "
                f"warning={counts.warning} remaining={counts.remaining}"
                + (f" failed_instances={len(failed)}" if failed else "")
                + (f" (cancelled: total timeout {total:g} s)" if op.timed_out else "")
                + (f": {result.comment}" if result.comment else ""))
        if status == Status.MOVE_DESTINATION_UNKNOWN:
            log.error("%s", said, extra=self._fields(op.study_uid, status))
            raise RetrieveFailed(
                f"{what}: unknown move destination (0xA801): register AE {destination_ae} at "
                f"{self.remote.ae_title} ({self.remote.host}:{self.remote.port}) with the host and "
                "port of fastroute's DICOM listener", status, result)
        if status in (Status.OUT_OF_RESOURCES_MATCHES, Status.OUT_OF_RESOURCES_SUB_OPERATIONS,
                      Status.OUT_OF_RESOURCES):
            log.warning("%s", said, extra=self._fields(op.study_uid, status))
            raise RetrieveFailed(f"{what}: {self.remote.ae_title} is out of resources "
                                 f"({describe(status)}): back off and retry", status, result)
        level = logging.INFO if status in (Status.SUCCESS, Status.CANCEL) else logging.WARNING
        log.log(level, "%s", said, extra=self._fields(op.study_uid, status))
        return result


@dataclass(slots=True)
class _Op:
    """One operation's progress through :meth:`QueryRetrieveClient._exchange`."""

    study_uid: str | None = None
    message_id: int = 0
    timed_out: bool = False
    cancelled: bool = False
    drain_until: float = 0.0


def storage_contexts(sop_classes: Iterable[str],
                     syntaxes: Iterable[str] = STORED_SYNTAXES) -> list[tuple[str, tuple[str, ...]]]:
    """C-GET storage contexts that let a source send every object as stored: one context per
    (class, syntax), each with that single syntax (see STORED_SYNTAXES). Split them over
    associations with :func:`storage_batches` (at most :func:`classes_per_association`
    classes each)."""
    offered = tuple(dict.fromkeys(str(ts) for ts in syntaxes))
    return [(str(cls), (ts,)) for cls in dict.fromkeys(str(c) for c in sop_classes) for ts in offered]


def classes_per_association(syntaxes: Iterable[str] = STORED_SYNTAXES) -> int:
    """How many storage classes fit one C-GET association when each is offered once per syntax."""
    return max(1, MAX_STORAGE_CLASSES // max(1, len(tuple(dict.fromkeys(syntaxes)))))


def storage_batches(storage: Iterable[tuple[str, Iterable[str]]],
                    per_association: int = MAX_STORAGE_CLASSES) -> list[list[tuple[str, tuple[str, ...]]]]:
    """Storage contexts for C-GET split into association-sized batches (one
    QueryRetrieveClient each), a class's contexts kept together in one batch."""
    by_class: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for sop_class, syntaxes in storage:
        entry = (str(sop_class), tuple(str(ts) for ts in syntaxes))
        if entry not in by_class.setdefault(entry[0], []):
            by_class[entry[0]].append(entry)
    batches: list[list[tuple[str, tuple[str, ...]]]] = [[]]
    for contexts in by_class.values():
        if len(contexts) > per_association:
            raise ValueError(f"{contexts[0][0]}: {len(contexts)} contexts for one SOP class, "
                             f"more than one association holds ({per_association})")
        if len(batches[-1]) + len(contexts) > per_association:
            batches.append([])
        batches[-1].extend(contexts)
    return [b for b in batches if b]


def describe_retrieve(status: int | None) -> str:
    """:func:`status.describe` with C-MOVE/C-GET's own meaning of 0xB000 (which for C-STORE
    is a coercion warning)."""
    if status == Status.SUB_OPERATIONS_FAILED:
        return "0xB000 (Warning: sub-operations complete, one or more failures or warnings)"
    return describe(status)


def make_identifier(identifier: Dataset | Mapping[str, Any], level: Level | str,
                    override: bool = False) -> Dataset:
    """A request identifier: a Dataset (copied) or {keyword: value} (None or "" = a return
    key; a list = several values), with QueryRetrieveLevel ``level`` unless the Dataset
    already has one (``override``: always ``level``). KeyError for an unknown keyword."""
    if isinstance(identifier, Dataset):
        ds = Dataset()
        ds.update(identifier)
    else:
        ds = Dataset()
        for keyword, value in identifier.items():
            if keyword_tag(keyword) is None:
                raise KeyError(f"{keyword!r} is not a DICOM keyword")
            setattr(ds, keyword, "" if value is None else value)
    if override or "QueryRetrieveLevel" not in ds or not ds.QueryRetrieveLevel:
        ds.QueryRetrieveLevel = str(Level(str(level).upper()))
    return ds


def keyword_tag(keyword: str) -> int | None:
    """The tag of a DICOM keyword, None when pydicom's dictionary does not know it."""
    from pydicom.datadict import tag_for_keyword

    return tag_for_keyword(keyword)


def _study_uid(ds: Dataset) -> str | None:
    value = ds.get("StudyInstanceUID")
    return str(value) if value else None


def _counts(command: Mapping[int, Any], was: SubOperations) -> SubOperations:
    """The sub-operation counts a response carries; one it leaves out keeps the last value."""
    def get(tag: int, old: int | None) -> int | None:
        value = command.get(tag)
        return value if isinstance(value, int) else old

    return SubOperations(get(NUMBER_OF_REMAINING_SUB_OPERATIONS, was.remaining),
                         get(NUMBER_OF_COMPLETED_SUB_OPERATIONS, was.completed),
                         get(NUMBER_OF_FAILED_SUB_OPERATIONS, was.failed),
                         get(NUMBER_OF_WARNING_SUB_OPERATIONS, was.warning))


def _failed_uids(data: bytes | bytearray, transfer_syntax: str) -> list[str]:
    """Failed SOP Instance UID List (0008,0058) of a final C-MOVE/C-GET response's identifier
    (none when it cannot be read: the counts still say how many failed)."""
    try:
        value = decode_identifier(data, transfer_syntax).get("FailedSOPInstanceUIDList")
    except Exception as exc:          # malformed: pydicom raises many kinds, lazily
        log.warning("unreadable Failed SOP Instance UID List in a retrieve response: %r", exc)
        return []
    if not value:
        return []
    if isinstance(value, (list, MultiValue)):
        return [str(v) for v in value if str(v)]
    return [v for v in str(value).split("\\") if v]


__all__ = ["Level", "Remote", "QueryFailed", "RetrieveFailed", "SubOperations", "RetrieveResult",
           "QueryRetrieveClient", "STUDY_ROOT_FIND", "STUDY_ROOT_MOVE", "STUDY_ROOT_GET",
           "make_identifier", "describe_retrieve", "storage_batches", "MAX_STORAGE_CLASSES", "QR_SYNTAXES",
           "STORED_SYNTAXES", "storage_contexts", "classes_per_association"]
