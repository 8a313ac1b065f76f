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
