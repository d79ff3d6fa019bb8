"""Which build of the hot path runs: compiled, or the pure-Python sources.

``setup.py`` compiles the modules that have a ``.pxd`` beside them (the ``.pxd`` adds C
types to the unchanged ``.py``). Those modules share C types, so they run all compiled or
all pure Python: pure when ``BGPROXY_PURE_PYTHON`` is set, when a compiled module is
missing (no compiler at install time), or when the sources differ from those the build
recorded in ``_compiled.sha256`` (an edited checkout that was not rebuilt must never run
stale code).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).parent
MODULES = tuple(sorted(p.stem for p in HERE.glob("*.pxd")))


def _compiled_file(name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = HERE / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def sources_digest() -> str:
    """The digest setup.py records; both sides hash the modules in sorted order."""
    digest = hashlib.sha256()
    for name in MODULES:
        for path in (HERE / f"{name}.py", HERE / f"{name}.pxd"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _why_pure() -> str | None:
    if os.environ.get("BGPROXY_PURE_PYTHON"):
        return "BGPROXY_PURE_PYTHON is set"
    for name in MODULES:
        if _compiled_file(name) is None:
            return f"proxy/{name} is not compiled"
    try:
        built_from = (HERE / "_compiled.sha256").read_text().strip()
        current = sources_digest()
    except OSError:
        built_from, current = "", "?"
    if built_from != current:
        return "the sources changed since they were compiled: run pip install -e . again"
    return None


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the ``.py`` of the compiled modules ahead of their extension modules."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __package__ or name not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, HERE / f"{name}.py")


PURE_REASON = _why_pure()
KIND = "python" if PURE_REASON else "compiled"
if PURE_REASON and not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceFinder())


def describe() -> str:
    return f"pure Python ({PURE_REASON})" if PURE_REASON else "compiled (Cython)"
