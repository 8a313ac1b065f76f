"""The ``beit`` command: one subcommand per stage, each a thin door to the module that does the work.

    beit shards write --source photos/ --out shards/mine
    beit pretrain --data photos/ --tokenizer_path runs/tok --output_dir runs/x   # a folder in, no shard step
    accelerate launch -m beit.pretrain ...      # several processes: the modules stay the entry points

Every subcommand takes the same options as its module (``beit pretrain --help`` ==
``python -m beit.pretrain --help``).
"""
from __future__ import annotations

import importlib
import os
import sys

# name -> (module with ``main(argv)``, one line of help). Two-word names ("tokenizer train") are groups.
COMMANDS: dict[str, tuple[str, str]] = {
    "shards write": ("beit.data.shards:write", "write WebDataset shards + manifest from a folder of images"),
    "shards verify": ("beit.data.shards:verify", "read every shard back and check it against its manifest"),
    "tokenizer train": ("beit.tokenizers.train", "fit a k-means, dVAE or VQ-KD (BEiT v2) tokenizer on your shards"),
    "tokenizer report": ("beit.tokenizers.report", "codebook usage, perplexity and pictures of a tokenizer"),
    "tokenizer convert-dalle": ("beit.tokenizers.convert_dalle", "convert DALL-E's pickled dVAE once to safetensors"),
    "tokenizer cache": ("beit.tokenizers.cache", "pre-tokenise shards into a token cache"),
    "pretrain": ("beit.pretrain", "BEiT masked-image-modelling pretraining"),
    "finetune": ("beit.finetune", "fine-tune a pretrained encoder (classification or segmentation)"),
    "compare": ("beit.compare.run", "does pretraining pay off here? BEiT vs scratch vs simple baselines, over seeds"),
    "distill": ("beit.distill", "distil a fine-tuned classifier into a small timm student (MobileViT)"),
    "export": ("beit.export.commands:export_main", "export a fine-tuned run as timm-loadable weights"),
    "viz": ("beit.viz.main", "pictures of a run (masks, tokens, reconstructions, attention, curves) + index.html"),
    "export-onnx": ("beit.export.commands:onnx_main", "a fine-tuned classifier as ONNX + preprocessing JSON, checked "
                                                      "with onnxruntime"),
    "predict": ("beit.predict.command:predict_main", "classify or segment new images (a folder or shards) with a "
                                                     "fine-tuned run, export or ONNX model: CSV, errors, confusion"),
    "samples": ("beit.data.samples", "write shards of the built-in real sample sets (offline)"),
    "bench": ("beit.bench.command", "speed figures beside their peers (train step, tokenizers, end to end, data) as "
                                    "JSON"),
    "demo": ("beit.demo", "the offline CPU demo: sample shards, k-means tokenizer, pretraining, fine-tuning"),
}

# name -> one example, shown first by ``beit NAME --help`` (every command has one).
EXAMPLES: dict[str, str] = {
    "shards write": "beit shards write --source my_photos/ --out shards/mine --val_fraction 0.05",
    "shards verify": "beit shards verify --dir shards/mine",
    "tokenizer train": "beit tokenizer train kmeans --data my_photos/ --out runs/mine/tokenizer",
    "tokenizer report": "beit tokenizer report --tokenizer_path runs/mine/tokenizer "
                        "--val_shards 'shards/mine/val-*.tar'",
    "tokenizer convert-dalle": "beit tokenizer convert-dalle --encoder encoder.pkl --out weights/dalle --trust_pickle",
    "tokenizer cache": "beit tokenizer cache --train_shards 'shards/mine/train-*.tar' --out shards/mine_tokens "
                       "--tokenizer dalle --tokenizer_path weights/dalle",
    "pretrain": "beit pretrain --data my_photos/ --tokenizer_path runs/mine/tokenizer --output_dir runs/mine/pretrain",
    "finetune": "beit finetune --data my_labelled/ --init runs/mine/pretrain/pretrained.safetensors "
                "--output_dir runs/mine/finetune",
    "export": "beit export --run_dir runs/mine/finetune --out exported/model.safetensors",
    "samples": "beit samples --out data_samples --kind all",
    "viz": "beit viz runs/mine/pretrain",
    "bench": "beit bench --sections train_step --models tiny --batch_size 8 --rounds 5",
    "distill": ("beit distill --teacher runs/mine/finetune/model.safetensors --data my_labelled/ "
                "--unlabelled_shards 'shards/mine/train-*.tar' --output_dir runs/mine/distill"),
    "export-onnx": "beit export-onnx --model runs/mine/finetune/model.safetensors --out exported/model.onnx",
    "predict": "beit predict --model runs/mine/finetune --data my_new_images/ --out predictions.csv",
    "demo": "beit demo",
    "compare": "beit compare --train_shards 'shards/mine/train-*.tar' --test_shards 'shards/mine/test-*.tar' "
               "--seeds 0,1,2 --output_dir runs/compare",
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [__doc__.strip(), "", "commands:"]
    lines += [f"  beit {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "beit COMMAND --help shows the command's options and their defaults."]
    return "\n".join(lines)


def _resolve(argv: list[str]) -> tuple[str, list[str]] | None:
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}", argv[2:]
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    return None


def _suggest(word: str) -> str:
    import difflib

    names = sorted({n.split()[0] for n in COMMANDS} | set(COMMANDS))
    close = difflib.get_close_matches(word, names, n=1)
    return f" (did you mean 'beit {close[0]}'?)" if close else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    found = _resolve(argv)
    if found is None:
        group = [n for n in COMMANDS if n.split()[0] == argv[0] and " " in n]
        if group:
            print(f"beit {argv[0]}: choose one of: " + ", ".join(n.split()[1] for n in group), file=sys.stderr)
        else:
            print(f"beit: unknown command {argv[0]!r}{_suggest(argv[0])}\n\n{_usage()}", file=sys.stderr)
        return 2
    name, rest = found
    if name in EXAMPLES and any(a in ("-h", "--help") for a in rest):
        print(f"example: {EXAMPLES[name]}\n")
    target = COMMANDS[name][0]
    module_name, _, func = target.partition(":")
    module = importlib.import_module(module_name)
    entry = getattr(module, func or "main")
    sys.argv = [f"beit {name}", *rest]  # --help and errors name the command the user typed
    return call(entry, rest)


def call(entry, argv: list[str] | None = None) -> int:
    """``entry(argv)`` as an exit code, the one policy of every command: bad input (2: a ValueError such as
    ``SetupError`` or a config error, a missing or unwritable file) and a fault during the run (1: ``RunFault``,
    e.g. a diverged loss, too many bad samples, a damaged checkpoint) print one line, not a traceback; a stop on
    SIGTERM / SIGINT / SIGUSR1 after its checkpoint (``RunStopped``) prints its one line on the main process and
    returns 75 (``EXIT_STOPPED``); an int result is the code, anything else is 0."""
    from beit.runtime.faults import RunFault, RunStopped
    from beit.runtime.stopping import EXIT_STOPPED
    try:
        result = entry(argv)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:  # bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFault as e:  # a fault during the run
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunStopped as e:  # stopped on a signal, with its checkpoint: rerun to resume
        if os.environ.get("RANK", "0") == "0":
            try:
                print(e, file=sys.stderr, flush=True)
            except OSError:  # stderr gone with a killed launcher: the checkpoint is written all the same
                pass
        return EXIT_STOPPED
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
