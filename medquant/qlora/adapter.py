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

import copy
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant.api import quantize_module, register_quantize_module_handler, swap_module
from ..training import train_steps

__all__ = [
    "DEFAULT_TARGETS",
    "NF4Config",
    "QLoRAAdapter",
    "nf4_dequantize_",
    "nf4_modules",
    "nf4_quantize_",
    "resolve_targets",
]

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_CONFIG_FILE = "medquant_qlora.json"


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise ImportError("QLoRA needs bitsandbytes (pip install bitsandbytes>=0.45)") from exc
    return bnb


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
    ``roles=()`` and regex targets) or when a target matches nothing.

    Args:
        model: the model.
        targets: last name components, or ``re:<regex>`` full-name patterns.
        roles: the model roles to search (``medquant.models.model_roles``).

    Returns:
        The full module names, target by target (each in model order, without repeats).

    Raises:
        ValueError: see above.
    """
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
            pat = re.compile(t[3:])
            hit = [n for n in linears if pat.fullmatch(n)]
        else:
            hit = [n for n in linears if n.rsplit(".", 1)[-1] == t]
        if not hit:
            raise ValueError(f"target {t!r} matches no nn.Linear in the {'/'.join(roles) or 'whole'} model; "
                             f"linear names there end in {sorted({n.rsplit('.', 1)[-1] for n in linears})}")
        chosen.extend(h for h in hit if h not in chosen)
    return chosen


def _roles_of(model: nn.Module) -> dict:
    from ..models import model_roles

    return model_roles(model)


@dataclass(frozen=True)
class NF4Config:
    """bitsandbytes 4-bit weights for ``nn.Linear`` layers (the handler registered for this type with
    :func:`medquant.quant.register_quantize_module_handler`; :func:`nf4_quantize_` applies it by name).

    Each block of 64 weights ``w`` is stored as 4-bit indices ``i`` into 16 levels ``q_i`` (NF4: quantiles of
    N(0, 1) normalised to [-1, 1]; FP4: a 4-bit float grid) and the block's absmax ``a``: ``w^ = q_i * a``;
    ``double_quant`` quantizes the absmax constants to 8 bits in turn. ``compute_dtype`` is the dtype the
    forward pass dequantizes to. ``cpu_bf16_packing``: see :func:`nf4_quantize_`.
    """

    compute_dtype: torch.dtype = torch.float32
    double_quant: bool = True
    quant_type: str = "nf4"
    cpu_bf16_packing: bool = False

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be torch.float32, bfloat16 or float16, got {self.compute_dtype}")


@register_quantize_module_handler(NF4Config, (nn.Linear,))
def _nf4_linear(mod: nn.Linear, cfg: NF4Config) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``mod``'s weight, quantized on the weight's device."""
    bnb = _bnb()
    w = mod.weight.detach()
    device = w.device
    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                          compute_dtype=cfg.compute_dtype, compress_statistics=cfg.double_quant,
                          quant_type=cfg.quant_type, device="meta")
    q.weight = bnb.nn.Params4bit(w.to(torch.float32 if w.dtype == torch.float64 else w.dtype).cpu().clone(),
                                 requires_grad=False, compress_statistics=cfg.double_quant,
                                 quant_type=cfg.quant_type)
    if mod.bias is not None:
        q.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
    q = q.to(device)
    if hasattr(q, "support_avx512bf16_for_cpu"):
        q.support_avx512bf16_for_cpu = bool(q.support_avx512bf16_for_cpu and cfg.cpu_bf16_packing)
    return q


def nf4_quantize_(model: nn.Module, names: Iterable[str], compute_dtype: torch.dtype = torch.float32,
                  double_quant: bool = True, quant_type: str = "nf4", cpu_bf16_packing: bool = False) -> list[str]:
    """Replace the named ``nn.Linear`` modules by bitsandbytes ``Linear4bit`` holding their quantized weights
    (:class:`NF4Config` through :func:`medquant.quant.quantize_module` and :func:`medquant.quant.swap_module`).

    The weight is wrapped in ``bnb.nn.Params4bit`` and quantized when the module is moved to the weight's
    device (bitsandbytes quantizes on ``.to(device)``, CPU included). Biases stay float and frozen.

    ``cpu_bf16_packing``: on CPUs with AVX512-BF16, bitsandbytes (0.50 here) repacks a ``Linear4bit`` weight at its
    first inference call (eval mode, no grad) into a CPU kernel layout whose block absmax is rounded to bfloat16
    and whose matmul runs in bfloat16. That is faster, but the outputs then depend on the CPU model and differ
    from training-mode outputs. Off by default, so results are the same on every CPU; ``True`` allows it.
    Returns the names replaced.

    Args:
        model: the model (modified in place).
        names: full names of the ``nn.Linear`` modules to quantize.
        compute_dtype: dtype the NF4 layers dequantize to for their matmul.
        double_quant: quantize the block constants too (bitsandbytes double quantization).
        quant_type: ``"nf4"`` or ``"fp4"``.
        cpu_bf16_packing: see above.

    Returns:
        The names of the quantized modules.
    """
    bnb = _bnb()
    cfg = NF4Config(compute_dtype, double_quant, quant_type, cpu_bf16_packing)
    done = []
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, bnb.nn.Linear4bit):
            continue
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{name} is {type(mod).__name__}, not nn.Linear; only Linear layers are NF4-quantized")
        swap_module(model, name, quantize_module(mod, cfg))
        done.append(name)
    return done


def nf4_modules(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes ``Linear4bit`` modules in ``model``.

    Args:
        model: the model.

    Returns:
        The module names.
    """
    bnb = _bnb()
    return [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def _canonical_4bit(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """``(data, quant_state)`` in bitsandbytes' standard layout, undoing its AVX512-BF16 CPU packing (see
    :func:`nf4_quantize_`) without changing the values: the packed state's bfloat16 absmax is used as it is
    (bitsandbytes' own inverse re-quantizes it when double quantization was on). The module is not modified."""
    if not getattr(state, "packing_format_for_cpu", False):
        return data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    st = copy.copy(state)  # shallow: the inverse reassigns fields, never mutates the tensors
    st.original_nested = False  # keep the (bf16) absmax instead of re-quantizing it
    qweight, st = _convert_weight_packed_for_cpu_inverse(data, st)
    st.absmax = state.absmax.T.reshape(-1).float()  # packed as (K / blocksize, N); standard: flat, per block
    st.nested, st.offset, st.state2 = False, None, None
    st.dtype = getattr(state, "original_dtype", torch.float32)
    return qweight, st


def _dequantized_linear(q: nn.Module, dtype: torch.dtype) -> nn.Linear:
    bnb = _bnb()
    data, state = _canonical_4bit(q.weight.data, q.weight.quant_state)
    w = bnb.functional.dequantize_4bit(data, state).to(dtype)
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if q.bias is not None:
            lin.bias.copy_(q.bias.to(dtype))
    return lin


def nf4_dequantize_(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every ``Linear4bit`` in ``model`` by an ``nn.Linear`` holding its dequantized weight.

    Args:
        model: the model (modified in place).
        dtype: dtype of the float weights.

    Returns:
        The names of the replaced modules.
    """
    names = nf4_modules(model)
    for name in names:
        swap_module(model, name, _dequantized_linear(model.get_submodule(name), dtype))
    return names


class QLoRAAdapter:
    """Wrap a Hugging Face model for (Q)LoRA fine-tuning. The model is modified in place.

    Args:
        model: a transformers model (any zoo architecture, or a real LM such as SmolLM2).
        r, lora_alpha, lora_dropout, use_rslora: PEFT LoRA settings (defaults r=16, alpha=16, dropout 0.1,
            rsLoRA: scaling ``alpha / sqrt(r)``).
        target_modules: last name components (or ``re:`` patterns) of the Linear layers to adapt, resolved
            inside ``target_roles`` (default the language model's q/k/v/o and gate/up/down projections).
        quantize: ``True`` -> NF4 base (QLoRA); ``False`` -> float base (plain LoRA).
        quantize_roles: roles whose ``nn.Linear`` layers become NF4 (default ``("language",)``); add
            ``"vision"`` / ``"projector"`` to quantize those too.
        compute_dtype: dtype the NF4 layers dequantize to (float32 or bfloat16).
        double_quant: double quantization of the NF4 block constants.
        cpu_bf16_packing: let bitsandbytes repack NF4 weights for its AVX512-BF16 CPU kernel at the first
            inference call (faster on such CPUs, bfloat16 absmax and matmul, CPU-dependent outputs); off by
            default (see :func:`nf4_quantize_`). :meth:`merge` handles either layout.

    Attributes:
        model: the ``peft.PeftModel``; ``targets``: adapted module names; ``quantized``: NF4 module names.
    """

    def __init__(self, model: nn.Module, r: int = 16, lora_alpha: float = 16.0, lora_dropout: float = 0.1,
                 use_rslora: bool = True, target_modules: Sequence[str] = DEFAULT_TARGETS,
                 target_roles: Sequence[str] = ("language",), quantize: bool = True,
                 quantize_roles: Sequence[str] = ("language",), compute_dtype: torch.dtype = torch.float32,
                 double_quant: bool = True, quant_type: str = "nf4", cpu_bf16_packing: bool = False,
                 _peft_model: Any = None) -> None:
        from peft import LoraConfig, get_peft_model

        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if lora_alpha <= 0 or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be positive and finite, got {lora_alpha}")
        self.settings = {"r": r, "lora_alpha": float(lora_alpha), "lora_dropout": float(lora_dropout),
                         "use_rslora": bool(use_rslora), "target_modules": list(target_modules),
                         "target_roles": list(target_roles), "quantize": bool(quantize),
                         "quantize_roles": list(quantize_roles), "compute_dtype": str(compute_dtype).split(".")[-1],
                         "double_quant": bool(double_quant), "quant_type": quant_type,
                         "cpu_bf16_packing": bool(cpu_bf16_packing)}
        self.targets = resolve_targets(model, target_modules, target_roles)
        self.quantized: list[str] = []
        if quantize:
            names = [n for n in _role_modules(model, quantize_roles)
                     if isinstance(model.get_submodule(n), nn.Linear)]
            self.quantized = nf4_quantize_(model, names, compute_dtype, double_quant, quant_type, cpu_bf16_packing)
        for p in model.parameters():
            p.requires_grad_(False)
        if _peft_model is not None:
            self.model = _peft_model(model)
        else:
            cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                             target_modules=list(self.targets), bias="none")
            self.model = get_peft_model(model, cfg)
        if hasattr(model, "config"):
            model.config.use_cache = False

    # ------------------------------------------------------------------------------------------ info
    @property
    def scaling(self) -> float:
        """LoRA scaling: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
        s = self.settings
        return s["lora_alpha"] / (math.sqrt(s["r"]) if s["use_rslora"] else s["r"])

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter that trains (the LoRA matrices)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def num_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts (NF4 weights counted by stored elements x 2)."""
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        total = 0
        for p in self.model.parameters():
            total += p.numel() * (2 if p.dtype == torch.uint8 else 1)
        return trainable, total

    # ------------------------------------------------------------------------------------------ training
    def train(self, batches: Iterable[dict[str, torch.Tensor]], steps: int | None = None, lr: float = 2e-4,
              weight_decay: float = 0.0, grad_accum: int = 1, max_grad_norm: float | None = 1.0,
              progress: bool = True, seed: int | None = 0, desc: str = "qlora", ddp: bool = False) -> list[float]:
        """Plain AdamW loop over ``batches`` (dicts for ``model(**batch)`` with ``labels``); returns the losses.

        ``steps`` limits the number of optimizer steps (default: one pass over ``batches``); each step
        accumulates ``grad_accum`` batches. Shows a tqdm bar unless ``progress=False``.

        ``ddp=True`` (an initialised ``torch.distributed`` process group is needed): trains through
        ``DistributedDataParallel(self.model)``, so the LoRA gradients are averaged over ranks; give each rank its
        share of every batch. With equal per-rank token counts this is the single-process step on the union (the
        model's loss is a mean over the rank's tokens). Every rank must run the same number of steps.
        """
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
        """A ``transformers.Trainer`` over the PEFT model (CPU unless CUDA is present, no reporting)."""
        from transformers import Trainer, TrainingArguments

        defaults = {"per_device_train_batch_size": 2, "learning_rate": 2e-4, "num_train_epochs": 1,
                    "report_to": [], "save_strategy": "no", "logging_steps": 10, "remove_unused_columns": False,
                    "use_cpu": not torch.cuda.is_available(), "disable_tqdm": False}
        defaults.update(training_args)
        args = TrainingArguments(output_dir=str(output_dir), **defaults)
        return Trainer(model=self.model, args=args, train_dataset=train_dataset)

    # ------------------------------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike) -> Path:
        """Save the adapter weights (PEFT ``save_pretrained``: ``adapter_model.safetensors`` +
        ``adapter_config.json``) and the QLoRA settings (``medquant_qlora.json``). The base is not saved."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(d))
        tmp = d / (_CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps({"format": 1, "settings": self.settings, "targets": self.targets,
                                   "quantized": self.quantized}, indent=2))
        os.replace(tmp, d / _CONFIG_FILE)
        return d

    @classmethod
    def load(cls, model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> QLoRAAdapter:
        """Re-create the adapter on a fresh float ``model`` of the same architecture from :meth:`save`'s folder:
        the base is NF4-quantized with the saved settings, then PEFT loads the adapter weights."""
        from peft import PeftModel

        d = Path(directory)
        cfg_path = d / _CONFIG_FILE
        if not cfg_path.exists():
            raise FileNotFoundError(f"{d} has no {_CONFIG_FILE}; was it written by QLoRAAdapter.save?")
        meta = json.loads(cfg_path.read_text())
        if meta.get("format") != 1:
            raise ValueError(f"{cfg_path}: unsupported format {meta.get('format')!r} (this medquant reads 1)")
        s = dict(meta["settings"])
        s["compute_dtype"] = getattr(torch, s["compute_dtype"])
        ad = cls(model, **s, _peft_model=lambda m: PeftModel.from_pretrained(m, str(d), is_trainable=is_trainable))
        if ad.targets != meta["targets"]:
            raise ValueError(f"the model's target modules differ from the saved adapter's: {ad.targets[:3]}... vs "
                             f"{meta['targets'][:3]}...; load it onto the architecture it was trained on")
        return ad

    # ------------------------------------------------------------------------------------------ deployment
    def merge(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Deployable float model: dequantize the NF4 base, fold the adapters in (PEFT ``merge_and_unload``).

        The adapter object is consumed (its PEFT model is unloaded). See the module doc on exactness.
        """
        from peft.tuners.lora import LoraLayer

        bnb = _bnb()
        for _name, mod in self.model.named_modules():
            if isinstance(mod, LoraLayer) and isinstance(mod.get_base_layer(), bnb.nn.Linear4bit):
                mod.base_layer = _dequantized_linear(mod.get_base_layer(), dtype)
        merged = self.model.merge_and_unload()
        nf4_dequantize_(merged, dtype)
        for p in merged.parameters():
            p.requires_grad_(False)
        if hasattr(merged, "config"):
            merged.config.use_cache = True
        return merged

    def requantize(self, config_or_map: Any, skip: Sequence[str] | None = None) -> nn.Module:
        """:meth:`merge`, then quantize the merged model with medquant's :func:`medquant.quant.quantize_`."""
        from ..quant import quantize_

        merged = self.merge()
        quantize_(merged, config_or_map, skip=skip)
        return merged


def train_loop(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], steps: int | None = None,
               lr: float = 2e-4, weight_decay: float = 0.0, grad_accum: int = 1,
               max_grad_norm: float | None = 1.0, progress: bool = True, seed: int | None = 0,
               desc: str = "train") -> list[float]:
    """AdamW over the parameters of ``model`` that require grad, ``grad_accum`` batches per step (each loss divided
    by ``grad_accum``), through :func:`medquant.training.train_steps`; see :meth:`QLoRAAdapter.train`.

    Args:
        model: the model (its trainable parameters are optimised).
        batches: dicts of model inputs with ``labels``.
        steps: optimiser steps (default: one pass over ``batches``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_accum: batches per optimiser step.
        max_grad_norm: gradient clipping (None: none).
        progress: show a progress bar.
        seed: seed set before training (None: leave the generator alone).
        desc: the progress bar's label.

    Returns:
        The loss of every optimiser step.
    """
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
        if loss is None or not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss}; check labels and learning rate")
        return loss, float(loss.detach())

    losses = train_steps(step_loss, batches, opt, params, max_steps=steps, grad_accum=grad_accum,
                         grad_clip=max_grad_norm, model=model, progress=progress, desc=desc)
    opt.zero_grad(set_to_none=True)
    return losses
