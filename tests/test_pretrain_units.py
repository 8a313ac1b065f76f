"""Pretraining pieces that need no data: config, grids, steps, per-sample seeding, metrics, logging."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from beit.config import _help_of, parse_config
from beit.data.pipelines.pretraining import MimSample
from beit.engines.pretrain import MimMeter, batch_to_device, batch_tokens
from beit.options.pretrain import PretrainConfig
from beit.runtime.run_logging import RunLogger, read_metrics
from beit.training.pretraining import check_grids, resolve_steps


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        parse_config(PretrainConfig, ["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(PretrainConfig):
        assert f"--{f.name}" in text, f.name
        assert _help_of(PretrainConfig, f.name), f"{f.name} has no help text"  # own, or its shared section's


def test_masked_count_reference_and_derived():
    assert PretrainConfig(train_shards=["x"]).masked_count() == 75                      # 224/16 -> 14x14
    assert PretrainConfig(train_shards=["x"], image_size=64, patch_size=8).masked_count() == round(0.4 * 64)
    assert PretrainConfig(train_shards=["x"], image_size=64, patch_size=8, num_masking_patches=20).masked_count() == 20


@pytest.mark.parametrize("kw, msg", [
    (dict(image_size=65, patch_size=8), "not a multiple"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(train_shards=[]), "no training data"),
    (dict(epochs=0, total_steps=0), "epochs"),
    (dict(mask_ratio=1.5), "mask_ratio"),
])
def test_validate_rejects(kw, msg):
    cfg = dataclasses.replace(PretrainConfig(train_shards=["x"]), **kw)
    with pytest.raises(ValueError, match=msg):
        cfg.validate()


def test_grid_mismatch_message():
    class Tok:
        grid_size, input_size = (14, 14), 112
    cfg = PretrainConfig(train_shards=["x"], image_size=64, patch_size=8, tokenizer="kmeans")
    with pytest.raises(ValueError, match=r"token grid is 14x14 .* patch grid is 8x8 \(image_size 64 / patch_size 8\)"):
        check_grids(cfg, Tok())


def test_resolve_steps():
    cfg = PretrainConfig(train_shards=["x"], epochs=3, warmup_epochs=0.5)
    assert resolve_steps(cfg, 10, 2) == (5, 15, 2)                  # round(0.5 * 5) = 2 (banker's rounding)
    cfg = PretrainConfig(train_shards=["x"], total_steps=7, warmup_steps=100)
    assert resolve_steps(cfg, 10, 1, log=lambda m: None) == (10, 7, 0)  # warmup capped to a tenth of the run
    with pytest.raises(ValueError, match="fewer than grad_accum_steps"):
        resolve_steps(cfg, 3, 4)


class _Masker:
    def reseed(self, s):
        self.rng = np.random.default_rng(s)

    def __call__(self):
        return self.rng.random((4, 4)) < 0.5


def test_map_fn_reseeds_the_mask_from_the_sample_seed():
    img = Image.new("RGB", (8, 8))
    fn = MimSample(lambda im: (torch.zeros(3, 8, 8), torch.zeros(3, 4, 4)), _Masker())
    a, b, c = (fn(img, {"__seed__": s})["mask"] for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.bool and a.shape == (4, 4)


def test_loop_converts_uint8_views_on_the_device():
    """The loader ships uint8 views; the loop normalises the encoder view and gives the tokenizer [0, 1]."""
    enc = torch.tensor([0, 255], dtype=torch.uint8).repeat(1, 3, 4, 2)  # [1, 3, 4, 4]
    tok = torch.full((1, 3, 2, 2), 51, dtype=torch.uint8)
    batch = {"image": enc, "tokenizer_image": tok, "mask": torch.ones(1, 2, 2, dtype=torch.bool)}
    images, mask = batch_to_device(batch, "cpu")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert images.dtype == torch.float32 and torch.allclose(images, (enc.float() / 255 - mean) / std)
    assert mask.dtype == torch.bool

    class Tok:
        def tokenize(self, x):
            assert x.dtype == torch.float32 and torch.allclose(x, torch.full_like(x, 0.2))
            return torch.zeros(x.shape[0], 2, 2, dtype=torch.long)
    assert batch_tokens(batch, Tok(), "cpu").shape == (1, 2, 2)


def test_meter_accuracy_and_majority_baseline():
    m = MimMeter(vocab_size=4, device="cpu")
    labels = torch.tensor([0, 0, 0, 1, 2, 3])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 3, 3]), 4).float()
    m.update({"mim": (torch.tensor(2.0), logits)}, labels)

    class Acc:
        num_processes = 1
    r = m.reduce(Acc())
    assert r["mim_acc"] == pytest.approx(4 / 6) and r["majority_acc"] == pytest.approx(3 / 6)
    assert r["loss"] == pytest.approx(2.0) and r["tokens"] == 6


def test_meter_window_saved_by_two_ranks_resumes_on_one_as_their_sum():
    """A stop inside a logging window on 2 processes, resumed on 1: rank 0 takes both windows, the window logs
    what the 2 ranks would have logged together (the reduce sums over ranks either way)."""
    class Acc:
        num_processes = 1
    windows, both = [], MimMeter(vocab_size=4, device="cpu")
    for labels, pred in (([0, 0, 1], [0, 1, 1]), ([2, 3, 3, 3], [2, 3, 0, 3])):
        m = MimMeter(vocab_size=4, device="cpu")
        for meter in (m, both):
            meter.update({"mim": (torch.tensor(1.5), torch.nn.functional.one_hot(torch.tensor(pred), 4).float())},
                         torch.tensor(labels))
        windows.append(m.state_dict())
    rank0, rank1 = MimMeter(vocab_size=4, device="cpu"), MimMeter(vocab_size=4, device="cpu")
    rank0.load_state_dict({"saved_ranks": windows}, rank=0)
    rank1.load_state_dict({"saved_ranks": windows}, rank=1)
    assert rank0.reduce(Acc()) == both.reduce(Acc()) and rank1.reduce(Acc()) == {"tokens": 0}
    empty = MimMeter(vocab_size=4, device="cpu")
    empty.load_state_dict({"saved_ranks": [None, None]}, rank=0)  # saved between windows
    assert empty.reduce(Acc()) == {"tokens": 0}


def test_logger_truncates_on_resume(tmp_path):
    class Acc:
        is_main_process, trackers = True, []
    log = RunLogger(Acc(), tmp_path)
    for s in (10, 20, 30):
        log.log({"loss": 1.0 / s, "bad": float("nan")}, step=s)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')                                  # a line cut short by a kill
    RunLogger(Acc(), tmp_path, resume_step=20)
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20]
    assert read_metrics(tmp_path)[0]["bad"] == "nan"
    RunLogger(Acc(), tmp_path)                                      # a fresh run starts a fresh file
    assert read_metrics(tmp_path) == []
    json.dumps(read_metrics(tmp_path))


def test_auto_mixed_precision(monkeypatch):
    import beit.runtime.precision as precision
    from beit.runtime.precision import resolve_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert resolve_mixed_precision("auto") == "no"                 # fp32 on a CPU without fast bf16
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"               # AMX / AVX-512-BF16 CPU
    assert resolve_mixed_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_mixed_precision("auto") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")          # accelerate launch's default: not a choice
    assert resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")        # the launcher's explicit setting wins
    assert resolve_mixed_precision("auto") is None
