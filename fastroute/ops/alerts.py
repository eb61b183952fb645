"""Alert thresholds: a pure evaluation, a state holder that notices raise/clear, a webhook.

``evaluate`` turns readings into one check per configured threshold (an ``Alert`` when it is
over, ``None`` when it is fine), so tests drive it with numbers. ``AlertBook`` remembers what
is raised and since when, and logs only on transitions, never on every poll. ``Webhook`` POSTs
the transitions as JSON in the background with a timeout; a slow or dead receiver can never
block the API or the checks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from fastroute.config import AlertsConfig
from fastroute.logsetup import fields
from fastroute.ops.certificates import CertificateExpiry

log = logging.getLogger("fastroute.alerts")

AlertKey = tuple[str, str]   # (name, destination); destination "" for spool-wide alerts
WEBHOOK_TIMEOUT = 5.0


@dataclass(frozen=True)
class Reading:
    """What the checks need to know about one destination."""

    destination: str
    oldest_age: float | None
    consecutive_failures: int
    commit_overdue: int = 0    # instances whose storage commitment went unanswered twice
    verify_failed: int = 0     # studies verify-failed there now (verify: find)
    quarantined: int = 0       # objects held in its quarantined state now (issue 15)


@dataclass(frozen=True)
class Alert:
    name: str            # oldest_age | consecutive_failures | spool_free | commit_overdue | verify_failed
    #                      | quarantined
    destination: str
    value: float
    threshold: float
    message: str


def evaluate(cfg: AlertsConfig, readings: Iterable[Reading], disk_free: int | None,
             certificates: Iterable[CertificateExpiry] = ()) -> dict[AlertKey, Alert | None]:
    """One entry per configured check: the Alert when over its threshold, else None."""
    checks: dict[AlertKey, Alert | None] = {}
    if cfg.certificate_expiry is not None:
        for c in certificates:
            checks[("certificate_expiry", c.ident)] = _certificate_alert(c, cfg.certificate_expiry / 86400.0)
    for r in readings:
        limit = cfg.oldest_age_limit(r.destination)
        if limit is not None:
            age = r.oldest_age or 0.0
            checks[("oldest_age", r.destination)] = Alert(
                "oldest_age", r.destination, age, limit,
                f"destination={r.destination}: oldest waiting object is {age:.0f}s old "
                f"(threshold {limit:.0f}s); check that the destination is up and not paused") if age > limit else None
        if cfg.consecutive_failures is not None:
            n = r.consecutive_failures
            checks[("consecutive_failures", r.destination)] = Alert(
                "consecutive_failures", r.destination, n, cfg.consecutive_failures,
                f"destination={r.destination}: {n} destination-level failures in a row "
                f"(threshold {cfg.consecutive_failures}); it cannot be reached or refuses associations"
            ) if n >= cfg.consecutive_failures else None
        if r.commit_overdue:    # always checked: the destination was asked twice and never answered
            checks[("commit_overdue", r.destination)] = Alert(
                "commit_overdue", r.destination, r.commit_overdue, 0,
                f"destination={r.destination}: no storage commitment report for {r.commit_overdue} "
                "delivered instance(s) after a request and a re-request; their bytes stay in the "
                "spool; check the destination's storage commitment SCP and how it reaches us")
        if r.verify_failed:     # always checked: re-sent and still not listed by the destination
            checks[("verify_failed", r.destination)] = Alert(
                "verify_failed", r.destination, r.verify_failed, 0,
                f"destination={r.destination}: {r.verify_failed} study(ies) still miss instances at the "
                "destination after re-sending them (verify: find); the study trace lists what is missing")
        if r.quarantined:       # always checked: a person must look at them (they hold spool space)
            checks[("quarantined", r.destination)] = Alert(
                "quarantined", r.destination, r.quarantined, 0,
                f"destination={r.destination}: {r.quarantined} object(s) quarantined by its "
                "de-identification (burned-in annotation), kept and not sent; review them with "
                f"`fastroute queue --quarantined {r.destination}`, then purge --state quarantined")
    if cfg.spool_min_free is not None and disk_free is not None:
        checks[("spool_free", "")] = Alert(
            "spool_free", "", disk_free, cfg.spool_min_free,
            f"the spool's disk has {disk_free / 1024**2:.0f} MiB free (threshold "
            f"{cfg.spool_min_free / 1024**2:.0f} MiB); free space or fix a stuck destination before "
            "the router refuses objects") if disk_free < cfg.spool_min_free else None
    return checks


def _certificate_alert(c: CertificateExpiry, limit_days: float) -> Alert | None:
    """certificate_expiry: under ``limit_days`` left, expired, or unreadable (value -1).
    ``destination`` is the destination's name for its own certificates, else ""."""
    dest = c.name if c.role == "destination" else ""
    where = f"{c.key} {c.path}"
    if c.days_left is None or c.not_after is None:
        return Alert("certificate_expiry", dest, -1.0, limit_days,
                     f"TLS certificate file {where} cannot be read: {c.error}; fix it before the "
                     f"next {c.role} restart or reload")
    if c.days_left >= limit_days:
        return None
    when = f"{c.not_after:%Y-%m-%d %H:%M} UTC"
    left = (f"EXPIRED {-c.days_left:.0f} day(s) ago ({when})" if c.days_left < 0
            else f"expires in {c.days_left:.0f} day(s), on {when}")
    return Alert("certificate_expiry", dest, round(c.days_left, 2), limit_days,
                 f"TLS certificate {c.subject} ({where}, {c.role} {c.name}) {left} "
                 f"(threshold {limit_days:.0f} days); renew it, then reload (SIGHUP)")


@dataclass(frozen=True)
class Transition:
    event: str           # raised | cleared
    alert: Alert
    since: float         # when it was raised
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.event, **asdict(self.alert), "since": self.since, "at": self.at}


class AlertBook:
    """Which alerts are raised, since when; logs and reports only the changes."""

    def __init__(self) -> None:
        self.active: dict[AlertKey, tuple[Alert, float]] = {}
        self.checked: set[AlertKey] = set()

    def update(self, checks: Mapping[AlertKey, Alert | None], now: float | None = None) -> list[Transition]:
        now = time.time() if now is None else now
        out: list[Transition] = []
        for key, alert in checks.items():
            if alert is not None:
                if key in self.active:
                    self.active[key] = (alert, self.active[key][1])   # keep the value current
                else:
                    self.active[key] = (alert, now)
                    out.append(Transition("raised", alert, now, now))
                    log.warning("alert raised: %s", alert.message,
                                extra=fields(destination=alert.destination or None))
        for key in list(self.active):
            if checks.get(key) is None:   # back under its threshold, or no longer checked
                alert, since = self.active.pop(key)
                out.append(Transition("cleared", alert, since, now))
                log.info("alert cleared after %.0fs: %s %s", now - since, alert.name,
                         f"destination={alert.destination}" if alert.destination else "(spool)",
                         extra=fields(destination=alert.destination or None))
        self.checked = set(checks)
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        return [{**asdict(a), "since": since} for a, since in
                sorted(self.active.values(), key=lambda item: (item[0].name, item[0].destination))]


class Webhook:
    """Fire-and-forget JSON POSTs of alert transitions, sent in order by one background task."""

    MAX_BACKLOG = 100

    def __init__(self, url: str, timeout: float = WEBHOOK_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        self._backlog: deque[list[Transition]] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._session: Any = None

    def send(self, transitions: list[Transition]) -> None:
        """Queue a POST and return at once (call on the event loop)."""
        if not transitions:
            return
        if len(self._backlog) >= self.MAX_BACKLOG:
            self._backlog.popleft()
            log.warning("alert webhook %s is not keeping up; dropped the oldest notification", self.url)
        self._backlog.append(transitions)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._backlog:
            await self._post(self._backlog.popleft())

    async def _post(self, transitions: list[Transition]) -> None:
        import aiohttp

        body = {"source": "fastroute", "events": [t.as_dict() for t in transitions]}
        try:
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
            async with self._session.post(self.url, json=body) as resp:
                if resp.status >= 300:
                    log.warning("alert webhook %s answered HTTP %d", self.url, resp.status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # a broken receiver must not break the checks
            log.warning("alert webhook %s failed: %s", self.url, exc or type(exc).__name__)

    async def close(self) -> None:
        """Give queued POSTs a bounded time to go out, then close the session."""
        if self._worker is not None and not self._worker.done():
            done, _ = await asyncio.wait({self._worker}, timeout=self.timeout + 1)
            if not done:
                self._worker.cancel()
                await asyncio.gather(self._worker, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


__all__ = ["Reading", "Alert", "Transition", "AlertBook", "Webhook", "evaluate"]
