"""MFNet: multi-class few-shot semantic segmentation (Zhang, Shi, Li, IEEE TCSVT)."""

try:  # mfnet writes artifacts and reports errors through its torch-free runtime package
    import mfnet_runtime  # noqa: F401
except ImportError:
    raise ImportError(
        "mfnet needs its runtime package mfnet_runtime, which is not installed: "
        "pip install -e ./runtime (from the repository root)"
    ) from None

from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import Config, DataConfig, EvalConfig, LossConfig, ModelConfig, TrainConfig, preset
from .metrics import FewShotMeter
from .model.build import build_mfnet, count_learnable_parameters
from .model.mfnet import MFNet, QueryOutput
from .model.support import EncodedSupport

__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "preset",
    "FewShotMeter",
    "build_mfnet",
    "count_learnable_parameters",
    "MFNet",
    "QueryOutput",
    "EncodedSupport",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
]
