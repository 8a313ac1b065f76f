"""Runs and checkpoints written by the code before the regrouping (tests/fixtures/previous_layout, made at
3ae04aa by tests/fixtures/make_layout_fixtures.py) still resume and load: the same command, rerun in a copy
of the run folder, continues from the saved checkpoint (config.yaml with the old option names included),
and the old exports give the logits the old code gave."""
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from beit.cli import main as cli

FIXTURE = Path(__file__).parent / "fixtures" / "previous_layout"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def old(tmp_path, monkeypatch):
    """A copy of the fixture folder as the working directory (its configs hold relative paths)."""
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    monkeypatch.chdir(root)
    return root


def test_pretraining_run_resumes(old, capsys):
    assert cli(["pretrain", "--config", "pretrain/config.yaml", "--total_steps", "4"]) == 0
    out = capsys.readouterr()
    assert "resumed from pretrain/checkpoints/step_0000002 at step 2" in out.out + out.err
    final = json.loads((old / "pretrain" / "final_metrics.json").read_text())
    assert final["step"] == 4 and final["nonfinite_steps"] == 0
    steps = [json.loads(line)["step"] for line in (old / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [3, 4]


def test_swin_pretraining_run_resumes_and_initialises_a_finetune(old, capsys):
    assert cli(["pretrain", "--config", "swin_pretrain/config.yaml", "--total_steps", "3"]) == 0
    assert "resumed from swin_pretrain/checkpoints/step_0000002 at step 2" in "".join(capsys.readouterr())
    assert json.loads((old / "swin_pretrain" / "final_metrics.json").read_text())["step"] == 3
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    # the old Swin pretraining output (its pretrained.json gives the sizes) initialises a timm Swin classifier
    assert cli(["finetune", "--model", "swin_tiny_patch4_window7_224", "--init", "swin_pretrain/pretrained.safetensors",
                "--train_shards", "shards/train-*.tar", "--image_size", "32", "--batch_size", "4", "--epochs", "1",
                "--num_workers", "0", "--tensorboard", "false", "--mixup", "0", "--cutmix", "0", "--auto_augment", "",
                "--mixed_precision", "no", "--output_dir", "swin_ft"]) == 0
    assert "loaded" in capsys.readouterr().out
    assert (old / "swin_ft" / "model.safetensors").is_file()


def test_finetune_run_resumes_mid_epoch(old, capsys):
    before = json.loads((old / "finetune" / "final.json").read_text())
    (old / "finetune" / "final.json").unlink()
    assert cli(["finetune", "--config", "finetune/config.yaml"]) == 0
    assert "resumed from finetune/checkpoints/step_0000003 (epoch 0, mid-epoch, step 3)" in capsys.readouterr().out
    final = json.loads((old / "finetune" / "final.json").read_text())
    assert final["step"] == before["step"] == 10 and final["samples"] == before["samples"] == 6


def test_old_exports_load_and_give_the_old_logits(old, tmp_path):
    from beit.export import load_exported
    io = load_file(str(old / "finetune_io.safetensors"))
    with torch.no_grad():
        ours = load_exported(old / "finetune" / "model.safetensors")(io["input"])
        conf = json.loads((old / "finetune" / "model.json").read_text())
        plain = timm.create_model(conf["timm_entrypoint"], pretrained=True, **conf["model_kwargs"],
                                  pretrained_cfg_overlay=dict(conf["pretrained_cfg"],
                                                              file=str(old / "finetune" / "model.safetensors")))
        theirs = plain.eval()(io["input"])
    torch.testing.assert_close(ours, io["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, io["logits"], rtol=1e-5, atol=1e-5)
    # the old run folder's checkpoint re-exports (beit export reads config.yaml + the newest checkpoint)
    assert cli(["export", "--run_dir", "finetune", "--out", str(tmp_path / "re" / "model.safetensors")]) == 0
    assert json.loads((tmp_path / "re" / "model.json").read_text())["model_kwargs"] == conf["model_kwargs"]
