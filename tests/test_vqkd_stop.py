"""``beit tokenizer train vqkd`` on SIGTERM / SIGINT / SIGUSR1: the current optimizer step finishes, a verified
checkpoint of that step is written (with the open logging window), one line, exit status 75; the same command
resumes there and ends exactly like the uninterrupted run (every logged number, the held-out evaluations, the
tokenizer). Real signals: sent by the run to itself at an exact step, to a real process (Ctrl-C to its process
group, data workers included), and to one rank of two (torchrun, gloo)."""
import json
import os
import random
import signal
import subprocess

import pytest
import torch
from test_stop_signals import interrupt_and_rerun, stop_and_resume
from test_vqkd_train import photos  # noqa: F401  (the module fixture)
from vqkd_testutil import REPO, command, env, run_process, run_vqkd, tiny_vqkd

from beit.checkpoints.checkpointing import checkpoint_path
from beit.runtime.run_logging import read_metrics
from beit.tokenizers import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread", "terminal_signals")  # conftest.py
TIMING = {"time", "samples_per_s", "data_wait_fraction"}


def records(out) -> list[dict]:
    """Every logged record (training windows and held-out evaluations) without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out)]


def assert_same_run(ref, out) -> None:
    """The stopped-and-resumed run logged and wrote what the uninterrupted one did."""
    a, b = records(ref), records(out)
    assert [r["step"] for r in b] == [r["step"] for r in a] and b == a
    fa, fb = (json.loads((d / "final_metrics.json").read_text()) for d in (ref, out))
    skip = {"train_seconds", "output_dir", "tokenizer"}
    assert {k: v for k, v in fb.items() if k not in skip} == {k: v for k, v in fa.items() if k not in skip}
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_tokenizer("vqkd", ref).tokenize(x), load_tokenizer("vqkd", out).tokenize(x))


# 3 logged steps per window and 5 batches per epoch: a stop inside a window, across epochs, beside the evaluations
RUN = dict(total_steps=12, batches_per_epoch=5, log_every=3, eval_every=4, checkpoint_every=1000, keep_last=10)


@pytest.mark.parametrize("sig, step", [(signal.SIGTERM, 7), (signal.SIGUSR1, 5)],
                         ids=["mid-window", "an epoch's last step"])
def test_vqkd_stops_at_the_step_and_resumes_exactly(photos, tmp_path, monkeypatch, sig, step):  # noqa: F811
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_vqkd(tiny_vqkd(photos, photos["teacher"], ref, **RUN))
    stop_and_resume(monkeypatch, step, sig, lambda: run_vqkd(tiny_vqkd(photos, photos["teacher"], out, **RUN)), out)
    assert_same_run(ref, out)


def test_ctrl_c_to_the_vqkd_command_checkpoints_the_step_and_the_rerun_ends_like_the_uninterrupted_run(
        photos, tmp_path):  # noqa: F811
    """``beit tokenizer train vqkd`` as a real process with a data worker; Ctrl-C (SIGINT to its process group) at a
    random step: one line, status 75, a verified checkpoint at the step it stopped; the rerun resumes there."""
    from beit.config import save_config
    from beit.tokenizers.vqkd_train import VQKDTrainConfig

    def config(out):
        cfg = tiny_vqkd(photos, photos["teacher"], out, **dict(RUN, total_steps=20, num_workers=1, log_every=1))
        return save_config(VQKDTrainConfig(**cfg), out.with_suffix(".yaml"))
    ref, out, stopped = interrupt_and_rerun("beit.cli tokenizer train vqkd", config, tmp_path,
                                            random.Random(22).randint(3, 10), signal.SIGINT, group=True)
    assert stopped < 20
    assert_same_run(ref, out)


@pytest.mark.slow
def test_a_signal_to_one_of_two_ranks_stops_both_at_one_step_and_the_rerun_loses_nothing(photos, tmp_path):  # noqa
    """torchrun, 2 processes (gloo): SIGUSR1 to rank 1 alone -> both ranks stop at the same step with one complete
    checkpoint holding both ranks' parts; rank 0 says so once; the rerun on 2 processes ends like the uninterrupted
    2-process run, to the last bit."""
    from mp.common import kill_job, rank_logs, rank_pids
    from test_multiprocess_stop import logged_step, rank_stderr, stop_step, wait_for_step

    from beit.runtime.stopping import EXIT_STOPPED
    cfg = lambda out: tiny_vqkd(photos, photos["teacher"], out, **dict(RUN, total_steps=16), data_order="global",  # noqa
                                batch_size=8, global_batch_size=16)
    ref, out, logs = tmp_path / "ref", tmp_path / "run", tmp_path / "logs"
    run_process(cfg(ref), nproc=2)
    with open(tmp_path / "launcher.log", "w") as log:
        p = subprocess.Popen(command(cfg(out), 2, logs), cwd=REPO, env=env(2), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait_for_step(p, out, 4, "the run")
        os.kill(rank_pids(p.pid)[1], signal.SIGUSR1)
        p.wait(timeout=240)
    finally:
        if p.poll() is None:
            kill_job(p)
    stopped = stop_step(out, 2)                                        # complete, verified, both ranks' parts
    assert 4 <= stopped < 16 and logged_step(out) <= stopped           # nothing trained after the stop's step
    line = f"stopped at step {stopped} on SIGUSR1; the checkpoint is {checkpoint_path(out, stopped)}; rerun the same " \
           "command to resume"
    assert rank_stderr(logs, 0).strip().splitlines()[-1] == line      # rank 0 learned it from rank 1, and says it
    assert line not in rank_logs(logs, 1) and "Traceback" not in rank_logs(logs, 0) + rank_logs(logs, 1)
    assert f"exitcode  : {EXIT_STOPPED}" in (tmp_path / "launcher.log").read_text()  # torchrun's summary: the 75s
    resumed = run_process(cfg(out), nproc=2)
    assert f"resumed from {checkpoint_path(out, stopped)} at step {stopped}" in resumed
    assert_same_run(ref, out)
