"""What each destination would get (issue 15, "visible before it runs"), for ``route-test --diff``
and ``GET /api/objects/{oid}/diff``: per destination, the attributes its content plan changes,
old and new, or that it goes unchanged, is quarantined, or fails. Runs the same plan the sender
runs (``fastroute.content.plan.preview``) and writes nothing.

The values are shown (de-identified ones included): a preview is for the operator looking at
one object they may already read; the audit trail of real sends keeps tags only.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from fastroute.config import Config
from fastroute.content.changes import Applied, Change
from fastroute.content.plan import preview
from fastroute.errors import FastrouteError
from fastroute.ops.actions import NotFound
from fastroute.spool import Spool


def change_view(c: Change) -> dict[str, Any]:
    return {"path": c.path, "keyword": c.keyword, "action": c.action, "old": c.old, "new": c.new, "by": c.by}


def _one(cfg: Config, data: bytes, transfer_syntax: str, rules: Sequence[str], context: Mapping[str, str],
         name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"destination": name, "result": "unchanged", "by": [], "changes": [],
                           "sop_instance_uid": "", "quarantine": "", "error": ""}
    try:
        applied: Applied | None = preview(cfg, data, transfer_syntax, rules, context, [name])[name]
    except (ValueError, FastrouteError) as exc:   # ModifyError (a lookup on_missing: fail), bad bytes, no key
        out.update(result="fails", error=str(exc))
        return out
    if applied is None:
        return out
    out.update(by=list(applied.by), changes=[change_view(c) for c in applied.changes],
               sop_instance_uid=applied.sop_instance_uid)
    if applied.quarantine:
        out.update(result="quarantined", quarantine=applied.quarantine)
    else:
        out["result"] = "changed"
    return out


def preview_destinations(cfg: Config, data: bytes, transfer_syntax: str, rules: Sequence[str],
                         context: Mapping[str, str], destinations: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per destination, in the order given (an error at one does not hide the others)."""
    return [_one(cfg, data, transfer_syntax, rules, context, name) for name in destinations]


def object_diff(cfg: Config, spool: Spool, oid: int, destination: str = "") -> dict[str, Any]:
    """A stored object's preview: for ``destination``, or for every configured destination it
    was routed to. Its rules and association come from its routing record."""
    rec = spool.record(oid)
    if rec is None:
        raise NotFound(f"no object {oid} in the spool")
    if destination:
        if destination not in cfg.destinations:
            known = ", ".join(sorted(cfg.destinations)) or "none configured"
            raise NotFound(f"unknown destination {destination!r} (configured: {known})")
        names = [destination]
    else:
        names = [d for d in rec.routed_to if d in cfg.destinations]
    try:
        data = spool.read(oid)
    except (KeyError, FastrouteError):
        raise NotFound(f"object {oid}'s bytes are no longer in the spool") from None
    context = {"calling_ae": rec.calling_ae, "called_ae": rec.called_ae, "peer_ip": rec.peer}
    return {"oid": oid, "sop_instance_uid": rec.sop_instance_uid, "transfer_syntax": rec.transfer_syntax,
            "rules": list(rec.rules),
            "destinations": preview_destinations(cfg, data, rec.transfer_syntax, rec.rules, context, names)}


def _value(v: str | None, absent: str) -> str:
    return absent if v is None else repr(v)


def render(entries: Sequence[Mapping[str, Any]], indent: str = "  ") -> list[str]:
    """The text ``route-test --diff`` prints: per destination, old -> new per attribute."""
    lines: list[str] = []
    for e in entries:
        head = f"{indent}{e['destination']}: "
        if e["result"] == "unchanged":
            lines.append(head + "unchanged (sent as received)")
            continue
        if e["result"] == "fails":
            lines.append(head + f"fails, not sent: {e['error']}")
            continue
        if e["result"] == "quarantined":
            lines.append(head + f"quarantined: {e['quarantine']} (by {', '.join(e['by'])})")
            continue
        paths = dict.fromkeys(c["path"] for c in e["changes"])
        lines.append(head + f"{len(paths)} attribute(s) changed by {', '.join(e['by'])}")
        for c in e["changes"]:
            name = f"{c['path']} {c['keyword']}".rstrip()
            lines.append(f"{indent}  {name}: {_value(c['old'], '(absent)')} -> {_value(c['new'], '(removed)')}"
                         f"  [{c['action']}, {c['by']}]")
    return lines
