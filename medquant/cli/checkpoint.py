"""``medquant upgrade PATH`` and ``medquant verify PATH``: bring a checkpoint into today's form, or check it.

``upgrade`` rewrites a folder saved before checkpoints had a manifest (by :func:`medquant.save` or
:func:`medquant.hf.save_pretrained`) with ``medquant.manifest.json``, behind the crash-safe folder switch, after
verifying what it can (the weights' SHA-256, every recipe against the tensors); ``verify`` runs every check of a
load (the manifest, the schema, every recipe against the safetensors header) without building the model.
"""
from __future__ import annotations

from pathlib import Path


def _existing_folder(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"{path}: no such folder")
    if not p.is_dir():
        raise SystemExit(f"{path}: not a folder (a checkpoint is a folder)")
    return p


def _upgrade(args) -> int:
    from ..io import upgrade

    for path in args.paths:
        upgrade(_existing_folder(path))
        print(f"{path}: upgraded (manifest written and verified)")
    return 0


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
                import json

                qc = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config")
                if not isinstance(qc, dict) or qc.get("quant_method") != "medquant":
                    raise SystemExit(f"{path}: not a medquant checkpoint (no {META_NAME}, no medquant "
                                     "quantization_config in config.json)")
                verify_pretrained(folder, qc.get("modules") or {})
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
