"""Run under ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2``: one epoch per rank with 2 loader
workers each; every batch does a cross-rank all-reduce (as DDP would), so unequal batch counts
would hang or fail. Writes ``rank<r>.json`` with the keys seen per epoch and the batch counts."""
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from beit.data.loading.stream import build_stream_loader, to_device
from beit.data.pipelines.transforms import TwoViewTransform

shard_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
acc = Accelerator(cpu=True)
tf = TwoViewTransform(image_size=16, tokenizer_size=8)


def map_fn(img, sample):
    enc, tok = tf(img)
    return {"enc": enc, "tok": tok}


loader = build_stream_loader(str(shard_dir / "train-*.tar"), map_fn=map_fn, batch_size=3, num_workers=2,
                             rank=acc.process_index, world_size=acc.num_processes, seed=1)
result = {"rank": acc.process_index, "world": acc.num_processes, "len": len(loader), "epochs": []}
for epoch in range(2):
    loader.set_epoch(epoch)
    keys, n = [], 0
    for batch in loader:
        batch = to_device(batch, acc.device)
        total = acc.reduce(torch.tensor([batch["enc"].shape[0]], device=acc.device), reduction="sum")
        assert total.item() == 3 * acc.num_processes
        keys += batch["__key__"]
        n += 1
    result["epochs"].append({"keys": keys, "batches": n})
result["stats"] = {k: v for k, v in loader.stats.items() if k in ("samples", "bad")}
(out_dir / f"rank{acc.process_index}.json").write_text(json.dumps(result))
acc.wait_for_everyone()
