"""The peers a measurement runs against: DCMTK receivers, Orthanc, and the router itself.

Each is started in its own session through ``procs.Managed`` (so it is stopped by process
group), polled until it is ready against a deadline, and asked for its PIDs (for CPU and
memory figures) and for how many objects it holds.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .procs import (HOST, REPO, Managed, PeerUnavailable, comm, dcmtk_tool, fd_targets, free_port,
                    group_listens, group_members, orthanc_binary, server_env, start_ready, wait_until)


# -- receivers -----------------------------------------------------------------------------------

# DCMTK caps an acceptor profile at 128 presentation contexts; these SOP classes cover the
# synthetic data (CT, MR, CR, DX, US, US multi-frame, SC) plus the common rest.
_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2",
                      "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                      "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
                      "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                      "1.2.840.10008.1.2.5")


def _acceptor_profile(path: Path) -> tuple[Path, str]:
    from pynetdicom.presentation import StoragePresentationContexts

    classes = [str(cx.abstract_syntax) for cx in StoragePresentationContexts][:120]
    lines = ["[[TransferSyntaxes]]", "[Accepted]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(_TRANSFER_SYNTAXES, 1)]
    lines += ["[Verification]", "TransferSyntax1 = 1.2.840.10008.1.2",
              "TransferSyntax2 = 1.2.840.10008.1.2.1",
              "[[PresentationContexts]]", "[Contexts]",
              "PresentationContext1 = 1.2.840.10008.1.1\\Verification"]
    lines += [f"PresentationContext{i} = {uid}\\Accepted" for i, uid in enumerate(classes, 2)]
    lines += ["[[Profiles]]", "[Bench]", "PresentationContexts = Contexts", ""]
    path.write_text("\n".join(lines))
    return path, "Bench"


class Receiver:
    """A DCMTK storage SCP on 127.0.0.1 writing ``[prefix.]<SOPInstanceUID>.dcm`` files.

    ``kind``: "dcmrecv" (one association at a time) or "storescp" (``--fork``: one child per
    association, for concurrent associations). ``ignore`` receives without storing (soak).
    """

    def __init__(self, kind: str, workdir: Path, ae_title: str, *, ignore: bool = False,
                 tls_args: list[str] | None = None) -> None:
        if kind not in ("dcmrecv", "storescp"):
            raise ValueError(f"receiver kind {kind!r}: expected dcmrecv or storescp")
        self.kind = kind
        self.tls_args = list(tls_args or [])     # ``--tls``: storescp +tls ... (DICOM TLS)
        self.workdir = workdir
        self.ae_title = ae_title
        self.ignore = ignore
        self.output = workdir / "received"
        self.port = 0
        self.proc: Managed | None = None

    @property
    def label(self) -> str:
        tls = " +tls" if self.tls_args else ""
        return f"{self.kind}{tls}{' --fork' if self.kind == 'storescp' else ''} ({self.ae_title})"

    def start(self) -> "Receiver":
        self.output.mkdir(parents=True, exist_ok=True)

        def launch() -> Managed:
            self.port = free_port()        # a fresh one on every attempt
            if self.kind == "dcmrecv":
                cfg, profile = _acceptor_profile(self.workdir / "dcmrecv.cfg")
                argv = [str(dcmtk_tool("dcmrecv")), "-aet", self.ae_title, "-od", str(self.output),
                        "-fe", ".dcm", "-dhl", "-xf", str(cfg), profile]
            else:
                argv = [str(dcmtk_tool("storescp")), "-aet", self.ae_title, "-od", str(self.output),
                        "-uf", "-fe", ".dcm", "-dhl", "+xa", "--fork"]
            argv += ["--ignore"] if self.ignore else []
            argv += self.tls_args
            self.proc = Managed([*argv, str(self.port)], self.kind, self.workdir / f"{self.kind}.log",
                                env=server_env(), cwd=self.workdir)
            return self.proc.start()

        start_ready(launch, lambda proc: group_listens(proc.pid, self.port), 15,
                    message=lambda proc: f"{self.label} did not listen on {self.port}:\n{proc.log_tail()}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(5.0)

    def pids(self) -> dict[int, str]:
        if self.proc is None or not self.proc.running():
            return {}
        return {pid: f"{self.kind}({self.ae_title})" for pid in group_members(self.proc.pid)}

    def count(self) -> int:
        """Files present (complete or not): cheap enough to poll."""
        try:
            return sum(1 for e in os.scandir(self.output) if e.name.endswith(".dcm"))
        except FileNotFoundError:
            return 0

    def settled(self, expected: set[str]) -> bool | str:
        """True once exactly the ``expected`` SOP instances are stored and no file is still
        held open by the receiver; False while not yet; a message when some are missing."""
        if self.proc is not None:
            prefix = str(self.output)
            for pid in group_members(self.proc.pid):
                if any(target.startswith(prefix) for target in fd_targets(pid) or ()):
                    return False
        uids = set()
        for e in os.scandir(self.output):
            if e.name.endswith(".dcm"):
                stem = e.name[:-4]
                if not stem[:1].isdigit():           # a modality prefix such as "CT."
                    stem = stem.split(".", 1)[-1]
                uids.add(stem)
        if uids == expected:
            return True
        missing, extra = expected - uids, uids - expected
        return (f"{self.label}: {len(missing)} of {len(expected)} objects missing"
                + (f" (e.g. {min(missing)})" if missing else "")
                + (f", {len(extra)} unexpected" if extra else ""))

    def clear(self) -> None:
        shutil.rmtree(self.output, ignore_errors=True)
        self.output.mkdir(parents=True, exist_ok=True)


class Orthanc:
    """A throw-away Orthanc (Debian's /usr/sbin/Orthanc) with its own storage and index."""

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC") -> None:
        self.workdir = workdir
        self.ae_title = ae_title
        self.port = 0
        self.http_port = 0
        self.proc: Managed | None = None
        self.label = f"Orthanc ({ae_title})"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def start(self) -> "Orthanc":
        try:
            binary = orthanc_binary()
        except PeerUnavailable as exc:
            raise PeerUnavailable(f"{exc}, or leave out --orthanc") from None

        def launch() -> Managed:
            self.port, self.http_port = free_port(), free_port()   # fresh ones on every attempt
            storage = self.workdir / "storage"
            shutil.rmtree(storage, ignore_errors=True)
            config = {
                "Name": f"fastroute-bench-{self.port}", "StorageDirectory": str(storage),
                "IndexDirectory": str(storage), "StorageCompression": False, "Plugins": [],
                "LuaScripts": [], "HttpServerEnabled": True, "HttpPort": self.http_port,
                "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "SslEnabled": False,
                "OrthancExplorerEnabled": False, "DicomServerEnabled": True,
                "DicomAet": self.ae_title, "DicomPort": self.port, "DicomCheckCalledAet": True,
                "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
                "DicomModalities": {}, "OrthancPeers": {},
                "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"], "UnknownSopClassAccepted": True,
                "DicomAssociationCloseDelay": 0, "SaveJobs": False, "OverwriteInstances": True,
                "MallocArenaMax": 2,
            }
            cfg = self.workdir / "orthanc.json"
            self.workdir.mkdir(parents=True, exist_ok=True)
            cfg.write_text(json.dumps(config, indent=1))
            self.proc = Managed([str(binary), str(cfg)], "orthanc", self.workdir / "orthanc.log",
                                env=server_env(), cwd=self.workdir)
            return self.proc.start()

        def ready(proc: Managed) -> bool:
            if not (group_listens(proc.pid, self.port) and group_listens(proc.pid, self.http_port)):
                return False
            try:
                return bool(self._get("/system", 1.0))
            except (OSError, urllib.error.URLError):
                return False

        start_ready(launch, ready, 30, interval=0.1,
                    message=lambda proc: f"Orthanc did not start:\n{proc.log_tail()}")
        return self

    def _get(self, path: str, timeout: float = 10.0) -> Any:
        with self._opener.open(f"http://{HOST}:{self.http_port}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()   # its state is thrown away; a graceful stop takes seconds

    def pids(self) -> dict[int, str]:
        if self.proc is None or not self.proc.running():
            return {}
        return {self.proc.pid: f"orthanc({self.ae_title})"}

    def count(self) -> int:
        try:
            return int(self._get("/statistics", 5.0)["CountInstances"])
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            return 0

    def settled(self, expected: set[str]) -> bool | str:
        """Orthanc indexes an instance before it answers the C-STORE, so the count is enough
        (OverwriteInstances: a re-sent object stays one instance)."""
        n = self.count()
        return True if n == len(expected) else False if n < len(expected) else \
            f"{self.label}: {n} instances, {len(expected)} expected"

    def clear(self) -> None:
        pass          # a fresh Orthanc is started for every run


# -- the router ----------------------------------------------------------------------------------

_STARTED = re.compile(r"started (\S+) \(pid (\d+)\)")
_BUILD = re.compile(r"listener-\d+: fastroute (\S+) \(peek=(\w+)\) from (\S+)")


class Router:
    """``python -m fastroute serve -c <generated yaml>``, as a process group, from this checkout."""

    def __init__(self, workdir: Path, config: Mapping[str, Any]) -> None:
        import yaml

        self.workdir = workdir
        self.config = dict(config)
        self.port = int(self.config["port"])
        # the TLS listener's port (bench --tls): the senders' port, ready only once it listens
        self.tls_port = int((self.config.get("tls") or {}).get("port") or 0) or None
        self.spool = Path(self.config["spool"])
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "router.yaml"
        self.path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.proc: Managed | None = None

    def start(self, timeout: float = 90.0) -> "Router":
        env = {**python_env(), "PYTHONUNBUFFERED": "1"}
        proc = self.proc = Managed([sys.executable, "-m", "fastroute", "serve", "-c", str(self.path)],
                                   "fastroute", self.workdir / "router.log", env=env,
                                   cwd=self.workdir).start()
        dests = list(self.config.get("destinations") or {})
        wait_until(lambda: self._ready(dests), timeout, 0.05,
                   message=lambda: f"router did not become ready:\n{proc.log_tail()}")
        return self

    def _ready(self, dests: list[str]) -> bool:
        assert self.proc is not None
        self.proc.check()
        if not group_listens(self.proc.pid, self.port):
            return False
        if self.tls_port is not None and not group_listens(self.proc.pid, self.tls_port):
            return False
        for d in dests:
            try:
                doc = json.loads((self.spool / "run" / f"{d}.state").read_text())
            except (OSError, ValueError):
                return False
            if doc.get("state") in (None, "stopped") or not Path(f"/proc/{int(doc.get('pid', 0))}").exists():
                return False
        return True

    def pids(self) -> dict[int, str]:
        """{pid: role} of the router's processes: supervisor, listener-N, sender-DEST, ..."""
        if self.proc is None or not self.proc.running():
            return {}
        roles = {self.proc.pid: "router supervisor"}
        try:
            for name, pid in _STARTED.findall(self.proc.log.read_text(errors="replace")):
                roles[int(pid)] = f"router {name}"
        except OSError:
            pass
        return {pid: roles.get(pid, f"router {comm(pid)}") for pid in group_members(self.proc.pid)}

    def write_lock(self) -> dict[str, dict[str, float]]:
        """{``router <process>``: write-lock totals} from the files each router process
        publishes under ``<spool>/run`` (fastroute.spool.lockstats: every 2 s and at exit),
        summed over the process's environments; read as JSON, so that a router without them
        (an older fastroute) just gives nothing."""
        out: dict[str, dict[str, float]] = {}
        for path in sorted((self.spool / "run").glob("lockstats-*.json")):
            try:
                doc = json.loads(path.read_text())
                row = out.setdefault(f"router {doc['process']}", {"wait_s": 0.0, "hold_s": 0.0,
                                                                  "transactions": 0.0})
                for e in doc["envs"].values():     # and over a restarted process's incarnations
                    row["wait_s"] = round(row["wait_s"] + float(e["wait_s"]), 4)
                    row["hold_s"] = round(row["hold_s"] + float(e["hold_s"]), 4)
                    row["transactions"] += int(e["transactions"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return out

    def build(self) -> dict[str, str]:
        """What the router's listener says it runs (its own log line at start): version, the
        peek twin (native or python) and the package's folder."""
        try:
            found = _BUILD.findall(self.proc.log.read_text(errors="replace")) if self.proc else []
        except OSError:
            found = []
        if not found:
            return {"version": "unknown", "twin": "unknown", "from": "unknown"}
        version, twin, where = found[0]
        return {"version": version, "twin": twin, "from": where}

    def check(self) -> None:
        if self.proc is not None:
            self.proc.check()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=float(self.config.get("shutdown_grace", 5)) + 15)

    def log_tail(self, lines: int = 30) -> str:
        return self.proc.log_tail(lines) if self.proc is not None else "(not started)"


# Which fastroute the router runs: "installed" (what `import fastroute` finds without this
# checkout on the path: what `fastroute --version` reports) or "checkout" (this checkout, built
# in place first). Set once by ``bench.cli`` before anything starts.
SOURCE = "installed"


def _is_repo(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == REPO
    except OSError:
        return False


def python_env() -> dict[str, str]:
    """This interpreter's environment with the checkout first on PYTHONPATH (``checkout``) or
    taken off it (``installed``), so the router and ``fastroute --version`` run the code
    being measured. Processes start outside the checkout, so `-m` does not add it either."""
    given = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not _is_repo(p)]
    path = [str(REPO), *given] if SOURCE == "checkout" else given
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def fastroute_version() -> str:
    out = subprocess.run([sys.executable, "-m", "fastroute", "--version"], capture_output=True,
                         text=True, timeout=60, env=python_env(), check=False, cwd=tempfile.gettempdir())
    return (out.stdout or out.stderr).strip() or f"unknown (exit {out.returncode})"
