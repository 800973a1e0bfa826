"""ONNX Runtime backend: CPU provider, or CUDA provider (+ CPU fallback for unsupported nodes).

Sessions are created on first use of each graph (a saved support set needs no encoder), with all
graph optimisations and the intra-op threads ``Segmenter.load`` sets (the free cores). On CUDA
the query decoder runs through IOBinding: the frames are copied in, the outputs are bound on the
device, and only ``labels`` (uint8, 4x smaller than the float probabilities) is bound and copied
back unless the probabilities are asked for. With ``cuda_graph_batch = B`` the decoder is also
captured as a CUDA graph (ONNX Runtime's ``enable_cuda_graph``) for calls of exactly B frames,
with inputs and outputs bound once to fixed device buffers.

Tested here on the CPU provider, and the CUDA paths (IOBinding, CUDA graphs) on a fake of
ONNX Runtime's OrtValue / IOBinding surface with device semantics (tests/gpu_fakes.py); their
``cuda`` test (tests/test_gpu_paths.py) is written but has not run (no GPU on the development
machines).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import EngineError, reexport_hint
from ..manifest import GraphInfo, Manifest, verify_files
from .feeds import decoder_feeds

logger = logging.getLogger("mfnet_runtime")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def cuda_provider_available() -> bool:
    return _CUDA in ort.get_available_providers()


def _limit(graph: GraphInfo, key: str) -> int:
    # ONNX Runtime itself takes any size; the export limits keep both backends consistent.
    return int(graph.details.get(key, 1 << 16))


class _CudaGraphDecoder:
    """The decoder at one fixed batch, replayed as a CUDA graph.

    ONNX Runtime captures the graph on the first run and replays it afterwards; replay reads and
    writes the same device addresses, so inputs are copied into fixed OrtValues in place
    (``update_inplace``) and both outputs are bound to fixed OrtValues. ``prototypes_shape`` is
    the graph's prototypes input at this batch: (batch, N, C) per frame, (N, C) shared.
    """

    def __init__(
        self,
        path: Path,
        options: ort.SessionOptions,
        device_id: int,
        batch: int,
        size: int,
        way: int,
        prototypes_shape: tuple[int, ...],
    ) -> None:
        providers = [(_CUDA, {"device_id": str(device_id), "enable_cuda_graph": "1"})]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        if self.session.get_providers()[0] != _CUDA:
            raise EngineError(f"CUDA graphs need every node of {path.name} on CUDA")

        def device_value(shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", device_id)

        self.batch = batch
        self.frames = device_value((batch, size, size, 3), np.uint8)
        self.prototypes = device_value(prototypes_shape, np.float32)
        self.labels = device_value((batch, size, size), np.uint8)
        self.probabilities = device_value((batch, way + 1, size, size), np.float32)
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input("frames", self.frames)
        self.binding.bind_ortvalue_input("prototypes", self.prototypes)
        self.binding.bind_ortvalue_output("labels", self.labels)
        self.binding.bind_ortvalue_output("probabilities", self.probabilities)
        self.uploaded: np.ndarray | None = None  # host copy of the prototypes on the device
        self.lock = threading.Lock()  # one replay at a time: ORT forbids concurrent Run() here

    def run(
        self, frames: np.ndarray, prototypes: np.ndarray, with_probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        with self.lock:
            # update_inplace is a cudaMemcpy from pageable memory on the legacy default stream:
            # it may return before the bytes land, and ONNX Runtime's compute stream does not
            # wait for it. Synchronise the inputs before the replay reads them, and the outputs
            # before they are copied back (ONNX Runtime's own IOBinding usage).
            self.frames.update_inplace(frames)
            if self.uploaded is None or not np.array_equal(self.uploaded, prototypes):
                self.prototypes.update_inplace(prototypes)
                self.uploaded = prototypes.copy()
            self.binding.synchronize_inputs()
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
            labels = self.labels.numpy()  # device -> host copy of the labels only
            return labels, self.probabilities.numpy() if with_probabilities else None


class OnnxRuntimeBackend:
    """The exported ONNX graphs of one precision, on ``device`` "cpu" or "cuda"."""

    def __init__(
        self,
        manifest: Manifest,
        device: str,
        precision: str,
        verify_hashes: bool = True,
        cuda_graph_batch: int = 0,
        device_id: int = 0,
    ) -> None:
        graphs = manifest.graph_set(precision, "onnx")
        if graphs is None:
            raise EngineError(
                f"{manifest.directory} has no complete {precision} ONNX graphs; "
                f"re-export with: {reexport_hint(manifest.directory)}"
            )
        verify_files(manifest, list(graphs.values()), check_hashes=verify_hashes)
        self.name = f"onnxruntime-{device}"
        self.precision = precision
        self.device = device
        self._device_id = device_id
        self._manifest = manifest
        self._graphs = graphs
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()
        self.max_batch = _limit(graphs["query_decoder"], "max_batch")
        self.max_support = _limit(graphs["support_encoder"], "max_support")
        self.max_shots = _limit(graphs["prototype_aggregator"], "max_shots")
        self.prototypes_form = str(graphs["query_decoder"].prototypes_form)
        self._graph_decoder: _CudaGraphDecoder | None = None
        if device == "cuda":
            self._session("query_decoder")  # now, so that a CUDA failure shows at load time
            if cuda_graph_batch:
                self._graph_decoder = self._open_graph_decoder(
                    min(cuda_graph_batch, self.max_batch)
                )

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: node placement notes are not actionable
        # Segmenter.load sets it from the free cores (threads.thread_policy) before the CPU
        # sessions are created on first use; 0 leaves ONNX Runtime's default (every core).
        options.intra_op_num_threads = getattr(self, "intra_op_threads", 0)
        return options

    def _session(self, role: str) -> ort.InferenceSession:
        with self._lock:
            session = self._sessions.get(role)
            if session is not None:
                return session
            path = self._manifest.directory / self._graphs[role].file
            providers: list = [_CPU]
            if self.device == "cuda":
                providers = [(_CUDA, {"device_id": str(self._device_id)}), _CPU]
            try:
                session = ort.InferenceSession(str(path), self._options(), providers=providers)
            except Exception as error:  # ORT raises its own classes, none shared with stdlib
                raise EngineError(
                    f"ONNX Runtime cannot load {path} ({error}): the file is corrupt, truncated "
                    f"or not an ONNX graph; re-export with: "
                    f"{reexport_hint(self._manifest.directory)}"
                ) from error
            if self.device == "cuda" and _CUDA not in session.get_providers():
                raise EngineError(
                    f"ONNX Runtime could not use CUDA for {path.name} (providers in use: "
                    f"{session.get_providers()}): check that a GPU is visible and that "
                    "onnxruntime-gpu matches the installed CUDA and cuDNN"
                )
            self._sessions[role] = session
            return session

    def _open_graph_decoder(self, batch: int) -> _CudaGraphDecoder | None:
        model = self._manifest.model
        path = self._manifest.directory / self._graphs["query_decoder"].file
        prototypes_shape: tuple[int, ...] = (model.way, model.channels)
        if self.prototypes_form == "per_frame":
            prototypes_shape = (batch, *prototypes_shape)
        try:
            decoder = _CudaGraphDecoder(
                path,
                self._options(),
                self._device_id,
                batch,
                model.input_size,
                model.way,
                prototypes_shape,
            )
        except Exception as error:  # an unsupported model still runs, without graphs
            logger.warning("CUDA graphs disabled for the decoder: %s", error)
            return None
        logger.info("decoder captured as a CUDA graph at batch %d", batch)
        return decoder

    def _run(self, role: str, fetch: list[str], feeds: dict[str, np.ndarray]) -> list:
        try:
            return self._session(role).run(fetch, feeds)
        except EngineError:
            raise
        except Exception as error:
            raise EngineError(
                f"ONNX Runtime failed running {self._graphs[role].file}: {error}"
            ) from error

    def run_support_encoder(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        return self._run(
            "support_encoder", ["shot_features"], {"support_images": images, "support_masks": masks}
        )[0]

    def run_aggregator(self, shot_features: np.ndarray, single: bool = False) -> np.ndarray:
        role = "prototype_aggregator_single" if single else "prototype_aggregator"
        return self._run(role, ["prototypes"], {"shot_features": shot_features})[0]

    def run_decoder(
        self,
        frames: np.ndarray,
        prototypes: np.ndarray,
        with_probabilities: bool = False,
        slot_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        feeds = decoder_feeds(frames, prototypes, self.prototypes_form, slot_mask)
        if self.device == "cpu":
            fetch = ["labels", "probabilities"] if with_probabilities else ["labels"]
            outputs = self._run("query_decoder", fetch, feeds)
            return outputs[0], outputs[1] if with_probabilities else None
        graph = self._graph_decoder
        prototypes = feeds["prototypes"]
        # the captured graph binds frames and prototypes only: way-flexible calls bind all
        if graph is not None and frames.shape[0] == graph.batch and slot_mask is None:
            try:
                return graph.run(frames, prototypes, with_probabilities)
            except Exception as error:  # capture failed on the first run: stop using graphs
                logger.warning("CUDA graph replay failed, disabled: %s", error)
                self._graph_decoder = None
        return self._run_bound(feeds, with_probabilities)

    def _run_bound(
        self, feeds: dict[str, np.ndarray], with_probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Decoder with IOBinding on CUDA: only the requested outputs are bound (on the
        device) and copied back, so ``probabilities`` is not even computed unless asked."""
        session = self._session("query_decoder")
        binding = session.io_binding()  # per call: a binding must not be shared by threads
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("labels", "cuda", self._device_id)
        if with_probabilities:
            binding.bind_output("probabilities", "cuda", self._device_id)
        try:
            binding.synchronize_inputs()
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        except Exception as error:
            raise EngineError(
                f"ONNX Runtime failed running the decoder on CUDA: {error}"
            ) from error
        outputs = binding.copy_outputs_to_cpu()
        return outputs[0], outputs[1] if with_probabilities else None

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._graph_decoder = None
