"""``medquant pipeline`` of a bfloat16 folder: the stages run in float32 and the result is saved in the folder's
dtypes. Reference: the same pipeline on a float32 folder holding the same values (the stages then see the very same
float32 model): every tensor of the bfloat16 run equals that run's, its float tensors cast to bfloat16, its
quantized codes and scales unchanged; both read back through medquant's loader."""
from __future__ import annotations

import json

import torch

from medquant.cli import main


def test_pipeline_of_a_bfloat16_folder_saves_what_the_float32_run_saves_cast_to_bfloat16(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from medquant.pipeline import load_compressed
    from tests.cli.tiny_folder import report_text_file, tiny_llama_folder

    src = tiny_llama_folder(tmp_path / "orig")
    text = report_text_file(tmp_path)
    bf16 = LlamaForCausalLM.from_pretrained(src).to(torch.bfloat16)
    folders = {}
    for name, model in (("bf16", bf16), ("f32", LlamaForCausalLM.from_pretrained(src).to(torch.bfloat16).float())):
        folder = tmp_path / name
        model.save_pretrained(folder)
        for f in src.iterdir():  # the tokenizer files
            if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
                (folder / f.name).write_bytes(f.read_bytes())
        assert main(["pipeline", str(folder), "--out", str(tmp_path / f"out_{name}"), "--heads", "0.5", "--ffn",
                     "0.5", "--train", "finetune", "--steps", "2", "--batch", "2", "--quant", "rtn", "--group-size",
                     "32", "--text", str(text), "--calib-samples", "4", "--max-length", "16"]) == 0
        capsys.readouterr()
        folders[name] = tmp_path / f"out_{name}"
    got, ref = (load_compressed(folders[n]) for n in ("bf16", "f32"))
    got_sd, ref_sd = got.state_dict(), ref.state_dict()
    assert set(got_sd) == set(ref_sd)
    float_names = [k for k, v in got_sd.items() if v.is_floating_point() and k in dict(bf16.named_parameters())]
    assert "model.embed_tokens.weight" in float_names and "lm_head.weight" in float_names
    for k, v in got_sd.items():
        want = ref_sd[k].to(torch.bfloat16) if k in float_names else ref_sd[k]
        assert v.dtype == want.dtype and torch.equal(v, want), k
    # the report's bytes are the stored ones: the source as stored, the result smaller than the float32 run's
    reports = {n: json.loads((folders[n] / "pipeline_report.json").read_text()) for n in folders}
    assert reports["bf16"]["before"]["bytes"] == 2 * sum(p.numel() for p in bf16.parameters())
    assert reports["bf16"]["stored_bytes"] < reports["f32"]["stored_bytes"]
    # and it runs: the loaded model's logits are finite
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.isfinite(got(input_ids=ids).logits).all()
