"""``beit bench``: every speed figure of the project beside its peer, in one process, as one JSON object.

Sections (one module each): ``train_step`` (ours vs transformers' BeitForMaskedImageModeling),
``tokenizer`` (DALL-E as we run it vs plain dall_e, and every other kind), ``end_to_end`` (real short
pretraining runs: images/s and the data-wait fraction), ``masking``, ``data`` (input pipeline vs a
plain torchvision one) and ``memory`` (activation checkpointing). Figures are medians of rounds that
alternate ours and the peer, so a busy shared machine weighs on both alike.
"""
