"""The fitted scratch baseline: the scratch model's own fine-tune length, and what the rule did to choose it.

``train_loss`` (default): climb a ladder of lengths (``scratch_epoch_factors`` x the shared epochs, then doubled up to
``scratch_max_factor``) and take the shortest whose final training loss reaches the BEiT fine-tune's. When none does,
the longest is kept and the row is marked under-fitted. When BEiT's loss sits within noise of the lowest loss label
smoothing allows (2 classes + smoothing 0.1: 0.1985), every model that fits the labels "reaches" it and the loss
comparison ranks noise: the rule then chooses on a validation split carved from the label subset instead.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from beit.compare.options import CompareConfig

FLOOR_NOISE_SHARE = 0.01  # of the loss range (chance - floor): the least headroom a loss comparison needs


def loss_floor(num_classes: int, smoothing: float) -> float:
    """The least mean cross-entropy against label-smoothed targets (their entropy): 0 without smoothing."""
    if num_classes < 2 or smoothing <= 0:
        return 0.0
    hi, lo = 1 - smoothing + smoothing / num_classes, smoothing / num_classes
    return -(hi * math.log(hi) + (num_classes - 1) * lo * math.log(lo))


def degenerate_loss(target: float, tail: list[float], num_classes: int, recipe: dict) -> str:
    """Why BEiT's training loss ``target`` cannot rank scratch lengths (it is within noise of the floor), or ""."""
    if recipe.get("mixup", 0) > 0 or recipe.get("cutmix", 0) > 0:
        return ""  # soft targets: no closed-form floor; the loss still ranks lengths by fit
    floor = loss_floor(num_classes, recipe.get("label_smoothing", 0.0))
    spread = statistics.stdev(tail) if len(tail) > 1 else 0.0
    noise = max(2 * spread, FLOOR_NOISE_SHARE * (math.log(max(num_classes, 2)) - floor))
    if target - floor >= noise:
        return ""
    return (f"BEiT's training loss {target:.5f} is {target - floor:.5f} above the floor {floor:.4f} of {num_classes} "
            f"classes with label smoothing {recipe.get('label_smoothing', 0.0)}, less than the noise {noise:.5f} "
            f"(2 x the std of its last {len(tail)} epochs' losses, at least {FLOOR_NOISE_SHARE:.0%} of ln(classes) - "
            "floor)")


def ladder(cfg: CompareConfig) -> list[float]:
    """``scratch_epoch_factors`` sorted, then doubled (the last step capped) up to ``scratch_max_factor``."""
    factors = sorted(cfg.scratch_epoch_factors)
    while factors[-1] < cfg.scratch_max_factor:
        factors.append(min(2 * factors[-1], cfg.scratch_max_factor))
    return factors


def fit_scratch(cfg: CompareConfig, sdir: Path, seed: int, train: str, test: str, subset: list[dict],
                label_map: dict, base: dict, same_recipe: dict | None, beit: dict | None) -> dict:
    """The scratch model fine-tuned with its own length (see the module), scored on ``test``; the record says
    the rule, what it did (``decision``: reached / under_fitted / val, and ``decision_note``) and every length
    tried."""
    factors = ladder(cfg)
    epochs_of = {f: max(1, round(base["epochs"] * f)) for f in factors}
    target = beit["train_loss"] if beit else None
    num_classes = len(label_map) or len({s["label"] for s in subset})
    why_val = "--scratch_fit val" if cfg.scratch_fit == "val" else ""
    if not why_val and target is None:
        why_val = "no BEiT fine-tune to compare training losses with"
    elif not why_val:
        why_val = degenerate_loss(target, beit.get("train_loss_tail") or [], num_classes, base)
    if why_val:
        return _on_validation(cfg, sdir, seed, train, test, subset, label_map, base, factors, epochs_of, why_val)
    from beit.compare.stages import finetune
    tried = []
    for f in factors:
        if f == 1.0 and same_recipe is not None:
            res = same_recipe
        else:
            res = finetune(train, test, sdir / "scratch_fit" / f"epochs{epochs_of[f]}", seed, cfg.model,
                           {**base, "epochs": epochs_of[f]}, tracking=cfg.tracking)
        tried.append({"factor": f, "epochs": epochs_of[f], "train_loss": res["train_loss"], "top1": res["top1"]})
        if res["train_loss"] is not None and res["train_loss"] <= target:
            note = f"{epochs_of[f]} epochs reached BEiT's training loss ({res['train_loss']:.4f} <= {target:.4f})"
            return {**res, "chosen_factor": f, "chosen_epochs": epochs_of[f], "tried": tried, "decision": "reached",
                    "decision_note": note, "rule": _loss_rule(factors, epochs_of)}
    f = factors[-1]
    losses = ", ".join(f"{t['train_loss']:.4f} at {t['epochs']}" for t in tried if t["train_loss"] is not None)
    note = (f"under-fitted at {epochs_of[f]} epochs: no length up to the budget ({epochs_of[f]} epochs) reached "
            f"BEiT's training loss {target:.4f} (scratch: {losses})")
    return {**res, "chosen_factor": f, "chosen_epochs": epochs_of[f], "tried": tried, "decision": "under_fitted",
            "decision_note": note, "rule": _loss_rule(factors, epochs_of)}


def _loss_rule(factors: list[float], epochs_of: dict) -> str:
    return (f"the shortest of {[epochs_of[f] for f in factors]} epochs whose final training loss reaches the BEiT "
            "fine-tune's (a row that reaches none is marked under-fitted; when BEiT's loss is within noise of the "
            "label-smoothing floor, the choice is made on a validation split instead)")


def _on_validation(cfg: CompareConfig, sdir: Path, seed: int, train: str, test: str, subset: list[dict],
                   label_map: dict, base: dict, factors: list[float], epochs_of: dict, why: str) -> dict:
    """Each length trained on the label subset less a carved validation split, the best top-1 there chosen,
    then retrained on all of the subset and scored on ``test``."""
    from beit.compare.labels import stratified_subset, write_labelled
    from beit.compare.stages import finetune
    val_part, fit_part = stratified_subset(subset, cfg.val_fraction, seed + 1000)
    fit_pat = write_labelled(fit_part, sdir / "scratch_fit" / "labels", "fit", label_map, "compare:fit", seed)
    val_pat = write_labelled(val_part, sdir / "scratch_fit" / "labels", "val", label_map, "compare:val", seed)
    tried = []
    for f in factors:
        res = finetune(fit_pat, val_pat, sdir / "scratch_fit" / f"val_epochs{epochs_of[f]}", seed, cfg.model,
                       {**base, "epochs": epochs_of[f]}, tracking=cfg.tracking)
        tried.append({"factor": f, "epochs": epochs_of[f], "train_loss": res["train_loss"], "val_top1": res["top1"]})
    best = max(tried, key=lambda t: (t["val_top1"], -t["factor"]))
    chosen = best["factor"]
    final = finetune(train, test, sdir / "scratch_fitted", seed, cfg.model, {**base, "epochs": epochs_of[chosen]},
                     tracking=cfg.tracking)
    scores = ", ".join(f"{t['val_top1']:.1f}% at {t['epochs']}" for t in tried)
    note = (f"chosen on {len(val_part)} validation images ({why}): {epochs_of[chosen]} epochs (validation top-1 "
            f"{scores})")
    rule = (f"{[epochs_of[f] for f in factors]} epochs chosen by top-1 on {len(val_part)} validation images carved "
            "from the label subset, then retrained on all of it")
    return {**final, "chosen_factor": chosen, "chosen_epochs": epochs_of[chosen], "tried": tried, "decision": "val",
            "decision_note": note, "rule": rule}


def row_mark(fitted: list[dict], seeds: list[int]) -> str:
    """The table's mark for the fitted scratch row: the seeds on which it stayed under-fitted, or ""."""
    under = [(s, f["chosen_epochs"]) for s, f in zip(seeds, fitted) if f.get("decision") == "under_fitted"]
    if not under:
        return ""
    epochs = sorted({e for _, e in under})
    return (f"under-fitted at {'/'.join(map(str, epochs))} epochs on seed{'s' if len(under) > 1 else ''} "
            f"{', '.join(str(s) for s, _ in under)}")
