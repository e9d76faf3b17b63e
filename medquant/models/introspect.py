"""Where the parts of a Hugging Face model live: vision tower, projector, language model, output head.

``model_roles(model)`` maps each *role* to the module-name prefixes (as in ``model.named_modules()``)
that make it up, so callers can say "quantize the language model to 4 bits, keep the vision tower and
the lm_head in bf16" without writing regular expressions::

    from medquant.models import model_roles, modules_in_role

    roles = model_roles(model)            # {"vision": ["model.vision_tower"], "projector": [...], ...}
    lm_linears = modules_in_role(model, "language")

Roles (:data:`ROLES`):

``vision``
    The image encoder (SigLIP / CLIP / ViT tower, Qwen2-VL ``visual`` blocks). For a stand-alone vision
    encoder (``SiglipVisionModel``, ``ViTModel``...) this is the whole encoder except its pooling head.
``projector``
    The module mapping image features into the language model's embedding space
    (``multi_modal_projector``, Idefics3 ``connector``, Qwen2-VL ``visual.merger``).
``language``
    The decoder body of the language model, including its token embedding and final norm
    (``model.language_model``, ``model.text_model``, ``model`` of a causal LM). A text encoder
    (``BertModel``, the text tower of ``SiglipModel``) is also ``language``, and so are both stacks of an
    encoder-decoder (T5, BART: :func:`language_model_layers` lists the encoder's blocks then the decoder's).
``head``
    The output head: ``lm_head`` of causal LMs and VLMs, ``classifier`` / ``score`` of classification
    models, ``pooler`` / pooling ``head`` of encoders, and what runs between the body's last hidden state and the
    logits (BERT's ``cls.predictions.transform``, ELECTRA's ``generator_predictions``, DistilBERT's
    ``vocab_transform``) or the embedding (AltCLIP's text ``transformation``).

Detection
---------
Architectures are looked up by class name in a table of *layouts* (fast path; each layout lists candidate
attribute paths per role, transformers 5 and older top-level names). Every other Hugging Face model is split by
its structure, names serving as hints (:mod:`medquant.models.structure`): the language model owns the token
embeddings and its layer list, the head is ``get_output_embeddings()``, vision and projector come from sub-model
configs and attribute names (also inside the language model: LLaVA-Med's ``model.vision_tower``), and a
``get_image_features`` trace with forward hooks decides only what names leave undecided; a module that sees the
image is never ``language``. When nothing anchors the roles, :class:`UnsupportedArchitectureError` says what was
found and how to use explicit patterns. A plain ``nn.Module`` (not a transformers ``PreTrainedModel``) gives
``{}``: callers then select layers with explicit patterns. Wrappers are looked through and the roles are given
in the wrapper's names, the names the user's model reports: a PEFT model (``PeftModel``, prefix
``base_model.model.``), ``torch.compile`` (``_orig_mod.``) and DistributedDataParallel / DataParallel or any module
whose single child is named ``module`` (``module.``), also nested (``_orig_mod.module.``). A module that holds
other children beside ``module`` is the user's own model, not a wrapper (``{}``).

Roles are disjoint: when the prefix of one role contains the prefix of another (Qwen2-VL's merger sits
inside ``model.visual``; a stand-alone encoder's pooling head sits inside the root), the outer one is
replaced by those of its children that do not overlap, so no module name lies under two roles.
Parameters held directly by such a split container are placed by name (``image_newline``, ``query_tokens``:
projector; ``logit_scale`` / ``logit_bias``: head) and then appear as parameter names among the role's prefixes;
:func:`unassigned_modules` lists weight-bearing modules outside every role (an audio encoder) and
:func:`unassigned_parameters` every parameter outside every role.

Caveats the caller should know:

* Tied weights: with ``tie_word_embeddings`` (Gemma, Gemma 3, PaliGemma, BERT) ``lm_head.weight`` *is*
  the ``embed_tokens`` weight, so the ``head`` and ``language`` roles share one tensor.
* Gemma 3's projector holds a raw ``nn.Parameter`` (``mm_input_projection_weight``), not an
  ``nn.Linear``; a quantizer that only replaces ``nn.Linear`` leaves it in floating point.
* Qwen2-VL / Qwen2.5-VL patch embeddings are ``nn.Conv3d``; SigLIP's pooling head uses
  ``nn.MultiheadAttention`` (a raw ``in_proj_weight`` plus an ``out_proj`` Linear).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .structure import UnsupportedArchitectureError, make_disjoint, place_parameters, structural_roles
from .structure import under as _under

__all__ = [
    "ROLES",
    "UnsupportedArchitectureError",
    "language_model_layers",
    "model_roles",
    "modules_in_role",
    "role_of",
    "supported_architectures",
    "unassigned_modules",
    "unassigned_parameters",
    "vision_layers",
]

ROLES: tuple[str, ...] = ("vision", "projector", "language", "head")

# Module types that carry the weights a quantizer touches; used by unassigned_modules().
WEIGHT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class _Layout:
    """Candidate module paths per role. ``""`` is the root module.

    ``required`` lists roles that must resolve for the layout to match the model.
    """

    name: str
    candidates: dict[str, tuple[str, ...]]
    required: tuple[str, ...]


_VLM = _Layout(
    name="vision-language model",
    candidates={
        "vision": ("model.vision_tower", "model.visual", "model.vision_model",
                   "vision_tower", "visual", "vision_model"),
        "projector": ("model.multi_modal_projector", "model.connector", "model.visual.merger",
                      "multi_modal_projector", "connector", "visual.merger"),
        "language": ("model.language_model", "model.text_model", "language_model", "text_model"),
        "head": ("lm_head", "language_model.lm_head"),
    },
    required=("vision", "projector", "language"),
)

_CAUSAL_LM = _Layout(
    name="decoder-only language model",
    candidates={"language": ("model",), "head": ("lm_head", "score")},
    required=("language", "head"),
)

_LM_BODY = _Layout(
    name="decoder body (no head)",
    candidates={"language": ("",)},
    required=("language",),
)

_VISION_ENCODER = _Layout(
    name="vision encoder",
    candidates={"vision": ("",), "head": ("head", "pooler", "vision_model.head")},
    required=("vision",),
)

_VISION_CLASSIFIER = _Layout(
    name="vision classifier",
    candidates={"vision": ("vit", "vision_model", "siglip"), "head": ("classifier",)},
    required=("vision", "head"),
)

_DUAL_ENCODER = _Layout(
    name="image-text dual encoder",
    candidates={"vision": ("vision_model",), "language": ("text_model",)},
    required=("vision", "language"),
)

_TEXT_ENCODER = _Layout(
    name="text encoder",
    candidates={"language": ("",), "head": ("pooler",)},
    required=("language",),
)

_TEXT_CLASSIFIER = _Layout(
    name="text classifier",
    candidates={"language": ("bert",), "head": ("classifier",)},
    required=("language", "head"),
)

_TABLE: dict[str, _Layout] = {}
for _layout, _names in [
    (_VLM, (
        "Gemma3ForConditionalGeneration", "Gemma3Model",
        "LlavaForConditionalGeneration", "LlavaModel",
        "Qwen2VLForConditionalGeneration", "Qwen2VLModel",
        "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel",
        "PaliGemmaForConditionalGeneration", "PaliGemmaModel",
        "Idefics3ForConditionalGeneration", "Idefics3Model",
        "SmolVLMForConditionalGeneration", "SmolVLMModel",
    )),
    (_CAUSAL_LM, (
        "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
        "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
        "LlamaForSequenceClassification", "Qwen2ForSequenceClassification",
    )),
    (_LM_BODY, (
        "LlamaModel", "Qwen2Model", "Qwen3Model", "MistralModel", "GemmaModel", "Gemma2Model", "Gemma3TextModel",
    )),
    (_VISION_ENCODER, ("SiglipVisionModel", "CLIPVisionModel", "ViTModel", "Idefics3VisionTransformer")),
    (_VISION_CLASSIFIER, ("ViTForImageClassification", "SiglipForImageClassification")),
    (_DUAL_ENCODER, ("SiglipModel",)),
    (_TEXT_ENCODER, ("BertModel",)),
    (_TEXT_CLASSIFIER, ("BertForSequenceClassification",)),
]:
    for _n in _names:
        _TABLE[_n] = _layout


def supported_architectures() -> list[str]:
    """Class names with a known layout (others may still resolve through the structural fallback).

    Returns:
        Sorted Hugging Face model class names (``"Gemma3ForConditionalGeneration"``, ``"LlamaForCausalLM"``...).
    """
    return sorted(_TABLE)


def _is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency, but stay usable without it
        return False
    return isinstance(model, PreTrainedModel)


# the single child through which a wrapper holds the model: torch.compile's OptimizedModule (``_orig_mod``),
# DistributedDataParallel, DataParallel and wrappers in their style (``module``)
_WRAPPER_CHILDREN = ("_orig_mod", "module")


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Return (Hugging Face model, name prefix) for a HF model or wrappers around one (PEFT, ``torch.compile``,
    DDP-style ``module``, nested in any order); a module that is none of these comes back as it is, with ``""``."""
    inner, prefix = model, ""
    for _ in range(16):  # wrappers nest a few levels at most; a cycle of modules cannot make this loop forever
        if _is_hf_model(inner):
            return inner, prefix
        base = getattr(inner, "base_model", None)
        peft_inner = getattr(base, "model", None) if isinstance(base, nn.Module) else None
        if isinstance(peft_inner, nn.Module) and type(inner).__name__.startswith("Peft"):
            inner, prefix = peft_inner, prefix + "base_model.model."
            continue
        children = list(inner.named_children())
        if len(children) == 1 and children[0][0] in _WRAPPER_CHILDREN:
            inner, prefix = children[0][1], f"{prefix}{children[0][0]}."
            continue
        break
    return model, ""


def _resolve(layout: _Layout, modules: dict[str, nn.Module]) -> dict[str, list[str]] | None:
    """Resolve a layout against the module dict; None when a required role is missing."""
    found: dict[str, list[str]] = {}
    taken: set[str] = set()
    for role in ROLES:
        paths = [p for p in layout.candidates.get(role, ()) if p in modules and p not in taken]
        # keep the outermost paths of a role
        paths = [p for p in paths if not any(q != p and _under(p, q) for q in paths)]
        if paths:
            found[role] = paths
            taken.update(paths)
    if any(r not in found for r in layout.required):
        return None
    return make_disjoint(found, modules)


def _layout_error(model: nn.Module, detail: str) -> UnsupportedArchitectureError:
    top = ", ".join(n for n, _ in model.named_children()) or "<none>"
    return UnsupportedArchitectureError(
        f"{type(model).__name__}: {detail} (top-level children: {top}). Supported architectures: "
        f"{', '.join(supported_architectures())}; other Hugging Face models are accepted when they have a "
        "vision tower + projector + language model, or a 'model.layers' decoder + 'lm_head'. "
        "For other models select modules with explicit name patterns."
    )


def model_roles(model: nn.Module) -> dict[str, list[str]]:
    """Map each role present in ``model`` to its module-name prefixes.

    Args:
        model: a Hugging Face ``PreTrainedModel`` (or one wrapped by PEFT, ``torch.compile`` or a DDP-style
            ``module`` wrapper), or any ``nn.Module``.

    Returns:
        ``{role: [prefix, ...]}`` for the roles of :data:`ROLES` that the model has, in that order.
        Prefixes are names from ``model.named_modules()`` (a wrapper's prefix included: ``_orig_mod.lm_head``);
        the roles are disjoint. ``{}`` for a plain ``nn.Module`` that is not a Hugging Face model.

    Raises:
        UnsupportedArchitectureError: ``model`` is a Hugging Face model of an architecture that is
            neither in the table nor matched by the structural fallback.
    """
    hf, prefix = _unwrap(model)
    if not _is_hf_model(hf):
        return {}
    modules = dict(hf.named_modules())
    cls = type(hf).__name__
    layout = _TABLE.get(cls)
    if layout is not None:
        roles = _resolve(layout, modules)
        if roles is None:
            raise _layout_error(hf, f"module tree does not match the expected {layout.name} layout "
                                    f"(needs roles {', '.join(layout.required)})")
    else:
        roles = structural_roles(hf, modules)
        if not roles:
            raise _layout_error(hf, "no role found")
    if layout is not None:
        place_parameters(hf, roles, modules)
    return {r: [prefix + p for p in roles[r]] for r in ROLES if r in roles}


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")


def modules_in_role(model: nn.Module, role: str) -> list[str]:
    """All module names (from ``model.named_modules()``) inside ``role``, the prefix modules included.

    Args:
        model: the model.
        role: ``"vision"``, ``"projector"``, ``"language"`` or ``"head"``.

    Returns:
        Module names in ``named_modules`` order; ``[]`` when the model has no such role (or is a plain
        ``nn.Module``).

    Raises:
        ValueError: ``role`` is not one of the four roles.
    """
    _check_role(role)
    prefixes = model_roles(model).get(role, [])
    if not prefixes:
        return []
    return [n for n, _ in model.named_modules() if any(_under(n, p) for p in prefixes)]


def role_of(model: nn.Module, module_name: str) -> str | None:
    """The role containing ``module_name`` (a module or parameter name), or ``None``.

    ``None`` for names outside every role: the root, containers split between roles (e.g. Qwen2-VL's
    ``model.visual``), and everything in a plain ``nn.Module``. The name is matched by prefix and is not
    checked against the model.

    Args:
        model: the model.
        module_name: a dotted module or parameter name (``"model.vision_tower.encoder.layers.0.mlp.fc1"``).

    Returns:
        ``"vision"``, ``"projector"``, ``"language"``, ``"head"`` or ``None``.
    """
    for role, prefixes in model_roles(model).items():
        if any(_under(module_name, p) for p in prefixes):
            return role
    return None


def encoder_module_name(model: nn.Module) -> str | None:
    """The name of an encoder-decoder's encoder module: the submodule ``model.get_encoder()`` returns, for a model
    whose ``config.is_encoder_decoder`` is true (Whisper's audio encoder, BART's / T5's token encoder).

    Args:
        model: any module.

    Returns:
        The encoder's name in ``model.named_modules()``; ``None`` for a model that is not such an encoder-decoder,
        has no ``get_encoder()`` (or one that fails) or whose encoder is not one of its submodules.
    """
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get = getattr(model, "get_encoder", None)
    try:
        encoder = get() if callable(get) else None
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return None
    if not isinstance(encoder, nn.Module):
        return None
    return next((n for n, m in model.named_modules() if m is encoder and n), None)


def _holds_linear(mod: nn.Module) -> bool:
    """Whether ``mod`` or a module below it is a linear layer: an ``nn.Linear``, or a layer standing in for one
    (integer ``in_features`` and ``out_features``: a quantized ``QuantLinear``), so that a quantized model keeps the
    block lists of its float model."""
    return any(isinstance(m, nn.Linear) or (isinstance(getattr(m, "in_features", None), int)
                                            and isinstance(getattr(m, "out_features", None), int))
               for m in mod.modules())


def _container(mod: nn.Module) -> bool:
    """Whether ``mod`` is a bare container (``nn.Module()``, ``nn.ModuleList``, ``nn.ModuleDict``: a namespace for
    children, as Chameleon's VQ encoder keeps each resolution level's blocks in an ``nn.Module()``): it cannot be
    called, its parent calls the children, so it is no block."""
    return type(mod) in (nn.Module, nn.ModuleList, nn.ModuleDict)


def _find_layers(model: nn.Module, prefixes: list[str]) -> list[str] | None:
    """Names of the entries of the shallowest non-empty ``nn.ModuleList`` under ``prefixes`` whose entries are not
    bare containers (:func:`_container`)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or any(_container(b) for b in mod):
            continue
        if not any(_under(name, p) for p in prefixes):
            continue
        depth = name.count(".")
        if best is None or depth < best[0]:
            best = (depth, name, mod)
    if best is None:
        return None
    return [f"{best[1]}.{i}" for i in range(len(best[2]))]


def language_model_layers(model: nn.Module, side: str | None = None) -> list[str]:
    """Names of the language model's blocks (entries of its layer ``ModuleList``), in forward order.

    An encoder-decoder language model (T5, BART, bert2bert's ``EncoderDecoderModel``, FSMT, Florence-2's BART, T5Gemma)
    has two block stacks, both in the ``language`` role: its blocks are the encoder's, then the decoder's (the
    stacks of :func:`medquant.models.block_stacks`); ``side`` picks one of them, ``"decoder"`` being the stack that
    generates. Which stack is which is read from the names (:func:`medquant.models.blocks.stack_side`: the outermost
    ``encoder`` / ``decoder`` component of the stack's name).

    Args:
        model: the model.
        side: ``None`` (every language block), ``"encoder"`` or ``"decoder"`` (that stack of an encoder-decoder).

    Returns:
        E.g. ``["model.language_model.layers.0", "model.language_model.layers.1"]``, or for T5
        ``["encoder.block.0", ..., "decoder.block.0", ...]``; ``[]`` when the model has no language role.

    Raises:
        ValueError: ``side`` is not ``None``, ``"encoder"`` or ``"decoder"``, or it is given for a model whose
            language blocks are one stack (a decoder-only LM, a text encoder), where no side can be told apart.
    """
    if side not in (None, "encoder", "decoder"):
        raise ValueError(f"side must be None, 'encoder' or 'decoder', got {side!r}")
    stacks = _language_stacks(model)
    if side is None:
        return [n for names in stacks for n in names]
    if len(stacks) < 2:
        raise ValueError(f"{type(model).__name__}: side={side!r} needs an encoder-decoder language model with an "
                         f"encoder stack and a decoder stack; its language blocks are "
                         f"{'one stack' if stacks else 'none'} (use side=None)")
    return stacks[0] if side == "encoder" else stacks[1]


def _side(stack: str) -> str | None:
    """``"encoder"`` / ``"decoder"``: the outermost of those two dot-separated components of ``stack``, else None
    (bert2bert's decoder keeps its blocks in ``decoder.bert.encoder.layer``: BERT names its stack ``encoder``)."""
    return next((c for c in stack.split(".") if c in ("encoder", "decoder")), None)


def _language_stacks(model: nn.Module) -> list[list[str]]:
    """The language blocks as stacks: ``[]`` without a language role; ``[blocks]`` (the shallowest block list under
    the role); or the encoder's blocks then the decoder's when the language model is an encoder-decoder (the
    shallowest list has a side, and the outermost block lists under the role include one of each side: BART's
    ``encoder.layers`` / ``decoder.layers``, T5's ``encoder.block`` / ``decoder.block``, T5Gemma 2's
    ``encoder.text_model.layers`` / ``decoder.layers``, bert2bert's ``encoder.encoder.layer`` /
    ``decoder.bert.encoder.layer``)."""
    prefixes = model_roles(model).get("language", [])
    names = (_find_layers(model, prefixes) or []) if prefixes else []
    if not names:
        return []
    if _side(names[0].rpartition(".")[0]) is None:
        return [names]
    lists: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.ModuleList) and len(mod) and any(_under(name, p) for p in prefixes)
                and not any(_under(name, q) for q, _ in lists)):  # outermost: not a list inside a block
            lists.append((name, mod))
    by_side: dict[str, tuple[str, nn.ModuleList]] = {}
    for name, mod in lists:
        side = _side(name)
        if side is not None:
            by_side.setdefault(side, (name, mod))
    if len(by_side) < 2:
        return [names]
    return [[f"{name}.{i}" for i in range(len(mod))] for name, mod in (by_side["encoder"], by_side["decoder"])]


def vision_layers(model: nn.Module) -> list[str]:
    """Names of the vision tower's encoder blocks, in order; ``[]`` when there is no vision role.

    Every block list of the shallowest depth whose blocks are of the first list's class, in module order:
    Mllama's ``transformer.layers`` then its ``global_transformer.layers``; a VQ image tokenizer beside a
    ViT tower (Janus) is not a block list of that class. A vision prefix (a second tower) with none of those
    lists adds its own shallowest block list when every block holds an ``nn.Linear``: DeepSeek-VL hybrid's
    SigLIP ``vision_model.encoder.layers`` beside its SAM ``high_res_vision_model.vision_encoder.layers``
    (two towers reading the same image, listed in module order).

    Args:
        model: the model.

    Returns:
        Block names such as ``"model.vision_tower.vision_model.encoder.layers.0"``; ``[]`` without a vision role.
    """
    prefixes = model_roles(model).get("vision", [])
    first = (_find_layers(model, prefixes) or []) if prefixes else []
    if not first:
        return []
    stack = first[0].rpartition(".")[0]
    depth, cls = stack.count("."), type(model.get_submodule(first[0]))
    out: list[str] = []
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.ModuleList) and len(mod) and name.count(".") == depth
                and any(_under(name, p) for p in prefixes) and all(type(b) is cls for b in mod)):
            out.extend(f"{name}.{i}" for i in range(len(mod)))
    modules = dict(model.named_modules())
    for p in prefixes:  # a second tower of another block class (DeepSeek-VL hybrid's SigLIP beside its SAM)
        if p in modules and not any(_under(n, p) for n in out):
            extra = _find_layers(model, [p]) or []
            if extra and all(_holds_linear(modules[n]) for n in extra):
                out.extend(extra)
    order = {n: i for i, n in enumerate(modules)}
    out.sort(key=order.__getitem__)
    if not any(_holds_linear(model.get_submodule(n)) for n in out):
        out = _stages_zipped(model, out, _linear_block_lists(model, prefixes, set(out)))
    return out


def _stages_zipped(model: nn.Module, stages: list[str], blocks: list[str]) -> list[str]:
    """``stages + blocks`` in forward order. When ``stages`` are the ``n`` entries ``S.i`` of one list and ``blocks``
    the entries ``B.i.j`` of the ``n`` lists of one list ``B``, stage ``i`` runs its blocks after its own entry
    (Florence-2's DaViT: ``for conv, block in zip(self.convs, self.blocks)``): ``S.0, B.0.*, S.1, B.1.*, ...``;
    otherwise ``stages`` then ``blocks``."""
    parents = {n.rpartition(".")[0] for n in stages}
    outer = {n.rpartition(".")[0].rpartition(".")[0] for n in blocks}
    if len(parents) != 1 or len(outer) != 1:
        return stages + blocks
    b_name = outer.pop()
    sizes = {len(list(model.get_submodule(n).children())) for n in (parents.pop(), b_name)}
    if sizes != {len(stages)}:
        return stages + blocks
    per_stage: dict[str, list[str]] = {}
    for n in blocks:
        per_stage.setdefault(n.rpartition(".")[0], []).append(n)
    return [x for i, s in enumerate(stages) for x in [s, *per_stage.get(f"{b_name}.{i}", [])]]


def _linear_block_lists(model: nn.Module, prefixes: list[str], seen: set[str]) -> list[str]:
    """The entries of the innermost block lists under ``prefixes`` whose blocks hold Linear layers: the
    transformer blocks of a tower whose shallowest list holds only convolutional stages (Florence-2's DaViT keeps
    its patch-embedding convs in one list and its attention blocks in a list of lists)."""
    out: list[str] = []
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.ModuleList) and len(mod) and any(_under(name, p) for p in prefixes)
                and not any(_under(name, s) for s in seen)
                and not any(isinstance(b, nn.ModuleList) for b in mod)
                and all(_holds_linear(b) for b in mod)
                and not any(_under(name, o) for o in out)):
            out.extend(f"{name}.{i}" for i in range(len(mod)))
    return out


def unassigned_modules(model: nn.Module, types: tuple[type[nn.Module], ...] = WEIGHT_MODULE_TYPES) -> list[str]:
    """Names of modules of ``types`` (Linear / Conv by default) that belong to no role.

    For a plain ``nn.Module`` (no roles) this is every such module. An audio encoder (Phi-4-multimodal's
    ``audio_embed``) has no role and is listed here; parameters held directly by a container outside every
    role are listed by :func:`unassigned_parameters`.

    Args:
        model: the model.
        types: the module classes to look for (default Linear and Conv layers).

    Returns:
        Module names in ``named_modules`` order.
    """
    roles = model_roles(model)
    prefixes = [p for ps in roles.values() for p in ps]
    return [n for n, m in model.named_modules()
            if isinstance(m, types) and not any(_under(n, p) for p in prefixes)]


def unassigned_parameters(model: nn.Module) -> list[str]:
    """Names of parameters (from ``model.named_parameters()``) that belong to no role.

    Together with the roles this accounts for every parameter: each one lies under exactly one role prefix
    or is listed here (every parameter of a plain ``nn.Module``).

    Args:
        model: the model.

    Returns:
        Parameter names in ``named_parameters`` order.
    """
    prefixes = [p for ps in model_roles(model).values() for p in ps]
    return [n for n, _ in model.named_parameters() if not any(_under(n, p) for p in prefixes)]
