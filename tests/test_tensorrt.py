"""TensorRT logic without TensorRT: version plans, names, profiles, compatibility, manifest.

TensorRT is not installable on the project's machines. ``build_engines`` is driven here through
a recording stand-in for the ``tensorrt`` module that implements only the calls the documented
API offers (TensorRT 10 has ``BuilderFlag.FP16``, deprecated from 10.12; 11 does not), so the
per-version decisions, file naming, hashing and manifest updates are checked; the engines
themselves are not.
"""

from __future__ import annotations

import json
import sys
import types

import pytest

from mfnet.export import tensorrt as trt_export
from mfnet.export.manifest import MANIFEST_NAME, SCHEMA, ManifestError, sha256_of

H100 = trt_export.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))


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


def decoder_entry(max_batch: int = 16) -> dict:
    return {
        "role": "query_decoder", "file": "query_decoder.fp16.onnx", "precision": "fp16",
        "format": "onnx", "sha256": "x",
        "inputs": [{"name": "frames", "shape": ["B", 473, 473, 3], "dtype": "uint8"},
                   {"name": "prototypes", "shape": [2, 256], "dtype": "float32"}],
        "outputs": [{"name": "labels", "shape": ["B", 473, 473], "dtype": "uint8"}],
        "details": {"max_batch": max_batch},
    }


def test_profiles_and_names() -> None:
    shapes = trt_export.profile_shapes(decoder_entry(), opt_batch=8)
    assert shapes == {"frames": ((1, 473, 473, 3), (8, 473, 473, 3), (16, 473, 473, 3))}
    name = trt_export.engine_file_name("query_decoder", "fp16", H100, "11.4.0.106", shapes)
    assert name == "query_decoder.fp16.nvidia-h100-80gb-hbm3.sm90.trt11.4.0.frames1-16.engine"
    aggregator = {"file": "a.onnx", "details": {"min_shots": 2, "max_shots": 32},
                  "inputs": [{"name": "shot_features", "shape": [2, "K", 256]}]}
    assert trt_export.profile_shapes(aggregator) == {
        "shot_features": ((2, 2, 256), (2, 5, 256), (2, 32, 256))}
    static = {"file": "s.onnx", "inputs": [{"name": "x", "shape": [2, 1, 256]}]}
    assert trt_export.profile_shapes(static) == {}
    assert trt_export.engine_file_name("r", "fp32", H100, "10.13.3.9", {}).endswith(".static.engine")
    with pytest.raises(ManifestError, match="unknown dynamic dimension"):
        trt_export.profile_shapes({"file": "f", "inputs": [{"name": "x", "shape": ["Q"]}]})


def test_engine_compatibility_check_names_the_rebuild_command() -> None:
    entry = trt_export.engine_entry(decoder_entry(), "e.engine", "fp16", H100, "11.4.0.106",
                                    {}, "abc")
    trt_export.check_engine_compatible(entry, H100, "11.4.0.106", "engines")
    other_gpu = trt_export.GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0))
    with pytest.raises(ManifestError, match="built for NVIDIA H100.*this is NVIDIA A100.*"
                                            "python export/to_trt.py --onnx-dir engines "
                                            "--precision fp16"):
        trt_export.check_engine_compatible(entry, other_gpu, "11.4.0.106", "engines")
    with pytest.raises(ManifestError, match="TensorRT 11.4.0.106, this is TensorRT 10.13"):
        trt_export.check_engine_compatible(entry, H100, "10.13.3.9", "engines")


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
            entry = decoder_entry() if role == "query_decoder" else {
                **decoder_entry(), "role": role,
                "inputs": [{"name": "support_images", "shape": ["S", 473, 473, 3],
                            "dtype": "uint8"}], "details": {"max_support": 64}}
            graphs.append({**entry, "file": path.name, "precision": precision,
                           "sha256": sha256_of(path)})
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema": SCHEMA, "graphs": graphs}))
    return tmp_path


@pytest.mark.parametrize("version, parsed, flags, fp16_flag", [
    ("10.11.0.33", "fp32", 0, True), ("10.13.3.9", "fp16", 2, False),
    ("11.4.0.106", "fp16", 2, False),
])
def test_build_engines_per_version(tmp_path, monkeypatch, version, parsed, flags, fp16_flag):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, calls))
    monkeypatch.setattr(trt_export, "current_gpu", lambda: H100)
    directory = export_dir(tmp_path)
    manifest = trt_export.build_engines(directory, "fp16", opt_batch=4, max_batch=8,
                                        log=lambda _: None)
    assert ("parse", f"query_decoder.{parsed}.onnx") in calls
    assert ("network_flags", flags) in calls
    assert (("flag", "FP16") in calls) == fp16_flag
    assert ("profile", {"frames": ((1, 473, 473, 3), (4, 473, 473, 3), (8, 473, 473, 3))}) in calls
    engines = [g for g in manifest["graphs"] if g["format"] == "tensorrt"]
    assert {g["role"] for g in engines} == {"support_encoder", "query_decoder"}
    for engine in engines:
        assert engine["details"]["tensorrt"] == version
        assert engine["details"]["source_onnx"].endswith(f".{parsed}.onnx")
        assert engine["sha256"] == sha256_of(directory / engine["file"])
    assert json.loads((directory / MANIFEST_NAME).read_text())["graphs"] == manifest["graphs"]
    assert (directory / f"timing_cache.trt{version}.bin").read_bytes() == b"cache-v2"
    # a rebuild replaces the engine entries instead of adding more, and reuses the timing cache
    again = trt_export.build_engines(directory, "fp16", log=lambda _: None)
    assert len([g for g in again["graphs"] if g["format"] == "tensorrt"]) == 2
    assert ("timing_cache_in", b"cache-v2") in calls


def test_build_engines_refuses_a_tampered_export(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0", []))
    monkeypatch.setattr(trt_export, "current_gpu", lambda: H100)
    directory = export_dir(tmp_path)
    (directory / "query_decoder.fp16.onnx").write_bytes(b"changed")
    with pytest.raises(ManifestError, match="does not match its SHA-256"):
        trt_export.build_engines(directory, "fp16", log=lambda _: None)
