"""Every certificate the configuration names, and how many days each has left.

A certificate that expires stops a TLS peer without warning: the listener's own certificate
(modalities refuse it), a destination's or a source's client certificate (the PACS refuses us),
or a CA that a peer's certificate chains to (we refuse it). /metrics shows the days left of each
(``fastroute_tls_certificate_expiry_days``) and the alerts raise ``certificate_expiry`` when
one has fewer than ``alerts.certificate_expiry`` (default 30 days) left, or cannot be read.

The files are read on every call (a scrape, a monitor round): certificates renewed in place
(and reloaded by SIGHUP) show their new dates at once; the files are small.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastroute.config import Config, TlsPeerConfig
from fastroute.dicom.tls import DerError, file_facts


@dataclass(frozen=True, slots=True)
class CertificateExpiry:
    """One certificate of one configured file (or the file, when it cannot be read)."""

    role: str           # listener | destination | source | http
    name: str           # the destination's or source's name; "tls" / "http" for the planes
    key: str            # the configuration key of its file, e.g. destinations.pacs.tls.ca
    path: Path
    subject: str = ""   # RFC 4514; "" when the file could not be read
    not_after: dt.datetime | None = None
    days_left: float | None = None
    error: str = ""     # why the file could not be read

    @property
    def ident(self) -> str:
        """Stable across renewals (no dates, no fingerprint): the alert's key."""
        return f"{self.key} {self.subject}".strip()


def configured_files(cfg: Config) -> Iterator[tuple[str, str, str, Path]]:
    """(role, name, key, path) of every certificate file: own certificates and CA files."""
    if cfg.tls is not None:
        yield "listener", "tls", "tls.cert", cfg.tls.cert
        if cfg.tls.ca is not None:
            yield "listener", "tls", "tls.ca", cfg.tls.ca
    peers: list[tuple[str, str, str, object]] = [
        *(("destination", "destinations", n, d) for n, d in cfg.destinations.items()),
        *(("source", "sources", n, s) for n, s in cfg.sources.items())]
    for role, section, name, peer in peers:
        peer_tls = getattr(peer, "tls", None)
        if isinstance(peer_tls, TlsPeerConfig):
            if peer_tls.cert is not None:
                yield role, name, f"{section}.{name}.tls.cert", peer_tls.cert
            if peer_tls.ca is not None:
                yield role, name, f"{section}.{name}.tls.ca", peer_tls.ca
    http_tls = getattr(cfg.http, "tls", None)         # http: {tls: {cert, key}} (issue 14 part 4)
    http_cert = getattr(http_tls, "cert", None)
    if isinstance(http_cert, Path):
        yield "http", "http", "http.tls.cert", http_cert


def certificate_expiry(cfg: Config, now: dt.datetime | None = None) -> list[CertificateExpiry]:
    """Every certificate of every configured file, with its days left (negative: expired)."""
    now = now or dt.datetime.now(dt.UTC)
    out: list[CertificateExpiry] = []
    seen: set[tuple[str, str, str]] = set()
    for role, name, key, path in configured_files(cfg):
        try:
            facts = file_facts(path)
            if not facts:
                raise DerError("no PEM certificate in it")
        except (OSError, ValueError) as exc:       # DerError is a ValueError
            out.append(CertificateExpiry(role, name, key, path, error=str(exc)))
            continue
        for f in facts:
            if (role, name, f.subject) in seen:     # the same CA in two files, a chain's repeat
                continue
            seen.add((role, name, f.subject))
            out.append(CertificateExpiry(role, name, key, path, f.subject, f.not_after, f.days_left(now)))
    return out


__all__ = ["CertificateExpiry", "configured_files", "certificate_expiry"]
