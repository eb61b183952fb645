"""Issue 11 item 4: the free-space floor clears once the queue drains, warnings for limits the
disk cannot honour, and a sender that survives a full disk (ENOSPC on its commits)."""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import lmdb
import pytest
import yaml

import peers
import synth
from fastroute.cli import main as cli_main
from fastroute.config import Config, loads
from fastroute.errors import SpoolFullError
from fastroute.routing.schedule import DestinationSender
from fastroute.spool import Incoming, Outcome, OutcomeKind, QueueState, Spool
from fastroute.spool.space import space_warnings
from fastroute.spool.wakeup import Notifier
from peers import wait_until
from router import destination
from test_schedule import queue_files

TS = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MiB = 1024**2


def obj(uid: str, size: int = MiB) -> Incoming:
    return Incoming(bytes(size), TS, CT, uid, ("a",), {"calling_ae": "CT1"})


def test_floor_reached_refused_drained_accepted_again(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that only the spool writes to: free space falls as the spool file grows and never
    comes back (LMDB does not shrink its file). After the backlog is delivered its pages are
    free for reuse, so the router accepts again; before the fix it refused (0xA700) for good."""
    sp = Spool(tmp_path / "s", map_size=256 * MiB, min_free_bytes=1)
    data = tmp_path / "s" / "data.mdb"
    disk = 10 * 1024**3
    monkeypatch.setattr(sp.space, "free_bytes", lambda: disk - data.stat().st_size)
    sp.space.min_free_bytes = disk - data.stat().st_size - 24 * MiB   # room for ~24 objects
    sp.space.interval = 0.0      # as if objects came 100 ms apart: every one is checked
    try:
        accepted = 0
        refused: BaseException | None = None
        for i in range(64):
            [res] = sp.put_many([obj(f"1.{i}")])
            if isinstance(res, BaseException):
                refused = res
                break
            accepted += 1
        assert isinstance(refused, SpoolFullError) and "floor" in str(refused)
        assert 16 <= accepted < 30, accepted
        # Still refused while the backlog is there, whatever the 100 ms cache says.
        assert isinstance(sp.put_many([obj("2.0")])[0], SpoolFullError)
        size_full = data.stat().st_size
        claimed, _ = sp.claim("a", 1000)
        sp.settle("a", [Outcome(c.oid, OutcomeKind.DELIVERED, 0) for c in claimed])
        assert sp.object_count() == 0 and data.stat().st_size >= size_full   # the file did not shrink
        assert sp.space.free_bytes() - MiB < sp.min_free_bytes              # the disk alone: no room
        assert sp.reusable_bytes() >= accepted * MiB
        # Accepted again, and the objects go mostly into the reused pages.
        for i in range(accepted // 2):
            [res] = sp.put_many([obj(f"3.{i}")])
            assert not isinstance(res, BaseException), res
        assert data.stat().st_size - size_full < accepted // 2 * MiB / 2
    finally:
        sp.close()


def test_floor_is_cheap_when_the_disk_alone_is_enough(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard runs on the receive path: with room on the disk it reads no LMDB statistics,
    and it keeps its 100 ms cache (one statvfs for a burst)."""
    sp = Spool(tmp_path / "s", map_size=64 * MiB, min_free_bytes=1)
    calls = {"statvfs": 0, "reusable": 0}

    def free() -> int:
        calls["statvfs"] += 1
        return 10 * 1024**3

    def reusable() -> int:
        calls["reusable"] += 1
        return 0

    monkeypatch.setattr(sp.space, "free_bytes", free)
    monkeypatch.setattr(sp.space, "_reusable", reusable)
    try:
        for i in range(20):
            sp.check_space(MiB)
        assert calls == {"statvfs": 1, "reusable": 0}
    finally:
        sp.close()


def test_space_warnings(tmp_path: Path) -> None:
    import shutil
    disk = shutil.disk_usage(tmp_path)
    spool = tmp_path / "not-yet" / "spool"           # check runs before the spool exists
    assert space_warnings(spool, 1, 1024**2) == []
    [floor] = space_warnings(spool, disk.total + 1, 1024**2)
    assert "min_free_bytes" in floor and "exceeds the size of the disk" in floor
    [big] = space_warnings(spool, 1, disk.total * 4)
    assert "spool_max_bytes" in big and "free disk plus the spool file" in big


def test_check_warns_about_a_floor_above_the_disk(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    total = shutil.disk_usage(tmp_path).total
    path = tmp_path / "fastroute.yaml"
    path.write_text(yaml.safe_dump({"spool": str(tmp_path / "spool"), "spool_max_bytes": "64MiB",
                                    "min_free_bytes": total * 2}))
    assert cli_main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning: min_free_bytes" in out and "spool_max_bytes" not in out.split("warning:")[1]


# -- a full disk under the sender ------------------------------------------------------------

def sender_config(tmp_path: Path, port: int) -> Config:
    doc = {"spool": str(tmp_path / "spool"), "spool_max_bytes": "256MiB",
           "destinations": {"pacs": destination(port, "PACS", batch_size=4)}, "default": ["pacs"]}
    return loads(yaml.safe_dump(doc))


@contextlib.contextmanager
def running(cfg: Config) -> Iterator[tuple[Spool, DestinationSender, Notifier, threading.Thread]]:
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, durable=False)
    sender = DestinationSender(cfg, cfg.destinations["pacs"], spool)
    thread = threading.Thread(target=sender.run, daemon=True)
    notifier = Notifier(cfg.spool)
    thread.start()
    try:
        wait_until(lambda: (cfg.spool / "run" / "pacs.state").exists(), 10, message="sender not up")
        yield spool, sender, notifier, thread
    finally:
        sender.stop()
        thread.join(30)
        notifier.close()
        spool.close()
    assert not thread.is_alive()


@pytest.mark.peers
def test_sender_survives_enospc_in_settle_and_records_later(
        tmp_path: Path, storescp: Callable[..., peers.StoreSCP],
        caplog: pytest.LogCaptureFixture) -> None:
    """The issue's crash: ``settle`` raised lmdb.Error (ENOSPC), the sender exited, and on
    restart its in-flight objects, already delivered, were sent again. Now it logs, backs off,
    keeps the outcomes and records them once the disk has room: each object is sent once.
    (The first claims fail too, and the settles after the first delivered batch.)"""
    n = 12
    scp = storescp("PACS")
    cfg = sender_config(tmp_path, scp.port)
    files = synth.make_tiny(tmp_path / "t", n=n)
    with running(cfg) as (spool, sender, notifier, thread):
        failures = {"settle": 3, "claim": 2}

        def full_disk(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
            def write(*args: Any, **kw: Any) -> Any:
                if failures[name]:
                    failures[name] -= 1
                    raise lmdb.Error("mdb_txn_commit: No space left on device")
                return real(*args, **kw)
            return write

        spool.queues.settle = full_disk("settle", spool.queues.settle)   # type: ignore[method-assign]
        spool.queues.claim = full_disk("claim", spool.queues.claim)      # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="fastroute.schedule"):
            queue_files(spool, files)
            notifier.notify("pacs")
            scp.wait_for(n, timeout=60)
            wait_until(lambda: spool.counters().get("delivered:pacs", 0) == n, 60,
                       message="deliveries not recorded after the disk had room again")
        assert failures == {"settle": 0, "claim": 0} and thread.is_alive()
        assert sender.state.sent == n                       # nothing was sent twice
        [st] = [s for s in spool.stats(["pacs"]) if s.destination == "pacs"]
        assert (st.pending, st.in_flight, st.failed, st.delivered) == (0, 0, 0, n)
        assert not spool.entries("pacs", QueueState.FAILED)
        errors = [r.getMessage() for r in caplog.records if "spool write failed" in r.getMessage()]
        assert errors and all("destination=pacs ae=PACS" in e and "No space left" in e for e in errors)


@pytest.mark.peers
def test_supervisor_warns_at_start(tmp_path: Path, dcmtk: Any) -> None:
    """`fastroute serve` says at start that a floor above the disk's size refuses everything."""
    import shutil

    from router import Router
    total = shutil.disk_usage(tmp_path).total
    r = Router(tmp_path / "router", {"min_free_bytes": total + 1, "spool_prealloc": 0})
    try:
        r.start()
        log = r.log_text()
        assert "WARNING" in log and f"min_free_bytes ({total + 1} bytes) exceeds the size of the disk" in log
    finally:
        r.stop()
