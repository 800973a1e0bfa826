"""Inference-only fast query path: the same function as ``MFNet.decode_query``, less work.

Two exact rewrites, both linear algebra on the eval-mode model (training never uses this file;
``decode_query`` is untouched and stays the reference):

1. **Static adaptive pooling.** ``F.adaptive_avg_pool2d`` to a size that does not divide the
   input (60 -> 8) is lowered by the dynamo ONNX exporter to Transpose + GatherND + ReduceMean.
   Adaptive average pooling is linear and separable: ``pooled = P_h @ X @ P_w^T`` with constant
   averaging matrices P_h [h_z, h], P_w [w_z, w] built with PyTorch's bin rule
   (start = floor(i * in / out), end = ceil((i + 1) * in / out)). It exports as two MatMuls.
   Sizes that divide the input (60 -> 30, 15) keep ``adaptive_avg_pool2d``, which the exporter
   already lowers to one exact AveragePool.

2. **Prototype folding.** The first layer of both branches of every A_M scale branch (3x3 conv of
   the upper branch, 1x1 conv of the lower) is linear before its ReLU and is applied to
   X_n^z = Phi^z(Q) + expand(F_n) ("add" fusion) or concat(Phi^z(Q), expand(F_n)) ("concat").
   So ``conv(X_n^z) = conv_q(Phi^z(Q)) + conv_p(expand(F_n)) + bias``: the query term is computed
   once per frame instead of N times, and the prototype term depends only on F_n and the scale
   size. With zero padding, a k x k conv (padding k // 2) of a constant map takes at most
   (2p+1)^2 distinct values (p = k // 2: interior, edges, corners); they come from the conv of a
   (2p+1) x (2p+1) constant map and are expanded by the row/column index [0..p-1, p, ..., p,
   p+1..2p] (maps smaller than 2p+1 are convolved at their own size). Everything after the
   first conv (its ReLU, the following convs, the residual block, the upsampling and the softmax
   over scales, the decoder) is the model's own modules and code, called as they are.

Use: ``FastQueryDecoder(model)(query, prototypes)``; with a cached support set in torch, call
``prepare(prototypes)`` once and pass its ``FoldedPrototypes`` per frame (the ONNX query graph
computes the prototype terms from its [N, C] input instead: a few tiny ops, same contract). The
forward holds no host-to-device copy at the configured input size (constants are buffers), so
it can be captured in a CUDA graph. Only the tail of ``decode_query`` (class fusion, decoder call,
final upsampling; ten lines) is restated here; the tests compare every path with it.

Configurations whose first layers do not have this form (stride, dilation, groups, non-zero
padding mode, a padding other than k // 2) or whose A_M is not the scale attention (A_M-v1,
PFENet's FEM) are not folded: ``FastQueryDecoder.fold_reason`` says why (and is logged) and the
decoder falls back to the model's eager fusion (``_fuse_query_class`` and ``scale_attention``),
still with static pooling when asked. A_M-v2 (ASPP) folds (its one scale is the lower branch;
the ASPP is in the decoder, which runs as it is); +SA runs on the pooled query scales before
either form. A_S-v1/v2 mix the query into every shot: no prototype-only decoder exists for them
and the constructor raises ``QueryDependentSupportError``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .mfnet import MFNet
from .scale_attention import ScaleAttention, ScaleBranch

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ exact static adaptive pooling
def adaptive_pool_matrix(
    in_size: int,
    out_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Averaging matrix P [out_size, in_size] of 1-D adaptive average pooling.

    Row i averages inputs floor(i * in / out) .. ceil((i + 1) * in / out) - 1, PyTorch's bin
    rule (``aten/src/ATen/native/AdaptiveAveragePooling.cpp``: start_index / end_index), so
    ``P @ x`` equals ``F.adaptive_avg_pool1d(x, out_size)`` up to float rounding.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"pooling sizes must be positive, got {in_size} -> {out_size}")
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil((i + 1) * in / out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.to(dtype=dtype, device=device)


def static_adaptive_avg_pool2d(
    x: torch.Tensor,
    output_size: int | tuple[int, int],
    pool_h: torch.Tensor | None = None,
    pool_w_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` as two matrix products: x [..., h, w] -> [..., h_z, w_z].

    pooled = P_h @ (x @ P_w^T). ``pool_h`` = P_h [h_z, h] and ``pool_w_t`` = P_w^T [w, w_z] may
    be given (cached buffers; the transpose is stored so that the graph holds no Transpose);
    otherwise they are built here (eager use only: building them inside a captured CUDA graph
    would copy from the host).
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    h, w = x.shape[-2:]
    if pool_h is None:
        pool_h = adaptive_pool_matrix(h, out_h, x.dtype, x.device)
    if pool_w_t is None:
        pool_w_t = adaptive_pool_matrix(w, out_w, x.dtype, x.device).transpose(0, 1)
    return torch.matmul(pool_h, torch.matmul(x, pool_w_t))  # [..., h_z, w_z]


# --------------------------------------------------------------------------- prototype folding
def border_index(size: int, pad: int) -> torch.Tensor:
    """int64 [size]: the row (or column) of a (2p+1)-sided constant-map conv output that row i
    of a ``size``-sided one equals: [0..p-1, p (size - 2p times), p+1..2p] (size > 2p + 1)."""
    if size <= 2 * pad + 1:
        return torch.arange(size)
    return torch.tensor(
        list(range(pad)) + [pad] * (size - 2 * pad) + list(range(pad + 1, 2 * pad + 1))
    )


def constant_map_conv(
    vectors: torch.Tensor,
    weight: torch.Tensor,
    size: tuple[int, int],
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero-padded, bias-free conv of constant maps, without convolving them at full size.

    vectors [M, C_in] (map m is vectors[m] at every pixel), weight [C_out, C_in, k, k] (k odd,
    stride 1, padding k // 2) -> [M, C_out, h, w] for size = (h, w); for k = 1: [M, C_out, 1, 1]
    (constant, left to broadcasting). The conv runs on a min(h, 2p+1) x min(w, 2p+1) map and is
    expanded with ``border_index`` (``rows``/``cols``: those indices, cached; built if None).
    """
    k = weight.shape[-1]
    pad = k // 2
    if pad == 0:
        # a conv of 1 x 1 maps (not F.linear: no weight reshape left unfolded in the graph)
        return F.conv2d(vectors[:, :, None, None], weight)  # [M, C_out, 1, 1]
    h, w = size
    small = (min(h, 2 * pad + 1), min(w, 2 * pad + 1))
    maps = vectors[:, :, None, None].expand(*vectors.shape, *small)  # [M, C_in, a, b]
    distinct = F.conv2d(maps, weight, None, padding=pad)  # [M, C_out, a, b]
    if h > small[0]:
        rows = border_index(h, pad).to(vectors.device) if rows is None else rows
        distinct = distinct.index_select(2, rows)  # [M, C_out, h, b]
    if w > small[1]:
        cols = border_index(w, pad).to(vectors.device) if cols is None else cols
        distinct = distinct.index_select(3, cols)  # [M, C_out, h, w]
    return distinct


def _foldable_conv(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot be split into query and prototype terms, or None when it can."""
    if type(conv) is not nn.Conv2d:
        return f"first layer is {type(conv).__name__}, not nn.Conv2d"
    k = conv.kernel_size
    if k[0] != k[1] or k[0] % 2 == 0:
        return f"kernel {k} is not square and odd"
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        return f"stride {conv.stride}, dilation {conv.dilation}, groups {conv.groups}"
    if conv.padding_mode != "zeros" or conv.padding != (k[0] // 2, k[1] // 2):
        return f"padding {conv.padding} ({conv.padding_mode}) is not zero 'same' padding"
    return None


def _split_first(sequence: nn.Module) -> tuple[nn.Conv2d, nn.Sequential] | str:
    """Sequential(Sequential(conv, ReLU, ...), rest...) -> (conv, Sequential(ReLU, ..., rest...)).

    The returned remainder holds the model's own modules (shared, not copied). A string says why
    the branch has another structure.
    """
    if not isinstance(sequence, nn.Sequential) or not isinstance(sequence[0], nn.Sequential):
        return f"branch {type(sequence).__name__} does not start with conv_relu"
    first = sequence[0]
    conv = first[0]
    problem = _foldable_conv(conv)
    if problem is not None:
        return problem
    # _foldable_conv accepted it: exactly an nn.Conv2d
    return cast(nn.Conv2d, conv), nn.Sequential(*list(first)[1:], *list(sequence)[1:])


class _FoldedScaleBranch(nn.Module):
    """A ``ScaleBranch`` minus its first convs: (upper pre-activation or None, lower
    pre-activation), each [M, C, h_z, w_z] -> (attention logits [M, 1, h_z, w_z] or None,
    feature [M, C, h_z, w_z]), through the branch's own remaining modules."""

    def __init__(self, branch: ScaleBranch) -> None:
        super().__init__()
        self.attention_first: nn.Conv2d | None = None
        self.attention_rest: nn.Sequential | None = None
        if branch.attention is not None:
            split = _split_first(branch.attention)
            if isinstance(split, str):
                raise _NotFoldable(f"upper branch: {split}")
            self.attention_first, self.attention_rest = split
        split = _split_first(branch.transform)
        if isinstance(split, str):
            raise _NotFoldable(f"lower branch: {split}")
        self.transform_first, self.transform_rest = split

    def forward(
        self, pre: tuple[torch.Tensor | None, torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        attention_pre, transform_pre = pre
        logits = self.attention_rest(attention_pre) if self.attention_rest is not None else None
        return logits, self.transform_rest(transform_pre)


class _FoldedScaleAttention(nn.Module):
    """``ScaleAttention`` whose branches take folded pre-activations.

    ``forward`` *is* ``ScaleAttention.forward`` (the upsampling, the softmax over scales and the
    weighted sum are the model's code, not a copy); only the branch modules differ.
    """

    forward = ScaleAttention.forward

    def __init__(self, scale_attention: ScaleAttention) -> None:
        super().__init__()
        # nn.ModuleList types its items as nn.Module: these are ScaleAttention's ScaleBranches
        self.branches = nn.ModuleList(
            _FoldedScaleBranch(cast(ScaleBranch, b)) for b in scale_attention.branches
        )
        self.num_scales = scale_attention.num_scales

    def branch(self, z: int) -> _FoldedScaleBranch:
        """The folded branch of scale ``z`` (as ``ScaleAttention.forward`` picks it)."""
        # nn.ModuleList types its items as nn.Module: each is a _FoldedScaleBranch
        return cast(_FoldedScaleBranch, self.branches[z % len(self.branches)])


class _NotFoldable(Exception):
    pass


@dataclass(frozen=True)
class FoldedPrototypes:
    """Per-scale prototype terms of the first A_M convs, for one feature size.

    terms[z] = (upper term [Bp, N, C, h_z, w_z] or None, lower term [Bp, N, C, 1, 1]); the
    biases are not included (they go with the query term). ``feature_size`` = (h, w).
    """

    terms: tuple[tuple[torch.Tensor | None, torch.Tensor], ...]
    feature_size: tuple[int, int]
    # a way-flexible model's (ClassSlots.fill): slot_mask [Bp, N], the channels to keep
    slot_mask: torch.Tensor | None = None
    keep: int | None = None

    @property
    def way(self) -> int:
        return self.terms[0][1].shape[1]

    @property
    def batch(self) -> int:
        return self.terms[0][1].shape[0]


class FastQueryDecoder(nn.Module):
    """``decode_query`` for inference: static pooling and prototype folding (module docstring).

    ``forward(query [B, 3, H, W] float RGB in [0, 1], prototypes [B or 1, N, C] (or [N, C], or
    the ``prepare``d ``FoldedPrototypes``)) -> logits [B, N+1, H, W]``, equal to
    ``model.decode_query(query, cache)`` up to float rounding. Eval mode only (dropout off): it
    refuses to run while the model trains.

    Args:
        model: a built MFNet; its modules are used, never copied (later weight changes apply).
        static_pooling: pool with constant averaging matrices where the bin count does not
            divide the feature size (elsewhere adaptive_avg_pool2d is already an AveragePool).
        fold_prototypes: split the first A_M convs into query and prototype terms; ignored (see
            ``fold_reason``) when the model's branches do not have the foldable form.
    """

    def __init__(
        self, model: MFNet, static_pooling: bool = True, fold_prototypes: bool = True
    ) -> None:
        super().__init__()
        model.require_prototype_split("the fast query decoder")  # A_S-v1/v2 cannot run here
        self.model = model
        self.static_pooling = static_pooling
        self.fold_reason: str | None = None if fold_prototypes else "disabled"
        self.folded_attention: _FoldedScaleAttention | None = None
        if fold_prototypes:
            try:
                if not isinstance(model.scale_attention, ScaleAttention):
                    raise _NotFoldable(
                        f"A_M is {type(model.scale_attention).__name__} "
                        f"(multiscale_module={model.config.multiscale_module!r}), not the "
                        "scale attention whose first convs fold"
                    )
                self.folded_attention = _FoldedScaleAttention(model.scale_attention)
            except _NotFoldable as problem:
                self.fold_reason = str(problem)
                log.info("prototype folding off, the model's eager fusion runs: %s", problem)
        # Constants of the configured input size as buffers (they follow .to() and keep the
        # forward free of host-to-device copies, so it can be captured in a CUDA graph): the
        # pooling matrices P_h [bins, h], P_w^T [w, bins] and the border indices. Other input
        # sizes build theirs on the fly (eager use).
        self._constants: dict[str, str] = {}
        h, w = model.feature_side(model.config.image_size, model.config.image_size)
        for bins, h_z, w_z in self._scale_sizes(h, w):
            if self._pools_by_matrix(h, w, bins):
                self._register_constant(f"rows_{h}_{bins}", self._pool_matrix(h, bins, False))
                self._register_constant(f"cols_{w}_{bins}", self._pool_matrix(w, bins, True))
            for pad in self._fold_pads():
                for side in (h_z, w_z):
                    self._register_constant(f"border_{side}_{pad}", border_index(side, pad))

    def _register_constant(self, key: str, value: torch.Tensor) -> None:
        if key not in self._constants:
            name = f"const_{key}"
            if value.is_floating_point():
                value = value.to(next(self.model.parameters()).dtype)
            self.register_buffer(name, value, persistent=False)
            self._constants[key] = name

    def _constant(
        self, key: str, build: Callable[[], torch.Tensor], like: torch.Tensor
    ) -> torch.Tensor:
        """The cached buffer ``key`` (floats cast to ``like``'s dtype), else ``build()`` moved to
        ``like``'s device."""
        name = self._constants.get(key)
        value = getattr(self, name) if name is not None else build().to(like.device)
        return value.to(like.dtype) if value.is_floating_point() else value

    @staticmethod
    def _pool_matrix(size: int, bins: int, transposed: bool) -> torch.Tensor:
        matrix = adaptive_pool_matrix(size, bins)
        return matrix.T.contiguous() if transposed else matrix

    def _pools_by_matrix(self, h: int, w: int, bins: int) -> bool:
        """Static matrices where adaptive pooling is not a plain AveragePool (bins does not
        divide the side); decode_query's op where it is (the exporter lowers it to AveragePool,
        already static and exact), and for the full-size scale (no pooling)."""
        return self.static_pooling and bins < max(h, w) and bool(h % bins or w % bins)

    def _fold_pads(self) -> set[int]:
        """Paddings (k // 2) of the folded first convs that need border indices (k > 1)."""
        attention = self.folded_attention
        if attention is None:
            return set()
        branches = [attention.branch(z) for z in range(len(attention.branches))]
        convs = [
            c for b in branches for c in (b.attention_first, b.transform_first) if c is not None
        ]
        return {c.kernel_size[0] // 2 for c in convs} - {0}

    @property
    def folded(self) -> bool:
        """Whether the prototype-folded form runs (False: the model's eager fusion)."""
        return self.folded_attention is not None

    @property
    def form(self) -> str:
        """A short description of what runs, for manifests and benchmark tables."""
        parts = ["static_pooling"] if self.static_pooling else []
        if self.folded:
            parts.append("prototype_folding")
        return "+".join(parts) or "eager"

    # ---------------------------------------------------------------------------- pieces
    def _pool(self, features: torch.Tensor, bins: int) -> torch.Tensor:
        """features [B, C, h, w] -> [B, C, bins, bins], as decode_query's adaptive pooling."""
        h, w = features.shape[-2:]
        if not self._pools_by_matrix(h, w, bins):
            return F.adaptive_avg_pool2d(features, bins)
        pool_h = self._constant(
            f"rows_{h}_{bins}", lambda: self._pool_matrix(h, bins, False), features
        )
        pool_w_t = self._constant(
            f"cols_{w}_{bins}", lambda: self._pool_matrix(w, bins, True), features
        )
        return static_adaptive_avg_pool2d(features, bins, pool_h, pool_w_t)

    def _scale_sizes(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """(bins, h_z, w_z) per scale, as decode_query pools them."""
        sizes = []
        for bins in self.model.pyramid_bins(max(h, w)):
            sizes.append((bins, h, w) if bins >= max(h, w) else (bins, bins, bins))
        return sizes

    def _split_weight(self, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
        """(query weight, prototype weight) of a first conv: the same for "add", halves of the
        input channels for "concat" (query first, as ``_fuse_query_class`` concatenates)."""
        weight = conv.weight
        if self.model.config.query_fusion == "add":
            return weight, weight
        channels = weight.shape[1] // 2
        return weight[:, :channels], weight[:, channels:]

    def _check_prototypes(self, prototypes: torch.Tensor) -> torch.Tensor:
        if prototypes.dim() == 2:
            prototypes = prototypes.unsqueeze(0)
        if prototypes.dim() != 3:
            raise ValueError(
                f"prototypes must be [B, N, C] or [N, C], got {tuple(prototypes.shape)}"
            )
        return prototypes

    def prepare(
        self,
        prototypes: torch.Tensor,
        feature_size: tuple[int, int] | None = None,
        slot_mask: torch.Tensor | None = None,
    ) -> FoldedPrototypes:
        """Prototype terms of the first A_M convs (no bias), for a cached support set.

        prototypes [Bp, N, C] or [N, C] (a way-flexible model: [Bp, n, C], or [Bp, N, C] with
        ``slot_mask`` [Bp, N]); feature_size (h, w) of the query features (default: those of
        the configured input size). Cost: one conv over N tiny constant maps per scale.
        """
        attention = self.folded_attention
        if attention is None:  # not self.folded
            raise RuntimeError(f"prototype folding is off ({self.fold_reason})")
        prototypes, slot_mask, keep = self.model.fill_slots(
            self._check_prototypes(prototypes), slot_mask
        )
        if feature_size is None:
            size = self.model.config.image_size
            feature_size = self.model.feature_side(size, size)
        batch, way, channels = prototypes.shape
        flat = prototypes.reshape(batch * way, channels)
        terms = []
        for z, (_, h_z, w_z) in enumerate(self._scale_sizes(*feature_size)):
            branch = attention.branch(z)
            upper = None
            if branch.attention_first is not None:
                upper = self._prototype_term(branch.attention_first, flat, (h_z, w_z))
                upper = upper.view(batch, way, *upper.shape[1:])  # [Bp, N, C, h_z, w_z]
            lower = self._prototype_term(branch.transform_first, flat, (h_z, w_z))
            terms.append((upper, lower.view(batch, way, *lower.shape[1:])))  # [Bp, N, C, 1, 1]
        h, w = feature_size
        return FoldedPrototypes(tuple(terms), (h, w), slot_mask, keep)

    def _prototype_term(
        self, conv: nn.Conv2d, vectors: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """conv_p(expand(vectors)) without bias: [M, C_in] -> [M, C, h_z, w_z] (or [M, C, 1, 1])."""
        pad = conv.kernel_size[0] // 2
        # border indices, only where a side exceeds 2p + 1
        index: list[torch.Tensor | None] = [None, None]
        for axis, side in enumerate(size):
            if pad and side > 2 * pad + 1:
                index[axis] = self._constant(
                    f"border_{side}_{pad}", functools.partial(border_index, side, pad), vectors
                )
        return constant_map_conv(vectors, self._split_weight(conv)[1], size, *index)

    @staticmethod
    def _query_term(conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """conv_q(x) + bias: [B, C_in, h, w] -> [B, C, h, w], the conv's own settings."""
        return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    # ---------------------------------------------------------------------------- forward
    def forward(
        self,
        query: torch.Tensor,
        prototypes: torch.Tensor | FoldedPrototypes,
        slot_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B, 3, H, W] in [0, 1], prototypes [B or 1, N, C] / [N, C] / FoldedPrototypes
        -> logits [B, N+1, H, W] (channel 0 = background), as ``decode_query``.

        A way-flexible model takes n <= N classes ([B, n, C] -> logits [B, n+1, H, W]), or
        all N slots with ``slot_mask`` [B or 1, N] (1 = a class; logits [B, N+1, H, W] with
        the empty slots' channels at ``slots.EMPTY_SLOT_LOGIT``, the exported form)."""
        model = self.model
        if model.training:
            raise RuntimeError("FastQueryDecoder is for inference: call model.eval() first")
        if query.dim() != 4 or query.shape[1] != 3:
            raise ValueError(f"query must be [B, 3, H, W], got {tuple(query.shape)}")
        B, _, H, W = query.shape
        N = model.way
        features = model.extract_features(query)  # [B, C, h, w]
        h, w = features.shape[-2:]
        sizes = self._scale_sizes(h, w)

        folded: FoldedPrototypes | None
        if isinstance(prototypes, FoldedPrototypes):
            folded = prototypes
            if not self.folded:
                raise RuntimeError(f"prototype folding is off ({self.fold_reason})")
            if slot_mask is not None:
                raise ValueError("prepared prototypes carry their slot mask: pass none here")
            slot_mask, keep = folded.slot_mask, folded.keep
            if folded.feature_size != (h, w) or folded.way != N:
                raise ValueError(
                    f"prepared prototypes are for features {folded.feature_size} "
                    f"and {folded.way} classes, the query gives {(h, w)} and {N}"
                )
            batch = folded.batch
        else:
            prototypes, slot_mask, keep = model.fill_slots(
                self._check_prototypes(prototypes), slot_mask
            )
            batch = prototypes.shape[0]
            folded = self.prepare(prototypes, (h, w), slot_mask) if self.folded else None
        if batch not in (1, B):
            raise ValueError(f"prototype batch {batch} does not fit query batch {B}")

        pooled_scales = model.align_query(
            [features if bins >= max(h, w) else self._pool(features, bins) for bins, _, _ in sizes]
        )  # [B, C, h_z, w_z]; +SA acts on the query only, before the prototypes enter
        if folded is None:  # the model's eager fusion (folding off or not applicable)
            assert isinstance(prototypes, torch.Tensor)  # folded ones take the other branch
            expanded = prototypes.expand(B, -1, -1)  # [B, N, C]
            scales = [model._fuse_query_class(x, expanded) for x in pooled_scales]
            per_class = model.scale_attention(scales, (h, w))  # [B*N, C, h, w]
        else:
            attention = self.folded_attention
            assert attention is not None  # prototypes are folded only while folding is on
            pre_activations = []  # (upper, lower) per scale
            for z, x in enumerate(pooled_scales):
                branch = attention.branch(z)
                upper_term, lower_term = folded.terms[z]
                upper = None
                if branch.attention_first is not None:
                    assert upper_term is not None  # prepare() made one for each upper conv
                    query_term = self._query_term(
                        branch.attention_first, self._split_weight(branch.attention_first)[0], x
                    )
                    upper = (query_term.unsqueeze(1) + upper_term).flatten(0, 1)  # [B*N, C, hz, wz]
                query_term = self._query_term(
                    branch.transform_first, self._split_weight(branch.transform_first)[0], x
                )
                lower = (query_term.unsqueeze(1) + lower_term).flatten(0, 1)  # [B*N, C, h_z, w_z]
                pre_activations.append((upper, lower))
            per_class = attention(pre_activations, (h, w))  # [B*N, C, h, w]

        if slot_mask is not None:
            slot_mask = slot_mask.expand(B, -1)  # [B, N]
        return model.decode_classes(per_class, B, (H, W), False, slot_mask, keep)  # model's tail
