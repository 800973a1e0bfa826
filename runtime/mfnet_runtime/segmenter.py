"""``Segmenter``: exported engines + a cached support set -> label maps, without torch.

Typical use::

    segmenter = Segmenter.load("engines/synthetic")            # fastest backend available
    support = segmenter.encode_support({"cat": [(image, mask)], "dog": [(image2, mask2)]})
    labels = segmenter.segment(frame, support)                # uint8 [H, W]: 0 = background,
                                                               # 1 = cat, 2 = dog
    support = segmenter.add_shot(support, "dog", image3, mask3)  # encodes the new shot only

The support set is encoded once and reused for every frame; only the query decoder runs per
frame. A server that batches frames of many streams passes each frame's prototypes instead:
``decode_frames(batch, prototypes_per_frame)`` (float32 [B, N, C], row b for frame b).
Frames are fitted to the network's S x S input as the manifest says (``resize``), the
decoder returns labels at S x S, and ``restore_labels`` maps them back to the frame's size.
Support sets are plain data (``support.SupportSet``); every operation on them that runs an
engine or checks that it matches these engines is a method here.

The number of classes: a fixed-N export takes exactly N; a way-flexible export (manifest
``model.way_flexible``) takes 1..N, its unused slots masked inside the graph. With
``group_classes=True`` any number (up to 254) is decoded in groups of slots and merged per
pixel (``grouping``: the rule and its cost).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from .backends import Backend, open_backend
from .errors import RuntimeInputError
from .frame_api import FrameAPI
from .grouping import merge_groups, plan_groups
from .images import ImageInput, check_prepared
from .manifest import Manifest, read_manifest
from .shots import prepare_shot
from .support import SupportSet
from .threads import thread_policy

logger = logging.getLogger("mfnet_runtime")


def support_shots(
    classes: Mapping[str, Sequence[tuple[ImageInput, Any]]], way: int, accepts: str = "exact"
) -> tuple[list[tuple[str, int, ImageInput, Any]], list[str], list[int]]:
    """Check a support set {class name: [(image, mask), ...]} of classes that ``way`` slots
    take (``accepts``, see ``check_way``); return its shots as (class name, shot index,
    image, mask), the class names and the shots per class.

    Shared by ``Segmenter`` and ``serving.RemoteSegmenter``, so both refuse the same input."""
    if not isinstance(classes, Mapping):
        raise RuntimeInputError(
            "classes must be a dict {class name: [(image, mask), ...]}, "
            f"got {type(classes).__name__}"
        )
    check_way(len(classes), list(classes), way, accepts)
    shots, names, counts = [], [], []
    for name, pairs in classes.items():
        if not isinstance(name, str) or not name:
            raise RuntimeInputError(f"class names must be non-empty strings, got {name!r}")
        if isinstance(pairs, tuple) and len(pairs) == 2 and not isinstance(pairs[0], tuple):
            raise RuntimeInputError(
                f"class {name!r}: give a list of (image, mask) pairs, e.g. [(image, mask)]"
            )
        if len(pairs) == 0:
            raise RuntimeInputError(f"class {name!r} has no support shot")
        for k, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise RuntimeInputError(
                    f"class {name!r}, shot {k}: expected an (image, "
                    f"mask) pair, got {type(pair).__name__}"
                )
            shots.append((name, k, pair[0], pair[1]))
        names.append(name)
        counts.append(len(pairs))
    return shots, names, counts


MAX_CLASSES = 254  # labels are uint8: 0 = background, 255 = ignore
ACCEPTS = ("exact", "up_to", "any")  # what check_way lets through


def check_way(count: int, names: Sequence[str], way: int, accepts: str = "exact") -> None:
    """Refuse a number of support classes that engines with ``way`` slots cannot decode.

    ``accepts``: "exact" (a fixed-N export: exactly ``way``), "up_to" (way-flexible: 1..way),
    "any" (decoding in groups: 1..254)."""
    given = f"{count} support classes given ({', '.join(map(repr, names)) or 'none'})"
    if count < 1 or count > MAX_CLASSES:
        raise RuntimeInputError(f"{given}: give 1..{MAX_CLASSES} classes")
    if accepts == "exact" and count != way:
        raise RuntimeInputError(
            f"{given} but the engines are {way}-way: the number of classes is fixed at "
            f"training, so give exactly {way}, decode in groups (group_classes=True, "
            f"--group-classes), or train a way-flexible model (--max-way)"
        )
    if accepts == "up_to" and count > way:
        raise RuntimeInputError(
            f"{given} but the engines take at most {way} (a way-flexible model with {way} "
            "slots): decode in groups (group_classes=True, --group-classes)"
        )


class Segmenter(FrameAPI):
    """Runs an export directory's graphs on one backend. Create it with ``Segmenter.load``.

    Attributes: backend_name ("onnxruntime-cpu" | "onnxruntime-cuda" | "tensorrt"), precision
    ("fp32" | "fp16"), way (N, fixed at training), input_size (S), resize ("pad" | "stretch"),
    max_batch (frames per decoder call), engine_id (SHA-256 identifying the exported weights).
    """

    def __init__(self, manifest: Manifest, backend: Backend, group_classes: bool = False) -> None:
        self._manifest = manifest
        self._backend = backend
        model = manifest.model
        self.backend_name: str = backend.name
        self.precision: str = backend.precision
        self.way: int = model.way
        self.way_flexible: bool = model.way_flexible
        self.group_classes: bool = group_classes
        self.input_size: int = model.input_size
        self.channels: int = model.channels
        self.resize: str = model.resize
        self.max_batch: int = backend.max_batch
        self.engine_id: str = manifest.engine_id
        self.engine_dir: Path = manifest.directory
        self.threads: int = getattr(backend, "intra_op_threads", 0)  # 0 = the library's default
        # K = 1 needs the single-shot aggregator when the general one starts at 2 (A_S models).
        aggregators = [g for g in manifest.graphs if g.role == "prototype_aggregator"]
        default = 2 if model.support_attention else 1
        self._min_shots = int(
            aggregators[0].details.get("min_shots", default) if aggregators else default
        )

    @classmethod
    def load(
        cls,
        engine_dir: str | Path,
        backend: str = "auto",
        device: str = "auto",
        precision: str = "auto",
        verify_hashes: bool = True,
        *,
        cuda_graph_batch: int = 0,
        device_id: int = 0,
        threads: int | None = None,
        group_classes: bool = False,
    ) -> Segmenter:
        """Open an export directory (``manifest.json`` + graphs / engines).

        backend: "auto" | "onnxruntime" | "tensorrt"; device: "auto" | "cuda" | "cpu";
        precision: "auto" | "fp32" | "fp16". "auto" picks the fastest that works here: TensorRT
        engines built for this GPU and TensorRT, else ONNX Runtime on CUDA (FP16 graphs when
        exported), else ONNX Runtime on the CPU (FP32). verify_hashes: check the SHA-256 of
        every file used against the manifest. cuda_graph_batch: on CUDA, capture the decoder
        as a CUDA graph for calls of exactly this many frames (0 = off; untested, see README).
        threads: intra-op threads of ONNX Runtime's CPU sessions; None = the cores free to
        this process (``threads.thread_policy``: its CPU affinity minus the cores other
        processes keep busy, at least 1). group_classes: accept any number of classes
        (up to 254) and decode those that do not fit the slots in groups (``grouping``).
        """
        policy = thread_policy(threads)
        manifest = read_manifest(engine_dir)
        opened = open_backend(
            manifest, backend, device, precision, verify_hashes, cuda_graph_batch, device_id
        )
        if opened.name.startswith("onnxruntime"):
            # ONNX Runtime backends read it when each session is created (not in Backend)
            opened.intra_op_threads = policy.threads  # type: ignore[attr-defined]
        logger.info(policy.describe())
        logger.info(
            "%s backend, %s graphs, %d-way, %dx%d input, from %s",
            opened.name,
            opened.precision,
            manifest.model.way,
            manifest.model.input_size,
            manifest.model.input_size,
            manifest.directory,
        )
        return cls(manifest, opened, group_classes)

    def __repr__(self) -> str:
        return (
            f"Segmenter({str(self.engine_dir)!r}, backend={self.backend_name!r}, "
            f"precision={self.precision!r}, way={self.way}, input_size={self.input_size})"
        )

    def close(self) -> None:
        """Release the backend's sessions / engines and device memory."""
        self._backend.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------- support side
    def encode_support(
        self, classes: Mapping[str, Sequence[tuple[ImageInput, Any]]], color: str = "rgb"
    ) -> SupportSet:
        """Encode a support set: {class name: [(image, mask), ...]} in label order.

        Dict order is class order: label n + 1 is the n-th class. Exactly ``way`` classes
        (1..way for a way-flexible export; any number with ``group_classes``), each with at
        least one shot. image: uint8 [H, W, 3] RGB (``color="bgr"`` for OpenCV) or a
        file path; mask: [H, W] bool / {0, 1} / {0, 255} / {0, 1, 255} (255 = ignore) or a path.
        """
        shots, names, counts = support_shots(classes, self.way, self.accepts)
        features = self._encode_shots(shots, color)
        per_class = np.split(features, np.cumsum(counts)[:-1])
        return SupportSet(
            tuple(names), tuple(per_class), self._aggregate(per_class, names), self.engine_id
        )

    def add_shot(
        self, support: SupportSet, name: str, image: ImageInput, mask: Any, color: str = "rgb"
    ) -> SupportSet:
        """A new set: ``support`` with one more shot of class ``name`` (a new name adds a class
        at the end).

        Only the new shot goes through the support encoder; only its class is re-aggregated.
        image: uint8 [H, W, 3] RGB (``color="bgr"`` for OpenCV) or a file path; mask: [H, W]
        bool / {0, 1} / {0, 255} / {0, 1, 255} or a file path.
        """
        self.check_engine(support)
        known = name in support.class_names
        previous = (
            support.shot_features[support.class_names.index(name)]
            if known
            else np.zeros((0, self.channels), np.float32)
        )  # [K, C]
        new = self._encode_shots([(name, previous.shape[0], image, mask)], color)  # [1, C]
        features = np.concatenate([previous, new])  # [K + 1, C]
        return support.with_class(name, features, self._aggregate([features], [name])[0])

    def load_support(self, path: str | Path) -> SupportSet:
        """Read a set written by ``SupportSet.save``; refuse one encoded by other engines."""
        support = SupportSet.load(path)
        self.check_engine(support, source=str(path))
        return support

    def _encode_shots(
        self, shots: Sequence[tuple[str, int, ImageInput, Any]], color: str = "rgb"
    ) -> np.ndarray:
        """(class name, shot index, image, mask) shots -> float32 [len(shots), C] features.

        Every shot is checked before any is encoded; the encoder runs in chunks of its limit.
        """
        size, mode = self.input_size, self.resize
        backbone = self._manifest.model.backbone
        prepared = [
            prepare_shot(image, mask, size, mode, backbone, color, f"class {name!r}, shot {k}")
            for name, k, image, mask in shots
        ]
        chunks = []
        step = self._backend.max_support
        for start in range(0, len(prepared), step):
            part = prepared[start : start + step]
            images = np.stack([image for image, _ in part])  # [S, H, W, 3] uint8 RGB
            masks = np.stack([mask for _, mask in part])  # [S, H, W] uint8 0 / 1 / 255
            chunks.append(self._backend.run_support_encoder(images, masks))
        if not chunks:
            return np.zeros((0, self.channels), np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def _aggregate(self, features: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
        """Per-class shot features [K_n, C] -> prototypes float32 [len(features), C].

        The aggregator graph takes [way, K, C] and treats each row on its own (A_S relates the
        shots of one class only), so classes are grouped by K and a group fills the rows,
        padded with copies of its first class. Classes with fewer than ``min_shots`` shots
        (K = 1 when the general graph needs 2) go to the single-shot graph.
        """
        max_shots = self._backend.max_shots
        channels = features[0].shape[1] if len(features) else self.channels
        prototypes = np.empty((len(features), channels), np.float32)
        groups: dict[int, list[int]] = defaultdict(list)
        for index, shots in enumerate(features):
            if shots.shape[0] > max_shots:
                raise RuntimeInputError(
                    f"class {names[index]!r} has {shots.shape[0]} shots; the engines take at "
                    f"most {max_shots} per class (an export limit: re-export with a larger "
                    "--max-shots)"
                )
            groups[shots.shape[0]].append(index)
        for count, members in groups.items():
            single = count < self._min_shots
            for start in range(0, len(members), self.way):
                chunk = members[start : start + self.way]
                padding = [features[chunk[0]]] * (self.way - len(chunk))
                rows = [features[i] for i in chunk] + padding
                stacked = np.ascontiguousarray(np.stack(rows), dtype=np.float32)  # [way, K, C]
                prototypes[chunk] = self._backend.run_aggregator(stacked, single)[: len(chunk)]
        return prototypes

    def check_engine(self, support: SupportSet, source: str = "this support set") -> None:
        """Refuse a support set encoded by other engines (other weights)."""
        if not isinstance(support, SupportSet):
            raise RuntimeInputError(
                f"expected a SupportSet, got {type(support).__name__}; "
                "make one with Segmenter.encode_support"
            )
        if support.engine_id != self.engine_id:
            raise RuntimeInputError(
                f"{source} was encoded by other engines (engine id {support.engine_id[:12]}..., "
                f"these are {self.engine_id[:12]}... from {self.engine_dir}): its features mean "
                "nothing to this decoder; encode the support images again with this segmenter"
            )

    @property
    def accepts(self) -> str:
        """The numbers of classes these engines decode (``check_way``)."""
        if self.group_classes:
            return "any"
        return "up_to" if self.way_flexible else "exact"

    def _check_way(self, count: int, names: Sequence[str]) -> None:
        """Refuse a number of support classes that these engines cannot decode."""
        check_way(count, names, self.way, self.accepts)

    # ------------------------------------------------------------------------------ query side
    def _check_prepared(self, batch: np.ndarray) -> None:
        """Refuse anything but prepared frames: uint8 [B, S, S, 3]."""
        check_prepared(batch, self.input_size, "prepared frames (from prepare_frames)")

    def _decode(
        self, batch: np.ndarray, support: SupportSet, with_probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Checked prepared frames -> (labels [B, S, S], probabilities [B, N+1, S, S] or None)."""
        self._check_prepared(batch)
        self.check_engine(support)
        count = len(support.class_names)
        self._check_way(count, support.class_names)
        prototypes = np.ascontiguousarray(support.prototypes, dtype=np.float32)  # [n, C]
        if count == self.way and not self.way_flexible:  # the paper's fixed-N model
            return self._run_decoder(batch, prototypes, with_probabilities)
        if self.way_flexible and count <= self.way:
            slots, slot_mask = self._fill_slots([tuple(range(count))], prototypes)
            assert slot_mask is not None  # way-flexible
            labels, probabilities = self._run_decoder(
                batch, slots[0], with_probabilities, slot_mask[0]
            )
            return labels, None if probabilities is None else probabilities[:, : count + 1]
        return self._decode_groups(batch, prototypes, with_probabilities)

    def _fill_slots(
        self, groups: Sequence[tuple[int, ...]], prototypes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """prototypes [n, C] -> per group: slot prototypes [G, N, C] (unused slots zero: the
        graph puts its "no class" prototype there) and, way-flexible, slot masks [G, N]."""
        slots = np.zeros((len(groups), self.way, prototypes.shape[1]), np.float32)
        mask = np.zeros((len(groups), self.way), np.uint8)
        for g, group in enumerate(groups):
            slots[g, : len(group)] = prototypes[list(group)]
            mask[g, : len(group)] = 1
        return slots, mask if self.way_flexible else None

    def _decode_groups(
        self, batch: np.ndarray, prototypes: np.ndarray, with_probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """n classes that do not fit the slots: G groups, decoded in one batched call (every
        frame once per group, each with its group's prototypes), merged per pixel."""
        count, frames = prototypes.shape[0], batch.shape[0]
        groups = plan_groups(count, self.way, fill=not self.way_flexible)
        slots, slot_mask = self._fill_slots(groups, prototypes)  # [G, N, C], [G, N]
        tiled = np.concatenate([batch] * len(groups))  # [G*B, S, S, 3], group-major
        per_frame = np.repeat(slots, frames, axis=0)  # [G*B, N, C]
        masks = None if slot_mask is None else np.repeat(slot_mask, frames, axis=0)  # [G*B, N]
        _, probabilities = self._run_decoder(tiled, per_frame, True, masks)
        assert probabilities is not None  # asked for
        size = self.input_size
        by_group = probabilities.reshape(len(groups), frames, self.way + 1, size, size)
        labels, merged = merge_groups(by_group, groups, count)
        logger.debug("%d classes decoded in %d groups of %d slots", count, len(groups), self.way)
        return labels, merged if with_probabilities else None

    def _run_decoder(
        self,
        batch: np.ndarray,
        prototypes: np.ndarray,
        with_probabilities: bool,
        slot_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Checked frames [B, S, S, 3] + prototypes [N, C] (one set) or [B, N, C] (per frame)
        (+ a way-flexible export's slot_mask [N] or [B, N]) -> (labels [B, S, S],
        probabilities [B, N+1, S, S] or None), in calls of at most ``max_batch`` frames."""
        size = self.input_size
        labels, probabilities = [], []
        for start in range(0, batch.shape[0], self.max_batch):
            part = np.ascontiguousarray(batch[start : start + self.max_batch])
            rows = prototypes if prototypes.ndim == 2 else prototypes[start : start + len(part)]
            masks = (
                slot_mask
                if slot_mask is None or slot_mask.ndim == 1
                else slot_mask[start : start + len(part)]
            )
            out_labels, out_probabilities = self._decode_part(part, rows, with_probabilities, masks)
            labels.append(out_labels)
            probabilities.append(out_probabilities)
        if not labels:  # an empty batch: empty arrays of the documented shapes
            empty = (
                np.zeros((0, self.way + 1, size, size), np.float32) if with_probabilities else None
            )
            return np.zeros((0, size, size), np.uint8), empty
        # backends return an array for every part when asked for the probabilities
        stacked = (
            np.concatenate(cast("list[np.ndarray]", probabilities)) if with_probabilities else None
        )
        return np.concatenate(labels), stacked

    def _decode_part(
        self,
        frames: np.ndarray,
        prototypes: np.ndarray,
        with_probabilities: bool,
        slot_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One decoder call, or for per-frame prototypes on a shared-form export (schema v1.0:
        prototypes [N, C] for the whole call) one call per distinct support set of the part,
        the frames' order kept. (Way-flexible exports are per-frame: no slot_mask there.)"""
        if prototypes.ndim == 2 or self._backend.prototypes_form == "per_frame":
            prototypes = np.ascontiguousarray(prototypes)
            if slot_mask is None:
                return self._backend.run_decoder(frames, prototypes, with_probabilities)
            return self._backend.run_decoder(frames, prototypes, with_probabilities, slot_mask)
        count = frames.shape[0]
        sets, which = np.unique(prototypes.reshape(count, -1), axis=0, return_inverse=True)
        which = which.reshape(-1)  # numpy 2.0.x returned it with the input's rank
        size = self.input_size
        labels = np.empty((count, size, size), np.uint8)
        probabilities = (
            np.empty((count, self.way + 1, size, size), np.float32) if with_probabilities else None
        )
        for index, flat in enumerate(sets):
            members = np.flatnonzero(which == index)
            out_labels, out_probabilities = self._backend.run_decoder(
                np.ascontiguousarray(frames[members]),
                np.ascontiguousarray(flat.reshape(prototypes.shape[1:])),
                with_probabilities,
            )
            labels[members] = out_labels
            if probabilities is not None:
                probabilities[members] = out_probabilities
        return labels, probabilities

    def decode_frames(
        self,
        batch: np.ndarray,
        prototypes_per_frame: np.ndarray,
        with_probabilities: bool = False,
        slot_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Frames of different streams in one batch, each with its own support set.

        batch: uint8 [B, S, S, 3] prepared frames (``prepare_frames``); prototypes_per_frame:
        float32 [B, N, C], row b = the prototypes of frame b's support set (the
        ``SupportSet.prototypes`` its stream encoded with these engines) -> (labels uint8
        [B, S, S], probabilities float32 [B, N+1, S, S] when ``with_probabilities``, else
        None). Frame b's result equals decoding it alone with its own set. For a server with
        dynamic batching: requests are stateless, each carries its prototypes. The arrays carry
        no engine id, so matching them to these engines is the caller's part (a server checks
        the id once, where the support set is encoded). Batches larger than ``max_batch`` are
        split; on an export of schema v1.0 (a shared-prototypes decoder) each distinct support
        set of a call is decoded in a call of its own. A way-flexible export also takes
        ``slot_mask`` uint8 [B, N] (1 = a class, 0 = an empty slot; None = every slot a class).
        """
        self._check_prepared(batch)
        expected = (batch.shape[0], self.way, self.channels)
        if (
            not isinstance(prototypes_per_frame, np.ndarray)
            or prototypes_per_frame.shape != expected
            or not np.issubdtype(prototypes_per_frame.dtype, np.floating)
        ):
            got = (
                f"{prototypes_per_frame.dtype} {prototypes_per_frame.shape}"
                if isinstance(prototypes_per_frame, np.ndarray)
                else type(prototypes_per_frame).__name__
            )
            raise RuntimeInputError(
                f"prototypes_per_frame must be float32 [B, N, C] = {list(expected)} (one "
                f"support set's prototypes per frame, N = {self.way} classes, C = "
                f"{self.channels} channels), got {got}"
            )
        prototypes = np.ascontiguousarray(prototypes_per_frame, dtype=np.float32)
        if not np.isfinite(prototypes).all():
            raise RuntimeInputError("prototypes_per_frame holds NaN or infinite values")
        return self._run_decoder(
            batch, prototypes, with_probabilities, self._slot_mask(slot_mask, batch.shape[0])
        )

    def _slot_mask(self, slot_mask: np.ndarray | None, frames: int) -> np.ndarray | None:
        """``decode_frames``' slot_mask checked: uint8 [B, N] for a way-flexible export."""
        if not self.way_flexible:
            if slot_mask is not None:
                raise RuntimeInputError(
                    "slot_mask is for way-flexible exports; these engines are "
                    f"{self.way}-way (fixed)"
                )
            return None
        if slot_mask is None:
            return np.ones((frames, self.way), np.uint8)
        if (
            not isinstance(slot_mask, np.ndarray)
            or slot_mask.shape != (frames, self.way)
            or not np.isin(slot_mask, (0, 1)).all()
        ):
            got = slot_mask.shape if isinstance(slot_mask, np.ndarray) else type(slot_mask)
            raise RuntimeInputError(
                f"slot_mask must be [B, N] = [{frames}, {self.way}] of 0 / 1, got {got}"
            )
        return np.ascontiguousarray(slot_mask, dtype=np.uint8)
