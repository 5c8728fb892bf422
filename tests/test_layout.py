"""The package's layout: the import graph of plugin/pipefit is acyclic and points down the layers.

Every import statement counts, at module level and inside functions. The layers, bottom first, are
defined once, here; a module may import from its own layer and the layers below it, never above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "pipefit"
# Bottom first. ``pipefit`` itself (the version) and ``assets`` sit below all of them.
LAYERS = ["config", "model", "data", "partition", "run", "parity", "cli"]
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["pipefit", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(mods: dict[str, Path], module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The pipefit modules an import statement loads (``from pkg import mod`` names the submodule)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if mods[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    found = set()
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Edges module -> imported pipefit modules (every statement), and the imports inside functions."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    inner: list[tuple[str, int, str]] = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[module] |= _targets(mods, module, node)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        inner += [(module, node.lineno, t) for t in sorted(_targets(mods, module, node))]
    # A package's __init__ re-exporting its own submodules is not a dependency of design.
    return {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}, inner


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    """0 for ``pipefit`` and ``pipefit.assets``; 1 + the position in :data:`LAYERS` otherwise."""
    top = module.split(".")[1] if "." in module else ""
    if top in ("", "assets"):
        return 0
    assert top in LAYERS, f"{module}: subpackage {top!r} is not in LAYERS={LAYERS}; add it where it belongs"
    return 1 + LAYERS.index(top)


def test_every_module_belongs_to_a_layer() -> None:
    mods = _modules()
    assert len(mods) > 40
    assert {m.split(".")[1] for m in mods if "." in m} == {*LAYERS, "assets"}


def test_import_graph_has_no_circle() -> None:
    edges, _ = import_graph()
    assert sum(len(t) for t in edges.values()) > 100  # the graph was read, not an empty one
    assert circles(edges) == []


def test_no_import_points_up_the_layers() -> None:
    edges, _ = import_graph()
    upward = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts if layer(t) > layer(m))
    assert upward == []


def test_no_pipefit_import_inside_a_function() -> None:
    """Imports of pipefit's own modules sit at module level: none is hidden in a function to dodge a
    circle. (Heavy optional dependencies -- deepspeed, peft, matplotlib, tqdm, tensorboard -- may be
    imported where they are used.)"""
    _, inner = import_graph()
    assert inner == []


def test_no_library_file_is_long() -> None:
    long = sorted((len(p.read_text().splitlines()), m) for m, p in _modules().items())
    assert [(n, m) for n, m in long if n > MAX_LINES] == []


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_circles_finds_a_planted_circle(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert circles(edges) == expected


def test_layers_order_and_relative_imports() -> None:
    assert [layer(f"pipefit.{name}.x") for name in LAYERS] == list(range(1, len(LAYERS) + 1))
    assert layer("pipefit") == 0
    mods = {"pipefit.run.loop": Path("loop.py"), "pipefit.run.export": Path("export.py"), "pipefit.run": Path("x")}
    node = ast.parse("from .export import export").body[0]
    assert _targets(mods, "pipefit.run.loop", node) == {"pipefit.run.export"}
