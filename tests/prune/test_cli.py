"""``medquant prune`` on the real MiniLM folder with calibration text and seed-004 layer selection."""
from __future__ import annotations

import json

import torch

from medquant.cli import main
from medquant.prune import load_pruned
from tests.prune.real_models import REPORTS, minilm_dir


def test_cli_prune_minilm(tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(REPORTS * 2))
    out = tmp_path / "out"
    rc = main(["prune", str(minilm_dir()), "--out", str(out), "--heads", "0.25", "--ffn", "0.3",
               "--calib-text", str(calib), "--layer-select", "--spread", "0.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| non-embedding params |" in text and "1 - cos" in text
    assert (out / "block_influence.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "prune_report.json").read_text())
    kept = [len(v) for v in report["plan"]["heads"].values()]
    assert len(set(kept)) > 1 and abs(sum(12 - k for k in kept) / (6 * 12) - 0.25) < 0.05  # per-layer, mean ~25%
    model = load_pruned(out)
    assert [lay.attention.self.num_attention_heads for lay in model.encoder.layer] == kept
    ids = torch.tensor([[101, 2053, 11325, 102]])
    assert model(input_ids=ids).last_hidden_state.shape == (1, 4, 384)
