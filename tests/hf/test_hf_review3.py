"""Review 3 of the transformers integration: quantize-on-load of a tied-embedding checkpoint that also stores the
head's weight.

Reference: transformers' own ``from_pretrained`` of the float folder (which ties ``lm_head`` to the token
embedding when the stored head equals it, keeps a differing one apart, and ties the embedding to a head stored
alone) followed by :func:`medquant.quantize_` with the same
config; every tensor and the logits compared with ``torch.equal``.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from medquant import QuantConfig, quantize_
from medquant.hf import MedQuantConfig
from medquant.quant import QuantLinear
from medquant.testing.zoo import ZOO_BY_NAME, text_kwargs
from tests.hf._helpers import state_equal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _store_head_too(folder, head: str, emb: str, noise: float, drop_embedding: bool = False) -> None:
    """Add ``<head>.weight`` to the folder's safetensors file: a copy of the token embedding (as many tied
    checkpoints on the Hub hold it), plus ``noise``; with ``drop_embedding`` the embedding's own key is removed."""
    path = folder / "model.safetensors"
    state = load_file(path)
    assert f"{head}.weight" not in state  # transformers saves a tied head once, under the embedding
    w = state[f"{emb}.weight"].clone()
    state[f"{head}.weight"] = w + noise * torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    if drop_embedding:
        del state[f"{emb}.weight"]
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("noise, drop", [(0.0, False), (0.5, False), (0.5, True)],
                         ids=["copy", "differs", "head-only"])
def test_quantize_on_load_of_a_tied_checkpoint_that_stores_the_head_equals_quantize_(noise, drop, tmp_path):
    """Before, the head's stored weight was quantized while loading, and transformers then failed tying it
    (``AttributeError: `weight` is not an nn.Parameter``). Now a tied weight stays float while loading and is
    quantized once transformers has tied it: an equal copy is tied, a differing one kept apart, and a checkpoint
    holding the head only gets its embedding tied to it; in each case what ``quantize_`` of the loaded float model
    gives."""
    torch.manual_seed(0)
    cls = transformers.LlamaForCausalLM
    cls(transformers.LlamaConfig(**{**text_kwargs(), "tie_word_embeddings": True})).save_pretrained(tmp_path)
    _store_head_too(tmp_path, "lm_head", "model.embed_tokens", noise, drop)
    spec = QuantConfig(4, group_size=32)
    expected = cls.from_pretrained(tmp_path)
    # transformers ties a stored copy equal to the embedding, and keeps a differing one apart
    assert (expected.lm_head.weight is expected.model.embed_tokens.weight) == (noise == 0.0 or drop)
    quantize_(expected, spec)
    loaded = cls.from_pretrained(tmp_path, quantization_config=MedQuantConfig(spec))
    assert isinstance(loaded.lm_head, QuantLinear)
    state_equal(expected, loaded)
    ids = torch.randint(1, 200, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_quantize_on_load_of_a_tied_vlm_checkpoint_that_stores_the_head_equals_quantize_(tmp_path):
    """The same for Gemma 3 (its head is tied to ``model.language_model.embed_tokens``)."""
    entry = ZOO_BY_NAME["gemma3_vlm"]
    entry.build().save_pretrained(tmp_path)
    cls = transformers.AutoModelForImageTextToText
    emb = next(k for k in load_file(tmp_path / "model.safetensors") if k.endswith("embed_tokens.weight"))
    _store_head_too(tmp_path, "lm_head", emb.removesuffix(".weight"), 0.0)
    spec = MedQuantConfig({"@head": QuantConfig(8), "_default": QuantConfig(4, group_size=32)}, skip=["@vision"])
    expected = cls.from_pretrained(tmp_path)
    quantize_(expected, spec.quantize_spec(), skip=spec.skip)
    loaded = cls.from_pretrained(tmp_path, quantization_config=spec)
    state_equal(expected, loaded)
    inputs = entry.inputs(expected)
    with torch.no_grad():
        assert torch.equal(entry.output(loaded, inputs), entry.output(expected, inputs))


def test_a_bare_quantconfig_as_quantization_config_names_medquantconfig(tmp_path):
    """transformers reads ``quant_method`` from a ``quantization_config``; a QuantConfig passed there is refused
    with an error naming MedQuantConfig (it was a bare "no attribute 'quant_method'"); hasattr and copies of a
    QuantConfig behave as before."""
    import copy
    import pickle

    import transformers

    import medquant as mq
    from medquant.testing.zoo import ZOO_BY_NAME

    ZOO_BY_NAME["llama"].build().save_pretrained(tmp_path)
    cfg = mq.QuantConfig(4, group_size=32)
    with pytest.raises(AttributeError, match=r"MedQuantConfig\(QuantConfig\(\.\.\.\)\)"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    assert not hasattr(cfg, "quant_method") and not hasattr(cfg, "other")
    assert copy.deepcopy(cfg) == cfg == pickle.loads(pickle.dumps(cfg))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=mq.MedQuantConfig(cfg))
    assert isinstance(model.model.layers[0].mlp.up_proj, mq.QuantLinear)
