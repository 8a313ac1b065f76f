"""data/upscaled counts the images smaller than the model input in every training loader."""
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from beit.finetune import FinetuneConfig, run_finetune
from beit.runtime.run_logging import read_metrics
from beit.tokenizers.train_data import CropSpec, build_view_loader


@pytest.mark.parametrize("size,upscaled", [(48, True), (32, False)])
def test_finetune_counts_upscaled(digits, tmp_path, size, upscaled):
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = FinetuneConfig(train_shards=str(digits / "train-*.tar"), val_shards=str(digits / "test-*.tar"),
                         output_dir=str(tmp_path), image_size=size, patch_size=16, embed_dim=16, depth=1, num_heads=1,
                         epochs=1, batches_per_epoch=2, batch_size=8, num_workers=0, report_to="none",
                         warmup_epochs=0, auto_augment="", mixup=0.0, cutmix=0.0, reprob=0.0)
    run_finetune(cfg)
    rec = [r for r in read_metrics(tmp_path) if "data/samples" in r][-1]
    assert rec["data/samples"] == 16
    assert rec["data/upscaled"] == (16 if upscaled else 0)


def test_tokenizer_loader_counts_upscaled(digits):
    loader = build_view_loader(str(digits / "train-*.tar"), CropSpec(40), batch_size=16, num_workers=0)
    n = sum(len(b["images"]) for b in loader)
    m = loader.metrics()
    assert m["data/samples"] == n and m["data/upscaled"] == n
