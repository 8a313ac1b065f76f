"""Every tokenizer kind loads through load_tokenizer and behaves the same; the report catches bad ones."""
import json

import pytest
import torch

from beit.tokenizers import TOKENIZER_KINDS, VisualTokenizer, load_tokenizer
from beit.tokenizers.dvae import DVAETokenizer
from beit.tokenizers.images import sample_photo_crops
from beit.tokenizers.kmeans import KMeansTokenizer
from beit.tokenizers.metrics import measure
from beit.tokenizers.report import ReportConfig, format_table, run_report
from beit.tokenizers.vqkd import VQKDTokenizer

S = 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny saved tokenizer of each kind: kind -> path."""
    d = tmp_path_factory.mktemp("toks")
    torch.manual_seed(0)
    paths = {}
    km = KMeansTokenizer.fit([sample_photo_crops(48, S, seed=0)], vocab_size=32, patch_size=8, input_size=S,
                             epochs=1, progress=False, init_patches=800)
    paths["kmeans"] = km.save(d / "kmeans")
    dall_e = pytest.importorskip("dall_e")
    from beit.tokenizers.dalle import tokenizer_from_modules
    paths["dalle"] = tokenizer_from_modules(dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512),
                                            input_size=S).save(d / "dalle")
    paths["vqkd"] = VQKDTokenizer(img_size=S, patch_size=8, embed_dim=32, depth=1, num_heads=2, n_code=64,
                                  code_dim=8).save(d / "vqkd")
    paths["dvae"] = DVAETokenizer(vocab_size=32, hidden=16, downsample=8, input_size=S).save(d / "dvae")
    assert set(paths) == set(TOKENIZER_KINDS)
    return paths


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_same_interface_for_every_kind(saved, kind):
    tok = load_tokenizer(kind, saved[kind])
    assert isinstance(tok, VisualTokenizer) and tok.kind == kind
    assert tok.input_size == S and tok.grid_size == (4, 4) and isinstance(tok.interpolation, str)
    x = torch.rand(3, 3, S, S)
    tokens = tok.tokenize(x)
    assert tokens.dtype == torch.long and tokens.shape == (3, 4, 4)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < tok.vocab_size
    tok.train()
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tok.tokenize(x), tokens)
    assert not tok.tokenize(x.requires_grad_()).requires_grad
    with pytest.raises(ValueError, match="expects images of shape"):
        tok.tokenize(torch.rand(1, 3, S + 8, S + 8))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        tok.tokenize((torch.rand(1, 3, S, S) - 0.5) / 0.2)
    if tok.has_decoder:
        assert tok.decode(tokens).shape == (3, 3, S, S)


def test_unknown_kind_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'foo'"):
        load_tokenizer("foo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer("dvae", tmp_path / "nothing")


class _NoiseTokenizer(VisualTokenizer):
    """Uses every code but ignores the image: the report must expose it (stability ~ 1/vocab)."""
    kind = "noise"

    def __init__(self):
        super().__init__()
        self.vocab_size, self.input_size, self.grid_size = 8, S, (4, 4)  # few codes: MI estimate well sampled

    def _tokenize(self, images):
        return torch.randint(self.vocab_size, (images.shape[0], 4, 4))


class _ConstantTokenizer(_NoiseTokenizer):
    """Perfectly "stable" and useless: one token everywhere."""

    def _tokenize(self, images):
        return torch.zeros(images.shape[0], 4, 4, dtype=torch.long)


def test_measures_fail_bad_tokenizers(saved):
    x = sample_photo_crops(32, S, seed=3)
    good = measure(load_tokenizer("kmeans", saved["kmeans"]), x.split(16))
    noise = measure(_NoiseTokenizer(), x.split(16))
    const = measure(_ConstantTokenizer(), x.split(16))
    assert noise["usage"] > 0.9 and noise["shift_stability"] < 0.25 and noise["flip_stability"] < 0.25  # chance: 1/8
    assert good["shift_stability"] > 3 * noise["shift_stability"]
    # Agreement alone is fooled by a constant tokenizer; the information kept under the shift is not.
    assert const["shift_stability"] == 1.0 and const["shift_info_bits"] == 0.0 and const["usage"] == 1 / 8
    assert good["shift_info_bits"] > 1.0 and noise["shift_info_bits"] < 0.2


def test_report_writes_png_and_json(saved, tmp_path):
    from beit.data.sample_sets import build_sample_shards
    build_sample_shards(tmp_path / "photos", "photos")
    cfg = ReportConfig(tokenizer="kmeans", tokenizer_path=str(saved["kmeans"]),
                       val_shards=str(tmp_path / "photos/val-*.tar"),
                       out_dir=str(tmp_path / "rep"), max_images=64, num_show=3,
                       compare=[f"vq=vqkd:{saved['vqkd']}", f"dv=dvae:{saved['dvae']}"])
    res = run_report(cfg)
    # other tokenizers on the same 64 held-out images, one column each
    assert list(res["compare"]) == ["vq", "dv"] and res["compare"]["vq"]["vocab_size"] == 64
    assert all(m["num_images"] == 64 and 0 < m["usage"] <= 1 for m in res["compare"].values())
    header, vocab = format_table(res).splitlines()[:2]
    assert header.split() == ["metric", "trained", "random_weights", "vq", "dv"] and vocab.split()[1:] == \
        ["32.0000", "32.0000", "64.0000", "32.0000"]
    with pytest.raises(ValueError, match="NAME=KIND:PATH"):
        ReportConfig(val_shards="x", compare=["vqkd:path"]).validate()
    png = tmp_path / "rep" / "tokenizer_report.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    saved_json = json.loads((tmp_path / "rep" / "tokenizer_report.json").read_text())
    assert saved_json["trained"]["num_images"] == 64 and "psnr" in saved_json["trained"]
    assert res["trained"]["usage"] > res["random_weights"]["usage"] or \
        res["trained"]["perplexity"] > res["random_weights"]["perplexity"]


@pytest.mark.parametrize("module,argv", [("train", ["kmeans", "--help"]), ("train", ["dvae", "--help"]),
                                         ("train", ["vqkd", "--help"]),
                                         ("report", ["--help"]), ("cache", ["--help"]),
                                         ("convert_dalle", ["--help"])])
def test_every_cli_has_help(module, argv, capsys):
    import importlib
    mod = importlib.import_module(f"beit.tokenizers.{module}")
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    assert e.value.code == 0 and "--" in capsys.readouterr().out
