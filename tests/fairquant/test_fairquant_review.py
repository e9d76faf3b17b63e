"""Review tests of FairQuantAllocator / BAQWrapper against independent references (hand-derived formulas, brute
force over tiny cases)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from medquant.fairquant.baq import BAQWrapper


def _spec_theta_grad(w: torch.Tensor, theta: torch.Tensor, g_what: torch.Tensor, b_min: int, b_max: int
                     ) -> torch.Tensor:
    """dL/dtheta per output channel from the SPEC's estimator, written out by hand:
    dL/db = sum_i g_i * (round(w_i/s) - w_i/s) * ds/db over the codes in [-q_max, q_max] (bounds included: the max
    element maps to q_max with round(w/s) - w/s ~ 0, as w^ = A for every b), ds/db = -A ln2 2^(b-1) / q_max^2,
    db/dtheta = (b_max - b_min) (1 - tanh^2 |theta|) sign(theta)."""
    t = torch.tanh(theta.abs())
    b = torch.round(b_min + (b_max - b_min) * t)
    qmax = 2.0 ** (b - 1) - 1
    a = w.abs().amax(1)
    s = (a / qmax).half().float()
    x = w / s[:, None]
    r = torch.round(x)
    inside = r.abs() <= qmax[:, None]
    ds_db = -a * math.log(2) * 2.0 ** (b - 1) / qmax ** 2
    dl_db = (g_what * (r - x) * inside).sum(1) * ds_db
    return dl_db * (b_max - b_min) * (1 - t ** 2) * torch.sign(theta)


def test_baq_logit_gradient_is_zero_when_every_bit_width_represents_the_weight_exactly():
    # rows {A, -A, 0}: w^ = w for every b (the max element maps to +-q_max exactly), so L(b) is constant and the
    # estimator's dL/db must be 0; detaching q_max in the clamp gave the max element a spurious s-gradient
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.25, 0.0, -0.25, 0.0]]))
    w = BAQWrapper(lin, init_bits={"": (4, 5)}, lambda_bit=0.0, lambda_fair=0.0)
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    F.mse_loss(lin(x), y).backward()
    # (not exactly 0: the fp16 rounding of s moves w^ by ~1e-4; the detached q_max gave 3.3 and 1.3)
    assert w.params[""].theta.grad.abs().max() < 1e-2, w.params[""].theta.grad


def test_baq_logit_gradient_matches_the_hand_derived_estimator():
    for seed in range(3):
        torch.manual_seed(seed)
        lin = nn.Linear(12, 6, bias=False)
        w0 = lin.weight.detach().clone()
        x, y = torch.randn(64, 12), torch.randn(64, 6)
        w = BAQWrapper(lin, init_bits={"": (2, 3, 4, 5, 6, 8)}, lambda_bit=0.0, lambda_fair=0.0)
        p = w.params[""]
        w_hat = lin.weight.detach().requires_grad_(True)
        g_what = torch.autograd.grad(F.mse_loss(x @ w_hat.t(), y), w_hat)[0]
        F.mse_loss(lin(x), y).backward()
        ref = _spec_theta_grad(w0, p.theta.detach(), g_what, 2, 8)
        torch.testing.assert_close(p.theta.grad, ref, rtol=1e-3, atol=1e-7)


def test_baq_weight_under_torch_compile_equals_eager_and_the_exported_layer():
    # inductor drops the float32 -> float16 -> float32 round trip of the scale (emulate_precision_casts is off by
    # default), so the compiled forward quantized with an unrounded scale: weights differing from the exported
    # layer's (which stores the float16 scale) by up to a full quantization step
    import torch._dynamo

    from medquant.quant.api import quantized_modules

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 6))
    w = BAQWrapper(model, init_bits={"0": (2, 3, 4, 5, 6, 8)})
    p = w.params["0"]
    raw = model[0].parametrizations.weight.original
    eager = p(raw).detach()
    compiled = torch.compile(p)(raw).detach()
    torch._dynamo.reset()
    assert torch.equal(compiled, eager), (compiled - eager).abs().max()
    w.export(project=False)
    assert torch.equal(quantized_modules(model)["0"].weight, compiled)


def test_arithmetic_float16_rounding_of_the_scale_equals_the_cast():
    from medquant.fairquant.baq import _round_to_float16

    torch.manual_seed(0)
    s = torch.cat([torch.exp(torch.empty(50000).uniform_(-25, 11.2)),
                   torch.tensor([0.0, 2.0 ** -14, 2.0 ** -24, 3 * 2.0 ** -25, 65504.0, 65519.0, 65520.0, 1 / 7])])
    assert torch.equal(_round_to_float16(s), s.half().float())


def test_baq_warm_started_from_an_allocator_keeps_the_layers_the_allocator_skipped_in_float():
    from medquant.fairquant import FairQuantAllocator
    from medquant.quant.api import quantized_modules
    from tests.fairquant.fq_helpers import grouped_batches, tiny_mlp

    model = tiny_mlp()
    batches = grouped_batches()
    alloc = FairQuantAllocator(skip=["fc2"], progress=False).fit(model, batches)
    assert set(alloc.bit_map()) == {"fc1"}
    w = BAQWrapper(model, init_bits=alloc)
    assert set(w.params) == {"fc1"}  # fc2 used to get learnable bits at theta = 6 (8 bits) and be quantized
    w.export(project=False)
    assert set(quantized_modules(model)) == {"fc1"}
    assert type(model.fc2) is nn.Linear
    # explicit layers / skip still choose the layers: the allocator's missing ones then start at theta = 6
    w2 = BAQWrapper(tiny_mlp(), init_bits=alloc, skip=[])
    assert set(w2.params) == {"fc1", "fc2"}
