"""The workload of one N: the (randomly initialised, calibrated) model, the synthetic frames and
support set, the FP32 reference labels and the FLOP and parameter counts (``WayContext``)."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mfnet.config import Config, preset
from mfnet.data.episodes import synthetic_episodes
from mfnet.model.backbone import feature_size
from mfnet.model.build import build_mfnet
from mfnet.model.inference import FastQueryDecoder
from mfnet.model.mfnet import MFNet
from mfnet.model.support import EncodedSupport

from .variants import SUPPORT_SHOTS


@dataclass
class WayContext:
    """Everything the rows of one N share (built once by ``set_up_way``)."""

    way: int
    model: MFNet
    config: Config
    naive: MFNet
    data: dict[str, Any]
    prototypes: torch.Tensor  # [1, N, C] (K = 1)
    cache: EncodedSupport
    naive_caches: list[EncodedSupport]
    reference: dict[int, np.ndarray] = field(default_factory=dict)  # batch -> uint8 [B, S, S]
    flops: dict[str, Any] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    engines: Path | None = None
    engines_error: str | None = None
    export_s: float | None = None


def model_config(args: argparse.Namespace, way: int, shot: int = 1) -> Config:
    """The paper configuration (ResNet-50, C = 256, 473) or the synthetic-cpu preset for the
    small backbone, with this N, K, size and C; weights "none" (random init, explicit)."""
    base = preset("synthetic-cpu") if args.backbone == "small" else Config()
    return base.replace(
        backbone=args.backbone,
        weights="none",
        channels=args.channels,
        image_size=args.size,
        way=way,
        shot=shot,
    )


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate(
    model: MFNet,
    images: torch.Tensor,
    queries: torch.Tensor,
    support_images: torch.Tensor,
    support_masks: torch.Tensor,
) -> None:
    """Make a randomly initialised model behave like a trained one numerically.

    BatchNorm statistics are re-estimated on synthetic frames (backbone first, then the query
    path), and the classifier is standardised so that every class logit has zero mean and unit
    spread: the labels then vary over the image (an untrained model labels every pixel alike,
    which would make the label-agreement checks trivially true) and activations have realistic
    magnitudes for FP16. Timing does not depend on it.

    images: float [M, 3, S, S]; queries: float [B, 3, S, S]; support_images: float
    [N, K, 3, S, S]; support_masks: [N, K, S, S].
    """
    backbone_bns = set(_batchnorms(model.backbone))
    others = [bn for bn in _batchnorms(model) if bn not in backbone_bns]
    for group, run in (
        (list(backbone_bns), lambda: model.extract_features(images)),
        (
            others,
            lambda: model.decode_query(
                queries, model.encode_support(support_images, support_masks)
            ),
        ),
    ):
        for bn in group:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: the statistics of this one pass
            bn.train()
        run()
        for bn in group:
            bn.eval()
    logits: list[torch.Tensor] = []
    classifier = model.decoder.classifier
    hook = classifier.register_forward_hook(lambda _m, _i, out: logits.append(out))
    try:
        model.decode_query(queries, model.encode_support(support_images, support_masks))
    finally:
        hook.remove()
    stacked = torch.cat(logits)  # [M, N+1, h, w] feature-resolution logits
    mean = stacked.mean(dim=(0, 2, 3))
    std = stacked.std(dim=(0, 2, 3)).clamp_min(1e-6)
    classifier.weight.div_(std.view(-1, 1, 1, 1))
    classifier.bias.sub_(mean).div_(std)


def build_model(
    args: argparse.Namespace, way: int, device: torch.device, data: dict, seed: int
) -> tuple[MFNet, Config]:
    """An N-way model in eval mode on ``device``, seeded, frozen and calibrated on ``data``."""
    config = model_config(args, way)
    torch.manual_seed(seed)
    model = build_mfnet(config.model).eval().to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    queries = data["frames"][: max(4, min(8, data["frames"].shape[0]))]
    support_images = data["support_images"][:, :1]
    support_masks = data["support_masks"][:, :1]
    calibration = torch.cat([queries, support_images.flatten(0, 1)])
    calibrate(model, calibration, queries, support_images, support_masks)
    return model, config


def synthetic_data(
    way: int, size: int, backbone: str, frames: int, shots: int, device: torch.device, seed: int
) -> dict[str, Any]:
    """Support set (N classes x ``shots``) and query frames of the synthetic benchmark.

    Returns uint8 host arrays (what a deployment gets: HWC RGB) and float device tensors:
    frames_np [B, S, S, 3], support_np [N, K, S, S, 3], masks_np [N, K, S, S]; frames float
    [B, 3, S, S], support_images float [N, K, 3, S, S], support_masks [N, K, S, S]."""
    split = "test" if way <= 5 else "train"
    side = feature_size(backbone, size)
    support = synthetic_episodes(
        fold=0,
        split=split,
        way=way,
        shot=shots,
        num_episodes=1,
        seed=seed,
        image_size=size,
        feature_size=side,
    )[0]
    queries = synthetic_episodes(
        fold=0,
        split=split,
        way=way,
        shot=1,
        num_episodes=frames,
        seed=seed + 1,
        image_size=size,
        feature_size=side,
    )
    query_images = torch.stack([queries[i]["query_image"] for i in range(frames)])  # [B,3,S,S]
    frames_np = (query_images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    support_np = (
        (support["support_images"].permute(0, 1, 3, 4, 2) * 255).round().to(torch.uint8).numpy()
    )  # [N, K, S, S, 3]
    masks_np = support["support_masks"].numpy()  # [N, K, S, S]
    as_float = lambda array: torch.from_numpy(array).to(device).float().div(255)  # noqa: E731
    return {
        "frames_np": np.ascontiguousarray(frames_np),
        "support_np": np.ascontiguousarray(support_np),
        "masks_np": np.ascontiguousarray(masks_np),
        "frames": as_float(frames_np).permute(0, 3, 1, 2).contiguous(),
        "support_images": as_float(support_np).permute(0, 1, 4, 2, 3).contiguous(),
        "support_masks": torch.from_numpy(masks_np).to(device),
    }


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (elements) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (FlopCounterMode, no autograd)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def model_flops(model: MFNet, size: int, way: int, shots: int = 1) -> dict[str, int]:
    """FLOPs (2 x multiply-adds of convolutions and matrix products; FlopCounterMode) of one
    frame: decode_query with cached prototypes, and the full model (N x K support shots encoded
    + aggregated + one query decoded). Counted on the meta device (no compute)."""
    meta = copy.deepcopy(model).to("meta")
    channels = model.config.channels
    prototypes = torch.empty(1, way, channels, device="meta")
    cache = EncodedSupport(prototypes[:, :, None], prototypes)
    query = torch.empty(1, 3, size, size, device="meta")
    decoder = count_flops(lambda: meta.decode_query(query, cache))
    images = torch.empty(way * shots, 3, size, size, device="meta")
    foreground = torch.ones(way * shots, size, size, dtype=torch.bool, device="meta")
    shots_flops = count_flops(lambda: meta.pool_shots(images, foreground))
    aggregate = count_flops(
        lambda: meta.aggregate_prototypes(torch.empty(1, way, shots, channels, device="meta"))
    )
    return {
        "decoder": decoder,
        "support_shots": shots_flops,
        "aggregate": aggregate,
        "full": decoder + shots_flops + aggregate,
    }


def make_fast_decoder(model: MFNet) -> FastQueryDecoder:
    """The optimised torch decoder of ``model`` (static pooling, folded prototypes), eval mode."""
    return FastQueryDecoder(model, static_pooling=True, fold_prototypes=True).eval()


def plain_labels(model: MFNet, cache: EncodedSupport) -> Callable[[torch.Tensor], torch.Tensor]:
    """query float [B, 3, S, S] -> labels uint8 [B, S, S] through decode_query."""
    return lambda query: model.decode_query(query, cache).argmax(dim=1).to(torch.uint8)


class strict_fp32:
    """TF32 off for cuDNN and matmul (the FP32 reference); restores the settings on exit."""

    def __enter__(self) -> None:
        """Save the TF32 switches and turn them off."""
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        """Restore the saved TF32 switches."""
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def set_up_way(
    args: argparse.Namespace,
    way: int,
    device: torch.device,
    naive: MFNet,
    naive_cache_source: Callable[[torch.Tensor, torch.Tensor], EncodedSupport],
) -> WayContext:
    """Build the model, data, K = 1 support caches (N-way and the naive 1-way per class), FP32
    reference labels of every batch and the FLOP / parameter counts of N = ``way``."""
    frames = max(args.batch_list)
    data = synthetic_data(
        way, args.size, args.backbone, frames, max(SUPPORT_SHOTS), device, seed=1000 + way
    )
    model, config = build_model(args, way, device, data, seed=way)
    with torch.no_grad():
        cache = model.encode_support(data["support_images"][:, :1], data["support_masks"][:, :1])
        naive_caches = [
            naive_cache_source(
                data["support_images"][n : n + 1, :1], data["support_masks"][n : n + 1, :1]
            )
            for n in range(way)
        ]
    context = WayContext(way, model, config, naive, data, cache.prototypes, cache, naive_caches)
    reference_fn = plain_labels(model, cache)
    with strict_fp32(), torch.no_grad():
        for batch in args.batch_list:
            context.reference[batch] = reference_fn(data["frames"][:batch]).cpu().numpy()
    flops = model_flops(model, args.size, way)
    flops_one = model_flops(naive, args.size, 1)
    context.flops = {
        "full": flops["full"],
        "decoder": flops["decoder"],
        "naive_decoder": way * flops_one["decoder"],
        "naive_full": way * flops_one["full"],
        "support_shot": flops["support_shots"] // way,
    }
    try:
        meta = copy.deepcopy(model).to("meta")
        fast = make_fast_decoder(meta).to("meta")  # its constants too
        protos = torch.empty(1, way, args.channels, device="meta")
        query = torch.empty(1, 3, args.size, args.size, device="meta")
        context.flops["decoder_optimised"] = count_flops(lambda: fast(query, protos))
    except Exception:  # noqa: BLE001 - meta counting is best effort: count on the device
        try:
            fast = make_fast_decoder(model).to(device)
            context.flops["decoder_optimised"] = count_flops(
                lambda: fast(data["frames"][:1], cache.prototypes)
            )
        except Exception as error:  # noqa: BLE001
            context.flops["decoder_optimised_error"] = repr(error)
    context.params = {"model": count_parameters(model), "naive": count_parameters(naive)}
    labels = context.reference[max(args.batch_list)]
    context.flops["reference_label_histogram"] = np.bincount(
        labels.ravel(), minlength=way + 1
    ).tolist()
    return context
