"""format="gguf" of a float64 model: GGUF's float tensors are F32 / F16, so its values are rounded, and the report's
error of each float tensor is that rounding, not 0.0. Reference: plain torch, ``max |float32(w) - w|`` in float64
(and ``1 + w`` for Gemma 3's norms, which the file stores)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

from medquant.deploy import export


def _perturbed(model):
    """Weights with float64 detail below float32's resolution."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 1e-9 * (1 + p.abs()))
    return model


def _rounding(t: torch.Tensor, dtype=torch.float32) -> float:
    t = t.detach().double()
    return float((t.to(dtype).double() - t).abs().max())


@pytest.mark.parametrize("float_type", ["F32", "F16"])
def test_float64_llama_rows_report_their_rounding(float_type, tok_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    model = _perturbed(LlamaForCausalLM(cfg).eval().double())
    report = export(model, tmp_path / "m.gguf", format="gguf", source=tok_dir, float_type=float_type)
    rows = {r.name: r for r in report.layers}
    params = dict(model.named_parameters())
    matrix_type = torch.float32 if float_type == "F32" else torch.float16
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "lm_head.weight"):
        want = _rounding(params[name], matrix_type)
        assert want > 0
        assert rows[name].max_abs_error == pytest.approx(want, rel=1e-6), name
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.k_proj.bias"):  # always F32
        want = _rounding(params[name])
        assert want > 0
        assert rows[name].max_abs_error == pytest.approx(want, rel=1e-6), name


def test_float64_gemma3_norms_report_the_rounding_of_one_plus_w(tok_dir, tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=8)
    model = _perturbed(Gemma3ForCausalLM(cfg).eval().double())
    report = export(model, tmp_path / "g.gguf", format="gguf", source=tok_dir)
    rows = {r.name: r for r in report.layers}
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.q_norm.weight", "model.norm.weight"):
        w = dict(model.named_parameters())[name]
        want = _rounding(1.0 + w)
        assert want > 0
        assert rows[name].max_abs_error == pytest.approx(want, rel=1e-6), name
