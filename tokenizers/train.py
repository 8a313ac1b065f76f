"""Train a tokenizer on your own shards.

    beit tokenizer train kmeans --data my_photos/ --out runs/tok/kmeans        # a folder of images (cached shards)
    python -m beit.tokenizers.train kmeans --train_shards 'data/train-*.tar' --out runs/tok/kmeans [--vocab_size ...]
    python -m beit.tokenizers.train dvae   --train_shards 'data/train-*.tar' --output_dir runs/dvae [--steps 3000 ...]
    python -m beit.tokenizers.train vqkd   --train_shards 'data/train-*.tar' --teacher_path clip/ ...   (BEiT v2)
    accelerate launch -m beit.tokenizers.train dvae ...        (several GPUs)

All write ``<name>.safetensors`` + ``<name>.json`` for ``load_tokenizer(kind, path)`` (k-means and the dVAE are
fitted in beit.tokenizers.fitting, VQ-KD is trained in beit.tokenizers.vqkd_train). The dVAE and VQ-KD runs
checkpoint atomically every ``checkpoint_every`` steps and resume from the latest complete checkpoint when the
same command is run again. ``--model_grid`` (the BEiT image_size / patch_size) makes sure the token grid equals
the model's patch grid before any compute is spent.
"""
from __future__ import annotations

import sys

from beit.config import parse_config
from beit.tokenizers.fitting import DVAETrainConfig, KMeansTrainConfig, train_dvae, train_kmeans
from beit.tokenizers.vqkd_train import VQKDTrainConfig, run_vqkd

COMMANDS = {"kmeans": (KMeansTrainConfig, train_kmeans), "dvae": (DVAETrainConfig, train_dvae),
            "vqkd": (VQKDTrainConfig, run_vqkd)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(f"usage: python -m beit.tokenizers.train {{{'|'.join(COMMANDS)}}} [--help] [options]\n\n{__doc__}\n"
              f"`beit tokenizer train KIND --help` lists that kind's options with their defaults.",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    cls, fn = COMMANDS[argv[0]]
    cfg = parse_config(cls, argv[1:], description=__doc__)
    # the training part of the folder; its held-out part (the same as pretraining's) is scored. VQ-KD reads
    # --data itself, after its checks
    if cfg.data and cls is not VQKDTrainConfig:
        import dataclasses

        from beit.runtime.run_lock import main_print
        found = cfg.folder_shards(labelled=False, hold_out=not cfg.val_shards, log=main_print)
        main_print(f"--data {cfg.data}: {found.describe()}")
        cfg = dataclasses.replace(cfg, data="", train_shards=[found.train], val_shards=cfg.val_shards or
                                  ([found.val] if found.val else []))
    fn(cfg)
    return 0


if __name__ == "__main__":
    from beit.cli import call
    sys.exit(call(main))
