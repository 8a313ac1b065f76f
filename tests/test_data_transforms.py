"""TwoViewTransform: shapes, ranges, shared crop, determinism, and correct draft decoding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from data_testutil import encode, photo
from PIL import Image

from beit.data.loading.decode import open_image
from beit.data.pipelines.transforms import (
    TwoViewTransform,
    draft_scale,
    encoder_input,
    pil_to_tensor,
    seed_everything,
    tokenizer_input,
)


def big_jpeg(size=(1600, 1200)) -> bytes:
    return encode(photo(42, size), "JPEG", quality=92)


def test_views_shapes_dtype_and_device_side_conversion():
    t = TwoViewTransform(image_size=64, tokenizer_size=32, color_jitter=0.0, hflip=0.0)
    enc, tok = t(photo(0, (100, 80)))
    assert enc.shape == (3, 64, 64) and tok.shape == (3, 32, 32)
    assert enc.dtype == tok.dtype == torch.uint8  # the loader ships uint8; the loop converts
    x, y = encoder_input(enc[None]), tokenizer_input(tok[None])
    assert x.dtype == y.dtype == torch.float32 and 0.0 <= y.min() and y.max() <= 1.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(x[0], (enc.float() / 255 - mean) / std, atol=1e-6)
    assert encoder_input(x) is x  # float input is already normalised
    # both views come from one box: downsampled encoder view ~ tokenizer view
    small = torch.nn.functional.avg_pool2d(enc[None].float() / 255, 2)[0]
    assert (small - y[0]).abs().mean() < 0.03


def test_torch_resize_matches_pil_filters():
    """The encoder view's bicubic resize (torch's uint8 kernels) equals PIL's to within rounding."""
    img = photo(4, (300, 220))
    t = TwoViewTransform(image_size=96, tokenizer_size=40, tokenizer_interpolation="bilinear",
                         scale=(0.3, 1.0), color_jitter=0.0, hflip=0.0)
    for seed in range(4):
        seed_everything(seed)
        enc, tok = t(img)
        seed_everything(seed)
        _, box = t.decode_box(img)
        for view, size, resample in ((enc, 96, Image.Resampling.BICUBIC), (tok, 40, Image.Resampling.BILINEAR)):
            ref = torch.from_numpy(np.array(img.resize((size, size), resample, box=box))).permute(2, 0, 1)
            d = (view.int() - ref.int()).abs()
            assert d.float().mean() < 0.1 and d.max() <= 6


def test_same_seed_same_views_and_flip_and_jitter_act():
    t = TwoViewTransform(image_size=32, tokenizer_size=16)
    img = photo(3, (90, 70))
    seed_everything(11)
    a = t(img)
    seed_everything(11)
    b = t(img)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    outs = []
    for s in range(8):
        seed_everything(s)
        outs.append(t(img)[1])
    assert len({tuple(o.flatten()[:20].tolist()) for o in outs}) == 8
    # flip with p=1 mirrors exactly what p=0 gives under the same seed
    tf = TwoViewTransform(image_size=32, tokenizer_size=16, hflip=1.0, color_jitter=0.0)
    tn = TwoViewTransform(image_size=32, tokenizer_size=16, hflip=0.0, color_jitter=0.0)
    seed_everything(5)
    f = tf(img)
    seed_everything(5)
    n = tn(img)
    assert torch.equal(f[0], n[0].flip(-1))


def test_draft_decodes_small_and_matches_full_decode():
    data = big_jpeg()
    t = TwoViewTransform(image_size=64, tokenizer_size=32, scale=(0.05, 0.1), color_jitter=0.0, hflip=0.0)
    full = TwoViewTransform(image_size=64, tokenizer_size=32, scale=(0.05, 0.1), color_jitter=0.0, hflip=0.0,
                            draft=False)
    drafted_sizes, diffs = [], []
    for s in range(6):
        seed_everything(s)
        img = open_image(data)[0]
        t.decode_box(img)
        drafted_sizes.append(img.size)
        seed_everything(s)
        a = t(open_image(data)[0])
        seed_everything(s)
        b = full(open_image(data)[0])
        diffs.append(max((a[0].float() - b[0].float()).abs().mean().item() / 255,
                         (a[1].float() - b[1].float()).abs().mean().item() / 255))
    # boxes of 5-10% of 1600x1200 (~310-440 px) decode at 1/4 (400x300) keeping >= 64 px
    assert all(sz[0] <= 400 for sz in drafted_sizes)
    assert max(diffs) < 0.02  # same region, only the decoder's downscaling differs


def test_draft_scale_rule_and_small_images():
    assert draft_scale(1000, 900, 224) == 4 and draft_scale(500, 375, 224) == 1 and draft_scale(300, 200, 64) == 2
    t = TwoViewTransform(image_size=48, tokenizer_size=24)
    enc, tok = t(open_image(encode(photo(1, (12, 10)), "JPEG"))[0])  # smaller than the crop: upscaled
    assert enc.shape == (3, 48, 48) and tok.shape == (3, 24, 24)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="interpolation"):
        TwoViewTransform(tokenizer_interpolation="sinc")
    with pytest.raises(ValueError, match="scale"):
        TwoViewTransform(scale=(0.5, 0.1))


def test_pil_to_tensor():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    t = pil_to_tensor(Image.fromarray(arr, "RGB"))
    assert t.shape == (3, 2, 3) and torch.allclose(t[:, 1, 2] * 255, torch.tensor([15.0, 16.0, 17.0]))


def test_jitter_matches_torchvision_color_jitter():
    import torchvision.transforms.functional as F
    from torchvision.transforms import ColorJitter
    t = TwoViewTransform()
    view = photo(8, (64, 64))
    for seed in range(4):
        torch.manual_seed(seed)
        ours = np.asarray(t.jitter_views([view])[0], dtype=float)
        torch.manual_seed(seed)
        order, b, c, s, _ = ColorJitter.get_params(t.jitter.brightness, t.jitter.contrast, t.jitter.saturation, None)
        ref = view
        for fn in order.tolist():
            if fn < 3:
                ref = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation][fn](ref, [b, c, s][fn])
        assert np.abs(ours - np.asarray(ref, dtype=float)).max() <= 3  # rounding only


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_one_resize_serves_both_views_when_they_are_alike(hflip):
    """Same size and filter for both views (the small-data recipe: 32 px bicubic): one resize, two equal
    views, PIL's bicubic to within rounding (mirrored under a flip)."""
    img = photo(6, (120, 90))
    t = TwoViewTransform(image_size=32, tokenizer_size=32, tokenizer_interpolation="bicubic", scale=(0.5, 1.0),
                         color_jitter=0.0, hflip=hflip)
    for seed in range(3):
        seed_everything(seed)
        enc, tok = t(img)
        seed_everything(seed)
        _, box = t.decode_box(img)
        ref = torch.from_numpy(np.array(img.resize((32, 32), Image.Resampling.BICUBIC, box=box))).permute(2, 0, 1)
        if hflip:
            ref = ref.flip(-1)
        assert torch.equal(enc, tok) and enc.dtype == torch.uint8
        d = (enc.int() - ref.int()).abs()
        assert d.float().mean() < 0.1 and d.max() <= 6
