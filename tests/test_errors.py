"""Every row of docs/errors.md, triggered for real: the error type the API raises and what each
command line prints (one ``error: ...`` line and exit code 2, argparse's usage error, 1 for a
failed verification, 130 for Ctrl-C), plus the boundary itself (no unsafe advice, bugs keep
their traceback). ``test_every_documented_row_has_a_case`` ties the table to ``CASES``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export import to_onnx as to_onnx_cli
from export import to_trt as to_trt_cli
from export import verify as verify_cli
from fault_fixtures import (
    disk_full,
    one_error_line,
    snapshot,
    tiny_config,
    usage_error,
    valid_manifest,
    write_checkpoint,
    write_manifest,
)
from mfnet import evaluate as evaluate_cli
from mfnet import predict as predict_cli
from mfnet import train as train_cli
from mfnet.checkpoint import CheckpointError, model_from_checkpoint, save_checkpoint
from mfnet.config import Config, ConfigError
from mfnet.data.errors import DatasetError
from mfnet.device import DeviceUnavailable, resolve_device
from mfnet.errors import MFNET_ERRORS, mfnet_command
from mfnet.export import onnx_export
from mfnet.export.onnx_export import ExportError, ExportLimits, export_onnx
from mfnet.model.backbone import WeightsUnavailableError, build_backbone
from mfnet_runtime import cli as runtime_cli
from mfnet_runtime.atomic import atomic_write_bytes
from mfnet_runtime.boundary import command_boundary, error_line, scrub_unsafe_advice
from mfnet_runtime.errors import EngineError, MissingDependencyError, RuntimeInputError, ServerError
from mfnet_runtime.manifest import read_manifest
from mfnet_runtime.segmenter import Segmenter
from mfnet_runtime.spec import load_support_spec
from mfnet_runtime.video import require_cv2

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
TRAIN_TINY = [
    "--image-size",
    "48",
    "--channels",
    "16",
    "--epochs",
    "1",
    "--episodes-per-epoch",
    "4",
    "--batch-size",
    "2",
    "--workers",
    "0",
    "--pml-start-epoch",
    "0",  # PML on: no warning on stderr beside the error line
    "--no-evaluate",
    "--no-progress",
    "--visuals",
    "0",
]


class Evil:
    """Pickles as a call of ``os.system``: what the safe loader must refuse."""

    def __reduce__(self):
        return os.system, ("echo owned",)


# ------------------------------------------------------------------------------ checkpoints
def case_checkpoint_missing(tmp_path, capsys, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist; train one"):
        model_from_checkpoint(tmp_path / "none.pt")
    assert evaluate_cli.main(["--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in one_error_line(capsys)


def case_checkpoint_directory(tmp_path, capsys, monkeypatch):
    with pytest.raises(CheckpointError, match="is a directory, expected a file"):
        model_from_checkpoint(tmp_path)
    for main, argv in (
        (evaluate_cli.main, ["--checkpoint", str(tmp_path)]),
        (to_onnx_cli.main, ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]),
        (train_cli.main, ["--resume", str(tmp_path)]),
    ):
        assert "is a directory, expected a file" in usage_error(main, argv, capsys)


def case_checkpoint_unsafe(tmp_path, capsys, monkeypatch):
    path = tmp_path / "evil.pt"
    torch.save({"format": "mfnet-checkpoint-v1", "config": {}, "model": Evil()}, path)
    with pytest.raises(CheckpointError) as raised:
        model_from_checkpoint(path)
    message = str(raised.value)
    assert "never unpickled" in message and "system" in message
    assert "weights_only" not in message and "safe_globals" not in message
    assert evaluate_cli.main(["--checkpoint", str(path)]) == 2
    assert "never unpickled" in one_error_line(capsys)  # checks: no weights_only advice


def case_checkpoint_corrupt(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"garbage" * 20)
    with pytest.raises(CheckpointError, match="could not be read"):
        model_from_checkpoint(path)
    assert to_onnx_cli.main(["--checkpoint", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "could not be read" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def case_checkpoint_config(tmp_path, capsys, monkeypatch):
    config = tiny_config()
    config["model"]["way"] = "2"
    path = write_checkpoint(tmp_path / "typed.pt", config)
    with pytest.raises(CheckpointError, match=r"model\.way must be an integer, got '2'"):
        model_from_checkpoint(path)
    assert evaluate_cli.main(["--checkpoint", str(path), "--device", "cpu"]) == 2
    assert "model.way" in one_error_line(capsys)


def case_checkpoint_state_dict(tmp_path, capsys, monkeypatch):
    config = tiny_config()
    config["model"]["channels"] = 32  # the weights are of a 16-channel model
    path = write_checkpoint(tmp_path / "mismatch.pt", config)
    with pytest.raises(
        CheckpointError, match="does not match its own config: .*tensors of another shape"
    ) as raised:
        model_from_checkpoint(path)
    assert len(str(raised.value).splitlines()) == 1 and len(str(raised.value)) < 600
    bare = write_checkpoint(tmp_path / "bare.pt", state=torch.zeros(3))
    with pytest.raises(CheckpointError, match="holds a Tensor, not a state dict"):
        model_from_checkpoint(bare)
    assert evaluate_cli.main(["--checkpoint", str(path), "--device", "cpu"]) == 2
    assert "tensors of another shape" in one_error_line(capsys)


def case_weights_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "resnet.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(WeightsUnavailableError, match="hold Tensor, not a state dict"):
        build_backbone("resnet50", str(path))
    torch.save({"conv1.weight": torch.zeros(2, 3, 7, 7)}, path)
    with pytest.raises(WeightsUnavailableError, match="1 tensors of another shape"):
        build_backbone("resnet50", str(path))
    torch.save({"conv1.weight": Evil()}, path)
    with pytest.raises(WeightsUnavailableError) as raised:
        build_backbone("resnet50", str(path))
    assert "never unpickled" in str(raised.value) and "weights_only" not in str(raised.value)


# ----------------------------------------------------------------------------- options, config
def case_config_value(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="model.way must be an integer"):
        Config.from_dict({"model": {"way": 2.5}})
    with pytest.raises(ConfigError, match="epochs must be > 0"):
        Config().replace(epochs=0)
    with pytest.raises(ConfigError, match="channels .* divisible by relation_heads"):
        Config().replace(channels=30)
    assert train_cli.main([*TRAIN_TINY, "--channels", "30", "--out", str(tmp_path)]) == 2
    assert "divisible by relation_heads" in one_error_line(capsys)


def case_usage(tmp_path, capsys, monkeypatch):
    file = tmp_path / "file.txt"
    file.write_text("x")
    segment = ["segment", "--engines", str(tmp_path), "--support", "s", "--input", "0"]
    cases = [
        (train_cli.main, ["--epochs", "0"], "epochs must be > 0"),
        (train_cli.main, ["--way", "two"], "expected int"),
        (train_cli.main, ["--lr", "nan"], "finite number"),
        (evaluate_cli.main, ["--checkpoint", "x.pt", "--folds", "0,7"], "folds must be"),
        (
            evaluate_cli.main,
            ["--checkpoint", "x.pt", "--json", str(tmp_path)],
            "is a directory, expected a file",
        ),
        (
            to_onnx_cli.main,
            ["--checkpoint", "x.pt", "--out", str(file)],
            "is a file, expected a directory",
        ),
        (
            to_onnx_cli.main,
            ["--checkpoint", "x.pt", "--out", "o", "--max-batch", "0"],
            "must be >= 1",
        ),
        (to_trt_cli.main, ["--onnx-dir", str(file)], "is a file, expected a directory"),
        (to_trt_cli.main, ["--onnx-dir", str(tmp_path), "--opt-batch", "0"], "must be >= 1"),
        (
            verify_cli.main,
            ["--dir", str(tmp_path), "--checkpoint", str(tmp_path)],
            "is a directory, expected a file",
        ),
        (
            runtime_cli.main,
            [*segment, "--batch-size", "0"],
            "must be >= 1",
        ),
        (
            runtime_cli.main,
            [*segment, "--alpha", "1.5"],
            "must be <= 1",
        ),
        (
            runtime_cli.main,
            [
                "segment",
                "--engines",
                str(tmp_path),
                "--load-support",
                str(tmp_path),
                "--input",
                "0",
            ],
            "is a directory, expected a file",
        ),
        (
            runtime_cli.main,
            [*segment, "--output", str(file / "frames")],
            "is a file",
        ),
        (
            predict_cli.main,
            ["--checkpoint", str(tmp_path), "--support", "s", "--input", "0"],
            "is a directory, expected a file",
        ),
    ]
    for main, argv, expected in cases:
        assert expected in usage_error(main, argv, capsys), (argv, expected)


def case_export_out(tmp_path, capsys, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    file = tmp_path / "file"
    file.write_text("keep")
    with pytest.raises(ValueError, match="is a file, expected a directory"):
        export_onnx(checkpoint, file)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    before = snapshot(foreign)
    with pytest.raises(ValueError, match="not an MFNet export"):
        export_onnx(checkpoint, foreign)
    assert to_onnx_cli.main(["--checkpoint", str(checkpoint), "--out", str(foreign)]) == 2
    assert "not an MFNet export" in one_error_line(capsys)
    assert snapshot(foreign) == before and file.read_text() == "keep"


def case_export_sizes(tmp_path, capsys, monkeypatch):
    for field in ("max_batch", "max_support", "max_shots"):
        with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
            ExportLimits(**{field: 0})
    for option in ("--max-batch", "--max-support", "--max-shots"):
        message = usage_error(
            to_onnx_cli.main, ["--checkpoint", "c.pt", "--out", "o", option, "0"], capsys
        )
        assert option in message and "must be >= 1" in message


def case_export_dependency(tmp_path, capsys, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'mfnet\[export\]'"):
        export_onnx(checkpoint, tmp_path / "out")
    assert to_onnx_cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    assert "pip install 'mfnet[export]'" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def case_export_verification(tmp_path, capsys, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    monkeypatch.setattr(
        onnx_export, "_export_graph", lambda module, args, path, *rest: path.write_bytes(b"graph")
    )
    from mfnet.export import verify

    monkeypatch.setattr(
        verify,
        "verify_export",
        lambda *a, **k: {
            "passed": False,
            "text": "ok   a.onnx\nFAIL query_decoder.fp32.onnx [random] x",
        },
    )
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="FAIL query_decoder.fp32.onnx"):
        export_onnx(checkpoint, out, precisions=("fp32",))
    assert (
        to_onnx_cli.main(
            ["--checkpoint", str(checkpoint), "--out", str(out), "--precisions", "fp32"]
        )
        == 1
    )
    assert "verification failed, nothing was replaced" in one_error_line(capsys)
    assert not out.exists()


def case_tensorrt_missing(tmp_path, capsys, monkeypatch):
    directory = write_manifest(tmp_path / "engines", {**valid_manifest(), "graphs": []})
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert to_trt_cli.main(["--onnx-dir", str(directory)]) == 2
    assert "TensorRT is not installed" in one_error_line(capsys)


def case_manifest_export_side(tmp_path, capsys, monkeypatch):
    """The export commands read manifests with the runtime's reader: the same errors."""
    directory = write_manifest(tmp_path / "engines", {**valid_manifest(), "graphs": {"a": 1}})
    with pytest.raises(EngineError, match="field graphs must be a list"):
        read_manifest(directory)
    assert to_trt_cli.main(["--onnx-dir", str(directory)]) == 2
    assert "field graphs must be a list" in one_error_line(capsys)
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    (tmp_path / "photos").mkdir()
    assert (
        verify_cli.main(["--dir", str(tmp_path / "photos"), "--checkpoint", str(checkpoint)]) == 2
    )
    line = one_error_line(capsys)
    assert "not an MFNet export directory" in line and "python -m mfnet.export onnx" in line
    assert verify_cli.main(["--dir", str(tmp_path / "none"), "--checkpoint", str(checkpoint)]) == 2
    assert "none does not exist; create it with" in one_error_line(capsys)


# ------------------------------------------------------------------------------------ runtime
def case_manifest_field(tmp_path, capsys, monkeypatch):
    manifest = valid_manifest()
    manifest["model"]["way"] = "2"
    directory = write_manifest(tmp_path / "engines", manifest)
    with pytest.raises(
        EngineError,
        match=r"field model\.way must be an integer >= 1, got '2'"
        r".*python -m mfnet\.export onnx",
    ):
        read_manifest(directory)
    assert (
        runtime_cli.main(["segment", "--engines", str(directory), "--support", "s", "--input", "0"])
        == 2
    )
    assert "model.way" in one_error_line(capsys)


def case_manifest_zero_step(tmp_path, capsys, monkeypatch):
    manifest = valid_manifest()
    manifest["graphs"][0]["details"]["max_support"] = 0  # would be range()'s step
    directory = write_manifest(tmp_path / "engines", manifest)
    with pytest.raises(
        EngineError,
        match=r"graphs\[0\]\.details\.max_support must be an "
        r"integer >= 1, got 0",
    ):
        Segmenter.load(directory, backend="onnxruntime", device="cpu")


def case_engines_missing(tmp_path, capsys, monkeypatch):
    with pytest.raises(EngineError, match="does not exist; create it with"):
        Segmenter.load(tmp_path / "none")
    assert (
        runtime_cli.main(
            ["segment", "--engines", str(tmp_path / "none"), "--support", "s", "--input", "0"]
        )
        == 2
    )
    assert "python -m mfnet.export onnx --checkpoint CHECKPOINT" in one_error_line(capsys)


def case_runtime_input(tmp_path, capsys, monkeypatch):
    with pytest.raises(RuntimeInputError, match="does not exist"):
        load_support_spec(tmp_path / "missing-spec")
    (tmp_path / "a.png").mkdir()  # a directory where an image file belongs
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"classes": [{"name": "cat", "shots": [{"image": "a.png", "mask": "a.png"}]}]})
    )
    with pytest.raises(RuntimeInputError, match="is a directory, expected an image file"):
        load_support_spec(spec)
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    assert (
        predict_cli.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--support",
                str(tmp_path / "missing-spec"),
                "--input",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "missing-spec does not exist" in one_error_line(capsys)


def case_opencv_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'mfnet-runtime\[video\]'"):
        require_cv2()


def case_optional_dependencies(tmp_path, capsys, monkeypatch):
    from mfnet.data.prepare_pascal import read_sbd_label
    from mfnet.training.logs import write_eval_scalars

    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'mfnet\[data\]'"):
        read_sbd_label(tmp_path / "1.mat")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingDependencyError, match="pip install tensorboard"):
        write_eval_scalars(tmp_path, 0, {})


def case_server_unreachable(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tritonclient.http", reason="tritonclient: pip install './runtime[serve]'")
    from mfnet_runtime.serving import RemoteSegmenter

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{probe.getsockname()[1]}"
    for protocol in ("http", "grpc"):
        with pytest.raises(ServerError, match="cannot reach it") as caught:
            RemoteSegmenter(url, protocol=protocol, timeout=5)
        assert caught.value.kind == "unreachable" and isinstance(caught.value, EngineError)
    argv = ["segment", "--server", url, "--support", str(tmp_path / "spec")]
    assert runtime_cli.main(argv + ["--input", str(tmp_path), "--timeout", "5"]) == 2
    assert f"inference server {url} (http)" in one_error_line(capsys)


# ------------------------------------------------------------------------- writes, devices
def case_disk_full(tmp_path, capsys, monkeypatch):
    path = tmp_path / "run" / "last.pt"
    write_checkpoint(path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as raised:
        save_checkpoint(path, {"config": {}, "model": {}})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert path.read_bytes() == before and os.listdir(path.parent) == ["last.pt"]
    out = tmp_path / "full"
    assert train_cli.main([*TRAIN_TINY, "--out", str(out), "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "the disk is full" in line and "last.pt" in line
    monkeypatch.undo()
    # frame outputs: a frame written by an earlier run survives a full disk
    from PIL import Image

    import mfnet_runtime.atomic as runtime_atomic

    rng = np.random.default_rng(0)
    for name in ("red", "blue"):
        (tmp_path / "spec" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(
            tmp_path / "spec" / name / "a.png"
        )
        mask = np.zeros((30, 30), np.uint8)
        mask[5:20, 5:20] = 1
        Image.fromarray(mask).save(tmp_path / "spec" / name / "a.mask.png")
    (tmp_path / "frames").mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
        tmp_path / "frames" / "f.png"
    )
    outputs = tmp_path / "labels"
    outputs.mkdir()
    (outputs / "f.png").write_bytes(b"an earlier run")

    class FullDisk:
        """``os`` as ``mfnet_runtime.atomic`` sees it, on a full disk."""

        def __getattr__(self, name):
            return getattr(os, name)

        def fdopen(self, descriptor, mode):
            handle = os.fdopen(descriptor, mode)
            handle.write = disk_full
            return handle

    checkpoint = write_checkpoint(tmp_path / "model.pt")
    monkeypatch.setattr(runtime_atomic, "os", FullDisk())
    assert (
        predict_cli.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--support",
                str(tmp_path / "spec"),
                "--input",
                str(tmp_path / "frames"),
                "--output",
                str(outputs),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 2
    )
    line = one_error_line(capsys)
    assert "f.png: No space left on device" in line
    assert snapshot(outputs) == {"f.png": b"an earlier run"}


def case_permission_denied(tmp_path, capsys, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("mfnet_runtime.atomic.tempfile.mkstemp", denied)
    with pytest.raises(PermissionError) as raised:
        atomic_write_bytes(path, b"new")
    assert path.read_text() == "old"
    assert "check the permissions" in error_line(raised.value)
    # a folder the user cannot write to is refused while parsing
    monkeypatch.setattr("mfnet_runtime.options.os.access", lambda *a: False)
    message = usage_error(evaluate_cli.main, ["--checkpoint", "c.pt", "--json", str(path)], capsys)
    assert "not writable" in message


def case_device_unavailable(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match="CUDA is not available; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu7'"):
        resolve_device("gpu7")
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    assert evaluate_cli.main(["--checkpoint", str(checkpoint), "--device", "cuda"]) == 2
    assert "CUDA is not available" in one_error_line(capsys)


def case_dataset(tmp_path, capsys, monkeypatch):
    from mfnet.data.coco import CocoImages

    with pytest.raises(DatasetError, match="does not exist"):
        CocoImages(tmp_path / "nowhere", "train", 0, "test")
    assert (
        train_cli.main(
            [
                *TRAIN_TINY,
                "--dataset",
                "pascal",
                "--data-root",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "nowhere" in one_error_line(capsys)


# ------------------------------------------------------------------------------- the boundary
def case_interrupted(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime_cli, "segment_command", interrupted)
    assert (
        runtime_cli.main(["segment", "--engines", str(tmp_path), "--support", "s", "--input", "0"])
        == 130
    )
    assert "Traceback" not in capsys.readouterr().err


def case_bug(tmp_path, capsys, monkeypatch):
    def broken(args):
        return 1 // 0

    monkeypatch.setattr(runtime_cli, "segment_command", broken)
    with pytest.raises(ZeroDivisionError):  # a bug: the traceback is kept
        runtime_cli.main(["segment", "--engines", str(tmp_path), "--support", "s", "--input", "0"])

    @mfnet_command()
    def buggy(argv):
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        buggy([])


CASES = {
    name.removeprefix("case_").replace("_", "-"): function
    for name, function in sorted(globals().items())
    if name.startswith("case_")
}


def documented_rows() -> list[str]:
    return re.findall(r"^\| `([a-z0-9-]+)` \|", DOCS.read_text(encoding="utf-8"), re.M)


def test_every_documented_row_has_a_case() -> None:
    rows = documented_rows()
    assert len(rows) == len(set(rows)) and rows
    assert sorted(rows) == sorted(CASES)


@pytest.mark.parametrize("row", sorted(CASES))
def test_documented_error(row, tmp_path, capsys, monkeypatch) -> None:
    CASES[row](tmp_path, capsys, monkeypatch)


# ------------------------------------------------------------------------ boundary, unit level
def torch_refusals(tmp_path: Path) -> list[str]:
    """torch.load's own messages for a code-carrying pickle and for a non-pickle file."""
    messages = []
    torch.save({"a": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "garbage.pt").write_bytes(b"garbage" * 10)
    for name in ("evil.pt", "garbage.pt"):
        with pytest.raises(Exception) as raised:
            torch.load(tmp_path / name, weights_only=True)
        messages.append(str(raised.value))
    return messages


def test_torch_advice_is_scrubbed(tmp_path) -> None:
    for message in torch_refusals(tmp_path):
        assert "weights_only" in message  # torch does give the advice ...
        cleaned = scrub_unsafe_advice(f"checkpoint x could not be read ({message}); re-train")
        assert "weights_only" not in cleaned and "safe_globals" not in cleaned  # ... not us
        assert cleaned.startswith("checkpoint x could not be read (") and "re-train" in cleaned
        assert "never unpickled" in cleaned
    text = "Use torch.load with weights_only=False. The file is broken."
    assert scrub_unsafe_advice(text) == "The file is broken."
    assert scrub_unsafe_advice("nothing to see.") == "nothing to see."


def test_error_line_is_one_line_and_boundary_maps_types(capsys) -> None:
    assert error_line(ValueError("a\n  b\tc")) == "error: a b c"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/last.pt")
    assert error_line(full) == (
        "error: /x/last.pt: No space left on device (the disk is full: "
        "free some space or choose another location)"
    )

    @command_boundary(RuntimeInputError)
    def main(error):
        raise error

    assert main(RuntimeInputError("bad\nmask")) == 2
    assert capsys.readouterr().err == "error: bad mask\n"
    with pytest.raises(EngineError):  # not on this command's list
        main(EngineError("x"))
    assert all(isinstance(t, type) for t in MFNET_ERRORS)


def test_option_types_reject_and_accept() -> None:
    from argparse import ArgumentTypeError

    from mfnet_runtime import options

    assert options.positive_int("3") == 3 and options.number(0.0, 1.0)("0.5") == 0.5
    for parse, text in (
        (options.positive_int, "0"),
        (options.positive_int, "1.5"),
        (options.number(0.0, 1.0), "inf"),
        (options.non_negative_int, "-1"),
    ):
        with pytest.raises(ArgumentTypeError):
            parse(text)
    assert np.isclose(options.number(0, exclusive_minimum=True)("0.1"), 0.1)
    with pytest.raises(ArgumentTypeError, match="must be > 0"):
        options.number(0, exclusive_minimum=True)("0")


def test_config_from_dict_rejects_every_wrong_type() -> None:
    good = Config().to_dict()
    for section, fields in good.items():
        for name, value in fields.items():
            wrong = "text" if not isinstance(value, str) else 3
            broken = json.loads(json.dumps(good))
            broken[section][name] = wrong
            with pytest.raises(ConfigError, match=rf"{section}\.{name} must be"):
                Config.from_dict(broken)
    with pytest.raises(ConfigError, match="must be a dict"):
        Config.from_dict({"model": [1, 2]})
    with pytest.raises(ConfigError, match="unknown config sections"):
        Config.from_dict({"modle": {}})
