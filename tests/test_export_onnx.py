"""ONNX export of fine-tuned classifiers, checked with onnxruntime on the held-out digits."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from beit.export.commands import onnx_main as main
from beit.export.onnx_export import compare, export_onnx, onnx_session, preprocess, shard_batches

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def finetuned(digits, tmp_path_factory):
    """A BEiT classifier fine-tuned (briefly, for real) on the digits: its model.safetensors + JSON."""
    from beit.finetune import FinetuneConfig, run_finetune
    out = tmp_path_factory.mktemp("ft")
    cfg = FinetuneConfig(train_shards=str(digits / "train-*.tar"), val_shards=str(digits / "test-*.tar"),
                         output_dir=str(out), image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                         epochs=1, batches_per_epoch=3, batch_size=16, num_workers=0, lr=1e-3, warmup_epochs=0.5,
                         auto_augment="", reprob=0.0, mixup=0.0, cutmix=0.0, hflip=0.0, crop_pct=0.875,
                         report_to="none")
    run_finetune(cfg)
    return out / "model.safetensors"


def test_preprocess_json_reproduces_the_finetune_eval_transform(finetuned, digits, tmp_path):
    from beit.checkpoints.checkpointing import load_weights
    from beit.data.pipelines.labelled import build_transforms
    from beit.data.storage.shard_format import iter_tar_samples
    from beit.export.onnx_export import preprocess_spec
    from beit.options.finetune import FinetuneConfig
    _, config = load_weights(finetuned)
    spec = preprocess_spec(config)
    assert spec["resize_shorter_side"] == 36 and spec["center_crop"] == [32, 32]       # 32 / 0.875
    assert spec["class_names"] == [str(i) for i in range(10)] and spec["interpolation"] == "bicubic"
    timm_eval = build_transforms(FinetuneConfig(image_size=32, crop_pct=0.875), is_training=False)
    with open(sorted(digits.glob("test-*.tar"))[0], "rb") as f:
        imgs = [Image.open(io.BytesIO(s["png"])) for _, s in zip(range(20), iter_tar_samples(f))]
    imgs.append(imgs[0].convert("RGB").resize((50, 37)))                                  # non-square, both sides
    for img in imgs:
        np.testing.assert_allclose(preprocess(img, spec), timm_eval(img.convert("RGB")).numpy(), atol=1e-6)


def test_finetuned_beit_onnx_matches_pytorch_on_held_out_digits(finetuned, digits, tmp_path):
    out = tmp_path / "onnx" / "model.onnx"
    summary = main(["--model", str(finetuned), "--out", str(out), "--val_shards", str(digits / "test-*.tar")])
    assert summary["images"] == 360 and summary["max_abs_logit_diff"] < 1e-3
    spec = json.loads((tmp_path / "onnx" / "model.preprocess.json").read_text())
    assert spec["check"]["images"] == 360 and spec["onnx"] == "model.onnx"
    final = json.loads((finetuned.parent / "final.json").read_text())
    assert summary["onnx_top1_accuracy"] == pytest.approx(final["top1"], abs=1e-6)   # same top-1 as PyTorch's eval
    # the file alone (no torch model) answers a batch of 1 and of 5 (dynamic batch)
    sess = onnx_session(out)
    batches, _ = shard_batches(spec, str(digits / "test-*.tar"), 5)
    assert sess.run(None, {"images": batches[0][:1]})[0].shape == (1, 10)
    assert sess.run(None, {"images": batches[0]})[0].shape == (5, 10)


def test_swin_classifier_onnx_matches_pytorch(finetuned, digits, tmp_path):
    from beit.modeling.classifier import build_timm_model
    model = build_timm_model("swin_tiny_patch4_window7_224", 10, img_size=32, model_kwargs=dict(
        patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=4)).eval()
    config = {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
              "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 10, "architecture": "swin"}
    path, spec_path = export_onnx(model, config, tmp_path / "swin.onnx")
    batches, _ = shard_batches(json.loads(spec_path.read_text()), str(digits / "test-*.tar"), 60)
    res = compare(model, onnx_session(path), batches[:3])
    assert res["images"] == 180 and res["same_top1"] == 180 and res["max_abs_logit_diff"] < 1e-3


def test_bad_inputs_are_clear_errors(finetuned, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--model", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x.onnx")])
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(finetuned.read_bytes())
    with pytest.raises(FileNotFoundError, match="config"):
        main(["--model", str(lonely), "--out", str(tmp_path / "x.onnx")])
