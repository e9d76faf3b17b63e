"""Small loaders for the image data sets medquant's tests and benchmarks use; point them at your own copies.

* :func:`default_data_dir` - an explicit ``data_dir`` argument, else ``$MEDQUANT_DATA_DIR``; a
  :class:`DataDirNotSet` error (a ``FileNotFoundError``) naming both when neither is given.
* :func:`load_npz_split` - MedMNIST-style ``.npz`` files (keys ``{split}_images`` / ``{split}_labels``, or
  ``images`` / ``labels`` / ``split`` arrays as in the NIH sample). Loading one split refuses it when one of its
  patients (a :data:`PATIENT_ID_COLUMNS` array, or ``group_key=``) is under another split, and warns
  (:class:`DuplicateImageWarning`) when some of its images are byte-identical to images of another split.
* :func:`read_index` / :func:`load_image_folder` - a folder of image files listed in an index CSV with a path
  column (and optionally a split column), like ``kermany_pediatric_cxr_224/index.csv`` or HAM10000's
  ``metadata.csv``. Selecting one split refuses train/test leakage: rows of that split whose image, or whose
  patient (a :data:`PATIENT_ID_COLUMNS` column, or ``group_column=``), the index also lists under another split
  (``allow_leakage=True`` loads it anyway).
* :func:`read_dicom` / :func:`dicom_to_array` - DICOM files (needs the optional ``dicom`` extra: pydicom).
* :func:`load_images` - any of the above from one path (npz file, folder, CSV, DICOM file), for the CLI.
* :func:`load_iu_reports` - the Indiana University chest X-ray reports (:mod:`medquant.data.reports`).

Every loader expands a leading ``~`` in the paths it is given; relative paths are relative to the working
directory. Single-channel image files keep the values they store (16-bit, 32-bit and floating-point files are not
reduced to 8 bits; see :func:`load_image`). Index CSVs may start with a UTF-8 byte order mark (spreadsheet "CSV
UTF-8" exports). A file is read as DICOM when its suffix is ``.dcm`` / ``.dicom`` or, whatever its name, when it
starts with the DICOM preamble (``DICM`` at byte 128), as PACS exports named ``IM0001`` or by UID do.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from .location import DataDirNotSet, default_data_dir
from .reports import Report, default_reports_path, load_iu_reports, report_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
DICOM_SUFFIXES = (".dcm", ".dicom")
PATIENT_ID_COLUMNS = ("patient_id", "PatientID", "Patient ID", "subject_id", "participant_id", "lesion_id")
"""Index columns read as patient (group) ids by the split leakage check of :func:`load_image_folder`.

Matched ignoring case, spaces, underscores and hyphens (``PATIENT_ID``, ``patient-id`` and ``Patient ID`` are the
same name): ``patient_id`` (the NIH ChestX-ray14 sample's ``metadata.csv``), ``PatientID`` (the DICOM keyword),
``Patient ID`` (NIH's ``Data_Entry_2017.csv``), ``subject_id`` (MIMIC), ``participant_id`` (BIDS) and
``lesion_id`` (HAM10000: several images of one lesion). Every such column of an index is checked."""

__all__ = [
    "PATIENT_ID_COLUMNS",
    "DataDirNotSet",
    "DuplicateImageWarning",
    "Report",
    "default_data_dir",
    "default_reports_path",
    "dicom_to_array",
    "image_splits",
    "list_image_files",
    "load_image",
    "load_image_folder",
    "load_images",
    "load_iu_reports",
    "load_npz_split",
    "read_dicom",
    "read_index",
    "report_split",
]


def load_npz_split(path, split: str | None = "test", with_labels: bool = False, allow_leakage: bool = False,
                   group_key: str | None = None):
    """Images (N, H, W[, C]) of one split of an npz file; with ``with_labels`` also the labels.

    Supports MedMNIST keys (``test_images``, ``test_labels``) and flat files with ``images``/``labels`` and a
    per-image ``split`` array. ``split=None`` or ``"all"`` loads every image of a flat file, or every split of
    a MedMNIST file concatenated in train, val, test order.

    Split leakage: loading one split checks the whole file (every split) first.

    * Patients: the split is refused (``ValueError``) when one of its patients also has images under another
      split. The ids are the non-empty values (as strings, surrounding spaces dropped; NaN skipped) of the array
      ``group_key``, or when it is None of the first :data:`PATIENT_ID_COLUMNS` name (matched as index columns
      are: ignoring case, spaces, underscores, hyphens) that the file holds as an array: one id per image of a
      flat file (``patient_id`` in the NIH sample), or ``{split}_{name}`` per split of a MedMNIST-style file.
      The message counts the leaked patients out of the split's, and per other split, and names up to five of
      them, as :func:`load_image_folder` does for an index CSV. A file without such an array is not checked for
      patients (MedMNIST files have none).
    * Byte-identical images: an image of the split whose bytes (and shape and dtype) equal those of an image under
      another split gives a :class:`DuplicateImageWarning` counting them (out of the split's, and per other
      split) with up to five examples (``test_images[3] = train_images[7]``), and the split still loads. It is a
      warning, not a refusal, because the official MedMNIST files hold a few: PneumoniaMNIST 8 val images that
      are train images (its test split shares none), BreastMNIST 1 test image that is a train image (labelled
      the other class); refusing them would refuse the standard benchmarks while moving their scores by under
      one image in a hundred. Duplicates within one split are not reported (the Kermany source data has some).

    ``allow_leakage=True`` loads the split without either check (and without reading the other splits). Loading
    everything (``split=None`` / ``"all"``) holds nothing out and is not checked.

    Args:
        path: the ``.npz`` file.
        split: ``"train"``, ``"val"``, ``"test"``, or None / ``"all"``.
        with_labels: also return the labels (None when the file has none).
        allow_leakage: load a split even though its patients (or images) are also under another split.
        group_key: the array of patient (or other group) ids for the leakage check (for a MedMNIST-style file
            the per-split arrays ``{split}_{group_key}``); None: the first :data:`PATIENT_ID_COLUMNS` name present.

    Returns:
        The images, or ``(images, labels)``; labels come back as stored (MedMNIST's are ``(N, 1)``).

    Raises:
        ValueError: the file is not an ``.npz`` archive, or its labels (or patient ids) do not match its images one
            to one (a different first dimension); the split shares patients with another split (see above).
        KeyError: the split or the image array is missing (the message lists the splits the file has), or
            ``group_key`` is not an array of the file (the message lists its arrays).
    """
    path = _path(path)
    _check_npz(path)
    check = split not in (None, "all") and not allow_leakage
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if group_key is not None and group_key not in keys and not any(k.endswith(f"_{group_key}") for k in keys):
            raise KeyError(f"{path} has no array {group_key!r} (group_key; arrays: {sorted(keys)})")
        if split not in (None, "all") and f"{split}_images" in keys:
            images = z[f"{split}_images"]
            labels = z[f"{split}_labels"] if f"{split}_labels" in keys else None
            if check:
                _check_npz_leakage(path, z, str(split), group_key, None, images)
        elif split in (None, "all") and any(k.endswith("_images") for k in keys):
            parts = [s for s in ("train", "val", "test") if f"{s}_images" in keys]
            images = np.concatenate([z[f"{s}_images"] for s in parts])
            labels = (np.concatenate([z[f"{s}_labels"] for s in parts])
                      if all(f"{s}_labels" in keys for s in parts) else None)
        elif "images" in keys:
            images = z["images"]
            labels = z["labels"] if "labels" in keys else None
            if split not in (None, "all"):
                if "split" not in keys:
                    raise KeyError(f"{path} has no per-image 'split' array; use split=None")
                splits = z["split"].astype(str)
                if len(splits) != len(images):
                    raise ValueError(f"{path}: {len(images)} images but {len(splits)} entries in its 'split' array "
                                     "(expected one split per image)")
                sel = splits == split
                if not sel.any():
                    raise KeyError(f"no images with split {split!r} in {path} (splits: "
                                   f"{', '.join(sorted(set(splits.tolist()))) or 'none'})")
                if labels is not None and len(labels) != len(images):
                    raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels (expected one label per "
                                     "image)")
                if check:
                    _check_npz_leakage(path, z, str(split), group_key, splits, images)
                images = images[sel]
                labels = labels[sel] if labels is not None else None
        else:
            have = sorted(k[: -len("_images")] for k in keys if k.endswith("_images"))
            raise KeyError(f"{path} has no split {split!r}: no '{split}_images' or 'images' array (splits: "
                           f"{', '.join(have) or 'none'}; keys: {sorted(keys)})")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels for split {split!r} (expected one "
                         "label per image)")
    return (images, labels) if with_labels else images


class DuplicateImageWarning(UserWarning):
    """A loaded split holds images byte-identical to images under another split of the same file.

    Given by :func:`load_npz_split` (see there); ``allow_leakage=True`` skips the check.
    """


def _check_npz_leakage(path: Path, z, split: str, group_key: str | None, splits: np.ndarray | None,
                       images: np.ndarray) -> None:
    """Refuse ``split`` of the npz ``z`` when one of its patients is under another split, else warn when one of its
    images is byte-identical to an image under another split; see :func:`load_npz_split`. ``splits`` is the
    per-image split array of a flat file (``images`` every image of it), None for a MedMNIST-style file
    (``images`` the split's ``{split}_images``)."""
    keys = list(z.files)
    if splits is not None:  # flat: one id per image
        name = group_key if group_key is not None else _patient_array(keys, "")
        if name is not None and name not in keys:
            raise KeyError(f"{path} has no array {name!r} (group_key; arrays: {sorted(keys)})")
        groups = None
        if name is not None:
            ids = z[name]
            if len(ids) != len(splits):
                raise ValueError(f"{path}: {len(splits)} images but {len(ids)} entries in its {name!r} array "
                                 "(expected one patient id per image)")
            groups = [(str(s), pid) for s, pid in zip(splits.tolist(), _ids(ids)) if pid]
    else:  # MedMNIST-style: {split}_images, {split}_{name}
        stems = [k[: -len("_images")] for k in keys if k.endswith("_images")]
        suffix = group_key if group_key is not None else _patient_array(keys, f"{split}_")
        name = None if suffix is None else f"{split}_{suffix}"
        if name is not None and name not in keys:
            raise KeyError(f"{path} has no array {name!r} (group_key={group_key!r} for split {split!r}; arrays: "
                           f"{sorted(keys)})")
        groups = None
        if name is not None:
            groups = []
            for s in stems:
                if f"{s}_{suffix}" in keys:
                    ids = z[f"{s}_{suffix}"]
                    n = len(images) if s == split else len(z[f"{s}_images"])
                    if len(ids) != n:
                        raise ValueError(f"{path}: {n} images in {s + '_images'!r} but {len(ids)} entries in "
                                         f"{s + '_' + suffix!r} (expected one patient id per image)")
                    groups += [(s, pid) for pid in _ids(ids) if pid]
    if name is not None and groups is not None:
        problem = _patient_leaks(groups, split, f"array {name!r}")
        if problem:
            raise ValueError(f"{path}: split {split!r} leaks into other splits of the file (the same patient on "
                             f"both sides makes results on it optimistic): {problem}. Re-split the file so that "
                             "every patient is in one split (split by patient), or pass allow_leakage=True to load "
                             "the split as it is")
    # byte-identical images: (split, label) of every image, by content
    # (split, label, image) of every image of the file; a MedMNIST-style file's other splits read one at a time
    every = (((str(s), f"images[{i}]", row) for i, (s, row) in enumerate(zip(splits.tolist(), images)))
             if splits is not None else
             ((s, f"{s}_images[{i}]", row) for s in stems
              for i, row in enumerate(images if s == split else z[f"{s}_images"])))
    where: dict[bytes, dict[str, str]] = {}  # digest -> {split: first image label}
    mine: list[tuple[str, bytes]] = []
    for s, label, row in every:
        d = _digest(row)
        where.setdefault(d, {}).setdefault(s, label)
        if s == split:
            mine.append((label, d))
    dups = [(label, {s: lab for s, lab in where[d].items() if s != split}) for label, d in mine]
    dups = [(label, o) for label, o in dups if o]
    if dups:
        examples = ", ".join(f"{label} = " + ", ".join(o[s] for s in sorted(o)) for label, o in dups[:_EXAMPLES])
        warnings.warn(f"{path}: {len(dups)} of the {len(mine)} images of split {split!r} are byte-identical to "
                      f"images under another split ({_per_split(o for _, o in dups)}; e.g. {examples}{_more(dups)}); "
                      "loaded anyway, but results on those images are optimistic when a model saw their copies. "
                      "Pass allow_leakage=True to load the split without this check",
                      DuplicateImageWarning, stacklevel=3)


def _patient_array(keys: list[str], prefix: str) -> str | None:
    """The first :data:`PATIENT_ID_COLUMNS` name (matched as columns are) among the arrays ``keys`` that start with
    ``prefix``, without the prefix; None when there is none."""
    for col in PATIENT_ID_COLUMNS:
        for k in sorted(keys):
            if k.startswith(prefix) and _group_key(k[len(prefix):]) == _group_key(col):
                return k[len(prefix):]
    return None


def _ids(arr: np.ndarray) -> list[str]:
    """Patient ids of an npz array as strings with surrounding spaces dropped; NaN (and empty strings) as ``""``."""
    if arr.dtype.kind == "f":
        return ["" if np.isnan(v) else str(v) for v in arr.tolist()]
    return [str(v).strip() for v in arr.tolist()]


def _digest(row: np.ndarray) -> bytes:
    """A 128-bit BLAKE2b digest of one image's shape, dtype and bytes (equal digests: byte-identical images)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{row.shape}{row.dtype.str}".encode())
    h.update(np.ascontiguousarray(row).tobytes())
    return h.digest()


def _check_npz(path: Path) -> None:
    """Refuse a file that is not a zip archive (every ``.npz`` is one) before numpy calls it pickled data."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise ValueError(f"{path} is not an .npz archive (no zip header): expected a file written by numpy.savez "
                         "with image arrays")


def read_index(csv_path, split: str | None = None, path_column: str = "path", group_column: str | None = None,
               allow_leakage: bool = False) -> list[dict]:
    """Rows of an index CSV (dicts), optionally only those whose ``split`` column equals ``split``.

    The file is read as UTF-8; a leading byte order mark (as spreadsheet programs write) is dropped. Selecting a
    ``split`` is how a held-out split is picked, so it checks the whole index for split leakage exactly as
    :func:`load_image_folder` does (an image path, or a patient of ``group_column`` / the
    :data:`PATIENT_ID_COLUMNS` columns, also under another split) and refuses a leaking split unless
    ``allow_leakage=True``. Two rows of the selected split naming the same file (normalised path: ``./a.png`` is
    ``a.png``) are refused as :func:`load_image_folder` and :func:`load_images` refuse them, with the same message.
    With ``split=None`` it is a plain reader: every row as it is, nothing checked (not even duplicate paths).

    Args:
        csv_path: the CSV file.
        split: keep only rows of this split (None: all rows).
        path_column: the column holding the image paths.
        group_column: the column of patient (or other group) ids for the leakage check; None: every column named
            as in :data:`PATIENT_ID_COLUMNS`.
        allow_leakage: return the rows of a split even though its images or patients are also under another split.

    Returns:
        The rows as dicts.

    Raises:
        KeyError: the CSV has no ``path_column`` column, or no ``split`` column when ``split`` is given (the
            message lists the columns).
        ValueError: a row has an empty or missing path, or (with ``split``) no split field (the message names its
            line); ``split`` is given and no row has it (the message lists the splits the CSV has); two rows of the
            split name the same file (the message names the paths and their CSV lines); the split leaks into another
            split (the message counts and names the leaked paths / patients).
        KeyError: ``group_column`` is not a column of the CSV (the message lists the columns).
    """
    csv_path = _path(csv_path)
    rows = _read_rows(csv_path, path_column)
    if group_column is not None and rows and group_column not in rows[0]:
        raise KeyError(f"{csv_path} has no {group_column!r} column (group_column; columns: {list(rows[0])})")
    if split is None:
        return rows
    kept = _keep_split(rows, split, csv_path)
    _refuse_duplicate_paths(csv_path, kept, split, path_column)  # as the loaders: each row of a split a distinct file
    if not allow_leakage:
        _refuse_split_leakage(csv_path, rows, split, path_column, group_column)
    return kept


def _read_rows(csv_path: Path, path_column: str) -> list[dict]:
    """Every row of the index CSV :func:`read_index` reads, checked as it checks them (no split selected)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if rows and path_column not in rows[0]:
        raise KeyError(f"{csv_path} has no {path_column!r} column (columns: {list(rows[0])})")
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        if not r[path_column]:
            raise ValueError(f"{csv_path} line {line}: empty {path_column!r} field (every row names an image file)")
    return rows


def _keep_split(rows: list[dict], split: str, csv_path: Path) -> list[dict]:
    """The rows of ``split`` among every row of ``csv_path`` (:func:`read_index`'s split selection and checks)."""
    if rows and "split" not in rows[0]:
        raise KeyError(f"{csv_path} has no 'split' column (columns: {list(rows[0])})")
    for line, r in enumerate(rows, start=2):
        if r["split"] is None:
            raise ValueError(f"{csv_path} line {line}: no 'split' field (the row is shorter than the header)")
    kept = [r for r in rows if r["split"] == split]
    if rows and not kept:
        have = ", ".join(sorted({r["split"] for r in rows}))
        raise ValueError(f"unknown split {split!r} in {csv_path}: its splits are {have}")
    return kept


def load_image(path) -> np.ndarray:
    """One image file as a numpy array with the values the file stores; DICOM via pydicom.

    8-bit gray and RGB files give uint8 ``(H, W)`` / ``(H, W, 3)``; single-channel files wider than 8 bits keep
    their values and a native-byte-order dtype: unsigned 16-bit (PNG, TIFF) uint16, signed 16-bit and 32-bit
    integer TIFFs (Pillow mode ``I``, e.g. CT numbers) int32, floating-point TIFFs (mode ``F``) float32. Other modes
    (palette, gray with alpha, RGBA, CMYK, 1-bit) are converted to uint8 RGB (alpha dropped). 16-bit-per-channel
    colour files (48-bit RGB PNG) are reduced to 8 bits by Pillow, which keeps the high byte (``v >> 8``).
    Files with several frames (multi-page TIFF, animated GIF / PNG / WebP) are refused rather than cut to their
    first frame; a JPEG's multi-picture (MPO) extras are ignored.

    Args:
        path: an image file (PNG, JPEG, TIFF...) or a DICOM file (``.dcm`` / ``.dicom``, or any name when the file
            starts with the DICOM preamble); ``~`` is expanded.

    Returns:
        The pixel array (DICOM: float64 in [0, 1], see :func:`dicom_to_array`).

    Raises:
        ValueError: a file with more than one frame; for DICOM see :func:`dicom_to_array`.
    """
    path = _path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES or (suffix not in IMAGE_SUFFIXES and _has_dicom_preamble(path)):
        return dicom_to_array(read_dicom(path))[0]
    from PIL import Image

    with Image.open(path) as im:
        frames = getattr(im, "n_frames", 1)
        if frames > 1 and im.format != "MPO":
            raise ValueError(f"{path} has {frames} frames (a multi-page or animated file); one image per file is "
                             "supported: save each frame as its own file")
        if im.mode in ("L", "RGB"):
            return np.asarray(im).copy()
        if im.mode == "I" or im.mode == "F" or im.mode.startswith("I;16"):
            arr = np.asarray(im)
            return arr.astype(arr.dtype.newbyteorder("="))  # a copy; big-endian data in native order
        return np.asarray(im.convert("RGB")).copy()


def _has_dicom_preamble(path: Path) -> bool:
    """True when ``path`` is a file with ``DICM`` at byte 128 (a DICOM Part 10 file, whatever its name)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _path(path) -> Path:
    """``path`` as a ``Path`` with a leading ``~`` expanded (relative paths stay relative to the working directory)."""
    return Path(path).expanduser()


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None (all images) or an integer >= 0, got {limit}")


def load_image_folder(root, index_csv: str | None = "index.csv", split: str | None = None,
                      limit: int | None = None, path_column: str = "path", gray: bool = False,
                      group_column: str | None = None, allow_leakage: bool = False):
    """Images listed in ``root/index_csv`` (paths relative to ``root``) -> (list of arrays, list of rows).

    With ``index_csv=None`` every image file under ``root`` is loaded (sorted); ``~`` in ``root`` is expanded. The
    default ``"index.csv"`` is optional: when ``root`` has no ``index.csv`` the folder is scanned as with ``None``
    (unless a ``split`` is asked for). Any other name must exist: a missing one (a typo) is refused, not replaced
    by a scan of the whole folder. The rows that are loaded (after ``split``) must name distinct files (paths
    compared after normalisation, so ``a.png`` and ``./a.png`` are the same file): a duplicate would load the same
    image twice and is refused. ``gray=True`` keeps only the first channel of RGB files whose three channels are
    identical (grayscale content stored as RGB).

    Split leakage: when a ``split`` is loaded from an index, the *whole* index is checked, and the split is
    refused when (a) any of its rows names an image (path normalised as above) that the index also lists under
    another split, or (b) any of its patients appears under another split. Patients are the non-empty values
    (surrounding spaces dropped) of the ``group_column``, or when it is None of every column named as in
    :data:`PATIENT_ID_COLUMNS` (``patient_id``, ``PatientID``, ``subject_id``...; none: only paths are checked).
    The error names up to five offending paths / patient ids with the other splits they are under, and counts
    them (leaked rows or patients out of the split's, and per other split). Fix the index (split by patient), or
    pass ``allow_leakage=True`` to load the split as it is (results on it are then optimistic). Loading the whole
    index (``split=None``) holds nothing out and is not checked for leakage.

    Args:
        root: the folder.
        index_csv: name of the index CSV inside ``root`` (None: scan the folder; the default ``"index.csv"``: use
            it when it exists, else scan).
        split: keep only this split of the index.
        limit: load at most this many images.
        path_column: the index column holding the paths.
        gray: keep one channel of grayscale content stored as RGB.
        group_column: the index column holding patient (or other group) ids for the leakage check; None: every
            column named as in :data:`PATIENT_ID_COLUMNS`.
        allow_leakage: load a split even though its images or patients are also under another split.

    Returns:
        ``(images, rows)``: the arrays and the index rows (or ``{"path": ...}`` per scanned file).

    Raises:
        FileNotFoundError: ``split`` is given but the index CSV does not exist, or an ``index_csv`` other than the
            default ``"index.csv"`` does not exist (the message lists the CSV files ``root`` has).
        ValueError: ``limit`` is negative, ``split`` is given with ``index_csv=None`` (a scanned folder has no
            splits), ``group_column`` is given with no index CSV, two loaded rows name the same file (the message
            names the paths and their CSV lines), or the split leaks into another split (see above); for the
            index itself see :func:`read_index`.
        KeyError: ``group_column`` is not a column of the index (the message lists the columns).
    """
    _check_limit(limit)
    root = _path(root)
    if index_csv is not None and index_csv != _DEFAULT_INDEX and not (root / index_csv).exists():
        have = sorted(p.name for p in root.glob("*") if p.is_file() and p.suffix.lower() == ".csv")
        there = f"the CSV files there: {', '.join(have)}" if have else f"{root} has no CSV file"
        raise FileNotFoundError(f"index CSV {root / index_csv} not found ({there}); pass index_csv=None to load "
                                "every image under the folder")
    if index_csv is not None and (root / index_csv).exists():
        index = _read_rows(root / index_csv, path_column)  # read once: the split's rows and the leakage check
        rows = index if split is None else _keep_split(index, split, root / index_csv)
        _refuse_duplicate_paths(root / index_csv, rows, split, path_column)
        if group_column is not None and rows and group_column not in rows[0]:
            raise KeyError(f"{root / index_csv} has no {group_column!r} column (group_column; columns: "
                           f"{list(rows[0])})")
        if split is not None and not allow_leakage:
            _refuse_split_leakage(root / index_csv, index, split, path_column, group_column)
        files = [root / r[path_column] for r in rows]
    else:
        if group_column is not None:
            raise ValueError(f"group_column={group_column!r} names a column of an index CSV; {root} has no "
                             f"{index_csv or 'index CSV'} to read it from (leave group_column out)")
        if index_csv is None and split is not None:
            raise ValueError(f"split {split!r} needs an index CSV with a split column; with index_csv=None every "
                             f"image under {root} is loaded (pass split=None)")
        if index_csv is not None and split is not None:
            raise FileNotFoundError(f"{root / index_csv} not found (needed to select split {split!r})")
        files = list_image_files(root)
        rows = [{"path": str(p.relative_to(root))} for p in files]
    if limit is not None:
        files, rows = files[:limit], rows[:limit]
    images = [_gray_if_equal_channels(load_image(f)) if gray else load_image(f) for f in files]
    return images, rows


_DEFAULT_INDEX = "index.csv"


def _refuse_duplicate_paths(csv_path: Path, rows: list[dict], split: str | None, path_column: str) -> None:
    """Refuse ``rows`` (those of ``csv_path`` kept for ``split``) that name one file twice; the message gives each
    duplicated path (normalised: ``./a.png`` is ``a.png``) with its CSV lines."""
    keys = [os.path.normpath(r[path_column]) for r in rows]
    if len(set(keys)) == len(keys):
        return
    lines: dict[str, list[int]] = {}
    for line, r in enumerate(read_index(csv_path, path_column=path_column), start=2):  # line 1 is the header
        if split is None or r.get("split") == split:
            lines.setdefault(os.path.normpath(r[path_column]), []).append(line)
    where = "; ".join(f"{p!r} at lines {', '.join(map(str, n))}" for p, n in lines.items() if len(n) > 1)
    in_split = f" in split {split!r}" if split is not None else ""
    raise ValueError(f"{csv_path} lists the same image more than once{in_split} (duplicate paths: {where}): "
                     "each loaded row must name a distinct file")


def _group_key(column: str) -> str:
    """``column`` lowercased without spaces, underscores and hyphens (how :data:`PATIENT_ID_COLUMNS` match)."""
    return re.sub(r"[\s_-]", "", column).lower()


_PATIENT_KEYS = frozenset(_group_key(c) for c in PATIENT_ID_COLUMNS)
_EXAMPLES = 5  # offending paths / patients a leakage message names


def _refuse_split_leakage(csv_path: Path, index: list[dict], split: str, path_column: str,
                          group_column: str | None) -> None:
    """Refuse ``split`` of ``csv_path`` (whose rows, every split, are ``index``) when one of its images (normalised
    path) or patients (``group_column``, or every :data:`PATIENT_ID_COLUMNS` column) is also under another split of
    the index; see :func:`load_image_folder`."""
    if not index:
        return
    mine = [(line, r) for line, r in enumerate(index, start=2) if r.get("split") == split]  # line 1: header
    problems = []
    under: dict[str, dict[str, int]] = {}  # normalised path -> {split: first line}
    for line, r in enumerate(index, start=2):
        under.setdefault(os.path.normpath(r[path_column]), {}).setdefault(str(r.get("split")), line)
    leaks = [(r[path_column], {s: n for s, n in under[os.path.normpath(r[path_column])].items() if s != split})
             for _, r in mine]
    leaks = [(p, others) for p, others in leaks if others]
    if leaks:
        examples = ", ".join(f"{p!r} also under " + ", ".join(f"{s!r} (line {n})" for s, n in sorted(o.items()))
                             for p, o in leaks[:_EXAMPLES])
        problems.append(f"{len(leaks)} of its {len(mine)} rows name images the index also lists under another "
                        f"split ({_per_split(o for _, o in leaks)}; e.g. {examples}{_more(leaks)})")
    columns = [group_column] if group_column is not None else [
        c for c in index[0] if isinstance(c, str) and _group_key(c) in _PATIENT_KEYS]
    for col in columns:
        groups = [(str(r.get("split")), pid) for r in index if (pid := (r.get(col) or "").strip())]
        if (problem := _patient_leaks(groups, split, f"column {col!r}")):
            problems.append(problem)
    if problems:
        raise ValueError(f"{csv_path}: split {split!r} leaks into other splits of the index (the same image or "
                         f"patient on both sides makes results on it optimistic): {'; '.join(problems)}. Fix the "
                         "index so that every image and every patient is in one split (split by patient), or pass "
                         "allow_leakage=True to load the split as it is")


def _patient_leaks(groups: list[tuple[str, str]], split: str, where: str) -> str | None:
    """``"2 of its 5 patients (<where>) also appear under another split (train 1, val 1; e.g. ...)"``, or None
    when no patient of ``split`` is under another split; ``groups`` holds ``(split, patient id)`` for every image
    (row) of the whole index or file, empty ids left out."""
    splits_of: dict[str, set[str]] = {}
    for s, pid in groups:
        splits_of.setdefault(pid, set()).add(s)
    patients = list(dict.fromkeys(pid for s, pid in groups if s == split))
    leaked = [(pid, splits_of[pid] - {split}) for pid in patients if splits_of[pid] - {split}]
    if not leaked:
        return None
    examples = ", ".join(f"{pid!r} also under " + ", ".join(map(repr, sorted(o))) for pid, o in leaked[:_EXAMPLES])
    return (f"{len(leaked)} of its {len(patients)} patients ({where}) also appear under another split "
            f"({_per_split(o for _, o in leaked)}; e.g. {examples}{_more(leaked)})")


def _per_split(others) -> str:
    """``'train 3, val 1'``: for each other split (sorted), how many of the leaks reach it."""
    counts = Counter(s for o in others for s in o)
    return ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))


def _more(items: list) -> str:
    return f" and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else ""


def _gray_if_equal_channels(im: np.ndarray) -> np.ndarray:
    """``im[..., 0]`` (2-D) when ``im`` is RGB with three identical channels (grayscale content), else ``im``."""
    if im.ndim == 3 and im.shape[-1] == 3 and np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(
            im[..., 0], im[..., 2]):
        return np.ascontiguousarray(im[..., 0])
    return im


def list_image_files(root) -> list[Path]:
    """Image and DICOM files under ``root`` (recursively), sorted.

    Args:
        root: a folder.

    Returns:
        Paths whose suffix is one of ``IMAGE_SUFFIXES`` or ``DICOM_SUFFIXES`` (case-insensitive), and other files
        that start with the DICOM preamble (``DICM`` at byte 128: PACS exports named ``IM0001`` or by UID), except
        ``DICOMDIR`` (a directory record, no image).
    """
    root = _path(root)
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and (p.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES
                       or (p.name.upper() != "DICOMDIR" and _has_dicom_preamble(p))))


# ------------------------------------------------------------------------------------------------ DICOM
def read_dicom(path):
    """Read a DICOM file with pydicom (optional dependency: ``pip install medquant[dicom]``).

    Args:
        path: the DICOM file.

    Returns:
        The pydicom dataset.

    Raises:
        ImportError: pydicom is not installed.
    """
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading DICOM needs pydicom: pip install 'medquant[dicom]'") from e
    return pydicom.dcmread(str(_path(path)))


def dicom_to_array(ds) -> tuple[np.ndarray, None]:
    """A pydicom dataset -> (float64 gray image in [0, 1], None).

    Steps: stored values v (``pixel_array``); modality values m = slope * v + intercept (RescaleSlope /
    RescaleIntercept, 1 / 0 when the element is missing or empty; an explicit slope of 0 is refused); the range
    of m is that of the stored range [0, 2^BitsStored - 1] (or [-2^(BitsStored-1), 2^(BitsStored-1) - 1] when
    PixelRepresentation = 1) mapped through the rescale; the image is m mapped linearly from that range to
    [0, 1]; MONOCHROME1 (white = low) is inverted, 1 - x. For a linear rescale with positive slope this equals
    (v - v_min) / (v_max - v_min), i.e. the bit depth is honoured (12-bit data is divided by 4095, not 65535).
    A Modality LUT Sequence, when present, replaces the rescale: m = LUT(v) (pydicom's ``apply_modality_lut``)
    and the range is [min, max] of the LUT values the stored range reaches. No VOI LUT or window is applied.
    Multi-frame data, colour (RGB) DICOM, float pixel data (Float / Double Float Pixel Data: no stored bit range
    to scale by) and datasets without pixel data are rejected; the messages name the file.

    Args:
        ds: a pydicom dataset.

    Returns:
        ``(image, None)``.

    Raises:
        ValueError: no pixel data, float pixel data, multi-frame or colour data, or a degenerate intensity range
            (``RescaleSlope`` 0, or a Modality LUT with one value).
    """
    where = f"DICOM {ds.filename}" if isinstance(getattr(ds, "filename", None), str) else "DICOM dataset"
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise ValueError(f"{where} has Float Pixel Data, which declares no stored bit range to scale to [0, 1]; "
                         "supported: integer Pixel Data (convert the floats to an image yourself)")
    if "PixelData" not in ds:
        raise ValueError(f"{where} has no pixel data (no Pixel Data element: a report, structured document or "
                         "DICOMDIR, not an image)")
    arr = np.asarray(ds.pixel_array)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"{where}: only single-frame grayscale DICOM is supported (shape {arr.shape}, "
                         f"PhotometricInterpretation {photometric})")
    bits = int(getattr(ds, "BitsStored", 8 * arr.dtype.itemsize))
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    vmin, vmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if "ModalityLUTSequence" in ds:
        apply_modality_lut = _pydicom_modality_lut()
        m = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        reach = np.arange(vmin, vmax + 1, dtype=np.int64) if bits <= 16 else arr
        values = np.asarray(apply_modality_lut(reach.astype(arr.dtype), ds), dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            raise ValueError(f"degenerate {where} intensity range: its Modality LUT maps every stored value to {lo}")
    else:
        raw_slope = getattr(ds, "RescaleSlope", None)
        slope = 1.0 if raw_slope is None or str(raw_slope).strip() == "" else float(raw_slope)  # missing: identity
        if slope == 0.0:
            raise ValueError(f"degenerate {where} intensity range: RescaleSlope is 0 (every pixel maps to the "
                             "intercept); expected a non-zero slope, or no RescaleSlope element for slope 1")
        raw_intercept = getattr(ds, "RescaleIntercept", None)
        intercept = 0.0 if raw_intercept is None or str(raw_intercept).strip() == "" else float(raw_intercept)
        m = arr.astype(np.float64) * slope + intercept
        lo, hi = sorted((vmin * slope + intercept, vmax * slope + intercept))
        if hi <= lo:
            raise ValueError(f"degenerate {where} intensity range (RescaleSlope 0?)")
    x = np.clip((m - lo) / (hi - lo), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        x = 1.0 - x
    return x, None


def _pydicom_modality_lut():
    """pydicom's ``apply_modality_lut`` (``pydicom.pixels`` from 3.0, ``pydicom.pixel_data_handlers.util`` before)."""
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return apply_modality_lut


# ------------------------------------------------------------------------------------------------ any path
def image_splits(path) -> list[str]:
    """The splits an image source holds, as :func:`load_images` reads them (its ``split`` argument).

    A folder with an ``index.csv`` and an index CSV: the values of its ``split`` column, in the order they first
    appear; an ``.npz``: the ``{split}_images`` arrays of a MedMNIST-style file (train, val, test first, then any
    other, by name), or the values of the per-image ``split`` array of a flat file (``images`` + ``split``).

    Args:
        path: an ``.npz`` file, a folder, an index CSV or one image / DICOM file (``~`` is expanded).

    Returns:
        The split names; ``[]`` for a source without splits (a folder without an index, an index without a
        ``split`` column, a flat ``.npz`` without a ``split`` array, one image).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError / KeyError: an index CSV or ``.npz`` that :func:`load_images` could not read either.
    """
    path = _path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        csv_path = path / "index.csv"
        if not csv_path.is_file():
            return []
    elif suffix == ".npz":
        _check_npz(path)
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            stored = {k[: -len("_images")] for k in keys if k.endswith("_images") and len(k) > len("_images")}
            if stored:
                first = [s for s in ("train", "val", "test") if s in stored]
                return first + sorted(stored - set(first))
            if "images" in keys and "split" in keys:
                return list(dict.fromkeys(z["split"].astype(str).tolist()))
        return []
    elif suffix == ".csv" and path.is_file():
        csv_path = path
    elif path.is_file():
        return []
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")
    rows = _read_rows(csv_path, "path")
    if not rows or "split" not in rows[0]:
        return []
    return list(dict.fromkeys(r["split"] for r in rows if r["split"]))


def load_images(path, split: str | None = None, limit: int | None = None, key: str | None = None,
                allow_leakage: bool = False):
    """Load images from an npz file, an image folder, an index CSV, or a single image / DICOM file.

    A folder may have an ``index.csv`` (path, label, split columns) or not (every image below it). Folder, index
    CSV and single-file images are read alike (:func:`load_image`), and an RGB image whose three channels are
    equal (grayscale content stored as RGB, e.g. the Kermany JPEGs) becomes a 2-D grayscale array; colour images
    stay ``(H, W, 3)``. A split of a folder's index or of an index CSV is refused when its images or patients
    (:data:`PATIENT_ID_COLUMNS`) are also under another split, as in :func:`load_image_folder`, and (as there) when
    two of the loaded rows name the same file; a split of an ``.npz`` is checked as :func:`load_npz_split` does
    (patients refused, byte-identical images across splits warned about).

    Args:
        path: an ``.npz`` file, a folder, an index CSV or one image / DICOM file (``~`` is expanded).
        split: the split to load (npz and indexed folders / CSVs).
        limit: load at most this many images.
        key: for an ``.npz``, the array to read instead of the split's images (so not with ``split``).
        allow_leakage: load a split of an index or an ``.npz`` even though its images or patients are also under
            another split.

    Returns:
        ``(images, names)``: a list of 2-D arrays (or one ``(N, H, W)`` array from an npz) and one name per
        image (its relative path, or its index).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        KeyError: ``key`` is not an array of the ``.npz`` (the message lists its arrays), or the split is missing.
        ValueError: ``limit`` is negative; an ``.npz`` that is not a zip archive; an option that would be ignored:
            ``key`` with ``split`` or for anything but an ``.npz``, ``split`` for a single image file (or for a
            folder without an index CSV); a split of an index or ``.npz`` that leaks into another split; two rows
            of an index CSV naming the same file.
    """
    _check_limit(limit)
    path = _path(path)
    suffix = path.suffix.lower()
    if key is not None and (suffix != ".npz" or path.is_dir()):
        raise ValueError(f"key={key!r} names an array of an .npz file; {path} is not one (leave key out)")
    if key is not None and split is not None:
        raise ValueError(f"give key (the array to read, {key!r}) or split ({split!r}), not both: key replaces the "
                         "split's images")
    if path.is_dir():
        images, rows = load_image_folder(path, split=split, limit=limit, gray=True, allow_leakage=allow_leakage)
        return images, [r.get("path", str(i)) for i, r in enumerate(rows)]
    if suffix == ".npz":
        if key is not None:
            _check_npz(path)
            with np.load(path, allow_pickle=False) as z:
                if key not in z.files:
                    raise KeyError(f"{path} has no array {key!r} (arrays: {sorted(z.files)})")
                images = z[key]
        else:
            images = load_npz_split(path, split=split if split is not None else "all", allow_leakage=allow_leakage)
        if limit is not None:
            images = images[:limit]
        return images, [f"{path.name}[{i}]" for i in range(len(images))]
    if suffix == ".csv":
        index = _read_rows(path, "path")
        rows = index if split is None else _keep_split(index, split, path)
        _refuse_duplicate_paths(path, rows, split, "path")  # as load_image_folder: each loaded row a distinct file
        if split is not None and not allow_leakage:
            _refuse_split_leakage(path, index, split, "path", None)
        if limit is not None:
            rows = rows[:limit]
        images = [_gray_if_equal_channels(load_image(path.parent / r["path"])) for r in rows]
        return images, [r["path"] for r in rows]
    if path.is_file():
        if split is not None:
            raise ValueError(f"split={split!r} selects images of an npz file or an index CSV; {path} is one image "
                             "(leave split out)")
        return [_gray_if_equal_channels(load_image(path))], [path.name]
    raise FileNotFoundError(f"no such file or folder: {path}")
