"""One BEiT pretraining epoch, and the held-out masked-token evaluation.

Per micro-batch: the frozen tokenizer turns the tokenizer view into token ids (float32, no grad,
outside autocast), unless the batch already carries them (``--token_cache``); the labels are the ids
at the masked positions; the model predicts them from the corrupted encoder view under autocast;
cross-entropy (``mim_losses``: summed over the model's predictions when it makes several, as BEiT v2's
CLS-pretraining branch does). Gradient accumulation is Accelerate's; lr and weight decay are set per optimizer step.
A non-finite loss or gradient (decided jointly by all ranks) skips the whole optimizer step without
touching the weights; K in a row abort the run.

No host-device synchronisation per micro-step: finiteness is kept on the device and decided once per
optimizer step (one small collective, one ``.item()``); the metrics stay on the device until a
logging step. ``data_wait_fraction`` is the share of the window's wall time spent waiting for the
loader.
"""
from __future__ import annotations

import functools
import math
import operator
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from beit.data.loading.heldout import good_rows
from beit.data.pipelines.transforms import encoder_input, tokenizer_input
from beit.runtime.data_wait import DataWait
from beit.runtime.faults import NonFiniteLossError


@dataclass
class TrainState:
    step: int = 0                    # optimizer steps done (skipped ones included)
    epoch: int = 0
    nonfinite_steps: int = 0         # optimizer steps skipped for a non-finite loss, in total
    nonfinite_in_a_row: int = 0
    scaler_skipped_steps: int = 0    # fp16 only: steps the grad scaler skipped (normal while it calibrates)
    samples_seen: int = 0            # per rank
    train_seconds: float = 0.0       # wall time spent training, over all restarts (as of the last save)

    def to_dict(self) -> dict:
        return asdict(self)


def batch_to_device(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised float encoder views, bool mask) on ``device``; uint8 views are converted there."""
    images = encoder_input(batch["image"].to(device, non_blocking=True))
    mask = batch["mask"].to(device, non_blocking=True).bool()
    return images, mask


def batch_tokens(batch: dict, tokenizer, device) -> torch.Tensor:
    """Target token ids [B, h, w]: the batch's own (pre-tokenised, from a token cache) when it carries
    them, otherwise the frozen tokenizer's on the batch's tokenizer view. The one place the loop
    meets the tokenizer."""
    if "tokens" in batch:
        return batch["tokens"].to(device, non_blocking=True).long()
    with torch.no_grad():
        return tokenizer.tokenize(tokenizer_input(batch["tokenizer_image"].to(device, non_blocking=True)))


def masked_labels(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token ids at the masked positions, ordered like the model's logits."""
    if tokens.shape[1:] != mask.shape[1:] and tokens[0].numel() != mask[0].numel():
        raise ValueError(f"token grid {tuple(tokens.shape[1:])} != mask grid {tuple(mask.shape[1:])}")
    return tokens.flatten(1)[mask.flatten(1)]


def prediction_branches(model) -> tuple[str, ...]:
    """The names of the predictions an (unwrapped) MIM model makes: ``("mim",)``, or its own ``branches``."""
    return tuple(getattr(model, "branches", ("mim",)))


def as_branches(outputs) -> dict[str, torch.Tensor]:
    """A MIM model's output as ``{branch: logits}``: a plain tensor is the one ``mim`` prediction."""
    return outputs if isinstance(outputs, dict) else {"mim": outputs}


def mim_losses(outputs, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(training loss, {branch: (cross-entropy, logits)}): ``outputs`` is the model's, the logits of the masked
    positions, or ``{branch: logits}`` when it predicts them several ways (BEiT v2: ``mim`` and ``cls_pt``);
    every branch predicts the same labels and the loss is the sum of their cross-entropies, as in the reference."""
    per = {name: (F.cross_entropy(logits.float(), labels), logits) for name, logits in as_branches(outputs).items()}
    return functools.reduce(operator.add, (loss for loss, _ in per.values())), per


class MimMeter:
    """Sums of each branch's loss and hits, and the label histogram, on this rank; ``reduce`` sums over ranks in
    one collective. The majority baseline is the hit rate of always predicting the most frequent masked
    token of the window (a constant predictor that even knows the window's label counts)."""

    def __init__(self, vocab_size: int, device, branches: tuple[str, ...] = ("mim",)):
        self.vocab_size, self.device, self.branches = vocab_size, device, tuple(branches)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.branches), 3, dtype=torch.float64, device=self.device)  # loss*n, hits, n
        self.hist = torch.zeros(self.vocab_size, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, per_branch: dict[str, tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor,
               keep: torch.Tensor | None = None) -> None:
        """Add a micro-batch (``per_branch`` as ``mim_losses`` returns it); ``keep`` (a 0-d bool tensor, on the
        device) drops it without a host sync."""
        n = torch.tensor(float(labels.numel()), dtype=torch.float64, device=self.device)
        sums = torch.stack([torch.stack([loss.detach().double() * n, (logits.argmax(-1) == labels).sum().double(), n])
                            for loss, logits in (per_branch[b] for b in self.branches)])
        hist = torch.bincount(labels, minlength=self.vocab_size).double()
        if keep is not None:
            w = keep.to(torch.float64)
            sums, hist = torch.where(keep, sums, 0.0), hist * w  # where: nan * 0 would stay nan
        self.sums += sums
        self.hist += hist

    def state_dict(self) -> dict | None:
        """This rank's open logging window (None when empty), saved with a checkpoint taken inside a window
        (a stop at any step) so the resumed run logs the same window."""
        if float(self.sums[0, 2]) == 0:
            return None
        return {"sums": self.sums.tolist(), "hist": self.hist.tolist()}

    def load_state_dict(self, state: dict | None, rank: int = 0) -> None:
        """Continue the saved window; from ``{"saved_ranks": [...]}`` (another process count) rank 0 takes the sum of
        the saved ranks' windows, the other ranks none: the logged window is the sum over ranks either way."""
        self.reset()
        if state and "saved_ranks" in state:
            parts = [p for p in state["saved_ranks"] if p] if rank == 0 else []
            state = {key: sum(torch.tensor(p[key], dtype=torch.float64) for p in parts).tolist()
                     for key in ("sums", "hist")} if parts else None
        if state:
            self.sums = torch.tensor(state["sums"], dtype=torch.float64, device=self.device)
            self.hist = torch.tensor(state["hist"], dtype=torch.float64, device=self.device)

    def reduce(self, accelerator) -> dict:
        """Sum over ranks (every rank must call it) and return loss, mim_acc, majority_acc, tokens (and
        ``<branch>_loss``, ``<branch>_mim_acc`` of every other branch)."""
        flat = torch.cat([self.sums.flatten(), self.hist])
        if accelerator.num_processes > 1:
            flat = accelerator.reduce(flat, reduction="sum")
        sums = flat[:self.sums.numel()].view_as(self.sums).tolist()
        hist = flat[self.sums.numel():]
        n = sums[0][2]
        if n == 0:
            return {"tokens": 0}
        out = {}
        for branch, (loss_sum, hits, _) in zip(self.branches, sums):
            prefix = "" if branch == "mim" else f"{branch}_"
            out.update({f"{prefix}loss": loss_sum / n, f"{prefix}mim_acc": hits / n})
        return {**out, "majority_acc": float(hist.max()) / n, "tokens": int(n), "token_perplexity": _perplexity(hist)}


MIN_LIFT = 0.01  # a lift over the majority baseline below one point is not learning either


def learning_check(mim_acc: float, majority_acc: float, tokens: int, where: str) -> dict:
    """Whether masked-token accuracy beats always predicting the most frequent token by more than its noise:
    three standard errors of the baseline's rate over ``tokens`` masked tokens, and at least ``MIN_LIFT``. The
    result (``learning``, the numbers and, when not learning, a ``warning`` that says what to change) goes
    into the run's summary."""
    noise = max(3 * math.sqrt(max(majority_acc * (1 - majority_acc), 1e-12) / max(tokens, 1)), MIN_LIFT)
    out = {"learning": mim_acc - majority_acc > noise, "on": where, "mim_acc": mim_acc,
           "majority_acc": majority_acc, "tokens": tokens, "noise": noise}
    if not out["learning"]:
        out["warning"] = (
            f"pretraining did not learn: {where} masked-token accuracy {mim_acc:.3f} is within noise (+-{noise:.3f} "
            f"over {tokens:,} masked tokens) of always predicting the most frequent token ({majority_acc:.3f}), so "
            "the encoder has learnt nothing the tokens show and fine-tuning will gain little over training from "
            "scratch. To change: train longer (--epochs); use tokens that say more about a patch (a larger "
            "--vocab_size or smaller patches for the tokenizer; `beit tokenizer report` shows how much of the "
            "images the most frequent token covers); or leave out the size flags, so the recipe fitted to the "
            "data chooses them")
    return out


def learning_of(summary: dict, last_logged: dict) -> dict:
    """The run summary's ``learning`` check (and ``warnings``): on the held-out score, else on the last logged
    training window; {} when neither was measured."""
    if "val/mim_acc" in summary:
        check = learning_check(summary["val/mim_acc"], summary["val/majority_acc"], summary["val/tokens"], "held-out")
    elif "mim_acc" in last_logged and last_logged.get("tokens"):
        check = learning_check(last_logged["mim_acc"], last_logged["majority_acc"], int(last_logged["tokens"]),
                               "training")
    else:
        return {}
    warning = check.pop("warning", None)
    return {"learning": check, **({"warnings": [warning]} if warning else {})}


def _perplexity(hist: torch.Tensor) -> float:
    p = hist[hist > 0] / hist.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def all_ranks_true(flag: torch.Tensor, accelerator) -> bool:
    """True only if the 0-d bool ``flag`` is true on every rank (one small collective, one host sync)."""
    bad = (~flag).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


def train_one_epoch(model, tokenizer, loader, optimizer, schedule, accelerator, state: TrainState, *,
                    total_steps: int, clip_grad: float, max_nonfinite_in_a_row: int, log_every: int,
                    logger, after_step=None, progress=None, data_stats=None, meter: MimMeter | None = None,
                    pictures=None) -> None:
    """Run the rest of epoch ``state.epoch`` (or until ``total_steps`` optimizer steps are done).

    ``tokenizer`` may be None when the batches carry their tokens (a token cache).
    ``after_step(state)`` is called on every rank after each optimizer step (checkpointing);
    ``data_stats()`` returns this rank's data-error counts to be summed into the logged metrics;
    pass the same ``meter`` to every epoch so a logging window may span an epoch boundary;
    ``pictures(step, images, mask, tokens, logits)`` draws the step's last micro-batch when
    ``pictures.due(step)`` (TensorBoard images, beit.runtime.train_pictures).
    """
    from beit.optim.step_work import OptimizerStep
    model.train()
    opt = OptimizerStep(accelerator, model, optimizer)
    if meter is None:
        unwrapped = accelerator.unwrap_model(model)
        meter = MimMeter(unwrapped.lm_head.out_features, accelerator.device, prediction_branches(unwrapped))
    window_ok = torch.ones((), dtype=torch.bool, device=accelerator.device)
    last_grad_norm = None
    t0, samples0 = time.time(), state.samples_seen
    waiting = DataWait(loader)
    for batch in waiting:
        if state.step >= total_steps:
            break
        images, mask = batch_to_device(batch, accelerator.device)
        tokens = batch_tokens(batch, tokenizer, accelerator.device)
        labels = masked_labels(tokens, mask)
        state.samples_seen += images.shape[0]
        with accelerator.accumulate(model):
            with accelerator.autocast():
                outputs = model(images, mask)
            loss, per_branch = mim_losses(outputs, labels)
            finite = torch.isfinite(loss.detach())
            # always backward (every rank takes part in the gradient all-reduce); a non-finite loss
            # makes the window's gradients non-finite and the step is then dropped as a whole
            accelerator.backward(loss)
            meter.update(per_branch, labels, keep=finite)
            window_ok = window_ok & finite
            if not accelerator.sync_gradients:
                continue
            lr, wd = schedule.step()
            max_norm = clip_grad if clip_grad > 0 else float("inf")
            norm = opt.clip(max_norm)
            # DeepSpeed clips inside its engine (config gradient_clipping) and may return None here
            last_grad_norm = norm.detach() if torch.is_tensor(norm) else norm
            # a finite loss can still give inf/nan gradients; without a grad scaler (which skips
            # such steps itself) they would poison the weights, so the step is dropped instead
            if accelerator.scaler is None and torch.is_tensor(norm):
                window_ok = window_ok & torch.isfinite(norm.detach())
            window_bad = not all_ranks_true(window_ok, accelerator)  # the one host sync of the step
            if window_bad:
                state.nonfinite_steps += 1
                state.nonfinite_in_a_row += 1
                logger.info(f"step {state.step + 1}: non-finite loss or gradient, optimizer step skipped "
                            f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_steps} in total)")
                if state.nonfinite_in_a_row >= max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"the loss or gradients were non-finite for {state.nonfinite_in_a_row} consecutive optimizer "
                        "steps "
                        f"(up to step {state.step + 1}, lr {lr:.3g}): training diverged. The weights were not "
                        "updated by those steps, so the last checkpoint is intact. Lower --lr, lengthen "
                        "--warmup_epochs/--warmup_steps, lower --clip_grad, or use --mixed_precision bf16/no "
                        "instead of fp16, then rerun the same command to resume.")
            else:
                state.nonfinite_in_a_row = 0
                opt.step()
                if accelerator.optimizer_step_was_skipped:  # fp16 grad scaler found inf/nan gradients
                    state.scaler_skipped_steps += 1
            opt.zero_grad()
            step_ok = not window_bad
            window_ok = torch.ones((), dtype=torch.bool, device=accelerator.device)
            state.step += 1
            if progress is not None:
                progress.update(1)
            if state.step % log_every == 0 or state.step == total_steps:
                metrics = meter.reduce(accelerator)
                meter.reset()
                dt = max(time.time() - t0, 1e-9)
                metrics.update(epoch=state.epoch, lr=lr, weight_decay=wd,
                               grad_norm=float("nan") if last_grad_norm is None else float(last_grad_norm),
                               nonfinite_steps=state.nonfinite_steps, scaler_skipped_steps=state.scaler_skipped_steps,
                               samples_per_s=(state.samples_seen - samples0) * accelerator.num_processes / dt,
                               data_wait_fraction=waiting.fraction())
                waiting.reset()
                if data_stats is not None:
                    metrics.update(data_stats())
                t0, samples0 = time.time(), state.samples_seen
                logger.log(metrics, step=state.step)
                if progress is not None and "loss" in metrics:
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['mim_acc']:.3f}",
                                         base=f"{metrics['majority_acc']:.3f}", refresh=False)
            if pictures is not None and step_ok and pictures.due(state.step):
                pictures(state.step, images, mask, tokens, per_branch["mim"][1])
            if after_step is not None:
                after_step(state)


@torch.no_grad()
def evaluate_mim(model, tokenizer, loader, accelerator, max_batches: int = 0) -> dict:
    """Masked-token accuracy (of every prediction branch) on held-out data beside the majority-token baseline
    (summed over ranks).

    The baseline predicts the single most frequent masked token of the held-out set itself, which
    is the best any constant prediction can do there. With a ``HeldOutStream`` loader, samples that
    did not decode are left out and counted (``bad_images``); ``images`` counts the scored ones."""
    model.eval()
    meter = MimMeter(tokenizer.vocab_size, accelerator.device, prediction_branches(model))
    counts = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # images scored, images bad
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        if "bad" in batch:  # a held-out stream: leave out (and count) the samples that did not decode
            ok = good_rows(batch)
            counts[1] += int((~ok).sum())
            batch = {k: v[ok] for k, v in batch.items() if torch.is_tensor(v)}
            if not len(batch["mask"]):
                continue
        counts[0] += len(batch["mask"])
        images, mask = batch_to_device(batch, accelerator.device)
        labels = masked_labels(batch_tokens(batch, tokenizer, accelerator.device), mask)
        with accelerator.autocast():
            outputs = model(images, mask)
        loss, per_branch = mim_losses(outputs, labels)
        meter.update(per_branch, labels, keep=torch.isfinite(loss))
    model.train()
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    images, bad_images = counts.cpu().tolist()
    return {**meter.reduce(accelerator), "images": int(images), "bad_images": int(bad_images)}
