"""``compile_decoder`` (prompt and decode steps compiled ahead of time) against ``static_decode_`` and llama.cpp.

:func:`medquant.quant.aot.compile_decoder` exports the model's forward over a static KV cache (the cache tensors
passed in and written in place) and compiles two programs with AOTInductor: a ``--chunk``-token prompt program
and a one-token step, quantized layers bound to their native kernels. Per round, each contender handles the same
``--prompt``-token random prompt and decodes ``--new`` greedy tokens:

* ``aot``: ``decoder.prefill(prompt)`` (prefill tokens/s), then one ``decoder.feed`` per new token (decode
  tokens/s): the public API, nothing else;
* ``compiled``: the same quantized model with ``static_decode_`` (``torch.compile`` of the decode step) through
  ``generate`` (decode tokens/s, :func:`benchmarks.cpu_inference._generate_decode_tok_s`); prefill: one eager
  forward over the prompt keeping the last position's logits (what ``generate`` runs first);
* ``aot_python_op`` (``--python-op-control``): the same decoder compiled with ``$MEDQUANT_NATIVE_OP=0``, its
  quantized layers called through the Python kernel of ``medquant::gemv4_bound`` instead of the C++ operator
  (:mod:`medquant.kernels.native_op`): the control for what the C++ operator adds;
* ``aot_split`` (``--split-control``): the same decoder compiled with ``set_cpu_native4_activations("split")``
  (float32 activations as two bfloat16 halves, two products per code) instead of the default ``"int16"`` (16-bit
  integers per 32 columns, one integer product per code): the control for what the integer form saves;
* ``aot_loaded`` (``--save-load``): the decoder saved (``AOTDecoder.save``) and loaded (``load_decoder``) with
  another copy of the model: the loaded programs read that copy's tensors and call its layers by the handles
  they are handed at load, and must run as fast as the compiled ones (the save and load times are recorded);
* ``aot_int_handle`` (``--int-handle-control``): the decoder compiled as before saving existed, each layer's
  handle an integer written into the generated code: the control for what reading the handles from tensors costs;
* ``llamacpp_q4_0`` (``--llamacpp``): llama.cpp's Q4_0 file of the same model (medquant's W4 g32 symmetric export,
  as ``benchmarks.llamacpp`` writes it), prefill and decode after the same prompt: the stretch goal is 0.5x its
  decode rate.

The order rotates every round; ratios are medians of per-round ratios. The check that could prove the route
wrong: the AOT decoder's greedy tokens against ``generate``'s for the same model (recorded, with how many agree).

``--cache-lengths-ab MAX_LEN`` measures instead what the programs' cache lengths do for a long cache: three
decoders of the same model, ``max_len = MAX_LEN`` with the default cache lengths (256, 512, ... below it), the same
with the programs compiled for ``MAX_LEN`` only (every call attends over ``MAX_LEN`` positions: the control), and
``max_len`` just long enough for the sequence (the limit), prefilling and decoding the same tokens in rotated
rounds; writes ``aoti_decode_cache_lengths.{json,md}``. (``aoti_decode_step_lengths.{json,md}``: the same
measurement when only the step program had several lengths, decode only.)

``--chunk-ab 64,128,256`` measures what the prompt program's length (``chunk``) does: one decoder per chunk (the
same model and ``max_len``; an entry ``64+256`` is one decoder with prompt programs of both lengths), and per round each decoder prefills prompts of every length in ``--chunk-ab-prompts``
(default 40, 128, 512 tokens: shorter than a chunk, one or two chunks, several) and then decodes ``--new`` tokens
after the longest, the order rotated; prefill tokens/s per prompt length, decode tokens/s (the control: the step
program does not depend on the chunk), ratios against the first chunk given (medians of per-round ratios), and
whether every decoder chose the same greedy tokens; writes ``<out>_chunks.{json,md}``.

Run: ``python -m benchmarks.aoti_decode [--model smollm2] [--rounds 5] [--prompt 128] [--new 64] [--chunk 64]
[--threads 2] [--batch 1] [--python-op-control] [--split-control] [--save-load] [--int-handle-control] [--llamacpp]``; writes ``benchmarks/results/aoti_decode.{json,md}`` (``--out`` another stem).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0


def aot_round(decoder, ids, new: int) -> tuple[dict, list[int]]:
    """One prompt ``(B, P)`` and ``new`` greedy tokens through ``decoder``: ``({"prefill": tok/s, "decode":
    tok/s}, the ``new + 1`` tokens chosen per row, row after row)``; rates count every row's tokens."""
    t = time.perf_counter()
    logits = decoder.prefill(ids)
    prefill_s = time.perf_counter() - t
    nxt = logits.argmax(-1, keepdim=True)
    steps = [nxt]
    t = time.perf_counter()
    for _ in range(new):
        nxt = decoder.feed(nxt).argmax(-1, keepdim=True)
        steps.append(nxt)
    decode_s = time.perf_counter() - t
    b = ids.shape[0]
    return ({"prefill": b * ids.shape[1] / prefill_s, "decode": b * new / decode_s},
            torch_cat_rows(steps))


def torch_cat_rows(steps) -> list[int]:
    """Per-step ``(B, 1)`` token tensors as one list, row after row."""
    import torch

    return torch.cat(steps, dim=1).reshape(-1).tolist()


def metric_rates(rounds: dict, metric: str) -> dict:
    """``{contender: [tok/s per round]}`` of one metric (``"decode"`` / ``"prefill"``) from rounds of dicts."""
    return {name: [r[metric] for r in rounds[name]] for name in rounds}


def eager_prefill_tok_s(model, ids) -> float:
    """Tokens/s of one forward over the prompt keeping the last position's logits (``generate``'s prefill)."""
    import torch

    t = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
    return ids.numel() / (time.perf_counter() - t)


def cache_lengths_ab(args) -> int:
    """``--cache-lengths-ab``: prefill and decode tokens/s of three decoders (module docstring), rotated rounds."""
    import torch

    from benchmarks.common.env import run_record, save_results
    from benchmarks.cpu_inference import _make, _ratios, _rotated_rounds
    from medquant.quant.aot import compile_decoder

    torch.set_num_threads(args.threads)
    load0 = list(os.getloadavg())
    model = _make(args.model, args.variant, True)[0]
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(SEED))
    need, long = args.prompt + args.new + 1, args.cache_lengths_ab
    decoders = {"long": compile_decoder(model, long, chunk=args.chunk),
                "long_max_len_only": compile_decoder(model, long, chunk=args.chunk, cache_lengths=()),
                "short": compile_decoder(model, need, chunk=args.chunk)}
    tokens = {name: aot_round(dec, ids, args.new)[1] for name, dec in decoders.items()}
    rounds = _rotated_rounds({name: (lambda d=dec: aot_round(d, ids, args.new)[0])
                              for name, dec in decoders.items()}, args.rounds)
    row: dict = {"model": args.model, "variant": args.variant, "max_len": long, "short_max_len": need,
                 "cache_lengths": decoders["long"].cache_lengths,
                 "same_tokens": tokens["long"] == tokens["long_max_len_only"] == tokens["short"],
                 "compile_s": {k: d.compile_s for k, d in decoders.items()}}
    med: dict = {}
    for metric in ("decode", "prefill"):
        rates = metric_rates(rounds, metric)
        ratios = _ratios(rates, "long", ["long_max_len_only", "short"])
        for name, values in rates.items():
            row[f"{name}_{metric}_tok_s"] = values
            med[name, metric] = statistics.median(values)
        for base in ("long_max_len_only", "short"):
            row[f"long_vs_{base}_{metric}"] = ratios[f"vs_{base}"]["ratio_median"]
    for dec in decoders.values():
        dec.close()
    result = run_record("aoti_decode_cache_lengths", SEED, load0, [row], prompt=args.prompt, new=args.new,
                        rounds=args.rounds, **_backend())
    lines = [(f"| max_len {long}, default cache lengths | {row['cache_lengths']} | {med['long', 'decode']:.1f} | "
              f"{med['long', 'prefill']:.0f} | | |"),
             (f"| max_len {long}, programs for max_len only (control) | [{long}] | "
              f"{med['long_max_len_only', 'decode']:.1f} | {med['long_max_len_only', 'prefill']:.0f} | "
              f"{row['long_vs_long_max_len_only_decode']:.2f}x | {row['long_vs_long_max_len_only_prefill']:.2f}x |"),
             (f"| max_len {need} (the sequence's length: the limit) | [{need}] | {med['short', 'decode']:.1f} | "
              f"{med['short', 'prefill']:.0f} | {row['long_vs_short_decode']:.2f}x | "
              f"{row['long_vs_short_prefill']:.2f}x |")]
    md = "\n".join([
        (f"# compile_decoder cache lengths, a {long}-position cache (benchmarks/aoti_decode.py, "
         f"{result['date']})"), "",
        (f"{args.model} {args.variant} (head quantized), {result['threads']} threads, {args.prompt}-token prompt "
         f"(chunks of {args.chunk}), {args.new} greedy tokens, {args.rounds} rounds, order rotated; ratios: medians "
         "of per-round ratios."), "",
        ("| decoder | cache lengths | decode tok/s | prefill tok/s | default / this, decode | "
         "default / this, prefill |"), "|---|---|---|---|---|---|", *lines, "",
        f"Same greedy tokens from all three: {row['same_tokens']}.", ""])
    save_results(RESULTS, f"{args.out}_cache_lengths", result, md)
    return 0


def chunk_ab(args) -> int:
    """``--chunk-ab``: prefill tokens/s per prompt length and decode tokens/s of one decoder per prompt-program
    length (module docstring), rotated rounds."""
    import torch

    from benchmarks.common.env import run_record, save_results
    from benchmarks.cpu_inference import _make, _ratios, _rotated_rounds
    from medquant.quant.aot import compile_decoder

    try:
        chunks = args.chunk_ab.split(",")  # a decoder each: "64", or "64+256" (prompt programs of both lengths)
        lengths = {c: tuple(int(x) for x in c.split("+")) for c in chunks}
        prompts = [int(n) for n in args.chunk_ab_prompts.split(",")]
    except ValueError:
        raise SystemExit(f"--chunk-ab {args.chunk_ab!r} / --chunk-ab-prompts {args.chunk_ab_prompts!r}: expected "
                         "comma lists of integers (a chunk entry may join several with +), e.g. 64,256,64+256") \
            from None
    if len(chunks) < 2 or min(min(x) for x in lengths.values()) < 1 or min(prompts) < 1:
        raise SystemExit("--chunk-ab needs two or more chunk lengths >= 1, and prompt lengths >= 1")
    torch.set_num_threads(args.threads)
    load0 = list(os.getloadavg())
    model = _make(args.model, args.variant, True)[0]
    gen = torch.Generator().manual_seed(SEED)
    ids = {n: torch.randint(0, model.config.vocab_size, (1, n), generator=gen) for n in prompts}
    longest = ids[max(prompts)]
    max_len = max(prompts) + args.new + 1
    decoders = {c: compile_decoder(model, max_len, chunk=lengths[c] if len(lengths[c]) > 1 else lengths[c][0])
                for c in chunks}

    def one_round(dec) -> dict:
        rates = {}
        for n, x in ids.items():
            t = time.perf_counter()
            dec.prefill(x)
            rates[f"prefill_{n}"] = n / (time.perf_counter() - t)
        rates["decode"] = aot_round(dec, longest, args.new)[0]["decode"]
        return rates

    tokens = {c: aot_round(dec, longest, args.new)[1] for c, dec in decoders.items()}
    rounds = _rotated_rounds({c: (lambda d=dec: one_round(d)) for c, dec in decoders.items()}, args.rounds)
    metrics = [f"prefill_{n}" for n in prompts] + ["decode"]
    base = chunks[0]
    row: dict = {"model": args.model, "variant": args.variant, "max_len": max_len, "chunks": chunks,
                 "prompts": prompts, "same_tokens": all(t == tokens[base] for t in tokens.values()),
                 "compile_s": {str(c): d.compile_s for c, d in decoders.items()}}
    for metric in metrics:
        rates = {c: [r[metric] for r in rounds[c]] for c in chunks}
        for c in chunks:
            row[f"chunk{c}_{metric}_tok_s"] = rates[c]
            if c != base:  # this chunk's tokens/s over the first chunk's (above 1: this chunk faster)
                row[f"chunk{c}_vs_chunk{base}_{metric}"] = _ratios(rates, c, [base])[f"vs_{base}"]["ratio_median"]
    for dec in decoders.values():
        dec.close()
    result = run_record("aoti_decode_chunks", SEED, load0, [row], new=args.new, rounds=args.rounds, **_backend())
    lines = []
    for c in chunks:
        cells = []
        for metric in metrics:
            med = statistics.median(row[f"chunk{c}_{metric}_tok_s"])
            ratio = row.get(f"chunk{c}_vs_chunk{base}_{metric}")
            cells.append(f"{med:.0f}" if metric != "decode" else f"{med:.1f}")
            cells[-1] += f" ({ratio:.2f}x)" if ratio is not None else ""
        lines.append(f"| {c}{' (first: the baseline)' if c == base else ''} | " + " | ".join(cells) + " |")
    md = "\n".join([
        f"# compile_decoder prompt-program lengths (benchmarks/aoti_decode.py --chunk-ab, {result['date']})", "",
        (f"{args.model} {args.variant} (head quantized), {result['threads']} threads, max_len {max_len}, "
         f"{args.rounds} rounds, order rotated; tokens/s, in brackets the median of per-round ratios against chunk "
         f"{base}. Decode: {args.new} greedy tokens after the {max(prompts)}-token prompt."), "",
        "| chunk | " + " | ".join(f"prefill {n} tokens" for n in prompts) + " | decode |",
        "|---|" + "---|" * len(metrics), *lines, "",
        f"Same greedy tokens from every decoder: {row['same_tokens']}.", ""])
    save_results(RESULTS, f"{args.out}_chunks", result, md)
    return 0


def markdown(result: dict) -> str:
    r = result["rows"][0]
    names = {"aot": "compile_decoder (AOTInductor), prefill + feed",
             "aot_python_op": "the same, layers through the Python kernel (MEDQUANT_NATIVE_OP=0)",
             "aot_split": "the same, activations split into two bfloat16 halves (native4 activations \"split\")",
             "aot_loaded": "the same decoder saved and loaded (load_decoder) with another copy of the model",
             "aot_int_handle": "the same, handles written into the code as integers (as before saving existed)",
             "compiled": "static_decode_ (torch.compile), generate; prefill: eager forward",
             "llamacpp_q4_0": "llama.cpp Q4_0 (medquant's W4 g32 sym export)"}
    lines = []
    for key, label in names.items():
        if f"{key}_decode_tok_s" not in r:
            continue
        dec, pre = r[f"{key}_decode_tok_s"], r[f"{key}_prefill_tok_s"]
        vs = r.get(f"aot_vs_{key}", {})
        lines.append(f"| {label} | {statistics.median(dec):.1f} ({max(dec):.1f}) | {statistics.median(pre):.0f} | "
                     + (f"{vs['decode']:.2f}x | {vs['prefill']:.2f}x |" if vs else "| |"))
    head = (f"{r['model']} {r['variant']} (head quantized), {result['threads']} threads, batch "
            f"{result.get('batch', 1)} (rates count every row), {result['prompt']}-token prompt, {result['new']} "
            f"greedy tokens, prompt chunk {r['chunk']}, {result['rounds']} rounds, order "
            "rotated; ratios: medians of per-round ratios."
            + (f" Compute dtype {result['compute_dtype']}; large-M calls on the blocked matmul: "
               f"{'yes' if result['blocked_matmul'] else 'no (weight-only kernel in the programs)'}; the C++ "
               f"operator: {'yes' if result['native_op'] else 'NO, the Python kernel: ' + result['native_op_reason']}."
               if "compute_dtype" in result else ""))
    tail = (f"AOT greedy tokens equal generate's: {r['same_tokens']} ({r['tokens_agreeing']}/{r['tokens']}); "
            f"export {r['export_s']:.1f} s, compile {r['compile_s']:.1f} s (both programs); static_decode_'s first "
            f"generate {r['compiled_first_call_s']:.1f} s."
            + (f" Saved in {r['save_s']:.2f} s, loaded in {r['load_s']:.2f} s (no compiling), its tokens equal: "
               f"{r['loaded_same_tokens']}." if "load_s" in r else ""))
    return "\n".join([(f"# compile_decoder vs static_decode_ and llama.cpp (benchmarks/aoti_decode.py, "
                      f"{result['date']})"), "", head, "",
                      ("| decoder | decode tok/s median (best) | prefill tok/s median | AOT / this, decode | "
                      "AOT / this, prefill |"), "|---|---|---|---|---|", *lines, "", tail, ""])


def _backend() -> dict:
    """The CPU backend's settings the programs were compiled under (recorded with every run)."""
    import torch

    from medquant.kernels import get_cpu_compute_dtype, get_cpu_native4_activations, get_cpu_prefill_kernel
    from medquant.kernels.native import native_status
    from medquant.kernels.native_op import native_op_status

    cd = get_cpu_compute_dtype()
    # the blocked matmul runs large-M calls only with bfloat16 compute, where the setting asks for it and the
    # native build has it (AVX512-VNNI)
    blocked = get_cpu_prefill_kernel() == "gemm" and cd == torch.bfloat16 and bool(native_status().get("gemm"))
    status = native_op_status()  # the programs call it; where it is not built they call the Python kernel
    return {"compute_dtype": str(cd).removeprefix("torch."), "prefill_kernel": get_cpu_prefill_kernel(),
            "native4_activations": get_cpu_native4_activations(),
            "blocked_matmul": blocked, "native_op": status["active"], "native_op_reason": status["reason"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, llama_small (a 4-layer random LLaMA) or llama1b")
    p.add_argument("--variant", default="W4g128")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="rows per sequence batch (llama.cpp's rows: batch 1 only)")
    p.add_argument("--out", default="aoti_decode")
    p.add_argument("--python-op-control", action="store_true",
                   help="also the same decoder with its layers on the Python kernel (MEDQUANT_NATIVE_OP=0)")
    p.add_argument("--split-control", action="store_true",
                   help="also the same decoder compiled with split activations (set_cpu_native4_activations('split'))")
    p.add_argument("--llamacpp", action="store_true",
                   help="also llama.cpp's Q4_0 export of SmolLM2 in every round (llama.cpp is built and the file "
                        "exported first where benchmarks.llamacpp has not left them)")
    p.add_argument("--save-load", action="store_true",
                   help="also the decoder saved (AOTDecoder.save) and loaded (load_decoder) with another copy of the "
                        "model, in every round; records the save and load times")
    p.add_argument("--int-handle-control", action="store_true",
                   help="also the decoder compiled with each handle an integer in the code (not loadable elsewhere): "
                        "what reading the handles from tensors costs")
    p.add_argument("--cache-lengths-ab", type=int, default=0, metavar="MAX_LEN",
                   help="compare a MAX_LEN cache with and without the default cache lengths (and a short cache)")
    p.add_argument("--chunk-ab", default="", metavar="C1,C2,...",
                   help="compare decoders whose prompt programs take these many tokens (the first: the baseline; "
                        "64+256: one decoder with programs of both lengths)")
    p.add_argument("--chunk-ab-prompts", default="40,128,512", help="prompt lengths for --chunk-ab")
    p.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default=None,
                   help="the CPU backend's compute dtype (default: the library's choice for this CPU); float32 "
                        "also stands for CPUs without the blocked matmul (its prompt chunks run the weight-only "
                        "kernel)")
    args = p.parse_args(argv)
    if args.compute_dtype:
        from medquant.kernels import set_cpu_compute_dtype

        set_cpu_compute_dtype(args.compute_dtype)
    if args.cache_lengths_ab:
        return cache_lengths_ab(args)
    if args.chunk_ab:
        return chunk_ab(args)
    if args.llamacpp and args.model != "smollm2":
        p.error("--llamacpp compares SmolLM2 only (the model llama.cpp's export was made from)")
    if args.llamacpp and args.batch != 1:
        p.error("--llamacpp measures batch 1 only (llama.cpp's bench decodes one sequence)")
    import torch

    from benchmarks.common.env import run_record, save_results
    from benchmarks.cpu_inference import _generate_decode_tok_s, _make, _ratios, _rotated_rounds
    from medquant.quant.aot import compile_decoder
    from medquant.quant.decode import static_decode_

    torch.set_num_threads(args.threads)
    if args.llamacpp:  # before anything is compiled: builds llama.cpp and exports its file where missing
        from benchmarks.llamacpp import llamacpp_speed, smollm2_q4_0

        exe, gguf = smollm2_q4_0()
    load0 = list(os.getloadavg())
    model = _make(args.model, args.variant, True)[0]  # the variant with the head quantized
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt),
                        generator=torch.Generator().manual_seed(SEED))
    decoder = compile_decoder(model, args.prompt + args.new + 1, batch_size=args.batch, chunk=args.chunk)
    compiled = static_decode_(_make(args.model, args.variant, True)[0])
    with torch.no_grad():
        _, first = _generate_decode_tok_s(compiled, ids, args.new, 1)
        ref = compiled.generate(ids, max_new_tokens=args.new + 1, min_new_tokens=args.new + 1, do_sample=False,
                                pad_token_id=0)[:, args.prompt:].reshape(-1).tolist()
    toks = aot_round(decoder, ids, args.new)[1]
    row_extra: dict = {}  # whether the C++ operator ran: the record's "native_op" (_backend)
    timers = {"aot": lambda: aot_round(decoder, ids, args.new)[0],
              "compiled": lambda: {"decode": args.batch * _generate_decode_tok_s(compiled, ids, args.new, 1)[0],
                                   "prefill": eager_prefill_tok_s(compiled, ids)}}
    if args.python_op_control:
        os.environ["MEDQUANT_NATIVE_OP"] = "0"  # read when the layers are bound (inside compile_decoder)
        try:
            control = compile_decoder(_make(args.model, args.variant, True)[0], args.prompt + args.new + 1,
                                      batch_size=args.batch, chunk=args.chunk)
        finally:
            del os.environ["MEDQUANT_NATIVE_OP"]
        row_extra["python_op_control_same_tokens"] = aot_round(control, ids, args.new)[1] == ref
        timers["aot_python_op"] = lambda: aot_round(control, ids, args.new)[0]
    if args.split_control:
        from medquant.kernels import set_cpu_native4_activations

        set_cpu_native4_activations("split")  # read when the layers' kernels are bound (inside compile_decoder)
        try:
            split = compile_decoder(_make(args.model, args.variant, True)[0], args.prompt + args.new + 1,
                                    batch_size=args.batch, chunk=args.chunk)
        finally:
            set_cpu_native4_activations(None)
        row_extra["split_control_same_tokens"] = aot_round(split, ids, args.new)[1] == ref
        timers["aot_split"] = lambda: aot_round(split, ids, args.new)[0]
    if args.save_load:
        from medquant.quant.aot import load_decoder

        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            folder = decoder.save(Path(tmp) / "decoder")
            row_extra["save_s"] = time.perf_counter() - t
            copy = _make(args.model, args.variant, True)[0]
            t = time.perf_counter()  # the whole call: checks (SHA-256 of files and weights), binding, loading
            loaded = load_decoder(folder, copy, progress=False)
            row_extra["load_s"] = time.perf_counter() - t
        row_extra["loaded_same_tokens"] = aot_round(loaded, ids, args.new)[1] == ref
        timers["aot_loaded"] = lambda: aot_round(loaded, ids, args.new)[0]
    if args.int_handle_control:
        import contextlib
        from unittest import mock

        from medquant.quant import aot

        # the programs as compiled before they could be saved: each handle an integer written into the code
        with mock.patch.object(aot, "_lanes_by_tensor", lambda *a: contextlib.nullcontext()):
            baked = compile_decoder(_make(args.model, args.variant, True)[0], args.prompt + args.new + 1,
                                    batch_size=args.batch, chunk=args.chunk)
        row_extra["int_handle_control_same_tokens"] = aot_round(baked, ids, args.new)[1] == ref
        timers["aot_int_handle"] = lambda: aot_round(baked, ids, args.new)[0]
    if args.llamacpp:
        def llamacpp() -> dict:
            out = llamacpp_speed(exe, gguf, ids[0].tolist(), args.threads, args.new)
            return {"decode": out["decode_tokens_per_s"], "prefill": out["prefill_tokens_per_s"]}

        timers["llamacpp_q4_0"] = llamacpp
    rounds = _rotated_rounds(timers, args.rounds)
    row: dict = {"model": args.model, "variant": args.variant, "chunk": args.chunk}
    for metric in ("decode", "prefill"):
        rates = metric_rates(rounds, metric)
        for name, values in rates.items():
            row[f"{name}_{metric}_tok_s"] = values
        for base, ratio in _ratios(rates, "aot", [n for n in rates if n != "aot"]).items():
            row.setdefault(f"aot_{base}", {})[metric] = ratio["ratio_median"]  # aot_vs_compiled, ...
        if "llamacpp_q4_0" in rates:
            row.setdefault("compiled_vs_llamacpp_q4_0", {})[metric] = \
                _ratios(rates, "compiled", ["llamacpp_q4_0"])["vs_llamacpp_q4_0"]["ratio_median"]
    row.update({"same_tokens": toks == ref, "tokens_agreeing": sum(a == b for a, b in zip(toks, ref)),
                "tokens": len(ref), "export_s": decoder.export_s, "compile_s": decoder.compile_s,
                "bound_layers": decoder.bound_layers, "compiled_first_call_s": first, **row_extra})
    decoder.close()
    result = run_record("aoti_decode", SEED, load0, [row], prompt=args.prompt, new=args.new, rounds=args.rounds,
                        batch=args.batch, **_backend())
    save_results(RESULTS, args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
