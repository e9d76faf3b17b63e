"""Which bfloat16 rounding moves a quantized model's next tokens: activations, weights or outputs of its linears.

The CPU backend computes quantized layers in a compute dtype (bfloat16 by default). Against the float32 reference
path of the same quantized model (``force_backend("torch")``: ``x @ ((u - z) * s)^T`` in float32), a bfloat16
execution can round three things per layer: its input ``x``, its dequantized weight ``W`` and its output ``y``.
This benchmark runs SmolLM2-135M quantized as ``benchmarks.cpu_inference`` makes it (head quantized unless
``--head float``; variants such as ``W2g32+gptq`` calibrated by GPTQ) with every
``QuantLinear`` replaced by a float32 emulation that rounds a chosen subset of ``{x, W, y}`` to bfloat16 and keeps
everything else in float32 (``W`` is the layer's exact float32 dequantized weight, rounded once where ``W`` is in
the subset), and reports, over held-out IU X-ray reports (teacher-forced, one forward over ``--tokens``
positions), the next-token agreement with the reference and the relative perplexity difference:

* ``exact`` (nothing rounded): the control of the emulation itself; it must give 100% and 0.00%;
* ``x``, ``W``, ``y`` alone, ``y@head`` / ``y@body`` (only the output head's logits, only the other linears'
  outputs), ``x+W`` (what a GEMM with float32 output would do), ``x+W+y`` (a bfloat16 GEMM);
* ``x16``: ``x`` as 16-bit integers per block of columns (``t * round(x / t)``, ``t`` the block's largest magnitude
  / 32767; blocks as the gemm path takes them), the weight exact, a float32 output: the gemm path's arithmetic;
  ``x18`` / ``x20``: the same with 18- / 20-bit integers (``t`` = largest magnitude / (2^(b-1) - 1)): how much
  finer than the gemm's 16 bits a model needs; ``x hi+lo``: ``x`` as the sum of two bfloat16 numbers
  (``hi = bf16(x)``, ``lo = bf16(x - hi)``: 16 significant bits of every element, relative to the element rather
  than to its block), what the native decode kernels take;
* with ``--where``: ``x16 per 64 / 32 / 16 columns`` (16-bit integers per smaller block), and ``x exact in <kind>``
  (``x`` exact in one kind of layer: down_proj, q/k/v, o_proj, gate/up, the head; 16-bit blocks elsewhere): whether
  finer activations are needed in a few layers only, or smaller blocks would do;
* with ``--outliers``: could the gemm keep 16-bit integers and reach 99% by treating large columns apart?
  ``x16, columns scaled by 2^-e (e <= E)``: per call, each column whose largest magnitude over the call's rows is
  ``2^e`` times (``e`` an integer, ``0 <= e <= E``) the median of its block's column maxima is divided by ``2^e``
  before the 16-bit blocks and multiplied back after (exact powers of two: what an integer kernel could fold into
  the weight codes as shifts, ``E = 3 / 5 / 7`` bounded by its int32 sums); ``x16, the K largest columns exact``:
  the ``K`` columns of largest magnitude over the call's rows kept exact (computed apart in float, as LLM.int8
  does), 16-bit blocks for the rest (``K = 8 / 32 / 64``);
* with ``--int8``: ``x8 per 32 / 128 / 256 columns``, ``x`` as 8-bit integers per block (``t`` = largest magnitude
  / 127; 128 columns: the AVX2 form's opt-in int8 activations, ``set_cpu_native4_activations("int8")``; 32:
  llama.cpp's Q8_0 blocks; 256: its Q8_K blocks): whether any block size of 8-bit activations keeps 99%; with the
  variant ``W4g128a8`` the fast decode path row is the int8 kernel itself;
* with ``--float-noise``: how far the float32 reference itself is from exact arithmetic, the floor under any
  kernel's agreement: ``linears in float64`` (every quantized layer's product ``x @ W^T`` exact in float64,
  rounded once to float32), ``K summed in two halves`` (each product as the float32 sum of its two halves of
  ``K``: only the order of the float32 additions changes), ``whole model in float64`` (every operation of the
  model in float64, the quantized layers' exact weights), and ``reference path, 1 thread`` (the reference path
  again with one thread, when more are set: the BLAS may split its sums by thread);
* ``fast prefill path``: the model through the CPU backend as it runs (one forward: at this ``M`` the gemm path
  where it runs, else the dense one; the JSON records ``prefill_kernel``); ``fast decode path``: the same positions one at a time through the KV cache (``M = 1``: native4 with
  its default split activations, or the weight-only kernel the row group takes).

What it decides: whether a next-token agreement of 99% with the float32 reference is reachable while any one of
the three is rounded to bfloat16 (if ``x`` alone or ``W`` alone already flips more than 1% of the tokens, no kernel
that rounds it can reach 99%, however it sums).

What a degenerate model does to it: round-to-nearest W2 of SmolLM2 (perplexity ~5e8) turns a 2^-9 rounding of
``x`` into a different next token at half the positions, so its agreement measures chaos rather than a kernel's
error. The control is a W2 model that predicts something (GPTQ, groups of 32, float head: ``--variants
W2g32+gptq --head float``): whether the fast paths keep 99% there.

Run: ``python -m benchmarks.bf16_rounding_attribution [--variants W4g128,W4g32,W3] [--head quantized|float]
[--prompts 20] [--tokens 64] [--where] [--outliers] [--int8] [--float-noise] [--out bf16_rounding_attribution]``; writes ``benchmarks/results/<out>.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common.env import run_record, save_results

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
#: the emulated roundings, in table order: label -> the subset of {"x", "w", "y"} rounded to bfloat16, "q<b>": x as
#: b-bit integers per block (16: what the CPU backend's gemm path takes), "s": x as two bfloat16 halves (the native
#: decode kernels' activations), and "@head" / "@body": only in the output head / only in the other linears
MODES = {"exact": "", "x": "x", "W": "w", "y": "y", "y@head": "y@head", "y@body": "y@body", "x+W": "xw",
         "x+W+y": "xwy", "x16": "q16", "x18": "q18", "x20": "q20", "x hi+lo": "s"}
#: ``--where``: where a model needs its activations finer than the gemm's 16 bits per block. "q16b<B>": 16-bit
#: integers per block of B columns (B dividing the gemm's block); "exact in <layers>": x exact in the layers of
#: those names, 16-bit integers per block (the gemm's arithmetic) in the others
_WHERE_LAYERS = {"down_proj": ("down_proj",), "q/k/v": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                 "gate/up": ("gate_proj", "up_proj"), "head": ("lm_head",)}
WHERE_MODES = {"x16 per 64 columns": "q16b64", "x16 per 32 columns": "q16b32", "x16 per 16 columns": "q16b16",
               **{f"x exact in {k}": "e:" + ",".join(v) for k, v in _WHERE_LAYERS.items()}}

#: ``--outliers``: 16-bit blocks with large columns treated apart. "c<E>": columns scaled by powers of two, at most
#: 2^-E; "o<K>": the K largest columns exact
OUTLIER_MODES = {**{f"x16, columns scaled by 2^-e (e <= {e})": f"c{e}" for e in (3, 5, 7)},
                 **{f"x16, the {k} largest columns exact": f"o{k}" for k in (8, 32, 64)}}

#: ``--int8``: x as 8-bit integers per block of 32 / 128 / 256 columns ("q8b<B>")
INT8_MODES = {f"x8 per {b} columns": f"q8b{b}" for b in (32, 128, 256)}

#: ``--float-noise``: the float32 reference's own distance from exact arithmetic. "f64": the layer's product in
#: float64; "h2": the float32 sum of the products of K's two halves. The two whole-model controls (the model in
#: float64, the reference path at one thread) are labels of :func:`attribute` rather than layer modes
FLOAT_MODES = {"linears in float64": "f64", "K summed in two halves": "h2"}
WHOLE_FLOAT64 = "whole model in float64"
ONE_THREAD = "reference path, 1 thread"


def _int_blocks(x: torch.Tensor, block: int, bits: int = 16) -> torch.Tensor:
    """``x`` as ``bits``-bit integers per row and block of ``block`` columns (``bits = 16``: the gemm path's
    input): ``t = max |x| / (2^(bits-1) - 1)`` and ``t * round_half_even(x / t)`` in float64 (a zero block stays
    zero), returned in float32."""
    k = x.shape[-1]
    pad = (-k) % block
    xp = F.pad(x.double(), (0, pad)).reshape(*x.shape[:-1], -1, block)
    t = xp.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    v = torch.where(t > 0, torch.round(xp / torch.where(t > 0, t, torch.ones_like(t))), torch.zeros_like(xp))
    return (v * t).reshape(*x.shape[:-1], -1)[..., :k].float()


def _scaled_columns(x: torch.Tensor, block: int, cap: int) -> torch.Tensor:
    """``x`` through 16-bit blocks after dividing column ``j`` by ``2^e_j`` and multiplying back after:
    ``e_j = clamp(floor(log2(cmax_j / median_block(cmax))), 0, cap)`` with ``cmax_j`` the largest ``|x[:, j]|`` over
    every row of the call (one exponent per column and call, as a kernel would fold into the weight codes)."""
    k = x.shape[-1]
    rows = x.reshape(-1, k).double()
    cmax = F.pad(rows.abs().amax(0), (0, (-k) % block)).reshape(-1, block)
    ref = cmax.median(-1, keepdim=True).values
    ok = (cmax > 0) & (ref > 0)
    e = torch.where(ok, torch.floor(torch.log2(torch.where(ok, cmax / ref, torch.ones_like(cmax)))), 0.0)
    scale = torch.exp2(e.clamp(0, cap)).reshape(-1)[:k]
    return (_int_blocks(rows / scale, block, 16).double() * scale).float().reshape(x.shape)


def _outlier_columns(x: torch.Tensor, block: int, count: int) -> torch.Tensor:
    """``x`` with its ``count`` columns of largest magnitude over the call's rows exact and the others through
    16-bit blocks (computed with those columns zeroed: they do not set the blocks' scales)."""
    k = x.shape[-1]
    rows = x.reshape(-1, k).float()
    keep = torch.zeros(k, dtype=torch.bool)
    keep[rows.abs().amax(0).topk(min(count, k)).indices] = True
    rest = _int_blocks(torch.where(keep, 0.0, rows), block, 16)
    return torch.where(keep, rows, rest).reshape(x.shape)


def _split_bf16(x: torch.Tensor) -> torch.Tensor:
    """``hi + lo`` with ``hi = bf16(x)``, ``lo = bf16(x - hi)``, in float32."""
    hi = _bf16(x)
    return hi + _bf16(x.float() - hi)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


class RoundedLinear(nn.Module):
    """``y = x @ W^T + b`` in float32 with ``x``, ``W``, ``y`` each rounded to bfloat16 when :attr:`mode` holds
    ``"x"``, ``"w"``, ``"y"``; ``W`` is the quantized layer's exact float32 weight (``to_float``)."""

    def __init__(self, layer: nn.Module, name: str = "") -> None:
        super().__init__()
        self.name = name
        self.head = name == "lm_head"
        cfg = layer.config  # the gemm path's block: the group, or 128 / 64 / 32 columns of it; 128 for one scale per row
        gs = cfg.group_size if cfg.scope == "group" else 128
        self.block = 128 if gs % 128 == 0 else 64 if gs % 64 == 0 else 32
        lin = layer.to_float(torch.float32)
        self.weight = lin.weight.detach().float()
        self.weight_bf16 = _bf16(self.weight)
        self.bias = None if lin.bias is None else lin.bias.detach().float()
        self.mode = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode, _, where = self.mode.partition("@")
        if where and (where == "head") != self.head:
            mode = ""
        if mode.startswith("e:"):  # exact in the named layers, the gemm's 16-bit blocks elsewhere
            mode = "" if self.name in mode[2:].split(",") else "q16"
        if "x" in mode:
            xx = _bf16(x)
        elif mode.startswith("q"):
            bits, _, block = mode[1:].partition("b")
            xx = _int_blocks(x, int(block) if block else self.block, int(bits))
        elif mode == "s":
            xx = _split_bf16(x)
        elif mode.startswith("c"):
            xx = _scaled_columns(x, self.block, int(mode[1:]))
        elif mode.startswith("o"):
            xx = _outlier_columns(x, self.block, int(mode[1:]))
        elif mode == "f64":
            y = F.linear(x.double(), self.weight.double(), None if self.bias is None else self.bias.double())
            return y.to(x.dtype)
        else:
            xx = x.float()
        if mode == "h2":
            h = xx.shape[-1] // 2
            y = F.linear(xx[..., :h], self.weight[:, :h]) + F.linear(xx[..., h:], self.weight[:, h:])
        else:
            y = F.linear(xx, self.weight_bf16 if "w" in mode else self.weight)
        if "y" in mode:
            y = _bf16(y)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def emulation(model: nn.Module) -> tuple[nn.Module, list[RoundedLinear]]:
    """A copy of ``model`` with every ``QuantLinear`` replaced by a :class:`RoundedLinear`, and those layers."""
    from medquant.quant import QuantLinear

    emu = copy.deepcopy(model)
    layers = []
    for parent in list(emu.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                r = RoundedLinear(child, name)
                setattr(parent, name, r)
                layers.append(r)
    return emu.eval(), layers


def attribute(model: nn.Module, sequences: list[torch.Tensor], decode_path: bool = True,
              where: bool = False, outliers: bool = False, float_noise: bool = False, int8: bool = False) -> dict:
    """Agreement and perplexity difference of each mode (module docstring) against the reference path.

    Args:
        model: a quantized causal LM (``QuantLinear`` layers).
        sequences: ``(1, T + 1)`` token ids each (inputs ``[:, :-1]``, targets ``[:, 1:]``).
        decode_path: also run the fast decode path (one position at a time through the KV cache).
        where: also the modes of :data:`WHERE_MODES`.
        outliers: also the modes of :data:`OUTLIER_MODES`.
        int8: also the modes of :data:`INT8_MODES`.
        float_noise: also the modes of :data:`FLOAT_MODES`, the model in float64 (:data:`WHOLE_FLOAT64`) and,
            when more than one thread is set, the reference path at one thread (:data:`ONE_THREAD`).

    Returns:
        ``{label: {"agreement", "ppl", "ppl_rel_diff"}}`` plus ``"reference_ppl"`` and ``"tokens"``.
    """
    from benchmarks.cpu_inference import _decode_path_logits
    from medquant.kernels import force_backend

    emu, layers = emulation(model)
    modes = {**MODES, **(WHERE_MODES if where else {}), **(OUTLIER_MODES if outliers else {}),
             **(INT8_MODES if int8 else {}), **(FLOAT_MODES if float_noise else {})}
    controls = []
    if float_noise:
        emu64, layers64 = emulation(model)
        emu64 = emu64.double()
        for layer in layers64:
            layer.mode = "f64"
        threads = torch.get_num_threads()
        controls = [WHOLE_FLOAT64] + ([ONE_THREAD] if threads > 1 else [])
    labels = list(modes) + controls + ["fast prefill path"] + (["fast decode path"] if decode_path else [])
    agree = dict.fromkeys(labels, 0)
    nll = dict.fromkeys(labels, 0.0)
    nll_ref, total = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            inp, tgt = ids[:, :-1], ids[:, 1:]
            with force_backend("torch"):
                ref = model(input_ids=inp).logits[0].float()
            nll_ref += float(F.cross_entropy(ref, tgt[0], reduction="sum"))
            total += tgt.numel()
            for label in labels:
                if label in modes:
                    for layer in layers:
                        layer.mode = modes[label]
                    lo = emu(input_ids=inp).logits[0].float()
                elif label == WHOLE_FLOAT64:
                    lo = emu64(input_ids=inp).logits[0].float()
                elif label == ONE_THREAD:
                    torch.set_num_threads(1)
                    try:
                        with force_backend("torch"):
                            lo = model(input_ids=inp).logits[0].float()
                    finally:
                        torch.set_num_threads(threads)
                elif label == "fast prefill path":
                    lo = model(input_ids=inp).logits[0].float()
                else:
                    lo = _decode_path_logits(model, inp)
                agree[label] += int((lo.argmax(-1) == ref.argmax(-1)).sum())
                nll[label] += float(F.cross_entropy(lo, tgt[0], reduction="sum"))
    ppl_ref = math.exp(nll_ref / total)
    out: dict = {"reference_ppl": ppl_ref, "tokens": total}
    for label in labels:
        ppl = math.exp(nll[label] / total)
        out[label] = {"agreement": agree[label] / total, "ppl": ppl, "ppl_rel_diff": abs(ppl - ppl_ref) / ppl_ref}
    return out


def markdown(result: dict) -> str:
    rows = result["rows"]
    labels = [k for k in rows[0]["modes"] if k not in ("reference_ppl", "tokens")] if rows else []
    lines = [f"# bfloat16 rounding attribution (benchmarks/bf16_rounding_attribution.py, {result['date']})", "",
             (f"SmolLM2-135M, head {result.get('head', 'quantized')}, {result['prompts']} held-out IU X-ray reports x {result['tokens']} "
              "teacher-forced positions; next-token agreement with the float32 reference path / perplexity "
              "difference from it. x, W, y: the linears' input, weight, output rounded to bfloat16 in a float32 "
              "emulation; the fast paths are the CPU backend as it runs."), "",
             "| variant | reference perplexity | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for r in rows:
        cells = [f"{r['modes'][k]['agreement'] * 100:.1f}% / {r['modes'][k]['ppl_rel_diff'] * 100:.2f}%"
                 for k in labels]
        lines.append(f"| {r['variant']} | {r['modes']['reference_ppl']:.4g} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="W4g128,W4g32,W3")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--where", action="store_true", help="also: 16-bit blocks of 64 / 32 / 16 columns, and x exact "
                    "in one kind of layer at a time (where a model needs finer activations than the gemm's)")
    ap.add_argument("--outliers", action="store_true", help="also: 16-bit blocks with large columns scaled by "
                    "powers of two, or kept exact (whether outlier handling reaches what finer integers do)")
    ap.add_argument("--float-noise", action="store_true", help="also: the float32 reference against float64 "
                    "arithmetic and other float32 summation orders (the floor under any kernel's agreement)")
    ap.add_argument("--int8", action="store_true", help="also: x as 8-bit integers per 32 / 128 / 256 columns (the "
                    "AVX2 form's opt-in int8 activations take 128)")
    ap.add_argument("--head", choices=("quantized", "float"), default="quantized",
                    help="quantize the output head with the variant's config (default) or leave it in float")
    ap.add_argument("--out", default="bf16_rounding_attribution")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks.common.lm import report_texts
    from benchmarks.cpu_inference import _make
    from medquant.kernels import (
        cpu_features,
        get_cpu_compute_dtype,
        get_cpu_native4_activations,
        get_cpu_prefill_kernel,
    )

    torch.manual_seed(SEED)
    load_before = list(os.getloadavg())
    rows = []
    for variant in args.variants.split(","):
        model, tok = _make("smollm2", variant, args.head == "quantized")
        texts = [t for t in report_texts("test") if len(tok(t)["input_ids"]) > args.tokens][: args.prompts]
        seqs = [tok(t, return_tensors="pt")["input_ids"][:, : args.tokens + 1] for t in texts]
        rows.append({"variant": variant, "native4_activations": get_cpu_native4_activations(),
                     "modes": attribute(model, seqs, where=args.where, outliers=args.outliers,
                                        float_noise=args.float_noise, int8=args.int8)})
        print(json.dumps(rows[-1]), flush=True)
        del model
    result = run_record("bf16_rounding_attribution", SEED, load_before, rows, prompts=args.prompts,
                        tokens=args.tokens, head=args.head, compute_dtype=str(get_cpu_compute_dtype()).removeprefix("torch."),
                        native4_activations=get_cpu_native4_activations(), prefill_kernel=get_cpu_prefill_kernel(),
                        cpu_features=cpu_features())
    save_results(RESULTS, args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
