"""Imports in src/anomap point one way: down the layers of docs/architecture.md, and never in a circle.

The layer table below is the one in docs/architecture.md; a new module must be placed in it (the test
fails for a module no entry covers), so the picture in the docs and the code cannot drift apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# (module prefix, layer): the longest matching prefix wins. Lower layers never import higher ones.
LAYERS: list[tuple[str, int]] = [
    ("anomap.errors", 0), ("anomap._version", 0), ("anomap.types", 0), ("anomap.fileio", 0),
    ("anomap.registry", 0), ("anomap.config", 0),
    ("anomap.nn", 1), ("anomap.data", 1),
    ("anomap.metrics", 2), ("anomap.train", 2), ("anomap.feedback", 2),
    ("anomap.methods", 3),
    ("anomap.inference", 4), ("anomap.compiled", 4), ("anomap.detector", 4),
    ("anomap.runtime", 5), ("anomap.export", 5), ("anomap.report", 5), ("anomap.update", 5),
    ("anomap", 6), ("anomap.bench", 6), ("anomap.serve", 6), ("anomap.__main__", 7),
    ("anomap.cli", 7),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "anomap").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def _imports(module: str, path: Path) -> set[str]:
    """The anomap modules ``module`` imports anywhere in its file (function-level imports count too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "anomap")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import: up node.level - 1 packages from this one
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "anomap":
                continue
            for alias in node.names:  # `from anomap.x import y` imports module anomap.x.y when there is one
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    found.discard(module)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    up = sorted(t for t in GRAPH[module] if (_layer(t) or 0) > (_layer(module) or 0))
    assert up == [], f"{module} (layer {_layer(module)}) imports a higher layer: {up}"


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components: each component of more than one module is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle():
    assert _circles(GRAPH) == []


def test_the_checker_is_not_vacuous():
    """It reads real imports (function-level ones too), finds a made-up circle, and orders the layers."""
    assert "anomap.errors" in GRAPH["anomap.registry"]
    assert "anomap.detector" in GRAPH["anomap.cli.commands"] or "anomap" in GRAPH["anomap.cli.commands"]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
    assert _layer("anomap.cli.commands") > _layer("anomap.detector") > _layer("anomap.methods.base")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    """docs/architecture.md: files under about 400 lines, so that a module can be read in one sitting."""
    lines = MODULES[module].read_text().count("\n")
    assert lines <= 400, f"{MODULES[module]} has {lines} lines: split it"
