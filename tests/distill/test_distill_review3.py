"""Review round 3 of medquant.distill: kd_loss against torch's F.kl_div as the reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medquant.distill import kd_loss


def _kl_ref(s: torch.Tensor, t: torch.Tensor, T: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    per_pos = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
    if mask is None:
        return T * T * per_pos.mean()
    return T * T * (per_pos * mask).sum() / mask.sum()


@pytest.mark.parametrize("temperature", [torch.tensor([2.0]), torch.tensor([[2.0]]),
                                         torch.tensor([2.0], dtype=torch.float64),
                                         torch.tensor(2.0, dtype=torch.float64)])
@pytest.mark.parametrize("masked", [False, True])
def test_a_one_element_tensor_temperature_gives_the_scalar_float32_loss(temperature, masked):
    """The docstring accepts any one-element real tensor as T and returns the scalar loss: a (1,) or (1, 1)
    temperature broadcast the loss to (1,) / (1, 1), and a float64 one made it float64."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]) if masked else None
    loss = kd_loss(s, t, temperature, mask)
    want = _kl_ref(s, t, 2.0, None if mask is None else mask.float())
    assert loss.shape == torch.Size([])
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(want), rel=1e-6)


def test_a_tensor_temperature_keeps_its_gradient():
    """A learnable T (a tensor that requires grad) still gets its gradient, equal to the reference's."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    T = torch.tensor([1.5], requires_grad=True)
    kd_loss(s, t, T).backward()
    T_ref = torch.tensor(1.5, requires_grad=True)
    per_pos = F.kl_div(F.log_softmax(s / T_ref, -1), F.log_softmax(t / T_ref, -1), log_target=True,
                       reduction="none").sum(-1)
    (T_ref * T_ref * per_pos.mean()).backward()
    assert T.grad is not None and float(T.grad) == pytest.approx(float(T_ref.grad), rel=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), float("inf")])
def test_non_finite_teacher_logits_at_masked_positions_are_left_out_as_torch_leaves_ignored_targets(bad):
    """A masked position (padding) takes no part in the loss, as a target equal to ignore_index takes none in
    F.cross_entropy: non-finite teacher logits there (a teacher that overflows, or masks logits, on padding) made
    the loss NaN (NaN * 0) and stopped training; the student's gradient stays the reference's."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    t_bad = t.clone()
    t_bad[0, 3] = bad
    t_bad[1, 2:, 1] = bad
    loss = kd_loss(s, t_bad, 2.0, mask)
    keep = mask.bool()
    s_ref = s.detach().clone().requires_grad_(True)
    want = _kl_ref(s_ref[keep], t[keep], 2.0)  # the unmasked rows alone, F.kl_div
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    loss.backward()
    want.backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(s.grad, s_ref.grad)
    # still NaN where the position counts
    t_bad[0, 0, 0] = float("nan")
    assert torch.isnan(kd_loss(s, t_bad, 2.0, mask))


def test_the_cross_entropy_reference_ignores_non_finite_logits_of_ignored_targets():
    """The reference behaviour the test above asks of kd_loss: F.cross_entropy skips ignore_index rows entirely."""
    logits = torch.tensor([[1.0, 2.0, 0.5], [float("nan"), 0.0, 1.0]])
    loss = F.cross_entropy(logits, torch.tensor([1, -100]), ignore_index=-100)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits[:1], torch.tensor([1]))))


class _PaddingNaNTeacher(torch.nn.Module):
    """A teacher whose hidden states and logits are NaN on padding (as an fp16 teacher that overflows there)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids=None, attention_mask=None, **kw):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)
        pad = (attention_mask == 0)[..., None]
        out.logits = out.logits.masked_fill(pad, float("nan"))
        if out.hidden_states is not None:
            out.hidden_states = tuple(h.masked_fill(pad, float("nan")) for h in out.hidden_states)
        return out


def test_a_teacher_non_finite_on_padding_leaves_the_distillation_loss_and_gradients_finite():
    """Padding is excluded from the KD and feature terms (module docstring); reference: the same Distiller on the
    unpadded teacher outputs (padding replaced by finite values), which the mask must make irrelevant."""
    import copy

    from medquant.distill import Distiller
    from medquant.testing.zoo import ZOO_BY_NAME

    entry = ZOO_BY_NAME["llama"]
    torch.manual_seed(0)
    teacher = entry.build()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = dict(entry.inputs(teacher))
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][0, -4:] = 0
    kw = {"alpha": 0.7, "temperature": 2.0, "feature_pairs": [(1, 2), (-1, -1)]}
    ref = Distiller(teacher, student, **kw)
    want = ref(batch)
    want["loss"].backward()
    ref_grads = [p.grad.clone() for p in ref.trainable_parameters()]
    ref.zero_grad(set_to_none=True)
    student.zero_grad(set_to_none=True)
    d = Distiller(_PaddingNaNTeacher(teacher), student, teacher_dim=teacher.config.hidden_size, **kw)
    got = d(batch)
    for k in ("kd", "features", "loss"):
        assert torch.isfinite(got[k]), k
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-5, abs=1e-7), k
    got["loss"].backward()
    for g, r in zip([p.grad for p in d.trainable_parameters()], ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
