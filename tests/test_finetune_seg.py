"""Semantic segmentation fine-tuning: labels, joint transforms, the UperNet model, sliding-window
mIoU, and an end-to-end run on image + seg.png shards written by the shard writer."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from beit.data.loading.decode import BadSample
from beit.data.pipelines.segmentation import IGNORE, SegEvalMap, SegTrainMap, decode_labels
from beit.data.sample_sets import load_photos
from beit.data.storage.shard_writer import Item, WriteOptions, write_shards
from beit.engines.seg import iou_scores, slide_logits, window_starts
from beit.export.segmentation import load_seg_model
from beit.finetune import FinetuneConfig, run_finetune
from beit.modeling.segmenter import BeitSegmenter, SegLoss, feature_blocks, seg_layer_decay_groups

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
TINY_CFG = {("image_size" if k == "img_size" else k): v for k, v in TINY.items()}  # the config spells it image_size


def png(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def labels_of(img: Image.Image) -> np.ndarray:
    """ADE-style annotation that follows the picture: 1 + grey level quartile, 0 ('other') on a border."""
    grey = np.asarray(img.convert("L"), dtype=np.int64)
    lab = 1 + np.clip(grey // 64, 0, 3)
    lab[:2, :] = 0
    return lab.astype(np.uint8)


@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory):
    return write_seg_shards(tmp_path_factory.mktemp("seg"))


def write_seg_shards(root):
    """80 training and 16 held-out (image, seg.png) pairs cut from the sample photos, as shards
    under ``root/train`` (16 per shard) and ``root/val`` (8 per shard)."""
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(a) for _, a in sorted(load_photos().items())]
    items = []
    for i in range(96):
        p = photos[i % len(photos)]
        w, h = 56 + int(rng.integers(0, 24)), 40 + int(rng.integers(0, 16))
        x, y = int(rng.integers(0, p.size[0] - 2 * w)), int(rng.integers(0, p.size[1] - 2 * h))
        img = p.crop((x, y, x + 2 * w, y + 2 * h)).resize((w, h), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        items.append(Item(key=f"s{i:04d}", image=buf.getvalue(), ext="jpg", seg=png(labels_of(img))))
    opts = WriteOptions(max_samples=16, validate="none")
    write_shards(items[:80], root / "train", prefix="train", opts=opts, progress=False)
    write_shards(items[80:], root / "val", prefix="val", opts=WriteOptions(max_samples=8, validate="none"),
                 progress=False)
    return root


def test_labels_reduce_zero_and_refuse_out_of_range():
    lab = np.array([[0, 1, 2], [3, 255, 4]], dtype=np.uint8)
    out = decode_labels({"seg.png": png(lab)}, num_classes=4, reduce_zero_label=True)
    assert out.tolist() == [[IGNORE, 0, 1], [2, IGNORE, 3]]
    assert decode_labels({"seg.png": png(lab)}, 5, False)[0].tolist() == [0, 1, 2]
    with pytest.raises(BadSample, match="class id 4 >= num_classes 4"):
        decode_labels({"seg.png": png(lab)}, 4, False)
    with pytest.raises(BadSample):
        decode_labels({"seg.png": b"not a png"}, 4, True)
    with pytest.raises(BadSample, match="no seg.png"):
        decode_labels({}, 4, True)


def test_train_and_eval_maps_keep_image_and_labels_aligned():
    img = Image.fromarray(np.repeat(np.linspace(0, 255, 60, dtype=np.uint8)[None, :, None], 40, 0).repeat(3, 2))
    sample = {"seg.png": png(labels_of(img))}
    tm = SegTrainMap(4, 32, scale=(0.5, 2.0))
    tm.jitter = lambda x: x  # compare colours directly
    for seed in range(6):
        torch.manual_seed(seed)
        import random
        random.seed(seed)
        out = tm(img, sample)
        x, y = out["image"], out["label"]
        assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.long
        grey = (x[0] * 0.229 + 0.485) * 255  # the red channel = the grey ramp
        lab = y[y != IGNORE]
        assert set(lab.unique().tolist()) <= {0, 1, 2, 3}
        # a pixel's label is its own grey quartile (to interpolation blur at class edges)
        want = torch.clamp(grey.round().long() // 64, 0, 3)
        agree = (want[y != IGNORE] == lab).float().mean()
        assert agree > 0.85, (seed, float(agree))
    ev = SegEvalMap(4, 32)(img, sample)
    assert ev["image"].shape[1] == 32 and ev["label"].shape == (40, 60)


def test_model_shapes_layer_decay_and_sliding_window():
    assert feature_blocks(12) == [3, 5, 7, 11] and feature_blocks(24) == [7, 11, 15, 23]
    m = BeitSegmenter(5, channels=16, aux_channels=8, drop_path_rate=0.0, **TINY)
    x = torch.randn(2, 3, 32, 32)
    main, aux = m.train()(x)
    assert main.shape == aux.shape == (2, 5, 32, 32)
    SegLoss()((main, aux), torch.randint(0, 5, (2, 32, 32))).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []  # no unused parameters (DDP)
    m.eval()
    assert m(x).shape == (2, 5, 32, 32)
    groups = seg_layer_decay_groups(m, 0.05, 0.5)
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters())
    scales = {round(g["lr_scale"], 6) for g in groups}
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.5 ** 5)
    assert window_starts(32, 32, 21) == [0] and window_starts(70, 32, 21) == [0, 21, 38]
    img = torch.randn(3, 40, 70)
    with torch.no_grad():
        slid = slide_logits(m, img, 32, 21, 5)
        assert slid.shape == (5, 40, 70)
        one = slide_logits(m, img[:, :32, :32], 32, 21, 5)
        assert torch.allclose(one, m(img[None, :, :32, :32])[0], atol=1e-5)


def test_iou_scores():
    cm = torch.tensor([[8, 2, 0], [1, 9, 0], [0, 0, 0]])
    s = iou_scores(cm)
    assert s["per_class_iou"][0] == pytest.approx(100 * 8 / 11, abs=0.01)
    assert s["per_class_iou"][2] is None  # absent everywhere: left out of the mean
    assert s["mIoU"] == pytest.approx(100 * (8 / 11 + 9 / 12) / 2)
    assert s["aAcc"] == pytest.approx(85.0)


def seg_cfg(root, out, **kw):
    base = dict(task="segmentation", train_shards=str(root / "train" / "train-*.tar"),
                val_shards=str(root / "val" / "val-*.tar"), num_classes=4, seg_channels=16, epochs=2,
                batch_size=8, batches_per_epoch=4, num_workers=0, lr=2e-3, warmup_epochs=0.5, layer_decay=0.9,
                report_to="none", log_every=1, drop_path=0.0, **TINY_CFG)
    base.update(kw)
    return FinetuneConfig(output_dir=str(out), **base)


def test_segmentation_end_to_end_export_and_resume(seg_shards, tmp_path):
    from beit.modeling.mim import create_pretrain_model
    pre = create_pretrain_model(None, vocab_size=16, **TINY)
    init = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in pre.state_dict().items()}, str(init))
    out = tmp_path / "run"
    res = run_finetune(seg_cfg(seg_shards, out, init=str(init)))
    final = json.loads((out / "final.json").read_text())
    assert final["samples"] == 16 and final["bad_samples"] == 0  # every held-out image, once
    assert 0 <= final["mIoU"] <= 100 and 0 <= final["aAcc"] <= 100 and len(final["per_class_iou"]) == 4
    cm = np.array(json.loads((out / "confusion.json").read_text()))
    assert cm.shape == (4, 4) and abs(100 * np.trace(cm) / cm.sum() - final["aAcc"]) < 1e-6
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r]
    assert len(losses) == 8 and all(np.isfinite(losses))
    # the export rebuilds the trained model: the same tensors as the last checkpoint's weights
    from safetensors.torch import load_file
    model = load_seg_model(out / "model.safetensors")
    assert json.loads((out / "model.json").read_text())["model_kwargs"]["num_classes"] == 4
    trained = load_file(str(sorted((out / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    assert trained.keys() == model.state_dict().keys()
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)
    # resume from the epoch-1 checkpoint ends where the uninterrupted run ended
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    shutil.rmtree(ckpts[-1])
    res2 = run_finetune(seg_cfg(seg_shards, out, init=str(init)))
    assert res2["mIoU"] == pytest.approx(res["mIoU"], abs=1e-6) and res2["aAcc"] == pytest.approx(res["aAcc"])


def test_segmentation_learns_the_grey_quartiles(seg_shards, tmp_path):
    """Labels follow the picture's grey level: a short run must beat always predicting one class."""
    res = run_finetune(seg_cfg(seg_shards, tmp_path / "learn", epochs=6, batches_per_epoch=10, lr=3e-3))
    cm = np.array(res["confusion"])
    majority = 100 * cm.sum(1).max() / cm.sum()
    assert res["aAcc"] > majority + 10, (res["aAcc"], majority)


@pytest.mark.parametrize("kw,msg", [(dict(num_classes=0), "needs --num_classes"),
                                    (dict(batch_size=1), "batch_size >= 2"),
                                    (dict(model="resnet18"), "fine-tunes a BEiT encoder")])
def test_segmentation_config_errors(seg_shards, tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        seg_cfg(seg_shards, tmp_path / "x", **kw).validate()
