"""Roles of a Hugging Face model found from its structure, with module names as hints.

Used by :func:`medquant.models.model_roles` for every architecture outside its table of known layouts. The
steps, cheapest first (no forward pass unless they leave weights undecided):

1. **Anchors.** The *language model* is the module that owns the token embeddings
   (``model.get_input_embeddings()``, an ``nn.Embedding`` - or the ``QuantEmbedding`` that ``quantize_embeddings_``
   made of it - or a module holding exactly one, as Kyutai speech-to-text's table of text and audio-codebook
   tokens; for a dual encoder, the text tower's, or when that
   method fails (OWL-ViT, GroupViT) the tower's ``nn.Embedding`` of ``config.vocab_size`` rows) and the
   decoder / encoder stack beside them: the smallest ancestor of the embedding that holds a non-empty
   ``nn.ModuleList`` of blocks (a list of embedding tables, MarkupLM's xpath embeddings, is no stack). The *head*
   is ``model.get_output_embeddings()`` (``lm_head``) when it lies outside the language model (when that is an
   ``nn.Embedding``, as FSMT's decoder table, the shallowest ``nn.Linear`` of the same ``[vocab, hidden]`` shape
   beside it: FSMT's ``output_projection``), or a child named ``classifier`` / ``score`` / ``head`` / ``pooler`` /
   ``generation_head`` / ``visual_projection`` / ``text_projection`` / ``qa_outputs`` (the span head of the
   ``...ForQuestionAnswering`` classes), or one that runs between the body's output and
   the logits or embedding, as BERT's ``cls.predictions.transform`` does: a name ending in ``predictions``
   (ELECTRA's ``generator_predictions`` / ``discriminator_predictions``), DistilBERT's ``vocab_transform`` /
   ``vocab_layer_norm``, AltCLIP's text ``pre_LN`` / ``transformation`` (its text projection).
2. **Sub-models and names.** Walking the tree from the root, a sub-model (a ``PreTrainedModel``) whose
   ``config`` is the parent's ``vision_config`` / ``vq_config`` is vision, ``qformer_config`` is projector,
   ``text_config`` is language, ``audio_config`` / ``codec_config`` is an audio part (no role, reported: Kyutai
   speech-to-text's Mimi ``codec_model``), and so is ``protein_encoder_config`` (Evolla's SaProt encoder of
   ``protein_input_ids``: another modality, no role). Other modules are
   placed by their attribute name: ``vision_tower``, ``visual``, ``vision_model``, ``vqmodel``,
   ``img_processor`` ... are vision; ``projector``, ``connector``, ``aligner``, ``merger``, ``qformer``,
   ``embed_vision``, ``mm_projector``, ``language_projection``, ``image_to_text_projection``,
   ``visual_embeddings_table``, ``image_newline``, ``vision_adapter`` (Muse Glimmer's and Llama 4's MLP of
   ``projector_*`` sizes after the tower) ... are projector. Inside the language model the walk
   continues (outside its layer list), so a vision tower or projector registered beside ``model.layers``
   (LLaVA-Med's ``LlavaMistralForCausalLM``, Phi-4-multimodal's ``embed_tokens_extend``, Chameleon's
   ``vqmodel``) is split out of the language role. Inside a vision tower, children named like a projector
   (Qwen2-VL / Qwen3-VL ``merger``, ``deepstack_merger_list``) are projector. Weak hints (``patch_embed``,
   ``pixel``) count only in a multimodal model (BLT's byte ``patch_embedding_projection`` is text), outside the
   language model and on its direct children only, so an unnamed tower's own patch embedding never splits it
   (at any depth when nothing else is vision and the config declares no vision part, so no trace follows: ViLT's
   ``embeddings.patch_embeddings``); a head-named module inside the language model is projector when it names
   the image (GIT's ``visual_projection``), else language; the ``encoder`` of a model whose main input is
   ``pixel_values`` (``VisionEncoderDecoderModel``) is vision, and a ``decoder`` holding a block list beside
   the language model (an encoder-decoder whose encoder owns the token embedding: T5Gemma, the VLM T5Gemma 2) is
   language. In a text-only model (main input ``input_ids``, no vision / audio / protein sub-config, no image /
   audio / protein argument of ``forward``) every other module holding a block stack is a second text stack,
   language with its outermost ancestor that holds nothing but heads: bert2bert's ``EncoderDecoderModel``
   ``decoder``, FSMT's decoder, SeamlessM4T's ``text_encoder``, BLT's global transformer and local decoder.
3. **Trace, only when names do not decide.** A multimodal model (a vision / VQ sub-config, or image
   inputs in its ``forward``) in which step 2 found no vision module although its config declares one, left
   weight-bearing modules outside every role, or holds an unnamed module with a weight matrix beside the
   layers of a language model that contains an image module, is traced: forward hooks record which modules run in the model's own
   ``get_image_features`` on one zero image of the vision config's size (real weights, no copy). The
   first undecided module to run receives the pixels and is vision; undecided modules that run after it
   are projector. A module that sees the image is never language.
4. **Tied image weights.** A module inside the language model whose parameters are all tensors of a vision /
   projector module takes that role: UDOP's T5 encoder runs ``encoder.embed_patches`` on the pixels with the
   weights of the top-level ``patch_embed``.
5. **Parameters held directly by a container** split between roles (LLaVA-OneVision's
   ``image_newline``, BLIP-2's ``query_tokens``, Phi-4's ``glb_GN``) are placed by their own name, else by the
   container's name when that names a vision tower (Llama 4's ``vision_model.class_embedding`` /
   ``positional_embedding_vlm``, left beside its split-out ``vision_adapter``: vision) or when the container is
   the vision sub-model (its ``config`` is the root's vision sub-config: PP-FormulaNet's ``encoder.pos_embed``,
   added to the patches, beside the projector nested in that encoder: vision), else as
   projector when the container holds both vision and another role (they lie between the two); the rest
   (``logit_scale`` of a dual encoder is head) are reported by ``unassigned_parameters``.

A model whose token embeddings or image path cannot be found raises :class:`UnsupportedArchitectureError`
saying what was found, why no token embedding anchors it (what ``get_input_embeddings()`` raised or returned;
projections of a Linear class of the model's own, not ``nn.Linear``: IBert's ``QuantEmbedding`` / ``QuantLinear``,
Canine's hashed code-point embeddings) and how to select modules with explicit patterns instead.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["UnsupportedArchitectureError", "structural_roles"]


class UnsupportedArchitectureError(ValueError):
    """A Hugging Face model whose architecture medquant cannot split into roles."""


# attribute names (last component of a module name), matched as substrings, checked in this order
_HEAD_NAMES = ("lm_head", "classifier", "score", "head", "pooler", "generation_head", "visual_projection",
               "text_projection", "qa_outputs", "logit_scale", "logit_bias", "fc_norm", "cls",
               # what runs between the body's last hidden state and the logits / embedding, as BERT's
               # cls.predictions.transform: DistilBERT's vocab_transform / vocab_layer_norm, AltCLIP's text
               # pre_LN / transformation (its text_projection); ELECTRA's *_predictions: any name ending "predictions"
               "vocab_transform", "vocab_layer_norm", "transformation", "pre_ln")
_PROJECTOR_HINTS = ("projector", "connector", "aligner", "merger", "qformer", "query_tokens", "embed_vision",
                    "mm_proj", "multi_modal", "multimodal_proj", "resampler", "image_newline", "language_projection",
                    "image_to_text", "img_projection", "generation_embeddings", "visual_embeddings_table",
                    "vision_proj", "abstractor", "perceiver", "glb_gn", "sub_gn", "latent_query",
                    # an MLP of the config's projector_* sizes between the tower and the text projection (Muse
                    # Glimmer's vision_adapter; Llama 4's pixel-shuffle MLP vision_model.vision_adapter)
                    "vision_adapter")
_VISION_HINTS = ("vision", "visual", "vqmodel", "vq_model", "img_processor", "image_encoder", "image_tower", "vit")
# hints that also name parts of a tower: trusted outside the language model and on its direct children only
# (UDOP's patch_embed), never deeper (an unnamed tower's own patch embedding must not split it)
_WEAK_VISION_HINTS = ("patch_embed", "pixel")
_OTHER_HINTS = ("audio", "speech", "sound", "codec")
_LANGUAGE_HINTS = ("language_model", "text_model", "llm", "text_decoder")
_OTHER = "_other"  # an audio (or other non-image) encoder: no role, reported as unassigned

# config attributes naming sub-configs, by role
_CONFIG_ROLES = (("qformer", "projector"), ("vision", "vision"), ("vq", "vision"), ("visual", "vision"),
                 ("image", "vision"), ("audio", _OTHER), ("speech", _OTHER), ("codec", _OTHER), ("protein", _OTHER),
                 ("text", "language"), ("language", "language"), ("llm", "language"))
_IMAGE_ARGS = ("pixel_values", "images", "image_pixel_values", "pixel_values_images")


def under(name: str, prefix: str) -> bool:
    """True when module ``name`` is ``prefix`` or lies inside it (``""`` is the root)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _join(path: str, child: str) -> str:
    return f"{path}.{child}" if path else child


def _children(path: str, modules: dict[str, nn.Module]) -> list[str]:
    return [_join(path, n) for n, _ in modules[path].named_children()]


def make_disjoint(found: dict[str, list[str]], modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Split any prefix that strictly contains another role's prefix (or is the root) into its children."""
    out: dict[str, list[str]] = {}
    for role, paths in found.items():
        others = [q for r, qs in found.items() if r != role for q in qs]
        result: list[str] = []
        stack = list(reversed(paths))
        while stack:
            p = stack.pop()
            if p not in modules:  # a parameter name (held directly by a container)
                result.append(p)
                continue
            inner = [q for q in others if q != p and under(q, p)]
            if inner or p == "":
                kids = [c for c in _children(p, modules) if c not in others]
                stack.extend(reversed(kids))
            else:
                result.append(p)
        if result:
            out[role] = result
    return out


def _name_role(attr: str, weak: bool = True) -> str | None:
    low = attr.lower()
    if low in _HEAD_NAMES or low == "fc" or "classifier" in low or low.endswith(("_head", "predictions")):
        return "head"
    vision = _VISION_HINTS + _WEAK_VISION_HINTS if weak else _VISION_HINTS
    for hints, role in ((_PROJECTOR_HINTS, "projector"), (_OTHER_HINTS, _OTHER), (vision, "vision"),
                        (_LANGUAGE_HINTS, "language")):
        if any(h in low for h in hints):
            return role
    return None


def _sub_configs(config) -> dict[str, object]:
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover
        return {}
    return {k: v for k, v in vars(config).items() if isinstance(v, PretrainedConfig)}


def _config_role(module: nn.Module, sub_configs: dict[str, object]) -> str | None:
    """Role of a sub-model whose config is one of the root's sub-configs (matched by identity); the ``encoder``
    of a model whose main input is the image (``VisionEncoderDecoderModel``) is vision (key ``"image:encoder"``)."""
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(module, "get_input_embeddings"):  # sub-models only (not rotary embeddings...)
        return None
    for key, value in sub_configs.items():
        if value is cfg:
            for hint, role in _CONFIG_ROLES:
                if hint in key:
                    return role
    return None


def _stands_for_weight_layer(module: nn.Module) -> bool:
    """A layer holding its weight as buffers, no parameter (a quantized ``QuantLinear`` / ``QuantConv2d`` /
    ``QuantEmbedding``): integer ``in_features`` / ``out_features``, ``in_channels`` / ``out_channels`` or
    ``num_embeddings`` / ``embedding_dim``, and at least one buffer."""
    sizes = (("in_features", "out_features"), ("in_channels", "out_channels"), ("num_embeddings", "embedding_dim"))
    return (any(all(isinstance(getattr(module, a, None), int) for a in pair) for pair in sizes)
            and any(True for _ in module.buffers(recurse=False)))


def _has_weights(module: nn.Module) -> bool:
    """Whether ``module`` holds a parameter, or a layer whose weight is stored as buffers (a quantized layer: a
    bias-free head such as CLIP's ``visual_projection``, once quantized, holds no parameter)."""
    return any(True for _ in module.parameters()) or any(_stands_for_weight_layer(m) for m in module.modules())


def _is_table(module: nn.Module) -> bool:
    """An embedding table: an ``nn.Embedding``, or a quantized one (``QuantEmbedding``: integer ``num_embeddings`` /
    ``embedding_dim``, its rows packed in buffers, no parameter)."""
    if isinstance(module, nn.Embedding):
        return True
    return (isinstance(getattr(module, "num_embeddings", None), int)
            and isinstance(getattr(module, "embedding_dim", None), int)
            and any(True for _ in module.buffers(recurse=False)) and not any(True for _ in module.parameters()))


def _token_embedding(model: nn.Module, by_vocab: bool = False) -> nn.Module | None:
    """``model.get_input_embeddings()`` when it is an ``nn.Embedding``, or the single ``nn.Embedding`` inside the
    module it returns (Kyutai speech-to-text wraps its table of text and audio-codebook tokens); with ``by_vocab``,
    when that method fails (OWL-ViT's text tower), the first ``nn.Embedding`` of ``config.vocab_size`` rows inside
    ``model``."""
    try:
        emb = model.get_input_embeddings()  # type: ignore[operator]
    except (NotImplementedError, AttributeError, TypeError):
        emb = None
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if by_vocab and isinstance(vocab, int):
            emb = next((m for m in model.modules() if _is_table(m) and m.num_embeddings == vocab), None)
    if isinstance(emb, nn.Module) and not _is_table(emb):
        tables = [m for m in emb.modules() if _is_table(m)]
        emb = tables[0] if len(tables) == 1 else None
    return emb if isinstance(emb, nn.Module) and _is_table(emb) else None


def _no_embedding_reason(model: nn.Module) -> str:
    """Why no token embedding anchors the language model: what ``get_input_embeddings()`` gave, and projections that
    are a Linear class of the model's own rather than ``nn.Linear`` (IBert's ``QuantLinear``)."""
    try:
        emb = model.get_input_embeddings()  # type: ignore[operator]
    except (NotImplementedError, AttributeError, TypeError) as e:
        why = f"get_input_embeddings() raised {type(e).__name__}: the model has no token table to anchor on"
    else:
        why = ("get_input_embeddings() returned None" if emb is None else
               f"get_input_embeddings() returns a {type(emb).__name__}, not an nn.Embedding (nor a module holding one)")
    own = sorted({type(m).__name__ for m in model.modules() if "linear" in type(m).__name__.lower()
                  and not isinstance(m, nn.Linear) and getattr(getattr(m, "weight", None), "ndim", 0) == 2})
    if own:
        why += (f"; its projections are {', '.join(own)} modules of its own, not nn.Linear, which medquant's "
                "quantizers and pruner do not replace")
    return why


def _is_stack(module: nn.Module) -> bool:
    """A non-empty ``nn.ModuleList`` of blocks, not of embedding tables (MarkupLM's xpath embeddings)."""
    return (isinstance(module, nn.ModuleList) and len(module) > 0
            and not all(_is_table(m) for m in module))


def _language_root(model: nn.Module, modules: dict[str, nn.Module], names: dict[int, str]) -> str | None:
    """The smallest ancestor of the token embedding that holds a non-empty ModuleList (the decoder stack)."""
    candidates = [model]
    emb = _token_embedding(model)
    if emb is None:  # a dual encoder (CLIPModel): the text tower's own embeddings
        subs = _sub_configs(getattr(model, "config", None) or object()) if hasattr(model, "config") else {}
        candidates = [m for n, m in modules.items() if n and _config_role(m, subs) == "language"]
        emb = next((e for e in (_token_embedding(c, by_vocab=True) for c in candidates) if e is not None), None)
    if emb is None or id(emb) not in names:
        return None
    path = names[id(emb)]
    while path:
        path = path.rpartition(".")[0]
        owner = modules[path]
        for name, mod in owner.named_modules():
            if _is_stack(mod) and not under(_join(path, name), names[id(emb)]):
                return path
    return None


def _head_anchors(model: nn.Module, language: str | None, names: dict[int, str]) -> list[str]:
    """``get_output_embeddings()`` as the head: outside the language model, or a child of the language model's root
    beside its layers (Pix2Struct's ``decoder.lm_head``), never the token embedding itself; deeper inside it is
    part of the language model."""
    try:
        out = model.get_output_embeddings()  # type: ignore[operator]
    except (NotImplementedError, AttributeError, TypeError):
        out = None
    if out is None or id(out) not in names or out is _token_embedding(model):
        return []
    path = names[id(out)]
    if isinstance(out, nn.Embedding):
        # a token table, not a projection (FSMT returns its decoder's embed_tokens): the head is the shallowest
        # Linear of the same [vocab, hidden] shape beside it (FSMT's output_projection), else there is none
        parent = path.rpartition(".")[0]
        same = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and under(n, parent)
                and tuple(m.weight.shape) == tuple(out.weight.shape)]
        if not same:
            return []
        path = min(same, key=lambda n: n.count("."))
    if language is not None and language != "" and under(path, language) and path.rpartition(".")[0] != language:
        return []
    return [path]


def is_multimodal(model: nn.Module) -> bool:
    """A vision / VQ sub-config, an ``mm_vision_tower`` setting or an image argument of ``forward``."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        if any(role == "vision" for role in (_config_key_role(k) for k in _sub_configs(cfg))):
            return True
        if getattr(cfg, "mm_vision_tower", None) or getattr(cfg, "vision_tower", None):
            return True
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return any(a in params for a in _IMAGE_ARGS)


def _declares_vision(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    if any(_config_key_role(k) == "vision" for k in _sub_configs(cfg)):
        return True
    return bool(getattr(cfg, "mm_vision_tower", None) is not None or getattr(cfg, "vision_tower", None))


def _config_key_role(key: str) -> str | None:
    return next((role for hint, role in _CONFIG_ROLES if hint in key), None)


def _units(model: nn.Module, modules: dict[str, nn.Module], language: str | None,
           heads: list[str], multimodal: bool = True, deep_weak: bool = False) -> dict[str, str]:
    """``{module path: role}`` for the outermost modules that steps 1-2 place (see the module docstring); weak vision
    hints (``patch_embed``, ``pixel``) count only in a ``multimodal`` model (BLT's byte ``patch_embedding_projection``
    is text); with ``deep_weak`` also deeper inside the language model (a single-stream model such as ViLT, whose
    patch embedding sits in the text model's ``embeddings``)."""
    subs = _sub_configs(model.config) if hasattr(model, "config") else {}
    if getattr(model, "main_input_name", "") == "pixel_values" and "encoder" in subs:
        subs["image:encoder"] = subs.pop("encoder")
    anchors = {h: "head" for h in heads}
    if language is not None:
        anchors[language] = "language"
    units: dict[str, str] = dict(anchors)

    def visit(path: str, in_language: bool, depth: int = 0) -> None:
        for attr, child in modules[path].named_children():
            cpath = _join(path, attr)
            if cpath in anchors:
                if anchors[cpath] == "language":
                    visit(cpath, True)
                continue
            if in_language and isinstance(child, nn.ModuleList):
                continue  # the decoder layers: per-layer names (vision experts...) stay language
            role = _config_role(child, subs) or _name_role(attr, weak=multimodal and (deep_weak or not in_language or depth == 0))
            # recurse into a module holding an anchor of another role, or the language anchor (its head beside it)
            inner = [a for a in anchors if a != cpath and under(a, cpath) and (anchors[a] != role or role == "language")]
            if role == "head" and in_language:
                # GIT's visual_projection inside the language model maps image features: projector; a text
                # encoder's pooler stays language
                role = "projector" if any(h in attr.lower() for h in ("visual", "vision", "image")) else None
            if role == "language" and in_language:
                role = None  # an encoder / decoder sub-model of the language model (Florence-2's BART) is part of it
            if role is not None and not inner and (role != "head" or _has_weights(child)):
                units[cpath] = role
                if role == "vision":
                    for gattr, _ in child.named_children():
                        if _name_role(gattr) == "projector":
                            units[_join(cpath, gattr)] = "projector"
                continue
            visit(cpath, in_language, depth + 1 if in_language else 0)

    if language == "":
        visit("", True)
    else:
        visit("", False)
    return units


def _trace_image_modules(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """Names of the modules that run in ``get_image_features`` on one zero image, in first-call order."""
    fn = getattr(model, "get_image_features", None)
    if fn is None:
        inner = getattr(model, "model", None)
        fn = getattr(inner, "get_image_features", None)
    vcfg = getattr(model.config, "vision_config", None)
    size = getattr(vcfg, "image_size", None)
    if fn is None or size is None:
        raise RuntimeError("the model has no get_image_features or no vision_config.image_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    channels = getattr(vcfg, "num_channels", 3)
    param = next(model.parameters())
    if param.device.type == "meta":
        raise RuntimeError("the weights are on the meta device")
    order: list[str] = []
    seen: set[str] = set()
    handles = []
    for name, mod in modules.items():
        def hook(_m, _a, name=name):
            if name not in seen:
                seen.add(name)
                order.append(name)
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        pixels = torch.zeros(1, channels, size, size, dtype=param.dtype, device=param.device)
        with torch.no_grad():
            fn(pixel_values=pixels)
    finally:
        for h in handles:
            h.remove()
    return order


def _unplaced(units: dict[str, str], modules: dict[str, nn.Module]) -> list[str]:
    """Outermost weight-bearing modules outside every unit (siblings of the units' containers)."""
    out = []
    def walk(path: str) -> None:
        for attr, child in modules[path].named_children():
            cpath = _join(path, attr)
            if any(under(cpath, u) for u in units):
                continue
            if any(under(u, cpath) for u in units):
                walk(cpath)
            elif _has_weights(child):
                out.append(cpath)
    walk("")
    return out


def _suspects(units: dict[str, str], language: str, modules: dict[str, nn.Module]) -> list[str]:
    """Children of a language model that holds an image module (LLaVA-Med's layout) and that are neither a
    placed module, the token embedding, the layer list nor a norm (no matrix; a quantized layer's packed matrix
    counts): an unnamed projector hides there."""
    if not any(r in ("vision", "projector") and p != language and under(p, language) for p, r in units.items()):
        return []
    emb = _token_embedding(modules[""])
    out = []
    for attr, child in modules[language].named_children():
        cpath = _join(language, attr)
        if (cpath in units or child is emb or isinstance(child, nn.ModuleList)
                or any(under(u, cpath) for u in units)):
            continue
        if any(p.dim() >= 2 for p in child.parameters()) or any(_stands_for_weight_layer(m) for m in child.modules()):
            out.append(cpath)  # a weight matrix, or a quantized layer standing for one (its matrix is buffers)
    return out


def _error(model: nn.Module, found: dict[str, list[str]], detail: str) -> UnsupportedArchitectureError:
    top = ", ".join(n for n, _ in model.named_children()) or "<none>"
    got = "; ".join(f"{r}: {', '.join(ps)}" for r, ps in found.items() if r != _OTHER) or "nothing"
    return UnsupportedArchitectureError(
        f"{type(model).__name__}: {detail}. Found {got} (top-level children: {top}). Select modules with explicit "
        "patterns instead, e.g. quantize_(model, {'re:model\\.layers\\..*': QuantConfig(4)}, "
        "skip=['model.vision_tower']) - exact module names or 're:<regex>'."
    )


def place_parameters(model: nn.Module, roles: dict[str, list[str]], modules: dict[str, nn.Module]) -> None:
    """Add parameters held directly by a container outside every role (step 5), in place."""
    prefixes = [p for ps in roles.values() for p in ps]
    subs = _sub_configs(model.config) if hasattr(model, "config") else {}
    for pname, _ in model.named_parameters():
        if any(under(pname, p) for p in prefixes):
            continue
        owner, _, attr = pname.rpartition(".")
        role = _name_role(attr)
        if role not in ("vision", "projector", "head") and (
                _name_role(owner.rpartition(".")[2], weak=False) == "vision"
                or (owner in modules and _config_role(modules[owner], subs) == "vision")):
            # a split vision tower's own embeddings (Llama 4's vision_model.class_embedding), also when the tower
            # is a vision sub-model under another name (PP-FormulaNet's encoder.pos_embed, added to its patches)
            role = "vision"
        if role not in ("vision", "projector", "head"):
            inside = {r for r, ps in roles.items() if any(under(p, owner) for p in ps)}
            role = "projector" if "vision" in inside and len(inside) > 1 else None
        if role is not None:
            roles.setdefault(role, []).append(pname)


def structural_roles(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """``{role: prefixes}`` of a Hugging Face model by structure (module docstring); roles may be missing.

    Raises:
        UnsupportedArchitectureError: no token embedding and no image input (nothing to anchor roles on), or a
            multimodal model whose vision part neither names nor a trace of ``get_image_features`` locate.
    """
    names = {id(m): n for n, m in reversed(list(modules.items()))}
    language = _language_root(model, modules, names)
    heads = _head_anchors(model, language, names)
    multimodal = is_multimodal(model)
    if language is None:
        if not multimodal and not _takes_images(model):
            raise _error(model, {}, "no token embedding with a layer stack and no image input ("
                         + _no_embedding_reason(model) + ")")
        # a vision encoder / classifier: the whole model is vision, around its head
        units: dict[str, str] = {"": "vision"}
        for attr, child in model.named_children():
            if _name_role(attr) == "head" and _has_weights(child):
                units[attr] = "head"
        found: dict[str, list[str]] = {}
        for p, r in units.items():
            found.setdefault(r, []).append(p)
        roles = make_disjoint(found, modules)
        place_parameters(model, roles, modules)
        return roles
    units = _units(model, modules, language, heads, multimodal)
    if multimodal and "vision" not in units.values() and not _declares_vision(model):
        # no tower by name and none declared (so no trace): a patch embedding at any depth reads the image (ViLT)
        units = _units(model, modules, language, heads, multimodal, deep_weak=True)
    undecided = _unplaced(units, modules) + (_suspects(units, language, modules) if multimodal else [])
    # a second text stack outside the language model: the decoder of an encoder-decoder whose encoder owns the
    # token embedding (T5Gemma; the VLM T5Gemma 2)
    for u in [u for u in undecided if u.rpartition(".")[2] in ("decoder", "text_decoder") and _has_stack(modules[u])]:
        units[u] = "language"
        undecided.remove(u)
    if not multimodal and _text_only(model):
        undecided = _text_stacks(units, undecided, modules)
    # no tower found: an error only when the config declares one (a multimodal class built text-only, e.g. Gemma 4
    # without vision_config, has none)
    if multimodal and (undecided or ("vision" not in units.values() and _declares_vision(model))):
        units = _resolve_by_trace(model, modules, units, undecided, language)
    units.update(_tied_to_image(units, modules))
    found = {}
    for p, r in units.items():
        if not any(q != p and under(p, q) and units[q] == r for q in units):  # the outermost of one role
            found.setdefault(r, []).append(p)
    roles = make_disjoint(found, modules)
    roles.pop(_OTHER, None)
    place_parameters(model, roles, modules)
    return roles


def _has_stack(module: nn.Module) -> bool:
    """A non-empty ``nn.ModuleList`` (a block stack) inside ``module``."""
    return any(_is_stack(m) for m in module.modules())


# forward arguments of a non-text input (images, video, audio features / waveforms)
_NON_TEXT_ARGS = ("pixel", "image", "video", "audio", "speech", "input_features", "input_values", "protein")


def _text_only(model: nn.Module) -> bool:
    """Main input ``input_ids``, no vision / audio / protein sub-config and no ``forward`` argument of another
    modality (pixels, audio, ``protein_input_ids``...)."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        return False
    cfg = getattr(model, "config", None)
    if cfg is not None and any(_config_key_role(k) in ("vision", "projector", _OTHER) for k in _sub_configs(cfg)):
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return not any(h in a.lower() for a in params for h in _NON_TEXT_ARGS)


def _text_stacks(units: dict[str, str], undecided: list[str], modules: dict[str, nn.Module]) -> list[str]:
    """In a text-only model, an undecided module holding a block stack is a second text stack (the decoder of
    bert2bert's ``EncoderDecoderModel`` or FSMT, SeamlessM4T's text encoder, BLT's global transformer): the outermost
    ancestor that holds no unit but heads becomes language (in ``units``, in place). Returns what stays undecided."""
    for u in list(undecided):
        if u not in undecided or not _has_stack(modules[u]):
            continue
        top = u
        while top:
            parent = top.rpartition(".")[0]
            if parent == "" or any(under(q, parent) and r != "head" for q, r in units.items()):
                break
            top = parent
        units[top] = "language"
        undecided = [v for v in undecided if not under(v, top)]
    return undecided


def _tied_to_image(units: dict[str, str], modules: dict[str, nn.Module]) -> dict[str, str]:
    """Modules inside the language model whose parameters are all tensors of a vision / projector unit (tied
    weights: UDOP's ``encoder.embed_patches`` runs the top-level ``patch_embed`` weights on the pixels): that role."""
    owner: dict[int, str] = {}
    for p, r in units.items():
        if r in ("vision", "projector") and p in modules:
            for t in modules[p].parameters():
                owner.setdefault(id(t), r)
    out: dict[str, str] = {}
    if not owner:
        return out

    def walk(path: str, module: nn.Module) -> None:
        for attr, child in module.named_children():
            cpath = _join(path, attr)
            if cpath in units and units[cpath] != "language":
                continue
            roles = {owner.get(id(t)) for t in child.parameters()}
            if len(roles) == 1 and None not in roles:
                out[cpath] = roles.pop()  # type: ignore[assignment]
            elif roles:
                walk(cpath, child)

    for p, r in units.items():
        if r == "language" and p in modules:
            walk(p, modules[p])
    return out


def _takes_images(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return any(a in params for a in _IMAGE_ARGS)


def _resolve_by_trace(model: nn.Module, modules: dict[str, nn.Module], units: dict[str, str],
                      undecided: list[str], language: str) -> dict[str, str]:
    found: dict[str, list[str]] = {}
    for p, r in units.items():
        found.setdefault(r, []).append(p)
    try:
        order = _trace_image_modules(model, modules)
    except Exception as e:  # noqa: BLE001 - any failure of the model's own code means: cannot decide
        if "vision" in units.values():
            return units  # names found the tower; the undecided modules stay unassigned (reported)
        raise _error(model, found, "found no vision module by name or sub-config, and tracing "
                                   f"get_image_features failed ({type(e).__name__}: {e})") from None
    first_call = {n: i for i, n in enumerate(order)}
    units = dict(units)
    # the outermost undecided modules that saw the image, and children of the language model that did
    ran = [u for u in undecided if u in first_call]
    lang_inner = [n for n in order if n.rpartition(".")[0] == language and n not in units
                  and not isinstance(modules[n], nn.ModuleList) and _has_weights(modules[n])]
    candidates = sorted(ran + lang_inner, key=lambda n: first_call[n])
    has_vision = "vision" in units.values()
    for i, n in enumerate(candidates):
        units[n] = "vision" if (i == 0 and not has_vision) else "projector"
    if "vision" not in units.values():
        raise _error(model, found, "no module ran on the image in get_image_features")
    return units
