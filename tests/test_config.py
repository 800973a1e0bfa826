"""Config dataclasses: validation, checkpoint round trip, generated command-line options."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mfnet.config import (
    PRESETS,
    Config,
    ConfigError,
    ModelConfig,
    add_config_arguments,
    overrides_from_args,
    preset,
)

SECTIONS = ("model", "loss", "data", "train", "eval")


def test_round_trip_through_a_plain_dict() -> None:
    config = preset("synthetic-cpu").replace(fold=2, pyramid=(1.0, 0.5), pml_mode="random")
    plain = config.to_dict()
    assert isinstance(plain["model"]["pyramid"], list)  # builtins only: weights_only-safe
    assert Config.from_dict(plain) == config


def test_unknown_keys_and_fields_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown model config keys"):
        Config.from_dict({"model": {"not_a_field": 1}})
    with pytest.raises(ValueError, match="unknown config field 'foo'"):
        Config().replace(foo=1)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(backbone="resnet18"), "backbone='resnet18' is not one of"),
        (dict(channels=30, relation_heads=4), "divisible by relation_heads"),
        (dict(way=0), "way must be > 0"),
        (dict(pyramid=(1.0, 0.0)), "pyramid fractions"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_invalid_model_values_are_rejected(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().model.way = 3  # type: ignore[misc]


def test_every_field_is_a_documented_flag() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SECTIONS)
    help_text = parser.format_help()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            flag = "--" + f.name.replace("_", "-")
            assert flag in help_text, flag
            assert f.metadata["help"], f.name
    args = parser.parse_args(
        [
            "--fold",
            "3",
            "--pyramid",
            "1",
            "0.5",
            "--no-support-attention",
            "--pml-mode",
            "off",
            "--lr",
            "0.1",
        ]
    )
    given = overrides_from_args(args, SECTIONS)
    assert given == dict(
        fold=3, pyramid=(1.0, 0.5), support_attention=False, pml_mode="off", lr=0.1
    )
    config = Config().replace(**given)
    assert config.data.fold == 3 and config.model.pyramid == (1.0, 0.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--pml-mode", "sideways"])


def test_cpu_preset_keeps_the_paper_hyper_parameters() -> None:
    cpu = preset("synthetic-cpu")
    assert cpu.model.backbone == "small" and cpu.model.way == 2 and cpu.model.shot == 1
    # The paper's hyper-parameters that the CPU preset keeps.
    assert (cpu.train.momentum, cpu.train.weight_decay, cpu.train.poly_power) == (0.9, 1e-4, 0.9)
    assert (cpu.loss.pml_weight, cpu.loss.pml_margin, cpu.loss.pml_triplets) == (0.4, 1.0, 20)
    assert cpu.model.relation_heads == 4


def test_every_paper_table_has_its_preset() -> None:
    """Table XI's COCO 1-way 5-shot column included; Nt = 0 (Fig. 5) is a valid setting."""
    coco = preset("coco-1way-5shot", data_root="/data")
    assert (coco.data.dataset, coco.model.way, coco.model.shot) == ("coco", 1, 5)
    assert coco.train.lr == preset("coco-1way-1shot", data_root="/data").train.lr
    assert preset("synthetic-cpu", pml_triplets=0).loss.pml_triplets == 0
    with pytest.raises(ConfigError, match="pml_triplets"):
        preset("synthetic-cpu", pml_triplets=-1)


def test_paper_presets_use_eq6_the_paper_augmentation_and_their_tables_protocol() -> None:
    """Multi-way tables (I, II, X) test as PANet/PPNet, the 1-way tables (III, XI) as the PFENet
    lineage; every paper preset sums the PML hinges over raw embeddings and augments as Sec.
    IV-B; the CPU preset keeps the forms it had."""
    panet = ("train", "stretch", "network", 0)
    pfenet = ("val", "pad", "original", 2048)
    expected = {
        "pascal-1way-1shot": pfenet,
        "pascal-1way-5shot": pfenet,
        "coco-1way-1shot": pfenet,
        "coco-1way-5shot": pfenet,
        "pascal-2way-1shot": panet,
        "pascal-2way-5shot": panet,
        "coco-2way-1shot": panet,
        "coco-5way-1shot": panet,
        "pascal-metaseg-2way-5shot": panet,
    }
    assert set(expected) == set(PRESETS) - {"synthetic-cpu"}
    for name, protocol in expected.items():
        config = preset(name, data_root="/data")
        d = config.data
        assert (d.test_source, d.test_resize, d.eval_resolution, d.min_object_pixels) == protocol
        assert (config.loss.pml_reduction, config.loss.pml_normalize) == ("sum", False), name
        assert (d.augmentation, d.resize_to) == ("paper", 0), name
    cpu = preset("synthetic-cpu")
    assert (cpu.loss.pml_reduction, cpu.loss.pml_normalize) == ("mean", True)
    assert cpu.data.augmentation == "pfenet"


def test_a_checkpoint_config_without_the_new_fields_loads_with_the_forms_it_was_trained_with() -> (
    None
):
    """Checkpoints written before pml_reduction, pml_normalize, augmentation and resize_to
    existed were trained with the mean over normalised triplets and PFENet's augmentation."""
    new_fields = {"loss": ("pml_reduction", "pml_normalize"), "data": ("augmentation", "resize_to")}
    plain = preset("pascal-2way-1shot", data_root="/data").to_dict()
    assert plain["loss"]["pml_reduction"] == "sum" and plain["data"]["augmentation"] == "paper"
    for section, names in new_fields.items():
        for name in names:
            del plain[section][name]
    old = Config.from_dict(plain)
    assert (old.loss.pml_reduction, old.loss.pml_normalize) == ("mean", True)
    assert (old.data.augmentation, old.data.resize_to) == ("pfenet", 0)
    assert old.model == preset("pascal-2way-1shot", data_root="/data").model


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(pml_reduction="max"), "pml_reduction='max' is not one of"),
        (dict(pml_normalize="yes"), "loss.pml_normalize must be true or false"),
        (dict(augmentation="panet"), "augmentation='panet' is not one of"),
        (dict(resize_to=-1), "resize_to must be >= 0"),
        (dict(resize_to=520), "applies to --augmentation paper only"),
    ],
)
def test_invalid_loss_and_augmentation_values_are_rejected(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        preset("synthetic-cpu", **overrides)
    assert preset("synthetic-cpu", augmentation="paper", resize_to=520).data.resize_to == 520


def test_the_new_switches_are_flags() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SECTIONS)
    args = parser.parse_args(
        ["--pml-reduction", "sum", "--no-pml-normalize", "--augmentation", "paper"]
        + ["--resize-to", "520"]
    )
    assert overrides_from_args(args, SECTIONS) == dict(
        pml_reduction="sum", pml_normalize=False, augmentation="paper", resize_to=520
    )
    help_text = parser.format_help()
    for flag in ("--pml-reduction", "--pml-normalize", "--augmentation", "--resize-to"):
        assert flag in help_text
