"""``medquant prune`` of a bfloat16 folder: pruning runs in float32, the result is saved in the folder's own dtypes
(it was saved in float32, twice the bytes), every kept weight exactly a stored one, and the report's bytes are the
stored bytes (checked against transformers' own loader of the source and of the result)."""
from __future__ import annotations

import json

import torch

from medquant.cli import main


def test_prune_of_a_bfloat16_folder_saves_bfloat16_with_the_stored_values(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from medquant.prune import load_pruned
    from tests.cli.tiny_folder import report_text_file, tiny_llama_folder

    src = tiny_llama_folder(tmp_path / "f32")
    bf = tmp_path / "bf16"
    LlamaForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(bf)
    for f in src.iterdir():  # the tokenizer files
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            (bf / f.name).write_bytes(f.read_bytes())
    ref = LlamaForCausalLM.from_pretrained(bf)  # transformers' loader: the stored dtypes and values
    assert ref.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    text = report_text_file(tmp_path)
    out = tmp_path / "out"
    assert main(["prune", str(bf), "--out", str(out), "--heads", "0.5", "--ffn", "0.5", "--importance", "activation",
                 "--calib-text", str(text), "--calib-samples", "4", "--max-length", "16"]) == 0
    capsys.readouterr()
    got = load_pruned(out)
    dtypes = {n: p.dtype for n, p in got.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes
    assert got.model.layers[0].mlp.up_proj.out_features < ref.model.layers[0].mlp.up_proj.out_features  # pruned
    for i in range(2):  # every kept FFN neuron is a stored row, unchanged
        kept = got.model.layers[i].mlp.up_proj.weight
        stored = ref.model.layers[i].mlp.up_proj.weight
        assert all(any(torch.equal(row, s) for s in stored) for row in kept)
    report = json.loads((out / "prune_report.json").read_text())
    n_ref = sum(p.numel() for p in ref.parameters())
    n_got = sum(p.numel() for p in got.parameters())
    assert report["before"]["params"] == n_ref and report["after"]["params"] == n_got
    from safetensors import safe_open

    with safe_open(str(bf / "model.safetensors"), "pt") as f:  # the bytes the folder stores
        stored_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    assert report["before"]["bytes"] == stored_bytes == 2 * n_ref
    assert report["after"]["bytes"] == 2 * n_got
