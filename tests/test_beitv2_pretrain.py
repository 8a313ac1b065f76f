"""BEiT v2 pretraining: the CLS-pretraining branch in the model, its loss and metrics in the run, its options,
its checkpoints through export, fine-tuning and --init (launch/pretrain_beit_v2_base_in1k.yaml runs shrunk in
tests/test_recipes.py)."""
import math

import pytest
import torch
from test_pretrain import assets, run, tiny_cfg  # noqa: F401  (assets is a fixture)

import beit.modeling.mim as mim
from beit.engines.pretrain import MimMeter, mim_losses
from beit.modeling.mim import create_pretrain_model
from beit.runtime.faults import SetupError
from beit.runtime.run_logging import read_metrics

V2 = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, vocab_size=64, cls_pretraining=True)


def v2(**kw):
    return create_pretrain_model(None, **{**V2, **kw})


def even_mask(batch=3, count=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(16, generator=g) < count for _ in range(batch)])


@pytest.mark.parametrize("shared", [True, False])
def test_fast_path_equals_the_full_sequence_in_training(shared, monkeypatch):
    """With equal mask counts the last block of each path computes only the rows it outputs: the same logits and
    gradients as the full sequence, drop path included (same seed)."""
    model = v2(shared_lm_head=shared, drop_path_rate=0.2).train()
    x, m = torch.randn(3, 3, 32, 32), even_mask()
    labels = torch.randint(0, 64, (int(m.sum()),))
    runs = []
    for full in (False, True):
        if full:
            monkeypatch.setattr(mim, "_masked_rows", lambda m: None)
        model.zero_grad()
        torch.manual_seed(3)
        out = model(x, m)
        loss, _ = mim_losses(out, labels)
        loss.backward()
        runs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast, g_fast), (full, g_full) = runs
    for k in ("mim", "cls_pt"):
        torch.testing.assert_close(fast[k], full[k], rtol=1e-5, atol=1e-5)
    for n in g_full:
        torch.testing.assert_close(g_fast[n], g_full[n], rtol=1e-4, atol=1e-6, msg=n)
    # every parameter learns, the head blocks and (shared) the one LM head from both branches
    assert all(g.abs().sum() > 0 for g in g_full.values()), [n for n, g in g_full.items() if not g.abs().sum()]


def test_the_branch_is_initialised_as_the_reference_and_leaves_the_encoder_init_alone():
    torch.manual_seed(0)
    v1 = create_pretrain_model(None, **{k: v for k, v in V2.items() if k != "cls_pretraining"})
    torch.manual_seed(0)
    m = v2(depth=6, early_layers=4, head_layers=2, drop_path_rate=0.1, shared_lm_head=False)
    enc = {k: v for k, v in m.state_dict().items() if not k.startswith("cls_pt_")}
    torch.manual_seed(0)
    v1 = create_pretrain_model(None, **{**{k: v for k, v in V2.items() if k != "cls_pretraining"}, "depth": 6})
    assert enc.keys() == v1.state_dict().keys()
    assert all(torch.equal(v, v1.state_dict()[k]) for k, v in enc.items())  # the same draws as BEiT v1's
    # head blocks keep PyTorch's default Linear init (uniform within 1/sqrt(fan_in)), proj/fc2 rescaled by their
    # depth counted on from early_layers (blocks 5 and 6 of the schedule)
    for j, blk in enumerate(m.cls_pt_layers):
        bound = 1 / math.sqrt(32)
        assert blk.attn.qkv.weight.abs().max() <= bound and blk.attn.qkv.weight.abs().max() > 0.9 * bound
        scale = math.sqrt(2.0 * (4 + j + 1))
        assert blk.attn.proj.weight.abs().max() <= bound / scale * 1.0001
        assert blk.attn.proj.weight.abs().max() > 0.9 * bound / scale
        assert (blk.gamma_1 == 0.1).all() and blk.norm1.eps == 1e-6
    # drop path continues the encoder's schedule: linspace(0, 0.1, max(depth, early + head))[early:early + head]
    assert [b.drop_path1.drop_prob for b in m.cls_pt_layers] == pytest.approx([0.1 * 4 / 5, 0.1])
    w = m.cls_pt_lm_head.weight
    assert w.abs().max() <= 0.02 and (m.cls_pt_lm_head.bias == 0).all() and (m.cls_pt_norm.weight == 1).all()
    assert "cls_pt_lm_head.weight" not in v2().state_dict() and v1.branches == ("mim",)


def test_options_are_checked_before_compute():
    with pytest.raises(ValueError, match="early_layers 4 must name an intermediate block, 1 to depth - 1 = 3"):
        v2(early_layers=4)
    with pytest.raises(ValueError, match="needs depth >= 4"):
        v2(depth=3)
    with pytest.raises(ValueError, match="head_layers must be >= 1"):
        v2(head_layers=0)
    assert v2().early_layers == 1
    narrow = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=4, cls_pretraining=True)
    assert create_pretrain_model("base", **narrow).early_layers == 9     # the reference's 9 of 12 (base)
    assert create_pretrain_model("large", **narrow).early_layers == 21   # and 21 of 24 (large)
    from beit.options.pretrain import PretrainConfig
    with pytest.raises(ValueError, match="--cls_pretraining is BEiT v2's branch of the BEiT ViT"):
        PretrainConfig(train_shards=["x.tar"], arch="swin_tiny_patch4_window7_224", cls_pretraining=True).validate()


def test_meter_reports_each_branch_beside_the_main_one():
    meter = MimMeter(vocab_size=4, device="cpu", branches=("mim", "cls_pt"))
    labels = torch.tensor([0, 0, 0, 1, 2, 3])
    onehot = lambda ids: torch.nn.functional.one_hot(torch.tensor(ids), 4).float()  # noqa: E731
    meter.update({"mim": (torch.tensor(2.0), onehot([0, 1, 0, 1, 3, 3])),
                  "cls_pt": (torch.tensor(1.0), onehot([0, 0, 0, 1, 2, 0]))}, labels)

    class Acc:
        num_processes = 1
    r = meter.reduce(Acc())
    assert r["mim_acc"] == pytest.approx(4 / 6) and r["cls_pt_mim_acc"] == pytest.approx(5 / 6)
    assert r["loss"] == pytest.approx(2.0) and r["cls_pt_loss"] == pytest.approx(1.0)
    assert r["majority_acc"] == pytest.approx(3 / 6) and r["tokens"] == 6


def test_run_logs_the_branch_saves_it_exports_it_and_fine_tunes_without_it(assets, tmp_path):  # noqa: F811
    from beit.checkpoints.mim_loading import load_pretrain_model
    from beit.export.commands import export_main
    out = tmp_path / "v2"
    summary = run(tiny_cfg(assets, out, depth=4, cls_pretraining=True, early_layers=3, total_steps=4,
                           checkpoint_every=4, report_to="tensorboard"))
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert math.isfinite(r["cls_pt_loss"]) and 0 <= r["cls_pt_mim_acc"] <= 1 and r["cls_pt_loss"] != r["loss"]
    assert {"val/cls_pt_mim_acc", "val/cls_pt_loss", "train/cls_pt_mim_acc", "val/mim_acc"} <= set(summary)
    from test_tensorboard_layout import events, tags
    assert {"train/cls_pt_loss", "train/cls_pt_mim_acc", "val/cls_pt_mim_acc"} <= tags(events(out), "scalars")
    model, _ = load_pretrain_model(out / "pretrained.safetensors")
    assert model.config["early_layers"] == 3 and len(model.cls_pt_layers) == 2
    # a resume that drops (or changes) the branch is refused before anything is written
    with pytest.raises(SetupError, match="cls_pretraining"):
        run(tiny_cfg(assets, out, depth=4, total_steps=8, checkpoint_every=4))
    # unilm's layout, read back with every weight (the branch kept)
    pth = export_main(["--run_dir", str(out), "--format", "unilm", "--out", str(tmp_path / "exp" / "v2.pth")])
    again, report = load_pretrain_model(pth)
    assert again.config == model.config and not report.notes
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    assert sd["args"]["early_layers"] == 3 and "rel_pos_bias.relative_position_index" in sd["model"]
    assert all(torch.equal(v, sd["model"][k]) for k, v in model.state_dict().items())
    # fine-tuning from the run: the encoder loads, the branch is dropped with a note
    from test_reference_checkpoints import init_model
    logs = init_model(out / "pretrained.safetensors")[1]
    assert "CLS-pretraining branch (2 head block(s)) serves pretraining only" in logs


def test_export_refuses_what_it_cannot_write(tmp_path):
    from beit.export.commands import export_main
    with pytest.raises(ValueError, match="name it <something>.pth"):
        export_main(["--run_dir", str(tmp_path), "--format", "unilm", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        export_main(["--run_dir", str(tmp_path), "--format", "unilm", "--out", str(tmp_path / "x.pth")])


@pytest.fixture(scope="module")
def tok64(assets, tmp_path_factory):  # noqa: F811
    """A k-means tokenizer with the unilm fixtures' targets: 64 tokens on a 4x4 grid of 32 px images."""
    from beit.tokenizers.images import shard_image_batches
    from beit.tokenizers.kmeans import KMeansTokenizer
    path = tmp_path_factory.mktemp("tok64") / "kmeans"
    KMeansTokenizer.fit(lambda: shard_image_batches(assets["train"], size=32, batch_size=64, max_images=256),
                        epochs=1, seed=0, init_patches=2000, progress=False, vocab_size=64, patch_size=8,
                        input_size=32).save(path)
    return str(path)


def test_init_continues_unilms_v2_checkpoint_with_the_branch(assets, tok64, tmp_path, capsys):  # noqa: F811
    """--init with unilm's own BEiT v2 checkpoint (12 blocks, early_layers 9 from its args, shared LM head): every
    weight, the branch included, is the run's start (a 1e-9 lr step later they are still the file's); a resume
    keeps the run's own weights and says --init was not used."""
    from reference_fixtures import checkpoint
    unilm = checkpoint("unilm_v2_cls_pt")
    out = tmp_path / "cont"
    cfg = tiny_cfg(assets, out, tokenizer_path=tok64, patch_size=8, embed_dim=32, depth=12, num_heads=4,
                   cls_pretraining=True, init=str(unilm), total_steps=1, warmup_steps=0, lr=1e-9, min_lr=1e-9,
                   checkpoint_every=1, val_shards=[])
    run(cfg)
    log = capsys.readouterr().out
    assert f"starting a new run in {out} from --init:" in log and "loaded 219 tensors from" in log
    from safetensors.torch import load_file
    ours = load_file(out / "pretrained.safetensors")
    theirs = torch.load(unilm, map_location="cpu", weights_only=False)["model"]
    assert set(ours) == set(theirs) - {"rel_pos_bias.relative_position_index"}
    assert any(k.startswith("cls_pt_layers.1.") for k in ours)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-6
    run({**cfg, "total_steps": 2})
    assert f"--init {unilm} not used (the run's own checkpoint is newer)" in capsys.readouterr().out


def test_init_that_does_not_fit_is_refused_before_anything_is_written(assets, tok64, tmp_path):  # noqa: F811
    from reference_fixtures import checkpoint
    out = tmp_path / "refused"
    base = tiny_cfg(assets, out, tokenizer_path=tok64, patch_size=8, embed_dim=32, depth=12, num_heads=4,
                    cls_pretraining=True, init=str(checkpoint("unilm_v2_cls_pt")))
    with pytest.raises(SetupError, match="continue it with --cls_pretraining true --early_layers 9 --head_layers 2 "
                                         "--shared_lm_head true"):
        run({**base, "cls_pretraining": False})
    with pytest.raises(SetupError, match=r"depth 12 \(this run: 6; --model_size / --depth\)"):
        run({**base, "depth": 6})
    with pytest.raises(SetupError, match=r"shared_lm_head True \(this run: False; --shared_lm_head\)"):
        run({**base, "shared_lm_head": False})
    with pytest.raises(SetupError, match=r"vocab_size 64 \(this run: 32; the tokenizer"):
        run({**base, "tokenizer_path": assets["tok"], "patch_size": 4})
    with pytest.raises(SetupError, match="pretrained with early_layers 9 .its args., not 5"):
        run({**base, "early_layers": 5})
    with pytest.raises(SetupError, match="--init continues the pretraining of a BEiT ViT"):
        run({**base, "arch": "swin_tiny_patch4_window7_224", "cls_pretraining": False})
    assert not out.exists() or not any(out.iterdir())


def test_init_from_a_v1_checkpoint_starts_the_branch_fresh():
    """unilm's BEiT v1 pretraining checkpoint into a model with the branch: the encoder, mask token and LM head
    are the file's, the branch keeps its own initialisation, and the report says so."""
    from reference_fixtures import checkpoint

    from beit.checkpoints.mim_loading import read_init
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, vocab_size=64, init_values=0.1,
              cls_pretraining=True, early_layers=1, head_layers=2)
    init = read_init(checkpoint("unilm_v1_shared_relpos"), kw)
    torch.manual_seed(0)
    model = create_pretrain_model(None, **kw)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("cls_pt_")}
    report = init.load_into(model)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in fresh.items()) and report.missing == sorted(fresh)
    assert all(torch.equal(sd[k], v) for k, v in init.state_dict.items())
    assert "the branch starts from its initialisation" in report.summary()
