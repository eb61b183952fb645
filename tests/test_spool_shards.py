"""Byte shards and the receive journal (issue 16): listeners commit object bytes and journal
entries into LMDB environments of their own and answer then; the records are applied to the
shared one off the acknowledgement path. Crashes before the apply, a spool written before the
journal, deferred deletes, large objects, the one-environment layout, and a two-listener
router end to end."""
from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

import peers
import synth
from peers import storescu, wait_until
from router import Router, destination

from fastroute.spool import Incoming, Outcome, OutcomeKind, Spool
from fastroute.spool.shards import ShardSet, location_of
from fastroute.spool.staging import CHUNK, ChunkedView, StagedData, chunk_key

TS = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MAP = 256 * 1024**2


def obj(uid: str, data: bytes, dests: tuple[str, ...] = ("a",)) -> Incoming:
    return Incoming(data, TS, CT, uid, dests, {"study_instance_uid": "9.9", "calling_ae": "CT1"})


def payload(uid: str, size: int = 70000) -> bytes:
    """An object's bytes (CT-sized by default); every size goes to the writer's shard."""
    return (uid.encode() * (size // len(uid) + 1))[:size]


def shard_entries(path: Path) -> dict[int, int]:
    sp = Spool(path, map_size=MAP)
    try:
        return {shard.index: shard.entries() for shard in sp.shards.each()}
    finally:
        sp.close()


def drain(sp: Spool, dest: str = "a") -> dict[str, bytes]:
    """Claim everything for ``dest``, read each object's bytes (as a sender does: from the
    claim's location), settle it delivered; the bytes by SOP Instance UID."""
    got: dict[str, bytes] = {}
    while True:
        batch, _ = sp.claim(dest, 50)
        if not batch:
            return got
        for item in batch:
            with sp.view(item.oid, item.loc) as data:
                got[item.sop_instance_uid] = data.join() if isinstance(data, ChunkedView) else bytes(data)
        sp.settle(dest, [Outcome(i.oid, OutcomeKind.DELIVERED, status=0) for i in batch])


def _listener(path: str, index: int, n: int) -> None:
    """A listener process: owns a shard and commits ``n`` objects in groups of 4."""
    sp = Spool(path, map_size=MAP)
    try:
        shard = sp.own_shard(index)
        assert shard.index == index
        for start in range(0, n, 4):
            group = [obj(f"1.{index}.{i}", payload(f"1.{index}.{i}")) for i in range(start, min(n, start + 4))]
            results = sp.put_many(group)
            assert not any(isinstance(r, BaseException) for r in results), results
    finally:
        sp.close()


def _crash_between_commits(path: str) -> None:
    """A listener of the layout before the journal (bytes, then records in a second commit)
    that wrote a group's bytes into its shard and died before the records."""
    sp = Spool(path, map_size=MAP)
    shard = sp.own_shard(0)
    shard.write([payload("orphan-1"), payload("orphan-2")])
    os._exit(0)


def test_two_listener_processes_write_their_own_shards_and_one_sender_drains_both(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    Spool(path, map_size=MAP).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_listener, args=(str(path), i, 30)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert shard_entries(path) == {0: 30, 1: 30}
    sp = Spool(path, map_size=MAP, durable=False)
    try:
        with sp.env.begin() as txn:          # the shared env holds the records, not the bytes
            assert txn.stat(sp._dbs["obj"])["entries"] == 0
            assert txn.stat(sp._dbs["meta"])["entries"] == 60
        assert sp.object_count() == 60
        got = drain(sp)
        assert got == {f"1.{i}.{j}": payload(f"1.{i}.{j}") for i in range(2) for j in range(30)}
        assert sp.object_count() == 0        # listed for deletion by the settles ...
        assert sp.stats(["a"])[0].delivered == 60
    finally:
        sp.close()
    assert shard_entries(path) == {0: 30, 1: 30}     # ... which wrote nothing into the shards
    for index in (0, 1):                     # the owners delete them (here: when next owned)
        owner = Spool(path, map_size=MAP)
        try:
            owner.own_shard(index)
        finally:
            owner.close()
    assert shard_entries(path) == {0: 0, 1: 0}


def test_a_shard_owned_by_another_process_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    a = Spool(path, map_size=MAP)
    try:
        assert a.own_shard(0).index == 0
        other = ShardSet(path, MAP)      # as a new listener-0 would, during a reload's overlap
        try:
            assert other.take(0).index == 1
        finally:
            other.close()
    finally:
        a.close()


def test_bytes_written_before_a_crash_between_the_commits_are_removed_at_restart(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    sp = Spool(path, map_size=MAP)
    sp.own_shard(0)
    kept = [r for r in sp.put_many([obj("1.1", payload("1.1")), obj("1.2", payload("1.2"))])]
    assert all(not isinstance(r, BaseException) for r in kept)
    sp.close()
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_crash_between_commits, args=(str(path),))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert shard_entries(path) == {0: 4}      # two linked, two orphans
    sp = Spool(path, map_size=MAP)
    try:
        sp.own_shard(0)                        # the next listener to own it
        assert {s.index: s.entries() for s in sp.shards.each()} == {0: 2}
        # Nothing acknowledged was lost, and new objects get keys past the orphans' gap.
        [res] = sp.put_many([obj("1.3", payload("1.3"))])
        assert not isinstance(res, BaseException)
        assert drain(sp) == {u: payload(u) for u in ("1.1", "1.2", "1.3")}
        assert sp.collect_garbage(force=True) == 3
        assert sp.object_count() == 0 and {s.index: s.entries() for s in sp.shards.each()} == {0: 0}
    finally:
        sp.close()


def test_delivered_bytes_go_only_when_every_destination_has_them(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", map_size=MAP)
    try:
        shard = sp.own_shard()
        [res] = sp.put_many([obj("2.1", payload("2.1"), dests=("a", "b"))])
        assert not isinstance(res, BaseException)
        rec = sp.record(res.oid)
        assert rec is not None and rec.extra["loc"] == [shard.index, 1]
        drain(sp, "a")
        assert sp.collect_garbage(force=True) == 0 and shard.entries() == 1    # b still needs it
        assert drain(sp, "b") == {"2.1": payload("2.1")}
        assert sp.object_count() == 0 and shard.entries() == 1
        assert sp.collect_garbage(force=True) == 1 and shard.entries() == 0
        assert sp.collect_garbage(force=True) == 0
        # A purge drops bytes the same way.
        [res] = sp.put_many([obj("2.2", payload("2.2"))])
        assert not isinstance(res, BaseException)
        assert sp.purge("a", ["pending"]) == [res.oid]
        assert sp.collect_garbage(force=True) == 1 and shard.entries() == 0
    finally:
        sp.close()


def test_large_objects_are_staged_into_the_shard_and_read_back(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", map_size=MAP)
    try:
        shard = sp.own_shard()
        big = os.urandom(2 * CHUNK + 1000)
        sid = b"\x00" * 12 + b"\x01" * 4
        owner = b"\x00" * 12
        for i in range(3):
            sp.stage_chunk(sid, i, big[i * CHUNK:(i + 1) * CHUNK], owner)
        with sp.env.begin() as txn:
            assert txn.stat(sp._dbs["chunk"])["entries"] == 0        # none in the shared env
        [res] = sp.put_many([Incoming(StagedData(sid, len(big), 3), TS, CT, "3.1", ("a",), {})])
        assert not isinstance(res, BaseException)
        assert sp.read(res.oid) == big                                # located by its record
        assert drain(sp) == {"3.1": big}
        assert sp.collect_garbage(force=True) == 1
        with shard.env.begin() as txn:
            assert txn.stat(shard.dbs["chunk"])["entries"] == 0
            assert txn.get(chunk_key(sid, 0), db=shard.dbs["chunk"]) is None
    finally:
        sp.close()


def test_a_spool_of_the_one_environment_layout_opens_and_drains_with_shards(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    old = Spool(path, map_size=MAP)             # no shard owned: the layout before shards
    try:
        assert all(not isinstance(r, BaseException)
                   for r in old.put_many([obj(f"4.{i}", payload(f"4.{i}")) for i in range(5)]))
    finally:
        old.close()
    sp = Spool(path, map_size=MAP)
    try:
        sp.own_shard()
        [res] = sp.put_many([obj("4.new", payload("4.new"))])
        assert not isinstance(res, BaseException)
        assert location_of(sp.env.begin().get(res.oid.to_bytes(8, "big"), db=sp._meta)) is not None
        assert drain(sp) == {u: payload(u) for u in [*(f"4.{i}" for i in range(5)), "4.new"]}
        sp.collect_garbage(force=True)
        assert sp.object_count() == 0
        with sp.env.begin() as txn:
            assert txn.stat(sp._dbs["obj"])["entries"] == 0         # old bytes deleted at settle
    finally:
        sp.close()


@pytest.mark.peers
def test_two_listeners_receive_several_associations_and_deliver_everything(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    # CT-sized (0.5 MB): their bytes go to the listeners' shards.
    batches = [synth.make_study(tmp_path / f"ct{i}", modality="CT", n_instances=40) for i in range(4)]
    pacs = storescp("PACS")
    r = router({"listeners": 2,
                "destinations": {"pacs": destination(pacs.port, "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda files: storescu(r.port, files), batches))
    for res in results:
        assert res.returncode == 0, res.stdout + res.stderr
    names = pacs.wait_for(160, timeout=120)
    assert len(names) == 160
    wait_until(lambda: r.queue()["pacs"]["delivered"] == 160, 30, message="not recorded")
    # Both listeners took a shard; the bytes of delivered objects are deleted by their owners.
    sp = Spool(r.spool_path, map_size=64 * 1024**3)
    try:
        assert sp.shards.indexes() == [0, 1]
        with sp.env.begin() as txn:       # every record here, every byte in a shard
            assert txn.stat(sp._dbs["meta"])["entries"] == 160 and txn.stat(sp._dbs["obj"])["entries"] == 0
        wait_until(lambda: sum(s.entries() for s in sp.shards.each()) == 0, 30,
                   message="delivered bytes were not collected")
        assert sp.object_count() == 0
    finally:
        sp.close()


def test_a_shard_without_owner_is_collected_by_the_supervisors_pass(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    sp = Spool(path, map_size=MAP, shard=3)      # a listener that will be gone (reload, crash)
    try:
        assert sp.shards.owner is not None and sp.shards.owner.index == 3
        assert all(not isinstance(r, BaseException)
                   for r in sp.put_many([obj(f"5.{i}", payload(f"5.{i}")) for i in range(3)]))
        assert len(drain(sp)) == 3
    finally:
        sp.close()                               # exits without collecting
    assert shard_entries(path) == {3: 3}
    other = ShardSet(path, MAP)
    try:
        other.take(3)                            # while a listener owns it, it is left alone
        sup = Spool(path, map_size=MAP)
        try:
            assert sup.collect_unowned() == 0
        finally:
            sup.close()
    finally:
        other.close()
    sup = Spool(path, map_size=MAP)
    try:
        assert sup.collect_unowned() == 1
        assert {s.index: s.entries() for s in sup.shards.each()} == {3: 0}
    finally:
        sup.close()


def test_objects_of_every_size_go_to_the_shard_with_their_journal_entry(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", map_size=MAP, shard=0)
    try:
        small, large = obj("6.1", payload("6.1", 100)), obj("6.2", payload("6.2", 70000))
        assert all(not isinstance(r, BaseException) for r in sp.put_many([small, large]))
        with sp.env.begin() as txn:
            assert txn.stat(sp._dbs["obj"])["entries"] == 0
        assert sp.shards.owner is not None and sp.shards.owner.entries() == 2
        assert drain(sp) == {"6.1": payload("6.1", 100), "6.2": payload("6.2", 70000)}
        assert sp.collect_garbage(force=True) == 2 and sp.object_count() == 0
        with sp.shards.owner.env.begin() as txn:          # journal entries go with their bytes
            assert txn.stat(sp.shards.owner.dbs["log"])["entries"] == 0
    finally:
        sp.close()


def test_bytes_of_a_failed_records_commit_are_undone_but_staged_chunks_kept(tmp_path: Path) -> None:
    """Commit (2) failing (a full shared map): the group's small bytes are removed at once; a
    staged object's chunks stay staged, for its retry or discard."""
    sp = Spool(tmp_path / "spool", map_size=MAP, shard=0)
    try:
        shard = sp.shards.owner
        assert shard is not None
        sid, owner = b"\x00" * 12 + b"\x02" * 4, b"\x00" * 12
        sp.stage_chunk(sid, 0, b"x" * 1000, owner)
        locs = shard.write([payload("7.1"), StagedData(sid, 1000, 1)])
        with shard.env.begin() as txn:
            assert txn.get(sid, db=shard.dbs["stage"]) is None         # linked to its key
        shard.unwrite(locs)
        assert shard.entries() == 0
        with shard.env.begin() as txn:
            assert txn.get(sid, db=shard.dbs["stage"]) == owner        # staged again
            assert txn.get(chunk_key(sid, 0), db=shard.dbs["chunk"]) == b"x" * 1000
    finally:
        sp.close()


@pytest.mark.peers
def test_spool_shards_off_writes_every_byte_into_the_shared_environment(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    files = synth.make_study(tmp_path / "ct", modality="CT", n_instances=5)
    pacs = storescp("PACS")
    r = router({"spool_shards": "off", "destinations": {"pacs": destination(pacs.port, "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    res = storescu(r.port, files)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(pacs.wait_for(5, timeout=60)) == 5
    wait_until(lambda: r.queue()["pacs"]["delivered"] == 5, 30, message="not recorded")
    sp = Spool(r.spool_path, map_size=64 * 1024**3)
    try:
        assert sp.shards.indexes() == [] and sp.object_count() == 0
    finally:
        sp.close()


def test_a_senders_threads_opening_one_shard_at_once_share_one_environment(tmp_path: Path) -> None:
    """A sender's worker threads read the same shard on first use together (the bench's four
    associations did): LMDB refuses a second open of one environment in a process, which
    failed an object ("already open in this process") before opening was serialised."""
    writer = ShardSet(tmp_path, MAP)
    writer.take(0)
    writer.close()
    for _ in range(20):
        readers = ShardSet(tmp_path, MAP)
        barrier = threading.Barrier(8)

        def open_it() -> object:
            barrier.wait()
            return readers.get(0)

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda _i: open_it(), range(8)))
        assert all(s is got[0] for s in got)
        readers.close()
