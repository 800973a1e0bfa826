"""``python -m mfnet_runtime serve``: exported engines behind NVIDIA Triton Inference Server,
started through PyTriton (``pip install 'mfnet-runtime[serve]'``).

The models are ``protocol``'s: ``mfnet_info``, ``mfnet_encode_support`` (one request at a
time) and ``mfnet_segment`` (dynamic batching across streams: requests of several clients,
each with its own prototypes, are decoded together). Each model instance owns one
``Segmenter`` (its own ONNX Runtime sessions or TensorRT contexts); the CPU threads are split
between the instances. HTTP, gRPC and Prometheus metrics listen on their ports; one line
``serving: ...`` on stdout says the server is ready. SIGTERM or SIGINT stops it gracefully:
Triton stops taking new requests and the requests in flight finish (up to ``exit_timeout``
seconds) before the process exits with code 0.

The Python backend's stub (a process Triton starts per model instance) links whatever
``libpython3.X.so`` the dynamic loader finds first; a different patch release of the same
minor version loads, then fails while loading the model (``'_thread.RLock' object has no
attribute '_recursion_count'``). ``python_library_path`` puts this interpreter's own library
directory first on ``LD_LIBRARY_PATH`` before Triton starts, so the children link the right
one.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..errors import EngineError, RuntimeInputError, require
from ..segmenter import Segmenter
from ..threads import thread_policy
from . import protocol
from .protocol import ServingInfo

logger = logging.getLogger("mfnet_runtime")

SERVE_INSTALL = "pip install 'mfnet-runtime[serve]'"


@dataclass(frozen=True)
class ServeOptions:
    """How ``serve`` runs. ``max_batch``: frames per execution of mfnet_segment (Triton's
    max_batch_size; larger batches than the engines' limit are decoded in chunks);
    ``queue_delay_us``: how long the dynamic batcher waits to fill a batch; ``instances``:
    model instances of mfnet_segment (each with its own Segmenter); ``threads``: CPU threads
    of all instances together (None = the free cores); ``exit_timeout``: seconds the requests
    in flight get to finish on SIGTERM."""

    engines: Path
    backend: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 16
    queue_delay_us: int = 500
    instances: int = 1
    exit_timeout: int = 30
    log_verbose: int = 0
    triton_log: Path | None = None  # Triton's own log (None: on stdout, between our lines)


def python_library_path() -> str:
    """``LD_LIBRARY_PATH`` with this interpreter's library directory (sysconfig LIBDIR) first,
    so Triton's Python backend stub links this very ``libpython``."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    return os.pathsep.join([libdir] + [p for p in current if p != libdir]) if libdir else ""


# ------------------------------------------------------------------------- per-frame decoding
# ------------------------------------------------------------------------------ the models
class _InFlight:
    """Counts the model executions running and done (the shutdown line reports them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.served = 0

    def __enter__(self) -> None:
        with self._lock:
            self.count += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.count -= 1
            self.served += 1


def _wants_probabilities(request: Any) -> bool:
    parameters = getattr(request, "parameters", None) or {}
    value = parameters.get(protocol.WANT_PROBABILITIES, False)
    return value is True or str(value).lower() in ("1", "true", "yes")


def segment_function(
    segmenter: Segmenter, info: ServingInfo, in_flight: _InFlight
) -> Callable[[list[Any]], list[dict[str, np.ndarray]]]:
    """The mfnet_segment model of one instance: a list of requests (a dynamic batch) -> one
    response dict per request. A request that fails the checks refuses the whole batch
    (``protocol.refusal``: Triton answers a batch with one error); the reason names it."""

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        with in_flight:
            frames, prototypes, problems = [], [], []
            for index, request in enumerate(requests):
                try:
                    part = protocol.check_frames(request[protocol.FRAMES], info.input_size)
                    frames.append(part)
                    prototypes.append(
                        protocol.check_prototypes(
                            request[protocol.PROTOTYPES], part.shape[0], info.way, info.channels
                        )
                    )
                except (RuntimeInputError, KeyError) as error:
                    problems.append((index, str(error)))
            if problems:
                raise RuntimeInputError(protocol.refusal(problems, len(requests)))
            want = [_wants_probabilities(request) for request in requests]
            labels, probabilities = segmenter.decode_frames(  # one batch, a set per frame
                np.concatenate(frames), np.concatenate(prototypes), any(want)
            )
            responses, start = [], 0
            for part, wanted in zip(frames, want, strict=True):
                stop = start + part.shape[0]
                response = {protocol.LABELS: labels[start:stop]}
                if wanted and probabilities is not None:
                    response[protocol.PROBABILITIES] = probabilities[start:stop]
                responses.append(response)
                start = stop
            return responses

    return infer


def encode_function(
    segmenter: Segmenter, info: ServingInfo, in_flight: _InFlight
) -> Callable[[list[Any]], list[dict[str, np.ndarray]]]:
    """The mfnet_encode_support model: fitted shots + shot counts -> prototypes, shot features."""

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        with in_flight:
            responses = []
            for request in requests:  # no batching: one request per call
                try:
                    images, masks, counts = protocol.check_support(
                        request[protocol.IMAGES],
                        request[protocol.MASKS],
                        request[protocol.SHOT_COUNTS],
                        info.input_size,
                        info.way,
                        info.max_shots,
                    )
                    offsets = np.cumsum([0] + counts)
                    classes = {
                        f"class {n + 1}": [
                            (images[k], masks[k]) for k in range(offsets[n], offsets[n + 1])
                        ]
                        for n in range(info.way)
                    }
                    support = segmenter.encode_support(classes)
                except (RuntimeInputError, KeyError) as error:
                    raise RuntimeInputError(protocol.refusal([(0, str(error))], 1)) from error
                responses.append(
                    {
                        protocol.PROTOTYPES: support.prototypes.copy(),
                        protocol.SHOT_FEATURES: np.concatenate(support.shot_features),
                    }
                )
            return responses

    return infer


def info_function(info: ServingInfo) -> Callable[[list[Any]], list[dict[str, np.ndarray]]]:
    """The mfnet_info model: any query -> the ServingInfo JSON."""
    answer = np.array([info.to_json()], dtype=np.object_)

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        return [{protocol.INFO_OUTPUT: answer} for _ in requests]

    return infer


def serving_info(segmenter: Segmenter) -> ServingInfo:
    """The ``mfnet_info`` record of a loaded segmenter's engines."""
    backend = segmenter._backend  # the limits live on the backend (Segmenter exposes max_batch)
    manifest = segmenter._manifest
    return ServingInfo(
        way=segmenter.way,
        channels=segmenter.channels,
        input_size=segmenter.input_size,
        resize=segmenter.resize,
        backbone=manifest.model.backbone,
        engine_id=segmenter.engine_id,
        max_batch=segmenter.max_batch,
        max_support=int(backend.max_support),
        max_shots=int(backend.max_shots),
        backend=segmenter.backend_name,
        precision=segmenter.precision,
    )


def _bind_models(
    triton: Any, segmenters: Sequence[Segmenter], options: ServeOptions, in_flight: _InFlight
) -> None:
    """Bind the three models to a PyTriton ``Triton``; one mfnet_segment instance per
    segmenter."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    info = serving_info(segmenters[0])
    size, way, channels = info.input_size, info.way, info.channels
    triton.bind(
        model_name=protocol.INFO_MODEL,
        infer_func=info_function(info),
        inputs=[Tensor(name=protocol.INFO_QUERY, dtype=np.uint8, shape=(1,))],
        outputs=[Tensor(name=protocol.INFO_OUTPUT, dtype=bytes, shape=(1,))],
        config=ModelConfig(batching=False),
        strict=True,
    )
    triton.bind(
        model_name=protocol.ENCODE_MODEL,
        infer_func=encode_function(segmenters[0], info, in_flight),
        inputs=[
            Tensor(name=protocol.IMAGES, dtype=np.uint8, shape=(-1, size, size, 3)),
            Tensor(name=protocol.MASKS, dtype=np.uint8, shape=(-1, size, size)),
            Tensor(name=protocol.SHOT_COUNTS, dtype=np.int32, shape=(way,)),
        ],
        outputs=[
            Tensor(name=protocol.PROTOTYPES, dtype=np.float32, shape=(way, channels)),
            Tensor(name=protocol.SHOT_FEATURES, dtype=np.float32, shape=(-1, channels)),
        ],
        config=ModelConfig(batching=False),
        strict=True,
    )
    triton.bind(
        model_name=protocol.SEGMENT_MODEL,
        infer_func=[segment_function(s, info, in_flight) for s in segmenters],
        inputs=[
            Tensor(name=protocol.FRAMES, dtype=np.uint8, shape=(size, size, 3)),
            Tensor(name=protocol.PROTOTYPES, dtype=np.float32, shape=(way, channels)),
        ],
        outputs=[
            Tensor(name=protocol.LABELS, dtype=np.uint8, shape=(size, size)),
            Tensor(name=protocol.PROBABILITIES, dtype=np.float32, shape=(way + 1, size, size)),
        ],
        config=ModelConfig(
            max_batch_size=options.max_batch,
            batcher=DynamicBatcher(max_queue_delay_microseconds=options.queue_delay_us),
        ),
        strict=True,
    )


def check_options(options: ServeOptions) -> None:
    """Refuse options that cannot work before anything starts."""
    ports = {"http": options.http_port, "grpc": options.grpc_port, "metrics": options.metrics_port}
    if len(set(ports.values())) != len(ports):
        raise RuntimeInputError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")
    for name, port in ports.items():
        if not 1 <= port <= 65535:
            raise RuntimeInputError(f"the {name} port must be in 1..65535, got {port}")
    if options.max_batch < 1 or options.instances < 1:
        raise RuntimeInputError(
            f"max_batch and instances must be >= 1, got {options.max_batch}, {options.instances}"
        )
    if options.queue_delay_us < 0 or options.exit_timeout < 0:
        raise RuntimeInputError(
            "queue_delay_us and exit_timeout must be >= 0, got "
            f"{options.queue_delay_us}, {options.exit_timeout}"
        )


def serve(
    options: ServeOptions,
    out: TextIO | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Load the engines, start Triton with the models, print the readiness line, serve until
    SIGTERM / SIGINT (or ``stop`` is set), then shut down gracefully. Returns 0.

    Raises ``MissingDependencyError`` without PyTriton, ``RuntimeInputError`` for bad options,
    ``EngineError`` for engines that cannot be used.
    """
    out = out or sys.stdout
    check_options(options)
    require("pytriton", "serving", SERVE_INSTALL)
    from pytriton.triton import Triton, TritonConfig

    policy = thread_policy(options.threads)  # all instances together
    per_instance = max(1, policy.threads // options.instances)
    print(f"{policy.describe()}; {per_instance} per instance", file=out, flush=True)
    segmenters: list[Segmenter] = []
    try:
        for _ in range(options.instances):
            segmenters.append(
                Segmenter.load(
                    options.engines,
                    backend=options.backend,
                    device=options.device,
                    precision=options.precision,
                    threads=per_instance,
                )
            )
        if segmenters[0].way_flexible:
            raise RuntimeInputError(
                f"{options.engines} is a way-flexible export (slot_mask input): serving takes "
                "fixed-N exports for now; serve one exported from a checkpoint without --max-way"
            )
        info = serving_info(segmenters[0])
        library_path = python_library_path()
        if library_path:
            os.environ["LD_LIBRARY_PATH"] = library_path  # read by Triton's children
        config = TritonConfig(
            http_address=options.address,
            grpc_address=options.address,
            metrics_address=options.address,
            http_port=options.http_port,
            grpc_port=options.grpc_port,
            metrics_port=options.metrics_port,
            exit_timeout_secs=options.exit_timeout,
            log_verbose=options.log_verbose,
            log_file=options.triton_log,
            allow_gpu_metrics=False,
        )
        stop = stop or threading.Event()
        in_flight = _InFlight()
        previous = _install_handlers(stop)
        try:
            started = time.perf_counter()
            with Triton(config=config) as triton:
                _bind_models(triton, segmenters, options, in_flight)
                triton.run()
                _say(
                    out,
                    f"serving: {options.engines} ({info.way}-way, {info.input_size}x"
                    f"{info.input_size}, {info.backend} {info.precision}) on "
                    f"http://{options.address}:{options.http_port}, "
                    f"grpc://{options.address}:{options.grpc_port}, metrics "
                    f"http://{options.address}:{options.metrics_port}/metrics; "
                    f"{protocol.SEGMENT_MODEL}: max batch {options.max_batch}, queue delay "
                    f"{options.queue_delay_us} us, {options.instances} instance(s); ready in "
                    f"{time.perf_counter() - started:.1f} s",
                    fresh_line=options.triton_log is None,
                )
                while not stop.wait(0.5):
                    if not triton.is_alive():
                        raise EngineError(
                            "the Triton server process ended on its own (its log says why)"
                        )
                _say(out, "stopping: finishing the requests in flight", options.triton_log is None)
            _say(
                out,
                f"stopped ({in_flight.served} model executions served)",
                options.triton_log is None,
            )
        finally:
            _restore_handlers(previous)
    finally:
        for segmenter in segmenters:
            segmenter.close()
    return 0


def _say(out: TextIO, line: str, fresh_line: bool = False) -> None:
    """Write one line in one call; ``fresh_line``: start it on a new line, as Triton's log
    (printed by PyTriton from another thread, in pieces) may have left one unfinished."""
    out.write(("\n" if fresh_line else "") + line + "\n")
    out.flush()


def _install_handlers(stop: threading.Event) -> dict[int, Any]:
    """SIGTERM and SIGINT set ``stop`` (main thread only); returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for number in (signal.SIGTERM, signal.SIGINT):
        previous[number] = signal.signal(number, lambda *_: stop.set())
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)
