"""A_M: attention for the multi-scale combination (paper Sec. III-C, Eq. 4-5, Fig. 3b)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ResidualBlock, conv_relu


class ScaleBranch(nn.Module):
    """One scale: upper branch -> attention map [M, 1, h_z, w_z]; lower -> feature [M, C, h_z, w_z].

    Upper: two 3x3 convs and one 1x1 conv to a single channel. Lower: a 1x1 conv and a two-layer
    residual block. With ``attention=False`` only the lower branch exists (the "w/o A_M" ablation).
    """

    def __init__(self, in_channels: int, channels: int, attention: bool = True) -> None:
        super().__init__()
        self.attention = (
            nn.Sequential(
                conv_relu(in_channels, channels, 3),
                conv_relu(channels, channels, 3),
                nn.Conv2d(channels, 1, 1),
            )
            if attention
            else None
        )
        self.transform = nn.Sequential(conv_relu(in_channels, channels, 1), ResidualBlock(channels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        logits = self.attention(x) if self.attention is not None else None
        return logits, self.transform(x)


class ScaleAttention(nn.Module):
    """Combine Z scale features of each class into one feature S_n at the largest resolution.

    S_n = sum_z U(TX_n^z) * softmax_z(U(AX_n^z)), U = bilinear upsampling (align_corners=True).
    Shared across the N classes; across the Z scales the weights are separate by default
    (``shared=False``) so that each scale can learn its own confidence (the paper is silent).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_scales: int,
        shared: bool = False,
        attention: bool = True,
    ) -> None:
        super().__init__()
        if not attention and num_scales != 1:
            raise ValueError("without scale attention the query has a single scale")
        count = 1 if shared else num_scales
        self.branches = nn.ModuleList(
            ScaleBranch(in_channels, channels, attention) for _ in range(count)
        )
        self.num_scales = num_scales

    def forward(self, scales: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """scales: Z tensors [M, C_in, h_z, w_z] -> S [M, C, h, w] at ``size`` = (h, w)."""
        if len(scales) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} scales, got {len(scales)}")
        attention_maps, features = [], []
        for z, x in enumerate(scales):
            branch = self.branches[z % len(self.branches)]
            logits, feature = branch(x)
            features.append(_upsample(feature, size))  # [M, C, h, w]
            if logits is not None:
                attention_maps.append(_upsample(logits, size))  # [M, 1, h, w]
        if not attention_maps:
            return features[0]
        weights = torch.softmax(torch.cat(attention_maps, dim=1), dim=1)  # [M, Z, h, w]
        stacked = torch.stack(features, dim=1)  # [M, Z, C, h, w]
        return (stacked * weights.unsqueeze(2)).sum(dim=1)  # [M, C, h, w]


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
