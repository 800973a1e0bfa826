"""Support side of MFNet: the typed support cache and the relational attention A_S (Eq. 2-3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EncodedSupport:
    """What the query decoder needs from a support set; immutable, returned and passed in.

    Attributes:
        shot_features: [B, N, K, C] masked-pooled feature F_nk of every shot. Kept so that a shot
            can be added to one class without re-running the backbone on the others.
        prototypes: [B, N, C] class prototypes F_n (A_S-modulated shots averaged over K).
    """

    shot_features: torch.Tensor
    prototypes: torch.Tensor

    @property
    def batch(self) -> int:
        return self.shot_features.shape[0]

    @property
    def way(self) -> int:
        return self.shot_features.shape[1]

    @property
    def shot(self) -> int:
        return self.shot_features.shape[2]


class RelationalSupportAttention(nn.Module):
    """A_S: modulate each shot by its relation to the other shots of its class (Eq. 2-3).

    Per head r: w_kj = softmax_j(<W_A^r F_k, W_B^r F_j> / sqrt(d_k)), R^r_k = sum_j w_kj W_V^r F_j,
    with d_k = C / Nr; R_k = concat_r R^r_k and F'_k = F_k + R_k. Shared across classes.
    Permuting the shots permutes the outputs, so their mean (the prototype) is order-invariant.
    """

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.query = nn.Linear(channels, channels)  # W_A, all heads stacked
        self.key = nn.Linear(channels, channels)  # W_B
        self.value = nn.Linear(channels, channels)  # W_V

    def forward(self, shots: torch.Tensor) -> torch.Tensor:
        """shots [B, N, K, C] -> modulated shots [B, N, K, C]."""
        B, N, K, C = shots.shape
        d_k = C // self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, N, K, self.heads, d_k).transpose(2, 3)  # [B, N, Nr, K, d_k]

        a, b, v = split(self.query(shots)), split(self.key(shots)), split(self.value(shots))
        weights = torch.softmax(a @ b.transpose(-1, -2) / math.sqrt(d_k), dim=-1)  # [B,N,Nr,K,K]
        relation = (weights @ v).transpose(2, 3).reshape(B, N, K, C)  # concat over heads
        return shots + relation


class QueryDependentSupportError(ValueError):
    """The model's class features depend on the query (A_S-v1 / A_S-v2), so the support side
    cannot be reduced to query-independent prototypes [N, C]: no prototype-only decoder (the
    fast decoder, the ONNX query graph, a prototype cache) can run it."""

    def __init__(self, support_module: str, use: str) -> None:
        super().__init__(
            f"{use} needs query-independent prototypes, but this model's support module "
            f"{support_module!r} (A_S-v1/v2, paper Table VI) combines the shots with the query "
            "inside the decoder: evaluate it with python -m mfnet.evaluate, or train with "
            "--support_module relation"
        )
        self.support_module = support_module
