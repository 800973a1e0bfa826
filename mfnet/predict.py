"""``python -m mfnet.predict --checkpoint CKPT --support SPEC --input SRC --output DST``.

Segment your own images, image folders, videos or camera frames with a training checkpoint
(PyTorch), the twin of ``python -m mfnet_runtime segment`` for exported engines. The support set
is the same SPEC (``docs/support_spec.md``), read by the runtime package's loader, and the
sources, outputs, progress bar and report are the runtime's too; only the model runs here, in
PyTorch. Frames and support images are fitted to the checkpoint's input size as in evaluation
(``TestResize``: longer side to the input size, aspect kept, bottom/right padded; masks nearest)
and the labels are mapped back to each frame's own size.

The runtime package (with OpenCV for videos) is installed with ``mfnet`` (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from mfnet_runtime.images import Geometry, restore_labels, restore_smooth

from .data.transforms import TestResize
from .device import resolve_device
from .model.mfnet import MFNet
from .model.support import SupportCache
from .threads import set_torch_threads
from .training.checkpoint import model_from_checkpoint

@dataclass(frozen=True)
class TorchSupport:
    """An encoded support set: class names in label order and the model's ``SupportCache``."""

    class_names: tuple[str, ...]
    cache: SupportCache


class TorchSegmenter:
    """The runtime's segmenter interface (``prepare_frames``, ``decode_prepared``,
    ``restore_labels``) over a PyTorch ``MFNet``, so the runtime's video pipeline drives it."""

    def __init__(self, model: MFNet, resize_mode: str, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.way = model.way
        self.input_size = model.config.image_size
        self.resize = TestResize(self.input_size, resize_mode)

    def _fit(self, image: np.ndarray, label: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """image uint8 [H, W, 3] RGB (+ label uint8 [H, W]) -> [S, S, 3] (+ [S, S], pad 255)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        if label is None:
            label = np.zeros(image.shape[:2], np.uint8)
        return self.resize(np.ascontiguousarray(image), np.ascontiguousarray(label))

    def encode_support(self, classes: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]
                       ) -> TorchSupport:
        """``{name: [(image uint8 [H, W, 3] RGB, mask uint8 [H, W] 1/0/255), ...]}`` in class
        order -> prototypes. Classes may have different shot counts: each class is pooled and
        aggregated on its own (A_S relates the shots of one class only)."""
        if len(classes) != self.way:
            raise ValueError(f"the checkpoint is {self.way}-way but the support set has "
                             f"{len(classes)} classes ({', '.join(classes)}); give exactly "
                             f"{self.way}")
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
        return TorchSupport(tuple(classes), SupportCache(stacked[:, :, None, :], stacked))

    def prepare_frames(self, frames: Sequence[np.ndarray], color: str = "rgb"
                       ) -> tuple[np.ndarray, list[Geometry]]:
        """frames uint8 [H, W, 3] in ``color`` order -> (uint8 [B, S, S, 3] RGB, geometries
        (orig_h, orig_w, content_h, content_w), the runtime's)."""
        batch, geometry = [], []
        for frame in frames:
            frame = frame[..., ::-1] if color == "bgr" else frame
            fitted, _ = self._fit(frame)
            height, width = self.resize.resized_shape(*frame.shape[:2])
            batch.append(fitted)
            geometry.append((frame.shape[0], frame.shape[1], height, width))
        return np.stack(batch), geometry

    def _logits(self, batch: np.ndarray, support: TorchSupport) -> torch.Tensor:
        """uint8 [B, S, S, 3] RGB -> logits float32 [B, N+1, S, S]."""
        query = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return self.model.decode_query(query, support.cache)

    def decode_prepared(self, batch: np.ndarray, support: TorchSupport) -> np.ndarray:
        """uint8 [B, S, S, 3] RGB -> labels uint8 [B, S, S] (0 = background)."""
        with torch.inference_mode():
            return self._logits(batch, support).argmax(dim=1).to(torch.uint8).cpu().numpy()

    def decode_with_probabilities(self, batch: np.ndarray, support: TorchSupport
                                  ) -> tuple[np.ndarray, np.ndarray]:
        """-> (labels uint8 [B, S, S], softmax probabilities float32 [B, N+1, S, S])."""
        with torch.inference_mode():
            logits = self._logits(batch, support)
            labels = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
            return labels, logits.softmax(dim=1).float().cpu().numpy()

    def restore_labels(self, labels: np.ndarray, geometry: Geometry) -> np.ndarray:
        """labels uint8 [S, S] -> uint8 [H, W] at the frame's size (crop the padding, nearest)."""
        return restore_labels(labels, geometry)

    def restore_smooth(self, probabilities: np.ndarray, geometry: Geometry) -> np.ndarray:
        """float32 [N+1, S, S] -> uint8 [H, W]: bilinear upsampling, then the argmax."""
        return restore_smooth(probabilities, geometry)


def _runtime_modules():
    """The runtime package's SPEC loader and command-line helpers (one definition of each)."""
    from mfnet_runtime import cli, spec

    return cli, spec


def build_parser(cli) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mfnet.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=cli.options.file_path,
                        help="checkpoint written by mfnet.train")
    parser.add_argument("--support", required=True, metavar="SPEC",
                        help="support set: a folder with one sub-folder of images and "
                             "<image>.mask.png masks per class, or a JSON file "
                             "(docs/support_spec.md); as many classes as the checkpoint's way")
    cli.add_io_arguments(parser)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    return parser


def main(argv: list[str] | None = None) -> int:
    cli, spec = _runtime_modules()
    from .errors import mfnet_command  # the boundary is the runtime's: imported once it is known

    return mfnet_command()(_predict)(cli, spec, argv)


def _predict(cli, spec, argv: list[str] | None) -> int:
    args = build_parser(cli).parse_args(argv)
    device = resolve_device(args.device)
    print(set_torch_threads(args.threads).describe())
    model, config = model_from_checkpoint(args.checkpoint, map_location=device)
    segmenter = TorchSegmenter(model, config.data.test_resize, device)
    support = segmenter.encode_support(spec.load_support_spec(args.support))
    print(f"support: {len(support.class_names)} classes ({', '.join(support.class_names)}) "
          f"from {args.support}")
    return cli.run_and_report(segmenter, support, args, f"pytorch ({device})")


if __name__ == "__main__":
    sys.exit(main())
