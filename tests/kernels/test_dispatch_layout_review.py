"""Review tests of dispatch / bundle / layout: a forced backend is local to the thread that forces it."""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from medquant.kernels import PackedWeight, dispatch, packed_linear
from medquant.kernels.layout import pack, padded_k


def _run_in_thread(fn):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_force_backend_interleaved_threads_do_not_leak():
    """Thread A enters force_backend("torch"), thread B enters force_backend("cpu"), A leaves, then B leaves.

    With one process-wide forced backend, B's exit restored A's "torch" (its ``prev``) for good, so every later
    "auto" call in the process ran the reference. Each thread's block must affect only that thread."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def thread_a():
        with dispatch.force_backend("torch"):
            seen["a_inside"] = dispatch.forced_backend()
            a_in.set()
            b_in.wait(5)
            seen["a_inside_after_b"] = dispatch.forced_backend()
        a_out.set()

    def thread_b():
        a_in.wait(5)
        seen["b_before"] = dispatch.forced_backend()
        with dispatch.force_backend("cpu"):
            b_in.set()
            a_out.wait(5)
            seen["b_inside"] = dispatch.forced_backend()

    ta, tb = threading.Thread(target=thread_a), threading.Thread(target=thread_b)
    ta.start(), tb.start()
    ta.join(10), tb.join(10)
    assert seen == {"a_inside": "torch", "a_inside_after_b": "torch", "b_before": None, "b_inside": "cpu"}
    assert dispatch.forced_backend() is None
    assert _run_in_thread(dispatch.forced_backend) is None


def test_forced_backend_in_one_thread_does_not_reach_another():
    """``packed_linear(..., backend="triton")`` in one thread must not make a CPU call in another fail."""
    k, n, bits = 40, 3, 4
    kp = padded_k(k, bits, None)
    codes = torch.randint(0, 16, (n, kp), generator=torch.Generator().manual_seed(0))
    codes[:, k:] = 0
    w = PackedWeight(pack(codes, bits), torch.rand(n, 1).half(), None, bits, True, "channel", kp, k)
    x = torch.randn(2, k)
    ref = F.linear(x.double(), w.dequantize(torch.float64))
    with dispatch.force_backend("triton"):  # unavailable for CPU tensors without the interpreter
        assert _run_in_thread(dispatch.forced_backend) is None
        y = _run_in_thread(lambda: packed_linear(x, w))
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)


def test_generation_tells_forced_states_apart_across_threads():
    """Prepared callables are cached on :func:`dispatch.generation`: a thread inside a force_backend block and
    one outside it must not see the same value (else one would reuse the other's kernel choice)."""
    with dispatch.force_backend("torch"):
        inside = dispatch.generation()
        outside = _run_in_thread(dispatch.generation)
        assert inside != outside
        assert dispatch.generation() == inside
