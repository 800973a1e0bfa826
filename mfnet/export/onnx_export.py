"""Checkpoint -> ONNX graphs + manifest, verified against PyTorch before the export is done.

Graphs (``<precision>`` is ``fp32`` and, unless disabled, ``fp16`` with float32 I/O):

- ``support_encoder.<p>.onnx``: support_images uint8 [S, H, W, 3] RGB + support_masks uint8
  [S, H, W] (1 = class, 0 = other, 255 = ignore) -> shot_features float32 [S, C]; S dynamic.
- ``prototype_aggregator.<p>.onnx``: shot_features [N, K, C] -> prototypes [N, C]; K dynamic
  (K >= 2 when the model has A_S, whose K = 1 case is ``prototype_aggregator_single.<p>.onnx``,
  traced from the same method, where A_S is skipped as in the paper).
- ``query_decoder.<p>.onnx``: frames uint8 [B, H, W, 3] RGB + prototypes float32 [B, N, C]
  (one support set per frame, so that a batch can mix streams; ``prototypes_form="shared"``
  exports the schema-v1.0 form, [N, C] for the whole batch) -> labels uint8 [B, H, W],
  probabilities float32 [B, N+1, H, W]; B dynamic (one dimension for both inputs), H = W =
  input size. The form is recorded in the graph's ``details["prototypes_form"]``.
  By default (``optimize=True``) it is traced from ``FastQueryDecoder`` (static adaptive pooling
  as MatMuls, prototype folding of the first A_M convs: ``mfnet/model/inference.py``), an exact
  rewrite of ``decode_query``; the verification compares it with the plain eager
  ``decode_query``. The form is recorded in the graph's ``details["decoder_form"]``.

The manifest is the runtime's (``mfnet_runtime.manifest``): the export builds its typed
objects and writes them with ``write_manifest``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import logging
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mfnet_runtime.atomic import staged_directory
from mfnet_runtime.manifest import (
    MANIFEST_NAME,
    CheckpointInfo,
    GraphInfo,
    Manifest,
    ModelInfo,
    TensorInfo,
    sha256_of,
    write_manifest,
)

from ..checkpoint import model_from_checkpoint
from ..config import Config
from ..errors import require_export_dependencies
from ..model.mfnet import MFNet
from .wrappers import PrototypeAggregator, QueryDecoder, SupportEncoder

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # the dynamo exporter's native opset; TensorRT 10/11 parse opsets <= 20
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
PROTOTYPES_FORMS = ("per_frame", "shared")  # mfnet_runtime.manifest.PROTOTYPES_FORMS


@dataclass(frozen=True)
class ExportLimits:
    """Ranges of the dynamic dimensions (TensorRT optimisation profiles reuse them)."""

    max_batch: int = 16  # query frames per call
    max_support: int = 64  # support images per encoder call
    max_shots: int = 32  # shots per class in the aggregator

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_support", "max_shots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class ExportError(RuntimeError):
    """The export or its verification failed; the message carries the report."""


def _versions() -> dict[str, str]:
    """The versions of Python and of the packages that produced an export."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "onnx", "onnxscript", "onnxruntime", "mfnet"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _export_graph(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict,
    opset: int,
) -> None:
    """torch.onnx.export with the dynamo exporter, then the ONNX checker."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not our problem
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    if program is None:
        raise ExportError(f"torch.onnx.export returned nothing for {path.name}")
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)


def graph_plan(
    model: MFNet,
    limits: ExportLimits,
    optimize: bool = True,
    prototypes_form: str = "per_frame",
) -> list[dict[str, Any]]:
    """What to export: one entry per graph role, with example inputs and I/O specs.

    ``options`` are keyword arguments of the wrapper (the query decoder's ``optimized`` and
    ``per_frame``). ``prototypes_form`` "per_frame": the decoder's prototypes are [B, N, C],
    with the frames' own batch dimension (one ``Dim`` for both); "shared": [N, C].
    """
    if prototypes_form not in PROTOTYPES_FORMS:
        raise ValueError(
            f"prototypes_form must be one of {PROTOTYPES_FORMS}, got {prototypes_form!r}"
        )
    per_frame = prototypes_form == "per_frame"
    if model.way_flexible and not per_frame:
        raise ValueError(
            "a way-flexible model exports its decoder with prototypes per frame only (its "
            "slot_mask input is per frame): drop --prototypes-form shared"
        )
    size, channels, way = model.config.image_size, model.config.channels, model.way
    uint8_image = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    mask = torch.zeros(2, size, size, dtype=torch.uint8)
    mask[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    has_attention = model.support_attention is not None
    batch = torch.export.Dim("B", min=1, max=limits.max_batch)  # frames and their prototypes
    decoder_args: tuple[torch.Tensor, ...] = (
        uint8_image,
        torch.randn(2, way, channels) if per_frame else torch.randn(way, channels),
    )
    decoder_inputs = [
        TensorInfo("frames", ("B", size, size, 3), "uint8"),
        TensorInfo("prototypes", ("B", way, channels) if per_frame else (way, channels), "float32"),
    ]
    decoder_dynamic: dict[str, Any] = {
        "frames": {0: batch},
        "prototypes": {0: batch} if per_frame else None,
    }
    if model.way_flexible:  # slot_mask [B, N]: 1 = a class, 0 = an empty slot (ClassSlots)
        slot_mask = torch.ones(2, way, dtype=torch.uint8)
        slot_mask[1, way // 2 + 1 :] = 0  # frame 1: the first slots only (when way > 1)
        decoder_args += (slot_mask,)
        decoder_inputs.append(TensorInfo("slot_mask", ("B", way), "uint8"))
        decoder_dynamic["slot_mask"] = {0: batch}
    plan = [
        dict(
            role="support_encoder",
            wrapper=SupportEncoder,
            args=(uint8_image, mask),
            inputs=[
                TensorInfo("support_images", ("S", size, size, 3), "uint8"),
                TensorInfo("support_masks", ("S", size, size), "uint8"),
            ],
            outputs=[TensorInfo("shot_features", ("S", channels), "float32")],
            dynamic={
                "support_images": {0: torch.export.Dim("S", min=1, max=limits.max_support)},
                "support_masks": {0: torch.export.Dim("S", min=1, max=limits.max_support)},
            },
            details={"max_support": limits.max_support},
        ),
        dict(
            role="prototype_aggregator",
            wrapper=PrototypeAggregator,
            args=(torch.randn(way, 3, channels),),
            inputs=[TensorInfo("shot_features", (way, "K", channels), "float32")],
            outputs=[TensorInfo("prototypes", (way, channels), "float32")],
            dynamic={
                "shot_features": {
                    1: torch.export.Dim("K", min=2 if has_attention else 1, max=limits.max_shots)
                }
            },
            details={"min_shots": 2 if has_attention else 1, "max_shots": limits.max_shots},
        ),
        dict(
            role="query_decoder",
            wrapper=QueryDecoder,
            args=decoder_args,
            inputs=decoder_inputs,
            outputs=[
                TensorInfo("labels", ("B", size, size), "uint8"),
                TensorInfo("probabilities", ("B", way + 1, size, size), "float32"),
            ],
            dynamic=decoder_dynamic,
            details={"max_batch": limits.max_batch, "prototypes_form": prototypes_form},
            options={"optimized": optimize, "per_frame": per_frame},
        ),
    ]
    if has_attention:  # K = 1 skips A_S (paper): a static graph of the same method
        plan.insert(
            2,
            dict(
                role="prototype_aggregator_single",
                wrapper=PrototypeAggregator,
                args=(torch.randn(way, 1, channels),),
                inputs=[TensorInfo("shot_features", (way, 1, channels), "float32")],
                outputs=[TensorInfo("prototypes", (way, channels), "float32")],
                dynamic=None,
                details={"min_shots": 1, "max_shots": 1},
            ),
        )
    return plan


def export_onnx(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    precisions: tuple[str, ...] = ("fp32", "fp16"),
    limits: ExportLimits = ExportLimits(),
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    optimize: bool = True,
    prototypes_form: str = "per_frame",
) -> Manifest:
    """Export every graph in every precision, verify them, and write ``manifest.json``.

    ``optimize=False`` exports the query decoder in its plain form (``decode_query`` as it is),
    for comparison with the default optimised form. ``prototypes_form="shared"`` exports the
    decoder with prototypes [N, C] for the whole batch (the schema-v1.0 form, for runtimes
    before the per-frame form); the default "per_frame" takes [B, N, C].

    Everything is written into a hidden sibling of ``out_dir`` and verified there; only a
    complete, verified export replaces ``out_dir`` (in one rename), so a failed or interrupted
    export leaves the previous one exactly as it was. Returns the manifest (as
    ``mfnet_runtime.manifest.read_manifest(out_dir)`` reads it back). Raises
    ``ExportError`` (with the failed checks) when a verification fails, ``ValueError`` for bad
    options or an ``out_dir`` that is a file or a non-export directory,
    ``QueryDependentSupportError`` (a ``ValueError``) for A_S-v1/v2 models, ``CheckpointError``,
    and ``MissingDependencyError`` without onnx / onnxscript / onnxruntime.
    """
    require_export_dependencies(verify)
    target = Path(out_dir)
    check_export_target(target)
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if prototypes_form not in PROTOTYPES_FORMS:
        raise ValueError(
            f"unknown prototypes form {prototypes_form!r}; choose from {list(PROTOTYPES_FORMS)}"
        )
    model, config = model_from_checkpoint(checkpoint, map_location="cpu")
    # The query graph takes prototypes only; A_S-v1/v2 need the query and every shot.
    model.require_prototype_split("the ONNX export")
    with staged_directory(target) as out:  # swapped in only once verified and complete
        manifest = _export_into(
            out,
            model,
            config,
            checkpoint,
            precisions,
            limits,
            opset,
            verify,
            (optimize, prototypes_form),
        )
    log.info("wrote %s", target / MANIFEST_NAME)
    return dataclasses.replace(manifest, directory=target)


def check_export_target(target: Path) -> None:
    """An export replaces its target as a whole: refuse a file, or a directory that holds
    something other than an export (no manifest.json), which would be deleted with it."""
    if target.exists() and not target.is_dir():
        raise ValueError(
            f"--out {target} is a file, expected a directory; choose a new "
            "directory (or an existing export to replace)"
        )
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_NAME).is_file():
        raise ValueError(
            f"--out {target} is a non-empty directory without {MANIFEST_NAME}: it is not an "
            "MFNet export, and an export replaces its directory as a whole; choose a new or "
            "empty directory"
        )


def model_info(model: MFNet, config: Config) -> ModelInfo:
    """The manifest's model section: the contract the runtime feeds the graphs by."""
    return ModelInfo(
        way=model.way,
        train_shot=config.model.shot,
        channels=config.model.channels,
        input_size=config.model.image_size,
        backbone=config.model.backbone,
        mean=tuple(float(v) for v in config.model.mean),
        std=tuple(float(v) for v in config.model.std),
        color="RGB",
        # How frames of another size are fitted to input_size (as in evaluation): "pad" =
        # longer side to input_size, aspect kept, bottom/right padding; "stretch" = square.
        resize=config.data.test_resize,
        support_attention=model.support_attention is not None,
        way_flexible=model.way_flexible,
    )


def _export_into(
    out: Path,
    model: MFNet,
    config: Config,
    checkpoint: str | Path,
    precisions: tuple[str, ...],
    limits: ExportLimits,
    opset: int,
    verify: bool,
    decoder: tuple[bool, str],
) -> Manifest:
    """Every graph, its verification and ``manifest.json`` (last) into the directory ``out``.

    ``decoder`` = (optimize, prototypes_form) of the query decoder graph."""
    from .verify import verify_export  # verification needs onnxruntime; imported on use

    graphs: list[GraphInfo] = []
    for precision in precisions:
        dtype = PRECISIONS[precision]
        variant = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        for entry in graph_plan(variant, limits, *decoder):
            file = f"{entry['role']}.{precision}.onnx"
            log.info("exporting %s", file)
            module = entry["wrapper"](variant, dtype, **entry.get("options", {})).eval()
            details = dict(entry["details"])
            if hasattr(module, "form"):  # which decoder form the graph was traced from
                details["decoder_form"] = module.form
            _export_graph(
                module,
                entry["args"],
                out / file,
                [i.name for i in entry["inputs"]],
                [o.name for o in entry["outputs"]],
                entry["dynamic"],
                opset,
            )
            graphs.append(
                GraphInfo(
                    role=entry["role"],
                    file=file,
                    precision=precision,
                    format="onnx",
                    sha256=sha256_of(out / file),
                    inputs=tuple(entry["inputs"]),
                    outputs=tuple(entry["outputs"]),
                    details=details,
                )
            )
    manifest = Manifest(
        directory=out,
        model=model_info(model, config),
        graphs=tuple(graphs),
        opset=opset,
        versions=_versions(),
        checkpoint=CheckpointInfo(Path(checkpoint).name, sha256_of(checkpoint)),
    )
    if verify:
        report = verify_export(manifest, model)
        manifest = dataclasses.replace(manifest, verification=report)
        if not report["passed"]:
            failed = [line for line in report["text"].splitlines() if line.startswith("FAIL")]
            raise ExportError(
                "export verification failed, nothing was replaced: " + "; ".join(failed)
            )
    write_manifest(manifest)
    return manifest
