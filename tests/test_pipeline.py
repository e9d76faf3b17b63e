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


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before) -> bool:
    sd = model.state_dict()
    return set(sd) == set(before) and all(sd[k].shape == v.shape and torch.equal(sd[k], v) for k, v in before.items())


def test_train_data_generator_runs_every_step_and_the_record_says_so(tmp_path):
    import json

    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    res = compress(model, train=TrainStage("finetune", steps=3, lr=1e-3), train_data=(b for b in [inputs]),
                   out=tmp_path / "c", progress=False)
    assert len(res.train_losses) == 3  # a one-shot generator is read once into a list, then cycled
    rec = json.loads((tmp_path / "c" / "medquant.json").read_text())["extras"]["pipeline"]["train"]
    assert rec["steps"] == len(res.train_losses) == 3


def test_awq_scope_does_not_follow_the_prune_scope(tmp_path):
    import json

    from medquant.calibrate.awq import awq_groups

    e = ZOO_BY_NAME["llava"]
    torch.manual_seed(0)
    model = e.build().eval()
    inputs = e.inputs(model)
    expected = [(g.prev, g.linears) for g in awq_groups(model)]  # AWQ's own default scope: the language model
    assert expected and all("language_model" in p for p, _ in expected)
    res = compress(model, prune=PruneStage(0.0, 0.25, scope="vision", importance="magnitude"),
                   quantize=QuantStage(QuantConfig(4, group_size=32), method="awq"), calib=[inputs],
                   out=tmp_path / "c", progress=False)
    assert [(g.prev, g.linears) for g in res.awq_groups] == expected
    rec = json.loads((tmp_path / "c" / "medquant.json").read_text())["extras"]["pipeline"]["quantize"]
    assert rec["method"] == "awq"
    assert [(g["prev"], g["linears"]) for g in rec["awq_groups"]] == [(p, list(ls)) for p, ls in expected]


@pytest.mark.parametrize("kw, message", [
    ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
    ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
    ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
    ({"lr": -1e-3}, "lr must be a finite number > 0, got -0.001"),
    ({"feature_pairs": [(1, 1)], "feature_weight": float("nan")}, "feature_weight must be a finite number >= 0"),
    ({"feature_weight": -1.0}, "feature_weight must be a finite number >= 0, got -1.0"),
    ({"feature_weight": float("inf")}, "feature_weight must be a finite number >= 0, got inf"),
])
def test_train_stage_refuses_non_finite_lr_and_feature_weight(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainStage(**{"mode": "distil", **kw})


@pytest.mark.parametrize("name, stages, data, message", [
    ("llama", {"train": TrainStage("finetune", steps=1)}, {}, "needs train_data"),
    ("llama", {"train": TrainStage("finetune", steps=1)}, {"train_data": []}, "at least one batch"),
    ("llama", {"quantize": QuantStage(QuantConfig(4, group_size=32), method="awq")}, {}, "needs calibration data"),
    ("bert", {"quantize": QuantStage(QuantConfig(4, group_size=32), method="awq")}, {"calib": True},
     "no foldable"),
    ("siglip_vision", {"train": TrainStage("finetune", steps=1)}, {"train_data": True}, "cannot compute its loss"),
    ("llama", {"quantize": QuantStage(QuantConfig(4, group_size=32), method="rtn", skip="model.layers.0.upproj")},
     {}, "matches no module"),
])
def test_stage_requirements_are_checked_before_the_prune_stage_changes_the_model(name, stages, data, message):
    e = ZOO_BY_NAME[name]
    torch.manual_seed(0)
    model = e.build().eval()
    inputs = e.inputs(model)
    data = {k: [inputs] if v is True else v for k, v in data.items()}
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        compress(model, prune=PruneStage(0.5, 0.5, importance="magnitude"), progress=False, **stages, **data)
    assert _same_state(model, before)  # not pruned


def test_awq_with_a_bad_skip_pattern_is_refused_before_folding():
    from medquant.calibrate.awq import awq_quantize_

    e = ZOO_BY_NAME["llama"]
    model = e.build().eval()
    inputs = e.inputs(model)
    before = _state(model)
    with pytest.raises(ValueError, match="matches no module"):
        awq_quantize_(model, QuantConfig(4, group_size=32), [inputs], skip=["model.layers.0.mlp.upproj"],
                      progress=False)
    assert _same_state(model, before)
    with pytest.raises(ValueError, match="matches no module"):
        compress(model, quantize=QuantStage(QuantConfig(4, group_size=32), method="awq",
                                            skip="model.layers.0.mlp.upproj"), calib=[inputs], progress=False)
    assert _same_state(model, before)


@pytest.mark.parametrize("drop, error, message", [
    (1.5, TypeError, "drop_blocks must be a number of blocks"),
    (True, TypeError, "drop_blocks must be a number of blocks"),
    (-1, ValueError, "drop_blocks must be an integer >= 0"),
    ([1], TypeError, "block names"),
])
def test_prune_stage_refuses_bad_drop_blocks(drop, error, message):
    with pytest.raises(error, match=message):
        PruneStage(0.0, 0.0, drop_blocks=drop)


def test_prune_stage_drops_named_blocks():
    e = ZOO_BY_NAME["llama"]
    model = e.build().eval()
    n = len(model.model.layers)
    res = compress(model, prune=PruneStage(0.0, 0.0, importance="magnitude", drop_blocks=["model.layers.0"]),
                   progress=False)
    assert len(model.model.layers) == n - 1 and res.plan is not None


@pytest.mark.parametrize("arg", ["calib", "train_data"])
def test_one_batch_instead_of_a_sequence_is_a_clear_type_error(arg):
    e = ZOO_BY_NAME["llama"]
    model = e.build().eval()
    inputs = e.inputs(model)
    before = _state(model)
    with pytest.raises(TypeError, match=rf"{arg} must be a sequence .* got one batch .*pass \[batch\]"):
        compress(model, prune=PruneStage(0.25, 0.25), train=TrainStage("finetune", steps=1), progress=False,
                 **{"calib": [inputs], "train_data": [inputs], arg: inputs})
    assert _same_state(model, before)


def test_finetune_progress_bar_is_labelled_finetune(monkeypatch):
    from medquant.distill import distiller

    seen = []
    real = distiller.train_steps

    def spy(*a, **kw):
        seen.append(kw.get("desc"))
        return real(*a, **kw)

    monkeypatch.setattr(distiller, "train_steps", spy)
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    res = compress(model, train=TrainStage("finetune", steps=2, lr=1e-3), train_data=[inputs], progress=False)
    assert len(res.train_losses) == 2
    assert seen == ["finetune"]


def test_a_diverging_training_stage_stops_with_a_clear_error_and_writes_nothing(tmp_path):
    # a learning rate far too high: the loss turns inf / NaN within a few steps; the run stops there instead of
    # quantizing NaN weights and writing a NaN loss into the checkpoint's report
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    with pytest.raises(FloatingPointError, match=r"training step \d+: the loss is (nan|inf)"):
        compress(model, train=TrainStage("finetune", steps=50, lr=1e6), train_data=[inputs],
                 quantize=QuantStage(QuantConfig(4, group_size=32), method="rtn"), out=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("progress", [True, False])
def test_rtn_quant_stage_shows_its_progress_bar_as_asked(progress, capsys):
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    compress(model, quantize=QuantStage(QuantConfig(4, group_size=32), method="rtn"), progress=progress)
    assert model.model.layers[0].mlp.up_proj.__class__ is QuantLinear
    assert ("quantizing" in capsys.readouterr().err) == progress
