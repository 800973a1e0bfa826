"""Any number of classes on any MFNet: decode in groups of the model's slots, merge per pixel.

The plan (which classes share a decoder call) and the merge rule are the runtime's
(``mfnet_runtime.grouping``), so PyTorch and the exported engines split and merge alike.
"""

from __future__ import annotations

import torch
from torch import nn

from mfnet_runtime.grouping import merge_groups, plan_groups

from .mfnet import MFNet
from .support import EncodedSupport


def fits_slots(model: MFNet, count: int) -> bool:
    """Whether ``count`` classes go through one call of ``decode_query`` unchanged."""
    return 1 <= count <= model.way if model.way_flexible else count == model.way


def grouped_scores(model: MFNet, query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """query [B, 3, H, W] + prototypes [B or 1, n, C] (any n >= 1) -> merged scores
    [B, n+1, H, W] (``mfnet_runtime.grouping.merge_groups``: the labels are their argmax).

    Every group is decoded in one batched call: the query repeated once per group, each copy
    with its group's prototypes (a way-flexible model masks the unused slots).
    """
    model.require_prototype_split("decoding in groups")
    B, count = query.shape[0], prototypes.shape[1]
    groups = plan_groups(count, model.way, fill=not model.way_flexible)
    prototypes = prototypes.expand(B, -1, -1)  # [B, n, C]
    slots = prototypes.new_zeros(len(groups), B, model.way, prototypes.shape[2])  # [G, B, N, C]
    slot_mask = torch.zeros(len(groups), B, model.way, dtype=torch.bool, device=query.device)
    for g, group in enumerate(groups):
        slots[g, :, : len(group)] = prototypes[:, list(group)]
        slot_mask[g, :, : len(group)] = True
    tiled = query.repeat(len(groups), 1, 1, 1)  # [G*B, 3, H, W], group-major
    per_frame = slots.flatten(0, 1)  # [G*B, N, C]
    if model.way_flexible:
        logits = model.decode_slots(tiled, per_frame, slot_mask.flatten(0, 1))
    else:
        cache = EncodedSupport(per_frame[:, :, None, :], per_frame)
        logits = model.decode_query(tiled, cache)  # [G*B, N+1, H, W]
    probabilities = torch.softmax(logits.float(), dim=1)
    by_group = probabilities.view(len(groups), B, *probabilities.shape[1:]).cpu().numpy()
    _, merged = merge_groups(by_group, groups, count)
    return torch.from_numpy(merged).to(query.device)


class GroupedMultiWay(nn.Module):
    """``forward(support_images, support_masks, query) -> scores [B, n+1, H, W]`` for episodes
    of any n classes (a predictor of the evaluation protocol): decoded directly when n fits
    the model's slots, in groups otherwise (``grouped_scores``)."""

    def __init__(self, model: MFNet) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, support_images: torch.Tensor, support_masks: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        """support_images [B, n, K, 3, H, W], support_masks [B, n, K, H, W], query [B, 3, H, W]."""
        cache = self.model.encode_support(support_images, support_masks)
        if fits_slots(self.model, cache.way):
            return self.model.decode_query(query, cache)
        return grouped_scores(self.model, query, cache.prototypes)
