"""A real BEiT classifier of the bundled digits in every export format, for the predict and model-card tests:
k-means tokenizer -> a short BEiT pretraining on the unlabelled training digits -> a fine-tune from it (fp32, so
its held-out evaluation is the same arithmetic as a later prediction) -> ``beit export`` (timm and ``--format
hf``) and ``beit export-onnx``. About half a minute on the 2-core machine."""
from __future__ import annotations

import json
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState

DIMS = dict(image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)


def _fresh_state() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def build_digits_model(root: Path) -> dict:
    import torch

    from beit.data.sample_sets import build_sample_shards
    from beit.export.commands import export_main, onnx_main
    from beit.finetune import FinetuneConfig, run_finetune
    from beit.options.pretrain import PretrainConfig
    from beit.tokenizers.images import shard_image_batches
    from beit.tokenizers.kmeans import KMeansTokenizer
    from beit.training.pretraining import run_pretraining

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        digits = root / "digits"
        build_sample_shards(digits, "digits")
        train, test = str(digits / "train-*.tar"), str(digits / "test-*.tar")
        tok = KMeansTokenizer.fit(lambda: shard_image_batches(train, size=32, batch_size=64, max_images=512),
                                  epochs=1, seed=0, init_patches=4000, progress=False, vocab_size=32, patch_size=8,
                                  input_size=32)
        tok.save(root / "tokenizer")
        _fresh_state()
        run_pretraining(PretrainConfig(train_shards=[train], tokenizer="kmeans", tokenizer_path=str(root / "tokenizer"),
                                       model_size="tiny", batch_size=32, total_steps=20, warmup_steps=2, lr=2e-3,
                                       mask_ratio=0.4, min_mask_patches=2, num_workers=0, checkpoint_every=20,
                                       report_to="none", mixed_precision="no", shuffle_buffer=64, log_images_every=0,
                                       output_dir=str(root / "pretrain"), **DIMS))
        _fresh_state()
        run = root / "finetune"
        run_finetune(FinetuneConfig(train_shards=[train], val_shards=[test], output_dir=str(run),
                                    init=str(root / "pretrain" / "pretrained.safetensors"), epochs=2, batch_size=32,
                                    num_workers=0, lr=2e-3, warmup_epochs=0.5, auto_augment="", reprob=0.0, mixup=0.0,
                                    cutmix=0.0, hflip=0.0, crop_pct=0.875, report_to="none", mixed_precision="no",
                                    image_size=32, patch_size=8))
        _fresh_state()
        export_main(["--run_dir", str(run), "--out", str(root / "exported" / "model.safetensors")])
        export_main(["--run_dir", str(run), "--out", str(root / "hf"), "--format", "hf"])
        onnx_main(["--model", str(root / "exported" / "model.safetensors"), "--out", str(root / "onnx" / "model.onnx"),
                   "--val_shards", test])
    finally:
        torch.set_num_threads(threads)
        _fresh_state()
    final = json.loads((run / "final.json").read_text())
    return {"root": root, "digits": digits, "test": test, "run": run, "final": final,
            "timm": root / "exported" / "model.safetensors", "hf": root / "hf", "onnx": root / "onnx" / "model.onnx"}


def digit_samples(shard: Path) -> list[dict]:
    """Every sample of a shard (``__key__``, ``png``, ``cls``), in order."""
    from beit.data.storage.shard_format import iter_tar_samples
    with open(shard, "rb") as f:
        return list(iter_tar_samples(f))

