"""``python -m mfnet.predict --checkpoint CKPT --support SPEC --input SRC --output DST``.

Segment your own images, image folders, videos or camera frames with a training checkpoint
(PyTorch), the twin of ``python -m mfnet_runtime segment`` for exported engines. The support set
is the same SPEC (``docs/support_spec.md``), read by the runtime package's loader, and the
sources, outputs, frame pipeline, progress bar and report are the runtime's too
(``mfnet_runtime.pipeline``); only the model runs here, in PyTorch. Frames and support images
are fitted to the checkpoint's input size with the runtime's geometry (``mfnet_runtime.images``,
the one evaluation's ``TestResize`` uses: longer side to the input size, aspect kept,
bottom/right padded; masks nearest) and the labels are mapped back to each frame's own size.

The runtime package (with OpenCV for videos) is installed with ``mfnet`` (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mfnet_runtime import options
from mfnet_runtime.images import fit
from mfnet_runtime.pipeline import add_io_arguments, run_and_report
from mfnet_runtime.spec import load_support_spec

from .checkpoint import model_from_checkpoint
from .data.transforms import check_pair
from .device import resolve_device
from .errors import mfnet_command
from .model.grouping import fits_slots, grouped_scores
from .model.mfnet import MFNet
from .model.support import EncodedSupport
from .threads import set_torch_threads


@dataclass(frozen=True)
class TorchSupportSet:
    """An encoded support set: class names in label order and the model's ``EncodedSupport``."""

    class_names: tuple[str, ...]
    cache: EncodedSupport


class TorchSegmenter:
    """A PyTorch ``MFNet`` behind the runtime pipeline's ``FrameSegmenter`` protocol
    (``input_size``, ``resize`` and the decoder on prepared frames), so the runtime's frame
    pipeline fits the frames, drives the model and maps the labels back."""

    def __init__(
        self, model: MFNet, resize_mode: str, device: torch.device, group_classes: bool = False
    ) -> None:
        model.require_prototype_split("python -m mfnet.predict (a prototype cache per class)")
        self.model = model.to(device).eval()
        self.device = device
        self.way = model.way
        self.group_classes = group_classes  # any number of classes, decoded in groups
        self.input_size = model.config.image_size
        self.resize = resize_mode  # "pad" | "stretch", the checkpoint's test resize

    def _fit(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """image uint8 [H, W, 3] RGB + mask uint8 [H, W] -> [S, S, 3] + [S, S], as the
        runtime fits support shots (``images.fit``: bilinear / nearest, zero padding)."""
        check_pair(image, mask)
        fitted, _ = fit(image, self.input_size, self.resize, Image.Resampling.BILINEAR)
        fitted_mask, _ = fit(mask, self.input_size, self.resize, Image.Resampling.NEAREST)
        return fitted, fitted_mask

    def encode_support(
        self, classes: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]
    ) -> TorchSupportSet:
        """``{name: [(image uint8 [H, W, 3] RGB, mask uint8 [H, W] 1/0/255), ...]}`` in class
        order -> prototypes. Classes may have different shot counts: each class is pooled and
        aggregated on its own (A_S relates the shots of one class only)."""
        if not self.group_classes or not classes:
            try:
                self.model.check_classes(len(classes))
            except ValueError as error:
                raise ValueError(f"{error} (the SPEC's classes: {', '.join(classes)})") from None
        prototypes = []
        with torch.inference_mode():
            for name, shots in classes.items():
                fitted = [self._fit(image, np.asarray(mask, np.uint8)) for image, mask in shots]
                images = torch.from_numpy(np.stack([f[0] for f in fitted])).to(self.device)
                masks = torch.from_numpy(np.stack([f[1] for f in fitted])).to(self.device)
                images = images.permute(0, 3, 1, 2).float().div(255.0)  # [K, 3, S, S]
                try:
                    shot_features = self.model.encode_shots(images[None, None], masks[None, None])
                except ValueError as error:
                    raise ValueError(f"support class {name!r}: {error}") from error
                prototypes.append(self.model.aggregate_prototypes(shot_features))  # [1, 1, C]
        stacked = torch.cat(prototypes, dim=1)  # [1, N, C]
        # The decoder reads only the prototypes: the K = 1 view of them is a complete cache.
        return TorchSupportSet(tuple(classes), EncodedSupport(stacked[:, :, None, :], stacked))

    def _scores(self, batch: np.ndarray, support: TorchSupportSet) -> torch.Tensor:
        """uint8 [B, S, S, 3] RGB -> probabilities float32 [B, n+1, S, S]: the softmax of the
        logits, or the merged scores of the groups (``grouped_scores``)."""
        query = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if fits_slots(self.model, support.cache.way):
            return self.model.decode_query(query, support.cache).float().softmax(dim=1)
        return grouped_scores(self.model, query, support.cache.prototypes)

    def decode_prepared(self, batch: np.ndarray, support: TorchSupportSet) -> np.ndarray:
        """uint8 [B, S, S, 3] RGB -> labels uint8 [B, S, S] (0 = background)."""
        with torch.inference_mode():
            return self._scores(batch, support).argmax(dim=1).to(torch.uint8).cpu().numpy()

    def decode_with_probabilities(
        self, batch: np.ndarray, support: TorchSupportSet
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (labels uint8 [B, S, S], probabilities float32 [B, n+1, S, S])."""
        with torch.inference_mode():
            scores = self._scores(batch, support)
            return scores.argmax(dim=1).to(torch.uint8).cpu().numpy(), scores.cpu().numpy()


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m mfnet.predict``: the checkpoint, the SPEC, the runtime's
    input/output options and the device."""
    parser = argparse.ArgumentParser(
        prog="python -m mfnet.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=options.file_path,
        help="checkpoint written by mfnet.train",
    )
    parser.add_argument(
        "--support",
        required=True,
        metavar="SPEC",
        help="support set: a folder with one sub-folder of images and "
        "<image>.mask.png masks per class, or a JSON file "
        "(docs/support_spec.md); as many classes as the checkpoint's way (1..max_way for a "
        "way-flexible one; any number with --group-classes)",
    )
    add_io_arguments(parser)
    parser.add_argument(
        "--group-classes",
        action="store_true",
        help="take any number of classes: those that do not fit the checkpoint's slots are "
        "decoded in groups and merged per pixel (docs/decisions.md)",
    )
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    return parser


@mfnet_command()
def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, encode the SPEC with the checkpoint, segment SRC; the exit code."""
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    print(set_torch_threads(args.threads).describe())
    model, config = model_from_checkpoint(args.checkpoint, map_location=device)
    segmenter = TorchSegmenter(model, config.data.test_resize, device, args.group_classes)
    support = segmenter.encode_support(load_support_spec(args.support))
    print(
        f"support: {len(support.class_names)} classes ({', '.join(support.class_names)}) "
        f"from {args.support}"
    )
    return run_and_report(segmenter, support, args, f"pytorch ({device})")


if __name__ == "__main__":
    sys.exit(main())
