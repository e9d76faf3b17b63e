"""``medquant compile-decoder`` / ``generate``: a causal LM's decode compiled ahead of time once, then served.

Example::

    medquant quantize smollm2/ q4/ --bits 4 --group-size 128
    medquant compile-decoder q4/ q4-decoder/ --max-len 512          # once: ~70 s for SmolLM2 on 2 cores
    medquant generate q4/ --decoder q4-decoder/ --prompt "Findings:" --max-new-tokens 64

``compile-decoder`` loads the model folder (float or medquant-quantized, as saved), compiles its prompt and step
programs with :func:`medquant.compile_decoder` and saves them (:meth:`medquant.quant.aot.AOTDecoder.save`) into a
hidden folder beside ``OUT_DIR``, put in place once whole (a failed save leaves ``OUT_DIR`` as it was).
``generate`` loads the folder and its tokenizer, loads the saved decoder for it (:func:`medquant.load_decoder`,
which checks the model's weights and layout against the saved record), or compiles one when given ``--max-len``
instead, and generates from each ``--prompt`` (one per row of the decoder's batch; tokenized as ``tok(prompt)``
gives ``generate`` its tokens, with the tokenizer's BOS token first when it adds one but no other special token;
shorter prompts are padded on the left with the tokenizer's pad token and masked, as ``generate`` takes a batch):
sampled or greedy as the model's ``generation_config`` says (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
``repetition_penalty``, each as transformers' ``generate`` settles it when not given; see
:meth:`~medquant.quant.aot.AOTDecoder.generate`), sampled with ``--temperature`` (and ``--top-k``, ``--top-p``;
the config's, else ``generate``'s defaults, for those not given), greedy with ``--greedy``, with an optional
``--repetition-penalty`` (else the config's), stopping at the end tokens of the model's ``generation_config`` (those
transformers' ``generate`` stops at; instruct models list several) and also at the tokenizer's end token (which
``generate`` does not add); a row that ended before the
others goes on, in the JSON ``tokens``, with the ``pad_token_id`` of the model's ``generation_config``, else the
first end token (as ``generate`` pads it; not the tokenizer's pad token), and its text ends at its end token. With
``--chat`` each prompt is one user turn of the tokenizer's chat template, the assistant's turn opened
(``apply_chat_template(..., add_generation_prompt=True)``), as instruct models expect. It prints the texts, with the
prefill and decode rates.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .args import existing_folder, new_or_empty_folder, positive_int, seed_value


def _load(folder: str, trust_remote_code: bool):
    from .info import load_hf_folder

    model, tok = load_hf_folder(folder, trust_remote_code=trust_remote_code)
    if not hasattr(model, "generate"):
        raise SystemExit(f"{folder}: not a causal LM folder (its model class {type(model).__name__} does not "
                         "generate)")
    return model, tok


def _prompt_ids(tok, prompt: str) -> list[int]:
    """The tokens of ``prompt`` as transformers' usage hands them to ``generate`` (``tok(prompt)``): led by the
    tokenizer's BOS token when it begins its texts with one (LLaMA's, Gemma's), without any other special token (an
    appended end-of-text, BERT-style ``[CLS]`` / ``[SEP]``, which are no BOS token)."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    if bos is not None and ids[:1] != [bos] and tok(prompt)["input_ids"][:1] == [bos]:
        ids = [bos, *ids]
    return ids


def _chat_ids(tok, prompt: str) -> list[int]:
    """The tokens of ``prompt`` as one user turn in the tokenizer's chat template, ending with the assistant's
    turn opening (``tok.apply_chat_template(..., add_generation_prompt=True)``, what instruct models are trained on);
    ``SystemExit`` naming ``--chat`` when the tokenizer has no template."""
    if not getattr(tok, "chat_template", None):
        raise SystemExit("--chat: the model folder's tokenizer has no chat template (tokenizer_config.json "
                         "chat_template / chat_template.jinja): drop --chat to use the prompt as it is")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in some transformers versions
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _end_tokens(model, tok) -> list[int]:
    """The end tokens generation stops at: the ``eos_token_id`` of the model's ``generation_config`` (one id or a
    list, what transformers' ``generate`` stops at), then the tokenizer's ``eos_token_id`` when not among them."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends: list[int] = []
    for t in ([eos] if isinstance(eos, int) else list(eos or [])) + [tok.eos_token_id]:
        if t is not None and int(t) not in ends:
            ends.append(int(t))
    return ends


def _up_to_the_end(rows: list[list[int]], ends: list[int]) -> list[list[int]]:
    """Each row's new tokens up to and including its first end token (the pad tokens after it are no text)."""
    return [next((row[:i + 1] for i, t in enumerate(row) if t in ends), row) for row in rows]


def _save_whole(decoder, out: Path) -> Path:
    """Save ``decoder`` into a new hidden folder beside ``out``, then put it in place: a new ``out`` is that folder
    renamed; into an existing empty ``out`` (the current folder, say) its files are moved, ``decoder.json`` last. A
    save that fails leaves ``out`` as it was and removes the hidden folder."""
    import os
    import secrets
    import shutil

    from ..quant.aot import MANIFEST

    target = Path(os.path.abspath(out))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{secrets.token_hex(6)}.partial"
    staging.mkdir()  # the permissions a new folder gets (umask), as ``out`` would
    moved: list[Path] = []
    try:
        decoder.save(staging)
        if not target.exists():
            os.replace(staging, target)  # one rename
            return out
        for f in sorted(staging.iterdir(), key=lambda f: f.name == MANIFEST):  # the record last
            os.replace(f, target / f.name)
            moved.append(target / f.name)
    except BaseException:
        for f in moved:
            f.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def run_compile(args) -> int:
    from ..quant.aot import compile_decoder

    model, _ = _load(args.model, args.trust_remote_code)
    t = time.perf_counter()
    decoder = compile_decoder(model, args.max_len, batch_size=args.batch_size, chunk=args.chunk,
                              cache_lengths=args.cache_lengths, progress=not args.json)
    compile_s = time.perf_counter() - t
    try:
        folder = _save_whole(decoder, Path(args.out))
    finally:
        decoder.close()
    summary = {"model": args.model, "decoder": str(folder), "max_len": decoder.max_len, "batch_size":
               decoder.batch_size, "chunks": list(decoder.chunks), "cache_lengths": decoder.cache_lengths,
               "bound_layers": decoder.bound_layers, "compile_s": round(compile_s, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"compiled {args.model} in {compile_s:.1f} s ({decoder.bound_layers} quantized layers bound; cache "
              f"lengths {decoder.cache_lengths}, batch {decoder.batch_size}, prompt chunks "
              f"{list(decoder.chunks) or 'none'}) and "
              f"saved the decoder to {folder}")
    return 0


def run_generate(args) -> int:
    import torch

    from ..quant.aot import compile_decoder, load_decoder, read_decoder_manifest

    max_len = args.max_len
    if args.decoder:  # what the saved programs take, checked before loading anything
        try:
            saved = read_decoder_manifest(args.decoder)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(f"--decoder: {exc}") from None
        max_len = saved["max_len"]
        if saved["batch_size"] != len(args.prompt):
            raise SystemExit(f"--prompt: {len(args.prompt)} prompts given, the decoder in {args.decoder} was "
                             f"compiled for batch {saved['batch_size']}: give {saved['batch_size']}")
    model, tok = _load(args.model, args.trust_remote_code)
    if tok is None:
        raise SystemExit(f"{args.model}: no tokenizer could be loaded from the model folder")
    rows = [_chat_ids(tok, p) if args.chat else _prompt_ids(tok, p) for p in args.prompt]
    if any(not r for r in rows):
        raise SystemExit("--prompt: a prompt tokenized to no tokens")
    width = max(len(r) for r in rows)
    if width + args.max_new_tokens > max_len:
        raise SystemExit(f"--max-new-tokens: a {width}-token prompt plus {args.max_new_tokens} tokens exceeds "
                         + (f"the decoder's max_len {max_len}" if args.decoder else f"--max-len {max_len}"))
    t = time.perf_counter()
    if args.decoder:
        decoder = load_decoder(args.decoder, model, progress=not args.json)
    else:
        decoder = compile_decoder(model, args.max_len, batch_size=len(rows), progress=not args.json)
    ready_s = time.perf_counter() - t
    # shorter prompts padded on the left, as generate takes a batch
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    generator = torch.Generator().manual_seed(args.seed)
    ends = _end_tokens(model, tok)
    # finished rows: the decoder's default pad token (the generation config's, else the first end token)
    # a setting not given (None) is the generation config's, as generate takes it
    do_sample = False if args.greedy else True if args.temperature is not None else None
    out = decoder.generate(ids, args.max_new_tokens, eos_token_id=ends,
                           do_sample=do_sample, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                           generator=generator, attention_mask=mask)
    timing = decoder.last_timing
    assert timing is not None
    new = out[:, ids.shape[1]:]
    texts = tok.batch_decode(_up_to_the_end(new.tolist(), ends), skip_special_tokens=True)
    decoder.close()
    summary = {"model": args.model, "texts": texts, "prompt_tokens": int(ids.shape[1]),
               "new_tokens": int(new.shape[1]), "tokens": new.tolist(),
               "prefill_tok_s": round(int(mask.sum()) / timing["prefill_s"], 1),
               # the first new token comes from the prefill's logits; each later one is a step
               "decode_tok_s": round(timing["steps"] * new.shape[0] / timing["decode_s"], 1) if timing["steps"]
               else None,
               ("load_s" if args.decoder else "compile_s"): round(ready_s, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        for prompt, text in zip(args.prompt, texts):
            print(f"{prompt}{text}")
        rate = f", decode {summary['decode_tok_s']} tok/s" if summary["decode_tok_s"] else ""
        print(f"[prefill {summary['prefill_tok_s']} tok/s{rate}; decoder "
              f"{'loaded' if args.decoder else 'compiled'} in {ready_s:.1f} s]")
    return 0


def _check_compile(args, parser) -> None:
    """``--chunk`` and ``--cache-lengths`` within ``--max-len`` (what :func:`medquant.compile_decoder` takes), checked
    before the model is loaded."""
    for flag, values in (("--chunk", args.chunk), ("--cache-lengths", args.cache_lengths)):
        longer = [v for v in values or () if v > args.max_len]
        if longer:
            parser.error(f"{flag} {longer[0]}: longer than --max-len {args.max_len} (the cache positions); give "
                         f"lengths up to {args.max_len}")


def _check_generate(args, parser) -> None:
    if (args.decoder is None) == (args.max_len is None):
        parser.error("give either --decoder DIR (a decoder saved by compile-decoder) or --max-len N (compile one now)")
    if args.greedy and args.temperature is not None:
        parser.error("--greedy and --temperature: give one (greedy, or sampled at a temperature)")
    if args.temperature is not None and not args.temperature > 0:
        parser.error(f"--temperature: expected a value > 0, got {args.temperature}")
    for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p)):
        if value is not None and args.temperature is None:
            parser.error(f"{flag} applies to sampling: give --temperature too")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p: expected a value in (0, 1], got {args.top_p}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        parser.error(f"--repetition-penalty: expected a value > 0, got {args.repetition_penalty}")


def register(sub) -> None:
    p = sub.add_parser("compile-decoder", help="compile a causal LM's decode ahead of time for CPU and save it",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL_DIR", type=existing_folder,
                   help="Hugging Face causal LM folder (float or medquant-quantized)")
    p.add_argument("out", metavar="OUT_DIR", type=new_or_empty_folder,
                   help="folder to save the decoder into (new or empty)")
    p.add_argument("--max-len", type=positive_int, required=True, help="cache positions: prompt + new tokens")
    p.add_argument("--batch-size", type=positive_int, default=1, help="rows per call (default 1)")
    p.add_argument("--chunk", type=positive_int, nargs="+", default=None, metavar="N",
                   help="tokens per call of the prompt program, or several lengths, one program each (e.g. 64 256: "
                        "long prompts in calls of 256, short ones padded to 64; default min(64, max-len); 1: step "
                        "program only)")
    p.add_argument("--cache-lengths", type=positive_int, nargs="*", default=None, metavar="N",
                   help="cache lengths to compile for (default 256, 512, ... below --max-len; none: --max-len only)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_compile, check=lambda args, p=p: _check_compile(args, p))

    p = sub.add_parser("generate", help="generate text with a compiled decoder (saved, or compiled now)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL_DIR", type=existing_folder, help="the causal LM folder, with its tokenizer")
    p.add_argument("--decoder", type=existing_folder, default=None, metavar="DIR",
                   help="a decoder saved by compile-decoder for this model")
    p.add_argument("--max-len", type=positive_int, default=None, help="compile a decoder now, of this many positions")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for each row of the batch)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the tokenizer's chat template (instruct models)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sample at this temperature (default: as the model's generation_config says, greedy "
                        "when it does not sample)")
    p.add_argument("--greedy", action="store_true",
                   help="take the most likely token, even where the model's generation_config samples")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens holding this probability (0 < p <= 1)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 makes tokens already in the text less likely (greedy and sampling; e.g. 1.2; "
                        "default: the generation config's)")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_generate, check=lambda args: _check_generate(args, p))
