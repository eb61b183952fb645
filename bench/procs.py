"""Processes the harness starts, and what /proc says about them.

Every long-running peer (``peers``: DCMTK receivers, Orthanc, the router) is started in its own session,
so it is stopped by its PID and process group (SIGTERM, then SIGKILL after a grace period) and
checked to be gone. Every process started is registered, so an exception or Ctrl-C still
stops all of them (``stop_all``). Senders (dcmsend/storescu) are reaped with ``os.wait4`` to
get their CPU time and peak RSS even though they are gone when a run ends.

Only DCMTK's absolute paths are used: pynetdicom installs console scripts with the same names.
No pytest, no psutil: CPU and memory come from /proc/<pid>/stat and /proc/<pid>/status.
The test suite's real peers (tests/peers.py) are built on these helpers too; this package
never imports from tests/.
"""
from __future__ import annotations

import hashlib
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

HOST = "127.0.0.1"
DCMTK_DIR = Path(os.environ.get("FASTROUTE_DCMTK_DIR", "/usr/bin"))
ORTHANC_BIN = Path(os.environ.get("FASTROUTE_ORTHANC", "/usr/sbin/Orthanc"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent

T = TypeVar("T")


class BenchError(RuntimeError):
    """A peer is missing, did not start, or a run could not complete; the message says why."""


class WaitTimeout(BenchError, TimeoutError):
    """wait_until's deadline passed: a BenchError to the harness, a TimeoutError to the tests."""


class PeerUnavailable(BenchError):
    """A peer program is not installed (or is not the program we expect)."""


class PeerFailed(BenchError):
    """A peer exited early or did not become ready; the message carries its log tail."""


class PeerLeak(BenchError):
    """A peer process (or one of its children) survived its stop()."""


# -- polling and ports ---------------------------------------------------------------------------

def wait_until(predicate: Callable[[], T | None], timeout: float, interval: float = 0.05,
               message: str | Callable[[], str] = "condition not met") -> T:
    """Poll ``predicate`` until it returns something truthy and return that value.

    A deadline, never a fixed sleep. ``message`` may be a callable so that costly diagnostics
    (log tails) are built only on failure. Raises WaitTimeout (a BenchError and a TimeoutError).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"{text} (after {timeout:g} s)")
        time.sleep(interval)  # the poll interval, bounded by the deadline above


_issued: set[int] = set()
_issued_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and was not handed out before.

    The kernel picks it (bind to port 0); remembering issued ports avoids handing the same one
    to two peers of one run, and lets a test session check that none is left listening.
    """
    with _issued_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port = int(s.getsockname()[1])
            if port not in _issued:
                _issued.add(port)
                return port
    raise BenchError("no fresh free TCP port after 50 tries")


def issued_ports() -> frozenset[int]:
    """Every port free_port() has handed out in this process."""
    with _issued_lock:
        return frozenset(_issued)


def listen_sockets() -> dict[int, int] | None:
    """{socket inode: port} of LISTEN sockets (from /proc/net/tcp{,6}); None without /proc."""
    out: dict[int, int] = {}
    found = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as fh:
                next(fh)
                for line in fh:
                    f = line.split()
                    if f[3] == "0A":  # TCP_LISTEN
                        out[int(f[9])] = int(f[1].rsplit(":", 1)[1], 16)
            found = True
        except OSError:
            continue
    return out if found else None


def fd_targets(pid: int) -> list[str] | None:
    """What the open file descriptors of ``pid`` point to (paths, ``socket:[inode]``, ...);
    None when /proc cannot tell (the process is gone, or there is no /proc)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    out = []
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def socket_inodes(pid: int) -> set[int] | None:
    """Inodes of the sockets a process holds open; None if /proc cannot tell."""
    targets = fd_targets(pid)
    if targets is None:
        return None
    return {int(t[8:-1]) for t in targets if t.startswith("socket:[")}


def group_listens(pgid: int, port: int) -> bool:
    """Whether a process of group ``pgid`` listens on ``port`` (no probe connection is made)."""
    inodes = {i for i, p in (listen_sockets() or {}).items() if p == port}
    return bool(inodes) and any(inodes & (socket_inodes(pid) or set()) for pid in group_members(pgid))


# -- /proc ---------------------------------------------------------------------------------------

def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (0 = state, 1 = ppid, 2 = pgrp, ...)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def group_members(pgid: int) -> list[int]:
    """PIDs (zombies excluded) in process group ``pgid``; empty without /proc."""
    out = []
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return []
    for entry in entries:
        if entry.name.isdigit():
            f = stat_fields(int(entry.name))
            if f is not None and int(f[2]) == pgid and f[0] not in ("Z", "X"):
                out.append(int(entry.name))
    return sorted(out)


def group_alive(pgid: int) -> bool:
    """Whether any process but a zombie is left in process group ``pgid``.

    Zombies are ignored: when the container's PID 1 does not reap orphans, the dead children
    of a killed peer linger as zombies, which hold no port or file. Without /proc: whether
    the group can still be signalled.
    """
    if os.path.isdir("/proc/self"):
        return bool(group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def cpu_seconds(pid: int) -> float | None:
    """utime+stime of a process plus that of its reaped children (forked associations)."""
    f = stat_fields(pid)
    if f is None:
        return None
    return (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon (heap and other private memory) and RssFile (mapped
    files, such as the LMDB spool's pages) in KiB; empty when the process is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                    out[line.split(":", 1)[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def comm(pid: int) -> str:
    """A short name for a process: multiprocessing's helpers by role, else its command."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if "resource_tracker" in cmdline:
            return "multiprocessing resource tracker"
        if "forkserver" in cmdline:
            return "multiprocessing forkserver"
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


@dataclass
class ProcSample:
    """CPU seconds and memory of one process at one moment."""

    name: str
    pid: int
    cpu_s: float
    rss_kib: int
    hwm_kib: int


def sample(named: Mapping[int, str]) -> dict[int, ProcSample]:
    """Samples of the given {pid: name}; processes that are gone are left out."""
    out = {}
    for pid, name in named.items():
        cpu = cpu_seconds(pid)
        if cpu is None:
            continue
        mem = memory_kib(pid)
        out[pid] = ProcSample(name, pid, cpu, mem.get("VmRSS", 0), mem.get("VmHWM", 0))
    return out


def usage(before: Mapping[int, ProcSample], after: Mapping[int, ProcSample]) -> dict[str, dict[str, float]]:
    """{process role: {cpu_s, peak_rss_mib}} between two samples, summed over the processes
    of one role (a forking receiver's associations); peak RSS is the largest of them. A
    process that started in between counts from zero."""
    out: dict[str, dict[str, float]] = {}
    for pid, a in after.items():
        b = before.get(pid)
        row = out.setdefault(a.name, {"cpu_s": 0.0, "peak_rss_mib": 0.0})
        row["cpu_s"] = round(row["cpu_s"] + a.cpu_s - (b.cpu_s if b else 0.0), 3)
        row["peak_rss_mib"] = max(row["peak_rss_mib"], round(a.hwm_kib / 1024, 1))
    return out


def self_cpu() -> float:
    """CPU seconds of this (the harness) process so far, its threads included."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- programs ------------------------------------------------------------------------------------

_tools: dict[str, Path] = {}


def dcmtk_tool(name: str) -> Path:
    """Absolute path of a DCMTK program, checked once to really be DCMTK.

    Raises PeerUnavailable with an installation hint, because the same name on PATH is
    often pynetdicom's Python re-implementation.
    """
    cached = _tools.get(name)
    if cached is not None:
        return cached
    path = DCMTK_DIR / name
    if not os.access(path, os.X_OK):
        raise PeerUnavailable(f"DCMTK {name} not found at {path}: install the Debian package 'dcmtk' "
                              f"(or set FASTROUTE_DCMTK_DIR); the '{name}' on PATH may be pynetdicom's, "
                              "not DCMTK's")
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10,
                         check=False)
    if "dcmtk" not in (out.stdout + out.stderr).lower():
        raise PeerUnavailable(f"{path} does not look like DCMTK: {out.stdout[:200]!r}")
    _tools[name] = path
    return path


def orthanc_binary() -> Path:
    """Absolute path of the Orthanc server; raises PeerUnavailable with a hint."""
    if not os.access(ORTHANC_BIN, os.X_OK):
        raise PeerUnavailable(f"Orthanc not found at {ORTHANC_BIN}: install the Debian package "
                              "'orthanc' (or set FASTROUTE_ORTHANC)")
    return ORTHANC_BIN


def dcmtk_version() -> str:
    out = subprocess.run([str(dcmtk_tool("dcmsend")), "--version"], capture_output=True, text=True,
                         timeout=10, check=False)
    m = re.search(r"v(\d+\.\d+\.\d+)", out.stdout + out.stderr)
    return f"DCMTK {m.group(1)}" if m else "DCMTK (unknown version)"


def orthanc_version() -> str:
    if not os.access(ORTHANC_BIN, os.X_OK):
        return "not installed"
    out = subprocess.run([str(ORTHANC_BIN), "--version"], capture_output=True, text=True,
                         timeout=10, check=False)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else "Orthanc (unknown version)"


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK programs: TCP_NODELAY=1, without which they crawl on loopback
    (Nagle + delayed ACK: ~20 objects/s)."""
    return {**os.environ, "TCP_NODELAY": "1"}


_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
/* Rewrite wildcard binds to loopback: DCMTK 3.6.7 and Orthanc 1.10 have no bind option. */
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in a; memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real(fd, (const struct sockaddr *)&a, sizeof a);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a; memcpy(&a, addr, sizeof a);
        if (memcmp(&a.sin6_addr, &in6addr_any, sizeof a.sin6_addr) == 0) {
            a.sin6_addr = in6addr_loopback;
            return real(fd, (const struct sockaddr *)&a, sizeof a);
        }
    }
    return real(fd, addr, len);
}
"""
_shim: list[Path | None] = []
_shim_lock = threading.Lock()


def loopback_shim() -> Path | None:
    """An LD_PRELOAD library pinning the servers' wildcard binds to 127.0.0.1, built once.

    Returns None (with a warning) when no C compiler is available, or the build fails; the
    peers then listen on all interfaces, on a random port, for the length of a run or test.
    """
    with _shim_lock:
        if _shim:
            return _shim[0]
        digest = hashlib.sha256(_SHIM.encode()).hexdigest()[:12]
        lib = Path(tempfile.gettempdir()) / f"fastroute-peers-{os.getuid()}" / f"bind_loopback-{digest}.so"
        result: Path | None = lib
        if not lib.exists():
            result = None
            cc = shutil.which("cc") or shutil.which("gcc")
            if cc:
                lib.parent.mkdir(parents=True, exist_ok=True)
                src = lib.with_suffix(".c")
                src.write_text(_SHIM)
                tmp = lib.with_name(f"{lib.stem}.{os.getpid()}.so")
                built = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"],
                                       capture_output=True, text=True, timeout=60, check=False)
                if built.returncode == 0:
                    os.replace(tmp, lib)  # atomic: concurrent builders agree on one file
                    result = lib
                else:
                    warnings.warn(f"loopback bind shim failed to build: {built.stderr[-500:]}")
            else:
                warnings.warn("no C compiler: DCMTK/Orthanc peers will listen on all interfaces")
        _shim.append(result)
        return result


def server_env() -> dict[str, str]:
    """dcmtk_env() with the loopback shim preloaded (for DCMTK receivers and Orthanc)."""
    env = dcmtk_env()
    shim = loopback_shim()
    if shim is not None:
        env["LD_PRELOAD"] = " ".join(filter(None, [str(shim), env.get("LD_PRELOAD", "")]))
    return env


# -- managed processes ---------------------------------------------------------------------------

_live: set["Managed"] = set()
_live_lock = threading.Lock()


def live_processes() -> list["Managed"]:
    """Managed processes started and not yet stopped (a test session asserts none is left)."""
    with _live_lock:
        return sorted(_live, key=lambda p: p.pid)


class Managed:
    """A long-running child in its own session, logging to a file; stopped by process group."""

    def __init__(self, argv: Sequence[str | os.PathLike[str]], name: str, log: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.name = name
        self.log = log
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} not started"
        return self.popen.pid

    def start(self) -> "Managed":
        if self.popen is not None:
            raise BenchError(f"{self.name} already started (pid {self.pid})")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self._log_offset = log.tell()  # a restart appends; its tail starts here
            # A new session makes pid == pgid, so stop() also reaches forked children.
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                          start_new_session=True)
        with _live_lock:
            _live.add(self)
        return self

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def describe(self) -> str:
        pid = self.popen.pid if self.popen is not None else None
        return f"{self.name} (pid {pid}): {shlex.join(self.argv)}"

    def check(self) -> None:
        """Raise PeerFailed, with the log tail, if the process was never started or has exited."""
        if self.popen is None:
            raise PeerFailed(f"{self.name} was never started")
        rc = self.popen.poll()
        if rc is not None:
            raise PeerFailed(f"{self.describe()} exited with status {rc}; log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log written since this process started."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds, then verify it is gone.

        Raises PeerLeak if a process of the group survives SIGKILL for 10 s (it then stays in
        live_processes()). Idempotent.
        """
        popen = self.popen
        if popen is None:
            return
        pgid = popen.pid
        try:
            if popen.poll() is None:
                _killpg(pgid, signal.SIGTERM)
                try:
                    popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    _killpg(pgid, signal.SIGKILL)
                    popen.wait(timeout=10)
            if group_alive(pgid):  # children (forked associations, -xcr shells) may remain
                _killpg(pgid, signal.SIGKILL)
                try:
                    wait_until(lambda: not group_alive(pgid), 10,
                               message=f"process group {pgid} of {self.name} survived SIGKILL")
                except WaitTimeout as exc:
                    raise PeerLeak(f"{self.describe()}: {exc}") from None
        finally:
            if not group_alive(pgid):
                with _live_lock:
                    _live.discard(self)

    def kill(self) -> None:
        """Stop without a grace period (crash simulation, or throw-away state)."""
        self.stop(grace=0.0)


def start_ready(launch: Callable[[], Managed], ready: Callable[[Managed], bool], timeout: float,
                message: Callable[[Managed], str], interval: float = 0.05,
                fresh_ports: Callable[[], bool] = lambda: True) -> Managed:
    """Start a server with ``launch`` and poll until ``ready`` (PeerFailed once it exits,
    WaitTimeout at the deadline); a server that did not become ready is killed.

    free_port() can only say a port *was* free: when another process took it first, the server
    fails with "Address already in use" and is launched again (twice at most) if
    ``fresh_ports()`` says it takes fresh ones (``launch`` may pick them itself).
    """
    for attempt in range(3):
        proc = launch()

        def up() -> bool:
            proc.check()
            return ready(proc)
        try:
            wait_until(up, timeout, interval, message=lambda: message(proc))
            return proc
        except BenchError as exc:
            proc.kill()
            if "already in use" not in str(exc) or attempt == 2 or not fresh_ports():
                raise
        except BaseException:
            proc.kill()
            raise
    raise AssertionError("unreachable")


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_all() -> None:
    """Stop every process this harness started and has not stopped yet (used on errors)."""
    for proc in live_processes():
        try:
            proc.kill()
        except Exception as exc:  # noqa: BLE001 — keep stopping the others
            print(f"bench: could not stop {proc.name}: {exc}", file=sys.stderr)
    with _jobs_lock:
        jobs = list(_jobs)
    for job in jobs:
        job.kill()


# -- senders (one-shot, reaped with wait4 for their rusage) ---------------------------------------

_jobs: set["SendJob"] = set()
_jobs_lock = threading.Lock()


@dataclass(eq=False)
class SendJob:
    """One dcmsend/storescu process; ``wait`` returns once it exited, with its resource use."""

    argv: list[str]
    name: str
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    returncode: int | None = None
    cpu_s: float = 0.0
    ended: float | None = None
    peak_kib: int = 0            # VmHWM seen while it ran (see poll_memory)
    _done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "SendJob":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=dcmtk_env(),
                                          start_new_session=True)
        with _jobs_lock:
            _jobs.add(self)
        threading.Thread(target=self._reap, name=f"reap-{self.name}", daemon=True).start()
        return self

    def _reap(self) -> None:
        assert self.popen is not None
        _, status, ru = os.wait4(self.popen.pid, 0)
        self.ended = time.monotonic()
        self.returncode = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.returncode   # reaped here; Popen must not wait again
        self.cpu_s = ru.ru_utime + ru.ru_stime
        with _jobs_lock:
            _jobs.discard(self)
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def poll_memory(self) -> None:
        """Record the program's peak RSS while it runs. (wait4's ru_maxrss cannot be used:
        it includes the forking Python process's memory from before exec.)"""
        if self.popen is not None and not self._done.is_set():
            self.peak_kib = max(self.peak_kib, memory_kib(self.popen.pid).get("VmHWM", 0))

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def kill(self) -> None:
        if self.popen is not None and not self._done.is_set():
            _killpg(self.popen.pid, signal.SIGKILL)
            self._done.wait(10)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def dcmsend_argv(port: int, called_ae: str, paths: Iterable[Path], calling_ae: str = "BENCH") -> list[str]:
    """dcmsend over files and/or directories (scanned recursively), halting on a failure."""
    return [str(dcmtk_tool("dcmsend")), "-aet", calling_ae, "-aec", called_ae, "+sd", "+r",
            HOST, str(port), *map(os.fspath, paths)]


def storescu_argv(port: int, called_ae: str, paths: Iterable[Path], calling_ae: str = "BENCH") -> list[str]:
    """storescu (one association, uncompressed proposals) over files and/or directories."""
    return [str(dcmtk_tool("storescu")), "-aet", calling_ae, "-aec", called_ae, "+sd", "+r",
            HOST, str(port), *map(os.fspath, paths)]
