"""Access to the reference fixtures in tests/fixtures/reference/ (written by make_reference_fixtures.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parent / "fixtures" / "reference"


def case(name: str) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(folder, meta, io tensors with ``images`` as float [0, 1]) of one fixture case."""
    d = ROOT / name
    meta = json.loads((d / "meta.json").read_text())
    io = load_file(str(d / "io.safetensors"))
    io["images"] = io["images"].float() / 255
    return d, meta, io


def checkpoint(name: str) -> Path:
    d, meta, _ = case(name)
    return d / meta["checkpoint"]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())
