"""The Triton model repository: every config.pbtxt parsed with Triton's own model-config
protobuf schema (``tritonclient.grpc.model_config_pb2``) and checked against the ONNX graphs
it serves (names, dtypes, dims, batch limits); TensorRT plans by compute capability; the
repository replaced atomically; the command line. Not run against a real Triton server here.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

from google.protobuf import text_format  # noqa: E402

from export import to_triton as to_triton_cli  # noqa: E402
from fault_fixtures import one_error_line, siblings, snapshot  # noqa: E402
from gpu_fakes import add_fake_engines  # noqa: E402
from mfnet_runtime import triton_repository as repository  # noqa: E402
from mfnet_runtime.errors import EngineError, RuntimeInputError  # noqa: E402
from mfnet_runtime.manifest import read_manifest  # noqa: E402
from mfnet_runtime.triton_repository import RepositoryOptions, write_repository  # noqa: E402

ONNX_TYPES = {
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
}


def parse_config(path: Path):
    """config.pbtxt -> inference.ModelConfig (Triton's schema; unknown fields are errors)."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def onnx_io(path: Path) -> dict[str, tuple[str, list[int | str]]]:
    """name -> (Triton dtype, dims with symbolic dimensions as their names) of a graph's I/O."""
    graph = onnx.load(str(path), load_external_data=False).graph
    io = {}
    for value in list(graph.input) + list(graph.output):
        tensor = value.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        io[value.name] = (ONNX_TYPES[tensor.elem_type], dims)
    return io


def check_against_graph(config, graph_file: Path, batched: bool) -> None:
    """Every input and output of the config is the graph's, with its dtype and dims (the
    batch dimension left out when batched; other dynamic dimensions -1)."""
    io = onnx_io(graph_file)
    names = [t.name for t in config.input] + [t.name for t in config.output]
    assert sorted(names) == sorted(io), (names, list(io))
    for tensor in list(config.input) + list(config.output):
        dtype, dims = io[tensor.name]
        assert model_config_pb2.DataType.Name(tensor.data_type) == dtype, tensor.name
        if batched:
            assert isinstance(dims[0], str), (tensor.name, dims)  # the graph's dynamic batch
            dims = dims[1:]
        assert list(tensor.dims) == [d if isinstance(d, int) else -1 for d in dims], tensor.name


@pytest.fixture(scope="module")
def export_2shot(tmp_path_factory) -> Path:
    """A 2-shot (A_S: the K = 1 aggregator too) per-frame export, FP32."""
    from runtime_fixtures import export_varied

    return export_varied(tmp_path_factory.mktemp("triton"), 2, 2)[0]


def test_configs_parse_with_tritons_schema_and_match_the_graphs(export_2shot, tmp_path) -> None:
    out = tmp_path / "repo"
    options = RepositoryOptions(kind="cpu", instances=2, max_queue_delay_us=250)
    plans = write_repository(export_2shot, out, options)
    manifest = read_manifest(export_2shot)
    assert {p.name for p in plans} == set(repository.MODEL_ROLES)  # the model has A_S
    assert sorted(p.name for p in out.iterdir()) == sorted(repository.MODEL_ROLES)
    expected_batch = {
        "mfnet_encode_support": 16,  # LIMITS.max_support
        "mfnet_aggregate_prototypes": 0,
        "mfnet_aggregate_prototypes_single": 0,
        "mfnet_segment": 4,  # LIMITS.max_batch
    }
    for name, role in repository.MODEL_ROLES.items():
        config = parse_config(out / name / "config.pbtxt")
        graph_file = out / name / "1" / "model.onnx"
        source = manifest.graph_set("fp32")[role]
        assert hashlib.sha256(graph_file.read_bytes()).hexdigest() == source.sha256
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.default_model_filename == "model.onnx"
        assert config.max_batch_size == expected_batch[name], name
        check_against_graph(config, graph_file, batched=config.max_batch_size > 0)
        group = config.instance_group[0]
        assert len(config.instance_group) == 1 and group.count == 2
        assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_CPU"
        assert config.HasField("dynamic_batching") == (config.max_batch_size > 0)
    segment = parse_config(out / "mfnet_segment" / "config.pbtxt")
    assert list(segment.dynamic_batching.preferred_batch_size) == [4]
    assert segment.dynamic_batching.max_queue_delay_microseconds == 250
    assert [t.name for t in segment.input] == ["frames", "prototypes"]
    assert [list(t.dims) for t in segment.input] == [[48, 48, 3], [2, 16]]
    assert [list(t.dims) for t in segment.output] == [[48, 48], [3, 48, 48]]
    aggregate = parse_config(out / "mfnet_aggregate_prototypes" / "config.pbtxt")
    assert [list(t.dims) for t in aggregate.input] == [[2, -1, 16]]  # K varies per request
    described = repository.read_description(out)
    assert described["engine_id"] == manifest.engine_id
    assert described["prototypes_form"] == "per_frame"
    assert described["model"]["input_size"] == 48 and described["model"]["way"] == 2
    # what Triton's batcher feeds the served graph: two requests stacked along the batch axis
    session = onnxruntime.InferenceSession(
        str(out / "mfnet_segment" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    prototypes = rng.standard_normal((2, 2, 16)).astype(np.float32)
    labels, probabilities = session.run(None, {"frames": frames, "prototypes": prototypes})
    assert labels.shape == (2, 48, 48) and probabilities.shape == (2, 3, 48, 48)


def test_gpu_instances_gpus_and_batch_options(export_2shot, tmp_path) -> None:
    options = RepositoryOptions(gpus=(0, 2), instances=3, max_batch=3, preferred_batch_sizes=(2, 3))
    write_repository(export_2shot, tmp_path / "repo", options)
    for name in repository.MODEL_ROLES:
        config = parse_config(tmp_path / "repo" / name / "config.pbtxt")
        group = config.instance_group[0]
        assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
        assert list(group.gpus) == [0, 2] and group.count == 3
    segment = parse_config(tmp_path / "repo" / "mfnet_segment" / "config.pbtxt")
    assert segment.max_batch_size == 3
    assert list(segment.dynamic_batching.preferred_batch_size) == [2, 3]
    encoder = parse_config(tmp_path / "repo" / "mfnet_encode_support" / "config.pbtxt")
    assert encoder.max_batch_size == 3
    with pytest.raises(RuntimeInputError, match="exceed mfnet_segment's max_batch_size 3"):
        write_repository(
            export_2shot,
            tmp_path / "other",
            RepositoryOptions(max_batch=3, preferred_batch_sizes=(8,)),
        )
    assert repository.default_preferred(16) == (4, 8, 16)
    assert repository.default_preferred(12) == (4, 8, 12)
    assert repository.default_preferred(2) == (2,)
    for bad in (
        {"instances": 0},
        {"kind": "tpu"},
        {"gpus": (-1,)},
        {"kind": "cpu", "gpus": (0,)},
        {"kind": "cpu", "platform": "tensorrt"},
        {"max_queue_delay_us": -5},
        {"precision": "int8"},
    ):
        with pytest.raises(RuntimeInputError):
            RepositoryOptions(**bad)  # type: ignore[arg-type]


def test_tensorrt_engines_become_plans_by_compute_capability(export_2shot, tmp_path) -> None:
    engines = tmp_path / "engines"
    shutil.copytree(export_2shot, engines)
    add_fake_engines(engines)  # manifest entries as `python -m mfnet.export trt` writes them
    plans = write_repository(engines, tmp_path / "repo", RepositoryOptions(precision="fp32"))
    assert {p.platform for p in plans} == {"tensorrt_plan"}
    manifest = read_manifest(engines)
    for plan in plans:
        config = parse_config(tmp_path / "repo" / plan.name / "config.pbtxt")
        assert config.platform == "tensorrt_plan" and not config.default_model_filename
        assert dict(config.cc_model_filenames) == {"9.0": "model.sm90.plan"}
        plan_file = tmp_path / "repo" / plan.name / "1" / "model.sm90.plan"
        assert plan_file.read_bytes() == (engines / plan.graph.file).read_bytes()
        source = manifest.graph_set("fp32")[plan.graph.role]  # the engine's ONNX source
        check_against_graph(config, engines / source.file, batched=config.max_batch_size > 0)
    segment = parse_config(tmp_path / "repo" / "mfnet_segment" / "config.pbtxt")
    assert segment.max_batch_size == 4  # the engine profile's largest batch
    # ONNX Runtime on request; CPU instances never get plans
    forced = write_repository(
        engines, tmp_path / "onnx", RepositoryOptions(precision="fp32", platform="onnxruntime")
    )
    assert {p.platform for p in forced} == {"onnxruntime_onnx"}
    cpu = write_repository(engines, tmp_path / "cpu", RepositoryOptions(kind="cpu"))
    assert {p.platform for p in cpu} == {"onnxruntime_onnx"}
    with pytest.raises(EngineError, match="no fp32 TensorRT engine"):
        write_repository(export_2shot, tmp_path / "x", RepositoryOptions(platform="tensorrt"))


def test_a_failed_write_leaves_the_old_repository(export_2shot, tmp_path, monkeypatch) -> None:
    out = tmp_path / "repo"
    write_repository(export_2shot, out, RepositoryOptions(kind="cpu"))
    before = snapshot(out)
    calls = []
    real_copy = shutil.copyfile

    def failing_copy(source, destination):
        calls.append(source)
        if len(calls) == 3:  # in the middle of the new repository
            raise OSError(28, "No space left on device", str(destination))
        return real_copy(source, destination)

    monkeypatch.setattr(repository.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="No space left"):
        write_repository(export_2shot, out, RepositoryOptions(kind="gpu", instances=4))
    assert snapshot(out) == before  # the old repository, byte for byte
    assert siblings(out) == ["repo"]  # no staging directory left behind
    monkeypatch.setattr(repository.shutil, "copyfile", real_copy)
    write_repository(export_2shot, out, RepositoryOptions(kind="gpu", instances=4))
    assert parse_config(out / "mfnet_segment" / "config.pbtxt").instance_group[0].count == 4
    # a tampered export is refused before anything is written
    tampered = tmp_path / "tampered"
    shutil.copytree(export_2shot, tampered)
    decoder = next(tampered.glob("query_decoder.fp32.onnx"))
    decoder.write_bytes(decoder.read_bytes() + b"\0")
    with pytest.raises(EngineError, match="does not match its SHA-256"):
        write_repository(tampered, out)
    assert parse_config(out / "mfnet_segment" / "config.pbtxt").instance_group[0].count == 4


def test_an_old_shared_export_is_served_without_batching(export_2shot, tmp_path) -> None:
    import json

    old = tmp_path / "old"
    shutil.copytree(export_2shot, old)
    data = json.loads((old / "manifest.json").read_text())
    data["schema"] = "mfnet-export-v1"  # as v1.0 wrote it: [N, C] prototypes, no form field
    for graph in data["graphs"]:
        graph["details"].pop("prototypes_form", None)
        if graph["role"] == "query_decoder":
            graph["inputs"][1]["shape"] = graph["inputs"][1]["shape"][1:]
    (old / "manifest.json").write_text(json.dumps(data))
    write_repository(old, tmp_path / "repo", RepositoryOptions(kind="cpu"))
    segment = parse_config(tmp_path / "repo" / "mfnet_segment" / "config.pbtxt")
    assert segment.max_batch_size == 0 and not segment.HasField("dynamic_batching")
    assert [list(t.dims) for t in segment.input] == [[-1, 48, 48, 3], [2, 16]]
    assert repository.read_description(tmp_path / "repo")["prototypes_form"] == "shared"


def test_command_line(export_2shot, tmp_path, capsys) -> None:
    out = tmp_path / "repo"
    assert (
        to_triton_cli.main(["--engines", str(export_2shot), "--out", str(out), "--kind", "cpu"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "mfnet_segment: onnxruntime_onnx, max_batch_size 4" in printed
    assert parse_config(out / "mfnet_segment" / "config.pbtxt").name == "mfnet_segment"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert to_triton_cli.main(["--engines", str(export_2shot), "--out", str(other)]) == 2
    assert "not an MFNet model repository" in one_error_line(capsys)
    assert (other / "notes.txt").read_text() == "mine"
    assert to_triton_cli.main(["--engines", str(tmp_path / "none"), "--out", str(out)]) == 2
    one_error_line(capsys)
    args = ["--engines", str(export_2shot), "--out", str(out), "--kind", "cpu", "--gpus", "0"]
    assert to_triton_cli.main(args) == 2
    assert "gpus cannot be given for CPU instances" in one_error_line(capsys)
