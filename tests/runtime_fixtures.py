"""Tiny models whose labels vary, their exports, and the check that compared label maps vary.

Label parity ("the export gives the same labels as PyTorch") can only fail when the labels are
not all alike. An untrained model labels every pixel with one class (one logit's bias
dominates), so ``varied_model`` calibrates the small seeded model instead of training it: the
classifier (the decoder's last 1x1 conv) is rescaled so that each class logit has zero mean and
unit spread over synthetic episodes of fold 1 (the tests use fold 0). It then checks its own
guarantee on held-out fold-0 episodes and raises if it does not hold:

- every label 0..N occurs on every checked query, and
- no two checked queries get the same label map.

Nothing is trained: the runtime is checked against the PyTorch model itself, not against
accuracy. Every label-parity test calls ``assert_labels_vary`` on the maps it compares before
comparing them, so a test whose inputs happen to give constant or repeated maps fails instead
of passing vacuously. The session fixture ``varied_export`` (tests/conftest.py) exports each
configuration once per test session.
"""

from __future__ import annotations

import ctypes
import json
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mfnet.config import preset
from mfnet.data.episodes import synthetic_episodes
from mfnet.export.onnx_export import ExportLimits, export_onnx
from mfnet.model.backbone import feature_size
from mfnet.model.build import build_mfnet
from mfnet.model.mfnet import MFNet
from mfnet.training.checkpoint import save_checkpoint

LIMITS = ExportLimits(max_batch=4, max_support=16, max_shots=8)
CHECK_EPISODES = 3  # held-out queries on which varied_model checks its guarantee


def assert_labels_vary(label_maps: Sequence[np.ndarray], inputs: Sequence[np.ndarray] = (),
                       min_labels: int = 2) -> None:
    """Fail unless each map holds >= ``min_labels`` distinct labels and no two maps (nor two
    ``inputs``, the frames they came from) are equal: the precondition of a label comparison
    that can fail, e.g. on a frame reordering or a swap of two classes."""
    maps = [np.asarray(m) for m in label_maps]
    assert maps, "no label maps to compare"
    for index, labels in enumerate(maps):
        present = np.unique(labels)
        assert len(present) >= min_labels, (
            f"label map {index} holds only labels {present.tolist()}: a comparison on it "
            f"cannot detect swapped classes")
    for group, name in ((maps, "label map"), ([np.asarray(x) for x in inputs], "input")):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                assert not np.array_equal(group[i], group[j]), (
                    f"{name}s {i} and {j} are equal: a comparison on them cannot detect a "
                    f"reordering")


def _calibrate_classifier(model: MFNet, shot: int, size: int) -> None:
    """Standardise each class logit over episodes of fold 1 (never the tests' fold 0)."""
    episodes = synthetic_episodes(fold=1, split="test", way=model.way, shot=shot, num_episodes=4,
                                  seed=123, image_size=size,
                                  feature_size=feature_size(model.config.backbone, size))
    logits = []
    hook = model.decoder.classifier.register_forward_hook(lambda _m, _i, out: logits.append(out))
    try:
        with torch.no_grad():
            for episode in episodes:
                cache = model.encode_support(episode["support_images"], episode["support_masks"])
                model.decode_query(episode["query_image"][None], cache)
    finally:
        hook.remove()
    stacked = torch.cat(logits)  # [E, N+1, h, w] feature-resolution logits
    mean = stacked.mean(dim=(0, 2, 3))
    std = stacked.std(dim=(0, 2, 3)).clamp_min(1e-6)
    classifier = model.decoder.classifier
    with torch.no_grad():
        classifier.weight.div_(std.view(-1, 1, 1, 1))
        classifier.bias.sub_(mean).div_(std)


def varied_model(way: int = 2, shot: int = 1, size: int = 48) -> tuple[MFNet, dict]:
    """The small synthetic-cpu model (16 channels) under ``torch.manual_seed(0)``, calibrated so
    that its labels vary, in eval mode, + its config dict. Raises AssertionError when the
    guarantee of the module docstring does not hold on fold-0 test episodes."""
    config = preset("synthetic-cpu").replace(image_size=size, channels=16, way=way, shot=shot)
    torch.manual_seed(0)
    model = build_mfnet(config.model).eval()
    _calibrate_classifier(model, shot, size)
    episodes = synthetic_episodes(fold=0, split="test", way=way, shot=shot,
                                  num_episodes=CHECK_EPISODES, seed=7, image_size=size,
                                  feature_size=feature_size(config.model.backbone, size))
    with torch.no_grad():
        cache = model.encode_support(episodes[0]["support_images"],
                                     episodes[0]["support_masks"])
        queries = torch.stack([episode["query_image"] for episode in episodes])  # [E, 3, H, W]
        labels = model.decode_query(queries, cache).argmax(1).numpy()  # [E, H, W]
    assert_labels_vary(list(labels), min_labels=way + 1)
    return model, config.to_dict()


def export_varied(tmp_dir: str | Path, way: int = 2, shot: int = 1, size: int = 48,
                  precisions: tuple[str, ...] = ("fp32",)) -> tuple[Path, Path, dict]:
    """Checkpoint of ``varied_model`` + its ONNX export (verified, as every export) under
    ``tmp_dir``. Returns (engine_dir, checkpoint_path, manifest); the engine directory holds
    ``manifest.json``."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    model, config = varied_model(way, shot, size)
    tag = f"{way}way-{shot}shot-{size}-{'-'.join(precisions)}"
    checkpoint = tmp_dir / f"varied-{tag}.pt"
    save_checkpoint(checkpoint, {"config": config, "model": model.state_dict()})
    engine_dir = tmp_dir / f"engines-{tag}"
    manifest = export_onnx(checkpoint, engine_dir, precisions=precisions, limits=LIMITS,
                           log=lambda _: None)
    return engine_dir, checkpoint, manifest


# ------------------------------------------------------------------ fake TensorRT + cuda-python
# No TensorRT or GPU exists on the development machines. These fakes emulate the parts of the
# tensorrt and cuda-python APIs that the runtime's TensorRT backend calls, with real memory
# semantics: "device" pointers are host addresses, copies are memmoves, an engine reads its
# inputs from and writes its outputs to the addresses set on its context (running the ONNX
# graph with ONNX Runtime), and stream capture records work that a graph launch replays.
# They test the backend's bookkeeping (buffers, shapes, copies, capture), not TensorRT.


class FakeCudart:
    """cuda-python's ``runtime`` module, in host memory."""

    class cudaError_t:  # noqa: N801 (the real names)
        cudaSuccess = 0  # noqa: N815

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1  # noqa: N815
        cudaMemcpyDeviceToHost = 2  # noqa: N815

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeThreadLocal = 1  # noqa: N815

    def __init__(self, gpu: str = "NVIDIA Fake GPU", capability: tuple[int, int] = (9, 0)):
        self.gpu, self.capability = gpu, capability
        self.blocks: dict[int, ctypes.Array] = {}
        self.capturing: list | None = None
        self.launches = 0

    def cudaGetErrorName(self, error):  # noqa: N802
        return 0, b"cudaErrorFake"

    def cudaGetDeviceCount(self):  # noqa: N802
        return 0, 1

    def cudaSetDevice(self, device):  # noqa: N802
        return (0,)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        name = self.gpu.encode() + b"\0" * 8  # a fixed-size char array, as the real struct
        return 0, types.SimpleNamespace(name=name, major=self.capability[0],
                                        minor=self.capability[1])

    def cudaMalloc(self, nbytes):  # noqa: N802
        block = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(block)] = block
        return 0, ctypes.addressof(block)

    cudaMallocHost = cudaMalloc  # noqa: N815

    def cudaFree(self, pointer):  # noqa: N802
        del self.blocks[pointer]
        return (0,)

    cudaFreeHost = cudaFree  # noqa: N815

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamCreate(self):  # noqa: N802
        return 0, 7

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (0,)

    cudaStreamDestroy = cudaStreamSynchronize  # noqa: N815

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        return 0, list(graph)

    def cudaGraphLaunch(self, graph, stream):  # noqa: N802
        self.launches += 1
        for work in graph:
            work()
        return (0,)

    def cudaGraphDestroy(self, graph):  # noqa: N802
        return (0,)

    cudaGraphExecDestroy = cudaGraphDestroy  # noqa: N815


class _FakeContext:
    def __init__(self, engine: _FakeEngine) -> None:
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        symbols = {}
        for spec in self.engine.inputs:
            for dim, size in zip(spec["shape"], self.shapes[spec["name"]]):
                symbols[dim] = size
        spec = next(s for s in self.engine.outputs if s["name"] == name)
        return tuple(symbols.get(d, d) for d in spec["shape"])

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream_handle):
        shapes = {s["name"]: self.shapes[s["name"]] for s in self.engine.inputs}

        def work() -> None:  # the shapes are baked in, as in a captured graph
            feeds = {}
            for spec in self.engine.inputs:
                dtype, shape = np.dtype(spec["dtype"]), shapes[spec["name"]]
                nbytes = int(np.prod(shape)) * dtype.itemsize
                raw = (ctypes.c_uint8 * nbytes).from_address(self.addresses[spec["name"]])
                feeds[spec["name"]] = np.frombuffer(raw, dtype).reshape(shape).copy()
            outputs = self.engine.session.run(None, feeds)
            for spec, value in zip(self.engine.outputs, outputs):
                value = np.ascontiguousarray(value)
                ctypes.memmove(self.addresses[spec["name"]], value.ctypes.data, value.nbytes)

        if self.engine.cudart.capturing is not None:
            self.engine.cudart.capturing.append(work)
        else:
            work()
        return True


class _FakeEngine:
    def __init__(self, payload: dict, cudart: FakeCudart, data_types: type) -> None:
        import onnxruntime

        self.cudart, self.data_types = cudart, data_types
        self.session = onnxruntime.InferenceSession(payload["onnx"],
                                                    providers=["CPUExecutionProvider"])
        self.inputs, self.outputs = payload["inputs"], payload["outputs"]
        self.profile = payload["profile"]
        self.names = [s["name"] for s in self.inputs + self.outputs]
        self.num_io_tensors = len(self.names)

    def _spec(self, name):
        return next(s for s in self.inputs + self.outputs if s["name"] == name)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self._spec(name)["shape"])

    def get_tensor_profile_shape(self, name, profile_index):
        return tuple(tuple(shape) for shape in self.profile[name])

    def get_tensor_dtype(self, name):
        return {"float32": self.data_types.FLOAT, "uint8": self.data_types.UINT8}[
            self._spec(name)["dtype"]]

    def create_execution_context(self):
        return _FakeContext(self)


class FakeTensorRT:
    """The ``tensorrt`` module: a Runtime that "deserializes" the JSON plans of
    ``add_fake_engines`` into engines running the ONNX graph they name."""

    __version__ = "10.9.0"

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class DataType:
        FLOAT, HALF, UINT8, INT32, INT64, INT8, BOOL = range(7)

    def __init__(self, cudart: FakeCudart) -> None:
        self.cudart = cudart

    def Runtime(self, logger):  # noqa: N802
        fake = self

        class _Runtime:
            def deserialize_cuda_engine(self, plan: bytes):
                try:
                    payload = json.loads(plan)
                except ValueError:
                    return None  # what TensorRT returns for a corrupt plan
                return _FakeEngine(payload, fake.cudart, fake.DataType)

        return _Runtime()


def add_fake_engines(engine_dir: Path, gpu: str = "NVIDIA Fake GPU",
                     capability: tuple[int, int] = (9, 0), tensorrt_version: str = "10.9.0",
                     precision: str = "fp32") -> None:
    """Add "engines" (JSON plans for ``FakeTensorRT``) to an export, with the manifest entries
    the real ``export/to_trt.py`` writes (``mfnet.export.tensorrt``'s own functions)."""
    from mfnet.export import tensorrt as trt_export
    from mfnet.export.manifest import MANIFEST_NAME, read_manifest, sha256_of, write_json_atomic

    manifest = read_manifest(engine_dir)
    info = trt_export.GpuInfo(gpu, capability)
    entries = []
    for graph in manifest["graphs"]:
        if graph.get("format", "onnx") != "onnx" or graph["precision"] != "fp32":
            continue
        shapes = trt_export.profile_shapes(graph)
        name = trt_export.engine_file_name(graph["role"], precision, info, tensorrt_version,
                                           shapes)
        plan = {"onnx": str(Path(engine_dir) / graph["file"]), "inputs": graph["inputs"],
                "outputs": graph["outputs"],
                "profile": {n: [list(s) for s in shape] for n, shape in shapes.items()}}
        (Path(engine_dir) / name).write_text(json.dumps(plan))
        entries.append(trt_export.engine_entry(graph, name, precision, info, tensorrt_version,
                                               shapes, sha256_of(Path(engine_dir) / name)))
    write_json_atomic(Path(engine_dir) / MANIFEST_NAME,
                      trt_export.merge_engine_entries(manifest, entries))
