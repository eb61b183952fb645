"""Which parts of a configuration are governed, and what a new one changes in them (issue 15).

Governed: ``destinations`` (any change: a new destination is a new place patient data goes, and
a destination's ``modify``/``deidentify`` change what it gets), every rule's ``modify``, and
``governance`` itself. With ``governance: two_person`` a change to these takes effect only
after a second admin approves it (``fastroute.ops.proposals``); with ``off`` it is applied and
its audit event names the governed sections it changed. Everything else (log_level, timeouts,
rules' matching) applies on reload as before.

I/O-free: the same functions run in the HTTP process (is this reload a proposal?) and in the
supervisor (is this SIGHUP'd file approved?), over configurations parsed either way, so paths
are made absolute against the configuration's folder before they are compared.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from fastroute.config import Config

TWO_PERSON = "two_person"


def canonical(value: Any, base: Path | None = None) -> Any:
    """``value`` as plain JSON data, equal for equal configurations however they were loaded
    (a relative path and the same path resolved against ``base`` compare equal)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name), base)
                for f in dataclasses.fields(value) if f.compare}
    if isinstance(value, enum.Enum):
        return canonical(value.value, base)
    if isinstance(value, Path):
        return os.path.abspath(base / value if base is not None else value)
    if isinstance(value, Mapping):
        return {str(k): canonical(v, base) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v, base) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((canonical(v, base) for v in value), key=repr)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, re.Pattern):
        return value.pattern
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def governed_view(cfg: Config, base: Path | None = None) -> dict[str, Any]:
    """The governed part of ``cfg`` as plain data: governance, each destination, each rule's
    ``modify`` (rules without one are not governed: their matching routes, it changes nothing)."""
    return {"governance": cfg.governance,
            "destinations": {name: canonical(d, base) for name, d in sorted(cfg.destinations.items())},
            # in rule order: rule-level modify runs in that order
            "rules": {r.name: canonical(r.modify, base) for r in cfg.rules if r.modify}}


def digest(view: Mapping[str, Any]) -> str:
    """The governed part's fingerprint: what a proposal is approved for."""
    text = json.dumps(view, sort_keys=False, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What ``new`` changes in the governed part of ``old`` (two :func:`governed_view`), by
    section: ``destinations.research.deidentify``, ``destinations.ai (added)``,
    ``rules[ct-research].modify``, ``governance``. Empty: nothing governed changed."""
    out: list[str] = []
    if old["governance"] != new["governance"]:
        out.append("governance")
    od, nd = old["destinations"], new["destinations"]
    for name in sorted(set(od) | set(nd)):
        if name not in od:
            out.append(f"destinations.{name} (added)")
        elif name not in nd:
            out.append(f"destinations.{name} (removed)")
        elif od[name] != nd[name]:
            keys = [k for k in sorted(set(od[name]) | set(nd[name])) if od[name].get(k) != nd[name].get(k)]
            out += [f"destinations.{name}.{k}" for k in keys]
    orules, nrules = old["rules"], new["rules"]
    for name in [*orules, *(n for n in nrules if n not in orules)]:
        if orules.get(name) != nrules.get(name):
            out.append(f"rules[{name}].modify")
    if not out and list(orules) != list(nrules):
        out.append("rules (the order of rules with modify)")
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class GovernedDiff:
    """A new configuration against the running one, as governance sees it."""

    changes: tuple[str, ...]     # governed sections changed (empty: none)
    old_digest: str
    new_digest: str
    two_person: bool             # the RUNNING configuration asks for a second admin

    @property
    def needs_approval(self) -> bool:
        return self.two_person and bool(self.changes)


def compare(running: Config, new: Config, base: Path | None = None) -> GovernedDiff:
    """``base``: the configuration file's folder (relative paths in both are relative to it)."""
    old_view, new_view = governed_view(running, base), governed_view(new, base)
    return GovernedDiff(tuple(changes(old_view, new_view)), digest(old_view), digest(new_view),
                        running.governance == TWO_PERSON)


def config_base(config_path: str | Path | None) -> Path | None:
    return Path(config_path).parent if config_path else None
