"""Quantized input embeddings and tied heads stored once (``medquant.quant.embeddings``).

Oracles: the independent numpy reader of the packed buffers (``tests.quant.np_reference``), and the float model
whose embedding table and head are replaced by that dequantized table (plain transformers, plain torch).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import medquant as mq
from medquant.io import META_NAME, WEIGHTS_NAME
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import QuantEmbedding, QuantLinear, tied_to
from tests.quant.np_reference import np_dequant_layer


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(tie_word_embeddings=True))).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _float_reference(model, table: np.ndarray):
    """The same model in float with the embedding table and the head replaced by ``table`` (and every other
    quantized layer dequantized): what the quantized model must compute."""
    import copy

    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                setattr(parent, name, child.to_float(torch.float32))
            elif isinstance(child, QuantEmbedding):
                setattr(parent, name, nn.Embedding.from_pretrained(torch.from_numpy(table).float(),
                                                                   padding_idx=child.padding_idx))
    ref.lm_head.weight = ref.model.embed_tokens.weight
    return ref


@pytest.mark.parametrize("bits,scope,gs", [(8, "channel", 128), (4, "group", 32), (3, "group", 32)])
def test_lookup_dequantizes_exactly_the_looked_up_rows(bits, scope, gs):
    torch.manual_seed(1)
    table = nn.Embedding(300, 96, padding_idx=0)
    q = QuantEmbedding.from_float(table, mq.QuantConfig(bits, scope=scope, group_size=gs))
    ids = torch.tensor([[0, 5, 299], [7, 7, 42]])
    w = np_dequant_layer(q)  # independent reader of the packed buffers
    assert np.allclose(q(ids).numpy(), w[ids.numpy()], atol=1e-6)
    assert q(ids).dtype == torch.float32 and q.padding_idx == 0
    assert np.abs(w - table.weight.detach().numpy()).max() < 0.6 * q.get_buffer(f"scales_{bits}").float().max()
    groups = 96 // gs if scope == "group" else 1
    params = 2 if bits <= 3 else 1  # asymmetric by default at <= 3 bits: scales and zero points (float16)
    assert q.stored_bytes() == 300 * 96 * bits // 8 + 300 * groups * 2 * params  # hand count (3 bits dense)
    with pytest.raises(IndexError):
        q(torch.tensor([300]))
    with pytest.raises(ValueError, match="one bit-width"):
        QuantEmbedding.from_float(table, mq.QuantConfig(4, channel_bits=[4] * 300))


def test_lookup_takes_the_index_dtypes_of_nn_embedding_and_names_any_other():
    """int32 and int64 ids give the rows of the dequantized table (as ``nn.Embedding`` over that table does);
    uint8, the other integer types, floats and bools, which ``nn.Embedding`` refuses too, raise a TypeError naming
    the dtype and the accepted ones (they failed inside ``index_select`` with torch's message)."""
    torch.manual_seed(3)
    q = QuantEmbedding.from_float(nn.Embedding(200, 32), mq.QuantConfig(4, group_size=32))
    w = np_dequant_layer(q)  # independent reader of the packed buffers
    float_table = nn.Embedding.from_pretrained(torch.from_numpy(w))
    ids = [[1, 2, 120], [0, 7, 7]]  # fits every dtype below
    for dtype in (torch.int32, torch.int64):
        t = torch.tensor(ids, dtype=dtype)
        assert np.allclose(q(t).numpy(), w[np.array(ids)], atol=1e-6)
        assert np.allclose(q(t).numpy(), float_table(t).numpy(), atol=1e-6)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.float32, torch.bool):
        t = torch.tensor(ids, dtype=dtype) if dtype != torch.bool else torch.ones(2, 3, dtype=torch.bool)
        with pytest.raises(RuntimeError):
            float_table(t)  # nn.Embedding refuses these as well
        with pytest.raises(TypeError, match=rf"torch.int32 or torch.int64 .*got {dtype}$"):
            q(t)


def test_tied_head_shares_the_8bit_table_and_is_saved_once(tmp_path):
    model = _tied_llama()
    mq.quantize_(model, mq.QuantConfig(4, group_size=32), skip=["@head"])
    done = quantize_embeddings_(model, mq.QuantConfig(8, scope="channel"))
    assert done == {"embeddings": ["model.embed_tokens"], "tied_heads": ["lm_head"]}
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear) and tied_to(head, emb)
    assert head.get_buffer("scales_8") is emb.get_buffer("scales_8")
    table = np_dequant_layer(emb)
    ids = torch.randint(1, 100, (2, 9))
    with torch.no_grad():
        y = model(ids).logits
        ref = _float_reference(model, table)(ids).logits
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    # stored once: in memory (size report) and in the file
    table_bytes = sum(t.numel() * t.element_size() for t in emb.state_dict().values())
    sd_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert mq.model_size(model).tensor_bytes == sd_bytes - table_bytes
    path = mq.save(model, tmp_path / "ckpt")
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    assert len({k for k in keys if k.endswith("qweight_8")}) == 1
    assert json.loads((path / META_NAME).read_text())["modules"]["lm_head"]["tied_to"] == "model.embed_tokens"
    again = mq.load(path)
    assert tied_to(again.lm_head, again.model.embed_tokens)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, y)


def test_head_quantized_with_the_same_config_is_tied_and_another_config_warns():
    cfg = mq.QuantConfig(4, group_size=32)
    model = _tied_llama()
    mq.quantize_(model, cfg)  # the head is quantized on its own (a copy of the table's codes)
    before = mq.model_size(model).tensor_bytes
    assert quantize_embeddings_(model, cfg)["tied_heads"] == ["lm_head"]
    assert tied_to(model.lm_head, model.model.embed_tokens)
    assert mq.model_size(model).tensor_bytes < before  # the float table is gone and the codes are held once
    other = _tied_llama()
    mq.quantize_(other, cfg)
    with pytest.warns(RuntimeWarning, match="keeps its own packed tensors"):
        assert quantize_embeddings_(other, mq.QuantConfig(8, scope="channel"))["tied_heads"] == []
    assert not tied_to(other.lm_head, other.model.embed_tokens)


def test_untied_embeddings_and_bad_names():
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(tie_word_embeddings=False))).eval()
    assert quantize_embeddings_(model) == {"embeddings": ["model.embed_tokens"], "tied_heads": []}
    assert isinstance(model.lm_head, nn.Linear)
    with pytest.raises(TypeError, match="not an nn.Embedding"):
        quantize_embeddings_(model, names=["lm_head"])
    with pytest.raises(ValueError, match="no module"):
        quantize_embeddings_(model, names=["model.nope"])


def test_lookups_follow_a_dtype_cast_of_the_model():
    q = QuantEmbedding.from_float(nn.Embedding(40, 32), mq.QuantConfig(4, group_size=32))
    ids = torch.tensor([[1, 2]])
    ref = q(ids)
    q.to(torch.bfloat16)
    assert q(ids).dtype == torch.bfloat16 and q.weight_dtype == torch.bfloat16
    torch.testing.assert_close(q(ids).float(), ref, rtol=1e-2, atol=1e-2)  # scales rounded to bf16


def test_scaled_embedding_subclass_is_refused_not_silently_unscaled():
    """Gemma 3's word embedding multiplies every looked-up row by embed_scale: a QuantEmbedding in its place would
    drop the scale, so the subclass is refused with a message naming it; a plain table still quantizes."""
    from medquant.quant.embeddings import quantize_embeddings_
    from medquant.testing.zoo import ZOO_BY_NAME

    gemma = ZOO_BY_NAME["gemma3_text"].build()
    assert type(gemma.get_input_embeddings()) is not torch.nn.Embedding
    with pytest.raises(TypeError, match="subclass of nn.Embedding"):
        quantize_embeddings_(gemma)
    llama = ZOO_BY_NAME["llama"].build()
    quantize_embeddings_(llama)
    assert type(llama.get_input_embeddings()).__name__ == "QuantEmbedding"


def test_lookup_is_traced_by_torch_compile_and_export_with_its_index_check():
    """``torch.compile(fullgraph=True)`` and ``torch.export`` trace a lookup (its index check was a Python
    ``int(ids.min())``: a graph break, and an export error that stopped ``compile_decoder``): the traced rows are the
    numpy reader's, an out-of-range index still fails (an assert in the graph: RuntimeError), and eager lookups keep
    their IndexError; a tied quantized model compiled whole gives its eager logits."""
    torch.manual_seed(2)
    q = QuantEmbedding.from_float(nn.Embedding(300, 64), mq.QuantConfig(4, group_size=32))
    ids, bad = torch.tensor([[0, 5, 299], [7, -1, 42]]), torch.tensor([[0, 5, 300], [7, 7, 42]])
    rows = np_dequant_layer(q)[ids.numpy()]  # -1: the last row, as numpy and nn.Embedding's callers index
    compiled = torch.compile(q, fullgraph=True, dynamic=False)
    assert np.allclose(compiled(ids).numpy(), rows, atol=1e-6)
    with pytest.raises(RuntimeError, match="embedding index out of range for 300 rows"):
        compiled(bad)
    exported = torch.export.export(q, (ids,), strict=False).module()
    assert np.allclose(exported(ids).numpy(), rows, atol=1e-6)
    with pytest.raises(RuntimeError, match="embedding index out of range for 300 rows"):
        exported(bad)
    with pytest.raises(IndexError, match="out of range for 300 rows"):
        q(bad)
    model = _tied_llama()
    config = mq.QuantConfig(4, group_size=32)
    mq.quantize_(model, config)
    quantize_embeddings_(model, config)
    assert tied_to(model.lm_head, model.model.embed_tokens)
    x = torch.tensor([[5, 6, 7, 200]])
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_quantizing_a_quantized_table_again_with_another_config_is_refused_not_ignored():
    """A second call with another config used to return ``{"embeddings": []}`` and keep the first table without a
    word (a plain model's quantized tables were not even found). It now refuses before changing anything; the
    same config, or none, keeps the table and re-ties its head."""

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(40, 32)
            self.head = nn.Linear(32, 40, bias=False)
            self.head.weight = self.embed.weight

    torch.manual_seed(0)
    model = TinyLM()
    cfg = mq.QuantConfig(8, scope="channel")
    assert quantize_embeddings_(model, cfg) == {"embeddings": ["embed"], "tied_heads": ["head"]}
    codes = model.embed.get_buffer("qweight_8")
    with pytest.raises(ValueError, match=r"'embed' \(QuantConfig\(bits=8.*already quantized with another config"):
        quantize_embeddings_(model, mq.QuantConfig(4, group_size=16))
    assert model.embed.get_buffer("qweight_8") is codes and tied_to(model.head, model.embed)
    assert quantize_embeddings_(model, cfg) == {"embeddings": [], "tied_heads": []}
    assert quantize_embeddings_(model) == {"embeddings": [], "tied_heads": []}
    assert model.embed.config == cfg and model.embed.get_buffer("qweight_8") is codes


@pytest.mark.parametrize("padding_idx,scale_grad_by_freq,norm_type", [(None, True, 2.0), (3, True, 1.0),
                                                                       (0, False, 2.0)])
def test_to_float_gives_back_the_tables_attributes_and_its_gradients(padding_idx, scale_grad_by_freq, norm_type):
    torch.manual_seed(0)
    table = nn.Embedding(40, 16, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq,
                         norm_type=norm_type)
    back = QuantEmbedding.from_float(table, mq.QuantConfig(8, scope="channel")).to_float()
    for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                 "sparse"):
        assert getattr(back, attr) == getattr(table, attr), attr
    # the reference: the original nn.Embedding holding the same (dequantized) table
    ref = nn.Embedding(40, 16, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq, norm_type=norm_type)
    with torch.no_grad():
        ref.weight.copy_(back.weight)
    ids = torch.tensor([[1, 1, 1, 5], [3, 5, 0, 7]])
    grad_out = torch.randn(2, 4, 16)
    for e in (ref, back):
        e(ids).backward(grad_out)
    torch.testing.assert_close(back.weight.grad, ref.weight.grad)
