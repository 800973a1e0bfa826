"""TensorRT logic without TensorRT: version plans, names, profiles, compatibility, manifest.

The compatibility rule is the runtime's (``mfnet_runtime.backends.tensorrt.engine_mismatch``),
checked here on the entries the exporter writes.

TensorRT is not installable on the project's machines. ``build_engines`` is driven here through
a recording stand-in for the ``tensorrt`` module that implements only the calls the documented
API offers (TensorRT 10 has ``BuilderFlag.FP16``, deprecated from 10.12; 11 does not), so the
per-version decisions, file naming, hashing and manifest updates are checked; the engines
themselves are not.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest

from mfnet.export import tensorrt as trt_export
from mfnet_runtime.backends.tensorrt import engine_mismatch, select_engines
from mfnet_runtime.errors import EngineError
from mfnet_runtime.manifest import (
    MANIFEST_NAME,
    GraphInfo,
    Manifest,
    ModelInfo,
    TensorInfo,
    read_manifest,
    sha256_of,
    write_manifest,
)

H100 = trt_export.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
MODEL = ModelInfo(
    way=2,
    train_shot=1,
    channels=256,
    input_size=473,
    backbone="resnet50",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    color="RGB",
    resize="pad",
    support_attention=False,
)


def test_build_plan_per_version() -> None:
    # before 10.12: weak typing, FP16 chosen by the builder flag from the FP32 graph
    assert trt_export.build_plan("10.11.0.33", "fp16") == trt_export.BuildPlan("fp32", False, True)
    assert trt_export.build_plan("10.9.0.34", "fp32") == trt_export.BuildPlan("fp32", False, False)
    # 10.12 deprecated BuilderFlag.FP16: strongly typed from the FP16 graph, as on 11
    assert trt_export.build_plan("10.12.0.36", "fp16") == trt_export.BuildPlan("fp16", True, False)
    assert trt_export.build_plan("10.13.3.9", "fp16") == trt_export.BuildPlan("fp16", True, False)
    assert trt_export.build_plan("10.13.3.9", "fp32") == trt_export.BuildPlan("fp32", True, False)
    assert trt_export.build_plan("11.4.0.106", "fp16") == trt_export.BuildPlan("fp16", True, False)
    assert trt_export.build_plan("11.4.0.106", "fp32") == trt_export.BuildPlan("fp32", True, False)
    with pytest.raises(trt_export.TensorRTUnavailable, match="too old"):
        trt_export.build_plan("8.6.1", "fp16")
    with pytest.raises(ValueError, match="precision"):
        trt_export.build_plan("11.0.0", "int8")
    with pytest.raises(ValueError, match="version"):
        trt_export.tensorrt_major("eleven")


def decoder_entry(max_batch: int = 16) -> GraphInfo:
    return GraphInfo(
        role="query_decoder",
        file="query_decoder.fp16.onnx",
        precision="fp16",
        format="onnx",
        sha256="x",
        inputs=(
            TensorInfo("frames", ("B", 473, 473, 3), "uint8"),
            TensorInfo("prototypes", (2, 256), "float32"),
        ),
        outputs=(
            TensorInfo("labels", ("B", 473, 473), "uint8"),
            TensorInfo("probabilities", ("B", 3, 473, 473), "float32"),
        ),
        details={"max_batch": max_batch},
    )


def entry_with_inputs(file: str, inputs: tuple, details: dict | None = None) -> GraphInfo:
    """A graph entry with other inputs (the profile only reads inputs and details)."""
    return dataclasses.replace(decoder_entry(), file=file, inputs=inputs, details=details or {})


def test_profiles_and_names() -> None:
    shapes = trt_export.profile_shapes(decoder_entry(), opt_batch=8)
    assert shapes == {"frames": ((1, 473, 473, 3), (8, 473, 473, 3), (16, 473, 473, 3))}
    name = trt_export.engine_file_name("query_decoder", "fp16", H100, "11.4.0.106", shapes)
    assert name == "query_decoder.fp16.nvidia-h100-80gb-hbm3.sm90.trt11.4.0.frames1-16.engine"
    aggregator = entry_with_inputs(
        "a.onnx",
        (TensorInfo("shot_features", (2, "K", 256), "float32"),),
        {"min_shots": 2, "max_shots": 32},
    )
    assert trt_export.profile_shapes(aggregator) == {
        "shot_features": ((2, 2, 256), (2, 5, 256), (2, 32, 256))
    }
    static = entry_with_inputs("s.onnx", (TensorInfo("x", (2, 1, 256), "float32"),))
    assert trt_export.profile_shapes(static) == {}
    static_name = trt_export.engine_file_name("r", "fp32", H100, "10.13.3.9", {})
    assert static_name.endswith(".static.engine")
    with pytest.raises(EngineError, match="unknown dynamic dimension"):
        trt_export.profile_shapes(entry_with_inputs("f", (TensorInfo("x", ("Q",), "uint8"),)))


def test_engine_compatibility_rule_names_the_rebuild_command() -> None:
    """The entry the exporter writes, judged by the runtime's one rule."""
    entry = trt_export.engine_entry(
        decoder_entry(), "e.engine", "fp16", H100, "11.4.0.106", {}, "abc"
    )
    assert engine_mismatch(entry, H100.name, H100.compute_capability, "11.4.0.106") == []
    manifest = Manifest(Path("engines"), MODEL, (entry,))
    other_gpu = trt_export.GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0))
    with pytest.raises(
        EngineError,
        match="built for NVIDIA H100.*this is NVIDIA A100.*"
        "python -m mfnet.export trt --onnx-dir engines "
        "--precision fp16",
    ):
        select_engines(manifest, "fp16", other_gpu.name, other_gpu.compute_capability, "11.4.0.106")
    with pytest.raises(EngineError, match="TensorRT 11.4.0.106, this is TensorRT 10.13"):
        select_engines(manifest, "fp16", H100.name, H100.compute_capability, "10.13.3.9")


def test_missing_tensorrt_names_the_install_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(trt_export.TensorRTUnavailable, match="pip install tensorrt-cu13"):
        trt_export.import_tensorrt()


def fake_tensorrt(version: str, calls: list) -> types.ModuleType:
    """The documented TensorRT Python calls used by build_engine, recording what they receive."""
    module = types.ModuleType("tensorrt")
    module.__version__ = version

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("profile", dict(profile.shapes)))

        def create_timing_cache(self, data):
            calls.append(("timing_cache_in", bytes(data)))
            return types.SimpleNamespace(serialize=lambda: b"cache-v2")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"engine-bytes"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", path.rsplit("/", 1)[-1]))
            return True

    module.Logger, module.Builder, module.OnnxParser = Logger, Builder, OnnxParser
    module.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    module.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    if version.startswith("10."):  # TensorRT 11 removed the precision flags
        module.BuilderFlag = types.SimpleNamespace(FP16="FP16")
    else:
        module.BuilderFlag = types.SimpleNamespace()
    return module


def export_dir(tmp_path):
    graphs = []
    for precision in ("fp32", "fp16"):
        for role in ("support_encoder", "query_decoder"):
            path = tmp_path / f"{role}.{precision}.onnx"
            path.write_bytes(f"{role}-{precision}".encode())
            entry = (
                decoder_entry()
                if role == "query_decoder"
                else dataclasses.replace(
                    decoder_entry(),
                    role=role,
                    inputs=(
                        TensorInfo("support_images", ("S", 473, 473, 3), "uint8"),
                        TensorInfo("support_masks", ("S", 473, 473), "uint8"),
                    ),
                    outputs=(TensorInfo("shot_features", ("S", 256), "float32"),),
                    details={"max_support": 64},
                )
            )
            graphs.append(
                dataclasses.replace(
                    entry, file=path.name, precision=precision, sha256=sha256_of(path)
                )
            )
    write_manifest(Manifest(tmp_path, MODEL, tuple(graphs)))
    return tmp_path


@pytest.mark.parametrize(
    "version, parsed, flags, fp16_flag",
    [
        ("10.11.0.33", "fp32", 0, True),
        ("10.13.3.9", "fp16", 2, False),
        ("11.4.0.106", "fp16", 2, False),
    ],
)
def test_build_engines_per_version(tmp_path, monkeypatch, version, parsed, flags, fp16_flag):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, calls))
    monkeypatch.setattr(trt_export, "current_gpu", lambda: H100)
    directory = export_dir(tmp_path)
    manifest = trt_export.build_engines(directory, "fp16", opt_batch=4, max_batch=8)
    assert ("parse", f"query_decoder.{parsed}.onnx") in calls
    assert ("network_flags", flags) in calls
    assert (("flag", "FP16") in calls) == fp16_flag
    assert ("profile", {"frames": ((1, 473, 473, 3), (4, 473, 473, 3), (8, 473, 473, 3))}) in calls
    engines = [g for g in manifest.graphs if g.format == "tensorrt"]
    assert {g.role for g in engines} == {"support_encoder", "query_decoder"}
    for engine in engines:
        assert engine.details["tensorrt"] == version
        assert engine.details["source_onnx"].endswith(f".{parsed}.onnx")
        assert engine.sha256 == sha256_of(directory / engine.file)
    assert read_manifest(directory) == manifest  # what was written is what is returned
    written = json.loads((directory / MANIFEST_NAME).read_text())["graphs"]
    assert [g["file"] for g in written] == [g.file for g in manifest.graphs]
    assert (directory / f"timing_cache.trt{version}.bin").read_bytes() == b"cache-v2"
    # a rebuild replaces the engine entries instead of adding more, and reuses the timing cache
    again = trt_export.build_engines(directory, "fp16")
    assert len([g for g in again.graphs if g.format == "tensorrt"]) == 2
    assert ("timing_cache_in", b"cache-v2") in calls


def test_build_engines_refuses_a_tampered_export(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0", []))
    monkeypatch.setattr(trt_export, "current_gpu", lambda: H100)
    directory = export_dir(tmp_path)
    (directory / "query_decoder.fp16.onnx").write_bytes(b"changed")
    with pytest.raises(EngineError, match="does not match its SHA-256"):
        trt_export.build_engines(directory, "fp16")
