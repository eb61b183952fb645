"""Run the real router (`fastroute serve`) as a process group for integration tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from peers import free_port, is_listening, wait_until

from fastroute.pids import pid_alive


class Router:
    """`fastroute serve -c <generated yaml>` on a free port; stopped by PID (its process group)."""

    def __init__(self, workdir: Path, config: Mapping[str, Any], *, ae_title: str = "FASTROUTE") -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = int(config.get("port") or free_port())
        self.config = {"ae_title": ae_title, "host": "127.0.0.1", "port": self.port,
                       "spool": str(workdir / "spool"), "min_free_bytes": "1MiB",
                       "spool_prealloc": "8MiB",     # the path exercised, cheaply
                       "shutdown_grace": 5, **config}
        self.config["port"] = self.port
        self.path = workdir / "router.yaml"
        self.log_path = workdir / "router.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config()

    @property
    def spool_path(self) -> Path:
        return Path(self.config["spool"])

    def write_config(self, **changes: Any) -> None:
        self.config.update(changes)
        self.path.write_text(yaml.safe_dump(dict(self.config), sort_keys=False))

    def start(self, timeout: float = 60.0, dests: list[str] | None = None) -> "Router":
        """Start and wait until it listens and ``dests`` (default: all) have running senders."""
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "fastroute", "serve", "-c", str(self.path)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        log.close()
        dests = list(self.config.get("destinations") or {}) if dests is None else dests
        wait_until(lambda: self._ready(dests), timeout,
                   message=lambda: f"router did not become ready:\n{self.log_tail()}")
        return self

    def _ready(self, dests: list[str]) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log_tail()}")
        if not is_listening(self.port):
            return False
        return all(self._state(d) not in (None, "stopped") for d in dests)

    def _state(self, dest: str) -> str | None:
        try:
            doc = json.loads((self.spool_path / "run" / f"{dest}.state").read_text())
            if not pid_alive(int(doc.get("pid", 0))):
                return None
            return str(doc.get("state"))
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the supervisor and wait: the graceful path."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"router did not stop within {timeout}s:\n{self.log_tail()}")
        self._reap_group()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group at once: a crash, nothing gets to clean up."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._reap_group()
        self.proc = None

    def _reap_group(self) -> None:
        assert self.proc is not None
        pgid = self.proc.pid

        def gone() -> bool:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return True
            return False
        try:
            wait_until(gone, 15, message=f"router process group {pgid} left processes behind")
        except TimeoutError:
            os.killpg(pgid, signal.SIGKILL)
            raise

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "fastroute", *args, "-c", str(self.path)],
                             capture_output=True, text=True, timeout=120)
        if check and res.returncode != 0:
            raise AssertionError(f"fastroute {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def queue(self) -> dict[str, dict[str, Any]]:
        doc = json.loads(self.cli("queue", "--json").stdout)
        return {q["destination"]: q for q in doc["queues"]}

    def __enter__(self) -> "Router":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.stop()




def destination(port: int, ae_title: str = "STORESCP", **extra: Any) -> dict[str, Any]:
    return {"ae_title": ae_title, "host": "127.0.0.1", "port": port, **extra}


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds
