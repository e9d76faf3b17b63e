"""benchmarks.cpu_inference: how a row's model is made, and the paired prefill measurement's bookkeeping."""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from benchmarks import cpu_inference as ci
from medquant.quant import QuantLinear
from medquant.quant.modules import QuantEmbedding


def test_make_quantizes_what_the_variant_names():
    m, _ = ci._make("llama_small", "W4g128", True)
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.bit_groups == [4]
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)
    assert not isinstance(m.model.embed_tokens, QuantEmbedding)
    m, _ = ci._make("llama_small", "W8", False)
    assert isinstance(m.lm_head, torch.nn.Linear) and not isinstance(m.lm_head, QuantLinear)
    assert m.model.layers[0].self_attn.q_proj.bit_groups == [8]
    m, _ = ci._make("llama_small", "W4g128+emb@bf16", True)
    assert isinstance(m.model.embed_tokens, QuantEmbedding) and isinstance(m.lm_head, QuantLinear)
    assert m.model.norm.weight.dtype == torch.bfloat16
    m, _ = ci._make("llama_small", "bfloat16", False)
    assert m.lm_head.weight.dtype == torch.bfloat16
    m, _ = ci._make("llama_small", "W4g128cdbf16", True)  # the compute dtype on the config, for every layer
    layers = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    assert m.lm_head in layers and {mod.config.compute_dtype for mod in layers} == {"bfloat16"}
    assert {mod.bit_groups[0] for mod in layers} == {4} and m.lm_head.config.group_size == 128


def test_gptq_variant_calibrates_instead_of_rounding_and_bad_names_are_refused(monkeypatch):
    from benchmarks import ptq_methods

    ids = torch.randint(0, 32000, (4, 48), generator=torch.Generator().manual_seed(0))
    seen = []

    def calibration(tok, n_seqs, seq_len, batch):
        seen.append((n_seqs, seq_len, batch))
        return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], {}

    build = ci._build
    monkeypatch.setattr(ptq_methods, "_lm_calibration", calibration)
    monkeypatch.setattr(ci, "_build", lambda name: (build(name)[0], object()))  # a tokenizer stand-in
    g, _ = ci._make("llama_small", "W2g32+gptq", False)
    r, _ = ci._make("llama_small", "W2g32", False)
    c = ci.GPTQ_CALIBRATION
    assert seen == [(c["sequences"], c["seq_len"], c["batch"])]
    lg, lr = g.model.layers[1].mlp.up_proj, r.model.layers[1].mlp.up_proj
    assert lg.bit_groups == [2] and lg.config.group_size == 32 and lr.config.group_size == 32
    assert not isinstance(g.lm_head, QuantLinear)  # --head float
    wg, wr = lg.to_float(torch.float32).weight, lr.to_float(torch.float32).weight
    assert not torch.equal(wg, wr)  # calibrated codes, not round-to-nearest's
    monkeypatch.setattr(ci, "_build", build)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        ci._make("llama_small", "W2g32+gptq", True)
    with pytest.raises(ValueError, match="not combined"):
        ci._make("llama_small", "W2g32+gptq+emb", True)
    with pytest.raises(ValueError, match="unknown variant 'W5'"):
        ci._make("llama_small", "W5", True)


@pytest.mark.parametrize("base", [None, "float32"])
def test_prefill_ab_pairs_rounds_and_reports_their_ratios(base, monkeypatch):
    made = []
    make = ci._make
    monkeypatch.setattr(ci, "_make", lambda model, variant, head: made.append((variant, head)) or make(model, variant,
                                                                                                         head))
    spec = {"model": "llama_small", "threads": 1, "rounds": 3, "prefill": 16, "ab_variants": [("W4g128", True)]}
    if base:
        spec["base"] = base
    res = ci.prefill_ab(spec)
    assert made == [(base or "bfloat16", False), ("W4g128", True)] and res["base"] == (base or "bfloat16")
    v = res["variants"]["W4g128+head"]
    assert v["variant"] == "W4g128" and v["head"] is True
    for mode in ("all", "gen"):
        b, q = v[mode]["base_s"], v[mode]["variant_s"]
        assert len(b) == len(q) == 3 and min(b) > 0 and min(q) > 0
        assert v[mode]["ratio_median"] == statistics.median(x / y for x, y in zip(b, q))
        assert v[mode]["ratio_of_minima"] == min(b) / min(q)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        ci.prefill_ab({**spec, "base": "float16"})


def test_decode_ab_rotates_three_models_and_reports_ratios_against_both_baselines():
    spec = {"model": "llama_small", "threads": 1, "rounds": 3, "prompt": 4, "new": 3,
            "ab_variants": [("W4g128", True)]}
    res = ci.decode_ab(spec)
    v = res["variants"]["W4g128+head"]
    assert v["variant"] == "W4g128" and v["head"] is True
    rates = v["tok_s"]
    assert set(rates) == {"float32", "bfloat16", "variant"} and all(len(r) == 3 and min(r) > 0 for r in rates.values())
    for base in ("float32", "bfloat16"):
        assert v[f"vs_{base}"]["ratio_median"] == statistics.median(
            q / b for q, b in zip(rates["variant"], rates[base]))
        assert v[f"vs_{base}"]["ratio_of_maxima"] == max(rates["variant"]) / max(rates[base])


def test_compile_ab_times_six_decodes_per_round_and_reports_paired_ratios():
    """``--compile-ab``: every round times the float32, bfloat16 and compiled bfloat16 baselines and the variant
    eager, compiled and compiled with its guards skipped; the ratios are medians of per-round ratios; Dynamo
    compiled graphs for both compiled models."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    spec = {"model": "llama_small", "threads": 1, "rounds": 2, "prompt": 4, "new": 3, "backend": "eager",
            "ab_variants": [("W4g128", True)], "cpp_wrapper": True}  # (the eager backend ignores the option)
    res = ci.compile_ab(spec)
    v = res["variants"]["W4g128+head"]
    rates = v["tok_s"]
    assert set(rates) == {"float32", "bfloat16", "bfloat16_compiled", "eager", "compiled", "compiled_skip_guards",
                          "compiled_cpp"}
    assert all(len(r) == 2 and min(r) > 0 for r in rates.values())
    for key, bases in (("eager", ("float32", "bfloat16", "bfloat16_compiled")),
                       ("compiled", ("float32", "bfloat16", "bfloat16_compiled", "eager")),
                       ("compiled_skip_guards", ("compiled",)),
                       ("compiled_cpp", ("float32", "bfloat16", "bfloat16_compiled", "eager", "compiled"))):
        assert set(v[key]) == {f"vs_{b}" for b in bases}
        for b in bases:
            assert v[key][f"vs_{b}"]["ratio_median"] == statistics.median(
                q / r for q, r in zip(rates[key], rates[b]))
    assert v["compile_first_call_s"] > 0 and v["compile_cpp_first_call_s"] > 0
    assert counters["stats"]["unique_graphs"] >= 3
    table = ci._compile_ab_table([res])
    assert table.count("| llama_small | W4g128+head |") == 2 and table.count("\n") == 6
    assert f"| {v['compiled_cpp']['vs_compiled']['ratio_median']:.2f} |" in table.split("C++ wrapper")[1]
    del v["compiled_cpp"]
    assert ci._compile_ab_table([res]).count("\n") == 2  # without the C++ wrapper: no second table
    torch._dynamo.reset()


def test_decode_path_logits_are_the_teacher_forced_forward_one_position_at_a_time():
    """The accuracy check's decode path: positions fed one at a time through the KV cache give the logits of one
    forward over all of them (same weights, the torch reference path for both: only the cache differs)."""
    from medquant.kernels import force_backend

    m, _ = ci._make("llama_small", "W4g128", True)
    ids = torch.randint(0, m.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), force_backend("torch"):
        full = m(input_ids=ids).logits[0].float()
        steps = ci._decode_path_logits(m, ids)
    assert steps.shape == full.shape
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
    assert torch.equal(steps.argmax(-1), full.argmax(-1))


def test_cached_step_uses_the_installed_cache_keyword_without_deprecation_warnings():
    """``cached_step`` passes the KV cache under the keyword the installed transformers takes, so no deprecation
    warning is raised, and continuing from its cache gives the logits of the full forward."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.common.lm import cached_step
    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval()
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        first, cache = cached_step(m, ids[:, :5])
        step, cache2 = cached_step(m, ids[:, 5:], cache)
        full = m(input_ids=ids).logits
    assert cache2 is not None and first.logits.shape[1] == 5
    torch.testing.assert_close(step.logits[0, -1], full[0, -1], rtol=1e-4, atol=1e-4)


def test_accuracy_of_a_bfloat16_model_is_also_judged_by_its_float32_copy(monkeypatch):
    """A ``@bf16`` row's reference path runs in bfloat16 too, so ``_accuracy`` adds the float32 copy of the same
    model as the judge: its figures are the hand-computed agreements of the fast path and of the bfloat16
    reference path with the float32 copy's next tokens; a float32 model gets no such entry."""
    import copy

    from benchmarks.common import lm
    from medquant.kernels import force_backend

    texts = ["the lungs are clear without effusion", "heart size is normal and the mediastinum is unremarkable"]
    monkeypatch.setattr(lm, "report_texts", lambda split, n=None: texts)

    def tok(t, return_tensors=None):
        ids = [ord(c) % 256 + 1 for c in t]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    m, _ = ci._make("llama_small", "W4g128@bf16", True)
    acc = ci._accuracy(m, tok, 2, 12)
    m32 = copy.deepcopy(m).float()
    hits = {"fast": 0, "reference": 0}
    with torch.no_grad():
        for t in texts:
            inp = tok(t, return_tensors="pt")["input_ids"][:, :12]
            fast = m(input_ids=inp).logits.argmax(-1)
            with force_backend("torch"):
                ref, best = m(input_ids=inp).logits.argmax(-1), m32(input_ids=inp).logits.argmax(-1)
            hits["fast"] += int((fast == best).sum())
            hits["reference"] += int((ref == best).sum())
    f32 = acc["float32_copy"]
    assert acc["tokens"] == 24
    assert f32["fast_agreement"] == hits["fast"] / 24 and f32["reference_agreement"] == hits["reference"] / 24
    assert 0 <= f32["decode_path_agreement"] <= 1 and f32["ppl"] > 1
    assert ci._copy32_cell(f32) == (f"{100 * hits['fast'] / 24:.1f}% / {100 * f32['decode_path_agreement']:.1f}% / "
                                    f"{100 * hits['reference'] / 24:.1f}%") and ci._copy32_cell(None) == "-"
    assert "float32_copy" not in ci._accuracy(ci._make("llama_small", "W4g128", True)[0], tok, 1, 8)


def test_out_names_a_results_file_unless_it_is_a_path(tmp_path):
    # a bare --out stem lands in benchmarks/results/, like the other benchmarks' --out (it used to land in the
    # working directory); a path with a folder is used as given; no --out: the mode's default name there
    assert ci._out_stem("cpu_inference_x", "d") == ci.RESULTS / "cpu_inference_x"
    assert ci._out_stem(str(tmp_path / "x"), "d") == tmp_path / "x"
    assert ci._out_stem("sub/x", "d") == Path("sub/x")
    assert ci._out_stem(None, "cpu_inference_decode_ab") == ci.RESULTS / "cpu_inference_decode_ab"
    assert ci.RESULTS.name == "results" and ci.RESULTS.parent.name == "benchmarks"


def test_an_activations_variant_switches_the_setting_and_gives_the_callers_back():
    """``W4g128a8`` runs with int8 activations; the next model built gets the caller's setting back, and other
    variants never change it (aoti_decode's split control sets "split" and builds W4g128 under it)."""
    from benchmarks import cpu_inference as ci
    from medquant.kernels import get_cpu_native4_activations, set_cpu_native4_activations

    set_cpu_native4_activations("split")
    try:
        ci._variant_activations("W4g128")
        assert get_cpu_native4_activations() == "split"
        ci._variant_activations("W4g128a8")
        assert get_cpu_native4_activations() == "int8"
        ci._variant_activations("W4g128a8")  # twice in a row: still int8, and "split" is what comes back
        assert get_cpu_native4_activations() == "int8"
        ci._variant_activations("float32")
        assert get_cpu_native4_activations() == "split" and not ci._activations_before
    finally:
        ci._activations_before.clear()
        set_cpu_native4_activations(None)
