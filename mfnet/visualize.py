"""Qualitative results laid out like the paper's Fig. 4 (matplotlib, Agg backend).

One row per test episode: the support images with their masks overlaid (one column per class
and shot), the query, its ground truth and the prediction. Labels are drawn in class colours
(label j = the episode's j-th class, its original id in the legend); ignored pixels are grey.
The episodes are the first ones of evaluation run 0 (seed ``eval_seed``), the same that the
protocol scores first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import Config
from .data.datasets import build_episodes
from .metrics import IGNORE_INDEX
from .model.mfnet import MFNet

# RGB per episode label 1..N (background is black, ignore grey): tab10-like, distinguishable.
PALETTE = (
    (0.89, 0.10, 0.11),
    (0.22, 0.49, 0.72),
    (0.30, 0.69, 0.29),
    (0.60, 0.31, 0.64),
    (1.00, 0.50, 0.00),
    (1.00, 1.00, 0.20),
    (0.65, 0.34, 0.16),
    (0.97, 0.51, 0.75),
)
IGNORE_COLOUR = (0.5, 0.5, 0.5)


def label_to_rgb(label: torch.Tensor) -> torch.Tensor:
    """label [H, W] (0 background, 1..N classes, 255 ignore) -> colours [H, W, 3] in [0, 1]."""
    rgb = torch.zeros(*label.shape, 3)
    for j, colour in enumerate(PALETTE, start=1):
        rgb[label == j] = torch.tensor(colour)
    rgb[label == IGNORE_INDEX] = torch.tensor(IGNORE_COLOUR)
    return rgb


def overlay(image: torch.Tensor, label: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """image [3, H, W] in [0, 1], label [H, W] -> [H, W, 3]: labelled pixels tinted."""
    picture = image.permute(1, 2, 0).clamp(0, 1)
    tint = (label > 0)[..., None]
    return torch.where(tint, (1 - alpha) * picture + alpha * label_to_rgb(label), picture)


def predict_episodes(model: MFNet, config: Config, device: torch.device, count: int) -> list[dict]:
    """The first ``count`` episodes of evaluation run 0 with the model's prediction
    (``prediction`` [H, W], at network resolution)."""
    shot = config.eval.eval_shot or config.model.shot
    episodes = build_episodes(config, "test", shot, max(count, 1), config.eval.eval_seed)
    model = model.to(device).eval()
    items = []
    with torch.no_grad():
        for index in range(min(count, len(episodes))):
            item = dict(episodes[index])
            logits = model(
                item["support_images"][None].to(device),
                item["support_masks"][None].to(device),
                item["query_image"][None].to(device),
            )  # [1, N+1, H, W]
            item["prediction"] = logits[0].float().argmax(dim=0).cpu()
            items.append(item)
    return items


def draw_grid(items: list[dict], path: str | Path, title: str = "") -> Path:
    """Write the Fig. 4-style grid of ``items`` (episodes with ``prediction``) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    way, shot = items[0]["support_masks"].shape[:2]
    columns = way * shot + 3
    figure, axes = plt.subplots(
        len(items), columns, figsize=(1.8 * columns, 1.9 * len(items)), squeeze=False
    )
    for row, item in enumerate(items):
        classes = [int(c) for c in item["episode_classes"]]
        pictures = []
        for n in range(way):
            for k in range(shot):
                mask = item["support_masks"][n, k].long()
                label = torch.where(mask == 1, torch.full_like(mask, n + 1), mask)
                label = torch.where(mask == IGNORE_INDEX, torch.zeros_like(mask), label)
                pictures.append(
                    (
                        f"support, class {n + 1}" + (f" #{k + 1}" if shot > 1 else ""),
                        overlay(item["support_images"][n, k], label),
                    )
                )
        query = item["query_image"].permute(1, 2, 0).clamp(0, 1)
        pictures += [
            ("query", query),
            ("ground truth", overlay(item["query_image"], item["query_label"], 0.7)),
            ("prediction", overlay(item["query_image"], item["prediction"], 0.7)),
        ]
        for column, (name, picture) in enumerate(pictures):
            axis = axes[row][column]
            axis.imshow(picture.numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=8)
        handles = [
            Patch(color=PALETTE[j], label=f"{j + 1}: class id {c}") for j, c in enumerate(classes)
        ]
        axes[row][-1].legend(
            handles=handles,
            fontsize=6,
            loc="center left",
            bbox_to_anchor=(1.02, 0.5),
            frameon=False,
        )
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_visuals(
    model: MFNet,
    config: Config,
    device: torch.device,
    out_dir: str | Path,
    count: int,
    name: str = "episodes",
) -> list[Path]:
    """Predict the first ``count`` episodes of run 0 and write their grid to
    ``out_dir/NAME.png``; returns the written paths."""
    items = predict_episodes(model, config, device, count)
    if not items:
        return []
    title = (
        f"{config.data.dataset} fold {config.data.fold}, {config.model.way}-way "
        f"{config.eval.eval_shot or config.model.shot}-shot, episodes 0..{len(items) - 1}"
    )
    return [draw_grid(items, Path(out_dir) / f"{name}.png", title)]
