"""The tokenizer inside a GGUF file, read from a Hugging Face tokenizer folder.

llama.cpp keeps the whole tokenizer in the GGUF metadata: ``tokenizer.ggml.model`` (``"gpt2"`` for byte-level
BPE, ``"llama"`` for SentencePiece-style tokenizers), ``tokenizer.ggml.pre`` (the pre-tokenizer llama.cpp applies
before BPE), ``tokenizer.ggml.tokens`` / ``token_type`` (and ``scores`` for SentencePiece), the BPE
``merges``, the special token ids (bos, eos, unk, pad), whether bos/eos are added, and the chat template.

Byte-level BPE (``tokenizer.json`` with a BPE model and a ByteLevel decoder) is read here: tokens in id order,
added tokens marked ``CONTROL`` when special and ``USER_DEFINED`` otherwise, every other token ``NORMAL``.
SentencePiece (``tokenizer.model``) and byte-fallback BPE tokenizers are read by the ``gguf`` package's own
vocabulary classes, which know only the bos / eos / unk / pad tokens as special; the tokenizer's added tokens
(``tokenizer.json``'s ``added_tokens``, else ``tokenizer_config.json``'s ``added_tokens_decoder``) are then set
by id as llama.cpp's converter sets them: ``CONTROL`` when special, else ``USER_DEFINED`` with the space mark U+2581
written as a space (llama.cpp matches and prints a user-defined token as raw text), score -1000. llama.cpp cuts a prompt on
exactly these two types before tokenizing the rest, so a special token typed ``NORMAL`` (a chat marker such as
Gemma's ``<start_of_turn>``) would be split into pieces. A byte-fallback BPE ``tokenizer.json`` has merges and no
scores, while llama.cpp's SentencePiece-style tokenizer joins pieces by score: its tokens score ``-r`` for the merge
``r`` that makes them (below every merge when none does), so llama.cpp merges in the BPE order. The token list is
padded to the model's vocabulary size with unused ``[PAD<i>]`` tokens.

``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say whether llama.cpp puts bos / eos around a prompt; they are
read as the ``gguf`` package's ``SpecialVocab`` reads them (``tokenizer_config.json``'s ``add_bos_token`` /
``add_eos_token``, else the ``tokenizer.json`` post-processor's template), and a flag neither gives is written
``false`` when there is a ``tokenizer.json`` (its fast tokenizer adds nothing else), so llama.cpp does not fall
back to its vocabulary type's default. Only a bare SentencePiece ``tokenizer.model`` keeps that default (bos, no eos).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .registry import ExportError

#: llama.cpp pre-tokenizer names for byte-level BPE tokenizers, chosen by model family when not given
DEFAULT_PRE = {"qwen2": "qwen2"}


def guess_pre(arch: str, name: str, n_vocab: int) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer: ``"qwen2"`` for Qwen2, ``"smollm"`` for
    SmolLM models (name contains "smollm"), ``"llama-bpe"`` for the 128256-token Llama 3 vocabulary, else
    ``"default"`` (pass ``tokenizer_pre=`` to the export for another model)."""
    if arch in DEFAULT_PRE:
        return DEFAULT_PRE[arch]
    if "smollm" in name.lower().replace(" ", "").replace("-", ""):
        return "smollm"
    if n_vocab == 128256:
        return "llama-bpe"
    return "default"


def _bpe_tokens(folder: Path) -> tuple[list[str], list[int]] | None:
    """Tokens and token types of a byte-level BPE ``tokenizer.json``, or None for another kind of tokenizer."""
    from gguf import TokenType

    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    decoder = tj.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback", False) or decoder.get("type") != "ByteLevel":
        return None
    by_id: dict[int, tuple[str, int]] = {i: (t, int(TokenType.NORMAL)) for t, i in model["vocab"].items()}
    for added in tj.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special", False) else TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], int(kind))
    n = max(by_id) + 1
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise ExportError(f"{path}: token ids {missing[:10]} have no token; the GGUF vocabulary needs every id")
    return [by_id[i][0] for i in range(n)], [by_id[i][1] for i in range(n)]


def _added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """``id -> (content, special)`` of the tokenizer's added tokens: ``tokenizer_config.json``'s
    ``added_tokens_decoder``, overridden by ``tokenizer.json``'s ``added_tokens`` (the table the fast tokenizer
    uses); empty when the folder has neither."""
    out: dict[int, tuple[str, bool]] = {}
    config = folder / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        for i, tok in decoder.items():
            out[int(i)] = (tok["content"], bool(tok.get("special", False)))
    path = folder / "tokenizer.json"
    if path.is_file():
        for tok in json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []:
            out[int(tok["id"])] = (tok["content"], bool(tok.get("special", False)))
    return out


def _merge_list(path: Path, merges: Any) -> list[tuple[str, str]]:
    """The ``model.merges`` of ``tokenizer.json`` as pairs, from either of its spellings (``"a b"`` or ``["a", "b"]``)."""
    pairs = []
    for merge in merges or []:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise ExportError(f"{path}: the merge {merge!r} is not a pair of tokens (accepted: \"left right\" or "
                              "[\"left\", \"right\"])")
        pairs.append((pair[0], pair[1]))
    return pairs


def _merge_scores(folder: Path, tokens: list[str], types: list[int], scores: list[float]) -> None:
    """Set the scores of a byte-fallback BPE vocabulary's ``NORMAL`` tokens from its merges, in place.

    llama.cpp's SentencePiece-style tokenizer joins, among the neighbouring pieces that form a token, the pair whose
    token scores highest (the leftmost on a tie), where BPE applies the earliest merge in ``merges``. A token made
    by merge ``r`` (its first merge when several make it) therefore scores ``-r``, and a token no merge makes
    (characters, byte tokens) scores ``-len(merges)``, below every merge; the ``gguf`` package's placeholder of -1000
    for all tokens would join pieces left to right instead.
    """
    from gguf import TokenType

    path = folder / "tokenizer.json"
    merges = _merge_list(path, json.loads(path.read_text(encoding="utf-8")).get("model", {}).get("merges"))
    rank: dict[str, int] = {}
    for r, (left, right) in enumerate(merges):
        rank.setdefault(left + right, r)
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind == TokenType.NORMAL:
            scores[i] = -float(rank.get(text, len(merges)))


#: post-processors whose added tokens ``gguf.SpecialVocab`` reads completely (a ``ByteLevel`` one adds none)
_KNOWN_POST = {"TemplateProcessing", "RobertaProcessing", "ByteLevel"}


def _settle_add_flags(add: dict[str, bool], folder: Path) -> str:
    """Complete ``add`` (``gguf.SpecialVocab.add_special_token``) with ``bos`` / ``eos`` and return a note.

    ``SpecialVocab`` sets a flag from ``tokenizer_config.json``'s ``add_bos_token`` / ``add_eos_token`` or from a
    ``tokenizer.json`` post-processor that puts the token around the text, and leaves it out otherwise; llama.cpp
    would then take its vocabulary type's default (bos added for a SentencePiece-style vocabulary and for some
    byte-level ones, such as ``llama-bpe``), not what the source tokenizer does. With a ``tokenizer.json`` whose
    post-processor is absent or fully read, a flag not set is ``False``: the fast tokenizer adds nothing else. A
    SentencePiece ``tokenizer.model`` without a ``tokenizer.json`` or flags keeps llama.cpp's default (bos, no
    eos), which is the default of transformers' SentencePiece tokenizers for Llama and Gemma.
    """
    path = folder / "tokenizer.json"
    post = json.loads(path.read_text(encoding="utf-8")).get("post_processor") if path.is_file() else None
    kinds = {p.get("type") for p in (post or {}).get("processors", [post])} if post else set()
    if path.is_file() and kinds <= _KNOWN_POST:
        for typ in ("bos", "eos"):
            add.setdefault(typ, False)
    said = {typ: ("yes" if add[typ] else "no") if typ in add else "llama.cpp's default" for typ in ("bos", "eos")}
    return f"tokenizer: adds bos: {said['bos']}, adds eos: {said['eos']}"


def add_tokenizer(writer: Any, folder: Path, arch: str, n_vocab: int, name: str, pre: str | None) -> list[str]:
    """Write the tokenizer of ``folder`` into ``writer`` (a ``gguf.GGUFWriter``); returns notes for the report.

    Raises:
        ExportError: no readable tokenizer in ``folder``, more tokens (or a token id past them) than the model's
            ``n_vocab`` rows, or a byte-level BPE tokenizer without merges (llama.cpp needs
            ``tokenizer.ggml.merges``).
    """
    from gguf import SpecialVocab, TokenType
    from gguf.vocab import LlamaHfVocab, SentencePieceVocab

    notes = []
    scores: list[float] | None = None
    bpe = _bpe_tokens(folder)
    if bpe is not None:
        tokens, types = bpe
        model_kind = "gpt2"
        pre = pre or guess_pre(arch, name, n_vocab)
        notes.append(f"tokenizer: byte-level BPE, {len(tokens)} tokens, llama.cpp pre-tokenizer {pre!r}")
    else:
        vocab: Any = None
        errors = []
        for cls in (SentencePieceVocab, LlamaHfVocab):
            try:
                vocab = cls(folder)
                break
            except (FileNotFoundError, RuntimeError, TypeError, ImportError) as e:
                errors.append(f"{cls.__name__}: {e}")
        if vocab is None:
            raise ExportError(f"no tokenizer that GGUF can carry in {folder} (looked for a byte-level BPE "
                              f"tokenizer.json, a SentencePiece tokenizer.model, a byte-fallback BPE tokenizer.json: "
                              f"{'; '.join(errors)})")
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
            scores.append(float(score))
            types.append(int(ttype))
        if isinstance(vocab, LlamaHfVocab):
            _merge_scores(folder, tokens, types, scores)
        model_kind = "llama"
        pre = pre or "default"
        notes.append(f"tokenizer: SentencePiece-style ({type(vocab).__name__}), {len(tokens)} tokens")
    if len(tokens) > n_vocab:
        raise ExportError(f"the tokenizer in {folder} has {len(tokens)} tokens but the model's embedding has only "
                          f"{n_vocab} rows; give the tokenizer that belongs to this model (source=...)")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
        if scores is not None:
            scores.append(-1000.0)
    if scores is not None:  # SentencePiece-style: the added tokens' kinds, which the gguf classes do not read
        for i, (text, is_special) in sorted(_added_tokens(folder).items()):
            if i >= n_vocab:
                raise ExportError(f"the tokenizer in {folder} has the added token {text!r} at id {i}, but the model's "
                                  f"embedding has only {n_vocab} rows; give the tokenizer that belongs to this model "
                                  "(source=...)")
            tokens[i] = text if is_special else text.replace("\u2581", " ")
            types[i] = int(TokenType.CONTROL if is_special else TokenType.USER_DEFINED)
            scores[i] = -1000.0
    writer.add_tokenizer_model(model_kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    if arch == "gemma3" and model_kind == "llama":
        writer.add_add_space_prefix(False)  # as llama.cpp's converter writes Gemma 3's SentencePiece vocabulary
    special = SpecialVocab(folder, load_merges=model_kind == "gpt2", n_vocab=n_vocab)
    if model_kind == "gpt2" and not special.merges:
        # llama.cpp refuses a gpt2 vocabulary without tokenizer.ggml.merges, and the gguf writer cannot write an
        # empty array
        raise ExportError(f"the byte-level BPE tokenizer in {folder} has no merges; llama.cpp cannot load a GGUF "
                          "byte-level BPE vocabulary without tokenizer.ggml.merges (and GGUF cannot carry an empty "
                          "list). Give a tokenizer with merges (source=...), or tokenizer=False")
    notes.append(_settle_add_flags(special.add_special_token, folder))
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None:
        notes.append("tokenizer: no chat template in the source folder")
    return notes
