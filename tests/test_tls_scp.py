"""DICOM TLS on the listener (issue 14 section 1): DCMTK echoscu/storescu +tls against it,
mutual authentication (wrong CA, expired and missing client certificates refused), the
handshake off the accept path (an idle TCP client delays no one and is closed at the
handshake timeout), calling AE titles bound to certificates, and certificates reloaded with
an association open.

The PKI is made with the ``openssl`` command line (no ``cryptography`` dependency): a CA, the
listener's certificate, client certificates from that CA, one from another CA, and an expired
one (``openssl ca`` with explicit dates).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

import peers
import synth
from fastroute.config import Config, TlsListenerConfig, loads
from fastroute.dicom import tls
from fastroute.dicom.dimse import CommandField, Message, Peer, Reply
from fastroute.dicom.scp import Listener
from fastroute.routing.intake import StoreService
from fastroute.routing.rules import RuleSet
from fastroute.spool import Spool
from fastroute.spool.commit import Committer

LOGGER = "fastroute.scp"


# -- a test PKI ----------------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, f"openssl {' '.join(args)}: {res.stderr}"


_CA_CNF = """\
[ca]
default_ca = ca_default
[ca_default]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}/newcerts
serial = {dir}/serial
default_md = sha256
policy = policy_any
unique_subject = no
copy_extensions = copy
[policy_any]
commonName = supplied
organizationName = optional
"""


@dataclass(frozen=True)
class Pki:
    dir: Path

    def p(self, name: str) -> Path:
        return self.dir / name

    def facts(self, name: str) -> tls.CertificateFacts:
        return tls.file_facts(self.p(f"{name}.pem"))[0]

    def issue(self, name: str, cn: str, *, ca: str = "ca", days: int = 30,
              dates: tuple[str, str] | None = None, rsa: bool = False) -> None:
        """``name``.key/.pem for CN=cn, O=Test Hospital, signed by ``ca`` (EC P-256 keys, or
        RSA: the retired profiles' suites have RSA key exchange)."""
        d = self.dir
        keyopts = ["rsa:2048"] if rsa else ["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        _openssl("req", "-new", "-newkey", *keyopts, "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/O=Test Hospital/CN={cn}",
                 "-addext", f"subjectAltName=DNS:{cn},DNS:localhost,IP:127.0.0.1", cwd=d)
        if dates is None:
            _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                     "-CAcreateserial", "-days", str(days), "-out", f"{name}.pem", "-copy_extensions",
                     "copy", cwd=d)
        else:
            _openssl("ca", "-batch", "-config", "ca.cnf", "-cert", f"{ca}.pem", "-keyfile", f"{ca}.key",
                     "-in", f"{name}.csr", "-out", f"{name}.pem", "-notext",
                     "-startdate", dates[0], "-enddate", dates[1], cwd=d)


def _make_ca(d: Path, name: str, cn: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "120", "-subj",
             f"/O=Test Hospital/CN={cn}", cwd=d)


def new_pki(d: Path) -> Pki:
    """A test CA ("ca") and a second one ("otherca") in ``d``, with ``openssl ca``'s files."""
    (d / "newcerts").mkdir()
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "ca.cnf").write_text(_CA_CNF.format(dir=d))
    _make_ca(d, "ca", "Test CA")
    _make_ca(d, "otherca", "Other CA")
    return Pki(d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    pki = new_pki(d)
    pki.issue("server", "localhost", days=90)
    pki.issue("server2", "localhost", days=20)
    pki.issue("client", "ct1.hospital")
    pki.issue("client2", "mr1.hospital")
    pki.issue("stranger", "ct1.hospital", ca="otherca")
    pki.issue("expired", "ct1.hospital", dates=("20200101000000Z", "20210101000000Z"))
    pki.issue("revoked", "ct1.hospital", dates=("20250101000000Z", "20300101000000Z"))
    pki.issue("rsaserver", "localhost", rsa=True, days=90)
    _openssl("ca", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-revoke", "revoked.pem", cwd=d)
    _openssl("ca", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-gencrl", "-crldays", "30",
             "-out", "ca.crl", cwd=d)
    _openssl("ca", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-gencrl",
             "-crl_lastupdate", "20240101000000Z", "-crl_nextupdate", "20240201000000Z", "-out", "old.crl", cwd=d)
    return pki


# -- a TLS listener in-process --------------------------------------------------------------------

@dataclass
class TlsScp:
    receiver: Listener
    spool: Spool
    committer: Committer
    store: StoreService
    cfg: Config
    seen: list[Peer]               # the Peer of every C-ECHO served

    @property
    def tls_port(self) -> int:
        return self.receiver.tls_port


@pytest.fixture
def tls_scp(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., TlsScp]]:
    started: list[TlsScp] = []

    def make(tls_options: dict[str, Any] | None = None, **config: Any) -> TlsScp:
        tls_cfg = {"port": peers.free_port(), "cert": str(pki.p("server.pem")),
                   "key": str(pki.p("server.key")), "ca": str(pki.p("ca.pem")), **(tls_options or {})}
        settings = {"ae_title": "FASTROUTE", "host": "127.0.0.1", "port": peers.free_port(),
                    "spool": str(tmp_path / f"spool{len(started)}"), "min_free_bytes": 0,
                    "spool_max_bytes": "256MiB", "tls": tls_cfg, **config}
        cfg = loads(yaml.safe_dump(settings))
        spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes, min_free_bytes=cfg.min_free_bytes)
        committer = Committer(spool, None, gather=cfg.group_commit_delay)
        store = StoreService(RuleSet.from_config(cfg), committer, max_object_bytes=cfg.max_object_bytes)
        seen: list[Peer] = []

        def echo(peer: Peer, msg: Message) -> Reply:
            seen.append(peer)
            return Reply(0)

        receiver = Listener(cfg, {CommandField.C_STORE_RQ: store, CommandField.C_ECHO_RQ: echo})
        receiver.start()
        s = TlsScp(receiver, spool, committer, store, cfg, seen)
        started.append(s)
        return s

    yield make
    for s in started:
        s.receiver.stop(1.0)
        s.store.close()
        s.committer.close()
        s.spool.close()
        assert not peers.is_listening(s.tls_port), f"TLS port {s.tls_port} still listening after stop()"
        assert not s.receiver._conns and not s.receiver._handshakes


def tls_args(pki: Pki, key: str | None, cert: str | None, ca: str = "ca") -> list[str]:
    """DCMTK +tls options: our key/cert (None: anonymous TLS), trusting ``ca``."""
    own = ["+tls", str(pki.p(key)), str(pki.p(cert))] if key and cert else ["+tla"]
    return [*own, "+cf", str(pki.p(f"{ca}.pem"))]


def client_context(pki: Pki, name: str | None = "client", ca: str = "ca") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.p(f"{ca}.pem")))
    if name is not None:
        ctx.load_cert_chain(pki.p(f"{name}.pem"), pki.p(f"{name}.key"))
    return ctx


def ok(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, res.stdout + res.stderr


def failed(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode != 0, res.stdout + res.stderr


# -- certificate facts ----------------------------------------------------------------------------

def test_certificate_facts_match_openssl(pki: Pki) -> None:
    """Subject, fingerprint and expiry from the DER reader are what ``openssl x509`` says."""
    out = subprocess.run(["openssl", "x509", "-in", str(pki.p("client.pem")), "-noout", "-subject",
                          "-nameopt", "RFC2253", "-fingerprint", "-sha256", "-enddate"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    facts = pki.facts("client")
    assert facts.subject == out[0].removeprefix("subject=") == "CN=ct1.hospital,O=Test Hospital"
    assert facts.fingerprint == tls.normalise_fingerprint(out[1].split("=", 1)[1])
    assert facts.not_after.strftime("%b %d %H:%M:%S %Y") in out[2].replace("  ", " 0")
    assert facts.common_name == "ct1.hospital" and 29 < facts.days_left() <= 30
    assert pki.facts("expired").days_left() < 0
    assert tls.normalise_dn("O = Test Hospital, CN = ct1.hospital") == tls.normalise_dn(facts.subject)
    assert tls.normalise_dn("/O=Test Hospital/CN=ct1.hospital") == tls.normalise_dn(facts.subject)
    assert tls.normalise_dn("cn=ct1.hospital,o=Test Hospital") == tls.normalise_dn(facts.subject)
    assert tls.normalise_dn("CN=ct1.hospital,O=Test Hospital") != tls.normalise_dn("CN=ct1.hospital,O=Other")
    assert tls.normalise_dn(r"O=A/B,CN=X\,y") == (("CN", "x,y"), ("O", "a/b"))


def test_server_context_profile_and_file_errors(pki: Pki, tmp_path: Path) -> None:
    """BCP 195: TLS 1.2 minimum, no compression, no renegotiation, AEAD suites only; each bad
    file is named with the key it came from."""
    cfg = TlsListenerConfig(cert=pki.p("server.pem"), key=pki.p("server.key"), ca=pki.p("ca.pem"))
    ctx = tls.server_context(cfg)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all("GCM" in n or "CHACHA20" in n for n in tls12), tls12
    assert all(n.startswith(("ECDHE", "DHE")) for n in tls12), tls12
    legacy = tls.server_context(TlsListenerConfig(cert=cfg.cert, key=cfg.key, legacy_ciphers=True))
    assert "AES128-SHA" in [c["name"] for c in legacy.get_ciphers()]
    mismatch = TlsListenerConfig(cert=pki.p("server.pem"), key=pki.p("client.key"))
    with pytest.raises(tls.TlsSetupError, match="does not match"):
        tls.server_context(mismatch)
    with pytest.raises(tls.TlsSetupError, match=r"tls.key .*nokey: no such file"):
        tls.server_context(TlsListenerConfig(cert=cfg.cert, key=tmp_path / "nokey"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(tls.TlsSetupError, match="tls.ca"):
        tls.server_context(TlsListenerConfig(cert=cfg.cert, key=cfg.key, ca=tmp_path / "junk.pem"))


# -- DCMTK against the TLS listener ---------------------------------------------------------------

def test_dcmtk_mutual_tls_echo_and_store(tls_scp: Callable[..., TlsScp], pki: Pki, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """echoscu and storescu +tls with a client certificate: the association is accepted, the
    objects are spooled, and the handler's Peer carries the client certificate."""
    s = tls_scp()
    caplog.set_level(logging.INFO, logger=LOGGER)
    ok(peers.echoscu(s.tls_port, calling_ae="CT1", extra_args=tls_args(pki, "client.key", "client.pem")))
    assert s.seen and s.seen[-1].certificate == pki.facts("client")
    files = synth.make_tiny(tmp_path / "tiny", 3)
    ok(peers.storescu(s.tls_port, files, calling_ae="CT1",
                      extra_args=tls_args(pki, "client.key", "client.pem")))
    peers.wait_until(lambda: s.spool.counters().get("seq", 0) >= 3, 10, message="3 objects spooled")
    assert "over TLS, client certificate CN=ct1.hospital,O=Test Hospital (sha256:" in caplog.text
    ok(peers.echoscu(s.receiver.port, calling_ae="PLAIN"))      # the plain port still serves
    assert s.seen[-1].certificate is None


def test_large_objects_stream_over_tls(tls_scp: Callable[..., TlsScp], pki: Pki, tmp_path: Path) -> None:
    """8 MiB objects past stream_threshold are staged as they arrive through the TLS
    transport (reading paused and resumed by the receive path) and spooled whole."""
    s = tls_scp(stream_threshold="1MiB")
    files = synth.make_study(tmp_path / "big", n_instances=3, rows=2048, cols=2048)
    ok(peers.storescu(s.tls_port, files, calling_ae="CT1", extra_args=tls_args(pki, "client.key", "client.pem")))
    peers.wait_until(lambda: s.spool.counters().get("seq", 0) >= 3, 20, message="3 objects spooled")
    for oid in (1, 2, 3):
        assert len(s.spool.read(oid)) > 2048 * 2048 * 2


@pytest.mark.parametrize("client, why", [
    (("stranger.key", "stranger.pem"), "client certificate refused: unable to get local issuer certificate"),
    (("expired.key", "expired.pem"), "client certificate refused: certificate has expired"),
    ((None, None), "no client certificate"),
])
def test_dcmtk_refused_client_certificates(tls_scp: Callable[..., TlsScp], pki: Pki,
                                           caplog: pytest.LogCaptureFixture,
                                           client: tuple[str | None, str | None], why: str) -> None:
    """A client certificate from another CA, an expired one, or none (required) fails the
    handshake: no association, a log line that says why and names the address."""
    s = tls_scp()
    caplog.set_level(logging.INFO, logger=LOGGER)
    failed(peers.echoscu(s.tls_port, calling_ae="CT1", extra_args=tls_args(pki, *client)))
    peers.wait_until(lambda: why in caplog.text, 10, message=lambda: f"{why!r} in {caplog.text}")
    assert f"TLS handshake from 127.0.0.1 on port {s.tls_port} failed" in caplog.text
    assert not s.seen


def test_optional_client_certificate(tls_scp: Callable[..., TlsScp], pki: Pki) -> None:
    """require_client_cert: false admits anonymous TLS clients (still verified when they do
    present one), and the server certificate is checked by DCMTK against our CA."""
    s = tls_scp({"require_client_cert": False})
    ae = AE(ae_title="ANON")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", s.tls_port, ae_title="FASTROUTE",
                         tls_args=(client_context(pki, None), "localhost"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert s.seen[-1].certificate is None and s.seen[-1].calling_ae == "ANON"
    ok(peers.echoscu(s.tls_port, extra_args=tls_args(pki, "client.key", "client.pem")))
    assert s.seen[-1].certificate == pki.facts("client")
    failed(peers.echoscu(s.tls_port, extra_args=tls_args(pki, "stranger.key", "stranger.pem")))
    # DCMTK does not trust a server certificate from another CA
    failed(peers.echoscu(s.tls_port, extra_args=tls_args(pki, "client.key", "client.pem", ca="otherca")))
    assert len(s.seen) == 2


def test_tls_only_listener(tls_scp: Callable[..., TlsScp], pki: Pki) -> None:
    """Top-level ``port: 0``: no plain listener, the TLS one alone."""
    s = tls_scp(port=0)
    assert s.receiver.port == 0 and s.receiver._server is None
    ok(peers.echoscu(s.tls_port, calling_ae="CT1", extra_args=tls_args(pki, "client.key", "client.pem")))


def test_crl_refuses_a_revoked_client_certificate(tls_scp: Callable[..., TlsScp], pki: Pki,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """tls.crl: a revoked client certificate fails the handshake; an unrevoked one of the
    same CA is accepted (the CRL check is on the leaf, VERIFY_CRL_CHECK_LEAF)."""
    s = tls_scp({"crl": str(pki.p("ca.crl"))})
    caplog.set_level(logging.INFO, logger=LOGGER)
    failed(peers.echoscu(s.tls_port, calling_ae="CT1", extra_args=tls_args(pki, "revoked.key", "revoked.pem")))
    peers.wait_until(lambda: "certificate revoked" in caplog.text, 10, message=lambda: caplog.text)
    ok(peers.echoscu(s.tls_port, calling_ae="CT1", extra_args=tls_args(pki, "client.key", "client.pem")))
    assert len(s.seen) == 1
    # why `fastroute check` makes an out-of-date CRL an error: it refuses every client
    stale = tls_scp({"crl": str(pki.p("old.crl"))})
    failed(peers.echoscu(stale.tls_port, calling_ae="CT1", extra_args=tls_args(pki, "client.key", "client.pem")))
    peers.wait_until(lambda: "client certificate refused: CRL has expired" in caplog.text, 10,
                     message=lambda: caplog.text)


@pytest.mark.parametrize("legacy", [False, True])
def test_retired_aes_profile_only_with_legacy_ciphers(tls_scp: Callable[..., TlsScp], pki: Pki,
                                                      legacy: bool) -> None:
    """DCMTK's retired AES profile (+pa: TLS_RSA_WITH_AES_128_CBC_SHA) is refused by the
    default BCP 195 profile and accepted with legacy_ciphers; BCP 195 clients work either way."""
    s = tls_scp({"cert": str(pki.p("rsaserver.pem")), "key": str(pki.p("rsaserver.key")),
                 "legacy_ciphers": legacy})
    args = tls_args(pki, "client.key", "client.pem")
    res = peers.echoscu(s.tls_port, calling_ae="OLDCT", extra_args=[*args, "+pa"])
    (ok if legacy else failed)(res)
    ok(peers.echoscu(s.tls_port, calling_ae="CT1", extra_args=args))


# -- the handshake never blocks -------------------------------------------------------------------

def test_idle_tcp_client_delays_no_one_and_times_out(tls_scp: Callable[..., TlsScp], pki: Pki) -> None:
    """Two TCP clients that never start their handshake and one that stops mid-ClientHello
    sit on the TLS port while DCMTK's C-ECHOs complete: all of them while the idle ones are
    still waiting (so nobody waited them out); each idle one is then closed at the handshake
    timeout, not before."""
    timeout = 8.0                                  # slack for a loaded machine
    s = tls_scp({"handshake_timeout": f"{timeout}s"})
    opened = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", s.tls_port), timeout=10) for _ in range(2)]
    half = socket.create_connection(("127.0.0.1", s.tls_port), timeout=10)
    half.sendall(b"\x16\x03\x01\x02\x00\x01")       # the start of a ClientHello, then nothing
    try:
        peers.wait_until(lambda: len(s.receiver._handshakes) == 3, 5, message="3 handshakes pending")
        for _ in range(2):
            ok(peers.echoscu(s.tls_port, calling_ae="CT1", extra_args=tls_args(pki, "client.key", "client.pem"),
                             timeout=10))
        took = time.monotonic() - opened
        assert len(s.seen) == 2
        assert took < timeout and len(s.receiver._handshakes) == 3, \
            f"the echoes took {took:.1f}s: they waited for the idle clients"
        for sock in [*idle, half]:
            sock.settimeout(timeout + 10)
            assert sock.recv(100) == b""                 # closed by the listener
            closed_after = time.monotonic() - opened
            assert timeout - 0.5 < closed_after < timeout + 5, f"closed after {closed_after:.1f}s"
        peers.wait_until(lambda: not s.receiver._handshakes, 5, message="handshake tasks left")
    finally:
        for sock in [*idle, half]:
            sock.close()


def test_handshake_flood_is_capped(tls_scp: Callable[..., TlsScp], pki: Pki,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """Past ``max_handshakes`` connections mid-handshake a new one is closed at once (file
    descriptors are finite); once the idle ones go, TLS clients are served again."""
    s = tls_scp({"handshake_timeout": "30s"})
    s.receiver.max_handshakes = 4
    caplog.set_level(logging.INFO, logger=LOGGER)
    idle = [socket.create_connection(("127.0.0.1", s.tls_port), timeout=10) for _ in range(4)]
    try:
        peers.wait_until(lambda: len(s.receiver._handshakes) == 4, 5, message="4 handshakes pending")
        with socket.create_connection(("127.0.0.1", s.tls_port), timeout=10) as extra:
            assert extra.recv(100) == b""
        peers.wait_until(lambda: "closed 1 new one(s), the last from 127.0.0.1" in caplog.text, 5,
                         message=lambda: caplog.text)
    finally:
        for sock in idle:
            sock.close()
    peers.wait_until(lambda: not s.receiver._handshakes, 10, message="idle handshakes not ended on EOF")
    ok(peers.echoscu(s.tls_port, calling_ae="CT1", extra_args=tls_args(pki, "client.key", "client.pem")))


# -- calling AE titles bound to certificates ------------------------------------------------------

def test_certificate_bound_calling_aes(tls_scp: Callable[..., TlsScp], pki: Pki,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """CT1 is bound to its certificate's subject, MR1 to client2's fingerprint, ECHOSCU is a
    plain entry. A bound AE with another certificate, or on the plain port, is refused
    (A-ASSOCIATE-RJ 1/1/3), logged with the subject and handed to the audit hook."""
    mr1 = pki.facts("client2").fingerprint.upper().replace("SHA256:", "SHA256:")
    s = tls_scp(allowed_calling_aes=[
        {"ae": "CT1", "cert_subject": "O = Test Hospital, CN = ct1.hospital"},
        {"ae": "MR1", "cert_fingerprint": mr1}, "ECHOSCU"])
    audited: list[dict[str, Any]] = []
    s.receiver.on_denied = audited.append
    caplog.set_level(logging.INFO, logger=LOGGER)
    ok(peers.echoscu(s.tls_port, calling_ae="CT1", extra_args=tls_args(pki, "client.key", "client.pem")))
    ok(peers.echoscu(s.tls_port, calling_ae="MR1", extra_args=tls_args(pki, "client2.key", "client2.pem")))
    ok(peers.echoscu(s.tls_port, calling_ae="ECHOSCU", extra_args=tls_args(pki, "client.key", "client.pem")))
    ok(peers.echoscu(s.receiver.port, calling_ae="ECHOSCU"))
    assert len(s.seen) == 4
    res = peers.echoscu(s.tls_port, calling_ae="MR1", extra_args=tls_args(pki, "client.key", "client.pem"))
    failed(res)
    assert "Called AE Title Not Recognized" in res.stdout + res.stderr or \
        "Calling AE Title Not Recognized" in res.stdout + res.stderr, res.stdout + res.stderr
    failed(peers.echoscu(s.receiver.port, calling_ae="CT1"))    # bound: never over plain TCP
    failed(peers.echoscu(s.tls_port, calling_ae="US1", extra_args=tls_args(pki, "client.key", "client.pem")))
    assert len(s.seen) == 4
    peers.wait_until(lambda: len(audited) == 2, 5, message=lambda: f"audit events: {audited}")
    wrong, plain = sorted(audited, key=lambda e: e["calling_ae"])[::-1]
    assert wrong["action"] == "association_denied" and wrong["who"] == "MR1@127.0.0.1"
    assert wrong["cert_subject"] == "CN=ct1.hospital,O=Test Hospital"
    assert wrong["cert_fingerprint"] == pki.facts("client").fingerprint
    assert plain["calling_ae"] == "CT1" and plain["cert_subject"] is None
    assert ("rejecting association from MR1@127.0.0.1 to FASTROUTE: calling AE title MR1 is bound to a "
            "client certificate and the association presented certificate CN=ct1.hospital,O=Test Hospital"
            ) in caplog.text


def test_binding_config_errors() -> None:
    base = "tls: {cert: a.pem, key: a.key, ca: ca.pem}\n"
    cfg = loads(base + "allowed_calling_aes: [CT1, {ae: MR1, cert_subject: 'CN=mr1'}]\n")
    assert cfg.allowed_calling_aes == ("CT1", "MR1") and set(cfg.calling_ae_certs) == {"MR1"}
    for text, message in [
        ("allowed_calling_aes: [{ae: MR1}]\n", "give cert_subject or cert_fingerprint"),
        ("allowed_calling_aes: [{ae: MR1, cert_fingerprint: 'sha256:abc'}]\n", "64 hex digits"),
        ("allowed_calling_aes: [{ae: MR1, cert_subjet: 'CN=x'}]\n", "unknown key"),
        ("allowed_calling_aes: [{cert_subject: 'CN=x'}]\n", "missing required key 'ae'"),
    ]:
        with pytest.raises(Exception, match=message):
            loads(base + text)
    with pytest.raises(Exception, match="require_client_cert needs a ca"):
        loads("tls: {cert: a.pem, key: a.key}\n")
    with pytest.raises(Exception, match="needs a tls: listener"):
        loads("port: 0\n")
    assert loads("port: 0\ntls: {cert: a.pem, key: a.key, require_client_cert: false}\n").port == 0
    for text, message in [
        ("tls: {cert: a.pem, key: a.key, ca: c.pem, min_version: '1.1'}\n", "must be one of 1.2, 1.3"),
        ("tls: {cert: a.pem, key: a.key, ca: c.pem, crt: x}\n", "tls.crt: unknown key"),
        ("tls: {key: a.key, ca: c.pem}\n", "missing required key 'cert'"),
        ("port: 2762\ntls: {cert: a.pem, key: a.key, ca: c.pem}\n", "is the plain port too"),
    ]:
        with pytest.raises(Exception, match=message):
            loads(text)


# -- reload -------------------------------------------------------------------------------------

def _server_cert_seen(port: int, pki: Pki) -> tls.CertificateFacts:
    ctx = client_context(pki)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            facts = tls.peer_facts(s)
    assert facts is not None
    return facts


def test_reload_keeps_open_association(tls_scp: Callable[..., TlsScp], pki: Pki, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """New certificate contents under the same paths: reload_tls() gives new connections the
    new certificate while an association opened before keeps working and releases normally;
    a broken file keeps the running context."""
    live = tmp_path / "live"
    live.mkdir()
    for n in ("server.pem", "server.key"):
        (live / n).write_bytes(pki.p(n).read_bytes())
    s = tls_scp({"cert": str(live / "server.pem"), "key": str(live / "server.key")})
    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", s.tls_port, ae_title="FASTROUTE",
                         tls_args=(client_context(pki), "localhost"))
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assert _server_cert_seen(s.tls_port, pki) == pki.facts("server")
        for n in ("server.pem", "server.key"):
            (live / n).write_bytes(pki.p(n.replace("server", "server2")).read_bytes())
        caplog.set_level(logging.INFO, logger=LOGGER)
        assert s.receiver.reload_tls()
        assert _server_cert_seen(s.tls_port, pki) == pki.facts("server2")
        assert assoc.send_c_echo().Status == 0               # the open association goes on
        (live / "server.key").write_bytes(pki.p("client.key").read_bytes())   # mismatched
        assert not s.receiver.reload_tls()
        assert "TLS certificates NOT reloaded, keeping the current ones" in caplog.text
        assert _server_cert_seen(s.tls_port, pki) == pki.facts("server2")
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    assert assoc.is_released
    ok(peers.echoscu(s.tls_port, calling_ae="CT1", extra_args=tls_args(pki, "client.key", "client.pem")))


# -- fastroute check -----------------------------------------------------------------------------

def test_check_validates_tls_files(pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``fastroute check``: a good listener passes with its certificate's facts; a key of
    another certificate, a missing CA, an expired certificate are errors (exit 1); a
    certificate under 30 days is a warning (exit 0)."""
    from fastroute.cli import main
    conf = tmp_path / "router.yaml"

    def check(**tls_cfg: str) -> tuple[int, str, str]:
        base = {"cert": str(pki.p("server.pem")), "key": str(pki.p("server.key")), "ca": str(pki.p("ca.pem"))}
        conf.write_text(yaml.safe_dump({"spool": str(tmp_path / "spool"), "min_free_bytes": 0,
                                        "tls": {**base, **tls_cfg}}))
        code = main(["check", "-c", str(conf)])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = check()
    assert code == 0, err
    assert "ok: tls.cert: " in out and "CN=localhost,O=Test Hospital" in out and "DICOM TLS on" in out
    code, out, err = check(key=str(pki.p("client.key")))
    assert code == 1 and "error: tls: tls.cert" in err and "does not match the certificate" in err
    code, out, err = check(ca=str(tmp_path / "missing-ca.pem"))
    assert code == 1 and "error: tls.ca: tls.ca" in err and "no such file" in err
    code, out, err = check(cert=str(pki.p("expired.pem")), key=str(pki.p("expired.key")))
    assert code == 1 and "EXPIRED" in err and "CN=ct1.hospital" in err
    code, out, err = check(crl=str(pki.p("ca.crl")))
    assert code == 0 and "ok: tls.crl: " in out and "CRL of CN=Test CA,O=Test Hospital, next update due" in out
    code, out, err = check(crl=str(pki.p("old.crl")))
    assert code == 1 and "error: tls.crl: " in err and "due 2024-02-01 00:00 UTC: OUT OF DATE" in err
    code, out, err = check(cert=str(pki.p("server2.pem")), key=str(pki.p("server2.key")))
    assert code == 0 and "warning: tls.cert:" in out and ("expires in 19 days" in out or "expires in 20 days" in out)


def test_relative_tls_paths_follow_the_config_file(pki: Pki, tmp_path: Path) -> None:
    from fastroute.config import load
    conf = tmp_path / "etc" / "router.yaml"
    conf.parent.mkdir()
    conf.write_text("tls: {cert: certs/server.pem, key: certs/server.key, ca: /abs/ca.pem}\n")
    cfg = load(conf)
    assert cfg.tls is not None and cfg.tls.cert == conf.parent / "certs/server.pem"
    assert cfg.tls.ca == Path("/abs/ca.pem")


# -- the router: SIGHUP reloads certificates, open associations finish ---------------------------

def test_router_sighup_reloads_certificates_with_an_association_open(
        router: Callable[..., Any], pki: Pki, tmp_path: Path) -> None:
    """`fastroute serve` with a TLS listener: the certificate files are replaced under the
    same paths and SIGHUP sent to the supervisor; the listeners reload them in place (no restart), an
    association opened before goes on and releases, new connections see the new certificate,
    and a certificate-bound AE refused by the listener shows in the audit trail."""
    live = tmp_path / "live"
    live.mkdir()
    for n in ("server.pem", "server.key"):
        (live / n).write_bytes(pki.p(n).read_bytes())
    tls_port = peers.free_port()
    r = router({"tls": {"port": tls_port, "cert": str(live / "server.pem"), "key": str(live / "server.key"),
                        "ca": str(pki.p("ca.pem"))},
                "allowed_calling_aes": [{"ae": "CT1", "cert_subject": "CN=ct1.hospital,O=Test Hospital"},
                                        "ECHOSCU"]})
    peers.wait_until(lambda: peers.is_listening(tls_port), 30, message=r.log_tail)
    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", tls_port, ae_title="FASTROUTE",
                         tls_args=(client_context(pki), "localhost"))
    try:
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        listeners = [ln for ln in r.log_text().splitlines() if "started listener-0" in ln]
        for n in ("server.pem", "server.key"):
            (live / n).write_bytes(pki.p(n.replace("server", "server2")).read_bytes())
        assert r.proc is not None
        os.kill(r.proc.pid, signal.SIGHUP)
        peers.wait_until(lambda: "TLS certificates reloaded for new connections" in r.log_text(), 30,
                         message=r.log_tail)
        assert _server_cert_seen(tls_port, pki) == pki.facts("server2")
        assert assoc.send_c_echo().Status == 0
        assert [ln for ln in r.log_text().splitlines() if "started listener-0" in ln] == listeners, \
            "the listener was restarted, not reloaded in place"
        (live / "server.key").write_bytes(pki.p("client.key").read_bytes())     # a wrong key
        os.kill(r.proc.pid, signal.SIGHUP)
        peers.wait_until(lambda: "TLS certificates NOT reloaded, keeping the current ones" in r.log_text(), 30,
                         message=r.log_tail)
        assert _server_cert_seen(tls_port, pki) == pki.facts("server2")
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    assert assoc.is_released
    failed(peers.echoscu(tls_port, calling_ae="CT1", extra_args=tls_args(pki, "client2.key", "client2.pem")))
    peers.wait_until(lambda: "association_denied" in r.cli("audit").stdout, 30,
                     message=lambda: r.cli("audit").stdout)
    events = r.cli("audit").stdout
    assert "CN=mr1.hospital,O=Test Hospital" in events and "CT1@127.0.0.1" in events


def test_router_routes_what_arrives_over_tls(router: Callable[..., Any], storescp: Callable[..., Any],
                                            pki: Pki, tmp_path: Path) -> None:
    """storescu +tls into a TLS-only router (``port: 0``) that routes to a plain storescp:
    every object arrives, and nothing listens on a plain port."""
    from router import destination
    dest = storescp("PACS")
    tls_port = peers.free_port()
    r = router({"tls": {"port": tls_port, "cert": str(pki.p("server.pem")), "key": str(pki.p("server.key")),
                        "ca": str(pki.p("ca.pem"))},
                "destinations": {"pacs": destination(dest.port, "PACS")}, "default": ["pacs"]},
               start=False)
    r.write_config(port=0)
    r.port = tls_port                        # readiness: the TLS port listens
    r.start()
    files = synth.make_tiny(tmp_path / "tiny", 5)
    ok(peers.storescu(tls_port, files, calling_ae="CT1", extra_args=tls_args(pki, "client.key", "client.pem")))
    assert len(dest.wait_for(5, timeout=60)) == 5
    text = r.log_text()
    assert "no plain listener" in text and f"127.0.0.1:{tls_port} with DICOM TLS" in text
    assert "(asyncio, " not in text          # the plain listener's "listening as ..." line
