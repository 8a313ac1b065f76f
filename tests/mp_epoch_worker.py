"""Run under ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N`` (or as one plain process): a tiny
model trained with DDP (gloo) and gradient accumulation on the streaming loader (or, with a 6th argument
``memory``, the memory cache's loader), 2 epochs. Every
micro-batch is a real forward/backward through the DDP-wrapped model, so a rank with fewer batches
or optimizer steps would hang the job. Writes ``rank<r>.json``: keys per epoch, optimizer steps,
the loader's length and its start-up description."""
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from beit.data.loading.stream import build_stream_loader, to_device
from beit.data.pipelines.transforms import pil_to_tensor

shard_spec, out_dir, batch, accum, workers = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:6])
acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)


def map_fn(img, sample):
    return {"x": pil_to_tensor(img.resize((8, 8))).float().mean(dim=(1, 2))}


class MeanColour:
    """The memory cache's augmentation interface: no random numbers, each image's mean colour."""

    def draw(self, gen, n):
        return {"none": torch.zeros(n)}

    def __call__(self, store, idx, u):
        return {"x": store.images[idx].float().mean(dim=(2, 3)) / 255}


if sys.argv[6:] == ["memory"]:  # the memory cache's loader over the decoded images
    from beit.data.loading.memory_loader import MemoryLoader
    from beit.data.loading.memory_store import decoded_store
    from beit.data.storage.shardspec import expand_shards
    store, why = decoded_store(expand_shards(shard_spec), num_classes=0, budget_mb=64, device=acc.device)
    loader = MemoryLoader(store, MeanColour(), batch_size=batch, rank=acc.process_index,
                          world_size=acc.num_processes, seed=3, batch_multiple=accum)
else:
    loader = build_stream_loader(shard_spec, map_fn=map_fn, batch_size=batch, num_workers=workers,
                                 rank=acc.process_index, world_size=acc.num_processes, seed=3,
                                 batch_multiple=accum)
model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
model, opt = acc.prepare(model, opt)
result = {"rank": acc.process_index, "len": len(loader), "describe": loader.describe(), "notes": loader.notes,
          "epochs": []}
for epoch in range(2):
    loader.set_epoch(epoch)
    keys, steps = [], 0
    for b in loader:
        b = to_device(b, acc.device)
        with acc.accumulate(model):
            loss = model(b["x"]).pow(2).mean()
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            steps += int(acc.sync_gradients)
        keys += b["__key__"]
    result["epochs"].append({"keys": keys, "optimizer_steps": steps})
(out_dir / f"rank{acc.process_index}.json").write_text(json.dumps(result))
acc.wait_for_everyone()
