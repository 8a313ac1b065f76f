"""Options of ``beit predict`` (``beit predict --help``)."""
from __future__ import annotations

from dataclasses import dataclass

from beit.config import field
from beit.options.common import DeviceOptions, WorkerOptions


@dataclass
class PredictConfig(DeviceOptions, WorkerOptions):
    model: str = field("", help="a fine-tune run folder (its model.safetensors, else its newest checkpoint), an "
                                "exported .safetensors (with its .json) or an .onnx (with its .preprocess.json)")
    data: str = field("", help="a folder of images (sub-folders named like the model's classes give labels) or shards "
                               "(a pattern such as 'shards/test-*.tar', or a folder of .tar shards)")
    out: str = field("predictions.csv", help="the predictions, one row per image; beside it <stem>.errors.csv "
                                             "(undecodable files), <stem>.json (the summary) and, with labels, "
                                             "<stem>.confusion.json / .png")
    top_k: int = field(5, help="classes per image in the CSV, most probable first (segmentation: the classes "
                               "covering most of the mask)")
    batch_size: int = field(64, help="images per forward pass (segmentation: one image at a time)")
    preprocessing: str = field("", help="only for a model that does not record its own evaluation preprocessing (an "
                                        ".onnx without its .preprocess.json, an old export): the fine-tune run's "
                                        "config.yaml, its model.json or a .preprocess.json")
    masks_dir: str = field("", help="segmentation: where the mask PNGs go (empty: <out stem>_masks/ beside the CSV)")

    def validate(self) -> None:
        if not self.model or not self.data:
            raise ValueError("--model and --data are required, e.g. beit predict --model runs/finetune "
                             "--data my_images/ --out predictions.csv")
        if self.top_k < 1 or self.batch_size < 1:
            raise ValueError(f"need --top_k >= 1 and --batch_size >= 1, got {self.top_k}, {self.batch_size}")
        self.check_workers()
        if not self.out.endswith(".csv"):
            raise ValueError(f"--out is the predictions CSV and must end with .csv, got {self.out!r}")
        self.check_device()
