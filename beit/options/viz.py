"""Options of ``beit viz RUN_DIR`` (``beit viz --help``)."""
from __future__ import annotations

from dataclasses import dataclass

from beit.config import field
from beit.options.common import DeviceOptions


@dataclass
class VizConfig(DeviceOptions):
    run_dir: str = field("", help="a pretraining or fine-tuning --output_dir (also the first positional argument)")
    checkpoint: str = field("", help="weights to show: empty = the newest complete checkpoint (else the final "
                            "weights), a step number (200), a checkpoint folder or a .safetensors file")
    num_images: int = field(4, help="held-out images in the pictures")
    blocks: str = field("", help="1-based blocks whose attention is drawn, e.g. 1,6,12 (empty: first, middle, last)")
    patch: str = field("", help="row,col (0-based) of the patch whose attention is drawn (empty: the centre patch)")
    val_shards: list[str] = field(default_factory=list, help="held-out shards to draw from (empty: the run's own "
                                  "val_shards)")
    tokenizer_path: str = field("", help="pretraining runs: the tokenizer, when it has moved since training "
                                "(empty: the run's tokenizer_path)")
    max_eval_images: int = field(2000, help="fine-tuning: held-out images scored for the confusion matrix")
    out_dir: str = field("", help="where the PNGs go (empty: RUN_DIR/viz); index.html is always RUN_DIR/index.html")

    def validate(self) -> None:
        if not self.run_dir:
            raise ValueError("give the run folder: beit viz RUN_DIR (the --output_dir of a pretraining or "
                             "fine-tuning run)")
        if not 1 <= self.num_images <= 64:
            raise ValueError(f"num_images must be in 1..64, got {self.num_images}")
        if self.max_eval_images < 1:
            raise ValueError(f"max_eval_images must be >= 1, got {self.max_eval_images}")
        self.check_device()
