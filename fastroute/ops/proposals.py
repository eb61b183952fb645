"""Two-person governance of configuration changes (issue 15), shared by the CLI and the API.

With ``governance: two_person`` in the running configuration, a change to its governed part
(:mod:`fastroute.governance`) is proposed, not applied: :func:`propose` stores it in the spool
and audits ``config_proposed``; a second admin, a different user, approves it
(:func:`approve`: the file is written atomically and the supervisor signalled, audited
``config_approved``) or rejects it (``config_rejected``). The supervisor applies a governed
change read from the file only when an approved proposal carries its digest, so editing the
file and sending SIGHUP does not bypass the second person.
"""
from __future__ import annotations

import difflib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from fastroute import governance
from fastroute.config import Config
from fastroute.errors import ConfigError
from fastroute.ops.actions import (BadRequest, Conflict, Forbidden, NotFound, _write_atomically, config_text,
                                   parse_config, read_config_text, reload_config, supervisor_pid)
from fastroute.spool import Spool
from fastroute.spool.audit import whoami
from fastroute.spool.proposals import Proposal, ProposalState

log = logging.getLogger("fastroute.ops")


def _path(config_path: str | None) -> Path:
    if not config_path:
        raise Conflict("fastroute runs on the embedded default configuration; there is no file to change",
                       hint="start it with `fastroute serve -c FILE`")
    return Path(config_path)


def _parse(cfg: Config, text: str, path: Path) -> Config:
    new = parse_config(text, str(path))
    if new.spool.resolve() != cfg.spool.resolve():
        raise ConfigError(f"the spool path cannot change while running ({cfg.spool} -> {new.spool})",
                          source=str(path), key="spool", hint="stop fastroute to move the spool")
    return new


def _diff(old: str, new: str, path: Path) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"{path} (running)", tofile=f"{path} (proposed)"))


def propose(cfg: Config, spool: Spool, config_path: str | None, text: str, *, applied_text: str | None = None,
            who: str | None = None, why: str = "") -> dict[str, Any]:
    """Store ``text`` as a pending proposal against the running ``cfg`` (nothing is written or
    signalled); audited ``config_proposed``. ``applied_text``: the running text, for the diff
    (default: the file as it is now)."""
    path = _path(config_path)
    new = _parse(cfg, text, path)
    gd = governance.compare(cfg, new, path.parent)
    base = read_config_text(config_path) if applied_text is None else applied_text
    who = who or whoami()
    p = spool.proposals.add(Proposal(
        id="", text=text, diff=_diff(base, text, path), who=who, why=why, created=time.time(), path=str(path),
        digest=gd.new_digest, base_digest=gd.old_digest, governed_changes=gd.changes))
    spool.audit_record("config_proposed", who=who, why=why, proposal=p.id, path=str(path), diff=p.diff,
                       governed_changes=list(p.governed_changes), digest=p.digest)
    log.warning("configuration change proposed by %s as proposal %s (%s): it waits for a second admin%s",
                who, p.id, ", ".join(p.governed_changes) or "no governed section changed",
                f": {why}" if why else "")
    return {"applied": False, "proposed": True, "proposal": p.view(),
            "hint": f"another admin approves it: POST /api/config/proposals/{p.id}/approve "
                    f"or `fastroute config approve {p.id} --reason WHY`"}


def reload(cfg: Config, spool: Spool, config_path: str | None, *, text: str | None = None,
           applied_text: str = "", who: str | None = None, why: str = "") -> dict[str, Any]:
    """``POST /api/config/reload``: applied at once (``actions.reload_config``), unless the
    running configuration is two_person and the new one changes a governed part: then proposed
    (the result has ``proposed: true`` and the proposal; the API answers 202)."""
    path = _path(config_path)
    text_now = config_text(path, text)
    if cfg.governance == governance.TWO_PERSON:
        new = _parse(cfg, text_now, path)
        if governance.compare(cfg, new, path.parent).needs_approval:
            return propose(cfg, spool, config_path, text_now, applied_text=applied_text, who=who, why=why)
    return reload_config(cfg, spool, config_path, text=text, applied_text=applied_text, who=who, why=why)


def proposals(spool: Spool, state: str = "") -> list[dict[str, Any]]:
    """Every proposal (or those in ``state``), newest first."""
    if state and state not in set(ProposalState):
        raise BadRequest(f"unknown proposal state {state!r} ({', '.join(ProposalState)})")
    return [p.view() for p in reversed(list(spool.proposals.all())) if not state or p.state == state]


def _pending(spool: Spool, pid: str) -> Proposal:
    p = spool.proposals.get(pid)
    if p is None:
        raise NotFound(f"no configuration proposal {pid!r}", hint="list them: GET /api/config/proposals "
                       "or `fastroute config proposals`")
    if p.state is not ProposalState.PENDING:
        raise Conflict(f"proposal {p.id} is already {p.state}" + (f" (by {p.decided_by})" if p.decided_by else ""))
    return p


def approve(cfg: Config, spool: Spool, config_path: str | None, pid: str, *, who: str | None = None,
            why: str = "") -> dict[str, Any]:
    """A second admin approves proposal ``pid``: written to the file atomically, audited
    ``config_approved``, the supervisor signalled (it applies it: the digest is approved)."""
    who = who or whoami()
    if not why.strip():
        raise BadRequest("an approval needs a reason (why), recorded in the audit trail")
    path = _path(config_path)
    p = _pending(spool, pid)
    if p.who == who:
        raise Forbidden(f"proposal {p.id} was made by {who}: a second admin, a different user, must approve it",
                        hint="ask another admin to approve it, or reject it to withdraw it")
    if Path(p.path).resolve() != path.resolve():
        raise Conflict(f"proposal {p.id} is for {p.path}, not {path}")
    running = governance.digest(governance.governed_view(cfg, path.parent))
    if running != p.base_digest:
        raise Conflict(f"proposal {p.id} was made against a governed configuration that has changed since "
                       "(another change was applied or the file was edited)",
                       hint="reject it and propose the change again against the configuration as it is now")
    _parse(cfg, p.text, path)            # still valid (a lookup file it names may have gone)
    pid_sup = supervisor_pid(cfg)
    if pid_sup is None:
        raise Conflict(f"no running supervisor (no live pid in {cfg.spool / 'run' / 'supervisor.pid'}); "
                       "the proposal stays pending", hint="start fastroute with `fastroute serve -c FILE`")
    decided = spool.proposals.decide(p.id, ProposalState.PENDING, ProposalState.APPROVED, decided_by=who,
                                     decided_why=why, decided_at=time.time())
    if decided is None:                   # another admin decided it meanwhile
        raise Conflict(f"proposal {p.id} was decided meanwhile")
    try:
        _write_atomically(path, p.text)
    except OSError as exc:
        spool.proposals.decide(p.id, ProposalState.APPROVED, ProposalState.PENDING, decided_by="",
                               decided_why="", decided_at=0.0)
        raise Conflict(f"cannot write {path}: {exc.strerror}; the proposal stays pending") from None
    spool.audit_record("config_approved", who=who, why=why, proposal=p.id, proposed_by=p.who, path=str(path),
                       diff=p.diff, governed_changes=list(p.governed_changes), digest=p.digest)
    os.kill(pid_sup, signal.SIGHUP)
    log.warning("configuration proposal %s (by %s) approved by %s: written to %s, supervisor pid %d signalled: %s",
                p.id, p.who, who, path, pid_sup, why)
    return {"applied": True, "supervisor_pid": pid_sup, "proposal": decided.view()}


def reject(spool: Spool, pid: str, *, who: str | None = None, why: str = "") -> dict[str, Any]:
    """Reject (or, by its proposer, withdraw) proposal ``pid``; audited ``config_rejected``."""
    who = who or whoami()
    if not why.strip():
        raise BadRequest("a rejection needs a reason (why), recorded in the audit trail")
    p = _pending(spool, pid)
    decided = spool.proposals.decide(p.id, ProposalState.PENDING, ProposalState.REJECTED, decided_by=who,
                                     decided_why=why, decided_at=time.time())
    if decided is None:
        raise Conflict(f"proposal {p.id} was decided meanwhile")
    spool.audit_record("config_rejected", who=who, why=why, proposal=p.id, proposed_by=p.who,
                       governed_changes=list(p.governed_changes), digest=p.digest)
    log.warning("configuration proposal %s (by %s) rejected by %s: %s", p.id, p.who, who, why)
    return {"applied": False, "proposal": decided.view()}
