"""Checkpoints: written atomically, read with ``weights_only=True``, self-describing.

A checkpoint is a dict of builtins and tensors: ``format`` (version tag), ``config``
(``Config.to_dict()``), ``model`` (state dict of the learnable parts and buffers), and for
resuming ``optimizer``, ``epoch`` (epochs completed) and ``step``. The frozen torchvision trunk
is stored too, so a checkpoint never needs the ImageNet weights again.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_bytes
from ..config import Config
from ..model.build import build_mfnet
from ..model.mfnet import MFNet

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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check that it is an MFNet checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(error).__name__}: {error}); the file is "
            "corrupt or truncated, or not a torch checkpoint: re-train or copy it again"
        ) from error
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
    config = Config.from_dict(payload["config"])
    # The trunk's weights are in the checkpoint: build it uninitialised instead of downloading.
    model = build_mfnet(dataclasses.replace(config.model, weights="none"), pool_impl)
    model.config = config.model
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {error}") from error
    return model.to(map_location).eval(), config
