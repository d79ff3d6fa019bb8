"""The shape of the code, checked so it stays that way: no module over 600 lines, no
import cycles (runtime, ``TYPE_CHECKING``-only, in a function, or a ``.pxd`` cimport), and
every compiled class's ``.pxd`` declaring exactly the attributes its ``.py`` class uses.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "admin", "config")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


MODULES = _modules()

# DESIGN.md: one module per concern, split past ~600 lines (along a seam, not a cut).
MAX_LINES = 600


def test_no_module_is_over_600_lines() -> None:
    assert {name.split(".")[0] for name in MODULES} == set(PACKAGES)  # it sees every package
    lines = {name: len(p.read_text(encoding="utf-8").splitlines()) for name, p in MODULES.items()}
    too_long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert too_long == {}, f"over {MAX_LINES} lines, split along a seam: {too_long}"


def _imports(name: str, path: Path) -> set[str]:
    """First-party modules ``name`` imports anywhere in its source, or cimports."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    out.add(f"{base}.{alias.name}")
                elif base in MODULES:
                    out.add(base)
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in MODULES}
    pxd = path.with_suffix(".pxd")
    if pxd.exists():
        for match in re.finditer(r"^from (\S+) cimport", pxd.read_text(), re.MULTILINE):
            if match[1] in MODULES:
                out.add(match[1])
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    cycles = _cycles(graph)
    detail = [
        f"{' <-> '.join(c)}: " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
        for c in cycles
    ]
    assert cycles == [], "\n".join(detail)


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# -- .pxd against .py ---------------------------------------------------------------------


def _pxd_classes(pxd: Path) -> dict[str, tuple[str | None, set[str]]]:
    """class -> (base class, its ``cdef public`` attributes) as the .pxd declares them."""
    classes: dict[str, tuple[str | None, set[str]]] = {}
    current: str | None = None
    for line in pxd.read_text().splitlines():
        head = re.match(r"cdef class (\w+)(?:\((\w+)\))?:", line)
        if head:
            current = head[1]
            classes[current] = (head[2], set())
        elif current and line and not line[0].isspace() and not line.startswith("#"):
            current = None
        elif current:
            # __weakref__ is the one slot Cython refuses to make public.
            attr = re.match(
                r"\s+cdef (?:public (?:\w+ )+(\w+)|object (__weakref__))\s*(#.*)?$", line
            )
            if attr:
                classes[current][1].add(attr[1] or attr[2])
    return classes


def _py_attributes(path: Path, cls: str) -> set[str]:
    """What the .py class keeps on its instances: its ``__slots__`` and every
    ``self.x = ...`` (or annotated) assignment in its methods."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    attrs: set[str] = set()
    for item in node.body:
        if isinstance(item, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets
        ):
            attrs |= {e.value for e in ast.walk(item.value) if isinstance(e, ast.Constant)}
    for sub in ast.walk(node):
        targets: list[ast.expr] = []
        if isinstance(sub, ast.Assign):
            targets = sub.targets
        elif isinstance(sub, ast.AnnAssign | ast.AugAssign):
            targets = [sub.target]
        for target in targets:
            for t in ast.walk(target):
                if (
                    isinstance(t, ast.Attribute)
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                ):
                    attrs.add(t.attr)
    return attrs


def _all_pxd_classes() -> dict[str, tuple[Path, str | None, set[str]]]:
    out = {}
    for pxd in sorted((ROOT / "proxy").glob("*.pxd")):
        for cls, (base, attrs) in _pxd_classes(pxd).items():
            out[cls] = (pxd.with_suffix(".py"), base, attrs)
    return out


PXD_CLASSES = _all_pxd_classes()


def _inherited(cls: str) -> set[str]:
    base = PXD_CLASSES[cls][1]
    if base is None:
        return set()
    return PXD_CLASSES[base][2] | _inherited(base)


@pytest.mark.parametrize("cls", sorted(PXD_CLASSES))
def test_pxd_declares_exactly_the_attributes_its_class_uses(cls: str) -> None:
    path, _, declared = PXD_CLASSES[cls]
    used = _py_attributes(path, cls) - _inherited(cls)
    assert used - declared == set(), f"{cls}: used in {path.name} but not in its .pxd"
    assert declared - used == set(), f"{cls}: declared in the .pxd but never set"


def test_the_pxd_check_sees_compiled_classes() -> None:
    # Guards the parser above: a regex that matched nothing would pass every case.
    assert {"Exchange", "ClientConnection", "UpstreamConnection", "Service"} <= set(PXD_CLASSES)
    assert "closing" in PXD_CLASSES["ResponseSink"][2]
    assert "service" in PXD_CLASSES["Exchange"][2]
