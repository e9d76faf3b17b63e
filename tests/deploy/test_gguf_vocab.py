"""The tokenizer written into a GGUF file, against the source tokenizer and transformers' GGUF tokenizer reader.

llama.cpp splits a prompt on the tokens typed CONTROL (special) and USER_DEFINED (added, not special) before it
tokenizes the rest, and leaves CONTROL tokens out of decoded text; transformers' reader
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) does the same with the types, so it is the reference here.
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("gguf")

from gguf import GGUFReader, TokenType

from medquant.deploy import export
from medquant.testing.zoo import ZOO_BY_NAME

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def spm_style_dir(tmp_path_factory):
    """A byte-fallback BPE tokenizer (SentencePiece-style, as Llama 2 / Gemma ship it) with added tokens: special
    ones inside the base vocabulary (``<start_of_turn>``) and appended to it (``<end_of_turn>``, ``<image>``), and
    non-special ones inside (``<think>``) and appended (``<tool>``, and a run of two space marks as Gemma has)."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<start_of_turn>": 3, "<think>": 4}
    for i in range(200):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz\u2581":
        vocab[ch] = len(vocab)
    merges = [("b", "c"), ("a", "b"), ("\u2581", "a"), ("\u2581a", "bc")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = LlamaTokenizer(vocab=vocab, merges=merges)
    tok.add_tokens([AddedToken(t, special=True, normalized=False)
                    for t in ("<start_of_turn>", "<end_of_turn>", "<image>")], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "<tool>", "\u2581\u2581")])
    d = tmp_path_factory.mktemp("spm")
    tok.save_pretrained(d)
    return d


def test_added_tokens_of_a_sentencepiece_style_vocabulary_keep_their_kind(spm_style_dir, tmp_path):
    """Every added token of the source tokenizer is CONTROL when special and USER_DEFINED otherwise, at its id (a
    user-defined one with its space marks as spaces: llama.cpp matches it in raw text), and the file's tokenizer
    (transformers' reader) cuts and decodes prompts with them as the source does."""
    from transformers import AutoTokenizer

    src = AutoTokenizer.from_pretrained(spm_style_dir)
    added = src.added_tokens_decoder
    assert {t.special for t in added.values()} == {True, False}
    assert min(i for i, t in added.items() if t.content == "<start_of_turn>") < src.vocab_size  # one in the base
    out = tmp_path / "out"  # apart from the source folder: the reader must see the file only
    report = export(ZOO_BY_NAME["llama"].build(), out / "t.gguf", format="gguf", source=spm_style_dir)
    fields = GGUFReader(report.files[0]).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    for i, tok in added.items():
        want = (tok.content, TokenType.CONTROL) if tok.special else \
            (tok.content.replace("\u2581", " "), TokenType.USER_DEFINED)
        assert (tokens[i], TokenType(types[i])) == want, (i, tok.content)
    back = AutoTokenizer.from_pretrained(str(out), gguf_file="t.gguf")
    for text in ("<start_of_turn>abc bc<end_of_turn>", "abc<image><think>ab<tool>c"):
        ids = src(text, add_special_tokens=False)["input_ids"]
        assert back(text, add_special_tokens=False)["input_ids"] == ids, text
        assert back.decode(ids, skip_special_tokens=True) == src.decode(ids, skip_special_tokens=True), text


def test_an_added_token_past_the_embedding_rows_is_refused(spm_style_dir, tmp_path):
    """An added token whose id has no embedding row (listed in tokenizer_config.json only) is refused by name."""
    import json
    import shutil

    from medquant.deploy import ExportError

    folder = tmp_path / "tok"
    shutil.copytree(spm_style_dir, folder)
    model = ZOO_BY_NAME["llama"].build()
    rows = model.get_input_embeddings().weight.shape[0]
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.setdefault("added_tokens_decoder", {})[str(rows)] = {"content": "<late>", "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ExportError, match=rf"added token '<late>' at id {rows}.* only {rows} rows"):
        export(model, tmp_path / "out" / "t.gguf", format="gguf", source=folder)
    assert not (tmp_path / "out").exists()


def _byte_fallback_letters() -> dict[str, int]:
    """The base of a byte-fallback BPE vocabulary: unk / bos / eos, 200 byte tokens, the letters and the space mark."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(200):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz\u2581":
        vocab[ch] = len(vocab)
    return vocab


def _byte_level_dir(folder, template: str | None):
    """A byte-level BPE tokenizer, with a post-processor adding the tokens of ``template`` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet())[:240]:
        vocab[ch] = len(vocab)
    merges = [("a", "b"), ("\u0120", "c")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 2), ("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
                            ).save_pretrained(folder)
    return folder


def _spm_style_dir(folder, add_bos: bool, add_eos: bool):
    """A byte-fallback BPE (SentencePiece-style) tokenizer that adds bos / eos as asked."""
    from transformers import LlamaTokenizer

    LlamaTokenizer(vocab=_byte_fallback_letters(), merges=[], add_bos_token=add_bos, add_eos_token=add_eos
                   ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("make", [
    pytest.param(lambda d: _byte_level_dir(d, None), id="byte-level-none"),
    pytest.param(lambda d: _byte_level_dir(d, "<s> $A"), id="byte-level-bos"),
    pytest.param(lambda d: _byte_level_dir(d, "$A </s>"), id="byte-level-eos"),
    pytest.param(lambda d: _spm_style_dir(d, True, False), id="spm-bos"),
    pytest.param(lambda d: _spm_style_dir(d, False, True), id="spm-eos"),
    pytest.param(lambda d: _spm_style_dir(d, False, False), id="spm-none"),
])
def test_add_bos_and_add_eos_are_written_as_the_source_tokenizer_adds_them(make, tmp_path):
    """``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` are always written, true exactly when the source
    tokenizer puts bos / eos around an encoded text (left out, llama.cpp would take its vocabulary type's default:
    bos for a SentencePiece-style vocabulary, whatever the source does), and transformers' reader of the file
    encodes with the same special tokens as the source."""
    from transformers import AutoTokenizer

    folder = make(tmp_path / "tok")
    src = AutoTokenizer.from_pretrained(folder)
    text = "ab c"
    ids = src(text)["input_ids"]
    bare = src(text, add_special_tokens=False)["input_ids"]
    want_bos, want_eos = ids[0] == src.bos_token_id, ids[-1] == src.eos_token_id
    assert len(ids) == len(bare) + want_bos + want_eos  # nothing else is added
    report = export(ZOO_BY_NAME["llama"].build(), tmp_path / "out" / "t.gguf", format="gguf", source=folder)
    fields = GGUFReader(report.files[0]).fields
    assert "tokenizer.ggml.add_bos_token" in fields and "tokenizer.ggml.add_eos_token" in fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is want_bos
    assert fields["tokenizer.ggml.add_eos_token"].contents() is want_eos
    back = AutoTokenizer.from_pretrained(str(tmp_path / "out"), gguf_file="t.gguf")
    assert back(text)["input_ids"] == ids


def _llama_cpp_spm(text: str, tokens: list[str], scores: list[float], types: list[int]) -> list[int]:
    """llama.cpp's SentencePiece-style tokenizer (llm_tokenizer_spm) on text made of vocabulary characters: the
    space mark before the text and for every space, then, while two neighbouring pieces join into a NORMAL token,
    join the pair whose token has the highest score (the leftmost pair on a tie)."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] == TokenType.NORMAL}
    pieces = list("\u2581" + text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(pieces) - 1):
            j = ids.get(pieces[i] + pieces[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            return [ids[p] for p in pieces]
        i = best[1]
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]


def test_byte_fallback_bpe_scores_follow_the_merge_order(tmp_path):
    """A byte-fallback BPE tokenizer.json has merges and no scores; llama.cpp's SentencePiece-style tokenizer joins
    pieces by their token's score, so the scores carry the merge order: a token made by an earlier merge scores
    higher, one no merge makes scores lowest. Merged tokens here have ids in the reverse of the merge order, so
    neither equal scores nor id order give the source's tokens; the written scores do, in llama.cpp's algorithm and
    in transformers' reader of the file."""
    from transformers import AutoTokenizer, LlamaTokenizer

    vocab = _byte_fallback_letters()
    merges = [("b", "c"), ("a", "b"), ("\u2581", "a"), ("\u2581a", "bc"), ("c", "d"), ("bc", "d"), ("a", "bcd"),
              ("x", "a")]
    for left, right in reversed(merges):
        vocab[left + right] = len(vocab)
    LlamaTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path / "tok")
    src = AutoTokenizer.from_pretrained(tmp_path / "tok")
    out = tmp_path / "out"
    report = export(ZOO_BY_NAME["llama"].build(), out / "t.gguf", format="gguf", source=tmp_path / "tok")
    fields = GGUFReader(report.files[0]).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = [float(s) for s in fields["tokenizer.ggml.scores"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents()
    merged = [scores[vocab[left + right]] for left, right in merges]
    assert merged == sorted(merged, reverse=True) and len(set(merged)) == len(merged)
    unmerged = [scores[i] for t, i in vocab.items() if len(t) == 1 and types[i] == TokenType.NORMAL]
    assert max(unmerged) < min(merged)
    back = AutoTokenizer.from_pretrained(str(out), gguf_file="t.gguf")
    for text in ("xabc", "abcd", "xabcd bcd", "abc dxa bc"):
        ids = src(text, add_special_tokens=False)["input_ids"]
        assert _llama_cpp_spm(text, tokens, scores, types) == ids, text
        assert back(text, add_special_tokens=False)["input_ids"] == ids, text
