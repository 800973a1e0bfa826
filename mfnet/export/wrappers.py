"""Export modules: thin ``nn.Module`` wrappers that call the model's own methods.

No model logic is written again here: each wrapper converts the deployment I/O convention
(uint8 RGB frames in NHWC layout, as video decoders deliver them) to the model's (float RGB in
[0, 1], NCHW), calls one method of ``MFNet`` (or, for the query decoder by default, the exact
inference rewrite ``FastQueryDecoder`` of ``MFNet.decode_query``), and shapes the result.
Normalisation, the final upsample and the argmax therefore live inside the exported graphs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.inference import FastQueryDecoder
from ..model.mfnet import MFNet
from ..model.support import EncodedSupport


def _to_model_images(frames: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [M, H, W, 3] RGB -> [M, 3, H, W] in [0, 1] of ``dtype``."""
    return frames.permute(0, 3, 1, 2).to(dtype) / 255.0


class SupportEncoder(nn.Module):
    """support_images uint8 [S, H, W, 3] RGB, support_masks uint8 [S, H, W] (1 = the shot's
    class, 0 = other, 255 = ignore) -> shot_features float32 [S, C] (masked pooled features)."""

    def __init__(self, model: MFNet, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        images = _to_model_images(support_images, self.dtype)
        return self.model.pool_shots(images, support_masks == 1).float()


class PrototypeAggregator(nn.Module):
    """shot_features float32 [N, K, C] -> prototypes float32 [N, C] (A_S for K > 1, then mean)."""

    def __init__(self, model: MFNet, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, shot_features: torch.Tensor) -> torch.Tensor:
        prototypes = self.model.aggregate_prototypes(shot_features.to(self.dtype).unsqueeze(0))
        return prototypes[0].float()  # [N, C]


class QueryDecoder(nn.Module):
    """frames uint8 [B, H, W, 3] RGB + prototypes float32 [B, N, C] (``per_frame``: row b is
    frame b's support set) or [N, C] (``per_frame=False``: one set for the whole batch) ->
    labels uint8 [B, H, W] (0 = background, n = the n-th class) and
    probabilities float32 [B, N+1, H, W] (softmax over background and the N classes).

    Prototypes per frame are what a server with dynamic batching needs: requests of different
    streams (different support sets) are stacked along B, every input along its first axis.
    The shared form is the export of schema v1.0 (``prototypes_form="shared"``), kept for
    comparison and for runtimes that predate the per-frame form.

    ``optimized=True`` (the default, what is exported) decodes with ``FastQueryDecoder``: static
    adaptive pooling (MatMuls instead of the exporter's gather decomposition) and prototype
    folding of the first A_M convs; the prototype terms are computed inside the graph from the
    prototypes input, so the runtime contract is the same. ``optimized=False`` calls
    ``MFNet.decode_query`` (the plain form, the reference of the export verification);
    ``fold_prototypes=False`` keeps static pooling only (for A/B timing of the two rewrites).
    """

    def __init__(
        self,
        model: MFNet,
        dtype: torch.dtype = torch.float32,
        optimized: bool = True,
        fold_prototypes: bool = True,
        per_frame: bool = True,
    ) -> None:
        super().__init__()
        model.require_prototype_split("the ONNX query decoder")  # its input is prototypes only
        self.model = model
        self.dtype = dtype
        self.optimized = optimized
        self.per_frame = per_frame
        self.fast = (
            FastQueryDecoder(model, static_pooling=True, fold_prototypes=fold_prototypes)
            if optimized
            else None
        )

    @property
    def form(self) -> str:
        """What the graph computes the logits with: "plain" (decode_query) or the fast form."""
        return self.fast.form if self.fast is not None else "plain"

    @property
    def prototypes_form(self) -> str:
        """The manifest's name of the prototypes input's form: "per_frame" or "shared"."""
        return "per_frame" if self.per_frame else "shared"

    def forward(
        self, frames: torch.Tensor, prototypes: torch.Tensor, slot_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A way-flexible model's graph also takes ``slot_mask`` uint8 [B, N] (1 = a class,
        0 = an empty slot: its prototype row is ignored, the "no class" prototype inside the
        graph takes its place, and its probability is 0)."""
        prototypes = prototypes.to(self.dtype)
        expected = 3 if self.per_frame else 2
        if prototypes.dim() != expected:
            raise ValueError(
                f"prototypes must be {'[B, N, C]' if self.per_frame else '[N, C]'} "
                f"({self.prototypes_form} form), got {tuple(prototypes.shape)}"
            )
        batched = prototypes if self.per_frame else prototypes[None]  # [B or 1, N, C]
        images = _to_model_images(frames, self.dtype)
        if self.fast is not None:
            logits = self.fast(images, batched, slot_mask)  # [B, N+1, H, W]
        elif slot_mask is not None:
            logits = self.model.decode_slots(images, batched, slot_mask)
        else:
            # The decoder reads only the prototypes; the per-shot view is the K = 1 cache shape.
            cache = EncodedSupport(batched[:, :, None, :], batched)
            logits = self.model.decode_query(images, cache)
        logits = logits.float()  # [B, N+1, H, W]
        labels = logits.argmax(dim=1).to(torch.uint8)  # [B, H, W]
        return labels, torch.softmax(logits, dim=1)
