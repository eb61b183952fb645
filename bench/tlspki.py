"""A throw-away PKI for DICOM TLS runs (bench ``--tls``, tests/test_tls_scu.py), made with the
``openssl`` command line so that neither ``cryptography`` nor pyOpenSSL is needed.

``make_pki(dir)`` writes, each as ``NAME.pem`` (certificate) and ``NAME.key`` (EC P-256 key):
``ca`` and ``otherca`` (self-signed roots), ``server`` (CN/SAN localhost and 127.0.0.1, from
``ca``), ``client`` (from ``ca``), ``wronghost`` (a server certificate for another name, from
``ca``) and ``stranger`` (a server certificate from ``otherca``). ``issue`` makes more, with a
validity of its own (``days``), e.g. one about to expire.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(cwd: Path, *args: str) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                         check=False, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {res.stderr.strip()}")


@dataclass(frozen=True, slots=True)
class Pki:
    dir: Path

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def root(self, name: str, cn: str, days: int = 365) -> None:
        _openssl(self.dir, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", str(days),
                 "-subj", f"/O=fastroute test/CN={cn}")

    def issue(self, name: str, cn: str, *, ca: str = "ca", days: int = 90,
              san: str = "DNS:localhost,IP:127.0.0.1") -> None:
        """``name``.pem/.key for CN=cn signed by ``ca``, valid for ``days`` from now."""
        _openssl(self.dir, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/O=fastroute test/CN={cn}", "-addext", f"subjectAltName={san}")
        _openssl(self.dir, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
                 f"{ca}.key", "-CAcreateserial", "-days", str(days), "-out", f"{name}.pem",
                 "-copy_extensions", "copy")


_CA_CNF = """[ca]
default_ca = ca_default
[ca_default]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = policy_any
unique_subject = no
copy_extensions = copy
[policy_any]
commonName = supplied
organizationName = optional
"""


def issue_dated(pki: Pki, name: str, cn: str, start: str, end: str, *, ca: str = "ca",
                san: str = "DNS:localhost,IP:127.0.0.1") -> None:
    """A certificate with explicit validity (``YYYYMMDDHHMMSSZ``), e.g. one long expired:
    ``openssl ca`` (``x509 -req`` of OpenSSL 3.0 cannot set past dates)."""
    d = pki.dir
    if not (d / "ca.cnf").exists():
        (d / "index.txt").write_text("")
        (d / "serial").write_text("1000\n")
        (d / "ca.cnf").write_text(_CA_CNF.format(dir=d))
    _openssl(d, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/O=fastroute test/CN={cn}",
             "-addext", f"subjectAltName={san}")
    _openssl(d, "ca", "-batch", "-config", "ca.cnf", "-cert", f"{ca}.pem", "-keyfile", f"{ca}.key",
             "-in", f"{name}.csr", "-out", f"{name}.pem", "-notext", "-startdate", start, "-enddate", end)


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    pki = Pki(d)
    pki.root("ca", "fastroute test CA")
    pki.root("otherca", "another CA")
    pki.issue("server", "localhost")
    pki.issue("client", "fastroute.test", san="DNS:fastroute.test")
    pki.issue("wronghost", "pacs.elsewhere", san="DNS:pacs.elsewhere")
    pki.issue("stranger", "localhost", ca="otherca")
    return pki


__all__ = ["Pki", "make_pki", "issue_dated"]
