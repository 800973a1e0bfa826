"""A model repository for NVIDIA Triton Inference Server, written from an export directory.

``write_repository(engine_dir, out)`` lays out what ``tritonserver --model-repository=OUT``
serves (``python -m mfnet.export triton --engines DIR --out REPO`` is the command)::

    REPO/
      mfnet_encode_support/                support_encoder graph: support_images uint8
        config.pbtxt                       [S, H, W, 3] + support_masks uint8 [S, H, W] ->
        1/model.onnx                       shot_features float32 [S, C]; batched over shots
      mfnet_aggregate_prototypes/          prototype_aggregator graph: shot_features float32
        config.pbtxt                       [N, K, C] -> prototypes float32 [N, C]; not batched
        1/model.onnx                       (K varies per request: dims [N, -1, C])
      mfnet_aggregate_prototypes_single/   models with A_S only: the K = 1 aggregator
      mfnet_segment/                       query_decoder graph: frames uint8 [B, H, W, 3] +
        config.pbtxt                       prototypes float32 [B, N, C] -> labels uint8
        mfnet_repository.json              [B, H, W], probabilities float32 [B, N+1, H, W];
        1/model.onnx                       batched over frames, dynamic batching

Every model is one exported graph as it is (no ensemble, no Python backend): a support set is
encoded once per stream by the client's calls (shots through ``mfnet_encode_support``, the
shots of each class grouped into [N, K, C] by the client, as ``Segmenter._aggregate`` does, then
``mfnet_aggregate_prototypes``), and every frame request to ``mfnet_segment`` carries its
prototypes (N x C floats). Requests are stateless, so Triton's dynamic batcher may stack frames
of different streams, and any server behind a load balancer can answer any frame. An ensemble
cannot express the client-side step: the shots-to-classes regrouping depends on how many shots
each class has, and K = 1 classes go to another graph when the model has A_S.

Each ``config.pbtxt`` is generated from the manifest: the graph's input and output names,
dtypes (``TYPE_UINT8``, ``TYPE_FP32``) and dims; for a batched model (every tensor's first
dimension is the same dynamic one, "B" or "S") ``max_batch_size`` is the export's (or the
TensorRT profile's) limit and the batch dimension is left out of ``dims``; other dynamic
dimensions are -1. ``platform`` is ``onnxruntime_onnx`` (the ONNX graph as ``1/model.onnx``) or,
where the manifest lists TensorRT engines of the precision for that role, ``tensorrt_plan``
(each engine as ``1/model.sm<XY>.plan``, picked by Triton through ``cc_model_filenames`` by
the GPU's compute capability; the engine must also match the TensorRT version inside the
Triton container, which the manifest records and ``mfnet_repository.json`` repeats).
``mfnet_segment/mfnet_repository.json`` records what a client needs: the model contract (way,
channels, input size, resize mode), the export's ``engine_id``, the prototypes form, and which
graph each model serves.

The repository is written in a staging sibling and swapped in only when complete
(``atomic.staged_directory``): a failed write leaves an earlier repository as it was. Standard
library only, like the rest of the runtime: a deployment machine builds its repository without
torch. Not run against a real Triton server here; the configs are checked with Triton's own
model-config protobuf schema (``tritonclient.grpc.model_config_pb2``) in the tests.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes, staged_directory
from .errors import EngineError, RuntimeInputError, rebuild_hint, reexport_hint
from .manifest import GraphInfo, Manifest, TensorInfo, read_manifest, verify_files

logger = logging.getLogger("mfnet_runtime")

REPOSITORY_SCHEMA = "mfnet-triton-repository-v1"
DESCRIPTION_NAME = "mfnet_repository.json"  # in the mfnet_segment model directory
# Triton model name -> the export's graph role
MODEL_ROLES: dict[str, str] = {
    "mfnet_encode_support": "support_encoder",
    "mfnet_aggregate_prototypes": "prototype_aggregator",
    "mfnet_aggregate_prototypes_single": "prototype_aggregator_single",
    "mfnet_segment": "query_decoder",
}
SEGMENT_MODEL = "mfnet_segment"
PLATFORMS = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
PLATFORM_CHOICES = ("auto", "onnxruntime", "tensorrt")
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
# manifest dtype (numpy name) -> Triton's DataType
TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
}
BATCH_DIMENSIONS = ("B", "S")  # dynamic first dimensions Triton may batch along
VERSION = "1"  # the one model version written


@dataclass(frozen=True)
class RepositoryOptions:
    """How the repository's models are served (the fields of each ``config.pbtxt``).

    precision: "auto" (FP16 graphs for GPU instances when exported, else FP32) | "fp32" |
    "fp16". platform: "auto" (TensorRT plans where the manifest has engines of the precision
    for the role, else ONNX Runtime) | "onnxruntime" | "tensorrt" (every role, or an error).
    kind: "gpu" | "cpu" (``instance_group.kind``); instances: instances per listed GPU (or on
    the CPU); gpus: the GPU indices (empty: every visible GPU, Triton's default). max_batch:
    cap of the batched models' ``max_batch_size`` (None: the export's own limit).
    max_queue_delay_us: how long the dynamic batcher may hold a request to fill a batch.
    preferred_batch_sizes: of ``mfnet_segment`` (empty: 4, 8, 16, ... up to its
    max_batch_size, and the max_batch_size itself).
    """

    precision: str = "auto"
    platform: str = "auto"
    kind: str = "gpu"
    instances: int = 1
    gpus: tuple[int, ...] = ()
    max_batch: int | None = None
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        checks = [
            ("precision", self.precision in ("auto", "fp32", "fp16"), "auto, fp32 or fp16"),
            ("platform", self.platform in PLATFORM_CHOICES, ", ".join(PLATFORM_CHOICES)),
            ("kind", self.kind in KINDS, "gpu or cpu"),
            ("instances", _positive(self.instances), "an integer >= 1"),
            ("gpus", all(_index(g) for g in self.gpus), "GPU indices >= 0"),
            ("max_batch", self.max_batch is None or _positive(self.max_batch), "an integer >= 1"),
            ("max_queue_delay_us", _index(self.max_queue_delay_us), "an integer >= 0"),
            ("preferred_batch_sizes", all(map(_positive, self.preferred_batch_sizes)), ">= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise RuntimeInputError(
                    f"Triton repository option {name} must be {expected}, got "
                    f"{getattr(self, name)!r}"
                )
        if self.kind == "cpu" and self.gpus:
            raise RuntimeInputError("gpus cannot be given for CPU instances (kind='cpu')")
        if self.kind == "cpu" and self.platform == "tensorrt":
            raise RuntimeInputError("TensorRT plans run on GPUs only: use kind='gpu'")


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class ModelPlan:
    """One Triton model: the graph (ONNX) or engines (TensorRT, one per compute capability) it
    serves, and its ``config.pbtxt`` text. ``files`` maps names in the version directory to
    source files of the export."""

    name: str
    graph: GraphInfo
    platform: str
    files: dict[str, Path]
    config: str
    max_batch_size: int


# ------------------------------------------------------------------------- config.pbtxt text
def _quote(text: str) -> str:
    """A protobuf text-format string literal (JSON's escapes are a subset of its escapes)."""
    return json.dumps(text)


def _dims(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _tensor_block(tensor: TensorInfo, batched: bool) -> str:
    """``{ name, data_type, dims }`` of one input / output (batch dimension left out)."""
    if tensor.dtype not in TRITON_DTYPES:
        raise EngineError(f"tensor {tensor.name} has dtype {tensor.dtype}, which Triton lacks")
    shape = tensor.shape[1:] if batched else tensor.shape
    dims = [d if isinstance(d, int) else -1 for d in shape]
    return (
        "  {\n"
        f"    name: {_quote(tensor.name)}\n"
        f"    data_type: {TRITON_DTYPES[tensor.dtype]}\n"
        f"    dims: {_dims(dims)}\n"
        "  }"
    )


def batch_dimension(graph: GraphInfo) -> str | None:
    """The dynamic dimension every input and output of ``graph`` starts with ("B" or "S"), the
    one Triton can batch along; None when there is none (a model with max_batch_size 0)."""
    firsts = {t.shape[0] if t.shape else None for t in graph.inputs + graph.outputs}
    if len(firsts) == 1:
        (first,) = firsts
        if first in BATCH_DIMENSIONS:
            return str(first)
    return None


def model_config(
    name: str,
    graph: GraphInfo,
    platform: str,
    max_batch_size: int,
    options: RepositoryOptions,
    cc_files: dict[str, str] | None = None,
    preferred: Sequence[int] = (),
) -> str:
    """The ``config.pbtxt`` text of one model (protobuf text format of Triton's ModelConfig).

    ``max_batch_size`` 0 = not batched (full dims, no dynamic batching); ``cc_files``: compute
    capability ("9.0") -> plan file name, for ``tensorrt_plan``; ``preferred``: the dynamic
    batcher's preferred batch sizes.
    """
    batched = max_batch_size > 0
    lines = [
        f"name: {_quote(name)}",
        f"platform: {_quote(platform)}",
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(_tensor_block(t, batched) for t in graph.inputs),
        "]",
        "output [",
        ",\n".join(_tensor_block(t, batched) for t in graph.outputs),
        "]",
    ]
    if batched:
        lines.append("dynamic_batching {")
        if preferred:
            lines.append(f"  preferred_batch_size: {_dims(preferred)}")
        lines.append(f"  max_queue_delay_microseconds: {options.max_queue_delay_us}")
        lines.append("}")
    group = [f"    count: {options.instances}", f"    kind: {KINDS[options.kind]}"]
    if options.gpus:
        group.append(f"    gpus: {_dims(options.gpus)}")
    lines += ["instance_group [", "  {", *group, "  }", "]"]
    if cc_files:
        entries = ",\n".join(
            f"  {{ key: {_quote(cc)} value: {_quote(file)} }}"
            for cc, file in sorted(cc_files.items())
        )
        lines += ["cc_model_filenames [", entries, "]"]
    else:
        lines.append(f"default_model_filename: {_quote('model.onnx')}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ planning
def _precision(manifest: Manifest, options: RepositoryOptions) -> str:
    """The graph precision the repository serves."""
    onnx = manifest.available_precisions("onnx")
    engines = {g.precision for g in manifest.graphs if g.format == "tensorrt"}
    if options.precision != "auto":
        if options.precision not in onnx and options.precision not in engines:
            raise EngineError(
                f"{manifest.directory} has no complete {options.precision} graphs (it has "
                f"{onnx or 'none'}); export them with: {reexport_hint(manifest.directory)} "
                f"--precisions {options.precision}"
            )
        return options.precision
    order = ("fp16", "fp32") if options.kind == "gpu" else ("fp32", "fp16")
    for precision in order:
        if precision in onnx:
            return precision
    raise EngineError(
        f"{manifest.directory} has no complete set of ONNX graphs; re-export with: "
        f"{reexport_hint(manifest.directory)}"
    )


def _engines_by_capability(manifest: Manifest, role: str, precision: str) -> dict[str, GraphInfo]:
    """Compute capability ("9.0") -> the TensorRT engine entry of ``role`` and ``precision``.

    Triton picks a plan by compute capability only, so two engines of one capability (two GPU
    models, or two TensorRT versions) cannot both be served: an error names them."""
    chosen: dict[str, GraphInfo] = {}
    for graph in manifest.graphs:
        if graph.format != "tensorrt" or graph.role != role or graph.precision != precision:
            continue
        capability = graph.details.get("compute_capability")
        if not (isinstance(capability, list) and len(capability) == 2):
            raise EngineError(
                f"engine {graph.file} lacks its compute capability in the manifest; rebuild it "
                f"with: {rebuild_hint(manifest.directory, precision)}"
            )
        key = f"{capability[0]}.{capability[1]}"
        if key in chosen:
            raise EngineError(
                f"{manifest.directory} has two {precision} {role} engines for compute "
                f"capability {key} ({chosen[key].file}, {graph.file}); Triton chooses a plan by "
                "compute capability alone: keep the one built with the TensorRT of the Triton "
                "container"
            )
        chosen[key] = graph
    return chosen


def _batch_limit(manifest: Manifest, graph: GraphInfo, dimension: str) -> int:
    """The largest batch the graph (its export limit) or engine (its profile) accepts."""
    if graph.format == "tensorrt":
        profile = graph.details.get("profile", {})
        highs = [shapes[2][0] for shapes in profile.values() if shapes]
        if highs:
            return int(min(highs))
    key = "max_batch" if dimension == "B" else "max_support"
    if key not in graph.details:
        raise EngineError(
            f"{graph.file} has no {key} in the manifest (an export limit); re-export with: "
            f"{reexport_hint(manifest.directory)}"
        )
    return int(graph.details[key])


def default_preferred(max_batch_size: int) -> tuple[int, ...]:
    """4, 8, 16, ... below ``max_batch_size``, then ``max_batch_size`` itself."""
    sizes, size = [], 4
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch_size)


def plan_repository(manifest: Manifest, options: RepositoryOptions) -> list[ModelPlan]:
    """One ``ModelPlan`` per Triton model of the export (no file is touched)."""
    precision = _precision(manifest, options)
    onnx = manifest.graph_set(precision, "onnx")
    plans = []
    for name, role in MODEL_ROLES.items():
        if role not in manifest.required_roles:
            continue
        engines = _engines_by_capability(manifest, role, precision)
        use_tensorrt = options.platform == "tensorrt" or (
            options.platform == "auto" and options.kind == "gpu" and bool(engines)
        )
        if use_tensorrt and not engines:
            raise EngineError(
                f"platform tensorrt was asked, but {manifest.directory} has no {precision} "
                f"TensorRT engine for {role}; build them with: "
                f"{rebuild_hint(manifest.directory, precision)}"
            )
        if not use_tensorrt and (onnx is None or role not in onnx):
            raise EngineError(
                f"{manifest.directory} has no {precision} ONNX graph for {role}; export it "
                f"with: {reexport_hint(manifest.directory)} --precisions {precision}"
            )
        if use_tensorrt:
            graph = next(iter(engines.values()))
            cc_files = {cc: f"model.sm{cc.replace('.', '')}.plan" for cc in engines}
            files = {cc_files[cc]: manifest.directory / g.file for cc, g in engines.items()}
            platform = PLATFORMS["tensorrt"]
        else:
            assert onnx is not None  # checked above
            graph = onnx[role]
            cc_files = {}
            files = {"model.onnx": manifest.directory / graph.file}
            platform = PLATFORMS["onnx"]
        dimension = batch_dimension(graph)
        max_batch_size = 0
        if dimension is not None:
            limits = [_batch_limit(manifest, g, dimension) for g in engines.values()] or [
                _batch_limit(manifest, graph, dimension)
            ]
            max_batch_size = min(limits)
            if options.max_batch is not None:
                max_batch_size = min(max_batch_size, options.max_batch)
        elif role == "query_decoder":
            logger.warning(
                "%s takes one shared set of prototypes for the whole batch (an export of schema "
                "v1.0): mfnet_segment is served without batching; re-export for prototypes per "
                "frame",
                graph.file,
            )
        preferred: tuple[int, ...] = ()
        if role == "query_decoder" and max_batch_size > 0:
            too_large = [s for s in options.preferred_batch_sizes if s > max_batch_size]
            if too_large:
                raise RuntimeInputError(
                    f"preferred batch sizes {too_large} exceed {name}'s max_batch_size "
                    f"{max_batch_size} (the export's limit, or --max-batch)"
                )
            wanted = options.preferred_batch_sizes or default_preferred(max_batch_size)
            preferred = tuple(sorted(set(wanted)))
        config = model_config(name, graph, platform, max_batch_size, options, cc_files, preferred)
        plans.append(ModelPlan(name, graph, platform, files, config, max_batch_size))
    return plans


def _relative(manifest: Manifest, source: Path) -> str:
    """A source file's name as the manifest lists it (relative to the export directory)."""
    return source.relative_to(manifest.directory).as_posix()


def description(manifest: Manifest, plans: list[ModelPlan]) -> dict[str, Any]:
    """The JSON of ``mfnet_segment/mfnet_repository.json``: what a client needs to know."""
    model = manifest.model
    hashes = {g.file: g.sha256 for g in manifest.graphs}
    decoder = next(p.graph for p in plans if p.name == SEGMENT_MODEL)
    return {
        "schema": REPOSITORY_SCHEMA,
        "source": str(manifest.directory),
        "engine_id": manifest.engine_id,
        "model": {
            "way": model.way,
            "train_shot": model.train_shot,
            "channels": model.channels,
            "input_size": model.input_size,
            "backbone": model.backbone,
            "resize": model.resize,
            "color": model.color,
            "support_attention": model.support_attention,
        },
        "prototypes_form": decoder.prototypes_form,
        "models": {
            plan.name: {
                "role": plan.graph.role,
                "platform": plan.platform,
                "precision": plan.graph.precision,
                "max_batch_size": plan.max_batch_size,
                "files": {
                    name: {
                        "source": _relative(manifest, source),
                        "sha256": hashes[_relative(manifest, source)],
                    }
                    for name, source in sorted(plan.files.items())
                },
                "tensorrt": plan.graph.details.get("tensorrt"),
            }
            for plan in plans
        },
    }


# ------------------------------------------------------------------------------------ writing
def check_repository_target(target: Path) -> None:
    """A repository replaces its target as a whole: refuse a file, or a non-empty directory
    that is not an earlier repository (no ``mfnet_segment/mfnet_repository.json``)."""
    if target.exists() and not target.is_dir():
        raise RuntimeInputError(f"--out {target} is a file, expected a directory")
    marker = target / SEGMENT_MODEL / DESCRIPTION_NAME
    if target.is_dir() and any(target.iterdir()) and not marker.is_file():
        raise RuntimeInputError(
            f"--out {target} is a non-empty directory without {SEGMENT_MODEL}/"
            f"{DESCRIPTION_NAME}: it is not an MFNet model repository, and a repository "
            "replaces its directory as a whole; choose a new or empty directory"
        )


def write_repository(
    engine_dir: str | Path, out: str | Path, options: RepositoryOptions = RepositoryOptions()
) -> list[ModelPlan]:
    """Write the Triton model repository of the export ``engine_dir`` to ``out``.

    The export's files are checked against their SHA-256 first; the repository is built in a
    staging sibling of ``out`` and swapped in complete. Returns the models written. Raises
    ``EngineError`` (an unusable export, or graphs / engines that the options ask for and the
    export lacks) and ``RuntimeInputError`` (bad options, an ``out`` that is not a repository).
    """
    manifest = read_manifest(engine_dir)
    target = Path(out)
    check_repository_target(target)
    if target.resolve() == manifest.directory.resolve():
        raise RuntimeInputError("--out must not be the export directory itself")
    plans = plan_repository(manifest, options)
    sources = {_relative(manifest, s) for plan in plans for s in plan.files.values()}
    verify_files(manifest, [g for g in manifest.graphs if g.file in sources])
    with staged_directory(target) as staging:
        for plan in plans:
            version = staging / plan.name / VERSION
            version.mkdir(parents=True)
            for name, source in plan.files.items():
                shutil.copyfile(source, version / name)
            atomic_write_bytes(staging / plan.name / "config.pbtxt", plan.config.encode())
        text = json.dumps(description(manifest, plans), indent=2)
        atomic_write_bytes(staging / SEGMENT_MODEL / DESCRIPTION_NAME, text.encode(), durable=True)
    logger.info(
        "wrote the Triton model repository %s (%s)",
        target,
        ", ".join(f"{p.name}: {p.platform}" for p in plans),
    )
    return plans


def read_description(repository: str | Path) -> dict[str, Any]:
    """``mfnet_segment/mfnet_repository.json`` of a repository written by ``write_repository``."""
    path = Path(repository) / SEGMENT_MODEL / DESCRIPTION_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EngineError(f"{path}: not an MFNet model repository description ({error})") from error
    found = data.get("schema") if isinstance(data, dict) else None
    if found != REPOSITORY_SCHEMA:
        raise EngineError(f"{path}: schema {found!r}, expected {REPOSITORY_SCHEMA!r}")
    return data
