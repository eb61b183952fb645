"""The Spool facade: opens the LMDB environment and composes the parts that use it.

Layout (named sub-databases in one LMDB environment):

``obj``   oid -> encoded dataset bytes exactly as received (no file meta). One entry per
          object, however many destinations it goes to.
``meta``  oid -> routing record (:mod:`records`): identifiers, source, routing decision,
          outstanding and finished destinations. Kept after delivery (without the bytes)
          for lookups until pruned.
``q``     queue entries (:mod:`queues`).
``sop``   SOP Instance UID -> oid of the newest copy (supersede / duplicate policy).
``dlv``   ``dest 0x00 sop uid`` -> content digest + time of the last delivery (duplicate
          policy; not kept when ``duplicate_window`` is 0).
``idx``   (dupsort) ``s|a|p`` + Study UID / Accession / Patient ID -> oid, for lookups.
``info``  counters (:mod:`counters`), the oid sequence, operator pauses, the audit head.
``audit`` the hash-chained audit trail (:mod:`audit`).
``objc``  oid -> manifest of an object stored in chunks (one larger than
          ``stream_threshold``, :mod:`staging`); such an object has no ``obj`` entry.
``chunk`` staging id + chunk index -> at most ``staging.CHUNK`` bytes of a chunked object.
``stage`` staging id -> owning process, while its chunks belong to no object yet.
``gc``    shard + shard key -> b"": bytes in a listener's shard whose object is finished, for
          the shard's owner to delete (:mod:`shards`).
``shard`` shard -> the highest shard key linked to a record (a crash's orphans lie above it).
``scmt``  storage commitment: holds, per-object states, transactions (:mod:`commitments`);
          verification by C-FIND beside it, sharing the holds (:mod:`verifications`).
``mjob`` ``mstudy`` ``mstuid`` ``minst`` ``mwork``: migration jobs and their inventories
          (:mod:`jobs`). ``mmove``: the C-MOVEs in flight, by Move Originator (:mod:`moves`).

With ``spool_shards: per-listener`` (the default) each listener writes the bytes (``obj``,
and ``objc``/``chunk``/``stage`` of large objects) into a shard of its own instead, with a
journal entry per object, and acknowledges then; the journal is applied to the records here
off the acknowledgement path (:mod:`journal`), and the routing record says where the bytes
are (:mod:`shards`); every other db stays here.
"""
from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence, cast

import lmdb

from fastroute.errors import SpoolError, SpoolFullError
from fastroute.spool.lockstats import SHARED, timed_open
from fastroute.spool.space import SpaceGuard, SpoolBudget, preallocate, reusable_bytes
from fastroute.spool.audit import AuditChain, AuditReport, read_key, whoami
from fastroute.spool.moves import MoveTable
from fastroute.spool.proposals import Proposals
from fastroute.spool.commitments import Commitments, ModalityRequests
from fastroute.spool.verifications import Verifications
from fastroute.spool.jobs import Jobs
from fastroute.spool.counters import LATENCY_BUCKETS, CounterKey, CounterKind, Counters, add_counters
from fastroute.spool.queues import (
    UNROUTED,
    Claimed,
    Incoming,
    Outcome,
    PutResult,
    QueueEntry,
    Queues,
    QueueStats,
    oid_key,
    paused_key,
)
from fastroute.spool.records import QueueState, RoutingRecord, decode_record
from fastroute.spool.journal import (APPLY_BATCH, Journaled, decode_entry, encode_entry,
                                     entry_received_at, entry_sop_instance_uid)
from fastroute.spool.shards import Location, Shard, ShardSet, collect, hw_key, location_of, split_gc_key
from fastroute.spool.staging import ChunkedView, StagedData, chunk_key, owner_alive, stored_view

if TYPE_CHECKING:
    from fastroute.config import Config

log = logging.getLogger("fastroute.spool")
_U64 = struct.Struct(">Q")
RECEIPT_EVERY = 1.0      # seconds between receipt audit events of one process (per sender and study)
_DB_NAMES = ("obj", "meta", "q", "sop", "dlv", "idx", "info", "audit", "objc", "chunk", "stage",
             # migration jobs (:mod:`jobs`) and the moves in flight (:mod:`moves`), issue 13
             "mjob", "mstudy", "mstuid", "minst", "mwork", "mmove",
             # storage commitment as SCU (:mod:`commitments`), issue 14
             "scmt",
             # configuration proposals awaiting a second admin (:mod:`proposals`), issue 15
             "cprop",
             # byte shards (issue 16, :mod:`shards`)
             "gc", "shard")
GC_EVERY = 1.0           # seconds between two collections of a shard owner's finished bytes


def _state(state: QueueState | bytes | str) -> QueueState:
    """A state given as the enum, its name, or (as before the split) its one-letter code."""
    if isinstance(state, bytes):
        return QueueState.from_code(state)
    return QueueState(state)


class Spool:
    """An LMDB spool opened by one process (open it after fork/spawn, never before)."""

    LATENCY_BUCKETS = LATENCY_BUCKETS

    def __init__(self, path: str | Path, *, map_size: int = 64 * 1024**3,
                 min_free_bytes: int = 0, duplicate_window: float = 0.0,
                 readonly: bool = False, durable: bool = True, audit_key: bytes | None = None,
                 shard: int | None = None) -> None:
        """``durable=False`` (the senders) makes this process's commits skip the second fsync
        (LMDB's MDB_NOMETASYNC): still atomic and consistent, but an OS crash may undo the
        last of them. A sender's commits can afford that: a lost claim is undone by
        ``reset_inflight`` on start anyway, a lost delivery record means one resend
        (at-least-once). The next fully synced commit (a listener's) makes them durable.
        Every commit that answers a modality stays fully synced.

        ``audit_key`` keys the audit chain (HMAC-SHA256, see :mod:`audit`).

        ``shard``: this process writes object bytes into a shard of its own, that number when
        free (a listener, see :meth:`own_shard`); None: into the shared environment."""
        self.path = Path(path)
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not (self.path / "data.mdb").exists():
            raise SpoolError(f"no spool at {self.path}", hint="check the 'spool:' path of the configuration")
        try:
            self.env = timed_open(str(self.path), SHARED, map_size=map_size, max_dbs=32, max_readers=1024,
                                  subdir=True, readonly=False, lock=True, sync=True,
                                  metasync=durable, readahead=False, meminit=False)
        except lmdb.Error as exc:
            raise SpoolError(f"cannot open spool at {self.path}: {exc}") from exc
        self._dbs = {name: self.env.open_db(name.encode(), dupsort=name == "idx") for name in _DB_NAMES}
        self._obj, self._meta, self._info = self._dbs["obj"], self._dbs["meta"], self._dbs["info"]
        self.shards = ShardSet(self.path, map_size)
        self._gc_due = 0.0
        self.space = SpaceGuard(self.path, min_free_bytes, self.reusable_bytes)
        self.budget = SpoolBudget(map_size, self._envs, str(self.path))
        self.audit = AuditChain(self.env, self._dbs["audit"], self._info, audit_key)
        self.queues = Queues(self.env, self._dbs, self.audit, duplicate_window, self.shards)
        self._receipts: dict[tuple[str, str, str, str], list[int]] = {}   # not yet audited
        self._receipts_due = 0.0
        self.moves = MoveTable(self.env, self._dbs["mmove"])
        self.proposals = Proposals(self.env, self._dbs["cprop"])
        self.jobs = Jobs(self.env, self._dbs)
        self.commitments = Commitments(self.env, self._dbs["scmt"], self._info, self._meta, self.audit,
                                       self.queues)
        self.queues.commitments = self.commitments
        self.verifications = Verifications(self.env, self._dbs["scmt"], self._info, self.audit, self.commitments)
        self.queues.verifications = self.verifications
        self.modality_requests = ModalityRequests(self.env, self._dbs["scmt"], self._dbs["sop"], self._meta,
                                                  self.commitments)
        self.modality_requests.unapplied = self.unapplied_sop_instance_uids
        if audit_key is not None and not readonly:
            self.audit.ensure_keyed()
        if shard is not None:
            self.own_shard(shard)

    @classmethod
    def from_config(cls, cfg: Config, *, durable: bool = True) -> Spool:
        """The spool a configuration names, with its limits (any process may open it)."""
        return cls(cfg.spool, map_size=cfg.spool_max_bytes, min_free_bytes=cfg.min_free_bytes,
                   duplicate_window=cfg.duplicate_window, durable=durable,
                   audit_key=read_key(cfg.audit_key) if cfg.audit_key else None)

    @property
    def min_free_bytes(self) -> int:
        return self.space.min_free_bytes

    @property
    def duplicate_window(self) -> float:
        return self.queues.duplicate_window

    def close(self) -> None:
        try:
            self.flush_receipts()
        except (lmdb.Error, SpoolError):
            pass                      # a read-only or full spool: the objects' records remain
        self.shards.close()
        self.env.close()

    # -- byte shards (see :mod:`shards`) -------------------------------------------------------

    def own_shard(self, prefer: int = 0) -> Shard:
        """Make this process a shard owner (a listener): from now on ``put_many`` and the
        staging of large objects write bytes there. Takes shard ``prefer`` when no other
        process owns it (else the lowest free one), deletes what a crash left in it, and
        collects its finished bytes."""
        shard = self.shards.take(prefer)
        try:
            self._recover(shard)
        except BaseException:
            self.shards.owner = None
            shard.release()
            raise
        return shard

    def _recover(self, shard: Shard) -> None:
        with self.env.begin() as txn:
            raw = txn.get(hw_key(shard.index), db=self._dbs["shard"])
        linked = _U64.unpack(raw)[0] if raw is not None else 0
        orphans, staged = shard.recover(linked)
        replayed = self._replay(shard, linked)
        if replayed:
            log.warning("spool shard %d: queued %d acknowledged object(s) that its last owner had journalled "
                        "but not yet applied (it stopped first)", shard.index, replayed)
        if orphans:
            log.warning("spool shard %d: removed %d object(s) whose bytes were written but whose records "
                        "were not (a stop between a group's two commits; never acknowledged)",
                        shard.index, orphans)
        if staged:   # the same words as without shards (Committer)
            log.warning("spool shard %d: removed the staged chunks of %d large object(s) whose listener "
                        "stopped before they were committed (never acknowledged)", shard.index, staged)
        while collect(shard, self.env, self._dbs["gc"]):
            pass

    def _replay(self, shard: Shard, linked: int) -> int:
        """Apply the journal entries above ``linked`` (see :mod:`journal`); how many."""
        n = 0
        while True:
            entries = shard.journal_after(linked, APPLY_BATCH)
            if not entries:
                return n
            done = []
            for key, raw in entries:
                data = shard.data_at(key)
                if data is None:      # cannot happen: the journal entry goes with its bytes
                    log.error("spool shard %d: journal entry %d has no bytes; skipped", shard.index, key)
                    continue
                done.append(decode_entry(raw, data, Location(shard.index, key)))
            if done:
                self.apply(done)
            if not done or done[-1].loc.key < entries[-1][0]:
                # mark the skipped ones applied too, or they would be looked at forever
                with self.env.begin(write=True) as txn:
                    txn.put(hw_key(shard.index), _U64.pack(entries[-1][0]), db=self._dbs["shard"])
            n += len(done)
            linked = entries[-1][0]

    def _unapplied(self) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
        """Per shard on disk: its journal entries above its applied mark."""
        with self.env.begin(db=self._dbs["shard"]) as txn:
            marks = {index: txn.get(hw_key(index)) for index in self.shards.indexes()}
        for index, raw in marks.items():
            linked = _U64.unpack(raw)[0] if raw is not None else 0
            try:
                yield index, self.shards.get(index).journal_after(linked)
            except SpoolError:
                continue

    def unapplied_sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs journalled in a shard (acknowledged) and not yet applied: a
        storage commitment request must not call them unknown."""
        return {entry_sop_instance_uid(e) for _, entries in self._unapplied() for _, e in entries}

    def journal_backlog(self, now: float | None = None) -> dict[int, tuple[int, float]]:
        """Per shard: acknowledged objects not yet queued, and the age in seconds of the oldest
        (0 when none). Normally zero: milliseconds' worth; growing means its listener's applier
        cannot write the shared records (it logs why), or its listener is gone (the supervisor's
        pass applies them within a minute)."""
        now = time.time() if now is None else now
        out = {}
        for index, entries in self._unapplied():
            oldest = min((entry_received_at(e) for _, e in entries), default=now)
            out[index] = (len(entries), max(0.0, now - oldest))
        return out

    def collect_garbage(self, now: float | None = None, *, force: bool = False) -> int:
        """The shard owner's deferred deletes (at most every GC_EVERY seconds unless ``force``):
        the bytes of finished objects that senders listed in ``gc``."""
        shard = self.shards.owner
        now = time.monotonic() if now is None else now
        if shard is None or (not force and now < self._gc_due):
            return 0
        self._gc_due = now + GC_EVERY
        return collect(shard, self.env, self._dbs["gc"])

    def collect_unowned(self) -> int:
        """Recover and collect every shard no process owns (its listener is gone: fewer
        listeners after a reload, or stopped); the supervisor's housekeeping. Returns how many."""
        n = 0
        for index in self.shards.indexes():
            if self.shards.owner is not None and index == self.shards.owner.index:
                continue
            fd = self.shards.try_lock(index)
            if fd < 0:
                continue
            try:
                self._recover(self.shards.get(index))
                n += 1
            finally:
                os.close(fd)
        return n

    def receipts_pending_for(self) -> float | None:
        """Seconds until gathered receipts are due to be written (None: none gathered)."""
        if not self._receipts:
            return None
        return max(0.0, self._receipts_due - time.time())

    def flush_receipts(self) -> int:
        """Write the receipts gathered since the last commit that wrote them (see put_many)."""
        if not self._receipts:
            return 0
        with self.env.begin(write=True) as txn:
            n = self.audit.append_receipt_groups(txn, self._receipts, time.time())
        self._receipts = {}
        return n

    # -- counters, space ---------------------------------------------------------------------

    def counters(self) -> Counters:
        with self.env.begin() as txn:
            return Counters.read(txn, self._info)

    def add_counters(self, deltas: Mapping[CounterKey, int], maxima: Mapping[CounterKey, int] | None = None) -> None:
        """One small commit for events counted elsewhere (see :class:`EventTally`)."""
        with self.env.begin(write=True) as txn:
            add_counters(txn, self._info, deltas, maxima)

    def free_bytes(self) -> int:
        return self.space.free_bytes()

    def check_space(self, incoming_bytes: int) -> None:
        self.space.check(incoming_bytes)

    def _envs(self) -> Iterator[tuple[lmdb.Environment, Iterable[Any]]]:
        yield self.env, self._dbs.values()
        for shard in self.shards.each():
            yield shard.env, shard.dbs.values()

    def check_room(self, incoming_bytes: int) -> None:
        """The receive path's check before a write: the disk's free-space floor, and
        spool_max_bytes across the shared file and every shard (SpoolFullError)."""
        self.space.check(incoming_bytes)
        if self.shards.owner is not None:    # one environment alone: its map is the limit
            self.budget.check(incoming_bytes)

    def reusable_bytes(self) -> int:
        """Free pages of the shared file and of every shard's (LMDB reuses them in place)."""
        return reusable_bytes(self.env, self._dbs.values()) + sum(
            reusable_bytes(shard.env, shard.dbs.values()) for shard in self.shards.each())

    def preallocate(self, nbytes: int, chunk: int = 4 * 1024**2) -> int:
        return preallocate(self.env, self._info, self._dbs.values(), self.space, nbytes, chunk)

    def preallocate_shard(self, nbytes: int, chunk: int = 4 * 1024**2) -> int:
        """``preallocate`` for this process's own shard, where its objects' bytes go."""
        shard = self.shards.owner
        if shard is None:
            return 0
        return preallocate(shard.env, shard.dbs["info"], shard.dbs.values(), self.space, nbytes, chunk)

    def usage(self) -> dict[str, int]:
        """The shared environment's usage, with the shards' used bytes added (``shard_bytes``
        says how much of ``used_bytes`` is in shards)."""
        out = self.space.usage(self.env)
        shard_bytes = sum(self.space.usage(shard.env)["used_bytes"] for shard in self.shards.each())
        out["used_bytes"] += shard_bytes
        out["shard_bytes"] = shard_bytes
        return out

    # -- receive side ------------------------------------------------------------------------

    def put_many(self, items: Sequence[Incoming], now: float | None = None) -> list[PutResult | BaseException]:
        """Commit a group of objects durably and queue them (group commit).

        Returns one result per item, in order: a PutResult, or the exception for that item.
        When the map is full the batch is retried item by item so that what fits is kept and
        only what does not fit is refused. A shard owner journals the group into its shard and
        applies it at once (a listener's :class:`Committer` answers after the journal and lets
        its :class:`Applier` apply); a group whose records cannot be applied is taken back.
        """
        if not items:
            return []
        now = time.time() if now is None else now
        owner = self.shards.owner
        if owner is not None:
            done = self.journal(items, now)
            ok = [d for d in done if isinstance(d, Journaled)]
            try:
                applied = iter(self.apply(ok))
            except SpoolError as exc:
                self._unwrite(owner, [d.loc for d in ok])
                return [d if isinstance(d, BaseException) else exc for d in done]
            return [d if isinstance(d, BaseException) else next(applied) for d in done]
        try:
            # A staged object's chunks were checked and written as they came: not counted twice.
            self.check_room(sum(len(i.data) for i in items if not isinstance(i.data, StagedData)))
        except SpoolFullError as exc:
            return [exc for _ in items]
        try:
            return self._records(items, [None] * len(items), [now] * len(items), now)
        except lmdb.MapFullError:
            if len(items) == 1:
                return [SpoolFullError(f"spool {self.path} is full (spool_max_bytes reached)")]
            out: list[PutResult | BaseException] = []
            for item in items:
                out.extend(self.put_many([item], now))
            return out
        except lmdb.Error as exc:
            err = SpoolError(f"spool write failed: {exc}")
            return [err for _ in items]

    def journal(self, items: Sequence[Incoming], now: float | None = None) -> list[Journaled | BaseException]:
        """The owner's receive commit (see :mod:`journal`): each object's bytes and journal
        entry into this process's shard, in one synced transaction that no other listener's
        commit waits for. Durable on return; queued once :meth:`apply` took them."""
        owner = self.shards.owner
        if owner is None:
            raise SpoolError("journal() needs a spool shard of this process's own (own_shard)")
        now = time.time() if now is None else now
        try:
            self.check_room(sum(len(i.data) for i in items if not isinstance(i.data, StagedData)))
        except SpoolFullError as exc:
            return [exc for _ in items]
        try:
            locs = owner.write([i.data for i in items], [encode_entry(i, now) for i in items])
        except lmdb.MapFullError:
            if len(items) == 1:
                return [SpoolFullError(f"spool shard {owner.path} is full (spool_max_bytes reached)")]
            return [r for item in items for r in self.journal([item], now)]
        except lmdb.Error as exc:
            err = SpoolError(f"spool shard write failed: {exc}")
            return [err for _ in items]
        return [Journaled(loc, item, now) for loc, item in zip(locs, items)]

    def apply(self, done: Sequence[Journaled], now: float | None = None) -> list[PutResult]:
        """Queue journalled objects: their records, and their shards' applied marks, in one
        transaction. Raises SpoolError (SpoolFullError when the shared map is full); nothing
        is applied then and the journal still holds them."""
        if not done:
            return []
        now = time.time() if now is None else now
        try:
            return cast(list[PutResult], self._records(
                [d.item for d in done], [d.loc for d in done], [d.at for d in done], now))
        except lmdb.MapFullError as exc:
            raise SpoolFullError(f"spool {self.path} is full (spool_max_bytes reached) applying "
                                 f"{len(done)} journalled object(s)") from exc
        except lmdb.Error as exc:
            raise SpoolError(f"spool write failed applying {len(done)} journalled object(s): {exc}") from exc

    def _records(self, items: Sequence[Incoming], locs: Sequence[Location | None], ats: Sequence[float],
                 now: float) -> list[PutResult | BaseException]:
        """The shared commit of a group: its routing records and queue entries, the applied
        marks of the shards its bytes are in, and receipts that are due."""
        with self.env.begin(write=True) as txn:
            results: list[PutResult | BaseException] = [
                self.queues.put(txn, item, at, loc) for item, loc, at in zip(items, locs, ats)]
            marks: dict[int, int] = {}
            for loc in locs:
                if loc is not None and loc.key > marks.get(loc.shard, 0):
                    marks[loc.shard] = loc.key
            for index, key in marks.items():
                raw = txn.get(hw_key(index), db=self._dbs["shard"])
                if raw is None or _U64.unpack(raw)[0] < key:
                    txn.put(hw_key(index), _U64.pack(key), db=self._dbs["shard"])
            # Receipts (issue 14) are gathered per sender and study and written with the
            # first commit a second after the last ones: one audit event per study batch
            # of a second, not per commit (one association commits object by object; an
            # event each cost 12 % of tiny-object throughput). A crash can lose the last
            # second's receipt events; the objects' own records keep who sent them.
            batch: dict[tuple[str, str, str, str], list[int]] = {}
            self.audit.gather_receipts(batch, items, results)
            flush = bool(batch or self._receipts) and now >= self._receipts_due
            if flush:
                self.audit.append_receipt_groups(txn, _merged(self._receipts, batch), now)
        # Committed: only now are these oids real (an aborted commit gathered nothing).
        if flush:
            self._receipts = {}
            self._receipts_due = now + RECEIPT_EVERY
        else:
            for k, v in batch.items():
                self._receipts.setdefault(k, []).extend(v)
        return results

    def _unwrite(self, owner: Shard | None, locs: Sequence[Location | None]) -> None:
        """Take back journalled objects whose records were not committed (put_many's caller is
        told they failed; left, they would be applied at the owner's next start)."""
        if owner is None:
            return
        try:
            owner.unwrite([loc for loc in locs if loc is not None])
        except lmdb.Error:
            log.exception("spool shard %d: could not take back the objects of a failed commit (they are "
                          "queued when the shard is next owned)", owner.index)

    # -- send side ---------------------------------------------------------------------------

    def reset_inflight(self, dest: str) -> int:
        return self.queues.reset_inflight(dest)

    def claim(self, dest: str, limit: int, now: float | None = None) -> tuple[list[Claimed], float | None]:
        """Move up to ``limit`` due pending entries to in-flight (see :meth:`Queues.claim`)."""
        now = time.time() if now is None else now
        try:
            with self.env.begin(write=True) as txn:
                return self.queues.claim(txn, dest, limit, now)
        except lmdb.Error as exc:     # e.g. ENOSPC on commit: nothing changed, the caller retries
            raise SpoolError(f"spool write failed claiming for {dest}: {exc}") from exc

    def settle(self, dest: str, outcomes: Iterable[Outcome], now: float | None = None, *,
               claim: int = 0) -> tuple[list[Claimed], float | None]:
        """Record what happened to claimed objects, all in one transaction.

        With ``claim`` > 0 the same transaction then claims the next batch (as :meth:`claim`,
        unless the destination is paused): a busy sender pays one commit per batch, not two,
        and every commit is a turn at the write lock that the listeners' commits wait for.
        """
        now = time.time() if now is None else now
        try:
            with self.env.begin(write=True) as txn:
                self.queues.settle(txn, dest, outcomes, now)
                if claim > 0 and txn.get(paused_key(dest), db=self._info) is None:
                    return self.queues.claim(txn, dest, claim, now)
        except lmdb.Error as exc:     # e.g. ENOSPC on commit: aborted whole, the caller retries
            raise SpoolError(f"spool write failed settling for {dest}: {exc}") from exc
        return [], None

    def settle_many(self, dest: str, requests: Sequence[tuple[Sequence[Outcome], int]],
                    now: float | None = None) -> list[tuple[list[Claimed], float | None]]:
        """Several :meth:`settle` calls (outcomes, claim) in one transaction, in order: a
        sender's associations finishing together commit once (:class:`SettleGroup`)."""
        now = time.time() if now is None else now
        out: list[tuple[list[Claimed], float | None]] = []
        try:
            with self.env.begin(write=True) as txn:
                paused: bool | None = None
                for outcomes, claim in requests:
                    self.queues.settle(txn, dest, outcomes, now)
                    if claim > 0:
                        if paused is None:
                            paused = txn.get(paused_key(dest), db=self._info) is not None
                        if not paused:
                            out.append(self.queues.claim(txn, dest, claim, now))
                            continue
                    out.append(([], None))
        except lmdb.Error as exc:     # aborted whole: every caller keeps its outcomes and retries
            raise SpoolError(f"spool write failed settling for {dest}: {exc}") from exc
        return out

    def read(self, oid: int, loc: Location | None = None) -> bytes:
        """The object's bytes, in memory (a chunked one assembled)."""
        with self.view(oid, loc) as data:
            return data.join() if isinstance(data, ChunkedView) else bytes(data)

    @contextlib.contextmanager
    def view(self, oid: int, loc: Location | None = None) -> Iterator[memoryview | ChunkedView]:
        """The object's bytes as a memoryview into the LMDB map, valid inside the block only;
        a chunked (large) object's as a :class:`ChunkedView`, one memoryview per chunk.

        The send path uses this so an object goes from the map to the socket without a copy;
        the read transaction it holds only keeps those pages from being reused meanwhile.
        ``loc`` (a claim's :attr:`Claimed.loc`) names a shard holding the bytes; without it
        the bytes are looked for here, then where the routing record says (every reader of
        bytes goes through this method or :meth:`read`).
        """
        if loc is None:
            with self.env.begin() as txn:
                if txn.get(oid_key(oid), db=self._obj) is None:
                    loc = location_of(txn.get(oid_key(oid), db=self._meta))
        if loc is not None:
            with self.shards.view(loc, oid) as sharded:
                yield sharded
            return
        with stored_view(self.env, oid_key(oid), self._obj, self._dbs["objc"], self._dbs["chunk"],
                         "the spool", oid) as view:
            yield view

    # -- staging of large objects (see :mod:`staging`): the listeners' committer thread -------

    def stage_chunk(self, sid: bytes, index: int, data: Any, owner: bytes) -> None:
        """Write one chunk of a staged object in a transaction of its own (registering the
        staging id with its owner, so a crash's leftovers can be found)."""
        self.check_room(len(data))
        try:
            shard = self.shards.owner
            if shard is not None:
                shard.stage_chunk(sid, chunk_key(sid, index), data, owner)
                return
            with self.env.begin(write=True) as txn:
                txn.put(sid, owner, db=self._dbs["stage"])
                txn.put(chunk_key(sid, index), data, db=self._dbs["chunk"])
        except lmdb.MapFullError as exc:
            raise SpoolFullError(f"spool {self.path} is full (spool_max_bytes reached)") from exc
        except lmdb.Error as exc:
            raise SpoolError(f"spool write failed staging a chunk: {exc}") from exc

    def discard_staged(self, sid: bytes, chunks: int) -> int:
        """Remove a staged object's chunks (refused, or its association aborted); how many."""
        shard = self.shards.owner
        if shard is not None:
            return shard.discard_staged(sid, (chunk_key(sid, i) for i in range(chunks)))
        with self.env.begin(write=True) as txn:
            n = sum(1 for i in range(chunks) if txn.delete(chunk_key(sid, i), db=self._dbs["chunk"]))
            txn.delete(sid, db=self._dbs["stage"])
        return n

    def remove_orphan_staging(self) -> int:
        """Remove the chunks of objects whose staging process is gone (a crash mid-object);
        returns how many staged objects were removed. Live listeners' staging is kept."""
        stage, chunk = self._dbs["stage"], self._dbs["chunk"]
        with self.env.begin() as txn:
            orphans = [bytes(k) for k, owner in txn.cursor(db=stage) if not owner_alive(bytes(owner))]
        for sid in orphans:
            with self.env.begin(write=True) as txn:
                cur = txn.cursor(db=chunk)
                keys = []
                if cur.set_range(sid):
                    for k in cur.iternext(values=False):
                        if not bytes(k).startswith(sid):
                            break
                        keys.append(bytes(k))
                for k in keys:
                    txn.delete(k, db=chunk)
                txn.delete(sid, db=stage)
        return len(orphans)

    # -- runtime pause (operator), read by the destination's sender on every round ------------

    def set_paused(self, dest: str, paused: bool) -> None:
        with self.env.begin(write=True, db=self._info) as txn:
            if paused:
                txn.put(paused_key(dest), b"1")
            else:
                txn.delete(paused_key(dest))

    def is_paused(self, dest: str) -> bool:
        with self.env.begin(db=self._info) as txn:
            return txn.get(paused_key(dest)) is not None

    # -- audit trail ---------------------------------------------------------------------------

    def audit_record(self, action: str, *, who: str | None = None, why: str = "",
                     **details: Any) -> dict[str, Any]:
        """Append an operator or configuration event (who/what/when/why) to the chain."""
        return self.audit.record(action, who=who or whoami(), why=why, **details)

    def audit_events(self, since: float = 0.0, until: float = float("inf"),
                     study_instance_uid: str = "") -> Iterator[dict[str, Any]]:
        return self.audit.events(since, until, study_instance_uid)

    def audit_verify(self) -> tuple[bool, str]:
        report = self.audit.verify()
        return report.ok, report.text

    def audit_report(self) -> AuditReport:
        """``audit_verify`` with the check that failed and the head (see :mod:`audit`)."""
        return self.audit.verify()

    def audit_prune(self, before: float) -> int:
        return self.audit.prune(before)

    # -- operator side -----------------------------------------------------------------------

    def destinations(self) -> list[str]:
        return self.queues.destinations()

    def stats(self, dests: Iterable[str] | None = None, now: float | None = None) -> list[QueueStats]:
        now = time.time() if now is None else now
        names = sorted(set(dests or ()) | set(self.destinations()) | {UNROUTED})
        counters = self.counters()
        open_tx = self.commitments.transactions()
        out = []
        with self.env.begin() as txn:
            for dest in names:
                mine = [t for t in open_tx if t.destination == dest]
                counts, oldest = self.queues.counts(txn, dest, now)
                v_waiting, v_failed = self.verifications.counts(txn, dest, now)
                out.append(QueueStats(
                    destination=dest, pending=(counts[QueueState.PENDING] + counts[QueueState.UNROUTED]
                                               + counts[QueueState.BULK]),
                    in_flight=counts[QueueState.IN_FLIGHT], failed=counts[QueueState.FAILED],
                    oldest_age=oldest,
                    delivered=counters.of(CounterKind.DELIVERED, dest),
                    failed_total=counters.of(CounterKind.FAILED, dest),
                    suppressed=counters.of(CounterKind.SUPPRESSED, dest),
                    unknown_outcomes=counters.of(CounterKind.UNKNOWN_OUTCOMES, dest),
                    bulk_pending=counts[QueueState.BULK],
                    committed=counters.of(CounterKind.COMMITTED, dest),
                    commit_failed=counters.of(CounterKind.COMMIT_FAILED, dest),
                    commit_waiting=sum(len(t.instances) for t in mine) + self.commitments.waiting_count(txn, dest),
                    commit_overdue=sum(len(t.instances) for t in mine if t.alerted),
                    verified=counters.of(CounterKind.VERIFIED, dest),
                    verify_failed=counters.of(CounterKind.VERIFY_FAILED, dest),
                    verify_waiting=v_waiting, verify_failed_now=v_failed,
                    quarantined=counts[QueueState.QUARANTINED],
                    quarantined_total=counters.of(CounterKind.QUARANTINED, dest)))
        return out

    def entries(self, dest: str, state: QueueState | bytes | str, limit: int = 1000) -> list[QueueEntry]:
        return self.queues.entries(dest, _state(state), limit)

    def entry(self, dest: str, oid: int) -> QueueEntry | None:
        return self.queues.entry(dest, oid)

    def prune_history(self, before: float, batch: int = 10000) -> int:
        return self.queues.prune_history(before, batch)

    def retry_failed(self, dest: str, oids: Iterable[int] | None = None) -> int:
        return self.queues.retry_failed(dest, oids)

    def make_due(self, dest: str, now: float | None = None) -> int:
        """Pending entries of ``dest`` waiting out their own backoff become due (send-now)."""
        return self.queues.make_due(dest, time.time() if now is None else now)

    def purge(self, dest: str, states: Sequence[QueueState | bytes | str] = (QueueState.FAILED,),
              oids: Iterable[int] | None = None, reason: str = "") -> list[int]:
        return self.queues.purge(dest, [_state(s) for s in states], oids, reason)

    def record(self, oid: int) -> RoutingRecord | None:
        """The object's routing record (None once pruned, or never received)."""
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(oid_key(oid))
            return decode_record(raw) if raw else None

    def meta(self, oid: int) -> dict[str, Any] | None:
        """The routing record as JSON-ready data (what the API shows)."""
        rec = self.record(oid)
        return None if rec is None else rec.to_json()

    def lookup(self, *, study_instance_uid: str = "", accession_number: str = "",
               patient_id: str = "", limit: int = 10000) -> list[tuple[int, RoutingRecord]]:
        """Objects (with their routing history) by Study UID, Accession Number or Patient ID."""
        key = (b"s" + study_instance_uid.encode() if study_instance_uid else
               b"a" + accession_number.encode() if accession_number else
               b"p" + patient_id.encode())
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._dbs["idx"])
            if cur.set_key(key[:401]):
                for raw_oid in cur.iternext_dup():
                    oid = _U64.unpack(bytes(raw_oid))[0]
                    raw = txn.get(bytes(raw_oid), db=self._meta)
                    if raw is not None:
                        out.append((oid, decode_record(raw)))
                    if len(out) >= limit:
                        break
        return out

    def object_count(self) -> int:
        """Objects whose bytes the spool holds: small ones here, and every one in a shard
        that is not listed for deletion (``gc``)."""
        with self.env.begin() as txn:
            n = int(txn.stat(self._obj)["entries"])
            doomed = [bytes(k) for k in txn.cursor(db=self._dbs["gc"]).iternext(values=False)]
        shards = list(self.shards.each())
        n += sum(shard.entries() for shard in shards)
        by_index = {shard.index: shard for shard in shards}
        for raw in doomed:
            loc = split_gc_key(raw)
            shard = by_index.get(loc.shard)
            if shard is not None and shard.holds(loc.key):
                n -= 1
        return n


def _merged(a: dict[tuple[str, str, str, str], list[int]],
            b: dict[tuple[str, str, str, str], list[int]]) -> dict[tuple[str, str, str, str], list[int]]:
    """Receipt groups of ``a`` then ``b`` (new dicts and lists: ``a`` may still be flushed)."""
    out = {k: list(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, []).extend(v)
    return out


def open_spool(cfg: Config, *, durable: bool = True) -> Spool:
    """The spool of a configuration (``Spool.from_config``); every process opens it this way."""
    return Spool.from_config(cfg, durable=durable)


__all__ = ["Spool", "open_spool", "Incoming", "PutResult", "Claimed", "Outcome", "QueueEntry", "QueueStats"]
