"""Batch-1 CPU latency of the exported ONNX model (onnxruntime) beside the PyTorch teacher it was distilled from.

The student (default: a fresh timm ``mobilevit_xxs``; or your ``beit distill`` export) is exported with
``beit.export.onnx_export.export_onnx`` exactly as ``beit export-onnx`` does, and checked against PyTorch on the
timed input; the teacher (default: a fresh BEiT classifier of ``teacher_size``; or your fine-tuned
export) runs in PyTorch, as it would without the device export. Latency does not depend on the weights,
so fresh models measure the architectures; pass the exports to measure yours. Every runtime runs batch 1
in alternating rounds (teacher, ONNX student, PyTorch student, ...); medians in ms per image.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from beit.bench.timing import alternate, median, rnd, spread


def _fresh(teacher_size: str, student: str, image_size: int, num_classes: int):
    from beit.modeling.classifier import build_beit_classifier, build_timm_model
    from beit.modeling.mim import BEIT_SIZES
    dims = {k: v for k, v in BEIT_SIZES[teacher_size].items() if k in ("embed_dim", "depth", "num_heads", "mlp_ratio")}
    patch = 16 if image_size >= 64 else 8
    teacher = build_beit_classifier(num_classes, img_size=image_size, patch_size=patch, drop_path_rate=0.0, **dims)
    stud = build_timm_model(student, num_classes, img_size=image_size)
    config = {"input_size": [3, image_size, image_size], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
              "num_classes": num_classes, "architecture": student, "crop_pct": 1.0, "interpolation": "bicubic"}
    names = {"teacher": f"BEiT-{teacher_size} classifier, patch {patch} (fresh weights)",
             "student": f"{student} (fresh weights)"}
    return teacher, stud, config, names


def _exports(teacher_path: str, student_path: str):
    from beit.checkpoints.checkpointing import load_weights
    from beit.export.classifier import load_exported
    _, config = load_weights(student_path)
    if config is None or "input_size" not in config:
        raise ValueError(f"--onnx_student {student_path}: not a fine-tuned classifier export (its .json is missing)")
    _, tconf = load_weights(teacher_path)
    names = {"teacher": f"{(tconf or {}).get('architecture')} from {teacher_path}",
             "student": f"{config.get('architecture')} from {student_path}"}
    return load_exported(teacher_path), load_exported(student_path), config, names


def run(*, teacher_path: str = "", student_path: str = "", teacher_size: str = "base", student: str = "mobilevit_xxs",
        image_size: int = 224, num_classes: int = 1000, rounds: int = 5, reps: int = 10) -> dict:
    from beit.export.onnx_export import export_onnx, onnx_session
    if bool(teacher_path) != bool(student_path):
        raise ValueError("pass both --onnx_teacher and --onnx_student (fine-tuned exports), or neither (fresh models)")
    torch.manual_seed(0)
    if teacher_path:
        teacher, stud, config, names = _exports(teacher_path, student_path)
    else:
        teacher, stud, config, names = _fresh(teacher_size, student, image_size, num_classes)
    teacher, stud = teacher.eval(), stud.eval()
    side = int(config["input_size"][-1])
    t_side = int(getattr(teacher, "patch_embed").img_size[0]) if hasattr(teacher, "patch_embed") else side
    x = np.random.default_rng(0).standard_normal((1, 3, side, side), dtype=np.float32)
    xt = torch.from_numpy(x) if t_side == side else torch.nn.functional.interpolate(
        torch.from_numpy(x), size=(t_side, t_side), mode="bicubic", align_corners=False)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, _ = export_onnx(stud, config, Path(tmp) / "student.onnx")
        size_mb = onnx_path.stat().st_size / 2 ** 20
        session = onnx_session(onnx_path)
        with torch.inference_mode():
            ref = stud(torch.from_numpy(x)).float().numpy()
            got = session.run(None, {"images": x})[0]
            fns = {"teacher_pytorch": lambda: teacher(xt),
                   "student_onnxruntime": lambda: session.run(None, {"images": x}),
                   "student_pytorch": lambda: stud(torch.from_numpy(x))}
            times = alternate(fns, rounds=rounds, reps=reps, warmup=2)
    ms = {k: 1000 * median(v) for k, v in times.items()}
    params = {"teacher": sum(p.numel() for p in teacher.parameters()),
              "student": sum(p.numel() for p in stud.parameters())}
    return {
        "models": names, "image_size": {"teacher": t_side, "student": side}, "batch_size": 1,
        "params_m": {k: rnd(v / 1e6) for k, v in params.items()}, "onnx_file_mib": rnd(size_mb),
        "max_abs_logit_diff_onnx_vs_pytorch": float(np.abs(ref - got).max()),
        "latency_ms": {k: rnd(v) for k, v in ms.items()},
        "rounds_ms": {k: [rnd(1000 * t) for t in v] for k, v in times.items()},
        "spread": {k: spread(v) for k, v in times.items()},
        "teacher_vs_onnx_student": rnd(ms["teacher_pytorch"] / ms["student_onnxruntime"]),
        "onnxruntime_vs_pytorch_student": rnd(ms["student_pytorch"] / ms["student_onnxruntime"]),
        "threads": torch.get_num_threads(), "rounds": rounds, "reps_per_round": reps,
    }
