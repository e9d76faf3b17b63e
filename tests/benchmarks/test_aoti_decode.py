"""benchmarks.aoti_decode: the decode step exported and compiled by AOTInductor gives ``generate``'s tokens."""
from __future__ import annotations

import pytest
import torch

from benchmarks import aoti_decode as ad
from benchmarks import cpu_inference as ci
from medquant.kernels.native import native_status


@pytest.mark.slow
def test_aot_step_decodes_the_tokens_generate_does(tmp_path):
    """The trial's claim rests on this: the AOT package (quantized layers bound to the native kernels, the graph
    calling them by handle) decodes greedily exactly the tokens ``generate`` picks for the same quantized model,
    prompt fed one token at a time into the package's own static cache."""
    if not native_status().get("gemv4"):
        pytest.skip("no native weight-only kernel on this CPU: nothing to bind")
    m, _ = ci._make("llama_small", "W4g128", True)
    ref_model, _ = ci._make("llama_small", "W4g128", True)
    ids = torch.randint(0, m.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=False,
                                 pad_token_id=0)[0, 6:].tolist()
    load, export_s, compile_s = ad.aot_step(m, 6 + 8 + 1, tmp_path / "step.pt2")
    assert (tmp_path / "step.pt2").is_file() and export_s > 0 and compile_s > 0
    with torch.no_grad():
        rate, toks = ad.aot_greedy(load(), ids, 8)
        again = ad.aot_greedy(load(), ids, 8)[1]  # a fresh load starts from an empty cache
    assert toks == ref and again == ref and rate > 0


def test_aot_step_refuses_a_model_with_nothing_to_bind(tmp_path):
    m, _ = ci._make("llama_small", "float32", False)
    with pytest.raises(RuntimeError, match="no quantized layer could be bound"):
        ad.aot_step(m, 8, tmp_path / "step.pt2")
