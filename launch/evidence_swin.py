"""Does BEiT pretraining help a Swin Transformer? launch/evidence.py's protocol with a small timm Swin.

    python launch/evidence_swin.py --out runs/evidence_swin                       # 3 seeds, head 'last'
    python launch/evidence_swin.py --out runs/swin_heads --seeds 0 --heads last stage \
        --pretrain_epochs 30 --finetune_epochs 30                                   # the head measurement

Same data, held-out test split, tokenizer (k-means, 64 words over 8 px patches of the 32 px digits),
10% labels and recipe as launch/evidence.py; the encoder is timm's ``swin_tiny_patch4_window7_224``
shrunk to the digits: 2 px Swin patches (stage grids 16, 8, 4, 2), dims 32-256, windows of 4. Each
4x4 token cell covers 4x4 Swin patches. For each seed and head: BEiT-pretrain the Swin on the
unlabelled training digits, fine-tune it on the 10% subset; and the same Swin from scratch with
the same recipe and budget. Writes ``<out>/evidence_swin.md`` / ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import evidence as ev  # noqa: E402  (launch/evidence.py: data, tokenizer, label subset, table)

ARCH = "swin_tiny_patch4_window7_224"
SWIN = dict(patch_size=2, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=4)


def pretrain(shard_dir: Path, tok_path: Path, out: Path, seed: int, head: str, epochs: int) -> dict:
    from beit.pretrain import main as pretrain_main
    argv = ["--data_shards", str(shard_dir / "train-*.tar"), "--val_shards", str(shard_dir / "test-*.tar"),
            "--tokenizer", "kmeans", "--tokenizer_path", str(tok_path), "--output_dir", str(out),
            "--seed", str(seed), "--image_size", str(ev.MODEL["img_size"]), "--patch_size", str(ev.MODEL["patch_size"]),
            "--arch", ARCH, "--swin_patch_size", str(SWIN["patch_size"]), "--embed_dim", str(SWIN["embed_dim"]),
            "--swin_depths", json.dumps(SWIN["depths"]), "--swin_heads", json.dumps(SWIN["num_heads"]),
            "--swin_window_size", str(SWIN["window_size"]), "--swin_head", head]
    for k, v in {**ev.PRETRAIN, "epochs": epochs}.items():
        argv += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return pretrain_main(argv)


def finetune(train_dir: Path, shard_dir: Path, out: Path, seed: int, init: str, epochs: int) -> dict:
    from beit.finetune import FinetuneConfig, run_finetune
    recipe = {**(ev.FINETUNE if init else {**ev.FINETUNE, **ev.SCRATCH_OVERRIDES}), "epochs": epochs}
    cfg = FinetuneConfig(train_shards=str(train_dir / "train-*.tar"), val_shards=str(shard_dir / "test-*.tar"),
                         output_dir=str(out), seed=seed, init=init, model=ARCH, img_size=ev.MODEL["img_size"],
                         model_kwargs={} if init else dict(SWIN), resume=False, **recipe)
    cfg.validate()
    res = run_finetune(cfg)
    return {"top1": res["top1"], "top5": res["top5"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/evidence_swin")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--heads", nargs="+", default=["last"], choices=["last", "stage"])
    p.add_argument("--pretrain_epochs", type=int, default=ev.PRETRAIN["epochs"])
    p.add_argument("--finetune_epochs", type=int, default=ev.FINETUNE["epochs"])
    args = p.parse_args(argv)
    from beit.data.samples import build_sample_shards
    out, t0 = Path(args.out), time.time()
    shard_dir = out / "digits"
    build_sample_shards(shard_dir, "digits")
    train, test = ev.read_shards(shard_dir, "train"), ev.read_shards(shard_dir, "test")
    rows: dict[str, list[float]] = {f"Swin BEiT-pretrained (head {h}) + fine-tuned": [] for h in args.heads}
    rows["same Swin from scratch"] = []
    per_seed = []
    for seed in args.seeds:
        sdir = out / f"seed{seed}"
        subset = ev.write_label_subset(train, sdir / "labels10", seed)
        tok = ev.fit_tokenizer(shard_dir, sdir / "tokenizer" / "kmeans", seed, train[:512])
        rec: dict = {"seed": seed, "labels": len(subset), "tokenizer": tok}
        for h in args.heads:
            t = time.time()
            pre = pretrain(shard_dir, sdir / "tokenizer" / "kmeans", sdir / f"pretrain_{h}", seed, h, args.pretrain_epochs)
            ft = finetune(sdir / "labels10", shard_dir, sdir / f"finetune_{h}", seed, pre["pretrained"],
                          args.finetune_epochs)
            rows[f"Swin BEiT-pretrained (head {h}) + fine-tuned"].append(ft["top1"])
            rec[h] = {"pretrain": {k: v for k, v in pre.items() if k.startswith("val/") or k == "train_seconds"},
                      "finetune": ft, "seconds": round(time.time() - t, 1)}
        t = time.time()
        scratch = finetune(sdir / "labels10", shard_dir, sdir / "finetune_scratch", seed, "", args.finetune_epochs)
        rows["same Swin from scratch"].append(scratch["top1"])
        rec["scratch"] = {**scratch, "seconds": round(time.time() - t, 1)}
        per_seed.append(rec)
        print(json.dumps(rec), flush=True)
    md = ev.table(rows, len(subset), len(test), args.seeds)
    mim = "; ".join(f"head {h}: {statistics.mean(r[h]['pretrain']['val/mim_acc'] for r in per_seed):.3f} vs "
                    f"{statistics.mean(r[h]['pretrain']['val/majority_acc'] for r in per_seed):.3f} majority"
                    for h in args.heads)
    md += (f"\n\nModel: timm {ARCH} with {SWIN} at 32 px; pretraining {args.pretrain_epochs} epochs on the "
           f"{len(train)} unlabelled training digits (k-means, vocab {ev.TOKENIZER['vocab_size']}, 4x4 token grid); "
           f"fine-tuning {args.finetune_epochs} epochs, same recipe and budget for all (scratch without layer decay). "
           f"Held-out masked-token accuracy: {mim}. Total {(time.time() - t0) / 60:.1f} min.")
    (out / "evidence_swin.md").write_text(md + "\n")
    (out / "evidence_swin.json").write_text(json.dumps({"rows": rows, "per_seed": per_seed, "swin": SWIN,
                                                        "args": vars(args)}, indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
