"""Optimisation: AdamW with its parameter groups (``param_groups``) and the per-step lr / weight-decay
schedules with the warmup length (``schedules``)."""
from beit.optim.param_groups import create_adamw, no_weight_decay_names, param_groups_weight_decay
from beit.optim.schedules import SCHEDULES, WarmupCosineSchedule, cosine_value, create_schedule, warmup_for

__all__ = ["create_adamw", "no_weight_decay_names", "param_groups_weight_decay", "SCHEDULES", "WarmupCosineSchedule",
           "cosine_value", "create_schedule", "warmup_for"]
