"""``medquant export``: write a saved medquant model in the format a serving runtime reads.

Example::

    medquant export out/ served/ --format compressed-tensors     # vLLM / SGLang / transformers folder
    vllm serve served/
    medquant export out/ model.gguf --format gguf                 # llama.cpp / Ollama
    medquant export out/ model.onnx --format onnx --json          # ONNX Runtime; the report as JSON

``SRC`` is a :func:`medquant.save` folder (``medquant.json``) or a Hugging Face folder (``config.json``; saved by
:func:`medquant.hf.save_pretrained` or ``medquant quantize``). The export is :func:`medquant.deploy.export`; the
printed table says for each weight how it went into the file: exact repack, exact re-expression, near-exact,
lossy requantization (only with ``--promote``) or float.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import existing_folder


def _size(text: str) -> int:
    """A ``--max-shard-size`` value: bytes or a number with KB/MB/GB/KiB/MiB/GiB."""
    from ..deploy.registry import ExportError, parse_size

    try:
        return parse_size(text if not text.isdigit() else int(text))
    except ExportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: formats whose backends take ``source`` (tokenizer / processor folder) and ``progress_bar``
WITH_SOURCE = ("compressed-tensors", "gguf")


def load_source(path: str):
    """The model of a medquant checkpoint or a Hugging Face folder (float or medquant-quantized)."""
    from .info import load_checkpoint, load_hf_folder

    folder = Path(path)
    if (folder / "medquant.json").is_file():
        return load_checkpoint(path)
    if (folder / "config.json").is_file():
        return load_hf_folder(path)[0]
    raise SystemExit(f"{path}: not a model folder (no medquant.json from medquant.save, no config.json of a "
                     "Hugging Face folder)")


def run(args) -> int:
    from ..deploy import export

    model = load_source(args.src)
    options: dict = {}
    if args.promote:
        options["promote"] = True
    if args.max_shard_size is not None:
        options["max_shard_size"] = args.max_shard_size
    if args.format in WITH_SOURCE:  # folder formats and GGUF carry the tokenizer / processor files of SRC
        options.update(progress_bar=not args.json, source=args.source or args.src)
    if args.overwrite:
        options["overwrite"] = True
    report = export(model, args.out, format=args.format, **options)
    if args.json:
        print(report.to_json())
    else:
        print(report.table(max_rows=None))
    return 0


def _check(args, parser: argparse.ArgumentParser) -> None:
    from ..deploy.registry import ExportError, check_format

    try:  # the backend and its packages are there (before loading the model)
        check_format(args.format)
    except ExportError as e:
        parser.error(f"--format {args.format}: {e}")
    out = Path(args.out)
    if out.resolve() == Path(args.src).resolve():
        parser.error("OUT must differ from SRC (the export is written next to the source, never over it)")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        parser.error(f"OUT {args.out} exists and is not empty; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        if args.format == "compressed-tensors":
            parser.error(f"OUT {args.out} exists and is a file; --format compressed-tensors writes a folder")
        if not args.overwrite:
            parser.error(f"OUT {args.out} exists; pass --overwrite to replace it")
    if args.max_shard_size is not None and args.format != "compressed-tensors":
        parser.error("--max-shard-size applies to --format compressed-tensors only")
    if args.source is not None and args.format not in WITH_SOURCE:
        parser.error(f"--source applies to --format {' / '.join(WITH_SOURCE)} only")


def register(sub) -> None:
    from ..deploy import export_formats

    p = sub.add_parser("export", help="export a saved medquant model for vLLM / SGLang (compressed-tensors), "
                                      "llama.cpp / Ollama (gguf) or ONNX Runtime (onnx)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("src", metavar="SRC", type=existing_folder,
                   help="a folder saved by medquant.save, medquant.hf.save_pretrained or medquant quantize")
    p.add_argument("out", metavar="OUT", help="output folder (compressed-tensors) or file (gguf, onnx)")
    p.add_argument("--format", required=True, choices=export_formats(), help="the target format")
    p.add_argument("--promote", action="store_true",
                   help="requantize what the format cannot carry (e.g. per-row mixed bits) to the nearest type it "
                        "has, reporting the added error per layer; without it such layers are refused")
    p.add_argument("--max-shard-size", type=_size, default=None, metavar="SIZE",
                   help="largest safetensors file, e.g. 5GB or 500MB (compressed-tensors; default 5GB)")
    p.add_argument("--source", type=existing_folder, default=None, metavar="DIR",
                   help="folder with the tokenizer / processor files (compressed-tensors, gguf; default SRC)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the export report as JSON (no progress bars)")
    p.set_defaults(func=run, check=lambda args: _check(args, p))
