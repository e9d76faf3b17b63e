"""``medquant demo``'s explanation of the bits column says what the column holds: ``medquant.model_size``'s
effective bits, the bits of the weight codes, without the scales (their bytes are in the bytes column)."""
from __future__ import annotations

import copy

import torch

import medquant as mq
from medquant.cli import main
from medquant.cli.demo import tiny_cnn


def test_the_bits_explanation_matches_the_bits_column(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--data-dir", str(tmp_path / "no-data-here"), "--epochs", "1", "--bootstrap", "50",
                 "--json", str(out), "--plot", ""]) == 0
    text = capsys.readouterr().out
    import json

    row = next(r for r in json.loads(out.read_text())["rows"] if r["weights"] == "int4 group-32")
    # the reference: the int4 group-32 CNN's bits with and without its fp16 scales and zero points
    torch.manual_seed(0)
    q = mq.quantize_(copy.deepcopy(tiny_cnn()), mq.QuantConfig(4, group_size=32))
    size = mq.model_size(q)
    with_scales = size.linear_weight_bytes * 8 / size.linear_params
    assert row["bits"] == size.effective_bits == 4.0 < with_scales  # the column: the codes' bits, no scales
    line = next(x for x in text.splitlines() if x.startswith("* bytes:"))
    assert "scales included" not in line and "without" in line.split("bits =", 1)[1]
