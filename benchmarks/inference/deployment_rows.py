"""The deployment rows: the exported graphs on ONNX Runtime (IOBinding, CUDA graphs), TensorRT
engines and the torch-free runtime's ``Segmenter`` (end to end and support encoding); the ONNX
export they share (cached per N) and the availability checks of the optional third-party
packages (onnxruntime's GPU provider, tensorrt), whose reasons the rows record."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfnet.checkpoint import save_checkpoint
from mfnet.export.onnx_export import ExportLimits, export_onnx
from mfnet.export.tensorrt import build_engines
from mfnet_runtime import Segmenter
from mfnet_runtime.backends.feeds import decoder_prototypes
from mfnet_runtime.manifest import read_manifest

from .context import Env, NotMeasured, Prepared, progress
from .workload import WayContext

# Keyword arguments of export_onnx this run uses (recorded in the JSON): the optimised decoder.
EXPORT_OPTIONS: dict[str, Any] = {"optimize": True}


def check_onnxruntime(cuda: bool) -> str | None:
    """None when ONNX Runtime can run the rows on this device, else the reason (``onnxruntime``
    is an optional package; on CUDA it needs the GPU build's CUDAExecutionProvider)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        return f"not measured: onnxruntime is not installed ({error})"
    if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            "not measured: onnxruntime-gpu not installed (ONNX Runtime "
            f"{ort.__version__} has only {', '.join(ort.get_available_providers())})"
        )
    if cuda and hasattr(ort, "preload_dlls"):  # not in older ONNX Runtime releases
        try:  # CUDA / cuDNN libraries from the nvidia-* wheels that torch brought
            ort.preload_dlls()
        except Exception as error:  # noqa: BLE001 - torch has loaded them already
            progress(f"  onnxruntime.preload_dlls: {error}")
    return None


def check_tensorrt() -> str | None:
    """None when the optional ``tensorrt`` package imports, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "not measured: TensorRT not installed"
    except Exception as error:  # noqa: BLE001 - a broken install is a reason too
        return f"not measured: TensorRT cannot be imported ({type(error).__name__}: {error})"
    return None


def ensure_engines(env: Env, ctx: WayContext) -> Path:
    """Export the model of this N to ONNX (FP32 + FP16 graphs, export_onnx) into the engine
    cache, keyed by the SHA-256 of the checkpoint, and reuse a finished export."""
    if ctx.way not in env.args.onnx_way_list:
        raise NotMeasured(f"not measured: N={ctx.way} not in --onnx-ways")
    if ctx.engines is not None:
        return ctx.engines
    if ctx.engines_error is not None:
        raise NotMeasured(ctx.engines_error)
    cache = Path(env.args.engine_cache)
    cache.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in ctx.model.state_dict().items()}
    staging = cache / f"staging-{ctx.way}way.pt"
    save_checkpoint(staging, {"config": ctx.config.to_dict(), "model": state})
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:16]
    # part of the cache key: the decoder form and its prototypes form (per frame since v1.1)
    form = ("default" if EXPORT_OPTIONS["optimize"] else "plain") + "-pf"
    tag = (
        f"{env.args.backbone}-{env.args.size}-c{env.args.channels}-{ctx.way}way-{form}-"
        f"{'-'.join(env.args.onnx_precision_list)}-{digest}"
    )
    directory = cache / tag
    checkpoint = cache / f"{tag}.pt"
    staging.replace(checkpoint)
    started = time.perf_counter()
    if not (directory / "manifest.json").is_file():
        limits = ExportLimits(max_batch=max(16, max(env.args.batch_list)))
        progress(f"  exporting ONNX graphs of the {ctx.way}-way model to {directory}")
        try:
            export_onnx(
                checkpoint,
                directory,
                precisions=tuple(env.args.onnx_precision_list),
                limits=limits,
                verify=False,
                **EXPORT_OPTIONS,
            )
        except Exception as error:  # noqa: BLE001 - recorded on every ONNX row
            ctx.engines_error = f"failed: ONNX export ({type(error).__name__}: {error})"
            raise
    ctx.export_s = time.perf_counter() - started
    ctx.engines = directory
    return directory


def ort_session(path: Path, cuda: bool, cuda_graph: bool, threads: int | None = None):
    """An ONNX Runtime session of the graph ``path``: all graph optimisations, the CUDA provider
    (device 0, with ORT's CUDA graphs if ``cuda_graph``) or the CPU provider with ``threads``."""
    import onnxruntime as ort  # optional: check_onnxruntime has found it

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
        raise RuntimeError(
            f"ONNX Runtime did not use CUDA for {path.name}: {session.get_providers()}"
        )
    return session


def ort_row(env: Env, ctx: WayContext, batch: int, precision: str, cuda_graph: bool) -> Prepared:
    """The exported query decoder on ONNX Runtime with IOBinding.

    Inputs: frames uint8 [B, S, S, 3], prototypes float32 [B, N, C] (one support set tiled; [N, C]
    for a schema-v1.0 export); outputs: labels uint8
    [B, S, S] (and probabilities float32 [B, N+1, S, S]). CUDA: frames and prototypes live in
    device buffers bound once; the labels are bound to a device buffer (and, with CUDA graphs,
    the probabilities too: replay needs every output at a fixed address). CPU: the CPU provider
    with host buffers."""
    if env.ort_reason:
        raise NotMeasured(env.ort_reason)
    if precision not in env.args.onnx_precision_list:
        raise NotMeasured(f"not measured: {precision} graphs not exported (--onnx-precisions)")
    engines = ensure_engines(env, ctx)
    session = ort_session(
        engines / f"query_decoder.{precision}.onnx", env.cuda, cuda_graph, env.args.threads
    )
    size, way = env.args.size, ctx.way
    frames = np.ascontiguousarray(ctx.data["frames_np"][:batch])
    decoder = read_manifest(engines).graph_set(precision, "onnx")
    form = decoder["query_decoder"].prototypes_form if decoder else "per_frame"
    prototypes = decoder_prototypes(
        np.ascontiguousarray(ctx.prototypes[0].float().cpu().numpy()), batch, str(form)
    )
    binding = session.io_binding()
    if not env.cuda:
        binding.bind_cpu_input("frames", frames)
        binding.bind_cpu_input("prototypes", prototypes)
        binding.bind_output("labels")

        def call_cpu(_keep=(session, frames, prototypes)) -> np.ndarray:
            """One run on the bound host buffers; the labels copied out."""
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]

        return Prepared(call_cpu, memory="device")
    device_frames = torch.from_numpy(frames).to(env.device)
    device_prototypes = torch.from_numpy(prototypes).to(env.device)
    labels = torch.empty((batch, size, size), dtype=torch.uint8, device=env.device)
    buffers = [device_frames, device_prototypes, labels]

    def bind(kind: str, name: str, tensor: torch.Tensor, dtype: type) -> None:
        """Bind the device tensor ``tensor`` as input / output ``name`` of the session."""
        getattr(binding, kind)(name, "cuda", 0, dtype, tuple(tensor.shape), tensor.data_ptr())

    bind("bind_input", "frames", device_frames, np.uint8)
    bind("bind_input", "prototypes", device_prototypes, np.float32)
    bind("bind_output", "labels", labels, np.uint8)
    if cuda_graph:
        probabilities = torch.empty(
            (batch, way + 1, size, size), dtype=torch.float32, device=env.device
        )
        buffers.append(probabilities)
        bind("bind_output", "probabilities", probabilities, np.float32)
    torch.cuda.synchronize()

    def call(_keep=(session, buffers)) -> torch.Tensor:  # the binding holds raw pointers
        """One run on the bound device buffers; labels stay on the device."""
        session.run_with_iobinding(binding)
        torch.cuda.synchronize()  # ORT runs on its own stream
        return labels

    return Prepared(call, memory="device")


def runtime_segmenter(
    env: Env,
    ctx: WayContext,
    batch: int,
    backend: str = "onnxruntime",
    precision: str | None = None,
) -> Segmenter:
    """The runtime's ``Segmenter`` on this N's export (FP16 on CUDA, FP32 on the CPU by default),
    with a decoder CUDA graph for ``batch`` frames on CUDA."""
    precision = precision or ("fp16" if env.cuda else "fp32")
    if precision not in env.args.onnx_precision_list:
        raise NotMeasured(f"not measured: {precision} graphs not exported (--onnx-precisions)")
    engines = ensure_engines(env, ctx)
    return Segmenter.load(
        engines,
        backend=backend,
        device="cuda" if env.cuda else "cpu",
        precision=precision,
        cuda_graph_batch=batch if env.cuda else 0,
        threads=env.args.threads,
    )


def runtime_support(segmenter: Segmenter, ctx: WayContext, shots: int) -> Callable[[], Any]:
    """A call that encodes N classes x ``shots`` host uint8 shots with ``segmenter``."""
    classes = {
        f"class{n}": [
            (ctx.data["support_np"][n, k], ctx.data["masks_np"][n, k]) for k in range(shots)
        ]
        for n in range(ctx.way)
    }
    return lambda: segmenter.encode_support(classes)


def e2e_runtime_row(env: Env, ctx: WayContext, batch: int) -> Prepared:
    """uint8 frames [S, S, 3] in host memory -> label maps [S, S] in host memory through
    ``Segmenter`` (``segment``, or ``segment_batch`` for B > 1), stacked to [B, S, S]."""
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

    def after() -> list[str]:
        """Whether the runtime kept its CUDA graph (it drops it, with a warning, if it fails)."""
        if not env.cuda:
            return []
        # The ONNX Runtime backend's decoder graph; the runtime has no public accessor for it.
        graph = segmenter._backend._graph_decoder
        return [f"CUDA graph at batch {batch}: {'in use' if graph is not None else 'not in use'}"]

    return Prepared(call, memory="device", notes=notes, close=segmenter.close, after=after)


def trt_row(env: Env, ctx: WayContext, batch: int, precision: str) -> Prepared:
    """TensorRT engines (built with mfnet.export.tensorrt.build_engines into the export
    directory) through the runtime's TensorRT backend: ``decode_prepared`` on prepared frames,
    host in, host out. Written against the documented APIs; not run on the project's machines
    (no TensorRT there)."""
    if env.trt_reason:
        raise NotMeasured(env.trt_reason)
    engines = ensure_engines(env, ctx)
    key = ("trt", ctx.way, precision)
    if key not in env.compiled:
        started = time.perf_counter()
        build_engines(engines, precision, opt_batch=1, max_batch=max(env.args.batch_list))
        env.compiled[key] = time.perf_counter() - started
    segmenter = runtime_segmenter(env, ctx, batch, backend="tensorrt", precision=precision)
    support = runtime_support(segmenter, ctx, 1)()
    prepared, _ = segmenter.prepare_frames(list(ctx.data["frames_np"][:batch]))
    return Prepared(
        lambda: segmenter.decode_prepared(prepared, support),
        memory="device",
        notes=[f"engine build {env.compiled[key]:.0f} s (excluded)"],
        close=segmenter.close,
    )


def runtime_support_row(env: Env, ctx: WayContext, shots: int) -> Prepared:
    """Support-set encoding (N classes x ``shots``) through the runtime's ``Segmenter``."""
    segmenter = runtime_segmenter(env, ctx, 0)
    return Prepared(
        runtime_support(segmenter, ctx, shots),
        memory="device",
        notes=[f"{segmenter.backend_name} {segmenter.precision}"],
        close=segmenter.close,
    )
