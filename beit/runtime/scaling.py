"""Multi-process helpers shared by pretrain.py and finetune.py: the collective timeout and the
one-line description of the effective batch and lr printed at start-up.

A rank that *exits* is caught by the launcher (torchrun / accelerate launch stop every other rank
of the job). A rank that *hangs* (a stuck filesystem, a deadlocked collective) is caught by the
process-group timeout set here: every other rank's next collective then fails after
``dist_timeout_s`` and the job ends instead of waiting forever.
"""
from __future__ import annotations

import os
from datetime import timedelta

DATA_ORDERS = ("shards", "global")


def accelerator_kwargs_handlers(dist_timeout_s: int) -> list:
    """``kwargs_handlers`` for ``Accelerator``: the collective timeout (gloo and NCCL).

    With NCCL the timeout only fires when async error handling is on, so it is switched on here
    unless the user set it (PyTorch's default in recent versions, made explicit)."""
    from accelerate.utils import InitProcessGroupKwargs

    if dist_timeout_s < 1:
        raise ValueError(f"dist_timeout_s must be >= 1 second, got {dist_timeout_s}")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    return [InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout_s))]


def check_data_order(order: str) -> None:
    if order not in DATA_ORDERS:
        raise ValueError(f"data_order must be one of {DATA_ORDERS} ('shards': scalable default, disjoint shards "
                         f"per rank; 'global': same batches for any process count), got {order!r}")


def describe_scaling(batch_size: int, accum: int, processes: int, lr: float, how: str) -> str:
    """'effective batch 2048 = 64 per process x 4 accumulation x 8 processes; lr 0.0015 (...)'."""
    return (f"effective batch {batch_size * accum * processes} = {batch_size} per process x {accum} accumulation "
            f"x {processes} process(es); lr {lr:g} ({how})")


def grad_accum_for(global_batch_size: int, batch_size: int, processes: int) -> int:
    """Accumulation steps that keep ``global_batch_size`` images per optimizer step on ``processes``."""
    if global_batch_size < 1 or global_batch_size % (batch_size * processes):
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by batch_size {batch_size} x "
                         f"{processes} process(es) (it must be a positive multiple); change batch_size or "
                         "global_batch_size")
    return global_batch_size // (batch_size * processes)


def refuse_under_fsdp(distributed_type, what: str, instead: str) -> None:
    """Refuse, at start-up, ``what`` under FSDP: it runs the unwrapped model, which there holds only
    this rank's shard of the parameters (its numbers would be wrong or it would fail hours in)."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.FSDP:
        raise ValueError(f"{what} runs the unwrapped model, which under FSDP holds only this rank's shard of "
                         f"the weights; {instead} (see docs/scaling.md, 'FSDP and DeepSpeed notes')")

