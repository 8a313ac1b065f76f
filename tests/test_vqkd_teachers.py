"""VQ-KD teachers: each format written by its own library (tiny random configs, no download) gives the
library's own features on the tokenizer's grid with the teacher's own preprocessing; grid mismatches are
resampled or refused; bad paths get a message."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from beit.checkpoints.hf_import import transformers_names
from beit.tokenizers.teachers import OPENAI_CLIP, load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def normalised(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def grid(t, side=4):
    return t.reshape(t.shape[0], side, side, -1)


def save_processor(folder, mean=MEAN, std=STD):
    (processor,) = transformers_names("CLIPImageProcessor")
    processor(image_mean=list(mean), image_std=list(std), size={"shortest_edge": 32},
              crop_size={"height": 32, "width": 32}).save_pretrained(folder)


@pytest.mark.parametrize("projection", [True, False])
def test_hf_clip_vision_folder(tmp_path, projection):
    names = ("CLIPVisionConfig", "CLIPVisionModelWithProjection" if projection else "CLIPVisionModel")
    cfg_cls, cls = transformers_names(*names)
    model = cls(cfg_cls(**VISION, projection_dim=16)).eval()
    model.save_pretrained(tmp_path)
    save_processor(tmp_path)
    teacher = load_teacher("auto", tmp_path, grid=(4, 4))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=normalised(x, MEAN, STD))
        vision = getattr(model, "vision_model", model)
        if projection:  # last_hidden_state is before post_layernorm: its CLS token gives transformers' image_embeds
            assert torch.allclose(model.visual_projection(vision.post_layernorm(out.last_hidden_state[:, 0])),
                                  out.image_embeds, atol=1e-5)
        want = vision.post_layernorm(out.last_hidden_state[:, 1:])  # unilm's CLIP target
        want = model.visual_projection(want) if projection else want
    assert teacher.dim == (16 if projection else 32) and teacher.input_size == 32
    assert torch.allclose(teacher(x), grid(want), atol=1e-5)


def test_hf_clip_model_folder_defaults_to_clips_mean_and_std(tmp_path):
    cfg_cls, cls = transformers_names("CLIPConfig", "CLIPModel")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    model = cls(cfg_cls(vision_config=VISION, text_config=text, projection_dim=16)).eval()
    model.save_pretrained(tmp_path)  # no preprocessor_config.json: CLIP's own mean/std
    teacher = load_teacher("hf", tmp_path, grid=(4, 4))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        h = model.vision_model(pixel_values=normalised(x, *OPENAI_CLIP)).last_hidden_state[:, 1:]
        want = model.visual_projection(model.vision_model.post_layernorm(h))
    assert torch.allclose(teacher(x), grid(want), atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "dinov2", "dinov2_with_registers"])
def test_hf_dino_folders(tmp_path, family):
    cfg_name, cls_name, extra = {"vit": ("ViTConfig", "ViTModel", {}),
                                 "dinov2": ("Dinov2Config", "Dinov2Model", {}),
                                 "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                                                           {"num_register_tokens": 2})}[family]
    cfg_cls, cls = transformers_names(cfg_name, cls_name)
    model = (cls(cfg_cls(**VISION, **extra), add_pooling_layer=False) if family == "vit" else
             cls(cfg_cls(**VISION, **extra))).eval()
    model.save_pretrained(tmp_path)
    save_processor(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        h = model(pixel_values=normalised(x, MEAN, STD)).last_hidden_state  # the library's normed output
    teacher = load_teacher("auto", tmp_path, grid=(4, 4))
    assert torch.allclose(teacher(x), grid(h[:, 1 + extra.get("num_register_tokens", 0):]), atol=1e-5)
    # another token grid: these teachers take any size, so they see grid x patch px and need no resampling
    six = load_teacher("auto", tmp_path, grid=(6, 6))
    assert six.input_size == 48 and six.native_grid == (6, 6) and six(x).shape == (2, 6, 6, 32)


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_timm_name_plus_checkpoint(tmp_path, suffix):
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kw).eval()
    path = tmp_path / f"vit.{suffix}"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path)) if suffix == "safetensors" else torch.save(sd, path)
    teacher = load_teacher("auto", path, grid=(4, 4), model="vit_tiny_patch16_224", model_kwargs=kw)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model.forward_features(normalised(x, *teacher_mean_std(model)))[:, model.num_prefix_tokens:]
    assert torch.allclose(teacher(x), grid(want), atol=1e-5)
    # a 4x4 teacher for an 8x8 tokenizer grid: resampled (bilinear), or refused with what to do
    eight = load_teacher("timm", path, grid=(8, 8), model="vit_tiny_patch16_224", model_kwargs=kw)
    assert eight.native_grid == (4, 4) and "resampled from 4x4" in eight.describe()
    expect = F.interpolate(grid(want).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear", antialias=True)
    assert torch.allclose(eight(x), expect.permute(0, 2, 3, 1), atol=1e-5)
    with pytest.raises(ValueError, match="4x4 feature map.*grid is 8x8.*--teacher_input_size"):
        load_teacher("timm", path, grid=(8, 8), model="vit_tiny_patch16_224", model_kwargs=kw, resample=False)


def teacher_mean_std(model):
    return model.pretrained_cfg["mean"], model.pretrained_cfg["std"]


def test_timm_feature_map_models_nchw_and_nhwc(tmp_path):
    """A CNN (NCHW maps) and a Swin (NHWC maps) come out as [B, h, w, C] alike."""
    x = torch.rand(1, 3, 64, 64)
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    save_file(cnn.state_dict(), str(tmp_path / "r.safetensors"))
    t = load_teacher("timm", tmp_path / "r.safetensors", grid=(2, 2), model="resnet18", input_size=64)
    with torch.no_grad():
        want = cnn.forward_features(normalised(x, *teacher_mean_std(cnn)))
    assert torch.allclose(t(x), want.permute(0, 2, 3, 1), atol=1e-5)
    kw = dict(img_size=64, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, **kw).eval()
    save_file(swin.state_dict(), str(tmp_path / "s.safetensors"))
    t = load_teacher("timm", tmp_path / "s.safetensors", grid=(8, 8), model="swin_tiny_patch4_window7_224",
                     model_kwargs=kw)
    with torch.no_grad():
        want = swin.forward_features(normalised(x, *teacher_mean_std(swin)))
    assert t.native_grid == (8, 8) and torch.allclose(t(x), want, atol=1e-5)


@pytest.mark.parametrize("arch, options", [
    ("beit", dict(embed_dim=32, depth=2, num_heads=2)),
    ("vit_tiny_patch16_224", dict(embed_dim=32, depth=2, num_heads=2)),
    ("swin_tiny_patch4_window7_224", dict(embed_dim=16, swin_patch_size=4, swin_depths=[1, 1], swin_heads=[1, 2],
                                          swin_window_size=4)),
])
def test_our_pretraining_run_folders(tmp_path, arch, options):
    """What `beit pretrain` writes (pretrained.safetensors + pretrained.json with the model and run options) for
    each registered backbone: the teacher rebuilds the model through the registry."""
    from beit.checkpoints.checkpointing import save_weights
    from beit.config import to_dict
    from beit.modeling.backbones import backbone_for
    from beit.options.pretrain import PretrainConfig
    cfg = PretrainConfig(arch=arch, image_size=32, patch_size=8, drop_path=0.0, **options)
    model = backbone_for(arch, pretraining=True).build_mim(cfg, 16).eval()
    save_weights(model.state_dict(), tmp_path / "pretrained.safetensors",
                 {"model": model.config, "pretrain_config": to_dict(cfg)})
    teacher = load_teacher("auto", tmp_path, grid=(4, 4))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model.forward_features(normalised(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    want = grid(want[:, 1:]) if want.ndim == 3 else want
    assert torch.allclose(teacher(x), want, atol=1e-5)


def test_our_finetune_run_folder(tmp_path):
    """The export a fine-tune run writes (model.safetensors + model.json): a timm BEiT, its fc_norm on the tokens."""
    from beit.export import export_model
    from beit.modeling.classifier import build_beit_classifier
    from beit.options.finetune import FinetuneConfig
    cfg = FinetuneConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                         mean=list(MEAN), std=list(STD))
    model = build_beit_classifier(3, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    export_model(model, tmp_path / "model.safetensors", cfg)
    teacher = load_teacher("run", tmp_path, grid=(4, 4))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model.fc_norm(model.forward_features(normalised(x, MEAN, STD))[:, 1:])
    assert torch.allclose(teacher(x), grid(want), atol=1e-5)


def test_bad_teachers_get_messages(tmp_path):
    with pytest.raises(ValueError, match="pass --teacher_path"):
        load_teacher("auto", "", grid=(4, 4))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher("auto", tmp_path / "nope", grid=(4, 4))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' model.*CLIP, DINO ViT, DINOv2"):
        load_teacher("auto", tmp_path / "bert", grid=(4, 4))
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="--teacher_model"):
        load_teacher("timm", tmp_path / "w.safetensors", grid=(4, 4))
    with pytest.raises(ValueError, match="cannot tell what kind of teacher"):
        load_teacher("auto", tmp_path / "w.safetensors", grid=(4, 4))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_teacher("run", tmp_path / "bert", grid=(4, 4))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "pooled.safetensors"))
    pooled = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="avg")
    with pytest.raises(ValueError, match="not a spatial map"):
        from beit.tokenizers.teachers import Teacher
        Teacher(pooled, name="pooled", input_size=32, mean=MEAN, std=STD, grid=(4, 4))
