"""The receive journal: a listener's objects are durable in its own shard before they are queued.

With byte shards alone (:mod:`shards`) a listener still committed each group's records into
the shared environment before answering its C-STOREs, and LMDB lets one writer in at a time:
the records' commit and its fsync still serialised the listeners (issue 16 measured sharded
CT commits at x1.5 for 4 writers where separate environments gave x2.1, and tiny objects did
not scale at all). So a listener's group commit is one synced transaction into its own shard
holding the bytes *and* a journal entry per object (what the records will say), and the
C-STOREs are answered then: "accepted" means durably spooled, in the shard, and no listener
waits for another's commit.

The journal is applied to the shared records (queue entries, routing record, SOP supersede,
indexes, counters, receipts) off the acknowledgement path, by the listener's :class:`Applier`
thread: everything journalled since its last pass in one transaction, which also advances the
shard's applied mark (``shard`` db, as before: the highest key linked to a record). Under
load a pass takes many groups at once, so the shared environment sees fewer, larger commits.
Senders, views, metrics and lookups see an object once it is applied: milliseconds after its
acknowledgement, in arrival order across listeners within that window.

Recovery: entries above the applied mark were acknowledged and are applied by the shard's
next owner (a restarted listener, or the supervisor's pass over shards no listener owns)
before anything else; the mark and the records move in one transaction, so an entry is
applied exactly once. Entries are deleted with their object's bytes.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

from fastroute.errors import SpoolError
from fastroute.logsetup import fields
from fastroute.spool.queues import Incoming, PutResult
from fastroute.spool.shards import Location

log = logging.getLogger("fastroute.journal")

APPLY_BATCH = 4096            # entries one pass applies at most (one shared transaction)
RETRY_FIRST, RETRY_MAX = 0.1, 30.0   # seconds between tries of a pass that failed


@dataclass(frozen=True, slots=True)
class Journaled:
    """An object durable in a shard and not yet applied: what its records will be made from."""

    loc: Location
    item: Incoming
    at: float                     # when it was received (its routing record's received_at)


def encode_entry(item: Incoming, at: float) -> bytes:
    """The journal entry of ``item``: everything but its bytes, which lie under the same key."""
    return json.dumps({"t": at, "ts": item.transfer_syntax, "sc": item.sop_class_uid,
                       "si": item.sop_instance_uid, "d": list(item.destinations), "m": item.meta},
                      separators=(",", ":")).encode()


def decode_entry(raw: bytes, data: Any, loc: Location) -> Journaled:
    e = json.loads(raw)
    return Journaled(loc, Incoming(data, e["ts"], e["sc"], e["si"], tuple(e["d"]), e["m"]), float(e["t"]))


def entry_sop_instance_uid(raw: bytes) -> str:
    return str(json.loads(raw)["si"])


def entry_received_at(raw: bytes) -> float:
    return float(json.loads(raw)["t"])


class AppliedSpool(Protocol):
    """What the applier needs of :class:`~fastroute.spool.store.Spool` (which imports this module)."""

    def apply(self, done: Sequence[Journaled], now: float | None = None) -> list[PutResult]: ...
    def receipts_pending_for(self) -> float | None: ...
    def flush_receipts(self) -> int: ...
    def collect_garbage(self, now: float | None = None, *, force: bool = False) -> int: ...


class Applier:
    """A listener's thread that applies its shard's journal to the shared records.

    Also the owner's housekeeping of the shared environment: the receipts' audit events
    (:meth:`Spool.flush_receipts`) and deleting finished objects' bytes from the shard
    (:meth:`Spool.collect_garbage`), so the committing thread touches nothing but its shard.
    A pass that fails (the shared environment full, a disk error) is retried with backoff; its
    objects stay durable in the shard meanwhile and are said to be waiting in the log.
    """

    def __init__(self, spool: AppliedSpool, notify: Callable[[str], None] | None, *,
                 gc_every: float = 1.0) -> None:
        self.spool = spool
        self.notify = notify
        self.gc_every = gc_every
        self._q: queue.SimpleQueue[Sequence[Journaled] | None] = queue.SimpleQueue()
        self._waiting: list[Journaled] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queued = 0              # entries handed over and not yet applied
        self.applied = 0
        self.passes = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="fastroute-applier", daemon=True)
        self._thread.start()

    def add(self, done: Sequence[Journaled]) -> None:
        if done:
            with self._lock:
                self._queued += len(done)
            self._q.put(done)

    def backlog(self) -> int:
        """Entries handed over and not yet applied."""
        with self._lock:
            return self._queued

    def wait_applied(self, timeout: float | None = None) -> bool:
        """Block until everything handed over so far is applied (tests, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._queued:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Apply what is waiting (up to ``timeout``; the rest is applied at the next start)."""
        self._q.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("spool shard: %d acknowledged object(s) not yet applied to the shared records at "
                      "stop; they are durable in the shard and applied when it is next owned", self.backlog())

    def _run(self) -> None:
        delay = 0.0
        stopping = False
        while True:
            wait = self.spool.receipts_pending_for()
            wait = self.gc_every if wait is None else min(wait, self.gc_every)
            try:
                if not self._waiting and not stopping:
                    got = self._q.get(timeout=wait)
                    if got is None:
                        stopping = True
                    else:
                        self._waiting.extend(got)
                while True:                      # everything handed over meanwhile
                    got = self._q.get_nowait()
                    if got is None:
                        stopping = True
                    else:
                        self._waiting.extend(got)
            except queue.Empty:
                pass
            if self._waiting:
                ok = self._pass()
                if not ok:
                    if stopping and delay >= RETRY_MAX:
                        return                   # close() says what is left
                    delay = min(RETRY_MAX, max(RETRY_FIRST, delay * 2))
                    time.sleep(delay)
                    continue
                delay = 0.0
                if self._waiting:
                    continue
            elif stopping:
                break
            self._housekeeping()
        self._housekeeping(force=True)

    def _pass(self) -> bool:
        batch = self._waiting[:APPLY_BATCH]
        try:
            results = self.spool.apply(batch)
        except SpoolError as exc:  # the shared environment (full, disk): all wait, retried
            self.failures += 1
            log.error("spool shard %d: applying %d acknowledged object(s) to the shared records failed "
                      "(they are durable in the shard, retried): %s", batch[0].loc.shard, len(batch), exc)
            return False
        except Exception as exc:   # an object our code cannot queue (a bug): it must not hold up the rest
            self.failures += 1
            batch = batch[:1]
            try:
                results = self.spool.apply(batch)      # the head alone: the culprit may be further on
            except SpoolError:
                return False
            except Exception:
                kept = self._quarantine(batch[0], exc)
                if kept is None:
                    return False
                results = kept
        del self._waiting[:len(batch)]
        self.passes += 1
        self.applied += len(batch)
        with self._idle:
            self._queued -= len(batch)
            if not self._queued:
                self._idle.notify_all()
        if self.notify is not None:
            for dest in {d for r in results for d in r.queued}:
                self.notify(dest)
        if log.isEnabledFor(logging.DEBUG):     # the receive line had no oid yet: this one links them
            for d, r in zip(batch, results):
                study = str(d.item.meta.get("study_instance_uid") or "")
                log.debug("sop_instance_uid=%s study_instance_uid=%s journalled in shard %d key %d: queued "
                          "as oid=%d -> %s", d.item.sop_instance_uid, study, d.loc.shard, d.loc.key, r.oid,
                          ",".join(r.queued) or "unrouted",
                          extra=fields(calling_ae=str(d.item.meta.get("calling_ae") or "") or None,
                                       sop_uid=d.item.sop_instance_uid, study_uid=study or None,
                                       destination=",".join(r.queued) or None, oid=r.oid))
        return True

    def _quarantine(self, d: Journaled, exc: BaseException) -> list[PutResult] | None:
        """Queue an object whose records could not be made as routed to nowhere (``~unrouted``,
        where `fastroute queue` lists it and `retry`/`purge` act on it), with the error in its
        record: kept and visible, not lost, and the journal behind it moves on."""
        log.critical("sop_instance_uid=%s journalled in shard %d key %d: could not be queued (%r); kept as "
                     "unrouted with the error in its record, the objects after it go on", d.item.sop_instance_uid,
                     d.loc.shard, d.loc.key, exc, exc_info=exc,
                     extra=fields(sop_uid=d.item.sop_instance_uid,
                                  calling_ae=str(d.item.meta.get("calling_ae") or "") or None))
        item = d.item
        meta = {k: item.meta[k] for k in ("calling_ae", "called_ae", "peer", "study_instance_uid", "patient_id",
                                          "accession_number") if isinstance(item.meta.get(k), str)}
        meta["apply_error"] = f"{type(exc).__name__}: {exc}"[:500]
        safe = Incoming(item.data, item.transfer_syntax, item.sop_class_uid, item.sop_instance_uid, (), meta)
        try:
            return self.spool.apply([Journaled(d.loc, safe, d.at)])
        except Exception:
            log.exception("sop_instance_uid=%s: could not be kept as unrouted either; retried",
                          d.item.sop_instance_uid, extra=fields(sop_uid=d.item.sop_instance_uid))
            return None

    def _housekeeping(self, force: bool = False) -> None:
        try:
            due = self.spool.receipts_pending_for()
            if due is not None and (force or due <= 0):
                self.spool.flush_receipts()
        except Exception:        # the audit must never take the applier down
            log.exception("writing the receipts' audit events failed; they are written with the next pass")
        try:
            while self.spool.collect_garbage(force=force) and force:
                pass
        except Exception:        # bytes stay listed in gc: collected next time
            log.exception("deleting delivered objects' bytes from this listener's spool shard failed")


def journaled_results(done: Iterable[Journaled | BaseException]) -> list[PutResult | BaseException]:
    """What the C-STOREs of journalled objects are answered from: no oid yet (0), the
    destinations the rules chose (suppression and supersede are decided when applied)."""
    return [d if isinstance(d, BaseException) else PutResult(0, d.item.destinations, (), (), d.loc)
            for d in done]


__all__ = ["Applier", "Journaled", "decode_entry", "encode_entry", "entry_received_at", "entry_sop_instance_uid",
           "journaled_results"]
