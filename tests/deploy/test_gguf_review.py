"""format="gguf": models and tokenizers the GGUF file cannot describe are refused, not written as another model.

References independent of the exporter: transformers' own model classes and rope initialisers (what the source
model computes), and transformers' GGUF reader (``from_pretrained(dir, gguf_file=...)``), which, like llama.cpp,
reads a byte-level BPE vocabulary only with its merges.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("gguf")

from gguf import GGUFReader

from medquant.deploy import ExportError, export
from medquant.testing.zoo import text_kwargs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_a_model_without_a_language_model_head_is_refused(tmp_path):
    """A sequence classifier (a llama decoder with a ``score`` head of ``num_labels`` rows) computes class logits;
    a GGUF llama file without ``output`` is read by llama.cpp as a causal LM whose head is ``token_embd``: another
    model. The causal LM with a tied head is still written (no ``output`` tensor, as llama.cpp expects)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(LlamaConfig(**text_kwargs(num_labels=3, pad_token_id=0))).eval()
    ids = torch.tensor([[5, 6, 7]])
    assert clf(ids).logits.shape == (1, 3)  # class scores, not vocabulary logits
    assert clf.get_output_embeddings() is None
    with pytest.raises(ExportError, match="language-model head"):
        export(clf, tmp_path / "clf.gguf", format="gguf", tokenizer=False)
    assert not (tmp_path / "clf.gguf").exists()

    lm = LlamaForCausalLM(LlamaConfig(**text_kwargs(tie_word_embeddings=True)))
    report = export(lm, tmp_path / "lm.gguf", format="gguf", tokenizer=False)
    names = {t.name for t in GGUFReader(report.files[0]).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}


def _yarn(cfg_over: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**text_kwargs(max_position_embeddings=256, rope_parameters={**YARN, **cfg_over}))


@pytest.mark.parametrize("over", [{"beta_fast": 4.0}, {"beta_slow": 2.0}, {"attention_factor": 2.0},
                                  {"truncate": False}])
def test_yarn_parameters_gguf_does_not_carry_are_refused(over, tmp_path):
    """GGUF's YaRN keys here are the factor and the original context; llama.cpp takes beta_fast 32, beta_slow 1,
    the attention factor 0.1 ln(factor) + 1 and truncated correction dims. A config with other values computes other
    rope frequencies / attention scaling (transformers' yarn initialiser), so its file would run another model."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    default_freq, default_scale = ROPE_INIT_FUNCTIONS["yarn"](_yarn({}), "cpu")
    freq, scale = ROPE_INIT_FUNCTIONS["yarn"](_yarn(over), "cpu")
    assert not (torch.equal(freq, default_freq) and scale == default_scale)  # the setting changes the model
    with pytest.raises(ExportError, match="yarn"):
        export(LlamaForCausalLM(_yarn(over)), tmp_path / "y.gguf", format="gguf", tokenizer=False)
    assert not (tmp_path / "y.gguf").exists()


def test_yarn_with_gguf_defaults_is_written(tmp_path):
    """Values equal to llama.cpp's defaults (given explicitly or not) are written as factor and original context."""
    from transformers import LlamaForCausalLM

    for over in ({}, {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}):
        report = export(LlamaForCausalLM(_yarn(over)), tmp_path / "y.gguf", format="gguf", tokenizer=False,
                        overwrite=True)
        fields = GGUFReader(report.files[0]).fields
        assert float(fields["llama.rope.scaling.factor"].contents()) == 4.0
        assert int(fields["llama.rope.scaling.original_context_length"].contents()) == 64


def test_qwen2_sliding_window_attention_is_refused(tmp_path):
    """Qwen2 with ``use_sliding_window`` attends over a window in some layers (transformers: other logits past the
    window than the same weights with full attention); llama.cpp's qwen2 has no sliding window, so the file would
    compute full attention everywhere. Without it (the Qwen2 default) the model is written."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = text_kwargs(num_key_value_heads=2, sliding_window=4, max_window_layers=0)
    torch.manual_seed(0)
    swa = Qwen2ForCausalLM(Qwen2Config(**kw, use_sliding_window=True)).eval()
    full = Qwen2ForCausalLM(Qwen2Config(**kw, use_sliding_window=False)).eval()
    full.load_state_dict(swa.state_dict())
    ids = torch.arange(1, 13).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(swa(ids).logits, full(ids).logits, atol=1e-5)
    with pytest.raises(ExportError, match="sliding"):
        export(swa, tmp_path / "swa.gguf", format="gguf", tokenizer=False)
    assert not (tmp_path / "swa.gguf").exists()
    export(full, tmp_path / "full.gguf", format="gguf", tokenizer=False)


def test_a_byte_level_bpe_tokenizer_without_merges_is_refused(tmp_path):
    """llama.cpp refuses a ``gpt2`` vocabulary without ``tokenizer.ggml.merges`` ("cannot find tokenizer merges in
    model file"), and transformers' GGUF reader cannot read it either; the gguf writer cannot write an empty array.
    A tokenizer with no merges is refused, naming the problem."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    src = tmp_path / "tok"
    fast.save_pretrained(src)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(vocab_size=len(vocab))))
    with pytest.raises(ExportError, match="merges"):
        export(model, tmp_path / "out" / "t.gguf", format="gguf", source=src)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_an_activation_llama_cpp_does_not_compute_is_refused(family, tmp_path):
    """llama.cpp's llama and qwen2 compute the MLP with SiLU and its gemma3 with tanh-approximated GELU, whatever the
    config says; the GGUF file has no activation key. A config with another activation (transformers: other logits
    with the same weights) is refused; the family's own activation is written."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    cls, cfg_cls, key, own = {"llama": (LlamaForCausalLM, LlamaConfig, "hidden_act", "silu"),
                              "qwen2": (Qwen2ForCausalLM, Qwen2Config, "hidden_act", "silu"),
                              "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, "hidden_activation",
                                         "gelu_pytorch_tanh")}[family]
    kw = text_kwargs(num_key_value_heads=2)
    torch.manual_seed(0)
    other = cls(cfg_cls(**kw, **{key: "relu"})).eval()
    same = cls(cfg_cls(**kw, **{key: own})).eval()
    same.load_state_dict(other.state_dict())
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert not torch.allclose(other(ids).logits, same(ids).logits, atol=1e-4)
    with pytest.raises(ExportError, match="relu"):
        export(other, tmp_path / "a.gguf", format="gguf", tokenizer=False)
    assert not (tmp_path / "a.gguf").exists()
    export(same, tmp_path / "b.gguf", format="gguf", tokenizer=False)


def _gemma3(**over):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kw = text_kwargs(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                     num_hidden_layers=6)
    kw.update(over)
    return Gemma3ForCausalLM(Gemma3TextConfig(**kw))


@pytest.mark.parametrize("layers", [62, 61])
def test_gemma3_attention_scale_note_follows_llama_cpp(layers, tmp_path):
    """llama.cpp's gemma3 scales attention by ``1/sqrt(n_embd / n_head)`` when the model has 62 layers (its 27B
    type, whose query_pre_attn_scalar is hidden / heads = 168, not head_dim = 128) and by ``1/sqrt(head_dim)``
    otherwise. A model built like the 27B is noted only when its layer count makes llama.cpp use the other scale."""
    model = _gemma3(hidden_size=64, intermediate_size=64, num_hidden_layers=layers, head_dim=8,
                    query_pre_attn_scalar=16, sliding_window=4)
    report = export(model, tmp_path / "s.gguf", format="gguf", tokenizer=False)
    noted = any("query_pre_attn_scalar" in n for n in report.notes)
    assert noted == (layers != 62)
