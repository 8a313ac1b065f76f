"""Every export of a fine-tuned model in one place (imported as ``beit.export``).

* ``classifier``: a classifier as timm weights (safetensors + a JSON with the timm entrypoint and
  ``pretrained_cfg``; ``load_exported`` rebuilds it) or as a Hugging Face ``BeitForImageClassification`` folder;
* ``onnx_export``: ``model.onnx`` + the device-side preprocessing, checked with onnxruntime;
* ``segmentation``: the BEiT / Swin UperNet segmenter as safetensors + JSON.

``commands`` holds ``beit export`` and ``beit export-onnx`` (``python -m beit.export`` = ``beit export``).
"""
from beit.export.classifier import export_model, load_exported

__all__ = ["export_model", "load_exported"]
