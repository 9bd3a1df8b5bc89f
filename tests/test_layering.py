"""The layering of the packages, read from their source (``ast``), never by importing them.

- ``analysis``, ``sae`` and ``probes`` never import ``app`` or ``streamlit`` (not even inside a function);
- no import cycle between modules (imports inside functions count: a deferred import is still a
  dependency; ``if TYPE_CHECKING:`` blocks do not), nor between the layers (the analysis core with
  the models LensLab trains, each analysis folder, ``probes``, ``sae``, ``app``);
- no package module longer than 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("analysis", "sae", "probes", "app")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Dotted names this module imports at run time (resolved to modules where they are modules)."""
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in MODULES else mod)
    return out


GRAPH = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


CORE_FOLDERS = {"models"}  # analysis/models: the models LensLab trains belong to the shared core


def _layer(module: str) -> str:
    """``analysis (core)`` (analysis/*.py and analysis/models), ``analysis.<folder>`` for each analysis
    folder, else the top-level package."""
    parts = module.split(".")
    if parts[0] == "analysis" and len(parts) >= 2 and (ROOT / "analysis" / parts[1]).is_dir() \
            and parts[1] not in CORE_FOLDERS:
        return f"analysis.{parts[1]}"
    return "analysis (core)" if parts[0] == "analysis" else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", ["analysis", "sae", "probes"])
def test_core_packages_never_import_surfaces(package):
    bad = sorted(f"{m} imports {i}" for m, p in MODULES.items() if m.split(".")[0] == package
                 for i in _imports(p) if i.split(".")[0] in {"app", "streamlit"})
    assert not bad, "analyses never import app/ or streamlit:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycle_between_layers():
    layers: dict[str, set[str]] = {}
    for m, deps in GRAPH.items():
        layers.setdefault(_layer(m), set()).update(_layer(d) for d in deps if _layer(d) != _layer(m))
    cycles = _cycles(layers)
    witnesses = [f"{m} -> {d}" for c in cycles for m, deps in GRAPH.items() for d in deps
                 if _layer(m) in c and _layer(d) in c and _layer(m) != _layer(d)]
    assert not cycles, "layer cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles) + "\n" + "\n".join(witnesses)


def test_no_package_module_over_400_lines():
    long = sorted(f"{m}: {n} lines" for m, p in MODULES.items()
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES)
    assert not long, f"split these modules (>{MAX_LINES} lines):\n" + "\n".join(long)
