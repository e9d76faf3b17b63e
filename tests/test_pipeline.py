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
