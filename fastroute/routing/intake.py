"""The C-STORE service: peek, check, route and hand each received object to the group commit.

The listener (:mod:`fastroute.dicom.scp`) knows DICOM, not the spool or the rules: it is handed
a :class:`StoreService` as its C-STORE handler (``workers.listener_main`` wires it). Success
is answered only after the commit, so an aborted association never loses an acknowledged
object; every failure is a status, never a lost association:

* 0xC000 the dataset's structure does not parse to its end (checked before anything is
  acknowledged, so a poison object never reaches a destination), 0xC001 it is larger than
  ``max_object_bytes`` (also once inflated, for a deflated syntax), 0xC002 its Specific
  Character Set names no usable encoding, 0xA900 its SOP Instance UID differs from the
  command's: the modality's fault, permanent. 0xC0xx, not 0xA700, because an SCU retries
  "Refused: Out of Resources" and these fail the same way every time; not 0xA900, which says
  the data set does not match its SOP class;
* 0xA700 the spool is full or a write failed, and 0xA700 too when a rule raises: that is our
  bug, not the modality's, so it is told to retry (with an Error Comment) and the traceback
  is logged.

Migration (issue 13). A C-STORE carrying a Move Originator AE Title and Message ID
(0000,1030/1031) that matches a C-MOVE the runner registered (``spool.moves``) goes to that
move's destinations, not through the rules, and its routing record names the job
(``migration``), which also puts it in the senders' BULK class behind clinical objects.
Without a match it is routed by the rules as any other object; the originator is recorded
either way. An ordinary C-STORE pays one dict lookup for this. C-GET's C-STOREs arrive on
the runner's own association: :meth:`StoreService.for_retrieve` serves them with fixed
destinations.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from fastroute.dicom.acse import reject_reason
from fastroute.dicom.attrs import DEFLATED, MAX_OBJECT_BYTES, check_structure, read_attributes
from fastroute.dicom.dimse import Message, Peer, Pending, Reply
from fastroute.dicom.pdu import MOVE_ORIGINATOR_AE_TITLE, MOVE_ORIGINATOR_MESSAGE_ID
from fastroute.dicom.status import Status, describe
from fastroute.errors import ObjectTooLarge, PeekError, SpoolError, SpoolFullError
from fastroute.logsetup import fields
from fastroute.routing.rules import RuleSet
from fastroute.spool import Incoming, PutResult
from fastroute.spool.commit import Committer
from fastroute.spool.moves import MoveTable
from fastroute.spool.staging import StagedFile
from fastroute.spool.counters import CounterKind, EventTally

log = logging.getLogger("fastroute.intake")

OBJECT_TOO_LARGE = 0xC001       # Cannot understand: larger than max_object_bytes
BAD_CHARACTER_SET = 0xC002      # Cannot understand: Specific Character Set unusable
# Checked off the event loop above this size (and always when deflated): the structure walk
# and an inflation take milliseconds per MiB, which would delay every other association.
OFFLOAD_BYTES = 1024 * 1024

# Attributes every object is indexed by, whatever the rules need.
INDEX_KEYWORDS = {
    0x00080016: "sop_class_uid", 0x00080018: "sop_instance_uid", 0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid", 0x00100020: "patient_id", 0x00080050: "accession_number",
    0x00080060: "modality",
}


@dataclass(frozen=True, slots=True)
class FixedRoute:
    """Where a retrieved object goes instead of through the rules: a migration job's
    destinations (a matched C-MOVE, or every C-STORE of a C-GET)."""

    job: str
    destinations: tuple[str, ...]
    study_uid: str = ""          # the study retrieved (a log line names it when they differ)


class Refusal(NamedTuple):
    """A C-STORE answered with a failure status before anything was spooled."""

    status: int
    comment: str
    why: str


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return ""
    return str(value)


def prepare_store(data: bytearray | bytes, transfer_syntax: str, sop_class: str, sop_uid: str,
                  tags: Sequence[int], rules: RuleSet, calling: str, called: str,
                  ip: str, max_object_bytes: int = MAX_OBJECT_BYTES, *,
                  fixed: FixedRoute | None = None,
                  originator: tuple[str, int] | None = None) -> Incoming | Refusal:
    """Check, peek and route one received dataset, up to the commit.

    Returns the item to commit, or why it is refused (0xC000 unreadable, 0xC001 too large,
    0xC002 bad character set, 0xA900 UID mismatch). A rule that raises propagates (the
    caller answers 0xA700, see :func:`refusal_for`). ``fixed``: a migration's object, routed
    to its job's destinations and not through the rules; ``originator``: the C-STORE's Move
    Originator AE Title and Message ID, kept in the routing record.
    """
    try:
        check_structure(data, transfer_syntax, max_object_bytes)
        attrs = read_attributes(data, transfer_syntax, tags, max_object_bytes)
    except ObjectTooLarge as exc:
        return Refusal(OBJECT_TOO_LARGE, f"object exceeds max_object_bytes ({max_object_bytes})"[:64],
                       f"too large ({exc})")
    except PeekError as exc:
        return Refusal(Status.CANNOT_UNDERSTAND, f"dataset could not be parsed: {exc}"[:64],
                       f"unreadable dataset ({exc})")
    except (ValueError, LookupError) as exc:   # codec lookup of (0008,0005): NUL, unknown name
        return Refusal(BAD_CHARACTER_SET, "Specific Character Set (0008,0005) is invalid",
                       f"unusable Specific Character Set ({exc})")
    ds_sop = attrs.get(0x00080018)
    if ds_sop is not None and str(ds_sop) != sop_uid:
        return Refusal(Status.DATASET_MISMATCH, "SOP Instance UID in command and dataset differ",
                       f"Affected SOP Instance UID {sop_uid} differs from the dataset's {ds_sop!s}")
    meta: dict[str, Any] = {name: _text(attrs.get(tag)) for tag, name in INDEX_KEYWORDS.items()
                            if tag not in (0x00080016, 0x00080018)}
    if fixed is None:
        decision = rules.route(attrs, {"calling_ae": calling, "called_ae": called, "peer_ip": ip})
        meta.update(calling_ae=calling, called_ae=called, peer=ip, rules=list(decision.matched))
        destinations = decision.destinations
    else:
        meta.update(calling_ae=calling, called_ae=called, peer=ip, rules=[], migration=fixed.job)
        destinations = fixed.destinations
        if fixed.study_uid and meta["study_instance_uid"] != fixed.study_uid:
            log.warning("migration=%s sop_instance_uid=%s study_instance_uid=%s from %s: the retrieve "
                        "was for study %s; routed with the job anyway", fixed.job, sop_uid,
                        meta["study_instance_uid"], calling, fixed.study_uid,
                        extra=fields(calling_ae=calling, sop_uid=sop_uid,
                                     study_uid=meta["study_instance_uid"] or None))
    if originator is not None:
        meta.update(move_originator_ae=originator[0], move_originator_id=originator[1])
    # bytearray on purpose: LMDB and hashlib take any buffer, so the received bytes are
    # copied once (into the bytearray) on their way to the spool.
    return Incoming(data, transfer_syntax, sop_class, sop_uid,  # type: ignore[arg-type]
                    destinations, meta)


def refusal_for(exc: BaseException) -> Refusal:
    """The C-STORE status when routing or the commit failed: always 0xA700, so the modality
    retries (the object is fine; our spool or our rules are not)."""
    if isinstance(exc, SpoolFullError):
        return Refusal(Status.OUT_OF_RESOURCES, "spool full or disk below free-space floor",
                       f"refused: {exc}")
    if isinstance(exc, (SpoolError, OSError)):
        return Refusal(Status.OUT_OF_RESOURCES, "spool write failed", f"could not be spooled: {exc}")
    return Refusal(Status.OUT_OF_RESOURCES, "internal error",
                   f"could not be spooled (internal error): {exc!r}")


def association_counter(tally: EventTally) -> Callable[[str, int, int], None]:
    """The listener's ``on_association`` hook: counts into ``tally`` (no commit of its own)."""
    def count(outcome: str, source: int, reason: int) -> None:
        if outcome == "rejected":
            outcome += "/" + reject_reason(source, reason).replace(" ", "_")
        tally.add(CounterKind.ASSOC_IN, extra=outcome)
    return count


def refusal_counter(tally: EventTally) -> Callable[[int], None]:
    """The listener's ``on_refusal`` hook: C-STOREs answered with a failure, by status."""
    def count(status: int) -> None:
        tally.add(CounterKind.REFUSED, extra=str(int(status)))
    return count


class StoreService:
    """The listener's C-STORE handler (a :data:`fastroute.dicom.dimse.Handler`).

    ``moves``: the C-MOVEs in flight that moved objects are attributed by (default: the
    committer's spool's); ``fixed``: route every object there (see :meth:`for_retrieve`)."""

    def __init__(self, rules: RuleSet, committer: Committer, *,
                 max_object_bytes: int = MAX_OBJECT_BYTES, workers: int = 2,
                 moves: MoveTable | None = None, fixed: FixedRoute | None = None) -> None:
        self.rules = rules
        self.committer = committer
        self.max_object_bytes = max_object_bytes
        self.tags = tuple(sorted(set(rules.tags) | set(INDEX_KEYWORDS)))
        self.moves = moves if moves is not None else committer.spool.moves
        self.fixed = fixed
        # Few threads on purpose: each may hold up to max_object_bytes of an inflated dataset.
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastroute-check")

    @classmethod
    def for_retrieve(cls, committer: Committer, *, job: str, destinations: Sequence[str],
                     study_uid: str = "", max_object_bytes: int = MAX_OBJECT_BYTES,
                     workers: int = 2) -> StoreService:
        """The C-STORE handler of a C-GET's sub-operations (``QueryRetrieveClient(store=)``):
        checked and peeked as on a listener, routed to ``destinations`` for ``job``.

        On the runner's association the peer is the source archive: the routing record's
        ``calling_ae`` names the source (the Peer's called AE) and ``called_ae`` us."""
        return cls(RuleSet([]), committer, max_object_bytes=max_object_bytes, workers=workers,
                   fixed=FixedRoute(job, tuple(destinations), study_uid))

    def __call__(self, peer: Peer, msg: Message) -> Reply | Pending:
        assert msg.data is not None            # the assembler refuses a C-STORE without one
        sop_uid = msg.sop_instance_uid
        ts = peer.contexts[msg.context_id]
        if isinstance(msg.data, StagedFile):   # a large object, streamed into the spool
            return self._staged(peer, msg, ts, msg.data)
        if len(msg.data) > OFFLOAD_BYTES or ts.rstrip("\0 ") in DEFLATED:
            # Off the event loop: a deflate bomb or a 1 GiB walk must not delay a C-ECHO.
            done: Future[PutResult | Refusal] = Future()
            prepared = self.pool.submit(self._prepare, peer, msg, ts)
            prepared.add_done_callback(lambda f: self._commit_into(f, done))
            return Pending(done, lambda fut: self._committed(peer, sop_uid, fut, prepared))
        outcome = self._prepare(peer, msg, ts)
        if isinstance(outcome, Refusal):
            return self._refuse(peer, sop_uid, outcome)
        return Pending(self.committer.submit_nowait(outcome),
                       lambda fut: self._committed(peer, sop_uid, fut, outcome))

    def _prepare(self, peer: Peer, msg: Message, ts: str, data: Any = None) -> Incoming | Refusal:
        """Check, peek and route ``data`` (default: the message's dataset); never raises."""
        assert msg.data is not None
        try:
            calling, called = peer.calling_ae, peer.called_ae
            fixed = self.fixed
            originator = None
            if fixed is not None:        # a C-GET's: the peer that sends is the one we called
                calling, called = called, calling
            move_id = msg.command.get(MOVE_ORIGINATOR_MESSAGE_ID)   # the only cost when absent
            if isinstance(move_id, int):     # (a peer's malformed value is not our bug: ignored)
                originator = (str(msg.command.get(MOVE_ORIGINATOR_AE_TITLE) or "").strip(), move_id)
                if fixed is None:
                    fixed = self._moved(peer, msg, originator)
            return prepare_store(cast(bytearray, msg.data) if data is None else data, ts, msg.sop_class_uid,
                                 msg.sop_instance_uid, self.tags, self.rules, calling, called, peer.ip,
                                 self.max_object_bytes, fixed=fixed, originator=originator)
        except Exception as exc:          # a rule that raises is our bug: the modality retries
            log.exception("C-STORE from %s@%s to %s sop_instance_uid=%s: routing failed",
                          peer.calling_ae, peer.ip, peer.called_ae, msg.sop_instance_uid,
                          extra=fields(calling_ae=peer.calling_ae, called_ae=peer.called_ae, peer=peer.ip,
                                       sop_uid=msg.sop_instance_uid))
            return refusal_for(exc)

    def _moved(self, peer: Peer, msg: Message, originator: tuple[str, int]) -> FixedRoute | None:
        """The registered C-MOVE a moved object belongs to (one read transaction), or None:
        then the rules route it, as an object someone else's C-MOVE sent us."""
        move = self.moves.lookup(*originator)
        if move is None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("C-STORE from %s@%s sop_instance_uid=%s: Move Originator %s / Message ID %d "
                          "matches no migration's C-MOVE: routed by the rules", peer.calling_ae, peer.ip,
                          msg.sop_instance_uid, originator[0], originator[1],
                          extra=fields(calling_ae=peer.calling_ae, peer=peer.ip, sop_uid=msg.sop_instance_uid))
            return None
        return FixedRoute(move.job, move.destinations, move.study_uid)

    def _commit_into(self, prepared: Future[Incoming | Refusal],
                     done: Future[PutResult | Refusal]) -> None:
        """On a check thread: hand a checked object to the group commit, ``done`` follows it."""
        outcome = prepared.result()       # _prepare never raises
        if isinstance(outcome, Refusal):
            done.set_result(outcome)
            return

        def follow(commit: Future[PutResult]) -> None:
            exc = commit.exception()
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(commit.result())
        self.committer.submit_nowait(outcome).add_done_callback(follow)

    def _staged(self, peer: Peer, msg: Message, ts: str, staged: StagedFile) -> Pending:
        """A large object whose chunks are in the spool: once its last chunk is staged, the
        structure check, peek and routing run on a check thread over a read-only map of its
        staging file (file pages, not the listener's memory), then the commit links the
        chunks to it. A refused one's chunks are removed before the refusal is answered."""
        sop_uid = msg.sop_instance_uid
        done: Future[PutResult | Refusal] = Future()
        prepared: list[Incoming] = []     # the checked item, for the log line's Study UID

        def check() -> None:
            try:
                mapped = staged.map()
            except OSError as exc:
                error = exc                # (``exc`` is unbound after the except clause)
                self.committer.drop_staged(staged).add_done_callback(lambda _: done.set_exception(error))
                return
            try:
                outcome = self._prepare(peer, msg, ts, mapped)
            finally:
                if not isinstance(mapped, bytes):
                    mapped.close()
            if isinstance(outcome, Refusal):
                self.committer.drop_staged(staged).add_done_callback(lambda _: done.set_result(outcome))
                return
            prepared.append(outcome)

            def follow(commit: Future[PutResult]) -> None:
                exc = commit.exception()
                if exc is not None:
                    done.set_exception(exc)
                else:
                    done.set_result(commit.result())
            self.committer.commit_staged(staged, outcome).add_done_callback(follow)

        def sealed(fut: Future[None]) -> None:
            exc = fut.exception()
            if exc is not None:
                done.set_exception(exc)
                return
            try:
                self.pool.submit(check).add_done_callback(lambda f: _failed_into(f, done))
            except RuntimeError as exc:   # the pool is shut down: the listener is stopping
                self.committer.drop_staged(staged)
                done.set_exception(exc)
        self.committer.seal(staged).add_done_callback(sealed)
        return Pending(done, lambda fut: self._committed(peer, sop_uid, fut, prepared))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _committed(self, peer: Peer, sop_uid: str, fut: Future[Any], item: _Prepared) -> Reply:
        """The reply once the commit is done; ``item`` is where the checked object is (for
        the Study UID its log lines name), looked at only when a line is written."""
        exc = fut.exception()
        if exc is not None:
            return self._refuse(peer, sop_uid, refusal_for(exc), _study_uid(item))
        if isinstance(fut.result(), Refusal):
            return self._refuse(peer, sop_uid, fut.result())
        if log.isEnabledFor(logging.DEBUG):
            result = fut.result()
            study = _study_uid(item)
            routed = ",".join(result.queued) or "unrouted"
            where = (f"oid={result.oid}" if result.oid or result.loc is None
                     else f"journalled in shard {result.loc.shard} key {result.loc.key}")
            log.debug("C-STORE from %s@%s to %s sop_instance_uid=%s study_instance_uid=%s stored %s "
                      "-> %s%s (status 0x0000)", peer.calling_ae, peer.ip, peer.called_ae, sop_uid, study or "",
                      where, routed,
                      f" suppressed for {','.join(result.suppressed)}" if result.suppressed else "",
                      extra=fields(calling_ae=peer.calling_ae, called_ae=peer.called_ae, peer=peer.ip,
                                   sop_uid=sop_uid, study_uid=study, destination=routed,
                                   status=Status.SUCCESS, oid=result.oid or None))
        return _SUCCESS

    @staticmethod
    def _refuse(peer: Peer, sop_uid: str, refusal: Refusal, study_uid: str | None = None) -> Reply:
        """Answer a failure status, and say so: every C-STORE refusal is an ERROR line with it."""
        log.error("C-STORE from %s@%s to %s sop_instance_uid=%s%s: %s -> status %s", peer.calling_ae,
                  peer.ip, peer.called_ae, sop_uid, f" study_instance_uid={study_uid}" if study_uid else "",
                  refusal.why, describe(refusal.status),
                  extra=fields(calling_ae=peer.calling_ae, called_ae=peer.called_ae, peer=peer.ip,
                               sop_uid=sop_uid, study_uid=study_uid, status=int(refusal.status)))
        return Reply(refusal.status, refusal.comment)


_SUCCESS = Reply(Status.SUCCESS)

# Where a C-STORE's checked object is once its commit answers: the item itself (checked on the
# event loop), the check thread's future, or a list a staged object's check appends it to.
_Prepared = Incoming | Future[Incoming | Refusal] | list[Incoming]


def _study_uid(item: _Prepared) -> str | None:
    """The Study Instance UID the peek indexed the object by (None when it was not checked)."""
    if isinstance(item, Future):
        if not item.done() or item.exception() is not None:
            return None
        found = item.result()
        item = found if isinstance(found, Incoming) else []
    if isinstance(item, list):
        if not item:
            return None
        item = item[0]
    return str(item.meta.get("study_instance_uid") or "") or None


def _failed_into(check: Future[None], done: Future[Any]) -> None:
    """A check thread's job that raised (a bug, or a map that failed) still answers."""
    exc = check.exception()
    if exc is not None and not done.done():
        log.error("checking a staged object failed: %r", exc, exc_info=exc)
        done.set_exception(exc)
