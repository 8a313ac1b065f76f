"""The README's "Using it on your data" commands, read out of its first code block and run verbatim
(bash, the installed ``beit`` command) on folders of real JPEGs cut from the bundled photos: from
images to a fine-tuned model that timm loads, with the class count and names from the folders."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = ("astronaut", "chelsea", "coffee")


def own_data_block() -> str:
    text = README.read_text()
    section = text[text.index("## Using it on your data"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def write_folders(root: Path) -> None:
    """my_photos/: 36 crops of every bundled photo (nested folders); my_labelled/<class>/: 10 crops each."""
    from beit.data.sample_sets import load_photos

    photos = load_photos()
    rng = np.random.default_rng(0)

    def crops(arr: np.ndarray, n: int):
        h, w = arr.shape[:2]
        for _ in range(n):
            side = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
            y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            yield Image.fromarray(arr[y:y + side, x:x + side]).resize((80, 80), Image.Resampling.BICUBIC)

    names = sorted(photos)
    for i, img in enumerate(c for name in names for c in crops(photos[name], 2)):
        out = root / "my_photos" / ("a" if i % 2 else "b/deeper") / f"photo{i:03d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, quality=90)
    for cls in CLASSES:
        (root / "my_labelled" / cls).mkdir(parents=True)
        for j, img in enumerate(crops(photos[cls], 10)):
            img.save(root / "my_labelled" / cls / f"{cls}{j}.jpg", quality=90)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three processes with their imports; about 4-6 min on a busy 2-core machine
def test_readme_own_data_commands_run_verbatim(tmp_path):
    import timm
    import torch

    block = own_data_block()
    assert block.count("beit ") <= 4 and "my_photos" in block and "my_labelled" in block
    write_folders(tmp_path)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               BEIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1700)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    # the start-up summaries say what was found and what an epoch covers; the final summaries are there
    assert "every image once" in log and "classes: 3 (astronaut, chelsea, coffee)" in log
    assert "finished:" in log and "final: top-1" in log
    ft = tmp_path / "runs" / "mine" / "finetune"
    final = json.loads((ft / "final.json").read_text())
    assert final["num_classes"] == 3 and final["class_names"] == list(CLASSES)
    assert final["samples"] == 6  # 20% of each class held out: 2 + 2 + 2
    assert np.asarray(json.loads((ft / "confusion.json").read_text())).shape == (3, 3)
    conf = json.loads((ft / "model.json").read_text())
    model = timm.create_model(conf["timm_entrypoint"], pretrained=False, checkpoint_path=str(ft / "model.safetensors"),
                              **conf["model_kwargs"]).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    # the folders were written into shards once; a rerun of the same folder reuses them
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert len(cached) == 2 and any(n.startswith("my_photos-") for n in cached)
