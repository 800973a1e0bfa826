"""Helpers of the fault tests: tiny checkpoints, hand-written manifests, directory snapshots,
and the check that a command failed with exactly one ``error: ...`` line."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from mfnet.checkpoint import save_checkpoint
from mfnet.config import preset
from mfnet.model.build import build_mfnet

SIZE, CHANNELS = 48, 16


def tiny_config(**overrides) -> dict:
    """The plain-dict config of the small 2-way model (48 x 48, 16 channels)."""
    config = preset("synthetic-cpu").replace(
        image_size=SIZE, channels=CHANNELS, workers=0, **overrides
    )
    return config.to_dict()


def write_checkpoint(path: Path, config: dict | None = None, state: object = None) -> Path:
    """A checkpoint of the seeded tiny model (or with ``config`` / ``state`` replaced)."""
    config = config or tiny_config()
    if state is None:
        torch.manual_seed(0)
        state = build_mfnet(
            preset("synthetic-cpu").replace(image_size=SIZE, channels=CHANNELS).model
        ).state_dict()
    save_checkpoint(path, {"config": config, "model": state})
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes), hidden ones included."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def siblings(directory: Path) -> list[str]:
    """Names beside ``directory`` (staging leftovers would show here)."""
    return sorted(p.name for p in directory.parent.iterdir())


GRAPH_IO = {
    "support_encoder": (
        [
            ("support_images", ["S", SIZE, SIZE, 3], "uint8"),
            ("support_masks", ["S", SIZE, SIZE], "uint8"),
        ],
        [("shot_features", ["S", CHANNELS], "float32")],
        {"max_support": 16},
    ),
    "prototype_aggregator": (
        [("shot_features", [2, "K", CHANNELS], "float32")],
        [("prototypes", [2, CHANNELS], "float32")],
        {"min_shots": 2, "max_shots": 8},
    ),
    "prototype_aggregator_single": (
        [("shot_features", [2, 1, CHANNELS], "float32")],
        [("prototypes", [2, CHANNELS], "float32")],
        {"min_shots": 1, "max_shots": 1},
    ),
    "query_decoder": (
        [("frames", ["B", SIZE, SIZE, 3], "uint8"), ("prototypes", [2, CHANNELS], "float32")],
        [
            ("labels", ["B", SIZE, SIZE], "uint8"),
            ("probabilities", ["B", 3, SIZE, SIZE], "float32"),
        ],
        {"max_batch": 4},
    ),
}


def valid_manifest() -> dict:
    """A manifest the runtime accepts (files are not checked by ``read_manifest``)."""

    def tensors(items):
        return [{"name": n, "shape": list(s), "dtype": d} for n, s, d in items]

    graphs = [
        {
            "role": role,
            "file": f"{role}.fp32.onnx",
            "precision": "fp32",
            "format": "onnx",
            "sha256": hashlib.sha256(role.encode()).hexdigest(),
            "inputs": tensors(inputs),
            "outputs": tensors(outputs),
            "details": dict(details),
        }
        for role, (inputs, outputs, details) in GRAPH_IO.items()
    ]
    return {
        "schema": "mfnet-export-v1",
        "model": {
            "way": 2,
            "train_shot": 1,
            "channels": CHANNELS,
            "input_size": SIZE,
            "backbone": "small",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "color": "RGB",
            "resize": "pad",
            "support_attention": True,
        },
        "graphs": graphs,
        "opset": 18,
        "versions": {"python": "3.12.3", "torch": "2.11.0"},
        "checkpoint": {"file": "model.pt", "sha256": hashlib.sha256(b"model").hexdigest()},
    }


def write_manifest(directory: Path, manifest: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps(copy.deepcopy(manifest)))
    return directory


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single non-empty stderr line, which must be ``error: ...`` with no unsafe advice."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "weights_only" not in err and "Traceback" not in err, err
    return lines[0]


def usage_error(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``main(argv)``, expect argparse's usage error (exit 2); return its message line."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def disk_full(*_args, **_kwargs):
    """A stand-in for ``os.fsync`` / a write on a full disk."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
