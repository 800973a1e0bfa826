"""Inference backends behind one small protocol, and the choice among them.

A backend runs the exported graphs on numpy arrays in host memory; everything else (image
preparation, support sets, batching) is backend-independent and lives in ``Segmenter``.
``open_backend`` picks the fastest usable one for ``backend="auto"``: TensorRT engines built for
this GPU and TensorRT version, then ONNX Runtime on CUDA (FP16 graphs when exported), then ONNX
Runtime on the CPU (FP32). Backend modules are imported only when chosen, so neither tensorrt
nor cuda-python is needed to import the runtime.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from ..errors import EngineError, RuntimeInputError, reexport_hint
from ..manifest import Manifest
from .feeds import decoder_feeds, decoder_prototypes

__all__ = [
    "BACKENDS",
    "DEVICES",
    "PRECISION_CHOICES",
    "Backend",
    "check_choice",
    "decoder_feeds",
    "decoder_prototypes",
    "open_backend",
    "resolve_onnx_precision",
]

BACKENDS = ("auto", "onnxruntime", "tensorrt")
DEVICES = ("auto", "cuda", "cpu")
PRECISION_CHOICES = ("auto", "fp32", "fp16")

logger = logging.getLogger("mfnet_runtime")


class Backend(Protocol):
    """What ``Segmenter`` needs from a backend. Arrays are host numpy arrays, C-contiguous."""

    name: str  # "onnxruntime-cpu" | "onnxruntime-cuda" | "tensorrt"
    precision: str  # "fp32" | "fp16": compute precision of the graphs / engines
    max_batch: int  # frames per decoder call
    max_support: int  # images per support-encoder call
    max_shots: int  # shots per class per aggregator call
    prototypes_form: str  # the decoder's: "per_frame" ([B, N, C]) | "shared" ([N, C])

    def run_support_encoder(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """uint8 [S, H, W, 3] RGB + uint8 [S, H, W] (1 / 0 / 255) -> float32 [S, C]."""
        ...

    def run_aggregator(self, shot_features: np.ndarray, single: bool = False) -> np.ndarray:
        """float32 [N, K, C] -> prototypes float32 [N, C]; ``single``: the K = 1 graph."""
        ...

    def run_decoder(
        self,
        frames: np.ndarray,
        prototypes: np.ndarray,
        with_probabilities: bool = False,
        slot_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [B, H, W, 3] RGB + float32 prototypes -> (labels uint8 [B, H, W],
        probabilities float32 [B, N+1, H, W] when asked, else None).

        Prototypes: [N, C], one support set for every frame (a per-frame graph gets it tiled
        to [B, N, C], ``decoder_prototypes``), or [B, N, C], row b for frame b (per-frame
        graphs only; ``Segmenter.decode_frames`` splits a batch by support set for a shared
        graph). ``slot_mask`` uint8 [B, N] or [N]: the way-flexible decoder's third input
        (required there, refused elsewhere by the graph itself)."""
        ...

    def close(self) -> None:
        """Release sessions, engines and device memory."""
        ...


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise RuntimeInputError(f"unknown {option} {value!r}; choose one of {choices}")
    return value.lower()


def resolve_onnx_precision(manifest: Manifest, requested: str, device: str) -> str:
    """The ONNX graph precision to run: ``auto`` = FP16 on CUDA when exported, else FP32."""
    available = manifest.available_precisions("onnx")
    if requested == "auto":
        order = ("fp16", "fp32") if device == "cuda" else ("fp32", "fp16")
        for precision in order:
            if precision in available:
                return precision
        raise EngineError(
            f"{manifest.directory} has no complete set of ONNX graphs (needs "
            f"{', '.join(manifest.required_roles)}); re-export with: "
            f"{reexport_hint(manifest.directory)}"
        )
    if requested not in available:
        raise EngineError(
            f"{manifest.directory} has no complete {requested} ONNX graphs (it has "
            f"{available or 'none'}); export them with: {reexport_hint(manifest.directory)} "
            f"--precisions {requested}"
        )
    return requested


def open_backend(
    manifest: Manifest,
    backend: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    verify_hashes: bool = True,
    cuda_graph_batch: int = 0,
    device_id: int = 0,
) -> Backend:
    """Open the requested backend, or with ``auto`` the fastest one that works here.

    Raises ``RuntimeInputError`` for unknown options and ``EngineError`` when an explicitly
    requested backend / device cannot be used (``auto`` falls back and logs why).
    """
    backend = check_choice("backend", backend, BACKENDS)
    device = check_choice("device", device, DEVICES)
    precision = check_choice("precision", precision, PRECISION_CHOICES)
    if backend == "tensorrt" and device == "cpu":
        raise RuntimeInputError(
            "the tensorrt backend runs on CUDA GPUs only; use "
            "backend='onnxruntime' for device='cpu'"
        )
    if cuda_graph_batch < 0:
        raise RuntimeInputError(f"cuda_graph_batch must be >= 0, got {cuda_graph_batch}")
    if backend in ("auto", "tensorrt") and device in ("auto", "cuda"):
        from .tensorrt import TensorRTBackend

        try:
            return TensorRTBackend(manifest, precision, verify_hashes, cuda_graph_batch, device_id)
        except EngineError as error:
            if backend == "tensorrt":
                raise
            if any(g.format == "tensorrt" for g in manifest.graphs):
                # engines were built, so TensorRT was meant to run: say loudly why it does not
                logger.warning("TensorRT engines not used, falling back to ONNX Runtime: %s", error)
            else:
                logger.info("TensorRT not used: %s", error)
    from .onnxruntime import OnnxRuntimeBackend, cuda_provider_available

    if device in ("auto", "cuda"):
        if cuda_provider_available():
            try:
                return OnnxRuntimeBackend(
                    manifest,
                    "cuda",
                    resolve_onnx_precision(manifest, precision, "cuda"),
                    verify_hashes,
                    cuda_graph_batch,
                    device_id,
                )
            except EngineError as error:
                if device == "cuda":
                    raise
                logger.info("ONNX Runtime CUDA not used: %s", error)
        elif device == "cuda":
            raise EngineError(
                "device='cuda' was asked but ONNX Runtime has no CUDA provider here (the CPU "
                "build of onnxruntime is installed, or no GPU is visible); install the GPU "
                "build with: pip uninstall -y onnxruntime && pip install onnxruntime-gpu "
                "(or build TensorRT engines and use backend='tensorrt')"
            )
    return OnnxRuntimeBackend(
        manifest,
        "cpu",
        resolve_onnx_precision(manifest, precision, "cpu"),
        verify_hashes,
        0,
        device_id,
    )
