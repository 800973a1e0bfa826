"""Fakes of cuda-python's runtime, TensorRT and ONNX Runtime's CUDA surface, with device semantics.

No GPU, TensorRT or onnxruntime-gpu exists on the development machines. These fakes stand in for
the parts of those APIs that the runtime's GPU backends call, and they keep the properties that
make GPU code go wrong, so that a missing synchronisation or a host read of device memory fails
here instead of on a GPU:

- **Device memory is opaque.** ``cudaMalloc`` returns a ``DevicePointer`` (an address in a range
  no host mapping uses, wrapped so that numpy and ctypes cannot view it); its bytes live in the
  fake device, reachable only through copies and kernels. A copy whose kind does not match its
  pointers (a host pointer given as device memory, or the reverse) is ``cudaErrorInvalidValue``.
- **Work is asynchronous, per stream.** Copies and kernels are queued on their stream and run
  only when that stream (or the device) is synchronised. Pinned host memory is read when the copy
  runs (a later host write is what the GPU sees), pageable memory when it is queued (the driver
  stages it). The legacy default stream (0) is its own queue: ONNX Runtime's ``update_inplace``
  copies land there, and ONNX Runtime's compute stream (non-blocking) does not wait for it.
- **Graphs freeze what they captured.** Work queued on a capturing stream is recorded, not run;
  a replay runs the recorded work with the addresses and shapes of the capture. A capture on a
  blocking stream is invalidated by legacy default-stream work from anywhere in the process
  (``Device.during_capture`` injects such work, as another thread would).
- **Stream flags are recorded** (``Device.stream_flags``).

TensorRT (``FakeTensorRT``): "engines" are JSON plans naming an ONNX graph and its optimisation
profile (``add_fake_engines``); an execution context refuses shapes outside the profile and
addresses that are not device memory (``set_input_shape`` / ``set_tensor_address`` return False,
as TensorRT's do). As TensorRT does, a context keeps its shape state in device memory, written by
each ``execute_async_v3`` from a pinned host block: a graph replays the copy of that block, so an
enqueue at another shape on the captured context corrupts the replay (an illegal-address error,
like a kernel reading past the buffers it was launched for).

ONNX Runtime (``FakeOnnxRuntime``): ``InferenceSession`` with the CUDA provider, ``OrtValue`` on
"cuda", ``IOBinding`` (bind_cpu_input / bind_output / bind_ortvalue_*, synchronize_inputs /
synchronize_outputs, copy_outputs_to_cpu) and ``enable_cuda_graph`` (capture on the first run,
frozen replay afterwards). The graphs run on ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import ctypes
import json
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

SUCCESS = 0
INVALID_VALUE = 1
INSUFFICIENT_DRIVER = 35
ILLEGAL_ADDRESS = 700
CAPTURE_INVALIDATED = 901
CAPTURE_UNSUPPORTED = 900
ERROR_NAMES = {
    SUCCESS: "cudaSuccess",
    INVALID_VALUE: "cudaErrorInvalidValue",
    INSUFFICIENT_DRIVER: "cudaErrorInsufficientDriver",
    ILLEGAL_ADDRESS: "cudaErrorIllegalAddress",
    CAPTURE_UNSUPPORTED: "cudaErrorStreamCaptureUnsupported",
    CAPTURE_INVALIDATED: "cudaErrorStreamCaptureInvalidated",
}
DEVICE_BASE = 0x0DEF_0000_0000_0000  # non-canonical on x86-64: no host mapping can be there
ALIGNMENT = 256  # cudaMalloc's alignment; TensorRT requires it of I/O addresses


class FakeCudaError(RuntimeError):
    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{ERROR_NAMES.get(code, code)}: {what}")
        self.code = code


class DevicePointer:
    """An opaque device address: ``int()`` gives the address (what TensorRT takes); numpy and
    ctypes cannot view it, and the integer points where no host memory is."""

    __slots__ = ("address",)

    def __init__(self, address: int) -> None:
        self.address = address

    def __int__(self) -> int:
        return self.address

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (DevicePointer, int)) and int(other) == self.address

    def __hash__(self) -> int:
        return hash(self.address)

    def __repr__(self) -> str:
        return f"DevicePointer({self.address:#x})"


class Stream:
    """A ``cudaStream_t``: ``int()`` is its handle (what ``execute_async_v3`` takes)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __int__(self) -> int:
        return self.handle

    def __repr__(self) -> str:
        return f"Stream({self.handle})"


class Device:
    """One fake GPU: memory blocks, per-stream queues, stream capture, sticky errors."""

    LEGACY = 0

    def __init__(self, total_bytes: int = 1 << 30) -> None:
        self.total_bytes = total_bytes
        self.blocks: dict[int, bytearray] = {}  # base address -> bytes
        self.owners: dict[int, str] = {}  # base address -> who allocated it
        self.pinned: dict[int, ctypes.Array] = {}  # host address -> pinned host block
        self.next_address = DEVICE_BASE
        self.queues: dict[int, list[Callable[[], None]]] = {self.LEGACY: []}
        self.stream_flags: dict[int, int] = {self.LEGACY: 0}
        self.capturing: dict[int, list] = {}  # stream -> recorded work
        self.invalidated: set[int] = set()
        self.during_capture: Callable[[], None] | None = None  # "another thread", once
        self.error = SUCCESS  # sticky, as after a faulting kernel
        self.launches = 0  # graph launches
        self.kernels_run = 0

    # ------------------------------------------------------------------------------ memory
    def malloc(self, nbytes: int, owner: str) -> DevicePointer:
        address = self.next_address
        self.next_address += -(-max(nbytes, 1) // ALIGNMENT) * ALIGNMENT + ALIGNMENT
        self.blocks[address] = bytearray(max(nbytes, 1))
        self.owners[address] = owner
        return DevicePointer(address)

    def free(self, pointer) -> int:
        address = int(pointer)
        if address not in self.blocks:
            return INVALID_VALUE
        del self.blocks[address], self.owners[address]
        return SUCCESS

    def used_bytes(self) -> int:
        return sum(len(block) for block in self.blocks.values())

    def allocations(self, owner: str | None = None) -> list[int]:
        return [a for a, o in self.owners.items() if owner is None or o == owner]

    def is_device(self, pointer) -> bool:
        try:
            self.view(pointer, 1)
        except FakeCudaError:
            return False
        return True

    def view(self, pointer, nbytes: int) -> memoryview:
        """The device bytes [pointer, pointer + nbytes) (a kernel's or a copy's access)."""
        if not isinstance(pointer, (int, DevicePointer)):
            raise FakeCudaError(INVALID_VALUE, f"{pointer!r} is not a device pointer")
        address = int(pointer)
        for base, block in self.blocks.items():
            if base <= address and address + nbytes <= base + len(block):
                return memoryview(block)[address - base : address - base + nbytes]
        raise FakeCudaError(ILLEGAL_ADDRESS, f"{address:#x} (+{nbytes}) is not device memory")

    def malloc_host(self, nbytes: int) -> int:
        block = ctypes.create_string_buffer(max(nbytes, 1))
        self.pinned[ctypes.addressof(block)] = block
        return ctypes.addressof(block)

    def free_host(self, pointer: int) -> int:
        return SUCCESS if self.pinned.pop(int(pointer), None) is not None else INVALID_VALUE

    def host_bytes(self, pointer, nbytes: int) -> memoryview:
        """Host memory at an integer address; a device pointer here is the caller's bug."""
        if isinstance(pointer, DevicePointer) or self.is_device(pointer):
            raise FakeCudaError(INVALID_VALUE, f"{int(pointer):#x} is device memory, used as host")
        return memoryview((ctypes.c_uint8 * nbytes).from_address(int(pointer))).cast("B")

    def is_pinned(self, pointer: int) -> bool:
        return any(
            base <= pointer < base + ctypes.sizeof(block) for base, block in self.pinned.items()
        )

    # ------------------------------------------------------------------------------ streams
    def create_stream(self, flags: int) -> Stream:
        handle = max(self.queues) + 1
        self.queues[handle] = []
        self.stream_flags[handle] = flags
        return Stream(handle)

    def destroy_stream(self, stream) -> int:
        handle = int(stream)
        if handle == self.LEGACY or handle not in self.queues:
            return INVALID_VALUE
        self.synchronize(handle)
        del self.queues[handle], self.stream_flags[handle]
        return SUCCESS

    def enqueue(self, stream, work: Callable[[], None]) -> int:
        handle = int(stream)
        if handle not in self.queues:
            return INVALID_VALUE
        if handle == self.LEGACY:  # legacy-stream work invalidates captures on blocking streams
            for captured in self.capturing:
                if self.stream_flags[captured] == 0:
                    self.invalidated.add(captured)
        if handle in self.capturing:
            self.capturing[handle].append(work)
        else:
            self.queues[handle].append(work)
        return SUCCESS

    def synchronize(self, stream) -> int:
        """Run the stream's queued work; a blocking stream also waits for the legacy one."""
        handle = int(stream)
        if handle in self.capturing:
            return CAPTURE_UNSUPPORTED
        order = [handle]
        if handle != self.LEGACY and self.stream_flags.get(handle) == 0:
            order = [self.LEGACY, handle]
        for queue in order:
            self._drain(queue)
        return self.error

    def synchronize_all(self) -> int:
        for handle in list(self.queues):
            self._drain(handle)
        return self.error

    def _drain(self, handle: int) -> None:
        queue = self.queues[handle]
        while queue:
            work = queue.pop(0)
            if self.error != SUCCESS:
                continue  # a faulted context runs nothing more
            try:
                work()
            except FakeCudaError as error:
                self.error = error.code

    # ------------------------------------------------------------------------------ capture
    def begin_capture(self, stream) -> int:
        handle = int(stream)
        if handle == self.LEGACY:
            return CAPTURE_UNSUPPORTED  # the legacy default stream cannot be captured
        self.capturing[handle] = []
        if self.during_capture is not None:
            hook, self.during_capture = self.during_capture, None
            hook()
        return SUCCESS

    def end_capture(self, stream) -> tuple[int, list | None]:
        handle = int(stream)
        work = self.capturing.pop(handle, None)
        if work is None:
            return INVALID_VALUE, None
        if handle in self.invalidated:
            self.invalidated.discard(handle)
            return CAPTURE_INVALIDATED, None
        return SUCCESS, work

    # ------------------------------------------------------------------------------ copies
    def copy_async(self, dst, src, nbytes: int, kind: int, stream) -> int:
        """cudaMemcpyAsync: pointers checked against ``kind`` now, bytes moved when run."""
        try:
            if kind == FakeCudart.cudaMemcpyKind.cudaMemcpyHostToDevice:
                self.view(dst, nbytes)
                source = self._host_source(src, nbytes)
                return self.enqueue(stream, lambda: self._write(dst, source()))
            if kind == FakeCudart.cudaMemcpyKind.cudaMemcpyDeviceToHost:
                self.view(src, nbytes)
                target = self.host_bytes(dst, nbytes)

                def work() -> None:
                    target[:] = self.view(src, nbytes)

                return self.enqueue(stream, work)
            if kind == FakeCudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice:
                self.view(dst, nbytes), self.view(src, nbytes)
                return self.enqueue(stream, lambda: self._write(dst, bytes(self.view(src, nbytes))))
        except FakeCudaError as error:
            return error.code
        return INVALID_VALUE

    def _host_source(self, src, nbytes: int) -> Callable[[], bytes]:
        host = self.host_bytes(src, nbytes)
        if self.is_pinned(int(src)):
            return lambda: bytes(host)  # DMA from pinned memory reads it when it runs
        staged = bytes(host)  # pageable: the driver stages it at the call
        return lambda: staged

    def _write(self, dst, data: bytes) -> None:
        self.view(dst, len(data))[:] = data

    def upload(self, dst, array: np.ndarray, stream) -> int:
        """A host array (pageable, staged now) to device memory, on ``stream``."""
        staged = np.ascontiguousarray(array).tobytes()
        self.view(dst, len(staged))
        return self.enqueue(stream, lambda: self._write(dst, staged))

    def read(self, src, nbytes: int) -> bytes:
        return bytes(self.view(src, nbytes))


# ------------------------------------------------------------------------------ cuda-python
class FakeCudart:
    """cuda-python's ``cuda.bindings.runtime`` module, over one ``Device``."""

    class cudaError_t:  # noqa: N801 (the real names)
        cudaSuccess = SUCCESS  # noqa: N815

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToHost = 0  # noqa: N815
        cudaMemcpyHostToDevice = 1  # noqa: N815
        cudaMemcpyDeviceToHost = 2  # noqa: N815
        cudaMemcpyDeviceToDevice = 3  # noqa: N815

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeGlobal = 0  # noqa: N815
        cudaStreamCaptureModeThreadLocal = 1  # noqa: N815

    cudaStreamDefault = 0  # noqa: N815
    cudaStreamNonBlocking = 1  # noqa: N815

    def __init__(
        self,
        gpu: str = "NVIDIA Fake GPU",
        capability: tuple[int, int] = (9, 0),
        device: Device | None = None,
        driver_version: int = 13000,
        runtime_version: int = 13000,
    ) -> None:
        self.gpu, self.capability = gpu, capability
        self.device = device or Device()
        self.driver_version, self.runtime_version = driver_version, runtime_version

    def _driver_ok(self) -> int:
        return SUCCESS if self.driver_version >= self.runtime_version else INSUFFICIENT_DRIVER

    def cudaGetErrorName(self, error):  # noqa: N802
        return SUCCESS, ERROR_NAMES.get(error, f"cudaError{error}").encode()

    def cudaDriverGetVersion(self):  # noqa: N802
        return SUCCESS, self.driver_version

    def cudaRuntimeGetVersion(self):  # noqa: N802
        return SUCCESS, self.runtime_version

    def cudaGetDeviceCount(self):  # noqa: N802
        return (self._driver_ok(), 1) if self._driver_ok() == SUCCESS else (self._driver_ok(), 0)

    def cudaSetDevice(self, device):  # noqa: N802
        return (self._driver_ok(),)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        name = self.gpu.encode() + b"\0" * 8  # a fixed-size char array, as the real struct
        return SUCCESS, types.SimpleNamespace(
            name=name, major=self.capability[0], minor=self.capability[1]
        )

    def cudaMemGetInfo(self):  # noqa: N802
        return SUCCESS, self.device.total_bytes - self.device.used_bytes(), self.device.total_bytes

    def cudaMalloc(self, nbytes):  # noqa: N802
        return SUCCESS, self.device.malloc(nbytes, "cudaMalloc")

    def cudaFree(self, pointer):  # noqa: N802
        return (self.device.free(pointer),)

    def cudaMallocHost(self, nbytes):  # noqa: N802
        return SUCCESS, self.device.malloc_host(nbytes)

    def cudaFreeHost(self, pointer):  # noqa: N802
        return (self.device.free_host(pointer),)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        return (self.device.copy_async(dst, src, nbytes, kind, stream),)

    def cudaStreamCreate(self):  # noqa: N802
        return SUCCESS, self.device.create_stream(0)

    def cudaStreamCreateWithFlags(self, flags):  # noqa: N802
        return SUCCESS, self.device.create_stream(int(flags))

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (self.device.synchronize(stream),)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return (self.device.destroy_stream(stream),)

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        return (self.device.begin_capture(stream),)

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        return self.device.end_capture(stream)

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        return SUCCESS, list(graph)

    def cudaGraphLaunch(self, graph, stream):  # noqa: N802
        self.device.launches += 1
        for work in graph:
            code = self.device.enqueue(stream, work)
            if code != SUCCESS:
                return (code,)
        return (SUCCESS,)

    def cudaGraphDestroy(self, graph):  # noqa: N802
        return (SUCCESS,)

    cudaGraphExecDestroy = cudaGraphDestroy  # noqa: N815


# ------------------------------------------------------------------------------ TensorRT
class _FakeContext:
    """An execution context: input shapes, tensor addresses, and its shape state on the device
    (a pinned host block copied to device memory by every enqueue, read by the kernel)."""

    def __init__(self, engine: _FakeEngine) -> None:
        self.engine, self.device = engine, engine.device
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.state_bytes = 8 * 8 * len(engine.inputs)  # up to 8 int64 dims per input
        self.state_device = self.device.malloc(self.state_bytes, "tensorrt")
        self.state_host = self.device.malloc_host(self.state_bytes)

    def __del__(self) -> None:  # TensorRT frees a context's memory with the context
        try:
            self.device.free(self.state_device)
            self.device.free_host(self.state_host)
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    def set_input_shape(self, name, shape):
        shape = tuple(int(d) for d in shape)
        low, _, high = self.engine.profile_of(name)
        if len(shape) != len(high) or any(
            s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=False)
        ):
            return False  # TensorRT logs and keeps the previous shape
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        symbols = {}
        for spec in self.engine.inputs:
            for dim, size in zip(spec["shape"], self.shapes.get(spec["name"], ()), strict=False):
                symbols[dim] = size
        spec = self.engine.spec(name)
        return tuple(symbols.get(d, -1) if isinstance(d, str) else d for d in spec["shape"])

    def set_tensor_address(self, name, pointer):
        if (
            name not in self.engine.names
            or not self.device.is_device(pointer)
            or int(pointer) % ALIGNMENT
        ):
            return False
        self.addresses[name] = int(pointer)
        return True

    def _encode_state(self, shapes: dict[str, tuple[int, ...]]) -> np.ndarray:
        state = np.full((len(self.engine.inputs), 8), -1, np.int64)
        for row, spec in enumerate(self.engine.inputs):
            state[row, : len(shapes[spec["name"]])] = shapes[spec["name"]]
        return state

    def execute_async_v3(self, stream_handle):
        device = self.device
        if not isinstance(stream_handle, int):
            return False
        if any(s["name"] not in self.shapes for s in self.engine.inputs) or any(
            n not in self.addresses for n in self.engine.names
        ):
            return False  # TensorRT: "not all shapes / addresses are specified"
        shapes = {s["name"]: self.shapes[s["name"]] for s in self.engine.inputs}
        addresses = dict(self.addresses)
        state = self._encode_state(shapes)
        # host side, now: the shape state into the pinned block; on the stream: block -> device
        device.host_bytes(self.state_host, self.state_bytes)[:] = state.tobytes()
        if (
            device.copy_async(
                self.state_device,
                self.state_host,
                self.state_bytes,
                FakeCudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                stream_handle,
            )
            != SUCCESS
        ):
            return False

        def kernel() -> None:  # launch parameters (addresses, shapes) are frozen here
            seen = np.frombuffer(device.read(self.state_device, self.state_bytes), np.int64)
            if not np.array_equal(seen.reshape(state.shape), state):
                raise FakeCudaError(
                    ILLEGAL_ADDRESS,
                    f"{self.engine.file}: context shape state "
                    "changed since this launch was recorded",
                )
            feeds = {}
            for spec in self.engine.inputs:
                dtype, shape = np.dtype(spec["dtype"]), shapes[spec["name"]]
                raw = device.read(addresses[spec["name"]], int(np.prod(shape)) * dtype.itemsize)
                feeds[spec["name"]] = np.frombuffer(raw, dtype).reshape(shape)
            outputs = self.engine.session.run(None, feeds)
            for spec, value in zip(self.engine.outputs, outputs, strict=False):
                data = np.ascontiguousarray(value, np.dtype(spec["dtype"])).tobytes()
                device.view(addresses[spec["name"]], len(data))[:] = data
            device.kernels_run += 1

        return device.enqueue(stream_handle, kernel) == SUCCESS


class _FakeEngine:
    def __init__(self, payload: dict, device: Device, data_types: type) -> None:
        import onnxruntime

        self.device, self.data_types = device, data_types
        self.file = Path(payload["onnx"]).name
        self.session = onnxruntime.InferenceSession(
            payload["onnx"], providers=["CPUExecutionProvider"]
        )
        self.inputs, self.outputs = payload["inputs"], payload["outputs"]
        self.profile = payload["profile"]
        self.names = [s["name"] for s in self.inputs + self.outputs]
        self.num_io_tensors = len(self.names)

    def spec(self, name):
        return next(s for s in self.inputs + self.outputs if s["name"] == name)

    def profile_of(self, name) -> tuple[tuple[int, ...], ...]:
        if name in self.profile:
            return tuple(tuple(shape) for shape in self.profile[name])
        static = tuple(self.spec(name)["shape"])
        return static, static, static

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self.spec(name)["shape"])

    def get_tensor_profile_shape(self, name, profile_index):
        return self.profile_of(name)

    def get_tensor_dtype(self, name):
        return {"float32": self.data_types.FLOAT, "uint8": self.data_types.UINT8}[
            self.spec(name)["dtype"]
        ]

    def create_execution_context(self):
        return _FakeContext(self)


class FakeTensorRT:
    """The ``tensorrt`` module: a Runtime that "deserializes" the JSON plans of
    ``add_fake_engines`` into engines running the ONNX graph they name on the fake device."""

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class DataType:
        FLOAT, HALF, UINT8, INT32, INT64, INT8, BOOL = range(7)

    def __init__(self, cudart: FakeCudart, version: str = "10.9.0") -> None:
        self.cudart, self.__version__ = cudart, version

    def Runtime(self, logger):  # noqa: N802
        fake = self

        class _Runtime:
            def deserialize_cuda_engine(self, plan: bytes):
                try:
                    payload = json.loads(plan)
                except ValueError:
                    return None  # what TensorRT returns for a corrupt plan
                if not isinstance(payload, dict) or "onnx" not in payload:
                    return None
                return _FakeEngine(payload, fake.cudart.device, fake.DataType)

        return _Runtime()


def add_fake_engines(
    engine_dir: Path,
    gpu: str = "NVIDIA Fake GPU",
    capability: tuple[int, int] = (9, 0),
    tensorrt_version: str = "10.9.0",
    precision: str = "fp32",
) -> None:
    """Add "engines" (JSON plans for ``FakeTensorRT``) to an export, with the manifest entries
    the real ``python -m mfnet.export trt`` writes (``mfnet.export.tensorrt``'s own functions)."""
    from mfnet.export import tensorrt as trt_export
    from mfnet_runtime.manifest import read_manifest, sha256_of, write_manifest

    def tensors(items):
        return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in items]

    manifest = read_manifest(engine_dir)
    info = trt_export.GpuInfo(gpu, capability)
    entries = []
    for graph in manifest.graphs:
        if graph.format != "onnx" or graph.precision != "fp32":
            continue
        shapes = trt_export.profile_shapes(graph)
        name = trt_export.engine_file_name(graph.role, precision, info, tensorrt_version, shapes)
        plan = {
            "onnx": str(Path(engine_dir) / graph.file),
            "inputs": tensors(graph.inputs),
            "outputs": tensors(graph.outputs),
            "profile": {n: [list(s) for s in shape] for n, shape in shapes.items()},
        }
        (Path(engine_dir) / name).write_text(json.dumps(plan))
        entries.append(
            trt_export.engine_entry(
                graph,
                name,
                precision,
                info,
                tensorrt_version,
                shapes,
                sha256_of(Path(engine_dir) / name),
            )
        )
    write_manifest(trt_export.merge_engine_entries(manifest, entries))


# ------------------------------------------------------------------------------ ONNX Runtime
class FakeOnnxRuntime:
    """The ``onnxruntime`` module as onnxruntime-gpu presents it, over one ``Device``.

    ONNX Runtime's CUDA provider computes on a stream of its own, created non-blocking, and a
    ``Run`` synchronises that stream before returning. ``OrtValue.update_inplace`` on a CUDA
    value is a ``cudaMemcpy`` from pageable host memory (ONNX Runtime's ``CpuToCudaMemCpy``):
    CUDA documents that such a copy may return once the bytes are staged, before they land, and
    it runs on the legacy default stream; here it is staged at the call and lands at a
    synchronisation of that stream or the device. ``IOBinding.synchronize_inputs`` /
    ``synchronize_outputs`` synchronise the device (the providers' ``Sync``). ``numpy()`` of a
    CUDA value is a device-to-host copy on the legacy stream.
    """

    def __init__(self, device: Device | None = None) -> None:
        import onnxruntime

        self.real = onnxruntime
        self.device = device or Device()
        self.SessionOptions = onnxruntime.SessionOptions
        self.GraphOptimizationLevel = onnxruntime.GraphOptimizationLevel
        self.compute_stream = self.device.create_stream(FakeCudart.cudaStreamNonBlocking)
        fake = self

        class OrtValue:
            def __init__(self, shape, dtype, pointer) -> None:
                self._shape, self._dtype, self.pointer = tuple(shape), np.dtype(dtype), pointer

            @staticmethod
            def ortvalue_from_shape_and_type(shape, dtype, device_type="cpu", device_id=0):
                if device_type != "cuda":
                    raise ValueError("the fake holds CUDA OrtValues only")
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                return OrtValue(shape, dtype, fake.device.malloc(nbytes, "onnxruntime"))

            def nbytes(self) -> int:
                return int(np.prod(self._shape)) * self._dtype.itemsize

            def shape(self):
                return list(self._shape)

            def device_name(self):
                return "cuda"

            def data_ptr(self):
                return int(self.pointer)

            def update_inplace(self, array) -> None:
                array = np.asarray(array)
                if array.shape != self._shape or array.dtype != self._dtype:
                    raise ValueError(
                        f"update_inplace: {array.shape} {array.dtype} into "
                        f"{self._shape} {self._dtype}"
                    )
                fake.device.upload(self.pointer, array, Device.LEGACY)

            def numpy(self) -> np.ndarray:
                fake.device.synchronize(Device.LEGACY)  # cudaMemcpy: legacy stream only
                return (
                    np.frombuffer(fake.device.read(self.pointer, self.nbytes()), self._dtype)
                    .reshape(self._shape)
                    .copy()
                )

        self.OrtValue = OrtValue
        self.sessions: list = []

    def get_available_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, path, options=None, providers=None):  # noqa: N802
        session = _FakeSession(self, path, options, providers or [])
        self.sessions.append(session)
        return session


class _FakeIOBinding:
    def __init__(self, session: _FakeSession) -> None:
        self.session = session
        self.inputs: dict[str, tuple[str, object]] = {}  # name -> ("cpu", array) | ("cuda", v)
        self.outputs: dict[str, object] = {}  # name -> OrtValue | "cuda" (allocate at run)
        self.results: dict[str, object] = {}

    def bind_cpu_input(self, name, array) -> None:
        self.inputs[name] = ("cpu", np.ascontiguousarray(array))

    def bind_ortvalue_input(self, name, value) -> None:
        self.inputs[name] = ("cuda", value)

    def bind_output(self, name, device_type="cpu", device_id=0, *args) -> None:
        self.outputs[name] = device_type

    def bind_ortvalue_output(self, name, value) -> None:
        self.outputs[name] = value

    def synchronize_inputs(self) -> None:
        self.session.fake.device.synchronize_all()

    def synchronize_outputs(self) -> None:
        self.session.fake.device.synchronize_all()

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        return [self.results[name].numpy() for name in self.outputs]

    def get_outputs(self) -> list:
        return [self.results[name] for name in self.outputs]


class _FakeSession:
    def __init__(self, fake: FakeOnnxRuntime, path, options, providers) -> None:
        self.fake, self.path = fake, str(path)
        self.real = fake.real.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        settings = next(
            (p[1] for p in providers if isinstance(p, tuple) and p[0] == "CUDAExecutionProvider"),
            {},
        )
        self.providers = [n for n in names if n in fake.get_available_providers()]
        self.cuda_graph = settings.get("enable_cuda_graph") in ("1", 1, True)
        self.graph: list | None = None  # the captured run (with enable_cuda_graph)
        self.runs = self.replays = 0
        self.specs = {i.name: i for i in self.real.get_inputs()}
        self.out_specs = {o.name: o for o in self.real.get_outputs()}

    def get_providers(self) -> list[str]:
        return list(self.providers)

    def run(self, fetch, feeds):
        return self.real.run(fetch, feeds)  # host numpy in and out: ORT copies synchronously

    def io_binding(self) -> _FakeIOBinding:
        return _FakeIOBinding(self)

    def run_with_iobinding(self, binding: _FakeIOBinding, run_options=None) -> None:
        device, stream = self.fake.device, self.fake.compute_stream
        if self.cuda_graph and self.graph is not None:
            self.replays += 1
            for work in self.graph:  # frozen: the addresses bound at capture
                device.enqueue(stream, work)
        else:
            work = self._record(binding)
            if self.cuda_graph:
                if any(kind == "cpu" for kind, _ in binding.inputs.values()) or any(
                    not hasattr(v, "pointer") for v in binding.outputs.values()
                ):
                    raise RuntimeError(
                        "CUDA graphs need every input and output bound to a CUDA OrtValue"
                    )
                self.graph = [work]
            device.enqueue(stream, work)
        self.runs += 1
        if device.synchronize(stream) != SUCCESS:
            raise RuntimeError(f"CUDA failure {ERROR_NAMES.get(device.error, device.error)}")

    def _record(self, binding: _FakeIOBinding) -> Callable[[], None]:
        device, ort_value = self.fake.device, self.fake.OrtValue
        inputs = dict(binding.inputs)
        fetch = list(binding.outputs)
        staged = {}  # CPU inputs: copied to the device as part of Run, on the compute stream
        for name, (kind, value) in inputs.items():
            if kind == "cpu":
                staged[name] = value.copy()
        targets = {}
        for name, value in binding.outputs.items():
            targets[name] = value if hasattr(value, "pointer") else None

        def work() -> None:
            feeds = {}
            for name, (kind, value) in inputs.items():
                if kind == "cpu":
                    feeds[name] = staged[name]
                else:
                    raw = device.read(value.pointer, value.nbytes())
                    feeds[name] = np.frombuffer(raw, value._dtype).reshape(value._shape)
            outputs = self.real.run(fetch, feeds)
            for name, array in zip(fetch, outputs, strict=True):
                array = np.ascontiguousarray(array)
                target = targets[name]
                if target is None:  # bound to the device by name: ORT allocates it
                    target = ort_value.ortvalue_from_shape_and_type(
                        array.shape, array.dtype, "cuda", 0
                    )
                elif tuple(target._shape) != array.shape:
                    raise FakeCudaError(
                        ILLEGAL_ADDRESS,
                        f"{name}: output {array.shape} into a bound value of {target._shape}",
                    )
                device.view(target.pointer, array.nbytes)[:] = array.tobytes()
                binding.results[name] = target

        return work
