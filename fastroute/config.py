"""Configuration: frozen dataclasses, validated on load with file/line/key errors.

The configuration is passed explicitly to every component; there is no global. ``load`` reads
YAML through ``yaml.compose`` so every error can name the line it came from, and unknown keys
are errors: a typo in a router's configuration silently routes patient data elsewhere.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from fastroute.errors import ConfigError

# -- value parsers ------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB or 10GB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("expected a size such as 512MiB or 10GB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 2h")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError("expected a duration such as 30s, 5m or 2h")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def parse_ae(value: Any) -> str:
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise ValueError("expected an AE title: 1-16 printable characters, no backslash")
    return value.strip()


def parse_uid(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID_RE.match(value):
        raise ValueError("expected a UID such as 1.2.840.10008.1.2.1")
    return value


# -- dataclasses --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DestinationConfig:
    """A DICOM Storage SCP that fastroute sends to."""

    name: str
    ae_title: str
    host: str
    port: int
    max_associations: int = 1
    # Narrow (and order) the syntaxes offered; empty means "whatever the peer accepts".
    transfer_syntaxes: tuple[str, ...] = ()
    prefer: tuple[str, ...] = ()
    # Compress on the way out ("rle", "j2k-lossless", "j2k", "jpeg"); None keeps the original.
    compress: str | None = None
    allow_lossy: bool = False
    calling_ae: str | None = None          # our AE title towards this peer (default: ae_title)
    batch_size: int = 32                   # objects claimed per association round
    max_attempts: int = 10                 # per object, for object-level transient failures
    backoff_initial: float = 2.0
    backoff_max: float = 300.0
    idle_release: float = 15.0             # release an idle association after this long
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 120.0
    max_pdu: int = 262144
    paused: bool = False
    cpus: tuple[int, ...] = ()             # CPU affinity of this destination's sender process
    # Deprecated: fastroute has one DICOM engine. "pynetdicom" still parses (old configs) but
    # selects nothing; listener and sender processes say so (warn_deprecated_engine) at start.
    engine: str = "fast"


@dataclass(frozen=True)
class RuleConfig:
    name: str
    match: Mapping[str, Any] | str | None   # None: always matches
    send_to: tuple[str, ...]
    stop: bool = False
    line: int | None = None


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None


@dataclass(frozen=True)
class AlertsConfig:
    """Thresholds the HTTP process checks; every one is off unless configured."""

    oldest_age: float | None = None                       # seconds, for every destination
    oldest_age_for: Mapping[str, float] = field(default_factory=dict)   # per-destination overrides
    consecutive_failures: int | None = None                # destination-level failures in a row
    spool_min_free: int | None = None                      # bytes free on the spool's disk
    webhook: str | None = None                             # POSTed JSON on raise and clear

    def oldest_age_limit(self, dest: str) -> float | None:
        return self.oldest_age_for.get(dest, self.oldest_age)


@dataclass(frozen=True)
class Config:
    ae_title: str = "FASTROUTE"
    host: str = "0.0.0.0"
    port: int = 11112
    spool: Path = Path("./fastroute-spool")
    spool_max_bytes: int = 64 * 1024**3      # LMDB map size: the spool never grows past it
    min_free_bytes: int = 512 * 1024**2      # refuse new objects below this much free disk
    spool_prealloc: int = 0                  # room written into the spool file before the start
    allowed_calling_aes: tuple[str, ...] | None = None
    allowed_peers: tuple[str, ...] | None = None   # CIDRs / addresses
    require_called_ae: bool = True
    max_pdu: int = 262144
    max_associations: int = 32
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 120.0
    listeners: int = 1
    engine: str = "fast"                   # deprecated, as DestinationConfig.engine
    listener_cpus: tuple[int, ...] = ()
    sender_cpus: tuple[int, ...] = ()       # destinations without their own `cpus` share these
    group_commit_delay: float = 0.002       # how long a commit waits to gather more objects
    duplicate_window: float = 86400.0        # identical re-sends within this window are not resent
    shutdown_grace: float = 30.0
    destinations: Mapping[str, DestinationConfig] = field(default_factory=dict)
    rules: tuple[RuleConfig, ...] = ()
    default: tuple[str, ...] = ()
    http: HttpConfig | None = None
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    audit_retention: float | None = None     # prune audit events older than this (None: keep)
    history_retention: float | None = None   # prune delivered objects' records older than this
    log_level: str = "INFO"
    log_format: str = "text"
    source: str = "<embedded default>"

    def destination(self, name: str) -> DestinationConfig:
        try:
            return self.destinations[name]
        except KeyError:
            known = ", ".join(sorted(self.destinations)) or "none configured"
            raise ConfigError(f"unknown destination {name!r} (known: {known})") from None


EMBEDDED_DEFAULT_YAML = """\
# fastroute embedded default: listen as FASTROUTE on 11112 and keep every object in the spool
# as 'unrouted' (nothing is sent anywhere until destinations and rules are configured);
# dashboard and read-only API on http://127.0.0.1:8080/.
ae_title: FASTROUTE
port: 11112
spool: ./fastroute-spool
destinations: {}
rules: []
default: []
http: {host: 127.0.0.1, port: 8080}
"""


# -- loading ------------------------------------------------------------------------------------

class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: yaml.Node | None, key: str, message: str, hint: str = "") -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else None
        return ConfigError(message, source=self.source, line=line, key=key, hint=hint)


def _construct(node: yaml.Node) -> Any:
    """Convert a composed node to Python objects with PyYAML's safe constructor."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _mapping(ctx: _Ctx, node: yaml.Node, key: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise ctx.error(node, key, f"expected a mapping, got {_describe(node)}")
    out = []
    seen: set[str] = set()
    for knode, vnode in node.value:
        k = _construct(knode)
        if not isinstance(k, str):
            raise ctx.error(knode, key, f"expected string keys, got {k!r}")
        if k in seen:
            raise ctx.error(knode, f"{key}.{k}" if key else k, "duplicate key")
        seen.add(k)
        out.append((k, knode, vnode))
    return out


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return repr(_construct(node))


def _scalar(ctx: _Ctx, node: yaml.Node, key: str, conv: Callable[[Any], Any], what: str) -> Any:
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        raise ctx.error(node, key, f"expected {what}, got {_describe(node)}")
    value = _construct(node)
    try:
        return conv(value)
    except (ValueError, TypeError) as exc:
        raise ctx.error(node, key, f"expected {what}, got {value!r}: {exc}") from None


def _list(ctx: _Ctx, node: yaml.Node, key: str, conv: Callable[[Any], Any], what: str,
          allow_scalar: bool = False) -> tuple[Any, ...]:
    if allow_scalar and isinstance(node, yaml.ScalarNode):
        return (_scalar(ctx, node, key, conv, what),)
    if not isinstance(node, yaml.SequenceNode):
        raise ctx.error(node, key, f"expected a list of {what}, got {_describe(node)}")
    return tuple(_scalar(ctx, item, f"{key}[{i}]", conv, what) for i, item in enumerate(node.value))


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("not an integer")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return v
    return conv


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected a non-empty string")
    return v


def _cidr(v: Any) -> str:
    ipaddress.ip_network(str(v), strict=False)
    return str(v)


def warn_deprecated_engine(key: str, value: str) -> None:
    """Say that an ``engine`` key selects nothing any more (called where it used to, once
    logging is set up: a warning while parsing would go nowhere in the CLI)."""
    if value != "fast":
        logging.getLogger("fastroute.config").warning(
            "config key %s: %s is deprecated and ignored: fastroute has one DICOM engine, its own, "
            "and uses it; remove the key", key, value)


def _choice(*options: str) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return str(v)
    return conv


_TS_ALIASES = {
    "implicit": "1.2.840.10008.1.2",
    "explicit": "1.2.840.10008.1.2.1",
    "deflated": "1.2.840.10008.1.2.1.99",
    "big-endian": "1.2.840.10008.1.2.2",
    "jpeg-baseline": "1.2.840.10008.1.2.4.50",
    "jpeg-extended": "1.2.840.10008.1.2.4.51",
    "jpeg-lossless": "1.2.840.10008.1.2.4.57",
    "jpeg-lossless-sv1": "1.2.840.10008.1.2.4.70",
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
    "jpeg-ls": "1.2.840.10008.1.2.4.81",
    "j2k-lossless": "1.2.840.10008.1.2.4.90",
    "j2k": "1.2.840.10008.1.2.4.91",
    "htj2k-lossless": "1.2.840.10008.1.2.4.201",
    "htj2k-lossless-rpcl": "1.2.840.10008.1.2.4.202",
    "htj2k": "1.2.840.10008.1.2.4.203",
    "rle": "1.2.840.10008.1.2.5",
}


def _ts(v: Any) -> str:
    if isinstance(v, str) and v.lower() in _TS_ALIASES:
        return _TS_ALIASES[v.lower()]
    return parse_uid(v)


_DEST_FIELDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "ae_title": (parse_ae, "an AE title"),
    "host": (_str, "a host name or address"),
    "port": (_int(1, 65535), "a TCP port"),
    "max_associations": (_int(1, 64), "a number of associations (1-64)"),
    "compress": (_choice("rle", "j2k-lossless", "j2k", "jpeg"), "a compression name"),
    "allow_lossy": (_bool, "true or false"),
    "calling_ae": (parse_ae, "an AE title"),
    "batch_size": (_int(1, 10000), "a batch size"),
    "max_attempts": (_int(1, 1000000), "a number of attempts"),
    "backoff_initial": (parse_duration, "a duration"),
    "backoff_max": (parse_duration, "a duration"),
    "idle_release": (parse_duration, "a duration"),
    "acse_timeout": (parse_duration, "a duration"),
    "dimse_timeout": (parse_duration, "a duration"),
    "network_timeout": (parse_duration, "a duration"),
    "max_pdu": (_int(0, 2**32 - 1), "a PDU size in bytes"),
    "paused": (_bool, "true or false"),
    "engine": (_choice("fast", "pynetdicom"), "fast or pynetdicom"),
}

_TOP_FIELDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "ae_title": (parse_ae, "an AE title"),
    "host": (_str, "a listen address"),
    "port": (_int(1, 65535), "a TCP port"),
    "spool": (lambda v: Path(_str(v)), "a folder path"),
    "spool_max_bytes": (parse_size, "a size"),
    "min_free_bytes": (parse_size, "a size"),
    "spool_prealloc": (parse_size, "a size"),
    "require_called_ae": (_bool, "true or false"),
    "max_pdu": (_int(0, 2**32 - 1), "a PDU size in bytes"),
    "max_associations": (_int(1, 10000), "a number of associations"),
    "acse_timeout": (parse_duration, "a duration"),
    "dimse_timeout": (parse_duration, "a duration"),
    "network_timeout": (parse_duration, "a duration"),
    "listeners": (_int(1, 256), "a number of listener processes"),
    "engine": (_choice("fast", "pynetdicom"), "fast or pynetdicom"),
    "group_commit_delay": (parse_duration, "a duration"),
    "duplicate_window": (parse_duration, "a duration"),
    "shutdown_grace": (parse_duration, "a duration"),
    "log_level": (_choice("DEBUG", "INFO", "WARNING", "ERROR"), "a log level"),
    "log_format": (_choice("text", "json"), "text or json"),
    "audit_retention": (parse_duration, "a duration"),
    "history_retention": (parse_duration, "a duration"),
}


def _url(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v):
        raise ValueError("expected an http:// or https:// URL")
    return v


def _alerts(ctx: _Ctx, node: yaml.Node, dests: Mapping[str, DestinationConfig]) -> AlertsConfig:
    kw: dict[str, Any] = {}
    for k, knode, vnode in _mapping(ctx, node, "alerts"):
        sub = f"alerts.{k}"
        if k == "oldest_age":
            if not isinstance(vnode, yaml.MappingNode):
                kw["oldest_age"] = _scalar(ctx, vnode, sub, parse_duration, "a duration")
                continue
            per: dict[str, float] = {}
            for dname, dknode, dvnode in _mapping(ctx, vnode, sub):
                value = _scalar(ctx, dvnode, f"{sub}.{dname}", parse_duration, "a duration")
                if dname == "default":
                    kw["oldest_age"] = value
                elif dname in dests:
                    per[dname] = value
                else:
                    raise ctx.error(dknode, f"{sub}.{dname}", f"unknown destination {dname!r}",
                                    hint=f"use 'default' or one of: {', '.join(sorted(dests)) or 'none defined'}")
            kw["oldest_age_for"] = per
        elif k == "consecutive_failures":
            kw[k] = _scalar(ctx, vnode, sub, _int(1, 1000000), "a number of failures")
        elif k == "spool_min_free":
            kw[k] = _scalar(ctx, vnode, sub, parse_size, "a size")
        elif k == "webhook":
            kw[k] = _scalar(ctx, vnode, sub, _url, "a webhook URL")
        else:
            raise ctx.error(knode, sub, "unknown key",
                            hint="valid keys: consecutive_failures, oldest_age, spool_min_free, webhook")
    return AlertsConfig(**kw)


def _destination(ctx: _Ctx, name: str, node: yaml.Node) -> DestinationConfig:
    key = f"destinations.{name}"
    kw: dict[str, Any] = {"name": name}
    for k, knode, vnode in _mapping(ctx, node, key):
        sub = f"{key}.{k}"
        if k in _DEST_FIELDS:
            conv, what = _DEST_FIELDS[k]
            kw[k] = _scalar(ctx, vnode, sub, conv, what)
        elif k in ("transfer_syntaxes", "prefer"):
            kw[k] = _list(ctx, vnode, sub, _ts, "transfer syntax UIDs or names")
        elif k == "cpus":
            kw[k] = _list(ctx, vnode, sub, _int(0, 4095), "CPU numbers")
        else:
            raise ctx.error(knode, sub, "unknown key",
                            hint=f"valid keys: {', '.join(sorted([*_DEST_FIELDS, 'transfer_syntaxes', 'prefer', 'cpus']))}")
    for required in ("ae_title", "host", "port"):
        if required not in kw:
            raise ctx.error(node, key, f"missing required key {required!r}")
    if kw.get("compress") in ("j2k", "jpeg") and not kw.get("allow_lossy"):
        raise ctx.error(node, f"{key}.compress",
                        f"lossy compression {kw['compress']!r} needs allow_lossy: true")
    return DestinationConfig(**kw)


def _rule(ctx: _Ctx, index: int, node: yaml.Node, dests: Mapping[str, DestinationConfig]) -> RuleConfig:
    key = f"rules[{index}]"
    kw: dict[str, Any] = {"line": node.start_mark.line + 1}
    for k, knode, vnode in _mapping(ctx, node, key):
        sub = f"{key}.{k}"
        if k == "name":
            kw["name"] = _scalar(ctx, vnode, sub, _str, "a rule name")
        elif k == "match":
            value = _construct(vnode)
            if value is not None and not isinstance(value, (str, dict)):
                raise ctx.error(vnode, sub, "expected a mapping of attribute: value(s) or an expression string")
            kw["match"] = value
            kw["_match_node"] = vnode
        elif k == "send_to":
            kw["send_to"] = _list(ctx, vnode, sub, _str, "destination names", allow_scalar=True)
            for d in kw["send_to"]:
                if d not in dests:
                    raise ctx.error(vnode, sub, f"unknown destination {d!r}",
                                    hint=f"defined destinations: {', '.join(sorted(dests)) or 'none'}")
        elif k == "stop":
            kw["stop"] = _scalar(ctx, vnode, sub, _bool, "true or false")
        else:
            raise ctx.error(knode, sub, "unknown key", hint="valid keys: name, match, send_to, stop")
    kw.setdefault("name", f"rule{index + 1}")
    if "send_to" not in kw:
        raise ctx.error(node, key, "missing required key 'send_to'")
    match_node = kw.pop("_match_node", None)
    rule = RuleConfig(name=kw["name"], match=kw.get("match"), send_to=kw["send_to"],
                      stop=kw.get("stop", False), line=kw["line"])
    # Compile now so expression errors carry the file and line of the rule.
    from fastroute.routing.rules import compile_rule
    try:
        compile_rule(rule)
    except ConfigError as exc:
        line = match_node.start_mark.line + 1 if match_node is not None else rule.line
        raise ConfigError(_strip_where(exc), source=ctx.source, line=line, key=f"{key}.match", hint=exc.hint) from None
    return rule


def _strip_where(exc: ConfigError) -> str:
    msg = Exception.__str__(exc)
    if exc.source or exc.line is not None or exc.key:
        prefix = (exc.source or "<config>") + (f":{exc.line}" if exc.line is not None else "") + (f": {exc.key}" if exc.key else "") + ": "
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def loads(text: str, source: str = "<string>") -> Config:
    """Parse and validate configuration text; raise ConfigError naming line and key."""
    ctx = _Ctx(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"not valid YAML: {getattr(exc, 'problem', exc)}", source=source,
                          line=mark.line + 1 if mark else None) from None
    if root is None:
        raise ConfigError("empty configuration", source=source)
    kw: dict[str, Any] = {"source": source}
    items = _mapping(ctx, root, "")
    by_key = {k: (knode, vnode) for k, knode, vnode in items}
    dests: dict[str, DestinationConfig] = {}
    if "destinations" in by_key:
        _, dnode = by_key["destinations"]
        if not (isinstance(dnode, yaml.ScalarNode) and _construct(dnode) is None):
            for name, nknode, vnode in _mapping(ctx, dnode, "destinations"):
                if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                    raise ctx.error(nknode, f"destinations.{name}",
                                    "destination names use letters, digits, '_', '.', '-' (max 64)")
                dests[name] = _destination(ctx, name, vnode)
    kw["destinations"] = dests
    for k, knode, vnode in items:
        if k in _TOP_FIELDS:
            conv, what = _TOP_FIELDS[k]
            kw[k] = _scalar(ctx, vnode, k, conv, what)
        elif k == "destinations":
            pass
        elif k in ("allowed_calling_aes",):
            kw[k] = None if _construct(vnode) is None else _list(ctx, vnode, k, parse_ae, "AE titles")
        elif k == "allowed_peers":
            kw[k] = None if _construct(vnode) is None else _list(ctx, vnode, k, _cidr, "IP addresses or CIDR networks")
        elif k in ("listener_cpus", "sender_cpus"):
            kw[k] = _list(ctx, vnode, k, _int(0, 4095), "CPU numbers")
        elif k == "rules":
            if isinstance(vnode, yaml.ScalarNode) and _construct(vnode) is None:
                kw["rules"] = ()
                continue
            if not isinstance(vnode, yaml.SequenceNode):
                raise ctx.error(vnode, k, f"expected a list of rules, got {_describe(vnode)}")
            rules = tuple(_rule(ctx, i, r, dests) for i, r in enumerate(vnode.value))
            names = [r.name for r in rules]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ctx.error(vnode, k, f"duplicate rule names: {', '.join(sorted(dup))}")
            kw["rules"] = rules
        elif k == "default":
            if isinstance(vnode, yaml.ScalarNode) and _construct(vnode) is None:
                kw["default"] = ()
                continue
            kw["default"] = _list(ctx, vnode, k, _str, "destination names", allow_scalar=True)
            for d in kw["default"]:
                if d not in dests:
                    raise ctx.error(vnode, k, f"unknown destination {d!r}",
                                    hint=f"defined destinations: {', '.join(sorted(dests)) or 'none'}")
        elif k == "http":
            hk: dict[str, Any] = {}
            for hkey, hknode, hvnode in _mapping(ctx, vnode, "http"):
                if hkey == "host":
                    hk["host"] = _scalar(ctx, hvnode, "http.host", _str, "a listen address")
                elif hkey == "port":
                    hk["port"] = _scalar(ctx, hvnode, "http.port", _int(1, 65535), "a TCP port")
                elif hkey == "token":
                    hk["token"] = _scalar(ctx, hvnode, "http.token", _str, "a token string")
                else:
                    raise ctx.error(hknode, f"http.{hkey}", "unknown key", hint="valid keys: host, port, token")
            kw["http"] = HttpConfig(**hk)
        elif k == "alerts":
            if not (isinstance(vnode, yaml.ScalarNode) and _construct(vnode) is None):
                kw["alerts"] = _alerts(ctx, vnode, dests)
        else:
            valid = sorted([*_TOP_FIELDS, "destinations", "rules", "default", "allowed_calling_aes",
                            "allowed_peers", "listener_cpus", "sender_cpus", "http", "alerts"])
            raise ctx.error(knode, k, "unknown key", hint=f"valid keys: {', '.join(valid)}")
    return Config(**kw)


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror}", source=str(p)) from None


def load(path: str | Path | None, profile: str | Path | None = None) -> Config:
    """Load a file (or the embedded default when ``path`` is None), over an optional tuning
    profile (tuning/*.yaml): the profile supplies defaults, the file's own keys win.

    Each file is validated on its own first, so errors name the right file and line.
    """
    if path is None:
        text, source, p = EMBEDDED_DEFAULT_YAML, "<embedded default>", None
    else:
        p = Path(path)
        text, source = _read(p), str(p)
    cfg = loads(text, source)
    if profile is not None:
        ptext = _read(Path(profile))
        loads(ptext, str(profile))
        merged = {**(yaml.safe_load(ptext) or {}), **(yaml.safe_load(text) or {})}
        cfg = loads(yaml.safe_dump(merged, sort_keys=False), f"{source} + {profile}")
    if p is None:
        return cfg
    # A relative spool path is relative to the configuration file, not the working directory.
    if not cfg.spool.is_absolute():
        cfg = dataclasses.replace(cfg, spool=(p.parent / cfg.spool))
    return cfg


__all__ = [
    "Config", "DestinationConfig", "RuleConfig", "HttpConfig", "AlertsConfig", "load", "loads",
    "EMBEDDED_DEFAULT_YAML", "parse_size", "parse_duration",
]
