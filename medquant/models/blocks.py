"""The repeated blocks of a model: which ``nn.ModuleList`` entries they are, and where their attention and
feed-forward linears live.

One listing serves every caller: sequential (block-by-block) quantization and its shards, AWQ and structured
pruning.

:func:`block_stacks` lists the block names per stack in forward order: ``[vision blocks, language blocks]``
(``vision_layers`` then ``language_model_layers`` from :mod:`medquant.models.introspect`; the vision tower runs
first because its output feeds the language model). A plain ``nn.Module`` (not a Hugging Face model) has no
roles and gives ``[]``.

:func:`transformer_blocks` describes the blocks of the stacks in a scope by the names of their linear layers,
and also accepts plain modules (their shallowest non-empty ``nn.ModuleList`` is the stack):

=====================  ==============================================  ==========================================
family                 attention (q, k, v -> o)                        FFN (in -> out)
=====================  ==============================================  ==========================================
LLaMA / Qwen / Gemma   ``self_attn.{q,k,v}_proj`` -> ``self_attn.o_proj``  ``mlp.{gate,up}_proj`` -> ``mlp.down_proj``
GLM-4V / Phi-3                                                         ``mlp.gate_up_proj`` (fused) -> ``down_proj``
LFM2                                                                   ``feed_forward.{w1,w3}`` -> ``w2``
SigLIP / CLIP / Idefics3  ``self_attn.{q,k,v}_proj`` -> ``out_proj``    ``mlp.fc1`` -> ``mlp.fc2``
BART / mBART / Whisper ``self_attn.{q,k,v}_proj`` -> ``out_proj``      ``fc1`` -> ``fc2``
(Florence-2)
ViT (transformers 5)   ``attention.{q,k,v}_proj`` -> ``o_proj``        ``mlp.fc1`` -> ``mlp.fc2``
BERT                   ``attention.self.{query,key,value}``            ``intermediate.dense`` -> ``output.dense``
                       -> ``attention.output.dense``
T5 (BLIP-2 Flan-T5)    ``layer.0.SelfAttention.{q,k,v}`` -> ``o``      ``layer.{1|2}.DenseReluDense.wi`` -> ``wo``;
                                                                       gated (T5 v1.1, Flan-T5): ``wi_0``, ``wi_1``
=====================  ==============================================  ==========================================

Heads are read from the shapes: ``head_dim`` from the attention module (``head_dim``, ``attention_head_size`` or
T5's ``key_value_proj_dim``), ``n_heads = o.in_features / head_dim``, ``n_kv = k.out_features / head_dim``; a query
projection with twice those rows is gated attention (Qwen3.5 / Qwen3-Next: each head's ``2 * head_dim`` rows are
its query then its output gate, :attr:`AttentionUnit.q_head_rows`). Query head ``h`` reads key/value head
``h // (n_heads / n_kv)`` (``repeat_kv`` in transformers). Per-head q/k norms (Chameleon: ``q_norm.weight`` of
shape ``(n_heads, head_dim)``) belong to their heads (:attr:`AttentionUnit.q_norm`); norms over ``head_dim`` only
(Qwen3, Gemma 3) are shared by every head and need nothing. A fused gate/up projection (``gate_up_proj``, split
in halves by ``chunk(2)``) gives neuron ``j`` the rows ``j`` and ``I + j`` (:attr:`FFNUnit.chunks` = 2).

A projection may be wrapped: a module holding exactly one ``nn.Linear`` named ``linear`` and, besides it, nothing
but scalar ``input_min`` / ``input_max`` / ``output_min`` / ``output_max`` buffers (Gemma 4's vision and audio
``Gemma4ClippableLinear``: ``clamp(linear(clamp(x, input_min, input_max)), output_min, output_max)``) counts as its
linear when :func:`transformer_blocks` is asked to look through such wrappers (``clamp_wrappers=True``, as pruning
does), and the unit names the inner layer (``self_attn.q_proj.linear``). Removing rows or columns of the inner
linear is exact through the clamps (scalar bounds applied element by element); rescaling its input channels or
output rows is not once a bound is finite, so each unit lists those linears with the side of their finite bounds
(:attr:`AttentionUnit.clamped`, :attr:`FFNUnit.clamped`). transformers builds the bounds at +-inf and fills them from
the checkpoint (released Gemma 4 vision towers are reported to carry finite ones), or leaves them out
(``use_clipped_linears`` False, the default of ``Gemma4VisionConfig``). An attention that normalises each value head (Gemma 4, Gemma 3n: ``v_norm``)
names that norm (:attr:`AttentionUnit.v_norm`).

What cannot be pruned is said per block in :attr:`Block.unsupported` (``{"heads" | "ffn": reason}``): units whose
projections are not float ``nn.Linear`` (a quantized model's ``QuantLinear``: its blocks are still listed, as
:func:`block_stacks` lists them, and the reason names those layers; heads and neurons are removed from float layers
only, so prune the float model, then quantize it), fused
``qkv`` projections (Qwen2-VL vision blocks, :attr:`Block.fused_attention`), linear-attention and convolution
mixers (Qwen3.5 ``linear_attn``, LFM2 ``conv``), the cross-attention of an encoder-decoder block that has no
separate q / k / v / o linears or is T5-style (its heads are kept; self-attention heads are pruned), and every head of
T5-style attention (:func:`shares_position_bias`: the relative position bias computed in the first block of a stack is
added, head by head, in every later block, so a block cannot lose heads alone; T5's FFN neurons are pruned). MoE experts stored as 3-D
weights (one module for all experts, transformers 5) are named by :attr:`Block.experts` (:mod:`medquant.prune`
removes each expert's neurons); a shared expert MLP beside them is the block's FFN.
The cross-attention of an encoder-decoder block (a module named ``encoder_attn`` -- BART, mBART, Marian, Pegasus,
M2M100, Whisper --, ``crossattention`` -- a BERT decoder: bert2bert, the ViT + BERT ``VisionEncoderDecoderModel``
--, ``cross_attn`` -- T5Gemma) with separate q / k / v / o linears is a second attention unit,
:attr:`Block.cross_attention` (read as the attention is, inside that module: ``encoder_attn.{q,k,v}_proj`` ->
``out_proj``, ``crossattention.self.{query,key,value}`` -> ``crossattention.output.dense``), whose heads are pruned
on their own; :attr:`Block.attention` stays the self-attention, registered first. A block whose only attention is
the cross-attention (Mllama's cross-attention layers) has it as :attr:`Block.attention`. T5's ``EncDecAttention``
(:func:`shares_position_bias`) and GPT-2's ``Conv1D`` ``crossattention`` give no unit.
Encoder-decoder language models (BART in Florence-2, T5 in BLIP-2 Flan-T5, T5Gemma, T5Gemma 2, bert2bert) give two stacks:
the encoder's blocks, then the decoder's. So does an encoder-decoder whose encoder has no role (Whisper: it reads
log-mel frames, not tokens): when ``config.is_encoder_decoder`` is true and the module ``get_encoder()`` returns lies
outside every role, its shallowest block list is the first stack, listed with the language blocks (role
``"language"``, in the ``None`` / ``"language"`` / ``"all"`` scopes) although :func:`model_roles` gives it no role.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from .introspect import (
    _find_layers,
    _holds_linear,
    _language_stacks,
    _side,
    encoder_module_name,
    model_roles,
    vision_layers,
)
from .structure import under as _under

__all__ = ["AttentionUnit", "Block", "FFNUnit", "block_stacks", "not_float_remedy", "peft_adapter_layer",
           "shares_position_bias", "stack_side", "transformer_blocks"]

# (q, k, v, o) child paths relative to an attention container
_ATTN_PATTERNS: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("self.query", "self.key", "self.value", "output.dense"),
    ("q", "k", "v", "o"),  # T5 (head size key_value_proj_dim)
)
# (inputs..., output) relative to an FFN container; BERT's FFN is spread over the block itself
_FFN_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("gate_up_proj",), "down_proj"),  # fused: 2 * I rows, gate then up (chunk(2))
    (("w1", "w3"), "w2"),
    (("fc1",), "fc2"),
    (("linear_fc1",), "linear_fc2"),  # Qwen3-VL's vision blocks
    (("intermediate.dense",), "output.dense"),
    (("wi_0", "wi_1"), "wo"),  # T5 v1.1 / Flan-T5 (gated: act(wi_0(x)) * wi_1(x))
    (("wi",), "wo"),  # T5 v1.0
)


@dataclass
class AttentionUnit:
    """One multi-head attention: full module names of its projections and the module carrying head counts.

    A block's self-attention (:attr:`Block.attention`) or the cross-attention of an encoder-decoder block
    (:attr:`Block.cross_attention`, whose k / v read the encoder's output): both are pruned head by head.

    Attributes:
        name: the attention container (e.g. ``model.layers.0.self_attn``).
        holder: the module whose attributes describe the heads (``...self_attn``, or BERT's ``...self``).
        q: full name of the query projection (``n_heads * q_rows`` output rows).
        k: full name of the key projection (``n_kv * head_dim`` rows).
        v: full name of the value projection (``n_kv * head_dim`` rows).
        o: full name of the output projection (``n_heads * head_dim`` input columns).
        head_dim: features per head.
        n_heads: query heads.
        n_kv: key / value heads (``n_heads`` without grouped-query attention; ``n_heads % n_kv == 0``).
        q_head_rows: rows of q per head when not ``head_dim`` (``2 * head_dim`` for gated attention); 0 means
            ``head_dim``.
        q_norm: per-head query norm (weight ``(head_dim,)`` or ``(n_heads, head_dim)``), if any.
        k_norm: per-head key norm, if any.
        v_norm: a norm applied to each value head between v and o (Gemma 4's ``v_norm``, an RMSNorm over
            ``head_dim``), if any: per head, so pruning needs nothing, but o's input is not linear in v's rows (a
            scale folded from o's columns into v's rows changes the function).
        clamped: ``{linear name: (input clamp finite, output clamp finite)}`` for the projections inside a clamp
            wrapper (module docstring) with a finite bound; see :attr:`FFNUnit.clamped`.
    """

    name: str          # the attention container (e.g. ``model.layers.0.self_attn``)
    holder: str        # module whose attributes describe the heads (``...self_attn`` or BERT's ``...self``)
    q: str
    k: str
    v: str
    o: str
    head_dim: int
    n_heads: int
    n_kv: int
    q_head_rows: int = 0       # rows of q per head: head_dim, or 2 * head_dim for gated attention (0 = head_dim)
    q_norm: str | None = None  # per-head norms: weight (n_heads, head_dim) / (n_kv, head_dim)
    k_norm: str | None = None
    v_norm: str | None = None  # a norm of each value head (Gemma 4): o's input is not linear in v's rows
    clamped: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # linear -> (finite input, output clamp)

    @property
    def q_rows(self) -> int:
        """Rows of the query projection per head (``2 * head_dim`` for gated attention)."""
        return self.q_head_rows or self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per key/value head, ``n_heads / n_kv``."""
        return self.n_heads // self.n_kv


@dataclass
class FFNUnit:
    """One feed-forward network: the linears producing the hidden neurons and the one consuming them.

    Attributes:
        name: the FFN container (e.g. ``model.layers.0.mlp``).
        inputs: full names of the projections producing the neurons (``gate_proj`` and ``up_proj``, or ``fc1``);
            neuron ``i`` is row ``i`` of each (of each chunk).
        output: full name of the projection consuming them (``down_proj`` / ``fc2``): neuron ``i`` is its
            input column ``i``.
        n_neurons: hidden width.
        chunks: each input's rows are ``chunks`` blocks of ``n_neurons`` (a fused ``gate_up_proj``: 2).
        clamped: ``{linear name: (input clamp finite, output clamp finite)}`` for the unit's linears inside a clamp
            wrapper (module docstring: Gemma 4's ``Gemma4ClippableLinear``) with at least one finite
            bound, read when the blocks are listed (bounds that cannot be read, on the meta device, count as finite).
            Pruning is exact through any clamp (scalar bounds, element-wise); a scale folded through a finite one
            is not: ``clamp(x / s) * s != clamp(x)`` once the bound is reached, so AWQ must not fold into the input
            side of a linear with a finite input clamp, nor out of the rows of one with a finite output clamp.
    """

    name: str
    inputs: tuple[str, ...]
    output: str
    n_neurons: int
    chunks: int = 1  # each input's rows are ``chunks`` blocks of n_neurons (fused gate_up_proj: 2)
    clamped: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # linear -> (finite input, output clamp)


@dataclass
class Block:
    """One transformer block (``name`` as in ``named_modules``) and its attention / FFN units.

    Attributes:
        name: the block's module name (``model.layers.3``).
        stack: the ``ModuleList`` holding the block (``model.layers``).
        index: its position in that list.
        role: ``"language"``, ``"vision"`` or ``None`` (a plain module without roles).
        attention: the attention unit, or ``None`` when the block has none medquant can read.
        ffn: the FFN unit, or ``None``.
        fused_attention: name of a fused-qkv attention (no separate q / k / v rows), if any.
        unsupported: ``"heads"`` / ``"ffn"`` -> why that part cannot be pruned.
        experts: an MoE experts module with 3-D weights inside the block, if any (its neurons are pruned per
            expert).
        cross_attention: the cross-attention of an encoder-decoder block (BART's ``encoder_attn``, Whisper's,
            BERT's ``crossattention``, T5Gemma's ``cross_attn``) when it has separate q / k / v / o linears: a
            second attention unit with heads of its own (queries from the block, keys / values from the encoder's
            output), pruned with the same head ratio as :attr:`attention`; ``None`` otherwise.
    """

    name: str
    stack: str            # the ModuleList holding the block
    index: int            # position in that list
    role: str | None      # "language", "vision" or None (plain module)
    attention: AttentionUnit | None
    ffn: FFNUnit | None
    fused_attention: str | None = None   # name of a fused-qkv attention (no separate q/k/v rows)
    unsupported: dict[str, str] = field(default_factory=dict)  # "heads" / "ffn" -> why it cannot be pruned
    experts: str | None = None  # an MoE experts module with 3-D weights inside the block (its neurons: prune)
    cross_attention: AttentionUnit | None = None  # an encoder-decoder block's cross-attention (own heads)


def stack_side(stack: str) -> str | None:
    """Which side of an encoder-decoder a block list belongs to, by its name.

    The outermost component decides: the model's own ``encoder`` / ``decoder`` sub-module holds the stack, whatever
    the stack's class names it inside (bert2bert's decoder is a BERT whose blocks sit in
    ``decoder.bert.encoder.layer``: decoder side).

    Args:
        stack: the block list's module name (``model.decoder.block``, a :attr:`Block.stack`).

    Returns:
        ``"encoder"`` / ``"decoder"``: the outermost of those two dot-separated components of ``stack``; None when
        it has neither.
    """
    return _side(stack)


def _role_stacks(model: nn.Module, roles: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``[(role, block names)]`` for ``roles`` in the given order (``"language"`` / ``"vision"``), empty lists
    included; an encoder-decoder language model gives its encoder stack, then its decoder stack
    (``language_model_layers(model, side=...)``)."""
    out: list[tuple[str, list[str]]] = []
    for r in roles:
        if r == "vision":
            out.append((r, vision_layers(model)))
        else:
            out.extend((r, names) for names in _seq2seq_stacks(model, _language_stacks(model)) or [[]])
    return out


def _seq2seq_stacks(model: nn.Module, stacks: list[list[str]]) -> list[list[str]]:
    """``stacks`` (the language stacks), preceded by the encoder's block list when the model is an encoder-decoder
    whose encoder holds no language block (Whisper: its encoder reads log-mel frames, no token embedding, so it has
    no role): ``config.is_encoder_decoder`` is true and the module ``get_encoder()`` returns lies outside every role
    (a vision encoder keeps its role) and holds a non-empty ``nn.ModuleList`` of blocks with linear layers (its
    shallowest one is the encoder stack). Any other model gets ``stacks`` unchanged."""
    if len(stacks) != 1:
        return stacks
    name = encoder_module_name(model)
    placed = [q for prefixes in model_roles(model).values() for q in prefixes]
    if name is None or any(_under(name, q) or _under(q, name) for q in placed):
        return stacks  # the encoder has a role (a vision encoder: VisionEncoderDecoderModel) or holds one
    enc = _find_layers(model, [name]) or []
    if not enc or not all(_holds_linear(model.get_submodule(b)) for b in enc):
        return stacks
    return [enc, stacks[0]]


def block_stacks(model: nn.Module) -> list[list[str]]:
    """The block names of ``model``, one list per stack, in forward order.

    Args:
        model: a Hugging Face model of a supported architecture (roles found by :func:`model_roles`).

    Returns:
        ``[vision blocks, language blocks]`` with empty lists dropped, e.g.
        ``[["model.vision_tower.encoder.layers.0", ...], ["model.language_model.layers.0", ...]]``; an
        encoder-decoder language model gives two language lists, its encoder's blocks then its decoder's (also
        Whisper, whose encoder has no role: ``model.encoder.layers.*`` then ``model.decoder.layers.*``); ``[]`` for
        a model without vision or language blocks, and for a plain ``nn.Module`` (no roles).
    """
    return [names for _, names in _role_stacks(model, ("vision", "language")) if names]


def _wanted_roles(model: nn.Module, scope: str | Sequence[str] | None) -> set[str]:
    if scope is None:
        return {"language"} if "language" in model_roles(model) else {"vision"}
    if scope == "all":
        return {"language", "vision"}
    wanted = {scope} if isinstance(scope, str) else set(scope)
    bad = wanted - {"language", "vision"}
    if bad:
        raise ValueError(f"unknown block scope {sorted(bad)}; use 'language', 'vision', 'all' or None")
    return wanted


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


_CLAMPS = ("input_min", "input_max", "output_min", "output_max")


def _linear_like(m: nn.Module | None) -> bool:
    """An ``nn.Linear``, or a layer standing in for one (integer ``in_features`` and ``out_features``: a quantized
    ``QuantLinear``, as :func:`block_stacks` counts them)."""
    return isinstance(m, nn.Linear) or (m is not None and isinstance(getattr(m, "in_features", None), int)
                                        and isinstance(getattr(m, "out_features", None), int))


def _clamp_wrapped(mod: nn.Module | None) -> nn.Module | None:
    """The linear inside a clamp wrapper (Gemma 4's ``Gemma4ClippableLinear``: ``clamp(linear(clamp(x)))``):
    exactly one child, an ``nn.Linear`` (or a quantized stand-in, :func:`_linear_like`) named ``linear``, no parameter of its own and no buffer but scalar
    ``input_min`` / ``input_max`` / ``output_min`` / ``output_max``. Anything else a wrapper holds (a vector, a
    parameter, another child) could mix the rows or columns that pruning removes, so it is not looked through."""
    if mod is None or _linear_like(mod):
        return None
    kids = dict(mod.named_children())
    lin = kids.get("linear")
    if len(kids) != 1 or not _linear_like(lin) or any(p is not None for p in mod._parameters.values()):
        return None
    bufs = {k: b for k, b in mod._buffers.items() if b is not None}
    if any(k not in _CLAMPS or b.dim() != 0 for k, b in bufs.items()):
        return None
    return lin


def _finite_clamps(wrapper: nn.Module) -> tuple[bool, bool]:
    """``(input clamp finite, output clamp finite)`` of a clamp wrapper; bounds on the meta device count as finite
    (their values are unknown), a wrapper whose ``use_clipped_linears`` is False clamps nothing."""
    if getattr(wrapper, "use_clipped_linears", True) is False:
        return False, False

    def finite(*names: str) -> bool:
        bufs = [wrapper._buffers.get(n) for n in names]
        return any(b is not None and (b.is_meta or bool(b.isfinite().any())) for b in bufs)

    return finite("input_min", "input_max"), finite("output_min", "output_max")


def _linear_at(root: nn.Module, path: str, wrapped: bool) -> tuple[str, nn.Module] | None:
    """``(path of the linear relative to root, the layer)`` for ``path`` naming an ``nn.Linear`` or a quantized
    stand-in (:func:`_linear_like`) or, with ``wrapped``, a clamp wrapper around one (then ``path + ".linear"``);
    None otherwise."""
    mod = _get(root, path)
    if mod is not None and _linear_like(mod):
        return path, mod
    lin = _clamp_wrapped(mod) if wrapped else None
    return (f"{path}.linear", lin) if lin is not None else None


def _clamped(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[bool, bool]]:
    """``{name: (input finite, output finite)}`` for the linears in ``names`` (full names) that sit in a clamp
    wrapper with a finite bound."""
    out: dict[str, tuple[bool, bool]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        if leaf != "linear" or not parent:
            continue
        wrapper = model.get_submodule(parent)
        if _clamp_wrapped(wrapper) is not None:
            sides = _finite_clamps(wrapper)
            if any(sides):
                out[name] = sides
    return out


def _head_dim(mod: nn.Module) -> int | None:
    for attr in ("head_dim", "attention_head_size", "key_value_proj_dim"):
        v = getattr(mod, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def peft_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT tuner layer (LoRA, IA3, ...) wrapping its base layer.

    Such a layer is float but not an ``nn.Linear``: structured pruning slices ``nn.Linear`` weights only, so the
    adapters are merged into the weights first (``model = model.merge_and_unload()``) or attached after pruning.

    Args:
        module: any module.

    Returns:
        True when its class comes from the ``peft`` package and it holds a ``base_layer`` module.
    """
    return type(module).__module__.split(".")[0] == "peft" and isinstance(getattr(module, "base_layer", None),
                                                                           nn.Module)


def not_float_remedy(modules: Sequence[nn.Module]) -> str:
    """What to do about layers structured pruning cannot slice (not float ``nn.Linear``), for error messages.

    Args:
        modules: the layers that were refused.

    Returns:
        Merging the adapters (``merge_and_unload()``) when any is a PEFT layer (:func:`peft_adapter_layer`),
        otherwise pruning the float model before quantizing it.
    """
    return _remedy(any(peft_adapter_layer(m) for m in modules))


def _remedy(adapters: bool) -> str:
    if adapters:
        return ("merge the PEFT adapters into the weights first (model = model.merge_and_unload()), or prune before "
                "attaching them")
    return "prune the float model first, then quantize it"


def _not_float(full: str, paths: Sequence[str], mods: Sequence[nn.Module]) -> dict[str, str]:
    """``{full name: class name}`` of the layers among ``mods`` that are not float ``nn.Linear`` (``"PEFT <class>"``
    for a PEFT adapter layer)."""
    return {f"{full}.{p}": ("PEFT " if peft_adapter_layer(m) else "") + type(m).__name__
            for p, m in zip(paths, mods) if not isinstance(m, nn.Linear)}


def _attention_in(block: nn.Module, bname: str, wrapped: bool
                  ) -> tuple[AttentionUnit | None, str | None, dict[str, str]]:
    """``(unit, fused qkv attention, {name: class} of the projections that are not float nn.Linear)``; the unit is
    None when any projection is not a float ``nn.Linear`` (a quantized model)."""
    for cname, cont in block.named_modules():
        for q, k, v, o in _ATTN_PATTERNS:
            found = [_linear_at(cont, p, wrapped) for p in (q, k, v, o)]
            if not all(found):
                continue
            paths = [f[0] for f in found if f is not None]
            mods = [f[1] for f in found if f is not None]
            holder_rel = q.rpartition(".")[0]
            holder = _get(cont, holder_rel) if holder_rel else cont
            hd = _head_dim(holder)
            if hd is None:
                continue
            full = f"{bname}.{cname}" if cname else bname
            hfull = f"{full}.{holder_rel}" if holder_rel else full
            qm, km, om = mods[0], mods[1], mods[3]
            n_heads = om.in_features // hd
            if om.in_features % hd or qm.out_features not in (n_heads * hd, 2 * n_heads * hd):
                continue
            odd = _not_float(full, paths, mods)
            if odd:
                return None, None, odd
            q_rows = qm.out_features // n_heads
            unit = AttentionUnit(full, hfull, *(f"{full}.{p}" for p in paths), head_dim=hd,
                                 n_heads=n_heads, n_kv=km.out_features // hd,
                                 q_head_rows=q_rows if q_rows != hd else 0)
            for attr, n in (("q_norm", n_heads), ("k_norm", unit.n_kv)):
                norm = getattr(holder, attr, None)
                w = getattr(norm, "weight", None)
                if isinstance(w, nn.Parameter) and tuple(w.shape) == (n, hd):
                    setattr(unit, attr, f"{hfull}.{attr}")
            if isinstance(getattr(holder, "v_norm", None), nn.Module):
                unit.v_norm = f"{hfull}.v_norm"
            unit.clamped = {f"{full}.{p}": c for p, c in _clamped(cont, paths).items()}
            return unit, None, {}
    for cname, cont in block.named_modules():
        if isinstance(getattr(cont, "qkv", None), nn.Linear):
            return None, f"{bname}.{cname}" if cname else bname, {}
    return None, None, {}


def _ffn_in(block: nn.Module, bname: str, skip: AttentionUnit | None, wrapped: bool, taken_names: Sequence[str] = ()
            ) -> tuple[FFNUnit | None, dict[str, str]]:
    """``(unit, {name: class} of its linears that are not float nn.Linear)``; the unit is None when any of them is
    not a float ``nn.Linear``. ``skip`` / ``taken_names``: the attention's projections (never an FFN's)."""
    taken = set(taken_names) if skip is None else {skip.q, skip.k, skip.v, skip.o}
    for cname, cont in block.named_modules():
        if any(_is_experts(m) for m in cont.modules()) and not _is_experts(cont):
            # an MoE container: only a shared expert below it is an FFN of this block
            continue
        for ins, out in _FFN_PATTERNS:
            found = [_linear_at(cont, p, wrapped) for p in (*ins, out)]
            if not all(found):
                continue
            paths = [f[0] for f in found if f is not None]
            mods = [f[1] for f in found if f is not None]
            in_mods, out_mod = mods[:-1], mods[-1]
            full = f"{bname}.{cname}" if cname else bname
            names = tuple(f"{full}.{p}" for p in paths[:-1])
            oname = f"{full}.{paths[-1]}"
            if oname in taken or any(n in taken for n in names):
                continue
            n = out_mod.in_features
            chunks = 2 if ins == ("gate_up_proj",) else 1
            if any(m.out_features != chunks * n for m in in_mods):
                continue
            odd = _not_float(full, paths, mods)
            if odd:
                return None, odd
            clamped = {f"{full}.{p}": c for p, c in _clamped(cont, paths).items()}
            return FFNUnit(full, names, oname, n, chunks, clamped), {}
    return None, {}


def _is_experts(m: nn.Module) -> bool:
    """MoE experts stored as 3-D weights (one module for every expert; transformers 5)."""
    return any(p is not None and p.dim() == 3 for p in m._parameters.values()) and "expert" in type(m).__name__.lower()


_CROSS_ATTENTION = ("encoder_attn", "cross_attn", "EncDecAttention", "crossattention")


def shares_position_bias(attention: nn.Module) -> bool:
    """Whether ``attention`` is a T5-style attention whose relative position bias is shared by its whole stack.

    T5 (also mT5, LongT5, BLIP-2 Flan-T5's language model) computes the bias from ``relative_attention_bias``
    (an embedding of shape ``(buckets, n_heads)``) once, in the first block of a stack
    (``has_relative_attention_bias``), and passes it to every later block of that stack, which adds it head by
    head: removing a head of one block would misalign the bias of the heads after it, so heads could only be removed
    in the same positions in every block of a stack. medquant keeps them.

    Args:
        attention: an attention module (the holder of :class:`AttentionUnit`).

    Returns:
        True when it has T5's ``has_relative_attention_bias`` flag and ``relative_attention_num_buckets``.
    """
    return (isinstance(getattr(attention, "has_relative_attention_bias", None), bool)
            and isinstance(getattr(attention, "relative_attention_num_buckets", None), int))


def _not_float_reason(odd: dict[str, str], what: str) -> str:
    classes = "/".join(sorted(set(odd.values())))
    remedy = _remedy(any(c.startswith("PEFT ") for c in odd.values()))
    return (f"{', '.join(odd)} {'is a' if len(odd) == 1 else 'are'} {classes} "
            f"layer{'' if len(odd) == 1 else 's'}, not float nn.Linear: {what} are removed from float nn.Linear "
            f"layers only; {remedy}")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _cross_in(block: nn.Module, bname: str, attn: AttentionUnit | None, wrapped: bool
              ) -> tuple[AttentionUnit | None, dict[str, str]]:
    """``(unit, {name: class} of its projections that are not float nn.Linear)`` of the cross-attention of an
    encoder-decoder block (a module named as in ``_CROSS_ATTENTION``) with separate q / k / v / o linears; None when
    the block has none, its attention unit is that module (Mllama's cross-attention layers), or it shares a T5-style
    relative position bias (:func:`shares_position_bias`, its heads are kept)."""
    if attn is None:
        return None, {}
    cross = next((n for n, _ in block.named_modules() if n.rpartition(".")[2] in _CROSS_ATTENTION), None)
    if cross is None or _within(attn.holder, f"{bname}.{cross}"):
        return None, {}
    unit, _, odd = _attention_in(block.get_submodule(cross), f"{bname}.{cross}", wrapped)
    if unit is None or shares_position_bias(block.get_submodule(unit.holder[len(bname) + 1:])):
        return None, odd
    return unit, {}


def _unsupported(block: nn.Module, attn: AttentionUnit | None, fused: str | None, ffn: FFNUnit | None,
                 bname: str = "", odd_attn: dict[str, str] | None = None, odd_ffn: dict[str, str] | None = None,
                 cross_found: bool = False, odd_cross: dict[str, str] | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    if attn is None:
        kinds = {type(m).__name__ for m in block.children()}
        if odd_attn:
            out["heads"] = _not_float_reason(odd_attn, "heads")
        elif fused is not None:
            out["heads"] = f"{fused} uses a fused qkv projection whose heads medquant cannot split"
        elif hasattr(block, "linear_attn"):
            out["heads"] = (f"linear attention ({type(block.linear_attn).__name__}): not multi-head softmax "
                            "attention with separate q/k/v/o projections; its heads are kept")
        elif any(isinstance(m, nn.Conv1d) for m in block.modules()):
            out["heads"] = "a convolution mixer, not attention: nothing to prune there"
        else:
            out["heads"] = "no separate q/k/v/o attention projections found (children: " + ", ".join(
                sorted(kinds)[:4]) + ")"
    else:
        cross = next((n for n, _ in block.named_modules() if n.rpartition(".")[2] in _CROSS_ATTENTION), None)
        holder = _get(block, attn.holder[len(bname) + 1:]) if attn.holder != bname else block
        if holder is not None and shares_position_bias(holder):
            stack = bname.rpartition(".")[0]
            out["heads"] = (f"{attn.name} adds the relative position bias that the first block of its stack "
                            f"({stack}.0) computes from relative_attention_bias (one column per head) and passes to "
                            "every later block, so heads could only be removed in the same positions in every block "
                            "of the stack; medquant keeps the heads of T5-style attention"
                            + (f" (and of the cross-attention {bname}.{cross})" if cross is not None else ""))
        elif odd_cross:
            out["heads"] = _not_float_reason(odd_cross, "cross-attention heads")
        elif cross is not None and not _within(attn.holder, f"{bname}.{cross}") and not cross_found:
            # a block whose only attention is the cross-attention (Mllama's cross-attention layers) prunes it as its
            # attention; a cross-attention without separate q / k / v / o linears (or T5-style) keeps its heads
            out["heads"] = f"cross-attention ({cross}) heads are kept; only self-attention heads are pruned"
    if ffn is None and odd_ffn:
        out["ffn"] = _not_float_reason(odd_ffn, "FFN neurons")
    elif ffn is None and not any(_is_experts(m) for m in block.modules()):
        out["ffn"] = ("no FFN linears found (gate/up -> down, gate_up -> down, w1/w3 -> w2, fc1 -> fc2, "
                      "linear_fc1 -> linear_fc2, wi(_0/_1) -> wo)")
    return out


def transformer_blocks(model: nn.Module, scope: str | Sequence[str] | None = None, *,
                       clamp_wrappers: bool = False) -> list[Block]:
    """The transformer blocks of ``model`` in ``scope``, with their attention and FFN units.

    Args:
        model: a Hugging Face model (decoder LM, VLM, ViT/SigLIP/CLIP encoder, BERT) or a plain module with a
            ``nn.ModuleList`` of such blocks.
        scope: ``"language"``, ``"vision"``, ``"all"``, a list of those, or ``None``: the language model for
            vision-language models and decoder LMs, the vision tower for vision encoders. A plain module (no
            roles) always gives the blocks of its shallowest non-empty ``nn.ModuleList``, whatever the scope.
        clamp_wrappers: also read projections wrapped in a clamp (Gemma 4's ``Gemma4ClippableLinear``, module
            docstring), naming the inner ``nn.Linear``. Removing rows or columns is exact through the clamps
            (pruning passes True); rescaling channels is not where a bound is finite, nor through a ``v_norm``, so a
            caller that folds scales must read :attr:`AttentionUnit.clamped`, :attr:`FFNUnit.clamped` and
            :attr:`AttentionUnit.v_norm` before passing True. False: such projections are not linears (their
            units are not found).

    Returns:
        :class:`Block` entries in order, language blocks first, then vision blocks (the stacks of
        :func:`block_stacks` in scope); blocks with neither an attention, a fused attention nor an FFN are left
        out. Empty when nothing matches.
    """
    wanted = _wanted_roles(model, scope)
    stacks: list[tuple[str | None, list[str]]]
    if model_roles(model):
        stacks = list(_role_stacks(model, [r for r in ("language", "vision") if r in wanted]))
    else:
        stacks = [(None, _find_layers(model, [""]) or [])]
    blocks: list[Block] = []
    for role, names in stacks:
        for i, bname in enumerate(names):
            bmod = model.get_submodule(bname)
            attn, fused, odd_attn = _attention_in(bmod, bname, clamp_wrappers)
            ffn, odd_ffn = _ffn_in(bmod, bname, attn, clamp_wrappers, list(odd_attn))
            # blocks with nothing of a transformer block are left out
            cross, odd_cross = _cross_in(bmod, bname, attn, clamp_wrappers)
            why = _unsupported(bmod, attn, fused, ffn, bname, odd_attn, odd_ffn, cross is not None, odd_cross)
            experts = next((f"{bname}.{n}" for n, m in bmod.named_modules() if _is_experts(m)), None)
            if attn is None and ffn is None and fused is None and experts is None and why.get(
                    "heads", "").startswith("no separate") and why.get("ffn", "").startswith("no FFN"):
                continue
            blocks.append(Block(bname, bname.rpartition(".")[0], i, role, attn, ffn, fused, why, experts, cross))
    return blocks
