"""MoE experts with 3-D weights in GPTQ and AdaRound: unfolded into one float ``nn.Linear`` per expert and matrix.

An experts module (transformers 5: ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)`` ...) has no Linear to
calibrate. :func:`unfold_experts` replaces each planned one by
:meth:`QuantExperts.unfolded <medquant.quant.experts.QuantExperts.unfolded>`, which computes exactly the same
function with one float layer per expert and projection (views of the 3-D weights, no copy): ``gate_up.e`` is called
on the rows of the tokens routed to expert ``e``, ``down.e`` on that expert's activations ``gate(W_gu_e x)``. The
Hessian of such a layer is then

    H_e = 2 X_e^T X_e / n_e,    X_e = the rows of the calibration tokens routed to expert e (n_e of them),

and GPTQ quantizes ``W_e`` as any Linear. :class:`ExpertRows` maps a layer's input rows back to the tokens of the
calibration batch (the experts module's ``routed_rows``), so padding positions (``attention_mask`` 0) are left out
and per-sample group labels follow their tokens. An expert that no calibration token reached (``n_e = 0``) has no
Hessian: it is quantized by round-to-nearest (:func:`rtn_unrouted`), and its record says so.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..quant.config import QuantConfig
from ..quant.experts import QuantExperts, is_experts_module
from ..quant.modules import QuantLinear

__all__ = ["ExpertRows", "rtn_unrouted", "unfold_experts", "warn_unrouted"]

_KEYS = ("gate_up", "up", "down")


def unfold_experts(root: nn.Module, plan: Mapping[str, QuantConfig], swap: Callable[[str, nn.Module], object],
                   prefix: str = "") -> dict[str, QuantConfig]:
    """Unfold the experts modules of ``plan`` (names relative to ``root``) and give the plan of their layers.

    Args:
        root: the model (or block) holding the planned modules.
        plan: ``{name: config}``; an entry naming an experts module with 3-D weights is replaced by one entry per
            expert layer (``<name>.gate_up.<e>`` / ``<name>.up.<e>``, ``<name>.down.<e>``) with its config.
        swap: ``swap(name, new)`` binds ``new`` at ``name`` in ``root`` (under every name of the old module), so
            the caller can undo it.
        prefix: ``root``'s name in the model followed by ``"."`` (``""`` for the model), for error messages.

    Returns:
        The plan with expert layers instead of experts modules, in the same order.

    Raises:
        ValueError: an experts module's config has per-row bit-widths (``channel_bits``: one list cannot fit its
            matrices, whose row counts differ, as :meth:`QuantExperts.from_float` refuses it); nothing is
            unfolded then.
    """
    for name, cfg in plan.items():
        if cfg.channel_bits is not None and is_experts_module(root.get_submodule(name)):
            raise ValueError(f"{prefix}{name}: per-output-channel bit-widths (channel_bits) are not supported for MoE "
                             "experts: every expert matrix has its own rows; use one bit-width for the experts "
                             f"(a config without channel_bits for {prefix}{name})")
    out: dict[str, QuantConfig] = {}
    for name, cfg in plan.items():
        mod = root.get_submodule(name)
        if isinstance(mod, QuantExperts):  # bound under another planned name, already unfolded there
            continue
        if not is_experts_module(mod):
            out[name] = cfg
            continue
        unfolded = QuantExperts.unfolded(mod)
        swap(name, unfolded)
        for key in (unfolded.up_name, "down"):
            for e in range(unfolded.num_experts):
                out[f"{name}.{key}.{e}"] = cfg
    return out


class ExpertRows:
    """The expert layers among ``names`` (relative to ``root``) and how their input rows map to tokens.

    Args:
        root: the model (or block) holding the layers.
        names: planned layer names.
    """

    def __init__(self, root: nn.Module, names: Sequence[str]) -> None:
        self.parents: dict[str, QuantExperts] = {}
        for n in names:
            parts = n.split(".")
            if len(parts) < 3 or not parts[-1].isdigit() or parts[-2] not in _KEYS:
                continue
            parent = root.get_submodule(".".join(parts[:-2]))
            if isinstance(parent, QuantExperts):
                self.parents[n] = parent

    def __contains__(self, name: object) -> bool:
        return name in self.parents

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Within the context the experts modules record which tokens each expert computes on."""
        with contextlib.ExitStack() as stack:
            for p in dict.fromkeys(self.parents.values()):
                stack.enter_context(p.tracking_rows())
            yield

    def map(self, name: str, labels: Any, mask: torch.Tensor | None) -> tuple[Any, torch.Tensor | None]:
        """The group labels and row mask of the current input of expert layer ``name``.

        Args:
            name: an expert layer (``name in self``), called now (inside :meth:`tracking`).
            labels: the calibration batch's group label(s): one label, or one per sample.
            mask: the batch's token mask ``(batch, tokens)`` or ``None``.

        Returns:
            ``(labels, mask)`` for the layer's input rows: the mask entries of the routed tokens (``None`` when the
            mask does not have one entry per token the experts module received), one label per row when the labels
            are per sample.

        Raises:
            ValueError: per-sample labels whose count does not divide the experts module's token count.
        """
        rows, tokens = self.parents[name].routed_rows or (None, 0)
        if rows is None:
            raise RuntimeError(f"expert layer {name} called outside its experts module's routing")
        row_mask = None
        if isinstance(mask, torch.Tensor) and mask.numel() == tokens:
            row_mask = mask.reshape(-1).to(rows.device)[rows]
        if isinstance(labels, torch.Tensor) and labels.dim() == 0:
            labels = labels.item()
        if labels is None or isinstance(labels, (int, str)):
            return labels, row_mask
        labs = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        if not labs or tokens % len(labs):
            raise ValueError(f"expert layer {name}: {len(labs)} per-sample group labels for the {tokens} tokens its "
                             "experts module received, which is not a whole number of tokens per sample; give one "
                             "label per calibration batch")
        per = tokens // len(labs)
        return [labs[i] for i in (rows // per).tolist()], row_mask


def rtn_unrouted(layer: nn.Module, config: QuantConfig, samples: int) -> QuantLinear:
    """Round-to-nearest quantization of an expert layer no calibration token reached, with its record."""
    q = QuantLinear.from_float(layer, config)
    q.calibration = {"method": "rtn", "samples": samples, "rows": 0,
                     "reason": "no calibration token was routed to this expert"}
    return q


def warn_unrouted(unrouted: Sequence[str], stacklevel: int) -> None:
    """One warning naming the expert layers :func:`rtn_unrouted` quantized (none: no warning); ``stacklevel`` as
    ``warnings.warn`` takes it, counted from this function."""
    if unrouted:
        names = ", ".join(unrouted[:3]) + (", ..." if len(unrouted) > 3 else "")
        warnings.warn(f"{len(unrouted)} MoE expert layer(s) received no calibration token ({names}) and were "
                      "quantized by round-to-nearest (their record says method 'rtn'): calibrate with more or more "
                      "varied data to reach every expert", UserWarning, stacklevel=stacklevel + 1)
