"""Checkpoints: written atomically, read with ``weights_only=True``, checked, rebuilt into a model.

A checkpoint is a dict of builtins and tensors: ``format`` (version tag), ``config``
(``Config.to_dict()``), ``model`` (state dict of the learnable parts and buffers), and for
resuming ``optimizer``, ``epoch`` (epochs completed), ``step`` (optimiser steps done),
``epoch_step`` (steps done in the unfinished epoch ``epoch``; 0 at an epoch end), ``world_size``,
``rng`` (``mfnet.training.rng_state.capture_rng_state``) and, with fp16, ``scaler``. The frozen
torchvision trunk is stored too, so a checkpoint never needs the ImageNet weights again.

This module is the format's one owner: training writes through ``save_checkpoint``, and
everything that reads one (export, prediction, evaluation, resuming) loads it from here.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import torch

from mfnet_runtime.atomic import atomic_write_bytes
from mfnet_runtime.boundary import scrub_unsafe_advice

from .config import Config, ConfigError
from .model.build import build_mfnet
from .model.mfnet import MFNet

FORMAT = "mfnet-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or not an MFNet checkpoint."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the format tag) to ``path`` atomically.

    The bytes go to a temporary file in the same directory, are flushed to disk, and replace the
    target with ``os.replace``, so an interrupted save never leaves a truncated checkpoint.
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    atomic_write_bytes(path, buffer.getvalue(), durable=True)


def safe_torch_load(path: Path, map_location: str | torch.device, what: str) -> Any:
    """``torch.load(weights_only=True)``; any failure is a ``CheckpointError`` in one sentence
    that never repeats torch's advice to turn ``weights_only`` off."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        reason = " ".join(scrub_unsafe_advice(f"{type(error).__name__}: {error}").split())
        raise CheckpointError(
            f"{what} {path} could not be read ({reason}); the file is corrupt or truncated, or "
            "not a torch file of tensors and plain data: re-train or copy it again"
        ) from None  # torch's own text (with its unsafe advice) stays out of the traceback


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check that it is an MFNet checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory, expected a file (e.g. {path / 'last.pt'})"
        )
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; train one with python -m mfnet.train"
        )
    payload = safe_torch_load(path, map_location, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not an MFNet checkpoint (format {found!r}, expected {FORMAT!r})"
        )
    for key in ("config", "model"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks its {key!r} entry")
    return payload


def model_from_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", pool_impl: str = "auto"
) -> tuple[MFNet, Config]:
    """Rebuild the model from the file alone (config + weights); returns it in eval mode."""
    payload = load_checkpoint(path, map_location)
    config = config_from_checkpoint(path, payload)
    # The trunk's weights are in the checkpoint: build it uninitialised instead of downloading.
    model = build_mfnet(dataclasses.replace(config.model, weights="none"), pool_impl)
    model.config = config.model
    check_state_dict(
        payload["model"], model.state_dict(), f"checkpoint {path}", "does not match its own config"
    )
    model.load_state_dict(payload["model"])
    return model.to(map_location).eval(), config


def config_from_checkpoint(path: str | Path, payload: dict[str, Any]) -> Config:
    """The checkpoint's ``Config``; a config of wrong types or values is a ``CheckpointError``
    naming the field (``"way": "2"`` is not a 2-way model)."""
    try:
        return Config.from_dict(payload["config"])
    except ConfigError as error:
        raise CheckpointError(
            f"checkpoint {path} has an invalid config: {error}; it was not "
            "written by this version of mfnet.train, or was edited"
        ) from error


def check_state_dict(
    state: Any,
    expected: dict[str, torch.Tensor],
    what: str,
    problem: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Raise ``CheckpointError`` in one sentence unless ``state`` is a dict of tensors with
    ``expected``'s keys and shapes (keys starting with ``optional`` may be missing): counts and
    the first few offenders, not one line per tensor."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{what} holds a {type(state).__name__}, not a state dict "
            "(a dict of parameter names to tensors)"
        )
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    missing = sorted(k for k in expected if k not in state and not k.startswith(optional))
    unexpected = sorted(str(k) for k in state if k not in expected)
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if isinstance(state.get(k), torch.Tensor) and state[k].shape != v.shape
    ]
    parts = []
    for label, items in (
        ("entries that are not tensors", not_tensors),
        ("missing tensors", missing),
        ("unexpected tensors", unexpected),
        ("tensors of another shape (file vs model)", shapes),
    ):
        if items:
            shown = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
            parts.append(f"{len(items)} {label} ({shown})")
    if parts:
        raise CheckpointError(f"{what} {problem}: " + "; ".join(parts))
