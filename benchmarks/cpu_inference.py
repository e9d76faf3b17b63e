"""CPU inference speed of medquant-quantized causal LMs against float32 / bfloat16 (issue 18, item 6).

Models: SmolLM2-135M-Instruct (:func:`benchmarks.common.smollm2.load_smollm2`) and a ~1.1B LLaMA built from a
config (hidden 2048, 22 layers, intermediate 5632, 32 query / 4 key-value heads, vocabulary 32000, random
weights: speed only). Variants: ``float32``, ``bfloat16`` and ``W8`` (8-bit per channel), ``W4g128``,
``W4g32``, ``W3`` (group 128), ``W2`` (group 128), each with the output head quantized (``+head``) and left in
float (``skip=["lm_head"]``); ``<variant>+emb`` also quantizes the input embedding with the same config
(``quantize_embeddings_``; with ``+head`` a tied head shares the table, stored once); ``<variant>@bf16`` casts the
float model to bfloat16 first (``model.to(torch.bfloat16)``, then ``quantize_``: activations, norms and attention
run in bfloat16 like the ``bfloat16`` row, with no cast around each quantized layer). For the accuracy controls
of ``benchmarks.bf16_rounding_attribution``, built only when named: ``W2g32`` (2-bit, group 32), and
``<variant>+gptq``, calibrated by GPTQ (:data:`GPTQ_CALIBRATION`) instead of rounded to nearest; and
``W4g128cdbf16``, W4 g128 with ``compute_dtype="bfloat16"`` on the config (on a CPU without bfloat16 arithmetic:
the native kernel's 16-bit integer activations at small ``M``); ``W4g128a8``, the same with
``medquant.kernels.set_cpu_native4_activations("int8")`` (the AVX2 form's 8-bit activations per 128 columns: an
opt-in trading precision for decoding speed; elsewhere as ``W4g128cdbf16``). Quantization is nothing but
``medquant.quantize_`` (and ``quantize_embeddings_``) with the public config; the CPU kernels run with their default
compute dtype (bfloat16 where the CPU has native bf16) unless the variant's config names one.

Every row runs in its own subprocess (``--worker``), so that its resident memory is its own:

* ``decode_b1`` / ``decode_b8``: greedy decode tokens/s per sequence after a 32-token prompt (64 new tokens,
  KV cache), batch 1 and batch 8 (``agg_b8`` = 8 x per sequence);
* ``prefill``: tokens/s of one forward over 256 tokens, logits at every position; ``prefill_gen``: the same with
  ``logits_to_keep=1``, as ``generate`` prefills a prompt (the output head then runs for the last position only);
* ``weights_rss_mb``: resident set after building, quantizing and one warm-up decode step (the CPU kernels'
  repacked weights included) minus the resident set after importing torch and transformers; ``stored_mb``: the
  state dict's bytes (tied tensors once); ``repacked_mb``: the CPU kernels' cache
  (:func:`medquant.kernels.cpu_cache_bytes`). Quantized rows quantize the float model in the worker, so their
  resident set may include memory the allocator kept from the float weights: ``stored_mb + repacked_mb`` is exact;
* ``read_mb_per_token``: bytes of weights a decode step reads (every Linear's stored or repacked form, whichever
  the kernel reads; the input embedding reads one row); ``limit_tok_s`` = measured memory bandwidth / that.

``--prefill-ab W8,W4g128,...`` replaces the row table by a paired prefill measurement: one process holds the
bfloat16 model and one quantized variant at a time and times their 256-token prefills alternately
(``--ab-rounds`` rounds, the order swapped every round), so a shared machine's drift hits both sides of each pair
(:func:`prefill_ab`; writes ``cpu_inference_prefill_ab.{json,md}`` unless ``--out`` says otherwise).
``--decode-ab W4g128,...`` does the same for batch-1 decode: the float32 and bfloat16 models and one quantized
variant at a time decode 64 tokens each in turn, the order rotated every round (:func:`decode_ab`; writes
``cpu_inference_decode_ab.{json,md}``).

Repeats (``--repeats``, default 3): medians. The accuracy check (SmolLM2, quantized rows): perplexity of 20
held-out IU X-ray reports (64 tokens each, teacher-forced) through the fast path and through the torch reference
path (``force_backend("torch")``) of the same quantized model, relative difference (target < 0.5%), and
next-token agreement (target >= 99%), each for two fast paths: the prefill path (one forward over the 64
positions, ``M = 64``: the blocked matmul, else the dense path) and the decode path (``decode_path_*``: the same positions fed one at a
time through the KV cache, ``M = 1``: what ``generate`` runs for every new token; for a model cast to bfloat16 the
reference path then runs one position at a time too, since its attention rounds differently with a cache); next to
the control: the same dequantized weights run by plain torch in bfloat16 (``bf16_control_*``), how far any bf16
execution of that model lands from the float32 reference. A model cast to bfloat16 is also judged by its float32
copy (``float32_copy``: agreement of the fast paths and of its bfloat16 reference path with it).
Every row records ``os.getloadavg()`` before and after it ran (the machine may be shared).

    python -m benchmarks.cpu_inference              # full run (idle machine; ~1 h on 2 cores)
    python -m benchmarks.cpu_inference --quick      # SmolLM2, 4 variants, 1 repeat, short sequences
    MEDQUANT_CPU_COMPUTE_DTYPE=float32 python -m benchmarks.cpu_inference   # float32 compute (no bf16 CPU)

On a shared, loaded machine pass ``--threads 1``: OpenMP threads spinning on oversubscribed cores slow every row
down by an order of magnitude.

Writes ``benchmarks/results/cpu_inference{_quick}.json``, ``.md`` (table) and ``.png``; the JSON records the
versions, the hardware and :func:`medquant.kernels.cpu_features`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: the seed of the random weights (the ~1.1B model), the prompts and the token ids timed
SEED = 0
QUANT = {  # variant -> QuantConfig kwargs
    "W8": {"bits": 8, "scope": "channel"},
    "W4g128": {"bits": 4, "group_size": 128},
    "W4g32": {"bits": 4, "group_size": 32},
    "W3": {"bits": 3, "group_size": 128},
    "W2": {"bits": 2, "group_size": 128},
}
#: variants built only when named (not in the full run's default list)
EXTRA_QUANT = {"W2g32": {"bits": 2, "group_size": 32},
               "W4g128cdbf16": {"bits": 4, "group_size": 128, "compute_dtype": "bfloat16"},
               "W4g128a8": {"bits": 4, "group_size": 128, "compute_dtype": "bfloat16"}}
#: variants that set how the native kernels take activations (``set_cpu_native4_activations``). The setting is
#: global and read when a layer first runs: :func:`_make` switches it for such a variant and gives the caller's
#: setting back when it builds the next model (so a caller's own choice, e.g. aoti_decode's split control, holds
#: for every other variant)
NATIVE_ACTIVATIONS = {"W4g128a8": "int8"}
_activations_before: list[str] = []  # the setting a NATIVE_ACTIVATIONS variant replaced, until the next _make
#: ``<variant>+gptq``: calibration for GPTQ instead of round-to-nearest (training reports, never the test ones)
GPTQ_CALIBRATION = {"sequences": 32, "seq_len": 512, "batch": 4, "act_order": True}
LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
            "tie_word_embeddings": False}


def _trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so the resident set counts live memory."""
    import gc

    from benchmarks.common.memory import malloc_trim

    gc.collect()
    malloc_trim()


def _bandwidth_gbs(mb: int = 512) -> float:
    """Read bandwidth (GB/s): the best of 5 sums over a float32 tensor of ``mb`` MB."""
    import torch

    t = torch.ones(mb * 2**20 // 4)
    t.sum()
    best = min(_timed(lambda: t.sum()) for _ in range(5))
    return t.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------- worker
def _build(model_name: str):
    import torch

    if model_name == "smollm2":
        from benchmarks.common.smollm2 import load_smollm2

        model, tok = load_smollm2()
        return model, tok
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(LLAMA_1B if model_name == "llama1b" else
                         {**LLAMA_1B, "hidden_size": 512, "num_hidden_layers": 4, "intermediate_size": 1408,
                          "num_attention_heads": 8, "num_key_value_heads": 2}))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        rot = model.model.rotary_emb  # non-persistent buffers: rebuilt on CPU (to_empty left them empty)
        model.model.rotary_emb = type(rot)(config=cfg)
    return model.eval(), None


def _unique_bytes(tensors) -> int:
    """Bytes of distinct storages (tied weights counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _read_bytes_per_token(model) -> int:
    """Weight bytes a decode step reads: every (quantized) linear layer's kernel form, one embedding row."""
    import torch
    from torch import nn

    from medquant.kernels import cpu
    from medquant.quant import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for b in m.bit_groups:
                if 1 <= b <= 8:
                    w = m.packed_weight(b)
                    plan = cpu.cpu_plan(w)
                    if plan.gemv is not None:  # native4: the layer's own codes and float32 scales, zeros
                        read = (w.qweight, plan.gemv.s, plan.gemv.z)
                    elif plan.packed is None:  # reference / dense: the layer's own tensors
                        read = (w.qweight, w.scales, w.zeros)
                    else:  # the int4 / int8 kernel's repacked form
                        read = (plan.packed, *plan.by_dtype.values())
                    total += sum(t.numel() * t.element_size() for t in read if t is not None)
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, nn.Embedding):
            total += m.weight.shape[1] * m.weight.element_size()
        elif hasattr(m, "weight") and isinstance(m.weight, torch.Tensor) and m.weight.dim() == 1:
            total += m.weight.numel() * m.weight.element_size()  # norms
    return total


def _decode(model, ids, steps: int) -> float:
    from benchmarks.common.lm import time_decode

    return time_decode(model, ids, steps)


def _decode_path_logits(model, inp):
    """Teacher-forced logits ``(T, vocab)`` of ``inp (1, T)`` computed one position at a time through the KV
    cache: every quantized layer runs at ``M = 1``, the path ``generate`` takes for each new token."""
    import torch
    from transformers import DynamicCache

    from benchmarks.common.lm import cached_step

    cache, out = DynamicCache(), []
    for j in range(inp.shape[1]):
        o, cache = cached_step(model, inp[:, j:j + 1], cache)
        out.append(o.logits[0, -1].float())
    return torch.stack(out)


def _accuracy(model, tok, n_prompts: int, n_tokens: int) -> dict:
    """Teacher-forced next tokens and perplexity: fast path vs the torch reference path of the same model, for
    the prefill path (one forward over the 64 positions: ``M = 64``, the blocked matmul where the build has it,
    else the dense path) and for the decode path (the same positions one at a time through the KV cache:
    ``M = 1``, the weight-only kernels).

    A model cast to bfloat16 (``@bf16``) has a reference path in bfloat16 too (weights dequantized to bfloat16, a
    bfloat16 GEMM), so fast-vs-reference compares two roundings. For such a model ``float32_copy`` adds the
    float32 copy of the same model (same codes, scales and parameters, ``.float()``, reference path) as the
    judge: agreement with it of the fast path (prefill and decode) and of the bfloat16 reference path, which is
    what the model's own bfloat16 activations cost whatever runs its matmuls."""
    import copy

    import torch

    from benchmarks.common.lm import report_texts
    from medquant.kernels import force_backend

    texts = [t for t in report_texts("test") if len(tok(t)["input_ids"]) > n_tokens][:n_prompts]
    control = _plain_bf16_copy(model)
    float32 = next(model.parameters()).dtype == torch.float32
    copy32 = None if float32 else copy.deepcopy(model).float()
    agree = agree_ctl = agree_dec = total = 0
    nll_fast = nll_ref = nll_ctl = nll_dec = nll_ref_dec = 0.0
    f32 = {"fast": 0, "decode": 0, "reference": 0, "nll": 0.0}
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"][:, : n_tokens + 1]
            inp, tgt = ids[:, :-1], ids[:, 1:]
            fast = model(input_ids=inp).logits.float()
            with force_backend("torch"):
                ref = model(input_ids=inp).logits.float()
            ctl = control(input_ids=inp).logits.float()
            dec = _decode_path_logits(model, inp)
            ref_dec = ref[0]
            if not float32:  # in bfloat16 the cached attention rounds differently from one forward: compare like
                with force_backend("torch"):  # with like (in float32 the two agree to ~1e-6: tested)
                    ref_dec = _decode_path_logits(model, inp)
            if copy32 is not None:
                with force_backend("torch"):
                    r32 = copy32(input_ids=inp).logits.float()
                best = r32.argmax(-1)
                f32["fast"] += int((fast.argmax(-1) == best).sum())
                f32["reference"] += int((ref.argmax(-1) == best).sum())
                f32["decode"] += int((dec.argmax(-1) == best[0]).sum())
                f32["nll"] += float(torch.nn.functional.cross_entropy(r32[0], tgt[0], reduction="sum"))
            agree += int((fast.argmax(-1) == ref.argmax(-1)).sum())
            agree_dec += int((dec.argmax(-1) == ref_dec.argmax(-1)).sum())
            nll_dec += float(torch.nn.functional.cross_entropy(dec, tgt[0], reduction="sum"))
            nll_ref_dec += float(torch.nn.functional.cross_entropy(ref_dec, tgt[0], reduction="sum"))
            agree_ctl += int((ctl.argmax(-1) == ref.argmax(-1)).sum())
            total += tgt.numel()
            nll_fast += float(torch.nn.functional.cross_entropy(fast[0], tgt[0], reduction="sum"))
            nll_ref += float(torch.nn.functional.cross_entropy(ref[0], tgt[0], reduction="sum"))
            nll_ctl += float(torch.nn.functional.cross_entropy(ctl[0], tgt[0], reduction="sum"))
    import math

    ppl_fast, ppl_ref, ppl_ctl, ppl_dec, ppl_ref_dec = (math.exp(v / total) for v in
                                                        (nll_fast, nll_ref, nll_ctl, nll_dec, nll_ref_dec))
    out: dict = {}
    if copy32 is not None:
        ppl32 = math.exp(f32["nll"] / total)
        out["float32_copy"] = {"ppl": ppl32, "fast_agreement": f32["fast"] / total,
                               "fast_ppl_rel_diff": abs(ppl_fast - ppl32) / ppl32,
                               "decode_path_agreement": f32["decode"] / total,
                               "reference_agreement": f32["reference"] / total,
                               "reference_ppl_rel_diff": abs(ppl_ref - ppl32) / ppl32}
    return {**out, "prompts": len(texts), "tokens": total, "ppl_fast": ppl_fast, "ppl_reference": ppl_ref,
            "ppl_rel_diff": abs(ppl_fast - ppl_ref) / ppl_ref, "next_token_agreement": agree / total,
            "decode_path_ppl": ppl_dec, "decode_path_ppl_reference": ppl_ref_dec,
            "decode_path_ppl_rel_diff": abs(ppl_dec - ppl_ref_dec) / ppl_ref_dec,
            "decode_path_next_token_agreement": agree_dec / total,
            "bf16_control_ppl_rel_diff": abs(ppl_ctl - ppl_ref) / ppl_ref,
            "bf16_control_agreement": agree_ctl / total}


def _plain_bf16_copy(model):
    """The control of the accuracy check: the same dequantized weights run by plain torch in bfloat16 (every
    quantized layer replaced by its ``to_float(torch.bfloat16)``). How far *any* bf16 execution of this model
    lands from the float32 reference: a fast path no further from it than this control adds nothing of its own
    (a degenerate model, e.g. round-to-nearest W2 of SmolLM2, amplifies bf16 rounding chaotically)."""
    import copy

    import torch

    from medquant.quant import QuantLinear
    from medquant.quant.modules import QuantEmbedding

    ctl = copy.deepcopy(model)
    for parent in list(ctl.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (QuantLinear, QuantEmbedding)):
                setattr(parent, name, child.to_float(torch.bfloat16))
    return ctl.to(torch.bfloat16).eval()


def _generate_decode_tok_s(model, ids, steps: int, reps: int) -> tuple[float, float]:
    """Decode tokens/s through ``model.generate`` (greedy, always ``steps + 1`` new tokens, so a static cache keeps
    one length and a compiled step is never recompiled): ``steps`` / (generate time - the time of one plain
    forward over the prompt, the prefill), median of ``reps``. Also the first call's seconds (a compiled model
    compiles there)."""
    import torch

    def run() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    def prefill() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        return time.perf_counter() - t

    first = run()
    rates = [steps / max(run() - prefill(), 1e-9) for _ in range(reps)]
    return statistics.median(rates), first


def _static_compile_rows(model, prompt, spec: dict) -> dict:
    """Eager generate (dynamic cache) against ``static_decode_`` (static cache + compiled decode step)."""
    from medquant.quant.decode import static_decode_

    steps, reps = spec["new"], spec["repeats"]
    eager, _ = _generate_decode_tok_s(model, prompt[:1], steps, reps)
    static_decode_(model, compile=False)
    static, _ = _generate_decode_tok_s(model, prompt[:1], steps, reps)
    static_decode_(model)
    compiled, first = _generate_decode_tok_s(model, prompt[:1], steps, reps)
    return {"generate_eager_tok_s": eager, "generate_static_tok_s": static, "generate_static_compiled_tok_s": compiled,
            "compile_first_call_s": first}


def _make(model_name: str, variant: str, head: bool):
    """The model of one row: built (:func:`_build`), cast and quantized as ``variant`` says (module docstring);
    ``head``: the output head quantized too. Returns ``(model, tokenizer or None)``."""
    import torch

    import medquant as mq
    model, tok = _build(model_name)
    _variant_activations(variant.removesuffix("@bf16").removesuffix("+emb").removesuffix("+gptq"))
    if variant == "bfloat16":
        model = model.to(torch.bfloat16)
    elif variant != "float32":
        base = variant.removesuffix("@bf16")
        if base != variant:
            model = model.to(torch.bfloat16)
        base = base.removesuffix("+emb")
        skip = None if head else ["lm_head"]
        if base.endswith("+gptq"):
            if base != variant:
                raise ValueError(f"{variant!r}: +gptq is not combined with +emb or @bf16")
            _gptq(model, tok, mq.QuantConfig(**_quant_kwargs(base.removesuffix("+gptq"))), skip)
            return model.eval(), tok
        if variant.removesuffix("@bf16").endswith("+emb"):  # embeddings quantized too; a tied head shares the table (stored once)
            from medquant.quant.embeddings import quantize_embeddings_

            tied = bool(getattr(model.config, "tie_word_embeddings", False))
            # an untied head (the 1.1B model) is quantized as its own layer; a tied one shares the table's codes
            mq.quantize_(model, mq.QuantConfig(**_quant_kwargs(base)), skip=["lm_head"] if tied or not head else None)
            quantize_embeddings_(model, mq.QuantConfig(**_quant_kwargs(base)), tie=head and tied)
        else:
            mq.quantize_(model, mq.QuantConfig(**_quant_kwargs(base)), skip=skip)
    return model.eval(), tok


def _variant_activations(base: str) -> None:
    """Switch the native kernels' activations for a :data:`NATIVE_ACTIVATIONS` variant, after giving back the
    setting an earlier such variant replaced; any other variant leaves the caller's setting as it is."""
    from medquant.kernels import get_cpu_native4_activations, set_cpu_native4_activations

    if _activations_before:
        set_cpu_native4_activations(_activations_before.pop())
    want = NATIVE_ACTIVATIONS.get(base)
    if want is not None:
        _activations_before.append(get_cpu_native4_activations())
        set_cpu_native4_activations(want)


def _quant_kwargs(base: str) -> dict:
    """The ``QuantConfig`` keyword arguments of a variant name without suffixes (``QUANT`` / ``EXTRA_QUANT``)."""
    try:
        return {**QUANT, **EXTRA_QUANT}[base]
    except KeyError:
        raise ValueError(f"unknown variant {base!r}; known: " + ", ".join({**QUANT, **EXTRA_QUANT})) from None


def _gptq(model, tok, cfg, skip) -> None:
    """GPTQ in place (``gptq_quantize_sequential``, act_order, damp 0.01; layers outside the decoder blocks, the
    head among them unless skipped, by round-to-nearest) on :data:`GPTQ_CALIBRATION`'s sequences of concatenated
    IU training reports."""
    from benchmarks.ptq_methods import _lm_calibration
    from medquant.calibrate import gptq_quantize_sequential

    if tok is None:
        raise ValueError("+gptq needs a tokenizer for its calibration text (SmolLM2 only)")
    c = GPTQ_CALIBRATION
    calib, _ = _lm_calibration(tok, c["sequences"], c["seq_len"], c["batch"])
    gptq_quantize_sequential(model, cfg, calib, skip=skip, act_order=c["act_order"], device="cpu", progress=True)


def prefill_ab(spec: dict) -> dict:
    """Paired prefill timing in one process: the baseline model (``spec["base"]``: ``"bfloat16"``, the
    default, or ``"float32"``) against each quantized variant, alternating.

    Each round times one 256-token forward of both models, the order swapped every round, so slow drifts of a
    shared machine hit both sides of a pair alike; the ratio of a round is baseline seconds / variant seconds
    (above 1: the variant is faster). Reported per variant, for logits at every position (``all``) and with
    ``logits_to_keep=1`` (``gen``): the median of the rounds' ratios, the ratio of the two sides' minima and
    every round's seconds (``base_s``, ``variant_s``)."""
    import gc

    import torch

    from benchmarks.common.lm import time_prefill

    torch.set_num_threads(spec["threads"])
    base_name = spec.get("base", "bfloat16")
    if base_name not in ("bfloat16", "float32"):
        raise ValueError(f"prefill_ab's baseline is bfloat16 or float32, got {base_name!r}")
    base, _ = _make(spec["model"], base_name, False)
    ids = torch.randint(0, base.config.vocab_size, (1, spec["prefill"]), generator=torch.Generator().manual_seed(SEED))
    out: dict = {"model": spec["model"], "base": base_name, "rounds": spec["rounds"], "prefill": spec["prefill"],
                 "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "loadavg_before": os.getloadavg(),
                 "variants": {}}
    for variant, head in spec["ab_variants"]:
        qm, _ = _make(spec["model"], variant, head)
        res: dict = {"variant": variant, "head": head}
        with torch.no_grad():
            for mode, keep in (("all", None), ("gen", 1)):
                for m in (base, qm, base, qm):  # warm-up: kernels prepared, allocator settled
                    time_prefill(m, ids, keep)
                pairs = []
                for r in range(spec["rounds"]):
                    order = (base, qm) if r % 2 == 0 else (qm, base)
                    t = {id(m): time_prefill(m, ids, keep) for m in order}
                    pairs.append((t[id(base)], t[id(qm)]))
                ratios = [b / q for b, q in pairs]
                res[mode] = {"ratio_median": statistics.median(ratios),
                             "ratio_of_minima": min(b for b, _ in pairs) / min(q for _, q in pairs),
                             "base_s": [b for b, _ in pairs], "variant_s": [q for _, q in pairs]}
        out["variants"][f"{variant}{'+head' if head else ''}"] = res
        print(json.dumps({variant: {k: res[k]["ratio_median"] for k in ("all", "gen")}}), file=sys.stderr, flush=True)
        del qm
        gc.collect()
    out["loadavg_after"] = os.getloadavg()
    return out


def _rotated_rounds(timers: dict, rounds: int) -> dict:
    """``{name: [tokens/s per round]}``: every timer once per round, the order rotated by one every round (a shared
    machine's drift then reaches all of them alike)."""
    names = list(timers)
    rates: dict = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            rates[name].append(timers[name]())
    return rates


def _ratios(rates: dict, variant: str, bases) -> dict:
    """Per baseline: the median over rounds of ``variant``'s tokens/s over the baseline's, and the ratio of their
    best rounds."""
    return {f"vs_{base}": {"ratio_median": statistics.median(q / b for q, b in zip(rates[variant], rates[base])),
                           "ratio_of_maxima": max(rates[variant]) / max(rates[base])} for base in bases}


def decode_ab(spec: dict) -> dict:
    """Paired batch-1 decode in one process: the float32 and bfloat16 models and each quantized variant in turn.

    Each round decodes ``spec["new"]`` tokens after a ``spec["prompt"]``-token prompt (KV cache, greedy) with the
    three models, the order rotated every round, so a shared machine's drift reaches all three within seconds. A
    round's ratios are the variant's tokens/s over each baseline's (above 1: the variant is faster). Reported per
    variant and baseline: the median of the rounds' ratios, the ratio of the best rounds, and every round's
    tokens/s."""
    import gc

    import torch

    from benchmarks.common.lm import time_decode

    torch.set_num_threads(spec["threads"])
    bases = {name: _make(spec["model"], name, False)[0] for name in ("float32", "bfloat16")}
    vocab = bases["float32"].config.vocab_size
    ids = torch.randint(0, vocab, (1, spec["prompt"]), generator=torch.Generator().manual_seed(SEED))
    out: dict = {"model": spec["model"], "rounds": spec["rounds"], "prompt": spec["prompt"], "new": spec["new"],
                 "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "loadavg_before": os.getloadavg(),
                 "variants": {}}
    for variant, head in spec["ab_variants"]:
        qm, _ = _make(spec["model"], variant, head)
        models = {**bases, "variant": qm}
        with torch.no_grad():
            for m in models.values():  # warm-up: kernels prepared, allocator settled
                time_decode(m, ids, 8)
            rates = _rotated_rounds({name: (lambda m=m: time_decode(m, ids, spec["new"]))
                                     for name, m in models.items()}, spec["rounds"])
        res: dict = {"variant": variant, "head": head, "tok_s": rates, **_ratios(rates, "variant", bases)}
        out["variants"][f"{variant}{'+head' if head else ''}"] = res
        print(json.dumps({variant: {b: res[f"vs_{b}"]["ratio_median"] for b in bases}}), file=sys.stderr, flush=True)
        del qm, models
        gc.collect()
    out["loadavg_after"] = os.getloadavg()
    return out


def compile_ab(spec: dict) -> dict:
    """Paired batch-1 decode through ``generate``: eager against the documented recipe, a static KV cache and a
    compiled decode step (:func:`medquant.quant.decode.static_decode_`), in one process.

    Per quantized variant, each round times ``generate`` (``spec["new"]`` tokens after a ``spec["prompt"]``-token
    prompt, greedy; tokens/s of the decode steps: :func:`_generate_decode_tok_s`) of: the float32 and bfloat16
    models (eager), the bfloat16 model with the same recipe (the control: does compiling help the float model as
    much?), the variant eager, the variant compiled, and the variant compiled with the guards skipped
    (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: what evaluating the compiled step's guards costs;
    not a recommended setting), and with ``spec["cpp_wrapper"]`` the variant compiled with inductor's C++ wrapper
    (``static_decode_(..., options={"cpp_wrapper": True})``), the order rotated every round. Reported: every
    round's tokens/s, and for the variant eager and compiled the median of per-round ratios against each
    baseline; the first compiled call's seconds (compilation)."""
    import gc

    import torch

    from medquant.quant.decode import static_decode_

    torch.set_num_threads(spec["threads"])
    # one compiled graph per model shares each code object's cache: past the recompile limit (8) Dynamo would run
    # the later models eagerly, silently
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(spec["ab_variants"]) + 8)
    new, rounds = spec["new"], spec["rounds"]
    bases = {name: _make(spec["model"], name, False)[0] for name in ("float32", "bfloat16")}
    backend = spec.get("backend", "inductor")  # the tests pass "eager" (Dynamo's trace without code generation)
    bf16_compiled = static_decode_(_make(spec["model"], "bfloat16", False)[0], backend=backend)
    vocab = bases["float32"].config.vocab_size
    ids = torch.randint(0, vocab, (1, spec["prompt"]), generator=torch.Generator().manual_seed(SEED))

    def rate(model, skip_guards: bool = False) -> float:
        if not skip_guards:
            return _generate_decode_tok_s(model, ids, new, 1)[0]
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return _generate_decode_tok_s(model, ids, new, 1)[0]

    out: dict = {"model": spec["model"], "rounds": rounds, "prompt": spec["prompt"], "new": new,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "loadavg_before": os.getloadavg(),
                 "bfloat16_compile_first_call_s": _generate_decode_tok_s(bf16_compiled, ids, new, 1)[1],
                 "variants": {}}
    baselines = ("float32", "bfloat16", "bfloat16_compiled")
    for variant, head in spec["ab_variants"]:
        models = {**bases, "bfloat16_compiled": bf16_compiled, "eager": _make(spec["model"], variant, head)[0],
                  "compiled": static_decode_(_make(spec["model"], variant, head)[0], backend=backend)}
        if spec.get("cpp_wrapper"):
            models["compiled_cpp"] = static_decode_(_make(spec["model"], variant, head)[0], backend=backend,
                                                    options={"cpp_wrapper": True})
        with torch.no_grad():
            first = _generate_decode_tok_s(models["compiled"], ids, new, 1)[1]  # compiles
            first_cpp = _generate_decode_tok_s(models["compiled_cpp"], ids, new, 1)[1] if "compiled_cpp" in models \
                else None
            for m in models.values():  # warm-up: kernels prepared, allocator settled
                rate(m)
            timers = {name: (lambda m=m: rate(m)) for name, m in models.items()}
            timers["compiled_skip_guards"] = lambda m=models["compiled"]: rate(m, True)
            rates = _rotated_rounds(timers, rounds)
        res: dict = {"variant": variant, "head": head, "tok_s": rates, "compile_first_call_s": first,
                     "eager": _ratios(rates, "eager", baselines),
                     "compiled": _ratios(rates, "compiled", (*baselines, "eager")),
                     "compiled_skip_guards": _ratios(rates, "compiled_skip_guards", ("compiled",))}
        if first_cpp is not None:
            res["compiled_cpp"] = _ratios(rates, "compiled_cpp", (*baselines, "eager", "compiled"))
            res["compile_cpp_first_call_s"] = first_cpp
        out["variants"][f"{variant}{'+head' if head else ''}"] = res
        print(json.dumps({variant: {k: res["compiled"][k]["ratio_median"] for k in res["compiled"]}}),
              file=sys.stderr, flush=True)
        del models, timers
        gc.collect()
    out["loadavg_after"] = os.getloadavg()
    return out


def worker(spec: dict) -> dict:
    import torch
    import transformers  # noqa: F401  (part of the baseline)

    import medquant  # noqa: F401  (imported before the baseline is taken, as in every row)
    from medquant.kernels import cpu_cache_bytes, get_cpu_compute_dtype

    torch.set_num_threads(spec["threads"])
    _trim()
    from benchmarks.common.memory import rss_mb

    rss0 = rss_mb()
    model, tok = _make(spec["model"], spec["variant"], spec["head"])
    variant, head = spec["variant"], spec["head"]
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, vocab, (8, spec["prompt"]), generator=gen)
    with torch.no_grad():  # warm-up: builds the CPU kernels' repacked weights
        model(input_ids=prompt[:1, :2])
    _trim()
    row = {"model": spec["model"], "variant": variant, "head": head, "loadavg_before": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "weights_rss_mb": rss_mb() - rss0,
           "stored_mb": _unique_bytes(model.state_dict().values()) / 2**20,
           "repacked_mb": cpu_cache_bytes() / 2**20,
           "read_mb_per_token": _read_bytes_per_token(model) / 2**20,
           "compute_dtype": str(get_cpu_compute_dtype()).removeprefix("torch.")}
    reps = spec["repeats"]
    from benchmarks.common.lm import time_prefill

    long_ids = torch.randint(0, vocab, (1, spec["prefill"]), generator=gen)
    time_prefill(model, long_ids[:, :8])
    row["prefill_tok_s"] = statistics.median(spec["prefill"] / time_prefill(model, long_ids) for _ in range(reps))
    row["prefill_gen_tok_s"] = statistics.median(spec["prefill"] / time_prefill(model, long_ids, logits_to_keep=1)
                                                 for _ in range(reps))
    row["decode_b1_tok_s"] = statistics.median(_decode(model, prompt[:1], spec["new"]) for _ in range(reps))
    if spec["batch8"]:
        row["decode_b8_tok_s"] = statistics.median(_decode(model, prompt, spec["new"]) for _ in range(reps))
        row["decode_b8_agg_tok_s"] = 8 * row["decode_b8_tok_s"]
    if spec["accuracy"] and tok is not None and variant not in ("float32", "bfloat16"):
        try:
            row["accuracy"] = _accuracy(model, tok, spec["acc_prompts"], spec["acc_tokens"])
        except Exception as e:  # noqa: BLE001  (recorded in the row: the timings stand)
            row["accuracy_error"] = f"{type(e).__name__}: {e}"[:400]
    if variant in spec.get("static_compile", ()):
        try:
            row.update(_static_compile_rows(model, prompt, spec))
        except Exception as e:  # noqa: BLE001  (recorded in the row: the other measurements stand)
            row["static_compile_error"] = f"{type(e).__name__}: {e}"[:400]
    row["loadavg_after"] = os.getloadavg()
    return row


# ------------------------------------------------------------------------------------------- driver
def _rows(models, variants, heads: str = "both") -> list[tuple[str, str, bool]]:
    out = []
    for m in models:
        for v in variants:
            if v in ("float32", "bfloat16"):
                out.append((m, v, False))
            else:
                out.extend((m, v, h) for h in (True, False) if heads == "both" or h == (heads == "quantized"))
    return out


def _table(rows: list[dict], bw: float) -> str:
    cols = ["model", "variant", "head", "decode b1 tok/s", "decode b8 agg tok/s", "prefill tok/s",
            "prefill (gen) tok/s", "weights RSS MB", "stored MB", "repacked MB", "read MB/token", "limit tok/s",
            "decode vs fp32", "decode vs bf16", "prefill vs bf16", "prefill (gen) vs bf16", "RSS vs fp32",
            "ppl diff", "agreement", "decode path: ppl diff / agreement", "bf16 control: ppl diff / agreement",
            "vs float32 copy: fast / decode path / bf16 reference"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    base = {(r["model"], r["variant"]): r for r in rows if r["variant"] in ("float32", "bfloat16")}
    nan = float("nan")

    def ratio(r: dict, ref: dict | None, key: str) -> float:
        return r[key] / ref[key] if ref and key in ref and key in r and ref[key] else nan

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {'quantized' if r['head'] else 'float'} | error: "
                         f"{r['error'][:80]} |" + " |" * (len(cols) - 4))
            continue
        f32, b16 = base.get((r["model"], "float32")), base.get((r["model"], "bfloat16"))
        acc = r.get("accuracy", {})
        lines.append(
            f"| {r['model']} | {r['variant']} | {'quantized' if r['head'] else 'float'} | {r['decode_b1_tok_s']:.1f} "
            f"| {r.get('decode_b8_agg_tok_s', nan):.1f} | {r['prefill_tok_s']:.0f} | {r.get('prefill_gen_tok_s', nan):.0f}"
            f" | {r['weights_rss_mb']:.0f} | {r['stored_mb']:.0f} | {r['repacked_mb']:.0f} | "
            f"{r['read_mb_per_token']:.1f} | {bw * 1e3 / max(r['read_mb_per_token'], 1e-9) / 1.048576:.0f} | "
            f"{ratio(r, f32, 'decode_b1_tok_s'):.2f} | {ratio(r, b16, 'decode_b1_tok_s'):.2f} | "
            f"{ratio(r, b16, 'prefill_tok_s'):.2f} | {ratio(r, b16, 'prefill_gen_tok_s'):.2f} | "
            f"{ratio(r, f32, 'weights_rss_mb'):.2f} | "
            f"{acc.get('ppl_rel_diff', nan) * 100:.2f}% | {acc.get('next_token_agreement', nan) * 100:.1f}% | "
            f"{acc.get('decode_path_ppl_rel_diff', nan) * 100:.2f}% / "
            f"{acc.get('decode_path_next_token_agreement', nan) * 100:.1f}% | "
            f"{acc.get('bf16_control_ppl_rel_diff', nan) * 100:.2f}% / "
            f"{acc.get('bf16_control_agreement', nan) * 100:.1f}% | {_copy32_cell(acc.get('float32_copy'))} |")
    return "\n".join(lines)


def _copy32_cell(f32: dict | None) -> str:
    """The table's cell for a bfloat16 model judged by its float32 copy (:func:`_accuracy`): next-token agreement
    of the fast path, its decode path and the bfloat16 reference path; ``-`` for other models."""
    if not f32:
        return "-"
    return " / ".join(f"{f32[k] * 100:.1f}%" for k in ("fast_agreement", "decode_path_agreement",
                                                       "reference_agreement"))


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    models = sorted({r["model"] for r in ok})
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 3.5 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        rs = [r for r in ok if r["model"] == m]
        labels = [r["variant"] + ("+head" if r["head"] else "") for r in rs]
        axes[i][0].barh(labels, [r["decode_b1_tok_s"] for r in rs])
        axes[i][0].set_title(f"{m}: decode tok/s (batch 1)")
        axes[i][1].barh(labels, [r["prefill_tok_s"] for r in rs], color="tab:orange")
        axes[i][1].set_title(f"{m}: prefill tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _out_stem(out: str | None, default: str) -> Path:
    """Where ``--out`` writes: a bare name (no folder) under ``benchmarks/results/``, as the other benchmarks'
    ``--out``; a path with a folder as given; ``default`` under ``benchmarks/results/`` when ``out`` is empty."""
    if not out:
        return RESULTS / default
    path = Path(out)
    return RESULTS / path if path.parent == Path() else path


def _run_worker(spec: dict, on_error: dict) -> dict:
    """Run ``--worker spec`` in a fresh Python process and return the result it printed (its ``ROW`` line), or
    ``on_error`` with the tail of its output under ``"error"`` when it printed none."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_inference", "--worker", json.dumps(spec)],
                          check=False, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    return json.loads(found[-1][4:]) if found else {**on_error, "error": (proc.stderr or proc.stdout)[-600:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="SmolLM2 only, 4 variants, 1 repeat, short sequences")
    p.add_argument("--models", default=None, help="comma list of smollm2, llama1b, llama_small")
    p.add_argument("--variants", default=None, help="comma list of float32, bfloat16, " + ", ".join(QUANT)
                   + "; a quantized variant may end in +emb (embeddings quantized too) and/or @bf16 (model cast to "
                   "bfloat16 before quantizing)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--heads", choices=("both", "quantized", "float"), default="both",
                   help="quantized rows with the output head quantized, float, or both (default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--static-compile", default="", help="comma list of variants for which to also time generate() "
                   "eager vs a static KV cache vs static cache + compiled decode step "
                   "(medquant.quant.decode.static_decode_), e.g. W4g128,float32")
    p.add_argument("--data-dir", default=None, help="data folder with iu_xray_reports (default: $MEDQUANT_DATA_DIR, "
                   "else ../shared/data)")
    p.add_argument("--out", default=None, help="output stem: a bare name goes under benchmarks/results/, a path as "
                   "given (default benchmarks/results/cpu_inference[_quick])")
    p.add_argument("--prefill-ab", default="", help="comma list of quantized variants: instead of the row table, "
                   "time the 256-token prefill of each against the bfloat16 model in one process, alternating "
                   "(paired rounds; writes <out>.json/.md, default stem cpu_inference_prefill_ab)")
    p.add_argument("--prefill-ab-base", choices=("bfloat16", "float32"), default="bfloat16",
                   help="--prefill-ab: the baseline model (float32 on a CPU whose bfloat16 arithmetic is software, "
                   "where bfloat16 is a weak control)")
    p.add_argument("--decode-ab", default="", help="comma list of quantized variants: instead of the row table, "
                   "time batch-1 decode of each against the float32 and bfloat16 models in one process, in turn "
                   "(paired rounds; writes <out>.json/.md, default stem cpu_inference_decode_ab)")
    p.add_argument("--compile-ab", default="", help="comma list of quantized variants: instead of the row table, "
                   "time batch-1 decode through generate, eager against a static cache + compiled decode step "
                   "(static_decode_), with float32, bfloat16 and compiled bfloat16 baselines, in one process "
                   "(paired rounds; writes <out>.json/.md, default stem cpu_inference_compile_ab)")
    p.add_argument("--cpp-wrapper", action="store_true", help="--compile-ab: also the variant compiled with "
                   "inductor's C++ wrapper (static_decode_(..., options={'cpp_wrapper': True}))")
    p.add_argument("--ab-rounds", type=int, default=7, help="paired rounds per variant (and prefill mode) "
                   "(--prefill-ab, --decode-ab, --compile-ab)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        mode = spec.get("mode")
        run = {"prefill_ab": prefill_ab, "decode_ab": decode_ab, "compile_ab": compile_ab}.get(mode, worker)
        print("ROW " + json.dumps(run(spec)), flush=True)
        return 0
    for mode in ("prefill_ab", "decode_ab", "compile_ab"):
        if getattr(args, mode):
            return _main_ab(args, mode)
    import torch

    from benchmarks.common.datasets import use_data_dir
    from benchmarks.common.env import hardware, utc_now, versions
    from medquant.kernels import cpu_features, get_cpu_prefill_kernel

    quick = args.quick
    use_data_dir(args.data_dir)  # exported to the workers (the accuracy check reads the IU reports)
    models = (args.models or ("smollm2" if quick else "smollm2,llama1b")).split(",")
    variants = (args.variants or ("float32,bfloat16,W8,W4g128" if quick else
                                  "float32,bfloat16," + ",".join(QUANT) + ",W4g128@bf16,W4g128+emb")).split(",")
    threads = args.threads or torch.get_num_threads()
    spec = {"threads": threads, "repeats": args.repeats or (1 if quick else 3), "prompt": 32,
            "new": 16 if quick else 64, "prefill": 64 if quick else 256, "batch8": True,
            "prefill_kernel": get_cpu_prefill_kernel(),
            "accuracy": not args.no_accuracy, "static_compile": [v for v in args.static_compile.split(",") if v], "acc_prompts": 4 if quick else 20, "acc_tokens": 32 if quick else 64}
    bw = _bandwidth_gbs()
    rows = []
    for model, variant, head in _rows(models, variants, args.heads):
        s = dict(spec, model=model, variant=variant, head=head)
        t0 = time.time()
        row = _run_worker(s, {"model": model, "variant": variant, "head": head})
        row["wall_s"] = time.time() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    stem = _out_stem(args.out, "cpu_inference_quick" if quick else "cpu_inference")
    stem.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "cpu_inference", "date": utc_now(), "seed": SEED, "spec": spec, "bandwidth_gbs": bw,
              "cpu_features": cpu_features(), "hardware": hardware(), "versions": versions(), "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    table = _table(rows, bw)
    stem.with_suffix(".md").write_text(f"measured read bandwidth {bw:.1f} GB/s, {threads} threads\n\n{table}\n")
    _plot(rows, stem.with_suffix(".png"))
    print(table)
    return 0


def _compile_ab_table(results: list[dict]) -> str:
    """The ``--compile-ab`` table: medians of paired ratios (module docstring of :func:`compile_ab`)."""
    lines = [("| model | variant | compiled vs float32 | vs bfloat16 | vs compiled bfloat16 | vs the variant eager | "
              "eager vs float32 | eager vs bfloat16 | tok/s: float32 / bfloat16 / bf16 compiled / eager / compiled / "
              "compiled, guards skipped | rounds |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        if "error" in res:
            lines.append(f"| {res['model']} | error: {res['error'][-120:]} |" + " |" * 8)
            continue
        for name, v in res["variants"].items():
            c, e = v["compiled"], v["eager"]
            cells = [f"{c[f'vs_{b}']['ratio_median']:.2f}" for b in ("float32", "bfloat16", "bfloat16_compiled",
                                                                      "eager")]
            cells += [f"{e[f'vs_{b}']['ratio_median']:.2f}" for b in ("float32", "bfloat16")]
            cells.append(" / ".join(f"{statistics.median(v['tok_s'][k]):.1f}" for k in (
                "float32", "bfloat16", "bfloat16_compiled", "eager", "compiled", "compiled_skip_guards")))
            lines.append(f"| {res['model']} | {name} | " + " | ".join(cells) + f" | {res['rounds']} |")
    cpp = [(res["model"], name, v) for res in results if "error" not in res for name, v in res["variants"].items()
           if "compiled_cpp" in v]
    if cpp:
        lines += ["", ("| model | variant | C++ wrapper vs compiled (Python wrapper) | vs float32 | vs bfloat16 | "
                       "vs the variant eager | tok/s median (best) | first call s: C++ / Python wrapper |"),
                  "|---|---|---|---|---|---|---|---|"]
        for model, name, v in cpp:
            c = v["compiled_cpp"]
            cells = [f"{c[f'vs_{b}']['ratio_median']:.2f}" for b in ("compiled", "float32", "bfloat16", "eager")]
            cells.append(f"{statistics.median(v['tok_s']['compiled_cpp']):.1f} ({max(v['tok_s']['compiled_cpp']):.1f})")
            cells.append(f"{v['compile_cpp_first_call_s']:.0f} / {v['compile_first_call_s']:.0f}")
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _main_ab(args, mode: str) -> int:
    """``--prefill-ab`` / ``--decode-ab`` / ``--compile-ab`` (``mode`` ``"prefill_ab"`` / ``"decode_ab"`` /
    ``"compile_ab"``): one subprocess per model runs :func:`prefill_ab`, :func:`decode_ab` or :func:`compile_ab`;
    table + JSON."""
    import torch

    from benchmarks.common.env import hardware, native_record, utc_now, versions
    from medquant.kernels import cpu_features, get_cpu_int4_kernel, get_cpu_prefill_kernel

    prefill = mode == "prefill_ab"
    models = (args.models or "smollm2").split(",")
    variants = [v for v in getattr(args, mode).split(",") if v]
    heads = [True, False] if args.heads == "both" else [args.heads == "quantized"]
    threads = args.threads or torch.get_num_threads()
    results = []
    for model in models:
        spec = {"mode": mode, "model": model, "threads": threads, "rounds": args.ab_rounds,
                "prefill": 256, "prompt": 32, "new": 64, "ab_variants": [(v, h) for v in variants for h in heads],
                "cpp_wrapper": bool(getattr(args, "cpp_wrapper", False)), "base": args.prefill_ab_base}
        results.append(_run_worker(spec, {"model": model}))
    stem = _out_stem(args.out, f"cpu_inference_{mode}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    if mode == "compile_ab":
        table = _compile_ab_table(results)
        title = ("batch-1 decode through generate (64 new tokens after 32): eager vs static cache + compiled step, "
                 "with float32, bfloat16 and compiled bfloat16 baselines, in turn in one process")
    elif prefill:
        cols = ("all", "gen")
        short = {"bfloat16": "bf16", "float32": "float32"}[args.prefill_ab_base]
        lines = [(f"| model | variant | prefill vs {short} (all logits): median of paired ratios | ratio of minima | "
                  "generate-style (logits_to_keep=1): median | ratio of minima | rounds |"),
                 "|---|---|---|---|---|---|---|"]
        title = f"256-token prefill, {args.prefill_ab_base} model vs each variant alternating in one process"
    else:
        cols = ("vs_float32", "vs_bfloat16")
        lines = [("| model | variant | decode vs float32: median of paired ratios | ratio of best rounds | "
                 "decode vs bfloat16: median | ratio of best rounds | variant tok/s (median) | rounds |"),
                 "|---|---|---|---|---|---|---|---|"]
        title = "batch-1 decode (64 new tokens after 32), float32, bfloat16 and each variant in turn in one process"
    if mode != "compile_ab":
        for res in results:
            if "error" in res:
                lines.append(f"| {res['model']} | error: {res['error'][-120:]} |" + " |" * (len(cols) * 2 + 1))
                continue
            for name, v in res["variants"].items():
                cells = []
                for c in cols:
                    second = v[c]["ratio_of_minima"] if prefill else v[c]["ratio_of_maxima"]
                    cells += [f"{v[c]['ratio_median']:.2f}", f"{second:.2f}"]
                if not prefill:
                    cells.append(f"{statistics.median(v['tok_s']['variant']):.1f}")
                lines.append(f"| {res['model']} | {name} | " + " | ".join(cells) + f" | {res['rounds']} |")
        table = "\n".join(lines)
    native = native_record()
    out = {"benchmark": f"cpu_inference --{mode.replace('_', '-')}", "date": utc_now(), "seed": SEED, "threads": threads,
           "prefill_kernel": get_cpu_prefill_kernel(), "int4_kernel": get_cpu_int4_kernel(), "native": native,
           "cpu_features": cpu_features(), "hardware": hardware(), "versions": versions(), "results": results}
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    stem.with_suffix(".md").write_text(f"{threads} threads, {title}, prefill kernel {get_cpu_prefill_kernel()}, "
                                       f"int4 kernel setting {get_cpu_int4_kernel()}, native matmul {native['form']}"
                                       f"\n\n{table}\n")
    print(table)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
