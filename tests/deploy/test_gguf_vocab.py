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
