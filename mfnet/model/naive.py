"""Naive N x 1-way inference (paper Table V): a 1-way model run once per class.

Each of the N runs gives background / foreground probabilities for one class; per pixel the
label with the highest probability over all runs wins (the background of any run included), as
the paper does for PFENet and CyCTR. It costs N full forward passes: the yardstick for what the
multi-way architecture saves.
"""

from __future__ import annotations

import torch
from torch import nn

from .mfnet import MFNet


class NaiveMultiWay(nn.Module):
    """``forward(support_images, support_masks, query) -> scores [B, N+1, H, W]``.

    Channel 0 is the largest background probability over the N runs, channel n the foreground
    probability of class n; argmax over channels is the paper's per-pixel maximum.
    """

    def __init__(self, model: MFNet) -> None:
        super().__init__()
        if model.way != 1:
            raise ValueError(f"naive N x 1-way inference needs a 1-way model, got {model.way}-way")
        self.model = model

    def forward(
        self, support_images: torch.Tensor, support_masks: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        """support_images [B, N, K, 3, H, W], support_masks [B, N, K, H, W], query [B, 3, H, W]."""
        runs = [
            torch.softmax(
                self.model(support_images[:, n : n + 1], support_masks[:, n : n + 1], query), dim=1
            )  # [B, 2, H, W]
            for n in range(support_images.shape[1])
        ]
        background = torch.stack([run[:, 0] for run in runs], dim=1).amax(dim=1)  # [B, H, W]
        foreground = torch.stack([run[:, 1] for run in runs], dim=1)  # [B, N, H, W]
        return torch.cat([background.unsqueeze(1), foreground], dim=1)
