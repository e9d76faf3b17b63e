"""Fixtures for the complexity tests: real images from the shared data folder (never copied into the repo).

The folder is ``$MEDQUANT_DATA_DIR`` or ``<repo>/../shared/data``; tests that need it are skipped when absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    env = os.environ.get("MEDQUANT_DATA_DIR")
    return Path(env) if env else (REPO / ".." / "shared" / "data").resolve()


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _need(data_dir())


@pytest.fixture(scope="session")
def kermany_test_rows(data_root):
    from medquant.data import read_index

    root = _need(data_root / "kermany_pediatric_cxr_224")
    return root, read_index(root / "index.csv", split="test")


def _load_gray(root, rows):
    from medquant.data import load_image

    out = []
    for r in rows:
        im = load_image(root / r["path"])
        out.append(np.ascontiguousarray(im[..., 0]) if im.ndim == 3 else im)
    return np.stack(out)


@pytest.fixture(scope="session")
def kermany32(kermany_test_rows):
    """32 Kermany test chest X-rays, 224x224 uint8 gray (RGB files with identical channels)."""
    root, rows = kermany_test_rows
    return _load_gray(root, rows[::19][:32])


@pytest.fixture(scope="session")
def kermany_subset(kermany_test_rows):
    """Fixed subset of the Kermany test split (every 4th image: 156 of 624) for the Spearman check."""
    root, rows = kermany_test_rows
    return _load_gray(root, rows[::4])


@pytest.fixture(scope="session")
def ham8(data_root):
    """8 HAM10000 dermatoscopy images, 224x224x3 uint8 RGB (colour)."""
    from medquant.data import load_image, read_index

    root = _need(data_root / "ham10000_lesion_subset_224")
    rows = read_index(root / "metadata.csv", split="test")[::97][:8]
    return [load_image(root / r["path"]) for r in rows]


@pytest.fixture(scope="session")
def pneumonia28(data_root):
    """64 PneumoniaMNIST test images, 28x28 uint8."""
    from medquant.data import load_npz_split

    return load_npz_split(_need(data_root / "pneumoniamnist" / "pneumoniamnist.npz"), "test")[:64]


@pytest.fixture(scope="session")
def nih64(data_root):
    """16 NIH ChestX-ray14 images, 64x64 uint8."""
    from medquant.data import load_npz_split

    path = _need(data_root / "nih_cxr14_sample1000_64" / "nih_cxr14_sample1000_64.npz")
    # images only (no evaluation): the shipped split puts 30 patients in several splits, refused by default
    return load_npz_split(path, "test", allow_leakage=True)[:16]
