"""Speed of ComplexityScorer.metrics vs a per-image scikit-image loop computing the same five metrics.

Same run, same machine, same images: the Kermany pediatric chest X-rays of the test split at 224x224
(uint8 gray). Loading/decoding is excluded from every timing. Baselines:

* ``skimage x1``: :func:`medquant.complexity.reference.reference_metrics` in a loop, one process;
* ``skimage x2``: the same loop split over a 2-process ``multiprocessing`` pool (warm pool; pickling
  of the images counted), so that our use of 2 torch threads is not mistaken for algorithmic speed.

Ours: ``ComplexityScorer().metrics(uint8 tensor (N, 224, 224))`` with torch threads = 2 (and 1, for
reference). On CUDA (when available): input already on the GPU, and including the host-to-device copy.
Each timing is the median of ``--repeats`` runs (the scikit-image loop runs once per repeat on
``--n-ref`` images). Writes JSON to ``benchmarks/results/complexity_speed_{cpu,gpu}.json`` and prints a table.

    python -m benchmarks.complexity_speed [--data-dir DIR] [--n 624] [--n-ref 160] [--repeats 3]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common.datasets import use_data_dir
from benchmarks.common.env import hardware, versions

REPO = Path(__file__).resolve().parents[1]


def _ref_chunk(images):
    from medquant.complexity.reference import reference_metrics

    return [reference_metrics(im) for im in images]


CPU_TIMES: dict = {}


def _time(fn, repeats: int, label: str | None = None) -> tuple[float, object]:
    """Median wall time of ``repeats`` runs; with ``label`` also records this process's median CPU time."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if label:
        CPU_TIMES[label] = statistics.median(cpu)
    return statistics.median(times), out


def load_kermany(data_dir: Path, n: int) -> np.ndarray:
    from medquant.data import load_image_folder

    imgs, _ = load_image_folder(data_dir / "kermany_pediatric_cxr_224", split="test", limit=n, gray=True)
    return np.stack([im if im.ndim == 2 else im[..., 0] for im in imgs])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--n", type=int, default=624, help="images for the torch timings (test split has 624)")
    ap.add_argument("--n-ref", type=int, default=160, help="images for the scikit-image timings")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--skip-cpu", action="store_true", help="only the GPU part")
    args = ap.parse_args(argv)

    from medquant.complexity import ComplexityScorer

    data_dir = use_data_dir(args.data_dir)
    images = load_kermany(data_dir, args.n)
    n = len(images)
    ref_imgs = images[: args.n_ref]
    torch.set_num_threads(args.threads)
    hw = {**hardware(platform=platform.platform(), load_average_at_start=list(os.getloadavg())),
          "versions": versions("skimage")}
    result = {
        "benchmark": "complexity_speed",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hw,
        "data": f"kermany_pediatric_cxr_224 test split, first {n} images (index.csv order), 224x224 uint8 gray",
        "seeds": "none needed: deterministic images and algorithms",
        "repeats": args.repeats,
        "n_images_torch": n,
        "n_images_skimage": len(ref_imgs),
    }
    rows = []
    scorer = ComplexityScorer()
    x = torch.from_numpy(images)
    if not args.skip_cpu:
        # correctness check on the same images
        ref_vals = np.asarray(_ref_chunk(ref_imgs[:32]))
        ours_vals = scorer.metrics(x[:32]).numpy()
        result["max_abs_diff_vs_skimage_first32"] = dict(
            zip(ComplexityScorer.METRIC_NAMES, np.abs(ours_vals - ref_vals).max(0).tolist()))

        t1, _ = _time(lambda: _ref_chunk(ref_imgs), args.repeats, "skimage_1proc")
        sk1 = len(ref_imgs) / t1
        with mp.get_context("spawn").Pool(2) as pool:
            pool.map(_ref_chunk, [ref_imgs[:2], ref_imgs[2:4]])  # warm up both workers

            def two_proc():
                half = (len(ref_imgs) + 1) // 2
                return pool.map(_ref_chunk, [ref_imgs[:half], ref_imgs[half:]])

            t2, _ = _time(two_proc, args.repeats)
        sk2 = len(ref_imgs) / t2
        rows += [("skimage loop, 1 process", sk1), ("skimage loop, 2 processes", sk2)]
        scorer.metrics(x[:16])  # warm-up
        cpu = {}
        for th in sorted({1, args.threads}):
            torch.set_num_threads(th)
            t, _ = _time(lambda: scorer.metrics(x), args.repeats, f"torch_{th}threads")
            cpu[th] = n / t
            rows.append((f"medquant torch CPU, {th} thread{'s' if th > 1 else ''}", n / t))
        torch.set_num_threads(args.threads)
        result["cpu"] = {
            "images_per_s": {"skimage_1proc": sk1, "skimage_2proc": sk2,
                             **{f"torch_{k}threads": v for k, v in cpu.items()}},
            "speedup_vs_skimage_1proc": cpu[args.threads] / sk1,
            "speedup_vs_skimage_2proc": cpu[args.threads] / sk2,
            # wall-clock numbers suffer when other jobs share the cores; CPU time of this process is a
            # contention-robust view of the work per image (single-process pipelines only)
            "cpu_ms_per_image": {"skimage_1proc": 1e3 * CPU_TIMES["skimage_1proc"] / len(ref_imgs),
                                 **{f"torch_{k}threads": 1e3 * CPU_TIMES[f"torch_{k}threads"] / n for k in cpu}},
        }
        _write(result, Path(args.out_dir) / "complexity_speed_cpu.json")

    if torch.cuda.is_available():
        dev = torch.device("cuda")
        gsc = ComplexityScorer().to(dev)
        reps = max(4, n and 4096 // n)
        xg = x.repeat(reps, 1, 1).to(dev)  # >= 4096 images so the GPU is busy
        gsc.metrics(xg[:64])
        torch.cuda.synchronize()

        def on_device():
            out = gsc.metrics(xg)
            torch.cuda.synchronize()
            return out

        def with_copy():
            out = gsc.metrics(x.repeat(reps, 1, 1))  # host tensor: copied to the GPU inside
            torch.cuda.synchronize()
            return out

        tg, outg = _time(on_device, args.repeats)
        tc, _ = _time(with_copy, args.repeats)
        diff = (outg[:n].cpu() - scorer.metrics(x)).abs().max(0).values.tolist()
        result["gpu"] = {
            "device": torch.cuda.get_device_name(0),
            "n_images": int(xg.shape[0]),
            "images_per_s": {"on_device": xg.shape[0] / tg, "including_host_copy": xg.shape[0] / tc},
            "max_abs_diff_vs_cpu": dict(zip(ComplexityScorer.METRIC_NAMES, diff)),
        }
        rows += [(f"medquant torch GPU ({result['gpu']['device']}), data on GPU", xg.shape[0] / tg),
                 ("medquant torch GPU, incl. host->device copy", xg.shape[0] / tc)]
        _write(result, Path(args.out_dir) / "complexity_speed_gpu.json")
    else:
        print("CUDA not available: GPU part skipped")

    base = result.get("cpu", {}).get("images_per_s", {}).get("skimage_1proc")
    print(f"\n{'pipeline':58s} {'images/s':>10s} {'vs skimage x1':>14s}")
    for name, ips in rows:
        sp = f"{ips / base:.1f}x" if base else "-"
        print(f"{name:58s} {ips:10.1f} {sp:>14s}")
    return 0


def _write(result: dict, path: Path) -> None:
    result["load_average_at_write"] = list(os.getloadavg())  # other jobs on the machine skew timings
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
