"""Fixtures shared by the export tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A 256-token byte-level BPE tokenizer (the zoo's vocabulary size) saved as a Hugging Face folder, with
    a chat template: a tokenizer GGUF can carry."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alpha = sorted(pre_tokenizers.ByteLevel.alphabet())[:240]
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2}
    for ch in alpha:
        vocab[ch] = len(vocab)
    merges, i = [], 0
    while len(vocab) < 256:
        merges.append((alpha[i], alpha[i + 1]))
        vocab[alpha[i] + alpha[i + 1]] = len(vocab)
        i += 2
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(d)
    return d
