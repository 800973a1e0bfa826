"""TensorRT backend: serialized engines from ``python -m mfnet.export trt``, run with
``execute_async_v3``.

Engines are tied to the GPU model and the TensorRT version that built them (the rule:
``engine_mismatch``); ``select_engines`` picks the manifest entries built for this GPU and
TensorRT (pure functions, unit-tested) and otherwise fails with the rebuild command. Device
memory, pinned host staging buffers, a non-blocking stream and optional CUDA graphs come from
NVIDIA's ``cuda-python`` bindings (no pycuda, no torch). Each engine's buffers are allocated
once, at the largest shape of its optimisation profile, and their addresses are set once. A CUDA
graph freezes the shapes and addresses (and the context state) it was captured with, so the
captured decoder batch gets an execution context of its own that nothing else enqueues on.

Status: written against the TensorRT 10/11 Python API and cuda-python's runtime bindings; run
on the CPU against fakes with device semantics (tests/gpu_fakes.py: opaque device memory,
asynchronous copies, frozen graph replay); a ``cuda`` test (tests/test_gpu_paths.py) is written
but has not run (no TensorRT and no GPU on the development machines).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngineError, rebuild_hint
from ..manifest import GraphInfo, Manifest, verify_files
from .feeds import decoder_feeds

logger = logging.getLogger("mfnet_runtime")
TENSORRT_INSTALL = (
    "TensorRT is not installed: pip install 'mfnet-runtime[tensorrt-cu13]' for a CUDA 13 driver "
    "(>= 580) or 'mfnet-runtime[tensorrt-cu12]' for a CUDA 12 driver (TensorRT and cuda-python "
    "of the same CUDA major; the libraries come from https://pypi.nvidia.com)"
)
CUDA_PYTHON_INSTALL = (
    "NVIDIA's cuda-python bindings are not installed: pip install "
    "'mfnet-runtime[tensorrt-cu13]' (CUDA 13 driver, >= 580) or "
    "'mfnet-runtime[tensorrt-cu12]' (CUDA 12 driver): the TensorRT backend "
    "manages device memory with them"
)


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as error:
        raise EngineError(TENSORRT_INSTALL) from error
    return tensorrt


def import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError as error:
            raise EngineError(CUDA_PYTHON_INSTALL) from error
    return cudart


def cuda_call(cudart: Any, result: Any, what: str) -> Any:
    """Unwrap a cuda-python ``(error, *values)`` tuple; an error becomes an ``EngineError``."""
    error, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if error != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(error)[1]
        name = name.decode() if isinstance(name, bytes) else name
        raise EngineError(f"CUDA call {what} failed: {name}")
    return values[0] if len(values) == 1 else values


def check_driver(cudart: Any) -> None:
    """Refuse a cuda-python built for a newer CUDA than the driver supports, with the fix.

    cuda-python 13 on a CUDA 12 driver (< 580) fails every call with an insufficient-driver
    error; name the extra that matches the driver instead of that error.
    """
    driver = cuda_call(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
    runtime = cuda_call(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    if driver < runtime:
        major = driver // 1000
        raise EngineError(
            f"the NVIDIA driver supports CUDA {major}.{driver % 1000 // 10}, but cuda-python is "
            f"built for CUDA {runtime // 1000}.{runtime % 1000 // 10}: install the matching "
            f"bindings with pip install 'mfnet-runtime[tensorrt-cu{major}]' (or update the "
            f"driver)"
        )


def _sm(capability: Any) -> str:
    """The SM name, e.g. "sm90" for the compute capability (9, 0)."""
    return "sm" + "".join(map(str, capability))


def engine_mismatch(
    graph: GraphInfo, gpu: str, capability: tuple[int, int], tensorrt_version: str
) -> list[str]:
    """Why the engine entry ``graph`` cannot run on ``gpu`` with this TensorRT; [] if it can.

    The compatibility rule of TensorRT engines (the builder records ``details["gpu"]``,
    ``"compute_capability"`` and ``"tensorrt"``): an engine runs only on the GPU model and
    compute capability it was built on, with the exact TensorRT version that built it.
    """
    details = graph.details
    built = tuple(details.get("compute_capability", ()))
    problems = []
    if details.get("gpu") != gpu or built != tuple(capability):
        problems.append(
            f"built for {details.get('gpu')} ({_sm(built)}), this is {gpu} ({_sm(capability)})"
        )
    if details.get("tensorrt") != tensorrt_version:
        problems.append(
            f"built with TensorRT {details.get('tensorrt')}, this is TensorRT {tensorrt_version}"
        )
    return problems


def select_engines(
    manifest: Manifest, precision: str, gpu: str, capability: tuple[int, int], tensorrt_version: str
) -> tuple[str, dict[str, GraphInfo]]:
    """(precision, role -> engine entry) built for this GPU and TensorRT version.

    ``precision`` "auto" prefers FP16 engines. Raises ``EngineError`` with the rebuild command
    when the manifest has no engines, or none that can run here.
    """
    order = ["fp16", "fp32"] if precision == "auto" else [precision]
    here = f"{gpu} ({_sm(capability)}), TensorRT {tensorrt_version}"
    engines = [g for g in manifest.graphs if g.format == "tensorrt"]
    if not engines:
        raise no_engines_error(manifest, precision)
    problems = []
    for candidate in order:
        chosen: dict[str, GraphInfo] = {}
        for role in manifest.required_roles:
            entries = [g for g in engines if g.role == role and g.precision == candidate]
            match = [
                g for g in entries if not engine_mismatch(g, gpu, capability, tensorrt_version)
            ]
            if match:
                chosen[role] = match[0]
            elif entries:
                mismatch = engine_mismatch(entries[0], gpu, capability, tensorrt_version)
                problems.append(f"{entries[0].file} was {' and '.join(mismatch)}")
            else:
                problems.append(f"no {candidate} engine for {role}")
        if len(chosen) == len(manifest.required_roles):
            return candidate, chosen
    raise EngineError(
        f"no TensorRT engines in {manifest.directory} can run on {here}: "
        f"{'; '.join(problems)}. Engines are tied to the GPU model and the TensorRT version; "
        f"rebuild them here with: {rebuild_hint(manifest.directory, order[0])}"
    )


def no_engines_error(manifest: Manifest, precision: str) -> EngineError:
    """The ``EngineError`` for an export without TensorRT engines, with the build command."""
    wanted = "fp16" if precision == "auto" else precision
    return EngineError(
        f"{manifest.directory} has no TensorRT engines; build them on this GPU "
        f"with: {rebuild_hint(manifest.directory, wanted)}"
    )


def _numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    names = {
        "FLOAT": np.float32,
        "HALF": np.float16,
        "INT8": np.int8,
        "INT32": np.int32,
        "INT64": np.int64,
        "BOOL": np.bool_,
        "UINT8": np.uint8,
    }
    for name, numpy_type in names.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return np.dtype(numpy_type)
    raise EngineError(f"engine tensor type {dtype} has no numpy equivalent")


class _Buffer:
    """Device memory plus a pinned host mirror (for truly asynchronous copies), one tensor."""

    def __init__(self, cudart: Any, nbytes: int, dtype: np.dtype) -> None:
        self.cudart, self.nbytes, self.dtype = cudart, max(nbytes, 1), dtype
        self.device = int(cuda_call(cudart, cudart.cudaMalloc(self.nbytes), "cudaMalloc"))
        self.host_ptr = int(cuda_call(cudart, cudart.cudaMallocHost(self.nbytes), "cudaMallocHost"))
        raw = ctypes.cast(self.host_ptr, ctypes.POINTER(ctypes.c_uint8))
        self.host = np.ctypeslib.as_array(raw, (self.nbytes,))  # uint8 view of the pinned block

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape)) * self.dtype.itemsize
        return self.host[:count].view(self.dtype).reshape(shape)

    def free(self) -> None:
        self.cudart.cudaFree(self.device)
        self.cudart.cudaFreeHost(self.host_ptr)


class _Engine:
    """One deserialized engine, its execution context(s) and its I/O buffers.

    ``context`` runs every call; once ``capture`` has run, ``graph_context`` (a second context
    on the same engine and buffers) holds the captured shapes and only replays the graph: an
    enqueue at another shape on the capture's context would change the state the graph reads.
    """

    def __init__(
        self,
        trt: Any,
        cudart: Any,
        runtime: Any,
        path: Path,
        graph: GraphInfo,
        stream: Any,
        directory: Path,
    ) -> None:
        self.trt, self.cudart, self.stream, self.file = trt, cudart, stream, graph.file
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(
                f"TensorRT cannot deserialize {path} (corrupt, or built by another "
                f"TensorRT); rebuild with: "
                f"{rebuild_hint(directory, graph.precision)}"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        expected = [t.name for t in graph.inputs + graph.outputs]
        if sorted(names) != sorted(expected):
            raise EngineError(f"{path.name} has tensors {names}, its manifest entry {expected}")
        self.inputs = [t.name for t in graph.inputs]
        self.outputs = [t.name for t in graph.outputs]
        self.min_shapes: dict[str, tuple[int, ...]] = {}
        self.max_shapes: dict[str, tuple[int, ...]] = {}
        for name in self.inputs:
            shape = tuple(self.engine.get_tensor_shape(name))
            low = shape
            if any(d < 0 for d in shape):  # dynamic: the profile's (min, opt, max)
                profile = self.engine.get_tensor_profile_shape(name, 0)
                low, shape = tuple(profile[0]), tuple(profile[2])
            self.min_shapes[name], self.max_shapes[name] = low, shape
        self.context = self._new_context(self.max_shapes)
        for name in self.outputs:
            self.max_shapes[name] = tuple(self.context.get_tensor_shape(name))
        self.buffers: dict[str, _Buffer] = {}
        for name in names:
            dtype = _numpy_dtype(trt, self.engine.get_tensor_dtype(name))
            nbytes = int(np.prod(self.max_shapes[name])) * dtype.itemsize
            self.buffers[name] = _Buffer(cudart, nbytes, dtype)
        self._bind_addresses(self.context)
        self.graph_context: Any = None
        self.graph_exec: Any = None
        self.graph_shapes: dict[str, tuple[int, ...]] | None = None

    def _new_context(self, shapes: dict[str, tuple[int, ...]]) -> Any:
        context = self.engine.create_execution_context()
        if context is None:
            raise EngineError(
                f"TensorRT could not create an execution context for {self.file} "
                "(out of device memory?)"
            )
        for name in self.inputs:
            self._set_shape(context, name, shapes[name])
        return context

    def _set_shape(self, context: Any, name: str, shape: tuple[int, ...]) -> None:
        if not context.set_input_shape(name, shape):
            raise EngineError(
                f"TensorRT refused the shape {shape} for input {name} of "
                f"{self.file} (its profile allows {self.min_shapes[name]} to "
                f"{self.max_shapes[name]})"
            )

    def _bind_addresses(self, context: Any) -> None:
        for name, buffer in self.buffers.items():
            if not context.set_tensor_address(name, buffer.device):  # once: fixed
                raise EngineError(
                    f"TensorRT refused the device address of tensor {name} of "
                    f"{self.file} (set_tensor_address returned False)"
                )

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        cuda_call(
            self.cudart,
            self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream),
            "cudaMemcpyAsync",
        )

    def _enqueue(self, context: Any) -> None:
        if not context.execute_async_v3(int(self.stream)):
            raise EngineError(f"TensorRT execute_async_v3 failed for {self.file} (see its log)")

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """``EngineError`` when a feed lies outside the optimisation profile (either end)."""
        for name, shape in shapes.items():
            low, high = self.min_shapes[name], self.max_shapes[name]
            if len(shape) != len(high) or any(s > m for s, m in zip(shape, high, strict=True)):
                raise EngineError(
                    f"{name} of shape {shape} exceeds the profile of {self.file} (largest {high})"
                )
            if any(s < m for s, m in zip(shape, low, strict=False)):
                raise EngineError(
                    f"{name} of shape {shape} is below the profile of "
                    f"{self.file} (smallest {low}): e.g. fewer shots per class "
                    f"than the engine was built for"
                )

    def run(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> list[np.ndarray]:
        """Copy ``feeds`` in, execute (or replay the captured graph), copy ``fetch`` out."""
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        shapes = {name: tuple(array.shape) for name, array in feeds.items()}
        self.check_shapes(shapes)
        replay = self.graph_exec is not None and shapes == self.graph_shapes
        context = self.graph_context if replay else self.context
        for name, array in feeds.items():
            buffer = self.buffers[name]
            np.copyto(buffer.view(shapes[name]), array, casting="no")
            self._copy(buffer.device, buffer.host_ptr, array.nbytes, h2d)
            if not replay:  # the graph context keeps the captured shapes
                self._set_shape(context, name, shapes[name])
        if replay:
            cuda_call(
                self.cudart,
                self.cudart.cudaGraphLaunch(self.graph_exec, self.stream),
                "cudaGraphLaunch",
            )
        else:
            self._enqueue(context)
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        results = []
        for name in fetch:
            shape = tuple(context.get_tensor_shape(name))
            buffer = self.buffers[name]
            view = buffer.view(shape)
            self._copy(buffer.host_ptr, buffer.device, view.nbytes, d2h)
            results.append(view)
        cuda_call(
            self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize"
        )
        return [view.copy() for view in results]  # the pinned buffers are reused next call

    def capture(self, feeds: dict[str, np.ndarray]) -> None:
        """Capture ``execute_async_v3`` at the shapes of ``feeds`` as a CUDA graph, on a
        context of its own.

        As trtexec does: run once uncaptured first (initialisation must not be captured), then
        capture on the non-blocking stream in thread-local mode (other threads may use CUDA).
        """
        shapes = {name: tuple(a.shape) for name, a in feeds.items()}
        self.check_shapes(shapes)
        context = self._new_context(shapes)
        self._bind_addresses(context)
        self._enqueue(context)
        cudart = self.cudart
        cuda_call(cudart, cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_call(
            cudart, cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture"
        )
        try:
            self._enqueue(context)
        except Exception:
            cudart.cudaStreamEndCapture(self.stream)  # or the stream stays in capture mode
            raise
        graph = cuda_call(cudart, cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        try:
            self.graph_exec = cuda_call(
                cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate"
            )
        finally:
            cudart.cudaGraphDestroy(graph)
        self.graph_context, self.graph_shapes = context, shapes

    def close(self) -> None:
        if self.graph_exec is not None:
            self.cudart.cudaGraphExecDestroy(self.graph_exec)
            self.graph_exec = None
        for buffer in self.buffers.values():
            buffer.free()
        self.buffers.clear()
        self.graph_context = self.context = self.engine = None


class TensorRTBackend:
    """The manifest's TensorRT engines for this GPU, on one non-default CUDA stream."""

    def __init__(
        self,
        manifest: Manifest,
        precision: str = "auto",
        verify_hashes: bool = True,
        cuda_graph_batch: int = 0,
        device_id: int = 0,
    ) -> None:
        if not any(g.format == "tensorrt" for g in manifest.graphs):  # before any import
            raise no_engines_error(manifest, precision)
        trt = import_tensorrt()
        cudart = import_cudart()
        check_driver(cudart)
        count = cuda_call(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if count <= device_id:
            raise EngineError(f"no CUDA GPU {device_id} is visible ({count} found)")
        cuda_call(cudart, cudart.cudaSetDevice(device_id), "cudaSetDevice")
        props = cuda_call(
            cudart, cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties"
        )
        name = props.name
        name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
        self.precision, graphs = select_engines(
            manifest, precision, name, (props.major, props.minor), trt.__version__
        )
        verify_files(manifest, list(graphs.values()), check_hashes=verify_hashes)
        self.name = "tensorrt"
        self._cudart = cudart
        self._lock = threading.Lock()  # one context per engine: calls are serialised
        # Non-blocking: legacy default-stream work of other threads (or libraries) neither
        # serialises with this stream nor invalidates a capture on it.
        self._stream = cuda_call(
            cudart,
            cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
            "cudaStreamCreateWithFlags",
        )
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engines: dict[str, _Engine] = {}
        try:
            for role, graph in graphs.items():
                self._engines[role] = _Engine(
                    trt,
                    cudart,
                    self._runtime,
                    manifest.directory / graph.file,
                    graph,
                    self._stream,
                    manifest.directory,
                )
        except Exception:
            self.close()
            raise
        self.max_batch = self._engines["query_decoder"].max_shapes["frames"][0]
        self.max_support = self._engines["support_encoder"].max_shapes["support_images"][0]
        self.max_shots = self._engines["prototype_aggregator"].max_shapes["shot_features"][1]
        self.prototypes_form = str(graphs["query_decoder"].prototypes_form)
        if cuda_graph_batch:
            self._capture_decoder(min(cuda_graph_batch, self.max_batch), manifest)

    def _capture_decoder(self, batch: int, manifest: Manifest) -> None:
        size, way = manifest.model.input_size, manifest.model.way
        shared = np.zeros((way, manifest.model.channels), np.float32)
        slot_mask = np.ones(way, np.uint8) if manifest.model.way_flexible else None
        frames = np.zeros((batch, size, size, 3), np.uint8)
        feeds = decoder_feeds(frames, shared, self.prototypes_form, slot_mask)
        try:
            self._engines["query_decoder"].capture(feeds)
        except EngineError as error:  # capture is an optimisation: fall back to plain enqueue
            logger.warning("decoder CUDA graph capture failed, not used: %s", error)
            return
        logger.info("decoder captured as a CUDA graph at batch %d", batch)

    def run_support_encoder(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._engines["support_encoder"].run(
                {"support_images": images, "support_masks": masks}, ["shot_features"]
            )[0]

    def run_aggregator(self, shot_features: np.ndarray, single: bool = False) -> np.ndarray:
        role = "prototype_aggregator_single" if single else "prototype_aggregator"
        with self._lock:
            return self._engines[role].run({"shot_features": shot_features}, ["prototypes"])[0]

    def run_decoder(
        self,
        frames: np.ndarray,
        prototypes: np.ndarray,
        with_probabilities: bool = False,
        slot_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        fetch = ["labels", "probabilities"] if with_probabilities else ["labels"]
        feeds = decoder_feeds(frames, prototypes, self.prototypes_form, slot_mask)
        with self._lock:
            outputs = self._engines["query_decoder"].run(feeds, fetch)
        return outputs[0], outputs[1] if with_probabilities else None

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
