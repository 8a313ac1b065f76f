"""End to end for every teacher format: a VQ-KD tokenizer distilled from it (``beit tokenizer train vqkd``) drives a
BEiT pretraining run (``--tokenizer vqkd --tokenizer_path <its folder>``).

Teachers: Hugging Face CLIP / DINO / DINOv2 folders and a timm checkpoint, written by their own libraries
(tiny random configs), and our own runs: real BEiT, Swin and ViT pretraining runs and a real fine-tune run.
The tokenizer's grid is 8x8 (32 px, 4 px patches); the HF teachers see 8 x their patch px, the others are
resampled from their own grids where those differ."""
import json
import math

import pytest
from test_pretrain import assets, run, tiny_cfg  # noqa: F401  (module-scoped photo shards + a k-means tokenizer)
from test_swin_pretrain import SWIN
from vqkd_testutil import TIMM_KW, TIMM_NAME, run_vqkd, timm_teacher

from beit.checkpoints.hf_import import transformers_names
from beit.runtime.run_logging import read_metrics

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2)
FORMATS = ("hf_clip", "hf_dino", "hf_dinov2", "timm", "beit_run", "swin_run", "vit_run", "finetune_run")
VIT = dict(arch="vit_tiny_patch16_224", drop_path=0.0)  # a timm ViT backbone, 4 px patches: the 8x8 grid


def make_teacher(fmt: str, root, assets, digits) -> dict:  # noqa: F811
    """Write one teacher; returns the VQ-KD options that name it."""
    folder = root / fmt
    if fmt.startswith("hf_"):
        cfg_name, cls_name = {"hf_clip": ("CLIPVisionConfig", "CLIPVisionModelWithProjection"),
                              "hf_dino": ("ViTConfig", "ViTModel"), "hf_dinov2": ("Dinov2Config", "Dinov2Model")}[fmt]
        cfg_cls, cls = transformers_names(cfg_name, cls_name)
        cls(cfg_cls(**VISION, **({"projection_dim": 16} if fmt == "hf_clip" else {}))).save_pretrained(folder)
        return dict(teacher="hf", teacher_path=str(folder))
    if fmt == "timm":
        return dict(teacher="timm", teacher_path=str(timm_teacher(folder)), teacher_model=TIMM_NAME,
                    teacher_model_kwargs=TIMM_KW)
    if fmt == "finetune_run":
        from test_finetune_run import cfg as finetune_cfg

        from beit.finetune import run_finetune
        run_finetune(finetune_cfg(digits, folder, epochs=1, batches_per_epoch=2))
    else:
        arch = {"swin_run": SWIN, "vit_run": VIT}.get(fmt, {})
        run(tiny_cfg(assets, folder, total_steps=2, checkpoint_every=2, **arch))
    return dict(teacher="run", teacher_path=str(folder))


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_teacher_format_trains_a_tokenizer_that_drives_pretraining(assets, digits, tmp_path, fmt):  # noqa: F811
    teacher = make_teacher(fmt, tmp_path, assets, digits)
    vq = tmp_path / "vqkd"
    cfg = dict(train_shards=[assets["train"]], val_shards=[assets["val"]], input_size=32, patch_size=4, embed_dim=32,
               depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, vocab_size=32,
               code_dim=8, batch_size=16, total_steps=3, warmup_steps=1, lr=2e-3, num_workers=0, checkpoint_every=3,
               log_every=1, eval_every=3, report_to="none", restart_after_steps=2, mixed_precision="no",
               output_dir=str(vq), **teacher)
    run_vqkd(cfg)
    final = json.loads((vq / "final_metrics.json").read_text())
    assert final["step"] == 3 and final["val/tokens"] == 222 * 64 and math.isfinite(final["val/rec_loss"])
    assert ("resampled" in final["teacher"]) == (fmt in ("timm", "finetune_run"))  # 4x4 grids -> 8x8
    out = tmp_path / "pretrain"
    summary = run(tiny_cfg(assets, out, tokenizer="vqkd", tokenizer_path=str(vq), total_steps=2, checkpoint_every=2))
    assert summary["step"] == 2 and summary["val/tokens"] > 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
    assert json.loads((out / "pretrained.json").read_text())["tokenizer"] == "vqkd"
