"""Configuration: frozen dataclasses, validated on load with file/line/key errors.

The configuration is passed explicitly to every component; there is no global. ``load`` reads
YAML through ``yaml.compose`` so every error can name the line it came from, and unknown keys
are errors: a typo in a router's configuration silently routes patient data elsewhere.

The schema is written once, as the dataclasses below: each field that is a YAML key carries a
``Key`` in its metadata (how to read it and what to call it in errors). The loader, the lists of
valid keys, the did-you-mean hints and the required keys are all derived from those fields.
Rule expressions are compiled while loading (``fastroute.rulelang``), once, and the compiled
form travels with the ``RuleConfig`` (also to spawned processes, where it is compiled again on
unpickling: closures cannot be pickled).
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import ipaddress
import logging
import re
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from fastroute.errors import ConfigError, RuleSyntaxError
from fastroute.rulelang import ExpressionError, Matcher, compile_match, did_you_mean
from fastroute.content.deidentify import DeidentifyConfig, parse_deidentify
from fastroute.content.modify import ModifyAction, parse_modify

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


def _path(v: Any) -> Path:
    return Path(_str(v))


def _cidr(v: Any) -> str:
    ipaddress.ip_network(str(v), strict=False)
    return str(v)


def _choice(*options: str) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        # YAML 1.1 reads a bare off/on (also no/yes) as a boolean: `governance: off` means "off"
        if v is False and "off" in options:
            return "off"
        if v is True and "on" in options:
            return "on"
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return str(v)
    return conv


def _secret_ref(v: Any) -> str:
    """``env:NAME`` or ``file:PATH``: where a secret is, never the secret itself (the
    configuration is shown by the API and diffed into the audit trail)."""
    if not isinstance(v, str) or not re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*|file:\S.*", v):
        raise ValueError("expected env:NAME (an environment variable) or file:PATH")
    return v


def _url(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v):
        raise ValueError("expected an http:// or https:// URL")
    return v


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


def normalise_dn(dn: str) -> tuple[tuple[str, str], ...]:
    """A distinguished name as sorted (TYPE, value) pairs: "CN=a,O=b" and "O = b, CN = a"
    (openssl's default one-line order) compare equal; types and values compare without case
    (X.520 caseIgnoreMatch, which the usual attributes CN, O, OU, L, ST, C use)."""
    pairs = []
    # openssl's old one-line form "/O=b/CN=a" is split on "/", RFC 4514 (and openssl's default
    # "O = b, CN = a") on "," and "+": a "/" inside a value stays in it
    parts = re.split(r"(?<!\\)/", dn[1:]) if dn.startswith("/") else re.split(r"(?<!\\)[,+]", dn)
    for part in parts:
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep:
            raise ValueError(f"not a distinguished name: {dn!r}")
        pairs.append((k.strip().upper(), v.strip().replace("\\", "").casefold()))   # caseIgnoreMatch
    return tuple(sorted(pairs))


def normalise_fingerprint(fp: str) -> str:
    """"sha256:AB:CD..." / "AB CD ..." / "abcd..." -> "sha256:abcd..." (64 hex digits)."""
    body = fp.strip().lower()
    if body.startswith("sha256:") or body.startswith("sha256="):
        body = body[7:]
    hexdigits = re.sub(r"[\s:]", "", body)
    if not re.fullmatch(r"[0-9a-f]{64}", hexdigits):
        raise ValueError("expected a SHA-256 fingerprint: sha256: and 64 hex digits")
    return "sha256:" + hexdigits


# -- reading YAML nodes -------------------------------------------------------------------------

class ConfigErrors(ConfigError):
    """Several independent errors of one file, each a ConfigError with its own line and key.

    Raised only when there is more than one, so a single error keeps its own type; the first
    one's source/line/key stand for the whole (callers that show one error show that).
    """

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        Exception.__init__(self, "\n".join(str(e) for e in errors))
        self.errors = tuple(errors)
        self.source, self.line, self.key, self.hint = first.source, first.line, first.key, first.hint

    def __str__(self) -> str:
        return str(self.args[0])


class _Invalid(Exception):
    """A mapping or list had errors, already recorded in ``_Ctx.errors``: skip building it."""


class _Ctx:
    """One load: the file name for errors, the errors so far (every independent one is
    reported, not only the first), and the destinations once read (rules refer to them)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.dests: dict[str, DestinationConfig] = {}
        self.bad_dests: set[str] = set()   # defined but invalid: not "unknown" where referenced
        self.errors: list[ConfigError] = []

    def attempt(self, read: Callable[[], Any]) -> tuple[bool, Any]:
        """Run one independent part of the load; record its error instead of stopping."""
        try:
            return True, read()
        except ConfigError as exc:
            self.errors.append(exc)
        except _Invalid:
            pass
        return False, None

    def error(self, node: yaml.Node | None, key: str, message: str, hint: str = "") -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else None
        return ConfigError(message, source=self.source, line=line, key=key, hint=hint)

    def unknown_destination(self, node: yaml.Node, key: str, name: str) -> ConfigError:
        return self.error(node, key, f"unknown destination {name!r}",
                          hint=f"defined destinations: {', '.join(sorted({*self.dests, *self.bad_dests})) or 'none'}")


def _construct(node: yaml.Node) -> Any:
    """Convert a composed node to Python objects with PyYAML's safe constructor."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and _construct(node) is None


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


# -- the schema's vocabulary --------------------------------------------------------------------

class Shape(enum.StrEnum):
    """How a key's YAML value is shaped."""

    SCALAR = "scalar"       # one value, through ``conv``
    LIST = "list"           # a list of values, each through ``conv``
    SECTION = "section"     # a mapping read into the dataclass ``section``
    CUSTOM = "custom"       # read by ``read``, which returns the fields it sets


class IfNull(enum.StrEnum):
    """What an explicit ``key: null`` (or an empty value) means."""

    REJECT = "reject"       # an error like any other wrong value
    NONE = "none"           # the field is None
    EMPTY = "empty"         # the field is an empty tuple
    DEFAULT = "default"     # as if the key were absent


Reader = Callable[[_Ctx, yaml.Node, str], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Key:
    """A dataclass field's life as a YAML key; fields without one are not keys.

    ``what`` names the expected value in errors ("expected a TCP port, got 70000: ...").
    """

    conv: Callable[[Any], Any] | None = None
    what: str = ""
    shape: Shape = Shape.SCALAR
    if_null: IfNull = IfNull.REJECT
    one_or_list: bool = False          # a LIST that also takes a single bare value
    destinations: bool = False         # a LIST of names that must be configured destinations
    section: type | None = None
    read: Reader | None = None
    first: bool = False                # read before the other keys of its mapping

    def value(self, ctx: _Ctx, node: yaml.Node, key: str, name: str) -> dict[str, Any]:
        """The fields this key sets, read from its value ``node`` (``key`` is its dotted path)."""
        if self.if_null is not IfNull.REJECT and _is_null(node):
            if self.if_null is IfNull.DEFAULT:
                return {}
            return {name: None if self.if_null is IfNull.NONE else ()}
        if self.shape is Shape.CUSTOM:
            assert self.read is not None
            return self.read(ctx, node, key)
        if self.shape is Shape.SECTION:
            assert self.section is not None
            kw: dict[str, Any] = {}
            _read_fields(ctx, self.section, node, key, kw)
            return {name: self.section(**kw)}
        assert self.conv is not None
        if self.shape is Shape.SCALAR:
            return {name: _scalar(ctx, node, key, self.conv, self.what)}
        items = _list(ctx, node, key, self.conv, self.what, allow_scalar=self.one_or_list)
        if self.destinations:
            for d in items:
                if d not in ctx.dests and d not in ctx.bad_dests:
                    raise ctx.unknown_destination(node, key, d)
        return {name: items}


def key(conv: Callable[[Any], Any] | None = None, what: str = "", **how: Any) -> dict[str, Key]:
    """Field metadata that makes a dataclass field a YAML key."""
    return {"key": Key(conv, what, **how)}


@functools.cache
def schema(cls: type) -> dict[str, Key]:
    """A section's YAML keys, in field order."""
    return {f.name: f.metadata["key"] for f in dataclasses.fields(cls) if "key" in f.metadata}


@functools.cache
def _required(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if "key" in f.metadata
                 and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)


def _unknown_key_hint(name: str, cls: type) -> str:
    valid = sorted(schema(cls))
    dym = did_you_mean(name, valid, cutoff=0.6)
    return (f"{dym} " if dym else "") + f"valid keys: {', '.join(valid)}"


def _read_fields(ctx: _Ctx, cls: type, node: yaml.Node, key: str,
                 kw: dict[str, Any]) -> dict[str, yaml.Node]:
    """Read a mapping into ``kw`` by the fields of ``cls``; return each key's value node."""
    keys = schema(cls)
    items = _mapping(ctx, node, key)
    early = [it for it in items if it[0] in keys and keys[it[0]].first]
    nodes: dict[str, yaml.Node] = {}
    ok = True
    meant: set[str] = set()     # keys an unknown one is a typo of: not also reported missing
    for k, knode, vnode in early + [it for it in items if it not in early]:
        sub = f"{key}.{k}" if key else k
        spec = keys.get(k)
        if spec is None:
            ctx.errors.append(ctx.error(knode, sub, "unknown key", hint=_unknown_key_hint(k, cls)))
            meant.update(c for c in keys if c.lower() == k.lower())
            meant.update(difflib.get_close_matches(k, list(keys), n=3, cutoff=0.6))
            ok = False
            continue
        nodes[k] = vnode
        done, fields = ctx.attempt(lambda: spec.value(ctx, vnode, sub, k))
        if done:
            kw.update(fields)
        else:
            ok = False
            nodes.pop(k)
    present = {k for k, _, _ in items}
    for name in _required(cls):
        if name not in kw and name not in present and name not in meant:   # else reported already
            ctx.errors.append(ctx.error(node, key, f"missing required key {name!r}"))
            ok = False
    if not ok:
        raise _Invalid
    return nodes


# -- keys that need more than a converter --------------------------------------------------------

_DEST_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Names the router gives a meaning of its own: 'unrouted' is the queue of objects no rule routed
# (the CLI, the API and /metrics show it under that name), 'default' is the catch-all key of
# ``alerts.oldest_age``. A destination so named would be confused with them.
RESERVED_DESTINATION_NAMES = {
    "unrouted": "it is the queue of objects no rule routes (`fastroute queue`, the API, /metrics)",
    "default": "alerts.oldest_age uses it for every destination",
}


def _check_destination_name(ctx: _Ctx, nknode: yaml.Node, key: str, name: str) -> None:
    if not _DEST_NAME_RE.fullmatch(name):
        raise ctx.error(nknode, f"{key}.{name}",
                        "destination names use letters, digits, '_', '.', '-' (max 64)")
    why = RESERVED_DESTINATION_NAMES.get(name.lower())
    if why:
        raise ctx.error(nknode, f"{key}.{name}", f"{name!r} is reserved: {why}",
                        hint="give the destination another name")


def _named_destination(ctx: _Ctx, nknode: yaml.Node, key: str, name: str,
                       vnode: yaml.Node) -> DestinationConfig:
    _check_destination_name(ctx, nknode, key, name)
    return _destination(ctx, name, vnode)


def _read_destinations(ctx: _Ctx, node: yaml.Node, key: str) -> dict[str, Any]:
    ok = True
    for name, nknode, vnode in _mapping(ctx, node, key):
        done, dest = ctx.attempt(functools.partial(_named_destination, ctx, nknode, key, name, vnode))
        if done:
            ctx.dests[name] = dest
        else:
            ctx.bad_dests.add(name)
            ok = False
    if not ok:
        raise _Invalid
    return {"destinations": ctx.dests}


def _destination(ctx: _Ctx, name: str, node: yaml.Node) -> DestinationConfig:
    key = f"destinations.{name}"
    kw: dict[str, Any] = {"name": name}
    _read_fields(ctx, DestinationConfig, node, key, kw)
    if kw.get("compress") in ("j2k", "jpeg") and not kw.get("allow_lossy"):
        raise ctx.error(node, f"{key}.compress",
                        f"lossy compression {kw['compress']!r} needs allow_lossy: true")
    dest = DestinationConfig(**kw)
    why = _uid_conflict(dest, kw.get("modify", ()))
    if why:
        raise ctx.error(node, f"{key}.modify", f"modify changes {why}", hint=_UID_HINT)
    return dest


_INSTANCE_UIDS = {0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID",
                  0x00080018: "SOPInstanceUID"}
_UID_HINT = ("the destination would be asked (storage commitment / verify: find) about UIDs it "
             "never received; set commitment: off and verify: off for it, or leave the UIDs alone")


def _uid_conflict(dest: DestinationConfig, actions: Sequence[ModifyAction]) -> str:
    """Why ``actions`` may not run for ``dest`` ("" when they may): they change an instance
    UID while the destination's commitment or verification asks about the UIDs sent."""
    if dest.commitment == "off" and dest.verify == "off":
        return ""
    touched = sorted({_INSTANCE_UIDS[t] for a in actions for t in a.tags() if t in _INSTANCE_UIDS})
    if not touched:
        return ""
    on = " and ".join(f"{k}: {v}" for k, v in (("commitment", dest.commitment), ("verify", dest.verify))
                      if v != "off")
    return f"{', '.join(touched)} while destination {dest.name!r} has {on}"


def _check_rule_uids(cfg: Config) -> None:
    """A rule's ``modify`` runs for every destination it sends to: the same check as a
    destination's own, against each of them (after loading, when both are known)."""
    for rule in cfg.rules:
        for name in rule.send_to:
            dest = cfg.destinations.get(name)
            why = _uid_conflict(dest, rule.modify) if dest is not None else ""
            if why:
                raise ConfigError(f"rule {rule.name!r}: modify changes {why}", source=cfg.source,
                                  line=rule.line, key=f"rules.{rule.name}.modify", hint=_UID_HINT)


def _read_named(ctx: _Ctx, node: yaml.Node, key: str, cls: type, name_field: str,
                check: Callable[[str], str]) -> dict[str, Any]:
    """A mapping of named entries of ``cls`` (``sources:``, ``peers:``): each entry's errors
    recorded on its own; ``check(name)`` returns why a name is not allowed ("" when it is)."""
    out: dict[str, Any] = {}
    ok = True
    for name, nknode, vnode in _mapping(ctx, node, key):
        def read(name: str = name, nknode: yaml.Node = nknode, vnode: yaml.Node = vnode) -> Any:
            why = check(name)
            if why:
                raise ctx.error(nknode, f"{key}.{name}", why)
            kw: dict[str, Any] = {name_field: name}
            _read_fields(ctx, cls, vnode, f"{key}.{name}", kw)
            return cls(**kw)
        done, entry = ctx.attempt(read)
        if done:
            out[name] = entry
        else:
            ok = False
    if not ok:
        raise _Invalid
    return out


def _read_sources(ctx: _Ctx, node: yaml.Node, key: str) -> dict[str, Any]:
    return {"sources": _read_named(
        ctx, node, key, SourceConfig, "name",
        lambda name: "" if _DEST_NAME_RE.fullmatch(name) else
        "source names use letters, digits, '_', '.', '-' (max 64)")}


def _read_rules(ctx: _Ctx, node: yaml.Node, key: str) -> dict[str, Any]:
    if not isinstance(node, yaml.SequenceNode):
        raise ctx.error(node, key, f"expected a list of rules, got {_describe(node)}")
    read = [ctx.attempt(functools.partial(_rule, ctx, i, r)) for i, r in enumerate(node.value)]
    if not all(done for done, _ in read):
        raise _Invalid
    rules = tuple(rule for _, rule in read)
    names = [r.name for r in rules]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ctx.error(node, key, f"duplicate rule names: {', '.join(sorted(dup))}")
    return {"rules": rules}


def _rule(ctx: _Ctx, index: int, node: yaml.Node) -> RuleConfig:
    key = f"rules[{index}]"
    kw: dict[str, Any] = {"name": f"rule{index + 1}", "match": None, "line": node.start_mark.line + 1}
    nodes = _read_fields(ctx, RuleConfig, node, key, kw)
    # Compiled here, once, so an expression error carries the file and the line of its match.
    try:
        matcher = compile_match(kw["match"])
    except ExpressionError as exc:
        mnode = nodes.get("match")
        raise RuleSyntaxError(exc.message, source=ctx.source,
                              line=mnode.start_mark.line + 1 if mnode is not None else kw["line"],
                              key=f"{key}.match", hint=exc.hint) from None
    return RuleConfig(**kw, compiled=matcher)


def _read_match(ctx: _Ctx, node: yaml.Node, key: str) -> dict[str, Any]:
    value = _construct(node)
    if value is not None and not isinstance(value, (str, dict)):
        raise ctx.error(node, key, "expected a mapping of attribute: value(s) or an expression string")
    return {"match": value}


@dataclass(frozen=True, slots=True)
class CertBinding:
    """An ``allowed_calling_aes`` entry that binds a calling AE title to a client certificate
    (TLS listener): by subject (a distinguished name, any attribute order) or by the SHA-256
    fingerprint of the certificate, or both (both must match)."""

    ae: str
    cert_subject: str | None = None
    cert_fingerprint: str | None = None     # normalised: "sha256:" + 64 lower-case hex digits


_BINDING_KEYS = ("ae", "cert_subject", "cert_fingerprint")


def _read_allowed_calling_aes(ctx: _Ctx, node: yaml.Node, key: str) -> dict[str, Any]:
    """Plain AE titles, or ``{ae: CT1, cert_subject: "CN=ct1.hospital"}`` /
    ``{ae: CT1, cert_fingerprint: "sha256:..."}`` items binding an AE to its certificate."""
    if not isinstance(node, yaml.SequenceNode):
        raise ctx.error(node, key, f"expected a list of AE titles, got {_describe(node)}")
    aes: list[str] = []
    bindings: dict[str, list[CertBinding]] = {}
    for i, item in enumerate(node.value):
        sub = f"{key}[{i}]"
        if not isinstance(item, yaml.MappingNode):
            aes.append(_scalar(ctx, item, sub, parse_ae, "an AE title"))
            continue
        got: dict[str, Any] = {}
        for k, knode, vnode in _mapping(ctx, item, sub):
            if k not in _BINDING_KEYS:
                dym = did_you_mean(k, list(_BINDING_KEYS), cutoff=0.6)
                raise ctx.error(knode, f"{sub}.{k}", "unknown key",
                                hint=(f"{dym} " if dym else "") + f"valid keys: {', '.join(_BINDING_KEYS)}")
            if k == "ae":
                got[k] = _scalar(ctx, vnode, f"{sub}.ae", parse_ae, "an AE title")
            elif k == "cert_subject":
                got[k] = _scalar(ctx, vnode, f"{sub}.{k}", _str, "a distinguished name such as CN=ct1.hospital")
                try:
                    normalise_dn(got[k])
                except ValueError as exc:
                    raise ctx.error(vnode, f"{sub}.{k}", str(exc)) from None
            else:
                got[k] = _scalar(ctx, vnode, f"{sub}.{k}", normalise_fingerprint, "a SHA-256 fingerprint")
        if "ae" not in got:
            raise ctx.error(item, sub, "missing required key 'ae'")
        if "cert_subject" not in got and "cert_fingerprint" not in got:
            raise ctx.error(item, sub, "a mapping entry binds an AE title to a certificate: "
                            "give cert_subject or cert_fingerprint", hint="or write the AE title alone")
        aes.append(got["ae"])
        bindings.setdefault(got["ae"], []).append(CertBinding(**got))
    return {"allowed_calling_aes": tuple(dict.fromkeys(aes)),
            "calling_ae_certs": {ae: tuple(b) for ae, b in bindings.items()}}


def _read_oldest_age(ctx: _Ctx, node: yaml.Node, key: str) -> dict[str, Any]:
    """One duration for every destination, or a mapping of ``default`` and destination names."""
    if not isinstance(node, yaml.MappingNode):
        return {"oldest_age": _scalar(ctx, node, key, parse_duration, "a duration")}
    out: dict[str, Any] = {}
    per: dict[str, float] = {}
    for dname, dknode, dvnode in _mapping(ctx, node, key):
        value = _scalar(ctx, dvnode, f"{key}.{dname}", parse_duration, "a duration")
        if dname == "default":
            out["oldest_age"] = value
        elif dname in ctx.dests:
            per[dname] = value
        elif dname in ctx.bad_dests:
            continue
        else:
            raise ctx.error(dknode, f"{key}.{dname}", f"unknown destination {dname!r}",
                            hint=f"use 'default' or one of: {', '.join(sorted(ctx.dests)) or 'none defined'}")
    out["oldest_age_for"] = per
    return out


# -- the schema ---------------------------------------------------------------------------------

_AE = key(parse_ae, "an AE title")
_PORT = key(_int(1, 65535), "a TCP port")
_DURATION = key(parse_duration, "a duration")
_SIZE = key(parse_size, "a size")
_BOOL = key(_bool, "true or false")
_PDU = key(_int(0, 2**32 - 1), "a PDU size in bytes")
_CPUS = key(_int(0, 4095), "CPU numbers", shape=Shape.LIST)
_ENGINE = key(_choice("fast", "pynetdicom"), "fast or pynetdicom")


def warn_deprecated_engine(key: str, value: str) -> None:
    """Say that an ``engine`` key selects nothing any more (called where it used to, once
    logging is set up: a warning while parsing would go nowhere in the CLI)."""
    if value != "fast":
        logging.getLogger("fastroute.config").warning(
            "config key %s: %s is deprecated and ignored: fastroute has one DICOM engine, its own, "
            "and uses it; remove the key", key, value)


def _base_dir(ctx: _Ctx) -> Path | None:
    """The configuration file's folder (relative paths in it are relative to it), if a file."""
    p = Path(ctx.source)
    return p.parent if ctx.source and not ctx.source.startswith("<") else None


def _read_modify(ctx: _Ctx, node: yaml.Node, key: str) -> dict[str, Any]:
    try:
        return {"modify": parse_modify(_construct(node), _base_dir(ctx))}
    except ValueError as exc:
        raise ctx.error(node, key, str(exc)) from None


def _read_deidentify(ctx: _Ctx, node: yaml.Node, key: str) -> dict[str, Any]:
    try:
        return {"deidentify": parse_deidentify(_construct(node), _base_dir(ctx))}
    except ValueError as exc:
        raise ctx.error(node, key, str(exc)) from None


def _read_peer_tls(ctx: _Ctx, node: yaml.Node, key: str) -> dict[str, Any]:
    """A destination's or a source's ``tls:`` section. A reader rather than ``Shape.SECTION``
    because TlsPeerConfig is defined further down, beside the listener's TlsListenerConfig."""
    kw: dict[str, Any] = {}
    _read_fields(ctx, TlsPeerConfig, node, key, kw)
    if (kw.get("cert") is None) != (kw.get("key") is None):
        raise ctx.error(node, key, "cert and key go together (mutual TLS), or neither")
    return {"tls": TlsPeerConfig(**kw)}


_PEER_TLS = key(shape=Shape.CUSTOM, read=_read_peer_tls, if_null=IfNull.NONE)


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    """A DICOM Storage SCP that fastroute sends to."""

    name: str                              # its key under ``destinations:``
    ae_title: str = field(metadata=_AE)
    host: str = field(metadata=key(_str, "a host name or address"))
    port: int = field(metadata=_PORT)
    max_associations: int = field(default=1, metadata=key(_int(1, 64), "a number of associations (1-64)"))
    # Narrow (and order) the syntaxes offered; empty means "whatever the peer accepts".
    transfer_syntaxes: tuple[str, ...] = field(
        default=(), metadata=key(_ts, "transfer syntax UIDs or names", shape=Shape.LIST))
    prefer: tuple[str, ...] = field(
        default=(), metadata=key(_ts, "transfer syntax UIDs or names", shape=Shape.LIST))
    # Compress on the way out ("rle", "j2k-lossless", "j2k", "jpeg"); None keeps the original.
    compress: str | None = field(
        default=None, metadata=key(_choice("rle", "j2k-lossless", "j2k", "jpeg"), "a compression name"))
    allow_lossy: bool = field(default=False, metadata=_BOOL)
    # our AE title towards this peer (default: ae_title)
    calling_ae: str | None = field(default=None, metadata=_AE)
    # DICOM TLS towards it (None: plain TCP); see TlsPeerConfig
    tls: TlsPeerConfig | None = field(default=None, metadata=_PEER_TLS)
    # objects claimed per association round
    batch_size: int = field(default=32, metadata=key(_int(1, 10000), "a batch size"))
    # per object, for object-level transient failures
    max_attempts: int = field(default=10, metadata=key(_int(1, 1000000), "a number of attempts"))
    # an object whose delivery ends without a response (abort, timeout) this many times in a
    # row is failed: a peer that aborts on its content would otherwise be sent it forever
    max_unknown_outcomes: int = field(default=3, metadata=key(_int(1, 1000000), "a number of outcomes"))
    backoff_initial: float = field(default=2.0, metadata=_DURATION)
    backoff_max: float = field(default=300.0, metadata=_DURATION)
    # release an idle association after this long
    idle_release: float = field(default=15.0, metadata=_DURATION)
    acse_timeout: float = field(default=30.0, metadata=_DURATION)
    dimse_timeout: float = field(default=120.0, metadata=_DURATION)
    network_timeout: float = field(default=120.0, metadata=_DURATION)
    max_pdu: int = field(default=262144, metadata=_PDU)
    paused: bool = field(default=False, metadata=_BOOL)
    # CPU affinity of this destination's sender process
    cpus: tuple[int, ...] = field(default=(), metadata=_CPUS)
    # Deprecated: fastroute has one DICOM engine. "pynetdicom" still parses (old configs) but
    # selects nothing; listener and sender processes say so (warn_deprecated_engine) at start.
    engine: str = field(default="fast", metadata=_ENGINE)
    # It answers C-FIND (Study Root): migrations verify each study against it (issue 13).
    query: bool = field(default=False, metadata=_BOOL)
    # image: C-FIND at IMAGE level lists every SOP Instance UID; study: only the study's
    # NumberOfStudyRelatedInstances is compared (for a PACS without IMAGE-level queries).
    # With image, a refused IMAGE-level query falls back to study level by itself.
    query_level: str = field(default="image", metadata=key(_choice("image", "study"), "image or study"))
    # Storage Commitment (issue 14): after delivery, ask it to commit what it got, per study
    # (N-ACTION). The report (N-EVENT-REPORT) comes on the sending association, kept open for
    # it, or on a new association to our listener (the PACS proposes the SCP role for it).
    commitment: str = field(default="off", metadata=key(
        _choice("off", "same-association", "new-association"), "off, same-association or new-association"))
    # no report this long after the request: ask again; no report again: alert (still open)
    commitment_timeout: float = field(default=600.0, metadata=_DURATION)
    # "Indexed, not sent" (issue 14): for a PACS without storage commitment. Once a study has
    # settled here (no instance of it received for verify_quiet and none of it pending, bulk
    # or in flight in this queue), C-FIND it (query_level) and compare with what was delivered;
    # what is missing is re-sent (its bytes are held until verified), up to verify_attempts
    # times, then the study is verify-failed and alerted. Needs ``query: true``.
    verify: str = field(default="off", metadata=key(_choice("off", "find"), "off or find"))
    verify_quiet: float = field(default=120.0, metadata=_DURATION)
    verify_attempts: int = field(default=3, metadata=key(_int(1, 100), "a number of attempts (1-100)"))
    # Governed content changes (issue 15), applied in this destination's sender only:
    # ``modify`` actions (fastroute.content.modify), then ``deidentify`` (PS3.15 Annex E).
    modify: tuple[ModifyAction, ...] = field(default=(), metadata=key(shape=Shape.CUSTOM, read=_read_modify))
    deidentify: DeidentifyConfig | None = field(default=None, metadata=key(
        shape=Shape.CUSTOM, read=_read_deidentify, if_null=IfNull.NONE))


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """An archive fastroute queries (C-FIND) and retrieves from (C-MOVE or C-GET)."""

    name: str                              # its key under ``sources:``
    ae_title: str = field(metadata=_AE)
    host: str = field(metadata=key(_str, "a host name or address"))
    port: int = field(metadata=_PORT)
    # move: the source sends to fastroute's own AE (move_destination) through the listeners;
    # get: it sends on fastroute's own association (C-GET, SCP role negotiated)
    retrieve: str = field(default="move", metadata=key(_choice("move", "get"), "move or get"))
    # concurrent associations to this source, queries and retrieves together
    max_associations: int = field(default=2, metadata=key(_int(1, 64), "a number of associations (1-64)"))
    # our AE title towards this source (default: the router's ae_title)
    calling_ae: str | None = field(default=None, metadata=_AE)
    # DICOM TLS towards it (None: plain TCP); see TlsPeerConfig
    tls: TlsPeerConfig | None = field(default=None, metadata=_PEER_TLS)
    # the AE the source must send C-MOVE sub-operations to, as registered at the source
    # (default: the router's ae_title)
    move_destination: str | None = field(default=None, metadata=_AE)
    # an answer with this many matches is taken as capped by the archive: the query is split
    # (date ranges halved) until every answer is smaller
    max_results: int = field(default=1000, metadata=key(_int(1, 10000000), "a number of results"))
    # one C-FIND, start to final response; past it the query is cancelled and split
    query_timeout: float = field(default=300.0, metadata=_DURATION)
    # one C-MOVE/C-GET, start to final response; past it it is cancelled and what is
    # missing is fetched again later
    retrieve_timeout: float = field(default=3600.0, metadata=_DURATION)
    # studies with more instances than this are retrieved series by series
    series_threshold: int = field(default=1000, metadata=key(_int(1, 10000000), "a number of instances"))
    # whether the source answers C-FIND at IMAGE level (else SERIES-level counts are used)
    image_level: bool = field(default=True, metadata=_BOOL)
    acse_timeout: float = field(default=30.0, metadata=_DURATION)
    dimse_timeout: float = field(default=120.0, metadata=_DURATION)
    network_timeout: float = field(default=120.0, metadata=_DURATION)
    max_pdu: int = field(default=262144, metadata=_PDU)


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """One entry of ``rules:``; its ``match`` is compiled when the rule is made.

    ``compiled`` hands over a match the loader has already compiled; without it (a rule built
    in code), the match is compiled here, and a syntax error is a RuleSyntaxError naming the rule.
    """

    name: str = field(metadata=key(_str, "a rule name"))
    match: Mapping[str, Any] | str | None = field(              # None: always matches
        metadata=key(shape=Shape.CUSTOM, read=_read_match))
    send_to: tuple[str, ...] = field(metadata=key(
        _str, "destination names", shape=Shape.LIST, one_or_list=True, destinations=True))
    stop: bool = field(default=False, metadata=_BOOL)
    # applied (in each sender) for every destination this rule sends the object to, before
    # the destination's own ``modify``
    modify: tuple[ModifyAction, ...] = field(default=(), metadata=key(shape=Shape.CUSTOM, read=_read_modify))
    line: int | None = None
    compiled: InitVar[Matcher | None] = None
    matcher: Matcher = field(init=False, repr=False, compare=False)

    def __post_init__(self, compiled: Matcher | None) -> None:
        if compiled is None or compiled.match is not self.match:
            try:
                compiled = compile_match(self.match)
            except ExpressionError as exc:
                raise RuleSyntaxError(exc.message, line=self.line, key=f"rules[{self.name}].match",
                                      hint=exc.hint) from None
        object.__setattr__(self, "matcher", compiled)


# the classes below have a field named "key", which hides key() in their bodies
_key = key
_MIN_TLS = _key(_choice("1.2", "1.3"), "a TLS version: 1.2 or 1.3")


@dataclass(frozen=True, slots=True)
class TlsListenerConfig:
    """``tls:``: the DICOM TLS listener, beside the plain one (top-level ``port: 0`` turns the
    plain one off). PS3.15 Annex B.9, the non-downgrading BCP 195 profile, unless
    ``legacy_ciphers`` also admits the retired profiles' RSA/CBC suites (old modalities).
    Relative file paths are relative to the configuration file."""

    cert: Path = field(metadata=_key(_path, "a PEM certificate file"))     # ours, with its chain
    key: Path = field(metadata=_key(_path, "a PEM private key file"))
    port: int = field(default=2762, metadata=_PORT)
    # CA certificates client certificates must chain to (None: no client certificates asked for)
    ca: Path | None = field(default=None, metadata=_key(_path, "a PEM CA file", if_null=IfNull.NONE))
    require_client_cert: bool = field(default=True, metadata=_BOOL)
    min_version: str = field(default="1.2", metadata=_MIN_TLS)
    # a PEM CRL of the CA: client (leaf) certificates are checked against it
    crl: Path | None = field(default=None, metadata=_key(_path, "a PEM CRL file", if_null=IfNull.NONE))
    legacy_ciphers: bool = field(default=False, metadata=_BOOL)
    # a TCP client that has not finished the TLS handshake by then is closed
    handshake_timeout: float = field(default=10.0, metadata=_DURATION)

    def files(self) -> dict[str, Path]:
        """The files it names, by key (for ``fastroute check`` and reloads)."""
        out = {"cert": self.cert, "key": self.key}
        if self.ca is not None:
            out["ca"] = self.ca
        if self.crl is not None:
            out["crl"] = self.crl
        return out


@dataclass(frozen=True, slots=True)
class TlsPeerConfig:
    """``tls:`` of a destination or a source: fastroute is the TLS client. The server's
    certificate is verified against ``ca`` (None: the system's trust store) and, with
    ``verify_hostname``, its name against the host; ``cert``/``key`` present ours (mutual TLS)."""

    ca: Path | None = field(default=None, metadata=_key(_path, "a PEM CA file", if_null=IfNull.NONE))
    cert: Path | None = field(default=None, metadata=_key(_path, "a PEM certificate file", if_null=IfNull.NONE))
    key: Path | None = field(default=None, metadata=_key(_path, "a PEM private key file", if_null=IfNull.NONE))
    verify_hostname: bool = field(default=True, metadata=_BOOL)

    def files(self) -> dict[str, Path]:
        return {k: p for k, p in (("ca", self.ca), ("cert", self.cert), ("key", self.key)) if p is not None}


USER_ROLES = ("viewer", "operator", "admin")   # ascending: each may do what those before it may
_TOKEN_HASH_RE = re.compile(r"(scrypt\$\d+\$\d+\$\d+|pbkdf2_sha256\$\d+)\$[A-Za-z0-9+/=_-]+\$[A-Za-z0-9+/=_-]+")
USER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def _token_hash(v: Any) -> str:
    """A stored token hash as ``fastroute user hash-token`` prints it, never a token itself."""
    if not isinstance(v, str) or not _TOKEN_HASH_RE.fullmatch(v):
        raise ValueError("expected a hash from 'fastroute user hash-token' (scrypt$N$r$p$salt$hash "
                         "or pbkdf2_sha256$iterations$salt$hash), not the token itself")
    return v


def _dn(v: Any) -> str:
    normalise_dn(_str(v))
    return str(v)


@dataclass(frozen=True, slots=True)
class HttpUserConfig:
    """One ``http.users`` entry: a role and how the user proves who they are (a bearer token,
    stored only as its salted hash, and/or a client certificate on the HTTPS listener or as
    passed on by a trusted reverse proxy)."""

    role: str = field(metadata=_key(_choice(*USER_ROLES), "a role: viewer, operator or admin"))
    token_hash: str | None = field(default=None, metadata=_key(_token_hash, "a token hash", if_null=IfNull.NONE))
    cert_subject: str | None = field(default=None, metadata=_key(
        _dn, "a distinguished name such as CN=alice,O=hospital", if_null=IfNull.NONE))
    cert_fingerprint: str | None = field(default=None, metadata=_key(
        normalise_fingerprint, "a SHA-256 fingerprint", if_null=IfNull.NONE))


def _read_users(ctx: _Ctx, node: yaml.Node, key: str) -> dict[str, Any]:
    """``users: {alice: {role: admin, token_hash: ...}, ...}``."""
    users: dict[str, HttpUserConfig] = {}
    for name, knode, vnode in _mapping(ctx, node, key):
        sub = f"{key}.{name}"
        if not USER_NAME_RE.fullmatch(name):
            raise ctx.error(knode, sub, "a user name is 1-64 letters, digits and . _ @ -")
        kw: dict[str, Any] = {}
        _read_fields(ctx, HttpUserConfig, vnode, sub, kw)
        user = HttpUserConfig(**kw)
        if user.token_hash is None and user.cert_subject is None and user.cert_fingerprint is None:
            raise ctx.error(vnode, sub, f"user {name!r} has no way to log in",
                            hint="set token_hash (fastroute user add NAME --role R prints one) "
                                 "or cert_subject / cert_fingerprint")
        users[name] = user
    return {"users": users}


@dataclass(frozen=True, slots=True)
class HttpTlsConfig:
    """``http.tls``: HTTPS for the management plane; with ``ca``, client certificates are
    asked for (and required with ``require_client_cert``) and map to users by subject or
    fingerprint. Relative paths are relative to the configuration file."""

    cert: Path = field(metadata=_key(_path, "a PEM certificate file"))
    key: Path = field(metadata=_key(_path, "a PEM private key file"))
    ca: Path | None = field(default=None, metadata=_key(_path, "a PEM CA file", if_null=IfNull.NONE))
    require_client_cert: bool = field(default=False, metadata=_BOOL)

    def files(self) -> dict[str, Path]:
        return {k: p for k, p in (("cert", self.cert), ("key", self.key), ("ca", self.ca)) if p is not None}


@dataclass(frozen=True, slots=True)
class HttpConfig:
    host: str = field(default="127.0.0.1", metadata=key(_str, "a listen address"))
    port: int = field(default=8080, metadata=_PORT)
    # deprecated: one shared token, treated as the admin user "http.token"; use users
    token: str | None = field(default=None, metadata=key(_str, "a token string"))
    users: Mapping[str, HttpUserConfig] = field(default_factory=dict, metadata=key(
        shape=Shape.CUSTOM, read=_read_users, if_null=IfNull.DEFAULT))
    # more users, in a YAML file of their own (same shape as users; read by load(), relative to
    # the configuration file): kept apart so the main file can be shared without the hashes
    users_file: Path | None = field(default=None, metadata=key(_path, "a YAML file path", if_null=IfNull.NONE))
    tls: HttpTlsConfig | None = field(default=None, metadata=key(
        shape=Shape.SECTION, section=HttpTlsConfig, if_null=IfNull.NONE))
    # reverse proxies whose identity headers are believed (every other client's are ignored)
    trusted_proxies: tuple[str, ...] = field(default=(), metadata=key(
        _cidr, "IP addresses or CIDR networks", shape=Shape.LIST, if_null=IfNull.EMPTY))
    # the header a trusted proxy names the authenticated user in (a key of users)
    proxy_user_header: str = field(default="X-Forwarded-User", metadata=key(_str, "an HTTP header name"))
    # the header a trusted proxy passes the verified client certificate's subject DN in
    proxy_cert_header: str = field(default="X-SSL-Client-S-DN", metadata=key(_str, "an HTTP header name"))


@dataclass(frozen=True, slots=True)
class StorageCommitmentConfig:
    """Storage commitment as SCP for modalities (issue 14): when an instance a modality asks
    about counts as committed, and how long it may take before it is reported failed."""

    # spooled: once in the spool; delivered: once every destination it was routed to confirmed
    # it; committed: once every destination with ``commitment`` on committed it (the others:
    # delivered)
    commit_when: str = field(default="delivered", metadata=key(
        _choice("spooled", "delivered", "committed"), "spooled, delivered or committed"))
    timeout: float = field(default=3600.0, metadata=_DURATION)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """A modality's address, for a storage commitment report on a new association (its AE
    title is its key under ``peers:``). A scu.Remote: the timeouts have defaults."""

    ae_title: str
    host: str = field(metadata=key(_str, "a host name or address"))
    port: int = field(metadata=_PORT)
    calling_ae: str | None = field(default=None, metadata=_AE)   # ours towards it (default: ae_title)
    acse_timeout: float = field(default=30.0, metadata=_DURATION)
    dimse_timeout: float = field(default=60.0, metadata=_DURATION)
    network_timeout: float = field(default=60.0, metadata=_DURATION)
    max_pdu: int = field(default=262144, metadata=_PDU)


def _read_peers(ctx: _Ctx, node: yaml.Node, key: str) -> dict[str, Any]:
    return {"peers": _read_named(
        ctx, node, key, PeerConfig, "ae_title",
        lambda name: "" if name and len(name) <= 16 and "\\" not in name else
        "a peer's key is its AE title (1-16 characters)")}


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    """Thresholds the HTTP process checks; every one is off unless configured, except
    ``certificate_expiry`` (30 days), which checks only the TLS certificates configured."""

    # seconds, for every destination (``oldest_age: {default: 1h, pacs: 10m}`` sets both fields)
    oldest_age: float | None = field(default=None, metadata=key(shape=Shape.CUSTOM, read=_read_oldest_age))
    oldest_age_for: Mapping[str, float] = field(default_factory=dict)   # per-destination overrides
    # destination-level failures in a row
    consecutive_failures: int | None = field(
        default=None, metadata=key(_int(1, 1000000), "a number of failures"))
    spool_min_free: int | None = field(default=None, metadata=_SIZE)   # bytes free on the spool's disk
    webhook: str | None = field(default=None, metadata=key(_url, "a webhook URL"))   # POSTed JSON on raise and clear
    # seconds: a configured TLS certificate with less validity left raises certificate_expiry
    # (on by default, 30 days; null turns it off)
    certificate_expiry: float | None = field(default=30 * 86400.0, metadata=key(
        parse_duration, "a duration such as 30d", if_null=IfNull.NONE))

    def oldest_age_limit(self, dest: str) -> float | None:
        return self.oldest_age_for.get(dest, self.oldest_age)


@dataclass(frozen=True, slots=True)
class Config:
    ae_title: str = field(default="FASTROUTE", metadata=_AE)
    host: str = field(default="0.0.0.0", metadata=key(_str, "a listen address"))
    # the plain DICOM port; 0: none (TLS only, ``tls:`` must be set)
    port: int = field(default=11112, metadata=key(_int(0, 65535), "a TCP port (0: no plain listener)"))
    spool: Path = field(default=Path("./fastroute-spool"), metadata=key(_path, "a folder path"))
    # LMDB map size: the spool never grows past it
    spool_max_bytes: int = field(default=64 * 1024**3, metadata=_SIZE)
    # refuse new objects below this much free disk
    min_free_bytes: int = field(default=512 * 1024**2, metadata=_SIZE)
    # room written into the spool file before the start
    spool_prealloc: int = field(default=0, metadata=_SIZE)
    # per-listener: each listener writes object bytes into a spool shard of its own
    # (fastroute.spool.shards, issue 16); off: every byte into the one shared environment
    spool_shards: str = field(default="per-listener", metadata=key(
        _choice("per-listener", "off"), "per-listener or off"))
    # AE titles; an entry may bind its AE to a client certificate (CertBinding): such an AE is
    # accepted only over TLS with a certificate that matches one of its bindings
    allowed_calling_aes: tuple[str, ...] | None = field(default=None, metadata=key(
        shape=Shape.CUSTOM, read=_read_allowed_calling_aes, if_null=IfNull.NONE))
    calling_ae_certs: Mapping[str, tuple[CertBinding, ...]] = field(default_factory=dict)
    allowed_peers: tuple[str, ...] | None = field(     # CIDRs / addresses
        default=None, metadata=key(_cidr, "IP addresses or CIDR networks", shape=Shape.LIST,
                                   if_null=IfNull.NONE))
    require_called_ae: bool = field(default=True, metadata=_BOOL)
    max_pdu: int = field(default=262144, metadata=_PDU)
    # global: across every listener process (a slot table in the spool's run/ folder)
    max_associations: int = field(default=32, metadata=key(_int(1, 10000), "a number of associations"))
    # so that one calling AE or one host cannot take every slot (issue 11 item 5)
    max_associations_per_ae: int = field(default=16, metadata=key(_int(1, 10000), "a number of associations"))
    max_associations_per_ip: int = field(default=24, metadata=key(_int(1, 10000), "a number of associations"))
    # abort an association that has sent nothing since it was accepted (network_timeout: mid-message)
    association_idle_timeout: float = field(default=30.0, metadata=_DURATION)
    # one dataset, as received or as inflated from a deflated syntax; larger is refused 0xC001
    max_object_bytes: int = field(default=4 * 1024**3, metadata=_SIZE)
    acse_timeout: float = field(default=30.0, metadata=_DURATION)
    dimse_timeout: float = field(default=120.0, metadata=_DURATION)
    network_timeout: float = field(default=120.0, metadata=_DURATION)
    listeners: int = field(default=1, metadata=key(_int(1, 256), "a number of listener processes"))
    # deprecated, as DestinationConfig.engine
    engine: str = field(default="fast", metadata=_ENGINE)
    listener_cpus: tuple[int, ...] = field(default=(), metadata=_CPUS)
    # destinations without their own `cpus` share these
    sender_cpus: tuple[int, ...] = field(default=(), metadata=_CPUS)
    # how long a commit waits to gather more objects
    group_commit_delay: float = field(default=0.002, metadata=_DURATION)
    # A dataset larger than this is streamed into the spool in chunks as it arrives instead
    # of being held in memory: a listener holds at most this much per association.
    stream_threshold: int = field(default=8 * 1024**2, metadata=_SIZE)
    # off (0) by default: a router forwards what it is sent, and a deliberate re-send ("PACS
    # lost it") must arrive. When set, identical re-sends delivered within it are not resent.
    duplicate_window: float = field(default=0.0, metadata=_DURATION)
    shutdown_grace: float = field(default=30.0, metadata=_DURATION)
    # read first, whatever its place in the file: rules, default and alerts name destinations
    destinations: Mapping[str, DestinationConfig] = field(default_factory=dict, metadata=key(
        shape=Shape.CUSTOM, read=_read_destinations, if_null=IfNull.DEFAULT, first=True))
    rules: tuple[RuleConfig, ...] = field(default=(), metadata=key(
        shape=Shape.CUSTOM, read=_read_rules, if_null=IfNull.EMPTY))
    # archives to query and retrieve from (PACS migration, `fastroute migrate`)
    sources: Mapping[str, SourceConfig] = field(default_factory=dict, metadata=key(
        shape=Shape.CUSTOM, read=_read_sources, if_null=IfNull.DEFAULT))
    default: tuple[str, ...] = field(default=(), metadata=key(
        _str, "destination names", shape=Shape.LIST, one_or_list=True, destinations=True,
        if_null=IfNull.EMPTY))
    # the DICOM TLS listener (None: none); same processes, same handlers as the plain port
    tls: TlsListenerConfig | None = field(default=None, metadata=key(
        shape=Shape.SECTION, section=TlsListenerConfig, if_null=IfNull.NONE))
    http: HttpConfig | None = field(default=None, metadata=key(shape=Shape.SECTION, section=HttpConfig))
    # storage commitment as SCP for modalities (issue 14)
    storage_commitment: StorageCommitmentConfig = field(default_factory=StorageCommitmentConfig, metadata=key(
        shape=Shape.SECTION, section=StorageCommitmentConfig, if_null=IfNull.DEFAULT))
    # modalities by AE title: where a storage commitment report goes on a new association
    peers: Mapping[str, PeerConfig] = field(default_factory=dict, metadata=key(
        shape=Shape.CUSTOM, read=_read_peers, if_null=IfNull.DEFAULT))
    alerts: AlertsConfig = field(default_factory=AlertsConfig, metadata=key(
        shape=Shape.SECTION, section=AlertsConfig, if_null=IfNull.DEFAULT))
    # prune audit events older than this (None: keep)
    audit_retention: float | None = field(default=None, metadata=_DURATION)
    # prune delivered objects' records older than this
    history_retention: float | None = field(default=None, metadata=_DURATION)
    # HMAC key of the audit chain, kept outside the spool (None: plain SHA-256)
    audit_key: str | None = field(default=None, metadata=key(
        _secret_ref, "env:NAME or file:PATH", if_null=IfNull.NONE))
    # two_person: a change to destinations (modify, deidentify included) or to a rule's modify
    # takes effect only after a second admin approves it (issue 15); off: audited, applied
    governance: str = field(default="off", metadata=key(_choice("off", "two_person"), "off or two_person"))
    log_level: str = field(default="INFO", metadata=key(_choice("DEBUG", "INFO", "WARNING", "ERROR"), "a log level"))
    log_format: str = field(default="text", metadata=key(_choice("text", "json"), "text or json"))
    source: str = "<embedded default>"      # the file it came from, for messages

    def destination(self, name: str) -> DestinationConfig:
        try:
            return self.destinations[name]
        except KeyError:
            known = ", ".join(sorted(self.destinations)) or "none configured"
            raise ConfigError(f"unknown destination {name!r} (known: {known})") from None

    def source_named(self, name: str) -> SourceConfig:
        try:
            return self.sources[name]
        except KeyError:
            known = ", ".join(sorted(self.sources)) or "none configured"
            raise ConfigError(f"unknown source {name!r} (known: {known})") from None


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
    ctx.attempt(lambda: _read_fields(ctx, Config, root, "", kw))
    ctx.errors.sort(key=lambda e: e.line or 0)   # stable: in file order, whatever order read
    if len(ctx.errors) == 1:
        raise ctx.errors[0]
    if ctx.errors:
        raise ConfigErrors(ctx.errors)
    _check_tls(kw, source)
    _check_deidentify(kw, source)
    cfg = Config(**kw)
    _check_rule_uids(cfg)
    return cfg


def load_users_file(path: Path) -> dict[str, HttpUserConfig]:
    """``http.users_file``: a mapping of user name to ``{role, token_hash | cert_subject | ...}``."""
    source = str(path)
    text = _read(path)
    ctx = _Ctx(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"not valid YAML: {getattr(exc, 'problem', exc)}", source=source,
                          line=mark.line + 1 if mark else None) from None
    if root is None:
        return {}
    done, fields = ctx.attempt(lambda: _read_users(ctx, root, "users"))
    if ctx.errors:
        if len(ctx.errors) == 1:
            raise ctx.errors[0]
        raise ConfigErrors(ctx.errors)
    users: dict[str, HttpUserConfig] = fields["users"] if done else {}
    return users


def _check_deidentify(kw: dict[str, Any], source: str) -> None:
    """A de-identified copy carries new SOP Instance UIDs (unless retain-uids), so neither a
    storage commitment nor a C-FIND verify could ever find the originals there."""
    for name, d in (kw.get("destinations") or {}).items():
        de = getattr(d, "deidentify", None)
        if de is None or "retain-uids" in de.options:
            continue
        for what, val in (("commitment", d.commitment), ("verify", d.verify)):
            if val != "off":
                raise ConfigError(f"destination {name}: {what}: {val} with deidentify (UIDs replaced): "
                                  "the destination holds other SOP Instance UIDs than the ones sent for",
                                  source=source, key=f"destinations.{name}.{what}",
                                  hint=f"set {what}: off for this destination, or add retain-uids to "
                                       "its deidentify options")


def _check_tls(kw: dict[str, Any], source: str) -> None:
    """What the ``tls`` section's keys mean together (each was valid alone)."""
    tls: TlsListenerConfig | None = kw.get("tls")
    port = kw.get("port", 11112)
    if port == 0 and tls is None:
        raise ConfigError("port 0 (no plain listener) needs a tls: listener", source=source, key="port",
                          hint="set a port, or configure tls: {cert: ..., key: ...}")
    if tls is None:
        return
    if tls.port == port:
        raise ConfigError(f"tls.port {tls.port} is the plain port too", source=source, key="tls.port")
    if tls.require_client_cert and tls.ca is None:
        raise ConfigError("require_client_cert needs a ca to verify client certificates against",
                          source=source, key="tls.ca",
                          hint="set tls.ca, or require_client_cert: false")


def _relative_to(base: Path, p: Path | None) -> Path | None:
    return p if p is None or p.is_absolute() else base / p


def resolve_peer_tls_paths(tls: TlsPeerConfig | None, base: Path) -> TlsPeerConfig | None:
    """A destination's or a source's TLS files relative to the configuration file's folder."""
    if tls is None:
        return None
    return dataclasses.replace(tls, ca=_relative_to(base, tls.ca), cert=_relative_to(base, tls.cert),
                               key=_relative_to(base, tls.key))


def resolve_tls_paths(tls: TlsListenerConfig | None, base: Path) -> TlsListenerConfig | None:
    """The listener's TLS files relative to the configuration file's folder ``base``."""
    if tls is None:
        return None
    return dataclasses.replace(tls, cert=_relative_to(base, tls.cert) or tls.cert,
                               key=_relative_to(base, tls.key) or tls.key,
                               ca=_relative_to(base, tls.ca), crl=_relative_to(base, tls.crl))


def _resolve_peers_tls(cfg: Config, base: Path) -> Config:
    """Every destination's and source's ``tls:`` files relative to the configuration file."""
    dests = {n: dataclasses.replace(d, tls=resolve_peer_tls_paths(d.tls, base)) if d.tls else d
             for n, d in cfg.destinations.items()}
    sources = {n: dataclasses.replace(s, tls=resolve_peer_tls_paths(s.tls, base)) if s.tls else s
               for n, s in cfg.sources.items()}
    return dataclasses.replace(cfg, destinations=dests, sources=sources)


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror}", source=str(p)) from None


def profile_dirs() -> list[Path]:
    """Where shipped tuning profiles are: inside the installed package (the wheel carries the
    checkout's tuning/ as ``fastroute/tuning``), then a source checkout's tuning/."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "tuning", here.parent / "tuning") if d.is_dir()]


def resolve_profile(profile: str | Path) -> Path:
    """A profile file: a path as given when it exists, else a shipped profile by its short name
    (``8-cores`` or ``8-cores.yaml``), so ``--profile 8-cores`` works after ``pip install``."""
    p = Path(profile)
    if p.is_file():
        return p
    if str(p.parent) in (".", "tuning"):   # a short name (or the documented tuning/NAME.yaml)
        name = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
        for d in profile_dirs():
            if (d / name).is_file():
                return d / name
    shipped = sorted({f.stem for d in profile_dirs() for f in d.glob("*.yaml")})
    raise ConfigError("no such tuning profile", source=str(profile),
                      hint=f"shipped profiles: {', '.join(shipped) or 'none found'}; or give a file path")


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
        profile = resolve_profile(profile)
        ptext = _read(profile)
        loads(ptext, str(profile))
        merged = {**(yaml.safe_load(ptext) or {}), **(yaml.safe_load(text) or {})}
        cfg = loads(yaml.safe_dump(merged, sort_keys=False), f"{source} + {profile}")
    if p is None:
        return cfg
    cfg = _resolve_peers_tls(cfg, p.parent)     # destinations' and sources' tls: files
    # A relative spool path is relative to the configuration file, not the working directory.
    if not cfg.spool.is_absolute():
        cfg = dataclasses.replace(cfg, spool=(p.parent / cfg.spool))
    if cfg.tls is not None:   # and so are the TLS files
        cfg = dataclasses.replace(cfg, tls=resolve_tls_paths(cfg.tls, p.parent))
    if cfg.http is not None and cfg.http.users_file is not None:
        ufile = _relative_to(p.parent, cfg.http.users_file) or cfg.http.users_file
        extra = load_users_file(ufile)
        both = sorted(set(extra) & set(cfg.http.users))
        if both:
            raise ConfigError(f"user(s) {', '.join(both)} defined both in http.users and in {ufile}",
                              source=source, key="http.users_file", hint="keep each user in one place")
        cfg = dataclasses.replace(cfg, http=dataclasses.replace(
            cfg.http, users_file=ufile, users={**cfg.http.users, **extra}))
    if cfg.http is not None and cfg.http.tls is not None:   # the HTTPS files too
        t = cfg.http.tls
        t = dataclasses.replace(t, cert=_relative_to(p.parent, t.cert) or t.cert,
                                key=_relative_to(p.parent, t.key) or t.key, ca=_relative_to(p.parent, t.ca))
        cfg = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, tls=t))
    return cfg


__all__ = [
    "Config", "CertBinding", "DestinationConfig", "TlsListenerConfig", "TlsPeerConfig", "SourceConfig", "StorageCommitmentConfig", "PeerConfig", "RuleConfig", "HttpConfig", "AlertsConfig", "load", "loads",
    "EMBEDDED_DEFAULT_YAML", "ConfigErrors", "RESERVED_DESTINATION_NAMES", "resolve_profile", "parse_size", "parse_duration", "Key", "Shape", "IfNull", "schema",
    "HttpUserConfig", "HttpTlsConfig", "USER_ROLES", "USER_NAME_RE",
]
