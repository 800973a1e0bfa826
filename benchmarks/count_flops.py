"""python benchmarks/count_flops.py [--backbone resnet50] [--size 473] [--ways 1 2 5]

Per-frame multiply-accumulates (MACs) of the query path, counted with
``torch.utils.flop_counter.FlopCounterMode`` on meta tensors (nothing is computed, so the
ResNet-50 473 count takes seconds on a CPU; random init, weights="none"): the backbone + neck,
the A_M scale attention and the decoder, for the eager ``decode_query`` and for the inference
rewrite ``FastQueryDecoder`` (prototype folding, static pooling), and the naive N x 1-way
baseline (a 1-way model run once per class) with cached prototypes and with the support
encoded every frame (the paper's timing). Writes benchmarks/results/flops_<backbone>_<size>.json.

FlopCounterMode counts convolutions and matrix products (2 FLOPs per MAC; MACs = FLOPs / 2);
element-wise ops, pooling, interpolation and softmax are not counted (memory-bound, small).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from mfnet.config import ModelConfig  # noqa: E402
from mfnet.model.build import build_mfnet  # noqa: E402
from mfnet.model.inference import FastQueryDecoder  # noqa: E402
from mfnet.model.support import EncodedSupport  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _count(run: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """(total MACs, MACs per module name) of one call."""
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
        run()
    per_module = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops() // 2, per_module


def _part(per_module: dict[str, int], name: str) -> int:
    """MACs of a top-level module (FlopCounterMode names it by its class), 0 if absent."""
    return per_module.get(name, 0)


def count_query_path(
    backbone: str, size: int, channels: int, way: int, shot: int = 1, **config: object
) -> dict[str, object]:
    """MACs per frame (batch 1) of one N-way configuration, eager and folded."""
    torch.manual_seed(0)
    model_config = ModelConfig(
        backbone=backbone,
        weights="none",
        channels=channels,
        way=way,
        shot=shot,
        image_size=size,
        **config,
    )
    model = build_mfnet(model_config).eval().to("meta")
    fast = FastQueryDecoder(model).to("meta")
    query = torch.empty(1, 3, size, size, device="meta")
    prototypes = torch.empty(1, way, channels, device="meta")
    cache = EncodedSupport(prototypes[:, :, None], prototypes)

    features, per_module = _count(lambda: model.extract_features(query))
    eager, eager_parts = _count(lambda: model.decode_query(query, cache))
    folded, folded_parts = _count(lambda: fast(query, prototypes))
    prepare, _ = _count(lambda: fast.prepare(prototypes))
    decoder = _part(eager_parts, "Decoder")
    trunk = _part(per_module, type(model.backbone).__name__)
    return {
        "way": way,
        "backbone_to_layer3": trunk,
        "neck": features - trunk,
        "features": features,  # backbone + neck: once per frame, independent of N
        "eager": {
            "total": eager,
            "scale_attention": _part(eager_parts, "ScaleAttention"),
            "decoder": decoder,
            "head": eager - features,
        },
        # folded: the A_M figure includes the once-per-frame query terms of the first convs,
        # the prototype terms (computed in the graph from [N, C]) and the pooling MatMuls
        "folded": {
            "total": folded,
            "scale_attention": folded - features - decoder,
            "decoder": decoder,
            "head": folded - features,
            "prototype_terms": prepare,
        },
        "saved_by_folding": eager - folded,
        "support_backbone_per_shot": features,  # one support image through backbone + neck
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=473)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--ways", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default: benchmarks/results/flops_<backbone>_<size>.json)",
    )
    args = parser.parse_args(argv)
    ways = sorted(set(args.ways) | {1})  # the naive baseline needs the 1-way model
    counts = {way: count_query_path(args.backbone, args.size, args.channels, way) for way in ways}
    one_way = counts[1]
    rows = []
    for way in ways:
        c = counts[way]
        naive_cached = way * one_way["eager"]["total"]  # N x (backbone + 1-way head)
        naive_paper = way * (one_way["eager"]["total"] + one_way["support_backbone_per_shot"])
        full_model = c["eager"]["total"] + way * c["support_backbone_per_shot"]  # K = 1
        c["naive_cached_prototypes"] = naive_cached
        c["naive_support_every_frame"] = naive_paper
        c["eager_full_model_k1"] = full_model
        c["ratios"] = {
            "naive_cached / eager": naive_cached / c["eager"]["total"],
            "naive_cached / folded": naive_cached / c["folded"]["total"],
            "naive_support_every_frame / folded": naive_paper / c["folded"]["total"],
            "eager_full_model_k1 / folded": full_model / c["folded"]["total"],
            "eager_head / folded_head": c["eager"]["head"] / c["folded"]["head"],
        }
        rows.append(c)
        g = 1e9
        print(
            f"N={way}: features {c['features'] / g:.2f} GMAC (trunk "
            f"{c['backbone_to_layer3'] / g:.2f} + neck {c['neck'] / g:.2f}); head eager "
            f"{c['eager']['head'] / g:.2f} (A_M {c['eager']['scale_attention'] / g:.2f}, "
            f"decoder {c['eager']['decoder'] / g:.2f}), "
            f"folded {c['folded']['head'] / g:.2f}; total eager {c['eager']['total'] / g:.2f}, "
            f"folded {c['folded']['total'] / g:.2f}; naive cached {naive_cached / g:.2f} "
            f"({c['ratios']['naive_cached / folded']:.2f}x folded), naive with support "
            f"{naive_paper / g:.2f} ({c['ratios']['naive_support_every_frame / folded']:.2f}x)"
        )
    result = {
        "what": "MACs per frame (batch 1), FlopCounterMode (convs + matmuls), "
        "query path with cached prototypes unless stated",
        "config": {
            "backbone": args.backbone,
            "size": args.size,
            "channels": args.channels,
            "shot": 1,
            "query_fusion": "add",
            "class_fusion": "concat",
            "scale_attention_shared": False,
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "counts": rows,
    }
    out = args.out or RESULTS / f"flops_{args.backbone}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
