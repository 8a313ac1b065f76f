"""docs/tokenizers.md "Train your own VQ-KD": its commands, read out of the doc verbatim, run as processes in a
fresh folder with a tiny budget appended to each (the flags appended last win)."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SECTION = "### Train your own VQ-KD (BEiT v2)"
TINY_MODEL = ["--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--batch_size", "16", "--num_workers", "0",
              "--report_to", "none"]
BUDGET = {  # command prefix -> flags appended
    "beit samples": [],
    "beit tokenizer train kmeans": ["--epochs", "1", "--init_patches", "500", "--num_workers", "0"],
    "beit pretrain": ["--total_steps", "2", "--warmup_steps", "1", *TINY_MODEL],
    "beit tokenizer train vqkd": ["--total_steps", "3", "--warmup_steps", "1", "--vocab_size", "32", *TINY_MODEL],
    "beit tokenizer report": ["--max_images", "16", "--num_show", "2"],
}


def doc_commands() -> list[str]:
    text = (ROOT / "docs" / "tokenizers.md").read_text()
    block = re.search(r"```\n(.*?)```", text[text.index(SECTION):], re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def budget(command: str) -> list[str]:
    prefix = max((p for p in BUDGET if command.startswith(p + " ")), key=len)
    return BUDGET[prefix]


def test_the_section_trains_with_and_without_restarts_reports_and_pretrains():
    cmds = doc_commands()
    assert [c.split(" --")[0] for c in cmds] == [
        "beit samples", "beit tokenizer train kmeans", "beit pretrain", "beit tokenizer train vqkd",
        "beit tokenizer train vqkd", "beit tokenizer report", "beit pretrain"]
    assert "--restart_dead_codes false" in cmds[4] and "--tokenizer vqkd" in cmds[6]


@pytest.mark.slow
def test_doc_commands_run_verbatim(tmp_path):
    for command in doc_commands():
        argv = shlex.split(command)
        assert argv[0] == "beit"
        p = subprocess.run([sys.executable, "-m", "beit.cli", *argv[1:], *budget(command)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{command}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    report = json.loads((tmp_path / "runs/tok/report/tokenizer_report.json").read_text())
    assert report["tokenizer"] == "vqkd" and set(report["compare"]) == {"vqkd_no_restarts", "kmeans"}
    with_restarts = json.loads((tmp_path / "runs/tok/vqkd/final_metrics.json").read_text())
    without = json.loads((tmp_path / "runs/tok/vqkd_no_restarts/final_metrics.json").read_text())
    assert without["codes_restarted"] == 0 and with_restarts["val/images"] == without["val/images"] == 222
    final = json.loads((tmp_path / "runs/beit_vqkd/pretrained.json").read_text())
    assert final["tokenizer"] == "vqkd" and final["step"] == 2
