"""Tokenizer report: does it carry information? Usage, perplexity, stability, PSNR, and a picture.

    python -m beit.tokenizers.report --tokenizer kmeans --tokenizer_path runs/tok/kmeans \\
        --val_shards 'data/photos/val-*.tar' --out_dir runs/tok/report

Measures on held-out shards: codebook usage (fraction of codes seen), perplexity exp(H) of the
token histogram, the majority token's share (the masked-token accuracy of always guessing it),
stability (fraction of tokens unchanged by a 1-pixel shift, and by flip-tokenize-flip-back) and
the information that survives them (mutual information, bits per token: agreement alone rewards a
tokenizer that outputs one token everywhere),
reconstruction PSNR when the tokenizer has a decoder, the same numbers for the same architecture
with random weights and for any other tokenizers named with ``--compare`` (e.g. a VQ-KD trained
without dead-code restarts, or k-means / dVAE / DALL-E, each at its own view of the same images), and
writes ``tokenizer_report.json`` + ``tokenizer_report.png`` (images,
reconstructions, token maps) into ``out_dir``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from beit.config import field, parse_config
from beit.options.common import HeldOutOptions, TokenizerKind, TokenizerOptions
from beit.tokenizers import TOKENIZER_KINDS, VisualTokenizer, load_tokenizer
from beit.tokenizers.images import ShardReadStats, shard_image_batches
from beit.tokenizers.metrics import measure


@dataclass
class ReportConfig(TokenizerOptions, HeldOutOptions):
    DEPRECATED = {"shards": "val_shards"}  # the held-out shards measured
    tokenizer: TokenizerKind = field("kmeans")
    out_dir: str = field("runs/tokenizer_report", help="where tokenizer_report.json/.png go")
    max_images: int = field(512, help="images measured (centre crops at the tokenizer's input size)")
    batch_size: int = field(32, help="images per tokenizer call")
    num_show: int = field(6, help="images in the PNG")
    compare_random: bool = field(True, help="also measure the same architecture with random weights")
    compare: list[str] = field(default_factory=list, help="more tokenizers measured on the same held-out images, "
                               "one column each: NAME=KIND:PATH, e.g. kmeans=kmeans:runs/tok/kmeans")
    seed: int = field(0, help="seed of the random-weights baseline")

    def validate(self) -> None:
        self.check_choices()
        if not self.val_shards:
            raise ValueError("--val_shards (held-out shards to measure on) is required")
        parse_compare(self.compare)


def parse_compare(entries: list[str]) -> list[tuple[str, str, str]]:
    """``NAME=KIND:PATH`` entries -> (name, kind, path); a bad one is an error naming the format."""
    out = []
    for e in entries:
        name, eq, rest = e.partition("=")
        kind, colon, path = rest.partition(":")
        if not (eq and colon and name and path) or kind not in TOKENIZER_KINDS:
            raise ValueError(f"--compare {e!r}: expected NAME=KIND:PATH with KIND one of {list(TOKENIZER_KINDS)}, "
                             "e.g. kmeans=kmeans:runs/tok/kmeans")
        out.append((name, kind, path))
    return out


def token_colors(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids [h, w] -> RGB [h, w, 3]: a fixed pseudo-random colour per code id."""
    g = torch.Generator().manual_seed(1234)
    palette = torch.rand(vocab_size, 3, generator=g) * 0.85 + 0.15
    return palette[tokens]


def save_figure(tok: VisualTokenizer, images: torch.Tensor, path: Path, title: str) -> Path:
    """Rows: image | reconstruction (if a decoder) | token map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = tok.tokenize(images)
    rows = [("image", [im.permute(1, 2, 0).numpy() for im in images])]
    if tok.has_decoder:
        rec = tok.decode(tokens).cpu()
        rows.append(("reconstruction", [r.permute(1, 2, 0).numpy() for r in rec]))
    rows.append(("tokens", [token_colors(t.cpu(), tok.vocab_size).numpy() for t in tokens]))
    n = images.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.8 * n, 1.9 * len(rows)), squeeze=False)
    for r, (name, ims) in enumerate(rows):
        for c, im in enumerate(ims):
            ax = axes[r][c]
            ax.imshow(im.clip(0, 1), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_report(cfg: ReportConfig, tok: VisualTokenizer | None = None) -> dict:
    """Measure ``tok`` (or the one named by cfg) on cfg.val_shards; write JSON + PNG; return the numbers."""
    tok = tok if tok is not None else load_tokenizer(cfg.tokenizer_kind(), cfg.tokenizer_path,
                                                     trust_pickle=cfg.trust_pickle)
    others = [(name, load_tokenizer(kind, path, trust_pickle=cfg.trust_pickle))
              for name, kind, path in parse_compare(cfg.compare)]
    stats = ShardReadStats()
    images = torch.cat(list(shard_image_batches(cfg.val_shards, tok.input_size, cfg.batch_size, tok.interpolation,
                                                max_images=cfg.max_images, stats=stats)))
    result = {"tokenizer": tok.kind, "path": cfg.tokenizer_path, "vocab_size": tok.vocab_size,
              "input_size": tok.input_size, "grid_size": list(tok.grid_size),
              "trained": measure(tok, images.split(cfg.batch_size)), "data": {"images": stats.samples,
                                                                              "bad": stats.bad}}
    if cfg.compare_random:
        result["random_weights"] = measure(tok.random_like(cfg.seed), images.split(cfg.batch_size))
    for name, other in others:  # the same images (same order and count) at the other tokenizer's view
        views = shard_image_batches(cfg.val_shards, other.input_size, cfg.batch_size, other.interpolation,
                                    max_images=cfg.max_images)
        result.setdefault("compare", {})[name] = {"tokenizer": other.kind, "vocab_size": other.vocab_size,
                                                  **measure(other, views)}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = result["trained"]
    title = (f"{tok.kind}: usage {m['usage']:.0%}, perplexity {m['perplexity']:.0f}/{tok.vocab_size}, "
             f"shift-stable {m['shift_stability']:.0%}" + (f", PSNR {m['psnr']:.1f} dB" if "psnr" in m else ""))
    g = torch.Generator().manual_seed(cfg.seed)
    show = images[torch.randperm(len(images), generator=g)[:cfg.num_show]]
    result["figure"] = str(save_figure(tok, show, out / "tokenizer_report.png", title))
    (out / "tokenizer_report.json").write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    keys = ["vocab_size", "usage", "perplexity", "entropy_bits", "majority_share", "shift_stability", "shift_info_bits",
            "flip_stability", "flip_info_bits", "psnr"]
    cols = {c: {**result[c], "vocab_size": result["vocab_size"]} for c in ("trained", "random_weights") if c in result}
    cols.update(result.get("compare", {}))
    lines = [f"{'metric':<16}" + "".join(f"{c[:15]:>16}" for c in cols)]
    for k in keys:
        if any(k in m for m in cols.values()):
            lines.append(f"{k:<16}" + "".join(f"{m.get(k, float('nan')):>16.4f}" for m in cols.values()))
    return "\n".join(lines)


def report(argv=None) -> int:
    cfg = parse_config(ReportConfig, argv, description=__doc__)
    result = run_report(cfg)
    print(format_table(result))
    print(f"figure: {result['figure']}\nnumbers: {Path(cfg.out_dir) / 'tokenizer_report.json'}")
    return 0


def main(argv=None) -> int:
    """``beit tokenizer report``, as an exit code (beit.cli.call's policy)."""
    from beit.cli import call
    return call(report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
