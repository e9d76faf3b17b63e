"""Sequential (block-by-block) quantization gives exactly the whole-model ``quantize_`` result.

Reference: ``quantize_`` of the same float model (itself checked against numpy in tests/quant); equality is
``torch.equal`` on every state-dict tensor (bit-identical packed codes, scales, zeros, float rows) and on the
model outputs. Calibration inputs are checked against forward pre-hooks on the finished quantized model.
"""
from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from medquant import QuantConfig, QuantLinear, quantize_
from medquant.calibrate.sequential import BlockInputs, CheckpointSource, quantize_sequential
from medquant.quant.api import quantized_modules, resolve_configs
from medquant.testing.zoo import ZOO_BY_NAME, tiny_cnn, zoo_params

ROW_PATTERN = (2, 4, 8, 16, 0, 3)


def _plan(model):
    names = list(resolve_configs(model, QuantConfig(4)))
    rows = model.get_submodule(names[1]).weight.shape[0]
    cb = tuple(ROW_PATTERN[i % len(ROW_PATTERN)] for i in range(rows))
    return {names[1]: QuantConfig(4, scope="channel", channel_bits=cb), "re:.*": QuantConfig(3, group_size=64)}, \
        [names[-1]]


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].device.type != "meta", k
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert set(quantized_modules(a)) == set(quantized_modules(b))


def _skeleton(entry):
    with init_empty_weights():
        return entry.build()


@zoo_params
def test_sequential_from_checkpoint_equals_whole_model(entry, tmp_path):
    whole = entry.build()
    inputs = entry.inputs(whole)
    save_model(whole, str(tmp_path / "float.safetensors"))
    mapping, skip = _plan(whole)
    quantize_(whole, mapping, skip=skip)

    meta = _skeleton(entry)
    assert any(p.device.type == "meta" for p in meta.parameters())
    quantize_sequential(meta, mapping, skip=skip, device="cpu", checkpoint=tmp_path / "float.safetensors")
    _assert_same(whole, meta)
    assert torch.equal(entry.output(meta, inputs), entry.output(whole, inputs))


def test_a_tensor_saved_under_another_of_its_names_is_read_from_the_checkpoint(tmp_path):
    """Florence-2's BART ties ``shared``, both ``embed_tokens`` and ``lm_head``; ``save_model`` keeps one of those
    names, so the skeleton's ``model.language_model.shared.weight`` was not in the checkpoint (refused before).
    Reference: ``quantize_`` of the float model."""
    from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

    entry = EXTRA_ZOO_BY_NAME["florence2"]
    whole = entry.build()
    inputs = entry.inputs(whole)
    save_model(whole, str(tmp_path / "float.safetensors"))
    saved = set(load_file(tmp_path / "float.safetensors"))
    assert "model.language_model.shared.weight" not in saved  # what made the read fail
    quantize_(whole, QuantConfig(4, group_size=32))
    meta = _skeleton(entry)
    quantize_sequential(meta, QuantConfig(4, group_size=32), device="cpu", checkpoint=tmp_path / "float.safetensors")
    _assert_same(whole, meta)
    assert torch.equal(entry.output(meta, inputs), entry.output(whole, inputs))


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("from_checkpoint", [True, False], ids=["checkpoint", "memory"])
def test_moe_experts_are_quantized_per_expert_as_quantize_does(name, from_checkpoint, tmp_path):
    """MoE experts with 3-D weights (and routers left float) were left in floating point block by block: most of an
    MoE model's weights, and a skeleton streamed from a checkpoint could not be quantized afterwards without
    loading them whole. Reference: ``quantize_`` of the float model (per-expert QuantLinears)."""
    from medquant.quant.experts import QuantExperts
    from medquant.testing.zoo_moe import MOE_ZOO_BY_NAME

    entry = MOE_ZOO_BY_NAME[name]
    whole = entry.build()
    inputs = entry.inputs(whole)
    save_model(whole, str(tmp_path / "float.safetensors"))
    seq = _skeleton(entry) if from_checkpoint else entry.build()
    quantize_(whole, QuantConfig(4, group_size=32))
    quantize_sequential(seq, QuantConfig(4, group_size=32), device="cpu",
                        checkpoint=tmp_path / "float.safetensors" if from_checkpoint else None)
    assert any(isinstance(m, QuantExperts) for m in seq.modules())
    _assert_same(whole, seq)
    assert torch.equal(entry.output(seq, inputs), entry.output(whole, inputs))


@pytest.mark.parametrize("name", ["llava"])
def test_sequential_in_memory_equals_whole_model(name):
    entry = ZOO_BY_NAME[name]
    whole, seq = entry.build(), entry.build()
    mapping, skip = _plan(whole)
    quantize_(whole, mapping, skip=skip)
    quantize_sequential(seq, mapping, skip=skip, device="cpu", progress=True)
    _assert_same(whole, seq)


@pytest.mark.parametrize("name", ["gemma3_text", "qwen2_5_vl"])
def test_calibration_inputs_are_those_of_the_quantized_model(name):
    """per_block_fn sees each block's true call: kwargs of that block (Gemma 3 sliding/full masks, Qwen2.5-VL
    window/full cu_seqlens) and hidden states produced by the already quantized earlier blocks."""
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    inputs = entry.inputs(model)
    seen: dict[str, BlockInputs] = {}
    outputs: dict[str, list[torch.Tensor]] = {}

    def per_block(block, block_inputs):
        assert not quantized_modules(block)  # still float when the hook runs
        seen[block_inputs.name] = block_inputs
        assert block_inputs.configs and all(isinstance(c, QuantConfig) for c in block_inputs.configs.values())

    quantize_sequential(model, QuantConfig(4, group_size=32), [inputs], device="cpu", per_block_fn=per_block)
    # reference: run the finished quantized model with hooks on every block
    ref: dict[str, tuple] = {}
    hooks = []
    for n in seen:
        def pre(mod, args, kwargs, n=n):
            ref[n] = (args, kwargs)

        def post(mod, args, kwargs, out, n=n):
            outputs[n] = out[0] if isinstance(out, tuple) else out
        hooks.append(model.get_submodule(n).register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(model.get_submodule(n).register_forward_hook(post, with_kwargs=True))
    with torch.no_grad():
        model(**inputs, **({"use_cache": False} if "use_cache" in model.forward.__code__.co_varnames else {}))
    for h in hooks:
        h.remove()
    assert len(seen) == (4 if entry.is_vlm else 2)
    for n, bi in seen.items():
        args, kwargs = ref[n]
        h_ref = args[0] if args else kwargs["hidden_states"]
        assert torch.equal(bi.hidden_states[0], h_ref), n
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(bi.kwargs[0][k], v), (n, k)
        assert torch.equal(bi.run(model.get_submodule(n))[0], outputs[n]), n


def test_per_block_fn_changes_are_quantized():
    """A hook that rescales the float weights of each block: result = quantize_ of the rescaled float model."""
    entry = ZOO_BY_NAME["llama"]
    ref, seq = entry.build(), entry.build()
    inputs = entry.inputs(seq)
    with torch.no_grad():
        for n, m in ref.named_modules():
            if isinstance(m, nn.Linear) and ".layers." in n:
                m.weight.mul_(0.5)
    quantize_(ref, QuantConfig(4, group_size=32))

    def halve(block, _):
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(0.5)

    quantize_sequential(seq, QuantConfig(4, group_size=32), inputs, device="cpu", per_block_fn=halve)
    _assert_same(ref, seq)
    # control: without the hook the scales differ (the codes of symmetric RTN do not change under w -> w/2)
    plain = entry.build()
    quantize_sequential(plain, QuantConfig(4, group_size=32), device="cpu")
    key = "model.layers.0.mlp.up_proj.scales_4"
    assert torch.equal(plain.state_dict()[key] / 2, seq.state_dict()[key])
    assert not torch.equal(plain.state_dict()[key], seq.state_dict()[key])


def test_plain_module_with_explicit_blocks(tmp_path):
    cnn = tiny_cnn()
    ref = tiny_cnn()
    quantize_(ref, QuantConfig(4, scope="channel"))
    save_model(cnn, str(tmp_path / "cnn.safetensors"))
    with init_empty_weights():
        meta = tiny_cnn()
    quantize_sequential(meta, QuantConfig(4, scope="channel"), blocks=["features"], device="cpu",
                        checkpoint=tmp_path / "cnn.safetensors")
    _assert_same(ref, meta)


def test_errors(tmp_path):
    entry = ZOO_BY_NAME["llama"]
    meta = _skeleton(entry)
    with pytest.raises(ValueError, match="no checkpoint was given"):
        quantize_sequential(meta, 4, device="cpu")
    with pytest.raises(ValueError, match="needs calib_inputs"):
        quantize_sequential(entry.build(), 4, per_block_fn=lambda b, i: None)
    with pytest.raises(ValueError, match="found no decoder or vision blocks"):
        quantize_sequential(tiny_cnn(), 4, device="cpu")
    with pytest.raises(ValueError, match="is not a module"):
        quantize_sequential(entry.build(), 4, blocks=["model.layers.7"], device="cpu")
    with pytest.raises(ValueError, match="matches no module"):
        quantize_sequential(entry.build(), {"model.layers.9": 4}, device="cpu")
    small = entry.build()
    save_model(small.model.layers[0], str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="has no tensor"):
        quantize_sequential(_skeleton(entry), 4, device="cpu", checkpoint=tmp_path / "partial.safetensors")
    with pytest.raises(FileNotFoundError):
        quantize_sequential(_skeleton(entry), 4, device="cpu", checkpoint=tmp_path / "nope")


def test_checkpoint_source_reads_what_safetensors_reads(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"x.weight": torch.randn(5, 7, generator=g), "x.bias": torch.randn(5, generator=g).half(),
         "e": torch.empty(0, 3)}
    b = {"y.weight": torch.randn(3, 4, generator=g).bfloat16(), "y.idx": torch.arange(6, dtype=torch.int32)}
    save_file(a, str(tmp_path / "s1.safetensors"))
    save_file(b, str(tmp_path / "s2.safetensors"))
    index = {"weight_map": {**{k: "s1.safetensors" for k in a}, **{k: "s2.safetensors" for k in b}}}
    (tmp_path / "model.safetensors.index.json").write_text(__import__("json").dumps(index))
    src = CheckpointSource(tmp_path)
    ref = {**load_file(str(tmp_path / "s1.safetensors")), **load_file(str(tmp_path / "s2.safetensors"))}
    assert src.keys() == set(ref)
    for k, v in ref.items():
        got = src.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    data = (tmp_path / "s1.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        CheckpointSource(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        CheckpointSource(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("cfg", [QuantConfig(3, group_size=64), QuantConfig(4, scope="channel", symmetric=False)])
def test_large_layers_quantized_in_row_chunks_are_bit_identical(cfg, monkeypatch):
    """Layers above the chunk size (here 48 rows: every layer, uneven last chunk) give the one-shot buffers."""
    import medquant.quant.api as api_mod

    entry = ZOO_BY_NAME["llama"]
    whole, seq = entry.build(), entry.build()
    quantize_(whole, cfg)
    monkeypatch.setattr(api_mod, "_CHUNK_ROWS", 48)
    rows_seen = []
    orig = QuantLinear.from_float.__func__

    def spy(cls, module, config):
        rows_seen.append(module.out_features)
        return orig(cls, module, config)

    monkeypatch.setattr(QuantLinear, "from_float", classmethod(spy))
    quantize_sequential(seq, cfg, device="cpu")
    assert max(rows_seen) == 48 and 256 - 5 * 48 in rows_seen  # really chunked (lm_head: 5 x 48 + 16 rows)
    _assert_same(whole, seq)


def test_a_batch_that_fails_in_the_forward_names_the_batch_and_the_blocks():
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    good = {"input_ids": torch.randint(0, 100, (1, 6))}
    empty = {"input_ids": torch.zeros(1, 0, dtype=torch.long)}  # no token: the model's own forward fails
    with pytest.raises(ValueError, match=r"calibration batch 1 \(a dict with the keys \['input_ids'\]\) failed in "
                                         r"the model's forward while calibrating blocks model\.layers\.0") as e:
        quantize_sequential(model, 4, calib_inputs=[good, empty], per_block_fn=lambda b, i: None)
    assert isinstance(e.value.__cause__, IndexError)  # the model's own error, chained
