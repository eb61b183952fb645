"""Group commit: the listeners' objects reach LMDB through one committing thread per process.

Concurrent associations' objects share one write transaction and one fsync, so durability
does not cost one fsync per object; the C-STORE is answered only when its commit is done.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

from fastroute.spool.store import Incoming, PutResult, Spool
from fastroute.spool.wakeup import Notifier


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
        self._q: queue.SimpleQueue[tuple[Incoming, Future[PutResult]] | None] = queue.SimpleQueue()
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

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is None:
                break
            batch = [first]
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
                batch.append(nxt)
                size += len(nxt[0].data)
            try:
                results = self.spool.put_many([b[0] for b in batch])
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
            if self.notifier is not None:
                for dest in woken:
                    self.notifier.notify(dest)
