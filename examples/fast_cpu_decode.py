"""Run a 4-bit language model fast on a CPU: ``quantize_`` and ``generate``, then a decoder compiled once and served.

    python examples/fast_cpu_decode.py                  # SmolLM2-135M-Instruct, W4 g128 (head too), IU report prompts
    python examples/fast_cpu_decode.py --model DIR      # any Hugging Face LLaMA-style causal LM folder
    python examples/fast_cpu_decode.py --smoke          # tiny random LLaMA (CI)

1. The float32 model and a bfloat16 copy: greedy ``generate`` from the findings of a real chest X-ray report (the
   baselines).
2. ``quantize_(model, QuantConfig(4, group_size=128))``, the output head included: on a CPU the packed layers run
   medquant's CPU kernels with nothing else to call (activations in bfloat16 where the CPU has native bfloat16,
   float32 otherwise; outputs in the caller's dtype). The same ``generate``.
3. ``compile_decoder(model, max_len)``: the model's prompt and one-token steps compiled ahead of time
   (AOTInductor), the quantized layers called by handle, the KV cache outside the programs. Its tokens are checked
   against step 2's ``generate`` of the same quantized model.
4. ``decoder.save(dir)`` and ``medquant.save(model, dir)``, then ``medquant.load`` and ``load_decoder`` as a
   serving process would: nothing is compiled again, and the tokens are checked once more. From the command line
   the same is ``medquant compile-decoder MODEL_DIR DECODER_DIR --max-len N`` and ``medquant generate MODEL_DIR
   --decoder DECODER_DIR --prompt "..."``.

The rates printed are one run each, after one warm-up (an example, not a benchmark): ``python -m
benchmarks.cpu_inference`` and ``python -m benchmarks.aoti_decode`` measure them in paired rounds with their
controls (docs/results/cpu_inference.md).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import torch

# the model loaders of export_for_serving.py, in this folder (SmolLM2 from its PyPI package, offline; the tiny LLaMA)
from export_for_serving import load_smollm2, tiny_llama

import medquant as mq
from medquant.data import default_data_dir, load_iu_reports


def timed_generate(generate, runs: int = 2) -> tuple[torch.Tensor, float]:
    """``generate()``'s output and the seconds of its last call (the first builds kernels and caches)."""
    for _ in range(runs):
        t = time.perf_counter()
        out = generate()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face causal LM folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens of the report findings used as the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--data-dir", help="folder with iu_xray_reports/ (default: $MEDQUANT_DATA_DIR)")
    p.add_argument("--out", help="folder for the saved model and decoder (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny random LLaMA, 8 tokens (CI)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="medquant CPU kernels")  # a tiny model's small layers: reference path
    work = Path(tempfile.mkdtemp(prefix="medquant_decode_"))
    out = Path(args.out) if args.out else work
    if args.smoke:
        args.group_size, args.max_new_tokens, args.prompt_tokens = 32, 8, 12
        model, tok = tiny_llama(work / "source")
    elif args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tok = load_smollm2()

    report = load_iu_reports(default_data_dir(args.data_dir) / "iu_xray_reports" / "NLMCXR_reports.tgz",
                             split="test", require=("findings",))[0]
    ids = tok(report.findings, add_special_tokens=False, return_tensors="pt").input_ids[:, :args.prompt_tokens]
    n = args.max_new_tokens
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    settings = {"eos_token_id": tok.eos_token_id, "pad_token_id": pad}

    def hf_generate(m):
        with torch.no_grad():
            return m.generate(ids, max_new_tokens=n, do_sample=False, **settings)

    rows = []  # (what, tokens generated, seconds)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for name, m in (("float32, generate", model), ("bfloat16, generate", bf16)):
        o, s = timed_generate(lambda m=m: hf_generate(m))
        rows.append((name, o.shape[1] - ids.shape[1], s))
        if m is model:
            float_out = o
    del bf16

    # 2. quantize: every linear layer, the output head included, to 4-bit codes in groups of 128 columns
    mq.quantize_(model, mq.QuantConfig(args.bits, group_size=args.group_size))
    expected, s = timed_generate(lambda: hf_generate(model))
    rows.append((f"W{args.bits} g{args.group_size}, generate", expected.shape[1] - ids.shape[1], s))

    # 3. the decode compiled ahead of time: one call, then generate as with transformers
    t = time.perf_counter()
    decoder = mq.compile_decoder(model, max_len=ids.shape[1] + n)
    compile_s = time.perf_counter() - t
    got, s = timed_generate(lambda: decoder.generate(ids, n, **settings))
    if not torch.equal(got, expected):
        raise SystemExit("the compiled decoder's tokens differ from generate's on the same model")
    rows.append((f"W{args.bits} g{args.group_size}, compile_decoder", got.shape[1] - ids.shape[1], s))

    # 4. save both, load them back as a serving process would (no compiling), generate again
    mq.save(model, out / "model")
    decoder.save(out / "decoder")
    decoder.close()
    served = mq.load(out / "model")
    t = time.perf_counter()
    loaded = mq.load_decoder(out / "decoder", served, progress=False)
    load_s = time.perf_counter() - t
    again, s = timed_generate(lambda: loaded.generate(ids, n, **settings))
    if not torch.equal(again, expected):
        raise SystemExit("the loaded decoder's tokens differ from generate's on the same model")
    rows.append((f"W{args.bits} g{args.group_size}, saved decoder loaded", again.shape[1] - ids.shape[1], s))
    loaded.close()

    base = rows[0][1] / rows[0][2]
    print(f"greedy, a {ids.shape[1]}-token prompt (IU report findings), up to {n} new tokens, "
          f"{torch.get_num_threads()} threads; one run each after a warm-up (prompt + generation):")
    print("| model | tokens | tokens/s | vs float32 |\n|---|---|---|---|")
    for name, k, s in rows:
        print(f"| {name} | {k} | {k / s:.1f} | {k / s / base:.2f}x |")
    print(f"compile_decoder: {compile_s:.1f} s once; the saved decoder loaded in {load_s:.2f} s "
          f"(checked against the model); its tokens equal generate's on the quantized model: True")
    new_float, new_q = float_out[0, ids.shape[1]:].tolist(), expected[0, ids.shape[1]:].tolist()
    same = next((i for i, (a, b) in enumerate(zip(new_float, new_q)) if a != b), min(len(new_float), len(new_q)))
    print(f"continuation, float32: {tok.decode(new_float, skip_special_tokens=True)!r}")
    print(f"continuation, W{args.bits}: {tok.decode(new_q, skip_special_tokens=True)!r} (the first {same} tokens as "
          "float32's: rounding the weights changes the model; calibration, e.g. gptq_quantize_, changes it less)")
    print(f"saved: {out / 'model'} (medquant.load) and {out / 'decoder'} (medquant.load_decoder)")


if __name__ == "__main__":
    main()
