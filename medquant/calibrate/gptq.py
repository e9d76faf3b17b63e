"""GPTQ: post-training weight quantization that corrects each layer's rounding error with its input statistics.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh: "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022) quantizes a layer's weight ``W`` ``(N, K)`` column by column and spreads the
error of each column over the columns not yet quantized, minimising ``||X W^T - X W^^T||^2`` on calibration
inputs ``X`` ``(n, K)``. Per layer:

    H = 2 X^T X / n                                   (X: the layer's inputs, flattened over all leading dims)
    m = mean of H_jj over the live inputs (H_jj > 0)
    dead inputs (H_jj = 0):  H_jj = m, W[:, j] = 0
    H <- H + lambda I,   lambda = damp * m                       (damp = 0.01 by default)
    U = upper Cholesky factor of H^-1                   (H^-1 = U^T U)
    for each column j in order:
        q_j = Q(w_j)                                    (the layer's quantizer, column j's scale group)
        e_j = (w_j - q_j) / U_jj
        w_k <- w_k - e_j U_jk       for every later column k

A dead input's row and column of ``H`` are zero, so the value put on its diagonal changes no other column; taking
the dampening's mean over the live inputs only keeps the result independent of the scale of the inputs (``X -> c X``
changes no code), which a fixed 1 on the dead diagonal did not.

Padding: in a dict calibration batch with a 2-D ``attention_mask``, the rows of the padding positions (mask 0) are
not calibration data and are left out of ``X`` (and of ``n``) for every layer whose input is ``(batch, tokens, K)``
with the mask's shape, or those tokens flattened sample by sample (``(batch * tokens, K)``: an MoE block's shared
expert), or an MoE expert's routed tokens (layers of the vision tower or the projector excepted) - their values are not checked either
(a NaN there is no error); a right-padded batch of a causal language model gives the Hessians of its sequences run
unpadded (up to float rounding). In an encoder-decoder (:class:`~medquant.calibrate._forward.MaskSides`) the
encoder's layers take the ``attention_mask``, the decoder's (and ``lm_head``) the ``decoder_attention_mask`` (none:
every decoder row is data, as for a batch giving ``labels`` only), and a decoder layer whose input is the encoder's
output - the same tensor as the encoder module's output in the whole-model forward, as the decoder block's
``encoder_hidden_states`` argument block by block: cross-attention ``k`` / ``v`` - the ``attention_mask``.

The update is applied lazily: inside a block of ``block_size`` columns immediately, to the columns after the block
once per block (``W[:, after] -= E U[block, after]``), which gives the same result in far fewer operations.

Quantizer ``Q`` (the formulas of :func:`medquant.quant.core.compute_qparams` / :func:`~medquant.quant.core.quantize`,
so the codes, scales and zero points go into an ordinary :class:`~medquant.QuantLinear` and the packed layout is
unchanged): for group scope, the scale (and zero point) of each group of ``group_size`` input elements is computed
from the group's *current* (already error-updated) weights when its first column is reached (static groups: column
``j`` always belongs to group ``j // group_size``); channel and tensor scope compute their scales from the weights
(dead columns zeroed) before the loop. Rows are independent in GPTQ (``H`` is shared, the update acts within a
row), so a layer with per-row bit-widths (``channel_bits``) quantizes each row group with its own bit-width and
scheme; rows kept in float (16/32 bits) are copied, pruned rows (0 bits) store nothing.

Range search (``clip_search=True``): instead of the full range, each scale group (each row, for channel scope) takes
the shrunk range ``p * [min w, max w]`` (asymmetric) or ``p * max |w|`` (symmetric) with ``p`` the value among
``1, 0.99, ..., 0.21`` (``CLIP_GRID`` steps of ``1 / CLIP_GRID``, down to ``1 - CLIP_MAX_SHRINK``) that minimises
``sum |w - Q_p(w)|^2.4`` over the group's current weights (the GPTQ authors' grid and norm; the scale is rounded to
the storage dtype before the codes are chosen, so the stored parameters are the ones searched). A shrunk range clips
the few largest weights of a group and refines the step for all the others. Tensor scope keeps the full range.

Activation order (``act_order=True``): the columns are processed in the order of decreasing ``H_jj`` (the inputs
with the most energy first, dead inputs last); each column keeps its original scale group, whose parameters are
computed when the first of its columns is reached; the result is permuted back, so the saved layout is the same as
without it.

Convolutions: ``X`` is the im2col matrix of the layer's input (``F.unfold`` with the layer's kernel, stride,
padding and dilation, one row per output position), whose column order ``(c, kh, kw)`` matches the weight viewed
as ``(O, I/groups * kh * kw)``; a grouped or depthwise convolution has one Hessian per group of input channels,
used for the output rows of that group.

Group-balanced Hessian (``groups=`` labels on the calibration batches or their samples): ``H = sum_g w_g 2 X_g^T
X_g / n_g`` with ``sum_g w_g = 1`` (uniform by default), so that a minority group's inputs count as much as the
majority's in the objective; with equal group sizes and uniform weights it is the plain ``H``.

A Hessian that is not positive definite after dampening is retried with ten times the dampening (up to
``10^3 x damp``), then refused with an error naming the layer. With ``damp=0`` there is nothing to multiply: a
singular Hessian is refused at once, the error naming the layer and saying to use ``damp > 0``.

:func:`gptq_quantize_` runs the model on the calibration batches once per stage - a transformer block (the blocks
of :func:`medquant.models.block_stacks`), or a single layer outside the blocks - in forward order, so each stage's
Hessians are captured with the earlier stages already quantized (the usual GPTQ order); inside a stage the layers
see the float block. Before any change, one float forward of every batch counts each layer's calls per batch; a
stage's pass stops once its last layer has its input only when every batch calls each of its layers exactly once
(otherwise every call of every batch is collected). :func:`gptq_quantize_sequential` does the same block by
block through :func:`medquant.calibrate.quantize_sequential` (one float block on the compute device at a time); it
runs every calibration call of a block whole, so every call of every planned layer is collected whatever the
control flow (no count is needed: counting would itself run every call whole).
Block by block, the planned layers outside the blocks (a projector, ``lm_head``) are GPTQ-quantized one at a time
in call order on their inputs in the model's own forward with everything before them quantized, a layer feeding a
block group before that group is captured (the stage order of :func:`gptq_quantize_`).

A module bound under several names (one module object) is one layer: its Hessian collects its inputs from every
use and the quantized layer is bound under all of its names (as :func:`medquant.quantize_` does).
:func:`gptq_quantize_sequential` does so for the names inside one block and refuses, before any change, a planned
layer bound in several blocks (or in a block and outside the blocks), naming it: block by block, the later uses
run after it is quantized, so its Hessian could not hold them.

MoE experts stored as 3-D parameters (transformers 5) are calibrated per expert: the experts module is replaced by
an equivalent one with one float Linear per expert and projection, each called on the rows of the tokens routed to
its expert only, so ``H_e = 2 X_e^T X_e / n_e`` over the ``n_e`` routed calibration tokens (the padding positions
left out); an expert no calibration token reaches has no Hessian and is rounded to nearest.

Both paths are all or nothing: an error in a later stage or block (a Hessian that stays singular, NaN made inside
the model, an interrupt) puts the model back as it was - :func:`gptq_quantize_` the float layers of the earlier
stages, :func:`gptq_quantize_sequential` (through :func:`medquant.calibrate.quantize_sequential`) the float layers,
tensors and devices of the blocks already done - before it propagates. The new layers get the train / eval mode
their float layers had before the calibration run.

Each quantized layer records its calibration settings in a ``calibration`` attribute (method ``"gptq"``, calibration
batches and input rows, dampening requested and used, block size, activation order, seed);
:func:`calibration_records` collects them for :func:`medquant.save`'s ``extras``.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..kernels import tensor_version
from ..kernels.layout import FORMAT_VERSION, pack, padded_k
from ..models.blocks import block_stacks
from ..models.runner import eval_mode
from ..quant.api import names_by_module, resolve_configs, swap_module, swap_under_all_names
from ..quant.config import FLOAT_BITS, QuantConfig
from ..quant.core import QTensor, compute_qparams, scale_eps
from ..quant.experts import is_experts_module
from ..quant.modules import QUANT_MODULES, QuantConv2d, QuantLinear
from ._experts import ExpertRows, rtn_unrouted, unfold_experts, warn_unrouted
from ._forward import (
    BatchMasks,
    MaskSides,
    _integer,
    batch_masks,
    calibration_batches,
    call_encoder_states,
    check_seed,
    count_calls,
    describe_batch,
    row_mask,
    run_calibration_batch,
    short_names,
    unmasked_layers,
)
from .sequential import BlockInputs, OutsideLayer, quantize_sequential

__all__ = [
    "GPTQ_MAX_DAMP_TRIES",
    "HessianAccumulator",
    "calibration_records",
    "conv_patches",
    "gptq_quantize_",
    "gptq_quantize_layer",
    "gptq_quantize_sequential",
    "gptq_quantize_weight",
]

GPTQ_MAX_DAMP_TRIES = 4  # dampening damp, 10 damp, 100 damp, 1000 damp, then an error
CLIP_GRID = 100  # range search: shrink factors 1 - i / CLIP_GRID ...
CLIP_MAX_SHRINK = 0.8  # ... for i < CLIP_MAX_SHRINK * CLIP_GRID
CLIP_NORM = 2.4  # the error norm the range search minimises


# ---------------------------------------------------------------------------------------------- Hessians
def _same_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of ``padding='same'`` (the extra element goes right/bottom)."""
    out = []
    for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
        total = d * (k - 1)
        out += [total // 2, total - total // 2]
    return tuple(out)


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The im2col rows of ``conv``'s input ``x`` ``(B, C, H, W)``: ``(groups, B * L, C/groups * kh * kw)``.

    Row ``b * L + l`` of group ``g`` holds the input patch that output position ``l`` of sample ``b`` multiplies
    with the weights of group ``g``, in the order ``(c, kh, kw)`` of ``weight[o].flatten()``.
    """
    if conv.padding_mode != "zeros":
        raise ValueError(f"GPTQ supports padding_mode='zeros' only, got {conv.padding_mode!r}")
    if isinstance(conv.padding, str):
        if conv.padding == "same":
            x = F.pad(x, _same_padding(conv))
        pad: tuple[int, int] = (0, 0)
    else:
        pad = tuple(conv.padding)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)  # (B, C*k*k, L)
    b, ck, length = cols.shape
    g = conv.groups
    return cols.view(b, g, ck // g, length).permute(1, 0, 3, 2).reshape(g, b * length, ck // g)


class HessianAccumulator:
    """Accumulates ``S = sum_i x_i x_i^T`` over a layer's input rows (float64) and gives ``H = 2 S / n``.

    A Linear's rows are its inputs flattened over all leading dims; a Conv2d's are its im2col patches
    (:func:`conv_patches`), one ``S`` per group of input channels. ``add`` checks the input (shape, finite
    values) and raises ``ValueError`` naming the layer.

    Group-balanced Hessian: with group labels (one per call, or one per sample along the input's first dim), the
    sums are kept per group ``g`` and ``H = sum_g w_g 2 S_g / n_g`` with ``sum_g w_g = 1`` (``w_g`` uniform over
    the groups seen, or ``group_weights[g]`` normalised), so a minority group's inputs weigh as much as the
    majority's. With one group (or no labels) this is the plain ``2 S / n``.

    Args:
        module: the float ``nn.Linear`` or ``nn.Conv2d`` whose inputs are accumulated.
        name: the layer's name, used in error messages (default its class name).
        group_weights: ``w_g`` by group label (normalised over the groups seen); ``None`` is uniform.

    Raises:
        TypeError: ``module`` is neither ``nn.Linear`` nor ``nn.Conv2d``.
    """

    def __init__(self, module: nn.Module, name: str = "", group_weights: Mapping[Any, float] | None = None) -> None:
        if isinstance(module, nn.Conv2d):
            self.groups = module.groups
            self.k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            self.groups, self.k = 1, module.in_features
        else:
            raise TypeError(f"{name or type(module).__name__}: GPTQ quantizes nn.Linear and nn.Conv2d, got "
                            f"{type(module).__name__}")
        self.module = module
        self.name = name or type(module).__name__
        self.group_weights = dict(group_weights) if group_weights is not None else None
        self.sums: dict[Any, torch.Tensor] = {}
        self.counts: dict[Any, int] = {}
        self.calls = 0
        self.padding_rows = 0  # input rows left out by a row mask (padding positions), for the error of hessian()

    @property
    def rows(self) -> int:
        """Input rows accumulated (all groups)."""
        return sum(self.counts.values())

    def check(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` after checking its type, shape and values (a 3-D Conv2d input is made 4-D).

        Args:
            x: one input of the layer (``(..., K)`` for a Linear, ``(B, C, H, W)`` or ``(C, H, W)`` for a Conv2d).

        Returns:
            ``x``, 4-D for a convolution.

        Raises:
            TypeError: ``x`` is not a floating-point tensor.
            ValueError: its shape does not fit the layer, or it holds NaN / inf (the message names the layer).
        """
        x = self._check_shape(x)
        if not torch.isfinite(x).all():
            raise self._not_finite(x)
        return x

    def _check_shape(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` after checking its type and shape (not its values; see :meth:`check`)."""
        m = self.module
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"layer {self.name}: GPTQ expects a floating-point input tensor, got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if isinstance(m, nn.Conv2d):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            if x.dim() != 4 or x.shape[1] != m.in_channels:
                raise ValueError(f"layer {self.name}: calibration input has shape {tuple(x.shape)}, the "
                                 f"convolution expects (batch, {m.in_channels}, height, width)")
        elif x.dim() == 0 or x.shape[-1] != self.k:
            raise ValueError(f"layer {self.name}: calibration input has shape {tuple(x.shape)}, the layer expects "
                             f"{self.k} features in the last dimension")
        return x

    def _not_finite(self, x: torch.Tensor) -> ValueError:
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            return ValueError(f"layer {self.name}: calibration input holds {bad} NaN/inf values (call {self.calls})")
        return ValueError(f"layer {self.name}: calibration input too large (max |x| = {float(x.abs().max()):.3g}): "
                          f"its sums of squares overflow float32 (call {self.calls})")

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        """``X^T X`` of rows ``x2`` (float32), checked: a NaN / inf in column ``j`` of ``X`` (or a sum of squares
        that overflows) makes ``(X^T X)_jj`` non-finite, so the K diagonal entries check every input value."""
        p = x2.T @ x2
        if not bool(torch.isfinite(torch.diagonal(p)).all()):
            raise self._not_finite(x2)
        return p

    @torch.no_grad()
    def add(self, x: torch.Tensor, labels: Any = None, mask: torch.Tensor | None = None) -> None:
        """Add the rows of one input of the layer: ``S_g += X^T X``, ``n_g += rows``.

        ``x`` is checked as :meth:`check` checks it; a Linear's input values through the diagonal of each
        ``X^T X`` (a NaN or inf anywhere in column ``j`` makes ``(X^T X)_jj`` NaN or inf), without a pass over
        ``x`` of its own.

        Args:
            x: one input of the layer.
            labels: ``None``, one group label (an int or str) for the whole call, or a sequence / 1-D tensor of
                labels, one per sample along the input's first dimension.
            mask: Linear only: which rows are calibration data, a tensor of shape ``x.shape[:-1]`` (e.g. the
                ``(batch, tokens)`` attention mask of a padded batch); only the rows where it is non-zero are
                added (and counted). ``None``: every row.

        Raises:
            ValueError: per-sample labels whose count is not the input's first dimension, a ``mask`` whose shape
                is not ``x.shape[:-1]`` or given for a convolution (and the errors of :meth:`check`).
        """
        if isinstance(self.module, nn.Linear):
            products = self.products(x, labels, mask)
            self.add_products(products, _left_out(x, products) if mask is not None else 0)
            return
        if mask is not None:
            raise ValueError(f"layer {self.name}: a row mask is for nn.Linear inputs, not convolutions")
        x = self.check(x)
        for key, xs, _ in self._split(x, labels, None):
            self._add_conv_rows(key, xs)
        self.calls += 1

    def _split(self, x: torch.Tensor, labels: Any, mask: torch.Tensor | None
               ) -> list[tuple[Any, torch.Tensor, torch.Tensor | None]]:
        """``[(group label, rows of x, their mask)]`` of one call (one entry without per-sample labels)."""
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"layer {self.name}: a row mask of shape "
                                 f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__} "
                                 f"for an input of shape {tuple(x.shape)}; it must have the input's leading shape "
                                 f"{tuple(x.shape[:-1])}")
            mask = mask.to(x.device) != 0
        if isinstance(labels, torch.Tensor) and labels.dim() == 0:
            labels = labels.item()
        if labels is None or isinstance(labels, (int, str)):
            return [(labels, x, mask)]
        labs = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        if x.dim() < 2 or x.shape[0] != len(labs):
            raise ValueError(f"layer {self.name}: {len(labs)} per-sample group labels for an input of shape "
                             f"{tuple(x.shape)} (the batch must be its first dimension, or the rows the batch's "
                             "tokens flattened sample by sample; otherwise give one label per calibration batch)")
        out = []
        for key in dict.fromkeys(labs):
            idx = torch.tensor([i for i, v in enumerate(labs) if v == key], device=x.device)
            out.append((key, x.index_select(0, idx), mask.index_select(0, idx) if mask is not None else None))
        return out

    @torch.no_grad()
    def products(self, x: torch.Tensor, labels: Any = None, mask: torch.Tensor | None = None
                 ) -> list[tuple[Any, torch.Tensor, int]]:
        """The contributions ``[(group label, X_g^T X_g as float64, rows)]`` of one input, not yet added.

        For a Linear layer: :meth:`add_products` adds them; :meth:`add` is both.

        Layers that read the same input tensor (a transformer's q/k/v projections, gate/up) add the same products:
        the GPTQ runners compute them once per calibration call and add them to each layer's own float64 sums, so
        the Hessians are those of separate accumulation, bit for bit.

        Args:
            x: one input of the layer (checked as :meth:`add` checks it).
            labels: as :meth:`add`.
            mask: as :meth:`add` (the rows where it is zero are left out).

        Returns:
            One entry per group label of the call: its label, ``(X^T X).double()`` ``(1, K, K)`` (the product in
            float32, as :meth:`add` forms it) and its row count.

        Raises:
            TypeError: the layer is a convolution (its im2col sums are added chunk by chunk by :meth:`add`).
            ValueError: the errors of :meth:`add`.
        """
        if not isinstance(self.module, nn.Linear):
            raise TypeError(f"layer {self.name}: products() is for nn.Linear layers; use add() for convolutions")
        x = self._check_shape(x)
        out = []
        for key, xs, ms in self._split(x, labels, mask):
            x2 = xs.detach().reshape(-1, self.k)
            if ms is not None:
                x2 = x2[ms.reshape(-1)]
            x2 = x2.float()
            out.append((key, self._product(x2).double().unsqueeze(0), x2.shape[0]))
        return out

    def add_products(self, products: Sequence[tuple[Any, torch.Tensor, int]], padding_rows: int = 0) -> None:
        """Add the output of :meth:`products`: ``S_g += P_g``, ``n_g += rows``; counts one call.

        The products may come from this layer or from another layer with the same input features.

        Args:
            products: ``[(group label, (1, K, K) float64, rows)]``.
            padding_rows: the call's input rows that a row mask left out of ``products`` (counted for the error
                of :meth:`hessian` when no row at all is calibration data).
        """
        self.padding_rows += padding_rows
        for key, p, rows in products:
            if key not in self.sums:
                self.sums[key] = torch.zeros(self.groups, self.k, self.k, dtype=torch.float64, device=p.device)
                self.counts[key] = 0
            self.sums[key] += p
            self.counts[key] += rows
        self.calls += 1

    def _add_conv_rows(self, key: Any, x: torch.Tensor) -> None:
        m = self.module
        if key not in self.sums:
            self.sums[key] = torch.zeros(self.groups, self.k, self.k, dtype=torch.float64, device=x.device)
            self.counts[key] = 0
        acc = self.sums[key]
        # bounded im2col chunks: at most ~2^25 patch elements at a time
        per_sample = max(1, x[:1].numel() * m.kernel_size[0] * m.kernel_size[1] // max(1, m.stride[0] ** 2))
        step = max(1, (1 << 25) // per_sample)
        for i in range(0, x.shape[0], step):
            p = conv_patches(m, x[i:i + step].float())
            acc += torch.bmm(p.transpose(1, 2), p).double()
            self.counts[key] += p.shape[1]

    def weights(self) -> dict[Any, float]:
        """The weight ``w_g`` of each group seen (summing to 1).

        Returns:
            ``{label: w_g}``: uniform ``1 / G``, or ``group_weights`` normalised over the groups seen.

        Raises:
            ValueError: ``group_weights`` lacks a group that was seen, or its weights are negative, not finite or
                all zero.
        """
        keys = [k for k in self.sums if self.counts[k] > 0]
        if self.group_weights is None:
            return {k: 1.0 / len(keys) for k in keys}
        missing = [k for k in keys if k not in self.group_weights]
        if missing:
            raise ValueError(f"layer {self.name}: group_weights has no weight for the groups {missing[:3]}")
        raw = {k: float(self.group_weights[k]) for k in keys}
        total = sum(raw.values())
        if not all(v >= 0 and math.isfinite(v) for v in raw.values()) or not total > 0:
            raise ValueError(f"group_weights must be finite, >= 0 and not all 0, got {raw}")
        return {k: v / total for k, v in raw.items()}

    def hessian(self) -> torch.Tensor:
        """``H`` as ``(groups, K, K)`` float64 (``groups`` = 1 for a Linear; see the class docstring).

        Returns:
            ``2 S / n``, or the group-balanced ``sum_g w_g 2 S_g / n_g``, before dampening.

        Raises:
            ValueError: no input row was added (the forward never reached the layer, every call had 0 rows:
                empty calibration batches, or every row was a padding position left out by a row mask: the
                message says which), or invalid ``group_weights``.
        """
        if self.rows == 0 and self.padding_rows > 0:
            raise ValueError(f"layer {self.name} was called {self.calls} time(s) on the calibration batches but "
                             f"every one of its {self.padding_rows} input rows is a padding position (token mask 0: "
                             "the attention_mask, or in an encoder-decoder's decoder the decoder_attention_mask), "
                             "so none is calibration data; give batches whose mask marks at least one real token "
                             "(nonzero / True)")
        if self.rows == 0 and self.calls > 0:
            raise ValueError(f"layer {self.name} was called {self.calls} time(s) on the calibration batches but "
                             "received 0 input rows: the calibration batches are empty (no samples, or no tokens, "
                             "e.g. input_ids of shape (1, 0)); give batches with at least one sample and one token")
        if self.rows == 0:
            raise ValueError(f"layer {self.name} received no calibration inputs: the model's forward did not call "
                             "it on the calibration batches (skip it, or give batches that reach it; a VLM's vision "
                             "tower runs only on batches with images: skip=['@vision', '@projector'], or images "
                             "in the batches - --calib-images on the command line)")
        if len(self.sums) == 1:
            key = next(iter(self.sums))
            return 2.0 * self.sums[key] / self.counts[key]
        return sum(w * 2.0 * self.sums[k] / self.counts[k] for k, w in self.weights().items())


def _left_out(x: torch.Tensor, products: Sequence[tuple[Any, torch.Tensor, int]]) -> int:
    """The rows of the Linear input ``x`` (``x.numel() / K``) that a row mask left out of ``products``."""
    return x.numel() // max(1, x.shape[-1]) - sum(rows for _, _, rows in products)


class _SharedInputs:
    """The products of the last Linear input seen in one calibration call, reused by the next layers that read the
    same tensor (a transformer's q/k/v projections, gate/up): the same tensor object at the same in-place version,
    with the same group labels, row mask and feature count. Anything else (a convolution, an inference tensor
    without a version counter, another tensor) is accumulated on its own. :meth:`clear` at every calibration
    call."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.key: tuple = ()
        self.products: list[tuple[Any, torch.Tensor, int]] = []
        self.rows: tuple[Any, int, list[Any]] | None = None  # (labels, tokens, one label per token) of this call
        self.padding_rows = 0  # the rows the mask left out of products

    def clear(self) -> None:
        self.x, self.key, self.products, self.rows, self.padding_rows = None, (), [], None, 0

    def add(self, acc: HessianAccumulator, x: Any, labels: Any, mask: torch.Tensor | None = None,
            tokens: int | None = None) -> None:
        """Add ``x`` (one input of ``acc``'s layer) to ``acc``; ``mask``: the batch's token mask, applied where
        it fits the input (:func:`row_mask`); ``tokens``: the batch's token count (:meth:`per_token`)."""
        if not isinstance(acc.module, nn.Linear) or not isinstance(x, torch.Tensor):
            acc.add(x.detach() if isinstance(x, torch.Tensor) else x, labels)
            return
        labels = self.per_token(x, labels, tokens)
        # keyed by the batch's mask object (one per call): the rows it marks are a function of it and of x (a
        # flattened mask is a new view at every call of row_mask)
        key = (tensor_version(x), acc.k, id(labels), id(mask) if mask is not None else None)
        mask = row_mask(x, mask)
        if self.x is x and key[0] >= 0 and key == self.key:
            acc.add_products(self.products, self.padding_rows)
            return
        products = acc.products(x.detach(), labels, mask)
        padding = _left_out(x, products) if mask is not None else 0
        acc.add_products(products, padding)
        self.x, self.key, self.products, self.padding_rows = x, key, products, padding

    def per_token(self, x: torch.Tensor, labels: Any, tokens: int | None) -> Any:
        """Per-sample ``labels`` spread over the rows of ``x`` when ``x`` is ``(batch * sequence, K)``, the
        batch's ``tokens`` flattened sample by sample (an MoE block's shared expert): row ``i`` takes the label of
        sample ``i // sequence``; one list object for every layer of the call, so their products stay shared.
        Any other input keeps ``labels`` (one label per sample along its first dimension): a 2-D input with
        another row count, e.g. a vision tower's patches, is not assigned to samples from its count alone."""
        if tokens is None or x.dim() != 2 or x.shape[0] != tokens or labels is None or isinstance(labels, (int, str)) \
                or (isinstance(labels, torch.Tensor) and labels.dim() == 0):
            return labels
        if self.rows is None or self.rows[0] is not labels or self.rows[1] != tokens:
            labs = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
            if not labs or tokens <= len(labs) or tokens % len(labs):
                return labels
            per = tokens // len(labs)
            self.rows = (labels, tokens, [labs[i // per] for i in range(tokens)])
        return self.rows[2]


# ---------------------------------------------------------------------------------------------- one weight matrix
def _inverse_factor(h: torch.Tensor, damp: float, name: str, mean_diag: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (float64), ``lambda = d * mean_diag``, and the ``d``
    used (``damp``, retried x10)."""
    if not math.isfinite(mean_diag):
        raise ValueError(f"layer {name}: the Hessian holds NaN/inf values (calibration inputs too large?)")
    d = damp
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(GPTQ_MAX_DAMP_TRIES if damp > 0 else 1):  # 10 x 0 is 0: with damp=0 a retry cannot help
        hd = h + (d * mean_diag) * eye
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0 and torch.isfinite(u).all():
                return u, d
        d *= 10.0
    if damp == 0:
        raise ValueError(f"layer {name}: the Hessian is not positive definite (singular: its calibration inputs span "
                         "fewer dimensions than the layer has inputs, or too few input rows) and damp=0 adds no "
                         "dampening, so retrying with more cannot help: use damp > 0 (default 0.01)")
    raise ValueError(f"layer {name}: the Hessian is not positive definite even with dampening "
                     f"{d / 10:g} x mean(diag H over the live inputs) = {d / 10 * mean_diag:.3g} added to its diagonal "
                     f"({GPTQ_MAX_DAMP_TRIES} tries from damp={damp:g}); the calibration inputs are degenerate")


def _params(w: torch.Tensor, bits: int, sym: bool, scope: str, cfg: QuantConfig, search: bool = False
            ) -> tuple[torch.Tensor, ...]:
    """``compute_qparams`` of ``w`` as float32 ``(scale, zero)`` (zero 0 when symmetric); ``search`` (channel
    scope, ``w`` one group's columns): the range-searched parameters per row instead."""
    if search and scope == "channel" and not (sym and bits == 1):
        return _search_params(w.float(), bits, sym, cfg.torch_scale_dtype)
    s, z, _ = compute_qparams(w.float(), bits, sym, scope, cfg.group_size, cfg.torch_scale_dtype)
    s = s.float()
    return s, (z.float() if z is not None else torch.zeros_like(s))


def _search_params(w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w`` ``(n, m)`` (float32): the ``(scale, zero)`` ``(n, 1)`` of the shrunk range ``p * range``
    minimising ``sum |w - Q_p(w)|^CLIP_NORM``, ``p = 1 - i / CLIP_GRID`` (``i = 0`` first, so ties keep the full
    range). Scales are rounded to ``scale_dtype`` before the codes are chosen (``compute_qparams``' formulas)."""
    eps = scale_eps(scale_dtype)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        amax = w.abs().amax(1, keepdim=True)
    else:
        qmax = 2**bits - 1
        lo = w.amin(1, keepdim=True).clamp_max(0)
        hi = w.amax(1, keepdim=True).clamp_min(0)
    best_err = torch.full((w.shape[0], 1), math.inf, device=w.device)
    best_s = torch.zeros_like(best_err)
    best_z = torch.zeros_like(best_err)
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        p = 1 - i / CLIP_GRID
        if sym:
            s = (p * amax / qmax).clamp_min(eps).to(scale_dtype).float()
            z = torch.zeros_like(s)
            q = torch.round(w / s).clamp_(-qmax, qmax).mul_(s)
        else:
            s = (p * (hi - lo) / qmax).clamp_min(eps).to(scale_dtype).float()
            z = torch.clamp(torch.round(-p * lo / s), 0, qmax)
            q = torch.round(w / s).add_(z).clamp_(0, qmax).sub_(z).mul_(s)
        err = (q - w).abs_().pow_(CLIP_NORM).sum(1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _quantize_column(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, sym: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``u`` and dequantized values ``(u - z) * s`` of one column (``quantize``'s formulas; ``s``, ``z`` in
    ``w``'s dtype)."""
    if sym and bits == 1:
        u = (w >= 0).to(w.dtype)
        return u, (2 * u - 1) * s
    if sym:
        qmax = 2 ** (bits - 1) - 1
        v = torch.round(w / s).clamp_(-qmax, qmax)
        return v + 2 ** (bits - 1), v * s
    u = torch.round(w / s).add_(z).clamp_(0, 2**bits - 1)
    return u, (u - z) * s


def _gptq_rows(w: torch.Tensor, u: torch.Tensor, perm: torch.Tensor | None, cfg: QuantConfig, bits: int,
               fixed: tuple[torch.Tensor, torch.Tensor] | None, block_size: int, search: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The GPTQ loop on rows ``w`` ``(n, K)`` (working dtype, dead columns zeroed, columns in processing order).

    ``u``: upper Cholesky factor of the dampened inverse Hessian in processing order; ``perm[j]``: original column
    of processed column ``j`` (``None``: identity); ``fixed``: channel/tensor scope parameters computed before the
    loop; ``search``: range-searched group parameters. Returns codes ``(n, K)`` uint8 in *original* column order, scales and zero points per original group
    ``(n, n_groups)`` float32 (group scope; for other scopes ``fixed`` is returned), and the GPTQ objective
    ``sum_j ||e_j||^2 / 2``.
    """
    n, k = w.shape
    sym = cfg.is_symmetric(bits)
    group = cfg.scope == "group"
    gs = cfg.group_size
    n_groups = -(-k // gs)
    if group:
        scales = torch.zeros(n, n_groups, dtype=torch.float32, device=w.device)
        zeros = torch.zeros_like(scales)
        inv = torch.empty(k, dtype=torch.long, device=w.device)
        order = perm if perm is not None else torch.arange(k, device=w.device)
        inv[order] = torch.arange(k, device=w.device)
        orig = order.tolist()
    else:
        s_fix, z_fix = fixed
        s_fix = s_fix.expand(n, 1)[:, 0]
        z_fix = z_fix.expand(n, 1)[:, 0]
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    u = u.to(w.dtype)
    diag = torch.diagonal(u).tolist()
    w = w.clone()
    loss = 0.0
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # group -> (s, z) in the working dtype
    if not group:
        fixed_w = (s_fix.to(w.dtype), z_fix.to(w.dtype))
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        ub = u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        codes1 = torch.zeros_like(w1)
        for t in range(i2 - i1):
            j = i1 + t
            if group:
                g = orig[j] // gs
                if g not in cache:
                    pos = inv[g * gs:min((g + 1) * gs, k)]  # processing positions of the group's columns (>= j)
                    inside = pos < i2
                    cur = torch.empty(n, pos.numel(), dtype=w.dtype, device=w.device)
                    cur[:, inside] = w1[:, pos[inside] - i1]
                    if not bool(inside.all()):
                        out = pos[~inside]  # after the block: add the block's pending update
                        cur[:, ~inside] = w[:, out] - err[:, :t] @ u[i1:j][:, out]
                    scales[:, g], zeros[:, g] = (p[:, 0] for p in _params(cur, bits, sym, "channel", cfg, search))
                    cache[g] = (scales[:, g].to(w.dtype), zeros[:, g].to(w.dtype))
                s, z = cache[g]
            else:
                s, z = fixed_w
            col = w1[:, t]
            code, q = _quantize_column(col, s, z, bits, sym)
            codes1[:, t] = code
            e = (col - q) / diag[j]
            if t + 1 < i2 - i1:
                w1[:, t + 1:].addr_(e, ub[t, t + 1:], alpha=-1)
            err[:, t] = e
        codes[:, i1:i2] = codes1.to(torch.uint8)
        loss += float(err.pow(2).sum()) / 2
        w[:, i2:] -= err @ u[i1:i2, i2:]
    if perm is not None:
        out_codes = torch.empty_like(codes)
        out_codes[:, perm] = codes
        codes = out_codes
    if group:
        return codes, scales, zeros, loss
    return codes, fixed[0], fixed[1], loss


@dataclass
class _Prepared:
    """A Hessian made ready for the loop: factor ``U`` in processing order, the order, dead columns, damp."""

    u: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    damp: float


def _prepare(h: torch.Tensor, damp: float, act_order: bool, name: str) -> _Prepared:
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"layer {name}: the Hessian must be a square (K, K) matrix, got {tuple(h.shape)}")
    if not damp >= 0 or not math.isfinite(damp):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    h = h.double().clone()
    if not torch.isfinite(h).all():
        raise ValueError(f"layer {name}: the Hessian holds NaN/inf values (calibration inputs too large?)")
    diag = torch.diagonal(h)
    dead = diag == 0
    # the mean of the live diagonal sets the dampening and fills the dead entries: a dead input's row and column of
    # H are zero, so the value on its diagonal changes no other column, but counted in the mean (as a constant 1)
    # it made the dampening depend on the scale of the inputs
    mean_diag = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    perm = None
    if act_order:  # by decreasing H_jj before the dead entries are filled: dead inputs come last
        perm = torch.argsort(diag, descending=True, stable=True)
    diag[dead] = mean_diag
    if perm is not None:
        h = h[perm][:, perm]
    u, used = _inverse_factor(h, damp, name, mean_diag)
    return _Prepared(u, perm, dead, used)


def gptq_quantize_weight(w: torch.Tensor, h: torch.Tensor, config: QuantConfig, *, bits: int | None = None,
                         damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                         dtype: torch.dtype = torch.float32, name: str = "weight", clip_search: bool = False
                         ) -> tuple[QTensor, dict[str, Any]]:
    """GPTQ of one weight matrix ``w`` ``(N, K)`` whose rows all have the same bit-width.

    Args:
        w: ``(N, K)`` float weight.
        h: ``(K, K)`` Hessian ``2 X^T X / n`` before dampening.
        config: scheme, scope, group size and scale dtype.
        bits: 1..8; ``None`` uses ``config.bits`` (refused for a config with ``channel_bits``).
        damp: dampening ``lambda = damp * mean(H_jj over the live inputs, H_jj > 0)`` (retried x10 while ``H`` is
            not positive definite; ``damp=0`` is not retried); dead inputs (``H_jj = 0``) get ``W[:, j] = 0``.
        block_size: columns per lazy update block.
        act_order: process columns by decreasing ``H_jj``.
        dtype: working precision of the weights and of ``U`` (the Hessian, its dampening and its factorisation
            are float64).
        name: the layer's name in error messages.
        clip_search: search each group's range (``p * range`` minimising ``sum |w - Q(w)|^2.4``; see the module
            docstring) instead of using the full range.

    Returns:
        ``(q, info)``: the :class:`~medquant.quant.core.QTensor` (codes, scales, zeros, padded as
        :func:`medquant.quant.core.quantize` pads them) and ``{"damp", "dead", "loss"}``: the dampening used, the
        number of dead inputs and the GPTQ objective ``sum_j ||e_j||^2 / 2``.

    Raises:
        ValueError: ``bits`` outside 1..8, ``bits=None`` with a config giving per-row bit-widths
            (``channel_bits``), shapes that do not match, or a Hessian that stays singular (with ``damp=0``: the
            message says to use ``damp > 0``).
    """
    if bits is None and config.channel_bits is not None:
        raise ValueError(f"layer {name}: the config gives per-row bit-widths (channel_bits), but "
                         "gptq_quantize_weight quantizes rows of one bit-width: pass bits= for these rows, or "
                         "quantize the whole layer with gptq_quantize_layer (each row group at its own width)")
    b = config.bits if bits is None else bits
    if not 1 <= b <= 8:
        raise ValueError(f"gptq_quantize_weight needs 1..8 bits, got {b}")
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"layer {name}: weight {tuple(w.shape)} and Hessian {tuple(h.shape)} do not match "
                         "(expected (N, K) and (K, K))")
    damp, block_size = _python_number(damp), _python_number(block_size)
    prep = _prepare(h.to(w.device), damp, act_order, name)
    q, loss = _quantize_rows(w, prep, config, b, None, block_size, dtype, name, clip_search)
    return q, {"damp": prep.damp, "dead": int(prep.dead.sum()), "loss": loss}


def _quantize_rows(w: torch.Tensor, prep: _Prepared, cfg: QuantConfig, bits: int,
                   tensor_params: tuple[torch.Tensor, torch.Tensor] | None, block_size: int, dtype: torch.dtype,
                   name: str, search: bool = False) -> tuple[QTensor, float]:
    if not torch.isfinite(w).all():
        raise ValueError(f"layer {name}: weights contain NaN/inf values; quantization needs finite weights")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    sym = cfg.is_symmetric(bits)
    n, k = w.shape
    wd = w.detach().to(dtype).clone()
    wd[:, prep.dead] = 0
    fixed = None
    if cfg.scope == "channel":
        fixed = _params(wd, bits, sym, "channel", cfg, search)
    elif cfg.scope == "tensor":
        fixed = tensor_params if tensor_params is not None else _params(wd, bits, sym, "tensor", cfg)
    if prep.perm is not None:
        wd = wd[:, prep.perm]
    codes, s, z, loss = _gptq_rows(wd, prep.u, prep.perm, cfg, bits, fixed, block_size, search)
    # the layout: K padded, padded codes 0, padded groups with the parameters quantize gives an all-zero group
    gs = cfg.group_size if cfg.scope == "group" else None
    kp = padded_k(k, bits, gs)
    codes = F.pad(codes, (0, kp - k))
    sd = cfg.torch_scale_dtype
    if cfg.scope == "group":
        s_full, z_full, elems = compute_qparams(torch.zeros(n, k, device=w.device), bits, sym, "group",
                                                cfg.group_size, sd)
        s_full = s_full.clone()
        s_full[:, :s.shape[1]] = s.to(sd)
        if z_full is not None:
            z_full = z_full.clone()
            z_full[:, :z.shape[1]] = z.to(sd)
    else:
        s_full, z_full = s.to(sd), (z.to(sd) if not sym else None)
        elems = kp
    return QTensor(codes, s_full, z_full, bits, sym, cfg.scope, elems, k), loss


def gptq_quantize_layer(module: nn.Module, hessian: torch.Tensor, config: QuantConfig, *, damp: float = 0.01,
                        block_size: int = 128, act_order: bool = False, name: str | None = None,
                        dtype: torch.dtype = torch.float32, clip_search: bool = False) -> nn.Module:
    """The GPTQ-quantized :class:`~medquant.QuantLinear` / :class:`~medquant.QuantConv2d` of a float layer.

    ``hessian``: ``(K, K)`` or ``(groups, K, K)`` (one per group of input channels of a grouped convolution), as
    :meth:`HessianAccumulator.hessian` gives it. Row groups of ``config.row_bits`` with 1..8 bits are quantized by
    GPTQ at their own bit-width; 16/32-bit rows are stored in float, 0-bit rows are pruned. The layer's
    ``calibration`` attribute receives ``{"method": "gptq", "damp": requested, "damp_used": the largest used,
    "block_size", "act_order", "clip_search", "dead_inputs", "loss"}``.

    Args:
        module: the float ``nn.Linear`` / ``nn.Conv2d``.
        hessian: ``(K, K)`` or ``(groups, K, K)``.
        config: the layer's config (``channel_bits`` allowed).
        damp: relative dampening ``damp * mean(H_jj over the live inputs, H_jj > 0)``.
        block_size: columns per lazy update block.
        act_order: process columns by decreasing ``H_jj``.
        name: the layer's name in error messages (default its class name).
        dtype: working precision of the weight updates.
        clip_search: range-searched scales (see the module docstring).

    Returns:
        The new quantized layer (``module`` is not changed).

    Raises:
        TypeError: ``config`` is not a ``QuantConfig``.
        ValueError: shapes that do not match or a Hessian that stays singular; the message starts with
            ``layer <name>``.
    """
    return _quantize_layer(module, hessian, config, damp, block_size, act_order, name, dtype, None, clip_search)


class _Factors:
    """The prepared Hessians (dampened inverse factor, order, dead inputs) of the last layer quantized, reused by
    the next layer when its Hessian is the same tensor value (layers that shared their inputs: q/k/v, gate/up) and
    the dampening and order are the same - the factorisation is deterministic, so the result is unchanged."""

    def __init__(self) -> None:
        self.key: tuple = ()
        self.h: torch.Tensor | None = None
        self.preps: list[_Prepared] = []

    def get(self, h: torch.Tensor, damp: float, act_order: bool) -> list[_Prepared] | None:
        key = (damp, act_order, h.shape, h.dtype, h.device)
        if self.h is not None and key == self.key and torch.equal(h, self.h):
            return self.preps
        return None

    def put(self, h: torch.Tensor, damp: float, act_order: bool, preps: list[_Prepared]) -> None:
        self.key, self.h, self.preps = (damp, act_order, h.shape, h.dtype, h.device), h, preps


def _python_number(v: Any) -> Any:
    """``v`` as a Python ``int`` / ``float`` when it is an integer / real number of another type (NumPy's); any
    other value (a ``bool``, a Python number, not a number) unchanged, for the argument checks to judge."""
    if isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _quantize_layer(module: nn.Module, hessian: torch.Tensor, config: QuantConfig, damp: float, block_size: int,
                    act_order: bool, name: str | None, dtype: torch.dtype, factors: _Factors | None,
                    clip_search: bool = False) -> nn.Module:
    name = name or type(module).__name__
    damp, block_size = _python_number(damp), _python_number(block_size)  # the record holds them
    if not isinstance(config, QuantConfig):
        raise TypeError(f"layer {name}: config must be a QuantConfig, got {type(config).__name__}")
    try:
        return _gptq_layer(module, hessian, config, damp, block_size, act_order, name, dtype, factors, clip_search)
    except ValueError as e:
        if str(e).startswith("layer "):
            raise
        raise ValueError(f"layer {name}: {e}") from None


def _gptq_layer(module: nn.Module, hessian: torch.Tensor, config: QuantConfig, damp: float, block_size: int,
                act_order: bool, name: str, dtype: torch.dtype, factors: _Factors | None = None,
                clip_search: bool = False) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ValueError(f"layer {name}: GPTQ supports padding_mode='zeros' only, got {module.padding_mode!r}")
        groups, n_out = module.groups, module.out_channels
        w2 = module.weight.detach().reshape(n_out, -1)
        q = QuantConv2d(module.in_channels, n_out, module.kernel_size, module.stride, module.padding,
                        module.dilation, groups, module.bias is not None, config, module.weight.device,
                        module.weight.dtype)
    elif isinstance(module, nn.Linear):
        groups, n_out = 1, module.out_features
        w2 = module.weight.detach()
        q = QuantLinear(module.in_features, n_out, module.bias is not None, config, module.weight.device,
                        module.weight.dtype)
    else:
        raise TypeError(f"layer {name}: GPTQ quantizes nn.Linear and nn.Conv2d, got {type(module).__name__}")
    k = w2.shape[1]
    h = hessian if hessian.dim() == 3 else hessian.unsqueeze(0)
    if tuple(h.shape) != (groups, k, k):
        raise ValueError(f"layer {name}: Hessian of shape {tuple(hessian.shape)}, expected {(groups, k, k)}")
    preps = factors.get(h, damp, act_order) if factors is not None else None
    if preps is None:
        preps = [_prepare(h[g].to(w2.device), damp, act_order, f"{name} (group {g})" if groups > 1 else name)
                 for g in range(groups)]
        if factors is not None:
            factors.put(h, damp, act_order, preps)
    row_bits = config.row_bits(n_out).to(w2.device)
    conv_group = torch.arange(n_out, device=w2.device) // (n_out // groups)
    loss = 0.0
    with torch.no_grad():
        for b in sorted(int(x) for x in torch.unique(row_bits).tolist()):
            rows = torch.nonzero(row_bits == b).flatten()
            if b in FLOAT_BITS:
                q.get_buffer(f"fweight_{b}").copy_(w2[rows])
                continue
            if not 1 <= b <= 8:
                continue  # pruned rows store nothing
            sub = w2[rows]
            sym = config.is_symmetric(b)
            tensor_params = None
            if config.scope == "tensor":  # one scale for all rows of this bit-width, dead columns zeroed per group
                wz = sub.float().clone()
                for g in range(groups):
                    sel = conv_group[rows] == g
                    wz[sel] = wz[sel] * (~preps[g].dead).float()
                tensor_params = _params(wz, b, sym, "tensor", config)
            parts = []
            for g in range(groups):
                sel = torch.nonzero(conv_group[rows] == g).flatten()
                if sel.numel() == 0:
                    continue
                qt, lg = _quantize_rows(sub[sel], preps[g], config, b, tensor_params, block_size, dtype, name,
                                        clip_search)
                loss += lg
                parts.append((sel, qt))
            codes = torch.cat([p[1].codes for p in parts])
            order = torch.cat([p[0] for p in parts])
            back = torch.empty_like(order)
            back[order] = torch.arange(order.numel(), device=order.device)
            q.get_buffer(f"qweight_{b}").copy_(pack(codes[back], b))
            if config.scope == "tensor":
                q.get_buffer(f"scales_{b}").copy_(parts[0][1].scales)
                if not sym:
                    q.get_buffer(f"zeros_{b}").copy_(parts[0][1].zeros)
            else:
                q.get_buffer(f"scales_{b}").copy_(torch.cat([p[1].scales for p in parts])[back])
                if not sym:
                    q.get_buffer(f"zeros_{b}").copy_(torch.cat([p[1].zeros for p in parts])[back])
        if module.bias is not None:
            q.bias.copy_(module.bias.detach())
    q.to_layout(FORMAT_VERSION)  # packed as version 1 above: 3/5/6/7-bit rows dense, as from_float stores them
    q.train(module.training)
    q.calibration = {"method": "gptq", "damp": damp, "damp_used": max(p.damp for p in preps),
                     "block_size": block_size, "act_order": act_order, "clip_search": clip_search,
                     "dead_inputs": int(sum(int(p.dead.sum()) for p in preps)), "loss": loss}
    return q


# ---------------------------------------------------------------------------------------------- whole model
class _Stop(Exception):
    pass


def _check_args(damp: float, block_size: int, max_samples: int | None, max_hessian_bytes: int | None = None
                ) -> tuple[float, int, int | None, int | None]:
    """The arguments checked, as Python numbers: integers of any integer type (NumPy's too) as ``int``, a real
    ``damp`` of another type (a NumPy float) as ``float`` (``bool`` refused everywhere); the records hold them."""
    if max_hessian_bytes is not None and not (_integer(max_hessian_bytes) or 0) >= 1:
        raise ValueError(f"max_hessian_bytes must be a positive integer or None, got {max_hessian_bytes!r}")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not damp >= 0 or not math.isfinite(damp):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if not (_integer(block_size) or 0) >= 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if max_samples is not None and not (_integer(max_samples) or 0) >= 1:
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    return (damp if isinstance(damp, (int, float)) else float(damp), int(block_size),
            None if max_samples is None else int(max_samples),
            None if max_hessian_bytes is None else int(max_hessian_bytes))


def _select(batches: list, max_samples: int | None, seed: int) -> list[int]:
    """Indices of ``max_samples`` of the batches drawn without replacement by a generator seeded ``seed``, in
    their order (all of them when there are no more)."""
    if max_samples is None or len(batches) <= max_samples:
        return list(range(len(batches)))
    idx = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed))[:max_samples]
    return sorted(idx.tolist())


def _group_labels(groups: Sequence[Any] | None, n_batches: int) -> list[Any] | None:
    if groups is None:
        return None
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence | torch.Tensor):
        raise TypeError("groups must be a sequence with one entry per calibration batch (a label, or the labels "
                        f"of the batch's samples), got {type(groups).__name__}")
    labels = list(groups)
    if len(labels) != n_batches:
        raise ValueError(f"groups has {len(labels)} entries for {n_batches} calibration batches; give one per batch")
    return [_batch_label(v, i) for i, v in enumerate(labels)]


def _batch_label(v: Any, i: int) -> Any:
    """Entry ``i`` of ``groups``: a label for the whole batch as a Python ``int`` (any integer type: a NumPy
    integer, a 0-d array or tensor holding one) or ``str`` (``None`` and ``bool`` kept), or a sequence / 1-D
    tensor of per-sample labels (kept).

    Raises:
        ValueError: any other single value (a float label), naming the entry.
    """
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # NumPy scalars, 0-d arrays and tensors
        v = v.item()
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, Iterable) and not isinstance(v, bytes):
        return v
    raise ValueError(f"groups[{i}] is {v!r} ({type(v).__name__}): a group label is an int or a str (one for the "
                     "whole batch), or a sequence / 1-D tensor of them (one per sample)")


def _group_record(accs: Mapping[str, HessianAccumulator], name: str) -> dict[str, Any]:
    w = accs[name].weights()
    return {"group_balanced": True, "group_weights": {str(k): v for k, v in w.items()},
            "group_rows": {str(k): accs[name].counts[k] for k in w}}


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _check_batches(batches: Sequence[Any], layers: str = "") -> None:
    """Every calibration batch of the same kind as the first (a dict with the same keys, a tuple/list of the same
    length, or a tensor) and its floating-point tensors finite; errors name the batch (and the key)."""
    first = describe_batch(batches[0])
    for i, b in enumerate(batches):
        if not isinstance(b, (Mapping, tuple, list, torch.Tensor)):
            raise TypeError(f"calibration batch {i} is {describe_batch(b)}; a batch is a dict of keyword inputs, a tuple "
                            "of positional inputs or one tensor")
        if describe_batch(b) != first and not (isinstance(b, torch.Tensor) and isinstance(batches[0], torch.Tensor)):
            raise ValueError(f"calibration batch {i} is {describe_batch(b)} but batch 0 is {first}: give every batch "
                             "the same inputs")
        items = b.items() if isinstance(b, Mapping) else enumerate(b) if isinstance(b, (tuple, list)) else [(None, b)]
        for key, v in items:
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
                where = "" if key is None else f" [{key!r}]"
                ctx = f" (the calibration of layer {layers} needs finite inputs)" if layers else ""
                raise ValueError(f"calibration batch {i}{where} holds {int((~torch.isfinite(v)).sum())} NaN/inf "
                                 f"values{ctx}")


class _Swaps:
    """The swaps done so far, undone when a later stage fails, so that an error leaves the model as it was (as
    :func:`medquant.quantize_` does). A module bound under several names is swapped under all of them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.done: list[tuple[str, nn.Module]] = []
        self.bound = model.__dict__.get("save_pretrained", _Swaps)  # set by the on_quantized hook (transformers)
        self.modes = {id(m): m.training for m in model.modules()}  # before eval_mode: the new layers get these

    def swap(self, aliases: Mapping[int, list[str]], name: str, new: nn.Module) -> None:
        # swap_module gives the quantized module the float one's hooks (the user's hooks run around it too)
        self.done += swap_under_all_names(self.model, name, new, aliases)

    def set_modes(self) -> None:
        """Give each new layer the train / eval mode its float layer had before the calibration run."""
        for alias, old in reversed(self.done):  # an unfolded MoE experts module (swapped before its layers) last
            self.model.get_submodule(alias).train(self.modes.get(id(old), old.training))

    def undo(self) -> None:
        for alias, old in reversed(self.done):
            swap_module(self.model, alias, old)
        self.done.clear()
        if self.bound is _Swaps:
            self.model.__dict__.pop("save_pretrained", None)
        else:
            self.model.__dict__["save_pretrained"] = self.bound


def _run_batch(model: nn.Module, batch: Any, i: int, what: str) -> None:
    run_calibration_batch(model, batch, i, what, passthrough=(_Stop,))


def _call_order(model: nn.Module, names: Sequence[str], batches: Sequence[Any], unmasked: Collection[str] = (),
                experts: ExpertRows | None = None, sides: MaskSides | None = None
                ) -> tuple[list[str], dict[str, list[int]]]:
    """Planned layers in the order the calibration batches first call them (batch 0's order, then the layers first
    called by a later batch, then those never called), and each layer's call count per batch (one float forward of
    every batch: a stage's capture may stop at its last layer only when every batch calls each of its layers exactly
    once - with data-dependent control flow a later batch may call a layer more often than batch 0); each input is
    checked (shape, finite values) as its Hessian will use it: the padding rows of a dict batch with an
    ``attention_mask`` (for the layers not in ``unmasked``) are no calibration data, so their values are not
    checked (an expert layer's rows are those of the tokens routed to it: ``experts``)."""
    checks = {n: HessianAccumulator(model.get_submodule(n), n) for n in names}
    masks = [batch_masks(b) for b in batches]
    sides = MaskSides(model) if sides is None else sides

    def check(n: str, args: tuple, kwargs: dict, i: int, calls: int) -> None:
        x = _input_of(args, kwargs)
        mask = None if n in unmasked else sides.mask(n, x, masks[i], states)
        if experts is not None and n in experts:
            rows = experts.map(n, None, mask)[1]
        else:
            rows = row_mask(x, mask) if isinstance(x, torch.Tensor) else None
        checks[n].calls = calls  # the call its errors name, counted over the batches as add counts
        if rows is None:
            checks[n].check(x)
        else:
            checks[n].check(checks[n]._check_shape(x)[rows.to(x.device)])

    with experts.tracking() if experts is not None else contextlib.nullcontext(), sides.tracking(model) as states:
        order, counts = count_calls(model, names, batches, on_call=check)
    return order + [n for n in names if not any(counts[n])], counts


def _stages(model: nn.Module, ordered: Sequence[str]) -> list[list[str]]:
    """Consecutive stages: the planned layers of one transformer block together, any other layer alone."""
    blocks = [b for stack in block_stacks(model) for b in stack]
    stages: dict[str, list[str]] = {}
    for n in ordered:
        key = next((b for b in blocks if n.startswith(b + ".")), n)
        stages.setdefault(key, []).append(n)
    return list(stages.values())


def _add(acc: HessianAccumulator, name: str, x: Any, labels: Any, mask: torch.Tensor | None, shared: _SharedInputs,
         experts: ExpertRows | None, tokens: int | None = None) -> None:
    """Add one input of layer ``name`` to its Hessian; an expert layer's rows get their tokens' mask (a ``(rows,)``
    mask, which :func:`row_mask` applies) and labels; ``tokens``: the batch's token count (:func:`_batch_tokens`;
    ``None`` for the layers that read image patches)."""
    if experts is not None and name in experts:
        labels, mask = experts.map(name, labels, mask)
        tokens = None
    shared.add(acc, x, labels, mask, tokens)


@dataclass(frozen=True)
class _Tokens:
    """The token counts (``batch * sequence``) of one calibration batch by side (``None``: not known).

    Attributes:
        encoder: the count of a decoder-only model's tokens, or of an encoder-decoder's encoder.
        decoder: the count of an encoder-decoder's decoder tokens.
    """

    encoder: int | None = None
    decoder: int | None = None


def _side_of(sides: MaskSides, name: str, x: Any, states: Sequence[torch.Tensor], masks: BatchMasks,
             tokens: _Tokens) -> tuple[torch.Tensor | None, int | None]:
    """The token mask and token count of layer ``name``'s input ``x``: the encoder's where ``x``'s rows are on the
    encoder's side (:meth:`~medquant.calibrate._forward.MaskSides.reads_encoder`), else the decoder's."""
    if sides.reads_encoder(name, x, states):
        return masks.encoder, tokens.encoder
    return masks.decoder, tokens.decoder


def _count(batch: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    """``batch * sequence`` of the first of ``keys`` in ``batch`` holding a 2-D tensor (ids, masks, labels) or a
    3-D one (embeddings)."""
    for key in keys:
        t = batch.get(key)
        if isinstance(t, torch.Tensor) and t.dim() in (2, 3):
            return t.shape[0] * t.shape[1]
    return None


def _batch_tokens(batch: Any) -> _Tokens:
    """The token counts of a dict calibration batch: ``batch * sequence`` of its ``attention_mask``, ``input_ids``
    or ``inputs_embeds`` (a decoder-only model's tokens, an encoder-decoder's encoder's), and of its
    ``decoder_attention_mask``, ``decoder_input_ids``, ``decoder_inputs_embeds`` or ``labels`` (the decoder's, of
    the encoder's count without any: BART shifts ``input_ids`` into its decoder inputs); both ``None`` for other
    batches. :class:`~medquant.calibrate._forward.MaskSides` says which a layer's input takes."""
    if not isinstance(batch, Mapping):
        return _Tokens()
    encoder = _count(batch, ("attention_mask", "input_ids", "inputs_embeds"))
    decoder = _count(batch, ("decoder_attention_mask", "decoder_input_ids", "decoder_inputs_embeds", "labels"))
    return _Tokens(encoder, encoder if decoder is None else decoder)


def _capture(model: nn.Module, stage: Sequence[str], batches: Sequence[Any], early_stop: bool,
             labels: Sequence[Any] | None, group_weights: Mapping[Any, float] | None,
             unmasked: Collection[str] = (), experts: ExpertRows | None = None, sides: MaskSides | None = None
             ) -> dict[str, HessianAccumulator]:
    """The Hessians of the stage's layers on every calibration batch; the padding positions of dict batches
    (``attention_mask`` 0, or ``decoder_attention_mask`` 0 for an encoder-decoder's decoder side:
    :class:`~medquant.calibrate._forward.MaskSides`) are left out of the layers (not in ``unmasked``) whose input is
    ``(batch, tokens, K)``, and of the expert layers (``experts``: the rows of the tokens routed to the expert)."""
    accs = {n: HessianAccumulator(model.get_submodule(n), n, group_weights) for n in stage}
    seen: set[str] = set()
    current: list[Any] = [None]
    mask: list[BatchMasks] = [BatchMasks()]
    tokens: list[_Tokens] = [_Tokens()]
    handles = []
    sides = MaskSides(model) if sides is None else sides
    states: list[torch.Tensor] = []

    shared = _SharedInputs()

    def make(n: str):
        def hook(mod, args, kwargs):
            x = _input_of(args, kwargs)
            m, t = _side_of(sides, n, x, states, mask[0], tokens[0])
            _add(accs[n], n, x, current[0], None if n in unmasked else m, shared, experts,
                 None if n in unmasked else t)
            seen.add(n)
            if early_stop and len(seen) == len(accs):
                raise _Stop
        return hook

    try:
        for n in stage:
            handles.append(model.get_submodule(n).register_forward_pre_hook(make(n), with_kwargs=True))
        tracking = experts.tracking if experts is not None else contextlib.nullcontext
        for i, batch in enumerate(batches):
            seen.clear()
            shared.clear()
            current[0] = labels[i] if labels is not None else None
            mask[0] = batch_masks(batch)
            tokens[0] = _batch_tokens(batch)
            try:
                with tracking(), sides.tracking(model) as states:
                    _run_batch(model, batch, i, short_names(stage))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        shared.clear()
    return accs


def _capture_block(block: nn.Module, inputs: BlockInputs, accs: Mapping[str, HessianAccumulator],
                   labels: Sequence[Any] | None, masks: Sequence[torch.Tensor | None] | None = None,
                   unmasked: Collection[str] = (), experts: ExpertRows | None = None,
                   tokens: Sequence[int | None] | None = None,
                   encoder_masks: Sequence[torch.Tensor | None] | None = None,
                   encoder_tokens: Sequence[int | None] | None = None) -> None:
    """Accumulate the Hessians of ``accs``' layers on the block's calibration calls, every call run whole.

    ``masks[i]``: the token mask of calibration batch ``i`` for the block's rows (:func:`token_mask`; the
    ``decoder_attention_mask`` in a decoder block of an encoder-decoder:
    :class:`~medquant.calibrate._forward.MaskSides`), applied to the layers (not in ``unmasked``) whose input is
    ``(batch, tokens, K)``; ``encoder_masks[i]`` (a decoder block): the encoder's mask, applied instead to an input
    that is the call's ``encoder_hidden_states`` argument (:func:`call_encoder_states`: cross-attention k / v);
    ``tokens[i]``: the token count of the block's rows (:func:`_batch_tokens`: the decoder's in a decoder block),
    ``encoder_tokens[i]`` (a decoder block) the encoder's, taken by an input that is ``encoder_hidden_states``.

    Layers reading the same input tensor share its ``X^T X`` (:class:`_SharedInputs`). No call stops early: with
    data-dependent control flow (a loop whose count depends on the input, a router choosing experts per input) a
    later call may call a planned layer more often than the first, after the point where the first call had
    reached them all, and only the whole call shows it. Counting the calls first would itself run every call
    whole, so running them whole once is the cheapest capture that never misses one; the early stop saved only the
    work after the block's last planned layer (a decoder block: its ``down_proj`` matmul and the residual)."""
    shared = _SharedInputs()
    current: list[Any] = [None]
    mask: list[torch.Tensor | None] = [None]
    encoder_mask: list[torch.Tensor | None] = [None]
    states: list[torch.Tensor] = []  # the encoder_hidden_states of the current call (a decoder block)
    count: list[int | None] = [None]
    encoder_count: list[int | None] = [None]
    handles = []
    cross = encoder_masks is not None or encoder_tokens is not None

    def make(n: str):
        def hook(mod, args, kwargs):
            x = _input_of(args, kwargs)
            m, t = (encoder_mask[0], encoder_count[0]) if any(x is s for s in states) else (mask[0], count[0])
            _add(accs[n], n, x, current[0], None if n in unmasked else m, shared, experts,
                 None if n in unmasked else t)
        return hook

    try:
        for n in accs:
            handles.append(block.get_submodule(n).register_forward_pre_hook(make(n), with_kwargs=True))
        tracking = experts.tracking if experts is not None else contextlib.nullcontext
        for i, (a, k) in enumerate(zip(inputs.args, inputs.kwargs)):
            shared.clear()
            current[0] = labels[i] if labels is not None else None
            mask[0] = masks[i] if masks is not None else None
            encoder_mask[0] = encoder_masks[i] if encoder_masks is not None else None
            states[:] = call_encoder_states(block, a, k) if cross else []
            count[0] = tokens[i] if tokens is not None else None
            encoder_count[0] = encoder_tokens[i] if encoder_tokens is not None else None
            with torch.no_grad(), tracking():  # no autograd graph keeps the call's activations alive
                block(*a, **k)
    finally:
        for h in handles:
            h.remove()
        shared.clear()
        states.clear()


def calibration_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Module name -> the ``calibration`` record of every quantized layer that has one (JSON-serialisable).

    Save them with the checkpoint: ``medquant.save(model, path, extras={"calibration": calibration_records(model)})``
    (``medquant.load_extras(path)["calibration"]`` reads them back); the layer recipes themselves are unchanged.

    Args:
        model: a model quantized by GPTQ, AWQ or AdaRound (or partly).

    Returns:
        ``{module name: record}``; empty when no layer was calibrated.
    """
    return {n: dict(m.calibration) for n, m in model.named_modules()
            if isinstance(m, QUANT_MODULES) and isinstance(getattr(m, "calibration", None), dict)}


@torch.no_grad()
def gptq_quantize_(
    model: nn.Module,
    config_or_map: QuantConfig | int | Mapping[str, QuantConfig | int | None],
    calib: Iterable[Any],
    *,
    skip: Iterable[str] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_search: bool = False,
    max_samples: int | None = None,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
    group_weights: Mapping[Any, float] | None = None,
    max_hessian_bytes: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Quantize ``model``'s Linear / Conv2d layers in place with GPTQ (see the module docstring).

    The plan is :func:`medquant.quantize_`'s: MoE experts with 3-D weights are unfolded into one Linear per expert
    and projection (:meth:`~medquant.quant.experts.QuantExperts.unfolded`), each calibrated on the tokens routed to
    its expert, ``H_e = 2 X_e^T X_e / n_e`` (padding positions left out, per-sample labels following their tokens);
    an expert no calibration token reaches is rounded to nearest (record ``method: "rtn"``, one warning); MoE
    routers stay in floating point unless named exactly.

    Args:
        model: a float model (Hugging Face or plain ``nn.Module``); it is run in eval mode.
        config_or_map: which layers get which :class:`~medquant.QuantConfig`, exactly as
            :func:`medquant.quantize_` (one config, patterns, roles, ``ConfigMap``).
        skip: patterns left in float (e.g. ``["@head"]``).
        calib: calibration batches, each run as :func:`medquant.models.run_model` runs it (a dict of keyword
            inputs, a tuple of positional inputs or one tensor), already on the model's device; a single dict is
            one batch. In a dict batch with a 2-D ``attention_mask``, the positions where it is 0 (padding) are
            left out of the Hessians of the layers whose input is ``(batch, tokens, K)`` with the mask's shape,
            or those tokens flattened sample by sample, or an MoE expert's routed tokens (not the vision tower's
            or the projector's); in an encoder-decoder, ``decoder_attention_mask`` for the decoder's layers (see
            the module docstring).
        damp: dampening ``lambda = damp * mean(H_jj over the live inputs, H_jj > 0)`` (retried x10 up to 3 times
            if ``H`` stays singular; with ``damp=0`` a singular ``H`` is refused at once, the message saying to use
            ``damp > 0``).
        block_size: columns per lazy update block.
        act_order: process columns by decreasing ``H_jj`` (scale groups and layout unchanged).
        clip_search: each scale group takes the shrunk range ``p * range`` that minimises
            ``sum |w - Q(w)|^2.4`` over its current weights (module docstring) instead of the full range.
        max_samples: use at most this many calibration batches, drawn with ``seed`` (default: all).
        seed: seed of that draw (an integer); GPTQ itself is deterministic.
        groups: optional group labels, one entry per calibration batch: a label (an int of any integer type - a
            NumPy integer too - or a str; any other single value is refused) for the whole batch, or a sequence
            / 1-D tensor with one label per sample (the batch dimension first in every layer's input, or its
            tokens flattened sample by sample, ``(batch * tokens, K)``, each row taking its sample's label; in
            an encoder-decoder the tokens of the input's side: the decoder's, from ``decoder_attention_mask`` /
            ``decoder_input_ids`` / ``labels``, for a decoder layer). Then each layer's Hessian is
            group-balanced, ``H = sum_g w_g 2 X_g^T X_g / n_g`` (:class:`HessianAccumulator`), so a minority
            group's inputs weigh as much as the majority's.
        group_weights: ``w_g`` by label (normalised to sum 1 over the groups seen); default uniform.
        max_hessian_bytes: the most bytes of Hessian sums held at once (``K^2`` float64 per Linear, per group of a
            Conv2d, times the number of group labels seen): a stage whose layers need more is captured in several
            passes over the calibration batches, layers in forward order, each pass holding at most this much (a
            layer larger than it alone). The codes are the same as in one pass. For MoE blocks: an experts
            module of ``E`` experts needs ``E (H^2 + I^2)`` float64 (``128 (2048^2 + 768^2) * 8`` bytes = 4.9 GB
            for one Qwen3-30B-A3B block). ``None`` (default): one pass per stage.
        progress: tqdm bar over stages.

    Returns:
        :func:`calibration_records` of the quantized layers: method ``"gptq"``, ``samples`` (calibration batches),
        ``rows`` (Hessian input rows), ``damp`` / ``damp_used``, ``block_size``, ``act_order``, ``clip_search``,
        ``seed``,
        ``dead_inputs`` and the GPTQ objective ``loss``; with ``groups`` also ``group_balanced``,
        ``group_weights`` and ``group_rows`` (by label, as strings).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: invalid ``damp`` / ``block_size`` / ``max_samples`` / ``max_hessian_bytes`` / ``seed``, no or an
            empty calibration set, batches that do not run, a convolution with non-zero padding mode, a layer never
            reached, an MoE experts module given per-row bit-widths (``channel_bits``), or a Hessian that stays
            singular (messages name the layer). On any error the model is left as it was (the layers of the stages
            already quantized are put back).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gptq_quantize_ expects an nn.Module, got {type(model).__name__}")
    damp, block_size, max_samples, max_hessian_bytes = _check_args(damp, block_size, max_samples,
                                                                   max_hessian_bytes)
    seed = check_seed(seed)
    plan = resolve_configs(model, config_or_map, skip=skip, experts=True)
    if not plan:
        return {}
    if "" in plan:  # the model is itself one Linear / Conv2d: there is no parent to swap it in
        raise ValueError(f"the model passed to gptq_quantize_ is itself the layer ({type(model).__name__}); it "
                         "replaces submodules in place, so it needs a model holding the layer: quantize one layer "
                         "with gptq_quantize_layer(layer, HessianAccumulator(layer).hessian(), config), or wrap it "
                         "(nn.Sequential(layer))")
    batches = calibration_batches(calib, "GPTQ")
    labels = _group_labels(groups, len(batches))
    keep = _select(batches, max_samples, seed)
    batches = [batches[i] for i in keep]
    labels = [labels[i] for i in keep] if labels is not None else None
    if not batches:
        raise ValueError(f"GPTQ needs calibration data: the calibration set is empty (layers to quantize: "
                         f"{short_names(list(plan))})")
    _check_batches(batches, short_names(list(plan)))
    for n in plan:
        m = model.get_submodule(n)
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise ValueError(f"layer {n}: GPTQ supports padding_mode='zeros' only")
    swapped = _Swaps(model)
    unrouted: list[str] = []
    with eval_mode(model):
        try:
            before = names_by_module(model)  # MoE experts with 3-D weights: one float Linear per expert and matrix
            plan = unfold_experts(model, plan, lambda n, new: swapped.swap(before, n, new))
            aliases = names_by_module(model)
            experts = ExpertRows(model, list(plan))
            padded = any(batch_masks(b).padded for b in batches)
            # image layers: no token mask, and per-sample labels never spread over their rows by the token count
            unmasked = unmasked_layers(model, plan) if padded or labels is not None else set()
            sides = MaskSides(model)
            sides.warn_unsided(batches)
            ordered, counts = _call_order(model, list(plan), batches, unmasked, experts, sides)
            stages = _stages(model, ordered)
            bar = tqdm(stages, desc="GPTQ", unit="stage", disable=not progress, leave=False)
            for stage in bar:
                built = []
                for part in _hessian_parts(model, stage, max_hessian_bytes, _label_count(labels)):
                    early = all(c == 1 for n in part for c in counts[n])
                    accs = _capture(model, part, batches, early, labels, group_weights, unmasked, experts, sides)
                    factors = _Factors()  # layers with one Hessian (q / k / v) share its prepared factor
                    built += [(n, _layer_result(model.get_submodule(n), n, plan[n], accs, experts, unrouted,
                                                len(batches), labels, damp, block_size, act_order, clip_search, seed,
                                                factors)) for n in part]
                    del accs
                for n, q in built:
                    swapped.swap(aliases, n, q)
        except BaseException:
            swapped.undo()
            raise
    swapped.set_modes()
    warn_unrouted(unrouted, 3)  # the caller of gptq_quantize_ (below torch.no_grad's wrapper)
    return calibration_records(model)


def _layer_result(layer: nn.Module, name: str, cfg: QuantConfig, accs: Mapping[str, HessianAccumulator],
                  experts: ExpertRows, unrouted: list[str], samples: int, labels: Sequence[Any] | None, damp: float,
                  block_size: int, act_order: bool, clip_search: bool, seed: int, factors: _Factors,
                  full: str | None = None) -> nn.Module:
    """The GPTQ layer of ``name`` from its Hessian, with its record; an expert layer no calibration token reached
    is quantized by round-to-nearest (added to ``unrouted``)."""
    acc = accs[name]
    if acc.rows == 0 and name in experts:
        unrouted.append(full or name)
        return rtn_unrouted(layer, cfg, samples)
    q = _quantize_layer(layer, acc.hessian(), cfg, damp, block_size, act_order, full or name, torch.float32,
                        factors, clip_search)
    q.calibration.update(samples=samples, rows=acc.rows, seed=seed)
    if labels is not None:
        q.calibration.update(_group_record(accs, name))
    return q


def _hessian_bytes(layer: nn.Module) -> int:
    """Bytes of one set of float64 Hessian sums of ``layer`` (``K^2`` per Linear, per group of a Conv2d)."""
    if isinstance(layer, nn.Conv2d):
        k = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        return layer.groups * k * k * 8
    return int(getattr(layer, "in_features", 0)) ** 2 * 8


def _label_count(labels: Sequence[Any] | None) -> int:
    """The number of distinct group labels in ``labels`` (one entry per calibration batch: a label, or a sequence /
    1-D tensor of one label per sample, as :meth:`HessianAccumulator.add` reads them); 1 without labels."""
    if labels is None:
        return 1
    seen: set[Any] = set()
    for lab in labels:
        if isinstance(lab, torch.Tensor) and lab.dim() == 0:
            lab = lab.item()
        if lab is None or isinstance(lab, (int, str)):
            seen.add(lab)
        else:
            seen.update(lab.tolist() if isinstance(lab, torch.Tensor) else list(lab))
    return max(1, len(seen))


def _hessian_parts(root: nn.Module, names: Sequence[str], budget: int | None, groups: int = 1) -> list[list[str]]:
    """``names`` cut, in order, into parts whose Hessian sums take at most ``budget`` bytes (a layer larger than the
    budget alone; ``None``: one part); each layer holds one set of sums per group label (``groups`` of them)."""
    if budget is None:
        return [list(names)]
    parts: list[list[str]] = [[]]
    used = 0
    for n in names:
        size = _hessian_bytes(root.get_submodule(n)) * groups
        if parts[-1] and used + size > budget:
            parts.append([])
            used = 0
        parts[-1].append(n)
        used += size
    return parts


def gptq_quantize_sequential(
    model: nn.Module,
    config_or_map: QuantConfig | int | Mapping[str, QuantConfig | int | None],
    calib_inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    skip: Iterable[str] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_search: bool = False,
    max_samples: int | None = None,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
    group_weights: Mapping[Any, float] | None = None,
    device: str | torch.device | None = None,
    offload_device: str | torch.device | None = "cpu",
    checkpoint: str | os.PathLike | Any | None = None,
    max_hessian_bytes: int | None = None,
    progress: bool = True,
    outside: str = "gptq",
) -> dict[str, dict[str, Any]]:
    """GPTQ block by block through :func:`medquant.calibrate.quantize_sequential`; the model is quantized in place.

    Each decoder / vision block is brought to ``device`` (moved, or read from ``checkpoint``), the Hessians of its
    planned layers are captured on the block's own calibration calls - whose hidden states are the outputs of the
    already quantized earlier blocks - and its layers are replaced by their GPTQ versions; then it moves to
    ``offload_device``. Peak device memory: one float block, its activations and its Hessians (the finished blocks
    of an earlier stack - a VLM's vision tower while the language stack's inputs are captured - come to ``device``
    one at a time, each only while it runs; the modules outside the blocks stay there while calibrating). The model
    runs in eval mode; each quantized layer gets the train / eval mode its float layer had before the call.

    Every calibration call of a block runs whole on the float block, and each call of a planned layer adds its
    input to the layer's Hessian: a block with data-dependent control flow (a loop whose count depends on the
    input, a router choosing experts per input) gets every input of every call, as :func:`gptq_quantize_` does, even
    where a later call calls a planned layer more often than the first. (An early stop of the calls at the block's
    last planned layer would save only the work after it - a decoder block's ``down_proj`` matmul and residual, about
    a fifth of the float pass - and could be decided safely only after running every call whole.)

    Layers outside the blocks (a patch embedding, a projector, Qwen3-VL's mergers, ``lm_head`` unless skipped,
    IDEFICS's gated cross-attention layers between its text blocks) get GPTQ too (``outside="gptq"``), one at a
    time in call order, each on its inputs in the model's own forward with the blocks and the layers before it
    already quantized, its padding rows left out as in :func:`gptq_quantize_` (never for the vision tower's or
    the projector's rows): a layer feeding a block group (a projector) before that group's capture pass, the rest
    (``lm_head``) on the finished model (:func:`medquant.calibrate.quantize_sequential`'s ``outside_fn``). The
    cost: a counting pass up to each group's first block while such a layer is left, one pass per layer up to its
    last call, and a counting pass over the finished model (logits computed once). ``outside="rtn"`` rounds them
    to nearest instead (no extra pass; no record). The codes are those of :func:`gptq_quantize_` up to float
    rounding of the captured activations (bit-identical on the zoo's tiny LLaVA, Qwen2-VL and Qwen3-VL).

    Args:
        model: the float model, quantized in place (blocks may stay on ``offload_device``).
        config_or_map: configs by pattern, as :func:`medquant.quantize_`.
        calib_inputs: one dict, or a list of dicts, of ``model(**batch)`` keyword arguments; padding positions
            (``attention_mask`` 0) are left out of the Hessians as in :func:`gptq_quantize_`.
        skip: patterns left in float.
        damp: relative dampening (see :func:`gptq_quantize_`).
        block_size: columns per lazy update block.
        act_order: process columns by decreasing ``H_jj``.
        clip_search: range-searched scales (see :func:`gptq_quantize_`).
        max_samples: use at most this many calibration dicts, drawn with ``seed``.
        seed: seed of that draw.
        groups: group labels, one entry per dict (see :func:`gptq_quantize_`).
        group_weights: ``w_g`` by label; default uniform.
        device: the compute device of one block (default CUDA when available, else CPU, as
            :func:`~medquant.calibrate.quantize_sequential`).
        offload_device: where each block goes after it is quantized (``None``: stays on ``device``).
        checkpoint: a Hugging Face folder / safetensors source the float blocks are read from one at a time
            (the model is then a meta-device skeleton), or ``None``.
        max_hessian_bytes: the most bytes of Hessian sums held at once (see :func:`gptq_quantize_`): a block whose
            layers need more runs its calibration calls once per part of its layers. The codes are unchanged.
        progress: tqdm bar over blocks.
        outside: ``"gptq"`` (default): the planned Linear / Conv2d layers outside the blocks get GPTQ (above);
            ``"rtn"``: round-to-nearest, as :func:`medquant.calibrate.quantize_sequential` does.

    Returns:
        :func:`calibration_records` of the quantized layers.

    Raises:
        ValueError: no or empty calibration data, invalid arguments (``damp``, ``block_size``, ``max_samples``,
            ``max_hessian_bytes``, ``seed``, ``outside``), a planned layer bound in several blocks (one module object under names in two blocks, or in
            a block and outside them: its Hessian would miss its later uses; use :func:`gptq_quantize_`, which
            collects them all, or skip it), an MoE experts module given per-row bit-widths (``channel_bits``), a
            Hessian that stays singular (with ``damp=0``: the message names the layer and says to use
            ``damp > 0``).
        TypeError: ``model`` is not an ``nn.Module``, or a calibration entry is not a dict.

    All or nothing: any exception raised part way (a later block's error, a ``KeyboardInterrupt``) leaves the model
    exactly as it was before the call - the float layers of the blocks already done bound again, their weights
    unchanged, hooks and train / eval modes as before - then propagates (see
    :func:`medquant.calibrate.quantize_sequential` for the memory this keeps until the call returns).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gptq_quantize_sequential expects an nn.Module, got {type(model).__name__}")
    damp, block_size, max_samples, max_hessian_bytes = _check_args(damp, block_size, max_samples,
                                                                   max_hessian_bytes)
    seed = check_seed(seed)
    if outside not in ("gptq", "rtn"):
        raise ValueError(f"outside must be 'gptq' or 'rtn', got {outside!r}")
    if calib_inputs is None:
        raise ValueError("GPTQ needs calibration data: pass calib_inputs (a dict of model(**batch) keyword "
                         "arguments, or a list of such dicts)")
    batches = [calib_inputs] if isinstance(calib_inputs, Mapping) else list(calib_inputs)
    if not batches:
        raise ValueError("GPTQ needs calibration data: calib_inputs is empty")
    if not all(isinstance(b, Mapping) for b in batches):
        bad = next(i for i, b in enumerate(batches) if not isinstance(b, Mapping))
        raise TypeError(f"calib_inputs[{bad}] is {describe_batch(batches[bad])}; the block-by-block GPTQ takes dicts of "
                        "model(**batch) keyword arguments")
    _check_batches(batches)
    _refuse_shared_across_blocks(model, config_or_map, skip)
    labels = _group_labels(groups, len(batches))
    keep = _select(batches, max_samples, seed)
    batches = [batches[i] for i in keep]
    labels = [labels[i] for i in keep] if labels is not None else None
    masks = [batch_masks(b) for b in batches]
    padded = any(m.padded for m in masks)
    sides = MaskSides(model)
    sides.warn_unsided(batches)
    counts = [_batch_tokens(b) for b in batches]  # per batch: tokens flattened sample by sample take their labels
    # image layers: no token mask, and per-sample labels never spread over their rows by the token count
    image_layers = unmasked_layers(model, [n for n, _ in model.named_modules()]) \
        if padded or labels is not None else set()

    unrouted: list[str] = []
    modes = {id(m): m.training for m in model.modules()}  # before eval_mode: the new layers get these
    new_modes: list[tuple[nn.Module, bool]] = []  # (new module, its float module's mode), in swap order

    def swap(block: nn.Module, n: str, new: nn.Module, aliases: Mapping[int, list[str]]) -> None:
        old = block.get_submodule(n)
        swap_under_all_names(block, n, new, aliases)
        new_modes.append((new, modes.get(id(old), old.training)))

    def per_block_fn(block: nn.Module, inputs: BlockInputs) -> None:
        configs = {n: c for n, c in inputs.configs.items()
                   if isinstance(block.get_submodule(n), (nn.Linear, nn.Conv2d)) or is_experts_module(
                       block.get_submodule(n))}
        if not configs:
            return

        before = names_by_module(block)  # MoE experts with 3-D weights: one float Linear per expert and matrix
        configs = unfold_experts(block, configs, lambda n, new: swap(block, n, new, before), f"{inputs.name}.")
        names = list(configs)
        experts = ExpertRows(block, names)
        # the block's rows take its side's masks and token counts; a decoder block's encoder_hidden_states input,
        # the encoder's
        own, cross = sides.block_masks(inputs.name, masks)
        decoder = cross is not None
        own_counts = [c.decoder if decoder else c.encoder for c in counts]
        cross_counts = [c.encoder for c in counts] if decoder else None
        # an expert layer reads what its experts module reads (image patches in a vision tower)
        unmasked = {n for n in names if f"{inputs.name}.{n.rsplit('.', 2)[0] if n in experts else n}" in image_layers}
        built = []
        for part in _hessian_parts(block, names, max_hessian_bytes, _label_count(labels)):
            accs = {n: HessianAccumulator(block.get_submodule(n), f"{inputs.name}.{n}", group_weights) for n in part}
            _capture_block(block, inputs, accs, labels, own if padded else None, unmasked, experts, own_counts,
                           encoder_masks=cross if padded else None, encoder_tokens=cross_counts)
            factors = _Factors()
            built += [(n, _layer_result(block.get_submodule(n), n, configs[n], accs, experts, unrouted, len(batches),
                                        labels, damp, block_size, act_order, clip_search, seed, factors,
                                        f"{inputs.name}.{n}")) for n in part]
            del accs
        aliases = names_by_module(block)
        for n, q in built:  # a module bound under several names of the block is swapped under all of them
            swap(block, n, q, aliases)

    def outside_fn(layer: OutsideLayer) -> nn.Module:
        """GPTQ of a layer outside the blocks on its inputs in the model's own forward, with the whole-model
        path's rules (its side's mask and token count; no mask on an image layer)."""
        acc = HessianAccumulator(layer.module, layer.name, group_weights)
        shared = _SharedInputs()
        last = [-1]
        unmasked = layer.name in image_layers

        def hook(i: int, args: tuple, kwargs: dict) -> None:
            if i != last[0]:
                shared.clear()
                last[0] = i
            x = _input_of(args, kwargs)
            m, t = _side_of(sides, layer.name, x, states, masks[i], counts[i])
            _add(acc, layer.name, x, labels[i] if labels is not None else None, None if unmasked else m, shared,
                 None, None if unmasked else t)

        with sides.tracking(model) as states:
            layer.run(hook)
        shared.clear()
        q = _quantize_layer(layer.module, acc.hessian(), layer.config, damp, block_size, act_order, layer.name,
                            torch.float32, None, clip_search)
        q.calibration.update(samples=len(batches), rows=acc.rows, seed=seed)
        if labels is not None:
            q.calibration.update(_group_record({layer.name: acc}, layer.name))
        new_modes.append((q, modes.get(id(layer.module), layer.module.training)))
        return q

    with eval_mode(model):
        quantize_sequential(model, config_or_map, batches, skip=list(skip) if skip else None, device=device,
                            offload_device=offload_device, checkpoint=checkpoint, per_block_fn=per_block_fn,
                            progress=progress, outside_fn=outside_fn if outside == "gptq" else None)
    # each new layer gets its float layer's mode from before the run; an unfolded MoE experts module (swapped
    # before its expert layers, which it holds) last, so its layers take its mode
    for new, mode in reversed(new_modes):
        new.train(mode)
    warn_unrouted(unrouted, 2)
    return calibration_records(model)


def _refuse_shared_across_blocks(model: nn.Module, config_or_map: Any, skip: Iterable[str] | None) -> None:
    """Refuse a planned layer bound in more than one block (or in a block and outside the blocks): block by block,
    its Hessian would hold the inputs of its first block only (the later blocks run after it is quantized), which
    :func:`gptq_quantize_` does not do (one Hessian from every use)."""
    with warnings.catch_warnings():  # quantize_sequential resolves the plan again and gives its warnings
        warnings.simplefilter("ignore")
        plan = resolve_configs(model, config_or_map, skip=list(skip) if skip else None)
    blocks = [n for g in block_stacks(model) for n in g]

    def owner(name: str) -> str | None:
        return next((b for b in blocks if name == b or name.startswith(b + ".")), None)

    aliases = names_by_module(model)
    for n in plan:
        names = aliases.get(id(model.get_submodule(n)), [n])
        if len({owner(a) for a in names}) > 1:
            raise ValueError(f"layer {n} is one module bound in several blocks ({', '.join(names)}): block by block, "
                             "its Hessian would only hold the inputs of its first use (the later blocks run after "
                             "it is quantized). Use gptq_quantize_ (one Hessian from every use, the quantized layer "
                             f"bound under every name), leave it in float (skip=[{n!r}]), or give each block its "
                             "own copy of the layer")
