"""The forward hooks on a model's modules, and what installed each.

A forward hook or pre-hook runs Python around a module's forward: it can change the module's input or output, so a
file that stores tensors only (a medquant checkpoint, a ``save_pretrained`` folder, an export) cannot carry it, and a
model loaded from that file computes without it. :func:`forward_hooks` lists every such hook with what installed it
(:data:`HOOK_OWNERS`):

* ``"adaptive"``: a site of an :class:`~medquant.adaptive.AdaptiveQuantizer` (per-sample activation bits); the
  quantizer's own state (bit map, sites) is saved with the quantizer, not with the model it hooks;
* ``"input"``: an :class:`~medquant.quant.activations.InputQuantizer` (a static activation quantizer, which
  medquant's checkpoints record and attach again);
* ``"reparametrization"``: torch's legacy weight reparametrisations (``torch.nn.utils.prune``, ``weight_norm``,
  ``spectral_norm``), whose state dict holds ``weight_orig`` and ``weight_mask`` (``weight_g`` and ``weight_v``)
  instead of ``weight``;
* ``"harmless"``: hooks known to change nothing the model computes (transformers' output recorders and
  ``enable_input_require_grads``, the input cast of medquant's ONNX simulation);
* ``"user"``: anything else.

The owner of a hook that a medquant object installs is read from that object's class attribute ``hook_owner``
(a bound method of the object, possibly inside ``functools.partial``), so this module does not import the packages
that install them. :meth:`ModuleHook.remove` takes a hook off even when the handle that registered it is lost.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from torch import nn

#: what a forward hook is, as :func:`forward_hooks` classifies it
HOOK_OWNERS = ("adaptive", "input", "reparametrization", "harmless", "user")

#: how to turn a torch reparametrisation into a plain weight (what a file of the model can hold)
MAKE_PERMANENT = ("make it permanent first (torch.nn.utils.prune.remove(module, 'weight'), "
                  "torch.nn.utils.remove_weight_norm(module), remove_spectral_norm(module))")


@dataclass(frozen=True)
class ModuleHook:
    """One forward hook or forward pre-hook on a module of a model (:func:`forward_hooks`).

    Attributes:
        module: the module's name in ``model.named_modules()`` (``""``: the model itself).
        kind: ``"forward pre-hook"`` or ``"forward hook"``.
        owner: what installed it (:data:`HOOK_OWNERS`): ``"adaptive"`` (an
            :class:`~medquant.adaptive.AdaptiveQuantizer`'s site), ``"input"`` (an
            :class:`~medquant.calibrate.InputQuantizer`), ``"reparametrization"`` (torch's legacy weight
            reparametrisations: ``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``), ``"harmless"``
            (hooks known not to change what the model computes) or ``"user"`` (anything else).
        what: the hook as the messages name it (its function's qualified name, or its owner's description).
        hook: the hook itself.
        target: the module it is registered on.
        key: its key in the module's hook table (the id of the handle that registered it).
    """

    module: str
    kind: str
    owner: str
    what: str
    hook: Any = field(compare=False, repr=False)
    target: nn.Module | None = field(default=None, compare=False, repr=False)
    key: int = -1

    def remove(self) -> None:
        """Take the hook off its module, also when the handle that registered it is lost (a model copied with
        ``copy.deepcopy``, a hook registered without keeping its handle).

        An AdaptiveQuantizer's hook: the quantizer's own ``remove()`` (all its sites; the copy's quantizer for a
        copied model). A torch reparametrisation: made permanent (``torch.nn.utils.prune.remove``,
        ``remove_weight_norm``, ``remove_spectral_norm``), so the module keeps computing with the weight it
        computed. Any other hook (an InputQuantizer's included): deleted from the module's hook tables.

        Raises:
            ValueError: a hook that :func:`forward_hooks` did not return (no module to take it off).
        """
        if self.target is None:
            raise ValueError(f"{self.describe()}: not a hook listed by forward_hooks(model), no module to remove "
                             "it from")
        fn = _hook_function(self.hook)
        if self.owner == "adaptive":
            fn.__self__.remove()
        elif self.owner == "reparametrization":
            from torch.nn.utils import prune, remove_spectral_norm, remove_weight_norm
            from torch.nn.utils.weight_norm import WeightNorm

            if isinstance(self.hook, prune.BasePruningMethod):
                prune.remove(self.target, self.hook._tensor_name)
            elif isinstance(self.hook, WeightNorm):
                remove_weight_norm(self.target, self.hook.name)
            else:
                remove_spectral_norm(self.target, self.hook.name)
        for table in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(self.target, table, {}).pop(self.key, None)

    @property
    def installer(self) -> Any:
        """The object whose bound method the hook runs (an AdaptiveQuantizer, an InputQuantizer), else None."""
        return getattr(_hook_function(self.hook), "__self__", None)

    def describe(self) -> str:
        """The hook as a refusal names it.

        Returns:
            ``"<module>: <kind> <what>"``, e.g. ``"model.norm: forward pre-hook of an AdaptiveQuantizer (...)"``.
        """
        return f"{self.module or '(model)'}: {self.kind} {self.what}"


def _hook_function(hook: Any) -> Any:
    """The function a hook runs: a ``functools.partial``'s function, else the hook."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    return hook


#: hooks that change nothing an export computes: transformers' output recorders (installed by a model's first
#: forward on the modules whose outputs ``output_hidden_states`` / ``output_attentions`` collect; they return
#: None), transformers' ``enable_input_require_grads`` (it marks the input embeddings' output as requiring
#: gradients, for gradient checkpointing of a frozen model); the input cast of medquant's ONNX simulation
#: (``calibrate_activations``: floating inputs to float32, as the exported model casts them)
_HARMLESS_HOOKS = (("transformers.utils.output_capturing", "output_capturing_hook"),
                   ("transformers.modeling_utils", "make_inputs_require_grads"),
                   ("medquant.deploy.onnx_sim", "_float32_inputs"))


def _classify_hook(hook: Any) -> tuple[str, str]:
    """``(owner, what)`` of one forward hook (:class:`ModuleHook`)."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    fn = _hook_function(hook)
    owner = getattr(fn, "__self__", None)
    installed_by = getattr(type(owner), "hook_owner", None)
    if installed_by == "adaptive":
        site = [s for s in owner.sites if isinstance(hook, functools.partial) and hook.args[:1] == (s[0],)]
        return "adaptive", "of an AdaptiveQuantizer (per-sample activation bits" + \
            (f" at site {site[0]!r})" if site else ")")
    if installed_by == "input":
        return "input", (f"of an InputQuantizer ({owner.bits}-bit {'sym' if owner.symmetric else 'asym'} "
                         "per-tensor)")
    if isinstance(hook, (WeightNorm, SpectralNorm, prune.BasePruningMethod)):
        tensor = getattr(hook, "_tensor_name", None) or getattr(hook, "name", "weight")
        return "reparametrization", f"{type(hook).__name__} (torch.nn.utils reparametrisation of {tensor!r})"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    short = name.rsplit(".", 1)[-1] if "<locals>" in name else name  # a closure: its own name
    if (module, name.rsplit(".", 1)[-1]) in _HARMLESS_HOOKS:
        return "harmless", short
    return "user", f"{short} ({module})"


def forward_hooks(model: nn.Module) -> list[ModuleHook]:
    """Every forward pre-hook and forward hook on ``model`` and its modules, classified by what installed it.

    Only forward hooks change what a module computes (its input or its output); backward hooks and state-dict
    hooks do not, and are not listed.

    Args:
        model: the model to inspect.

    Returns:
        The hooks in module order (a module bound under several names, under its first), each module's pre-hooks
        first, in the order they run; :meth:`ModuleHook.remove` takes one off.
    """
    out = []
    for name, m in model.named_modules():
        for kind, table in (("forward pre-hook", m._forward_pre_hooks), ("forward hook", m._forward_hooks)):
            for key, hook in table.items():
                owner, what = _classify_hook(hook)
                out.append(ModuleHook(name, kind, owner, what, hook, m, key))
    return out
