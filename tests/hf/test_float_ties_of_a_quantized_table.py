"""T5 (transformers 5) ties ``encoder.embed_tokens.weight`` and ``decoder.embed_tokens.weight`` (and ``lm_head``) to
``shared.weight``. Once ``shared`` is quantized those ties were dropped whole, though the two float embeddings
still shared one tensor: the checkpoint held it once, and ``from_pretrained`` left ``decoder.embed_tokens`` freshly
initialised (other logits); the float ties now follow the first float weight (``_untie``). ``quantize_embeddings_``
now binds the quantized table under the encoder's and decoder's names too (``shared_modules``), whose weights
``_untie`` then drops with ``shared``'s. Reference: the in-memory model (its tensors and logits)."""
from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import medquant
import medquant.hf
from medquant import QuantConfig
from medquant.quant.embeddings import quantize_embeddings_


@pytest.mark.parametrize("writer", ["save_pretrained", "medquant.save"])
def test_t5_with_a_quantized_shared_table_loads_as_saved(tmp_path, writer):
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=4,
                   decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    quantize_embeddings_(model, QuantConfig(8, group_size=32))
    assert model.encoder.embed_tokens is model.shared and model.decoder.embed_tokens is model.shared
    ids, dec = torch.randint(0, 128, (2, 7)), torch.randint(0, 128, (2, 5))
    if writer == "save_pretrained":
        medquant.hf.save_pretrained(model, tmp_path / "q")
    else:
        medquant.save(model, tmp_path / "q")
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "q").eval()
    assert loaded.encoder.embed_tokens is loaded.shared and loaded.decoder.embed_tokens is loaded.shared
    for k, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], t), k
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=dec).logits,
                           model(input_ids=ids, decoder_input_ids=dec).logits)
