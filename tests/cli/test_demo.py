"""``medquant demo``: the table's sizes are medquant.model_size's of the saved quantized model, the bootstrap
intervals match a hand-computed percentile bootstrap and the binomial normal approximation, the PNG and JSON are
written, bad arguments are refused before any work, and the real PneumoniaMNIST run reads all 624 test images."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import medquant as mq
from medquant.cli import main
from medquant.cli.demo import bootstrap_accuracy, tiny_cnn


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--data-dir", str(out / "no-data-here"), "--epochs", "1", "--bootstrap", "300",
            "--json", str(out / "demo.json"), "--plot", str(out / "demo.png"), "--save", str(out / "int4")]
    assert main(argv) == 0
    return out, json.loads((out / "demo.json").read_text())


def test_sizes_are_model_size_of_the_saved_int4_model(synthetic_run):
    out, result = synthetic_run
    rows = {r["weights"]: r for r in result["rows"]}
    loaded = mq.load(out / "int4", model=tiny_cnn())
    assert rows["int4 group-32"]["bytes"] == mq.model_size(loaded).total_bytes
    assert rows["float32"]["bytes"] == mq.model_size(tiny_cnn()).total_bytes
    assert rows["int2 group-32"]["bytes"] < rows["int4 group-32"]["bytes"] < rows["int8 per-channel"]["bytes"] \
        < rows["float32"]["bytes"]
    for r in result["rows"]:
        assert r["smaller"] == pytest.approx(rows["float32"]["bytes"] / r["bytes"])


def test_intervals_bracket_the_accuracy_and_have_the_binomial_width(synthetic_run):
    _, result = synthetic_run
    n = result["n_test"]
    assert result["data"].startswith("synthetic") and n == 600
    float_row = result["rows"][0]
    assert float_row["agreement"] == 1.0 and float_row["diff"] == 0.0
    for r in result["rows"]:
        assert r["ci_low"] <= r["test_acc"] <= r["ci_high"]
        assert r["diff_low"] <= r["diff"] <= r["diff_high"]
        p = r["test_acc"]
        normal = 2 * 1.96 * math.sqrt(p * (1 - p) / n)  # width of the normal-approximation interval
        assert r["ci_high"] - r["ci_low"] == pytest.approx(normal, rel=0.35, abs=0.01)


def test_json_records_date_hardware_and_versions(synthetic_run):
    import datetime

    import numpy as np
    import torch

    from medquant.kernels.cpu import cpu_features

    _, result = synthetic_run
    assert datetime.datetime.fromisoformat(result["date"]).tzinfo is not None
    assert result["hardware"]["cpu"] == json.loads(json.dumps(cpu_features()))
    assert result["versions"] == {"python": result["versions"]["python"], "torch": torch.__version__,
                                  "numpy": np.__version__, "medquant": mq.__version__}


def test_plot_is_a_png(synthetic_run):
    from PIL import Image

    out, _ = synthetic_run
    with Image.open(out / "demo.png") as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_bootstrap_matches_a_hand_computed_percentile_bootstrap():
    g = torch.Generator().manual_seed(1)
    correct = torch.rand(3, 200, generator=g) < torch.tensor([[0.9], [0.8], [0.5]])
    acc_ci, diff_ci, resampled = bootstrap_accuracy(correct, 500, seed=7)
    idx = torch.randint(0, 200, (500, 200), generator=torch.Generator().manual_seed(7))
    c = correct.numpy().astype(float)
    by_hand = np.stack([c[m][idx.numpy()].mean(1) for m in range(3)])
    assert np.allclose(resampled.numpy(), by_hand, atol=1e-6)
    assert np.allclose(acc_ci.numpy(), np.quantile(by_hand, [0.025, 0.975], axis=1).T, atol=1e-5)
    assert np.allclose(diff_ci.numpy(), np.quantile(by_hand - by_hand[:1], [0.025, 0.975], axis=1).T, atol=1e-5)
    assert diff_ci[0].abs().max() == 0  # the reference against itself
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_accuracy(correct, 0)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--bootstrap", "0"], "--bootstrap: expected a positive integer, got 0"),
    (["demo", "--epochs", "x"], "--epochs: expected a positive integer, got 'x'"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_real_pneumoniamnist_is_read_whole(tmp_path, capsys):
    data = Path(os.environ.get("MEDQUANT_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
    if not (data / "pneumoniamnist" / "pneumoniamnist.npz").is_file():
        pytest.skip("PneumoniaMNIST is not in $MEDQUANT_DATA_DIR / ../shared/data")
    assert main(["demo", "--data-dir", str(data), "--epochs", "1", "--bootstrap", "100", "--plot", "",
                 "--json", str(tmp_path / "d.json")]) == 0
    result = json.loads((tmp_path / "d.json").read_text())
    assert result["n_test"] == 624 and result["test_counts"] == [234, 390]
    assert result["majority_acc"] == pytest.approx(390 / 624)
    text = capsys.readouterr().out
    assert "What the numbers mean" in text and "95% interval" in text
