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

import copy
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .quant.config import QuantConfig

__all__ = ["CompressResult", "PruneStage", "QuantStage", "TrainStage", "compress", "load_compressed"]


@dataclass
class PruneStage:
    """The pruning stage of :func:`compress`: :class:`medquant.prune.StructuredPruner` settings.

    ``layer_select`` uses block influence (``1 - cos(block input, block output)`` on calibration tokens,
    :func:`medquant.prune.block_influence`) to set per-layer ratios averaging ``head_ratio`` / ``ffn_ratio``;
    ``drop_blocks`` drops that many of the least influential blocks.

    Attributes:
        head_ratio: fraction of attention heads removed per block (average over blocks with ``layer_select``),
            in ``[0, 1)``.
        ffn_ratio: fraction of FFN neurons removed per block, in ``[0, 1)``.
        importance: ``"magnitude"``, ``"taylor"`` or ``"activation"`` (activation statistics on ``calib``).
        gqa: grouped-query attention: ``"query"`` removes query heads only, ``"group"`` whole key/value groups.
        scope: which blocks: ``None`` (the language model, or the vision tower of an encoder), ``"language"``,
            ``"vision"`` or ``"all"``.
        layer_select: per-layer ratios from block influence instead of one ratio for every block.
        spread: with ``L`` blocks, the block of influence rank ``k`` (0 = least influential) gets
            ``ratio * (1 + spread * (1 - 2k / (L - 1)))``; 0 is uniform, at most 1
            (:func:`medquant.prune.allocate_ratios`).
        drop_blocks: number of whole blocks removed (the least influential ones).
    """

    head_ratio: float = 0.3
    ffn_ratio: float = 0.3
    importance: str = "activation"
    gqa: str = "query"
    scope: str | None = None
    layer_select: bool = False
    spread: float = 0.5
    drop_blocks: int = 0


@dataclass
class TrainStage:
    """The training stage of :func:`compress`: distillation from the unpruned model, or plain fine-tuning.

    The loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task + feature_weight * features``
    (:class:`medquant.distill.Distiller`); ``"finetune"`` uses the task loss alone.

    ``alpha``, ``temperature``, ``feature_pairs`` and ``feature_weight`` are distillation settings: ``"finetune"``
    runs with ``alpha = 0`` and no teacher features, refuses ``feature_pairs`` (there is no teacher to match), and
    :func:`compress` records what ran (``alpha`` 0, ``temperature`` / ``feature_weight`` ``None``, no
    ``feature_pairs``) in the saved ``extras["pipeline"]["train"]``.

    Attributes:
        mode: ``"distil"`` (teacher = a frozen copy of the model before pruning) or ``"finetune"``.
        steps: optimizer steps (AdamW), an integer >= 1; batches of ``train_data`` are cycled.
        lr: learning rate.
        alpha: weight of the distillation term, in ``[0, 1]``.
        temperature: softmax temperature ``T`` of the distillation term, finite and > 0.
        feature_pairs: ``(student layer, teacher layer)`` indices into ``hidden_states`` whose features are
            matched (MSE through a learned projection when the widths differ); ``"distil"`` only.
        feature_weight: weight of the feature-matching term.

    Raises:
        ValueError: an unknown ``mode``, ``steps`` not an integer >= 1, ``alpha`` outside ``[0, 1]``,
            ``temperature`` not finite and > 0, or ``feature_pairs`` with ``"finetune"``.
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
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"TrainStage.steps must be an integer >= 1, got {self.steps!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"TrainStage.alpha must be in [0, 1], got {self.alpha}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"TrainStage.temperature must be a finite number > 0, got {self.temperature}")
        if self.mode == "finetune" and len(self.feature_pairs):
            raise ValueError("TrainStage.feature_pairs match teacher features (distillation only); "
                             "TrainStage('finetune') has no teacher: use mode 'distil' or leave feature_pairs empty")

    def _as_run(self) -> dict[str, Any]:
        """The settings as they ran (what :func:`compress` records): ``"finetune"`` trains with ``alpha`` 0 and no
        temperature, feature pairs or feature weight."""
        rec: dict[str, Any] = {**asdict(self), "feature_pairs": [list(p) for p in self.feature_pairs]}
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
        skip: module patterns left in float (default the LM head); a single string is one pattern, ``None`` none.

    Raises:
        ValueError: an unknown ``method``.
        TypeError: ``config`` is not a ``QuantConfig``.
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
             progress: bool = True) -> CompressResult:
    """Run the stages in order on ``model`` (modified in place) and optionally save to ``out``.

    Args:
        model: the model to compress (a transformers causal LM or VLM; modified in place).
        prune: the pruning stage, or None.
        train: the fine-tuning / distillation stage, or None.
        quantize: the quantization stage, or None.
        calib: calibration batches (needed by pruning importance, layer selection and AWQ).
        train_data: training batches (dicts with ``labels``) for the training stage.
        out: a folder to save the result to (:func:`medquant.prune.save_pruned`), or None.
        progress: show progress bars.

    Returns:
        A :class:`CompressResult`.

    Raises:
        ValueError: a stage that needs ``calib`` or ``train_data`` without it.
    """
    from .prune import StructuredPruner, allocate_ratios, block_influence, least_influential, save_pruned

    calib = list(calib) if calib is not None else None
    res = CompressResult(model)
    teacher = copy.deepcopy(model).eval() if train is not None and train.mode == "distil" else None
    if prune is not None:
        heads: float | dict[str, float] = prune.head_ratio
        ffn: float | dict[str, float] = prune.ffn_ratio
        drop: list[str] = []
        if prune.layer_select or prune.drop_blocks:
            if calib is None:
                raise ValueError("layer selection needs calibration data (calib=...)")
            scores = block_influence(model, calib, scope=prune.scope, progress=progress)
            res.block_influence = scores
            if prune.layer_select:
                heads = allocate_ratios(scores, prune.head_ratio, spread=prune.spread)
                ffn = allocate_ratios(scores, prune.ffn_ratio, spread=prune.spread)
            if prune.drop_blocks:
                drop = least_influential(scores, prune.drop_blocks)
        pruner = StructuredPruner(heads, ffn, importance=prune.importance, gqa=prune.gqa, scope=prune.scope,
                                  drop_blocks=drop, progress=progress)
        res.plan = pruner.prune(model, calib=calib)
    if train is not None:
        from .distill import Distiller

        if train_data is None:
            raise ValueError("the training stage needs train_data=<iterable of batches>")
        alpha = train.alpha if train.mode == "distil" else 0.0
        t = teacher if teacher is not None else model  # unused when alpha = 0
        d = Distiller(t, model, alpha=alpha, temperature=train.temperature,
                      feature_pairs=train.feature_pairs if train.mode == "distil" else (),
                      feature_weight=train.feature_weight) if t is not model else _FineTuner(model)
        res.train_losses = d.fit(train_data, steps=train.steps, lr=train.lr, progress=progress)
        model.eval()
    if quantize is not None:
        from .calibrate.awq import awq_quantize_
        from .quant.api import quantize_

        if quantize.method == "awq":
            if calib is None:
                raise ValueError("activation-aware quantization needs calibration data (calib=...)")
            res.awq_groups = awq_quantize_(model, quantize.config, calib, scope=prune.scope if prune else None,
                                           skip=quantize.skip, progress=progress)
        else:
            quantize_(model, quantize.config, skip=list(quantize.skip) if quantize.skip else None)
    if out is not None:
        extras = {"pipeline": {
            "prune": asdict(prune) if prune else None,
            "train": train._as_run() if train else None,
            "quantize": {"config": quantize.config.to_dict(), "method": quantize.method,
                         "skip": list(quantize.skip)} if quantize else None,
            "final_train_loss": res.train_losses[-1] if res.train_losses else None,
        }}
        res.path = str(save_pruned(model, out, plan=res.plan, extras=extras))
    return res


class _FineTuner:
    """Task-loss-only training through the same loop as distillation (alpha = 0, no teacher)."""

    def __init__(self, model: nn.Module) -> None:
        from .distill import Distiller

        self._d = Distiller(_NoTeacher(), model, alpha=0.0)

    def fit(self, data, **kw):
        return self._d.fit(data, **kw)


class _NoTeacher(nn.Module):
    def forward(self, *a, **k):  # pragma: no cover - never called with alpha = 0
        raise RuntimeError("fine-tuning has no teacher")


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Reload a model saved by :func:`compress` (same as :func:`medquant.prune.load_pruned`).

    Args:
        path: the folder written by :func:`compress`.
        model: a float instance of the architecture for plain ``nn.Module`` models (transformers models are rebuilt
            from their saved config).

    Returns:
        The compressed model.
    """
    from .prune import load_pruned

    return load_pruned(path, model=model)
