"""A causal LM's decode compiled ahead of time for CPU: :func:`compile_decoder` and :class:`AOTDecoder`.

:func:`~medquant.quant.decode.static_decode_` compiles ``generate``'s decode step with ``torch.compile``: each
token still pays for Dynamo's guards, the generated wrapper's Python and ``generate``'s own per-token work, which
on a small model is as much time as the arithmetic. This module takes the other route PyTorch offers: the model's
forward is exported once (``torch.export``) and compiled by AOTInductor into a shared library
(``torch._inductor.aoti_compile_and_package``) called from a short Python loop.

Programs of two kinds are compiled, all over the same static KV cache:

* a **prompt program** for each prompt chunk length ``C`` (``chunk``: one length, or several): it takes ``C``
  tokens per call, so its matmuls run the blocked (prefill) kernels, and returns the logits of one position only
  (the last real token);
* a **step program** of one token, called once per generated token.

Both are compiled for several cache lengths (``cache_lengths``: by default 256, 512, 1024, ... below
``max_len``, and ``max_len``): a call writing up to position ``p`` runs the shortest length above ``p``, and its
attention reads that many positions, not ``max_len`` (a static cache is otherwise read whole at every call).

The cache is not inside the programs: it is a list of ``(batch, kv_heads, max_len, head_dim)`` key and value
tensors per layer, allocated once by the decoder and passed to both programs, which write the new positions in
place. A position ``p`` attends only to positions ``<= p``, so a new sequence needs no clearing: it overwrites the
cache from position 0 (:meth:`AOTDecoder.reset` only moves the position).

Feeding ``n`` tokens at position ``pos`` (:meth:`AOTDecoder.feed`) with chunk lengths ``C_1 < ... < C_m``: full
chunks, longest first (``n // C_m`` of ``C_m``, then of ``C_(m-1)`` for what remains, ...), then the remainder
``r < C_1``: as one chunk of ``C_1`` padded with token 0 when ``r > max(C_1 // 8, 1)`` and the padded chunk fits in the
cache (``pos + C_1 <= max_len``; the padding's cache entries lie beyond the last real position and are overwritten
before any query can see them), else ``r`` one-token steps. A single token always takes the step program. Longer
chunks prefill long prompts faster and pad short ones to their length (one length cannot serve both); chunks of
64 and 256 give a 512-token prompt two calls of 256 and a 40-token one a padded call of 64.

Quantized layers are bound to their CPU kernels first (:meth:`~medquant.quant.QuantLinear.bind_cpu_kernels`): the
programs call ``medquant::gemv4_bound_by_native`` (the bound matmul in C++, :mod:`medquant.kernels.native_op`;
``medquant::gemv4_bound_by``'s Python kernel where it cannot be built) with each layer's handle read from a
one-element int64 tensor, so they hold no quantized weights; those tensors and the model's other tensors
(embeddings, norms, float layers) are handed to the programs as *user-managed constants*: the programs read the
model's own tensors, nothing is copied (the handle tensors are ``(1, 1)``: Inductor writes a one-dimensional
constant of up to 8 values into the code as a literal). Consequences, stated plainly:

* **saved and loaded.** :meth:`AOTDecoder.save` writes the packages and a manifest; :func:`load_decoder` loads
  them for a model in this or another process without compiling, binding its layers (new handles, handed to the
  programs in their tensors) and handing its tensors over. What the generated code assumes and does not check is
  checked at load and refused when it differs: the packages' SHA-256 (each a plain file name inside the folder:
  a path, or a symbolic link leading out of the folder, is refused), torch's version and build, medquant's
  version, the vector instruction set of the generated code, the model's class and configuration (the fields of
  ``model.config`` that change what the programs compute: sizes, norm epsilon, rotary settings, activation, ...;
  not token ids, labels or output switches), every bound layer's name and
  kernel choices, every tensor's dtype, shape and strides, the sizes each program was compiled for (batch,
  ``max_len``, tokens per call, cache length and its inputs' dtypes, shapes and strides, recorded in its package)
  against the manifest's, and (unless ``check_weights=False``) the SHA-256 of the model's parameters and
  buffers. Quantized layers without a native kernel on this CPU, on torch's int4 / int8 weight-only kernels, are
  called through the custom op ``medquant::packed_linear`` on their own tensors (run eagerly at each call:
  correct, slower), so those programs too read only the model's tensors and can be saved; a decoder
  whose programs hold tensors that are not the model's (captured by a traced forward) cannot be saved;
* the decoder computes with the weights as they were when it was compiled (bound matmuls hold the repacked
  weights; the constants are the tensors the model held then): compile again after changing weights;
* one batch size and one maximum length per decoder; prompts of different lengths are padded on the left with an
  ``attention_mask`` (as for ``generate``: both programs take the cache's mask and the tokens' rotary positions as
  inputs, a padding position is never attended to and does not count in the positions after it); models whose static cache is not full attention in every layer (sliding windows, shared KV) are
  refused: :func:`~medquant.quant.decode.static_decode_` serves them;
* the model's output head must not give more logits per token than its input embedding table has rows (a
  generated id would be fed back and read out of the table's bounds: the programs do not check ids); such a model
  is refused where a decoder is built or loaded, a narrower head is accepted;
* compiling takes time: about 30 s per program for SmolLM2-135M on two cores, one prompt program per chunk
  length and one step program per cache length (``max_len=2048``, one chunk length: 8 programs, ~270 s; g++
  must be installed, as for the native kernels).

Measured in ``benchmarks/aoti_decode.py`` (paired with ``static_decode_`` and llama.cpp; see
``docs/guides/cpu_inference.md``).
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import operator
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
from torch import nn

from medquant.digest import sha256_file

__all__ = ["AOTDecoder", "compile_decoder", "load_decoder", "read_decoder_manifest"]


class _CacheStep(nn.Module):
    """The model's forward over a static KV cache given as inputs: ``(input_ids (B, n), start (1,), keep (1,),
    mask (B, cache length), positions (B, n), keys [L], values [L]) -> logits (B, 1, V)`` of position ``keep`` of
    the ``n`` tokens written at cache positions ``start .. start + n - 1`` (the cache tensors are written in
    place), attending to the cache positions whose ``mask`` is 1, with rotary positions ``positions``."""

    def __init__(self, model: nn.Module, cache: Any, handles: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.handles = handles  # the bound layers' handles, tensors the programs read (constants handed at load)
        self._cache = cache

    def forward(self, input_ids: torch.Tensor, start: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor,
                positions: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        for layer, k, v in zip(self._cache.layers, keys, values):
            layer.keys, layer.values = k, v
            layer.cumulative_length = start.reshape(()).clone()  # the layer advances it in place
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=self._cache,
                         use_cache=True, logits_to_keep=keep)
        return out.logits


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"compile_decoder needs a Hugging Face causal LM (with .config), got {type(model).__name__}")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _static_cache(model: nn.Module, batch_size: int, max_len: int) -> Any:
    """A transformers ``StaticCache`` of ``max_len`` positions, its tensors allocated by one eager forward of
    ``batch_size`` dummy tokens (so their shapes and dtype are the model's own, whatever its head layout)."""
    from transformers.cache_utils import StaticCache, StaticLayer

    cache = StaticCache(max_cache_len=max_len, config=_text_config(model))
    odd = [(i, type(layer).__name__) for i, layer in enumerate(cache.layers) if type(layer) is not StaticLayer]
    if odd:
        raise ValueError(f"compile_decoder supports models whose static cache is full attention in every layer; "
                         f"layer {odd[0][0]} is a {odd[0][1]} ({len(odd)} such layers): use static_decode_ for this "
                         "model")
    with torch.no_grad():
        model(input_ids=torch.zeros(batch_size, 1, dtype=torch.long), attention_mask=None, cache=cache,
              use_cache=True, logits_to_keep=1)
    if not all(getattr(layer, "is_initialized", False) for layer in cache.layers):
        raise ValueError("compile_decoder: the model's forward did not write every layer's cache")
    return cache


class _Handles(nn.Module):
    """The handles of the bound layers, one one-element int64 buffer each (``h0``, ``h1``, ...; not saved in a
    state dict): the programs read a layer's handle from its buffer, handed to them when they are loaded, so a
    program is not tied to the handles of the process that compiled it."""

    def __init__(self, handles: Sequence[int]) -> None:
        super().__init__()
        for j, h in enumerate(handles):
            # (1, 1), not (1,): Inductor writes a constant of at most 8 values in one dimension into the generated
            # code as a literal, and a handle must be read from the tensor handed at load
            self.register_buffer(f"h{j}", torch.tensor([[h]], dtype=torch.int64), persistent=False)


def _bind(model: nn.Module) -> tuple[dict[str, Any], int, int]:
    """Bind every quantized CPU layer to its kernel: ``({name: traced lane} of the layers bound to a native kernel
    called by handle, in module order; layers bound; quantized layers)``."""
    from .modules import _BOUND_LANE, QuantLinear

    quantized = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    lanes, bound = {}, 0
    for name, m in quantized:
        if m.bind_cpu_kernels():
            bound += 1
            lane = m.__dict__.get(_BOUND_LANE)
            if lane is not None and hasattr(lane, "by_tensor"):
                lanes[name] = lane
    return lanes, bound, len(quantized)


#: the attention the step programs are exported with (registered with transformers on first use)
STEP_ATTENTION = "medquant_step"


def _grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of the step programs, as plain matrix products over the cache's own key/value heads.

    With ``H`` query heads and ``KVH`` cache heads (grouped-query attention, ``G = H / KVH``; query head ``h`` reads
    cache head ``h // G``), the queries of a group are stacked and multiplied by their cache head once::

        w = (q_g @ k^T) * scaling + mask,  p = softmax(w) (float32),  out_g = p @ v

    for ``q_g`` of shape ``(B, KVH, G * n, D)``: the same product as transformers' eager attention without
    repeating the keys and values ``G`` times, and at one query row cheaper than the fused attention kernel, whose
    fixed cost per call dominates there (measured on SmolLM2 W4: 1.20x the decoder's decode rate). ``mask`` is the additive mask
    ``(B, 1, n, L)`` (``0`` or the dtype's lowest value).
    """
    b, h, n, d = query.shape
    kvh, length = key.shape[1], key.shape[2]
    g = h // kvh
    w = torch.matmul(query.reshape(b, kvh, g * n, d), key.transpose(2, 3)) * scaling
    w = w.view(b, kvh, g, n, length)
    if attention_mask is not None:
        w = w + attention_mask[:, :, None, :, :length]
    p = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(p.view(b, kvh, g * n, length), value)
    return out.view(b, h, n, d).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _step_attention(model: nn.Module, enabled: bool):
    """While exporting a step program: the model's ``"sdpa"`` attention replaced by :func:`_grouped_attention`
    (other settings, e.g. a user's ``"eager"``, are kept)."""
    config = _text_config(model)
    before = getattr(config, "_attn_implementation", None)
    if not enabled or before != "sdpa":
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(STEP_ATTENTION, _grouped_attention)
    AttentionMaskInterface.register(STEP_ATTENTION, eager_mask)
    configs = {id(c): c for c in (getattr(model, "config", None), config) if c is not None}
    try:
        for c in configs.values():
            c._attn_implementation = STEP_ATTENTION
        yield
    finally:
        for c in configs.values():
            c._attn_implementation = before


@contextlib.contextmanager
def _lanes_by_tensor(model: nn.Module, lanes: dict[str, Any], handles: _Handles):
    """While tracing: each bound layer's lane reads its handle from its buffer of ``handles`` (``h<j>``, ``j`` its
    place in ``lanes``) instead of holding it as an integer; the integer lanes come back afterwards."""
    from .modules import _BOUND_LANE

    modules = [model.get_submodule(name) for name in lanes]
    try:
        for j, (m, lane) in enumerate(zip(modules, lanes.values())):
            # read through the module when traced: the exporter then sees the buffer, not a captured tensor
            m.__dict__[_BOUND_LANE] = lane.by_tensor(lambda j=j: getattr(handles, f"h{j}"))
        yield
    finally:
        for m, lane in zip(modules, lanes.values()):
            m.__dict__[_BOUND_LANE] = lane


@contextlib.contextmanager
def _laneless_unbound(model: nn.Module, lanes: dict[str, Any]):
    """While tracing: the quantized layers bound without a native lane (not in ``lanes``: no native kernel on this
    CPU) to torch's int4 / int8 weight-only kernels unbound, then bound again.

    Such a layer is then traced as an unbound one is, through the custom op ``medquant::packed_linear`` on its own
    tensors (the op runs eagerly at each call, on the layer's cached repacked weights). Its bound matmul would
    capture the repacked weights and scales it made, tensors that are not the model's: the exporter lifts them as
    constants, which AOTInductor renames (``_tensor_constant<i>``), so they could not be handed to the programs.
    A layer bound to the dense path stays bound (traced, it dequantizes the layer's own tensors)."""
    from ..kernels.cpu import cpu_plan
    from .modules import _BOUND, QuantLinear

    laneless = [(m, m.__dict__[_BOUND]) for name, m in model.named_modules()
                if isinstance(m, QuantLinear) and name not in lanes and _BOUND in m.__dict__
                and cpu_plan(m.packed_weight(m.bit_groups[0])).kind in ("int4", "int8")]
    try:
        for m, _ in laneless:
            del m.__dict__[_BOUND]
        yield
    finally:
        for m, bound in laneless:
            m.__dict__[_BOUND] = bound


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name, tied ones under each of their names (as the exporter names
    a program's constants)."""
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def _tensor_spec(t: torch.Tensor) -> list:
    """``[dtype, shape, strides]``: what a program assumes of a constant (it reads it with these strides, unchecked)."""
    return [str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride())]


def _fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``model`` (name, dtype, shape and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


#: configuration fields that do not change what the programs compute (special token ids, labels, output and cache
#: switches, the model's path, transformers' version, the dtype recorded by name: the tensors' own dtypes are checked;
#: the ``quantization_config`` a checkpoint loaded by ``medquant.load`` carries: the layers' kernel choices and tensors
#: are checked one by one), left out of the manifest's record of the configuration; so are private fields
#: (``_attn_implementation``, ...)
_CONFIG_IGNORED = frozenset({
    "quantization_config", "transformers_version", "architectures", "dtype", "torch_dtype", "id2label", "label2id",
    "problem_type", "finetuning_task", "task_specific_params", "tokenizer_class", "prefix", "initializer_range",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id"})


def _config_record(model: nn.Module) -> dict[str, Any]:
    """The model's configuration as the programs were exported with it: its ``to_dict()`` less
    :data:`_CONFIG_IGNORED` and private fields (at every level: a vision-language model's ``text_config`` too),
    as JSON values."""

    def keep(d: dict) -> dict:
        return {k: keep(v) if isinstance(v, dict) else v for k, v in d.items()
                if not str(k).startswith("_") and k not in _CONFIG_IGNORED}

    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    record = keep(to_dict()) if callable(to_dict) else {}
    return json.loads(json.dumps(record, default=str))


def _config_difference(saved: Any, here: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first field (dotted path, in name order) where two :func:`_config_record` values differ, with both values
    (``"(absent)"`` for a field one of them lacks), or None."""
    if isinstance(saved, dict) and isinstance(here, dict):
        for key in sorted({*saved, *here}):
            found = _config_difference(saved.get(key, "(absent)"), here.get(key, "(absent)"),
                                       f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    return None if saved == here else (path, saved, here)


def _check_head(model: nn.Module, what: str) -> int:
    """The rows of the model's input embedding table (the token ids the programs can look up; its config's
    ``vocab_size`` where the table does not say), after refusing an output head wider than the table: the head's
    ``out_features`` (logits per token) ``V_out > V_in`` rows would let ``generate`` pick an id in
    ``V_in .. V_out - 1`` and feed it back, which the programs would read out of the table's bounds (run eagerly:
    an ``IndexError`` mid-generation). The head's width is its ``out_features`` (``nn.Linear``, medquant's
    ``QuantLinear``, bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``: every quantized head medquant makes has it);
    a head without it (a custom module wrapping its layer) is measured by :func:`_head_width`. A narrower head, or
    one whose width can be neither read nor measured, is accepted."""
    table: Any = getattr(model, "get_input_embeddings", lambda: None)()
    rows = getattr(table, "num_embeddings", None)  # nn.Embedding and QuantEmbedding
    rows = int(rows if rows is not None else _text_config(model).vocab_size)
    head: Any = getattr(model, "get_output_embeddings", lambda: None)()
    width = _head_width(model, head, table)
    if width is not None and width > rows:
        raise ValueError(f"{what}: the model's output head ({type(head).__name__}) gives {width} logits per token, "
                         f"more than the {rows} rows of its input embedding table ({type(table).__name__}): a "
                         f"generated token id in {rows}..{width - 1} could not be looked up at the next step (the "
                         f"programs index the table without checking); give the head and the table the same size "
                         f"(model.resize_token_embeddings({width}) resizes both)")
    return rows


def _head_width(model: nn.Module, head: Any, table: Any) -> int | None:
    """Logits per token of the output ``head``: its ``out_features`` where it has an integer one; else, for a
    module, the last dimension of ``head(zeros(1, 1, d))`` (no gradient; in the dtype and on the device of the
    head's first floating tensor, else the model's), ``d`` the input table's ``embedding_dim`` and then the text
    config's ``hidden_size`` (the first one the head takes); None when neither gives it (no head, a head on the
    meta device, a forward that needs other arguments)."""
    width = _as_int(getattr(head, "out_features", None))
    if width is not None or not isinstance(head, nn.Module):
        return width
    tensors = [t for t in (*head.parameters(), *head.buffers(), *model.parameters()) if t.is_floating_point()]
    like = tensors[0] if tensors else torch.empty(0)
    if like.device.type == "meta":
        return None
    dims = [getattr(table, "embedding_dim", None), getattr(_text_config(model), "hidden_size", None)]
    for d in dict.fromkeys(x for x in map(_as_int, dims) if x is not None and x >= 1):
        out = None
        with contextlib.suppress(Exception), torch.no_grad():  # a head that does not take this input: next size
            out = head(torch.zeros(1, 1, d, dtype=like.dtype, device=like.device))
        if isinstance(out, torch.Tensor) and out.dim() >= 1:
            return int(out.shape[-1])
    return None


def _describe(x: Any) -> str:
    """What an argument is, for an error message: a tensor's dtype, shape and device, else its type."""
    return f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_ids(ids: Any, batch_size: int, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2 or \
            ids.shape[0] != batch_size or ids.shape[1] < 1 or ids.device.type != "cpu":
        raise ValueError(f"{what} must be a CPU integer tensor (int64 or int32; batch {batch_size}, tokens >= 1) as "
                         f"the decoder was compiled for batch_size={batch_size}, got {_describe(ids)}")
    return ids.long()


def _program_inputs(batch_size: int, n: int, length: int, mask: torch.Tensor, keys: list[torch.Tensor],
                    values: list[torch.Tensor]) -> tuple:
    """Inputs of the program of ``n`` tokens per call and cache length ``length``, shaped and strided as the decoder
    passes them (:meth:`AOTDecoder._call`; ``mask``, ``keys``, ``values``: the whole ``(batch, max_len)`` mask and
    cache): what the program is exported for, and what :func:`load_decoder` checks it was exported for."""
    return (torch.zeros(batch_size, n, dtype=torch.long), torch.tensor([0]), torch.tensor([n - 1]), mask[:, :length],
            torch.zeros(batch_size, n, dtype=torch.long), [k[:, :, :length] for k in keys],
            [v[:, :, :length] for v in values])


#: the program metadata (AOTInductor's ``aot_inductor.metadata``, in the package) recording the sizes it was compiled
#: for and the ``[dtype, shape, strides]`` of each of its inputs: the compiled code assumes them and checks none
_SIZES_KEY, _INPUTS_KEY = "medquant.sizes", "medquant.inputs"


def _input_specs(inputs: tuple) -> list[list]:
    """``[dtype, shape, strides]`` of each tensor of :func:`_program_inputs`, flattened (the keys, then the values)."""
    *head, keys, values = inputs
    return [_tensor_spec(t) for t in (*head, *keys, *values)]


def _input_names(layers: int) -> list[str]:
    return ["input_ids", "start", "keep", "mask", "positions", *(f"keys[{i}]" for i in range(layers)),
            *(f"values[{i}]" for i in range(layers))]


def _program_metadata(batch_size: int, max_len: int, n: int, length: int, inputs: tuple) -> dict[str, str]:
    sizes = {"batch_size": batch_size, "max_len": max_len, "tokens": n, "length": length}
    return {_SIZES_KEY: json.dumps(sizes), _INPUTS_KEY: json.dumps(_input_specs(inputs))}


def _check_program_sizes(program: Any, file: Path, expected: dict[str, int], inputs: tuple) -> None:
    """Refuse a loaded program whose recorded sizes or input specs differ from what the manifest makes the decoder
    pass it (``expected``: batch_size, max_len, tokens, length; ``inputs``: :func:`_program_inputs` as loaded)."""
    metadata = program.get_metadata()
    try:
        sizes, specs = json.loads(metadata[_SIZES_KEY]), json.loads(metadata[_INPUTS_KEY])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{file} records no sizes (compiled by an earlier medquant): compile the decoder "
                         "again") from None
    for field, want in expected.items():
        if sizes.get(field) != want:
            raise ValueError(f"{file.name} was compiled for {field}={sizes.get(field)!r}, but {MANIFEST} records "
                             f"{field}={want!r} (edited, or not the manifest of these programs): the programs do not "
                             "check the shapes they are given; save the decoder again")
    given = _input_specs(inputs)
    names = _input_names((len(given) - 5) // 2)
    if len(specs) != len(given):
        raise ValueError(f"{file.name} was compiled for {len(specs)} inputs, {MANIFEST}'s cache makes {len(given)} "
                         f"(layers differ): save the decoder again")
    for name, saved, here in zip(names, specs, given):
        if saved != here:
            raise ValueError(f"{file.name} was compiled for its input {name} as [dtype, shape, strides] {saved}, "
                             f"{MANIFEST} makes it {here} (edited, or not the manifest of these programs): save the "
                             "decoder again")


class AOTDecoder:
    """A causal LM's prompt and decode steps compiled ahead of time, over a static KV cache it owns.

    Built by :func:`compile_decoder` (module docstring: what runs, what it holds, its limits).

    Args:
        model: the model the programs were compiled from (they read its tensors: the decoder keeps it alive).
        keys: the cache's key tensor of each layer, ``(batch_size, kv heads, max_len, head dim)``.
        values: the same for values.
        programs: the loaded programs by ``(tokens per call, cache length)``: ``(C, L)`` for each chunk length
            ``C`` (the prompt programs) and ``(1, L)`` (the step program) for each of :attr:`cache_lengths` (no
            prompt program of ``C`` for a length below ``C``).
        keep_alive: the constant maps handed to the programs (held while they run).
        batch_size: the batch the programs were compiled for.
        max_len: cache positions: prompt plus generated tokens of one sequence, at most.
        chunks: tokens per call of the prompt programs, ascending (empty: the step program only).
        bound_layers: quantized layers bound to a native kernel, called by handle (the others read their own
            tensors: through the custom op ``medquant::packed_linear``, or dequantized in the programs).
        export_s: seconds spent exporting the programs (0 for a loaded decoder).
        compile_s: seconds spent compiling and loading them (loading only, for a loaded decoder).
        folder: the temporary folder of the compiled packages (removed by :meth:`close`), None for a loaded decoder.
        files: the package file of each program.
        spec: what :meth:`save` records of the programs: ``lanes`` (each bound layer's kernel choices), ``ops``
            (the operators they call), ``constants`` (dtype, shape, strides of each tensor they read),
            ``foreign`` (constants that are not the model's tensors: a decoder with any cannot be saved) and
            optionally ``config`` (the model's configuration as the programs were exported with; absent: the
            model's as it is when saved).

    Attributes:
        position: the next cache position to write (0 after :meth:`reset`).
        last_timing: of the last :meth:`generate`: ``{"prefill_s": seconds of the prompt, "decode_s": seconds of
            the rest, "steps": one-token steps run}`` (None before any).
        vocab_size: rows of the input embedding table (token ids must lie below it; a model whose output head
            gives more logits than this is refused: ``ValueError`` naming both sizes).
        cache_lengths: the cache lengths the programs were compiled for (ascending, the last ``max_len``): a call
            writing up to position ``p`` runs the shortest one above ``p`` and attends over that many positions.
        chunks: the prompt programs' chunk lengths, ascending (empty: the step program only).
    """

    def __init__(self, model: nn.Module, keys: list[torch.Tensor], values: list[torch.Tensor],
                 programs: dict[tuple[int, int], Any], keep_alive: list[Any],
                 batch_size: int, max_len: int, chunks: Sequence[int], bound_layers: int, export_s: float,
                 compile_s: float, folder: tempfile.TemporaryDirectory | None, *,
                 files: dict[tuple[int, int], Path], spec: dict[str, Any]) -> None:
        self.model = model  # the programs read its tensors (user-managed constants): keep it alive
        self._keys, self._values = keys, values  # the cache: (batch, kv heads, max_len, head dim) per layer
        self._programs = programs  # (tokens per call, cache length) -> program
        self._lengths: dict[int, list[int]] = {}  # tokens per call -> its programs' cache lengths, ascending
        for n, length in sorted(programs):
            self._lengths.setdefault(n, []).append(length)
        self.cache_lengths = self._lengths[1]
        # the first ``length`` positions of every layer's cache: what the programs of that length read (every
        # program's length: a prompt program's may have no step program, in a folder the loader accepts)
        self._views = {length: ([k[:, :, :length] for k in keys], [v[:, :, :length] for v in values])
                       for length in sorted({length for _, length in programs})}
        self._keep_alive = keep_alive
        self._folder = folder
        self._files, self._spec = files, spec
        self.batch_size, self.max_len, self.chunks = batch_size, max_len, tuple(sorted(chunks))
        self.bound_layers, self.export_s, self.compile_s = bound_layers, export_s, compile_s
        self.vocab_size = _check_head(model, "AOTDecoder")
        self.position = 0
        self.last_timing: dict[str, float] | None = None
        # which cache positions each row attends to (0: padding), and how many real tokens each row has so far
        # (the rotary position of its next token)
        self._mask = torch.ones(batch_size, max_len, dtype=torch.long)
        self._seen = torch.zeros(batch_size, dtype=torch.long)

    @property
    def chunk(self) -> int:
        """The longest prompt chunk (1 when the decoder has the step program only)."""
        return self.chunks[-1] if self.chunks else 1

    def _check_open(self) -> None:
        if not self._programs:
            raise ValueError("this decoder was closed (close() dropped its programs): compile or load it again")

    def _ids(self, input_ids: Any) -> torch.Tensor:
        # the programs index the embedding table without checking: an id outside it must not reach them
        ids = _check_ids(input_ids, self.batch_size, "input_ids")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"input_ids must be token ids in 0..{self.vocab_size - 1} (the embedding table's rows), "
                             f"got values in {lo}..{hi}")
        return ids

    def reset(self) -> None:
        """Start a new sequence: the next token is written at position 0.

        Old entries need no clearing: a position attends only to positions up to itself, all rewritten (cache and
        mask) before it.
        """
        self.position = 0
        self._seen.zero_()

    def _call(self, ids: torch.Tensor, keep: int, real: torch.Tensor | None = None) -> torch.Tensor:
        """Run the program of ``n`` tokens on ``ids (B, n)`` at :attr:`position`; ``real (B, n)``: 1 for a token, 0
        for padding (None: all tokens). Position ``pos + j`` of a row gets that row's mask value and the rotary
        position ``seen + (real tokens before it)`` (a padding token: 1, as ``generate`` gives it); the logits of
        token ``keep``."""
        n, pos = ids.shape[1], self.position
        lengths = self._lengths[n]  # the shortest length holding every position this call writes
        i = bisect.bisect_left(lengths, pos + n)
        if i == len(lengths):
            raise ValueError(f"{n} tokens at position {pos} need a program of cache length >= {pos + n}; this "
                             f"decoder's programs of {n} tokens per call cover {lengths[-1]} positions "
                             f"(max_len={self.max_len}): reset() for a new sequence")
        length = lengths[i]
        keys, values = self._views[length]
        if real is None:
            self._mask[:, pos:pos + n] = 1
            positions = self._seen[:, None] + torch.arange(n)
            self._seen += n
        else:
            self._mask[:, pos:pos + n] = real
            positions = (self._seen[:, None] + real.cumsum(-1) - 1).masked_fill(real == 0, 1)
            self._seen += real.sum(-1)
        # contiguous: a compiled program reads its inputs with the strides it was compiled for (it does not
        # check them), and a slice of a (batch > 1, n) prompt has another row stride
        out = self._programs[n, length](ids.contiguous(), torch.tensor([pos]), torch.tensor([keep]),
                                        self._mask[:, :length], positions.contiguous(), keys, values)
        return out[:, -1]

    def _real(self, attention_mask: Any, ids: torch.Tensor) -> torch.Tensor | None:
        """``attention_mask`` checked: None, or a ``(batch, n)`` int64 tensor of 0 / 1 whose last column is 1."""
        if attention_mask is None:
            return None
        m = attention_mask
        if not isinstance(m, torch.Tensor) or m.shape != ids.shape or m.device.type != "cpu" or \
                m.dtype.is_floating_point or m.is_complex():
            raise ValueError(f"attention_mask must be a CPU integer or bool tensor shaped like input_ids "
                             f"{tuple(ids.shape)}, got {_describe(m)}")
        m = m.long()
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
        if not bool(m[:, -1].all()):
            raise ValueError("attention_mask: every row's last token must be real (pad on the left, as for "
                             "generate): the logits returned are the last position's")
        return None if bool(m.all()) else m

    def feed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``input_ids (batch, n)`` at the current position; ``logits (batch, vocab)`` of the last one.

        Full chunks, longest first, take the prompt programs; the remainder ``r`` (shorter than the shortest chunk
        ``C_1``) takes one chunk of ``C_1`` padded when ``r > max(C_1 // 8, 1)`` and it fits in the cache, else ``r``
        one-token steps (module docstring). With
        ``attention_mask``, rows padded on the left: a padding position is never attended to and does not count
        in the rotary positions of the tokens after it (as ``generate`` treats a left-padded batch).

        Args:
            input_ids: ``(batch_size, n)`` CPU integer tokens, ``n >= 1``.
            attention_mask: ``(batch_size, n)``, 1 for a token, 0 for padding, every row's last entry 1; None: all
                tokens.

        Returns:
            The logits ``(batch_size, vocab)`` after the last of them, in the model's dtype.

        Raises:
            ValueError: ``input_ids`` not a CPU int64 / int32 ``(batch_size, n >= 1)`` tensor of ids below
                :attr:`vocab_size`, more tokens than the cache has positions left, a bad ``attention_mask``, or the
                decoder was closed.
        """
        self._check_open()
        ids = self._ids(input_ids)
        real = self._real(attention_mask, ids)
        n = ids.shape[1]
        if self.position + n > self.max_len:
            raise ValueError(f"{n} tokens at position {self.position} exceed the decoder's max_len={self.max_len}: "
                             "compile it with a larger max_len, or reset() for a new sequence")
        done, logits = 0, None
        with torch.no_grad():
            for c in reversed(self.chunks):
                while n - done >= c:
                    logits = self._call(ids[:, done:done + c], c - 1,
                                        None if real is None else real[:, done:done + c])
                    self.position += c
                    done += c
            r, c = n - done, self.chunks[0] if self.chunks else 1
            if c > 1 and r > max(c // 8, 1) and self.position + c <= self.max_len:
                padded = torch.zeros(self.batch_size, c, dtype=torch.long)
                padded[:, :r] = ids[:, done:]
                tail = torch.zeros(self.batch_size, c, dtype=torch.long)  # the chunk's padding: not attended to
                tail[:, :r] = 1 if real is None else real[:, done:]
                logits = self._call(padded, r - 1, tail)
                self.position += r
            else:
                for j in range(done, n):
                    logits = self._call(ids[:, j:j + 1], 0, None if real is None else real[:, j:j + 1])
                    self.position += 1
        assert logits is not None
        return logits

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`reset`, then :meth:`feed` ``input_ids``.

        Args:
            input_ids: ``(batch_size, P)`` CPU integer prompt tokens.
            attention_mask: as for :meth:`feed` (prompts of different lengths, padded on the left).

        Returns:
            The logits ``(batch_size, vocab)`` after the prompt.

        Raises:
            ValueError: as :meth:`feed`.
        """
        self.reset()
        return self.feed(input_ids, attention_mask)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids`` followed by up to ``max_new_tokens`` generated tokens, as ``generate`` returns them.

        Each token is picked from the last logits ``l`` (in float32) of its row, processed in ``generate``'s order:

        * ``repetition_penalty`` ``r`` (when not 1): for every token ``t`` already in the row (prompt
          included, its left padding not: as ``generate``), ``l[t] = l[t] * r`` where ``l[t] < 0``, else
          ``l[t] / r``;
        * greedy: the argmax. With ``do_sample``: ``l / temperature``; then only the ``top_k`` largest kept (the
          others ``-inf``; ``top_k=0``: all kept); then ``top_p`` (when ``< 1``): with the tokens sorted by
          ascending ``l``, those whose cumulative softmax probability is ``<= 1 - top_p`` are dropped (the most
          likely token always stays); then one draw from ``softmax(l)``.

        Each sampling setting left None is settled as transformers' ``generate`` settles it: the model's
        ``generation_config``'s value where it sets one, else ``generate``'s default (``do_sample=False``,
        ``temperature=1.0``, ``top_k=50``, ``top_p=1.0``, ``repetition_penalty=1.0``). A Qwen-style config
        (``do_sample: true``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``) thus samples when no
        argument is given, as ``model.generate(input_ids)`` does; ``do_sample=False`` given is greedy whatever the
        config says (its ``temperature`` / ``top_k`` / ``top_p`` then unused, as ``generate`` ignores them; its
        ``repetition_penalty`` still applies, as in ``generate``); a ``temperature``, ``top_k`` or ``top_p`` given
        while greedy is not used either, and a ``UserWarning`` names it. A config setting that would change
        ``generate``'s tokens and that this method does not implement is refused (``ValueError`` naming it), not
        ignored: ``num_beams > 1``, ``num_return_sequences > 1``, ``no_repeat_ngram_size > 0``, ``bad_words_ids``,
        ``sequence_bias``, ``min_length`` / ``min_new_tokens > 0``, ``forced_bos_token_id``,
        ``forced_eos_token_id``, ``suppress_tokens``, ``begin_suppress_tokens``,
        ``exponential_decay_length_penalty``, ``guidance_scale != 1``, ``watermarking_config``, ``stop_strings``,
        ``penalty_alpha``, ``dola_layers``, ``diversity_penalty``, ``constraints``, ``force_words_ids``,
        ``encoder_repetition_penalty != 1`` and ``encoder_no_repeat_ngram_size > 0`` (``generate`` applies both to
        a decoder-only model's prompt); and, when
        sampling, ``min_p > 0``, ``top_h``, ``typical_p < 1``, ``epsilon_cutoff`` / ``eta_cutoff`` in ``(0, 1)``.
        Clear it on ``model.generation_config`` (``None``) to generate without it.

        A row that produced an end token (``eos_token_id``) continues with ``pad_token_id``; generation stops once
        every row has one (as ``generate`` does). Left unset, both are read from the model's ``generation_config``
        as ``generate`` reads them: its ``eos_token_id`` (one id, a list, or None: no end token) and its
        ``pad_token_id``, else the first end token.

        Args:
            input_ids: ``(batch_size, P)`` prompt tokens; a new sequence (the cache restarts at position 0).
            max_new_tokens: tokens to generate, ``P + max_new_tokens <= max_len``: an integer (Python's, NumPy's,
                a 0-d integer tensor: ``operator.index``; not a bool). ``top_k``, ``eos_token_id`` and
                ``pad_token_id`` take integers alike.
            eos_token_id: end token(s), as ``generate`` takes them: an integer, a list or tuple of integers, a 1-d
                integer tensor or NumPy integer array (a bool, a float, a 2-d tensor... is refused); None: those of
                the model's ``generation_config`` (``eos_token_id``, one id or a list; none where it has no
                ``generation_config`` or its ``eos_token_id`` is None), as ``generate`` stops; ``[]``: no end
                token, every row runs ``max_new_tokens``.
            pad_token_id: the token of finished rows, an id below :attr:`vocab_size` (finished rows are fed it);
                None: the ``pad_token_id`` of the model's ``generation_config``, else the first end token (as
                ``generate`` pads).
            do_sample: sample instead of taking the argmax; None: the generation config's (default False).
            temperature: the logits' divisor when sampling, ``> 0``; None: the generation config's (default 1.0).
            top_k: sample among this many largest logits (``>= 1``; ``0``: no such limit; applies to sampling
                only); None: the generation config's (default 50, as ``generate``).
            top_p: sample among the most likely tokens holding this probability, ``0 < top_p <= 1`` (``1``: no
                such limit; applies to sampling only); None: the generation config's (default 1.0).
            repetition_penalty: ``> 0``; above 1 makes tokens already in the row less likely (greedy and sampling;
                ``1``: none); None: the generation config's (default 1.0).
            generator: the random generator of the draws, or None.
            attention_mask: ``(batch_size, P)``, 1 for a prompt token, 0 for padding: prompts of different lengths
                padded on the left, as for ``generate`` (:meth:`feed`); None: inferred as ``generate`` infers it,
                ``input_ids != pad_token_id`` where the pad token (given, the generation config's, or the first end
                token) occurs in ``input_ids`` and is not an end token, else every prompt token real (a row ending
                in the pad token is then refused: pass ``torch.ones_like(input_ids)`` to keep every token).

        Returns:
            ``(batch_size, P + generated)`` int64 tensor. The last token returned is not in the cache (no step
            is run for it): :attr:`position` is then ``P + generated - 1``, and a sequence continued with
            :meth:`feed` starts with that token.

        Raises:
            ValueError: bad ``input_ids``, ``max_new_tokens`` not an integer >= 1 (a bool, a float) or past
                ``max_len``, end tokens that are not integers, a pad token (given, the generation config's, or the first end token) outside the
                embedding table when there are end tokens, bad sampling values (given, or the generation config's
                where used), a generation config setting that is not implemented (above), a row ending in the pad
                token with no ``attention_mask`` (above), the decoder was closed.
        """
        self._check_open()
        ids = self._ids(input_ids)
        n_new = _as_int(max_new_tokens)
        if n_new is None or n_new < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r} (an integer: Python's, "
                             "NumPy's or a 0-d integer tensor; not a bool)")
        max_new_tokens = n_new
        if ids.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"a {ids.shape[1]}-token prompt plus max_new_tokens={max_new_tokens} exceeds the "
                             f"decoder's max_len={self.max_len}")
        pick = _Picker(**_sampling(self.model, do_sample, temperature, top_k, top_p, repetition_penalty),
                       generator=generator)
        ends, pad_id = _special_tokens(self.model, eos_token_id, pad_token_id)
        eos, pad = torch.tensor(ends, dtype=torch.long), torch.tensor(pad_id)
        if attention_mask is None:
            pad_known = pad_token_id is not None or ends or \
                getattr(getattr(self.model, "generation_config", None), "pad_token_id", None) is not None
            attention_mask = _inferred_mask(ids, ends, pad_id) if pad_known else None
        # a finished row is fed the pad token at every later step, and the programs index the embedding table
        # without checking: an id outside it would be read out of bounds
        if eos.numel() and not 0 <= int(pad) < self.vocab_size:
            raise ValueError(f"pad_token_id must be a token id in 0..{self.vocab_size - 1} (finished rows are fed "
                             f"it; default: the generation config's, else the first end token), got {int(pad)}")
        t0 = time.perf_counter()
        logits = self.prefill(ids, attention_mask)
        t1 = time.perf_counter()
        p = ids.shape[1]
        seq = torch.empty(self.batch_size, p + max_new_tokens, dtype=torch.long)  # prompt + tokens so far
        seq[:, :p] = ids
        # the positions the repetition penalty counts: all but each row's left padding (before its first real
        # token, as generate's prompt_ignore_length)
        real = torch.ones(self.batch_size, p + max_new_tokens, dtype=torch.bool)
        if attention_mask is not None:
            first = (attention_mask != 0).int().argmax(dim=1)
            real[:, :p] = torch.arange(p)[None, :] >= first[:, None]
        done = torch.zeros(self.batch_size, dtype=torch.bool)
        n = p
        with torch.no_grad():
            for i in range(max_new_tokens):
                nxt = pick(logits, seq[:, :n], real[:, :n])
                if eos.numel():
                    nxt = torch.where(done, pad, nxt)
                    done |= torch.isin(nxt, eos)
                seq[:, n] = nxt
                n += 1
                if i + 1 == max_new_tokens or (eos.numel() and bool(done.all())):
                    break
                logits = self._call(seq[:, n - 1:n], 0)
                self.position += 1
        self.last_timing = {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "steps": n - p - 1}
        return seq[:, :n].clone()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the compiled programs to the folder ``path``, for :func:`load_decoder` to load without compiling.

        ``path`` is created; it must not exist or be empty. The decoder is then loaded with the same model, in this
        or another process. The folder holds the program packages (``prompt<chunk>-<length>.pt2``,
        ``step-<length>.pt2``)
        and ``decoder.json``: the packages' SHA-256, the versions and CPU they were compiled for (torch, medquant, the vector instruction
        set of the generated code), the sizes (batch, ``max_len``, chunks, cache lengths, the cache's tensors), each
        bound layer's name and kernel choices, the dtype, shape and strides of every model tensor the programs read,
        the model's configuration as the programs were compiled with it (less special token ids, labels and output
        switches), and a SHA-256 of the model's parameters and buffers as they are now. No weights are written: the
        programs read the model they are loaded with.

        A save that fails part way (a full disk, an interrupt) removes the files it wrote, and the folder when it
        created it: the folder is left as it was.

        Args:
            path: a folder that does not exist yet, or an empty one.

        Returns:
            The folder.

        Raises:
            ValueError: the folder is not empty, the decoder was closed, or the programs hold tensors that are not
                the model's (captured by a traced forward: compiled in, not loadable elsewhere).
        """
        if not self._programs:
            raise ValueError("this decoder was closed; nothing to save")
        if self._spec["foreign"]:
            raise ValueError(f"this decoder's programs hold {len(self._spec['foreign'])} tensors that are not the "
                             f"model's (e.g. {self._spec['foreign'][0]!r}: a tensor captured by the traced forward "
                             "is compiled in), so they cannot be loaded with a model; "
                             "save the model and compile again where it is to run")
        folder = Path(path)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ValueError(f"{folder} exists and is not an empty folder: save a decoder into a new folder")
        config = _text_config(self.model)
        programs: list[dict[str, Any]] = []
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{MANIFEST}.tmp"
        try:
            self._write(folder, config, programs, tmp)
        except BaseException:  # a full disk, an interrupt: what this save wrote goes, the folder is as it was
            for f in [tmp, *(folder / p["file"] for p in programs),
                      *(folder / _program_file(n, length) for n, length in self._files)]:
                f.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        return folder

    def _write(self, folder: Path, config: Any, programs: list[dict[str, Any]], tmp: Path) -> None:
        """:meth:`save`'s writes: the programs (recorded in ``programs`` as they are written), then the manifest
        through ``tmp``."""
        for (n, length), src in sorted(self._files.items()):
            dst = folder / _program_file(n, length)
            shutil.copyfile(src, dst)
            programs.append({"tokens": n, "length": length, "file": dst.name, "sha256": sha256_file(dst)})
        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **_build_facts(),
            "model": {"class": type(self.model).__name__, "model_type": getattr(config, "model_type", None),
                      "config": self._spec.get("config", _config_record(self.model)),
                      "sha256": _fingerprint(self.model)},
            "batch_size": self.batch_size, "max_len": self.max_len, "chunks": list(self.chunks),
            "cache": {"keys": [_tensor_spec(k) for k in self._keys], "values": [_tensor_spec(v) for v in self._values]},
            "programs": programs, "lanes": self._spec["lanes"], "ops": self._spec["ops"],
            "constants": self._spec["constants"],
        }
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, folder / MANIFEST)  # the manifest last: a folder without it was not saved whole

    def close(self) -> None:
        """Drop the programs and remove their temporary folder; the decoder is unusable afterwards.

        :meth:`feed`, :meth:`prefill`, :meth:`generate` and :meth:`save` then raise ``ValueError``. A saved copy
        stays where it was saved."""
        self._programs.clear()
        self._keep_alive.clear()
        if self._folder is not None:
            self._folder.cleanup()


#: the manifest of a saved decoder (:meth:`AOTDecoder.save`), its format name and version (4: the model's
#: configuration, checked at load; 3: each program's package
#: records its sizes and inputs, checked against the manifest at load; 2: prompt programs of several chunk lengths,
#: ``chunks`` and each program's ``tokens``; version 1 had one ``chunk`` and program kinds)
MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION = "decoder.json", "medquant.aot_decoder", 4


def _program_name(n: int) -> str:
    """The name of the program of ``n`` tokens per call: ``step`` (one token) or ``prompt<n>``."""
    return "step" if n == 1 else f"prompt{n}"


def _program_file(n: int, length: int) -> str:
    """The package file of the program of ``n`` tokens per call and cache length ``length``."""
    return f"{_program_name(n)}-{length}.pt2"


def _build_facts() -> dict[str, str]:
    """What the generated code depends on besides the model: torch's build, medquant's operators, the CPU's vector
    instruction set the code was generated for."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from ..version import __version__

    return {"torch": torch.__version__, "torch_git": str(torch.version.git_version), "medquant": __version__,
            "vec_isa": str(pick_vec_isa())}


class _Picker:
    """The next token of each row from its last logits (:meth:`AOTDecoder.generate`: what is computed, in
    ``generate``'s order); checks the sampling values when built."""

    def __init__(self, do_sample: bool, temperature: float | None, top_k: int | None, top_p: float | None,
                 repetition_penalty: float | None, generator: torch.Generator | None) -> None:
        if not isinstance(do_sample, bool):
            raise TypeError(f"do_sample must be True, False or None, got {do_sample!r}")
        if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        k = None if top_k is None else _as_int(top_k)
        if top_k is not None and not (k is not None and k >= 0):
            raise ValueError(f"top_k must be an int >= 1 (0: no limit) or None, got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if repetition_penalty is not None and (not isinstance(repetition_penalty, (int, float))
                                               or not repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0 or None, got {repetition_penalty!r}")
        self.do_sample, self.generator = do_sample, generator
        self.temperature = 1.0 if temperature is None else float(temperature)
        self.top_k = None if not k else k
        self.top_p = None if top_p is None or top_p >= 1 else float(top_p)
        self.penalty = None if repetition_penalty in (None, 1, 1.0) else float(repetition_penalty)

    def scores(self, logits: torch.Tensor, seq: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """The processed float32 logits ``(batch, vocab)`` the token is picked from (``-inf``: excluded); ``real``
        (``seq``'s shape, bool): the positions whose tokens count as seen by the repetition penalty (False: left
        padding, not counted, as ``generate`` skips it); None: all."""
        scores = logits.float()
        if self.penalty is not None:
            vocab = scores.shape[-1]
            index = seq if real is None else seq.masked_fill(~real, vocab)  # padding: to a column cut off below
            seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool).scatter_(1, index, True)[:, :vocab]
            scores = torch.where(seen, torch.where(scores < 0, scores * self.penalty, scores / self.penalty), scores)
        if not self.do_sample:
            return scores
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None:
            ascending, order = scores.sort(dim=-1)
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[:, -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return scores

    def __call__(self, logits: torch.Tensor, seq: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.scores(logits, seq, real)
        if not self.do_sample:
            return scores.argmax(-1)
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[:, 0]


#: transformers' ``generate`` defaults of the sampling settings :meth:`AOTDecoder.generate` implements (used where
#: neither the caller nor the model's ``generation_config`` sets one)
_SAMPLING_DEFAULTS: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                      "repetition_penalty": 1.0}


def _listed(v: Any) -> bool:
    return v is not None and (not isinstance(v, (list, tuple, dict)) or len(v) > 0)


#: generation config settings :meth:`AOTDecoder.generate` does not implement, each with when ``generate`` would
#: apply it (its value changes the tokens); the first group in greedy and sampled decoding, the second sampled only
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "num_beams": lambda v: v is not None and v > 1, "num_beam_groups": lambda v: v is not None and v > 1,
    "num_return_sequences": lambda v: v is not None and v > 1,
    "no_repeat_ngram_size": lambda v: v is not None and v > 0, "bad_words_ids": _listed,
    "sequence_bias": _listed, "min_length": lambda v: v is not None and v > 0,
    "min_new_tokens": lambda v: v is not None and v > 0, "forced_bos_token_id": lambda v: v is not None,
    "forced_eos_token_id": lambda v: v is not None, "suppress_tokens": _listed, "begin_suppress_tokens": _listed,
    "exponential_decay_length_penalty": lambda v: v is not None,
    "guidance_scale": lambda v: v is not None and v != 1, "watermarking_config": lambda v: v is not None,
    "stop_strings": _listed, "penalty_alpha": lambda v: v is not None and v > 0,
    "dola_layers": lambda v: v is not None, "diversity_penalty": lambda v: v is not None and v > 0,
    "constraints": _listed, "force_words_ids": _listed,
    # read the "encoder" ids, which generate takes to be the prompt of a decoder-only model
    "encoder_repetition_penalty": lambda v: v is not None and v != 1,
    "encoder_no_repeat_ngram_size": lambda v: v is not None and v > 0,
}
_UNSUPPORTED_SAMPLED: dict[str, Callable[[Any], bool]] = {
    "min_p": lambda v: v is not None and v > 0, "top_h": lambda v: v is not None,
    "typical_p": lambda v: v is not None and v < 1, "epsilon_cutoff": lambda v: v is not None and 0 < v < 1,
    "eta_cutoff": lambda v: v is not None and 0 < v < 1,
}


def _sampling(model: nn.Module, do_sample: bool | None, temperature: float | None, top_k: int | None,
              top_p: float | None, repetition_penalty: float | None) -> dict[str, Any]:
    """The sampling settings of :meth:`AOTDecoder.generate`, as transformers' ``generate`` settles them: each one
    given (not None) as given, else the model's ``generation_config``'s where not None, else ``generate``'s default
    (:data:`_SAMPLING_DEFAULTS`). Greedy, the config's ``temperature`` / ``top_k`` / ``top_p`` are dropped (None:
    unused, as ``generate`` ignores them); those given are kept, to be checked. ``ValueError`` names a config
    setting ``generate`` would apply that is not implemented (:data:`_UNSUPPORTED`, :data:`_UNSUPPORTED_SAMPLED`)."""
    config = getattr(model, "generation_config", None)
    given = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
             "repetition_penalty": repetition_penalty}
    out = {}
    for name, value in given.items():
        if value is None:
            value = getattr(config, name, None)
        out[name] = _SAMPLING_DEFAULTS[name] if value is None else value
    if not out["do_sample"]:
        for name in ("temperature", "top_k", "top_p"):
            out[name] = given[name]
        unused = [f"{name}={given[name]!r}" for name in ("temperature", "top_k", "top_p") if given[name] is not None]
        if unused:  # generate too says its flags "may be ignored"; not a silent greedy run
            warnings.warn(f"generate: {', '.join(unused)} given, but do_sample is False (greedy: the argmax of the "
                          "logits), so they are not used; pass do_sample=True to sample", UserWarning, stacklevel=3)
    checks = {**_UNSUPPORTED, **(_UNSUPPORTED_SAMPLED if out["do_sample"] else {})}
    for name, applies in checks.items():
        value = getattr(config, name, None)
        if applies(value):
            raise ValueError(f"the model's generation_config sets {name}={value!r}, which transformers' generate "
                             f"applies and medquant's generate does not implement: set "
                             f"model.generation_config.{name} = None to generate without it"
                             + ("" if name in _UNSUPPORTED else ", or pass do_sample=False"))
    return out


def _special_tokens(model: nn.Module, eos_token_id: Any, pad_token_id: Any) -> tuple[list[int], int]:
    """The end tokens and pad token of :meth:`AOTDecoder.generate`, as transformers' ``generate`` settles them: each
    one not given (None) is the model's ``generation_config``'s; the pad token, still None, is the first end token
    (0 where there is no end token: never fed then). ``eos_token_id=[]``: no end token."""
    config = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    ends = _end_tokens(eos_token_id)
    pad = None if pad_token_id is None else _as_int(pad_token_id)
    if pad_token_id is not None and pad is None:
        raise ValueError(f"pad_token_id must be an int token id or None, got {pad_token_id!r}")
    return ends, pad if pad is not None else ends[0] if ends else 0


def _inferred_mask(ids: torch.Tensor, ends: list[int], pad: int) -> torch.Tensor | None:
    """The ``attention_mask`` transformers' ``generate`` infers when given none: ``ids != pad`` where the pad token
    ``pad`` occurs in ``ids`` and is not one of the end tokens ``ends``; None (every token real) otherwise.

    Raises:
        ValueError: a row ending in the pad token (right padding: the decoder reads each row's last position)."""
    if pad in ends or not bool((ids == pad).any()):
        return None
    mask = (ids != pad).long()
    rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
    if rows:
        raise ValueError(f"input_ids: row {rows[0]} ends with the pad token {pad}; with no attention_mask, the "
                         f"pad token is taken as padding wherever it occurs (as transformers' generate infers "
                         f"attention_mask = input_ids != pad_token_id), and padding goes on the left: pad on the "
                         f"left, or pass attention_mask (e.g. torch.ones_like(input_ids): every token real)")
    return mask


def _end_tokens(eos_token_id: Any) -> list[int]:
    """The end tokens ``eos_token_id`` names, as Python ints, taken as transformers' ``generate`` takes them: None
    (none), an integer (Python's, NumPy's, a 0-d integer tensor or NumPy array: :func:`_as_int`), a list or tuple
    of integers (``[]``: none), or a 1-d integer tensor or NumPy array (int8..int64, uint8..uint64).

    Raises:
        ValueError: anything else, naming it: a bool, a float, a string, a set, a list holding a non-integer (a
            bool, a float, a list, a 1-d tensor), a tensor or array of bools or floats or of two or more
            dimensions."""
    if eos_token_id is None:
        return []
    one = _as_int(eos_token_id)
    if one is not None:
        return [one]
    int_tensor = isinstance(eos_token_id, torch.Tensor) and eos_token_id.dim() == 1 and \
        not eos_token_id.dtype.is_floating_point and not eos_token_id.is_complex() and eos_token_id.dtype != torch.bool
    int_array = isinstance(eos_token_id, np.ndarray) and eos_token_id.ndim == 1 and \
        np.issubdtype(eos_token_id.dtype, np.integer)
    given: list[Any] | None = None
    if isinstance(eos_token_id, (list, tuple)):
        given = list(eos_token_id)
    elif int_tensor or int_array:
        given = eos_token_id.tolist()
    ends = [] if given is None else [_as_int(t) for t in given]
    if given is None or any(t is None for t in ends):
        raise ValueError(f"eos_token_id must be an int token id, a list of them ([]: no end token) or a 1-d "
                         f"integer tensor / NumPy array of them, or None (the model's generation_config's), got "
                         f"{eos_token_id!r}")
    return [t for t in ends if t is not None]


def _is_int(value: object) -> TypeGuard[int]:
    """An ``int`` and not a ``bool`` (JSON and Python both let ``True`` pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value: object) -> int | None:
    """``value`` as an ``int`` where it is an integer: a Python or NumPy integer, or anything else
    ``operator.index`` takes (``numbers.Integral``), a 0-d integer tensor included; None for a bool (Python's,
    NumPy's or a bool tensor), a float, a tensor of another dtype or of one or more dimensions, a string, ...
    (:meth:`AOTDecoder.generate`'s integer arguments)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool
                                            or value.dtype.is_floating_point or value.is_complex()):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:  # np.bool_, floats, strings, ...: no __index__
        return None


def _cache_lengths(cache_lengths: Sequence[int] | None, max_len: int) -> list[int]:
    """The programs' cache lengths, ascending, ``max_len`` last (``compile_decoder``'s ``cache_lengths``)."""
    if cache_lengths is None:
        out, length = [], 256
        while length < max_len:
            out.append(length)
            length *= 2
        return [*out, max_len]
    sequence = isinstance(cache_lengths, Sequence) and not isinstance(cache_lengths, (str, bytes))
    lengths = list(cache_lengths) if sequence else []
    if not sequence:  # an int (as chunk takes one) or a string: named, not "'int' object is not iterable"
        raise ValueError(f"cache_lengths must be a sequence of ints in 1..max_len={max_len} (one length: (L,)), or "
                         f"None, got {cache_lengths!r}")
    ints = [_as_int(x) for x in lengths]
    bad = [x for x, i in zip(lengths, ints) if i is None or not 1 <= i <= max_len]
    if bad:
        raise ValueError(f"cache_lengths must be ints in 1..max_len={max_len}, got {bad} (integers: Python's, "
                         "NumPy's or 0-d integer tensors; not bools)")
    return sorted({*(i for i in ints if i is not None), max_len})


def _chunks(chunk: int | Sequence[int] | None, max_len: int) -> tuple[int, ...]:
    """The prompt programs' chunk lengths, ascending, each ``2..max_len`` (``compile_decoder``'s ``chunk``; a 1 is
    the step program, compiled anyway)."""
    if chunk is None:
        return (min(64, max_len),) if max_len > 1 else ()
    one = _as_int(chunk)
    given = [chunk] if one is not None else chunk
    values = [] if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) else [_as_int(c) for c in given]
    ints = [c for c in values if c is not None and c >= 1]
    if not values or len(ints) != len(values):
        raise ValueError(f"chunk must be an int >= 1 or a non-empty sequence of them, got {chunk!r} (integers: "
                         "Python's, NumPy's or 0-d integer tensors; not bools)")
    long = [c for c in ints if c > max_len]
    if long:
        raise ValueError(f"chunk ({long[0]}) must not exceed max_len ({max_len})")
    return tuple(sorted({c for c in ints if c > 1}))


def compile_decoder(model: nn.Module, max_len: int, *, batch_size: int = 1,
                    chunk: int | Sequence[int] | None = None,
                    cache_lengths: Sequence[int] | None = None, progress: bool = True) -> AOTDecoder:
    """Compile ``model``'s prompt and decode steps ahead of time for CPU (module docstring) and return the decoder.

    ``decoder.generate(ids, max_new_tokens)`` then gives what ``model.generate`` gives (the same quantized kernels,
    prompt through the blocked matmul, tokens through the weight-only kernel): greedy, or sampled as the model's
    ``generation_config`` says (:meth:`AOTDecoder.generate`).

    Args:
        model: a Hugging Face causal LM on CPU, quantized (``quantize_``) or not, in float32 or bfloat16; its
            quantized layers are bound to their kernels here.
        max_len: cache positions (prompt plus generated tokens), ``>= 1``. This, ``batch_size``, ``chunk`` and
            ``cache_lengths`` take integers as ``operator.index`` does: Python's, NumPy's (``np.int64(64)``) or a 0-d
            integer tensor, stored as Python ints; a bool, a float, a float / bool / 1-d tensor or a string is
            refused (``ValueError``).
        batch_size: rows per call, ``>= 1``.
        chunk: tokens per call of the prompt program (``1 <= chunk <= max_len``; 1 compiles the step program
            only), or several such lengths (a list or tuple), one prompt program each (a prompt takes the longest chunks first,
            module docstring); None: ``min(64, max_len)``. A prompt shorter than the shortest chunk is padded to
            it, a longer one runs in fewer, larger calls: 128 or 256 prefilled prompts of a few hundred tokens up
            to 1.25x faster than 64, and 40-token prompts at 0.58x / 0.31x (SmolLM2 and a 1.1B model, 2 threads);
            ``(64, 256)`` serves both (each length is one more program per cache length to compile).
        cache_lengths: cache lengths to compile both programs for, a sequence of ints each ``<= max_len`` (one
            length: ``(L,)``; ``max_len`` is always added): a call writing up to position ``p`` runs the shortest
            length above ``p``, so its attention reads that many positions instead of ``max_len`` (attention over
            the whole static cache made SmolLM2 decode at 48 tok/s and prefill at 427 with ``max_len=2048``,
            against 120 and 960 with a cache as long as the sequence). None: 256, 512, 1024, ... below ``max_len``; ``()``: ``max_len`` only. Each length
            is one step program and one prompt program per chunk length not above it, to compile.
        progress: show a progress bar over the export and compile stages.

    Returns:
        The :class:`AOTDecoder`.

    Raises:
        TypeError: ``model`` is not a Hugging Face model (no ``config``).
        ValueError: bad ``max_len`` / ``batch_size`` / ``chunk`` / ``cache_lengths``; a model not on CPU; a cache
            that is not full attention in every layer; an output head wider than the input embedding table (its
            ``out_features`` above the table's rows: checked first, before anything is compiled).
    """
    _text_config(model)
    _check_head(model, "compile_decoder")
    sizes = {}
    for name, value in (("max_len", max_len), ("batch_size", batch_size)):
        size = _as_int(value)
        if size is None or size < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r} (an integer: Python's, NumPy's or a 0-d "
                             "integer tensor; not a bool)")
        sizes[name] = size
    max_len, batch_size = sizes["max_len"], sizes["batch_size"]
    chunks = _chunks(chunk, max_len)
    lengths = _cache_lengths(cache_lengths, max_len)
    devices = {t.device.type for t in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(f"compile_decoder compiles for CPU; the model's parameters are on {sorted(devices)}")
    from tqdm.auto import tqdm

    config_record = _config_record(model)  # what the programs are exported with
    was_training = model.training
    model.eval()
    try:
        lanes, _, quantized = _bind(model)
        if len(lanes) < quantized:
            warnings.warn(f"compile_decoder: {quantized - len(lanes)} of {quantized} quantized layers have no native "
                          "kernel on this CPU; the programs call them through medquant's custom op (packed_linear "
                          "on their own tensors, run eagerly at each call) or dequantize their tensors (the dense "
                          "path): correct, slower", stacklevel=2)
        handles = _Handles([lane.handle for lane in lanes.values()])
        cache = _static_cache(model, batch_size, max_len)
        # taken before exporting: the export's tracing leaves its own tensors on the cache object's layers
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        mask = torch.ones(batch_size, max_len, dtype=torch.long)  # as the decoder holds it (its views' strides)
        folder = tempfile.TemporaryDirectory(prefix="medquant-aot-")
        programs: dict[tuple[int, int], Any] = {}
        files: dict[tuple[int, int], Path] = {}
        keep_alive: list[Any] = [handles]
        foreign: set[str] = set()  # constants that are neither the model's tensors nor the handles
        export_s = compile_s = 0.0
        shapes = [(c, length) for c in chunks for length in lengths if c <= length]
        shapes += [(1, length) for length in lengths]
        bar = tqdm(total=2 * len(shapes), desc="compile_decoder", disable=not progress)
        caches = {max_len: cache}  # one cache object per length, shared by its prompt and step programs
        for n, length in shapes:
            name = _program_name(n)
            # a program of cache length L reads the first L positions of the cache (views with the full cache's
            # strides, which the program is compiled for) under a cache object of that length (its mask sizes)
            if length not in caches:
                caches[length] = _static_cache(model, batch_size, length)
            step = _CacheStep(model, caches[length], handles)
            own = _module_tensors(step)
            bar.set_postfix_str(f"export {name} {length}")
            t = time.perf_counter()
            inputs = _program_inputs(batch_size, n, length, mask, keys, values)
            with torch.no_grad(), _lanes_by_tensor(model, lanes, handles), _laneless_unbound(model, lanes), \
                    _step_attention(model, n == 1):
                ep = torch.export.export(step, inputs, strict=False)
            export_s += time.perf_counter() - t
            bar.update()
            bar.set_postfix_str(f"compile {name} {length}")
            t = time.perf_counter()
            path = Path(torch._inductor.aoti_compile_and_package(
                ep, package_path=str(Path(folder.name) / _program_file(n, length)),
                inductor_configs={"aot_inductor.package_constants_in_so": False,
                                  "aot_inductor.metadata": _program_metadata(batch_size, max_len, n, length, inputs)}))
            program = torch._inductor.aoti_load_package(str(path))
            held = {**ep.state_dict, **ep.constants}
            made = [fqn for fqn in program.get_constant_fqns() if fqn not in held]
            if made:  # computed by the compiler from tensors it held (e.g. weights it folded): nothing to hand over
                raise RuntimeError(f"compile_decoder: the compiled {name} program holds tensors the compiler made "
                                   f"({made[:3]}), which cannot be handed to it; a layer of this model is traced "
                                   "through a path that compiles its weights in")
            constants = {fqn: held[fqn] for fqn in program.get_constant_fqns()}
            foreign.update(fqn for fqn, t in constants.items() if own.get(fqn) is not t)
            # a handle the program does not read from its tensor is in its code: it would call this process's layer
            foreign.update(f"handles.{b}" for b, _ in handles.named_buffers() if f"handles.{b}" not in constants)
            keep_alive.append(constants)
            program.load_constants(constants, check_full_update=True, user_managed=True)
            compile_s += time.perf_counter() - t
            bar.update()
            programs[n, length], files[n, length] = program, path
        bar.close()
    finally:
        model.train(was_training)
    spec = {"lanes": {name: list(lane.lane[1:]) for name, lane in lanes.items()},
            "ops": sorted({lane.op_name for lane in lanes.values()}),
            "constants": {fqn: _tensor_spec(t) for constants in keep_alive[1:] for fqn, t in constants.items()},
            "foreign": sorted(foreign), "config": config_record}
    return AOTDecoder(model, keys, values, programs, keep_alive, batch_size, max_len, chunks, len(lanes), export_s,
                      compile_s, folder, files=files, spec=spec)


#: the manifest's fields the loader reads, and their JSON types (sizes are positive integers)
_MANIFEST_FIELDS = {"batch_size": int, "max_len": int, "chunks": list, "programs": list, "model": dict, "cache": dict,
                    "lanes": dict, "ops": list, "constants": dict}
_KIND_NAMES = {int: "positive integer", list: "list", dict: "mapping"}


def read_decoder_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The record a saved decoder's folder holds (``decoder.json``), read without loading a model or a program.

    For checks that should come before the cost of loading: the sizes the programs were compiled for
    (``batch_size``, ``max_len``, ``chunks``, the ``programs`` with their tokens per call and cache lengths), the
    model's class, type and configuration (``model.config``: the fields that change what the programs compute),
    and the versions and CPU they were compiled for. :func:`load_decoder` checks all of it against the model and this
    process.

    Args:
        path: a folder written by :meth:`AOTDecoder.save`.

    Returns:
        The manifest as a dict (format ``medquant.aot_decoder``, version 4).

    Raises:
        FileNotFoundError: no ``decoder.json`` in ``path``.
        ValueError: the file is not a readable decoder manifest, of another manifest version, a field the loader
            reads is missing or of another type, a program ``file`` entry that is not a plain file name (a path,
            ``.``, ``..``), or sizes that disagree (``batch_size`` and ``max_len`` with the
            cache's shapes, the programs' cache lengths with ``max_len``).
    """
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{folder} holds no saved decoder ({MANIFEST} is missing; AOTDecoder.save writes it)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is not a readable decoder manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{file} is not a medquant decoder manifest (format {MANIFEST_FORMAT!r})")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{file} has manifest version {manifest.get('version')!r}; this medquant reads version "
                         f"{MANIFEST_VERSION}: compile the decoder again")
    for key, kind in _MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, int) and value < 1):
            raise ValueError(f"{file}: field {key!r} is {value!r}, expected a {_KIND_NAMES[kind]} (the file was "
                             "edited or cut short: save the decoder again)")
    model = manifest["model"]
    bad = [(key, kind) for key, kind in (("class", str), ("config", dict), ("sha256", str))
           if not isinstance(model.get(key), kind)]
    if bad:
        key, kind = bad[0]
        raise ValueError(f"{file}: field 'model' has {key!r} {model.get(key)!r}, expected a "
                         f"{'mapping' if kind is dict else 'string'} (the file was edited, cut short, or written "
                         "by an earlier medquant: save the decoder again)")
    if "model_type" not in model or not (model["model_type"] is None or isinstance(model["model_type"], str)):
        raise ValueError(f"{file}: field 'model' has 'model_type' {model.get('model_type', '(absent)')!r}, expected a "
                         "string or null (the file was edited, cut short, or written by an earlier medquant: save "
                         "the decoder again)")
    if not all(isinstance(op, str) for op in manifest["ops"]):
        raise ValueError(f"{file}: field 'ops' is {manifest['ops']!r}, expected a list of operator names (the file "
                         "was edited or cut short: save the decoder again)")
    for prog in manifest["programs"]:
        if not isinstance(prog, dict) or any(not (_is_int(prog.get(k)) and prog[k] >= 1)
                                             for k in ("tokens", "length")) or any(not isinstance(prog.get(k), str) for k in ("file", "sha256")):
            raise ValueError(f"{file}: a program entry is {prog!r}, expected tokens and length (positive integers), "
                             "file and sha256 (strings) (the file was edited or cut short: save the decoder again)")
        if not _is_plain_name(prog["file"]):
            raise ValueError(f"{file}: program file entry {prog['file']!r} is not accepted: a plain file name inside "
                             "the folder is accepted (as AOTDecoder.save writes them, e.g. 'step-256.pt2'), not a "
                             "path, '.' or '..' (the file was edited: save the decoder again)")
    chunks, max_len = manifest["chunks"], manifest["max_len"]
    tokens = {prog["tokens"] for prog in manifest["programs"]}
    if any(not (_is_int(c) and 1 < c <= max_len) for c in chunks) or tokens != {1, *chunks}:
        raise ValueError(f"{file}: chunks {chunks!r} do not match the programs' tokens per call {sorted(tokens)} "
                         f"(each chunk in 2..max_len={max_len} with its prompt programs, and the step programs of 1 "
                         "token): the file was edited; save the decoder again")
    _check_manifest_sizes(file, manifest)
    return manifest


def _is_plain_name(entry: str) -> bool:
    """A file name with no folder part (no ``/`` or ``\\``), not ``""``, ``"."`` or ``".."``: what a manifest's
    program ``file`` entry may be (:meth:`AOTDecoder.save` writes the packages into the folder itself)."""
    return entry not in ("", ".", "..") and not any(c in entry for c in "/\\\0") and Path(entry).name == entry


def _is_tensor_spec(spec: Any) -> bool:
    """A ``[dtype, shape, strides]`` of a cache tensor (:func:`_tensor_spec`, 4 dimensions)."""
    return (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)
            and isinstance(getattr(torch, spec[0], None), torch.dtype)
            and isinstance(spec[1], list) and len(spec[1]) == 4 and all(_is_int(x) and x >= 1 for x in spec[1])
            and isinstance(spec[2], list) and len(spec[2]) == 4 and all(_is_int(x) and x >= 0 for x in spec[2]))


def _check_manifest_sizes(file: Path, manifest: dict[str, Any]) -> None:
    """``batch_size`` and ``max_len`` against the cache's recorded shapes ``(batch, kv heads, max_len, head dim)``;
    each tokens per call's cache lengths: distinct, none below the tokens, the longest ``max_len`` (as compiled)."""
    cache = manifest["cache"]
    keys, values = cache.get("keys"), cache.get("values")
    if not isinstance(keys, list) or not isinstance(values, list) or not keys or len(keys) != len(values) or any(
            not _is_tensor_spec(spec) for spec in (*keys, *values)):
        raise ValueError(f"{file}: field 'cache' is not one [dtype, shape, strides] (4 dimensions) per layer for keys "
                         "and values (the file was edited or cut short: save the decoder again)")
    for kind, specs in (("key", keys), ("value", values)):
        for layer, (_, shape, _) in enumerate(specs):
            for field, dim in (("batch_size", 0), ("max_len", 2)):
                if shape[dim] != manifest[field]:
                    raise ValueError(f"{file}: {field} is {manifest[field]}, but the cache's {kind} tensor of layer "
                                     f"{layer} was recorded with {shape[dim]} (shape {shape}, which the programs were "
                                     "compiled for): the file was edited; save the decoder again")
    max_len = manifest["max_len"]
    for n in sorted({prog["tokens"] for prog in manifest["programs"]}):
        lengths = sorted(prog["length"] for prog in manifest["programs"] if prog["tokens"] == n)
        if lengths[-1] != max_len or lengths[0] < n or len(set(lengths)) < len(lengths):
            raise ValueError(f"{file}: the programs of {n} tokens per call have cache lengths {lengths}, expected "
                             f"distinct lengths in {n}..max_len={max_len}, max_len among them (as compile_decoder "
                             "compiles them): the file was edited; save the decoder again")


def _refuse(what: str, saved: Any, here: Any, remedy: str) -> None:
    if saved != here:
        raise ValueError(f"the saved decoder was compiled for {what} {saved!r}, here it is {here!r}: {remedy}")


def load_decoder(path: str | os.PathLike, model: nn.Module, *, check_weights: bool = True,
                 progress: bool = True) -> AOTDecoder:
    """Load a decoder saved by :meth:`AOTDecoder.save` for ``model``, without compiling.

    The programs read ``model``'s own tensors (user-managed constants, as when compiled) and call its quantized
    layers by the handles they get here (bound now, the programs read them from tensors handed at load), so a
    decoder compiled in one process runs in another. Everything the generated code assumes is checked first, and
    anything that differs is refused with what differs: the packages' SHA-256 and their entries (each a plain file
    name in the folder, :func:`read_decoder_manifest`; one that resolves outside the folder through a symbolic link is
    refused); torch's version and build, medquant's
    version and the CPU's vector instruction set (generated code is specific to them); the model's class, type
    and configuration (every field of ``model.config`` but special token ids, labels, output switches and the like:
    the programs compute with the norm epsilon, rotary settings, activation... they were exported with, so a model
    of the same tensors under another configuration is refused even with ``check_weights=False``); every bound
    layer (the same names, in the same order, with the same kernel choices: sizes, the row counts where the kernels
    switch, the blocked matmul and the activation forms, which follow the compute dtype and the ``$MEDQUANT_*``
    settings); the model's output head no wider than its input embedding table (checked before the weights, so a
    widened head is named as such); every tensor the programs read
    (present, with the same dtype, shape and strides, which the programs do not check themselves); the C++
    operator the programs call, when they were compiled with it; the sizes each program's package records (batch,
    ``max_len``, tokens per call, cache length, its inputs' dtypes, shapes and strides) against the manifest's,
    which make the inputs the decoder passes it (the programs check none of them: a manifest edited to another
    batch or length would run them out of bounds). With ``check_weights`` the model's parameters and
    buffers must also be the saved ones, byte for byte (their SHA-256): a decoder then always runs the model it was
    saved with; pass False to run these programs with another model of the same structure (e.g. the same
    architecture quantized the same way, with other weights): it computes with that model's weights.

    Args:
        path: the folder :meth:`AOTDecoder.save` wrote.
        model: the model, on CPU, quantized as when compiled (e.g. ``medquant.load`` of the saved checkpoint); its
            quantized layers are bound to their kernels here.
        check_weights: require the model's tensors to be the ones it had when the decoder was saved.
        progress: show a progress bar over the loading of the programs.

    Returns:
        The :class:`AOTDecoder` (its cache new, at position 0).

    Raises:
        FileNotFoundError: no ``decoder.json`` in ``path``, or a program file missing.
        TypeError: ``model`` is not a Hugging Face model.
        ValueError: any of the checks above.
    """
    folder = Path(path)
    manifest = read_decoder_manifest(folder)
    facts = _build_facts()
    for key, remedy in (("torch", "install the torch it was compiled with, or compile it again"),
                        ("torch_git", "install the torch build it was compiled with, or compile it again"),
                        ("medquant", "compile it again with this medquant"),
                        ("vec_isa", "the generated code needs that instruction set: compile it on this machine")):
        _refuse(key.replace("_", " "), manifest.get(key), facts[key], remedy)
    files = {}
    inside = folder.resolve()
    for prog in manifest["programs"]:
        file = folder / prog["file"]  # a plain name (read_decoder_manifest), but maybe a symbolic link
        target = file.resolve()
        if not target.is_relative_to(inside):
            raise ValueError(f"{file}: program file entry {prog['file']!r} resolves to {target}, outside the folder "
                             "(a symbolic link): a plain file name inside the folder is accepted, its file inside "
                             "the folder; copy the program into the folder, or save the decoder again")
        if not file.is_file():
            raise FileNotFoundError(f"{file}, a program of the saved decoder, is missing")
        if sha256_file(file) != prog["sha256"]:
            raise ValueError(f"{file} does not match its recorded SHA-256 (corrupted or replaced): save it again")
        files[prog["tokens"], prog["length"]] = file
    config = _text_config(model)
    _refuse("model class", manifest["model"]["class"], type(model).__name__, "load it with that model")
    _refuse("model type", manifest["model"]["model_type"], getattr(config, "model_type", None),
            "load it with that model")
    differs = _config_difference(manifest["model"]["config"], _config_record(model))
    if differs is not None:
        raise ValueError(f"the saved decoder was compiled for a model whose config field {differs[0]!r} is "
                         f"{differs[1]!r}, here it is {differs[2]!r}: the programs compute with the configuration "
                         "they were exported with; load it with a model of that configuration, or compile the decoder "
                         "for this one")
    devices = {t.device.type for t in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(f"load_decoder runs on CPU; the model's parameters are on {sorted(devices)}")
    _check_head(model, "load_decoder")
    if check_weights and _fingerprint(model) != manifest["model"]["sha256"]:
        raise ValueError("the model's parameters and buffers are not the ones the decoder was saved with (their "
                         "SHA-256 differs): load the saved model, or pass check_weights=False to run these programs "
                         "with this model's own weights (its structure is still checked)")
    lanes, _, _ = _bind(model)
    saved = manifest["lanes"]
    if list(lanes) != list(saved):
        from ..kernels.native import native_status

        missing = [n for n in saved if n not in lanes] or [n for n in lanes if n not in saved]
        status = native_status()
        why = "" if status.get("gemv4") else f" (the native kernels are not active here: {status.get('reason')})"
        raise ValueError(f"the model's bound quantized layers differ from the saved decoder's ({len(lanes)} here, "
                         f"{len(saved)} saved; e.g. {missing[:1]}){why}: load it with the model it was compiled "
                         "from, where it was compiled")
    for name, lane in lanes.items():
        _refuse(f"layer {name!r} with kernel choices (k, n, rows switches, blocked matmul, activation forms)",
                saved[name], json.loads(json.dumps(list(lane.lane[1:]))),
                "quantize the model as when it was compiled, with the same $MEDQUANT_* settings")
    native_ops = [op for op in manifest["ops"] if op.endswith("_native")]
    if native_ops and not hasattr(torch.ops.medquant, "gemv4_bound_by_native"):
        from ..kernels.native_op import native_op_status

        raise ValueError(f"the saved programs call the C++ operator {native_ops[0]}, unavailable here "
                         f"({native_op_status()['reason']}): compile the decoder again in this environment")
    handles = _Handles([lane.handle for lane in lanes.values()])
    tensors = _module_tensors(_CacheStep(model, None, handles))
    for fqn, spec in manifest["constants"].items():
        if fqn not in tensors:
            raise ValueError(f"the programs read {fqn!r}, which the model does not have: load it with the model it "
                             "was compiled from")
        _refuse(f"tensor {fqn!r} as [dtype, shape, strides]", spec, _tensor_spec(tensors[fqn]),
                "load it with the model it was compiled from, in the same dtype and layout")
    from tqdm.auto import tqdm

    def empty(spec: list) -> torch.Tensor:
        return torch.empty_strided(spec[1], spec[2], dtype=getattr(torch, spec[0])).zero_()

    keys = [empty(spec) for spec in manifest["cache"]["keys"]]
    values = [empty(spec) for spec in manifest["cache"]["values"]]
    batch_size, max_len = manifest["batch_size"], manifest["max_len"]
    mask = torch.ones(batch_size, max_len, dtype=torch.long)  # as the decoder holds it (its views' strides)
    programs: dict[tuple[int, int], Any] = {}
    keep_alive: list[Any] = [handles]
    t = time.perf_counter()
    for key, file in tqdm(sorted(files.items()), desc="load_decoder", disable=not progress):
        program = torch._inductor.aoti_load_package(str(file))
        # the sizes the package records: the compiled code assumes them (reading and writing out of bounds, or
        # rows of another batch, when given other shapes) and checks none
        n, length = key
        _check_program_sizes(program, file, {"batch_size": batch_size, "max_len": max_len, "tokens": n,
                                             "length": length},
                             _program_inputs(batch_size, n, length, mask, keys, values))
        constants = {}
        for fqn in program.get_constant_fqns():
            if fqn not in manifest["constants"]:
                raise ValueError(f"{file} reads {fqn!r}, which its manifest does not list: save the decoder again")
            constants[fqn] = tensors[fqn]
        program.load_constants(constants, check_full_update=True, user_managed=True)
        keep_alive.append(constants)
        programs[key] = program
    load_s = time.perf_counter() - t
    spec = {"lanes": saved, "ops": manifest["ops"], "constants": manifest["constants"], "foreign": [],
            "config": manifest["model"]["config"]}
    return AOTDecoder(model, keys, values, programs, keep_alive, batch_size, max_len, manifest["chunks"], len(lanes),
                      0.0, load_s, None, files=files, spec=spec)
