"""One safe-loading policy in every entry point: a pickle that runs code when unpickled (it creates a marker
file) is refused -- and the marker never appears -- unless ``--trust_pickle true`` is given."""
import argparse
import builtins
import subprocess
import sys

import pytest
import torch
from data_testutil import good_shards
from reference_fixtures import checkpoint

from beit.checkpoints.safe_pickle import UntrustedPickleError, load_torch_file


class _Marker:
    """Unpickling this calls open(path, 'w'): the file appearing proves code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def evil(tmp_path, name="evil.pth"):
    marker = tmp_path / f"{name}.RAN"
    sd = torch.load(checkpoint("unilm_vqkd"), weights_only=True)["model"]
    torch.save({"model": sd, "extra": _Marker(marker)}, tmp_path / name)
    return tmp_path / name, marker


def run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_policy_allows_plain_records_and_refuses_code(tmp_path):
    path, marker = evil(tmp_path)
    with pytest.raises(UntrustedPickleError, match=r"needs io.open.*--trust_pickle true"):
        load_torch_file(path)
    assert not marker.exists()
    load_torch_file(path, trust_pickle=True)
    assert marker.exists()
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(model="x", lr=1e-3)}, tmp_path / "ok.pth")
    assert load_torch_file(tmp_path / "ok.pth")["args"].lr == 1e-3   # unilm's args record: no flag needed


def test_finetune_init_refuses_code_pickles(tmp_path):
    path, marker = evil(tmp_path)
    shards = good_shards(tmp_path / "shards", 1, 4, label=True)[0]
    r = run("beit.finetune", "--init", path, "--train_shards", shards, "--val_shards", shards, "--num_classes", 3,
            "--output_dir", tmp_path / "ft", "--image_size", 32, "--patch_size", 8)
    assert r.returncode == 2 and "--trust_pickle true" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not marker.exists()
    from beit.checkpoints.loading import read_checkpoint
    read_checkpoint(path, trust_pickle=True)   # what --trust_pickle true does
    assert marker.exists()


def test_pretrain_tokenizer_refuses_code_pickles(tmp_path):
    path, marker = evil(tmp_path)
    shards = good_shards(tmp_path / "shards", 1, 4)[0]
    r = run("beit.pretrain", "--tokenizer", "vqkd", "--tokenizer_path", path, "--train_shards", shards,
            "--output_dir", tmp_path / "pt")
    assert r.returncode == 2 and "--trust_pickle true" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


def test_tokenizer_report_refuses_code_pickles(tmp_path, capsys):
    from beit.tokenizers import report
    path, marker = evil(tmp_path)
    assert report.main(["--tokenizer", "vqkd", "--tokenizer_path", str(path), "--val_shards", "x.tar",
                        "--out_dir", str(tmp_path / "r")]) == 2
    assert "--trust_pickle true" in capsys.readouterr().err and not marker.exists()
    from beit.tokenizers import load_tokenizer
    load_tokenizer("vqkd", path, num_heads=4, trust_pickle=True)
    assert marker.exists()


def test_convert_dalle_refuses_without_the_flag(tmp_path):
    from beit.tokenizers import convert_dalle
    path, marker = evil(tmp_path, "encoder.pkl")
    assert convert_dalle.main(["--encoder", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not marker.exists()
    with pytest.raises(Exception):   # trusted: unpickled (marker), then refused as not a dall_e Encoder
        convert_dalle.main(["--encoder", str(path), "--out", str(tmp_path / "out"), "--trust_pickle", "true"])
    assert marker.exists()


def test_export_ema_file_refuses_code_pickles(tmp_path):
    from safetensors.torch import save_file

    from beit.config import save_config
    from beit.export.commands import export_main
    from beit.options.finetune import FinetuneConfig
    from beit.tasks import build_model
    cfg = FinetuneConfig(num_classes=3, image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.yaml")
    step = run_dir / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    model = build_model(cfg, 3, log=lambda m: None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(step / "model.safetensors"))
    marker = tmp_path / "ema.RAN"
    torch.save({"x": _Marker(marker)}, step / "custom_checkpoint_0.pkl")
    (step / "COMPLETE").write_text("")
    with pytest.raises(SystemExit, match="--trust_pickle true"):
        export_main(["--run_dir", str(run_dir), "--out", str(tmp_path / "m.safetensors"), "--ema"])
    assert not marker.exists()
    with pytest.raises(Exception):   # trusted: unpickled (marker), then not a state dict
        export_main(["--run_dir", str(run_dir), "--out", str(tmp_path / "m.safetensors"), "--ema",
                     "--trust_pickle", "true"])
    assert marker.exists()
