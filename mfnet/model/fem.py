"""A_M-v1 (paper Table VII): PFENet's feature enrichment module (FEM [22]) in the place of A_M.

Instead of attention weights over the scales, the Z scale features are refined with information
passed from the previous (finer) scale and hierarchically concatenated before decoding.
Differences to PFENet (docs/paper_tables.md, "A_M-v1 (FEM) as built"): no prior mask channel
(MFNet has none), no per-scale auxiliary classifiers (the training loss is MFNet's), and the
concatenation is reduced by one 1x1 conv (MFNet's decoder follows with its own residual block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import conv_relu


class FeatureEnrichment(nn.Module):
    """forward(scales: Z tensors [M, C_in, h_z, w_z] (finest first), size (h, w)) -> S [M, C, h, w].

    Per scale z: m_z = merge_z(X^z) (1x1 conv); for z > 0, m_z += inter_z([m_z, resize(m_{z-1})])
    (1x1 conv on the concatenation); m_z += refine_z(m_z) (two 3x3 convs); then S =
    combine([U(m_1), ..., U(m_Z)]) (1x1 conv over the concatenated upsampled scales).
    Shared across the N classes, separate per scale.
    """

    def __init__(self, in_channels: int, channels: int, num_scales: int) -> None:
        super().__init__()
        self.num_scales = num_scales
        self.merge = nn.ModuleList(conv_relu(in_channels, channels, 1) for _ in range(num_scales))
        self.inter_scale = nn.ModuleList(
            conv_relu(2 * channels, channels, 1) for _ in range(num_scales - 1)
        )
        self.refine = nn.ModuleList(
            nn.Sequential(conv_relu(channels, channels, 3), conv_relu(channels, channels, 3))
            for _ in range(num_scales)
        )
        self.combine = conv_relu(num_scales * channels, channels, 1)

    def forward(self, scales: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        if len(scales) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} scales, got {len(scales)}")
        previous: torch.Tensor | None = None
        upsampled = []
        for z, x in enumerate(scales):
            merged = self.merge[z](x)  # [M, C, h_z, w_z]
            if previous is not None:
                passed = _resize(previous, tuple(merged.shape[-2:]))
                merged = merged + self.inter_scale[z - 1](torch.cat([merged, passed], dim=1))
            merged = merged + self.refine[z](merged)
            previous = merged
            upsampled.append(_resize(merged, size))  # [M, C, h, w]
        return self.combine(torch.cat(upsampled, dim=1))  # [M, C, h, w]


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
