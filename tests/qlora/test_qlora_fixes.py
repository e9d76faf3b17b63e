"""Regressions of the QLoRA fuzzing round: exact targets, tied-head merge, packed save, NF4 refusals, NF4Config through
quantize_, no silent no-quantize, train(steps), clear errors that leave the model unchanged, packing shapes."""
from __future__ import annotations

import math
import warnings

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from medquant.qlora import NF4Config, QLoRAAdapter, nf4_modules, nf4_quantize_
from medquant.qlora.nf4 import _dequantized_linear
from medquant.quant import QuantConfig, quantize_
from medquant.testing.zoo import ZOO_BY_NAME


def _randomise(ad: QLoRAAdapter, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, p in ad.trainable_parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _adapted(ad: QLoRAAdapter) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in ad.model.named_modules() if hasattr(m, "lora_A"))


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.enc = nn.Module()
        self.enc.proj = nn.Linear(8, 8)
        self.enc.inner = nn.Module()
        self.enc.inner.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.enc.inner.proj(self.enc.proj(self.proj(x)))


def test_peft_adapts_exactly_the_resolved_targets():
    """PEFT reads a list of target names as suffixes: 'proj' also adapted 'enc.proj' and 'enc.inner.proj'."""
    for targets, want in ((["re:proj"], ["proj"]), (["re:enc\\.proj"], ["enc.proj"]),
                          (["re:proj", "re:enc\\.inner\\.proj"], ["enc.inner.proj", "proj"])):
        ad = QLoRAAdapter(_Nested(), target_modules=targets, target_roles=(), quantize=False, r=2)
        assert sorted(ad.targets) == want
        assert _adapted(ad) == want
    # the default targets of a zoo LM: still every q/k/v/o/gate/up/down projection of the language model
    ad = QLoRAAdapter(ZOO_BY_NAME["llama"].build(), r=2)
    assert _adapted(ad) == sorted(ad.targets) and len(ad.targets) == 14


def test_merge_of_a_lora_on_a_tied_head_keeps_the_input_embeddings():
    """gemma3_text ties lm_head to embed_tokens: merge() folded B A into the shared matrix (rel. error 2.2)."""
    entry = ZOO_BY_NAME["gemma3_text"]
    model = entry.build()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens.weight.detach().clone()
    inp = entry.inputs(model)
    ad = QLoRAAdapter(model, target_modules=["lm_head"], target_roles=("head",), lora_dropout=0.0, r=4)
    _randomise(ad)
    ad.model.eval()
    lin = ad.model.base_model.model.lm_head
    a, b = lin.lora_A["default"].weight.detach().clone(), lin.lora_B["default"].weight.detach().clone()
    with torch.no_grad():
        ref = entry.output(ad.model, inp)
    merged = ad.merge()
    with torch.no_grad():
        out = entry.output(merged, inp)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()  # the documented tolerance
    assert torch.equal(merged.model.embed_tokens.weight, embed)  # the input embeddings untouched
    torch.testing.assert_close(merged.lm_head.weight, embed + ad.scaling * b @ a, rtol=0, atol=1e-6)  # by hand
    assert merged.config.tie_word_embeddings is False  # so save_pretrained / from_pretrained keep them apart


def test_save_with_cpu_packing_leaves_the_model_bit_identical(tmp_path):
    """bitsandbytes' Linear4bit._save_to_state_dict un-packs its CPU layout in the module, re-quantizing the absmax."""
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    inp = entry.inputs(model)
    ad = QLoRAAdapter(model, cpu_bf16_packing=True, lora_dropout=0.0, r=4)
    _randomise(ad)
    ad.model.eval()
    with torch.no_grad():
        before = entry.output(ad.model, inp)
    ad.save(tmp_path)
    with torch.no_grad():
        after = entry.output(ad.model, inp)
        again = entry.output(ad.model, inp)
    assert torch.equal(before, after) and torch.equal(after, again)
    loaded = QLoRAAdapter.load(entry.build(), tmp_path)
    loaded.model.eval()
    with torch.no_grad():
        assert torch.equal(entry.output(loaded.model, inp), before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nf4_refuses_non_finite_weights_and_leaves_the_model_unchanged(bad):
    """One NaN made the whole double-quantized layer NaN; the QuantConfig handler's refusal and message."""
    model = nn.Sequential(nn.Linear(128, 4), nn.Linear(4, 128))
    with torch.no_grad():
        model[1].weight[2, 1] = bad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="^1: weights contain 1 NaN/inf values; quantization needs finite weights"):
        nf4_quantize_(model, ["0", "1"])
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear  # layer 0 was not swapped either
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k != "1.weight")
    llama = ZOO_BY_NAME["llama"].build()
    with torch.no_grad():
        llama.model.layers[1].mlp.down_proj.weight[0, 5] = bad
    snap = _snapshot(llama)
    with pytest.raises(ValueError, match="^model.layers.1.mlp.down_proj: weights contain 1 NaN/inf values"):
        QLoRAAdapter(llama, r=2)
    assert _unchanged(llama, snap, nan_ok=True) and not nf4_modules(llama)


def test_nf4_refuses_meta_and_empty_weights():
    with pytest.raises(ValueError, match="meta device.*materialise the weights first"):
        nf4_quantize_(nn.Sequential(nn.Linear(16, 4, device="meta")), ["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: initializing zero-element tensors is a no-op
        empty = nn.Sequential(nn.Linear(0, 4))
    with pytest.raises(ValueError, match=r"weight is empty \(4, 0\): there is nothing to quantize"):
        nf4_quantize_(empty, ["0"])


def test_quantize_takes_nf4config_and_matches_the_adapters_nf4_base():
    """medquant.quantize_(m, NF4Config()) raised TypeError in the config map's value check."""
    entry = ZOO_BY_NAME["llama"]
    base = entry.build()
    m1, m2, m3 = entry.build(), entry.build(), entry.build()
    for m in (m1, m2, m3):
        m.load_state_dict(base.state_dict())
    quantize_(m1, {"@language": NF4Config()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m2, NF4Config(double_quant=False))
    ad = QLoRAAdapter(m3, r=2)
    lang = sorted(nf4_modules(m1))
    assert lang == sorted(ad.quantized) and len(lang) == 14
    assert sorted(nf4_modules(m2)) == sorted([*lang, "lm_head"])  # a single config covers every Linear
    for name in lang:
        w = base.get_submodule(name).weight.detach()
        q, st = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ref = bnb.functional.dequantize_4bit(q, st)  # bitsandbytes itself, from the float weight
        assert torch.equal(_dequantized_linear(m1.get_submodule(name), torch.float32).weight, ref)
        assert torch.equal(_dequantized_linear(m3.get_submodule(name), torch.float32).weight, ref)
        q2, st2 = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        assert torch.equal(_dequantized_linear(m2.get_submodule(name), torch.float32).weight,
                           bnb.functional.dequantize_4bit(q2, st2))


def test_quantize_true_without_any_linear_to_quantize_raises():
    """quantize=True silently quantized nothing when the quantize roles are absent."""
    plain = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"quantize=True, but Sequential has no nn.Linear in quantize_roles "
                                         r"\('language',\).*quantize=False"):
        QLoRAAdapter(plain, target_modules=["re:0", "re:2"], target_roles=(), r=2)
    with pytest.raises(ValueError, match=r"quantize_roles \(\)"):
        QLoRAAdapter(plain, target_modules=["re:0"], target_roles=(), quantize_roles=(), r=2)
    llama = ZOO_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match=r"quantize_roles \('vision',\) \(medquant.models.model_roles found "
                                         r"\['head', 'language'\]\)"):
        QLoRAAdapter(llama, quantize_roles=("vision",))
    assert not nf4_modules(llama)
    ad = QLoRAAdapter(plain, target_modules=["re:0", "re:2"], target_roles=(), quantize=False, r=2)
    assert ad.quantized == [] and _adapted(ad) == ["0", "2"]


def test_train_steps_repeats_passes_over_short_data():
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    inp = entry.inputs(model)
    batch = {**inp, "labels": inp["input_ids"].clone()}
    ad = QLoRAAdapter(model, r=2)
    seen = []
    hook = ad.model.register_forward_pre_hook(lambda mod, args, kw: seen.append(1), with_kwargs=True)
    assert len(ad.train([batch, batch], steps=5, progress=False)) == 5
    assert len(seen) == 5
    assert len(ad.train([batch] * 3, steps=4, grad_accum=2, progress=False)) == 4  # over two 3-batch passes
    hook.remove()
    assert len(ad.train([batch, batch], progress=False)) == 2  # default: one pass
    assert len(ad.train(iter([batch, batch]), steps=5, progress=False)) == 2  # a one-shot iterator runs out


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def _unchanged(model: nn.Module, snap, nan_ok: bool = False) -> bool:
    state, types, grads = snap
    now = model.state_dict()
    return (now.keys() == state.keys() and all(torch.equal(now[k], state[k]) or nan_ok and torch.equal(
                now[k].nan_to_num(), state[k].nan_to_num()) for k in state)
            and [type(m) for m in model.modules()] == types and [p.requires_grad for p in model.parameters()] == grads)


def test_construction_errors_are_clear_and_leave_the_model_unchanged():
    entry = ZOO_BY_NAME["llama"]
    # (a) wrapping twice: the PeftModel, or the base it modified in place
    base = entry.build()
    ad = QLoRAAdapter(base, r=2)
    with pytest.raises(ValueError, match="the model is a PeftModel .*already has LoRA adapters"):
        QLoRAAdapter(ad.model, r=2)
    with pytest.raises(ValueError, match="LlamaForCausalLM already has LoRA adapters"):
        QLoRAAdapter(base, r=2)
    # (b) a model quantized by medquant.quantize_
    m = entry.build()
    quantize_(m, {"@language": QuantConfig(4)})
    snap = _snapshot(m)
    with pytest.raises(ValueError, match="holds 14 medquant quantized layer.*QLoRA needs float nn.Linear targets"):
        QLoRAAdapter(m, r=2)
    assert _unchanged(m, snap)
    # (c) one string is one target
    ad = QLoRAAdapter(entry.build(), target_modules="q_proj", r=2)
    assert ad.targets == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert ad.settings["target_modules"] == ["q_proj"] and _adapted(ad) == ad.targets
    with pytest.raises(TypeError, match="target_modules must be strings"):
        QLoRAAdapter(entry.build(), target_modules=["q_proj", 3])
    # (d) a bad regex names the target and the regex error; (e) no targets: refused before NF4 touches the model
    for kwargs, err, msg in (({"target_modules": ["re:q_proj("]}, ValueError,
                              r"target 're:q_proj\(' is not a valid regular expression: missing \)"),
                             ({"target_modules": []}, ValueError, "target_modules is empty"),
                             ({"target_modules": ["nope"]}, ValueError, "matches no nn.Linear"),
                             ({"quant_type": "int4"}, ValueError, "quant_type must be"),
                             ({"r": 0}, ValueError, "r must be")):
        m = entry.build()
        snap = _snapshot(m)
        with pytest.raises(err, match=msg):
            QLoRAAdapter(m, **kwargs)
        assert _unchanged(m, snap) and not nf4_modules(m), kwargs


def test_a_failure_inside_peft_rolls_the_model_back(monkeypatch):
    """The last step (PEFT's injection) failing after NF4 quantization: the float modules and flags come back."""
    import peft

    real = peft.get_peft_model

    def inject_then_fail(model, cfg):
        real(model, cfg)
        raise RuntimeError("injected")

    monkeypatch.setattr(peft, "get_peft_model", inject_then_fail)  # __init__ imports it from peft when called
    m = ZOO_BY_NAME["llama"].build()
    snap = _snapshot(m)
    with pytest.raises(RuntimeError, match="injected"):
        QLoRAAdapter(m, r=2)
    assert _unchanged(m, snap) and not nf4_modules(m)
    assert not any(hasattr(mod, "lora_A") for mod in m.modules())


def test_a_failure_inside_peft_rolls_back_a_shared_linear_under_both_names(monkeypatch):
    """A Linear bound under two names is NF4-quantized once under both (nf4_quantize_); the rollback after a
    failing PEFT step binds the float Linear under both names again."""
    import peft

    def fail(model, cfg):
        raise RuntimeError("injected")

    monkeypatch.setattr(peft, "get_peft_model", fail)
    m = ZOO_BY_NAME["llama"].build()
    layers = m.model.layers
    shared = layers[0].mlp.down_proj
    layers[1].mlp.down_proj = shared
    with pytest.raises(RuntimeError, match="injected"):
        QLoRAAdapter(m, r=2, target_modules=["q_proj", "v_proj"])
    assert layers[0].mlp.down_proj is shared and layers[1].mlp.down_proj is shared and not nf4_modules(m)


def test_a_shared_linear_is_refused_as_a_lora_target_and_quantized_once_when_left_out():
    """PEFT wraps a Linear bound under two names under one of them only (the other use would run unadapted):
    refused before anything changes. Left out of the targets, it is NF4-quantized once, bound under both names."""
    m = ZOO_BY_NAME["llama"].build()
    layers = m.model.layers
    shared = layers[0].mlp.down_proj
    layers[1].mlp.down_proj = shared
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj is one nn.Linear bound under 2 names"):
        QLoRAAdapter(m, r=2)
    assert _unchanged(m, snap) and not nf4_modules(m)
    ad = QLoRAAdapter(m, r=2, target_modules=["q_proj", "v_proj"])
    base = ad.model.base_model.model.model.layers
    assert isinstance(base[0].mlp.down_proj, bnb.nn.Linear4bit) and base[1].mlp.down_proj is base[0].mlp.down_proj


@pytest.mark.parametrize("shape", [(10, 64), (32, 96), (33, 128)])
def test_cpu_packing_leaves_odd_shapes_in_the_standard_layout(shape):
    """bitsandbytes' CPU packing needs out % 32 == 0 and in % 64 == 0; other shapes crashed at the first eval call."""
    out_f, in_f = shape
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f), nn.Linear(128, 64)).eval()  # layer 1: a packable shape
    w = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=rf"1 layer\(s\) stay in bitsandbytes' standard layout.*0 \({out_f}x{in_f}\)"):
        nf4_quantize_(model, ["0", "1"], cpu_bf16_packing=True)
    x = torch.randn(3, in_f)
    with torch.no_grad():
        y = model[0](x)
    q, st = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = x @ bnb.functional.dequantize_4bit(q, st).T + model[0].bias
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not model[0].support_avx512bf16_for_cpu


def test_merge_to_float32_of_a_bfloat16_base_is_computed_in_float32():
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().to(torch.bfloat16)
    ad = QLoRAAdapter(model, r=4, lora_dropout=0.0, quantize=False)
    _randomise(ad)
    mod = ad.model.base_model.model.model.layers[0].mlp.down_proj
    w = mod.base_layer.weight.detach().double()
    ref = w + ad.scaling * mod.lora_B["default"].weight.double() @ mod.lora_A["default"].weight.double()
    merged = ad.merge(torch.float32)
    got = merged.model.layers[0].mlp.down_proj.weight.double()
    assert (got - ref).abs().max() <= 1e-6 * ref.abs().max()  # bf16(W + dW) was off by ~2e-3
    assert math.isfinite(float(got.sum()))


def test_medquant_save_refuses_bitsandbytes_layers_and_writes_nothing(tmp_path):
    # their state dict holds bitsandbytes' packed bytes under the float names: medquant.load could not read it back
    import medquant as mq

    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    mq.save(float_model, tmp_path / "ckpt")  # an existing checkpoint at the path stays as it was
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    q = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    quantize_(q, NF4Config())
    assert isinstance(q[0], bnb.nn.Linear4bit)
    with pytest.raises(TypeError, match=r"bitsandbytes layers \(2, e.g. '0'.*QLoRAAdapter.save"):
        mq.save(q, tmp_path / "ckpt")
    with pytest.raises(TypeError, match="QLoRAAdapter.save"):
        mq.save(q, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    x = torch.randn(3, 64)
    assert torch.equal(mq.load(tmp_path / "ckpt", model=nn.Sequential(nn.Linear(64, 64), nn.ReLU(),
                                                                      nn.Linear(64, 8)))(x), float_model(x))


def test_a_nan_loss_on_one_ddp_rank_stops_every_rank_with_floating_point_error(tmp_path):
    """train_loop raised on the rank with the NaN loss before its backward pass, while the other rank went on into
    DDP's gradient all-reduce and waited for it (a hang under NCCL; here gloo's "connection closed" RuntimeError).
    Every rank must stop at the same step with FloatingPointError, parameters as after the last finite step."""
    import json

    import torch.multiprocessing as mp

    from tests.qlora.ddp_nan_worker import worker

    mp.spawn(worker, args=(str(tmp_path),), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["error"] == "FloatingPointError", r
        assert "training step 2" in r["message"] and "parameters are as after step 1" in r["message"], r
    assert res[0]["weight"] == res[1]["weight"]  # both ranks took the same (finite) first step only
    assert all(math.isfinite(v) for v in res[0]["weight"])
