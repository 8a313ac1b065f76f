"""Tokenizer files written by the reference code (unilm beit2 VQ-KD, OpenAI dall_e) give the reference's tokens.

The fixtures and the tokens in them were produced by ``tests/fixtures/make_reference_fixtures.py``
running ``VQKD.get_codebook_indices`` / ``dall_e.Encoder`` themselves; nothing here recomputes them.
"""
import pytest
import torch
from reference_fixtures import case, checkpoint, max_abs_diff

from beit.tokenizers import load_tokenizer


@pytest.mark.parametrize("name,process_type", [("unilm_vqkd", "default"), ("unilm_vqkd_training", "imagenet_norm")])
def test_vqkd_tokens_equal_unilm(name, process_type, tmp_path):
    _, meta, io = case(name)
    tok = load_tokenizer("vqkd", checkpoint(name), num_heads=meta["num_heads"])
    assert tok.process_type == process_type == meta["process_type"]   # the training args' process_type is honoured
    got = tok.tokenize(io["images"]).flatten(1)
    ref = io["tokens"]
    equal = (got == ref).float().mean().item()
    assert ref.numel() >= 1000 and len(ref.unique()) > 16
    assert equal >= 0.999, f"{equal:.4%} of {ref.numel()} tokens equal unilm's"
    tok.save(tmp_path / "mine")   # our own format keeps the pre-processing
    assert torch.equal(load_tokenizer("vqkd", tmp_path / "mine").tokenize(io["images"]).flatten(1), got)


def test_vqkd_imagenet_normalisation_would_be_wrong():
    """The bug this guards against: ImageNet mean/std on a 'default' tokenizer changes most tokens."""
    _, meta, io = case("unilm_vqkd")
    tok = load_tokenizer("vqkd", checkpoint("unilm_vqkd"), num_heads=meta["num_heads"], process_type="imagenet_norm")
    assert (tok.tokenize(io["images"]).flatten(1) == io["tokens"]).float().mean() < 0.9


def test_dalle_pickles_give_reference_tokens_and_pixels(tmp_path):
    pytest.importorskip("dall_e")
    d, _, io = case("dalle")
    with pytest.raises(PermissionError, match="trust_pickle"):
        load_tokenizer("dalle", d / "encoder.pkl", cache_dir=tmp_path)
    tok = load_tokenizer("dalle", d / "encoder.pkl", decoder=d / "decoder.pkl", trust_pickle=True,
                         cache_dir=tmp_path, input_size=32)
    got = tok.tokenize(io["images"])
    assert (got == io["tokens"]).float().mean() >= 0.999
    recon = tok.decode(io["tokens"])
    assert max_abs_diff(recon, io["recon"]) < 1e-4
