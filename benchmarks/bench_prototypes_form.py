"""The in-process runtime with one shared support set, before and after prototypes per frame.

    python benchmarks/bench_prototypes_form.py --engines DIR --label before|after [--threads 1]

Times what a video user runs (one cached support set for every frame) on whichever
``mfnet_runtime`` is importable, so the same script measures the code before the change (an
export of schema v1.0, decoder prototypes [N, C]) and after it (schema v1.1, [B, N, C]: the
runtime tiles the one set to the batch):

- ``segment_b1``: ``Segmenter.segment``, uint8 frame -> label map at the frame's size;
- ``decode_b1`` / ``decode_b4``: ``decode_prepared`` on a prepared batch of 1 / 4 frames;
- after only (``Segmenter.decode_frames`` exists): ``decode_frames_b4_two_sets``, four frames
  of two support sets in one call.

Each variant is warmed up, then timed ``--iterations`` times on random frames (the labels do not
matter for the time); the JSON under benchmarks/results/ (``prototypes_form_<label>.json``)
records median, p10, p90, the threads, the export's schema and prototypes form, and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import now_utc, time_calls, versions, write_json  # noqa: E402
from mfnet_runtime import Segmenter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", required=True, help="export directory")
    parser.add_argument("--label", required=True, help="before | after (the result file name)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args(argv)

    segmenter = Segmenter.load(
        args.engines, backend="onnxruntime", device="cpu", threads=args.threads
    )
    size, way = segmenter.input_size, segmenter.way
    rng = np.random.default_rng(0)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1

    def support(seed: int):
        images = np.random.default_rng(seed).integers(0, 256, (way, size, size, 3), np.uint8)
        return segmenter.encode_support({f"class{n}": [(images[n], mask)] for n in range(way)})

    shared, other = support(1), support(2)
    frames = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    one, _ = segmenter.prepare_frames([frames[0]])
    four, _ = segmenter.prepare_frames(list(frames))
    variants = {
        "segment_b1": lambda: segmenter.segment(frames[0], shared),
        "decode_b1": lambda: segmenter.decode_prepared(one, shared),
        "decode_b4": lambda: segmenter.decode_prepared(four, shared),
    }
    if hasattr(segmenter, "decode_frames"):
        mixed = np.stack([s.prototypes for s in (shared, other, shared, other)])
        variants["decode_frames_b4_two_sets"] = lambda: segmenter.decode_frames(four, mixed)
    results = {}
    load_before = os.getloadavg()  # other processes on the machine (the timings are host time)
    for name, call in variants.items():
        stats = time_calls(call, args.warmup, args.iterations, False)
        stats["iterations"] = stats["n"]
        results[name] = stats
    manifest = json.loads((Path(args.engines) / "manifest.json").read_text())
    decoder = next(
        g for g in manifest["graphs"] if g["role"] == "query_decoder" and g["format"] == "onnx"
    )
    payload = {
        "benchmark": "bench_prototypes_form",
        "label": args.label,
        "date": now_utc(),
        "device": platform.processor() or "cpu",
        "threads": args.threads,
        "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "runtime_backend": f"{segmenter.backend_name} ({segmenter.precision})",
        "export": {
            "schema": manifest["schema"],
            "prototypes_form": decoder["details"].get("prototypes_form", "shared"),
            "prototypes_shape": decoder["inputs"][1]["shape"],
            "way": way,
            "input_size": size,
            "backbone": manifest["model"]["backbone"],
            "channels": manifest["model"]["channels"],
        },
        "versions": versions(),
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"prototypes_form_{args.label}.json"
    write_json(out, payload)
    for variant, r in results.items():
        print(
            f"{variant:<26} median {r['median_ms']:7.3f} ms  p10 {r['p10_ms']:7.3f}  "
            f"p90 {r['p90_ms']:7.3f}"
        )
    print(f"wrote {out}")
    segmenter.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
