"""Fourth review of GPTQ (medquant/calibrate/gptq.py) and its block-by-block driver: each test is a defect found in
that review, shown against plain torch (Hessians ``2 sum x x^T / n`` over every call of the layer) and the
independent float64 GPTQ of ``test_gptq_review.py``."""
from __future__ import annotations

import copy

import torch
from torch import nn

from medquant import QuantConfig
from medquant.calibrate.gptq import gptq_quantize_

from .test_gptq_review import _ref_gptq


def _plain_hessian(xs: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
    return 2 * x.T @ x / x.shape[0]


class _Repeat(nn.Module):
    """``fc`` is applied once to a short batch and twice to a long one (data-dependent control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        y = self.fc(x)
        if x.shape[0] > 6:
            y = self.fc(torch.tanh(y))
        return self.out(y)


def test_a_layer_called_more_often_by_a_later_batch_gets_every_call(recorded_hessians):
    """Batch 0 calls ``fc`` once, batch 1 twice: the Hessian holds all three inputs (6 + 9 + 9 rows), as a plain
    hook over full forwards collects them. Before the fix the early stop was decided on batch 0 alone, so batch 1's
    pass stopped at fc's first call and its second input was lost (15 rows)."""
    torch.manual_seed(0)
    model = _Repeat()
    ref = copy.deepcopy(model)
    batches = [torch.randn(6, 16), torch.randn(9, 16)]
    inputs: list[torch.Tensor] = []
    ref.fc.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    with torch.no_grad():
        for b in batches:
            ref(b)
    assert len(inputs) == 3
    want = _plain_hessian(inputs)
    seen = recorded_hessians  # the Hessians GPTQ factorises, by layer
    cfg = QuantConfig(4, group_size=8)
    rec = gptq_quantize_(model, cfg, batches, skip=["out"], progress=False)
    assert rec["fc"]["rows"] == 24
    torch.testing.assert_close(seen["fc"][0], want, rtol=1e-5, atol=1e-7)
    expect = _ref_gptq(ref.fc.weight.detach(), want, 4, cfg.is_symmetric(4), "group", 8, cfg.torch_scale_dtype)
    torch.testing.assert_close(model.fc.dequantized_weight(torch.float64), expect, rtol=1e-6, atol=1e-9)
