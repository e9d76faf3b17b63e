"""Greedy generation of every generative entry of the extra zoos, quantized by roles: ``generate`` (with its
key/value cache) picks, at each step, the arg-max of the logits that one full forward of the quantized model over
the generated sequence computes (no cache). The round trips are bit-exact on every tensor
(tests/hf/test_hf_integration.py, tests/testing/test_zoo_moe.py), so a reloaded model generates the same; the
hf test compares reloaded and in-memory generation directly on BLIP-2, LLaVA-Med, Qwen3-VL, Chameleon, Gemma 4.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import medquant as mq
from medquant.quant.api import quantized_modules
from medquant.testing.zoo_moe import MOE_ZOO
from medquant.testing.zoo_vlm import VLM_LAYOUTS

ENTRIES = VLM_LAYOUTS + MOE_ZOO
NEW_TOKENS = 2
WITH_IMAGE = {"blip2", "instructblip", "kosmos2"}  # their forward needs the image


def _quantize(entry, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skip roles a text-only MoE lacks: noted (tests/testing/test_zoo_moe.py)
        if entry.is_vlm:
            mq.quantize_(model, {"@language": mq.QuantConfig(4, group_size=32),
                                 "_default": mq.QuantConfig(8, scope="channel")}, skip=["@vision", "@head"])
        else:
            mq.quantize_(model, mq.QuantConfig(4, group_size=32), skip=["@vision", "@projector", "@head"])
    assert quantized_modules(model)


def _extended(kw: dict, ids: torch.Tensor) -> dict:
    """The inputs for one forward over ``ids`` (the prompt and the generated tokens but the last): per-token
    inputs (Kosmos-2's ``image_embeds_position_mask``) are extended with zeros, the attention mask with ones."""
    out = dict(kw, input_ids=ids, attention_mask=torch.ones_like(ids))
    n = kw["input_ids"].shape[1]
    for k, v in kw.items():
        if k not in out or k in ("input_ids", "attention_mask") or not isinstance(v, torch.Tensor):
            continue
        if v.dim() == 2 and v.shape == kw["input_ids"].shape:
            out[k] = torch.cat([v, v.new_zeros(v.shape[0], ids.shape[1] - n)], dim=1)
    return out


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_generate_follows_the_full_forward(entry):
    model = entry.build()
    inputs = entry.inputs(model)
    _quantize(entry, model)
    if entry.name in WITH_IMAGE:
        kw = dict(inputs)
    else:
        ids = inputs["input_ids"][:, -6:]
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    encoder_decoder = model.config.is_encoder_decoder
    with torch.no_grad():
        seq = model.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        if encoder_decoder:  # seq: decoder start token + the new tokens
            logits = model(**kw, decoder_input_ids=seq[:, :-1]).logits
            start = 1
        else:  # seq: the prompt + the new tokens
            start = kw["input_ids"].shape[1]
            logits = model(**_extended(kw, seq[:, :-1])).logits
    new = seq[:, start:]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    # every row gets NEW_TOKENS tokens unless all rows end early with an end-of-sequence token (the tiny
    # Florence-2 decoder predicts it first); a row that ended is padded: those positions are not checked
    assert 1 <= new.shape[1] <= NEW_TOKENS and seq.shape[0] == 2
    ended = torch.tensor([[any(int(t) in eos for t in row[:i]) for i in range(len(row))] for row in new])
    if new.shape[1] < NEW_TOKENS:
        assert all(any(int(t) in eos for t in row) for row in new)
    if not encoder_decoder:
        assert torch.equal(seq[:, :start], kw["input_ids"])
    step_logits = logits[:, start - 1:start - 1 + new.shape[1]].float()
    top2 = step_logits.topk(2, dim=-1).values
    clear = ((top2[..., 0] - top2[..., 1]) > 1e-4) & ~ended  # an arg-max within rounding of a tie is not checked
    assert clear.float().mean() >= 0.5
    assert torch.equal(new[clear], step_logits.argmax(-1)[clear])
