#!/usr/bin/env bash
# Run HERE (a development machine with PyPI access), not on the GPU machine: download the wheels
# that the GPU machine lacks, split the ones too large for one device call, and print the run
# calls that bring them over. benchmarks/gpu_check.sh installs them there.
#
#   bash benchmarks/fetch_gpu_wheels.sh [--part-mib 61] [--ort-version 1.31.1] [--no-download]
#
# What and why (details in benchmarks/README.md, "Wheels for the GPU machine"):
# - onnxruntime-gpu (ONNX Runtime's CUDA execution provider, for the ORT CUDA rows and the
#   runtime's CUDA tests). The GPU machine has torch 2.11+cu130 with the CUDA 13 / cuDNN 9
#   libraries of the nvidia-*-cu13 wheels and only the CPU build of onnxruntime. The
#   onnxruntime-gpu wheels on PyPI are built against CUDA 13 (the script checks the provider
#   library's NEEDED entries: libcublas.so.13, libcudart.so.13) and load cuDNN 9 at run time.
#   About 256 MB: split into parts of --part-mib MiB (61: four parts), one folder each
#   (.whl_part1, ...), because one device call carries at most 64 MiB, working tree included.
# - pycocotools (half a megabyte), so that the COCO tests can run there too (gpu_check.sh runs
#   only the tests marked cuda, which do not need it).
# Every folder written here (.whl/, .whl_part*/, .whl_download/) is ignored by git.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PART_MIB=61
ORT_VERSION="${ORT_VERSION:-1.31.1}"
COCO_VERSION="${COCO_VERSION:-2.0.11}"
DOWNLOAD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --part-mib) PART_MIB="$2"; shift ;;
        --ort-version) ORT_VERSION="$2"; shift ;;
        --no-download) DOWNLOAD=0 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "fetch_gpu_wheels: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
PY="${PYTHON:-python3}"
# The GPU machine: CPython 3.12, x86-64, manylinux (glibc >= 2.28 there).
TARGET=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64)

mkdir -p .whl .whl_download
if [ "$DOWNLOAD" = 1 ]; then
    "$PY" -m pip download "${TARGET[@]}" -d .whl_download "onnxruntime-gpu==$ORT_VERSION"
    "$PY" -m pip download "${TARGET[@]}" -d .whl "pycocotools==$COCO_VERSION"
fi
ORT_WHEEL="$(ls .whl_download/onnxruntime_gpu-"$ORT_VERSION"-*.whl 2>/dev/null | head -1)"
if [ -z "$ORT_WHEEL" ]; then
    echo "no onnxruntime_gpu-$ORT_VERSION wheel in .whl_download/" >&2
    exit 1
fi

# Which CUDA the provider library was built for: its NEEDED shared libraries.
"$PY" - "$ORT_WHEEL" <<'EOF'
import re, subprocess, sys, tempfile, zipfile
from pathlib import Path
wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as tmp:
    name = next(n for n in archive.namelist() if n.endswith("libonnxruntime_providers_cuda.so"))
    path = archive.extract(name, tmp)
    try:
        dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    except FileNotFoundError:
        dynamic = Path(path).read_bytes().decode("latin-1")
    needed = sorted(set(re.findall(r"lib(?:cudart|cublas|cublasLt|curand|cufft|cudnn)\.so\.\d+",
                                   dynamic)))
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith("/METADATA")))
    extras = [line for line in metadata.decode().splitlines()
              if line.startswith("Requires-Dist") and "extra" in line]
print(f"{Path(wheel).name}: the CUDA provider needs {', '.join(needed)}")
print("  optional CUDA wheels it names:", "; ".join(e.split(": ", 1)[1] for e in extras) or "-")
if not any(n.startswith("libcudart.so.13") for n in needed):
    print("  WARNING: not a CUDA 13 build: it will not load next to torch 2.11+cu130")
EOF

# Split into parts, one folder each; every folder also holds the whole wheel's SHA-256 and the
# number of parts, so that gpu_check.sh can tell which part is missing.
NAME="$(basename "$ORT_WHEEL")"
SHA="$(sha256sum "$ORT_WHEEL" | cut -d' ' -f1)"
rm -rf .whl_part* /tmp/mfnet_wheel_split
mkdir -p /tmp/mfnet_wheel_split
split -b "${PART_MIB}M" -d -a 2 --numeric-suffixes=1 "$ORT_WHEEL" "/tmp/mfnet_wheel_split/$NAME.part"
COUNT="$(ls /tmp/mfnet_wheel_split | wc -l)"
for part in /tmp/mfnet_wheel_split/*; do
    index=$((10#${part##*.part}))
    mkdir -p ".whl_part$index"
    mv "$part" ".whl_part$index/"
    echo "$SHA  $NAME" > ".whl_part$index/$NAME.sha256"
    echo "$COUNT" > ".whl_part$index/$NAME.count"
done
rmdir /tmp/mfnet_wheel_split

echo
echo "wheel sizes:"
ls -l "$ORT_WHEEL" .whl/*.whl | awk '{printf "  %8.1f MiB  %s\n", $5 / 1048576, $NF}'
echo "parts:"
du -sb .whl .whl_part* | awk '{printf "  %8.1f MiB  %s\n", $1 / 1048576, $2}'
TREE_MIB="$(du -sb --exclude=.git --exclude=.venv --exclude='.whl*' --exclude=build \
    --exclude=runs --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache . \
    | awk '{printf "%.1f", $1 / 1048576}')"
echo "working tree without ignored folders: about $TREE_MIB MiB (each call carries it + its parts, 64 MiB at most)"

cat <<EOF

The device calls (benchmarks/README.md, "Call plan for one lease"), back to back:
EOF
for index in $(seq 1 "$COUNT"); do
    if [ "$index" = 1 ]; then
        echo "  run(carry=[\".whl_part1\"], timeout_s=420, command=\"bash benchmarks/gpu_check.sh --stage 1\")"
    elif [ "$index" = "$COUNT" ]; then
        echo "  run(carry=[\".whl_part$index\"], timeout_s=240, command=\"bash benchmarks/gpu_check.sh --stage 2 --budget-s 165\")"
    else
        echo "  run(carry=[\".whl_part$index\"], timeout_s=60, command=\"ls -l .whl_part*\")"
    fi
done
