"""Size accounting: every stored byte, and effective bits.

* ``stored bytes`` counts every tensor a saved model holds (packed codes, scales, zero points, bit maps,
  float rows, biases, norms, embeddings; tied tensors once, also a head sharing a quantized embedding's packed
  tensors; a view of part of a larger tensor, ``full[:, :n]``, as the copy of its own the save writes; 3/5/6/7-bit
  codes at their dense size, format version 2, also in a layer that still holds them in 4/8-bit containers, layout
  1, which :func:`medquant.save` re-packs densely before writing) plus the JSON metadata recording each quantized
  module's recipe (:func:`medquant.quant.recipe.model_recipe`). A dense 3/5/6/7-bit row group of ``n``
  rows takes ``n * K_pad * b / 32`` int32 words, ``K_pad`` the next multiple of ``lcm(group_size, 32)`` (group
  scope) or of 32, and ``n * K_pad / group_size`` scales (and zero points) for group scope. A bitsandbytes layer
  counts the tensors its state dict holds, as bitsandbytes saves them: for an NF4 / FP4 ``Linear4bit`` (QLoRA's
  base, :mod:`medquant.qlora`) the uint8 codes (``in * out / 2`` bytes), ``absmax`` (one float32 a block of 64, or
  one uint8 with double quantization, plus ``nested_absmax`` - one float32 a block of 256 constants - and the
  256-entry float32 ``nested_quant_map``), the 16-entry float32 ``quant_map`` and the packed JSON quant state; for
  an int8 ``Linear8bitLt`` the int8 rows, the float32 ``SCB`` (one a row) and the 1-byte ``weight_format``. A
  ``Linear4bit`` in bitsandbytes' CPU-packed (AVX512-BF16) layout counts the standard layout its state dict
  converts back to (what a save writes); the size functions put the packed layout back afterwards.
* ``effective bits`` is the parameter-weighted mean of the nominal bit-widths of the weights of the weight layers,
  ``sum(bits_i * params_i) / sum(params_i)``. The weight layers are those :func:`medquant.eval.count_macs` counts:
  Linear (and its subclasses: bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``), Conv1d / Conv2d / Conv3d,
  ConvTranspose1d/2d/3d, transformers' ``Conv1D`` (GPT-2) and medquant's quantized Linear / Conv2d; their
  parameters are ``in * out`` for a Linear (a bitsandbytes NF4 weight tensor packs two codes a byte) and the weight
  tensor's size otherwise. The nominal bits are the bits of the stored weight codes, per weight, without the
  per-row / group / block constants: quantized rows count their bits (pruned rows 0; scales and zero points not
  counted), a layer medquant did not quantize its weight tensor's ``numel * dtype width / params``: the dtype's
  width for a float layer (32, or 16 for fp16 / bf16; ``quantize_`` leaves Conv1d / Conv3d, transposed
  convolutions and ``Conv1D`` float), 4 for an NF4 / FP4 ``Linear4bit`` (absmax and quant map not counted, as
  medquant's scales are not), 8 for an int8 ``Linear8bitLt`` (its ``SCB`` not counted). The 3-D weights of float
  mixture-of-experts modules (``E`` stacked expert matrices, :mod:`medquant.quant.experts`) count as ``E`` float
  linear weights, as their quantized form (:class:`~medquant.quant.experts.QuantExperts`, one quantized linear per
  expert and projection) does: a model whose experts stayed float does not report the bits of its attention alone.
  ``nn.MultiheadAttention``'s in-projection weights (raw parameters, not layer modules: the fused
  ``in_proj_weight`` ``[3E, E]``, or ``q/k/v_proj_weight`` when ``kdim`` / ``vdim`` differ from ``E``) count as
  float weights at their dtype's width (medquant never quantizes them; its ``out_proj`` is a Linear, counted as
  such), as :mod:`medquant.eval.bops` counts them.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..kernels.layout import DENSE_BITS, FORMAT_VERSION
from .experts import experts_layout
from .modules import QUANT_LAYERS, QUANT_MODULES, QuantLinear
from .recipe import model_recipe


@dataclass
class SizeReport:
    """What a model takes when saved: stored bytes and effective bits (see the module docstring).

    Attributes:
        total_bytes: ``tensor_bytes + metadata_bytes``, what :func:`medquant.save` writes apart from file headers.
        tensor_bytes: bytes of every tensor of the state dict (packed codes, scales, zero points, bit maps, float
            rows, biases, norms, embeddings), tied tensors counted once.
        metadata_bytes: bytes of the JSON recipes of the quantized modules (0 for a float model).
        linear_weight_bytes: bytes of the weight layers' weights (module docstring), packed or float, with the
            stored constants of quantized ones (scales, zero points, bit maps; a bitsandbytes layer's absmax, quant
            map, quant state, SCB), biases excluded (float experts' 3-D weights included).
        linear_params: number of weights of the weight layers (``in * out`` for a Linear, NF4 included; float
            experts' 3-D weights included).
        effective_bits: ``sum(bits_i * params_i) / sum(params_i)`` over those weights, in nominal bits (module
            docstring: quantized rows their bits, pruned rows 0, NF4 4, int8 8, float layers and float experts
            their dtype's width; no constants).
    """

    total_bytes: int  # every stored tensor byte + metadata
    tensor_bytes: int
    metadata_bytes: int
    linear_weight_bytes: int  # bytes of the weight layers' weights (packed or float, with constants), no biases
    linear_params: int  # number of weights of the weight layers
    effective_bits: float  # parameter-weighted nominal bits over those weights

    @property
    def total_mb(self) -> float:
        """``total_bytes / 2^20`` (MiB)."""
        return self.total_bytes / 2**20

    def as_dict(self) -> dict:
        """The fields and ``total_mb`` as a JSON-ready dict.

        Returns:
            ``{"total_bytes": ..., ..., "effective_bits": ..., "total_mb": ...}``.
        """
        d = asdict(self)
        d["total_mb"] = self.total_mb
        return d


def model_size(model: nn.Module) -> SizeReport:
    """Stored bytes and effective bits of a model (a :class:`SizeReport`).

    Args:
        model: any ``nn.Module``, quantized by medquant or not (a float model reports its float bytes and dtype
            width; bitsandbytes layers their saved tensors and 4 / 8 bits). Left unchanged (a bitsandbytes
            CPU-packed layout too, see the module docstring).

    Returns:
        The :class:`SizeReport`.
    """
    with _standard_layout(model):
        return _model_size(model)


def _model_size(model: nn.Module) -> SizeReport:
    saved = _saved_sizes(model)
    seen: set[tuple] = set()
    tensor_bytes = 0
    for t in model.state_dict(keep_vars=True).values():
        key = _stored_as(t)
        if key in seen:
            continue
        seen.add(key)
        tensor_bytes += saved.get(id(t), t.numel() * t.element_size())
    meta = model_recipe(model)
    meta_bytes = len(json.dumps(meta).encode()) if meta else 0
    lw_bytes = 0
    params = 0
    bit_sum = 0.0
    for m in model.modules():
        if isinstance(m, QUANT_MODULES):
            n = m.out_rows * m.k
            params += n
            bit_sum += float(m.row_bits().float().sum()) * m.k
            bias_bytes = m.bias.numel() * m.bias.element_size() if m.bias is not None else 0
            lw_bytes += _layer_bytes(m, saved) - bias_bytes
        elif is_weight_layer(m):
            w = _weight(m)
            params += weight_layer_params(m)
            bit_sum += w.numel() * w.element_size() * 8  # = params * nominal bits (module docstring)
            lw_bytes += sum(_nbytes(t) for k, t in _own_tensors(m).items() if k != "bias")
        elif isinstance(m, nn.MultiheadAttention):
            for w in mha_in_proj_weights(m).values():
                params += w.numel()
                bit_sum += w.numel() * w.element_size() * 8
                lw_bytes += w.numel() * w.element_size()
        elif experts_layout(m) is not None:
            for w in _linear_weights(m).values():
                params += w.numel()
                bit_sum += w.numel() * w.element_size() * 8
                lw_bytes += w.numel() * w.element_size()
    return SizeReport(
        total_bytes=tensor_bytes + meta_bytes,
        tensor_bytes=tensor_bytes,
        metadata_bytes=meta_bytes,
        linear_weight_bytes=lw_bytes,
        linear_params=params,
        effective_bits=bit_sum / params if params else 0.0,
    )


def layer_table(model: nn.Module) -> list[dict]:
    """One row per weight matrix of the model: name, shape, bits, stored bytes.

    The rows: every weight layer (the module docstring's: Linear, bitsandbytes ``Linear4bit`` / ``Linear8bitLt``,
    Conv1d/2d/3d, ConvTranspose1d/2d/3d, transformers' ``Conv1D``; quantized or not), every quantized embedding,
    every in-projection weight of an ``nn.MultiheadAttention`` (``<module>.in_proj_weight`` ``[3E, E]``, or
    ``<module>.q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` ``[E, kdim]``...; float) and
    every stacked weight of a float experts module (``<module>.gate_up_proj``: its ``E`` expert matrices as
    ``[E * out, in]``). The shape of a layer medquant did not quantize is ``[out, params / out]`` (``out``: output
    features or channels; ``[out, in]`` for a Linear or ``Conv1D``). A head sharing a quantized embedding's tensors
    shows the shared bytes on both rows. The ``bytes`` of a layer are those a save writes for it, bias included:
    for a quantized layer those of :func:`medquant.save` (3/5/6/7-bit rows at their dense size, see the module
    docstring), for a bitsandbytes layer its state dict's tensors (codes, absmax, quant map, quant state, SCB).

    Args:
        model: the model.

    Returns:
        A list of dicts with the keys ``name``, ``type``, ``shape`` (``[rows, K]``), ``bits`` (e.g. ``"4"``, or
        ``"{2: 12 rows, 4: 52 rows}"`` for mixed rows; ``"4"`` for NF4), ``effective_bits`` and ``bytes``, in
        ``named_modules`` order.
    """
    with _standard_layout(model):
        return _layer_table(model)


def _layer_table(model: nn.Module) -> list[dict]:
    rows = []
    saved = _saved_sizes(model)
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            rows.append({"name": name, "type": type(m).__name__, "shape": [m.out_rows, m.k],
                         "bits": m._bits_repr().removeprefix("bits="), "effective_bits": m.effective_bits,
                         "bytes": _layer_bytes(m, saved)})
        elif is_weight_layer(m):
            params, out, bits = weight_layer_params(m), _out_features(m), weight_layer_bits(m)
            rows.append({"name": name, "type": type(m).__name__, "shape": [out, params // max(out, 1)],
                         "bits": f"{bits:g}", "effective_bits": bits,
                         "bytes": sum(_nbytes(t) for t in _own_tensors(m).values())})
        elif isinstance(m, nn.MultiheadAttention):
            for pname, w in mha_in_proj_weights(m).items():
                rows.append({"name": f"{name}.{pname}", "type": type(m).__name__, "shape": list(w.shape),
                             "bits": str(w.element_size() * 8), "effective_bits": float(w.element_size() * 8),
                             "bytes": _nbytes(w)})
        elif (layout := experts_layout(m)) is not None:  # float experts: a row per stacked weight, E [out, in]
            for pname, w in _linear_weights(m).items():
                out, k = (w.shape[2], w.shape[1]) if layout["transposed"] else (w.shape[1], w.shape[2])
                rows.append({"name": f"{name}.{pname}", "type": type(m).__name__,
                             "shape": [w.shape[0] * out, k], "bits": str(w.element_size() * 8),
                             "effective_bits": float(w.element_size() * 8), "bytes": w.numel() * w.element_size()})
    return rows


#: the weight layers medquant did not quantize (as :mod:`medquant.eval.bops` counts them): ``_ConvNd`` covers
#: Conv1d/2d/3d and ConvTranspose1d/2d/3d, ``nn.Linear`` bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``
_FLOAT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear with its weight stored ``in x out`` (checked by name: no import)."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def is_weight_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a weight layer medquant did not quantize (float, or bitsandbytes-quantized): an
    ``nn.Linear``, a convolution (Conv1d/2d/3d, ConvTranspose1d/2d/3d) or transformers' ``Conv1D``; the layers
    :func:`model_size` and :mod:`medquant.eval.bops` count beside medquant's own quantized ones."""
    return not isinstance(m, QUANT_LAYERS) and (isinstance(m, _FLOAT_LAYERS) or is_hf_conv1d(m))


def mha_in_proj_weights(m: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    """The q, k, v projection weights of ``m`` by parameter name: ``{"in_proj_weight": [3E, E]}``, or the three
    separate ``q_proj_weight`` ``[E, E]``, ``k_proj_weight`` ``[E, kdim]``, ``v_proj_weight`` ``[E, vdim]``."""
    if m.in_proj_weight is not None:
        return {"in_proj_weight": m.in_proj_weight}
    ws = {"q_proj_weight": m.q_proj_weight, "k_proj_weight": m.k_proj_weight, "v_proj_weight": m.v_proj_weight}
    return {k: w for k, w in ws.items() if w is not None}


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight  # a parametrized (fake-quant) layer reports its float weight here
    assert isinstance(w, torch.Tensor)
    return w


def weight_layer_params(m: nn.Module) -> int:
    """Weights of a layer medquant did not quantize: ``in * out`` for a Linear (a bitsandbytes ``Linear4bit``
    packs two 4-bit codes a byte of its weight tensor), else the weight tensor's size."""
    if isinstance(m, nn.Linear):
        return m.in_features * m.out_features
    return _weight(m).numel()


def _out_features(m: nn.Module) -> int:
    """Output features (Linear, ``Conv1D``: its weight is ``in x out``) or channels (convolutions)."""
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    return _weight(m).shape[-1]


def weight_layer_bits(m: nn.Module) -> float:
    """Nominal bits per weight of a layer medquant did not quantize: ``numel * dtype width / params`` of its
    weight tensor (the dtype width of a float layer, 4 for a ``Linear4bit``, 8 for a ``Linear8bitLt``)."""
    w = _weight(m)
    return w.numel() * w.element_size() * 8 / max(weight_layer_params(m), 1)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _own_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's own state-dict entries, submodules excluded: its parameters and buffers and what
    bitsandbytes adds (``weight.absmax``, ``weight.quant_map``, ..., ``SCB``, ``weight_format``); a parametrized
    weight (kept under ``parametrizations``) as the layer's computed ``weight``."""
    own: dict[str, torch.Tensor] = {}
    m._save_to_state_dict(own, "", True)
    if "weight" not in own:
        own["weight"] = _weight(m)
    return own


@contextmanager
def _standard_layout(model: nn.Module) -> Iterator[None]:
    """Puts back, on exit, the bitsandbytes CPU-packed layout of the ``Linear4bit`` layers that hold it: their
    ``_save_to_state_dict`` converts the module itself back to the standard layout (re-quantizing the absmax into
    the quant state's own fields), which is what a save writes and what the size functions count."""
    packed = []
    for m in model.modules():
        w = m._parameters.get("weight")
        state = getattr(w, "quant_state", None)
        if w is not None and getattr(state, "packing_format_for_cpu", False):
            packed.append((w, w.data, state, dict(vars(state))))
    try:
        yield
    finally:
        for w, data, state, fields in packed:
            vars(state).clear()
            vars(state).update(fields)
            w.data = data
            w.quant_state = state  # type: ignore[attr-defined]


def covers_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its whole storage: it begins where its storage begins and holds all of its bytes (a
    parameter, a buffer, a transposed weight; not a view of part of a larger tensor, ``full[:, :n]``).

    safetensors stores a tensor that covers its storage once for every name sharing it (tied weights); a view of
    part of a storage :func:`medquant.save` stores as a copy of its own (one for the names of one view), so
    :func:`model_size` counts a tensor once per storage it covers, and a view once per distinct view.

    Args:
        t: the tensor (a meta tensor has no storage: ``False``).

    Returns:
        Whether ``t`` begins at its storage's first byte and holds ``storage.nbytes()`` bytes (``True`` for a
        tensor subclass without a storage to read: it is left as it is).
    """
    if t.device.type == "meta":
        return False
    try:
        s = t.untyped_storage()
        return t.data_ptr() == s.data_ptr() and t.numel() * t.element_size() == s.nbytes()
    except (NotImplementedError, RuntimeError, TypeError):
        return True


def _stored_as(t: torch.Tensor) -> tuple:
    """What ``t`` is stored as: its storage when it covers it, else its own view (tensors with one key are stored
    once, see :func:`covers_storage`); a tensor without a storage to read, itself."""
    if t.device.type == "meta":
        return ("tensor", id(t))
    try:
        if covers_storage(t):
            return ("storage", t.device, t.untyped_storage().data_ptr())
        return ("view", t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
    except (NotImplementedError, RuntimeError, TypeError):
        return ("tensor", id(t))


def _linear_weights(m: nn.Module) -> dict:
    """``{name: weight}`` of a float experts module: its 3-D stacked expert weights, biases excluded."""
    return {n: p for n, p in m._parameters.items() if p is not None and p.dim() == 3}


def _saved_sizes(model: nn.Module) -> dict[int, int]:
    """``id(tensor) -> bytes medquant.save writes for it`` for the tensors whose saved size differs from their size
    in memory: the packed codes, scales and zero points of the 3/5/6/7-bit row groups of quantized layers still in
    the container layout (layout 1), which the save re-packs densely (format version 2). Their saved shapes are
    those of the same layer built in the dense layout (the storage of a quantized layer depends only on its rows,
    ``K``, config and layout), read off an empty ``QuantLinear`` shell on the meta device."""
    out: dict[int, int] = {}
    for m in model.modules():
        if not isinstance(m, QUANT_LAYERS) or m.dense or not any(b in DENSE_BITS for b in m.bit_groups):
            continue
        shell = QuantLinear(m.k, m.out_rows, False, m.config.replace(compute_dtype=None), device="meta",
                            layout=FORMAT_VERSION)
        for name, t in m._buffers.items():
            dense = shell._buffers.get(name)
            if t is not None and dense is not None:
                out[id(t)] = dense.numel() * t.element_size()
    return out


def _layer_bytes(m: nn.Module, saved: dict[int, int]) -> int:
    """Bytes of a quantized layer's stored tensors as :func:`medquant.save` writes them (``saved``: see
    :func:`_saved_sizes`)."""
    return sum(saved.get(id(t), t.numel() * t.element_size()) for t in m.state_dict(keep_vars=True).values())
