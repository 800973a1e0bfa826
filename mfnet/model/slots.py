"""Class slots of a way-flexible MFNet (an extension; the paper's model fixes N).

A way-flexible model has Nmax slots in its concat class fusion. A support set of n <= Nmax
classes fills the first n slots in order; every other slot takes one learned "no class"
prototype, and the logits of those slots are set to ``EMPTY_SLOT_LOGIT`` so that no softmax,
loss, metric or argmax sees them. docs/decisions.md ("Any number of classes") says why.
"""

from __future__ import annotations

import torch
from torch import nn

# Finite (not -inf): exact zeros after softmax, no NaN in a loss, representable in float16.
EMPTY_SLOT_LOGIT = -1.0e4


class ClassSlots(nn.Module):
    """The "no class" prototype [C] and the slot bookkeeping of a model with ``slots`` slots."""

    def __init__(self, slots: int, channels: int) -> None:
        super().__init__()
        self.slots = slots
        self.empty = nn.Parameter(torch.zeros(channels))

    def fill(
        self, prototypes: torch.Tensor, slot_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Put the support classes into the slots.

        Args:
            prototypes: [B, n, C] with 1 <= n <= slots (slot_mask None: the n classes take the
                first n slots), or [B, slots, C] with ``slot_mask`` [B, slots] (bool or {0, 1}:
                1 = a real class; what the exported decoder receives, one mask per frame).
        Returns:
            prototypes [B, slots, C] (empty slots = the learned prototype), slot_mask bool
            [B, slots], and the channels to keep (n + 1) when the mask was built here, else None.
        """
        batch, count, channels = prototypes.shape
        if slot_mask is None:
            if not 1 <= count <= self.slots:
                raise ValueError(
                    f"the support set has {count} classes; this way-flexible model segments "
                    f"1..{self.slots} per call (decode more in groups: mfnet.model.grouping)"
                )
            padding = prototypes.new_zeros(batch, self.slots - count, channels)
            prototypes = torch.cat([prototypes, padding], dim=1)  # [B, slots, C]
            slot_mask = torch.arange(self.slots, device=prototypes.device) < count
            slot_mask = slot_mask.expand(batch, -1)  # [B, slots]
            keep: int | None = count + 1
        else:
            if count != self.slots or tuple(slot_mask.shape) != (batch, self.slots):
                raise ValueError(
                    f"prototypes {tuple(prototypes.shape)} and slot_mask "
                    f"{tuple(slot_mask.shape)} must be [B, {self.slots}, C] and [B, {self.slots}]"
                )
            slot_mask = slot_mask.bool()
            keep = None
        empty = self.empty.to(prototypes.dtype).expand_as(prototypes)
        return torch.where(slot_mask[..., None], prototypes, empty), slot_mask, keep

    @staticmethod
    def mask_logits(logits: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
        """logits [B, slots+1, h, w]: the channels of empty slots -> ``EMPTY_SLOT_LOGIT``."""
        background = torch.ones_like(slot_mask[:, :1])
        keep = torch.cat([background, slot_mask], dim=1)[..., None, None]  # [B, slots+1, 1, 1]
        return logits.masked_fill(~keep, EMPTY_SLOT_LOGIT)
