#!/usr/bin/env bash
# Offline BEiT demo on CPU (the README's main command):  bash launch/demo.sh
#
#  1. installs (launch/install.sh: .venv, or VENV=..., or the active environment with a working torch)
#  2. runs `beit demo` (beit/demo.py): writes the built-in real photo and digit shards, fits the offline
#     k-means tokenizer, pretrains a small BEiT for a few minutes (checkpoints every 50 steps),
#     fine-tunes it on the real digits and prints where everything is, the held-out masked-token
#     accuracy beside the majority baseline, and the held-out top-1
#
# Re-running skips finished stages; a killed run resumes from its last complete checkpoint.
# DEMO_DIR (default runs/demo) moves all outputs. Extra arguments go to the pretraining stage,
# e.g. `bash launch/demo.sh --total_steps 200`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
exec "$(cat .beit_python)" -m beit.demo "$@"
