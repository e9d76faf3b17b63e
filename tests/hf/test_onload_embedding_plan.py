"""Quantize-on-load with a plan recorded from a model whose embedding (and possibly a tied head) was quantized.

``MedQuantConfig(modules=recorded)`` of a model quantized with :func:`medquant.quantize_` and
:func:`~medquant.quant.embeddings.quantize_embeddings_` failed on a float folder with "pattern 'model.embed_tokens'
matches modules but none of them is an nn.Linear or nn.Conv2d": the recorded ``QuantEmbedding`` entry was handed to
``quantize_`` as a Linear pattern. Reference: the model quantized in memory (``quantize_`` + ``quantize_embeddings_``
with the same per-module configs on the same float weights): every tensor and its dtype, and the logits, compared
with ``torch.equal``; a tied head shares the embedding's packed tensors again. Cases that cannot be replayed are
refused up front with a ``ValueError`` naming the module.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import medquant as mq
import medquant.hf
from medquant.hf import MedQuantConfig
from medquant.quant import QuantLinear
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import QuantEmbedding, tied_heads
from medquant.testing.zoo import text_kwargs
from tests.hf._helpers import state_equal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
AutoModelForCausalLM = transformers.AutoModelForCausalLM

IDS = torch.arange(2, 20).reshape(2, 9)
BODY = mq.QuantConfig(4, group_size=32)
TABLE = mq.QuantConfig(8, scope="channel")


def _model(tied: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**text_kwargs(), "tie_word_embeddings": tied})
    return transformers.LlamaForCausalLM(cfg).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _recorded(model, tmp_path) -> dict:
    """The ``modules`` that ``save_pretrained`` writes into ``config.json`` (read back as JSON)."""
    medquant.hf.save_pretrained(model, tmp_path / "q")
    return json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"]


def _load(folder, modules):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=MedQuantConfig(modules=modules)).eval()


def _check_equal(ref, loaded) -> None:
    state_equal(ref, loaded)
    assert torch.equal(_logits(loaded), _logits(ref))
    assert tied_heads(loaded) == tied_heads(ref)


def test_an_untied_quantized_embedding_and_head_replay_on_load(tmp_path):
    _model(tied=False).save_pretrained(tmp_path / "float")
    ref = _model(tied=False)
    mq.quantize_(ref, BODY)
    quantize_embeddings_(ref, TABLE, tie=False)
    modules = _recorded(ref, tmp_path)
    assert modules["model.embed_tokens"]["type"] == "QuantEmbedding"
    loaded = _load(tmp_path / "float", modules)
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding) and isinstance(loaded.lm_head, QuantLinear)
    _check_equal(ref, loaded)


@pytest.mark.parametrize("how", ["head_skipped_then_tied", "head_with_the_table_config"])
def test_a_tied_quantized_head_replays_on_load_and_is_tied_again(tmp_path, how):
    _model(tied=True).save_pretrained(tmp_path / "float")
    ref = _model(tied=True)
    if how == "head_skipped_then_tied":  # body at 4 bits, table and head at 8 bits per row, one copy
        mq.quantize_(ref, BODY, skip=["lm_head"])
        quantize_embeddings_(ref, TABLE)
    else:  # the head quantized by quantize_ with the table's config: equal codes, tied by quantize_embeddings_
        mq.quantize_(ref, TABLE)
        quantize_embeddings_(ref, TABLE)
    assert tied_heads(ref) == {"lm_head": "model.embed_tokens"}
    modules = _recorded(ref, tmp_path)
    assert modules["lm_head"]["tied_to"] == "model.embed_tokens"
    loaded = _load(tmp_path / "float", modules)
    assert loaded.lm_head.qweight_8 is loaded.model.embed_tokens.qweight_8  # one copy in memory, as saved
    _check_equal(ref, loaded)
    # and the loaded model saves and reloads as the reference does (pre-quantized, tied, stored once)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    _check_equal(ref, again)


def test_an_embedding_quantized_apart_from_a_tied_head_replays_on_load(tmp_path):
    """A tied model whose head ``quantize_`` quantized from the shared weight and whose table was quantized with
    another config, not tied (``tie=False``): two copies, as in the reference."""
    _model(tied=True).save_pretrained(tmp_path / "float")
    ref = _model(tied=True)
    mq.quantize_(ref, BODY)
    quantize_embeddings_(ref, TABLE, tie=False)
    modules = _recorded(ref, tmp_path)
    assert "tied_to" not in modules["lm_head"]
    loaded = _load(tmp_path / "float", modules)
    _check_equal(ref, loaded)


def test_an_embedding_only_plan_replays_on_load(tmp_path):
    """Only the table quantized (every Linear float): the plan has no Linear layer and still loads. (The record is
    ``MedQuantConfig.record``'s, through JSON; saving such a model is tested in test_embedding_plan_review5.py.)"""
    _model(tied=False).save_pretrained(tmp_path / "float")
    ref = _model(tied=False)
    quantize_embeddings_(ref, TABLE)
    modules = json.loads(MedQuantConfig.from_model(ref).to_json_string())["modules"]
    assert list(modules) == ["model.embed_tokens"]
    _check_equal(ref, _load(tmp_path / "float", modules))


def _tied_record(tmp_path) -> dict:
    ref = _model(tied=True)
    mq.quantize_(ref, BODY, skip=["lm_head"])
    quantize_embeddings_(ref, TABLE)
    return _recorded(ref, tmp_path)


def test_a_tied_head_recorded_for_an_untied_checkpoint_is_refused_up_front(tmp_path):
    """The record says the head shares the table's tensors; in an untied float checkpoint the head has its own
    weight, so neither tying it (a different head) nor quantizing it apart (not what was recorded) replays it."""
    modules = _tied_record(tmp_path)
    _model(tied=False).save_pretrained(tmp_path / "untied")
    with pytest.raises(ValueError, match=r"'lm_head'.*tied_to.*model\.embed_tokens.*not tied"):
        _load(tmp_path / "untied", modules)


def test_inconsistent_recorded_embedding_entries_are_refused_up_front(tmp_path):
    modules = _tied_record(tmp_path)
    _model(tied=True).save_pretrained(tmp_path / "float")

    other = copy.deepcopy(modules)  # a tied head recorded with another config than its table's
    other["lm_head"]["config"] = BODY.to_dict()
    with pytest.raises(ValueError, match=r"'lm_head'.*tied_to.*config"):
        _load(tmp_path / "float", other)

    orphan = copy.deepcopy(modules)  # tied to a table the record does not quantize
    del orphan["model.embed_tokens"]
    with pytest.raises(ValueError, match=r"'lm_head'.*tied_to.*'model\.embed_tokens'.*no QuantEmbedding"):
        _load(tmp_path / "float", orphan)

    missing = copy.deepcopy(modules)  # a table the model does not have
    missing["model.embed_words"] = missing.pop("model.embed_tokens")
    missing["lm_head"]["tied_to"] = "model.embed_words"
    with pytest.raises(ValueError, match=r"'model\.embed_words'.*QuantEmbedding.*does not have"):
        _load(tmp_path / "float", missing)

    wide = copy.deepcopy(modules)  # another table shape
    wide["model.embed_tokens"]["out_features"] *= 2
    with pytest.raises(ValueError, match=r"'model\.embed_tokens'.*does not fit"):
        _load(tmp_path / "float", wide)

    pad = copy.deepcopy(modules)  # another padding index: the lookup would differ from the record
    pad["model.embed_tokens"]["padding_idx"] = 3
    with pytest.raises(ValueError, match=r"'model\.embed_tokens'.*padding_idx"):
        _load(tmp_path / "float", pad)


def test_a_tied_head_stored_apart_in_the_checkpoint_is_refused(tmp_path):
    """A tied float checkpoint that also stores ``lm_head.weight``: with the table's values transformers ties them
    and the record replays (control, equal to the reference); with other values it loads the head apart, and the
    recorded tie cannot be replayed: refused, naming the head, instead of a head quantized from other weights."""
    from safetensors.torch import load_file, save_file

    modules = _tied_record(tmp_path)
    ref = _model(tied=True)
    mq.quantize_(ref, BODY, skip=["lm_head"])
    quantize_embeddings_(ref, TABLE)
    for name, delta in (("same", 0.0), ("other", 1.0)):
        folder = tmp_path / name
        _model(tied=True).save_pretrained(folder)
        state = load_file(folder / "model.safetensors")
        state["lm_head.weight"] = state["model.embed_tokens.weight"] + delta
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        if name == "same":
            _check_equal(ref, _load(folder, modules))
        else:
            with pytest.raises(ValueError, match=r"'lm_head'.*tied_to.*'model\.embed_tokens'.*apart"):
                _load(folder, modules)
