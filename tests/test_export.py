"""ONNX export: every graph verified with ONNX Runtime (CPU) against PyTorch; the manifest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

onnxruntime = pytest.importorskip("onnxruntime")

from export import to_onnx as to_onnx_cli  # noqa: E402
from export import verify as verify_cli  # noqa: E402
from mfnet.checkpoint import model_from_checkpoint, save_checkpoint  # noqa: E402
from mfnet.config import preset  # noqa: E402
from mfnet.data.episodes import synthetic_episodes  # noqa: E402
from mfnet.export.onnx_export import ExportLimits, export_onnx  # noqa: E402
from mfnet.export.verify import verification_inputs, verify_export  # noqa: E402
from mfnet.export.wrappers import (  # noqa: E402
    PrototypeAggregator,
    QueryDecoder,
    SupportEncoder,
)
from mfnet.model.build import build_mfnet  # noqa: E402
from mfnet_runtime.errors import EngineError  # noqa: E402
from mfnet_runtime.manifest import (  # noqa: E402
    manifest_json,
    read_manifest,
    sha256_of,
    verify_files,
)
from runtime_fixtures import assert_labels_vary  # noqa: E402

LIMITS = ExportLimits(max_batch=4, max_support=16, max_shots=8)


def make_checkpoint(path, **overrides):
    torch.manual_seed(0)
    config = preset("synthetic-cpu").replace(image_size=48, channels=16, **overrides)
    model = build_mfnet(config.model)
    save_checkpoint(path, {"config": config.to_dict(), "model": model.state_dict()})
    return path, model.eval()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3]."""
    return (images * 255).round().to(torch.uint8).movedim(-3, -1)


def session(directory, manifest, role, precision="fp32"):
    graph = next(g for g in manifest.graphs if g.role == role and g.precision == precision)
    return onnxruntime.InferenceSession(
        str(directory / graph.file), providers=["CPUExecutionProvider"]
    )


def query_decoder_parity(directory, manifest, model, precision):
    """Labels and probabilities of the exported query decoder vs the FP32 PyTorch reference on
    the verification's synthetic input set (three queries, real prototypes), whose reference
    maps are checked to vary first. Returns (label agreement, max |probability difference|)."""
    frames, prototypes = verification_inputs(model)["query_decoder"]["synthetic"]
    decoder = session(directory, manifest, "query_decoder", precision)
    labels, probabilities = decoder.run(
        None, {"frames": frames.numpy(), "prototypes": prototypes.numpy()}
    )
    with torch.no_grad():
        ref_labels, ref_probabilities = QueryDecoder(model, optimized=False).eval()(
            frames, prototypes
        )
    assert_labels_vary(list(ref_labels.numpy()), list(frames.numpy()), min_labels=2)
    return (
        float((labels == ref_labels.numpy()).mean()),
        float(np.abs(probabilities - ref_probabilities.numpy()).max()),
    )


@pytest.mark.parametrize("way", [1, 2, 5])
@pytest.mark.parametrize("shot", [1, 5])
def test_export_verifies_every_graph(varied_export, way, shot) -> None:
    precisions = ("fp32", "fp16") if (way, shot) == (2, 5) else ("fp32",)
    directory, checkpoint, manifest = varied_export(way, shot, precisions=precisions)
    model, _ = model_from_checkpoint(checkpoint)
    report = manifest.verification
    for result in report["graphs"]:  # the export's label checks on real data saw varied labels
        for check in result["checks"]:
            if "label_agreement" in check and result["inputs"] == "synthetic":
                assert check["reference_labels"] >= 2, result
    assert report["passed"]
    roles = {g.role for g in manifest.graphs}
    expected = {"support_encoder", "prototype_aggregator", "query_decoder"}
    assert roles == expected | ({"prototype_aggregator_single"} if shot > 1 else set())
    # every graph, each precision, both input sets were compared
    assert len(report["graphs"]) == 2 * len(manifest.graphs)
    for result in report["graphs"]:
        for check in result["checks"]:
            if "max_abs_diff" in check and result["file"].endswith("fp32.onnx"):
                assert check["max_abs_diff"] < 1e-4, result
    # FP32: labels identical, probabilities to 1e-5; FP16: >= 99.5 % of labels, 1e-2
    agreement, difference = query_decoder_parity(directory, manifest, model, "fp32")
    assert agreement == 1.0 and difference <= 1e-5, (agreement, difference)
    if "fp16" in precisions:
        agreement, difference = query_decoder_parity(directory, manifest, model, "fp16")
        assert agreement >= 0.995 and difference <= 1e-2, (agreement, difference)
    assert json.loads((directory / "manifest.json").read_text()) == manifest_json(manifest)
    assert read_manifest(directory) == manifest  # the runtime reads back what was written
    assert manifest.model.way == way and manifest.model.input_size == 48


def swap_class_channels(path, first: int = 1, second: int = 2) -> None:
    """Swap two class channels of the query decoder's classifier (its last conv) in place."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path))
    swapped = []
    for initializer in graph.graph.initializer:
        if initializer.name.endswith(("decoder.classifier.weight", "decoder.classifier.bias")):
            values = numpy_helper.to_array(initializer).copy()
            values[[first, second]] = values[[second, first]]
            initializer.CopyFrom(numpy_helper.from_array(values, initializer.name))
            swapped.append(initializer.name)
    assert len(swapped) == 2, swapped
    onnx.save(graph, str(path))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_parity_checks_fail_on_swapped_classes(varied_export, tmp_path, precision) -> None:
    """The mutation check: the export's own verification and the parity test's check both
    fail once two class channels of the exported decoder are swapped."""
    source, checkpoint, manifest = varied_export(2, 5, precisions=("fp32", "fp16"))
    model, _ = model_from_checkpoint(checkpoint)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    swap_class_channels(broken / f"query_decoder.{precision}.onnx")
    report = verify_export(read_manifest(broken), model)
    assert not report["passed"]
    failed = {result["file"] for result in report["graphs"] if not result["passed"]}
    assert failed == {f"query_decoder.{precision}.onnx"}
    agreement, difference = query_decoder_parity(broken, manifest, model, precision)
    assert agreement < 0.995 and difference > 1e-2, (agreement, difference)
    assert verify_export(manifest, model)["passed"]


def test_query_decoder_dynamic_batch_and_five_shot_parity(varied_export) -> None:
    out, checkpoint, manifest = varied_export(2, 5, precisions=("fp32", "fp16"))
    model, _ = model_from_checkpoint(checkpoint)
    episodes = synthetic_episodes(
        fold=0, split="test", way=2, shot=5, num_episodes=3, seed=11, image_size=48, feature_size=6
    )
    images = to_uint8(episodes[0]["support_images"])  # [2, 5, 48, 48, 3]
    masks = episodes[0]["support_masks"]  # [2, 5, 48, 48]
    frames = to_uint8(torch.stack([e["query_image"] for e in episodes]))  # [3, 48, 48, 3]
    encoder = session(out, manifest, "support_encoder")
    aggregator = session(out, manifest, "prototype_aggregator")
    decoder = session(out, manifest, "query_decoder")
    shots = encoder.run(
        None,
        {
            "support_images": images.flatten(0, 1).numpy(),
            "support_masks": masks.flatten(0, 1).numpy(),
        },
    )[0].reshape(2, 5, -1)
    prototypes = aggregator.run(None, {"shot_features": shots})[0]
    # the whole ONNX pipeline equals the PyTorch model's encode_support + decode_query
    with torch.no_grad():
        cache = model.encode_support(images.permute(0, 1, 4, 2, 3).float() / 255, masks)
        logits = model.decode_query(frames.permute(0, 3, 1, 2).float() / 255, cache)
    reference = logits.argmax(1).numpy()
    assert_labels_vary(list(reference), list(frames.numpy()), min_labels=3)
    assert np.abs(prototypes - cache.prototypes[0].numpy()).max() < 1e-4
    assert manifest.graph_set("fp32")["query_decoder"].prototypes_form == "per_frame"
    tiled = np.ascontiguousarray(np.broadcast_to(prototypes, (4, *prototypes.shape)))  # [4, N, C]
    labels, probabilities = decoder.run(None, {"frames": frames.numpy(), "prototypes": tiled[:3]})
    assert labels.dtype == np.uint8 and labels.shape == (3, 48, 48)
    np.testing.assert_array_equal(labels, reference)
    assert np.abs(probabilities - torch.softmax(logits, 1).numpy()).max() <= 1e-5
    assert np.allclose(probabilities.sum(1), 1.0, atol=1e-5)
    for batch in (1, 4):  # dynamic batch axis: each frame's labels do not depend on the batch
        many = np.concatenate([frames.numpy()] * 2)[:batch]
        out_labels = decoder.run(None, {"frames": many, "prototypes": tiled[:batch]})[0]
        assert out_labels.shape == (batch, 48, 48)
        np.testing.assert_array_equal(out_labels, np.concatenate([reference] * 2)[:batch])


def test_adding_a_shot_equals_re_encoding(tmp_path) -> None:
    checkpoint, _ = make_checkpoint(tmp_path / "model.pt", way=2, shot=5)
    out = tmp_path / "out"
    manifest = export_onnx(checkpoint, out, precisions=("fp32",), limits=LIMITS)
    encoder = session(out, manifest, "support_encoder")
    aggregator = session(out, manifest, "prototype_aggregator")
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 4, 48, 48, 3), generator=generator, dtype=torch.uint8)
    masks = torch.zeros(2, 4, 48, 48, dtype=torch.uint8)
    masks[..., 12:36, 12:36] = 1

    def encode(imgs, msks):
        return encoder.run(None, {"support_images": imgs.numpy(), "support_masks": msks.numpy()})[0]

    cached = encode(images[:, :3].flatten(0, 1), masks[:, :3].flatten(0, 1)).reshape(2, 3, -1)
    new_shot = encode(images[1, 3:], masks[1, 3:])  # one more shot for class 1 only
    grown = np.concatenate([cached[1], new_shot])[None]  # [1, 4, C]
    everything = encode(images.flatten(0, 1), masks.flatten(0, 1)).reshape(2, 4, -1)
    assert np.allclose(grown[0], everything[1], atol=1e-5)
    # aggregate class 1 from the cache + new shot == from a full re-encoding
    both = np.stack([everything[0], grown[0]])
    assert np.allclose(
        aggregator.run(None, {"shot_features": both})[0],
        aggregator.run(None, {"shot_features": everything})[0],
        atol=1e-5,
    )


def test_manifest_hashes_and_tampering(tmp_path) -> None:
    checkpoint, _ = make_checkpoint(tmp_path / "model.pt", way=2, shot=1)
    out = tmp_path / "out"
    export_onnx(checkpoint, out, precisions=("fp32",), limits=LIMITS)
    manifest = read_manifest(out)
    assert manifest.checkpoint.sha256 == sha256_of(checkpoint)
    assert manifest.checkpoint.file == "model.pt"
    for graph in manifest.graphs:
        assert graph.sha256 == sha256_of(out / graph.file)
        for spec in graph.inputs + graph.outputs:
            assert spec.name and spec.dtype in ("uint8", "float32")
    verify_files(manifest, list(manifest.graphs))
    target = out / manifest.graphs[0].file
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(EngineError, match="does not match its SHA-256"):
        verify_files(manifest, list(manifest.graphs))
    target.unlink()
    with pytest.raises(EngineError, match="is missing"):
        verify_files(manifest, list(manifest.graphs))
    with pytest.raises(EngineError, match="not an MFNet export directory"):
        read_manifest(tmp_path)


def test_command_lines(tmp_path, capsys) -> None:
    checkpoint, _ = make_checkpoint(tmp_path / "model.pt", way=2, shot=1)
    out = tmp_path / "out"
    assert (
        to_onnx_cli.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(out),
                "--precisions",
                "fp32",
                "--max-batch",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out  # the library's log lines, shown by the command
    assert "exporting support_encoder.fp32.onnx" in printed
    assert "ok   query_decoder.fp32.onnx [synthetic]" in printed
    assert printed.rstrip().endswith(f"wrote {out / 'manifest.json'}")
    assert verify_cli.main(["--dir", str(out), "--checkpoint", str(checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert "ok   support_encoder.fp32.onnx [random]" in printed and "PASSED" in printed
    other, _ = make_checkpoint(tmp_path / "other.pt", way=2, shot=1, fold=1)
    assert verify_cli.main(["--dir", str(out), "--checkpoint", str(other)]) == 2
    assert "not the checkpoint" in capsys.readouterr().err
    assert to_onnx_cli.main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)]) == 2


def test_a_failed_verification_fails_the_export(tmp_path, monkeypatch) -> None:
    from mfnet.export import verify as verify_module

    checkpoint, _ = make_checkpoint(tmp_path / "model.pt", way=2, shot=1)
    strict = verify_module.Tolerance(
        atol=-1.0, rtol=0.0, probability_atol=-1.0, label_agreement=1.01
    )  # unsatisfiable
    monkeypatch.setitem(verify_module.TOLERANCES, "fp32", strict)
    from mfnet.export.onnx_export import ExportError

    with pytest.raises(ExportError, match="FAIL support_encoder.fp32.onnx"):
        export_onnx(checkpoint, tmp_path / "out", precisions=("fp32",), limits=LIMITS)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_resnet50_configuration_exports_and_verifies(tmp_path) -> None:
    """The paper's configuration (random trunk weights: no download here), 473 x 473, FP32."""
    torch.manual_seed(0)
    config = preset("synthetic-cpu").replace(
        backbone="resnet50", weights="none", channels=256, image_size=473, dropout=0.5
    )
    model = build_mfnet(config.model)
    save_checkpoint(tmp_path / "r50.pt", {"config": config.to_dict(), "model": model.state_dict()})
    manifest = export_onnx(
        tmp_path / "r50.pt",
        tmp_path / "out",
        precisions=("fp32",),
        limits=ExportLimits(max_batch=2, max_support=4, max_shots=4),
    )
    assert manifest.verification["passed"]
    assert manifest.model.input_size == 473 and manifest.model.channels == 256


def test_wrappers_call_the_model_methods() -> None:
    """Export wrappers add only I/O conversion: they equal the model's own methods."""
    torch.manual_seed(0)
    config = preset("synthetic-cpu").replace(image_size=48, channels=16, shot=3)
    model = build_mfnet(config.model).eval()
    images = torch.randint(0, 256, (2, 3, 48, 48, 3), dtype=torch.uint8)
    masks = torch.zeros(2, 3, 48, 48, dtype=torch.uint8)
    masks[..., 10:30, 10:30] = 1
    with torch.no_grad():
        cache = model.encode_support(images.permute(0, 1, 4, 2, 3).float() / 255, masks)
        shots = SupportEncoder(model)(images.flatten(0, 1), masks.flatten(0, 1)).view(2, 3, -1)
        assert torch.allclose(shots, cache.shot_features[0], atol=1e-6)
        assert torch.allclose(PrototypeAggregator(model)(shots), cache.prototypes[0], atol=1e-6)
