"""The package's layers, read from its import statements (function-level ones included): no import loops,
the model core imports nothing of the data pipeline, training or evaluation, and training and evaluation
import neither each other nor the experiment that sits above both."""

from __future__ import annotations

import ast
from pathlib import Path

import protein_llava

PACKAGE = Path(protein_llava.__file__).parent
# The model core (protein_llava/model/) and the two low modules it shares with the data pipeline.
MODEL_CORE = {"model", "constants", "sequences"}


def module_name(path: Path) -> str:
    parts = ("protein_llava", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                submodules = [f"{target}.{alias.name}" for alias in node.names]
                # `from . import x` imports the submodule x, not the package's __init__.
                candidates = submodules if node.module is None else [target, *submodules]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(c for c in candidates if c in files and c != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_loops():
    graph = import_graph()
    assert "protein_llava.loading" in graph and graph["protein_llava.evaluation.arms"] >= {"protein_llava.loading"}
    assert graph["protein_llava.model.modeling"] >= {"protein_llava.model.projector", "protein_llava.model.encoder"}
    assert find_cycle(graph) is None, f"import loop: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_imports_only_go_down_the_layers():
    graph = import_graph()
    wrong = []
    for module, targets in graph.items():
        layer = module.split(".")[1] if "." in module else ""
        for target in targets:
            below = target.split(".")[1] if "." in target else ""
            if layer in MODEL_CORE and below in {"data", "training", "evaluation", "experiment", "inference", "cli", "builders", "loading"}:
                wrong.append((module, target))
            if (layer, below) in {("training", "evaluation"), ("evaluation", "training"), ("training", "experiment"), ("evaluation", "experiment")}:
                wrong.append((module, target))
    assert wrong == []
