"""``medquant quantize`` prints how to reload its output; it always said ``AutoModelForCausalLM.from_pretrained(OUT)``,
which transformers refuses for a VLM (LLaVA: "Unrecognized configuration class") or an image model. The printed code
must run as printed and give the model the folder holds. Reference: transformers' own ``from_pretrained`` of the
source folder's class, quantized by hand with ``medquant.quantize_``: logits bit-equal."""
from __future__ import annotations

import re

import torch

import medquant
from medquant.cli import main
from tests.cli.tiny_folder import tiny_llama_folder, tiny_llava_folder


def _reload(printed: str):
    code = re.search(r"\(reload: (.*)\)$", printed.strip().splitlines()[-1]).group(1)
    *statements, last = code.split("; ")
    scope: dict = {}
    exec("\n".join(statements), scope)  # noqa: S102 - the printed hint, run as a user would
    return eval(last, scope)


def test_the_printed_reload_code_loads_the_output_of_a_vlm_and_a_causal_lm(tmp_path, capsys):
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    ids = torch.tensor([[101, 2053, 11325, 102]])
    for build, cls in ((tiny_llava_folder, LlavaForConditionalGeneration), (tiny_llama_folder, LlamaForCausalLM)):
        src = build(tmp_path / f"src_{cls.__name__}")
        out = tmp_path / f"out_{cls.__name__}"
        capsys.readouterr()
        assert main(["quantize", str(src), str(out), "--bits", "4", "--group-size", "32"]) == 0
        model = _reload(capsys.readouterr().out).eval()
        ref = cls.from_pretrained(src).eval()
        medquant.quantize_(ref, medquant.QuantConfig(4, group_size=32), progress=False)
        assert type(model) is cls
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
