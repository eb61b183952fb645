"""A destination's sender loop against a real DCMTK storescp: commits per object, state file."""
from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pydicom
import pytest
import yaml

import peers
import synth
from fastroute.cli import read_part10
from fastroute.config import Config, loads
from fastroute.routing.schedule import PROGRESS_EVERY, DestinationSender
from fastroute.spool import Incoming, QueueState, Spool
from fastroute.spool.wakeup import Notifier
from peers import wait_until
from router import destination

def config(tmp_path: Path, port: int, **dest: Any) -> Config:
    doc = {"spool": str(tmp_path / "spool"), "spool_max_bytes": "256MiB",
           "destinations": {"pacs": destination(port, "PACS", **dest)}, "default": ["pacs"]}
    return loads(yaml.safe_dump(doc))


def queue_files(spool: Spool, files: list[Path]) -> None:
    items = []
    for f in files:
        ts, data = read_part10(f)
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        items.append(Incoming(data, ts, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ("pacs",),
                              {"calling_ae": "CT1"}))
    assert all(not isinstance(r, BaseException) for r in spool.put_many(items))


@contextlib.contextmanager
def running_sender(cfg: Config) -> Iterator[tuple[Spool, Notifier]]:
    """A destination's sender on its own thread, as ``workers.sender_main`` runs it."""
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, durable=False)
    sender = DestinationSender(cfg, cfg.destinations["pacs"], spool)
    thread = threading.Thread(target=sender.run, daemon=True)
    notifier = Notifier(cfg.spool)
    thread.start()
    try:
        wait_until(lambda: (cfg.spool / "run" / "pacs.state").exists(), 10, message="sender not up")
        yield spool, notifier
    finally:
        sender.stop()
        thread.join(30)
        notifier.close()
        spool.close()
    assert not thread.is_alive()


@pytest.mark.peers
def test_each_batch_costs_one_commit(tmp_path: Path,
                                     storescp: Callable[..., peers.StoreSCP]) -> None:
    """Settling a batch claims the next one in the same transaction: with one object a
    batch, N objects take about N commits, not 2N (each is a turn at the write lock the
    listeners' commits queue for)."""
    n = 20
    scp = storescp("PACS")
    cfg = config(tmp_path, scp.port, batch_size=1)
    files = synth.make_tiny(tmp_path / "t", n=n)
    with running_sender(cfg) as (spool, notifier):
        queue_files(spool, files)                 # a backlog, in one commit
        before = spool.env.info()["last_txnid"]
        notifier.notify("pacs")
        scp.wait_for(n, timeout=60)
        wait_until(lambda: spool.counters().get("delivered:pacs", 0) == n, 30,
                   message="deliveries not recorded")
        commits = spool.env.info()["last_txnid"] - before
        assert commits <= n + 3, f"{commits} commits for {n} objects"
        [st] = [s for s in spool.stats(["pacs"]) if s.destination == "pacs"]
        assert (st.pending, st.in_flight, st.delivered) == (0, 0, n)


@pytest.mark.peers
def test_caught_up_sender_records_each_delivery_with_the_next_claim(
        tmp_path: Path, storescp: Callable[..., peers.StoreSCP]) -> None:
    """Objects arriving one at a time (the sender has caught up): each delivery is recorded
    in the commit that claims the next object, so about one sender commit per object, not
    two; the last one is recorded within SETTLE_DELAY."""
    n = 20
    scp = storescp("PACS")
    cfg = config(tmp_path, scp.port)
    files = synth.make_tiny(tmp_path / "t", n=n)
    with running_sender(cfg) as (spool, notifier):
        before = spool.env.info()["last_txnid"]
        for f in files:      # the next one arrives while the last delivery is held
            queue_files(spool, [f])               # one commit, as a listener's
            notifier.notify("pacs")
            wait_until(lambda: not spool.entries("pacs", QueueState.PENDING), 10, interval=0.001,
                       message="sender did not take the object")
        scp.wait_for(n, timeout=30)
        wait_until(lambda: spool.counters().get("delivered:pacs", 0) == n, 10,
                   message="deliveries not recorded")
        commits = spool.env.info()["last_txnid"] - before - n     # the sender's own
        assert commits <= n + 5, f"{commits} sender commits for {n} objects"   # ~1.8n without the hold


def test_state_file_progress_is_throttled(tmp_path: Path) -> None:
    """Delivery counts reach the state file at most every PROGRESS_EVERY seconds, and an
    idle sender writes what is left once that interval has passed."""
    cfg = config(tmp_path, 1)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        (cfg.spool / "run").mkdir()
        sender = DestinationSender(cfg, cfg.destinations["pacs"], spool)
        state = cfg.spool / "run" / "pacs.state"

        def sent() -> int:
            return int(json.loads(state.read_text())["sent"])

        sender._progress(1)                      # nothing written for a while: at once
        assert sent() == 1
        sender._progress(1)
        sender._progress(1)
        assert sent() == 1                       # within the interval: held back
        wait = sender._flush_progress()
        assert wait is not None and 0 < wait <= PROGRESS_EVERY
        sender._progress_written -= PROGRESS_EVERY   # the interval has passed
        assert sender._flush_progress() is None and sent() == 3
        assert sender._flush_progress() is None      # nothing left to write
        sender._publish(state="backing_off")         # a change of state is never held back
        assert json.loads(state.read_text())["state"] == "backing_off"
    finally:
        spool.close()
