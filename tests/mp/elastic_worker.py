"""torchrun (gloo, CPU) or plain-process worker for the elastic-resume test: the global-order loader feeding a
tiny DDP model, with the project's real checkpoints.

    elastic_worker.py SHARDS OUT_DIR first|resume GLOBAL_BATCH STEPS WORKERS

``first``: train STEPS optimizer steps of epoch 0, save a checkpoint (``save_checkpoint``: every rank's loader
state) and stop. ``resume``: load the newest checkpoint (``load_checkpoint``; it may have been written by another
process count) and train to the end of the epoch. Each rank writes ``<phase>_rank<r>.json``: the sample keys of
every step and the warnings the resume gave.
"""
import json
import sys
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator

from beit.checkpoints.checkpointing import find_latest_complete, load_checkpoint, save_checkpoint
from beit.data.loading.global_order import build_global_order_loader
from beit.data.loading.stream import to_device
from beit.data.pipelines.transforms import pil_to_tensor

spec, out, phase = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
global_batch, steps, workers = map(int, sys.argv[4:7])
acc = Accelerator(cpu=True)


def map_fn(img, sample):
    return {"x": pil_to_tensor(img.resize((8, 8))).float().mean(dim=(1, 2))}


loader = build_global_order_loader(spec, map_fn=map_fn, batch_size=global_batch // acc.num_processes,
                                   num_workers=workers, rank=acc.process_index, world_size=acc.num_processes,
                                   seed=3, shuffle_buffer=7)
model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
model, opt = acc.prepare(model, opt)
step, said = 0, []
if phase == "resume":
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_state, rank_state = load_checkpoint(acc, find_latest_complete(out))
        loader.load_state_dict(rank_state["loader"])
    said = [str(w.message) for w in caught]
    step = int(train_state["step"])
loader.set_epoch(0)
keys = []
for b in loader:
    b = to_device(b, acc.device)
    loss = model(b["x"]).pow(2).mean()      # DDP: a rank with fewer steps would hang the job
    acc.backward(loss)
    opt.step()
    opt.zero_grad()
    step += 1
    keys.append(b["__key__"])
    if phase == "first" and step == steps:
        save_checkpoint(acc, out, step, {"epoch": 0}, {"loader": loader.state_dict()})
        break
(out / f"{phase}_rank{acc.process_index}.json").write_text(json.dumps({"keys": keys, "warnings": said}))
acc.wait_for_everyone()
