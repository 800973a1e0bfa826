"""Builders: every hyper-parameter of the architecture is read here from a ``ModelConfig``."""

from __future__ import annotations

from ..config import ModelConfig
from .backbone import build_backbone
from .decoder import Decoder
from .mfnet import MFNet, MiddleLevelNeck
from .scale_attention import ScaleAttention
from .support import RelationalSupportAttention


def build_mfnet(config: ModelConfig, pool_impl: str = "auto") -> MFNet:
    """Build MFNet from its config. A_S is built only when it can act (support_attention and
    a training shot K > 1); a 1-shot model applied to K > 1 shots averages them."""
    backbone = build_backbone(config.backbone, config.resolved_weights)
    channels = config.channels
    neck = MiddleLevelNeck(
        sum(level.channels for level in backbone.feature_levels), channels, config.dropout
    )
    support_attention = (
        RelationalSupportAttention(channels, config.relation_heads)
        if config.support_attention and config.shot > 1
        else None
    )
    fused_channels = channels if config.query_fusion == "add" else 2 * channels
    scale_attention = ScaleAttention(
        fused_channels,
        channels,
        num_scales=len(config.pyramid) if config.scale_attention else 1,
        shared=config.scale_attention_shared,
        attention=config.scale_attention,
    )
    decoder_in = channels * config.way if config.class_fusion == "concat" else channels
    # The binary-branches baseline decodes background / foreground once per class.
    outputs = 2 if config.class_fusion == "binary" else config.way + 1
    decoder = Decoder(decoder_in, channels, outputs)
    return MFNet(config, backbone, neck, support_attention, scale_attention, decoder, pool_impl)


def count_learnable_parameters(model: MFNet) -> dict[str, int]:
    """Trainable parameters per top-level part, plus ``total``."""
    counts = {
        name: sum(p.numel() for p in module.parameters() if p.requires_grad)
        for name, module in model.named_children()
    }
    counts["total"] = sum(counts.values())
    return counts
