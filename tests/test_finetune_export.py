"""Export round trip: our safetensors + JSON load in timm with no missing keys, same outputs."""
import json
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import save_file

from beit.checkpoints.loading import load_beit_weights
from beit.export import export_model, load_exported
from beit.modeling.classifier import LinearProbe, build_beit_classifier
from beit.modeling.mim import create_pretrain_model

DIMS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)


def cfg(**kw):
    base = dict(model="beit", image_size=32, patch_size=8, in_chans=3, init_values=0.1, num_classes=10,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.875)
    return SimpleNamespace(**{**base, **kw})


def trained_like_model():
    m = build_beit_classifier(10, drop_path_rate=0.0, **DIMS).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))  # nothing left at its init value
    return m


def test_timm_create_model_loads_export_with_no_missing_keys(tmp_path):
    m = trained_like_model()
    path = export_model(m, tmp_path / "model.safetensors", cfg(), class_names=[str(i) for i in range(10)])
    conf = json.loads(path.with_suffix(".json").read_text())
    # a 48-wide 2-block model is not called beit_base; timm's entrypoint is only the template
    assert conf["architecture"] == "beit_e48_d2_h2_p8_32" and conf["timm_entrypoint"] == "beit_base_patch16_224"
    assert conf["num_classes"] == 10 and conf["pretrained_cfg"]["label_names"] == [str(i) for i in range(10)]
    x = torch.randn(2, 3, 32, 32)
    expected = m(x)
    # 1) checkpoint_path= (strict load inside timm: any missing/unexpected key raises)
    a = timm.create_model("beit_base_patch16_224", pretrained=False, checkpoint_path=str(path),
                          **conf["model_kwargs"]).eval()
    torch.testing.assert_close(a(x), expected)
    # 2) pretrained=True with a file overlay (timm's filter fn + strict load)
    b = timm.create_model("beit_base_patch16_224", pretrained=True, **conf["model_kwargs"],
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    torch.testing.assert_close(b(x), expected)
    # 3) the JSON alone is enough
    torch.testing.assert_close(load_exported(path)(x), expected)


def test_our_pretraining_model_to_finetune_to_timm(tmp_path):
    """BeitPretrainModel weights -> fine-tune model -> export -> timm, keys intact all the way."""
    pre = create_pretrain_model(None, vocab_size=64, **DIMS).eval()
    with torch.no_grad():
        pre.rel_pos_bias.relative_position_bias_table.normal_()
    save_file({k: v.contiguous() for k, v in pre.state_dict().items()}, str(tmp_path / "pretrained.safetensors"))
    ft = build_beit_classifier(10, drop_path_rate=0.0, **DIMS).eval()
    rep = load_beit_weights(ft, tmp_path / "pretrained.safetensors")
    assert set(rep.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}, rep.summary()
    assert not rep.unexpected, rep.summary()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = pre.forward_features(x)  # [B, 1+N, D] after the final norm
        ours = ft.forward_features(x)    # mean-pooling model: no final norm
    torch.testing.assert_close(pre.norm(ours), feats, atol=1e-5, rtol=0)
    path = export_model(ft, tmp_path / "ft.safetensors", cfg())
    torch.testing.assert_close(load_exported(path)(x), ft(x))


def test_linear_probe_export_round_trip(tmp_path):
    probe = LinearProbe(trained_like_model(), 10, block=1).eval()
    path = export_model(probe, tmp_path / "probe.safetensors", cfg())
    x = torch.randn(2, 3, 32, 32)
    back = load_exported(path)
    assert isinstance(back, LinearProbe) and back.block == 1
    torch.testing.assert_close(back(x), probe(x))


def test_timm_baseline_export(tmp_path):
    from beit.modeling.classifier import build_timm_model
    m = build_timm_model("vit_tiny_patch16_224", 10, img_size=32).eval()
    path = export_model(m, tmp_path / "vit.safetensors", cfg(model="vit_tiny_patch16_224"))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(load_exported(path)(x), m(x))


def test_missing_export_config_is_a_clear_error(tmp_path):
    m = trained_like_model()
    path = export_model(m, tmp_path / "m.safetensors", cfg())
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="config"):
        load_exported(path)


def test_timm_data_config_of_the_export_is_the_runs_preprocessing(tmp_path):
    """Loaded as the export's docstring says, timm's resolve_data_config / create_transform give our eval transform."""
    from timm.data import create_transform, resolve_data_config

    from beit.data.pipelines.labelled import build_transforms
    c = cfg(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=1.0, interpolation="bilinear")
    m = trained_like_model()
    path = export_model(m, tmp_path / "model.safetensors", c, class_names=[f"c{i}" for i in range(10)])
    conf = json.loads(path.with_suffix(".json").read_text())
    model = timm.create_model(conf["timm_entrypoint"], pretrained=True, **conf["model_kwargs"],
                              pretrained_cfg_overlay=dict(conf["pretrained_cfg"], file=str(path))).eval()
    data_cfg = resolve_data_config(model=model)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in data_cfg.items()} == dict(input_size=(3, 32, 32),
                                                                                            interpolation="bilinear",
                                                                                            mean=c.mean, std=c.std,
                            crop_pct=1.0, crop_mode="center")
    from PIL import Image
    img = Image.fromarray((torch.rand(45, 60, 3) * 255).to(torch.uint8).numpy())
    assert torch.equal(create_transform(**data_cfg)(img), build_transforms(c, is_training=False)(img))
    assert model.pretrained_cfg["label_names"][3] == "c3"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), m(x))
    assert resolve_data_config(model=load_exported(path))["crop_pct"] == 1.0


@pytest.mark.parametrize("layout", [dict(), dict(use_abs_pos_emb=True, use_rel_pos_bias=False, init_values=0.0),
                                    dict(layer_norm_eps=1e-12, global_pool="token")])
def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path, layout):
    pytest.importorskip("transformers")
    from beit.checkpoints.hf_import import transformers_names
    from beit.export.classifier import export_hf
    BeitForImageClassification, BeitImageProcessor = transformers_names("BeitForImageClassification",
                                                                        "BeitImageProcessor")
    m = build_beit_classifier(10, drop_path_rate=0.0, **DIMS, **layout).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export_hf(m, tmp_path / "hf", cfg(init_values=0.1 if layout.get("init_values", 0.1) else 0.0),
                    class_names=[f"c{i}" for i in range(10)])
    hf = BeitForImageClassification.from_pretrained(out).eval()
    assert hf.config.id2label[3] == "c3"
    # the model's own settings, not transformers' defaults (1e-12, mean pooling) nor ours (1e-6)
    assert hf.config.layer_norm_eps == layout.get("layer_norm_eps", 1e-6)
    assert hf.config.use_mean_pooling == (layout.get("global_pool", "avg") == "avg")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - m(x)).abs().max() < 2e-6
    proc = BeitImageProcessor.from_pretrained(out)
    assert list(proc.image_mean) == [0.5, 0.5, 0.5] and proc.crop_size == {"height": 32, "width": 32}


def test_finetune_from_a_transformers_classifier_keeps_and_exports_its_settings(digits, tmp_path):
    """--init a transformers classifier (layer_norm_eps 1e-12, CLS pooling): the run builds with them, records them
    in config.yaml, and both exports (re-made from the run folder) write them, so the exported model computes
    what the run's model computes."""
    pytest.importorskip("transformers")
    from reference_fixtures import checkpoint

    from beit.checkpoints.hf_import import transformers_names
    from beit.export.commands import export_main
    from beit.finetune import FinetuneConfig, run_finetune
    out = tmp_path / "run"
    run_finetune(FinetuneConfig(
        init=str(checkpoint("hf_beit_classifier_cls_abs")), train_shards=str(digits / "train-*.tar"), image_size=32,
        patch_size=8, epochs=1, batches_per_epoch=2, batch_size=8, num_workers=0, auto_augment="", reprob=0.0,
        mixup=0.0, cutmix=0.0, report_to="none", warmup_epochs=0.0, output_dir=str(out)))
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["layer_norm_eps"] == 1e-12 and saved["global_pool"] == "token"
    (BeitForImageClassification,) = transformers_names("BeitForImageClassification")
    hf = BeitForImageClassification.from_pretrained(export_main(["--run_dir", str(out), "--out", str(tmp_path / "hf"),
                                                                 "--format", "hf"])).eval()
    assert hf.config.layer_norm_eps == 1e-12 and hf.config.use_mean_pooling is False
    timm_path = export_main(["--run_dir", str(out), "--out", str(tmp_path / "timm" / "model.safetensors")])
    conf = json.loads(timm_path.with_suffix(".json").read_text())
    assert conf["layer_norm_eps"] == 1e-12 and "eps to 1e-12" in conf["timm_load"]
    ours = load_exported(timm_path)
    assert ours.global_pool == "token" and ours.blocks[0].norm1.eps == 1e-12
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - ours(x)).abs().max() < 2e-6
