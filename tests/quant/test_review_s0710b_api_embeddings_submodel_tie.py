"""quantize_embeddings_ ties a head that quantize_ already quantized to its table when the model says they are
tied, and warns when they cannot share storage. It read that from ``model.config.tie_word_embeddings`` only:
BLIP-2 (CheXagent's layout) keeps the flag in its language model's config, the top-level config has none, so a
head quantized with the same config was silently left as a second copy, and one with another config gave no
warning.

Reference: transformers' own tie of the float model (``get_output_embeddings().weight is
get_input_embeddings().weight`` and ``get_expanded_tied_weights_keys(all_submodels=True)``), the logits before
the tie (equal codes give equal logits), and ``tied_to`` (the head holds the table's very tensors).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import medquant as mq
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import tied_to
from medquant.testing.zoo import HEADS, HIDDEN, IMAGE, IMAGE_TOKEN, INTER, LAYERS, PATCH, VOCAB, text_kwargs
from medquant.testing.zoo_vlm import EXTRA_ZOO

transformers = pytest.importorskip("transformers")


def _tied_blip2():
    vit = {"hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "image_size": IMAGE, "patch_size": PATCH}
    qformer = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
               "intermediate_size": INTER, "encoder_hidden_size": HIDDEN, "max_position_embeddings": 64}
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
        vision_config=vit, qformer_config=qformer,
        text_config=dict(model_type="llama", **text_kwargs(tie_word_embeddings=True)), num_query_tokens=4,
        image_token_index=IMAGE_TOKEN)).eval()
    # transformers' own view: the head is tied to the table, by the language model's config alone
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.get_expanded_tied_weights_keys(all_submodels=True) == {
        "language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}
    assert getattr(model.config, "tie_word_embeddings", None) is None
    return model


ENTRY = next(e for e in EXTRA_ZOO if e.name == "blip2")


def test_a_head_quantized_alike_is_tied_when_a_sub_model_config_says_tied():
    cfg = mq.QuantConfig(4, group_size=32)
    model = _tied_blip2()
    inputs = ENTRY.inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mq.quantize_(model, cfg)
    head = model.language_model.lm_head
    own = {k: v.clone() for k, v in head.state_dict().items()}
    done = quantize_embeddings_(model, cfg)
    assert done == {"embeddings": ["language_model.model.embed_tokens"], "tied_heads": ["language_model.lm_head"]}
    emb = model.language_model.model.embed_tokens
    assert model.language_model.lm_head is head and tied_to(head, emb)  # the embedding's very tensors
    for k, v in head.state_dict().items():  # equal to the head's own codes: it computes as before
        assert torch.equal(v, own[k]), k
    # the model computes as the float model with the dequantized table as its embedding and its tied head
    ref = _tied_blip2()
    with torch.no_grad():
        for n, q in mq.quant.quantized_modules(model).items():
            if n != "language_model.lm_head":
                ref.get_submodule(n).weight.copy_(q.dequantized_weight().reshape(ref.get_submodule(n).weight.shape))
        ref.get_input_embeddings().weight.copy_(emb.dequantized_weight())  # the head's too: one tensor
        torch.testing.assert_close(ENTRY.output(model, inputs), ENTRY.output(ref, inputs), rtol=1e-4, atol=1e-4)


def test_a_head_quantized_otherwise_is_named_in_a_warning():
    model = _tied_blip2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mq.quantize_(model, mq.QuantConfig(4, group_size=32))
    with pytest.warns(RuntimeWarning, match="language_model.lm_head.*keeps its own packed tensors"):
        assert quantize_embeddings_(model, mq.QuantConfig(8, scope="channel"))["tied_heads"] == []
    assert not tied_to(model.language_model.lm_head, model.language_model.model.embed_tokens)


def test_an_untied_model_is_not_tied_nor_warned_about():
    cfg = mq.QuantConfig(4, group_size=32)
    model = ENTRY.build()  # the zoo's BLIP-2: untied language model
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mq.quantize_(model, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quantize_embeddings_(model, cfg)["tied_heads"] == []
