"""``medquant upgrade PATH`` and ``medquant verify PATH``: bring a checkpoint into today's form, or check it.

``upgrade`` checks that every PATH is a folder before it rewrites any, then rewrites each folder saved before
checkpoints had a manifest (by :func:`medquant.save` or :func:`medquant.hf.save_pretrained`) with
``medquant.manifest.json``, behind the crash-safe folder switch, after verifying what it can (the weights' SHA-256,
every recipe against the tensors); a folder that has its manifest is verified and left as it is, and says so;
``verify`` runs every check of a
load (the manifest, the schema, every recipe against the safetensors header) without building the model.
"""
from __future__ import annotations

from pathlib import Path


def _existing_folder(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        from ..io import atomic

        raise SystemExit(atomic.dangling_message(p) or f"{path}: no such folder")
    if not p.is_dir():
        raise SystemExit(f"{path}: not a folder (a checkpoint is a folder)")
    return p


def _upgrade(args) -> int:
    from ..io import upgrade
    from ..io.manifest import ManifestError, read_manifest

    folders = [_existing_folder(path) for path in args.paths]  # every PATH checked before any folder is rewritten
    for path, folder in zip(args.paths, folders):
        try:  # a folder with a valid manifest is verified and left as it is by upgrade
            current = read_manifest(folder) is not None
        except ManifestError:
            current = False
        upgrade(folder)
        print(f"{path}: " + ("already has its manifest (verified); left as it is" if current
                              else "upgraded (manifest written and verified)"))
    return 0


def _quantization_modules(path: str, folder: Path) -> dict:
    """``quantization_config.modules`` of a transformers folder saved by medquant, with a clear error for anything
    else (no ``config.json``, not a JSON object, no medquant ``quantization_config``, ``modules`` not an object)."""
    from ..io import META_NAME
    from .args import config_object

    config = folder / "config.json"
    not_ours = (f"{path}: not a medquant checkpoint: expected {META_NAME} (written by medquant.save) or a config.json "
                "with a medquant quantization_config (written by medquant.hf.save_pretrained)")
    if not config.exists():
        raise SystemExit(f"{not_ours}, and the folder has neither")
    qc = config_object(config).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "medquant":
        raise SystemExit(f"{not_ours}; {config} has no medquant quantization_config")
    modules = qc.get("modules") or {}
    if not isinstance(modules, dict):
        raise SystemExit(f"{config}: quantization_config.modules must be an object module name -> recipe, got "
                         f"{modules!r}"[:300])
    return modules


def _verify(args) -> int:
    import warnings

    from ..io import META_NAME, verify, verify_pretrained

    for path in args.paths:
        folder = _existing_folder(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if (folder / META_NAME).exists():
                verify(folder)
            else:
                verify_pretrained(folder, _quantization_modules(path, folder))
        notes = "; ".join(str(w.message) for w in caught)
        print(f"{path}: ok" + (f" ({notes})" if notes else ""))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("upgrade", help="rewrite an older checkpoint folder with a manifest",
                              description=__doc__)
    p.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint folder(s)")
    p.set_defaults(func=_upgrade)
    p = subparsers.add_parser("verify", help="check a checkpoint folder without loading it", description=__doc__)
    p.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint folder(s)")
    p.set_defaults(func=_verify)
