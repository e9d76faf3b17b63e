"""QLoRA: a frozen 4-bit NormalFloat (NF4) base model with trainable LoRA adapters.

The two halves come from the ecosystem, not from medquant:

* **NF4 base** - bitsandbytes ``Linear4bit`` layers (``quant_type="nf4"``, blocksize 64, double quantization
  of the absmax constants when ``double_quant=True``) replace the ``nn.Linear`` layers of the roles named in
  ``quantize_roles`` (default: the language model; the output head, the vision tower and the projector stay
  float unless asked). Each weight block ``w`` is stored as 4-bit indices into the 16 NF4 levels
  ``q_i`` (quantiles of N(0, 1) normalised to [-1, 1]) times the block's absmax; the forward pass
  dequantizes to ``compute_dtype`` and runs an ordinary matmul. bitsandbytes >= 0.45 does this on CPU too.
* **LoRA** - PEFT ``LoraConfig`` on the language model's attention ``q/k/v/o`` and MLP ``gate/up/down``
  projections (names resolved inside the ``language`` role by :func:`medquant.models.modules_in_role`, so
  the SigLIP/CLIP towers' own ``q_proj``... are never touched). ``W x + (alpha / sqrt(r)) B A x`` with
  rank-stabilised scaling (rsLoRA, ``use_rslora=True``), ``A`` Kaiming-initialised, ``B = 0``, dropout 0.1
  on the adapter input. Defaults r=16, dropout 0.1, alpha 16.

Everything else is frozen. :meth:`QLoRAAdapter.merge` builds the deployable float model: each NF4 weight is
dequantized (``W_deq``) and the adapter folded in, ``W' = W_deq + (alpha/sqrt(r)) B A``, through PEFT's
``merge_and_unload``. This is exact up to float rounding with respect to the adapter model (which computes
with the same ``W_deq``), but it is *not* the original float weight: ``W_deq - W`` is the NF4 error. Merging
back into NF4 (PEFT's default for 4-bit layers) would re-quantize ``W_deq + BA`` and change the outputs
again; :meth:`QLoRAAdapter.requantize` instead quantizes the merged model with medquant's own
:func:`medquant.quant.quantize_`.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed import is_ddp
from ..quant.api import names_by_module, swap_module
from ..training import train_steps
from .config import DEFAULT_TARGETS, NF4Config
from .nf4 import _bnb, _dequantized_linear, nf4_dequantize_, nf4_modules, nf4_quantize_

# NF4Config / DEFAULT_TARGETS (config.py) and the nf4_* functions (nf4.py) stay importable from here
__all__ = [
    "DEFAULT_TARGETS",
    "NF4Config",
    "QLoRAAdapter",
    "nf4_dequantize_",
    "nf4_modules",
    "nf4_quantize_",
    "resolve_targets",
    "train_loop",
]

_CONFIG_FILE = "medquant_qlora.json"


def _role_modules(model: nn.Module, roles: Sequence[str]) -> list[str]:
    from ..models import modules_in_role

    names: list[str] = []
    for role in roles:
        names.extend(modules_in_role(model, role))
    return names


def resolve_targets(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS,
                    roles: Sequence[str] = ("language",)) -> list[str]:
    """Full names of the ``nn.Linear`` modules inside ``roles`` whose last name component is in ``targets``.

    A target starting with ``re:`` is a regular expression matched (``re.fullmatch``) against the full name
    instead. Raises ``ValueError`` when the model has none of the roles (a plain ``nn.Module``: pass
    ``roles=()`` and regex targets), when a target matches nothing, is not a valid regular expression, or when
    ``targets`` is empty. A single string is one target (``"q_proj"`` is ``["q_proj"]``).

    Args:
        model: the model.
        targets: last name components, or ``re:<regex>`` full-name patterns (or one such string).
        roles: the model roles to search (``medquant.models.model_roles``; one role may be given as a string).

    Returns:
        The full module names, target by target (each in model order, without repeats).

    Raises:
        ValueError: see above.
        TypeError: a target that is not a string.
    """
    targets = _str_list(targets, "target_modules")
    roles = _str_list(roles, "target_roles")
    if not targets:
        raise ValueError("target_modules is empty: name at least one Linear layer to adapt (last name components "
                         f"such as {list(DEFAULT_TARGETS)[:2]}, or 're:<regex>' full-name patterns)")
    if roles:
        in_roles = set(_role_modules(model, roles))
        if not in_roles:
            raise ValueError(f"{type(model).__name__} has no {'/'.join(roles)} role (medquant.models.model_roles "
                             f"found {sorted(_roles_of(model))}); pass roles=() with 're:' targets for other models")
    else:
        in_roles = {n for n, _ in model.named_modules()}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n in in_roles]
    chosen: list[str] = []
    for t in targets:
        if t.startswith("re:"):
            try:
                pat = re.compile(t[3:])
            except re.error as e:
                raise ValueError(f"target {t!r} is not a valid regular expression: {e}") from None
            hit = [n for n in linears if pat.fullmatch(n)]
        else:
            hit = [n for n in linears if n.rsplit(".", 1)[-1] == t]
        if not hit:
            raise ValueError(f"target {t!r} matches no nn.Linear in the {'/'.join(roles) or 'whole'} model; "
                             f"linear names there end in {sorted({n.rsplit('.', 1)[-1] for n in linears})}")
        chosen.extend(h for h in hit if h not in chosen)
    return chosen


def _str_list(value: str | Sequence[str], what: str) -> list[str]:
    """``value`` as a list of strings: a single string is one entry (not its characters)."""
    items = [value] if isinstance(value, str) else list(value)
    for v in items:
        if not isinstance(v, str):
            raise TypeError(f"{what} must be strings (or one string), got {v!r}")
    return items


def _weight_dtypes(modules: Iterable[nn.Module]) -> list[str]:
    """The dtypes of the modules' weights, sorted names (``["bfloat16"]``): the base an adapter is trained on."""
    return sorted({str(m.weight.dtype).split(".")[-1] for m in modules if isinstance(m, nn.Linear)})


def _check_base(model: nn.Module, target_roles: Sequence[str], quantize_roles: Sequence[str]) -> None:
    """Refuse a model that already has LoRA adapters (a ``PeftModel``, or one wrapped before) or that holds medquant
    quantized layers in the roles QLoRA works on: QLoRA needs float ``nn.Linear`` layers there."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from ..quant.modules import QUANT_MODULES

    lora = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if isinstance(model, PeftModel) or lora:
        what = ("the model is a PeftModel (it already has LoRA adapters)" if isinstance(model, PeftModel)
                else f"{type(model).__name__} already has LoRA adapters ({lora[0]}, ...)")
        raise ValueError(f"{what}: QLoRAAdapter wraps a plain model once; keep using the "
                         "adapter that wrapped it (or merge() it into a float model first)")
    roles = list(dict.fromkeys([*target_roles, *quantize_roles]))
    scope = set(_role_modules(model, roles)) if target_roles else None
    quant = [n for n, m in model.named_modules() if isinstance(m, QUANT_MODULES) and (scope is None or n in scope)]
    if quant:
        more = ", ..." if len(quant) > 3 else ""
        raise ValueError(f"{type(model).__name__} holds {len(quant)} medquant quantized layer(s) (QuantLinear / "
                         f"QuantConv2d, from medquant.quantize_: {', '.join(quant[:3])}{more}); QLoRA needs float "
                         "nn.Linear targets and quantizes them to NF4 itself: start from the float model "
                         "(medquant.dequantize_ gives the float layers the quantized ones compute with)")


def _refuse_shared_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """Refuse a LoRA target bound under several names (one ``nn.Linear`` object used in several places): PEFT
    wraps it under one name only, so its other uses would run without the adapter. Names that are one attribute of
    one parent module (the Linear of a block bound twice, ``nn.ModuleList([block, block])``) are one binding: PEFT
    replaces it there, in every use of the block."""
    aliases = names_by_module(model)
    for n in targets:
        names = aliases.get(id(model.get_submodule(n)), [n])
        bindings = {(id(model.get_submodule(a.rpartition(".")[0])), a.rpartition(".")[2]) for a in names}
        if len(bindings) > 1:
            raise ValueError(f"LoRA target {n} is one nn.Linear bound under {len(names)} names ({', '.join(names)}): "
                             "PEFT would put the adapter on one of them, leaving the other uses unadapted. Leave it "
                             "out of target_modules (it is still NF4-quantized, one layer under every name), or "
                             "give each use its own copy of the layer")


def _untie_config(model: nn.Module) -> None:
    """``tie_word_embeddings = False`` in ``model``'s config (and text config) when its output embeddings no longer
    share the input embeddings' weight (a merged LoRA head, an NF4-quantized head): transformers would tie them
    again when the saved model is loaded."""
    config = getattr(model, "config", None)
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    if config is None or get_out is None or get_in is None:
        return
    out, inp = get_out(), get_in()
    if out is None or inp is None or getattr(out, "weight", None) is getattr(inp, "weight", None):
        return
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for c in configs:
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


def _set_use_cache(model: nn.Module, value: bool) -> None:
    """``use_cache = value`` in ``model``'s config and in its text config: a VLM's language model reads
    ``config.text_config.use_cache`` (its top-level config has no such key), so setting the top level alone left the
    KV cache on in every training forward."""
    config = getattr(model, "config", None)
    if config is None:
        return
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for c in configs:
        c.use_cache = value


def _roles_of(model: nn.Module) -> dict:
    from ..models import model_roles

    return model_roles(model)


class QLoRAAdapter:
    """Wrap a Hugging Face model for (Q)LoRA fine-tuning. The model is modified in place.

    Args:
        model: a transformers model (any zoo architecture, or a real LM such as SmolLM2).
        r: the LoRA rank (default 16).
        lora_alpha: the LoRA ``alpha`` (default 16).
        lora_dropout: dropout on the adapter input (default 0.1).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (default) instead of ``alpha / r``.
        target_modules: last name components (or ``re:`` patterns) of the Linear layers to adapt, resolved
            inside ``target_roles`` (default the language model's q/k/v/o and gate/up/down projections).
        target_roles: the model roles the targets are looked for in (default ``("language",)``).
        quantize: ``True`` -> NF4 base (QLoRA); ``False`` -> float base (plain LoRA).
        quantize_roles: roles whose ``nn.Linear`` layers become NF4 (default ``("language",)``); add
            ``"vision"`` / ``"projector"`` to quantize those too.
        compute_dtype: dtype the NF4 layers dequantize to (float32 or bfloat16).
        double_quant: double quantization of the NF4 block constants.
        quant_type: ``"nf4"`` (default) or ``"fp4"``.
        cpu_bf16_packing: let bitsandbytes repack NF4 weights for its AVX512-BF16 CPU kernel at the first
            inference call (faster on such CPUs, bfloat16 absmax and matmul, CPU-dependent outputs); off by
            default (see :func:`nf4_quantize_`). :meth:`merge` handles either layout.
        _peft_model: internal (:meth:`load`): builds the PEFT model from the prepared base instead of
            ``get_peft_model``.

    The wrapped model keeps the train / eval mode ``model`` was in, the new LoRA dropouts included (an eval-mode model
    computes ``W x + s B A x`` without dropout until ``.train()``), and ``use_cache`` is turned off in its config and
    text config (the one a VLM's language model reads) for training.

    Attributes:
        model: the ``peft.PeftModel``; ``targets``: adapted module names; ``quantized``: NF4 module names;
        ``base_dtypes``: the dtypes of their float weights when the adapter was built (``["float32"]``).

    Raises:
        ValueError: ``r`` is not a positive int (a NumPy integer is taken), ``lora_dropout`` outside [0, 1),
            ``lora_alpha`` not positive and finite, a target matches no Linear or is a bad ``re:`` pattern,
            ``target_modules`` is empty
            (:func:`resolve_targets`); the model already has LoRA adapters (a ``PeftModel``, or wrapped before) or
            holds medquant quantized layers in the roles used; a target is one Linear bound under several names
            (PEFT would adapt one of its uses only); ``quantize=True`` and ``quantize_roles`` hold no
            ``nn.Linear``; a weight to quantize is NaN/inf, empty or on the meta device. Every check runs before the
            model is changed, and a failing construction leaves the model as it was.
        TypeError: a target or role that is not a string (one string is one target / role); ``lora_alpha`` or
            ``lora_dropout`` a bool or not a real number.
    """

    def __init__(self, model: nn.Module, r: int = 16, lora_alpha: float = 16.0, lora_dropout: float = 0.1,
                 use_rslora: bool = True, target_modules: Sequence[str] = DEFAULT_TARGETS,
                 target_roles: Sequence[str] = ("language",), quantize: bool = True,
                 quantize_roles: Sequence[str] = ("language",), compute_dtype: torch.dtype = torch.float32,
                 double_quant: bool = True, quant_type: str = "nf4", cpu_bf16_packing: bool = False,
                 _peft_model: Any = None) -> None:
        from peft import LoraConfig, get_peft_model

        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        r = int(r)
        for name, v in (("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout)):  # True would silently be 1
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a real number (an int, a float or a NumPy scalar), not a bool; "
                                f"got {type(v).__name__} {v!r}")
        lora_alpha, lora_dropout = float(lora_alpha), float(lora_dropout)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if lora_alpha <= 0 or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be positive and finite, got {lora_alpha}")
        target_modules = _str_list(target_modules, "target_modules")
        target_roles = _str_list(target_roles, "target_roles")
        quantize_roles = _str_list(quantize_roles, "quantize_roles")
        self.settings = {"r": r, "lora_alpha": float(lora_alpha), "lora_dropout": float(lora_dropout),
                         "use_rslora": bool(use_rslora), "target_modules": list(target_modules),
                         "target_roles": list(target_roles), "quantize": bool(quantize),
                         "quantize_roles": list(quantize_roles), "compute_dtype": str(compute_dtype).split(".")[-1],
                         "double_quant": bool(double_quant), "quant_type": quant_type,
                         "cpu_bf16_packing": bool(cpu_bf16_packing)}
        # everything is checked before the model is touched: a failing construction leaves it as it was
        _check_base(model, target_roles, quantize_roles if quantize else ())
        self.targets = resolve_targets(model, target_modules, target_roles)
        _refuse_shared_targets(model, self.targets)
        names: list[str] = []
        if quantize:
            names = [n for n in _role_modules(model, quantize_roles)
                     if isinstance(model.get_submodule(n), nn.Linear)]
            if not names:
                raise ValueError(
                    f"quantize=True, but {type(model).__name__} has no nn.Linear in quantize_roles "
                    f"{tuple(quantize_roles)} (medquant.models.model_roles found {sorted(_roles_of(model))}): "
                    "name roles it has in "
                    "quantize_roles, or pass quantize=False for a float base (plain LoRA)")
            NF4Config(compute_dtype, double_quant, quant_type, cpu_bf16_packing)  # its ValueErrors, up front
        cfg = None
        if _peft_model is None:
            # PEFT reads a list as name *suffixes* ('proj' would also adapt 'enc.proj') and a string as a regex
            # matched with re.fullmatch against the full name: the exact names, anchored
            cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                             target_modules="^(?:" + "|".join(map(re.escape, self.targets)) + ")$", bias="none")
        before = {n: model.get_submodule(n) for n in dict.fromkeys([*self.targets, *names])}
        aliases = names_by_module(model)  # a module bound under several names is swapped (and put back) under all
        self.base_dtypes = _weight_dtypes(before.values())
        grads = {id(p): p.requires_grad for p in model.parameters()}
        had_peft_config = hasattr(model, "peft_config")
        was_training = model.training
        self.quantized: list[str] = []
        try:
            self.quantized = (nf4_quantize_(model, names, compute_dtype, double_quant, quant_type,
                                                       cpu_bf16_packing) if quantize else [])
            for p in model.parameters():
                p.requires_grad_(False)
            self.model = _peft_model(model) if _peft_model is not None else get_peft_model(model, cfg)
        except BaseException:
            for n, m in before.items():  # undo: the original modules back, requires_grad as it was
                for alias in aliases.get(id(m), [n]):
                    swap_module(model, alias, m)
            for p in model.parameters():
                p.requires_grad_(grads.get(id(p), p.requires_grad))
            if not had_peft_config and "peft_config" in model.__dict__:
                del model.__dict__["peft_config"]
            raise
        # one mode for the whole wrapped model: PEFT creates the LoRA dropouts in train mode whatever the model's mode
        # (an eval-mode base then ran them with dropout active); PeftModel.from_pretrained's eval() (load without
        # is_trainable) is kept
        self.model.train(was_training and self.model.training)
        _set_use_cache(model, False)
        self._merged = False  # merge() folds the adapters into the base and unloads them: nothing is left to use

    def _check_not_merged(self, what: str) -> None:
        if getattr(self, "_merged", False):
            raise RuntimeError(f"{what}: this QLoRAAdapter was merged (merge() folds the LoRA weights into the base "
                               "and removes them, so it has no adapter left to train, save or merge). Save the "
                               "adapter before merging, or QLoRAAdapter.load a saved one onto a fresh model")

    # ------------------------------------------------------------------------------------------ info
    @property
    def scaling(self) -> float:
        """LoRA scaling: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
        s = self.settings
        return s["lora_alpha"] / (math.sqrt(s["r"]) if s["use_rslora"] else s["r"])

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters that train (the LoRA matrices).

        Returns:
            ``(name, parameter)`` pairs.
        """
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def num_parameters(self) -> tuple[int, int]:
        """Parameter counts of the adapted model (NF4 weights counted by stored elements x 2).

        Returns:
            ``(trainable, total)``.
        """
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        total = 0
        for p in self.model.parameters():
            total += p.numel() * (2 if p.dtype == torch.uint8 else 1)
        return trainable, total

    # ------------------------------------------------------------------------------------------ training
    def train(self, batches: Iterable[dict[str, torch.Tensor]], steps: int | None = None, lr: float = 2e-4,
              weight_decay: float = 0.0, grad_accum: int = 1, max_grad_norm: float | None = 1.0,
              progress: bool = True, seed: int | None = 0, desc: str = "qlora", ddp: bool = False) -> list[float]:
        """Plain AdamW loop over ``batches`` (dicts for ``model(**batch)`` with ``labels``).

        Each step accumulates ``grad_accum`` batches (see :func:`train_loop`). ``ddp=True`` (an initialised
        ``torch.distributed`` process group is needed): trains through ``DistributedDataParallel(self.model)``, so the
        LoRA gradients are averaged over ranks; give each rank its share of every batch. With equal per-rank token counts
        this is the single-process step on the union (the model's loss is a mean over the rank's tokens). The ranks may
        hold different numbers of batches: each pass ends on every rank when the first rank runs out (see
        :func:`train_loop`), so every rank takes the same number of steps.

        Args:
            batches: the batches.
            steps: optimiser steps, repeating passes over ``batches`` (a list or other re-iterable) as needed
                (default: one pass over ``batches``).
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            grad_accum: batches per optimiser step.
            max_grad_norm: gradient clipping, the max global norm, > 0 (None: none).
            progress: show a tqdm bar (rank 0 only under DDP).
            seed: seed set before training (None: leave the generator alone).
            desc: the progress bar's label.
            ddp: train through ``DistributedDataParallel``.

        Returns:
            The loss of every optimiser step.

        Raises:
            ValueError: ``steps < 1``, ``max_grad_norm`` not > 0, or ``batches`` is empty (as
                :meth:`medquant.distill.Distiller.fit`).
            RuntimeError: ``ddp=True`` without an initialised process group, or the adapter was merged
                (:meth:`merge`).
            FloatingPointError: see :func:`train_loop` (a NaN / inf loss on any rank stops every rank).
        """
        self._check_not_merged("train")
        model = self.model
        if ddp:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise RuntimeError("ddp=True needs an initialised torch.distributed process group (torchrun / "
                                   "accelerate launch, then torch.distributed.init_process_group)")
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(self.model)
            progress = progress and torch.distributed.get_rank() == 0
        return train_loop(model, batches, steps=steps, lr=lr, weight_decay=weight_decay,
                          grad_accum=grad_accum, max_grad_norm=max_grad_norm, progress=progress, seed=seed,
                          desc=desc)

    def trainer(self, train_dataset: Any, output_dir: str | os.PathLike, **training_args: Any):
        """A ``transformers.Trainer`` over the PEFT model (CPU unless CUDA is present, no reporting).

        Args:
            train_dataset: the training data set for the ``Trainer``.
            output_dir: the ``Trainer``'s output folder.
            **training_args: ``TrainingArguments`` overriding the defaults (batch size 2, lr 2e-4, one epoch).

        Returns:
            The ``Trainer``.

        Raises:
            RuntimeError: the adapter was merged (:meth:`merge`).
        """
        from transformers import Trainer, TrainingArguments

        self._check_not_merged("trainer")
        defaults = {"per_device_train_batch_size": 2, "learning_rate": 2e-4, "num_train_epochs": 1,
                    "report_to": [], "save_strategy": "no", "logging_steps": 10, "remove_unused_columns": False,
                    "use_cpu": not torch.cuda.is_available(), "disable_tqdm": False}
        defaults.update(training_args)
        args = TrainingArguments(output_dir=str(output_dir), **defaults)
        return Trainer(model=self.model, args=args, train_dataset=train_dataset)

    # ------------------------------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike) -> Path:
        """Save the adapter weights and the QLoRA settings (the base model is not saved).

        PEFT ``save_pretrained`` writes ``adapter_model.safetensors`` and ``adapter_config.json``; the settings, targets,
        NF4 module names and the dtypes of the base weights the adapter was built on (``base_dtypes``: an NF4 code
        depends on whether a weight was quantized from float32 or bfloat16) go to ``medquant_qlora.json``.

        Args:
            directory: the output folder (created if needed).

        Returns:
            The folder path.

        Raises:
            RuntimeError: the adapter was merged (:meth:`merge` removed the LoRA weights: an empty adapter would be
                written).
        """
        self._check_not_merged("save")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # bitsandbytes' Linear4bit._save_to_state_dict undoes its CPU packing (cpu_bf16_packing) in the module itself,
        # re-quantizing the absmax in the quant state's own fields: the packed weights and the state's fields are
        # put back afterwards, so saving changes no output (the adapter file holds only the LoRA weights)
        bnb = _bnb()
        packed = [(m.weight, m.weight.data, m.weight.quant_state, dict(vars(m.weight.quant_state)))
                  for m in self.model.modules() if isinstance(m, bnb.nn.Linear4bit)
                  and getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]
        try:
            self.model.save_pretrained(str(d))
        finally:
            for weight, data, state, fields in packed:
                vars(state).clear()
                vars(state).update(fields)
                weight.data, weight.quant_state = data, state
        tmp = d / (_CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps({"format": 1, "settings": self.settings, "targets": self.targets,
                                   "quantized": self.quantized, "base_dtypes": self.base_dtypes}, indent=2))
        os.replace(tmp, d / _CONFIG_FILE)
        return d

    @classmethod
    def load(cls, model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> QLoRAAdapter:
        """Re-create the adapter on a fresh float ``model`` of the same architecture from :meth:`save`'s folder.

        The base is NF4-quantized with the saved settings, then PEFT loads the adapter weights.

        Args:
            model: a float model of the architecture the adapter was trained on (modified in place).
            directory: the folder :meth:`save` wrote.
            is_trainable: load the adapter weights trainable (to continue training). The adapter is then in the mode
                ``model`` was in (eval for a ``from_pretrained`` model: outputs as the saved adapter's, no dropout);
                without it, in eval mode.

        Returns:
            The adapter.

        Raises:
            FileNotFoundError: the folder has no ``medquant_qlora.json``, no ``adapter_config.json`` or no adapter
                weights (``adapter_model.safetensors``, or PEFT's ``adapter_model.bin``); checked before the model
                is changed.
            ValueError: an unsupported settings format, the model's target modules differ from the saved ones, or
                its adapted / quantized layers hold weights of another dtype than the saved ``base_dtypes`` (a
                float32 base where the adapter was trained on bfloat16, or the reverse: the NF4 codes, and so the
                outputs, would differ from the trained model's); nothing is changed then. Files written before
                ``base_dtypes`` was recorded are loaded without this check.
        """
        from peft import PeftModel

        d = Path(directory)
        cfg_path = d / _CONFIG_FILE
        if not cfg_path.exists():
            raise FileNotFoundError(f"{d} has no {_CONFIG_FILE}; was it written by QLoRAAdapter.save?")
        meta = json.loads(cfg_path.read_text())
        if meta.get("format") != 1:
            raise ValueError(f"{cfg_path}: unsupported format {meta.get('format')!r} (this medquant reads 1)")
        for key in ("settings", "targets"):
            if key not in meta:
                raise ValueError(f"{cfg_path} has no {key!r} key (QLoRAAdapter.save writes format, settings and "
                                 "targets); the file is incomplete or was not written by QLoRAAdapter.save")
        if not isinstance(meta["settings"], dict) or "compute_dtype" not in meta["settings"]:
            raise ValueError(f"{cfg_path}: 'settings' must be an object of the adapter's settings with "
                             f"'compute_dtype' (as QLoRAAdapter.save writes), got {meta['settings']!r}"[:300])
        s = dict(meta["settings"])
        s["compute_dtype"] = getattr(torch, s["compute_dtype"])
        # compared before the model is quantized and wrapped: a refused load leaves it as it was given
        targets = resolve_targets(model, s.get("target_modules", DEFAULT_TARGETS), s.get("target_roles", ("language",)))
        if targets != meta["targets"]:
            raise ValueError(f"the model's target modules differ from the saved adapter's: {targets[:3]}... vs "
                             f"{meta['targets'][:3]}...; load it onto the architecture it was trained on")
        saved = meta.get("base_dtypes")  # absent in files of medquant before 7 December 2026: not checked
        if saved is not None:
            names = targets + [n for n in _role_modules(model, s.get("quantize_roles", ("language",)))
                               if isinstance(model.get_submodule(n), nn.Linear)] if s.get("quantize", True) \
                else targets
            have = _weight_dtypes(model.get_submodule(n) for n in dict.fromkeys(names))
            if have != saved:
                raise ValueError(
                    f"{cfg_path}: the adapter was trained on a base of {', '.join(saved)} weights, but the model's "
                    f"adapted / quantized layers hold {', '.join(have)} weights: its NF4 codes and its outputs "
                    f"would differ from the trained ones. Load the model as it was trained (from_pretrained(..., "
                    f"torch_dtype=torch.{saved[0]}), or model.to(torch.{saved[0]}))")
        # PEFT takes a folder without its files for a Hub repo id (an HFValidationError about the repo id's form)
        from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

        gone = [f for f in (CONFIG_NAME,) if not (d / f).is_file()]
        if not (d / SAFETENSORS_WEIGHTS_NAME).is_file() and not (d / WEIGHTS_NAME).is_file():
            gone.append(SAFETENSORS_WEIGHTS_NAME)
        if gone:
            raise FileNotFoundError(f"{d} has no {' and no '.join(gone)}: QLoRAAdapter.save writes them (PEFT's "
                                    f"save_pretrained) next to {_CONFIG_FILE}; the folder is incomplete")
        return cls(model, **s, _peft_model=lambda m: PeftModel.from_pretrained(m, str(d), is_trainable=is_trainable))

    # ------------------------------------------------------------------------------------------ deployment
    def merge(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Deployable float model: dequantize the NF4 base and fold the adapters in (PEFT ``merge_and_unload``).

        The adapter object is consumed (its PEFT model is unloaded): :meth:`train`, :meth:`trainer`, :meth:`save`,
        :meth:`merge` and :meth:`requantize` then raise ``RuntimeError`` (save the adapter first). See the module
        docstring on exactness.

        Args:
            dtype: the dtype of the whole merged model: the dequantized layers and every other floating-point
                parameter and buffer (embeddings, norms, head; ``merged.to(dtype)``), so that it runs as is.

        An adapted layer whose weight is shared with another module (an ``lm_head`` tied to the input embeddings)
        gets its own copy before ``B A`` is folded in, so the other module keeps its weight; the merged model then
        has untied embeddings (``config.tie_word_embeddings = False``, so saving and loading keep them apart).
        A float base of lower precision than ``dtype`` (bfloat16 base, ``quantize=False``, merged to float32) is
        merged in ``dtype``. An NF4 layer merged to a dtype narrower than float32 (bfloat16, float16) is merged in
        float32, one layer at a time, and rounded once: ``dtype(W_deq + s B A)``, as PEFT's ``merge_and_unload`` on
        the float32 dequantized base followed by ``.to(dtype)``.

        Returns:
            The merged model (no gradients, ``use_cache`` on in its config and text config).

        Raises:
            TypeError: ``dtype`` is not a floating-point ``torch.dtype`` (checked before anything is merged: the
                adapter is left as it was).
            RuntimeError: the adapter was merged already.
        """
        from peft.tuners.lora import LoraLayer

        self._check_not_merged("merge")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"merge needs a floating-point torch.dtype (torch.float32, torch.bfloat16, torch.float16, "
                            f"torch.float64), got {type(dtype).__name__} {dtype!r}")
        bnb = _bnb()
        uses: dict[int, int] = {}
        for _n, p in self.model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        for _name, mod in self.model.named_modules():
            if not isinstance(mod, LoraLayer):
                continue
            base = mod.get_base_layer()
            if isinstance(base, bnb.nn.Linear4bit):
                if torch.finfo(dtype).bits >= 32:
                    mod.base_layer = _dequantized_linear(base, dtype)
                    continue
                # a narrower dtype: W_deq + s B A in float32 for this layer now, rounded once to dtype (rounding
                # W_deq to dtype first, then adding the rounded delta, was off by an ulp); one layer at a time, so
                # the float32 copy never holds more than one layer
                mod.base_layer = _dequantized_linear(base, torch.float32)
                mod.merge()
                mod.base_layer.to(dtype)
                continue
            weight = getattr(base, "weight", None)
            if isinstance(weight, nn.Parameter) and uses.get(id(weight), 0) > 1:  # tied: fold into a copy only
                base.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point() \
                    and weight.element_size() < torch.empty((), dtype=dtype).element_size():
                mod.to(dtype)  # a bfloat16 base merged to float32: W + s B A computed in float32
        with warnings.catch_warnings():  # the NF4 layers merged above (a dtype narrower than float32) are unloaded
            warnings.filterwarnings("ignore", message="All adapters are already merged")
            merged = self.model.merge_and_unload()
        nf4_dequantize_(merged, dtype)
        merged.to(dtype)
        for p in merged.parameters():
            p.requires_grad_(False)
        _untie_config(merged)
        _set_use_cache(merged, True)
        self._merged = True
        return merged

    def requantize(self, config_or_map: Any, skip: Sequence[str] | None = None) -> nn.Module:
        """:meth:`merge`, then quantize the merged model with :func:`medquant.quant.quantize_`.

        Args:
            config_or_map: what :func:`medquant.quantize_` takes (a ``QuantConfig``, bit-width or pattern map).
            skip: patterns to keep in floating point.

        Returns:
            The merged, quantized model.

        Raises:
            RuntimeError: the adapter was merged already.
        """
        from ..quant import quantize_

        merged = self.merge()
        quantize_(merged, config_or_map, skip=skip)
        return merged


def train_loop(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], steps: int | None = None,
               lr: float = 2e-4, weight_decay: float = 0.0, grad_accum: int = 1,
               max_grad_norm: float | None = 1.0, progress: bool = True, seed: int | None = 0,
               desc: str = "train") -> list[float]:
    """AdamW over the parameters of ``model`` that require grad, ``grad_accum`` batches per step.

    A step takes the mean gradient of its batches (a last, shorter step too); the loop is
    :func:`medquant.training.train_steps` (see :meth:`QLoRAAdapter.train`). A ``DistributedDataParallel`` model trains over its process group: every pass ends
    on every rank of it as soon as one rank has no batch left (``stop_together``), so ranks with uneven numbers of
    batches take the same number of steps instead of one waiting in DDP's gradient all-reduce.

    Args:
        model: the model (its trainable parameters are optimised).
        batches: dicts of model inputs with ``labels``.
        steps: optimiser steps, repeating passes over ``batches`` as needed (a one-shot iterator ends the loop
            early when it runs out; default: one pass over ``batches``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_accum: batches per optimiser step.
        max_grad_norm: gradient clipping, the max global norm, > 0 (None: none).
        progress: show a progress bar.
        seed: seed set before training (None: leave the generator alone).
        desc: the progress bar's label.

    Returns:
        The loss of every optimiser step.

    Raises:
        ValueError: ``steps < 1``, ``grad_accum < 1``, ``max_grad_norm`` not > 0 (0 would zero every gradient, a
            negative value flip it: :func:`medquant.training.train_steps`), no trainable parameters, or ``batches``
            is empty (no step taken).
        FloatingPointError: the model returns no loss (batches without ``labels``), or a loss is NaN or infinite
            (on any rank: every rank of a DDP run stops at the same step, before its ``optimizer.step()``).
    """
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 (or None: one pass over batches), got {steps}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    if seed is not None:
        torch.manual_seed(seed)
    batches = list(batches) if steps is None else batches
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def step_loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        loss = model(**batch).loss
        if loss is None:
            raise FloatingPointError("the model returned no loss: the batches need 'labels'")
        # a NaN / inf loss is left to train_steps: under DDP it stops every rank at the same step (raising here,
        # before this rank's backward pass, left the other ranks waiting in DDP's gradient all-reduce)
        return loss, float(loss.detach())

    # steps given: passes over batches repeat until that many steps (as Distiller.fit); a one-shot iterator ends
    # early when exhausted
    # a DDP model: its process group stops the ranks together (uneven batches) and checks the losses
    # any other model trains in this process alone (no collective: one rank may train while the others do not)
    group = model.process_group if is_ddp(model) else None
    losses = train_steps(step_loss, batches, opt, params, epochs=None if steps is not None else 1, max_steps=steps,
                         grad_accum=grad_accum, grad_clip=max_grad_norm, group=group, local=not is_ddp(model),
                         model=model, progress=progress, desc=desc)
    opt.zero_grad(set_to_none=True)
    if not losses:
        raise ValueError("the training data is empty: no optimiser step was taken")
    return losses
