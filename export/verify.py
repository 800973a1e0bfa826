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

from mfnet.errors import mfnet_command, require_export_dependencies  # noqa: E402
from mfnet.export.manifest import ManifestError, read_manifest, sha256_of, verify_hashes  # noqa: E402
from mfnet.export.verify import verify_export  # noqa: E402
from mfnet.training.checkpoint import model_from_checkpoint  # noqa: E402
from mfnet_runtime import options  # noqa: E402

PROVIDERS = {"cpu": ("CPUExecutionProvider",),
             "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider")}


@mfnet_command()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python export/verify.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, type=options.directory_path,
                        help="export directory")
    parser.add_argument("--checkpoint", required=True, type=options.file_path,
                        help="the checkpoint it was exported from")
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu",
                        help="ONNX Runtime execution provider (default: cpu)")
    args = parser.parse_args(argv)
    require_export_dependencies()
    manifest = read_manifest(args.dir)
    verify_hashes(args.dir, manifest)
    model, _ = model_from_checkpoint(args.checkpoint)
    if sha256_of(args.checkpoint) != manifest["checkpoint"]["sha256"]:
        raise ManifestError(f"{args.checkpoint} is not the checkpoint this directory was "
                            "exported from (SHA-256 differs)")
    report = verify_export(args.dir, manifest, model, providers=PROVIDERS[args.provider])
    print("PASSED" if report["passed"] else "FAILED")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
