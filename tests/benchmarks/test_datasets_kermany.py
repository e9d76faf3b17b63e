"""benchmarks.common.datasets.load_kermany_224: gray uint8 images equal to PIL's decoding, the cache, md5 checks."""
from __future__ import annotations

import csv
import hashlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.common import datasets

KERMANY = datasets.data_dir() / "kermany_pediatric_cxr_224"


def _write_index(folder, rows):
    with open(folder / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.skipif(not (KERMANY / "index.csv").is_file(), reason="Kermany data not found")
def test_real_images_equal_pil_and_the_cache_is_reused(tmp_path):
    with open(KERMANY / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    picked = [next(r for r in rows if r["split"] == "train" and r["label"] == "1"),
              next(r for r in rows if r["split"] == "test" and r["label"] == "0"),
              next(r for r in rows if r["split"] == "train" and r["label"] == "0")]
    folder = tmp_path / "kermany_pediatric_cxr_224"
    for r in picked:
        (folder / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(KERMANY / r["path"], folder / r["path"])
    _write_index(folder, picked)
    d = datasets.load_kermany_224(tmp_path, cache_dir=tmp_path / "cache", verify_md5=True, progress=False)
    assert d["info"]["splits"] == {"train": 2, "test": 1}
    for split, rs in (("train", [picked[0], picked[2]]), ("test", [picked[1]])):
        x, y = d[split]
        assert x.dtype == torch.uint8
        assert tuple(x.shape) == (len(rs), 1, 224, 224)
        assert y.tolist() == [int(r["label"]) for r in rs]
        for i, r in enumerate(rs):
            rgb = np.asarray(Image.open(KERMANY / r["path"]).convert("RGB"))
            assert (rgb[..., 0] == rgb[..., 2]).all()  # gray content stored as RGB
            np.testing.assert_array_equal(x[i, 0].numpy(), rgb[..., 0])
    assert (tmp_path / "cache" / "kermany_224.npz").is_file()
    shutil.rmtree(folder / "images")  # a second load must come from the cache alone
    again = datasets.load_kermany_224(tmp_path, cache_dir=tmp_path / "cache", progress=False)
    for split in ("train", "test"):
        assert (again[split][0] == d[split][0]).all() and (again[split][1] == d[split][1]).all()
    _write_index(folder, picked[:2])  # another index: the cache no longer matches and the files are read
    with pytest.raises(FileNotFoundError):
        datasets.load_kermany_224(tmp_path, cache_dir=tmp_path / "cache", progress=False)


def _synthetic(tmp_path, pixels: np.ndarray, md5: str | None = None):
    folder = tmp_path / "kermany_pediatric_cxr_224"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(pixels).save(folder / "images" / "a.png")
    digest = hashlib.md5((folder / "images" / "a.png").read_bytes()).hexdigest()
    _write_index(folder, [{"path": "images/a.png", "split": "train", "label": "1", "md5": md5 or digest}])
    return folder


def test_colour_images_wrong_sizes_and_md5_mismatches_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    _synthetic(tmp_path / "c", colour)
    with pytest.raises(ValueError, match="channels differ"):
        datasets.load_kermany_224(tmp_path / "c", cache_dir=tmp_path / "cache_c", progress=False)
    _synthetic(tmp_path / "s", rng.integers(0, 256, (100, 100), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected uint8 224x224"):
        datasets.load_kermany_224(tmp_path / "s", cache_dir=tmp_path / "cache_s", progress=False)
    gray = rng.integers(0, 256, (224, 224), dtype=np.uint8)
    _synthetic(tmp_path / "m", gray, md5="0" * 32)
    with pytest.raises(ValueError, match="md5"):
        datasets.load_kermany_224(tmp_path / "m", cache_dir=tmp_path / "cache_m", verify_md5=True, progress=False)
    d = datasets.load_kermany_224(tmp_path / "m", cache_dir=tmp_path / "cache_m", progress=False)  # unchecked
    np.testing.assert_array_equal(d["train"][0][0, 0].numpy(), gray)  # PNG is lossless: the exact pixels
    with pytest.raises(FileNotFoundError, match="MEDQUANT_DATA_DIR"):
        datasets.load_kermany_224(tmp_path / "nowhere", progress=False)
