"""Frozen dataclass configurations, saved into every checkpoint.

A checkpoint holds ``Config.to_dict()``; ``Config.from_dict`` rebuilds the exact configuration, so a
model can be rebuilt from the file alone. The command-line interfaces are generated from the
fields below (``add_config_arguments``): every field is one ``--flag`` whose help text is the
field's ``help`` metadata, so ``--help`` documents every option and nothing is declared twice.

Defaults of the dataclasses are the paper's settings (ResNet-50, C = 256, 473 x 473, Nr = 4,
Nt = 20, lambda = 0.4, alpha = 1). The CPU-friendly defaults of ``python -m mfnet.train`` are a
named preset (``PRESETS["synthetic-cpu"]``) applied on top of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

BACKBONES = ("small", "resnet50", "resnet101", "vgg16_bn")
FUSIONS = ("add", "concat")
CLASS_FUSIONS = ("add", "concat", "binary")
SUPPORT_MODULES = ("relation", "self_attention", "convlstm")  # A_S, A_S-v1, A_S-v2 (Table VI)
MULTISCALE_MODULES = ("scale_attention", "fem", "aspp")  # A_M, A_M-v1, A_M-v2 (Table VII)
PML_MODES = ("off", "random", "feature", "spatial")
PML_REDUCTIONS = ("sum", "mean")
DATASETS = ("synthetic", "pascal", "coco")
PROTOCOLS = ("panet", "metaseg")
EVAL_RESOLUTIONS = ("network", "original")
TEST_RESIZES = ("pad", "stretch")
AUGMENTATIONS = ("paper", "pfenet")  # mfnet.data.transforms.AUGMENTATIONS
AMP_MODES = ("off", "bf16", "fp16")
MAX_WAY = 254  # labels are uint8: 0 = background, 255 = ignore
OPS_IMPLS = ("auto", "reference", "cuda")  # mfnet.ops.extension.IMPLS
MEMORY_FORMATS = ("channels_last", "contiguous")  # mfnet.device.place_model


class ConfigError(ValueError):
    """A configuration value of the wrong type or out of its range; names the field."""


class FieldError(ConfigError):
    """A problem of one field on its own (type, range, choice): the command lines check these
    while parsing (``add_config_arguments``); combinations are checked when the config is built."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field carrying its command-line help (and choices)."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not allowed in frozen configs")
    return field(default=default, metadata=metadata)


def _type_problem(kind: Any, value: Any) -> str | None:
    """What is wrong with ``value`` for a field annotated ``kind`` (None: nothing)."""
    if isinstance(value, bool) and kind is not bool:
        return "not a boolean"  # bool is an int subclass: "way": true is not a way
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        return None if isinstance(value, int) else "an integer"
    if kind is float:
        if not isinstance(value, (int, float)):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if kind is str:
        return None if isinstance(value, str) else "a string"
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, (tuple, list)):
            return "a list of numbers"
        if any(_type_problem(item, v) for v in value):
            return "a list of finite numbers"
        return None
    return None


def _check_types(config: Any) -> None:
    """Raise ``ConfigError`` naming the first field whose value has the wrong type (a
    checkpoint's JSON-like config can hold "2" where 2 belongs); runs before the range checks."""
    hints = typing.get_type_hints(type(config))
    section = type(config).__name__.removesuffix("Config").lower()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        problem = _type_problem(hints[f.name], value)
        if problem is not None:
            raise FieldError(
                f.name,
                f"config field {section}.{f.name} must be {problem}, got "
                f"{value!r} ({type(value).__name__})",
            )


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise FieldError(name, f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise FieldError(name, f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of MFNet (paper Sec. III-B/C). ``way`` is fixed by a trained checkpoint."""

    backbone: str = _opt("resnet50", "feature extractor Phi", BACKBONES)
    weights: str = _opt(
        "auto",
        "backbone weights: 'imagenet' (torchvision enum), a path to a local state-dict file, "
        "'none' (random init, explicit), or 'auto' ('none' for the small trainable backbone, "
        "'imagenet' for the torchvision backbones)",
    )
    channels: int = _opt(256, "feature channels C of the query-support embedding")
    way: int = _opt(2, "N: number of classes per episode (fixed by the checkpoint)")
    max_way: int = _opt(
        0,
        "way-flexible model (an extension, docs/decisions.md): Nmax class slots; training "
        "episodes draw 1..Nmax classes, unused slots take a learned 'no class' prototype and "
        "their logits are masked; 0 = off, the paper's model with N = way fixed",
    )
    shot: int = _opt(1, "K: support shots per class used in training")
    relation_heads: int = _opt(4, "Nr: relation heads of the support attention A_S")
    pyramid: tuple[float, ...] = _opt(
        (1.0, 0.5, 0.25, 0.125),
        "query pyramid bins as fractions of the feature size (Z = 4: 60, 30, 15, 8 at 473 input)",
    )
    query_fusion: str = _opt(
        "add", "fusion of class prototype and query feature ('A' in A+C)", FUSIONS
    )
    class_fusion: str = _opt(
        "concat",
        "fusion across the N class features ('C' in A+C); 'binary' = the N-binary-branches "
        "baseline of Table IV (one shared binary decoder per class, per-pixel maximum)",
        CLASS_FUSIONS,
    )
    support_attention: bool = _opt(True, "use A_S to modulate support shots (K > 1 only)")
    scale_attention: bool = _opt(
        True, "use the multi-scale query with A_M; off = single scale, no attention"
    )
    scale_attention_shared: bool = _opt(
        False, "share A_M weights across the Z scales (default: one module per scale)"
    )
    support_module: str = _opt(
        "relation",
        "form of A_S (Table VI): relation (the paper's A_S), self_attention (A_S-v1: the query "
        "concatenated with each shot, combined by softmaxed attention weights), convlstm (A_S-v2: "
        "combined by a Bi-ConvLSTM); the v1/v2 prototypes depend on the query (no ONNX export)",
        SUPPORT_MODULES,
    )
    multiscale_module: str = _opt(
        "scale_attention",
        "form of A_M (Table VII): scale_attention (the paper's A_M), fem (A_M-v1: PFENet's "
        "hierarchical concatenation of the scales), aspp (A_M-v2: one query scale, ASPP in the "
        "decoder)",
        MULTISCALE_MODULES,
    )
    self_alignment: bool = _opt(
        False, "+SA (Tables III, XI): CyCTR's self-alignment transformer block on each query scale"
    )
    dropout: float = _opt(0.5, "Dropout2d rate after the middle-level feature reduction")
    image_size: int = _opt(473, "square network input size in pixels")
    mean: tuple[float, ...] = _opt(
        (0.485, 0.456, 0.406), "RGB normalisation mean (inputs in [0, 1])"
    )
    std: tuple[float, ...] = _opt((0.229, 0.224, 0.225), "RGB normalisation std")

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choice("backbone", self.backbone, BACKBONES)
        _check_choice("query_fusion", self.query_fusion, FUSIONS)
        _check_choice("class_fusion", self.class_fusion, CLASS_FUSIONS)
        _check_choice("support_module", self.support_module, SUPPORT_MODULES)
        _check_choice("multiscale_module", self.multiscale_module, MULTISCALE_MODULES)
        if self.support_module != "relation":
            if not self.support_attention:
                raise ConfigError(
                    f"support_module={self.support_module!r} is a form of A_S: it needs "
                    "support_attention on (w/o A_S is support_attention off)"
                )
            if self.query_fusion != "concat":
                raise ConfigError(
                    f"support_module={self.support_module!r} concatenates the query with each "
                    "support shot (paper Sec. IV-C, A_S-v1/v2): set query_fusion='concat'"
                )
        if self.multiscale_module != "scale_attention" and not self.scale_attention:
            raise ConfigError(
                f"multiscale_module={self.multiscale_module!r} is a form of A_M: it needs "
                "scale_attention on (w/o A_M is scale_attention off)"
            )
        for name in ("channels", "way", "shot", "relation_heads", "image_size"):
            _check_positive(name, getattr(self, name))
        self._check_max_way()
        if self.channels % self.relation_heads:
            raise ConfigError(
                f"channels ({self.channels}) must be divisible by relation_heads "
                f"({self.relation_heads}): each head gets C / Nr channels"
            )
        if not self.pyramid or any(not 0 < f <= 1 for f in self.pyramid):
            raise FieldError("pyramid", f"pyramid fractions must lie in (0, 1], got {self.pyramid}")
        if not 0 <= self.dropout < 1:
            raise FieldError("dropout", f"dropout must lie in [0, 1), got {self.dropout}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean and std need three values (RGB), std > 0")

    def _check_max_way(self) -> None:
        if self.max_way == 0:
            return
        if not 1 <= self.max_way <= MAX_WAY:
            raise FieldError(
                "max_way", f"max_way must be 0 (off) or 1..{MAX_WAY}, got {self.max_way}"
            )
        if self.class_fusion == "binary" or self.support_module != "relation":
            raise ConfigError(
                "max_way (the way-flexible extension) is built for the paper's MFNet: "
                "class_fusion 'concat' or 'add' and support_module 'relation'"
            )

    @property
    def slots(self) -> int:
        """The model's class slots: Nmax for a way-flexible model, else N = way."""
        return self.max_way or self.way

    @property
    def multi_scale_query(self) -> bool:
        """Whether the query is pooled into the Z pyramid scales (A_M, A_M-v1); A_M-v2 (ASPP in
        the decoder) and "w/o A_M" fuse a single scale."""
        return self.scale_attention and self.multiscale_module != "aspp"

    @property
    def resolved_weights(self) -> str:
        if self.weights != "auto":
            return self.weights
        return "none" if self.backbone == "small" else "imagenet"


@dataclass(frozen=True)
class LossConfig:
    """L = L_SEG (weighted focal, Eq. 1) + lambda * L_PML (pixel triplet, Eq. 6)."""

    focal_gamma: float = _opt(2.0, "focal exponent gamma of Eq. (1) (not given in the paper)")
    pml_weight: float = _opt(0.4, "lambda: weight of the pixel-wise metric loss")
    pml_margin: float = _opt(1.0, "alpha: triplet margin of Eq. (6)")
    pml_triplets: int = _opt(
        20, "Nt: anchor seeds per query image (0 = PML off, as Fig. 5's Nt = 0)"
    )
    pml_mode: str = _opt(
        "spatial",
        "positive selection: spatial (paper), random, feature (hardest), or off",
        PML_MODES,
    )
    pml_tau: float = _opt(0.1, "spatial kernel: P(positive) ~ exp(-d / (tau * feature side))")
    pml_start_epoch: int = _opt(5, "epoch (0-based) from which L_PML is switched on")
    # The two defaults below are the form this code used before the fields existed (a checkpoint
    # without them was trained so); the paper presets set Eq. (6)'s form: sum, no normalisation.
    pml_reduction: str = _opt(
        "mean",
        "L_PML over the triplets: sum (Eq. 6: summed per query image, mean over the batch; "
        "the paper presets) or mean (mean over the batch's valid triplets, about Nt times "
        "smaller; the synthetic-cpu preset, see docs/decisions.md)",
        PML_REDUCTIONS,
    )
    pml_normalize: bool = _opt(
        True,
        "L2-normalise the PML embeddings before the distances (squared distances in [0, 4]); "
        "the paper (Eq. 6, the paper presets: --no-pml-normalize) uses the raw embeddings",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choice("pml_mode", self.pml_mode, PML_MODES)
        _check_choice("pml_reduction", self.pml_reduction, PML_REDUCTIONS)
        _check_positive("focal_gamma", self.focal_gamma, allow_zero=True)
        _check_positive("pml_weight", self.pml_weight, allow_zero=True)
        _check_positive("pml_triplets", self.pml_triplets, allow_zero=True)
        _check_positive("pml_tau", self.pml_tau)
        _check_positive("pml_start_epoch", self.pml_start_epoch, allow_zero=True)
        _check_positive("pml_margin", self.pml_margin, allow_zero=True)


@dataclass(frozen=True)
class DataConfig:
    """Which benchmark and fold, and every protocol option that moves the numbers."""

    dataset: str = _opt(
        "synthetic",
        "benchmark: synthetic (embedded), pascal (PASCAL-5i), coco (COCO-20i)",
        DATASETS,
    )
    data_root: str = _opt(
        "",
        "pascal: VOCdevkit/VOC2012 (prepared, see docs/pascal.md); "
        "coco: the folder holding train2014/, val2014/, annotations/",
    )
    fold: int = _opt(0, "fold whose classes are held out as novel (0..3)")
    fold_split: str = _opt(
        "A",
        "coco: fold convention A (contiguous, the paper) or B (interleaved, FWB/PFENet/HSNet)",
        ("A", "B"),
    )
    test_source: str = _opt(
        "val",
        "images of the test episodes: val (VOC val / COCO val2014, "
        "the standard) or train (PASCAL trainaug / COCO train2014, as PANet)",
        ("val", "train"),
    )
    min_object_pixels: int = _opt(
        0,
        "small-object filter: an image counts for a class only if "
        "the class covers this many pixels (PFENet/OSLSM: 2048)",
    )
    drop_novel_images: bool = _opt(
        False,
        "drop training images that contain a novel class "
        "(BAM) instead of labelling it background (PANet/PFENet)",
    )
    protocol: str = _opt(
        "panet",
        "episodes: panet (query holds 1..N episode classes, the "
        "paper's default) or metaseg (query holds all N; person + a held-out "
        "class on PASCAL-5^2)",
        PROTOCOLS,
    )
    eval_resolution: str = _opt(
        "network",
        "score at network resolution or at the original image size (PFENet)",
        EVAL_RESOLUTIONS,
    )
    test_resize: str = _opt(
        "pad",
        "test images: pad (longer side to the input size, aspect "
        "kept, PFENet) or stretch (square resize, PANet)",
        TEST_RESIZES,
    )
    # "pfenet" is the recipe of every checkpoint written before the field existed.
    augmentation: str = _opt(
        "pfenet",
        "training augmentation of pascal/coco: paper (Sec. IV-B: resize to resize_to x resize_to, "
        "random rotation, mirror, random crop; the paper presets) or pfenet (scale 0.9-1.1 of "
        "the original image, rotation, Gaussian blur, mirror, crop)",
        AUGMENTATIONS,
    )
    resize_to: int = _opt(
        0,
        "augmentation 'paper': the square side training images are resized to before the "
        "random crop of image_size (0 = image_size, the paper's 473 x 473; larger lets the "
        "crop move)",
    )
    data_seed: int = _opt(0, "seed of the training episodes")
    max_distractors: int = _opt(2, "synthetic: most non-episode objects per image")

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("fold_split", self.fold_split, ("A", "B"))
        _check_choice("test_source", self.test_source, ("val", "train"))
        _check_choice("protocol", self.protocol, PROTOCOLS)
        _check_choice("eval_resolution", self.eval_resolution, EVAL_RESOLUTIONS)
        _check_choice("test_resize", self.test_resize, TEST_RESIZES)
        _check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        _check_positive("resize_to", self.resize_to, allow_zero=True)
        if self.resize_to and self.augmentation != "paper":
            raise ConfigError(
                f"resize_to={self.resize_to} applies to --augmentation paper only "
                f"(got {self.augmentation!r}); drop --resize-to or add --augmentation paper"
            )
        if not 0 <= self.fold <= 3:
            raise FieldError("fold", f"fold must be 0..3, got {self.fold}")
        _check_positive("max_distractors", self.max_distractors, allow_zero=True)
        _check_positive("data_seed", self.data_seed, allow_zero=True)
        _check_positive("min_object_pixels", self.min_object_pixels, allow_zero=True)
        if self.dataset != "synthetic" and not self.data_root:
            raise ConfigError(
                f"dataset {self.dataset!r} needs --data-root (see docs/"
                f"{self.dataset}.md for the files and the preparation command)"
            )
        if self.dataset == "synthetic" and self.eval_resolution == "original":
            raise ConfigError(
                "the synthetic benchmark is generated at network resolution: "
                "eval_resolution 'original' applies to pascal and coco"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: SGD, momentum 0.9, weight decay 1e-4, poly schedule (power 0.9)."""

    epochs: int = _opt(200, "training epochs")
    episodes_per_epoch: int = _opt(1000, "episodes drawn per epoch")
    batch_size: int = _opt(4, "episodes per step")
    lr: float = _opt(0.0025, "initial learning rate of the poly schedule")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(1e-4, "SGD weight decay")
    poly_power: float = _opt(0.9, "poly schedule power: lr * (1 - step / steps) ** power")
    workers: int = _opt(2, "data-loader worker processes (0 = in the main process)")
    seed: int = _opt(0, "seed of model initialisation, dropout and triplet sampling")
    device: str = _opt("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")
    out: str = _opt("runs/mfnet", "output directory for checkpoints and results")
    save_every_steps: int = _opt(
        0, "also write last.pt every N optimiser steps (0 = only at the end of each epoch)"
    )
    amp: str = _opt(
        "off",
        "mixed precision: off, bf16 (CPU or CUDA autocast) or fp16 (CUDA only, with a "
        "GradScaler); the losses are computed in float32",
        AMP_MODES,
    )
    visuals: int = _opt(
        4, "episodes drawn as a qualitative grid in <out>/visuals/ at each evaluation (0 = none)"
    )
    ops: str = _opt(
        "auto",
        "which implementation of the custom ops (masked pooling, triplet sampling) training uses: "
        "auto = the CUDA extension mfnet_ext on a GPU when it builds, else the PyTorch reference; "
        "reference = always the PyTorch reference; cuda = the extension, or an error if it cannot "
        "be built (see docs/cuda_ext.md)",
        OPS_IMPLS,
    )
    memory_format: str = _opt(
        "contiguous",
        "the layout of the model's 4-D weights and activations in training and evaluation: "
        "contiguous (NCHW) or channels_last (NHWC: 0.84x the training step time on the 2-core "
        "CPU, the synthetic-cpu preset's; not measured on a GPU, see docs/decisions.md). Only "
        "float rounding differs between the two",
        MEMORY_FORMATS,
    )

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("epochs", "episodes_per_epoch", "batch_size", "lr"):
            _check_positive(name, getattr(self, name))
        for name in ("workers", "seed", "weight_decay", "poly_power"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        if not 0 <= self.momentum < 1:
            raise FieldError("momentum", f"momentum must lie in [0, 1), got {self.momentum}")
        _check_positive("save_every_steps", self.save_every_steps, allow_zero=True)
        _check_positive("visuals", self.visuals, allow_zero=True)
        _check_choice("amp", self.amp, AMP_MODES)
        _check_choice("ops", self.ops, OPS_IMPLS)
        _check_choice("memory_format", self.memory_format, MEMORY_FORMATS)


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol (paper Sec. IV-A/B): runs x episodes with fixed seeds."""

    eval_runs: int = _opt(5, "independent runs; mean and std are reported over runs")
    eval_episodes: int = _opt(1000, "episodes per run (PASCAL 1000, COCO 10000)")
    eval_seed: int = _opt(1234, "run r uses seed eval_seed + r (PANet convention)")
    eval_shot: int = _opt(0, "K at test time (0 = the training shot)")
    eval_batch_size: int = _opt(
        8,
        "episodes per forward pass (metrics are per episode; only "
        "the speed and memory depend on it)",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("eval_runs", "eval_episodes", "eval_batch_size"):
            _check_positive(name, getattr(self, name))
        _check_positive("eval_shot", self.eval_shot, allow_zero=True)
        _check_positive("eval_seed", self.eval_seed, allow_zero=True)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict of builtins (safe for ``torch.load(weights_only=True)``)."""
        return {
            section.name: {
                f.name: _plain(getattr(getattr(self, section.name), f.name))
                for f in dataclasses.fields(getattr(self, section.name))
            }
            for section in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> Config:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a dict of sections, got {type(data).__name__}")
        unknown_sections = set(data) - {section.name for section in dataclasses.fields(cls)}
        if unknown_sections:
            raise ConfigError(f"unknown config sections: {sorted(map(str, unknown_sections))}")
        sections = {}
        for section in dataclasses.fields(cls):
            section_cls = _section_class(section)
            if not isinstance(data.get(section.name, {}), dict):
                raise ConfigError(
                    f"config section {section.name!r} must be a dict, got "
                    f"{type(data[section.name]).__name__}"
                )
            values = dict(data.get(section.name, {}))
            known = {f.name: f for f in dataclasses.fields(section_cls)}
            unknown = set(values) - set(known)
            if unknown:
                raise ConfigError(f"unknown {section.name} config keys: {sorted(unknown)}")
            for name, value in values.items():
                if isinstance(value, list):
                    values[name] = tuple(value)
            sections[section.name] = section_cls(**values)
        return cls(**sections)

    def replace(self, **overrides: Any) -> Config:
        """Copy with flat field overrides (``fold=1, lr=0.01``), routed to their section."""
        owner = _field_owners()
        grouped: dict[str, dict[str, Any]] = {}
        for name, value in overrides.items():
            if name not in owner:
                raise ConfigError(f"unknown config field {name!r}")
            grouped.setdefault(owner[name], {})[name] = value
        return dataclasses.replace(
            self,
            **{
                section: dataclasses.replace(getattr(self, section), **values)
                for section, values in grouped.items()
            },
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _section_class(section: dataclasses.Field[Any]) -> type[Any]:
    """The dataclass of a ``Config`` section: the section field's default factory."""
    # typed as a callable or MISSING; every Config field is field(default_factory=<section>)
    return typing.cast("type[Any]", section.default_factory)


def _field_owners() -> dict[str, str]:
    """Field name -> section name; field names are unique across sections by design."""
    owners: dict[str, str] = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(_section_class(section)):
            if f.name in owners:
                raise AssertionError(f"config field {f.name!r} is declared twice")
            owners[f.name] = section.name
    return owners


# Named configurations applied on top of the dataclass defaults. ``synthetic-cpu`` is the default
# of ``python -m mfnet.train``: the small trainable backbone, 2-way 1-shot, sized to train and
# evaluate in 8 to 12 minutes on two CPU cores (README, the measured table).
PRESETS: dict[str, dict[str, Any]] = {
    "synthetic-cpu": dict(
        backbone="small",
        channels=64,
        image_size=96,
        dropout=0.1,
        way=2,
        shot=1,
        epochs=9,
        episodes_per_epoch=2000,
        memory_format="channels_last",
        workers=1,
        batch_size=8,
        lr=0.02,
        pml_start_epoch=2,
        eval_runs=5,
        eval_episodes=1000,
        eval_batch_size=20,
        out="runs/synthetic-cpu",
    ),
}


def _paper_presets() -> dict[str, dict[str, Any]]:
    """The settings the paper reports (Sec. IV-B): ResNet-50, 473, SGD; PASCAL lr 0.0025,
    batch 4, 200 epochs, PML after 5; COCO lr 0.005, batch 8, 50 epochs, PML after 1.

    The paper does not define an epoch for episodic training: here an epoch is 5000 episodes on
    PASCAL (about one pass over a fold's training list, 4.6k-5.9k images in PFENet's lists) and
    20000 on COCO.
    """
    paper = dict(
        backbone="resnet50",
        weights="imagenet",
        channels=256,
        image_size=473,
        dropout=0.5,
        workers=4,
        eval_runs=5,
        eval_batch_size=8,
        # Eq. (6) as written: the hinge summed over the triplets, raw embeddings
        pml_reduction="sum",
        pml_normalize=False,
        augmentation="paper",  # Sec. IV-B: resized to 473 x 473, random crop, rotation, mirror
    )
    pascal = dict(
        paper,
        dataset="pascal",
        lr=0.0025,
        batch_size=4,
        epochs=200,
        episodes_per_epoch=5000,
        pml_start_epoch=5,
        eval_episodes=1000,
    )
    coco = dict(
        paper,
        dataset="coco",
        lr=0.005,
        batch_size=8,
        epochs=50,
        episodes_per_epoch=20000,
        pml_start_epoch=1,
        eval_episodes=10000,
    )
    # The test protocol of each table's comparisons (docs/decisions.md, "Test protocol per
    # table"): the multi-way tables (I, II, X) follow PANet/PPNet [18], [19], which test on their
    # training image list (trainaug / train2014), stretched to a square and scored at network
    # resolution, with no small-object filter; the 1-way tables (III, XI) compare with the PFENet
    # lineage: VOC val / val2014, longer side resized and padded, scored at the original
    # resolution, objects of at least 2048 pixels.
    multi_way = dict(
        test_source="train", test_resize="stretch", eval_resolution="network", min_object_pixels=0
    )
    one_way = dict(
        test_source="val", test_resize="pad", eval_resolution="original", min_object_pixels=2048
    )
    presets = {}
    for way, shot in ((1, 1), (1, 5), (2, 1), (2, 5)):  # Tables I and III
        protocol = one_way if way == 1 else multi_way
        presets[f"pascal-{way}way-{shot}shot"] = dict(pascal, **protocol, way=way, shot=shot)
    for way in (1, 2, 5):  # Tables X and XI
        protocol = one_way if way == 1 else multi_way
        presets[f"coco-{way}way-1shot"] = dict(coco, **protocol, way=way, shot=1)
    presets["coco-1way-5shot"] = dict(coco, **one_way, way=1, shot=5)  # Table XI's 5-shot column
    # Table II: the setup of MetaSeg, 2-way 5-shot on PASCAL-5^2, every query and every support
    # holds person and the other held-out class.
    presets["pascal-metaseg-2way-5shot"] = dict(
        pascal, **multi_way, way=2, shot=5, fold=2, protocol="metaseg"
    )
    return presets


PRESETS.update(_paper_presets())


def preset(name: str, **overrides: Any) -> Config:
    """The named preset with ``overrides`` applied in the same construction (a real-dataset
    preset is only valid together with its ``data_root``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Config().replace(**{**PRESETS[name], **overrides})


def add_config_arguments(
    parser: argparse.ArgumentParser,
    sections: tuple[str, ...],
    exclude: tuple[str, ...] = (),
    defaults: Config | None = None,
    default_text: str | None = None,
) -> None:
    """Add one ``--flag`` per field of the named sections (but ``exclude``); the parsed values
    stay None (= not given).

    The help shows each field's effective default: its value in ``defaults`` (e.g. the preset
    that fills them), or ``default_text`` for all of them (e.g. "the checkpoint's"), or the
    dataclass default.
    """
    for section in dataclasses.fields(Config):
        if section.name not in sections:
            continue
        section_cls = _section_class(section)
        group = parser.add_argument_group(f"{section.name} options", section_cls.__doc__)
        hints = typing.get_type_hints(section_cls)
        values = getattr(defaults, section.name) if defaults is not None else None
        for f in dataclasses.fields(section_cls):
            if f.name in exclude:
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            shown = (
                default_text
                if default_text is not None
                else _plain(getattr(values, f.name) if values is not None else f.default)
            )
            help_text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
            kwargs: dict[str, Any] = dict(default=None, help=help_text, dest=f.name)
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(kind) is tuple:
                kwargs.update(nargs="+", type=typing.get_args(kind)[0], metavar="X")
            else:
                kwargs["type"] = kind if not isinstance(kind, types.UnionType) else str
            if "type" in kwargs and "nargs" not in kwargs and f.metadata.get("choices") is None:
                kwargs["type"] = _field_parser(section_cls, f.name, kwargs["type"])
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            group.add_argument(flag, **kwargs)


def _field_parser(section_cls: type, name: str, kind: Any) -> Any:
    """argparse ``type=`` for one field: parse with ``kind``, then run the config's own checks
    of that field alone (its ``FieldError``), so ranges fail at parse time with argparse's usage
    message; problems of combinations are left to the config built afterwards."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {getattr(kind, '__name__', 'a value')}, got {text!r}"
            ) from None
        try:
            section_cls(**{name: value})
        except FieldError as error:
            if error.field == name:
                raise argparse.ArgumentTypeError(str(error)) from None
        except ConfigError:
            pass  # a combination with the defaults of other fields: checked later
        return value

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def overrides_from_args(args: argparse.Namespace, sections: tuple[str, ...]) -> dict[str, Any]:
    """The config fields that were given on the command line."""
    owners = _field_owners()
    given = {}
    for name, section in owners.items():
        if section in sections and getattr(args, name, None) is not None:
            value = getattr(args, name)
            given[name] = tuple(value) if isinstance(value, list) else value
    return given
