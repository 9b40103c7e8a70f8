"""The package's imports against the layers of docs/architecture.md: no circle of modules, no arrow that runs up.

Every import counts: at module level, inside functions, and under `TYPE_CHECKING` (a name used in a type is a
dependency too). The layer order is read from the doc's "Layers, top to bottom:" paragraph, so the picture and the
code cannot drift apart: a module may import from its own layer and the layers below it.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "megatron_red"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (a `from package import name` that is no module is the package's
    __init__)."""
    paths = {module_name(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def documented_layers() -> list[set[str]]:
    """The layers of docs/architecture.md, top first, as sets of top-level names (`cli`, `trainer`, ...)."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    match = re.search(r"Layers, top to bottom:(.*?)(?:\n\s*\n)", text, re.S)
    assert match, "docs/architecture.md lost its 'Layers, top to bottom:' paragraph"
    layers = []
    for part in match.group(1).split(">"):
        names = re.findall(r"`([\w.]+)/?`", part)
        assert names, f"an empty layer in {match.group(1)!r}"
        layers.append({n.removesuffix(".py") for n in names})
    return layers


def layer_of(module: str, layers: list[set[str]]) -> int:
    top = module.split(".")[1]
    found = [i for i, layer in enumerate(layers) if top in layer]
    assert len(found) == 1, f"{module}: {top!r} must stand in exactly one layer of docs/architecture.md"
    return found[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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


def upward_arrows(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    return [f"{a} -> {b}" for a in sorted(graph) if a != "megatron_red" for b in sorted(graph[a])
            if layer_of(b, layers) < layer_of(a, layers)]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_upward_imports():
    graph = import_graph()
    assert graph["megatron_red"] == set()  # the package's __init__ is its docstring
    assert upward_arrows(graph, documented_layers()) == []


def test_the_checks_see_circles_and_upward_arrows():
    layers = [{"trainer"}, {"models"}, {"batch"}]
    graph = {"megatron_red.trainer.a": {"megatron_red.models.b"}, "megatron_red.models.b": {"megatron_red.batch"},
             "megatron_red.batch": set()}
    assert cycles(graph) == [] and upward_arrows(graph, layers) == []
    graph["megatron_red.batch"] = {"megatron_red.trainer.a"}
    assert cycles(graph) == [["megatron_red.batch", "megatron_red.models.b", "megatron_red.trainer.a"]]
    assert upward_arrows(graph, layers) == ["megatron_red.batch -> megatron_red.trainer.a"]
