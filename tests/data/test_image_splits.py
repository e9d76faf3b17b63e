"""``medquant.data.image_splits``: the splits an image source holds, read independently here (csv / numpy) from
the real data, and each one loadable by ``load_images(path, split=...)``."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from medquant.data import default_data_dir, image_splits, load_images


def _data(*parts):
    p = default_data_dir().joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is missing (set MEDQUANT_DATA_DIR)")
    return p


def test_an_index_csv_and_its_folder_give_the_split_column_in_order_of_appearance():
    index = _data("kermany_pediatric_cxr_224", "index.csv")
    with index.open(newline="") as f:
        expected = list(dict.fromkeys(r["split"] for r in csv.DictReader(f)))
    assert expected == ["test", "train"]  # the file lists its test rows first
    assert image_splits(index) == expected and image_splits(index.parent) == expected
    images, names = load_images(index, split="train", limit=2)
    assert len(images) == 2 and all(n.startswith("images/train/") for n in names)


def test_medmnist_and_flat_npz_files():
    pneu = _data("pneumoniamnist", "pneumoniamnist.npz")
    assert image_splits(pneu) == ["train", "val", "test"]
    nih = _data("nih_cxr14_sample1000_64", "nih_cxr14_sample1000_64.npz")
    with np.load(nih) as z:
        expected = list(dict.fromkeys(z["split"].astype(str).tolist()))
    assert image_splits(nih) == expected and len(expected) >= 2


def test_sources_without_splits(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    assert image_splits(tmp_path) == [] and image_splits(tmp_path / "a.png") == []
    (tmp_path / "index.csv").write_text("path,label\na.png,0\n")
    assert image_splits(tmp_path) == []
    np.savez(tmp_path / "flat.npz", images=np.zeros((2, 4, 4), np.uint8))
    assert image_splits(tmp_path / "flat.npz") == []
    with pytest.raises(FileNotFoundError):
        image_splits(tmp_path / "missing")
