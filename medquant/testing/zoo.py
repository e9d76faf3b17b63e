"""Tiny random-weight model zoo: test support for medquant and for code built on it.

Every entry builds a Hugging Face model (or a plain ``nn.Module``) from a config, offline, with
random weights drawn under ``torch.manual_seed(0)``: hidden size 128, 2 layers, intermediate 256,
vocabulary 256 and 32x32 images with 8x8 patches.  Builds are deterministic, so two builds of the
same entry give bit-identical outputs.

Usage in a test::

    from medquant.testing.zoo import ZOO, ZOO_BY_NAME, zoo_params

    @zoo_params
    def test_something(entry):
        model = entry.build()
        inputs = entry.inputs(model)
        out = entry.output(model, inputs)

``zoo_params`` / ``vlm_zoo_params`` are ``pytest.mark.parametrize`` marks over the entries (pytest is imported
only when they are used). :func:`text_kwargs` / :func:`siglip_vision_kwargs` are the tiny text / SigLIP vision
config arguments the entries use, for tests that build their own variant.

Image tokens per model (all with 32x32 images, patch 8 -> 16 patches):

=============  ===========================================================================
llava          16 ``image_token_id`` tokens per image (CLS dropped, "default" strategy)
gemma3_vlm     ``mm_tokens_per_image`` = 4 (16 patches average-pooled 2x2), wrapped in boi/eoi
paligemma      16 (``num_image_tokens``), image tokens first, then bos + text
qwen2_vl       4 per image: grid_thw (1, 4, 4) -> 16 patches merged 2x2; ``pixel_values`` are
               flattened patches (num_patches, 3*2*8*8), plus ``image_grid_thw`` and
               ``mm_token_type_ids`` (1 at image tokens) for M-RoPE
qwen2_5_vl     same as qwen2_vl
idefics3       4 per image: 16 patches / scale_factor^2 (2^2); 5-D ``pixel_values``
=============  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

HIDDEN = 128
INTER = 256
LAYERS = 2
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
VOCAB = 256
IMAGE = 32
PATCH = 8
BATCH = 2
TEXT_LEN = 8  # text tokens per sample (besides image / special tokens)

# special token ids inside the tiny vocabulary; ordinary text ids are drawn from [4, TEXT_HIGH)
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
TEXT_HIGH = 200
IMAGE_TOKEN = 250
BOI_TOKEN = 251
EOI_TOKEN = 252
VISION_START = 253
VISION_END = 254
VIDEO_TOKEN = 255


@dataclass
class ZooEntry:
    """One tiny model of the zoo.

    Attributes:
        name: short id used in test ids and ``ZOO_BY_NAME``.
        family: architecture family (``"llama"``, ``"gemma3"``, ``"llava"``...).
        is_vlm: whether the model takes images and text.
        build_fn: returns a fresh model (seeded, eval mode, float32).
        inputs_fn: ``inputs_fn(model, generator)`` returns the keyword inputs for ``model(**inputs)``.
        output_fn: ``output_fn(model, inputs)`` returns the main output tensor.
        output_shape: expected shape of that output.
        notes: free-text notes (image tokens, special inputs).
    """

    name: str
    family: str
    is_vlm: bool
    build_fn: Callable[[], nn.Module]
    inputs_fn: Callable[[nn.Module, torch.Generator], dict[str, Any]]
    output_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor] | None = None
    output_shape: tuple[int, ...] = ()
    notes: str = ""

    def build(self) -> nn.Module:
        """Build the model with seed 0, in eval mode and float32.

        Returns:
            A fresh model (random weights, the same for every call).
        """
        torch.manual_seed(0)
        model = self.build_fn()
        return model.float().eval()

    def inputs(self, model: nn.Module) -> dict[str, Any]:
        """Seeded dummy inputs (batch 2) for ``model(**inputs)``.

        Args:
            model: the model :meth:`build` returned (its config sizes the inputs: image size, image tokens).

        Returns:
            Keyword inputs (``input_ids``, ``attention_mask``, ``pixel_values``... as the architecture needs),
            the same for every call.
        """
        gen = torch.Generator().manual_seed(1234)
        return self.inputs_fn(model, gen)

    def output(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Run the model and return its main output (logits / last hidden state).

        Args:
            model: the model.
            inputs: the keyword inputs of :meth:`inputs`.

        Returns:
            The output tensor (of shape ``output_shape``).
        """
        if self.output_fn is not None:
            return self.output_fn(model, inputs)
        return model(**inputs).logits

    def __repr__(self) -> str:  # short, for pytest ids and messages
        return f"ZooEntry({self.name})"


# ----------------------------------------------------------------------------------------------
# helpers


def _text_ids(gen: torch.Generator, n: int = TEXT_LEN) -> torch.Tensor:
    return torch.randint(4, TEXT_HIGH, (BATCH, n), generator=gen)


def _pixels(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _lm_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    ids = _text_ids(gen, 12)
    ids[:, 0] = BOS_ID
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def text_kwargs(**over: Any) -> dict[str, Any]:
    """Config keyword arguments of the zoo's tiny text decoders (2 layers, hidden 128, FFN 256, 4 heads, vocab 256).

    Args:
        **over: entries that replace or add to the defaults (e.g. ``vocab_size=tok.vocab_size``).

    Returns:
        ``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
        ``num_key_value_heads``, ``max_position_embeddings`` and the pad / bos / eos ids, for a transformers
        config class such as ``LlamaConfig(**text_kwargs())``.
    """
    kw = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "max_position_embeddings": 256,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }
    kw.update(over)
    return kw


def siglip_vision_kwargs(**over: Any) -> dict[str, Any]:
    """Config keyword arguments of the zoo's tiny SigLIP-style vision towers (2 layers, hidden 128, 32 px images, 8 px patches).

    Args:
        **over: entries that replace or add to the defaults.

    Returns:
        ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``, ``image_size``
        and ``patch_size``, for e.g. ``SiglipVisionConfig(**siglip_vision_kwargs())``.
    """
    kw = {
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "image_size": IMAGE,
        "patch_size": PATCH,
    }
    kw.update(over)
    return kw


def _gemma3_text_kwargs() -> dict[str, Any]:
    return text_kwargs(
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )


N_PATCHES = (IMAGE // PATCH) ** 2  # 16


# ----------------------------------------------------------------------------------------------
# decoder-only LMs


def _build_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**text_kwargs()))


def _build_qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**text_kwargs(num_key_value_heads=2)))


def _build_gemma3_text() -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**_gemma3_text_kwargs()))


# ----------------------------------------------------------------------------------------------
# VLMs


def _build_gemma3_vlm() -> nn.Module:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(
        text_config=_gemma3_text_kwargs(),
        vision_config=dict(model_type="siglip_vision_model", **siglip_vision_kwargs(vision_use_head=False)),
        mm_tokens_per_image=4,
        boi_token_index=BOI_TOKEN,
        eoi_token_index=EOI_TOKEN,
        image_token_index=IMAGE_TOKEN,
    )
    model = Gemma3ForConditionalGeneration(cfg)
    # transformers initialises the projector matrix to zeros, which would cut the image path off
    # (outputs independent of pixel_values); give it random weights like a trained checkpoint.
    proj = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        proj.normal_(0.0, proj.shape[0] ** -0.5)
    return model


def _gemma3_vlm_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    n_img = model.config.mm_tokens_per_image
    pre = torch.full((BATCH, 1), BOS_ID)
    img = torch.cat(
        [torch.full((BATCH, 1), BOI_TOKEN), torch.full((BATCH, n_img), IMAGE_TOKEN), torch.full((BATCH, 1), EOI_TOKEN)],
        dim=1,
    )
    ids = torch.cat([pre, img, _text_ids(gen)], dim=1)
    tt = (ids == IMAGE_TOKEN).long()
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": _pixels(gen, BATCH, 3, IMAGE, IMAGE),
        "token_type_ids": tt,
    }


def _build_llava() -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vis = CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
        projection_dim=HIDDEN,
    )
    cfg = LlavaConfig(
        vision_config=vis,
        text_config=LlamaConfig(**text_kwargs()),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=N_PATCHES,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg)


def _llava_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    n_img = N_PATCHES  # (32/8)^2, CLS dropped by the "default" strategy
    ids = torch.cat([torch.full((BATCH, 1), BOS_ID), torch.full((BATCH, n_img), IMAGE_TOKEN), _text_ids(gen)], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": _pixels(gen, BATCH, 3, IMAGE, IMAGE),
    }


def _build_paligemma() -> nn.Module:
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration

    cfg = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", projection_dim=HIDDEN,
                           **siglip_vision_kwargs(vision_use_head=False)),
        text_config=GemmaConfig(**text_kwargs(num_key_value_heads=2, head_dim=HEAD_DIM)),
        image_token_index=IMAGE_TOKEN,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
        vocab_size=VOCAB,
    )
    return PaliGemmaForConditionalGeneration(cfg)


def _paligemma_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    n_img = model.config.text_config.num_image_tokens if hasattr(model.config.text_config, "num_image_tokens") else N_PATCHES
    ids = torch.cat([torch.full((BATCH, n_img), IMAGE_TOKEN), torch.full((BATCH, 1), BOS_ID), _text_ids(gen)], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": _pixels(gen, BATCH, 3, IMAGE, IMAGE),
    }


def _qwen_vl_text_kwargs() -> dict[str, Any]:
    # M-RoPE sections (t, h, w) must sum to head_dim / 2 = 16
    return text_kwargs(num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0})


def _build_qwen2_vl() -> nn.Module:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=_qwen_vl_text_kwargs(),
        vision_config={
            "depth": LAYERS, "embed_dim": HIDDEN, "hidden_size": HIDDEN, "mlp_ratio": 2, "num_heads": HEADS,
            "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen2VLForConditionalGeneration(cfg)


def _build_qwen2_5_vl() -> nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=_qwen_vl_text_kwargs(),
        vision_config={
            "depth": LAYERS, "hidden_size": HIDDEN, "intermediate_size": INTER, "out_hidden_size": HIDDEN, "num_heads": HEADS,
            "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "window_size": 2 * PATCH * 2, "fullatt_block_indexes": [1],
        },
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg)


def _qwen_vl_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    vc = model.config.vision_config
    p, tp, m = vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size
    gh = gw = IMAGE // p
    n_patches = gh * gw  # per image (t = 1)
    n_img = n_patches // (m * m)
    img = torch.cat(
        [torch.full((BATCH, 1), VISION_START), torch.full((BATCH, n_img), IMAGE_TOKEN), torch.full((BATCH, 1), VISION_END)],
        dim=1,
    )
    ids = torch.cat([torch.full((BATCH, 1), BOS_ID), img, _text_ids(gen)], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": _pixels(gen, BATCH * n_patches, 3 * tp * p * p),
        "image_grid_thw": torch.tensor([[1, gh, gw]] * BATCH),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
    }


def _build_idefics3() -> nn.Module:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig

    cfg = Idefics3Config(
        vision_config=dict(model_type="idefics3_vision", **siglip_vision_kwargs()),
        text_config=LlamaConfig(**text_kwargs()),
        image_token_id=IMAGE_TOKEN,
        scale_factor=2,
    )
    return Idefics3ForConditionalGeneration(cfg)


def _idefics3_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    n_img = N_PATCHES // model.config.scale_factor**2
    ids = torch.cat([torch.full((BATCH, 1), BOS_ID), torch.full((BATCH, n_img), IMAGE_TOKEN), _text_ids(gen)], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": _pixels(gen, BATCH, 1, 3, IMAGE, IMAGE),
    }


# ----------------------------------------------------------------------------------------------
# encoders


def _build_siglip_vision() -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(**siglip_vision_kwargs()))


def _image_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    return {"pixel_values": _pixels(gen, BATCH, 3, IMAGE, IMAGE)}


def _last_hidden(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs).last_hidden_state


def _build_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=IMAGE, patch_size=PATCH, num_labels=4,
    )
    return ViTForImageClassification(cfg)


def _build_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=64, pad_token_id=PAD_ID,
    )
    return BertModel(cfg)


def _bert_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    ids = _text_ids(gen, 12)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


# ----------------------------------------------------------------------------------------------

_LM_SHAPE = (BATCH, 12, VOCAB)

ZOO: list[ZooEntry] = [
    ZooEntry("llama", "llama", False, _build_llama, _lm_inputs, output_shape=_LM_SHAPE),
    ZooEntry("qwen2", "qwen2", False, _build_qwen2, _lm_inputs, output_shape=_LM_SHAPE,
             notes="GQA: 4 query heads, 2 key/value heads"),
    ZooEntry("gemma3_text", "gemma3", False, _build_gemma3_text, _lm_inputs, output_shape=_LM_SHAPE,
             notes="GQA 4/2, sliding + full attention layers, tied embeddings"),
    ZooEntry("gemma3_vlm", "gemma3", True, _build_gemma3_vlm, _gemma3_vlm_inputs,
             output_shape=(BATCH, 1 + 1 + 4 + 1 + TEXT_LEN, VOCAB),
             notes="SigLIP tower; mm_tokens_per_image=4 between boi/eoi; token_type_ids mark image tokens"),
    ZooEntry("llava", "llava", True, _build_llava, _llava_inputs,
             output_shape=(BATCH, 1 + N_PATCHES + TEXT_LEN, VOCAB),
             notes="CLIP tower; 16 image tokens (CLS dropped)"),
    ZooEntry("qwen2_vl", "qwen2_vl", True, _build_qwen2_vl, _qwen_vl_inputs,
             output_shape=(BATCH, 1 + 1 + 4 + 1 + TEXT_LEN, VOCAB),
             notes="flattened patches + image_grid_thw + mm_token_type_ids; 4 image tokens"),
    ZooEntry("qwen2_5_vl", "qwen2_vl", True, _build_qwen2_5_vl, _qwen_vl_inputs,
             output_shape=(BATCH, 1 + 1 + 4 + 1 + TEXT_LEN, VOCAB),
             notes="as qwen2_vl; windowed vision attention, block 1 full attention"),
    ZooEntry("paligemma", "paligemma", True, _build_paligemma, _paligemma_inputs,
             output_shape=(BATCH, N_PATCHES + 1 + TEXT_LEN, VOCAB),
             notes="SigLIP tower + Gemma; 16 image tokens first"),
    ZooEntry("idefics3", "idefics3", True, _build_idefics3, _idefics3_inputs,
             output_shape=(BATCH, 1 + 4 + TEXT_LEN, VOCAB),
             notes="5-D pixel_values (B, 1, 3, 32, 32); 16 patches / scale_factor^2 = 4 image tokens"),
    ZooEntry("siglip_vision", "siglip", False, _build_siglip_vision, _image_inputs, _last_hidden,
             output_shape=(BATCH, N_PATCHES, HIDDEN)),
    ZooEntry("vit", "vit", False, _build_vit, _image_inputs, output_shape=(BATCH, 4),
             notes="ViTForImageClassification, 4 labels"),
    ZooEntry("bert", "bert", False, _build_bert, _bert_inputs, _last_hidden, output_shape=(BATCH, 12, HIDDEN)),
]

ZOO_BY_NAME: dict[str, ZooEntry] = {e.name: e for e in ZOO}
VLM_ZOO: list[ZooEntry] = [e for e in ZOO if e.is_vlm]



def __getattr__(name: str):
    """``zoo_params`` / ``vlm_zoo_params``: pytest parametrize marks over ``ZOO`` / ``VLM_ZOO`` (lazy: pytest is
    a test dependency, not a dependency of medquant)."""
    if name in ("zoo_params", "vlm_zoo_params"):
        import pytest

        entries = ZOO if name == "zoo_params" else VLM_ZOO
        return pytest.mark.parametrize("entry", entries, ids=[e.name for e in entries])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TinyCNN(nn.Module):
    """Plain ``nn.Module`` CNN (Conv2d+BN+ReLU x2, global pool, Linear); channels multiples of 32.

    Args:
        num_classes: outputs of the final Linear.
        in_channels: input image channels (3 for RGB, 1 for grayscale).
    """

    def __init__(self, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def tiny_cnn(num_classes: int = 4, in_channels: int = 3, seed: int = 0) -> TinyCNN:
    """A seeded :class:`TinyCNN` in eval mode (input: ``(B, in_channels, H, W)``).

    Args:
        num_classes: outputs of the final Linear.
        in_channels: input image channels.
        seed: ``torch.manual_seed`` before the weights are drawn.

    Returns:
        The model; ``model(x)`` gives ``(B, num_classes)`` logits.
    """
    torch.manual_seed(seed)
    return TinyCNN(num_classes, in_channels).eval()
