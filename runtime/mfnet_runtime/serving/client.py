"""``RemoteSegmenter``: the runtime's ``Segmenter`` API over an MFNet inference server.

Typical use (one line differs from the in-process runtime)::

    segmenter = RemoteSegmenter("localhost:8000")           # was: Segmenter.load("engines/x")
    support = segmenter.encode_support({"cat": [(image, mask)], "dog": [(image2, mask2)]})
    labels = segmenter.segment(frame, support)               # uint8 [H, W]

Frames and support shots are checked and fitted to the network input here, with the
runtime's own code (``images.prepare_frames``, ``shots.prepare_shot``), so the server decodes
exactly what ``Segmenter`` would and the labels are the same. Every request carries its
prototypes; the server may batch it with other clients' frames.

Errors: bad input raises ``RuntimeInputError`` before anything is sent; a server that cannot
be reached, does not answer within ``timeout`` seconds, dies or refuses a request raises
``ServerError`` (never a hang). A call whose connection broke is sent once more on a new
connection (requests are stateless), so a restarted server is used again without a new
``RemoteSegmenter``. A request that
failed only because another client's bad request shared its batch is sent again (up to
``retries`` times). A ``RemoteSegmenter`` may be shared by threads: each thread gets its own
connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RuntimeInputError, ServerError, require
from ..frame_api import FrameAPI
from ..images import (
    ImageInput,
)
from ..segmenter import check_way, support_shots
from ..shots import prepare_shot
from ..support import SupportSet
from . import protocol
from .protocol import ServingInfo

logger = logging.getLogger("mfnet_runtime")

PROTOCOLS = ("http", "grpc")
CLIENT_INSTALL = "pip install 'mfnet-runtime[serve]'"


def _split_url(url: str, kind: str) -> str:
    """``host:port`` for tritonclient (it takes no scheme); refuse an empty or odd URL."""
    if not isinstance(url, str) or not url.strip():
        raise RuntimeInputError(f"the server URL must be host:port, got {url!r}")
    text = url.strip()
    for scheme in ("http://", "https://", "grpc://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    text = text.rstrip("/")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or "/" in text:
        raise RuntimeInputError(
            f"the server URL must be host:port (e.g. localhost:{8000 if kind == 'http' else 8001}"
            f"), got {url!r}"
        )
    return text


def _close(client: Any) -> None:
    """Close a tritonclient client; a broken one (or one of another thread) may refuse."""
    try:
        client.close()
    except Exception as error:  # noqa: BLE001 - closing a broken client may fail too
        logger.debug("closing a tritonclient client failed: %s", error)


class RemoteSegmenter(FrameAPI):
    """A ``Segmenter`` whose engines run on an MFNet server (``python -m mfnet_runtime
    serve``). ``url``: host:port of its HTTP (default 8000) or gRPC (8001) endpoint;
    ``protocol``: "http" | "grpc"; ``timeout``: seconds any call may wait for the server;
    ``retries``: re-sends of a request whose batch another client's bad request refused.

    Attributes as ``Segmenter``'s: way, input_size, channels, resize, max_batch (frames per
    request), engine_id, backend_name, precision; plus url, protocol, timeout, info.
    """

    def __init__(
        self,
        url: str,
        protocol: str = "http",
        timeout: float = 30.0,
        retries: int = 3,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise RuntimeInputError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise RuntimeInputError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if not isinstance(retries, int) or retries < 0:
            raise RuntimeInputError(f"retries must be an integer >= 0, got {retries!r}")
        self.protocol = protocol
        self.url = _split_url(url, protocol)
        self.timeout = float(timeout)
        self.retries = retries
        self._module = require(
            f"tritonclient.{protocol}", "RemoteSegmenter", CLIENT_INSTALL
        )  # tritonclient.http | tritonclient.grpc
        self._utils = require("tritonclient.utils", "RemoteSegmenter", CLIENT_INSTALL)
        self._local = threading.local()  # one tritonclient client per thread
        self._clients: list[Any] = []  # all of them, for close()
        self._lock = threading.Lock()
        self.info: ServingInfo = self._read_info()
        self.way: int = self.info.way
        self.input_size: int = self.info.input_size
        self.channels: int = self.info.channels
        self.resize: str = self.info.resize
        self.engine_id: str = self.info.engine_id
        self.precision: str = self.info.precision
        self.backend_name: str = f"server {self.url} ({self.info.backend})"
        self.max_batch: int = self._server_max_batch()

    def __repr__(self) -> str:
        return (
            f"RemoteSegmenter({self.url!r}, protocol={self.protocol!r}, way={self.way}, "
            f"input_size={self.input_size}, backend={self.info.backend!r})"
        )

    # -------------------------------------------------------------------------- transport
    def _connect(self) -> Any:
        """This thread's tritonclient client (the HTTP one is gevent-based and must stay on
        the thread that made it), created on first use."""
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "http":
                client = self._module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout, network_timeout=self.timeout
                )
            else:
                client = self._module.InferenceServerClient(self.url)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _drop(self) -> None:
        """Forget this thread's connection (rebuilt on the next call): after a broken or
        timed-out call its pooled sockets may be dead, e.g. when the server restarted."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            _close(client)

    def _server_error(self, error: BaseException, what: str) -> ServerError:
        """A transport or server failure as a ``ServerError`` with its kind."""
        text = str(error.message() if hasattr(error, "message") else error) or type(error).__name__
        status = str(error.status() if hasattr(error, "status") else "") or ""
        reason = protocol.refusal_reason(text)
        lowered = f"{status} {text}".lower()
        if reason is None and (
            "deadline" in lowered or "timed out" in lowered or "timeout" in lowered
        ):
            kind, detail = "timeout", f"no answer within {self.timeout:g} s"
        elif reason is None and (
            isinstance(error, OSError)
            or "unavailable" in lowered
            or "connect" in lowered
            or "broken pipe" in lowered
            or "reset" in lowered
            or "socket closed" in lowered
        ):
            kind, detail = "unreachable", f"cannot reach it ({' '.join(text.split())[:200]})"
        else:
            kind = "refused"
            detail = "refused the request: " + (reason or " ".join(text.split())[-300:])
        if kind != "refused":
            self._drop()
        hint = (
            "; is it running? (python -m mfnet_runtime serve --engines DIR)"
            if kind != "refused"
            else ""
        )
        return ServerError(
            f"inference server {self.url} ({self.protocol}), {what}: {detail}{hint}",
            url=self.url,
            kind=kind,
        )

    def _call(self, what: str, function: Any) -> Any:
        """Run ``function(client)``; failures become ``ServerError``. A call whose connection
        broke is sent once more on a new one; a request refused only because of another
        request of its batch is sent again (up to ``retries`` times)."""
        errors = (self._utils.InferenceServerException, OSError, ConnectionError)
        attempt, reconnected = 0, False
        while True:
            try:
                return function(self._connect())
            except errors as error:
                failure = self._server_error(error, what)
            except Exception as error:  # transport libraries raise their own types
                if type(error).__module__.split(".")[0] not in ("geventhttpclient", "gevent"):
                    raise
                failure = self._server_error(error, what)
            if failure.kind == "unreachable" and not reconnected:
                # a pooled connection of a server that restarted is dead: one new connection
                # (requests are stateless, so sending one again is safe)
                reconnected = True
                continue
            if failure.kind == "refused" and protocol.NOT_RUN in str(failure):
                if attempt < self.retries:
                    attempt += 1
                    logger.info("resending a request its batch-mate's refusal stopped: %s", failure)
                    time.sleep(0.01 * attempt)
                    continue
            raise failure from None

    def _infer(
        self,
        model: str,
        arrays: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        parameters: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        module, utils = self._module, self._utils

        def run(client: Any) -> dict[str, np.ndarray]:
            inputs = []
            for name, array in arrays.items():
                tensor = module.InferInput(
                    name, list(array.shape), utils.np_to_triton_dtype(array.dtype)
                )
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            requested = [module.InferRequestedOutput(name) for name in outputs]
            options: dict[str, Any] = {"outputs": requested}
            if parameters:
                options["parameters"] = dict(parameters)
            if self.protocol == "grpc":
                options["client_timeout"] = self.timeout
            result = client.infer(model, inputs, **options)
            answer = {}
            for name in outputs:
                value = result.as_numpy(name)
                if value is None:
                    raise RuntimeInputError(f"{model} answered without its {name!r} output")
                answer[name] = value
            return answer

        return self._call(f"{model} request", run)

    def _read_info(self) -> ServingInfo:
        answer = self._infer(
            protocol.INFO_MODEL,
            {protocol.INFO_QUERY: np.zeros(1, np.uint8)},
            [protocol.INFO_OUTPUT],
        )
        raw = answer[protocol.INFO_OUTPUT].reshape(-1)[0]
        return ServingInfo.from_json(
            raw if isinstance(raw, bytes) else bytes(raw), f"server {self.url}"
        )

    def _server_max_batch(self) -> int:
        """Frames per mfnet_segment request: the model's max_batch_size."""

        def read(client: Any) -> int:
            if self.protocol == "grpc":
                config = client.get_model_config(
                    protocol.SEGMENT_MODEL, as_json=True, client_timeout=self.timeout
                )["config"]
            else:
                config = client.get_model_config(protocol.SEGMENT_MODEL)
            return int(config.get("max_batch_size", config.get("maxBatchSize", 1)))

        return max(1, self._call(f"{protocol.SEGMENT_MODEL} config", read))

    def is_ready(self) -> bool:
        """Whether the server answers and its models are ready (never raises)."""
        try:
            return bool(
                self._call(
                    "readiness",
                    lambda client: (
                        client.is_model_ready(protocol.SEGMENT_MODEL)
                        if self.protocol == "http"
                        else client.is_model_ready(
                            protocol.SEGMENT_MODEL, client_timeout=self.timeout
                        )
                    ),
                )
            )
        except ServerError:
            return False

    def close(self) -> None:
        """Close the connections to the server (every thread's)."""
        with self._lock:
            clients, self._clients = self._clients, []
        self._local.client = None
        for client in clients:
            _close(client)

    def __enter__(self) -> RemoteSegmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ support side
    def encode_support(
        self, classes: Mapping[str, Sequence[tuple[ImageInput, Any]]], color: str = "rgb"
    ) -> SupportSet:
        """As ``Segmenter.encode_support``: {class name: [(image, mask), ...]} in label order,
        exactly ``way`` classes -> a ``SupportSet`` of the server's engines."""
        shots, names, counts = support_shots(classes, self.way)
        if max(counts) > self.info.max_shots:
            raise RuntimeInputError(
                f"a class has {max(counts)} shots; the server's engines take at most "
                f"{self.info.max_shots} per class (an export limit)"
            )
        size = self.input_size
        prepared = [
            prepare_shot(
                image, mask, size, self.resize, self.info.backbone, color, f"class {n!r}, shot {k}"
            )
            for n, k, image, mask in shots
        ]
        images = np.stack([image for image, _ in prepared])  # [M, S, S, 3] uint8 RGB
        masks = np.stack([mask for _, mask in prepared])  # [M, S, S] uint8 0 / 1 / 255
        answer = self._infer(
            protocol.ENCODE_MODEL,
            {
                protocol.IMAGES: images,
                protocol.MASKS: masks,
                protocol.SHOT_COUNTS: np.array(counts, np.int32),
            },
            [protocol.PROTOTYPES, protocol.SHOT_FEATURES],
        )
        features = answer[protocol.SHOT_FEATURES].astype(np.float32, copy=False)  # [M, C]
        per_class = np.split(features, np.cumsum(counts)[:-1])
        return SupportSet(
            tuple(names), tuple(per_class), answer[protocol.PROTOTYPES], self.engine_id
        )

    def load_support(self, path: str | Path) -> SupportSet:
        """Read a set written by ``SupportSet.save``; refuse one encoded by other engines."""
        support = SupportSet.load(path)
        self.check_engine(support, source=str(path))
        return support

    def check_engine(self, support: SupportSet, source: str = "this support set") -> None:
        """Refuse a support set encoded by other engines than the server's."""
        if not isinstance(support, SupportSet):
            raise RuntimeInputError(
                f"expected a SupportSet, got {type(support).__name__}; make one with encode_support"
            )
        if support.engine_id != self.engine_id:
            raise RuntimeInputError(
                f"{source} was encoded by other engines (engine id {support.engine_id[:12]}..., "
                f"the server {self.url} runs {self.engine_id[:12]}...): encode the support "
                "images again with this segmenter"
            )

    # -------------------------------------------------------------------------- query side
    def _decode(
        self, batch: np.ndarray, support: SupportSet, with_probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Prepared frames -> (labels [B, S, S], probabilities [B, N+1, S, S] or None), in
        requests of up to ``max_batch`` frames."""
        size = self.input_size
        if isinstance(batch, np.ndarray) and batch.shape == (0, size, size, 3):
            # an empty batch: empty arrays of the documented shapes, as Segmenter's
            empty = np.zeros((0, self.way + 1, size, size), np.float32)
            return np.zeros((0, size, size), np.uint8), empty if with_probabilities else None
        batch = protocol.check_frames(batch, size)
        self.check_engine(support)
        check_way(len(support.class_names), support.class_names, self.way)
        rows = np.ascontiguousarray(support.prototypes, dtype=np.float32)  # [N, C]
        labels, probabilities = [], []
        outputs = [protocol.LABELS] + ([protocol.PROBABILITIES] if with_probabilities else [])
        parameters = {protocol.WANT_PROBABILITIES: True} if with_probabilities else None
        for start in range(0, batch.shape[0], self.max_batch):
            part = np.ascontiguousarray(batch[start : start + self.max_batch])
            prototypes = np.ascontiguousarray(np.broadcast_to(rows, (part.shape[0], *rows.shape)))
            protocol.check_prototypes(prototypes, part.shape[0], self.way, self.channels)
            answer = self._infer(
                protocol.SEGMENT_MODEL,
                {protocol.FRAMES: part, protocol.PROTOTYPES: prototypes},
                outputs,
                parameters,
            )
            labels.append(answer[protocol.LABELS])
            if with_probabilities:
                probabilities.append(answer[protocol.PROBABILITIES])
        stacked = np.concatenate(probabilities) if with_probabilities else None
        return np.concatenate(labels), stacked
