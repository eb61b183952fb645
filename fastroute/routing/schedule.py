"""Per-destination scheduling: claim due work, keep associations, back off, decide outcomes.

A destination's sender process runs ``max_associations`` threads, each owning one association
it reuses across batches. Two kinds of failure are kept apart on purpose:

* destination-level (cannot connect, association rejected): the whole destination backs off
  with exponential delay and jitter; objects go back to pending *without* spending attempts,
  so a PACS that is down for hours does not push its queue into the failed state;
* object-level (transient status, outcome unknown): the object's attempt count grows and it
  is retried after its own backoff; past ``max_attempts`` or on a permanent status it moves
  to the failed state, where it is kept and can be retried by command.

An outcome unknown (the peer aborted or went silent after the data was sent) is the object's
own: a PACS that aborts on one object's content ("poison") would abort on it forever, so it
fails after ``max_unknown_outcomes`` such ends in a row, and only that object waits its
backoff while the destination's other objects keep flowing on a new association. Only when
*different* objects end that way on their first try with no response in between is the
destination itself suspect and backed off (a PACS that aborts everything).
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import replace
from typing import Any

from fastroute.config import Config, DestinationConfig, warn_deprecated_engine
from fastroute.content.changes import Applied
from fastroute.content.modify import ModifyError
from fastroute.content.plan import ContentPlan
from fastroute.errors import NoCodecError, SpoolError, TranscodeError
from fastroute.logsetup import fields
from fastroute.dicom.scu import AssociationFailed, Connection, NoContextAccepted, OutcomeUnknown
from fastroute.dicom.status import classify_store as classify_status
from fastroute.dicom.status import describe as status_text
from fastroute.spool import Claimed, Outcome, OutcomeKind, Spool, content_digest
from fastroute.spool.counters import CounterKind, EventTally, FailureCause
from fastroute.spool.senderstate import DestinationState, SenderState, read_send_now
from fastroute.spool.settlegroup import SettleGroup
from fastroute.spool.staging import ChunkedView, digest_parts
from fastroute.routing.commitment import KEEP_OPEN_POLL, Requester
from fastroute.routing.verify import Verifier
from fastroute.routing.syntax import SyntaxPlanner
from fastroute.routing.transcode import syntax_label
from fastroute.spool.wakeup import Waker

log = logging.getLogger("fastroute.schedule")

SAFETY_WAKE = 5.0   # re-check the queue this often even without a wake-up (lost datagrams)
PROGRESS_EVERY = 1.0   # the state file's delivery count and last success lag by at most this
# A sender that has caught up records a delivery together with the next claim, at most this
# much later: one commit per object instead of two. A crash in between resends what was held
# (at-least-once, as for any delivery not yet recorded); latency and audit times are the
# destination's confirmation times (Outcome.at), not the commit's.
SETTLE_DELAY = 0.05


AnyConnection = Connection


_engine_warned: set[str] = set()


def make_connection(dest: DestinationConfig, calling_ae: str) -> AnyConnection:
    """The destination's SCU association slot: fastroute's own engine, the only one (an old
    ``engine: pynetdicom`` is warned about once per destination and ignored)."""
    if dest.engine != "fast" and dest.name not in _engine_warned:
        _engine_warned.add(dest.name)
        warn_deprecated_engine(f"destinations.{dest.name}.engine", dest.engine)
    return Connection(dest, calling_ae)


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, capped."""
    base = min(maximum, initial * (2 ** max(0, attempt - 1)))
    return base / 2 + rng.uniform(0, base / 2)


def decide(item: Claimed, dest: DestinationConfig, status: int | None, error: str, *,
           unknown: bool, now: float, rng: random.Random) -> Outcome:
    """The outcome of one attempt at one object (pure: tests drive it with numbers)."""
    if status is not None and not unknown:
        kind = classify_status(status)
        if kind == "delivered":
            return Outcome(item.oid, OutcomeKind.DELIVERED, status=status)
        if kind == "permanent":
            return Outcome(item.oid, OutcomeKind.FAILED, status=status, error=error)
    attempt = item.attempts + 1
    if unknown and item.unknown + 1 >= dest.max_unknown_outcomes:
        return Outcome(item.oid, OutcomeKind.FAILED, status=status, unknown=True,
                       error=f"outcome unknown {item.unknown + 1} times in a row: {error}",
                       cause=FailureCause.NO_RESPONSE)
    if attempt >= dest.max_attempts:
        return Outcome(item.oid, OutcomeKind.FAILED, status=status, unknown=unknown,
                       error=f"gave up after {attempt} attempts: {error or status_text(status)}",
                       cause=FailureCause.NO_RESPONSE if status is None else "")
    # Both an unknown outcome (resent: at-least-once) and a transient status wait their backoff,
    # so a peer that aborts on one object cannot spin the sender.
    delay = backoff_delay(attempt, dest.backoff_initial, dest.backoff_max, rng)
    return Outcome(item.oid, OutcomeKind.RETRY, status=status, error=error, next_at=now + delay, unknown=unknown)


class DestinationSender:
    """All sending for one destination, inside its own process."""

    def __init__(self, cfg: Config, dest: DestinationConfig, spool: Spool,
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.dest = dest
        self.spool = spool
        # the associations' settle+claim commits, grouped when they finish together (issue 16)
        self.settler = SettleGroup(spool, dest.name)
        self.rng = rng or random.Random()
        self.stop_event = threading.Event()
        self.cv = threading.Condition()
        self.generation = 0
        self.down_until = 0.0
        self.state = DestinationState(dest.name, state=SenderState.PAUSED if dest.paused else SenderState.IDLE)
        self._state_lock = threading.Lock()
        self._progress_dirty = False
        self._progress_written = 0.0
        self.planner = SyntaxPlanner(dest)
        # issue 15: what this destination changes in an object; None keeps the zero-copy path
        self.content = ContentPlan.build(cfg, dest.name)
        self._spool_errors = 0        # spool writes failed in a row (a full disk)
        self._unknown_run = 0         # objects whose first try ended without a response, in a row
        self.tally: EventTally | None = None   # association counts for /metrics, set by run()
        # One failure streak per destination, shared by its association threads: a failure
        # whose attempt began before the last counted one is the same outage (see
        # _destination_failed). The attempt's start is per thread.
        self._last_failure_at = 0.0
        self._attempt = threading.local()
        # Storage commitment (issue 14): requested by association thread 0 after delivery.
        self.commit = Requester(spool, dest, lambda _dest: self.poke()) if dest.commitment != "off" else None
        if self.commit is None:
            spool.commitments.set_enabled(dest.name, False)
        self._commit_ticked = 0.0
        # verify: find (issue 14): a thread of its own checks settled studies by C-FIND.
        self.verifier = Verifier(cfg, dest, spool, on_resend=self.poke) if dest.verify == "find" else None
        spool.verifications.set_enabled(dest.name, self.verifier is not None)
        request = read_send_now(cfg.spool, dest.name)
        self._send_now_seen = request.at if request else 0.0   # older requests were for a former sender

    # -- wake-ups ----------------------------------------------------------------------------

    def poke(self) -> None:
        with self.cv:
            self.generation += 1
            self.cv.notify_all()

    def _waker_loop(self, waker: Waker) -> None:
        while not self.stop_event.is_set():
            woken = waker.wait(1.0)
            self._check_send_now()    # also without a datagram: one may have been dropped
            if woken:
                self.poke()

    def _check_send_now(self) -> None:
        """Act on a new send-now request (operator, resume, or a successful ``fastroute echo``)."""
        request = read_send_now(self.cfg.spool, self.dest.name)
        if request is None or request.at <= self._send_now_seen:
            return
        self._send_now_seen = request.at
        self.reset_backoff(request.describe())

    def reset_backoff(self, why: str) -> None:
        """End the destination's backoff now and wake every association thread. The failure
        streak starts again, so a destination still down backs off from the initial delay."""
        with self._state_lock:
            was = self.state.state
            failures = self.state.consecutive_failures
            self.down_until = 0.0
            self._last_failure_at = 0.0
        log.warning("destination=%s ae=%s: backoff reset (%s); was %s after %d failure(s) in a row, "
                    "sending now", self.dest.name, self.dest.ae_title, why, was, failures, extra=self._fields())
        self._publish(consecutive_failures=0, retry_at=None,
                      **({"state": SenderState.IDLE} if was == SenderState.BACKING_OFF else {}))
        self.poke()

    def _wait(self, gen: int, timeout: float) -> None:
        with self.cv:
            if self.generation == gen and not self.stop_event.is_set():
                self.cv.wait(max(0.0, timeout))

    def stop(self) -> None:
        self.stop_event.set()
        if self.verifier is not None:
            self.verifier.stop()
        self.poke()

    # -- state -------------------------------------------------------------------------------

    def _fields(self, item: Claimed | None = None, status: int | None = None) -> dict[str, Any]:
        """A sender line's log fields: the destination and its AE title (``called_ae``), and for
        an object its SOP/Study Instance UID, oid and ``calling_ae`` -- the AE title that sent
        it to fastroute, so one query finds an object's receive and delivery lines."""
        if item is None:
            return fields(destination=self.dest.name, called_ae=self.dest.ae_title, status=status)
        return fields(destination=self.dest.name, called_ae=self.dest.ae_title, status=status,
                      calling_ae=item.calling_ae or None, sop_uid=item.sop_instance_uid,
                      study_uid=item.study_instance_uid or None, oid=item.oid)

    def _where(self, item: Claimed) -> str:
        """An object line's subject, as text logs show it (built only for a line written)."""
        study = f" study_instance_uid={item.study_instance_uid}" if item.study_instance_uid else ""
        return (f"destination={self.dest.name} ae={self.dest.ae_title} sop_instance_uid={item.sop_instance_uid}"
                f"{study} oid={item.oid}")

    def _publish(self, **changes: object) -> None:
        with self._state_lock:
            for k, v in changes.items():
                setattr(self.state, k, v)
            self._write_state()

    def _write_state(self) -> None:
        """Callers hold ``_state_lock``."""
        self._progress_dirty = False
        self._progress_written = time.monotonic()
        try:
            self.state.write(self.cfg.spool)
        except OSError:
            pass

    def _progress(self, delivered: int) -> None:
        """Count deliveries; the state file gets them at most every PROGRESS_EVERY seconds.

        Rewriting it (write + rename) after every batch cost a fifth of a sender's time on CT
        objects; the counts the management plane sums come from the spool's counters, and
        this file only says how the destination is doing. An idle sender writes what is left
        once the interval has passed (``_flush_progress``).
        """
        with self._state_lock:
            self.state.sent += delivered
            self.state.last_success = time.time()
            if self.tally is not None:     # durable, for /metrics: survives a restart
                self.tally.set_max(CounterKind.LAST_SUCCESS, self.dest.name, int(self.state.last_success))
            self._progress_dirty = True
            if time.monotonic() - self._progress_written >= PROGRESS_EVERY:
                self._write_state()

    def _flush_progress(self) -> float | None:
        """Write a delivery count that is due; return the seconds until one is, or None."""
        with self._state_lock:
            if not self._progress_dirty:
                return None
            wait = self._progress_written + PROGRESS_EVERY - time.monotonic()
            if wait <= 0:
                self._write_state()
                return None
            return wait

    def _destination_failed(self, error: str, at_least: int = 0) -> None:
        """Count a destination-level failure once per destination: association threads that
        fail in the same outage (their attempts began before the last counted failure) join
        the backoff already running instead of doubling the streak and the log lines.
        ``at_least`` failures in a row are counted even when an association succeeded in
        between (a peer that accepts, then aborts every object)."""
        now = time.time()
        started = getattr(self._attempt, "started", now)
        with self._state_lock:    # down_until too, so a joining thread never sees the old one
            joined = started <= self._last_failure_at
            if not joined:
                self._last_failure_at = now
                self.state.consecutive_failures = max(self.state.consecutive_failures + 1, at_least)
                n = self.state.consecutive_failures
                down_since = self.state.down_since or now
                delay = backoff_delay(n, self.dest.backoff_initial, self.dest.backoff_max, self.rng)
                self.down_until = max(self.down_until, now + delay)
        if joined:
            log.debug("destination=%s ae=%s: %s (same outage, already backing off until %s)", self.dest.name,
                      self.dest.ae_title, error, time.strftime("%H:%M:%S", time.localtime(self.down_until)),
                      extra=self._fields())
            return
        log.warning("destination=%s ae=%s: %s; backing off %.1fs (failure %d in a row, down since %s)",
                    self.dest.name, self.dest.ae_title, error, delay, n,
                    time.strftime("%H:%M:%S", time.localtime(down_since)), extra=self._fields())
        self._publish(state=SenderState.BACKING_OFF, down_since=down_since, retry_at=self.down_until, last_error=error)

    def _destination_ok(self) -> None:
        if self.state.consecutive_failures or self.state.state != SenderState.UP:
            if self.state.down_since:
                log.info("destination=%s ae=%s is reachable again after %.0fs", self.dest.name,
                         self.dest.ae_title, time.time() - self.state.down_since, extra=self._fields())
            self.down_until = 0.0
            self._publish(state=SenderState.UP, down_since=None, retry_at=None, consecutive_failures=0)
            self.poke()   # the other association threads stop waiting out the backoff

    def _spool_failed(self, exc: SpoolError) -> None:
        """A spool write failed (a full disk: ENOSPC on commit). Nothing it held changed: the
        claimed objects stay in flight and their outcomes in memory, to be recorded by a later
        settle; crashing instead would resend what was delivered. Back off, then retry."""
        self._spool_errors += 1
        delay = backoff_delay(self._spool_errors, 0.5, 30.0, self.rng)
        log.error("destination=%s ae=%s: spool write failed (%s); retrying in %.1fs (failure %d in a row)",
                  self.dest.name, self.dest.ae_title, exc, delay, self._spool_errors, extra=self._fields())
        self.stop_event.wait(delay)

    # -- the work ----------------------------------------------------------------------------

    def run(self) -> None:
        """Run until ``stop()``: the waker thread plus one thread per association."""
        self.spool.reset_inflight(self.dest.name)
        self.tally = EventTally(self.spool)
        waker = Waker(self.cfg.spool, self.dest.name)
        self._publish()
        threads = [threading.Thread(target=self._waker_loop, args=(waker,), name="waker", daemon=True)]
        threads += [threading.Thread(target=self._worker, args=(i,), name=f"assoc-{i}", daemon=True)
                    for i in range(self.dest.max_associations)]
        if self.verifier is not None:
            threads.append(threading.Thread(target=self.verifier.run, name="verify", daemon=True))
        for t in threads:
            t.start()
        try:
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.stop()
            for t in threads:         # the waker too: its socket must outlive its last wait
                t.join()
            waker.close()
            self.tally.close()
            self._publish(state=SenderState.STOPPED)

    def _worker(self, index: int) -> None:
        conn = make_connection(self.dest, self.cfg.ae_title)
        commit = self.commit if index == 0 else None
        if self.commit is not None:
            self.commit.serve_on(conn)     # a report may come on any of its associations
        name, size = self.dest.name, self.dest.batch_size
        carried: list[Claimed] = []   # claimed by the last settle's own transaction
        held: list[Outcome] = []      # deliveries not recorded yet (see SETTLE_DELAY)
        try:
            while not self.stop_event.is_set():
                gen = self.generation
                now = time.time()
                self._attempt.started = now   # decided to go before a failure counted: same outage
                if not carried:
                    paused = self.dest.paused or self.spool.is_paused(name)
                    if held and (paused or now < self.down_until):
                        try:
                            self.settler.settle(held)
                        except SpoolError as exc:
                            self._spool_failed(exc)
                            continue
                        held = []
                    if paused:
                        if self.state.state != SenderState.PAUSED:
                            self._publish(state=SenderState.PAUSED)
                        self._wait(gen, SAFETY_WAKE)
                        continue
                    if self.state.state == SenderState.PAUSED:
                        self._publish(state=SenderState.IDLE)
                    if now < self.down_until:
                        self._wait(gen, self.down_until - now)
                        continue
                batch, carried = carried, []
                earliest: float | None = None
                if not batch:
                    try:
                        if held:
                            batch, earliest = self.settler.settle(held, claim=size)
                            held = []
                        else:
                            batch, earliest = self.spool.claim(name, size)
                    except SpoolError as exc:
                        self._spool_failed(exc)
                        continue
                    self._spool_errors = 0
                keep = False
                if commit is not None and (not batch or time.monotonic() - self._commit_ticked >= 1.0):
                    self._commit_ticked = time.monotonic()
                    commit.tick(conn)
                    keep = not batch and commit.keep_open()
                if not batch:
                    idle = time.monotonic() - conn.last_used
                    if keep and conn.assoc is not None:
                        conn.usable()      # serves a report waiting on the socket
                    if conn.assoc is not None and idle >= self.dest.idle_release and not keep:
                        conn.release()
                    timeout = self._flush_progress() or SAFETY_WAKE
                    if keep:
                        timeout = min(timeout, KEEP_OPEN_POLL)
                    elif conn.assoc is not None:
                        timeout = min(timeout, self.dest.idle_release - idle)
                    if earliest is not None:
                        timeout = min(timeout, earliest - time.time())
                    self._wait(gen, timeout)
                    continue
                outcomes = self._deliver(conn, batch)
                more = (0 if self.stop_event.is_set() or self.dest.paused
                        or time.time() < self.down_until else size)
                if more and len(batch) < size and self.generation == gen and \
                        all(o.kind == OutcomeKind.DELIVERED for o in outcomes):
                    # Caught up with the listeners: the next object is still on its way in.
                    # Record these deliveries with its claim, in one commit, when its wake-up
                    # comes (or after SETTLE_DELAY), instead of one commit each.
                    held = outcomes
                    self._wait(gen, SETTLE_DELAY)
                    continue
                # Claim the next batch in the same commit while the destination is taking
                # objects. An empty claim is not carried: the next round claims again after
                # reading ``generation``, so a wake-up in between is not lost.
                try:
                    carried, _ = self.settler.settle(outcomes, claim=more)
                except SpoolError as exc:
                    held = outcomes   # kept in flight; recorded by the next round's settle
                    self._spool_failed(exc)
            if held or carried:       # stopping: record what was delivered, hand back the rest
                try:
                    self.settler.settle(held + [Outcome(i.oid, OutcomeKind.RELEASE) for i in carried])
                except SpoolError as exc:
                    log.error("destination=%s: %s; %d object(s) stay in flight and are resent after "
                              "the restart (at-least-once)", name, exc, len(held) + len(carried),
                              extra=self._fields())
        except Exception:
            log.exception("destination=%s: sender thread %d crashed; the process will be restarted",
                          name, index, extra=self._fields())
            os._exit(70)
        finally:
            conn.release()

    def _deliver(self, conn: AnyConnection, batch: list[Claimed]) -> list[Outcome]:
        proposed = self.planner.proposals(batch)
        before = conn.assoc
        try:
            conn.ensure(proposed)
            if conn.assoc is not before:
                self._count_association("accepted")
            self.planner.learn(proposed, conn)
        except NoContextAccepted as exc:
            self._count_association("rejected/no_context_accepted")
            self.planner.forget()
            self._destination_ok()
            out = []
            for i in batch:
                why = exc.rejected.get(i.sop_class_uid, "not accepted")
                msg = (f"{exc}: SOP class {i.sop_class_uid} in transfer syntax {i.transfer_syntax} "
                       f"was refused ({why})")
                missing = self.planner.refusal_reason(i)
                if missing:
                    msg += f"; {missing}"
                log.error("%s: %s", self._where(i), msg, extra=self._fields(i))
                out.append(Outcome(i.oid, OutcomeKind.FAILED, error=msg, cause=FailureCause.NO_DECODER
                                   if missing else FailureCause.CONTEXT_REFUSED))
            return out
        except AssociationFailed as exc:
            self._count_association("rejected/" + ("rejected" if "rejected by" in str(exc) else "failed"))
            self.planner.forget()
            self._destination_failed(str(exc))
            return [Outcome(i.oid, OutcomeKind.RELEASE) for i in batch]
        except Exception as exc:   # e.g. DNS failure
            self._count_association("rejected/failed")
            self._destination_failed(f"cannot associate: {exc}")
            return [Outcome(i.oid, OutcomeKind.RELEASE) for i in batch]
        self._destination_ok()
        outcomes: list[Outcome] = []
        for pos, item in enumerate(batch):
            if self.stop_event.is_set() and pos:
                outcomes.extend(Outcome(i.oid, OutcomeKind.RELEASE) for i in batch[pos:])
                break
            outcome = self._send_one(conn, item)
            outcomes.append(outcome)
            if outcome.unknown or conn.assoc is None:
                # The association is gone; hand the rest back untouched.
                outcomes.extend(Outcome(i.oid, OutcomeKind.RELEASE) for i in batch[pos + 1:])
                break
        delivered = sum(1 for o in outcomes if o.kind == OutcomeKind.DELIVERED)
        if delivered:
            self._progress(delivered)
        return outcomes

    def _count_association(self, outcome: str) -> None:
        if self.tally is not None:
            self.tally.add(CounterKind.ASSOC_OUT, self.dest.name, outcome)

    def _send_one(self, conn: AnyConnection, item: Claimed) -> Outcome:
        try:
            with self.spool.view(item.oid, item.loc) as data:
                return self._send_view(conn, item, data)
        except SpoolError as exc:
            return Outcome(item.oid, OutcomeKind.FAILED, error=str(exc), cause=FailureCause.SPOOL_ERROR)

    def _prepare_chunked(self, conn: AnyConnection, item: Claimed,
                         stored: ChunkedView) -> tuple[int, bytes | memoryview | list[memoryview], str]:
        """The planner's choice for a chunked object, made on its first chunk (the attributes
        it reads are near the start): sent as it is, its chunks go out as they lie in the
        spool; to be transcoded, it is assembled in memory (the one case that holds a large
        object whole) and planned again on the whole."""
        try:
            cx, _, sent_ts = self.planner.prepare(conn, item, stored.parts[0])
            if sent_ts == item.transfer_syntax:
                return cx, stored.parts, sent_ts
        except TranscodeError:
            pass                       # a conversion tried on the first chunk alone: redo on the whole
        return self.planner.prepare(conn, item, stored.join())

    def _apply_content(self, item: Claimed, stored: memoryview | ChunkedView
                       ) -> tuple[Outcome | None, Applied | None]:
        """The destination's content plan on one object: (an outcome that ends it here, or the
        changed object; (None, None): send the original). Reads the routing record only when a
        step depends on the routing rules or on the association's called AE / peer address."""
        plan = self.content
        assert plan is not None
        rules: list[str] = []
        context = {"calling_ae": item.calling_ae, "called_ae": "", "peer_ip": ""}
        if plan.needs_rules or plan.needs_context:
            rec = self.spool.record(item.oid)
            if rec is not None:
                rules = rec.rules
                context.update(called_ae=rec.called_ae, peer_ip=rec.peer)
        if not plan.applies(rules):
            return None, None
        try:
            applied = plan.apply(stored.join() if isinstance(stored, ChunkedView) else stored,
                                 item.transfer_syntax, rules, context)
        except (ModifyError, TranscodeError) as exc:
            # Deterministic for this object and destination: kept as failed, never sent unchanged.
            log.error("%s: content change failed, not sent: %s", self._where(item), exc, extra=self._fields(item))
            return Outcome(item.oid, OutcomeKind.FAILED, error=str(exc), cause=FailureCause.CONTENT_CHANGE
                           if isinstance(exc, ModifyError) else FailureCause.NOT_CONVERTIBLE), None
        if applied is None:
            return None, None
        if applied.quarantine:
            log.warning("%s: quarantined by %s, not sent: %s", self._where(item), ", ".join(applied.by),
                        applied.quarantine, extra=self._fields(item))
            return Outcome(item.oid, OutcomeKind.QUARANTINE, error=applied.quarantine), None
        log.info("%s: changed by %s: %d attribute(s)%s", self._where(item), ", ".join(applied.by),
                 len({c.path for c in applied.changes}),
                 f"; sent as SOP Instance UID {applied.sop_instance_uid}"
                 if applied.sop_instance_uid != item.sop_instance_uid else "", extra=self._fields(item))
        return None, applied

    def _send_view(self, conn: AnyConnection, item: Claimed, stored: memoryview | ChunkedView) -> Outcome:
        """Send one object from its spool buffer (no copy unless it must be transcoded); a
        chunked (large) object as its list of LMDB page views."""
        now = time.time()
        data: bytes | memoryview | list[memoryview]
        original = stored
        applied: Applied | None = None
        if self.content is not None:
            early, applied = self._apply_content(item, stored)
            if early is not None:
                return early
            if applied is not None:
                stored = memoryview(applied.data)
        try:
            if isinstance(stored, ChunkedView):
                cx, data, sent_ts = self._prepare_chunked(conn, item, stored)
            else:
                cx, data, sent_ts = self.planner.prepare(conn, item, stored)
        except TranscodeError as exc:
            # Deterministic for this object and destination: kept as failed, never dropped.
            log.error("%s: cannot be sent in a syntax the destination accepts: %s", self._where(item), exc,
                      extra=self._fields(item))
            return Outcome(item.oid, OutcomeKind.FAILED, error=str(exc), cause=FailureCause.NO_DECODER
                           if isinstance(exc, NoCodecError) else FailureCause.NOT_CONVERTIBLE)
        transcoded = sent_ts != item.transfer_syntax
        if transcoded and log.isEnabledFor(logging.DEBUG):
            log.debug("%s: transcoded %s -> %s", self._where(item), syntax_label(item.transfer_syntax),
                      syntax_label(sent_ts), extra=self._fields(item))
        try:
            result = conn.send_raw(cx, item.sop_class_uid,
                                   applied.sop_instance_uid if applied else item.sop_instance_uid, data)
        except OutcomeUnknown as exc:
            self._count_association("aborted")
            conn.abort()
            with self._state_lock:
                if not item.unknown:    # a first such end; resends of a suspect object do not count
                    self._unknown_run += 1
                run = self._unknown_run
            outcome = decide(item, self.dest, None, str(exc), unknown=True, now=now, rng=self.rng)
            if outcome.kind == OutcomeKind.FAILED:
                log.error("%s: failed: %s", self._where(item), outcome.error, extra=self._fields(item))
            else:
                log.warning("%s: outcome unknown (%s), %d of %d in a row allowed; resent at %s "
                            "(at-least-once)", self._where(item), exc, item.unknown + 1,
                            self.dest.max_unknown_outcomes, time.strftime("%H:%M:%S", time.localtime(outcome.next_at)),
                            extra=self._fields(item))
            if not item.unknown and run >= self.dest.max_unknown_outcomes:
                # Several objects in a row, each on its first try, no response in between: the
                # destination, not one object's content, is suspect; back it off rather than
                # fail its whole queue. (Resends of poison objects falling due together must
                # not trigger this: that would block the queue behind them again.)
                self._destination_failed(f"{run} objects in a row ended without a response on their "
                                         f"first try; last: {exc}",
                                         at_least=run - self.dest.max_unknown_outcomes + 1)
            return outcome
        except AssociationFailed as exc:
            conn.abort()
            return Outcome(item.oid, OutcomeKind.RELEASE, error=str(exc))
        if self._unknown_run:
            with self._state_lock:
                self._unknown_run = 0
        outcome = decide(item, self.dest, result.status, result.comment, unknown=False, now=now, rng=self.rng)
        if transcoded:
            outcome = replace(outcome, transcoded=sent_ts)
        if outcome.kind == OutcomeKind.DELIVERED:
            # The duplicate policy's key is taken here from the spool's pages (the original
            # bytes, whatever was sent), outside the write lock, rather than on the modality's
            # critical path; once per object, whatever its fan-out. A migration's object always:
            # a later copy of its SOP Instance UID is compared with it (content conflicts).
            digest = ((item.digest or (digest_parts(original.parts) if isinstance(original, ChunkedView)
                                       else content_digest(original)))
                      if self.spool.duplicate_window > 0 or item.bulk else b"")
            outcome = replace(outcome, at=time.time(), digest=digest)
            if applied is not None:
                outcome = replace(outcome, changed_by=tuple(applied.by),
                                  changed_tags=tuple(dict.fromkeys(c.path for c in applied.changes)),
                                  sent_sop_instance_uid=(applied.sop_instance_uid
                                                         if applied.sop_instance_uid != item.sop_instance_uid
                                                         else ""))
            if result.status != 0:
                log.warning("%s: delivered with warning %s %s", self._where(item), status_text(result.status),
                            result.comment, extra=self._fields(item, result.status))
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("%s: delivered (status 0x0000)", self._where(item), extra=self._fields(item, 0))
        elif outcome.kind == OutcomeKind.FAILED:
            log.error("%s: failed permanently: %s %s", self._where(item), status_text(result.status),
                      outcome.error or result.comment, extra=self._fields(item, result.status))
        else:
            log.warning("%s: transient failure %s %s; retry %d at %s", self._where(item), status_text(result.status),
                        result.comment, item.attempts + 1, time.strftime("%H:%M:%S", time.localtime(outcome.next_at)),
                        extra=self._fields(item, result.status))
        if outcome.kind != OutcomeKind.DELIVERED and not outcome.error:
            outcome = replace(outcome, error=f"{status_text(result.status)} {result.comment}".strip())
        return outcome
