"""The decoder on the query-support embedding: 1x1 conv, residual block, 1x1 conv (Sec. III-B)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ResidualBlock


class Decoder(nn.Module):
    """[M, in_channels, h, w] -> logits [M, N+1, h, w] and the PML embedding [M, C, h, w].

    The embedding for the pixel-wise metric loss is the output of the first 1x1 conv, before its
    ReLU and before the residual block (paper Sec. III-D: "taken before the residual block").
    """

    def __init__(self, in_channels: int, channels: int, num_outputs: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, channels, 1)
        self.residual = ResidualBlock(channels)
        self.classifier = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.reduce(x)  # [M, C, h, w]
        logits = self.classifier(self.residual(torch.relu(embedding)))  # [M, N+1, h, w]
        return logits, embedding
