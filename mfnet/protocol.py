"""The evaluation protocol (paper Sec. IV-A/B): runs x episodes, fixed seeds, mean and std.

Several predictors (MFNet, the training-free baseline) are scored on the very same episodes in
one pass, so their numbers are directly comparable.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from .config import Config
from .data.datasets import build_episodes, describe, novel_class_ids
from .metrics import FewShotMeter
from .progress import progress_bar
from .training.distributed import DistContext, all_reduce_sum, shard_indices

# (support_images [B,N,K,3,H,W], support_masks [B,N,K,H,W], query [B,3,H,W]) -> logits [B,N+1,H,W]
Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

METRICS = ("miou_star", "miou", "fbiou")


@dataclass(frozen=True)
class ProtocolResult:
    """Per-run metric dicts (``FewShotMeter.compute()``) of one predictor, and their summary."""

    runs: tuple[dict, ...]

    def mean(self, metric: str) -> float:
        """Mean of ``metric`` over the runs."""
        return statistics.fmean(run[metric] for run in self.runs)

    def std(self, metric: str) -> float:
        """Population standard deviation of ``metric`` over the runs (0 for one run)."""
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
        """Means, stds, per-class means and the runs themselves, as plain data (JSON)."""
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
    context: DistContext | None = None,
) -> dict[str, ProtocolResult]:
    """Score every predictor on ``eval_runs`` x ``eval_episodes`` test episodes of the fold.

    Run r draws its episodes with seed ``eval_seed + r``. Per-class TP/FP/FN accumulate over the
    episodes of a run (``FewShotMeter``); mean and std are taken over runs. Under data
    parallelism (``context`` with world size W > 1) rank r scores episodes r, r + W, ... and the
    raw counts are summed over ranks before the metrics are computed: the numbers are those of
    a single process scoring every episode. Every rank must call this.
    """
    context = context or DistContext()
    ev = config.eval
    shot = ev.eval_shot or config.model.shot
    class_ids = novel_class_ids(config)
    results: dict[str, list[dict]] = {name: [] for name in predictors}
    for run in range(ev.eval_runs):
        run_episodes = build_episodes(config, "test", shot, ev.eval_episodes, ev.eval_seed + run)
        episodes: Dataset = run_episodes
        if context.enabled:
            episodes = Subset(
                run_episodes, shard_indices(len(run_episodes), context.rank, context.world_size)
            )
        meters = _score_run(
            predictors,
            episodes,
            config,
            device,
            class_ids,
            f"eval run {run + 1}/{ev.eval_runs}",
            progress and context.is_main,
        )
        for name, meter in meters.items():
            results[name].append(_run_metrics(meter, class_ids, context, device))
    return {name: ProtocolResult(tuple(runs)) for name, runs in results.items()}


def _score_run(
    predictors: dict[str, Predictor],
    episodes: Dataset,
    config: Config,
    device: torch.device,
    class_ids: tuple[int, ...],
    description: str,
    progress: bool,
) -> dict[str, FewShotMeter]:
    """Every predictor's per-class counts over the episodes of one run."""
    loader = DataLoader(
        episodes,
        batch_size=config.eval.eval_batch_size,
        num_workers=config.train.workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_episodes,
    )
    meters = {name: FewShotMeter(class_ids) for name in predictors}
    bar = progress_bar(loader, description, unit="batch", enabled=progress, leave=False)
    with torch.no_grad():
        for batch in bar:
            _score_batch(predictors, batch, meters, device)
    return meters


def _score_batch(
    predictors: dict[str, Predictor],
    batch: dict,
    meters: dict[str, FewShotMeter],
    device: torch.device,
) -> None:
    """Add each predictor's predictions on ``batch`` to its meter, episode by episode (the
    episode classes differ per episode)."""
    images = batch["support_images"].to(device)
    masks = batch["support_masks"].to(device)
    query = batch["query_image"].to(device)
    for name, predict in predictors.items():
        logits = predict(images, masks, query).float().cpu()  # [B, N+1, S, S]
        for b in range(logits.shape[0]):
            pred, target = score_maps(logits[b], batch, b)
            meters[name].update(pred, target, batch["episode_classes"][b])


def _run_metrics(
    meter: FewShotMeter, class_ids: tuple[int, ...], context: DistContext, device: torch.device
) -> dict:
    """The metrics of one run (``FewShotMeter.compute()``); under data parallelism of the
    counts summed over all ranks."""
    if not context.enabled:
        return meter.compute()
    total = FewShotMeter(class_ids)
    total.merge(all_reduce_sum(meter.state(), _reduce_device(device)))
    return total.compute()


def _reduce_device(device: torch.device) -> torch.device:
    """nccl reduces CUDA tensors only; gloo reduces CPU tensors."""
    return device if device.type == "cuda" else torch.device("cpu")


def collate_episodes(items: list[dict[str, torch.Tensor]]) -> dict:
    """Default collate, except ``query_label_original`` (sizes differ), kept as a list."""
    originals = [
        item.pop("query_label_original") for item in items if "query_label_original" in item
    ]
    batch = default_collate(items)
    if originals:
        batch["query_label_original"] = originals
    return batch


def score_maps(logits: torch.Tensor, batch: dict, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction and ground truth of episode ``b`` at the resolution the protocol scores.

    logits [N+1, S, S]. At network resolution: argmax vs ``query_label``. At the original
    resolution (PFENet): the region the image occupies in the input is cropped, upsampled
    bilinearly (align_corners=True) to the image's own size, then argmax vs the original label.
    """
    if "query_label_original" not in batch:
        return logits.argmax(dim=0), batch["query_label"][b]
    target = batch["query_label_original"][b]  # [H0, W0]
    h, w = (int(v) for v in batch["query_content"][b])
    content = logits[None, :, :h, :w]  # [1, N+1, h, w]
    resized = F.interpolate(content, size=tuple(target.shape), mode="bilinear", align_corners=True)
    return resized[0].argmax(dim=0), target


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
    """The protocol's options as printed beside the numbers (and stored in results.json)."""
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


def fold_table(per_fold: dict[int, dict[str, ProtocolResult]]) -> tuple[str, str]:
    """Markdown and CSV laid out like the paper's Tables I, III, X, XI: a row per method,
    mIoU*/mIoU per fold and their mean over folds (means over runs, in %)."""
    folds = sorted(per_fold)
    methods = list(per_fold[folds[0]])
    header = "| Method | " + " | ".join(f"fold-{f}" for f in folds) + " | Mean |"
    lines = [header, "|" + "---|" * (len(folds) + 2)]
    csv = ["method,fold,miou_star_mean,miou_star_std,miou_mean,miou_std,fbiou_mean,fbiou_std"]
    for method in methods:
        cells = []
        for fold in folds:
            result = per_fold[fold][method]
            cells.append(f"{100 * result.mean('miou_star'):.1f}/{100 * result.mean('miou'):.1f}")
            csv.append(
                ",".join(
                    [method, str(fold)]
                    + [
                        f"{100 * getattr(result, stat)(m):.2f}"
                        for m in METRICS
                        for stat in ("mean", "std")
                    ]
                )
            )
        star = statistics.fmean(per_fold[f][method].mean("miou_star") for f in folds)
        panet = statistics.fmean(per_fold[f][method].mean("miou") for f in folds)
        cells.append(f"{100 * star:.1f}/{100 * panet:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: mIoU*/mIoU (%), each the mean over the runs of that fold.")
    return "\n".join(lines), "\n".join(csv) + "\n"
