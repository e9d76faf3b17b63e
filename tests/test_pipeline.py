"""prune -> distil/fine-tune -> quantize in one call; the result saves and reloads with identical outputs."""
from __future__ import annotations

import pytest
import torch

from medquant import QuantConfig
from medquant.pipeline import PruneStage, QuantStage, TrainStage, compress, load_compressed
from medquant.quant.modules import QuantLinear
from medquant.testing.zoo import ZOO_BY_NAME


@pytest.mark.parametrize("name,heads,train,method", [("llama", 0.5, "distil", "awq"),
                                                    ("qwen2", 0.3, "finetune", "rtn")])
def test_pipeline_round_trip(tmp_path, name, heads, train, method):
    e = ZOO_BY_NAME[name]
    model = e.build()
    inputs = e.inputs(model)
    teacher_out = e.output(model, inputs).detach()
    res = compress(model, calib=[inputs], train_data=[inputs] * 2,
                   prune=PruneStage(heads, 0.3, layer_select=True),
                   train=TrainStage(train, steps=2, lr=1e-3),
                   quantize=QuantStage(QuantConfig(4, group_size=32), method=method),
                   out=tmp_path / "c", progress=False)
    assert len(res.train_losses) == 2 and res.plan is not None and res.block_influence is not None
    assert model.model.layers[0].mlp.up_proj.__class__ is QuantLinear
    assert model.lm_head.__class__ is torch.nn.Linear  # @head skipped
    assert (res.awq_groups is not None) == (method == "awq")
    with torch.no_grad():
        out = e.output(model, inputs)
        assert not torch.equal(out, teacher_out)
        again = load_compressed(tmp_path / "c")
        assert torch.equal(e.output(again, inputs), out)


def test_stages_optional_and_errors():
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    res = compress(model, prune=PruneStage(0.25, 0.0, importance="magnitude"), progress=False)
    assert model.model.layers[0].self_attn.q_proj.out_features == 96 and not res.train_losses
    with pytest.raises(ValueError, match="needs train_data"):
        compress(model, train=TrainStage("distil", steps=1), progress=False)
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(model, quantize=QuantStage(QuantConfig(4)), progress=False)
    with pytest.raises(ValueError, match="'distil' or 'finetune'"):
        TrainStage("kd")
    assert e.output(model, inputs).shape == (2, 12, 256)


def test_parameter_report_counts_quantized_weights():
    from medquant import quantize_
    from medquant.prune import parameter_report

    model = ZOO_BY_NAME["llama"].build()
    before = parameter_report(model)
    quantize_(model, QuantConfig(4, group_size=32), skip=["@head"])
    after = parameter_report(model)
    assert after["non_embedding_params"] == before["non_embedding_params"]
    assert after["bytes"] < before["bytes"] / 2


@pytest.mark.parametrize("kw, message", [
    ({"steps": 1.5}, "steps must be an integer >= 1, got 1.5"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"steps": True}, "steps must be an integer >= 1, got True"),
    ({"alpha": 5.0}, r"alpha must be in \[0, 1\], got 5.0"),
    ({"temperature": -1.0}, "temperature must be a finite number > 0, got -1.0"),
    ({"temperature": float("inf")}, "temperature must be a finite number > 0, got inf"),
    ({"mode": "finetune", "feature_pairs": [(1, 1)]}, "feature_pairs match teacher features"),
])
def test_train_stage_refuses_bad_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainStage(**{"mode": "distil", **kw})


def test_finetune_records_the_settings_that_ran(tmp_path):
    import json

    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    compress(model, train=TrainStage("finetune", steps=1, lr=1e-3, alpha=0.7, temperature=3.0),
             train_data=[inputs], out=tmp_path / "f", progress=False)
    rec = json.loads((tmp_path / "f" / "medquant.json").read_text())["extras"]["pipeline"]["train"]
    assert rec == {"mode": "finetune", "steps": 1, "lr": 1e-3, "alpha": 0.0, "temperature": None,
                   "feature_pairs": [], "feature_weight": None}
    compress(model, train=TrainStage("distil", steps=1, lr=1e-3, alpha=0.7, temperature=3.0, feature_pairs=[(1, 1)]),
             train_data=[inputs], out=tmp_path / "d", progress=False)
    rec = json.loads((tmp_path / "d" / "medquant.json").read_text())["extras"]["pipeline"]["train"]
    assert rec == {"mode": "distil", "steps": 1, "lr": 1e-3, "alpha": 0.7, "temperature": 3.0,
                   "feature_pairs": [[1, 1]], "feature_weight": 1.0}


def test_quant_stage_skip_as_one_string_is_one_pattern():
    from medquant.quant.api import quantized_modules

    assert QuantStage(QuantConfig(4), skip="@head").skip == ("@head",)
    assert QuantStage(QuantConfig(4), skip=None).skip == ()
    e = ZOO_BY_NAME["llama"]
    model, ref = e.build(), e.build()
    compress(model, quantize=QuantStage(QuantConfig(4, group_size=32), method="rtn", skip="@head"), progress=False)
    from medquant import quantize_

    quantize_(ref, QuantConfig(4, group_size=32), skip=["@head"])
    assert sorted(quantized_modules(model)) == sorted(quantized_modules(ref))
    assert "lm_head" not in quantized_modules(model)
