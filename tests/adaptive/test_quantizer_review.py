"""Review tests of AdaptiveQuantizer / fake_quantize_per_sample against a hand-written plain-torch reference."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from medquant.adaptive.fakequant import fake_quantize_per_sample
from medquant.adaptive.quantizer import AdaptiveQuantizer

BIT_MAP = {0: 2, 1: 4, 2: 8, 3: 32}


def ref_fq(x: torch.Tensor, bits) -> torch.Tensor:
    """Hand-written per-sample asymmetric fake quantization (float32 math, zero inside the range)."""
    out = torch.empty(x.shape, dtype=torch.float32)
    for i in range(x.shape[0]):
        r, b = x[i].float(), int(bits[i])
        if b >= 16:
            out[i] = r
            continue
        lo, hi, top = torch.clamp(r.min(), max=0), torch.clamp(r.max(), min=0), 2**b - 1
        s = torch.clamp((hi - lo) / top, min=torch.finfo(torch.float32).tiny)
        z = torch.clamp(torch.round(-lo / s), 0, top)
        out[i] = (torch.clamp(torch.round(r / s) + z, 0, top) - z) * s
    return out.to(x.dtype)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def _setup(dtype=torch.float32):
    torch.manual_seed(1)
    net = Net().to(dtype)
    return net, copy.deepcopy(net), torch.randn(4, 6, dtype=dtype)


def _expected(ref_net, x, levels):
    return ref_net.head(ref_fq(torch.relu(ref_net.body(x)), [BIT_MAP[int(lv)] for lv in levels]))


@pytest.mark.parametrize("levels", [[0, 1, 2, 3], np.array([3, 1, 0, 2], dtype=np.int32),
                                    torch.tensor([2, 2, 0, 3], dtype=torch.uint8), [np.int64(1), 3, 0, 0]])
def test_mixed_levels_in_any_container_match_the_hand_reference(levels):
    net, ref_net, x = _setup()
    aq = AdaptiveQuantizer(net, weight_config=None)
    assert torch.equal(aq(x, levels=levels), _expected(ref_net, x, levels))


def test_bf16_model_matches_the_float32_math_reference():
    net, ref_net, x = _setup(torch.bfloat16)
    aq = AdaptiveQuantizer(net, weight_config=None)
    out = aq(x, levels=[0, 1, 2, 3])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _expected(ref_net, x, [0, 1, 2, 3]))


def test_straight_through_gradient_equals_identity():
    x = torch.randn(3, 2, 5, requires_grad=True)
    w = torch.randn(3, 2, 5)
    (fake_quantize_per_sample(x, [1, 3, 32]) * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_remove_gives_back_the_original_model():
    net, ref_net, x = _setup()
    aq = AdaptiveQuantizer(net, weight_config=None)
    aq(x, levels=[0, 0, 0, 0])
    model = aq.remove()
    assert not model.head._forward_pre_hooks and not model.head._forward_hooks
    assert torch.equal(model(x), ref_net(x))


@pytest.mark.parametrize("second_sites", [None, ["body"]])
def test_second_quantizer_on_a_model_already_wrapped_is_refused_clearly(second_sites):
    net, ref_net, x = _setup()
    first = AdaptiveQuantizer(net, weight_config=None)
    with pytest.raises(ValueError, match="already.*AdaptiveQuantizer.*remove"):
        AdaptiveQuantizer(net, weight_config=None, bit_map={0: 8, 1: 8, 2: 8, 3: 8}, sites=second_sites)
    # the first one still works, and no hook of the refused one was left behind
    assert torch.equal(first(x, levels=[0, 1, 2, 3]), _expected(ref_net, x, [0, 1, 2, 3]))
    assert len(net.head._forward_pre_hooks) == 1 and not net.body._forward_pre_hooks
    # after remove() the model may be wrapped again
    first.remove()
    again = AdaptiveQuantizer(net, weight_config=None)
    assert torch.equal(again(x, levels=[3, 2, 1, 0]), _expected(ref_net, x, [3, 2, 1, 0]))


def test_torch_compile_follows_the_levels_of_each_call():
    net, ref_net, x = _setup()
    compiled = torch.compile(AdaptiveQuantizer(net, weight_config=None), backend="eager")
    for levels in ([0, 1, 2, 3], [3, 2, 1, 0]):
        assert torch.allclose(compiled(x, levels=levels), _expected(ref_net, x, levels), atol=1e-6)


@pytest.mark.parametrize("width", [4, 32])
def test_zero_dim_bits_tensor_is_refused_whatever_its_value(width):
    # one entry per sample is the contract; a 0-d tensor used to be broadcast when quantizing (4) but refused when
    # passing through (32)
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="one entry per row"):
        fake_quantize_per_sample(x, torch.tensor(width))
    assert torch.equal(fake_quantize_per_sample(x, torch.tensor([width] * 4)), ref_fq(x, [width] * 4))


def test_disabled_in_one_thread_does_not_turn_off_another_threads_call():
    # calls' bits are per thread; aq.disabled() in thread A (a float baseline) must not make thread B's concurrent
    # quantized call run in float
    import threading

    net, ref_net, x = _setup()
    aq = AdaptiveQuantizer(net, weight_config=None)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def baseline():
        with aq.disabled():
            inside.set()
            done.wait(10)
            seen["float"] = aq(x, levels=[0, 0, 0, 0])

    t = threading.Thread(target=baseline)
    t.start()
    inside.wait(10)
    try:
        seen["quantized"] = aq(x, levels=[0, 1, 2, 3])
    finally:
        done.set()
        t.join(10)
    assert torch.equal(seen["quantized"], _expected(ref_net, x, [0, 1, 2, 3]))
    assert torch.equal(seen["float"], ref_net(x))  # the disabling thread's own call is float
    with aq.disabled():  # a direct model call in the disabling thread passes through too
        assert torch.equal(net(x), ref_net(x))


def test_disabled_reaches_data_parallel_replicas_running_in_worker_threads():
    # nn.DataParallel replicates the wrapper in the calling thread and runs each replica in a worker thread: the
    # replicas made inside aq.disabled() run in float, those made outside quantize
    import threading

    net, ref_net, x = _setup()
    aq = AdaptiveQuantizer(net, weight_config=None)
    out = {}

    def run_in_worker(replica, key):
        t = threading.Thread(target=lambda: out.__setitem__(key, replica(x, levels=torch.tensor([0, 1, 2, 3]))))
        t.start()
        t.join(10)

    with aq.disabled():
        off = aq._replicate_for_data_parallel()
        run_in_worker(off, "off")
    run_in_worker(aq._replicate_for_data_parallel(), "on")
    assert torch.equal(out["off"], ref_net(x))
    assert torch.equal(out["on"], _expected(ref_net, x, [0, 1, 2, 3]))
