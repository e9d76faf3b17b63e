"""Where the prunable structures of a transformer block live (SPEC section 5).

:func:`find_blocks` walks the block lists of a model (``language_model_layers`` / ``vision_layers`` from
:mod:`medquant.models.introspect`, or the shallowest ``nn.ModuleList`` of blocks for other models) and describes
each block's attention and feed-forward parts by the names of their linear layers:

=====================  ==============================================  ==========================================
family                 attention (q, k, v -> o)                        FFN (in -> out)
=====================  ==============================================  ==========================================
LLaMA / Qwen / Gemma   ``self_attn.{q,k,v}_proj`` -> ``self_attn.o_proj``  ``mlp.{gate,up}_proj`` -> ``mlp.down_proj``
SigLIP / CLIP / Idefics3  ``self_attn.{q,k,v}_proj`` -> ``out_proj``    ``mlp.fc1`` -> ``mlp.fc2``
ViT (transformers 5)   ``attention.{q,k,v}_proj`` -> ``o_proj``        ``mlp.fc1`` -> ``mlp.fc2``
BERT                   ``attention.self.{query,key,value}``            ``intermediate.dense`` -> ``output.dense``
                       -> ``attention.output.dense``
=====================  ==============================================  ==========================================

Heads are read from the shapes: ``head_dim`` from the attention module (``head_dim`` or
``attention_head_size``), ``n_heads = q.out_features / head_dim``, ``n_kv = k.out_features / head_dim``.
Query head ``h`` reads key/value head ``h // (n_heads / n_kv)`` (``repeat_kv`` in transformers).
Fused ``qkv`` projections (Qwen2-VL vision blocks) have no separate q/k/v rows: their heads are reported as
unsupported; their FFNs are still found.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models.introspect import _find_layers, language_model_layers, model_roles, vision_layers

__all__ = ["AttentionUnit", "Block", "FFNUnit", "find_blocks"]

# (q, k, v, o) child paths relative to an attention container
_ATTN_PATTERNS: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("self.query", "self.key", "self.value", "output.dense"),
)
# (inputs..., output) relative to an FFN container; BERT's FFN is spread over the block itself
_FFN_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("fc1",), "fc2"),
    (("intermediate.dense",), "output.dense"),
)


@dataclass
class AttentionUnit:
    """One multi-head attention: full module names of its projections and the module carrying head counts."""

    name: str          # the attention container (e.g. ``model.layers.0.self_attn``)
    holder: str        # module whose attributes describe the heads (``...self_attn`` or BERT's ``...self``)
    q: str
    k: str
    v: str
    o: str
    head_dim: int
    n_heads: int
    n_kv: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv


@dataclass
class FFNUnit:
    """One feed-forward network: the linears producing the hidden neurons and the one consuming them."""

    name: str
    inputs: tuple[str, ...]
    output: str
    n_neurons: int


@dataclass
class Block:
    """One transformer block (``name`` as in ``named_modules``) and what can be pruned in it."""

    name: str
    stack: str            # the ModuleList holding the block
    index: int            # position in that list
    role: str | None      # "language", "vision" or None
    attention: AttentionUnit | None
    ffn: FFNUnit | None
    fused_attention: str | None = None   # name of a fused-qkv attention that cannot be head-pruned


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _head_dim(mod: nn.Module) -> int | None:
    for attr in ("head_dim", "attention_head_size"):
        v = getattr(mod, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _attention_in(block: nn.Module, bname: str) -> tuple[AttentionUnit | None, str | None]:
    for cname, cont in block.named_modules():
        for q, k, v, o in _ATTN_PATTERNS:
            mods = [_get(cont, p) for p in (q, k, v, o)]
            if not all(isinstance(m, nn.Linear) for m in mods):
                continue
            holder_rel = q.rpartition(".")[0]
            holder = _get(cont, holder_rel) if holder_rel else cont
            hd = _head_dim(holder)
            if hd is None:
                continue
            full = f"{bname}.{cname}" if cname else bname
            hfull = f"{full}.{holder_rel}" if holder_rel else full
            qm, km = mods[0], mods[1]
            unit = AttentionUnit(full, hfull, *(f"{full}.{p}" for p in (q, k, v, o)), head_dim=hd,
                                 n_heads=qm.out_features // hd, n_kv=km.out_features // hd)
            return unit, None
    for cname, cont in block.named_modules():
        if isinstance(getattr(cont, "qkv", None), nn.Linear):
            return None, f"{bname}.{cname}" if cname else bname
    return None, None


def _ffn_in(block: nn.Module, bname: str, skip: AttentionUnit | None) -> FFNUnit | None:
    taken = set() if skip is None else {skip.q, skip.k, skip.v, skip.o}
    for cname, cont in block.named_modules():
        for ins, out in _FFN_PATTERNS:
            in_mods = [_get(cont, p) for p in ins]
            out_mod = _get(cont, out)
            if not (all(isinstance(m, nn.Linear) for m in in_mods) and isinstance(out_mod, nn.Linear)):
                continue
            full = f"{bname}.{cname}" if cname else bname
            names = tuple(f"{full}.{p}" for p in ins)
            oname = f"{full}.{out}"
            if oname in taken or any(n in taken for n in names):
                continue
            n = in_mods[0].out_features
            if any(m.out_features != n for m in in_mods) or out_mod.in_features != n:
                continue
            return FFNUnit(full, names, oname, n)
    return None


def find_blocks(model: nn.Module, scope: str | list[str] | None = None) -> list[Block]:
    """The transformer blocks of ``model`` in scope, with their attention and FFN units.

    Args:
        model: a Hugging Face model (decoder LM, VLM, ViT/SigLIP/CLIP encoder, BERT) or a plain module with a
            ``nn.ModuleList`` of such blocks.
        scope: ``"language"``, ``"vision"``, ``"all"``, a list of those, or ``None``: the language model for
            vision-language models and decoder LMs, the vision tower for vision encoders, and every block list
            for other models.

    Returns:
        Blocks in order (language first, then vision). Empty when nothing matches.
    """
    roles = model_roles(model)
    lists: list[tuple[str | None, list[str]]] = []
    wanted: set[str]
    if scope is None:
        wanted = {"language"} if "language" in roles else {"vision"}
    elif scope == "all":
        wanted = {"language", "vision"}
    else:
        wanted = {scope} if isinstance(scope, str) else set(scope)
        bad = wanted - {"language", "vision"}
        if bad:
            raise ValueError(f"unknown pruning scope {sorted(bad)}; use 'language', 'vision', 'all' or None")
    if roles:
        if "language" in wanted:
            lists.append(("language", language_model_layers(model)))
        if "vision" in wanted:
            lists.append(("vision", vision_layers(model)))
    else:
        lists.append((None, _find_layers(model, [""]) or []))
    blocks: list[Block] = []
    for role, names in lists:
        for i, bname in enumerate(names):
            bmod = model.get_submodule(bname)
            attn, fused = _attention_in(bmod, bname)
            ffn = _ffn_in(bmod, bname, attn)
            if attn is None and ffn is None and fused is None:
                continue
            blocks.append(Block(bname, bname.rpartition(".")[0], i, role, attn, ffn, fused))
    return blocks
