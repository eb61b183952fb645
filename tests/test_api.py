"""The HTTP management plane against a real spool: every endpoint, auth, config, metrics, alerts."""
from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

import fastroute
from fastroute import native
from fastroute.ops.api import ACCESS, MAX_BODY_BYTES, ROUTES, http_main, is_public, make_app, openapi_spec
from fastroute.config import Config
from fastroute.spool.senderstate import DestinationState, SenderState
from fastroute.spool import Outcome, OutcomeKind, Spool
from fastroute.spool.jobs import REPORT_COLUMNS, InstanceRecord, JobSpec, StudyRecord, StudyState

from test_ops import AGE, STUDY_A, STUDY_B, Hup, fill, make_config

TOKEN = {"Authorization": "Bearer s3cret"}
JOB = "m1"   # a migration job every env has (issue 13)
Body = Callable[[TestClient, web.Application], Awaitable[None]]   # type: ignore[type-arg]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Config, Path, Spool, list[int]]]:
    cfg, path = make_config(tmp_path, sources=True)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    oids = fill(spool, time.time() - AGE)
    spool.jobs.create(JobSpec(name=JOB, source="oldpacs", destinations=("pacs",)))
    yield cfg, path, spool, oids
    spool.close()


def serve(cfg: Config, spool: Spool, path: Path | None, body: Body, interval: float = 0.05, *,
          token: bool = True) -> None:
    """Run ``body`` against the app; the client sends the bearer token on every call unless ``token=False``."""
    async def main() -> None:
        app = make_app(cfg, spool, str(path) if path else None, monitor_interval=interval)
        async with TestClient(TestServer(app), headers=TOKEN if token else None) as client:
            await body(client, app)
    asyncio.run(main())


async def poll(fetch: Callable[[], Awaitable[Any]], check: Callable[[Any], bool], what: str,
               timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value: {value!r}")
        await asyncio.sleep(0.02)


async def get_json(client: TestClient, path: str, status: int = 200) -> Any:   # type: ignore[type-arg]
    resp = await client.get(path)
    assert resp.status == status, (path, resp.status, await resp.text())
    return await resp.json()


# -- read-only endpoints --------------------------------------------------------------------------

def test_read_endpoints(env: Any) -> None:
    cfg, path, spool, oids = env

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        assert (await get_json(c, "/healthz"))["ok"]
        status = await get_json(c, "/api/status")
        pacs = {q["name"]: q for q in status["destinations"]}["pacs"]
        assert (pacs["pending"], pacs["failed"], pacs["delivered"]) == (2, 1, 1)
        assert status["usage"]["map_size"] == cfg.spool_max_bytes and status["totals"]["received"] == 5
        assert status["received_from"] == {"CT1": 4, "MR1": 1} and status["token_configured"]
        assert len((await get_json(c, "/api/queues"))["queues"]) == 3
        assert (await get_json(c, "/api/queues/vna"))["pending"] == 3
        assert (await get_json(c, "/api/queues/unrouted"))["pending"] == 1
        assert "unknown destination" in (await get_json(c, "/api/queues/nope", 404))["error"]
        entries = (await get_json(c, "/api/queues/pacs/entries?state=failed"))["entries"]
        assert [e["oid"] for e in entries] == [oids[1]]
        assert len((await get_json(c, "/api/queues/vna/entries?state=pending&limit=2"))["entries"]) == 2
        await get_json(c, "/api/queues/pacs/entries?state=bogus", 400)
        await get_json(c, "/api/queues/pacs/entries?limit=x", 400)
        failures = (await get_json(c, "/api/failures"))["failures"]
        assert failures[0]["status_text"].startswith("0xA900")
        series = await get_json(c, "/api/throughput")
        assert series["interval"] == 0.05 and "received" in series
        assert (await get_json(c, "/api/alerts"))["checked"]

        found = await get_json(c, f"/api/lookup?study_instance_uid={STUDY_A}")
        assert found["count"] == 3 and found["objects"][0]["path"][0]["state"] == "delivered"
        assert (await get_json(c, "/api/lookup?accession=ACC2"))["objects"][0]["oid"] == oids[3]
        assert (await get_json(c, "/api/lookup?patient_id=PAT1"))["count"] == 3
        await get_json(c, "/api/lookup", 400)
        assert (await get_json(c, f"/api/studies/{STUDY_B}"))["count"] == 1
        await get_json(c, "/api/studies/9.9.9", 404)
        assert (await get_json(c, f"/api/objects/{oids[1]}"))["sop_instance_uid"] == f"{STUDY_A}.2"
        await get_json(c, "/api/objects/x", 400)
        await get_json(c, "/api/objects/424242", 404)

        events = (await get_json(c, "/api/audit"))["events"]
        routed = ["delivered", "failed"]
        assert [e["action"] for e in events if e["action"] not in ("received", "http_read", "http_login")] == routed
        # the reads of patient data above are audited (who, from where, which study); failed ones not
        reads = [e for e in events if e["action"] == "http_read"]
        assert {e["who"] for e in reads} == {"http.token"} and all(e["peer"] == "127.0.0.1" for e in reads)
        assert [e["path"] for e in reads if e.get("study_instance_uid") == STUDY_B] == [f"/api/studies/{STUDY_B}"]
        assert sorted(e.get("patient_id", "") for e in reads if e["path"] == "/api/lookup") == ["", "", "PAT1"]
        assert [e["accession_number"] for e in reads if "accession_number" in e] == ["ACC2"]   # alias named
        assert not [e for e in reads if e["path"] in ("/api/studies/9.9.9", "/api/objects/424242")]
        study_b = (await get_json(c, f"/api/audit?study_instance_uid={STUDY_B}"))["events"]
        assert [e["action"] for e in study_b] == ["received", "http_read"]
        assert (await get_json(c, "/api/audit?until=2000-01-01"))["events"] == []
        await get_json(c, "/api/audit?since=yesterday", 400)
        resp = await c.get("/api/audit?format=csv")
        assert resp.content_type == "text/csv"
        assert [r["action"] for r in csv.DictReader(io.StringIO(await resp.text()))
                if r["action"] not in ("received", "http_read", "http_login")] == routed
        resp = await c.get("/api/audit?format=jsonl")
        assert len([ln for ln in (await resp.text()).splitlines()
                    if "\"http_" not in ln and "\"received\"" not in ln]) == 2
        assert (await get_json(c, "/api/audit/verify"))["ok"]

        resp = await c.get("/")
        assert resp.status == 200 and "<canvas" in await resp.text()
        for asset in ("app.js", "style.css"):
            assert (await c.get(f"/static/{asset}")).status == 200

    serve(cfg, spool, path, body)


def test_openapi_describes_every_route(env: Any) -> None:
    cfg, path, spool, _ = env
    spec = openapi_spec()
    assert spec["openapi"].startswith("3.")

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        assert await get_json(c, "/openapi.json") == json.loads(json.dumps(spec))
        routed: set[tuple[str, str]] = set()
        for route in app.router.routes():
            if route.method == "HEAD":
                continue
            info = route.resource.get_info() if route.resource else {}
            p = info.get("path") or info.get("formatter") or f"{info['prefix']}/{{filename}}"
            routed.add((p, route.method.lower()))
        documented = {(p, m) for p, ops in spec["paths"].items() for m in ops}
        assert routed == documented
        for method, p, handler in ROUTES:
            op = spec["paths"][p][method.lower()]
            assert bool(op.get("security")) == (not is_public(handler)), (method, p)
            assert ("401" in op["responses"]) == (not is_public(handler)), (method, p)
            for param in op["parameters"]:
                if param["in"] == "path":
                    assert "{" + param["name"] + "}" in p

    serve(cfg, spool, path, body)


# -- response schemas (issue 12 item 8) ---------------------------------------------------------

SCHEMA_KEYWORDS = {"$ref", "type", "nullable", "enum", "properties", "required", "additionalProperties",
                   "items", "description", "default"}
JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def schema_errors(spec: dict[str, Any], schema: dict[str, Any], value: Any, where: str = "$") -> list[str]:
    """Validate ``value`` against the OpenAPI 3.0 schema subset the API uses (jsonschema is not a
    dependency). A keyword outside that subset is an error, so none is silently ignored."""
    unknown = set(schema) - SCHEMA_KEYWORDS
    if unknown:
        return [f"{where}: schema keyword(s) the validator does not know: {sorted(unknown)}"]
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        if name not in spec["components"]["schemas"]:
            return [f"{where}: dangling $ref {schema['$ref']}"]
        return schema_errors(spec, spec["components"]["schemas"][name], value, where)
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null, but not nullable"]
    kind = schema.get("type")
    if kind is not None and not JSON_TYPES[kind](value):
        return [f"{where}: expected {kind}, got {type(value).__name__} {value!r:.80}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not one of {schema['enum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{where}: missing required {k!r}" for k in schema.get("required", ()) if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errors += schema_errors(spec, props[k], v, f"{where}.{k}")
            elif extra is False:
                errors.append(f"{where}: undocumented key {k!r}")
            elif isinstance(extra, dict):
                errors += schema_errors(spec, extra, v, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(spec, schema["items"], v, f"{where}[{i}]")
    return errors


def test_schema_validator_finds_what_it_should() -> None:
    spec = openapi_spec()
    good = {"ok": True, "version": "1"}
    assert schema_errors(spec, {"$ref": "#/components/schemas/Health"}, good) == []
    for bad, why in (({"ok": 1, "version": "1"}, "expected boolean"), ({"ok": True}, "missing required"),
                     ({**good, "x": 1}, "undocumented key 'x'"), ([], "expected object")):
        assert why in " ".join(schema_errors(spec, {"$ref": "#/components/schemas/Health"}, bad)), bad
    assert schema_errors(spec, {"type": "integer"}, True) and schema_errors(spec, {"type": "number"}, None)
    assert schema_errors(spec, {"type": "string", "pattern": "x"}, "x")      # unsupported keyword: refused
    assert schema_errors(spec, {"type": "array", "items": {"enum": ["a"]}}, ["a", "b"]) == \
        ["$[1]: 'b' not one of ['a']"]


# A request that answers 2xx for each route of the table; a new route without one (or without
# a schema for its answer) fails test_every_2xx_answer_matches_its_schema.
SAMPLE_REQUESTS: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("GET", "/"): ("/", {}),
    ("GET", "/healthz"): ("/healthz", {}),
    ("GET", "/openapi.json"): ("/openapi.json", {}),
    ("GET", "/metrics"): ("/metrics", {}),
    ("GET", "/api/status"): ("/api/status", {}),
    ("GET", "/api/queues"): ("/api/queues", {}),
    ("GET", "/api/queues/{destination}"): ("/api/queues/pacs", {}),
    ("GET", "/api/queues/{destination}/entries"): ("/api/queues/vna/entries?state=pending", {}),
    ("GET", "/api/failures"): ("/api/failures", {}),
    ("GET", "/api/throughput"): ("/api/throughput", {}),
    ("GET", "/api/alerts"): ("/api/alerts", {}),
    ("GET", "/api/lookup"): (f"/api/lookup?study_instance_uid={STUDY_A}", {}),
    ("GET", "/api/studies/{study_instance_uid}"): (f"/api/studies/{STUDY_A}", {}),
    ("GET", "/api/objects/{oid}"): ("/api/objects/{oid}", {}),
    ("GET", "/api/objects/{oid}/diff"): ("/api/objects/{oid}/diff", {}),
    ("GET", "/api/audit"): ("/api/audit", {}),
    ("GET", "/api/audit/verify"): ("/api/audit/verify", {}),
    ("POST", "/api/config/validate"): ("/api/config/validate", {"config": True}),
    ("POST", "/api/config/reload"): ("/api/config/reload", {"json": {"why": "schema test"}}),
    ("POST", "/api/queues/{destination}/retry"): ("/api/queues/pacs/retry", {"json": {"why": "x"}}),
    ("POST", "/api/queues/{destination}/purge"): ("/api/queues/unrouted/purge",
                                                  {"json": {"states": ["unrouted"], "reason": "junk"}}),
    ("POST", "/api/queues/{destination}/pause"): ("/api/queues/pacs/pause", {}),
    ("POST", "/api/queues/{destination}/resume"): ("/api/queues/pacs/resume", {}),
    ("POST", "/api/studies/{study_instance_uid}/retry"): (f"/api/studies/{STUDY_A}/retry", {}),
    ("POST", "/api/destinations/{destination}/send-now"): ("/api/destinations/vna/send-now",
                                                           {"json": {"why": "VNA back"}}),
    ("GET", "/api/migrations"): ("/api/migrations", {}),
    ("GET", "/api/migrations/{name}"): (f"/api/migrations/{JOB}", {}),
    ("GET", "/api/migrations/{name}/report"): (f"/api/migrations/{JOB}/report", {}),
    ("POST", "/api/migrations"): ("/api/migrations", {"json": {"source": "oldpacs", "destinations": ["pacs"],
                                                               "name": "m2", "query": {"StudyDate": "2019"}}}),
    ("POST", "/api/migrations/{name}/pause"): (f"/api/migrations/{JOB}/pause", {}),
    ("POST", "/api/migrations/{name}/resume"): (f"/api/migrations/{JOB}/resume", {}),
    ("POST", "/api/migrations/{name}/cancel"): (f"/api/migrations/{JOB}/cancel", {}),
    ("POST", "/api/migrations/{name}/retry"): (f"/api/migrations/{JOB}/retry", {}),
    ("GET", "/api/whoami"): ("/api/whoami", {}),
    ("GET", "/api/config/proposals"): ("/api/config/proposals", {}),
    # a second admin with a user of their own (the shared token may not approve: test_governance)
    ("POST", "/api/config/proposals/{id}/approve"): ("/api/config/proposals/1/approve", {
        "json": {"why": "second pair of eyes"}, "headers": {"Authorization": "Bearer frt_schema-admin-token-0123"}}),
    ("POST", "/api/config/proposals/{id}/reject"): ("/api/config/proposals/2/reject", {"json": {"why": "not now"}}),
}


def test_every_2xx_answer_matches_its_schema(env: Any) -> None:
    """Every route of the table is called for real and its 2xx body checked against the schema
    the OpenAPI document gives for that status and content type (JSON parsed; text as a string)."""
    cfg, path, spool, oids = env
    spec = openapi_spec()
    missing = [(m, p) for m, p, _ in ROUTES if (m, p) not in SAMPLE_REQUESTS]
    assert not missing, f"add a sample request (and a response schema) for {missing}"
    (cfg.spool / "run").mkdir(exist_ok=True)
    (cfg.spool / "run" / "supervisor.pid").write_text(str(os.getpid()))   # for the reload
    from fastroute.config import HttpUserConfig
    from fastroute.ops import proposals as gov
    from fastroute.ops.auth import hash_token
    assert cfg.http is not None
    cfg = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, users={
        "ada": HttpUserConfig(role="admin", token_hash=hash_token("frt_schema-admin-token-0123"))}))
    for port in (2, 3):                    # proposals 1 and 2, by someone else than ada
        gov.propose(cfg, spool, str(path), path.read_text().replace("port: 1, query", f"port: {port}, query"),
                    who="gina", why="new PACS port")

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        await poll(lambda: get_json(c, "/api/throughput"), lambda d: len(d["t"]) >= 1, "a throughput sample")
        checked = 0
        for method, p, _ in ROUTES:
            url, kw = SAMPLE_REQUESTS[(method, p)]
            if kw.pop("config", False):
                kw = {"data": path.read_text(), "headers": {"Content-Type": "application/yaml"}}
            resp = await c.request(method, url.replace("{oid}", str(oids[0])), **kw)
            text = await resp.text()
            assert 200 <= resp.status < 300, (method, url, resp.status, text[:300])
            responses = spec["paths"][p][method.lower()]["responses"]
            documented = responses.get(str(resp.status), {}).get("content", {})
            assert resp.content_type in documented, (method, p, resp.status, resp.content_type, list(documented))
            schema = documented[resp.content_type].get("schema")
            assert schema, f"{method} {p}: no schema for its {resp.status} {resp.content_type} answer"
            value = json.loads(text) if resp.content_type == "application/json" else text
            errors = schema_errors(spec, schema, value)
            assert not errors, (method, p, errors[:10])
            checked += 1
        for asset in ("app.js", "style.css"):     # the static route, which is not in ROUTES
            resp = await c.get(f"/static/{asset}")
            schema = spec["paths"]["/static/{filename}"]["get"]["responses"]["200"]["content"]
            assert resp.status == 200 and next(iter(schema.values()))["schema"] == {"type": "string"}
        assert checked == len(ROUTES)

    with Hup():
        serve(cfg, spool, path, body)


def test_unknown_paths_and_wrong_methods_answer_json_errors(env: Any) -> None:
    cfg, path, spool, _ = env

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        for method, url, status in (("GET", "/api/nope", 404), ("GET", "/nope/deeper?x=1", 404),
                                    ("POST", "/api/nope", 404), ("DELETE", "/api/status", 405),
                                    ("PUT", "/api/queues/pacs/pause", 405), ("GET", "/api/queues/pacs/pause", 405),
                                    ("PATCH", "/healthz", 405), ("GET", "/static/nope.js", 404)):
            resp = await c.request(method, url)
            assert resp.status == status, (method, url, resp.status)
            assert resp.content_type == "application/json", (method, url, resp.content_type)
            doc = await resp.json()
            assert schema_errors(openapi_spec(), {"$ref": "#/components/schemas/Error"}, doc) == [], doc
            assert doc["error"] == ("not found" if status == 404 else "method not allowed"), doc
            if status == 405:
                assert method not in resp.headers["Allow"] and resp.headers["Allow"], resp.headers
        for headers in ({}, TOKEN):               # the same without a token, before any auth check
            resp = await c.request("GET", "/api/nope", headers=headers)
            assert resp.status == 404 and resp.content_type == "application/json"

    serve(cfg, spool, path, body, token=False)


# -- auth ---------------------------------------------------------------------------------------

MUTATING = [("POST", p) for m, p, h in ROUTES if getattr(h, "mutating", False)]


def concrete(p: str) -> str:
    return (p.replace("{destination}", "pacs").replace("{study_instance_uid}", STUDY_A).replace("{name}", JOB)
            .replace("{id}", "1"))


def test_mutating_calls_need_the_token(env: Any) -> None:
    cfg, path, spool, _ = env
    assert len(MUTATING) == 14

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        for _, p in MUTATING:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                resp = await c.post(concrete(p), json={"states": ["failed"], "reason": "x"}, headers=headers)
                assert resp.status == 401, (p, headers)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert "token" in (await resp.json())["error"]
        assert not spool.is_paused("pacs") and spool.stats(["pacs"])[0].failed == 1
        assert spool.jobs.names() == [JOB] and spool.jobs.state(JOB) == "inventory"

    serve(cfg, spool, path, body, token=False)


def test_mutating_calls_refused_without_a_configured_token(tmp_path: Path) -> None:
    cfg, path = make_config(tmp_path, token=None)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        for _, p in MUTATING:
            resp = await c.post(concrete(p), json={}, headers=TOKEN)
            assert resp.status == 403
            doc = await resp.json()
            assert "no token is configured" in doc["error"] and "http.token" in doc["hint"]
        assert (await c.get("/api/status")).status == 200   # reading stays open

    try:
        serve(cfg, spool, path, body, token=False)
    finally:
        spool.close()

PUBLIC_PATHS = {"/", "/healthz", "/openapi.json", "/metrics"}   # widening this is a decision, not an accident


def concrete_read(p: str, oid: int) -> str:
    """A GET path that answers 200 with the token (every route placeholder filled)."""
    p = concrete(p).replace("{oid}", str(oid))
    assert "{" not in p, f"route {p} has a placeholder this test does not fill: extend concrete_read"
    return p + ("?patient_id=PAT1" if p == "/api/lookup" else "")


def test_every_route_but_the_shell_needs_the_token(env: Any) -> None:
    """Deny by default: iterate the route table, so a new route cannot slip through unprotected."""
    cfg, path, spool, oids = env
    assert {p for _, p, h in ROUTES if is_public(h)} == PUBLIC_PATHS
    protected = [(m, p) for m, p, h in ROUTES if not is_public(h)]
    assert ("GET", "/api/lookup") in protected and len(protected) == len(ROUTES) - len(PUBLIC_PATHS)
    wrong: list[dict[str, str]] = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                                   {"Authorization": "Bearer"}, {"Authorization": "Bearer s3cret2"},
                                   {"Authorization": "Bearer \u00e9s3cret"}]

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        for method, p in protected:
            url = concrete_read(p, oids[1])
            for headers in wrong:
                resp = await c.request(method, url, headers=headers, json={"text": "x"})
                text = await resp.text()
                assert resp.status == 401, (method, url, headers, resp.status, text)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert "token" in json.loads(text)["error"]
                assert "PAT1" not in text and STUDY_A not in text
            if method == "GET":
                resp = await c.get(url, headers=TOKEN)
                assert resp.status == 200, (url, resp.status, await resp.text())
        found = await (await c.get("/api/lookup?patient_id=PAT1", headers=TOKEN)).json()
        assert found["count"] == 3 and found["objects"][0]["patient_id"] == "PAT1"
        resp = await c.post("/api/config/validate", json={"text": path.read_text()}, headers=TOKEN)
        assert resp.status == 200
        for p in sorted(PUBLIC_PATHS) + ["/static/app.js", "/static/style.css"]:
            assert (await c.get(p)).status == 200, p
        assert (await c.get("/api/nope")).status == 404   # an unknown path says nothing either way

    serve(cfg, spool, path, body, token=False)


def test_no_patient_data_without_users_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14: no patient identifier is readable without a login. With no users configured the
    status without patient data stays open; every patient-data route is refused (and audited)."""
    cfg, path = make_config(tmp_path, token=None)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    oids = fill(spool, time.time() - AGE)
    phi = [(m, p) for (m, p), a in ACCESS.items() if a.phi]
    assert ("GET", "/api/lookup") in phi and ("GET", "/api/queues/{destination}/entries") in phi

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        for method, p in phi:
            resp = await c.request(method, concrete_read(p, oids[1]))
            text = await resp.text()
            assert resp.status == 403 and "no users" in text, (p, resp.status, text)
            assert "PAT1" not in text and STUDY_A not in text
        status = await get_json(c, "/api/status")
        assert status["token_configured"] is False
        assert "PAT1" not in json.dumps(status)
        assert (await get_json(c, "/api/whoami"))["user"] == "anonymous"

    try:
        with caplog.at_level(logging.WARNING, logger="fastroute.api"):
            serve(cfg, spool, path, body, token=False)
        denied = [e for e in spool.audit_events() if e["action"] == "http_denied"]
        # one event per route (coalesced per client and route), naming the client and the reason
        assert len(denied) == len(phi) and all(e["who"] == "anonymous" and e["peer"] == "127.0.0.1"
                                               and e["status"] == 403 for e in denied)
    finally:
        spool.close()
    warned = [r.getMessage() for r in caplog.records if "served to NO ONE" in r.getMessage()]
    assert len(warned) == 1 and "patient data" in warned[0] and "http.users" in warned[0]


async def expect_400(c: TestClient, method: str, url: Any, what: str, status: int = 400,   # type: ignore[type-arg]
                     **kw: Any) -> dict[str, Any]:
    resp = await c.request(method, url, **kw)
    text = await resp.text()
    assert resp.status == status, (what, resp.status, text[:300])
    assert resp.content_type == "application/json", (what, resp.content_type)
    doc: dict[str, Any] = json.loads(text)
    assert doc["error"], what
    return doc


def test_malformed_requests_get_400_with_json(env: Any) -> None:
    cfg, path, spool, oids = env
    yaml_ct = {"Content-Type": "application/yaml"}

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        for oid in ("-1", str(2**63), str(2**64), "9" * 30, "1.5", "0x10", "1_0", "%20%31", "%D9%A1"):
            doc = await expect_400(c, "GET", URL(f"/api/objects/{oid}", encoded=True), f"oid {oid}")
            assert "oid must be an integer from 0 to 9223372036854775807" in doc["error"]
        await expect_400(c, "GET", f"/api/objects/{2**63 - 1}", "largest oid", status=404)
        post = "/api/queues/pacs/retry"
        doc = await expect_400(c, "POST", post, "non-UTF-8", data=b"{\"why\": \"\xff\xfe\"}",
                               headers={"Content-Type": "application/json"})
        assert "not UTF-8" in doc["error"]
        resp = await c.post(post, data=b"{}", headers={"Content-Type": "application/json; charset=x-bogus-42"})
        assert resp.status == 200, await resp.text()   # the body is read as UTF-8 whatever the claim
        await expect_400(c, "POST", "/api/config/validate", "non-UTF-8 YAML", data=b"a: \xff", headers=yaml_ct)
        for raw in ("[1, 2]", "\"x\"", "42", "null"):
            assert "JSON object" in (await expect_400(c, "POST", post, raw, data=raw))["error"]
        doc = await expect_400(c, "POST", post, "deep JSON", data="[" * 100_000)
        assert "nested too deeply" in doc["error"]
        await expect_400(c, "POST", post, "deep JSON object", data='{"a":' * 100_000)
        await expect_400(c, "POST", "/api/config/validate", "deep YAML", data="[" * 100_000, headers=yaml_ct)
        await expect_400(c, "POST", "/api/config/validate", "deep JSON text", data="[" * 100_000)
        for oids_value in ([-1], [2**64], [2**63], [True], ["1"]):
            await expect_400(c, "POST", post, f"oids {oids_value}", json={"oids": oids_value})
        doc = await expect_400(c, "POST", post, "oversized", data=b" " * (MAX_BODY_BYTES + 1), status=413)
        assert str(MAX_BODY_BYTES) in doc["hint"]
        for q in ("limit=-1", "limit=0", f"limit={10**30}", "limit=" + "9" * 5000, "limit=x", "limit="):
            await expect_400(c, "GET", f"/api/failures?{q}", q)
        for q in ("since=yesterday", "until=" + "9" * 5000,
                  "since=2024-13-45", "format=xml", "since=%00"):
            await expect_400(c, "GET", URL(f"/api/audit?{q}", encoded=True), q)
        await expect_400(c, "GET", "/api/queues/pacs/entries?state=%FF", "bad state")
        await expect_400(c, "GET", "/api/lookup?patient_id=a&study=b", "two keys")
        await expect_400(c, "DELETE", "/api/status", "wrong method", status=405)
        assert (await c.get("/healthz")).status == 200

    serve(cfg, spool, path, body)


NASTY = ["", "-1", "0", str(2**63), str(2**64 + 1), "9" * 400, "1e9", "%00", "%FF%FE", "%C0%AF", "..", "%2e%2e",
         "%0d%0aX-Injected:%201", "%E2%80%AE", "a" * 2000, "%25", "%", "[", "{", "pacs", "unrouted", STUDY_A,
         "null", "true", "%F0%9F%92%A9", "\\", "%5C%00"]
BODIES: list[bytes] = [b"", b"{", b"[" * 50_000, b'{"a":' * 50_000, b"\xff\xfe\x00", b"[]", b"{}", b"null",
                       b'{"oids": [-1]}', b'{"oids": [1e400]}', b'{"oids": "x"}', b'{"states": [1], "reason": []}',
                       b'{"text": 5}', b'{"text": "a: [" }', b'{"text": "' + b"[" * 20_000 + b'"}',
                       b'{"destination": {"x": 1}}', b'{"who": "\\u0000\\n"}', b'{"why": 1e999}', b"\x00" * 64,
                       b"a: &a [*a]", b"!!python/object/apply:os.system ['true']", b"key: " + b"x" * 10_000,
                       b'{"oids": [' + b"9" * 5000 + b"]}", b"\xef\xbb\xbf{}"]
CONTENT_TYPES = ["application/json", "application/yaml", "text/plain; charset=latin-1", "application/json; charset=nope",
                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", ""]


def test_fuzz_every_route_no_5xx(env: Any) -> None:
    """A seeded, bounded fuzz over the route table: malformed params, queries, bodies and headers never
    give a 5xx, and the server keeps answering. FASTROUTE_API_FUZZ=N runs N requests instead of 600."""
    import random

    cfg, path, spool, _ = env
    rng = random.Random(11)
    count = int(os.environ.get("FASTROUTE_API_FUZZ", "600"))
    keys = ["limit", "state", "destination", "since", "until", "format", "study_instance_uid", "patient_id",
            "accession", "study", "why", "oids"]

    def fill_path(p: str) -> str:
        while "{" in p:
            a, _, rest = p.partition("{")
            p = a + rng.choice(NASTY) + rest.partition("}")[2]
        return p

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        seen: dict[int, int] = {}
        for i in range(count):
            method, p, _ = ROUTES[i % len(ROUTES)]
            url = fill_path(p)
            if rng.random() < 0.7:
                url += "?" + "&".join(f"{rng.choice(keys)}={rng.choice(NASTY)}" for _ in range(rng.randint(1, 3)))
            headers = {"Content-Type": rng.choice(CONTENT_TYPES)} if rng.random() < 0.8 else {}
            if rng.random() < 0.1:
                headers["Authorization"] = rng.choice(["Bearer", "Bearer  s3cret", "bearer s3cret", "Bearer s3cr\u00e9t"])
            data = rng.choice(BODIES) if method == "POST" or rng.random() < 0.2 else None
            resp = await c.request(method if rng.random() < 0.95 else rng.choice(["PUT", "PATCH", "GET"]),
                                   URL(url, encoded=True), data=data, headers=headers)
            text = await resp.text(errors="replace")
            assert resp.status < 500, (method, url[:200], headers, (data or b"")[:80], resp.status, text[:500])
            if resp.status >= 400:
                assert resp.content_type == "application/json", (method, url[:200], resp.status, text[:200])
            seen[resp.status] = seen.get(resp.status, 0) + 1
        assert seen.get(400, 0) > count // 10 and seen.get(200, 0) > 0, seen   # it did reach the handlers
        assert (await get_json(c, "/healthz"))["ok"]
        assert (await get_json(c, "/api/lookup?patient_id=PAT1"))["count"] == 3

    serve(cfg, spool, path, body)


# -- actions ------------------------------------------------------------------------------------

def test_actions_are_applied_and_audited(env: Any) -> None:
    cfg, path, spool, oids = env

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        hdrs = {**TOKEN, "X-Fastroute-Operator": "erin"}
        resp = await c.post("/api/queues/pacs/pause", json={"why": "maintenance"}, headers=hdrs)
        assert resp.status == 200 and (await resp.json())["paused"]
        assert spool.is_paused("pacs")
        assert (await get_json(c, "/api/queues/pacs"))["status"] == "paused"
        ev = list(spool.audit_events())[-1]
        # the shared deprecated token: the client's name is kept, marked as the token's
        assert ev["action"] == "pause" and ev["who"] == "erin (http.token)" and ev["why"] == "maintenance"
        resp = await c.post("/api/queues/pacs/resume", headers=TOKEN)
        assert resp.status == 200 and not spool.is_paused("pacs")
        assert (await c.post("/api/queues/nope/pause", headers=TOKEN)).status == 404
        assert (await c.post("/api/queues/unrouted/pause", headers=TOKEN)).status == 400

        resp = await c.post("/api/destinations/vna/send-now", json={"why": "VNA back"}, headers=hdrs)
        doc = await resp.json()
        assert resp.status == 200 and doc["made_due"] == 1 and doc["destinations"][0]["destination"] == "vna"
        ev = list(spool.audit_events())[-1]
        assert (ev["action"], ev["why"], ev["count"]) == ("send_now", "VNA back", 1) and ev["who"].startswith("erin")
        assert (await c.post("/api/destinations/nope/send-now", headers=TOKEN)).status == 404
        assert (await c.post("/api/destinations/unrouted/send-now", headers=TOKEN)).status == 400

        resp = await c.post(f"/api/studies/{STUDY_A}/retry", json={"why": "fixed"}, headers=TOKEN)
        assert (await resp.json()) == {"retried": {"pacs": 1}, "count": 1}
        assert (await c.post("/api/studies/9.9.9/retry", headers=TOKEN)).status == 404
        resp = await c.post("/api/queues/pacs/retry", json={"oids": "all"}, headers=TOKEN)
        assert resp.status == 400
        resp = await c.post("/api/queues/pacs/retry", data="{not json", headers=TOKEN)
        assert resp.status == 400
        resp = await c.post("/api/queues/pacs/retry", headers=TOKEN)
        assert (await resp.json())["count"] == 0

        resp = await c.post("/api/queues/pacs/purge", json={"states": ["pending"]}, headers=TOKEN)
        assert resp.status == 400 and "reason" in (await resp.json())["error"]
        resp = await c.post("/api/queues/pacs/purge", json={"reason": "x"}, headers=TOKEN)
        assert resp.status == 400 and "states" in (await resp.json())["error"]
        resp = await c.post("/api/queues/pacs/purge", headers=TOKEN, json={
            "states": ["pending"], "reason": "wrong patient", "study_instance_uid": STUDY_B, "who": "frank"})
        assert (await resp.json())["purged"] == [oids[3]]
        ev = list(spool.audit_events())[-1]
        assert (ev["action"], ev["why"], ev["who"].split()[0]) == ("purge", "wrong patient", "frank")

    serve(cfg, spool, path, body)


def test_config_validate_and_reload(env: Any) -> None:
    cfg, path, spool, _ = env
    applied = path.read_text()
    bad = applied.replace("  vna: {ae_title: VNA", "  vna: {ae_title: VNA, colour: blue")
    bad_line = bad.splitlines().index(next(l for l in bad.splitlines() if "colour" in l)) + 1

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        resp = await c.post("/api/config/validate", data=bad, headers={"Content-Type": "application/yaml"})
        assert resp.status == 422
        err = (await resp.json())["errors"][0]
        assert (err["line"], err["key"]) == (bad_line, "destinations.vna.colour")
        assert "unknown key" in err["message"] and "valid keys" in err["hint"]
        resp = await c.post("/api/config/validate", json={"text": applied})
        assert resp.status == 200 and (await resp.json())["valid"]
        assert (await c.post("/api/config/validate")).status == 400

        # No supervisor yet: refused, nothing changed.
        resp = await c.post("/api/config/reload", headers=TOKEN)
        assert resp.status == 409 and "no running supervisor" in (await resp.json())["error"]
        (cfg.spool / "run").mkdir(exist_ok=True)
        (cfg.spool / "run" / "supervisor.pid").write_text(str(os.getpid()))
        with Hup() as hup:
            resp = await c.post("/api/config/reload?why=typo", data=bad,
                                headers={**TOKEN, "Content-Type": "application/yaml"})
            assert resp.status == 422
            doc = await resp.json()
            assert doc["errors"][0]["line"] == bad_line and not doc["valid"]
            assert path.read_text() == applied and hup.count == 0

            new = applied.replace("port: 11112", "port: 11113")
            resp = await c.post("/api/config/reload", json={"text": new, "why": "move port", "who": "gina"},
                                headers=TOKEN)
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
            assert doc["applied"] and "+port: 11113" in doc["diff"]
            await poll(lambda: asyncio.sleep(0, hup.count), lambda n: n == 1, "SIGHUP")
            assert path.read_text() == new
            ev = list(spool.audit_events())[-1]
            assert (ev["action"], ev["why"], ev["who"].split()[0]) == ("config_change", "move port", "gina")

            resp = await c.post("/api/config/reload", headers=TOKEN)   # re-validate the file as it is
            assert resp.status == 200
            await poll(lambda: asyncio.sleep(0, hup.count), lambda n: n == 2, "second SIGHUP")

    serve(cfg, spool, path, body)


# -- metrics ------------------------------------------------------------------------------------

def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, Any], family: str, metric: str, /, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {metric}{labels}")


def test_metrics_exposition(env: Any) -> None:
    cfg, path, spool, _ = env

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        resp = await c.get("/metrics")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        fams = families(await resp.text())
        received = {s.labels["calling_ae"]: s.value for s in fams["fastroute_received_objects"].samples
                    if s.name == "fastroute_received_objects_total"}
        assert received["CT1"] == 4 and sum(received.values()) == 5
        assert sample(fams, "fastroute_received_from_objects", "fastroute_received_from_objects_total",
                      calling_ae="CT1") == 4     # deprecated, kept for 0.2
        assert sample(fams, "fastroute_build_info", "fastroute_build_info", version=fastroute.__version__,
                      twin=native.PEEK_IMPL) == 1
        assert sample(fams, "fastroute_associations_in", "fastroute_associations_in_total", outcome="rejected",
                      reason="") == 0
        assert sample(fams, "fastroute_associations_out", "fastroute_associations_out_total", destination="vna",
                      outcome="accepted", reason="") == 0
        assert sample(fams, "fastroute_worker_restarts", "fastroute_worker_restarts_total", role="listener") == 0
        assert sample(fams, "fastroute_delivered_objects", "fastroute_delivered_objects_total",
                      destination="pacs") == 1
        assert sample(fams, "fastroute_delivered_objects", "fastroute_delivered_objects_total",
                      destination="vna") == 0
        assert sample(fams, "fastroute_failed_by_status", "fastroute_failed_by_status_total", destination="pacs",
                      status="0xA900", meaning="Error: Data Set does not match SOP Class") == 1
        assert sample(fams, "fastroute_retries", "fastroute_retries_total", destination="vna") == 1
        hist = "fastroute_delivery_latency_seconds"
        assert fams[hist].type == "histogram"
        assert sample(fams, hist, f"{hist}_bucket", destination="pacs", le="0.001") == 0   # from 1 ms
        assert sample(fams, hist, f"{hist}_bucket", destination="pacs", le="1.0") == 0
        assert sample(fams, hist, f"{hist}_bucket", destination="pacs", le="2.5") == 1
        assert sample(fams, hist, f"{hist}_bucket", destination="pacs", le="+Inf") == 1
        assert sample(fams, hist, f"{hist}_count", destination="pacs") == 1
        assert sample(fams, hist, f"{hist}_sum", destination="pacs") == pytest.approx(2.0)
        buckets = [s.value for s in fams[hist].samples if s.name.endswith("_bucket")
                   and s.labels["destination"] == "pacs"]
        assert buckets == sorted(buckets)   # cumulative
        assert sample(fams, "fastroute_queue_objects", "fastroute_queue_objects", destination="pacs",
                      state="pending") == 2
        assert sample(fams, "fastroute_queue_objects", "fastroute_queue_objects", destination="unrouted",
                      state="pending") == 1
        assert sample(fams, "fastroute_queue_oldest_age_seconds", "fastroute_queue_oldest_age_seconds",
                      destination="pacs") > AGE - 5
        assert sample(fams, "fastroute_destination_state", "fastroute_destination_state", destination="pacs",
                      state="unknown") == 1
        states = [s for s in fams["fastroute_destination_state"].samples if s.labels["destination"] == "pacs"]
        assert len(states) == 1           # one series per destination, not one per state
        assert sample(fams, "fastroute_destination_last_success_timestamp_seconds",
                      "fastroute_destination_last_success_timestamp_seconds", destination="pacs") == 0
        assert sample(fams, "fastroute_disk_free_bytes", "fastroute_disk_free_bytes") > 0
        assert sample(fams, "fastroute_spool_max_bytes", "fastroute_spool_max_bytes") == cfg.spool_max_bytes
        assert sample(fams, "fastroute_alert", "fastroute_alert", name="oldest_age", destination="pacs") == 1
        assert sample(fams, "fastroute_alert", "fastroute_alert", name="oldest_age", destination="vna") == 0
        assert not any(n.startswith(("python_", "process_")) for n in fams)   # private registry

    serve(cfg, spool, path, body)


# -- alerts -------------------------------------------------------------------------------------

def test_alerts_raise_and_clear_in_api_metrics_log_and_webhook(env: Any, caplog: pytest.LogCaptureFixture) -> None:
    cfg, path, spool, oids = env
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    async def main() -> None:
        hook_app = web.Application()
        hook_app.router.add_post("/hook", hook)
        async with TestServer(hook_app) as hook_server:
            url = str(hook_server.make_url("/hook"))
            with_hook = dataclasses.replace(cfg, alerts=dataclasses.replace(cfg.alerts, webhook=url))
            app = make_app(with_hook, spool, str(path), monitor_interval=0.05)
            async with TestClient(TestServer(app), headers=TOKEN) as c:
                async def names() -> set[tuple[str, str]]:
                    doc = await get_json(c, "/api/alerts")
                    return {(a["name"], a["destination"]) for a in doc["alerts"]}

                await poll(names, lambda n: n == {("oldest_age", "pacs")}, "oldest_age alert")
                status = await get_json(c, "/api/status")
                assert status["alerts"][0]["message"].startswith("destination=pacs: oldest waiting object")

                (cfg.spool / "run").mkdir(exist_ok=True)
                DestinationState("vna", state=SenderState.BACKING_OFF, consecutive_failures=3,
                                 down_since=time.time()).write(cfg.spool)
                await poll(names, lambda n: ("consecutive_failures", "vna") in n, "consecutive failures alert")

                # Deliver what pacs has pending: its oldest age drops to none and the alert clears.
                claimed, _ = spool.claim("pacs", 10)
                spool.settle("pacs", [Outcome(x.oid, OutcomeKind.DELIVERED, status=0) for x in claimed])
                await poll(names, lambda n: n == {("consecutive_failures", "vna")}, "oldest_age cleared")
                fams = families(await (await c.get("/metrics")).text())
                assert sample(fams, "fastroute_alert", "fastroute_alert", name="oldest_age", destination="pacs") == 0
                assert sample(fams, "fastroute_alert", "fastroute_alert", name="consecutive_failures",
                              destination="vna") == 1
                await poll(lambda: asyncio.sleep(0, [e["event"] for r in received for e in r["events"]]),
                           lambda ev: ev.count("cleared") == 1, "webhook clear")
        events = [(e["event"], e["name"], e["destination"]) for r in received for e in r["events"]]
        assert events == [("raised", "oldest_age", "pacs"), ("raised", "consecutive_failures", "vna"),
                          ("cleared", "oldest_age", "pacs")]

    with caplog.at_level(logging.INFO, logger="fastroute.alerts"):
        asyncio.run(main())
    logged = [r.getMessage() for r in caplog.records if r.name == "fastroute.alerts"]
    assert sum(m.startswith("alert raised") for m in logged) == 2   # once each, not every poll
    assert sum(m.startswith("alert cleared") for m in logged) == 1


def test_webhook_failure_never_blocks(env: Any, caplog: pytest.LogCaptureFixture) -> None:
    cfg, path, spool, _ = env
    with socket.socket() as s:   # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    broken = dataclasses.replace(cfg, alerts=dataclasses.replace(cfg.alerts, webhook=f"http://127.0.0.1:{dead}/x"))

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        await poll(lambda: get_json(c, "/api/alerts"), lambda d: bool(d["alerts"]), "alert")
        assert (await c.get("/api/status")).status == 200

    with caplog.at_level(logging.WARNING, logger="fastroute.alerts"):
        serve(broken, spool, path, body)
    assert any("alert webhook" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)


# -- the process entry point ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_http_main_serves_until_sigterm(tmp_path: Path) -> None:
    cfg, path = make_config(tmp_path)
    port = free_port()
    cfg = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, port=port))
    Spool(cfg.spool, map_size=cfg.spool_max_bytes).close()
    proc = multiprocessing.get_context("spawn").Process(target=http_main, args=(cfg, str(path)))
    proc.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                    assert json.load(resp)["ok"]
                    break
            except OSError:
                assert proc.is_alive() and time.monotonic() < deadline, "http process did not come up"
                time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)   # type: ignore[arg-type]
        proc.join(10)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()


# -- migrations (issue 13) ------------------------------------------------------------------------

def seed_job(spool: Spool, name: str = JOB) -> None:
    """Play the migration runner: two studies, one verified, one failed with its reason."""
    jobs = spool.jobs
    jobs.add_studies(name, [StudyRecord(seq=0, study_instance_uid=f"{STUDY_A}.9", patient_id="PAT1",
                                        accession_number="ACC1", modalities="CT"),
                            StudyRecord(seq=0, study_instance_uid=f"{STUDY_B}.9", patient_id="PAT2")])
    jobs.inventory_done(name)
    jobs.set_instances(name, f"{STUDY_A}.9", [InstanceRecord(f"{STUDY_A}.9.1")])
    jobs.mark_received(name, f"{STUDY_A}.9", {f"{STUDY_A}.9.1": 1})
    jobs.mark_delivered(name, f"{STUDY_A}.9", [f"{STUDY_A}.9.1"])
    jobs.mark_found(name, f"{STUDY_A}.9", [f"{STUDY_A}.9.1"])
    jobs.update_study(name, f"{STUDY_A}.9", state=StudyState.VERIFIED)
    jobs.update_study(name, f"{STUDY_B}.9", state=StudyState.FAILED, reason="0xA801: register FASTROUTE at OLDPACS")


def test_migration_endpoints_mirror_the_commands(env: Any) -> None:
    cfg, path, spool, _ = env
    seed_job(spool)

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        jobs = (await get_json(c, "/api/migrations"))["migrations"]
        assert [(j["name"], j["state"], j["studies_total"], j["studies_verified"], j["studies_failed"])
                for j in jobs] == [(JOB, "running", 2, 1, 1)]
        detail = await get_json(c, f"/api/migrations/{JOB}")
        assert [(f["study_instance_uid"], f["reason"]) for f in detail["failures"]] == [
            (f"{STUDY_B}.9", "0xA801: register FASTROUTE at OLDPACS")]
        assert "unknown migration job" in (await get_json(c, "/api/migrations/nope", 404))["error"]

        resp = await c.get(f"/api/migrations/{JOB}/report")
        assert resp.status == 200 and resp.content_type == "text/csv"
        rows = list(csv.reader(io.StringIO(await resp.text())))
        assert rows[0] == list(REPORT_COLUMNS) and [r[0] for r in rows[1:]] == [f"{STUDY_A}.9", f"{STUDY_B}.9"]
        doc = await get_json(c, f"/api/migrations/{JOB}/report?format=json")
        assert [r["state"] for r in doc] == ["verified", "failed"] and list(doc[0]) == list(REPORT_COLUMNS)
        await get_json(c, f"/api/migrations/{JOB}/report?format=xml", 400)
        await get_json(c, "/api/migrations/nope/report", 404)

        hdrs = {**TOKEN, "X-Fastroute-Operator": "erin"}
        resp = await c.post(f"/api/migrations/{JOB}/pause", json={"why": "clinical peak"}, headers=hdrs)
        assert resp.status == 200 and (await resp.json())["state"] == "paused"
        ev = list(spool.audit_events())[-1]
        assert (ev["action"], ev["job"], ev["why"]) == ("migration_pause", JOB, "clinical peak")
        assert ev["who"] == "erin (http.token)"
        resp = await c.post(f"/api/migrations/{JOB}/pause", headers=TOKEN)
        assert resp.status == 409 and "cannot pause" in (await resp.json())["error"]
        assert (await (await c.post(f"/api/migrations/{JOB}/resume", headers=TOKEN)).json())["state"] == "running"
        retried = await (await c.post(f"/api/migrations/{JOB}/retry", headers=TOKEN)).json()
        assert retried["retried"] == 1 and retried["studies_failed"] == 0
        assert (await c.post("/api/migrations/nope/cancel", headers=TOKEN)).status == 404

        resp = await c.post("/api/migrations", headers=hdrs, json={
            "source": "oldpacs", "destinations": ["pacs"], "name": "night", "query": {"ModalitiesInStudy": "CT"},
            "rate": "20/s", "windows": ["19:00-07:00"], "why": "phase 1"})
        doc = await resp.json()
        assert resp.status == 201 and doc["name"] == "night" and doc["state"] == "inventory", doc
        assert doc["windows"] == ["19:00-07:00"] and doc["rate_limit"] == "20/s"
        ev = list(spool.audit_events())[-1]
        assert (ev["action"], ev["job"], ev["why"]) == ("migration_start", "night", "phase 1")
        assert ev["who"] == "erin (http.token)"
        for payload, status, text in (
                ({"source": "oldpacs", "destinations": ["pacs"], "name": "night"}, 409, "exists"),
                ({"source": "nope", "destinations": ["pacs"]}, 404, "unknown source"),
                ({"source": "oldpacs", "destinations": ["vna"]}, 400, "cannot verify at vna"),
                ({"source": "oldpacs", "destinations": ["pacs"], "windows": ["later"]}, 400, "bad window"),
                ({"source": "oldpacs", "destinations": ["pacs"], "rate": "lots"}, 400, "bad rate"),
                ({"source": "oldpacs", "destinations": ["pacs"], "query": {"SeriesNumber": "1"}}, 400, "STUDY-level"),
                ({"source": "oldpacs", "destinations": "pacs", "verify": "yes"}, 400, "'verify'"),
                ({"destinations": ["pacs"]}, 400, "'source' is required"),
                ({"source": "oldpacs", "destinations": [1]}, 400, "'destinations'")):
            resp = await c.post("/api/migrations", json=payload, headers=TOKEN)
            assert resp.status == status and text in (await resp.json())["error"], (payload, await resp.text())
        assert sorted(spool.jobs.names()) == [JOB, "night"]

    serve(cfg, spool, path, body)


def test_migration_report_streams_in_chunks(env: Any) -> None:
    """A report larger than one chunk arrives chunked (no Content-Length: never built whole)."""
    cfg, path, spool, _ = env
    spool.jobs.add_studies(JOB, [StudyRecord(seq=0, study_instance_uid=f"{STUDY_A}.{i}") for i in range(1500)])

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        resp = await c.get(f"/api/migrations/{JOB}/report")
        assert resp.status == 200 and resp.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in resp.headers
        lines = (await resp.text()).splitlines()
        assert len(lines) == 1501 and lines[1].startswith(f"{STUDY_A}.0,")
        doc = await get_json(c, f"/api/migrations/{JOB}/report?format=json")
        assert len(doc) == 1500 and doc[-1]["study_instance_uid"] == f"{STUDY_A}.1499"

    serve(cfg, spool, path, body)


def test_migration_metrics_per_job(env: Any) -> None:
    cfg, path, spool, _ = env
    seed_job(spool)

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        fams = families(await (await c.get("/metrics")).text())
        studies = {s.labels["state"]: s.value for s in fams["fastroute_migration_studies"].samples
                   if s.labels["migration"] == JOB}
        assert studies["verified"] == 1 and studies["failed"] == 1 and studies["pending"] == 0
        assert set(studies) == {s.value for s in StudyState}      # every state seeded: sum() is the total
        assert sample(fams, "fastroute_migration_instances", "fastroute_migration_instances", migration=JOB,
                      kind="received") == 1
        assert sample(fams, "fastroute_migration_instances", "fastroute_migration_instances", migration=JOB,
                      kind="delivered") == 1
        assert sample(fams, "fastroute_migration_instances", "fastroute_migration_instances", migration=JOB,
                      kind="expected") >= 1
        assert sample(fams, "fastroute_migration_rate", "fastroute_migration_rate", migration=JOB) >= 0
        states = [s for s in fams["fastroute_migration_state"].samples if s.labels["migration"] == JOB]
        assert [(s.labels["state"], s.value) for s in states] == [("running", 1.0)]
        await c.post(f"/api/migrations/{JOB}/pause", headers=TOKEN)
        fams = families(await (await c.get("/metrics")).text())
        assert [s.labels["state"] for s in fams["fastroute_migration_state"].samples] == ["paused"]

    serve(cfg, spool, path, body)


def test_migration_report_client_leaving_mid_stream(env: Any) -> None:
    """A client that reads the first chunk of a large report and disconnects: no 5xx logged, the
    report's reader is closed, the job store stays writable and the API keeps answering."""
    cfg, path, spool, _ = env
    spool.jobs.add_studies(JOB, [StudyRecord(seq=0, study_instance_uid=f"{STUDY_A}.{i}") for i in range(5000)])

    async def body(c: TestClient, app: web.Application) -> None:   # type: ignore[type-arg]
        for _ in range(3):
            resp = await c.get(f"/api/migrations/{JOB}/report")
            assert resp.status == 200
            assert (await resp.content.read(100)).startswith(b"study_instance_uid,")
            resp.close()                                     # gone, with most of the report unsent
        spool.jobs.add_studies(JOB, [StudyRecord(seq=0, study_instance_uid=f"{STUDY_B}.1")])
        assert (await get_json(c, f"/api/migrations/{JOB}"))["studies_total"] == 5001

    with_errors: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                with_errors.append(record)

    handler = Catch()
    logging.getLogger("fastroute.api").addHandler(handler)
    try:
        serve(cfg, spool, path, body)
    finally:
        logging.getLogger("fastroute.api").removeHandler(handler)
    assert not with_errors, [r.getMessage() for r in with_errors]
