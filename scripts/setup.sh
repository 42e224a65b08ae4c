#!/usr/bin/env bash
# Create .venv and install guided-descent with everything the CLI and the tests need (including
# the other libraries' optimizers that the benchmark compares with and the peer tests exercise).
#
# torch comes first, on its own: on a machine without an NVIDIA GPU we ask for the CPU build
# (torch==2.13.0, which pip takes from a local wheel cache where one exists; set TORCH_SPEC and
# TORCH_PIP_ARGS to choose another build), so that the package's own `torch>=2.6` then installs
# nothing more. An unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"guided-descent needs Python >= 3.11, this is {sys.version.split()[0]}")
PY

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        default_spec="torch>=2.6"
    else
        default_spec="torch==2.13.0"
    fi
    # shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of pip options
    "${pip[@]}" install -q "${TORCH_SPEC:-$default_spec}" ${TORCH_PIP_ARGS:-}
fi
"${pip[@]}" install -q -e ".[cli,test,peers]"
"$VENV/bin/python" -c "import torch, guided_descent; print('guided-descent', guided_descent.__version__, 'with torch', torch.__version__)"
