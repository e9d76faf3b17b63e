"""A decode step compiled ahead of time (AOTInductor) against ``static_decode_``'s ``torch.compile`` step.

``static_decode_`` compiles the decode step with ``torch.compile``: every token still runs Dynamo's guards, the
inductor wrapper's Python and ``generate``'s own per-token work. This trial takes the other route PyTorch offers
for CPU: ``torch.export`` of the step (transformers' ``TorchExportableModuleForDecoderOnlyLM``: a static KV cache
held as the module's buffers, one token in, logits out), compiled once by AOTInductor into a shared library
(``torch._inductor.aoti_compile_and_package``) and called from a plain greedy loop. The quantized layers are
bound first (``bind_cpu_kernels``), so the exported graph calls ``medquant::gemv4_bound`` by handle, through
AOTInductor's proxy executor.

SmolLM2-135M, W4 g128 with the head quantized (``--variant``), a ``--prompt``-token random prompt fed one token at
a time, then ``--new`` greedy tokens: per round, decode tokens/s of the AOT step (a fresh load of the package, so
its cache starts empty; the prompt not timed) and of ``generate`` with ``static_decode_`` (:func:`benchmarks
.cpu_inference._generate_decode_tok_s`), the order alternated. The check that could prove the route wrong: both
must give the same greedy tokens (recorded). Medians of the per-round ratios.

What it is not: a library API. The package holds the bound matmuls' handles, integers valid only in the process
that bound them, so it cannot be saved and loaded elsewhere; it serves batch 1 and one cache length; a new
sequence needs a fresh load of the package (its cache is inside it).

``--llamacpp`` adds llama.cpp's Q4_0 file of the same model (medquant's W4 g32 symmetric export, as
``benchmarks.llamacpp`` writes it) to every round, decoding after the same prompt (the stretch goal: 0.5x of it).

Run: ``python -m benchmarks.aoti_decode [--rounds 5] [--prompt 32] [--new 64] [--threads 2] [--llamacpp]``; writes
``benchmarks/results/aoti_decode.{json,md}``.
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


def aot_step(model, max_cache_len: int, package: Path):
    """Export ``model``'s one-token step with a static cache of ``max_cache_len`` and compile it with AOTInductor
    into ``package``. Returns ``(load, export_s, compile_s)``: ``load()`` gives a fresh callable
    ``(input_ids=(1, 1), cache_position=(1,)) -> logits`` with an empty cache."""
    import torch
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    bound = sum(bool(mod.bind_cpu_kernels()) for mod in model.modules() if hasattr(mod, "bind_cpu_kernels"))
    if not bound:
        raise RuntimeError("no quantized layer could be bound to a native kernel on this CPU")
    model.generation_config.cache_implementation = "static"
    wrap = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_cache_len).eval()
    t = time.perf_counter()
    with torch.no_grad():
        ep = wrap.export(input_ids=torch.tensor([[1]]), cache_position=torch.tensor([0]))
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(package))
    compile_s = time.perf_counter() - t
    return (lambda: torch._inductor.aoti_load_package(path)), export_s, compile_s


def aot_greedy(step, ids, new: int) -> tuple[float, list[int]]:
    """Feed ``ids (1, P)`` one token at a time (not timed), then ``new`` greedy tokens: ``(tokens/s, tokens)``."""
    import torch

    p = ids.shape[1]
    for j in range(p):
        logits = step(input_ids=ids[:, j:j + 1], cache_position=torch.tensor([j]))
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    out = [int(nxt)]
    t = time.perf_counter()
    for j in range(new):
        logits = step(input_ids=nxt, cache_position=torch.tensor([p + j]))
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
    return new / (time.perf_counter() - t), out


def markdown(result: dict) -> str:
    r = result["rows"][0]
    head = (f"SmolLM2-135M {r['variant']} (head quantized), {result['threads']} threads, {result['prompt']}-token "
            f"prompt, {result['new']} greedy tokens, {result['rounds']} rounds alternating; ratio: median of "
            "per-round ratios.")
    aot = (f"| AOTInductor package, greedy loop | {statistics.median(r['aot_tok_s']):.1f} | {max(r['aot_tok_s']):.1f}"
           f" | {r['aot_vs_compiled_median']:.2f}x | {r['same_tokens']} | {r['export_s']:.1f} | "
           f"{r['aot_compile_s']:.1f} |")
    comp = (f"| static_decode_ (torch.compile), generate | {statistics.median(r['compiled_tok_s']):.1f} | "
            f"{max(r['compiled_tok_s']):.1f} | 1.00x | | | {r['compiled_first_call_s']:.1f} (first call) |")
    lines = [aot, comp]
    if "llamacpp_q4_0_tok_s" in r:
        lines.append(f"| llama.cpp Q4_0 (medquant's W4 g32 sym export), same prompt | "
                     f"{statistics.median(r['llamacpp_q4_0_tok_s']):.1f} | {max(r['llamacpp_q4_0_tok_s']):.1f} | | | | |")
        lines.append("")
        lines.append(f"AOT step / llama.cpp Q4_0: {r['aot_vs_llamacpp_q4_0_median']:.2f}x; static_decode_ / llama.cpp "
                     f"Q4_0: {r['compiled_vs_llamacpp_q4_0_median']:.2f}x (medians of per-round ratios).")
    return "\n".join([f"# AOTInductor decode step vs static_decode_ (benchmarks/aoti_decode.py, {result['date']})",
                      "", head, "",
                      ("| decode step | tok/s median | best round | vs static_decode_ | same greedy tokens | export s | "
                      "compile s |"), "|---|---|---|---|---|---|---|", *lines, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="W4g128")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="aoti_decode")
    p.add_argument("--llamacpp", action="store_true",
                   help="also llama.cpp's Q4_0 export of the model in every round (needs `python -m benchmarks.llamacpp"
                        " --speed-only` run before: its build and smollm2_w4.gguf)")
    args = p.parse_args(argv)
    import torch

    from benchmarks.common.env import run_record, save_results
    from benchmarks.cpu_inference import _generate_decode_tok_s, _make, _ratios, _rotated_rounds
    from medquant.quant.decode import static_decode_

    torch.set_num_threads(args.threads)
    load0 = list(os.getloadavg())
    aot_model = _make("smollm2", args.variant, True)[0]  # the variant with the head quantized
    ids = torch.randint(0, aot_model.config.vocab_size, (1, args.prompt),
                        generator=torch.Generator().manual_seed(SEED))
    with tempfile.TemporaryDirectory() as tmp:
        load, export_s, compile_s = aot_step(aot_model, args.prompt + args.new + 1, Path(tmp) / "step.pt2")
        compiled = static_decode_(_make("smollm2", args.variant, True)[0])
        with torch.no_grad():
            _, first = _generate_decode_tok_s(compiled, ids, args.new, 1)
            ref = compiled.generate(ids, max_new_tokens=args.new + 1, min_new_tokens=args.new + 1, do_sample=False,
                                    pad_token_id=0)[0, args.prompt:].tolist()
            _, toks = aot_greedy(load(), ids, args.new)
            timers = {"aot": lambda: aot_greedy(load(), ids, args.new)[0],
                      "compiled": lambda: _generate_decode_tok_s(compiled, ids, args.new, 1)[0]}
            if args.llamacpp:
                from benchmarks.llamacpp import _paths, cache_root, llamacpp_speed

                exe, gguf = _paths()["exe"], cache_root() / "exports" / "smollm2_w4.gguf"
                timers["llamacpp_q4_0"] = lambda: llamacpp_speed(exe, gguf, ids[0].tolist(), args.threads,
                                                                 args.new)["decode_tokens_per_s"]
            rates = _rotated_rounds(timers, args.rounds)
    q4 = ("llamacpp_q4_0",) if "llamacpp_q4_0" in rates else ()
    aot_vs, compiled_vs = _ratios(rates, "aot", ("compiled", *q4)), _ratios(rates, "compiled", q4)
    row = {"variant": args.variant, "aot_tok_s": rates["aot"], "compiled_tok_s": rates["compiled"],
           "aot_vs_compiled_median": aot_vs["vs_compiled"]["ratio_median"],
           "same_tokens": toks == ref, "tokens_agreeing": sum(a == b for a, b in zip(toks, ref)), "tokens": len(ref),
           "export_s": export_s, "aot_compile_s": compile_s, "compiled_first_call_s": first}
    if q4:
        row["llamacpp_q4_0_tok_s"] = rates["llamacpp_q4_0"]
        row["aot_vs_llamacpp_q4_0_median"] = aot_vs["vs_llamacpp_q4_0"]["ratio_median"]
        row["compiled_vs_llamacpp_q4_0_median"] = compiled_vs["vs_llamacpp_q4_0"]["ratio_median"]
    result = run_record("aoti_decode", SEED, load0, [row], prompt=args.prompt, new=args.new, rounds=args.rounds)
    save_results(RESULTS, args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
