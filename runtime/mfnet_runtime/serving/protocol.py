"""The wire protocol between ``serve`` and ``RemoteSegmenter``: model and tensor names, dtypes,
shapes, request parameters, and the checks both sides run on a request.

Three Triton models (all stateless: every request carries what it needs):

- ``mfnet_info``: ``query`` uint8 [1] (any value) -> ``info`` bytes [1], the ``ServingInfo``
  JSON (way N, channels C, input size S, resize mode, backbone, engine id, limits). A client
  reads it once, to fit frames and support shots as the server's engines expect.
- ``mfnet_encode_support`` (no batching): ``images`` uint8 [M, S, S, 3] RGB and ``masks`` uint8
  [M, S, S] (0 / 1 / 255) of the M support shots, fitted to S x S by the client
  (``shots.prepare_shot``), and ``shot_counts`` int32 [N] (shots per class, in label order,
  summing to M) -> ``prototypes`` float32 [N, C] and ``shot_features`` float32 [M, C].
- ``mfnet_segment`` (dynamic batching across streams): ``frames`` uint8 [B, S, S, 3] RGB (fitted
  by the client, ``images.prepare_frames``) and ``prototypes`` float32 [B, N, C] (each frame's
  own prototypes, so frames of streams with different support sets share a batch) ->
  ``labels`` uint8 [B, S, S] (0 = background, n = the n-th class) and, when the request sets the
  parameter ``probabilities`` to true, ``probabilities`` float32 [B, N+1, S, S].

Triton itself refuses a wrong dtype, a wrong shape (a wrong N or C included), a byte count
that does not match the shape, and a batch over the model's maximum, before the request
reaches the model. The value checks (finite prototypes, mask values, shot counts) are here and
run on both sides: the client refuses such input before sending it, the server refuses it
from any client. numpy and the standard library only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import RuntimeInputError
from ..images import check_prepared

INFO_MODEL = "mfnet_info"
ENCODE_MODEL = "mfnet_encode_support"
SEGMENT_MODEL = "mfnet_segment"

# tensor names
INFO_QUERY, INFO_OUTPUT = "query", "info"
IMAGES, MASKS, SHOT_COUNTS = "images", "masks", "shot_counts"
PROTOTYPES, SHOT_FEATURES = "prototypes", "shot_features"
FRAMES, LABELS, PROBABILITIES = "frames", "labels", "probabilities"
# the request parameter that asks mfnet_segment for the probabilities
WANT_PROBABILITIES = "probabilities"

# Every refusal the server sends starts with this, so a client finds the reason in Triton's
# error text (which also carries a traceback).
REFUSAL = "mfnet refused the request: "
# A batch holding one refused request fails as a whole (Triton's Python backend answers a
# batch with one error), so the other requests of that batch were never run: the refusal says
# so with this phrase, and a client whose own request passed the checks sends it again.
NOT_RUN = "the other requests of this batch were not run"

INFO_VERSION = 1


@dataclass(frozen=True)
class ServingInfo:
    """What a client needs to know about the served engines (the ``mfnet_info`` answer).

    way: N classes; channels: C; input_size: S; resize: "pad" | "stretch" (how frames are fitted);
    backbone: the trunk's name (the feature side of the shot check); engine_id: the SHA-256 of
    the exported weights (support sets are tied to it); max_batch: frames per mfnet_segment
    request; max_support: shots per mfnet_encode_support request; max_shots: shots per class;
    backend / precision: what the server runs on.
    """

    way: int
    channels: int
    input_size: int
    resize: str
    backbone: str
    engine_id: str
    max_batch: int
    max_support: int
    max_shots: int
    backend: str
    precision: str
    version: int = INFO_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, source: str = "the server") -> ServingInfo:
        """Read ``to_json``'s bytes; a ``RuntimeInputError`` when they are not such a record."""
        try:
            fields: dict[str, Any] = json.loads(data)
            info = cls(**fields)
        except (ValueError, TypeError) as error:
            raise RuntimeInputError(
                f"{source} answered {INFO_MODEL} with something that is not an MFNet serving "
                f"record ({error}); is it an MFNet server (python -m mfnet_runtime serve)?"
            ) from error
        if info.version != INFO_VERSION:
            raise RuntimeInputError(
                f"{source} speaks serving protocol version {info.version}, this client "
                f"{INFO_VERSION}: install the same mfnet-runtime version on both sides"
            )
        return info


def _describe(array: Any) -> str:
    if isinstance(array, np.ndarray):
        return f"{array.dtype} {list(array.shape)}"
    return type(array).__name__


def check_frames(frames: Any, size: int) -> np.ndarray:
    """``frames`` must be uint8 [B, S, S, 3] (B >= 1); returned C-contiguous."""
    return check_prepared(frames, size, FRAMES, min_batch=1)


def check_prototypes(prototypes: Any, batch: int, way: int, channels: int) -> np.ndarray:
    """``prototypes`` must be float32 [B, N, C], finite; returned C-contiguous."""
    if (
        not isinstance(prototypes, np.ndarray)
        or prototypes.dtype != np.float32
        or prototypes.shape != (batch, way, channels)
    ):
        raise RuntimeInputError(
            f"{PROTOTYPES} must be float32 [B, N, C] = [{batch}, {way}, {channels}] (one row "
            f"of N = {way} class prototypes per frame), got {_describe(prototypes)}"
        )
    finite = np.isfinite(prototypes).all(axis=(1, 2))
    if not finite.all():
        bad = np.flatnonzero(~finite).tolist()
        raise RuntimeInputError(
            f"{PROTOTYPES} of frame(s) {bad} hold NaN or infinite values: encode the support "
            "set again (mfnet_encode_support) instead of sending broken prototypes"
        )
    return np.ascontiguousarray(prototypes)


def check_support(
    images: Any, masks: Any, shot_counts: Any, size: int, way: int, max_shots: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The inputs of ``mfnet_encode_support``: uint8 [M, S, S, 3], uint8 [M, S, S] in
    {0, 1, 255}, int32 [N] >= 1 summing to M. Returns them (counts as a list)."""
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1:] != (size, size, 3)
    ):
        raise RuntimeInputError(
            f"{IMAGES} must be uint8 [M, {size}, {size}, 3] RGB support images fitted to the "
            f"network input, got {_describe(images)}"
        )
    shots = images.shape[0]
    if (
        not isinstance(masks, np.ndarray)
        or masks.dtype != np.uint8
        or masks.shape != (shots, size, size)
    ):
        raise RuntimeInputError(
            f"{MASKS} must be uint8 [M, {size}, {size}] = [{shots}, {size}, {size}] "
            f"(one per image), got {_describe(masks)}"
        )
    if (
        not isinstance(shot_counts, np.ndarray)
        or shot_counts.dtype != np.int32
        or shot_counts.shape != (way,)
    ):
        raise RuntimeInputError(
            f"{SHOT_COUNTS} must be int32 [N] = [{way}] (shots per class, in label order), "
            f"got {_describe(shot_counts)}"
        )
    counts = [int(c) for c in shot_counts]
    if min(counts) < 1 or sum(counts) != shots or max(counts) > max_shots:
        raise RuntimeInputError(
            f"{SHOT_COUNTS} {counts} must be >= 1 and <= {max_shots} each and sum to the "
            f"{shots} images sent"
        )
    values = np.unique(masks)
    if not np.isin(values, (0, 1, 255)).all():
        raise RuntimeInputError(
            f"{MASKS} hold values {values[:8].tolist()}; a fitted mask holds 0 (background), "
            "1 (object) and 255 (ignore) only"
        )
    return np.ascontiguousarray(images), np.ascontiguousarray(masks), counts


def refusal(problems: list[tuple[int, str]], requests: int) -> str:
    """The error text of a batch of ``requests`` in which the requests ``problems`` lists
    (index, reason) were refused."""
    reasons = "; ".join(f"request {index + 1} of {requests}: {why}" for index, why in problems)
    text = REFUSAL + reasons
    if requests > len(problems):
        text += f" ({NOT_RUN}: send them again)"
    return text


def refusal_reason(message: str) -> str | None:
    """The server's reason in an error text (Triton's, traceback included), or None when the
    text holds no MFNet refusal."""
    start = message.rfind(REFUSAL)
    if start < 0:
        return None
    reason = message[start + len(REFUSAL) :].splitlines()[0].strip()
    return reason.rstrip("'\"") or None
