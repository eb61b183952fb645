"""Build hook for the optional Cython accelerators.

Each module in ext/ has a pure-Python twin in fastroute/; when Cython or a C compiler is
missing the build carries on without the native module (set FASTROUTE_REQUIRE_EXTENSIONS=1 to
make that an error instead, as CI does). FASTROUTE_DEBUG_BUILD=1 builds with -O0 -g and
bounds checks on, for gdb and sanitizers.
"""
from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# native module (dotted name) -> its Cython source in ext/
EXT_MODULES = {"fastroute.dicom._peek": "_peek"}


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # pragma: no cover - depends on the machine
            self._fail(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # pragma: no cover - depends on the machine
            self._fail(exc)

    @staticmethod
    def _fail(exc: Exception) -> None:
        if os.environ.get("FASTROUTE_REQUIRE_EXTENSIONS") == "1":
            raise exc
        sys.stderr.write(
            f"fastroute: native extensions not built ({exc}); the pure-Python twins will be used\n"
        )


def extensions() -> list[Extension]:
    if os.environ.get("FASTROUTE_NO_EXTENSIONS") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if os.environ.get("FASTROUTE_REQUIRE_EXTENSIONS") == "1":
            raise
        return []
    debug = os.environ.get("FASTROUTE_DEBUG_BUILD") == "1"
    cflags = ["-O0", "-g"] if debug else ["-O3"]
    exts = [
        Extension(dotted, [f"ext/{src}.pyx"], extra_compile_args=cflags)
        for dotted, src in EXT_MODULES.items()
        if os.path.exists(f"ext/{src}.pyx")
    ]
    directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": False,
        "cdivision": True,
        "embedsignature": True,
    }
    if not exts:
        return []
    try:
        return cythonize(exts, compiler_directives=directives, include_path=["ext"])
    except Exception as exc:  # a Cython error must not stop a pure-Python install
        OptionalBuildExt._fail(exc)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
