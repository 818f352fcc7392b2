"""Shared test fixtures: the real datasets in ../shared/data (unpacked to a cache) and small image trees."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from s4l.provenance import unpack_once

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("S4L_SHARED_DATA", ROOT.parent / "shared" / "data"))
CACHE = Path(os.environ.get("S4L_TEST_CACHE", Path.home() / ".cache" / "s4l-test-data"))

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _unpack(name: str, top: str) -> Path:
    archive = SHARED_DATA / name
    if not archive.exists():
        pytest.skip(f"{archive} is absent (../shared/data not beside the checkout)")
    return unpack_once(archive, top, CACHE)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent (../shared/data not beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """CIFAR-10 as JPEG folders: cifar10/{train,test}/<class>/NNNN.jpg (unpacked once, cached)."""
    return _unpack("cifar10-jpg.tar.gz", "cifar10")


@pytest.fixture(scope="session")
def imagenette_root() -> Path:
    """Imagenette 224 px: imagenette-224/{train,val}/<wnid>/<wnid>_N.JPEG (unpacked once, cached)."""
    return _unpack("imagenette-224.tar.gz", "imagenette-224")


@pytest.fixture(scope="session")
def label_maps_dir() -> Path:
    d = SHARED_DATA / "s4l-label-maps"
    if not d.exists():
        pytest.skip(f"{d} is absent")
    return d


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


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A 3-class image folder with train/ and test/ splits of 32 px JPEGs."""
    return make_image_folder(tmp_path / "tiny")
