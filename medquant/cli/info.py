"""``medquant info``: the layers, bits, scale scope / group, bytes and roles of a saved medquant checkpoint.

Example::

    medquant info out/            # a per-layer table and totals
    medquant info out/ --json

Both checkpoint forms are read: :func:`medquant.save` folders (``medquant.json``; those with a pruning shape table,
written by ``medquant prune`` / ``medquant pipeline``, are rebuilt with their per-layer shapes by
:func:`medquant.prune.load_pruned`) and :func:`medquant.hf.save_pretrained` folders (``config.json`` with a medquant
``quantization_config``). The model is loaded (checked against its manifest) but never run; the numbers are :func:`medquant.quant.size.layer_table` and
:func:`medquant.quant.size.model_size`, with each quantized layer's recipe (scheme, scope, group size). The summary
line's "N of M weight layers" counts the rows of that table: every Linear / convolution / ``Conv1D``, quantized
embedding, ``nn.MultiheadAttention`` in-projection and float experts module.
"""
from __future__ import annotations

import json
from pathlib import Path

from .args import config_object, existing_folder, hf_config_file, refuse_remote_code, trusts_remote_code
from .prune import folder_tokenizer, model_class


def _pruned(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint with a pruning shape table (:func:`medquant.prune.save_pruned`: the
    output of ``medquant prune`` / ``medquant pipeline``), whose layers may differ in width from block to block."""
    from ..io import META_NAME

    try:
        meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    extras = meta.get("extras") if isinstance(meta, dict) else None
    return isinstance(extras, dict) and isinstance(extras.get("prune"), dict)


def load_hf_folder(path: str, *, trust_remote_code: bool | None = None):
    """A Hugging Face model folder as saved (float or medquant-quantized; dtypes kept), in eval mode, and its
    tokenizer (``None`` when there is none; ``pad_token`` = ``eos_token`` when unset). A pruned checkpoint
    (``medquant prune`` / ``pipeline`` output) is rebuilt with its per-layer shapes by
    :func:`medquant.prune.load_pruned`, which ``from_pretrained`` cannot do when the blocks differ in width. A folder
    without ``config.json`` is a one-line ``SystemExit`` naming it, and so is one whose loading runs its own code
    unless ``trust_remote_code`` (``None``: the command's ``--trust-remote-code``), before any of it runs."""
    import os

    trust = trusts_remote_code(trust_remote_code)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    from ..hf import register

    register()
    if _pruned(Path(path)):
        from ..prune import load_pruned

        refuse_remote_code(path, trust)
        model = load_pruned(path, trust_remote_code=trust).eval()
    else:
        hf_config_file(path, trust)
        # trust_remote_code never None: transformers would ask on the terminal; the folder was checked above
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        model = model_class(cfg).from_pretrained(path, trust_remote_code=trust).eval()
    return model, folder_tokenizer(path, trust_remote_code=trust)


def load_checkpoint(path: str, *, trust_remote_code: bool | None = None):
    """The model of a :func:`medquant.save` (:func:`medquant.prune.save_pruned` included) or
    :func:`medquant.hf.save_pretrained` folder; one whose class is the folder's own code only with
    ``trust_remote_code`` (``None``: the command's ``--trust-remote-code``; a one-line ``SystemExit`` otherwise)."""
    folder = Path(path)
    trust = trusts_remote_code(trust_remote_code)
    if (folder / "medquant.json").is_file():
        from ..io import load
        from ..prune import load_pruned

        refuse_remote_code(path, trust)
        if _pruned(folder):
            return load_pruned(folder, trust_remote_code=trust)
        return load(folder, trust_remote_code=trust)
    cfg_file = folder / "config.json"
    qcfg = config_object(cfg_file).get("quantization_config") if cfg_file.is_file() else None
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "medquant":
        raise SystemExit(f"{path}: not a medquant checkpoint (no medquant.json, no config.json with a medquant "
                         "quantization_config)")
    return load_hf_folder(path, trust_remote_code=trust)[0]


def _symmetric(module, cfg: dict) -> bool | None:
    """A quantized layer's scheme: its recipe's ``symmetric`` when set, else what ``symmetric=None`` picks for its
    bit-widths (:meth:`medquant.QuantConfig.is_symmetric`: asymmetric at <= 3 bits, symmetric above); None when
    its rows' bit-widths take both schemes (or the layer says nothing of them)."""
    if cfg.get("symmetric") is not None:
        return bool(cfg["symmetric"])
    config, widths = getattr(module, "config", None), getattr(module, "bit_groups", None)
    if config is None or not widths or not hasattr(config, "is_symmetric"):
        return None
    schemes = {bool(config.is_symmetric(int(b))) for b in widths if int(b) > 0}
    return schemes.pop() if len(schemes) == 1 else None


def info(model) -> dict:
    """Per-layer rows (name, type, shape, bits, scheme, scope, group size, bytes, role) and totals.

    A quantized layer's ``symmetric`` is its scheme as stored: the recipe's choice, or, where the recipe left it
    to the bit-width (``symmetric=None``), the scheme that bit-width takes (asymmetric at <= 3 bits, symmetric
    above); None for a float layer, and for a layer whose rows' bit-widths take both schemes."""
    from ..models.introspect import role_of
    from ..quant.recipe import model_recipe
    from ..quant.size import layer_table, model_size

    recipe = model_recipe(model)
    rows = []
    for row in layer_table(model):
        cfg = (recipe.get(row["name"]) or {}).get("config") or {}
        try:
            role = role_of(model, row["name"])
        except (ValueError, KeyError, TypeError):
            role = None
        quantized = row["name"] in recipe
        symmetric = _symmetric(model.get_submodule(row["name"]), cfg) if quantized else None
        rows.append({**row, "quantized": quantized, "symmetric": symmetric,
                     "scope": cfg.get("scope"), "group_size": cfg.get("group_size") if cfg.get("scope") == "group"
                     else None, "role": role})
    return {"class": type(model).__name__, "layers": rows, "totals": model_size(model).as_dict(),
            "layers_quantized": sum(r["quantized"] for r in rows), "layers_total": len(rows)}


def run(args) -> int:
    report = info(load_checkpoint(args.checkpoint, trust_remote_code=args.trust_remote_code))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print("| layer | type | shape | bits | scope | group | bytes | role |\n|---|---|---|---|---|---|---|---|")
    for r in report["layers"]:
        print(f"| {r['name']} | {r['type']} | {r['shape'][0]}x{r['shape'][1]} | {r['bits']} | {r['scope'] or '-'} | "
              f"{r['group_size'] or '-'} | {r['bytes']:,} | {r['role'] or '-'} |")
    t = report["totals"]
    print(f"{report['class']}: {report['layers_quantized']} of {report['layers_total']} weight layers "
          f"quantized, average bits {t['effective_bits']:.3f}, weight-layer bytes "
          f"{t['linear_weight_bytes']:,}, total bytes {t['total_bytes']:,} ({t['total_mb']:.2f} MiB)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="layers, bits, scope/group, bytes and roles of a saved medquant checkpoint",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=existing_folder,
                   help="a folder saved by medquant.save or medquant.hf.save_pretrained")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
