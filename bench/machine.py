"""What the figures were measured on: CPU, cores, memory, kernel, disk, software versions."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from .peers import fastroute_version
from .procs import dcmtk_version, orthanc_version


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def _filesystem(path: Path) -> str:
    """Device and type of the filesystem holding ``path`` (longest mount point that matches)."""
    best = ("", "?", "?")
    real = str(path.resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    except OSError:
        pass
    return f"{best[2]} on {best[1]} (mounted at {best[0] or '?'})"


def describe(work_dir: Path, orthanc: bool) -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "memory_gib": _mem_total_gib(),
        "os": _os_name(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "fastroute": fastroute_version(),
        "dcmtk": dcmtk_version(),
        "work_dir_filesystem": _filesystem(work_dir),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if orthanc:
        info["orthanc"] = orthanc_version()
    return info


def one_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu_model']}, {m['usable_cpus']} of {m['logical_cpus']} CPUs usable, "
            f"{m['memory_gib']} GiB RAM, {m['os']}, {m['kernel']}, "
            f"{m['python'].split(' (')[0]}, {m['fastroute']}, {m['dcmtk']}")
