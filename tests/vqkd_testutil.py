"""Helpers for the VQ-KD tests: tiny teachers written by their own libraries, a tiny VQ-KD config on the
bundled photo shards, and runs in-process (fresh Accelerate state) or as processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMM_NAME = "vit_tiny_patch16_224"
TIMM_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def timm_teacher(folder: Path) -> Path:
    """A tiny random timm ViT (4x4 patches at 32 px) saved as timm state-dict safetensors."""
    import timm
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, **TIMM_KW)
    path = folder / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_vqkd(shards: dict, teacher_file: Path, out: Path, **kw) -> dict:
    """A tiny VQ-KD run on the photos: 32 px, 8 px patches (4x4 grid), 64 codes, the timm teacher."""
    cfg = dict(train_shards=[shards["train"]], val_shards=[shards["val"]], teacher="timm",
               teacher_path=str(teacher_file), teacher_model=TIMM_NAME, teacher_model_kwargs=TIMM_KW,
               input_size=32, patch_size=8, embed_dim=32,
               depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, vocab_size=64,
               code_dim=8, batch_size=16, total_steps=6, warmup_steps=1, lr=2e-3, crop_scale_min=0.3, num_workers=0,
               checkpoint_every=3, keep_last=5, log_every=1, eval_every=3, report_to="none", seed=0,
               restart_after_steps=2, mixed_precision="no", output_dir=str(out))
    cfg.update(kw)
    return cfg


def run_vqkd(cfg: dict):
    """One in-process run with a fresh Accelerate state (as a new process would have); returns the summary."""
    from accelerate.state import AcceleratorState, GradientState

    from beit.tokenizers.vqkd_train import VQKDTrainConfig
    from beit.tokenizers.vqkd_train import run_vqkd as run
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return run(VQKDTrainConfig(**cfg))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def argv(cfg: dict) -> list[str]:
    """The config as command-line flags (lists and dicts in YAML flow style)."""
    import yaml
    out = []
    for k, v in cfg.items():
        out += [f"--{k}", v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip()]
    return out


def command(cfg: dict, nproc: int = 1, log_dir: Path | None = None) -> list[str]:
    """``python -m beit.tokenizers.train vqkd ...``, under torchrun for ``nproc`` > 1 (every rank's output in its
    own files under ``log_dir`` when given)."""
    if nproc == 1:
        return [sys.executable, "-m", "beit.tokenizers.train", "vqkd", *argv(cfg)]
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *logs,
            "-m", "beit.tokenizers.train", "vqkd", *argv(cfg)]


def env(nproc: int = 1) -> dict:
    return dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                TOKENIZERS_PARALLELISM="false")


def run_process(cfg: dict, nproc: int = 1, timeout: float = 300) -> str:
    """Run to completion as process(es); fails with the output on a non-zero exit. Returns the output."""
    p = subprocess.run(command(cfg, nproc), cwd=REPO, env=env(nproc), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr
