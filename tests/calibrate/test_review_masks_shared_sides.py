"""One module bound in both stacks of an encoder-decoder: each call's rows take the mask of the side that runs it.

GPTQ collects a shared module's inputs from every use into one Hessian (the module docstring of
``medquant.calibrate.gptq``). Before, the side of the call was read from the module's *planned name* alone: a BART
whose decoder layer reuses the encoder layer's ``fc1`` (one module object) had its decoder calls masked with the
encoder's ``attention_mask`` (the shapes match: both sequences are ``T`` long), so real decoder rows were dropped
and decoder padding rows were kept.

The reference: plain forward hooks on the float model, a flag set while ``model.model.encoder`` runs, and for each
call of the shared ``fc1`` the rows of the ``attention_mask`` (encoder running) or of the
``decoder_attention_mask`` (otherwise); ``H = 2 X^T X / n`` over those rows.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from medquant.calibrate import gptq as gptq_mod
from medquant.calibrate._forward import MaskSides, batch_masks
from medquant.calibrate.gptq import gptq_quantize_
from tests.calibrate.test_encoder_decoder_masks import CONFIG, _bart, _batches

ONLY_FC1 = r"re:^(?!model\.(en|de)coder\.layers\.0\.fc1$).*"


def _shared_bart():
    model = _bart()
    model.model.decoder.layers[0].fc1 = model.model.encoder.layers[0].fc1
    return model


def _reference(model, batches) -> torch.Tensor:
    """The rows of the shared fc1 over the batches, each call by the side running it (float64)."""
    encoder = model.model.encoder
    running = [False]
    current: list[dict] = [{}]
    rows: list[torch.Tensor] = []

    def pre(mod, args):
        key = "attention_mask" if running[0] else "decoder_attention_mask"
        x = args[0].detach().double()
        m = current[0].get(key)
        rows.append(x.reshape(-1, x.shape[-1]) if m is None else x[m != 0])

    hooks = [encoder.register_forward_pre_hook(lambda *a: running.__setitem__(0, True)),
             encoder.register_forward_hook(lambda *a: running.__setitem__(0, False)),
             model.model.encoder.layers[0].fc1.register_forward_pre_hook(pre)]
    try:
        with torch.no_grad():
            for b in batches:
                current[0] = b
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(rows)


@pytest.mark.parametrize("kind", ["decoder_mask", "no_decoder_mask"])
def test_a_module_shared_by_the_encoder_and_the_decoder_takes_each_calls_side(kind, monkeypatch):
    model, batches = _shared_bart(), _batches(kind)
    x = _reference(copy.deepcopy(model), batches)
    got: dict[str, torch.Tensor] = {}
    real = gptq_mod._quantize_layer

    def spy(module, hessian, config, damp, block_size, act_order, name, *a, **k):
        got[name] = hessian.detach().clone()
        return real(module, hessian, config, damp, block_size, act_order, name, *a, **k)

    monkeypatch.setattr(gptq_mod, "_quantize_layer", spy)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*stay in floating point")
        records = gptq_quantize_(model, CONFIG, batches, skip=[ONLY_FC1], progress=False)
    (name, hessian), = got.items()
    assert records[name]["rows"] == x.shape[0]
    torch.testing.assert_close(hessian.reshape(x.shape[1], -1), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-7)
    assert model.model.decoder.layers[0].fc1 is model.model.encoder.layers[0].fc1  # still one (quantized) module


def test_the_side_of_a_call_follows_the_running_stack_in_a_tracked_forward():
    """MaskSides in a tracked whole-model forward: the encoder-side mask while the encoder runs, the decoder's
    after it, whatever the name given; without tracking (block by block) the name decides, as before."""
    model = _shared_bart()
    sides = MaskSides(model)
    batch = _batches()[0]
    masks = batch_masks(batch)
    seen: list[tuple[bool, bool]] = []
    fc1 = model.model.encoder.layers[0].fc1
    with sides.tracking(model) as states:
        h = fc1.register_forward_pre_hook(
            lambda mod, args: seen.append((sides.mask("model.encoder.layers.0.fc1", args[0], masks, states)
                                           is masks.encoder,
                                           sides.mask("model.decoder.layers.0.fc1", args[0], masks, states)
                                           is masks.encoder)))
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            h.remove()
    assert seen == [(True, True), (False, False)]  # the encoder's call, then the decoder's
    x = torch.zeros(2, 8, 32)
    assert sides.mask("model.encoder.layers.0.fc1", x, masks) is masks.encoder
    assert sides.mask("model.decoder.layers.0.fc1", x, masks) is masks.decoder
