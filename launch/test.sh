#!/usr/bin/env bash
# Install (launch/install.sh: .venv, or VENV=..., or the active environment with a working torch) and
# run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
exec "$(cat .beit_python)" -m pytest -q "$@"
