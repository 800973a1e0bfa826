"""Parity of every exported graph with PyTorch: ONNX Runtime outputs vs the eager wrappers.

Each graph runs on two input sets: fixed random inputs (seeded) and synthetic-benchmark data
(real images and masks; for the query decoder three queries with prototypes of real support
sets, so labels are meaningful). A per-frame decoder (prototypes [B, N, C]) gets different
prototypes for each frame in both sets (random ones; each query's own episode's support set),
so every export checks that frame b is decoded with row b; a shared one ([N, C]) gets one set.
The reference is always the FP32 PyTorch model, so FP16 graphs are measured against the exact
result; for the query decoder it is the plain ``decode_query`` (``QueryDecoder(optimized=False)``),
so the exact rewrite of the optimised graph (``FastQueryDecoder``) is verified by every export.
Tolerances (``TOLERANCES``): FP32 graphs must agree to float32 rounding; FP16 graphs within a
half-precision budget. A graph passes when its probabilities differ by at most
``probability_atol`` anywhere, its other float outputs (features, prototypes) satisfy
``max(|ort - ref| - rtol * |ref|) <= atol``, and its labels agree on at least
``label_agreement`` of the pixels (argmax ties can flip a pixel even at float32 rounding). Each
label check records how many distinct labels the reference holds, so a check on a constant map
(which no export could fail) is visible in the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mfnet_runtime.manifest import Manifest

from ..data.episodes import synthetic_episodes
from ..model.mfnet import MFNet
from .wrappers import PrototypeAggregator, QueryDecoder, SupportEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """How far an exported graph's outputs may be from the reference's (see the module text)."""

    atol: float  # features and prototypes: |ort - ref| <= atol + rtol * |ref|
    rtol: float
    probability_atol: float  # probabilities (in [0, 1]): |ort - ref| <= probability_atol
    label_agreement: float  # fraction of pixels with the reference's label


# Probabilities get an absolute bound only: a relative part would loosen it where they are large.
PROBABILITIES = "probabilities"
TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4, probability_atol=1e-4, label_agreement=0.999),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, probability_atol=1e-2, label_agreement=0.995),
}

WRAPPERS = {
    "support_encoder": SupportEncoder,
    "prototype_aggregator": PrototypeAggregator,
    "prototype_aggregator_single": PrototypeAggregator,
    "query_decoder": QueryDecoder,
}
# Keyword arguments of the reference wrappers: the plain decode_query for the query decoder.
REFERENCE_OPTIONS: dict[str, dict[str, Any]] = {"query_decoder": {"optimized": False}}


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [..., 3, H, W] in [0, 1] (exactly k / 255) -> uint8 [..., H, W, 3]."""
    return (images * 255).round().to(torch.uint8).movedim(-3, -1)


def verification_inputs(
    model: MFNet, seed: int = 0, prototypes_form: str = "per_frame"
) -> dict[str, dict[str, list[torch.Tensor]]]:
    """role -> input-set name -> the graph's inputs (as torch tensors).

    The query decoder's prototypes follow ``prototypes_form``: "per_frame" [3, N, C] (a
    different set per frame), "shared" [N, C] (episode 0's set for the three queries)."""
    generator = torch.Generator().manual_seed(seed)
    size, channels, way = model.config.image_size, model.config.channels, model.way
    shot = 3
    episodes = synthetic_episodes(
        fold=0, split="test", way=way, shot=shot, num_episodes=3, seed=seed, image_size=size
    )
    episode = episodes[0]  # its support set; the queries of all three are decoded with it
    queries = _as_uint8(
        torch.stack([episodes[i]["query_image"] for i in range(len(episodes))])
    )  # [3, H, W, 3]
    support_images = _as_uint8(episode["support_images"]).flatten(0, 1)  # [N*K, H, W, 3]
    support_masks = episode["support_masks"].flatten(0, 1)  # [N*K, H, W]
    with torch.no_grad():
        shots = SupportEncoder(model)(support_images, support_masks).view(way, shot, channels)
        prototypes = PrototypeAggregator(model)(shots)
        if prototypes_form == "per_frame":  # each query with its own episode's support set
            per_query = [prototypes]
            for index in range(1, len(episodes)):
                other = episodes[index]
                features = SupportEncoder(model)(
                    _as_uint8(other["support_images"]).flatten(0, 1),
                    other["support_masks"].flatten(0, 1),
                ).view(way, shot, channels)
                per_query.append(PrototypeAggregator(model)(features))
            prototypes = torch.stack(per_query)  # [3, N, C]
    random_masks = torch.zeros(2, size, size, dtype=torch.uint8)
    random_masks[:, size // 5 : size // 2, size // 4 : 3 * size // 4] = 1
    random_masks[:, size // 5] = 255
    random_frames = torch.randint(
        0, 256, (3, size, size, 3), generator=generator, dtype=torch.uint8
    )
    random_shape = (3, way, channels) if prototypes_form == "per_frame" else (way, channels)
    decoder = {
        "random": [random_frames, torch.randn(*random_shape, generator=generator)],
        "synthetic": [queries, prototypes],
    }
    if model.way_flexible:  # the slot_mask input: frame b uses its first way - b slots
        slot_mask = torch.arange(way)[None] < torch.tensor([way, way - 1, way - 2])[:, None]
        slot_mask[:, 0] = True  # at least one class per frame
        for tensors in decoder.values():
            tensors.append(slot_mask.to(torch.uint8))
    return {
        "support_encoder": {
            "random": [random_frames[:2], random_masks],
            "synthetic": [support_images, support_masks],
        },
        "prototype_aggregator": {
            "random": [torch.randn(way, 4, channels, generator=generator)],
            "synthetic": [shots],
        },
        "prototype_aggregator_single": {
            "random": [torch.randn(way, 1, channels, generator=generator)],
            "synthetic": [shots[:, :1]],
        },
        "query_decoder": decoder,
    }


def _compare(name: str, ort_out: np.ndarray, ref: np.ndarray, tolerance: Tolerance) -> dict:
    """One output of one graph against the reference: the check's numbers and ``passed``."""
    if ort_out.shape != ref.shape or ort_out.dtype != ref.dtype:
        return {
            "output": name,
            "passed": False,
            "problem": f"shape/dtype {ort_out.shape} {ort_out.dtype} != {ref.shape} {ref.dtype}",
        }
    if ref.dtype == np.uint8:  # labels
        agreement = float((ort_out == ref).mean())
        return {
            "output": name,
            "label_agreement": agreement,
            "reference_labels": int(len(np.unique(ref))),
            "passed": agreement >= tolerance.label_agreement,
        }
    difference = np.abs(ort_out.astype(np.float64) - ref)
    if name == PROBABILITIES:
        excess = float(difference.max()) - tolerance.probability_atol
        return {
            "output": name,
            "max_abs_diff": float(difference.max()),
            "excess_over_tolerance": excess,
            "passed": bool(np.isfinite(ort_out).all()) and excess <= 0.0,
        }
    excess = float((difference - tolerance.rtol * np.abs(ref)).max())
    return {
        "output": name,
        "max_abs_diff": float(difference.max()),
        "excess_over_tolerance": excess,
        "passed": bool(np.isfinite(ort_out).all()) and excess <= tolerance.atol,
    }


def verify_export(
    manifest: Manifest,
    model: MFNet,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> dict[str, Any]:
    """Run every ONNX graph of ``manifest`` (files in ``manifest.directory``) with ONNX Runtime
    and compare with ``model``; each result line is logged (INFO).

    Returns ``{"passed": bool, "text": str, "graphs": [...], "tolerances": {...}}``.
    """
    import onnx
    import onnxruntime as ort

    model = model.float().eval()
    # per prototypes form of the decoder (the other roles' inputs do not depend on it)
    inputs_of: dict[str, dict[str, dict[str, list[torch.Tensor]]]] = {}
    results, lines = [], []
    for graph in manifest.graphs:
        if graph.format != "onnx":
            continue
        path = manifest.directory / graph.file
        onnx.checker.check_model(str(path), full_check=True)
        tolerance = TOLERANCES[graph.precision]
        session = ort.InferenceSession(str(path), providers=list(providers))
        options = dict(REFERENCE_OPTIONS.get(graph.role, {}))
        # the other roles' inputs are the same in every form's set: reuse the first one made
        form = graph.prototypes_form or next(iter(inputs_of), "per_frame")
        if graph.role == "query_decoder":
            options["per_frame"] = form == "per_frame"
        if form not in inputs_of:
            inputs_of[form] = verification_inputs(model, prototypes_form=form)
        inputs = inputs_of[form]
        reference = WRAPPERS[graph.role](model, **options).eval()
        for input_set, tensors in inputs[graph.role].items():
            feed = {spec.name: t.numpy() for spec, t in zip(graph.inputs, tensors, strict=False)}
            ort_outputs = session.run(None, feed)
            with torch.no_grad():
                ref_outputs = reference(*tensors)
            if isinstance(ref_outputs, torch.Tensor):
                ref_outputs = (ref_outputs,)
            checks = [
                _compare(spec.name, got, want.numpy(), tolerance)
                for spec, got, want in zip(graph.outputs, ort_outputs, ref_outputs, strict=False)
            ]
            passed = all(check["passed"] for check in checks)
            results.append(
                {
                    "file": graph.file,
                    "inputs": input_set,
                    "passed": passed,
                    "providers": session.get_providers(),
                    "checks": checks,
                }
            )
            summary = ", ".join(
                f"{c['output']}: "
                + (
                    f"agreement {c['label_agreement']:.4f}"
                    if "label_agreement" in c
                    else f"max|diff| {c.get('max_abs_diff', float('nan')):.2e}"
                )
                for c in checks
            )
            line = f"{'ok  ' if passed else 'FAIL'} {graph.file} [{input_set}] {summary}"
            lines.append(line)
            log.info("%s", line)
    return {
        "passed": all(result["passed"] for result in results) and bool(results),
        "text": "\n".join(lines),
        "graphs": results,
        "tolerances": {k: vars(v) for k, v in TOLERANCES.items()},
        "reference": "PyTorch FP32 eager wrappers (same model methods; the query decoder's is "
        "the plain decode_query), CPU",
    }
