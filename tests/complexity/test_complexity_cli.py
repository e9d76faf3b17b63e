"""``medquant score``: CSV of metrics and levels, PNG histogram, saved state."""
from __future__ import annotations

import csv

import numpy as np
import torch

from medquant.cli import main
from medquant.complexity import METRIC_NAMES, ComplexityScorer


def test_score_npz_writes_csv_plot_and_state(tmp_path, data_root, pneumonia28):
    npz = data_root / "pneumoniamnist" / "pneumoniamnist.npz"
    out, png, state = tmp_path / "m.csv", tmp_path / "h.png", tmp_path / "s.pt"
    rc = main(["score", str(npz), "--split", "test", "--limit", "64", "--out", str(out), "--plot", str(png),
               "--save-state", str(state), "--no-progress", "--batch-size", "20"])
    assert rc == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 64 and list(rows[0]) == ["name", *METRIC_NAMES, "score", "level"]
    levels = np.array([int(r["level"]) for r in rows])
    assert np.bincount(levels, minlength=4).tolist() == [16, 16, 16, 16]
    got = np.array([[float(r[k]) for k in METRIC_NAMES] for r in rows])
    np.testing.assert_allclose(got, ComplexityScorer().metrics(pneumonia28[:64]).numpy(), rtol=1e-6, atol=1e-7)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sc = ComplexityScorer()
    sc.load_state_dict(torch.load(state, weights_only=True))
    assert sc.levels(pneumonia28[:64]).tolist() == levels.tolist()


def test_score_folder_with_fit_on_and_state(tmp_path, data_root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(6):
        img = rng.integers(0, 256, (24, 24)).astype(np.uint8) if i % 2 else np.full((24, 24), 9 * i, np.uint8)
        Image.fromarray(img).save(tmp_path / f"im{i}.png")
    npz = data_root / "pneumoniamnist" / "pneumoniamnist.npz"
    out = tmp_path / "o" / "m.csv"
    rc = main(["score", str(tmp_path), "--out", str(out), "--fit-on", str(npz), "--fit-split", "val",
               "--fit-limit", "40", "--n-levels", "3", "--no-progress"])
    assert rc == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [f"im{i}.png" for i in range(6)]
    assert {int(r["level"]) for r in rows} <= {0, 1, 2}


def test_a_saved_state_scores_as_the_run_that_saved_it(tmp_path):
    # 12-bit images in 16-bit PNGs, a non-default edge threshold: a second run given only --state reads the images
    # with the saved bits_stored and edge threshold (it computed the metrics before loading the state)
    from PIL import Image

    rng = np.random.default_rng(3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    arrays = []
    for i in range(8):
        img = (rng.random((20, 20)) * 4095 * (i + 1) / 8).astype(np.uint16)
        arrays.append(img)
        Image.fromarray(img).save(folder / f"im{i}.png")
    first, second, state = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "s.pt"
    assert main(["score", str(folder), "--out", str(first), "--bits-stored", "12", "--edge-threshold", "0.2",
                 "--save-state", str(state), "--no-progress"]) == 0
    assert main(["score", str(folder), "--out", str(second), "--state", str(state), "--no-progress"]) == 0
    rows = [list(csv.DictReader(p.read_text().splitlines())) for p in (first, second)]
    assert rows[0] == rows[1]
    want = ComplexityScorer(bits_stored=12, edge_threshold=0.2).metrics(np.stack(arrays)).numpy()
    got = np.array([[float(r[k]) for k in METRIC_NAMES] for r in rows[1]])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert len({r["level"] for r in rows[1]}) > 1


def test_a_state_saved_with_quantile_normalisation_loads_without_repeating_the_option(tmp_path, data_root):
    npz = data_root / "pneumoniamnist" / "pneumoniamnist.npz"
    first, second, state = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "s.pt"
    common = [str(npz), "--split", "test", "--limit", "40", "--no-progress"]
    assert main(["score", *common, "--normalisation", "quantile", "--out", str(first),
                 "--save-state", str(state)]) == 0
    assert ComplexityScorer().normalisation == "minmax"
    loaded = ComplexityScorer()
    loaded.load_state_dict(torch.load(state, weights_only=True))
    assert loaded.normalisation == "quantile"
    assert main(["score", *common, "--state", str(state), "--out", str(second)]) == 0
    assert first.read_text() == second.read_text()
