"""Verification by C-FIND (issue 14, ``verify: find``): a study is done at a destination when
the destination *lists* it, not when it answered each C-STORE with success.

When a study has settled at a destination
-----------------------------------------
A study settles at destination D when BOTH hold:

1. quiet: no instance of it routed to D was *received* by fastroute for ``verify_quiet``
   seconds (the newest ``received_at`` of the study's routing records that name D), and none
   was delivered to D for ``verify_quiet`` either (a delivery, a re-send included, restarts
   the quiet period: the archive indexes what it just got);
2. drained: D's queue holds none of the study's instances as pending, bulk or in flight.
   Failed ones (``max_attempts`` exhausted, in D's failed list) do NOT keep a study from
   settling: they already are an operator's matter (queue view, alerts, retry); the
   verification compares with what was *delivered*. If an operator retries them and they are
   delivered, the study waits and settles again, and the newly delivered ones are verified.

Then the verifier C-FINDs the study at D at IMAGE level and compares the SOP Instance UIDs
with the instances delivered there and not verified yet. With ``query_level: study``, or when
D refuses the IMAGE-level query, it compares NumberOfStudyRelatedInstances with the number of
instances fastroute delivered there (verified earlier or not; the archive may hold more, from
elsewhere, which is fine). Missing instances are queued again (their bytes are still in the
spool: a verification *hold*, shared with storage commitment, keeps them until verified);
by count nothing says which are missing, so every unverified delivered instance is re-sent.
After ``verify_attempts`` verifications that still found something missing, the study is
``verify-failed`` with the missing list (audited, counted, alerted) and its holds end.

Where it runs
-------------
One thread in the destination's sender process (:class:`Verifier`): it has the
destination's association settings, the sender wakes when a re-sent object is queued, and a
destination without ``verify`` pays nothing. It is off the hot path: its own Q/R association,
opened per check and closed after, and it only reads the spool except for the few write
transactions that record an outcome. A C-FIND that fails (peer down, timeout) is retried at
the next round; it never counts as an attempt.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastroute.config import Config, DestinationConfig
from fastroute.dicom.qr import Level, QueryFailed, QueryRetrieveClient, RetrieveFailed
from fastroute.dicom.status import describe
from fastroute.logsetup import escape_control, fields
from fastroute.spool import Spool
from fastroute.spool.queues import QueueState
from fastroute.spool.verifications import StudyVerification

log = logging.getLogger("fastroute.verify")

ClientFactory = Callable[..., QueryRetrieveClient]
MAX_POLL = 5.0             # at most this long between rounds (shorter with a short verify_quiet)


@dataclass(frozen=True, slots=True)
class Found:
    """What a destination's C-FIND says of a study: the SOP Instance UIDs (IMAGE level), or
    ``None`` and only NumberOfStudyRelatedInstances (study level)."""

    uids: set[str] | None
    count: int


def close_quietly(client: QueryRetrieveClient) -> None:
    try:
        client.close()
    except Exception as exc:   # closing is best effort: the peer may be gone
        log.debug("closing a Q/R association: %s", exc)


def query_destination(client: ClientFactory, dest: DestinationConfig, calling: str, study_uid: str) -> Found:
    """IMAGE level: the SOP Instance UIDs found. Study level (``query_level: study``, or the
    destination refused IMAGE level with a status): only NumberOfStudyRelatedInstances.
    Raises QueryFailed/RetrieveFailed/OSError when the destination could not answer.
    (Shared by the migration runner's verification and :class:`Verifier`.)"""
    c = client(dest, calling)
    try:
        if dest.query_level == "image":
            try:
                found = {str(ds.get("SOPInstanceUID", "")) for ds in c.find(
                    Level.IMAGE, {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "",
                                  "SOPInstanceUID": ""}, timeout=dest.dimse_timeout * 4)}
                found.discard("")
                return Found(found, len(found))
            except QueryFailed as exc:
                if exc.status is None:
                    raise
                log.info("%s refused the IMAGE-level C-FIND (%s): verifying study %s by its instance count",
                         dest.ae_title, describe(exc.status), study_uid,
                         extra=fields(study_uid=study_uid, called_ae=dest.ae_title, status=exc.status))
                close_quietly(c)
                c = client(dest, calling)
        count = 0
        for ds in c.find(Level.STUDY, {"StudyInstanceUID": study_uid, "NumberOfStudyRelatedInstances": ""},
                         timeout=dest.dimse_timeout * 4):
            value = ds.get("NumberOfStudyRelatedInstances", 0)
            count = max(count, int(value or 0))
        return Found(None, count)
    finally:
        close_quietly(c)


def settled(spool: Spool, dest: str, sv: StudyVerification, quiet: float, now: float) -> tuple[bool, str]:
    """Whether the study has settled at ``dest`` (see the module's docstring), and if not why."""
    if now - sv.last_delivered < quiet:
        return False, "delivered within the quiet period"
    for oid, rec in spool.lookup(study_instance_uid=sv.study_instance_uid):
        if dest not in rec.routed_to:
            continue
        if now - rec.received_at < quiet:
            return False, "received within the quiet period"
        if dest in rec.outstanding:
            entry = spool.entry(dest, oid)
            if entry is not None and entry.state is not QueueState.FAILED:
                return False, f"oid {oid} is {entry.state.value} in the queue"
    return True, ""


class Verifier:
    """The verification loop of one destination (a thread of its sender process)."""

    def __init__(self, cfg: Config, dest: DestinationConfig, spool: Spool, *,
                 client: ClientFactory = QueryRetrieveClient, clock: Callable[[], float] = time.time,
                 on_resend: Callable[[], None] = lambda: None) -> None:
        self.cfg, self.dest, self.spool = cfg, dest, spool
        self.client, self.clock, self.on_resend = client, clock, on_resend
        self.calling = dest.calling_ae or cfg.ae_title
        self.stop_event = threading.Event()
        self.poll = max(0.2, min(MAX_POLL, dest.verify_quiet / 4))

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.round()
            except Exception:      # a bug must not end verification for good: logged, next round
                log.exception("destination=%s: verification round failed", self.dest.name,
                              extra=fields(destination=self.dest.name))
            self.stop_event.wait(self.poll)

    def stop(self) -> None:
        self.stop_event.set()

    def round(self) -> int:
        """Check every study that has settled; how many were checked."""
        n = 0
        for sv in self.spool.verifications.waiting_studies(self.dest.name):
            if self.stop_event.is_set():
                break
            ok, _why = settled(self.spool, self.dest.name, sv, self.dest.verify_quiet, self.clock())
            if ok:
                self.check(sv)
                n += 1
        return n

    def check(self, sv: StudyVerification) -> None:
        dest, study = self.dest, sv.study_instance_uid
        ver = self.spool.verifications
        delivered = ver.delivered(dest.name, study)
        log_fields = fields(destination=dest.name, study_uid=study, called_ae=dest.ae_title)
        try:
            found = query_destination(self.client, dest, self.calling, study)
        except (QueryFailed, RetrieveFailed, OSError) as exc:
            status: int | None = getattr(exc, "status", None)
            log.warning("destination=%s called_ae=%s study_instance_uid=%s: verification C-FIND failed "
                        "(status %s): %s; tried again in the next round", dest.name, dest.ae_title, study,
                        describe(status) if status is not None else "none",
                        escape_control(str(exc)), extra=log_fields)
            return
        now = self.clock()
        by_count = found.uids is None
        if found.uids is not None:
            missing = [d for d in delivered if d.sop_instance_uid not in found.uids]
        else:
            expected = sv.verified_total + len(delivered)
            missing = list(delivered) if found.count < expected else []
        if not missing:
            ver.verified(dest.name, study, delivered, now, by_count=by_count, calling=self.calling)
            log.info("destination=%s called_ae=%s study_instance_uid=%s: verified, %d instance(s) %s",
                     dest.name, dest.ae_title, study, len(delivered),
                     f"by count ({found.count} at the destination)" if by_count else "listed by C-FIND",
                     extra=log_fields)
            return
        what = (f"{found.count} instance(s) at the destination, {sv.verified_total + len(delivered)} delivered"
                if by_count else f"{len(missing)} of {len(delivered)} instance(s) not found: "
                + _uid_list(d.sop_instance_uid for d in missing))
        if sv.attempts >= dest.verify_attempts:
            lost = [] if by_count else [d.sop_instance_uid for d in missing]
            ver.failed(dest.name, study, delivered, lost, now, by_count=by_count)
            log.error("destination=%s called_ae=%s study_instance_uid=%s: verify-failed after %d re-send(s): %s",
                      dest.name, dest.ae_title, study, sv.attempts, what, extra=log_fields)
            return
        ver.resent(dest.name, study, missing, now, by_count=by_count, queues=self.spool.queues)
        log.warning("destination=%s called_ae=%s study_instance_uid=%s: %s; re-sending them (attempt %d of %d)",
                    dest.name, dest.ae_title, study, what, sv.attempts + 1, dest.verify_attempts,
                    extra=log_fields)
        self.on_resend()


MIN_QUIET = 10.0           # below this an archive that indexes in the background may not list yet


def verify_warnings(cfg: Config) -> list[str]:
    """What ``fastroute check`` says about verification settings that load but will not do
    what they seem to."""
    out = []
    for d in cfg.destinations.values():
        if d.verify == "off":
            continue
        out.append(f"destinations.{d.name}: verify: find: {d.ae_title} must answer Study Root C-FIND "
                   f"({d.query_level} level) from AE {d.calling_ae or cfg.ae_title}")
        if d.verify_quiet < MIN_QUIET:
            out.append(f"destinations.{d.name}: verify_quiet {d.verify_quiet:g}s: an archive that indexes in the "
                       "background may not list what it just stored; instances may be re-sent needlessly")
    return out


def _uid_list(uids: Any, limit: int = 20) -> str:
    items = list(uids)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


__all__ = ["Found", "Verifier", "query_destination", "settled", "close_quietly", "verify_warnings"]
