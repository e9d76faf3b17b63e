"""medquant.testing.zoo_moe: the MoE entries through the zoo harness (roles, the @ wrap, save/load, the
transformers round trip); pruning and generation: tests/testing/test_zoo_harness.py.

References: the module tree written out by hand (roles), the in-memory quantized model (every tensor and the
logits, ``torch.equal``) for both round trips, transformers' own ``from_pretrained``; the quantized experts are
checked against transformers' experts forward in tests/quant/test_experts.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import medquant as mq
import medquant.hf
from medquant.models import model_roles, unassigned_modules
from medquant.models.introspect import unassigned_parameters
from medquant.quant.api import quantized_modules
from medquant.quant.experts import QuantExperts, experts_layout, moe_routers
from medquant.testing.zoo_moe import MOE_BUILDERS, MOE_ZOO, MOE_ZOO_BY_NAME, build_moe, moe_zoo_params

SKIP = ["@vision", "@projector", "@head"]  # the VLM recipe's skip list, reused as is on a text-only MoE


def test_lists_and_entries():
    assert [e.name for e in MOE_ZOO] == list(MOE_BUILDERS) == list(MOE_ZOO_BY_NAME)
    assert not any(e.is_vlm for e in MOE_ZOO)
    e = MOE_ZOO_BY_NAME["mixtral"]
    a, b = e.build(), build_moe("mixtral")  # the entry is build_moe's model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with torch.no_grad():
        out = e.output(a, e.inputs(a))
    assert tuple(out.shape) == e.output_shape and torch.isfinite(out).all() and out.std() > 0


@moe_zoo_params
def test_roles_wrap_save_load_and_transformers_round_trip(entry, tmp_path):
    model = entry.build()
    inputs = entry.inputs(model)
    # roles: the decoder (embeddings, layers with their experts and routers) is language, lm_head is head
    assert model_roles(model) == {"language": ["model"], "head": ["lm_head"]}
    assert unassigned_modules(model) == [] and unassigned_parameters(model) == []
    experts = [n for n, m in model.named_modules() if experts_layout(m) is not None]
    assert len(experts) == 2 and all(n.startswith("model.layers.") for n in experts)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mq.quantize_(model, mq.QuantConfig(4, group_size=32), skip=SKIP)
    notes = [str(w.message) for w in caught]
    # the missing roles are left out without an error; their note is given once per model class and pattern (an
    # earlier test in the same process may have given it; the note itself: tests/quant/test_zoo_quantize.py)
    left_out = [s for s in notes if "left out" in s]
    assert all(("'@vision'" in s or "'@projector'" in s) and type(model).__name__ in s for s in left_out)
    assert any("router(s) stay in floating point" in s for s in notes)  # the routers' default, reported
    assert all(isinstance(model.get_submodule(n), QuantExperts) for n in experts)
    assert type(model.get_submodule("lm_head")) is nn.Linear  # @head skipped
    for name in moe_routers(model):
        assert not isinstance(model.get_submodule(name), (mq.QuantLinear, QuantExperts)), name
    qmods = quantized_modules(model)
    assert qmods and all(n.startswith("model.layers.") for n in qmods)
    # nothing of the language model's weight matrices is left in float but the routers
    left = [n for n, p in model.named_parameters() if p.dim() >= 2 and n.startswith("model.layers.")
            and not any(n.startswith(r + ".") or n == r for r in moe_routers(model))]
    assert left == [], left
    with torch.no_grad():
        want = entry.output(model, inputs)
    state = model.state_dict()

    mq.save(model, tmp_path / "mq")
    medquant.hf.save_pretrained(model, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backs = [mq.load(tmp_path / "mq"), type(model).from_pretrained(tmp_path / "hf")]
    for back in backs:
        assert type(back) is type(model)
        assert sum(isinstance(m, QuantExperts) for m in back.modules()) == 2
        got = back.state_dict()
        assert sorted(got) == sorted(state)
        assert all(got[k].dtype == state[k].dtype and torch.equal(got[k], state[k]) for k in state)
        with torch.no_grad():
            assert torch.equal(entry.output(back, inputs), want)


@pytest.mark.parametrize("name", ["unknown"])
def test_unknown_name_is_refused(name):
    with pytest.raises(KeyError, match="unknown MoE model 'unknown'; available: mixtral"):
        build_moe(name)
