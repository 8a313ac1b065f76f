"""The frozen visual tokenizer interface: images in [0, 1] -> LongTensor[B, h, w].

Every tokenizer is a ``VisualTokenizer``: always in eval mode, no gradients, float32 with autocast
disabled inside ``tokenize``. Saved tokenizers are ``<stem>.safetensors`` (tensors) plus
``<stem>.json`` (``{"kind", "format_version", "config"}``); loading never unpickles anything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 1
# Resampling (lanczos/bicubic) can overshoot [0, 1] slightly; beyond this it is a caller bug.
RANGE_TOLERANCE = 0.02


def resolve_stem(path: str | Path) -> Path:
    """``x``, ``x.json`` or ``x.safetensors`` -> the stem ``x`` (a directory holding one pair works too)."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        return p.with_suffix("")
    if p.is_dir():
        pairs = sorted(q.with_suffix("") for q in p.glob("*.json") if q.with_suffix(".safetensors").is_file())
        if len(pairs) != 1:
            raise FileNotFoundError(
                f"{p} is a directory with {len(pairs)} tokenizer file pairs (<name>.json + <name>.safetensors); "
                "pass the path of one of them")
        return pairs[0]
    return p


def read_tokenizer_json(path: str | Path, expected_kind: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Read ``<stem>.json`` and check its kind; returns (stem, config)."""
    stem = resolve_stem(path)
    meta_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for f in (meta_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(
                f"tokenizer file {f} does not exist (a saved tokenizer is {stem.name}.json + {stem.name}.safetensors)")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict) or "kind" not in meta or "config" not in meta:
        raise ValueError(f"{meta_path} is not a tokenizer description (needs 'kind' and 'config')")
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {meta['format_version']}; this code reads <= "
                         f"{FORMAT_VERSION}")
    if expected_kind is not None and meta["kind"] != expected_kind:
        raise ValueError(f"{meta_path} holds a {meta['kind']!r} tokenizer, not {expected_kind!r}")
    return stem, meta["config"]


class VisualTokenizer(nn.Module):
    """Base class: subclasses set the four attributes, implement ``_tokenize`` and call ``freeze()``.

    Attributes: ``vocab_size``; ``input_size`` (side in px of the square view it expects);
    ``grid_size`` (h, w) of the token map; ``interpolation`` used to resize the tokenizer view.
    """

    kind: str = "base"
    compute_dtype: torch.dtype = torch.float32  # set_compute_dtype("bf16"): opt-in, faster, not bit-exact
    vocab_size: int
    input_size: int
    grid_size: tuple[int, int]
    interpolation: str = "bicubic"

    # ---- to implement -------------------------------------------------------------------------
    def _tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """float32 [B,3,S,S] in [0,1] -> LongTensor [B,h,w]; called under no_grad, autocast off."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments (what ``from_config`` needs)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "VisualTokenizer":
        return cls(**config)

    @property
    def has_decoder(self) -> bool:
        return False

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- shared behaviour ---------------------------------------------------------------------
    def freeze(self) -> "VisualTokenizer":
        """Eval mode, float32, no parameter needs gradients."""
        self.float()
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> "VisualTokenizer":
        """A tokenizer is frozen: ``train()`` keeps it in eval mode (the pretraining loop may call it)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Validate shape, dtype and range; returns a float32 copy clamped to [0, 1]."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.tokenize expects a torch.Tensor, got {type(images).__name__}")
        s = self.input_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(
                f"{type(self).__name__} expects images of shape [B, 3, {s}, {s}] (its input_size is {s}), "
                f"got {list(images.shape)}; resize the tokenizer view to {s} px "
                f"({self.interpolation}) before tokenizing")
        if not images.is_floating_point():
            raise TypeError(f"images must be float in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
        images = images.detach().float()
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
                raise ValueError(
                    f"images must be in [0, 1] (got min {lo:.3f}, max {hi:.3f}); pass the un-normalised "
                    "tokenizer view, not ImageNet-normalised or 0-255 pixels: each tokenizer normalises itself")
        return images.clamp(0.0, 1.0)

    def set_compute_dtype(self, dtype: str | torch.dtype) -> "VisualTokenizer":
        """``"fp32"`` (the default, exact) or ``"bf16"``: run the tokenizer under bf16 autocast (fast on
        GPUs and AMX/AVX-512-BF16 CPUs; a few tokens differ from fp32, see ``beit bench``). The weights
        and the input stay float32."""
        table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        dt = table.get(dtype) if isinstance(dtype, str) else dtype
        if dt not in (torch.float32, torch.bfloat16):
            raise ValueError(f"tokenizer compute dtype must be fp32 or bf16, got {dtype!r}")
        self.compute_dtype = dt
        return self

    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B,3,S,S] in [0,1] (S = input_size) -> token ids LongTensor [B, h, w]."""
        x = self.check_images(images).to(self.device)
        low = self.compute_dtype == torch.bfloat16
        with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=low):
            tokens = self._tokenize(x)
        expected = (x.shape[0], *self.grid_size)
        if tuple(tokens.shape) != expected:
            raise RuntimeError(f"{type(self).__name__} produced tokens of shape {tuple(tokens.shape)}, expected "
                               f"{expected}")
        return tokens.long()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenize(images)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> reconstructed images [B, 3, S, S] in [0, 1] (tokenizers with a decoder)."""
        if not self.has_decoder:
            raise NotImplementedError(f"the {self.kind} tokenizer has no decoder (no reconstructions)")
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != tuple(self.grid_size):
            raise ValueError(f"tokens must have shape [B, {self.grid_size[0]}, {self.grid_size[1]}], got "
                             f"{list(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]")
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
            return self._decode(tokens.to(self.device).long()).clamp(0.0, 1.0)

    def random_like(self, seed: int = 0) -> "VisualTokenizer":
        """The same architecture with random (untrained) weights: the baseline a trained one must beat."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return type(self).from_config(self.get_config()).freeze()

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``<stem>.safetensors`` + ``<stem>.json`` atomically; returns the stem."""
        from safetensors.torch import save_file

        stem = resolve_stem(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"kind": self.kind, "format_version": FORMAT_VERSION, "config": self.get_config()}
        tmp_w = stem.with_name(stem.name + ".safetensors.tmp")
        tmp_j = stem.with_name(stem.name + ".json.tmp")
        save_file(tensors, str(tmp_w), metadata={"kind": self.kind})
        tmp_j.write_text(json.dumps(meta, indent=2))
        tmp_w.replace(stem.with_suffix(".safetensors"))
        tmp_j.replace(stem.with_suffix(".json"))
        return stem

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "VisualTokenizer":
        """Load a tokenizer saved by ``save`` (safetensors + JSON; no pickle)."""
        from safetensors.torch import load_file

        stem, config = read_tokenizer_json(path, expected_kind=cls.kind)
        tok = cls.from_config(config)
        state = load_file(str(stem.with_suffix(".safetensors")), device=str(map_location))
        missing, unexpected = tok.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{stem}.safetensors does not match its JSON config: "
                             f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
        return tok.to(map_location).freeze()

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, input_size={self.input_size}, grid_size={tuple(self.grid_size)}, "
                f"interpolation={self.interpolation!r}")


def tokenizer_fingerprint(tokenizer: VisualTokenizer) -> str:
    """A hash of a tokenizer's vocabulary, grid and weights: a run resumes only with the tokenizer it trained with
    (the file may move, not change)."""
    import hashlib
    h = hashlib.sha256(json.dumps({"vocab": tokenizer.vocab_size, "grid": list(tokenizer.grid_size)}).encode())
    for k, v in sorted(tokenizer.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
