"""torchrun worker for the hang test: rank 1 stops answering (sleeps), rank 0 enters a collective.

With ``accelerator_kwargs_handlers(timeout)`` rank 0's collective fails after ``timeout`` seconds,
rank 0 exits with an error, and torchrun then stops rank 1: the job ends instead of hanging.
Usage: python -m torch.distributed.run --nproc_per_node 2 tests/mp/hang_worker.py TIMEOUT_S
"""
import sys
import time

import torch
from accelerate import Accelerator

from beit.runtime.scaling import accelerator_kwargs_handlers

accelerator = Accelerator(kwargs_handlers=accelerator_kwargs_handlers(int(sys.argv[1])))
x = torch.ones(1)
accelerator.reduce(x, reduction="sum")          # both ranks healthy: one collective succeeds
print(f"rank {accelerator.process_index}: first collective ok", flush=True)
if accelerator.process_index == 1:
    time.sleep(3600)                             # a hung rank (deadlock, stuck filesystem, ...)
t0 = time.time()
try:
    accelerator.reduce(x, reduction="sum")
except Exception as e:                           # the timeout surfaces as a RuntimeError/DistBackendError
    print(f"rank 0: collective failed after {time.time() - t0:.1f}s: {type(e).__name__}: {e}", flush=True)
    sys.exit(3)
print("rank 0: collective returned although rank 1 hung", flush=True)
