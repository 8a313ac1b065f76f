"""``beit compare --tokenizer vqkd --tokenizer_path <a VQ-KD run>``: a VQ-KD distilled (here from a tiny timm
teacher) on the digits' training images drives every seed's pretraining, and its token statistics are reported
in place of the fitted k-means tokenizer's."""
import json

import pytest
import torch
from test_compare import TINY
from vqkd_testutil import run_vqkd, timm_teacher, tiny_vqkd

from beit.cli import main as cli

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_compare_with_a_trained_vqkd(digits, tmp_path):
    shards = {"train": str(digits / "train-{000000..000003}.tar"), "val": str(digits / "test-000000.tar")}
    vq = tmp_path / "vqkd"
    run_vqkd(tiny_vqkd(shards, timm_teacher(tmp_path / "teacher"), vq, vocab_size=16, total_steps=4, eval_every=4,
                       checkpoint_every=4))
    out = tmp_path / "cmp"
    tiny = [a for a in TINY]
    i = tiny.index("--tokenizer_fit")
    del tiny[i:i + 2]  # nothing is fitted: the VQ-KD is used for every seed
    n = torch.get_num_threads()
    try:
        assert cli(["compare", "--train_shards", str(digits / "train-*.tar"), "--test_shards",
                    str(digits / "test-*.tar"), "--output_dir", str(out), "--tokenizer", "vqkd",
                    "--tokenizer_path", str(vq), *tiny]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads((out / "compare.json").read_text())
    seed = res["per_seed"][0]
    assert seed["tokenizer"]["vocab"] == 16 and 1 <= seed["tokenizer"]["used_codes"] <= 16
    assert seed["pretrain"]["step"] == 8
    assert json.loads((out / "seed0" / "pretrain" / "pretrained.json").read_text())["tokenizer"] == "vqkd"
    assert not (out / "seed0" / "tokenizer").exists()  # no k-means fitted
    assert all(len(v) == 1 and 0 <= v[0] <= 100 for v in res["rows"].values())
