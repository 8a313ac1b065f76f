#!/usr/bin/env bash
# Install this project into a Python environment, reusing a working torch/torchvision pair.
#
# Which environment (the first that applies):
#   VENV=path         that virtual environment (created if missing)
#   an active one     $VIRTUAL_ENV or $CONDA_PREFIX, if its torch + torchvision import and work
#   ./.venv           created once and reused; when the system python already has a working
#                     torch + torchvision it is created with --system-site-packages to reuse them
# torch and torchvision must come as a matched pair (a CPU-only torch beside PyPI's torchvision fails
# to import), so only when no working pair is found is one installed, before the project
# (`pip install -e ".[dev]"`, which keeps the torch it finds). The python it chose is written to
# .beit_python for launch/demo.sh and launch/test.sh.
#
# Versions: every other package is installed at the exact version the test suite passed with,
# launch/constraints.txt (written by launch/freeze_constraints.py; its "# python:" line names the Python it
# was tested on, and on another Python it is left out with a message). BEIT_CONSTRAINTS=none installs the
# newest versions the project allows instead; BEIT_CONSTRAINTS=path uses another constraints file (always).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
works() { "$1" -c "import torch, torchvision; torchvision.ops.nms" >/dev/null 2>&1; }
describe() { "$1" -c "import torch, torchvision; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}')"; }

if [ -n "${VENV:-}" ]; then
  ENV_PY="$VENV/bin/python"
  if [ ! -x "$ENV_PY" ]; then echo "creating the virtual environment $VENV"; "$PY" -m venv "$VENV"; fi
elif [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && works "${VIRTUAL_ENV:-$CONDA_PREFIX}/bin/python"; then
  ENV_PY="${VIRTUAL_ENV:-$CONDA_PREFIX}/bin/python"
  echo "using the active environment ${VIRTUAL_ENV:-$CONDA_PREFIX}"
else
  ENV_PY=".venv/bin/python"
  if [ ! -x "$ENV_PY" ]; then
    if works "$PY"; then
      echo "creating .venv on top of $("$PY" -c 'import sys; print(sys.executable)') ($(describe "$PY"): reused)"
      "$PY" -m venv --system-site-packages .venv
    else
      echo "creating .venv"
      "$PY" -m venv .venv
    fi
    .venv/bin/python -m pip install -q --upgrade pip
  fi
fi

if works "$ENV_PY"; then
  echo "reusing $(describe "$ENV_PY") found in $("$ENV_PY" -c 'import sys; print(sys.prefix)')"
else
  case "$(uname -m)" in
    aarch64|arm64) PAIR="torch==2.9.1 torchvision==0.24.1"; SIZE="the platform's wheels" ;;
    *)             PAIR="torch==2.14.1 torchvision==0.29.1"; SIZE="5.2 GB installed with its CUDA libraries, measured on x86_64 Linux; it also runs on CPU" ;;
  esac
  echo "no working torch + torchvision found: installing $PAIR ($SIZE)"
  "$ENV_PY" -m pip install -q $PAIR
fi
CONSTRAINTS=${BEIT_CONSTRAINTS:-launch/constraints.txt}
PIN=()
if [ "$CONSTRAINTS" = none ]; then
  echo "BEIT_CONSTRAINTS=none: the newest versions the project allows, not the tested ones"
elif [ ! -f "$CONSTRAINTS" ]; then
  echo "BEIT_CONSTRAINTS=$CONSTRAINTS: no such file (a pip constraints file, or none for the newest versions)" >&2
  exit 1
else
  TESTED=$(sed -n 's/^# python: //p' "$CONSTRAINTS")
  HAVE=$("$ENV_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ -z "${BEIT_CONSTRAINTS:-}" ] && [ -n "$TESTED" ] && [ "$TESTED" != "$HAVE" ]; then
    echo "$CONSTRAINTS was tested on Python $TESTED, this is $HAVE: installing the newest versions instead" \
         "(BEIT_CONSTRAINTS=$CONSTRAINTS forces them)"
  else
    PIN=(-c "$CONSTRAINTS")
    echo "versions: as tested, from $CONSTRAINTS (BEIT_CONSTRAINTS=none for the newest)"
  fi
fi
echo "installing this project and its remaining dependencies (timm, webdataset, accelerate, scikit-learn, ...; about 1 GB in a fresh environment)"
if ! "$ENV_PY" -m pip install -q ${PIN[@]+"${PIN[@]}"} -e ".[dev]"; then
  if [ ${#PIN[@]} -gt 0 ]; then
    echo "pip could not install the tested versions of $CONSTRAINTS here (see above);" \
         "BEIT_CONSTRAINTS=none installs the newest versions the project allows instead" >&2
  fi
  exit 1
fi
"$ENV_PY" -c "import sys; print(sys.executable)" > .beit_python
echo "environment ready: $("$ENV_PY" -c 'import sys; print(sys.prefix)') ($(describe "$ENV_PY"); the beit command is $(dirname "$ENV_PY")/beit)"
