"""Test support: a zoo of tiny, seeded, random-weight models (not needed to use medquant).

:mod:`medquant.testing.zoo` builds small Hugging Face models offline (LLaMA, Qwen2, Gemma 3 text and VLM, LLaVA,
Qwen2-VL, Qwen2.5-VL, PaliGemma, Idefics3, SigLIP vision, ViT, BERT; hidden size 128, 2 layers) plus a plain
``nn.Module`` CNN, each with matching inputs and a way to read its output, so code built on medquant can be tested
across architectures in seconds::

    from medquant.testing import ZOO_BY_NAME

    entry = ZOO_BY_NAME["llama"]
    model = entry.build()                      # deterministic: two builds give bit-identical outputs
    out = entry.output(model, entry.inputs(model))

``medquant.testing.zoo.zoo_params`` / ``vlm_zoo_params`` parametrize a pytest test over the entries (pytest is
needed only for those). Two more zoos use the same entry type: :mod:`medquant.testing.zoo_vlm` (``EXTRA_ZOO``:
the further vision-language layouts - BLIP-2, InstructBLIP, Kosmos-2, DeepSeek-VL, Janus, PaddleOCR-VL, Ovis2,
Gemma 4, Phi-4-multimodal, Chameleon, Mllama, Qwen3-VL, LLaVA-OneVision, LLaVA-Med's own class, GLM-4V, LFM2-VL,
Idefics2, Florence-2, Qwen3.5 - and vision encoders: DINOv2, CLIP, SigLIP 2, Swin, ConvNeXt, BEiT) and
:mod:`medquant.testing.zoo_moe` (``MOE_ZOO``: Mixtral, Qwen2-MoE, Qwen3-MoE, Llama 4 text, GPT-OSS, with 3-D expert
weights). Nothing in the library imports this package.
"""
from .zoo import VLM_ZOO, ZOO, ZOO_BY_NAME, TinyCNN, ZooEntry, siglip_vision_kwargs, text_kwargs, tiny_cnn

__all__ = ["VLM_ZOO", "ZOO", "ZOO_BY_NAME", "TinyCNN", "ZooEntry", "siglip_vision_kwargs", "text_kwargs", "tiny_cnn"]
