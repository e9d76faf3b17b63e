"""Embedding-only medquant models through ``save_pretrained``, and ``skip`` with a recorded modules-only plan.

1. A model whose only quantized layer is an embedding table (``quantize_embeddings_`` without ``quantize_``) was
   refused by :func:`medquant.hf.save_pretrained` ("has no medquant-quantized layer": the check counted QuantLinear /
   QuantConv2d only). It now saves and reloads (pre-quantized) to a model equal to the saved one: every tensor and
   its dtype, the logits (``torch.equal``) and the tied heads. A float model is still refused, saying what to run.
2. ``MedQuantConfig(modules=recorded, skip=[...])`` applied ``skip`` to the recorded Linear entries only (through
   ``plan``), and quantized a skipped embedding table anyway. Skip wins everywhere: a skipped table stays an
   ``nn.Embedding`` (a head recorded ``tied_to`` it stays the float head sharing its weight), a skipped tied head
   stays float with the table quantized apart. Reference: a fresh float model quantized in memory with
   ``quantize_(model, BODY, skip=...)`` and ``quantize_embeddings_`` of the tables not skipped, compared with
   ``torch.equal``.
"""
from __future__ import annotations

import json

import pytest
from torch import nn

import medquant as mq
import medquant.hf
from medquant.hf import MedQuantConfig
from medquant.quant import QuantLinear
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import QuantEmbedding

# the tiny Llama, its configs and the equality check of the on-load embedding tests
from tests.hf.test_onload_embedding_plan import BODY, TABLE, AutoModelForCausalLM, _check_equal, _model


# ------------------------------------------------------------------------------ 1. embedding-only save_pretrained
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_an_embedding_only_model_saves_and_reloads_equal(tmp_path, tied):
    ref = _model(tied)
    quantize_embeddings_(ref, TABLE)
    assert isinstance(ref.model.embed_tokens, QuantEmbedding)
    # untied: the head stays a float nn.Linear; tied: it shares the table's packed tensors
    assert isinstance(ref.lm_head, QuantLinear if tied else nn.Linear)
    medquant.hf.save_pretrained(ref, tmp_path / "q")
    modules = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"]
    assert modules["model.embed_tokens"]["type"] == "QuantEmbedding"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding)
    _check_equal(ref, loaded)
    # the loaded model saves again (model.save_pretrained) and reloads to the same model
    loaded.save_pretrained(tmp_path / "again")
    _check_equal(ref, AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval())


def test_a_float_model_is_still_refused_saying_what_to_run(tmp_path):
    with pytest.raises(ValueError, match=r"no medquant-quantized layer.*quantize_\(.*quantize_embeddings_"):
        medquant.hf.save_pretrained(_model(False), tmp_path / "q")
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------ 2. skip with a modules-only plan
def _record(tied: bool) -> dict:
    """``modules`` of the float model with every Linear at BODY and the table at TABLE (tied: the head skipped by
    ``quantize_`` and tied to the table; untied: the head at BODY, the table apart)."""
    q = _model(tied)
    mq.quantize_(q, BODY, skip=["lm_head"] if tied else None)
    quantize_embeddings_(q, TABLE, tie=tied)
    modules = json.loads(MedQuantConfig.from_model(q).to_json_string())["modules"]
    assert modules["model.embed_tokens"]["type"] == "QuantEmbedding"
    assert (modules["lm_head"].get("tied_to") == "model.embed_tokens") is tied
    return modules


CASES = {
    # name: (tied, skip, reference: quantize_ skip, tables quantize_embeddings_ quantizes, tie)
    "untied-table": (False, ["model.embed_tokens"], ["model.embed_tokens"], [], False),
    "untied-table-and-head": (False, ["lm_head", "re:model\\.embed_.*"], ["lm_head", "re:model\\.embed_.*"], [],
                              False),
    "untied-linear-only": (False, ["model.layers.0.mlp"], ["model.layers.0.mlp"], ["model.embed_tokens"], False),
    "tied-table": (True, ["model.embed_tokens"], ["lm_head", "model.embed_tokens"], [], False),
    "tied-head": (True, ["lm_head"], ["lm_head"], ["model.embed_tokens"], False),
    "tied-head-role": (True, ["@head"], ["lm_head"], ["model.embed_tokens"], False),
    "tied-linear-only": (True, ["model.layers.1.self_attn"], ["lm_head", "model.layers.1.self_attn"],
                         ["model.embed_tokens"], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_skip_wins_over_recorded_tables_and_tied_heads(tmp_path, case):
    tied, skip, ref_skip, tables, tie = CASES[case]
    _model(tied).save_pretrained(tmp_path / "float")
    modules = _record(tied)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=MedQuantConfig(modules=modules, skip=skip)).eval()

    ref = _model(tied)
    mq.quantize_(ref, BODY, skip=ref_skip)
    for name in tables:
        quantize_embeddings_(ref, TABLE, names=[name], tie=tie)
    _check_equal(ref, loaded)
    emb, head = loaded.model.embed_tokens, loaded.lm_head
    assert isinstance(emb, QuantEmbedding) is bool(tables)
    if tied and not tables:  # the skipped table keeps its float head: one tensor, as in the float model
        assert type(head) is nn.Linear and head.weight is emb.weight
    if tie:
        assert head.qweight_8 is emb.qweight_8
    # and it saves and reloads as it is
    loaded.save_pretrained(tmp_path / "q")
    _check_equal(ref, AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval())


def test_a_plan_whose_every_entry_is_skipped_is_refused(tmp_path):
    _model(False).save_pretrained(tmp_path / "float")
    modules = {"model.embed_tokens": _record(False)["model.embed_tokens"]}
    with pytest.raises(ValueError, match=r"quantizes no layer.*embedding"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "float", quantization_config=MedQuantConfig(modules=modules, skip=["model.embed_tokens"]))
