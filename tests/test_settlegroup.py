"""Group commit on the send side (issue 16): a sender's associations that settle together
share one transaction, each gets exactly its own claim back, and a failed commit fails every
member so each keeps its outcomes."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fastroute.errors import SpoolError
from fastroute.spool import Incoming, Outcome, OutcomeKind, Spool
from fastroute.spool.settlegroup import SettleGroup

TS = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def fill(sp: Spool, n: int) -> None:
    items = [Incoming(b"x" * 100, TS, CT, f"1.{i}", ("a",), {"study_instance_uid": "9"}) for i in range(n)]
    assert all(not isinstance(r, BaseException) for r in sp.put_many(items))


def test_a_lone_worker_settles_as_before(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    try:
        fill(sp, 3)
        group = SettleGroup(sp, "a")
        batch, _ = sp.claim("a", 2)
        nxt, _ = group.settle([Outcome(c.oid, OutcomeKind.DELIVERED, status=0) for c in batch], claim=5)
        assert [c.oid for c in nxt] == [3] and group.commits == 1
        assert sp.stats(["a"])[0].delivered == 2
    finally:
        sp.close()


def test_workers_finishing_together_share_commits_and_claim_disjoint_batches(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    try:
        fill(sp, 400)
        group = SettleGroup(sp, "a")
        real = sp.settle_many
        gate = threading.Event()

        def slow(dest: str, requests: list, now: float | None = None) -> list:  # type: ignore[type-arg]
            gate.wait(0.01)                   # a commit that takes a while: others gather behind it
            return real(dest, requests, now)

        sp.settle_many = slow  # type: ignore[method-assign]
        seen: list[int] = []
        lock = threading.Lock()

        def worker(_: int) -> int:
            batch, _ = group.settle([], claim=5)
            while batch:
                with lock:
                    seen.extend(c.oid for c in batch)
                batch, _ = group.settle([Outcome(c.oid, OutcomeKind.DELIVERED, status=0) for c in batch], claim=5)
            return 0

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(worker, range(4)))
        assert sorted(seen) == list(range(1, 401))          # every object claimed exactly once
        assert sp.stats(["a"])[0].delivered == 400 and sp.stats(["a"])[0].in_flight == 0
        assert group.settled > group.commits                 # some commits served several workers
    finally:
        sp.close()


def test_a_failed_group_commit_fails_every_member(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    try:
        fill(sp, 2)
        group = SettleGroup(sp, "a")
        batch, _ = sp.claim("a", 2)

        def broken(dest: str, requests: list, now: float | None = None) -> list:  # type: ignore[type-arg]
            raise SpoolError("disk error (test)")

        sp.settle_many = broken  # type: ignore[method-assign]
        with pytest.raises(SpoolError):
            group.settle([Outcome(batch[0].oid, OutcomeKind.DELIVERED, status=0)], claim=1)
        del sp.settle_many                                     # the disk is back: the retry records it
        group.settle([Outcome(c.oid, OutcomeKind.DELIVERED, status=0) for c in batch])
        assert sp.stats(["a"])[0].delivered == 2
    finally:
        sp.close()


def test_a_paused_destination_settles_but_claims_nothing(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    try:
        fill(sp, 4)
        batch, _ = sp.claim("a", 2)
        sp.set_paused("a", True)
        got, _ = SettleGroup(sp, "a").settle([Outcome(c.oid, OutcomeKind.DELIVERED, status=0) for c in batch],
                                             claim=5)
        assert got == [] and sp.stats(["a"])[0].delivered == 2 and sp.stats(["a"])[0].pending == 2
    finally:
        sp.close()
