"""The package's architecture, pinned: pipeline stages in order, no import cycles, no private imports.

`STAGES` is the one place the stage order is written. A module may import (at top level or
inside a function) only from its own stage or an earlier one, so a newcomer can read where a
feature goes from the folder names, and no stage can grow a hidden dependency on a later one.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Earliest first. A stage is a top-level module or a subpackage of src/prunekit.
STAGES: tuple[tuple[str, ...], ...] = (
    ("errors", "_registry", "_moved"),  # foundation: imports nothing else of prunekit
    ("storage",),  # atomic files, run state, the safetensors layout
    ("config",),  # frozen configs, PerLayer rules, recipe files, the glossary
    ("core",),  # targets, masks, criteria, the plan/prune dispatcher, model inputs, counting
    ("zoo",),  # offline data, small models, LLM loaders
    ("methods",),  # unstructured, Wanda, SparseGPT, N:M, block, calibration
    ("structured",),  # channel/neuron/head removal
    ("train",),  # schedules, distillation, fine-tuning, iterative structured pruning
    ("deploy",),  # checkpoints, INT8, ONNX export and check, 2:4 layouts
    ("measure",),  # latency, memory, the validation report
    ("allocation",),  # sensitivity, latency tables, allocation, search
    ("runtime",),  # sparse CPU kernels and accelerate
    ("recipes",),  # end-to-end runners and the demo
    ("cli", "__init__", "__main__"),  # the surfaces
)
ROOT = Path(__file__).resolve().parents[1] / "src" / "prunekit"  # read as source: no import needed


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> modules it imports (not __init__s)
    stage_edges: list[tuple[str, str, int]] = field(default_factory=list)  # (module, imported, line)
    private: list[str] = field(default_factory=list)


def _module_name(path: Path) -> str:
    parts = ["prunekit", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _read_graph() -> Graph:
    g = Graph()
    for path in sorted(ROOT.rglob("*.py")):
        g.modules[_module_name(path)] = path
    packages = {_module_name(p) for p in g.modules.values() if p.name == "__init__.py"}
    for name, path in g.modules.items():
        g.edges[name] = set()
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                imported = [(f"{target}.{a.name}", a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                target, imported = "", [(a.name, "") for a in node.names]
            else:
                continue
            for candidate, alias in imported:
                module = candidate if candidate in g.modules else target
                if module not in g.modules:
                    continue
                g.stage_edges.append((name, module, node.lineno))
                if module not in packages:
                    g.edges[name].add(module)
                private = alias.startswith("_") and not alias.startswith("__")
                if private and candidate not in g.modules and module != name:
                    g.private.append(f"{name}:{node.lineno} imports {module}.{alias}")
    return g


def _stage(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(STAGES):
        if key in names:
            return index
    raise AssertionError(f"{module} belongs to no stage: add its folder to STAGES in tests/test_layering.py")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
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
        for w in edges.get(v, ()):
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

    for v in edges:
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> Graph:
    return _read_graph()


def test_every_module_belongs_to_a_stage(graph: Graph) -> None:
    for module in graph.modules:
        _stage(module)


def test_no_import_cycles(graph: Graph) -> None:
    assert _cycles(graph.edges) == []


def test_no_private_names_cross_modules(graph: Graph) -> None:
    assert graph.private == []


def test_no_stage_imports_a_later_one(graph: Graph) -> None:
    late = [
        f"{module}:{line} imports {imported} ({STAGES[_stage(imported)][0]} comes after {STAGES[_stage(module)][0]})"
        for module, imported, line in graph.stage_edges
        if _stage(imported) > _stage(module)
    ]
    assert late == []


def test_readme_tree_lists_every_folder_in_stage_order() -> None:
    """The README's layout is the tree, one line per folder or top-level module, so it cannot go stale."""
    readme = (ROOT.parents[1] / "README.md").read_text()
    tree = readme[readme.index("## Layout"):]
    listed = re.findall(r"^[├└]── (\S+?)(?:/|\.py)?\s", tree, flags=re.MULTILINE)
    present = {p.stem for p in ROOT.glob("*.py") if p.name != "__init__.py"}
    present |= {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert sorted(listed) == sorted(present)
    assert [_stage(f"prunekit.{name}") for name in listed] == sorted(_stage(f"prunekit.{name}") for name in listed)


def test_the_checks_catch_what_they_claim() -> None:
    """The graph reader itself: a planted cycle, private import and late import are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _stage("prunekit.core.masks") < _stage("prunekit.methods.nm") < _stage("prunekit.runtime.fusion")
    with pytest.raises(AssertionError, match="no stage"):
        _stage("prunekit.newfolder.module")
