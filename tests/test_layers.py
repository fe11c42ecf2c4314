"""The package's layers: imports point down only, and no module imports itself back through others.

Read from the source with ``ast`` (imports inside functions count too: a lazy import is still a
dependency), so the test needs no import of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "unsupseg"

# Lower rank = lower layer. Foundation modules (errors, atomic writes, progress, typed configs, the run
# directory format) are importable from every layer.
RANKS = {
    "errors": 0, "_io": 0, "_progress": 0, "config": 0, "rundir": 1, "labels": 1,
    "backbones": 2, "data": 3, "features": 4, "engine": 5, "methods": 6, "importers": 7,
    "postprocess": 8, "evaluation": 9, "exporters": 9.5, "api": 10, "reporting": 11, "demo": 12,
    "cli_text": 13, "cli": 13,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Fully qualified unsupseg modules that ``path`` imports (``from x import name`` counts x.name
    when that is a module, else x)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("unsupseg"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("unsupseg")}
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "unsupseg"


GRAPH = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def test_every_layer_is_ranked():
    assert {_layer(m) for m in GRAPH} - {"unsupseg"} <= set(RANKS)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    if module == "unsupseg":     # the package root re-exports the API lazily
        return
    upward = sorted(
        t for t in GRAPH[module]
        if _layer(t) != "unsupseg" and _layer(t) != _layer(module) and RANKS[_layer(t)] > RANKS[_layer(module)]
    )
    assert not upward, f"{module} imports a higher layer: {upward}"


def test_no_import_cycle():
    # submodule -> its package's __init__ is implied by Python and not a cycle of ours
    edges = {m: {t for t in ts if t in GRAPH and not m.startswith(t + ".")} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("layer", ["evaluation", "postprocess"])
def test_scoring_and_refinement_know_no_method(layer):
    # metrics score label maps and the CRF refines probabilities, whoever made them
    offenders = sorted(
        f"{m} -> {t}"
        for m, ts in GRAPH.items()
        if _layer(m) == layer
        for t in ts
        if _layer(t) in ("methods", "importers")
    )
    assert not offenders
