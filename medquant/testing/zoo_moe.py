"""Tiny mixture-of-experts language models (transformers 5 layouts: experts as 3-D parameters).

Each builder returns a seeded (``torch.manual_seed(seed)``), eval-mode float32 causal LM with hidden size 64, 2
layers, 4 experts of intermediate size 32 (top-2), vocabulary 256, built offline from its config:

==============  ====================================================================================
mixtral         ``MixtralExperts``: ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``; router ``gate``
qwen2_moe       ``Qwen2MoeExperts`` + a shared expert (``nn.Linear`` MLP) gated by ``shared_expert_gate``
qwen3_moe       ``Qwen3MoeExperts`` (per-head q/k norms in attention)
llama4_text     ``Llama4TextExperts`` (dense style, transposed ``(E, H, 2I)``), ``Llama4Router`` (an
                ``nn.Linear`` subclass), a shared expert
gpt_oss         ``GptOssExperts``: transposed, biases, interleaved gate/up with a clamped SwiGLU
==============  ====================================================================================

Random expert weights are drawn with std 0.02 (transformers leaves some of them at zero or uninitialised).

:data:`MOE_ZOO` holds the same models as :class:`~medquant.testing.zoo.ZooEntry` objects (inputs: 8 tokens per
sample, batch 2; output: the logits), so a test can run them through the same code as the other zoos;
``moe_zoo_params`` parametrizes a pytest test over them.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .zoo import ZooEntry

__all__ = ["MOE_BUILDERS", "MOE_EXTRA_BUILDERS", "MOE_ZOO", "MOE_ZOO_BY_NAME", "build_moe", "moe_inputs"]

_COMMON: dict = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                 "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2))


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, shared_expert_intermediate_size=48))


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**_COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32))


def _llama4_text():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(**{**_COMMON, "intermediate_size": 32}, intermediate_size_mlp=48, head_dim=16,
                           num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1)
    return Llama4ForCausalLM(cfg)


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(**_COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    return GptOssForCausalLM(cfg)


def _gemma4():
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    cfg = Gemma4TextConfig(**{k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"}, head_dim=16,
                           enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                           hidden_size_per_layer_input=0)
    return Gemma4ForCausalLM(cfg)


MOE_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "llama4_text": _llama4_text,
    "gpt_oss": _gpt_oss,
}
def _qwen3_vl_moe():
    from .zoo_vlm import _build_qwen3_vl

    return _build_qwen3_vl(moe=True)


#: MoE models :func:`build_moe` builds that are not in :data:`MOE_ZOO`: ``gemma4`` (Gemma 4 text with MoE blocks,
#: whose router ``layers.i.router`` computes the expert logits with a child ``nn.Linear``, ``router.proj``) and
#: ``qwen3_vl_moe`` (Qwen3-VL-MoE, a vision-language model: its inputs, with an image, come from
#: ``medquant.testing.zoo._qwen_vl_inputs``)
MOE_EXTRA_BUILDERS: dict[str, Callable[[], nn.Module]] = {"gemma4": _gemma4, "qwen3_vl_moe": _qwen3_vl_moe}


def build_moe(name: str, seed: int = 0) -> nn.Module:
    """The tiny MoE model ``name``, seeded, in eval mode, float32.

    Args:
        name: one of :data:`MOE_BUILDERS` or :data:`MOE_EXTRA_BUILDERS`.
        seed: ``torch.manual_seed`` for the build; the expert and router weights (and biases) are then drawn
            from ``N(0, 0.02^2)`` with a generator seeded ``seed + 1``.

    Returns:
        The causal LM (``...ForCausalLM``; for ``qwen3_vl_moe`` the ``...ForConditionalGeneration`` VLM).

    Raises:
        KeyError: ``name`` is not a known MoE model.
    """
    builders = {**MOE_BUILDERS, **MOE_EXTRA_BUILDERS}
    if name not in builders:
        raise KeyError(f"unknown MoE model {name!r}; available: {', '.join(builders)}")
    torch.manual_seed(seed)
    model = builders[name]()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod_name, p in model.named_parameters():
            if ".experts." in f".{mod_name}" or "router" in mod_name or ".gate." in mod_name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def moe_inputs(batch: int = 2, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token inputs for the MoE models.

    Args:
        batch: number of sequences.
        length: tokens per sequence.
        seed: seed of the generator that draws the token ids.

    Returns:
        ``input_ids`` ``(batch, length)`` drawn from ``[3, 200)`` and an all-ones ``attention_mask``.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (batch, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _zoo_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    ids = torch.randint(3, 200, (2, 8), generator=gen)
    ids[:, 0] = _COMMON["bos_token_id"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


_NOTES = {"mixtral": "3-D experts (E, 2I, H) / (E, H, I), router gate", "qwen2_moe": "shared expert + its gate",
          "qwen3_moe": "per-head-dim q/k norms", "llama4_text": "transposed experts, Llama4Router, shared expert",
          "gpt_oss": "transposed, biased, interleaved gate/up experts; sliding + full attention"}
MOE_ZOO: list[ZooEntry] = [
    ZooEntry(name, name, False, functools.partial(build_moe, name), _zoo_inputs, output_shape=(2, 8, 256),
             notes=_NOTES[name])
    for name in MOE_BUILDERS
]
MOE_ZOO_BY_NAME: dict[str, ZooEntry] = {e.name: e for e in MOE_ZOO}


def __getattr__(name: str):
    """``moe_zoo_params``: a ``pytest.mark.parametrize`` mark over :data:`MOE_ZOO` (lazy pytest import)."""
    if name == "moe_zoo_params":
        import pytest

        return pytest.mark.parametrize("entry", MOE_ZOO, ids=[e.name for e in MOE_ZOO])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
