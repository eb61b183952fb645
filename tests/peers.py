"""Real DICOM peers on loopback for integration tests.

Every peer is a child process started in its own session, so it is stopped by its PID (and
its process group, which holds any children it forks), with a grace period before SIGKILL,
and checked to be really gone afterwards. Readiness is always polled against a deadline.

Only the absolute paths of DCMTK tools are used: pynetdicom installs Python console scripts
with the same names (storescu, storescp, echoscu, ...) that shadow DCMTK on PATH.

DCMTK 3.6.7 and Orthanc 1.10 can only listen on all interfaces; when a C compiler is present a
tiny LD_PRELOAD shim rewrites their wildcard bind() to 127.0.0.1 so nothing is exposed.

The process plumbing (free ports, polling, process groups, /proc, the shim, DCMTK lookup) is
the benchmark harness's, ``bench.procs``, re-exported here; ``bench/`` never imports tests/.
No pytest dependency.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

# Also re-exported for the tests: the exceptions, free_port, issued_ports, wait_until,
# dcmtk_tool, live_processes (``peers.wait_until`` and ``from peers import free_port`` work).
from bench.procs import (HOST, Managed, PeerFailed, PeerLeak, PeerUnavailable,  # noqa: F401
                         WaitTimeout, dcmtk_env, dcmtk_tool, fd_targets, free_port, group_members,
                         issued_ports, listen_sockets, live_processes, orthanc_binary, server_env,
                         socket_inodes, start_ready, stat_fields, wait_until)

# --------------------------------------------------------------------------------------------
# Ports


def _proc_net_listeners() -> set[int] | None:
    """Ports in LISTEN state; None where /proc is not available."""
    sockets = listen_sockets()
    return None if sockets is None else set(sockets.values())


def is_listening(port: int, host: str = HOST) -> bool:
    """Whether something listens on ``port``.

    Reads /proc on Linux so that the check itself opens no connection (a probe connection
    would show up in peer logs as a failed association); falls back to a TCP connect.
    """
    listeners = _proc_net_listeners()
    if listeners is not None:
        return port in listeners
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def process_listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on ``port``.

    Stricter than is_listening(): if another process won the race for a port that
    free_port() handed out, that port listens but our peer does not.
    """
    sockets = listen_sockets()
    held = socket_inodes(pid)
    if sockets is None or held is None:
        return is_listening(port)
    return any(sockets.get(inode) == port for inode in held)


def listening_ports(ports: Iterable[int]) -> list[int]:
    """The subset of ``ports`` on which something still listens."""
    listeners = _proc_net_listeners()
    if listeners is not None:
        return sorted(p for p in ports if p in listeners)
    return sorted(p for p in ports if is_listening(p))


def _our_pids() -> set[int]:
    """This process, its descendants and whatever is left in our peers' process groups.

    Not the whole session: other test runs sharing the machine (and maybe the session)
    may by chance listen on a port we used earlier, and must not be blamed.
    """
    me = os.getpid()
    peer_groups = {p.pid for p in live_processes() if p.pid}
    parent: dict[int, int] = {}
    ours = {me}
    for entry in os.scandir("/proc"):
        rest = stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if rest is None:
            continue
        pid, ppid, pgrp = int(entry.name), int(rest[1]), int(rest[2])
        parent[pid] = ppid
        if pgrp in peer_groups:
            ours.add(pid)
    for pid in parent:
        chain, p = [], pid
        while p in parent and p not in ours and p > 1:
            chain.append(p)
            p = parent[p]
        if p in ours:
            ours.update(chain)
    return ours


def leaked_listeners(ports: Iterable[int]) -> list[int]:
    """Those of ``ports`` on which a process of this test run still listens.

    Sockets are matched to owners through /proc/<pid>/fd, so a stranger that later got one
    of our old ports from the kernel (other test runs share the machine) is not blamed.
    Without /proc, any listener counts.
    """
    wanted = set(ports)
    sockets = listen_sockets()
    if sockets is None or not os.path.isdir("/proc/self/fd"):
        return listening_ports(wanted)
    inodes = {inode: port for inode, port in sockets.items() if port in wanted}
    if not inodes:
        return []
    leaked: set[int] = set()
    for pid in _our_pids():
        for inode in socket_inodes(pid) or ():
            if inode in inodes:
                leaked.add(inodes[inode])
    return sorted(leaked)


# --------------------------------------------------------------------------------------------
# Programs and processes (dcmtk_tool, orthanc_binary, dcmtk_env, server_env, Managed and
# live_processes come from bench.procs)

DCMTK_TOOLS = ("storescp", "storescu", "echoscu", "dcmsend", "dcmrecv")


class _Peer:
    """Shared start/stop/context-manager behaviour; subclasses say how to become ready."""

    name = "peer"
    stop_grace = 5.0
    start_timeout = 15.0

    def __init__(self, workdir: Path | None) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"fastroute-{self.name}-")) \
            if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process: Managed | None = None

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return server_env()

    def _ready(self) -> bool:
        raise NotImplementedError

    def _reassign_ports(self) -> bool:
        """Take fresh ports after losing a bind race; False when the caller fixed them."""
        return False

    def start(self) -> Self:
        """Start the program and poll until it is ready: PeerFailed if it exits first,
        WaitTimeout (a TimeoutError) if it is not ready within ``start_timeout``.

        free_port() can only say a port *was* free: if another process grabs it first, the
        peer exits with "Address already in use" and is restarted on fresh ports (twice).
        """
        if self.process is not None and self.process.running():
            return self

        def launch() -> Managed:
            self.process = Managed(self._argv(), self.name, self.workdir / f"{self.name}.log",
                                   env=self._env(), cwd=self.workdir)
            return self.process.start()

        start_ready(launch, lambda proc: self._ready(), self.start_timeout,
                    message=lambda proc: f"{proc.describe()} not ready; log:\n{proc.log_tail()}",
                    fresh_ports=self._reassign_ports)
        return self

    def stop(self) -> None:
        """Stop by PID (graceful, then SIGKILL) and verify the process is gone."""
        if self.process is not None:
            self.process.stop(self.stop_grace)

    def kill(self) -> None:
        """SIGKILL at once, e.g. to simulate a destination crashing mid-transfer."""
        if self.process is not None:
            self.process.kill()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def log(self) -> str:
        return self.process.log_tail(10_000) if self.process is not None else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop; a temporary workdir this peer created itself is removed too."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Association profiles (DCMTK config files)

# Transfer syntaxes DCMTK 3.6.7 knows, uncompressed first (the acceptor's preference order).
ALL_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",     # Explicit VR Little Endian
    "1.2.840.10008.1.2",       # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",     # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Lossless
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2
    "1.2.840.10008.1.2.4.100",  # MPEG2 MP@ML
    "1.2.840.10008.1.2.4.101",  # MPEG2 MP@HL
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC HP 4.1
    "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC BD
    "1.2.840.10008.1.2.4.104",  # MPEG-4 AVC 2D
    "1.2.840.10008.1.2.4.105",  # MPEG-4 AVC 3D
    "1.2.840.10008.1.2.4.106",  # MPEG-4 AVC Stereo
    "1.2.840.10008.1.2.4.107",  # HEVC Main
    "1.2.840.10008.1.2.4.108",  # HEVC Main 10
    "1.2.840.10008.1.2.5",     # RLE Lossless
)
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
VERIFICATION = "1.2.840.10008.1.1"
_MAX_CONTEXTS = 128  # odd presentation context IDs 1..255


def storage_sop_classes() -> list[str]:
    """The storage SOP classes an acceptor profile lists by default.

    DCMTK caps a presentation context list at 128 entries, so this is pynetdicom's
    selection of the 120 most used (CT, MR, CR, DX, US, SC, SR, RT, PET, ...); pass
    ``sop_classes`` explicitly for anything rarer.
    """
    from pynetdicom.presentation import StoragePresentationContexts

    return [str(cx.abstract_syntax) for cx in StoragePresentationContexts]


def write_scp_config(
    path: Path, transfer_syntaxes: Sequence[str], sop_classes: Sequence[str] | None = None
) -> tuple[Path, str]:
    """Write an acceptor profile accepting ``sop_classes`` only in ``transfer_syntaxes``.

    For storescp/dcmrecv ``--config-file``; returns (file, profile name). The order of
    ``transfer_syntaxes`` is the acceptor's preference when a context offers several.
    """
    classes = storage_sop_classes() if sop_classes is None else list(sop_classes)
    if len(classes) + 1 > _MAX_CONTEXTS:
        raise ValueError(f"{len(classes)} SOP classes: DCMTK accepts at most "
                         f"{_MAX_CONTEXTS - 1} besides Verification in one profile")
    lines = ["[[TransferSyntaxes]]", "[Accepted]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(transfer_syntaxes, 1)]
    lines += ["[Verification]", "TransferSyntax1 = 1.2.840.10008.1.2",
              "TransferSyntax2 = 1.2.840.10008.1.2.1"]
    lines += ["[[PresentationContexts]]", "[Contexts]",
              f"PresentationContext1 = {VERIFICATION}\\Verification"]
    lines += [f"PresentationContext{i} = {uid}\\Accepted" for i, uid in enumerate(classes, 2)]
    lines += ["[[Profiles]]", "[Fastroute]", "PresentationContexts = Contexts", ""]
    path.write_text("\n".join(lines))
    return path, "Fastroute"


def _dicom_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand directories (recursively) into the files they hold, in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        else:
            out.append(p)
    return out


def write_scu_config(path: Path, files: Sequence[Path]) -> tuple[Path, str]:
    """Write a requestor profile that proposes each file's own transfer syntax.

    storescu's command-line options propose at most one compressed syntax per run, so this
    profile gives every (SOP class, transfer syntax) pair found in the files a presentation
    context of its own, plus Explicit and Implicit VR Little Endian contexts as a fallback.
    storescu then picks, per file, the accepted context whose syntax matches the file's.
    """
    import pydicom

    pairs: dict[str, list[str]] = {}
    for f in files:
        meta = pydicom.filereader.read_file_meta_info(f)
        sop = str(meta.MediaStorageSOPClassUID)
        ts = str(meta.TransferSyntaxUID)
        wanted = pairs.setdefault(sop, [])
        for uid in (ts, *_UNCOMPRESSED[:2]):
            if uid not in wanted:
                wanted.append(uid)
    count = sum(len(v) for v in pairs.values())
    if count > _MAX_CONTEXTS:
        raise ValueError(
            f"{count} presentation contexts needed (> {_MAX_CONTEXTS}): send fewer distinct "
            "SOP class / transfer syntax combinations per storescu call"
        )
    all_ts = sorted({ts for v in pairs.values() for ts in v})
    key = {ts: f"TS{i}" for i, ts in enumerate(all_ts, 1)}
    lines = ["[[TransferSyntaxes]]"]
    for ts in all_ts:
        lines += [f"[{key[ts]}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    n = 0
    for sop, tss in pairs.items():
        for ts in tss:
            n += 1
            lines.append(f"PresentationContext{n} = {sop}\\{key[ts]}")
    lines += ["[[Profiles]]", "[Original]", "PresentationContexts = Contexts", ""]
    path.write_text("\n".join(lines))
    return path, "Original"


# --------------------------------------------------------------------------------------------
# Receivers


Accept = Literal["all", "uncompressed", "little", "big", "implicit"]


class _Receiver(_Peer):
    """A DCMTK storage SCP writing ``<prefix>.<SOPInstanceUID>.dcm`` files into ``output``.

    DCMTK writes each file under its final name and holds it open until it is complete, so a
    file counts once no process of the receiver holds it open (read from /proc). Where /proc
    cannot tell, wait_for() also wants the listing unchanged over two polls.
    The optional reception log (``--exec-on-reception``, a shell forked per object) records
    every C-STORE the receiver answered, duplicates included; it is not used for completion,
    since an object whose response could not be sent is stored but never logged.
    """

    def __init__(self, port: int | None, ae_title: str, output: Path | None,
                 workdir: Path | None) -> None:
        super().__init__(workdir)
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self.ae_title = ae_title
        self.output = self.workdir / "received" if output is None else Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.reception_log = self.workdir / "receptions.log"
        self._last_listing: tuple[tuple[str, int], ...] | None = None

    def _ready(self) -> bool:
        return self.pid is not None and process_listens(self.pid, self.port)

    def _reassign_ports(self) -> bool:
        if self._auto_port:
            self.port = free_port()
        return self._auto_port

    def receptions(self) -> list[str]:
        """File names in the order their C-STOREs were answered (needs ``track=True``)."""
        try:
            return self.reception_log.read_text().split()
        except FileNotFoundError:
            return []

    def _open_paths(self) -> set[str] | None:
        """Real paths of the files the receiver's processes hold open; None if unknown."""
        if self.pid is None:
            return set()
        if not os.path.isdir("/proc/self"):
            return None
        return {target for pid in group_members(self.pid) for target in fd_targets(pid) or ()}

    def files(self) -> list[Path]:
        """Received files that are complete (every file, where /proc cannot tell)."""
        files = sorted(p for p in self.output.rglob("*.dcm") if p.is_file())
        open_now = self._open_paths()  # read after listing: a file seen open is skipped
        if not open_now:
            return files
        return [p for p in files if os.path.realpath(p) not in open_now]

    def file_for(self, sop_instance_uid: str) -> Path | None:
        """The received file of one SOP instance, if it has arrived."""
        suffix = f".{sop_instance_uid}.dcm"
        for p in self.files():
            if p.name.endswith(suffix) or p.name == f"{sop_instance_uid}.dcm":
                return p
        return None

    def wait_for(self, n: int, timeout: float = 30.0) -> list[Path]:
        """Poll until at least ``n`` distinct complete files arrived; returns them all."""
        def enough() -> list[Path] | None:
            if self.process is not None:
                self.process.check()
            files = self.files()
            if self._open_paths() is None:  # no /proc: also want two equal listings
                listing = tuple((p.name, p.stat().st_size) for p in files)
                stable, self._last_listing = listing == self._last_listing, listing
                if not stable:
                    return None
            return files if len(files) >= n else None

        def why() -> str:
            log = self.process.log_tail() if self.process is not None else ""
            return f"{self.name} on port {self.port}: {len(self.files())} of {n} files; log:\n{log}"

        self._last_listing = None
        return wait_until(enough, timeout, interval=0.05, message=why)

    def clear(self) -> None:
        """Forget what was received so far (files and reception log)."""
        for p in self.output.rglob("*"):
            if p.is_file():
                p.unlink()
        self.reception_log.unlink(missing_ok=True)


class StoreSCP(_Receiver):
    """DCMTK storescp on 127.0.0.1, keeping every object in the transfer syntax it arrived in.

    ``accept``: "all" (+xa, compressed included), "uncompressed" (DCMTK default), "little"
    (+xe), "big" (+xb), "implicit" (+xi, Implicit VR LE only), or a list of transfer syntax
    UIDs (e.g. only Explicit VR LE) which becomes a --config-file profile.
    Fault knobs map onto storescp's own options: ``refuse`` (refuse every association),
    ``reject_no_impl_uid`` (--reject: reject associations without implementation class UID),
    ``ignore`` (receive but do not store), ``sleep_after`` / ``sleep_during`` seconds (a slow
    destination), ``abort_after`` (abort after receiving the C-STORE-RQ, before responding;
    note DCMTK then does NOT store it: for "stored but unanswered" put a FaultProxy with
    ``cut_down_at_pdu=P_DATA_TF`` in front) and ``abort_during`` (abort mid-request).
    ``fork`` serves associations concurrently (one child each), as a busy PACS would.
    """

    name = "storescp"

    def __init__(
        self,
        ae_title: str = "STORESCP",
        output: Path | None = None,
        *,
        port: int | None = None,
        accept: Accept | Sequence[str] = "all",
        sop_classes: Sequence[str] | None = None,
        bit_preserving: bool = False,
        fork: bool = False,
        refuse: bool = False,
        reject_no_impl_uid: bool = False,
        ignore: bool = False,
        sleep_after: int = 0,
        sleep_during: int = 0,
        abort_after: bool = False,
        abort_during: bool = False,
        promiscuous: bool = False,
        max_pdu: int | None = None,
        track: bool = True,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
    ) -> None:
        super().__init__(port, ae_title, output, workdir)
        self.accept = accept
        self.sop_classes = sop_classes
        self.bit_preserving = bit_preserving
        self.fork = fork
        self.options = dict(refuse=refuse, reject=reject_no_impl_uid, ignore=ignore,
                            abort_after=abort_after, abort_during=abort_during,
                            promiscuous=promiscuous)
        self.sleep_after = sleep_after
        self.sleep_during = sleep_during
        self.max_pdu = max_pdu
        self.track = track
        self.extra_args = tuple(extra_args)

    def _argv(self) -> list[str]:
        argv: list[str] = [str(dcmtk_tool("storescp")), "-aet", self.ae_title,
                           "-od", str(self.output), "-uf", "-fe", ".dcm", "-dhl"]
        if isinstance(self.accept, str):
            flags = {"all": ["+xa"], "uncompressed": ["+x="], "little": ["+xe"],
                     "big": ["+xb"], "implicit": ["+xi"]}
            if self.accept not in flags:
                raise ValueError(f"accept={self.accept!r}: expected one of {sorted(flags)}")
            argv += flags[self.accept]
        else:
            cfg, profile = write_scp_config(self.workdir / "storescp.cfg", list(self.accept),
                                            self.sop_classes)
            argv += ["-xf", str(cfg), profile]
        argv += ["+B"] if self.bit_preserving else []
        argv += ["--fork"] if self.fork else []
        flag_names = {"refuse": "--refuse", "reject": "--reject", "ignore": "--ignore",
                      "abort_after": "--abort-after", "abort_during": "--abort-during",
                      "promiscuous": "-pm"}
        argv += [flag_names[k] for k, on in self.options.items() if on]
        if self.sleep_after:
            argv += ["--sleep-after", str(self.sleep_after)]
        if self.sleep_during:
            argv += ["--sleep-during", str(self.sleep_during)]
        if self.max_pdu:
            argv += ["-pdu", str(self.max_pdu)]
        if self.track and not self.options["ignore"]:
            # '#f' is the stored file's name; the shell runs after the response was sent.
            argv += ["-xcr", f"echo #f >> {shlex.quote(str(self.reception_log))}"]
        argv += [*self.extra_args, str(self.port)]
        return argv


class DcmRecv(_Receiver):
    """DCMTK dcmrecv (the simpler DcmStorageSCP-based receiver) on 127.0.0.1.

    It accepts nothing but Verification without a profile, so one is always generated from
    ``accept`` ("all" or a list of transfer syntax UIDs). It has no exec hook, hence no
    reception log.
    """

    name = "dcmrecv"

    def __init__(
        self,
        ae_title: str = "DCMRECV",
        output: Path | None = None,
        *,
        port: int | None = None,
        accept: Literal["all"] | Sequence[str] = "all",
        sop_classes: Sequence[str] | None = None,
        bit_preserving: bool = False,
        ignore: bool = False,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
    ) -> None:
        super().__init__(port, ae_title, output, workdir)
        self.accept = ALL_TRANSFER_SYNTAXES if accept == "all" else tuple(accept)
        self.sop_classes = sop_classes
        self.bit_preserving = bit_preserving
        self.ignore = ignore
        self.extra_args = tuple(extra_args)

    def _argv(self) -> list[str]:
        cfg, profile = write_scp_config(self.workdir / "dcmrecv.cfg", self.accept,
                                        self.sop_classes)
        argv = [str(dcmtk_tool("dcmrecv")), "-aet", self.ae_title, "-od", str(self.output),
                "-fe", ".dcm", "-dhl", "-xf", str(cfg), profile]
        argv += ["+B"] if self.bit_preserving else []
        argv += ["--ignore"] if self.ignore else []
        return [*argv, *self.extra_args, str(self.port)]


# --------------------------------------------------------------------------------------------
# Senders (one-shot commands)


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK client; on timeout subprocess.run kills it by PID before raising."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=dcmtk_env(), check=False, stdin=subprocess.DEVNULL)


def storescu(
    port: int,
    files: Iterable[str | os.PathLike[str]],
    called_ae: str = "FASTROUTE",
    calling_ae: str = "STORESCU",
    host: str = HOST,
    *,
    propose: Literal["uncompressed", "original"] = "uncompressed",
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Send files (directories are walked) with DCMTK storescu in one association.

    ``propose="uncompressed"`` is storescu's default (compressed files fail unless
    extra_args adds e.g. -xs); ``"original"`` proposes each file's own transfer syntax
    through a generated --config-file profile, so a JPEG 2000, RLE, deflated or big-endian
    file travels as it is stored. Returns the CompletedProcess (check ``returncode``).
    """
    paths = _dicom_files(files)
    argv = [str(dcmtk_tool("storescu")), "-aet", calling_ae, "-aec", called_ae]
    with tempfile.TemporaryDirectory(prefix="fastroute-storescu-") as tmp:
        if propose == "original":
            cfg, profile = write_scu_config(Path(tmp) / "storescu.cfg", paths)
            argv += ["-xf", str(cfg), profile]
        elif propose != "uncompressed":
            raise ValueError(f"propose={propose!r}: expected 'uncompressed' or 'original'")
        argv += [*extra_args, host, str(port), *map(str, paths)]
        return _run(argv, timeout)


def echoscu(
    port: int,
    called_ae: str = "FASTROUTE",
    calling_ae: str = "ECHOSCU",
    host: str = HOST,
    *,
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """C-ECHO with DCMTK echoscu; returncode 0 means the association and echo succeeded."""
    argv = [str(dcmtk_tool("echoscu")), "-aet", calling_ae, "-aec", called_ae,
            *extra_args, host, str(port)]
    return _run(argv, timeout)


def dcmsend(
    port: int,
    files: Iterable[str | os.PathLike[str]],
    called_ae: str = "FASTROUTE",
    calling_ae: str = "DCMSEND",
    host: str = HOST,
    *,
    decompress: Literal["never", "lossless", "lossy"] = "lossless",
    single_association: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Send files or directories with DCMTK dcmsend.

    dcmsend proposes each file's own transfer syntax natively; ``decompress`` says whether it
    may fall back to uncompressed when that is refused (never: -dn, DCMTK default: +dls).
    """
    flags = {"never": "-dn", "lossless": "+dls", "lossy": "+dly"}
    argv = [str(dcmtk_tool("dcmsend")), "-aet", calling_ae, "-aec", called_ae,
            flags[decompress], "+sd", "+r"]
    argv += ["-ma"] if single_association else []
    argv += [*extra_args, host, str(port), *(os.fspath(f) for f in files)]
    return _run(argv, timeout)


# --------------------------------------------------------------------------------------------
# Orthanc


class Orthanc(_Peer):
    """A throw-away Orthanc with its own config, storage and index in a temp directory.

    DICOM: AE ``ae_title`` on ``dicom_port``, called AE title checked, every transfer syntax
    and unknown SOP classes accepted, any calling AE may store. HTTP: ``http_port``, REST
    without authentication, only local clients (RemoteAccessAllowed false). No plugins, no
    Lua, no job persistence: it starts in well under a second. Stopping it gracefully takes
    ~3 s (its internal poll loops); use kill() when the state is thrown away anyway.
    """

    name = "orthanc"
    stop_grace = 20.0

    def __init__(
        self,
        ae_title: str = "ORTHANC",
        *,
        dicom_port: int | None = None,
        http_port: int | None = None,
        overwrite_instances: bool = True,
        extra_config: Mapping[str, Any] | None = None,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.ae_title = ae_title
        self._auto_ports = dicom_port is None and http_port is None
        self.dicom_port = free_port() if dicom_port is None else dicom_port
        self.http_port = free_port() if http_port is None else http_port
        self.url = f"http://{HOST}:{self.http_port}"
        storage = self.workdir / "storage"
        self.config: dict[str, Any] = {
            "Name": f"fastroute-test-{self.dicom_port}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "OrthancExplorerEnabled": False,
            "HttpThreadsCount": 4,
            "DicomServerEnabled": True,
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "OrthancPeers": {},
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "UnknownSopClassAccepted": True,
            "DicomThreadsCount": 2,
            "DicomAssociationCloseDelay": 0,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "OverwriteInstances": overwrite_instances,
            "DeidentifyLogs": False,
            "MallocArenaMax": 2,
        }
        self.config.update(extra_config or {})
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _reassign_ports(self) -> bool:
        if self._auto_ports:
            self.dicom_port, self.http_port = free_port(), free_port()
            self.url = f"http://{HOST}:{self.http_port}"
            self.config.update(DicomPort=self.dicom_port, HttpPort=self.http_port)
        return self._auto_ports

    def _argv(self) -> list[str]:
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config, indent=1))
        return [str(orthanc_binary()), str(cfg)]

    def _ready(self) -> bool:
        if self.pid is None or not (process_listens(self.pid, self.dicom_port)
                                    and process_listens(self.pid, self.http_port)):
            return False
        try:
            return bool(self.get_json("/system", timeout=1.0))
        except (OSError, urllib.error.URLError):
            return False

    # REST -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float = 30.0) -> bytes:
        """One REST call; the opener ignores *_proxy variables (127.0.0.1 is never proxied)."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        with self._opener.open(req, timeout=timeout) as resp:
            data: bytes = resp.read()
            return data

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def instances(self) -> list[str]:
        """Orthanc IDs of every stored instance."""
        ids: list[str] = self.get_json("/instances")
        return ids

    def find_instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """The instance resource (``/instances/{id}``: ID, MainDicomTags, ...) or None."""
        hits = json.loads(self.request("POST", "/tools/lookup", sop_instance_uid.encode()))
        for hit in hits:
            if hit.get("Type") == "Instance":
                found: dict[str, Any] = self.get_json(f"/instances/{hit['ID']}")
                return found
        return None

    def wait_for_instance(self, sop_instance_uid: str, timeout: float = 10.0) -> dict[str, Any]:
        """Poll until the instance is indexed."""
        return wait_until(lambda: self.find_instance(sop_instance_uid), timeout,
                          message=f"instance {sop_instance_uid} not in Orthanc")

    def get_instance_file(self, instance_id: str) -> bytes:
        """The stored Part 10 file, byte for byte as Orthanc keeps it."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def instance_transfer_syntax(self, instance_id: str) -> str:
        """The transfer syntax UID Orthanc stored the instance in."""
        meta = self.request("GET", f"/instances/{instance_id}/metadata/TransferSyntax")
        return meta.decode().strip()

    def clear(self) -> None:
        """Delete every patient, so a shared server starts a test empty."""
        for pid in self.get_json("/patients"):
            self.request("DELETE", f"/patients/{pid}")


@dataclasses.dataclass(frozen=True)
class PeerCheck:
    """Why each kind of peer is unavailable (None when it is installed)."""

    dcmtk_missing: str | None
    orthanc_missing: str | None

    @staticmethod
    def probe() -> PeerCheck:
        def why(fn: Callable[[], object]) -> str | None:
            try:
                fn()
            except PeerUnavailable as exc:
                return str(exc)
            return None

        return PeerCheck(dcmtk_missing=why(lambda: [dcmtk_tool(t) for t in DCMTK_TOOLS]),
                         orthanc_missing=why(orthanc_binary))
