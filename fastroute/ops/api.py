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
import io
import json
import logging
import re
import signal
import sys
import threading
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Generator, TypeVar

from aiohttp import web

from fastroute import __version__

from fastroute.ops import actions as ops
from fastroute.ops import proposals as gov
from fastroute.ops import migrations as mig
from fastroute.ops.auth import (ANONYMOUS, LEGACY_USER, Authenticator, Principal, Role, Via, cert_fingerprint,
                                subject_from_peercert)
from fastroute.ops.alerts import AlertBook, Reading, Transition, Webhook, evaluate
from fastroute.ops.certificates import certificate_expiry
from fastroute.config import Config, HttpConfig
from fastroute.errors import ConfigError, FastrouteError, SpoolError
from fastroute.logsetup import fields
from fastroute.config import HttpTlsConfig, TlsListenerConfig   # HTTPS (issue 14)
from fastroute.dicom import tls
from fastroute.ops.metrics import CONTENT_TYPE, make_registry, render
from fastroute.spool import Spool, open_spool
from fastroute.spool.proposals import ProposalState

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
        self.auth = Authenticator(cfg.http or HttpConfig())
        self.reads = _Coalescer(READ_AUDIT_WINDOW)
        self.denials = _Coalescer(DENY_AUDIT_WINDOW)
        self.logged_in: set[tuple[str, str]] = set()   # (user, how): an http_login event written
        self.hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-scrypt")
        self.token_backoff: dict[str, float] = {}      # address -> monotonic time of its next token check

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking spool call on the pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def _sample(self) -> dict[Any, Any]:
        """One monitor round's blocking part (on the pool): sample, check, prune."""
        now = time.time()
        self.history.add(now, self.spool.counters())
        readings = [Reading(q["destination"], q["oldest_age"], q["consecutive_failures"], q.get("commit_overdue", 0),
                            q.get("verify_failed_now", 0), q.get("quarantined", 0))
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


@dataclass(frozen=True, slots=True)
class Access:
    """What a route needs: a role (None: public), and whether it returns patient data (then
    every answered read is audited, and it is never served without a login)."""

    role: Role | None
    phi: bool = False


PUBLIC = Access(None)
VIEW = Access(Role.VIEWER)
VIEW_PHI = Access(Role.VIEWER, phi=True)
OPERATE = Access(Role.OPERATOR)
ADMINISTER = Access(Role.ADMIN)
ADMIN_PHI = Access(Role.ADMIN, phi=True)
PRINCIPAL = web.RequestKey("principal", Principal)   # the authenticated user of a request
READ_AUDIT_WINDOW = 300.0   # seconds: the same user's same read is audited once per window
DENY_AUDIT_WINDOW = 60.0    # seconds: the same client's same refusal is audited once per window
TOKEN_RETRY_DELAY = 1.0     # seconds an address waits after a wrong token before another is hashed


class _Coalescer:
    """Remembers which audit events were written recently, so a polling dashboard or a client
    hammering a refused route cannot turn the audit trail (and the spool's write lock, which the
    receive path shares) into a log of every request."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.seen: dict[tuple[str, ...], float] = {}

    def due(self, key: tuple[str, ...], now: float) -> bool:
        if len(self.seen) > 10000:
            self.seen = {k: t for k, t in self.seen.items() if now - t < self.window}
        last = self.seen.get(key)
        if last is not None and now - last < self.window:
            return False
        self.seen[key] = now
        return True


def _bearer(request: web.Request) -> str | None:
    """The bearer token sent, "" for a malformed Authorization header, None for none."""
    raw = request.headers.get("Authorization")
    if raw is None:
        return None
    scheme, _, given = raw.partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def _peer_cert(request: web.Request) -> tuple[str, str]:
    """Subject and fingerprint of the client certificate on this HTTPS connection, if any."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return "", ""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return "", ""
    return subject_from_peercert(ssl_object.getpeercert()), cert_fingerprint(der)


def _target(request: web.Request) -> dict[str, str]:
    """Which patient data a call concerns, for its audit event."""
    out = {}
    for k in ("study_instance_uid", "oid", "name", "destination"):
        if k in request.match_info:
            out["job" if k == "name" else k] = request.match_info[k]
    for k, alias in (("study_instance_uid", "study"), ("accession_number", "accession"),
                     ("patient_id", "patient"), ("state", "state")):
        value = request.query.get(k) or request.query.get(alias)
        if value:
            out[k] = value
    return out


async def _audit(request: web.Request, action: str, who: str, **details: Any) -> None:
    """An access event (PS3.15 / ATNA style: who, what, when, from where, which study)."""
    plane = request.app[PLANE]
    try:
        await plane.io(plane.spool.audit_record, action, who=who, method=request.method,
                       path=request.path, peer=request.remote or "", **details)
    except FastrouteError as exc:   # the answer still goes out; the failure is logged
        log.error("audit of %s %s by %s failed: %s", request.method, request.path, who, exc)


async def _deny(request: web.Request, exc_class: type[web.HTTPException], message: str, hint: str,
                who: str, reason: str) -> web.HTTPException:
    plane = request.app[PLANE]
    log.warning("refused %s %s from %s (%s): %s", request.method, request.path, request.remote, who, reason,
                extra=fields(peer=request.remote))
    if plane.denials.due((who, request.remote or "", request.method, request.path, reason), time.time()):
        await _audit(request, "http_denied", who, why=reason, status=exc_class.status_code)
    return _fail(exc_class, message, hint)


async def _authenticate(request: web.Request) -> tuple[Principal | None, str]:
    """Who sent this request, or None and why not ("" when it carried no credentials)."""
    plane = request.app[PLANE]
    auth = plane.auth
    subject, fp = _peer_cert(request)
    unmapped = ""
    if subject or fp:
        p = auth.by_cert(subject, fp)
        if p is not None:
            return p, ""
        # a hospital certificate no user names: the request may still carry a token
        unmapped = f"client certificate {subject or fp} is no configured user"
    if auth.trusted_proxy(request.remote):
        p = auth.by_proxy(request.headers)
        if p is not None:
            return p, ""
        named = request.headers.get(auth.http.proxy_user_header) or request.headers.get(auth.http.proxy_cert_header)
        if named:
            return None, f"the proxy named {named[:80]!r}, who is no configured user"
    elif request.headers.get(auth.http.proxy_user_header) or request.headers.get(auth.http.proxy_cert_header):
        log.warning("ignored identity headers from %s: not in http.trusted_proxies", request.remote,
                    extra=fields(peer=request.remote))
    token = _bearer(request)
    if token is None:
        return None, unmapped
    if not token:
        return None, "malformed Authorization header (not Bearer)"
    known = auth.by_token_cached(token)
    if known is None and auth.hashed:
        # An unknown token costs one scrypt per user: checked on a thread of its own (never more
        # than one core, never the spool's pool) and, after a wrong one, not again from the same
        # address for TOKEN_RETRY_DELAY, so guessing cannot eat the CPU the receive path needs.
        now = time.monotonic()
        remote = request.remote or ""
        if now < plane.token_backoff.get(remote, 0.0):
            return None, f"wrong bearer token (after a wrong token, this address waits {TOKEN_RETRY_DELAY:g} s)"
        known = await asyncio.get_running_loop().run_in_executor(plane.hasher, auth.by_token, token)
        if known is None:
            if len(plane.token_backoff) > 10000:
                plane.token_backoff = {k: t for k, t in plane.token_backoff.items() if t > now}
            plane.token_backoff[remote] = time.monotonic() + TOKEN_RETRY_DELAY
    if known is None:
        return None, "wrong bearer token"
    return known, ""


def _cross_site(request: web.Request) -> bool:
    """Whether a browser says this request comes from a page of another origin."""
    if request.headers.get("Sec-Fetch-Site", "") == "cross-site":
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    return origin == "null" or urllib.parse.urlsplit(origin).netloc != request.host


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Deny by default: every route's :data:`ACCESS` entry says the role it needs, checked here and
    nowhere else; refusals and answered reads of patient data are audited."""
    info = request.match_info
    if info.http_exception is not None or isinstance(info.route.resource, web.StaticResource):
        return await handler(request)
    resource = info.route.resource
    if resource is None:   # not a routed request (aiohttp's own answers): nothing to guard
        return await handler(request)
    canonical = resource.canonical
    access = ACCESS[(request.method if request.method != "HEAD" else "GET", canonical)]
    if access.role is None:
        return await handler(request)
    plane = request.app[PLANE]
    principal, why = await _authenticate(request)
    if principal is None:
        if why and plane.auth.configured:
            raise await _deny(request, web.HTTPUnauthorized, f"missing or wrong bearer token: {why}",
                              "send 'Authorization: Bearer <your token>' (fastroute user add prints one)",
                              "anonymous", why)
        if not plane.auth.configured:
            if access.role is Role.VIEWER and not access.phi:
                principal = ANONYMOUS   # status without patient data stays open, as before users
            elif access.phi:
                raise await _deny(request, web.HTTPForbidden,
                                  "patient data is not served: no users (and no http.token) are configured",
                                  "configure http.users (fastroute user add NAME --role viewer)", "anonymous",
                                  "patient data without users configured")
            else:
                raise await _deny(request, web.HTTPForbidden,
                                  "mutating API calls are disabled because no token is configured",
                                  "configure http.users (fastroute user add NAME --role operator); "
                                  "the deprecated http.token also works", "anonymous",
                                  "action without users configured")
        else:
            raise await _deny(request, web.HTTPUnauthorized, "missing or wrong bearer token: none was sent",
                              "send 'Authorization: Bearer <your token>'", "anonymous", "no credentials")
    elif principal.role is None or not principal.role.allows(access.role):
        raise await _deny(request, web.HTTPForbidden,
                          f"user {principal.name} ({principal.role}) may not do this: it needs {access.role}",
                          "ask an admin for a user with that role", principal.name,
                          f"role {principal.role} below {access.role}")
    if principal.via is not Via.NONE:
        if principal.via in (Via.CERT, Via.PROXY) and request.method == "POST" and _cross_site(request):
            # a certificate or a proxy's session is sent by the browser on its own: a page of
            # another site must not make it act (a bearer token is never sent that way)
            raise await _deny(request, web.HTTPForbidden, "cross-site request refused",
                              "call the API from the dashboard's own origin", principal.name,
                              f"cross-site POST (Origin {request.headers.get('Origin', '')[:80]!r})")
        if (principal.name, principal.via) not in plane.logged_in:
            plane.logged_in.add((principal.name, principal.via))
            await _audit(request, "http_login", principal.name, role=str(principal.role), via=str(principal.via),
                         why=f"first request of {principal.name} by {principal.via} to this HTTP process")
    request[PRINCIPAL] = principal
    response = await handler(request)
    if access.phi and response.status < 300 and plane.reads.due(
            (principal.name, request.method, canonical, request.query_string,
             *(f"{k}={v}" for k, v in info.items())), time.time()):
        await _audit(request, "http_read", principal.name, via=str(principal.via), **_target(request))
    return response


def mutating(handler: Handler) -> Handler:
    """Mark a handler as changing state (the role it needs is in :data:`ACCESS`)."""
    handler.mutating = True   # type: ignore[attr-defined]
    return handler


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
    """The user the call was authenticated as (the audit trail's ``who``). Only the deprecated
    shared token lets the client add a name of its own, marked as such."""
    principal: Principal = request.get(PRINCIPAL, ANONYMOUS)
    if principal.name == LEGACY_USER:
        named = str(body.get("who") or request.headers.get("X-Fastroute-Operator", "")).strip()
        return f"{named} ({LEGACY_USER})" if named else LEGACY_USER
    return principal.name


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
    except ops.Forbidden as exc:
        raise _fail(web.HTTPForbidden, Exception.__str__(exc), exc.hint) from None
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
                http_started=plane.started, token_configured=plane.auth.configured)
    return _json(data)


async def get_whoami(request: web.Request) -> web.Response:
    """Who the dashboard is logged in as, and what that role may do (it hides the rest)."""
    principal: Principal = request.get(PRINCIPAL, ANONYMOUS)
    role = principal.role
    return _json({"user": principal.name, "role": str(role) if role else None, "via": str(principal.via),
                  "can": {"read": role is not None,
                          "act": role is not None and role.allows(Role.OPERATOR),
                          "configure": role is not None and role.allows(Role.ADMIN)}})


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


async def get_object_diff(request: web.Request) -> web.Response:
    """What each destination gets of one stored object (issue 15): its plan run, nothing written."""
    from fastroute.ops.previews import object_diff   # pydicom and the content engines: on first use only
    plane = request.app[PLANE]
    return _json(await plane.io(object_diff, plane.cfg, plane.spool, _oid(request.match_info["oid"]),
                                request.query.get("destination", "")))


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
    result = await plane.io(gov.reload, plane.cfg, plane.spool, plane.config_path, text=text,
                            applied_text=plane.applied_text, who=_who(request, params),
                            why=str(params.get("why", "")))
    return _json(result, status=202 if result.get("proposed") else 200)


async def get_config_proposals(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    return _json({"proposals": await plane.io(gov.proposals, plane.spool, request.query.get("state", ""))})


def _approver(request: web.Request, body: dict[str, Any]) -> str:
    """Who decides a proposal: a user of their own (the shared token cannot tell two people apart)."""
    principal: Principal = request.get(PRINCIPAL, ANONYMOUS)
    if principal.name == LEGACY_USER:
        raise ops.Forbidden("the shared http.token cannot decide configuration proposals: two-person "
                            "governance needs two users of their own",
                            hint="configure http.users (fastroute user add NAME --role admin)")
    return _who(request, body)


@mutating
async def post_config_approve(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    body = await _body(request)
    result = await plane.io(gov.approve, plane.cfg, plane.spool, plane.config_path, request.match_info["id"],
                            who=_approver(request, body), why=str(body.get("why") or ""))
    return _json(result)


@mutating
async def post_config_reject(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    body = await _body(request)
    # rejecting is the safe direction: the shared token may do it (its audit names say so)
    result = await plane.io(gov.reject, plane.spool, request.match_info["id"], who=_who(request, body),
                            why=str(body.get("why") or ""))
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


# -- migrations (issue 13): the REST mirror of `fastroute migrate` -------------------------------

async def get_migrations(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    return _json({"migrations": await plane.io(mig.list_jobs, plane.spool)})


async def get_migration(request: web.Request) -> web.Response:
    """A job's status, with its failed studies and their reasons (what the dashboard shows)."""
    plane = request.app[PLANE]
    name = request.match_info["name"]
    doc = await plane.io(mig.status, plane.spool, name)
    doc["failures"] = await plane.io(mig.failures, plane.spool, name, _int_param(request, "limit", 50, hi=1000))
    return _json(doc)


async def get_migration_report(request: web.Request) -> web.StreamResponse:
    """One row per study, streamed in chunks read on the pool: never the whole report in memory."""
    plane = request.app[PLANE]
    name = request.match_info["name"]
    fmt = request.query.get("format", "csv")
    chunks = _Serial(await plane.io(mig.report_chunks, plane.spool, name, fmt))   # 404/400 before any byte
    resp = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/json; charset=utf-8",
        "Content-Disposition": f'attachment; filename="{name}-report.{fmt}"'})
    try:
        await resp.prepare(request)
        while (chunk := await plane.io(chunks.next)) is not None:
            await resp.write(chunk.encode("utf-8"))
        await resp.write_eof()
    except ConnectionResetError:   # the client left mid-report: nothing to answer
        log.info("migration %s: report to %s stopped, the client went away", name, request.remote,
                 extra=fields(peer=request.remote))
    finally:   # end its read transaction now, on the pool, not whenever the generator is collected
        await plane.io(chunks.close)
    return resp


class _Serial:
    """A generator driven from pool threads: a handler cancelled (client gone) while one thread
    runs ``next`` must not ``close`` it from another at the same time ("generator already
    executing"), so both take one lock."""

    def __init__(self, gen: Generator[str, None, None]) -> None:
        self.gen = gen
        self.lock = threading.Lock()

    def next(self) -> str | None:
        with self.lock:
            return next(self.gen, None)

    def close(self) -> None:
        with self.lock:
            self.gen.close()


def _strings(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if value in (None, ""):
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ops.BadRequest(f"'{key}' must be a string or a list of strings")
    return value


@mutating
async def post_migration_start(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    body = await _body(request)
    query = body.get("query") or {}
    if not isinstance(query, (dict, list)) or (isinstance(query, list) and not all(isinstance(q, str) for q in query)):
        raise ops.BadRequest("'query' must be an object of STUDY-level keys or a list of KEY=VALUE strings")
    verify = body.get("verify", True)
    if not isinstance(verify, bool):
        raise ops.BadRequest("'verify' must be true or false")
    for key in ("source", "name", "rate", "why"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise ops.BadRequest(f"'{key}' must be a string")
    if not body.get("source"):
        raise ops.BadRequest("'source' is required: a key of the configuration's 'sources:'")
    result = await plane.io(mig.start, plane.cfg, plane.spool, source=str(body["source"]),
                            destinations=_strings(body, "destinations") or _strings(body, "to"),
                            name=str(body.get("name") or ""), query=query, studies=_strings(body, "studies"),
                            rate=str(body["rate"]) if body.get("rate") not in (None, "") else None,
                            windows=_strings(body, "windows"), verify=verify, who=_who(request, body),
                            why=str(body.get("why", "")))
    return _json(result, status=201)


def _migration_action(verb: str) -> Handler:
    @mutating
    async def handler(request: web.Request) -> web.Response:
        plane = request.app[PLANE]
        body = await _body(request)
        return _json(await plane.io(getattr(mig, verb), plane.spool, request.match_info["name"],
                                    who=_who(request, body), why=str(body.get("why", ""))))
    handler.__name__ = f"post_migration_{verb}"
    return handler


post_migration_pause = _migration_action("pause")
post_migration_resume = _migration_action("resume")
post_migration_cancel = _migration_action("cancel")
post_migration_retry = _migration_action("retry")


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
    ("GET", "/api/objects/{oid}/diff", get_object_diff),
    ("GET", "/api/audit", get_audit),
    ("GET", "/api/audit/verify", get_audit_verify),
    ("POST", "/api/config/validate", post_config_validate),
    ("POST", "/api/config/reload", post_config_reload),
    ("GET", "/api/config/proposals", get_config_proposals),
    ("POST", "/api/config/proposals/{id}/approve", post_config_approve),
    ("POST", "/api/config/proposals/{id}/reject", post_config_reject),
    ("POST", "/api/queues/{destination}/retry", post_retry),
    ("POST", "/api/queues/{destination}/purge", post_purge),
    ("POST", "/api/queues/{destination}/pause", post_pause),
    ("POST", "/api/queues/{destination}/resume", post_resume),
    ("POST", "/api/studies/{study_instance_uid}/retry", post_study_retry),
    ("POST", "/api/destinations/{destination}/send-now", post_send_now),
    ("GET", "/api/migrations", get_migrations),
    ("GET", "/api/migrations/{name}", get_migration),
    ("GET", "/api/migrations/{name}/report", get_migration_report),
    ("POST", "/api/migrations", post_migration_start),
    ("POST", "/api/migrations/{name}/pause", post_migration_pause),
    ("POST", "/api/migrations/{name}/resume", post_migration_resume),
    ("POST", "/api/migrations/{name}/cancel", post_migration_cancel),
    ("POST", "/api/migrations/{name}/retry", post_migration_retry),
    ("GET", "/api/whoami", get_whoami),
)

# What each route needs, declared once (auth_middleware enforces it, openapi_spec publishes it as
# x-required-role): reads of patient data need a viewer and are audited, actions an operator,
# configuration an admin. A route missing here fails at import, so none can be added unguarded.
ACCESS: dict[tuple[str, str], Access] = {
    ("GET", "/"): PUBLIC,
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/static/{filename}"): PUBLIC,     # the dashboard's assets (add_static, not in ROUTES)
    ("GET", "/api/status"): VIEW,
    ("GET", "/api/queues"): VIEW,
    ("GET", "/api/queues/{destination}"): VIEW,
    ("GET", "/api/queues/{destination}/entries"): VIEW_PHI,
    ("GET", "/api/failures"): VIEW_PHI,
    ("GET", "/api/throughput"): VIEW,
    ("GET", "/api/alerts"): VIEW,
    ("GET", "/api/lookup"): VIEW_PHI,
    ("GET", "/api/studies/{study_instance_uid}"): VIEW_PHI,
    ("GET", "/api/objects/{oid}"): VIEW_PHI,
    ("GET", "/api/objects/{oid}/diff"): VIEW_PHI,     # old and new values of patient attributes
    ("GET", "/api/audit"): ADMIN_PHI,         # who read which patient's data: a security officer's view
    ("GET", "/api/audit/verify"): VIEW,
    ("POST", "/api/config/validate"): ADMINISTER,
    ("POST", "/api/config/reload"): ADMINISTER,
    ("GET", "/api/config/proposals"): ADMINISTER,     # whole configuration texts
    ("POST", "/api/config/proposals/{id}/approve"): ADMINISTER,
    ("POST", "/api/config/proposals/{id}/reject"): ADMINISTER,
    ("POST", "/api/queues/{destination}/retry"): OPERATE,
    ("POST", "/api/queues/{destination}/purge"): OPERATE,
    ("POST", "/api/queues/{destination}/pause"): OPERATE,
    ("POST", "/api/queues/{destination}/resume"): OPERATE,
    ("POST", "/api/studies/{study_instance_uid}/retry"): OPERATE,
    ("POST", "/api/destinations/{destination}/send-now"): OPERATE,
    ("GET", "/api/migrations"): VIEW,
    ("GET", "/api/migrations/{name}"): VIEW_PHI,          # failed studies with patient ids
    ("GET", "/api/migrations/{name}/report"): VIEW_PHI,
    ("POST", "/api/migrations"): OPERATE,
    ("POST", "/api/migrations/{name}/pause"): OPERATE,
    ("POST", "/api/migrations/{name}/resume"): OPERATE,
    ("POST", "/api/migrations/{name}/cancel"): OPERATE,
    ("POST", "/api/migrations/{name}/retry"): OPERATE,
    ("GET", "/api/whoami"): VIEW,
}
_routes = {(m, p) for m, p, _ in ROUTES} | {("GET", "/static/{filename}")}
if set(ACCESS) != _routes:   # not an assert: it must hold under python -O too
    raise RuntimeError(f"ACCESS and ROUTES differ: {sorted(set(ACCESS) ^ _routes)}")
for _m, _p, _h in ROUTES:
    if is_public(_h) != (ACCESS[(_m, _p)].role is None) or \
            getattr(_h, "mutating", False) != (_m == "POST" and _p != "/api/config/validate"):
        raise RuntimeError(f"{_m} {_p}: its handler's marks disagree with ACCESS")


def make_app(cfg: Config, spool: Spool, config_path: str | None, *,
             monitor_interval: float = MONITOR_INTERVAL) -> web.Application:
    """The application; the caller owns ``spool`` and closes it after the app's cleanup."""
    app = web.Application(middlewares=[errors_middleware, auth_middleware], client_max_size=MAX_BODY_BYTES)
    plane = Plane(cfg, spool, config_path, monitor_interval)
    http = cfg.http or HttpConfig()
    if not plane.auth.configured:
        log.warning("http: no http.users configured: patient data (lookups, studies, objects, queue entries, "
                    "failures) and the audit trail are served to NO ONE, and actions are refused (403); status "
                    "stays open on %s:%d; configure http.users (fastroute user add)", http.host, http.port)
    if http.token:
        log.warning("http: http.token is deprecated: it acts as the admin user %r, shared by everyone who "
                    "has it; give each person a user of their own (http.users, fastroute user add)", LEGACY_USER)
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
        plane.hasher.shutdown(wait=True)

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
        body: dict[str, Any] | None = None, ok: str = "application/json",
        extra: dict[str, str] | None = None, also: tuple[str, ...] = (), ok_status: str = "200") -> dict[str, Any]:
    """One operation; ``returns`` is the schema of its 200 body (the suite validates real
    responses against it), ``also`` more content types of that body (plain text)."""
    content = {ok: {"schema": returns}, **{t: {"schema": {"type": "string"}} for t in also}}
    responses: dict[str, Any] = {ok_status: {"description": "OK", "content": content}}
    for code, text in (extra or {}).items():
        responses[code] = {"description": text, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}
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


def _migration_schemas() -> dict[str, Any]:
    """A job's status (the keys ``migrate status --json`` prints) and a report row."""
    job = {"name": _S, "state": {"type": "string", "enum": sorted(mig.JobState)}, "studies_total": _I,
           "studies_verified": _I, "studies_failed": _I, "instances_expected": _I, "instances_received": _I,
           "instances_delivered": _I, "rate": _N, "eta_s": _NN}
    more = {"source": _S, "destinations": _array(_S), "studies_done": _I,
            "studies_by_state": {"type": "object", "additionalProperties": _I}, "error": _S, "created_at": _N,
            "updated_at": _N, "instances_found": _I, "conflicts": _I, "inventory_done": _B, "verify": _B,
            "windows": _array(_S), "rate_limit": _S, "query": {"type": "object", "additionalProperties": _S},
            "studies_listed": _I, "inventory_notes": _array(_S)}
    row = {"study_instance_uid": _S, "patient_id": _S, "accession_number": _S, "study_date": _S,
           "modalities": _S, "source_instances": _NI, "received": _I, "delivered": _I,
           "found_at_destination": _NI, "state": {"type": "string", "enum": sorted(mig.StudyState)}, "reason": _S}
    return {
        "Migration": _obj(job, more, closed=False),
        "Migrations": _obj({"migrations": _array(_ref("Migration"))}),
        "MigrationDetail": _obj({**job, "failures": _array(_ref("MigrationReportRow"))}, more, closed=False),
        "MigrationRetried": _obj({**job, "retried": _I}, more, closed=False),
        "MigrationReportRow": _obj(row),
        "MigrationReport": _array(_ref("MigrationReportRow")),
    }


def _response_schemas() -> dict[str, Any]:
    """The bodies of 2xx answers, referenced from the operations."""
    counts = {"type": "object", "additionalProperties": _I}
    entry = {
        "destination": _S, "state": _S, "oid": _I, "attempts": _I, "next_at": _NN, "status": _NI,
        "status_text": _S, "error": _S, "sop_instance_uid": _S, "study_instance_uid": _S, "patient_id": _S,
        "accession_number": _S, "modality": _S, "calling_ae": _S, "received_at": _NN}
    rollup = _obj({"destination": _S, "routed": _I, "delivered": _I, "committed": _I, "waiting": _I, "failed": _I,
                   "dropped": _I,
                   # verify: find (issue 14): of the delivered, listed by the destination's C-FIND or not
                   "verified": _I, "verify_failed": _I})
    step = _obj({"destination": _S, "state": {"type": "string", "enum": sorted(ops.StepState)},
                 "attempts": _NI, "at": _NN, "status": _NI, "error": _S, "status_text": _S},
                {"syntax": _S, "next_at": _NN, "by_oid": _I,
                 "duplicate_of": _obj({"oid": _NI, "delivered_at": _N}),
                 "last_failure": _obj({"at": _N, "status": _NI, "error": _S, "status_text": _S}),
                 # storage commitment at that destination (issue 14)
                 "commitment": _obj({"state": _S, "at": _N, "transaction_uid": _S}, {"reason": _I}),
                 # verify: find at that destination (issue 14)
                 "verification": {"type": "string", "enum": ["verified", "verify-failed", "waiting"]}})
    return {
        "Health": _obj({"ok": _B, "version": _S}),
        "OpenApi": _obj({"openapi": _S, "info": {"type": "object"}, "paths": {"type": "object"},
                         "components": {"type": "object"}}),
        "Queue": _obj({
            "destination": _S, "name": _S, "pending": _I, "in_flight": _I, "failed": _I, "oldest_age": _NN,
            "delivered": _I, "failed_total": _I, "suppressed": _I, "unknown_outcomes": _I, "configured": _B,
            "bulk_pending": _I,   # of pending: a migration's objects, sent after clinical ones
            # storage commitment (issue 14): committed apart from delivered
            "committed": _I, "commit_failed": _I, "commit_waiting": _I, "commit_overdue": _I,
            # verify: find (issue 14): instances verified, studies failed (total, now), studies waiting
            "verified": _I, "verify_failed": _I, "verify_failed_now": _I, "verify_waiting": _I,
            # issue 15: held back by the destination's de-identification (now, and since the spool began)
            "quarantined": _I, "quarantined_total": _I,
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
        "WhoAmI": _obj({"user": _S, "role": {"type": "string", "nullable": True, "enum": [*Role, None]},
                        "via": _S, "can": _obj({"read": _B, "act": _B, "configure": _B})}),
        "ConfigValidation": _obj({"valid": _B, "errors": _array({"type": "object"})},
                                 {"summary": _obj({"destinations": _array(_S), "rules": _array(_S),
                                                   "default": _array(_S)})}),
        "Reload": _obj({"applied": _B, "supervisor_pid": _I, "changed": _B, "diff": _S,
                        "governed_changes": _array(_S)}),
        "Proposal": _obj({"id": _S, "text": _S, "diff": _S, "who": _S, "why": _S, "created": _N, "path": _S,
                          "digest": _S, "base_digest": _S, "governed_changes": _array(_S),
                          "state": {"type": "string", "enum": sorted(ProposalState)}, "decided_by": _S,
                          "decided_why": _S, "decided_at": _N, "applied_at": _N}),
        "Proposals": _obj({"proposals": _array(_ref("Proposal"))}),
        "ObjectDiff": _obj({"oid": _I, "sop_instance_uid": _S, "transfer_syntax": _S, "rules": _array(_S),
                            "destinations": _array(_obj({
                                "destination": _S, "result": {"type": "string", "enum": [
                                    "unchanged", "changed", "quarantined", "fails"]},
                                "by": _array(_S), "sop_instance_uid": _S, "quarantine": _S, "error": _S,
                                "changes": _array(_obj({"path": _S, "keyword": _S, "action": _S,
                                                        "old": {"type": "string", "nullable": True},
                                                        "new": {"type": "string", "nullable": True},
                                                        "by": _S}))}))}),
        "Proposed": _obj({"applied": _B, "proposed": _B, "proposal": _ref("Proposal"), "hint": _S}),
        "ProposalDecision": _obj({"applied": _B, "proposal": _ref("Proposal")}, {"supervisor_pid": _I}),
        "Retried": _obj({"retried": counts, "count": _I}),
        "Purged": _obj({"destination": _S, "states": _array(_S), "purged": _array(_I), "count": _I}),
        "Paused": _obj({"destination": _S, "paused": _B}, {"note": _S}),
        **_migration_schemas(),
        "SendNow": _obj({"destinations": _array(_obj(
            {"destination": _S, "made_due": _I, "paused": _B, "was": _S, "consecutive_failures": _I},
            {"note": _S})), "made_due": _I}),
    }


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI 3 description of every route (a test holds it equal to the router)."""
    dest = _param("destination", "path", "destination name ('unrouted' for objects no rule routed)")
    study = _param("study_instance_uid", "path", "Study Instance UID")
    job = _param("name", "path", "migration job name")
    proposal = _param("id", "path", "configuration proposal id")
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
                dest, _param("state", description="pending | in_flight | failed | unrouted | quarantined (default failed)"),
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
        "/api/objects/{oid}/diff": {"get": _op(
            "What each destination gets of one object: per destination its modify/deidentify changes "
            "(old and new values), or unchanged, quarantined, fails; nothing is written",
            returns=_ref("ObjectDiff"), params=(_param("oid", "path", "object id", {"type": "integer"}),
                                                _param("destination", description="only this destination "
                                                       "(default: every configured one it was routed to)")),
            extra=bad)},
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
            "running one kept", returns=_ref("Reload"), body=yaml_body,
            extra={"409": "no supervisor running, or no configuration file", "422": "invalid configuration"})},
        "/api/config/proposals": {"get": _op(
            "Configuration proposals (governance two_person), newest first, with text, diff, who, why and "
            "decision", returns=_ref("Proposals"), params=(
                _param("state", description="pending | approved | applied | rejected"),), extra={"400": "bad state"})},
        "/api/config/proposals/{id}/approve": {"post": _op(
            "Approve a pending proposal (a different admin than its proposer): written to the file, audited, "
            "the supervisor signalled", returns=_ref("ProposalDecision"), params=(proposal,),
            body=_json_body({"why": why}, required=("why",)),
            extra={"400": "no reason given", "404": "unknown proposal",
                   "409": "already decided, stale, or no supervisor running", "422": "no longer valid"})},
        "/api/config/proposals/{id}/reject": {"post": _op(
            "Reject (or withdraw) a pending proposal (audited)", returns=_ref("ProposalDecision"), params=(proposal,),
            body=_json_body({"why": why}, required=("why",)),
            extra={"400": "no reason given", "404": "unknown proposal", "409": "already decided"})},
        "/api/queues/{destination}/retry": {"post": _op(
            "Queue a destination's failed objects again (all, some oids, or one study's)", returns=_ref("Retried"), params=(dest,),
            extra=bad,
            body=_json_body({"oids": oids, "study_instance_uid": {"type": "string"}, "why": why, "who": who}))},
        "/api/queues/{destination}/purge": {"post": _op(
            "Remove queue entries for good (explicit states and a reason are required; audited)", returns=_ref("Purged"), params=(dest,),
            extra=bad, body=_json_body({
                "states": {"type": "array", "items": {"enum": sorted(ops.STATES)}},
                "reason": why, "oids": oids, "study_instance_uid": {"type": "string"}, "who": who},
                required=("states", "reason")))},
        "/api/queues/{destination}/pause": {"post": _op(
            "Pause sending to a destination (its queue keeps filling)", returns=_ref("Paused"), params=(dest,), extra=bad,
            body=_json_body({"why": why, "who": who}))},
        "/api/queues/{destination}/resume": {"post": _op(
            "Resume sending to a destination and wake its sender (its backoff ends: it tries at once)", returns=_ref("Paused"), params=(dest,), extra=bad,
            body=_json_body({"why": why, "who": who}))},
        "/api/destinations/{destination}/send-now": {"post": _op(
            "End a destination's backoff now: its pending objects waiting out a retry delay become due, "
            "its sender forgets its failure streak and is woken (audited)", returns=_ref("SendNow"), params=(dest,),
            extra=bad, body=_json_body({"why": why, "who": who}))},
        "/api/studies/{study_instance_uid}/retry": {"post": _op(
            "Queue a study's failed objects again (every destination, or one)", returns=_ref("Retried"), params=(study,),
            extra=bad, body=_json_body({"destination": {"type": "string"}, "why": why, "who": who}))},
        "/api/migrations": {
            "get": _op("Every migration job: state, studies, instances, rate and ETA", returns=_ref("Migrations")),
            "post": _op("Start a migration job (as `fastroute migrate start`); it is created in state inventory",
                        returns=_ref("Migration"), ok_status="201",
                        extra={"400": "bad query key, rate, window or study list",
                               "404": "unknown source or destination", "409": "a job of that name exists"},
                        body=_json_body({
                            "source": {"type": "string", "description": "a key of 'sources:'"},
                            "destinations": {"type": "array", "items": {"type": "string"}},
                            "name": {"type": "string", "description": "default <source>-<yyyymmdd-hhmmss>"},
                            "query": {"type": "object", "additionalProperties": {"type": "string"},
                                      "description": "STUDY-level C-FIND keys, e.g. {\"StudyDate\": \"2019\"}"},
                            "studies": {"type": "array", "items": {"type": "string"},
                                        "description": "Study Instance UIDs or Accession Numbers"},
                            "rate": {"type": "string", "description": "N/h studies per hour or N/s instances per second"},
                            "windows": {"type": "array", "items": {"type": "string"},
                                        "description": "HH:MM-HH:MM local time ('sat,sun 00:00-24:00')"},
                            "verify": {"type": "boolean", "default": True}, "why": why, "who": who},
                            required=("source", "destinations")))},
        "/api/migrations/{name}": {"get": _op(
            "One job's status and its failed studies with their reasons", returns=_ref("MigrationDetail"),
            params=(job, _param("limit", schema={"type": "integer", "default": 50})), extra={"404": "unknown job"})},
        "/api/migrations/{name}/report": {"get": _op(
            "One row per study (streamed): CSV with a header row (default) or a JSON list",
            returns=_ref("MigrationReport"), also=("text/csv",), params=(
                job, _param("format", description="csv (default) or json")),
            extra={"400": "unknown format", "404": "unknown job"})},
        "/api/migrations/{name}/pause": {"post": _op(
            "Pause a job (audited)", returns=_ref("Migration"), params=(job,),
            extra={"404": "unknown job", "409": "not possible in the job's state"},
            body=_json_body({"why": why, "who": who}))},
        "/api/migrations/{name}/resume": {"post": _op(
            "Resume a paused job (audited)", returns=_ref("Migration"), params=(job,),
            extra={"404": "unknown job", "409": "not possible in the job's state"},
            body=_json_body({"why": why, "who": who}))},
        "/api/migrations/{name}/cancel": {"post": _op(
            "Cancel a job; its studies keep their states for the report (audited)", returns=_ref("Migration"), params=(job,),
            extra={"404": "unknown job", "409": "not possible in the job's state"},
            body=_json_body({"why": why, "who": who}))},
        "/api/migrations/{name}/retry": {"post": _op(
            "Failed and incomplete studies of a job again (audited)", returns=_ref("MigrationRetried"), params=(job,),
            extra={"404": "unknown job", "409": "not possible in the job's state"},
            body=_json_body({"why": why, "who": who}))},
    }
    paths["/api/config/reload"]["post"]["responses"]["202"] = {
        "description": "governance two_person: a governed change was proposed, not applied; a second admin "
                       "approves it", "content": {"application/json": {"schema": _ref("Proposed")}}}
    paths["/api/whoami"] = {"get": _op("The user this request is authenticated as, its role and what it may do",
                                       returns=_ref("WhoAmI"))}
    for (method, path), access in ACCESS.items():   # the table auth_middleware enforces
        paths[path][method.lower()]["x-required-role"] = str(access.role) if access.role else "none"
        if access.role is None:
            continue
        op = paths[path][method.lower()]
        op["security"] = [{"bearerAuth": []}]
        op["x-patient-data"] = access.phi
        op["responses"]["401"] = {"description": "missing or wrong credentials"}
        op["responses"]["403"] = {"description": f"the user's role is below {access.role}"
                                  + ("" if access.role is Role.VIEWER and not access.phi
                                     else ", or no users are configured")}
    return {
        "openapi": "3.0.3",
        "info": {"title": "fastroute management API", "version": __version__,
                 "description": "Every call marked with bearerAuth needs a user (http.users): "
                                "'Authorization: Bearer <token>', a client certificate (HTTPS), or a trusted "
                                "proxy's identity header; x-required-role names the least role (viewer < operator "
                                "< admin). Calls with x-patient-data are audited and, without users configured, "
                                "refused (403), like every action. Malformed requests get 400 (413 beyond the "
                                "body limit) with a JSON error."},
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

def https_context(http: HttpConfig) -> ssl.SSLContext | None:
    """The HTTPS server context of ``http.tls``, or None for plain HTTP: the same BCP 195 profile
    as the DICOM TLS listener (TLS 1.2 at least). With a ``ca``, client certificates are asked for
    (required with ``require_client_cert``), verified against it, and name the user
    (``http.users.NAME.cert_subject`` / ``cert_fingerprint``). Raises TlsSetupError naming the file."""
    if http.tls is None:
        return None
    return tls.server_context(http_tls_as_listener(http.tls))


def reload_https(context: ssl.SSLContext, http: HttpConfig) -> bool:
    """SIGHUP (relayed by the supervisor): renewed certificate files under the same paths are
    taken for new connections; open ones keep theirs. The files are checked by building a whole
    new context first, so a bad renewal keeps the running certificate (and says so)."""
    if http.tls is None:
        return False
    try:
        https_context(http)
        context.load_cert_chain(str(http.tls.cert), str(http.tls.key))
        if http.tls.ca is not None:
            context.load_verify_locations(cafile=str(http.tls.ca))
    except (tls.TlsSetupError, OSError, ssl.SSLError) as exc:
        log.error("http: HTTPS certificate not reloaded, keeping the running one: %s", exc)
        return False
    log.info("http: HTTPS certificate reloaded from %s", http.tls.cert)
    return True


def http_tls_as_listener(t: HttpTlsConfig) -> TlsListenerConfig:
    """``http.tls`` in the listener's terms, so both share one context builder and one check."""
    return TlsListenerConfig(cert=t.cert, key=t.key, ca=t.ca, require_client_cert=t.require_client_cert)


async def _serve(cfg: Config, config_path: str | None) -> int:
    http = cfg.http or HttpConfig()
    spool = open_spool(cfg)
    try:
        runner = web.AppRunner(make_app(cfg, spool, config_path), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            context = https_context(http)
        except tls.TlsSetupError as exc:
            log.error("http: cannot set up HTTPS (http.tls): %s", exc)
            await runner.cleanup()
            return 1
        try:
            await web.TCPSite(runner, http.host, http.port, ssl_context=context).start()
        except OSError as exc:
            log.error("http: cannot listen on %s:%d: %s (hint: change http.port or stop what uses it)",
                      http.host, http.port, exc)
            await runner.cleanup()
            return 1   # the management plane never stops the data plane: restarted with backoff
        log.info("http: dashboard and API on %s://%s:%d/ (metrics at /metrics)",
                 "https" if context else "http", http.host, http.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if context is not None:
            loop.add_signal_handler(signal.SIGHUP, reload_https, context, http)
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

    from fastroute.spool.lockstats import start_publishing

    setup_logging(cfg.log_level, cfg.log_format, process="http")
    set_process_title("http")
    start_publishing(cfg.spool, "http")
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the supervisor owns Ctrl-C
    code = _run(_serve(cfg, config_path))
    if code:
        sys.exit(code)


__all__ = ["make_app", "http_main", "openapi_spec", "https_context", "http_tls_as_listener", "ROUTES", "ACCESS", "Access", "PLANE", "Plane"]
