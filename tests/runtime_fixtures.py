"""Tiny models whose labels vary, their exports, and the check that compared label maps vary.

Label parity ("the export gives the same labels as PyTorch") can only fail when the labels are
not all alike. An untrained model labels every pixel with one class (one logit's bias
dominates), so ``varied_model`` calibrates the small seeded model instead of training it: the
classifier (the decoder's last 1x1 conv) is rescaled so that each class logit has zero mean and
unit spread over synthetic episodes of fold 1 (the tests use fold 0). It then checks its own
guarantee on held-out fold-0 episodes and raises if it does not hold:

- every label 0..N occurs on every checked query, and
- no two checked queries get the same label map.

Nothing is trained: the runtime is checked against the PyTorch model itself, not against
accuracy. Every label-parity test calls ``assert_labels_vary`` on the maps it compares before
comparing them, so a test whose inputs happen to give constant or repeated maps fails instead
of passing vacuously. The session fixture ``varied_export`` (tests/conftest.py) exports each
configuration once per test session.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mfnet.checkpoint import save_checkpoint
from mfnet.config import preset
from mfnet.data.episodes import synthetic_episodes
from mfnet.export.onnx_export import ExportLimits, export_onnx
from mfnet.model.backbone import feature_size
from mfnet.model.build import build_mfnet
from mfnet.model.mfnet import MFNet

LIMITS = ExportLimits(max_batch=4, max_support=16, max_shots=8)
CHECK_EPISODES = 3  # held-out queries on which varied_model checks its guarantee


def assert_labels_vary(
    label_maps: Sequence[np.ndarray], inputs: Sequence[np.ndarray] = (), min_labels: int = 2
) -> None:
    """Fail unless each map holds >= ``min_labels`` distinct labels and no two maps (nor two
    ``inputs``, the frames they came from) are equal: the precondition of a label comparison
    that can fail, e.g. on a frame reordering or a swap of two classes."""
    maps = [np.asarray(m) for m in label_maps]
    assert maps, "no label maps to compare"
    for index, labels in enumerate(maps):
        present = np.unique(labels)
        assert len(present) >= min_labels, (
            f"label map {index} holds only labels {present.tolist()}: a comparison on it "
            f"cannot detect swapped classes"
        )
    for group, name in ((maps, "label map"), ([np.asarray(x) for x in inputs], "input")):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                assert not np.array_equal(group[i], group[j]), (
                    f"{name}s {i} and {j} are equal: a comparison on them cannot detect a "
                    f"reordering"
                )


def _calibrate_classifier(model: MFNet, shot: int, size: int) -> None:
    """Standardise each class logit over episodes of fold 1 (never the tests' fold 0)."""
    episodes = synthetic_episodes(
        fold=1,
        split="test",
        way=model.way,
        shot=shot,
        num_episodes=4,
        seed=123,
        image_size=size,
        feature_size=feature_size(model.config.backbone, size),
    )
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


def varied_model(
    way: int = 2, shot: int = 1, size: int = 48, max_way: int = 0
) -> tuple[MFNet, dict]:
    """The small synthetic-cpu model (16 channels) under ``torch.manual_seed(0)``, calibrated so
    that its labels vary, in eval mode, + its config dict. Raises AssertionError when the
    guarantee of the module docstring does not hold on fold-0 test episodes. ``max_way``: a
    way-flexible model with that many slots (checked with all of them filled, ``way`` = it)."""
    config = preset("synthetic-cpu").replace(
        image_size=size, channels=16, way=way, shot=shot, max_way=max_way
    )
    torch.manual_seed(0)
    model = build_mfnet(config.model).eval()
    _calibrate_classifier(model, shot, size)
    episodes = synthetic_episodes(
        fold=0,
        split="test",
        way=way,
        shot=shot,
        num_episodes=CHECK_EPISODES,
        seed=7,
        image_size=size,
        feature_size=feature_size(config.model.backbone, size),
    )
    with torch.no_grad():
        cache = model.encode_support(episodes[0]["support_images"], episodes[0]["support_masks"])
        queries = torch.stack([episode["query_image"] for episode in episodes])  # [E, 3, H, W]
        labels = model.decode_query(queries, cache).argmax(1).numpy()  # [E, H, W]
    assert_labels_vary(list(labels), min_labels=way + 1)
    return model, config.to_dict()


def export_varied(
    tmp_dir: str | Path,
    way: int = 2,
    shot: int = 1,
    size: int = 48,
    precisions: tuple[str, ...] = ("fp32",),
    max_way: int = 0,
) -> tuple[Path, Path, dict]:
    """Checkpoint of ``varied_model`` + its ONNX export (verified, as every export) under
    ``tmp_dir``. Returns (engine_dir, checkpoint_path, manifest); the engine directory holds
    ``manifest.json``."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    model, config = varied_model(way, shot, size, max_way)
    tag = f"{way}way{max_way or ''}-{shot}shot-{size}-{'-'.join(precisions)}"
    checkpoint = tmp_dir / f"varied-{tag}.pt"
    save_checkpoint(checkpoint, {"config": config, "model": model.state_dict()})
    engine_dir = tmp_dir / f"engines-{tag}"
    manifest = export_onnx(checkpoint, engine_dir, precisions=precisions, limits=LIMITS)
    return engine_dir, checkpoint, manifest
