"""Feature extractor Phi (paper Sec. III-B): middle-level features at output stride 8.

Every trunk declares its feature levels (name, channels, stride); the rest of the model reads
channel counts from ``feature_levels`` and never from literals. The torchvision trunks are
frozen and kept in eval mode, so their BatchNorm statistics never drift during training; the
stages after the middle levels (ResNet layer4, VGG block5, the classifiers) are deleted, so they
are neither computed nor stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock

from mfnet_runtime.boundary import scrub_unsafe_advice


@dataclass(frozen=True)
class FeatureLevel:
    """A feature map of the trunk: feature pixel i sees input pixels centred on
    ``stride * i + offset`` (0 for trunks of padded convs and pools, whose stride-2 layers centre
    output j on input 2j; (stride - 1) / 2 for VGG's unpadded 2 x 2 max-pools)."""

    name: str
    channels: int
    stride: int
    offset: float = 0.0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for and could not be loaded."""


class Backbone(nn.Module):
    """Base class: ``forward(images [B, 3, H, W]) -> list of [B, C_l, H/8, W/8]`` per level."""

    feature_levels: tuple[FeatureLevel, ...]
    frozen: bool

    def freeze(self) -> None:
        self.frozen = True
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        # A frozen trunk stays in eval mode whatever the parent module asks for.
        return super().train(mode and not self.frozen)


class ResNetTrunk(Backbone):
    """torchvision ResNet-50/101, dilated (replace_stride_with_dilation=[False, True, True]).

    Levels: layer2 (conv3_x, 512 ch) and layer3 (conv4_x, 1024 ch), both at stride 8.
    """

    def __init__(self, depth: int, weights: str) -> None:
        super().__init__()
        builders = {
            50: (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
            101: (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1),
        }
        build, enum = builders[depth]
        net = build(weights=None, replace_stride_with_dilation=[False, True, True])
        _load_weights(net, weights, enum, f"resnet{depth}")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.feature_levels = (FeatureLevel("layer2", 512, 8), FeatureLevel("layer3", 1024, 8))
        self.freeze()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.layer1(self.stem(images))
        mid = self.layer2(x)  # [B, 512, H/8, W/8]
        return [mid, self.layer3(mid)]  # layer3 dilated: [B, 1024, H/8, W/8]


class VGGTrunk(Backbone):
    """torchvision VGG16-BN up to conv4_3; pool4 and block 5 are dropped (stride 8).

    Levels: conv3 (after pool3, 256 ch) and conv4 (512 ch), both at stride 8: the VGG
    counterparts of ResNet's conv3_x / conv4_x.
    """

    def __init__(self, weights: str) -> None:
        super().__init__()
        net = models.vgg16_bn(weights=None)
        _load_weights(net, weights, models.VGG16_BN_Weights.IMAGENET1K_V1, "vgg16_bn")
        self.block3 = net.features[:24]  # conv1_1 .. pool3
        self.block4 = net.features[24:33]  # conv4_1 .. relu4_3 (pool4 dropped)
        self.feature_levels = (
            FeatureLevel("conv3", 256, 8, offset=3.5),
            FeatureLevel("conv4", 512, 8, offset=3.5),
        )
        self.freeze()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        mid = self.block3(images)  # [B, 256, H/8, W/8]
        return [mid, self.block4(mid)]  # [B, 512, H/8, W/8]


class SmallTrunk(Backbone):
    """A small trainable residual trunk for CPU work (trained from scratch, not frozen).

    torchvision's BasicBlock cannot be dilated, so stride 8 is reached with strides alone:
    stem /2, layer1 /4, layer2 /8, layer3 /8 (stride 1).
    """

    def __init__(self, widths: tuple[int, int, int, int] = (24, 32, 64, 96)) -> None:
        super().__init__()
        stem, w1, w2, w3 = widths
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )
        self.layer1 = _basic_stage(stem, w1, stride=2)
        self.layer2 = _basic_stage(w1, w2, stride=2)
        self.layer3 = _basic_stage(w2, w3, stride=1)
        self.feature_levels = (FeatureLevel("layer2", w2, 8), FeatureLevel("layer3", w3, 8))
        self.frozen = False

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        mid = self.layer2(self.layer1(self.stem(images)))  # [B, w2, H/8, W/8]
        return [mid, self.layer3(mid)]  # [B, w3, H/8, W/8]


def _basic_stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride=stride, downsample=downsample),
        BasicBlock(out_channels, out_channels),
    )


def _load_weights(net: nn.Module, weights: str, enum: models.WeightsEnum, name: str) -> None:
    """Load ImageNet weights from torchvision's enum or a local file; never fall back silently."""
    if weights == "none":
        return
    if weights == "imagenet":
        try:
            state = enum.get_state_dict(progress=True, check_hash=True)
        except Exception as error:  # urllib/OSError/hash errors all mean "not available here"
            raise WeightsUnavailableError(
                f"could not load the ImageNet weights of {name} from torchvision ({error}). "
                f"Download {enum.url} on a machine with network access and pass the file with "
                f"--weights /path/to/{Path(enum.url).name}, or put it in torch's hub cache "
                f"({torch.hub.get_dir()}/checkpoints/)."
            ) from error
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailableError(
                f"backbone weights file {path} does not exist; pass --weights imagenet to use "
                f"torchvision's {name} weights, or the path of a {name} state dict"
            )
        if path.is_dir():
            raise WeightsUnavailableError(
                f"backbone weights {path} is a directory, expected a {name} state-dict file"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            reason = " ".join(scrub_unsafe_advice(f"{type(error).__name__}: {error}").split())
            raise WeightsUnavailableError(
                f"could not read backbone weights {path} ({reason}). Expected a torch state "
                f"dict of torchvision's {name}."
            ) from None  # torch's text (with its unsafe advice) stays out of the traceback
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
        ):
            found = (
                type(state).__name__
                if not isinstance(state, dict)
                else "a dict with entries that are not tensors"
            )
            raise WeightsUnavailableError(
                f"backbone weights {path} hold {found}, not a state dict (parameter names -> "
                f"tensors) of torchvision's {name}; save one with "
                "torch.save(model.state_dict(), path)"
            )
        state = {key.removeprefix("module."): value for key, value in state.items()}
    # Heads that are deleted afterwards (fc, classifier, layer4) may be missing from a file.
    unused = ("fc.", "classifier.", "layer4.")
    expected = net.state_dict()
    shapes = [
        f"{k} {list(v.shape)} vs {list(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if shapes:  # one sentence, not one line per tensor
        raise WeightsUnavailableError(
            f"weights {weights!r} do not fit torchvision's {name}: {len(shapes)} tensors of "
            f"another shape (file vs model: {', '.join(shapes[:3])}"
            f"{', ...' if len(shapes) > 3 else ''})"
        )
    result = net.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.startswith(unused)]
    if missing or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"weights {weights!r} do not fit torchvision's {name}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def feature_size(name: str, image_size: int) -> int:
    """Side of the stride-8 feature maps of backbone ``name`` for a square input.

    ResNet and the small trunk halve three times with padded convs / max-pool (rounding up:
    473 -> 60); VGG's three unpadded 2x2 max-pools round down (473 -> 59).
    """
    if name == "vgg16_bn":
        return image_size // 8
    for _ in range(3):
        image_size = (image_size + 1) // 2
    return image_size


def build_backbone(name: str, weights: str) -> Backbone:
    """``name`` in small | resnet50 | resnet101 | vgg16_bn; ``weights`` as in ModelConfig."""
    if name == "small":
        if weights != "none":
            raise ValueError("the small backbone is trained from scratch: use weights 'none'")
        return SmallTrunk()
    if name in ("resnet50", "resnet101"):
        return ResNetTrunk(int(name.removeprefix("resnet")), weights)
    if name == "vgg16_bn":
        return VGGTrunk(weights)
    raise ValueError(f"unknown backbone {name!r}")
