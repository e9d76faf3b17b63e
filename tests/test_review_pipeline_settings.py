"""compress() with stage settings given as NumPy scalars or a generator of feature pairs: the stages run and the
result is saved exactly as with the same settings given as Python numbers and a list (the reference run)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medquant.pipeline import PruneStage, TrainStage, compress
from medquant.testing.zoo import ZOO_BY_NAME


def _run(tmp_path, name, prune, train):
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    compress(model, prune=prune, train=train, calib=[inputs], train_data=[inputs], out=tmp_path / name,
             progress=False)
    extras = json.loads((tmp_path / name / "medquant.json").read_text())["extras"]["pipeline"]
    return model, extras


def test_numpy_scalar_settings_save_like_python_numbers(tmp_path):
    torch.manual_seed(0)
    ref_model, ref = _run(tmp_path, "ref", PruneStage(0.25, 0.5, importance="magnitude", spread=0.5),
                          TrainStage("distil", steps=2, lr=2 ** -10, alpha=0.5, temperature=2.0, feature_pairs=[(1, 1)],
                                     feature_weight=0.5))
    torch.manual_seed(0)
    model, got = _run(tmp_path, "np",
                      PruneStage(np.float32(0.25), np.float32(0.5), importance="magnitude", spread=np.float32(0.5)),
                      TrainStage("distil", steps=np.int64(2), lr=np.float32(2 ** -10), alpha=np.float32(0.5),
                                 temperature=np.float32(2.0), feature_pairs=[(np.int64(1), np.int64(1))],
                                 feature_weight=np.float32(0.5)))
    assert got == ref
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [{"alpha": True}, {"temperature": True}, {"lr": True}, {"feature_weight": False},
                                {"alpha": "0.5"}, {"temperature": "2"}])
def test_train_stage_refuses_bools_and_strings_for_its_numbers(kw):
    (name, value), = kw.items()
    with pytest.raises(ValueError, match=f"TrainStage.{name} must be .*got {value!r}"):
        TrainStage("distil", **kw)
