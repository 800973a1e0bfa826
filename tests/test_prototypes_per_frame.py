"""Prototypes per frame: one decoder batch holds frames of different streams (support sets).

The default export's query decoder takes prototypes [B, N, C] (manifest schema v1.1,
``prototypes_form: "per_frame"``); a batch mixing two support sets equals two separate calls,
in ONNX Runtime, in PyTorch and through ``Segmenter.decode_frames``. Exports of schema v1.0
(prototypes [N, C] for the whole batch, no ``prototypes_form``) still load and run, and
``decode_frames`` serves mixed batches on them with one call per support set.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

onnxruntime = pytest.importorskip("onnxruntime")

from fault_fixtures import valid_manifest, write_manifest  # noqa: E402
from mfnet.checkpoint import model_from_checkpoint, save_checkpoint  # noqa: E402
from mfnet.data.episodes import synthetic_episodes  # noqa: E402
from mfnet.export import tensorrt as trt_export  # noqa: E402
from mfnet.export.onnx_export import export_onnx  # noqa: E402
from mfnet.export.wrappers import QueryDecoder  # noqa: E402
from mfnet.model.backbone import feature_size  # noqa: E402
from mfnet_runtime import Segmenter  # noqa: E402
from mfnet_runtime.backends import decoder_prototypes  # noqa: E402
from mfnet_runtime.errors import EngineError, RuntimeInputError  # noqa: E402
from mfnet_runtime.manifest import SCHEMA, read_manifest  # noqa: E402
from runtime_fixtures import LIMITS, assert_labels_vary, varied_model  # noqa: E402

ASSIGNMENT = [0, 1, 0, 1]  # support set of each of the four frames


def uint8_images(images: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3]."""
    return (images * 255).round().to(torch.uint8).movedim(-3, -1).numpy()


def episodes(model, count: int = 4) -> list[dict]:
    """Held-out fold-0 episodes (those ``varied_model`` checks its labels on)."""
    generated = synthetic_episodes(
        fold=0,
        split="test",
        way=model.way,
        shot=1,
        num_episodes=count,
        seed=7,
        image_size=48,
        feature_size=feature_size(model.config.backbone, 48),
    )
    return [generated[i] for i in range(count)]


def frames_and_sets(model) -> tuple[np.ndarray, torch.Tensor, list[dict]]:
    """(four query frames uint8 [4, 48, 48, 3], the prototypes of two support sets [2, N, C]
    (episodes 0 and 1, PyTorch), the episodes)."""
    items = episodes(model)
    with torch.no_grad():
        sets = torch.cat(
            [
                model.encode_support(e["support_images"], e["support_masks"]).prototypes
                for e in items[:2]
            ]
        )  # [2, N, C]
    frames = uint8_images(torch.stack([e["query_image"] for e in items]))
    return frames, sets, items


def tiled(prototypes: np.ndarray, batch: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(prototypes, (batch, *prototypes.shape)))


def support_classes(episode: dict) -> dict:
    """The runtime's support-set dict of one episode: {"class n": [(image, mask)]}."""
    images = uint8_images(episode["support_images"])  # [N, K, H, W, 3]
    masks = episode["support_masks"].numpy().astype(np.uint8)  # [N, K, H, W]
    return {f"class {n}": [(images[n, 0], masks[n, 0])] for n in range(images.shape[0])}


# ------------------------------------------------------------------------------- parity
def test_a_batch_of_two_support_sets_equals_two_separate_calls(varied_export) -> None:
    directory, checkpoint, manifest = varied_export(2)
    decoder_graph = manifest.graph_set("fp32")["query_decoder"]
    assert decoder_graph.prototypes_form == "per_frame"
    assert decoder_graph.inputs[1].shape == ("B", 2, 16)
    assert json.loads((directory / "manifest.json").read_text())["schema"] == SCHEMA
    model, _ = model_from_checkpoint(checkpoint)
    frames, sets, _ = frames_and_sets(model)
    per_frame = sets[ASSIGNMENT].numpy()  # [4, N, C]
    session = onnxruntime.InferenceSession(
        str(directory / decoder_graph.file), providers=["CPUExecutionProvider"]
    )
    mixed, mixed_probabilities = session.run(None, {"frames": frames, "prototypes": per_frame})
    alone = [
        session.run(None, {"frames": frames, "prototypes": tiled(sets[s].numpy(), 4)})
        for s in (0, 1)
    ]
    # the outputs vary: across frames, and between the two sets on every frame (a row taken
    # from the wrong set, or one set for the whole batch, changes the labels)
    assert_labels_vary(list(mixed), list(frames), min_labels=2)
    for b in range(4):
        assert not np.array_equal(alone[0][0][b], alone[1][0][b]), b
    for b, s in enumerate(ASSIGNMENT):
        np.testing.assert_array_equal(mixed[b], alone[s][0][b])
        assert np.abs(mixed_probabilities[b] - alone[s][1][b]).max() <= 1e-5
    # PyTorch (the plain decode_query, one cache row per frame) against ONNX Runtime
    with torch.no_grad():
        reference, reference_probabilities = QueryDecoder(model, optimized=False).eval()(
            torch.from_numpy(frames), sets[ASSIGNMENT]
        )
    np.testing.assert_array_equal(mixed, reference.numpy())
    assert np.abs(mixed_probabilities - reference_probabilities.numpy()).max() <= 1e-5
    # the runtime: decode_frames, also across a split at max_batch (4): six frames
    order = [0, 1, 2, 3, 1, 0]
    six_sets = [ASSIGNMENT[i] for i in order[:4]] + [0, 1]
    with Segmenter.load(directory, backend="onnxruntime", device="cpu", threads=1) as segmenter:
        labels, probabilities = segmenter.decode_frames(frames, per_frame, with_probabilities=True)
        np.testing.assert_array_equal(labels, mixed)
        assert probabilities is not None
        assert np.abs(probabilities - mixed_probabilities).max() <= 1e-5
        only, none = segmenter.decode_frames(frames[order], sets[six_sets].numpy())
        assert none is None and only.shape == (6, 48, 48)
        for row, (b, s) in enumerate(zip(order, six_sets, strict=True)):
            np.testing.assert_array_equal(only[row], alone[s][0][b])


def test_one_shared_support_set_is_tiled_by_the_runtime(varied_export) -> None:
    """``decode_prepared`` with one SupportSet on the per-frame graph = the graph fed [B, N, C]
    copies of its prototypes (the runtime tiles them)."""
    directory, checkpoint, _ = varied_export(2)
    model, _ = model_from_checkpoint(checkpoint)
    frames, _, items = frames_and_sets(model)
    with Segmenter.load(directory, backend="onnxruntime", device="cpu", threads=1) as segmenter:
        support = segmenter.encode_support(support_classes(items[0]))
        labels = segmenter.decode_prepared(frames, support)
        assert_labels_vary(list(labels), list(frames), min_labels=2)
        same, _ = segmenter.decode_frames(frames, tiled(support.prototypes, 4))
        np.testing.assert_array_equal(labels, same)
        with torch.no_grad():
            reference, _ = QueryDecoder(model, optimized=False)(
                torch.from_numpy(frames), torch.from_numpy(tiled(support.prototypes, 4))
            )
        np.testing.assert_array_equal(labels, reference.numpy())


def test_decode_frames_refuses_bad_prototypes(varied_export) -> None:
    directory, _, _ = varied_export(2)
    frames = np.zeros((2, 48, 48, 3), np.uint8)
    good = np.zeros((2, 2, 16), np.float32)
    with Segmenter.load(directory, backend="onnxruntime", device="cpu", threads=1) as segmenter:
        for bad in (good[:1], good[:, :1], good.astype(np.int32), good[0], [[0.0]]):
            with pytest.raises(RuntimeInputError, match=r"prototypes_per_frame must be"):
                segmenter.decode_frames(frames, bad)  # type: ignore[arg-type]
        nan = good.copy()
        nan[1, 0, 3] = np.nan
        with pytest.raises(RuntimeInputError, match="NaN"):
            segmenter.decode_frames(frames, nan)
        with pytest.raises(RuntimeInputError, match="prepared frames"):
            segmenter.decode_frames(frames[..., 0], good)
        empty, _ = segmenter.decode_frames(frames[:0], good[:0])
        assert empty.shape == (0, 48, 48)


def test_decoder_prototypes_feed() -> None:
    one = np.arange(6, dtype=np.float32).reshape(2, 3)
    fed = decoder_prototypes(one, 4, "per_frame")
    assert fed.shape == (4, 2, 3) and fed.flags.c_contiguous
    assert all(np.array_equal(row, one) for row in fed)
    rows = np.stack([one, one + 1])
    assert decoder_prototypes(rows, 2, "per_frame") is rows
    assert decoder_prototypes(one, 4, "shared") is one
    for prototypes, batch, form in ((rows, 3, "per_frame"), (rows, 2, "shared")):
        with pytest.raises(RuntimeInputError, match=f"the {form} query decoder"):
            decoder_prototypes(prototypes, batch, form)


def test_tensorrt_profile_covers_per_frame_prototypes(varied_export) -> None:
    """The engine's optimisation profile gives the prototypes the frames' batch range."""
    _, _, manifest = varied_export(2)
    shapes = trt_export.profile_shapes(manifest.graph_set("fp32")["query_decoder"], opt_batch=2)
    assert shapes["prototypes"] == ((1, 2, 16), (2, 2, 16), (4, 2, 16))
    assert shapes["frames"] == ((1, 48, 48, 3), (2, 48, 48, 3), (4, 48, 48, 3))


# ------------------------------------------------------------------ schema v1.0 (shared form)
@pytest.fixture(scope="module")
def old_export(tmp_path_factory):
    """A schema-v1.0 export: the decoder traced with prototypes [N, C] (the shared form) and
    its manifest rewritten as v1.0 wrote it (schema "mfnet-export-v1", no prototypes_form)."""
    root = tmp_path_factory.mktemp("v1-0")
    model, config = varied_model(2)
    checkpoint = root / "varied.pt"
    save_checkpoint(checkpoint, {"config": config, "model": model.state_dict()})
    directory = root / "engines"
    export_onnx(
        checkpoint, directory, precisions=("fp32",), limits=LIMITS, prototypes_form="shared"
    )
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data["schema"] = "mfnet-export-v1"
    for graph in data["graphs"]:
        graph["details"].pop("prototypes_form", None)
    path.write_text(json.dumps(data, indent=2))
    return directory, checkpoint


def test_an_old_export_loads_and_runs(old_export, varied_export) -> None:
    directory, checkpoint = old_export
    manifest = read_manifest(directory)
    decoder = manifest.graph_set("fp32")["query_decoder"]
    assert decoder.prototypes_form == "shared" and decoder.inputs[1].shape == (2, 16)
    assert "prototypes_form" not in decoder.details
    new_directory, _, _ = varied_export(2)
    model, _ = model_from_checkpoint(checkpoint)
    frames, _, items = frames_and_sets(model)
    with (
        Segmenter.load(directory, backend="onnxruntime", device="cpu", threads=1) as old,
        Segmenter.load(new_directory, backend="onnxruntime", device="cpu", threads=1) as new,
    ):
        assert old._backend.prototypes_form == "shared"  # noqa: SLF001 (the backend's form)
        old_sets = [old.encode_support(support_classes(e)) for e in items[:2]]
        new_sets = [new.encode_support(support_classes(e)) for e in items[:2]]
        old_labels = [old.decode_prepared(frames, s) for s in old_sets]
        new_labels = [new.decode_prepared(frames, s) for s in new_sets]
        assert_labels_vary(list(old_labels[0]), list(frames), min_labels=2)
        for b in range(4):
            assert not np.array_equal(old_labels[0][b], old_labels[1][b]), b
        for o, n in zip(old_labels, new_labels, strict=True):
            np.testing.assert_array_equal(o, n)  # the same model in both forms
        # a mixed batch on the shared graph: one call per support set, order kept
        per_frame = np.stack([old_sets[s].prototypes for s in ASSIGNMENT])
        mixed, probabilities = old.decode_frames(frames, per_frame, with_probabilities=True)
        for b, s in enumerate(ASSIGNMENT):
            np.testing.assert_array_equal(mixed[b], old_labels[s][b])
        assert probabilities is not None and probabilities.shape == (4, 3, 48, 48)
        new_mixed, _ = new.decode_frames(
            frames, np.stack([new_sets[s].prototypes for s in ASSIGNMENT])
        )
        np.testing.assert_array_equal(mixed, new_mixed)


def test_manifest_schema_versions_and_prototypes_form(tmp_path) -> None:
    old = valid_manifest()  # schema v1.0, decoder prototypes [2, C] (shared)
    manifest = read_manifest(write_manifest(tmp_path / "old", old))
    assert manifest.graph_set("fp32")["query_decoder"].prototypes_form == "shared"
    new = copy.deepcopy(old)
    new["schema"] = SCHEMA
    decoder = next(g for g in new["graphs"] if g["role"] == "query_decoder")
    decoder["inputs"][1]["shape"] = ["B", 2, 16]
    decoder["details"]["prototypes_form"] = "per_frame"
    manifest = read_manifest(write_manifest(tmp_path / "new", new))
    assert manifest.graph_set("fp32")["query_decoder"].prototypes_form == "per_frame"
    cases = {
        "newer": ({"schema": "mfnet-export-v1.9"}, "written by a newer exporter"),
        "unknown-form": ({"form": "per_stream"}, "prototypes_form must be one of"),
        "form-vs-shape": ({"form": "shared"}, "expects the prototypes input of shape"),
        "no-form": ({"form": None}, "expects the prototypes input of shape"),
    }
    for name, (change, message) in cases.items():
        data = copy.deepcopy(new)
        data["schema"] = change.get("schema", SCHEMA)
        details = next(g for g in data["graphs"] if g["role"] == "query_decoder")["details"]
        if "form" in change:
            if change["form"] is None:
                del details["prototypes_form"]  # absent = shared, but the shape is [B, N, C]
            else:
                details["prototypes_form"] = change["form"]
        with pytest.raises(EngineError, match=message):
            read_manifest(write_manifest(tmp_path / name, data))
