"""Checks shared by the picture tests: a PNG is valid, of the expected size, and not one colour."""
from pathlib import Path

import numpy as np
from PIL import Image


def check_png(path, size=None, min_colours: int = 8) -> np.ndarray:
    path = Path(path)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        if size is not None:
            assert im.size == tuple(size), f"{path.name}: {im.size} != expected {tuple(size)}"
        rgb = np.asarray(im.convert("RGB"))
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colours) >= min_colours and rgb.std() > 5, f"{path.name} is (nearly) one colour"
    return rgb


# ---- headless Chromium ---------------------------------------------------------------------------
CHECK_SCRIPT = """<script>window.addEventListener('load', function () {
  var r = Array.prototype.map.call(document.images, function (i) {
    return (i.complete && i.naturalWidth > 0 ? 'ok:' : 'broken:') + i.getAttribute('src'); });
  document.body.setAttribute('data-images', r.join('|')); });</script>"""


def chromium() -> str | None:
    import shutil
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run_browser(args, tmp):
    import subprocess
    exe = chromium()
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp}", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def images_loaded(report: Path, tmp: Path) -> list[str]:
    """Open ``report`` (a copy beside it, with a script that records each <img>'s load state) in headless
    Chromium; returns 'ok:src' / 'broken:src' per image on the page."""
    import re
    report = Path(report)
    probe = report.with_name("_probe_" + report.name)
    probe.write_text(report.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    try:
        res = _run_browser(["--dump-dom", probe.resolve().as_uri()], tmp)
    finally:
        probe.unlink()
    m = re.search(r'data-images="([^"]*)"', res.stdout)
    assert m, f"the page did not finish loading in Chromium: {res.stderr[-2000:]}"
    return m.group(1).split("|") if m.group(1) else []


def screenshot(report: Path, out: Path, tmp: Path, width: int = 1200, height: int = 2400) -> Path:
    res = _run_browser([f"--screenshot={out}", f"--window-size={width},{height}", "--hide-scrollbars",
                        Path(report).resolve().as_uri()], tmp)
    assert Path(out).is_file(), f"no screenshot: {res.stderr[-2000:]}"
    return Path(out)
