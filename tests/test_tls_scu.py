"""DICOM TLS on the sending side (issue 14 section 1): fastroute as the TLS client of a
destination (DCMTK ``storescp +tls``, Orthanc with ``DicomTlsEnabled``) and of a source
(Orthanc's C-FIND over TLS), mutual authentication, each way verification fails named in the
error, the TLS send path byte-exact, and certificate expiry in /metrics and the alerts.

The PKI is bench/tlspki.py's (openssl command line).
"""
from __future__ import annotations

import datetime as dt
import json
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peers
import pytest
import synth
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import ImplicitVRLittleEndian

from bench.tlspki import Pki, issue_dated, make_pki
from fastroute.config import DestinationConfig, SourceConfig, TlsPeerConfig
from fastroute.dicom import scu
from fastroute.dicom.scu import AssociationFailed, Connection, StoreResult
from peers import wait_until
from qrpeers import register_modality
from router import Router
from router import destination as destination_yaml

StoreSCPFactory = Callable[..., peers.StoreSCP]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def body_of(path: Path) -> tuple[str, str, str, bytes]:
    """(SOP class, SOP instance, transfer syntax, dataset bytes as a C-STORE carries them)."""
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        return (str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                str(meta.TransferSyntaxUID), fp.read())


def tls_args(pki: Pki, server: str = "server", *, trust: str = "ca", peer_cert: str = "-rc") -> list[str]:
    """DCMTK server-side TLS options: our key and certificate, the CA client certificates
    must chain to, and whether one is required (-rc, DCMTK's default) or not (-ic)."""
    return ["+tls", str(pki.key(server)), str(pki.cert(server)), "+cf", str(pki.cert(trust)), peer_cert]


def tls_peer(pki: Pki, *, ca: str = "ca", client: str | None = "client", verify_hostname: bool = True) -> TlsPeerConfig:
    return TlsPeerConfig(ca=pki.cert(ca), cert=pki.cert(client) if client else None,
                         key=pki.key(client) if client else None, verify_hostname=verify_hostname)


def destination(port: int, tls: TlsPeerConfig | None, *, host: str = "localhost", ae_title: str = "DEST",
                **options: Any) -> DestinationConfig:
    options.setdefault("dimse_timeout", 30.0)
    options.setdefault("acse_timeout", 10.0)
    return DestinationConfig(name="dest", ae_title=ae_title, host=host, port=port, tls=tls, **options)


def store(conn: Connection, body: tuple[str, str, str, bytes]) -> StoreResult:
    sop_class, sop_uid, ts, data = body
    conn.ensure({(sop_class, ts)})
    cx = conn.context_for(sop_class, ts)
    assert cx is not None, f"{sop_class} in {ts} not accepted"
    return conn.send_raw(cx, sop_class, sop_uid, memoryview(data))


# -- the send path over TLS, against DCMTK storescp +tls ------------------------------------------

@pytest.mark.parametrize("peer_max_pdu", [None, 16384, 4096])
def test_mutual_tls_bytes_arrive_exactly_as_sent(storescp: StoreSCPFactory, pki: Pki,
                                                 synth_study: Callable[..., list[Path]],
                                                 peer_max_pdu: int | None) -> None:
    """Tiny and multi-MB objects over one mutual-TLS association, in PDUs of the record size,
    smaller and larger: storescp +B writes what arrived, which must be what was sent (the
    gathering of headers into records must not reorder, drop or repeat a byte)."""
    files = synth_study(n_instances=3, tiny=True)
    files += synth_study(n_instances=1, rows=1024, cols=1024, transfer_syntax=ImplicitVRLittleEndian)
    bodies = [body_of(f) for f in files]
    assert max(len(b[3]) for b in bodies) > 2_000_000
    scp = storescp("DEST", bit_preserving=True, max_pdu=peer_max_pdu, extra_args=tls_args(pki))
    conn = Connection(destination(scp.port, tls_peer(pki)), "FASTROUTE")
    assoc = conn.ensure({(b[0], b[2]) for b in bodies})
    assert assoc.tls and "(TLS)" in assoc.where
    for body in bodies:
        assert store(conn, body) == StoreResult(0, "")
    # a chunked spool object (pages as a list of views; a PDV spans two of them)
    sop_class, sop_uid, ts, data = bodies[-1]
    cuts = [0, 1, 16373, len(data) // 2 + 7, len(data)]
    parts = [memoryview(data)[a:b] for a, b in zip(cuts, cuts[1:])]
    cx = conn.context_for(sop_class, ts)
    assert cx is not None
    assert conn.send_raw(cx, sop_class, sop_uid, parts) == StoreResult(0, "")
    assert conn.assoc is assoc, "the association was not reused"
    assert conn.usable(), "an idle TLS association (session tickets read) taken as closed"
    assert conn.assoc is assoc
    conn.release()
    scp.wait_for(len(bodies), timeout=30)
    for sop_class, sop_uid, ts, data in bodies:
        received = scp.file_for(sop_uid)
        assert received is not None, f"{sop_uid} not received"
        assert body_of(received) == (sop_class, sop_uid, ts, data), f"{sop_uid}: bytes differ"


def test_next_association_resumes_the_tls_session(storescp: StoreSCPFactory, pki: Pki) -> None:
    """A PACS that ends every association: the second one resumes the TLS session (no
    certificate exchange), and C-ECHO works on it."""
    scp = storescp("DEST", extra_args=tls_args(pki))
    conn = Connection(destination(scp.port, tls_peer(pki)), "FASTROUTE")
    reused = []
    for _ in range(3):
        assoc = conn.ensure({("1.2.840.10008.1.1", "1.2.840.10008.1.2")})
        assert isinstance(assoc.sock, ssl.SSLSocket)
        reused.append(assoc.sock.session_reused)
        assert conn.echo() == 0
        conn.release()
    assert reused == [False, True, True], reused


def test_peer_ending_an_idle_tls_association_is_noticed_before_sending(pki: Pki) -> None:
    """A TLS peer that ends an idle association (pynetdicom with a 1 s network timeout: an
    A-ABORT inside TLS, then the close; DCMTK's storescp keeps idle associations): the idle
    check reads it through TLS and ensure() associates again."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from fastroute.config import TlsListenerConfig
    from fastroute.dicom import tls
    ae = AE(ae_title="DEST")
    ae.add_supported_context(Verification)
    ae.network_timeout = 1.0
    ctx = tls.server_context(TlsListenerConfig(cert=pki.cert("server"), key=pki.key("server"),
                                               ca=pki.cert("ca")))
    port = peers.free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ctx)
    try:
        conn = Connection(destination(port, tls_peer(pki)), "FASTROUTE")
        pair = {("1.2.840.10008.1.1", "1.2.840.10008.1.2")}
        first = conn.ensure(pair)
        assert first.tls and conn.echo() == 0
        wait_until(lambda: not conn.usable(), 15, message="the peer's abort was not noticed")
        assert conn.assoc is None and not first.is_established
        second = conn.ensure(pair)
        assert second is not first and conn.echo() == 0
        conn.release()
    finally:
        server.shutdown()


def test_send_tls_gathers_headers_into_records() -> None:
    """The gathering itself: every byte in order, records full except the last of a message,
    and a long payload's whole-record middle handed over as a view of its own memory. (Why
    gather: bench/tls_send.py — a sendall per buffer ran at a quarter of the speed with 4 KiB
    PDUs.)"""
    writes: list[bytes | bytearray | memoryview] = []

    class Sock:
        def sendall(self, data: bytes | bytearray | memoryview) -> None:
            writes.append(data if isinstance(data, memoryview) else bytes(data))

    big = bytes(range(256)) * 400                       # 102400 bytes
    buffers: list[bytes | memoryview] = [b"H" * 12, b"c" * 70, b"H" * 12, memoryview(big),
                                         b"H" * 12, b"tail"]
    sent = [0]
    scu._send_tls(Sock(), buffers, sent)  # type: ignore[arg-type]
    joined = b"".join(bytes(w) for w in writes)
    assert joined == b"".join(bytes(b) for b in buffers)
    assert sent[0] == len(joined)
    assert all(len(w) % scu.TLS_RECORD == 0 for w in writes[:-1])
    views = [w for w in writes if isinstance(w, memoryview)]
    assert views and views[0].obj is big, "the large payload was copied"
    assert len(writes) == 3, [len(w) for w in writes]
    # many small PDUs: gathered into TLS_GATHER-sized writes, not one write per header
    writes.clear()
    small: list[bytes | memoryview] = [b"H" * 12, b"p" * 4090] * 64
    scu._send_tls(Sock(), small, [0])
    assert b"".join(bytes(w) for w in writes) == b"".join(bytes(b) for b in small)
    assert len(writes) <= 5, [len(w) for w in writes]


def test_wrong_ca_names_the_failed_check(storescp: StoreSCPFactory, pki: Pki) -> None:
    """A server certificate from a CA we do not trust: AssociationFailed names the peer and
    the X.509 check that failed; nothing reaches the upper layer."""
    scp = storescp("DEST", extra_args=tls_args(pki, "stranger", trust="ca"))
    conn = Connection(destination(scp.port, tls_peer(pki)), "FASTROUTE")
    with pytest.raises(AssociationFailed) as err:
        conn.ensure({("1.2.840.10008.1.1", "1.2.840.10008.1.2")})
    msg = str(err.value)
    assert f"FASTROUTE -> DEST@localhost:{scp.port} (TLS)" in msg
    assert "certificate verify failed: unable to get local issuer certificate" in msg, msg


def test_expired_server_certificate_named(storescp: StoreSCPFactory, pki: Pki) -> None:
    issue_dated(pki, "expired", "localhost", "20200101000000Z", "20210101000000Z")
    scp = storescp("DEST", extra_args=tls_args(pki, "expired"))
    ok, words = scu.echo(destination(scp.port, tls_peer(pki)), "FASTROUTE")
    assert not ok
    assert "certificate verify failed: certificate has expired (X509 verify code 10)" in words, words


def test_hostname_checked_unless_turned_off(storescp: StoreSCPFactory, pki: Pki) -> None:
    scp = storescp("DEST", extra_args=tls_args(pki, "wronghost"))
    conn = Connection(destination(scp.port, tls_peer(pki)), "FASTROUTE")
    with pytest.raises(AssociationFailed, match=r"certificate verify failed: Hostname mismatch.*'localhost'"):
        conn.ensure({("1.2.840.10008.1.1", "1.2.840.10008.1.2")})
    ok, words = scu.echo(destination(scp.port, tls_peer(pki, verify_hostname=False)), "FASTROUTE")
    assert ok and words == f"C-ECHO FASTROUTE -> DEST@localhost:{scp.port} (TLS): success", words


def test_server_refuses_a_missing_client_certificate(storescp: StoreSCPFactory, pki: Pki) -> None:
    """TLS 1.3: the client's handshake ends before the server checks our (absent) certificate;
    its alert arrives on the first read and is named as such."""
    scp = storescp("DEST", extra_args=tls_args(pki))
    ok, words = scu.echo(destination(scp.port, tls_peer(pki, client=None)), "FASTROUTE")
    assert not ok
    assert f"DEST@localhost:{scp.port} (TLS)" in words
    # the alert itself, or the reset that can overtake it
    assert ("the peer refused our certificate" in words
            or "it may refuse our client certificate (we presented none)" in words), words
    ok, words = scu.echo(destination(scp.port, tls_peer(pki)), "FASTROUTE")
    assert ok, words


def test_plain_peer_on_a_tls_destination(storescp: StoreSCPFactory, pki: Pki) -> None:
    scp = storescp("DEST")
    ok, words = scu.echo(destination(scp.port, tls_peer(pki), acse_timeout=5.0), "FASTROUTE")
    assert not ok and "TLS handshake with FASTROUTE -> DEST@localhost" in words, words


def test_missing_file_named(pki: Pki, tmp_path: Path) -> None:
    cfg = TlsPeerConfig(ca=tmp_path / "nope.pem")
    ok, words = scu.echo(destination(peers.free_port(), cfg), "FASTROUTE")
    assert not ok
    assert words == (f"TLS to FASTROUTE -> DEST@localhost:{peers_port(words)} not possible: "
                     f"tls.ca {tmp_path / 'nope.pem'}: no such file"), words


def peers_port(words: str) -> str:
    return words.split("@localhost:")[1].split(" ")[0]


# -- the router: a TLS destination, and one whose CA is wrong -----------------------------------

def tls_yaml(pki: Pki, *, ca: str = "ca", client: str | None = "client") -> dict[str, Any]:
    out: dict[str, Any] = {"ca": str(pki.cert(ca))}
    if client:
        out.update(cert=str(pki.cert(client)), key=str(pki.key(client)))
    return out


def test_router_delivers_over_mutual_tls_and_backs_off_on_a_wrong_ca(
        tmp_path: Path, router: Callable[..., Router], storescp: StoreSCPFactory, pki: Pki) -> None:
    """One router, two TLS destinations: ``pacs`` (our CA) receives everything; ``bad`` trusts
    another CA, so its sender backs off with the failed check as its last error, and the
    objects wait in its queue (none failed: the destination is down, not the objects)."""
    files = synth.make_tiny(tmp_path / "t", n=3)
    good = storescp("PACS", extra_args=tls_args(pki))
    bad = storescp("BAD", extra_args=tls_args(pki))
    r = router({"destinations": {
        "pacs": destination_yaml(good.port, "PACS", host="localhost", tls=tls_yaml(pki)),
        "bad": destination_yaml(bad.port, "BAD", host="localhost", tls=tls_yaml(pki, ca="otherca"),
                                backoff_initial=0.2, backoff_max=1)},
        "rules": [{"name": "all", "match": None, "send_to": ["pacs", "bad"]}]})
    res = peers.storescu(r.port, files)
    assert res.returncode == 0, res.stderr
    good.wait_for(3, timeout=60)
    wait_until(lambda: r.queue()["pacs"]["delivered"] == 3, 30, message="pacs: not all delivered")
    wait_until(lambda: r.queue()["bad"]["state"]["state"] == "backing_off", 30,
               message="bad: never backed off")
    q = r.queue()["bad"]
    assert q["failed"] == 0 and q["delivered"] == 0 and q["pending"] + q["in_flight"] == 3
    error = q["state"]["last_error"]
    assert f"BAD@localhost:{bad.port} (TLS)" in error, error
    # DCMTK sends its CA along with its certificate: the chain ends in a root we do not trust
    assert "certificate verify failed: self-signed certificate in certificate chain" in error, error
    assert not bad.receptions()
    assert f"destination bad: BAD@localhost:{bad.port} (1 association, TLS)" in r.log_text()


# -- Orthanc with DicomTlsEnabled: a TLS destination and a TLS source (C-FIND) --------------------

ORTHANC_TLS_SINCE = (1, 9, 0)      # DicomTlsEnabled and its keys (Orthanc 1.9.0 release notes)


def _orthanc_version() -> tuple[int, ...] | None:
    try:
        out = subprocess.run([str(peers.orthanc_binary()), "--version"], capture_output=True,
                             text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.split()[1] if len(out.split()) > 1 else ""
    try:
        return tuple(int(p) for p in first.split("."))
    except ValueError:
        return None


@pytest.fixture(scope="module")
def tls_orthanc(peer_check: peers.PeerCheck, pki: Pki,
                tmp_path_factory: pytest.TempPathFactory) -> Any:
    if peer_check.orthanc_missing:
        pytest.skip(peer_check.orthanc_missing)
    version = _orthanc_version()
    if version is None or version < ORTHANC_TLS_SINCE:
        pytest.skip(f"Orthanc {version} has no DICOM TLS (DicomTlsEnabled came in 1.9.0)")
    server = peers.Orthanc("ORTHANCTLS", workdir=tmp_path_factory.mktemp("orthanc-tls"), extra_config={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.cert("server")),
        "DicomTlsPrivateKey": str(pki.key("server")),
        "DicomTlsTrustedCertificates": str(pki.cert("ca")),
        "DicomTlsRemoteCertificateRequired": True,
    })
    server.start()
    yield server
    server.stop()
    assert not server.running() and not peers.is_listening(server.dicom_port)


def test_orthanc_tls_destination_and_source(tls_orthanc: Any, pki: Pki,
                                            synth_study: Callable[..., list[Path]]) -> None:
    """Store into Orthanc over mutual TLS, then find the study back from it as a TLS source
    (Study Root C-FIND): both directions of the Q/R client run over the same TLS path."""
    from fastroute.dicom.qr import Level, QueryRetrieveClient
    files = synth_study(n_instances=2, tiny=True)
    bodies = [body_of(f) for f in files]
    dest = destination(tls_orthanc.dicom_port, tls_peer(pki), ae_title="ORTHANCTLS")
    conn = Connection(dest, "FASTROUTE")
    for body in bodies:
        assert store(conn, body) == StoreResult(0, "")
    conn.release()
    for _, sop_uid, _, _ in bodies:
        tls_orthanc.wait_for_instance(sop_uid)
    import pydicom
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    source = SourceConfig(name="arch", ae_title="ORTHANCTLS", host="localhost",
                          port=tls_orthanc.dicom_port, tls=tls_peer(pki), acse_timeout=10.0,
                          dimse_timeout=30.0)
    register_modality(tls_orthanc, "fastroute", "FASTROUTE", peers.free_port())  # may C-FIND
    with QueryRetrieveClient(source, "FASTROUTE") as qr:
        assert qr.conn.assoc is None
        found = list(qr.find(Level.IMAGE, {"StudyInstanceUID": study_uid, "SOPInstanceUID": ""}))
        assert qr.conn.assoc is not None and qr.conn.assoc.tls
    assert sorted(str(ds.SOPInstanceUID) for ds in found) == sorted(b[1] for b in bodies)

    # C-GET over TLS: Orthanc's C-STOREs arrive on our TLS association and are answered on it
    from fastroute.dicom.dimse import Message, Peer, Reply
    from fastroute.dicom.status import Status
    got: dict[str, bytes] = {}

    def keep(peer: Peer, msg: Message) -> Reply:
        got[msg.sop_instance_uid] = bytes(msg.data or b"")
        return Reply(Status.SUCCESS)

    storage = sorted({(b[0], (b[2],)) for b in bodies})
    with QueryRetrieveClient(source, "FASTROUTE", store=keep, storage=storage) as qr:
        result = qr.get({"StudyInstanceUID": study_uid})
        assert result.status == Status.SUCCESS, result
        assert qr.conn.assoc is not None and qr.conn.assoc.tls
    assert got == {b[1]: b[3] for b in bodies}, "C-GET over TLS: not the bytes stored"


def test_orthanc_refuses_a_client_without_a_certificate(tls_orthanc: Any, pki: Pki) -> None:
    ok, words = scu.echo(destination(tls_orthanc.dicom_port, tls_peer(pki, client=None),
                                     ae_title="ORTHANCTLS"), "FASTROUTE")
    assert not ok
    assert ("the peer refused our certificate" in words
            or "it may refuse our client certificate (we presented none)" in words), words
    ok, words = scu.echo(destination(tls_orthanc.dicom_port, tls_peer(pki), ae_title="ORTHANCTLS"),
                         "FASTROUTE")
    assert ok, words


# -- certificate expiry: /metrics, the alert, the webhook ------------------------------------------

def expiry_config(tmp_path: Path, pki: Pki, dest_cert: str, *, extra: str = "") -> Any:
    from fastroute.config import loads
    return loads(f"""
spool: {tmp_path / 'spool'}
tls: {{cert: {pki.cert('server')}, key: {pki.key('server')}, ca: {pki.cert('ca')}}}
http: {{token: s3cret}}
destinations:
  pacs:
    ae_title: PACS
    host: localhost
    port: 2762
    tls: {{ca: {pki.cert('ca')}, cert: {pki.cert(dest_cert)}, key: {pki.key(dest_cert)}}}
  plain: {{ae_title: PLAIN, host: localhost, port: 104}}
sources:
  arch: {{ae_title: ARCH, host: localhost, port: 2762, tls: {{ca: {pki.cert('otherca')}}}}}
{extra}""")


def test_expiry_days_per_configured_certificate_in_metrics(tmp_path: Path, pki: Pki) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from fastroute.ops.metrics import make_registry, render
    from fastroute.spool import Spool
    pki.issue("soon", "soon.fastroute.test", days=10, san="DNS:soon.fastroute.test")
    cfg = expiry_config(tmp_path, pki, "soon")
    spool = Spool(cfg.spool, map_size=64 * 1024**2)
    try:
        text = render(make_registry(cfg, spool)).decode()
    finally:
        spool.close()
    fam = {f.name: f for f in text_string_to_metric_families(text)}["fastroute_tls_certificate_expiry_days"]
    got = {(s.labels["role"], s.labels["name"], s.labels["subject"]): s.value for s in fam.samples}
    assert set(got) == {
        ("listener", "tls", "CN=localhost,O=fastroute test"),           # its certificate
        ("listener", "tls", "CN=fastroute test CA,O=fastroute test"),   # the client CA
        ("destination", "pacs", "CN=soon.fastroute.test,O=fastroute test"),
        ("destination", "pacs", "CN=fastroute test CA,O=fastroute test"),
        ("source", "arch", "CN=another CA,O=fastroute test"),
    }, got
    assert got[("destination", "pacs", "CN=soon.fastroute.test,O=fastroute test")] == pytest.approx(10, abs=0.1)
    assert got[("listener", "tls", "CN=localhost,O=fastroute test")] == pytest.approx(90, abs=0.1)
    assert got[("source", "arch", "CN=another CA,O=fastroute test")] == pytest.approx(365, abs=0.1)


def test_expiry_alert_raised_under_30_days_cleared_on_renewal(tmp_path: Path, pki: Pki) -> None:
    """Through the HTTP plane's monitor: the alert appears in /api/alerts and /metrics and is
    POSTed to the webhook; the file renewed in place clears it on the next round (no restart);
    an unreadable file raises it too."""
    import asyncio
    import dataclasses
    import shutil

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from fastroute.ops.api import make_app
    from fastroute.spool import Spool
    d = tmp_path / "certs"
    d.mkdir()
    pki.issue("renew", "renew.fastroute.test", days=5, san="DNS:renew.fastroute.test")
    for ext in ("pem", "key"):
        shutil.copy(pki.dir / f"renew.{ext}", d / f"client.{ext}")
    cfg = expiry_config(tmp_path, pki, "renew")
    pacs = cfg.destinations["pacs"]
    cfg = dataclasses.replace(cfg, destinations={**cfg.destinations, "pacs": dataclasses.replace(
        pacs, tls=dataclasses.replace(pacs.tls, cert=d / "client.pem", key=d / "client.key"))})
    received: list[dict[str, Any]] = []
    spool = Spool(cfg.spool, map_size=64 * 1024**2)

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    async def until(fetch: Callable[[], Any], check: Callable[[Any], bool], what: str) -> Any:
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            value = await fetch()
            if check(value):
                return value
            assert asyncio.get_running_loop().time() < deadline, f"{what}: {value!r}"
            await asyncio.sleep(0.02)

    async def main() -> None:
        hook_app = web.Application()
        hook_app.router.add_post("/hook", hook)
        async with TestServer(hook_app) as hook_server:
            with_hook = dataclasses.replace(cfg, alerts=dataclasses.replace(
                cfg.alerts, webhook=str(hook_server.make_url("/hook"))))
            app = make_app(with_hook, spool, None, monitor_interval=0.05)
            async with TestClient(TestServer(app), headers={"Authorization": "Bearer s3cret"}) as c:
                async def alerts() -> list[dict[str, Any]]:
                    resp = await c.get("/api/alerts")
                    assert resp.status == 200
                    return [a for a in (await resp.json())["alerts"] if a["name"] == "certificate_expiry"]

                raised = await until(alerts, lambda a: len(a) == 1, "certificate_expiry raised")
                a = raised[0]
                assert a["destination"] == "pacs" and a["threshold"] == 30
                assert a["value"] == pytest.approx(5, abs=0.1)
                assert "CN=renew.fastroute.test" in a["message"] and "expires in 5 day(s)" in a["message"]
                assert f"destinations.pacs.tls.cert {d / 'client.pem'}" in a["message"]
                metrics = await (await c.get("/metrics")).text()
                assert any(line.startswith("fastroute_alert{") and 'name="certificate_expiry"' in line
                           and line.endswith(" 1.0") for line in metrics.splitlines()), metrics

                pki.issue("renewed", "renew.fastroute.test", days=200, san="DNS:renew.fastroute.test")
                for ext in ("pem", "key"):          # renewed in place, as certbot would
                    shutil.copy(pki.dir / f"renewed.{ext}", d / f"client.{ext}")
                await until(alerts, lambda a: not a, "certificate_expiry cleared after the renewal")

                (d / "client.pem").write_text("garbage")
                unreadable = await until(alerts, lambda a: len(a) == 1, "unreadable file alert")
                assert "cannot be read" in unreadable[0]["message"]
                await until(lambda: asyncio.sleep(0, [(e["event"], e["name"]) for r in received
                                                      for e in r["events"]]),
                            lambda ev: len(ev) >= 3, "webhook events")
        events = [(e["event"], e["name"], e["destination"]) for r in received for e in r["events"]]
        assert events[:3] == [("raised", "certificate_expiry", "pacs"), ("cleared", "certificate_expiry", "pacs"),
                              ("raised", "certificate_expiry", "pacs")], events

    try:
        asyncio.run(main())
    finally:
        spool.close()


def test_expiry_alert_threshold_configurable_and_off() -> None:
    from fastroute.config import AlertsConfig, loads
    from fastroute.ops.alerts import evaluate
    from fastroute.ops.certificates import CertificateExpiry
    assert loads("alerts: {certificate_expiry: 60d}\n").alerts.certificate_expiry == 60 * 86400
    assert loads("alerts: {certificate_expiry: null}\n").alerts.certificate_expiry is None
    now = dt.datetime.now(dt.UTC)
    c = CertificateExpiry("source", "arch", "sources.arch.tls.ca", Path("/x/ca.pem"), "CN=x",
                          now + dt.timedelta(days=40), 40.0)
    assert evaluate(AlertsConfig(), [], None, [c]) == {("certificate_expiry", "sources.arch.tls.ca CN=x"): None}
    hit = evaluate(AlertsConfig(certificate_expiry=60 * 86400.0), [], None, [c])
    alert = hit[("certificate_expiry", "sources.arch.tls.ca CN=x")]
    assert alert is not None and alert.destination == "" and "source arch" in alert.message
    assert evaluate(AlertsConfig(certificate_expiry=None), [], None, [c]) == {}
    expired = dataclasses_replace(c, not_after=now - dt.timedelta(days=3), days_left=-3.0)
    alert = evaluate(AlertsConfig(), [], None, [expired])[("certificate_expiry", "sources.arch.tls.ca CN=x")]
    assert alert is not None and "EXPIRED 3 day(s) ago" in alert.message


def dataclasses_replace(obj: Any, **changes: Any) -> Any:
    import dataclasses
    return dataclasses.replace(obj, **changes)


# -- configuration: relative paths, fastroute check ------------------------------------------------

def test_peer_tls_paths_relative_to_the_config_file_and_checked(tmp_path: Path, pki: Pki) -> None:
    """``tls:`` files of destinations and sources are relative to the configuration file;
    ``fastroute check`` validates them (missing file, cert without key, expiry)."""
    import shutil
    import sys

    from fastroute.config import load
    (tmp_path / "tls").mkdir()
    for name in ("ca.pem", "client.pem", "client.key"):
        shutil.copy(pki.dir / name, tmp_path / "tls" / name)
    path = tmp_path / "router.yaml"
    path.write_text(f"""spool: {tmp_path / 'spool'}
destinations:
  pacs: {{ae_title: PACS, host: localhost, port: 2762,
          tls: {{ca: tls/ca.pem, cert: tls/client.pem, key: tls/client.key}}}}
sources:
  arch: {{ae_title: ARCH, host: localhost, port: 2762, tls: {{ca: tls/missing.pem}}}}
""")
    cfg = load(path)
    assert cfg.destinations["pacs"].tls == TlsPeerConfig(
        ca=tmp_path / "tls/ca.pem", cert=tmp_path / "tls/client.pem", key=tmp_path / "tls/client.key")
    assert cfg.sources["arch"].tls is not None and cfg.sources["arch"].tls.ca == tmp_path / "tls/missing.pem"
    res = subprocess.run([sys.executable, "-m", "fastroute", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode != 0
    assert "sources.arch.tls.ca" in res.stderr and "no such file" in res.stderr, res.stderr
    assert "destinations.pacs.tls" not in res.stderr, res.stderr
    with pytest.raises(Exception, match="cert and key go together"):
        from fastroute.config import loads
        loads("destinations:\n  pacs: {ae_title: P, host: h, port: 1, tls: {cert: a.pem}}\n")


def test_client_context_rebuilt_when_a_file_is_renewed_in_place(tmp_path: Path, pki: Pki) -> None:
    """Built once per file content: the same context while the files are unchanged (no
    rebuild per association), a new one after a renewal in place (the next association
    presents the new certificate; a sender restart is not needed)."""
    import os
    import shutil
    for name in ("ca.pem", "client.pem", "client.key"):
        shutil.copy(pki.dir / name, tmp_path / name)
    cfg = TlsPeerConfig(ca=tmp_path / "ca.pem", cert=tmp_path / "client.pem", key=tmp_path / "client.key")
    first = scu.tls_context(cfg)
    assert scu.tls_context(cfg) is first
    shutil.copy(pki.cert("server"), tmp_path / "client.pem")
    shutil.copy(pki.key("server"), tmp_path / "client.key")
    st = (tmp_path / "client.pem").stat()
    os.utime(tmp_path / "client.pem", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = scu.tls_context(cfg)
    assert second is not first and scu.tls_context(cfg) is second
    assert sum(1 for k in scu._contexts if k[0] == cfg) == 1     # the old one is let go


def test_cli_echo_and_query_over_tls_from_the_config_file(tls_orthanc: Any, pki: Pki, tmp_path: Path,
                                                          synth_study: Callable[..., list[Path]]) -> None:
    """End to end from YAML (relative certificate paths): ``fastroute echo`` a TLS destination
    and ``fastroute query`` a TLS source, both Orthanc with DicomTlsEnabled."""
    import shutil
    import sys

    import pydicom
    files = synth_study(n_instances=1, tiny=True)
    conn = Connection(destination(tls_orthanc.dicom_port, tls_peer(pki), ae_title="ORTHANCTLS"), "FASTROUTE")
    assert store(conn, body_of(files[0])) == StoreResult(0, "")
    conn.release()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    register_modality(tls_orthanc, "fastroute", "FASTROUTE", peers.free_port())
    (tmp_path / "tls").mkdir()
    for name in ("ca.pem", "client.pem", "client.key"):
        shutil.copy(pki.dir / name, tmp_path / "tls" / name)
    tls_keys = "{ca: tls/ca.pem, cert: tls/client.pem, key: tls/client.key}"
    path = tmp_path / "router.yaml"
    path.write_text(f"""spool: {tmp_path / 'spool'}
destinations:
  pacs: {{ae_title: ORTHANCTLS, host: localhost, port: {tls_orthanc.dicom_port}, tls: {tls_keys}}}
sources:
  arch: {{ae_title: ORTHANCTLS, host: localhost, port: {tls_orthanc.dicom_port}, tls: {tls_keys}}}
""")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fastroute", *args, "-c", str(path)],
                              capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path.parent)
    res = cli("echo", "pacs")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"C-ECHO FASTROUTE -> ORTHANCTLS@localhost:{tls_orthanc.dicom_port} (TLS): success" in res.stdout
    res = cli("query", "arch", f"StudyInstanceUID={study_uid}", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert study_uid in res.stdout
