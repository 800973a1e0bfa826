"""A_M-v2 (paper Table VII): the multi-scale context taken in the decoder by ASPP (DeepLab [72])
instead of a query pyramid with A_M. The query enters as one scale."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import conv_relu
from .decoder import Decoder


class AtrousSpatialPyramidPooling(nn.Module):
    """[M, C, h, w] -> [M, C, h, w]: a 1x1 conv, one dilated 3x3 conv per rate and image-level
    pooling (global average, 1x1 conv, broadcast), concatenated and reduced by a 1x1 conv; every
    conv followed by ReLU (the model has no batch norm)."""

    def __init__(self, channels: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.pointwise = conv_relu(channels, channels, 1)
        self.atrous = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=rate, dilation=rate), nn.ReLU(inplace=True)
            )
            for rate in rates
        )
        self.image_pool = conv_relu(channels, channels, 1)
        self.project = conv_relu((len(rates) + 2) * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x.mean(dim=(2, 3), keepdim=True))  # [M, C, 1, 1]
        branches = [self.pointwise(x), *(branch(x) for branch in self.atrous)]
        branches.append(pooled.expand_as(x))
        return self.project(torch.cat(branches, dim=1))  # [M, C, h, w]


class ASPPDecoder(Decoder):
    """The decoder with ASPP between its first 1x1 conv (whose output stays the PML embedding)
    and the residual block: [M, in_channels, h, w] -> logits [M, outputs, h, w], embedding."""

    def __init__(
        self, in_channels: int, channels: int, num_outputs: int, rates: tuple[int, ...]
    ) -> None:
        super().__init__(in_channels, channels, num_outputs)
        self.aspp = AtrousSpatialPyramidPooling(channels, rates)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.reduce(x)  # [M, C, h, w]
        context = self.aspp(torch.relu(embedding))  # [M, C, h, w]
        return self.classifier(self.residual(context)), embedding
