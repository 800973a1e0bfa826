"""Exports replace their target whole: a failure or Ctrl-C at any point leaves the previous
export byte for byte as it was, and it still loads with ``mfnet_runtime.Segmenter``.

One real tiny export (module fixture) is the "previous export". The re-exports that are made
to fail replace the slow dynamo exporter with a stand-in that writes placeholder graphs (what
is tested is where files go, not the graphs), and fail at several points: a graph write, the
verification (a failed report, or Ctrl-C inside it), the manifest write (Ctrl-C, a full disk).
TensorRT engines added to an export go through the same staging, driven by the recording
stand-in for ``tensorrt`` of test_tensorrt.py.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from fault_fixtures import disk_full, siblings, snapshot  # noqa: E402
from mfnet.export import onnx_export  # noqa: E402
from mfnet.export import tensorrt as trt_export  # noqa: E402
from mfnet.export import verify as verify_module  # noqa: E402
from mfnet.export.onnx_export import ExportError, export_onnx  # noqa: E402
from mfnet_runtime import Segmenter, atomic  # noqa: E402
from runtime_fixtures import LIMITS  # noqa: E402
from test_tensorrt import H100, fake_tensorrt  # noqa: E402


@pytest.fixture(scope="module")
def exported(varied_export):
    """(engine_dir, checkpoint) of one real FP32 export (the session's); tests work on copies."""
    return varied_export(2, 1)[:2]


@pytest.fixture
def previous(exported, tmp_path):
    """A copy of the real export at tmp_path/engines: (directory, checkpoint, its snapshot)."""
    engine_dir, checkpoint = exported
    target = tmp_path / "engines"
    shutil.copytree(engine_dir, target)
    return target, checkpoint, snapshot(target)


def assert_unchanged(target, before) -> None:
    assert snapshot(target) == before
    assert siblings(target) == ["engines"]  # no staging directory left behind
    with Segmenter.load(target, backend="onnxruntime", device="cpu") as segmenter:
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
        mask = np.zeros((40, 52), np.uint8)
        mask[10:30, 10:40] = 1
        support = segmenter.encode_support({"a": [(image, mask)], "b": [(image, 1 - mask)]})
        assert segmenter.segment(image, support).shape == (40, 52)


def placeholder_graphs(monkeypatch, fail_on: int | None = None, error=None) -> list:
    """Replace the dynamo export by placeholder files; the ``fail_on``-th write raises."""
    written: list = []

    def export_graph(module, args, path, *rest):
        if len(written) == fail_on:
            raise error
        path.write_bytes(b"placeholder " + path.name.encode())
        written.append(path)

    monkeypatch.setattr(onnx_export, "_export_graph", export_graph)
    return written


def passing_verification(*args, **kwargs):
    return {"passed": True, "text": "ok", "graphs": []}


FAULTS = [
    "graph-write-disk-full",
    "graph-write-interrupted",
    "verification-failed",
    "verification-interrupted",
    "manifest-write-interrupted",
    "manifest-write-disk-full",
]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failed_re_export_leaves_the_previous_export(previous, monkeypatch, fault) -> None:
    target, checkpoint, before = previous
    expected: type[BaseException] = KeyboardInterrupt
    if fault.startswith("graph-write"):
        error = (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if "disk" in fault
            else KeyboardInterrupt()
        )
        written = placeholder_graphs(monkeypatch, fail_on=2, error=error)
        expected = type(error)
    else:
        written = placeholder_graphs(monkeypatch)
    if fault == "verification-failed":
        monkeypatch.setattr(
            verify_module,
            "verify_export",
            lambda *a, **k: {"passed": False, "text": "FAIL query_decoder.fp32.onnx [random]"},
        )
        expected = ExportError
    elif fault == "verification-interrupted":

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(verify_module, "verify_export", interrupted)
    else:
        monkeypatch.setattr(verify_module, "verify_export", passing_verification)
    if fault == "manifest-write-interrupted":

        def interrupted_write(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(onnx_export, "write_manifest", interrupted_write)
    elif fault == "manifest-write-disk-full":
        monkeypatch.setattr(os, "fsync", disk_full)  # the manifest is the durable write
        expected = OSError
    with pytest.raises(expected):
        export_onnx(checkpoint, target, precisions=("fp32",), limits=LIMITS)
    assert written and all(path.parent != target for path in written)  # written beside it
    assert_unchanged(target, before)


def test_a_complete_re_export_replaces_the_previous_one(previous, monkeypatch) -> None:
    target, checkpoint, before = previous
    placeholder_graphs(monkeypatch)
    monkeypatch.setattr(verify_module, "verify_export", passing_verification)
    manifest = export_onnx(checkpoint, target, precisions=("fp32",), limits=LIMITS)
    after = snapshot(target)
    assert after != before and siblings(target) == ["engines"]
    assert set(after) == {g.file for g in manifest.graphs} | {"manifest.json"}
    assert all(after[g.file].startswith(b"placeholder") for g in manifest.graphs)


@pytest.mark.parametrize("second_rename_fails", [False, True])
def test_two_rename_fallback(tmp_path, monkeypatch, second_rename_fails) -> None:
    """Without renameat2 the target is moved aside, the new one renamed in, and on a failure
    of the second rename the previous one is put back."""
    target = tmp_path / "engines"
    target.mkdir()
    (target / "old").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    real_rename = os.rename
    calls = []

    def rename(source, destination):
        calls.append((source, destination))
        if second_rename_fails and len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(source, destination)

    monkeypatch.setattr(atomic.os, "rename", rename)
    if second_rename_fails:
        with pytest.raises(OSError), atomic.staged_directory(target) as staging:
            (staging / "new").write_text("new")
        assert snapshot(target) == {"old": b"old"}
    else:
        with atomic.staged_directory(target) as staging:
            (staging / "new").write_text("new")
        assert snapshot(target) == {"new": b"new"}
    assert siblings(target) == ["engines"]


@pytest.mark.parametrize("fault", ["engine-build", "manifest-write-interrupted"])
def test_adding_engines_is_atomic(previous, monkeypatch, fault) -> None:
    target, _, before = previous
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0", []))
    monkeypatch.setattr(trt_export, "current_gpu", lambda: H100)
    if fault == "engine-build":
        real_build, built = trt_export.build_engine, []

        def build_engine(onnx_path, engine_path, **kwargs):
            if built:  # the second engine fails: the first is already written (in staging)
                raise RuntimeError("TensorRT failed to build an engine")
            real_build(onnx_path, engine_path, **kwargs)
            built.append(engine_path)

        monkeypatch.setattr(trt_export, "build_engine", build_engine)
        expected: type[BaseException] = RuntimeError
    else:

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(trt_export, "write_manifest", interrupted)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        trt_export.build_engines(target, "fp32")
    assert_unchanged(target, before)


def test_added_engines_and_manifest_arrive_together(previous, monkeypatch) -> None:
    target, _, before = previous
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0", []))
    monkeypatch.setattr(trt_export, "current_gpu", lambda: H100)
    manifest = trt_export.build_engines(target, "fp32")
    after = snapshot(target)
    engines = [g.file for g in manifest.graphs if g.format == "tensorrt"]
    assert engines and all(after[name] == b"engine-bytes" for name in engines)
    assert {k: v for k, v in after.items() if k in before and k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }  # ONNX graphs untouched
    assert siblings(target) == ["engines"]
    with Segmenter.load(target, backend="onnxruntime", device="cpu"):
        pass


def test_replaced_files_and_exports_get_ordinary_permissions(tmp_path) -> None:
    """Temporary files and folders are private (0600 / 0700); what they become is not: a new
    file or export gets what open()/mkdir() would give it, a replaced one keeps its mode."""
    mask = os.umask(0o022)
    try:
        new = tmp_path / "results.json"
        atomic.atomic_write_bytes(new, b"{}")
        assert new.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "shared.json"
        kept.write_bytes(b"old")
        kept.chmod(0o664)
        atomic.atomic_write_bytes(kept, b"new")
        assert kept.stat().st_mode & 0o777 == 0o664 and kept.read_bytes() == b"new"
        with atomic.staged_directory(tmp_path / "export") as staging:
            (staging / "manifest.json").write_text("{}")
        assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(mask)
