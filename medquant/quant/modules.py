"""``QuantLinear`` and ``QuantConv2d``: packed integer weights + scales (+ zero points), per-row bit-widths.

Storage (see :mod:`medquant.kernels.layout` for the layout), for each bit-width ``b`` present in the layer:

* ``qweight_{b}`` int32 packed codes of the rows with ``b`` bits (1..8), ``scales_{b}``, and ``zeros_{b}`` for
  asymmetric rows; 3/5/6/7-bit codes are stored densely (format version 2) when the layer's ``layout_version``
  is 2 (every layer ``from_float`` builds), in 4/8-bit containers (version 1, files written before) when it is 1;
* ``fweight_{b}`` for rows kept in floating point (``b`` = 16 -> float16, 32 -> float32);
* nothing for pruned rows (``b`` = 0): their output is zero (plus bias);
* ``bit_map`` (int8, one entry per output row) only when the layer mixes bit-widths.

Row groups are computed in ascending row order and scattered back, so the output order is the original one.
``QuantLinear.forward`` hands each packed row group to :func:`medquant.kernels.packed_linear` as a
:class:`~medquant.kernels.PackedWeight` (:meth:`packed_weight`); the kernel layer decides which backend runs.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import (
    PackedWeight,
    dispatch_generation,
    eager_inference,
    forget_cpu_plans,
    packed_linear,
    prepare_packed_linear,
    select_kernel,
    set_layer_compute_dtype,
    tensor_version,
)
from ..kernels.layout import DENSE_BITS, FORMAT_VERSION, check_float_dtype, pack, padded_k, words_per_row
from ..kernels.reference import device_mismatch
from .config import FLOAT_BITS, QuantConfig
from .core import quantize

_FLOAT_ROW_DTYPE = {16: torch.float16, 32: torch.float32}


def _after_load(module: _QuantWeightBase, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: ``assign=True`` replaced the stored tensors (the CPU kernels' repacked
    weights are keyed by them and rebuilt at the next call; copied-in codes change the tensor versions, except
    those of inference tensors, which track none: their repacked weights are dropped)."""
    module.refresh_kernels()
    forget_cpu_plans(*(module._buffers.get(f"qweight_{b}") for b in module.bit_groups if 1 <= b <= 8))


#: attribute holding a layer's prepared eager-inference matmul (never saved, copied or pickled)
_PREPARED = "_prepared_matmul"
#: attribute holding the prepared matmul that ``torch.compile`` traces instead of the custom op
#: (:meth:`_QuantWeightBase.bind_cpu_kernels`; dropped like ``_PREPARED``)
_BOUND = "_bound_matmul"
#: attribute holding the bound matmul's traced lane (``fn.bind_traced()``: the native kernel called by handle), read
#: first by a compiled ``forward``
_BOUND_LANE = "_bound_lane"
#: the floating buffers of the stored format (a dtype cast of the layer leaves their dtype)
_STORED_FLOAT_PREFIXES = ("scales_", "zeros_", "fweight_")
#: the buffer names of row group ``b``: ``(qweight_b, scales_b, zeros_b)``
_ROW_GROUP_NAMES = {b: (f"qweight_{b}", f"scales_{b}", f"zeros_{b}") for b in range(1, 9)}


def _apply_memo(fn) -> dict | None:
    """The tensors ``fn`` (one ``Module._apply`` conversion: ``.to()``, ``.half()``..., the same function object
    for every submodule) converted in quantized layers so far, ``{id(old): (weakref(old), weakref(new))}`` (weak:
    nothing is kept alive), kept on ``fn`` itself (gone with it); None where ``fn`` takes no attribute (a
    builtin)."""
    memo = getattr(fn, "_medquant_converted", None)
    if memo is None:
        memo = {}
        try:
            fn._medquant_converted = memo
        except (AttributeError, TypeError):
            return None
    return memo


def _drop_prepared(d: dict) -> None:
    """Drop the prepared and bound matmuls from a layer's ``__dict__`` (or a copy of it)."""
    for name in (_PREPARED, _BOUND, _BOUND_LANE):
        d.pop(name, None)


class _QuantWeightBase(nn.Module):
    """Shared storage and math of quantized weight matrices ``(out_rows, k)``."""

    config: QuantConfig
    layout_version: int
    #: name of the buffer whose device is the layer's (its first row group's codes or float rows); None for a layer
    #: that stores no weight tensor (every row pruned): :meth:`_check_device`
    _device_ref: str | None = None

    def _init_storage(self, out_rows: int, k: int, config: QuantConfig, device=None, layout: int = 1) -> None:
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a medquant.QuantConfig, got {type(config).__name__}")
        _check_layout(layout)
        if out_rows <= 0 or k <= 0:  # no row group at all: every later read of bit_groups[0] would fail
            raise ValueError(f"{type(self).__name__} needs a non-empty ({out_rows} x {k}) weight: at least one "
                             "output row and one input feature; there is nothing to quantize")
        self.config = config
        self.layout_version = layout
        self.out_rows = out_rows
        self.k = k
        row_bits = config.row_bits(out_rows)
        self.bit_groups: list[int] = sorted(int(b) for b in torch.unique(row_bits).tolist())
        self.mixed = len(self.bit_groups) > 1
        gs = config.group_size if config.scope == "group" else None
        for b in self.bit_groups:
            rows = torch.nonzero(row_bits == b).flatten().to(device=device)
            nb = rows.numel()
            if self.mixed:
                self.register_buffer(f"rows_{b}", rows, persistent=False)
            if 1 <= b <= 8:
                kp = padded_k(k, b, gs, self.dense)
                n_groups = kp // config.group_size if config.scope == "group" else 1
                n_scale_rows = 1 if config.scope == "tensor" else nb
                sd = config.torch_scale_dtype
                self.register_buffer(
                    f"qweight_{b}",
                    torch.zeros(nb, words_per_row(kp, b, self.dense), dtype=torch.int32, device=device))
                self.register_buffer(f"scales_{b}", torch.ones(n_scale_rows, n_groups, dtype=sd, device=device))
                if not config.is_symmetric(b):
                    self.register_buffer(f"zeros_{b}", torch.zeros(n_scale_rows, n_groups, dtype=sd, device=device))
            elif b in FLOAT_BITS:
                self.register_buffer(f"fweight_{b}", torch.zeros(nb, k, dtype=_FLOAT_ROW_DTYPE[b], device=device))
        if self.mixed:
            self.register_buffer("bit_map", row_bits.to(torch.int8).to(device))
        self._device_ref = _device_buffer(self.bit_groups)
        self._register_compute_dtype()
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def dense(self) -> bool:
        """Whether 3/5/6/7-bit row groups are stored densely (layout version 2)."""
        return self.layout_version >= 2

    @property
    def stores_dense(self) -> bool:
        """Whether the layer holds a row group in the dense layout (only then is it a version-2 layer)."""
        return self.dense and any(b in DENSE_BITS for b in self.bit_groups)

    @torch.no_grad()
    def to_layout(self, version: int) -> _QuantWeightBase:
        """Re-pack the 3/5/6/7-bit row groups in place into layout ``version`` (1: containers, 2: dense).

        The codes and scales are unchanged (exact); only their storage changes. The CPU kernels of the two layouts
        differ (e.g. ``native3`` for dense 3-bit rows, ``native4`` for their 4-bit containers) and may round
        differently in the last float32 bits of a sum. Returns ``self``.

        A layer knows nothing of the layers sharing its tensors: re-packing one of a tied head and embedding
        (:func:`tie_quantized_head`) alone gives it new tensors, so the pair no longer shares storage (results are
        unchanged; the table is held twice). ``medquant.io.dense_layouts(model)`` re-packs a whole model and ties
        such pairs again.
        """
        _check_layout(version)
        if version == self.layout_version:
            return self
        gs = self.config.group_size if self.config.scope == "group" else None
        new_dense = version >= 2
        for b in self.bit_groups:
            if b not in DENSE_BITS:
                continue
            w = self.packed_weight(b)
            kp = padded_k(self.k, b, gs, new_dense)
            codes = torch.nn.functional.pad(w.codes()[:, : self.k], (0, kp - self.k))
            self._buffers[f"qweight_{b}"] = pack(codes, b, new_dense)
            if self.config.scope == "group" and kp // self.config.group_size != w.scales.shape[1]:
                g = kp // self.config.group_size  # group sizes not dividing 32: a padded group more or less
                for name in (f"scales_{b}", f"zeros_{b}"):
                    t = self._buffers.get(name)
                    if t is not None:
                        fill = 1.0 if name.startswith("scales") else 0.0
                        extra = max(g - t.shape[1], 0)
                        self._buffers[name] = torch.cat([t, t.new_full((t.shape[0], extra), fill)], 1)[:, :g]
        self.layout_version = version
        self._register_compute_dtype()
        return self

    def refresh_kernels(self) -> None:
        """Re-key the CPU kernels' settings to this layer's current tensors and drop its prepared kernels.

        The kernels know a layer's ``config.compute_dtype`` and its repacked weights by its stored tensors; a
        loader that replaces those tensors without ``load_state_dict`` (transformers' ``from_pretrained`` does)
        calls this afterwards, or the layer would run with the global compute dtype instead of its own.
        ``load_state_dict``, ``.to()`` and copies do it themselves.
        """
        self._register_compute_dtype()
        _drop_prepared(self.__dict__)

    def _register_compute_dtype(self) -> None:
        """Tell the CPU kernels this layer's ``config.compute_dtype`` (if set), keyed by its stored codes."""
        if getattr(self.config, "compute_dtype", None) is None:
            return
        for b in self.bit_groups:
            if 1 <= b <= 8:
                set_layer_compute_dtype(getattr(self, f"qweight_{b}"), self.config.compute_dtype)

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cpu()`` / ``.half()``...: the device moves every tensor; a dtype cast changes the
        dequantized weight's dtype (``weight_dtype``, hence ``.weight`` and lookups) and the bias, never the stored
        format: scales, zero points and float rows keep the dtypes their config implies (a cast of those would
        round them, and a checkpoint would no longer match its recipe).

        Buffers shared between layers (a head tied to its embedding table, :func:`tie_quantized_head`) stay shared
        when one call converts them all (``model.to(device)``: the same ``fn`` reaches every layer): each shared
        tensor is converted once and every layer holding it gets the same result, as ``nn.Module`` keeps a tied
        float ``weight`` parameter shared."""
        memo = _apply_memo(fn)  # {id(old tensor): (old, converted)} of the layers this fn converted before
        originals = dict(self._buffers)
        shared = {}
        if memo is not None:
            for n, t in originals.items():
                hit = None if t is None else memo.get(id(t))
                new = None if hit is None or hit[0]() is not t else hit[1]()
                if new is not None:
                    shared[n] = new
                    self._buffers[n] = None  # converted already (under another layer): not converted again
        stored = {n: t for n, t in self._buffers.items()
                  if t is not None and t.is_floating_point() and n.startswith(_STORED_FLOAT_PREFIXES)}
        probe = fn(torch.empty(0, dtype=self.weight_dtype))
        try:
            out = super()._apply(fn, *args, **kwargs)
        finally:
            for n, t in shared.items():  # the same order of buffers (state_dict keys) as before
                self._buffers[n] = t
        for name, old in stored.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)  # the moved tensor, in its own dtype
        if memo is not None:
            for n, t in originals.items():
                if t is not None and n not in shared and self._buffers[n] is not None:
                    memo[id(t)] = (weakref.ref(t), weakref.ref(self._buffers[n]))
        if probe.is_floating_point():
            self.weight_dtype = probe.dtype
        self.refresh_kernels()  # .to() / .cpu() made new tensors
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """As ``nn.Module``'s, refusing (with ``strict`` True or False) a ``bit_map`` other than this layer's
        ``config.row_bits``: the row groups are placed by the config's rows, so another recipe with the same counts
        per bit-width (same keys and shapes) would otherwise load and compute its rows in the wrong places."""
        key = prefix + "bit_map"
        got = state_dict.get(key)
        if self.mixed and isinstance(got, torch.Tensor) and got.shape == (self.out_rows,) and got.device.type != "meta":
            want = self.config.row_bits(self.out_rows)
            if not torch.equal(got.detach().to("cpu", torch.int16), want):
                bad = torch.nonzero(got.detach().to("cpu", torch.int16) != want).flatten()[:8].tolist()
                error_msgs.append(
                    f"bit_map of {key!r} differs from this layer's config.channel_bits (first differing rows {bad}): the "
                    f"checkpoint was quantized with another per-row bit-width recipe; build the layer with that "
                    f"recipe's QuantConfig")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __getstate__(self):
        state = self.__dict__.copy()
        _drop_prepared(state)  # bound to this layer's tensors: a copy prepares its own
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._device_ref = _device_buffer(self.bit_groups)  # layers pickled before it existed
        self._register_compute_dtype()  # copy.deepcopy / pickle made new tensors

    def _check_device(self, x: torch.Tensor) -> None:
        """Refuse an input on another device than the layer's stored tensors, before any kernel runs.

        ``x.device`` is compared with the device of one stored buffer (all of a layer's tensors move together):
        no synchronisation, no copy. A meta ``x`` with real (CPU, CUDA) weights is refused too, where torch's
        meta kernels would return a meta tensor computed from nothing; meta inputs with meta weights (shape
        inference on a model built on ``torch.device("meta")``) pass.

        Raises:
            DeviceMismatchError: the devices differ (a ``RuntimeError``, the class torch raises for tensors on two
                devices, and a ``ValueError``); the message names both devices and the ``.to()`` that fixes it.
        """
        # a None name finds no buffer: a layer without weight tensors checks nothing
        ref = self._buffers.get(self._device_ref)  # type: ignore[arg-type]
        if ref is not None and x.device != ref.device:
            raise device_mismatch(type(self).__name__, x.device, ref.device)

    # ------------------------------------------------------------------ quantization
    def _rows(self, b: int) -> torch.Tensor | None:
        return getattr(self, f"rows_{b}") if self.mixed else None

    @torch.no_grad()
    def _quantize_from(self, w2d: torch.Tensor) -> None:
        if w2d.shape != (self.out_rows, self.k):
            raise ValueError(f"weight has shape {tuple(w2d.shape)}, expected {(self.out_rows, self.k)}")
        for b in self.bit_groups:
            rows = self._rows(b)
            sub = w2d if rows is None else w2d.index_select(0, rows)
            if 1 <= b <= 8:
                q = quantize(sub, self.config, b, self.dense)
                getattr(self, f"qweight_{b}").copy_(pack(q.codes, b, self.dense))
                getattr(self, f"scales_{b}").copy_(q.scales)
                if q.zeros is not None:
                    getattr(self, f"zeros_{b}").copy_(q.zeros)
            elif b in FLOAT_BITS:
                if not torch.isfinite(sub).all():
                    raise ValueError("weights contain NaN/inf values; quantization needs finite weights")
                stored = sub.to(_FLOAT_ROW_DTYPE[b])
                if not torch.isfinite(stored).all():  # past float16's range: inf, silently
                    raise ValueError(f"rows with {b} bits are stored in {_FLOAT_ROW_DTYPE[b]}, whose range "
                                     f"(+-{torch.finfo(_FLOAT_ROW_DTYPE[b]).max:.6g}) does not hold these weights "
                                     f"(max |w| = {float(sub.abs().max()):.3g}): give these rows 32 bits")
                getattr(self, f"fweight_{b}").copy_(stored)

    def packed_weight(self, b: int) -> PackedWeight:
        """The packed row group of the rows with ``b`` bits (1..8), as stored (no copy)."""
        gs = self.config.group_size if self.config.scope == "group" else padded_k(self.k, b, None, self.dense)
        return PackedWeight(
            getattr(self, f"qweight_{b}"),
            getattr(self, f"scales_{b}"),
            getattr(self, f"zeros_{b}", None),
            b,
            self.config.is_symmetric(b),
            self.config.scope,
            gs,
            self.k,
            self.dense,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with, as a dense ``(out_rows, k)`` float tensor.

        Raises:
            TypeError: ``dtype`` is not a floating dtype (the weight would be truncated to integers).
        """
        check_float_dtype(dtype, "dequantized_weight")
        # a fully pruned layer without bias holds no tensor at all: its weight is zeros on the CPU
        device = next(iter(self.state_dict().values()), torch.empty(0)).device
        parts = []
        for b in self.bit_groups:
            if 1 <= b <= 8:
                parts.append(self.packed_weight(b).dequantize(dtype))
            elif b in FLOAT_BITS:
                parts.append(getattr(self, f"fweight_{b}").to(dtype))
            else:  # pruned
                n = self.out_rows if not self.mixed else self._rows(b).numel()
                parts.append(torch.zeros(n, self.k, dtype=dtype, device=device))
        if not self.mixed:
            return parts[0]
        w = torch.zeros(self.out_rows, self.k, dtype=dtype, device=device)
        for b, p in zip(self.bit_groups, parts):
            w.index_copy_(0, self._rows(b), p)
        return w

    def _valid_prepared(self, b: int) -> tuple | None:
        """The cached preparation ``(b, key, qweight, scales, zeros, fn, fn.decode)`` of row group ``b`` while it
        is still valid: same stored tensors (identity) at the same in-place versions, same dispatch generation
        (nothing changed the kernel choice); else None."""
        cached = self.__dict__.get(_PREPARED)
        if cached is None or cached[0] != b:
            return None
        buf, names = self._buffers, _ROW_GROUP_NAMES[b]
        qw, sc, zr = cached[2:5]
        if buf.get(names[0]) is not qw or buf.get(names[1]) is not sc or buf.get(names[2]) is not zr:
            return None
        if cached[1] != (dispatch_generation(), tensor_version(qw), tensor_version(sc), tensor_version(zr)):
            return None
        return cached

    def _prepared(self, b: int, x2d: torch.Tensor):
        """The prepared matmul of row group ``b`` (:func:`medquant.kernels.prepare_packed_linear`), rebuilt when
        the kernel choice may have changed (dispatch generation) or the stored tensors changed (identity or
        in-place version): :meth:`_valid_prepared`."""
        cached = self._valid_prepared(b)
        if cached is not None:
            return cached[5]
        qw, sc, zr = (self._buffers.get(name) for name in _ROW_GROUP_NAMES[b])
        key = (dispatch_generation(), tensor_version(qw), tensor_version(sc), tensor_version(zr))
        fn = prepare_packed_linear(x2d, self.packed_weight(b))
        self.__dict__[_PREPARED] = (b, key, qw, sc, zr, fn, getattr(fn, "decode", None))
        return fn

    def _decode_lane(self, x: torch.Tensor):
        """The prepared matmul's decode lane (``fn.decode``: ``x (..., k) -> y (..., n)`` or None), where the layer
        was prepared before (the first eager call prepares it), this is eager CPU inference on ``x`` (with a feature
        dimension: a 0-d ``x`` goes to ``forward``'s own check) and the preparation is still valid
        (:meth:`_valid_prepared`); else None."""
        if self.mixed or not x.dim() or not eager_inference(x):
            return None
        cached = self._valid_prepared(self.bit_groups[0])
        return None if cached is None else cached[6]

    def bind_cpu_kernels(self) -> bool:
        """Let ``torch.compile`` trace this layer's CPU kernel call itself (medquant's native kernel by handle,
        ``medquant::gemv4_bound``, below the native kernel's switch; else e.g. aten's int4 weight-only matmul)
        instead of the opaque ``medquant::packed_linear`` op, for inference of a compiled model on CPU.

        The compiled graph then calls the kernel directly (no Python of this layer per step: a bound layer's
        compiled ``forward`` reads one attribute first, since the graph checks every attribute it read at every
        call), and it holds the bound weight as it is now: :meth:`load_state_dict`, ``.to()`` and copies drop the binding (the next
        compiled call traces again, through the custom op), but an in-place edit of the stored tensors
        (``layer.qweight_4.zero_()``) is not seen by a graph already compiled; call ``torch._dynamo.reset()``
        after such an edit. Layers with mixed bit-widths, float or pruned rows, on other devices, that no CPU
        kernel takes, or whose choice a registered kernel's input-dependent ``accepts`` may change
        (:func:`medquant.kernels.dispatch.prepare`) stay on the custom op. Used by
        :func:`medquant.quant.decode.static_decode_`.

        Returns:
            True when the layer is bound, False when it stays on the custom op.
        """
        self.__dict__.pop(_BOUND, None)
        self.__dict__.pop(_BOUND_LANE, None)
        b = self.bit_groups[0]
        if self.mixed or not 1 <= b <= 8:
            return False
        qw = self._buffers[f"qweight_{b}"]
        if qw.device.type != "cpu":
            return False
        w = self.packed_weight(b)
        probe = torch.zeros(1, self.k, dtype=self.weight_dtype if self.weight_dtype.is_floating_point
                            else torch.float32)
        if select_kernel("packed_linear", probe, w).backend != "cpu":
            return False
        fn = prepare_packed_linear(probe, w)
        if getattr(fn, "per_call_choice", False):  # a registered kernel's predicate may take some inputs: dispatch
            return False
        self.__dict__[_BOUND] = fn
        bind_traced = getattr(fn, "bind_traced", None)  # native row groups: the kernel called by handle
        if bind_traced is not None:
            self.__dict__[_BOUND_LANE] = bind_traced()
        return True

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d (M, k) @ W^T`` -> ``(M, out_rows)``: one :func:`medquant.kernels.packed_linear` per row group.

        Eager CPU inference on a layer with one packed bit-width runs its prepared matmul (:meth:`_prepared`):
        the same kernels and result without re-validating and re-dispatching at every call. Under
        ``torch.compile``, a layer bound with :meth:`bind_cpu_kernels` traces its kernel call directly
        (inference only: a call that needs a gradient goes through the custom op and its backward).

        A float64 ``x`` (which the packed kernels do not take) is multiplied with :meth:`dequantized_weight` in
        float64, as ``nn.Linear`` would: ``x2d @ W.double()^T``, at every call and whatever ran before."""
        if x2d.dtype == torch.float64:
            return x2d @ self.dequantized_weight(torch.float64).t()
        if torch.compiler.is_compiling():
            bound = self.__dict__.get(_BOUND)
            if bound is not None and x2d.device.type == "cpu" and not (x2d.requires_grad and torch.is_grad_enabled()):
                return bound(x2d)
        elif not self.mixed and 1 <= self.bit_groups[0] <= 8 and eager_inference(x2d) and x2d.is_floating_point():
            return self._prepared(self.bit_groups[0], x2d)(x2d)
        outs = []
        for b in self.bit_groups:
            if 1 <= b <= 8:
                outs.append(packed_linear(x2d, self.packed_weight(b)))
            elif b in FLOAT_BITS:
                outs.append(x2d @ getattr(self, f"fweight_{b}").to(x2d.dtype).t())
            else:
                n = self.out_rows if not self.mixed else self._rows(b).numel()
                outs.append(x2d.new_zeros(x2d.shape[0], n))
        if not self.mixed:
            return outs[0]
        y = x2d.new_zeros(x2d.shape[0], self.out_rows)
        for b, o in zip(self.bit_groups, outs):
            y = y.index_copy(1, self._rows(b), o)
        return y

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``layer.weight`` (its dtype, device or values).

        It is recomputed on each access; assigning to it is refused (re-quantize with ``from_float`` instead).
        """
        w = self.dequantized_weight(self.weight_dtype)
        return w if not isinstance(self, QuantConv2d) else w.reshape(
            self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def __setattr__(self, name, value) -> None:
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__}.weight is derived from packed integer codes and cannot be assigned; "
                f"build a new layer with {type(self).__name__}.from_float(float_layer, config)"
            )
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ accounting
    def row_bits(self) -> torch.Tensor:
        return self.config.row_bits(self.out_rows)

    @property
    def effective_bits(self) -> float:
        """Mean nominal bit-width of this layer's weights (every row has the same number of weights)."""
        return float(self.row_bits().float().mean())

    def stored_bytes(self) -> int:
        """Every stored byte: packed codes, scales, zeros, float rows, bit map, bias."""
        total = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        return int(total)

    def _bits_repr(self) -> str:
        if not self.mixed:
            return f"bits={self.bit_groups[0]}"
        rb = self.row_bits()
        return "bits={" + ", ".join(f"{b}: {int((rb == b).sum())} rows" for b in self.bit_groups) + "}"


class QuantLinear(_QuantWeightBase):
    """A Linear layer with packed low-bit weights. Build with :meth:`from_float`; go back with :meth:`to_float`.

    ``y = x W^T + b`` with ``W[n, j] = (u[n, j] - z) * s`` (codes ``u`` unpacked per row group of one bit-width,
    scale ``s`` and zero point ``z`` of the element's group). The constructor allocates an empty layer (the
    loaders fill it from a state dict). ``forward`` keeps the input's dtype: float16 / bfloat16 / float32 through
    the packed kernels, float64 as ``F.linear(x, W.double(), b)`` with ``W`` = :meth:`dequantized_weight`. An input
    on another device than the layer's tensors (a meta input to a CPU layer included) raises
    :class:`~medquant.kernels.DeviceMismatchError` (a ``RuntimeError``) before any kernel runs; meta inputs to a
    layer on the meta device give meta results (shape inference). The same holds for :class:`QuantConv2d` and
    :class:`QuantEmbedding`.

    Args:
        in_features: input features ``K``.
        out_features: output features (rows).
        bias: whether the layer has a (float) bias.
        config: the quantization of the weight (bits or per-row ``channel_bits``, scheme, scope, group size).
        device: where to allocate the buffers.
        dtype: dtype of the dequantized weight and of the bias.
        layout: 1 or 2 (see :meth:`from_float`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig,
                 device=None, dtype: torch.dtype = torch.float32, layout: int = 1) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_dtype = dtype
        self._init_storage(out_features, in_features, config, device, layout)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_float(cls, module: nn.Linear, config: QuantConfig, layout: int = FORMAT_VERSION) -> QuantLinear:
        """Quantize ``module`` with ``config``; ``layout`` 2 (default) stores 3/5/6/7-bit codes densely.

        Args:
            module: the float ``nn.Linear`` (not changed).
            config: the quantization.
            layout: 2 (default, :data:`FORMAT_VERSION`) stores 3/5/6/7-bit codes densely; 1 keeps the
                4/8-bit containers of format version 1.

        Returns:
            The new ``QuantLinear`` on the module's device, dequantizing to the module's dtype.

        Raises:
            TypeError: ``module`` is not an ``nn.Linear``, or is a subclass with its own ``forward`` (which the
                quantized layer, computing ``x W^T + b``, would silently drop; ``quantize_`` leaves those in float).
            ValueError: NaN / inf weights, a 16-bit row (stored in float16) with a weight past float16's range, or
                ``channel_bits`` of the wrong length.
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"QuantLinear.from_float expects nn.Linear, got {type(module).__name__}")
        _check_computes_as(module, nn.Linear, ("forward",), "QuantLinear")
        w = module.weight
        q = cls(module.in_features, module.out_features, module.bias is not None, config, w.device, w.dtype,
                layout)
        q._quantize_from(w.detach())
        if module.bias is not None:
            q.bias.data.copy_(module.bias.detach())
        _remember_float_class(q, module, nn.Linear)
        return q

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """The ``nn.Linear`` this layer computes with: dequantized weight, same bias.

        Args:
            dtype: dtype of the float layer; None is ``weight_dtype`` (the layer's, which follows ``.to(dtype)``).

        Returns:
            A new ``nn.Linear``; when the layer was quantized from a subclass of ``nn.Linear`` (``quantize_`` takes
            those that compute as ``nn.Linear``), an instance of that subclass with its plain attributes (in memory
            only: a layer read from a checkpoint gives ``nn.Linear``).
        """
        dtype = dtype or self.weight_dtype
        w = self.dequantized_weight(dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return _restore_float_class(self, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # a bound layer's native kernel by handle, with as few reads of this layer's state as can be: a
            # compiled graph checks (guards) every attribute it read, at every call
            lane = self.__dict__.get(_BOUND_LANE)
            y = None if lane is None else lane(x)
            if y is not None:
                return y if self.bias is None else y + self.bias.to(y.dtype)
        # eager CPU decode: the prepared kernel's decode lane, straight from x's own shape (a decode step calls
        # this hundreds of times per token, where each Python-level check and reshape costs about a microsecond)
        lane = self._decode_lane(x)
        if lane is not None:
            y = lane(x)
            if y is not None:
                return y if self.bias is None else y + self.bias.to(y.dtype)
        # every other call: the devices first (the two lanes above run only CPU inputs, on layers whose tensors
        # were prepared or bound on the CPU and are unchanged since, so they need no check of their own)
        self._check_device(x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            got = "a 0-d tensor (no feature dimension)" if x.dim() == 0 else f"{x.shape[-1]} features"
            raise ValueError(f"input has {got}, layer expects {self.in_features}")
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._bits_repr()}, scope={c.scope}" + (f"({c.group_size})" if c.scope == "group" else ""))


class QuantConv2d(_QuantWeightBase):
    """A Conv2d layer with packed low-bit weights, each output channel's kernel quantized as one matrix row.

    The weight ``(O, I/groups, kh, kw)`` is quantized as the matrix ``(O, I/groups*kh*kw)``. Forward dequantizes
    to the input's floating dtype and runs ``F.conv2d`` (the torch reference path); an integer or bool input is
    refused (``TypeError``), as ``nn.Conv2d`` refuses it. The constructor allocates an empty layer.

    Args:
        in_channels: input channels.
        out_channels: output channels (rows).
        kernel_size: ``kh`` or ``(kh, kw)``.
        stride: as ``nn.Conv2d``.
        padding: as ``nn.Conv2d`` (an int, a pair, or ``"same"`` / ``"valid"``; zero padding only).
        dilation: as ``nn.Conv2d``.
        groups: as ``nn.Conv2d``.
        bias: whether the layer has a bias.
        config: the quantization (required).
        device: where to allocate the buffers.
        dtype: dtype of the dequantized weight and of the bias.
        layout: 1 or 2 (see :meth:`QuantLinear.from_float`).

    Raises:
        ValueError: no ``config``, or a geometry ``nn.Conv2d`` refuses: ``groups`` not a positive integer dividing
            ``in_channels`` and ``out_channels``, a padding string other than ``"valid"`` / ``"same"``, or
            ``"same"`` with a stride other than 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, config: QuantConfig | None = None,
                 device=None, dtype: torch.dtype = torch.float32, layout: int = 1) -> None:
        super().__init__()
        if config is None:
            raise ValueError("QuantConv2d needs a QuantConfig")
        pair = nn.modules.utils._pair
        _check_conv_geometry(in_channels, out_channels, groups, padding, pair(stride))
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        k = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        self.weight_dtype = dtype
        self._init_storage(out_channels, k, config, device, layout)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_float(cls, module: nn.Conv2d, config: QuantConfig, layout: int = FORMAT_VERSION) -> QuantConv2d:
        """Quantize ``module`` with ``config`` (its weight viewed as ``(O, I/groups*kh*kw)``).

        Args:
            module: the float ``nn.Conv2d`` (not changed).
            config: the quantization.
            layout: 2 (default, :data:`FORMAT_VERSION`) stores 3/5/6/7-bit codes densely; 1 keeps the
                4/8-bit containers of format version 1.

        Returns:
            The new ``QuantConv2d``.

        Raises:
            TypeError: ``module`` is not an ``nn.Conv2d``, or is a subclass with its own ``forward`` or
                ``_conv_forward`` (e.g. a weight-standardized convolution), which the quantized layer, computing
                ``F.conv2d``, would silently drop (``quantize_`` leaves those in float).
            ValueError: a padding mode other than ``"zeros"``, NaN / inf weights, a 16-bit row (stored in
                float16) with a weight past float16's range, or ``channel_bits`` of the wrong length.
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_float expects nn.Conv2d, got {type(module).__name__}")
        _check_computes_as(module, nn.Conv2d, ("forward", "_conv_forward"), "QuantConv2d")
        if module.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got {module.padding_mode!r}")
        w = module.weight
        q = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, config, w.device, w.dtype, layout)
        q._quantize_from(w.detach().reshape(module.out_channels, -1))
        if module.bias is not None:
            q.bias.data.copy_(module.bias.detach())
        _remember_float_class(q, module, nn.Conv2d)
        return q

    def weight_4d(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight in the convolution's shape.

        Args:
            dtype: floating dtype of the result.

        Returns:
            ``(O, I/groups, kh, kw)`` weight.
        """
        return self.dequantized_weight(dtype).reshape(
            self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Conv2d:
        """The ``nn.Conv2d`` this layer computes with: dequantized weight, same bias and geometry.

        Args:
            dtype: dtype of the float layer; None is ``weight_dtype`` (the layer's, which follows ``.to(dtype)``).

        Returns:
            A new ``nn.Conv2d``; when the layer was quantized from a subclass of ``nn.Conv2d``, an instance of that
            subclass with its plain attributes.
        """
        dtype = dtype or self.weight_dtype
        w = self.weight_4d(dtype)
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return _restore_float_class(self, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_device(x)
        if not x.is_floating_point():  # the weight cast to an integer dtype would truncate to (mostly) zeros
            raise TypeError(f"QuantConv2d input must be floating point (float16, bfloat16, float32 or float64, as "
                            f"nn.Conv2d takes), got {x.dtype}")
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.conv2d(x, self.weight_4d(x.dtype), b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        c = self.config
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}"
                + (f", dilation={self.dilation}" if self.dilation != (1, 1) else "")
                + f", groups={self.groups}" + (", bias=False" if self.bias is None else "")
                + f", {self._bits_repr()}, scope={c.scope}" + (f"({c.group_size})" if c.scope == "group" else ""))


QUANT_MODULES = (QuantLinear, QuantConv2d)


class QuantEmbedding(_QuantWeightBase):
    """An embedding table with packed low-bit rows; ``forward(ids)`` dequantizes only the rows of ``ids``.

    ``e[i, j] = (u[i, j] - z) * s[i, j // group_elems]`` (``z = 2^(b-1)`` when symmetric), in ``weight_dtype``.
    One bit-width for all rows (per-row bit-widths are refused); storage as
    :class:`QuantLinear` with ``out_rows = num_embeddings`` and ``k = embedding_dim``, no bias.

    A tied output head (``lm_head.weight is embed_tokens.weight``) becomes a :class:`QuantLinear` holding the
    *same* buffer tensors (:func:`tie_quantized_head`): one packed copy in memory and in the file.

    Args:
        num_embeddings: rows of the table (vocabulary size).
        embedding_dim: features per row.
        config: one bit-width of 1..8 for every row, scheme, scope and group size.
        padding_idx: as ``nn.Embedding``: in ``[-num_embeddings, num_embeddings)``, a negative one counting from
            the end (stored as ``num_embeddings + padding_idx``); recorded and given back by :meth:`to_float`.
        device: where to allocate the buffers.
        dtype: dtype of the looked-up rows.
        layout: 1 or 2 (see :meth:`QuantLinear.from_float`).
        scale_grad_by_freq: as ``nn.Embedding`` (kept in memory and given back by :meth:`to_float`; a saved
            checkpoint does not record it).
        norm_type: as ``nn.Embedding`` (kept in memory and given back by :meth:`to_float`; not saved).

    Raises:
        TypeError: ``config`` is not a ``QuantConfig``.
        ValueError: ``channel_bits`` given, bits outside 1..8, or ``padding_idx`` out of range.
    """

    bias = None

    def __init__(self, num_embeddings: int, embedding_dim: int, config: QuantConfig, padding_idx: int | None = None,
                 device=None, dtype: torch.dtype = torch.float32, layout: int = 1, *,
                 scale_grad_by_freq: bool = False, norm_type: float = 2.0) -> None:
        super().__init__()
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a medquant.QuantConfig, got {type(config).__name__}")
        if config.channel_bits is not None or not 1 <= config.bits <= 8:
            raise ValueError("a quantized embedding takes one bit-width of 1..8 for every row (no channel_bits)")
        if padding_idx is not None:  # as nn.Embedding: checked, and a negative index counted from the end
            if isinstance(padding_idx, bool) or not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be an integer in [-{num_embeddings}, {num_embeddings}) for a table "
                                 f"of {num_embeddings} rows (as for nn.Embedding), got {padding_idx!r}")
            padding_idx = int(padding_idx) % num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.scale_grad_by_freq, self.norm_type = bool(scale_grad_by_freq), float(norm_type)  # for to_float
        self.weight_dtype = dtype
        self._init_storage(num_embeddings, embedding_dim, config, device, layout)

    @classmethod
    def from_float(cls, module: nn.Embedding, config: QuantConfig, layout: int = FORMAT_VERSION) -> QuantEmbedding:
        """Quantize an ``nn.Embedding`` (``max_norm`` and sparse gradients are refused: they change the table).

        Args:
            module: the float ``nn.Embedding`` (not changed).
            config: the quantization (one bit-width for all rows).
            layout: 2 (default, :data:`FORMAT_VERSION`) stores 3/5/6/7-bit codes densely; 1 keeps the
                4/8-bit containers of format version 1.

        Returns:
            The new ``QuantEmbedding``.

        Raises:
            TypeError: ``module`` is not an ``nn.Embedding``, or is a subclass with its own ``forward`` (e.g. Gemma 3's
                scaled word embedding, which multiplies every row by ``embed_scale``: a ``QuantEmbedding`` looks the
                rows up as ``nn.Embedding`` does and would silently drop that).
            ValueError: ``max_norm`` or ``sparse=True``, or a config the table cannot take.
        """
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"QuantEmbedding.from_float expects nn.Embedding, got {type(module).__name__}")
        if type(module).forward is not nn.Embedding.forward:
            raise TypeError(f"QuantEmbedding.from_float: {type(module).__name__} is a subclass of nn.Embedding "
                            "with its own forward (it may change the lookup, e.g. scale the rows), which a "
                            "QuantEmbedding would drop; only nn.Embedding and subclasses computing as it (no forward "
                            "of their own) are taken: leave it in floating point")
        if module.max_norm is not None or module.sparse:
            raise ValueError("QuantEmbedding cannot quantize an nn.Embedding with max_norm or sparse=True")
        w = module.weight
        q = cls(module.num_embeddings, module.embedding_dim, config, module.padding_idx, w.device, w.dtype, layout,
                scale_grad_by_freq=module.scale_grad_by_freq, norm_type=module.norm_type)
        q._quantize_from(w.detach())
        return q

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Embedding:
        """The ``nn.Embedding`` holding the dequantized table.

        Args:
            dtype: dtype of the table; None is ``weight_dtype``.

        Returns:
            A new trainable ``nn.Embedding`` with the same ``padding_idx``, ``scale_grad_by_freq`` and
            ``norm_type``.
        """
        dtype = dtype or self.weight_dtype
        w = self.dequantized_weight(dtype)
        return nn.Embedding.from_pretrained(w, freeze=False, padding_idx=self.padding_idx, norm_type=self.norm_type,
                                            scale_grad_by_freq=self.scale_grad_by_freq)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized rows ``ids`` (any shape of int32 / int64 indices) -> ``(*ids.shape, embedding_dim)``.

        Args:
            ids: int32 or int64 indices (the dtypes ``nn.Embedding`` takes) in ``[-num_embeddings, num_embeddings)``
                (negative ones count from the end).
            dtype: floating dtype of the result; None is ``weight_dtype``.

        Returns:
            ``(*ids.shape, embedding_dim)`` rows.

        Raises:
            TypeError: a non-floating ``dtype``; ``ids`` of another dtype (floating point, bool, uint8 and the
                other integer types, which ``nn.Embedding`` refuses as well), named in the message.
            IndexError: an index out of range (``RuntimeError`` with the same message when traced by
                ``torch.compile`` or ``torch.export``: the check is then an assert in the graph, run by the compiled
                code, since a traced tensor has no value to test in Python); not checked for meta ids.
            DeviceMismatchError: ``ids`` on another device than the table (a meta ``ids`` with a real table
                included): a ``RuntimeError`` naming both devices (:meth:`_check_device`).
        """
        if dtype is not None:
            check_float_dtype(dtype, "QuantEmbedding.lookup")
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"embedding indices must be torch.int32 or torch.int64 (as for nn.Embedding), got "
                            f"{ids.dtype}")
        self._check_device(ids)
        flat = ids.reshape(-1)
        message = f"embedding index out of range for {self.num_embeddings} rows"
        if torch.compiler.is_compiling():  # torch.compile / torch.export: int(tensor) cannot be traced
            torch._assert_async(((flat >= -self.num_embeddings) & (flat < self.num_embeddings)).all(), message)
        elif flat.numel() and not flat.is_meta and (  # meta ids (shape inference on a meta table) hold no values
                int(flat.min()) < -self.num_embeddings or int(flat.max()) >= self.num_embeddings):
            raise IndexError(message)
        flat = flat.remainder(self.num_embeddings)
        b = self.bit_groups[0]
        pw = self.packed_weight(b)
        scales = pw.scales if self.config.scope == "tensor" else pw.scales.index_select(0, flat)
        zeros = None if pw.zeros is None else (pw.zeros if self.config.scope == "tensor"
                                               else pw.zeros.index_select(0, flat))
        rows = PackedWeight(pw.qweight.index_select(0, flat), scales, zeros, b, pw.symmetric, pw.scope,
                            pw.group_elems, pw.k, pw.dense)
        return rows.dequantize(dtype or self.weight_dtype).reshape(*ids.shape, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)

    def extra_repr(self) -> str:
        c = self.config
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={c.bits}, scope={c.scope}"
                + (f"({c.group_size})" if c.scope == "group" else "")
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))


def _check_computes_as(module: nn.Module, base: type[nn.Module], methods: tuple[str, ...], quant: str) -> None:
    """Refuse a subclass of ``base`` that overrides one of ``methods``: the quantized layer computes as ``base``."""
    own = [m for m in methods if getattr(type(module), m, None) is not getattr(base, m)]
    if own:
        raise TypeError(f"{quant}.from_float: {type(module).__name__} is a subclass of {base.__name__} with its own "
                        f"{' / '.join(own)} (it may change what the layer computes), which a {quant} would drop; only "
                        f"{base.__name__} and subclasses computing as it are taken: leave it in floating point")


def _remember_float_class(q: nn.Module, module: nn.Module, base: type[nn.Module]) -> None:
    """Record on ``q`` the class of ``module`` when it is a subclass of ``base`` (``quantize_`` takes those that
    compute as ``base``), and its own public plain attributes, for ``to_float`` to give them back."""
    if type(module) is not base:
        q.float_class = type(module)
        q.float_attrs = {k: v for k, v in vars(module).items() if not k.startswith("_")}


def _restore_float_class(q: nn.Module, layer: nn.Module) -> nn.Module:
    """``layer`` (a new ``base`` layer) as an instance of the class ``q`` recorded, with its attributes."""
    cls = getattr(q, "float_class", None)
    if cls is not None and cls is not type(layer) and issubclass(cls, type(layer)):
        layer.__class__ = cls  # same forward, parameters weight / bias only: the layouts agree
        for k, v in getattr(q, "float_attrs", {}).items():
            layer.__dict__.setdefault(k, v)  # the float layer's own (shape, geometry) win
    return layer


# every layer that stores packed weights: the two matmul layers and the embedding table
QUANT_LAYERS = (*QUANT_MODULES, QuantEmbedding)


def tie_quantized_head(head: QuantLinear, embedding: QuantEmbedding) -> None:
    """Make ``head`` use ``embedding``'s packed tensors (the same tensor objects): a tied output head stored once.

    Needs the same shape, config and layout (``ValueError`` otherwise); ``head``'s own tensors are dropped.
    """
    if not isinstance(head, QuantLinear) or not isinstance(embedding, QuantEmbedding):
        raise TypeError("tie_quantized_head expects a QuantLinear head and a QuantEmbedding")
    if (head.out_features, head.in_features) != (embedding.num_embeddings, embedding.embedding_dim):
        raise ValueError(f"head ({head.out_features} x {head.in_features}) and embedding ({embedding.num_embeddings} "
                         f"x {embedding.embedding_dim}) differ in shape: they cannot share storage")
    if head.config != embedding.config or head.layout_version != embedding.layout_version or head.bias is not None:
        raise ValueError("a tied head shares the embedding's storage only with the same QuantConfig and layout and "
                         "no bias")
    for name, t in embedding._buffers.items():
        if name in head._buffers and t is not None:
            head._buffers[name] = t
    head._register_compute_dtype()


def tied_to(head: nn.Module, embedding: nn.Module) -> bool:
    """Whether a quantized head and a quantized embedding share their packed tensors."""
    if not isinstance(head, QuantLinear) or not isinstance(embedding, QuantEmbedding):
        return False
    b = embedding.bit_groups[0]
    return head.bit_groups == embedding.bit_groups and head.get_buffer(f"qweight_{b}") is embedding.get_buffer(
        f"qweight_{b}")


def tied_heads(model: nn.Module) -> dict[str, str]:
    """``{head name: embedding name}`` for every quantized head sharing a quantized embedding's packed tensors.

    Args:
        model: any module.

    Returns:
        The tied pairs, in ``named_modules`` order of the heads.
    """
    named = list(model.named_modules())
    embeddings = [(n, m) for n, m in named if isinstance(m, QuantEmbedding)]
    return {hn: en for hn, h in named if isinstance(h, QuantLinear) for en, e in embeddings if tied_to(h, e)}


def _device_buffer(bit_groups: list[int]) -> str | None:
    """The buffer whose device a layer checks inputs against: the first row group's codes or float rows."""
    for b in bit_groups:
        if 1 <= b <= 8:
            return f"qweight_{b}"
        if b in FLOAT_BITS:
            return f"fweight_{b}"
    return None


def _check_conv_geometry(in_channels, out_channels, groups, padding, stride: tuple) -> None:
    """Refuse what ``nn.Conv2d`` refuses of a layer's channels, groups and padding (a recipe read from a file
    builds the layer with the constructor: refused here, not at its first forward)."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    # fewer input channels than groups leaves no input per group: the empty-weight refusal of _init_storage says so
    if in_channels >= groups and (in_channels % groups or out_channels % groups):
        raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be divisible by "
                         f"groups ({groups}), as for nn.Conv2d")
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"padding string must be 'valid' or 'same' (or give ints), got {padding!r}")
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError(f"padding='same' is not supported for strided convolutions (stride {stride}), as for "
                             "nn.Conv2d")


def _check_layout(layout) -> None:
    if isinstance(layout, bool) or layout not in (1, 2):
        raise ValueError(f"layout must be 1 (3/5/6/7-bit codes in 4/8-bit containers) or 2 (dense), got {layout!r}")
