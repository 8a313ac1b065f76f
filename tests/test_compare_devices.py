"""``beit compare`` beyond the ViT: a Swin encoder (``--arch swin_*``) pretrained with BEiT vs the same Swin
from scratch, and a MobileViT student distilled from the fine-tuned BEiT model vs the same student on
the labels alone, end to end on the bundled digits with a tiny budget (1 seed, a few steps)."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from beit.cli import main as cli
from beit.compare.options import CompareConfig

SWIN = "swin_tiny_patch4_window7_224"
TINY = ["--seeds", "0", "--label_fraction", "0.1", "--threads", "1", "--arch", SWIN,
        "--swin", "{embed_dim: 16, swin_depths: [1, 1, 1], swin_heads: [1, 2, 4]}",
        "--pretrain", "{total_steps: 6, log_every: 3}", "--finetune", "{epochs: 2, warmup_epochs: 1}",
        "--tokenizer_fit", "{epochs: 1, vocab_size: 16}", "--distill", "{unlabelled_batch_size: 8}",
        "--methods", "beit,scratch,distill,student,logreg_pixels"]



def test_compare_swin_and_distillation_tiny_run(digits, tmp_path):
    n = torch.get_num_threads()
    out = tmp_path / "cmp"
    try:
        assert cli(["compare", "--train_shards", str(digits / "train-*.tar"), "--test_shards",
                    str(digits / "test-*.tar"), "--output_dir", str(out), *TINY]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads((out / "compare.json").read_text())
    assert list(res["rows"]) == ["beit", "scratch", "logreg_pixels", "distill", "student"]
    assert all(len(v) == 1 and 0 <= v[0] <= 100 for v in res["rows"].values())
    seed = out / "seed0"
    # the Swin was pretrained with BEiT (timm key names + the MIM head) and both Swin runs are the same timm Swin
    pre = load_file(str(seed / "pretrain" / "pretrained.safetensors"))
    assert "mask_token" in pre and "layers.2.blocks.0.attn.qkv.weight" in pre
    ft, scratch = (json.loads((seed / d / "model.json").read_text()) for d in ("finetune_beit", "finetune_scratch"))
    assert ft["architecture"] == scratch["architecture"] == SWIN
    assert ft["model_kwargs"]["depths"] == scratch["model_kwargs"]["depths"] == [1, 1, 1]
    assert ft["model_kwargs"]["embed_dim"] == scratch["model_kwargs"]["embed_dim"] == 16
    # the distilled student was taught by this seed's fine-tuned Swin; both students are timm MobileViTs
    cfg = (seed / "distill" / "config.yaml").read_text()
    assert f"teacher: {seed / 'finetune_beit' / 'model.safetensors'}" in cfg and "task: distill" in cfg
    for d in ("distill", "student"):
        conf = json.loads((seed / d / "model.json").read_text())
        assert conf["architecture"] == "mobilevit_xxs"
        m = timm.create_model(conf["architecture"], checkpoint_path=str(seed / d / "model.safetensors"),
                              **conf["model_kwargs"])
        assert m.head.fc.out_features == 10
    md = (out / "compare.md").read_text()
    assert "mobilevit_xxs distilled from the fine-tuned BEiT swin_tiny_patch4_window7_224" in md
    assert "Distilled student vs the same student on the labels alone" in md
    assert res["recipe"]["student"]["model"] == "mobilevit_xxs" and res["recipe"]["distill"]["distill_alpha"] == 0.5


def test_compare_device_options_refused_before_compute():
    base = dict(train_shards="a", test_shards="b")
    with pytest.raises(ValueError, match="read ViT features"):
        CompareConfig(**base, arch=SWIN, methods=["beit", "knn"]).validate()
    with pytest.raises(ValueError, match="not|must be beit or a timm Swin"):
        CompareConfig(**base, arch="swin_typo").validate()
    with pytest.raises(ValueError, match="add beit"):
        CompareConfig(**base, methods=["distill", "student"]).validate()
    with pytest.raises(ValueError, match="unknown key"):
        CompareConfig(**base, arch=SWIN, swin={"depth": 3}, methods=["beit"]).validate()
    assert "distill" not in CompareConfig().methods  # opt-in: the default methods are unchanged
