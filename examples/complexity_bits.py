"""Score how complex each image of a PNG / JPEG / DICOM folder is and pick a bit-width per image.

    python examples/complexity_bits.py                          # real pediatric chest X-rays (Kermany, test split)
    python examples/complexity_bits.py /path/to/dicom_or_png_folder --fit-on /path/to/calibration_folder
    python examples/complexity_bits.py --smoke                  # a few images, for CI

Five metrics per image (entropy, Sobel edge density, intensity std, box-counting fractal dimension, LBP
entropy), normalised on a calibration set and averaged into a score; quartiles of the calibration scores split
images into 4 levels, and each level gets a bit-width (default 2 / 4 / 8 / float). Writes a CSV (name, metrics,
score, level, bits). Hand the levels to ``medquant.AdaptiveQuantizer(model, scorer=scorer)`` to run a model with
these per-image activation bits. Note the measured result: on our data, complexity-chosen bits did *not* beat the
same bits assigned at random (docs/results/adaptive.md) - check that control on your own data before relying
on it.
"""
from __future__ import annotations

import argparse
import csv

import numpy as np

from medquant import ComplexityScorer
from medquant.adaptive import DEFAULT_BIT_MAP
from medquant.complexity import METRIC_NAMES
from medquant.data import default_data_dir, load_image, load_images, read_index


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", help="images to score: a folder (PNG/JPEG/DICOM, with or without index.csv), "
                                            "an .npz or a CSV index (default: Kermany chest X-rays, test split)")
    p.add_argument("--fit-on", help="calibration images (default: the same collection's train split)")
    p.add_argument("--data-dir", help="default: $MEDQUANT_DATA_DIR")
    p.add_argument("--limit", type=int, default=400, help="at most this many images to score and to calibrate on")
    p.add_argument("--out", default="complexity_bits.csv")
    p.add_argument("--smoke", action="store_true", help="a few images only (CI)")
    args = p.parse_args()
    if args.smoke:
        args.limit = 12
    if args.folder:
        images, names = load_images(args.folder, limit=args.limit)
        calibration, _ = load_images(args.fit_on or args.folder, limit=args.limit)
    else:  # an evenly spaced subset of each split (the index lists all normal X-rays first)
        root = default_data_dir(args.data_dir) / "kermany_pediatric_cxr_224"

        def spaced(split: str) -> list[dict]:
            rows = read_index(root / "index.csv", split=split)
            return rows[::max(1, len(rows) // args.limit)][:args.limit]

        test_rows = spaced("test")
        images, names = [load_image(root / r["path"]) for r in test_rows], [r["path"] for r in test_rows]
        calibration = [load_image(root / r["path"]) for r in spaced("train")]

    # calibrate the normalisation and the level thresholds, then score (batched in torch; uint8 or [0, 1] input)
    scorer = ComplexityScorer(n_levels=4).fit(calibration)
    metrics = scorer.metrics(images)            # (N, 5) raw metrics
    score = scorer.score(metrics=metrics)       # (N,) weighted mean of the normalised metrics
    level = scorer.levels(metrics=metrics)      # (N,) 0 = simplest quarter of the calibration images
    bits = np.array([DEFAULT_BIT_MAP[int(lv)] for lv in level])   # level -> activation bits (32 = float)

    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", *METRIC_NAMES, "score", "level", "bits"])
        for i, name in enumerate(names):
            w.writerow([name, *(f"{float(v):.5g}" for v in metrics[i]), f"{float(score[i]):.5g}", int(level[i]),
                        int(bits[i])])
    print(f"scored {len(names)} images (calibrated on {len(calibration)}); wrote {args.out}")
    for lv, b in DEFAULT_BIT_MAP.items():
        sel = np.asarray(level) == lv
        print(f"  level {lv} -> {'float' if b >= 16 else f'{b}-bit'}: {int(sel.sum()):4d} images, "
              f"mean score {float(np.asarray(score)[sel].mean()) if sel.any() else float('nan'):.3f}")
    quantized = bits[bits < 16]
    print(f"{(bits < 16).mean():.0%} of the images run quantized (mean {quantized.mean():.2f} bits among them)"
          if len(quantized) else "no image falls into a quantized level")


if __name__ == "__main__":
    main()
