"""``python -m benchmarks.fairquant_allocate`` / ``fairquant_baq`` end to end on a small stand-in data set (the real
loaders are exercised by ``benchmarks.fairquant``)."""
import json

import torch

import medquant
from benchmarks import fairquant_allocate, fairquant_baq
from benchmarks.common import datasets as ds
from benchmarks.common.nets import build


def _tiny_data(data_dir=None):
    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.rand(n, 1, 16, 16, generator=g)
        y = (x[:, :, 4:12, 4:12].mean((1, 2, 3)) > x.mean((1, 2, 3))).long()
        return x, y, torch.arange(n) % 2

    return {"train": split(60), "val": split(20), "test": split(30),
            "info": {"name": "stand-in", "classes": ["a", "b"], "groups": ["F", "M"]}}


def test_allocate(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ds.DATASETS, "nih", _tiny_data)
    out = tmp_path / "model"
    rc = fairquant_allocate.main(["--epochs", "1", "--calib-batches", "3", "--batch-size", "20", "--target-bits", "4",
               "--out", str(out), "--json"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "parameter-weighted average bits" in text and "features.0" in text and "FairQuant" in text
    extras = medquant.load_extras(out)
    assert abs(extras["fairquant"]["average_bits"] - 4.0) <= 0.1
    model = medquant.load(out, model=build("cnn", 1, 2, image=16))
    assert abs(medquant.model_size(model).effective_bits - extras["fairquant"]["average_bits"]) < 1e-9
    rows = json.loads(text[text.index("[\n"):])
    assert rows[1]["avg_bits"] == extras["fairquant"]["average_bits"]


def test_baq(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ds.DATASETS, "nih", _tiny_data)
    out = tmp_path / "baq"
    rc = fairquant_baq.main(["--epochs", "1", "--calib-batches", "2", "--batch-size", "20", "--target-bits", "4",
               "--logit-lr", "0.05", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "BAQ:" in text and "FQ-BAQ" in text
    extras = medquant.load_extras(out)
    model = medquant.load(out, model=build("cnn", 1, 2, image=16))
    bm = extras["baq"]["bit_map"]
    for name, bits in bm.items():
        assert model.get_submodule(name).row_bits().tolist() == bits
    assert medquant.model_size(model).effective_bits <= 4.1


def _no_data(data_dir=None):
    raise AssertionError("the data set was read before the arguments were checked")


def test_bad_arguments_are_refused_before_any_data_or_training(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setitem(ds.DATASETS, "nih", _no_data)
    with pytest.raises(ValueError, match="impossible with the palette"):
        fairquant_allocate.main(["--target-bits", "-1", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--bit-range must be"):
        fairquant_baq.main(["--bit-range", "9", "2", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="outside --bit-range"):
        fairquant_baq.main(["--bit-range", "2", "6", "--target-bits", "7", "--out", str(tmp_path / "c")])
