"""``manifest.json``: what an export directory holds, so that its artifacts describe themselves.

The manifest is plain JSON (the torch-free runtime reads it with the standard library). It records
the model's contract (way, input size, channels, normalisation, colour order), every graph's
inputs and outputs (names, shapes with symbolic dimensions, dtypes), the opset, the versions that
produced it, the SHA-256 of the source checkpoint and of every file, and the verification report.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes

SCHEMA = "mfnet-export-v1"
MANIFEST_NAME = "manifest.json"


class ManifestError(RuntimeError):
    """An export directory is incomplete, tampered with, or from another schema."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # ints are static, strings name a dynamic dimension
    dtype: str  # numpy dtype name: "uint8", "float32", ...


@dataclass(frozen=True)
class GraphSpec:
    """One exported artifact (ONNX graph or TensorRT engine) and its I/O contract."""

    role: str  # "support_encoder" | "prototype_aggregator" | "query_decoder"
    file: str  # relative to the export directory
    precision: str  # "fp32" | "fp16" (compute precision; I/O dtypes are in inputs/outputs)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str = ""
    format: str = "onnx"  # "onnx" | "tensorrt"
    details: dict[str, Any] = field(default_factory=dict)  # e.g. min/max shots, engine keys


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=2, default=str).encode(), durable=True)


def graph_to_dict(graph: GraphSpec) -> dict[str, Any]:
    return asdict(graph)


def graph_from_dict(data: dict[str, Any]) -> GraphSpec:
    def specs(items: list[dict]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in items)

    return GraphSpec(
        role=data["role"], file=data["file"], precision=data["precision"],
        inputs=specs(data["inputs"]), outputs=specs(data["outputs"]),
        sha256=data.get("sha256", ""), format=data.get("format", "onnx"),
        details=dict(data.get("details", {})),
    )


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load ``manifest.json`` and check its schema (no hash check: see ``verify_hashes``)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path} not found: {directory} is not an MFNet export directory; create one with "
            "python export/to_onnx.py --checkpoint CKPT --out DIR"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); re-export") from error
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(
            f"{path} has schema {found!r}, expected {SCHEMA!r}; re-export with "
            "this version of mfnet"
        )
    # What the exporter's tools read (the runtime checks the rest when it loads the export).
    graphs = manifest.get("graphs")
    if not isinstance(graphs, list):
        raise ManifestError(f"{path}: field graphs must be a list; re-export")
    for index, graph in enumerate(graphs):
        for key in ("role", "file", "precision", "sha256"):
            if not isinstance(graph, dict) or not isinstance(graph.get(key), str):
                raise ManifestError(f"{path}: field graphs[{index}].{key} must be a string; "
                                    "re-export with python export/to_onnx.py")
    return manifest


def verify_hashes(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Raise ``ManifestError`` naming every file that is missing or whose SHA-256 changed."""
    problems = []
    for graph in manifest["graphs"]:
        path = Path(directory) / graph["file"]
        if not path.is_file():
            problems.append(f"{graph['file']} is missing")
        elif sha256_of(path) != graph["sha256"]:
            problems.append(f"{graph['file']} does not match its SHA-256 in the manifest")
    if problems:
        raise ManifestError(
            f"export directory {directory} is not what its manifest describes: "
            + "; ".join(problems) + ". Re-export it instead of editing files by hand."
        )
