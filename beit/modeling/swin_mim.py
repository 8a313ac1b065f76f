"""BEiT masked-token pretraining for a timm ``SwinTransformer`` encoder.

The encoder IS timm's: ``patch_embed``, ``layers`` and ``norm`` are taken from a
``timm.create_model(<swin name>, num_classes=0, ...)`` and keep their names, so
``encoder_state_dict()`` loads into ``timm.create_model(<swin name>, num_classes=K, **same kwargs)``
with only the new classifier head missing. Around it:

* ``mask_token`` replaces the patch embedding of every masked cell right after ``patch_embed``.
  The mask is drawn on the tokenizer's coarser token grid (14x14 at 224 px); each token cell covers
  ``r x r`` Swin patches (r = 4 for 4 px patches and 16 px tokens) and all of them are replaced, so
  no stage (windows, shifts, patch merging) ever sees a masked token's pixels.
* a head at the token grid's stride predicts the tokenizer's id at the masked cells only:
  ``head="last"`` (default): the last stage after the final ``norm`` (stride 32 at 224 px),
  upsampled to the token grid by a linear pixel shuffle, LayerNorm, ``lm_head``; every encoder
  parameter is trained. ``head="stage"``: the output of the stage whose stride equals the token
  stride (stage 3 at 224 px), LayerNorm, ``lm_head``; the stages after it never see a loss, so they
  are frozen at their initialisation (kept, so the checkpoint still has every encoder key).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from beit.modeling.mim import flat_mask

MIM_HEADS = ("last", "stage")
# Constructor overrides that shape the timm model (what fine-tuning must pass to timm too).
SWIN_ARGS = ("img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "in_chans")


def is_swin(name: str) -> bool:
    """True if ``name`` is a timm model built by ``timm.models.swin_transformer.SwinTransformer``."""
    import timm
    from timm.models.swin_transformer import SwinTransformer
    if name not in timm.list_models("swin*"):
        return False
    return timm.models.model_entrypoint(name).__module__ == SwinTransformer.__module__


def create_swin_encoder(arch: str, num_classes: int = 0, drop_path_rate: float = 0.1, **swin_kwargs) -> nn.Module:
    """``timm.create_model(arch, ...)`` for a Swin name; unset (None / 0 / empty) overrides are left to timm."""
    import timm
    if not is_swin(arch):
        close = timm.list_models("swin*")[:8]
        raise ValueError(f"--arch {arch!r} is not a timm Swin Transformer name; e.g. {close}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in swin_kwargs.items() if v not in (None, 0, (), [])}
    unknown = sorted(set(kw) - set(SWIN_ARGS))
    if unknown:
        raise ValueError(f"unknown Swin option(s) {unknown}; valid: {list(SWIN_ARGS)}")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate, **kw)


def swin_kwargs_of(encoder: nn.Module) -> dict[str, Any]:
    """The timm constructor overrides that rebuild ``encoder``'s architecture (sizes, windows, grid)."""
    pe = encoder.patch_embed
    return dict(img_size=int(pe.img_size[0]), patch_size=int(pe.patch_size[0]), in_chans=int(pe.proj.in_channels),
                embed_dim=int(encoder.embed_dim), depths=[len(s.blocks) for s in encoder.layers],
                num_heads=[int(s.blocks[0].attn.num_heads) for s in encoder.layers],
                window_size=[int(s.blocks[0].window_size[0]) for s in encoder.layers],
                mlp_ratio=float(encoder.layers[0].blocks[0].mlp.fc1.out_features / encoder.embed_dim))


class SwinMimModel(nn.Module):
    """Swin encoder + mask token + masked-token head (BEiT pretraining).

    forward(images, bool_masked_pos [B, th, tw] on the TOKEN grid) -> logits [M, vocab_size] for the
    masked cells, ordered like ``tokens.flatten(1)[bool_masked_pos.flatten(1)]`` (as ``BeitPretrainModel``).
    """

    def __init__(self, arch: str = "swin_tiny_patch4_window7_224", token_grid=(14, 14), vocab_size: int = 8192,
                 head: str = "last", drop_path_rate: float = 0.1, init_std: float = 0.02, **swin_kwargs):
        super().__init__()
        if head not in MIM_HEADS:
            raise ValueError(f"swin_head must be one of {MIM_HEADS}, got {head!r}")
        enc = create_swin_encoder(arch, num_classes=0, drop_path_rate=drop_path_rate, **swin_kwargs)
        self.arch, self.head_kind, self.vocab_size = arch, head, int(vocab_size)
        self.in_chans = enc.patch_embed.proj.in_channels
        self.patch_embed, self.layers, self.norm = enc.patch_embed, enc.layers, enc.norm
        self.swin_kwargs = swin_kwargs_of(enc)
        self.grid_size = tuple(int(t) for t in token_grid)
        self.ratio, self.stage, self.upsample = self._geometry(tuple(enc.patch_embed.grid_size), len(enc.layers))
        dims = [int(f["num_chs"]) for f in enc.feature_info]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dims[0]))
        if head == "last":
            out = dims[-1] // self.upsample if self.upsample > 1 else dims[-1]
            self.mim_up = (nn.Linear(dims[-1], self.upsample ** 2 * out) if self.upsample > 1 else nn.Identity())
        else:
            out = dims[self.stage]
            self.mim_up = nn.Identity()
            for later in self.layers[self.stage + 1:]:
                later.requires_grad_(False)
            self.norm.requires_grad_(False)
        self.mim_norm = nn.LayerNorm(out, eps=1e-6)
        self.lm_head = nn.Linear(out, self.vocab_size)
        self.config = dict(arch=arch, token_grid=list(self.grid_size), vocab_size=self.vocab_size, head=head,
                           drop_path_rate=drop_path_rate, init_std=init_std, **self.swin_kwargs)
        self._init_mim(init_std)

    def _geometry(self, patch_grid: tuple[int, int], n_stages: int) -> tuple[int, int, int]:
        """(Swin patches per token cell along a side, stage index read by a 'stage' head, upsampling of a 'last'
        head)."""
        (ph, pw), (th, tw) = patch_grid, self.grid_size
        if ph % th or pw % tw or ph // th != pw // tw:
            raise ValueError(f"the token grid {th}x{tw} does not tile Swin's {ph}x{pw} patch grid evenly: choose "
                             "image_size / patch sizes so that each token cell covers the same r x r Swin patches")
        r = ph // th
        if r & (r - 1):
            raise ValueError(f"each token cell covers {r}x{r} Swin patches; r must be a power of 2 (a stage stride)")
        stage = r.bit_length() - 1
        last = n_stages - 1
        if any(g % (1 << last) for g in patch_grid):
            raise ValueError(f"Swin's {ph}x{pw} patch grid must be divisible by {1 << last} for its {n_stages} stages")
        if stage > last:
            raise ValueError(f"the token grid {th}x{tw} is coarser than Swin's last stage; use finer tokens or more "
                             "stages")
        return r, stage, 1 << (last - stage)

    @torch.no_grad()
    def _init_mim(self, std: float) -> None:
        for m in (self.mim_up, self.lm_head):
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=std)

    def _flat_mask(self, bool_masked_pos, batch: int, device) -> torch.Tensor:
        return flat_mask(bool_masked_pos, batch, self.grid_size, device, "the {h}x{w} token grid")

    def patch_mask(self, token_mask: torch.Tensor) -> torch.Tensor:
        """Token-grid mask [B, th*tw] -> Swin patch-grid mask [B, th*r, tw*r] (each cell an r x r block)."""
        m = token_mask.view(-1, *self.grid_size)
        return m.repeat_interleave(self.ratio, 1).repeat_interleave(self.ratio, 2)

    def _check_images(self, images: torch.Tensor) -> None:
        expect = (self.in_chans, *self.patch_embed.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(expect):
            raise ValueError(f"images must be [B, {expect[0]}, {expect[1]}, {expect[2]}], got {tuple(images.shape)}")

    def forward_features(self, images: torch.Tensor, bool_masked_pos=None) -> torch.Tensor:
        """Features on the token grid [B, th, tw, C] (before ``mim_norm``); masked cells see only the mask token."""
        self._check_images(images)
        x = self.patch_embed(images)  # [B, H, W, C] (NHWC), normalised
        if bool_masked_pos is not None:
            m = self.patch_mask(self._flat_mask(bool_masked_pos, x.shape[0], x.device)).unsqueeze(-1)
            x = torch.where(m, self.mask_token.to(x.dtype), x)  # no path at all from masked pixels
        if self.head_kind == "stage":
            for stage in self.layers[:self.stage + 1]:
                x = stage(x)
            return x
        x = self.norm(self.layers(x))
        if self.upsample == 1:
            return x
        b, h, w, _ = x.shape
        f = self.upsample
        x = self.mim_up(x).view(b, h, w, f, f, -1).permute(0, 1, 3, 2, 4, 5)  # pixel shuffle, channels last
        return x.reshape(b, h * f, w * f, -1)

    def forward(self, images: torch.Tensor, bool_masked_pos) -> torch.Tensor:
        """Logits [M, vocab_size] for the masked token cells only."""
        m = self._flat_mask(bool_masked_pos, images.shape[0], images.device)
        x = self.forward_features(images, m).flatten(1, 2)
        return self.lm_head(self.mim_norm(x[m]))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Relative position tables (as timm's Swin) and the mask token."""
        return {"mask_token"} | {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = bool(enable)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """timm ``SwinTransformer`` key names and tensors (no mask token, no MIM head)."""
        return {k: v for k, v in self.state_dict().items() if not is_mim_only_key(k)}


def is_mim_only_key(key: str) -> bool:
    """Keys that exist only for pretraining (dropped when the encoder goes into a classifier)."""
    return key == "mask_token" or key.startswith(("lm_head.", "mim_norm.", "mim_up."))

