"""Issue 14 section 4: users with roles on the HTTP plane, hashed tokens, HTTPS with client
certificates, identity from a trusted reverse proxy, and the audit events of logins, reads and
refusals. The role matrix walks the OpenAPI document, so a route added without a role fails here."""
from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from fastroute.config import Config, load
from fastroute.ops.api import ACCESS, https_context, make_app, openapi_spec
from fastroute.ops.auth import Role, hash_token, verify_token
from fastroute.spool import Spool
from fastroute.spool.jobs import JobSpec

from test_ops import AGE, STUDY_A, config_text, fill
from test_tls_scp import Pki, new_pki

JOB = "m1"
# Fixed tokens, hashed once per module (scrypt is slow on purpose).
TOKENS = {"vera": "frt_viewer-token-0123456789abcdef", "otto": "frt_operator-token-0123456789abcdef",
          "ada": "frt_admin-token-0123456789abcdef"}
ROLES = {"vera": "viewer", "otto": "operator", "ada": "admin"}
Body = Callable[[TestClient, web.Application], Awaitable[None]]   # type: ignore[type-arg]


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {name: hash_token(token) for name, token in TOKENS.items()}


def users_yaml(hashes: dict[str, str], extra: str = "", http_extra: str = "") -> str:
    lines = [f"    {n}: {{role: {ROLES[n]}, token_hash: \"{h}\"}}" for n, h in hashes.items()]
    return "http:\n  host: 127.0.0.1\n" + http_extra + "  users:\n" + "\n".join(lines) + "\n" + extra


def make_cfg(tmp_path: Path, hashes: dict[str, str], extra: str = "", http_extra: str = "") -> tuple[Config, Path]:
    text = config_text(tmp_path / "spool", token=None, sources=True)
    text = text.replace("http: {host: 127.0.0.1}\n", users_yaml(hashes, extra, http_extra))
    path = tmp_path / "router.yaml"
    path.write_text(text)
    return load(path), path


@pytest.fixture
def env(tmp_path: Path, hashes: dict[str, str]) -> Iterator[tuple[Config, Path, Spool, list[int]]]:
    cfg, path = make_cfg(tmp_path, hashes)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    oids = fill(spool, time.time() - AGE)
    spool.jobs.create(JobSpec(name=JOB, source="oldpacs", destinations=("pacs",)))
    yield cfg, path, spool, oids
    spool.close()


def serve(cfg: Config, spool: Spool, path: Path, body: Body) -> None:
    async def main() -> None:
        app = make_app(cfg, spool, str(path), monitor_interval=0.05)
        async with TestClient(TestServer(app)) as client:
            await body(client, app)
    asyncio.run(main())


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def concrete(p: str, oid: int) -> str:
    out = (p.replace("{destination}", "pacs").replace("{study_instance_uid}", STUDY_A).replace("{name}", JOB)
           .replace("{oid}", str(oid)).replace("{filename}", "app.js").replace("{id}", "1"))
    assert "{" not in out, f"fill the placeholder of {p} in concrete()"
    return out + ("?patient_id=PAT1" if p == "/api/lookup" else "")


# -- tokens -------------------------------------------------------------------------------------

def test_token_hashes_are_salted_and_checked() -> None:
    a, b = hash_token("frt_same-token-for-both"), hash_token("frt_same-token-for-both")
    assert a != b and a.startswith("scrypt$") and "frt_same" not in a    # salted, the token not in it
    assert verify_token("frt_same-token-for-both", a) and verify_token("frt_same-token-for-both", b)
    assert not verify_token("frt_same-token-for-bot", a) and not verify_token("", a)
    assert not verify_token("x", "scrypt$16384$8$1$$") and not verify_token("x", "md5$abc")
    import base64
    import hashlib
    salt = b"0123456789abcdef"
    pb = "pbkdf2_sha256$1000$" + base64.urlsafe_b64encode(salt).decode().rstrip("=") + "$" + \
        base64.urlsafe_b64encode(hashlib.pbkdf2_hmac("sha256", b"tok", salt, 1000)).decode().rstrip("=")
    assert verify_token("tok", pb) and not verify_token("tok2", pb)


def test_config_takes_hashes_not_tokens(tmp_path: Path) -> None:
    from fastroute.config import loads
    from fastroute.errors import ConfigError
    with pytest.raises(ConfigError, match=r"http\.users\.bob\.token_hash.*not the token itself"):
        loads("http: {users: {bob: {role: admin, token_hash: my-plain-token}}}")
    with pytest.raises(ConfigError, match=r"http\.users\.bob\.role.*viewer, operator or admin"):
        loads("http: {users: {bob: {role: root, cert_subject: CN=bob}}}")
    with pytest.raises(ConfigError, match="no way to log in"):
        loads("http: {users: {bob: {role: viewer}}}")
    with pytest.raises(ConfigError, match="trusted_proxies"):
        loads("http: {trusted_proxies: [not-an-address]}")


def test_user_add_prints_the_token_once_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "fastroute.cli", "user", "add", "nina", "--role", "operator",
                          "--json"], capture_output=True, text=True, timeout=60, check=True).stdout
    doc = json.loads(out)
    assert doc["user"] == "nina" and doc["role"] == "operator" and doc["token"].startswith("frt_")
    assert doc["token"] not in doc["token_hash"] and verify_token(doc["token"], doc["token_hash"])
    text = config_text(tmp_path / "spool", token=None).replace(
        "http: {host: 127.0.0.1}\n", f"http:\n  users:\n    nina: {{role: operator, token_hash: \"{doc['token_hash']}\"}}\n")
    (tmp_path / "r.yaml").write_text(text)
    cfg = load(tmp_path / "r.yaml")
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        who = await (await c.get("/api/whoami", headers={"Authorization": f"Bearer {doc['token']}"})).json()
        assert who == {"user": "nina", "role": "operator", "via": "token",
                       "can": {"read": True, "act": True, "configure": False}}
        resp = await c.post("/api/queues/pacs/pause", json={"why": "test"},
                            headers={"Authorization": f"Bearer {doc['token']}"})
        assert resp.status == 200

    try:
        serve(cfg, spool, tmp_path / "r.yaml", body)
        pause = [e for e in spool.audit_events() if e["action"] == "pause"]
        assert [(e["who"], e["why"]) for e in pause] == [("nina", "test")]
        logins = [e for e in spool.audit_events() if e["action"] == "http_login"]
        assert [(e["who"], e["role"], e["peer"]) for e in logins] == [("nina", "operator", "127.0.0.1")]
    finally:
        spool.close()
    out = subprocess.run([sys.executable, "-m", "fastroute.cli", "user", "hash-token"], input="short\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "16 characters" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fastroute.cli", "user", "hash-token"],
                         input="an-old-shared-token-value\n", capture_output=True, text=True, timeout=60)
    m = re.fullmatch(r'token_hash: "(\S+)"\n', out.stdout)
    assert out.returncode == 0 and m and verify_token("an-old-shared-token-value", m.group(1))


# -- the role matrix ----------------------------------------------------------------------------

SAMPLE_BODIES: dict[str, Any] = {"/purge": {"states": ["failed"], "reason": "matrix"},
                                 "/api/migrations": {"source": "oldpacs", "destinations": ["pacs"], "name": "m9"},
                                 "/api/config/validate": {"text": "port: 104\n"}}


def test_role_matrix_over_every_route_of_the_openapi_document(env: Any) -> None:
    """Walk the published document: every operation declares its role (or is public), and each
    user gets exactly what its role allows: 403 below it, never 401/403 at or above it."""
    cfg, path, spool, oids = env
    spec = openapi_spec()
    ops = [(m.upper(), p, op) for p, item in spec["paths"].items() for m, op in item.items()]
    assert {(m, p) for m, p, _ in ops} == set(ACCESS), "the document and the enforced table differ"
    public = {(m, p) for m, p, op in ops if "security" not in op}
    assert public == {("GET", "/"), ("GET", "/static/{filename}"), ("GET", "/healthz"),
                      ("GET", "/openapi.json"), ("GET", "/metrics")}
    for m, p, op in ops:
        assert "x-required-role" in op, f"{m} {p} declares no role"
        if (m, p) in public:
            assert op["x-required-role"] == "none"
        else:
            assert op["x-required-role"] in ("viewer", "operator", "admin"), (m, p)
            assert op["x-required-role"] == ACCESS[(m, p)].role
    assert spec["paths"]["/api/lookup"]["get"]["x-patient-data"] is True
    assert spec["paths"]["/api/config/reload"]["post"]["x-required-role"] == "admin"
    assert spec["paths"]["/api/audit"]["get"]["x-required-role"] == "admin"   # who read whose data
    assert spec["paths"]["/api/queues/{destination}/purge"]["post"]["x-required-role"] == "operator"
    (cfg.spool / "run").mkdir(exist_ok=True)

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        checked = 0
        for m, p, op in ops:
            if (m, p) in public:
                assert (await c.request(m, concrete(p, oids[1]))).status == 200, p
                continue
            needed = Role(op["x-required-role"])
            url = concrete(p, oids[1])
            payload = next((v for k, v in SAMPLE_BODIES.items() if p.endswith(k)), {"why": "matrix"})
            resp = await c.request(m, url, json=payload)
            assert resp.status == 401, (m, p, resp.status)        # no credentials: nothing
            assert "PAT1" not in await resp.text()
            for name in ("vera", "otto", "ada"):
                role = Role(ROLES[name])
                resp = await c.request(m, url, json=payload, headers=bearer(name))
                text = await resp.text()
                if role.allows(needed):
                    assert resp.status not in (401, 403), (m, p, name, resp.status, text)
                else:
                    assert resp.status == 403, (m, p, name, resp.status, text)
                    assert f"needs {needed}" in json.loads(text)["error"] and "PAT1" not in text
                checked += 1
        assert checked == 3 * (len(ops) - len(public))

    serve(cfg, spool, path, body)
    denied = [e for e in spool.audit_events() if e["action"] == "http_denied"]
    # below-role refusals are audited under the user's name, with where from and why
    assert {e["who"] for e in denied} == {"anonymous", "vera", "otto"}
    assert any(e["who"] == "vera" and e["path"] == "/api/queues/pacs/purge" and e["status"] == 403
               and "below operator" in e["why"] for e in denied)
    assert any(e["who"] == "otto" and e["path"] == "/api/config/reload" for e in denied)


def test_reads_of_patient_data_are_audited_once_per_window(env: Any) -> None:
    cfg, path, spool, oids = env

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        for _ in range(3):   # a polling dashboard: one event, not three
            assert (await c.get(f"/api/studies/{STUDY_A}", headers=bearer("vera"))).status == 200
        assert (await c.get(f"/api/studies/{STUDY_A}", headers=bearer("otto"))).status == 200
        assert (await c.get("/api/status", headers=bearer("vera"))).status == 200   # no patient data
        assert (await c.get("/api/lookup?accession_number=ACC2", headers=bearer("vera"))).status == 200
        for _ in range(3):
            assert (await c.get("/api/lookup", headers={"Authorization": "Bearer frt_guessed"})).status == 401
        # after a wrong token, an address's next unknown token is not even hashed for a second
        # (guessing cannot eat CPU); tokens already known to the process are not held up
        resp = await c.get("/api/whoami", headers=bearer("ada"))
        assert resp.status == 401 and "waits" in (await resp.json())["error"]
        assert (await c.get("/api/whoami", headers=bearer("vera"))).status == 200
        deadline = time.monotonic() + 10
        while (resp := await c.get("/api/whoami", headers=bearer("ada"))).status != 200:
            assert time.monotonic() < deadline, "ada's token never accepted after the delay"
            await asyncio.sleep(0.1)
        assert (await resp.json())["user"] == "ada"

    serve(cfg, spool, path, body)
    events = list(spool.audit_events())
    reads = [(e["who"], e["path"], e.get("study_instance_uid"), e.get("accession_number"), e["via"])
             for e in events if e["action"] == "http_read"]
    assert reads == [("vera", f"/api/studies/{STUDY_A}", STUDY_A, None, "token"),
                     ("otto", f"/api/studies/{STUDY_A}", STUDY_A, None, "token"),
                     ("vera", "/api/lookup", None, "ACC2", "token")]
    denied = [e for e in events if e["action"] == "http_denied"]
    waits = "wrong bearer token (after a wrong token, this address waits 1 s)"
    # coalesced per client, route and reason: three events for the 3 + 1 (+ polls) refusals
    assert [(e["who"], e["path"], e["why"], e["peer"]) for e in denied] == [
        ("anonymous", "/api/lookup", "wrong bearer token", "127.0.0.1"),
        ("anonymous", "/api/lookup", waits, "127.0.0.1"), ("anonymous", "/api/whoami", waits, "127.0.0.1")]
    assert spool.audit_verify()[0]


def test_legacy_token_is_an_admin_user(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = config_text(tmp_path / "spool", token="old-shared-secret")
    (tmp_path / "r.yaml").write_text(text)
    cfg = load(tmp_path / "r.yaml")
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        who = await (await c.get("/api/whoami", headers={"Authorization": "Bearer old-shared-secret"})).json()
        assert (who["user"], who["role"], who["can"]["configure"]) == ("http.token", "admin", True)

    try:
        with caplog.at_level("WARNING", logger="fastroute.api"):
            serve(cfg, spool, tmp_path / "r.yaml", body)
    finally:
        spool.close()
    assert any("http.token is deprecated" in r.getMessage() for r in caplog.records)


# -- reverse proxy ------------------------------------------------------------------------------

def test_identity_from_a_trusted_proxy_only(tmp_path: Path, hashes: dict[str, str]) -> None:
    """A proxy in http.trusted_proxies names the user (by name or by the client certificate's DN it
    verified); the same headers from anyone else are ignored."""
    carol = "    carol: {role: operator, cert_subject: \"CN=carol,O=Test Hospital\"}\n"
    for trusted, honoured in (("[127.0.0.1/32]", True), ("[10.0.0.0/8]", False)):
        d = tmp_path / trusted.strip("[]").replace("/", "_")
        d.mkdir()
        cfg, path = make_cfg(d, hashes, extra=carol, http_extra=f"  trusted_proxies: {trusted}\n")
        spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)

        async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
            resp = await c.get("/api/whoami", headers={"X-Forwarded-User": "ada"})
            if honoured:
                assert (await resp.json())["user"] == "ada" and (await resp.json())["via"] == "proxy"
                resp = await c.get("/api/whoami", headers={"X-SSL-Client-S-DN": "O=Test Hospital,CN=carol"})
                assert (await resp.json())["user"] == "carol" and (await resp.json())["role"] == "operator"
                resp = await c.get("/api/whoami", headers={"X-Forwarded-User": "mallory"})
                assert resp.status == 401 and "mallory" in (await resp.json())["error"]
                # the proxy's session rides along with any request the browser makes: a page of
                # another site may not make it act; the dashboard's own origin may
                proxied = {"X-Forwarded-User": "ada"}
                resp = await c.post("/api/queues/pacs/pause", headers={**proxied, "Origin": "https://evil.example"})
                assert resp.status == 403 and "cross-site" in (await resp.json())["error"]
                resp = await c.post("/api/queues/pacs/pause", headers={**proxied, "Sec-Fetch-Site": "cross-site"})
                assert resp.status == 403 and not spool.is_paused("pacs")
                origin = f"http://{c.server.host}:{c.server.port}"
                resp = await c.post("/api/queues/pacs/pause", headers={**proxied, "Origin": origin})
                assert resp.status == 200 and spool.is_paused("pacs")
                # a bearer token is never sent by the browser on its own: no origin check needed
                resp = await c.post("/api/queues/pacs/resume", headers={**bearer("otto"), "Origin": "https://x.example"})
                assert resp.status == 200
            else:
                assert resp.status == 401
                # a token still works from an untrusted address; the header does not raise it to ada
                resp = await c.get("/api/whoami", headers={"X-Forwarded-User": "ada", **bearer("vera")})
                assert (await resp.json())["user"] == "vera"

        try:
            serve(cfg, spool, path, body)
            logins = [(e["who"], e["via"]) for e in spool.audit_events() if e["action"] == "http_login"]
            assert logins == ([("ada", "proxy"), ("carol", "proxy"), ("otto", "token")] if honoured
                              else [("vera", "token")])
        finally:
            spool.close()


# -- HTTPS --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = new_pki(tmp_path_factory.mktemp("httpspki"))
    pki.issue("server", "localhost", days=90)
    pki.issue("dave", "dave.hospital")
    pki.issue("stranger", "dave.hospital", ca="otherca")
    pki.issue("nurse", "nurse.hospital")        # a valid certificate no user names
    return pki


def _client_ctx(pki: Pki, who: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.p("ca.pem")))
    if who:
        ctx.load_cert_chain(str(pki.p(f"{who}.pem")), str(pki.p(f"{who}.key")))
    return ctx


@pytest.mark.parametrize("required", [False, True])
def test_https_with_client_certificates(tmp_path: Path, hashes: dict[str, str], pki: Pki, required: bool) -> None:
    dave = "    dave: {role: admin, cert_subject: \"CN=dave.hospital,O=Test Hospital\"}\n"
    tls = (f"  tls: {{cert: {pki.p('server.pem')}, key: {pki.p('server.key')}, ca: {pki.p('ca.pem')}, "
           f"require_client_cert: {str(required).lower()}}}\n")
    cfg, path = make_cfg(tmp_path, hashes, extra=dave, http_extra=tls)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    fill(spool, time.time() - AGE)
    assert cfg.http is not None
    context = https_context(cfg.http)
    assert context is not None and context.minimum_version >= ssl.TLSVersion.TLSv1_2

    async def main() -> None:
        runner = web.AppRunner(make_app(cfg, spool, str(path)))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        base = f"https://localhost:{port}"
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{base}/api/whoami", ssl=_client_ctx(pki, "dave")) as r:
                    assert (await r.json()) == {"user": "dave", "role": "admin", "via": "client-cert",
                                                "can": {"read": True, "act": True, "configure": True}}
                async with s.get(f"{base}/api/lookup?patient_id=PAT1", ssl=_client_ctx(pki, "dave")) as r:
                    assert r.status == 200 and (await r.json())["count"] == 3
                if required:   # no certificate: no TLS session at all
                    with pytest.raises(aiohttp.ClientError):
                        async with s.get(f"{base}/healthz", ssl=_client_ctx(pki, None)) as r:
                            await r.read()
                else:          # no certificate: a token over HTTPS
                    async with s.get(f"{base}/api/whoami", ssl=_client_ctx(pki, None), headers=bearer("vera")) as r:
                        assert (await r.json())["user"] == "vera"
                    async with s.get(f"{base}/api/lookup?patient_id=PAT1", ssl=_client_ctx(pki, None)) as r:
                        assert r.status == 401 and "PAT1" not in await r.text()
                # a valid certificate no user names: refused, unless the request has a token too
                async with s.get(f"{base}/api/whoami", ssl=_client_ctx(pki, "nurse")) as r:
                    assert r.status == 401 and "CN=nurse.hospital" in (await r.json())["error"]
                async with s.get(f"{base}/api/whoami", ssl=_client_ctx(pki, "nurse"), headers=bearer("vera")) as r:
                    assert (await r.json())["user"] == "vera"
                with pytest.raises(aiohttp.ClientError):   # a certificate of another CA is refused
                    async with s.get(f"{base}/healthz", ssl=_client_ctx(pki, "stranger")) as r:
                        await r.read()
                with pytest.raises(aiohttp.ClientError):   # plain HTTP on the HTTPS port gets nothing
                    async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                        await r.read()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
        reads = [e for e in spool.audit_events() if e["action"] == "http_read"]
        assert [(e["who"], e["via"], e["patient_id"]) for e in reads] == [("dave", "client-cert", "PAT1")]
    finally:
        spool.close()


def test_check_validates_http_tls(tmp_path: Path, hashes: dict[str, str], pki: Pki) -> None:
    """``fastroute check``: the HTTPS files exist, the key matches the certificate, expiry shown."""
    def check(cert: str, key: str) -> subprocess.CompletedProcess[str]:
        tls = f"  tls: {{cert: {pki.p(cert)}, key: {pki.p(key)}}}\n"
        d = tmp_path / f"{cert}-{key}"
        d.mkdir()
        _, path = make_cfg(d, hashes, http_extra=tls)
        return subprocess.run([sys.executable, "-m", "fastroute.cli", "check", "-c", str(path)],
                              capture_output=True, text=True, timeout=60)

    good = check("server.pem", "server.key")
    assert good.returncode == 0, good.stderr
    assert "ok: http.tls.cert" in good.stdout and "days left" in good.stdout
    assert "https://127.0.0.1:8080/" in good.stdout
    assert "users: ada (admin), otto (operator), vera (viewer)" in good.stdout
    assert "warning: http" not in good.stdout
    bad = check("server.pem", "dave.key")
    assert bad.returncode == 1 and "error: http.tls" in bad.stderr and "does not match" in bad.stderr
    missing = check("nope.pem", "server.key")
    assert missing.returncode == 1 and "http.tls.cert" in missing.stderr and "no such file" in missing.stderr


def test_https_through_the_supervisor_with_dcmtk_traffic(router: Any, tmp_path: Path, pki: Pki,
                                                         hashes: dict[str, str]) -> None:
    """End to end: ``fastroute serve`` with http.users and http.tls; DCMTK storescu sends a study;
    a client-certificate user reads it over HTTPS, a viewer token may not act, and the audit trail
    names them."""
    import peers
    import pydicom
    import synth
    import urllib.error
    import urllib.request

    port = peers.free_port()
    users = {n: {"role": ROLES[n], "token_hash": h} for n, h in hashes.items()}
    users["dave"] = {"role": "operator", "cert_subject": "CN=dave.hospital,O=Test Hospital"}
    r = router({"http": {"host": "127.0.0.1", "port": port, "users": users,
                         "tls": {"cert": str(pki.p("server.pem")), "key": str(pki.p("server.key")),
                                 "ca": str(pki.p("ca.pem"))}}})
    files = synth.make_tiny(tmp_path / "study", n=3)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    sent = peers.storescu(r.port, files)
    assert sent.returncode == 0, sent.stderr

    def call(path: str, who: str | None, headers: dict[str, str] | None = None,
             data: bytes | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(f"https://localhost:{port}{path}", headers=headers or {}, data=data,
                                     method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, context=_client_ctx(pki, who), timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    peers.wait_until(lambda: peers.is_listening(port), 30, message=lambda: r.log_tail())
    lookup = f"/api/lookup?study_instance_uid={ds.StudyInstanceUID}"
    status, doc = peers.wait_until(lambda: (lambda s: s if s[0] == 200 and s[1]["count"] == 3 else None)(
        call(lookup, "dave")), 30, message=lambda: r.log_tail())
    assert doc["objects"][0]["patient_id"] == ds.PatientID
    status, doc = call(lookup, None)
    assert status == 401 and ds.PatientID not in json.dumps(doc)
    status, doc = call("/api/queues/unrouted/purge", None, headers={**bearer("vera"), "Content-Type":
                                                                    "application/json"},
                       data=b'{"states": ["unrouted"], "reason": "x"}')
    assert status == 403 and "needs operator" in doc["error"]
    assert f"dashboard and API on https://127.0.0.1:{port}/" in r.log_text()
    def audited() -> list[dict[str, Any]] | None:
        """The study's events once its 3 receipts are written (gathered for up to a second)."""
        out = r.cli("audit", "--study", ds.StudyInstanceUID).stdout
        found = [json.loads(line) for line in out.splitlines()]
        return found if sum(e["objects"] for e in found if e["action"] == "received") >= 3 else None
    events = peers.wait_until(audited, 30, message=lambda: r.log_tail())
    assert [(e["who"], e["via"]) for e in events if e["action"] == "http_read"] == [("dave", "client-cert")]
    receipts = [e for e in events if e["action"] == "received"]   # per study batch, not per object
    assert sum(e["objects"] for e in receipts) == 3 and len(receipts) <= 3
    assert {(e["calling_ae"], e["called_ae"], e["peer"]) for e in receipts} == {("STORESCU", "FASTROUTE", "127.0.0.1")}
    out = r.cli("audit").stdout
    denied = [json.loads(line) for line in out.splitlines() if '"http_denied"' in line]
    assert {(e["who"], e["status"]) for e in denied} == {("anonymous", 401), ("vera", 403)}


def test_receipts_are_audited_per_study_and_sender_not_per_object(tmp_path: Path) -> None:
    """Issue 14 section 3: a group commit writes one ``received`` event per study and sender, in
    the same transaction as the objects (measured: per object would cost ~30% of put_many)."""
    from test_ops import incoming
    spool = Spool(tmp_path / "spool", map_size=1 << 28)
    try:
        items = [incoming(f"1.2.3.{i}", "1.2.3", ("pacs",)) for i in range(20)]
        items += [incoming("4.5.6.1", "4.5.6", ("pacs",), calling="MR1", patient="PAT9")]
        results = spool.put_many(items)
        oids = [r.oid for r in results]   # type: ignore[union-attr]
        receipts = [e for e in spool.audit_events() if e["action"] == "received"]
        assert [(e["who"], e["study_instance_uid"], e["objects"], e["oids"]) for e in receipts] == [
            ("CT1", "1.2.3", 20, [oids[0], oids[19]]), ("MR1", "4.5.6", 1, [oids[20]])]
        assert receipts[0]["peer"] == "10.0.0.5" and receipts[0]["called_ae"] == "FASTROUTE"
        assert spool.audit_verify()[0]
    finally:
        spool.close()


def test_check_warns_about_a_shared_token_and_plain_http_to_the_network(tmp_path: Path) -> None:
    text = config_text(tmp_path / "spool", token="old-shared-secret").replace("host: 127.0.0.1, port: 8080",
                                                                               "host: 0.0.0.0, port: 8080")
    (tmp_path / "r.yaml").write_text(text)
    out = subprocess.run([sys.executable, "-m", "fastroute.cli", "check", "-c", str(tmp_path / "r.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "warning: http.token is deprecated" in out.stdout
    assert "warning: http.host 0.0.0.0 serves tokens and patient data over plain HTTP" in out.stdout
    assert "users: http.token (admin, deprecated)" in out.stdout


def test_users_file_beside_the_configuration(tmp_path: Path, hashes: dict[str, str]) -> None:
    """``http.users_file``: users kept out of the main file (relative to it), merged with http.users."""
    from fastroute.errors import ConfigError
    (tmp_path / "users.yaml").write_text(f'otto: {{role: operator, token_hash: "{hashes["otto"]}"}}\n')
    text = config_text(tmp_path / "spool", token=None).replace(
        "http: {host: 127.0.0.1}\n", f'http:\n  users_file: users.yaml\n  users:\n'
                                     f'    vera: {{role: viewer, token_hash: "{hashes["vera"]}"}}\n')
    (tmp_path / "r.yaml").write_text(text)
    cfg = load(tmp_path / "r.yaml")
    assert cfg.http is not None and {n: u.role for n, u in cfg.http.users.items()} == {
        "vera": "viewer", "otto": "operator"}
    assert cfg.http.users_file == tmp_path / "users.yaml"
    (tmp_path / "users.yaml").write_text(f'otto: {{role: operator, token_hash: "{hashes["otto"]}"}}\n'
                                         f'vera: {{role: admin, token_hash: "{hashes["vera"]}"}}\n')
    with pytest.raises(ConfigError, match="vera defined both"):
        load(tmp_path / "r.yaml")
    (tmp_path / "users.yaml").write_text("otto: {role: operator}\nnina: {role: boss, cert_subject: CN=n}\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "r.yaml")
    assert "users.yaml" in str(info.value) and ":1:" in str(info.value) and "no way to log in" in str(info.value)


def test_https_certificate_renewed_under_the_same_paths_is_served_after_sighup(
        router: Any, tmp_path: Path, pki: Pki) -> None:
    """A renewed certificate copied over the configured files is served to new connections once
    the supervisor gets SIGHUP (relayed to the HTTP process, which is not restarted); a broken
    renewal keeps the running certificate."""
    import os
    import shutil
    import signal
    import peers

    pki.issue("renewed", "localhost", days=365)
    cert, key = tmp_path / "http.pem", tmp_path / "http.key"
    shutil.copy(pki.p("server.pem"), cert)
    shutil.copy(pki.p("server.key"), key)
    port = peers.free_port()
    r = router({"http": {"host": "127.0.0.1", "port": port, "tls": {"cert": str(cert), "key": str(key)}}})
    peers.wait_until(lambda: peers.is_listening(port), 30, message=lambda: r.log_tail())

    def served() -> bytes:
        return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))

    def der(path: Path) -> bytes:
        return ssl.PEM_cert_to_DER_cert(path.read_text())

    assert served() == der(pki.p("server.pem"))
    http_pid = int(re.findall(r"started http \(pid (\d+)\)", r.log_text())[-1])
    shutil.copy(pki.p("renewed.pem"), cert)
    shutil.copy(pki.p("renewed.key"), key)
    os.kill(r.proc.pid, signal.SIGHUP)
    peers.wait_until(lambda: served() == der(pki.p("renewed.pem")), 30,
                     message=lambda: r.log_tail())
    assert "HTTPS certificate reloaded" in r.log_text()
    assert int(re.findall(r"started http \(pid (\d+)\)", r.log_text())[-1]) == http_pid   # not restarted
    key.write_text("not a key\n")                              # a broken renewal
    os.kill(r.proc.pid, signal.SIGHUP)
    peers.wait_until(lambda: "HTTPS certificate not reloaded" in r.log_text(), 30, message=lambda: r.log_tail())
    assert served() == der(pki.p("renewed.pem"))
