"""python export/verify.py --dir DIR --checkpoint CKPT [--provider cpu|cuda]

Re-run the parity check of an export directory: file hashes against the manifest, the
checkpoint against the manifest's SHA-256, then every ONNX graph with ONNX Runtime against the
PyTorch model (tolerances in mfnet/export/verify.py). Exit code 0 when everything passes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from mfnet.export.manifest import ManifestError, read_manifest, sha256_of, verify_hashes  # noqa: E402
from mfnet.export.verify import verify_export  # noqa: E402
from mfnet.training.checkpoint import CheckpointError, model_from_checkpoint  # noqa: E402

PROVIDERS = {"cpu": ("CPUExecutionProvider",),
             "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python export/verify.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, type=Path, help="export directory")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint it was exported from")
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu",
                        help="ONNX Runtime execution provider (default: cpu)")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.dir)
        verify_hashes(args.dir, manifest)
        if sha256_of(args.checkpoint) != manifest["checkpoint"]["sha256"]:
            raise ManifestError(f"{args.checkpoint} is not the checkpoint this directory was "
                                "exported from (SHA-256 differs)")
        model, _ = model_from_checkpoint(args.checkpoint)
    except (ManifestError, CheckpointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = verify_export(args.dir, manifest, model, providers=PROVIDERS[args.provider])
    print("PASSED" if report["passed"] else "FAILED")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
