"""The evaluation protocol (paper Sec. IV-A/B): runs x episodes, fixed seeds, mean and std.

Several predictors (MFNet, the training-free baseline) are scored on the very same episodes in
one pass, so their numbers are directly comparable.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import Config
from .data.benchmarks import build_episodes, describe, novel_class_ids
from .metrics import FewShotMeter

# (support_images [B,N,K,3,H,W], support_masks [B,N,K,H,W], query [B,3,H,W]) -> logits [B,N+1,H,W]
Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

METRICS = ("miou_star", "miou", "fbiou")


@dataclass(frozen=True)
class ProtocolResult:
    """Per-run metric dicts (``FewShotMeter.compute()``) of one predictor, and their summary."""

    runs: tuple[dict, ...]

    def mean(self, metric: str) -> float:
        return statistics.fmean(run[metric] for run in self.runs)

    def std(self, metric: str) -> float:
        values = [run[metric] for run in self.runs]
        return statistics.pstdev(values) if len(values) > 1 else 0.0

    def per_class_mean(self, key: str = "per_class_star") -> dict[int, float]:
        """Mean IoU per class over the runs in which the class had data (NaN if none did)."""
        means = {}
        for c in self.runs[0][key]:
            values = [run[key][c] for run in self.runs if not math.isnan(run[key][c])]
            means[c] = statistics.fmean(values) if values else math.nan
        return means

    def summary(self) -> dict:
        return {
            **{f"{m}_mean": self.mean(m) for m in METRICS},
            **{f"{m}_std": self.std(m) for m in METRICS},
            "per_class_star": self.per_class_mean("per_class_star"),
            "per_class": self.per_class_mean("per_class"),
            "runs": list(self.runs),
        }


def run_protocol(
    predictors: dict[str, Predictor],
    config: Config,
    device: torch.device,
    progress: bool = True,
) -> dict[str, ProtocolResult]:
    """Score every predictor on ``eval_runs`` x ``eval_episodes`` test episodes of the fold.

    Run r draws its episodes with seed ``eval_seed + r``. Per-class TP/FP/FN accumulate over the
    episodes of a run (``FewShotMeter``); mean and std are taken over runs.
    """
    ev = config.eval
    shot = ev.eval_shot or config.model.shot
    class_ids = novel_class_ids(config)
    results: dict[str, list[dict]] = {name: [] for name in predictors}
    for run in range(ev.eval_runs):
        episodes = build_episodes(config, "test", shot, ev.eval_episodes, ev.eval_seed + run)
        loader = DataLoader(
            episodes,
            batch_size=ev.eval_batch_size,
            num_workers=config.train.workers,
            pin_memory=device.type == "cuda",
        )
        meters = {name: FewShotMeter(class_ids) for name in predictors}
        bar = tqdm(loader, desc=f"eval run {run + 1}/{ev.eval_runs}", unit="batch",
                   disable=not progress, leave=False)
        with torch.no_grad():
            for batch in bar:
                images = batch["support_images"].to(device)
                masks = batch["support_masks"].to(device)
                query = batch["query_image"].to(device)
                for name, predict in predictors.items():
                    pred = predict(images, masks, query).argmax(dim=1).cpu()  # [B, H, W]
                    for b in range(pred.shape[0]):  # the episode classes differ per episode
                        meters[name].update(
                            pred[b], batch["query_label"][b], batch["episode_classes"][b]
                        )
        for name, meter in meters.items():
            results[name].append(meter.compute())
    return {name: ProtocolResult(tuple(runs)) for name, runs in results.items()}


def format_results(results: dict[str, ProtocolResult], protocol_lines: list[str]) -> str:
    """A human-readable block: the protocol options, then mIoU*, mIoU, FB-IoU (mean +- std, %)."""
    lines = ["protocol:"] + [f"  {line}" for line in protocol_lines]
    lines.append(f"{'':<12}{'mIoU*':>16}{'mIoU':>16}{'FB-IoU':>16}")
    for name, result in results.items():
        cells = "".join(
            f"{100 * result.mean(m):>9.2f} +- {100 * result.std(m):4.2f}" for m in METRICS
        )
        lines.append(f"{name:<12}{cells}")
    for name, result in results.items():
        per_class = ", ".join(
            f"{c}: {100 * v:.1f}" for c, v in result.per_class_mean("per_class_star").items()
        )
        lines.append(f"{name} per-class IoU* -> {per_class}")
    return "\n".join(lines)


def protocol_description(config: Config) -> list[str]:
    ev = config.eval
    shot = ev.eval_shot or config.model.shot
    return [
        describe(config),
        f"{config.model.way}-way {shot}-shot, {ev.eval_runs} runs x {ev.eval_episodes} episodes, "
        f"seeds {ev.eval_seed}..{ev.eval_seed + ev.eval_runs - 1} (run r: eval_seed + r)",
        "IoU per class from TP/FP/FN summed over a run's episodes; mean over the fold's novel "
        "classes (background excluded); mIoU* counts false positives of episode classes absent "
        "from the query, mIoU (PANet) does not; FB-IoU = mean(background IoU, foreground IoU)",
    ]
