"""``AdaptiveQuantizer``: per-input activation bit-widths chosen by image complexity (after the report
"Complexity-Based Quantization of Gemma 3 on MIMIC-CXR-JPG").

Each input image gets a complexity level (from a fitted :class:`medquant.complexity.ComplexityScorer` on the raw
images, from a learned policy, or passed in); the level selects a bit-width (default ``{0: 2, 1: 4, 2: 8, 3: 32}``)
and the activation at one or more *sites* of the network is fake-quantized per sample at that width
(:func:`medquant.adaptive.fakequant.fake_quantize_per_sample`), all samples in one batched forward. The weights
are quantized once, globally, with :func:`medquant.quantize_` (default int8 per output channel), or block by block
with :func:`medquant.calibrate.quantize_sequential` (``weight_sequential=``) for models that do not fit on the
compute device in floating point: the same plan and bit-identical buffers.

A *site* is a module name plus where its activation is taken:

* ``"head"`` or ``("head", "input")`` - the first positional input of the module (a forward pre-hook); the
  default site is the input of the classification head (the fused image + text embedding of
  :class:`medquant.adaptive.VLMClassifier`);
* ``("blocks.3", "output")`` - the module's output (a forward hook; a tuple output has its first element
  quantized).

Dimension 0 of the activation at every site must be the batch.

The bits of a call are kept per thread: calls made at the same time from several threads (a threaded server,
the replicas of ``nn.DataParallel``) each quantize their own samples with their own bits.

Gradient checkpointing (``torch.utils.checkpoint``, reentrant or not; ``activation_checkpointing_enable()`` /
``gradient_checkpointing_enable()`` of a transformers model) runs the sites inside a checkpointed block again
during backward, after the call has returned. That recompute uses the bits (and the on / off state of
:meth:`AdaptiveQuantizer.disabled`) of the call whose output the gradient flows through: each call made with
gradients enabled pins its bits on the autograd nodes of its outputs, and the recompute reads the bits pinned in
the running backward. When one backward covers several calls with different bits (``(l1 + l2).backward()``) and
the recompute cannot tell them apart (same device and batch size), it raises ``RuntimeError`` rather than guess:
call backward once per call. Model calls made inside :meth:`AdaptiveQuantizer.bits_context` pin nothing: their
recompute uses the bits of the ``bits_context`` active around the backward.

This is simulated quantization: the activation values are rounded to ``b`` bits and put back in floating point,
so it changes accuracy, not speed or memory, unless a real low-bit kernel consumes the codes. The weight
quantization through ``quantize_`` is real storage (packed codes) and shrinks the model.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import json
import numbers
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from .fakequant import PASSTHROUGH_BITS, check_bits, fake_quantize_per_sample

DEFAULT_BIT_MAP: dict[int, int] = {0: 2, 1: 4, 2: 8, 3: 32}
WHERE = ("input", "output")
_DEFAULT_HEAD_NAMES = ("head", "classifier", "fc")


def _check_bit_map(bit_map: Mapping) -> dict[int, int]:
    if not isinstance(bit_map, Mapping) or not bit_map:
        raise ValueError(f"bit_map must be a non-empty mapping level -> bits, got {bit_map!r}")
    out = {}
    for k, v in bit_map.items():
        # numbers.Integral: numpy integers too (a map built from arrays); bool is no level or width
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= int(k) < 2**63:
            raise ValueError(f"bit_map levels must be non-negative ints below 2**63 (int64), got {k!r}")
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or \
                not (1 <= int(v) <= 8 or int(v) >= PASSTHROUGH_BITS):
            raise ValueError(f"bit_map[{k}] = {v!r}: bits must be 1..8 or >= {PASSTHROUGH_BITS} (float)")
        out[int(k)] = int(v)
    return dict(sorted(out.items()))


_SEQUENTIAL_KEYS = ("device", "offload_device", "checkpoint", "blocks", "progress")


def _check_sequential_opts(opts) -> dict:
    if not isinstance(opts, Mapping):
        raise TypeError(f"weight_sequential must be a bool or a dict of quantize_sequential keyword arguments, "
                        f"got {type(opts).__name__}")
    bad = sorted(set(opts) - set(_SEQUENTIAL_KEYS))
    if bad:
        raise ValueError(f"unknown weight_sequential option(s) {bad}; accepted: {list(_SEQUENTIAL_KEYS)}")
    return dict(opts)


def _sequential_blocks(model: nn.Module) -> list[list[str]] | None:
    """Blocks for ``quantize_sequential``: those of ``model`` itself, else those of the shallowest submodule that
    has some (the VLM inside a :class:`VLMClassifier`), with full names; ``None`` when there are none."""
    from ..models.blocks import block_stacks

    groups = block_stacks(model)
    if groups:
        return groups
    for name, mod in model.named_modules():
        if name and hasattr(mod, "config"):
            groups = block_stacks(mod)
            if groups:
                return [[f"{name}.{b}" for b in g] for g in groups]
    return None


_STATE_BIT_MAP, _STATE_SITES = "adaptive_bit_map", "adaptive_sites"


def _encode_sites(sites: Sequence[tuple[str, str]]) -> torch.Tensor:
    """The sites as a uint8 tensor of their JSON text (a state_dict entry that safetensors can hold too)."""
    text = json.dumps([list(site) for site in sites])
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _decode_sites(t: torch.Tensor) -> list[tuple[str, str]]:
    return [(str(n), str(w)) for n, w in json.loads(bytes(t.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))]


def _graph_task_id() -> int:
    """The autograd graph task (one ``backward``) this thread is running nodes of; -1 outside backward."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if current is None else int(current())


def _grad_nodes(out, depth: int = 0) -> list:
    """The autograd nodes of the tensors in a model output (a tensor, tuple / list, dict / ``ModelOutput``)."""
    if isinstance(out, torch.Tensor):
        return [out.grad_fn] if out.grad_fn is not None else []
    if depth >= 4:
        return []
    items = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return [n for v in items for n in _grad_nodes(v, depth + 1)]


def _bits_tensor(bits) -> torch.Tensor:
    """``torch.as_tensor(bits)``, but an empty sequence (an empty batch) gives int64, not torch's float32 default
    (which the integer check of the bits then refused)."""
    b = torch.as_tensor(bits)
    if b.numel() == 0 and not isinstance(bits, torch.Tensor):
        b = b.to(torch.int64)
    return b


def _parse_site(site) -> tuple[str, str]:
    if isinstance(site, str):
        return site, "input"
    if isinstance(site, (tuple, list)) and len(site) == 2 and isinstance(site[0], str) and site[1] in WHERE:
        return site[0], site[1]
    raise ValueError(f"a site is a module name or (module name, 'input'|'output'), got {site!r}")


def default_sites(model: nn.Module) -> list[tuple[str, str]]:
    """The input of the classification head.

    ``model.default_adaptive_sites`` when the model declares it, the ``head`` role of a Hugging Face model, or
    a top-level child named ``head`` / ``classifier`` / ``fc``.

    Args:
        model: the model.

    Returns:
        ``[(head name, "input")]`` (or the model's declared sites).

    Raises:
        ValueError: no classification head can be found (pass ``sites=`` explicitly).
    """
    declared = getattr(model, "default_adaptive_sites", None)
    if declared:
        return [_parse_site(s) for s in ([declared] if isinstance(declared, str) else declared)]
    try:
        from ..models import model_roles

        heads = model_roles(model).get("head", [])
    except ValueError:  # UnsupportedArchitectureError is a ValueError
        heads = []
    if len(heads) == 1:
        return [(heads[0], "input")]
    children = dict(model.named_children())
    for name in _DEFAULT_HEAD_NAMES:
        if name in children:
            return [(name, "input")]
    raise ValueError(f"cannot find the classification head of {type(model).__name__}: pass sites=[...] "
                     "(module names from model.named_modules(), optionally (name, 'output'))")


def block_output_sites(model: nn.Module, prefix: str | None = None) -> list[tuple[str, str]]:
    """``(name, "output")`` for every block of ``model.blocks``, of the list ``prefix``, or of the vision layers.

    Without ``blocks`` or ``prefix``, the vision layers of a Hugging Face vision model
    (:func:`medquant.models.vision_layers`).

    Args:
        model: the model.
        prefix: name of the ``nn.ModuleList`` / ``nn.Sequential`` of blocks (default ``blocks`` or the vision layers).

    Returns:
        The sites.

    Raises:
        ValueError: ``prefix`` does not name a list of blocks.
    """
    mods = dict(model.named_modules())
    if prefix is None and isinstance(mods.get("blocks"), nn.ModuleList):
        prefix = "blocks"
    if prefix is not None:
        ml = mods.get(prefix)
        if not isinstance(ml, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"{prefix!r} is not a ModuleList/Sequential of blocks in {type(model).__name__}")
        return [(f"{prefix}.{i}", "output") for i in range(len(ml))]
    from ..models import vision_layers

    return [(n, "output") for n in vision_layers(model)]


def _live_quantizers(model: nn.Module) -> list:
    """The AdaptiveQuantizers (not removed) whose activation hooks sit on a module of ``model``."""
    found: list = []
    for mod in model.modules():
        for hook in list(mod._forward_pre_hooks.values()) + list(mod._forward_hooks.values()):
            owner = getattr(getattr(hook, "func", None), "__self__", None)
            if isinstance(owner, AdaptiveQuantizer) and not owner._removed and all(o is not owner for o in found):
                found.append(owner)
    return found


def _scorer_levels(scorer) -> list[int] | None:
    """The levels ``scorer.levels(...)`` can return: a ``LearnedPolicy``'s ``level_list`` (the keys of its bit map),
    else ``0 .. n_levels - 1`` (a ``ComplexityScorer``); None when the scorer declares neither."""
    level_list = getattr(scorer, "level_list", None)
    if level_list is not None:
        return sorted(int(lv) for lv in level_list)
    n = getattr(scorer, "n_levels", None)
    return None if n is None else list(range(int(n)))


class AdaptiveQuantizer(nn.Module):
    """Wrap ``model`` so each input sample's activations are quantized at a bit-width chosen by its level.

    Args:
        model: any ``nn.Module`` (changed in place: weights quantized, hooks added).
        bit_map: level -> bits (1..8 quantized, >= 16 float). Default ``{0: 2, 1: 4, 2: 8, 3: 32}``.
        sites: a list of module names (input of the module) or ``(name, "input"|"output")`` pairs (one name
            alone may be given as a string); default :func:`default_sites` (input of the classification head).
        scorer: object with ``levels(images)`` (a fitted ``ComplexityScorer`` or a ``LearnedPolicy``), used when
            ``forward`` gets ``images=`` or neither levels nor bits.
        weight_config: ``QuantConfig`` / int / mapping for :func:`medquant.quantize_`, or ``None`` to leave the
            weights as they are (floating point, or already quantized: the model an earlier quantizer's
            :meth:`remove` returned). Default int8 per output channel.
        weight_skip: ``skip`` patterns passed to ``quantize_``.
        weight_sequential: ``False`` (default) quantizes the weights with ``quantize_``; ``True`` or a dict of
            keyword arguments (``device``, ``offload_device``, ``checkpoint``, ``blocks``, ``progress``) uses
            :func:`medquant.calibrate.sequential.quantize_sequential` instead: one decoder / vision block in floating point
            on the device at a time, the model may be a meta-device skeleton read from a safetensors
            ``checkpoint``; same quantized model as ``quantize_``. Without ``blocks`` the blocks are those of
            the model, or of the Hugging Face model inside it (``VLMClassifier.vlm``).

    Call: ``aq(x, levels=lv)``, ``aq(x, bits=b)``, ``aq(x, images=raw)`` or ``aq(x)`` (scorer on ``x``); any other
    positional / keyword arguments go to the model. ``aq.stats()`` reports the average bits actually used. A
    call's bits (and its :meth:`disabled` state) are the calling thread's own, so concurrent calls from several
    threads do not mix them; under
    ``nn.DataParallel(aq)`` pass ``levels`` / ``bits`` as tensors, which are split with the batch. After
    :meth:`remove` the wrapper refuses calls (its sites no longer quantize). Under gradient checkpointing the
    recompute in backward uses the bits of the call the gradient comes through (module docstring); a backward over
    several calls with different bits that the recompute cannot tell apart raises ``RuntimeError``.

    ``state_dict()`` (state version 2) holds, besides the model's tensors, the bit map (``adaptive_bit_map``: int64
    rows ``(level, bits)``) and the sites (``adaptive_sites``: their JSON text as uint8), so it also goes through
    safetensors. ``load_state_dict`` raises ``ValueError`` naming both values, and loads nothing, when this
    quantizer has another bit map or other sites (in any order); states of version 1 (without them) load unchecked.

    One model carries at most one live quantizer: the hooks of each would run in the other's calls, where they
    have no bits. Wrapping a model (or a model containing a module) that another ``AdaptiveQuantizer`` still hooks
    raises ``ValueError`` and changes nothing; after that one's :meth:`remove` the model can be wrapped again
    (with ``weight_config=None``: its weights are quantized already).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``weight_sequential`` is neither a bool nor a dict.
        ValueError: a scorer level missing from the bit map, no site, an unknown or duplicate site, unknown
            ``weight_sequential`` options, ``weight_sequential`` without ``weight_config``, ``model`` already
            hooked by another ``AdaptiveQuantizer`` that was not removed, or layers ``weight_config`` covers that
            are already quantized (pass ``weight_config=None`` to keep them).
    """

    _version = 2  # state_dict: 2 adds the bit map and the sites

    #: what :func:`medquant.quant.hooks.forward_hooks` says installed its site hooks
    hook_owner: ClassVar[str] = "adaptive"

    def __init__(
        self,
        model: nn.Module,
        bit_map: Mapping[int, int] | None = None,
        sites: Sequence | None = None,
        scorer=None,
        weight_config="default",
        weight_skip=None,
        weight_sequential: bool | Mapping = False,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.bit_map = _check_bit_map(DEFAULT_BIT_MAP if bit_map is None else bit_map)
        self.model = model
        self.scorer = scorer
        if scorer is not None:
            produced = _scorer_levels(scorer)
            missing = [lv for lv in produced or () if lv not in self.bit_map]
            if missing:
                raise ValueError(f"the scorer gives levels {produced} but bit_map only has {sorted(self.bit_map)} "
                                 f"(missing {missing}): give bit_map an entry for every level the scorer returns")
        if isinstance(sites, str):  # one module name, not a sequence of its characters
            sites = [sites]
        parsed = [_parse_site(s) for s in sites] if sites is not None else default_sites(model)
        if not parsed:
            raise ValueError("sites is empty: give at least one module name")
        mods = dict(model.named_modules())
        # sites=("blocks.0", "output"): one (name, where) pair given without its list
        bare_pair = tuple(sites) if (isinstance(sites, tuple) and len(sites) == 2 and isinstance(sites[0], str)
                                     and sites[0] in mods and sites[1] in WHERE) else None
        for name, _ in parsed:
            if name not in mods:
                close = difflib.get_close_matches(name, list(mods), n=3)
                raise ValueError(f"unknown module name {name!r} in sites" + (
                    f"; sites is a list of sites: for the {name} of {bare_pair[0]!r} pass sites=[{bare_pair!r}]"
                    if bare_pair is not None and name == bare_pair[1] else
                    f"; did you mean {close}?" if close else "; see model.named_modules()"))
        if len(set(parsed)) != len(parsed):
            raise ValueError(f"duplicate sites in {parsed}")
        self.sites: list[tuple[str, str]] = parsed
        live = _live_quantizers(model)
        if live:
            raise ValueError(f"this model is already wrapped by an AdaptiveQuantizer (sites {live[0].sites}); its hooks "
                             "would quantize this one's calls without bits (and this one's, its calls): call "
                             "remove() on that AdaptiveQuantizer first, or give one AdaptiveQuantizer all the sites (a deepcopy of a "
                             "wrapped model carries a copy of the hooks: copy it before wrapping or after remove())")
        if weight_config is not None:
            from ..quant import QuantConfig, quantize_, quantized_modules

            cfg = QuantConfig(8, scope="channel") if isinstance(weight_config, str) and weight_config == "default" \
                else weight_config
            already = list(quantized_modules(model))
            try:
                if weight_sequential is False or weight_sequential is None:
                    quantize_(model, cfg, skip=weight_skip)
                else:
                    from ..calibrate.sequential import quantize_sequential

                    opts = {} if weight_sequential is True else _check_sequential_opts(weight_sequential)
                    if opts.get("blocks") is None:
                        opts["blocks"] = _sequential_blocks(model)
                    quantize_sequential(model, cfg, skip=weight_skip, **opts)
            except ValueError as e:
                if not already:
                    raise
                # quantize_'s own advice (requantize=True) names an argument this class does not take
                raise ValueError(f"cannot quantize the weights with weight_config={weight_config!r}: {e}. The model "
                                 f"already has quantized layers ({', '.join(already[:3])}"
                                 f"{', ...' if len(already) > 3 else ''}), e.g. it is the model an earlier "
                                 "AdaptiveQuantizer's remove() returned: pass weight_config=None to keep its "
                                 "weights as they are, or weight_skip=[...] naming those layers") from e
        elif weight_sequential not in (False, None):
            raise ValueError("weight_sequential needs weight_config (the weights to quantize); it is None")
        self.weight_config = None if weight_config is None else str(weight_config)
        self._bits: torch.Tensor | None = None  # set by bits_context; read when this thread's call set none
        self._local = threading.local()  # .bits: the bits of the call running in this thread
        self._lock = threading.Lock()  # the statistics, updated by concurrent calls
        self._pinned: dict[int, list] = {}  # graph task id -> the (bits, enabled) of the calls its backward entered
        self._removed = False
        self._enabled = True
        self._handles = []
        mods = dict(model.named_modules())  # quantize_ swapped some modules
        for name, where in self.sites:
            m = mods[name]
            # bound methods (not closures), so copy.deepcopy / pickle give a copy whose hooks use the copy
            if where == "input":
                h = m.register_forward_pre_hook(functools.partial(self._pre_hook, name))
            else:
                h = m.register_forward_hook(functools.partial(self._post_hook, name))
            self._handles.append(h)
        self.reset_stats()

    # ------------------------------------------------------------------ state shared with copies and threads
    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_local", None)  # thread-local storage and locks do not copy or pickle: new ones in the copy
        state.pop("_lock", None)
        state.pop("_pinned", None)  # belongs to backward passes running now
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pinned = {}
        self.__dict__.setdefault("_removed", False)

    def _replicate_for_data_parallel(self):
        """``nn.DataParallel`` replica: runs in a worker thread, so it keeps the on / off state (:meth:`disabled`)
        of the thread that replicated it."""
        replica = super()._replicate_for_data_parallel()
        replica._replica_enabled = self._current_enabled()
        return replica

    # ------------------------------------------------------------------ state_dict: the bit map and the sites
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + _STATE_BIT_MAP] = torch.tensor(list(self.bit_map.items()), dtype=torch.int64)
        destination[prefix + _STATE_SITES] = _encode_sites(self.sites)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        keys = (prefix + _STATE_BIT_MAP, prefix + _STATE_SITES)
        saved_map, saved_sites = (state_dict.get(k) for k in keys)
        if saved_map is not None:
            rows = torch.as_tensor(saved_map).detach().cpu().to(torch.int64).reshape(-1, 2).tolist()
            bit_map = dict(sorted((int(lv), int(b)) for lv, b in rows))
            if bit_map != self.bit_map:
                raise ValueError(f"this state was saved by an AdaptiveQuantizer with bit_map {bit_map}, but this one "
                                 f"has bit_map {self.bit_map}: construct AdaptiveQuantizer(model, bit_map=...) with "
                                 "the bit map of the state")
        if saved_sites is not None:
            sites = _decode_sites(saved_sites)
            if sorted(sites) != sorted(self.sites):
                raise ValueError(f"this state was saved by an AdaptiveQuantizer quantizing the sites {sites}, but this "
                                 f"one quantizes {self.sites}: construct AdaptiveQuantizer(model, sites=...) with "
                                 "the sites of the state")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        unexpected_keys[:] = [k for k in unexpected_keys if k not in keys]
        version = local_metadata.get("version")
        if strict and version is not None and version >= 2:  # version 1 had neither; no metadata: safetensors
            missing_keys.extend(k for k in keys if k not in state_dict)

    def _current_bits(self) -> torch.Tensor | None:
        """The bits of the call running in this thread, else those of an active :meth:`bits_context`."""
        bits = getattr(self._local, "bits", None)
        return self._bits if bits is None else bits

    def _current_enabled(self) -> bool:
        """Whether the sites quantize now: the state of the call running in this thread, else this thread's
        :meth:`disabled`, else that of any thread (for threads that make no call of their own)."""
        for state in (getattr(self._local, "call_enabled", None), getattr(self._local, "enabled", None)):
            if state is not None:
                return state
        return self._enabled

    def _check_not_removed(self, what: str) -> None:
        if self._removed:
            raise RuntimeError(f"AdaptiveQuantizer.{what}: the activation-quantization hooks were taken off by "
                               "remove(), so the sites would not quantize; use the model remove() returned "
                               "(float activations) or wrap it in a new AdaptiveQuantizer")

    # ------------------------------------------------------------------ gradient-checkpointing recompute
    def _pin(self, out, bits: torch.Tensor, enabled: bool) -> None:
        """Make the backward through ``out`` (a call's output) know the call's bits before it recomputes."""
        record = (bits, enabled)
        seen: set[int] = set()
        for node in _grad_nodes(out):
            if id(node) not in seen:
                seen.add(id(node))
                node.register_prehook(functools.partial(self._enter_backward, record))

    def _enter_backward(self, record: tuple, grad_outputs) -> None:
        """Prehook of a call's output node: note the call's bits for the graph task that runs it (forgotten when
        that backward ends)."""
        task = _graph_task_id()
        if task < 0:
            return
        with self._lock:
            records = self._pinned.get(task)
            if records is None:
                while len(self._pinned) >= 64:  # those of backward passes that raised (their callback never ran)
                    self._pinned.pop(next(iter(self._pinned)))
                records = self._pinned[task] = []
                torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._forget, task))
            if not any(r is record for r in records):
                records.append(record)

    def _forget(self, task: int) -> None:
        """End of a backward: drop the bits its calls pinned."""
        with self._lock:
            self._pinned.pop(task, None)

    def _recompute_bits(self, name: str, x) -> tuple[torch.Tensor | None, bool]:
        """``(bits, enabled)`` for a site running inside backward (a gradient-checkpointing recompute): those of
        the call whose backward is running, else those of a ``bits_context`` around the backward."""
        with self._lock:
            records = list(self._pinned.get(_graph_task_id(), ()))
        if not records:
            return self._current_bits(), self._enabled
        distinct: list[tuple] = []
        for r in records:
            if not any(r[1] == d[1] and r[0].shape == d[0].shape and r[0].device == d[0].device
                       and torch.equal(r[0], d[0]) for d in distinct):
                distinct.append(r)
        if len(distinct) > 1 and isinstance(x, torch.Tensor) and x.dim() > 0:
            fits = [r for r in distinct if r[0].numel() == x.shape[0] and r[0].device == x.device]
            distinct = fits or distinct
        if len(distinct) > 1:
            raise RuntimeError(
                f"site {name!r} is being recomputed by gradient checkpointing during a backward that goes through "
                f"{len(distinct)} AdaptiveQuantizer calls with different bits on the same device and batch size, "
                "so which call's bits apply cannot be told: call backward once per call (loss1.backward(); "
                "loss2.backward()), give the calls the same bits, or turn gradient checkpointing off")
        return distinct[0]

    # ------------------------------------------------------------------ hooks
    def _quant(self, name: str, x):
        task = _graph_task_id()
        if task >= 0 and getattr(self._local, "call_task", -1) != task:  # in backward, not in a call made there:
            # a gradient-checkpointing recompute
            bits, enabled = self._recompute_bits(name, x)
            if not enabled:
                return x
            if bits is None:
                raise RuntimeError(f"site {name!r} was recomputed by gradient checkpointing during a backward that "
                                   "does not go through the output of an AdaptiveQuantizer call, and no "
                                   "aq.bits_context(bits) is active: take the loss from the call's output, or run "
                                   "the backward inside the bits_context the forward ran in")
        else:
            if not self._current_enabled():
                return x
            bits = self._current_bits()
            if bits is None:
                raise RuntimeError(f"site {name!r} ran without per-sample bits: call the AdaptiveQuantizer "
                                   "(aq(x, levels=...)), use aq.bits_context(bits), or aq.disabled()")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"the activation at site {name!r} is a {type(x).__name__}, not a tensor")
        if x.dim() == 0 or x.shape[0] != bits.numel():
            raise ValueError(f"{bits.numel()} per-sample bit-widths (levels) but the activation at site "
                             f"{name!r} has shape {tuple(x.shape)} (dim 0 must be the batch)")
        if task < 0 or getattr(self._local, "call_task", -1) == task:  # not a recompute: a site of this call ran
            self._local.call_reached = True
        return fake_quantize_per_sample(x, bits)

    def _pre_hook(self, name: str, module: nn.Module, args: tuple):
        if not args:
            raise ValueError(f"site {name!r} got no positional input to quantize; use (name, 'output')")
        return (self._quant(name, args[0]),) + tuple(args[1:])

    def _post_hook(self, name: str, module: nn.Module, args: tuple, output):
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self._quant(name, output[0]),) + tuple(output[1:])
        return self._quant(name, output)

    def remove(self) -> nn.Module:
        """Remove the hooks and return the (weight-quantized) model.

        The wrapper is finished afterwards: calling it or :meth:`bits_context` raises ``RuntimeError`` (the sites
        would no longer quantize). Calling ``remove()`` again does nothing.

        Returns:
            The wrapped model, without the activation-quantization hooks.
        """
        for h in self._handles:
            h.remove()
        self._handles = []
        self._removed = True
        return self.model

    # ------------------------------------------------------------------ levels -> bits
    def levels_to_bits(self, levels) -> torch.Tensor:
        """Map levels to bit-widths through ``bit_map``.

        Args:
            levels: one integer level per sample ``(B,)``.

        Returns:
            An int64 tensor ``(B,)`` of bit-widths.

        Raises:
            TypeError: levels that are not integers (bool, or floats that are fractional, NaN or infinite; whole
                floats such as ``2.0`` are accepted).
            ValueError: levels that are not 1-D, or a level the bit map does not have.
        """
        lv = torch.as_tensor(levels)
        if lv.dtype.is_floating_point or lv.dtype == torch.bool:
            if lv.dtype == torch.bool:
                raise TypeError(f"levels must be integers, got {lv.dtype}")
            bad = lv[~torch.isfinite(lv) | (lv != lv.round())]
            if bad.numel():  # NaN, inf and fractions are no level (the int64 cast would make up one)
                raise TypeError(f"levels must be integers, got {lv.dtype} values {bad.unique().tolist()[:8]}")
            huge = lv[lv.abs() >= 2.0**63]  # whole but beyond int64: the cast would wrap them to another level
            if huge.numel():
                raise ValueError(f"unknown level(s) {huge.unique().tolist()[:8]}: bit_map has levels "
                                 f"{sorted(self.bit_map)}")
            lv = lv.long()
        if lv.dim() != 1:
            raise ValueError(f"levels must be 1-D (one per sample), got shape {tuple(lv.shape)}")
        lv = lv.to(torch.int64).cpu()
        known = torch.tensor(sorted(self.bit_map), dtype=torch.int64)
        unknown = sorted(set(lv.tolist()) - set(known.tolist()))
        if unknown:
            raise ValueError(f"unknown level(s) {unknown}: bit_map has levels {known.tolist()}")
        # every level is known: its position among the sorted levels (no table indexed by level: levels may be
        # sparse and large, e.g. {0: 4, 10**12: 8})
        widths = torch.tensor([self.bit_map[k] for k in known.tolist()], dtype=torch.int64)
        return widths[torch.searchsorted(known, lv)]

    @contextlib.contextmanager
    def bits_context(self, bits) -> Iterator[None]:
        """Set the per-sample bits for model calls made by other code (e.g. a generation loop).

        Args:
            bits: one bit-width per sample (1..8 or >= 16).

        Yields:
            Nothing; inside the block every site quantizes with ``bits``: in this thread, and in threads that make
            no call of their own (a generation loop running in a worker thread).

        Raises:
            RuntimeError: the hooks were removed (:meth:`remove`).
        """
        self._check_not_removed("bits_context()")
        b = _bits_tensor(bits)
        b = check_bits(b, int(b.numel()))
        prev, prev_local = self._bits, getattr(self._local, "bits", None)
        self._bits = self._local.bits = b
        try:
            yield
        finally:
            self._bits, self._local.bits = prev, prev_local

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model with the activation quantization off (weights stay quantized).

        Yields:
            Nothing; inside the block the sites pass activations through: in this thread's calls and model
            calls, and in threads that make no call of their own (like :meth:`bits_context`). A call made
            meanwhile by another thread quantizes as usual (its on / off state is its own thread's).
        """
        prev, prev_local = self._enabled, getattr(self._local, "enabled", None)
        self._enabled = self._local.enabled = False
        try:
            yield
        finally:
            self._enabled, self._local.enabled = prev, prev_local

    # ------------------------------------------------------------------ forward
    def resolve_bits(self, args=(), levels=None, bits=None, images=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample bits and levels for one call; see the class docstring for the precedence.

        Args:
            args: the positional model inputs (the first one is scored when nothing else is given).
            levels: one level per sample.
            bits: one bit-width per sample.
            images: raw images for the scorer.

        Returns:
            ``(bits, levels)``: int64 ``(B,)`` bit-widths, and the levels (None when ``bits`` were given).

        Raises:
            ValueError: more than one of ``levels`` / ``bits`` / ``images``, bits that are not 1-D, or no levels
                and no scorer or images to score.
        """
        given = sum(v is not None for v in (levels, bits, images))
        if given > 1:
            raise ValueError("pass only one of levels=, bits= and images=")
        if bits is not None:
            b = _bits_tensor(bits)
            if b.dim() != 1:
                raise ValueError(f"bits must be 1-D (one per sample), got shape {tuple(b.shape)}")
            return check_bits(b, int(b.numel())), None
        if levels is None:
            if self.scorer is None:
                raise ValueError("no levels: pass levels= or bits=, or give the AdaptiveQuantizer a fitted scorer")
            src = images if images is not None else (args[0] if args else None)
            if src is None:
                raise ValueError("no images to score: pass images= (raw images for the complexity scorer)")
            levels = self.scorer.levels(src)
        return self.levels_to_bits(levels), torch.as_tensor(levels).to(torch.int64).cpu()

    def forward(self, *args, levels=None, bits=None, images=None, **kwargs):
        """Run the wrapped model with each sample's activations quantized at its own bit-width.

        Args:
            *args: the model's positional inputs (the first one is scored when neither ``levels``, ``bits`` nor
                ``images`` is given).
            levels: complexity level per sample (mapped through ``bit_map``).
            bits: bit-width per sample (1..8 quantized, >= 16 float).
            images: raw images for the scorer, when the model's input is not what should be scored.
            **kwargs: the model's keyword inputs.

        Returns:
            The wrapped model's output.

        Raises:
            ValueError: no way to get bits (no levels, bits, images or scorer), or bits / levels that do not fit.
            RuntimeError: the hooks were removed (:meth:`remove`).
        """
        self._check_not_removed("forward()")
        b, lv = self.resolve_bits(args, levels, bits, images)
        dev = next((t.device for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
        prev, prev_task = getattr(self._local, "bits", None), getattr(self._local, "call_task", -1)
        self._local.bits = call_bits = b.to(dev) if dev is not None else b  # this thread's call only
        self._local.call_task = _graph_task_id()  # >= 0: a call made inside backward (its sites are no recompute)
        prev_enabled = getattr(self._local, "call_enabled", None)
        own = getattr(self._local, "enabled", None)  # set by disabled() in this thread; other threads' do not count
        if own is None:  # an nn.DataParallel replica in its worker thread: the state where it was replicated
            own = self.__dict__.get("_replica_enabled")
        self._local.call_enabled = enabled = True if own is None else own
        prev_reached, self._local.call_reached = getattr(self._local, "call_reached", False), False
        try:
            out = self.model(*args, **kwargs)
            reached = self._local.call_reached  # a site quantized in this call (not in a call made inside it)
        finally:
            self._local.bits, self._local.call_task = prev, prev_task
            self._local.call_enabled, self._local.call_reached = prev_enabled, prev_reached
        if torch.is_grad_enabled():  # for a gradient-checkpointing recompute in backward
            self._pin(out, call_bits, enabled)
        if enabled and reached:  # a call under disabled(), or that returned before any site, used no bits: not
            with self._lock:     # counted in stats()
                self._record(b, lv)
        return out

    # ------------------------------------------------------------------ accounting
    def reset_stats(self) -> None:
        """Forget the per-level sample and bit counts that :meth:`stats` reports."""
        self._count_by_level: dict[int, int] = {}
        self._bits_by_level: dict[int, int] = {}
        self._hist: dict[int, int] = {}

    def _record(self, bits: torch.Tensor, levels: torch.Tensor | None) -> None:
        bl = bits.cpu().tolist()
        ll = levels.tolist() if levels is not None else [None] * len(bl)
        for b, lv in zip(bl, ll):
            self._hist[b] = self._hist.get(b, 0) + 1
            if lv is not None:
                self._count_by_level[lv] = self._count_by_level.get(lv, 0) + 1
                self._bits_by_level[lv] = self._bits_by_level.get(lv, 0) + b

    def stats(self) -> dict:
        """Effective activation bits actually used since the last ``reset_stats``.

        ``average_bits`` = sum over processed samples of their bit-width / number of samples (a float row counts
        at its nominal 16/32); ``per_level[l] = {"samples", "average_bits"}`` (calls with ``levels``); ``histogram``
        = bits -> samples. Samples are counted once per forward call, whatever the number of sites; calls that
        used no bits are not counted: those made under :meth:`disabled` (float activations), and those in which
        none of this quantizer's sites ran (a model that returned early, a call that raised).

        Returns:
            ``{"samples", "average_bits", "per_level", "histogram"}``.
        """
        n = sum(self._hist.values())
        total = sum(b * c for b, c in self._hist.items())
        return {
            "samples": n,
            "average_bits": (total / n) if n else float("nan"),
            "per_level": {lv: {"samples": c, "average_bits": self._bits_by_level[lv] / c}
                          for lv, c in sorted(self._count_by_level.items())},
            "histogram": dict(sorted(self._hist.items())),
        }

    def extra_repr(self) -> str:
        return f"bit_map={self.bit_map}, sites={self.sites}, weight_config={self.weight_config}"
