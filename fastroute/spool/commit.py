"""Group commit: the listeners' objects reach LMDB through one committing thread per process.

Concurrent associations' objects share one write transaction and one fsync, so durability
does not cost one fsync per object; the C-STORE is answered only when its commit is done.

The same thread writes the chunks of large objects as they arrive (:mod:`staging`), each in
a transaction of its own, in order with the commits, and commits such an object once its
last chunk is staged (``seal``) and it passed its checks (``commit_staged``).

A listener that owns a spool shard commits into the shard only (its bytes and journal,
:mod:`journal`) and answers then; its :class:`Applier` thread queues the objects in the
shared environment, so this thread never waits for another process's commit.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from fastroute.logsetup import fields
from fastroute.spool.journal import Applier, Journaled, journaled_results
from fastroute.spool.staging import StagedData, StagedFile, Stager
from fastroute.spool.store import GC_EVERY, Incoming, PutResult, Spool
from fastroute.spool.wakeup import Notifier

log = logging.getLogger("fastroute.commit")

_Job = Callable[[], None]


class Committer:
    """Group commit: one thread commits every object queued while the previous commit ran.

    Objects that arrive during a commit's fsync form the next group by themselves. Waiting
    ``gather`` seconds for more only pays when other associations are sending at the same
    time (``siblings() > 1``, like PostgreSQL's commit_siblings): a lone association would
    wait the full delay on every object, since it sends nothing until it has its response.
    """

    def __init__(self, spool: Spool, notifier: Notifier | None, *, gather: float = 0.0,
                 max_batch_bytes: int = 256 * 1024**2,
                 siblings: Callable[[], int] | None = None) -> None:
        self.spool = spool
        self.notifier = notifier
        self.gather = gather
        self.siblings = siblings
        self.max_batch_bytes = max_batch_bytes
        self._q: queue.SimpleQueue[tuple[Incoming, Future[PutResult]] | _Job | None] = queue.SimpleQueue()
        removed = spool.remove_orphan_staging()
        if removed:
            log.warning("removed the staged chunks of %d large object(s) whose listener stopped before "
                        "they were committed (never acknowledged)", removed)
        self._owner = b""
        self.applier: Applier | None = None
        if spool.shards.owner is not None:
            self.applier = Applier(spool, notifier.notify if notifier is not None else None, gc_every=GC_EVERY)
        self._thread = threading.Thread(target=self._run, name="fastroute-committer", daemon=True)
        self._thread.start()
        self.commits = 0
        self.objects = 0

    def submit(self, item: Incoming) -> PutResult:
        """Queue ``item`` for the next group commit and wait for it."""
        return self.submit_nowait(item).result()

    def submit_nowait(self, item: Incoming) -> Future[PutResult]:
        """Queue ``item`` for the next group commit; its future is done after the commit.

        For callers that must not block (the listener's event loop)."""
        fut: Future[PutResult] = Future()
        self._q.put((item, fut))
        return fut

    # -- large objects ------------------------------------------------------------------------

    def stager(self, threshold: int) -> Stager:
        """The listener's :class:`Stager`: datasets past ``threshold`` bytes are staged here."""
        st = Stager(self.spool.path, threshold, self._stage_later, self._discard_later)
        self._owner = st.owner()
        return st

    def _stage_later(self, f: StagedFile, index: int, length: int) -> None:
        self._q.put(lambda: self._stage(f, index, length))

    def _stage(self, f: StagedFile, index: int, length: int) -> None:
        if f.closed or f.error is not None:
            return
        try:
            with f.chunk(index, length) as chunk:
                self.spool.stage_chunk(f.sid, index, chunk, self._owner)
        except Exception as exc:           # told to the modality when its object is complete
            f.error = exc

    def _discard_later(self, f: StagedFile) -> None:
        self._q.put(lambda: self._discard(f))

    def _discard(self, f: StagedFile) -> None:
        try:
            n = self.spool.discard_staged(f.sid, f.staged + 1)
            if n:
                log.info("sop_instance_uid=%s: removed %d staged chunk(s) (%d bytes received) of an "
                         "object that was not committed", f.sop_instance_uid, n, f.size,
                         extra=fields(sop_uid=f.sop_instance_uid or None))
        except Exception:
            log.exception("could not remove a staged object's chunks (removed at the next start)")
        finally:
            f.close()

    def seal(self, f: StagedFile) -> Future[None]:
        """Stage the last, partial chunk of a complete object; the future fails with what
        went wrong staging it (a full disk or spool), after its chunks were removed."""
        fut: Future[None] = Future()

        def job() -> None:
            tail = f.tail()
            if tail is not None:
                self._stage(f, *tail)
                f.staged += 1
            if f.error is not None:
                self._discard(f)
                fut.set_exception(f.error)
            else:
                fut.set_result(None)
        self._q.put(lambda: _run_into(fut, job))
        return fut

    def drop_staged(self, f: StagedFile) -> Future[None]:
        """Remove a sealed object's chunks (it was refused); done once they are gone, so the
        refusal is answered after the cleanup."""
        fut: Future[None] = Future()
        def job() -> None:
            self._discard(f)
            fut.set_result(None)
        self._q.put(lambda: _run_into(fut, job))
        return fut

    def commit_staged(self, f: StagedFile, checked: Incoming) -> Future[PutResult]:
        """Commit a sealed, checked object: ``checked`` as routed, its bytes the staged chunks
        (linked to it by this commit). Its chunks are removed if the commit fails."""
        fut: Future[PutResult] = Future()

        def job() -> None:
            item = Incoming(StagedData(f.sid, f.size, f.staged), checked.transfer_syntax,
                            checked.sop_class_uid, checked.sop_instance_uid, checked.destinations,
                            checked.meta)
            [res] = self._commit([item])
            self.commits += 1
            self.objects += 1
            if isinstance(res, BaseException):
                self._discard(f)
                fut.set_exception(res)
                return
            f.close()
            fut.set_result(res)
            if self.notifier is not None and self.applier is None:
                for dest in res.queued:
                    self.notifier.notify(dest)
        self._q.put(lambda: _run_into(fut, job))
        return fut

    def _commit(self, items: list[Incoming]) -> list[PutResult | BaseException]:
        """One group's commit: journalled into this listener's shard and handed to the applier,
        or (without a shard) queued in the shared environment at once."""
        if self.applier is None:
            return self.spool.put_many(items)
        done = self.spool.journal(items)
        self.applier.add([d for d in done if isinstance(d, Journaled)])
        return journaled_results(done)

    def wait_applied(self, timeout: float | None = None) -> bool:
        """Everything answered so far is queued in the shared environment (True at once
        without a shard); for tests and tools that look at the queues right after a send."""
        return self.applier is None or self.applier.wait_applied(timeout)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)
        if self.applier is not None:
            self.applier.close()      # applies what is journalled, flushes receipts, collects
            return
        self._flush_receipts()

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                # Receipts gathered but not yet audited are written once their second is up,
                # also when no further object comes (an idle router's audit trail is complete).
                # A shard owner's applier does that, and deletes finished bytes, instead.
                wait = self.spool.receipts_pending_for() if self.applier is None else None
                first = self._q.get(timeout=wait) if wait is not None else self._q.get()
            except queue.Empty:
                self._flush_receipts()
                continue
            if first is None:
                break
            if callable(first):
                self._job(first)
                continue
            batch = [first]
            after: _Job | None = None      # a staging job that came in while gathering
            size = len(first[0].data)
            gather = self.gather if self.gather > 0 and (self.siblings is None or self.siblings() > 1) else 0.0
            deadline = time.monotonic() + gather
            while size < self.max_batch_bytes:
                try:
                    timeout = deadline - time.monotonic()
                    nxt = self._q.get(timeout=timeout) if timeout > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if callable(nxt):
                    after = nxt
                    break
                batch.append(nxt)
                size += len(nxt[0].data)
            try:
                results = self._commit([b[0] for b in batch])
            except BaseException as exc:   # never leave a C-STORE waiting forever
                results = [exc for _ in batch]
            self.commits += 1
            self.objects += len(batch)
            woken: set[str] = set()
            for (_, fut), res in zip(batch, results):
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
                    woken.update(res.queued)
            if self.notifier is not None and self.applier is None:
                for dest in woken:
                    self.notifier.notify(dest)
            if after is not None:
                self._job(after)

    def _flush_receipts(self) -> None:
        try:
            self.spool.flush_receipts()
        except Exception:        # the audit must never take the commit thread down
            log.exception("writing the receipts' audit events failed; they are written with the next commit")

    @staticmethod
    def _job(job: _Job) -> None:
        """A staging job; one that fails must not take the commit thread (every C-STORE) down."""
        try:
            job()
        except Exception:
            log.exception("staging job failed")


def _run_into(fut: Future[Any], job: _Job) -> None:
    """Run a job whose future must be answered whatever happens (a C-STORE waits on it)."""
    try:
        job()
    except BaseException as exc:
        if not fut.done():
            fut.set_exception(exc)
