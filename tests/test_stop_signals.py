"""SIGTERM / SIGINT / SIGUSR1 stop every training command after its current optimizer step with a verified
checkpoint at that step, one line and exit status 75; the same command resumes it and loses nothing.

Real signals throughout: to a real training process (and its data-loader workers, as a Ctrl-C does) at a step it has
reached, or sent by a run to itself at an exact step (``signal_at``) to compare a stopped-and-resumed run with the
uninterrupted one number for number."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distill import distill_cfg, teacher  # noqa: F401  (teacher: the module fixture)
from test_finetune_seg import seg_cfg, seg_shards  # noqa: F401  (seg_shards: the module fixture)
from test_pretrain import REPO, assets, tiny_cfg  # noqa: F401  (assets: the module fixture)
from test_pretrain import run as run_pretrain

from beit.checkpoints import checkpointing
from beit.checkpoints.checkpointing import checkpoint_path, list_complete
from beit.checkpoints.integrity import verify_checkpoint
from beit.finetune import run_finetune
from beit.runtime.faults import RunStopped
from beit.runtime.run_logging import read_metrics
from beit.runtime.stopping import EXIT_STOPPED, StopSignals

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# one intra-op thread in and out of process: with two, this CPU's float sums differ in the last bit between
# identical runs (resumed or not), and these tests compare weights bit for bit
pytestmark = pytest.mark.usefixtures("one_thread", "terminal_signals")  # conftest.py


def signal_at(monkeypatch, step: int, sig=signal.SIGTERM) -> None:
    """The run sends ``sig`` to itself (a real signal, through the real handler) as it reaches ``step``."""
    real = StopSignals.check

    def check(self, accelerator, s, save):
        if s == step:
            os.kill(os.getpid(), sig)
        return real(self, accelerator, s, save)
    monkeypatch.setattr(StopSignals, "check", check)


def step_losses(out) -> dict[int, float]:
    recs = [r for r in read_metrics(out) if "loss" in r]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def assert_stopped_at(out: Path, step: int) -> Path:
    """The newest checkpoint is the stop's, complete and verified."""
    done = list_complete(out)
    assert done and done[-1][0] == step, f"checkpoints {[s for s, _ in done]}, stopped at {step}"
    assert verify_checkpoint(done[-1][1]) is None
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    return done[-1][1]


# --- real processes: the command line, the one line, the exit status --------------------------------------------

def start(module: str, cfg_path: Path, log: Path) -> subprocess.Popen:
    """``python -m <module> --config <cfg_path>`` (``module`` may go on with a subcommand: ``beit.cli tokenizer train
    vqkd``) in its own process group (a Ctrl-C reaches the group: the process and its data workers)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", *module.split(), "--config", str(cfg_path)], cwd=REPO, env=ENV,
                                stdout=f, stderr=subprocess.PIPE, text=True, start_new_session=True)


def signal_after(p: subprocess.Popen, out: Path, step: int, sig, group: bool) -> tuple[int, str]:
    """Send ``sig`` once ``out`` has logged ``step``; (exit status, stderr)."""
    deadline = time.time() + 240
    while max(step_losses(out) if (out / "metrics.jsonl").is_file() else [0]) < step:
        assert p.poll() is None, f"the run ended before step {step}: {p.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no progress in 240 s"
        time.sleep(0.02)
    (os.killpg if group else os.kill)(p.pid, sig)
    try:
        _, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, err


def run_to_end(module: str, cfg_path: Path, log: Path) -> str:
    p = start(module, cfg_path, log)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return log.read_text()


def check_stop_line(rc: int, err: str, out: Path, sig) -> int:
    """Exit 75, no traceback, and the last line names the step and its checkpoint; returns the step."""
    assert rc == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    step = int(last.split()[3])
    assert last == (f"stopped at step {step} on {signal.Signals(sig).name}; the checkpoint is "
                    f"{checkpoint_path(out, step)}; rerun the same command to resume"), last
    return step


def interrupt_and_rerun(module: str, config, tmp_path: Path, k: int, sig, group: bool) -> tuple[Path, Path, int]:
    """The uninterrupted run, the same command signalled after step ``k`` (one line, status 75, a verified
    checkpoint at the step it stopped, nothing logged after it), then the same command again to its end, which
    resumes there. Returns (reference folder, run folder, the stop's step)."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_to_end(module, config(ref), tmp_path / "ref.log")
    rc, err = signal_after(start(module, config(out), tmp_path / "run.log"), out, k, sig, group)
    stopped = check_stop_line(rc, err, out, sig)
    print(f"{signal.Signals(sig).name} after step {k}: stopped at step {stopped}")
    assert k <= stopped and max(step_losses(out)) <= stopped              # finished the step it was in, no more
    assert_stopped_at(out, stopped)
    text = run_to_end(module, config(out), tmp_path / "rerun.log")
    assert f"resumed from {checkpoint_path(out, stopped)}" in text and f"step {stopped}" in text
    return ref, out, stopped


def test_ctrl_c_at_a_random_step_of_pretraining_checkpoints_that_step_and_the_rerun_loses_nothing(assets, tmp_path):
    """The issue's setting (checkpoint_every 1000): Ctrl-C (SIGINT to the process group, data workers included)
    at a random step gives one line and status 75, a checkpoint at the step it stopped; the rerun loses 0 steps and
    logs the uninterrupted run's losses (log_every 2: a stop inside a logging window resumes that window)."""
    def config(out):
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(tiny_cfg(assets, out, total_steps=30, checkpoint_every=1000, log_every=2,
                                                num_workers=2, val_shards=[], keep_last=2)))
        return path
    ref, out, stopped = interrupt_and_rerun("beit.pretrain", config, tmp_path, random.Random(22).randint(4, 16),
                                            signal.SIGINT, group=True)
    assert stopped < 30
    assert step_losses(out) == step_losses(ref) and sorted(step_losses(out)) == list(range(2, 31, 2))
    assert same_weights(ref / "pretrained.safetensors", out / "pretrained.safetensors")


def test_sigterm_during_fine_tuning_checkpoints_that_step_and_the_rerun_ends_like_the_uninterrupted_run(digits,
                                                                                                      tmp_path):
    def config(out):
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(dict(
            train_shards=str(digits / "train-*.tar"), val_shards=str(digits / "test-*.tar"), output_dir=str(out),
            image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, epochs=2, batches_per_epoch=8,
            batch_size=16, num_workers=1, lr=1e-3, warmup_epochs=0.5, mixup=0.0, cutmix=0.0, report_to="none",
            log_every=1, checkpoint_every=1000, seed=0)))
        return path
    ref, out, stopped = interrupt_and_rerun("beit.finetune", config, tmp_path, random.Random(23).randint(3, 10),
                                            signal.SIGTERM, group=False)
    assert stopped < 16
    assert step_losses(out) == step_losses(ref) and sorted(step_losses(out)) == list(range(1, 17))
    assert json.loads((out / "final.json").read_text()) == json.loads((ref / "final.json").read_text())
    assert same_weights(ref / "model.safetensors", out / "model.safetensors")


# --- in process, a signal at an exact step: every trainer --------------------------------------------------------

def stop_and_resume(monkeypatch, step: int, sig, run, out: Path) -> RunStopped:
    """``run()`` with ``sig`` at ``step``: it raises RunStopped naming that step's (verified) checkpoint; then the
    same run again to its end. Returns the stop."""
    signal_at(monkeypatch, step, sig)
    with pytest.raises(RunStopped) as stop:
        run()
    monkeypatch.undo()
    assert stop.value.step == step and str(stop.value).startswith(f"stopped at step {step} on {sig.name}; ")
    assert stop.value.checkpoint == str(assert_stopped_at(out, step))
    run()
    return stop.value


@pytest.mark.parametrize("sig, step", [(signal.SIGUSR1, 3), (signal.SIGINT, 4)],
                         ids=["mid-epoch", "an epoch's last step"])
def test_segmentation_fine_tune_stops_at_the_step_and_resumes_exactly(seg_shards, tmp_path, monkeypatch, sig,
                                                                     step):
    ref, out = tmp_path / "ref", tmp_path / "run"
    res = run_finetune(seg_cfg(seg_shards, ref))
    stop_and_resume(monkeypatch, step, sig, lambda: run_finetune(seg_cfg(seg_shards, out)), out)
    assert step_losses(out) == step_losses(ref) and len(step_losses(out)) == 8
    assert json.loads((out / "final.json").read_text()) == json.loads((ref / "final.json").read_text())
    assert same_weights(ref / "model.safetensors", out / "model.safetensors") and res["mIoU"] >= 0


def test_distillation_stops_at_the_step_and_resumes_exactly(digits, teacher, tmp_path, monkeypatch):  # noqa: F811
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_finetune(distill_cfg(digits, teacher, ref, checkpoint_every=1000))
    stop_and_resume(monkeypatch, 3, signal.SIGTERM,
                    lambda: run_finetune(distill_cfg(digits, teacher, out, checkpoint_every=1000)), out)
    assert step_losses(out) == step_losses(ref) and len(step_losses(out)) == 4
    assert json.loads((out / "final.json").read_text()) == json.loads((ref / "final.json").read_text())
    assert same_weights(ref / "model.safetensors", out / "model.safetensors")


def test_kmeans_tokenizer_fit_stops_at_the_batch_and_resumes_to_the_same_codebook(assets, tmp_path, monkeypatch):
    """Stopped with --report_to none, resumed with tensorboard (the trackers are no part of the fit's options): the
    same codebook, and the resumed fit logs the second pass's inertia as the uninterrupted fit did."""
    from test_tensorboard_layout import events

    from beit.tokenizers.fitting import KMeansTrainConfig, train_kmeans
    shards = assets["train"].replace("000013", "000002")       # 3 shards: 10 batches an epoch
    cfg = lambda out, report_to="tensorboard": KMeansTrainConfig(  # noqa: E731
        train_shards=[shards], out=str(out), vocab_size=16, patch_size=4, input_size=32, epochs=2, batch_size=32,
        init_patches=2000, num_workers=0, report_to=report_to)
    ref = train_kmeans(cfg(tmp_path / "ref" / "kmeans"))
    out = tmp_path / "run" / "kmeans"
    run_dir = Path(f"{out}.fit")
    runs = []

    def fit():
        runs.append(out)
        return train_kmeans(cfg(out, "none" if len(runs) == 1 else "tensorboard"))
    stop = stop_and_resume(monkeypatch, 12, signal.SIGINT, fit, run_dir)  # epoch 2
    assert stop.checkpoint == str(checkpoint_path(run_dir, 12))
    assert torch.equal(load_file(f"{out}.safetensors")["centroids"], ref.centroids)
    assert not run_dir.exists()                                # the fit's checkpoint goes once the tokenizer is written

    def inertia(run):
        return [(e.step, e.value) for ea in events(run).values() if "train/inertia" in ea.Tags()["scalars"]
                for e in ea.Scalars("train/inertia")]
    ref_passes = inertia(tmp_path / "ref" / "kmeans_run")
    assert [s for s, _ in ref_passes] == [10, 20] and inertia(tmp_path / "run" / "kmeans_run") == ref_passes[1:]


def test_dvae_tokenizer_training_stops_at_the_step_and_resumes_exactly(assets, tmp_path, monkeypatch):
    from beit.tokenizers.fitting import DVAETrainConfig, train_dvae
    cfg = lambda out: DVAETrainConfig(train_shards=[assets["train"]], output_dir=str(out), vocab_size=16,  # noqa
                                      hidden=8, downsample=4, input_size=16, batch_size=16, steps=8, log_every=1,
                                      checkpoint_every=1000, num_workers=0, progress=False, lr=1e-3)
    train_dvae(cfg(tmp_path / "ref"))
    out = tmp_path / "run"
    stop_and_resume(monkeypatch, 5, signal.SIGUSR1, lambda: train_dvae(cfg(out)), out)
    rec = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d)]  # noqa: E731
    assert rec(out) == rec(tmp_path / "ref") and len(rec(out)) == 8
    assert same_weights(tmp_path / "ref" / "dvae.safetensors", out / "dvae.safetensors")


def test_a_second_signal_during_the_save_does_not_corrupt_it(assets, tmp_path, monkeypatch, capfd):
    """SIGTERM at step 4, then SIGINT and SIGUSR1 while that checkpoint is being written (between the weights and
    its COMPLETE marker): the save completes, the run stops at step 4, and the rerun resumes it to the uninterrupted
    run's end."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    cfg = dict(total_steps=7, checkpoint_every=1000, val_shards=[])
    run_pretrain(tiny_cfg(assets, ref, **cfg))
    real_manifest = checkpointing.file_manifest

    def manifest_under_fire(folder, *a, **kw):
        if folder.name == ".tmp_step_0000004":
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_manifest(folder, *a, **kw)
    monkeypatch.setattr(checkpointing, "file_manifest", manifest_under_fire)
    capfd.readouterr()
    stop = stop_and_resume(monkeypatch, 4, signal.SIGTERM, lambda: run_pretrain(tiny_cfg(assets, out, **cfg)), out)
    assert stop.step == 4
    err = capfd.readouterr().err  # the notes go straight to fd 2 (a handler may interrupt a print)
    assert "SIGINT again: already stopping" in err and "SIGUSR1 again: already stopping" in err
    assert step_losses(out) == step_losses(ref)
    assert same_weights(ref / "pretrained.safetensors", out / "pretrained.safetensors")


def test_data_loader_workers_ignore_the_stop_signals():
    """A Ctrl-C reaches the data workers too; they must outlive it while their process finishes the step."""
    code = ("import os, signal, time, torch\n"
            "from torch.utils.data import DataLoader, IterableDataset\n"
            "from beit.runtime.stopping import ignore_stop_signals\n"
            "class Slow(IterableDataset):\n"
            "    def __iter__(self):\n"
            "        for i in range(40):\n"
            "            if i == 2:\n"
            "                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):\n"
            "                    os.kill(os.getpid(), s)\n"
            "            time.sleep(0.01)\n"
            "            yield torch.tensor(i)\n"
            "print(sum(int(x) for x in DataLoader(Slow(), batch_size=None, num_workers=1, "
            "worker_init_fn=ignore_stop_signals)))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(sum(range(40))), r.stderr[-2000:]


# --- every other training command from its command line: the one line, status 75, the resume -------------------

def command_cases(digits, teacher, seg_shards, assets, root: Path) -> dict:  # noqa: F811
    """Per command: (argv after ``python -m beit.cli``, its config, the folder its checkpoints go to)."""
    from beit.tokenizers.fitting import DVAETrainConfig, KMeansTrainConfig
    kmeans_out = root / "kmeans" / "tok"
    return {
        "distill": (["distill"], distill_cfg(digits, teacher, root / "distill", epochs=2, batches_per_epoch=8,
                                             checkpoint_every=1000), root / "distill"),
        "segmentation": (["finetune"], seg_cfg(seg_shards, root / "seg", batches_per_epoch=8), root / "seg"),
        "tokenizer dvae": (["tokenizer", "train", "dvae"],
                           DVAETrainConfig(train_shards=[assets["train"]], output_dir=str(root / "dvae"),
                                           vocab_size=16, hidden=8, downsample=4, input_size=16, batch_size=16,
                                           steps=60, log_every=1, checkpoint_every=1000, num_workers=1,
                                           progress=False, lr=1e-3), root / "dvae"),
        "tokenizer kmeans": (["tokenizer", "train", "kmeans"],
                             KMeansTrainConfig(train_shards=[assets["train"].replace("000013", "000002")],
                                               out=str(kmeans_out), vocab_size=16, patch_size=4, input_size=32,
                                               epochs=4, batch_size=32, init_patches=2000, num_workers=1),
                             Path(f"{kmeans_out}.fit")),
    }


def started(folder: Path, err: Path) -> bool:
    """The command is inside its training loop: a step logged, or (k-means, which logs no steps) its bar shown."""
    if (folder / "metrics.jsonl").is_file() and any("loss" in r for r in read_metrics(folder)):
        return True
    return err.is_file() and "k-means epoch" in err.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("name, sig, group", [("distill", signal.SIGTERM, False),
                                              ("segmentation", signal.SIGUSR1, False),
                                              ("tokenizer dvae", signal.SIGINT, True),
                                              ("tokenizer kmeans", signal.SIGTERM, False)])
def test_every_training_command_stops_on_a_real_signal_with_one_line_and_status_75_and_resumes(
        name, sig, group, digits, teacher, seg_shards, assets, tmp_path):  # noqa: F811
    """``beit distill``, ``beit finetune`` (segmentation), ``beit tokenizer train dvae|kmeans`` as real processes:
    the signal once the training loop runs -> status 75, no traceback, the last line names the step and its
    verified checkpoint; the same command again resumes there and finishes (exactness: the in-process tests)."""
    from beit.config import save_config
    argv, cfg, folder = command_cases(digits, teacher, seg_shards, assets, tmp_path)[name]
    config = save_config(cfg, tmp_path / "config.yaml")
    cmd = [sys.executable, "-m", "beit.cli", *argv, "--config", str(config)]
    err_log = tmp_path / "stop.err"
    with open(tmp_path / "stop.out", "w") as out, open(err_log, "w") as err:
        p = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not started(folder, err_log):
            assert p.poll() is None, f"{name} ended before it was signalled: {err_log.read_text()[-3000:]}"
            assert time.time() < deadline, "no progress in 240 s"
            time.sleep(0.02)
        (os.killpg if group else os.kill)(p.pid, sig)
        p.wait(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    step = check_stop_line(p.returncode, err_log.read_text(), folder, sig)
    assert_stopped_at(folder, step)
    if (folder / "metrics.jsonl").is_file():
        assert max(step_losses(folder)) <= step                 # nothing trained after the stop's step
    rerun = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {checkpoint_path(folder, step)}" in rerun.stdout + rerun.stderr
    if (folder / "metrics.jsonl").is_file():
        steps = sorted(step_losses(folder))
        assert steps == list(range(steps[0], steps[-1] + 1))    # every step once: none lost, none repeated


def test_a_signal_the_process_was_started_with_ignored_stays_ignored():
    """A shell script's background job (``beit pretrain ... &``) starts with SIGINT ignored, so that a Ctrl-C meant
    for the script leaves it running: the stop handlers keep that (as Python does), the other signals still stop."""
    code = ("import os, signal\n"
            "from beit.runtime.stopping import stop_signals\n"
            "with stop_signals() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    assert not stop.requested\n"
            "    os.kill(os.getpid(), signal.SIGUSR1)\n"
            "    print(stop.name)\n"
            "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert r.returncode == 0 and r.stdout.split() == ["SIGUSR1", "True"], r.stderr[-2000:]
