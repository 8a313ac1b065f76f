"""The optimizer step's work that is not model math: gradient norm and clipping, the update, zeroing.

Accelerate's wrappers serve every backend, and pay for it on every step: ``clip_grad_norm_`` walks
``model.parameters()`` and groups the gradients by device mesh, ``AcceleratedOptimizer.step`` looks the LOMO
package up (an import-metadata search, twice) and ``zero_grad`` inspects the optimizer's signature. On the
small models of ``beit compare`` that was a few ms a step (profiled: docs/performance.md). Where those wrappers
would do nothing torch does not (no grad scaler; no FSDP, DeepSpeed or XLA), the same torch calls run here on a
parameter list built once; elsewhere the wrappers run. The norm and the update are bit-identical either way.
"""
from __future__ import annotations

import torch


class OptimizerStep:
    """``clip(max_norm)``, ``step()`` and ``zero_grad()`` of the prepared ``model`` and ``optimizer``."""

    def __init__(self, accelerator, model: torch.nn.Module, optimizer):
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.utils import DistributedType
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        plain = accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                                     DistributedType.XLA, DistributedType.MEGATRON_LM)
        self.direct = plain and accelerator.scaler is None
        self.inner = optimizer
        while self.direct and isinstance(self.inner, AcceleratedOptimizer):
            self.inner = self.inner.optimizer  # the torch optimizer it wraps

    def clip(self, max_norm: float) -> torch.Tensor | None:
        """The total gradient norm (2-norm over every gradient); gradients scaled down to ``max_norm`` when it is
        finite. None where DeepSpeed clips inside its engine and reports no norm."""
        if not self.direct:
            return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.accelerator.device)
        norm = torch.linalg.vector_norm(torch.nn.utils.get_total_norm(grads, 2.0, foreach=True).reshape(1), 2.0)
        if max_norm != float("inf"):
            torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, norm, foreach=True)
        return norm

    def step(self) -> None:
        self.inner.step() if self.direct else self.optimizer.step()

    def zero_grad(self) -> None:
        (self.inner if self.direct else self.optimizer).zero_grad(set_to_none=True)
