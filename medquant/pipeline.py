"""prune -> fine-tune or distil -> quantize as one call (the pipeline of Khan et al., "The Effect of Compression
Techniques on Large Multimodal Language Models in the Medical Domain", 2025).

::

    from medquant.pipeline import compress, PruneStage, TrainStage, QuantStage
    from medquant import QuantConfig

    result = compress(model, calib=calib_batches, train_data=train_batches,
                      prune=PruneStage(0.3, 0.3, layer_select=True),
                      train=TrainStage("distil", steps=200),
                      quantize=QuantStage(QuantConfig(4, group_size=128), method="awq"),
                      out="compressed/")
    model = load_compressed("compressed/")

Every stage is optional (``None`` skips it). The distillation teacher is a frozen copy of the model as it was
*before* pruning; ``TrainStage("finetune")`` trains the same way on the task loss only (``alpha = 0``, no teacher),
which is the control that shows whether distillation helps. ``QuantStage(method="awq")`` folds activation-aware
scales (:mod:`medquant.calibrate.awq`) before quantizing, ``"rtn"`` quantizes plainly. The result is saved with
:func:`medquant.prune.save_pruned` (per-layer shapes + quantization recipes) and reloaded with
:func:`load_compressed`.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import numbers
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .quant.config import QuantConfig

__all__ = ["CompressResult", "PruneStage", "QuantStage", "TrainStage", "compress", "load_compressed"]


@dataclass
class PruneStage:
    """The pruning stage of :func:`compress`: :class:`medquant.prune.StructuredPruner` settings.

    ``layer_select`` uses block influence (``1 - cos(block input, block output)`` on calibration tokens,
    :func:`medquant.prune.block_influence`) to set per-layer ratios averaging ``head_ratio`` / ``ffn_ratio``;
    ``drop_blocks`` drops that many of the least influential blocks (or the blocks named). With both, the ratios are
    allocated over the blocks that remain after dropping (a dropped block takes no share), so the remaining blocks
    lose ``head_ratio`` / ``ffn_ratio`` of their heads / FFN neurons on average, as asked.

    Numbers may be given as NumPy scalars: they are kept (and saved) as the Python ``float`` / ``int`` they equal.

    Attributes:
        head_ratio: fraction of attention heads removed per block (average over blocks with ``layer_select``),
            in ``[0, 1)``.
        ffn_ratio: fraction of FFN neurons removed per block, in ``[0, 1)``.
        importance: ``"magnitude"``, ``"taylor"`` or ``"activation"`` (activation statistics on ``calib``).
        gqa: grouped-query attention: ``"query"`` removes query heads only, ``"group"`` whole key/value groups.
        scope: which blocks: ``None`` (the language model, or the vision tower of an encoder), ``"language"``,
            ``"vision"`` or ``"all"``.
        layer_select: per-layer ratios from block influence instead of one ratio for every block.
        spread: with ``L`` blocks (in scope, after ``drop_blocks``), the block of influence rank ``k``
            (0 = least influential) gets ``ratio * (1 + spread * (1 - 2k / (L - 1)))``; 0 is uniform, at most 1
            (:func:`medquant.prune.allocate_ratios`).
        drop_blocks: number of whole blocks removed (the least influential ones, an integer >= 0), or the names
            of the blocks to remove (a list of strings).

    Raises:
        TypeError / ValueError: ``drop_blocks`` is not an integer >= 0 (``bool`` refused) or a list of block names.
    """

    head_ratio: float = 0.3
    ffn_ratio: float = 0.3
    importance: str = "activation"
    gqa: str = "query"
    scope: str | None = None
    layer_select: bool = False
    spread: float = 0.5
    drop_blocks: int | list[str] = 0

    def __post_init__(self) -> None:
        # real numbers (NumPy scalars too) as Python floats: saved (JSON) as the values they equal; anything else is
        # left to the pruner, which refuses it before the model changes
        for name in ("head_ratio", "ffn_ratio", "spread"):
            v = _real(getattr(self, name))
            if v is not None:
                setattr(self, name, v)
        d = self.drop_blocks
        if isinstance(d, numbers.Integral) and not isinstance(d, bool):
            d = self.drop_blocks = int(d)  # a NumPy integer as the int it equals
        if isinstance(d, bool) or not isinstance(d, (int, list, tuple)):
            raise TypeError("PruneStage.drop_blocks must be a number of blocks (an integer >= 0) or a list of block "
                            f"names, got {type(d).__name__} {d!r}")
        if isinstance(d, int) and d < 0:
            raise ValueError(f"PruneStage.drop_blocks must be an integer >= 0 (a number of blocks), got {d}")
        if isinstance(d, (list, tuple)):
            bad = [b for b in d if not isinstance(b, str)]
            if bad:
                raise TypeError(f"PruneStage.drop_blocks as a list holds block names (strings), got {bad[0]!r}")
            self.drop_blocks = list(d)


@dataclass
class TrainStage:
    """The training stage of :func:`compress`: distillation from the unpruned model, or plain fine-tuning.

    The loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task + feature_weight * features``
    (:class:`medquant.distill.Distiller`); ``"finetune"`` uses the task loss alone.

    ``alpha``, ``temperature``, ``feature_pairs`` and ``feature_weight`` are distillation settings: ``"finetune"``
    runs with ``alpha = 0`` and no teacher features, refuses ``feature_pairs`` (there is no teacher to match), and
    :func:`compress` records what ran (``alpha`` 0, ``temperature`` / ``feature_weight`` ``None``, no
    ``feature_pairs``) in the saved ``extras["pipeline"]["train"]``.

    Numbers may be given as NumPy scalars: they are kept (and saved) as the Python ``int`` / ``float`` they equal;
    a bool or a string is refused.

    Attributes:
        mode: ``"distil"`` (teacher = a frozen copy of the model before pruning) or ``"finetune"``.
        steps: optimizer steps (AdamW), an integer >= 1; batches of ``train_data`` are cycled.
        lr: learning rate.
        alpha: weight of the distillation term, in ``[0, 1]``.
        temperature: softmax temperature ``T`` of the distillation term, finite and > 0.
        feature_pairs: ``(student layer, teacher layer)`` indices into ``hidden_states`` whose features are
            matched (MSE through a learned projection when the widths differ); ``"distil"`` only. Any iterable of
            pairs of integers (a generator too, read once); kept as a list of ``(int, int)``.
        feature_weight: weight of the feature-matching term, finite and >= 0.

    Raises:
        ValueError: an unknown ``mode``, ``steps`` not an integer >= 1, ``lr`` not finite and > 0, ``alpha``
            outside ``[0, 1]``, ``temperature`` not finite and > 0, ``feature_weight`` not finite and >= 0, or
            ``feature_pairs`` with ``"finetune"``.
        TypeError: ``feature_pairs`` is not a sequence of ``(int, int)`` pairs.
    """

    mode: str = "distil"
    steps: int = 100
    lr: float = 5e-5
    alpha: float = 0.5
    temperature: float = 2.0
    feature_pairs: Sequence[tuple[int, int]] = ()
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("distil", "finetune"):
            raise ValueError(f"TrainStage.mode must be 'distil' or 'finetune', got {self.mode!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise ValueError(f"TrainStage.steps must be an integer >= 1, got {self.steps!r}")
        self.steps = int(self.steps)
        # real numbers (NumPy scalars too) are kept as Python floats: they run and are saved (JSON) as the values
        # they equal; a bool or a string is refused here, not after pruning
        lr, alpha, temperature, weight = (_real(v) for v in (self.lr, self.alpha, self.temperature,
                                                             self.feature_weight))
        if lr is None or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"TrainStage.lr must be a finite number > 0, got {self.lr!r}")
        if alpha is None or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"TrainStage.alpha must be in [0, 1], got {self.alpha!r}")
        if temperature is None or not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"TrainStage.temperature must be a finite number > 0, got {self.temperature!r}")
        if weight is None or not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"TrainStage.feature_weight must be a finite number >= 0, got {self.feature_weight!r}")
        self.lr, self.alpha, self.temperature, self.feature_weight = lr, alpha, temperature, weight
        from .distill.distiller import check_feature_pairs

        # (int, int) pairs, refused here rather than after pruning; kept as the list of Python int pairs (a generator
        # is read once, here; NumPy integers are recorded in the saved JSON as the ints they equal)
        self.feature_pairs = check_feature_pairs(self.feature_pairs)
        if self.mode == "finetune" and len(self.feature_pairs):
            raise ValueError("TrainStage.feature_pairs match teacher features (distillation only); "
                             "TrainStage('finetune') has no teacher: use mode 'distil' or leave feature_pairs empty")

    def _as_run(self, steps_run: int | None = None) -> dict[str, Any]:
        """The settings as they ran (what :func:`compress` records): ``"finetune"`` trains with ``alpha`` 0 and no
        temperature, feature pairs or feature weight; ``steps`` is the number of steps taken when given."""
        rec: dict[str, Any] = {**asdict(self), "feature_pairs": [list(p) for p in self.feature_pairs]}
        if steps_run is not None:
            rec["steps"] = steps_run
        if self.mode == "finetune":
            rec.update(alpha=0.0, temperature=None, feature_weight=None)
        return rec


@dataclass
class QuantStage:
    """The quantization stage of :func:`compress`.

    Attributes:
        config: the weight quantization (bits, scope, group size...).
        method: ``"awq"`` (activation-aware scales folded into the previous op, then round-to-nearest; needs
            ``calib``) or ``"rtn"`` (round-to-nearest).
        skip: module patterns left in float (default the LM head); a single string is one pattern, ``None`` none;
            any iterable of strings (a generator too, read once) is kept as a tuple. :func:`compress` checks the
            patterns against the model before any stage runs, and a name or ``re:`` pattern keeps the layers it
            names *then* in float: after the prune stage drops a block, the blocks after it are renumbered
            (``model.layers.1`` becomes ``model.layers.0``) and the layers are left out under their new names; a
            pattern whose layers were all in blocks the prune stage dropped has nothing left to keep in float and is
            then left out (the saved recipe lists the patterns as given).

    Raises:
        ValueError: an unknown ``method``.
        TypeError: ``config`` is not a ``QuantConfig``, or ``skip`` is not a string, an iterable of strings or
            ``None``.
    """

    config: QuantConfig
    method: str = "awq"
    skip: Sequence[str] = ("@head",)

    def __post_init__(self) -> None:
        if self.method not in ("awq", "rtn"):
            raise ValueError(f"QuantStage.method must be 'awq' or 'rtn', got {self.method!r}")
        if not isinstance(self.config, QuantConfig):
            raise TypeError(f"QuantStage.config must be a QuantConfig, got {type(self.config).__name__}")
        if self.skip is None:
            self.skip = ()
        elif isinstance(self.skip, str):  # one pattern, not its characters
            self.skip = (self.skip,)
        else:  # read once into a tuple: a generator would be spent by compress's check before the stage runs
            if not isinstance(self.skip, Iterable):
                raise TypeError(f"QuantStage.skip must be a module pattern (a string), an iterable of patterns or "
                                f"None, got {type(self.skip).__name__} {self.skip!r}")
            pats = tuple(self.skip)
            bad = [p for p in pats if not isinstance(p, str)]
            if bad:
                raise TypeError(f"QuantStage.skip holds module patterns (strings), got {type(bad[0]).__name__} "
                                f"{bad[0]!r}")
            self.skip = pats


@dataclass
class CompressResult:
    """What :func:`compress` returns.

    Attributes:
        model: the compressed model (the input model, modified in place).
        plan: the pruning plan (``None`` without a prune stage).
        block_influence: per-block influence scores when layer selection ran.
        train_losses: the loss of every training step.
        awq_groups: the activation-aware scale groups that were folded (``method="awq"``).
        path: where the result was saved (``out``), else ``None``.
    """

    model: nn.Module
    plan: Any = None
    block_influence: list[dict] | None = None
    train_losses: list[float] = field(default_factory=list)
    awq_groups: list[Any] | None = None
    path: str | None = None


def compress(model: nn.Module, *, prune: PruneStage | None = None, train: TrainStage | None = None,
             quantize: QuantStage | None = None, calib: Iterable[Any] | None = None,
             train_data: Iterable[Any] | None = None, out: str | os.PathLike | None = None,
             progress: bool = True,
             write_files: Callable[[Path, CompressResult], Any] | None = None,
             save_dtypes: Mapping[str, torch.dtype] | None = None) -> CompressResult:
    """Run the stages in order on ``model`` (modified in place) and optionally save to ``out``.

    What can be checked before the first stage runs is checked then, so that a stage's error does not come after
    earlier stages already changed the model: ``out`` a path a folder can be saved to (not a file, not beneath
    one), ``calib`` / ``train_data`` present where a stage needs them, the
    ``QuantStage.skip`` patterns, no layer the quantization stage covers already quantized, AWQ scale groups in
    the model, and one no-grad step of the training loss on the first training batch (the model's output must have
    logits and the batch a task loss; with ``TrainStage.feature_pairs`` the model's ``hidden_states`` are counted,
    and a pair out of their range is refused: ``-n <= i < n`` for the ``n`` hidden states of the model before
    pruning; with ``"distil"`` the whole distillation loss, its KD term included, with the model standing in for the
    teacher, its copy), and that the model has parameters that require grad for the training stage to train. That
    check changes nothing: the model runs in eval mode (no BatchNorm statistics updated, each
    submodule's mode given back) and every random state is restored after it (Python's ``random``, NumPy's global
    generator, torch's CPU generator and the CUDA generators), so the stages run exactly as they would without it.

    Args:
        model: the model to compress (a transformers causal LM or VLM; modified in place).
        prune: the pruning stage, or None.
        train: the fine-tuning / distillation stage, or None.
        quantize: the quantization stage, or None.
        calib: calibration batches (a sequence or iterable of batches; needed by pruning importance, layer
            selection and AWQ). Read once into a list.
        train_data: training batches (dicts with ``labels``, or token batches) for the training stage; read once
            into a list, and cycled for ``TrainStage.steps`` steps.
        out: a folder to save the result to (:func:`medquant.prune.save_pruned`), or None.
        progress: show progress bars.
        write_files: with ``out``: called as ``write_files(folder, result)`` with the new checkpoint folder after the
            model is written into it and before its manifest is written, to add files of its own (a tokenizer, a
            report); they are then part of the checkpoint (listed in its manifest, carried by later saves).
        save_dtypes: with ``out``: ``{tensor name: dtype}`` (:func:`stored_dtypes` of the model as loaded, before
            it was cast to float32 for the stages); after the stages, every floating parameter and buffer it names
            is cast back to that dtype (:func:`restore_dtypes`: on ``model`` itself) and the model is saved so, as
            its folder stored it (a bfloat16 folder stays bfloat16 outside the quantized layers' codes and
            scales). ``None``: saved in the dtypes the stages left.

    Returns:
        A :class:`CompressResult`.

    Raises:
        ValueError: a stage that needs ``calib`` or ``train_data`` without it (or with an empty one), layers the
            quantization stage covers that are already quantized, no AWQ scale group in the model, a
            ``QuantStage.skip`` pattern that matches nothing, a training loss that cannot be computed on the model
            and data, a feature pair out of the model's ``hidden_states``, a training stage for a model with no
            parameter that requires grad; all before any stage runs.
        TypeError: ``calib`` or ``train_data`` is one batch (a dict) instead of a sequence of batches.
        NotADirectoryError: ``out`` is a file, or a path beneath a file; before any stage runs.
    """
    from .prune import StructuredPruner, allocate_ratios, block_influence, least_influential

    calib = _batches(calib, "calib")
    train_data = _batches(train_data, "train_data")
    _check_before(model, prune, train, quantize, calib, train_data)
    if out is not None:  # the save would refuse it only after the stages changed the model
        _check_out(out)
    res = CompressResult(model)
    # the layers each skip pattern names, matched on the model as given: pruning renumbers the blocks after a
    # dropped one, so the patterns are not matched again against the new names
    skipped = _skip_targets(model, quantize) if prune is not None and quantize is not None else None
    teacher = copy.deepcopy(model).eval() if train is not None and train.mode == "distil" else None
    if prune is not None:
        heads: float | dict[str, float] = prune.head_ratio
        ffn: float | dict[str, float] = prune.ffn_ratio
        drop: list[str] = list(prune.drop_blocks) if isinstance(prune.drop_blocks, list) else []
        n_drop = prune.drop_blocks if isinstance(prune.drop_blocks, int) else 0
        if prune.layer_select or n_drop:
            assert calib is not None  # _check_before
            scores = block_influence(model, calib, scope=prune.scope, progress=progress)
            res.block_influence = scores
            if n_drop:
                drop = least_influential(scores, n_drop)
            if prune.layer_select:  # over the blocks that remain: a dropped block takes no share of the ratios
                dropped = set(drop)
                kept = [s for s in scores if s["block"] not in dropped]
                heads = allocate_ratios(kept, prune.head_ratio, spread=prune.spread)
                ffn = allocate_ratios(kept, prune.ffn_ratio, spread=prune.spread)
        pruner = StructuredPruner(heads, ffn, importance=prune.importance, gqa=prune.gqa, scope=prune.scope,
                                  drop_blocks=drop, progress=progress)
        try:
            res.plan = pruner.prune(model, calib=calib)
        except ValueError as e:
            if not prune.layer_select:
                raise
            raise ValueError(allocated_ratio_note(str(e), prune.head_ratio, prune.ffn_ratio, prune.spread)) from e
    if train is not None:
        assert train_data is not None  # _check_before
        d = _trainer(model, teacher, train)
        res.train_losses = d.fit(train_data, steps=train.steps, lr=train.lr, progress=progress)
        model.eval()
    if quantize is not None:
        from .calibrate.awq import awq_quantize_
        from .quant.api import quantize_

        # checked before pruning: a pattern whose layers were all in blocks the prune stage dropped keeps nothing
        skip = list(quantize.skip) if skipped is None else _skip_left(model, quantize, skipped)
        if quantize.method == "awq":
            assert calib is not None  # _check_before
            # AWQ's own default scope (the language model, or the tower of an encoder): not the prune stage's
            res.awq_groups = awq_quantize_(model, quantize.config, calib, skip=skip, progress=progress)
        else:
            quantize_(model, quantize.config, skip=skip or None, progress=progress)
    if out is not None:
        qrec: dict[str, Any] | None = None
        if quantize is not None:
            qrec = {"config": quantize.config.to_dict(), "method": quantize.method, "skip": list(quantize.skip)}
            if res.awq_groups is not None:  # the groups whose scales AWQ searched and folded
                qrec["awq_groups"] = [{"prev": g.prev, "linears": list(g.linears), "alpha": g.alpha}
                                      for g in res.awq_groups]
        extras = {"pipeline": {
            "prune": asdict(prune) if prune else None,
            "train": train._as_run(steps_run=len(res.train_losses)) if train else None,
            "quantize": qrec,
            "final_train_loss": res.train_losses[-1] if res.train_losses else None,
        }}
        if save_dtypes is not None:
            restore_dtypes(model, save_dtypes)
        cb = write_files
        res.path = str(save_with_files(model, out, plan=res.plan, extras=extras,
                                       write_files=None if cb is None else lambda folder: cb(folder, res)))
    return res


def _check_out(out: str | os.PathLike) -> None:
    """``out`` can become the checkpoint folder: ``NotADirectoryError`` for a path that exists and is not a folder,
    or one beneath a file (:func:`medquant.io.atomic.output_folder_problem`)."""
    from .io.atomic import output_folder_problem

    problem = output_folder_problem(out, "a checkpoint")
    if problem is not None:
        raise NotADirectoryError(f"out: {problem}")


def _real(v: Any) -> float | None:
    """``v`` as a Python float when it is a real number (int, float, NumPy scalar), else None (a bool too)."""
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None


def _skip_targets(model: nn.Module, quantize: QuantStage) -> dict[str, list[nn.Module]]:
    """Name or ``re:`` pattern of ``QuantStage.skip`` -> the layers (module objects) it leaves in float on ``model``
    as given, before any stage runs; role patterns (``@head``...) are left out (they are resolved by structure)."""
    from .quant.api import as_config_map

    every = as_config_map(quantize.config).resolve(model)
    targets = {}
    for pattern in quantize.skip:
        if pattern.startswith("@"):
            continue
        left = as_config_map(quantize.config, skip=[pattern]).resolve(model)
        targets[pattern] = [model.get_submodule(name) for name in every if name not in left]
    return targets


def _skip_left(model: nn.Module, quantize: QuantStage, targets: dict[str, list[nn.Module]]) -> list[str]:
    """The skip patterns for the pruned ``model``: a role pattern as given; a name or ``re:`` pattern as the names the
    layers it named before pruning (``targets``, :func:`_skip_targets`) have now (the prune stage renumbers the blocks
    after a dropped one: ``model.layers.1`` becomes ``model.layers.0``, so the pattern itself would now name another
    layer, or none). Layers of dropped blocks are gone: a pattern that named only those has nothing left to keep in
    float and is left out rather than refused after the stages ran (every pattern matched before any stage,
    :func:`_check_before`); one that named no quantizable layer is kept as given while it still matches a module."""
    from .quant.api import as_config_map

    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    left: list[str] = []
    for pattern in quantize.skip:
        layers = targets.get(pattern)
        if layers:
            left.extend(n for n in (names.get(id(m)) for m in layers) if n is not None and n not in left)
            continue
        try:
            as_config_map(quantize.config, skip=[pattern]).resolve(model)
        except ValueError:
            continue
        left.append(pattern)
    return left


def _batches(data: Iterable[Any] | None, what: str) -> list[Any] | None:
    """``data`` read once into a list (a generator is consumed here, once); one batch (a dict) is refused."""
    if data is None:
        return None
    if isinstance(data, Mapping):
        raise TypeError(f"{what} must be a sequence (or iterable) of batches, got one batch (a "
                        f"{type(data).__name__} of {', '.join(map(str, list(data)[:3]))}): pass [batch]")
    if isinstance(data, (str, bytes, torch.Tensor)):
        raise TypeError(f"{what} must be a sequence (or iterable) of batches, got a {type(data).__name__}")
    return list(data)


def allocated_ratio_note(message: str, head_ratio: float, ffn_ratio: float, spread: float) -> str:
    """A pruner error about one block's ratio, explained when layer selection allocated that ratio."""
    return (f"{message} (layer selection allocated this ratio to the block from the mean head ratio {head_ratio} / "
            f"FFN ratio {ffn_ratio} with spread {spread}: blocks of low influence get up to (1 + spread) x the "
            "mean; give a smaller mean or spread)")


def _trainer(model: nn.Module, teacher: nn.Module | None, train: TrainStage) -> Any:
    from .distill import Distiller

    if train.mode == "distil":
        assert teacher is not None
        return Distiller(teacher, model, alpha=train.alpha, temperature=train.temperature,
                         feature_pairs=train.feature_pairs, feature_weight=train.feature_weight)
    return _FineTuner(model)


def _check_before(model: nn.Module, prune: PruneStage | None, train: TrainStage | None,
                  quantize: QuantStage | None, calib: list[Any] | None, train_data: list[Any] | None) -> None:
    """Every requirement of the stages that can be checked before the first one changes the model."""
    influence = prune is not None and (prune.layer_select or (isinstance(prune.drop_blocks, int)
                                                                and prune.drop_blocks > 0))
    if influence and not calib:
        raise ValueError("layer selection and drop_blocks (block influence) need calibration data (calib=...)")
    if quantize is not None:
        from .quant.api import as_config_map, quantized_modules

        # a skip pattern that matches nothing (or an unknown role) is refused here, not after pruning / AWQ folding
        cmap = as_config_map(quantize.config, skip=list(quantize.skip) if quantize.skip else None)
        cmap.resolve(model)
        already = quantized_modules(model)
        redo = list(cmap.resolve(model, already)) if already else []  # quantize_ would refuse them at the end
        if redo:
            raise ValueError(f"the quantization stage covers {len(redo)} layer(s) that are already quantized "
                             f"({', '.join(redo[:3])}{', ...' if len(redo) > 3 else ''}): compress quantizes a "
                             "float model; pass the float model, leave those layers out with QuantStage(skip=...), "
                             "or drop the quantization stage")
        if quantize.method == "awq":
            from .calibrate.awq import awq_groups

            if not calib:
                raise ValueError("activation-aware quantization (QuantStage(method='awq')) needs calibration data "
                                 "(calib=...)")
            if not awq_groups(model):
                raise ValueError(f"{type(model).__name__}: no foldable (norm/linear -> linears) groups found for AWQ "
                                 "(e.g. post-norm blocks); use QuantStage(method='rtn')")
    if train is not None:
        if train_data is None:
            raise ValueError("the training stage needs train_data=<sequence of batches>")
        if not train_data:
            raise ValueError("the training stage needs train_data with at least one batch; it is empty")
        if not any(p.requires_grad for p in model.parameters()):  # pruning keeps each parameter's requires_grad
            raise ValueError(f"the training stage trains the model's parameters that require grad, but "
                             f"{type(model).__name__} has no parameter that requires grad (frozen with "
                             "requires_grad_(False)?): call model.requires_grad_(True) first, or drop the training "
                             "stage")
        _dry_run_loss(model, train, train_data[0])


def _dry_run_loss(model: nn.Module, train: TrainStage, batch: Any) -> None:
    """The training loss of ``batch`` once, without changing the model or any random state: a model whose output has
    no logits, or a batch without a task loss, or a ``TrainStage.feature_pairs`` index out of the model's
    ``hidden_states``, or a distillation term that cannot be computed (a mask that does not fit the logits'
    positions), is refused before any stage runs. ``"distil"`` computes the whole loss of :class:`Distiller
    <medquant.distill.Distiller>` with ``model`` standing in for the teacher (the teacher is a copy of it);
    ``"finetune"`` the task loss.

    The model runs (once for ``"finetune"``; twice for ``"distil"``, as teacher and student, and once more with
    ``feature_pairs``) in eval mode (BatchNorm running statistics are not updated,
    dropout draws nothing; every submodule gets its own mode back after), without gradients, and inside
    :func:`_kept_rng`, so Python's ``random``, NumPy's global generator, torch's CPU generator and the CUDA generators
    are as they were before: ``compress`` then runs exactly as it would without the check. Forward hooks registered on
    the model do see these calls."""
    from .models.runner import eval_mode

    try:
        with _kept_rng(), torch.no_grad(), eval_mode(model):
            if train.mode == "distil":
                if len(train.feature_pairs):
                    _check_feature_range(model, train, batch)
                # the whole distillation loss (KD term with its mask, task loss, feature term), with the model
                # standing in for the teacher (a copy of this model: the same forward)
                _trainer(model, _SelfTeacher(model), train)(batch)
            else:
                _FineTuner(model)(batch)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"the training stage cannot compute its loss on this model and train_data (checked on the "
                         f"first batch before any stage ran; {type(model).__name__}): {type(e).__name__}: {e}"
                         ) from e


@contextlib.contextmanager
def _kept_rng() -> Iterator[None]:
    """Every random state as it was on entry, restored on exit (also on error): Python's ``random``, NumPy's global
    generator, torch's CPU generator and, when CUDA is available, the generator of every CUDA device."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _check_feature_range(model: nn.Module, train: TrainStage, batch: Any) -> None:
    """Every feature pair ``(i, j)`` indexes the ``n`` hidden states of ``model`` (``-n <= i, j < n``), counted on
    ``batch`` before pruning. The teacher is this model as it is; the student is counted the same way, so a pair that
    only goes out of range because the prune stage drops blocks is left to the distiller to refuse."""
    from .models.runner import run_model

    hs = getattr(run_model(model, batch, unpack_sequences=False, output_hidden_states=True), "hidden_states", None)
    if not isinstance(hs, (tuple, list)):
        raise TypeError("feature_pairs needs the model's output to carry hidden_states when called with "
                        "output_hidden_states=True")
    n = len(hs)
    for i, j in train.feature_pairs:
        if not (-n <= i < n and -n <= j < n):
            raise ValueError(f"feature pair ({i}, {j}) out of range: the model has {n} hidden states "
                             f"(indices {-n} .. {n - 1})")


def stored_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtype of every floating parameter and buffer of ``model`` by name, as loaded: what
    :func:`restore_dtypes` brings them back to after work in float32 (``medquant prune`` / ``pipeline``: a
    bfloat16 folder is pruned, trained and quantized in float32 and saved in bfloat16; :func:`compress`'s
    ``save_dtypes``)."""
    return {n: t.dtype for n, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                                   model.named_buffers(remove_duplicate=False))
            if t.is_floating_point()}


def restore_dtypes(model: nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    """Cast each floating parameter and buffer of ``model`` named in ``dtypes`` back to its dtype there (a model
    cast to float32 for pruning is saved in the dtypes its folder stored: bfloat16 stays bfloat16, a float32
    module kept beside it stays float32). Names ``dtypes`` lacks (modules added since: a quantized layer's codes
    and scales) are left as they are; a quantized layer's bias, a name it kept, gets its stored dtype back."""
    with torch.no_grad():
        for n, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                    model.named_buffers(remove_duplicate=False)):
            want = dtypes.get(n)
            if want is not None and t.is_floating_point() and t.dtype != want:
                t.data = t.data.to(want)


def save_with_files(model: nn.Module, out: str | os.PathLike, *, plan: Any = None,
                    extras: dict[str, Any] | None = None,
                    write_files: Callable[[Path], Any] | None = None) -> Path:
    """:func:`medquant.prune.save_pruned`, with files of the caller written into the checkpoint as part of the save.

    ``write_files(folder)`` is called with the new version folder after the model files are in it and before the
    manifest is written, so a tokenizer or report written there is listed in the manifest with its final bytes (a
    file written into the folder after a save would not match it).

    Args:
        model: the model.
        out: the checkpoint folder.
        plan: the pruning plan, or None.
        extras: JSON extras.
        write_files: the callback (None: a plain :func:`~medquant.prune.save_pruned`).

    Returns:
        The folder written.
    """
    from .io import MANIFEST_NAME, checkpoint_path, write_checkpoint
    from .io.atomic import resolve
    from .prune import save_pruned

    if write_files is None:
        return save_pruned(model, out, plan=plan, extras=extras)
    path = checkpoint_path(out)
    with write_checkpoint(path) as folder:
        # the model files are written by save_pruned into a scratch checkpoint inside the new version folder (removed
        # again before the manifest is written) and moved up; their bytes and checksums do not change
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = resolve(save_pruned(model, Path(tmp, "model"), plan=plan, extras=extras))
            for name in sorted(os.listdir(src)):
                if name != MANIFEST_NAME:
                    os.replace(src / name, folder / name)
        write_files(folder)
    return path


class _FineTuner:
    """Task-loss-only training through the same loop as distillation (alpha = 0, no teacher)."""

    def __init__(self, model: nn.Module) -> None:
        from .distill import Distiller

        self._d = Distiller(_NoTeacher(), model, alpha=0.0)

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        return self._d(batch)

    def fit(self, data, *, steps: int, lr: float, progress: bool = True) -> list[float]:
        """:meth:`medquant.distill.Distiller.fit` with the task loss only, its progress bar labelled ``finetune``."""
        return self._d.fit(data, steps=steps, lr=lr, progress=progress, desc="finetune")


class _SelfTeacher(nn.Module):
    """``model`` as the teacher of the dry run's distiller (the real teacher is a copy of it): no module or parameter
    of its own (``model`` is not registered), so the distiller's ``eval()`` and ``requires_grad_(False)`` on the
    teacher change nothing in ``model``; ``config`` is ``model``'s, read for the feature projections' widths."""

    model: nn.Module  # set with object.__setattr__: not a submodule

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "config", getattr(model, "config", None))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class _NoTeacher(nn.Module):
    def forward(self, *a, **k):  # pragma: no cover - never called with alpha = 0
        raise RuntimeError("fine-tuning has no teacher")


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None, *,
                    trust_remote_code: bool = False) -> nn.Module:
    """Reload a model saved by :func:`compress` (same as :func:`medquant.prune.load_pruned`).

    Args:
        path: the folder written by :func:`compress`.
        model: a float instance of the architecture for plain ``nn.Module`` models (transformers models are rebuilt
            from their saved config).
        trust_remote_code: rebuild a transformers model whose class is the folder's own code (a model loaded with
            ``trust_remote_code=True``; the save copies its code files); off by default.

    Returns:
        The compressed model.

    Raises:
        CheckpointError: as :func:`medquant.prune.load_pruned`.
    """
    from .prune import load_pruned

    return load_pruned(path, model=model, trust_remote_code=trust_remote_code)
