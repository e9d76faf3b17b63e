"""Mixture-of-experts layers whose experts are 3-D parameters, quantized per expert: :class:`QuantExperts`.

transformers 5 stores the experts of an MoE block (Mixtral, Qwen2/Qwen3-MoE, Qwen3-VL-MoE, DeepSeek, GPT-OSS,
Llama 4 ...) as one module holding stacked weights: ``gate_up_proj`` ``(E, 2I, H)`` (or ``up_proj`` ``(E, I, H)``
for experts without a gate) and ``down_proj`` ``(E, H, I)``, or the transposed ``(E, H, 2I)`` / ``(E, I, H)`` when
the class says ``is_transposed`` (GPT-OSS, Aria, Llama 4), optionally with biases ``(E, out)``. Such a module has
no ``nn.Linear`` to quantize. :class:`QuantExperts` replaces it: for every expert ``e`` one
:class:`~medquant.QuantLinear` per projection (children ``gate_up.e`` / ``up.e`` and ``down.e``),
each holding ``W_e`` as a ``(out, in)`` matrix in the packed layout of every other quantized layer (rows = output
features; for a transposed layout ``W_e`` is the transpose of the stored slice), so save/load, the transformers
round trip, the kernels and the size accounting treat each expert's matrices as ordinary quantized linears.

Two forward conventions are reproduced exactly (with the dequantized weights ``W^_e`` in place of ``W_e``):

* **routed** (classes decorated with transformers' ``use_experts_implementation``, whose ``forward`` is the one the
  decorator installed: a subclass with its own ``forward``, e.g. Ergo's ``ErgoExperts`` with a per-expert norm
  before the routing weights, computes something else and is left in floating point, reported by
  :func:`unsupported_experts`):
  ``forward(x (T, H), top_k_index (T, k), top_k_weights (T, k))``; for each token ``t`` and slot ``j`` with expert
  ``e = top_k_index[t, j]`` (``e == E`` is the expert-parallel sentinel and contributes nothing)::

      h = W^gu_e x_t + b^gu_e
      a = gate(h)   (the class's ``_apply_gate``: act(h[:I]) * h[I:] by default, interleaved for GPT-OSS)
          or act(h) for experts without a gate
      y_t += top_k_weights[t, j] * post_norm(W^d_e a + b^d_e)       (post_norm only where the class has one)

* **dense** (Llama 4 text experts): ``forward(x (E*T, H))`` where rows ``e*T .. e*T+T-1`` are the inputs of
  expert ``e`` (already scaled by the router); ``gate, up = split(W^gu_e x)``, ``y = W^d_e (up * act(gate))``.

The router (``gate`` / ``router``: a ``(E, H)`` weight, or a module computing the logits with child linears
such as Gemma 4's ``router.proj``, whose logits pick the top-k experts) is not part of this
module; :func:`moe_routers` finds the routers (also those beside experts held as one module per expert, a
``ModuleList`` / ``ModuleDict`` of MLPs, whose Linear layers are quantized as any other) and :func:`medquant.quantize_` keeps them in floating point by
default and says so (a router is ``E x H`` weights, a tiny fraction of an MoE layer, and its top-k decision is
discontinuous in its weights).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterable, Iterator
from typing import Any, TypeGuard, cast

import torch
from torch import nn

from .config import QuantConfig
from .modules import QuantLinear

__all__ = ["QuantExperts", "expand_recorded_experts", "experts_layout", "is_experts_module", "moe_routers",
           "unsupported_experts"]

_ROUTED_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
_ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
# child ModuleList of the per-expert layers of each 3-D parameter; not the parameter's own name, which
# transformers' checkpoint conversions rewrite (``mlp.experts.gate_up_proj`` <-> per-expert ``w1`` / ``w3``)
_CHILD = {"gate_up_proj": "gate_up", "up_proj": "up", "down_proj": "down"}


def _materialized(p: torch.Tensor | None) -> TypeGuard[torch.Tensor]:
    """Whether ``p`` is a tensor whose shape can be read: not ``None`` and not the uninitialized parameter of a
    lazy module (``nn.LazyLinear`` before its first forward), which raises on any use."""
    return p is not None and not nn.parameter.is_lazy(p)


def _param3(m: nn.Module, name: str) -> torch.Tensor | None:
    p = m._parameters.get(name)
    return p if _materialized(p) and p.dim() == 3 else None


def experts_layout(m: nn.Module) -> dict[str, Any] | None:
    """How a float experts module computes, or ``None`` when it is not one this module can quantize.

    Returns ``{"style": "routed" | "dense", "gate": bool, "bias": bool, "transposed": bool, "num_experts": E,
    "hidden": H, "inter": I, "post_norm": bool}``: the layout of its weights (what size accounting and pruning
    read). Whether :class:`QuantExperts` reproduces its forward too is :func:`is_experts_module`."""
    if isinstance(m, QuantExperts):
        return None
    down = _param3(m, "down_proj")
    if down is None:
        return None
    if all(isinstance(getattr(m, f, None), bool) for f in _ROUTED_FLAGS):
        gate = bool(m.has_gate)
        up = _param3(m, "gate_up_proj" if gate else "up_proj")
        if up is None:
            return None
        transposed, bias = bool(m.is_transposed), bool(m.has_bias)
        e = up.shape[0]
        out_up, hid = (up.shape[2], up.shape[1]) if transposed else (up.shape[1], up.shape[2])
        d_out, d_in = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
        inter = out_up // 2 if gate else out_up
        if down.shape[0] != e or d_out != hid or d_in != inter or (gate and out_up % 2):
            return None
        if bias and (_param2(m, ("gate_up_proj_bias" if gate else "up_proj_bias"), (e, out_up)) is None
                     or _param2(m, "down_proj_bias", (e, hid)) is None):
            return None
        post = bool(getattr(m, "has_post_expert_norm", False))
        if post and not isinstance(getattr(m, "post_expert_norm", None), nn.Module):
            return None
        return {"style": "routed", "gate": gate, "bias": bias, "transposed": transposed, "num_experts": e,
                "hidden": hid, "inter": inter, "post_norm": post}
    up = _param3(m, "gate_up_proj")
    if up is None or set(m._parameters) != {"gate_up_proj", "down_proj"}:
        return None
    try:
        n_args = len(inspect.signature(type(m).forward).parameters)
    except (TypeError, ValueError):
        return None
    e, hid, two_i = up.shape
    if n_args != 2 or two_i % 2 or tuple(down.shape) != (e, two_i // 2, hid) or not callable(getattr(m, "act_fn", None)):
        return None
    return {"style": "dense", "gate": True, "bias": False, "transposed": True, "num_experts": e, "hidden": hid,
            "inter": two_i // 2, "post_norm": False}


def _decorated_forward(cls: type) -> bool:
    """Whether ``cls.forward`` is the one transformers' ``use_experts_implementation`` installed (it wraps, with
    ``functools.wraps``, both ``__init__`` and ``forward`` of the class it decorates), not a subclass's own."""
    owner = next((c for c in cls.__mro__ if "forward" in c.__dict__), None)
    return owner is not None and hasattr(owner.__dict__["forward"], "__wrapped__") \
        and hasattr(owner.__dict__.get("__init__"), "__wrapped__")


def _param2(m: nn.Module, name: str, shape: tuple[int, int]) -> torch.Tensor | None:
    p = m._parameters.get(name)
    return p if _materialized(p) and tuple(p.shape) == shape else None


def is_experts_module(m: nn.Module) -> bool:
    """Whether ``m`` is a float experts module with 3-D weights that :class:`QuantExperts` reproduces: a known
    :func:`experts_layout`, and for the routed style a class whose ``forward`` is the one transformers'
    ``use_experts_implementation`` installed (a subclass with its own ``forward``, e.g. Ergo's ``ErgoExperts``
    with a per-expert norm before the routing weights, computes something else)."""
    lay = experts_layout(m)
    return lay is not None and (lay["style"] != "routed" or _decorated_forward(type(m)))


def _looks_like_experts(m: nn.Module) -> bool:
    """A module holding a 3-D parameter whose first dimension is its ``num_experts`` (or named like experts);
    uninitialized parameters of lazy modules are not looked at (their shape is unknown)."""
    n = getattr(m, "num_experts", None)
    for p in m._parameters.values():
        if _materialized(p) and p.dim() == 3 and (p.shape[0] == n or "expert" in type(m).__name__.lower()):
            return True
    return False


def unsupported_experts(model: nn.Module) -> list[str]:
    """Names of modules that hold per-expert 3-D weights in a layout :class:`QuantExperts` does not reproduce.

    They stay in floating point; :func:`medquant.quantize_` reports them in a warning.

    Args:
        model: the model to search.

    Returns:
        Module names in ``named_modules`` order (empty for a model without such modules).
    """
    return [n for n, m in model.named_modules()
            if not isinstance(m, QuantExperts) and _looks_like_experts(m) and not is_experts_module(m)]


def _expert_list_hidden(name: str, m: nn.Module) -> int | None:
    """The hidden size of experts held as one module per expert, or ``None`` when ``m`` is not such a container:
    an ``nn.ModuleList`` / ``nn.ModuleDict`` whose own name contains ``expert`` (``experts``,
    ``block_sparse_moe.experts``), holding at least two modules of one class, the first of which contains a
    Linear (float or :class:`~medquant.QuantLinear`); the hidden size is that first Linear's ``in_features``
    (transformers 4's Mixtral ``w1``, SwitchTransformers' ``wi``, NLLB-MoE's ``fc1``, remote-code DeepSeek's
    ``gate_proj``)."""
    if not isinstance(m, (nn.ModuleList, nn.ModuleDict)) or "expert" not in name.rpartition(".")[2].lower():
        return None
    kids = list(m.children())
    if len(kids) < 2 or len({type(k) for k in kids}) != 1:
        return None
    first = next((s for s in kids[0].modules() if isinstance(s, (nn.Linear, QuantLinear))), None)
    return None if first is None else int(first.in_features)


def moe_routers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of the routers of the MoE blocks of ``model``.

    An MoE block holds experts as 3-D weights (a float experts module or :class:`QuantExperts`: ``hidden`` is
    its layout's) or as one module per expert (a ``ModuleList`` / ``ModuleDict`` named like ``experts``, of at
    least two modules of one class: transformers 4's Mixtral, SwitchTransformers, NLLB-MoE, remote-code
    DeepSeek; ``hidden`` is the ``in_features`` of the first expert's first Linear). A router is a sibling of
    the experts named ``gate`` / ``router`` / ``shared_expert_gate`` that holds a materialized 2-D ``weight``
    with ``hidden`` columns; a sibling so named without a ``weight`` of its own computes the logits with child
    layers (Gemma 4's ``router.proj``, HunYuan's ``gate.wg``, LongCat's and SwitchTransformers'
    ``router.classifier``): each module below it with a 2-D ``weight`` is then a router.

    Args:
        model: the model to search.

    Returns:
        ``{module name: router module}``; :func:`medquant.quantize_` keeps these in floating point unless named
        exactly in its config map.
    """
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        lay = m.layout if isinstance(m, QuantExperts) else experts_layout(m)
        hidden = lay["hidden"] if lay is not None else _expert_list_hidden(name, m)
        if hidden is None:
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        for child_name, child in parent.named_children():
            if child_name not in _ROUTER_NAMES:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            w = getattr(child, "weight", None)
            if isinstance(w, torch.Tensor):
                if _materialized(w) and w.dim() == 2 and w.shape[1] == hidden:
                    out[full] = child
                continue
            for sub_name, sub in child.named_modules(prefix=full):
                w = getattr(sub, "weight", None)
                if sub is not child and isinstance(w, torch.Tensor) and _materialized(w) and w.dim() == 2:
                    out[sub_name] = sub
    return out


def _template(m: nn.Module) -> nn.Module:
    """A shallow copy of a float experts module with its weights on the meta device (no memory): it keeps the
    class, the attributes the class's ``_apply_gate`` reads (``act_fn``, ``alpha``, ``limit`` ...) and rebuilds
    the float module in :meth:`QuantExperts.to_float`."""
    t = copy.copy(m)
    t._parameters = {k: (None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                              requires_grad=False))
                     for k, p in m._parameters.items()}
    t._buffers = {k: (None if b is None else torch.empty(b.shape, dtype=b.dtype, device="meta"))
                  for k, b in m._buffers.items()}
    t._modules = {k: v for k, v in m._modules.items() if v is not None and not any(True for _ in v.parameters())}
    t._forward_hooks, t._forward_pre_hooks = type(t._forward_hooks)(), type(t._forward_pre_hooks)()
    return t


def _layer_dtype(lin: nn.Module) -> torch.dtype:
    """The dtype an expert layer computes with: a QuantLinear's ``weight_dtype``, a float layer's weight dtype."""
    if isinstance(lin, QuantLinear):
        return lin.weight_dtype
    return cast(torch.Tensor, lin.weight).dtype


class QuantExperts(nn.Module):
    """The quantized experts of one MoE block (see the module docstring for what it computes).

    Children: ``gate_up`` (``up`` for experts without a gate) and ``down``, each an
    ``nn.ModuleList`` of ``E`` :class:`~medquant.QuantLinear` (an entry may be a float ``nn.Linear``: an expert
    left in floating point computes the same way); ``act_fn`` and ``post_expert_norm`` where the float module has
    them. Build with :meth:`from_float`; :meth:`to_float` gives back the float module of the original class with the
    dequantized weights.

    Args:
        float_module: the float experts module (3-D weights; possibly on the meta device) whose layout and
            activation are reproduced.
        children: ``{"gate_up" | "up": [E layers], "down": [E layers]}``, one ``(out, in)`` layer per expert:
            ``gate_up`` ``H -> 2I`` (``up`` ``H -> I`` for experts without a gate), ``down`` ``I -> H`` (its
            ``in_features -> out_features``).

    Raises:
        TypeError: ``float_module`` is not an experts module in a layout QuantExperts reproduces.
        ValueError: ``children`` does not have exactly the keys of the layout, a list does not hold one layer per
            expert, or a layer's ``in_features -> out_features`` is not its projection's.
    """

    _track_rows: bool = False
    routed_rows: tuple[torch.Tensor, int] | None = None

    def __init__(self, float_module: nn.Module, children: dict[str, list[nn.Module]]) -> None:
        super().__init__()
        lay = experts_layout(float_module)
        if lay is None or not is_experts_module(float_module):
            raise TypeError(f"{type(float_module).__name__} is not an experts module with 3-D weights that "
                            "QuantExperts reproduces" + ("" if lay is None else " (its class overrides the forward "
                                                         "of transformers' use_experts_implementation)"))
        self.layout = lay
        self.num_experts = lay["num_experts"]
        self.source_class = type(float_module).__name__
        object.__setattr__(self, "_float_template", _template(float_module))
        self.up_name = "gate_up" if lay["gate"] else "up"
        h, i = lay["hidden"], lay["inter"]
        dims = {self.up_name: (h, 2 * i if lay["gate"] else i), "down": (i, h)}
        if set(children) != set(dims):
            raise ValueError(f"children has keys {sorted(children)} (unexpected {sorted(set(children) - set(dims))}, "
                             f"missing {sorted(set(dims) - set(children))}); {self.source_class} expects exactly "
                             f"{', '.join(map(repr, dims))}")
        for key, (n_in, n_out) in dims.items():
            mods = list(children[key])
            if len(mods) != self.num_experts:
                raise ValueError(f"{key}: {len(mods)} expert layers for {self.num_experts} experts")
            for e, mod in enumerate(mods):
                got = (getattr(mod, "in_features", None), getattr(mod, "out_features", None))
                if got != (n_in, n_out):
                    raise ValueError(f"{key}.{e}: {got[0]} -> {got[1]} features ({type(mod).__name__}); "
                                     f"{self.source_class} expects {n_in} -> {n_out} for {key}")
            self.add_module(key, nn.ModuleList(mods))
        act = getattr(float_module, "act_fn", None)
        if isinstance(act, nn.Module):
            self.act_fn = act
        if lay["post_norm"]:
            self.post_expert_norm = float_module.post_expert_norm

    # ------------------------------------------------------------------ building
    @staticmethod
    def expert_weights(module: nn.Module) -> dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]:
        """The per-expert ``(W_e, b_e)`` matrices of a float experts module, as ``(out, in)`` views (no copy).

        Args:
            module: the float experts module.

        Returns:
            ``{"gate_up_proj" | "up_proj": [(W_e, b_e)], "down_proj": [...]}``, one pair per expert (``W_e``
            transposed for transposed layouts; ``b_e`` None without biases).

        Raises:
            TypeError: ``module`` is not a supported experts module.
        """
        lay = experts_layout(module)
        if lay is None:
            raise TypeError(f"{type(module).__name__} is not a supported experts module")
        up_name = "gate_up_proj" if lay["gate"] else "up_proj"
        out: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        for key in (up_name, "down_proj"):
            w = cast(torch.Tensor, module._parameters[key]).detach()
            b = cast(torch.Tensor, module._parameters[key + "_bias"]).detach() if lay["bias"] else None
            out[key] = [(w[e].t() if lay["transposed"] else w[e], None if b is None else b[e])
                        for e in range(lay["num_experts"])]
        return out

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig) -> QuantExperts:
        """Quantize every expert's matrices of ``module`` with ``config``.

        Each matrix is quantized as an ``(out, in)`` matrix, rows = output features, exactly as
        :meth:`QuantLinear.from_float` of that matrix.

        Args:
            module: the float experts module (weights loaded).
            config: one config for every expert matrix (``channel_bits`` not allowed).

        Returns:
            The new ``QuantExperts`` in ``module``'s train / eval mode.

        Raises:
            TypeError: ``config`` is not a ``QuantConfig``, or ``module`` is not a supported experts module.
            ValueError: ``config.channel_bits`` is set, or the weights are on the meta device.
        """
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a medquant.QuantConfig, got {type(config).__name__}")
        if config.channel_bits is not None:
            raise ValueError("per-output-channel bit-widths (channel_bits) are not supported for MoE experts: "
                             "every expert matrix has its own rows; use one bit-width for the experts")
        children: dict[str, list[nn.Module]] = {key: [QuantLinear.from_float(lin, config) for lin in layers]
                                                for key, layers in cls._float_views(module, "").items()}
        q = cls(module, children)
        q.train(module.training)
        return q

    @classmethod
    def unfolded(cls, module: nn.Module) -> QuantExperts:
        """A QuantExperts computing exactly what the float ``module`` computes, with float layers (no copy).

        Each expert and projection gets one float ``nn.Linear`` whose weight (and bias) is a view of the module's
        3-D parameter slice. This is the form in which the calibrating quantizers (GPTQ, AdaRound) see an experts
        module: every expert's matrices become ordinary layers, each called only on the tokens routed to its
        expert, so a layer's calibration inputs are exactly the rows that expert computes on. :meth:`to_float`
        gives the float module back (stacked copies of the same values).

        Args:
            module: the float experts module (weights loaded).

        Returns:
            The new ``QuantExperts`` in ``module``'s train / eval mode.

        Raises:
            TypeError: ``module`` is not a supported experts module.
            ValueError: the weights are on the meta device.
        """
        if not is_experts_module(module):
            raise TypeError(f"{type(module).__name__} is not an experts module with 3-D weights that QuantExperts "
                            "reproduces")
        q = cls(module, cls._float_views(module, f"{type(module).__name__}: "))
        q.train(module.training)
        return q

    @classmethod
    def _float_views(cls, module: nn.Module, who: str) -> dict[str, list[nn.Module]]:
        """Child key (``gate_up`` / ``up`` / ``down``) -> one frozen float ``nn.Linear`` per expert whose weight
        (and bias) is a view of the module's 3-D parameter slice (no copy); ``who`` starts the meta-device error."""
        children: dict[str, list[nn.Module]] = {}
        for pkey, pairs in cls.expert_weights(module).items():
            layers: list[nn.Module] = []
            for w, b in pairs:
                if w.device.type == "meta":
                    raise ValueError(f"{who}its weights are on the meta device (not loaded): load them first")
                with torch.device("meta"):
                    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
                lin.weight = nn.Parameter(w, requires_grad=False)
                if b is not None:
                    lin.bias = nn.Parameter(b, requires_grad=False)
                layers.append(lin)
            children[_CHILD[pkey]] = layers
        return children

    @classmethod
    def shell(cls, module: nn.Module, recorded: Iterable[str] = ()) -> QuantExperts:
        """An empty QuantExperts for ``module`` whose expert layers are placeholders for a loader to replace.

        Args:
            module: a float experts module, possibly on the meta device.
            recorded: the expert layers saved quantized, named relative to this module (``"gate_up.3"``): they
                become weightless ``nn.Linear`` of the right shape (the loader swaps in the recorded quantized
                layer); the others are float ``nn.Linear`` on the module's device, to be loaded.

        Returns:
            The shell.

        Raises:
            TypeError: ``module`` is not a supported experts module.
        """
        lay = experts_layout(module)
        if lay is None:
            raise TypeError(f"{type(module).__name__} is not a supported experts module")
        ref = cast(torch.Tensor, module._parameters["down_proj"])
        rec = set(recorded)
        children: dict[str, list[nn.Module]] = {}
        for key, (n_in, n_out) in (("gate_up" if lay["gate"] else "up",
                                    (lay["hidden"], lay["inter"] * (2 if lay["gate"] else 1))),
                                   ("down", (lay["inter"], lay["hidden"]))):
            layers: list[nn.Module] = []
            for e in range(lay["num_experts"]):
                if f"{key}.{e}" in rec:
                    with torch.device("meta"):
                        lin = nn.Linear(n_in, n_out, bias=False)
                    lin.weight = None  # type: ignore[assignment]  # replaced by the recorded layer
                else:
                    lin = nn.Linear(n_in, n_out, bias=lay["bias"], device=ref.device, dtype=ref.dtype)
                layers.append(lin)
            children[key] = layers
        return cls(module, children)

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The float experts module of the original class, holding the dequantized weights.

        The per-expert ``(u - z) * s`` matrices are stacked back into the 3-D layout, transposed where the class
        stores them transposed.

        Args:
            dtype: dtype of the float weights; ``None`` is the dtype the expert layers dequantize to (their
                ``weight_dtype``, which follows a later ``.to(dtype)`` of the model, as :meth:`QuantLinear.to_float`).

        Returns:
            A new module of the original class (``source_class``).
        """
        lay = self.layout
        m = copy.copy(self._float_template)
        m._modules = dict(self._float_template._modules)
        if lay["post_norm"]:
            m._modules["post_expert_norm"] = self.post_expert_norm
        params: dict[str, nn.Parameter | None] = {}
        for key in ("gate_up_proj" if lay["gate"] else "up_proj", "down_proj"):
            layers = getattr(self, _CHILD[key])
            dt = dtype or _layer_dtype(layers[0])
            ws, bs = [], []
            for lin in layers:
                w = lin.dequantized_weight(dt) if isinstance(lin, QuantLinear) else lin.weight.detach().to(dt)
                ws.append(w.t() if lay["transposed"] else w)
                if lay["bias"]:
                    bs.append(lin.bias.detach().to(dt))
            params[key] = nn.Parameter(torch.stack(ws).contiguous(), requires_grad=False)
            if lay["bias"]:
                params[key + "_bias"] = nn.Parameter(torch.stack(bs).contiguous(), requires_grad=False)
        m._parameters = {k: params.get(k) for k in self._float_template._parameters}
        return m

    # ------------------------------------------------------------------ compute
    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        if not self.layout["gate"]:
            return self.act_fn(h)
        return type(self._float_template)._apply_gate(self, h) if hasattr(
            type(self._float_template), "_apply_gate") else self._default_gate(h)

    def _default_gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # attributes of the float class (alpha, limit, config ...) that its _apply_gate reads
            tmpl = self.__dict__.get("_float_template")
            if tmpl is not None and not name.startswith("_") and name in tmpl.__dict__:
                return tmpl.__dict__[name]
            raise

    @contextlib.contextmanager
    def tracking_rows(self) -> Iterator[None]:
        """Record, while each expert computes, which input rows it received (for calibration hooks).

        Within the context, while expert ``e`` computes, :attr:`routed_rows` is ``(rows, tokens)``: the indices
        (into the ``tokens`` rows of the ``hidden_states`` this module was called with, flattened as the model
        flattens them) of the rows that expert ``e``'s layers receive, in their order. A calibration hook on an
        expert layer reads it to map the layer's input rows back to the batch's tokens (their padding mask, their
        sample's group label). Outside an expert's computation, and outside the context, it is ``None``.

        Yields:
            Nothing; the recording stops (and :attr:`routed_rows` is ``None``) when the context exits.
        """
        self._track_rows = True
        try:
            yield
        finally:
            self._track_rows = False
            self.routed_rows = None

    def _expert(self, e: int, x: torch.Tensor, rows: torch.Tensor | None = None, tokens: int = 0
                ) -> torch.Tensor:
        if not self._track_rows:
            return self._expert_out(e, x)
        self.routed_rows = (rows if rows is not None else torch.arange(x.shape[0], device=x.device),
                            tokens or x.shape[0])
        y = self._expert_out(e, x)
        self.routed_rows = None  # (after an error: when tracking_rows exits)
        return y

    def _dense_routed(self, x: torch.Tensor) -> torch.Tensor:
        """The dense forward while rows are tracked: each expert computes on its routed rows only.

        In the dense style every expert receives every token, pre-scaled by its router score, which is exactly 0
        for the tokens the router did not send to it (Llama 4: ``sigmoid(-inf)``). Such a zero row is no input
        of the expert (and with no biases in this style its output row is exactly 0: ``W^d (act(W^g 0) * W^u 0)
        = 0``), so expert ``e`` is called on the non-zero rows of ``x[e]`` only, and not at all when there are
        none: its layers see the tokens routed to it, as in the routed style.

        Args:
            x: ``(E, T, H)``, the rows of expert ``e`` in ``x[e]``.

        Returns:
            ``(E * T, H)``: the dense forward's output.
        """
        out = torch.zeros(x.shape[0], x.shape[1], self.layout["hidden"], dtype=x.dtype, device=x.device)
        for e in range(self.num_experts):
            rows = torch.nonzero((x[e] != 0).any(dim=-1)).flatten()
            if rows.numel():
                out[e, rows] = self._expert(e, x[e, rows], rows, x.shape[1]).to(out.dtype)
        return out.view(-1, self.layout["hidden"])

    def _expert_out(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self._gate(getattr(self, self.up_name)[e](x))
        y = self.down[e](h)
        if self.layout["post_norm"]:
            y = cast(nn.Module, self.post_expert_norm)(y)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.layout["style"] == "dense":
            x = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
            if self._track_rows:
                return self._dense_routed(x)
            return torch.stack([self._expert(e, x[e]) for e in range(self.num_experts)]).view(
                -1, self.layout["hidden"])
        if top_k_index is None or top_k_weights is None:
            raise TypeError(f"{self.source_class} (quantized) needs hidden_states, top_k_index and top_k_weights")
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index[top_k_index < self.num_experts]).tolist()
        for e in hit:
            token_idx, pos = torch.where(top_k_index == e)
            y = self._expert(int(e), hidden_states[token_idx], token_idx, hidden_states.shape[0]) \
                * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        lay = self.layout
        return (f"{self.source_class}, experts={self.num_experts}, hidden={lay['hidden']}, inter={lay['inter']}, "
                f"style={lay['style']}, transposed={lay['transposed']}, bias={lay['bias']}")


def expand_recorded_experts(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Before quantized layers recorded under ``names`` are put into a float ``model`` (loading a checkpoint):
    replace each float experts module that has recorded expert layers below it (``...experts.gate_up.0``) by
    a :meth:`QuantExperts.shell`, so every recorded name resolves to a module. Returns the expanded names."""
    by_parent: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        if len(parts) < 3 or not parts[-1].isdigit():
            continue
        parent = ".".join(parts[:-2])
        try:
            model.get_submodule(name)
            continue
        except AttributeError:
            pass
        try:
            mod = model.get_submodule(parent) if parent else model
        except AttributeError:
            continue
        if is_experts_module(mod):
            by_parent.setdefault(parent, []).append(".".join(parts[-2:]))
    for parent, rel in by_parent.items():
        old = model.get_submodule(parent)
        new = QuantExperts.shell(old, rel)
        new.train(old.training)
        owner_name, _, attr = parent.rpartition(".")
        setattr(model.get_submodule(owner_name) if owner_name else model, attr, new)
    return list(by_parent)
