"""Per destination, the content changes an object gets on its way out (issue 15).

Built once per sender process from the configuration: the ``modify`` of every rule that sends to
the destination (applied when that rule routed the object there, in rule order), then the
destination's own ``modify``, then its ``deidentify``. A destination with none of these has no
plan (``build`` returns None) and its objects go out zero-copy as before.

``apply`` parses the stored bytes once (pydicom, no file meta, in the object's own transfer
syntax; pixel data stays raw and encapsulated pixel data is kept as it is), runs the steps, and
re-encodes once in the same syntax only when a step changed something: the syntax planner then
chooses (and transcodes) on the new bytes as it would on the original. The re-encoded object
has no group length elements (gggg,0000): pydicom's writer drops them (retired, and they would
be wrong after a change); every other element the steps did not name keeps its value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fastroute.config import Config
from fastroute.content.changes import Applied, Change
from fastroute.content.deidentify import deidentifier_for
from fastroute.content.modify import Modifier
from fastroute.routing.transcode import DEFLATED, _deflate, _inflate, _parse, _write

_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"


@dataclass(slots=True)
class _Step:
    rule: str | None          # applied only when this rule routed the object; None: always
    modifier: Modifier


class ContentPlan:
    """What one destination's sender changes; ``apply`` parses and re-encodes only when a step
    applies to the object (by its rules), never otherwise."""

    destination: str
    needs_rules: bool          # some step depends on which rules routed the object
    needs_context: bool        # some ``when`` reads called_ae/peer_ip (the routing record's)

    def __init__(self, destination: str, steps: Sequence[_Step], deidentifier: Any = None) -> None:
        self.destination = destination
        self.steps = tuple(steps)
        self.deidentifier = deidentifier      # fastroute.content.deidentify.Deidentifier or None
        self.needs_rules = any(s.rule is not None for s in self.steps)
        self.needs_context = any(s.modifier.uses_context for s in self.steps)
        self.has_lookups = any(s.modifier.has_lookups for s in self.steps)

    @staticmethod
    def build(cfg: Config, destination: str) -> ContentPlan | None:
        """The destination's plan, or None when nothing may change its objects. Raises
        ConfigError (from the de-identification key) when its key cannot be read."""
        dest = cfg.destinations.get(destination)
        steps = [_Step(rule.name, Modifier(rule.modify, f"rule:{rule.name}"))
                 for rule in cfg.rules if rule.modify and destination in rule.send_to]
        if dest is not None and dest.modify:
            steps.append(_Step(None, Modifier(dest.modify, f"destination:{destination}")))
        deid = None
        if dest is not None and dest.deidentify is not None:
            deid = deidentifier_for(dest.deidentify)
        if not steps and deid is None:
            return None
        return ContentPlan(destination, steps, deid)

    def applies(self, rules: Sequence[str]) -> bool:
        """Whether any step may change an object these rules routed here (no parsing)."""
        return self.deidentifier is not None or any(
            s.rule is None or s.rule in rules for s in self.steps)

    def apply(self, data: bytes | memoryview, transfer_syntax: str, rules: Sequence[str],
              context: Mapping[str, str]) -> Applied | None:
        """The changed object re-encoded in ``transfer_syntax``, or a quarantine; None when
        nothing changed (send the original bytes). Raises ModifyError (the object must not go
        out: a lookup ``on_missing: fail``) and TranscodeError (bytes that do not parse)."""
        if not self.applies(rules):
            return None
        deflated = transfer_syntax == DEFLATED
        ds = _parse(_inflate(data) if deflated else data, transfer_syntax)
        original_uid = str(ds.get("SOPInstanceUID", ""))
        changes: list[Change] = []
        by: list[str] = []
        for step in self.steps:
            if step.rule is not None and step.rule not in rules:
                continue
            made = step.modifier.apply(ds, context)
            if made:
                changes += made
                by.append(step.modifier.by)
        if self.deidentifier is not None:
            made, quarantine = self.deidentifier.apply(ds)
            if made or quarantine:
                changes += made
                by.append(self.deidentifier.by)
            if quarantine:
                return Applied(b"", original_uid, changes, by, quarantine=quarantine)
        if not changes:
            return None
        implicit, little = transfer_syntax == _IMPLICIT, transfer_syntax != _BIG_ENDIAN
        out = _write(ds, implicit=implicit and not deflated, little=little)
        return Applied(_deflate(out) if deflated else out, str(ds.get("SOPInstanceUID", original_uid)),
                       changes, by)

    def reload(self) -> None:
        """SIGHUP: lookup tables read again (a bad file keeps the old table, logged)."""
        for step in self.steps:
            step.modifier.reload()


def preview(cfg: Config, data: bytes | memoryview, transfer_syntax: str, rules: Sequence[str],
            context: Mapping[str, str], destinations: Sequence[str]) -> dict[str, Applied | None]:
    """For ``route-test --diff`` and the API: per destination, what its plan would do
    (None: sent unchanged). Never writes anything. A ModifyError propagates (the object would
    fail there)."""
    out: dict[str, Applied | None] = {}
    for name in destinations:
        plan = ContentPlan.build(cfg, name)
        out[name] = None if plan is None else plan.apply(data, transfer_syntax, rules, context)
    return out


__all__ = ["ContentPlan", "preview"]
