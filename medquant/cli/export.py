"""``medquant export``: write a saved medquant model in the format a serving runtime reads.

Example::

    medquant export out/ served/ --format compressed-tensors     # vLLM / SGLang / transformers folder
    vllm serve served/
    medquant export out/ model.gguf --format gguf                 # llama.cpp / Ollama
    medquant export out/ model.onnx --format onnx --calib calib.npy          # ONNX Runtime, int8 activations
    medquant export out/ model.onnx --format onnx --calib images/ --image-size 224 --calib-method percentile
    medquant export out/ model.onnx --format onnx --input-shape 1,3,224,224  # float / weight-only: no calibration

``SRC`` is a :func:`medquant.save` folder (``medquant.json``) or a Hugging Face folder (``config.json``; saved by
:func:`medquant.hf.save_pretrained` or ``medquant quantize``). The export is :func:`medquant.deploy.export`; the
printed table says for each weight how it went into the file: exact repack, exact re-expression, near-exact,
lossy requantization (only with ``--promote``) or float. Quantized input embeddings go into a GGUF file in their
block type; ``--format compressed-tensors`` writes them as float tables unless ``--embeddings packed``.

``--format onnx`` traces the model on an example input: ``--input-shape`` (random values of that shape) or the
first calibration batch; an ``--input-shape`` an image model cannot take (not ``N,C,H,W`` with its input channels,
:func:`check_input_shape`) is refused in one line before the trace. A model with 8-bit per-channel layers runs them as integer kernels with static int8
activation scales, calibrated on ``--calib``: a ``.npy`` / ``.npz`` / ``.safetensors`` array of samples
(``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, H, W)``; ``--calib-key`` picks one array of several) or an image
folder (resized to ``--image-size``). Integer pixels are scaled to ``[0, 1]`` and normalized with
``--mean`` / ``--std`` (default: ``image_mean`` / ``image_std`` of SRC's ``preprocessor_config.json`` when it
has them); floating arrays are used as given. See :func:`medquant.deploy.onnx.load_calibration_batches`.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from .args import existing_folder, positive_int


def input_shape(text: str) -> tuple[int, ...]:
    """An ``--input-shape`` value: comma-separated positive integers, batch first (``1,3,224,224``).

    Args:
        text: the argument.

    Returns:
        The shape as a tuple.

    Raises:
        argparse.ArgumentTypeError: not at least two positive integers.
    """
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    if len(parts) < 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, batch first, like "
                                         f"1,3,224,224; got {text!r}")
    return tuple(int(p) for p in parts)


def _floats(text: str) -> list[float]:
    """A ``--mean`` / ``--std`` value: comma-separated finite numbers (``nan`` / ``inf`` refused)."""
    expected = "comma-separated numbers like 0.485,0.456,0.406, each finite"
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    return values


def _calib_source(text: str) -> str:
    from ..deploy.onnx import CALIB_SUFFIXES

    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    if p.is_file() and p.suffix.lower() not in CALIB_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: expected a {' / '.join(CALIB_SUFFIXES)} file or an image folder")
    return text


def _percentile(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (50, 100], got {text!r}") from None
    if not 50.0 < v <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a number in (50, 100], got {v}")
    return v


#: the options that apply to --format onnx only (dest, flag)
ONNX_OPTIONS = (("input_shape", "--input-shape"), ("calib", "--calib"), ("calib_method", "--calib-method"),
                ("percentile", "--percentile"), ("image_size", "--image-size"), ("calib_key", "--calib-key"),
                ("calib_samples", "--calib-samples"), ("calib_batch_size", "--calib-batch-size"),
                ("mean", "--mean"), ("std", "--std"))


def _preprocessor_norm(src: str) -> tuple[list[float] | None, list[float] | None]:
    """``image_mean`` / ``image_std`` of ``SRC/preprocessor_config.json`` (a Hugging Face image processor) as lists:
    a list as it is, a number (one value for every channel, as transformers' image processors take it) as a list of
    one; a file that is no UTF-8 JSON object is a one-line ``SystemExit`` naming it."""
    from .args import config_object

    cfg = Path(src) / "preprocessor_config.json"
    if not cfg.is_file():
        return None, None
    data = config_object(cfg)
    if data.get("do_normalize") is False:
        return None, None

    def values(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return [float(v)]
        return list(v) if isinstance(v, list) else None

    return values(data.get("image_mean")), values(data.get("image_std"))


def model_channels(model) -> int | None:
    """The input channels ``model`` expects: ``config.num_channels`` (ViT, SigLIP, ... and a VLM's
    ``vision_config``), else the ``in_channels`` of its first ``Conv2d``; None when neither says.

    Args:
        model: the loaded model.

    Returns:
        The channel count, or None.
    """
    from torch import nn

    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "vision_config", None)):
        n = getattr(c, "num_channels", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else int(first.in_channels)


def image_input_layer(model) -> tuple[str, int] | None:
    """``(description, channels)`` of an image classifier's input, when it can be read: a model whose config has
    ``num_channels`` (ViT, SigLIP vision, ...: its pixel values are ``N,C,H,W``), or a model without a config
    whose first layer with weights is a ``Conv2d`` (``in_channels``); None otherwise (a language or
    vision-language model takes token ids first, whatever its vision tower's first layer is).

    Args:
        model: the loaded model.

    Returns:
        The first layer's name and type (or the config field) and the channel count, or None.
    """
    from torch import nn

    cfg = getattr(model, "config", None)
    if cfg is not None:
        n = getattr(cfg, "num_channels", None)
        if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
            return None
        first = next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
        return (f"{first} (Conv2d)" if first else "config.num_channels"), n
    first = next(((name, m) for name, m in model.named_modules()
                  if not list(m.children()) and any(True for _ in m.parameters(recurse=False))), None)
    if first is None or not isinstance(first[1], nn.Conv2d):
        return None
    return f"{first[0]} (Conv2d)", int(first[1].in_channels)


def check_input_shape(shape: tuple[int, ...], model) -> None:
    """Refuse an ``--input-shape`` that an image model cannot take: not 4 numbers ``N,C,H,W``, or ``C`` other than
    its input channels (:func:`image_input_layer`); other models are not checked (their own error stands).

    Raises:
        SystemExit: one line naming ``--input-shape``, the shape given and what the first layer expects.
    """
    layer = image_input_layer(model)
    if layer is None:
        return
    name, c = layer
    if len(shape) != 4 or shape[1] != c:
        given = ",".join(map(str, shape))
        what = f"{len(shape)} numbers" if len(shape) != 4 else f"{shape[1]} channel(s)"
        raise SystemExit(f"--input-shape {given}: the model's first layer {name} expects N,{c},H,W (batch, {c} "
                         f"channel(s), height, width), got {what}")


def onnx_options(args, model=None) -> tuple[dict, list[str]]:
    """The ``format="onnx"`` options of a parsed command line: calibration batches, method, example inputs.

    Calibration samples are given the model's input channels (``--input-shape``'s, else :func:`model_channels`):
    a folder of grayscale images calibrates an RGB model with the gray channel repeated.

    Args:
        args: the parsed ``medquant export`` arguments.
        model: the loaded model (its input channels when ``--input-shape`` does not give them).

    Returns:
        ``(options, notes)``: keyword arguments for :func:`medquant.deploy.export` and lines for the report.

    Raises:
        SystemExit: the calibration data cannot be read or do not fit ``--input-shape`` (the message names the
            argument; a mean / std from SRC's ``preprocessor_config.json`` that cannot normalize them names the file).
    """
    import torch

    from ..deploy.onnx import CalibrationError, load_calibration_batches

    options: dict = {}
    notes: list[str] = []
    shape = args.input_shape
    size = (args.image_size, args.image_size) if args.image_size else (tuple(shape[2:]) if shape and
                                                                        len(shape) == 4 else None)
    channels = shape[1] if shape and len(shape) == 4 else (None if model is None else model_channels(model))
    if args.calib:
        mean, std = args.mean, args.std
        if mean is None and std is None:
            mean, std = _preprocessor_norm(args.src)
            if mean is not None or std is not None:
                notes.append(f"calibration pixels normalized with SRC's preprocessor_config.json: mean {mean}, "
                             f"std {std}")
        common = {"batch_size": args.calib_batch_size or 32, "limit": args.calib_samples or 256,
                  "image_size": size, "channels": channels, "key": args.calib_key}
        try:
            try:
                batches = load_calibration_batches(args.calib, mean=mean, std=std, **common)
            except CalibrationError as e:
                if not (notes and "floating point" in str(e)):
                    raise
                batches = load_calibration_batches(args.calib, **common)  # preprocessed floats: no normalization
                notes[-1] = ("calibration samples are floating point, taken as preprocessed: SRC's "
                             "preprocessor_config.json normalization not applied")
        except (CalibrationError, OSError, ValueError) as e:
            from_config = args.mean is None and args.std is None and (mean is not None or std is not None)
            where = (f" (mean {mean}, std {std}: image_mean / image_std of "
                     f"{Path(args.src) / 'preprocessor_config.json'}; --mean / --std override them)"
                     if from_config and str(e).startswith(("mean ", "std ")) else "")
            raise SystemExit(f"--calib {args.calib}: {e}{where}") from None
        if shape is not None and tuple(batches[0].shape[1:]) != tuple(shape[1:]):
            raise SystemExit(f"--calib {args.calib}: samples of shape {tuple(batches[0].shape[1:])} do not fit "
                             f"--input-shape {','.join(map(str, shape))}")
        n = sum(len(b) for b in batches)
        method = args.calib_method or "minmax"
        options.update(calib=batches, method=method)
        if method == "percentile":
            options["percentile"] = args.percentile if args.percentile is not None else 99.99
        notes.append(f"calibration: {n} samples of shape {tuple(batches[0].shape[1:])} from {args.calib}, "
                     f"{method}")
    if shape is not None:
        g = torch.Generator().manual_seed(0)
        options["example_inputs"] = torch.randn(*shape, generator=g)
    elif args.calib:
        options["example_inputs"] = options["calib"][0][:2]
    return options, notes


def _size(text: str) -> int:
    """A ``--max-shard-size`` value: bytes or a number with KB/MB/GB/KiB/MiB/GiB."""
    from ..deploy.registry import ExportError, parse_size

    try:
        return parse_size(text if not text.isdigit() else int(text))
    except ExportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: formats whose backends take ``source`` (tokenizer / processor folder) and ``progress_bar``
WITH_SOURCE = ("compressed-tensors", "gguf")
#: the formats that write one file (OUT, or OUT/model<suffix> for a folder), with their suffix
FILE_SUFFIXES = {"gguf": ".gguf", "onnx": ".onnx"}


def load_source(path: str, *, trust_remote_code: bool | None = None):
    """The model of a medquant checkpoint or a Hugging Face folder (float or medquant-quantized); one whose class is
    the folder's own code only with ``trust_remote_code`` (``None``: the command's ``--trust-remote-code``)."""
    from .info import load_checkpoint, load_hf_folder

    folder = Path(path)
    if (folder / "medquant.json").is_file():
        return load_checkpoint(path, trust_remote_code=trust_remote_code)
    if (folder / "config.json").is_file():
        return load_hf_folder(path, trust_remote_code=trust_remote_code)[0]
    raise SystemExit(f"{path}: not a model folder (no medquant.json from medquant.save, no config.json of a "
                     "Hugging Face folder)")


def run(args) -> int:
    from ..deploy import export

    model = load_source(args.src, trust_remote_code=args.trust_remote_code)
    options: dict = {}
    if args.promote:
        options["promote"] = True
    if args.max_shard_size is not None:
        options["max_shard_size"] = args.max_shard_size
    if args.embeddings is not None:
        options["embeddings"] = args.embeddings
    if args.format in WITH_SOURCE:  # folder formats and GGUF carry the tokenizer / processor files of SRC
        options.update(progress_bar=not args.json, source=args.source or args.src)
    if args.overwrite:
        options["overwrite"] = True
    notes: list[str] = []
    if args.format == "onnx":
        from ..deploy.onnx import CalibrationRequired

        if args.input_shape is not None:
            check_input_shape(args.input_shape, model)
        extra, notes = onnx_options(args, model)
        options.update(extra)
        try:
            report = export(model, args.out, format=args.format, **options)
        except CalibrationRequired as e:
            names = ", ".join(e.layers[:5]) + ("..." if len(e.layers) > 5 else "")
            raise SystemExit(f"--format onnx: {len(e.layers)} layer(s) ({names}) have 8-bit weights that run with "
                             "static int8 activation scales: pass --calib FILE (calibration samples: .npy / .npz / "
                             ".safetensors, or an image folder with --image-size)") from None
    else:
        report = export(model, args.out, format=args.format, **options)
    report.notes.extend(notes)
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
    if args.format in FILE_SUFFIXES:  # the file the export writes (OUT, or OUT/model<suffix>): all there is to check
        from ..deploy.registry import output_file_path

        try:
            output_file_path(out, args.overwrite, suffix=FILE_SUFFIXES[args.format], format=args.format)
        except ExportError as e:
            parser.error(f"OUT: {e}")
    else:
        # --overwrite replaces OUT as a whole folder: never one holding what the export reads
        for flag, folder in (("SRC", args.src), ("--source", args.source)):
            if folder is None:
                continue
            if out.resolve() == Path(folder).resolve():  # SRC itself is refused above
                parser.error(f"OUT {args.out} is the {flag} folder {folder}: the export replaces OUT as a whole "
                             f"folder, which would delete the files it reads; choose another OUT")
            if out.resolve() in Path(folder).resolve().parents:
                parser.error(f"OUT {args.out} holds {flag} {folder}: the export replaces OUT as a whole folder, "
                             f"which would delete it; choose an OUT outside it")
        if out.exists() and not out.is_dir():
            if args.format == "compressed-tensors":
                parser.error(f"OUT {args.out} exists and is a file; --format compressed-tensors writes a folder")
            if not args.overwrite:
                parser.error(f"OUT {args.out} exists; pass --overwrite to replace it")
        if args.format == "compressed-tensors":  # an empty folder, or an earlier export with --overwrite
            from ..deploy.common import check_export_folder

            try:
                check_export_folder(out, args.overwrite)
            except ExportError as e:
                parser.error(f"OUT: {e}")
        elif out.is_dir() and any(out.iterdir()) and not args.overwrite:
            parser.error(f"OUT {args.out} exists and is not empty; pass --overwrite to replace it")
    if args.max_shard_size is not None and args.format != "compressed-tensors":
        parser.error("--max-shard-size applies to --format compressed-tensors only")
    if args.embeddings is not None and args.format != "compressed-tensors":
        parser.error("--embeddings applies to --format compressed-tensors only (gguf writes quantized embeddings "
                     "in their block type)")
    if args.source is not None and args.format not in WITH_SOURCE:
        parser.error(f"--source applies to --format {' / '.join(WITH_SOURCE)} only")
    if args.format != "onnx":
        given = [flag for dest, flag in ONNX_OPTIONS if getattr(args, dest) is not None]
        if given:
            parser.error(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --format onnx only")
        return
    if args.input_shape is None and args.calib is None:
        parser.error("--format onnx traces the model on an example input: pass --input-shape (e.g. 1,3,224,224) "
                     "or --calib FILE")
    if args.input_shape is not None and args.image_size is not None and (
            len(args.input_shape) != 4 or tuple(args.input_shape[2:]) != (args.image_size, args.image_size)):
        parser.error(f"--image-size {args.image_size} contradicts --input-shape "
                     f"{','.join(map(str, args.input_shape))}")
    if args.calib is None:
        extra = [flag for dest, flag in ONNX_OPTIONS[2:] if getattr(args, dest) is not None]
        if extra:
            parser.error(f"{', '.join(extra)} need{'s' if len(extra) == 1 else ''} --calib FILE")
        return
    folder = Path(args.calib).is_dir()
    if folder and args.image_size is None and (args.input_shape is None or len(args.input_shape) != 4):
        parser.error(f"--calib {args.calib} is an image folder: pass --image-size N (the model's input size) or a "
                     "4-D --input-shape")
    if args.calib_key is not None and (folder or Path(args.calib).suffix.lower() == ".npy"):
        parser.error("--calib-key applies to .npz / .safetensors calibration files only")
    if args.percentile is not None and args.calib_method != "percentile":
        parser.error("--percentile needs --calib-method percentile")


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
    p.add_argument("--embeddings", choices=("float", "packed"), default=None,
                   help="--format compressed-tensors: quantized input embeddings as their dequantised float table "
                        "(default, every runtime reads it) or packed (transformers needs dequantize=True)")
    p.add_argument("--source", type=existing_folder, default=None, metavar="DIR",
                   help="folder with the tokenizer / processor files (compressed-tensors, gguf; default SRC)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (a folder, replaced whole; never one holding SRC or --source); "
                        "gguf / onnx: replace the file written (OUT, or OUT/model.gguf in a folder OUT)")
    p.add_argument("--json", action="store_true", help="print the export report as JSON (no progress bars)")
    onnx = p.add_argument_group("--format onnx")
    onnx.add_argument("--input-shape", type=input_shape, default=None, metavar="N,C,H,W",
                      help="example input shape, batch first, e.g. 1,3,224,224 (the batch axis is dynamic in the "
                           "file; default: the first calibration batch)")
    onnx.add_argument("--calib", type=_calib_source, default=None, metavar="FILE",
                      help="calibration samples for the static int8 activation scales of 8-bit layers: a .npy / "
                           ".npz / .safetensors array (N,C,H,W | N,H,W,C | N,H,W) or an image folder")
    onnx.add_argument("--calib-method", choices=("minmax", "percentile"), default=None,
                      help="activation range: min/max over the batches (default) or averaged percentiles")
    onnx.add_argument("--percentile", type=_percentile, default=None, metavar="P",
                      help="with --calib-method percentile: the P-th / (100-P)-th values (default 99.99)")
    onnx.add_argument("--image-size", type=positive_int, default=None, metavar="N",
                      help="resize calibration images to N x N (required for an image folder without a 4-D "
                           "--input-shape)")
    onnx.add_argument("--calib-key", default=None, metavar="KEY",
                      help="the array of an .npz / .safetensors file that holds several")
    onnx.add_argument("--calib-samples", type=positive_int, default=None, metavar="N",
                      help="use the first N samples (default 256)")
    onnx.add_argument("--calib-batch-size", type=positive_int, default=None, metavar="N",
                      help="samples per calibration batch (default 32)")
    onnx.add_argument("--mean", type=_floats, default=None, metavar="M[,M,M]",
                      help="per-channel mean subtracted from integer pixels scaled to [0, 1] (default: SRC's "
                           "preprocessor_config.json image_mean, else none)")
    onnx.add_argument("--std", type=_floats, default=None, metavar="S[,S,S]",
                      help="per-channel std dividing them (default: SRC's preprocessor_config.json image_std)")
    p.set_defaults(func=run, check=lambda args: _check(args, p))
