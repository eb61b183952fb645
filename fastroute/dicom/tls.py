"""DICOM TLS: the SSLContexts of both directions and what a certificate says.

PS3.15 Annex B.9, the non-downgrading BCP 195 (RFC 9325) profile: TLS 1.2 at least, 1.3 when
both ends have it, only AEAD suites with forward secrecy for 1.2, no compression, no
renegotiation. The retired DICOM profiles' suites (RSA key exchange, CBC) come in only with
``legacy_ciphers``. Server: :func:`server_context` (client certificates required when
configured, checked against the CA and, with a CRL, the leaf against the CRL); client:
:func:`client_context` (the server's certificate against the CA, its name against the host).

Certificate facts (subject, SHA-256 fingerprint, validity) are read from DER with the small
reader below: neither ``cryptography`` nor pyOpenSSL is a dependency, and ``ssl``'s own decoder
(``_test_decode_cert``) is private.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fastroute.config import TlsListenerConfig, TlsPeerConfig, normalise_dn, normalise_fingerprint

# RFC 9325 section 4.2 (PS3.15 B.9): the TLS 1.2 suites; TLS 1.3's are all AEAD already.
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
# The retired profiles (PS3.15 B.1 "Basic TLS", B.3 "AES"): TLS_RSA_WITH_AES_128_CBC_SHA and
# TLS_RSA_WITH_3DES_EDE_CBC_SHA (the latter only where the OpenSSL build still has it).
LEGACY_CIPHERS = "AES128-SHA:AES256-SHA:DES-CBC3-SHA"

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsSetupError(Exception):
    """A context could not be built from the configured files; says which file and why."""


def _harden(ctx: ssl.SSLContext, min_version: str, legacy: bool) -> None:
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED      # 1.3 preferred
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ciphers = BCP195_CIPHERS + (":" + LEGACY_CIPHERS if legacy else "")
    try:
        ctx.set_ciphers(ciphers)
    except ssl.SSLError:              # a build without 3DES: the rest of the list
        ctx.set_ciphers(BCP195_CIPHERS + (":AES128-SHA:AES256-SHA" if legacy else ""))


def readable(what: str, path: Path) -> None:
    """Raise TlsSetupError unless ``path`` is a readable file (named by its key ``what``)."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise TlsSetupError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise TlsSetupError(f"{what} {path}: a folder, not a file") from None
    except PermissionError:
        raise TlsSetupError(f"{what} {path}: not readable") from None
    except OSError as exc:
        raise TlsSetupError(f"{what} {path}: {exc.strerror or exc}") from None


def _load(what: str, path: Path, load: Callable[[], object], *also: tuple[str, Path]) -> None:
    readable(what, path)
    for other, p in also:
        readable(other, p)
    try:
        load()
    except FileNotFoundError:
        raise TlsSetupError(f"{what} {path}: no such file") from None
    except PermissionError:
        raise TlsSetupError(f"{what} {path}: not readable") from None
    except ssl.SSLError as exc:
        raise TlsSetupError(f"{what} {path}: {_ssl_reason(exc)}") from None
    except OSError as exc:
        raise TlsSetupError(f"{what} {path}: {exc.strerror or exc}") from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None)
    if reason == "KEY_VALUES_MISMATCH":
        return "the private key does not match the certificate"
    if reason == "PEM_LIB" or reason == "NO_START_LINE":
        return "not PEM of the expected kind (or an encrypted key)"
    return str(reason or exc).lower().replace("_", " ")


def server_context(cfg: TlsListenerConfig) -> ssl.SSLContext:
    """The listener's context; raises TlsSetupError naming the file that is wrong."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, cfg.min_version, cfg.legacy_ciphers)
    _load("tls.cert", cfg.cert, lambda: ctx.load_cert_chain(cfg.cert, cfg.key), ("tls.key", cfg.key))
    if cfg.ca is not None:
        ca = cfg.ca
        _load("tls.ca", ca, lambda: ctx.load_verify_locations(cafile=ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.crl is not None:
        crl = cfg.crl
        _load("tls.crl", crl, lambda: ctx.load_verify_locations(cafile=crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_context(cfg: TlsPeerConfig, *, min_version: str = "1.2",
                   legacy_ciphers: bool = False) -> ssl.SSLContext:
    """A destination's or a source's context: wrap with ``server_hostname=host``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx, min_version, legacy_ciphers)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cfg.ca is not None:
        ca = cfg.ca
        _load("tls.ca", ca, lambda: ctx.load_verify_locations(cafile=ca))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = cfg.verify_hostname
    if cfg.cert is not None or cfg.key is not None:
        if cfg.cert is None:
            raise TlsSetupError("tls.key given without tls.cert")
        cert, key = cfg.cert, cfg.key
        _load("tls.cert", cert, lambda: ctx.load_cert_chain(cert, key), *(() if key is None else (("tls.key", key),)))
    return ctx


# -- certificate facts --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CertificateFacts:
    """What access control, the audit trail, ``fastroute check`` and /metrics need of one
    certificate. ``subject``/``issuer`` are RFC 4514 strings (most specific first, as
    ``openssl x509 -nameopt RFC2253`` prints them)."""

    subject: str
    issuer: str
    fingerprint: str            # "sha256:" + lower-case hex of the DER
    not_before: dt.datetime     # UTC
    not_after: dt.datetime      # UTC
    common_name: str = ""

    def days_left(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.UTC)
        return (self.not_after - now).total_seconds() / 86400.0

    def describe(self) -> str:
        return f"{self.subject} ({self.fingerprint[:23]}…)"


class DerError(ValueError):
    """Not a DER X.509 certificate this reader understands."""


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise DerError("truncated")
    tag = data[pos]
    n = data[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or pos + k > len(data):
            raise DerError("bad length")
        n = int.from_bytes(data[pos:pos + k], "big")
        pos += k
    if pos + n > len(data):
        raise DerError("truncated")
    return tag, pos, pos + n


def _children(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    pos = start
    while pos < end:
        tag, s, e = _tlv(data, pos)
        yield tag, s, e
        pos = e


def _oid(b: bytes) -> str:
    if not b:
        raise DerError("empty OID")
    parts = [b[0] // 40, b[0] % 40] if b[0] < 80 else [2, b[0] - 80]
    value = 0
    for byte in b[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


_NAMES = {
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.9": "STREET",
    "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.5": "serialNumber", "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID", "1.2.840.113549.1.9.1": "emailAddress",
}


def _text(tag: int, b: bytes) -> str:
    if tag == 0x1E:                                   # BMPString
        return b.decode("utf-16-be", "replace")
    if tag == 0x1C:                                   # UniversalString
        return b.decode("utf-32-be", "replace")
    return b.decode("utf-8", "replace")


def _escape(value: str) -> str:
    out = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and len(out) > 1:
        out = out[:-1] + "\\ "
    return out


def _name(data: bytes, start: int, end: int) -> tuple[str, str]:
    """(RFC 4514 string, the last CN) of a Name."""
    rdns: list[str] = []
    cn = ""
    for _, rs, re_ in _children(data, start, end):           # SET OF AttributeTypeAndValue
        atvs = []
        for _, as_, ae in _children(data, rs, re_):
            (_, os_, oe), (vtag, vs, ve) = list(_children(data, as_, ae))[:2]
            oid = _oid(data[os_:oe])
            value = _text(vtag, data[vs:ve])
            if oid == "2.5.4.3":
                cn = value
            atvs.append(f"{_NAMES.get(oid, oid)}={_escape(value)}")
        rdns.append("+".join(atvs))
    return ",".join(reversed(rdns)), cn


def _time(tag: int, b: bytes) -> dt.datetime:
    s = b.decode("ascii")
    if tag == 0x17:                                   # UTCTime: YYMMDDHHMMSSZ
        year = int(s[:2])
        s = f"{1900 + year if year >= 50 else 2000 + year}{s[2:]}"
    return dt.datetime.strptime(s.rstrip("Z")[:14], "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)


def certificate_facts(der: bytes) -> CertificateFacts:
    """The facts of one DER certificate; raises DerError when it is not one."""
    try:
        _, cs, ce = _tlv(der, 0)                      # Certificate
        _, ts, te = _tlv(der, cs)                     # TBSCertificate
        fields = list(_children(der, ts, te))
        if fields and fields[0][0] == 0xA0:           # [0] version
            fields = fields[1:]
        # serialNumber, signature, issuer, validity, subject
        issuer, _ = _name(der, fields[2][1], fields[2][2])
        validity = list(_children(der, fields[3][1], fields[3][2]))
        subject, cn = _name(der, fields[4][1], fields[4][2])
        not_before = _time(validity[0][0], der[validity[0][1]:validity[0][2]])
        not_after = _time(validity[1][0], der[validity[1][1]:validity[1][2]])
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise DerError(f"not an X.509 certificate: {exc}") from None
    return CertificateFacts(subject=subject, issuer=issuer,
                            fingerprint="sha256:" + hashlib.sha256(der[:ce]).hexdigest(),
                            not_before=not_before, not_after=not_after, common_name=cn)


@dataclass(frozen=True, slots=True)
class CrlFacts:
    """When a CRL was issued and when the next is due: past ``next_update`` OpenSSL refuses
    every client certificate it is asked to check against it ("CRL has expired")."""

    issuer: str
    this_update: dt.datetime
    next_update: dt.datetime | None


def crl_facts(der: bytes) -> CrlFacts:
    """The facts of one DER CRL (CertificateList, RFC 5280 5.1); raises DerError."""
    try:
        _, cs, _ = _tlv(der, 0)                       # CertificateList
        _, ts, te = _tlv(der, cs)                     # TBSCertList
        fields = list(_children(der, ts, te))
        if fields and fields[0][0] == 0x02:           # version INTEGER (v2)
            fields = fields[1:]
        # signature, issuer, thisUpdate, nextUpdate OPTIONAL, ...
        issuer, _ = _name(der, fields[1][1], fields[1][2])
        this_update = _time(fields[2][0], der[fields[2][1]:fields[2][2]])
        nxt = fields[3] if len(fields) > 3 and fields[3][0] in (0x17, 0x18) else None
        next_update = _time(nxt[0], der[nxt[1]:nxt[2]]) if nxt is not None else None
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise DerError(f"not an X.509 CRL: {exc}") from None
    return CrlFacts(issuer, this_update, next_update)


_CRL_RE = re.compile(r"-----BEGIN X509 CRL-----(.+?)-----END X509 CRL-----", re.S)


def file_crls(path: Path) -> list[CrlFacts]:
    """Every CRL of a PEM file (OSError when unreadable, DerError when malformed)."""
    import base64
    text = path.read_text("ascii", "replace")
    try:
        return [crl_facts(base64.b64decode(m.group(1))) for m in _CRL_RE.finditer(text)]
    except ValueError as exc:
        raise DerError(f"not PEM: {exc}") from None


_PEM_RE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def pem_certificates(text: str) -> list[bytes]:
    """The DER of every certificate in a PEM text, in file order (leaf first in a chain)."""
    return [ssl.PEM_cert_to_DER_cert(m.group(0)) for m in _PEM_RE.finditer(text)]


def file_facts(path: Path) -> list[CertificateFacts]:
    """Every certificate of a PEM file (OSError when unreadable, DerError when malformed)."""
    return [certificate_facts(der) for der in pem_certificates(path.read_text("ascii", "replace"))]


def peer_facts(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> CertificateFacts | None:
    """The facts of the certificate the peer presented (and the handshake verified), if any."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return certificate_facts(der)
    except DerError:
        return None


# -- fastroute check --------------------------------------------------------------------------------

EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True, slots=True)
class Finding:
    """One result of :func:`check_listener` / :func:`check_peer`: ``error`` stops a start
    (or should), ``warning`` does not."""

    level: str          # "error" | "warning" | "ok"
    key: str            # the configuration key, e.g. tls.cert or destinations.pacs.tls.ca
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.key}: {self.message}"


def _expiry(key: str, path: Path, now: dt.datetime, findings: list[Finding]) -> None:
    """Every certificate of a PEM file: expired is an error, under 30 days a warning."""
    try:
        facts = file_facts(path)
    except (OSError, DerError, ValueError) as exc:
        findings.append(Finding("error", key, f"{path}: {exc}"))
        return
    if not facts:
        findings.append(Finding("error", key, f"{path}: no PEM certificate in it"))
        return
    for f in facts:
        days = f.days_left(now)
        what = f"{f.subject} ({f.fingerprint}) valid until {f.not_after:%Y-%m-%d %H:%M} UTC"
        if days < 0:
            findings.append(Finding("error", key, f"{path}: {what}: EXPIRED {-days:.0f} days ago"))
        elif f.not_before > now:
            findings.append(Finding("error", key, f"{path}: {what}: not valid before "
                                    f"{f.not_before:%Y-%m-%d %H:%M} UTC"))
        elif days < EXPIRY_WARNING_DAYS:
            findings.append(Finding("warning", key, f"{path}: {what}: expires in {days:.0f} days"))
        else:
            findings.append(Finding("ok", key, f"{path}: {what} ({days:.0f} days left)"))


def _crl_check(key: str, path: Path, now: dt.datetime, findings: list[Finding]) -> None:
    """A CRL past its nextUpdate fails every handshake: an error; due within a day: a warning."""
    try:
        crls = file_crls(path)
    except (OSError, DerError) as exc:
        findings.append(Finding("error", key, f"{path}: {exc}"))
        return
    if not crls:
        findings.append(Finding("error", key, f"{path}: no PEM CRL in it"))
        return
    for c in crls:
        if c.next_update is None:
            findings.append(Finding("ok", key, f"{path}: CRL of {c.issuer}, no next update given"))
            continue
        hours = (c.next_update - now).total_seconds() / 3600
        what = f"CRL of {c.issuer}, next update due {c.next_update:%Y-%m-%d %H:%M} UTC"
        if hours < 0:
            findings.append(Finding("error", key, f"{path}: {what}: OUT OF DATE, every client "
                                    "certificate will be refused until a new CRL is installed"))
        elif hours < 24:
            findings.append(Finding("warning", key, f"{path}: {what}: in {hours:.0f} hours"))
        else:
            findings.append(Finding("ok", key, f"{path}: {what}"))


def _context_check(prefix: str, build: Callable[[], object], findings: list[Finding]) -> None:
    try:
        build()
    except TlsSetupError as exc:
        findings.append(Finding("error", prefix, str(exc)))


def check_listener(cfg: TlsListenerConfig, prefix: str = "tls",
                   now: dt.datetime | None = None) -> list[Finding]:
    """Files exist and are readable, the key matches the certificate, the CA (and CRL)
    load, and no certificate has expired (a warning under 30 days)."""
    now = now or dt.datetime.now(dt.UTC)
    findings: list[Finding] = []
    for name, path in cfg.files().items():
        try:
            readable(f"{prefix}.{name}", path)
        except TlsSetupError as exc:
            findings.append(Finding("error", f"{prefix}.{name}", str(exc)))
    if any(f.level == "error" for f in findings):
        return findings
    _context_check(prefix, lambda: server_context(cfg), findings)
    _expiry(f"{prefix}.cert", cfg.cert, now, findings)
    if cfg.ca is not None:
        _expiry(f"{prefix}.ca", cfg.ca, now, findings)
    if cfg.crl is not None:
        _crl_check(f"{prefix}.crl", cfg.crl, now, findings)
    return findings


def check_peer(cfg: TlsPeerConfig, prefix: str, now: dt.datetime | None = None) -> list[Finding]:
    """The same for a destination's or a source's ``tls`` (``prefix``: its key path)."""
    now = now or dt.datetime.now(dt.UTC)
    findings: list[Finding] = []
    for name, path in cfg.files().items():
        try:
            readable(f"{prefix}.{name}", path)
        except TlsSetupError as exc:
            findings.append(Finding("error", f"{prefix}.{name}", str(exc)))
    if (cfg.cert is None) != (cfg.key is None):
        findings.append(Finding("error", prefix, "cert and key go together (both or neither)"))
    if any(f.level == "error" for f in findings):
        return findings
    _context_check(prefix, lambda: client_context(cfg), findings)
    if cfg.cert is not None:
        _expiry(f"{prefix}.cert", cfg.cert, now, findings)
    if cfg.ca is not None:
        _expiry(f"{prefix}.ca", cfg.ca, now, findings)
    return findings


__all__ = [
    "BCP195_CIPHERS", "LEGACY_CIPHERS", "TlsSetupError", "readable", "server_context", "client_context",
    "CertificateFacts", "DerError", "certificate_facts", "pem_certificates", "file_facts",
    "peer_facts", "normalise_dn", "normalise_fingerprint", "Finding", "check_listener", "check_peer",
    "EXPIRY_WARNING_DAYS", "CrlFacts", "crl_facts", "file_crls",
]
