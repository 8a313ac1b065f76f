"""Model cards beside every export of a real pretrained + fine-tuned BEiT (the run's own weights, ``beit export``
timm and ``--format hf``, ``beit export-onnx``): each card's loading snippet, read out of the card, runs verbatim
in a fresh process from the export's folder and scores the 360 held-out digits as the fine-tune did; the card
says where the model comes from (the pretraining run, its data and tokenizer; the fine-tune's data, recipe and
scores), in the Hugging Face model-card format; a card never overwrites another README."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from predict_testutil import digit_samples

SCORE = """

# --- appended by the test: score the held-out digits with the card's predict() ---
import json as _json
import sys as _sys
from pathlib import Path as _Path

from PIL import Image as _Image

_root = _Path(_sys.argv[1])
_labels = _json.loads((_root / "labels.json").read_text())
_hits = sum(predict(_Image.open(_root / _name))[0][0] == _label for _name, _label in _labels.items())
print("HELD_OUT_HITS", _hits, len(_labels))
"""


def card_parts(path: Path) -> tuple[dict, str, str]:
    """(front matter, markdown body, the python block of "How to load")."""
    text = path.read_text()
    front, body = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S).groups()
    snippet = re.search(r"## How to load.*?```python\n(.*?)```", body, re.S).group(1)
    return yaml.safe_load(front), body, snippet


@pytest.fixture(scope="module")
def held_out_pngs(digits_model, tmp_path_factory):
    """The 360 held-out digits as PNG files (the shard's own bytes) and their class names."""
    root = tmp_path_factory.mktemp("held_out_pngs")
    labels = {}
    for s in digit_samples(sorted(digits_model["digits"].glob("test-*.tar"))[0]):
        (root / f"{s['__key__']}.png").write_bytes(s["png"])
        labels[f"{s['__key__']}.png"] = s["cls"].decode()
    (root / "labels.json").write_text(json.dumps(labels))
    return root


def run_snippet(snippet: str, folder: Path, pngs: Path) -> tuple[int, int]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", snippet + SCORE, str(pngs)], cwd=folder, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    hits, n = re.search(r"HELD_OUT_HITS (\d+) (\d+)", r.stdout).groups()
    return int(hits), int(n)


def cards(digits_model) -> dict[str, Path]:
    return {"run": digits_model["run"] / "README.md", "timm": digits_model["timm"].parent / "README.md",
            "hf": digits_model["hf"] / "README.md", "onnx": digits_model["onnx"].parent / "README.md"}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["run", "timm", "hf", "onnx"])
def test_the_cards_snippet_runs_verbatim_and_scores_the_held_out_digits(digits_model, held_out_pngs, fmt):
    card = cards(digits_model)[fmt]
    _, _, snippet = card_parts(card)
    hits, n = run_snippet(snippet, card.parent, held_out_pngs)
    final = digits_model["final"]
    assert n == 360 and 100.0 * hits / n == pytest.approx(final["top1"], abs=1e-9), (fmt, hits, final["top1"])


def test_cards_say_what_the_model_is_and_where_it_comes_from(digits_model):
    final = digits_model["final"]
    pre_run = digits_model["root"] / "pretrain"
    for fmt, card in cards(digits_model).items():
        front, body, snippet = card_parts(card)
        assert front["library_name"] == {"run": "timm", "timm": "timm", "hf": "transformers", "onnx": "onnx"}[fmt]
        assert {"image-classification", "beit", "masked-image-modeling"} <= set(front["tags"])
        result = front["model-index"][0]["results"][0]
        assert result["task"]["type"] == "image-classification"
        metrics = {m["type"]: m["value"] for m in result["metrics"]}
        assert metrics["accuracy"] == pytest.approx(final["top1"] / 100, abs=1e-6)
        assert metrics["top-5-accuracy"] == pytest.approx(final["top5"] / 100, abs=1e-6)
        assert "(360 images)" in result["dataset"]["name"] and digits_model["test"] in result["dataset"]["name"]
        # the pretraining: our run, its unlabelled data, tokenizer and length
        pre = body[body.index("## Pretraining"):body.index("## Fine-tuning")]
        assert f"`{pre_run}`" in pre and "kmeans" in pre and str(digits_model["root"] / "tokenizer") in pre
        assert str(digits_model["digits"] / "train-*.tar") in pre and "20 optimizer steps" in pre
        # the fine-tune: data, held-out data, classes, recipe; the scores; the preprocessing; the versions
        ft = body[body.index("## Fine-tuning"):body.index("## Held-out scores")]
        assert digits_model["test"] in ft and "classes (10): 0, 1, 2" in ft and "lr 0.002" in ft and "epochs 2" in ft
        assert f"| top-1 accuracy | {final['top1']:.2f}% |" in body
        assert "shorter side resized to 36 px (bicubic" in body and "centre crop 32x32" in body
        assert f"| torch | {metadata.version('torch')} |" in body and "| beit-pipeline commit |" in body
        assert "def predict(image):" in snippet
    hf_body = cards(digits_model)["hf"].read_text()
    assert "| transformers |" in hf_body and "squashes the image" in hf_body
    onnx_body = cards(digits_model)["onnx"].read_text()
    assert "| onnxruntime |" in onnx_body and "opset 18" in onnx_body
    assert f"the ONNX model's top-1 on {digits_model['test']} is {final['top1']:.2f}%" in onnx_body


def test_the_hf_card_is_a_hugging_face_model_card(digits_model):
    hub = pytest.importorskip("huggingface_hub")
    card = hub.ModelCard.load(str(digits_model["hf"] / "README.md"))
    assert card.data.library_name == "transformers"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == pytest.approx(digits_model["final"]["top1"] / 100, abs=1e-6)


def test_a_card_never_overwrites_another_readme(digits_model, tmp_path):
    from beit.export.commands import export_main, onnx_main
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "README.md").write_text("# my project\n")
    export_main(["--run_dir", str(digits_model["run"]), "--out", str(out / "model.safetensors")])
    assert (out / "README.md").read_text() == "# my project\n"
    assert "card for: model.safetensors" in (out / "README.model.safetensors.md").read_text()
    same = tmp_path / "same"
    export_main(["--run_dir", str(digits_model["run"]), "--out", str(same / "model.safetensors")])
    onnx_main(["--model", str(same / "model.safetensors"), "--out", str(same / "model.onnx")])
    assert "card for: model.safetensors" in (same / "README.md").read_text()           # the first export's
    assert "card for: model.onnx" in (same / "README.model.onnx.md").read_text()
    before = (same / "README.md").read_text()
    export_main(["--run_dir", str(digits_model["run"]), "--out", str(same / "model.safetensors")])   # its own: updated
    assert (same / "README.md").read_text().split("## Versions")[0] == before.split("## Versions")[0]


def test_linear_probe_and_pre_provenance_exports_get_honest_cards(tmp_path, digits_model, held_out_pngs):
    from types import SimpleNamespace

    from beit.export import export_model
    from beit.export.card import card_of_export
    from beit.export.classifier import load_exported
    from beit.modeling.classifier import LinearProbe
    cfg = SimpleNamespace(model="beit", image_size=32, patch_size=8, in_chans=3, init_values=0.1, num_classes=10,
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic",
                          crop_pct=0.875)
    probe = LinearProbe(load_exported(digits_model["timm"]), 10, block=1).eval()
    path = export_model(probe, tmp_path / "probe.safetensors", cfg, class_names=[str(i) for i in range(10)])
    card = card_of_export(path, probe)        # an export without a provenance record (as before this change)
    front, body, snippet = card_parts(card)
    assert "library_name" not in front and "Not recorded" in body and "A linear probe" in body
    assert "beit.export.load_exported" in body
    hits, n = run_snippet(snippet, tmp_path, held_out_pngs)
    from PIL import Image

    from beit.export.preprocessing import eval_preprocessing
    with torch.no_grad():
        labels = json.loads((held_out_pngs / "labels.json").read_text())
        t = eval_preprocessing(json.loads(path.with_suffix(".json").read_text())).transform()
        want = sum(int(probe(t(Image.open(held_out_pngs / k).convert("RGB"))[None]).argmax()) == int(v)
                   for k, v in labels.items())
    assert (hits, n) == (want, 360)
