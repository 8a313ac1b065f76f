"""OpenAI's DALL-E dVAE (``dall_e`` package) as a frozen tokenizer, without pickles at load time.

The official weights are whole pickled modules (``encoder.pkl``, ``decoder.pkl``). Unpickling runs
code, so it happens only in ``convert_dalle_pickles`` / ``load_dalle(..., trust_pickle=True)``;
the result is written as ``dalle.safetensors`` + ``dalle.json`` and every later load rebuilds
``dall_e.Encoder``/``Decoder`` from the JSON and fills in the tensors. Tokens are the argmax of
the encoder logits of ``map_pixels(x)``; the grid is input_size / 8 (112 px -> 14 x 14).
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beit.tokenizers.base import VisualTokenizer, read_tokenizer_json

OFFICIAL_ENCODER_URL = "https://cdn.openai.com/dall-e/encoder.pkl"
OFFICIAL_DECODER_URL = "https://cdn.openai.com/dall-e/decoder.pkl"
LOGIT_LAPLACE_EPS = 0.1  # dall_e.utils.logit_laplace_eps
DOWNSAMPLE = 8           # three 2x max-pools in the encoder

HOW_TO_GET_WEIGHTS = (
    "The DALL-E tokenizer needs OpenAI's dVAE weights. Download the official encoder (and, for "
    f"reconstructions, decoder):\n  {OFFICIAL_ENCODER_URL}\n  {OFFICIAL_DECODER_URL}\n"
    "then convert them once (this unpickles them, so only do it for files you trust):\n"
    "  python -m beit.tokenizers.convert_dalle --encoder encoder.pkl --decoder decoder.pkl "
    "--out weights/dalle --trust_pickle true\n"
    "and pass the converted directory: load_tokenizer('dalle', 'weights/dalle') / --tokenizer_path weights/dalle. "
    "No download possible? Use the offline k-means tokenizer (--tokenizer kmeans).")

ENCODER_FIELDS = ("n_hid", "n_blk_per_group", "input_channels", "vocab_size")
DECODER_FIELDS = ("n_init", "n_hid", "n_blk_per_group", "output_channels", "vocab_size")


def _float32_convs(module: nn.Module) -> None:
    """dall_e's Conv2d runs in float16 on CUDA by default; the tokenizer contract is float32."""
    for m in module.modules():
        if hasattr(m, "use_float16"):
            m.use_float16 = False


def patch_upsample(module: nn.Module) -> int:
    """Make ``nn.Upsample`` modules unpickled from old torch work on current torch.

    Modules pickled before torch 1.11 lack the ``recompute_scale_factor`` attribute that
    ``Upsample.forward`` reads now (AttributeError in the decoder); set it to its default.
    Returns how many modules were patched.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
            n += 1
    return n


def build_encoder(cfg: dict[str, Any]) -> nn.Module:
    from dall_e import Encoder

    enc = Encoder(**{k: int(cfg[k]) for k in ENCODER_FIELDS}, device=torch.device("cpu"),
                  requires_grad=False, use_mixed_precision=False)
    _float32_convs(enc)
    return enc


def build_decoder(cfg: dict[str, Any]) -> nn.Module:
    from dall_e import Decoder

    dec = Decoder(**{k: int(cfg[k]) for k in DECODER_FIELDS}, device=torch.device("cpu"),
                  requires_grad=False, use_mixed_precision=False)
    _float32_convs(dec)
    return dec


class DalleTokenizer(VisualTokenizer):
    """DALL-E dVAE encoder (+ optional decoder) behind the VisualTokenizer interface."""

    kind = "dalle"

    def __init__(self, encoder: dict[str, Any], decoder: dict[str, Any] | None = None, input_size: int = 112,
                 interpolation: str = "lanczos"):
        super().__init__()
        if input_size % DOWNSAMPLE:
            raise ValueError(f"DALL-E input_size must be a multiple of {DOWNSAMPLE}, got {input_size}")
        self.encoder_cfg = {k: int(encoder[k]) for k in ENCODER_FIELDS}
        self.decoder_cfg = {k: int(decoder[k]) for k in DECODER_FIELDS} if decoder else None
        if self.decoder_cfg and self.decoder_cfg["vocab_size"] != self.encoder_cfg["vocab_size"]:
            raise ValueError(f"decoder vocab_size {self.decoder_cfg['vocab_size']} != encoder's "
                             f"{self.encoder_cfg['vocab_size']}")
        self.encoder = build_encoder(self.encoder_cfg)
        self.decoder = build_decoder(self.decoder_cfg) if self.decoder_cfg else None
        self.vocab_size = self.encoder_cfg["vocab_size"]
        self.input_size = int(input_size)
        self.grid_size = (input_size // DOWNSAMPLE, input_size // DOWNSAMPLE)
        self.interpolation = interpolation
        self.channels_last = True  # the convolutions run in NHWC (faster oneDNN/cuDNN kernels; see beit bench)
        self.freeze()

    def get_config(self) -> dict[str, Any]:
        return {"encoder": self.encoder_cfg, "decoder": self.decoder_cfg, "input_size": self.input_size,
                "interpolation": self.interpolation}

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def _tokenize(self, images: torch.Tensor) -> torch.Tensor:
        x = (1 - 2 * LOGIT_LAPLACE_EPS) * images + LOGIT_LAPLACE_EPS  # dall_e.map_pixels
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.encoder.blocks.input.w.is_contiguous(memory_format=fmt) is False:
            self.encoder.to(memory_format=fmt)  # once (and again after a .to() that reset it)
        return self.encoder(x.contiguous(memory_format=fmt)).argmax(1)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        z = F.one_hot(tokens, self.vocab_size).permute(0, 3, 1, 2).float()
        stats = self.decoder(z).float()
        x = torch.sigmoid(stats[:, :3])
        return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)  # dall_e.unmap_pixels


# ---- official pickles -> safetensors -------------------------------------------------------------
def _unpickle_module(path: Path, expected: str, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise PermissionError(
            f"{path} is a pickle: loading it runs arbitrary code. Only if you trust its source (e.g. the "
            f"official {OFFICIAL_ENCODER_URL}), pass trust_pickle=True (CLI: --trust_pickle true) to convert "
            "it once to safetensors, then load the converted files.")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. {HOW_TO_GET_WEIGHTS}")
    import dall_e  # noqa: F401  (the pickle refers to dall_e classes)

    # torch >= 2.6 defaults to weights_only=True, which cannot rebuild a pickled module.
    module = torch.load(str(path), map_location="cpu", weights_only=False)
    cls = getattr(dall_e, expected)
    if not isinstance(module, cls):
        raise TypeError(f"{path} holds a {type(module).__module__}.{type(module).__name__}, "
                        f"not a pickled dall_e.{expected}; is this the right file?")
    return module


def _module_config(module: nn.Module, fields: tuple[str, ...]) -> dict[str, int]:
    return {k: int(getattr(module, k)) for k in fields}


def _assert_same_outputs(original: nn.Module, rebuilt: nn.Module, x: torch.Tensor, what: str) -> None:
    _float32_convs(original)
    with torch.no_grad():
        a, b = original.float().eval()(x), rebuilt(x)
    if not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
        raise RuntimeError(f"converted {what} does not reproduce the pickled module (max diff "
                           f"{float((a - b).abs().max())})")


def tokenizer_from_modules(encoder: nn.Module, decoder: nn.Module | None = None, input_size: int = 112,
                           verify: bool = True) -> DalleTokenizer:
    """A DalleTokenizer holding copies of the weights of (unpickled) dall_e modules."""
    if decoder is not None:
        patch_upsample(decoder)
    tok = DalleTokenizer(_module_config(encoder, ENCODER_FIELDS),
                         _module_config(decoder, DECODER_FIELDS) if decoder is not None else None, input_size)
    tok.encoder.load_state_dict({k: v.float() for k, v in encoder.state_dict().items()}, strict=True)
    if decoder is not None:
        tok.decoder.load_state_dict({k: v.float() for k, v in decoder.state_dict().items()}, strict=True)
    tok.freeze()
    if verify:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1, tok.encoder_cfg["input_channels"], 32, 32, generator=g)
        _assert_same_outputs(encoder, tok.encoder, x, "encoder")
        if decoder is not None:
            z = F.one_hot(torch.randint(tok.vocab_size, (1, 4, 4), generator=g), tok.vocab_size)
            _assert_same_outputs(decoder, tok.decoder, z.permute(0, 3, 1, 2).float(), "decoder")
    return tok


def convert_dalle_pickles(encoder_pkl: str | Path, decoder_pkl: str | Path | None, out: str | Path, *,
                          trust_pickle: bool = False, input_size: int = 112) -> Path:
    """Official ``encoder.pkl`` [+ ``decoder.pkl``] -> ``<out>/dalle.safetensors`` + ``dalle.json``; returns the
    stem."""
    enc = _unpickle_module(Path(encoder_pkl), "Encoder", trust_pickle)
    dec = _unpickle_module(Path(decoder_pkl), "Decoder", trust_pickle) if decoder_pkl else None
    tok = tokenizer_from_modules(enc, dec, input_size=input_size)
    out = Path(out)
    stem = out / "dalle" if out.suffix not in (".json", ".safetensors") else out.with_suffix("")
    return tok.save(stem)


# ---- downloads -------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("BEIT_CACHE", Path.home() / ".cache" / "beit"))


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, cache_dir: str | Path | None = None, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` into the cache (atomically) unless present; verify ``sha256`` when given."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / (hashlib.sha256(url.encode()).hexdigest()[:10] + "-" + url.rstrip("/").rsplit("/", 1)[-1])
    if not dest.is_file():
        tmp = dest.with_name(dest.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ConnectionError(f"could not download {url}: {e}. Without network, download it elsewhere and "
                                  f"pass the local file. {HOW_TO_GET_WEIGHTS}") from e
        tmp.replace(dest)
    digest = sha256_of(dest)
    if sha256 and digest != sha256.lower():
        raise ValueError(f"sha256 of {dest} is {digest}, expected {sha256}; delete it and download again")
    print(f"[dalle] {url} -> {dest} (sha256 {digest})")
    return dest


def load_dalle(path: str | Path | None = None, *, decoder: str | Path | None = None, trust_pickle: bool = False,
               input_size: int | None = None, cache_dir: str | Path | None = None, sha256: str | None = None,
               decoder_sha256: str | None = None) -> DalleTokenizer:
    """``load_tokenizer("dalle", path)``.

    ``path``: a converted ``dalle`` stem / directory (no pickle), or an official ``encoder.pkl`` or
    URL (both need ``trust_pickle=True``; converted into the cache on first use and reused).
    ``decoder``: optional ``decoder.pkl`` / URL to add reconstructions when ``path`` is a pickle.
    """
    if path is None:
        raise ValueError(HOW_TO_GET_WEIGHTS)
    spec = str(path)
    is_url = spec.startswith(("http://", "https://"))
    if is_url or spec.endswith(".pkl"):
        if not trust_pickle:
            _unpickle_module(Path(spec), "Encoder", trust_pickle=False)  # raises the explanation
        enc_file = download(spec, cache_dir, sha256) if is_url else Path(spec)
        dec_file = None
        if decoder is not None:
            d = str(decoder)
            dec_file = download(d, cache_dir, decoder_sha256) if d.startswith(("http://", "https://")) else Path(d)
        key = sha256_of(enc_file)[:12] + (("-" + sha256_of(dec_file)[:12]) if dec_file else "")
        converted = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"dalle-{key}"
        if not converted.with_suffix(".json").is_file():
            convert_dalle_pickles(enc_file, dec_file, converted.with_suffix(".json"), trust_pickle=True)
            print(f"[dalle] converted to {converted}.safetensors; load that next time (no pickle)")
        path = converted
    stem, config = read_tokenizer_json(path, expected_kind="dalle")
    tok = DalleTokenizer.load(stem)
    if input_size is not None and input_size != tok.input_size:
        resized = DalleTokenizer(**{**config, "input_size": input_size})
        resized.load_state_dict(tok.state_dict())
        tok = resized.freeze()
    return tok
