"""What a configuration reload must restart, and how to tell that a new listener is up.

A reload restarts only the processes whose configuration changed: restarting a listener
costs the modalities nothing only if it is handed over carefully (see ``workers.Supervisor``),
and restarting a sender drops its open associations. Every top-level key is classified below
by the processes that read it; a key that is not classified restarts everything (safe), and
``tests/test_reload.py`` fails until a new key is classified.
"""
from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastroute.config import Config


class Role(enum.StrEnum):
    LISTENERS = "listeners"
    SENDERS = "senders"          # every sender (per-destination settings are compared apart)
    HTTP = "http"
    MIGRATION = "migration"      # the migration process (query/retrieve jobs, issue 13)


_L, _S, _H, _M = Role.LISTENERS, Role.SENDERS, Role.HTTP, Role.MIGRATION
_ALL = frozenset(Role)

# Top-level key -> the processes that read it. ``destinations`` is compared per destination.
READERS: dict[str, frozenset[Role]] = {
    "ae_title": _ALL,                         # called AE of the listeners, calling AE of senders
    "host": frozenset({_L, _H}),
    "port": frozenset({_L, _H}),
    "spool": _ALL,                            # refused by the supervisor anyway
    "spool_max_bytes": frozenset({_L, _S}),
    "min_free_bytes": _ALL,
    "spool_prealloc": frozenset(),            # applied once, at start
    "spool_shards": frozenset({_L}),          # a listener takes (or not) a shard at start
    "allowed_calling_aes": frozenset({_L}),
    "calling_ae_certs": frozenset({_L}),      # read with allowed_calling_aes
    "allowed_peers": frozenset({_L}),
    "require_called_ae": frozenset({_L}),
    "max_pdu": frozenset({_L}),
    "max_associations": frozenset({_L, _H}),
    "acse_timeout": frozenset({_L}),
    "dimse_timeout": frozenset({_L}),
    "network_timeout": frozenset({_L}),
    "max_object_bytes": frozenset({_L}),
    "stream_threshold": frozenset({_L}),
    "max_associations_per_ae": frozenset({_L}),
    "max_associations_per_ip": frozenset({_L}),
    "association_idle_timeout": frozenset({_L}),
    "listeners": frozenset({_L, _H}),
    "engine": frozenset({_L}),
    "listener_cpus": frozenset({_L}),
    "sender_cpus": frozenset(),               # compared per destination (its effective CPUs)
    "group_commit_delay": frozenset({_L}),
    "duplicate_window": frozenset({_L, _S}),
    "shutdown_grace": frozenset(),            # read by the supervisor, which never restarts
    "destinations": frozenset({_H, _M}),      # senders: per destination, below
    "rules": frozenset({_L, _H}),             # senders: a rule's modify, compared per destination
    "governance": frozenset({_H}),
    "default": frozenset({_L, _H}),
    "sources": frozenset({_M, _H}),
    "tls": frozenset({_L, _H}),               # the TLS listener; /metrics shows its certificates
    "http": frozenset({_H}),
    "alerts": frozenset({_H}),
    "storage_commitment": frozenset({_L}),    # the listeners answer and report (issue 14)
    "peers": frozenset({_L}),                # thresholds are evaluated in the HTTP process
    "audit_retention": frozenset({_H}),
    "audit_key": _ALL,                        # every process's spool handle keys its audit events
    "history_retention": frozenset({_H}),
    "log_level": _ALL,
    "log_format": _ALL,
    "source": frozenset(),
}


@dataclass(slots=True)
class ReloadPlan:
    """The processes a reload touches, each with the reason (changed keys) to log."""

    listeners: str = ""                                    # non-empty: replace all listeners
    http: str = ""
    migration: str = ""                                    # non-empty: restart the migration process
    restart: dict[str, str] = field(default_factory=dict)  # destination -> why
    start: list[str] = field(default_factory=list)         # new destinations
    stop: list[str] = field(default_factory=list)          # removed destinations

    def empty(self) -> bool:
        return not (self.listeners or self.http or self.migration or self.restart or self.start
                    or self.stop)

    def describe(self) -> str:
        parts = []
        if self.listeners:
            parts.append(f"listeners ({self.listeners})")
        parts += [f"sender-{d} ({why})" for d, why in self.restart.items()]
        parts += [f"sender-{d} (new destination)" for d in self.start]
        parts += [f"sender-{d} stopped (destination removed)" for d in self.stop]
        if self.http:
            parts.append(f"http ({self.http})")
        if self.migration:
            parts.append(f"migration ({self.migration})")
        return "; ".join(parts) or "nothing (no process reads what changed)"


def changed_keys(old: Config, new: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if _value(old, f.name) != _value(new, f.name)]


def _value(cfg: Config, key: str) -> object:
    if key == "rules":   # a rule that only moved in the file (its line) routes the same
        return [dataclasses.replace(rule, line=None) for rule in cfg.rules]
    return getattr(cfg, key)


def _rule_modify(cfg: Config, destination: str) -> list[tuple[str, object]]:
    """The rule ``modify`` lists a destination's sender applies, in order (its content plan's
    rule steps): a change to them restarts that sender, not every sender."""
    return [(rule.name, rule.modify) for rule in cfg.rules if rule.modify and destination in rule.send_to]


def plan(old: Config, new: Config,
         sender_cpus: Callable[[Config, str], tuple[int, ...]] = lambda cfg, name: ()) -> ReloadPlan:
    """``sender_cpus`` gives a destination's effective CPUs (``workers.sender_cpus``)."""
    changed = changed_keys(old, new)
    by_role: dict[Role, list[str]] = {role: [] for role in Role}
    for key in changed:
        for role in READERS.get(key, _ALL):
            by_role[role].append(key)
    out = ReloadPlan(listeners=", ".join(by_role[_L]), http=", ".join(by_role[_H]),
                     migration=", ".join(by_role[_M]))
    for name, dest in new.destinations.items():
        before = old.destinations.get(name)
        if before is None:
            out.start.append(name)
            continue
        why = [] if before == dest else [f"destinations.{name}"]
        if _rule_modify(old, name) != _rule_modify(new, name):
            why.append("rules (modify)")
        if sender_cpus(old, name) != sender_cpus(new, name) and dest.cpus == before.cpus:
            why.append("sender_cpus")
        why += by_role[_S]
        if why:
            out.restart[name] = ", ".join(why)
    out.stop = [name for name in old.destinations if name not in new.destinations]
    return out


def listening(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` has a TCP socket listening on ``port``; None without /proc.

    Read from /proc so that the check opens no connection (a probe would be an association
    attempt in every log).
    """
    try:
        held = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                held.add(target[8:-1])
    except FileNotFoundError:
        return False if Path("/proc/self/fd").is_dir() else None
    except OSError:
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            # local_address is HEXIP:HEXPORT, st 0A is LISTEN, column 9 is the inode
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port \
                    and cols[9] in held:
                return True
    return False


def migrate_enabled() -> bool | None:
    """net.ipv4.tcp_migrate_req: whether Linux hands a closing listener's queue to its siblings."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip() == "1"
    except OSError:
        return None
