"""Review (s0710): folding AWQ scales into a norm of the form ``x_hat * (1 + w)`` (Gemma 1-3) stored in bfloat16 /
float16. The fold writes ``w' = (1 + w) / s - 1``; near -1 these dtypes keep few bits of the gain ``1 + w'`` (a
bfloat16 step there is 2^-8 of an absolute gain that may be ~0.05), so the gain actually stored was off by
several percent per channel, and a gain below half a step was stored as exactly 0 (the channel dropped from the
float model), while the linears were multiplied by ``s`` as if the gain were exact. The references are float64
computations of ``norm -> linear`` with the stored parameters before and after the fold: the fold must change
them only by the linears' own rounding, as for a norm of the form ``x_hat * w``."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from medquant import QuantConfig
from medquant.calibrate import awq
from medquant.calibrate.awq import ScaleGroup, search_and_fold
from medquant.testing.zoo import ZOO_BY_NAME

K, N = 256, 64


def _pair(norm_cls, dtype):
    torch.manual_seed(0)
    m = nn.Module()
    m.norm = norm_cls(K)
    m.lin = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        # a gain 1 + w in 0.5 .. 1.5 for either form
        m.norm.weight.copy_(torch.rand(K) + 0.5 - (1.0 if norm_cls is Gemma3RMSNorm else 0.0))
    return m.to(dtype)


def _composite(m, offset, x):
    """float64 ``lin(x_hat * gain)`` from the module's stored (rounded) parameters."""
    x = x.double()
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    gain = m.norm.weight.double() + (1.0 if offset else 0.0)
    return (x_hat * gain) @ m.lin.weight.double().T


def _fold_error(norm_cls, dtype, s):
    m = _pair(norm_cls, dtype)
    x = torch.randn(32, K, generator=torch.Generator().manual_seed(1))
    before = _composite(m, norm_cls is Gemma3RMSNorm, x)
    awq._fold(m, ScaleGroup("norm", ["lin"]), s)
    after = _composite(m, norm_cls is Gemma3RMSNorm, x)
    return float((after - before).norm() / before.norm())


def _scales():
    return torch.exp(torch.randn(K, generator=torch.Generator().manual_seed(2)) * 1.5)  # ~0.01 .. 100


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_offset_norm_fold_is_as_exact_as_a_plain_norm_fold(dtype):
    s = _scales()
    plain = _fold_error(LlamaRMSNorm, dtype, s)
    offset = _fold_error(Gemma3RMSNorm, dtype, s)
    assert plain < 5e-3
    assert offset < 2 * plain, (offset, plain)


def test_a_gain_below_half_a_bfloat16_step_is_not_stored_as_zero():
    m = _pair(Gemma3RMSNorm, torch.bfloat16)
    gain = 1.0 + m.norm.weight.float()
    s = torch.ones(K)
    s[:8] = 2000.0  # (1 + w) / s < 2^-9: w' rounds to -1 in bfloat16
    x = torch.randn(32, K, generator=torch.Generator().manual_seed(1))
    before = _composite(m, True, x)
    awq._fold(m, ScaleGroup("norm", ["lin"]), s)
    assert bool((m.norm.weight.float()[:8] + 1.0 > 0).all())  # the channels keep a gain of the right sign
    assert bool((gain[:8] > 0).all())
    after = _composite(m, True, x)
    assert float((after - before).norm() / before.norm()) < 5e-3


def test_gemma3_logits_in_bfloat16_change_as_little_as_llamas(monkeypatch):
    """Through search_and_fold, with the searched scales replaced by wide ones (AWQ's scales at alpha near 1 on
    activations with outlier channels): Gemma 3's logits change as little as LLaMA's by the fold."""
    def wide(root, g, x, config, grid):
        g.alpha, g.err_rtn, g.err_awq = 1.0, 0.0, 0.0
        return torch.exp(torch.randn(x.shape[1], generator=torch.Generator().manual_seed(len(g.prev))) * 1.5)

    monkeypatch.setattr(awq, "_search_group", wide)
    changes = {}
    for name in ("llama", "gemma3_text"):
        entry = ZOO_BY_NAME[name]
        base = entry.build()
        batch = entry.inputs(base)
        m = copy.deepcopy(base).to(torch.bfloat16)
        ref = entry.output(m, batch).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            search_and_fold(m, QuantConfig(bits=4), [batch], progress=False)
        out = entry.output(m, batch).double()
        changes[name] = float((out - ref).norm() / ref.norm())
    assert changes["gemma3_text"] < 2 * changes["llama"] + 1e-3, changes
