"""The names transformers gives a checkpoint's stored tensors while loading it into a model.

transformers 5 renames stored tensor names in ``from_pretrained``
(``transformers.core_model_loading.convert_and_load_state_dict_in_model``): the conversion mapping of the model
(``transformers.conversion_mapping.get_model_conversion_mapping``) applies every ``WeightRenaming`` (a VLM saved in
its older layout: ``language_model.model.layers.0...`` -> ``model.language_model.layers.0...``,
``language_model.lm_head.weight`` -> ``lm_head.weight``, ``vision_tower.vision_model.`` -> ``model.vision_tower.``),
then at most one ``WeightConverter`` (tensors fused, split or permuted: per-expert MoE weights stacked into one 3-D
tensor), then adds or strips the model's ``base_model_prefix`` where that gives one of the model's names (a
base-model folder read into a model with a head, and the reverse); a stored name that the renaming turns into no
name of the model while it is one itself is kept (with the prefix step alone).

:func:`checkpoint_renaming` is that renaming for one model, for code that reads a checkpoint's tensors itself:
:class:`medquant.calibrate.CheckpointSource` (``rename=``, the ``--stream`` command line), and the Hugging Face
integration, which maps the module names a saved medquant checkpoint records to the model's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from torch import nn

__all__ = ["CheckpointRenaming", "checkpoint_renaming"]


@dataclass(frozen=True)
class CheckpointRenaming:
    """Stored tensor name -> the model's name for it, as ``from_pretrained`` renames it (see the module docstring).

    Built by :func:`checkpoint_renaming`. Calling it gives the model name; :meth:`rename` also says whether a
    ``WeightConverter`` (not a plain renaming) produced it; :meth:`used` gives the rules that renamed a name, which
    ``from_pretrained`` keeps on the model for ``save_pretrained`` to write the checkpoint's layout back.

    Attributes:
        _transforms: transformers' weight transforms of the model (``get_model_conversion_mapping``), in order.
        _renamings: its ``WeightRenaming`` rules, in order.
        _converters: its ``WeightConverter`` rules, in order (at most one applies to a name).
        _prefix: the model's ``base_model_prefix`` (``None`` when it has none).
        _state: the model's state-dict names (values ``True``), which decide the prefix step.
    """

    _transforms: tuple[Any, ...]
    _renamings: tuple[Any, ...]
    _converters: tuple[Any, ...]
    _prefix: str | None
    _state: dict[str, bool]

    def __call__(self, stored: str) -> str:
        """The model's name for the stored tensor name ``stored``.

        Args:
            stored: a tensor name as the checkpoint stores it.

        Returns:
            The name ``from_pretrained`` loads it under (``stored`` itself where nothing renames it).
        """
        return self.rename(stored)[0]

    def rename(self, stored: str) -> tuple[str, str | None]:
        """The model's name for ``stored`` and the converter pattern that produced it, as ``from_pretrained``.

        Args:
            stored: a tensor name as the checkpoint stores it.

        Returns:
            ``(model_name, pattern)``: ``pattern`` is the source pattern of the ``WeightConverter`` that matched
            (the tensor is fused, split or permuted into ``model_name`` while loading, so it is not the model's
            tensor by itself), ``None`` for a plain renaming (or none).
        """
        from transformers.core_model_loading import rename_source_key

        renamed, pattern = rename_source_key(stored, list(self._renamings), list(self._converters), self._prefix,
                                             self._state)
        if renamed not in self._state and stored in self._state:  # from_pretrained's second try: the prefix alone
            renamed, pattern = rename_source_key(stored, [], [], self._prefix, self._state)
        return renamed, pattern

    def used(self) -> list[Any]:
        """The transforms that have matched a name :meth:`rename` was given, in order.

        ``from_pretrained`` renames every stored name of the checkpoint and keeps these as the model's
        ``_weight_conversions``, from which ``save_pretrained`` writes the tensors under the checkpoint's names
        again (``transformers.core_model_loading.revert_weight_conversion``). After every stored name of a
        checkpoint has gone through :meth:`rename` (a :class:`medquant.calibrate.CheckpointSource` built with this
        renaming does), this is that list.

        Returns:
            The used transforms (transformers ``WeightTransform`` objects).
        """
        return [t for t in self._transforms if t.was_used()]


def checkpoint_renaming(model: nn.Module, hf_quantizer: Any = None) -> CheckpointRenaming | None:
    """The renaming ``from_pretrained`` applies to the stored tensor names of a checkpoint loaded into ``model``.

    Args:
        model: the model the checkpoint is read into (its class and sub-models decide the conversion mapping; its
            state-dict names decide the ``base_model_prefix`` step). A model built on the meta device will do.
        hf_quantizer: the transformers quantizer of the load, if any (it may add conversions), as
            ``get_model_conversion_mapping`` takes it.

    Returns:
        The :class:`CheckpointRenaming`, or ``None`` where this transformers has no renaming machinery (before
        version 5: stored names are the model's).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # pragma: no cover - older transformers: keys are not renamed
        return None
    transforms = get_model_conversion_mapping(cast(Any, model), None, hf_quantizer)  # a PreTrainedModel
    return CheckpointRenaming(tuple(transforms), tuple(t for t in transforms if isinstance(t, WeightRenaming)),
                              tuple(t for t in transforms if isinstance(t, WeightConverter)),
                              getattr(model, "base_model_prefix", None) or None,
                              dict.fromkeys(model.state_dict(), True))
