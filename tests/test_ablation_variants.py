"""The ablation rows of Tables III, VI, VII and XI as model switches (issue 17, point 5).

A_S-v1 / A_S-v2 (support_module), A_M-v1 / A_M-v2 (multiscale_module) and +SA (self_alignment):
shapes, gradients into each variant's own parameters, a short training run and an evaluation
on the synthetic benchmark, and for the decoder-side variants the ONNX export against PyTorch.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from mfnet.checkpoint import model_from_checkpoint, save_checkpoint
from mfnet.config import Config, ConfigError, ModelConfig, preset
from mfnet.data.datasets import build_episodes
from mfnet.model.aspp import ASPPDecoder
from mfnet.model.build import build_mfnet, count_learnable_parameters
from mfnet.model.fem import FeatureEnrichment
from mfnet.model.inference import FastQueryDecoder
from mfnet.model.support import QueryDependentSupportError
from mfnet.protocol import run_protocol
from mfnet.training.loop import train
from runtime_fixtures import _calibrate_classifier, assert_labels_vary

# The switches of each row, and the part of the model that holds the variant's parameters.
VARIANTS = {
    "A_S-v1": (dict(shot=2, support_module="self_attention", query_fusion="concat"), "shot_fusion"),
    "A_S-v2": (dict(shot=2, support_module="convlstm", query_fusion="concat"), "shot_fusion"),
    "A_M-v1": (dict(multiscale_module="fem"), "scale_attention"),
    "A_M-v2": (dict(multiscale_module="aspp"), "decoder.aspp"),
    "+SA": (dict(self_alignment=True), "self_alignment"),
}
DECODER_SIDE = ("A_M-v1", "A_M-v2", "+SA")
NEW_FIELDS = ("support_module", "multiscale_module", "self_alignment")


def small_config(size: int = 64, **switches) -> Config:
    return preset("synthetic-cpu").replace(
        device="cpu", image_size=size, channels=16, dropout=0.0, **switches
    )


def episode_batch(config: Config, count: int = 2, seed: int = 5) -> dict[str, torch.Tensor]:
    episodes = build_episodes(config, "test", config.model.shot, count, seed=seed)
    return {k: torch.stack([episodes[i][k] for i in range(count)]) for k in episodes[0]}


def variant_part(model: torch.nn.Module, path: str) -> torch.nn.Module:
    part = model.get_submodule(path)
    assert sum(p.numel() for p in part.parameters()) > 0, path
    return part


def test_the_default_model_has_no_variant_parts_and_old_configs_load() -> None:
    """The paper's MFNet builds no variant module (its state_dict names are those of a build
    before the switches existed); a checkpoint config without the new fields loads as default."""
    torch.manual_seed(0)
    model = build_mfnet(ModelConfig(backbone="small", channels=16, image_size=48))
    assert model.shot_fusion is None and model.self_alignment is None
    names = list(model.state_dict())
    assert not any(n.startswith(("shot_fusion", "self_alignment", "decoder.aspp")) for n in names)
    assert type(model.decoder).__name__ == "Decoder"
    old = preset("synthetic-cpu").to_dict()
    for name in NEW_FIELDS:
        del old["model"][name]
    assert Config.from_dict(old) == preset("synthetic-cpu")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_shapes_gradients_and_parameter_count(name) -> None:
    switches, part_path = VARIANTS[name]
    # 128 px: 16-pixel features, so the coarsest scale (1/8) has 2 x 2 pixels; at one pixel
    # +SA's attention is over a single token and its query / key get no gradient (correctly).
    config = small_config(size=128, **switches)
    torch.manual_seed(0)
    model = build_mfnet(config.model).train()
    batch = episode_batch(config)
    cache = model.encode_support(batch["support_images"], batch["support_masks"])
    out = model.decode_query(batch["query_image"], cache, return_aux=True)
    B, N, size = 2, config.model.way, config.model.image_size
    assert out.logits.shape == (B, N + 1, size, size)
    h = size // 8  # the small backbone's stride
    assert out.feature_logits.shape == (B, N + 1, h, h)
    assert out.embedding.shape == (B, config.model.channels, h, h)
    out.logits.logsumexp(dim=1).mean().backward()
    part = variant_part(model, part_path)
    for param_name, param in part.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, param_name
    counts = count_learnable_parameters(model)
    default = count_learnable_parameters(build_mfnet(small_config().model))
    logging.getLogger(__name__).info("%s: %d parameters (default %d)", name, counts["total"],
                                     default["total"])  # fmt: skip
    assert counts["total"] != default["total"]


def test_variants_build_the_modules_they_name() -> None:
    assert isinstance(build_mfnet(small_config(multiscale_module="fem").model).scale_attention,
                      FeatureEnrichment)  # fmt: skip
    aspp = build_mfnet(small_config(multiscale_module="aspp").model)
    assert isinstance(aspp.decoder, ASPPDecoder)
    assert aspp.pyramid_bins(8) == [8], "A_M-v2 fuses one query scale; ASPP gives the context"
    sa = build_mfnet(small_config(self_alignment=True).model)
    assert len(sa.self_alignment.blocks) == len(sa.config.pyramid)


def test_shot_attention_ignores_the_shot_order_and_the_convlstm_reads_it() -> None:
    """A_S-v1 is a softmax-weighted sum over the shots (order-free); A_S-v2 runs a
    bidirectional LSTM over them (the order given matters, docs/decisions.md)."""
    results = {}
    for name in ("A_S-v1", "A_S-v2"):
        config = small_config(**{**VARIANTS[name][0], "shot": 3})
        torch.manual_seed(0)
        model = build_mfnet(config.model).eval()
        batch = episode_batch(config)
        images, masks = batch["support_images"], batch["support_masks"]
        order = torch.tensor([2, 0, 1])
        with torch.no_grad():
            first = model(images, masks, batch["query_image"])
            permuted = model(images[:, :, order], masks[:, :, order], batch["query_image"])
        results[name] = float((first - permuted).abs().max())
    assert results["A_S-v1"] < 1e-5 and results["A_S-v2"] > 1e-5, results


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_and_evaluates_on_the_synthetic_benchmark(name, tmp_path) -> None:
    config = small_config(**VARIANTS[name][0]).replace(
        epochs=1,
        episodes_per_epoch=6,
        batch_size=2,
        workers=0,
        pml_start_epoch=0,
        eval_runs=1,
        eval_episodes=4,
        eval_batch_size=2,
        out=str(tmp_path / "run"),
    )
    torch.manual_seed(0)
    before = build_mfnet(config.model).state_dict()
    model, path = train(config, progress=False)
    trained, loaded_config = model_from_checkpoint(path)
    assert loaded_config == config
    part = VARIANTS[name][1]
    moved = [k for k, v in trained.state_dict().items() if k.startswith(part)
             and not torch.equal(v, before[k])]  # fmt: skip
    assert moved, f"the {name} parameters did not change in training"
    results = run_protocol({"MFNet": trained.eval()}, config, torch.device("cpu"), progress=False)
    miou = results["MFNet"].mean("miou")
    assert 0.0 <= miou <= 1.0 and 0.0 <= results["MFNet"].mean("fbiou") <= 1.0


def calibrated_variant(name: str, tmp_path) -> tuple[torch.nn.Module, Config, object]:
    """A decoder-side variant with calibrated logits (labels vary) and its checkpoint."""
    config = small_config(size=48, **VARIANTS[name][0])
    torch.manual_seed(0)
    model = build_mfnet(config.model).eval()
    _calibrate_classifier(model, config.model.shot, config.model.image_size)
    checkpoint = tmp_path / "variant.pt"
    save_checkpoint(checkpoint, {"config": config.to_dict(), "model": model.state_dict()})
    return model, config, checkpoint


@pytest.mark.parametrize("name", DECODER_SIDE)
def test_fast_decoder_equals_decode_query(name, tmp_path, caplog) -> None:
    """The optimised query path (what is exported) on a model whose labels vary; A_M-v1 falls
    back to the eager fusion and logs why, A_M-v2 and +SA keep prototype folding."""
    model, config, _ = calibrated_variant(name, tmp_path)
    with caplog.at_level(logging.INFO, logger="mfnet.model.inference"):
        fast = FastQueryDecoder(model).eval()
    assert fast.folded == (name != "A_M-v1"), fast.fold_reason
    if name == "A_M-v1":
        assert "FeatureEnrichment" in fast.fold_reason and "fem" in caplog.text
    batch = episode_batch(config, count=4, seed=11)
    with torch.no_grad():
        cache = model.encode_support(batch["support_images"][:1], batch["support_masks"][:1])
        reference = model.decode_query(batch["query_image"], cache)
        logits = fast(batch["query_image"], cache.prototypes)
    assert_labels_vary(list(reference.argmax(1).numpy()), min_labels=2)
    assert torch.equal(logits.argmax(1), reference.argmax(1))
    assert float((logits - reference).abs().max()) < 1e-4


@pytest.mark.parametrize("name", DECODER_SIDE)
def test_decoder_side_variant_exports_and_matches_onnx_runtime(name, tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from mfnet.export.onnx_export import ExportLimits, export_onnx
    from mfnet.export.verify import verification_inputs
    from mfnet.export.wrappers import QueryDecoder

    model, _, checkpoint = calibrated_variant(name, tmp_path)
    limits = ExportLimits(max_batch=4, max_support=8, max_shots=4)
    out = tmp_path / "export"
    manifest = export_onnx(checkpoint, out, precisions=("fp32",), limits=limits)
    assert manifest.verification["passed"]
    graph = next(g for g in manifest.graphs if g.role == "query_decoder")
    expected_form = "static_pooling" if name == "A_M-v1" else "static_pooling+prototype_folding"
    assert graph.details["decoder_form"] == expected_form
    frames, prototypes = verification_inputs(model)["query_decoder"]["synthetic"]
    session = onnxruntime.InferenceSession(
        str(out / graph.file), providers=["CPUExecutionProvider"]
    )
    labels, probabilities = session.run(
        None, {"frames": frames.numpy(), "prototypes": prototypes.numpy()}
    )
    with torch.no_grad():
        ref_labels, ref_probabilities = QueryDecoder(model, optimized=False).eval()(
            frames, prototypes
        )
    assert_labels_vary(list(ref_labels.numpy()), list(frames.numpy()), min_labels=2)
    assert float((labels == ref_labels.numpy()).mean()) > 0.999
    assert float(np.abs(probabilities - ref_probabilities.numpy()).max()) < 1e-4


@pytest.mark.parametrize("name", ("A_S-v1", "A_S-v2"))
def test_query_dependent_support_refuses_every_prototype_only_path(name, tmp_path, capsys) -> None:
    """A_S-v1/v2 combine each shot with the query: the export, the fast decoder and the
    prototype cache of predict refuse them with one typed error naming the variant."""
    from export import to_onnx as to_onnx_cli
    from mfnet.predict import TorchSegmenter

    config = small_config(size=48, **VARIANTS[name][0])
    torch.manual_seed(0)
    model = build_mfnet(config.model).eval()
    checkpoint = tmp_path / "variant.pt"
    save_checkpoint(checkpoint, {"config": config.to_dict(), "model": model.state_dict()})
    module = config.model.support_module
    for attempt in (
        lambda: FastQueryDecoder(model),
        lambda: TorchSegmenter(model, "pad", torch.device("cpu")),
    ):
        with pytest.raises(QueryDependentSupportError, match=module):
            attempt()
    out = tmp_path / "export"
    assert to_onnx_cli.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the ONNX export") and module in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("switches", "message"),
    [
        (dict(support_module="self_attention"), "query_fusion='concat'"),
        (
            dict(support_module="convlstm", query_fusion="concat", support_attention=False),
            "needs support_attention on",
        ),
        (dict(multiscale_module="fem", scale_attention=False), "needs scale_attention on"),
        (dict(multiscale_module="pyramid"), "is not one of"),
    ],
)
def test_contradictory_switches_are_config_errors(switches, message) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(ModelConfig(), **switches)


def test_self_alignment_needs_channels_divisible_by_its_heads() -> None:
    with pytest.raises(ConfigError, match="divisible by its 8 heads"):
        build_mfnet(ModelConfig(backbone="small", channels=20, self_alignment=True))
