"""format="gguf": exports read back by transformers' GGUF loader and by the gguf package's reader.

The references are independent of the exporter: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``
de-quantizes every tensor with the gguf package and undoes llama.cpp's q/k permutation and Gemma's ``1 + w``;
its weights must be bit-equal to medquant's dequantized weights where the report says exact (a missed or wrong
permutation breaks this), within the reported error where it says near-exact. ``GGUFReader`` gives the types.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("gguf")

from gguf import GGUFReader

from medquant.deploy import ExportError, export
from medquant.deploy.common import quantized_embeddings, quantized_layers
from medquant.deploy.gguf import language_parts, rope_permutation
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig
from medquant.testing.zoo import ZOO_BY_NAME

os.environ.setdefault("HF_HUB_OFFLINE", "1")

W4 = QuantConfig(bits=4, group_size=32, symmetric=True)


def _reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def _loaded_name(name: str, dec_name: str, head_name: str) -> str:
    """Name of a source tensor in the text-only model transformers builds from the GGUF file."""
    if name.startswith(head_name + ".") or name == head_name:
        return "lm_head" + name[len(head_name):]
    return "model." + name[len(dec_name) + 1:]


def _check_roundtrip(model, report, exact_only: bool = True):
    """Every exported tensor reloaded by transformers equals medquant's weight (bit-equal where exact)."""
    path = report.files[0]
    from pathlib import Path

    loaded = _reload(Path(path)).state_dict()
    _, _, _, dec_name, _, head_name = language_parts(model)
    quant = dict(quantized_layers(model) + quantized_embeddings(model))
    src = model.state_dict()
    assert len(report.layers) > 0
    for row in report.layers:
        key = row.name
        if row.name in quant:
            want = quant[row.name].dequantized_weight(torch.float32)
            got = loaded[_loaded_name(row.name, dec_name, head_name) + ".weight"]
        else:
            want = src[key].float()
            got = loaded[_loaded_name(key, dec_name, head_name)]
        assert got.shape == want.shape, row.name
        if row.how in ("exact repack", "exact re-expression") or (row.how == "float" and row.target == "F32"
                                                                   and "1 + w" not in row.note):
            assert torch.equal(got, want), f"{row.name} ({row.how}) not bit-equal"
        elif "1 + w" in row.note:  # transformers subtracts the 1 again in float32
            assert torch.allclose(got, want, rtol=0, atol=1e-6), row.name
        else:
            assert row.max_abs_error is not None
            err = (got - want).abs().max().item()
            assert err <= row.max_abs_error + 1e-7, f"{row.name}: {err} > reported {row.max_abs_error}"
            if exact_only:
                raise AssertionError(f"{row.name} unexpectedly {row.how}")
    return loaded


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3_text", "llava", "gemma3_vlm", "idefics3"])
def test_zoo_w4_g32_is_bit_equal_q4_0(name, tok_dir, tmp_path):
    model = ZOO_BY_NAME[name].build()
    quantize_(model, W4)
    report = export(model, tmp_path / "m.gguf", format="gguf", source=tok_dir)
    quant_rows = [r for r in report.layers if r.target == "Q4_0"]
    assert quant_rows and all(r.how == "exact repack" and r.max_abs_error == 0.0 for r in quant_rows)
    types = _types(tmp_path / "m.gguf")
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.1.ffn_down.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["token_embd.weight"] == "F32"
    _, _, _, dec_name, _, head_name = language_parts(model)  # the language model's layers and the head
    n_lm = sum(1 for n, _ in quantized_layers(model) if n.startswith(dec_name + ".") or n == head_name)
    assert (n_lm < len(quantized_layers(model))) == ZOO_BY_NAME[name].is_vlm  # a VLM's tower is quantized too
    assert len(quant_rows) == n_lm
    _check_roundtrip(model, report)
    if ZOO_BY_NAME[name].is_vlm:
        assert any("outside the language model" in n for n in report.notes)


def test_rope_permutation_matches_llama_cpp_converter():
    """Row ``2i + j`` of a head comes from row ``i + j * D/2`` (llama.cpp's reshape(n_head, 2, D/2) swap)."""
    w = torch.arange(2 * 8).reshape(16, 1)
    perm = rope_permutation(16, 2)
    expected = w.reshape(2, 2, 4, 1).swapaxes(1, 2).reshape(16, 1)
    assert torch.equal(w.index_select(0, perm), expected)
    assert perm.tolist()[:8] == [0, 4, 1, 5, 2, 6, 3, 7]


def test_per_layer_schemes_types_and_errors(tok_dir, tmp_path):
    """One export with a different scheme per layer: the type, the category and the values of each."""
    model = ZOO_BY_NAME["llama"].build()
    n_rows = model.config.intermediate_size
    mixed_bits = tuple(2 if i % 3 == 0 else 4 for i in range(model.config.hidden_size))
    quantize_(model, {
        "model.layers.0.self_attn.q_proj": QuantConfig(bits=8, group_size=32, symmetric=True),
        "model.layers.0.self_attn.k_proj": QuantConfig(bits=4, group_size=128, symmetric=True),
        "model.layers.0.self_attn.v_proj": QuantConfig(bits=2, group_size=64, symmetric=True),
        "model.layers.0.self_attn.o_proj": QuantConfig(bits=4, group_size=32, symmetric=False),
        "model.layers.0.mlp.gate_proj": QuantConfig(bits=3, scope="channel", symmetric=True),
        "model.layers.0.mlp.up_proj": QuantConfig(bits=6, group_size=64, symmetric=True),
        "model.layers.0.mlp.down_proj": QuantConfig(bits=4, group_size=32, symmetric=True,
                                                    channel_bits=mixed_bits),
        "model.layers.1.self_attn.q_proj": QuantConfig(bits=5, group_size=32, symmetric=False),
        "model.layers.1.mlp.up_proj": QuantConfig(bits=1, group_size=32, symmetric=True),
        "model.layers.1.self_attn.k_proj": QuantConfig(bits=3, group_size=64),  # asymmetric (default at 3 bits)
        "_default": W4,
    })
    assert n_rows > 0
    report = export(model, tmp_path, format="gguf", source=tok_dir)
    rows = {r.name: r for r in report.layers}
    expect = {
        "model.layers.0.self_attn.q_proj": ("Q8_0", "exact repack"),
        "model.layers.0.self_attn.k_proj": ("Q4_0", "exact re-expression"),
        "model.layers.0.self_attn.v_proj": ("Q4_0", "exact re-expression"),
        "model.layers.0.self_attn.o_proj": ("Q4_1", "near-exact"),
        "model.layers.0.mlp.gate_proj": ("Q4_0", "exact re-expression"),
        "model.layers.0.mlp.up_proj": ("Q8_0", "exact re-expression"),
        "model.layers.0.mlp.down_proj": ("Q4_0", "exact re-expression"),
        "model.layers.1.self_attn.q_proj": ("Q8_0", "exact re-expression"),
        "model.layers.1.mlp.up_proj": ("Q4_0", "exact re-expression"),
        "model.layers.1.self_attn.k_proj": ("Q4_0", "exact re-expression"),  # q = u - z + 8
        "model.layers.1.mlp.down_proj": ("Q4_0", "exact repack"),
    }
    for name, (target, how) in expect.items():
        assert (rows[name].target, rows[name].how) == (target, how), name
    o = rows["model.layers.0.self_attn.o_proj"]
    assert 0.0 < o.max_abs_error < 1e-3  # m = -z * s rounded to float16
    types = _types(report.files[0])
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_output.weight"] == "Q4_1"
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q4_0"
    _check_roundtrip(model, report, exact_only=False)


def test_unrepresentable_schemes_are_refused_naming_layers_or_promoted(tok_dir, tmp_path):
    model = ZOO_BY_NAME["llama"].build()
    quantize_(model, {
        "model.layers.0.mlp.up_proj": QuantConfig(bits=8, group_size=32, symmetric=False),
        "model.layers.1.self_attn.v_proj": QuantConfig(bits=4, group_size=16, symmetric=True),
        "_default": W4,
    })
    with pytest.raises(ExportError) as e:
        export(model, tmp_path / "x.gguf", format="gguf", source=tok_dir)
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj: int8 asym g32" in msg
    assert "model.layers.1.self_attn.v_proj: int4 sym g16" in msg and "group size 16" in msg
    assert "promote=True" in msg and not (tmp_path / "x.gguf").exists()

    report = export(model, tmp_path / "p.gguf", format="gguf", source=tok_dir, promote=True)
    rows = {r.name: r for r in report.layers}
    for name in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.v_proj"):
        assert rows[name].how == "lossy requantization" and rows[name].target == "Q8_0"
        assert rows[name].max_abs_error > 0
    _check_roundtrip(model, report, exact_only=False)


def test_float32_scales_are_near_exact_with_their_error(tok_dir, tmp_path):
    model = ZOO_BY_NAME["qwen2"].build()
    quantize_(model, QuantConfig(bits=4, group_size=32, symmetric=True, scale_dtype="float32"))
    report = export(model, tmp_path / "m.gguf", format="gguf", source=tok_dir)
    quant_rows = [r for r in report.layers if r.target == "Q4_0"]
    assert quant_rows and all(r.how == "near-exact" and "float16" in r.note for r in quant_rows)
    _check_roundtrip(model, report, exact_only=False)


def test_gemma3_norms_stored_as_one_plus_w(tok_dir, tmp_path):
    model = ZOO_BY_NAME["gemma3_text"].build()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_()
    report = export(model, tmp_path / "g.gguf", format="gguf", source=tok_dir)
    raw = {t.name: torch.from_numpy(t.data.copy()) for t in GGUFReader(report.files[0]).tensors}
    w = model.model.layers[1].post_feedforward_layernorm.weight.detach()
    assert torch.equal(raw["blk.1.post_ffw_norm.weight"], w + 1)
    assert torch.equal(raw["blk.0.attn_q_norm.weight"], model.model.layers[0].self_attn.q_norm.weight.detach() + 1)
    fields = GGUFReader(report.files[0]).fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["gemma3.attention.sliding_window"].contents() == model.config.sliding_window
    assert fields["gemma3.attention.sliding_window_pattern"].contents() == [
        t == "sliding_attention" for t in model.config.layer_types]


def test_tokenizer_metadata_reloads_as_the_same_tokenizer(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    model = ZOO_BY_NAME["llama"].build()
    report = export(model, tmp_path / "t.gguf", format="gguf", source=tok_dir)
    src = AutoTokenizer.from_pretrained(tok_dir)
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    text = "abc xyz 0123 hello"
    assert back(text)["input_ids"] == src(text)["input_ids"]
    fields = GGUFReader(report.files[0]).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == src.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == src.chat_template
    assert fields["llama.context_length"].contents() == model.config.max_position_embeddings
    assert fields["llama.attention.head_count_kv"].contents() == model.config.num_key_value_heads


def test_refusals_name_the_problem(tok_dir, tmp_path):
    model = ZOO_BY_NAME["llama"].build()
    with pytest.raises(ExportError, match="source="):
        export(model, tmp_path / "a.gguf", format="gguf")
    with pytest.raises(ExportError, match="float_type"):
        export(model, tmp_path / "a.gguf", format="gguf", source=tok_dir, float_type="Q4_0")
    with pytest.raises(ExportError, match="unknown option"):
        export(model, tmp_path / "a.gguf", format="gguf", source=tok_dir, bogus=1)
    export(model, tmp_path / "a.gguf", format="gguf", source=tok_dir)
    with pytest.raises(ExportError, match="overwrite=True"):
        export(model, tmp_path / "a.gguf", format="gguf", source=tok_dir)
    assert export(model, tmp_path / "a.gguf", format="gguf", source=tok_dir, overwrite=True).files
    # a structurally pruned block (smaller MLP in layer 1) cannot share the metadata's feed-forward length
    layer = model.model.layers[1].mlp
    inter = model.config.intermediate_size // 2
    layer.gate_proj = torch.nn.Linear(model.config.hidden_size, inter, bias=False)
    layer.up_proj = torch.nn.Linear(model.config.hidden_size, inter, bias=False)
    layer.down_proj = torch.nn.Linear(inter, model.config.hidden_size, bias=False)
    with pytest.raises(ExportError, match=r"pruning of some layers.*model\.layers\.1\.ffn_gate \(128, 128\)"):
        export(model, tmp_path / "b.gguf", format="gguf", source=tok_dir)
    bert = ZOO_BY_NAME["bert"].build()
    with pytest.raises(ExportError, match="llama, qwen2 and gemma3"):
        export(bert, tmp_path / "c.gguf", format="gguf", source=tok_dir)


def test_a_failed_overwrite_keeps_the_old_file_and_paths_are_checked_first(tok_dir, tmp_path):
    model = ZOO_BY_NAME["llama"].build()
    quantize_(model, QuantConfig(bits=4, group_size=32))
    out = tmp_path / "m.gguf"
    export(model, out, format="gguf", source=tok_dir)
    before = out.read_bytes()
    (tmp_path / "no_tokenizer").mkdir()
    with pytest.raises(ExportError, match="no tokenizer that GGUF can carry"):  # after the writer was created
        export(model, out, format="gguf", source=tmp_path / "no_tokenizer", overwrite=True)
    assert out.read_bytes() == before and GGUFReader(str(out)).tensors  # the old file, unchanged and readable
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "no_tokenizer"]  # no temporary file left
    (tmp_path / "plain").write_text("x")  # a path without .gguf names a folder
    with pytest.raises(ExportError, match="is not a folder"):
        export(model, tmp_path / "plain", format="gguf", source=tok_dir, overwrite=True)
    (tmp_path / "d.gguf").mkdir()  # a path ending in .gguf names the file
    with pytest.raises(ExportError, match="d.gguf is a folder"):
        export(model, tmp_path / "d.gguf", format="gguf", source=tok_dir, overwrite=True)
    assert (tmp_path / "plain").read_text() == "x" and not any((tmp_path / "d.gguf").iterdir())


def test_byte_fallback_bpe_tokenizer_is_written_as_llama_vocabulary(tmp_path):
    """A SentencePiece-style (byte-fallback BPE) tokenizer.json goes through gguf's LlamaHfVocab: model "llama"."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    vocab.update({f"<0x{i:02X}>": 4 + i for i in range(200)})
    for ch in "abcdefghijklmnopqrstuvwxyz\u2581":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(tmp_path / "spm")
    model = ZOO_BY_NAME["gemma3_text"].build()
    report = export(model, tmp_path / "g.gguf", format="gguf", source=tmp_path / "spm")
    fields = GGUFReader(report.files[0]).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == model.config.vocab_size and tokens[:len(vocab)] == list(vocab)
    assert len(fields["tokenizer.ggml.scores"].contents()) == model.config.vocab_size
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 2
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False


def test_uniformly_pruned_blocks_take_their_sizes_from_the_weights(tok_dir, tmp_path):
    """Every block pruned alike (MLP halved, config left stale): metadata from the weights, reload bit-equal."""
    model = ZOO_BY_NAME["llama"].build()
    h, inter = model.config.hidden_size, model.config.intermediate_size // 2
    for block in model.model.layers:
        block.mlp.gate_proj = torch.nn.Linear(h, inter, bias=False)
        block.mlp.up_proj = torch.nn.Linear(h, inter, bias=False)
        block.mlp.down_proj = torch.nn.Linear(inter, h, bias=False)
    quantize_(model, W4)
    report = export(model, tmp_path / "p.gguf", format="gguf", source=tok_dir)
    assert any(f"intermediate_size {2 * inter} -> {inter}" in n for n in report.notes)
    fields = GGUFReader(report.files[0]).fields
    assert fields["llama.feed_forward_length"].contents() == inter
    _check_roundtrip(model, report)


def test_float16_overflow_is_refused_naming_the_tensor(tok_dir, tmp_path):
    """Values or block scales beyond float16's range would be inf in the file: refused, nothing written."""
    model = ZOO_BY_NAME["llama"].build()
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 5] = 1e5
    with pytest.raises(ExportError, match=r"model\.embed_tokens\.weight: values up to 1e\+05 overflow F16"):
        export(model, tmp_path / "a.gguf", format="gguf", source=tok_dir, float_type="F16")
    assert not (tmp_path / "a.gguf").exists()
    export(model, tmp_path / "a.gguf", format="gguf", source=tok_dir)  # F32 (default) holds it
    model = ZOO_BY_NAME["llama"].build()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e7)
    quantize_(model, QuantConfig(bits=4, group_size=32, symmetric=True, scale_dtype="float32"), skip=["lm_head"])
    with pytest.raises(ExportError, match=r"model\.layers\.0\.mlp\.up_proj: the Q4_0 block scales .*overflow"):
        export(model, tmp_path / "b.gguf", format="gguf", source=tok_dir)
    assert not (tmp_path / "b.gguf").exists()


def test_block_count_is_the_number_of_blocks_written(tok_dir, tmp_path):
    """Blocks cut from the layer list with a stale config: block_count counts the blk.<i> tensors written."""
    model = ZOO_BY_NAME["llama"].build()
    model.model.layers = model.model.layers[:1]
    quantize_(model, W4)
    report = export(model, tmp_path / "d.gguf", format="gguf", source=tok_dir)
    reader = GGUFReader(report.files[0])
    blocks = {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")}
    assert reader.fields["llama.block_count"].contents() == len(blocks) == len(model.model.layers)
    gemma = ZOO_BY_NAME["gemma3_text"].build()
    gemma.model.layers = gemma.model.layers[:1]  # layer_types still lists two layers: no per-layer pattern
    with pytest.raises(ExportError, match="layer_types"):
        export(gemma, tmp_path / "g.gguf", format="gguf", source=tok_dir)
    assert not (tmp_path / "g.gguf").exists()


def test_the_exported_file_has_the_mode_the_umask_gives(tok_dir, tmp_path):
    """Written through mkstemp (0600), moved into place with the mode a plain open() gives: 0o666 & ~umask."""
    import stat

    model = ZOO_BY_NAME["llama"].build()
    quantize_(model, W4)
    old = os.umask(0o027)
    try:
        report = export(model, tmp_path / "m.gguf", format="gguf", source=tok_dir)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == 0o640
    assert report.files == [str(tmp_path / "m.gguf")]


def test_a_failed_export_removes_the_folders_it_created_and_keeps_existing_ones(tmp_path):
    model = ZOO_BY_NAME["llama"].build()  # no tokenizer source: refused when the tokenizer is written
    existing = tmp_path / "existing"
    existing.mkdir()
    for target in (existing / "new" / "deeper" / "m.gguf", existing / "out"):  # a file; a folder for model.gguf
        with pytest.raises(ExportError, match="source="):
            export(model, target, format="gguf")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and not any(existing.iterdir())
    with pytest.raises(ExportError, match="source="):  # an existing empty folder to hold model.gguf stays
        export(model, existing, format="gguf")
    assert existing.is_dir() and not any(existing.iterdir())


def test_a_folder_in_place_of_the_file_is_named_and_no_overwrite_is_suggested(tok_dir, tmp_path):
    """A folder named like the file (``x.gguf``), or a folder ``model.gguf`` inside the target folder: overwrite
    would not replace it, so the error says it is a folder and asks for a file path instead."""
    model = ZOO_BY_NAME["llama"].build()
    (tmp_path / "x.gguf").mkdir()
    (tmp_path / "out" / "model.gguf").mkdir(parents=True)
    for target, folder in ((tmp_path / "x.gguf", "x.gguf"), (tmp_path / "out", "model.gguf")):
        for overwrite in (False, True):
            with pytest.raises(ExportError, match=rf"{folder} is a folder.*give a file path") as e:
                export(model, target, format="gguf", source=tok_dir, overwrite=overwrite)
            assert "overwrite" not in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["model.gguf", "out", "x.gguf"]


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _with_llama3_rope(name: str):
    """A zoo model whose (full-attention) rope parameters are Llama 3's scaling; the GGUF writer reads the config."""
    model = ZOO_BY_NAME[name].build()
    cfg = model.config.get_text_config()
    if "full_attention" in cfg.rope_parameters:
        cfg.rope_parameters = {**cfg.rope_parameters, "full_attention": dict(LLAMA3_ROPE)}
    else:
        cfg.rope_parameters = dict(LLAMA3_ROPE)
    return model


def test_llama3_rope_scaling_is_the_rope_freqs_tensor_of_a_llama_file(tok_dir, tmp_path):
    """llama.cpp divides each rope frequency by ``rope_freqs[i]``: the tensor is the ratio of the unscaled
    frequencies to transformers' Llama 3 ones (all three regimes: 1, the factor, and smoothed in between)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = _with_llama3_rope("llama")
    report = export(model, tmp_path / "l.gguf", format="gguf", source=tok_dir)
    tensors = {t.name: t for t in GGUFReader(report.files[0]).tensors}
    freqs = torch.from_numpy(tensors["rope_freqs.weight"].data.copy())
    d = model.config.head_dim
    unscaled = 1.0 / (LLAMA3_ROPE["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config)
    torch.testing.assert_close(freqs, unscaled / scaled, rtol=1e-6, atol=0)
    assert freqs.min() == 1.0 and freqs.max() == 8.0 and bool(((freqs > 1) & (freqs < 8)).any())
    assert any("rope_freqs" in n for n in report.notes)


@pytest.mark.parametrize("name, arch", [("qwen2", "qwen2"), ("gemma3_text", "gemma3")])
def test_llama3_rope_scaling_is_refused_where_llama_cpp_reads_no_rope_freqs(name, arch, tok_dir, tmp_path):
    """llama.cpp's qwen2 / gemma3 loaders take no rope_freqs tensor (an extra tensor fails the load), and without
    it the scaling would be lost: refused before anything is written, naming the architecture that takes it."""
    model = _with_llama3_rope(name)
    with pytest.raises(ExportError, match=rf"rope_type 'llama3'.*GGUF architecture '{arch}'.*reads for the "
                                          r"architecture\(s\) 'llama' only") as e:
        export(model, tmp_path / "out" / "m.gguf", format="gguf", source=tok_dir)
    assert isinstance(e.value, ValueError)
    assert not any(tmp_path.iterdir())
    # the same architecture without llama3 scaling: written, with no rope_freqs tensor
    report = export(ZOO_BY_NAME[name].build(), tmp_path / "d.gguf", format="gguf", source=tok_dir)
    assert "rope_freqs.weight" not in _types(tmp_path / "d.gguf") and report.files


@pytest.mark.parametrize("tie", [False, True])
def test_quantized_input_embeddings_are_written_in_their_block_type(tie, tok_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.quant.embeddings import quantize_embeddings_

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    quantize_(model, W4)
    done = quantize_embeddings_(model, W4)
    assert done["tied_heads"] == (["lm_head"] if tie else [])
    report = export(model, tmp_path / "m.gguf", format="gguf", source=tok_dir)
    types = _types(tmp_path / "m.gguf")
    assert types["token_embd.weight"] == "Q4_0" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert ("output.weight" in types) is not tie  # a tied head is token_embd, stored once
    assert types.get("output.weight", "Q4_0") == "Q4_0"
    emb_row = next(r for r in report.layers if r.name == "model.embed_tokens")
    assert emb_row.target == "Q4_0" and emb_row.how == "exact repack" and emb_row.max_abs_error == 0.0
    assert not any("not exported" in n for n in report.notes)
    # transformers' GGUF loader dequantizes the table to medquant's own dequantized table, bit for bit, and the
    # reloaded float model computes medquant's logits
    loaded = _reload(tmp_path / "m.gguf")
    table = dict(quantized_embeddings(model))["model.embed_tokens"].dequantized_weight(torch.float32)
    assert torch.equal(loaded.model.embed_tokens.weight, table)
    assert torch.equal(loaded.lm_head.weight, table) is tie
    _check_roundtrip(model, report)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
