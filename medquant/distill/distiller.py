"""Knowledge distillation teacher -> student.

Loss per batch::

    L = alpha * T^2 * KD + (1 - alpha) * task + beta * FM

* ``KD = sum_p m_p KL(softmax(z_t,p / T) || softmax(z_s,p / T)) / sum_p m_p`` over output positions ``p``:
  one position per example for classification logits ``(B, C)`` (one binary logit ``z`` per example, ``(B, 1)``:
  the softmax of ``(0, z / T)``, i.e. ``(1 - sigmoid(z / T), sigmoid(z / T))``; 1-D logits are refused); every
  token for token logits ``(B, S, V)``. A multi-label classifier (``multi_label``: C independent sigmoid outputs,
  read from a Hugging Face config's ``problem_type == "multi_label_classification"``) has the product of C
  Bernoullis as its distribution: ``KL = sum_c KL(Bern(sigmoid(z_t,c / T)) || Bern(sigmoid(z_s,c / T)))``,
  with ``m_p`` the attention mask (padding excluded); for an encoder-decoder (``config.is_encoder_decoder``),
  whose logits are the decoder's, ``decoder_attention_mask``, else ``labels != -100``, else every position.
  ``T^2`` keeps the gradient scale independent of ``T`` (Hinton et al. 2015).
* ``task``: the student's own loss -- the model's ``.loss`` when the batch carries ``labels``; for causal LMs
  without labels, next-token cross-entropy on ``input_ids`` with padding and a multimodal model's image / video /
  audio placeholder tokens (config ``image_token_id`` / ``image_token_index`` / ``video_token_id`` / ..., also in
  its ``vision_config`` / ``audio_config``: :func:`medquant.models.runner.placeholder_token_ids`) masked
  (``labels = -100``). A causal LM: a Hugging Face model that can generate and is not an encoder-decoder, or a
  model without a Hugging Face config; others (masked LMs, token classifiers) need ``labels`` or ``task_loss``.
* ``FM`` (optional): feature matching ``mean_pairs MSE(P_k h_s[i_k], h_t[j_k])`` over the tokens of the attention
  mask (padding excluded, for classifiers with ``(B, C)`` logits too) for layer pairs ``(i_k, j_k)`` of
  ``hidden_states``, with a learned linear projection ``P_k`` (student width -> teacher width; identity-initialised
  when the widths agree; float32, on the student's device; applied in its own dtype when the Distiller was cast
  with ``.to(dtype)``) trained together with the student.

Masked positions (padding) are left out before either term is computed, as ``F.cross_entropy`` leaves out
``ignore_index`` targets: a teacher whose logits or hidden states are NaN / inf there does not make the loss NaN.

The teacher is put in eval mode, its own parameters get ``requires_grad=False`` and it runs under
``torch.no_grad`` in eval mode (also when it, or a module it shares with the student, was switched back to train
mode): its own parameters receive no gradient and are never changed. A module shared by both (the same
``nn.Module`` object in the teacher and the student, e.g. a shared embedding) stays the student's: its parameters
keep their ``requires_grad`` and train with the student (the teacher's outputs follow them). Teacher and student may differ
in size (a pruned or quantized copy of the teacher) as long as their logits have the same last dimension.

Teacher and student may sit on different devices (a large teacher on a second GPU): the batch's tensors are moved
to the device of the teacher's first parameter (left as they are for a model dispatched over several devices by
accelerate, whose hooks move its inputs), and the teacher's logits and hidden states to the student's.
"""
from __future__ import annotations

import inspect
import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import broadcast_parameters, is_ddp, is_fsdp, unwrap
from ..models.runner import eval_mode, main_output, placeholder_token_ids, run_model
from ..training import train_steps

__all__ = ["Distiller", "check_feature_pairs", "kd_loss"]


def _check_multi_label(multi_label: Any) -> None:
    if not isinstance(multi_label, bool):  # 1 / "yes" would silently pick a loss
        raise TypeError(f"multi_label must be a bool, got {type(multi_label).__name__} {multi_label!r}")


def _config_multi_label(model: nn.Module) -> bool:
    """Whether a Hugging Face config says the model is a multi-label classifier (``problem_type``)."""
    return getattr(getattr(model, "config", None), "problem_type", None) == "multi_label_classification"


def _check_temperature(temperature: float | torch.Tensor) -> None:
    # a bool is an int in Python: True would silently be T = 1
    real_tensor = (isinstance(temperature, torch.Tensor) and temperature.numel() == 1
                   and not temperature.dtype.is_complex and temperature.dtype != torch.bool)
    if not real_tensor and (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)):
        raise TypeError(f"temperature must be a real number (int, float or a one-element real tensor), not a bool; "
                        f"got {type(temperature).__name__} {temperature!r}")
    if not (float(temperature) > 0 and math.isfinite(float(temperature))):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def check_feature_pairs(feature_pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pairs as ``(int, int)``; a clear error for anything else (modules, names, bools, a lone pair).

    Args:
        feature_pairs: ``(student_layer, teacher_layer)`` indices into the models' ``hidden_states``.

    Returns:
        The pairs as a list of ``(int, int)``.

    Raises:
        TypeError: not an iterable of pairs of integers.
    """
    accepted = ("feature_pairs takes (student_layer, teacher_layer) pairs of int indices into the models' "
                "hidden_states, e.g. [(2, 4)]")
    if isinstance(feature_pairs, (str, bytes, nn.Module)) or not isinstance(feature_pairs, Iterable):
        raise TypeError(f"{accepted}; got {type(feature_pairs).__name__} {feature_pairs!r}")
    pairs = []
    for k, p in enumerate(feature_pairs):
        ok = (isinstance(p, Sequence) and not isinstance(p, (str, bytes)) and len(p) == 2
              and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in p))
        if not ok:
            got = (f"({', '.join(type(i).__name__ for i in p)})" if isinstance(p, Sequence)
                   and not isinstance(p, (str, bytes)) else type(p).__name__)
            raise TypeError(f"{accepted}; feature_pairs[{k}] is {got} {p!r}")
        pairs.append((int(p[0]), int(p[1])))
    return pairs


def _check_returns_hidden_states(model: nn.Module, role: str) -> None:
    """Refuse a model whose ``forward`` cannot take ``output_hidden_states`` (neither by name nor ``**kwargs``)."""
    inner = _unwrap(model)
    try:
        params = inspect.signature(inner.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the forward pass will tell
        return
    if any(p.kind is p.VAR_KEYWORD or p.name == "output_hidden_states" for p in params):
        return
    raise TypeError(f"feature_pairs needs a {role} that returns hidden_states when called with "
                    f"output_hidden_states=True (a Hugging Face model); the {role} {type(inner).__name__}'s forward "
                    f"does not take output_hidden_states. Use a model that does, or leave feature_pairs empty")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float | torch.Tensor = 2.0,
            mask: torch.Tensor | None = None, *, multi_label: bool = False) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over (unmasked) positions.

    Logits are ``(..., V)``; ``mask`` has the leading shape (1 = count the position). One logit per position
    (``V = 1``, a sigmoid / ``BCEWithLogitsLoss`` classifier) is the Bernoulli distribution
    ``(1 - sigmoid(z / T), sigmoid(z / T))``, the softmax of ``(0, z / T)`` (a softmax over one class would be 1 for
    any logit, and the KL 0). The ``T^2`` factor keeps the
    gradient's scale independent of ``T`` (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural
    Network", 2015). Classes the teacher gives probability 0 (logit ``-inf``, e.g. a suppressed vocabulary entry)
    contribute 0 (``0 * log 0 = 0``, as :func:`torch.xlogy`), not NaN.

    With ``multi_label`` the ``V`` logits of a position are independent labels (sigmoid outputs, a multi-label
    classifier trained with ``BCEWithLogitsLoss``), not exclusive classes: the position's distribution is the product
    of ``V`` Bernoullis and its KL the sum of theirs,
    ``sum_v KL(Bern(sigmoid(t_v / T)) || Bern(sigmoid(s_v / T)))`` (each the two-class softmax KL of ``(0, z_v)``).

    Args:
        student_logits: the student's logits.
        teacher_logits: the teacher's logits, same shape.
        temperature: the softmax temperature ``T``, a finite real number > 0: an int, a float or a one-element
            real tensor of any shape and device (not a bool; used as a float32 scalar on the logits' device, so the
            loss stays a float32 scalar, and a ``T`` that requires grad gets its gradient).
        mask: optional 0/1 mask over the leading dimensions. Masked positions take no part at all (only the
            kept rows are computed, as ``F.cross_entropy`` skips ``ignore_index`` targets): non-finite logits there
            (padding) leave the loss and the gradient finite.
        multi_label: the last axis holds independent sigmoid labels (the sum of Bernoulli KLs above), not the
            classes of one softmax.

    Returns:
        The scalar loss.

    Raises:
        TypeError: ``temperature`` is not a real number or a one-element real tensor (a bool included), or
            ``multi_label`` is not a bool.
        ValueError: the logits' shapes differ, the logits (or the mask) are on different devices (this function
            moves nothing: move the teacher's logits with ``.to(student_logits.device)``; :class:`Distiller` does),
            ``temperature`` is not finite and > 0, the mask's shape is not the positions', or no position is left
            (an empty batch, or a mask of zeros).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; KD needs the same positions and classes")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"the student logits are on {student_logits.device}, the teacher logits on "
                         f"{teacher_logits.device}; kd_loss needs them on the same device (move the teacher's "
                         f"with teacher_logits.to(student_logits.device))")
    if mask is not None and mask.device != student_logits.device:
        raise ValueError(f"the mask is on {mask.device}, the logits on {student_logits.device}; kd_loss needs "
                         f"them on the same device (move the mask with mask.to(student_logits.device))")
    _check_temperature(temperature)
    _check_multi_label(multi_label)
    # a one-element tensor T as a 0-dim float32 one on the logits' device: a (1,) or (1, 1) T would broadcast the
    # loss to its shape, a float64 one make it float64 (its gradient, for a learnable T, is kept)
    t = (temperature.reshape(()).to(device=student_logits.device, dtype=torch.float32)
         if isinstance(temperature, torch.Tensor) else temperature)
    positions = tuple(student_logits.shape[:-1])
    if math.prod(positions) == 0:
        raise ValueError(f"the logits {tuple(student_logits.shape)} have no position to distil (an empty batch); "
                         f"KD needs at least one row of logits")
    weights = None
    if mask is not None:
        if tuple(mask.shape) != positions:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the logits positions {positions}")
        m = mask.to(torch.float32)
        if m.sum() == 0:
            raise ValueError("the mask leaves no position to distil")
        # only the kept positions are computed, as F.cross_entropy skips ignore_index targets: a non-finite logit
        # at a masked (padding) position would otherwise make the loss and the gradient NaN through 0 * NaN
        keep = m != 0
        weights = m
        if not bool(keep.all()):  # (no copy of the logits when every position counts)
            student_logits, teacher_logits, weights = student_logits[keep], teacher_logits[keep], m[keep]
    if multi_label:  # each label its own one-logit distribution: (..., V) -> (..., V, 1), KLs summed over V below
        student_logits, teacher_logits = student_logits.unsqueeze(-1), teacher_logits.unsqueeze(-1)
    if student_logits.shape[-1] == 1:  # one logit z (a sigmoid classifier): the Bernoulli (1 - sigmoid(z),
        # sigmoid(z)) is the softmax of (0, z); a softmax over the one class alone is 1 whatever z, the KL always 0
        student_logits, teacher_logits = F.pad(student_logits, (1, 0)), F.pad(teacher_logits, (1, 0))
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / t, dim=-1)
    p_t = log_pt.exp()
    # p_t = 0 terms are 0 by convention (their log_pt is -inf: 0 * -inf would be NaN)
    # (p_t == 0, not p_t > 0: a NaN teacher probability must give a NaN loss, not a silent 0)
    kl = torch.where(p_t == 0, 0.0, p_t * (log_pt - log_ps)).sum(-1)  # per position (per label: multi_label)
    if multi_label:
        kl = kl.sum(-1)  # the product of the labels' Bernoullis: the sum of their KLs
    if weights is None:
        return t * t * kl.mean()
    return t * t * (kl * weights).sum() / weights.sum()


def _placeholder_tokens(model: nn.Module) -> list[int]:
    """The ids of a multimodal model's image / video / audio placeholder tokens
    (:func:`medquant.models.runner.placeholder_token_ids` of the unwrapped model); none for other models."""
    return placeholder_token_ids(_unwrap(model))


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(_unwrap(model), "config", None), "is_encoder_decoder", False))


def _decoder_mask(model: nn.Module, batch: Any) -> torch.Tensor | None:
    """An encoder-decoder's mask over its logits' (decoder) positions: ``decoder_attention_mask``, else
    ``labels != -100`` (the logits at position p predict ``labels[p]``), else None (every position); never the
    encoder's ``attention_mask``."""
    if not isinstance(batch, Mapping):
        return None
    m = batch.get("decoder_attention_mask")
    if isinstance(m, torch.Tensor):
        return m
    labels = batch.get("labels")
    return labels != -100 if isinstance(labels, torch.Tensor) and labels.dim() == 2 else None


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether the default next-token task loss applies: a Hugging Face model that generates and is not an
    encoder-decoder (a masked LM or a token classifier is not), or a model without a Hugging Face config (taken
    as a causal LM when its logits are ``(B, S, V)``)."""
    model = _unwrap(model)
    cfg = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if cfg is None or not callable(can_generate):
        return True
    return bool(can_generate()) and not getattr(cfg, "is_encoder_decoder", False)


class Distiller(nn.Module):
    """Distil ``teacher`` into ``student``: ``L = alpha * kd + (1 - alpha) * task + beta * features``.

    The module's own parameters are the feature projections: optimise ``distiller.trainable_parameters()``.
    Its ``state_dict`` holds the student (``student.*``) and the projections (``projections.*``), not the teacher;
    a parameter registered under several names (tied weights) is stored under its first name only (safetensors,
    which ``transformers.Trainer`` saves it with, refuses shared tensors), and ``load_state_dict`` fills the others.

    Several processes: pass ``student`` wrapped in ``torch.nn.parallel.DistributedDataParallel`` and give each rank
    its share of every batch. DDP averages the student's gradients over ranks; :meth:`fit` broadcasts rank 0's
    feature projections once and averages their gradients too (they live outside the DDP module). The loss is the
    mean over the rank's own positions, so the averaged gradient is the gradient of the global-batch loss when every
    rank has the same number of positions (equal batch sizes; for token KD, equal unmasked token counts),
    otherwise a reweighting of it. ``distiller.student_module`` is the unwrapped student. A student sharded with
    FSDP2 ``fully_shard`` (on the default process group) is trained the same way (FSDP averages its gradients).
    The ranks may hold different numbers of batches: :meth:`fit` ends every pass on every rank when the first rank
    runs out (:func:`medquant.training.train_steps`' ``stop_together``, on in a run of several ranks), so the
    ranks take the same steps and keep identical weights.

    Args:
        teacher: the frozen teacher, called as ``model(**batch)`` (dict batches, or any mapping such as a
            tokenizer's ``BatchEncoding``) or ``model(batch)``, with the batch's tensors moved to its device; it is
            put in eval mode with ``requires_grad=False`` on its parameters that are not also the student's (a
            module shared with the student keeps training) and is not a submodule (never trained, not in
            ``state_dict``). It may sit on another device than the student: its outputs are moved to the
            student's.
        student: the model to train, called the same way.
        alpha: weight of the KD term (``1 - alpha`` on the task loss), a real number in ``[0, 1]`` (not a bool).
        temperature: ``T`` of :func:`kd_loss`, a finite real number > 0 (not a bool).
        feature_pairs: ``[(student_layer, teacher_layer), ...]`` int indices into ``hidden_states`` to match (not
            modules): both models must return ``hidden_states`` when called with ``output_hidden_states=True``
            (Hugging Face models do).
        feature_weight: ``beta``, a finite real number >= 0 (not a bool).
        feature_norm: divide each pair's squared error by the teacher feature's mean square over the same
            positions (a relative error), so that layers whose residual stream is large (LLMs' outlier
            dimensions grow with depth) do not dominate the feature term. Default ``False``: plain MSE.
        student_dim: the student's hidden size for the feature projections (default: read from its config).
        teacher_dim: the teacher's hidden size (default: read from its config).
        task_loss: ``task_loss(student_output, batch) -> scalar`` overriding the default task loss.
        multi_label: the logits are independent sigmoid labels (:func:`kd_loss`'s ``multi_label``: the sum of the
            labels' Bernoulli KLs) rather than one softmax's classes. ``None`` (default): read from the student's
            (else the teacher's) Hugging Face config, ``problem_type == "multi_label_classification"`` (what
            transformers' classifiers train with ``BCEWithLogitsLoss``); ``False`` for a model without one. The
            choice is kept as :attr:`multi_label`.

    The feature projections are float32 ``nn.Linear`` layers created on the device of the student's parameters
    (move the student there before building the ``Distiller``, or move the ``Distiller`` with ``.to(device)``).

    Raises:
        TypeError: ``alpha``, ``temperature`` or ``feature_weight`` not a real number (a bool included),
            ``multi_label`` neither a bool nor None, ``feature_pairs`` not pairs of ints, or
            ``feature_pairs`` given with a teacher or student whose ``forward`` takes no ``output_hidden_states``
            (a plain ``nn.Module``).
        ValueError: ``alpha`` outside [0, 1], ``temperature`` not finite and > 0, ``feature_weight`` not finite and
            >= 0, ``teacher is student``, or the hidden sizes for ``feature_pairs`` cannot be read from the models'
            configs and are not given.
    """

    #: ``transformers.Trainer`` reads this instead of guessing from ``forward(**inputs)``: the Distiller takes no
    #: ``num_items_in_batch``. Each batch's ``L`` is a mean over that batch, so the Trainer divides it by
    #: ``gradient_accumulation_steps`` and the step's gradient is that of the mean of its batches' losses.
    accepts_loss_kwargs = False

    teacher: nn.Module  # set with object.__setattr__: not a submodule

    def __init__(self, teacher: nn.Module, student: nn.Module, *, alpha: float = 0.5, temperature: float = 2.0,
                 feature_pairs: Sequence[tuple[int, int]] = (), feature_weight: float = 1.0,
                 feature_norm: bool = False, student_dim: int | None = None, teacher_dim: int | None = None,
                 task_loss: Callable[[Any, Any], torch.Tensor] | None = None,
                 multi_label: bool | None = None) -> None:
        super().__init__()
        for name, v in (("alpha", alpha), ("feature_weight", feature_weight)):  # True would silently be 1
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a real number (an int, a float or a NumPy scalar), not a bool; "
                                f"got {type(v).__name__} {v!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        _check_temperature(temperature)
        if not (feature_weight >= 0 and math.isfinite(feature_weight)):
            raise ValueError(f"feature_weight must be a finite number >= 0, got {feature_weight}")
        if teacher is student:
            raise ValueError("teacher and student are the same object; distil into a copy (copy.deepcopy)")
        if multi_label is None:
            config_model = _unwrap(student) if getattr(_unwrap(student), "config", None) is not None else teacher
            multi_label = _config_multi_label(config_model)
        _check_multi_label(multi_label)
        self.multi_label = multi_label
        self.alpha, self.temperature, self.feature_weight = float(alpha), float(temperature), float(feature_weight)
        self.feature_pairs = check_feature_pairs(feature_pairs)
        if self.feature_pairs:
            _check_returns_hidden_states(student, "student")
            _check_returns_hidden_states(teacher, "teacher")
        self.feature_norm = bool(feature_norm)
        self.task_loss = task_loss
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained, never in state_dict
        self.student = student
        teacher.eval()
        students = {id(p) for p in student.parameters()}  # a module shared with the student stays trainable
        for p in teacher.parameters():
            if id(p) not in students:
                p.requires_grad_(False)
        self.projections = nn.ModuleList()
        if self.feature_pairs:
            sd = student_dim or _hidden_size(_unwrap(student))
            td = teacher_dim or _hidden_size(teacher)
            device = _param_device(student)
            for _ in self.feature_pairs:
                proj = nn.Linear(sd, td, bias=False, device=device)  # float32, on the student's device
                if sd == td:
                    nn.init.eye_(proj.weight)
                self.projections.append(proj)
        # one name per tied parameter in state_dict (safetensors, which transformers.Trainer saves a
        # non-PreTrainedModel with, refuses tensors that share memory); loading fills the other names
        self.register_state_dict_post_hook(_drop_tied_aliases)
        self.register_load_state_dict_pre_hook(_fill_tied_aliases)

    @property
    def student_module(self) -> nn.Module:
        """The student without its ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
        return _unwrap(self.student)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters :meth:`fit` trains.

        Returns:
            The student's parameters that require grad, then the feature projections' parameters.
        """
        return [p for p in self.student.parameters() if p.requires_grad] + list(self.projections.parameters())

    def _task(self, out: Any, batch: Any, logits: torch.Tensor) -> torch.Tensor:
        if self.task_loss is not None:
            return self.task_loss(out, batch)
        loss = getattr(out, "loss", None)
        if isinstance(loss, torch.Tensor):
            return loss
        if isinstance(batch, Mapping) and "input_ids" in batch and logits.dim() == 3 and _is_causal_lm(self.student):
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
            for token in _placeholder_tokens(self.student):  # a VLM's image / video placeholders are no targets
                labels = labels.masked_fill(labels == token, -100)
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        raise ValueError("no task loss: pass batches with 'labels', token batches with 'input_ids' to a causal LM, "
                         "or task_loss=")

    def forward(self, batch: Any = None, *, return_loss: bool = True, **inputs: Any) -> dict[str, torch.Tensor]:
        """Losses for one batch: ``{"loss", "kd", "task", "features"}`` (``loss`` is the one to backpropagate).

        Called as ``distiller(batch)``, ``distiller(**batch)`` or ``distiller(batch, **more)`` (``more`` merged
        into a mapping batch, else passed to both models as keyword arguments: ``model(batch, **more)``, e.g.
        ``distiller(x, levels=lv)`` for an ``AdaptiveQuantizer`` student); the second form is what
        ``transformers.Trainer`` does, so
        ``Trainer(model=distiller, args=TrainingArguments(..., remove_unused_columns=False), ...)`` trains the student
        (and projections) with the distillation loss (it reads ``outputs["loss"]``). With
        ``gradient_accumulation_steps = k`` a step's gradient is that of ``mean_k L`` (each batch's ``L`` is a
        mean over the batch: :attr:`accepts_loss_kwargs` is ``False``, so the Trainer passes no
        ``num_items_in_batch`` and divides each loss by ``k``). The attention mask (the batch's, or a keyword
        ``attention_mask=`` next to a positional batch) excludes padding from the KD term of token logits and from
        the feature term of every model (classifiers included).

        ``transformers.Trainer`` finds no label argument here; ``return_loss=True`` (the default, as CLIP's) is what
        tells it that the output carries the loss, so ``Trainer.evaluate()`` reports ``eval_loss`` (this ``L``).

        Args:
            batch: the batch (dict or tensors), or None when given as keyword arguments.
            return_loss: accepted for ``transformers.Trainer`` and not passed to the models; the loss is always
                returned.
            **inputs: the batch as keyword arguments, or keyword inputs added to ``batch``.

        Returns:
            ``{"loss", "kd", "task", "features"}`` scalar tensors.

        Raises:
            ValueError: no batch, a feature pair out of the models' ``hidden_states`` range, or no task loss
                (``alpha < 1`` without ``labels``, ``task_loss`` or a causal LM's token batch).
            TypeError: ``feature_pairs`` is set and a model's output carries no ``hidden_states``.
        """
        kwargs: dict[str, Any] = {}  # keyword inputs next to a batch that is not a mapping: model(batch, **kwargs)
        if batch is None:
            if not inputs:
                raise ValueError("Distiller needs a batch")
            batch = inputs
        elif inputs:
            if isinstance(batch, Mapping):
                batch = {**batch, **inputs}
            else:
                kwargs = inputs
        want_hidden = bool(self.feature_pairs)
        extra = {"output_hidden_states": True} if want_hidden else {}
        need_teacher = self.alpha > 0 or want_hidden  # alpha = 0: plain fine-tuning (the control), no teacher
        if need_teacher:  # eval mode also when something switched the teacher (or a module it shares) to train
            with torch.no_grad(), eval_mode(self.teacher):
                t_device = _input_device(self.teacher)
                t_batch, t_kwargs = _to_device(batch, t_device), _to_device(kwargs, t_device)
                t_out = run_model(self.teacher, t_batch, unpack_sequences=False, **extra, **t_kwargs)
        s_out = run_model(self.student, batch, unpack_sequences=False, **extra, **kwargs)
        s_logits = main_output(s_out, hidden_state=False, first_item=False)  # logits only
        # the tokens' mask: KD reads it for token logits (B, S, V) only (class logits (B, C) have one position per
        # example), feature matching for the hidden states (B, S, H) of every model, classifiers included
        # the keyword inputs the models got: the mapping batch (a BatchEncoding too), else the keyword inputs next to
        # a positional batch (distiller(input_ids, attention_mask=m) runs model(input_ids, attention_mask=m))
        named = batch if isinstance(batch, Mapping) else kwargs
        token_mask = named.get("attention_mask")
        kd_mask = _decoder_mask(self.student, named) if _is_encoder_decoder(self.student) else token_mask
        mask = kd_mask.to(s_logits.device) if kd_mask is not None and s_logits.dim() == 3 else None
        parts: dict[str, torch.Tensor] = {}
        total = s_logits.new_zeros((), dtype=torch.float32)
        if self.alpha > 0:
            t_logits = main_output(t_out, hidden_state=False, first_item=False).detach().to(s_logits.device)
            if s_logits.dim() == 1 or t_logits.dim() == 1:  # (B,) binary logits or one example's (C,) class logits?
                raise ValueError(
                    f"the logits are 1-D (student {tuple(s_logits.shape)}, teacher {tuple(t_logits.shape)}): one "
                    "binary logit per example or the class logits of one example cannot be told apart (a softmax "
                    "over them would mix the examples of the batch). Return (B, 1) logits for a binary (sigmoid) "
                    "classifier, or (1, C) for one example")
            kd = kd_loss(s_logits, t_logits, self.temperature, mask, multi_label=self.multi_label)
            parts["kd"] = kd
            total = total + self.alpha * kd
        if self.alpha < 1.0:
            task = self._task(s_out, batch, s_logits)
            parts["task"] = task
            total = total + (1.0 - self.alpha) * task
        if want_hidden:
            fm = self._features(s_out, t_out, token_mask)
            parts["features"] = fm
            total = total + self.feature_weight * fm
        parts["loss"] = total
        return parts

    def _features(self, s_out: Any, t_out: Any, mask: torch.Tensor | None) -> torch.Tensor:
        for role, out in (("student", s_out), ("teacher", t_out)):
            if not isinstance(getattr(out, "hidden_states", None), (tuple, list)):
                raise TypeError(f"feature_pairs needs the {role}'s output to carry hidden_states (a tuple of "
                                f"tensors) when called with output_hidden_states=True; it returned a "
                                f"{type(out).__name__} without them")
        hs, ht = s_out.hidden_states, t_out.hidden_states
        losses = []
        for (i, j), proj in zip(self.feature_pairs, self.projections):
            if not (-len(hs) <= i < len(hs) and -len(ht) <= j < len(ht)):
                raise ValueError(f"feature pair ({i}, {j}) out of range: student has {len(hs)} hidden states, "
                                 f"teacher {len(ht)}")
            h, target = hs[i], ht[j].detach().to(hs[i].device).float()  # the teacher's device may be another
            m = mask
            if mask is not None and tuple(mask.shape) == tuple(h.shape[:-1]) == tuple(target.shape[:-1]):
                # the kept tokens only: non-finite hidden states on padding would make the term NaN (0 * NaN)
                keep = mask.to(h.device) != 0
                h, target, m = h[keep], target[keep], mask.to(h.device)[keep]
            # in the projection's dtype: float32, or the dtype the Distiller was cast to with .to(dtype)
            diff = (proj(h.to(proj.weight.dtype)).float() - target).pow(2).mean(-1)
            loss = _masked_mean(diff, m)
            if self.feature_norm:
                loss = loss / _masked_mean(target.pow(2).mean(-1), m).clamp_min(1e-12)
            losses.append(loss)
        return torch.stack(losses).mean()

    def fit(self, data: Iterable[Any], *, steps: int | None = None, epochs: int = 1, lr: float = 5e-5,
            optimizer: torch.optim.Optimizer | None = None, grad_clip: float | None = 1.0,
            progress: bool = True, desc: str = "distil") -> list[float]:
        """Train the student (and the projections) on ``L`` (module docstring) with AdamW by default.

        The loop is :func:`medquant.training.train_steps`. With a DDP / FSDP2 student (several processes) each
        pass ends on every rank as soon as one rank has no batch left, so uneven data per rank gives every rank
        the same number of steps (with ``steps``, the passes repeat until that many steps). Any other student
        trains in this process alone (``train_steps(local=True)``: no collective, also inside a multi-process job,
        where one rank may distil while the others do something else).

        Args:
            data: the batches (an iterable; re-iterated for several epochs or when ``steps`` needs more passes).
            steps: optimiser steps, repeating passes over ``data`` as needed; overrides ``epochs``. Data that a
                further pass finds empty (a generator, read once) ends the training early, with a ``UserWarning``
                saying how many steps were taken.
            epochs: passes over ``data`` when ``steps`` is None (an iterator such as a generator is read once:
                one pass, with a ``UserWarning``, when more are asked).
            lr: the AdamW learning rate (when no ``optimizer`` is given).
            optimizer: an optimiser over :meth:`trainable_parameters` to use instead of AdamW.
            grad_clip: the gradient-norm clip, > 0; a falsy value (None, 0) disables clipping.
            progress: show a progress bar.
            desc: the progress bar's label.

        Returns:
            The per-step losses.

        Raises:
            ValueError: ``steps < 1``, a negative or NaN ``grad_clip``, nothing to train, or ``data`` is empty.
        """
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        params = self.trainable_parameters()
        if not params:
            raise ValueError("the student has no trainable parameters")
        ddp = is_ddp(self.student) or is_fsdp(self.student)  # data-parallel student (FSDP2: default group)
        group = self.student.process_group if is_ddp(self.student) else None
        proj = list(self.projections.parameters())
        if ddp and proj:
            broadcast_parameters(proj, group=group)
        opt = optimizer or torch.optim.AdamW(params, lr=lr)

        def step_loss(batch: Any) -> tuple[torch.Tensor, float]:
            loss = self(batch)["loss"]
            return loss, float(loss.detach())

        losses = train_steps(step_loss, data, opt, params, epochs=None if steps is not None else epochs,
                             max_steps=steps, grad_clip=grad_clip or None,
                             sync_params=proj if ddp else (),  # DDP / FSDP sync the student only
                             group=group, local=not ddp,  # a student of its own: no collective with other ranks
                             model=self.student, progress=progress, desc=desc)
        if not losses:
            raise ValueError("the training data is empty: data yielded no batch, so no step was taken")
        if steps is not None and len(losses) < steps:  # a pass yielded no batch: data cannot be read again
            warnings.warn(f"Distiller.fit took {len(losses)} of the {steps} steps asked: a further pass over data "
                          "yielded no batch (an iterator such as a generator is read once); pass a list or a "
                          "DataLoader to repeat the batches", UserWarning, stacklevel=2)
        elif steps is None and epochs > 1 and isinstance(data, Iterator):  # passes after the first read nothing
            warnings.warn(f"Distiller.fit ran 1 of the {epochs} epochs asked ({len(losses)} steps): data is an "
                          "iterator (a generator), read once, so the later passes found no batch; pass a list or a "
                          "DataLoader to repeat the batches", UserWarning, stacklevel=2)
        return losses


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for the parameters registered under several names (tied weights, e.g. an
    ``lm_head`` tied to the input embedding)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _drop_tied_aliases(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for alias, name in _tied_aliases(module).items():
        if prefix + name in state_dict:
            state_dict.pop(prefix + alias, None)


def _fill_tied_aliases(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for alias, name in _tied_aliases(module).items():
        if prefix + alias not in state_dict and prefix + name in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + name]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all positions without a mask, or with a mask whose
    shape is not ``x``'s: then with a warning naming both, since the padding cannot be told apart)."""
    if mask is not None and x.shape != mask.shape:
        warnings.warn(f"the attention mask {tuple(mask.shape)} does not fit the hidden states "
                      f"{tuple(x.shape)} (positions added or removed by the model): the feature term is averaged "
                      "over every position, padding included", UserWarning, stacklevel=4)
        return x.mean()
    if mask is None:
        return x.mean()
    m = mask.to(device=x.device, dtype=x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


def _param_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first floating-point parameter (the CPU for a model without one)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device
    return torch.device("cpu")


def _input_device(model: nn.Module) -> torch.device | None:
    """Where ``model`` wants its inputs: the device of its first parameter (or buffer); None -- leave them -- for
    a model without either, or one dispatched over several devices by accelerate (its top-level ``_hf_hook`` moves
    the inputs, and gives the outputs back on their device; offloaded parameters are on ``meta``). A model loaded
    with a one-device ``device_map`` has no hook and is moved to like any other."""
    if getattr(_unwrap(model), "_hf_hook", None) is not None:
        return None
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if first is None else first.device


def _to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with its tensors (also inside mappings, lists and tuples) on ``device``; the rest unchanged."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _unwrap(model: nn.Module) -> nn.Module:
    return unwrap(model)


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        hs = getattr(cfg, "hidden_size", None)
        if isinstance(hs, int):
            return hs
    raise ValueError("cannot infer the hidden size for feature projections: pass student_dim= / teacher_dim=")
