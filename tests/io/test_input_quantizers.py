"""Static activation quantizers (learned rounding's ``act_bits``) through ``medquant.save`` / ``medquant.load``.

Before, the quantizers (forward pre-hooks) were not saved: a W4A8 model came back as W4A16 without a word. The
reference is the saved model itself (same outputs bit for bit after loading) and the recorded parameters.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import medquant
from medquant import QuantConfig
from medquant.calibrate import InputQuantizer, adaround_quantize_
from medquant.io import CheckpointError
from medquant.quant.activations import attach_recorded, input_quantizers, recorded_quantizers
from medquant.testing.zoo import ZOO_BY_NAME


@pytest.fixture(scope="module")
def w4a8():
    """A ViT whose blocks are learned-rounded with 8-bit activations, its float copy and a test input."""
    model = ZOO_BY_NAME["vit"].build().eval()
    float_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    calib = [{"pixel_values": torch.randn(2, 3, 32, 32, generator=g)} for _ in range(2)]
    blocks = [f"vit.layers.{i}" for i in range(len(model.vit.layers))]
    adaround_quantize_(model, QuantConfig(4, group_size=32), calib, skip=["classifier"], blocks=blocks, iters=3,
                       act_bits=8, progress=False)
    return model, float_model, {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def _out(model, x):
    with torch.no_grad():
        return model(**x).logits


def test_a_w4a8_model_loads_with_its_activation_quantizers(w4a8, tmp_path):
    model, float_model, x = w4a8
    saved = {n: q.as_dict() for n, q in input_quantizers(model).items()}
    assert set(saved) >= {f"vit.layers.{i}" for i in range(len(model.vit.layers))}
    medquant.save(model, tmp_path / "ck")
    recorded = json.loads((tmp_path / "ck" / "medquant.json").read_text())["input_quantizers"]
    assert recorded == saved
    for loaded in (medquant.load(tmp_path / "ck"), medquant.load(tmp_path / "ck", model=copy.deepcopy(float_model))):
        assert {n: q.as_dict() for n, q in input_quantizers(loaded).items()} == saved
        assert torch.equal(_out(loaded, x), _out(model, x))
    # the control: the same weights without the activation quantizers compute otherwise
    bare = medquant.load(tmp_path / "ck")
    for n in input_quantizers(bare):
        bare.get_submodule(n).input_quantizer_handle.remove()
    assert not torch.equal(_out(bare, x), _out(model, x))
    # a quantizer switched off before saving stays off: the file records the active ones only
    bare_path = medquant.save(bare, tmp_path / "bare")
    assert "input_quantizers" not in json.loads((bare_path / "medquant.json").read_text())
    assert not input_quantizers(medquant.load(bare_path, model=copy.deepcopy(model)))  # a model passed with some


def test_records_are_checked_before_anything_is_attached(w4a8):
    model = w4a8[1]
    good = {"bits": 8, "symmetric": False, "scale": 0.1, "zero": 3}
    with pytest.raises(ValueError, match="recorded for 'vit.nope'"):
        attach_recorded(model, {"vit.layers.0": good, "vit.nope": good})
    assert not input_quantizers(model)
    for bad, err in (({**good, "bits": 1}, ValueError), ({**good, "scale": 0.0}, ValueError),
                     ({"bits": 8}, TypeError), ({**good, "zero": 1.5}, TypeError), ({**good, "symmetric": 1}, TypeError)):
        with pytest.raises(err):
            recorded_quantizers(model, {"vit.layers.0": bad})
    built = attach_recorded(model, {"vit.layers.0": good})
    assert isinstance(built["vit.layers.0"], InputQuantizer) and list(input_quantizers(model)) == ["vit.layers.0"]
    x = torch.randn(1, 5, model.config.hidden_size)
    assert torch.equal(built["vit.layers.0"](x), (torch.clamp(torch.round(x / 0.1) + 3, 0, 255) - 3) * 0.1)
    attach_recorded(model, {})
    assert not input_quantizers(model)


def test_a_checkpoint_whose_record_names_a_missing_module_is_refused(w4a8, tmp_path):
    from medquant.io.checkpoint import _recorded_input_quantizers

    model = w4a8[0]
    with pytest.raises(CheckpointError, match="recorded for 'vit.nope'"):
        _recorded_input_quantizers(model, {"input_quantizers": {"vit.nope": {"bits": 8, "symmetric": True,
                                                                             "scale": 1.0, "zero": 0}}})
    with pytest.raises(CheckpointError, match="input_quantizers must be an object"):
        _recorded_input_quantizers(model, {"input_quantizers": []})


@pytest.mark.parametrize("writer", ["save_pretrained", "medquant.save"])
def test_transformers_from_pretrained_attaches_them_again(w4a8, tmp_path, writer):
    """``medquant.hf.save_pretrained`` (and ``medquant.save`` of a transformers model, whose ``config.json`` it
    also writes) record them in ``quantization_config.input_quantizers``; transformers' own ``from_pretrained``
    then gives the saved model's outputs bit for bit."""
    from transformers import AutoModelForImageClassification

    import medquant.hf

    model, _, x = w4a8
    saved = {n: q.as_dict() for n, q in input_quantizers(model).items()}
    if writer == "save_pretrained":
        medquant.hf.save_pretrained(model, tmp_path / "hf")
    else:
        medquant.save(model, tmp_path / "hf")
    recorded = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]["input_quantizers"]
    assert recorded == saved
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert {n: q.as_dict() for n, q in input_quantizers(loaded).items()} == saved
    assert torch.equal(_out(loaded, x), _out(model, x))


def test_the_transformers_config_checks_its_records():
    from medquant.hf import MedQuantConfig

    good = {"bits": 8, "symmetric": True, "scale": 0.5, "zero": 0}
    assert MedQuantConfig(4, input_quantizers={"a": good}).to_dict()["input_quantizers"] == {"a": good}
    assert "input_quantizers" not in MedQuantConfig(4).to_dict()  # a model without them writes no field
    with pytest.raises(ValueError, match=r"input_quantizers: the input quantizer of 'a'.*bits"):
        MedQuantConfig(4, input_quantizers={"a": {**good, "bits": 40}})
    with pytest.raises(TypeError, match="must be a mapping"):
        MedQuantConfig(4, input_quantizers=[good])


def _two_layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32)).eval()


def _fq(x, scale=0.3, zero=7, bits=4):
    """The asymmetric fake quantization, written out (the reference)."""
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


def test_a_quantizer_attached_before_the_layer_is_swapped_is_saved_and_loaded(tmp_path):
    """Attached to a float layer that quantize_ then replaces: the quantized layer runs the hook (the hook tables
    are carried), so the model is W4A4; it was not listed by input_quantizers, not saved, and came back W4A16."""
    fresh = _two_layers()
    model = copy.deepcopy(fresh)
    InputQuantizer(4, False, 0.3, 7).attach(model[0])
    medquant.quantize_(model, QuantConfig(4, group_size=32))
    x = torch.randn(3, 32)
    with torch.no_grad():  # the reference: the quantized layers without any hook, on the fake-quantized input
        layer0 = medquant.QuantLinear.from_float(fresh[0], QuantConfig(4, group_size=32))
        layer2 = medquant.QuantLinear.from_float(fresh[2], QuantConfig(4, group_size=32))
        ref = layer2(torch.relu(layer0(_fq(x))))
        assert torch.equal(model(x), ref)
    assert {n: q.as_dict() for n, q in input_quantizers(model).items()} == {
        "0": {"bits": 4, "symmetric": False, "scale": 0.3, "zero": 7}}
    path = medquant.save(model, tmp_path / "ck")
    assert json.loads((path / "medquant.json").read_text())["input_quantizers"] == {
        "0": {"bits": 4, "symmetric": False, "scale": 0.3, "zero": 7}}
    loaded = medquant.load(path, model=copy.deepcopy(fresh))
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    # the handle the error messages point at removes it from the swapped layer
    model[0].input_quantizer_handle.remove()
    assert not input_quantizers(model) and not model[0]._forward_pre_hooks


def test_dequantize_keeps_the_quantizer_listed():
    model = _two_layers()
    medquant.quantize_(model, QuantConfig(4, group_size=32))
    InputQuantizer(4, False, 0.3, 7).attach(model[0])
    medquant.dequantize_(model)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model[2](torch.relu(torch.nn.functional.linear(_fq(x), model[0].weight,
                                                                                    model[0].bias))))
    assert list(input_quantizers(model)) == ["0"]


def test_a_load_into_a_passed_model_removes_a_quantizer_on_a_replaced_layer(tmp_path):
    """The checkpoint records no input quantizer; the passed model has one on a float layer the load replaces by
    its quantized layer: the load must remove it (it was carried onto the quantized layer and kept running)."""
    saved = _two_layers()
    passed = copy.deepcopy(saved)
    medquant.quantize_(saved, QuantConfig(4, group_size=32))
    path = medquant.save(saved, tmp_path / "ck")
    InputQuantizer(4, False, 0.3, 7).attach(passed[0])
    loaded = medquant.load(path, model=passed)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), saved(x))
    assert not input_quantizers(loaded) and not loaded[0]._forward_pre_hooks


def test_a_quantizer_carried_into_a_layer_with_hooks_of_its_own_is_removable_there():
    from medquant.quant.api import carry_hooks

    old, new = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    seen = []
    new.register_forward_pre_hook(lambda m, a: seen.append(1))
    InputQuantizer(4, False, 0.3, 7).attach(old)
    carry_hooks(old, new)  # new's table is its own: the hook is copied into it
    assert len(new._forward_pre_hooks) == 2 and isinstance(new.input_quantizer, InputQuantizer)
    new.input_quantizer_handle.remove()
    assert len(new._forward_pre_hooks) == 1 and not new._forward_pre_hooks_with_kwargs
    assert len(old._forward_pre_hooks) == 1  # the old layer's own table is not touched
    new(torch.zeros(1, 4))
    assert seen == [1]


class _Shared(torch.nn.Module):
    def __init__(self, share: bool = True):
        super().__init__()
        self.a, self.mid = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
        self.b = self.a if share else torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.b(torch.relu(self.mid(self.a(x))))


def test_a_shared_layer_loaded_into_two_layers_with_quantizers_keeps_none_of_them(tmp_path):
    """The checkpoint binds one quantized layer under ``a`` and ``b`` and records no input quantizer; the passed
    model has two layers there, each with its quantizer. Both were carried onto the one quantized layer, one of them
    untracked: it kept running after the load removed the other."""
    torch.manual_seed(0)
    saved = _Shared().eval()
    medquant.quantize_(saved, QuantConfig(4, group_size=32))
    path = medquant.save(saved, tmp_path / "ck")
    passed = _Shared(share=False).eval()
    InputQuantizer(4, False, 0.3, 7).attach(passed.a)
    InputQuantizer(4, False, 0.2, 7).attach(passed.b)
    loaded = medquant.load(path, model=passed)
    assert loaded.a is loaded.b and not input_quantizers(loaded) and not loaded.a._forward_pre_hooks
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), saved(x))


@pytest.mark.parametrize("rec", [{"bits": 8, "symmetric": False, "scale": 0.1, "zero": 256},
                                 {"bits": 8, "symmetric": False, "scale": 0.1, "zero": -1},
                                 {"bits": 4, "symmetric": True, "scale": 0.1, "zero": 3}])
def test_a_zero_point_off_the_code_range_is_refused(rec, tmp_path):
    """An asymmetric zero point outside [0, 2^b - 1] cannot represent 0 (with zero=256 at 8 bits every x^ is
    (clamp(r + 256, 0, 255) - 256) s <= -s); a symmetric record has none. Such a record loaded and ran."""
    model = _two_layers()
    with pytest.raises(ValueError, match="zero"):
        recorded_quantizers(model, {"0": rec})
    medquant.quantize_(model, QuantConfig(4, group_size=32))
    path = medquant.save(model, tmp_path / "ck")
    meta = json.loads((path / "medquant.json").read_text())
    meta["input_quantizers"] = {"0": rec}
    (path / "medquant.json").write_text(json.dumps(meta))
    (path / "medquant.manifest.json").unlink(missing_ok=True)  # the hand-edited file: only its contents matter
    with pytest.raises(CheckpointError, match="zero"):
        medquant.load(path, model=_two_layers())
