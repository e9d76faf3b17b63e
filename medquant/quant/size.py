"""Size accounting: every stored byte, and effective bits.

* ``stored bytes`` counts every tensor a saved model holds (packed codes, scales, zero points, bit maps,
  float rows, biases, norms, embeddings; tied tensors once, also a head sharing a quantized embedding's packed
  tensors; 3/5/6/7-bit codes at their dense size, format version 2, also in a layer that still holds them in 4/8-bit
  containers, layout 1, which :func:`medquant.save` re-packs densely before writing) plus the JSON metadata recording
  each quantized module's recipe (:func:`medquant.quant.recipe.model_recipe`). A dense 3/5/6/7-bit row group of ``n``
  rows takes ``n * K_pad * b / 32`` int32 words, ``K_pad`` the next multiple of ``lcm(group_size, 32)`` (group
  scope) or of 32, and ``n * K_pad / group_size`` scales (and zero points) for group scope.
* ``effective bits`` is the parameter-weighted mean of the nominal bit-widths of the Linear/Conv2d weights:
  quantized rows count their bits (pruned rows 0), float layers their dtype's width. The 3-D weights of float
  mixture-of-experts modules (``E`` stacked expert matrices, :mod:`medquant.quant.experts`) count as ``E`` float
  linear weights, as their quantized form (:class:`~medquant.quant.experts.QuantExperts`, one quantized linear per
  expert and projection) does: a model whose experts stayed float does not report the bits of its attention alone.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

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
        linear_weight_bytes: bytes of the Linear / Conv2d weights, packed or float, biases excluded (float
            experts' 3-D weights included).
        linear_params: number of Linear / Conv2d weight elements (float experts' 3-D weights included).
        effective_bits: ``sum(bits_i * params_i) / sum(params_i)`` over the Linear / Conv2d weights (float layers
            and float experts count their dtype's width, pruned rows 0).
    """

    total_bytes: int  # every stored tensor byte + metadata
    tensor_bytes: int
    metadata_bytes: int
    linear_weight_bytes: int  # bytes of Linear/Conv2d weights (packed or float), biases excluded
    linear_params: int  # number of Linear/Conv2d weight elements
    effective_bits: float  # parameter-weighted nominal bits over Linear/Conv2d weights

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
            width).

    Returns:
        The :class:`SizeReport`.
    """
    saved = _saved_sizes(model)
    seen: set[tuple[int, int]] = set()
    tensor_bytes = 0
    for t in model.state_dict(keep_vars=True).values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
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
        elif isinstance(m, (nn.Linear, nn.Conv2d)) or experts_layout(m) is not None:
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

    The rows: every Linear/Conv2d (quantized or not), every quantized embedding and every stacked weight of a float
    experts module (``<module>.gate_up_proj``: its ``E`` expert matrices as ``[E * out, in]``). A head sharing a
    quantized embedding's tensors shows the shared bytes on both rows. The ``bytes`` of a quantized layer are those
    :func:`medquant.save` writes for it (3/5/6/7-bit rows at their dense size, see the module docstring).

    Args:
        model: the model.

    Returns:
        A list of dicts with the keys ``name``, ``type``, ``shape`` (``[rows, K]``), ``bits`` (e.g. ``"4"``, or
        ``"{2: 12 rows, 4: 52 rows}"`` for mixed rows), ``effective_bits`` and ``bytes``, in ``named_modules`` order.
    """
    rows = []
    saved = _saved_sizes(model)
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            rows.append({"name": name, "type": type(m).__name__, "shape": [m.out_rows, m.k],
                         "bits": m._bits_repr().removeprefix("bits="), "effective_bits": m.effective_bits,
                         "bytes": _layer_bytes(m, saved)})
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight
            rows.append({"name": name, "type": type(m).__name__, "shape": [w.shape[0], w[0].numel()],
                         "bits": str(w.element_size() * 8), "effective_bits": float(w.element_size() * 8),
                         "bytes": sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))})
        elif (layout := experts_layout(m)) is not None:  # float experts: a row per stacked weight, E [out, in]
            for pname, w in _linear_weights(m).items():
                out, k = (w.shape[2], w.shape[1]) if layout["transposed"] else (w.shape[1], w.shape[2])
                rows.append({"name": f"{name}.{pname}", "type": type(m).__name__,
                             "shape": [w.shape[0] * out, k], "bits": str(w.element_size() * 8),
                             "effective_bits": float(w.element_size() * 8), "bytes": w.numel() * w.element_size()})
    return rows


def _linear_weights(m: nn.Module) -> dict:
    """``{name: weight}`` of a float Linear / Conv2d (its ``weight``) or of a float experts module (its 3-D
    stacked expert weights, biases excluded)."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        return {"weight": m.weight}
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
