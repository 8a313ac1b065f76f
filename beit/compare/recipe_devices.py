"""The default small-data recipes of ``beit compare`` beyond the plain ViT: the Swin encoder (``--arch swin_*``)
and the MobileViT student (``distill`` / ``student`` methods). Override with ``--swin``, ``--student``, ``--distill``.
"""
from __future__ import annotations

# A 0.6M-parameter Swin at 32 px: 4 px Swin patches (8x8 grid), three stages (8x8, 4x4, 2x2) with 4x4
# windows; the 8 px token cells of recipe.MODEL are 2x2 Swin patches, so the token grid (4x4) is stage 2's
# stride and the last stage is upsampled x2 by the default head.
SWIN = dict(swin_patch_size=4, embed_dim=32, swin_depths=[2, 2, 2], swin_heads=[2, 4, 8], swin_window_size=4)
# The student, trained from scratch on the label subset (``student``) or taught by the fine-tuned BEiT model
# of the same seed (``distill``, labels + the unlabelled shards); the shared fine-tune recipe, no layer decay.
STUDENT = dict(model="mobilevit_xxs", layer_decay=1.0, drop_path=0.0)
DISTILL = dict(distill_temperature=4.0, distill_alpha=0.5, unlabelled_batch_size=16)
