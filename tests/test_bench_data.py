"""The data benchmark command runs end to end on a few small JPEGs and prints its table."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_data_prints_ours_and_plain_per_worker():
    cmd = [sys.executable, str(ROOT / "launch" / "bench_data.py"), "--images", "24", "--workers", "1",
           "--batch_size", "4", "--repeats", "1", "--size", "80x60"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "24 JPEGs of 80x60, quality 90" in r.stdout
    assert re.search(r"one process: ours [\d.]+ img/s, plain [\d.]+ img/s, ratio [\d.]+", r.stdout)
    row = [line.split() for line in r.stdout.splitlines() if line.strip().startswith("1 ")]
    assert len(row) == 1 and len(row[0]) == 6 and all(float(v) > 0 for v in row[0][1:])
