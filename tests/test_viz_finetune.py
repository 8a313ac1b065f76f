"""`beit viz` on short real fine-tuning runs: classification (confusion matrix with the digits' class
names, attention, curves) and segmentation (prediction / ground-truth overlays with a legend)."""
import pytest
from test_finetune_run import cfg as cls_cfg
from test_finetune_seg import seg_cfg, seg_shards  # noqa: F401  (seg_shards is a fixture)
from viz_testutil import check_png

from beit.finetune import run_finetune
from beit.options.viz import VizConfig
from beit.viz import figures
from beit.viz.curves import curves_px
from beit.viz.main import make_report

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_classification_run_pictures(digits, tmp_path):  # noqa: F811
    out = tmp_path / "ft"
    run_finetune(cls_cfg(digits, out, epochs=1, batches_per_epoch=2, mixup=0.0, cutmix=0.0))
    res = make_report(VizConfig(run_dir=str(out), device="cpu", num_images=2, max_eval_images=100))
    pics = res["pictures"]
    assert set(pics) == {"Confusion matrix", "Attention", "Curves"}
    from beit.viz.confusion import confusion_px
    check_png(pics["Confusion matrix"], confusion_px(10))
    check_png(pics["Attention"], figures.figure_px(2, 1 + 2 * 2))
    check_png(pics["Curves"], curves_px())
    html = (out / "index.html").read_text()
    assert "top-1" in html and "of 100" in html and "fine-tuning (classification)" in html


def test_segmentation_run_pictures(seg_shards, tmp_path):  # noqa: F811
    out = tmp_path / "seg"
    run_finetune(seg_cfg(seg_shards, out, epochs=1, batches_per_epoch=2))
    res = make_report(VizConfig(run_dir=str(out), device="cpu", num_images=2, blocks="1,4"))
    pics = res["pictures"]
    assert set(pics) == {"Segmentation", "Attention", "Curves"}
    check_png(pics["Segmentation"], figures.figure_px(2, 3))
    check_png(pics["Attention"], figures.figure_px(2, 1 + 2 * 2))
