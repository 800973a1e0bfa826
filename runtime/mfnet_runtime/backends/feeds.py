"""What the backends feed the graphs: the query decoder's prototypes in the graph's form.

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
