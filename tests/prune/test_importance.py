"""Importance scores (:mod:`medquant.prune.importance`) against plain-torch references on tiny models."""
from __future__ import annotations

import pytest
import torch

from medquant.models import transformer_blocks
from medquant.prune.importance import block_scores, calibration_loss
from medquant.testing.zoo import ZOO_BY_NAME
from tests.calibrate.padding_helpers import padded_pair


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(b.abs().max())))


def _build(name: str):
    """A zoo model in eval mode; BERT's LayerNorms get random affine parameters, so that its outputs (and the
    proxy loss 0.5 * mean(y^2)) are not the same on every token."""
    model = ZOO_BY_NAME[name].build().eval()
    g = torch.Generator().manual_seed(1)
    if name == "bert":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def _pair(lengths: tuple[int, int] = (12, 7)):
    """Two token sequences (ids 4..199) as one right-padded batch (pad id 0, the zoo's PAD_ID) and unpadded."""
    return padded_pair(200, lengths, seed=0, low=4)


@torch.no_grad()
def _activation_reference(model, blocks, batches) -> dict[str, dict[str, torch.Tensor]]:
    """sum_{j in J_h} ||X_o[:, j]|| * ||W_o[:, j]|| (heads) and ||X_out[:, j]|| * ||W_out[:, j]|| (neurons), X over
    every token of ``batches`` (run one by one, unpadded), computed with plain forward hooks."""
    mods = dict(model.named_modules())
    xs: dict[str, list[torch.Tensor]] = {}
    names = [n for b in blocks for n in (b.attention.o, b.ffn.output)]
    hs = [mods[n].register_forward_pre_hook(lambda m, a, n=n: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
          for n in names]
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in hs:
            h.remove()
    out = {}
    for b in blocks:
        a, f = b.attention, b.ffn
        xo = torch.cat(xs[a.o]).norm(dim=0) * mods[a.o].weight.norm(dim=0)
        xf = torch.cat(xs[f.output]).norm(dim=0) * mods[f.output].weight.norm(dim=0)
        out[b.name] = {"heads": xo.reshape(a.n_heads, a.head_dim).sum(1), "neurons": xf}
    return out


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_activation_ignores_padding(name):
    """A right-padded batch scores like its sequences run unpadded: padding positions are not calibration tokens."""
    model = _build(name)
    blocks = transformer_blocks(model)
    p, separate = _pair()
    ref = _activation_reference(model, blocks, separate)
    got = block_scores(model, blocks, "activation", [p], progress=False)
    for b in blocks:
        for part in ("heads", "neurons"):
            _close(got[b.name][part], ref[b.name][part])
    # positional batches (input_ids, attention_mask) are masked the same way
    got_t = block_scores(model, blocks, "activation", [(p["input_ids"], p["attention_mask"])], progress=False)
    for b in blocks:
        _close(got_t[b.name]["neurons"], ref[b.name]["neurons"])


def test_proxy_loss_ignores_padding():
    """A model without a loss (BERT encoder): 0.5 * mean of y^2 over the real tokens only."""
    model = _build("bert")
    p, separate = _pair()
    with torch.no_grad():
        ys = [model(**s).last_hidden_state[0] for s in separate]
        ref = 0.5 * torch.cat(ys).pow(2).mean()
        got = calibration_loss(model, p)
    _close(got, ref)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_taylor_padded_equals_unpadded(name):
    """Taylor scores of one right-padded sequence equal those of the same sequence without padding."""
    model = _build(name)
    blocks = transformer_blocks(model)
    p, separate = _pair()
    padded = {k: v[1:] for k, v in p.items()}  # the sequence of 7 tokens padded to 12
    ref = block_scores(model, blocks, "taylor", [separate[1]], progress=False)
    got = block_scores(model, blocks, "taylor", [padded], progress=False)
    for b in blocks:
        for part in ("heads", "neurons"):
            _close(got[b.name][part], ref[b.name][part])


def test_causal_lm_loss_same_for_tensor_tuple_and_dict_batches():
    """A causal LM gets next-token cross-entropy whether the batch is a dict, a tensor or a tuple."""
    model = ZOO_BY_NAME["llama"].build().eval()
    p = _pair()[0]
    with torch.no_grad():
        logits = model(**p).logits
        # plain cross-entropy of the next real token, over real tokens only
        lab = p["input_ids"].masked_fill(p["attention_mask"] == 0, -100)
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                                ignore_index=-100)
        _close(calibration_loss(model, p), ref)
        _close(calibration_loss(model, (p["input_ids"], p["attention_mask"])), ref)
        ids = p["input_ids"][:1, :12]
        ref1 = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
        _close(calibration_loss(model, ids), ref1)
        _close(calibration_loss(model, [ids]), ref1)


def test_taylor_under_no_grad():
    """Taylor importance computes its gradients also when called inside ``torch.no_grad()``."""
    model = ZOO_BY_NAME["llama"].build().eval()
    blocks = transformer_blocks(model)
    batch = _pair()[0]
    ref = block_scores(model, blocks, "taylor", [batch], progress=False)
    with torch.no_grad():
        got = block_scores(model, blocks, "taylor", [batch], progress=False)
        assert not torch.is_grad_enabled()  # the caller's grad mode is left as it was
    for b in blocks:
        _close(got[b.name]["heads"], ref[b.name]["heads"])
        _close(got[b.name]["neurons"], ref[b.name]["neurons"])


@pytest.mark.parametrize("method", ["magnitude", "activation", "taylor"])
def test_non_finite_scores_are_refused(method):
    """NaN scores cannot be ranked (lowest_indices would pick arbitrary structures): refused, naming the block."""
    model = ZOO_BY_NAME["llama"].build().eval()
    blocks = transformer_blocks(model)
    batch = _pair()[0]
    loss_fn = None
    with torch.no_grad():
        if method == "magnitude":
            model.model.layers[1].mlp.down_proj.weight[0, 3] = float("nan")
        elif method == "activation":  # NaN activations entering the second block's down_proj
            model.model.layers[1].mlp.up_proj.weight[5, 0] = float("nan")
    if method == "taylor":  # a finite loss whose gradient is NaN at one weight: d sqrt(0 * w) / dw = inf * 0
        def loss_fn(m, b):
            w = m.model.layers[1].mlp.down_proj.weight
            return m(**b).logits.float().pow(2).mean() + (0 * w[0, 3]).sqrt()
    with pytest.raises(ValueError, match=r"model\.layers\.1.*not finite"):
        block_scores(model, blocks, method, [batch], loss_fn=loss_fn, progress=False)


def test_taylor_restores_model_state():
    """Gradients, requires_grad flags and train/eval modes are as they were after scoring, also on error."""
    model = ZOO_BY_NAME["llama"].build()
    model.train()
    model.model.layers[0].eval()
    for p in model.model.layers[1].parameters():
        p.requires_grad_(False)
    marker = torch.full_like(model.model.layers[0].mlp.up_proj.weight, 7.0)
    model.model.layers[0].mlp.up_proj.weight.grad = marker
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    blocks = transformer_blocks(model)
    block_scores(model, blocks, "taylor", [_pair()[0]], progress=False)
    with pytest.raises(ValueError, match="calibration data is empty"):
        block_scores(model, blocks, "taylor", [], progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.model.layers[0].mlp.up_proj.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if "layers.0.mlp.up_proj.weight" not in n)


def test_calib_must_be_batches_not_one_batch():
    """``calib`` is an iterable of batches; one dict batch (its keys would be iterated) is refused clearly."""
    model = ZOO_BY_NAME["llama"].build().eval()
    blocks = transformer_blocks(model)
    with pytest.raises(TypeError, match="iterable of batches"):
        block_scores(model, blocks, "activation", _pair()[0], progress=False)
    # through the pruner, which lists a non-list calib first (a dict becomes its keys)
    from medquant.prune import StructuredPruner

    with pytest.raises(TypeError, match="iterable of batches"):
        StructuredPruner(0.3, importance="taylor", progress=False).plan(model, calib=_pair()[0])


def test_block_never_run_by_calibration_is_named():
    """A scored block the calibration batches never reach gets a clear error instead of a KeyError."""
    from tests.prune._reference import plain_transformer

    model = plain_transformer()
    model.forward = lambda x: model.layers[0](x)  # the second block never runs
    blocks = transformer_blocks(model)
    x = torch.randn(2, 5, 64)
    for method in ("activation", "taylor"):
        with pytest.raises(ValueError, match="never") as err:
            block_scores(model, blocks, method, [x], progress=False)
        assert "layers.1." in str(err.value)
