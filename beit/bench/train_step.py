"""One BEiT pretraining step (forward on the masked batch, cross-entropy on the masked patches,
backward, grad clip, AdamW), ours vs transformers' ``BeitForMaskedImageModeling`` with the same
config, in alternating rounds; images/s, peak memory, FLOP per image (``torch.utils.flop_counter``)
and MFU against the matmul peak of the same run and dtype."""
from __future__ import annotations

import resource
import time

import torch
import torch.nn.functional as F

from beit.bench.machine import MatmulPeak, step_matmul_shapes, sync
from beit.bench.peers import hf_beit_mim
from beit.bench.timing import alternate, median, rnd, spread
from beit.modeling.mim import BEIT_SIZES, create_pretrain_model

VOCAB = 8192


def _batch(batch: int, image_size: int, grid: int, n_masked: int, device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    mask = torch.zeros(batch, grid * grid, dtype=torch.bool)
    for i in range(batch):
        mask[i, torch.randperm(grid * grid, generator=g)[:n_masked]] = True
    labels = torch.randint(0, VOCAB, (batch * n_masked,), generator=g)
    return images.to(device), mask.to(device), labels.to(device)


def make_step(model, opt, images, mask, labels, dtype, kind: str, clip: float = 3.0):
    dev = images.device

    def step():
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if kind == "ours":
                logits = model(images, mask)
            else:
                logits = model(pixel_values=images, bool_masked_pos=mask).logits[mask]
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def flops_per_step(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


def _peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (KiB on Linux)


def _optimizer(model, ours: bool):
    # both sides get the optimizer their training code builds: ours from beit.optim, the peer the
    # fused AdamW that transformers' Trainer defaults to (optim="adamw_torch_fused", torch >= 2.8)
    if ours:
        from beit.optim import create_adamw, param_groups_weight_decay
        return create_adamw(param_groups_weight_decay(model, 0.05), lr=1.5e-3)
    return torch.optim.AdamW(model.parameters(), lr=1.5e-3, weight_decay=0.05, fused=True)


def bench_model(size: str, batch: int, image_size: int, dtype, device, rounds: int, peak_seconds: float,
                compile_ours: bool = False, squares=None) -> dict:
    dims = dict(BEIT_SIZES[size])
    grid = image_size // 16
    n_masked = max(1, round(0.4 * grid * grid)) if grid != 14 else 75
    torch.manual_seed(0)
    ours = create_pretrain_model(size, img_size=image_size, vocab_size=VOCAB, drop_path_rate=0.1).to(device).train()
    peer = hf_beit_mim(dims, image_size, 16, VOCAB, 0.1).to(device).train()
    images, mask, labels = _batch(batch, image_size, grid, n_masked, device)
    models = {"ours": ours, "transformers": peer}
    compile_s = None
    if compile_ours:
        torch.manual_seed(0)
        models["ours_compiled"] = create_pretrain_model(size, img_size=image_size, vocab_size=VOCAB,
                                                        drop_path_rate=0.1).to(device).train()
        models["ours_compiled"].compile_blocks()
    steps = {name: make_step(m, _optimizer(m, name != "transformers"), images, mask, labels, dtype,
                             "hf" if name == "transformers" else "ours") for name, m in models.items()}
    if compile_ours:
        t0 = time.perf_counter()
        steps["ours_compiled"]()  # the first call compiles
        sync(device)
        compile_s = time.perf_counter() - t0
    flops = {name: flops_per_step(fn) for name, fn in steps.items() if name != "ours_compiled"}
    flops["ours_compiled"] = flops["ours"]
    # the peak: the squares and every matmul shape of both steps, measured before and between the timed rounds
    shapes = {s for name in ("ours", "transformers") for s in step_matmul_shapes(steps[name])}
    peak = MatmulPeak(dtype or torch.float32, device, shapes, **({"squares": squares} if squares else {}))
    peak.measure(peak_seconds)

    def synced(fn):
        def call():
            fn()
            sync(device)
        return call
    mem = {}
    for name, fn in steps.items():  # measured one after the other: the high-water mark only grows
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fn()
        mem[name] = _peak_mib(device)
    secs = alternate({**{k: synced(v) for k, v in steps.items()}, "peak": lambda: peak.measure(peak_seconds)},
                     rounds=rounds, warmup=1)
    secs.pop("peak")
    out = {"model": f"beit_{size} {image_size}px patch16", "batch": batch, "masked": n_masked,
           "params_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2),
           "attn_implementation_peer": getattr(peer.config, "_attn_implementation", None),
           "matmul_peak": {**peak.describe(), "tflops": rnd(peak.best / 1e12)}}
    for name in models:
        img_s = batch / median(secs[name])
        rate = flops[name] / min(secs[name])  # the best round: the FLOP rate the peak must bound
        out[name] = {"img_per_s": rnd(img_s), "step_s_rounds": [rnd(x) for x in secs[name]],
                     "spread": spread(secs[name]), "gflop_per_img": rnd(flops[name] / batch / 1e9),
                     "best_round_tflops": rnd(rate / 1e12), "mfu": rnd(flops[name] / batch * img_s / peak.best)}
        if device.type == "cuda":
            out[name]["peak_mem_mib"] = round(mem[name])
        else:
            out[name]["process_peak_rss_mib"] = round(mem[name])
    out["ratio"] = rnd(out["ours"]["img_per_s"] / out["transformers"]["img_per_s"])
    if compile_ours:
        out["ours_compiled"]["compile_s"] = rnd(compile_s)
        out["compile_gain"] = rnd(out["ours_compiled"]["img_per_s"] / out["ours"]["img_per_s"])
    return out


def run(device, *, sizes=("tiny", "base"), batch: int = 8, image_size: int = 224, rounds: int = 5,
        dtypes=("fp32",), peak_seconds: float = 0.5, compile_ours: bool = False, smoke: bool = False) -> dict:
    res = {"note": "MFU = counted FLOP/img x img/s / the matmul peak: the best FLOP/s of square matmuls and of "
                   "every matmul shape (and layout) of both steps, in the step's dtype and thread count, measured "
                   "before and between the timed rounds (an upper bound: MFU <= 1); fwd+bwd+clip+AdamW; on CPU peak "
                   "memory is the process RSS high-water mark (ours is measured first)"}
    for dt_name in dtypes:
        dtype = {"fp32": None, "bf16": torch.bfloat16}[dt_name]
        res[dt_name] = {size: bench_model(size, batch, image_size, dtype, device, rounds, peak_seconds, compile_ours,
                                          squares=(256,) if smoke else None) for size in sizes}
        res[dt_name]["matmul_peak_tflops"] = max(r["matmul_peak"]["tflops"] for r in res[dt_name].values())
    return res
