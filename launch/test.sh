#!/usr/bin/env bash
# Install into .venv (reused if present) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
exec .venv/bin/python -m pytest -q "$@"
