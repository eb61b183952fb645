"""Who may associate with the listener: the one place an A-ASSOCIATE-RQ is accepted or refused."""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import NamedTuple

from fastroute.config import CertBinding, Config, normalise_dn
from fastroute.dicom.tls import CertificateFacts

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Rejection(NamedTuple):
    """An A-ASSOCIATE-RJ (result, source, reason) and why, for the log."""

    result: int
    source: int
    reason: int
    why: str
    audit: bool = False               # a security event for the audit trail, not only the log


def parse_networks(cfg: Config) -> list[Network] | None:
    return ([ipaddress.ip_network(p, strict=False) for p in cfg.allowed_peers]
            if cfg.allowed_peers is not None else None)


def check_access(cfg: Config, networks: Sequence[Network] | None,
                 calling: str, called: str, ip: str, others: int, same_ae: int = 0,
                 same_ip: int = 0, certificate: CertificateFacts | None = None) -> Rejection | None:
    """Decide an association request; None accepts it.

    ``others`` is the number of associations already established (on every listener process),
    ``same_ae`` / ``same_ip`` those of them from this calling AE title / this address. The
    precedence is the one pynetdicom's acceptor had (and DCMTK peers were tested against):
    peer address, calling AE, then the association limits over the called AE title. Every
    limit answers transient "local limit exceeded" (PS3.8 9.3.4: result 2, source 3, reason
    2): the modality may retry once an association ends. ``certificate`` is the client
    certificate of a TLS association (None: plain, or TLS without one); a calling AE bound to
    certificates (``allowed_calling_aes`` mappings) needs one that matches.
    """
    if networks is not None:
        try:
            addr = ipaddress.ip_address(ip)
            allowed = any(addr in net for net in networks)
        except ValueError:
            allowed = False
        if not allowed:
            return Rejection(0x01, 0x01, 0x01, "peer address not in allowed_peers")
    if cfg.allowed_calling_aes is not None and calling not in cfg.allowed_calling_aes:
        return Rejection(0x01, 0x01, 0x03, "calling AE title not in allowed_calling_aes")
    bound = cfg.calling_ae_certs.get(calling)
    if bound and not any(certificate_matches(b, certificate) for b in bound):
        presented = (f"certificate {certificate.subject} ({certificate.fingerprint})"
                     if certificate is not None else "no client certificate")
        return Rejection(0x01, 0x01, 0x03, f"calling AE title {calling} is bound to a client "
                         f"certificate and the association presented {presented}", audit=True)
    if others >= cfg.max_associations:
        return Rejection(0x02, 0x03, 0x02,
                         f"max_associations ({cfg.max_associations}) reached: local limit exceeded")
    if same_ae >= cfg.max_associations_per_ae:
        return Rejection(0x02, 0x03, 0x02, f"max_associations_per_ae ({cfg.max_associations_per_ae}) "
                         f"reached for calling AE {calling}: local limit exceeded")
    if same_ip >= cfg.max_associations_per_ip:
        return Rejection(0x02, 0x03, 0x02, f"max_associations_per_ip ({cfg.max_associations_per_ip}) "
                         f"reached for {ip}: local limit exceeded")
    if cfg.require_called_ae and called != cfg.ae_title:
        return Rejection(0x01, 0x01, 0x07, f"called AE title {called!r} is not {cfg.ae_title!r}")
    return None


def certificate_matches(binding: CertBinding, cert: CertificateFacts | None) -> bool:
    """Whether ``cert`` is the one ``binding`` names (every given criterion must hold)."""
    if cert is None:
        return False
    if binding.cert_fingerprint is not None and binding.cert_fingerprint != cert.fingerprint:
        return False
    if binding.cert_subject is not None:
        try:
            return normalise_dn(binding.cert_subject) == normalise_dn(cert.subject)
        except ValueError:            # a subject we cannot take apart matches nothing
            return False
    return True
