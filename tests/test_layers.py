"""The package's layering, read from the source: no import cycles, no import from a lower layer
into a higher one, the management plane off the data path, pynetdicom out of the HTTP process.

The imports are read with ``ast`` (no new dependency): every ``import`` and ``from ... import``
anywhere in a module (a function-local import is still a dependency; it only hides a cycle from
the interpreter), and, in a module that calls ``importlib.import_module``, every string that
spells a package module's dotted name. The rules are the tables below; change them there, on
purpose, when the design changes.
"""
from __future__ import annotations

import ast
import fnmatch
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "fastroute"

# Low to high. A module may import its own layer and the layers below; every module must match
# exactly one layer (fnmatch patterns), so a new module is placed here on purpose.
# The rule expression language sits BELOW config: config compiles each rule with it while
# loading, so expression errors carry the file and line (and the compiled form stays with the
# Config); it needs nothing from config.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fastroute", "fastroute.errors", "fastroute.logsetup", "fastroute.pids"),
    ("fastroute.rulelang",),
    # issue 15: the content engines (modify, deidentify, their table and records) sit below
    # config, which parses their sections with them; the per-destination plan reads a Config.
    ("fastroute.content", "fastroute.content.changes", "fastroute.content.table",
     "fastroute.content.deidentify", "fastroute.content.modify", "fastroute.content.profiles"),
    # (the per-destination plan runs them in the sender with transcode's parse/write: routing's)
    ("fastroute.config",),
    # what a reload may change without a second admin (issue 15): reads config only; the
    # supervisor and the management plane both ask it
    ("fastroute.governance",),
    # native.py picks the native or Python twin of each accelerated module; all of them are
    # dicom/'s (the peek and its structure check), so it sits in that layer.
    ("fastroute.dicom", "fastroute.dicom.*", "fastroute.native"),   # never imports spool/ or routing/: the
    ("fastroute.spool", "fastroute.spool.*"),        # listener is handed its handlers
    ("fastroute.routing", "fastroute.routing.*", "fastroute.content.plan"),
    # PACS migration (issue 13): query/retrieve jobs run on top of the router's data path.
    ("fastroute.migration", "fastroute.migration.*"),
    # The management plane, beside the data plane: above it so that nothing in the data plane
    # imports it, and restricted below (FORBIDDEN) to what it may read.
    ("fastroute.ops", "fastroute.ops.*"),
    ("fastroute.reload",),                            # what a reload restarts (reads config only)
    ("fastroute.workers",),                           # wires both planes into processes
    ("fastroute.cli", "fastroute.__main__"),
)

# Imports that the layer order allows but that are still wrong: importer pattern -> imported
# patterns. ops/ may use config, errors, the spool's store and records, dicom.status and
# routing.rules, but not the data path: it would pull pynetdicom and the engines into the
# HTTP process and couple operator views to the senders' internals.
FORBIDDEN: Mapping[str, tuple[str, ...]] = {
    "fastroute.ops*": (
        "fastroute.dicom.scp", "fastroute.dicom.scu",
        "fastroute.routing.schedule", "fastroute.spool.commit", "fastroute.workers",
        "fastroute.dicom.qr", "fastroute.migration.*",
    ),
}

# Violations present when this test was written, each being removed on another branch of
# issue 10. Delete an entry when its fix merges: the test fails while a listed edge is gone,
# so this list can only shrink, and any new violation fails at once.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset({
})
KNOWN_CYCLES: frozenset[frozenset[str]] = frozenset({
})

# What the HTTP process imports (``fastroute.ops.api`` serves the dashboard, API and metrics).
HTTP_PROCESS_MODULES = ("fastroute.ops.api", "fastroute.ops.metrics", "fastroute.ops.actions")


# -- reading the imports ------------------------------------------------------------------------

_DOTTED = re.compile(rf"{PACKAGE}(\.[A-Za-z_][A-Za-z0-9_]*)+")


def modules(root: Path = REPO) -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, source: str, known: Iterable[str], is_package: bool = False) -> set[str]:
    """The package modules ``name`` imports; ``from pkg import sub`` counts as ``pkg.sub``."""
    known = set(known)
    found: set[str] = set()
    spelled: set[str] = set()
    by_name = False
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[:len(here) - node.level + 1]
                base = ".".join([*here, base] if base else here)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Call) and "import_module" in (
                getattr(node.func, "attr", None), getattr(node.func, "id", None)):
            by_name = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
            spelled.add(node.value)
    if by_name:          # a module that imports by name depends on the module names it spells
        found |= spelled
    return {m for m in found if (m == PACKAGE or m.startswith(PACKAGE + ".")) and m != name}


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports_of(name, path.read_text(encoding="utf-8"), mods, path.name == "__init__.py")
            for name, path in mods.items()}


# -- the rules ----------------------------------------------------------------------------------

def layer_of(module: str, layers: tuple[tuple[str, ...], ...] = LAYERS) -> int:
    hits = [i for i, patterns in enumerate(layers) if any(fnmatch.fnmatchcase(module, p) for p in patterns)]
    if len(hits) != 1:
        raise LookupError(f"{module} matches {len(hits)} layers in LAYERS (expected exactly one)")
    return hits[0]


@dataclass(frozen=True, slots=True)
class Violation:
    importer: str
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported}: {self.why}"


def violations(graph: Mapping[str, Iterable[str]], layers: tuple[tuple[str, ...], ...] = LAYERS,
               forbidden: Mapping[str, tuple[str, ...]] = FORBIDDEN) -> list[Violation]:
    out = []
    for importer, targets in sorted(graph.items()):
        for imported in sorted(targets):
            low, high = layer_of(importer, layers), layer_of(imported, layers)
            if high > low:
                out.append(Violation(importer, imported,
                                     f"layer {low} {layers[low][0]} imports layer {high} {layers[high][0]}"))
                continue
            for who, banned in forbidden.items():
                if fnmatch.fnmatchcase(importer, who) and any(fnmatch.fnmatchcase(imported, b) for b in banned):
                    out.append(Violation(importer, imported, f"FORBIDDEN[{who!r}]"))
                    break
    return out


def cycles(graph: Mapping[str, Iterable[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    scc.add(member)
                    if member == node:
                        break
                if len(scc) > 1:
                    found.append(frozenset(scc))
    return found


# -- the checks on fastroute --------------------------------------------------------------------

GRAPH = import_graph()


def test_the_reader_sees_the_imports() -> None:
    """Guards against a check that passes because it read nothing."""
    assert {"fastroute.config", "fastroute.routing.rules", "fastroute.ops.api"} <= set(GRAPH)
    assert "fastroute.errors" in GRAPH["fastroute.config"]
    assert "fastroute.config" in GRAPH["fastroute.routing.rules"]
    assert "fastroute.spool.store" in GRAPH["fastroute.spool"]            # a package __init__
    assert "fastroute.dicom.peek" in GRAPH["fastroute.native"]            # importlib, by name


def test_every_module_is_in_exactly_one_layer() -> None:
    for module in GRAPH:
        layer_of(module)


def test_no_import_cycles() -> None:
    found = set(cycles(GRAPH))
    new = sorted(sorted(c) for c in found - KNOWN_CYCLES)
    assert not new, f"import cycles: {new}"
    gone = sorted(sorted(c) for c in KNOWN_CYCLES - found)
    assert not gone, f"fixed, delete from KNOWN_CYCLES: {gone}"


def test_config_and_rules_are_not_a_cycle() -> None:
    """The cycle this branch broke: config validates with rulelang, rules depend on config."""
    assert "fastroute.config" in GRAPH["fastroute.routing.rules"]
    assert not GRAPH["fastroute.config"] & {"fastroute.routing", "fastroute.routing.rules"}
    assert GRAPH["fastroute.rulelang"] == set()


def test_no_lower_layer_imports_a_higher_one_and_ops_stays_off_the_data_path() -> None:
    found = violations(GRAPH)
    new = [str(v) for v in found if (v.importer, v.imported) not in KNOWN_VIOLATIONS]
    assert not new, "layering violations:\n  " + "\n  ".join(new)
    gone = sorted(KNOWN_VIOLATIONS - {(v.importer, v.imported) for v in found})
    assert not gone, f"fixed, delete from KNOWN_VIOLATIONS: {gone}"


# The probe records who imported pynetdicom first, so a failure names the chain to cut.
_PROBE = textwrap.dedent("""\
    import importlib.abc, sys, traceback
    chain = []
    class Spy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "pynetdicom" and not chain:
                chain.extend(f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()
                             if "fastroute" in f.filename)
            return None
    sys.meta_path.insert(0, Spy())
    for m in sys.argv[1:]:
        __import__(m)
    print("pynetdicom" in sys.modules, " <- ".join(reversed(chain)))
    """)


def test_the_http_process_does_not_import_pynetdicom() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _PROBE, *HTTP_PROCESS_MODULES], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded, _, chain = res.stdout.strip().partition(" ")
    assert loaded == "False", f"pynetdicom imported via {chain}"


# -- the checker itself, on made-up graphs ------------------------------------------------------

TOY_LAYERS = (("app.low",), ("app.mid", "app.mid.*"), ("app.ops",), ("app.top",))


def test_checker_finds_an_upward_import_and_a_forbidden_one() -> None:
    graph = {"app.low": {"app.mid.x"}, "app.mid.x": {"app.low"}, "app.ops": {"app.mid.engine"},
             "app.top": {"app.ops", "app.low"}, "app.mid.engine": set()}
    found = violations(graph, TOY_LAYERS, {"app.ops": ("app.mid.engine",)})
    assert [(v.importer, v.imported) for v in found] == [("app.low", "app.mid.x"),
                                                         ("app.ops", "app.mid.engine")]
    assert "layer 0 app.low imports layer 1 app.mid" in str(found[0])


def test_checker_finds_cycles_and_not_chains() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": set(), "f": {"f"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_reader_resolves_relative_and_submodule_imports() -> None:
    known = {"fastroute", "fastroute.dicom", "fastroute.dicom.scp", "fastroute.dicom.pdu", "fastroute.errors"}
    src = textwrap.dedent("""\
        from . import pdu
        from ..errors import PeekError
        from fastroute.dicom import scp, something
        def later():
            import fastroute.errors
        """)
    assert imports_of("fastroute.dicom.peek", src, known) == {
        "fastroute.dicom.pdu", "fastroute.errors", "fastroute.dicom.scp", "fastroute.dicom"}


def test_unplaced_module_is_an_error() -> None:
    with pytest.raises(LookupError, match="matches 0 layers"):
        layer_of("fastroute.newthing")
