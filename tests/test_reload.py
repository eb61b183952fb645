"""Reload (SIGHUP): no association refused, idle associations kept, only changed processes restarted."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

import peers
import synth
from fastroute import reload
from fastroute.config import Config, load
from peers import storescu, wait_until
from router import Router, destination


# -- which processes a change touches (no peers) -------------------------------------------------

def test_every_config_key_is_classified() -> None:
    """A new key must say which processes read it (unclassified keys restart everything)."""
    assert {f.name for f in dataclasses.fields(Config)} == set(reload.READERS)


def _cfg(tmp_path: Path, **extra: Any) -> Config:
    import yaml
    doc = {"spool": str(tmp_path / "spool"),
           "destinations": {"a": {"ae_title": "A", "host": "127.0.0.1", "port": 1001},
                            "b": {"ae_title": "B", "host": "127.0.0.1", "port": 1002}},
           "rules": [{"name": "r", "send_to": ["a"]}], "http": {"port": 18080}, **extra}
    path = tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load(str(path))


def test_plan_restarts_only_what_reads_the_change(tmp_path: Path) -> None:
    base = _cfg(tmp_path)
    assert reload.plan(base, _cfg(tmp_path)).empty()
    alert = reload.plan(base, _cfg(tmp_path, alerts={"consecutive_failures": 7}))
    assert (alert.listeners, alert.restart, alert.start, alert.stop, alert.http) == ("", {}, [], [], "alerts")
    rule = reload.plan(base, _cfg(tmp_path, rules=[{"name": "r", "send_to": ["b"]}]))
    assert rule.listeners == "rules" and not rule.restart
    dests = {"a": {"ae_title": "A", "host": "127.0.0.1", "port": 1001},
             "b": {"ae_title": "B", "host": "127.0.0.1", "port": 2002},
             "c": {"ae_title": "C", "host": "127.0.0.1", "port": 1003}}
    one = reload.plan(base, _cfg(tmp_path, destinations=dests))
    assert (one.listeners, list(one.restart), one.start, one.stop) == ("", ["b"], ["c"], [])
    gone = reload.plan(base, _cfg(tmp_path, destinations={"a": dests["a"]}))
    assert (gone.restart, gone.stop) == ({}, ["b"])
    logs = reload.plan(base, _cfg(tmp_path, log_level="DEBUG"))
    assert logs.listeners and set(logs.restart) == {"a", "b"} and logs.http


def test_plan_restarts_the_senders_a_rule_modify_applies_to(tmp_path: Path) -> None:
    """A rule's ``modify`` runs in the senders of the destinations it sends to (issue 15): a
    change to it restarts those senders, and only those; a change elsewhere in the rule does not."""
    fix = [{"set": {"InstitutionName": "General Hospital"}}]
    base = _cfg(tmp_path, rules=[{"name": "r", "send_to": ["a"], "modify": fix}])
    same = reload.plan(base, _cfg(tmp_path, rules=[{"name": "r", "send_to": ["a"], "modify": fix}]))
    assert same.empty()
    other = [{"set": {"InstitutionName": "Other Hospital"}}]
    changed = reload.plan(base, _cfg(tmp_path, rules=[{"name": "r", "send_to": ["a"], "modify": other}]))
    assert changed.listeners == "rules" and list(changed.restart) == ["a"]
    assert "rules (modify)" in changed.restart["a"]
    moved = reload.plan(base, _cfg(tmp_path, rules=[{"name": "r", "send_to": ["b"], "modify": fix}]))
    assert set(moved.restart) == {"a", "b"}
    match = reload.plan(base, _cfg(tmp_path, rules=[{"name": "r", "match": {"Modality": "CT"},
                                                     "send_to": ["a"], "modify": fix}]))
    assert match.listeners == "rules" and not match.restart


# -- end to end ----------------------------------------------------------------------------------

def _started_pids(r: Router, name: str) -> list[int]:
    return [int(p) for p in re.findall(rf"started {re.escape(name)} \(pid (\d+)\)", r.log_text())]


def _sender_pid(r: Router, dest: str) -> int | None:
    try:
        return int(json.loads((r.spool_path / "run" / f"{dest}.state").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _hup(r: Router) -> None:
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)


def _alive(pid: int | None) -> bool:
    try:
        os.kill(pid or 0, 0) if pid else None
    except ProcessLookupError:
        return False
    return bool(pid)


@pytest.mark.peers
def test_reload_refuses_no_association_and_keeps_idle_ones(
        tmp_path: Path, router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    a, b = storescp("DESTA"), storescp("DESTB")
    r = router({"shutdown_grace": 30, "listeners": 2,
                "destinations": {"a": destination(a.port, "DESTA"), "b": destination(b.port, "DESTB")},
                "rules": [{"name": "all", "match": None, "send_to": ["a"]}]})
    old_listeners = _started_pids(r, "listener-0") + _started_pids(r, "listener-1")
    senders = {d: _sender_pid(r, d) for d in ("a", "b")}

    # An association opened before the reload that sends nothing until after it.
    idle_ae = AE(ae_title="IDLE")
    idle_ae.add_requested_context(CTImageStorage)
    idle = idle_ae.associate("127.0.0.1", r.port, ae_title="FASTROUTE")
    assert idle.is_established

    # Associations opened and released in a loop across the reload: none may be refused.
    attempts: list[bool] = []
    stop = threading.Event()

    def loop() -> None:
        ae = AE(ae_title="LOOPER")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 10
        deadline = time.monotonic() + 120          # bounded, whatever happens
        while not stop.is_set() and time.monotonic() < deadline:
            assoc = ae.associate("127.0.0.1", r.port, ae_title="FASTROUTE")
            ok = assoc.is_established and getattr(assoc.send_c_echo(), "Status", None) == 0
            if assoc.is_established:
                assoc.release()
            attempts.append(ok)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(attempts) >= 20, 30, message="the association loop did not start")
        r.write_config(rules=[{"name": "all", "match": None, "send_to": ["b"]}])
        _hup(r)
        # The old listeners stop listening (they are handing over), the new ones listen.
        def handed_over() -> bool:
            new = [p for p in _started_pids(r, "listener-0") + _started_pids(r, "listener-1")
                   if p not in old_listeners]
            return (len(new) == 2 and all(reload.listening(p, r.port) for p in new)
                    and not any(reload.listening(p, r.port) for p in old_listeners))
        wait_until(handed_over, 60, message=lambda: f"listeners not handed over:\n{r.log_tail()}")
        after = len(attempts)
        wait_until(lambda: len(attempts) >= after + 20, 30, message="no associations after the reload")
    finally:
        stop.set()
        thread.join(30)
    # With net.ipv4.tcp_migrate_req=0 (the kernel default) Linux resets a connection that is
    # still in the closing listener's accept queue at the instant it closes: measured about
    # once in 20 reloads under 3 looping clients (README, "Reload"). The router warns about the
    # setting at reload; here one such reset is tolerated, and none where the setting is on.
    migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    tolerated = 0 if migrate.exists() and migrate.read_text().strip() == "1" else 1
    assert attempts.count(False) <= tolerated, \
        f"{attempts.count(False)} of {len(attempts)} refused:\n{r.log_tail()}"

    # The idle association still works after the handover (the old listener finishes it).
    ds = pydicom.dcmread(synth.make_tiny(tmp_path / "idle", n=1)[0])
    status = idle.send_c_store(ds)
    assert getattr(status, "Status", None) == 0x0000, status
    idle.release()
    a.wait_for(1, timeout=30)                    # routed by the rule its listener ran with

    # New associations are routed by the new rule.
    files = synth.make_tiny(tmp_path / "after", n=5)
    res = storescu(r.port, files)
    assert res.returncode == 0, res.stdout + res.stderr
    b.wait_for(5, timeout=30)
    assert len(a.files()) == 1
    # A rule change restarts listeners only.
    assert {d: _sender_pid(r, d) for d in ("a", "b")} == senders
    assert all(_alive(p) for p in senders.values())
    assert "restarting listeners (rules" in r.log_text()


@pytest.mark.peers
def test_changing_one_destination_restarts_only_its_sender(
        router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    a, b, c = storescp("DESTA"), storescp("DESTB"), storescp("DESTC")
    dests = {"a": destination(a.port, "DESTA"), "b": destination(b.port, "DESTB"),
             "c": destination(c.port, "DESTC")}
    r = router({"destinations": dests, "rules": [{"name": "all", "match": None, "send_to": ["a"]}]})
    pids = {d: _sender_pid(r, d) for d in dests}
    listener = _started_pids(r, "listener-0")
    r.write_config(destinations={**dests, "b": destination(b.port, "DESTB", max_attempts=3)})
    _hup(r)
    wait_until(lambda: _sender_pid(r, "b") not in (None, pids["b"]), 30,
               message=lambda: f"sender-b was not restarted:\n{r.log_tail()}")
    for d in ("a", "c"):                                      # the same, still running process
        assert _sender_pid(r, d) == pids[d] and _alive(pids[d]), d
    assert _started_pids(r, "listener-0") == listener          # listeners untouched
    assert "sender-b (destinations.b)" in r.log_text()


@pytest.mark.peers
def test_reload_to_a_taken_port_is_refused_and_the_old_listener_keeps_serving(
        router: Callable[..., Router]) -> None:
    import socket
    r = router({"rules": []})
    listener = _started_pids(r, "listener-0")
    with socket.socket() as taken:                 # no SO_REUSEPORT: the new listener cannot join
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r.write_config(port=taken.getsockname()[1])
        _hup(r)
        wait_until(lambda: "reload refused: the new listeners could not take over" in r.log_text(), 60,
                   message=lambda: f"no refusal logged:\n{r.log_tail()}")
    assert _started_pids(r, "listener-0")[0] == listener[0] and _alive(listener[0])
    assert reload.listening(listener[0], r.port)
    res = peers.echoscu(r.port)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.peers
def test_alert_threshold_restarts_only_the_http_process(
        router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP]) -> None:
    a = storescp("DESTA")
    r = router({"destinations": {"a": destination(a.port, "DESTA")},
                "rules": [{"name": "all", "match": None, "send_to": ["a"]}],
                "http": {"host": "127.0.0.1", "port": peers.free_port()},
                "alerts": {"consecutive_failures": 5}})
    wait_until(lambda: _started_pids(r, "http"), 30, message="no http process")
    http, listener, sender = _started_pids(r, "http"), _started_pids(r, "listener-0"), _sender_pid(r, "a")
    r.write_config(alerts={"consecutive_failures": 9})
    _hup(r)
    wait_until(lambda: len(_started_pids(r, "http")) == 2, 60,
               message=lambda: f"http not restarted:\n{r.log_tail()}")
    assert "restarting http (alerts)" in r.log_text()
    assert _started_pids(r, "listener-0") == listener and _alive(listener[0])
    assert _sender_pid(r, "a") == sender and _alive(sender)
