"""compress() with TrainStage.feature_pairs given as a generator (or with NumPy integers): the distillation matches
the features and records the pairs exactly as with the same pairs given as a list of Python ints."""
from __future__ import annotations

import json

import numpy as np
import torch

from medquant.pipeline import TrainStage, compress
from medquant.testing.zoo import ZOO_BY_NAME


def _run(tmp_path, name, train):
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    compress(model, train=train, train_data=[inputs], out=tmp_path / name, progress=False)
    extras = json.loads((tmp_path / name / "medquant.json").read_text())["extras"]["pipeline"]
    return model, extras


def test_feature_pairs_from_a_generator_are_matched_like_a_list(tmp_path):
    torch.manual_seed(0)
    ref_model, ref = _run(tmp_path, "ref", TrainStage("distil", steps=2, lr=1e-2, feature_pairs=[(1, 1)],
                                                            feature_weight=10.0))
    torch.manual_seed(0)
    model, got = _run(tmp_path, "gen", TrainStage("distil", steps=2, lr=1e-2,
                                                        feature_pairs=((i, i) for i in [1]), feature_weight=10.0))
    assert got["train"]["feature_pairs"] == [[1, 1]]
    assert got == ref
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_feature_pairs_of_numpy_integers_are_saved_as_ints(tmp_path):
    torch.manual_seed(0)
    _, ref = _run(tmp_path, "ref", TrainStage("distil", steps=1, feature_pairs=[(1, 1)]))
    torch.manual_seed(0)
    _, got = _run(tmp_path, "np", TrainStage("distil", steps=1, feature_pairs=[(np.int64(1), np.int64(1))]))
    assert got == ref
