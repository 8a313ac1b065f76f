#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install the project into it.
# torch and torchvision must come as a matched pair (a CPU-only torch beside PyPI's torchvision
# fails to import), so the pair is installed first, then the project in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch, torchvision; torchvision.ops.nms" >/dev/null 2>&1; then
  case "$(uname -m)" in
    aarch64|arm64) PAIR="torch==2.9.1 torchvision==0.24.1" ;;
    *)             PAIR="torch==2.14.1 torchvision==0.29.1" ;;
  esac
  echo "installing $PAIR into $VENV"
  "$VENV/bin/pip" install -q $PAIR
fi
"$VENV/bin/pip" install -q -e ".[dev]"
echo "environment ready: $VENV"
