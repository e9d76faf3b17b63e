"""Tiny encoder-decoder models (d_model 64, 2 + 2 layers, 4 heads of 16, FFN 96) for the block, AWQ and pruning
tests: Whisper (pre-norm; its encoder reads log-mel frames and has no language role), BART (post-norm), mBART
(pre-norm) and T5 (pre-norm RMS layer norms inside ``layer.i``). Their LayerNorm gains and biases are random (not
1 / 0), so a scale folded into them is visible and a wrong fold changes the output."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 128
ARCHS = ("whisper", "bart", "mbart", "t5")
PRE_NORM = ("whisper", "mbart", "t5")


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if "LayerNorm" in type(m).__name__ and isinstance(w, nn.Parameter) and w.dim() == 1:
                w.copy_(0.5 + torch.rand(w.shape, generator=gen))
                b = getattr(m, "bias", None)
                if isinstance(b, nn.Parameter):
                    b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def build(arch: str, seed: int = 0) -> nn.Module:
    """A tiny ``...ForConditionalGeneration`` of ``arch`` (one of :data:`ARCHS`) in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common: dict[str, Any] = {
        "vocab_size": VOCAB, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 96, "decoder_ffn_dim": 96, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}
    if arch == "whisper":
        model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            num_mel_bins=8, max_source_positions=8, max_target_positions=32, **common))
    elif arch == "bart":
        model = tf.BartForConditionalGeneration(tf.BartConfig(max_position_embeddings=64, **common))
    elif arch == "mbart":
        model = tf.MBartForConditionalGeneration(tf.MBartConfig(max_position_embeddings=64, **common))
    elif arch == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    else:
        raise ValueError(arch)
    return _randomize_norms(model, seed).eval()


def inputs(arch: str, seed: int = 1, batch: int = 2) -> dict[str, Any]:
    """One seq2seq batch: encoder input (16 log-mel frames of 8 bins for Whisper, 9 tokens otherwise) and 6
    ``decoder_input_ids``."""
    gen = torch.Generator().manual_seed(seed)
    if arch == "whisper":
        enc: dict[str, Any] = {"input_features": torch.randn(batch, 8, 16, generator=gen)}
    else:
        enc = {"input_ids": torch.randint(3, VOCAB, (batch, 9), generator=gen)}
    return {**enc, "decoder_input_ids": torch.randint(3, VOCAB, (batch, 6), generator=gen)}


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The decoder's logits of a seq2seq forward."""
    return model(**batch, use_cache=False).logits
