"""Which transfer syntax each object travels in, per destination: the original unless refused.

Per destination the planner proposes, for each queued (SOP class, syntax) pair, the original
syntax plus the conversions ``transcode.candidates`` allows, each as its own presentation
context, and learns from every A-ASSOCIATE-AC which syntaxes the peer took for a SOP class.
Once the original is known to be accepted only the original is proposed. What was learnt is
forgotten when an association fails or is refused, so a destination upgrade is re-learnt; a
configuration reload restarts the sender, which starts from nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from pydicom.uid import UID

from fastroute.dicom.attrs import read_attributes
from fastroute.config import DestinationConfig
from fastroute.errors import TranscodeError
from fastroute.logsetup import fields
from fastroute.spool import Claimed
from fastroute.routing.transcode import (
    candidates,
    choose,
    syntax_label,
    transcode,
    undecodable_reason,
)

log = logging.getLogger("fastroute.send")

MAX_CONTEXTS = 128
_LOSSY_IMAGE_COMPRESSION = 0x00282110


def is_image_class(sop_class: str) -> bool:
    """Compression targets are offered only for SOP classes that carry pixel data."""
    name = UID(sop_class).name
    return any(word in name for word in ("Image", "Multi-frame", "Segmentation", "Photograph"))


@dataclass
class SyntaxPlanner:
    dest: DestinationConfig
    # (SOP class, syntax) -> accepted by the peer in the last association that proposed it
    learned: dict[tuple[str, str], bool] = field(default_factory=dict)

    def _options(self, sop_class: str, ts: str) -> tuple[str, ...]:
        if self.learned.get((sop_class, ts)) and not self.dest.compress:
            return (ts,)
        dest = self.dest
        if dest.compress and not is_image_class(sop_class):
            from dataclasses import replace
            dest = replace(dest, compress=None)
        opts = candidates(ts, dest)
        return opts or (ts,)

    def proposals(self, items: Iterable[Claimed]) -> set[tuple[str, str]]:
        """Presentation contexts to propose for a batch (at most 128; originals first)."""
        pairs: list[tuple[str, str]] = []
        for sop_class, ts in dict.fromkeys((i.sop_class_uid, i.transfer_syntax) for i in items):
            for opt in self._options(sop_class, ts):
                if (sop_class, opt) not in pairs:
                    pairs.append((sop_class, opt))
        if len(pairs) > MAX_CONTEXTS:
            originals = {(i.sop_class_uid, i.transfer_syntax) for i in items}
            pairs = sorted(pairs, key=lambda p: p not in originals)[:MAX_CONTEXTS]
        return set(pairs)

    def refusal_reason(self, item: Claimed) -> str:
        """What to add when the destination refused every context proposed for ``item``:
        the missing decoder (with the package to install) when that is why only the original
        was offered; "" when conversions were offered too."""
        return undecodable_reason(item.transfer_syntax)

    def learn(self, proposed: Iterable[tuple[str, str]], conn: Any) -> None:
        for sop_class, ts in proposed:
            self.learned[(sop_class, ts)] = conn.context_for(sop_class, ts) is not None

    def forget(self) -> None:
        self.learned.clear()

    def prepare(self, conn: Any, item: Claimed,
                data: bytes | memoryview) -> tuple[int, bytes | memoryview, str]:
        """(context id, bytes to send, syntax) for one object; TranscodeError when impossible.

        The original is returned as it came (a spool buffer stays a buffer); only a transcode
        makes new bytes."""
        ts = item.transfer_syntax
        accepted = conn.accepted(item.sop_class_uid)
        dest = self.dest
        if dest.compress and not is_image_class(item.sop_class_uid):
            from dataclasses import replace
            dest = replace(dest, compress=None)
        lossy_source = False
        if dest.allow_lossy:
            value = read_attributes(data, ts, (_LOSSY_IMAGE_COMPRESSION,)).get(_LOSSY_IMAGE_COMPRESSION)
            lossy_source = str(value).strip() == "01"
        target = choose(ts, accepted, dest, lossy_source=lossy_source)
        cx = conn.context_for(item.sop_class_uid, target)
        if cx is None:   # choose() only returns accepted syntaxes
            raise TranscodeError(f"no presentation context for {syntax_label(target)}")
        if target == ts:
            return cx, data, ts
        data = bytes(data)   # the codecs want bytes; this object is being re-encoded anyway
        try:
            out = transcode(data, ts, target, allow_lossy=dest.allow_lossy, lossy_source_ok=False)
        except TranscodeError as first:
            # A compressed target can still fail on this image (size, bit depth): fall back to
            # an accepted uncompressed syntax rather than failing the object.
            for plain in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"):
                plain_cx = conn.context_for(item.sop_class_uid, plain)
                if plain != target and plain_cx is not None:
                    try:
                        out = transcode(data, ts, plain)
                    except TranscodeError:
                        continue
                    log.warning("destination=%s sop_instance_uid=%s: %s; sent as %s instead",
                                self.dest.name, item.sop_instance_uid, first, syntax_label(plain),
                                extra=fields(destination=self.dest.name, sop_uid=item.sop_instance_uid,
                                             oid=item.oid, calling_ae=item.calling_ae))
                    return plain_cx, out, plain
            raise
        return cx, out, target
