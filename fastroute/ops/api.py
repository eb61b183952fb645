"""HTTP management plane: dashboard, JSON API and Prometheus metrics (aiohttp on uvloop).

It runs in its own process, started by the supervisor, and only reads and edits the spool like
the CLI does (through ``ops``), so it never sits on the receive or send path. Spool reads run on
a small private thread pool, so a long queue scan cannot stall the event loop, and the pool is
drained before the spool is closed. A monitor task samples the counters (throughput chart),
evaluates alert thresholds and applies audit retention.

Access is deny-by-default: with ``http.token`` configured every route needs
``Authorization: Bearer <token>`` except the few marked :func:`public` (dashboard shell and assets,
``/healthz``, ``/openapi.json``, ``/metrics``), because lookups, queue entries, failures and the audit
trail carry patient identifiers and a new route must not leak them by being forgotten. Without a
token, reads stay open (a warning is logged at start) and mutating calls are refused (403). Every
mutating call is audited with who and why. Malformed requests get a 4xx with a JSON error.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import hmac
import io
import json
import logging
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, TypeVar

from aiohttp import web

from fastroute import __version__

from fastroute.ops import actions as ops
from fastroute.ops.alerts import AlertBook, Reading, Transition, Webhook, evaluate
from fastroute.ops.certificates import certificate_expiry
from fastroute.config import Config, HttpConfig
from fastroute.errors import ConfigError, FastrouteError, SpoolError
from fastroute.logsetup import fields
from fastroute.ops.metrics import CONTENT_TYPE, make_registry, render
from fastroute.spool import Spool, open_spool

log = logging.getLogger("fastroute.api")

STATIC_DIR = Path(__file__).parent / "static"
MONITOR_INTERVAL = 2.0          # seconds between samples (throughput chart, alerts)
RETENTION_INTERVAL = 3600.0     # seconds between audit/history retention passes
HISTORY_KEEP = 600.0            # seconds of throughput history kept for the chart
MAX_BODY_BYTES = 4 << 20        # client_max_size: a configuration file is far smaller
MAX_OID = 2**63 - 1             # object ids are unsigned 64-bit keys; the API takes the signed range
OID_RE = re.compile(r"[0-9]{1,19}")
YAML_TYPES = ("text/plain", "application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Plane:
    """What the handlers share: configuration, spool, alert state, throughput history."""

    def __init__(self, cfg: Config, spool: Spool, config_path: str | None, monitor_interval: float) -> None:
        self.cfg = cfg
        self.spool = spool
        self.config_path = config_path
        self.applied_text = ops.read_config_text(config_path)
        self.monitor_interval = monitor_interval
        self.alerts = AlertBook()
        self.history = ops.ThroughputHistory(HISTORY_KEEP)
        self.registry = make_registry(cfg, spool, self.alerts)
        self.webhook = Webhook(cfg.alerts.webhook) if cfg.alerts.webhook else None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="http-spool")
        self.retention_due = 0.0
        self.started = time.time()

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking spool call on the pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def _sample(self) -> dict[Any, Any]:
        """One monitor round's blocking part (on the pool): sample, check, prune."""
        now = time.time()
        self.history.add(now, self.spool.counters())
        readings = [Reading(q["destination"], q["oldest_age"], q["consecutive_failures"])
                    for q in ops.destination_status(self.cfg, self.spool, now) if q["configured"]]
        checks = evaluate(self.cfg.alerts, readings, self.spool.usage()["disk_free_bytes"],
                          certificate_expiry(self.cfg))
        if now >= self.retention_due:
            self.retention_due = now + RETENTION_INTERVAL
            try:
                ops.apply_retention(self.cfg, self.spool, now)
            except FastrouteError as exc:
                log.error("retention pass failed: %s", exc)
        return checks

    async def tick(self) -> list[Transition]:
        checks = await self.io(self._sample)
        transitions = self.alerts.update(checks)   # on the loop: handlers read it here too
        if self.webhook is not None:
            self.webhook.send(transitions)
        return transitions

    async def monitor(self) -> None:
        while True:
            try:
                await self.tick()
            except (FastrouteError, OSError) as exc:
                log.error("monitor round failed: %s", exc)
            await asyncio.sleep(self.monitor_interval)   # a period, not a synchronisation


PLANE = web.AppKey("plane", Plane)


# -- helpers ------------------------------------------------------------------------------------

def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def _fail(exc_class: type[web.HTTPException], message: str, hint: str = "", **extra: Any) -> web.HTTPException:
    body = {"error": message, **({"hint": hint} if hint else {}), **extra}
    return exc_class(text=json.dumps(body, ensure_ascii=False), content_type="application/json",
                     headers={"WWW-Authenticate": 'Bearer realm="fastroute"'}
                     if exc_class is web.HTTPUnauthorized else None)


def public(handler: Handler) -> Handler:
    """Mark a handler as open even with a token configured (it returns no patient data)."""
    handler.public = True   # type: ignore[attr-defined]
    return handler


def is_public(handler: Any) -> bool:
    return bool(getattr(handler, "public", False))


def _check_token(request: web.Request, token: str) -> None:
    """Raise 401 unless the request carries ``Bearer <token>`` (constant-time comparison)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Digests of equal length, so not even the token's length leaks; errors="replace": a header with
    # odd characters is a wrong token, not a crash.
    digest = hashlib.sha256(given.strip().encode("utf-8", "replace")).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(digest, hashlib.sha256(
            token.encode("utf-8", "replace")).digest()):
        log.warning("refused %s %s from %s: missing or wrong bearer token", request.method, request.path,
                    request.remote, extra=fields(peer=request.remote))
        raise _fail(web.HTTPUnauthorized, "missing or wrong bearer token",
                    hint="send 'Authorization: Bearer <http.token>'")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Deny by default: every matched route but the :func:`public` ones needs the configured token."""
    token = (request.app[PLANE].cfg.http or HttpConfig()).token
    info = request.match_info
    if token and info.http_exception is None and not is_public(info.handler) \
            and not isinstance(info.route.resource, web.StaticResource):
        _check_token(request, token)
    return await handler(request)


def mutating(handler: Handler) -> Handler:
    """Mark a handler as changing state: it needs the bearer token, and a configured one."""
    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        http = request.app[PLANE].cfg.http or HttpConfig()
        if not http.token:
            raise _fail(web.HTTPForbidden, "mutating API calls are disabled because no token is configured",
                        hint="set http.token in the configuration and send 'Authorization: Bearer <token>'")
        _check_token(request, http.token)   # also checked by auth_middleware; kept should that change
        return await handler(request)
    guarded.mutating = True   # type: ignore[attr-defined]
    return guarded


async def _text(request: web.Request) -> str:
    """The body as UTF-8 text (whatever charset the client claims); 413 beyond client_max_size."""
    raw = await request.read() if request.can_read_body else b""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(web.HTTPBadRequest, f"the body is not UTF-8 (byte {exc.start})") from None


async def _body(request: web.Request) -> dict[str, Any]:
    """A JSON object body, or {} when there is none."""
    raw = await _text(request)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise _fail(web.HTTPBadRequest, "the body is not valid JSON") from None
    except RecursionError:   # json's C scanner recurses per nesting level
        raise _fail(web.HTTPBadRequest, "the body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise _fail(web.HTTPBadRequest, "the body must be a JSON object")
    return data


async def _yaml_body(request: web.Request) -> tuple[str | None, dict[str, Any]]:
    """Configuration text posted raw (YAML content types) or as JSON ``{"text": ...}``."""
    if request.content_type in YAML_TYPES:
        raw = await _text(request)
        return (raw if raw.strip() else None), dict(request.query)
    body = await _body(request)
    text = body.get("text")
    if text is not None and not isinstance(text, str):
        raise _fail(web.HTTPBadRequest, "'text' must be a string of YAML")
    return text, {**request.query, **body}


def _who(request: web.Request, body: dict[str, Any]) -> str:
    """The operator named by the client (the token is shared), and where the call came from."""
    named = str(body.get("who") or request.headers.get("X-Fastroute-Operator", "")).strip()
    return f"{named} via http {request.remote}" if named else f"http {request.remote}"


def _int_param(request: web.Request, name: str, default: int, lo: int = 1, hi: int = 100000) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _fail(web.HTTPBadRequest, f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise _fail(web.HTTPBadRequest, f"{name} must be between {lo} and {hi}")
    return value


def _oid(raw: str) -> int:
    """An object id from a path: plain decimal digits in 0..2**63-1 (the spool's keys)."""
    if not OID_RE.fullmatch(raw) or int(raw) > MAX_OID:
        raise _fail(web.HTTPBadRequest, f"oid must be an integer from 0 to {MAX_OID}, got {raw[:40]!r}")
    return int(raw)


def _oids(value: Any) -> list[int] | None:
    if value in (None, "", []):
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              and 0 <= v <= MAX_OID for v in value):
        raise _fail(web.HTTPBadRequest, f"'oids' must be a list of integers from 0 to {MAX_OID}")
    return value


def _time_param(request: web.Request, name: str, *, end: bool = False) -> float | None:
    raw = request.query.get(name)
    if not raw:
        return None
    try:
        return ops.parse_time(raw, end=end)
    except (OverflowError, ValueError):   # e.g. year 1 with a positive offset falls before the epoch range
        raise _fail(web.HTTPBadRequest, f"{name} is out of range: {raw[:40]!r}") from None


def _static_file(request: web.Request) -> bool:
    """Whether a dashboard asset request names an existing file under STATIC_DIR."""
    name = request.match_info.get("filename", "")
    try:
        path = (STATIC_DIR / name).resolve()
        return path.is_file() and path.is_relative_to(STATIC_DIR.resolve())
    except (OSError, ValueError):
        return False


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map the transport-neutral ops errors to HTTP statuses with a JSON body and a hint."""
    try:
        if isinstance(request.match_info.route.resource, web.StaticResource) and not _static_file(request):
            # aiohttp answers a missing asset with an empty octet-stream 404 (found out only when
            # the file response is sent): answered here in the API's shape instead.
            raise web.HTTPNotFound()
        return await handler(request)
    except ops.NotFound as exc:
        raise _fail(web.HTTPNotFound, Exception.__str__(exc), exc.hint) from None
    except ops.BadRequest as exc:
        raise _fail(web.HTTPBadRequest, Exception.__str__(exc), exc.hint) from None
    except ops.Conflict as exc:
        raise _fail(web.HTTPConflict, Exception.__str__(exc), exc.hint) from None
    except ConfigError as exc:
        raise _fail(web.HTTPUnprocessableEntity, str(exc), exc.hint, valid=False,
                    errors=[ops.config_error_view(exc)]) from None
    except SpoolError as exc:
        raise _fail(web.HTTPServiceUnavailable, Exception.__str__(exc), exc.hint) from None
    except RecursionError:   # YAML or JSON nested beyond what a recursive parser takes
        log.warning("refused %s %s from %s: input nested too deeply", request.method, request.path,
                    request.remote, extra=fields(peer=request.remote))
        raise _fail(web.HTTPBadRequest, "the request is nested too deeply") from None
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        # aiohttp's own refusals (404, 405, 413 ...) in the same JSON shape as ours.
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        return web.json_response({"error": exc.reason.lower() if exc.reason else f"HTTP {exc.status}",
                                  **({"hint": f"the body limit is {MAX_BODY_BYTES} bytes"}
                                     if exc.status == 413 else {})},
                                 status=exc.status, headers=headers)
    except Exception:   # a bug: logged with its traceback, answered in the API's shape
        log.exception("internal error on %s %s from %s", request.method, request.path, request.remote)
        return web.json_response({"error": "internal error (logged by the router)"}, status=500)


# -- read-only handlers -------------------------------------------------------------------------

@public
async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@public
async def healthz(request: web.Request) -> web.Response:
    return _json({"ok": True, "version": __version__})


@public
async def openapi_json(request: web.Request) -> web.Response:
    return _json(openapi_spec())


@public
async def metrics(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    body = await plane.io(render, plane.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def get_status(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    data = await plane.io(ops.status, plane.cfg, plane.spool)
    data.update(version=__version__, source=plane.cfg.source, alerts=plane.alerts.snapshot(),
                http_started=plane.started, token_configured=bool((plane.cfg.http or HttpConfig()).token))
    return _json(data)


async def get_queues(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    return _json({"queues": await plane.io(ops.destination_status, plane.cfg, plane.spool)})


async def get_queue(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    dest = await plane.io(ops.resolve_destination, plane.cfg, plane.spool, request.match_info["destination"])
    for q in await plane.io(ops.destination_status, plane.cfg, plane.spool):
        if q["destination"] == dest:
            return _json(q)
    raise ops.NotFound(f"no queue for destination {request.match_info['destination']!r}")


async def get_entries(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    rows = await plane.io(ops.entries, plane.cfg, plane.spool, request.match_info["destination"],
                          request.query.get("state", "failed"), _int_param(request, "limit", 100))
    return _json({"entries": rows})


async def get_failures(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    rows = await plane.io(ops.failures, plane.cfg, plane.spool, request.query.get("destination") or None,
                          _int_param(request, "limit", 50, hi=1000))
    return _json({"failures": rows})


async def get_throughput(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    return _json({"interval": plane.monitor_interval, **plane.history.series()})


async def get_alerts(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    return _json({"alerts": plane.alerts.snapshot(),
                  "checked": [{"name": n, "destination": d} for n, d in sorted(plane.alerts.checked)]})


async def get_lookup(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    q = request.query
    result = await plane.io(
        ops.lookup, plane.cfg, plane.spool,
        study_instance_uid=q.get("study_instance_uid", q.get("study", "")),
        accession_number=q.get("accession_number", q.get("accession", "")),
        patient_id=q.get("patient_id", q.get("patient", "")), limit=_int_param(request, "limit", 2000))
    result["studies"] = ops.study_rollup(result["objects"])   # the dashboard's per-series view
    return _json(result)


async def get_study(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    result = await plane.io(ops.lookup, plane.cfg, plane.spool,
                            study_instance_uid=request.match_info["study_instance_uid"],
                            limit=_int_param(request, "limit", 2000))
    if not result["objects"]:
        raise ops.NotFound(f"no object of study {request.match_info['study_instance_uid']} in the spool")
    result["studies"] = ops.study_rollup(result["objects"])
    return _json(result)


async def get_object(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    return _json(await plane.io(ops.get_object, plane.spool, _oid(request.match_info["oid"])))


async def get_audit(request: web.Request) -> web.StreamResponse:
    plane = request.app[PLANE]
    q = request.query
    since = _time_param(request, "since")
    until = _time_param(request, "until", end=True)
    since = 0.0 if since is None else since
    until = float("inf") if until is None else until
    study = q.get("study_instance_uid", "")
    fmt = q.get("format", "json")
    if fmt in ("csv", "jsonl"):
        buf = io.StringIO()
        await plane.io(ops.audit_export, plane.spool, buf, fmt=fmt, since=since, until=until,
                       study_instance_uid=study)
        return web.Response(text=buf.getvalue(), content_type="text/csv" if fmt == "csv" else "application/x-ndjson")
    if fmt != "json":
        raise ops.BadRequest(f"unknown format {fmt!r} (json, jsonl or csv)")
    events = await plane.io(ops.audit_events, plane.spool, since=since, until=until,
                            study_instance_uid=study, limit=_int_param(request, "limit", 1000))
    return _json({"events": events})


async def get_audit_verify(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    ok, text = await plane.io(plane.spool.audit_verify)
    return _json({"ok": ok, "detail": text}, status=200 if ok else 409)


async def post_config_validate(request: web.Request) -> web.Response:
    text, _ = await _yaml_body(request)
    if text is None:
        raise ops.BadRequest("post the YAML configuration as the body (Content-Type: application/yaml) "
                             "or as JSON {\"text\": ...}")
    result = ops.validate_config(text)
    return _json(result, status=200 if result["valid"] else 422)


# -- mutating handlers --------------------------------------------------------------------------

@mutating
async def post_config_reload(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    text, params = await _yaml_body(request)
    result = await plane.io(ops.reload_config, plane.cfg, plane.spool, plane.config_path, text=text,
                            applied_text=plane.applied_text, who=_who(request, params),
                            why=str(params.get("why", "")))
    return _json(result)


@mutating
async def post_retry(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    body = await _body(request)
    result = await plane.io(ops.retry, plane.cfg, plane.spool, destination=request.match_info["destination"],
                            study_instance_uid=str(body.get("study_instance_uid") or ""),
                            oids=_oids(body.get("oids")), who=_who(request, body), why=str(body.get("why", "")))
    return _json(result)


@mutating
async def post_study_retry(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    body = await _body(request)
    result = await plane.io(ops.retry, plane.cfg, plane.spool, destination=str(body.get("destination") or ""),
                            study_instance_uid=request.match_info["study_instance_uid"],
                            who=_who(request, body), why=str(body.get("why", "")))
    return _json(result)


@mutating
async def post_purge(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    body = await _body(request)
    states = body.get("states")
    if not isinstance(states, list) or not all(isinstance(s, str) for s in states):
        raise ops.BadRequest("'states' must be a list naming what to purge: pending, failed and/or unrouted")
    result = await plane.io(ops.purge, plane.cfg, plane.spool, destination=request.match_info["destination"],
                            states=states, reason=str(body.get("reason") or ""), oids=_oids(body.get("oids")),
                            study_instance_uid=str(body.get("study_instance_uid") or ""),
                            who=_who(request, body))
    return _json(result)


@mutating
async def post_pause(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    body = await _body(request)
    return _json(await plane.io(ops.set_paused, plane.cfg, plane.spool, request.match_info["destination"], True,
                                who=_who(request, body), why=str(body.get("why", ""))))


@mutating
async def post_resume(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    body = await _body(request)
    return _json(await plane.io(ops.set_paused, plane.cfg, plane.spool, request.match_info["destination"], False,
                                who=_who(request, body), why=str(body.get("why", ""))))


@mutating
async def post_send_now(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    body = await _body(request)
    return _json(await plane.io(ops.send_now, plane.cfg, plane.spool, request.match_info["destination"],
                                who=_who(request, body), why=str(body.get("why", ""))))


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/", index),
    ("GET", "/healthz", healthz),
    ("GET", "/openapi.json", openapi_json),
    ("GET", "/metrics", metrics),
    ("GET", "/api/status", get_status),
    ("GET", "/api/queues", get_queues),
    ("GET", "/api/queues/{destination}", get_queue),
    ("GET", "/api/queues/{destination}/entries", get_entries),
    ("GET", "/api/failures", get_failures),
    ("GET", "/api/throughput", get_throughput),
    ("GET", "/api/alerts", get_alerts),
    ("GET", "/api/lookup", get_lookup),
    ("GET", "/api/studies/{study_instance_uid}", get_study),
    ("GET", "/api/objects/{oid}", get_object),
    ("GET", "/api/audit", get_audit),
    ("GET", "/api/audit/verify", get_audit_verify),
    ("POST", "/api/config/validate", post_config_validate),
    ("POST", "/api/config/reload", post_config_reload),
    ("POST", "/api/queues/{destination}/retry", post_retry),
    ("POST", "/api/queues/{destination}/purge", post_purge),
    ("POST", "/api/queues/{destination}/pause", post_pause),
    ("POST", "/api/queues/{destination}/resume", post_resume),
    ("POST", "/api/studies/{study_instance_uid}/retry", post_study_retry),
    ("POST", "/api/destinations/{destination}/send-now", post_send_now),
)


def make_app(cfg: Config, spool: Spool, config_path: str | None, *,
             monitor_interval: float = MONITOR_INTERVAL) -> web.Application:
    """The application; the caller owns ``spool`` and closes it after the app's cleanup."""
    app = web.Application(middlewares=[errors_middleware, auth_middleware], client_max_size=MAX_BODY_BYTES)
    plane = Plane(cfg, spool, config_path, monitor_interval)
    http = cfg.http or HttpConfig()
    if not http.token:
        log.warning("http: no http.token configured: patient data (lookups, studies, objects, queue entries, "
                    "failures) and the audit trail are served WITHOUT authentication to anyone who can reach "
                    "%s:%d, and mutating calls are refused (403); set http.token", http.host, http.port)
    app[PLANE] = plane
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.router.add_static("/static/", STATIC_DIR, name="static")

    async def background(app: web.Application) -> AsyncIterator[None]:
        try:
            await plane.tick()   # the first page load already has data
        except (FastrouteError, OSError) as exc:
            log.error("first monitor round failed: %s", exc)
        task = asyncio.create_task(plane.monitor())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if plane.webhook is not None:
            await plane.webhook.close()
        plane.pool.shutdown(wait=True)   # no spool read may outlive the app

    app.cleanup_ctx.append(background)
    return app


# -- OpenAPI ------------------------------------------------------------------------------------

def _param(name: str, where: str = "query", description: str = "", schema: dict[str, Any] | None = None,
           required: bool | None = None) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path" if required is None else required,
            "description": description, "schema": schema or {"type": "string"}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _op(summary: str, *, returns: dict[str, Any], params: tuple[dict[str, Any], ...] = (),
        body: dict[str, Any] | None = None, auth: bool = False, ok: str = "application/json",
        extra: dict[str, str] | None = None, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """One operation; ``returns`` is the schema of its 200 body (the suite validates real
    responses against it), ``also`` more content types of that body (plain text)."""
    content = {ok: {"schema": returns}, **{t: {"schema": {"type": "string"}} for t in also}}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    for code, text in (extra or {}).items():
        responses[code] = {"description": text, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}
    if auth:
        responses["403"] = {"description": "no http.token configured: mutating calls are disabled"}
    op: dict[str, Any] = {"summary": summary, "parameters": list(params), "responses": responses}
    if body is not None:
        op["requestBody"] = body
    return op


def _json_body(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return {"required": bool(required), "content": {"application/json": {"schema": schema}}}


_S = {"type": "string"}
_I = {"type": "integer"}
_N = {"type": "number"}
_B = {"type": "boolean"}
_NN = {"type": "number", "nullable": True}
_NI = {"type": "integer", "nullable": True}
_TEXT = {"type": "string"}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None, *,
         closed: bool = True) -> dict[str, Any]:
    """An object schema: ``required`` keys always present; ``closed``: no other key."""
    schema: dict[str, Any] = {"type": "object", "properties": {**required, **(optional or {})},
                              "required": sorted(required)}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def _response_schemas() -> dict[str, Any]:
    """The bodies of 2xx answers, referenced from the operations."""
    counts = {"type": "object", "additionalProperties": _I}
    entry = {
        "destination": _S, "state": _S, "oid": _I, "attempts": _I, "next_at": _NN, "status": _NI,
        "status_text": _S, "error": _S, "sop_instance_uid": _S, "study_instance_uid": _S, "patient_id": _S,
        "accession_number": _S, "modality": _S, "calling_ae": _S, "received_at": _NN}
    rollup = _obj({"destination": _S, "routed": _I, "delivered": _I, "waiting": _I, "failed": _I, "dropped": _I})
    step = _obj({"destination": _S, "state": {"type": "string", "enum": sorted(ops.StepState)},
                 "attempts": _NI, "at": _NN, "status": _NI, "error": _S, "status_text": _S},
                {"syntax": _S, "next_at": _NN, "by_oid": _I,
                 "duplicate_of": _obj({"oid": _NI, "delivered_at": _N}),
                 "last_failure": _obj({"at": _N, "status": _NI, "error": _S, "status_text": _S})})
    return {
        "Health": _obj({"ok": _B, "version": _S}),
        "OpenApi": _obj({"openapi": _S, "info": {"type": "object"}, "paths": {"type": "object"},
                         "components": {"type": "object"}}),
        "Queue": _obj({
            "destination": _S, "name": _S, "pending": _I, "in_flight": _I, "failed": _I, "oldest_age": _NN,
            "delivered": _I, "failed_total": _I, "suppressed": _I, "unknown_outcomes": _I, "configured": _B,
            "bulk_pending": _I,   # of pending: a migration's objects, sent after clinical ones
            "paused": _B, "status": {"type": "string", "enum": sorted(ops.DestinationStatus)},
            "down_since": _NN, "retry_at": _NN, "consecutive_failures": _I, "last_error": _S,
            "last_success": _NN,
            "state": {"type": "object", "nullable": True, "description": "the sender's state file as written"}},
            {"peer": _obj({"ae_title": _S, "host": _S, "port": _I, "max_associations": _I})}),
        "Queues": _obj({"queues": _array(_ref("Queue"))}),
        "Alert": _obj({"name": _S, "destination": _S, "value": _N, "threshold": _N, "message": _S, "since": _N}),
        "Status": _obj({
            "now": _N, "listener": _obj({"ae_title": _S, "host": _S, "port": _I, "processes": _I,
                                          "max_associations": _I}),
            "destinations": _array(_ref("Queue")), "usage": counts, "min_free_bytes": _I, "totals": counts,
            "received_from": counts, "version": _S, "source": _S, "alerts": _array(_ref("Alert")),
            "http_started": _N, "token_configured": _B}),
        "Entries": _obj({"entries": _array(_obj(entry))}),
        "Failures": _obj({"failures": _array(_obj({**entry, "failed_at": _N}))}),
        "Throughput": _obj({"interval": _N, "t": _array(_N), "received": _array(_N),
                            "delivered": {"type": "object", "additionalProperties": _array(_N)}}),
        "Alerts": _obj({"alerts": _array(_ref("Alert")),
                        "checked": _array(_obj({"name": _S, "destination": _S}))}),
        "Object": _obj({
            "oid": _I, "sop_instance_uid": _S, "sop_class_uid": _S, "study_instance_uid": _S, "patient_id": _S,
            "accession_number": _S, "modality": _S, "transfer_syntax": _S, "size": _I, "received_at": _NN,
            "received_from": _obj({"calling_ae": _S, "called_ae": _S, "peer": _S}), "rules": _array(_S),
            "routed_to": _array(_S), "path": _array(step), "series_instance_uid": _S}),
        "Lookup": _obj({"query": {"type": "object", "additionalProperties": _S}, "count": _I, "truncated": _B,
                        "objects": _array(_ref("Object"))},
                       {"studies": _array(_obj({
                           "study_instance_uid": _S, "patient_id": _S, "accession_number": _S, "received": _I,
                           "first_received_at": _NN, "last_received_at": _NN, "destinations": _array(rollup),
                           "series": _array(_obj({"series_instance_uid": _S, "modality": _S, "received": _I,
                                                  "oids": _array(_I), "destinations": _array(rollup)}))}))}),
        "AuditEvents": _obj({"events": _array(_obj(
            {"seq": _I, "time": _N, "action": _S, "prev": _S, "hash": _S},
            {"who": _S, "why": _S}, closed=False))}),
        "AuditVerify": _obj({"ok": _B, "detail": _S}),
        "ConfigValidation": _obj({"valid": _B, "errors": _array({"type": "object"})},
                                 {"summary": _obj({"destinations": _array(_S), "rules": _array(_S),
                                                   "default": _array(_S)})}),
        "Reload": _obj({"applied": _B, "supervisor_pid": _I, "changed": _B, "diff": _S}),
        "Retried": _obj({"retried": counts, "count": _I}),
        "Purged": _obj({"destination": _S, "states": _array(_S), "purged": _array(_I), "count": _I}),
        "Paused": _obj({"destination": _S, "paused": _B}, {"note": _S}),
        "SendNow": _obj({"destinations": _array(_obj(
            {"destination": _S, "made_due": _I, "paused": _B, "was": _S, "consecutive_failures": _I},
            {"note": _S})), "made_due": _I}),
    }


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI 3 description of every route (a test holds it equal to the router)."""
    dest = _param("destination", "path", "destination name ('unrouted' for objects no rule routed)")
    study = _param("study_instance_uid", "path", "Study Instance UID")
    why = {"type": "string", "description": "recorded in the audit trail"}
    who = {"type": "string", "description": "operator name recorded in the audit trail "
                                            "(or header X-Fastroute-Operator)"}
    oids = {"type": "array", "items": {"type": "integer"}, "description": "only these object ids"}
    yaml_body = {"required": False, "content": {
        "application/yaml": {"schema": {"type": "string"}},
        "application/json": {"schema": {"type": "object", "properties": {
            "text": {"type": "string", "description": "YAML configuration"}, "why": why, "who": who}}}}}
    bad = {"400": "bad request", "404": "unknown destination or object"}
    paths: dict[str, dict[str, Any]] = {
        "/": {"get": _op("Dashboard (HTML)", returns=_TEXT, ok="text/html")},
        "/static/{filename}": {"get": _op("Dashboard assets", returns=_TEXT, ok="application/octet-stream",
                                          params=(_param("filename", "path"),))},
        "/healthz": {"get": _op("Liveness of the HTTP process", returns=_ref("Health"))},
        "/openapi.json": {"get": _op("This description", returns=_ref("OpenApi"))},
        "/metrics": {"get": _op("Prometheus metrics (read from the spool at scrape time)", returns=_TEXT, ok="text/plain")},
        "/api/status": {"get": _op("Listener, per-destination queues and state, disk and spool usage, "
                                   "totals and active alerts", returns=_ref("Status"))},
        "/api/queues": {"get": _op("Per-destination queue depth, oldest age, totals and sender state", returns=_ref("Queues"))},
        "/api/queues/{destination}": {"get": _op("One destination's queue and state", returns=_ref("Queue"), params=(dest,),
                                                 extra={"404": "unknown destination"})},
        "/api/queues/{destination}/entries": {"get": _op(
            "Queue entries of one destination in one state", returns=_ref("Entries"), extra=bad, params=(
                dest, _param("state", description="pending | in_flight | failed | unrouted (default failed)"),
                _param("limit", schema={"type": "integer", "default": 100})))},
        "/api/failures": {"get": _op("Recent failed objects with DICOM status codes and their meaning", returns=_ref("Failures"), params=(
            _param("destination", description="only this destination"),
            _param("limit", schema={"type": "integer", "default": 50})))},
        "/api/throughput": {"get": _op("Objects per second received and delivered per destination, "
                                       "over the last minutes", returns=_ref("Throughput"))},
        "/api/alerts": {"get": _op("Raised alerts and the checks configured", returns=_ref("Alerts"))},
        "/api/lookup": {"get": _op(
            "Objects by Study Instance UID, Accession Number or Patient ID, with each object's path: "
            "source, rules matched, deliveries, attempts and errors", returns=_ref("Lookup"), extra={"400": "not exactly one key given"},
            params=(_param("study_instance_uid"), _param("accession_number"), _param("patient_id"),
                    _param("limit", schema={"type": "integer", "default": 2000})))},
        "/api/studies/{study_instance_uid}": {"get": _op("One study's objects and their paths", returns=_ref("Lookup"), params=(study,),
                                                         extra={"404": "no such study in the spool"})},
        "/api/objects/{oid}": {"get": _op("One object and its path", returns=_ref("Object"), params=(
            _param("oid", "path", "object id", {"type": "integer"}),), extra=bad)},
        "/api/audit": {"get": _op("Audit trail events", returns=_ref("AuditEvents"), also=("application/x-ndjson", "text/csv"), extra={"400": "bad time"}, params=(
            _param("since", description="ISO date or datetime (UTC when no zone)"),
            _param("until", description="ISO date (end of that day) or datetime"),
            _param("study_instance_uid"),
            _param("format", description="json (default), jsonl or csv"),
            _param("limit", schema={"type": "integer", "default": 1000})))},
        "/api/audit/verify": {"get": _op("Verify the audit hash chain (409 when broken)", returns=_ref("AuditVerify"),
                                         extra={"409": "chain broken"})},
        "/api/config/validate": {"post": _op(
            "Validate a YAML configuration without applying it; errors name line and key", returns=_ref("ConfigValidation"),
            body=yaml_body, extra={"422": "invalid configuration (errors with line and key)"})},
        "/api/config/reload": {"post": _op(
            "Validate the configuration file (or the posted text, then written atomically to it), audit the "
            "change with a diff, and signal the supervisor (SIGHUP); a bad configuration is rejected and the "
            "running one kept", returns=_ref("Reload"), body=yaml_body, auth=True,
            extra={"409": "no supervisor running, or no configuration file", "422": "invalid configuration"})},
        "/api/queues/{destination}/retry": {"post": _op(
            "Queue a destination's failed objects again (all, some oids, or one study's)", returns=_ref("Retried"), params=(dest,),
            auth=True, extra=bad,
            body=_json_body({"oids": oids, "study_instance_uid": {"type": "string"}, "why": why, "who": who}))},
        "/api/queues/{destination}/purge": {"post": _op(
            "Remove queue entries for good (explicit states and a reason are required; audited)", returns=_ref("Purged"), params=(dest,),
            auth=True, extra=bad, body=_json_body({
                "states": {"type": "array", "items": {"enum": sorted(ops.STATES)}},
                "reason": why, "oids": oids, "study_instance_uid": {"type": "string"}, "who": who},
                required=("states", "reason")))},
        "/api/queues/{destination}/pause": {"post": _op(
            "Pause sending to a destination (its queue keeps filling)", returns=_ref("Paused"), params=(dest,), auth=True, extra=bad,
            body=_json_body({"why": why, "who": who}))},
        "/api/queues/{destination}/resume": {"post": _op(
            "Resume sending to a destination and wake its sender (its backoff ends: it tries at once)", returns=_ref("Paused"), params=(dest,), auth=True, extra=bad,
            body=_json_body({"why": why, "who": who}))},
        "/api/destinations/{destination}/send-now": {"post": _op(
            "End a destination's backoff now: its pending objects waiting out a retry delay become due, "
            "its sender forgets its failure streak and is woken (audited)", returns=_ref("SendNow"), params=(dest,), auth=True,
            extra=bad, body=_json_body({"why": why, "who": who}))},
        "/api/studies/{study_instance_uid}/retry": {"post": _op(
            "Queue a study's failed objects again (every destination, or one)", returns=_ref("Retried"), params=(study,), auth=True,
            extra=bad, body=_json_body({"destination": {"type": "string"}, "why": why, "who": who}))},
    }
    for method, path, handler in ROUTES:   # the same rule as auth_middleware, so the two cannot drift
        if not is_public(handler):
            op = paths[path][method.lower()]
            op["security"] = [{"bearerAuth": []}]
            op["responses"]["401"] = {"description": "missing or wrong bearer token (when http.token is set)"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "fastroute management API", "version": __version__,
                 "description": "With http.token configured, every call marked with bearerAuth needs "
                                "'Authorization: Bearer <http.token>' (they return patient data, the audit trail "
                                "or change state); without it reads are open and mutating calls are refused "
                                "with 403. Malformed requests get 400 (413 beyond the body limit) with a JSON "
                                "error."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": {**_response_schemas(), "Error": {"type": "object", "properties": {
                "error": {"type": "string"}, "hint": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "object", "properties": {
                    "message": {"type": "string"}, "line": {"type": "integer", "nullable": True},
                    "key": {"type": "string"}, "hint": {"type": "string"}}}}}}},
        },
    }


# -- process entry point ------------------------------------------------------------------------

async def _serve(cfg: Config, config_path: str | None) -> int:
    http = cfg.http or HttpConfig()
    spool = open_spool(cfg)
    try:
        runner = web.AppRunner(make_app(cfg, spool, config_path), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, http.host, http.port).start()
        except OSError as exc:
            log.error("http: cannot listen on %s:%d: %s (hint: change http.port or stop what uses it)",
                      http.host, http.port, exc)
            await runner.cleanup()
            return 1   # the management plane never stops the data plane: restarted with backoff
        log.info("http: dashboard and API on http://%s:%d/ (metrics at /metrics)", http.host, http.port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        log.info("http: stopping")
        await runner.cleanup()
    finally:
        spool.close()
    return 0


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:   # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def http_main(cfg: Config, config_path: str | None) -> None:
    """Blocking entry point of the HTTP process (run by the supervisor); SIGTERM stops it."""
    from fastroute.logsetup import set_process_title, setup_logging

    setup_logging(cfg.log_level, cfg.log_format, process="http")
    set_process_title("http")
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the supervisor owns Ctrl-C
    code = _run(_serve(cfg, config_path))
    if code:
        sys.exit(code)


__all__ = ["make_app", "http_main", "openapi_spec", "ROUTES", "PLANE", "Plane"]
