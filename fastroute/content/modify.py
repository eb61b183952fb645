"""``modify:`` actions (issue 15). Contract skeleton: the implementation replaces the bodies."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydicom.dataset import Dataset

from fastroute.content.changes import Change


@dataclass(frozen=True, slots=True)
class ModifyAction:
    """One entry of a ``modify:`` list, parsed and checked at load time."""

    op: str                                   # set | delete | copy | regex | lookup
    spec: Any                                 # the op's parsed arguments (see parse_modify)
    when: str | None = None                   # rules expression; None: always
    record_original: bool = False             # old values into Original Attributes Sequence


def parse_modify(value: Any, base_dir: Path | None) -> tuple[ModifyAction, ...]:
    """A ``modify:`` list from YAML; ValueError (message for the operator) when invalid.
    ``base_dir``: relative lookup CSV paths are relative to it (the configuration's folder)."""
    raise NotImplementedError


class Modifier:
    """A compiled ``modify:`` list; ``by`` names it in changes ("rule:X" / "destination:Y")."""

    def __init__(self, actions: Sequence[ModifyAction], by: str) -> None:
        self.actions = tuple(actions)
        self.by = by

    def apply(self, ds: Dataset, context: Mapping[str, str]) -> list[Change]:
        """Change ``ds`` in place; the changes made (none: nothing applied)."""
        raise NotImplementedError

    def reload(self) -> None:
        """Read lookup CSV files again (SIGHUP); a bad file keeps the old table (logged)."""
