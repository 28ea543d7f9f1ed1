#!/usr/bin/env bash
# The GPU check: prefixd's device layer and multi-task speed on one CUDA GPU, in one run of under 8 minutes.
#
#   bash benchmarks/fetch_gpu_wheels.sh      # on a machine with PyPI: fills .whl/ (what the GPU host lacks)
#   bash benchmarks/gpu_check.sh             # on the GPU host (no network; PyTorch, transformers, PEFT there)
#   bash benchmarks/gpu_check.sh --smoke     # anywhere (or GPU_CHECK_SMOKE=1): the same steps, quick, CPU
#
# Steps, each under its own `timeout` so one hang does not take the others' time:
#   1. install the wheels in .whl/ into /tmp/site (PYTHONPATH=/tmp/site:$PWD); --smoke skips it and uses
#      $PYTHON's own packages (the wheels are for the GPU host's Python 3.12);
#   2. print nvidia-smi, the Python packages' versions and the device torch sees;
#   3. python -m pytest -m gpu tests/test_gpu.py: NCCL group, bf16 base, ZeRO-3, compiled layers and
#      mixed-prefix generation on CUDA, each against the CPU path (they skip without a GPU);
#   4. benchmarks/multitask.py on CUDA, bf16, N = 1, 16, 64, for --shape smollm2 and --shape llama-1b
#      (--smoke: `--tiny --quick --eager` on the CPU: the script's plumbing, not the compiled layers, which
#      tests/test_benchmarks.py's own multitask smoke test covers).
# Writes gpu_check.log, gpu_tests.xml and multitask_<shape>.json into $OUT if set, else benchmarks/out/.
# Ends with one line "gpu_check: <step> rc=<code> ..." per step and exits non-zero if any step failed.
# Environment: PYTHON (default .venv/bin/python if present, else python3), GPU_CHECK_SMOKE=1,
# GPU_CHECK_WHEELS (the wheel folder, default .whl).

set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=${GPU_CHECK_SMOKE:-0}
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        *) echo "gpu_check.sh: unknown argument '$arg'; accepted: --smoke" >&2; exit 2 ;;
    esac
done
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEST=${OUT:-benchmarks/out}
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # the GPU host has no network
START=$SECONDS
RESULTS=()
step() {  # step NAME SECONDS COMMAND...: run under a timeout, record its exit code
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (timeout ${limit}s, at $((SECONDS - START))s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    [[ $rc -eq 124 || $rc -eq 137 ]] && echo "gpu_check: $name timed out after ${limit}s"
    RESULTS+=("$name rc=$rc")
}

# 1. wheels
shopt -s nullglob
WHEEL_DIR=${GPU_CHECK_WHEELS:-.whl}
wheels=("$WHEEL_DIR"/*.whl)
if [[ $SMOKE == 1 ]]; then
    echo "== smoke mode: no wheel install, $PYTHON's own packages"
    export PYTHONPATH="$PWD"
elif ((${#wheels[@]})); then
    echo "== installing ${#wheels[@]} wheels from $WHEEL_DIR/ into /tmp/site"
    timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}" || { echo "gpu_check: wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
else
    echo "gpu_check: no wheels in $WHEEL_DIR/; run 'bash benchmarks/fetch_gpu_wheels.sh' on a machine with" \
         "PyPI and bring .whl/ along (or pass --smoke)"
    exit 1
fi

# 2. the machine
step environment 60 bash -c '
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$0" - <<"EOF"
import importlib.metadata as md, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "peft", "deepspeed", "pydantic", "datasets", "pyarrow", "tokenizers",
             "safetensors", "huggingface-hub", "triton", "pytest", "pytest-timeout"):
    try:
        print(f"{name:16} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:16} (not installed)")
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF' "$PYTHON"

# 3. tests
if [[ $SMOKE == 1 ]]; then TEST_LIMIT=120; else TEST_LIMIT=210; fi
step gpu-tests "$TEST_LIMIT" "$PYTHON" -m pytest -q -rs -p no:cacheprovider --noconftest -m gpu \
    --junitxml="$DEST/gpu_tests.xml" tests/test_gpu.py

# 4. benchmarks
if [[ $SMOKE == 1 ]]; then
    step multitask-smoke 150 "$PYTHON" benchmarks/multitask.py --tiny --quick --eager \
        --json "$DEST/multitask_smoke.json"
else
    for shape in smollm2 llama-1b; do
        step "multitask-$shape" 120 "$PYTHON" benchmarks/multitask.py --device cuda --dtype bfloat16 \
            --shape "$shape" --tasks 1,16,64 --json "$DEST/multitask_$shape.json"
    done
fi

echo
echo "gpu_check: total $((SECONDS - START))s; results in $DEST"
failed=0
for result in "${RESULTS[@]}"; do
    echo "gpu_check: $result"
    [[ $result == *"rc=0" ]] || failed=1
done
exit $failed
