"""One call for a static KV cache and a compiled decode step on CPU: :func:`static_decode_`.

Each decode step of a Hugging Face causal LM runs the whole model for one token: at SmolLM2's size much of a
step's time is Python and framework overhead, not arithmetic. Two things attack it:

* a **static KV cache** (``generation_config.cache_implementation = "static"``): the cache is allocated once, at
  its maximum length, so every decode step has the same shapes;
* **torch.compile of the decode step**: with fixed shapes, ``generate`` compiles the model's forward once and
  replays it. transformers does this by itself only on accelerators; on CPU it needs a ``CompileConfig`` flagged
  for all devices, which this helper sets.

Quantized layers on CPU are bound to their kernels (:meth:`~medquant.quant.QuantLinear.bind_cpu_kernels`,
``bind_kernels=True``): the compiled graph calls medquant's native kernel by handle (``medquant::gemv4_bound``: the
graph takes none of the layer's tensors, so it checks none at each step; the weight-only kernel for a decode step,
the blocked matmul for a prompt-sized call, as eager calls choose), or aten's int4 / int8 weight-only matmul,
or the dense path, directly, with the bound weights captured when the step is compiled. Otherwise they stay opaque
``medquant::packed_linear`` nodes whose Python bodies run at every call (which makes the compiled step slower
than eager decoding on a small model). Whether it helps is measured in ``benchmarks/cpu_inference.py``
(``--compile-ab``: paired, through ``generate``); see ``docs/guides/cpu_inference.md``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["static_decode_"]


def static_decode_(model: nn.Module, *, compile: bool = True, backend: Any = "inductor", mode: str | None = "default",
                   fullgraph: bool = False, dynamic: bool | None = False, bind_kernels: bool = True,
                   options: dict[str, Any] | None = None) -> nn.Module:
    """Make ``model.generate`` use a static KV cache and (``compile=True``) a compiled decode step, on any device.

    Sets ``model.generation_config.cache_implementation = "static"`` and, when compiling, a
    ``transformers.CompileConfig(backend, mode, fullgraph, dynamic, options)`` that ``generate`` applies on CPU
    too (the first ``generate`` call compiles; later calls with the same batch size and cache length reuse it).

    Args:
        model: a Hugging Face generative model (``generate`` and ``generation_config``), quantized or not.
        compile: compile the decode step; ``False`` keeps only the static cache.
        backend: the ``torch.compile`` backend name (``"inductor"``; ``"aot_eager"`` traces without code
            generation) or a backend callable.
        mode: the compile mode; ``"default"``, since ``"reduce-overhead"`` (transformers' default) uses CUDA
            graphs, which do nothing on CPU. With ``options`` it must be ``"default"`` or None (torch.compile takes
            one of the two).
        fullgraph: refuse graph breaks.
        dynamic: dynamic shapes (``False``: one graph per batch size and cache length).
        bind_kernels: bind every quantized CPU layer to its kernel (:meth:`~medquant.quant.QuantLinear.
            bind_cpu_kernels`) so the compiled step calls it directly; the step then holds the repacked weights
            as they are now (re-run ``static_decode_`` after changing weights in place).
        options: the backend's options, e.g. ``{"cpp_wrapper": True}``: inductor emits the step's wrapper (the code
            that calls each generated kernel and operator in turn) in C++ instead of Python. Measured on SmolLM2 W4
            g128 (2 threads, 7 paired rounds through ``generate``): 1.06x the default compiled step's tokens/s
            (1.02x on a ~1.1B model), same tokens, for a first call about twice as long (72 s against 33 s); see
            ``benchmarks/cpu_inference.py --compile-ab ... --cpp-wrapper``. ``None``: the backend's defaults.

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: ``model`` has no ``generate`` / ``generation_config``; ``options`` that is not a dict.
        ValueError: ``backend`` is neither a non-empty name nor callable; ``options`` with a ``mode`` other than
            ``"default"``.
    """
    gen = getattr(model, "generation_config", None)
    if gen is None or not callable(getattr(model, "generate", None)):
        raise TypeError(f"static_decode_ needs a Hugging Face generative model (with generate and "
                        f"generation_config), got {type(model).__name__}")
    if not (callable(backend) or (isinstance(backend, str) and backend)):
        raise ValueError(f"backend must be a torch.compile backend name such as 'inductor' (or a backend "
                         f"callable), got {backend!r}")
    if options is not None:
        if not isinstance(options, dict):
            raise TypeError(f"options must be a dict of backend options such as {{'cpp_wrapper': True}}, "
                            f"got {type(options).__name__}")
        if mode not in ("default", None):
            raise ValueError(f"options and mode={mode!r} cannot both be given (torch.compile takes one of them); "
                             "pass mode='default' or None with options")
        mode = None
    gen.cache_implementation = "static"
    if compile and bind_kernels:
        from .modules import QuantLinear

        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.bind_cpu_kernels()
    if not compile:
        gen.compile_config = None
        gen.disable_compile = True
        return model
    from transformers import CompileConfig

    cfg: Any = CompileConfig(fullgraph=fullgraph, dynamic=dynamic, backend=backend, mode=mode, options=options)
    cfg._compile_all_devices = True  # transformers' switch for compiling generate's forward off accelerators
    gen.compile_config = cfg
    gen.disable_compile = False
    return model
