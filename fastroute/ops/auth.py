"""Users, roles and how a request proves who it is (issue 14 section 4).

Tokens are random (256 bits) and stored only as salted scrypt hashes (``http.users.NAME.token_hash``),
so a leaked configuration or audit diff does not give anyone access. Checking a token means hashing
it once per user (scrypt is slow on purpose), so a token that matched is remembered by its SHA-256
for the life of the process: a dashboard polling every two seconds costs one scrypt, not hundreds.
Every comparison is constant-time.

Identity comes, in this order, from: a client certificate on the HTTPS listener; the headers of a
configured trusted reverse proxy (``http.trusted_proxies``: anyone else's are ignored, and logged);
a bearer token. The deprecated ``http.token`` is the admin user ``http.token``.
"""
from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Mapping

from fastroute.config import HttpConfig, normalise_dn, normalise_fingerprint

log = logging.getLogger("fastroute.api")

LEGACY_USER = "http.token"           # the name the deprecated shared token acts under
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1   # 16 MiB, ~30 ms: fine once per token per process
_CACHE_MAX = 1024


class Role(enum.StrEnum):
    """What a user may do; each role may do everything the ones below it may."""

    VIEWER = "viewer"        # read status and patient data (lookups, study trace, queue entries ...)
    OPERATOR = "operator"    # and act: retry, purge, pause, resume, send now, migrations
    ADMIN = "admin"          # and change the configuration: validate, reload

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}


class Via(enum.StrEnum):
    """How a request was authenticated (recorded in audit events)."""

    TOKEN = "token"
    CERT = "client-cert"
    PROXY = "proxy"
    NONE = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request, with what role, proven how."""

    name: str
    role: Role | None
    via: Via


ANONYMOUS = Principal("anonymous", None, Via.NONE)


def new_token() -> str:
    """A fresh bearer token (URL-safe, 256 bits of randomness)."""
    return "frt_" + secrets.token_urlsafe(32)


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def hash_token(token: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$N$r$p$salt$hash`` (salt 16 random bytes, hash 32 bytes, both base64url)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(token.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_token(token: str, stored: str) -> bool:
    """Whether ``token`` hashes to ``stored`` (scrypt or pbkdf2_sha256), compared in constant time."""
    parts = stored.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, want = _unb64(parts[4]), _unb64(parts[5])
            got = hashlib.scrypt(token.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20),
                                 dklen=len(want))
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            salt, want = _unb64(parts[2]), _unb64(parts[3])
            got = hashlib.pbkdf2_hmac("sha256", token.encode(), salt, int(parts[1]), dklen=len(want))
        else:
            return False
    except (ValueError, OverflowError, MemoryError):   # a malformed hash matches nothing
        return False
    return hmac.compare_digest(got, want)


def cert_fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def subject_from_peercert(peercert: Mapping[str, object] | None) -> str:
    """The subject of ``SSLSocket.getpeercert()`` as an RFC 4514-style string ("CN=a,O=b")."""
    if not peercert:
        return ""
    subject = peercert.get("subject") or ()
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
             "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "emailAddress"}
    parts = []
    for rdn in subject:   # type: ignore[attr-defined]
        for k, v in rdn:
            parts.append(f"{names.get(k, k)}={v}")
    return ",".join(parts)


class Authenticator:
    """Maps credentials to configured users (one per HTTP process, built from ``http:``)."""

    def __init__(self, http: HttpConfig) -> None:
        self.http = http
        self.roles: dict[str, Role] = {name: Role(u.role) for name, u in http.users.items()}
        self._by_dn = {normalise_dn(u.cert_subject): name for name, u in http.users.items() if u.cert_subject}
        self._by_fp = {u.cert_fingerprint: name for name, u in http.users.items() if u.cert_fingerprint}
        self._hashes = [(name, u.token_hash) for name, u in http.users.items() if u.token_hash]
        self._legacy = hashlib.sha256(http.token.encode("utf-8", "replace")).digest() if http.token else None
        if http.token:
            self.roles.setdefault(LEGACY_USER, Role.ADMIN)
        self._proxies = [ipaddress.ip_network(c, strict=False) for c in http.trusted_proxies]
        self._cache: dict[bytes, str] = {}
        self._lock = threading.Lock()

    @property
    def hashed(self) -> bool:
        """Whether checking an unknown token costs scrypt (some user has a token hash)."""
        return bool(self._hashes)

    @property
    def configured(self) -> bool:
        """Whether anyone can log in at all (else patient data is served to no one)."""
        return bool(self.roles)

    def _principal(self, name: str, via: Via) -> Principal:
        return Principal(name, self.roles[name], via)

    def by_token_cached(self, token: str) -> Principal | None:
        """The user of a token already checked by this process (no scrypt: on the event loop)."""
        given = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        if self._legacy is not None and hmac.compare_digest(given, self._legacy):
            return self._principal(LEGACY_USER, Via.TOKEN)
        with self._lock:
            known = self._cache.get(given)
        return self._principal(known, Via.TOKEN) if known is not None else None

    def by_token(self, token: str) -> Principal | None:
        """The user whose token this is (blocking: scrypt; run it off the event loop)."""
        given = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        if self._legacy is not None and hmac.compare_digest(given, self._legacy):
            return self._principal(LEGACY_USER, Via.TOKEN)
        with self._lock:
            known = self._cache.get(given)
        if known is not None:
            return self._principal(known, Via.TOKEN)
        for name, stored in self._hashes:
            if verify_token(token, stored):
                with self._lock:
                    if len(self._cache) >= _CACHE_MAX:
                        self._cache.clear()
                    self._cache[given] = name
                return self._principal(name, Via.TOKEN)
        return None

    def by_cert(self, subject: str, fingerprint: str) -> Principal | None:
        """The user a client certificate (verified by the TLS layer or a trusted proxy) maps to."""
        if fingerprint:
            name = self._by_fp.get(normalise_fingerprint(fingerprint))
            if name is not None:
                return self._principal(name, Via.CERT)
        if subject:
            try:
                name = self._by_dn.get(normalise_dn(subject))
            except ValueError:
                return None
            if name is not None:
                return self._principal(name, Via.CERT)
        return None

    def trusted_proxy(self, remote: str | None) -> bool:
        if not remote or not self._proxies:
            return False
        try:
            addr = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(addr in net for net in self._proxies)

    def by_proxy(self, headers: Mapping[str, str]) -> Principal | None:
        """The user a trusted proxy vouches for: by name, else by the client certificate's DN."""
        name = headers.get(self.http.proxy_user_header, "").strip()
        if name:
            return self._principal(name, Via.PROXY) if name in self.roles else None
        dn = headers.get(self.http.proxy_cert_header, "").strip()
        if dn:
            p = self.by_cert(dn, "")
            return Principal(p.name, p.role, Via.PROXY) if p is not None else None
        return None


__all__ = ["Authenticator", "Principal", "Role", "Via", "ANONYMOUS", "LEGACY_USER", "hash_token", "verify_token",
           "new_token", "cert_fingerprint", "subject_from_peercert"]
