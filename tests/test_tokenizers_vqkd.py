"""VQ-KD (BEiT v2): load a state dict written in the official unilm key format; check the tokens
against an independent forward pass written here from those keys."""
import pytest
import torch
import torch.nn.functional as F

from beit.tokenizers import load_tokenizer
from beit.tokenizers.vqkd import VQKDTokenizer

D, DEPTH, HEADS, PATCH, IMG, NCODE, CDIM = 32, 2, 2, 8, 32, 64, 8


def official_state_dict(seed=0, gamma=True):
    """Keys as published by microsoft/unilm beit2 (modeling_vqkd + modeling_finetune VisionTransformer)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    n = (IMG // PATCH) ** 2
    sd = {"encoder.cls_token": r(1, 1, D), "encoder.pos_embed": r(1, n + 1, D),
          "encoder.patch_embed.proj.weight": r(D, 3, PATCH, PATCH), "encoder.patch_embed.proj.bias": r(D),
          "encoder.fc_norm.weight": 1 + r(D), "encoder.fc_norm.bias": r(D)}
    for i in range(DEPTH):
        b = f"encoder.blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.q_bias": r(D),
                   b + "attn.v_bias": r(D),
                   b + "attn.qkv.weight": r(3 * D, D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(4 * D, D),
                   b + "mlp.fc1.bias": r(4 * D), b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)})
        if gamma:
            sd.update({b + "gamma_1": 0.5 + r(D), b + "gamma_2": 0.5 + r(D)})
    sd.update({"encode_task_layer.0.weight": r(D, D), "encode_task_layer.0.bias": r(D),
               "encode_task_layer.2.weight": r(CDIM, D), "encode_task_layer.2.bias": r(CDIM),
               "quantize.embedding.weight": F.normalize(r(NCODE, CDIM), dim=-1),
               "quantize.embedding.cluster_size": torch.ones(NCODE), "quantize.embedding.embed_avg": r(NCODE, CDIM),
               "quantize.embedding.initted": torch.tensor([1.0]), "quantize.cluster_size": torch.ones(NCODE),
               "decoder.cls_token": r(1, 1, D), "decode_task_layer.0.weight": r(D, D)})
    return sd


def reference_tokens(sd, images):
    x = F.conv2d(images * 2 - 1, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["encoder.cls_token"].expand(len(x), -1, -1), x], 1) + sd["encoder.pos_embed"]
    for i in range(DEPTH):
        b = f"encoder.blocks.{i}."
        h = F.layer_norm(x, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros(D), sd[b + "attn.v_bias"]])
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], bias).chunk(3, -1)
        split = lambda t: t.view(t.shape[0], t.shape[1], HEADS, D // HEADS).transpose(1, 2)  # noqa: E731
        a = ((split(q) @ split(k).transpose(-1, -2)) * (D // HEADS) ** -0.5).softmax(-1) @ split(v)
        a = F.linear(a.transpose(1, 2).reshape(x.shape), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        x = x + sd.get(b + "gamma_1", 1.0) * a
        h = F.layer_norm(x, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + sd.get(b + "gamma_2", 1.0) * h
    t = F.layer_norm(x[:, 1:], (D,), sd["encoder.fc_norm.weight"], sd["encoder.fc_norm.bias"], eps=1e-6)
    t = F.linear(torch.tanh(F.linear(t, sd["encode_task_layer.0.weight"], sd["encode_task_layer.0.bias"])),
                 sd["encode_task_layer.2.weight"], sd["encode_task_layer.2.bias"])
    z = F.normalize(t, dim=-1)
    d = torch.cdist(z, sd["quantize.embedding.weight"][None].expand(len(z), -1, -1))
    return d.argmin(-1).view(len(images), IMG // PATCH, IMG // PATCH)


@pytest.mark.parametrize("gamma", [True, False])
def test_official_format_loads_and_matches_reference(tmp_path, gamma):
    sd = official_state_dict(gamma=gamma)
    path = tmp_path / "vqkd_encoder_tiny.pth"
    torch.save({"model": sd}, path)
    tok = load_tokenizer("vqkd", path, num_heads=HEADS)
    assert isinstance(tok, VQKDTokenizer)
    assert (tok.vocab_size, tok.input_size, tok.grid_size) == (NCODE, IMG, (4, 4))
    images = torch.rand(4, 3, IMG, IMG)
    ref = reference_tokens(sd, images)
    got = tok.tokenize(images)
    assert (got == ref).float().mean() >= 0.98  # ties aside, identical
    assert len(ref.unique()) > 3
    # Saved in our format and reloaded: same tokens, no pickle.
    tok.save(tmp_path / "mine")
    assert torch.equal(load_tokenizer("vqkd", tmp_path / "mine").tokenize(images), got)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unilm"):
        load_tokenizer("vqkd")
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"foo": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="not a VQ-KD state dict"):
        load_tokenizer("vqkd", bad)
    import argparse
    # a training checkpoint's argparse Namespace is plain data: read weights-only, no trust needed
    torch.save({"model": official_state_dict(), "args": argparse.Namespace(x=1)}, tmp_path / "ns.pth")
    assert load_tokenizer("vqkd", tmp_path / "ns.pth", num_heads=HEADS).vocab_size == NCODE
