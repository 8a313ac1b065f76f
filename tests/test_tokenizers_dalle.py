"""DALL-E dVAE: official pickle format -> trusted conversion -> safetensors load -> same tokens."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

dall_e = pytest.importorskip("dall_e")

from beit.tokenizers import load_tokenizer  # noqa: E402
from beit.tokenizers.dalle import DalleTokenizer, convert_dalle_pickles, patch_upsample  # noqa: E402

TINY_ENC = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)
TINY_DEC = dict(n_init=16, n_hid=64, n_blk_per_group=1, vocab_size=512)


@pytest.fixture(scope="module")
def pickles(tmp_path_factory):
    d = tmp_path_factory.mktemp("dalle")
    torch.manual_seed(0)
    enc = dall_e.Encoder(**TINY_ENC)
    dec = dall_e.Decoder(**TINY_DEC)
    for m in dec.modules():  # mimic a pickle from old torch: Upsample without the newer attribute
        if isinstance(m, nn.Upsample):
            del m.recompute_scale_factor
    torch.save(enc, d / "encoder.pkl")  # official format: a whole pickled module
    torch.save(dec, d / "decoder.pkl")
    return d, enc, dec


def test_refuses_pickle_without_trust_flag(pickles, tmp_path):
    d, _, _ = pickles
    with pytest.raises(PermissionError, match="trust_pickle=True"):
        convert_dalle_pickles(d / "encoder.pkl", None, tmp_path)
    with pytest.raises(PermissionError, match="runs arbitrary code"):
        load_tokenizer("dalle", d / "encoder.pkl")
    assert not list(tmp_path.iterdir())


def test_no_weights_error_says_how_to_get_them():
    with pytest.raises(ValueError) as e:
        load_tokenizer("dalle")
    msg = str(e.value)
    assert "https://cdn.openai.com/dall-e/encoder.pkl" in msg and "convert_dalle" in msg and "trust_pickle" in msg


def test_convert_then_load_gives_identical_tokens(pickles, tmp_path):
    d, enc, dec = pickles
    stem = convert_dalle_pickles(d / "encoder.pkl", d / "decoder.pkl", tmp_path / "out", trust_pickle=True,
                                 input_size=32)
    assert stem.with_suffix(".safetensors").is_file()
    assert b"dall_e" not in stem.with_suffix(".safetensors").read_bytes()[:4096]
    tok = load_tokenizer("dalle", tmp_path / "out")
    assert isinstance(tok, DalleTokenizer) and tok.grid_size == (4, 4) and tok.vocab_size == 512
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = enc(dall_e.map_pixels(x)).argmax(1)
    assert torch.equal(tok.tokenize(x), expected)
    # Tokenize under autocast and in train mode: still float32, frozen, same answer.
    tok.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tok.tokenize(x), expected)
    assert not any(p.requires_grad for p in tok.parameters())

    # Decoder: the unpickled module is broken on current torch until patched; ours matches it.
    tokens = tok.tokenize(x)
    z = F.one_hot(tokens, 512).permute(0, 3, 1, 2).float()
    with pytest.raises(AttributeError, match="recompute_scale_factor"):
        dec(z)
    assert patch_upsample(dec) == 3
    with torch.no_grad():
        ref = dall_e.unmap_pixels(torch.sigmoid(dec(z)[:, :3]))
    rec = tok.decode(tokens)
    assert rec.shape == (3, 3, 32, 32) and torch.allclose(rec, ref, atol=1e-5)


def test_trusted_pickle_load_converts_into_cache(pickles, tmp_path):
    d, enc, _ = pickles
    tok = load_tokenizer("dalle", d / "encoder.pkl", trust_pickle=True, cache_dir=tmp_path, input_size=16)
    assert list(tmp_path.glob("dalle-*.safetensors")) and tok.grid_size == (2, 2)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(tok.tokenize(x), enc(dall_e.map_pixels(x)).argmax(1))


def test_convert_cli(pickles, tmp_path):
    d, _, _ = pickles
    cmd = [sys.executable, "-m", "beit.tokenizers.convert_dalle", "--encoder", str(d / "encoder.pkl"),
           "--out", str(tmp_path / "w"), "--input_size", "32"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "trust_pickle" in r.stderr
    r = subprocess.run(cmd + ["--trust_pickle", "true"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "w" / "dalle.json").is_file()


def test_download_caches_and_verifies_sha256(pickles, tmp_path):
    from beit.tokenizers.dalle import download, sha256_of

    d, _, _ = pickles
    url = (d / "encoder.pkl").as_uri()  # file:// goes through the same urllib code path as https://
    good = sha256_of(d / "encoder.pkl")
    path = download(url, tmp_path / "cache", sha256=good)
    assert path.read_bytes() == (d / "encoder.pkl").read_bytes()
    assert download(url, tmp_path / "cache") == path  # cached: no second download
    with pytest.raises(ValueError, match="sha256"):
        download(url, tmp_path / "cache", sha256="0" * 64)
    with pytest.raises(ConnectionError, match="could not download"):
        download((tmp_path / "missing.pkl").as_uri(), tmp_path / "cache2")
