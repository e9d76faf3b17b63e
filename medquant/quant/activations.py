"""Static activation quantizers that stay on a model: :class:`InputQuantizer` and the checkpoint record of them.

Learned rounding with ``act_bits`` (W4A8 and the like) fake-quantizes the first tensor input of each calibrated unit
with a static per-tensor quantizer, attached as a forward pre-hook. With step ``s`` and zero point ``z``:

    asymmetric:  x^ = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s
    symmetric:   x^ = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1) * s

(``round`` half to even). :func:`input_quantizers` lists the ones active on a model, and
:func:`attach_recorded` attaches them again from their records ``{"bits", "symmetric", "scale", "zero"}``, which
is how ``medquant.save`` / ``medquant.load`` keep a model's activation quantization.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["InputQuantizer", "attach_recorded", "carry_input_quantizer", "checked_records", "input_quantizers",
           "recorded_quantizers", "set_input_quantizers"]


def _check_act_bits(bits: object, symmetric: object) -> None:
    """Refuse an activation bit-width that is not an integer in 2..16 (bools included), and a ``symmetric`` that is
    not a bool (``bool("false")`` is True)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"activation bits must be an integer in 2..16, got {bits!r}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"activation symmetric must be True or False, got {symmetric!r}")


class InputQuantizer:
    """Static per-tensor fake quantization of a module's first tensor input (formulas in the module docstring).

    ``scale`` and ``zero`` are fixed numbers (from :meth:`calibrate`); calling the object fake-quantizes a tensor and
    returns it in its own dtype (float16 / bfloat16 inputs are computed in float32, float64 in float64, so the codes
    are the formula's); :meth:`attach` installs it as a forward pre-hook of a module.

    Args:
        bits: activation bit-width, 2..16.
        symmetric: codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` without zero point, else ``[0, 2^b - 1]`` with
            ``zero``.
        scale: the step ``s`` (> 0, finite): ``x^ = (clamp(round(x/s) + z, 0, 2^b - 1) - z) * s``.
        zero: the zero point ``z`` (asymmetric).

    Raises:
        TypeError: ``symmetric`` is not a bool.
        ValueError: ``bits`` outside 2..16, a scale that is not a finite positive number, or a zero point off the
            codes (asymmetric: outside ``0..2^b - 1``, where 0 is not representable; symmetric: not 0).
    """

    #: what :func:`medquant.quant.hooks.forward_hooks` says installed its pre-hook
    hook_owner: ClassVar[str] = "input"

    def __init__(self, bits: int, symmetric: bool, scale: float, zero: int = 0) -> None:
        _check_act_bits(bits, symmetric)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"activation scale must be a finite number > 0, got {scale!r}")
        if isinstance(zero, bool) or not isinstance(zero, numbers.Integral) or (
                zero != 0 if symmetric else not 0 <= zero <= 2**bits - 1):
            codes = "0 (symmetric)" if symmetric else f"an integer in 0..{2**bits - 1}"
            raise ValueError(f"activation zero point must be {codes}, got {zero!r}")
        self.bits: int = bits
        self.symmetric: bool = symmetric
        self.scale: float = float(scale)
        self.zero: int = int(zero)

    @classmethod
    def calibrate(cls, xs: Sequence[torch.Tensor], bits: int, symmetric: bool = False,
                  name: str = "input") -> InputQuantizer:
        """The quantizer whose range covers every tensor of ``xs`` (asymmetric: the range always holds 0).

        Symmetric: ``s = max(|lo|, |hi|) / (2^(b-1) - 1)``; asymmetric: ``s = (max(hi, 0) - min(lo, 0)) /
        (2^b - 1)``, ``z = round(-min(lo, 0) / s)``, with ``lo`` / ``hi`` the extremes over ``xs``.

        Args:
            xs: calibration inputs of the module (empty tensors hold no values and are skipped).
            bits: activation bit-width, 2..16.
            symmetric: the scheme.
            name: the module's name in error messages.

        Returns:
            The :class:`InputQuantizer`.

        Raises:
            TypeError: ``symmetric`` is not a bool.
            ValueError: ``bits`` outside 2..16 (checked before any division by ``2^(b-1) - 1`` or ``2^b - 1``), or
                ``xs`` is empty (or holds only empty tensors) or holds NaN / inf.
        """
        _check_act_bits(bits, symmetric)
        xs = [x for x in xs if x.numel()]
        if not xs:
            raise ValueError(f"{name}: no calibration inputs to fix the activation scale (none, or only empty "
                             "tensors)")
        lo = min(float(x.detach().min()) for x in xs)
        hi = max(float(x.detach().max()) for x in xs)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name}: calibration input holds NaN/inf values")
        if symmetric:
            s = max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1)
            z = 0
        else:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            s = (hi - lo) / (2**bits - 1)
            z = int(torch.round(torch.tensor(-lo / s, dtype=torch.float64))) if s > 0 else 0
        return cls(bits, symmetric, s if s > 0 else 1.0, z)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # float16 / bfloat16 inputs are computed in float32 and cast back: x / s rounded to a half dtype (8 bits of
        # mantissa for bfloat16) moved values across the rounding boundaries, off the formula's codes
        wide = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else None
        xw = x if wide is None else x.to(wide)
        r = torch.round(xw / self.scale)
        if self.symmetric:
            q = 2 ** (self.bits - 1) - 1
            out = torch.clamp(r, -q, q) * self.scale
        else:
            out = (torch.clamp(r + self.zero, 0, 2**self.bits - 1) - self.zero) * self.scale
        return out if wide is None else out.to(x.dtype)

    def as_dict(self) -> dict[str, Any]:
        """The quantizer's parameters as a JSON-ready dict.

        Returns:
            ``{"bits", "symmetric", "scale", "zero"}``, the record :func:`attach_input_quantizers` reads.
        """
        return {"bits": self.bits, "symmetric": self.symmetric, "scale": self.scale, "zero": self.zero}

    def _hook(self, mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"{type(mod).__name__}: the input quantizer needs the input tensor as the first "
                            "positional argument")
        return (self(args[0]), *args[1:]), kwargs

    def attach(self, module: nn.Module) -> Any:
        """Install on ``module`` as a forward pre-hook, replacing an input quantizer attached earlier.

        Args:
            module: the module whose first positional input is fake-quantized from now on.

        Returns:
            The hook handle (``handle.remove()`` detaches it); also kept as ``module.input_quantizer_handle``.
        """
        old = getattr(module, "input_quantizer_handle", None)
        if old is not None:
            old.remove()
        handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)
        module.input_quantizer = self
        module.input_quantizer_handle = handle
        return handle


def carry_input_quantizer(old: nn.Module, new: nn.Module) -> None:
    """Make the input quantizer active on ``old`` that now runs on ``new`` too (its forward pre-hook carried by
    :func:`medquant.quant.carry_hooks`, which a swap calls) ``new``'s own: ``new.input_quantizer`` and an
    ``input_quantizer_handle`` that removes it from ``new``. Without them the swapped layer ran the quantizer
    while :func:`input_quantizers` did not list it: a save left it out, and a load into a model holding one did not
    remove it. An input quantizer ``new`` had already (two modules swapped for one) is removed: a module
    has one, as after :meth:`InputQuantizer.attach`.

    Args:
        old: the module being replaced.
        new: its replacement, holding ``old``'s hooks already.
    """
    q, handle = getattr(old, "input_quantizer", None), getattr(old, "input_quantizer_handle", None)
    if (not isinstance(q, InputQuantizer) or not isinstance(handle, RemovableHandle)
            or handle.id not in getattr(new, "_forward_pre_hooks", {}) or getattr(new, "input_quantizer", None) is q):
        return
    current = getattr(new, "input_quantizer_handle", None)
    if isinstance(current, RemovableHandle) and current.id != handle.id:
        current.remove()  # one input quantizer per module, as attach() keeps it: the carried one replaces it
    if handle.hooks_dict_ref() is not new._forward_pre_hooks:  # copied into new's own table: a handle on it
        hook_id = handle.id
        handle = RemovableHandle(new._forward_pre_hooks, extra_dict=new._forward_pre_hooks_with_kwargs)
        handle.id = hook_id
    new.input_quantizer = q
    new.input_quantizer_handle = handle


def input_quantizers(model: nn.Module) -> dict[str, InputQuantizer]:
    """The input quantizers active on ``model``'s modules: attached with :meth:`InputQuantizer.attach` and not
    removed since (``input_quantizer_handle.remove()`` switches one off).

    Args:
        model: the model.

    Returns:
        ``{module name: quantizer}`` in ``named_modules`` order (a module bound under several names, under its
        first).
    """
    out: dict[str, InputQuantizer] = {}
    for name, m in model.named_modules():
        q, handle = getattr(m, "input_quantizer", None), getattr(m, "input_quantizer_handle", None)
        if isinstance(q, InputQuantizer) and handle is not None and handle.id in m._forward_pre_hooks:
            out[name] = q
    return out


def _from_record(name: str, rec: Any, where: str) -> InputQuantizer:
    if not isinstance(rec, Mapping) or set(rec) != {"bits", "symmetric", "scale", "zero"}:
        raise TypeError(f"{where}: the input quantizer of {name!r} must be an object with exactly bits, "
                        f"symmetric, scale and zero; got {rec!r}")
    bits, sym, scale, zero = rec["bits"], rec["symmetric"], rec["scale"], rec["zero"]
    if (not isinstance(sym, bool) or isinstance(zero, bool) or not isinstance(zero, int)
            or isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{where}: the input quantizer of {name!r} has symmetric={sym!r} (a bool), zero={zero!r} "
                        f"(an int) and scale={scale!r} (a number)")
    try:
        return InputQuantizer(bits, sym, scale, zero)
    except ValueError as e:
        raise ValueError(f"{where}: the input quantizer of {name!r}: {e}") from None


def checked_records(records: Any, where: str = "the records") -> dict[str, dict[str, Any]]:
    """Input quantizer records checked without a model: a copy ``{module name: {"bits", "symmetric", "scale",
    "zero"}}`` with the values :class:`InputQuantizer` holds.

    Args:
        records: the records (as read from JSON).
        where: what holds them, for error messages.

    Returns:
        The checked copy.

    Raises:
        TypeError: ``records`` is not a mapping of such records, or a value of the wrong type.
        ValueError: a value :class:`InputQuantizer` refuses.
    """
    if not isinstance(records, Mapping):
        raise TypeError(f"{where}: input_quantizers must be a mapping module name -> record, got "
                        f"{type(records).__name__}")
    return {str(n): _from_record(str(n), r, where).as_dict() for n, r in records.items()}


def recorded_quantizers(model: nn.Module, records: Mapping[str, Mapping[str, Any]], where: str = "the records"
                        ) -> dict[str, InputQuantizer]:
    """The :class:`InputQuantizer` of each record (the inverse of :meth:`InputQuantizer.as_dict` over
    :func:`input_quantizers`), checked against ``model``, not attached yet.

    Args:
        model: the model the records are for.
        records: ``{module name: {"bits", "symmetric", "scale", "zero"}}``.
        where: what holds the records, for error messages.

    Returns:
        ``{module name: quantizer}``.

    Raises:
        TypeError: a record that is not an object with exactly those keys, or values of the wrong type.
        ValueError: a bad value (:class:`InputQuantizer`'s checks), or a module ``model`` does not have.
    """
    built: dict[str, InputQuantizer] = {}
    for name, rec in records.items():
        q = _from_record(name, rec, where)
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: an input quantizer is recorded for {name!r}, which "
                             f"{type(model).__name__} does not have") from None
        built[name] = q
    return built


def attach_recorded(model: nn.Module, records: Mapping[str, Mapping[str, Any]], where: str = "the records"
                    ) -> dict[str, InputQuantizer]:
    """Make ``records`` the model's input quantizers: each one attached (:meth:`InputQuantizer.attach`) to its
    module, and any other active one (:func:`input_quantizers`) removed.

    Args:
        model: the model.
        records: ``{module name: {"bits", "symmetric", "scale", "zero"}}``.
        where: what holds the records, for error messages.

    Returns:
        ``{module name: quantizer}``.

    Raises:
        TypeError: see :func:`recorded_quantizers`.
        ValueError: see :func:`recorded_quantizers`; nothing is attached or removed then.
    """
    built = recorded_quantizers(model, records, where)
    set_input_quantizers(model, built)
    return built


def set_input_quantizers(model: nn.Module, quantizers: Mapping[str, InputQuantizer]) -> None:
    """Make ``quantizers`` the model's active input quantizers: each attached to its module, every other active
    one (:func:`input_quantizers`) removed.

    Args:
        model: the model.
        quantizers: ``{module name: quantizer}`` (names of ``model``'s modules).

    Raises:
        TypeError: a value that is not an :class:`InputQuantizer`.
        ValueError: a name that is not a module of ``model``.
        Both are checked before anything is attached or removed.
    """
    targets: dict[str, nn.Module] = {}
    for name, q in quantizers.items():
        if not isinstance(q, InputQuantizer):
            raise TypeError(f"the input quantizer for {name!r} must be an InputQuantizer, got {type(q).__name__}")
        try:
            targets[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"an input quantizer is given for {name!r}, which {type(model).__name__} does not "
                             "have") from None
    for name in input_quantizers(model):
        if name not in quantizers:
            mod: Any = model.get_submodule(name)
            mod.input_quantizer_handle.remove()
    for name, q in quantizers.items():
        q.attach(targets[name])
