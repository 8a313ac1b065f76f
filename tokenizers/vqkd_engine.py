"""One VQ-KD training epoch, and the held-out codebook evaluation.

Per micro-batch: the frozen teacher turns the view into its features (the target); the model encodes the
view into unit codes, picks the nearest codewords, decodes them and is scored by the cosine distance to
the target plus the commitment term; backward; then the codebook moves by EMA towards the codes that chose
each row (sums over every process, so all processes keep the same codebook). Before the first step the
codebook is a spherical k-means of the first batch's codes (gathered from every process). After each
optimizer step, rows no code chose for ``restart_after`` steps are restarted from this step's codes
(gathered; the same seeded draw on every process). A non-finite loss stops the run before it touches
the weights or the codebook (the last checkpoint is intact).

Codebook health is logged with the losses: the share of codes chosen in the logging window
(``codebook_usage``), the perplexity of their histogram, how many rows are dead (unused for
``restart_after`` steps: also counted when restarts are off) and how many were restarted.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from beit.data.loading.heldout import good_rows
from beit.data.pipelines.transforms import tokenizer_input
from beit.runtime.data_wait import DataWait
from beit.runtime.faults import NonFiniteLossError


@dataclass
class VQKDState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0
    samples_seen: int = 0         # per process
    codes_restarted: int = 0      # rows restarted in total
    train_seconds: float = 0.0    # wall time training, over all restarts (as of the last save)

    def to_dict(self) -> dict:
        return asdict(self)


def histogram_stats(counts: torch.Tensor) -> dict[str, float]:
    """Share of codes used and perplexity exp(H) of a code histogram."""
    total = float(counts.sum())
    if total == 0:
        return {"codebook_usage": 0.0, "codebook_perplexity": 0.0}
    p = counts[counts > 0].double() / total
    return {"codebook_usage": float((counts > 0).double().mean()),
            "codebook_perplexity": float(torch.exp(-(p * p.log()).sum()))}


class VQKDMeter:
    """Sums over a logging window on this process (losses, code histogram, restarts); ``reduce`` sums
    over processes in one collective (every process must call it)."""

    def __init__(self, n_code: int, device):
        self.n_code, self.device = n_code, device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # rec_loss, quant_loss, batches
        self.counts = torch.zeros(self.n_code, dtype=torch.float64, device=self.device)
        self.restarted = 0

    @torch.no_grad()
    def update(self, out: dict, counts: torch.Tensor) -> None:
        """Add a micro-batch (``counts``: its per-code counts, already summed over processes)."""
        self.sums += torch.stack([out["rec_loss"].double(), out["quant_loss"].double(),
                                  torch.ones((), dtype=torch.float64, device=self.device)])
        self.counts += counts.double()

    def state_dict(self) -> dict | None:
        """The open logging window (None when empty), saved with a checkpoint taken inside a window (a stop at any
        step) so the resumed run logs the same window."""
        if float(self.sums[2]) == 0:
            return None
        return {"sums": self.sums.tolist(), "counts": self.counts.tolist(), "restarted": self.restarted}

    def load_state_dict(self, state: dict | None, rank: int = 0) -> None:
        """Continue the saved window; from ``{"saved_ranks": [...]}`` (another process count) rank 0 takes the sum of
        the saved ranks' loss sums, the other ranks none, and every rank the code histogram and restarts, which
        were already the same on every saved rank."""
        self.reset()
        if state and "saved_ranks" in state:
            parts = [p for p in state["saved_ranks"] if p]
            sums = [sum(col) for col in zip(*(p["sums"] for p in parts))] if rank == 0 else [0.0, 0.0, 0.0]
            state = {**parts[0], "sums": sums} if parts else None
        if state:
            self.sums = torch.tensor(state["sums"], dtype=torch.float64, device=self.device)
            self.counts = torch.tensor(state["counts"], dtype=torch.float64, device=self.device)
            self.restarted = int(state["restarted"])

    def reduce(self, accelerator) -> dict:
        sums = self.sums
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        rec, quant, n = sums.tolist()
        if n == 0:
            return {}
        return {"loss": (rec + quant) / n, "rec_loss": rec / n, "quant_loss": quant / n,
                **histogram_stats(self.counts), "codes_restarted": self.restarted}


def all_ranks_finite(loss: torch.Tensor, accelerator) -> bool:
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


def gather(t: torch.Tensor, accelerator) -> torch.Tensor:
    """Rows of every process, in process order (the same tensor on every process)."""
    return accelerator.gather(t.contiguous()) if accelerator.num_processes > 1 else t


def sum_over_ranks(accelerator):
    return (lambda t: accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else (lambda t: t)


@torch.no_grad()
def init_codebook(model, images: torch.Tensor, accelerator, *, seed: int, iters: int) -> None:
    """Spherical k-means of the codes of ``images`` from every process; rank 0's result is broadcast."""
    from accelerate.utils import broadcast
    quant = model.quantize
    with accelerator.autocast():
        z = model.encode(images).flatten(0, 1)
    quant.init_from(gather(z, accelerator), torch.Generator().manual_seed(seed), iters)
    if accelerator.num_processes > 1:
        for buf in (quant.embedding.weight, quant.embedding.cluster_size):
            buf.copy_(broadcast(buf.clone(), from_process=0))


def train_one_epoch(model, teacher, loader, optimizer, schedule, accelerator, state: VQKDState, *,
                    total_steps: int, clip_grad: float, log_every: int, logger, meter: VQKDMeter, seed: int,
                    kmeans_iters: int, restart_after: int, restart: bool, after_step=None, progress=None,
                    data_stats=None) -> None:
    """Run the rest of epoch ``state.epoch`` (or until ``total_steps`` optimizer steps are done).
    ``after_step(state)`` runs on every process after each optimizer step (evaluation, checkpoints)."""
    model.train()
    core = accelerator.unwrap_model(model)
    quant = core.quantize
    t0, samples0 = time.time(), state.samples_seen
    waiting = DataWait(loader)
    for batch in waiting:
        if state.step >= total_steps:
            break
        images = tokenizer_input(batch["image"].to(accelerator.device, non_blocking=True))  # [0, 1]
        state.samples_seen += images.shape[0]
        with accelerator.autocast():
            target = teacher(images)
        if not quant.initialised:
            init_codebook(core, images, accelerator, seed=seed, iters=kmeans_iters)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                out = model(images, target)
            if not all_ranks_finite(out["loss"], accelerator):
                raise NonFiniteLossError(
                    f"the VQ-KD loss is {float(out['loss'].detach()):g} at step {state.step + 1} "
                    f"(lr {schedule.lr_at(state.step):.3g}): "
                    "training diverged; neither the weights nor the codebook were updated by it, so the last "
                    "checkpoint is intact. Lower --lr, lengthen the warmup, set --clip_grad, or use "
                    "--mixed_precision bf16/no instead of fp16, then rerun the same command to resume.")
            accelerator.backward(out["loss"])
            counts = quant.ema_update(out["z"], out["indices"], state.step + 1, reduce=sum_over_ranks(accelerator))
            meter.update(out, counts)
            if not accelerator.sync_gradients:
                continue
            lr, wd = schedule.step()
            norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad if clip_grad > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.step += 1
        dead = quant.dead_count(state.step, restart_after)
        if restart and dead:
            recent = gather(out["z"].flatten(0, 1), accelerator)
            draw = torch.Generator().manual_seed(seed * 1_000_003 + state.step)  # the same on every process
            n = quant.restart_dead(recent, state.step, restart_after, draw)
            meter.restarted += n
            state.codes_restarted += n
        if progress is not None:
            progress.update(1)
        if state.step % log_every == 0 or state.step == total_steps:
            metrics = meter.reduce(accelerator)
            meter.reset()
            dt = max(time.time() - t0, 1e-9)
            metrics.update(epoch=state.epoch, lr=lr, weight_decay=wd, dead_codes=dead,
                           grad_norm=float(norm) if torch.is_tensor(norm) else float("nan"),
                           codes_restarted_total=state.codes_restarted,
                           samples_per_s=(state.samples_seen - samples0) * accelerator.num_processes / dt,
                           data_wait_fraction=waiting.fraction())
            if data_stats is not None:
                metrics.update(data_stats())
            waiting.reset()
            t0, samples0 = time.time(), state.samples_seen
            logger.log(metrics, step=state.step)
            if progress is not None:
                progress.set_postfix(loss=f"{metrics['rec_loss']:.4f}", usage=f"{metrics['codebook_usage']:.0%}",
                                     refresh=False)
        if after_step is not None:
            after_step(state)


@torch.no_grad()
def evaluate_codebook(model, teacher, loader, accelerator) -> dict:
    """Held-out images (every image once over the processes): codebook usage and perplexity of their tokens,
    and the reconstruction loss; undecodable images are left out and counted."""
    model.eval()
    n_code = model.quantize.n_code
    counts = torch.zeros(n_code, dtype=torch.float64, device=accelerator.device)
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # rec_loss x images, images, bad
    for batch in loader:
        ok = good_rows(batch)
        sums[2] += int((~ok).sum())
        if not ok.any():
            continue
        images = tokenizer_input(batch["image"][ok].to(accelerator.device))
        with accelerator.autocast():
            out = model(images, teacher(images))
        counts += torch.bincount(out["indices"].flatten(), minlength=n_code).double()
        sums[0] += out["rec_loss"].double() * len(images)
        sums[1] += len(images)
    model.train()
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, reduction="sum")
        sums = accelerator.reduce(sums, reduction="sum")
    rec, images, bad = sums.tolist()
    return {**histogram_stats(counts.cpu()), "rec_loss": rec / max(images, 1), "images": int(images),
            "bad_images": int(bad), "tokens": int(counts.sum())}
