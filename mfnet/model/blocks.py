"""Small convolutional blocks shared by the scale attention A_M and the decoder."""

from __future__ import annotations

import torch
from torch import nn


def conv_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two-layer residual block: relu(x + conv3x3(relu(conv3x3(x)))), C channels in and out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_relu(channels, channels, 3), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))
