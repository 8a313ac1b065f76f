"""Whole training runs as library functions: what `beit pretrain` / `beit finetune` (and `beit compare`) run."""
