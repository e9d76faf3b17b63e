"""``medquant eval``: perplexity of a (quantized or float) causal LM folder on a text file.

Example::

    medquant eval out/ --text reports.txt --json

Each non-empty line of the UTF-8 ``--text`` file (another encoding is refused; a leading byte order mark is not
part of the first text) is one text, tokenized with the folder's tokenizer (:func:`medquant.eval.lm.token_batches`,
``--max-length`` tokens, ``--batch-size`` at a time);
the number is :func:`medquant.eval.perplexity`. A medquant-quantized folder is loaded through ``from_pretrained`` as saved; a
pruned one (``medquant prune`` / ``medquant pipeline`` output) with :func:`medquant.prune.load_pruned`.

A NaN perplexity (NaN or inf logits: a broken model) is no result: the command stops with an error. ``--json``
prints strict JSON: a perplexity past float64 (``inf``, a mean loss over 709 nats) is ``null`` there.
"""
from __future__ import annotations

import json
import math

from .args import existing_file, existing_folder, positive_int, text_length, utf8_text


def run(args) -> int:
    from ..eval.lm import perplexity, token_batches
    from .info import load_hf_folder

    lines = utf8_text(args.text, "--text").splitlines()  # a leading byte order mark is no text
    texts = [t.strip() for t in lines if t.strip()]
    if not texts:
        raise SystemExit(f"--text: {args.text} holds no text")
    model, tok = load_hf_folder(args.model, trust_remote_code=args.trust_remote_code)
    if tok is None:
        raise SystemExit(f"{args.model}: no tokenizer could be loaded from the model folder")
    batches = token_batches(tok, texts, batch_size=args.batch_size, max_length=args.max_length)
    from tqdm.auto import tqdm

    ppl = perplexity(model, tqdm(batches, desc="perplexity", unit="batch", disable=args.json))
    if math.isnan(ppl):
        raise SystemExit(f"{args.model}: the perplexity is NaN: the model's logits hold NaN or inf values (a broken "
                         "or overflowing model; check its outputs in float32)")
    if args.json:
        print(json.dumps({"model": args.model, "text": args.text, "texts": len(texts),
                          "perplexity": ppl if math.isfinite(ppl) else None}, allow_nan=False))
    else:
        print(f"perplexity {ppl:.4f} on {len(texts)} texts of {args.text}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a causal LM folder (quantized or float) on a text file",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL_DIR", type=existing_folder, help="Hugging Face causal LM folder")
    p.add_argument("--text", required=True, type=existing_file, help="UTF-8 text file, one text per line")
    p.add_argument("--max-length", type=text_length, default=512,
                   help="tokens per text, at least 2 (default 512)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="texts per batch (default 8)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)
