"""Forward hooks that change what a model computes are refused by the exporters that would drop them, not lost.

A weight-only file (compressed-tensors, GGUF) carries tensors, never the Python a module runs around its forward:
an :class:`~medquant.adaptive.AdaptiveQuantizer`'s per-sample activation quantization, a user's forward hook or
pre-hook, a ``torch.nn.utils.prune`` reparametrisation. Exported without them the file computes another model, so
the export refuses, naming each module and hook and what is accepted. The ONNX export traces the model: a hook on a
module it keeps (a block) is traced into the graph (checked with ONNX Runtime against the hooked model), a hook on a
layer it replaces by its own (Linear, Conv2d, ...) would be dropped, so it is refused; an AdaptiveQuantizer's bits
are chosen per call, which no file carries.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import medquant as mq
from medquant.adaptive import AdaptiveQuantizer
from medquant.deploy import ExportError, export
from medquant.kernels import force_backend
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")
pytest.importorskip("gguf")

from tests.deploy.test_export_matrix import _llama as _tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W4 = mq.QuantConfig(4, symmetric=True, group_size=32)
IDS = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
WEIGHT_ONLY = ["compressed-tensors", "gguf"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _llama(quantize: bool = True):
    model = _tiny_llama()
    if quantize:
        mq.quantize_(model, W4, skip=["lm_head"])
    return model


def _export(model, fmt, tmp_path, tok_dir, name="out"):
    out = tmp_path / (f"{name}.gguf" if fmt == "gguf" else name)
    return out, export(model, out, format=fmt, **({"source": tok_dir} if fmt == "gguf" else {}))


def _logits(model) -> torch.Tensor:
    with torch.no_grad(), force_backend("torch"):
        return model(input_ids=IDS).logits


# ------------------------------------------------------------------------------------ weight-only formats
@pytest.mark.parametrize("fmt", WEIGHT_ONLY)
def test_adaptive_quantizer_is_refused_by_weight_only_formats_until_removed(fmt, tmp_path, tok_dir):
    model = _llama(quantize=False)
    aq = AdaptiveQuantizer(model, sites=[("model.layers.0", "output"), "model.norm"], weight_config=W4,
                           weight_skip=["lm_head"])
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "ct")
    with pytest.raises(ExportError, match=r"(?s)model\.layers\.0: forward hook of an AdaptiveQuantizer.*"
                                          r"model\.norm: forward pre-hook of an AdaptiveQuantizer.*remove\(\)"):
        export(model, out, format=fmt, **({"source": tok_dir} if fmt == "gguf" else {}))
    assert not out.exists()
    # removed, the weights are exported alone (the model then computes with float activations)
    assert aq.remove() is model
    _export(model, fmt, tmp_path, tok_dir, "after")


@pytest.mark.parametrize("fmt", WEIGHT_ONLY)
@pytest.mark.parametrize("pre", [False, True], ids=["hook", "pre-hook"])
def test_user_forward_hook_that_changes_the_output_is_refused_by_weight_only_formats(fmt, pre, tmp_path, tok_dir):
    model = _llama()
    mlp = model.model.layers[1].mlp
    before = _logits(model)
    if pre:
        h = mlp.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
    else:
        h = mlp.register_forward_hook(lambda mod, args, out: out * 2.0)
    assert not torch.allclose(_logits(model), before)  # the hook is part of what the model computes
    kind = "forward pre-hook" if pre else "forward hook"
    with pytest.raises(ExportError, match=rf"(?s)model\.layers\.1\.mlp: {kind} <lambda>.*handle\.remove\(\)"):
        _export(model, fmt, tmp_path, tok_dir)
    h.remove()
    _export(model, fmt, tmp_path, tok_dir)


def test_user_hook_on_a_quantized_layer_is_refused_and_named(tmp_path):
    """``quantize_`` carries a Linear's hooks onto its QuantLinear: they still run, so the export still refuses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()

    def scale_up(mod, args, out):
        return out * 3

    model.model.layers[0].self_attn.q_proj.register_forward_hook(scale_up)
    mq.quantize_(model, W4, skip=["lm_head"])
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj: forward hook .*scale_up"):
        export(model, tmp_path / "ct", format="compressed-tensors")


def test_torch_pruning_reparametrisation_is_refused_with_how_to_make_it_permanent(tmp_path):
    """``torch.nn.utils.prune`` computes ``weight`` in a forward pre-hook from ``weight_orig`` and ``weight_mask``,
    which the state dict holds instead of ``weight``: a weight-only file would carry the wrong tensors."""
    from torch.nn.utils import prune

    model = _llama()
    prune.l1_unstructured(model.lm_head, "weight", amount=0.5)
    with pytest.raises(ExportError, match=r"(?s)lm_head: forward pre-hook.*L1Unstructured.*prune\.remove"):
        export(model, tmp_path / "ct", format="compressed-tensors")
    prune.remove(model.lm_head, "weight")
    export(model, tmp_path / "ct", format="compressed-tensors")


def test_hooks_without_their_handles_are_listed_and_removed(tmp_path):
    """A copy of a wrapped model carries copies of the quantizer's hooks (and of the quantizer, which the caller
    does not hold); a lambda registered without keeping its handle: ``forward_hooks`` lists them with what
    installed each, and ``remove()`` takes each off (a reparametrisation made permanent, computing as before)."""
    from torch.nn.utils import prune

    from medquant.deploy.common import forward_hooks

    model = _llama(quantize=False)
    aq = AdaptiveQuantizer(model, sites=[("model.layers.0", "output")], weight_config=W4, weight_skip=["lm_head"])
    copied = copy.deepcopy(model)
    aq.remove()
    copied.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: out * 2.0)
    prune.l1_unstructured(copied.lm_head, "weight", amount=0.5)
    with pytest.raises(ExportError, match=r"(?s)model\.layers\.0: forward hook of an AdaptiveQuantizer.*"
                                          r"forward_hooks\(model\)"):
        export(copied, tmp_path / "ct", format="compressed-tensors")
    hooks = forward_hooks(copied)
    assert [(h.module, h.kind, h.owner) for h in hooks] == [
        ("model.layers.0", "forward hook", "adaptive"), ("model.layers.1.mlp", "forward hook", "user"),
        ("lm_head", "forward pre-hook", "reparametrization")]
    with torch.no_grad():
        pruned = copied.lm_head.weight.clone()
    for h in hooks:
        h.remove()
    assert forward_hooks(copied) == []
    assert torch.equal(copied.lm_head.weight, pruned) and isinstance(copied.lm_head.weight, torch.nn.Parameter)
    export(copied, tmp_path / "ct", format="compressed-tensors")


def test_hooks_that_do_not_change_the_forward_are_accepted(tmp_path):
    """Backward hooks, state-dict hooks and transformers' ``enable_input_require_grads`` hook (it only marks the
    embeddings' output as requiring gradients) do not change what the model computes: exported as before."""
    model = _llama()
    model.model.layers[0].register_full_backward_hook(lambda mod, gin, gout: None)
    model.enable_input_require_grads()
    want = _logits(model)
    from transformers import AutoModelForCausalLM

    export(model, tmp_path / "ct", format="compressed-tensors")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, want, rtol=0, atol=1e-5)


def test_transformers_output_recorders_are_accepted():
    """transformers installs forward hooks on a model's first forward (its output recorders: they collect hidden
    states / attentions for ``output_hidden_states``, return None and change nothing): not refused."""
    from medquant.deploy.common import check_forward_hooks, forward_hooks

    entry = ZOO_BY_NAME["llava"]
    model = entry.build()
    with torch.no_grad():
        model(**entry.inputs_fn(model, torch.Generator().manual_seed(0)))
    hooks = forward_hooks(model)
    assert hooks and {h.owner for h in hooks} == {"harmless"}
    assert {h.what for h in hooks} == {"output_capturing_hook"}
    check_forward_hooks(model, "compressed-tensors")


# ------------------------------------------------------------------------------------------------------ ONNX
@pytest.fixture(scope="module")
def vit():
    entry = ZOO_BY_NAME["vit"]
    model = entry.build()
    g = torch.Generator().manual_seed(0)
    return model, entry.inputs_fn(model, g)["pixel_values"]


def _ort(path, x) -> np.ndarray:
    from medquant.deploy.onnx import OnnxClassifier

    return OnnxClassifier(path)(x)


def _torch(model, x) -> np.ndarray:
    with torch.no_grad(), force_backend("torch"):
        return model(x).logits.numpy()


W4_ONNX = mq.QuantConfig(4, symmetric=False, group_size=16)  # weight-only: no calibration needed


def test_onnx_refuses_an_adaptive_quantizer_until_removed(vit, tmp_path):
    base, x = vit
    model = copy.deepcopy(base)
    aq = AdaptiveQuantizer(model, weight_config=W4_ONNX)  # default site: the classifier's input
    with pytest.raises(ExportError, match=r"(?s)format='onnx'.*classifier: forward pre-hook of an "
                                          r"AdaptiveQuantizer.*remove\(\)"):
        export(model, tmp_path / "m.onnx", format="onnx", example_inputs=x)
    assert not (tmp_path / "m.onnx").exists()
    aq.remove()
    export(model, tmp_path / "m.onnx", format="onnx", example_inputs=x)
    np.testing.assert_allclose(_ort(tmp_path / "m.onnx", x), _torch(model, x), rtol=1e-4, atol=1e-4)


def test_onnx_refuses_a_hook_on_a_layer_it_replaces(vit, tmp_path):
    base, x = vit
    model = copy.deepcopy(base)
    mq.quantize_(model, W4_ONNX)
    h = model.classifier.register_forward_hook(lambda mod, args, out: out * 2 + 1)
    with pytest.raises(ExportError, match=r"(?s)format='onnx'.*classifier: forward hook <lambda>.*replace"):
        export(model, tmp_path / "m.onnx", format="onnx", example_inputs=x)
    assert not (tmp_path / "m.onnx").exists()
    h.remove()
    export(model, tmp_path / "m.onnx", format="onnx", example_inputs=x)


def test_onnx_traces_a_hook_on_a_module_it_keeps(vit, tmp_path):
    """A forward hook on a block (which the export keeps, its layers replaced inside it) is traced into the graph:
    ONNX Runtime computes the hooked model, not the model without the hook."""
    base, x = vit
    model = copy.deepcopy(base)
    mq.quantize_(model, W4_ONNX)
    plain = _torch(model, x)

    def double(mod, args, out):
        return (out[0] * 2,) + tuple(out[1:]) if isinstance(out, tuple) else out * 2

    model.vit.layers[0].register_forward_hook(double)
    hooked = _torch(model, x)
    assert np.abs(hooked - plain).max() > 1e-2
    export(model, tmp_path / "m.onnx", format="onnx", example_inputs=x)
    np.testing.assert_allclose(_ort(tmp_path / "m.onnx", x), hooked, rtol=1e-4, atol=1e-4)


def test_onnx_refuses_an_adaptive_quantizer_on_a_calibrated_model(vit, tmp_path):
    """A model returned by ``calibrate_activations`` is traced as it is, its own input cast (a forward pre-hook
    medquant installs) included; an AdaptiveQuantizer wrapped around it is still refused, not a bare error."""
    from medquant.deploy import calibrate_activations
    from medquant.deploy.common import forward_hooks

    base, x = vit
    model = copy.deepcopy(base)
    mq.quantize_(model, mq.QuantConfig(8, scope="channel"))
    sim = calibrate_activations(model, [x])
    assert [(h.module, h.kind, h.owner) for h in forward_hooks(sim)] == [("", "forward pre-hook", "harmless")]
    aq = AdaptiveQuantizer(sim, sites=["vit.layers.1"], weight_config=None)
    with pytest.raises(ExportError, match=r"(?s)format='onnx'.*vit\.layers\.1: forward pre-hook of an "
                                          r"AdaptiveQuantizer.*remove\(\)"):
        export(sim, tmp_path / "m.onnx", format="onnx", example_inputs=x)
    aq.remove()
    export(sim, tmp_path / "m.onnx", format="onnx", example_inputs=x)
