"""Small real image-folder data sets written at test time."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_image_folder(root: Path, splits=("train", "test"), classes=("a", "b", "c"),
                      per_class=4, size=32, seed=0, fmt="JPEG") -> Path:
    """Write a small real image-folder dataset (JPEG or PNG files) and return its root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ext = ".jpg" if fmt == "JPEG" else ".png"
    for split in splits:
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.full((size, size, 3), 40 + 70 * ci, np.uint8)
                noise = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                Image.fromarray(base + noise).save(d / f"{cls}_{i:04d}{ext}", format=fmt)
    return root
