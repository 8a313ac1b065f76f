"""`beit bench --smoke`: every section runs and prints one JSON object of the documented structure
(speeds are not checked: they are figures, measured by the command itself)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _positive(x):
    return isinstance(x, (int, float)) and x > 0


@pytest.fixture(scope="module")
def smoke():
    # through the console entry point's module, from the repository root (where our tokenizers/ folder
    # must not shadow Hugging Face's tokenizers package that transformers imports)
    cmd = [sys.executable, "-m", "beit.bench", "--smoke", "--threads", "1",
           "--sections", "train_step", "tokenizer", "masking", "data", "memory", "onnx"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)  # stdout is exactly one JSON object


def test_machine_block(smoke):
    m = smoke["machine"]
    assert m["torch_threads"] == 1 and m["device"] == "cpu"
    assert m["cpu_capability"]["torch"] == torch.backends.cpu.get_cpu_capability()
    assert set(m["cpu_capability"]) >= {"avx2", "avx512", "avx512_bf16", "amx", "fast_bf16"}
    assert m["versions"]["torch"] and m["versions"]["transformers"]
    assert len(m["load_average"]) == 3 and smoke["smoke"] is True


def test_train_step_beside_transformers(smoke):
    ts = smoke["train_step"]
    assert _positive(ts["fp32"]["matmul_peak_tflops"])
    row = ts["fp32"]["tiny"]
    assert row["attn_implementation_peer"]
    for side in ("ours", "transformers"):
        assert _positive(row[side]["img_per_s"]) and _positive(row[side]["gflop_per_img"])
        assert _positive(row[side]["mfu"]) and len(row[side]["step_s_rounds"]) == 1
    # the peer's head scores every patch, ours only the masked ones: fewer FLOPs per image
    assert row["ours"]["gflop_per_img"] < row["transformers"]["gflop_per_img"]
    assert _positive(row["ratio"])
    assert ("bf16" in ts) == smoke["fast_bf16"]
    # the matmul peak is an upper bound of the step's own FLOP rate (its best round), so MFU <= 1: it is the best
    # of the squares and of every matmul shape the two steps run, in the step's dtype and thread count
    peak = row["matmul_peak"]
    assert peak["threads"] == 1 and peak["dtype"] == "float32" and peak["shapes_timed"] > 1 + 4
    for side in ("ours", "transformers"):
        assert row[side]["best_round_tflops"] <= peak["tflops"] and row[side]["mfu"] <= 1


def test_matmul_peak_times_the_steps_own_shapes():
    from beit.bench.machine import MatmulPeak, step_matmul_shapes
    lin = torch.nn.Linear(48, 80)
    x = torch.randn(20, 48, requires_grad=True)

    def step():
        lin(x).square().sum().backward()
    shapes = step_matmul_shapes(step)
    # forward addmm 20x48 @ 48x80 (weight transposed), backward: grad_x 20x80 @ 80x48, grad_w 80x20 @ 20x48
    assert {s[1:4] for s in shapes} == {(20, 48, 80), (20, 80, 48), (80, 20, 48)}
    assert (1, 20, 48, 80, False, True) in shapes
    peak = MatmulPeak(torch.float32, torch.device("cpu"), shapes, squares=(64,))
    assert len(peak.operands) == 4 and peak.measure(0.02) > 0 and peak.best_shape in peak.operands
    with torch.no_grad():
        for shape, (a, b) in peak.operands.items():  # each operand has the recorded layout
            assert (not a.is_contiguous()) == shape[4] and (not b.is_contiguous()) == shape[5]


def test_tokenizer_rows(smoke):
    tok = smoke["tokenizer"]
    d = tok["dalle"]
    assert d["tokens_equal_to_dall_e"] == {"ours": True, "ours_nchw": True}  # same tokens as plain dall_e
    assert _positive(d["ours"]["img_per_s"]) and _positive(d["dall_e"]["img_per_s"])
    assert 0 <= d["bf16_vs_fp32"]["token_agreement"] <= 1
    for kind in ("kmeans", "dvae", "vqkd"):
        assert _positive(tok[kind]["img_per_s"]) and 0 <= tok[kind]["bf16_token_agreement"] <= 1


def test_masking_data_memory(smoke):
    mk = smoke["masking"]
    assert mk["ours"]["exact_count_fraction"] == 1.0 and mk["ours"]["min_count"] == 75
    assert _positive(mk["ratio_ours_vs_v1"])
    data = smoke["data"]
    assert set(data["in_process_img_per_s"]) == {"ours", "ours_float_on_cpu", "ours_full_size_decode", "plain"}
    assert [r["workers"] for r in data["loader"]] == [1] and _positive(data["loader"][0]["ratio"])
    mem = smoke["memory"]
    assert mem["checkpointing_on"]["grad_checkpointing"] and not mem["checkpointing_off"]["grad_checkpointing"]
    assert _positive(mem["checkpointing_off"]["peak_mib"])


def test_onnx_student_latency_beside_the_teacher(smoke):
    o = smoke["onnx"]
    assert o["batch_size"] == 1 and o["rounds"] == 1 and o["image_size"] == {"teacher": 32, "student": 32}
    assert set(o["latency_ms"]) == {"teacher_pytorch", "student_onnxruntime", "student_pytorch"}
    assert all(_positive(v) for v in o["latency_ms"].values())
    assert all(len(v) == 1 for v in o["rounds_ms"].values())
    assert o["max_abs_logit_diff_onnx_vs_pytorch"] < 1e-3  # the timed ONNX file is the student
    assert "mobilevit_xxs" in o["models"]["student"] and o["params_m"]["teacher"] > o["params_m"]["student"] > 0
    assert o["teacher_vs_onnx_student"] == pytest.approx(
        o["latency_ms"]["teacher_pytorch"] / o["latency_ms"]["student_onnxruntime"], rel=0.01)


def test_end_to_end_logs_data_wait(tmp_path):
    """Real short pretraining runs (k-means live, and from a token cache): images/s and the
    data-wait fraction come from the runs' own metrics."""
    from beit.bench.end_to_end import run

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run(kinds=("kmeans", "token_cache"), image_size=32, batch_size=2, steps=2, num_workers=0, smoke=True)
    finally:
        torch.set_num_threads(n)
    for kind in ("kmeans", "token_cache"):
        assert _positive(res[kind]["img_per_s"]) and res[kind]["steps"] == 2
        assert 0 <= res[kind]["data_wait_fraction"] < 1
    assert _positive(res["token_cache"]["cache_build_s_per_img"])


@pytest.mark.slow
def test_step_phases_child_splits_a_real_step(tmp_path):
    """The step_phases section's child, as it runs in either checkout: a real fine-tune and pretraining run of the
    compare recipe, its ms per step, and the profiled phases (they cover the loop: none negative, the model's
    forward and backward and the data among them)."""
    import json

    from beit.bench.step_phases import _child, prepare
    data = prepare(tmp_path)
    assert data["n_labels"] == 144
    for stage, steps in (("finetune", 9), ("pretrain", 4)):
        res = _child(sys.executable, {"stage": stage, "steps": steps, "labels": data["n_labels"], "test": data["test"],
                                      "train": data["labels"] if stage == "finetune" else data["unlabelled"],
                                      "tokenizer": data["tokenizer"], "profile": True, "out": str(tmp_path / stage)})
        phases = res["profiled_ms_per_step"]
        assert res["steps"] == steps and res["ms_per_step"] > 0 and res["beit"] == str(ROOT)
        assert {"data", "forward", "backward", "clip", "optimizer", "loop"} <= set(phases), json.dumps(phases)
        assert all(v >= 0 for v in phases.values()) and phases["backward"] > 0 and phases["forward"] > 0
        assert not (tmp_path / stage / "tensorboard").exists()  # no tracker in the timed steps, as in beit compare
