"""MFNet: multi-class few-shot semantic segmentation (Zhang, Shi, Li, IEEE TCSVT)."""

from .config import Config, DataConfig, EvalConfig, LossConfig, ModelConfig, TrainConfig, preset
from .metrics import FewShotMeter
from .model.build import build_mfnet, count_learnable_parameters
from .model.mfnet import MFNet, QueryOutput
from .model.support import SupportCache
from .training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

__all__ = [
    "Config", "DataConfig", "EvalConfig", "LossConfig", "ModelConfig", "TrainConfig", "preset",
    "FewShotMeter", "build_mfnet", "count_learnable_parameters", "MFNet", "QueryOutput",
    "SupportCache", "load_checkpoint", "model_from_checkpoint", "save_checkpoint",
]
