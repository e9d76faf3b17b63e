"""Gemma 4's vision blocks wrap every projection in ``Gemma4ClippableLinear`` (an ``nn.Linear`` named ``linear``
between scalar input / output clamps): ``transformer_blocks(..., clamp_wrappers=True)`` names the inner linears and
says which clamps are finite (a scale folded through a finite clamp changes the function) and which attention
normalises its values per head (``v_norm``); by default the wrappers are not linears (AWQ's view)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medquant.models import transformer_blocks
from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME


def _gemma4(clipped: bool = False) -> nn.Module:
    model = EXTRA_ZOO_BY_NAME["gemma4"].build()
    if not clipped:
        return model
    cfg = copy.deepcopy(model.config)
    cfg.vision_config.use_clipped_linears = True
    torch.manual_seed(0)
    out = type(model)(cfg).eval()
    out.load_state_dict(model.state_dict(), strict=False)  # the clamps stay at +-inf (transformers' default)
    return out


def test_gemma4_vision_blocks_name_the_linears_inside_the_clipping_wrappers():
    model = _gemma4()
    blocks = transformer_blocks(model, "vision", clamp_wrappers=True)
    assert [b.name for b in blocks] == [f"model.vision_tower.encoder.layers.{i}" for i in range(2)]
    for b in blocks:
        a, f = b.attention, b.ffn
        assert a is not None and f is not None and b.unsupported == {}
        assert (a.q, a.k, a.v, a.o) == tuple(f"{b.name}.self_attn.{p}_proj.linear" for p in "qkvo")
        assert a.holder == a.name == f"{b.name}.self_attn"
        assert (a.n_heads, a.n_kv, a.head_dim) == (4, 4, 32)
        assert a.v_norm == f"{b.name}.self_attn.v_norm"
        assert f.inputs == (f"{b.name}.mlp.gate_proj.linear", f"{b.name}.mlp.up_proj.linear")
        assert f.output == f"{b.name}.mlp.down_proj.linear" and f.n_neurons == 256
        assert a.clamped == {} and f.clamped == {}  # use_clipped_linears is False: no clamps at all
        for name in (a.q, a.k, a.v, a.o, *f.inputs, f.output):
            assert isinstance(model.get_submodule(name), nn.Linear)
    # the language blocks' projections are plain nn.Linear: the same either way
    lang = transformer_blocks(model, "language", clamp_wrappers=True)
    assert lang[0].attention.q == "model.language_model.layers.0.self_attn.q_proj"
    assert lang == transformer_blocks(model, "language")


def test_by_default_clamp_wrappers_are_not_linears():
    """A caller that rescales channels (AWQ) does not get the wrapped units unless it asks: a scale folded from o's
    columns into v's rows is not exact through Gemma 4's v_norm, nor through a finite clamp."""
    assert transformer_blocks(_gemma4(), "vision") == []


def test_infinite_clamps_are_not_reported_and_finite_ones_are_by_side():
    model = _gemma4(clipped=True)
    blocks = transformer_blocks(model, "vision", clamp_wrappers=True)
    assert all(b.attention.clamped == {} and b.ffn.clamped == {} for b in blocks)  # +-inf: clamp(x) == x
    wrapper = model.get_submodule("model.vision_tower.encoder.layers.0.self_attn.q_proj")
    wrapper.input_max.fill_(3.0)
    down = model.get_submodule("model.vision_tower.encoder.layers.1.mlp.down_proj")
    down.output_min.fill_(-2.0)
    b0, b1 = transformer_blocks(model, "vision", clamp_wrappers=True)
    assert b0.attention.clamped == {b0.attention.q: (True, False)} and b0.ffn.clamped == {}
    assert b1.attention.clamped == {} and b1.ffn.clamped == {b1.ffn.output: (False, True)}
    # clamps whose values cannot be read (a meta skeleton) count as finite
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    b = transformer_blocks(skeleton, "vision", clamp_wrappers=True)[0]
    assert set(b.attention.clamped) == {b.attention.q, b.attention.k, b.attention.v, b.attention.o}
    assert all(v == (True, True) for v in b.ffn.clamped.values())


class _Wrapped(nn.Module):
    """A wrapper of the clipping layout that also scales its output by a learned vector: not a clamp wrapper."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.linear = nn.Linear(i, o)
        self.gain = nn.Parameter(torch.ones(o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.gain


@pytest.mark.parametrize("where", ["gain", "vector_buffer", "other_buffer", "second_child"])
def test_only_the_clamp_layout_is_seen_through(where):
    """A wrapper is looked through only when it holds one child ``linear`` and nothing but scalar clamp buffers:
    anything else could mix the rows or columns that pruning removes."""
    model = _gemma4()
    name = "model.vision_tower.encoder.layers.0.mlp.up_proj"
    wrapper = model.get_submodule(name)
    if where == "gain":
        model.get_submodule(name.rpartition(".")[0]).up_proj = _Wrapped(128, 256)
    elif where == "vector_buffer":
        wrapper.register_buffer("output_max", torch.full((256,), float("inf")))
    elif where == "other_buffer":
        wrapper.register_buffer("scale", torch.tensor(1.0))
    else:
        wrapper.extra = nn.Linear(4, 4)
    b = transformer_blocks(model, "vision", clamp_wrappers=True)[0]
    assert b.ffn is None and "ffn" in b.unsupported
    assert b.attention is not None
