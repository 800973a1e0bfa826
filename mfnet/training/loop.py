"""Episodic training of MFNet (paper Sec. IV-B): SGD + poly schedule, L = L_SEG + lambda L_PML."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Config
from ..data.benchmarks import build_episodes
from ..losses import pixel_triplet_loss, weighted_focal_loss
from ..model.build import build_mfnet
from ..model.mfnet import MFNet, QueryOutput
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .schedule import poly_lr


@dataclass(frozen=True)
class StepLosses:
    total: torch.Tensor
    segmentation: torch.Tensor
    metric: torch.Tensor | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    return device


def compute_losses(
    model: MFNet,
    batch: dict[str, torch.Tensor],
    config: Config,
    use_metric_loss: bool,
    generator: torch.Generator | None = None,
) -> StepLosses:
    """Forward one batch of episodes and compute L_SEG (+ lambda L_PML when switched on)."""
    cache = model.encode_support(batch["support_images"], batch["support_masks"])
    output = model.decode_query(batch["query_image"], cache, return_aux=True)
    assert isinstance(output, QueryOutput)
    label = batch["query_label"]  # [B, H, W]
    if output.branch_logits is not None:  # binary branches: a binary loss per class, no PML
        losses = [
            weighted_focal_loss(output.branch_logits[:, n],
                                torch.where(label == 255, label, (label == n + 1).long()),
                                gamma=config.loss.focal_gamma)
            for n in range(model.way)
        ]
        segmentation = torch.stack(losses).mean()
        return StepLosses(segmentation, segmentation, None)
    segmentation = weighted_focal_loss(output.logits, label, gamma=config.loss.focal_gamma)
    if not use_metric_loss:
        return StepLosses(segmentation, segmentation, None)
    h, w = output.feature_logits.shape[-2:]
    label_small = F.interpolate(label[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    metric = pixel_triplet_loss(
        output.embedding,
        output.feature_logits.argmax(dim=1),  # [B, h, w]
        label_small,  # [B, h, w]
        num_classes=model.way,
        num_triplets=config.loss.pml_triplets,
        margin=config.loss.pml_margin,
        positive_mode=config.loss.pml_mode,
        tau=config.loss.pml_tau,
        generator=generator,
    )
    return StepLosses(segmentation + config.loss.pml_weight * metric, segmentation, metric)


def train(
    config: Config,
    resume: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[MFNet, Path]:
    """Train MFNet episodically; returns the model and the path of the final checkpoint.

    A checkpoint (``last.pt``) is written atomically after every epoch; ``resume`` continues from
    one (its config must match ``config`` except for the number of epochs and the device).
    """
    device = resolve_device(config.train.device)
    torch.manual_seed(config.train.seed)
    model = build_mfnet(config.model).to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        parameters,
        lr=config.train.lr,
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
    )
    steps_per_epoch = config.train.episodes_per_epoch // config.train.batch_size
    if steps_per_epoch == 0:
        raise ValueError("episodes_per_epoch must be at least batch_size")
    total_steps = config.train.epochs * steps_per_epoch
    start_epoch, step = 0, 0
    if resume is not None:
        start_epoch, step = _restore(resume, config, model, optimizer)
        log(f"resumed from {resume} after epoch {start_epoch} (step {step})")
    out_dir = Path(config.train.out)
    checkpoint_path = out_dir / "last.pt"
    log(f"training on {device}: {sum(p.numel() for p in parameters):,} learnable parameters, "
        f"{total_steps} steps, checkpoints in {out_dir}")

    for epoch in range(start_epoch, config.train.epochs):
        # Fresh, reproducible episodes every epoch: seed = f(data_seed, epoch).
        episodes = build_episodes(config, "train", config.model.shot,
                                  config.train.episodes_per_epoch,
                                  seed=config.data.data_seed * 1_000_003 + epoch)
        loader = DataLoader(
            episodes,
            batch_size=config.train.batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=config.train.workers,
            pin_memory=device.type == "cuda",
        )
        use_metric = config.loss.pml_mode != "off" and epoch >= config.loss.pml_start_epoch
        # Per-epoch seeds (dropout, triplet draws): a resumed run repeats an uninterrupted one.
        torch.manual_seed(config.train.seed * 1000 + epoch)
        generator = torch.Generator(device=device).manual_seed(config.train.seed * 1000 + epoch)
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.train.epochs}", unit="step",
                   disable=not progress, dynamic_ncols=True)
        started, running = time.perf_counter(), None
        for batch in bar:
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            lr = poly_lr(config.train.lr, step, total_steps, config.train.poly_power)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = compute_losses(model, batch, config, use_metric, generator)
            if not torch.isfinite(losses.total):
                raise FloatingPointError(
                    f"loss became {losses.total.item()} at step {step}; lower --lr "
                    f"(now {config.train.lr}) or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizer.step()
            step += 1
            value = losses.total.item()
            running = value if running is None else 0.95 * running + 0.05 * value
            postfix = {"loss": f"{running:.4f}", "seg": f"{losses.segmentation.item():.4f}",
                       "lr": f"{lr:.2e}"}
            if losses.metric is not None:
                postfix["pml"] = f"{losses.metric.item():.4f}"
            bar.set_postfix(postfix)
        elapsed = time.perf_counter() - started
        rate = steps_per_epoch * config.train.batch_size / max(elapsed, 1e-9)
        log(f"epoch {epoch + 1}: loss {running:.4f}, {rate:.1f} episodes/s, {elapsed:.0f} s")
        save_checkpoint(checkpoint_path, {
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "step": step,
        })
    return model.eval(), checkpoint_path


def _restore(path: str | Path, config: Config, model: MFNet,
             optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    payload = load_checkpoint(path)
    saved = payload["config"]
    current = config.to_dict()
    # Everything but the run length and the device must match, or the resumed run is another run.
    free = {"epochs", "device", "workers", "out"}
    for section, values in saved.items():
        for name, value in values.items():
            if name not in free and current[section].get(name) != value:
                raise CheckpointError(
                    f"cannot resume from {path}: {name} is {value!r} in the checkpoint but "
                    f"{current[section].get(name)!r} now; resume with the same options"
                )
    for key in ("optimizer", "epoch", "step"):
        if key not in payload:
            raise CheckpointError(f"{path} has no {key!r}: it is not a training checkpoint")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    return int(payload["epoch"]), int(payload["step"])

