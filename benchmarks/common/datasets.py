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
* :func:`load_kermany_224` - the Kermany pediatric chest X-rays (``kermany_pediatric_cxr_224``, index.csv:
  path, split, label, md5) at their stored 224x224, gray **uint8** ``(N, 1, 224, 224)`` tensors and int64 labels
  (0 normal, 1 pneumonia), splits train (5,216) / test (624). The JPEGs are RGB with three equal channels; the
  gray value is that channel (an image whose channels differ is refused). Decoded once and cached as an
  uncompressed ``kermany_224.npz`` (about 0.3 GB) in ``cache_dir``, reused while its paths and md5 column equal
  the index's; ``verify_md5=True`` also hashes every file against the index. Kept as uint8 (5,840 images are
  1.2 GB as float32): convert and normalise per batch.

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


KERMANY_SIZE = 224


def _kermany_gray(path: Path) -> np.ndarray:
    """One Kermany JPEG as gray uint8 (224, 224): the shared channel of its RGB (or its single L channel)."""
    from medquant.data import load_image

    im = load_image(path)
    if im.ndim == 3:
        if not (np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 0], im[..., 2])):
            raise ValueError(f"{path}: the three colour channels differ; the Kermany loader expects grayscale "
                             "content (stored as L or as RGB with equal channels)")
        im = im[..., 0]
    if im.shape != (KERMANY_SIZE, KERMANY_SIZE) or im.dtype != np.uint8:
        raise ValueError(f"{path}: {im.dtype} image of shape {im.shape}; expected uint8 "
                         f"{KERMANY_SIZE}x{KERMANY_SIZE}")
    return im


def load_kermany_224(data_dir=None, cache_dir=None, verify_md5: bool = False, progress: bool = True) -> dict:
    """Kermany chest X-rays at 224 px as gray uint8: ``{split: (x uint8 (N, 1, 224, 224), y int64 (N,))}`` for
    every split of ``index.csv`` (train, test), plus ``"info"``; see the module doc.

    Raises:
        FileNotFoundError: no ``kermany_pediatric_cxr_224/index.csv`` under the data directory.
        ValueError: a file's md5 differs from the index (``verify_md5``), an image is not 224x224 uint8
            grayscale, or the index lacks a column (path, split, label) or has a label other than 0 / 1.
    """
    from medquant.data import read_index

    root = _dir(data_dir) / "kermany_pediatric_cxr_224"
    index = root / "index.csv"
    if not index.is_file():
        raise FileNotFoundError(f"Kermany index not found at {index}; pass data_dir or set MEDQUANT_DATA_DIR")
    rows = read_index(index)
    missing = {"path", "split", "label"} - set(rows[0] if rows else ())
    if missing:
        raise ValueError(f"{index}: missing column(s) {sorted(missing)}; expected path, split, label[, md5]")
    paths = np.array([r["path"] for r in rows])
    md5 = np.array([r.get("md5", "") for r in rows])
    bad = sorted({r["label"] for r in rows} - {"0", "1"})
    if bad:
        raise ValueError(f"{index}: labels {bad}; expected 0 (normal) or 1 (pneumonia)")
    if verify_md5:
        import hashlib

        for p, h in zip(paths, md5):
            got = hashlib.md5((root / p).read_bytes()).hexdigest()
            if got != h:
                raise ValueError(f"{root / p}: md5 {got} differs from the index's {h!r}")
    cache = _cache_dir(cache_dir) / "kermany_224.npz"
    images = None
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if np.array_equal(z["path"], paths) and np.array_equal(z["md5"], md5):
                images = z["images"]
    if images is None:
        it = paths
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(paths, desc="Kermany 224px", unit="img")
        images = np.empty((len(paths), 1, KERMANY_SIZE, KERMANY_SIZE), np.uint8)
        for i, p in enumerate(it):
            images[i, 0] = _kermany_gray(root / p)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, images=images, path=paths, md5=md5)
            os.replace(tmp, cache)
        except OSError:
            pass
    label = np.array([int(r["label"]) for r in rows], np.int64)
    split = np.array([r["split"] for r in rows])
    out: dict = {}
    for s in dict.fromkeys(split):
        idx = np.flatnonzero(split == s)
        contiguous = idx[-1] - idx[0] + 1 == len(idx)  # a slice is a view: no copy of the images
        sel = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
        out[str(s)] = (torch.from_numpy(images[sel]), torch.from_numpy(label[sel]))
    out["info"] = {"name": "Kermany pediatric chest X-rays (normal vs pneumonia), 224 px gray",
                   "classes": ["normal", "pneumonia"], "splits": {s: len(out[s][1]) for s in out},
                   "path": str(root), "md5_verified": verify_md5}
    return out


DATASETS = {"nih": load_nih_sex, "ham10000": load_ham10000_sex}
