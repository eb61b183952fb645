"""What a content change did: one :class:`Change` per attribute, :class:`Applied` per object."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Change:
    """One attribute changed in one object, for previews (with values) and audit (tags only)."""

    path: str            # "(0010,0010)"; nested: "(0008,1115)[0](0020,000E)"
    keyword: str         # pydicom keyword, "" for private/unknown tags
    action: str          # set | delete | copy | regex | lookup | dummy | empty | uid | shift | clean | record
    old: str | None      # display text of the old value; None: it was absent
    new: str | None      # display text of the new value; None: removed
    by: str              # "rule:NAME", "destination:NAME" or "deidentify:PROFILE"


@dataclass(slots=True)
class Applied:
    """One object after its destination's content plan: re-encoded bytes or a quarantine."""

    data: bytes                       # the re-encoded dataset (no file meta), same transfer syntax
    sop_instance_uid: str             # what the C-STORE carries (new when UIDs were replaced)
    changes: list[Change] = field(default_factory=list)
    by: list[str] = field(default_factory=list)      # the steps that ran, in order
    quarantine: str = ""              # non-empty: not sent; why (e.g. burned-in annotation)
