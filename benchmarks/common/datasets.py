"""Benchmark data: where the data directory is, the NIH patient split, and the FairQuant data sets with groups.

* :func:`data_dir` / :func:`use_data_dir` - the benchmarks' data directory: ``--data-dir``, else
  ``$MEDQUANT_DATA_DIR``, else this repository's sibling folder ``../shared/data`` (the layout the committed
  results were measured in). ``use_data_dir`` also exports it as ``$MEDQUANT_DATA_DIR`` so library loaders
  (``medquant.data``, the IU reports) and benchmark subprocesses find it.
* :func:`nih_patient_split` - the NIH ChestX-ray14 sample split **by patient_id** (the shipped split puts 30
  patients in more than one split): the unique patient ids are permuted with ``numpy.random.default_rng(seed)``,
  the first ``round(f_train * n)`` patients train, the next up to ``round((f_train + f_val) * n)`` validation /
  calibration, the rest test (for the 264 patients of the sample: 158 / 53 / 53 patients).
* :func:`load_nih_sex` - the NIH sample (``nih_cxr14_sample1000_64``): 64x64 gray, normal (0) vs abnormal (1),
  groups = sex (0 = F, 1 = M), split by :func:`nih_patient_split`.
* :func:`load_ham10000_sex` - HAM10000, one image per lesion (``ham10000_lesion_subset_224``): RGB resized to
  ``size`` (default 64), 7 classes (DermaMNIST order), groups = sex (0 = female, 1 = male; the 36 ``unknown``
  are dropped unless ``keep_unknown``, then group 2), the metadata's stratified split (one lesion per image, so no
  leakage). Decoding ~6k JPEGs takes a few seconds; the resized arrays are cached in ``cache_dir``
  (default ``~/.cache/medquant``) outside the repository.

The two FairQuant loaders return ``{"train" | "val" | "test": (x float32 (N, C, H, W) in [0, 1], y int64 (N,),
groups int64 (N,))}`` plus metadata under ``"info"``.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]

SPLITS = ("train", "val", "test")


def data_dir(path=None) -> Path:
    """``path`` if given, else ``$MEDQUANT_DATA_DIR``, else ``<repository>/../shared/data``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("MEDQUANT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return (REPO.parent / "shared" / "data").resolve()


def use_data_dir(path=None) -> Path:
    """:func:`data_dir`, exported as ``$MEDQUANT_DATA_DIR`` for library loaders and subprocesses."""
    d = data_dir(path)
    os.environ["MEDQUANT_DATA_DIR"] = str(d)
    return d


def nih_patient_split(patient_id: np.ndarray, seed: int = 0,
                      fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> np.ndarray:
    """Split name (``"train"`` / ``"val"`` / ``"test"``) of every image, all of a patient's images in one split;
    see the module doc for the rule."""
    patients = np.unique(patient_id)
    np.random.default_rng(seed).shuffle(patients)
    n = len(patients)
    c1, c2 = round(fractions[0] * n), round((fractions[0] + fractions[1]) * n)
    which = {p: s for s, ps in zip(SPLITS, (patients[:c1], patients[c1:c2], patients[c2:])) for p in ps}
    return np.array([which[p] for p in patient_id])


def _dir(path) -> Path:
    return data_dir(path)


def _pack(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xt = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    if xt.dim() == 3:
        xt = xt.unsqueeze(1)
    else:
        xt = xt.permute(0, 3, 1, 2).contiguous()
    return xt, torch.from_numpy(y.astype(np.int64)), torch.from_numpy(g.astype(np.int64))


def load_nih_sex(data_dir=None, seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> dict:
    path = _dir(data_dir) / "nih_cxr14_sample1000_64" / "nih_cxr14_sample1000_64.npz"
    if not path.is_file():
        raise FileNotFoundError(f"NIH sample not found at {path}; pass data_dir or set MEDQUANT_DATA_DIR")
    with np.load(path, allow_pickle=False) as z:
        images, labels, sex, pid = z["images"], z["labels"], z["sex"], z["patient_id"]
    split = nih_patient_split(pid, seed, fractions)
    out = {s: _pack(images[split == s], labels[split == s], sex[split == s]) for s in SPLITS}
    out["info"] = {"name": "NIH ChestX-ray14 sample (normal vs abnormal)", "classes": ["normal", "abnormal"],
                   "groups": ["F", "M"], "split": f"by patient_id, seed {seed}, {fractions}", "path": str(path)}
    return out


def _cache_dir(cache_dir) -> Path:
    return Path(cache_dir) if cache_dir is not None else Path(os.path.expanduser("~/.cache/medquant"))


def load_ham10000_sex(data_dir=None, size: int = 64, keep_unknown: bool = False, cache_dir=None,
                      progress: bool = True) -> dict:
    root = _dir(data_dir) / "ham10000_lesion_subset_224"
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"HAM10000 metadata not found at {meta}; pass data_dir or set MEDQUANT_DATA_DIR")
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    cache = _cache_dir(cache_dir) / f"ham10000_{size}.npz"
    images = None
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if list(z["image_id"]) == [r["image_id"] for r in rows]:
                images = z["images"]
    if images is None:
        from PIL import Image

        it = rows
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(rows, desc=f"HAM10000 -> {size}px", unit="img")
        images = np.empty((len(rows), size, size, 3), np.uint8)
        for i, r in enumerate(it):
            with Image.open(root / r["path"]) as im:
                im.draft("RGB", (size, size))
                images[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, images=images, image_id=np.array([r["image_id"] for r in rows]))
            os.replace(tmp, cache)
        except OSError:
            pass
    sex_map = {"female": 0, "male": 1, "unknown": 2}
    sex = np.array([sex_map.get(r["sex"], 2) for r in rows])
    label = np.array([int(r["label"]) for r in rows])
    split = np.array([r["split"] for r in rows])
    keep = np.ones(len(rows), bool) if keep_unknown else sex != 2
    out = {s: _pack(images[(split == s) & keep], label[(split == s) & keep], sex[(split == s) & keep])
           for s in SPLITS}
    out["info"] = {"name": "HAM10000 (7 classes)", "classes": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
                   "groups": ["female", "male"] + (["unknown"] if keep_unknown else []),
                   "split": "metadata split (stratified 70/10/20, seed 0)", "path": str(root)}
    return out


DATASETS = {"nih": load_nih_sex, "ham10000": load_ham10000_sex}
