"""A destination's sender loop against a real DCMTK storescp: commits per object, state file."""
from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
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
from fastroute.ops import actions as ops
from fastroute.spool import Incoming, Outcome, OutcomeKind, QueueState, Spool
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


# -- backoff per destination, send-now, echo (issue 12 item 3) ------------------------------------

def sender_state(cfg: Config) -> dict[str, Any]:
    try:
        return dict(json.loads((cfg.spool / "run" / "pacs.state").read_text()))
    except (OSError, ValueError):
        return {}


def backing_off(cfg: Config) -> bool:
    st = sender_state(cfg)
    return st.get("state") == "backing_off" and st.get("consecutive_failures", 0) >= 1


def hold_in_retry(spool: Spool, seconds: float) -> int:
    """Claim one object and settle it as a transient failure due ``seconds`` from now: an
    object waiting out its own backoff, as after a 0xA700 or an outcome unknown."""
    [item], _ = spool.claim("pacs", 1)
    spool.settle("pacs", [Outcome(item.oid, OutcomeKind.RETRY, status=0xA700, error="out of resources",
                                  next_at=time.time() + seconds)])
    return item.oid


@pytest.mark.peers
def test_send_now_ends_the_backoff_and_delivers_at_once(
        tmp_path: Path, storescp: Callable[..., peers.StoreSCP]) -> None:
    """Destination down -> backoff of a minute -> PACS back -> send-now: everything, the
    object waiting out its own retry delay too, arrives within seconds (audited)."""
    port = peers.free_port()
    cfg = config(tmp_path, port, backoff_initial=60, backoff_max=300)
    files = synth.make_tiny(tmp_path / "t", n=3)
    with running_sender(cfg) as (spool, notifier):
        queue_files(spool, files)
        held = hold_in_retry(spool, 600)
        notifier.notify("pacs")
        wait_until(lambda: backing_off(cfg), 10, message="sender did not back off")
        assert sender_state(cfg)["retry_at"] > time.time() + 20
        scp = storescp("PACS", port=port)
        assert scp.port == port
        started = time.monotonic()
        result = ops.send_now(cfg, spool, "pacs", who="erin", why="PACS is back")
        assert result["made_due"] == 1 and result["destinations"][0]["was"] == "backing_off"
        scp.wait_for(3, timeout=5)
        assert time.monotonic() - started < 5
        wait_until(lambda: sender_state(cfg).get("state") == "up", 5, message="state not up")
        assert sender_state(cfg)["consecutive_failures"] == 0
        assert spool.entry("pacs", held) is None or spool.entry("pacs", held).state != QueueState.PENDING  # type: ignore[union-attr]
        ev = [e for e in spool.audit_events() if e["action"] == "send_now"]
        assert len(ev) == 1 and (ev[0]["who"], ev[0]["why"], ev[0]["count"]) == ("erin", "PACS is back", 1)


@pytest.mark.peers
def test_successful_echo_ends_the_backoff(tmp_path: Path, storescp: Callable[..., peers.StoreSCP]) -> None:
    """``fastroute echo`` (another process) succeeding tells the sender: it sends at once."""
    port = peers.free_port()
    cfg = config(tmp_path, port, backoff_initial=60, backoff_max=300)
    path = tmp_path / "fastroute.yaml"
    path.write_text(yaml.safe_dump({"spool": str(cfg.spool), "spool_max_bytes": "256MiB",
                                    "destinations": {"pacs": destination(port, "PACS")}, "default": ["pacs"]}))
    files = synth.make_tiny(tmp_path / "t", n=2)
    with running_sender(cfg) as (spool, notifier):
        queue_files(spool, files)
        notifier.notify("pacs")
        wait_until(lambda: backing_off(cfg), 10, message="sender did not back off")
        scp = storescp("PACS", port=port)
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "fastroute", "echo", "-c", str(path), "pacs"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "told to end any backoff" in out.stdout
        scp.wait_for(2, timeout=5)
        assert time.monotonic() - started < 8     # the interpreter's start included, not 60 s
        wait_until(lambda: sender_state(cfg).get("consecutive_failures") == 0, 5, message="streak kept")


@pytest.mark.peers
def test_pause_and_resume_wake_the_sender(tmp_path: Path, storescp: Callable[..., peers.StoreSCP]) -> None:
    """A pause shows at once; a resume ends the backoff: the queue goes out in seconds."""
    port = peers.free_port()
    cfg = config(tmp_path, port, backoff_initial=60, backoff_max=300)
    files = synth.make_tiny(tmp_path / "t", n=2)
    with running_sender(cfg) as (spool, notifier):
        queue_files(spool, files)
        notifier.notify("pacs")
        wait_until(lambda: backing_off(cfg), 10, message="sender did not back off")
        ops.set_paused(cfg, spool, "pacs", True, who="erin")
        wait_until(lambda: sender_state(cfg).get("state") == "paused", 3, message="pause not noticed")
        scp = storescp("PACS", port=port)
        ops.set_paused(cfg, spool, "pacs", False, who="erin")
        scp.wait_for(2, timeout=5)


def test_two_associations_count_one_failure_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Both association threads fail in each round of a destination down; the streak grows
    by one per round and each failure is logged once (it doubled before)."""
    cfg = config(tmp_path, peers.free_port(), max_associations=2, batch_size=1,
                 backoff_initial=0.2, backoff_max=0.4)
    files = synth.make_tiny(tmp_path / "t", n=4)
    caplog.set_level(logging.DEBUG, logger="fastroute.schedule")
    with running_sender(cfg) as (spool, notifier):
        queue_files(spool, files)
        notifier.notify("pacs")
        wait_until(lambda: sender_state(cfg).get("consecutive_failures", 0) >= 4, 20,
                   message="not enough rounds of failures")
        msgs = [r.getMessage() for r in caplog.records if r.name == "fastroute.schedule"]
    counted = [int(m.split("(failure ")[1].split()[0]) for m in msgs if "(failure " in m]
    assert counted[:4] == [1, 2, 3, 4], msgs          # one per round, never two with the same number
    assert len(counted) == len(set(counted))
    assert any("same outage" in m for m in msgs), msgs   # the second thread did fail, and joined
