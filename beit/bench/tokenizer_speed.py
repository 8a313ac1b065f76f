"""Tokenizer throughput: the DALL-E encoder as we run it (channels-last) against plain ``dall_e``
(same weights, ``map_pixels`` + encoder + argmax, NCHW), the opt-in bf16 mode with its token
agreement against fp32, and every other tokenizer kind (random weights: the FLOPs are the
architecture's; the figures do not need trained weights)."""
from __future__ import annotations

import torch

from beit.bench.machine import sync
from beit.bench.timing import alternate, median, rnd, spread

DALLE_FULL = {"n_hid": 256, "n_blk_per_group": 2, "input_channels": 3, "vocab_size": 8192}  # the official encoder's
DALLE_SMOKE = {"n_hid": 16, "n_blk_per_group": 1, "input_channels": 3, "vocab_size": 64}


def _images(n: int, size: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # smooth random images (upsampled noise): token maps of real-looking structure, not pure noise
    low = torch.rand(n, 3, max(1, size // 8), max(1, size // 8), generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0,
                                                                                                              1).to(device)


def _plain_dalle(tok):
    """dall_e's own encoder module with our tokenizer's weights, run the way dall_e's README does."""
    from dall_e import Encoder, map_pixels
    cfg = tok.encoder_cfg
    enc = Encoder(**cfg, device=torch.device("cpu"), requires_grad=False, use_mixed_precision=False)
    enc.load_state_dict(tok.encoder.state_dict())
    enc = enc.to(tok.device).eval()
    for m in enc.modules():
        if hasattr(m, "use_float16"):
            m.use_float16 = False

    def run(x):
        with torch.no_grad():
            return enc(map_pixels(x)).argmax(1)
    return run


def _timed(fns: dict, device, rounds: int) -> dict:
    def synced(f):
        def call():
            f()
            sync(device)
        return call
    return alternate({k: synced(v) for k, v in fns.items()}, rounds=rounds)


def bench_dalle(device, batch: int, rounds: int, smoke: bool) -> dict:
    from beit.tokenizers.dalle import DalleTokenizer
    torch.manual_seed(0)
    tok = DalleTokenizer(DALLE_SMOKE if smoke else DALLE_FULL).to(device)
    x = _images(batch, tok.input_size, device)
    plain = _plain_dalle(tok)
    nchw = DalleTokenizer(tok.encoder_cfg).to(device)
    nchw.load_state_dict(tok.state_dict())
    nchw.channels_last = False
    bf16 = DalleTokenizer(tok.encoder_cfg).to(device)
    bf16.load_state_dict(tok.state_dict())
    bf16.set_compute_dtype("bf16")
    ref = plain(x)
    same = {"ours": bool((tok.tokenize(x) == ref).all()), "ours_nchw": bool((nchw.tokenize(x) == ref).all())}
    secs = _timed({"ours": lambda: tok.tokenize(x), "dall_e": lambda: plain(x),
                   "ours_nchw": lambda: nchw.tokenize(x), "ours_bf16": lambda: bf16.tokenize(x)}, device, rounds)
    out = {"config": tok.encoder_cfg, "input_px": tok.input_size, "batch": batch,
           "tokens_equal_to_dall_e": same}
    for k, v in secs.items():
        out[k] = {"img_per_s": rnd(batch / median(v)), "spread": spread(v)}
    out["ratio_ours_vs_dall_e"] = rnd(median(secs["dall_e"]) / median(secs["ours"]))
    out["ratio_channels_last_vs_nchw"] = rnd(median(secs["ours_nchw"]) / median(secs["ours"]))
    out["bf16_vs_fp32"] = {"speed_ratio": rnd(median(secs["ours"]) / median(secs["ours_bf16"])),
                           "token_agreement": rnd(float((bf16.tokenize(x) == ref).float().mean()), 4)}
    return out


def _other_kinds(smoke: bool) -> dict:
    from beit.tokenizers.dvae import DVAETokenizer
    from beit.tokenizers.kmeans import KMeansTokenizer
    from beit.tokenizers.vqkd import VQKDTokenizer
    torch.manual_seed(0)
    if smoke:
        return {"kmeans": KMeansTokenizer.random(0, vocab_size=64, patch_size=8, input_size=32),
                "dvae": DVAETokenizer(vocab_size=64, hidden=16, input_size=32),
                "vqkd": VQKDTokenizer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, n_code=64)}
    return {"kmeans": KMeansTokenizer.random(0, vocab_size=1024, patch_size=8, input_size=112),
            "dvae": DVAETokenizer(vocab_size=512, hidden=64, input_size=112),
            "vqkd": VQKDTokenizer()}  # BEiT v2's ViT-B/16 at 224 px, 8192 codes


def bench_kinds(device, batch: int, rounds: int, smoke: bool) -> dict:
    out = {}
    for kind, tok in _other_kinds(smoke).items():
        tok = tok.to(device)
        x = _images(batch, tok.input_size, device)
        low = type(tok).from_config(tok.get_config()).to(device)
        low.load_state_dict(tok.state_dict())
        low.freeze().set_compute_dtype("bf16")
        secs = _timed({"fp32": lambda t=tok: t.tokenize(x), "bf16": lambda t=low: t.tokenize(x)}, device, rounds)
        agree = float((low.tokenize(x) == tok.tokenize(x)).float().mean())
        out[kind] = {"input_px": tok.input_size, "vocab": tok.vocab_size, "batch": batch,
                     "img_per_s": rnd(batch / median(secs["fp32"])), "spread": spread(secs["fp32"]),
                     "bf16_img_per_s": rnd(batch / median(secs["bf16"])), "bf16_token_agreement": rnd(agree, 4)}
    return out


def run(device, *, batch: int = 8, rounds: int = 3, smoke: bool = False) -> dict:
    return {"note": "random weights (the official architectures' FLOPs); bf16 = opt-in set_compute_dtype('bf16'), "
                    "agreement = fraction of tokens equal to fp32 on smooth random images",
            "dalle": bench_dalle(device, batch, rounds, smoke), **bench_kinds(device, batch, rounds, smoke)}
