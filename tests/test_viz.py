"""`beit viz` on short real runs: every picture is a valid PNG of the expected size with real content,
attention recomputed from qkv matches the block's own output, decoders give reconstructions."""
import re

import pytest
import torch
from test_pretrain import assets, run, tiny_cfg  # noqa: F401  (assets is a fixture: short real runs)
from viz_testutil import check_png

from beit.options.viz import VizConfig
from beit.viz import figures
from beit.viz.main import make_report


@pytest.fixture(scope="module")
def pretrain_run(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("viz_pre") / "run"
    run(tiny_cfg(assets, out, total_steps=4, checkpoint_every=2, eval_batches=1))
    return out


def test_pretrain_pictures_and_report(pretrain_run):
    res = make_report(VizConfig(run_dir=str(pretrain_run), device="cpu", num_images=3))
    pics = res["pictures"]
    assert set(pics) == {"Masks", "Tokens", "Reconstruction", "Attention", "Curves"}
    check_png(pics["Masks"], figures.figure_px(1, 3))
    check_png(pics["Tokens"], figures.figure_px(3, 4))
    check_png(pics["Reconstruction"], figures.figure_px(3, 4))
    check_png(pics["Attention"], figures.figure_px(3, 1 + 2 * 2))   # 2 blocks: CLS and patch columns
    from beit.viz.curves import curves_px
    check_png(pics["Curves"], curves_px())
    html = (pretrain_run / "index.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", html)
    assert len(srcs) == 5 and all(not s.startswith(("/", "http")) and (pretrain_run / s).is_file() for s in srcs)
    assert "checkpoint step 4" in html and "embed_dim: 32" in html and "http" not in html.lower()
    # a later call with another checkpoint and blocks rewrites the report
    res2 = make_report(VizConfig(run_dir=str(pretrain_run), checkpoint="2", device="cpu", num_images=2,
                                 blocks="2", patch="0,7"))
    check_png(res2["pictures"]["Attention"], figures.figure_px(2, 3))
    assert "checkpoint step 2" in (pretrain_run / "index.html").read_text()


@pytest.mark.parametrize("kw, msg", [(dict(checkpoint="5"), "no complete checkpoint at step 5"),
                                     (dict(checkpoint="x.pth"), "pickled"),
                                     (dict(tokenizer_path="/nowhere/kmeans"), "tokenizer")])
def test_bad_choices_are_clear_errors(pretrain_run, tmp_path, kw, msg):
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        make_report(VizConfig(run_dir=str(pretrain_run), device="cpu", out_dir=str(tmp_path), **kw))


def test_block_and_patch_choices():
    from beit.viz.attention_maps import parse_blocks, parse_patch
    assert parse_blocks("", 12) == [0, 6, 11] and parse_blocks("1,12", 12) == [0, 11] and parse_blocks("", 1) == [0]
    assert parse_patch("", (8, 8)) == (4, 4) and parse_patch("0,7", (8, 8)) == (0, 7)
    for bad in ("0", "13", "a"):
        with pytest.raises(ValueError, match="blocks"):
            parse_blocks(bad, 12)
    with pytest.raises(ValueError, match="8x8"):
        parse_patch("9,9", (8, 8))


def test_cli_positional_run_dir_and_not_a_run(pretrain_run, tmp_path, capsys):
    from beit.cli import main
    assert main(["viz", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["viz", str(pretrain_run), "--num_images", "1", "--device", "cpu"]) == 0
    assert "report: " in capsys.readouterr().out


def test_recomputed_attention_reproduces_the_block():
    """P = softmax(q k^T scale + bias) recomputed from qkv: P @ v through proj must equal timm's fused output."""
    from beit.modeling.mim import create_pretrain_model
    from beit.viz.attention import AttentionRecorder, attention_weights
    m = create_pretrain_model(None, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, vocab_size=16).eval()
    with torch.no_grad():
        m.rel_pos_bias.relative_position_bias_table.normal_(0, 1.0)  # a bias that matters
        x = torch.randn(2, 17, 32)
        bias = m.rel_pos_bias()
        attn = m.blocks[1].attn
        p = attention_weights(attn, x, bias)
        qkv = torch.nn.functional.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        v = qkv.reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)[2]
        manual = attn.proj((p @ v).transpose(1, 2).reshape(2, 17, 32))
        torch.testing.assert_close(manual, attn(x, shared_rel_pos_bias=bias), rtol=1e-4, atol=1e-5)
        assert torch.allclose(p.sum(-1), torch.ones(2, 4, 17))
        imgs = torch.randn(2, 3, 32, 32)
        before = m.forward_features(imgs)
        with AttentionRecorder(m, [0, 1]) as rec:
            after = m.forward_features(imgs)
        assert torch.equal(before, after) and rec.maps[1].shape == (2, 17, 17)


def _photos(size):
    from beit.tokenizers.images import sample_photo_crops
    return sample_photo_crops(2, size, seed=0)


def test_reconstruction_with_every_decoder(tmp_path):
    """k-means (centroids), the trained-dVAE architecture and DALL-E's decoder (from an old-torch pickle,
    whose Upsample modules need the patch) all draw the picture; VQ-KD says it cannot."""
    import dall_e
    from torch import nn

    from beit.tokenizers.dalle import tokenizer_from_modules
    from beit.tokenizers.dvae import DVAETokenizer
    from beit.tokenizers.kmeans import KMeansTokenizer
    from beit.tokenizers.vqkd import VQKDTokenizer
    from beit.viz.reconstruction import cannot_decode, draw_reconstruction

    enc = dall_e.Encoder(n_hid=32, n_blk_per_group=1, vocab_size=64)
    dec = dall_e.Decoder(n_init=16, n_hid=32, n_blk_per_group=1, vocab_size=64)
    for mod in dec.modules():
        if isinstance(mod, nn.Upsample):
            del mod.recompute_scale_factor  # as unpickled from the official decoder.pkl
    toks = {"kmeans": KMeansTokenizer.fit([_photos(32)], epochs=1, init_patches=64, progress=False, vocab_size=16,
                                          patch_size=4, input_size=32),
            "dvae": DVAETokenizer(vocab_size=32, hidden=16, downsample=4, input_size=32),
            "dalle": tokenizer_from_modules(enc, dec, input_size=32)}
    g = torch.Generator().manual_seed(0)
    for name, tok in toks.items():
        assert cannot_decode(tok) is None
        images = _photos(tok.input_size)
        target = tok.tokenize(images)
        predicted = torch.randint(tok.vocab_size, target.shape, generator=g)
        mask = torch.rand(target.shape, generator=g) < 0.4
        check_png(draw_reconstruction(tok, images, target, predicted, mask, tmp_path / f"{name}.png"),
                  figures.figure_px(2, 4))
    vqkd = VQKDTokenizer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, n_code=16, code_dim=8)
    assert "no decoder" in cannot_decode(vqkd)
    with pytest.raises(NotImplementedError):
        vqkd.decode(torch.zeros(1, 4, 4, dtype=torch.long))


def test_masks_are_drawn_where_the_mask_is(tmp_path):
    from beit.viz.masks import MASK_RGB, masked_overlay
    img = torch.zeros(16, 16, 3).numpy() + 0.5
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[1, 2] = True
    out = masked_overlay(img, m.numpy())
    assert (out[:4] == 0.5).all() and (abs(out[4:8, 8:12] - 0.5) > 0.05).any(axis=-1).all()
    assert (out[4, 8] == MASK_RGB).all()
