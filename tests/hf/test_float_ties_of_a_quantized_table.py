"""T5 (transformers 5) ties ``encoder.embed_tokens.weight`` and ``decoder.embed_tokens.weight`` (and ``lm_head``) to
``shared.weight``. Once ``shared`` is quantized those ties were dropped whole, though the two float embeddings
still share one tensor: the checkpoint holds it once, and ``from_pretrained`` left ``decoder.embed_tokens`` freshly
initialised (other logits). Reference: the in-memory model (its tensors and logits)."""
from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import medquant
import medquant.hf
from medquant import QuantConfig
from medquant.quant.embeddings import quantize_embeddings_


@pytest.mark.parametrize("writer", ["save_pretrained", "medquant.save"])
def test_float_embeddings_tied_to_a_quantized_table_stay_tied_to_each_other(tmp_path, writer):
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=4,
                   decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    quantize_embeddings_(model, QuantConfig(8, group_size=32))
    assert model.encoder.embed_tokens.weight is model.decoder.embed_tokens.weight
    ids, dec = torch.randint(0, 128, (2, 7)), torch.randint(0, 128, (2, 5))
    if writer == "save_pretrained":
        medquant.hf.save_pretrained(model, tmp_path / "q")
    else:
        medquant.save(model, tmp_path / "q")
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "q").eval()
    assert loaded.encoder.embed_tokens.weight is loaded.decoder.embed_tokens.weight
    for k, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], t), k
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=dec).logits,
                           model(input_ids=ids, decoder_input_ids=dec).logits)
