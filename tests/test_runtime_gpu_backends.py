"""The runtime's GPU backends (TensorRT; ONNX Runtime's CUDA provider with IOBinding and CUDA
graphs) on the fakes of ``gpu_fakes`` (device semantics, no GPU), against ONNX Runtime's CPU
provider on the same frames.

Each test here guards one property a real GPU would break: ordering of asynchronous copies,
frozen graph replay, the TensorRT context per captured batch, the checked results of TensorRT's
setters, both ends of the optimisation profile, stream flags, the driver / cuda-python match and
the release of device memory. The same paths run on a GPU in ``test_gpu_paths.py`` (``cuda``).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    import mfnet_runtime  # noqa: F401  (installed with pip install -e ./runtime)
except ImportError:  # a source checkout without the runtime installed
    sys.path.insert(0, str(ROOT / "runtime"))

from gpu_fakes import (  # noqa: E402
    Device,
    DevicePointer,
    FakeCudart,
    FakeOnnxRuntime,
    FakeTensorRT,
    add_fake_engines,
)
from mfnet_runtime import EngineError, Segmenter  # noqa: E402
from mfnet_runtime.backends import onnxruntime as ort_backend  # noqa: E402
from mfnet_runtime.backends import tensorrt as trt_backend  # noqa: E402
from mfnet_runtime.manifest import read_manifest  # noqa: E402
from runtime_fixtures import export_varied  # noqa: E402


@pytest.fixture(scope="module")
def exported_2shot(tmp_path_factory) -> Path:
    """A 2-way export of a 2-shot model (A_S: the multi-shot aggregator needs K >= 2), whose
    labels vary across the image."""
    return export_varied(tmp_path_factory.mktemp("gpu2s"), 2, 2)[0]


@pytest.fixture
def engines(exported_2shot, tmp_path) -> Path:
    directory = tmp_path / "engines"
    shutil.copytree(exported_2shot, directory)
    add_fake_engines(directory)
    return directory


def frame(seed: int, size: tuple[int, int] = (48, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def support_classes(seed: int = 50) -> dict:
    def shot(s: int) -> tuple[np.ndarray, np.ndarray]:
        mask = np.zeros((48, 48), np.uint8)
        mask[8:40, 10:34] = 1
        return frame(s), mask

    return {"a": [shot(seed), shot(seed + 1)], "b": [shot(seed + 2)]}  # K = 2 and K = 1


def use_fake_tensorrt(monkeypatch, cudart: FakeCudart) -> None:
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: FakeTensorRT(cudart))
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)


def assert_varied(labels: list[np.ndarray]) -> None:
    """Parity on these outputs means something: several labels, and the frames differ."""
    assert all(len(np.unique(x)) >= 2 for x in labels), [np.unique(x) for x in labels]
    assert not np.array_equal(labels[0], labels[1])


# ------------------------------------------------------------------------- the fakes themselves
def test_fake_device_memory_is_opaque_and_copies_land_at_synchronisation() -> None:
    cudart = FakeCudart()
    _, pointer = cudart.cudaMalloc(64)
    _, host = cudart.cudaMallocHost(64)
    _, stream = cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking)
    with pytest.raises((TypeError, ctypes.ArgumentError)):  # numpy / ctypes cannot view it
        np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_uint8)), (64,))
    assert int(pointer) >= 0x0800_0000_0000_0000  # and its integer is no host address
    kinds = cudart.cudaMemcpyKind
    h2d, d2h = kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost
    assert cudart.cudaMemcpyAsync(host, pointer, 64, h2d, stream)[0] != 0  # kinds swapped
    source = np.ctypeslib.as_array(ctypes.cast(host, ctypes.POINTER(ctypes.c_uint8)), (64,))
    source[:] = 7
    assert cudart.cudaMemcpyAsync(int(pointer), host, 64, h2d, stream) == (0,)
    source[:] = 9  # pinned memory is read when the copy runs, not when it is queued
    assert cudart.device.read(pointer, 64) == bytes(64)  # nothing landed before a sync
    assert cudart.cudaStreamSynchronize(stream) == (0,)
    assert cudart.device.read(pointer, 64) == bytes([9]) * 64
    assert cudart.device.stream_flags[int(stream)] == cudart.cudaStreamNonBlocking
    back = np.zeros(64, np.uint8)
    cudart.cudaMemcpyAsync(back.ctypes.data, int(pointer), 64, d2h, stream)
    assert not back.any()  # the host sees the bytes only after the sync
    cudart.cudaStreamSynchronize(stream)
    assert (back == 9).all()
    # a non-blocking stream does not wait for legacy default-stream work; a device sync does
    cudart.device.upload(pointer, np.full(64, 3, np.uint8), Device.LEGACY)
    cudart.cudaStreamSynchronize(stream)
    assert cudart.device.read(pointer, 64) == bytes([9]) * 64
    cudart.device.synchronize_all()
    assert cudart.device.read(pointer, 64) == bytes([3]) * 64
    assert isinstance(pointer, DevicePointer)


# ---------------------------------------------------------------------------------- TensorRT
def test_tensorrt_backend_against_onnxruntime_cpu(engines, monkeypatch) -> None:
    cudart = FakeCudart()
    use_fake_tensorrt(monkeypatch, cudart)
    free_before = cudart.cudaMemGetInfo()[1]
    segmenter = Segmenter.load(engines, cuda_graph_batch=1)  # auto: engines for this "GPU"
    reference = Segmenter.load(engines, backend="onnxruntime", device="cpu")
    assert (segmenter.backend_name, segmenter.precision, segmenter.max_batch) == (
        "tensorrt",
        "fp32",
        4,
    )
    assert segmenter.engine_id == reference.engine_id  # building engines keeps saved sets valid
    stream = segmenter._backend._stream
    assert cudart.device.stream_flags[int(stream)] == cudart.cudaStreamNonBlocking
    classes = support_classes()
    support = segmenter.encode_support(classes)
    np.testing.assert_array_equal(support.prototypes, reference.encode_support(classes).prototypes)
    # B = 1 (the captured graph), B' = 3 (plain enqueue), B = 1 again; fresh frames each call
    launches = cudart.device.launches
    calls = [[frame(60)], [frame(61), frame(62), frame(63, (40, 52))], [frame(64)]]
    outputs = []
    for frames in calls:
        ours = segmenter.segment_batch(frames, support)
        theirs = reference.segment_batch(frames, support)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
        outputs += ours
    assert_varied(outputs)
    assert cudart.device.launches == launches + 2  # both batch-1 calls replayed the graph
    np.testing.assert_allclose(
        segmenter.probabilities(frame(65), support),
        reference.probabilities(frame(65), support),
        atol=1e-6,
    )
    segmenter.close()
    assert not cudart.device.allocations("cudaMalloc")  # every buffer of the backend freed
    del segmenter, stream
    gc.collect()  # the engines' contexts (and their memory) go with their last reference
    assert not cudart.device.pinned and not cudart.device.allocations()
    assert cudart.cudaMemGetInfo()[1] == free_before


def test_tensorrt_capture_survives_default_stream_work_of_other_threads(
    engines, monkeypatch
) -> None:
    cudart = FakeCudart()
    use_fake_tensorrt(monkeypatch, cudart)
    # another thread (or library) queues work on the legacy default stream during the capture
    cudart.device.during_capture = lambda: cudart.device.enqueue(Device.LEGACY, lambda: None)
    segmenter = Segmenter.load(engines, backend="tensorrt", cuda_graph_batch=1)
    support = segmenter.encode_support(support_classes())
    launches = cudart.device.launches
    segmenter.segment(frame(70), support)
    assert cudart.device.launches == launches + 1  # the capture was valid and is replayed
    segmenter.close()


def test_tensorrt_profile_minimum_and_maximum_are_clear_errors(engines, monkeypatch) -> None:
    cudart = FakeCudart()
    use_fake_tensorrt(monkeypatch, cudart)
    backend = Segmenter.load(engines, backend="tensorrt")._backend
    with pytest.raises(
        EngineError,
        match=r"shot_features of shape \(2, 1, 16\) is below the "
        r"profile .*smallest \(2, 2, 16\).*fewer shots",
    ):
        backend.run_aggregator(np.zeros((2, 1, 16), np.float32))  # K = 1 < the minimum 2
    with pytest.raises(EngineError, match=r"frames of shape \(5, 48, 48, 3\) exceeds the profile"):
        backend.run_decoder(np.zeros((5, 48, 48, 3), np.uint8), np.zeros((2, 16), np.float32))
    backend.close()


def test_tensorrt_refused_shapes_and_addresses_name_the_tensor(engines, monkeypatch) -> None:
    class Misaligned(FakeCudart):  # TensorRT refuses I/O addresses off 256-byte alignment
        def cudaMalloc(self, nbytes):  # noqa: N802
            error, pointer = super().cudaMalloc(nbytes + 16)
            return error, DevicePointer(int(pointer) + 8)

    use_fake_tensorrt(monkeypatch, Misaligned())
    with pytest.raises(
        EngineError,
        match=r"refused the device address of tensor \w+ of "
        r"support_encoder.*set_tensor_address returned False",
    ):
        Segmenter.load(engines, backend="tensorrt")
    cudart = FakeCudart()
    use_fake_tensorrt(monkeypatch, cudart)
    backend = Segmenter.load(engines, backend="tensorrt")._backend
    context_class = type(backend._engines["query_decoder"].context)
    accept = context_class.set_input_shape
    monkeypatch.setattr(
        context_class,
        "set_input_shape",  # e.g. a shape TensorRT cannot run
        lambda self, name, shape: tuple(shape)[0] != 3 and accept(self, name, shape),
    )
    with pytest.raises(
        EngineError,
        match=r"refused the shape \(3, 48, 48, 3\) for input "
        r"frames of query_decoder",
    ):
        backend.run_decoder(np.zeros((3, 48, 48, 3), np.uint8), np.zeros((2, 16), np.float32))
    backend.close()


def test_tensorrt_driver_mismatch_and_auto_fallback_warn(engines, monkeypatch, caplog) -> None:
    cudart = FakeCudart(driver_version=12080, runtime_version=13000)  # cuda-python 13, driver 12
    use_fake_tensorrt(monkeypatch, cudart)
    with pytest.raises(
        EngineError,
        match=r"driver supports CUDA 12.8, but cuda-python is built "
        r"for CUDA 13.0.*mfnet-runtime\[tensorrt-cu12\]",
    ):
        Segmenter.load(engines, backend="tensorrt")
    with caplog.at_level(logging.INFO, logger="mfnet_runtime"):
        assert Segmenter.load(engines, device="auto").backend_name.startswith("onnxruntime")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "TensorRT engines not used" in r.getMessage() and "tensorrt-cu12" in r.getMessage()
        for r in warnings
    ), caplog.text
    # engines built for another GPU: refused with the rebuild command; auto warns and falls back
    caplog.clear()
    use_fake_tensorrt(monkeypatch, FakeCudart("NVIDIA L4", (8, 9)))
    with pytest.raises(
        EngineError,
        match=r"built for NVIDIA Fake GPU \(sm90\), this is "
        r"NVIDIA L4 \(sm89\).*rebuild them here with: "
        r"python -m mfnet.export trt --onnx-dir .* "
        r"--precision fp16",
    ):
        Segmenter.load(engines, backend="tensorrt")
    with caplog.at_level(logging.INFO, logger="mfnet_runtime"):
        assert Segmenter.load(engines).backend_name.startswith("onnxruntime")
    assert any(
        r.levelno == logging.WARNING and "rebuild them here" in r.getMessage()
        for r in caplog.records
    )


def test_no_engines_is_no_warning(exported_2shot, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mfnet_runtime"):
        assert Segmenter.load(exported_2shot).backend_name.startswith("onnxruntime")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_tensorrt_tampered_engine_and_missing_packages(engines, monkeypatch) -> None:
    add_fake_engines(engines, precision="fp16")
    manifest = read_manifest(engines)
    gpu, sm = "NVIDIA Fake GPU", (9, 0)
    precision, chosen = trt_backend.select_engines(manifest, "auto", gpu, sm, "10.9.0")
    assert precision == "fp16" and set(chosen) == set(manifest.required_roles)
    assert all(g.format == "tensorrt" and g.precision == "fp16" for g in chosen.values())
    assert trt_backend.select_engines(manifest, "fp32", gpu, sm, "10.9.0")[0] == "fp32"
    with pytest.raises(EngineError, match=r"can run on .*TensorRT 10.8"):
        trt_backend.select_engines(manifest, "auto", gpu, sm, "10.8.1")
    use_fake_tensorrt(monkeypatch, FakeCudart())
    engine_file = next(engines.glob("query_decoder.fp32*.engine"))
    engine_file.write_text("{}")
    with pytest.raises(
        EngineError, match=r"does not match its SHA-256.*python -m mfnet.export trt"
    ):
        Segmenter.load(engines, backend="tensorrt", precision="fp32")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(
        EngineError,
        match=r"TensorRT is not installed: pip install "
        r"'mfnet-runtime\[tensorrt-cu13\]'",
    ):
        trt_backend.import_tensorrt()
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        Segmenter.load(engines, backend="tensorrt")
    for module in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(EngineError, match=r"cuda-python bindings are not installed.*tensorrt-cu12"):
        trt_backend.import_cudart()


# ------------------------------------------------------------------ ONNX Runtime CUDA provider
@pytest.mark.parametrize("graph_batch", [0, 2], ids=["iobinding", "cuda-graph"])
def test_onnxruntime_cuda_paths_against_the_cpu_provider(
    exported_2shot, monkeypatch, graph_batch
) -> None:
    reference = Segmenter.load(exported_2shot, backend="onnxruntime", device="cpu")
    support = reference.encode_support(support_classes())
    calls = [
        [frame(80), frame(81)],
        [frame(82), frame(83), frame(84, (40, 52))],
        [frame(85), frame(86)],
    ]  # B, B', B: fresh frames every call
    expected = [reference.segment_batch(frames, support) for frames in calls]
    expected_probabilities = reference.probabilities(frame(87), support)
    fake = FakeOnnxRuntime()
    monkeypatch.setattr(ort_backend, "ort", fake)
    segmenter = Segmenter.load(
        exported_2shot,
        backend="onnxruntime",
        device="cuda",
        precision="fp32",
        cuda_graph_batch=graph_batch,
    )
    assert segmenter.backend_name == "onnxruntime-cuda"
    outputs = []
    for frames, theirs in zip(calls, expected, strict=True):
        ours = segmenter.segment_batch(frames, support)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
        outputs += ours
    assert_varied(outputs)
    np.testing.assert_allclose(
        segmenter.probabilities(frame(87), support), expected_probabilities, atol=1e-6
    )
    graph_sessions = [s for s in fake.sessions if s.cuda_graph]
    if graph_batch:
        assert len(graph_sessions) == 1 and graph_sessions[0].replays == 1  # 2nd B-call replays
    else:
        assert not graph_sessions
    segmenter.close()
