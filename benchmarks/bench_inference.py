"""Inference benchmark of MFNet: one table, one run, one device (issue 7, DESIGN.md section 6).

    python benchmarks/bench_inference.py --device cuda                      # the paper config
    python benchmarks/bench_inference.py --device cpu --backbone small --size 96 --channels 64

Rows, each for N in --ways and batch B in --batches (473 x 473, K = 1 by default):

- ``full_eager_fp32``: PyTorch eager FP32, support + query every frame (how the paper times it);
- ``decoder_*``: ``MFNet.decode_query`` with cached prototypes: eager FP32, AMP FP16 / BF16,
  + channels_last, + CUDA graph, + torch.compile (+ CUDA graph);
- ``opt_*``: the optimised torch decoder (``mfnet.model.inference.FastQueryDecoder``: static
  pooling, per-class folding of the first A_M convs), same configurations;
- ``naive_*``: a 1-way model run N times, per-pixel maximum (paper Table V), vs the single
  multi-way pass;
- ``ort_*``: ONNX Runtime on the exported graphs (FP32 / FP16), IOBinding on device buffers,
  with and without ONNX Runtime's CUDA graphs (CPU provider when --device cpu);
- ``trt_*``: TensorRT engines through the runtime, when TensorRT is installed;
- ``e2e_*``: end to end, uint8 frames in host memory -> uint8 label maps in host memory
  (copies and preprocessing included): PyTorch (pinned memory, normalisation on the GPU, CUDA
  graph) and the torch-free runtime ``Segmenter``;
- support-set encoding cost (once per support set): N classes x K = 1 and K = 5.

Every row records median / p10 / p90 (CUDA events after warm-up on GPU, perf_counter on CPU),
frames/s, speed-up over the eager full model of the same N and B, the GPU memory it used, the
fraction of the floor it reaches (floor = max(FLOPs / measured matrix peak, bytes / measured copy
bandwidth)), and the fraction of its labels identical to the FP32 eager ``decode_query`` on the
same frames. Rows that cannot run say why ("not measured: ...", "skipped: budget"). The model is
randomly initialised (no weights can be downloaded here): timing only, see ``model.weights`` in
the JSON. Outputs under --out: ``inference_<device>_<size>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import gc
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO, REPO / "runtime"):  # runnable from a plain checkout
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _common import device_info, now_utc, time_calls, versions, write_json  # noqa: E402

from mfnet.config import Config, preset  # noqa: E402
from mfnet.data.episodes import synthetic_episodes  # noqa: E402
from mfnet.model.backbone import feature_size  # noqa: E402
from mfnet.model.build import build_mfnet  # noqa: E402
from mfnet.model.mfnet import MFNet  # noqa: E402
from mfnet.model.naive import NaiveMultiWay  # noqa: E402
from mfnet.model.support import RelationalSupportAttention, SupportCache  # noqa: E402

RESULTS = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
SUPPORT_SHOTS = (1, 5)
# Label agreement with the FP32 eager decode_query on the same frames (fraction of identical
# pixels) that a row must reach; random-init models have many near-ties, so this is strict.
TOLERANCE = {"fp32": 0.999, "fp16": 0.995, "bf16": 0.99}  # bf16 keeps 8 mantissa bits
TARGET_DEVICE = "H100"


# ------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
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
    Variant("full_eager_fp32", "PyTorch eager FP32, full model (support + query every frame)",
            "torch full model", "full", "fp32"),
    Variant("naive_full_eager_fp32", "naive N x 1-way full model, eager FP32",
            "naive N x 1-way", "naive_full", "fp32"),
    Variant("decoder_eager_fp32", "decode_query, eager FP32 (cached prototypes)",
            "torch decoder", "decoder", "fp32"),
    Variant("decoder_amp_fp16", "decode_query, AMP FP16", "torch decoder", "decoder", "fp16"),
    Variant("decoder_amp_bf16", "decode_query, AMP BF16", "torch decoder", "decoder", "bf16"),
    Variant("decoder_channels_last_fp16", "decode_query, AMP FP16 + channels_last",
            "torch decoder", "decoder", "fp16"),
    Variant("decoder_cudagraph_fp16", "decode_query, AMP FP16 + channels_last + CUDA graph",
            "torch decoder", "decoder", "fp16", cuda_only=True),
    Variant("decoder_compile_fp16", "decode_query, AMP FP16 + channels_last + torch.compile",
            "torch decoder", "decoder", "fp16", phase=3, cost_s=90.0),
    Variant("decoder_compile_cudagraph_fp16",
            "decode_query, AMP FP16 + channels_last + torch.compile + CUDA graph",
            "torch decoder", "decoder", "fp16", cuda_only=True, phase=3, cost_s=90.0),
    Variant("opt_eager_fp32", "torch optimised decoder, eager FP32",
            "torch optimised", "decoder", "fp32"),
    Variant("opt_amp_fp16", "torch optimised decoder, AMP FP16 + channels_last",
            "torch optimised", "decoder", "fp16"),
    Variant("opt_cudagraph_fp16", "torch optimised decoder, AMP FP16 + channels_last + CUDA graph",
            "torch optimised", "decoder", "fp16", cuda_only=True),
    Variant("opt_compile_fp16", "torch optimised decoder, AMP FP16 + channels_last + torch.compile",
            "torch optimised", "decoder", "fp16", phase=3, cost_s=90.0),
    Variant("opt_compile_cudagraph_fp16",
            "torch optimised decoder, AMP FP16 + channels_last + torch.compile + CUDA graph",
            "torch optimised", "decoder", "fp16", cuda_only=True, phase=3, cost_s=90.0),
    Variant("naive_decoder_eager_fp32", "naive N x 1-way decode_query, eager FP32",
            "naive N x 1-way", "naive_decoder", "fp32"),
    Variant("naive_decoder_cudagraph_fp16",
            "naive N x 1-way decode_query, AMP FP16 + channels_last + CUDA graph",
            "naive N x 1-way", "naive_decoder", "fp16", cuda_only=True),
    Variant("ort_fp32", "ONNX Runtime, FP32 graph, IOBinding", "onnxruntime", "decoder", "fp32",
            phase=2),
    Variant("ort_fp16", "ONNX Runtime, FP16 graph, IOBinding", "onnxruntime", "decoder", "fp16",
            phase=2),
    Variant("ort_fp32_cudagraph", "ONNX Runtime, FP32 graph, IOBinding + CUDA graph",
            "onnxruntime", "decoder", "fp32", cuda_only=True, phase=2),
    Variant("ort_fp16_cudagraph", "ONNX Runtime, FP16 graph, IOBinding + CUDA graph",
            "onnxruntime", "decoder", "fp16", cuda_only=True, phase=2),
    Variant("trt_fp32", "TensorRT engine FP32 (runtime backend, host I/O)", "tensorrt",
            "decoder", "fp32", cuda_only=True, e2e=True, phase=2, cost_s=120.0),
    Variant("trt_fp16", "TensorRT engine FP16 (runtime backend, host I/O)", "tensorrt",
            "decoder", "fp16", cuda_only=True, e2e=True, phase=2, cost_s=120.0),
    Variant("e2e_torch", "end to end, PyTorch: host uint8 -> pinned copy -> AMP FP16 + CUDA "
            "graph -> host labels (CPU: eager FP32)", "end to end", "decoder", "auto", e2e=True),
    Variant("e2e_runtime_ort", "end to end, runtime Segmenter on ONNX Runtime (CUDA: FP16, "
            "IOBinding + CUDA graph; CPU: FP32)", "end to end", "decoder", "auto", e2e=True,
            phase=2),
)
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}
SUPPORT_VARIANTS = ("support_torch_fp32", "support_torch_amp_fp16", "support_runtime_ort")


def resolve_precision(variant: Variant, cuda: bool) -> str:
    if variant.precision == "auto":
        return "fp16" if cuda else "fp32"
    return variant.precision


class NotMeasured(Exception):
    """A row that cannot run here; the message is the reason recorded in the table."""


# ----------------------------------------------------------------------------------- budgeting
class Budget:
    def __init__(self, seconds: float | None) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, cost_s: float) -> bool:
        return self.remaining() > cost_s


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------- ceilings
def _best_ms(fn: Callable[[], object], cuda: bool, warmup: int = 3, repeats: int = 10) -> float:
    stats = time_calls(fn, warmup, repeats, cuda)
    return stats["min_ms"]


def measure_ceilings(device: torch.device) -> dict[str, Any]:
    """Matrix-product rate per dtype and copy bandwidth, measured once (best of the repeats).

    GPU: 8192^3 products on random data, a 1 GiB device-to-device copy (bytes read + written),
    256 MiB host(pinned)-to-device and back. CPU: 1024^3 products and a 64 MiB copy.
    """
    cuda = device.type == "cuda"
    if cuda:
        return _measure_ceilings(device, cuda)
    # CPU: the machine's ceiling whatever --threads the rows use: the best of one thread and of
    # every core (on a busy shared machine either can come out low).
    threads = torch.get_num_threads()
    try:
        best: dict[str, Any] | None = None
        for count in sorted({1, os.cpu_count() or threads}):
            torch.set_num_threads(count)
            again = _measure_ceilings(device, cuda)
            if best is None:
                best = again
            else:
                merge_ceilings(best, again)
    finally:
        torch.set_num_threads(threads)
    return best


def _measure_ceilings(device: torch.device, cuda: bool) -> dict[str, Any]:
    n = 8192 if cuda else 768
    generator = torch.Generator(device=device).manual_seed(0)
    rates: dict[str, float] = {}
    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
              "bf16": torch.bfloat16}
    if not cuda:  # no TF32 on CPUs; FP16 products fall back to a slow path (no FP16 unit)
        dtypes.pop("tf32")
        dtypes.pop("fp16")
    previous = torch.backends.cuda.matmul.allow_tf32
    for name, dtype in dtypes.items():
        a = torch.randn(n, n, device=device, generator=generator).to(dtype)
        b = torch.randn(n, n, device=device, generator=generator).to(dtype)
        try:
            torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
            ms = _best_ms(lambda: torch.mm(a, b), cuda, repeats=10 if cuda else 30)
            rates[name] = 2 * n**3 / (ms * 1e-3) / 1e12
        except RuntimeError as error:  # a dtype without a kernel here
            rates[name] = float("nan")
            log(f"  matmul {name}: {error}")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        a = b = None  # free before the next dtype
    copies: dict[str, float] = {}
    size = (1 << 30) if cuda else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device).random_(generator=generator)
    dst = torch.empty_like(src)
    ms = _best_ms(lambda: dst.copy_(src), cuda, repeats=10 if cuda else 20)
    copies["device_to_device"] = 2 * size / (ms * 1e-3) / 1e9  # read + write
    src = dst = None
    if cuda:
        size = 256 << 20
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True).random_()
        dev = torch.empty(size, dtype=torch.uint8, device=device)
        ms = _best_ms(lambda: dev.copy_(host, non_blocking=True), cuda)
        copies["host_to_device"] = size / (ms * 1e-3) / 1e9
        ms = _best_ms(lambda: host.copy_(dev, non_blocking=True), cuda)
        copies["device_to_host"] = size / (ms * 1e-3) / 1e9
        del host, dev
        torch.cuda.empty_cache()
    else:  # frames already live in host memory: the "transfer" is a memcpy
        copies["host_to_device"] = copies["device_to_device"] / 2
        copies["device_to_host"] = copies["device_to_device"] / 2
    return {
        "matmul_tflops": rates,
        "copy_gb_per_s": copies,
        "method": (f"best of repeated {n}^3 torch.mm per dtype on random data; copies of "
                   f"{'1 GiB (device), 256 MiB pinned (host)' if cuda else '64 MiB'}; "
                   "device-to-device counts bytes read + written; measured at the start and "
                   "the end of the run, the larger value kept"
                   + ("" if cuda else f"; CPU: the best of 1 and {os.cpu_count()} threads")),
    }


def merge_ceilings(ceilings: dict[str, Any], again: dict[str, Any]) -> None:
    """Keep the larger of two measurements of every ceiling (a busy machine only lowers them)."""
    for group in ("matmul_tflops", "copy_gb_per_s"):
        for key, value in again[group].items():
            old = ceilings[group].get(key, float("nan"))
            ceilings[group][key] = value if old != old or value > old else old


def peak_tflops(ceilings: dict[str, Any], precision: str) -> float:
    """The fastest measured matrix rate usable at ``precision`` (a lower bound on time)."""
    rates = ceilings["matmul_tflops"]
    usable = {"fp32": ("fp32", "tf32"), "fp16": ("fp16", "fp32", "tf32"),
              "bf16": ("bf16", "fp32", "tf32")}[precision]
    values = [rates[k] for k in usable if k in rates and rates[k] == rates[k]]
    return max(values)


# ------------------------------------------------------------------------------ model set-up
def model_config(args: argparse.Namespace, way: int, shot: int = 1) -> Config:
    """The paper configuration (ResNet-50, C = 256, 473) or the synthetic-cpu preset for the
    small backbone, with this N, K, size and C; weights "none" (random init, explicit)."""
    base = preset("synthetic-cpu") if args.backbone == "small" else Config()
    return base.replace(backbone=args.backbone, weights="none", channels=args.channels,
                        image_size=args.size, way=way, shot=shot)


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate(model: MFNet, images: torch.Tensor, queries: torch.Tensor,
              support_images: torch.Tensor, support_masks: torch.Tensor) -> None:
    """Make a randomly initialised model behave like a trained one numerically.

    BatchNorm statistics are re-estimated on synthetic frames (backbone first, then the query
    path), and the classifier is standardised so that every class logit has zero mean and unit
    spread: the labels then vary over the image (an untrained model labels every pixel alike,
    which would make the label-agreement checks trivially true) and activations have realistic
    magnitudes for FP16. Timing does not depend on it.
    """
    backbone_bns = set(_batchnorms(model.backbone))
    others = [bn for bn in _batchnorms(model) if bn not in backbone_bns]
    for group, run in ((list(backbone_bns), lambda: model.extract_features(images)),
                       (others, lambda: model.decode_query(queries, model.encode_support(
                           support_images, support_masks)))):
        for bn in group:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: the statistics of this one pass
            bn.train()
        run()
        for bn in group:
            bn.eval()
    logits: list[torch.Tensor] = []
    classifier = model.decoder.classifier
    hook = classifier.register_forward_hook(lambda _m, _i, out: logits.append(out))
    try:
        model.decode_query(queries, model.encode_support(support_images, support_masks))
    finally:
        hook.remove()
    stacked = torch.cat(logits)  # [M, N+1, h, w] feature-resolution logits
    mean = stacked.mean(dim=(0, 2, 3))
    std = stacked.std(dim=(0, 2, 3)).clamp_min(1e-6)
    classifier.weight.div_(std.view(-1, 1, 1, 1))
    classifier.bias.sub_(mean).div_(std)


def build_model(args: argparse.Namespace, way: int, device: torch.device, data: dict,
                seed: int) -> tuple[MFNet, Config]:
    config = model_config(args, way)
    torch.manual_seed(seed)
    model = build_mfnet(config.model).eval().to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    queries = data["frames"][: max(4, min(8, data["frames"].shape[0]))]
    support_images = data["support_images"][:, :1]
    support_masks = data["support_masks"][:, :1]
    calibration = torch.cat([queries, support_images.flatten(0, 1)])
    calibrate(model, calibration, queries, support_images, support_masks)
    return model, config


def synthetic_data(way: int, size: int, backbone: str, frames: int, shots: int,
                   device: torch.device, seed: int) -> dict[str, Any]:
    """Support set (N classes x ``shots``) and query frames of the synthetic benchmark.

    Returns uint8 host arrays (what a deployment gets: HWC RGB) and float device tensors."""
    split = "test" if way <= 5 else "train"
    side = feature_size(backbone, size)
    support = synthetic_episodes(fold=0, split=split, way=way, shot=shots, num_episodes=1,
                                 seed=seed, image_size=size, feature_size=side)[0]
    queries = synthetic_episodes(fold=0, split=split, way=way, shot=1, num_episodes=frames,
                                 seed=seed + 1, image_size=size, feature_size=side)
    query_images = torch.stack([queries[i]["query_image"] for i in range(frames)])  # [B,3,S,S]
    frames_np = (query_images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    support_np = (support["support_images"].permute(0, 1, 3, 4, 2) * 255).round().to(
        torch.uint8).numpy()  # [N, K, S, S, 3]
    masks_np = support["support_masks"].numpy()  # [N, K, S, S]
    as_float = lambda array: torch.from_numpy(array).to(device).float().div(255)  # noqa: E731
    return {
        "frames_np": np.ascontiguousarray(frames_np),
        "support_np": np.ascontiguousarray(support_np),
        "masks_np": np.ascontiguousarray(masks_np),
        "frames": as_float(frames_np).permute(0, 3, 1, 2).contiguous(),
        "support_images": as_float(support_np).permute(0, 1, 4, 2, 3).contiguous(),
        "support_masks": torch.from_numpy(masks_np).to(device),
    }


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def model_flops(model: MFNet, size: int, way: int, shots: int = 1) -> dict[str, int]:
    """FLOPs (2 x multiply-adds of convolutions and matrix products; FlopCounterMode) of one
    frame: decode_query with cached prototypes, and the full model (N x K support shots encoded
    + aggregated + one query decoded). Counted on the meta device (no compute)."""
    meta = copy.deepcopy(model).to("meta")
    channels = model.config.channels
    prototypes = torch.empty(1, way, channels, device="meta")
    cache = SupportCache(prototypes[:, :, None], prototypes)
    query = torch.empty(1, 3, size, size, device="meta")
    decoder = count_flops(lambda: meta.decode_query(query, cache))
    images = torch.empty(way * shots, 3, size, size, device="meta")
    foreground = torch.ones(way * shots, size, size, dtype=torch.bool, device="meta")
    shots_flops = count_flops(lambda: meta.pool_shots(images, foreground))
    aggregate = count_flops(lambda: meta.aggregate_prototypes(
        torch.empty(1, way, shots, channels, device="meta")))
    return {"decoder": decoder, "support_shots": shots_flops, "aggregate": aggregate,
            "full": decoder + shots_flops + aggregate}


def fast_decoder_class() -> tuple[type | None, str | None]:
    try:
        from mfnet.model.inference import FastQueryDecoder
    except ImportError as error:
        return None, (f"not available: mfnet.model.inference.FastQueryDecoder cannot be "
                      f"imported ({error})")
    return FastQueryDecoder, None


def make_fast_decoder(cls: type, model: MFNet) -> nn.Module:
    return cls(model, static_pooling=True, fold_prototypes=True).eval()


@dataclass
class WayContext:
    way: int
    model: MFNet
    config: Config
    naive: MFNet
    data: dict[str, Any]
    prototypes: torch.Tensor  # [1, N, C] (K = 1)
    cache: SupportCache
    naive_caches: list[SupportCache]
    reference: dict[int, np.ndarray] = field(default_factory=dict)  # batch -> uint8 [B, S, S]
    flops: dict[str, Any] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    engines: Path | None = None
    engines_error: str | None = None
    export_s: float | None = None
    runtime_support: Any = None


def plain_labels(model: MFNet, cache: SupportCache) -> Callable[[torch.Tensor], torch.Tensor]:
    """query float [B, 3, S, S] -> labels uint8 [B, S, S] through decode_query."""
    return lambda query: model.decode_query(query, cache).argmax(dim=1).to(torch.uint8)


def fast_labels(decoder: nn.Module, prototypes: torch.Tensor
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The optimised decoder with its prototype terms prepared once (on the first call, so in
    the row's precision), as a deployment caches them with the support set."""
    state: dict[str, Any] = {}

    def run(query: torch.Tensor) -> torch.Tensor:
        if "prototypes" not in state:
            state["prototypes"] = (decoder.prepare(prototypes)
                                   if getattr(decoder, "folded", False) else prototypes)
        return decoder(query, state["prototypes"]).argmax(dim=1).to(torch.uint8)
    return run


def naive_labels(model: MFNet, caches: list[SupportCache]
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A 1-way model run once per class; per pixel the most probable label over the runs
    (any run's background included), as ``NaiveMultiWay`` and the paper do."""
    def run(query: torch.Tensor) -> torch.Tensor:
        probs = [torch.softmax(model.decode_query(query, cache).float(), dim=1) for cache in caches]
        background = torch.stack([p[:, 0] for p in probs], dim=1).amax(dim=1, keepdim=True)
        scores = torch.cat([background] + [p[:, 1:2] for p in probs], dim=1)
        return scores.argmax(dim=1).to(torch.uint8)
    return run


def with_autocast(fn: Callable, device: torch.device, precision: str) -> Callable:
    if precision == "fp32":
        return fn
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16

    def run(*inputs):
        # cache_enabled=False: autocast's weight cache must not outlive a CUDA graph capture
        with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
            return fn(*inputs)
    return run


def set_up_way(args: argparse.Namespace, way: int, device: torch.device, naive: MFNet,
               naive_cache_source: Callable[[torch.Tensor, torch.Tensor], SupportCache]
               ) -> WayContext:
    frames = max(args.batch_list)
    data = synthetic_data(way, args.size, args.backbone, frames, max(SUPPORT_SHOTS), device,
                          seed=1000 + way)
    model, config = build_model(args, way, device, data, seed=way)
    with torch.no_grad():
        cache = model.encode_support(data["support_images"][:, :1], data["support_masks"][:, :1])
        naive_caches = [naive_cache_source(data["support_images"][n:n + 1, :1],
                                           data["support_masks"][n:n + 1, :1])
                        for n in range(way)]
    context = WayContext(way, model, config, naive, data, cache.prototypes, cache, naive_caches)
    reference_fn = plain_labels(model, cache)
    with strict_fp32(), torch.no_grad():
        for batch in args.batch_list:
            context.reference[batch] = reference_fn(data["frames"][:batch]).cpu().numpy()
    flops = model_flops(model, args.size, way)
    flops_one = model_flops(naive, args.size, 1)
    context.flops = {
        "full": flops["full"],
        "decoder": flops["decoder"],
        "naive_decoder": way * flops_one["decoder"],
        "naive_full": way * flops_one["full"],
        "support_shot": flops["support_shots"] // way,
    }
    fast_cls, _ = fast_decoder_class()
    if fast_cls is not None:
        try:
            meta = copy.deepcopy(model).to("meta")
            fast = make_fast_decoder(fast_cls, meta).to("meta")  # its constants too
            protos = torch.empty(1, way, args.channels, device="meta")
            query = torch.empty(1, 3, args.size, args.size, device="meta")
            context.flops["decoder_optimised"] = count_flops(lambda: fast(query, protos))
        except Exception:  # noqa: BLE001 - meta counting is best effort: count on the device
            try:
                fast = make_fast_decoder(fast_cls, model).to(device)
                context.flops["decoder_optimised"] = count_flops(
                    lambda: fast(data["frames"][:1], cache.prototypes))
            except Exception as error:  # noqa: BLE001
                context.flops["decoder_optimised_error"] = repr(error)
    context.params = {"model": count_parameters(model), "naive": count_parameters(naive)}
    labels = context.reference[max(args.batch_list)]
    context.flops["reference_label_histogram"] = np.bincount(
        labels.ravel(), minlength=way + 1).tolist()
    return context


class strict_fp32:
    """TF32 off for cuDNN and matmul (the FP32 reference); restores the settings on exit."""

    def __enter__(self) -> None:
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


# ------------------------------------------------------------------------------------ runners
@dataclass
class Prepared:
    """A ready-to-time row: ``call()`` returns the labels [B, S, S] (tensor or array)."""

    call: Callable[[], Any]
    memory: str = "torch"  # torch: peak allocated by the row; device: drop of free device memory
    resident_bytes: int = 0  # memory the row uses that was allocated before it (shared models)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] | None = None
    after: Callable[[], list[str]] | None = None  # notes known only after timing


@dataclass
class Env:
    args: argparse.Namespace
    device: torch.device
    budget: Budget
    ceilings: dict[str, Any] = field(default_factory=dict)
    fast_cls: type | None = None
    fast_reason: str | None = None
    ort_reason: str | None = None  # None: ONNX Runtime usable on this device
    trt_reason: str | None = None
    compiled: dict[tuple, Any] = field(default_factory=dict)
    contexts: dict[int, WayContext] = field(default_factory=dict)
    naive: MFNet | None = None  # the 1-way model of the naive rows (shared by every N)
    rows: list[dict[str, Any]] = field(default_factory=list)
    supports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def selected(self, name: str) -> bool:
        patterns = self.args.variant_patterns
        chosen = not patterns or any(fnmatch.fnmatch(name, p) for p in patterns)
        return chosen and not any(fnmatch.fnmatch(name, p) for p in self.args.skip_patterns)


def no_grad(fn: Callable) -> Callable:
    def run(*inputs):
        with torch.no_grad():
            return fn(*inputs)
    return run


def capture_graph(fn: Callable, *static_inputs: torch.Tensor) -> tuple[Callable, int]:
    """Capture ``fn(*static_inputs)`` as a CUDA graph after warm-up on a side stream; returns
    (replay -> the static output, bytes of the graph's memory pool at capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    before = torch.cuda.memory_allocated()
    with torch.cuda.graph(graph):
        output = fn(*static_inputs)
    pool = torch.cuda.memory_allocated() - before

    def replay() -> torch.Tensor:
        graph.replay()
        return output
    replay.graph = graph  # keep it alive as long as the callable
    return replay, pool


def channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last)


def model_copy(model: nn.Module, memory_format: bool = False) -> nn.Module:
    copied = copy.deepcopy(model)
    return copied.to(memory_format=torch.channels_last) if memory_format else copied


def decoder_fn(env: Env, ctx: WayContext, kind: str, precision: str, layout: bool
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """labels(query) for the plain decoder, the optimised one or the naive N x 1-way."""
    if kind == "opt":
        if env.fast_cls is None:
            raise NotMeasured(env.fast_reason or "not available")
        model = model_copy(ctx.model, layout)
        fn = fast_labels(make_fast_decoder(env.fast_cls, model).to(env.device), ctx.prototypes)
    elif kind == "naive":
        fn = naive_labels(model_copy(ctx.naive, layout), ctx.naive_caches)
    else:
        fn = plain_labels(model_copy(ctx.model, layout), ctx.cache)
    return no_grad(with_autocast(fn, env.device, precision))


def torch_decoder_row(env: Env, ctx: WayContext, batch: int, kind: str, precision: str,
                      layout: bool, graph: bool) -> Prepared:
    query = ctx.data["frames"][:batch].clone()
    if layout:
        query = channels_last(query)
    fn = decoder_fn(env, ctx, kind, precision, layout)
    if graph:
        replay, _ = capture_graph(fn, query)
        return Prepared(replay)
    return Prepared(lambda: fn(query))


def full_row(env: Env, ctx: WayContext, batch: int, naive: bool) -> Prepared:
    """Support + query every frame, one support set per frame (as the paper times it)."""
    images = ctx.data["support_images"][:, :1]
    masks = ctx.data["support_masks"][:, :1]
    images = images.unsqueeze(0).expand(batch, *images.shape).contiguous()
    masks = masks.unsqueeze(0).expand(batch, *masks.shape).contiguous()
    query = ctx.data["frames"][:batch].clone()
    model = NaiveMultiWay(model_copy(ctx.naive)) if naive else model_copy(ctx.model)
    run = no_grad(lambda: model(images, masks, query).argmax(dim=1).to(torch.uint8))
    return Prepared(run)


def e2e_torch_row(env: Env, ctx: WayContext, batch: int) -> Prepared:
    """uint8 [B, S, S, 3] numpy frames -> uint8 [B, S, S] numpy labels through PyTorch.

    CUDA: host memcpy into a pinned buffer, async copy to the device, normalisation + decoder
    (the optimised one when available, AMP FP16, channels_last) + argmax replayed as one CUDA
    graph, async copy of the labels into pinned memory, synchronise, copy out. CPU: eager FP32.
    """
    host = ctx.data["frames_np"][:batch]
    size = env.args.size
    kind = "opt" if env.fast_cls is not None else "plain"
    notes = [f"decoder: {'FastQueryDecoder' if kind == 'opt' else 'decode_query'}"]
    if not env.cuda:
        fn = decoder_fn(env, ctx, kind, "fp32", False)

        def call_cpu() -> np.ndarray:
            query = torch.from_numpy(host).permute(0, 3, 1, 2).float().div(255)
            return fn(query).numpy()
        return Prepared(call_cpu, notes=notes)
    fn = decoder_fn(env, ctx, kind, "fp16", True)
    pinned_in = torch.empty((batch, size, size, 3), dtype=torch.uint8).pin_memory()
    pinned_out = torch.empty((batch, size, size), dtype=torch.uint8).pin_memory()
    device_in = torch.empty((batch, size, size, 3), dtype=torch.uint8, device=env.device)
    # NHWC uint8 permuted to NCHW is already channels_last in memory.
    replay, _ = capture_graph(lambda frames: fn(frames.permute(0, 3, 1, 2).float().div(255)),
                              device_in)
    in_view, out_view = pinned_in.numpy(), pinned_out.numpy()
    stream = torch.cuda.current_stream()

    def call() -> np.ndarray:
        np.copyto(in_view, host)
        device_in.copy_(pinned_in, non_blocking=True)
        labels = replay()
        pinned_out.copy_(labels, non_blocking=True)
        stream.synchronize()
        return out_view.copy()
    return Prepared(call, notes=notes)


def compile_row(env: Env, ctx: WayContext, batch: int, kind: str, graph: bool) -> Prepared:
    """torch.compile (default mode, static shapes) of the AMP FP16 channels_last decoder; the
    CUDA-graph row captures the compiled function of the row before it (compiled once)."""
    key = (ctx.way, batch, kind)
    query = channels_last(ctx.data["frames"][:batch].clone())
    entry = env.compiled.get(key)
    resident = 0
    if entry is None:
        torch._dynamo.reset()
        fn = decoder_fn(env, ctx, kind, "fp16", True)
        fn(query)  # eager once: prepares cached prototype terms outside the compiled region
        compiled = torch.compile(fn, dynamic=False)
        started = time.perf_counter()
        compiled(query)
        if env.cuda:
            torch.cuda.synchronize()
        entry = {"fn": compiled, "compile_s": time.perf_counter() - started}
        env.compiled[key] = entry
    else:
        resident = (ctx.params["model"] if kind != "naive" else ctx.params["naive"]) * 4
    notes = [f"compile time {entry['compile_s']:.1f} s (excluded)"]
    if graph:
        replay, _ = capture_graph(entry["fn"], query)
        env.compiled.pop(key, None)
        return Prepared(replay, resident_bytes=resident, notes=notes,
                        extra={"compile_s": entry["compile_s"]})
    return Prepared(lambda: entry["fn"](query), resident_bytes=resident, notes=notes,
                    extra={"compile_s": entry["compile_s"]})


# ------------------------------------------------------------------ ONNX Runtime and TensorRT
def check_onnxruntime(cuda: bool) -> str | None:
    """None when ONNX Runtime can run the rows on this device, else the reason."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        return f"not measured: onnxruntime is not installed ({error})"
    if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("not measured: onnxruntime-gpu not installed (ONNX Runtime "
                f"{ort.__version__} has only {', '.join(ort.get_available_providers())})")
    if cuda and hasattr(ort, "preload_dlls"):
        try:  # CUDA / cuDNN libraries from the nvidia-* wheels that torch brought
            ort.preload_dlls()
        except Exception as error:  # noqa: BLE001 - torch has loaded them already
            log(f"  onnxruntime.preload_dlls: {error}")
    return None


def check_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "not measured: TensorRT not installed"
    except Exception as error:  # noqa: BLE001 - a broken install is a reason too
        return f"not measured: TensorRT cannot be imported ({type(error).__name__}: {error})"
    return None


def export_options() -> dict[str, Any]:
    """Keyword arguments of export_onnx this run uses: the default decoder form (the optimised
    one, ``optimize=True``, where export_onnx has that switch)."""
    import inspect

    from mfnet.export.onnx_export import export_onnx

    return {"optimize": True} if "optimize" in inspect.signature(export_onnx).parameters else {}


def ensure_engines(env: Env, ctx: WayContext) -> Path:
    """Export the model of this N to ONNX (FP32 + FP16 graphs, export_onnx) into the engine
    cache, keyed by the SHA-256 of the checkpoint, and reuse a finished export."""
    if ctx.way not in env.args.onnx_way_list:
        raise NotMeasured(f"not measured: N={ctx.way} not in --onnx-ways")
    if ctx.engines is not None:
        return ctx.engines
    if ctx.engines_error is not None:
        raise NotMeasured(ctx.engines_error)
    from mfnet.export.onnx_export import ExportLimits, export_onnx
    from mfnet.training.checkpoint import save_checkpoint

    cache = Path(env.args.engine_cache)
    cache.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in ctx.model.state_dict().items()}
    staging = cache / f"staging-{ctx.way}way.pt"
    save_checkpoint(staging, {"config": ctx.config.to_dict(), "model": state})
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:16]
    form = "plain" if export_options().get("optimize") is False else "default"
    tag = (f"{env.args.backbone}-{env.args.size}-c{env.args.channels}-{ctx.way}way-{form}-"
           f"{'-'.join(env.args.onnx_precision_list)}-{digest}")
    directory = cache / tag
    checkpoint = cache / f"{tag}.pt"
    staging.replace(checkpoint)
    started = time.perf_counter()
    if not (directory / "manifest.json").is_file():
        limits = ExportLimits(max_batch=max(16, max(env.args.batch_list)))
        log(f"  exporting ONNX graphs of the {ctx.way}-way model to {directory}")
        try:
            export_onnx(checkpoint, directory, precisions=tuple(env.args.onnx_precision_list),
                        limits=limits, verify=False, **export_options())
        except Exception as error:  # noqa: BLE001 - recorded on every ONNX row
            ctx.engines_error = f"failed: ONNX export ({type(error).__name__}: {error})"
            raise
    ctx.export_s = time.perf_counter() - started
    ctx.engines = directory
    return directory


def ort_session(path: Path, cuda: bool, cuda_graph: bool, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if cuda:
        provider = {"device_id": "0"}
        if cuda_graph:
            provider["enable_cuda_graph"] = "1"
        providers: list = [("CUDAExecutionProvider", provider)]
        if not cuda_graph:
            providers.append("CPUExecutionProvider")
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if cuda and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"ONNX Runtime did not use CUDA for {path.name}: "
                           f"{session.get_providers()}")
    return session


def ort_row(env: Env, ctx: WayContext, batch: int, precision: str, cuda_graph: bool
            ) -> Prepared:
    """The exported query decoder on ONNX Runtime with IOBinding.

    CUDA: frames (uint8 NHWC) and prototypes live in device buffers bound once; the labels are
    bound to a device buffer (and, with CUDA graphs, the probabilities too: replay needs every
    output at a fixed address). CPU: the CPU provider with host buffers."""
    if env.ort_reason:
        raise NotMeasured(env.ort_reason)
    if precision not in env.args.onnx_precision_list:
        raise NotMeasured(f"not measured: {precision} graphs not exported (--onnx-precisions)")
    engines = ensure_engines(env, ctx)
    session = ort_session(engines / f"query_decoder.{precision}.onnx", env.cuda, cuda_graph,
                          env.args.threads)
    size, way = env.args.size, ctx.way
    frames = np.ascontiguousarray(ctx.data["frames_np"][:batch])
    prototypes = np.ascontiguousarray(ctx.prototypes[0].float().cpu().numpy())
    binding = session.io_binding()
    if not env.cuda:
        binding.bind_cpu_input("frames", frames)
        binding.bind_cpu_input("prototypes", prototypes)
        binding.bind_output("labels")

        def call_cpu(_keep=(session, frames, prototypes)) -> np.ndarray:
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return Prepared(call_cpu, memory="device")
    device_frames = torch.from_numpy(frames).to(env.device)
    device_prototypes = torch.from_numpy(prototypes).to(env.device)
    labels = torch.empty((batch, size, size), dtype=torch.uint8, device=env.device)
    buffers = [device_frames, device_prototypes, labels]

    def bind(kind: str, name: str, tensor: torch.Tensor, dtype: type) -> None:
        getattr(binding, kind)(name, "cuda", 0, dtype, tuple(tensor.shape), tensor.data_ptr())

    bind("bind_input", "frames", device_frames, np.uint8)
    bind("bind_input", "prototypes", device_prototypes, np.float32)
    bind("bind_output", "labels", labels, np.uint8)
    if cuda_graph:
        probabilities = torch.empty((batch, way + 1, size, size), dtype=torch.float32,
                                    device=env.device)
        buffers.append(probabilities)
        bind("bind_output", "probabilities", probabilities, np.float32)
    torch.cuda.synchronize()

    def call(_keep=(session, buffers)) -> torch.Tensor:  # the binding holds raw pointers
        session.run_with_iobinding(binding)
        torch.cuda.synchronize()  # ORT runs on its own stream
        return labels
    return Prepared(call, memory="device")


def runtime_segmenter(env: Env, ctx: WayContext, batch: int, backend: str = "onnxruntime",
                      precision: str | None = None):
    from mfnet_runtime import Segmenter

    precision = precision or ("fp16" if env.cuda else "fp32")
    if precision not in env.args.onnx_precision_list:
        raise NotMeasured(f"not measured: {precision} graphs not exported (--onnx-precisions)")
    engines = ensure_engines(env, ctx)
    return Segmenter.load(engines, backend=backend, device="cuda" if env.cuda else "cpu",
                          precision=precision, cuda_graph_batch=batch if env.cuda else 0,
                          threads=env.args.threads)


def runtime_support(segmenter, ctx: WayContext, shots: int):
    classes = {f"class{n}": [(ctx.data["support_np"][n, k], ctx.data["masks_np"][n, k])
                             for k in range(shots)] for n in range(ctx.way)}
    return lambda: segmenter.encode_support(classes)


def e2e_runtime_row(env: Env, ctx: WayContext, batch: int) -> Prepared:
    """uint8 frames in host memory -> label maps in host memory through ``Segmenter``."""
    if env.ort_reason:
        raise NotMeasured(env.ort_reason)
    segmenter = runtime_segmenter(env, ctx, batch)
    support = runtime_support(segmenter, ctx, 1)()
    frames = [np.ascontiguousarray(f) for f in ctx.data["frames_np"][:batch]]
    if batch == 1:
        call = lambda: segmenter.segment(frames[0], support)[None]  # noqa: E731
    else:
        call = lambda: np.stack(segmenter.segment_batch(frames, support))  # noqa: E731
    notes = [f"{segmenter.backend_name} {segmenter.precision}"]

    def after() -> list[str]:  # the runtime drops its CUDA graph (with a warning) if it fails
        if not env.cuda:
            return []
        graph = getattr(getattr(segmenter, "_backend", None), "_graph_decoder", None)
        return [f"CUDA graph at batch {batch}: {'in use' if graph is not None else 'not in use'}"]
    return Prepared(call, memory="device", notes=notes, close=segmenter.close, after=after)


def trt_row(env: Env, ctx: WayContext, batch: int, precision: str) -> Prepared:
    """TensorRT engines (built with mfnet.export.tensorrt.build_engines into the export
    directory) through the runtime's TensorRT backend: ``decode_prepared`` on prepared frames,
    host in, host out. Written against the documented APIs; not run on the project's machines
    (no TensorRT there)."""
    if env.trt_reason:
        raise NotMeasured(env.trt_reason)
    from mfnet.export.tensorrt import build_engines

    engines = ensure_engines(env, ctx)
    key = ("trt", ctx.way, precision)
    if key not in env.compiled:
        started = time.perf_counter()
        build_engines(engines, precision, opt_batch=1, max_batch=max(env.args.batch_list))
        env.compiled[key] = time.perf_counter() - started
    segmenter = runtime_segmenter(env, ctx, batch, backend="tensorrt", precision=precision)
    support = runtime_support(segmenter, ctx, 1)()
    prepared, _ = segmenter.prepare_frames(list(ctx.data["frames_np"][:batch]))
    return Prepared(lambda: segmenter.decode_prepared(prepared, support), memory="device",
                    notes=[f"engine build {env.compiled[key]:.0f} s (excluded)"],
                    close=segmenter.close)


def build_row(env: Env, variant: Variant, ctx: WayContext, batch: int) -> Prepared:
    name = variant.name
    precision = resolve_precision(variant, env.cuda)
    if name == "full_eager_fp32":
        return full_row(env, ctx, batch, naive=False)
    if name == "naive_full_eager_fp32":
        return full_row(env, ctx, batch, naive=True)
    if name == "e2e_torch":
        return e2e_torch_row(env, ctx, batch)
    if name == "e2e_runtime_ort":
        return e2e_runtime_row(env, ctx, batch)
    if name.startswith("ort_"):
        return ort_row(env, ctx, batch, precision, name.endswith("cudagraph"))
    if name.startswith("trt_"):
        return trt_row(env, ctx, batch, precision)
    kind = name.split("_", 1)[0]  # decoder | opt | naive
    kind = {"decoder": "plain", "opt": "opt", "naive": "naive"}[kind]
    if "compile" in name:
        return compile_row(env, ctx, batch, kind, graph=name.endswith("cudagraph_fp16"))
    layout = precision != "fp32" and "amp_fp16" not in name and "amp_bf16" not in name
    if kind == "opt" and name == "opt_amp_fp16":
        layout = True
    return torch_decoder_row(env, ctx, batch, kind, precision, layout,
                             graph="cudagraph" in name)


# ------------------------------------------------------------------------------ row execution
def as_numpy(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def memory_snapshot(cuda: bool, collect: bool = False) -> dict[str, int] | None:
    """Free what the last row left (``collect``) and start a peak-memory window (CUDA)."""
    if not cuda:
        return None
    if collect:
        gc.collect()  # CUDA graphs and model copies in reference cycles
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {"allocated": torch.cuda.memory_allocated(), "free": torch.cuda.mem_get_info()[0]}


def memory_used(before: dict[str, int] | None, prepared: Prepared) -> dict[str, Any] | None:
    if before is None:
        return None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before["allocated"] + prepared.resident_bytes
    device_drop = before["free"] - torch.cuda.mem_get_info()[0]
    mib = (peak if prepared.memory == "torch" else device_drop) / 2**20
    return {
        "mib": round(mib, 1),
        "measure": ("torch.cuda.max_memory_allocated during set-up + timing (weights, "
                    "activations, workspace, CUDA-graph pool)" if prepared.memory == "torch"
                    else "drop of free device memory (torch.cuda.mem_get_info) from before the "
                         "session / engine was created to after timing"),
        "torch_peak_allocated_mib": round(peak / 2**20, 1),
        "device_free_drop_mib": round(device_drop / 2**20, 1),
    }


def floor_for(env: Env, variant: Variant, precision: str, ctx: WayContext, batch: int
              ) -> dict[str, Any]:
    """Lower bound on the time of one call: max(FLOPs / matrix peak, device bytes / copy
    bandwidth, host transfer / PCIe bandwidth for end-to-end rows).

    FLOPs: the row's algorithm per frame (the decoder counts the cheaper of the plain and the
    optimised decoder). Bytes: uint8 frame in + uint8 label map out (+ uint8 support images and
    masks for full-model rows) per frame, plus the weights read once per call, at 2 bytes per
    weight for FP16 / BF16 rows and 4 for FP32."""
    size = env.args.size
    work = variant.work
    flops_frame = ctx.flops[work]
    if work == "decoder" and "decoder_optimised" in ctx.flops:
        flops_frame = min(flops_frame, ctx.flops["decoder_optimised"])
    params = ctx.params["naive" if work.startswith("naive") else "model"]
    weight_bytes = params * (2 if precision in ("fp16", "bf16") else 4)
    frame_in, labels_out = size * size * 3, size * size
    io_bytes = batch * (frame_in + labels_out)
    if work in ("full", "naive_full"):
        io_bytes += batch * ctx.way * (frame_in + labels_out)
    copies = env.ceilings["copy_gb_per_s"]
    terms = {
        "compute_ms": flops_frame * batch / (peak_tflops(env.ceilings, precision) * 1e12) * 1e3,
        "memory_ms": (io_bytes + weight_bytes) / (copies["device_to_device"] * 1e9) * 1e3,
    }
    if variant.e2e:
        terms["transfer_ms"] = (batch * frame_in / (copies["host_to_device"] * 1e9)
                                + batch * labels_out / (copies["device_to_host"] * 1e9)) * 1e3
    bound = max(terms, key=terms.get)
    return {"flops_per_frame": flops_frame, "bytes_per_call": io_bytes + weight_bytes,
            **{k: v for k, v in terms.items()}, "floor_ms": terms[bound],
            "bound": bound.replace("_ms", "")}


def refresh_floors(env: Env) -> None:
    """Recompute every floor with the final ceilings."""
    for row in env.rows:
        if measured(row):
            floor = floor_for(env, VARIANT_BY_NAME[row["variant"]], row["precision"],
                              env.contexts[row["way"]], row["batch"])
            floor["fraction"] = floor["floor_ms"] / row["timing"]["median_ms"]
            row["floor"] = floor
    for row in env.supports:
        if measured(row):
            compute_ms = (row["flops"] / (peak_tflops(env.ceilings, row["precision"]) * 1e12)
                          * 1e3)
            row["floor"] = {"floor_ms": compute_ms, "bound": "compute",
                            "fraction": compute_ms / row["timing"]["median_ms"]}


def agreement(variant: Variant, precision: str, labels: np.ndarray, reference: np.ndarray
              ) -> dict[str, Any] | None:
    if variant.work.startswith("naive"):
        return {"applies": False, "note": "a different model (1-way, run N times): its labels "
                                          "are not expected to equal the N-way model's"}
    if labels.shape != reference.shape:
        return {"applies": True, "identical_fraction": 0.0, "threshold": TOLERANCE[precision],
                "passed": False, "note": f"shape {labels.shape} != {reference.shape}"}
    fraction = float((labels == reference).mean())
    return {"applies": True, "identical_fraction": fraction, "threshold": TOLERANCE[precision],
            "passed": fraction >= TOLERANCE[precision],
            "reference": "decode_query, eager FP32 with TF32 off, same frames"}


def skip_reason(env: Env, name: str, cuda_only: bool) -> str | None:
    if not env.selected(name):
        return "not measured: excluded by --variants / --skip-variants"
    if cuda_only and not env.cuda:
        return "not measured: needs CUDA (this run is on the CPU)"
    return None


def short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"failed: {type(error).__name__}" + (f": {text[0][:300]}" if text else "")


def run_row(env: Env, variant: Variant, way: int, batch: int) -> dict[str, Any]:
    precision = resolve_precision(variant, env.cuda)
    row: dict[str, Any] = {"variant": variant.name, "label": variant.label,
                           "group": variant.group, "way": way, "batch": batch,
                           "precision": precision, "end_to_end": variant.e2e}
    ctx = env.contexts.get(way)
    reason = skip_reason(env, variant.name, variant.cuda_only)
    if reason is None and ctx is None:
        reason = "skipped: budget (the model set-up of this N did not run)"
    if reason is None and not env.budget.allows(variant.cost_s):
        reason = "skipped: budget"
    if reason is not None:
        row["status"] = reason
        return row
    before = memory_snapshot(env.cuda)
    prepared: Prepared | None = None
    started = time.perf_counter()
    try:
        prepared = build_row(env, variant, ctx, batch)
        setup_s = time.perf_counter() - started
        cap = min(env.args.max_row_s, max(2.0, env.budget.remaining() / 4))
        timing = time_calls(prepared.call, env.args.warmup, env.args.iterations, env.cuda, cap)
        labels = as_numpy(prepared.call())
        memory = memory_used(before, prepared)
    except NotMeasured as error:
        row["status"] = str(error)
    except Exception as error:  # noqa: BLE001 - one broken row must not end the table
        row["status"] = short_error(error)
        row["traceback"] = traceback.format_exc(limit=8)
    else:
        median = timing["median_ms"]
        floor = floor_for(env, variant, precision, ctx, batch)
        floor["fraction"] = floor["floor_ms"] / median
        row.update(
            status="measured", timing=timing, setup_s=round(setup_s, 2),
            per_frame_ms=median / batch, frames_per_s=1e3 * batch / median,
            floor=floor, memory=memory,
            agreement=agreement(variant, precision, labels, ctx.reference[batch]),
            notes=prepared.notes + (prepared.after() if prepared.after else []),
            **prepared.extra,
        )
    finally:
        if prepared is not None and prepared.close is not None:
            try:
                prepared.close()
            except Exception:  # noqa: BLE001
                pass
        del prepared
        memory_snapshot(env.cuda, collect=True)
    show = (f"{row['timing']['median_ms']:9.3f} ms (p10 {row['timing']['p10_ms']:.3f}, "
            f"p90 {row['timing']['p90_ms']:.3f}, n {row['timing']['n']})"
            if row["status"] == "measured" else row["status"])
    log(f"[{env.budget.elapsed():7.1f} s] N={way} B={batch} {variant.name:<32} {show}")
    return row


def run_support(env: Env, name: str, way: int, shots: int) -> dict[str, Any]:
    """Cost of encoding one support set of N classes x K shots (paid once, then cached)."""
    precision = "fp16" if name == "support_torch_amp_fp16" else (
        "fp32" if name == "support_torch_fp32" or not env.cuda else "fp16")
    row: dict[str, Any] = {"variant": name, "way": way, "shot": shots, "precision": precision}
    ctx = env.contexts.get(way)
    reason = skip_reason(env, name, False)
    if reason is None and name == "support_runtime_ort" and env.ort_reason:
        reason = env.ort_reason
    if reason is None and (ctx is None or not env.budget.allows(5.0)):
        reason = "skipped: budget"
    if reason is not None:
        row["status"] = reason
        return row
    before = memory_snapshot(env.cuda)
    prepared: Prepared | None = None
    try:
        if name == "support_runtime_ort":
            segmenter = runtime_segmenter(env, ctx, 0)
            prepared = Prepared(runtime_support(segmenter, ctx, shots), memory="device",
                                notes=[f"{segmenter.backend_name} {segmenter.precision}"],
                                close=segmenter.close)
        else:
            model = model_copy(ctx.model)
            if shots > 1:  # A_S as a K-shot model has it (a 1-shot model only averages)
                model.support_attention = RelationalSupportAttention(
                    ctx.config.model.channels, ctx.config.model.relation_heads
                ).to(env.device).eval().requires_grad_(False)
            images = ctx.data["support_images"][:, :shots].contiguous()
            masks = ctx.data["support_masks"][:, :shots].contiguous()
            fn = no_grad(with_autocast(lambda: model.encode_support(images, masks).prototypes,
                                       env.device, precision))
            prepared = Prepared(fn, notes=["A_S included" if shots > 1 else "K = 1: no A_S"])
        iterations = max(3, env.args.iterations // 5)
        timing = time_calls(prepared.call, 2, iterations, env.cuda,
                            min(env.args.max_row_s, max(2.0, env.budget.remaining() / 8)))
        memory = memory_used(before, prepared)
    except NotMeasured as error:
        row["status"] = str(error)
    except Exception as error:  # noqa: BLE001
        row["status"] = short_error(error)
        row["traceback"] = traceback.format_exc(limit=8)
    else:
        flops = ctx.flops["support_shot"] * way * shots
        compute_ms = flops / (peak_tflops(env.ceilings, precision) * 1e12) * 1e3
        row.update(status="measured", timing=timing, memory=memory, notes=prepared.notes,
                   flops=flops, floor={"floor_ms": compute_ms, "bound": "compute",
                                       "fraction": compute_ms / timing["median_ms"]})
    finally:
        if prepared is not None and prepared.close is not None:
            try:
                prepared.close()
            except Exception:  # noqa: BLE001
                pass
        del prepared
        memory_snapshot(env.cuda, collect=True)
    show = (f"{row['timing']['median_ms']:9.3f} ms" if row["status"] == "measured"
            else row["status"])
    log(f"[{env.budget.elapsed():7.1f} s] N={way} K={shots} {name:<32} {show}")
    return row


# --------------------------------------------------------------------------- results & report
NAIVE_PAIRS = (("decoder_cudagraph_fp16", "naive_decoder_cudagraph_fp16"),
               ("decoder_eager_fp32", "naive_decoder_eager_fp32"),
               ("full_eager_fp32", "naive_full_eager_fp32"))


def measured(row: dict | None) -> bool:
    return row is not None and row.get("status") == "measured"


def add_ratios(rows: list[dict]) -> list[dict]:
    """Speed-up over the eager full model (same N, B) and multi-way vs naive (same config)."""
    index = {(r["variant"], r["way"], r["batch"]): r for r in rows}
    for row in rows:
        full = index.get(("full_eager_fp32", row["way"], row["batch"]))
        if measured(row) and measured(full):
            row["speedup_vs_full_eager"] = full["timing"]["median_ms"] / row["timing"]["median_ms"]
    comparisons = []
    for multi_name, naive_name in NAIVE_PAIRS:
        for row in rows:
            if row["variant"] != multi_name:
                continue
            naive = index.get((naive_name, row["way"], row["batch"]))
            if measured(row) and measured(naive):
                ratio = naive["timing"]["median_ms"] / row["timing"]["median_ms"]
                row["multiway_vs_naive"] = ratio
                comparisons.append({"multi_way": multi_name, "naive": naive_name,
                                    "way": row["way"], "batch": row["batch"],
                                    "multi_way_ms": row["timing"]["median_ms"],
                                    "naive_ms": naive["timing"]["median_ms"], "ratio": ratio})
    return comparisons


def _best(rows: list[dict], way: int, batch: int, accept: Callable[[dict], bool]
          ) -> dict | None:
    candidates = [r for r in rows if measured(r) and r["way"] == way and r["batch"] == batch
                  and accept(r)]
    return min(candidates, key=lambda r: r["timing"]["median_ms"], default=None)


def evaluate_targets(rows: list[dict], info: dict[str, Any], ways: list[int]) -> list[dict]:
    """DESIGN.md section 6, on one H100, 473 x 473, 2-way, prototypes cached, batch 1."""
    gpu = info.get("gpu")
    where = gpu or f"the CPU ({info.get('cpu')})"
    on_gpu = gpu is not None
    decoder = lambda r: (r["group"] in ("torch decoder", "torch optimised", "onnxruntime",  # noqa: E731
                                        "tensorrt"))
    fp16_decoder = lambda r: decoder(r) and r["precision"] == "fp16"  # noqa: E731
    e2e = lambda r: r["group"] == "end to end"  # noqa: E731
    index = {(r["variant"], r["way"], r["batch"]): r for r in rows}
    targets = []

    def add(name: str, required: str, value: float | None, unit: str, ok: bool | None,
            row: dict | None, note: str = "", missing: str = "") -> None:
        if value is None:
            status = f"not measured: {missing or 'no row of this kind was measured'}"
        elif not on_gpu:
            status = f"not measured: the target is for an {TARGET_DEVICE}; this run is on {where}"
        else:
            status = "met" if ok else "not met"
            if TARGET_DEVICE not in (gpu or ""):
                note = (note + "; " if note else "") + f"measured on {gpu}, target set for H100"
        targets.append({"target": name, "required": required, "value": value, "unit": unit,
                        "status": status, "row": row["variant"] if row else None,
                        "note": note})

    best = _best(rows, 2, 1, fp16_decoder)
    add("query decoder GPU time, FP16, N=2, batch 1", "<= 1.5 ms",
        best["timing"]["median_ms"] if best else None, "ms",
        best is not None and best["timing"]["median_ms"] <= 1.5, best,
        "fastest FP16 decoder row (frames already on the device)")
    best_e2e = _best(rows, 2, 1, e2e)
    add("end to end, uint8 frame in host memory -> label map in host memory, N=2, batch 1",
        "<= 3 ms", best_e2e["timing"]["median_ms"] if best_e2e else None, "ms",
        best_e2e is not None and best_e2e["timing"]["median_ms"] <= 3.0, best_e2e)
    best8 = _best(rows, 2, 8, lambda r: decoder(r) or e2e(r))
    add("throughput at batch 8, N=2", ">= 2000 frames/s",
        best8["frames_per_s"] if best8 else None, "frames/s",
        best8 is not None and best8["frames_per_s"] >= 2000, best8,
        "fastest decoder or end-to-end row at batch 8",
        missing="no batch-8 row at N=2 was measured")
    full = index.get(("full_eager_fp32", 2, 1))
    fast = best_e2e or best
    value = (full["timing"]["median_ms"] / fast["timing"]["median_ms"]
             if measured(full) and fast else None)
    add("speed-up per frame over the PyTorch eager FP32 full model, N=2, batch 1", ">= 15x",
        value, "x", value is not None and value >= 15, fast,
        "full model time / fastest end-to-end row (the full model's frames are already on the "
        "device, so this is conservative)" if best_e2e else
        "full model time / fastest decoder row (no end-to-end row was measured)")
    for way, required in ((2, 1.8), (5, 4.0)):
        pair = None
        for multi_name, naive_name in NAIVE_PAIRS[:2]:
            multi = index.get((multi_name, way, 1))
            if measured(multi) and "multiway_vs_naive" in multi:
                pair = multi
                break
        add(f"multi-way decoding vs naive N x 1-way, N={way}, batch 1", f">= {required}x",
            pair["multiway_vs_naive"] if pair else None, "x",
            pair is not None and pair["multiway_vs_naive"] >= required, pair,
            "same configuration on both sides" if pair else "",
            missing=("N=5 not in --ways" if way not in ways else ""))
    return targets


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    status = row["status"]
    if status == "measured":
        return f"{row['timing']['median_ms']:.3f}"
    if status.startswith("skipped"):
        return "skip"
    if status.startswith("failed"):
        return "fail"
    return "n/m"


def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:{spec}}{suffix}"


def render_markdown(payload: dict[str, Any], detail_ways: list[int] | None = None) -> str:
    info, settings, ceilings = payload["device"], payload["settings"], payload["ceilings"]
    rows = payload["rows"]
    ways, batches = settings["ways"], settings["batches"]
    where = info.get("gpu") or f"CPU: {info['cpu']} ({info['cpu_count']} cores)"
    versions_line = ", ".join(f"{k} {v}" for k, v in payload["versions"].items()
                              if k in ("torch", "torch_cuda", "onnxruntime", "onnxruntime-gpu",
                                       "onnx", "tensorrt", "python"))
    if info.get("driver"):
        versions_line += f", driver {info['driver']}"
    rates = ceilings["matmul_tflops"]
    copies = ceilings["copy_gb_per_s"]
    lines = [] if payload.get("complete", True) else [
        f"**Incomplete run** (stopped after {payload.get('elapsed_s')} s): rows missing from "
        "the tables did not run.", ""]
    lines += [
        f"Measured {payload['date']} on **{where}** (`--device {info['device']}`), "
        f"{settings['size']} x {settings['size']}, backbone {settings['backbone']}, "
        f"C = {settings['channels']}, K = 1; {versions_line}.",
        f"Model: {payload['model']['weights']}",
        f"Timing: {payload['timing']}",
        "Ceilings measured in the same run: matrix products "
        + ", ".join(f"{k} {_fmt(v, '.3g')} TFLOP/s" for k, v in rates.items())
        + "; copies " + ", ".join(f"{k.replace('_', ' ')} {_fmt(v, '.3g')} GB/s"
                                  for k, v in copies.items()) + ".",
        "",
        "**Targets** (DESIGN.md section 6: H100, 473 x 473, N = 2, cached prototypes)",
        "",
        "| target | required | measured | status | row |",
        "|---|---|---:|---|---|",
    ]
    for t in payload["targets"]:
        value = _fmt(t["value"], ".3f" if t["unit"] == "ms" else ".1f", f" {t['unit']}")
        lines.append(f"| {t['target']} | {t['required']} | {value} | {t['status']} | "
                     f"{t['row'] or '-'} |")
    index = {(r["variant"], r["way"], r["batch"]): r for r in rows}
    columns = [(w, b) for b in batches for w in ways]
    lines += ["", "**Latency per call, median ms** (n/m = not measured, skip = budget, "
              "fail = failed: reasons below and in the JSON)", "",
              "| row | " + " | ".join(f"N={w} B={b}" for w, b in columns) + " |",
              "|---|" + "---:|" * len(columns)]
    for variant in VARIANTS:
        cells = [_cell(index.get((variant.name, w, b))) for w, b in columns]
        lines.append(f"| `{variant.name}` {variant.label} | " + " | ".join(cells) + " |")
    detail_ways = ways if detail_ways is None else [w for w in detail_ways if w in ways]
    for way in detail_ways:
        lines += ["", f"**Details, N = {way}** (vs full = speed-up over `full_eager_fp32` of "
                  "the same N and B; vs naive = multi-way over naive N x 1-way in the same "
                  "configuration; floor = floor time / measured; agree = labels identical to "
                  "FP32 eager decode_query)", "",
                  "| row | B | median ms | p10 | p90 | frames/s | vs full | vs naive | floor "
                  "| bound | agree | GPU MiB | notes |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
        for variant in VARIANTS:
            for batch in batches:
                row = index.get((variant.name, way, batch))
                if not measured(row):
                    continue
                t = row["timing"]
                agree = row.get("agreement") or {}
                agree_text = (f"{100 * agree['identical_fraction']:.2f} %"
                              + ("" if agree["passed"] else " (below tol.)")
                              if agree.get("applies") else "n/a")
                memory = row.get("memory") or {}
                lines.append(
                    f"| `{variant.name}` | {batch} | {t['median_ms']:.3f} | {t['p10_ms']:.3f} | "
                    f"{t['p90_ms']:.3f} | {row['frames_per_s']:.1f} | "
                    f"{_fmt(row.get('speedup_vs_full_eager'), '.2f', 'x')} | "
                    f"{_fmt(row.get('multiway_vs_naive'), '.2f', 'x')} | "
                    f"{100 * row['floor']['fraction']:.1f} % | {row['floor']['bound']} | "
                    f"{agree_text} | {_fmt(memory.get('mib'), '.0f')} | "
                    f"{'; '.join(row.get('notes') or [])} |")
    if payload["comparisons"]:
        lines += ["", "**Multi-way vs naive N x 1-way** (naive time / multi-way time)", "",
                  "| configuration | N | B | multi-way ms | naive ms | ratio |",
                  "|---|---:|---:|---:|---:|---:|"]
        for c in payload["comparisons"]:
            lines.append(f"| `{c['multi_way']}` vs `{c['naive']}` | {c['way']} | {c['batch']} | "
                         f"{c['multi_way_ms']:.3f} | {c['naive_ms']:.3f} | {c['ratio']:.2f}x |")
    support = payload["support_encoding"]
    if support:
        lines += ["", "**Support-set encoding, once per support set** (N classes x K shots)", "",
                  "| encoder | N | K | precision | median ms | p10 | p90 | GPU MiB | status |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---|"]
        for s in support:
            if measured(s):
                t = s["timing"]
                lines.append(f"| `{s['variant']}` | {s['way']} | {s['shot']} | {s['precision']} | "
                             f"{t['median_ms']:.2f} | {t['p10_ms']:.2f} | {t['p90_ms']:.2f} | "
                             f"{_fmt((s.get('memory') or {}).get('mib'), '.0f')} | measured |")
            else:
                lines.append(f"| `{s['variant']}` | {s['way']} | {s['shot']} | {s['precision']} "
                             f"| - | - | - | - | {s['status']} |")
    reasons: dict[str, list[str]] = {}
    for row in rows:
        if not measured(row):
            reasons.setdefault(row["status"], []).append(
                f"{row['variant']} (N={row['way']}, B={row['batch']})")
    if reasons:
        lines += ["", "**Rows not measured**", ""]
        for status, which in reasons.items():
            names = sorted({w.split(" (")[0] for w in which})
            lines.append(f"- {status}: {', '.join(f'`{n}`' for n in names)}")
    failed_agreement = [r for r in rows if measured(r) and (r.get("agreement") or {}).get(
        "applies") and not r["agreement"]["passed"]]
    lines += ["", "Label agreement tolerance: "
              + ", ".join(f"{k} >= {100 * v:.1f} %" for k, v in TOLERANCE.items())
              + " of pixels identical to the FP32 eager decode_query on the same frames; "
              + (f"{len(failed_agreement)} measured rows below it: "
                 + ", ".join(f"`{r['variant']}` N={r['way']} B={r['batch']} "
                             f"({100 * r['agreement']['identical_fraction']:.2f} %)"
                             for r in failed_agreement)
                 if failed_agreement else "every measured row meets it") + "."]
    return "\n".join(lines) + "\n"


def render_chart(payload: dict[str, Any], path: Path) -> str | None:
    """Latency vs N per row at batch 1 (log scale). Returns an error text or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"no chart: matplotlib is not installed ({error})"
    rows = payload["rows"]
    ways = payload["settings"]["ways"]
    batch = 1 if 1 in payload["settings"]["batches"] else payload["settings"]["batches"][0]
    figure, axes = plt.subplots(figsize=(11, 6.5))
    colours = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    markers = "os^vD<>ph*"
    drawn = 0
    for variant in VARIANTS:
        points = [(r["way"], r["timing"]["median_ms"]) for r in rows
                  if r["variant"] == variant.name and r["batch"] == batch and measured(r)]
        if not points:
            continue
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points],
                  marker=markers[drawn % len(markers)], color=colours[drawn % len(colours)],
                  linestyle="--" if variant.group == "naive N x 1-way" else "-",
                  label=variant.name)
        drawn += 1
    axes.set_yscale("log")
    axes.set_xticks(ways)
    axes.set_xlabel("N (ways)")
    axes.set_ylabel(f"median latency per call, batch {batch} (ms, log scale)")
    info = payload["device"]
    axes.set_title(f"MFNet inference, {info.get('gpu') or 'CPU'}, "
                   f"{payload['settings']['size']}x{payload['settings']['size']}, "
                   f"{payload['settings']['backbone']}")
    axes.grid(True, which="both", alpha=0.3)
    if drawn:
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def update_readme(markdown: str, device: str, readme: Path = README) -> bool:
    """Replace the block between the bench_inference markers of ``device`` in the README."""
    begin, end = f"<!-- bench_inference:{device}:begin -->", f"<!-- bench_inference:{device}:end -->"
    if not readme.is_file():
        return False
    text = readme.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{markdown}{end}{tail}")
    return True


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", type=int, default=473, help="square input size (default 473)")
    parser.add_argument("--backbone", choices=["resnet50", "small"], default="resnet50")
    parser.add_argument("--channels", type=int, default=None,
                        help="feature channels C (default 256 for resnet50, 64 for small)")
    parser.add_argument("--ways", default="1,2,5", help="comma-separated N (default 1,2,5)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: "
                        "20 on CUDA, 3 on the CPU)")
    parser.add_argument("--iterations", type=int, default=None, help="timed calls per row "
                        "(default: 100 on CUDA, 20 on the CPU; capped by --max-row-s)")
    parser.add_argument("--max-row-s", type=float, default=20.0,
                        help="longest timed loop of one row in seconds (at least 5 calls)")
    parser.add_argument("--variants", default="", help="comma-separated fnmatch patterns of "
                        "the rows to run (default all), e.g. 'decoder_*,ort_*'; support "
                        "encoding rows are support_torch_fp32, support_torch_amp_fp16, "
                        "support_runtime_ort")
    parser.add_argument("--skip-variants", default="", help="patterns of rows not to run")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--engine-cache", default=str(Path(tempfile.gettempdir())
                                                      / "mfnet_bench_engines"),
                        help="folder for the checkpoints and ONNX exports (reused across runs)")
    parser.add_argument("--onnx-ways", default=None, help="N for which the ONNX Runtime, "
                        "TensorRT and runtime rows run (they need an ONNX export each; default: "
                        "all of --ways)")
    parser.add_argument("--onnx-precisions", default="fp32,fp16", help="ONNX graphs to export "
                        "(default fp32,fp16)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch and of "
                        "the ONNX Runtime CPU sessions (default: the cores free to this "
                        "process, its CPU affinity; see mfnet_runtime.threads)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="stop starting new "
                        "rows after this many seconds; the rest are recorded as 'skipped: "
                        "budget' (torch.compile rows and ONNX exports run last)")
    parser.add_argument("--name", default=None, help="result file stem (default "
                        "inference_<device>_<size>)")
    parser.add_argument("--from-json", default=None, help="run nothing: re-render the .md, "
                        ".png (and with --update-readme the README block) from a result JSON, "
                        "e.g. one brought back from the GPU machine")
    parser.add_argument("--update-readme", action="store_true", help="also replace the "
                        "results block of this device in benchmarks/README.md")
    args = parser.parse_args(argv)
    args.way_list = [int(w) for w in args.ways.split(",") if w.strip()]
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    args.variant_patterns = [p.strip() for p in args.variants.split(",") if p.strip()]
    args.skip_patterns = [p.strip() for p in args.skip_variants.split(",") if p.strip()]
    args.onnx_way_list = (args.way_list if args.onnx_ways is None
                          else [int(w) for w in args.onnx_ways.split(",") if w.strip()])
    args.onnx_precision_list = [p.strip() for p in args.onnx_precisions.split(",") if p.strip()]
    if any(p not in ("fp32", "fp16") for p in args.onnx_precision_list):
        parser.error("--onnx-precisions takes fp32 and / or fp16")
    cuda = args.device == "cuda"
    if args.channels is None:
        args.channels = 64 if args.backbone == "small" else 256
    if args.warmup is None:
        args.warmup = 20 if cuda else 3
    if args.iterations is None:
        args.iterations = 100 if cuda else 20
    if not args.way_list or min(args.way_list) < 1 or not args.batch_list \
            or min(args.batch_list) < 1:
        parser.error("--ways and --batches need positive integers")
    return args


def task_plan(env: Env) -> list[tuple[str, Callable[[], None]]]:
    """Every task in the order it runs, most valuable first, so that a time budget cuts the
    least useful rows: N = 2 (the targets' N) torch rows, then its ONNX Runtime / TensorRT rows
    (an export first), then the torch rows of the other N (largest first: N = 5 has a target),
    their ONNX rows, and torch.compile rows last (each compiles for minutes on a CPU, about a
    minute on a GPU)."""
    args = env.args
    primary = 2 if 2 in args.way_list else args.way_list[0]
    others = sorted((w for w in args.way_list if w != primary), reverse=True)
    order = ([(primary, 1), (primary, 2)] + [(w, 1) for w in others] + [(w, 2) for w in others]
             + [(w, 3) for w in [primary] + others])
    plan: list[tuple[str, Callable[[], None]]] = []
    for way, phase in order:
        if phase == 1:
            plan.append(("setup", lambda way=way: set_up(env, way)))
        for batch in args.batch_list:
            for variant in VARIANTS:
                if variant.phase == phase:
                    plan.append(("row", lambda v=variant, w=way, b=batch: env.rows.append(
                        run_row(env, v, w, b))))
            if phase == 3:
                plan.append(("cleanup", lambda w=way, b=batch: [
                    env.compiled.pop((w, b, k), None) for k in ("plain", "opt", "naive")]))
        if phase in (1, 2):
            for name in SUPPORT_VARIANTS:
                if (name == "support_runtime_ort") == (phase == 2):
                    for shots in SUPPORT_SHOTS:
                        plan.append(("support", lambda n=name, w=way, k=shots:
                                     env.supports.append(run_support(env, n, w, k))))
    return plan


def set_up(env: Env, way: int) -> None:
    if not env.budget.allows(10.0):
        log(f"[{env.budget.elapsed():7.1f} s] N={way}: set-up skipped (budget)")
        return
    started = time.perf_counter()
    if env.naive is None:
        naive_data = synthetic_data(1, env.args.size, env.args.backbone,
                                    max(env.args.batch_list), 1, env.device, seed=1001)
        env.naive, _ = build_model(env.args, 1, env.device, naive_data, seed=1)
    naive = env.naive
    env.contexts[way] = set_up_way(env.args, way, env.device, naive,
                                   lambda images, masks: naive.encode_support(images, masks))
    log(f"[{env.budget.elapsed():7.1f} s] N={way}: model, data, FP32 reference and FLOPs "
        f"ready in {time.perf_counter() - started:.1f} s "
        f"(decoder {env.contexts[way].flops['decoder'] / 1e9:.2f} GFLOP/frame)")


def write_reports(payload: dict[str, Any], out: Path, stem: str, update: bool) -> None:
    """The chart, the markdown file and (``update``) the README block of this device."""
    out.mkdir(parents=True, exist_ok=True)
    chart_error = render_chart(payload, out / f"{stem}.png")
    if chart_error:
        payload["chart"] = chart_error
    device = payload["device"]["device"]
    full_md = render_markdown(payload)
    (out / f"{stem}.md").write_text(f"# MFNet inference benchmark ({device})\n\n{full_md}")
    if update:
        ways = payload["settings"]["ways"]
        section = render_markdown(payload, detail_ways=[2] if 2 in ways else ways[:1])
        section += (f"\nFull table: `benchmarks/results/{stem}.md`, JSON: `{stem}.json`, chart: "
                    f"`{stem}.png`.\n")
        done = update_readme(section, device)
        log("updated benchmarks/README.md" if done else
            f"benchmarks/README.md has no bench_inference:{device} markers: not updated")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        source = Path(args.from_json)
        payload = json.loads(source.read_text())
        out = Path(args.out) if args.out != str(RESULTS) or source.parent == RESULTS \
            else source.parent
        write_reports(payload, out, args.name or source.stem, args.update_readme)
        log(f"re-rendered {source.stem}.md / .png in {out}")
        return 0
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU; run with --device cpu",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    from mfnet.threads import set_torch_threads

    policy = set_torch_threads(args.threads)
    args.threads = policy.threads  # torch, the ONNX Runtime sessions and the runtime rows
    log(policy.describe())
    if cuda:
        torch.backends.cudnn.benchmark = True
    env = Env(args, device, Budget(args.time_budget_s))
    info = device_info(args.device)
    log(f"bench_inference: {info.get('gpu') or info['cpu']}, {args.size}x{args.size}, "
        f"{args.backbone}, C={args.channels}, N={args.way_list}, B={args.batch_list}, "
        f"budget {args.time_budget_s or 'none'} s")
    env.ceilings = measure_ceilings(device)
    log(f"[{env.budget.elapsed():7.1f} s] ceilings: "
        + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in env.ceilings["matmul_tflops"].items())
        + "; " + ", ".join(f"{k} {v:.3g} GB/s"
                           for k, v in env.ceilings["copy_gb_per_s"].items()))
    env.fast_cls, env.fast_reason = fast_decoder_class()
    env.ort_reason = check_onnxruntime(cuda)
    env.trt_reason = (check_tensorrt() if cuda else
                      "not measured: TensorRT needs a CUDA GPU (this run is on the CPU)")
    out = Path(args.out)
    stem = args.name or f"inference_{args.device}_{args.size}"
    command = " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))
    last_write = time.perf_counter()
    for _, task in task_plan(env):
        task()
        if time.perf_counter() - last_write > 30:  # a partial JSON survives a killed run
            write_json(out / f"{stem}.json", build_payload(env, info, command, complete=False))
            last_write = time.perf_counter()
    merge_ceilings(env.ceilings, measure_ceilings(device))
    refresh_floors(env)
    payload = build_payload(env, info, command, complete=True)
    write_reports(payload, out, stem, args.update_readme)
    write_json(out / f"{stem}.json", payload)
    rows = payload["rows"]
    measured_rows = sum(measured(r) for r in rows)
    log(f"\n{measured_rows} of {len(rows)} rows measured in {payload['elapsed_s']} s")
    for target in payload["targets"]:
        value = _fmt(target["value"], ".3f", f" {target['unit']}")
        log(f"  target {target['target']}: {value} ({target['required']}): {target['status']}")
    log(f"wrote {out / (stem + '.json')}, .md, .png")
    return 0


def build_payload(env: Env, info: dict[str, Any], command: str, complete: bool
                  ) -> dict[str, Any]:
    args, cuda = env.args, env.cuda
    rows, supports = env.rows, env.supports
    comparisons = add_ratios(rows)
    payload: dict[str, Any] = {
        "benchmark": "bench_inference",
        "date": now_utc(),
        "command": command,
        "complete": complete,
        "device": info,
        "versions": versions(),
        "settings": {
            "size": args.size, "backbone": args.backbone, "channels": args.channels,
            "ways": args.way_list, "batches": args.batch_list, "shot": 1,
            "support_shots": list(SUPPORT_SHOTS), "warmup": args.warmup,
            "iterations": args.iterations, "max_row_s": args.max_row_s,
            "variants": args.variant_patterns, "skip_variants": args.skip_patterns,
            "time_budget_s": args.time_budget_s, "threads": args.threads,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if cuda else None,
            "tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                     "matmul": torch.backends.cuda.matmul.allow_tf32} if cuda else None,
        },
        "model": {
            "weights": ("weights='none': random initialisation (no weights can be downloaded "
                        "on these machines), BatchNorm statistics re-estimated and the classifier "
                        "standardised on synthetic frames so that labels vary; timing only, the "
                        "labels mean nothing."),
            "per_way": {
                str(way): {
                    "config": ctx.config.to_dict()["model"],
                    "parameters": ctx.params,
                    "flops_per_frame": {k: v for k, v in ctx.flops.items()},
                    "onnx_export": {"directory": str(ctx.engines) if ctx.engines else None,
                                    "seconds": ctx.export_s, "error": ctx.engines_error,
                                    "options": export_options(),
                                    "precisions": args.onnx_precision_list},
                } for way, ctx in sorted(env.contexts.items())
            },
        },
        "timing": ("CUDA events around each call after warm-up, synchronised before each call "
                   "(median, p10, p90 over n calls; host time also kept)" if cuda else
                   "time.perf_counter around each call after warm-up (median, p10, p90 over "
                   "n calls)") + "; the same input buffers every call (weights dominate the "
                   "bytes moved, inputs are not rotated)",
        "ceilings": env.ceilings,
        "availability": {
            "fast_decoder": env.fast_reason or "available",
            "onnxruntime": env.ort_reason or "available",
            "tensorrt": env.trt_reason or "available",
        },
        "tolerance": {"label_agreement": TOLERANCE,
                      "meaning": "fraction of pixels whose label equals that of the FP32 eager "
                                 "decode_query (TF32 off) on the same frames"},
        "rows": rows,
        "support_encoding": supports,
        "comparisons": comparisons,
    }
    payload["targets"] = evaluate_targets(rows, info, args.way_list)
    payload["elapsed_s"] = round(env.budget.elapsed(), 1)
    return payload


if __name__ == "__main__":
    raise SystemExit(main())
