"""MFNet: multi-way encoding and decoding (paper Sec. III, Fig. 2), composed from its parts.

The model is split where deployment needs it: ``encode_support`` (run once per support set)
returns an immutable ``EncodedSupport``; ``decode_query`` (run per frame) takes a query and a cache.
``forward`` is exactly ``decode_query(query, encode_support(...))``.

Images enter as float RGB in [0, 1], [.., 3, H, W]; normalisation happens inside the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.masked_pooling import mask_area, masked_global_pool
from .backbone import Backbone, feature_size
from .decoder import Decoder
from .fem import FeatureEnrichment
from .scale_attention import ScaleAttention
from .slots import ClassSlots
from .support import EncodedSupport, QueryDependentSupportError, RelationalSupportAttention


@dataclass(frozen=True)
class QueryOutput:
    """Everything ``decode_query(..., return_aux=True)`` computes.

    logits: [B, N+1, H, W] at input resolution; feature_logits: [B, N+1, h, w] before upsampling;
    embedding: [B, C, h, w], the decoder's embedding used by the pixel-wise metric loss
    ([B*N, C, h, w] for the binary-branches baseline, which has no metric loss).
    """

    logits: torch.Tensor
    feature_logits: torch.Tensor
    embedding: torch.Tensor
    branch_logits: torch.Tensor | None = None  # binary-branches baseline: [B, N, 2, H, W]


class MiddleLevelNeck(nn.Module):
    """concat(levels) -> 1x1 conv (no bias) -> ReLU -> Dropout2d.

    [M, sum C_l, h, w] -> [M, C, h, w].
    """

    def __init__(self, in_channels: int, channels: int, dropout: float) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.dropout(torch.relu(self.reduce(torch.cat(levels, dim=1))))


class MFNet(nn.Module):
    mean: torch.Tensor  # buffers [1, 3, 1, 1] (nn.Module types attributes as Tensor | Module)
    std: torch.Tensor

    def __init__(
        self,
        config: ModelConfig,
        backbone: Backbone,
        neck: MiddleLevelNeck,
        support_attention: RelationalSupportAttention | None,
        scale_attention: ScaleAttention | FeatureEnrichment,
        decoder: Decoder,
        pool_impl: str = "auto",
        *,
        shot_fusion: nn.Module | None = None,
        self_alignment: nn.Module | None = None,
        class_slots: ClassSlots | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.neck = neck
        self.support_attention = support_attention
        self.scale_attention = scale_attention
        self.decoder = decoder
        # Ablation variants (build.py): A_S-v1/v2 fuse the query with every shot,
        # forward(scale [B, C, h, w], shots [B, N, K, C]) -> [B*N, 2C, h, w]; +SA maps the list
        # of query scales to the same shapes. None (no parameters) in the paper's MFNet.
        self.shot_fusion = shot_fusion
        self.self_alignment = self_alignment
        # Way-flexible models (config.max_way): the "no class" prototype of empty slots.
        self.class_slots = class_slots
        self.pool_impl = pool_impl
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    @property
    def way(self) -> int:
        """The model's N: its class slots (Nmax for a way-flexible model)."""
        return self.config.slots

    @property
    def way_flexible(self) -> bool:
        """Whether one call may take any 1..``way`` classes (``config.max_way``)."""
        return self.class_slots is not None

    def check_classes(self, count: int) -> None:
        """Refuse a support set of ``count`` classes that this model cannot decode in one call."""
        if self.way_flexible:
            if not 1 <= count <= self.way:
                raise ValueError(
                    f"the support set has {count} classes; this way-flexible model takes "
                    f"1..{self.way} per call (more are decoded in groups: --group-classes)"
                )
        elif count != self.way:
            raise ValueError(
                f"the support set has {count} classes but this model is {self.way}-way; "
                f"give exactly {self.way} classes "
                "(the number of classes is fixed by the checkpoint; --group-classes decodes "
                "other numbers in groups)"
            )

    def fill_slots(
        self, prototypes: torch.Tensor, slot_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """prototypes [B, n, C] -> (prototypes [B, N, C], slot_mask [B, N] or None, channels to
        keep or None); the identity (and a check) for a fixed-N model (``ClassSlots.fill``)."""
        if self.class_slots is None:
            if slot_mask is not None:
                raise ValueError("slot_mask is for way-flexible models (config.max_way)")
            self.check_classes(prototypes.shape[1])
            return prototypes, None, None
        return self.class_slots.fill(prototypes, slot_mask)

    def require_prototype_split(self, use: str) -> None:
        """Raise ``QueryDependentSupportError`` (naming ``use``) when the class features depend
        on the query (A_S-v1/v2), i.e. when prototypes [N, C] alone cannot drive the decoder."""
        if self.shot_fusion is not None:
            raise QueryDependentSupportError(self.config.support_module, use)

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [M, 3, H, W] RGB in [0, 1] -> middle-level features [M, C, H/8, W/8]."""
        normalised = (images - self.mean) / self.std
        if self.backbone.frozen:
            with torch.no_grad():
                levels = self.backbone(normalised)
        else:
            levels = self.backbone(normalised)
        return self.neck(levels)

    # ----------------------------------------------------------------------------- support side
    def encode_shots(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Masked global pooling of every shot, with the input checks of the API boundary.

        Args:
            images: [B, N, K, 3, H, W] (or [N, K, 3, H, W]) float RGB in [0, 1].
            masks: [B, N, K, H, W] (or [N, K, H, W]); 1 = this class, 0 = other, 255 = ignore.
        Returns:
            [B, N, K, C] shot features F_nk.
        Raises:
            ValueError: mismatched shapes, a shot without foreground, or an object that
                vanishes at feature resolution.
        """
        images, masks = _check_support(images, masks)
        B, N, K, _, H, W = images.shape
        foreground = masks.reshape(B * N * K, H, W) == 1  # [BNK, H, W]
        feature_side = self.feature_side(H, W)
        area = mask_area(foreground, feature_side)  # [BNK]
        if bool((area <= 0).any()):
            empty = int(torch.nonzero(area <= 0)[0, 0])
            raise ValueError(
                f"the object of support class {empty // K % N}, shot {empty % K} (episode "
                f"{empty // (N * K)}) vanishes at feature resolution {feature_side}: "
                "use a support image where the object is larger or cropped tighter"
            )
        pooled = self.pool_shots(images.reshape(B * N * K, 3, H, W), foreground)  # [BNK, C]
        return pooled.view(B, N, K, -1)

    def pool_shots(self, images: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
        """The tensor path of ``encode_shots`` without checks (what the export graph runs).

        images [M, 3, H, W] RGB in [0, 1], foreground [M, H, W] (bool or {0, 1}) -> [M, C].
        """
        features = self.extract_features(images)  # [M, C, h, w]
        return masked_global_pool(features, foreground, impl=self.pool_impl)  # [M, C]

    def feature_side(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the feature maps for an H x W input."""
        return (
            feature_size(self.config.backbone, height),
            feature_size(self.config.backbone, width),
        )

    def aggregate_prototypes(self, shot_features: torch.Tensor) -> torch.Tensor:
        """[B, N, K, C] -> prototypes [B, N, C]: A_S modulation (K > 1), then the mean over
        shots."""
        if self.support_attention is not None and shot_features.shape[2] > 1:
            shot_features = self.support_attention(shot_features)
        return shot_features.mean(dim=2)

    def encode_support(self, images: torch.Tensor, masks: torch.Tensor) -> EncodedSupport:
        """Support images + masks -> ``EncodedSupport`` (per-shot features and prototypes).

        Args:
            images: [B, N, K, 3, H, W] (or [N, K, 3, H, W] for one support set), RGB in [0, 1].
            masks: [B, N, K, H, W] (or [N, K, H, W]): 1 = the shot's class, 0 = not, 255 = ignore.
        """
        shot_features = self.encode_shots(images, masks)
        return EncodedSupport(shot_features, self.aggregate_prototypes(shot_features))

    def cache_from_shots(self, shot_features: torch.Tensor) -> EncodedSupport:
        """Rebuild a cache from (edited) per-shot features [B, N, K, C] without the backbone."""
        return EncodedSupport(shot_features, self.aggregate_prototypes(shot_features))

    # ------------------------------------------------------------------------------- query side
    def pyramid_bins(self, feature_size: int) -> list[int]:
        """Pooled sizes of the Z query scales: (60, 30, 15, 8) for 60 x 60 features."""
        if not self.config.multi_scale_query:
            return [feature_size]
        return [max(1, math.ceil(feature_size * f)) for f in self.config.pyramid]

    # return_aux decides the result: logits, or a QueryOutput
    @overload
    def decode_query(
        self, query: torch.Tensor, cache: EncodedSupport, return_aux: Literal[False] = False
    ) -> torch.Tensor: ...
    @overload
    def decode_query(
        self, query: torch.Tensor, cache: EncodedSupport, return_aux: Literal[True]
    ) -> QueryOutput: ...
    @overload
    def decode_query(
        self, query: torch.Tensor, cache: EncodedSupport, return_aux: bool
    ) -> torch.Tensor | QueryOutput: ...
    def decode_query(
        self, query: torch.Tensor, cache: EncodedSupport, return_aux: bool = False
    ) -> torch.Tensor | QueryOutput:
        """Segment query images with cached class prototypes.

        Args:
            query: [B, 3, H, W] float RGB in [0, 1].
            cache: from ``encode_support``; its batch is B (one support set per query) or 1
                (the same support set for every query).
            return_aux: also return the feature-resolution logits and the PML embedding.
        Returns:
            logits [B, N+1, H, W] (channel 0 = background, n = the n-th support class), or a
            ``QueryOutput`` when ``return_aux``.
        """
        if query.dim() != 4 or query.shape[1] != 3:
            raise ValueError(f"query must be [B, 3, H, W], got {tuple(query.shape)}")
        self.check_classes(cache.way)
        B = query.shape[0]
        if cache.batch not in (1, B):
            raise ValueError(f"support cache batch {cache.batch} does not fit query batch {B}")
        # [B, N, C]; a way-flexible model's n classes fill the first n of its N slots
        prototypes, slot_mask, keep = self.fill_slots(cache.prototypes.expand(B, -1, -1))
        return self._decode(
            query, EncodedSupport(cache.shot_features, prototypes), return_aux, slot_mask, keep
        )

    def _decode(
        self,
        query: torch.Tensor,
        cache: EncodedSupport,
        return_aux: bool,
        slot_mask: torch.Tensor | None,
        keep: int | None,
    ) -> torch.Tensor | QueryOutput:
        """decode_query after the checks: ``cache.prototypes`` [B, N, C] fill every slot."""
        B, _, H, W = query.shape
        prototypes = cache.prototypes
        features = self.extract_features(query)  # [B, C, h, w]
        h, w = features.shape[-2:]
        pooled = [
            features if bins >= max(h, w) else F.adaptive_avg_pool2d(features, bins)
            for bins in self.pyramid_bins(max(h, w))
        ]  # [B, C, h_z, w_z] per scale
        if self.shot_fusion is not None:  # A_S-v1/v2: every shot meets the query
            shots = cache.shot_features.expand(B, -1, -1, -1)  # [B, N, K, C]
            scales = [self.shot_fusion(x, shots) for x in self.align_query(pooled)]
        else:
            scales = [self._fuse_query_class(x, prototypes) for x in self.align_query(pooled)]
        per_class = self.scale_attention(scales, (h, w))  # [B*N, C, h, w]
        return self.decode_classes(per_class, B, (H, W), return_aux, slot_mask, keep)

    def decode_slots(
        self, query: torch.Tensor, prototypes: torch.Tensor, slot_mask: torch.Tensor
    ) -> torch.Tensor:
        """A way-flexible model's decoder with every slot given, as the exported graph runs it.

        query [B, 3, H, W], prototypes [B, N, C], slot_mask [B, N] (1 = a class, 0 = empty) ->
        logits [B, N+1, H, W], the empty slots' channels at ``slots.EMPTY_SLOT_LOGIT``.
        """
        if self.class_slots is None:
            raise ValueError("decode_slots is for way-flexible models (config.max_way)")
        prototypes, slot_mask, _ = self.class_slots.fill(prototypes, slot_mask)
        cache = EncodedSupport(prototypes[:, :, None, :], prototypes)
        logits = self._decode(query, cache, False, slot_mask, None)
        assert isinstance(logits, torch.Tensor)  # return_aux=False
        return logits

    @overload
    def decode_classes(
        self,
        per_class: torch.Tensor,
        batch: int,
        size: tuple[int, int],
        return_aux: Literal[False] = False,
        slot_mask: torch.Tensor | None = None,
        keep: int | None = None,
    ) -> torch.Tensor: ...
    @overload
    def decode_classes(
        self,
        per_class: torch.Tensor,
        batch: int,
        size: tuple[int, int],
        return_aux: Literal[True],
        slot_mask: torch.Tensor | None = None,
        keep: int | None = None,
    ) -> QueryOutput: ...
    @overload
    def decode_classes(
        self,
        per_class: torch.Tensor,
        batch: int,
        size: tuple[int, int],
        return_aux: bool,
        slot_mask: torch.Tensor | None = None,
        keep: int | None = None,
    ) -> torch.Tensor | QueryOutput: ...
    def decode_classes(
        self,
        per_class: torch.Tensor,
        batch: int,
        size: tuple[int, int],
        return_aux: bool = False,
        slot_mask: torch.Tensor | None = None,
        keep: int | None = None,
    ) -> torch.Tensor | QueryOutput:
        """The tail of ``decode_query``: class fusion, decoder, upsampling to ``size``.

        per_class [B*N, C, h, w] (the S_n of every class) -> logits [B, N+1, H, W] (or a
        ``QueryOutput`` when ``return_aux``). Shared with ``inference.FastQueryDecoder``.
        A way-flexible model's ``slot_mask`` [B, N] masks the logits of empty slots, and
        ``keep`` (n + 1) drops them from the output ([B, n+1, ...]).
        """
        if self.config.class_fusion == "binary":
            return self._decode_binary_branches(per_class, batch, size, return_aux)
        h, w = per_class.shape[-2:]
        per_class = per_class.view(batch, self.way, -1, h, w)  # [B, N, C, h, w]
        if self.config.class_fusion == "concat":
            embedding_in = per_class.flatten(1, 2)  # [B, N*C, h, w]
        else:
            embedding_in = per_class.sum(dim=1)  # [B, C, h, w]
        feature_logits, embedding = self.decoder(embedding_in)  # [B, N+1, h, w], [B, C, h, w]
        if slot_mask is not None:
            feature_logits = ClassSlots.mask_logits(feature_logits, slot_mask)[:, :keep]
        logits = F.interpolate(feature_logits, size=size, mode="bilinear", align_corners=True)
        if return_aux:
            return QueryOutput(logits, feature_logits, embedding)
        return logits

    def _decode_binary_branches(
        self, per_class: torch.Tensor, batch: int, size: tuple[int, int], return_aux: bool
    ) -> torch.Tensor | QueryOutput:
        """N binary branches (Table IV baseline): per class background / foreground, then per
        pixel the label of highest probability over all branches (any background included).

        per_class [B*N, C, h, w] -> log-scores [B, N+1, H, W]: channel 0 = log of the largest
        background probability, channel n = log of class n's foreground probability.
        """
        branch, embedding = self.decoder(per_class)  # [B*N, 2, h, w]
        branch = branch.view(batch, self.way, 2, *branch.shape[-2:])  # [B, N, 2, h, w]
        log_probs = torch.log_softmax(branch, dim=2)
        scores = torch.cat(
            [log_probs[:, :, 0].amax(dim=1, keepdim=True), log_probs[:, :, 1]], dim=1
        )  # [B, N+1, h, w]
        logits = F.interpolate(scores, size=size, mode="bilinear", align_corners=True)
        if not return_aux:
            return logits
        upsampled = F.interpolate(
            branch.flatten(0, 1), size=size, mode="bilinear", align_corners=True
        )  # [B*N, 2, H, W]
        return QueryOutput(
            logits, scores, embedding, branch_logits=upsampled.view(batch, self.way, 2, *size)
        )

    def align_query(self, scales: list[torch.Tensor]) -> list[torch.Tensor]:
        """+SA on the pooled query scales (each [B, C, h_z, w_z]); unchanged without it."""
        return scales if self.self_alignment is None else self.self_alignment(scales)

    def _fuse_query_class(self, scale: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """scale [B, C, h_z, w_z] + prototypes [B, N, C] -> X_n^z [B*N, C or 2C, h_z, w_z]."""
        B, C, h, w = scale.shape
        N = prototypes.shape[1]
        query = scale.unsqueeze(1).expand(B, N, C, h, w)  # [B, N, C, h, w]
        expanded = prototypes[..., None, None].expand(B, N, C, h, w)  # replicate F_n
        if self.config.query_fusion == "add":
            fused = query + expanded  # [B, N, C, h, w]
        else:
            fused = torch.cat([query, expanded], dim=2)  # [B, N, 2C, h, w]
        return fused.flatten(0, 1)  # [B*N, C', h, w]

    def forward(
        self, support_images: torch.Tensor, support_masks: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        """logits [B, N+1, H, W] = decode_query(query, encode_support(images, masks))."""
        return self.decode_query(query, self.encode_support(support_images, support_masks))


def _check_support(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and batch support inputs: -> images [B, N, K, 3, H, W], masks [B, N, K, H, W]."""
    if images.dim() == 5:
        images = images.unsqueeze(0)
    if masks.dim() == 4:
        masks = masks.unsqueeze(0)
    if images.dim() != 6 or images.shape[3] != 3:
        raise ValueError(
            "support images must be [B, N, K, 3, H, W] or [N, K, 3, H, W], "
            f"got {tuple(images.shape)}"
        )
    if masks.dim() != 5:
        raise ValueError(
            f"support masks must be [B, N, K, H, W] or [N, K, H, W], got {tuple(masks.shape)}"
        )
    if images.shape[:3] != masks.shape[:3] or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(
            f"support images {tuple(images.shape)} and masks {tuple(masks.shape)} do not match: "
            "need one [H, W] mask per [3, H, W] image, same B, N, K, H and W"
        )
    foreground = (masks == 1).flatten(3).any(dim=3)  # [B, N, K]
    if not bool(foreground.all()):
        b, n, k = (int(i) for i in torch.nonzero(~foreground)[0])
        raise ValueError(
            f"support mask of class {n}, shot {k} (episode {b}) has no foreground pixel (value 1): "
            "every support shot needs a non-empty mask of its class"
        )
    return images, masks
