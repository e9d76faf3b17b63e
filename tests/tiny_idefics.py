"""A tiny IDEFICS (v1) for the tests of its interleaved layout: a gated cross-attention layer runs before every
``cross_layer_interval``-th decoder layer (``model.gated_cross_attn_layers`` beside ``model.layers``)."""
from __future__ import annotations

import torch


def tiny_idefics(layers: int = 4, interval: int = 2, gate: float = 0.7):
    """IDEFICS with ``layers`` text layers, cross-attention every ``interval`` layers and every tanh gate at
    ``gate`` (transformers starts them at 0, which makes the cross-attention layers the identity; a trained model's
    are not); seed 0, float32, eval mode."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    cfg = IdeficsConfig(
        vocab_size=100, additional_vocab_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, cross_layer_interval=interval, qk_layer_norms=False,
        vision_config={"embed_dim": 32, "image_size": 16, "patch_size": 8, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "intermediate_size": 64},
        perceiver_config={"use_resampler": False})
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] in ("alpha_cross_attn", "alpha_dense"):
                p.fill_(gate)
    return model


def idefics_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two sequences of 8 text tokens, each attending to its one 16x16 image."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (2, 8), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(2, 1, 3, 16, 16, generator=gen),
            "image_attention_mask": torch.ones(2, 8, 1, dtype=torch.long), "use_cache": False}
