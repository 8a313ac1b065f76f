"""Peak memory of one BEiT pretraining step with and without activation (gradient) checkpointing.

Each setting runs in its own fresh subprocess: build the model (vocab 8192, drop path 0.1) and
AdamW, run one warm-up step (creates gradients and optimizer state), then measure one more full
step (forward on the masked batch, cross-entropy, backward, clip, AdamW step):

* CUDA: ``torch.cuda.max_memory_allocated`` over the measured step (peak tensor memory), and the
  memory held before it (weights + grads + optimizer state).
* CPU: peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs before the step)
  minus the RSS before it; large blocks go straight to mmap (MALLOC_MMAP_THRESHOLD_) so freed
  activations return to the OS and RSS follows the live tensors.

The frozen tokenizer is not included (it runs under no_grad, its activations are freed per batch).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from beit.config import field, parse_config


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def measure(model_size: str, batch_size: int, image_size: int, grad_ckpt: bool, device: str,
            mixed_precision: str) -> dict:
    """One setting, in this process: returns MiB figures and the step time."""
    import torch
    import torch.nn.functional as F

    from beit.modeling.mim import create_pretrain_model
    from beit.optim import create_adamw, param_groups_weight_decay

    torch.manual_seed(0)
    dev = torch.device(device)
    model = create_pretrain_model(model_size, img_size=image_size, vocab_size=8192, drop_path_rate=0.1).to(dev)
    model.set_grad_checkpointing(grad_ckpt)
    model.train()
    opt = create_adamw(param_groups_weight_decay(model, 0.05), lr=1.5e-3)
    h, w = model.grid_size
    n_masked = min(75, round(0.4 * h * w))
    images = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    mask = torch.zeros(batch_size, h * w, dtype=torch.bool, device=dev)
    for i in range(batch_size):
        mask[i, torch.randperm(h * w)[:n_masked]] = True
    labels = torch.randint(0, 8192, (batch_size * n_masked,), device=dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images, mask)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep gradient buffers allocated, as in steady state
        return float(loss)

    step()  # warm-up: gradients + AdamW state exist from now on
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        t0 = time.time()
        step()
        torch.cuda.synchronize()
        took = time.time() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _rss_kib("VmRSS") / 1024
        t0 = time.time()
        step()
        took = time.time() - t0
        peak = _rss_kib("VmHWM") / 1024
    params = sum(p.numel() for p in model.parameters())
    return {"grad_checkpointing": grad_ckpt, "params_m": round(params / 1e6, 1),
            "held_before_step_mib": round(before), "peak_mib": round(peak),
            "step_extra_mib": round(peak - before), "step_seconds": round(took, 2)}


def run(*, model_size: str = "base", batch_size: int = 8, image_size: int = 224, device: str = "cpu",
        mixed_precision: str = "no", threads: int = 0) -> dict:
    """Both settings, each in a fresh subprocess; MiB figures, step times and the ratios."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    results = {}
    for setting in ("off", "on"):
        cmd = [sys.executable, "-m", "beit.bench.step_memory", "--grad_checkpointing", setting, "--model_size",
               model_size,
               "--batch_size", str(batch_size), "--image_size", str(image_size), "--device", device,
               "--mixed_precision", mixed_precision, "--threads", str(threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"memory measurement with grad_checkpointing={setting} failed:\n{proc.stderr[-3000:]}")
        results["checkpointing_" + setting] = json.loads(line[len("RESULT "):])
    off, on = results["checkpointing_off"], results["checkpointing_on"]
    results.update(model=f"beit_{model_size} {image_size}px", batch=batch_size, device=device,
                   mixed_precision=mixed_precision,
                   unit="peak tensor memory" if device == "cuda" else "peak RSS (VmHWM) of a fresh process",
                   ratio_peak=round(on["peak_mib"] / off["peak_mib"], 2),
                   ratio_step_memory=round(on["step_extra_mib"] / max(off["step_extra_mib"], 1), 2),
                   ratio_time=round(on["step_seconds"] / off["step_seconds"], 2))
    return results


@dataclass
class MeasureConfig:
    """One setting, measured in this (fresh) process by ``run``'s child."""
    grad_checkpointing: Literal["on", "off"] = field("off", help="activation checkpointing of the measured model")
    model_size: str = field("base", help="BEiT size")
    batch_size: int = field(8, help="images per step")
    image_size: int = field(224, help="input side in px")
    device: str = field("cpu", help="cpu | cuda")
    mixed_precision: str = field("no", help="no | fp16 | bf16")
    threads: int = field(0, help="torch intra-op threads (0: torch's default)")


def _child(argv=None) -> None:
    a = parse_config(MeasureConfig, argv, description=__doc__)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    res = measure(a.model_size, a.batch_size, a.image_size, a.grad_checkpointing == "on", a.device, a.mixed_precision)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    _child()
