"""A short pretraining run with each tokenizer kind: the loop never knows which tokenizer it has."""
import json
import math

import pytest
from test_pretrain import assets, run, tiny_cfg  # noqa: F401  (module fixtures and helpers)
from test_tokenizers_interface import saved  # noqa: F401  (one tiny saved tokenizer per kind, 32 px -> 4x4)

from beit.runtime.run_logging import read_metrics
from beit.tokenizers import TOKENIZER_KINDS


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_pretraining_runs_with_each_tokenizer(assets, saved, kind, tmp_path):  # noqa: F811
    out = tmp_path / kind
    run(tiny_cfg(assets, out, tokenizer=kind, tokenizer_path=str(saved[kind]), patch_size=8,
                 min_mask_patches=2, total_steps=4, checkpoint_every=4, eval_batches=1))
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == 4 and final["val/tokens"] > 0
    meta = json.loads((out / "pretrained.json").read_text())
    assert meta["tokenizer"] == kind
