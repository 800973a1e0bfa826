"""The package structure: no import cycles, the runtime stands alone, no package uses another's CLI.

The import graph is read from the source (every ``import`` statement, at module level or inside
a function, so a lazy import cannot hide a cycle), over the three packages the project ships:
``mfnet`` (training library), ``mfnet_runtime`` (torch-free runtime) and ``mfnet_ext`` (CUDA
extension). docs/architecture.md draws the same graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "mfnet": ROOT / "mfnet",
    "mfnet_runtime": ROOT / "runtime" / "mfnet_runtime",
    "mfnet_ext": ROOT / "cuda_ext" / "mfnet_ext",
}
COMMAND_MODULES = ("cli", "__main__", "command")  # a package's command-line layer


def project_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the three packages."""
    modules = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import name`` counts as ``pkg.name``
    when that is a module, else as ``pkg``)."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: climb level - 1 packages from this module's package
                    anchor = package[: len(package) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in modules else base)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    built = import_graph()
    assert len(built) > 50 and any(built.values())  # the reader found the packages and edges
    return built


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_runtime_imports_only_itself(graph):
    outside = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith("mfnet_runtime")
        for target in targets
        if not target.startswith("mfnet_runtime")
    }
    assert outside == set()


def test_runtime_never_imports_torch_or_mfnet():
    """Not even lazily inside a function (the torch-blocked import test sees module level only)."""
    found = set()
    for path in PACKAGES["mfnet_runtime"].rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            found.update(
                (path.name, name)
                for name in names
                if name.split(".")[0] in ("torch", "torchvision", "mfnet", "mfnet_ext")
            )
    assert found == set()


def test_no_package_imports_another_packages_command_layer(graph):
    crossing = {
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if target.rsplit(".", 1)[-1] in COMMAND_MODULES
        and target.split(".")[0] != module.split(".")[0]
    }
    assert crossing == set()
