"""Shared fixtures: real peers (DCMTK, Orthanc), the fault proxy, synthetic studies.

Missing peers skip their tests on a developer machine but FAIL under CI=true, so CI can never
go green by silently skipping the integration suite. Every peer a fixture starts is stopped
by PID at teardown and checked to be gone; the session ends by asserting that no peer process
is alive and no port handed out by free_port() is still listening.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import faultproxy
import peers
import pytest
import synth
from router import Router

IN_CI = os.environ.get("CI", "").lower() == "true"
PEER_FIXTURES = {"dcmtk", "orthanc", "storescp", "dcmrecv"}


def unavailable(reason: str) -> NoReturn:
    """Skip locally; fail in CI, where every peer must be installed."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: missing peers fail instead of skipping)",
                    pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use a real peer are integration tests: mark them ``peers``."""
    for item in items:
        if PEER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.peers)


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_peers() -> Iterator[None]:
    """At session end nothing we started may survive or listen (cleaned up, then failed)."""
    yield
    leaked = peers.live_processes()
    described = [p.describe() for p in leaked]
    for proc in leaked:
        proc.kill()
    listening = peers.leaked_listeners(peers.issued_ports())
    assert not described, f"peer processes left running: {described}"
    assert not listening, f"ports from free_port() still listening: {listening}"


@pytest.fixture(scope="session")
def peer_check() -> peers.PeerCheck:
    return peers.PeerCheck.probe()


@pytest.fixture(scope="session")
def dcmtk(peer_check: peers.PeerCheck) -> dict[str, Path]:
    """Absolute paths of the DCMTK tools (never the pynetdicom scripts of the same name)."""
    if peer_check.dcmtk_missing:
        unavailable(peer_check.dcmtk_missing)
    return {name: peers.dcmtk_tool(name) for name in peers.DCMTK_TOOLS}


@pytest.fixture(scope="session")
def orthanc(peer_check: peers.PeerCheck,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Orthanc]:
    """One Orthanc for the session (starting is fast, a graceful stop takes ~3 s).

    Shared: tests must look instances up by their own (fresh) UIDs, or call ``clear()``.
    """
    if peer_check.orthanc_missing:
        unavailable(peer_check.orthanc_missing)
    server = peers.Orthanc("ORTHANC", workdir=tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()
    assert not server.running() and not peers.is_listening(server.dicom_port)


def _stop_all(started: list[Any]) -> None:
    errors = []
    for peer in started:
        try:
            peer.stop()
        except peers.PeerLeak as exc:
            errors.append(str(exc))
    assert not errors, f"leaked peers: {errors}"
    for peer in started:
        assert not peer.running(), f"{peer.name} pid {peer.pid} still running"
        assert not peers.is_listening(peer.port), f"{peer.name} port {peer.port} still open"


@pytest.fixture
def storescp(dcmtk: dict[str, Path], tmp_path: Path) -> Iterator[Callable[..., peers.StoreSCP]]:
    """Factory: ``storescp(ae_title="DEST", **options)`` starts one more DCMTK storescp.

    Call it N times for N destinations; all are stopped and leak-checked at teardown.
    """
    started: list[peers.StoreSCP] = []

    def start(ae_title: str = "STORESCP", **options: Any) -> peers.StoreSCP:
        scp = peers.StoreSCP(ae_title, workdir=tmp_path / f"storescp{len(started)}", **options)
        started.append(scp)
        scp.start()
        return scp

    yield start
    _stop_all(started)


@pytest.fixture
def dcmrecv(dcmtk: dict[str, Path], tmp_path: Path) -> Iterator[Callable[..., peers.DcmRecv]]:
    """Factory like ``storescp`` for DCMTK dcmrecv."""
    started: list[peers.DcmRecv] = []

    def start(ae_title: str = "DCMRECV", **options: Any) -> peers.DcmRecv:
        scp = peers.DcmRecv(ae_title, workdir=tmp_path / f"dcmrecv{len(started)}", **options)
        started.append(scp)
        scp.start()
        return scp

    yield start
    _stop_all(started)


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., faultproxy.FaultProxy]]:
    """Factory: ``fault_proxy(target_port, fault=Fault(...))`` -> a started proxy."""
    started: list[faultproxy.FaultProxy] = []

    def start(target_port: int, **options: Any) -> faultproxy.FaultProxy:
        proxy = faultproxy.FaultProxy(target_port, **options)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()
        assert not peers.is_listening(proxy.port), f"fault proxy port {proxy.port} still open"


@pytest.fixture
def synth_study(tmp_path: Path) -> Callable[..., list[Path]]:
    """Factory: ``synth_study(**make_study_options)`` writes a fresh study under tmp_path."""
    count = 0

    def make(**options: Any) -> list[Path]:
        nonlocal count
        count += 1
        return synth.make_study(tmp_path / f"study{count}", **options)

    return make


@pytest.fixture(scope="session")
def pydicom_data_dir() -> Path:
    """The pydicom-data files (``data_store``): real compressed and big-endian objects."""
    try:
        import data_store
    except ImportError:
        unavailable("pydicom-data is not installed (pip install pydicom-data)")
    return Path(data_store.__file__).parent / "data"


@pytest.fixture
def router(tmp_path: Path, dcmtk: Any) -> Iterator[Callable[..., Router]]:
    """Factory: ``router(config)`` -> a started ``fastroute serve`` (``start=False``: only
    configured; ``name``: a second router's folder); stopped (gracefully) at teardown."""
    started: list[Router] = []

    def make(config: dict[str, Any], start: bool = True, name: str = "router") -> Router:
        r = Router(tmp_path / name, config)
        started.append(r)
        return r.start() if start else r

    yield make
    for r in started:
        if r.proc is not None:
            r.stop()
