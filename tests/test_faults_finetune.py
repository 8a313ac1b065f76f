"""Fine-tuning faults: a run killed mid-epoch resumes to exactly the uninterrupted result (checkpoints
every ``checkpoint_every`` optimizer steps), and a resume with another model is refused before anything
(config.yaml included) is written."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_finetune_run import cfg, read_jsonl

import beit.checkpoints.checkpointing as checkpointing
from beit.finetune import run_finetune

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# 2 epochs x 3 steps; checkpoints at steps 2 and 4 (mid-epoch) and 6; mixup, RandAugment, drop path on
RUN = dict(epochs=2, batches_per_epoch=3, checkpoint_every=2, keep_last=3, drop_path=0.1)


class Killed(BaseException):
    """Stands in for SIGKILL right after a checkpoint (nothing after it runs)."""


def test_killed_mid_epoch_resumes_to_the_uninterrupted_result(digits, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    run_finetune(cfg(digits, ref, **RUN))
    assert sorted(p.name for p in (ref / "checkpoints").glob("step_*")) == \
        ["step_0000002", "step_0000004", "step_0000006"]

    real_save = checkpointing.save_checkpoint

    def save_then_die(acc, out, step, *a, **kw):
        path = real_save(acc, out, step, *a, **kw)
        if step == 4:
            raise Killed
        return path

    out = tmp_path / "run"
    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_finetune(cfg(digits, out, **RUN))
    monkeypatch.undo()
    state = json.loads((out / "checkpoints" / "step_0000004" / "train_state.json").read_text())
    assert state["epoch"] == 1 and state["mid_epoch"] is True      # step 4 of 6: inside the second epoch
    run_finetune(cfg(digits, out, **RUN))                          # the same command again

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = json.loads((ref / "final.json").read_text()), json.loads((out / "final.json").read_text())
    assert fa == fb
    steps = lambda d: [(r["step"], r["loss"]) for r in read_jsonl(d / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert steps(out) == steps(ref) and [s for s, _ in steps(out)] == list(range(1, 7))

    # a resume with another model size is refused before anything is written
    before = {f: (out / f).read_bytes() for f in ("config.yaml", "metrics.jsonl")}
    shutil.rmtree(out / "checkpoints" / "step_0000006")
    with pytest.raises(ValueError, match=r"cannot resume .*\n  depth: saved 2, now 3"):
        run_finetune(cfg(digits, out, **dict(RUN, depth=3)))
    assert {f: (out / f).read_bytes() for f in before} == before


def test_a_fine_tune_sample_without_label_is_a_counted_bad_sample_of_its_shard(digits, tmp_path):
    import tarfile

    from beit.data.loading.stream import build_stream_loader
    from beit.data.pipelines.labelled import LabelledMap
    from beit.data.storage.shard_format import add_member, iter_tar_samples

    shard = tmp_path / "nolabel-000000.tar"
    with open(sorted(digits.glob("train-*.tar"))[0], "rb") as f, tarfile.open(shard, "w") as out:
        for i, s in enumerate(iter_tar_samples(f)):
            add_member(out, f"{s['__key__']}.png", s["png"])
            if i != 2:                                          # sample 2 loses its label
                add_member(out, f"{s['__key__']}.cls", s["cls"])
    loader = build_stream_loader(str(shard), map_fn=LabelledMap(lambda im: torch.zeros(1), 10), batch_size=4,
                                 num_workers=0, shuffle_buffer=1)
    n = sum(len(b["label"]) for b in loader)
    st = loader.stats
    assert st["bad_by_reason"] == {"no_label": 1} and st["shards"][str(shard)]["reasons"] == {"no_label": 1}
    assert st["examples"][0]["shard"] == str(shard) and n == (st["samples"] // 4) * 4
