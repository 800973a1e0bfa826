"""Training losses of MFNet: L = L_SEG + lambda * L_PML (paper Eq. (1), (6), (7); lambda = 0.4).

Both losses are plain functions; the caller composes them. Decisions (DESIGN.md section 2):

Weighted focal loss, ``weighted_focal_loss`` (Eq. (1)):

* L = -1 / (M (N + 1)) sum_m sum_n omega_n (1 - p_mn)^gamma y_mn log p_mn,
  omega_n = 1 / log(1.1 + M_n / M). The paper writes 1 / (MN) with N its number of classes; here
  the sum runs over the N + 1 classes including background, so the normaliser is M (N + 1).
* p = softmax over the N + 1 logits; log p comes from ``log_softmax`` (stable for large logits)
  and 1 - p from ``-expm1(log p)`` (accurate when p is close to 1).
* gamma is not given in the paper: default 2, a parameter (gamma >= 0; gamma = 0 is a weighted
  cross-entropy).
* M = number of non-ignored pixels of the image, M_n = its pixels of class n, both PER IMAGE:
  each image's loss is normalised by its own M (N + 1) and the batch loss is the mean over the B
  images. omega_n only matters for classes present in the image (y_mn = 0 otherwise), and there
  M_n / M lies in (0, 1], so omega_n lies in [1 / log 2.1, 1 / log 1.1] and is finite.
* Pixels labelled ``ignore_index`` (255) contribute nothing and are not counted in M or M_n. An
  image without a valid pixel contributes 0 (no division by zero) and still counts in the batch
  mean, so the loss scale does not depend on which other images are in the batch.

Pixel-wise triplet loss, ``pixel_triplet_loss`` (Eq. (6), Sec. III-D):

* Triplets come from ``mfnet.ops.triplet_sampling.sample_triplets_reference`` (see that module for
  the pools, the spatial kernel softmax(-d / (tau * max(h, w))) and the skipping of empty pools),
  or from any callable with the same signature passed as ``sampler`` (e.g. a CUDA sampler).
* The embedding is the decoder's embedding after its first 1x1 conv, at feature resolution; the
  labels are the prediction (argmax) and the ground truth at the features' receptive-field
  centres (``labels_at_feature_centres``).
* With ``normalize=True`` f_a, f_p, f_n are L2-normalised along C, so squared distances lie in
  [0, 4] and the margin alpha = 1 has a fixed meaning whatever the feature scale. The paper
  (Eq. 6) uses the raw embeddings: ``normalize=False``.
* ``reduction`` of the hinges max(|f_a - f_p|^2 - |f_a - f_n|^2 + alpha, 0):
  ``"sum"`` is Eq. (6) as written, the SUM over each query image's valid triplets, then the mean
  over the B images of the batch (so the loss grows with Nt as in the paper, not with B);
  ``"mean"`` is the mean over all valid triplets of the batch, so lambda = 0.4 does not depend on
  Nt (about Nt times smaller than ``"sum"``). With no valid triplet the loss is
  ``embedding.sum() * 0``: a zero that is still connected to the graph, so ``backward`` works in
  every iteration.
* In ``"feature"`` mode the sampler gets the DETACHED embedding (normalised too when
  ``normalize=True``, so "farthest"/"closest" are measured in the space the loss uses): the
  choice of triplets is not differentiated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mfnet.config import PML_REDUCTIONS
from mfnet.ops.triplet_sampling import TripletSample, sample_triplets_reference

TripletSampler = Callable[..., TripletSample]


def weighted_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Class-frequency-weighted focal loss, paper Eq. (1).

    Args:
        logits: float [B, N+1, H, W], raw scores (background first).
        target: int64 [B, H, W], labels 0..N or ``ignore_index``.
        gamma: focusing exponent, >= 0.
        ignore_index: label of pixels that contribute nothing.

    Returns:
        Scalar float tensor: the mean over images of each image's normalised loss.
    """
    if logits.dim() != 4 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float [B, N+1, H, W] tensor, got {tuple(logits.shape)}")
    if target.dtype != torch.int64:
        raise ValueError(f"target must be int64, got {target.dtype}")
    b, k, h, w = logits.shape
    if target.shape != (b, h, w):
        raise ValueError(
            f"target must be [B, H, W] = {(b, h, w)} to match logits, got {tuple(target.shape)}"
        )
    if k < 2:
        raise ValueError(f"logits need N+1 >= 2 channels, got {k}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    valid = target != ignore_index  # [B, H, W]
    if bool(((target[valid] < 0) | (target[valid] >= k)).any()):
        raise ValueError(f"target values must lie in 0..{k - 1} or be {ignore_index}")

    label = torch.where(valid, target, torch.zeros_like(target))  # [B, H, W], ignore -> 0
    log_p = F.log_softmax(logits, dim=1).gather(1, label.unsqueeze(1)).squeeze(1)  # [B, H, W]
    # 1 - p; the tiny floor keeps d/dp (1 - p)^gamma finite at p = 1 when 0 < gamma < 1
    one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)  # [B, H, W]

    # per-image class counts M_n [B, K] and valid pixel counts M [B]
    image = torch.arange(b, device=target.device).view(b, 1, 1)  # [B, 1, 1]
    flat = (image * k + label)[valid]  # [V]
    class_count = torch.bincount(flat, minlength=b * k).view(b, k).to(logits.dtype)  # [B, K]
    pixel_count = class_count.sum(dim=1)  # [B]
    ratio = class_count / pixel_count.clamp_min(1.0).unsqueeze(1)  # [B, K]
    omega = 1.0 / torch.log(1.1 + ratio)  # [B, K]
    omega_pix = omega.gather(1, label.view(b, h * w)).view(b, h, w)  # [B, H, W]

    term = omega_pix * one_minus_p.pow(gamma) * log_p  # [B, H, W]
    term = torch.where(valid, term, torch.zeros_like(term))  # ignored pixels contribute nothing
    per_image = -term.sum(dim=(1, 2)) / (pixel_count.clamp_min(1.0) * k)  # [B]; 0 if M = 0
    return per_image.mean()


def pixel_triplet_loss(
    embedding: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    num_triplets: int = 20,
    margin: float = 1.0,
    positive_mode: str = "spatial",
    tau: float = 0.1,
    generator: torch.Generator | None = None,
    normalize: bool = True,
    sampler: TripletSampler = sample_triplets_reference,
    reduction: str = "mean",
) -> torch.Tensor:
    """Pixel-wise metric learning loss, paper Eq. (6).

    Args:
        embedding: float [B, C, h, w], the decoder embedding at feature resolution.
        pred: int64 [B, h, w], predicted labels 0..N (argmax of the logits at h x w).
        target: int64 [B, h, w], ground truth 0..N or 255, nearest-resized to h x w.
        num_classes: N, the number of foreground classes.
        num_triplets: Nt, anchors per image.
        margin: alpha of Eq. (6).
        positive_mode: ``"spatial"``, ``"random"`` or ``"feature"`` (see the sampler).
        tau: spatial temperature as a fraction of the feature side.
        generator: optional torch.Generator on the embedding's device.
        normalize: L2-normalise the three embeddings along C before the distances.
        sampler: callable with the signature of ``sample_triplets_reference``.
        reduction: ``"sum"`` (Eq. 6: summed per image, mean over the batch) or ``"mean"`` (mean
            over the batch's valid triplets).

    Returns:
        Scalar float tensor connected to ``embedding``'s graph (zero if no triplet is valid).
    """
    if embedding.dim() != 4 or not embedding.dtype.is_floating_point:
        raise ValueError(
            f"embedding must be a float [B, C, h, w] tensor, got {tuple(embedding.shape)}"
        )
    if reduction not in PML_REDUCTIONS:
        raise ValueError(f"reduction must be one of {PML_REDUCTIONS}, got {reduction!r}")
    b, c, h, w = embedding.shape
    if tuple(pred.shape) != (b, h, w) or tuple(target.shape) != (b, h, w):
        raise ValueError(
            f"pred/target must be [B, h, w] = {(b, h, w)} to match the embedding, "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )

    if positive_mode == "feature":
        detached = embedding.detach()
        sampler_embedding: torch.Tensor | None = (
            F.normalize(detached, dim=1) if normalize else detached
        )
    else:
        sampler_embedding = None
    triplets = sampler(
        pred,
        target,
        num_classes,
        num_triplets=num_triplets,
        positive_mode=positive_mode,
        tau=tau,
        generator=generator,
        embedding=sampler_embedding,
    )
    if not bool(triplets.valid.any()):
        return embedding.sum() * 0.0  # zero that keeps the graph, so backward() works

    feats = embedding.reshape(b, c, h * w)  # [B, C, L]
    f_a = _gather(feats, triplets.anchor)  # [B, T, C]
    f_p = _gather(feats, triplets.positive)  # [B, T, C]
    f_n = _gather(feats, triplets.negative)  # [B, T, C]
    if normalize:
        f_a, f_p, f_n = (F.normalize(f, dim=-1) for f in (f_a, f_p, f_n))
    d_pos = (f_a - f_p).pow(2).sum(dim=-1)  # [B, T]
    d_neg = (f_a - f_n).pow(2).sum(dim=-1)  # [B, T]
    hinge = F.relu(d_pos - d_neg + margin)  # [B, T]
    if reduction == "mean":
        return hinge[triplets.valid].mean()
    per_image = torch.where(triplets.valid, hinge, torch.zeros_like(hinge)).sum(dim=1)  # [B]
    return per_image.mean()


def labels_at_feature_centres(
    label: torch.Tensor, size: tuple[int, int], stride: int, offset: float = 0.0
) -> torch.Tensor:
    """The ground truth at the input pixels the feature grid stands for: the centres of the
    features' receptive fields, ``stride * i + offset`` (``FeatureLevel``).

    This is where the logits' upsampling puts them too when the input is ``stride * (h - 1) + 1``
    pixels: at the paper's 473 -> 60, align_corners=True places logit i at i * 472 / 59 = 8i,
    while a nearest resize would take floor(i * 473 / 60) = 7.88i, a label up to 7 pixels away.
    At an input of ``stride * h`` pixels (the synthetic 96 -> 12) the centres are the nearest
    resize's floor(i * H / h) = 8i, and align_corners positions (i * 95 / 11) would be the ones
    up to 7 pixels away from what the embedding sees.

    Args:
        label: int64 [B, H, W] at input resolution.
        size: (h, w), the feature grid.
        stride, offset: the feature level's geometry.

    Returns:
        int64 [B, h, w]: the label at the centres, clamped into the image (values unchanged,
        255 kept).
    """
    height, width = label.shape[-2:]
    h, w = size

    def centres(count: int, limit: int) -> torch.Tensor:
        positions = torch.arange(count, device=label.device) * stride + offset
        return positions.round().clamp(max=limit - 1).long()  # [count]

    return label.index_select(1, centres(h, height)).index_select(2, centres(w, width))


def _gather(feats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick pixel features: feats [B, C, L], index int64 [B, T] -> [B, T, C]."""
    idx = index.unsqueeze(1).expand(-1, feats.shape[1], -1)  # [B, C, T]
    return feats.gather(2, idx).transpose(1, 2)  # [B, T, C]
