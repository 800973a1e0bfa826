"""Training-free yardstick: nearest prototype by cosine similarity (PANet without alignment).

Uses the same middle-level features as a given MFNet (its backbone and neck) and nothing it
learned after them: foreground prototypes by masked average pooling of each class's shots, one
background prototype pooled over the support backgrounds of all classes and shots, and each
query pixel labelled by the prototype of highest cosine similarity. If MFNet does not beat this
clearly, its attention, decoder and metric learning add nothing over prototype matching.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.masked_pooling import masked_global_pool


class PrototypeBaseline(nn.Module):
    """``forward(support_images, support_masks, query) -> logits [B, N+1, H, W]``.

    Args:
        extract_features: images [M, 3, H, W] in [0, 1] -> features [M, C, h, w]
            (e.g. ``MFNet.extract_features``; run in eval mode).
        scale: cosine similarities are multiplied by this temperature (PANet uses 20); it does
            not change the argmax, only the softness of the returned logits.
    """

    def __init__(
        self, extract_features: Callable[[torch.Tensor], torch.Tensor], scale: float = 20.0
    ) -> None:
        super().__init__()
        self.extract_features = extract_features
        self.scale = scale

    @torch.no_grad()
    def forward(
        self, support_images: torch.Tensor, support_masks: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        """support_images [B, N, K, 3, H, W], support_masks [B, N, K, H, W] (1 / 0 / 255 ignore),
        query [B, 3, H, W] -> logits [B, N+1, H, W] (channel 0 = background)."""
        B, N, K, _, H, W = support_images.shape
        features = self.extract_features(support_images.reshape(B * N * K, 3, H, W))
        masks = support_masks.reshape(B * N * K, H, W)  # [BNK, H, W]
        foreground = masked_global_pool(features, masks == 1)  # [BNK, C]
        background = masked_global_pool(features, masks == 0)  # [BNK, C]
        class_prototypes = foreground.view(B, N, K, -1).mean(dim=2)  # [B, N, C]
        background_prototype = background.view(B, N * K, -1).mean(dim=1, keepdim=True)  # [B,1,C]
        prototypes = torch.cat([background_prototype, class_prototypes], dim=1)  # [B, N+1, C]

        query_features = self.extract_features(query)  # [B, C, h, w]
        similarity = F.cosine_similarity(
            query_features.unsqueeze(1), prototypes[..., None, None], dim=2
        )  # [B, N+1, h, w]
        return F.interpolate(
            similarity * self.scale, size=(H, W), mode="bilinear", align_corners=True
        )
