"""Checkpoints written by the reference code load through ``--init`` (build_model) and give its outputs.

Fixtures: tests/fixtures/reference/ (see make_reference_fixtures.py): unilm BEiT v1/v2 training
checkpoints (``utils.save_model``: model + optimizer + args Namespace), transformers ``save_pretrained``
folders (transformers' own defaults: layer_norm_eps 1e-12), a timm ``save_for_hf`` folder. Features are the
last block's output (our timm ``Beit`` with mean pooling has no final norm: the reference's final norm is
dropped, a fresh ``fc_norm`` is used).

Tolerances: float32 rounding gives at most 4e-7 on the logits and 1.5e-6 on the features here; building a
transformers checkpoint with 1e-6 instead of its 1e-12 moves them by 5e-6 to 1e-4 (checked below), so the
tolerances are set between the two.
"""
import json
import shutil

import pytest
import torch
from reference_fixtures import case, checkpoint, max_abs_diff

from beit.modeling.classifier import set_layer_norm_eps
from beit.options.finetune import FinetuneConfig
from beit.tasks import build_model

TOL = 3e-6         # features (last block output, values up to ~10)
TOL_LOGITS = 1e-6  # logits (values up to ~2.5)
HF_CASES = ("hf_beit_model", "hf_beit_mim", "hf_beit_classifier", "hf_beit_classifier_cls_abs")


def init_model(init, num_classes=5, **kw):
    logs = []
    cfg = FinetuneConfig(init=str(init), num_classes=num_classes, image_size=32, patch_size=8, drop_path=0.0,
                         head_init_scale=1.0, **kw)
    model = build_model(cfg, num_classes, log=logs.append).eval()
    return model, "\n".join(logs)


@pytest.mark.parametrize("name,kind", [
    ("unilm_v1_shared_relpos", "shared rel-pos, layer scale"),
    ("unilm_v2_cls_pt", "shared rel-pos, layer scale"),
    ("hf_beit_mim", "shared rel-pos, layer scale"),
    ("hf_beit_model", "shared rel-pos, layer scale"),
])
def test_pretraining_checkpoints_give_reference_features(name, kind):
    d, meta, io = case(name)
    path = checkpoint(name)
    model, log = init_model(path)
    assert str(path) in log and kind in log
    with torch.no_grad():
        feats = model.forward_features(io["images"])
    assert max_abs_diff(feats, io["features"]) < TOL
    assert model.blocks[0].attn.relative_position_bias_table is not None and model.pos_embed is None
    if name == "hf_beit_model":  # BeitPooler (mean pooling + layernorm) == our fc_norm on the mean
        with torch.no_grad():
            pooled = model.forward_head(feats, pre_logits=True)
        assert max_abs_diff(pooled, io["pooled"]) < TOL
    if name == "unilm_v2_cls_pt":  # the CLS-pretraining branch (shared LM head) is reported once, as dropped
        dropped = next(line for line in log.splitlines() if "dropped" in line)
        assert dropped.count("cls_pt_layers") == 1 and "cls_pt_lm_head" not in dropped
        assert "lm_head" in dropped and "mask_token" in dropped
        assert "BEiT v2's CLS-pretraining branch (2 head block(s)) serves pretraining only" in log


@pytest.mark.parametrize("name,layer_scale", [("unilm_v1_abs_layerscale", True), ("unilm_v1_abs_no_layerscale", False)])
def test_absolute_position_checkpoints_need_and_take_the_head_count(name, layer_scale):
    d, meta, io = case(name)
    path = checkpoint(name)
    # no relative position table: the head count is not in the tensors, and the args record names a base model
    with pytest.raises(ValueError, match=r"--num_heads N") as e:
        init_model(path)
    assert str(path) in str(e.value) and "beit_base_patch16_224_8k_vocab" in str(e.value)
    model, log = init_model(path, num_heads=meta["num_heads"])
    assert model.pos_embed is not None and model.blocks[0].attn.relative_position_bias_table is None
    assert (model.blocks[0].gamma_1 is not None) == layer_scale
    assert ("no layer scale" in log) != layer_scale
    with torch.no_grad():
        assert max_abs_diff(model.forward_features(io["images"]), io["features"]) < TOL


@pytest.mark.parametrize("name,pool", [("unilm_v1_finetuned_block_relpos", "avg"), ("timm_beit", "avg"),
                                       ("hf_beit_classifier", "avg"), ("hf_beit_classifier_cls_abs", "token")])
def test_classifier_checkpoints_give_reference_logits(name, pool):
    d, meta, io = case(name)
    model, log = init_model(checkpoint(name))
    with torch.no_grad():
        logits = model(io["images"])
    assert max_abs_diff(logits, io["logits"]) < TOL_LOGITS
    assert "missing" not in log   # fc_norm (or the final norm) and head came from the checkpoint too
    assert model.global_pool == pool   # a CLS-pooled transformers classifier (use_mean_pooling false) stays one


@pytest.mark.parametrize("name", HF_CASES)
def test_transformers_layer_norm_eps_is_honoured_and_the_tolerance_sees_it(name):
    """The fixtures keep transformers' default 1e-12; the model is built with it, and building it with
    BEiT's 1e-6 instead moves the outputs by more than the tolerances."""
    d, meta, io = case(name)
    assert json.loads((d / "hf" / "config.json").read_text())["layer_norm_eps"] == 1e-12
    model, log = init_model(checkpoint(name))
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}
    assert "layer_norm_eps 1e-12 from" in log and "config.json" in log
    key, tol = ("logits", TOL_LOGITS) if "logits" in io else ("features", TOL)
    with torch.no_grad():
        out = (lambda: model(io["images"])) if key == "logits" else (lambda: model.forward_features(io["images"]))
        assert max_abs_diff(out(), io[key]) < tol
        set_layer_norm_eps(model, 1e-6)
        assert max_abs_diff(out(), io[key]) > 2 * tol


def test_flag_overrides_the_files_eps_and_unsupported_settings_are_refused(tmp_path):
    model, log = init_model(checkpoint("hf_beit_classifier"), layer_norm_eps=1e-6)
    assert model.blocks[0].norm1.eps == 1e-6 and "layer_norm_eps" not in log
    folder = shutil.copytree(case("hf_beit_classifier")[0] / "hf", tmp_path / "hf")
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(conf, hidden_act="relu")))
    with pytest.raises(ValueError, match=r"config.json: hidden_act 'relu'.*exact GELU"):
        init_model(folder)
    (folder / "config.json").write_text(json.dumps(dict(conf, head_dim=4)))
    with pytest.raises(ValueError, match=r"head_dim 4 x 4 heads != hidden_size 32"):
        init_model(folder)
    # weights without their config.json: transformers' defaults, said so
    (folder / "config.json").unlink()
    model, log = init_model(folder / "model.safetensors", num_heads=4)
    assert model.blocks[0].norm1.eps == 1e-12 and "no config.json beside" in log


def test_timm_and_hf_folders_give_the_head_count_when_tensors_cannot():
    """Without relative position tables the head count comes from the config.json beside the weights."""
    from beit.checkpoints.formats import recorded_num_heads
    for name, sub in (("hf_beit_classifier", "hf"), ("timm_beit", "timm")):
        d, meta, _ = case(name)
        heads, source = recorded_num_heads(d / sub / "model.safetensors", {}, 32)
        assert heads == meta["num_heads"] and "config.json" in source


def test_strict_false_reports_what_was_skipped(tmp_path):
    from safetensors.torch import save_file

    from beit.checkpoints.loading import read_state_dict
    sd = read_state_dict(checkpoint("unilm_v1_shared_relpos"))
    del sd["blocks.1.mlp.fc1.weight"]
    sd["extra.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"partial.safetensors.*blocks.1.mlp.fc1.weight.*--strict false"):
        init_model(tmp_path / "partial.safetensors")
    model, log = init_model(tmp_path / "partial.safetensors", strict=False)
    assert "blocks.1.mlp.fc1.weight" in log and "extra.weight" in log and "initialised randomly" in log
