"""What the benchmark sends: a study mix and/or tiny objects, generated once and cached.

A *workload* is a list of DICOM Part 10 files grouped in studies. The study mix gives each
modality a fixed, realistic study shape (``SHAPES``), and picks the number of studies of each
modality from the mix percentages (largest remainder). The files are written by the synthetic
generator (``bench/synth.py``) under ``<work dir>/data/<key>/``, where the key hashes the
workload's description and the generator's source, so a changed generator or mix never reuses
stale data. ``manifest.json`` is written last: a directory without it is incomplete.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pydicom.uid import generate_uid

from .procs import BenchError


@dataclass(frozen=True)
class Series:
    """``count`` objects of one series: ``rows`` x ``cols`` pixels, ``bits`` per sample,
    ``frames`` frames each (multi-frame when > 1)."""

    count: int
    rows: int
    cols: int
    bits: int = 16
    frames: int = 1


# One study per modality, as a capacity planner would see it (uncompressed, Explicit VR LE).
SHAPES: dict[str, tuple[str, tuple[Series, ...]]] = {
    "ct": ("CT", (Series(100, 512, 512),)),                             # 100 slices, ~52 MB
    "mr": ("MR", (Series(24, 256, 256),) * 4),                          # 4 x 24 images, ~13 MB
    "cr": ("CR", (Series(2, 2500, 2048),)),                             # 2 views, ~20 MB
    "dx": ("DX", (Series(2, 3000, 2500),)),                             # 2 views, ~30 MB
    "us": ("US", (Series(6, 480, 640, 8), Series(1, 480, 640, 8, 24))),  # 6 stills + 1 cine, ~28 MB
}
TINY_PER_STUDY = 50


def describe_shapes() -> str:
    """One line per modality, for --help and the README."""
    lines = []
    for key, (modality, series) in SHAPES.items():
        parts = [f"{s.count} x {s.rows}x{s.cols}x{s.bits}bit"
                 + (f"x{s.frames} frames" if s.frames > 1 else "") for s in series]
        lines.append(f"{key}: {modality}, {' + '.join(parts)}")
    return "; ".join(lines)


def parse_mix(text: str) -> dict[str, float]:
    """``ct=70,mr=20,cr=5,us=5`` -> {"ct": 0.7, ...} (weights are normalised)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if key not in SHAPES:
            raise ValueError(f"unknown modality {key!r} in --mix: expected one of {', '.join(SHAPES)}")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"--mix {part!r}: the weight must be a number") from None
        if weight < 0:
            raise ValueError(f"--mix {part!r}: a weight cannot be negative")
        mix[key] = mix.get(key, 0.0) + weight
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("--mix needs at least one positive weight, e.g. ct=70,mr=30")
    return {k: v / total for k, v in mix.items() if v > 0}


def study_counts(mix: dict[str, float], studies: int) -> dict[str, int]:
    """Split ``studies`` over the mix by largest remainder (deterministic)."""
    exact = {k: w * studies for k, w in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    order = sorted(mix, key=lambda k: (-(exact[k] - counts[k]), list(mix).index(k)))
    for k in order[: studies - sum(counts.values())]:
        counts[k] += 1
    return {k: n for k, n in counts.items() if n}


@dataclass
class Workload:
    """Generated files, ready to send. ``files`` are (path, size, study UID, SOP Instance UID)."""

    name: str
    description: str
    directory: Path
    studies: list[dict[str, Any]]
    files: list[tuple[Path, int, str, str]]

    @property
    def bytes(self) -> int:
        return sum(f[1] for f in self.files)

    @property
    def sop_uids(self) -> set[str]:
        return {f[3] for f in self.files}

    @property
    def study_uids(self) -> list[str]:
        return [s["uid"] for s in self.studies]

    def summary(self) -> dict[str, Any]:
        by_mod: dict[str, int] = {}
        for s in self.studies:
            by_mod[s["modality"]] = by_mod.get(s["modality"], 0) + 1
        return {"name": self.name, "description": self.description, "objects": len(self.files),
                "bytes": self.bytes, "studies": len(self.studies), "studies_by_modality": by_mod,
                "directory": str(self.directory)}

    def split(self, senders: int, into: Path) -> list[Path]:
        """Hard-link the files into ``senders`` directories of about equal bytes (whole
        studies per sender when there are at least as many studies as senders, as when each
        modality sends its own studies); returns the directories that got files."""
        by_study: dict[str, list[tuple[Path, int, str, str]]] = {}
        for f in self.files:
            by_study.setdefault(f[2], []).append(f)
        units = list(by_study.values()) if len(by_study) >= senders else [[f] for f in self.files]
        loads = [0] * senders
        groups: list[list[tuple[Path, int, str, str]]] = [[] for _ in range(senders)]
        for unit in sorted(units, key=lambda u: -sum(f[1] for f in u)):   # longest first
            i = loads.index(min(loads))
            groups[i].extend(unit)
            loads[i] += sum(f[1] for f in unit)
        shutil.rmtree(into, ignore_errors=True)
        dirs = []
        for i, group in enumerate(groups):
            if not group:
                continue
            d = into / f"sender{i}"
            d.mkdir(parents=True)
            for path, *_ in group:
                try:
                    os.link(path, d / path.name)
                except OSError:
                    os.symlink(path, d / path.name)
            dirs.append(d)
        return dirs


def synth_module() -> ModuleType:
    """The synthetic study generator (``bench/synth.py``, shared with the tests)."""
    from bench import synth
    return synth


def _key(spec: dict[str, Any], synth: ModuleType) -> str:
    source = inspect.getsource(synth)
    doc = json.dumps({"spec": spec, "synth": hashlib.sha256(source.encode()).hexdigest(), "v": 1},
                     sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _load(directory: Path, name: str) -> Workload | None:
    try:
        doc = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    files = [(directory / f["path"], int(f["size"]), f["study"], f["sop"]) for f in doc["files"]]
    if not all(p.exists() for p, *_ in files):
        return None
    return Workload(name, doc["description"], directory, doc["studies"], files)


def _write(directory: Path, name: str, description: str, spec: dict[str, Any],
           build: Callable[[Path], list[dict[str, Any]]]) -> Workload:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    studies = build(directory)
    files = []
    for st in studies:
        for p in st.pop("paths"):
            files.append({"path": str(p.relative_to(directory)), "size": p.stat().st_size,
                          "study": st["uid"], "sop": p.name[:-4]})
        st["objects"] = sum(1 for f in files if f["study"] == st["uid"])
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps({"description": description, "spec": spec, "studies": studies,
                               "files": files}, indent=1))
    os.replace(tmp, directory / "manifest.json")
    loaded = _load(directory, name)
    assert loaded is not None
    return loaded


def mix_workload(work_dir: Path, mix: dict[str, float], studies: int, seed: int,
                 log: Callable[[str], None]) -> Workload:
    """``studies`` studies drawn from ``mix`` (see SHAPES), cached under ``work_dir``."""
    synth = synth_module()
    counts = study_counts(mix, studies)
    spec = {"kind": "mix", "counts": counts, "seed": seed,
            "shapes": {k: [asdict(s) for s in SHAPES[k][1]] for k in counts}}
    directory = work_dir / "data" / f"mix-{_key(spec, synth)}"
    description = "study mix: " + ", ".join(f"{n} {SHAPES[k][0]}" for k, n in counts.items())
    cached = _load(directory, "mix")
    if cached is not None:
        return cached

    def build(root: Path) -> list[dict[str, Any]]:
        out = []
        number = 0
        for key, n in counts.items():
            modality, series = SHAPES[key]
            for _ in range(n):
                number += 1
                log(f"generating {description}: study {number} of {studies} ({modality})")
                uid = generate_uid()
                paths: list[Path] = []
                study_dir = root / f"study{number:04d}-{modality}"
                for j, s in enumerate(series):
                    paths += synth.make_study(
                        study_dir, modality, n_series=1, n_instances=s.count, rows=s.rows,
                        cols=s.cols, bits=s.bits, frames=s.frames, seed=seed * 1000 + number * 10 + j,
                        study_uid=uid, patient_id=f"BENCH{seed:03d}{number:05d}")
                out.append({"uid": uid, "modality": modality, "paths": paths})
        return out

    return _write(directory, "mix", description, spec, build)


def tiny_workload(work_dir: Path, n: int, seed: int, log: Callable[[str], None]) -> Workload:
    """``n`` ~10 kB CT objects in studies of TINY_PER_STUDY: the per-object overhead case."""
    synth = synth_module()
    spec = {"kind": "tiny", "n": n, "seed": seed, "per_study": TINY_PER_STUDY}
    directory = work_dir / "data" / f"tiny-{_key(spec, synth)}"
    description = f"{n} tiny objects (64x64 CT, ~10 kB)"
    cached = _load(directory, "tiny")
    if cached is not None:
        return cached

    def build(root: Path) -> list[dict[str, Any]]:
        log(f"generating {description}")
        out = []
        for i, start in enumerate(range(0, n, TINY_PER_STUDY)):
            count = min(TINY_PER_STUDY, n - start)
            uid = generate_uid()
            paths = synth.make_tiny(root / f"study{i:04d}", n=count, seed=seed * 1000 + i,
                                    study_uid=uid)
            out.append({"uid": uid, "modality": "CT", "paths": paths})
        return out

    return _write(directory, "tiny", description, spec, build)


def free_disk(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_disk(path: Path, needed: int, what: Sequence[str]) -> None:
    free = free_disk(path)
    if free < needed:
        raise BenchError(f"{path}: {free / 1e9:.1f} GB free, the run needs about {needed / 1e9:.1f} GB "
                         f"({', '.join(what)}): choose another --work-dir or a smaller workload")
