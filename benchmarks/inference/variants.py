"""The row catalogue of the inference table: every variant, its group, the work its floor counts,
its precision and phase, the support-encoding rows, and the label-agreement tolerance."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORT_SHOTS = (1, 5)  # K of the support-encoding rows
SUPPORT_VARIANTS = ("support_torch_fp32", "support_torch_amp_fp16", "support_runtime_ort")
# Label agreement with the FP32 eager decode_query on the same frames (fraction of identical
# pixels) that a row must reach; random-init models have many near-ties, so this is strict.
TOLERANCE = {"fp32": 0.999, "fp16": 0.995, "bf16": 0.99}  # bf16 keeps 8 mantissa bits


@dataclass(frozen=True)
class Variant:
    """One row of the table (run for every N of --ways and B of --batches)."""

    name: str
    label: str
    group: str
    work: str  # what the floor counts: full | decoder | naive_decoder | naive_full
    precision: str  # fp32 | fp16 | bf16 | auto (fp16 on CUDA, fp32 on the CPU)
    cuda_only: bool = False
    e2e: bool = False
    phase: int = 1  # 1 torch, 2 ONNX Runtime / TensorRT (exports first), 3 torch.compile
    cost_s: float = 3.0  # rough set-up time on a GPU, for the budget


VARIANTS: tuple[Variant, ...] = (
    Variant(
        "full_eager_fp32",
        "PyTorch eager FP32, full model (support + query every frame)",
        "torch full model",
        "full",
        "fp32",
    ),
    Variant(
        "naive_full_eager_fp32",
        "naive N x 1-way full model, eager FP32",
        "naive N x 1-way",
        "naive_full",
        "fp32",
    ),
    Variant(
        "decoder_eager_fp32",
        "decode_query, eager FP32 (cached prototypes)",
        "torch decoder",
        "decoder",
        "fp32",
    ),
    Variant("decoder_amp_fp16", "decode_query, AMP FP16", "torch decoder", "decoder", "fp16"),
    Variant("decoder_amp_bf16", "decode_query, AMP BF16", "torch decoder", "decoder", "bf16"),
    Variant(
        "decoder_channels_last_fp16",
        "decode_query, AMP FP16 + channels_last",
        "torch decoder",
        "decoder",
        "fp16",
    ),
    Variant(
        "decoder_cudagraph_fp16",
        "decode_query, AMP FP16 + channels_last + CUDA graph",
        "torch decoder",
        "decoder",
        "fp16",
        cuda_only=True,
    ),
    Variant(
        "decoder_compile_fp16",
        "decode_query, AMP FP16 + channels_last + torch.compile",
        "torch decoder",
        "decoder",
        "fp16",
        phase=3,
        cost_s=90.0,
    ),
    Variant(
        "decoder_compile_cudagraph_fp16",
        "decode_query, AMP FP16 + channels_last + torch.compile + CUDA graph",
        "torch decoder",
        "decoder",
        "fp16",
        cuda_only=True,
        phase=3,
        cost_s=90.0,
    ),
    Variant(
        "opt_eager_fp32",
        "torch optimised decoder, eager FP32",
        "torch optimised",
        "decoder",
        "fp32",
    ),
    Variant(
        "opt_amp_fp16",
        "torch optimised decoder, AMP FP16 + channels_last",
        "torch optimised",
        "decoder",
        "fp16",
    ),
    Variant(
        "opt_cudagraph_fp16",
        "torch optimised decoder, AMP FP16 + channels_last + CUDA graph",
        "torch optimised",
        "decoder",
        "fp16",
        cuda_only=True,
    ),
    Variant(
        "opt_compile_fp16",
        "torch optimised decoder, AMP FP16 + channels_last + torch.compile",
        "torch optimised",
        "decoder",
        "fp16",
        phase=3,
        cost_s=90.0,
    ),
    Variant(
        "opt_compile_cudagraph_fp16",
        "torch optimised decoder, AMP FP16 + channels_last + torch.compile + CUDA graph",
        "torch optimised",
        "decoder",
        "fp16",
        cuda_only=True,
        phase=3,
        cost_s=90.0,
    ),
    Variant(
        "naive_decoder_eager_fp32",
        "naive N x 1-way decode_query, eager FP32",
        "naive N x 1-way",
        "naive_decoder",
        "fp32",
    ),
    Variant(
        "naive_decoder_cudagraph_fp16",
        "naive N x 1-way decode_query, AMP FP16 + channels_last + CUDA graph",
        "naive N x 1-way",
        "naive_decoder",
        "fp16",
        cuda_only=True,
    ),
    Variant(
        "ort_fp32", "ONNX Runtime, FP32 graph, IOBinding", "onnxruntime", "decoder", "fp32", phase=2
    ),
    Variant(
        "ort_fp16", "ONNX Runtime, FP16 graph, IOBinding", "onnxruntime", "decoder", "fp16", phase=2
    ),
    Variant(
        "ort_fp32_cudagraph",
        "ONNX Runtime, FP32 graph, IOBinding + CUDA graph",
        "onnxruntime",
        "decoder",
        "fp32",
        cuda_only=True,
        phase=2,
    ),
    Variant(
        "ort_fp16_cudagraph",
        "ONNX Runtime, FP16 graph, IOBinding + CUDA graph",
        "onnxruntime",
        "decoder",
        "fp16",
        cuda_only=True,
        phase=2,
    ),
    Variant(
        "trt_fp32",
        "TensorRT engine FP32 (runtime backend, host I/O)",
        "tensorrt",
        "decoder",
        "fp32",
        cuda_only=True,
        e2e=True,
        phase=2,
        cost_s=120.0,
    ),
    Variant(
        "trt_fp16",
        "TensorRT engine FP16 (runtime backend, host I/O)",
        "tensorrt",
        "decoder",
        "fp16",
        cuda_only=True,
        e2e=True,
        phase=2,
        cost_s=120.0,
    ),
    Variant(
        "e2e_torch",
        "end to end, PyTorch: host uint8 -> pinned copy -> AMP FP16 + CUDA "
        "graph -> host labels (CPU: eager FP32)",
        "end to end",
        "decoder",
        "auto",
        e2e=True,
    ),
    Variant(
        "e2e_runtime_ort",
        "end to end, runtime Segmenter on ONNX Runtime (CUDA: FP16, "
        "IOBinding + CUDA graph; CPU: FP32)",
        "end to end",
        "decoder",
        "auto",
        e2e=True,
        phase=2,
    ),
)
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}


def resolve_precision(variant: Variant, cuda: bool) -> str:
    """The precision a row runs at here: ``auto`` is fp16 on CUDA and fp32 on the CPU."""
    if variant.precision == "auto":
        return "fp16" if cuda else "fp32"
    return variant.precision
