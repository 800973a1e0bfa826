"""The export as an installed command (``python -m mfnet.export onnx|trt|verify``), the
``export/*.py`` scripts as its wrappers, and the one artifact contract: what the export writes
is the runtime's manifest, read back by the runtime's reader into equal typed objects."""

from __future__ import annotations

import ast
import pkgutil
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mfnet.export import command
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"to_onnx": "onnx", "to_trt": "trt", "verify": "verify"}
OPTIONS = {
    "onnx": (
        "--checkpoint",
        "--out",
        "--precisions",
        "--max-batch",
        "--max-support",
        "--max-shots",
        "--opset",
        "--no-verify",
        "--no-optimize",
    ),
    "trt": ("--onnx-dir", "--fp16", "--precision", "--max-batch", "--opt-batch", "--workspace-gb"),
    "verify": ("--dir", "--checkpoint", "--provider"),
}


@pytest.mark.parametrize("sub", sorted(OPTIONS))
def test_each_sub_command_explains_itself(sub, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        command.main([sub, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m mfnet.export {sub} ")
    assert all(option in text for option in OPTIONS[sub]), text
    script = next(name for name, target in SCRIPTS.items() if target == sub)
    assert f"python export/{script}.py" in text  # the equivalent script is named


def test_the_installed_command_and_a_wrapper_run_as_processes(tmp_path) -> None:
    """From another working directory: nothing depends on the checkout being the cwd."""
    for argv in (
        ["-m", "mfnet.export", "--help"],
        ["-m", "mfnet.export", "trt", "--help"],
        [str(ROOT / "export" / "to_onnx.py"), "--help"],
    ):
        done = subprocess.run(
            [sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        assert "usage: python -m mfnet.export" in done.stdout, argv
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mfnet.export",
            "verify",
            "--dir",
            str(tmp_path / "none"),
            "--checkpoint",
            str(ROOT / "setup.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_are_wrappers_without_path_edits(name, monkeypatch) -> None:
    source = (ROOT / "export" / f"{name}.py").read_text()
    tree = ast.parse(source)
    path_edits = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "path"
        and getattr(node.value, "id", None) == "sys"
    ]
    assert not path_edits and len(source.splitlines()) <= 15
    script = load_script(f"export/{name}.py")
    calls = []
    monkeypatch.setattr(script, "export_main", lambda argv: calls.append(argv) or 7)
    assert script.main(["--x", "1"]) == 7
    monkeypatch.setattr(sys, "argv", [f"export/{name}.py", "--y"])
    assert script.main() == 7
    assert calls == [[SCRIPTS[name], "--x", "1"], [SCRIPTS[name], "--y"]]


def test_the_artifact_contract_exists_once() -> None:
    """mfnet has no manifest module, reader, hash or atomic writer of its own."""
    import mfnet
    import mfnet.export
    import mfnet_runtime.atomic as runtime_atomic
    import mfnet_runtime.manifest as runtime_manifest
    from mfnet.export import onnx_export, tensorrt
    from mfnet_runtime.backends import tensorrt as trt_backend

    assert "atomic" not in {m.name for m in pkgutil.iter_modules(mfnet.__path__)}
    assert "manifest" not in {m.name for m in pkgutil.iter_modules(mfnet.export.__path__)}
    assert onnx_export.sha256_of is tensorrt.sha256_of is runtime_manifest.sha256_of
    assert onnx_export.write_manifest is tensorrt.write_manifest is runtime_manifest.write_manifest
    assert tensorrt.read_manifest is command.read_manifest is runtime_manifest.read_manifest
    assert (
        onnx_export.staged_directory is tensorrt.staged_directory is runtime_atomic.staged_directory
    )
    assert not hasattr(tensorrt, "check_engine_compatible") and trt_backend.engine_mismatch


def test_an_export_round_trips_through_the_runtime_reader(varied_export) -> None:
    from mfnet_runtime.manifest import (
        CheckpointInfo,
        GraphInfo,
        Manifest,
        ModelInfo,
        read_manifest,
    )

    engines, checkpoint, manifest = varied_export(2, 1)
    assert isinstance(manifest, Manifest) and isinstance(manifest.model, ModelInfo)
    assert all(isinstance(g, GraphInfo) for g in manifest.graphs)
    assert read_manifest(engines) == manifest  # typed objects in, equal typed objects out
    assert manifest.directory == engines and manifest.verification["passed"]
    assert manifest.checkpoint == CheckpointInfo(checkpoint.name, manifest.checkpoint.sha256)
    assert (manifest.model.way, manifest.model.input_size, manifest.model.color) == (2, 48, "RGB")


def test_the_demo_names_working_export_commands(tmp_path) -> None:
    from mfnet_runtime.demo import next_commands, write_demo

    files = write_demo(tmp_path, frames=2, use_opencv=False)
    install, export, _ = next_commands(files)
    assert shlex.split(install, comments=True) == ["pip", "install", "-e", ".[export]"]
    assert '"export": [' in (ROOT / "setup.py").read_text().split("extras_require")[1]
    words = shlex.split(export)
    assert words[:3] == ["python", "-m", "mfnet.export"]
    args = command.build_parser().parse_args(words[3:])
    assert args.command == "onnx" and str(args.checkpoint) == "runs/synthetic-cpu/last.pt"
