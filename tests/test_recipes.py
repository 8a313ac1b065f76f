"""Every recipe under launch/ runs, with its own augmentation and optimiser settings, on the real sample sets.

Only the scale is shrunk (SHRINK_*: width, batch, run length, workers, where the data and outputs are, and
mixed precision "auto": bf16 where the CPU has it, as on a GPU, fp32 on an AVX2-only CPU where bf16 is 4x
slower); everything else comes from the recipe, and each run's saved config.yaml is compared with the recipe
to prove it. Each fine-tune recipe trains a few optimizer steps on the real digits and evaluates all 360
held-out ones; the fine-tune recipes whose training augmentation differs (FULL_EPOCH: every other one has
the same augmentation as one of them, which a test checks) train a whole epoch over all 1,437 training
digits, so the RandAugment spec each recipe ships runs ~1,400 times at its own magnitude (the Pillow 13
posterize crash came about once in 700 images). Each pretraining recipe runs a few optimizer steps with its
tokenizer kind, masking and gradient accumulation. The linear probe and the demo fine-tune start from the
matching pretraining run's output, as in the real flow.
"""
import json
import math
from pathlib import Path

import pytest
import yaml

from beit.config import from_dict, to_dict

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (REPO / "launch").glob("*.yaml"))
# what a fine-tune starting from a pretraining run takes from that run instead of a fresh model
INIT_FROM = {"finetune_linear_probe.yaml": "pretrain_beit_base_in1k.yaml",
             "demo_finetune.yaml": "demo_pretrain.yaml"}
SHRINK_MODEL = dict(embed_dim=32, num_heads=2)
SHRINK_PRETRAIN = dict(batch_size=16, total_steps=3, num_workers=0, checkpoint_every=3, log_every=1, report_to="none",
                       eval_batches=1, shuffle_buffer=64)
SHRINK_FINETUNE = dict(batch_size=32, epochs=1, num_workers=0, checkpoint_every=10 ** 6, log_every=1, report_to="none",
                       mixed_precision="auto")
FULL_EPOCH = ("finetune_beit_base_in1k.yaml", "demo_finetune.yaml")
FEW_BATCHES = 4  # micro-batches per epoch for the other fine-tune recipes
# the fine-tune options that make up the training augmentation
AUGMENTATION = ("image_size", "auto_augment", "reprob", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob",
                "label_smoothing", "color_jitter", "crop_scale_min", "hflip", "interpolation", "mean", "std")
SMALL_SWIN = dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])
# what a run resolves itself and writes back into its config.yaml
RESOLVED = {"num_classes", "grad_accum_steps", "embed_dim", "depth", "num_heads", "mlp_ratio", "position",
            "init_values", "tokenizer", "layer_norm_eps", "global_pool"}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def stage_of(name: str) -> str | None:
    return "finetune" if "finetune" in name else "pretrain" if "pretrain" in name else None


def recipe(name: str) -> dict:
    return yaml.safe_load((REPO / "launch" / name).read_text())


def augmentation(name: str) -> tuple:
    from beit.options.finetune import FinetuneConfig
    cfg = to_dict(from_dict(FinetuneConfig, recipe(name), source=name))
    return tuple(tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in AUGMENTATION)


def test_every_recipe_is_covered():
    assert len(RECIPES) >= 8 and {"pretrain_beit_base_in1k.yaml", "finetune_beit_base_in1k.yaml"} <= set(RECIPES)
    for name in RECIPES:
        assert stage_of(name), f"launch/{name}: neither a pretraining nor a fine-tune recipe; teach test_recipes.py it"
    full = {augmentation(name) for name in FULL_EPOCH}
    for name in RECIPES:
        if stage_of(name) == "finetune" and recipe(name).get("auto_augment", "rand"):
            assert augmentation(name) in full, f"launch/{name} augments unlike {FULL_EPOCH}: add it to FULL_EPOCH"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The real sample sets as shards, and the tokenizers the pretraining recipes name (tiny, random or fitted)."""
    import attr
    import dall_e
    import torch

    from beit.data.sample_sets import build_sample_shards
    from beit.tokenizers.dalle import tokenizer_from_modules
    from beit.tokenizers.images import shard_image_batches
    from beit.tokenizers.kmeans import KMeansTokenizer
    from beit.tokenizers.vqkd import VQKDTokenizer
    root = tmp_path_factory.mktemp("recipe_assets")
    for kind in ("digits", "photos"):
        build_sample_shards(root / kind, kind)
    torch.manual_seed(0)
    attr.set_run_validators(False)  # dall_e insists on n_hid >= 64 (a 52 GFLOP encoder); the code runs with 8
    try:
        encoder = dall_e.Encoder(n_hid=8, n_blk_per_group=1)  # dall_e's own vocabulary: 8192 codes
    finally:
        attr.set_run_validators(True)
    dalle = tokenizer_from_modules(encoder, input_size=112).save(root / "dalle")
    photos = str(root / "photos" / "train-*.tar")
    kmeans = KMeansTokenizer.fit(lambda: shard_image_batches(photos, size=64, batch_size=64, max_images=256), epochs=1,
                                 seed=0, init_patches=2000, progress=False, vocab_size=32, patch_size=8, input_size=64)
    # a tiny random VQ-KD at the released tokenizers' 224 px / 16 px grid (BEiT v2 recipes)
    vqkd = VQKDTokenizer(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, n_code=512)
    return dict(root=root, dalle=str(dalle), kmeans=str(kmeans.save(root / "kmeans")),
                vqkd=str(vqkd.save(root / "vqkd")))


def shrunk(name: str, assets: dict, out: Path, init: str = "") -> dict:
    """The recipe's options with only the scale changed (and the paths a recipe leaves to the command line)."""
    r, root = recipe(name), assets["root"]
    if stage_of(name) == "pretrain":
        kw = dict(SHRINK_MODEL, **SHRINK_PRETRAIN, data_shards=[str(root / "photos" / "train-*.tar")],
                  val_shards=[str(root / "photos" / "val-*.tar")], tokenizer_path=assets[r["tokenizer"]])
        # the recipe's warmup as a fraction of its run
        kw["warmup_steps"] = round(kw["total_steps"] * (r["warmup_steps"] / r["total_steps"] if "total_steps" in r
                                                        else r["warmup_epochs"] / r["epochs"]))
    else:
        kw = dict(SHRINK_FINETUNE, train_shards=str(root / "digits" / "train-*.tar"),
                  val_shards=str(root / "digits" / "test-*.tar"),
                  warmup_epochs=r.get("warmup_epochs", 5.0) / r.get("epochs", 100))
        if name not in FULL_EPOCH:
            kw["batches_per_epoch"] = FEW_BATCHES
        if init:
            kw["init"] = init
        elif r.get("model", "beit") == "beit":
            kw.update(SHRINK_MODEL, depth=2)
        else:
            kw["model_kwargs"] = SMALL_SWIN
    if "global_batch_size" in r:  # keep gradient accumulation: 2 micro-batches per optimizer step
        kw["global_batch_size"] = 2 * kw["batch_size"]
    return dict(kw, output_dir=str(out))


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """name -> (output folder, options it ran with); each recipe runs once per module, pretraining first."""
    from accelerate.state import AcceleratorState, GradientState
    done: dict[str, tuple[Path, dict]] = {}

    def run(name: str) -> tuple[Path, dict]:
        if name in done:
            return done[name]
        init = ""
        if name in INIT_FROM:
            init = str(run(INIT_FROM[name])[0] / "pretrained.safetensors")
        out = tmp_path_factory.mktemp(name.removesuffix(".yaml"))
        kw = shrunk(name, assets, out, init)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        try:
            if stage_of(name) == "pretrain":
                import beit.pretrain as pretrain
                cfg = from_dict(pretrain.PretrainConfig, {**recipe(name), **kw}, source=name)
                pretrain.main([], cfg=cfg)
            else:
                from beit.finetune import FinetuneConfig, run_finetune
                run_finetune(from_dict(FinetuneConfig, {**recipe(name), **kw}, source=name))
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
        done[name] = out, kw
        return done[name]
    return run


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_with_its_own_settings(name, runs):
    out, kw = runs(name)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    r = recipe(name)
    # every option the recipe sets is what ran, apart from the shrunk scale and what the run resolves itself
    for key, value in r.items():
        if key in kw or key in RESOLVED:
            continue
        assert saved[key] == pytest.approx(value), (name, key, saved[key], value)
    steps = [rec for rec in read_jsonl(out / "metrics.jsonl") if "loss" in rec]
    assert steps and all(math.isfinite(rec["loss"]) for rec in steps), name
    if stage_of(name) == "pretrain":
        assert [rec["step"] for rec in steps] == list(range(1, kw["total_steps"] + 1))
        final = json.loads((out / "final_metrics.json").read_text())
        assert final["step"] == kw["total_steps"] and (out / "pretrained.safetensors").is_file()
        return
    final = json.loads((out / "final.json").read_text())
    assert final["samples"] == 360 and final["num_classes"] == 10 and 0 <= final["top1"] <= 100, final
    epoch = next(rec for rec in read_jsonl(out / "metrics.jsonl") if rec.get("epoch") == 1)
    if name in FULL_EPOCH:  # every training digit went through the recipe's augmentation
        assert epoch["data/samples"] >= 1437 and epoch["data/bad"] == 0, epoch
