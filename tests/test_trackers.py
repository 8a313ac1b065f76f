"""--report_to: one option section for every training command; a tracker that cannot work stops the run at start-up
(before any compute) with a message; W&B (the real client, offline) gets what TensorBoard gets, read back from the
run files it wrote: the scalars, the training pictures, the config, the final metrics, and the run's files and the
report of ``beit viz`` as artifacts."""
from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_pretrain import assets, run, tiny_cfg  # noqa: F401  (assets is a fixture)
from tracker_testutil import free_port, wandb_env, wandb_runs

from beit.cli import main as beit
from beit.config import ConfigError, from_dict, parse_config
from beit.runtime.run_logging import read_metrics

TRAIN_ARGS = ["--train_shards", "/nonexistent/train-000000.tar"]
# every training command, as a user types it (the data is never reached: the trackers are checked first)
COMMANDS = {
    "pretrain": ["pretrain", *TRAIN_ARGS, "--tokenizer", "kmeans", "--tokenizer_path", "/nonexistent/tok"],
    "finetune": ["finetune", *TRAIN_ARGS],
    "distill": ["distill", *TRAIN_ARGS, "--teacher", "TEACHER", "--model", "mobilevit_xxs", "--mixup", "0",
                "--cutmix", "0"],
    "kmeans": ["tokenizer", "train", "kmeans", *TRAIN_ARGS],
    "dvae": ["tokenizer", "train", "dvae", *TRAIN_ARGS],
    "vqkd": ["tokenizer", "train", "vqkd", *TRAIN_ARGS, "--teacher", "timm", "--teacher_path", "TEACHER"],
    "compare": ["compare", "--train_shards", "/nonexistent/train-*.tar", "--test_shards", "/nonexistent/test-*.tar"],
}


def config_classes():
    from beit.compare.options import CompareConfig
    from beit.options.finetune import FinetuneConfig
    from beit.options.pretrain import PretrainConfig
    from beit.tokenizers.fitting import DVAETrainConfig, KMeansTrainConfig
    from beit.tokenizers.vqkd_train import VQKDTrainConfig
    return PretrainConfig, FinetuneConfig, DVAETrainConfig, KMeansTrainConfig, VQKDTrainConfig, CompareConfig


def test_report_to_is_one_option_section_everywhere():
    from beit.options.common import RunOptions, TrackerOptions
    assert issubclass(RunOptions, TrackerOptions)  # every run command's config (and vqkd's) has it
    for cls in config_classes():
        assert issubclass(cls, TrackerOptions), cls
        assert from_dict(cls, {"report_to": "wandb, mlflow", "run_name": "x"}).trackers() == ["wandb", "mlflow"]
        assert from_dict(cls, {"report_to": ["tensorboard", "wandb"]}).report_to == ["tensorboard", "wandb"]
        assert from_dict(cls, {"report_to": "none"}).trackers() == []
        with pytest.raises(ValueError, match=r"'wandbb' is not one of tensorboard, wandb, mlflow or none \(did you "
                                             r"mean 'wandb'\?\)"):
            from_dict(cls, {"report_to": "wandbb"}).trackers()
    from beit.compare.options import CompareConfig
    from beit.options.pretrain import PretrainConfig
    assert PretrainConfig().report_to == ["tensorboard"] and CompareConfig().report_to == []  # compare: opt in


def test_the_old_tensorboard_switch_still_works_with_a_warning(tmp_path, capsys):
    from beit.options.finetune import FinetuneConfig
    from beit.options.pretrain import PretrainConfig
    base = ["--train_shards", "x"]
    assert parse_config(FinetuneConfig, base + ["--tensorboard", "false"]).report_to == []
    assert "option tensorboard is deprecated, use --report_to" in capsys.readouterr().err
    assert parse_config(FinetuneConfig, base + ["--no-tensorboard", "--report_to", "wandb"]).report_to == ["wandb"]
    assert parse_config(FinetuneConfig, base + ["--tensorboard", "--report_to", "mlflow"]).report_to == \
        ["tensorboard", "mlflow"]
    assert PretrainConfig(tensorboard=False).report_to == [] and PretrainConfig(tensorboard=True).tensorboard is None
    old = tmp_path / "config.yaml"  # a run folder's config.yaml from before --report_to
    old.write_text(yaml.safe_dump({"train_shards": ["x"], "tensorboard": False, "lr": 1e-3}))
    assert parse_config(PretrainConfig, ["--config", str(old)]).report_to == []
    with pytest.raises(ConfigError, match="expected true/false"):
        from_dict(PretrainConfig, {"tensorboard": "maybe"})


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_missing_package_stops_every_command_at_start_up(command, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, as without the package
    out = tmp_path / "run"
    (tmp_path / "teacher.safetensors").write_bytes(b"")  # distill checks that its teacher file exists
    argv = [a.replace("TEACHER", str(tmp_path / "teacher.safetensors")) for a in COMMANDS[command]]
    argv += ["--report_to", "tensorboard,wandb"]
    argv += ["--out", str(out / "tok")] if command == "kmeans" else ["--output_dir", str(out)]
    assert beit(argv) == 2
    err = capsys.readouterr().err
    assert "--report_to wandb: the wandb package is not installed" in err, err
    assert "pip install 'beit-pipeline[wandb]'" in err and "Traceback" not in err
    assert not out.exists() or not any(out.rglob("*")), "nothing may be written before the trackers are checked"


def test_missing_tensorboard_stops_at_start_up(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert beit(COMMANDS["pretrain"] + ["--output_dir", str(tmp_path / "run")]) == 2  # the default --report_to
    assert "--report_to tensorboard: the tensorboard package is not installed" in capsys.readouterr().err
    assert beit(COMMANDS["pretrain"] + ["--output_dir", str(tmp_path / "run"), "--report_to", "none"]) == 2
    assert "tensorboard" not in capsys.readouterr().err  # without trackers it goes on to the (missing) data


def test_unreachable_servers_stop_at_start_up(monkeypatch, tmp_path, capsys):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", closed)
    t0 = time.time()
    assert beit(COMMANDS["finetune"] + ["--output_dir", str(tmp_path / "a"), "--report_to", "wandb"]) == 2
    err = capsys.readouterr().err
    assert f"--report_to wandb: cannot reach the W&B server at {closed}" in err and "WANDB_MODE=offline" in err, err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    assert beit(COMMANDS["dvae"] + ["--output_dir", str(tmp_path / "b"), "--report_to", "mlflow"]) == 2
    err = capsys.readouterr().err
    assert f"--report_to mlflow: cannot use the MLflow tracking server at {closed}" in err, err
    assert "MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    assert time.time() - t0 < 60, "an unreachable server must be found out at once, not after retries"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_wandb_without_an_api_key_stops_at_start_up(monkeypatch, tmp_path, capsys):
    """A W&B server that answers (a real HTTP server on 127.0.0.1) but no API key anywhere: the message says how to
    log in, at start-up, instead of W&B's traceback when the tracker starts after the model is built."""
    from http_testutil import ShardServer

    for var in ("WANDB_API_KEY", "NETRC", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_MODE", "online")
    with ShardServer(tmp_path) as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url.rstrip("/"))
        assert beit(COMMANDS["finetune"] + ["--output_dir", str(tmp_path / "a"), "--report_to", "wandb"]) == 2
        assert server.requests, "the server was asked (it answers: the check goes on to the key)"
        err = capsys.readouterr().err
        assert "--report_to wandb: No API key configured" in err and "run `wandb login` or set WANDB_API_KEY" in err
        assert "Traceback" not in err and not (tmp_path / "a").exists()
        monkeypatch.setenv("WANDB_API_KEY", "short")
        assert beit(COMMANDS["finetune"] + ["--output_dir", str(tmp_path / "a"), "--report_to", "wandb"]) == 2
        assert "--report_to wandb: WANDB_API_KEY invalid" in capsys.readouterr().err
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a key (not checked with the server): the command goes on
        assert beit(COMMANDS["finetune"] + ["--output_dir", str(tmp_path / "b"), "--report_to", "wandb"]) == 2
        err = capsys.readouterr().err
        assert "--report_to wandb" not in err and "/nonexistent/train-000000.tar" in err, err  # the missing shards


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def check_artifact(artifact, run_dir: Path, expected: set[str]) -> None:
    """The artifact holds exactly ``expected`` (paths in the run folder), each with the bytes of the run's file."""
    files = {c.path: c for c in artifact.manifest.contents}
    assert set(files) == expected, sorted(files)
    for rel, entry in files.items():
        assert entry.digest == md5_b64(run_dir / rel), rel
        assert Path(entry.local_path).read_bytes() == (run_dir / rel).read_bytes(), rel


@pytest.mark.slow
def test_wandb_offline_gets_what_tensorboard_gets(assets, tmp_path, monkeypatch):  # noqa: F811
    from beit.viz.main import main as viz

    wandb_env(monkeypatch, tmp_path / "wandb_home")
    out = tmp_path / "pre"
    run(tiny_cfg(assets, out, total_steps=4, checkpoint_every=4, log_images_every=2, eval_batches=1,
                 report_to="tensorboard,wandb", run_name="tiny/pretrain"))
    assert list((out / "tensorboard").rglob("events.out.tfevents*")), "TensorBoard is still written beside"
    (wb,) = wandb_runs(out)
    assert wb.name == "tiny/pretrain" and wb.project == "beit"
    assert json.loads((out / "trackers.json").read_text())["wandb"]["id"] == wb.id
    # the config: every option
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert wb.config["lr"] == saved["lr"] == 2e-3 and wb.config["total_steps"] == 4
    assert json.loads(wb.config["report_to"]) == ["tensorboard", "wandb"]
    assert set(saved) <= set(wb.config)
    # the scalars, step by step, equal to metrics.jsonl (same tags as TensorBoard)
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert wb.series("train/loss") == pytest.approx({r["step"]: r["loss"] for r in recs}, abs=1e-9)
    assert wb.series("train/mim_acc") == pytest.approx({r["step"]: r["mim_acc"] for r in recs}, abs=1e-9)
    assert set(wb.series("data/samples")) == {1, 2, 3, 4} and 4 in wb.series("val/mim_acc")
    # the training pictures, at the steps TensorBoard got them, as PNG files of the run
    for tag in ("pictures/masks", "pictures/tokens", "pictures/reconstruction"):
        pics = wb.series(tag)
        assert sorted(pics) == [2, 4], tag
        png = wb.dir / "files" / pics[4]["path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pics[4]["width"] == 4 * (32 + 2)
    # the final metrics
    final = json.loads((out / "final_metrics.json").read_text())
    assert wb.summary["final/val/mim_acc"] == pytest.approx(final["val/mim_acc"])
    assert wb.summary["final/step"] == 4 and wb.summary["final/train/loss"] == pytest.approx(final["train/loss"])
    # the run's files as an artifact, byte for byte
    (art,) = wb.artifacts
    assert art.type == "run-files" and art.run_id == wb.id
    check_artifact(art, out, {"config.yaml", "final_metrics.json"})

    # the report drawn afterwards goes to the same W&B run
    assert viz([str(out), "--device", "cpu", "--num_images", "2"]) == 0
    first, again = wandb_runs(out)
    assert again.id == wb.id
    (report,) = again.artifacts
    pictures = {f"viz/{p.name}" for p in (out / "viz").glob("*.png")}
    assert {"viz/masks.png", "viz/tokens.png", "viz/curves.png"} <= pictures
    check_artifact(report, out, {"index.html", *pictures})


def test_a_resumed_run_goes_on_in_the_same_tracker_runs(tmp_path, monkeypatch):
    """trackers.json names the W&B run; a resume passes its id, a fresh run in the folder starts a new one."""
    from beit.runtime.trackers import RunTrackers

    wandb_env(monkeypatch, tmp_path / "wandb_home")
    first = RunTrackers(["wandb"], tmp_path / "run", "a/b")
    first.start({"lr": 0.1})
    first.log({"train/loss": 2.0}, step=1)
    first.finish({"loss": 2.0}, step=1)
    saved = json.loads((tmp_path / "run" / "trackers.json").read_text())
    again = RunTrackers(["wandb"], tmp_path / "run", "a/b")
    again.start({"lr": 0.1}, resume=True)
    again.log({"train/loss": 1.0}, step=2)
    again.finish()
    fresh = RunTrackers(["wandb"], tmp_path / "run", "a/b")
    fresh.start({"lr": 0.1}, resume=False)
    fresh.finish()
    runs = wandb_runs(tmp_path / "run")
    assert [r.id for r in runs[:2]] == [saved["wandb"]["id"]] * 2 and runs[2].id != saved["wandb"]["id"]
    assert runs[0].series("train/loss") == {1: 2.0} and runs[1].series("train/loss") == {2: 1.0}
    assert runs[0].summary["final/loss"] == 2.0 and runs[0].config["lr"] == 0.1


def test_a_report_drawn_later_goes_to_the_saved_project_and_run(tmp_path, monkeypatch):
    """attach_report (what beit viz calls) reopens the W&B run of trackers.json in the project it was logged to,
    whatever WANDB_PROJECT says in the shell that draws the report."""
    from beit.runtime.trackers import RunTrackers, attach_report

    wandb_env(monkeypatch, tmp_path / "wandb_home")
    monkeypatch.setenv("WANDB_PROJECT", "first-project")
    first = RunTrackers(["wandb"], tmp_path / "run", "a/b")
    first.start({"lr": 0.1})
    first.finish({"loss": 2.0}, step=1)
    report = tmp_path / "run" / "index.html"
    report.write_text("<html>report</html>")
    monkeypatch.setenv("WANDB_PROJECT", "another-project")
    assert attach_report(tmp_path / "run", {"index.html": report}) == ["wandb"]
    logged, attached = wandb_runs(tmp_path / "run")
    assert attached.id == logged.id and attached.project == logged.project == "first-project"
    (art,) = attached.artifacts
    check_artifact(art, tmp_path / "run", {"index.html"})
    assert attach_report(tmp_path / "elsewhere", {"index.html": report}) == []  # no trackers.json: nothing to do


def test_every_tracker_extra_is_declared_and_installed_by_ci():
    """pyproject has the extra each kind's message names; the dev extra (what launch/install.sh installs for
    launch/test.sh) holds every kind's package, the full mlflow for the tests' `mlflow server`."""
    import re

    from beit.runtime.trackers import KINDS

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(reqs):
        return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs}
    for kind in KINDS.values():
        if kind.extra:
            assert kind.extra in extras, kind.name
            assert names(extras[kind.extra]) & {kind.package, f"{kind.package}-skinny"}, extras[kind.extra]
            assert kind.package in names(extras["dev"]), f"the dev extra lacks {kind.package}"
    assert "mlflow-skinny" in names(extras["mlflow"])  # the client alone: logging to a server needs no pandas
    assert re.search(r"pip install .*-e \"\.\[dev\]\"", (root / "launch" / "install.sh").read_text())
    assert "launch/install.sh" in (root / "launch" / "test.sh").read_text()
