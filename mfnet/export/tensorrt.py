"""TensorRT engines from the exported ONNX graphs, for TensorRT 10 and 11.

TensorRT before 10.12 builds FP16 engines from the FP32 graph with ``BuilderFlag.FP16`` (weak
typing). TensorRT 10.12 deprecated the precision flags in favour of strong typing and 11 removed
them, so from 10.12 on an FP16 engine is built strongly typed from the FP16 ONNX graph
(``*.fp16.onnx``, FP16 inside, FP32 I/O). ``build_plan`` decides this from the version;
everything that does not need TensorRT itself (the plan, engine names, optimisation profiles,
manifest entries) is a pure function, unit-tested on machines without TensorRT or a GPU.

Engines are tied to the GPU model and the TensorRT version. Their file names and manifest
entries record both; the runtime's ``mfnet_runtime.backends.tensorrt.engine_mismatch`` is the
compatibility rule, and its errors print the rebuild command (``rebuild_hint``). The manifest
is read and written with the runtime's ``mfnet_runtime.manifest``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mfnet_runtime.atomic import atomic_write_bytes, staged_directory
from mfnet_runtime.errors import EXPORT_COMMAND, EngineError, reexport_hint
from mfnet_runtime.manifest import (
    GraphInfo,
    Manifest,
    read_manifest,
    sha256_of,
    verify_files,
    write_manifest,
)

log = logging.getLogger(__name__)
INSTALL_HINT = (
    "TensorRT is not installed. Install it on the GPU machine with `pip install tensorrt-cu13` "
    "(CUDA 13) or `pip install tensorrt-cu12` (CUDA 12) from NVIDIA's package index "
    f"(https://pypi.nvidia.com), then run {EXPORT_COMMAND} trt again"
)


class TensorRTUnavailable(RuntimeError):
    """The tensorrt package is missing or unusable here."""


@dataclass(frozen=True)
class BuildPlan:
    """How one engine is built (``build_plan`` decides it from the TensorRT version)."""

    onnx_precision: str  # which ONNX graph to parse: "fp32" or "fp16"
    strongly_typed: bool  # create the network with NetworkDefinitionCreationFlag.STRONGLY_TYPED
    fp16_flag: bool  # set BuilderFlag.FP16 (TensorRT before 10.12 only)


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine is built on (and tied to)."""

    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]


STRONG_TYPING_FROM = (10, 12)  # BuilderFlag.FP16 deprecated from here, removed in 11


def tensorrt_version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as "10.13.3.9"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a TensorRT version from {version!r}")
    return int(match.group(1)), int(match.group(2))


def tensorrt_major(version: str) -> int:
    """The major version of a TensorRT version string."""
    return tensorrt_version_tuple(version)[0]


def build_plan(tensorrt_version: str, precision: str) -> BuildPlan:
    """How to build an engine of ``precision`` ("fp32" | "fp16") with this TensorRT version."""
    version = tensorrt_version_tuple(tensorrt_version)
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
    if version[0] < 10:
        raise TensorRTUnavailable(
            f"TensorRT {tensorrt_version} is too old: this exporter supports 10.x and 11.x "
            "(execute_async_v3, named tensors)"
        )
    if version < STRONG_TYPING_FROM:  # weak typing: FP16 kernels chosen from the FP32 graph
        return BuildPlan(onnx_precision="fp32", strongly_typed=False, fp16_flag=precision == "fp16")
    # 10.12+: strongly typed (the FP16 flag is deprecated, gone in 11); FP16 is in the graph.
    return BuildPlan(onnx_precision=precision, strongly_typed=True, fp16_flag=False)


def engine_file_name(
    role: str,
    precision: str,
    gpu: GpuInfo,
    tensorrt_version: str,
    shapes: Mapping[str, tuple[tuple[int, ...], ...]],
) -> str:
    """E.g. ``query_decoder.fp16.nvidia-h100-80gb-hbm3.sm90.trt11.4.0.B1-16.engine``."""
    gpu_slug = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-")
    major, minor = gpu.compute_capability
    dynamic = (
        "_".join(
            f"{name}{low[axis]}-{high[axis]}"
            for name, (low, _, high) in sorted(shapes.items())
            for axis in range(len(low))
            if low[axis] != high[axis]
        )
        or "static"
    )
    version = ".".join(tensorrt_version.split(".")[:3])
    return f"{role}.{precision}.{gpu_slug}.sm{major}{minor}.trt{version}.{dynamic}.engine"


def profile_shapes(
    graph: GraphInfo, opt_batch: int = 1
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input with a dynamic dimension, from a manifest entry.

    Symbolic dimensions: "B" (query frames: 1..max_batch, opt ``opt_batch``), "S" (support
    images: 1..max_support, opt 5), "K" (shots: min_shots..max_shots, opt 5).
    """
    details = graph.details
    ranges = {
        "B": (1, opt_batch, details.get("max_batch", 1)),
        "S": (1, 5, details.get("max_support", 1)),
        "K": (details.get("min_shots", 1), 5, details.get("max_shots", 1)),
    }
    shapes = {}
    for spec in graph.inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue
        low: list[int] = []
        opt: list[int] = []
        high: list[int] = []
        for dim in spec.shape:
            if isinstance(dim, int):
                low.append(dim)
                opt.append(dim)
                high.append(dim)
                continue
            if dim not in ranges:
                raise EngineError(f"unknown dynamic dimension {dim!r} in {graph.file}")
            lo, op, hi = ranges[dim]
            low.append(lo)
            opt.append(min(max(op, lo), hi))
            high.append(hi)
        shapes[spec.name] = (tuple(low), tuple(opt), tuple(high))
    return shapes


def import_tensorrt():
    """The ``tensorrt`` module, or ``TensorRTUnavailable`` with the install command."""
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailable(INSTALL_HINT) from error
    return tensorrt


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    plan: BuildPlan,
    shapes: Mapping[str, tuple[tuple[int, ...], ...]],
    timing_cache: Path,
    workspace_bytes: int = 4 << 30,
) -> None:
    """Parse ``onnx_path``, build a serialized engine, write it (and the timing cache)
    atomically."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see log)")
    atomic_write_bytes(engine_path, bytes(serialized), durable=True)
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))


def engine_entry(
    graph: GraphInfo,
    engine_file: str,
    precision: str,
    gpu: GpuInfo,
    tensorrt_version: str,
    shapes: dict,
    sha256: str,
) -> GraphInfo:
    """The manifest entry of an engine built from the ONNX graph entry ``graph``: its I/O, and
    in ``details`` what the engine is tied to (GPU, compute capability, TensorRT version)."""
    return dataclasses.replace(
        graph,
        file=engine_file,
        format="tensorrt",
        precision=precision,
        sha256=sha256,
        details={
            **graph.details,
            "source_onnx": graph.file,
            "gpu": gpu.name,
            "compute_capability": list(gpu.compute_capability),
            "tensorrt": tensorrt_version,
            "profile": {name: [list(s) for s in shape] for name, shape in shapes.items()},
        },
    )


def merge_engine_entries(manifest: Manifest, entries: list[GraphInfo]) -> Manifest:
    """Manifest with ``entries`` replacing earlier engines of the same role and precision."""
    replaced = {(e.role, e.precision) for e in entries}
    kept = [
        g
        for g in manifest.graphs
        if g.format != "tensorrt" or (g.role, g.precision) not in replaced
    ]
    return dataclasses.replace(manifest, graphs=(*kept, *entries))


def current_gpu() -> GpuInfo:
    """The visible CUDA GPU (through torch), or ``TensorRTUnavailable`` without one."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "no CUDA GPU is visible: TensorRT engines are built on the GPU model they will run on"
        )
    index = torch.cuda.current_device()
    return GpuInfo(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))


def build_engines(
    export_dir: str | Path,
    precision: str,
    *,
    opt_batch: int = 1,
    max_batch: int | None = None,
    workspace_bytes: int = 4 << 30,
) -> Manifest:
    """Build one engine per graph role from an ONNX export directory and record them.

    The engines and the updated manifest are written into a staged copy of the directory that
    replaces it in one rename once every engine is built: a failed or interrupted build leaves
    the export as it was. Returns the updated manifest (as ``read_manifest(export_dir)`` reads
    it back).
    """
    source = Path(export_dir)
    manifest = read_manifest(source)
    verify_files(manifest, list(manifest.graphs))  # before anything is created beside it
    with staged_directory(source, seed=True) as staging:
        manifest = _build_engines_into(
            source, staging, precision, opt_batch, max_batch, workspace_bytes
        )
    return dataclasses.replace(manifest, directory=source)


def _build_engines_into(
    source: Path,
    directory: Path,
    precision: str,
    opt_batch: int,
    max_batch: int | None,
    workspace_bytes: int,
) -> Manifest:
    """Engines + the updated manifest into ``directory``, a staged copy of ``source``."""
    manifest = read_manifest(directory)
    verify_files(manifest, list(manifest.graphs))
    trt = import_tensorrt()
    version = trt.__version__
    gpu = current_gpu()
    plan = build_plan(version, precision)
    onnx_graphs = {(g.role, g.precision): g for g in manifest.graphs if g.format == "onnx"}
    roles = sorted({role for role, _ in onnx_graphs})
    entries = []
    for role in roles:
        graph = onnx_graphs.get((role, plan.onnx_precision))
        if graph is None:
            raise EngineError(
                f"{source} has no {plan.onnx_precision} ONNX graph for {role}, which "
                f"TensorRT {version} needs for {precision} engines; export it with "
                f"{reexport_hint(source)} --precisions {plan.onnx_precision}"
            )
        if max_batch is not None and "max_batch" in graph.details:
            graph = dataclasses.replace(graph, details={**graph.details, "max_batch": max_batch})
        shapes = profile_shapes(graph, opt_batch)
        name = engine_file_name(role, precision, gpu, version, shapes)
        log.info("building %s (TensorRT %s, %s)", name, version, plan)
        build_engine(
            directory / graph.file,
            directory / name,
            plan=plan,
            shapes=shapes,
            timing_cache=directory / f"timing_cache.trt{version}.bin",
            workspace_bytes=workspace_bytes,
        )
        entries.append(
            engine_entry(graph, name, precision, gpu, version, shapes, sha256_of(directory / name))
        )
    manifest = merge_engine_entries(manifest, entries)
    write_manifest(manifest)
    return manifest
