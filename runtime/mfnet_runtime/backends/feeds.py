"""What the backends feed the graphs: the query decoder's inputs in the graph's form.

Its own module (numpy only) so that the backend modules import it without importing the
package's ``open_backend`` (no import cycle).
"""

from __future__ import annotations

import numpy as np

from ..errors import RuntimeInputError


def decoder_prototypes(prototypes: np.ndarray, batch: int, form: str) -> np.ndarray:
    """What the query decoder graph of ``form`` is fed for ``batch`` frames.

    "per_frame" graphs take [B, N, C]: one support set [N, C] is tiled (a copy of B * N * C
    floats, negligible beside the frames), a [B, N, C] array is passed as it is. "shared"
    graphs (schema v1.0 exports) take [N, C] only. Raises ``RuntimeInputError`` for other
    shapes (``Segmenter`` checks its inputs first: this is the backends' own guard).
    """
    if prototypes.ndim == 2 and form == "per_frame":
        tiled = np.broadcast_to(prototypes, (batch, *prototypes.shape))  # [B, N, C] view
        return np.ascontiguousarray(tiled, dtype=np.float32)
    if (prototypes.ndim == 2 and form == "shared") or (
        prototypes.ndim == 3 and form == "per_frame" and prototypes.shape[0] == batch
    ):
        return prototypes
    wanted = f"[{batch}, N, C] or [N, C]" if form == "per_frame" else "[N, C]"
    raise RuntimeInputError(
        f"the {form} query decoder takes prototypes {wanted} for {batch} frames, got "
        f"{tuple(prototypes.shape)}"
    )


def decoder_feeds(
    frames: np.ndarray, prototypes: np.ndarray, form: str, slot_mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The query decoder's inputs by name: frames, prototypes (``decoder_prototypes``) and,
    for a way-flexible export, ``slot_mask`` uint8 [B, N] (an [N] mask is tiled to B)."""
    batch = frames.shape[0]
    feeds = {"frames": frames, "prototypes": decoder_prototypes(prototypes, batch, form)}
    if slot_mask is not None:
        slots = feeds["prototypes"].shape[-2]
        if slot_mask.ndim == 1:
            slot_mask = np.broadcast_to(slot_mask, (batch, slot_mask.shape[0]))
        if slot_mask.shape != (batch, slots):
            raise RuntimeInputError(
                f"slot_mask must be [{batch}, {slots}] for {batch} frames and {slots} slots, "
                f"got {tuple(slot_mask.shape)}"
            )
        feeds["slot_mask"] = np.ascontiguousarray(slot_mask, dtype=np.uint8)
    return feeds
