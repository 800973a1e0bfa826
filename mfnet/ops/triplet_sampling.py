"""Reference sampler of the pixel-wise triplets of PML (paper Sec. III-D, DESIGN.md section 2).

This pure-PyTorch implementation is the SPECIFICATION of the sampling distribution; a CUDA kernel
must match it in distribution (not bit for bit). Definitions, per image b and foreground class n:

* anchors        A_n  = (pred == n) & (target == n)
* hard positives HP_n = (target == n) & (pred != n)                      (false negatives of n)
* hard negatives HN_n = (pred == n) & (target != n) & (target != 255)    (false positives of n)

Only the foreground classes 1..N form pools: the background (label 0) does not, because PML
sharpens the class embeddings that the few-shot prototypes produce, and the background is not a
support class. Ignore pixels (target 255) belong to no pool.

Sampling, per image:

1. ``num_triplets`` anchors are drawn uniformly WITH replacement from the union of A_1..A_N
   (paper: "Nt seeds randomly selected from the joint pools of anchors"). The anchor's class n is
   its label. An image whose union is empty gets an all-invalid row.
2. Positive from HP_n:
   * ``"spatial"`` (paper default): P(q) = exp(-d(a, q) / tau') / sum_{q' in HP_n} exp(-d(a, q')
     / tau'), i.e. softmax(-d / tau') over the pool, with d the Euclidean distance between pixel
     centres on the feature grid and tau' = tau * max(h, w). Scaling by the feature side makes
     ``tau`` resolution-independent: tau = 0.1 means the weight falls by 1/e every 10 % of the
     feature map's side.
   * ``"random"``: uniform over HP_n (the paper's PML-random ablation).
   * ``"feature"``: deterministic, the HP_n pixel with the LARGEST squared feature distance to the
     anchor (paper's PML-feature ablation, after [31]); needs ``embedding``. Ties go to the
     lowest flat index (``argmax`` semantics), here and for the feature-mode negative.
3. Negative from HN_n: uniform in ``"spatial"`` and ``"random"`` modes (the paper: hard negatives
   have no direct relation to their spatial distance); in ``"feature"`` mode the HN_n pixel with
   the SMALLEST squared feature distance to the anchor.
4. A triplet whose HP_n or HN_n is empty is invalid (``valid`` False) and its three indices are 0.
   The sampler never returns an index from an empty pool.

Vectorisation: every categorical draw uses the Gumbel-max trick, argmax_q (log w_q + G_q) with
G_q = -log(-log U_q), U_q ~ U(0, 1) i.i.d. and log w_q = -inf outside the pool; this is exactly a
draw from w / sum(w) and runs over a [B, T, h*w] tensor at once. The random numbers are drawn in a
fixed order, three [B, T, h*w] uniform tensors (anchors, positives, negatives), in EVERY mode
(``"feature"`` ignores the last two), so one generator state fixes the result and the anchors of
the three modes coincide for one seed. Computation stays on the device of the inputs; the
generator, if given, must live on that device (as ``torch.rand`` requires).

``sample_triplets`` is the dispatching front (``impl`` = "auto" | "reference" | "cuda", see
``mfnet.ops.extension``): it validates like the reference and runs either the reference or the
fused ``mfnet_ext`` sampler (one CUDA block per triplet; a bit-identical C++ twin on CPU tensors).
The fused sampler draws from the same distribution with its own counter-based random numbers
(Philox4x32-10 keyed by a (seed, offset) taken from the generator), so for one generator state
the two implementations give different, equally distributed triplets; a fused result is fixed by
the generator state and identical on CPU and CUDA. ``"feature"`` mode is not fused.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

import torch

from .extension import check_impl, extension_for

IGNORE_INDEX = 255
POSITIVE_MODES = ("spatial", "random", "feature")


@dataclass(frozen=True)
class TripletSample:
    """Sampled triplets of one batch; indices are flat positions y * w + x on the feature grid."""

    anchor: torch.Tensor  # int64 [B, T]
    positive: torch.Tensor  # int64 [B, T]
    negative: torch.Tensor  # int64 [B, T]
    valid: torch.Tensor  # bool [B, T]: False where the triplet was skipped (an empty pool)


def sample_triplets_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    num_triplets: int = 20,
    positive_mode: str = "spatial",
    tau: float = 0.1,
    generator: torch.Generator | None = None,
    embedding: torch.Tensor | None = None,
) -> TripletSample:
    """Draw ``num_triplets`` (anchor, hard positive, hard negative) triplets per image.

    Args:
        pred: int64 [B, h, w], predicted labels 0..N at feature resolution.
        target: int64 [B, h, w], ground truth 0..N or 255 (ignore), nearest-resized to h x w.
        num_classes: N, the number of foreground classes (ways), >= 1.
        num_triplets: T, anchors drawn per image (with replacement), >= 1.
        positive_mode: ``"spatial"``, ``"random"`` or ``"feature"`` (see the module docstring).
        tau: spatial temperature as a fraction of the feature side (``"spatial"`` only), > 0.
        generator: optional torch.Generator on the inputs' device; None uses the global RNG.
        embedding: float [B, C, h, w]; required by ``"feature"``, ignored otherwise.

    Returns:
        TripletSample with int64 [B, T] indices into h * w and a bool [B, T] validity mask.
    """
    _check_inputs(pred, target, num_classes, num_triplets, positive_mode, tau, embedding)
    b, h, w = pred.shape
    n_pix = h * w
    device = pred.device
    pred_flat = pred.reshape(b, n_pix)  # [B, L]
    target_flat = target.reshape(b, n_pix)  # [B, L]

    # fixed draw order: anchors, positives, negatives (all modes, see module docstring)
    gumbel_anchor = _gumbel((b, num_triplets, n_pix), generator, device)  # [B, T, L]
    gumbel_pos = _gumbel((b, num_triplets, n_pix), generator, device)  # [B, T, L]
    gumbel_neg = _gumbel((b, num_triplets, n_pix), generator, device)  # [B, T, L]

    # 1. anchors: uniform over the union of A_1..A_N (target 255 never equals pred in 0..N)
    anchor_pool = (pred_flat == target_flat) & (pred_flat >= 1)  # [B, L]
    has_anchor = anchor_pool.any(dim=1, keepdim=True)  # [B, 1]
    anchor = _masked_argmax(gumbel_anchor, anchor_pool.unsqueeze(1))  # [B, T]
    cls = pred_flat.gather(1, anchor).unsqueeze(2)  # [B, T, 1]: the anchor's class n

    # 2./3. the pools of each triplet's class
    pred_row = pred_flat.unsqueeze(1)  # [B, 1, L]
    target_row = target_flat.unsqueeze(1)  # [B, 1, L]
    pos_pool = (target_row == cls) & (pred_row != cls)  # [B, T, L]: HP_n
    neg_pool = (pred_row == cls) & (target_row != cls) & (target_row != IGNORE_INDEX)  # HN_n
    valid = has_anchor & pos_pool.any(dim=2) & neg_pool.any(dim=2)  # [B, T]

    if positive_mode == "spatial":
        log_weight = -_grid_distance(anchor, h, w) / (tau * max(h, w))  # [B, T, L]
        positive = _masked_argmax(log_weight + gumbel_pos, pos_pool)  # [B, T]
        negative = _masked_argmax(gumbel_neg, neg_pool)  # [B, T]
    elif positive_mode == "random":
        positive = _masked_argmax(gumbel_pos, pos_pool)  # [B, T]
        negative = _masked_argmax(gumbel_neg, neg_pool)  # [B, T]
    else:  # "feature"
        assert embedding is not None  # checked in _check_inputs
        channels = embedding.shape[1]
        feats = embedding.detach().float().reshape(b, channels, n_pix)  # [B, C, L]
        feats = feats.transpose(1, 2)  # [B, L, C]
        anchor_feats = feats.gather(1, anchor.unsqueeze(2).expand(-1, -1, channels))  # [B, T, C]
        # exact pairwise distances (no |x|^2 - 2xy + |y|^2 expansion) so near-ties rank correctly;
        # the distance is monotone in the squared distance, so the arg-extrema agree
        dist = torch.cdist(
            anchor_feats, feats, compute_mode="donot_use_mm_for_euclid_dist"
        )  # [B, T, L]
        positive = _masked_argmax(dist, pos_pool)  # [B, T]: farthest hard positive
        negative = _masked_argmax(-dist, neg_pool)  # [B, T]: closest hard negative

    zero = torch.zeros_like(anchor)
    return TripletSample(
        anchor=torch.where(valid, anchor, zero),
        positive=torch.where(valid, positive, zero),
        negative=torch.where(valid, negative, zero),
        valid=valid,
    )


def sample_triplets(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    num_triplets: int = 20,
    positive_mode: str = "spatial",
    tau: float = 0.1,
    generator: torch.Generator | None = None,
    embedding: torch.Tensor | None = None,
    impl: str = "auto",
    *,
    check_labels: bool = True,
) -> TripletSample:
    """Dispatching front of the sampler: same arguments, checks and distribution as
    ``sample_triplets_reference``, plus ``impl``.

    * ``"reference"``: ``sample_triplets_reference``.
    * ``"cuda"``: the fused ``mfnet_ext`` sampler (built on first use): the CUDA kernel for CUDA
      tensors, its bit-identical C++ twin for CPU tensors. Fails loudly, naming the build
      command, when the extension cannot be had, and with ``positive_mode="feature"`` (the
      PML-feature ablation has no fused kernel).
    * ``"auto"``: the fused sampler for CUDA tensors in ``"spatial"`` / ``"random"`` mode when the
      extension loads; the reference otherwise (so on the CPU exactly the reference).

    Random numbers of the fused sampler: one (seed, offset) per call from ``generator`` (None:
    the default generator of the labels' device, i.e. torch's global RNG):
    ``mfnet_ext.triplet_sampling.seed_and_offset`` (a CUDA generator's own Philox (seed, offset),
    advanced by 4, without a device synchronisation; a CPU generator: one int64 draw). A
    generator state therefore fixes the result, on CPU and CUDA alike; it differs from the
    reference's draw for the same state (another random stream, the same distribution).

    Args:
        pred, target, num_classes, num_triplets, positive_mode, tau, generator, embedding: as in
            ``sample_triplets_reference``.
        impl: ``"auto"``, ``"reference"`` or ``"cuda"``.
        check_labels: keyword-only. False skips the checks of the label VALUES in the fused path
            (pred in 0..N, target in 0..N or 255), which read the tensors and so synchronise
            with the GPU; shapes, dtypes, devices and arguments are always checked. The fused
            sampler is memory-safe on any values (labels are compared, never used as addresses);
            for labels made by the training loop (an argmax, a dataset) the checks cannot fail.
            The reference always checks.
    Returns:
        TripletSample with int64 [B, T] indices into h * w and a bool [B, T] validity mask.
    """
    check_impl(impl)
    if impl == "cuda" and positive_mode == "feature":
        raise ValueError(
            'positive_mode="feature" (the PML-feature ablation) has no fused kernel: use '
            'impl="auto", which runs the reference for it, or impl="reference"'
        )
    device = pred.device if isinstance(pred, torch.Tensor) else torch.device("cpu")
    # None for "reference", for feature mode (no fused kernel) and where "auto" falls back
    extension = None if positive_mode == "feature" else extension_for(impl, device)
    if extension is None:
        return sample_triplets_reference(
            pred, target, num_classes, num_triplets, positive_mode, tau, generator, embedding
        )
    _check_inputs(
        pred,
        target,
        num_classes,
        num_triplets,
        positive_mode,
        tau,
        embedding,
        check_values=check_labels,
    )
    fused = import_module("mfnet_ext.triplet_sampling")
    seed, offset = fused.seed_and_offset(generator, pred.device)
    spatial = positive_mode == "spatial"
    anchor, positive, negative, valid = fused.sample_triplets(
        pred,
        target,
        num_classes,
        num_triplets,
        float(tau) if spatial else 0.0,
        spatial,
        seed,
        offset,
    )
    return TripletSample(anchor=anchor, positive=positive, negative=negative, valid=valid)


def _gumbel(
    shape: tuple[int, int, int], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Standard Gumbel noise -log(-log U), float32 of ``shape``."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    # U = 0 would give -inf and make that pixel unselectable; clamping keeps every pixel possible
    u = u.clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def _masked_argmax(scores: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of ``scores`` restricted to ``pool`` (broadcast), int64.

    Rows with an empty pool return an arbitrary index; callers mask them with ``valid``.
    """
    masked = torch.where(pool, scores, torch.full_like(scores, float("-inf")))  # [B, T, L]
    return masked.argmax(dim=-1)


def _grid_distance(anchor: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Euclidean distance on the h x w grid from each anchor [B, T] to every pixel: [B, T, h*w]."""
    pix = torch.arange(h * w, device=anchor.device)  # [L]
    py = (pix // w).to(torch.float32)  # [L]
    px = (pix % w).to(torch.float32)  # [L]
    ay = (anchor // w).to(torch.float32).unsqueeze(2)  # [B, T, 1]
    ax = (anchor % w).to(torch.float32).unsqueeze(2)  # [B, T, 1]
    return torch.sqrt((ay - py) ** 2 + (ax - px) ** 2)  # [B, T, L]


def _check_inputs(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    num_triplets: int,
    positive_mode: str,
    tau: float,
    embedding: torch.Tensor | None,
    check_values: bool = True,
) -> None:
    """Raise ValueError on bad arguments. ``check_values=False`` skips the two checks that read
    the label values (a device synchronisation on CUDA); everything else is checked on the host.
    """
    if positive_mode not in POSITIVE_MODES:
        raise ValueError(f"positive_mode must be one of {POSITIVE_MODES}, got {positive_mode!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if isinstance(num_triplets, bool) or not isinstance(num_triplets, int) or num_triplets < 1:
        raise ValueError(f"num_triplets must be an int >= 1, got {num_triplets!r}")
    if positive_mode == "spatial" and not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an int64 tensor, got {got}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [B, h, w], got shape {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    if pred.device != target.device:
        raise ValueError(f"pred and target devices differ: {pred.device} vs {target.device}")
    if pred.numel() == 0:
        raise ValueError(f"pred/target must not be empty, got shape {tuple(pred.shape)}")
    if check_values and (int(pred.min()) < 0 or int(pred.max()) > num_classes):
        raise ValueError(f"pred values must lie in 0..{num_classes}")
    if check_values:
        bad_target = (target != IGNORE_INDEX) & ((target < 0) | (target > num_classes))
        if bool(bad_target.any()):
            raise ValueError(f"target values must lie in 0..{num_classes} or be {IGNORE_INDEX}")
    if positive_mode == "feature" and embedding is None:
        raise ValueError('positive_mode="feature" needs the embedding [B, C, h, w]')
    if embedding is not None:
        if not isinstance(embedding, torch.Tensor) or not embedding.dtype.is_floating_point:
            raise ValueError("embedding must be a floating-point tensor [B, C, h, w]")
        b, h, w = pred.shape
        if embedding.dim() != 4 or (embedding.shape[0], *embedding.shape[2:]) != (b, h, w):
            raise ValueError(
                f"embedding must be [B, C, h, w] = [{b}, C, {h}, {w}], got {tuple(embedding.shape)}"
            )
        if embedding.device != pred.device:
            raise ValueError(f"embedding is on {embedding.device}, labels on {pred.device}")
