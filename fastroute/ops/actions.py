"""Operator views and actions over the spool, shared by the CLI and the REST API.

One implementation per action, so ``fastroute retry`` and ``POST .../retry`` cannot drift apart:
each function takes the configuration, an open Spool and who/why, does the work, audits it and
returns plain data that serialises to JSON as-is. Errors are transport-neutral exceptions
(``NotFound``, ``BadRequest``, ``Conflict``, ``ConfigError``) that the CLI prints and the API maps
to HTTP statuses.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import difflib
import enum
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from fastroute import governance
from fastroute.pids import pid_alive
from fastroute.config import Config, loads
from fastroute.dicom.status import describe
from fastroute.errors import ConfigError, FastrouteError
from fastroute.logsetup import fields
from fastroute.spool import UNROUTED, CounterKind, Counters, QueueEntry, QueueState, RoutingRecord, Spool
from fastroute.spool.audit import whoami
from fastroute.spool.senderstate import DestinationState, SendNowRequest, SenderState, read_state, request_send_now
from fastroute.spool.wakeup import Notifier

log = logging.getLogger("fastroute.ops")

# The states an operator may purge (in flight belongs to a running sender).
STATES = {s.value: s for s in (QueueState.PENDING, QueueState.FAILED, QueueState.UNROUTED,
                               QueueState.QUARANTINED)}
LOOKUP_SCAN_LIMIT = 20000   # queue entries read per destination to find a looked-up object's attempts


class OpsError(FastrouteError):
    """An operator request that cannot be carried out as asked."""


class NotFound(OpsError):
    """The destination, study or object named does not exist."""


class BadRequest(OpsError):
    """The request is incomplete or contradictory (e.g. a purge without a reason)."""


class Conflict(OpsError):
    """The request is valid but the system is not in a state to carry it out."""


class Forbidden(OpsError):
    """The caller may do this kind of thing, but not this one (approving their own proposal)."""


# -- names --------------------------------------------------------------------------------------

def display_name(dest: str) -> str:
    return "unrouted" if dest == UNROUTED else dest


def resolve_destination(cfg: Config, spool: Spool, name: str, *, configured_only: bool = False) -> str:
    """A configured destination, or (unless ``configured_only``) one that still has queue entries.

    Entries of a destination removed from the configuration can still be listed and purged.
    """
    if name in ("unrouted", UNROUTED):
        if configured_only:
            raise BadRequest("'unrouted' is not a destination that can be paused or resumed")
        return UNROUTED
    if name in cfg.destinations or (not configured_only and name in spool.destinations()):
        return name
    known = ", ".join(sorted(cfg.destinations)) or "none configured"
    raise NotFound(f"unknown destination {name!r} (configured: {known})",
                   hint="check the name, or the 'destinations:' section of the configuration")


# -- queue and destination status ---------------------------------------------------------------

_alive = pid_alive


class DestinationStatus(enum.StrEnum):
    """The one word the dashboard and ``/metrics`` show for a destination."""

    IDLE = "idle"
    UP = "up"
    BACKING_OFF = "backing_off"
    PAUSED = "paused"
    STOPPED = "stopped"
    UNKNOWN = "unknown"             # no state file (the sender has not started)
    UNCONFIGURED = "unconfigured"   # queue entries left for a destination no longer configured
    UNROUTED = "unrouted"


def _status_word(cfg: Config, dest: str, paused: bool, st: DestinationState | None) -> DestinationStatus:
    if dest == UNROUTED:
        return DestinationStatus.UNROUTED
    if dest not in cfg.destinations:
        return DestinationStatus.UNCONFIGURED
    if paused:
        return DestinationStatus.PAUSED   # shown at once, before the sender notices and republishes
    if st is None:
        return DestinationStatus.UNKNOWN
    if st.state == SenderState.PAUSED:   # resumed; the sender republishes on its next round
        return DestinationStatus.IDLE
    if st.state != SenderState.STOPPED and not _alive(st.pid):
        return DestinationStatus.STOPPED
    return DestinationStatus(st.state.value)


def destination_status(cfg: Config, spool: Spool, now: float | None = None) -> list[dict[str, Any]]:
    """Per destination: queue depth and age, totals, and the sender's published state."""
    now = time.time() if now is None else now
    out = []
    for s in spool.stats(cfg.destinations, now=now):
        configured = s.destination in cfg.destinations
        st = read_state(cfg.spool, s.destination) if configured else None
        paused = configured and (cfg.destinations[s.destination].paused or spool.is_paused(s.destination))
        d = dataclasses.asdict(s)
        d.update({
            "name": display_name(s.destination), "configured": configured, "paused": paused,
            "status": _status_word(cfg, s.destination, paused, st),
            "down_since": st.down_since if st else None, "retry_at": st.retry_at if st else None,
            "consecutive_failures": st.consecutive_failures if st else 0,
            "last_error": st.last_error if st else "",
            "last_success": st.last_success if st else None,
            "state": dataclasses.asdict(st) if st else None,
        })
        if configured:
            dc = cfg.destinations[s.destination]
            d["peer"] = {"ae_title": dc.ae_title, "host": dc.host, "port": dc.port,
                         "max_associations": dc.max_associations}
        out.append(d)
    return out


def totals(counters: Counters) -> dict[str, int]:
    return {"received": counters.of(CounterKind.RECEIVED), "received_bytes": counters.of(CounterKind.RECEIVED_BYTES),
            "delivered": counters.total(CounterKind.DELIVERED),
            "delivered_bytes": counters.total(CounterKind.DELIVERED_BYTES),
            "failed": counters.total(CounterKind.FAILED), "retries": counters.total(CounterKind.RETRIES),
            "purged": counters.total(CounterKind.PURGED)}


def status(cfg: Config, spool: Spool, now: float | None = None) -> dict[str, Any]:
    """Everything the dashboard's top half shows, in one read."""
    now = time.time() if now is None else now
    counters = spool.counters()
    return {
        "now": now,
        "listener": {"ae_title": cfg.ae_title, "host": cfg.host, "port": cfg.port,
                     "processes": cfg.listeners, "max_associations": cfg.max_associations},
        "destinations": destination_status(cfg, spool, now),
        "usage": spool.usage(),
        "min_free_bytes": cfg.min_free_bytes,
        "totals": totals(counters),
        "received_from": {k.extra: v for k, v in counters.items_of(CounterKind.RECEIVED_FROM)},
    }


def reason(error: str, status: int | None) -> str:
    """A failure's text, never ending in an empty reason: entries written before the sender
    said what the last failure was read "gave up after 3 attempts: " -- name the status."""
    if error.rstrip().endswith(":"):
        return f"{error.rstrip()} {describe(status)}"
    return error


def _entry_view(e: QueueEntry) -> dict[str, Any]:
    r = e.record
    return {
        "destination": display_name(e.destination), "state": str(e.state), "oid": e.oid,
        "attempts": e.attempts, "next_at": e.next_at or None, "status": e.last_status,
        "status_text": describe(e.last_status) if e.last_status is not None else "",
        "error": reason(e.error, e.last_status),
        "sop_instance_uid": r.sop_instance_uid if r else "",
        "study_instance_uid": r.study_instance_uid if r else "",
        "patient_id": r.patient_id if r else "", "accession_number": r.accession_number if r else "",
        "modality": r.modality if r else "", "calling_ae": r.calling_ae if r else "",
        "received_at": r.received_at if r else None,
    }


def entries(cfg: Config, spool: Spool, destination: str, state: str, limit: int = 100) -> list[dict[str, Any]]:
    dest = resolve_destination(cfg, spool, destination)
    if state not in QueueState.__members__.values():
        raise BadRequest(f"unknown state {state!r} (one of: {', '.join(sorted(QueueState))})")
    return [_entry_view(e) for e in spool.entries(dest, QueueState(state), limit)]


def failures(cfg: Config, spool: Spool, destination: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The most recent failed objects, newest first, with the DICOM status and its meaning.

    A failed entry's ``next_at`` is the time it failed. The spool lists entries in arrival
    order only, so up to 1000 per destination are read and sorted here.
    """
    dests = ([resolve_destination(cfg, spool, destination)] if destination else
             sorted((set(cfg.destinations) | set(spool.destinations())) - {UNROUTED}))
    out = []
    for d in dests:
        for e in spool.entries(d, QueueState.FAILED, max(limit, 1000)):
            view = _entry_view(e)
            view["failed_at"] = e.next_at
            out.append(view)
    out.sort(key=lambda v: v["failed_at"], reverse=True)
    return out[:limit]


# -- study / object lookup ----------------------------------------------------------------------

def _queue_entries(spool: Spool, wanted: dict[str, set[int]]) -> dict[tuple[str, int], QueueEntry]:
    """Queue entries (attempts, last status) of the objects looked up, per destination."""
    found: dict[tuple[str, int], QueueEntry] = {}
    for dest, oids in wanted.items():
        for oid in oids:
            e = spool.entry(dest, oid)
            if e is not None:
                found[(dest, oid)] = e
    return found


class StepState(enum.StrEnum):
    """Where an object stands at one destination, in a lookup's path."""

    DELIVERED = "delivered"
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    FAILED = "failed"
    UNROUTED = "unrouted"
    QUEUED = "queued"           # outstanding, but its queue entry moved while we read
    SUPERSEDED = "superseded"
    PURGED = "purged"
    SUPPRESSED = "suppressed"   # identical bytes already delivered there
    UNKNOWN = "unknown"


def _path(oid: int, rec: RoutingRecord, queue: dict[tuple[str, int], QueueEntry]) -> list[dict[str, Any]]:
    """Where one object went: one step per destination it was routed to or dropped from."""
    names = list(dict.fromkeys([*rec.routed_to, *rec.outstanding, *rec.delivered, *rec.failed, *rec.dropped]))
    steps = []
    for dest in names:
        step: dict[str, Any] = {"destination": display_name(dest), "attempts": None, "at": None,
                                "status": None, "error": ""}
        if dest in rec.delivered:
            dl = rec.delivered[dest]
            step.update(state=StepState.DELIVERED, at=dl.at, status=dl.status)
            if dl.syntax:
                step["syntax"] = dl.syntax
        elif dest in rec.outstanding:
            e = queue.get((dest, oid))
            step["state"] = (StepState.UNROUTED if dest == UNROUTED else
                             StepState.QUEUED if e is None else
                             StepState.PENDING if e.state == QueueState.BULK else   # a migration's
                             StepState(e.state.value))
            if e is not None:
                step.update(attempts=e.attempts, status=e.last_status, error=reason(e.error, e.last_status),
                            next_at=e.next_at or None)
        elif dest in rec.dropped:
            dr = rec.dropped[dest]
            step.update(state=StepState(dr.how.value), at=dr.at, error=dr.reason)
            if dr.by:
                step["by_oid"] = dr.by
        elif dest in rec.suppressed:
            step["state"] = StepState.SUPPRESSED
            step["error"] = "not forwarded: identical bytes already delivered within duplicate_window"
            earlier = rec.duplicate_of.get(dest)
            if earlier is not None:   # the delivery it matched, to follow in the trace
                step["duplicate_of"] = {"oid": earlier.oid, "delivered_at": earlier.delivered_at}
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(earlier.delivered_at))
                step["error"] = ("not forwarded: identical bytes already delivered at "
                                 f"{when}" + (f" (oid {earlier.oid})" if earlier.oid is not None
                                              else "") + " within duplicate_window")
        else:
            step["state"] = StepState.UNKNOWN
        if dest in rec.failed:
            f = rec.failed[dest]
            step["last_failure"] = {"at": f.at, "status": f.status, "error": reason(f.error, f.status),
                                    "status_text": describe(f.status) if f.status is not None else ""}
            if step["state"] == StepState.FAILED:
                step.update(at=f.at, status=f.status if step["status"] is None else step["status"],
                            error=step["error"] or f.error)
        step["status_text"] = describe(step["status"]) if step["status"] is not None else ""
        steps.append(step)
    return steps


def lookup(cfg: Config, spool: Spool, *, study_instance_uid: str = "", accession_number: str = "",
           patient_id: str = "", limit: int = 2000) -> dict[str, Any]:
    """Every object of a study (or accession, or patient) with its path through the router."""
    query = {"study_instance_uid": study_instance_uid.strip(), "accession_number": accession_number.strip(),
             "patient_id": patient_id.strip()}
    if sum(1 for v in query.values() if v) != 1:
        raise BadRequest("give exactly one of study_instance_uid, accession_number, patient_id")
    found = spool.lookup(**query, limit=limit + 1)
    truncated = len(found) > limit
    found = found[:limit]
    wanted: dict[str, set[int]] = {}
    for oid, rec in found:
        for dest in rec.outstanding:
            wanted.setdefault(dest, set()).add(oid)
    queue = _queue_entries(spool, wanted)
    objects = [object_view(oid, rec, queue) for oid, rec in found]
    for o in objects:      # storage commitment and verify: find (issue 14): beside the delivery
        commits = spool.commitments.states(o["oid"])
        verifications = spool.verifications.states(o["oid"])
        for step in o["path"]:
            c = commits.get(step["destination"])
            if c is not None:
                step["commitment"] = {"state": c.state.value, "at": c.at, "transaction_uid": c.transaction_uid,
                                      **({"reason": c.reason} if c.reason is not None else {})}
            v = verifications.get(step["destination"])
            if v is not None:
                step["verification"] = v.value      # waiting | verified | verify-failed
    objects.sort(key=lambda o: (o["study_instance_uid"], o["received_at"] or 0, o["oid"]))
    return {"query": {k: v for k, v in query.items() if v}, "count": len(objects),
            "truncated": truncated, "objects": objects}


def object_view(oid: int, rec: RoutingRecord, queue: dict[tuple[str, int], QueueEntry]) -> dict[str, Any]:
    return {
        "oid": oid,
        "sop_instance_uid": rec.sop_instance_uid, "sop_class_uid": rec.sop_class_uid,
        "study_instance_uid": rec.study_instance_uid, "series_instance_uid": rec.series_instance_uid,
        "patient_id": rec.patient_id,
        "accession_number": rec.accession_number, "modality": rec.modality,
        "transfer_syntax": rec.transfer_syntax,
        "size": rec.size, "received_at": rec.received_at,
        "received_from": {"calling_ae": rec.calling_ae, "called_ae": rec.called_ae, "peer": rec.peer},
        "rules": rec.rules,
        "routed_to": [display_name(d) for d in rec.routed_to],
        "path": _path(oid, rec, queue),
    }


_ROLLUP_BUCKET = {StepState.DELIVERED: "delivered", StepState.FAILED: "failed", StepState.SUPERSEDED: "dropped",
                  StepState.PURGED: "dropped", StepState.SUPPRESSED: "dropped"}   # anything else: waiting


def _count(counts: dict[str, dict[str, Any]], dest: str, state: str, committed: bool = False,
           verification: str | None = None) -> None:
    c = counts.setdefault(dest, {"destination": dest, "routed": 0, "delivered": 0, "committed": 0, "verified": 0,
                                 "verify_failed": 0, "waiting": 0, "failed": 0, "dropped": 0})
    c["routed"] += 1
    c[_ROLLUP_BUCKET.get(StepState(state), "waiting")] += 1
    if committed:      # of the delivered ones: those the destination committed (storage commitment)
        c["committed"] += 1
    if verification == "verified":         # ... and those its C-FIND listed (verify: find)
        c["verified"] += 1
    elif verification == "verify-failed":  # ... still missing there after the re-sends
        c["verify_failed"] += 1


def study_rollup(objects: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lookup objects rolled up per study, then per series and per destination: how many were
    received, delivered, are waiting, failed or were dropped. What an operator reads first (a
    50-image study as one box per instance was 8,000 px tall); each series keeps its oids so the
    instances stay reachable."""
    studies: dict[str, dict[str, Any]] = {}
    for o in objects:
        st = studies.setdefault(o["study_instance_uid"], {
            "study_instance_uid": o["study_instance_uid"], "patient_id": o["patient_id"],
            "accession_number": o["accession_number"], "received": 0, "first_received_at": None,
            "last_received_at": None, "destinations": {}, "series": {}})
        st["received"] += 1
        at = o["received_at"]
        if at is not None:
            st["first_received_at"] = min(at, st["first_received_at"] or at)
            st["last_received_at"] = max(at, st["last_received_at"] or at)
        se = st["series"].setdefault(o["series_instance_uid"], {
            "series_instance_uid": o["series_instance_uid"], "modality": o["modality"], "received": 0,
            "oids": [], "destinations": {}})
        se["received"] += 1
        se["oids"].append(o["oid"])
        for step in o["path"]:
            committed = (step.get("commitment") or {}).get("state") == "committed"
            verification = step.get("verification")
            _count(st["destinations"], step["destination"], step["state"], committed, verification)
            _count(se["destinations"], step["destination"], step["state"], committed, verification)
    out = []
    for st in studies.values():
        for se in st["series"].values():
            se["destinations"] = list(se["destinations"].values())
        st["series"] = list(st["series"].values())
        st["destinations"] = list(st["destinations"].values())
        out.append(st)
    return out


def get_object(spool: Spool, oid: int) -> dict[str, Any]:
    rec = spool.record(oid)
    if rec is None:
        raise NotFound(f"no object with oid {oid} (pruned, or never received)")
    wanted = {d: {oid} for d in rec.outstanding}
    return object_view(oid, rec, _queue_entries(spool, wanted))


# -- actions ------------------------------------------------------------------------------------

def _notify(cfg: Config, dests: Iterable[str]) -> None:
    notifier = Notifier(cfg.spool)
    try:
        for d in dests:
            notifier.notify(d)
    finally:
        notifier.close()


def retry(cfg: Config, spool: Spool, *, destination: str = "", study_instance_uid: str = "",
          oids: Sequence[int] | None = None, who: str | None = None, why: str = "") -> dict[str, Any]:
    """Queue failed objects again, per destination and/or per study, with fresh attempt counts."""
    if not destination and not study_instance_uid:
        raise BadRequest("name a destination or a study to retry")
    dest = resolve_destination(cfg, spool, destination) if destination else ""
    per_dest: dict[str, set[int] | None] = {}
    if study_instance_uid:
        found = spool.lookup(study_instance_uid=study_instance_uid)
        if not found:
            raise NotFound(f"no object of study {study_instance_uid} in the spool")
        by_dest: dict[str, set[int]] = {}
        for oid, rec in found:
            if oids and oid not in oids:
                continue
            for d in rec.outstanding:
                if d in rec.failed and (not dest or d == dest):
                    by_dest.setdefault(d, set()).add(oid)
        per_dest.update(by_dest)
        if oids:
            _require_failed(spool, oids, {oid for ids in by_dest.values() for oid in ids},
                            display_name(dest) if dest else "any destination",
                            study=(study_instance_uid, {oid for oid, _ in found}))
    else:
        if oids:
            _require_failed(spool, oids, {oid for oid in oids if (e := spool.entry(dest, oid)) is not None
                                          and e.state == QueueState.FAILED}, display_name(dest))
        per_dest[dest] = set(oids) if oids else None
    counts = {display_name(d): spool.retry_failed(d, wanted) for d, wanted in per_dest.items()}
    total = sum(counts.values())
    spool.audit_record("retry", who=who, why=why, destination=display_name(dest) if dest else "",
                 study_instance_uid=study_instance_uid, oids=list(oids) if oids else "all-failed",
                 counts=counts, count=total)
    log.info("retry by %s: %d failed object(s) queued again (%s)%s", who or whoami(), total,
             ", ".join(f"{d}={n}" for d, n in counts.items()) or "none",
             f" study_instance_uid={study_instance_uid}" if study_instance_uid else "",
             extra=fields(destination=display_name(dest) if dest else None, study_uid=study_instance_uid or None))
    _notify(cfg, [d for d, n in zip(per_dest, counts.values()) if n])
    return {"retried": counts, "count": total}


def _require_failed(spool: Spool, oids: Sequence[int], failed: set[int], where: str,
                    study: tuple[str, set[int]] | None = None) -> None:
    """Refuse a retry naming objects that are not failed there (before changing anything):
    "0 queued" for a mistyped oid would read as success."""
    wrong = []
    for oid in dict.fromkeys(oids):
        if oid in failed:
            continue
        rec = spool.record(oid)
        if rec is None:
            wrong.append(f"oid {oid} does not exist (pruned, or never received)")
        elif study is not None and oid not in study[1]:
            wrong.append(f"oid {oid} is not an object of study {study[0]}")
        else:
            states = [f"{display_name(d)}: {_state_of(spool, d, oid, rec)}" for d in rec.routed_to] or ["routed nowhere"]
            wrong.append(f"oid {oid} is not failed at {where} ({'; '.join(states)})")
    if wrong:
        raise NotFound("nothing retried: " + "; ".join(wrong),
                       hint="`fastroute queue --failed DEST` lists the failed objects and their oids")


def _state_of(spool: Spool, dest: str, oid: int, rec: RoutingRecord) -> str:
    if dest in rec.delivered:
        return "delivered"
    if dest in rec.dropped:
        return str(rec.dropped[dest].how.value)
    e = spool.entry(dest, oid)
    return str(e.state.value) if e is not None else "not queued"


def purge(cfg: Config, spool: Spool, *, destination: str, states: Sequence[str], reason: str,
          oids: Sequence[int] | None = None, study_instance_uid: str = "",
          who: str | None = None) -> dict[str, Any]:
    """Remove queue entries for good; explicit states and a reason are required (audited)."""
    if not reason or not reason.strip():
        raise BadRequest("a purge needs a reason (it is recorded in the audit trail)")
    if not states:
        raise BadRequest(f"name the states to purge explicitly (any of: {', '.join(sorted(STATES))})")
    bad = [s for s in states if s not in STATES]
    if bad:
        raise BadRequest(f"unknown state(s) {', '.join(map(repr, bad))} (any of: {', '.join(sorted(STATES))})")
    dest = resolve_destination(cfg, spool, destination)
    wanted: set[int] | None = set(oids) if oids else None
    if study_instance_uid:
        study_oids = {oid for oid, _ in spool.lookup(study_instance_uid=study_instance_uid)}
        if not study_oids:
            raise NotFound(f"no object of study {study_instance_uid} in the spool")
        wanted = study_oids if wanted is None else wanted & study_oids
    removed = spool.purge(dest, [STATES[s] for s in states], wanted, reason=reason) if wanted != set() else []
    spool.audit_record("purge", who=who, why=reason, destination=display_name(dest), states=list(states),
                 study_instance_uid=study_instance_uid, oids=removed, count=len(removed))
    log.warning("purge by %s: %d object reference(s) removed from %s (%s): %s", who or whoami(),
                len(removed), display_name(dest), ", ".join(states), reason,
                extra=fields(destination=display_name(dest), study_uid=study_instance_uid or None))
    return {"destination": display_name(dest), "states": list(states), "purged": removed, "count": len(removed)}


def set_paused(cfg: Config, spool: Spool, destination: str, paused: bool, *,
               who: str | None = None, why: str = "") -> dict[str, Any]:
    """Pause or resume a destination's sending at runtime (its queue keeps filling)."""
    dest = resolve_destination(cfg, spool, destination, configured_only=True)
    spool.set_paused(dest, paused)
    spool.audit_record("pause" if paused else "resume", who=who, why=why, destination=dest)
    log.info("destination=%s %s by %s%s", dest, "paused" if paused else "resumed",
             who or whoami(), f": {why}" if why else "", extra=fields(destination=dest))
    result: dict[str, Any] = {"destination": dest, "paused": paused}
    if not paused:
        # A resume means "send": the sender tries at once instead of waiting out its backoff.
        request_send_now(cfg.spool, dest, SendNowRequest(time.time(), "resume", who or whoami(), why))
        if cfg.destinations[dest].paused:
            result["paused"] = True
            result["note"] = "still paused by the configuration (paused: true); change it there"
    _notify(cfg, [dest])   # either way the sender acts (and shows it) now, not at its next round
    return result


def send_now(cfg: Config, spool: Spool, destination: str = "", *, all_destinations: bool = False,
             who: str | None = None, why: str = "") -> dict[str, Any]:
    """End a destination's backoff now: its pending objects waiting out their own retry
    delay become due, its sender forgets its failure streak and is woken (audited).

    For the PACS that came back: without this the queue waits for its next retry, minutes.
    """
    if all_destinations == bool(destination):
        raise BadRequest("name one destination, or all of them (--all), to send now")
    dests = (sorted(cfg.destinations) if all_destinations
             else [resolve_destination(cfg, spool, destination, configured_only=True)])
    now = time.time()
    out = []
    for dest in dests:
        st = read_state(cfg.spool, dest)
        made_due = spool.make_due(dest, now)
        told = request_send_now(cfg.spool, dest, SendNowRequest(now, "send-now", who or whoami(), why))
        paused = cfg.destinations[dest].paused or spool.is_paused(dest)
        item: dict[str, Any] = {
            "destination": dest, "made_due": made_due, "paused": paused,
            "was": str(st.state) if st else "unknown",
            "consecutive_failures": st.consecutive_failures if st else 0}
        if paused:
            item["note"] = "paused: nothing is sent until it is resumed"
        elif not told or st is None or not _alive(st.pid):
            item["note"] = "no sender is running for it: sending starts when the router runs"
        out.append(item)
        spool.audit_record("send_now", who=who, why=why, destination=dest, count=made_due,
                           was=item["was"], consecutive_failures=item["consecutive_failures"])
        log.warning("send-now by %s: destination=%s backoff reset (was %s, %d failure(s) in a row), "
                    "%d object(s) waiting out a retry delay due now%s", who or whoami(), dest, item["was"],
                    item["consecutive_failures"], made_due, f": {why}" if why else "")
    _notify(cfg, dests)
    return {"destinations": out, "made_due": sum(d["made_due"] for d in out)}


def echo_succeeded(cfg: Config, destination: str, *, who: str | None = None) -> bool:
    """A successful ``fastroute echo`` shows the destination is back: its sender (another
    process) ends its backoff. Not audited: it changes no queue, only when the next try is."""
    told = request_send_now(cfg.spool, destination, SendNowRequest(time.time(), "echo", who or whoami()))
    if told:
        _notify(cfg, [destination])
    return told


# -- configuration ------------------------------------------------------------------------------

def config_error_view(exc: ConfigError) -> dict[str, Any]:
    return {"message": str(exc), "source": exc.source, "line": exc.line, "key": exc.key, "hint": exc.hint}


def parse_config(text: str, source: str) -> Config:
    """``loads`` plus what ``load`` does for a file: a relative spool is relative to it."""
    cfg = loads(text, source)
    from fastroute.routing.rules import RuleSet
    RuleSet.from_config(cfg)
    if source and not source.startswith("<") and not cfg.spool.is_absolute():
        cfg = dataclasses.replace(cfg, spool=Path(source).parent / cfg.spool)
    return cfg


def validate_config(text: str, source: str = "<posted>") -> dict[str, Any]:
    """Validate without applying: either a summary or the precise errors (line and key)."""
    try:
        cfg = parse_config(text, source)
    except ConfigError as exc:
        return {"valid": False, "errors": [config_error_view(e) for e in getattr(exc, "errors", None) or (exc,)]}
    return {"valid": True, "errors": [],
            "summary": {"destinations": sorted(cfg.destinations), "rules": [r.name for r in cfg.rules],
                        "default": list(cfg.default)}}


def supervisor_pid(cfg: Config) -> int | None:
    try:
        pid = int((cfg.spool / "run" / "supervisor.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o644
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def config_text(path: Path, text: str | None) -> str:
    """The posted text, or the file's: what a reload or a proposal is about."""
    if text is not None:
        return text
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror}", source=str(path)) from None


def reload_config(cfg: Config, spool: Spool, config_path: str | None, *, text: str | None = None,
                  applied_text: str = "", who: str | None = None, why: str = "") -> dict[str, Any]:
    """Validate, (write,) audit with a diff, then SIGHUP the supervisor.

    Validation comes first, so a bad configuration never reaches the file or the supervisor and
    the running one keeps running; posted text replaces the file atomically (same directory,
    fsync, rename).
    """
    if not config_path:
        raise Conflict("fastroute runs on the embedded default configuration; there is no file to reload",
                       hint="start it with `fastroute serve -c FILE`")
    path = Path(config_path)
    new_text = config_text(path, text)
    new = parse_config(new_text, str(path))
    if new.spool.resolve() != cfg.spool.resolve():
        raise ConfigError(f"the spool path cannot change while running ({cfg.spool} -> {new.spool})",
                          source=str(path), key="spool", hint="stop fastroute to move the spool")
    gd = governance.compare(cfg, new, path.parent)
    if gd.needs_approval:     # the caller should have proposed it (fastroute.ops.proposals.reload)
        raise Conflict(f"governance is two_person and this change touches {', '.join(gd.changes)}: "
                       "it must be proposed and approved by a second admin; nothing was changed",
                       hint="POST /api/config/reload proposes it; or `fastroute config propose`")
    pid = supervisor_pid(cfg)
    if pid is None:
        raise Conflict(f"no running supervisor (no live pid in {cfg.spool / 'run' / 'supervisor.pid'}); "
                       "nothing was changed", hint="start fastroute with `fastroute serve -c FILE`")
    diff = "".join(difflib.unified_diff(applied_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                                        fromfile=f"{path} (running)", tofile=f"{path} (new)"))
    if text is not None:
        _write_atomically(path, new_text)
    # governed_changes: which destinations/rules' modify/governance this changes (issue 15)
    spool.audit_record("config_change", who=who, why=why, path=str(path), diff=diff,
                       source="posted" if text is not None else "file", governed_changes=list(gd.changes))
    os.kill(pid, signal.SIGHUP)
    log.warning("configuration reload requested by %s (%s): supervisor pid %d signalled%s",
                who or whoami(), path, pid, f": {why}" if why else "")
    return {"applied": True, "supervisor_pid": pid, "changed": bool(diff), "diff": diff,
            "governed_changes": list(gd.changes)}


def read_config_text(config_path: str | None) -> str:
    """The text the running configuration came from (the diff base for reloads)."""
    if not config_path:
        from fastroute.config import EMBEDDED_DEFAULT_YAML
        return EMBEDDED_DEFAULT_YAML
    try:
        return Path(config_path).read_text(encoding="utf-8")
    except OSError:
        return ""


# -- audit trail --------------------------------------------------------------------------------

def parse_time(text: str, *, end: bool = False) -> float:
    """An ISO date or datetime as a POSIX time; without a zone it is UTC.

    A bare date used as an end (``--until 2024-05-31``) means the end of that day.
    """
    text = text.strip()
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)
            return (start + dt.timedelta(days=1)).timestamp() - 1e-6 if end else start.timestamp()
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"expected an ISO date or datetime such as 2024-05-31 or 2024-05-31T14:00:00Z, "
                         f"got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def iso(t: float | None) -> str:
    if t is None:
        return ""
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


AUDIT_CSV_COLUMNS = ("seq", "time", "action", "who", "why", "destination", "study_instance_uid",
                     "sop_instance_uid", "calling_ae", "status", "error", "count", "details", "prev", "hash")


def audit_events(spool: Spool, *, since: float = 0.0, until: float = float("inf"),
                 study_instance_uid: str = "", limit: int | None = None) -> list[dict[str, Any]]:
    out = []
    for ev in spool.audit_events(since, until, study_instance_uid):
        out.append(ev)
        if limit is not None and len(out) >= limit:
            break
    return out


def audit_export(spool: Spool, out: TextIO, *, fmt: str = "jsonl", since: float = 0.0,
                 until: float = float("inf"), study_instance_uid: str = "") -> int:
    """Write the trail as JSON lines (lossless) or CSV (for spreadsheets); returns the count."""
    if fmt not in ("jsonl", "csv"):
        raise BadRequest(f"unknown format {fmt!r} (jsonl or csv)")
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(AUDIT_CSV_COLUMNS)
    n = 0
    for ev in spool.audit_events(since, until, study_instance_uid):
        n += 1
        if writer is None:
            out.write(json.dumps(ev, ensure_ascii=False) + "\n")
            continue
        named = set(AUDIT_CSV_COLUMNS)
        row = [iso(ev.get("time")) if col == "time" else ev.get(col, "") for col in AUDIT_CSV_COLUMNS]
        extra = {k: v for k, v in ev.items() if k not in named}
        row[AUDIT_CSV_COLUMNS.index("details")] = json.dumps(extra, ensure_ascii=False, sort_keys=True) if extra else ""
        writer.writerow(["" if v is None else v for v in row])
    return n


def apply_retention(cfg: Config, spool: Spool, now: float | None = None) -> dict[str, int]:
    """Prune audit events (and, where the spool supports it, delivered history) past retention.

    Run periodically by the HTTP process. Pruning is itself audited, so the trail says where
    it starts and why.
    """
    now = time.time() if now is None else now
    done = {"audit_pruned": 0, "history_pruned": 0}
    if cfg.audit_retention:
        done["audit_pruned"] = spool.audit_prune(now - cfg.audit_retention)
    if cfg.history_retention:
        done["history_pruned"] = spool.prune_history(now - cfg.history_retention)
    if any(done.values()):
        spool.audit_record("retention", who="fastroute", why="retention policy",
                     audit_retention=cfg.audit_retention, history_retention=cfg.history_retention, **done)
        log.info("retention: pruned %d audit event(s) and %d delivered record(s)",
                 done["audit_pruned"], done["history_pruned"])
    return done


# -- throughput history -------------------------------------------------------------------------

class ThroughputHistory:
    """Recent samples of cumulative counters; rates come from differences between samples.

    The counters live in the spool, so any process can sample them and a restart of a sender
    does not reset anything. Sampled on a worker thread and read on the event loop: locked.
    """

    def __init__(self, keep: float = 600.0) -> None:
        self.keep = keep
        self.samples: deque[tuple[float, dict[str, int]]] = deque()   # destination ("": received) -> count
        self._lock = threading.Lock()

    def add(self, now: float, counters: Counters) -> None:
        wanted = {"": counters.of(CounterKind.RECEIVED), **counters.per_destination(CounterKind.DELIVERED)}
        with self._lock:
            if self.samples and now <= self.samples[-1][0]:
                return
            self.samples.append((now, wanted))
            while self.samples and self.samples[0][0] < now - self.keep:
                self.samples.popleft()

    def series(self) -> dict[str, Any]:
        """Objects per second between consecutive samples: ``t`` (end times), received, per destination."""
        with self._lock:
            pts = list(self.samples)
        dests = sorted({d for _, c in pts for d in c if d})
        out: dict[str, Any] = {"t": [], "received": [], "delivered": {display_name(d): [] for d in dests}}
        for (t0, c0), (t1, c1) in zip(pts, pts[1:]):
            span = t1 - t0
            out["t"].append(t1)
            out["received"].append(max(0.0, (c1.get("", 0) - c0.get("", 0)) / span))
            for d in dests:
                out["delivered"][display_name(d)].append(max(0.0, (c1.get(d, 0) - c0.get(d, 0)) / span))
        return out


__all__ = [
    "OpsError", "NotFound", "BadRequest", "Conflict", "STATES", "DestinationStatus", "StepState", "resolve_destination",
    "destination_status", "status", "entries", "failures", "lookup", "study_rollup", "get_object", "retry",
    "purge", "set_paused", "send_now", "echo_succeeded", "validate_config", "reload_config", "parse_config",
    "audit_export", "audit_events",
    "apply_retention", "parse_time", "ThroughputHistory",
]
