"""The layering of docs/ARCHITECTURE.md, checked on the source: imports only go down (or stay inside one part),
there are no import cycles, no private name is imported across modules, and train/ has no function over 100
lines. Every import counts, module-level or inside a function."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "geodino"

# part -> layer; a module may import its own part or a lower layer
LAYERS = {
    "base": 0,
    "losses": 1, "data": 1,
    "models": 2,
    "train": 3,
    "text": 4, "eval": 4,
    "segment": 5,
    "verbs": 6,
    "cli": 7, "testing": 7,  # testing replays recorded official steps through the trainer; nothing imports it
}
BASE_MODULES = {"errors", "outputs", "runs", "cpu", "runtime", "config", "checkpoint", "contract", "figures", "configs",
                "schema"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # geodino/__init__.py: the public API, lazily (strings)
    return "base" if parts[1] in BASE_MODULES else parts[1]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    pkg = module.split(".")
    if not MODULES[module].name == "__init__.py":
        pkg = pkg[:-1]
    pkg = pkg[: len(pkg) - (node.level - 1)]
    return ".".join(pkg + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str, int]]:
    """(imported geodino module, imported name or '', line) for every import in `module`."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("geodino")]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if not target.startswith("geodino"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, "", node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return out


def test_imports_only_go_down_the_layers():
    bad = []
    for module in MODULES:
        src = part_of(module)
        for target, _, line in imports(module):
            dst = part_of(target)
            if dst != src and LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{module}:{line} ({src}) imports {target} ({dst})")
    assert not bad, "imports that go up or sideways:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = defaultdict(set)
    for module in MODULES:
        for target, _, _ in imports(module):
            # `from pkg import name` depends on pkg's __init__; a package does not depend on its own modules
            if target != module and not module.startswith(target + "."):
                graph[module].add(target)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                cycles.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_is_imported_across_modules():
    bad = [f"{module}:{line} imports {target}.{name}" for module in MODULES
           for target, name, line in imports(module) if name.startswith("_") and not name.startswith("__") and target != module]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["train"])
def test_no_function_over_100_lines(folder):
    long = []
    for p in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_the_layer_table_covers_every_part():
    assert {part_of(m) for m in MODULES} <= set(LAYERS), {part_of(m) for m in MODULES} - set(LAYERS)
