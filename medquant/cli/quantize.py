"""``medquant quantize``: quantize a Hugging Face model folder (RTN, AWQ or GPTQ) and save it loadable by
``from_pretrained``.

Example::

    medquant quantize path/to/model out/ --bits 4 --group-size 128
    medquant quantize path/to/model out/ --bits 4 --method gptq --calib reports.txt --skip @vision @head

The folder is loaded with its config's architecture class (``AutoModelForCausalLM`` / ``AutoModel`` otherwise)
in its stored dtypes (a bfloat16 folder stays bfloat16, as ``from_pretrained`` loads it; ``bytes before`` is its
size in them), quantized (``rtn``: :func:`medquant.quantize_`; ``awq``: :func:`medquant.calibrate.awq_quantize_`;
``gptq``: :func:`medquant.calibrate.gptq_quantize_`, both calibrated on ``--calib``, a UTF-8 text file tokenized with the
folder's tokenizer into ``--calib-samples`` sequences of ``--seq-len`` tokens) and saved with
:func:`medquant.hf.save_pretrained` (the tokenizer files are saved with it, as part of the checkpoint: listed in its
manifest, so a rerun into the same ``OUT_DIR`` leaves a folder that verifies). Reload with ``import medquant`` and
``AutoModelForCausalLM.from_pretrained(OUT_DIR)``. A summary table (layers quantized, average bits, bytes before
and after) is printed; ``--json`` prints it as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import (
    bit_width,
    existing_file,
    existing_folder,
    output_is_input_message,
    positive_int,
    role_or_name,
    sequence_length,
    utf8_text,
)
from .prune import _load


def calibration_batches(tok, path: str, samples: int, seq_len: int, text: str | None = None) -> list[dict]:
    """``samples`` batches of one ``seq_len``-token sequence each, cut in order from the text of ``path``
    (paragraphs joined; fewer when the text is short; the last piece may be shorter, and is dropped below 2 tokens).
    ``seq_len`` must be at least 2 (``ValueError`` otherwise). ``text``: the file's text when already read (a file
    that is not UTF-8 is a ``SystemExit`` naming ``--calib``)."""
    import torch

    if seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (tokens per calibration sequence), got {seq_len}")

    if tok is None:
        raise SystemExit("--calib needs the model folder's tokenizer; none could be loaded")
    if text is None:
        text = utf8_text(path, "--calib")
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n") if p.strip()]
    ids: list[int] = []
    for p in paragraphs:
        ids.extend(tok(p, add_special_tokens=True)["input_ids"])
        if len(ids) >= samples * seq_len:
            break
    chunks = [ids[i:i + seq_len] for i in range(0, min(len(ids), samples * seq_len), seq_len)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise SystemExit(f"--calib: {path} holds no text to calibrate on (fewer than 2 tokens)")
    return [{"input_ids": torch.tensor([c]), "attention_mask": torch.ones(1, len(c), dtype=torch.long)}
            for c in chunks]


def _summary(before, after, n_layers: int, method: str) -> dict:
    return {"method": method, "layers_quantized": n_layers, "average_bits": round(after.effective_bits, 4),
            "bytes_before": before.total_bytes, "bytes_after": after.total_bytes,
            "linear_bytes_before": before.linear_weight_bytes, "linear_bytes_after": after.linear_weight_bytes}


def save_with_tokenizer(model, tok, out: Path) -> None:
    """:func:`medquant.hf.save_pretrained` of ``model`` into ``out`` with the tokenizer files of ``tok`` (when not
    ``None``) saved as part of the same checkpoint: the folder is replaced as one unit and its manifest lists them,
    so a later run into the same ``out`` (another model, another tokenizer) leaves a folder that verifies.

    Everything is written inside the new version folder of ``out`` that :func:`medquant.io.write_checkpoint`
    yields (a staging folder ``.{name}.mq-tmp-*`` beside ``out``): the model is saved into a scratch sub-folder
    of it, its files are moved up, the scratch removed, and the tokenizer saved beside them. A run killed in the
    middle (even by SIGKILL) leaves only that staging folder, which the next save into ``out`` removes (as every
    checkpoint save does, under ``out``'s lock)."""
    import os
    import shutil

    from ..hf import save_pretrained
    from ..io import write_checkpoint
    from ..io.manifest import MANIFEST_NAME

    if tok is None:
        save_pretrained(model, out)
    else:
        with write_checkpoint(out) as folder:
            scratch = folder / ".quantize-scratch"
            save_pretrained(model, scratch)  # a checkpoint of its own, inside the new version folder
            helpers = set(os.listdir(folder))  # the scratch folder and its save's lock file
            for f in sorted(scratch.iterdir()):
                if f.name != MANIFEST_NAME:  # write_checkpoint writes the manifest of the whole folder
                    shutil.move(str(f), str(folder / f.name))
            for name in helpers:
                p = folder / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            tok.save_pretrained(folder)


def run(args) -> int:
    from .. import QuantConfig, quantize_
    from ..quant.api import quantized_modules
    from ..quant.size import model_size

    config = QuantConfig(args.bits, symmetric=True if args.symmetric else None, group_size=args.group_size)
    text = utf8_text(args.calib, "--calib") if args.calib else None  # before the model: a bad file is named at once
    model, tok = _load(args.model, None, keep_dtype=True, command="quantize")
    calib = calibration_batches(tok, args.calib, args.calib_samples, args.seq_len, text) if args.calib else None
    before = model_size(model)
    skip = list(args.skip) or None
    progress = not args.json
    if args.method == "rtn":
        quantize_(model, config, skip=skip, progress=progress)
    elif args.method == "awq":
        from ..calibrate import awq_quantize_

        awq_quantize_(model, config, calib, skip=skip, progress=progress)
    else:
        from ..calibrate import gptq_quantize_

        gptq_quantize_(model, config, calib, skip=skip, progress=progress, max_hessian_bytes=args.max_hessian_bytes)
    after = model_size(model)
    summary = _summary(before, after, len(quantized_modules(model)), args.method)
    out = Path(args.out)
    save_with_tokenizer(model, tok, out)
    summary["out"] = str(out)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print("| | before | after | change |\n|---|---|---|---|")
        for label, key in [("bytes", "bytes"), ("Linear/Conv2d weight bytes", "linear_bytes")]:
            b, a = summary[f"{key}_before"], summary[f"{key}_after"]
            print(f"| {label} | {b:,} | {a:,} | {100 * (a / b - 1) if b else 0.0:+.1f}% |")
        print(f"layers quantized: {summary['layers_quantized']} ({args.method}), average bits "
              f"{summary['average_bits']:.3f} (weight layers)")
        print(f"saved to {out} (reload: import medquant; AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a HF model folder (rtn / awq / gptq) and save it",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL_DIR", type=existing_folder, help="Hugging Face model folder")
    p.add_argument("out", metavar="OUT_DIR", help="output folder (not MODEL_DIR itself)")
    p.add_argument("--bits", type=bit_width, default=4, help="bit-width 1..8 (default 4)")
    p.add_argument("--group-size", type=positive_int, default=128, help="input elements per scale (default 128)")
    p.add_argument("--symmetric", action="store_true",
                   help="symmetric scheme (default: asymmetric for <= 3 bits, symmetric above)")
    p.add_argument("--method", choices=["rtn", "awq", "gptq"], default="rtn",
                   help="rtn (round to nearest, no data), awq or gptq (need --calib)")
    p.add_argument("--calib", type=existing_file, default=None, help="UTF-8 calibration text file (awq / gptq)")
    p.add_argument("--calib-samples", type=positive_int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=sequence_length, default=512,
                   help="tokens per calibration sequence, at least 2 (default 512)")
    p.add_argument("--skip", nargs="+", type=role_or_name, default=[], metavar="PATTERN",
                   help="layers left in float: roles (@vision @projector @language @head), re:<regex> or names "
                        "(default: none, the LM head included, for every --method; the Python awq_quantize_ leaves "
                        "@head float by default)")
    p.add_argument("--max-hessian-bytes", type=positive_int, default=None, metavar="BYTES",
                   help="gptq: the most bytes of Hessian sums held at once (a transformer block is then "
                        "captured in several passes; same result; for MoE models, whose blocks hold one Hessian "
                        "per expert)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run, check=lambda args: _check(args, p))


def _check(args, parser: argparse.ArgumentParser) -> None:
    same = output_is_input_message(args.out, args.model, "OUT_DIR")
    if same:
        parser.error(same)
    if Path(args.out).exists() and not Path(args.out).is_dir():  # refused by the save, after all the work
        parser.error(f"OUT_DIR: {args.out} exists and is not a folder; the quantized model is saved as a folder")
    if args.method in ("awq", "gptq") and not args.calib:
        parser.error(f"--method {args.method} needs --calib FILE (calibration text)")
    if args.max_hessian_bytes is not None and args.method != "gptq":
        parser.error(f"--max-hessian-bytes is read by --method gptq, not --method {args.method}")
    if args.method == "rtn" and args.calib:  # it would be read for nothing: the user meant awq or gptq
        parser.error("--calib is read by --method awq or gptq; --method rtn (the default) uses no calibration data")
