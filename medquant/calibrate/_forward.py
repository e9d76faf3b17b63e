"""Calibration batches through a model, with errors that name the batch (GPTQ, AWQ, AdaRound, block-by-block
capture), and the padding positions they hold.

A batch that does not fit the model fails deep inside the model's own forward with a message that names neither the
batch nor what was being calibrated; :func:`run_calibration_batch` re-raises it as a ``ValueError`` that names
both, the model's exception chained.

Padding (GPTQ's Hessians, AWQ's statistics and scale search, AdaRound's errors): in a dict batch with a 2-D
``attention_mask``, the positions with mask 0 are not calibration data. :func:`token_mask` gives the batch's mask,
:func:`row_mask` applies it to a layer input only where that input is ``(batch, tokens, K)`` with the mask's
``(batch, tokens)`` (or those tokens flattened sample by sample, ``(batch * tokens, K)``, or an MoE expert's routed
rows), and :func:`unmasked_layers` names the layers it is never applied to (the vision tower's and the projector's,
whose inputs are image patches even when their count equals the number of tokens). In an encoder-decoder the
``attention_mask`` is the encoder's and ``decoder_attention_mask`` the decoder's (:func:`batch_masks`):
:class:`MaskSides` says which of the two each layer input takes - by the layer's side (under the encoder module or
not; in a whole-model forward, whether the call is made while the encoder runs) and, for a decoder layer reading the
encoder's output (cross-attention ``k`` / ``v``), by the identity of its input with that output - so a decoder
sequence as long as the encoder's is masked by its own padding only.
"""
from __future__ import annotations

import contextlib
import inspect
import numbers
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.introspect import encoder_module_name, language_model_layers, model_roles
from ..models.runner import run_model


def describe_batch(batch: Any, *, shape: bool = False) -> str:
    """What a calibration batch is: ``"a dict with the keys [...]"``, ``"a tuple of 2 inputs"``, ``"a tensor"``
    (with ``shape``: ``"a tensor of shape (4, 16)"``), else its type name."""
    if isinstance(batch, Mapping):
        return f"a dict with the keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} inputs"
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}" if shape else "a tensor"
    return f"a {type(batch).__name__}"


def calibration_batches(calib: Any, method: str) -> list[Any]:
    """The calibration batches of ``calib`` as a list: one dict of keyword inputs is one batch (iterating it would
    give its keys), any other iterable gives its items.

    Args:
        calib: the ``calib`` argument of a calibration entry point.
        method: its name in the errors (``"GPTQ"``, ``"learned rounding"``).

    Returns:
        The batches (possibly empty: the caller refuses that with its own message).

    Raises:
        ValueError: ``calib`` is ``None``.
        TypeError: ``calib`` is a string or not iterable.
    """
    if calib is None:
        raise ValueError(f"{method} needs calibration data: calib is None; pass a list of batches (dicts of keyword "
                         "inputs, tuples of positional inputs or tensors)")
    if isinstance(calib, Mapping):
        return [calib]
    if isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable):
        raise TypeError(f"{method}: calib must be a list (or another iterable) of calibration batches, got "
                        f"{type(calib).__name__}")
    return list(calib)


def check_seed(seed: Any) -> int:
    """``seed`` as a Python ``int`` (any integer type: ``int``, a NumPy integer...; ``bool`` refused).

    Raises:
        ValueError: ``seed`` is not an integer (``"seed must be an integer, got ..."``).
    """
    if not isinstance(seed, bool):
        try:
            return operator.index(seed)
        except TypeError:
            pass
    raise ValueError(f"seed must be an integer, got {seed!r}")


def _integer(v: Any) -> int | None:
    """``v`` as a Python ``int`` when it is an integer of any type (NumPy's too; ``bool`` excluded), else ``None``
    (the integer settings of GPTQ, AWQ and learned rounding are checked with it)."""
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else None


def run_calibration_batch(model: nn.Module, batch: Any, i: int, what: str, *,
                          passthrough: tuple[type[BaseException], ...] = (),
                          call: Callable[[nn.Module, Any], Any] | None = None) -> None:
    """``call(model, batch)`` (default :func:`medquant.models.run_model`) for calibration batch ``i``.

    Exceptions of the types in ``passthrough`` (the caller's early-stop signals) and ``ValueError``s of the
    calibration's own checks (their messages start with ``"layer "`` or ``"block "``) pass unchanged; any other
    ``ValueError``, ``RuntimeError``, ``TypeError`` or ``IndexError`` of the forward becomes ``ValueError:
    calibration batch i (<what the batch is>) failed in the model's forward while calibrating <what>: ...`` with
    the original chained.
    """
    try:
        (call or run_model)(model, batch)
    except passthrough:
        raise
    except ValueError as e:
        if str(e).startswith(("layer ", "block ")):
            raise
        raise ValueError(f"calibration batch {i} ({describe_batch(batch, shape=True)}) failed in the model's "
                         f"forward while calibrating {what}: {e}") from e
    except (RuntimeError, TypeError, IndexError) as e:
        raise ValueError(f"calibration batch {i} ({describe_batch(batch, shape=True)}) failed in the model's "
                         f"forward while calibrating {what}: {type(e).__name__}: {e}") from e


def short_names(names: Sequence[str]) -> str:
    """The first three of ``names``, comma-separated, ``", ..."`` after them when there are more (for messages)."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def count_calls(model: nn.Module, names: Sequence[str], batches: Sequence[Any], *,
                on_call: Callable[[str, tuple, dict, int, int], None] | None = None
                ) -> tuple[list[str], dict[str, list[int]]]:
    """Run every calibration batch once, whole (:func:`run_calibration_batch`), counting the calls of the modules
    ``names``: with data-dependent control flow a later batch may call a module more often than batch 0, so a
    capture may stop a batch's forward at a module's first call only when every batch calls it exactly once.

    Args:
        model: the model.
        names: the modules to count (submodule names).
        batches: the calibration batches (a batch that fails in the forward is named with :func:`short_names` of
            ``names``).
        on_call: run at each call before it is counted, as ``on_call(name, args, kwargs, batch index, calls of
            name counted so far over all batches)`` (e.g. to check the input).

    Returns:
        ``(order, counts)``: the names called, in the order of their first call (batch 0's order, then those first
        called by a later batch), and ``counts[name]``, the calls of ``name`` by each batch (0: not called).
    """
    order: list[str] = []
    counts = {n: [0] * len(batches) for n in names}
    current = [0]

    def make(n: str):
        def hook(mod, args, kwargs):
            if on_call is not None:
                on_call(n, args, kwargs, current[0], sum(counts[n]))
            if not any(counts[n]):
                order.append(n)
            counts[n][current[0]] += 1
        return hook

    handles = []
    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_pre_hook(make(n), with_kwargs=True))
        for i, batch in enumerate(batches):
            current[0] = i
            run_calibration_batch(model, batch, i, short_names(names))
    finally:
        for h in handles:
            h.remove()
    return order, counts


def token_mask(batch: Any) -> torch.Tensor | None:
    """The ``(batch, tokens)`` attention mask of a dict calibration batch when it marks padding (some entry 0), as
    bool (``True``: a real token); ``None`` when the batch has none or nothing is padded.

    In an encoder-decoder batch this is the encoder's mask; :class:`MaskSides` decides which layer inputs take it
    and which take the decoder's (:func:`batch_masks`)."""
    return _padding(batch.get("attention_mask") if isinstance(batch, Mapping) else None)


def _padding(mask: Any) -> torch.Tensor | None:
    """``mask != 0`` of a 2-D tensor with some entry 0; ``None`` otherwise (no tensor, not 2-D, nothing padded)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    mask = mask != 0
    return None if bool(mask.all()) else mask


@dataclass(frozen=True)
class BatchMasks:
    """The token masks of one calibration batch (bool ``(batch, tokens)``, ``True``: a real token; ``None``: no
    padding).

    Attributes:
        encoder: the batch's ``attention_mask`` (:func:`token_mask`): a decoder-only model's only mask, the encoder's
            in an encoder-decoder.
        decoder: the batch's ``decoder_attention_mask`` (an encoder-decoder's decoder positions); ``None`` when the
            batch has none (a batch giving the decoder ``labels`` only, which the model shifts into its decoder
            inputs, has none either: its decoder rows are all calibration data).
    """

    encoder: torch.Tensor | None = None
    decoder: torch.Tensor | None = None

    @property
    def padded(self) -> bool:
        """Whether either mask marks a padding position."""
        return self.encoder is not None or self.decoder is not None


def batch_masks(batch: Any) -> BatchMasks:
    """The :class:`BatchMasks` of a calibration batch: its ``attention_mask`` and ``decoder_attention_mask`` (each
    as :func:`token_mask` reads it); both ``None`` for a batch that is not a dict.

    Args:
        batch: a calibration batch.

    Returns:
        The batch's masks.
    """
    if not isinstance(batch, Mapping):
        return BatchMasks()
    return BatchMasks(token_mask(batch), _padding(batch.get("decoder_attention_mask")))


_ENCODER_STATES = "encoder_hidden_states"


def _signature(module: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None


def call_encoder_states(module: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The encoder states a call of ``module`` (a decoder block) receives: its ``encoder_hidden_states`` argument
    (the Hugging Face name of every cross-attention decoder layer's input from the encoder), given by keyword or
    by position (bound through the signature of ``module.forward``).

    Args:
        module: the called module.
        args: the call's positional arguments.
        kwargs: the call's keyword arguments.

    Returns:
        ``[tensor]`` when the call passes a tensor as ``encoder_hidden_states``, else ``[]``.
    """
    value = kwargs.get(_ENCODER_STATES)
    if value is None and args:
        sig = _signature(module)
        if sig is not None and _ENCODER_STATES in sig.parameters:
            try:
                value = sig.bind_partial(*args, **kwargs).arguments.get(_ENCODER_STATES)
            except TypeError:
                value = None
    return [value] if isinstance(value, torch.Tensor) else []


def _under(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


class MaskSides:
    """Which token mask each layer input takes: the encoder's or the decoder's, in an encoder-decoder.

    A model is an encoder-decoder here when :func:`medquant.models.language_model_layers` gives it an encoder stack
    and a decoder stack (BART, Florence-2's BART, T5, T5Gemma...); the encoder side is the module holding
    the encoder stack (the name up to its outermost ``encoder`` component: ``model.language_model.encoder``,
    ``encoder``). A model whose ``config.is_encoder_decoder`` is true and whose encoder is not a language stack
    (Whisper: its encoder reads audio) is one too: the encoder side is the submodule its ``get_encoder()`` returns,
    the decoder blocks its language blocks. The rule, per layer input ``x`` of a calibration batch with :class:`BatchMasks` ``masks``:

    * not an encoder-decoder: ``masks.encoder`` (the batch's ``attention_mask``) for every layer;
    * a layer under the encoder side: ``masks.encoder``; in a whole-model forward (:meth:`tracking`) the side is
      that of the call instead once the encoder module has started - ``masks.encoder`` for a call made while it
      runs, the decoder's after it returns, whatever the layer's name - so one module bound in both stacks (one
      module object under an encoder and a decoder name) gets each call's own side;
    * an ``x`` that *is* (the same tensor object as) one of the encoder-side tensors of the call - the encoder
      module's output in a whole-model forward, or the ``encoder_hidden_states`` argument of the decoder block
      being run (:func:`call_encoder_states`): ``masks.encoder`` (a decoder's cross-attention ``k`` / ``v``
      projections; a layer outside both stacks that reads the encoder's output, such as bert2bert's
      ``enc_to_dec_proj``, whose output in turn is the decoder blocks' ``encoder_hidden_states``);
    * any other layer (the decoder's, ``lm_head``): ``masks.decoder`` (its ``decoder_attention_mask``, ``None``
      without one: every decoder row is calibration data).

    Either mask is still applied only where it fits the input's shape (:func:`row_mask`), and never to the layers of
    :func:`unmasked_layers`. Not recognised: encoder states that a decoder block changes before its ``k`` / ``v`` read
    them (a norm or a dtype cast inside the block), or, block by block, that reach a decoder block under another
    argument name than ``encoder_hidden_states``; the decoder's mask applies to those where the shapes match.

    Args:
        model: the model (the names given to :meth:`mask` are relative to it).
    """

    def __init__(self, model: nn.Module) -> None:
        self.encoder: str | None = None
        self.decoder_blocks: list[str] = []
        try:
            enc, dec = language_model_layers(model, "encoder"), language_model_layers(model, "decoder")
        except ValueError:  # not two language stacks (or an architecture without roles)
            enc, dec = [], []
        if not enc or not dec:
            self._encoder_of_config(model)
            return
        parts = enc[0].split(".")
        self.encoder = ".".join(parts[:parts.index("encoder") + 1]) if "encoder" in parts else enc[0].rpartition(".")[0]
        self.decoder_blocks = list(dec)

    def _encoder_of_config(self, model: nn.Module) -> None:
        """The sides of an encoder-decoder whose encoder is not a language stack (Whisper's reads audio): a model
        whose ``config.is_encoder_decoder`` is true, with a ``get_encoder()`` submodule; the decoder blocks are the
        language blocks outside it. Nothing is set for any other model."""
        name = encoder_module_name(model)
        if name is None:
            return
        try:
            blocks = language_model_layers(model)
        except (AttributeError, TypeError, ValueError, NotImplementedError):
            return
        dec = [b for b in blocks if not _under(b, name)]
        if dec:
            self.encoder, self.decoder_blocks = name, dec

    @property
    def seq2seq(self) -> bool:
        """Whether the model is an encoder-decoder (its inputs have two sides)."""
        return self.encoder is not None

    def encoder_side(self, name: str) -> bool:
        """Whether the module ``name`` is under the encoder side (``False`` for any module of a model that is not an
        encoder-decoder)."""
        return self.encoder is not None and _under(name, self.encoder)

    def mask(self, name: str, x: Any, masks: BatchMasks, states: Sequence[torch.Tensor] = ()) -> torch.Tensor | None:
        """The token mask of layer ``name``'s input ``x`` (the rule of the class docstring).

        Args:
            name: the layer's (or block's) name in the model.
            x: its input (compared by identity with ``states``).
            masks: the batch's masks.
            states: the encoder-side tensors of the current call (:meth:`tracking`, :func:`call_encoder_states`).

        Returns:
            ``masks.encoder`` or ``masks.decoder``.
        """
        return masks.encoder if self.reads_encoder(name, x, states) else masks.decoder

    def reads_encoder(self, name: str, x: Any, states: Sequence[torch.Tensor] = ()) -> bool:
        """Whether layer ``name``'s input ``x`` is on the encoder's side (the rule of the class docstring): its rows
        are the encoder's positions (the ``attention_mask``, the encoder's token count), else the decoder's.

        Args:
            name: the layer's (or block's) name in the model.
            x: its input (compared by identity with ``states``).
            states: the encoder-side tensors of the current call (:meth:`tracking`, :func:`call_encoder_states`).

        Returns:
            ``True`` for every layer of a model that is not an encoder-decoder, for an input that is one of
            ``states``, and for a layer under the encoder side - or, with ``states`` from :meth:`tracking` once the
            encoder module has started in the forward, for a call made while it runs (the layer's name is then not
            read); ``False`` otherwise.
        """
        if self.encoder is None or any(x is s for s in states):
            return True
        running = getattr(states, "in_encoder", None)
        return _under(name, self.encoder) if running is None else bool(running)

    def block_masks(self, block: str, masks: Sequence[BatchMasks]
                    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None] | None]:
        """The masks of a block's recorded calls (one per calibration batch), block by block.

        Args:
            block: the block's name in the model.
            masks: the :class:`BatchMasks` of each calibration batch.

        Returns:
            ``(rows, encoder)``: ``rows[i]``, the mask of the block's own rows in call ``i`` - the
            ``attention_mask`` for a block of the encoder side or of a model that is not an encoder-decoder, the
            ``decoder_attention_mask`` for any other block of an encoder-decoder; ``encoder``: ``None``, or for such
            a decoder block each call's ``attention_mask``, the mask of the call's ``encoder_hidden_states``
            argument (:func:`call_encoder_states`) wherever a layer reads that tensor.
        """
        if self.encoder is None or _under(block, self.encoder):
            return [m.encoder for m in masks], None
        return [m.decoder for m in masks], [m.encoder for m in masks]

    @contextlib.contextmanager
    def tracking(self, model: nn.Module) -> Iterator[list[torch.Tensor]]:
        """Collect the encoder-side tensors of a whole-model forward: the encoder module's output (its first
        tensor) and the ``encoder_hidden_states`` argument of each decoder block call.

        Args:
            model: the model being run (a copy of the model :class:`MaskSides` was built on works: names are used).

        Yields:
            The list the tensors are appended to (emptied when the encoder starts a forward, i.e. at each
            calibration batch; a caller may clear it too). Empty (and no hook) for a model that is not an
            encoder-decoder. Its ``in_encoder`` attribute, which :meth:`reads_encoder` reads instead of the layer's
            name: ``True`` while the encoder module runs, ``False`` once it has returned, ``None`` (the names
            decide) at each forward of ``model`` until the encoder starts - and for a model whose encoder module
            is not called itself (a container of layers its parent runs).
        """
        states = _Tracked()
        handles = []
        if self.encoder is not None:
            def new_forward(mod, args):  # the encoder runs once per calibration batch: a new batch's tensors
                states.clear()
                states.in_encoder = True

            def keep_output(mod, args, out):
                t = _first_tensor(out)
                if t is not None:
                    states.append(t)

            def leave(mod, args, out):  # always called: also when a capture stops the forward inside the encoder
                states.in_encoder = False

            def new_batch(mod, args):  # before the encoder runs (or where it never runs), the names decide
                states.in_encoder = None

            def keep_argument(mod, args, kwargs):
                states.extend(t for t in call_encoder_states(mod, args, kwargs) if not any(t is s for s in states))

            try:
                encoder = model.get_submodule(self.encoder)
            except AttributeError:  # not there: no tensor is tracked through it, the layers' names decide the sides
                pass
            else:
                handles.append(model.register_forward_pre_hook(new_batch))
                handles.append(encoder.register_forward_pre_hook(new_forward))
                handles.append(encoder.register_forward_hook(keep_output))
                handles.append(encoder.register_forward_hook(leave, always_call=True))
            for n in self.decoder_blocks:
                try:
                    block = model.get_submodule(n)
                except AttributeError:  # a block not there: no argument is tracked through it
                    continue
                handles.append(block.register_forward_pre_hook(keep_argument, with_kwargs=True))
        try:
            yield states
        finally:
            for h in handles:
                h.remove()
            states.clear()

    def warn_unsided(self, batches: Iterable[Any]) -> bool:
        """Warn (``UserWarning``, once) when the model is not known as an encoder-decoder but a batch gives decoder
        inputs (``decoder_input_ids`` / ``decoder_inputs_embeds``) of its padded ``attention_mask``'s shape: that
        mask, applied to every layer input of its shape, then also drops decoder rows (and any
        ``decoder_attention_mask`` is not read).

        Args:
            batches: the calibration batches.

        Returns:
            Whether it warned.
        """
        if self.encoder is not None:
            return False
        for b in batches:
            mask = token_mask(b)
            if mask is None:
                continue
            dec = b.get("decoder_input_ids")
            dec = b.get("decoder_inputs_embeds") if dec is None else dec
            if isinstance(dec, torch.Tensor) and dec.dim() >= 2 and tuple(dec.shape[:2]) == tuple(mask.shape):
                warnings.warn(f"a calibration batch with decoder inputs as long as its padded attention_mask "
                              f"({mask.shape[1]} tokens), for a model whose encoder and decoder stacks medquant "
                              "does not tell apart: the attention_mask is applied to every layer input of that "
                              "shape, the decoder's included (decoder_attention_mask is not read). Pad the encoder "
                              "and decoder sequences to different lengths, or leave the encoder unpadded",
                              UserWarning, stacklevel=3)
                return True
        return False


class _Tracked(list):
    """The encoder-side tensors of :meth:`MaskSides.tracking` (a list), with ``in_encoder``: whether the encoder
    module is running now (``None``: not known, the layers' names decide)."""

    in_encoder: bool | None = None


def _first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor of a module output (a tensor, a tuple / list, a Hugging Face ``ModelOutput``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return next((t for t in out if isinstance(t, torch.Tensor)), None)
    return None


def row_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask of the rows of the layer input ``x`` when ``mask`` marks them: ``x`` is ``(batch, tokens,
    features)`` with the mask's ``(batch, tokens)``; ``(batch * tokens, features)`` with a ``(batch, tokens)`` mask
    (the tokens flattened sample by sample, as an MoE block flattens its hidden states: the mask flattened the same
    way); ``(rows, features)`` with a ``(rows,)`` mask (an MoE expert layer's routed tokens). Else ``None`` (every
    row is calibration data)."""
    if mask is None or x.dim() not in (2, 3):
        return None
    if x.dim() == 2 and mask.dim() == 2 and x.shape[0] == mask.numel():
        return mask.reshape(-1)
    if mask.dim() != x.dim() - 1 or tuple(x.shape[:-1]) != tuple(mask.shape):
        return None
    return mask


def unmasked_layers(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The layers of ``names`` in the vision tower or the projector: their inputs are image patches, never the
    text tokens an attention mask marks."""
    try:
        roles = model_roles(model)
    except ValueError:  # an architecture without roles: no layer is known to read images
        return set()
    prefixes = [p for r in ("vision", "projector") for p in roles.get(r, [])]
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}
