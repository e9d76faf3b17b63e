"""QLoRAAdapter: NF4 base through bitsandbytes, LoRA through PEFT, on the tiny zoo models (SPEC section 7)."""
from __future__ import annotations

import copy
import math

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from medquant.models import modules_in_role
from medquant.qlora import DEFAULT_TARGETS, QLoRAAdapter, nf4_modules, resolve_targets
from medquant.quant import QuantConfig, quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME


def _nf4_levels() -> np.ndarray:
    """The 16 NF4 levels built as in the QLoRA paper: N(0,1) quantiles, 8 positive + 7 negative + zero."""
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return v / np.abs(v).max()


def _lm_batch(model, entry, seed=0):
    inp = entry.inputs(model)
    batch = dict(inp)
    batch["labels"] = inp["input_ids"].clone()
    return inp, batch


def _trained_llama(steps=2):
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    inp, batch = _lm_batch(model, entry)
    ad = QLoRAAdapter(model)
    ad.train([batch] * steps, lr=5e-2, progress=False)
    return entry, ad, inp


def test_tiny_llama_only_lora_trainable_and_linears_are_nf4():
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    ad = QLoRAAdapter(model)
    trainable = [n for n, _ in ad.trainable_parameters()]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x 7 projections, an A and a B each
    assert len(trainable) == 2 * 7 * 2
    lang_linears = [n for n in modules_in_role(model, "language") if n.rsplit(".", 1)[-1] in DEFAULT_TARGETS]
    assert len(lang_linears) == 14
    for name, mod in ad.model.named_modules():
        if name.endswith(".base_layer"):
            assert isinstance(mod, bnb.nn.Linear4bit), name
            assert mod.weight.quant_state.quant_type == "nf4"
            assert mod.weight.quant_state.nested, "double quantization must be on"
            assert not mod.weight.requires_grad
    assert len(nf4_modules(ad.model)) == 14
    head = ad.model.base_model.model.lm_head
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32
    # rank-stabilised scaling alpha / sqrt(r), as PEFT applies it
    lora_layer = ad.model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_layer.scaling["default"] == pytest.approx(16 / math.sqrt(16)) == pytest.approx(ad.scaling)
    assert lora_layer.r["default"] == 16
    assert lora_layer.lora_dropout["default"].p == pytest.approx(0.1)


def test_nf4_weights_lie_on_the_nf4_grid_and_forward_uses_them():
    """Independent check of the bitsandbytes layers: every dequantized block / its absmax is an NF4 level."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    model = nn.Sequential(lin)
    ref_w = lin.weight.detach().clone()
    from medquant.qlora import nf4_quantize_

    nf4_quantize_(model, ["0"])
    q = model[0]
    deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    blocks = deq.reshape(-1, 64)
    absmax = blocks.abs().max(1, keepdim=True).values
    ratio = (blocks / absmax).numpy()
    levels = _nf4_levels()
    dist = np.abs(ratio[..., None] - levels).min(-1)
    assert dist.max() < 1e-3
    # the quantization error is bounded by half the widest gap between levels times the block absmax
    half_gap = np.diff(levels).max() / 2
    err = (deq - ref_w).reshape(-1, 64).abs()
    assert (err <= absmax * half_gap * 1.02 + 1e-6).all()
    assert err.max() > 0  # a lossy format
    x = torch.randn(5, 128)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, deq, lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("names", [["0"], ["2"], ["0", "2"]])
def test_a_linear_bound_under_two_names_stays_one_module_in_nf4_and_back(names):
    """``nn.Sequential(lin, act, lin)``: one Linear under the names "0" and "2". Naming either (or both) NF4-quantizes
    it once and binds that one Linear4bit under both names (before: the other name kept the float Linear, or got a
    second NF4 copy); dequantizing gives one float Linear under both names again."""
    from medquant.qlora import nf4_dequantize_, nf4_quantize_

    torch.manual_seed(0)
    lin = nn.Linear(128, 128)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    calls = []
    lin.register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))
    assert nf4_quantize_(model, names) == [names[0]]
    q = model[0]
    assert isinstance(q, bnb.nn.Linear4bit) and model[2] is q
    deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    x = torch.randn(3, 128)
    ref = nn.functional.linear(torch.relu(nn.functional.linear(x, deq, lin.bias)), deq, lin.bias)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert calls == ["Linear4bit"] * 2  # the Linear's hook runs around the NF4 layer at both uses
    assert nf4_dequantize_(model) == ["0"]
    assert isinstance(model[0], nn.Linear) and model[2] is model[0]
    torch.testing.assert_close(model[0].weight, deq)
    model(x)
    assert calls == ["Linear4bit"] * 2 + ["Linear"] * 2


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_vlm_vision_tower_unchanged_and_unquantized(name):
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    frozen_names = set(modules_in_role(model, "vision")) | set(modules_in_role(model, "projector"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in frozen_names}
    assert before
    _, batch = _lm_batch(model, entry)
    ad = QLoRAAdapter(model)
    assert all(n not in frozen_names for n in ad.targets + ad.quantized)
    losses = ad.train([batch] * 2, lr=5e-2, progress=False)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    after = dict(ad.model.named_parameters())
    for n, p in before.items():
        assert torch.equal(after["base_model.model." + n], p), n
    for n in frozen_names:
        assert not isinstance(ad.model.base_model.model.get_submodule(n), bnb.nn.Linear4bit)
    lora_b = [p for n, p in ad.trainable_parameters() if ".lora_B." in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "training must move the LoRA B matrices away from zero"


def test_save_and_load_gives_identical_outputs(tmp_path):
    entry, ad, inp = _trained_llama()
    ad.model.eval()
    with torch.no_grad():
        ref = entry.output(ad.model, inp)
    ad.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    fresh = entry.build()
    with torch.no_grad():
        plain = entry.output(fresh, inp)
    loaded = QLoRAAdapter.load(fresh, tmp_path / "adapter")
    loaded.model.eval()
    with torch.no_grad():
        out = entry.output(loaded.model, inp)
    assert torch.equal(out, ref)
    assert not torch.allclose(plain, ref, atol=1e-3)  # the adapter really changes the model


def test_merge_matches_adapter_model_and_requantizes():
    entry, ad, inp = _trained_llama()
    ad.model.eval()
    base = ad.model.base_model.model
    qproj = base.model.layers[0].self_attn.q_proj
    w_deq = bnb.functional.dequantize_4bit(qproj.base_layer.weight.data, qproj.base_layer.weight.quant_state)
    expected_w = w_deq + ad.scaling * qproj.lora_B["default"].weight @ qproj.lora_A["default"].weight
    with torch.no_grad():
        ref = entry.output(ad.model, inp)
    merged = ad.merge()
    assert not nf4_modules(merged) and not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected_w, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        out = entry.output(merged, inp)
    # stated tolerance: float-rounding level relative to the logit scale (same dequantized weights)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    # merged model differs from the original float model by the NF4 error (+ the adapter)
    orig = entry.build()
    with torch.no_grad():
        assert (entry.output(orig, inp) - out).abs().max() > 1e-3
    from medquant.quant import quantize_

    quantize_(merged, {"@language": QuantConfig(8)})
    assert len(quantized_modules(merged)) == 14
    with torch.no_grad():
        out8 = entry.output(merged, inp)
    assert (out8 - out).abs().max() <= 0.05 * out.abs().max()


def test_hf_trainer_compatibility(tmp_path):
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    ad = QLoRAAdapter(model)
    ids = entry.inputs(model)["input_ids"]
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids] * 2
    before = {n: p.detach().clone() for n, p in ad.trainable_parameters()}
    trainer = ad.trainer(data, tmp_path / "out", max_steps=2, learning_rate=5e-2, disable_tqdm=True,
                         logging_steps=1)
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    after = dict(ad.trainable_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items())


def test_plain_lora_keeps_float_base():
    entry = ZOO_BY_NAME["qwen2"]
    model = entry.build()
    ad = QLoRAAdapter(model, quantize=False, r=4)
    assert not nf4_modules(ad.model) and ad.quantized == []
    assert len(ad.targets) == 14
    inp = entry.inputs(model)
    ref = entry.output(entry.build(), inp)
    ad.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(entry.output(ad.model, inp), ref)  # B = 0 at start: identical to the base


def test_bad_inputs_raise_clear_errors():
    entry = ZOO_BY_NAME["llama"]
    with pytest.raises(ValueError, match="r must be"):
        QLoRAAdapter(entry.build(), r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        QLoRAAdapter(entry.build(), lora_dropout=1.5)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        resolve_targets(entry.build(), ["qkv_proj"])
    with pytest.raises(ValueError, match="no language role"):
        QLoRAAdapter(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(FileNotFoundError, match="medquant_qlora.json"):
        QLoRAAdapter.load(entry.build(), "/nonexistent-dir")
    ad = QLoRAAdapter(entry.build())
    with pytest.raises(ValueError, match="the training data is empty"):
        ad.train([], progress=False)
    for steps in (0, -1):
        with pytest.raises(ValueError, match=f"steps must be >= 1 .*got {steps}"):
            ad.train([_lm_batch(ad.model, entry)[1]], steps=steps, progress=False)


def test_inference_does_not_repack_by_default_and_merge_reads_the_cpu_packed_layout():
    """bitsandbytes repacks NF4 weights for its AVX512-BF16 CPU kernel at the first eval call (bf16 absmax), which
    made outputs CPU-dependent and broke merging; medquant turns that off, and merge() reads the packed layout."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from medquant.qlora.nf4 import _dequantized_linear

    entry, ad, inp = _trained_llama()
    ad.model.eval()
    qproj = ad.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    before = qproj.weight.data.clone()
    with torch.no_grad():
        entry.output(ad.model, inp)
    assert not qproj.support_avx512bf16_for_cpu
    assert torch.equal(qproj.weight.data, before)  # layout untouched on every CPU
    # the packed layout, produced by bitsandbytes' own (pure torch) converter, dequantizes to the same codes with
    # the block absmax rounded to bfloat16; reference: bitsandbytes' dequantize with that absmax, unpacked
    st = qproj.weight.quant_state
    absmax = bnb.functional.dequantize_blockwise(st.absmax, st.state2) + st.offset
    ref_state = bnb.functional.QuantState(absmax=absmax.bfloat16().float(), shape=st.shape, code=st.code,
                                          blocksize=st.blocksize, quant_type=st.quant_type, dtype=st.dtype)
    ref = bnb.functional.dequantize_4bit(qproj.weight.data, ref_state)
    exact = bnb.functional.dequantize_4bit(qproj.weight.data, st)
    packed = copy.deepcopy(qproj)
    packed.weight.data, packed.weight.quant_state = _convert_weight_packed_for_cpu(packed.weight.data.clone(),
                                                                                   copy.deepcopy(st))
    assert packed.weight.quant_state.packing_format_for_cpu and packed.weight.data.shape != before.shape
    got = _dequantized_linear(packed, torch.float32).weight
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert not torch.equal(got, exact)  # the bf16 rounding is real, so the test sees the layout, not a copy
    assert got.shape == exact.shape and (got - exact).abs().max() <= 0.01 * exact.abs().max()


def test_merge_to_bfloat16_casts_the_whole_model_and_runs():
    entry = ZOO_BY_NAME["llama"]
    merged = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        merged[dtype] = QLoRAAdapter(entry.build(), r=4, lora_dropout=0.0).merge(dtype)
    m32, m16 = merged[torch.float32], merged[torch.bfloat16]
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    # every weight = the float32 merge cast by torch (lora_B starts at 0: the merge is the dequantized base)
    for (n, p32), (_, p16) in zip(m32.named_parameters(), m16.named_parameters(), strict=True):
        assert torch.equal(p16, p32.to(torch.bfloat16)), n
    inp = entry.inputs(m32)
    with torch.no_grad():
        out16, out32 = entry.output(m16, inp), entry.output(m32, inp)
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - out32).abs().max() <= 0.05 * out32.abs().max()


@pytest.mark.parametrize("meta, match", [
    ({"format": 1, "targets": []}, r"medquant_qlora.json has no 'settings' key"),
    ({"format": 1, "settings": {"r": 8}}, r"medquant_qlora.json has no 'targets' key"),
    ({"format": 1, "settings": [1], "targets": []}, r"'settings' must be an object .*'compute_dtype'"),
])
def test_load_of_an_incomplete_settings_file_names_the_file_and_the_key(tmp_path, meta, match):
    import json

    (tmp_path / "medquant_qlora.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        QLoRAAdapter.load(nn.Sequential(nn.Linear(4, 4)), tmp_path)


def test_load_onto_another_architecture_is_refused_before_the_model_changes(tmp_path):
    """QLoRAAdapter.load compared the target modules only after quantizing the model to NF4 and wrapping it with
    PEFT: a refused load left the user's model changed. The targets are now resolved and compared first."""
    import json

    entry = ZOO_BY_NAME["llama"]
    ad = QLoRAAdapter(entry.build(), target_modules=["q_proj", "v_proj"])
    ad.save(tmp_path)
    cfg = json.loads((tmp_path / "medquant_qlora.json").read_text())
    cfg["targets"] = cfg["targets"][:-1]  # the adapter of a model with one target fewer
    (tmp_path / "medquant_qlora.json").write_text(json.dumps(cfg))
    fresh = entry.build()
    before = {n: type(m) for n, m in fresh.named_modules()}
    with pytest.raises(ValueError, match="target modules differ"):
        QLoRAAdapter.load(fresh, tmp_path)
    assert {n: type(m) for n, m in fresh.named_modules()} == before  # no NF4 layer, no PEFT wrapper
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in fresh.modules())
