"""Run faults injected into real (tiny) pretraining runs, each checked by its end state: the resumed
run equals the uninterrupted one, or the run refuses with the exact message and writes nothing."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from mp.common import alive, children
from safetensors.torch import load_file
from test_pretrain import REPO, assets, losses, run, tiny_cfg  # noqa: F401  (assets: the module fixture)

from beit.checkpoints.checkpointing import checkpoint_path, find_latest_complete, list_complete
from beit.runtime.faults import RunFault
from beit.runtime.run_logging import read_metrics

FAST = dict(total_steps=6, checkpoint_every=3, keep_last=3, val_shards=[], report_to="none")


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The uninterrupted 6-step run (checkpoints at steps 3 and 6)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(tiny_cfg(assets, out, **FAST))
    return out


def assert_same_as(reference, out):
    ref_w, got_w = load_file(str(reference / "pretrained.safetensors")), load_file(str(out / "pretrained.safetensors"))
    assert ref_w.keys() == got_w.keys()
    # float32 rounding only: on some CPUs (seen on an AVX2-only EPYC) kernels fed from a reloaded checkpoint
    # differ from the uninterrupted run's in the last bits (<= 1e-8 after 3 steps); a wrong resume differs by far more
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=1e-6, atol=1e-7, msg=k)
    assert losses(out) == pytest.approx(losses(reference), rel=1e-6, abs=1e-7)


def test_non_finite_weights_are_never_saved_and_the_rerun_resumes_the_last_good_one(assets, reference, tmp_path,
                                                                                     monkeypatch):
    from beit.modeling.mim import BeitPretrainModel

    real_forward, calls = BeitPretrainModel.forward, {"n": 0}

    def forward(self, images, mask):  # step 4: a weight turns Inf (as with a huge lr)
        calls["n"] += 1
        if self.training and calls["n"] == 4:
            with torch.no_grad():
                self.lm_head.bias[0] = float("inf")
        return real_forward(self, images, mask)

    monkeypatch.setattr(BeitPretrainModel, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(RunFault, match=r"step 6: the weights or optimizer state hold NaN/Inf \(e\.g\. .*lm_head.bias"
                                       r".*not saved, the last good checkpoint is .*step_0000003"):
        run(tiny_cfg(assets, out, **FAST))
    assert [s for s, _ in list_complete(out)] == [3] and not (out / "pretrained.safetensors").exists()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    run(tiny_cfg(assets, out, **FAST))                           # the same command again
    assert_same_as(reference, out)


def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_the_older_one(assets, reference, tmp_path,
                                                                                   capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for f in ("pretrained.safetensors", "pretrained.json", "final_metrics.json"):
        (out / f).unlink(missing_ok=True)
    model = checkpoint_path(out, 6) / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-64:] = bytes(64)                                       # garbled weights, same size: loads silently
    model.write_bytes(bytes(data))
    stale = out / "checkpoints" / ".tmp_step_0000009"            # a dead run's half-written save
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    run(tiny_cfg(assets, out, **FAST))
    assert not stale.exists()                                     # removed at start-up (under the run lock)
    err = capsys.readouterr()
    assert f"checkpoint {checkpoint_path(out, 6)} is damaged: model.safetensors does not match its recorded" in err.err
    assert f"resumed from {checkpoint_path(out, 3)} at step 3" in err.out
    assert (out / "checkpoints" / "damaged" / "step_0000006" / "model.safetensors").is_file()  # kept
    assert_same_as(reference, out)


def test_pretraining_ignores_labels_so_labelled_and_unlabelled_shards_mix(assets, tmp_path):
    from beit.data.sample_sets import build_sample_shards
    build_sample_shards(tmp_path / "digits", "digits")          # digits carry a .cls label, photos none
    summary = run(tiny_cfg(assets, tmp_path / "run", total_steps=2, val_shards=[], checkpoint_every=2,
                           train_shards=[assets["train"], str(tmp_path / "digits" / "train-*.tar")]))
    assert summary["step"] == 2 and summary["data/bad"] == 0


HOLD = "import sys, time\nfrom beit.runtime.run_lock import hold_output_dir\nwith hold_output_dir(sys.argv[1]):\n" \
       "    print('held', flush=True)\n    time.sleep(600)\n"


def test_a_second_run_on_a_locked_folder_is_refused_and_the_lock_dies_with_its_holder(assets, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFault, match=rf"output_dir {out} is in use by another run \(host "
                                           rf"{socket.gethostname()}, PID {holder.pid}, since .*another --output_dir"):
            run(tiny_cfg(assets, out, **FAST))
        assert sorted(p.name for p in out.iterdir()) == [".run.lock"]   # nothing of the second run written
    finally:
        holder.kill()                                            # a crash: the OS releases the lock
        holder.wait()
    assert run(tiny_cfg(assets, out, **dict(FAST, total_steps=1)))["step"] == 1


def test_training_ends_when_accelerate_launch_is_killed_and_the_rerun_resumes(assets, tmp_path):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_cfg(assets, out, total_steps=40, checkpoint_every=2, keep_last=2,
                                                val_shards=[], report_to="none")))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(REPO / "beit" / "pretrain.py"), "--config", str(cfg_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = subprocess.Popen(launch, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    trainers = []
    try:
        deadline = time.time() + 180
        while find_latest_complete(out) is None:
            assert launcher.poll() is None and time.time() < deadline, "no checkpoint from the launched run"
            time.sleep(0.1)
        trainers = children(launcher.pid)
        assert len(trainers) == 1, trainers
        os.kill(launcher.pid, signal.SIGKILL)                    # the launcher only, as a lost terminal would
        launcher.wait()
        t0 = time.time()
        while alive(trainers[0]) and time.time() - t0 < 30:
            time.sleep(0.1)
        assert not alive(trainers[0]), "the training process outlived its launcher"
    finally:
        for pid in ([launcher.pid] if launcher.poll() is None else []) + [p for p in trainers if alive(p)]:
            os.kill(pid, signal.SIGKILL)
    step = int(find_latest_complete(out).name.split("_")[1])
    done = subprocess.run([sys.executable, "-m", "beit.pretrain", "--config", str(cfg_path), "--total_steps",
                           str(step + 2)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {checkpoint_path(out, step)} at step {step}" in done.stdout
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, step + 3))                    # one writer: every step once, in order
