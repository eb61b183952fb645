"""The one place that picks native (Cython) or pure-Python implementations.

Like aiohttp and py-lmdb: every native module in ``ext/`` has a Python twin with the same
API and exceptions, and this module decides once, at import, which one the rest of fastroute
uses. Nothing else imports ``fastroute._*`` native modules directly.

``FASTROUTE_NO_EXTENSIONS=1`` forces the Python twins (it wins over the next one, so a CI
job that requires extensions can still spawn a pure-Python run).
``FASTROUTE_REQUIRE_EXTENSIONS=1`` turns a missing native module into ImportError, so a
broken build cannot silently fall back to the slow path.
Otherwise the native module is tried and the twin used if it is not built.

Adding a native module is one :func:`_choose` line plus the names re-exported from it.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from types import ModuleType

__all__ = ["PEEK_IMPL", "implementations", "peek", "peek_prefix", "validate"]

_LOADED: dict[str, str] = {}


def _choose(native: str, python: str) -> tuple[ModuleType, str]:
    """Import `native` or its twin `python` per the environment; record which one loaded."""
    twin = importlib.import_module(python)
    if os.environ.get("FASTROUTE_NO_EXTENSIONS") == "1":
        _LOADED[python] = "python"
        return twin, "python"
    try:
        module = importlib.import_module(native)
        missing = sorted(set(twin.__all__) - set(dir(module)))
        if missing:  # built from an older ext/*.pyx: as good as absent
            raise ImportError(f"stale build lacks {', '.join(missing)}")
    except ImportError as exc:
        if os.environ.get("FASTROUTE_REQUIRE_EXTENSIONS") == "1":
            raise ImportError(
                f"native module {native} is not available ({exc}) but "
                "FASTROUTE_REQUIRE_EXTENSIONS=1; build it with "
                "`python setup.py build_ext --inplace` or unset the variable"
            ) from exc
        _LOADED[python] = "python"
        return twin, "python"
    _LOADED[python] = "native"
    return module, "native"


def implementations() -> dict[str, str]:
    """``{python twin module: 'native' | 'python'}`` for ``fastroute --version`` and logs."""
    return dict(_LOADED)


Buffer = bytes | bytearray | memoryview
Found = dict[int, tuple[str, bytes]]

# One line per native module.
_peek, PEEK_IMPL = _choose("fastroute.dicom._peek", "fastroute.dicom.peek")

peek: Callable[[Buffer, Iterable[int], bool, bool], Found] = _peek.peek
peek_prefix: Callable[[Buffer, Iterable[int], bool, bool], tuple[Found, bool]] = _peek.peek_prefix
validate: Callable[[Buffer, bool, bool], None] = _peek.validate
