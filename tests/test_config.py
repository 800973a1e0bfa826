"""Config dataclasses: validation, checkpoint round trip, generated command-line options."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mfnet.config import (
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
