"""The package's annotations hold: mypy over fastroute/ (the brief asks for mypy-clean APIs)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow   # once per CI run is enough: typing does not depend on the twin
def test_fastroute_is_mypy_clean(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    res = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                          "fastroute"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
