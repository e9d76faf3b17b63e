"""Review of :func:`medquant.pipeline.compress` and ``medquant pipeline``: a stage error comes before any stage changed
the model (checked against a copy of the model taken before the call), and the report only counts the calibration
data when a stage calibrated on it."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from medquant import QuantConfig, quantize_
from medquant.cli import main
from medquant.pipeline import PruneStage, QuantStage, TrainStage, compress
from medquant.testing.zoo import ZOO_BY_NAME


def _outputs(e, model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return e.output(model, inputs)


@pytest.mark.parametrize("pairs", [[(99, 99)], [(1, -100)]])
def test_out_of_range_feature_pairs_are_refused_before_the_prune_stage_runs(pairs):
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    reference = copy.deepcopy(model)  # the model as it was: nothing may change it before the error
    with pytest.raises(ValueError, match=r"feature pair .* out of range"):
        compress(model, prune=PruneStage(0.25, 0.25, importance="magnitude"),
                 train=TrainStage("distil", steps=1, feature_pairs=pairs), train_data=[inputs], progress=False)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == reference.model.layers[0].self_attn.q_proj.weight.shape
    assert torch.equal(_outputs(e, model, inputs), _outputs(e, reference, inputs))


def test_feature_pairs_that_are_not_index_pairs_are_refused_by_train_stage():
    with pytest.raises(TypeError, match="feature_pairs"):
        TrainStage("distil", feature_pairs=[(1, 2, 3)])


def test_in_range_feature_pairs_train_as_the_distiller_does_by_hand():
    from medquant.distill import Distiller
    from medquant.prune import StructuredPruner

    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    ref = copy.deepcopy(model)
    pairs = [(1, 1), (-1, -1)]
    torch.manual_seed(0)
    res = compress(model, prune=PruneStage(0.25, 0.25, importance="magnitude"),
                   train=TrainStage("distil", steps=2, lr=1e-3, feature_pairs=pairs), train_data=[inputs],
                   progress=False)
    torch.manual_seed(0)
    teacher = copy.deepcopy(ref).eval()
    StructuredPruner(0.25, 0.25, importance="magnitude", progress=False).prune(ref)
    losses = Distiller(teacher, ref, feature_pairs=pairs).fit([inputs], steps=2, lr=1e-3, progress=False)
    assert res.train_losses == losses
    assert torch.equal(_outputs(e, model, inputs), _outputs(e, ref, inputs))


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_quantizing_an_already_quantized_model_is_refused_before_training(method):
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    quantize_(model, QuantConfig(4, group_size=32), skip=["@head"])
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match="already quantized"):
        compress(model, train=TrainStage("finetune", steps=1, lr=1e-2), train_data=[inputs], calib=[inputs],
                 quantize=QuantStage(QuantConfig(4, group_size=32), method=method), progress=False)
    # the training stage did not run: the outputs are the quantized model's before the call
    assert torch.equal(_outputs(e, model, inputs), _outputs(e, reference, inputs))


def test_cli_report_counts_no_calibration_when_no_stage_calibrates(tmp_path):
    from tests.cli.tiny_folder import report_text_file, tiny_llama_folder

    src = tiny_llama_folder(tmp_path / "src")
    text = report_text_file(tmp_path)
    common = ["--train", "none", "--text", str(text), "--calib-samples", "8", "--max-length", "16"]
    # round-to-nearest, no pruning, no training: nothing reads the calibration texts
    assert main(["pipeline", str(src), "--out", str(tmp_path / "rtn"), "--heads", "0", "--ffn", "0",
                 "--quant", "rtn", "--group-size", "32", *common]) == 0
    report = json.loads((tmp_path / "rtn" / "pipeline_report.json").read_text())
    data = report["data"]
    assert (data["calibration_texts"], data["calibration_batches"]) == (0, 0)
    # the skipped stages' options are recorded as null, the quantization stage's as they ran
    settings = report["settings"]
    assert [settings[k] for k in ("gqa", "steps", "batch", "lr", "bits", "group_size")] == [None] * 4 + [4, 32]
    # pruning (activation importance) calibrates on the 8 texts, in 2 batches of 4
    assert main(["pipeline", str(src), "--out", str(tmp_path / "p"), "--heads", "0", "--ffn", "0.25",
                 "--quant", "none", *common]) == 0
    data = json.loads((tmp_path / "p" / "pipeline_report.json").read_text())["data"]
    assert (data["calibration_texts"], data["calibration_batches"]) == (8, 2)


def test_cli_trains_on_every_text_when_no_stage_calibrates(tmp_path):
    """Without pruning and with --quant rtn nothing reads calibration texts: none are held back from training (the
    first --calib-samples were skipped, and a text file of one training batch was refused)."""
    from tests.cli.tiny_folder import tiny_llama_folder

    src = tiny_llama_folder(tmp_path / "src")
    text = tmp_path / "four.txt"
    lines = ["no acute cardiopulmonary process", "heart size is normal", "lungs are clear",
             "no pleural effusion or pneumothorax"]
    text.write_text("\n".join(lines))
    assert main(["pipeline", str(src), "--out", str(tmp_path / "out"), "--heads", "0", "--ffn", "0",
                 "--train", "finetune", "--steps", "1", "--batch", "4", "--quant", "rtn", "--text", str(text),
                 "--max-length", "16"]) == 0
    data = json.loads((tmp_path / "out" / "pipeline_report.json").read_text())["data"]
    assert (data["calibration_texts"], data["training_texts"], data["training_batches"]) == (0, 4, 1)
