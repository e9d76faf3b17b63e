"""GPTQ's calibration shortcuts change nothing: layers reading the same input tensor share one ``X^T X`` per call
(q/k/v, gate/up) and then one factorisation of their equal Hessians, and a Linear's inputs are checked through the diagonal of ``X^T X`` - against separate
accumulation over full forwards, separate factorisations and plain torch."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medquant import QuantConfig, QuantLinear
from medquant.calibrate import gptq
from medquant.calibrate.gptq import HessianAccumulator, gptq_quantize_sequential
from medquant.testing.zoo import ZOO_BY_NAME


def _separate_capture(block, inputs, accs, labels, masks=None, unmasked=frozenset(), experts=None, tokens=None,
                      encoder_masks=None, encoder_tokens=None):
    """The plain capture: every layer accumulates its own input on every full call of the block (the batches here
    are not padded: ``masks`` is ``None``; the model has no MoE experts)."""
    assert masks is None and encoder_masks is None and encoder_tokens is None and not experts.parents
    current = [None]

    def make(n):
        def hook(mod, args, kwargs):
            accs[n].add((args[0] if args else kwargs["input"]).detach(), current[0])
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(make(n), with_kwargs=True) for n in accs]
    try:
        for i, (a, k) in enumerate(zip(inputs.args, inputs.kwargs)):
            current[0] = labels[i] if labels is not None else None
            block(*a, **k)
    finally:
        for h in handles:
            h.remove()


def _recording(monkeypatch):
    """Record every Hessian handed to GPTQ (layer name -> H) and count the ``X^T X`` products formed."""
    hessians: dict[str, torch.Tensor] = {}
    products = [0]
    hessian, prods = HessianAccumulator.hessian, HessianAccumulator.products

    def rec_hessian(self):
        h = hessian(self)
        hessians[self.name] = h.clone()
        return h

    def count_products(self, x, labels=None, mask=None):
        products[0] += 1
        return prods(self, x, labels, mask)

    monkeypatch.setattr(HessianAccumulator, "hessian", rec_hessian)
    monkeypatch.setattr(HessianAccumulator, "products", count_products)
    return hessians, products


def test_shared_products_and_early_stop_give_the_same_hessians_and_codes(monkeypatch):
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    first = e.inputs(model)
    g = torch.Generator().manual_seed(1)
    batches = [first, dict(first, input_ids=torch.randint(0, 64, first["input_ids"].shape, generator=g)),
               dict(first, input_ids=torch.randint(0, 64, first["input_ids"].shape, generator=g))]
    cfg = QuantConfig(4, group_size=32)
    plain = copy.deepcopy(model)
    n_blocks = len(model.model.layers)
    down_calls = [0]
    # counts the float layer's calls (the hook is carried to the quantized layer, whose calls are not counted)
    model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, *a: down_calls.__setitem__(0, down_calls[0] + (not isinstance(m, QuantLinear))))

    prepared = [0]
    prepare = gptq._prepare

    def count_prepare(*args):
        prepared[0] += 1
        return prepare(*args)

    monkeypatch.setattr(gptq, "_prepare", count_prepare)
    hs_fast, n_fast = _recording(monkeypatch)
    gptq_quantize_sequential(model, cfg, batches, skip=["@head"], device="cpu", progress=False)
    fast_products, fast_prepared = n_fast[0], prepared[0]
    prepared[0] = 0
    hs_plain, n_plain = _recording(monkeypatch)
    monkeypatch.setattr(gptq, "_capture_block", _separate_capture)
    monkeypatch.setattr(gptq._Factors, "get", lambda self, *a: None)  # every layer factorises its own Hessian
    gptq_quantize_sequential(plain, cfg, batches, skip=["@head"], device="cpu", progress=False)

    # q/k/v read one tensor, gate/up another: 4 products and 4 factorisations per block and call instead of 7
    assert fast_products == 4 * n_blocks * len(batches) and n_plain[0] == 7 * n_blocks * len(batches)
    assert fast_prepared == 4 * n_blocks and prepared[0] == 7 * n_blocks
    assert down_calls[0] == len(batches)  # every call of the float block runs whole (no early stop)
    assert hs_fast.keys() == hs_plain.keys() and len(hs_fast) == 7 * n_blocks
    for name in hs_plain:
        assert torch.equal(hs_fast[name], hs_plain[name]), name
    a, b = model.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Fork(nn.Module):
    """Three layers read x; d reads x after an in-place change (same object, new version: not shared)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 4), nn.Linear(16, 8)

    def forward(self, x):
        x = x.clone()
        y = self.a(x) + self.b(x) + self.c(x).repeat(1, 2)
        x.mul_(2)
        return y + self.d(x)


def test_shared_products_follow_the_tensor_and_its_version(monkeypatch):
    torch.manual_seed(0)
    model = _Fork()
    calib = [torch.randn(32, 16) for _ in range(3)]
    _, n_products = _recording(monkeypatch)
    accs = gptq._capture(model, ["a", "b", "c", "d"], calib, False, None, None)  # one stage of four layers
    assert n_products[0] == 2 * len(calib)  # (a, b, c) share x; d's x was changed in place

    def ref(scale: float) -> torch.Tensor:  # plain torch: float32 products summed in float64
        s = sum((scale * x).T.matmul(scale * x).double() for x in calib)
        return 2 * s / sum(x.shape[0] for x in calib)

    for n in "abc":
        assert torch.equal(accs[n].hessian()[0], ref(1.0)), n
    assert torch.equal(accs["d"].hessian()[0], ref(2.0))
    assert all(acc.calls == len(calib) and acc.rows == 96 for acc in accs.values())


def test_non_finite_inputs_found_through_the_products():
    lin = nn.Linear(8, 4)
    acc = HessianAccumulator(lin, "proj")
    x = torch.randn(2, 5, 8)
    acc.add(x)
    bad = x.clone()
    bad[1, 2, 3] = float("inf")
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer proj: calibration input holds 2 NaN/inf values \(call 1\)"):
        acc.add(bad)
    with pytest.raises(ValueError, match=r"layer proj: calibration input too large \(max \|x\| = 1e\+20\)"):
        acc.add(torch.full((3, 8), 1e20))
    assert acc.calls == 1 and acc.rows == 10  # nothing of a refused call was added
    torch.testing.assert_close(acc.hessian()[0], 2 * x.reshape(-1, 8).double().T @ x.reshape(-1, 8).double() / 10)
