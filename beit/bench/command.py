"""``beit bench`` / ``python -m beit.bench``: run the benchmark sections and print one JSON object.

    beit bench                                   # everything, this machine's defaults (minutes)
    beit bench --sections train_step --models tiny base --batch_size 8 --rounds 5
    beit bench --no-compile                      # without the torch.compile'd train-step row (faster)
    beit bench --smoke                           # tiny sizes, seconds: checks the JSON, not speeds
    beit bench --out bench.json                  # also write the JSON to a file

Every figure is measured beside its peer in the same process, in alternating rounds (medians), with
the machine (CPU/GPU model, AVX2/AVX-512/AMX/CUDA arch, threads, load average, versions) printed
beside it. bf16 rows are added where the device has fast bf16 (GPUs with bf16, CPUs with AMX or
AVX-512-BF16), unless --dtypes says otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from beit.config import DefaultsHelpFormatter

SECTIONS = ("train_step", "tokenizer", "end_to_end", "masking", "data", "memory", "onnx")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beit bench", description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="what to run (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round: a structure check that takes seconds")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--models", nargs="+", default=["tiny", "base"], help="train_step model sizes")
    p.add_argument("--batch_size", type=int, default=8, help="train_step / tokenizer batch")
    p.add_argument("--image_size", type=int, default=224, help="train_step / end_to_end encoder view (patch 16)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (median reported)")
    p.add_argument("--dtypes", nargs="+", default=None, help="train_step dtypes: fp32 bf16 (default: fp32, plus bf16 "
                   "where the device has fast bf16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="train_step: add a torch.compile'd copy of ours (img/s, compile time, gain); never in --smoke")
    p.add_argument("--e2e_compile", action="store_true", help="end_to_end: run with compile: true")
    p.add_argument("--e2e_steps", type=int, default=6, help="end_to_end: optimizer steps per run")
    p.add_argument("--e2e_batch_size", type=int, default=8)
    p.add_argument("--e2e_workers", type=int, default=2, help="end_to_end: data loader workers")
    p.add_argument("--e2e_kinds", nargs="+", default=["kmeans", "dalle", "dvae", "vqkd", "token_cache"])
    p.add_argument("--data_images", type=int, default=512, help="data: JPEGs in the benchmark set")
    p.add_argument("--data_workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--data_size", default="500x375", help="data: generated JPEG size WxH")
    p.add_argument("--data_quality", type=int, default=90)
    p.add_argument("--jpegs", type=Path, default=None, help="data: your own JPEGs (the first --data_images under it)")
    p.add_argument("--memory_model", default="base", help="memory: model size")
    p.add_argument("--onnx_teacher", default="", help="onnx: a fine-tuned teacher export (model.safetensors; default: "
                   "a fresh BEiT classifier of --onnx_teacher_size)")
    p.add_argument("--onnx_student", default="", help="onnx: the student export to convert to ONNX (e.g. beit distill's "
                   "model.safetensors; default: a fresh --onnx_student_arch)")
    p.add_argument("--onnx_teacher_size", default="base", help="onnx: fresh teacher's BEiT size")
    p.add_argument("--onnx_student_arch", default="mobilevit_xxs", help="onnx: fresh student's timm name")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p


def _fast_bf16(device) -> bool:
    import torch

    from beit.runtime.precision import cpu_has_fast_bf16
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def _section(section: str, a, device, dev_name: str, dtypes) -> dict:
    s = a.smoke
    if section == "train_step":
        from beit.bench import train_step
        res = train_step.run(device, sizes=("tiny",) if s else tuple(a.models), batch=2 if s else a.batch_size,
                             image_size=32 if s else a.image_size, rounds=1 if s else a.rounds, dtypes=tuple(dtypes),
                             peak_seconds=0.05 if s else 0.5, compile_ours=a.compile and not s,
                             smoke=s)
    elif section == "tokenizer":
        from beit.bench import tokenizer_speed
        res = tokenizer_speed.run(device, batch=2 if s else a.batch_size, rounds=1 if s else max(2, a.rounds // 2),
                                  smoke=s)
    elif section == "end_to_end":
        from beit.bench import end_to_end
        res = end_to_end.run(kinds=("kmeans", "token_cache") if s else tuple(a.e2e_kinds), image_size=32 if s else a.image_size,
                             batch_size=2 if s else a.e2e_batch_size, steps=2 if s else a.e2e_steps,
                             num_workers=0 if s else a.e2e_workers, smoke=s, compile=a.e2e_compile and not s)
    elif section == "masking":
        from beit.bench import masking_speed
        res = masking_speed.run(draws=200 if s else 20000)
    elif section == "data":
        from beit.bench import data_pipeline
        size = (80, 60) if s else tuple(int(v) for v in a.data_size.lower().split("x"))
        res = data_pipeline.run(images=16 if s else a.data_images, workers=(1,) if s else tuple(a.data_workers),
                                batch_size=4 if s else 32, size=size, quality=a.data_quality,
                                rounds=1 if s else 2, jpegs=a.jpegs)
    elif section == "onnx":
        from beit.bench import onnx_latency
        res = onnx_latency.run(teacher_path=a.onnx_teacher, student_path=a.onnx_student,
                               teacher_size="tiny" if s else a.onnx_teacher_size, student=a.onnx_student_arch,
                               image_size=32 if s else a.image_size, num_classes=10 if s else 1000,
                               rounds=1 if s else a.rounds, reps=1 if s else 10)
    else:
        from beit.bench import step_memory
        res = step_memory.run(model_size="tiny" if s else a.memory_model, batch_size=2 if s else a.batch_size,
                              image_size=32 if s else a.image_size, device=dev_name, threads=a.threads)
    return res


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    import torch

    from beit.bench.machine import machine_info

    if a.threads:
        torch.set_num_threads(a.threads)
    dev_name = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if dev_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    device = torch.device(dev_name)
    dtypes = a.dtypes or (["fp32", "bf16"] if _fast_bf16(device) else ["fp32"])
    bad = [d for d in dtypes if d not in ("fp32", "bf16")]
    if bad:
        raise ValueError(f"--dtypes takes fp32 and/or bf16, got {bad}")
    s = a.smoke
    result = {"benchmark": "beit bench", "smoke": s, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_info(device), "fast_bf16": _fast_bf16(device)}
    t_all = time.perf_counter()
    for section in a.sections:
        t0 = time.perf_counter()
        print(f"[beit bench] {section} ...", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            res = _section(section, a, device, dev_name, dtypes)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        result[section] = res

    result["seconds"] = round(time.perf_counter() - t_all, 1)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
