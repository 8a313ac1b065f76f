"""``beit predict``: classify (or segment) new images with a fine-tuned model, its own preprocessing applied.

    beit predict --model runs/finetune --data my_images/ --out predictions.csv
    beit predict --model exported/model.safetensors --data 'shards/test-*.tar' --out runs/test_predictions.csv
    beit predict --model exported/model.onnx --data my_labelled_test/ --out onnx_predictions.csv

``--model``: a fine-tune run folder, an exported .safetensors (with its .json) or an .onnx (with its
.preprocess.json). ``--data``: a folder of images (sub-folders named like the classes: labels, so top-1 and a
confusion matrix) or shards. Writes the CSV (top-k classes, names, probabilities), the files that could not be
read with the reason (<stem>.errors.csv) and a summary (<stem>.json); a segmenter writes mask PNGs.
"""
from __future__ import annotations

from beit.config import parse_config
from beit.options.predict import PredictConfig


def predict_main(argv: list[str] | None = None) -> dict:
    from beit.predict.run import run_predict
    return run_predict(parse_config(PredictConfig, argv, description=__doc__))
