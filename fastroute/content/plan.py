"""Per destination, the content changes an object gets on its way out (issue 15). Contract skeleton.

Built once per sender process from the configuration: the ``modify`` of every rule that sends to
the destination (applied when that rule routed the object there, in rule order), then the
destination's own ``modify``, then its ``deidentify``. A destination with none of these has no
plan (``build`` returns None) and its objects go out zero-copy as before.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from fastroute.config import Config
from fastroute.content.changes import Applied


class ContentPlan:
    """What one destination's sender changes; ``apply`` parses and re-encodes only when a step
    applies to the object (by its rules), never otherwise."""

    destination: str
    needs_rules: bool          # some step depends on which rules routed the object

    @staticmethod
    def build(cfg: Config, destination: str) -> ContentPlan | None:
        raise NotImplementedError

    def applies(self, rules: Sequence[str]) -> bool:
        """Whether any step may change an object these rules routed here (no parsing)."""
        raise NotImplementedError

    def apply(self, data: bytes | memoryview, transfer_syntax: str, rules: Sequence[str],
              context: Mapping[str, str]) -> Applied | None:
        """The changed object re-encoded in ``transfer_syntax``, or a quarantine; None when
        nothing changed (send the original bytes)."""
        raise NotImplementedError

    def reload(self) -> None:
        """SIGHUP: lookup tables read again."""


def preview(cfg: Config, data: bytes | memoryview, transfer_syntax: str, rules: Sequence[str],
            context: Mapping[str, str], destinations: Sequence[str]) -> dict[str, Applied | None]:
    """For ``route-test --diff`` and the API: per destination, what its plan would do
    (None: sent unchanged). Never writes anything."""
    raise NotImplementedError
