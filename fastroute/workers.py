"""Process supervision: listener and per-destination sender processes around one spool.

Children are *spawned* (not forked) so each opens LMDB and starts its threads fresh; they share
nothing but the spool on disk. The supervisor restarts a child that dies (with backoff), and on
SIGTERM/SIGINT asks every child to finish what it has in flight before exiting.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastroute import governance, reload
from fastroute.config import Config, warn_deprecated_engine
from fastroute.errors import ConfigError
from fastroute.logsetup import fields, set_process_title, setup_logging
from fastroute.spool import lockstats, open_spool
from fastroute.spool.proposals import ProposalState
from fastroute.spool.space import prealloc_split, space_warnings

log = logging.getLogger("fastroute.workers")

EXIT_CONFIG = 78      # EX_CONFIG: restarting cannot help (port in use, bad config)
SHARD_COLLECT_EVERY = 60.0  # seconds between two collections of the shards no listener owns
LISTEN_TIMEOUT = 30.0  # how long a reload waits for its new listeners to listen
KEY_RETRY = 30.0       # a sender that cannot start (a missing de-identification key) tries again


def _child_setup(cfg: Config, name: str, cpus: tuple[int, ...]) -> threading.Event:
    setup_logging(cfg.log_level, cfg.log_format, process=name)
    set_process_title(name)
    lockstats.start_publishing(cfg.spool, name)    # its write-lock wait/hold totals, for /metrics
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the supervisor owns Ctrl-C
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, set(cpus))
        except OSError as exc:
            log.warning("%s: cannot pin to CPUs %s: %s", name, cpus, exc, extra=fields(worker=name))
    return stop


def listener_main(cfg: Config, index: int) -> None:
    from fastroute import __version__
    from fastroute.dicom.dimse import CommandField
    from fastroute.dicom.scp import Listener
    from fastroute.dicom.tls import TlsSetupError
    from fastroute.native import PEEK_IMPL
    from fastroute.dicom.commitment import STORAGE_COMMITMENT_SOP_CLASS
    from fastroute.routing.commitment import ModalityService, report_handler
    from fastroute.routing.intake import StoreService, association_counter, refusal_counter
    from fastroute.routing.rules import RuleSet
    from fastroute.spool.commit import Committer
    from fastroute.spool.counters import EventTally
    from fastroute.spool.wakeup import Notifier

    cpus = (cfg.listener_cpus[index % len(cfg.listener_cpus)],) if cfg.listener_cpus else ()
    stop = _child_setup(cfg, f"listener-{index}", cpus)
    # SIGTERM stops, SIGHUP (relayed by the supervisor) reads the TLS files again; both are
    # taken with sigwait below, so no handler runs while the main thread holds a lock. Blocked
    # before any thread starts (threads inherit the mask, so none takes them instead). SIGHUP
    # was ignored until here (Supervisor._start): an ignored signal is discarded even when
    # blocked, so it gets a (never called) handler first.
    signal.signal(signal.SIGHUP, lambda _s, _f: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})
    spool = open_spool(cfg)
    if cfg.spool_shards == "per-listener":
        # Its objects' bytes go into a shard of its own: its commits do not queue for the
        # shared environment's write lock with the bytes of other listeners (issue 16).
        shard = spool.own_shard(index)
        # spool_prealloc is shared out: the shards take the bytes, the shared file the records.
        added = spool.preallocate_shard(prealloc_split(cfg.spool_prealloc, cfg.listeners, True)[1])
        log.info("listener-%d: writes object bytes into spool shard %d (%d MiB preallocated)", index,
                 shard.index, added >> 20, extra=fields(worker=f"listener-{index}"))
    notifier = Notifier(cfg.spool)
    committer = Committer(spool, notifier, gather=cfg.group_commit_delay)
    rules = RuleSet.from_config(cfg)
    warn_deprecated_engine("engine", cfg.engine)
    log.info("listener-%d: fastroute %s (peek=%s) from %s", index, __version__, PEEK_IMPL, Path(__file__).parent)
    tally = EventTally(spool)     # association and refusal counts, at most one commit a second
    store = StoreService(rules, committer, max_object_bytes=cfg.max_object_bytes)
    # Storage commitment reports from destinations on a new association (issue 14): the
    # Storage Commitment SOP class is accepted, with the SCP role its senders propose.
    # Modalities' own commitment requests (N-ACTION) are answered here, reported later.
    reports = report_handler(spool, notifier.notify, reporter_for=lambda dest: (
        cfg.destinations[dest].ae_title if dest in cfg.destinations else None))
    modality = ModalityService(cfg, spool, lambda *args: receiver.send_request(*args))
    receiver = Listener(cfg, {CommandField.C_STORE_RQ: store, CommandField.N_EVENT_REPORT_RQ: reports,
                              CommandField.N_ACTION_RQ: modality},
                        sop_classes=[STORAGE_COMMITMENT_SOP_CLASS], stager=committer.stager(cfg.stream_threshold))
    receiver.on_association, receiver.on_refusal = association_counter(tally), refusal_counter(tally)

    def audit_denied(event: dict[str, Any]) -> None:
        spool.audit.record(**event)

    receiver.on_denied = audit_denied
    committer.siblings = receiver.active
    try:
        receiver.start()
    except TlsSetupError as exc:
        log.error("listener-%d: cannot start the TLS listener: %s", index, exc)
        sys.exit(EXIT_CONFIG)
    except OSError as exc:
        log.error("listener-%d: cannot listen on %s:%d%s: %s", index, cfg.host, cfg.port,
                  f" / TLS {cfg.tls.port}" if cfg.tls is not None else "", exc)
        sys.exit(EXIT_CONFIG)
    modality.start()
    while not stop.is_set():          # set by a SIGTERM taken before the mask
        if signal.sigwait({signal.SIGTERM, signal.SIGHUP}) == signal.SIGTERM:
            break
        receiver.reload_tls()
    log.info("listener-%d: stopping (grace %.0fs)", index, cfg.shutdown_grace)
    modality.stop()
    receiver.stop(cfg.shutdown_grace)
    store.close()
    tally.close()
    committer.close()
    notifier.close()
    spool.close()


def sender_cpus(cfg: Config, dest_name: str) -> tuple[int, ...]:
    """A destination's own `cpus`, else one of the profile's `sender_cpus`, round-robin."""
    dest = cfg.destinations[dest_name]
    if dest.cpus or not cfg.sender_cpus:
        return dest.cpus
    index = list(cfg.destinations).index(dest_name)
    return (cfg.sender_cpus[index % len(cfg.sender_cpus)],)


def sender_main(cfg: Config, dest_name: str) -> None:
    from fastroute.routing.schedule import DestinationSender

    dest = cfg.destinations[dest_name]
    stop = _child_setup(cfg, f"sender-{dest_name}", sender_cpus(cfg, dest_name))
    spool = open_spool(cfg, durable=False)   # claims and delivery records: see Spool
    since = time.time()
    while True:
        try:
            sender = DestinationSender(cfg, dest, spool)
            break
        except ConfigError as exc:
            # e.g. a de-identifying destination whose key is missing: nothing is sent there
            # (never an identified copy), the queue keeps its objects, and the reason is shown
            # where the operator looks. Tried again every KEY_RETRY s (a key file that appears);
            # an environment variable needs the router restarted with it.
            from fastroute.spool.senderstate import DestinationState, SenderState
            log.error("destination %s (%s): not sending: %s; trying again in %g s", dest_name, dest.ae_title,
                      exc, KEY_RETRY, extra=fields(destination=dest_name))
            with contextlib.suppress(OSError):
                DestinationState(dest_name, SenderState.STOPPED, down_since=since,
                                 last_error=f"not sending: {exc}").write(cfg.spool)
            if stop.wait(KEY_RETRY):
                spool.close()
                return
    content = sender.content
    if content is not None and content.has_lookups:
        # SIGHUP (relayed by the supervisor, see Supervisor._relay_hup): read the lookup tables
        # again, on a thread of its own so the handler never waits on a file; associations
        # stay open and a bad file keeps the old table. Other senders keep SIGHUP ignored.
        signal.signal(signal.SIGHUP, lambda _s, _f: threading.Thread(
            target=content.reload, name="reload-lookups", daemon=True).start())

    def relay_stop() -> None:
        stop.wait()
        sender.stop()

    threading.Thread(target=relay_stop, daemon=True).start()
    sender.run()
    spool.close()


def has_lookups(cfg: Config, dest_name: str) -> bool:
    """Whether the destination's content plan reads lookup tables (its sender takes SIGHUP)."""
    dest = cfg.destinations.get(dest_name)
    actions = [*(dest.modify if dest is not None else ()),
               *(a for rule in cfg.rules if dest_name in rule.send_to for a in rule.modify)]
    return any(a.op == "lookup" for a in actions)


@dataclass
class _Child:
    name: str
    target: Callable[..., None]
    args: tuple[Any, ...]
    proc: Any = None
    started: float = 0.0
    restarts: int = 0
    restart_at: float = 0.0
    fatal: bool = False


def count_restart(cfg: Config, name: str) -> None:
    """fastroute_worker_restarts by role (``listener-0`` -> listener); one commit per restart."""
    from fastroute.spool.counters import CounterKey, CounterKind
    try:
        spool = open_spool(cfg)
        try:
            spool.add_counters({CounterKey(CounterKind.WORKER_RESTARTS, extra=name.split("-")[0]): 1})
        finally:
            spool.close()
    except Exception as exc:   # a metric must never stop a restart
        log.warning("could not count the restart of %s: %s", name, exc, extra=fields(worker=name))


def http_main(cfg: Config, config_path: str | None) -> None:
    from fastroute.ops.api import http_main as run
    run(cfg, config_path)


def migration_main(cfg: Config) -> None:
    """The migration process (issue 13): advances every job in the spool. One process for all
    sources: its work is waiting on archives, not CPU; it is restarted on a reload that changes
    ``sources:`` or ``destinations:`` and, like every child, after a crash (the jobs' state is
    in the spool, so it continues where it stopped)."""
    from fastroute.migration.runner import MigrationRunner

    from fastroute.spool.wakeup import MIGRATION, Waker

    stop = _child_setup(cfg, "migration", ())
    spool = open_spool(cfg)
    runner = MigrationRunner(cfg, spool, stop)
    waker = Waker(cfg.spool, MIGRATION)

    def relay_wakeups() -> None:
        """A job started, resumed or retried (CLI, API): its next round now, not at the poll."""
        while not stop.is_set():
            if waker.wait(1.0):
                runner.wake()

    threading.Thread(target=relay_wakeups, name="migration-wakeups", daemon=True).start()
    try:
        runner.run()
    finally:
        runner.close()
        waker.close()
        spool.close()


@dataclass
class Supervisor:
    cfg: Config
    config_path: str | None = None
    profile: str | None = None
    children: list[_Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._stopping = False
        self._reload = False
        self._retiring: list[tuple[_Child, float]] = []    # old listeners finishing after a reload
        self._plan()

    def _plan(self) -> None:
        cfg = self.cfg
        self.children = [_Child(f"listener-{i}", listener_main, (cfg, i)) for i in range(cfg.listeners)]
        self.children += [_Child(f"sender-{name}", sender_main, (cfg, name)) for name in cfg.destinations]
        if cfg.http is not None:
            self.children.append(_Child("http", http_main, (cfg, self.config_path)))
        if cfg.sources:
            self.children.append(_Child("migration", migration_main, (cfg,)))

    def _do_reload(self) -> None:
        """SIGHUP: load the file again and restart only the processes whose settings changed.

        A bad file is logged and the running config stays. Listeners are handed over without
        refusing an association: the new ones listen on the shared port (SO_REUSEPORT) before
        the old ones stop accepting, and the old ones finish their open associations (up to
        their ``shutdown_grace``) in the background while new connections reach the new ones.
        """
        from fastroute.config import load
        from fastroute.errors import ConfigError

        self._reload = False
        try:
            new = load(self.config_path, self.profile)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if new.spool.resolve() != self.cfg.spool.resolve():
            log.error("reload refused: the spool path cannot change while running (%s -> %s)",
                      self.cfg.spool, new.spool)
            return
        gd = governance.compare(self.cfg, new, governance.config_base(self.config_path))
        proposal = self._approved_proposal(gd)
        if gd.needs_approval and proposal is None:
            return
        change = reload.plan(self.cfg, new, sender_cpus)
        log.info("reloading configuration from %s: restarting %s", self.config_path, change.describe())
        # Same paths, perhaps new contents (a renewed certificate): the processes not restarted
        # read their TLS files again.
        self._relay_hup(listeners=not change.listeners and new.tls is not None,
                        http=not change.http and new.http is not None and new.http.tls is not None,
                        senders=frozenset(name for name in new.destinations
                                          if name not in change.restart and has_lookups(new, name)))
        old = self.cfg
        if change.listeners and not self._replace_listeners(old, new):
            return
        self.cfg = new
        gone = {f"sender-{name}" for name in [*change.restart, *change.stop]}
        if change.http:
            gone.add("http")
        if change.migration or not new.sources:
            gone.add("migration")
        self._stop_children([c for c in self.children if c.name in gone], old.shutdown_grace)
        self.children = [c for c in self.children if c.name not in gone]
        for c in self.children:          # a later crash-restart runs with the new settings
            c.args = (new, *c.args[1:])
        fresh = [_Child(f"sender-{name}", sender_main, (new, name))
                 for name in [*change.restart, *change.start]]
        if change.http and new.http is not None:
            fresh.append(_Child("http", http_main, (new, self.config_path)))
        if new.sources and not any(c.name == "migration" for c in self.children):
            fresh.append(_Child("migration", migration_main, (new,)))
        for c in fresh:
            self._start(c)
        self.children += fresh
        log.info("reload applied")
        self._audit_applied(gd, proposal, change.describe())

    def _approved_proposal(self, gd: governance.GovernedDiff) -> str | None:
        """With governance two_person, a governed change read from the file runs only when a
        second admin approved a proposal with exactly its governed part (fastroute.ops.proposals):
        editing the file and sending SIGHUP does not bypass them. The approved proposal's id,
        or None (refused: logged and audited; the running configuration stays)."""
        if not gd.needs_approval:
            return None
        spool = open_spool(self.cfg)
        try:
            approved = spool.proposals.approved_for(gd.new_digest, gd.old_digest)
            if approved is not None:
                return approved.id
            spool.audit_record("config_change_refused", who="supervisor", path=str(self.config_path),
                               why="governance two_person: no approved proposal for this governed change",
                               governed_changes=list(gd.changes), digest=gd.new_digest)
        finally:
            spool.close()
        log.error("reload refused, keeping the running configuration: governance is two_person and %s changed "
                  "(%s) with no approved proposal for it; propose it (fastroute config propose, or POST "
                  "/api/config/reload) for a second admin to approve", self.config_path, ", ".join(gd.changes),
                  extra=fields(worker="supervisor"))
        return None

    def _audit_applied(self, gd: governance.GovernedDiff, proposal: str | None, restarted: str) -> None:
        """What took effect: the governed sections a reload changed (and the proposal that
        approved them), so the record holds even for a file edited by hand with governance off."""
        if not gd.changes:
            return
        spool = open_spool(self.cfg)
        try:
            if proposal is not None:
                spool.proposals.decide(proposal, ProposalState.APPROVED, ProposalState.APPLIED,
                                       applied_at=time.time())
            spool.audit_record("config_applied", who="supervisor", path=str(self.config_path),
                               governed_changes=list(gd.changes), digest=gd.new_digest,
                               proposal=proposal or "", restarted=restarted)
        finally:
            spool.close()

    def _relay_hup(self, *, listeners: bool, http: bool, senders: frozenset[str] = frozenset()) -> None:
        """Ask each running listener and/or the HTTP process (HTTPS) to read its TLS files
        again (new connections get them, open ones keep theirs; a bad file keeps the old one),
        and the senders named (``modify`` lookup tables, issue 15) their CSV files."""
        for c in self.children:
            wanted = ((listeners and c.name.startswith("listener-")) or (http and c.name == "http")
                      or c.name in {f"sender-{name}" for name in senders})
            if wanted and c.proc is not None and c.proc.is_alive():
                try:
                    os.kill(c.proc.pid, signal.SIGHUP)
                except ProcessLookupError:
                    continue
                log.info("%s (pid %d): reloading its %s", c.name, c.proc.pid,
                         "lookup tables" if c.name.startswith("sender-") else "TLS certificates",
                         extra=fields(worker=c.name))

    def _replace_listeners(self, old: Config, new: Config) -> bool:
        """Start the new listeners, wait until each listens, then retire the old ones."""
        fresh = [_Child(f"listener-{i}", listener_main, (new, i)) for i in range(new.listeners)]
        for c in fresh:
            self._start(c)
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while True:
            port = new.port or (new.tls.port if new.tls is not None else 0)   # 0: TLS only
            waiting = [c for c in fresh if reload.listening(c.proc.pid, port) is False]
            if not waiting:
                break
            dead = [c for c in waiting if not c.proc.is_alive()]
            if dead or time.monotonic() >= deadline:
                why = (f"{dead[0].name} exited with code {dead[0].proc.exitcode}" if dead
                       else f"{waiting[0].name} not listening after {LISTEN_TIMEOUT:.0f}s")
                log.error("reload refused: the new listeners could not take over port %d (%s); "
                          "keeping the running listeners and configuration", port, why)
                self._stop_children(fresh, 0.0)
                return False
            multiprocessing.connection.wait([c.proc.sentinel for c in waiting], 0.02)
        if reload.migrate_enabled() is False:
            log.warning("net.ipv4.tcp_migrate_req is 0: a connection queued on an old listener in the "
                        "instant it closes is reset by Linux; set it to 1 for a lossless handover")
        for c in self.children:
            if c.name.startswith("listener-") and c.proc is not None and c.proc.is_alive():
                c.proc.terminate()       # stops accepting, finishes its open associations
                self._retiring.append((c, time.monotonic() + old.shutdown_grace + 10))
                log.info("%s (pid %d) hands port %d over to the new listeners; it finishes its open "
                         "associations (up to %gs) before exiting", c.name, c.proc.pid, old.port,
                         old.shutdown_grace)
        self.children = fresh + [c for c in self.children if not c.name.startswith("listener-")]
        return True

    def _reap_retiring(self) -> None:
        keep = []
        for c, kill_at in self._retiring:
            if not c.proc.is_alive():
                c.proc.join()
                log.info("retired %s (pid %d) exited (code %s)", c.name, c.proc.pid, c.proc.exitcode,
                         extra=fields(worker=c.name))
            elif time.monotonic() >= kill_at:
                log.error("retired %s (pid %d) did not stop within the grace period; killing it",
                          c.name, c.proc.pid, extra=fields(worker=c.name))
                c.proc.kill()
                c.proc.join()
            else:
                keep.append((c, kill_at))
        self._retiring = keep

    def _start(self, child: _Child) -> None:
        child.proc = self._ctx.Process(target=child.target, args=child.args, name=child.name, daemon=False)
        # A child starts with SIGHUP ignored (SIG_IGN survives exec; a handler would not), so a
        # SIGHUP relayed before it installs its own handler cannot kill it.
        try:
            previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        except ValueError:            # not the main thread: leave the disposition alone
            previous = None
        try:
            child.proc.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGHUP, previous)
        child.started = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.proc.pid, extra=fields(worker=child.name))

    def run(self) -> int:
        # Create the spool (and its sub-databases) once before any child opens it, with room
        # written ahead (spool_prealloc) so that many objects' commits need not grow the file.
        for warning in space_warnings(self.cfg.spool, self.cfg.min_free_bytes, self.cfg.spool_max_bytes):
            log.warning("%s", warning)
        lockstats.start_publishing(self.cfg.spool, "supervisor", sweep_all=True)
        spool = open_spool(self.cfg)
        try:
            start = time.monotonic()
            added = spool.preallocate(prealloc_split(self.cfg.spool_prealloc, self.cfg.listeners,
                                                     self.cfg.spool_shards == "per-listener")[0])
            if added:
                log.info("spool %s: %d MiB preallocated in %.1fs (spool_prealloc)", self.cfg.spool,
                         added // 1024**2, time.monotonic() - start)
        finally:
            spool.close()
        (self.cfg.spool / "run").mkdir(parents=True, exist_ok=True)
        rsock, wsock = socket.socketpair()
        wsock.setblocking(False)
        signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        pidfile = self.cfg.spool / "run" / "supervisor.pid"
        pidfile.write_text(f"{os.getpid()}\n")
        for child in self.children:
            self._start(child)
        code = 0
        housekeeping_at = shards_at = time.monotonic() + 60
        try:
            while not self._stopping:
                now = time.monotonic()
                if now >= shards_at:
                    shards_at = now + SHARD_COLLECT_EVERY
                    self._collect_shards()
                if now >= housekeeping_at:
                    housekeeping_at = now + 3600
                    self._housekeeping()
                sentinels = [c.proc.sentinel for c in self.children if c.proc is not None]
                sentinels += [c.proc.sentinel for c, _ in self._retiring]
                waits = [c.restart_at - now for c in self.children if c.proc is None]
                waits += [kill_at - now for _, kill_at in self._retiring]
                waits += [housekeeping_at - now, shards_at - now]
                timeout = max(0.0, min(waits)) if waits else None
                ready = multiprocessing.connection.wait([*sentinels, rsock], timeout)
                if rsock in ready:
                    try:
                        rsock.recv(64)
                    except BlockingIOError:
                        pass
                if self._stopping:
                    break
                self._reap_retiring()
                if self._reload:
                    self._do_reload()
                    continue
                for child in self.children:
                    if child.proc is not None and not child.proc.is_alive():
                        code = self._reap(child)
                        if code:
                            self._stopping = True
                    elif child.proc is None and time.monotonic() >= child.restart_at:
                        self._start(child)
        finally:
            self.shutdown()
            try:
                pidfile.unlink()
            except OSError:
                pass
            signal.set_wakeup_fd(-1)
            rsock.close()
            wsock.close()
        return code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self._stopping:
            log.info("received %s: shutting down", signal.Signals(signum).name)
        self._stopping = True

    def _collect_shards(self) -> None:
        """Spool shards no listener owns (one that crashed, or the old ones after a reload
        changed the listeners, see :mod:`fastroute.spool.shards`): their crash leftovers and
        finished objects' bytes are deleted here."""
        try:
            spool = open_spool(self.cfg)
            try:
                n = spool.collect_unowned()
                if n:
                    log.debug("collected %d spool shard(s) no listener owns", n)
            finally:
                spool.close()
        except Exception as exc:   # never let housekeeping take the router down
            log.error("collecting unowned spool shards failed: %s", exc)

    def _housekeeping(self) -> None:
        """Retention, when no HTTP process (which does it otherwise) is configured."""
        if self.cfg.http is not None or not (self.cfg.audit_retention or self.cfg.history_retention):
            return
        from fastroute.ops.actions import apply_retention
        try:
            spool = open_spool(self.cfg)
            try:
                apply_retention(self.cfg, spool)
            finally:
                spool.close()
        except Exception as exc:   # never let housekeeping take the router down
            log.error("retention pass failed: %s", exc)

    def _on_hup(self, _signum: int, _frame: Any) -> None:
        self._reload = True

    def _reap(self, child: _Child) -> int:
        exitcode = child.proc.exitcode
        child.proc.join()
        child.proc = None
        if exitcode == EXIT_CONFIG:
            log.error("%s exited with a configuration error (code %d); stopping fastroute", child.name, exitcode,
                      extra=fields(worker=child.name))
            return 2
        uptime = time.monotonic() - child.started
        child.restarts = 0 if uptime > 60 else child.restarts + 1
        delay = min(30.0, 0.5 * (2 ** child.restarts)) if child.restarts else 0.5
        child.restart_at = time.monotonic() + delay
        log.error("%s died (exit code %s) after %.1fs; restarting in %.1fs", child.name, exitcode, uptime, delay,
                  extra=fields(worker=child.name))
        count_restart(self.cfg, child.name)
        return 0

    def shutdown(self) -> None:
        self._stop_children([*self.children, *(c for c, _ in self._retiring)], self.cfg.shutdown_grace)
        self._retiring = []
        log.info("all processes stopped")

    def _stop_children(self, children: list[_Child], grace: float) -> None:
        """SIGTERM (children finish in-flight work), then wait up to grace + 10 s, then kill."""
        alive = [c for c in children if c.proc is not None and c.proc.is_alive()]
        for c in alive:
            c.proc.terminate()
        deadline = time.monotonic() + grace + 10
        for c in alive:
            c.proc.join(max(0.0, deadline - time.monotonic()))
            if c.proc.is_alive():
                log.error("%s did not stop within the grace period; killing it", c.name, extra=fields(worker=c.name))
                c.proc.kill()
                c.proc.join()
        for c in children:
            if c.proc is not None and not c.proc.is_alive():
                c.proc.join()
