"""The runtime's structure: support sets are plain data, and the packages import without cycles.

No engine and no torch: a ``SupportSet`` is built, edited, saved and loaded from arrays alone;
the import graph of ``runtime/mfnet_runtime`` is read from the sources (every import, including
those inside functions) and must be acyclic; no module imports another package's command line.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    import mfnet_runtime  # noqa: F401  (installed with pip install -e ./runtime)
except ImportError:  # a source checkout without the runtime installed
    sys.path.insert(0, str(ROOT / "runtime"))

from mfnet_runtime.errors import RuntimeInputError  # noqa: E402
from mfnet_runtime.support import SupportSet  # noqa: E402

RUNTIME = ROOT / "runtime" / "mfnet_runtime"
ENGINE_ID = "e" * 64


def pure_set() -> SupportSet:
    """Three classes of 4-channel features (K = 2, 1, 3) with their mean as prototypes."""
    rng = np.random.default_rng(0)
    features = tuple(rng.normal(size=(k, 4)).astype(np.float32) for k in (2, 1, 3))
    prototypes = np.stack([f.mean(0) for f in features])
    return SupportSet(("cat", "dog", "cow"), features, prototypes, ENGINE_ID)


def test_a_support_set_holds_data_only() -> None:
    assert [f.name for f in dataclasses.fields(SupportSet)] == [
        "class_names", "shot_features", "prototypes", "engine_id"]
    imported = set()
    for node in ast.walk(ast.parse((RUNTIME / "support.py").read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "io", "dataclasses", "pathlib", "numpy", ".atomic",
                        ".errors"}, imported  # no segmenter, no backend, no image code


def test_a_support_set_is_edited_saved_and_loaded_without_an_engine(tmp_path) -> None:
    support = pure_set()
    assert support.shot_counts == (2, 1, 3)
    without_dog = support.remove_class("dog")
    assert without_dog.class_names == ("cat", "cow") and without_dog.engine_id == ENGINE_ID
    np.testing.assert_array_equal(without_dog.prototypes, support.prototypes[[0, 2]])
    grown = without_dog.with_class("cat", np.ones((3, 4), np.float32), np.full(4, 2.0))
    assert grown.class_names == ("cat", "cow") and grown.shot_counts == (3, 3)
    np.testing.assert_array_equal(grown.prototypes[0], np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(grown.prototypes[1], support.prototypes[2])
    added = grown.with_class("owl", np.zeros((1, 4), np.float32), np.zeros(4))
    assert added.class_names == ("cat", "cow", "owl") and added.shot_counts == (3, 3, 1)
    assert without_dog.shot_counts == (2, 3)  # edits return new sets
    path = tmp_path / "sets" / "edited.npz"
    added.save(path)
    for loaded in (SupportSet.load(path), SupportSet.from_bytes(added.to_bytes())):
        assert loaded.class_names == added.class_names and loaded.engine_id == ENGINE_ID
        np.testing.assert_array_equal(loaded.prototypes, added.prototypes)
        for a, b in zip(loaded.shot_features, added.shot_features):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeInputError, match="inconsistent support set"):
        support.with_class("cat", np.ones((2, 5), np.float32), np.ones(4))  # 5 != 4 channels
    with pytest.raises(RuntimeInputError, match="not a readable support set"):
        SupportSet.from_bytes(b"not a zip", source="junk")
    with pytest.raises(RuntimeInputError, match="does not exist"):
        SupportSet.load(tmp_path / "missing.npz")


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``mfnet_runtime`` that the file at ``path`` (module ``package``.x) imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            if node.module:
                found.add(target)
            else:  # from . import options
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mfnet_runtime"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mfnet_runtime"))
    return found


def test_the_runtime_imports_without_cycles() -> None:
    modules = {}
    for path in RUNTIME.rglob("*.py"):
        parts = path.relative_to(RUNTIME.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        modules[name] = path, package
    # A submodule reaching the package itself (``from . import x``) names x, not the package.
    graph = {name: {m for m in _imports(path, package) if m in modules and m != "mfnet_runtime"}
             for name, (path, package) in modules.items()}
    assert graph["mfnet_runtime.segmenter"] >= {"mfnet_runtime.support"}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        """Depth-first search; a module met again on the current trail closes a cycle."""
        if state.get(name) == 1:
            pytest.fail("import cycle: " + " -> ".join(trail[trail.index(name):] + [name]))
        if state.get(name) == 2:
            return
        state[name] = 1
        for target in sorted(graph[name]):
            visit(target, trail + [name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])


def test_no_module_imports_another_packages_command_line() -> None:
    offenders = []
    for path in sorted((ROOT / "mfnet").rglob("*.py")) + sorted(RUNTIME.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and not node.level else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n == "mfnet_runtime.cli" for n in names):
                offenders.append(str(path.relative_to(ROOT)))
            if path.is_relative_to(RUNTIME) and any(n.split(".")[0] in ("mfnet", "torch")
                                                    for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
