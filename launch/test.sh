#!/usr/bin/env bash
# Install (launch/install.sh: .venv, or VENV=..., or the active environment with a working torch; the tested
# versions of launch/constraints.txt unless BEIT_CONSTRAINTS=none), print the versions under test, and run
# the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
# Headless Chromium for the report's browser test (tests/test_viz_browser.py): installed from the system
# package manager when missing and we are root (as in CI); otherwise that test is skipped with the reason.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing chromium (apt-get) for the report's browser test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
      || echo "   chromium could not be installed: tests/test_viz_browser.py will be skipped"
  else
    echo "   chromium not found and not root: tests/test_viz_browser.py will be skipped"
  fi
fi
PY="$(cat .beit_python)"
echo "== versions under test"
PINS=${BEIT_CONSTRAINTS:-launch/constraints.txt}
[ "$PINS" = none ] && PINS=launch/constraints.txt   # show how the newest versions differ from the tested ones
"$PY" launch/freeze_constraints.py --versions "$PINS"
echo "== ruff (pyproject.toml [tool.ruff]: pycodestyle, pyflakes, import order; lines up to 120 characters)"
"$PY" -m ruff check .
exec "$PY" -m pytest -q "$@"
