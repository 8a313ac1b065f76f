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

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from beit.config import Options, field, parse_config

SECTIONS = ("train_step", "tokenizer", "end_to_end", "masking", "data", "memory", "onnx")
EXTRA_SECTIONS = ("small_data", "tb_images", "step_phases")  # run only when named
Section = Literal[SECTIONS + EXTRA_SECTIONS]


@dataclass
class BenchConfig(Options):
    sections: list[Section] = field(default_factory=lambda: list(SECTIONS), help=f"what to run (default: "
                                    f"{', '.join(SECTIONS)}; also {', '.join(EXTRA_SECTIONS)})")
    smoke: bool = field(False, help="tiny sizes, one round: a structure check that takes seconds")
    device: str = field("auto", help="auto (cuda if available) | cpu | cuda")
    threads: int = field(0, help="torch intra-op threads (0: torch's default)")
    models: list[str] = field(default_factory=lambda: ["tiny", "base"], help="train_step model sizes")
    batch_size: int = field(8, help="train_step / tokenizer batch")
    image_size: int = field(224, help="train_step / end_to_end encoder view (patch 16)")
    rounds: int = field(5, help="alternating timed rounds (median reported)")
    dtypes: list[Literal["fp32", "bf16"]] = field(default_factory=list, help="train_step dtypes (empty: fp32, plus "
                                                  "bf16 where the device has fast bf16)")
    compile: bool = field(True, help="train_step: add a torch.compile'd copy of ours (img/s, compile time, gain); "
                                     "never in --smoke")
    e2e_compile: bool = field(False, help="end_to_end: run with compile: true")
    e2e_steps: int = field(6, help="end_to_end: optimizer steps per run")
    e2e_batch_size: int = field(8, help="end_to_end: images per step")
    e2e_workers: int = field(2, help="end_to_end: data loader workers")
    e2e_kinds: list[str] = field(default_factory=lambda: ["kmeans", "dalle", "dvae", "vqkd", "token_cache"],
                                 help="end_to_end: tokenizer kinds (and token_cache)")
    data_images: int = field(512, help="data: JPEGs in the benchmark set")
    data_workers: list[int] = field(default_factory=lambda: [1, 2], help="data: loader worker counts")
    data_size: str = field("500x375", help="data: generated JPEG size WxH")
    data_quality: int = field(90, help="data: JPEG quality")
    jpegs: str = field("", help="data: your own JPEGs (the first --data_images under it)")
    memory_model: str = field("base", help="memory: model size")
    onnx_teacher: str = field("", help="onnx: a fine-tuned teacher export (model.safetensors; default: a fresh BEiT "
                                       "classifier of --onnx_teacher_size)")
    onnx_student: str = field("", help="onnx: the student export to convert to ONNX (e.g. beit distill's "
                                       "model.safetensors; default: a fresh --onnx_student_arch)")
    onnx_teacher_size: str = field("base", help="onnx: fresh teacher's BEiT size")
    onnx_student_arch: str = field("mobilevit_xxs", help="onnx: fresh student's timm name")
    small_data_steps: int = field(300, help="small_data: pretraining steps of 64 images")
    tb_steps: int = field(100, help="tb_images: optimizer steps per run (>= the default picture interval)")
    tb_rounds: int = field(2, help="tb_images: alternating rounds of (off, default, dense)")
    step_phases_steps: int = field(300, help="step_phases: optimizer steps per stage run")
    baseline_python: str = field("", help="step_phases: the Python of another checkout (its beit installed "
                                 "editable) to time beside this one")
    work_dir: str = field("", help="small_data / tb_images / step_phases: where shards and runs go (default: a "
                          "temporary folder)")
    out: str = field("", help="also write the JSON here")

    def validate(self) -> None:
        self.check_choices()
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")


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
        res = end_to_end.run(kinds=("kmeans", "token_cache") if s else tuple(a.e2e_kinds),
                             image_size=32 if s else a.image_size,
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
                                rounds=1 if s else 2, jpegs=Path(a.jpegs) if a.jpegs else None)
    elif section == "small_data":
        from beit.bench import small_data
        res = small_data.run(steps=20 if s else a.small_data_steps, work_dir=a.work_dir)
    elif section == "step_phases":
        from beit.bench import step_phases
        res = step_phases.run(steps=20 if s else a.step_phases_steps, rounds=1 if s else max(2, a.rounds // 2),
                              baseline_python=a.baseline_python, work_dir=a.work_dir)
    elif section == "tb_images":
        from beit.bench import tb_images
        res = tb_images.run(steps=4 if s else a.tb_steps, rounds=1 if s else a.tb_rounds, work_dir=a.work_dir)
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
    a = parse_config(BenchConfig, argv, description=__doc__)
    import torch

    from beit.bench.machine import machine_info

    if a.threads:
        torch.set_num_threads(a.threads)
    dev_name = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if dev_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    device = torch.device(dev_name)
    dtypes = a.dtypes or (["fp32", "bf16"] if _fast_bf16(device) else ["fp32"])
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
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
