"""The runtime's support sets are plain data: no engine and no torch needed to use them.

A ``SupportSet`` is built, edited, saved and loaded from arrays alone. (The import graph of all
packages, cycles and command-line imports included, is checked in test_architecture.py.)
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
        "class_names",
        "shot_features",
        "prototypes",
        "engine_id",
    ]
    imported = set()
    for node in ast.walk(ast.parse((RUNTIME / "support.py").read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {
        "__future__",
        "io",
        "dataclasses",
        "pathlib",
        "numpy",
        ".atomic",
        ".errors",
    }, imported  # no segmenter, no backend, no image code


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
        for a, b in zip(loaded.shot_features, added.shot_features, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeInputError, match="inconsistent support set"):
        support.with_class("cat", np.ones((2, 5), np.float32), np.ones(4))  # 5 != 4 channels
    with pytest.raises(RuntimeInputError, match="not a readable support set"):
        SupportSet.from_bytes(b"not a zip", source="junk")
    with pytest.raises(RuntimeInputError, match="does not exist"):
        SupportSet.load(tmp_path / "missing.npz")
