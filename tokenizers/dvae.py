"""A small discrete VAE of the DALL-E kind, trained on the user's own shards.

Encoder: per 2x downsampling a strided 4x4 conv (+ a residual block below the first level), then
a 1x1 conv to ``vocab_size`` logits per position. Decoder: 1x1 conv from a (relaxed) one-hot code
to hidden channels (the codebook), residual blocks and transposed convs back to pixels. Training relaxes the
categorical code with Gumbel-softmax (temperature annealed from ``tau_start`` to ``tau_end``) and
adds a KL term to the uniform prior (``beit.tokenizers.train dvae``). Tokens = argmax of the logits.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beit.tokenizers.base import VisualTokenizer


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch // 2, 3, padding=1), nn.ReLU(), nn.Conv2d(ch // 2, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DiscreteVAE(nn.Module):
    """Conv encoder to ``vocab_size`` logits on a grid ``downsample`` x smaller; conv decoder back."""

    def __init__(self, vocab_size: int = 512, hidden: int = 64, downsample: int = 8):
        super().__init__()
        levels = int(round(math.log2(downsample)))
        if downsample < 1 or 2 ** levels != downsample:
            raise ValueError(f"downsample must be a power of two, got {downsample}")
        if vocab_size < 2 or hidden < 4:
            raise ValueError(f"need vocab_size >= 2 and hidden >= 4, got {vocab_size}, {hidden}")
        # Channels per resolution: hidden/2 at the first (largest) level, hidden below; no conv runs at
        # full resolution, which keeps CPU training cheap.
        chans = [max(4, hidden // 2)] + [hidden] * (levels - 1) if levels else []
        enc: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(chans):
            enc += [nn.Conv2d(c_in, c, 4, stride=2, padding=1)] + ([ResBlock(c)] if i > 0 else [nn.ReLU()])
            c_in = c
        if not levels:
            enc += [nn.Conv2d(3, hidden, 3, padding=1)]
            c_in = hidden
        enc += [ResBlock(c_in), nn.ReLU(), nn.Conv2d(c_in, vocab_size, 1)]
        dec: list[nn.Module] = [nn.Conv2d(vocab_size, c_in, 1), ResBlock(c_in)]
        for i in reversed(range(1, levels)):
            dec += [nn.ConvTranspose2d(c_in, chans[i - 1], 4, stride=2, padding=1), ResBlock(chans[i - 1])]
            c_in = chans[i - 1]
        # The last upsampling goes straight to RGB: a wide conv at full resolution would dominate the cost.
        dec += [nn.ReLU(), nn.ConvTranspose2d(c_in, 3, 4, stride=2, padding=1) if levels else nn.Conv2d(c_in, 3, 3,
                                                                                                        padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.vocab_size = vocab_size

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,S,S] in [0,1] -> logits [B, vocab, S/d, S/d]."""
        return self.encoder(images * 2.0 - 1.0)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(relaxed) one-hot codes [B, vocab, h, w] -> images [B,3,S,S] in [0,1]."""
        return torch.sigmoid(self.decoder(codes))

    def forward(self, images: torch.Tensor, tau: float, kl_weight: float, recon_sigma: float = 0.1,
                usage_weight: float = 0.0, hard: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss per pixel (negative ELBO) plus ``usage_weight`` x (log K - H(mean code distribution)).

        The per-position KL to the uniform prior keeps each q diffuse but does not stop the argmax
        from collapsing onto a few codes (seen: 9 % of 512 codes used after 200 steps); the entropy
        of the batch-mean of the relaxed samples (a diversity loss, as in wav2vec 2.0) does.
        """
        logits = self.logits(images)
        codes = F.gumbel_softmax(logits, tau=tau, hard=hard, dim=1)
        recon = self.decode_codes(codes)
        n_pix = images[0].numel()
        nll = ((recon - images) ** 2).flatten(1).sum(1) / (2 * recon_sigma ** 2)
        logq = F.log_softmax(logits, dim=1)
        kl = (logq.exp() * (logq + math.log(self.vocab_size))).sum(1).flatten(1).sum(1)
        mean_q = codes.float().mean(dim=(0, 2, 3))  # marginal of the (relaxed) samples, close to argmax usage
        diversity = math.log(self.vocab_size) + (mean_q * mean_q.clamp_min(1e-12).log()).sum()
        loss = (nll + kl_weight * kl).mean() / n_pix + usage_weight * diversity
        with torch.no_grad():
            mse = F.mse_loss(recon, images)
        return loss, {"loss": loss.detach(), "mse": mse, "kl_per_code": kl.mean().detach() / logits[0, 0].numel(),
                      "marginal_perplexity": (math.log(self.vocab_size) - diversity.detach()).exp()}


class DVAETokenizer(VisualTokenizer):
    """A trained ``DiscreteVAE`` behind the VisualTokenizer interface (with ``decode``)."""

    kind = "dvae"

    def __init__(self, vocab_size: int = 512, hidden: int = 64, downsample: int = 8, input_size: int = 64,
                 interpolation: str = "lanczos"):
        super().__init__()
        if input_size % downsample:
            raise ValueError(f"input_size {input_size} must be a multiple of downsample {downsample}")
        self.vae = DiscreteVAE(vocab_size, hidden, downsample)
        self.vocab_size, self.input_size = int(vocab_size), int(input_size)
        self.hidden, self.downsample = int(hidden), int(downsample)
        self.grid_size = (input_size // downsample, input_size // downsample)
        self.interpolation = interpolation
        self.freeze()

    def get_config(self) -> dict[str, Any]:
        return dict(vocab_size=self.vocab_size, hidden=self.hidden, downsample=self.downsample,
                    input_size=self.input_size, interpolation=self.interpolation)

    @property
    def has_decoder(self) -> bool:
        return True

    def _tokenize(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.logits(images).argmax(1)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_codes(F.one_hot(tokens, self.vocab_size).permute(0, 3, 1, 2).float())


def load_dvae(path: str | Path | None = None, **kw: Any) -> DVAETokenizer:
    """``load_tokenizer("dvae", path)``: a dVAE saved by ``python -m beit.tokenizers.train dvae``."""
    if path is None:
        raise ValueError("the dvae tokenizer must be trained first: `python -m beit.tokenizers.train dvae "
                         "--train_shards '<train-*.tar>' --output_dir runs/dvae` writes runs/dvae/dvae.safetensors + "
                         ".json")
    if kw:
        raise TypeError(f"unexpected options for a saved dVAE tokenizer: {sorted(kw)}")
    return DVAETokenizer.load(path)
