"""AdaptiveQuantizer: mixed-bit batches, sites, int8 weights, training (STE), accounting, errors."""
from __future__ import annotations

import copy
import io
import threading

import numpy as np
import pytest
import torch

from medquant import QuantConfig, QuantLinear, quantize_
from medquant.adaptive import (
    AdaptiveQuantizer,
    CompactCNN,
    SmallViT,
    block_output_sites,
    fake_quantize_per_sample,
)
from medquant.complexity import ComplexityScorer
from medquant.testing.zoo import ZOO_BY_NAME
from tests.adaptive.test_adaptive_fakequant import independent_fq


def _cnn(seed=0, n_labels=3):
    torch.manual_seed(seed)
    return CompactCNN(n_labels, in_channels=1, widths=(8, 8, 16), hidden=16).eval()


def _x(n=6, size=16, seed=0):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_mixed_batch_equals_single_sample_and_manual_head():
    model = _cnn()
    ref_model = copy.deepcopy(model)
    seen = {}
    # registered before the quantizer's hook: sees the raw activation; head[0] then sees the quantized one
    model.head.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0].detach().clone()))
    model.head[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("q", a[0].detach().clone()))
    aq = AdaptiveQuantizer(model, weight_config=None).eval()  # default site: input of `head`
    assert aq.sites == [("head", "input")]
    x = _x()
    levels = torch.tensor([0, 1, 2, 3, 0, 2])
    bits = [2, 4, 8, 32, 2, 8]
    with torch.no_grad():
        out = aq(x, levels=levels)
        raw, q = seen["raw"], seen["q"]
        for i in range(len(x)):
            # the quantized activation of sample i = the single-sample result at its own bits
            aq(x[i:i + 1], levels=levels[i:i + 1])
            assert torch.allclose(seen["raw"], raw[i:i + 1], atol=1e-6)  # same input up to conv batching
            single_q = fake_quantize_per_sample(raw[i:i + 1], bits[i:i + 1])
            assert torch.equal(q[i:i + 1], single_q), i
            assert torch.equal(q[i], independent_fq(raw[i], bits[i])), i
            assert torch.allclose(out[i:i + 1], ref_model.head(independent_fq(raw[i:i + 1], bits[i])),
                                  atol=1e-6, rtol=0), i
        full = ref_model(x)
    assert torch.equal(q[3], raw[3])  # 32 bits: untouched
    assert torch.allclose(out[3], full[3], atol=1e-6)
    assert not torch.allclose(out[0], full[0], atol=1e-4)  # 2 bits changes the logits (the test can fail)


def test_block_output_sites_on_small_vit():
    torch.manual_seed(0)
    model = SmallViT(2, image_size=16, patch=4, dim=32, depth=3, heads=4, hidden=16).eval()
    ref = copy.deepcopy(model)
    sites = block_output_sites(model)
    assert sites == [("blocks.0", "output"), ("blocks.1", "output"), ("blocks.2", "output")]
    aq = AdaptiveQuantizer(model, sites=sites, weight_config=None).eval()
    x = _x(4, 16, seed=5)
    bits = [2, 8, 4, 32]
    with torch.no_grad():
        out = aq(x, bits=torch.tensor(bits))
        for i in range(4):
            h = ref.patch(x[i:i + 1]).flatten(2).transpose(1, 2) + ref.pos
            for blk in ref.blocks:
                h = independent_fq(blk(h), bits[i])
            manual = ref.head(ref.norm(h).mean(dim=1))
            assert torch.allclose(out[i:i + 1], manual, atol=1e-5, rtol=0), i
        full = ref(x)
    assert torch.allclose(out[3], full[3], atol=1e-5)  # 32 bits at every site: the float model
    assert not torch.allclose(out[0], full[0], atol=1e-3)


def test_hf_vit_layers_as_sites():
    entry = ZOO_BY_NAME["vit"]
    model = entry.build()
    inputs = entry.inputs(model)
    ref = copy.deepcopy(model)
    sites = block_output_sites(model)
    assert len(sites) == 2
    aq = AdaptiveQuantizer(model, sites=sites, weight_config=None).eval()
    with torch.no_grad():
        mixed = aq(**inputs, bits=torch.tensor([2, 32])).logits
        alone = aq(pixel_values=inputs["pixel_values"][:1], bits=torch.tensor([2])).logits
        full = ref(**inputs).logits
    assert torch.allclose(mixed[:1], alone, atol=1e-5)
    assert torch.allclose(mixed[1], full[1], atol=1e-5)
    assert not torch.allclose(mixed[0], full[0], atol=1e-3)


def test_int8_weights_through_quantize_():
    model = _cnn(1)
    w8_ref = quantize_(copy.deepcopy(model), QuantConfig(8, scope="channel"))
    aq = AdaptiveQuantizer(model).eval()  # default weights: int8 per output channel
    assert isinstance(aq.model.head[0], QuantLinear) and aq.model.head[0].effective_bits == 8
    x = _x(3, seed=2)
    with torch.no_grad():
        assert torch.equal(aq(x, bits=torch.full((3,), 32)), w8_ref(x))
        low = AdaptiveQuantizer(copy.deepcopy(_cnn(1)), weight_config=QuantConfig(4, group_size=32))
        assert low.model.head[0].effective_bits == 4


def test_training_straight_through_gradients():
    model = _cnn(2).train()
    ref = copy.deepcopy(model)
    for m in (model, ref):  # dropout off so both runs see the same function
        m.head[2].p = 0.0
    aq = AdaptiveQuantizer(model, weight_config=None).train()
    x, y = _x(4, seed=3), torch.rand(4, 3, generator=torch.Generator().manual_seed(9))
    bits = [2, 4, 8, 32]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(aq(x, bits=torch.tensor(bits)), y)
    loss.backward()
    # reference: quantized value forward, identity backward, written by hand
    e = ref.embed(x)
    q = torch.stack([independent_fq(e[i].detach(), bits[i]) for i in range(4)])
    e_ste = e + (q - e).detach()
    loss_ref = torch.nn.functional.binary_cross_entropy_with_logits(ref.head(e_ste), y)
    loss_ref.backward()
    assert torch.allclose(loss, loss_ref, atol=1e-6)
    for (n, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and torch.allclose(p.grad, pr.grad, atol=1e-6, rtol=1e-4), n
    assert model.blocks[0].conv.weight.grad.abs().sum() > 0


def test_average_bit_accounting_by_hand():
    aq = AdaptiveQuantizer(_cnn(), weight_config=None).eval()
    with torch.no_grad():
        aq(_x(4), levels=torch.tensor([0, 0, 1, 3]))
        aq(_x(3, seed=1), levels=[2, 3, 3])
        aq(_x(2, seed=2), bits=torch.tensor([4, 8]))
    st = aq.stats()
    # hand count: 2+2+4+32 + 8+32+32 + 4+8 = 124 over 9 samples
    assert st["samples"] == 9
    assert st["average_bits"] == pytest.approx(124 / 9)
    assert st["histogram"] == {2: 2, 4: 2, 8: 2, 32: 3}
    assert st["per_level"] == {0: {"samples": 2, "average_bits": 2.0}, 1: {"samples": 1, "average_bits": 4.0},
                               2: {"samples": 1, "average_bits": 8.0}, 3: {"samples": 3, "average_bits": 32.0}}
    aq.reset_stats()
    assert aq.stats()["samples"] == 0


def test_levels_from_fitted_scorer_on_raw_images():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(8, 16, 16), dtype=np.uint8)
    raw[:4] //= 16  # low-contrast images: a spread of complexity
    scorer = ComplexityScorer(n_levels=4).fit(raw)
    aq = AdaptiveQuantizer(_cnn(), scorer=scorer, weight_config=None).eval()
    x = torch.from_numpy(raw).float().unsqueeze(1) / 255.0 - 0.5
    with torch.no_grad():
        a = aq(x, images=raw)
        b = aq(x, levels=scorer.levels(raw))
    assert torch.equal(a, b)
    assert aq.stats()["samples"] == 16


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown module name 'haed'.*head"):
        AdaptiveQuantizer(_cnn(), sites=["haed"], weight_config=None)
    with pytest.raises(ValueError, match="site"):
        AdaptiveQuantizer(_cnn(), sites=[("head", "middle")], weight_config=None)
    with pytest.raises(ValueError, match="bits must be"):
        AdaptiveQuantizer(_cnn(), bit_map={0: 12}, weight_config=None)
    with pytest.raises(ValueError, match="classification head"):
        AdaptiveQuantizer(torch.nn.Sequential(torch.nn.Linear(2, 2)), weight_config=None)
    aq = AdaptiveQuantizer(_cnn(), weight_config=None).eval()
    x = _x(4)
    with pytest.raises(ValueError, match="3 per-sample bit-widths.*shape \\(4, 16\\)"):
        aq(x, levels=torch.tensor([0, 1, 2]))  # levels of the wrong length
    with pytest.raises(ValueError, match="unknown level.*\\[7\\]"):
        aq(x, levels=torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match="no levels"):
        aq(x)
    with pytest.raises(ValueError, match="only one"):
        aq(x, levels=[0, 0, 0, 0], bits=[2, 2, 2, 2])
    with pytest.raises(RuntimeError, match="without per-sample bits"):
        aq.model(x)  # hooks refuse to run silently unquantized
    with aq.disabled():
        assert aq.model(x).shape == (4, 3)
    with aq.bits_context([2, 2, 2, 2]):
        assert aq.model(x).shape == (4, 3)
    scorer = ComplexityScorer(n_levels=5).fit(np.random.default_rng(0).integers(0, 255, (6, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="bit_map only has"):
        AdaptiveQuantizer(_cnn(), scorer=scorer, weight_config=None)


def test_sparse_large_levels_map_without_a_dense_table():
    """Levels are looked up, not used as indices of a table of max(level) + 1 entries (a level of 10**12 asked for
    8 TB; 10**9 took seconds and 8 GB)."""
    big = 10**12
    aq = AdaptiveQuantizer(_cnn(), bit_map={0: 2, big: 8, 7: 32}, weight_config=None).eval()
    assert aq.levels_to_bits([big, 0, 7, 7, big]).tolist() == [8, 2, 32, 32, 8]
    x = _x(3)
    with torch.no_grad():
        assert torch.equal(aq(x, levels=[big, 0, 7]), aq(x, bits=[8, 2, 32]))
    with pytest.raises(ValueError, match="unknown level.*\\[5\\]"):
        aq.levels_to_bits([0, 5])


def test_empty_batch_with_bits_list():
    """bits=[] for an empty batch (``[b] * len(x)`` with len(x) == 0) was refused as float32; levels=[] worked."""
    aq = AdaptiveQuantizer(_cnn(), weight_config=None).eval()
    x = _x(0)
    with torch.no_grad():
        assert aq(x, bits=[]).shape == (0, 3)
        assert aq(x, bits=[4] * len(x)).shape == (0, 3)
        with aq.bits_context([]):
            assert aq.model(x).shape == (0, 3)
    assert aq.stats()["samples"] == 0


def test_deepcopy_and_pickle_give_an_independent_working_quantizer():
    """The hooks were closures over the original wrapper: a deep copy's model called the original's hooks (which had
    no bits: RuntimeError), and torch.save of the wrapper failed (local functions do not pickle)."""
    model = _cnn()
    ref = copy.deepcopy(model)
    aq = AdaptiveQuantizer(model, weight_config=None).eval()
    x = _x(4)
    bits = [2, 4, 8, 32]
    with torch.no_grad():
        out = aq(x, bits=bits)
        manual = torch.cat([ref.head(independent_fq(ref.embed(x[i:i + 1]), bits[i])) for i in range(4)])
        assert torch.allclose(out, manual, atol=1e-6, rtol=0)
        twin = copy.deepcopy(aq)
        assert torch.equal(twin(x, bits=bits), out)
        twin.remove()  # removes the copy's hooks only
        assert torch.allclose(twin.model(x), ref(x), atol=1e-6, rtol=0)
        assert torch.equal(aq(x, bits=bits), out)
        buf = io.BytesIO()
        torch.save(aq, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        assert torch.equal(back(x, bits=bits), out)


class _Gate(torch.nn.Module):
    """Identity that stops thread "A" inside the model (after its quantizer call set A's bits, before the site)
    until thread "B" has entered its own call, and stops B there until A's call has returned."""

    def __init__(self):
        super().__init__()
        self.a_inside, self.b_inside, self.a_done = threading.Event(), threading.Event(), threading.Event()

    def forward(self, x):
        name = threading.current_thread().name
        if name == "A":
            self.a_inside.set()
            assert self.b_inside.wait(10)
        elif name == "B":
            self.b_inside.set()
            assert self.a_done.wait(10)
        return x


def test_concurrent_calls_from_two_threads_each_use_their_own_bits():
    """The per-call bits were one attribute of the wrapper: a call made while another thread's call was inside the
    model replaced them, so thread A's sample was quantized at B's 8 bits (silently), and B's site then found A's
    restored "no bits" and raised. (nn.DataParallel runs its replicas the same way, in threads.)"""
    model = torch.nn.Sequential()
    model.gate = _Gate()
    model.head = torch.nn.Identity()
    gate = model.gate
    aq = AdaptiveQuantizer(model, weight_config=None)  # site: input of `head`, after the gate
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
    out: dict[str, object] = {}

    def run(name, x, bits, after=None):
        try:
            if after is not None:
                assert after.wait(10)
            out[name] = aq(x, bits=bits)
        except (RuntimeError, ValueError, AssertionError) as e:  # reported by the asserts below
            out[name] = e
        finally:
            if name == "A":
                gate.a_done.set()

    ta = threading.Thread(target=run, args=("A", xa, [2]), name="A")
    tb = threading.Thread(target=run, args=("B", xb, [8], gate.a_inside), name="B")
    ta.start()
    tb.start()
    ta.join(20)
    tb.join(20)
    assert isinstance(out["A"], torch.Tensor) and isinstance(out["B"], torch.Tensor), out
    assert torch.equal(out["A"][0], independent_fq(xa[0], 2))  # A's own 2 bits, not B's 8
    assert torch.equal(out["B"][0], independent_fq(xb[0], 8))
    assert aq.stats()["histogram"] == {2: 1, 8: 1}


def test_calls_after_remove_raise_instead_of_running_unquantized():
    """After ``remove()`` the wrapper still ran the model - without any activation quantization - and recorded the
    samples in ``stats()`` at the bits asked for."""
    model = _cnn()
    ref = copy.deepcopy(model)
    aq = AdaptiveQuantizer(model, weight_config=None).eval()
    x = _x(4)
    with torch.no_grad():
        aq(x, bits=[2, 2, 2, 2])
        before = aq.stats()
        assert aq.remove() is model
        with pytest.raises(RuntimeError, match=r"remove\(\)"):
            aq(x, bits=[2, 2, 2, 2])
        with pytest.raises(RuntimeError, match=r"remove\(\)"), aq.bits_context([2, 2, 2, 2]):
            pass
        assert aq.stats() == before
        assert torch.allclose(model(x), ref(x), atol=1e-6, rtol=0)  # the returned model: float activations
        aq.remove()  # a second remove() is harmless


class _CheckpointedNet(torch.nn.Module):
    """embed -> three checkpointed blocks (Linear, GELU) -> head; sites at the GELU inputs run inside the
    checkpointed function, and their quantized values are what the GELU saves for backward."""

    def __init__(self, reentrant=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Linear(12, 16)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()) for _ in range(3))
        self.head = torch.nn.Linear(16, 3)
        self.reentrant = reentrant  # None: no checkpointing

    def forward(self, x):
        h = self.embed(x)
        for blk in self.blocks:
            if self.reentrant is None:
                h = blk(h)
            else:
                h = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=self.reentrant)
        return self.head(h)


_INNER_SITES = [(f"blocks.{i}.1", "input") for i in range(3)] + [(f"blocks.{i}", "output") for i in range(3)]


def _grads(aq, x, bits, y):
    aq.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(aq(x, bits=bits), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in aq.model.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_uses_the_bits_of_the_forward(reentrant):
    """Under torch.utils.checkpoint the sites inside a checkpointed block run again during backward, after the
    quantizer's call returned: they found no bits and raised (or, under a later bits_context, used those bits)."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 12, generator=g), torch.randn(4, 3, generator=g)
    bits = torch.tensor([2, 3, 8, 32])
    plain = AdaptiveQuantizer(_CheckpointedNet(), sites=_INNER_SITES,
                              weight_config=None).train()
    ckpt = AdaptiveQuantizer(_CheckpointedNet(reentrant), sites=_INNER_SITES,
                             weight_config=None).train()
    loss_ref, ref = _grads(plain, x, bits, y)
    loss, got = _grads(ckpt, x, bits, y)
    assert torch.equal(loss, loss_ref)
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-6, rtol=1e-5), n
    _, float_grads = _grads(plain, x, torch.full((4,), 32), y)
    assert not torch.allclose(float_grads["blocks.0.0.weight"], ref["blocks.0.0.weight"], atol=1e-4)
    # backward run inside a bits_context of other bits: still the bits of the forward
    ckpt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(ckpt(x, bits=bits), y)
    with ckpt.bits_context([32, 32, 32, 32]):
        loss.backward()
    for n, p in ckpt.model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6, rtol=1e-5), n


def test_checkpoint_recompute_of_two_calls_in_one_backward_is_right_or_refused():
    """Two calls with different bits, one backward: each call's recompute must use its own bits, or refuse."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 12, generator=g), torch.randn(4, 3, generator=g)
    b1, b2 = torch.tensor([2, 2, 4, 4]), torch.tensor([8, 3, 32, 2])
    plain = AdaptiveQuantizer(_CheckpointedNet(), sites=_INNER_SITES, weight_config=None).train()
    ckpt = AdaptiveQuantizer(_CheckpointedNet(False), sites=_INNER_SITES, weight_config=None).train()
    mse = torch.nn.functional.mse_loss

    def both(aq, n2):
        aq.zero_grad(set_to_none=True)
        return mse(aq(x, bits=b1), y) + mse(aq(x[:n2], bits=b2[:n2]), y[:n2])

    both(plain, 3).backward()  # batch sizes 4 and 3: each recompute can tell its call
    both(ckpt, 3).backward()
    for (n, p), (_, q) in zip(ckpt.model.named_parameters(), plain.model.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), n
    both(plain, 4).backward()
    loss = both(ckpt, 4)
    try:
        loss.backward()
    except RuntimeError as e:
        assert "checkpointing" in str(e) and "backward once per call" in str(e), e
        return
    for (n, p), (_, q) in zip(ckpt.model.named_parameters(), plain.model.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), n


def test_checkpoint_recompute_keeps_disabled_and_bits_context_calls():
    """A call made under ``disabled()`` is recomputed unquantized; a model call under ``bits_context`` uses the
    context's bits when the backward runs inside it, and raises (not: runs unquantized) outside it."""
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(4, 12, generator=g), torch.randn(4, 3, generator=g)
    bits = [2, 3, 8, 4]
    plain = AdaptiveQuantizer(_CheckpointedNet(), sites=_INNER_SITES, weight_config=None).train()
    ckpt = AdaptiveQuantizer(_CheckpointedNet(False), sites=_INNER_SITES, weight_config=None).train()
    mse = torch.nn.functional.mse_loss
    with plain.disabled():
        _, ref_off = _grads(plain, x, bits, y)
    with ckpt.disabled():
        loss = mse(ckpt(x, bits=bits), y)
    loss.backward()
    for n, p in ckpt.model.named_parameters():
        assert torch.allclose(p.grad, ref_off[n], atol=1e-6, rtol=1e-5), n
    _, ref = _grads(plain, x, bits, y)
    ckpt.zero_grad(set_to_none=True)
    with ckpt.bits_context(bits):
        mse(ckpt.model(x), y).backward()
    for n, p in ckpt.model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6, rtol=1e-5), n
    with ckpt.bits_context(bits):
        loss = mse(ckpt.model(x), y)
    with pytest.raises(RuntimeError, match="recomputed by gradient checkpointing.*bits_context"):
        loss.backward()


def test_hf_gradient_checkpointing_gives_the_gradients_without_it():
    entry = ZOO_BY_NAME["vit"]
    base = entry.build()
    inputs = entry.inputs(base)
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    enable = getattr(models[1], "activation_checkpointing_enable", None) or models[1].gradient_checkpointing_enable
    enable()
    bits = torch.tensor([2, 8])
    grads = []
    for m in models:  # inputs of the second MLP linear: what it saves for backward, recomputed through the site
        sites = [n for n, _ in m.named_modules() if n.endswith((".mlp.fc2", ".output.dense"))]
        assert len(sites) == m.config.num_hidden_layers
        aq = AdaptiveQuantizer(m, sites=sites + block_output_sites(m), weight_config=None).train()
        loss = aq(**inputs, bits=bits).logits.square().sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 10
    for n in grads[0]:
        assert torch.allclose(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5), n
