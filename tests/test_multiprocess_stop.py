"""Stop signals across processes and launchers, with real processes and real signals:

* 2 ranks (torchrun, gloo): SIGUSR1 to rank 1 only, later a Ctrl-C (SIGINT to torchrun and both ranks): both ranks
  stop at the same step with one complete checkpoint, and the reruns lose no step of the uninterrupted run;
* launch/slurm_pretrain.sbatch under stand-in ``srun`` / ``scontrol`` (small scripts on PATH that run the task here
  and record the requeue): USR1 to the batch shell only, as ``--signal=B:USR1@300`` sends it -> the training stops
  with a checkpoint and the job requeues itself; the requeued job runs to the end and does not requeue. SIGTERM to
  every process of the job, as a preemption or ``scancel`` sends it -> the same checkpoint, but no requeue by the
  script (SLURM requeues a preempted job itself; a cancelled job must stay cancelled);
* ``beit compare --jobs 2`` stopped by a SIGTERM to its main process: the job processes stop their stages with
  checkpoints, one line, status 75, and the rerun continues from them.
"""
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mp.common import (
    PRETRAIN,
    REPO,
    alive,
    all_logs,
    descendants,
    env,
    kill_job,
    popen,
    pretrain_args,
    pretrain_reference,
    rank_logs,
    rank_pids,
    step_records,
)

from beit.checkpoints.checkpointing import checkpoint_path, list_complete
from beit.checkpoints.integrity import verify_checkpoint
from beit.runtime.stopping import EXIT_STOPPED

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("terminal_signals")]  # conftest.py


OUR_FRAME = re.compile(r'File "' + re.escape(str(REPO)) + r'/(?:beit|data|tokenizers)/')  # a frame of our code


def rank_stderr(log_dir: Path, rank: int) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob(f"**/attempt_*/{rank}/stderr.log")))


def logged_step(out: Path) -> int:
    try:
        return max(step_records(out), default=0)
    except (OSError, ValueError):
        return 0


def wait_for_step(p: subprocess.Popen, out: Path, step: int, what: str) -> None:
    deadline = time.time() + 300
    while logged_step(out) < step:
        assert p.poll() is None, f"{what} ended before step {step}"
        assert time.time() < deadline, f"{what}: no step {step} in 300 s"
        time.sleep(0.05)


def stop_step(out: Path, ranks: int) -> int:
    """The newest checkpoint: complete, verified, with every rank's part."""
    step, path = list_complete(out)[-1]
    assert verify_checkpoint(path) is None
    assert {f.name for f in path.glob("rank_*.json")} == {f"rank_{r}.json" for r in range(ranks)}
    return step


def assert_same_run(ref: Path, out: Path, steps: int) -> None:
    a, b = step_records(ref), step_records(out)
    assert sorted(b) == list(range(1, steps + 1))              # every step once: none lost, none repeated
    for s in a:  # the same 2 processes: the same sums in the same order, so the same losses to the last bit
        assert b[s]["loss"] == a[s]["loss"], f"step {s}: {b[s]['loss']!r} resumed, {a[s]['loss']!r} uninterrupted"
        assert b[s]["data/samples"] == a[s]["data/samples"]


def test_a_signal_to_one_rank_and_a_ctrl_c_to_all_stop_both_ranks_at_one_step_and_lose_nothing(tmp_path):
    ref, _, _ = pretrain_reference(2)
    out, logs = tmp_path / "run", tmp_path / "logs"
    args = pretrain_args(out, checkpoint_every=1000)           # only the stops and the last step save

    p = popen(PRETRAIN, args, 2, logs)                         # 1. SIGUSR1 to rank 1 alone
    try:
        wait_for_step(p, out, 5, "the first run")
        ranks = rank_pids(p.pid)
        os.kill(ranks[1], signal.SIGUSR1)
        p.wait(timeout=180)
    finally:
        if p.poll() is None:
            kill_job(p)
    first = stop_step(out, 2)
    assert 5 <= first < 48 and logged_step(out) == first, all_logs(logs)
    line = f"stopped at step {first} on SIGUSR1; the checkpoint is {checkpoint_path(out, first)}; rerun the same " \
           "command to resume"
    assert rank_stderr(logs, 0).strip().splitlines()[-1] == line  # rank 0 learned it from rank 1, and says it once
    assert line not in rank_logs(logs, 1) and "Traceback" not in rank_logs(logs, 0) + rank_logs(logs, 1)
    assert not any(alive(pid) for pid in ranks.values())

    logs2 = tmp_path / "logs2"                                 # 2. the rerun, then Ctrl-C: the whole process group
    p = popen(PRETRAIN, args, 2, logs2)
    try:
        wait_for_step(p, out, first + 4, "the rerun")
        os.killpg(p.pid, signal.SIGINT)
        p.wait(timeout=180)
    finally:
        if p.poll() is None:
            kill_job(p)
    second = stop_step(out, 2)
    assert first + 4 <= second < 48 and logged_step(out) == second, all_logs(logs2)
    assert f"resumed from {checkpoint_path(out, first)} at step {first}" in rank_logs(logs2, 0)
    assert rank_stderr(logs2, 0).strip().splitlines()[-1].startswith(f"stopped at step {second} on SIGINT; ")
    assert "Traceback" not in rank_logs(logs2, 0) + rank_logs(logs2, 1)

    logs3 = tmp_path / "logs3"                                 # 3. the same command to the end
    p = popen(PRETRAIN, args, 2, logs3)
    assert p.wait(timeout=300) == 0, all_logs(logs3)
    assert f"resumed from {checkpoint_path(out, second)} at step {second}" in rank_logs(logs3, 0)
    assert_same_run(ref, out, 48)
    print(f"stopped at {first} (SIGUSR1 to rank 1) and {second} (SIGINT to all); 48 steps, none lost")


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


SRUN = """#!/usr/bin/env bash
# stand-in for srun on one node: the command is the one task; the signals srun passes on, passed on
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
"$@" &
task=$!
trap 'kill -USR1 $task' USR1
trap 'kill -TERM $task' TERM
status=0
wait $task || status=$?
while kill -0 $task 2>/dev/null; do status=0; wait $task || status=$?; done
exit $status
"""
SCONTROL = """#!/usr/bin/env bash
# stand-in for scontrol: this host for `show hostnames`, every other call recorded
if [ "$1 $2" = "show hostnames" ]; then echo localhost; else echo "$*" >> "$SCONTROL_LOG"; fi
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_job(tmp_path: Path, out: Path):
    """``launch/slurm_pretrain.sbatch`` as a job of one node under the stand-ins: returns ``job(log)``, which starts
    the batch shell (in its own process group, as slurmd starts it) on ``pretrain_args(out)``, and the file that
    records the requeues."""
    stand_ins, venv = tmp_path / "bin", tmp_path / "venv" / "bin"
    stand_ins.mkdir()
    venv.mkdir(parents=True)
    executable(stand_ins / "srun", SRUN)
    executable(stand_ins / "scontrol", SCONTROL)
    executable(venv / "accelerate", f'#!/usr/bin/env bash\nexec {sys.executable} -m accelerate.commands.accelerate_cli '
                                    '"$@"\n')
    config = tmp_path / "accelerate.yaml"                      # one node, two CPU processes under torchrun
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmixed_precision: 'no'\n"
                      "num_machines: 1\nnum_processes: 2\nrdzv_backend: static\nsame_network: true\n"
                      "use_cpu: false\ndynamo_backend: 'NO'\n")
    requeues = tmp_path / "scontrol.log"
    job_env = dict(env(2), PATH=f"{stand_ins}:{os.environ['PATH']}", SCONTROL_LOG=str(requeues),
                   SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="node1",
                   GPUS_PER_NODE="2", VENV=str(venv.parent), ACCELERATE_CONFIG=str(config), STOP_GRACE_S="120")
    args = pretrain_args(out, checkpoint_every=1000)

    def job(log: Path) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen(["bash", "launch/slurm_pretrain.sbatch", *args], cwd=REPO,
                                    env=dict(job_env, MAIN_PORT=str(free_port())), stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    return job, requeues


def signal_job(p: subprocess.Popen, out: Path, step: int, sig, every_process: bool) -> str:
    """``sig`` to the batch shell once ``out`` has logged ``step`` (``every_process``: to every process of the job
    at once, as slurmd signals a job it preempts or cancels); the job's exit status and its log."""
    try:
        wait_for_step(p, out, step, "the job")
        for pid in [p.pid, *(descendants(p.pid) if every_process else [])]:
            os.kill(pid, sig)
        return p.wait(timeout=240)
    finally:
        if p.poll() is None:
            kill_job(p)


def test_the_slurm_script_stops_the_training_at_the_time_limit_warning_and_requeues_itself(tmp_path):
    ref, _, _ = pretrain_reference(2)
    out = tmp_path / "run"
    job, requeues = slurm_job(tmp_path, out)
    rc = signal_job(job(tmp_path / "job1.log"), out, 5, signal.SIGUSR1, every_process=False)  # the batch shell only
    text = (tmp_path / "job1.log").read_text()
    assert rc == 0, text[-4000:]
    step = stop_step(out, 2)
    assert 5 <= step < 48 and logged_step(out) == step, text[-4000:]
    assert f"stopped at step {step} on SIGUSR1; the checkpoint is {checkpoint_path(out, step)}" in text
    assert "requeueing job 4242" in text and "Traceback" not in text, text[-4000:]
    assert requeues.read_text() == "requeue 4242\n"

    p = job(tmp_path / "job2.log")                              # the requeued job: resumes and finishes
    assert p.wait(timeout=300) == 0, (tmp_path / "job2.log").read_text()[-4000:]
    assert f"resumed from {checkpoint_path(out, step)} at step {step}" in (tmp_path / "job2.log").read_text()
    assert requeues.read_text() == "requeue 4242\n"             # finished: not requeued again
    assert_same_run(ref, out, 48)


def test_the_slurm_script_stops_the_training_on_preemption_with_a_checkpoint_and_leaves_the_requeue_to_slurm(
        tmp_path):
    """Preemption and ``scancel``: SIGTERM to every process of the job (the batch shell, srun, the launcher, the
    ranks) -> the ranks stop at one step with a checkpoint, the script exits with the launcher's 143 and does NOT
    requeue: a SIGTERM cannot tell a preemption (which SLURM requeues itself, ``--requeue``) from a ``scancel``
    (which must end the job). The job SLURM starts again resumes at that step and ends like the uninterrupted run."""
    ref, _, _ = pretrain_reference(2)
    out = tmp_path / "run"
    job, requeues = slurm_job(tmp_path, out)
    rc = signal_job(job(tmp_path / "job1.log"), out, 5, signal.SIGTERM, every_process=True)
    text = (tmp_path / "job1.log").read_text()
    step = stop_step(out, 2)
    assert 5 <= step < 48 and logged_step(out) == step, text[-4000:]
    assert f"stopped at step {step} on SIGTERM; the checkpoint is {checkpoint_path(out, step)}" in text
    # no traceback from our code; torch's elastic launcher, TERMed with every process, may print its own
    # (a SignalException raised inside its logging of "Sending process ... closing signal"), as it does under SLURM
    assert rc == 128 + signal.SIGTERM and not OUR_FRAME.search(text), text[-4000:]
    assert "requeueing" not in text and not requeues.exists()   # the script requeued nothing

    p = job(tmp_path / "job2.log")                              # SLURM's requeue of the preempted job
    assert p.wait(timeout=300) == 0, (tmp_path / "job2.log").read_text()[-4000:]
    assert f"resumed from {checkpoint_path(out, step)} at step {step}" in (tmp_path / "job2.log").read_text()
    assert not requeues.exists()
    assert_same_run(ref, out, 48)


TINY = ["--label_fraction", "0.1", "--threads", "1", "--embed_dim", "32", "--depth", "1", "--num_heads", "2",
        "--methods", "beit", "--health_knn", "false", "--tokenizer_fit", "{epochs: 1, vocab_size: 16}",
        "--pretrain", "{total_steps: 40, log_every: 1, checkpoint_every: 1000}",
        "--finetune", "{epochs: 1, warmup_epochs: 0}"]


def stop_compare(digits: Path, tmp_path: Path, sig, group: bool) -> tuple[list[str], Path, list[Path], list[int]]:
    """``beit compare --seeds 0,1 --jobs 2`` signalled once both seeds' pretraining logged step 3: status 75, no
    traceback, one line naming where each seed stopped, a verified checkpoint there. Returns (command, output
    folder, the seeds' pretraining folders, their stop steps)."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "beit.cli", "compare", "--train_shards", str(digits / "train-*.tar"),
           "--test_shards", str(digits / "test-*.tar"), "--seeds", "0,1", "--jobs", "2",
           "--output_dir", str(out), *TINY]
    runs = [out / f"seed{s}" / "pretrain" for s in (0, 1)]
    p = subprocess.Popen(cmd, cwd=REPO, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + 400
        while min(logged_step(r) for r in runs) < 3:
            assert p.poll() is None and time.time() < deadline, p.stderr.read()[-3000:] if p.poll() else "no step 3"
            time.sleep(0.1)
        t0 = time.time()
        (os.killpg if group else os.kill)(p.pid, sig)
        _, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            kill_job(p)
    name = signal.Signals(sig).name
    print(f"{name} to {'the process group' if group else 'the main process'}: ended in {time.time() - t0:.1f} s")
    assert p.returncode == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err and "BrokenProcessPool" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    steps = [stop_step(r, 1) for r in runs]
    assert line.startswith(f"stopped on {name}: seed(s) none finished; ") and line.endswith(
        "every finished stage is kept: rerun the same command to resume"), line
    for seed, (r, s) in enumerate(zip(runs, steps)):
        assert f"seed {seed} stopped at step {s} on {name} ({checkpoint_path(r, s)})" in line
        assert logged_step(r) == s < 40
    return cmd, out, runs, steps


def test_compare_passes_a_stop_to_its_jobs_keeps_what_finished_and_the_rerun_continues(digits, tmp_path):
    """SIGTERM to the main process only (as Kubernetes sends it to PID 1): passed on to the job processes."""
    cmd, out, runs, steps = stop_compare(digits, tmp_path, signal.SIGTERM, group=False)
    tokenizer = out / "seed0" / "tokenizer" / "stage.json"
    assert "result" in json.loads(tokenizer.read_text())        # the finished stage is kept as it was
    before = tokenizer.stat().st_mtime_ns

    rerun = subprocess.run(cmd, cwd=REPO, env=env(1), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert tokenizer.stat().st_mtime_ns == before               # reused, not refitted
    for r, s in zip(runs, steps):
        assert f"resumed from {checkpoint_path(r, s)} at step {s}" in rerun.stdout
        assert sorted(step_records(r)) == list(range(1, 41))   # every step once
    assert json.loads((out / "compare.json").read_text())["rows"]["beit"]


def test_ctrl_c_on_compare_stops_its_jobs_at_their_next_step_without_a_broken_pool(digits, tmp_path):
    """Ctrl-C: SIGINT to the terminal's process group, the main process and both job processes (and their data
    workers) at once. Before: nothing for 13 s, then BrokenProcessPool once the workers were killed."""
    stop_compare(digits, tmp_path, signal.SIGINT, group=True)
