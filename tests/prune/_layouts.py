"""The layouts issue 22 names for pruning, from the library zoo (:mod:`medquant.testing.zoo_vlm`): GLM-4V, LFM2-VL,
Idefics2, Florence-2 and Qwen3.5 have a text decoder of hidden 64, 2 layers, 4 heads of 16 / 2 key-value heads,
intermediate 96, vocabulary 256; Chameleon is the zoo's (hidden 128, heads of 32)."""
from __future__ import annotations

import torch
from torch import nn

from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

glm4v = EXTRA_ZOO_BY_NAME["glm4v"].build  # fused gate_up_proj FFNs
lfm2_vl = EXTRA_ZOO_BY_NAME["lfm2_vl"].build  # w1/w3 -> w2 FFNs, an attention and a convolution layer
chameleon = EXTRA_ZOO_BY_NAME["chameleon"].build  # per-head q_norm / k_norm, weights (heads, head_dim)
idefics2 = EXTRA_ZOO_BY_NAME["idefics2"].build  # the connector MLP is sized by text_config.intermediate_size
florence2 = EXTRA_ZOO_BY_NAME["florence2"].build  # BART encoder-decoder language model
qwen3_5 = EXTRA_ZOO_BY_NAME["qwen3_5"].build  # a linear-attention and a gated full-attention layer


def text_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    out = {"input_ids": ids}
    if type(model).__name__.startswith("Florence2"):
        out["decoder_input_ids"] = ids[:, :5]
    return out
