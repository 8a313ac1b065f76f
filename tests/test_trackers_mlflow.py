"""--report_to mlflow against a real ``mlflow server`` on 127.0.0.1 (sqlite store, local artifacts), queried with
``MlflowClient``: fine-tuning, pretraining (pictures, resume), the tokenizer trainers and beit compare's stages send
their metrics, params, final metrics and files; two processes log from rank 0 only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_finetune_run import cfg as finetune_cfg
from test_pretrain import assets, run, tiny_cfg  # noqa: F401  (assets is a fixture)
from tracker_testutil import MlflowServer, wandb_env, wandb_runs

from beit.runtime.run_logging import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield srv
    srv.stop()


@pytest.fixture
def mlflow_run(server, monkeypatch, request):
    """Points the client at the server, with an experiment of this test's own; returns a function that finds the
    experiment's runs."""
    from mlflow import MlflowClient

    experiment = request.node.name.replace("[", "-").replace("]", "")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    client = MlflowClient(server.uri)

    def runs():
        exp = client.get_experiment_by_name(experiment)
        return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time"])
    return client, runs


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def same_bytes(client, run_id: str, run_dir: Path, rel: str, tmp: Path) -> bool:
    local = client.download_artifacts(run_id, rel, str(tmp))
    return Path(local).read_bytes() == (run_dir / rel).read_bytes()


def test_finetune_metrics_params_final_and_files(digits, mlflow_run, tmp_path):
    from beit.finetune import run_finetune

    client, runs = mlflow_run
    out = tmp_path / "ft"
    run_finetune(finetune_cfg(digits, out, report_to="mlflow", run_name="digits/finetune", mixup=0.0, cutmix=0.0))
    (r,) = runs()
    assert r.info.run_name == "digits/finetune" and r.info.status == "FINISHED"
    assert json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"] == r.info.run_id
    # params: the whole config
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert r.data.params["lr"] == str(saved["lr"]) and r.data.params["epochs"] == "2"
    assert r.data.params["num_classes"] == "10" and json.loads(r.data.params["report_to"]) == ["mlflow"]
    assert set(saved) <= set(r.data.params)
    # metrics: every logged step, the values of metrics.jsonl
    recs = read_metrics(out)
    loss = history(client, r.info.run_id, "train/loss")
    assert [s for s, _ in loss] == [x["step"] for x in recs if "loss" in x]  # each step once
    assert dict(loss) == pytest.approx({x["step"]: x["loss"] for x in recs if "loss" in x})
    assert [s for s, _ in history(client, r.info.run_id, "val/top1")] == [3, 6]
    # the final metrics
    final = json.loads((out / "final.json").read_text())
    assert r.data.metrics["final/top1"] == pytest.approx(final["top1"])
    assert r.data.metrics["final/train_loss"] == pytest.approx(final["train_loss"])
    # the run's files
    files = artifacts(client, r.info.run_id)
    assert files == {"config.yaml", "final.json", "confusion.json", "confusion_matrix.png"}
    assert all(same_bytes(client, r.info.run_id, out, f, tmp_path / "dl") for f in files)


def test_pretraining_pictures_a_resumed_run_and_the_report(assets, mlflow_run, tmp_path, monkeypatch):  # noqa: F811
    import shutil

    client, runs = mlflow_run
    out = tmp_path / "pre"
    args = tiny_cfg(assets, out, total_steps=4, checkpoint_every=2, log_images_every=2, eval_batches=1,
                    report_to="mlflow")
    run(args)
    (r,) = runs()
    steps = [s for s, _ in history(client, r.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]
    pictures = artifacts(client, r.info.run_id, "images")
    for tag in ("masks", "tokens", "reconstruction"):  # mlflow.log_image(key=..., step=...): images/<key>+step+N
        assert {s for s in (2, 4) if any(f"pictures~{tag}+step+{s}+" in p and p.endswith(".png") for p in pictures)
                } == {2, 4}, tag
    assert r.data.metrics["final/val/mim_acc"] == pytest.approx(
        json.loads((out / "final_metrics.json").read_text())["val/mim_acc"])
    # killed after the step-2 checkpoint: the rerun resumes there and goes on in the same MLflow run
    shutil.rmtree(out / "checkpoints" / "step_0000004")
    run(args)
    (again,) = runs()
    assert again.info.run_id == r.info.run_id and again.info.status == "FINISHED"
    assert [s for s, _ in history(client, r.info.run_id, "train/loss")] == [1, 2, 3, 3, 4, 4]
    # the report drawn afterwards (in a shell without MLFLOW_TRACKING_URI) goes to the run's own server and run
    from beit.viz.main import main as viz
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert viz([str(out), "--device", "cpu", "--num_images", "2"]) == 0
    assert len(runs()) == 1
    files = artifacts(client, r.info.run_id)
    pictures = {f"viz/{p.name}" for p in (out / "viz").glob("*.png")}
    assert {"index.html", "viz/masks.png", "viz/curves.png"} <= files and pictures <= files
    assert same_bytes(client, r.info.run_id, out, "index.html", tmp_path / "dl")


def test_tokenizer_training_reports_to_mlflow(assets, mlflow_run, tmp_path):  # noqa: F811
    from beit.tokenizers.fitting import DVAETrainConfig, KMeansTrainConfig, train_dvae, train_kmeans

    client, runs = mlflow_run
    train_kmeans(KMeansTrainConfig(train_shards=[assets["train"]], val_shards=[assets["val"]],
                                   out=str(tmp_path / "tok" / "kmeans"), vocab_size=16, input_size=32, patch_size=8,
                                   epochs=2, batch_size=64, init_patches=500, num_workers=0, report_to="mlflow"))
    train_dvae(DVAETrainConfig(train_shards=[assets["train"]], output_dir=str(tmp_path / "dvae"), vocab_size=16,
                               hidden=8, downsample=4, input_size=16, batch_size=8, steps=4, checkpoint_every=4,
                               log_every=2, anneal_steps=4, kl_warmup_steps=2, num_workers=0, progress=False,
                               report_to="mlflow", run_name="tok/dvae"))
    kmeans, dvae = runs()
    assert kmeans.info.run_name.endswith("tok/kmeans") and dvae.info.run_name == "tok/dvae"
    inertia = history(client, kmeans.info.run_id, "train/inertia")
    assert len(inertia) == 2 and inertia[0][1] >= inertia[1][1] > 0  # one point per pass, decreasing
    assert kmeans.data.params["vocab_size"] == "16" and "final/val/perplexity" in kmeans.data.metrics
    assert artifacts(client, kmeans.info.run_id) == {"kmeans.json"}
    assert [s for s, _ in history(client, dvae.info.run_id, "train/mse")] == [2, 4]
    assert dvae.data.params["steps"] == "4" and dvae.data.metrics["final/step"] == 4
    assert artifacts(client, dvae.info.run_id) == {"config.yaml", "dvae.json"}


def test_compare_stages_report_under_their_names_and_rerun_nothing(digits, mlflow_run, tmp_path):
    from test_finetune_run import FAST, TINY_CFG

    from beit.compare import stages

    client, runs = mlflow_run
    model = {k: TINY_CFG[k] for k in ("image_size", "patch_size", "embed_dim", "depth", "num_heads")}
    recipe = {**FAST, "epochs": 1, "mixup": 0.0, "cutmix": 0.0}
    recipe.pop("report_to")
    tracking = {"report_to": ["mlflow"], "run_name": "cmp", "root": str(tmp_path)}
    args = (str(digits / "train-*.tar"), str(digits / "test-*.tar"), tmp_path / "seed0" / "finetune_scratch", 0,
            model, recipe)
    first = stages.finetune(*args, tracking=tracking)
    (r,) = runs()
    assert r.info.run_name == "cmp/seed0/finetune_scratch" and r.data.metrics["final/top1"] == first["top1"]
    assert stages.finetune(*args, tracking={**tracking, "report_to": []}) == first  # reused: trackers are no input
    assert len(runs()) == 1


def test_two_processes_log_from_rank_0_only(mlflow_run, tmp_path, monkeypatch):
    from mp.common import PRETRAIN, metrics, pretrain_args, rank_logs
    from mp.common import run as mp_run

    client, runs = mlflow_run
    wandb_env(monkeypatch, tmp_path / "wandb_home")
    out, logs = tmp_path / "run", tmp_path / "logs"
    mp_run(PRETRAIN, pretrain_args(out, total_steps=8, checkpoint_every=8, log_images_every=4,
                                   report_to="tensorboard,wandb,mlflow", run_name="mp/pretrain"), 2, logs)
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, 9))
    (r,) = runs()  # one MLflow run, each step once
    assert r.info.run_name == "mp/pretrain"
    assert [s for s, _ in history(client, r.info.run_id, "train/loss")] == steps
    (wb,) = wandb_runs(out)  # one W&B run, each step once
    assert sorted(wb.series("train/loss")) == steps and sorted(wb.series("pictures/masks")) == [4, 8]
    events = [p for p in (out / "tensorboard").glob("events.out.tfevents*")]
    assert len(events) == 1, events  # one TensorBoard writer
    assert "wandb" not in rank_logs(logs, 1).lower()


def test_without_a_server_mlflow_logs_to_its_local_store(tmp_path, monkeypatch):
    """No MLFLOW_TRACKING_URI: the start-up check passes and the run goes to MLflow's own default store in the working
    directory (``mlflow ui`` there shows it), read back with MlflowClient."""
    import mlflow
    from mlflow import MlflowClient

    from beit.runtime.trackers import RunTrackers, check_trackers

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "local")
    check_trackers(["mlflow"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "final.json").write_text('{"top1": 0.5}')
    trackers = RunTrackers(["mlflow"], run_dir, "local/run")
    trackers.start({"lr": 0.1})
    trackers.log({"train/loss": 1.5}, step=1)
    trackers.finish({"top1": 0.5}, step=1, files={"final.json": run_dir / "final.json"})
    saved = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert str(tmp_path) in saved["tracking_uri"] == mlflow.get_tracking_uri()
    client = MlflowClient(saved["tracking_uri"])
    r = client.get_run(saved["run_id"])
    assert r.info.run_name == "local/run" and r.data.params["lr"] == "0.1"
    assert history(client, r.info.run_id, "train/loss") == [(1, 1.5)] and r.data.metrics["final/top1"] == 0.5
    assert artifacts(client, r.info.run_id) == {"final.json"}
    assert same_bytes(client, r.info.run_id, run_dir, "final.json", tmp_path / "dl")


def test_vqkd_training_reports_to_mlflow(assets, mlflow_run, tmp_path):  # noqa: F811
    from vqkd_testutil import run_vqkd, timm_teacher, tiny_vqkd

    client, runs = mlflow_run
    out = tmp_path / "vqkd"
    summary = run_vqkd(tiny_vqkd(assets, timm_teacher(tmp_path / "teacher"), out, report_to="mlflow",
                                 run_name="tok/vqkd"))
    (r,) = runs()
    assert r.info.run_name == "tok/vqkd" and r.info.status == "FINISHED"
    assert r.data.params["vocab_size"] == "64" and r.data.params["teacher"] == "timm"
    recs = [x for x in read_metrics(out) if "rec_loss" in x]
    loss = history(client, r.info.run_id, "train/rec_loss")
    assert [s for s, _ in loss] == [x["step"] for x in recs] == list(range(1, 7))
    assert dict(loss) == pytest.approx({x["step"]: x["rec_loss"] for x in recs})
    assert [s for s, _ in history(client, r.info.run_id, "val/codebook_usage")] == [3, 6]
    assert r.data.metrics["final/val/codebook_usage"] == pytest.approx(summary["val/codebook_usage"])
    files = artifacts(client, r.info.run_id)
    assert files == {"config.yaml", "final_metrics.json", "vqkd.json", "vqkd_unilm.json"}, files
    assert all(same_bytes(client, r.info.run_id, out, f, tmp_path / "dl") for f in files)
