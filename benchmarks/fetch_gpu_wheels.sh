#!/usr/bin/env bash
# Fill .whl/ with the wheels benchmarks/gpu_check.sh installs on the GPU host, which has no network.
#
#   bash benchmarks/fetch_gpu_wheels.sh      # on a machine with PyPI, from a `make install`ed .venv
#
# The GPU host (Python 3.12, x86_64; PyTorch 2.11 with CUDA 13, transformers 5.17, PEFT, pyarrow, accelerate,
# tokenizers 0.23.2, safetensors 0.8.0, huggingface-hub 1.33, numpy, pandas, pytest, ...) lacks what the
# GPU tests and the benchmark import:
#   transformers   the project's pin (constraints.txt; the host's 5.17 is below pyproject's >=5.23);
#                  its own requirements (hub, tokenizers, safetensors, regex, typer) are met there
#   deepspeed      ZeRO-3 (only an sdist on PyPI: built here into a pure-Python wheel, no ops compiled;
#                  DeepSpeed picks its CUDA accelerator at run time) and what it needs that the host
#                  lacks: hjson, pydantic, pydantic-core (cp312 manylinux), annotated-types,
#                  typing-inspection, typing-extensions (pydantic needs >= 4.16); ninja, py-cpuinfo,
#                  msgpack, einops, psutil and nvidia-ml-py are there
#   datasets       workers/data.py reads every task's data through it; dill and multiprocess with it
#                  (the host has pandas, xxhash, fsspec, aiohttp, requests)
#   rouge-score    workers/metrics.py (imported by the trainer; only an sdist on PyPI: built here) and
#                  nltk under it (absl-py, joblib, click, regex are there; defusedxml is optional)
#   pytest-timeout pyproject's `timeout` setting
# Versions: constraints.txt's pin where it has one, else the version in this machine's .venv (what the
# test suite ran with). One version of each. Prints the wheels and `du -sh .whl` (about 20 MiB).
# Environment: PYTHON (default .venv/bin/python; its pip builds the two sdists with --no-build-isolation,
# so it needs setuptools and, for deepspeed's setup.py, torch).

set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BINARY=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
WHEELS=(transformers datasets dill multiprocess nltk hjson pydantic pydantic-core annotated-types
        typing-inspection typing-extensions pytest-timeout)
SDISTS=(deepspeed rouge-score)

pin() {  # pin NAME -> NAME==VERSION from constraints.txt, else from $PYTHON's installed packages
    local line
    line=$(grep -i -E "^$1==" constraints.txt || true)
    if [[ -n $line ]]; then echo "$line"; return; fi
    "$PYTHON" - "$1" <<'EOF'
import importlib.metadata as md, sys
try:
    print(f"{sys.argv[1]}=={md.version(sys.argv[1])}")
except md.PackageNotFoundError:
    sys.exit(f"fetch_gpu_wheels.sh: {sys.argv[1]} is neither pinned in constraints.txt nor installed in the .venv")
EOF
}

requirements=()
for name in "${WHEELS[@]}"; do requirements+=("$(pin "$name")"); done
sources=()
for name in "${SDISTS[@]}"; do sources+=("$(pin "$name")"); done

rm -rf .whl
mkdir .whl
echo "downloading: ${requirements[*]}"
"$PYTHON" -m pip download -q --no-deps "${BINARY[@]}" -d .whl "${requirements[@]}"
echo "building: ${sources[*]}"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl "${sources[@]}"

ls -1 .whl
count=$(ls .whl/*.whl | wc -l)
expected=$((${#WHEELS[@]} + ${#SDISTS[@]}))
if [[ $count -ne $expected ]]; then
    echo "fetch_gpu_wheels.sh: $count wheels in .whl/, expected $expected (one per package)" >&2
    exit 1
fi
du -sh .whl
