"""Optional compiled hot path.

The data-plane modules that have a ``.pxd`` beside them are compiled with Cython when a
compiler is available; the ``.pxd`` files add static types to the unchanged ``.py``
sources, which remain the pure-Python fallback (see ``proxy/_hotpath.py``). A machine
without a C compiler, or ``BGPROXY_NO_COMPILE=1``, installs the pure-Python build.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
COMPILED = sorted(p.with_suffix(".py") for p in (HERE / "proxy").glob("*.pxd"))


class OptionalBuildExt(build_ext):
    """A failed compile leaves the pure-Python modules in charge instead of failing."""

    failed = False

    def run(self) -> None:
        if not self.extensions:
            return
        # What the modules were compiled from: proxy/_hotpath.py runs the sources instead
        # when this is missing or no longer matches them, so never stale compiled code.
        stamp = Path(self.get_ext_fullpath("proxy.upstream")).parent / "_compiled.sha256"
        stamp.unlink(missing_ok=True)
        try:
            super().run()
        except Exception as exc:  # any build failure means: no speedups
            self.failed = True
            print(f"bgproxy: hot path not compiled ({exc}); using pure Python", file=sys.stderr)
        if not self.failed:
            stamp.write_text(sources_digest() + "\n")

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            self.failed = True
            print(f"bgproxy: {ext.name} not compiled ({exc}); using pure Python", file=sys.stderr)


def sources_digest() -> str:
    digest = hashlib.sha256()
    for py in COMPILED:
        for path in (py, py.with_suffix(".pxd")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("BGPROXY_NO_COMPILE"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    try:
        return cythonize(
            [str(p.relative_to(HERE)) for p in COMPILED],
            compiler_directives={
                "language_level": 3,
                "annotation_typing": False,  # the .pxd files carry the C types
                "boundscheck": False,
                "wraparound": True,
            },
            quiet=True,
        )
    except Exception as exc:  # a Cython error must not fail the install
        print(f"bgproxy: hot path not compiled ({exc}); using pure Python", file=sys.stderr)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
