"""``python -m benchmarks.qlora_reports``: label a text, merge + re-quantize a trained adapter on a tiny LLaMA folder."""
from __future__ import annotations

import json

import torch

import medquant
from benchmarks.qlora_reports import main
from medquant.qlora import QLoRAAdapter
from medquant.quant import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME


def test_label_text(capsys):
    assert main(["label", "--text", "No pleural effusion. Possible pneumonia. Mild cardiomegaly."]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"No Finding": "negative", "Cardiomegaly": "positive", "Pneumonia": "uncertain",
                   "Pleural Effusion": "negative"}


def test_merge_requantizes_and_saves(tmp_path, capsys):
    entry = ZOO_BY_NAME["llama"]
    entry.build().save_pretrained(tmp_path / "base")
    model = entry.build()
    inp = entry.inputs(model)
    ad = QLoRAAdapter(model)
    ad.train([{**inp, "labels": inp["input_ids"].clone()}] * 2, lr=5e-2, progress=False)
    ad.save(tmp_path / "adapter")
    ad.model.eval()
    with torch.no_grad():
        ref = entry.output(ad.model, inp)
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged"), "--bits", "8"]) == 0
    merged = medquant.load(tmp_path / "merged")
    assert len(quantized_modules(merged)) == 14
    with torch.no_grad():
        out = entry.output(merged, inp)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
