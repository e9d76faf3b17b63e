"""A tied quantized head stays tied when the whole model is moved / converted (``model.to(device)``): each layer's
``_apply`` gave the head its own copy of the shared table, doubling it in memory and making ``save`` write it twice
with no ``tied_to``. Oracle: torch / transformers keep a tied float ``lm_head.weight is embed_tokens.weight`` through
the same ``.to()``; the moved model's logits equal those of the model before the move.
"""
from __future__ import annotations

import copy

import pytest
import torch

from medquant.quant.config import QuantConfig
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import QuantEmbedding, QuantLinear, tied_heads


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**text_kwargs(tie_word_embeddings=True))).eval()


def _shared(head: QuantLinear, emb: QuantEmbedding) -> bool:
    return all(head._buffers[n] is t for n, t in emb._buffers.items() if n in head._buffers)


def _devices():
    out = ["meta"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.mark.parametrize("device", _devices())
def test_model_to_device_keeps_the_quantized_tie_as_torch_keeps_the_float_one(device):
    # torch / transformers: the float tie survives a move (a dtype cast here, a real device move on CUDA; a move to
    # meta makes new Parameters in torch, where the quantized tie is kept all the same)
    ref = copy.deepcopy(_tied_llama()).to(torch.bfloat16 if device == "meta" else device)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight

    model = _tied_llama()
    quantize_embeddings_(model, QuantConfig(bits=4, group_size=32))
    assert tied_heads(model) == {"lm_head": "model.embed_tokens"}
    moved = copy.deepcopy(model).to(device)
    assert tied_heads(moved) == {"lm_head": "model.embed_tokens"}
    assert _shared(moved.lm_head, moved.model.embed_tokens)
    assert moved.lm_head.qweight_4.device.type == device
    if device != "meta":
        ids = torch.randint(0, model.config.vocab_size, (1, 6))
        torch.testing.assert_close(moved(ids.to(device)).logits.cpu(), model(ids).logits, atol=1e-3, rtol=1e-3)


def test_a_conversion_making_new_tensors_keeps_the_tie_and_the_results():
    """``_apply`` with a function returning new tensors (what a device move does) on a CPU-only machine."""
    model = _tied_llama()
    quantize_embeddings_(model, QuantConfig(bits=8, scope="channel"))
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    want = model(ids).logits
    before = model.lm_head.qweight_8
    model._apply(lambda t: t.clone())
    assert model.lm_head.qweight_8 is not before  # new tensors...
    assert _shared(model.lm_head, model.model.embed_tokens)  # ...still shared
    torch.testing.assert_close(model(ids).logits, want, atol=0, rtol=0)
    # dtype casts keep the tie too, and the stored scales keep their dtype
    model.to(torch.bfloat16)
    assert _shared(model.lm_head, model.model.embed_tokens)
    assert model.lm_head.scales_8.dtype == torch.float16


def test_moving_the_head_alone_gives_it_its_own_copy_and_quantize_embeddings_reties():
    model = _tied_llama()
    quantize_embeddings_(model, QuantConfig(bits=4, group_size=32))
    model.lm_head._apply(lambda t: t.clone())
    assert tied_heads(model) == {}
    quantize_embeddings_(model)
    assert tied_heads(model) == {"lm_head": "model.embed_tokens"}
