"""Configuration: the issue's schema is accepted; every error names file, line and key."""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import fastroute.config
from fastroute.config import (
    EMBEDDED_DEFAULT_YAML, AlertsConfig, Config, DestinationConfig, HttpConfig, Key, RuleConfig,
    Shape, TlsListenerConfig, TlsPeerConfig, load, loads, parse_duration, parse_size, schema, warn_deprecated_engine,
)
from fastroute.errors import ConfigError
from fastroute.routing.rules import RuleSet
from fastroute.workers import sender_cpus

ISSUE_SCHEMA = """\
ae_title: FASTROUTE
port: 11112
spool: ./spool
allowed_calling_aes: [CT1, MR1]
destinations:
  pacs:  {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
  vna:   {ae_title: VNA, host: 10.0.0.5, port: 104, max_associations: 4,
          transfer_syntaxes: [1.2.840.10008.1.2.1]}
rules:
  - name: ct-to-pacs-and-vna
    match: {Modality: CT, calling_ae: CT1}
    send_to: [pacs, vna]
  - name: mr
    match: 'Modality == "MR" and StudyDescription matches "*BRAIN*"'
    send_to: [vna]
default: []
"""


def test_issue_schema_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "router.yaml"
    f.write_text(ISSUE_SCHEMA)
    cfg = load(f)
    assert cfg.allowed_calling_aes == ("CT1", "MR1")
    assert cfg.destinations["vna"].max_associations == 4
    assert cfg.destinations["vna"].transfer_syntaxes == ("1.2.840.10008.1.2.1",)
    assert [r.name for r in cfg.rules] == ["ct-to-pacs-and-vna", "mr"]
    assert cfg.spool == tmp_path / "spool"      # relative to the file, not the cwd


def test_embedded_default() -> None:
    cfg = loads(EMBEDDED_DEFAULT_YAML)
    assert (cfg.ae_title, cfg.port, cfg.destinations, cfg.default) == ("FASTROUTE", 11112, {}, ())
    assert load(None).ae_title == "FASTROUTE"
    assert cfg.engine == "fast"   # the native data path unless a file says otherwise


def test_engine_pynetdicom_is_deprecated_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """Old configs still load; the key selects nothing (one engine) and the processes that
    used to read it say so, naming the key."""
    from fastroute.dicom.scu import Connection
    from fastroute.routing.schedule import make_connection

    cfg = loads("engine: pynetdicom\ndestinations:\n  a: {ae_title: A, host: h, port: 1}\n"
                "  b: {ae_title: B, host: h, port: 1, engine: pynetdicom}\n")
    assert cfg.engine == "pynetdicom"
    assert (cfg.destinations["a"].engine, cfg.destinations["b"].engine) == ("fast", "pynetdicom")
    caplog.set_level(logging.WARNING, logger="fastroute.config")
    conns = [make_connection(cfg.destinations[name], cfg.ae_title) for name in ("a", "b", "b")]
    assert all(type(c) is Connection for c in conns)
    warn_deprecated_engine("engine", cfg.engine)
    assert [r.getMessage() for r in caplog.records] == [
        "config key destinations.b.engine: pynetdicom is deprecated and ignored: fastroute has one "
        "DICOM engine, its own, and uses it; remove the key",
        "config key engine: pynetdicom is deprecated and ignored: fastroute has one DICOM engine, "
        "its own, and uses it; remove the key"]


@pytest.mark.parametrize("text,line,key,fragment", [
    ("port: 70000\n", 1, "port", "between 0 and 65535"),
    ("ae_title: FASTROUTE\nprot: 11112\n", 2, "prot", "unknown key"),
    ("destinations:\n  pacs: {ae_title: X, host: h}\n", 2, "destinations.pacs", "missing required key 'port'"),
    ("destinations:\n  pacs: {ae_title: X, host: h, port: 1}\nrules:\n  - send_to: [nowhere]\n",
     4, "rules[0].send_to", "unknown destination 'nowhere'"),
    ("destinations:\n  p: {ae_title: X, host: h, port: 1}\nrules:\n  - name: r\n    match: 'Modalty == \"CT\"'\n"
     "    send_to: [p]\n", 5, "rules[0].match", "Modality"),
    ("destinations:\n  p: {ae_title: 'WAY_TOO_LONG_AE_TITLE', host: h, port: 1}\n", 2,
     "destinations.p.ae_title", "AE title"),
    ("spool_max_bytes: lots\n", 1, "spool_max_bytes", "size"),
    ("destinations:\n  p: {ae_title: X, host: h, port: 1, compress: j2k}\n", 2, "destinations.p.compress",
     "allow_lossy"),
    ("engine: dcmtk\n", 1, "engine", "fast, pynetdicom"),
    ("destinations:\n  p: {ae_title: X, host: h, port: 1, engine: twisted}\n", 2, "destinations.p.engine",
     "fast, pynetdicom"),
])
def test_errors_name_line_and_key(text: str, line: int, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text, "router.yaml")
    err = info.value
    assert err.line == line and err.key == key, str(err)
    assert fragment in str(err)
    assert str(err).startswith(f"router.yaml:{line}: {key}: ")


def test_not_yaml_names_the_line() -> None:
    with pytest.raises(ConfigError) as info:
        loads("port: 1\nrules: [\n", "x.yaml")
    assert "not valid YAML" in str(info.value) and info.value.line is not None


def test_sizes_and_durations() -> None:
    assert parse_size("512MiB") == 512 * 1024**2 and parse_size("10GB") == 10 * 1000**3
    assert parse_duration("5m") == 300 and parse_duration("250ms") == 0.25 and parse_duration(3) == 3.0
    for bad in ("-1", "5 parsecs", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_profile_supplies_defaults_and_the_file_wins(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("listeners: 4\nlistener_cpus: [0, 1, 2, 3]\nsender_cpus: [4, 5]\nport: 9999\n")
    f = tmp_path / "router.yaml"
    f.write_text(ISSUE_SCHEMA)
    cfg = load(f, profile)
    assert cfg.listeners == 4 and cfg.port == 11112      # the file's own port wins
    assert sender_cpus(cfg, "pacs") == (4,) and sender_cpus(cfg, "vna") == (5,)
    profile.write_text("listeners: 0\n")
    with pytest.raises(ConfigError) as info:
        load(f, profile)
    assert str(profile) in str(info.value) and info.value.line == 1


@pytest.mark.parametrize("profile", sorted((Path(__file__).resolve().parent.parent / "tuning").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_tuning_profiles_validate(tmp_path: Path, profile: Path) -> None:
    f = tmp_path / "router.yaml"
    f.write_text(ISSUE_SCHEMA)
    cfg = load(f, profile)
    assert cfg.listeners >= 1 and cfg.max_pdu > 0
    if profile.name != "2-cores.yaml":          # a dedicated spool disk: written ahead
        assert cfg.spool_prealloc >= 1024**3


# -- the schema is the dataclass fields -----------------------------------------------------------

# Fields that are filled in by the loader, not written as keys.
NOT_KEYS = {DestinationConfig: {"name"}, RuleConfig: {"line", "matcher"},
            AlertsConfig: {"oldest_age_for"}, HttpConfig: set(), Config: {"source", "calling_ae_certs"},
            TlsListenerConfig: set(), TlsPeerConfig: set()}


@pytest.mark.parametrize("cls", list(NOT_KEYS), ids=lambda c: c.__name__)
def test_every_field_is_a_key_or_named_as_not_one(cls: type) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    assert set(schema(cls)) == names - NOT_KEYS[cls]
    for name, spec in schema(cls).items():
        assert isinstance(spec, Key)
        if spec.shape in (Shape.SCALAR, Shape.LIST):
            assert spec.conv is not None and spec.what, name      # errors can say what is expected


@pytest.mark.parametrize("text,key,valid", [
    ("prot: 1\n", "prot", Config),
    ("destinations:\n  p: {ae_title: X, host: h, port: 1, colour: red}\n", "destinations.p.colour",
     DestinationConfig),
    ("destinations:\n  p: {ae_title: X, host: h, port: 1}\nrules:\n  - {send_to: p, stpo: true}\n",
     "rules[0].stpo", RuleConfig),
    ("http: {prot: 1}\n", "http.prot", HttpConfig),
    ("alerts: {webhok: 'http://x/'}\n", "alerts.webhok", AlertsConfig),
])
def test_unknown_key_hint_lists_the_fields(text: str, key: str, valid: type) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text, "r.yaml")
    assert info.value.key == key and "unknown key" in str(info.value)
    assert info.value.hint.endswith("valid keys: " + ", ".join(sorted(schema(valid))))


@pytest.mark.parametrize("text,suggestion", [
    ("prot: 1\n", "did you mean 'port'?"),
    ("destinations:\n  p: {aetitle: X, host: h, port: 1}\n", "did you mean 'ae_title'?"),
    ("destinations:\n  p: {ae_title: X, host: h, port: 1}\nrules:\n  - {send_to: p, stpo: true}\n",
     "did you mean 'stop'?"),
    ("alerts: {webhok: 'http://x/'}\n", "did you mean 'webhook'?"),
    ("Listeners: 2\n", "did you mean 'listeners'?"),
])
def test_unknown_key_did_you_mean(text: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text, "r.yaml")
    assert info.value.hint.startswith(suggestion), info.value.hint


def test_no_suggestion_for_a_key_like_none() -> None:
    with pytest.raises(ConfigError) as info:
        loads("colour: blue\n", "r.yaml")
    assert info.value.hint.startswith("valid keys: ")


def test_defaults_are_the_dataclass_defaults() -> None:
    """An empty mapping loads as the dataclass defaults: no second copy of them in the loader."""
    assert loads("{}\n", "x.yaml") == Config(source="x.yaml")
    cfg = loads("destinations:\n  p: {ae_title: X, host: h, port: 1}\nhttp: {}\n")
    assert cfg.destinations["p"] == DestinationConfig("p", "X", "h", 1)
    assert cfg.http == HttpConfig() and cfg.alerts == AlertsConfig()


def test_null_values_mean_what_they_meant() -> None:
    cfg = loads("destinations:\nrules:\ndefault:\nalerts:\nallowed_calling_aes:\nallowed_peers:\n")
    assert (cfg.destinations, cfg.rules, cfg.default, cfg.alerts) == ({}, (), (), AlertsConfig())
    assert cfg.allowed_calling_aes is None and cfg.allowed_peers is None
    for text, key in (("http:\n", "http"), ("listener_cpus:\n", "listener_cpus"), ("port:\n", "port")):
        with pytest.raises(ConfigError) as info:
            loads(text, "r.yaml")
        assert info.value.key == key and "None" in str(info.value)


def test_destinations_are_read_first_wherever_they_are() -> None:
    cfg = loads("rules:\n  - {name: a, send_to: p}\ndefault: p\nalerts: {oldest_age: {p: 5m}}\n"
                "destinations:\n  p: {ae_title: X, host: h, port: 1}\n")
    assert cfg.rules[0].send_to == ("p",) and cfg.default == ("p",)
    assert cfg.alerts.oldest_age_limit("p") == 300.0 and cfg.alerts.oldest_age_limit("q") is None


# -- rules are compiled once, at load -----------------------------------------------------------

def test_rules_are_compiled_once_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = fastroute.config.compile_match

    def counting(match: Any) -> Any:
        calls.append(match)
        return real(match)
    monkeypatch.setattr(fastroute.config, "compile_match", counting)
    monkeypatch.setattr("fastroute.rulelang.compile_match", counting)
    cfg = loads(ISSUE_SCHEMA)
    assert len(calls) == 2
    rs = RuleSet.from_config(cfg)                     # the listeners' and route-test's path
    from fastroute.ops.actions import parse_config    # the API's validate path
    parse_config(ISSUE_SCHEMA, "<posted>")
    assert len(calls) == 4, "RuleSet.from_config compiled again"
    assert rs.rules[0].matches is cfg.rules[0].matcher.predicate
    replaced = dataclasses.replace(cfg.rules[1], match='Modality == "CT"')   # a new match compiles
    assert len(calls) == 5 and replaced.matcher.source == 'Modality == "CT"'


def test_a_rule_built_in_code_compiles_when_made() -> None:
    rule = RuleConfig("r", {"Modality": "CT"}, ("a",))
    assert rule.matcher.source == 'Modality == "CT"'
    assert rule.matcher.predicate({0x00080060: "CT"}, {}) is True


def _route_in_child(cfg: Config, attrs: dict[int, Any], context: dict[str, str]) -> tuple[Any, ...]:
    rs = RuleSet.from_config(cfg)
    return rs.route(attrs, context).destinations, rs.tags


def test_config_pickles_with_its_compiled_rules() -> None:
    cfg = loads(ISSUE_SCHEMA)
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg
    assert again.rules[1].matcher.predicate is not cfg.rules[1].matcher.predicate   # compiled anew
    mr = {0x00080060: "MR", 0x00081030: "HEAD BRAIN"}
    assert RuleSet.from_config(again).route(mr, {}).destinations == ("vna",)


def test_config_reaches_a_spawned_process_and_routes_there() -> None:
    """The supervisor spawns its children with the Config as an argument, as done here."""
    cfg = loads(ISSUE_SCHEMA)
    ct = {0x00080060: "CT"}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        dests, tags = pool.submit(_route_in_child, cfg, ct, {"calling_ae": "CT1"}).result(timeout=120)
    assert dests == ("pacs", "vna")
    assert tags == RuleSet.from_config(cfg).tags


def test_every_independent_error_is_reported_in_file_order() -> None:
    from fastroute.config import ConfigErrors
    from fastroute.ops.actions import validate_config
    text = ("port: 70000\n"
            "destinations:\n"
            "  unrouted: {ae_title: U, host: h, port: 1}\n"
            "  pacs: {ae_title: P, host: h, port: 1, max_asociations: 2}\n"
            "rules:\n"
            "  - {name: a, match: 'Modalty == \"CT\"', send_to: [pacs]}\n"
            "  - {name: b, send_to: [unrouted]}\n"
            "  - {name: c, send_to: [ris]}\n"
            "listeners: 0\n")
    with pytest.raises(ConfigErrors) as info:
        loads(text, "r.yaml")
    got = [(e.line, e.key) for e in info.value.errors]
    assert got == [(1, "port"), (3, "destinations.unrouted"), (4, "destinations.pacs.max_asociations"),
                   (6, "rules[0].match"), (8, "rules[2].send_to"), (9, "listeners")]
    assert (info.value.line, info.value.key) == (1, "port")      # the first stands for the whole
    hints = [e.hint for e in info.value.errors]
    assert "did you mean 'max_associations'" in hints[2] and "Modality" in hints[3]
    assert "between 1 and 256" in str(info.value.errors[5]) and "pacs, unrouted" in hints[4]
    view = validate_config(text, "r.yaml")
    assert not view["valid"] and [(e["line"], e["key"]) for e in view["errors"]] == got


def test_one_error_keeps_its_own_type() -> None:
    from fastroute.config import ConfigErrors
    from fastroute.errors import RuleSyntaxError
    with pytest.raises(RuleSyntaxError) as info:
        loads("rules:\n  - {name: a, match: 'Modalty == \"CT\"', send_to: []}\n", "r.yaml")
    assert not isinstance(info.value, ConfigErrors) and info.value.line == 2


@pytest.mark.parametrize("name", ["unrouted", "UNROUTED", "default"])
def test_reserved_destination_names(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(f"destinations:\n  {name}: {{ae_title: X, host: h, port: 1}}\n", "r.yaml")
    assert (info.value.line, info.value.key) == (2, f"destinations.{name}") and "reserved" in str(info.value)


def test_profile_by_short_name(tmp_path: Path) -> None:
    from fastroute.config import resolve_profile
    f = tmp_path / "router.yaml"
    f.write_text(ISSUE_SCHEMA)
    for short in ("8-cores", "8-cores.yaml", "tuning/8-cores.yaml"):
        assert resolve_profile(short).name == "8-cores.yaml"
        cfg = load(f, short)
        assert cfg.listeners == 4 and cfg.sender_cpus == (4, 5, 6, 7)
    own = tmp_path / "mine.yaml"
    own.write_text("listeners: 3\n")
    assert load(f, own).listeners == 3            # a path still wins
    with pytest.raises(ConfigError) as info:
        load(f, "7-cores")
    assert "no such tuning profile" in str(info.value) and "8-cores" in info.value.hint
