"""Per-frame inference latency: the runtime's cached-prototype decoder vs PyTorch eager.

    python benchmarks/bench_runtime.py --checkpoint CKPT --engines DIR [--device cpu|cuda]

Variants, all timed in one run on the same frames so they can be compared as ratios:
- ``torch_full``: PyTorch eager FP32, support + query every frame (how the paper times MFNet);
- ``torch_cached``: PyTorch eager FP32, ``decode_query`` with a cached ``EncodedSupport``;
- ``runtime_segment``: ``mfnet_runtime`` end to end, uint8 frame in host memory -> label map in
  host memory at the frame's size (preprocess, decoder, restore);
- ``runtime_decoder``: ``decode_prepared`` alone on a prepared batch of one frame;
- with ``--smooth``, ``runtime_segment_smooth``: ``runtime_segment`` with the probabilities
  upsampled bilinearly before the argmax (what the CLIs do by default for frames larger than
  the network input; use ``--frame-size`` to give such a frame).
Torch and ONNX Runtime use the threads of ``--threads`` (default: the free cores).
Each variant is warmed up, then timed ``--iterations`` times (CUDA is synchronised around every
call); the JSON under benchmarks/results/ records median, p10, p90, device and versions.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import now_utc, time_calls, versions, write_json  # noqa: E402
from mfnet.checkpoint import model_from_checkpoint  # noqa: E402
from mfnet.threads import add_threads_argument, set_torch_threads  # noqa: E402
from mfnet_runtime import Segmenter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--engines", required=True, help="export directory of that checkpoint")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--frame-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="frame size (default: the network input, square)",
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--name", default=None, help="result file name (default: derived)")
    parser.add_argument(
        "--smooth",
        action="store_true",
        help="also time runtime_segment_smooth (bilinear probabilities, argmax)",
    )
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    policy = set_torch_threads(args.threads)
    print(policy.describe())

    cuda = args.device == "cuda"
    device = torch.device(args.device)
    model, config = model_from_checkpoint(args.checkpoint, map_location=device)
    size = config.model.image_size
    height, width = args.frame_size or (size, size)
    rng = np.random.default_rng(0)
    way, shot = model.way, config.model.shot
    support_images = rng.integers(0, 256, (way, shot, size, size, 3), dtype=np.uint8)
    support_masks = np.zeros((way, shot, size, size), np.uint8)
    support_masks[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)

    images_t = torch.from_numpy(support_images).permute(0, 1, 4, 2, 3).float().div(255).to(device)
    masks_t = torch.from_numpy(support_masks).to(device)
    query_t = (
        torch.from_numpy(rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8))
        .float()
        .div(255)
        .to(device)
    )
    with torch.no_grad():
        cache = model.encode_support(images_t, masks_t)

    def torch_full() -> None:
        with torch.no_grad():
            model(images_t, masks_t, query_t).argmax(1).cpu()

    def torch_cached() -> None:
        with torch.no_grad():
            model.decode_query(query_t, cache).argmax(1).cpu()

    segmenter = Segmenter.load(args.engines, device=args.device, threads=policy.threads)
    support = segmenter.encode_support(
        {
            f"class{n}": [(support_images[n, k], support_masks[n, k]) for k in range(shot)]
            for n in range(way)
        }
    )
    batch, _ = segmenter.prepare_frames([frame])
    variants = {
        "torch_full": torch_full,
        "torch_cached": torch_cached,
        "runtime_segment": lambda: segmenter.segment(frame, support),
        "runtime_decoder": lambda: segmenter.decode_prepared(batch, support),
    }
    if args.smooth:

        def segment_smooth() -> np.ndarray:
            prepared, geometry = segmenter.prepare_frames([frame])
            _, probabilities = segmenter.decode_with_probabilities(prepared, support)
            return segmenter.restore_smooth(probabilities[0], geometry[0])

        variants["runtime_segment_smooth"] = segment_smooth
    results = {}
    for name, call in variants.items():
        stats = time_calls(call, args.warmup, args.iterations, cuda)
        stats["iterations"] = stats["n"]
        results[name] = stats
    base = results["torch_full"]["median_ms"]
    ratios = {f"torch_full / {name}": base / r["median_ms"] for name, r in results.items()}
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    payload = {
        "benchmark": "bench_runtime",
        "date": now_utc(),
        "device": device_name,
        "cpu_count": policy.cores,
        "threads": policy.threads,
        "runtime_backend": f"{segmenter.backend_name} ({segmenter.precision})",
        "model": {
            "backbone": config.model.backbone,
            "way": way,
            "shot": shot,
            "input_size": size,
            "channels": config.model.channels,
        },
        "frame": [height, width],
        "versions": versions(),
        "results": results,
        "speedup_vs_torch_full": ratios,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.name or f"runtime_{config.model.backbone}_{size}_{args.device}"
    out = RESULTS / f"{name}.json"
    write_json(out, payload)
    for variant, r in results.items():
        print(
            f"{variant:<16} median {r['median_ms']:8.2f} ms  p10 {r['p10_ms']:8.2f}  "
            f"p90 {r['p90_ms']:8.2f}  ({base / r['median_ms']:.2f}x torch_full)"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
