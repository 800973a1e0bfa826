"""A_S-v2 (paper Table VI, after Azad et al. [52]): the query concatenated with each support
shot, the K pairs combined by a bidirectional ConvLSTM run over the shots.

Like A_S-v1 it depends on the query and runs in the query decoder, once per scale. The LSTM is
order-dependent: shots are read in the order given (forward) and reversed (backward).
"""

from __future__ import annotations

import torch
from torch import nn

from .support_self_attention import concat_query_shots


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step: gates = conv3x3([x, h]); c' = f c + i g; h' = o tanh(c').

    x [M, C_in, h, w], state (h [M, C, h, w], c [M, C, h, w]) -> new state.
    """

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.gates = nn.Conv2d(in_channels + channels, 4 * channels, 3, padding=1)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, cell = state
        i, f, o, g = self.gates(torch.cat([x, hidden], dim=1)).chunk(4, dim=1)  # [M, C, h, w]
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(cell), cell


class ShotBiConvLSTM(nn.Module):
    """forward(scale [B, C, h, w], shots [B, N, K, C]) -> X_n [B*N, 2C, h, w]: the last hidden
    states of a forward and a backward ConvLSTM (C channels each) over the K query-shot pairs,
    concatenated. Shared across classes and scales.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.forward_cell = ConvLSTMCell(2 * channels, channels)
        self.backward_cell = ConvLSTMCell(2 * channels, channels)

    def forward(self, scale: torch.Tensor, shots: torch.Tensor) -> torch.Tensor:
        pairs = concat_query_shots(scale, shots).flatten(0, 1)  # [B*N, K, 2C, h, w]
        M, K, _, h, w = pairs.shape
        zeros = pairs.new_zeros(M, self.forward_cell.channels, h, w)
        ahead, back = (zeros, zeros), (zeros, zeros)
        for k in range(K):
            ahead = self.forward_cell(pairs[:, k], ahead)
            back = self.backward_cell(pairs[:, K - 1 - k], back)
        return torch.cat([ahead[0], back[0]], dim=1)  # [B*N, 2C, h, w]
