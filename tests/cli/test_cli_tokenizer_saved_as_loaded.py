"""A tokenizer without a ``pad_token`` (SmolLM2 / LLaMA-style BPE) gets its ``eos_token`` as padding for the padded
calibration batches; ``quantize``, ``prune`` and ``pipeline`` saved that changed tokenizer into their output, so
the compressed folder's tokenizer was not the source's. Reference: transformers' own ``AutoTokenizer`` of the
source folder, saved with ``save_pretrained``: the output's ``tokenizer_config.json`` equals it."""
from __future__ import annotations

import json

import pytest
import torch

from medquant.cli import main

TEXTS = ["no acute cardiopulmonary disease", "heart size normal lungs are clear", "no pleural effusion"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(TEXTS * 10, trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tok.pad_token is None
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    root = tmp_path_factory.mktemp("nopad")
    model.save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    (root / "t.txt").write_text("\n\n".join(TEXTS * 4))
    return root


def _config(folder) -> dict:
    return json.loads((folder / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("command", ["quantize", "prune", "pipeline"])
def test_the_output_tokenizer_is_the_source_one(src, tmp_path, command):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src / "src").save_pretrained(tmp_path / "ref")
    out = tmp_path / "out"
    text = str(src / "t.txt")
    argv = {"quantize": ["quantize", str(src / "src"), str(out), "--bits", "4", "--group-size", "32", "--method",
                         "gptq", "--calib", text, "--calib-samples", "2", "--seq-len", "8", "--json"],
            "prune": ["prune", str(src / "src"), "--out", str(out), "--heads", "0.5", "--importance", "activation",
                      "--calib-text", text, "--calib-samples", "2", "--max-length", "8"],
            "pipeline": ["pipeline", str(src / "src"), "--out", str(out), "--heads", "0.5", "--train", "none",
                         "--quant", "rtn", "--bits", "4", "--group-size", "32", "--text", text, "--calib-samples",
                         "2", "--max-length", "8"]}[command]
    assert main(argv) == 0
    assert _config(out) == _config(tmp_path / "ref")
    assert AutoTokenizer.from_pretrained(out).pad_token is None
