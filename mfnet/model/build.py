"""Builders: every hyper-parameter of the architecture is read here from a ``ModelConfig``."""

from __future__ import annotations

from torch import nn

from ..config import ConfigError, ModelConfig
from .aspp import ASPPDecoder
from .backbone import build_backbone
from .decoder import Decoder
from .fem import FeatureEnrichment
from .mfnet import MFNet, MiddleLevelNeck
from .scale_attention import ScaleAttention
from .self_alignment import SelfAlignment
from .slots import ClassSlots
from .support import RelationalSupportAttention
from .support_convlstm import ShotBiConvLSTM
from .support_self_attention import ShotSelfAttention

# Ablation variants (docs/decisions.md, "Paper fidelity II"); the paper gives none of these.
ASPP_RATES = (6, 12, 18)  # A_M-v2: DeepLab v3's rates at output stride 16
SELF_ALIGNMENT_HEADS = 8  # +SA: CyCTR's transformer width (heads) ...
SELF_ALIGNMENT_HIDDEN = 4  # ... and its feed-forward width, in multiples of C


def build_mfnet(config: ModelConfig, pool_impl: str = "auto") -> MFNet:
    """Build MFNet from its config. A_S (any form) is built only when it can act
    (support_attention and a training shot K > 1); a 1-shot model applied to K > 1 shots
    averages them. The modules of the ablation variants are built after the default ones, so
    the default model's initialisation does not move."""
    backbone = build_backbone(config.backbone, config.resolved_weights)
    channels = config.channels
    neck = MiddleLevelNeck(
        sum(level.channels for level in backbone.feature_levels), channels, config.dropout
    )
    with_support_attention = config.support_attention and config.shot > 1
    support_attention = (
        RelationalSupportAttention(channels, config.relation_heads)
        if with_support_attention and config.support_module == "relation"
        else None
    )
    fused_channels = channels if config.query_fusion == "add" else 2 * channels
    num_scales = len(config.pyramid) if config.multi_scale_query else 1
    scale_attention: ScaleAttention | FeatureEnrichment
    if config.multiscale_module == "fem":
        scale_attention = FeatureEnrichment(fused_channels, channels, num_scales)
    else:  # A_M; for A_M-v2 (one scale) and "w/o A_M" the lower branch only
        scale_attention = ScaleAttention(
            fused_channels,
            channels,
            num_scales=num_scales,
            shared=config.scale_attention_shared,
            attention=config.scale_attention and config.multiscale_module == "scale_attention",
        )
    decoder_in = channels * config.slots if config.class_fusion == "concat" else channels
    # The binary-branches baseline decodes background / foreground once per class.
    outputs = 2 if config.class_fusion == "binary" else config.slots + 1
    decoder = (
        ASPPDecoder(decoder_in, channels, outputs, ASPP_RATES)
        if config.multiscale_module == "aspp"
        else Decoder(decoder_in, channels, outputs)
    )
    shot_fusion: nn.Module | None = None
    if with_support_attention and config.support_module == "self_attention":
        shot_fusion = ShotSelfAttention(channels)
    elif with_support_attention and config.support_module == "convlstm":
        shot_fusion = ShotBiConvLSTM(channels)
    self_alignment = None
    if config.self_alignment:
        if channels % SELF_ALIGNMENT_HEADS:
            raise ConfigError(
                f"self_alignment needs channels divisible by its {SELF_ALIGNMENT_HEADS} heads, "
                f"got channels={channels}"
            )
        self_alignment = SelfAlignment(
            channels, SELF_ALIGNMENT_HEADS, SELF_ALIGNMENT_HIDDEN * channels, num_scales
        )
    return MFNet(
        config,
        backbone,
        neck,
        support_attention,
        scale_attention,
        decoder,
        pool_impl,
        shot_fusion=shot_fusion,
        self_alignment=self_alignment,
        class_slots=ClassSlots(config.max_way, channels) if config.max_way else None,
    )


def count_learnable_parameters(model: MFNet) -> dict[str, int]:
    """Trainable parameters per top-level part, plus ``total``."""
    counts = {
        name: sum(p.numel() for p in module.parameters() if p.requires_grad)
        for name, module in model.named_children()
    }
    counts["total"] = sum(counts.values())
    return counts
