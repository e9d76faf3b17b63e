"""save / load: bit-exact round trips, atomic writes, corruption detection, no pickle.

Crash safety, the manifest, bounded loads and the schema have their own tests in test_checkpoint_safety.py and
test_fault_injection.py."""
import copy
import json

import pytest
import torch

import medquant as mq
from medquant.io import MANIFEST_NAME, META_NAME, WEIGHTS_NAME, CheckpointError, CheckpointWarning
from medquant.kernels import force_backend
from medquant.testing.zoo import ZOO_BY_NAME, tiny_cnn


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "llava", "qwen2_vl", "idefics3", "vit"])
def test_hf_round_trip_is_bit_exact_and_same_class(tmp_path, name):
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    mq.quantize_(model, {"re:.*(q_proj|k_proj|v_proj|o_proj|query|key|value)": mq.QuantConfig(2),
                         "re:.*": mq.QuantConfig(4, group_size=64)})
    inputs = entry.inputs(model)
    with torch.no_grad():
        out = entry.output(model, inputs)
    mq.save(model, tmp_path)
    again = mq.load(tmp_path)
    assert type(again) is type(model)
    with torch.no_grad():
        assert torch.equal(entry.output(again, inputs), out)
    assert mq.layer_table(again) == mq.layer_table(model)


def test_mixed_bits_plain_module_round_trip_and_extras(tmp_path):
    model = tiny_cnn()
    conv_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    conv = model.get_submodule(conv_names[-1])
    bits = tuple([2, 4, 8, 0][i % 4] for i in range(conv.out_channels))
    mq.quantize_(model, {conv_names[-1]: mq.QuantConfig(4, scope="channel", channel_bits=bits),
                         "re:.*": mq.QuantConfig(8, scope="channel")})
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    mq.save(model, tmp_path, extras={"scorer": {"thresholds": [0.1, 0.5]}})
    with pytest.raises(CheckpointError, match="plain nn.Module"):
        mq.load(tmp_path)
    again = mq.load(tmp_path, model=tiny_cnn(seed=1))
    assert torch.equal(again(x), out)
    assert again.get_submodule(conv_names[-1]).config.channel_bits == bits
    assert mq.load_extras(tmp_path) == {"scorer": {"thresholds": [0.1, 0.5]}}


def _saved(tmp_path):
    model = mq.quantize_(ZOO_BY_NAME["llama"].build(), mq.QuantConfig(4))
    mq.save(model, tmp_path)
    return model


def test_flipped_byte_is_detected(tmp_path):
    _saved(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or was modified"):
        mq.load(tmp_path)


def test_truncated_file_is_detected(tmp_path):
    _saved(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        mq.load(tmp_path)


def test_tampered_metadata_is_detected(tmp_path):
    _saved(tmp_path)
    meta_path = tmp_path / META_NAME
    meta_path.write_text(meta_path.read_text()[:50])
    with pytest.raises(CheckpointError, match="medquant.json is truncated or altered"):  # the manifest
        mq.load(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()  # as saved by an older medquant: the schema parse
    with pytest.raises(CheckpointError, match="not valid JSON"), pytest.warns(CheckpointWarning):
        mq.load(tmp_path)
    (tmp_path / META_NAME).unlink()
    with pytest.raises(CheckpointError, match="medquant.json is missing"):
        mq.load(tmp_path)


def test_recipe_disagreeing_with_tensors_is_refused(tmp_path):
    _saved(tmp_path)
    meta_path = tmp_path / META_NAME
    meta = json.loads(meta_path.read_text())
    name = next(iter(meta["modules"]))
    meta["modules"][name]["config"]["bits"] = 2  # the recipe no longer matches the stored codes
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="medquant.json is truncated or altered"):
        mq.load(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="needs the tensor .*qweight_2 I32"):
        mq.load(tmp_path)


def test_newer_format_version_is_refused(tmp_path):
    _saved(tmp_path)
    meta_path = tmp_path / META_NAME
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="format version 99"):
        mq.load(tmp_path)


def test_failed_save_keeps_the_earlier_save(tmp_path, monkeypatch):
    model = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_submodule("model.layers.0.mlp.up_proj").scales_4.mul_(2)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        mq.save(other, tmp_path, extras={"bad": object()})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("medquant.io.checkpoint.save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        mq.save(other, tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # same files, same bytes, no temporary leftovers
    mq.load(tmp_path)


def test_files_are_safetensors_and_json_only(tmp_path):
    _saved(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([WEIGHTS_NAME, META_NAME, "config.json", "generation_config.json", MANIFEST_NAME])
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["medquant_format_version"] == "1"  # 4-bit rows only: the version-1 bytes
    assert any(k.endswith("qweight_4") for k in keys)
    assert json.loads((tmp_path / META_NAME).read_text())["format_version"] == 1


def _llama_file_bytes(tmp_path, bits: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval()
    mq.quantize_(model, mq.QuantConfig(bits, group_size=32), skip=["@head"])
    path = mq.save(model, tmp_path / f"w{bits}")
    return (path / WEIGHTS_NAME).stat().st_size


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_3_5_6_bit_models_are_saved_densely_and_are_smaller(tmp_path, bits):
    """A 3-bit model's file is smaller than the 4-bit one (5/6-bit smaller than 8-bit): dense codes, format 2."""
    size = _llama_file_bytes(tmp_path, bits)
    wider = _llama_file_bytes(tmp_path, 4 if bits == 3 else 8)
    assert size < wider
    meta = json.loads((tmp_path / f"w{bits}" / META_NAME).read_text())
    assert meta["format_version"] == 2 and all(e["layout"] == 2 for e in meta["modules"].values())
    model = mq.load(tmp_path / f"w{bits}")
    assert type(model).__name__ == "LlamaForCausalLM"
    q = next(m for m in model.modules() if isinstance(m, mq.QuantLinear))
    assert q.layout_version == 2 and q.packed_weight(bits).is_dense
    assert getattr(q, f"qweight_{bits}").shape[1] == q.k * bits // 32


def test_model_cast_to_bfloat16_reloads_with_its_non_persistent_buffers_in_bfloat16(tmp_path):
    """A model cast with ``.to(torch.bfloat16)`` has bf16 rotary ``inv_freq`` buffers that the weights file does
    not hold; ``medquant.json`` records their dtype and ``load`` restores it, so the logits are bit-identical
    (without it the rebuilt float32 buffers change them)."""
    model = ZOO_BY_NAME["llama"].build().to(torch.bfloat16).eval()
    mq.quantize_(model, mq.QuantConfig(bits=4, group_size=32), skip=["@head"])
    ids = torch.arange(12).reshape(1, 12) % model.config.vocab_size
    with torch.no_grad():
        want = model(input_ids=ids).logits
    mq.save(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "medquant.json").read_text())
    assert meta["buffer_dtypes"] and set(meta["buffer_dtypes"].values()) == {"bfloat16"}
    back = mq.load(tmp_path / "ck").eval()
    for name, b in back.named_buffers():
        if name in meta["buffer_dtypes"]:
            assert b.dtype == torch.bfloat16, name
    with torch.no_grad():
        got = back(input_ids=ids).logits
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_format_version_of_and_dense_layouts():
    """3-bit rows in version-1 containers need format 1 as stored; dense_layouts re-packs them (same codes, same
    outputs), after which the model needs format 2. 4-bit rows never need version 2."""
    from torch import nn

    from medquant.io import dense_layouts, format_version_of

    torch.manual_seed(0)
    net = nn.Sequential(mq.QuantLinear.from_float(nn.Linear(64, 8), mq.QuantConfig(4), layout=1),
                        mq.QuantLinear.from_float(nn.Linear(8, 8), mq.QuantConfig(3), layout=1))
    x = torch.randn(2, 64)
    with torch.no_grad(), force_backend("torch"):  # the reference reads both layouts (the CPU kernels differ)
        before = net(x)
    codes = net[1].packed_weight(3).codes()
    assert format_version_of(net) == 1 and not net[1].stores_dense
    assert dense_layouts(net) == 2 == format_version_of(net)
    assert net[1].stores_dense and not net[0].stores_dense
    assert torch.equal(net[1].packed_weight(3).codes(), codes)
    with torch.no_grad(), force_backend("torch"):
        assert torch.equal(net(x), before)
    four = nn.Sequential(mq.QuantLinear.from_float(nn.Linear(64, 8), mq.QuantConfig(4)))
    assert dense_layouts(four) == 1 == format_version_of(four) == format_version_of(nn.Linear(2, 2))


def test_a_layer_compute_dtype_survives_every_loader(tmp_path):
    """``QuantConfig.compute_dtype`` is recorded with the layer: ``mq.load``, transformers' ``from_pretrained`` and
    ``assemble_shards`` give back layers computing with it, not with the global compute dtype (the last two replace
    the layer tensors the CPU kernels know the setting by)."""
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_model

    import medquant.hf
    from medquant.calibrate.shards import assemble_shards, quantize_shard
    from medquant.quant.api import quantized_modules

    entry = ZOO_BY_NAME["llama"]
    other = "float16"  # the default is bfloat16 (native bf16) or float32: results differ from either
    mapping = {"re:.*": mq.QuantConfig(4, group_size=32, compute_dtype=other)}
    model = mq.quantize_(entry.build(), mapping)
    inputs = entry.inputs(model)
    with torch.no_grad():
        out = entry.output(model, inputs)
        assert not torch.equal(out, entry.output(mq.quantize_(entry.build(), mq.QuantConfig(4, group_size=32)),
                                                 inputs))  # the setting shows in the results
    mq.save(model, tmp_path / "mq")
    medquant.hf.save_pretrained(model, tmp_path / "hf")
    assert json.loads((tmp_path / "mq" / META_NAME).read_text())["modules"]["lm_head"]["config"]["compute_dtype"] \
        == other
    save_model(entry.build(), str(tmp_path / "float.safetensors"))
    for rank in range(2):
        with init_empty_weights():
            part = entry.build()
        quantize_shard(part, mapping, tmp_path / "float.safetensors", tmp_path / "shards", rank=rank, world_size=2,
                       device="cpu")
    with init_empty_weights():
        sharded = assemble_shards(entry.build(), tmp_path / "shards")
    loaded = {"mq.load": mq.load(tmp_path / "mq"),
              "from_pretrained": transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
              "assemble_shards": sharded}
    for how, again in loaded.items():
        layers = quantized_modules(again)
        assert len(layers) == len(quantized_modules(model)), how
        assert {m.config.compute_dtype for m in layers.values()} == {other}, how
        with torch.no_grad():
            assert torch.equal(entry.output(again, inputs), out), how


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cast_changes_the_weight_dtype_not_the_stored_format(tmp_path, dtype):
    """``model.to(dtype)`` casts biases and the dequantized weight's dtype; scales, zero points and float rows keep
    the dtypes their config names. Before, they were cast too: the model then saved but could not be loaded
    (recipe and tensors disagreed), and the scales were rounded."""
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    rows = model.model.layers[0].mlp.up_proj.out_features
    mixed = tuple((3, 16, 32, 8)[i % 4] for i in range(rows))  # float16 and float32 rows among packed ones
    mq.quantize_(model, {"re:.*up_proj": mq.QuantConfig(4, scope="channel", symmetric=False, channel_bits=mixed),
                         "re:.*": mq.QuantConfig(4, group_size=32, scale_dtype="float32")})
    up = model.model.layers[0].mlp.up_proj
    stored = {k: v.clone() for k, v in model.state_dict().items()
              if k.rpartition(".")[2].startswith(("scales_", "zeros_", "fweight_"))}
    assert {v.dtype for v in stored.values()} == {torch.float16, torch.float32}
    w_before = up.dequantized_weight(torch.float32)
    model.to(dtype)
    sd = model.state_dict()
    for k, v in stored.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    assert up.weight.dtype == dtype and up.to_float().weight.dtype == dtype
    assert torch.equal(up.float().dequantized_weight(torch.float32), w_before)  # nothing was rounded
    model.to(dtype)
    inputs = entry.inputs(model)
    with torch.no_grad():
        out = entry.output(model, inputs)
    mq.save(model, tmp_path / "ck")
    again = mq.load(tmp_path / "ck")
    assert same_dtypes_and_values(again, model)
    with torch.no_grad():
        assert torch.equal(entry.output(again, inputs), out)


def same_dtypes_and_values(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("quantize", [False, True])
def test_a_generation_config_comes_back_as_transformers_gives_it_back(tmp_path, quantize):
    """``model.generation_config`` (end-of-sequence ids, sampling and length settings) is part of what a
    transformers model generates with; the reference is transformers' own ``save_pretrained`` +
    ``from_pretrained`` of the same model. Before, ``medquant.load`` rebuilt it from ``config.json`` and lost it."""
    from transformers import AutoModelForCausalLM

    model = ZOO_BY_NAME["llama"].build()
    gc = model.generation_config
    gc.eos_token_id, gc.max_new_tokens, gc.do_sample, gc.temperature = [1, 7], 5, True, 0.5
    model.save_pretrained(tmp_path / "reference")
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "reference").generation_config
    assert want.eos_token_id == [1, 7]
    if quantize:
        mq.quantize_(model, mq.QuantConfig(4, group_size=64))
    mq.save(model, tmp_path / "ck")
    got = mq.load(tmp_path / "ck").generation_config
    assert got.to_diff_dict() == want.to_diff_dict()
    if quantize:  # transformers' own loader of the medquant folder agrees
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "ck").generation_config.to_diff_dict() == \
            want.to_diff_dict()


def test_a_transformers_folder_given_to_load_says_how_to_load_it(tmp_path):
    """``medquant.load`` of a folder ``save_pretrained`` wrote (config.json, no medquant.json) names the loader that
    reads it; a folder with neither file only says it is not a medquant checkpoint."""
    from transformers import AutoModelForCausalLM

    model = ZOO_BY_NAME["llama"].build()
    mq.quantize_(model, mq.QuantConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"config\.json.*from_pretrained"):
        mq.load(tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # the loader the message names reads it
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(back(ids).logits, model(ids).logits)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="medquant.json is missing") as e:
        mq.load(tmp_path / "empty")
    assert "from_pretrained" not in str(e.value)


def test_extras_with_keys_json_would_turn_into_strings_are_refused(tmp_path):
    """extras go through JSON, whose keys are strings: {0: "a"} came back as {"0": "a"} (a lookup by 0 then fails).
    Refused before anything is written, naming where; string keys, lists and nested dicts come back equal."""
    model = tiny_cnn()
    with pytest.raises(TypeError, match=r"extras\['groups'\] has the key 0 \(int\)"):
        mq.save(model, tmp_path / "a", extras={"groups": {0: "female", 1: "male"}})
    assert not (tmp_path / "a").exists()
    with pytest.raises(TypeError, match=r"extras\['x'\]\[1\] has the key None"):
        mq.save(model, tmp_path / "a", extras={"x": [1, {None: 2}]})
    good = {"groups": {"0": "female"}, "bits": [2, 4], "nested": {"a": {"b": None}}}
    mq.save(model, tmp_path / "b", extras=good)
    assert mq.load_extras(tmp_path / "b") == good


def test_a_load_refused_after_layers_were_swapped_leaves_the_passed_model_as_it_was(tmp_path):
    """load(path, model) swapped in empty quantized layers before checking the float tensors' shapes: a model that
    did not fit was refused but left with those empty layers. The swaps are undone when a check fails."""
    model = tiny_cnn()
    mq.quantize_(model, mq.QuantConfig(8, scope="channel"), skip=["classifier"])  # a float head
    quantized = [n for n, m in model.named_modules() if isinstance(m, mq.quant.QuantConv2d)]
    assert quantized
    mq.save(model, tmp_path)
    other = tiny_cnn(num_classes=7, seed=3)  # the same convolutions, a final Linear of another size
    before = {n: m for n, m in other.named_modules()}
    x = torch.randn(2, 3, 32, 32)
    out = other(x)
    with pytest.raises(CheckpointError, match="shape"):
        mq.load(tmp_path, model=other)
    assert {n: m for n, m in other.named_modules()} == before  # the same module objects, none swapped
    assert torch.equal(other(x), out)
    assert torch.equal(mq.load(tmp_path, model=tiny_cnn(seed=5))(x), model(x))  # a fitting model still loads


@pytest.mark.filterwarnings("ignore:2 MoE router")
def test_a_refused_moe_load_leaves_the_passed_models_float_experts_in_place(tmp_path):
    """For MoE checkpoints load(path, model) first replaces each float experts module (3-D parameters) by an
    empty QuantExperts shell so the recorded per-expert layers have names to load into. That replacement ran
    outside the undo of a refused load: a model that did not fit was refused but left with empty shells in place
    of its experts. It is undone now like the other swaps; the reference is a deepcopy taken before the call.
    (The saved generation config was also set on the model before the checks; it is now set after them.)"""
    from transformers import MixtralConfig, MixtralForCausalLM

    from medquant.quant.experts import QuantExperts, is_experts_module
    from medquant.testing.zoo_moe import build_moe, moe_inputs

    model = build_moe("mixtral")
    mq.quantize_(model, mq.QuantConfig(4, group_size=32))
    assert sum(isinstance(m, QuantExperts) for m in model.modules()) == 2  # (its routers stay float, with a warning)
    mq.save(model, tmp_path)
    cfg = model.config.to_dict()
    cfg.update(vocab_size=300)  # the same experts, embeddings and head of another size: the load is refused
    torch.manual_seed(1)
    other = MixtralForCausalLM(MixtralConfig(**{k: v for k, v in cfg.items() if k != "quantization_config"}))
    other.eval()
    reference = copy.deepcopy(other)
    inputs = moe_inputs()
    with torch.no_grad():
        out = other(**inputs).logits
    before_modules = dict(other.named_modules())
    assert sum(is_experts_module(m) for m in before_modules.values()) == 2
    generation_config = other.generation_config
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight with shape \[256, 64\]"):
        mq.load(tmp_path, model=other)
    after_modules = dict(other.named_modules())
    assert not any(isinstance(m, QuantExperts) for m in after_modules.values())
    assert after_modules == before_modules  # the same module objects under the same names
    assert {n: type(m) for n, m in after_modules.items()} == {n: type(m) for n, m in reference.named_modules()}
    got, want = other.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    with torch.no_grad():
        assert torch.equal(other(**inputs).logits, out)
    assert other.generation_config is generation_config  # not replaced by the saved one either
    fitting = build_moe("mixtral", seed=5)  # a model of the saved size still loads, into the quantized model
    with torch.no_grad():
        assert torch.equal(mq.load(tmp_path, model=fitting)(**inputs).logits, model(**inputs).logits)
