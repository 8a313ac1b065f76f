#!/usr/bin/env bash
# Offline BEiT demo on CPU (the README's main command):  bash launch/demo.sh
#
#  1. installs into .venv (reused when present)
#  2. writes the built-in real photo shards (skimage / sklearn sample photos -> train/val tar shards)
#  3. fits the offline k-means visual-word tokenizer on the training shards
#  4. pretrains a small BEiT for a few minutes (masked-token prediction, checkpoints every 50 steps)
#  5. fine-tunes the pretrained encoder on the built-in real digits (labelled) and scores the held-out test split
#  6. draws both runs' reports (beit viz: masks, tokens, reconstructions, attention, curves -> RUN_DIR/index.html)
#  7. prints where everything is, the held-out masked-token accuracy beside the majority baseline, and top-1
#
# Re-running skips finished stages; a killed run resumes from its last complete checkpoint.
# DEMO_DIR (default runs/demo) moves all outputs. Extra arguments go to beit/pretrain.py,
# e.g. `bash launch/demo.sh --total_steps 200`.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
bash launch/install.sh
PY=.venv/bin/python
DEMO_DIR=${DEMO_DIR:-runs/demo}
DATA="$DEMO_DIR/data/photos"
DIGITS="$DEMO_DIR/data/digits"
FINETUNE_DIR="$DEMO_DIR/finetune"
TOKENIZER="$DEMO_DIR/tokenizer/kmeans"
PRETRAIN_DIR="$DEMO_DIR/pretrain"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

echo "== 1/5 sample shards -> $DATA, $DIGITS"
if [ ! -f "$DATA/manifest.json" ]; then
  "$PY" -m beit.data.samples --out "$DATA" --kind photos
else
  echo "   (reusing existing shards)"
fi
if [ ! -f "$DIGITS/manifest.json" ]; then
  "$PY" -m beit.data.samples --out "$DIGITS" --kind digits
fi

echo "== 2/5 k-means tokenizer (256 visual words, 8 px patches of the 64 px view) -> $TOKENIZER"
if [ ! -f "$TOKENIZER.json" ]; then
  "$PY" -m beit.tokenizers.train kmeans --shards "$DATA/train-*.tar" --val_shards "$DATA/val-*.tar" \
    --out "$TOKENIZER" --vocab_size 256 --patch_size 8 --input_size 64 --model_grid 8 \
    --crop_scale_min 0.25 --epochs 2 --seed 0
else
  echo "   (reusing existing tokenizer)"
fi

echo "== 3/5 BEiT pretraining (CPU) -> $PRETRAIN_DIR"
.venv/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  beit/pretrain.py --config launch/demo_pretrain.yaml \
  --data_shards "$DATA/train-*.tar" --val_shards "$DATA/val-*.tar" \
  --tokenizer_path "$TOKENIZER" --output_dir "$PRETRAIN_DIR" "$@"

PRETRAINED="$PRETRAIN_DIR/pretrained.safetensors"

echo "== 4/5 fine-tuning the pretrained encoder on the real digits (held-out test split) -> $FINETUNE_DIR"
"$PY" -m beit.finetune --config launch/demo_finetune.yaml --init "$PRETRAINED" \
  --train_shards "$DIGITS/train-*.tar" --val_shards "$DIGITS/test-*.tar" --output_dir "$FINETUNE_DIR"

echo "== 5/5 run reports (beit viz) -> $PRETRAIN_DIR/index.html, $FINETUNE_DIR/index.html"
.venv/bin/beit viz "$PRETRAIN_DIR" --device cpu --num_images 4 >/dev/null
.venv/bin/beit viz "$FINETUNE_DIR" --device cpu --num_images 4 >/dev/null

"$PY" - "$PRETRAIN_DIR" "$TOKENIZER" "$FINETUNE_DIR" "$T0" <<'PYEOF'
import json, sys, time
from pathlib import Path
from beit.runtime.checkpointing import find_latest_complete
run, tok, ft, t0 = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
m = json.loads((run / "final_metrics.json").read_text())
f = json.loads((ft / "final.json").read_text())
acc, base = m["val/mim_acc"], m["val/majority_acc"]
print()
print("== BEiT demo finished in %.1f min" % ((time.time() - t0) / 60))
print(f"   pretrained weights : {m['pretrained']}  (+ pretrained.json: model config)")
print(f"   last checkpoint    : {find_latest_complete(run)}")
print(f"   metrics (JSON lines): {run / 'metrics.jsonl'}, {ft / 'metrics.jsonl'}")
print(f"   run reports        : {run / 'index.html'}, {ft / 'index.html'}  (open in a browser; "
      f"`beit viz RUN_DIR` redraws them)")
print(f"   TensorBoard        : tensorboard --logdir {run.parent}  (scalars of both stages + pretraining pictures)")
print(f"   run configs        : {run / 'config.yaml'}, {ft / 'config.yaml'}")
print(f"   tokenizer          : {tok}.safetensors / .json")
print(f"   fine-tuned model   : {ft / 'model.safetensors'} (timm-loadable), {ft / 'confusion_matrix.png'}")
print(f"   pretraining, held-out photos: masked-token accuracy {acc:.1%} vs majority-token baseline {base:.1%} "
      f"({acc / base:.1f}x, {m['val/tokens']} masked tokens; {m['step']} steps, {m['train_seconds']:.0f} s training)")
print(f"   fine-tuning, held-out digits: top-1 {f['top1']:.1f}%  top-5 {f['top5']:.1f}%  "
      f"({f['epochs']} epochs; a pipeline check - see README 'Evidence' for the measured comparison)")
PYEOF
