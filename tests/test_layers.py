"""The package forms layers: every import, function-level ones included, read statically, goes
down the code map of docs/design.md, and no modules or subpackages import each other in a circle."""

from __future__ import annotations

import ast
import re

from .conftest import ROOT

PACKAGE = ROOT / "blockpruner"


def modules() -> dict[str, str]:
    """Dotted module name -> its path relative to the package ('engine/forward.py')."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        name = "blockpruner." + rel[:-3].replace("/", ".")
        out[name.removesuffix(".__init__")] = rel
    return out


def imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, rel in mods.items():
        package = mod if rel.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse((PACKAGE / rel).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            edges[mod] |= {t for t in targets if t in mods and t != mod}
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def unit(mod: str) -> str:
    """A subpackage ('engine/') or a top-level module ('steps.py') of the package."""
    rel = modules()[mod]
    return rel.split("/")[0] + "/" if "/" in rel else rel


def code_map_layers() -> dict[str, int]:
    """Each unit's line in docs/design.md's code map (bottom up; several names on a line share it)."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    block = text.split("```\nblockpruner/", 1)[1].split("\nworkflow/", 1)[0]
    layers = {}
    for i, line in enumerate(block.splitlines()[1:]):
        if line.startswith("  ") and not line.startswith("   "):
            for name in re.findall(r"\b([a-z_]+(?:\.py|/))", line.split("  ", 2)[1] if line.count("  ") > 1 else line):
                layers.setdefault(name, i)
    return layers


def test_no_module_or_subpackage_cycle():
    edges = imports()
    assert cycles(edges) == []
    by_unit: dict[str, set[str]] = {}
    for a, bs in edges.items():
        by_unit.setdefault(unit(a), set()).update(unit(b) for b in bs if unit(b) != unit(a))
    assert cycles(by_unit) == []


def test_every_import_goes_down_the_code_map():
    layers = code_map_layers()
    units = {unit(m) for m in modules()} - {"__init__.py"}
    assert units <= set(layers), f"units missing from docs/design.md's code map: {sorted(units - set(layers))}"
    upward = sorted(f"{a} -> {b}" for a, bs in imports().items() for b in bs
                    if unit(a) != "__init__.py" and layers[unit(b)] > layers[unit(a)])
    assert upward == []


def test_the_checker_sees_function_level_and_relative_imports():
    edges = imports()
    assert "blockpruner.modeling.pruned" in edges["blockpruner.model_dir"]  # module level, relative
    assert "blockpruner.steps" in edges["blockpruner.cli.prune"]  # inside a function
    assert "blockpruner.modeling.pruned_modeling" in edges["blockpruner.export.materialize"]  # `from ..modeling import x`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
