"""AdaptiveQuantizer state: the bit map and the sites travel with ``state_dict`` and are checked on load."""
from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from medquant.adaptive import AdaptiveQuantizer, CompactCNN
from tests.adaptive.test_adaptive_fakequant import independent_fq

BITS_MAP = {0: 2, 1: 4, 2: 8, 3: 32}


def _cnn(seed):
    torch.manual_seed(seed)
    return CompactCNN(3, in_channels=1, widths=(8, 8, 16), hidden=16).eval()


def _x(n=4):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _saved():
    aq = AdaptiveQuantizer(_cnn(0), bit_map=BITS_MAP).eval()  # int8 weights, site: input of `head`
    return aq, aq.state_dict()  # an OrderedDict with torch's _metadata (the state version)


def _weights(aq):
    return {k: v.clone() for k, v in aq.model.state_dict().items()}


def test_state_loads_into_the_same_bit_map_and_sites_and_gives_the_same_outputs():
    aq, state = _saved()
    fresh = AdaptiveQuantizer(_cnn(1), bit_map=dict(BITS_MAP)).eval()
    fresh.load_state_dict(state)
    x, levels = _x(), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        out = aq(x, levels=levels)
        assert torch.equal(fresh(x, levels=levels), out)
        # independent reference: the head on the activation quantized at the saved map's widths
        e = aq.model.embed(x)
        with aq.disabled():
                manual = torch.cat([aq.model.head(independent_fq(e[i:i + 1], b)) for i, b in enumerate([2, 4, 8, 32])])
    assert torch.allclose(out, manual, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bit_map", [{0: 4, 1: 4, 2: 8, 3: 32}, {0: 2, 1: 4, 2: 8}, {0: 2, 1: 4, 2: 8, 3: 32, 4: 1}])
def test_state_refuses_a_quantizer_with_another_bit_map(bit_map):
    """The bit map was not part of the state: a quantizer built with other widths per level loaded it silently and
    quantized level 0 at 4 bits instead of the saved 2."""
    _, state = _saved()
    other = AdaptiveQuantizer(_cnn(1), bit_map=bit_map).eval()
    before = _weights(other)
    with pytest.raises(ValueError, match=r"bit_map \{0: 2, 1: 4, 2: 8, 3: 32\}.*bit_map=") as e:
        other.load_state_dict(state)
    assert str(bit_map) in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in _weights(other).items())  # left as it was


def test_state_refuses_a_quantizer_with_other_sites():
    """The sites were not part of the state: a quantizer quantizing other layers loaded it silently."""
    _, state = _saved()
    other = AdaptiveQuantizer(_cnn(1), bit_map=BITS_MAP, sites=[("blocks.2", "output")]).eval()
    before = _weights(other)
    with pytest.raises(ValueError, match=r"sites.*\('head', 'input'\).*\('blocks.2', 'output'\)"):
        other.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in _weights(other).items())
    both = AdaptiveQuantizer(_cnn(1), bit_map=BITS_MAP, sites=["head", ("blocks.2", "output")]).eval()
    with pytest.raises(ValueError, match="sites"):
        both.load_state_dict(state)


def test_state_checks_survive_torch_save_and_safetensors():
    _, state = _saved()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    back = torch.load(buf)
    flat = st_load(st_save(state))  # safetensors: tensors only, no torch metadata
    for s in (back, flat):
        other = AdaptiveQuantizer(_cnn(1), bit_map={0: 4, 1: 4, 2: 8, 3: 32}).eval()
        with pytest.raises(ValueError, match="bit_map"):
            other.load_state_dict(s)
        same = AdaptiveQuantizer(_cnn(1), bit_map=BITS_MAP).eval()
        same.load_state_dict(s)
        with torch.no_grad():
            assert torch.equal(same(_x(), bits=[2, 4, 8, 32]), _saved()[0](_x(), bits=[2, 4, 8, 32]))


def test_older_state_without_bit_map_and_sites_still_loads():
    aq, state = _saved()
    old = type(state)((k, v) for k, v in state.items() if not k.startswith("adaptive_"))
    old._metadata = {k: dict(v) for k, v in state._metadata.items()}
    old._metadata[""]["version"] = 1
    assert len(old) < len(state)  # the new state has more
    fresh = AdaptiveQuantizer(_cnn(1), bit_map=BITS_MAP).eval()
    fresh.load_state_dict(old)  # strict: nothing missing
    with torch.no_grad():
        assert torch.equal(fresh(_x(), bits=[2, 4, 8, 32]), aq(_x(), bits=[2, 4, 8, 32]))
    missing = type(state)((k, v) for k, v in state.items() if k != "adaptive_sites")
    missing._metadata = state._metadata  # a version-2 state that lost a key
    with pytest.raises(RuntimeError, match="Missing key.*adaptive_sites"):
        fresh.load_state_dict(missing)
    fresh.load_state_dict(missing, strict=False)


def test_state_of_a_quantizer_inside_another_module():
    _, state = _saved()
    outer = torch.nn.ModuleDict({"aq": AdaptiveQuantizer(_cnn(1), bit_map={0: 3, 1: 4, 2: 8, 3: 32})})
    with pytest.raises(ValueError, match="bit_map"):
        outer.load_state_dict({f"aq.{k}": v for k, v in state.items()})


def test_levels_beyond_int64_are_refused_when_built():
    """A level of 2**63 was accepted and failed later in levels_to_bits / state_dict (int64 tensors)."""
    with pytest.raises(ValueError, match=r"below 2\*\*63"):
        AdaptiveQuantizer(_cnn(0), bit_map={0: 2, 2**63: 8}, weight_config=None)
    aq = AdaptiveQuantizer(_cnn(0), bit_map={0: 2, 2**63 - 1: 8}, weight_config=None)
    assert torch.equal(aq.state_dict()["adaptive_bit_map"], torch.tensor([[0, 2], [2**63 - 1, 8]]))
