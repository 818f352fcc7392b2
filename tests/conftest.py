"""Shared test fixtures: the real datasets in ../shared/data (unpacked to a cache) and small image trees.

Helpers that tests import (servers, ports, image folders, hostile files) live in tests/support/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.images import make_image_folder  # noqa: F401  (tests import it from here too)

import s4l.io

SHARED_DATA = s4l.io.shared_data_dir()
CACHE = s4l.io.data_cache_dir()

os.environ.setdefault("OMP_NUM_THREADS", "1")

# tests/support/ holds helpers, not tests.
collect_ignore = ["support"]


def _unpack(name: str, top: str) -> Path:
    archive = SHARED_DATA / name
    if not archive.exists():
        pytest.skip(f"{archive} is absent (../shared/data not beside the checkout)")
    return s4l.io.unpack_once(archive, top, CACHE)


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


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A 3-class image folder with train/ and test/ splits of 32 px JPEGs."""
    return make_image_folder(tmp_path / "tiny")
