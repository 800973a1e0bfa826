#!/usr/bin/env bash
# The project's whole GPU check in one command, for the lent GPU machine (one H100 / H200, no
# network; python3 there is the one with torch). Issue 7, deliverable 2.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--budget-s S] [--steps LIST] [RESULTS_DIR]
#
# Steps, in order, each under its own timeout; a failing step is reported and the later steps
# still run; the exit code is non-zero when any step failed:
#   install    join the split wheels carried in .whl_part1/ .whl_part2/ ... (checked against
#              their SHA-256) and install them and the wheels in .whl/ with
#              pip --no-index --no-deps --target /tmp/site (see benchmarks/fetch_gpu_wheels.sh)
#   env        nvidia-smi, driver, nvcc, python / torch / onnxruntime versions, pip list
#   ext        python -m mfnet_ext build (CUDA_HOME, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)
#   tests      python -m pytest -q -m cuda tests (junit XML); only tests marked cuda are
#              selected, so the COCO tests (which need pycocotools) are not run here; a carried
#              pycocotools wheel is installed anyway, and test_coco.py skips itself without it
#   ops        benchmarks/bench_ops.py --device cuda (custom-op timings)
#   inference  benchmarks/bench_inference.py --device cuda: 473 x 473, N 1,2,5, batch 1,8,
#              with the time left as its --time-budget-s (rows that do not fit say so);
#              BENCH_INFERENCE_ARGS adds options (e.g. "--variants=*compile*" in a second call)
# Then everything is packed: RESULTS_DIR gets at most 8 files (the device tool brings back 8):
# summary.md, gpu_check_full.tar.gz (every log, JSON, PNG, the pip list), and copies of the
# inference JSON / MD / PNG, the bench_ops JSON and the pytest junit XML.
#
# RESULTS_DIR: default $OUT/gpu_check on the device machine, else
# benchmarks/results/gpu_<UTC date>. --budget-s: the whole script's time (default 540 s = 9
# minutes, under the device tool's 10-minute command limit). --steps: comma-separated subset
# (e.g. --steps install,inference for a second call that gives the whole budget to the table).
# --dry-run prints the steps and commands and runs nothing.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
DRY=0
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
STEPS="install,env,ext,tests,ops,inference"
RESULTS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --budget-s) BUDGET="$2"; shift ;;
        --budget-s=*) BUDGET="${1#*=}" ;;
        --steps) STEPS="$2"; shift ;;
        --steps=*) STEPS="${1#*=}" ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) RESULTS="$1" ;;
    esac
    shift
done
if [ -z "$RESULTS" ]; then
    if [ -n "${OUT:-}" ]; then
        RESULTS="$OUT/gpu_check"
    else
        RESULTS="$REPO/benchmarks/results/gpu_$(date -u +%Y%m%d_%H%M%S)"
    fi
fi
case "$RESULTS" in /*) ;; *) RESULTS="$REPO/$RESULTS" ;; esac
# Inside $OUT only the summary files may live (8 files come back); the full tree goes to /tmp.
if [ -n "${OUT:-}" ] && [[ "$RESULTS/" == "$OUT"/* ]]; then
    FULL="/tmp/mfnet_gpu_check_full"
else
    FULL="$RESULTS/full"
fi

PY="${PYTHON:-python3}"
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -d /usr/local/cuda ]; then
        CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null 2>&1; then
        CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    else
        CUDA_HOME=/usr/local/cuda
    fi
fi
export CUDA_HOME TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export REPO FULL PY PYTHONUNBUFFERED=1
SITE=/tmp/site
export PYTHONPATH="$SITE:$REPO:$REPO/runtime:$REPO/cuda_ext${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 0 ]; then
    # The CUDA 13 / cuDNN 9 libraries of torch's nvidia-* wheels, for onnxruntime-gpu in
    # processes that do not import torch first (the runtime never does).
    NV_LIBS="$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site
dirs = set()
for base in site.getsitepackages():
    for library in glob.glob(os.path.join(base, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(library))
print(":".join(sorted(dirs)))
EOF
)"
    [ -n "$NV_LIBS" ] && export LD_LIBRARY_PATH="$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

START=$(date +%s)
RESERVE=25  # seconds kept for packing the results
SUMMARY=()
FAILED=()
elapsed() { echo $(( $(date +%s) - START )); }
want() { [[ ",$STEPS," == *",$1,"* ]]; }

# ----------------------------------------------------------------------------- the steps
step_install() {
    local wheels=/tmp/mfnet_wheels count name parts found
    rm -rf "$wheels" && mkdir -p "$wheels" || return 1
    # Split wheels: .whl_partK/<wheel>.partNN, and in every part folder <wheel>.sha256 (of the
    # whole wheel) and <wheel>.count (number of parts).
    for sums in .whl_part*/*.sha256; do
        [ -e "$sums" ] || continue
        name="$(basename "$sums" .sha256)"
        [ -e "$wheels/$name" ] && continue
        count="$(cat "${sums%.sha256}.count" 2>/dev/null || echo '?')"
        parts="$(for f in .whl_part*/"$name".part*; do
                     [ -e "$f" ] && echo "${f##*.part} $f"; done | sort -n | cut -d' ' -f2-)"
        found="$(printf '%s\n' "$parts" | grep -c . || true)"
        if [ "$found" != "$count" ]; then
            local missing="" k
            for k in $(seq 1 "$count"); do
                ls .whl_part*/"$name".part"$(printf '%02d' "$k")" >/dev/null 2>&1 \
                    || missing="$missing .whl_part$k"
            done
            echo "ERROR: $name: $found of $count parts are here; missing:$missing. Carry each" \
                 "folder in a run call just before this one (see benchmarks/fetch_gpu_wheels.sh)"
            return 1
        fi
        # shellcheck disable=SC2086
        cat $parts > "$wheels/$name" || return 1
        (cd "$wheels" && sha256sum -c --quiet "$REPO/$sums") || {
            echo "ERROR: $name: SHA-256 mismatch after joining $count parts"; return 1; }
        echo "joined $name from $count parts, SHA-256 ok"
    done
    for wheel in .whl/*.whl; do
        [ -e "$wheel" ] && cp "$wheel" "$wheels/"
    done
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "no carried wheels (.whl/ or .whl_part*/): nothing to install; the ONNX Runtime"
        echo "CUDA rows will say 'not measured: onnxruntime-gpu not installed'"
        return 0
    fi
    ls -l "$wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$wheels"/*.whl || return 1
    "$PY" - <<'EOF'
import onnxruntime
print("onnxruntime", onnxruntime.__version__, "from", onnxruntime.__file__)
print("providers", onnxruntime.get_available_providers())
EOF
}

step_env() {
    echo "## nvidia-smi"
    nvidia-smi || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
        --format=csv || true
    echo "## nvcc ($CUDA_HOME)"
    "$CUDA_HOME/bin/nvcc" --version || nvcc --version || true
    echo "## system"
    uname -a
    nproc
    echo "PYTHONPATH=$PYTHONPATH"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "## python"
    "$PY" - <<'EOF'
import sys, torch
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("onnxruntime", "onnx", "onnxscript", "tensorrt", "triton", "cv2", "scipy",
             "pycocotools", "matplotlib", "numpy"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as error:  # noqa: BLE001
        print(name, "not importable:", type(error).__name__, error)
EOF
    "$PY" -m pip list --format=freeze > "$FULL/pip_list.txt" 2>&1 || true
    echo "pip list: $(wc -l < "$FULL/pip_list.txt") lines in pip_list.txt"
}

step_ext() {
    if [ ! -d "$REPO/cuda_ext/mfnet_ext" ]; then
        echo "cuda_ext/mfnet_ext is not in this checkout: nothing to build"
        return 0
    fi
    "$PY" -m mfnet_ext build --verbose && "$PY" -m mfnet_ext info
}

step_tests() {
    "$PY" -m pytest -q -m cuda tests -p no:cacheprovider --junitxml="$FULL/pytest_cuda.xml"
    local rc=$?
    if [ $rc -eq 5 ]; then
        echo "no test marked cuda was collected (pytest exit 5)"
        return 0
    fi
    return $rc
}

step_ops() {
    if [ ! -f benchmarks/bench_ops.py ]; then
        echo "benchmarks/bench_ops.py is not in this checkout"
        return 0
    fi
    "$PY" benchmarks/bench_ops.py --device cuda --out "$FULL" --max-row-s 2
}

step_inference() {
    # STEP_LIMIT: this step's timeout; the benchmark stops starting rows well before it.
    local budget=$(( STEP_LIMIT - 45 ))
    [ "$budget" -lt 30 ] && budget=30
    set -f  # BENCH_INFERENCE_ARGS may hold patterns such as --variants=*compile*
    # shellcheck disable=SC2086
    "$PY" benchmarks/bench_inference.py --device cuda --size 473 --ways 1,2,5 --batches 1,8 \
        --warmup 10 --iterations 50 --max-row-s 3 --out "$FULL" \
        --engine-cache /tmp/mfnet_bench_engines --time-budget-s "$budget" \
        ${BENCH_INFERENCE_ARGS:-}
}
export -f step_install step_env step_ext step_tests step_ops step_inference
export SITE CUDA_HOME

describe() {  # what a step runs, for --dry-run
    case "$1" in
        install) echo "join .whl_part*/ (SHA-256 checked) + .whl/*.whl -> $PY -m pip install" \
                      "--no-index --no-deps --target $SITE" ;;
        env) echo "nvidia-smi; $CUDA_HOME/bin/nvcc --version; $PY (torch, onnxruntime, ...);" \
                  "$PY -m pip list > $FULL/pip_list.txt" ;;
        ext) echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" \
                  "MAX_JOBS=$MAX_JOBS $PY -m mfnet_ext build --verbose" ;;
        tests) echo "$PY -m pytest -q -m cuda tests --junitxml=$FULL/pytest_cuda.xml" ;;
        ops) echo "$PY benchmarks/bench_ops.py --device cuda --out $FULL --max-row-s 2" ;;
        inference) echo "$PY benchmarks/bench_inference.py --device cuda --size 473 --ways 1,2,5" \
                        "--batches 1,8 --warmup 10 --iterations 50 --max-row-s 3 --out $FULL" \
                        "--engine-cache /tmp/mfnet_bench_engines --time-budget-s $(( $2 - 45 ))" \
                        "${BENCH_INFERENCE_ARGS:-}" ;;
    esac
}

# ---------------------------------------------------------------------------- the runner
run_step() {  # name cap_seconds
    local name=$1 cap=$2 left limit rc t0 dt status
    if ! want "$name"; then
        SUMMARY+=("| $name | not run (--steps) | - |")
        return 0
    fi
    left=$(( BUDGET - $(elapsed) - RESERVE ))
    limit=$cap
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        SUMMARY+=("| $name | skipped: budget ($left s left) | - |")
        FAILED+=("$name (no time left)")
        return 0
    fi
    if [ "$DRY" = 1 ]; then
        printf '[dry-run] %-9s timeout %4s s: %s\n' "$name" "$limit" "$(describe "$name" "$limit")"
        SUMMARY+=("| $name | dry-run (timeout $limit s) | - |")
        return 0
    fi
    echo "=== [$(elapsed) s] $name (timeout $limit s)"
    t0=$(date +%s)
    STEP_LIMIT=$limit timeout --kill-after=15 "$limit" bash -c "step_$name" \
        > "$FULL/$name.log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    tail -n 12 "$FULL/$name.log" | sed 's/^/    /'
    if [ $rc -eq 0 ]; then
        status="ok"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="FAILED: timed out after $limit s"
        FAILED+=("$name (timeout)")
    else
        status="FAILED: exit $rc"
        FAILED+=("$name (exit $rc)")
    fi
    SUMMARY+=("| $name | $status | $dt s |")
}

echo "gpu_check: results in $RESULTS (full tree: $FULL), budget $BUDGET s, steps $STEPS"
[ "$DRY" = 1 ] && echo "dry run: nothing runs; each timeout is shown as if the steps before it took no time"
if [ "$DRY" = 0 ]; then
    mkdir -p "$RESULTS" "$FULL" || exit 2
fi
run_step install 120
run_step env 30
run_step ext 150
run_step tests 150
run_step ops 90
run_step inference 100000  # everything that is left

# -------------------------------------------------------------------------------- packing
if [ "$DRY" = 1 ]; then
    echo "[dry-run] pack: $RESULTS/{summary.md,gpu_check_full.tar.gz,inference_cuda_473.json,.md,.png,bench_ops_cuda.json,pytest_cuda.xml}"
    printf '%s\n' "| step | status | time |" "|---|---|---|" "${SUMMARY[@]}"
    exit 0
fi
# A partial inference JSON (the step was killed) still gets its table and chart.
for json in "$FULL"/inference_cuda_*.json; do
    [ -e "$json" ] || continue
    md="${json%.json}.md"
    if [ ! -e "$md" ] || [ "$json" -nt "$md" ]; then
        "$PY" benchmarks/bench_inference.py --from-json "$json" --out "$FULL" >/dev/null 2>&1 \
            || true
    fi
done
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "Command: \`bash benchmarks/gpu_check.sh\` (budget $BUDGET s, steps $STEPS), $(elapsed) s."
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null \
        || echo 'nvidia-smi not available')"
    echo
    echo "| step | status | time |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    "$PY" - "$FULL" <<'EOF'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        continue
    targets = payload.get("targets") if isinstance(payload, dict) else None
    if not targets:
        continue
    print(f"Targets from {path.name}" + ("" if payload.get("complete", True) else " (incomplete run)"))
    print()
    print("| target | required | measured | status |")
    print("|---|---|---|---|")
    for t in targets:
        if not isinstance(t, dict):
            continue
        value = t.get("value")
        shown = "-" if value is None else f"{value:.3f} {t.get('unit', '')}".strip()
        print(f"| {t.get('target', t.get('name', '?'))} | {t.get('required', '?')} | {shown} | "
              f"{t.get('status', '?')} |")
    print()
EOF
    if [ ${#FAILED[@]} -gt 0 ]; then
        echo "FAILED: ${FAILED[*]} (logs: <step>.log in gpu_check_full.tar.gz)"
    else
        echo "Every step passed."
    fi
} > "$FULL/summary.md" 2>&1
cp "$FULL/summary.md" "$RESULTS/summary.md"
for file in "$FULL"/inference_cuda_*.json "$FULL"/inference_cuda_*.md "$FULL"/inference_cuda_*.png \
            "$FULL"/bench_ops_cuda*.json "$FULL"/pytest_cuda.xml; do
    [ -e "$file" ] && [ "$(dirname "$file")" != "$RESULTS" ] && cp "$file" "$RESULTS/"
done
tar -czf "$RESULTS/gpu_check_full.tar.gz" --exclude='*.tar.gz' -C "$(dirname "$FULL")" \
    "$(basename "$FULL")" || echo "could not pack $FULL"
echo
cat "$RESULTS/summary.md"
echo
echo "files in $RESULTS:"
ls -la "$RESULTS"
[ ${#FAILED[@]} -eq 0 ]
