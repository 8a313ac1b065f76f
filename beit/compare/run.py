"""Does BEiT pretraining pay off on this data? One command that answers it with numbers.

    beit compare --train_shards 'shards/mine/train-*.tar' --test_shards 'shards/mine/test-*.tar' \
        --unlabelled_shards 'shards/unlabelled/*.tar' --label_fraction 0.1 --seeds 0,1,2 --output_dir runs/compare

Per seed, on a seeded stratified subset of the training labels (``label_fraction``):

1. fit the k-means visual-word tokenizer on the unlabelled images (or use ``--tokenizer_path``);
2. pretrain BEiT on the unlabelled images (``beit pretrain``; kNN health metric logged);
3. fine-tune it on the label subset (``beit finetune``);
4. the same ViT from scratch with the same recipe and budget, and with a recipe fitted to it (the
   fine-tune length chosen on its training loss or on a validation split of the label subset);
5. a linear probe, a kNN classifier and a logistic regression on the pretrained features;
6. a logistic regression on the pixels.

Everything is scored on the held-out test shards, which no stage trains on or chooses anything
by. Writes ``compare.json`` (per-seed values, margins, recipes, code version), ``compare.md``
(table + verdict) and ``compare.png`` in ``--output_dir``; every stage is a run folder there.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

from beit.compare import recipe
from beit.compare.options import CompareConfig


def _digest(samples: list[dict]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s['key']}:{s['label']}:{len(s['data'])}".encode())
    return h.hexdigest()[:16]


def run_seed(cfg: CompareConfig, seed: int, train: list[dict], test_pat: str, test_views, label_map: dict,
             unlabelled: str) -> dict:
    from beit.compare import stages
    from beit.compare.baselines import feature_baselines, logistic_regression, pixels_of
    from beit.compare.labels import stratified_subset, write_labelled
    from beit.data.storage.shardspec import expand_shards
    from beit.engines.knn import load_views

    m = set(cfg.methods)
    sdir = Path(cfg.output_dir) / f"seed{seed}"
    clock = [("start", time.time())]
    subset, _ = stratified_subset(train, cfg.label_fraction, seed)
    train_pat = write_labelled(subset, sdir / "labels", "train", label_map, f"compare:labels-seed{seed}", seed)
    rec: dict = {"seed": seed, "labels": len(subset), "labels_digest": _digest(subset)}
    rows: dict[str, float] = {}
    ft_shared = {**recipe.FINETUNE, **cfg.finetune}
    ft_scratch = {**ft_shared, **recipe.SCRATCH}
    pre = None
    if m & {"beit", "linear_probe", "knn", "logreg_features"}:
        if cfg.tokenizer_path:
            tok_kind, tok_path = cfg.tokenizer, cfg.tokenizer_path
            rec["tokenizer"] = stages.token_stats(tok_kind, tok_path, unlabelled, cfg.image_size)
        else:
            tok = stages.fit_tokenizer(unlabelled, sdir / "tokenizer", seed, cfg.model, cfg.tokenizer_fit,
                                       tracking=cfg.tracking)
            tok_kind, tok_path = "kmeans", tok["path"]
            rec["tokenizer"] = tok
        clock.append(("tokenizer", time.time()))
        from beit.modeling.backbones import backbone_for
        knn = (train_pat, test_pat) if cfg.health_knn and backbone_for(cfg.arch).patch_tokens else None
        pre = stages.pretrain(unlabelled, tok_kind, tok_path, sdir / "pretrain", seed, cfg.model, cfg.pretrain,
                              knn, cfg.knn_k, test_pat, tracking=cfg.tracking)
        rec["pretrain"] = {k: v for k, v in pre.items() if k.startswith(("val/", "knn/")) or k in ("train_seconds",
                                                                                                   "step", "epoch")}
        clock.append(("pretrain", time.time()))
    beit = None
    if "beit" in m:
        beit = stages.finetune(train_pat, test_pat, sdir / "finetune_beit", seed, cfg.model, ft_shared,
                               init=pre["pretrained"], tracking=cfg.tracking)
        rows["beit"], rec["beit"] = beit["top1"], beit
        clock.append(("finetune_beit", time.time()))
    scratch = None
    if "scratch" in m:
        scratch = stages.finetune(train_pat, test_pat, sdir / "finetune_scratch", seed, cfg.model, ft_scratch,
                                  tracking=cfg.tracking)
        rows["scratch"], rec["scratch"] = scratch["top1"], scratch
        clock.append(("finetune_scratch", time.time()))
    if "scratch_fitted" in m:
        from beit.compare.fitted import fit_scratch
        fitted = fit_scratch(cfg, sdir, seed, train_pat, test_pat, subset, label_map, ft_scratch, scratch, beit)
        rows["scratch_fitted"], rec["scratch_fitted"] = fitted["top1"], fitted
        clock.append(("scratch_fitted", time.time()))
    if "linear_probe" in m:
        lp = stages.finetune(train_pat, test_pat, sdir / "linear_probe", seed, cfg.model,
                             {**ft_shared, **recipe.LINEAR_PROBE, **cfg.linear_probe}, init=pre["pretrained"],
                             tracking=cfg.tracking)
        rows["linear_probe"], rec["linear_probe"] = lp["top1"], lp
        clock.append(("linear_probe", time.time()))
    if m & {"distill", "student"}:
        from beit.compare.recipe_devices import DISTILL, STUDENT
        student = {**STUDENT, **cfg.student}
        smodel = {"arch": student.pop("model"), "image_size": cfg.image_size}
        if "distill" in m:
            teach = {"task": "distill", "teacher": str(sdir / "finetune_beit" / "model.safetensors"),
                     "unlabelled_shards": unlabelled, **DISTILL, **cfg.distill}
            dist = stages.finetune(train_pat, test_pat, sdir / "distill", seed, smodel,
                                   {**ft_shared, **student, **teach}, tracking=cfg.tracking)
            rows["distill"], rec["distill"] = dist["top1"], dist
            clock.append(("distill", time.time()))
        if "student" in m:
            alone = stages.finetune(train_pat, test_pat, sdir / "student", seed, smodel, {**ft_shared, **student},
                                    tracking=cfg.tracking)
            rows["student"], rec["student"] = alone["top1"], alone
            clock.append(("student", time.time()))
    train_views = load_views(expand_shards(train_pat), cfg.image_size)
    if m & {"knn", "logreg_features"}:
        feats = feature_baselines(pre["pretrained"], train_views, test_views, cfg.knn_k)
        rows.update({k: v for k, v in feats.items() if k in m})
        clock.append(("features", time.time()))
    if "logreg_pixels" in m:
        rows["logreg_pixels"] = logistic_regression(pixels_of(train_views[0]), train_views[1].numpy(),
                                                    pixels_of(test_views[0]), test_views[1].numpy())
        clock.append(("logreg_pixels", time.time()))
    rec["top1"] = rows
    rec["seconds"] = {b: round(tb - ta, 1) for (_, ta), (b, tb) in zip(clock, clock[1:])}
    return rec


def run_compare(cfg: CompareConfig) -> dict:
    """Run every seed and write the results; returns the results dict (as in compare.json)."""
    import torch

    from beit.compare.labels import check_disjoint, label_map_of, read_labelled
    from beit.compare.recipe_devices import STUDENT
    from beit.compare.report import NAMES, code_version, markdown, method_names, verdict, write_results
    from beit.data.storage.shardspec import expand_shards
    from beit.engines.knn import load_views
    from beit.runtime.stopping import stop_signals
    from beit.runtime.trackers import check_trackers

    cfg.validate()
    check_trackers(cfg.trackers())  # every stage reports to them: a missing one stops the comparison here
    if cfg.tokenizer_path == "" and cfg.tokenizer != "kmeans":
        raise ValueError(f"only a k-means tokenizer is fitted by beit compare; for --tokenizer {cfg.tokenizer} pass "
                         "--tokenizer_path to the saved tokenizer")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    code = code_version()  # of the code as it starts (files edited during the run do not count)
    out = Path(cfg.output_dir)
    train = read_labelled(cfg.train_shards, "train_shards")
    test = read_labelled(cfg.test_shards, "test_shards")
    duplicates = check_disjoint(train, test)
    unlabelled = cfg.unlabelled_shards or cfg.train_shards
    try:
        expand_shards(unlabelled)
    except ValueError as e:
        raise ValueError(f"--unlabelled_shards: {e}") from None
    label_map = label_map_of(cfg.train_shards)
    test_views = load_views(expand_shards(cfg.test_shards), cfg.image_size)
    with stop_signals():  # a stop signal: the running stages stop with their checkpoints, what finished is kept
        per_seed = _run_seeds(cfg, train, test_views, label_map, unlabelled)
    methods = [m for m in NAMES if m in per_seed[0]["top1"]]
    rows = {m: [r["top1"][m] for r in per_seed] for m in methods}
    names = method_names(cfg.arch, {**STUDENT, **cfg.student}["model"])
    if "scratch_fitted" in methods:
        from beit.compare.fitted import row_mark
        mark = row_mark([r["scratch_fitted"] for r in per_seed], [r["seed"] for r in per_seed])
        names["scratch_fitted"] += f" ({mark})" if mark else ""
    verdict_md, margins = verdict(rows, names)
    n_labels = sorted({r["labels"] for r in per_seed})
    header = (f"Held-out top-1 (%) on {len(test_views[1])} test images, {'/'.join(map(str, n_labels))} training labels "
              f"({cfg.label_fraction:.0%} of {len(train)}), seeds {', '.join(map(str, cfg.seeds))} "
              "(mean ± std over seeds)")
    minutes = (time.time() - t0) / 60
    notes = _notes(cfg, per_seed, unlabelled, minutes)
    results = {"rows": rows, "names": {m: names[m] for m in methods}, "margins": margins, "per_seed": per_seed,
               "code": code, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
               "recipe": {"model": cfg.model, **_device_recipes(cfg), "tokenizer": {**recipe.TOKENIZER,
                                                                                    **cfg.tokenizer_fit},
                          "pretrain": {**recipe.PRETRAIN, **cfg.pretrain},
                          "finetune": {**recipe.FINETUNE, **cfg.finetune}, "scratch": recipe.SCRATCH,
                          "linear_probe": {**recipe.LINEAR_PROBE, **cfg.linear_probe}},
               "data": {"train_labelled": len(train), "test": len(test_views[1]), "unlabelled_shards": unlabelled,
                        "test_images_identical_to_a_training_image": duplicates},
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "cuda": torch.cuda.is_available()},
               "minutes": round(minutes, 1)}
    md = markdown(rows, cfg.seeds, header, notes, verdict_md, names)
    write_results(out, results, md, header)
    print(md)
    return results


def init_job_process() -> None:
    """Start-up of a ``--jobs`` process: a spawned child inherits the "spawn" start method, so every data
    loader in it would re-import torch and the package in each of its workers at every epoch (the k-means
    fit took 20x as long); its own workers use the platform's default, as in a run of one seed at a time.
    It holds the stop signals for its whole life: a Ctrl-C (or the signal the parent passes on) stops its
    running stage with a checkpoint, never the process itself."""
    import multiprocessing

    from beit.runtime.stopping import STOP
    multiprocessing.set_start_method(None, force=True)
    STOP.install()


def job_pool(jobs: int):
    """``jobs`` spawned processes (a fork of a process with torch threads can deadlock), each started
    with :func:`init_job_process`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=init_job_process)


def _seed_in_process(cfg: CompareConfig, threads: int, seed: int, *args) -> dict:
    """One seed in a worker process of ``--jobs``: its own thread budget, then :func:`run_seed`."""
    import torch
    from threadpoolctl import threadpool_limits
    torch.set_num_threads(threads)
    with threadpool_limits(threads):
        return run_seed(cfg, seed, *args)


def _run_seeds(cfg: CompareConfig, train: list[dict], test_views, label_map: dict, unlabelled: str) -> list[dict]:
    """Every seed's record, in ``cfg.seeds`` order: one after another, or ``cfg.jobs`` at once in spawned
    processes (every stage is seeded and single-process, so the numbers do not depend on which)."""
    from threadpoolctl import threadpool_limits
    args = (train, cfg.test_shards, test_views, label_map, unlabelled)
    jobs = min(cfg.jobs, len(cfg.seeds))
    if jobs == 1:
        per_seed = []
        with threadpool_limits(cfg.threads or None):  # scikit-learn's BLAS threads too
            for seed in cfg.seeds:
                per_seed.append(run_seed(cfg, seed, *args))
                print(json.dumps(per_seed[-1], default=str), flush=True)
        return per_seed
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // jobs)
    print(f"compare: seeds {cfg.seeds} in {jobs} processes at once, {threads} thread(s) each", flush=True)
    with job_pool(jobs) as pool:
        futures = [pool.submit(_seed_in_process, cfg, threads, seed, *args) for seed in cfg.seeds]
        per_seed = _gather(pool, futures, cfg.seeds)
    for rec in per_seed:
        print(json.dumps(rec, default=str), flush=True)
    return per_seed


def _gather(pool, futures: list, seeds: list[int]) -> list[dict]:
    """Every seed's record; on a stop signal (passed on to the job processes: the running stages stop with their
    checkpoints) the seeds not started are cancelled and one ``RunStopped`` line says what finished and where each
    running seed stopped."""
    from concurrent import futures as cf

    from beit.runtime.faults import RunStopped
    from beit.runtime.stopping import STOP

    STOP.forward = lambda: list(getattr(pool, "_processes", None) or ())  # the job processes' pids
    pending = set(futures)
    while pending:
        _, pending = cf.wait(pending, timeout=0.5)
        if STOP.requested:
            for f in pending:
                f.cancel()
    stopped = [(seed, f.exception()) for seed, f in zip(seeds, futures) if not f.cancelled() and f.exception()]
    faults = [e for _, e in stopped if not isinstance(e, RunStopped)]
    if faults:
        raise faults[0]
    if stopped or any(f.cancelled() for f in futures):
        done = [seed for seed, f in zip(seeds, futures) if not f.cancelled() and not f.exception()]
        where = "; ".join(f"seed {seed} {str(e).split(';')[0]}" + (f" ({e.checkpoint})" if e.checkpoint else "")
                          for seed, e in stopped)
        raise RunStopped(f"stopped on {STOP.name}: seed(s) {done or 'none'} finished; {where or 'no seed started'}; "
                         "every finished stage is kept: rerun the same command to resume")
    return [f.result() for f in futures]


def _device_recipes(cfg: CompareConfig) -> dict:
    """The student and distillation recipes, when those methods ran."""
    from beit.compare.recipe_devices import DISTILL, STUDENT
    out = {}
    if {"distill", "student"} & set(cfg.methods):
        out["student"] = {**STUDENT, **cfg.student}
    if "distill" in cfg.methods:
        out["distill"] = {**DISTILL, **cfg.distill}
    return out


def _pretrain_length(cfg: CompareConfig, per_seed: list[dict]) -> str:
    steps = sorted({r["pretrain"].get("step") for r in per_seed if "pretrain" in r} - {None})
    args = {**recipe.PRETRAIN, **cfg.pretrain}
    length = f"{args['total_steps']} steps" if args.get("total_steps") else f"{args['epochs']} epochs"
    return f"{length} ({'/'.join(map(str, steps))} optimizer steps of {args['batch_size']} images)" if steps else length


def _notes(cfg: CompareConfig, per_seed: list[dict], unlabelled: str, minutes: float) -> str:
    import statistics
    if cfg.arch == "beit":
        model = (f"ViT/BEiT {cfg.image_size} px, patch {cfg.patch_size}, dim {cfg.embed_dim}, depth {cfg.depth}, "
                 f"{cfg.num_heads} heads")
    else:
        sizes = {k: v for k, v in cfg.model.items() if k not in ("arch", "image_size")}
        model = f"{cfg.arch} {cfg.image_size} px, token cell {cfg.patch_size} px, sizes {sizes}"
    parts = [f"Model: {model}. Pretraining {_pretrain_length(cfg, per_seed)} on "
             f"{unlabelled} (labels unused); fine-tuning {({**recipe.FINETUNE, **cfg.finetune})['epochs']} epochs, "
             "the same recipe for BEiT and the same-recipe scratch model (the scratch model without layer decay)."]
    if {"distill", "student"} & set(cfg.methods):
        from beit.compare.recipe_devices import DISTILL, STUDENT
        parts.append(f"Student: {({**STUDENT, **cfg.student})['model']} from scratch, the shared fine-tune recipe "
                     "without "
                     "layer decay, the same epochs on the same label subset"
                     + (f"; distilled with {({**DISTILL, **cfg.distill})} from the seed's fine-tuned BEiT model, each "
                        "batch of labelled images beside a batch of the unlabelled shards." if "distill" in cfg.methods
                        else "."))
    fitted = [r["scratch_fitted"] for r in per_seed if "scratch_fitted" in r]
    if fitted:
        seeds = [r["seed"] for r in per_seed if "scratch_fitted" in r]
        said = "; ".join(f"seed {s}: {f.get('decision_note') or str(f['chosen_epochs']) + ' epochs'}"
                         for s, f in zip(seeds, fitted))
        parts.append(f"Fitted scratch recipe: {fitted[0]['rule']}. What the rule did: {said}.")
    pre = [r["pretrain"] for r in per_seed if "pretrain" in r]
    if pre and "val/mim_acc" in pre[0]:
        parts.append("Held-out masked-token accuracy after pretraining "
                     f"{statistics.mean(p['val/mim_acc'] for p in pre):.3f} "
                     f"vs {statistics.mean(p['val/majority_acc'] for p in pre):.3f} for the majority token.")
    if pre and "knn/acc" in pre[0]:
        parts.append("kNN health metric at the end of pretraining "
                     f"{100 * statistics.mean(p['knn/acc'] for p in pre):.1f}% "
                     f"(majority class {100 * statistics.mean(p['knn/majority_acc'] for p in pre):.1f}%), costing "
                     f"{100 * statistics.mean(p['knn/cost_fraction'] or 0 for p in pre):.1f}% of the pretraining time.")
    parts.append(f"Total time {minutes:.1f} min; every stage's run folder is under {cfg.output_dir}/seed<N>/.")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    from beit.config import parse_config
    cfg = parse_config(CompareConfig, argv, description=__doc__)
    run_compare(cfg)
    return 0


if __name__ == "__main__":
    from beit.cli import call
    sys.exit(call(main))
