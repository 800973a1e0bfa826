"""Exported tiny models for the runtime tests (and the CLI tests that build on them).

``export_tiny`` builds the small synthetic-cpu model untrained (seeded, so deterministic),
saves it as a checkpoint and exports FP32 ONNX graphs with small dynamic-axis limits. Nothing is
trained: the runtime is checked against the PyTorch model itself, not against accuracy.

An untrained model labels every pixel with the same class (one logit's bias dominates), which
makes label comparisons trivially true. ``varied_labels=True`` rescales the classifier (the
decoder's last 1x1 conv) so that each logit has zero mean and unit spread over a few synthetic
episodes: the labels then vary across the image and parity tests on them mean something.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mfnet.config import preset
from mfnet.data.episodes import synthetic_episodes
from mfnet.export.onnx_export import ExportLimits, export_onnx
from mfnet.model.build import build_mfnet
from mfnet.model.mfnet import MFNet
from mfnet.training.checkpoint import save_checkpoint

LIMITS = ExportLimits(max_batch=4, max_support=16, max_shots=8)


def _vary_labels(model: MFNet, shot: int, size: int) -> None:
    """Standardise each class logit over calibration episodes (fold 1, never the tests' fold 0)."""
    episodes = synthetic_episodes(fold=1, split="test", way=model.way, shot=shot,
                                  num_episodes=4, seed=123, image_size=size)
    logits = []
    hook = model.decoder.classifier.register_forward_hook(lambda _m, _i, out: logits.append(out))
    try:
        with torch.no_grad():
            for episode in episodes:
                cache = model.encode_support(episode["support_images"], episode["support_masks"])
                model.decode_query(episode["query_image"][None], cache)
    finally:
        hook.remove()
    stacked = torch.cat(logits)  # [E, N+1, h, w] feature-resolution logits
    mean = stacked.mean(dim=(0, 2, 3))
    std = stacked.std(dim=(0, 2, 3)).clamp_min(1e-6)
    classifier = model.decoder.classifier
    with torch.no_grad():
        classifier.weight.div_(std.view(-1, 1, 1, 1))
        classifier.bias.sub_(mean).div_(std)


def tiny_model(way: int = 2, shot: int = 1, size: int = 48, *, varied_labels: bool = False
               ) -> tuple[MFNet, dict]:
    """The small model (16 channels) under ``torch.manual_seed(0)``, in eval mode, + its config."""
    config = preset("synthetic-cpu").replace(image_size=size, channels=16, way=way, shot=shot)
    torch.manual_seed(0)
    model = build_mfnet(config.model).eval()
    if varied_labels:
        _vary_labels(model, shot, size)
    return model, config.to_dict()


def export_tiny(tmp_dir: str | Path, way: int = 2, shot: int = 1, size: int = 48, *,
                varied_labels: bool = False) -> tuple[Path, Path]:
    """Checkpoint + FP32 ONNX export of the tiny model under ``tmp_dir``.

    Returns (engine_dir, checkpoint_path); the engine directory holds ``manifest.json``.
    """
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    model, config = tiny_model(way, shot, size, varied_labels=varied_labels)
    tag = f"{way}way-{shot}shot-{size}{'-varied' if varied_labels else ''}"
    checkpoint = tmp_dir / f"tiny-{tag}.pt"
    save_checkpoint(checkpoint, {"config": config, "model": model.state_dict()})
    engine_dir = tmp_dir / f"engines-{tag}"
    export_onnx(checkpoint, engine_dir, precisions=("fp32",), limits=LIMITS, log=lambda _: None)
    return engine_dir, checkpoint
