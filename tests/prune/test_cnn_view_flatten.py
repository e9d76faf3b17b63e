"""CNN channel pruning (:mod:`medquant.prune.cnn`): ``view`` / ``reshape`` flattens, and a global ratio on convs
with very few channels.

Reference: the original model with the removed channels zeroed at the producer (its filters and bias, and its
BatchNorm's gamma and beta: ``_cnn_zeroed`` of ``test_exactness``), in plain torch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.prune import StructuredPruner
from medquant.prune.cnn import channel_groups
from tests.prune.test_cnn_review import _same_state, _state, _x
from tests.prune.test_exactness import _close, _cnn_zeroed


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# each form flattens the pooled (N, 8, 4, 4) map of ``_ViewNet`` into (N, 128)
FLATTENS = {
    "view_size": lambda x, inp: x.view(x.size(0), -1),
    "reshape_size": lambda x, inp: x.reshape(x.size(0), -1),
    "view_shape": lambda x, inp: x.view(x.shape[0], -1),
    "view_negative_dim": lambda x, inp: x.view(x.size(-4), -1),
    "view_tuple": lambda x, inp: x.view((x.size(0), -1)),
    "torch_reshape": lambda x, inp: torch.reshape(x, (x.size(0), -1)),
    "reshape_size_tuple": lambda x, inp: x.reshape(x.size()[0], -1),
    "input_batch": lambda x, inp: x.view(inp.size(0), -1),  # the batch size read from the model's input
}


class _ViewNet(nn.Module):
    """conv -> BN -> ReLU -> max pool -> ``flat`` -> Linear(8*4*4, 5)."""

    def __init__(self, flat, fc_in: int = 8 * 16, fc_out: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(fc_in, fc_out)
        self.flat = flat
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, inp):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.c1(inp))), 2)
        return self.fc(self.flat(x, inp))


@pytest.mark.parametrize("form", list(FLATTENS))
def test_view_and_reshape_flatten_prune_exactly(form):
    """``x.view(x.size(0), -1)`` and its kin flatten ``(N, C, H, W)`` to ``(N, C*H*W)`` like ``flatten(1)``: the conv
    is pruned, its BN along, the Linear loses the ``H*W`` columns of each removed channel, and the pruned model (also
    on another batch size: the arguments stay valid) equals the zeroed original and is smaller."""
    model = _ViewNet(FLATTENS[form]).eval()
    x = _x(3, 3, 8, 8)
    groups, skipped = channel_groups(model, x)
    assert skipped == {} and [(g.conv, g.bn, g.consumers) for g in groups] == [("c1", "bn", [("fc", 16)])]
    pruner = StructuredPruner(channel_ratio=0.5, progress=False)
    plan = pruner.plan(model, calib=[x])
    assert len(plan.removed_channels("c1")) == 4
    ref = _cnn_zeroed(model, plan)
    x5 = _x(5, 3, 8, 8, seed=1)
    with torch.no_grad():
        full, want, want5 = model(x), ref(x), ref(x5)
    before = _n_params(model)
    pruner.apply(model, plan)
    assert (model.c1.out_channels, model.bn.num_features, model.fc.in_features) == (4, 4, 4 * 16)
    assert _n_params(model) == before - 4 * (3 * 9 + 1) - 4 * 2 - 4 * 16 * 5
    with torch.no_grad():
        _close(model(x), want)
        _close(model(x5), want5)
    assert (full - want).abs().max() > 1e-3


class _TwoConvView(nn.Module):
    """c0 -> ReLU -> c1 -> ReLU -> adaptive pool (2x2) -> ``x.view(x.size(0), -1)`` -> Linear; both convs prunable."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4, 3)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.c1(torch.relu(self.c0(x)))), 2)
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("method", ["magnitude", "activation", "taylor"])
def test_view_after_a_conv_chain_prunes_every_conv_exactly(method):
    model = _TwoConvView().eval()
    x = _x(4, 3, 6, 6)
    pruner = StructuredPruner(channel_ratio=0.5, importance=method, progress=False)
    plan = pruner.plan(model, calib=[x])
    assert set(plan.channels) == {"c0", "c1"}
    with torch.no_grad():
        want = _cnn_zeroed(model, plan)(x)
    pruner.apply(model, plan)
    assert (model.c0.out_channels, model.c1.in_channels, model.c1.out_channels, model.fc.in_features) == (4, 4, 3, 12)
    with torch.no_grad():
        _close(model(x), want)


REFUSED = {  # form, Linear width, what the reason names
    "view_keeps_channels": (lambda x, inp: x.view(x.size(0), 8, -1), 16, "view"),        # (N, C, H*W)
    "view_mixes_batch": (lambda x, inp: x.view(-1, 16), 16, "view"),                     # (N*C, H*W)
    "literal_width": (lambda x, inp: x.view(-1, 8 * 16), 8 * 16, "literal"),             # pruning invalidates 128
    "literal_width_with_size": (lambda x, inp: x.view(x.size(0), 128), 8 * 16, "literal"),
    "torch_reshape_literal": (lambda x, inp: torch.reshape(x, (-1, 128)), 8 * 16, "literal"),
    "channel_count_read": (lambda x, inp: x.view(x.size(0), x.size(1) * 16), 8 * 16, "size"),  # reads C
    "batch_arithmetic": (lambda x, inp: x.view(x.size(0) * 1, -1), 8 * 16, "view"),
    "size_of_a_parameter": (lambda x, inp: x.view(-1, 16 * _PARAM.size(0)), 8 * 16, "literal"),
}
_PARAM = torch.zeros(8)


@pytest.mark.parametrize("form", list(REFUSED))
def test_views_that_are_not_a_channel_flatten_are_refused(form):
    """A view / reshape that keeps the channel axis, mixes batch and channels, or spells a width pruning would
    change (a literal ``C*H*W``, a read of ``x.size(1)``): the conv is left whole, with the reason; the model is
    unchanged."""
    flat, width, why = REFUSED[form]
    model = _ViewNet(flat, fc_in=width).eval()
    x = _x(2, 3, 8, 8)
    with torch.no_grad():
        before_out = model(x)
    groups, skipped = channel_groups(model, x)
    assert groups == [] and why in skipped["c1"], skipped
    before = _state(model)
    with pytest.raises(ValueError, match="found no prunable conv channels"):
        StructuredPruner(channel_ratio=0.5, progress=False).prune(model, calib=[x])
    assert _same_state(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), before_out)


class _ReadsChannels(nn.Module):
    """Flattens with ``x.view(x.size(0), -1)`` but also uses ``read(x)`` (the channel count, or a parameter's size)."""

    def __init__(self, read):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 16, 5)
        self.w = nn.Parameter(torch.ones(2, 3))
        self.read = read

    def forward(self, inp):
        x = torch.relu(self.c1(inp))
        return self.fc(x.view(x.size(0), -1)) * self.read(self, x)


@pytest.mark.parametrize(("read", "why"), [(lambda s, x: x.size(1), "x.size(1)"),
                                           (lambda s, x: x.shape[1], "x.shape"),
                                           (lambda s, x: x.size()[-3], "x.size()"),
                                           (lambda s, x: s.w.size(0), None)])
def test_reading_the_channel_count_is_refused(read, why):
    """``x.size(1)`` / ``x.shape[1]`` of the channel map give a value pruning changes: the conv is left whole. A read
    of a size pruning does not touch (a parameter's, unrelated to the map) leaves it prunable, exactly."""
    model = _ReadsChannels(read).eval()
    x = _x(2, 3, 4, 4)
    groups, skipped = channel_groups(model, x)
    if why is not None:
        assert groups == [] and why in skipped["c1"], skipped
        return
    assert [g.conv for g in groups] == ["c1"]
    pruner = StructuredPruner(channel_ratio=0.5, progress=False)
    plan = pruner.plan(model, calib=[x])
    with torch.no_grad():
        want = _cnn_zeroed(model, plan)(x)
    pruner.apply(model, plan)
    with torch.no_grad():
        _close(model(x), want)


def test_batch_size_read_from_a_parameter_is_refused():
    """``x.view(self.w.size(0), -1)`` equals ``(N, C*H*W)`` only by coincidence of sizes: refused, naming it."""
    class Net(_ReadsChannels):
        def forward(self, inp):
            return self.fc(torch.relu(self.c1(inp)).view(self.w.size(0), -1))

    _, skipped = channel_groups(Net(None).eval(), _x(2, 3, 4, 4))
    assert "batch size of" in skipped["c1"], skipped


def test_literal_width_reason_is_specific():
    model = _ViewNet(REFUSED["literal_width"][0]).eval()
    _, skipped = channel_groups(model, _x(2, 3, 8, 8))
    assert "literal" in skipped["c1"] and "x.size(0), -1" in skipped["c1"]


# ----------------------------------------------------------------------------------- few-channel convs, global ratio
class _Narrow(nn.Module):
    """c0: 1 channel, c1: 3 channels, c2: 8 channels, each feeding the next; c3 is the (unpruned) head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c0, self.c1 = nn.Conv2d(3, 1, 3, padding=1), nn.Conv2d(1, 3, 3, padding=1)
        self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(torch.relu(self.c0(x)))))))


@pytest.mark.parametrize(("ratio", "kept"), [(0.5, {"c0": 1, "c1": 1, "c2": 4}),    # floor(1.5+.5)=2 of 3 -> 2
                                             (0.9, {"c0": 1, "c1": 1, "c2": 1})])   # floor(7.7)=7 of 8; 3 -> 2
def test_global_ratio_keeps_one_channel_per_conv(ratio, kept):
    """A global ``channel_ratio`` removes ``min(floor(r*n + 0.5), n - 1)`` channels of each conv: a 1-channel conv
    stays whole instead of the whole plan being refused; the rest is pruned exactly."""
    model = _Narrow().eval()
    x = _x(2, 3, 6, 6)
    pruner = StructuredPruner(channel_ratio=ratio, progress=False)
    plan = pruner.plan(model, calib=[x])
    assert {k: len(v) for k, v in plan.channels.items()} == kept
    with torch.no_grad():
        want = _cnn_zeroed(model, plan)(x)
    pruner.apply(model, plan)
    assert (model.c0.out_channels, model.c1.out_channels, model.c2.out_channels) == tuple(kept.values())
    assert (model.c1.in_channels, model.c2.in_channels, model.c3.in_channels) == tuple(kept.values())
    with torch.no_grad():
        _close(model(x), want)


def test_per_conv_ratio_that_empties_a_conv_is_refused():
    """An explicit ``{conv: ratio}`` that would remove every channel of that conv is refused, naming it."""
    model = _Narrow().eval()
    with pytest.raises(ValueError, match=r"channel_ratio\['c0'\]=0.5 would remove all 1 channels of c0"):
        StructuredPruner(channel_ratio={"c0": 0.5, "c2": 0.5}, progress=False).plan(model, calib=[_x(2, 3, 6, 6)])
