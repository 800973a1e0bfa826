#!/usr/bin/env bash
# The project's GPU check, in two stages that each fit one device call (one H100 / H200, no
# network; python3 there is the one with torch). The call plan is in benchmarks/README.md.
#
#   bash benchmarks/gpu_check.sh [--stage 1|2] [--dry-run] [--list] [--budget-s S]
#                                [--steps LIST] [RESULTS_DIR]
#
# Stage 1 (default) needs nothing carried and fits 6 minutes:
#   env        nvidia-smi, driver, nvcc, python / torch / onnxruntime versions, pip list
#   ext        python -m mfnet_ext build into $MFNET_EXT_BUILD_DIR, the folder the tests' and the
#              benchmarks' extension loads use too (built once; nothing compiles twice)
#   tests      MFNET_REQUIRE_CUDA_EXT=1 python -m pytest -m cuda tests (every cuda test; those
#              that need onnxruntime-gpu or TensorRT skip with the reason), junit XML + log
#   ops        benchmarks/bench_ops.py --device cuda (custom-op timings)
#   inference  the torch rows of benchmarks/bench_inference.py --device cuda at 473 x 473, N = 2
#              first, with the time left as its --time-budget-s (rows that do not fit say so)
# Stage 2 needs the onnxruntime-gpu wheel parts carried (benchmarks/fetch_gpu_wheels.sh):
#   install    join .whl_part*/ (SHA-256 checked) + .whl/*.whl, pip install --target /tmp/site
#   ort_tests  the ONNX Runtime CUDA tests of tests/test_gpu_paths.py (IOBinding, CUDA graphs,
#              close(), the Segmenter on CUDA), junit XML + log
#   ort_rows   the ONNX Runtime rows of bench_inference (N = 2 first)
#
# Each step runs under its own timeout, capped by what is left of --budget-s (stage 1: 345 s,
# stage 2: 240 s); a failing step is reported and later steps still run; the exit code is
# non-zero when any step failed. RESULTS_DIR (default $OUT/stage<N> on the device machine,
# else benchmarks/results/gpu_<UTC date>/stage<N>) gets at most 8 files (what the device tool
# brings back): summary.md (with each step's log tail), the junit XML, the bench JSON / MD /
# PNG and gpu_check_full.tar.gz (every log, pip list).
#
# --dry-run runs every step it can here, on the CPU at tiny sizes: env; ext (if nvcc exists:
# the build cache makes it quick); tests as --collect-only of the cuda tests; bench_ops and
# bench_inference on the CPU at 48 x 48; install only checks the carried parts.
# --list prints the steps of the stage with their time caps and commands, and runs nothing.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
DRY=0
LIST=0
STAGE=1
BUDGET=""
STEPS=""
RESULTS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --list) LIST=1 ;;
        --stage) STAGE="${2:-}"; shift ;;
        --stage=*) STAGE="${1#*=}" ;;
        --budget-s) BUDGET="${2:-}"; shift ;;
        --budget-s=*) BUDGET="${1#*=}" ;;
        --steps) STEPS="${2:-}"; shift ;;
        --steps=*) STEPS="${1#*=}" ;;
        -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
        -*) echo "error: gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) RESULTS="$1" ;;
    esac
    shift
done
case "$STAGE" in
    1) ALL_STEPS="env,ext,tests,ops,inference"; DEFAULT_BUDGET=345 ;;
    2) ALL_STEPS="install,ort_tests,ort_rows"; DEFAULT_BUDGET=240 ;;
    *) echo "error: gpu_check: --stage takes 1 or 2, not '$STAGE'" >&2; exit 2 ;;
esac
[ "$DRY" = 1 ] && DEFAULT_BUDGET=1200  # a dry run is not bound by the lease
BUDGET="${BUDGET:-${GPU_CHECK_BUDGET_S:-$DEFAULT_BUDGET}}"
case "$BUDGET" in
    ''|*[!0-9]*) echo "error: gpu_check: --budget-s takes whole seconds, not '$BUDGET'" >&2
                 exit 2 ;;
esac
STEPS="${STEPS:-$ALL_STEPS}"
for step in ${STEPS//,/ }; do
    if [[ ",$ALL_STEPS," != *",$step,"* ]]; then
        echo "error: gpu_check: stage $STAGE has no step '$step' (its steps: $ALL_STEPS)" >&2
        exit 2
    fi
done
if [ -z "$RESULTS" ]; then
    if [ -n "${OUT:-}" ]; then
        RESULTS="$OUT/stage$STAGE"
    else
        RESULTS="$REPO/benchmarks/results/gpu_$(date -u +%Y%m%d_%H%M%S)/stage$STAGE"
    fi
fi
case "$RESULTS" in /*) ;; *) RESULTS="$REPO/$RESULTS" ;; esac
FULL="$RESULTS/full"
WORK="${GPU_CHECK_WORK:-/tmp/mfnet_gpu_check}"

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
# One extension build for the ext step, the tests' cuda_ext fixture and the benchmarks: they all
# read MFNET_EXT_BUILD_DIR, and the build folder is keyed by the sources and TORCH_CUDA_ARCH_LIST.
# A dry run here reuses the tests' own build cache.
if [ "$DRY" = 1 ]; then
    MFNET_EXT_BUILD_DIR="${MFNET_EXT_BUILD_DIR:-$REPO/build/cuda_ext_test}"
    DEVICE=cpu
else
    MFNET_EXT_BUILD_DIR="${MFNET_EXT_BUILD_DIR:-$WORK/cuda_ext}"
    DEVICE=cuda
fi
export CUDA_HOME TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
SIZE=$([ "$DRY" = 1 ] && echo 48 || echo 473)
export MFNET_EXT_BUILD_DIR MFNET_REQUIRE_CUDA_EXT=1 REPO FULL PY DEVICE DRY WORK SIZE
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
SITE=/tmp/site
export SITE PYTHONPATH="$SITE:$REPO:$REPO/runtime:$REPO/cuda_ext${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 0 ] && [ "$LIST" = 0 ]; then
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
RESERVE=15  # seconds kept for packing the results
SUMMARY=()
FAILED=()
elapsed() { echo $(( $(date +%s) - START )); }
want() { [[ ",$STEPS," == *",$1,"* ]]; }

# Row selections of bench_inference: stage 1 = torch rows (no exports), stage 2 = ONNX Runtime.
TORCH_ROWS_SKIP="ort_*,trt_*,e2e_runtime_ort,support_runtime_ort,*compile*"
ORT_ROWS="ort_*,e2e_runtime_ort,support_runtime_ort"
export TORCH_ROWS_SKIP ORT_ROWS
ORT_TESTS_K="onnxruntime_cuda or (close_releases and onnxruntime) or segmenter_on_cuda"
export ORT_TESTS_K

# ----------------------------------------------------------------------------- the steps
# Each prints what it runs; under --dry-run it runs the CPU version at tiny sizes.
step_env() {
    echo "## nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv 2>/dev/null || true
    echo "## nvcc ($CUDA_HOME)"
    "$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -2 || echo "no nvcc"
    echo "## system: $(uname -srm), $(nproc) CPUs"
    echo "PYTHONPATH=$PYTHONPATH MFNET_EXT_BUILD_DIR=$MFNET_EXT_BUILD_DIR"
    "$PY" - <<'EOF'
import sys, torch
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("onnxruntime", "onnx", "onnxscript", "tensorrt", "cuda.bindings", "cupy", "numpy"):
    try:
        module = __import__(name, fromlist=["_"])
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # noqa: BLE001
        print(name, "not importable:", type(error).__name__, error)
EOF
    "$PY" -m pip list --format=freeze > "$FULL/pip_list.txt" 2>&1 || true
    echo "pip list: $(wc -l < "$FULL/pip_list.txt") lines in pip_list.txt"
}

step_ext() {
    if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
        [ "$DRY" = 1 ] && { echo "no nvcc at $CUDA_HOME: the build is not tried here"; return 0; }
        echo "no nvcc at $CUDA_HOME/bin/nvcc"; return 1
    fi
    echo "+ $PY -m mfnet_ext build --build-root $MFNET_EXT_BUILD_DIR"
    "$PY" -m mfnet_ext build --build-root "$MFNET_EXT_BUILD_DIR" && "$PY" -m mfnet_ext info
}

step_tests() {
    local rc
    if [ "$DRY" = 1 ]; then
        echo "+ $PY -m pytest --collect-only -q -m cuda tests"
        "$PY" -m pytest --collect-only -q -m cuda tests -p no:cacheprovider > "$FULL/collect.txt"
        rc=$?
        tail -n 3 "$FULL/collect.txt"
        grep -c "::" "$FULL/collect.txt" | sed 's/^/cuda tests collected: /'
        return $rc
    fi
    echo "+ $PY -m pytest -q -rs -m cuda tests --junitxml=$FULL/pytest_cuda.xml"
    "$PY" -m pytest -q -rs -m cuda tests -p no:cacheprovider --junitxml="$FULL/pytest_cuda.xml"
}

step_ops() {
    if [ "$DRY" = 1 ]; then
        set -- --device cpu --channels 8 --feature-size 6 --mask-size 24 --batches 2 --ways 2 \
            --shots 1 --dtypes float32 --sampler-batches 2 --sampler-ways 2 --sampler-size 12 \
            --warmup 1 --iterations 2 --max-row-s 2
    else
        set -- --device cuda --max-row-s 2
    fi
    echo "+ $PY benchmarks/bench_ops.py $* --out $FULL"
    "$PY" benchmarks/bench_ops.py "$@" --out "$FULL"
}

bench_inference() {  # skip-or-select-flag patterns
    local budget=$(( STEP_LIMIT - 20 - 40 * DRY ))  # the rest: set-up and the last row
    [ "$budget" -lt 20 ] && budget=20
    if [ "$DRY" = 1 ]; then
        set -- --device cpu --backbone small --size "$SIZE" --ways 2 --batches 1 --warmup 1 \
            --iterations 2 --max-row-s 2 --onnx-precisions fp32 "$@"
    else
        set -- --device cuda --size "$SIZE" --ways 1,2,5 --batches 1,8 --warmup 10 --iterations 50 \
            --max-row-s 3 "$@"
    fi
    echo "+ $PY benchmarks/bench_inference.py $* --out $FULL --time-budget-s $budget"
    "$PY" benchmarks/bench_inference.py "$@" --out "$FULL" \
        --engine-cache "$WORK/bench_engines" --time-budget-s "$budget"
}

step_inference() {
    bench_inference --skip-variants "$TORCH_ROWS_SKIP"  # default stem: inference_<device>_<size>
}

step_install() {
    local wheels="$WORK/wheels" count name parts found sums
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
            echo "ERROR: $name: $found of $count parts are here; carry every .whl_part* folder" \
                 "(see benchmarks/README.md, GPU check)"
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
        echo "ERROR: no carried wheels (.whl/ or .whl_part*/): stage 2 needs onnxruntime-gpu"
        [ "$DRY" = 1 ] && { echo "(dry run: nothing to check)"; return 0; }
        return 1
    fi
    ls -l "$wheels"
    if [ "$DRY" = 1 ]; then
        echo "(dry run: the wheels join and check; not installed)"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$wheels"/*.whl || return 1
    "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__);
print('providers', o.get_available_providers())"
}

step_ort_tests() {
    if [ "$DRY" = 1 ]; then
        echo "+ $PY -m pytest --collect-only -q -m cuda tests/test_gpu_paths.py -k '$ORT_TESTS_K'"
        "$PY" -m pytest --collect-only -q -m cuda tests/test_gpu_paths.py -k "$ORT_TESTS_K" \
            -p no:cacheprovider
        return $?
    fi
    "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in
o.get_available_providers())" || { echo "onnxruntime has no CUDA provider: run install"; return 1; }
    echo "+ $PY -m pytest -q -rs -m cuda tests/test_gpu_paths.py -k '$ORT_TESTS_K'"
    "$PY" -m pytest -q -rs -m cuda tests/test_gpu_paths.py -k "$ORT_TESTS_K" \
        -p no:cacheprovider --junitxml="$FULL/pytest_ort_cuda.xml"
}

step_ort_rows() {
    bench_inference --variants "$ORT_ROWS" --name "inference_${DEVICE}_${SIZE}_ort"
}
export -f step_env step_ext step_tests step_ops bench_inference step_inference step_install \
    step_ort_tests step_ort_rows

# ---------------------------------------------------------------------------- the runner
declare -A CAP=([env]=20 [ext]=140 [tests]=130 [ops]=35 [inference]=100000
                [install]=45 [ort_tests]=80 [ort_rows]=100000)
if [ "$DRY" = 1 ]; then  # the CPU of a development machine is slower than the GPU for all this
    CAP=([env]=90 [ext]=300 [tests]=240 [ops]=180 [inference]=100000
         [install]=60 [ort_tests]=240 [ort_rows]=100000)
fi

describe() {  # what a step runs (GPU form), for --list
    case "$1" in
        env) echo "nvidia-smi; nvcc --version; python / torch / onnxruntime versions; pip list" ;;
        ext) echo "$PY -m mfnet_ext build --build-root \$MFNET_EXT_BUILD_DIR" ;;
        tests) echo "MFNET_REQUIRE_CUDA_EXT=1 $PY -m pytest -q -rs -m cuda tests --junitxml" ;;
        ops) echo "$PY benchmarks/bench_ops.py --device cuda --max-row-s 2" ;;
        inference) echo "$PY benchmarks/bench_inference.py --device cuda --size 473 --ways 1,2,5" \
                        "--batches 1,8 --skip-variants '$TORCH_ROWS_SKIP' (N = 2 first)" ;;
        install) echo "join .whl_part*/ (SHA-256) + .whl/*.whl; pip install --no-index --target $SITE" ;;
        ort_tests) echo "$PY -m pytest -q -rs -m cuda tests/test_gpu_paths.py -k '$ORT_TESTS_K'" ;;
        ort_rows) echo "$PY benchmarks/bench_inference.py --device cuda --variants '$ORT_ROWS'" ;;
    esac
}

if [ "$LIST" = 1 ]; then
    echo "stage $STAGE, budget $BUDGET s (each cap is also cut to what is left of the budget)"
    for step in ${ALL_STEPS//,/ }; do
        want "$step" || continue
        cap="${CAP[$step]}"
        [ "$cap" = 100000 ] && cap="rest"
        printf '%-10s %5s  %s\n' "$step" "$cap" "$(describe "$step")"
    done
    exit 0
fi

run_step() {  # name
    local name=$1 cap=${CAP[$1]} left limit rc t0 dt status
    if ! want "$name"; then
        SUMMARY+=("| $name | not run (--steps) | - |")
        return 0
    fi
    left=$(( BUDGET - $(elapsed) - RESERVE ))
    limit=$cap
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        SUMMARY+=("| $name | skipped: budget ($left s left) | - |")
        FAILED+=("$name (no time left)")
        return 0
    fi
    echo "=== [$(elapsed) s] $name (timeout $limit s)$([ "$DRY" = 1 ] && echo ', dry run')"
    t0=$(date +%s)
    STEP_LIMIT=$limit timeout --kill-after=10 "$limit" bash -c "step_$name" \
        > "$FULL/$name.log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    tail -n 8 "$FULL/$name.log" | sed 's/^/    /'
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

mkdir -p "$RESULTS" "$FULL" "$WORK" || exit 2
echo "gpu_check stage $STAGE: results in $RESULTS, budget $BUDGET s, steps $STEPS" \
     "$([ "$DRY" = 1 ] && echo '(dry run on the CPU)')"
for step in ${ALL_STEPS//,/ }; do
    run_step "$step"
done

# -------------------------------------------------------------------------------- packing
for json in "$FULL"/inference_*.json; do  # a killed benchmark's partial JSON gets its table
    [ -e "$json" ] || continue
    md="${json%.json}.md"
    if [ ! -e "$md" ] || [ "$json" -nt "$md" ]; then
        "$PY" benchmarks/bench_inference.py --from-json "$json" --out "$FULL" >/dev/null 2>&1 \
            || true
    fi
done
{
    echo "# GPU check, stage $STAGE$([ "$DRY" = 1 ] && echo ' (dry run on the CPU)')," \
         "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "Command: \`bash benchmarks/gpu_check.sh --stage $STAGE$([ "$DRY" = 1 ] && echo ' --dry-run')\`" \
         "(budget $BUDGET s, steps $STEPS), $(elapsed) s."
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null \
        || echo 'nvidia-smi not available')"
    echo
    echo "| step | status | time |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    for xml in "$FULL"/pytest_*.xml; do
        [ -e "$xml" ] || continue
        "$PY" - "$xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
a = suite.attrib
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: {a.get('tests')} tests, {a.get('failures')} failures, "
      f"{a.get('errors')} errors, {a.get('skipped')} skipped, {float(a.get('time', 0)):.0f} s")
EOF
    done
    if [ ${#FAILED[@]} -gt 0 ]; then
        echo "FAILED: ${FAILED[*]} (whole logs: full/<step>.log in gpu_check_full.tar.gz)"
    else
        echo "Every step passed."
    fi
    for step in ${ALL_STEPS//,/ }; do
        [ -e "$FULL/$step.log" ] || continue
        echo
        echo "### $step.log (last 25 lines)"
        echo '```'
        tail -n 25 "$FULL/$step.log"
        echo '```'
    done
} > "$RESULTS/summary.md" 2>&1
# The device tool brings back at most 8 files from $OUT: summary.md, the archive, and these.
for file in "$FULL"/pytest_*.xml "$FULL"/inference_*.json "$FULL"/inference_*.md \
            "$FULL"/inference_*.png "$FULL"/bench_ops_*.json; do
    [ -e "$file" ] && cp "$file" "$RESULTS/"
done
tar -czf "$WORK/gpu_check_full.tar.gz" -C "$RESULTS" full 2>/dev/null \
    && mv "$WORK/gpu_check_full.tar.gz" "$RESULTS/" && rm -rf "$FULL"
echo
cat "$RESULTS/summary.md"
[ ${#FAILED[@]} -eq 0 ]
