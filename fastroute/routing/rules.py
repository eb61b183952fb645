"""Routing rules: the ``rules:`` section as an ordered rule set, and ``route`` (the hot path).

The ``match`` language itself (both forms, its semantics and its errors) is documented and
implemented in ``fastroute.rulelang``. Each rule's match is compiled once, when its
``RuleConfig`` is made (that is, while the configuration loads, so errors carry file and line);
this module only arranges the compiled predicates. ``RuleSet.route`` then costs a few
dictionary lookups and function calls per rule, and ``RuleSet.tags`` tells the peek which
attributes to read from the encoded bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from fastroute.config import Config, RuleConfig
from fastroute.rulelang import CONTEXT_NAMES, Attrs, Context, Predicate, Value

NOT_EVALUATED = "not evaluated (stopped)"
_EMPTY: Context = {}


# -- compiled rules -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule ready to route: ``matches(attrs, context)`` is a closure tree, not an AST walk."""

    name: str
    send_to: tuple[str, ...]
    stop: bool
    tags: frozenset[int]
    matches: Predicate = field(repr=False, compare=False)
    source: str = ""             # the match as an expression, for explain output
    line: int | None = None


def compile_rule(rule: RuleConfig) -> CompiledRule:
    """The routing form of a configured rule, from the match compiled when the rule was made.

    A syntax error is raised (as RuleSyntaxError, naming the rule and its line) by the
    ``RuleConfig`` itself, so nothing here compiles again.
    """
    m = rule.matcher
    return CompiledRule(rule.name, tuple(rule.send_to), rule.stop, m.tags, m.predicate,
                        m.source, rule.line)


# -- rule sets ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one object goes. ``default_used`` with no destinations means: keep as unrouted."""

    destinations: tuple[str, ...]
    matched: tuple[str, ...]
    default_used: bool


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """One line of ``fastroute route-test``.

    ``explain`` returns one trace per rule, in order, then a final trace named ``(default)``
    whose ``matched`` says whether the default was used and whose ``decision`` is the result.
    """

    rule: str
    matched: bool | str          # True, False or NOT_EVALUATED
    send_to: tuple[str, ...]
    stop: bool = False
    source: str = ""
    line: int | None = None
    decision: RouteDecision | None = None

    def __str__(self) -> str:
        if self.decision is not None:
            d = self.decision
            where = ", ".join(d.destinations) if d.destinations else "unrouted (kept in spool)"
            how = "default" if d.default_used else "rules " + ", ".join(d.matched)
            return f"=> {where} (by {how})"
        mark = "MATCH" if self.matched is True else "no" if self.matched is False else self.matched
        return f"{self.rule}: {mark} [{self.source}] -> {', '.join(self.send_to) or '-'}" + (
            " (stop)" if self.stop else "")


_DEFAULT_TRACE = "(default)"


class RuleSet:
    """The configured rules in order, plus the default; ``route`` is the hot path."""

    __slots__ = ("rules", "default", "tags", "_plan", "_decisions")

    def __init__(self, rules: Sequence[CompiledRule], default: Sequence[str] = ()) -> None:
        self.rules = tuple(rules)
        self.default = tuple(default)
        self.tags: tuple[int, ...] = tuple(sorted({t for r in self.rules for t in r.tags}))
        self._plan = tuple((r.matches, r.stop) for r in self.rules)
        # Decisions depend only on which rules matched, so they are built once per combination.
        self._decisions: dict[tuple[int, ...], RouteDecision] = {}

    @classmethod
    def from_config(cls, cfg: Config) -> RuleSet:
        return cls([compile_rule(r) for r in cfg.rules], cfg.default)

    def route(self, attrs: Attrs, context: Context = _EMPTY) -> RouteDecision:
        hits = []
        i = 0
        for pred, stop in self._plan:
            if pred(attrs, context):
                hits.append(i)
                if stop:
                    break
            i += 1
        key = tuple(hits)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(key)
            if len(self._decisions) < 4096:
                self._decisions[key] = decision
        return decision

    def _decide(self, hits: tuple[int, ...]) -> RouteDecision:
        if not hits:
            return RouteDecision(self.default, (), True)
        dests: dict[str, None] = {}
        for i in hits:
            dests.update(dict.fromkeys(self.rules[i].send_to))
        return RouteDecision(tuple(dests), tuple(self.rules[i].name for i in hits), False)

    def explain(self, attrs: Attrs, context: Context = _EMPTY) -> list[RuleTrace]:
        traces, hits, stopped = [], [], False
        for i, r in enumerate(self.rules):
            matched: bool | str = NOT_EVALUATED if stopped else bool(r.matches(attrs, context))
            traces.append(RuleTrace(r.name, matched, r.send_to, r.stop, r.source, r.line))
            if matched is True:
                hits.append(i)
                stopped = r.stop
        decision = self._decide(tuple(hits))
        traces.append(RuleTrace(_DEFAULT_TRACE, decision.default_used, self.default,
                                decision=decision))
        return traces


__all__ = [
    "CompiledRule", "RuleSet", "RouteDecision", "RuleTrace", "compile_rule", "NOT_EVALUATED",
    "CONTEXT_NAMES", "Attrs", "Context", "Value",
]

