"""Benchmark the packed weight-only matmul kernels against torch's bf16 matmul (needs a CUDA GPU).

Usage::

    python -m benchmarks.kernels                       # full sweep
    python -m benchmarks.kernels --quick               # one shape, M in {1, 64}
    python -m benchmarks.kernels --bits 4 --group 128 --shapes 4096x4096 --ms 1 16

For every shape (N x K, from real models: 4096x4096, 8192x8192, 4096x14336 (down-proj: N=4096, K=14336) and
14336x4096 (up/gate-proj)), every M in {1, 16, 64, 256, 1024} and every (bits, group) it times, in the same run:

* ``medquant.kernels.packed_linear`` (Triton, autotuned; the first call tunes and is not timed),
* ``x @ W^T`` with a bf16 ``W`` of the same shape (cuBLAS).

Timing: each measurement replays a CUDA graph of one call (fallback: plain launches) ``--reps`` times, timed
with CUDA events around the replay only; before every replay a 256 MiB buffer is written (outside the timed
region) so neither the packed nor the bf16 weight is served from L2. The median is reported.

Reported per case: time (us), speed-up over bf16, achieved GB/s = bytes read and written (packed weight + scales
(+ zeros) + activations + output) / time, and the fraction of the GPU's peak memory bandwidth (H100 SXM
3.35 TB/s, H100 PCIe 2.0 TB/s, H200 4.8 TB/s, A100 80GB 2.0 TB/s; ``--peak-gbs`` overrides). Results are
written as JSON (GPU name, torch / triton versions, every row) to ``benchmarks/results/kernels_<gpu>.json``.
Without CUDA the script says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common.env import hardware, versions

SHAPES = {"4096x4096": (4096, 4096), "8192x8192": (8192, 8192), "4096x14336": (4096, 14336),
          "14336x4096": (14336, 4096)}
MS = (1, 16, 64, 256, 1024)
PEAK_GBS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
            ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("A10G", 600.0)]
FLUSH_BYTES = 256 * 1024 * 1024


def peak_bandwidth(name: str) -> float | None:
    for key, gbs in PEAK_GBS:
        if key.lower() in name.lower():
            return gbs
    return None


def make_weight(n: int, k: int, bits: int, group: int | None, device: str):
    """Random packed weight in the saved-file layout (format v1), built with medquant's own quantizer."""
    from medquant.kernels import PackedWeight
    from medquant.quant import QuantConfig, pack, quantize

    cfg = QuantConfig(bits, symmetric=bits > 3, scope="group" if group else "channel", group_size=group or 128)
    w = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
    q = quantize(w, cfg)
    return PackedWeight(pack(q.codes, bits), q.scales, q.zeros, bits, q.symmetric, cfg.scope, q.group_size, k)


class Timer:
    """Median time of ``fn`` with an L2 flush before each call, via a CUDA graph when capture works."""

    def __init__(self, reps: int, use_graphs: bool = True):
        self.reps = reps
        self.use_graphs = use_graphs
        self.flush_buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def _flush(self):
        self.flush_buf.fill_(0)  # a write pass over 256 MiB evicts the (50 MiB) L2

    def _time_events(self, body) -> list[float]:
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._flush()
            start.record()
            body()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return times

    def time_us(self, fn) -> tuple[float, str]:
        fn()  # warm-up (and autotune)
        torch.cuda.synchronize()
        if self.use_graphs:
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        fn()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                torch.cuda.synchronize()
                return statistics.median(self._time_events(graph.replay)), "cuda-graph"
            except Exception as exc:  # noqa: BLE001 - e.g. a kernel that cannot be captured
                print(f"  (CUDA graph capture failed: {type(exc).__name__}: {exc}; timing plain launches)")
                torch.cuda.synchronize()
        return statistics.median(self._time_events(fn)), "launches"


def bench_case(timer: Timer, n: int, k: int, m: int, bits: int, group: int | None, weights) -> dict:
    from medquant.kernels import packed_linear, select_regime

    qw, s, z = weights.qweight, weights.scales, weights.zeros
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02

    def run_packed():
        return packed_linear(x, weights, backend="triton")

    def run_bf16():
        return x @ w_bf16.t()

    # correctness guard against the torch reference before timing
    y = run_packed()
    y_ref = packed_linear(x, weights, backend="torch")
    rel = float((y.float() - y_ref.float()).norm() / y_ref.float().norm().clamp_min(1e-30))
    t_packed, how = timer.time_us(run_packed)
    t_bf16, _ = timer.time_us(run_bf16)
    zero_bytes = z.numel() * z.element_size() if z is not None else 0
    bytes_packed = qw.numel() * 4 + s.numel() * s.element_size() + zero_bytes + x.numel() * 2 + m * n * 2
    bytes_bf16 = w_bf16.numel() * 2 + x.numel() * 2 + m * n * 2
    return {
        "N": n, "K": k, "M": m, "bits": bits, "group": group or "channel", "regime": select_regime(m),
        "timing": how, "packed_us": t_packed, "bf16_us": t_bf16, "speedup": t_bf16 / t_packed,
        "packed_GBps": bytes_packed / t_packed / 1e3, "bf16_GBps": bytes_bf16 / t_bf16 / 1e3,
        "packed_bytes": bytes_packed, "bf16_bytes": bytes_bf16, "rel_err_vs_reference": rel,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--ms", nargs="+", type=int, default=list(MS))
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 2, 8])
    ap.add_argument("--group", nargs="+", default=["128"], help="group sizes, or 'channel'")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-graphs", action="store_true", help="time plain launches instead of CUDA graphs")
    ap.add_argument("--peak-gbs", type=float, default=None, help="peak memory bandwidth (GB/s) of this GPU")
    ap.add_argument("--quick", action="store_true", help="4096x4096, M in {1, 64}, 4-bit g128 only")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<gpu>.json)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the Triton kernels are only tested on CPU through TRITON_INTERPRET=1 - nothing to time here.",
              file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from medquant.kernels import interpreting

    if interpreting():
        print("TRITON_INTERPRET is set: timings would be of the interpreter. Unset it.", file=sys.stderr)
        return 2
    if args.quick:
        args.shapes, args.ms, args.bits, args.group = ["4096x4096"], [1, 64], [4], ["128"]
    gpu = torch.cuda.get_device_name()
    peak = args.peak_gbs or peak_bandwidth(gpu)
    print(f"GPU: {gpu}  peak bandwidth: {peak or 'unknown'} GB/s  torch {torch.__version__}  triton "
          f"{triton.__version__}")
    timer = Timer(args.reps, use_graphs=not args.no_graphs)
    rows = []
    hdr = (f"{'N x K':>12} {'M':>5} {'bits':>4} {'group':>7} {'regime':>6} {'packed us':>10} {'bf16 us':>9} "
           f"{'speedup':>7} {'GB/s':>7} {'%peak':>6}")
    print(hdr)
    for shape in args.shapes:
        n, k = SHAPES[shape]
        for bits in args.bits:
            for g in args.group:
                group = None if g == "channel" else int(g)
                weights = make_weight(n, k, bits, group, "cuda")
                for m in args.ms:
                    r = bench_case(timer, n, k, m, bits, group, weights)
                    r["peak_fraction"] = r["packed_GBps"] / peak if peak else None
                    rows.append(r)
                    frac = f"{100 * r['peak_fraction']:5.1f}%" if peak else "   n/a"
                    print(f"{shape:>12} {m:>5} {bits:>4} {r['group']!s:>7} {r['regime']:>6} "
                          f"{r['packed_us']:>10.1f} {r['bf16_us']:>9.1f} {r['speedup']:>6.2f}x "
                          f"{r['packed_GBps']:>7.0f} {frac}")
                    if r["rel_err_vs_reference"] > 1e-2:
                        print(f"  WARNING: relative error vs torch reference {r['rel_err_vs_reference']:.3g}")
                del weights
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                           f"kernels_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "gpu": gpu, "peak_GBps": peak, "cuda": torch.version.cuda, "versions": versions("triton"),
        "hardware": hardware(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reps": args.reps,
        "timing": "median of reps, L2 flushed (256 MiB write) before each rep, CUDA graphs unless --no-graphs",
        "rows": rows,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
