"""format="compressed-tensors", checked with the compressed-tensors package's own decompressor (bit-exact against
medquant's dequantised weights) and with transformers' compressed-tensors loader (logits of the medquant model)."""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import medquant as mq
from medquant.deploy import ExportError, export
from medquant.kernels import force_backend
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")

FMT = "compressed-tensors"


@pytest.fixture(scope="module")
def llama():
    return ZOO_BY_NAME["llama"].build()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _tensors(folder) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _qconfig(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def _ct_decompress(folder, name: str) -> torch.Tensor:
    """The weight of layer ``name`` as compressed-tensors' pack-quantized decompressor reads it from the files,
    with the scheme of the config group whose targets name the layer (or "Linear" for a single group)."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig.model_validate(_qconfig(folder))
    assert cfg.format == "pack-quantized" and name not in cfg.ignore
    schemes = [g for g in cfg.config_groups.values() if name in g.targets] or \
        [g for g in cfg.config_groups.values() if g.targets == ["Linear"]]
    assert len(schemes) == 1
    tensors = _tensors(folder)
    local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
    return PackedQuantizationCompressor.decompress(local, schemes[0])["weight"]


# bits, symmetric, scope, group size, how the layers are written
SCHEMES = [
    (4, True, "group", 32, "exact repack"),
    (4, False, "group", 32, "exact repack"),
    (8, True, "channel", 128, "exact repack"),
    (2, True, "group", 32, "exact repack"),
    (3, False, "group", 32, "exact repack"),
    (3, False, "channel", 128, "exact repack"),
    (6, False, "group", 64, "exact repack"),
    (4, False, "tensor", 128, "exact repack"),
    (8, True, "tensor", 128, "exact repack"),
    (1, False, "channel", 128, "exact repack"),
    (1, True, "group", 32, "exact re-expression"),  # (2u - 1) s as symmetric 2-bit codes
    (4, True, "group", 48, "exact re-expression"),  # K = 128, 256 not multiples of 48: groups of 16
]


@pytest.mark.parametrize("bits,sym,scope,gs,how", SCHEMES,
                         ids=[f"int{b}-{'sym' if s else 'asym'}-{sc}{g if sc == 'group' else ''}"
                              for b, s, sc, g, _ in SCHEMES])
def test_decompressor_reads_medquant_weights_bit_exactly(llama, tmp_path, bits, sym, scope, gs, how):
    model = mq.quantize_(copy.deepcopy(llama), mq.QuantConfig(bits, symmetric=sym, scope=scope, group_size=gs),
                         skip=["lm_head"])
    report = export(model, tmp_path / "ct", format=FMT)
    folder = tmp_path / "ct"
    layers = quantized_modules(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        got = _ct_decompress(folder, name)
        assert torch.equal(got.float(), layer.dequantized_weight(torch.float32)), name
    rows = {r.name: r for r in report.layers}
    assert {rows[n].how for n in layers} == {how}
    assert all(rows[n].max_abs_error == 0.0 for n in layers)
    assert rows["lm_head"].how == "float"
    q = _qconfig(folder)
    assert q["quant_method"] == "compressed-tensors" and q["ignore"] == ["lm_head"]
    (group,) = q["config_groups"].values()
    assert group["weights"]["num_bits"] == (2 if (bits, sym) == (1, True) else bits)
    assert group["weights"]["strategy"] == scope and group["weights"]["symmetric"] is sym
    t = _tensors(folder)
    assert ("model.layers.0.mlp.up_proj.weight_zero_point" in t) is (not sym)
    assert t["model.layers.0.mlp.up_proj.weight_shape"].tolist() == [256, 128]
    assert t["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32


LM_CASES = [
    ("llama", mq.QuantConfig(4, symmetric=True, group_size=32)),
    ("qwen2", mq.QuantConfig(4, symmetric=False, group_size=32)),
    ("gemma3_text", mq.QuantConfig(3, symmetric=False, scope="channel")),
    ("llava", mq.QuantConfig(8, symmetric=True, scope="channel")),
    ("gemma3_vlm", mq.QuantConfig(4, symmetric=True, group_size=32)),
]


@pytest.mark.parametrize("name,cfg", LM_CASES, ids=[c[0] for c in LM_CASES])
def test_transformers_reload_gives_the_medquant_logits(tmp_path, name, cfg):
    import transformers
    from transformers import CompressedTensorsConfig

    entry = ZOO_BY_NAME[name]
    model = entry.build()
    if entry.is_vlm:  # the language model only: vision tower, projector and head stay float
        mq.quantize_(model, {"@language": cfg, "@vision": None}, skip=["@head"])
    else:
        mq.quantize_(model, cfg, skip=["lm_head"])
    float_before = {k: v.clone() for k, v in model.state_dict().items() if "vision" in k or "projector" in k}
    inputs = entry.inputs(model)
    with torch.no_grad(), force_backend("torch"):  # medquant's float32 reference path
        ref = entry.output(model, inputs)
    export(model, tmp_path / "ct", format=FMT)
    kw = {} if cfg.is_symmetric() else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    cls = getattr(transformers, type(model).__name__)
    loaded = cls.from_pretrained(str(tmp_path / "ct"), **kw).eval()
    with torch.no_grad():
        got = entry.output(loaded, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    sd = loaded.state_dict()
    for lname, layer in quantized_modules(model).items():  # the weights themselves, bit for bit
        assert torch.equal(sd[f"{lname}.weight"], layer.dequantized_weight(torch.float32)), lname
    ignore = set(_qconfig(tmp_path / "ct")["ignore"])
    quantized = set(quantized_modules(model))
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert ignore == linears  # every float Linear (vision tower, projector, head) ignored, nothing else
    assert not ignore & quantized
    if entry.is_vlm:
        vision = {n for n in linears if "vision" in n}
        assert vision and vision <= ignore
        if name == "llava":  # Gemma 3's projector is a plain weight tensor, not a Linear
            assert {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"} <= ignore
        for k, v in float_before.items():
            assert torch.equal(sd[k], v), k
        assert all(not hasattr(m, "quantization_scheme") or m.quantization_scheme is None
                   for n, m in loaded.named_modules() if n in vision)


def _mixed_llama(llama):
    model = copy.deepcopy(llama)
    mixed = mq.QuantConfig(4, symmetric=True, group_size=32, channel_bits=(3,) * 10 + (4,) * 118)
    mq.quantize_(model, {"model.layers.0.self_attn.q_proj": mixed, "model.layers.1.mlp.up_proj":
                         mq.QuantConfig(4, symmetric=True, group_size=32, channel_bits=(8,) * 6 + (4,) * 250),
                         "_default": mq.QuantConfig(4, symmetric=True, group_size=32)}, skip=["lm_head"])
    return model


def test_mixed_row_bits_are_refused_with_the_layers(llama, tmp_path):
    model = _mixed_llama(llama)
    with pytest.raises(ExportError) as err:
        export(model, tmp_path / "ct", format=FMT)
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj: mixed {3: 10 rows, 4: 118 rows}" in msg
    assert "model.layers.1.mlp.up_proj: mixed {4: 250 rows, 8: 6 rows}" in msg
    assert "promote=True" in msg
    assert not (tmp_path / "ct").exists()


def test_promote_requantizes_mixed_layers_and_reports_the_error(llama, tmp_path):
    model = _mixed_llama(llama)
    report = export(model, tmp_path / "ct", format=FMT, promote=True)
    rows = {r.name: r for r in report.layers}
    for name, top, n_kept in (("model.layers.0.self_attn.q_proj", 4, 118), ("model.layers.1.mlp.up_proj", 8, 6)):
        row = rows[name]
        assert row.how == "lossy requantization" and f"to {top} bits" in row.note
        layer = model.get_submodule(name)
        ref = layer.dequantized_weight(torch.float32)
        got = _ct_decompress(tmp_path / "ct", name).float()
        assert row.max_abs_error == pytest.approx(float((got - ref).abs().max()), abs=0.0) and row.max_abs_error > 0
        kept = layer.row_bits() == top  # rows already at the layer's largest bit-width keep their values
        assert int(kept.sum()) == n_kept and torch.equal(got[kept], ref[kept])
    assert rows["model.layers.0.self_attn.k_proj"].how == "exact repack"
    q = _qconfig(tmp_path / "ct")
    assert len(q["config_groups"]) == 2  # 4-bit g32 for most layers, 8-bit g32 for the promoted up_proj
    eight = [g for g in q["config_groups"].values() if g["weights"]["num_bits"] == 8]
    assert eight[0]["targets"] == ["model.layers.1.mlp.up_proj"]
    assert report.lossy() and any("promote" in n for n in report.notes)
    # up_proj (now 8-bit) and gate_proj (4-bit) are fused by vLLM: the report says so
    assert any(n.startswith("model.layers.1.mlp: gate_proj, up_proj have different schemes") for n in report.notes)
    assert not any(n.startswith("model.layers.0.mlp:") for n in report.notes)


@pytest.mark.parametrize("cfg", [
    # g48 does not divide K = 128; dense 3-bit rows pad K to lcm(48, 32) = 192, quantize() alone to 144
    mq.QuantConfig(3, group_size=48, channel_bits=(2, 3) * 64),
    mq.QuantConfig(3, symmetric=True, group_size=48, channel_bits=(3, 16) * 64),
], ids=["asym-g48", "sym-g48-float-rows"])
def test_promote_pads_requantized_rows_like_the_stored_ones(llama, tmp_path, cfg):
    name = "model.layers.0.self_attn.q_proj"
    model = mq.quantize_(copy.deepcopy(llama), {name: cfg}, skip=["lm_head"])
    layer = model.get_submodule(name)
    assert layer.mixed
    report = export(model, tmp_path / "ct", format=FMT, promote=True)
    row = {r.name: r for r in report.layers}[name]
    assert row.how == "lossy requantization"
    ref = layer.dequantized_weight(torch.float32)
    got = _ct_decompress(tmp_path / "ct", name).float()
    assert got.shape == ref.shape
    assert row.max_abs_error == pytest.approx(float((got - ref).abs().max()), abs=0.0) and row.max_abs_error > 0
    kept = layer.row_bits() == cfg.bits
    assert torch.equal(got[kept], ref[kept])


def test_scales_beyond_float16_are_refused_naming_the_layer(llama, tmp_path):
    model = copy.deepcopy(llama)
    name = "model.layers.0.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(name).weight.mul_(1e7)
    mq.quantize_(model, mq.QuantConfig(4, symmetric=True, group_size=32, scale_dtype="float32"), skip=["lm_head"])
    for verify in (True, False):
        with pytest.raises(ExportError, match=rf"{name}: scales up to .* overflow scale_dtype='float16'"):
            export(model, tmp_path / "ct", format=FMT, scale_dtype="float16", verify=verify)
        assert not (tmp_path / "ct").exists()
    report = export(model, tmp_path / "ct", format=FMT, scale_dtype="bfloat16")
    assert all(r.max_abs_error is not None and r.max_abs_error < float("inf") for r in report.layers)


def test_sharded_export_has_an_index_that_transformers_loads(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = mq.quantize_(copy.deepcopy(llama), mq.QuantConfig(4, symmetric=True, group_size=32), skip=["lm_head"])
    report = export(model, tmp_path / "ct", format=FMT, max_shard_size="100KB")
    folder = tmp_path / "ct"
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    on_disk = {k: f.name for f in shards for k in load_file(str(f))}
    assert index["weight_map"] == on_disk
    for f in shards:  # a shard holds more than the limit only when one tensor alone is larger
        sizes = [t.numel() * t.element_size() for t in load_file(str(f)).values()]
        assert sum(sizes) <= 100_000 or len(sizes) == 1
    assert "model.safetensors.index.json" in report.files
    ids = torch.tensor([[2, 5, 9, 33, 7]])
    loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad(), force_backend("torch"):
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)


def test_tied_head_is_stored_once_and_a_quantized_head_is_untied(tmp_path):
    from transformers import AutoModelForCausalLM

    entry = ZOO_BY_NAME["gemma3_text"]  # ties lm_head to the embeddings
    model = mq.quantize_(entry.build(), mq.QuantConfig(8, symmetric=True, scope="channel"), skip=["lm_head"])
    report = export(model, tmp_path / "tied", format=FMT)
    assert "lm_head.weight" not in _tensors(tmp_path / "tied")
    assert any("lm_head.weight" in n for n in report.notes)
    # quantizing the head breaks the tie: the config must not re-tie it on load
    model2 = mq.quantize_(entry.build(), mq.QuantConfig(8, symmetric=True, scope="channel"))
    export(model2, tmp_path / "head", format=FMT)
    assert json.loads((tmp_path / "head" / "config.json").read_text()).get("tie_word_embeddings") is False
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "head")).eval()
    with torch.no_grad():  # a symmetric export is decompressed at the first forward
        loaded(input_ids=torch.tensor([[2, 5, 9]]))
    assert torch.equal(loaded.lm_head.weight, model2.lm_head.dequantized_weight(torch.float32))
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


def test_tokenizer_files_are_copied_from_the_source_folder(llama, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "notes.txt").write_text("not a tokenizer file")
    model = mq.quantize_(copy.deepcopy(llama), mq.QuantConfig(4, group_size=32), skip=["lm_head"])
    report = export(model, tmp_path / "ct", format=FMT, source=src)
    for f in ("tokenizer_config.json", "tokenizer.json"):
        assert (tmp_path / "ct" / f).read_bytes() == (src / f).read_bytes() and f in report.files
    assert not (tmp_path / "ct" / "notes.txt").exists()
    with pytest.raises(ExportError, match="not a folder"):
        export(model, tmp_path / "ct2", format=FMT, source=src / "notes.txt")


def test_bad_inputs_are_refused_before_writing(llama, tmp_path):
    """Bad options and models are refused before anything is written. A non-empty folder that is not an earlier
    export (here a user's ``keep.txt``) is refused with or without ``overwrite=True`` and keeps its files: this test
    used to expect ``overwrite=True`` to replace it, deleting ``keep.txt``; ``overwrite`` now replaces only an
    earlier compressed-tensors export (tests/deploy/test_compressed_tensors_overwrite.py)."""
    model = mq.quantize_(copy.deepcopy(llama), mq.QuantConfig(4, group_size=32), skip=["lm_head"])
    with pytest.raises(ExportError, match="no medquant-quantized layers"):
        export(copy.deepcopy(llama), tmp_path / "a", format=FMT)
    with pytest.raises(ExportError, match="transformers model"):
        export(torch.nn.Sequential(mq.QuantLinear.from_float(torch.nn.Linear(32, 16), mq.QuantConfig(4))),
               tmp_path / "b", format=FMT)
    with pytest.raises(ExportError, match="scale_dtype"):
        export(model, tmp_path / "c", format=FMT, scale_dtype="int8")
    with pytest.raises(ExportError, match="max_shard_size|size"):
        export(model, tmp_path / "d", format=FMT, max_shard_size="lots")
    with pytest.raises(ExportError, match="does not take option"):
        export(model, tmp_path / "e", format=FMT, bits=4)
    half = export(model, tmp_path / "half", format=FMT, scale_dtype="float16")  # (q - zp) * s rounds in fp16
    rows = [r for r in half.layers if r.how != "float"]
    assert rows and all(r.how in ("near-exact", "exact repack") for r in rows)
    for r in rows:
        got = _ct_decompress(tmp_path / "half", r.name).float()
        err = float((got - model.get_submodule(r.name).dequantized_weight(torch.float32)).abs().max())
        assert r.max_abs_error == err and (r.how == "near-exact") is (err > 0)
    assert any(r.how == "near-exact" for r in rows)
    from medquant.fairquant.qat import attach_fake_quant

    fq = copy.deepcopy(model)  # a fake-quantization parametrization: the weight is computed, no tensor to write
    attach_fake_quant(fq, {"lm_head": mq.QuantConfig(4)})
    with pytest.raises(ExportError, match=r"lm_head: ParametrizedLinear; lm_head.parametrizations.weight.0: "
                                          r"FakeQuantWeight"):
        export(fq, tmp_path / "f", format=FMT)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export(model, busy, format=FMT)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert not any((tmp_path / x).exists() for x in "abcdef")
    with pytest.raises(ExportError, match="not empty and not an earlier compressed-tensors export: it holds "
                                          "keep.txt; .*choose another path or remove the folder yourself"):
        export(model, busy, format=FMT, overwrite=True)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"] and (busy / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "half"]  # no temporary folder left


def test_quantized_embeddings_and_a_head_sharing_their_codes(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from medquant.quant.embeddings import quantize_embeddings_
    from medquant.testing.zoo import text_kwargs

    entry = ZOO_BY_NAME["llama"]  # a LLaMA whose head is tied to the embeddings: quantized, they share codes
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(tie_word_embeddings=True))).eval()
    cfg = mq.QuantConfig(4, symmetric=True, group_size=32)
    mq.quantize_(model, cfg)
    assert quantize_embeddings_(model, cfg)["tied_heads"] == ["lm_head"]
    inputs = entry.inputs(model)
    with torch.no_grad(), force_backend("torch"):
        ref = entry.output(model, inputs)
    report = export(model, tmp_path / "ct", format=FMT)
    rows = {r.name: r for r in report.layers}
    assert rows["model.embed_tokens"].how == "float" and "quantized embedding" in rows["model.embed_tokens"].note
    assert "embeddings='packed'" in rows["model.embed_tokens"].note  # says how to keep it packed
    assert rows["lm_head"].how == "exact repack"
    t = _tensors(tmp_path / "ct")
    assert torch.equal(t["model.embed_tokens.weight"], model.model.embed_tokens.dequantized_weight(torch.float32))
    assert "lm_head.weight_packed" in t
    assert json.loads((tmp_path / "ct" / "config.json").read_text()).get("tie_word_embeddings") is False
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct")).eval()
    with torch.no_grad():
        torch.testing.assert_close(entry.output(loaded, inputs), ref, rtol=1e-5, atol=1e-5)



# bits, symmetric, scope, group size; tied head
EMBED_CASES = [(4, True, "group", 32, True), (3, False, "channel", 128, False)]


@pytest.mark.parametrize("bits,sym,scope,gs,tie", EMBED_CASES, ids=["int4-sym-g32-tied", "int3-asym-channel"])
def test_packed_embeddings_reload_bit_exactly_with_transformers(tmp_path, bits, sym, scope, gs, tie):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM

    from medquant.quant.embeddings import quantize_embeddings_
    from medquant.testing.zoo import text_kwargs

    entry = ZOO_BY_NAME["llama"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(tie_word_embeddings=tie))).eval()
    cfg = mq.QuantConfig(bits, symmetric=sym, scope=scope, group_size=gs)
    mq.quantize_(model, cfg, skip=[] if tie else ["lm_head"])
    assert quantize_embeddings_(model, cfg)["tied_heads"] == (["lm_head"] if tie else [])
    table = model.model.embed_tokens.dequantized_weight(torch.float32)
    inputs = entry.inputs(model)
    with torch.no_grad(), force_backend("torch"):
        ref = entry.output(model, inputs)
    folder = tmp_path / "ct"
    report = export(model, folder, format=FMT, embeddings="packed")
    row = {r.name: r for r in report.layers}["model.embed_tokens"]
    assert row.how == "exact repack" and row.max_abs_error == 0.0
    assert any("dequantize=True" in n for n in report.notes)
    t = _tensors(folder)
    assert "model.embed_tokens.weight" not in t and t["model.embed_tokens.weight_packed"].dtype == torch.int32
    assert torch.equal(_ct_decompress(folder, "model.embed_tokens"), table)  # compressed-tensors' own decompressor
    loaded = AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    assert torch.equal(loaded.model.embed_tokens.weight, table)  # transformers' loader, bit for bit
    if tie:  # the head keeps its own packed copy and is not re-tied
        assert json.loads((folder / "config.json").read_text()).get("tie_word_embeddings") is False
        assert torch.equal(loaded.lm_head.weight, model.lm_head.dequantized_weight(torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(entry.output(loaded, inputs), ref, rtol=1e-5, atol=1e-5)


def test_embeddings_option_is_checked_and_embeddings_alone_are_written_packed(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.quant.embeddings import quantize_embeddings_
    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval()
    quantize_embeddings_(model, mq.QuantConfig(4, symmetric=True, group_size=32))  # no Linear quantized
    with pytest.raises(ExportError, match=r"embeddings must be 'float' or 'packed', got 'int4'"):
        export(model, tmp_path / "a", format=FMT, embeddings="int4")
    with pytest.raises(ExportError, match=r"only quantized embeddings.*embeddings='packed'"):
        export(model, tmp_path / "b", format=FMT)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    export(model, tmp_path / "c", format=FMT, embeddings="packed")
    groups = _qconfig(tmp_path / "c")["config_groups"]
    assert [g["targets"] for g in groups.values()] == [["model.embed_tokens"]]
    assert torch.equal(_ct_decompress(tmp_path / "c", "model.embed_tokens"),
                       model.model.embed_tokens.dequantized_weight(torch.float32))

def test_a_config_that_does_not_describe_the_weights_is_refused(tmp_path):
    from medquant.prune import StructuredPruner

    uniform = ZOO_BY_NAME["llama"].build()
    StructuredPruner(0.5, 0.5, progress=False).prune(uniform)  # every block alike: the config is updated
    mq.quantize_(uniform, mq.QuantConfig(bits=4, group_size=32))
    export(uniform, tmp_path / "uniform", format="compressed-tensors")
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_pretrained(tmp_path / "uniform")  # the config builds these weights
    written = json.loads((tmp_path / "uniform" / "config.json").read_text())
    assert written["intermediate_size"] == uniform.model.layers[0].mlp.gate_proj.out_features < 256
    per_block = ZOO_BY_NAME["llama"].build()
    plan = StructuredPruner([0.5, 0.0], [0.25, 0.5], progress=False).prune(per_block)  # blocks differ
    assert not plan.hf_config_exact
    mq.quantize_(per_block, mq.QuantConfig(bits=4, group_size=32))
    with pytest.raises(ExportError, match=r"config\.json does not describe its weights: .*model\.layers\.0\."):
        export(per_block, tmp_path / "per_block", format="compressed-tensors")
    assert not (tmp_path / "per_block").exists()


def test_the_exported_folder_has_the_mode_the_umask_gives(llama, tmp_path):
    """Staged in a mkdtemp folder (0700), moved into place with the mode a plain mkdir gives: 0o777 & ~umask."""
    import os
    import stat

    model = copy.deepcopy(llama)
    mq.quantize_(model, mq.QuantConfig(bits=4, group_size=32))
    old = os.umask(0o022)
    try:
        export(model, tmp_path / "ct", format=FMT)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ct").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ct" / "config.json").stat().st_mode) == 0o644


def test_a_failed_export_removes_the_folders_it_created_and_keeps_existing_ones(llama, tmp_path):
    """The config cannot be written (a set is no JSON): the export fails after it had to create the target's
    parents; they are removed, the folders that existed before are kept as they were."""
    model = mq.quantize_(copy.deepcopy(llama), mq.QuantConfig(bits=4, group_size=32))
    model.config.not_json = {1, 2}
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(TypeError, match="JSON serializable"):
        export(model, existing / "new" / "deeper" / "ct", format=FMT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and not any(existing.iterdir())
    with pytest.raises(TypeError, match="JSON serializable"):  # an existing empty target stays
        export(model, existing, format=FMT)
    assert existing.is_dir() and not any(existing.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no temporary folder left
    a_file = tmp_path / "a_file"  # a file where the folder goes: named, no overwrite hint (it would not help)
    a_file.write_text("x")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="a_file exists and is not a folder") as e:
            export(model, a_file, format=FMT, overwrite=overwrite)
        assert "overwrite" not in str(e.value)
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_never_loses_the_old_export(llama, tmp_path, monkeypatch, exchange):
    """overwrite=True deleted the old folder before moving the new one in: a failure of that move lost both. The old
    export is now swapped out atomically (renameat2 exchange) or renamed aside, and put back if the move fails; with
    the move working, the folder holds the new export and nothing is left beside it."""
    import medquant.deploy.compressed_tensors as ct

    model = copy.deepcopy(llama)
    mq.quantize_(model, mq.QuantConfig(4, group_size=32))
    out = tmp_path / "out"
    export(model, out, format=FMT)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    if not exchange:  # the fallback where renameat2 is missing or refused
        monkeypatch.setattr(ct, "exchange_paths", lambda a, b: False)
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.fspath(dst) == os.fspath(out) and ".old" not in os.fspath(src):
            raise OSError("simulated failure of the move into place")
        return real_replace(src, dst)

    monkeypatch.setattr(ct.os, "replace", failing_replace)
    model2 = copy.deepcopy(llama)
    mq.quantize_(model2, mq.QuantConfig(8, scope="channel"))
    if exchange:  # the exchange itself is the move: make it fail instead
        monkeypatch.setattr(ct, "exchange_paths", lambda a, b: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError, match="simulated"):
        export(model2, out, format=FMT, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(ct.os, "replace", real_replace)
    monkeypatch.undo()
    export(model2, out, format=FMT, overwrite=True)
    assert _qconfig(out) != json.loads(old["config.json"])["quantization_config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_never_replaces_a_folder_holding_the_source(llama, tmp_path):
    """overwrite=True into the folder holding the source (or into the source itself) swapped it out whole, deleting
    the model the export was made from."""
    runs = tmp_path / "runs"
    src = runs / "model"
    src.mkdir(parents=True)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "weights.bin").write_bytes(b"the float checkpoint")
    model = mq.quantize_(copy.deepcopy(llama), mq.QuantConfig(4, group_size=32), skip=["lm_head"])
    for out, kw in ((runs, {"source": src}), (src, {"source": src}), (runs, {})):
        model.name_or_path = str(src)  # what from_pretrained(src) sets
        with pytest.raises(ExportError, match="holds the source folder"):
            export(model, out, format=FMT, overwrite=True, **kw)
        assert (src / "weights.bin").read_bytes() == b"the float checkpoint"
    export(model, tmp_path / "elsewhere", format=FMT, overwrite=True)  # outside the source: written
    assert (tmp_path / "elsewhere" / "tokenizer.json").is_file()
