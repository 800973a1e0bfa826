"""The training objective of one batch of episodes (paper Eq. 1 and 6): L = L_SEG + lambda L_PML.

The forward pass may run under autocast (``--amp``); the losses are always computed in float32.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from ..config import Config
from ..losses import labels_at_feature_centres, pixel_triplet_loss, weighted_focal_loss
from ..model.mfnet import MFNet, QueryOutput
from ..ops.triplet_sampling import sample_triplets


@dataclass(frozen=True)
class StepLosses:
    """The losses of one batch (scalars): total = segmentation + lambda * metric (metric: L_PML,
    None while it is off or for binary branches)."""

    total: torch.Tensor
    segmentation: torch.Tensor
    metric: torch.Tensor | None


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's autocast: none for "off", bfloat16 or float16 (CUDA only) otherwise."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(
            "--amp fp16 needs a CUDA device (it uses a GradScaler); on the CPU use "
            "--amp bf16 or --amp off"
        )
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def compute_losses(
    model: MFNet,
    batch: dict[str, torch.Tensor],
    config: Config,
    use_metric_loss: bool,
    generator: torch.Generator | None = None,
    amp: str = "off",
) -> StepLosses:
    """Forward one batch of episodes and compute L_SEG (+ lambda L_PML when switched on).

    With ``amp`` the forward runs under autocast; the losses always run in float32.
    """
    device = batch["query_image"].device
    with autocast_context(amp, device):
        cache = model.encode_support(batch["support_images"], batch["support_masks"])
        output = model.decode_query(batch["query_image"], cache, return_aux=True)
    assert isinstance(output, QueryOutput)
    with contextlib.nullcontext() if amp == "off" else torch.autocast(device.type, enabled=False):
        return _losses(model, output, batch["query_label"], config, use_metric_loss, generator)


def _losses(
    model: MFNet,
    output: QueryOutput,
    label: torch.Tensor,
    config: Config,
    use_metric_loss: bool,
    generator: torch.Generator | None,
) -> StepLosses:
    """L_SEG (+ lambda L_PML) of one forward pass; label [B, H, W]. Outputs are cast to float32
    (a no-op without mixed precision)."""
    if output.branch_logits is not None:  # binary branches: a binary loss per class, no PML
        losses = [
            weighted_focal_loss(
                output.branch_logits[:, n].float(),
                torch.where(label == 255, label, (label == n + 1).long()),
                gamma=config.loss.focal_gamma,
            )
            for n in range(model.way)
        ]
        segmentation = torch.stack(losses).mean()
        return StepLosses(segmentation, segmentation, None)
    segmentation = weighted_focal_loss(output.logits.float(), label, gamma=config.loss.focal_gamma)
    if not use_metric_loss or config.loss.pml_triplets == 0:  # Nt = 0 (Fig. 5) is PML off
        return StepLosses(segmentation, segmentation, None)
    h, w = output.feature_logits.shape[-2:]
    level = model.backbone.feature_levels[-1]  # the embedding's grid (every level: stride 8)
    label_small = labels_at_feature_centres(label, (h, w), level.stride, level.offset)  # [B, h, w]
    metric = pixel_triplet_loss(
        output.embedding.float(),
        output.feature_logits.argmax(dim=1),  # [B, h, w]
        label_small,  # [B, h, w]
        num_classes=output.logits.shape[1] - 1,  # the episode's n (<= N slots if way-flexible)
        num_triplets=config.loss.pml_triplets,
        margin=config.loss.pml_margin,
        positive_mode=config.loss.pml_mode,
        tau=config.loss.pml_tau,
        generator=generator,
        normalize=config.loss.pml_normalize,
        reduction=config.loss.pml_reduction,
        # config.train.ops: "auto" = the fused sampler on a GPU, the reference on the CPU
        sampler=functools.partial(sample_triplets, impl=config.train.ops),
    )
    return StepLosses(segmentation + config.loss.pml_weight * metric, segmentation, metric)
