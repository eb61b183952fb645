"""PS3.15 Annex E de-identification (issue 15). Contract skeleton."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from fastroute.content.changes import Change


@dataclass(frozen=True, slots=True)
class DeidentifyConfig:
    """A destination's ``deidentify:`` section."""

    profile: str = "basic"
    options: tuple[str, ...] = ()
    key: str = ""                    # env:NAME or file:PATH (never the key itself)
    quarantine_burned_in: bool = True


def parse_deidentify(value: Any, base_dir: Path | None) -> DeidentifyConfig:
    """A ``deidentify:`` mapping from YAML; ValueError (message for the operator) when invalid."""
    raise NotImplementedError


class Deidentifier:
    """The profile with its options, keyed; ``by`` is "deidentify:PROFILE"."""

    def __init__(self, cfg: DeidentifyConfig, key: bytes) -> None:
        self.cfg = cfg
        self.key = key
        self.by = f"deidentify:{cfg.profile}"

    def apply(self, ds: Dataset) -> tuple[list[Change], str]:
        """De-identify ``ds`` in place: (changes, quarantine reason or "")."""
        raise NotImplementedError
