"""The report opens offline in headless Chromium and every picture on it loads (a broken one is caught)."""
import re

import pytest
from test_pretrain import assets, run, tiny_cfg  # noqa: F401  (assets is a fixture: a short real run)
from viz_testutil import check_png, chromium, images_loaded, screenshot

from beit.options.viz import VizConfig
from beit.viz.main import make_report

pytestmark = pytest.mark.skipif(
    chromium() is None, reason="headless Chromium is not installed (launch/test.sh installs it with apt-get "
                               "when it runs as root; otherwise install the 'chromium' package)")


def test_report_loads_every_image_in_chromium(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run(tiny_cfg(assets, out, total_steps=2, checkpoint_every=2, eval_batches=1))
    report = make_report(VizConfig(run_dir=str(out), device="cpu", num_images=2))["report"]
    n_img = len(re.findall(r"<img ", report.read_text()))
    states = images_loaded(report, tmp_path / "chrome")
    assert len(states) == n_img == 5 and all(s.startswith("ok:") for s in states), states
    shot = check_png(screenshot(report, tmp_path / "shot.png", tmp_path / "chrome"), (1200, 2400), min_colours=50)
    assert (shot < 200).any(axis=-1).mean() > 0.05        # pictures, not a blank page
    # the probe can fail: a missing picture is reported as broken
    (out / "viz" / "tokens.png").unlink()
    states = images_loaded(report, tmp_path / "chrome")
    assert "broken:viz/tokens.png" in states and sum(s.startswith("ok:") for s in states) == n_img - 1
