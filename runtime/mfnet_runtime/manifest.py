"""``manifest.json``, the self-description of an export directory: the one definition of the
artifact format, for the exporter (``mfnet.export`` writes it) and the runtime (reads it).

The manifest records the model's contract (way, input size, channels, normalisation, colour
order, resize mode), every graph's inputs and outputs (names, shapes with symbolic dimensions,
dtypes), the opset, the versions that produced it, the SHA-256 of the source checkpoint and of
every file, and the verification report. Schema ``mfnet-export-v1.2``: written by
``python -m mfnet.export onnx`` and extended with TensorRT engine entries by
``python -m mfnet.export trt``.

Versions: a reader of ``v1.m`` reads ``v1`` (= ``v1.0``) up to ``v1.m``; a newer minor version is
refused with the upgrade command (an older runtime cannot feed what it does not know). ``v1.1``
adds the query decoder's ``details["prototypes_form"]``: ``"per_frame"`` (prototypes
[B, N, C], one support set per frame, so one batch can mix streams: the default export) or
``"shared"`` (prototypes [N, C] for the whole batch: every ``v1.0`` export, where the field is
absent). The reader checks that the form matches the ``prototypes`` input's shape. ``v1.2``
adds ``model.way_flexible`` (absent = false): a way-flexible model's decoder has ``way`` class
slots and a third input ``slot_mask`` uint8 [B, way] (1 = a class, 0 = an empty slot), so one
export segments 1..way classes; the reader checks that the flag and the input agree.

``write_manifest`` serialises the typed objects below and ``read_manifest`` parses them back
(a round trip gives equal objects); every problem is an ``EngineError`` that names the file and
the command that recreates it.

Standard library only (json, hashlib): the runtime never imports torch or the training package.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes
from .errors import EngineError, rebuild_hint, reexport_hint

SCHEMA_MAJOR = "mfnet-export-v1"  # the format family: v1 (= v1.0) and v1.<minor>
SCHEMA_MINOR = 2  # what this module writes, and the newest minor version it reads
SCHEMA = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"  # "mfnet-export-v1.2"
MANIFEST_NAME = "manifest.json"
# What every graph's image inputs are (recorded for readers of the JSON; the runtime feeds it).
IMAGE_LAYOUT = "NHWC uint8, normalised inside the graphs"
PRECISIONS = ("fp32", "fp16")
FORMATS = ("onnx", "tensorrt")
RESIZE_MODES = ("pad", "stretch")
# How the query decoder takes its prototypes (details["prototypes_form"]; absent = "shared"):
# "per_frame" = [B, N, C] (row b decodes frame b), "shared" = [N, C] for every frame of a call.
PROTOTYPES_FORMS = ("per_frame", "shared")
# The I/O contract the runtime feeds, per graph role: (input names, output names).
ROLE_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "support_encoder": (("support_images", "support_masks"), ("shot_features",)),
    "prototype_aggregator": (("shot_features",), ("prototypes",)),
    "prototype_aggregator_single": (("shot_features",), ("prototypes",)),
    "query_decoder": (("frames", "prototypes"), ("labels", "probabilities")),
}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a graph."""

    name: str
    shape: tuple[int | str, ...]  # ints are static; "B", "S", "K" name dynamic dimensions
    dtype: str  # numpy dtype name


@dataclass(frozen=True)
class GraphInfo:
    """One artifact (ONNX graph or TensorRT engine) listed in the manifest."""

    role: str
    file: str  # relative to the export directory
    precision: str  # "fp32" | "fp16"
    format: str  # "onnx" | "tensorrt"
    sha256: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def decoder_form(self) -> str | None:
        """How a query decoder graph computes its logits: ``details["decoder_form"]``, e.g.
        "static_pooling+prototype_folding" (the exact optimised rewrite, the default export) or
        "plain" (``decode_query`` as it is; also every export written before the field
        existed). None for the other roles. Informational: the I/O contract is the same."""
        if self.role != "query_decoder":
            return None
        return str(self.details.get("decoder_form", "plain"))

    @property
    def prototypes_form(self) -> str | None:
        """How a query decoder graph takes its prototypes: ``details["prototypes_form"]``,
        "per_frame" (input [B, N, C], the default export since schema v1.1) or "shared" ([N, C]
        for the whole batch; every export written before the field existed). None for the
        other roles. ``read_manifest`` checks it against the ``prototypes`` input's shape."""
        if self.role != "query_decoder":
            return None
        return str(self.details.get("prototypes_form", "shared"))


@dataclass(frozen=True)
class ModelInfo:
    """The model contract: inputs are uint8 RGB NHWC at ``input_size`` (normalised in-graph)."""

    way: int
    train_shot: int
    channels: int
    input_size: int
    backbone: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    color: str
    resize: str  # "pad" | "stretch"
    support_attention: bool
    way_flexible: bool = False  # v1.2: ``way`` slots, the decoder's slot_mask input


@dataclass(frozen=True)
class CheckpointInfo:
    """The training checkpoint an export was made from."""

    file: str  # its file name
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """An export directory's manifest. ``directory`` is where it was read from (or is written
    to by ``write_manifest``) and is not part of the JSON; the optional fields may be absent
    from hand-written manifests."""

    directory: Path
    model: ModelInfo
    graphs: tuple[GraphInfo, ...]
    opset: int | None = None
    versions: Mapping[str, str] = field(default_factory=dict)  # package -> version
    checkpoint: CheckpointInfo | None = None
    verification: Mapping[str, Any] | None = None  # the exporter's parity report

    @property
    def required_roles(self) -> tuple[str, ...]:
        """Roles a complete set of graphs has (the K = 1 aggregator only for models with A_S)."""
        roles: tuple[str, ...] = ("support_encoder", "prototype_aggregator", "query_decoder")
        if self.model.support_attention:
            roles += ("prototype_aggregator_single",)
        return roles

    def graph_set(self, precision: str, fmt: str = "onnx") -> dict[str, GraphInfo] | None:
        """role -> graph for one precision and format, or None when a role is missing."""
        found = {g.role: g for g in self.graphs if g.precision == precision and g.format == fmt}
        if any(role not in found for role in self.required_roles):
            return None
        return {role: found[role] for role in self.required_roles}

    def available_precisions(self, fmt: str = "onnx") -> list[str]:
        """The precisions with a complete graph set of format ``fmt``, FP32 first."""
        return [p for p in PRECISIONS if self.graph_set(p, fmt) is not None]

    @property
    def engine_id(self) -> str:
        """SHA-256 over the ONNX graphs' hashes: which weights a support set was encoded with.

        TensorRT engines are built from these graphs, so adding engines (``python -m mfnet.export
        trt``) keeps the id (and the saved support sets) valid; a re-export with other weights
        changes it.
        """
        sources = [g for g in self.graphs if g.format == "onnx"] or list(self.graphs)
        lines = sorted(f"{g.role}:{g.precision}:{g.sha256}" for g in sources)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fail(path: Path, problem: str) -> EngineError:
    """The ``EngineError`` for a problem of the manifest at ``path``, with the re-export command."""
    return EngineError(
        f"{path}: {problem}. Re-export the directory with: {reexport_hint(path.parent)}"
    )


# Integer limits a graph's "details" may carry (written by the exporter), all >= 1.
DETAIL_LIMITS = ("max_batch", "max_support", "max_shots", "min_shots")
DYNAMIC_DIMENSIONS = ("B", "S", "K")


def _is_int(value: Any) -> bool:
    """An int that is not a bool (JSON true is not a size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(path: Path, where: str, value: Any, ok: bool, expected: str) -> Any:
    """``value`` when ``ok``; else the EngineError naming the field, the value and the fix."""
    if not ok:
        raise _fail(
            path, f"field {where} must be {expected}, got {value!r} ({type(value).__name__})"
        )
    return value


def _int_field(path: Path, data: Mapping[str, Any], key: str, where: str, minimum: int = 1) -> int:
    """``data[key]``, an integer >= ``minimum``, else the EngineError naming ``where.key``."""
    if key not in data:
        raise _fail(path, f"field {where}.{key} is missing")
    value = data[key]
    return _require(
        path,
        f"{where}.{key}",
        value,
        _is_int(value) and value >= minimum,
        f"an integer >= {minimum}",
    )


def _str_field(
    path: Path,
    data: Mapping[str, Any],
    key: str,
    where: str,
    default: str | None = None,
    choices: tuple[str, ...] = (),
) -> str:
    """``data[key]``, a non-empty string (one of ``choices`` if given; ``default`` if absent)."""
    if key not in data and default is not None:
        return default
    if key not in data:
        raise _fail(path, f"field {where}.{key} is missing")
    value = data[key]
    if choices:
        return _require(
            path,
            f"{where}.{key}",
            value,
            value in choices,
            f"one of {', '.join(map(repr, choices))}",
        )
    return _require(
        path, f"{where}.{key}", value, isinstance(value, str) and bool(value), "a non-empty string"
    )


def _tensors(path: Path, items: Any, where: str) -> tuple[TensorInfo, ...]:
    """A graph's ``inputs`` / ``outputs`` list."""
    _require(path, where, items, isinstance(items, list), "a list of tensors")
    tensors = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        _require(path, at, item, isinstance(item, dict), "an object")
        shape = item.get("shape")
        _require(
            path,
            f"{at}.shape",
            shape,
            isinstance(shape, list)
            and all((_is_int(d) and d >= 1) or d in DYNAMIC_DIMENSIONS for d in shape),
            f"a list of sizes >= 1 or dynamic dimensions {DYNAMIC_DIMENSIONS}",
        )
        tensors.append(
            TensorInfo(
                _str_field(path, item, "name", at),
                tuple(shape),
                _str_field(path, item, "dtype", at),
            )
        )
    return tuple(tensors)


def _details(path: Path, data: Any, where: str) -> dict[str, Any]:
    """A graph's ``details``: free-form, but its shape limits are integers >= 1."""
    _require(path, where, data, isinstance(data, dict), "an object")
    for key in DETAIL_LIMITS:
        if key in data:
            _int_field(path, data, key, where)
    if "min_shots" in data and "max_shots" in data and data["min_shots"] > data["max_shots"]:
        raise _fail(
            path,
            f"field {where}.min_shots ({data['min_shots']}) exceeds "
            f"{where}.max_shots ({data['max_shots']})",
        )
    return dict(data)


def _graph(path: Path, data: Any, index: int) -> GraphInfo:
    """``graphs[index]``, checked against the I/O contract of its role."""
    where = f"graphs[{index}]"
    _require(path, where, data, isinstance(data, dict), "an object")
    for key in ("role", "file", "precision", "inputs", "outputs"):
        if key not in data:
            raise _fail(path, f"{where} lacks the key {key!r}")
    graph = GraphInfo(
        role=_str_field(path, data, "role", where),
        file=_str_field(path, data, "file", where),
        precision=_str_field(path, data, "precision", where),
        format=_str_field(path, data, "format", where, default="onnx"),
        sha256=_require(
            path,
            f"{where}.sha256",
            data.get("sha256", ""),
            isinstance(data.get("sha256", ""), str),
            "a string",
        ),
        inputs=_tensors(path, data["inputs"], f"{where}.inputs"),
        outputs=_tensors(path, data["outputs"], f"{where}.outputs"),
        details=_details(path, data.get("details", {}), f"{where}.details"),
    )
    if graph.role not in ROLE_IO:
        return graph  # a role this runtime does not use: ignored, not an error
    inputs, outputs = ROLE_IO[graph.role]
    names = (tuple(t.name for t in graph.inputs), tuple(t.name for t in graph.outputs))
    if graph.role == "query_decoder" and names[0] == (*inputs, "slot_mask"):
        inputs = names[0]  # a way-flexible model's (v1.2): _check_slot_mask checks the rest
    if names != (inputs, outputs):
        raise _fail(
            path,
            f"{graph.file} has inputs {names[0]} and outputs {names[1]}, this "
            f"runtime expects {inputs} and {outputs} for the {graph.role} role",
        )
    if graph.precision not in PRECISIONS or graph.format not in FORMATS:
        raise _fail(
            path,
            f"{graph.file} has precision {graph.precision!r} / format "
            f"{graph.format!r}; expected one of {PRECISIONS} / {FORMATS}",
        )
    if Path(graph.file).is_absolute() or ".." in Path(graph.file).parts:
        raise _fail(path, f"graph file {graph.file!r} is not inside the export directory")
    if graph.role == "query_decoder":
        _check_prototypes_form(path, graph, where)
    return graph


def _check_prototypes_form(path: Path, graph: GraphInfo, where: str) -> None:
    """The decoder's ``prototypes_form`` is known and matches its ``prototypes`` input:
    "per_frame" = ("B", N, C) with the frames' batch dimension, "shared" = (N, C)."""
    form = graph.details.get("prototypes_form", "shared")
    _require(
        path,
        f"{where}.details.prototypes_form",
        form,
        form in PROTOTYPES_FORMS,
        f"one of {', '.join(map(repr, PROTOTYPES_FORMS))}",
    )
    shape = graph.inputs[1].shape  # ROLE_IO: ("frames", "prototypes")
    expected = ("B", "N", "C") if form == "per_frame" else ("N", "C")
    frames_batch = graph.inputs[0].shape[:1]  # may be empty in a broken manifest
    fits = len(shape) == len(expected) and (form == "shared" or shape[:1] == frames_batch)
    if not fits:
        raise _fail(
            path,
            f"{graph.file}: prototypes_form {form!r} expects the prototypes input of shape "
            f"{list(expected)}, the manifest gives {list(shape)}",
        )


def _rgb_triple(path: Path, data: Mapping[str, Any], key: str, positive: bool) -> tuple[float, ...]:
    """``model.mean`` / ``model.std``: three finite numbers (> 0 if ``positive``)."""
    value = data.get(key)
    ok = (
        isinstance(value, list)
        and len(value) == 3
        and all(map(_is_number, value))
        and (not positive or min(value) > 0)
    )
    triple = _require(
        path,
        f"model.{key}",
        value,
        ok,
        "a list of three finite numbers" + (" > 0" if positive else ""),
    )
    return tuple(float(v) for v in triple)


def _model(path: Path, data: Any) -> ModelInfo:
    """The ``model`` section."""
    if not isinstance(data, dict):
        raise _fail(path, "the 'model' entry is missing")
    attention = data.get("support_attention")
    flexible = data.get("way_flexible", False)
    model = ModelInfo(
        way=_int_field(path, data, "way", "model"),
        train_shot=_int_field(path, data, "train_shot", "model"),
        channels=_int_field(path, data, "channels", "model"),
        input_size=_int_field(path, data, "input_size", "model"),
        backbone=str(data.get("backbone", "")),
        mean=_rgb_triple(path, data, "mean", positive=False),
        std=_rgb_triple(path, data, "std", positive=True),
        color=_str_field(path, data, "color", "model"),
        resize=_str_field(path, data, "resize", "model", default="pad", choices=RESIZE_MODES),
        support_attention=_require(
            path, "model.support_attention", attention, isinstance(attention, bool), "true or false"
        ),
        way_flexible=_require(
            path, "model.way_flexible", flexible, isinstance(flexible, bool), "true or false"
        ),
    )
    if model.color.upper() != "RGB":
        raise _fail(path, f"graphs expect colour order {model.color!r}; this runtime feeds RGB")
    return model


def _checkpoint(path: Path, data: Any) -> CheckpointInfo | None:
    """The optional ``checkpoint`` section: the source checkpoint's name and SHA-256."""
    if data is None:
        return None
    _require(path, "checkpoint", data, isinstance(data, dict), "an object")
    return CheckpointInfo(
        _str_field(path, data, "file", "checkpoint"), _str_field(path, data, "sha256", "checkpoint")
    )


def _versions(path: Path, data: Any) -> dict[str, str]:
    """The optional ``versions`` section: package name -> version string."""
    ok = isinstance(data, dict) and all(isinstance(v, str) for v in data.values())
    return dict(_require(path, "versions", data, ok, "an object of version strings"))


def schema_minor(path: Path, schema: Any) -> int:
    """The minor version of a ``schema`` string this runtime reads ("mfnet-export-v1" = 0,
    "mfnet-export-v1.<m>" = m for m <= ``SCHEMA_MINOR``); else the ``EngineError``."""
    if schema == SCHEMA_MAJOR:
        return 0
    prefix = SCHEMA_MAJOR + "."
    text = schema if isinstance(schema, str) else ""
    minor_text = text[len(prefix) :]
    if text.startswith(prefix) and minor_text.isascii() and minor_text.isdigit():
        minor = int(minor_text)
        if minor <= SCHEMA_MINOR:
            return minor
        raise EngineError(
            f"{path}: schema {schema!r} was written by a newer exporter; this runtime reads up to "
            f"{SCHEMA!r}. Upgrade the runtime (pip install -U ./runtime from the exporter's "
            f"checkout), or re-export with this version: {reexport_hint(path.parent)}"
        )
    raise _fail(path, f"schema {schema!r}, this runtime reads {SCHEMA_MAJOR!r} to {SCHEMA!r}")


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and validate ``directory/manifest.json`` (no file hashes: see ``verify_files``)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise EngineError(
            f"engine directory {directory} does not exist; create it with: "
            f"{reexport_hint(directory)}"
        )
    if not path.is_file():
        raise EngineError(
            f"{path} not found: {directory} is not an MFNet export directory; "
            f"create one with: {reexport_hint(directory)}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(path, f"not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise _fail(path, f"schema {type(data).__name__!r}, this runtime reads {SCHEMA!r}")
    schema_minor(path, data.get("schema"))
    items = _require(
        path,
        "graphs",
        data.get("graphs"),
        isinstance(data.get("graphs"), list),
        "a list of graph entries",
    )
    graphs = tuple(_graph(path, g, i) for i, g in enumerate(items))
    verification = data.get("verification")
    _require(
        path,
        "verification",
        verification,
        verification is None or isinstance(verification, dict),
        "an object",
    )
    opset = data.get("opset")
    _require(
        path, "opset", opset, opset is None or (_is_int(opset) and opset >= 1), "an integer >= 1"
    )
    model = _model(path, data.get("model"))
    _check_slot_mask(path, model, graphs)
    return Manifest(
        directory,
        model,
        graphs,
        opset=opset,
        versions=_versions(path, data.get("versions", {})),
        checkpoint=_checkpoint(path, data.get("checkpoint")),
        verification=verification,
    )


def _check_slot_mask(path: Path, model: ModelInfo, graphs: tuple[GraphInfo, ...]) -> None:
    """A way-flexible model's decoders take ``slot_mask`` uint8 [B, way]; no other does."""
    for graph in graphs:
        if graph.role != "query_decoder":
            continue
        masks = [t for t in graph.inputs if t.name == "slot_mask"]
        if bool(masks) != model.way_flexible:
            raise _fail(
                path,
                f"model.way_flexible is {str(model.way_flexible).lower()} but the query decoder "
                f"{graph.file} {'has' if masks else 'has no'} slot_mask input",
            )
        if masks and (masks[0].dtype != "uint8" or masks[0].shape[1:] != (model.way,)):
            raise _fail(
                path,
                f"the slot_mask input of {graph.file} must be uint8 [B, {model.way}], got "
                f"{masks[0].dtype} {list(masks[0].shape)}",
            )


def _tensor_json(tensor: TensorInfo) -> dict[str, Any]:
    """A ``TensorInfo`` as its JSON object."""
    return {"name": tensor.name, "shape": list(tensor.shape), "dtype": tensor.dtype}


def _graph_json(graph: GraphInfo) -> dict[str, Any]:
    """A ``GraphInfo`` as its JSON object (an entry of ``graphs``)."""
    return {
        "role": graph.role,
        "file": graph.file,
        "precision": graph.precision,
        "format": graph.format,
        "sha256": graph.sha256,
        "inputs": [_tensor_json(t) for t in graph.inputs],
        "outputs": [_tensor_json(t) for t in graph.outputs],
        "details": dict(graph.details),
    }


def manifest_json(manifest: Manifest) -> dict[str, Any]:
    """The JSON object of ``manifest.json`` (``read_manifest`` parses it back to ``manifest``)."""
    model = manifest.model
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "model": {
            "way": model.way,
            "train_shot": model.train_shot,
            "channels": model.channels,
            "input_size": model.input_size,
            "backbone": model.backbone,
            "mean": list(model.mean),
            "std": list(model.std),
            "color": model.color,
            "resize": model.resize,
            "image_layout": IMAGE_LAYOUT,
            "support_attention": model.support_attention,
            "way_flexible": model.way_flexible,
        },
        "graphs": [_graph_json(g) for g in manifest.graphs],
    }
    if manifest.opset is not None:
        data["opset"] = manifest.opset
    if manifest.versions:
        data["versions"] = dict(manifest.versions)
    if manifest.checkpoint is not None:
        data["checkpoint"] = {
            "file": manifest.checkpoint.file,
            "sha256": manifest.checkpoint.sha256,
        }
    if manifest.verification is not None:
        data["verification"] = dict(manifest.verification)
    return data


def write_manifest(manifest: Manifest) -> Path:
    """Write ``manifest`` to ``manifest.directory/manifest.json`` atomically and durably;
    returns the path. Only the JSON is written: the files it lists are there already."""
    path = manifest.directory / MANIFEST_NAME
    atomic_write_bytes(path, json.dumps(manifest_json(manifest), indent=2).encode(), durable=True)
    return path


def verify_files(manifest: Manifest, graphs: list[GraphInfo], check_hashes: bool = True) -> None:
    """Raise ``EngineError`` naming every listed file that is missing or whose SHA-256 changed."""
    problems, engines = [], False
    for graph in graphs:
        path = manifest.directory / graph.file
        if not path.is_file():
            problems.append(f"{graph.file} is missing")
        elif check_hashes and sha256_of(path) != graph.sha256:
            problems.append(
                f"{graph.file} does not match its SHA-256 in the manifest "
                "(modified, truncated or replaced)"
            )
        else:
            continue
        engines = engines or graph.format == "tensorrt"
    if problems:
        precision = graphs[0].precision if graphs else "fp16"
        fix = (
            rebuild_hint(manifest.directory, precision)
            if engines
            else reexport_hint(manifest.directory)
        )
        raise EngineError(
            f"export directory {manifest.directory} is not what its manifest "
            f"describes: {'; '.join(problems)}. Recreate it with: {fix}"
        )
