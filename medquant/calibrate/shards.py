"""Block-sharded sequential quantization over several processes.

``quantize_shard`` splits the blocks of a model between processes (``torchrun`` / ``accelerate launch`` set
``RANK`` and ``WORLD_SIZE``): each process streams only its blocks from the float checkpoint, quantizes them
(:func:`medquant.calibrate.sequential.quantize_sequential`) and writes them to its own safetensors shard, with the recipe
of every quantized layer in the shard's metadata; rank 0 also takes the modules outside the blocks
(embeddings, norms, ``lm_head``). No process ever holds more than its share of the quantized model plus one
float block, and no communication is needed. ``assemble_shards`` rebuilds the full quantized model from the
shards into a meta skeleton; the result is bit-identical to ``quantize_`` of the whole float model.

Recipe (2 processes on one machine, CPU or one GPU each)::

    torchrun --nproc_per_node 2 quantize.py      # or: accelerate launch --num_processes 2 quantize.py

    # quantize.py
    from accelerate import init_empty_weights
    from medquant.calibrate import assemble_shards, quantize_shard
    from medquant.distributed import barrier, rank
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    quantize_shard(model, QuantConfig(4), checkpoint="float_ckpt/", out_dir="shards/")
    barrier()                                         # no-op without an initialised process group
    if rank() == 0:
        with init_empty_weights():
            full = AutoModelForCausalLM.from_config(config)
        assemble_shards(full, "shards/")
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..distributed import rank as _rank
from ..distributed import world_size as _world_size
from ..models.blocks import block_stacks
from ..quant.api import resolve_configs, swap_module
from ..quant.config import QuantConfig
from ..quant.experts import expand_recorded_experts
from ..quant.modules import QUANT_LAYERS, QUANT_MODULES
from ..quant.recipe import bit_map_matches, layer_from_recipe, model_recipe
from .sequential import CheckpointSource, _aliases, _quantize_sequential

__all__ = ["SHARD_PATTERN", "assemble_shards", "quantize_shard", "shard_blocks"]

SHARD_PATTERN = "medquant-shard-{rank:05d}-of-{world:05d}.safetensors"
_RECIPE_KEY = "medquant_recipe"


def shard_blocks(blocks: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The blocks of ``rank``: contiguous runs of ``ceil(n / world_size)`` blocks (rank 0 the first ones).

    Args:
        blocks: every block name, in forward order.
        rank: this process's rank, in ``[0, world_size)``.
        world_size: number of processes, at least 1.

    Returns:
        ``blocks[rank * p:(rank + 1) * p]`` with ``p = ceil(len(blocks) / world_size)`` (empty for the last ranks
        when there are fewer blocks than processes).

    Raises:
        ValueError: ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, "
                         f"world_size={world_size}")
    n = len(blocks)
    per = -(-n // world_size)
    return list(blocks[rank * per:(rank + 1) * per])


def _check_rank(r: int | None, w: int | None) -> tuple[int, int]:
    r = _rank() if r is None else r
    w = _world_size() if w is None else w
    shard_blocks([], r, w)  # validates
    return r, w


def quantize_shard(
    model: nn.Module,
    config_or_map: QuantConfig | int | Mapping[str, QuantConfig | int | None],
    checkpoint: str | os.PathLike | CheckpointSource,
    out_dir: str | os.PathLike,
    *,
    skip: Iterable[str] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    device: str | torch.device | None = None,
    blocks: Sequence[str] | None = None,
    progress: bool = False,
) -> Path:
    """Quantize this process's share of ``model``'s blocks from the float ``checkpoint`` and write it to a shard.

    Rank 0 also quantizes everything outside the blocks. The plan is :func:`medquant.quantize_`'s (MoE experts with
    3-D weights quantized per expert, routers left in float), resolved on the whole model by every rank. The shard is
    ``out_dir/medquant-shard-RRRRR-of-WWWWW.safetensors``, with the layer recipes in its metadata; blocks are
    split with :func:`shard_blocks`.

    Args:
        model: a meta skeleton (built under ``accelerate.init_empty_weights()``).
        config_or_map: one config or configs by pattern, as :func:`medquant.quantize_`.
        checkpoint: the float weights (safetensors file / folder / :class:`CheckpointSource`).
        out_dir: the folder every rank writes its shard to.
        skip: patterns left in float.
        rank: this process's rank (default the process group's, else ``$RANK``).
        world_size: number of processes (default the process group's, else ``$WORLD_SIZE``).
        device: compute device of one block.
        blocks: the block names to split (default :func:`medquant.models.block_stacks`).
        progress: tqdm bar over blocks.

    Returns:
        The path of the shard written.

    Raises:
        ValueError: an invalid rank / world size, or no blocks found.
    """
    from safetensors.torch import save_file

    r, w = _check_rank(rank, world_size)
    all_blocks = list(blocks) if blocks is not None else [b for g in block_stacks(model) for b in g]
    if not all_blocks:
        raise ValueError(f"found no blocks in {type(model).__name__}: pass blocks=[...]")
    mine = shard_blocks(all_blocks, r, w)
    # rank 0 processes the rest; every rank resolves the plan on the full model, so patterns mean the same;
    # quantize_'s plan: MoE experts with 3-D weights quantized per expert, routers float
    plan = resolve_configs(model, config_or_map, skip=skip, experts=True)
    others = tuple(b + "." for b in all_blocks if b not in mine)
    plan = {n: c for n, c in plan.items() if not (n + ".").startswith(others)}  # the other ranks' layers
    if mine:  # the other ranks' blocks are not read (rank 0 would else load them as modules outside its blocks)
        _quantize_sequential(model, plan, skip=None, device=device, offload_device="cpu", checkpoint=checkpoint,
                             blocks=[mine], process_rest=(r == 0), progress=progress,
                             foreign=[b for b in all_blocks if b not in mine])
    elif r == 0:
        raise ValueError("rank 0 received no block")
    prefixes = tuple(b + "." for b in mine)
    keep_rest = r == 0
    block_prefixes = tuple(b + "." for b in all_blocks)
    tensors = {}
    for k, t in model.state_dict().items():
        ours = k.startswith(prefixes) or (keep_rest and not k.startswith(block_prefixes))
        if ours:
            if t.device.type == "meta":
                raise RuntimeError(f"{k} is still on the meta device after quantizing shard {r}")
            tensors[k] = t.detach().to("cpu").contiguous()
    recipe = {n: e for n, e in model_recipe(model, weight_dtype=True).items()
              if (n + ".").startswith(prefixes) or (keep_rest and not (n + ".").startswith(block_prefixes))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SHARD_PATTERN.format(rank=r, world=w)
    tmp = path.with_suffix(".tmp")
    save_file(_dedup(tensors), str(tmp), metadata={_RECIPE_KEY: json.dumps(recipe), "format": "pt"})
    os.replace(tmp, path)
    return path


def _dedup(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: clone tensors that share memory with an earlier one."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[k] = t.clone() if key in seen and t.numel() else t
        seen.add(key)
    return out


def _module(model: nn.Module, name: str, f: Path, what: str) -> nn.Module:
    """The submodule ``name`` of ``model`` (``""``: the model), which shard ``f`` needs for ``what``.

    Raises:
        ValueError: the model has no such module (a skeleton of another architecture or size than the shards').
    """
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise ValueError(f"shard {f.name} holds {what!r}, but the model has no module {name!r}: the skeleton must "
                         f"be the architecture the shards were made from ({type(model).__name__} here; another "
                         "number of layers, or another model?)") from None


def assemble_shards(model: nn.Module, shard_dir: str | os.PathLike) -> nn.Module:
    """Fill a meta skeleton with the quantized shards written by :func:`quantize_shard` (all ranks), in place.

    Tied tensors (names the skeleton binds to one tensor, or a Hugging Face model's tied-weight keys:
    ``lm_head.weight`` and ``embed_tokens.weight`` where ``lm_head`` stays in float) come back as one tensor under
    all their names, as :func:`medquant.quantize_` leaves them on the float model.

    Args:
        model: the meta skeleton (the same architecture the shards were made from).
        shard_dir: the folder holding every rank's ``medquant-shard-*-of-*.safetensors``.

    Returns:
        ``model``, with the quantized layers and all other tensors loaded.

    Raises:
        FileNotFoundError: no shard in ``shard_dir``.
        ValueError: an incomplete or mixed set of shards, an invalid recipe, a layer or tensor the model has no
            module or slot for (a skeleton of another architecture or size; the skeleton is then partly filled:
            build a new one), tensors still missing after every shard, a buffer left on the meta device that no
            shard holds (a non-persistent buffer of a skeleton built under ``torch.device("meta")``), a stored bit
            map that disagrees with its recipe, or tied names (one tensor of the skeleton) whose stored values
            differ.
    """
    from safetensors import safe_open

    shard_dir = Path(shard_dir)
    files = sorted(shard_dir.glob("medquant-shard-*-of-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no medquant shards in {shard_dir}")
    worlds = {f.name.rsplit("-of-", 1)[1].split(".")[0] for f in files}
    if len(worlds) != 1 or len(files) != int(worlds.pop()):
        raise ValueError(f"{shard_dir} holds an incomplete or mixed set of shards: {[f.name for f in files]}")
    loaded: set[str] = set()
    filled: dict[str, torch.Tensor] = {}  # name -> the tensor loaded under it
    aliases = _aliases(model)  # tied names: one tensor object, or Hugging Face's tied-weight keys
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            recipe = json.loads((h.metadata() or {}).get(_RECIPE_KEY, "{}"))
            expand_recorded_experts(model, recipe)  # MoE experts: their per-expert layers become modules
            for name, entry in recipe.items():
                try:
                    shell = layer_from_recipe(entry)
                except ValueError as e:
                    raise ValueError(f"shard {f.name}: the recipe of {name!r} is invalid: {e}") from None
                _module(model, name.rpartition(".")[0], f, name)  # its parent: the skeleton must have it
                swap_module(model, name, shell)
            for key in h.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                mod_name, _, tname = key.rpartition(".")
                mod = _module(model, mod_name, f, key)
                t = h.get_tensor(key)
                if tname not in mod._parameters and tname not in mod._buffers:
                    raise ValueError(f"shard {f.name} holds {key!r}, which the model has no slot for")
                # a tensor tied to one already loaded (another name of it) is bound as that one: they stay tied
                tied = next((filled[a] for a in aliases.get(key, ()) if a in filled), None)
                if tied is not None and not (tied.shape == t.shape and tied.dtype == t.dtype and torch.equal(tied, t)):
                    raise ValueError(f"shard {f.name}: {key!r} is tied to another tensor of the model (one tensor "
                                     "under several names) but the shards store different values for them")
                if tname in mod._parameters:
                    old = mod._parameters[tname]
                    new = tied if isinstance(tied, nn.Parameter) else nn.Parameter(
                        t, requires_grad=old.requires_grad if old is not None else True)
                    mod._parameters[tname] = new
                else:
                    new = tied if tied is not None else t
                    mod._buffers[tname] = new
                filled[key] = new
                loaded.add(key)
    left = [k for k, t in model.state_dict().items() if t.device.type == "meta" and k not in loaded]
    if left:
        raise ValueError(f"the shards do not cover the model: {left[:5]} are missing")
    # the buffers no state dict holds (non-persistent: rotary inv_freq) are never in a shard: they must be real
    unsaved = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if unsaved:
        raise ValueError(f"the skeleton's buffers {unsaved[:5]} are on the meta device and are not saved in any "
                         "shard (non-persistent buffers, computed when the model is built): build the skeleton "
                         "with accelerate.init_empty_weights(), which keeps buffers real, not under "
                         "torch.device('meta') or init_empty_weights(include_buffers=True)")
    for name, m in model.named_modules():
        if isinstance(m, QUANT_MODULES) and not bit_map_matches(m):
            raise ValueError(f"module {name!r}: the stored bit map disagrees with its recipe in the shard")
        if isinstance(m, QUANT_LAYERS):
            m.refresh_kernels()  # its tensors were replaced above: its compute dtype goes to the new ones
    return model
