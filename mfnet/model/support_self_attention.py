"""A_S-v1 (paper Table VI, after CANet [17]): the query concatenated with each support shot,
the K pairs combined by softmaxed attention weights.

Unlike A_S, the result depends on the query, so it runs in the query decoder, once per scale.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import conv_relu


def concat_query_shots(scale: torch.Tensor, shots: torch.Tensor) -> torch.Tensor:
    """scale [B, C, h, w] + shots [B, N, K, C] -> pairs [B, N, K, 2C, h, w]: the query feature
    concatenated with every expanded shot feature F_nk (query first, as ``_fuse_query_class``)."""
    B, C, h, w = scale.shape
    N, K = shots.shape[1:3]
    query = scale[:, None, None].expand(B, N, K, C, h, w)
    expanded = shots[..., None, None].expand(B, N, K, C, h, w)
    return torch.cat([query, expanded], dim=3)


class ShotSelfAttention(nn.Module):
    """Per pair a scalar score (two 3x3 convs, global average over pixels), softmaxed over the
    K shots; the pairs summed with these weights (CANet's attention for k-shot fusion).

    forward(scale [B, C, h, w], shots [B, N, K, C]) -> X_n [B*N, 2C, h, w]. Shared across classes
    and scales; permuting the shots leaves the result unchanged.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Sequential(
            conv_relu(2 * channels, channels, 3), nn.Conv2d(channels, 1, 3, padding=1)
        )

    def forward(self, scale: torch.Tensor, shots: torch.Tensor) -> torch.Tensor:
        pairs = concat_query_shots(scale, shots)  # [B, N, K, 2C, h, w]
        B, N, K = pairs.shape[:3]
        scores = self.score(pairs.flatten(0, 2)).mean(dim=(1, 2, 3))  # [B*N*K]
        weights = torch.softmax(scores.view(B, N, K), dim=2)  # [B, N, K]
        fused = (pairs * weights[..., None, None, None]).sum(dim=2)  # [B, N, 2C, h, w]
        return fused.flatten(0, 1)
