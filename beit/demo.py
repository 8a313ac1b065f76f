"""``beit demo``: the offline CPU demo (what ``bash launch/demo.sh`` runs after installing).

    beit demo                          # outputs in runs/demo (default; or $DEMO_DIR)
    beit demo --dir /tmp/demo --total_steps 400     # other options go to the pretraining stage

1. writes shards of the built-in real sample sets (photos for pretraining, digits for fine-tuning);
2. fits the k-means visual-word tokenizer on the training photos;
3. pretrains a small BEiT (the demo_pretrain recipe), checkpointing as it goes;
4. fine-tunes it on the digits (the demo_finetune recipe) and scores the held-out test digits;
5. draws both runs' reports (``beit viz``: masks, tokens, reconstructions, attention, curves -> RUN_DIR/index.html);
6. prints where everything is, the held-out masked-token accuracy beside the majority baseline, and top-1.

Each stage is a separate process; finished stages are reused and a killed run resumes from its last
complete checkpoint when the same command is run again. Ctrl-C or SIGTERM is passed to the running stage: a
training stage finishes its step, writes a checkpoint there and says so, and the demo ends with its status (75).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _run(args: list[str], **popen_kwargs) -> None:
    """One stage as a child process; a stop signal is passed on to it (a training stage stops with a checkpoint and
    says so); its failure or stop ends the demo with its status."""
    from beit.runtime.stopping import STOP, run_child

    STOP.raise_if_requested(f"the stage {args[0]}")
    code = run_child([sys.executable, "-m", *args], **popen_kwargs)
    if code:
        raise SystemExit(code if code > 0 else 128 - code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    root = Path(os.environ.get("DEMO_DIR", "runs/demo"))
    if argv[:1] == ["--dir"] and len(argv) > 1:
        root, argv = Path(argv[1]), argv[2:]
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from beit.runtime.stopping import stop_signals
    with stop_signals():  # Ctrl-C / SIGTERM: the running stage stops with its checkpoint, the demo with it
        return _demo(root, argv)


def _demo(root: Path, argv: list[str]) -> int:
    t0 = time.time()
    photos, digits = root / "data" / "photos", root / "data" / "digits"
    tokenizer, pre, ft = root / "tokenizer" / "kmeans", root / "pretrain", root / "finetune"
    print(f"== 1/5 sample shards -> {photos}, {digits}", flush=True)
    for path, kind in ((photos, "photos"), (digits, "digits")):
        if (path / "manifest.json").is_file():
            print(f"   (reusing {path})")
        else:
            _run(["beit.data.samples", "--out", str(path), "--kind", kind])
    print(f"== 2/5 k-means tokenizer (256 visual words, 8 px patches of the 64 px view) -> {tokenizer}", flush=True)
    if tokenizer.with_suffix(".json").is_file():
        print("   (reusing the tokenizer)")
    else:
        _run(["beit.tokenizers.train", "kmeans", "--train_shards", f"{photos}/train-*.tar", "--val_shards",
              f"{photos}/val-*.tar", "--out", str(tokenizer), "--vocab_size", "256", "--patch_size", "8",
              "--input_size", "64", "--model_grid", "8", "--crop_scale_min", "0.25", "--epochs", "2", "--seed", "0"])
    print(f"== 3/5 BEiT pretraining (CPU) -> {pre}", flush=True)
    _run(["beit.pretrain", "--config", "demo_pretrain", "--train_shards", f"{photos}/train-*.tar",
          "--val_shards", f"{photos}/val-*.tar", "--tokenizer_path", str(tokenizer), "--output_dir", str(pre), *argv])
    print(f"== 4/5 fine-tuning the pretrained encoder on the real digits (held-out test split) -> {ft}", flush=True)
    _run(["beit.finetune", "--config", "demo_finetune", "--init", str(pre / "pretrained.safetensors"),
          "--train_shards", f"{digits}/train-*.tar", "--val_shards", f"{digits}/test-*.tar", "--output_dir", str(ft)])
    print(f"== 5/5 run reports (beit viz) -> {pre / 'index.html'}, {ft / 'index.html'}", flush=True)
    for run in (pre, ft):
        _run(["beit.viz.main", str(run), "--device", "cpu", "--num_images", "4"], stdout=subprocess.DEVNULL)
    report(pre, tokenizer, ft, t0)
    return 0


def report(pre: Path, tokenizer: Path, ft: Path, t0: float) -> None:
    from beit.checkpoints.checkpointing import find_latest_complete

    m = json.loads((pre / "final_metrics.json").read_text())
    f = json.loads((ft / "final.json").read_text())
    acc, base = m["val/mim_acc"], m["val/majority_acc"]
    print()
    print("== BEiT demo finished in %.1f min" % ((time.time() - t0) / 60))
    print(f"   pretrained weights : {m['pretrained']}  (+ pretrained.json: model config)")
    print(f"   last checkpoint    : {find_latest_complete(pre)}")
    print(f"   metrics (JSON lines): {pre / 'metrics.jsonl'}, {ft / 'metrics.jsonl'}")
    print(f"   run reports        : {pre / 'index.html'}, {ft / 'index.html'}  (open in a browser; "
          f"`beit viz RUN_DIR` redraws them)")
    print(f"   TensorBoard        : tensorboard --logdir {pre.parent}  (scalars of both stages + pretraining pictures)")
    print(f"   run configs        : {pre / 'config.yaml'}, {ft / 'config.yaml'}")
    print(f"   tokenizer          : {tokenizer}.safetensors / .json")
    print(f"   fine-tuned model   : {ft / 'model.safetensors'} (timm-loadable), {ft / 'confusion_matrix.png'}")
    print(f"   pretraining, held-out photos: masked-token accuracy {acc:.1%} vs majority-token baseline {base:.1%} "
          f"({acc / base:.1f}x, {m['val/tokens']} masked tokens; {m['step']} steps, "
          f"{m['train_seconds']:.0f} s training)")
    print(f"   fine-tuning, held-out digits: top-1 {f['top1']:.1f}%  top-5 {f['top5']:.1f}%  "
          f"({f['epochs']} epochs; a pipeline check - see README 'Evidence' for the measured comparison)")


if __name__ == "__main__":
    from beit.cli import call
    sys.exit(call(main))
