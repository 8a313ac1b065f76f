"""Pictures of a pretraining or fine-tuning run and the ``index.html`` that shows them.

    beit viz runs/demo/pretrain                     # newest checkpoint, CPU or GPU
    beit viz runs/demo/pretrain --checkpoint 100 --blocks 1,4 --patch 2,5
    beit viz runs/demo/finetune --device cpu

Pretraining: held-out images with their block masks; per image the tokenizer's token map, the
model's predicted tokens at the masked patches and where they agree; the reconstruction decoded from
the predicted tokens (tokenizers with a decoder); attention of the CLS token and of a patch; curves.
Fine-tuning: confusion matrix with class names (classification) or prediction / ground-truth
overlays (segmentation); attention; curves. Writes RUN_DIR/viz/*.png and RUN_DIR/index.html.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from beit.viz.report import Section, write_report
from beit.viz.run_folder import RunFolder, class_names, load_model, open_run, resolve_weights


def _attention_section(model, forward, images_hwc, grid_hw, cfg, out: Path, depth: int, what: str) -> Section:
    from beit.viz.attention_maps import draw_attention, parse_blocks, parse_patch, record_attention

    blocks = parse_blocks(cfg.blocks, depth)
    patch = parse_patch(cfg.patch, grid_hw)
    maps = record_attention(model, forward, blocks)
    if not maps:  # e.g. a linear probe stops before the chosen blocks
        return Section("Attention", None, f"blocks {cfg.blocks or 'first, middle, last'} did not run in this "
                       "model's forward pass: choose others with --blocks", note=True)
    path = draw_attention(images_hwc, maps, grid_hw, patch, out / "attention.png")
    return Section("Attention", path, f"Recomputed from each block's qkv weights and relative position bias "
                                      f"(the fused kernel does not expose them), {what}.")


def pretrain_sections(run: RunFolder, model, cfg, out: Path, device) -> tuple[list[Section], dict]:
    from beit.data.pipelines.transforms import encoder_input, tokenizer_input
    from beit.engines.pretrain import as_branches
    from beit.tokenizers import load_tokenizer
    from beit.viz.figures import hwc
    from beit.viz.heldout_samples import pretrain_samples
    from beit.viz.masks import draw_masks
    from beit.viz.reconstruction import cannot_decode, draw_reconstruction
    from beit.viz.tokens import draw_tokens

    tok_path = cfg.tokenizer_path or run.cfg.tokenizer_path
    if tok_path and not Path(tok_path).with_suffix(".json").exists() and not Path(tok_path).exists():
        raise FileNotFoundError(f"the run's tokenizer {tok_path} is not there (moved, or a relative path from "
                                "another folder): pass --tokenizer_path")
    tokenizer = load_tokenizer(run.cfg.tokenizer, tok_path).to(device)
    batch = pretrain_samples(run.cfg, tokenizer, cfg.num_images, cfg.val_shards or None)
    images = encoder_input(batch["image"].to(device))
    mask = batch["mask"].to(device).bool()
    with torch.no_grad():
        target = tokenizer.tokenize(tokenizer_input(batch["tokenizer_image"].to(device)))
        branches = as_branches(model(images, mask))
    predicted = target.clone().flatten(1)
    predicted[mask.flatten(1)] = branches["mim"].argmax(-1)
    predicted = predicted.view_as(target)
    hits = int((predicted[mask] == target[mask]).sum())
    cls_pt = (f"; the CLS-pretraining branch {int((branches['cls_pt'].argmax(-1) == target[mask]).sum())}"
              if "cls_pt" in branches else "")
    sections = [
        Section("Masks", draw_masks(batch["image"], mask, out / "masks.png"),
                "Held-out images (the run's held-out view: the whole image, no jitter or flip) and the seeded "
                "block masks of its evaluation."),
        Section("Tokens", draw_tokens(batch["tokenizer_image"], target, predicted, mask, tokenizer.vocab_size,
                                      out / "tokens.png"),
                f"{hits} of {int(mask.sum())} masked tokens predicted exactly{cls_pt} ({tokenizer.kind} tokenizer, "
                f"{tokenizer.vocab_size} tokens; one colour per token id)."),
    ]
    reason = cannot_decode(tokenizer)
    if reason:
        sections.append(Section("Reconstruction", None, reason, note=True))
    else:
        sections.append(Section("Reconstruction", draw_reconstruction(
            tokenizer, batch["tokenizer_image"], target, predicted, mask, out / "reconstruction.png"),
            "BEiT's picture: the tokenizer's decoder applied to the predicted tokens at the masked patches and to "
            "the tokenizer's own tokens at the visible ones; beside it the tokenizer's reconstruction of its own "
            "tokens (the best the model could reach)."))
    sections.append(_attention_section(model, lambda: model.forward_features(images), hwc(batch["image"]),
                                       model.grid_size, cfg, out, len(model.blocks), "on the unmasked images"))
    facts = {"tokenizer": f"{tokenizer.kind} ({tok_path}), vocab {tokenizer.vocab_size}",
             "pictured masked-token accuracy": f"{hits / max(1, int(mask.sum())):.1%} on {len(images)} images"}
    return sections, facts


def _grid_of(model) -> tuple[int, int] | None:
    from beit.viz.attention import encoder_blocks
    for owner in (model, getattr(model, "encoder", None), getattr(model, "backbone", None)):
        pe = getattr(owner, "patch_embed", None)
        if pe is not None and hasattr(pe, "grid_size"):
            try:
                encoder_blocks(owner)
            except ValueError:
                return None
            return tuple(pe.grid_size)
    return None


def finetune_sections(run: RunFolder, model, cfg, out: Path, device) -> tuple[list[Section], dict]:
    from beit.viz.figures import denormalise, hwc

    rc = run.cfg
    names = class_names(run)
    sections, facts = [], {"classes": len(names)}
    if rc.task == "segmentation":
        from beit.viz.heldout_samples import segmentation_samples
        from beit.viz.segmentation import draw_segmentation, predict

        samples = segmentation_samples(rc, cfg.num_images, cfg.val_shards or None)
        stride = rc.seg_stride or max(1, rc.image_size * 2 // 3)
        preds = [predict(model, s["image"], rc.image_size, stride, rc.num_classes, s["label"].shape, device)
                 for s in samples]
        shown = [hwc(denormalise(s["image"][None], rc.mean, rc.std))[0] for s in samples]
        sections.append(Section("Segmentation", draw_segmentation(shown, preds, [s["label"].numpy() for s in samples],
                                                                  names, out / "segmentation.png"),
                                "Sliding-window predictions as in the run's own evaluation."))
        crops = torch.stack([torch.nn.functional.interpolate(s["image"][None], size=(rc.image_size,) * 2,
                                                             mode="bilinear", align_corners=False)[0] for s in samples])
    else:
        from beit.viz.confusion import confusion_of, draw_confusion
        from beit.viz.heldout_samples import classification_batches

        cm, n = confusion_of(model, classification_batches(rc, cfg.max_eval_images, cfg.val_shards or None),
                             rc.num_classes, device)
        sections.append(Section("Confusion matrix", draw_confusion(cm, names, f"{rc.model}", out / "confusion.png"),
                                f"Rows: true class, columns: predicted; {n} held-out images."))
        facts["held-out top-1 (pictured weights)"] = f"{sum(cm[i][i] for i in range(len(cm))) / max(1, n):.1%} of {n}"
        crops = next(iter(classification_batches(rc, cfg.num_images, cfg.val_shards or None)))["image"]
    grid_hw = _grid_of(model)
    if grid_hw is None:
        sections.append(Section("Attention", None, f"{rc.model} has no BEiT transformer blocks: no attention "
                                "pictures for it.", note=True))
    else:
        from beit.viz.attention import encoder_blocks
        x = crops.to(device)
        sections.append(_attention_section(model, lambda: model(x), hwc(denormalise(crops, rc.mean, rc.std)), grid_hw,
                                           cfg, out, len(encoder_blocks(model)), "on held-out images"))
    return sections, facts


def make_report(cfg) -> dict:
    """Draw every picture of ``cfg.run_dir`` and rewrite its index.html; returns the paths written."""
    from beit.viz.curves import draw_curves

    run = open_run(cfg.run_dir)
    device = cfg.torch_device()
    weights, label = resolve_weights(run, cfg.checkpoint)
    model = load_model(run, weights, device)
    out = Path(cfg.out_dir) if cfg.out_dir else run.path / "viz"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    make = pretrain_sections if run.stage == "pretrain" else finetune_sections
    sections, facts = make(run, model, cfg, out, device)
    sections[:0] = [Section("Warning", None, w, note=True) for w in run.summary.get("warnings", [])]
    try:
        sections.append(Section("Curves", draw_curves(run.path, run.stage, out / "curves.png"),
                                "From metrics.jsonl (one point per logged step)."))
    except FileNotFoundError as e:
        sections.append(Section("Curves", None, str(e), note=True))
    title = f"{'BEiT pretraining' if run.stage == 'pretrain' else 'fine-tuning (' + run.task + ')'}: {run.path.name}"
    facts = {"run folder": str(run.path), "weights": f"{label} ({weights})", "device": str(device), **facts}
    report = write_report(run.path, title, sections, run.summary, (run.path / "config.yaml").read_text(), facts)
    pictures = {s.title: s.picture for s in sections if s.picture is not None}
    return {"report": report, "pictures": pictures, "notes": {s.title: s.text for s in sections if s.note},
            "attached": attach(run.path, report, pictures.values())}


def attach(run_dir: Path, report: Path, pictures) -> str:
    """Give the report to the W&B / MLflow runs the run logged to (its trackers.json); says where it went."""
    import os

    from beit.runtime.trackers import attach_report
    files = {"index.html": Path(report), **{os.path.relpath(p, run_dir): Path(p) for p in pictures}}
    try:
        names = attach_report(run_dir, files)
    except Exception as e:  # noqa: BLE001 - the report is written either way; say why the trackers lack it
        return f"not attached to the run's trackers: {e}"
    return f"attached to the run's {' and '.join(names)} run" if names else ""


def main(argv: list[str] | None = None) -> int:
    from beit.config import parse_config
    from beit.options.viz import VizConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--run_dir", argv[0], *argv[1:]]
    cfg = parse_config(VizConfig, argv, description=__doc__)
    result = make_report(cfg)
    for name, path in result["pictures"].items():
        print(f"  {name:<17} {path}")
    for name, text in result["notes"].items():
        print(f"  {name:<17} {text}")
    print(f"report: {result['report']}" + (f" ({result['attached']})" if result["attached"] else ""))
    return 0


if __name__ == "__main__":
    from beit.cli import call
    sys.exit(call(main))
