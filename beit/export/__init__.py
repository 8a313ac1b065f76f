"""Every export of a fine-tuned model in one place (imported as ``beit.export``).

* timm (``timm_export``): safetensors + a JSON with the timm entrypoint and ``pretrained_cfg``;
* Hugging Face transformers (``hf_export``): a ``BeitForImageClassification`` folder;
* ONNX (``onnx_export``): ``model.onnx`` + the device-side preprocessing, checked with onnxruntime;
* segmentation (``segmentation``): the BEiT / Swin UperNet segmenter as safetensors + JSON.

``commands`` holds ``beit export`` and ``beit export-onnx`` (``python -m beit.export`` = ``beit export``).
"""
from beit.export.timm_export import export_model, load_exported

__all__ = ["export_model", "load_exported"]
