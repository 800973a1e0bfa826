"""+SA (paper Tables III and XI): CyCTR's self-alignment block [21] on the multi-scale query.

A pixel-level transformer encoder block applied to each pooled query scale Phi^z(Q) before it
is fused with the prototypes: every pixel attends to all pixels of its scale (multi-head, with
a fixed 2-D sine position encoding on queries and keys), then a feed-forward layer; post-norm.
The query side only, so it runs once per frame and the prototype split (and folding) is kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sine_position_encoding(
    height: int, width: int, channels: int, like: torch.Tensor
) -> torch.Tensor:
    """[h*w, C] fixed 2-D encoding: C/2 channels of sin/cos of the row, C/2 of the column
    (normalised to [0, 2 pi], DETR's form), in ``like``'s dtype and device."""
    quarter = channels // 4
    frequencies = 10000.0 ** (
        -torch.arange(quarter, device=like.device, dtype=torch.float32) / max(quarter, 1)
    )  # [C/4]
    rows = torch.arange(height, device=like.device, dtype=torch.float32)
    cols = torch.arange(width, device=like.device, dtype=torch.float32)
    rows = rows * (2 * math.pi / max(height - 1, 1))
    cols = cols * (2 * math.pi / max(width - 1, 1))
    row_angles = rows[:, None, None] * frequencies  # [h, 1, C/4]
    col_angles = cols[None, :, None] * frequencies  # [1, w, C/4]
    encoding = torch.cat(
        [
            torch.sin(row_angles).expand(height, width, quarter),
            torch.cos(row_angles).expand(height, width, quarter),
            torch.sin(col_angles).expand(height, width, quarter),
            torch.cos(col_angles).expand(height, width, quarter),
        ],
        dim=2,
    )  # [h, w, 4 * (C/4)]
    if channels > 4 * quarter:  # C not a multiple of 4: zeros in the last channels
        rest = torch.zeros(height, width, channels - 4 * quarter, device=like.device)
        encoding = torch.cat([encoding, rest], dim=2)
    return encoding.reshape(height * width, channels).to(like.dtype)  # [h*w, C]


class SelfAlignmentBlock(nn.Module):
    """x [M, C, h, w] -> [M, C, h, w]: t = LN(t + MHA(t + p, t + p, t)); t = LN(t + FFN(t)) over
    the h*w pixel tokens t."""

    def __init__(self, channels: int, heads: int, hidden: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} not divisible by {heads} self-alignment heads")
        self.heads = heads
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)
        self.attention_norm = nn.LayerNorm(channels)
        self.feed_forward = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )
        self.output_norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M, C, h, w = x.shape
        d = C // self.heads
        tokens = x.flatten(2).transpose(1, 2)  # [M, h*w, C]
        located = tokens + sine_position_encoding(h, w, C, tokens)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(M, h * w, self.heads, d).transpose(1, 2)  # [M, heads, h*w, d]

        q, k, v = split(self.query(located)), split(self.key(located)), split(self.value(tokens))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [M, hd, hw, hw]
        attended = (weights @ v).transpose(1, 2).reshape(M, h * w, C)  # heads concatenated
        tokens = self.attention_norm(tokens + self.out(attended))
        tokens = self.output_norm(tokens + self.feed_forward(tokens))
        return tokens.transpose(1, 2).reshape(M, C, h, w)


class SelfAlignment(nn.Module):
    """One ``SelfAlignmentBlock`` per query scale: Z tensors [B, C, h_z, w_z] -> the same shapes."""

    def __init__(self, channels: int, heads: int, hidden: int, num_scales: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SelfAlignmentBlock(channels, heads, hidden) for _ in range(num_scales)
        )

    def forward(self, scales: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(scales) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} query scales, got {len(scales)}")
        return [block(x) for block, x in zip(self.blocks, scales, strict=True)]
