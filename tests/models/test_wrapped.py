"""Roles, layer lists and blocks of models wrapped by ``torch.compile`` (names under ``_orig_mod.``) or by
DistributedDataParallel / DataParallel-style wrappers (names under ``module.``).

References: the expected names are written out by hand from the LLaMA module tree (``model.layers``, ``lm_head``)
with the wrapper's prefix; each one is checked to name, in the wrapper, the very module of the inner model.
"""
import pytest
import torch
from torch import nn

from medquant.models import (
    block_stacks,
    language_model_layers,
    model_roles,
    modules_in_role,
    role_of,
    transformer_blocks,
    unassigned_modules,
)
from medquant.quant.api import QuantConfig, quantize_
from medquant.testing.zoo import ZOO_BY_NAME


class _DDPLike(nn.Module):
    """What DistributedDataParallel does to names: the model is the single child ``module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return ZOO_BY_NAME["llama"].build()


def _wrapped(kind: str, model: nn.Module) -> tuple[nn.Module, str]:
    if kind == "compile":
        return torch.compile(model), "_orig_mod."
    if kind == "ddp_like":
        return _DDPLike(model), "module."
    if kind == "data_parallel":
        return nn.DataParallel(model), "module."
    if kind == "compile_of_data_parallel":
        return torch.compile(nn.DataParallel(model)), "_orig_mod.module."
    raise AssertionError(kind)


KINDS = ["compile", "ddp_like", "data_parallel", "compile_of_data_parallel"]


@pytest.mark.parametrize("kind", KINDS)
def test_wrapped_model_has_the_roles_under_the_wrappers_prefix(kind):
    model = _llama()
    wrapped, pre = _wrapped(kind, model)
    assert model_roles(wrapped) == {"language": [pre + "model"], "head": [pre + "lm_head"]}
    assert wrapped.get_submodule(pre + "lm_head") is model.lm_head
    assert role_of(wrapped, pre + "lm_head.weight") == "head"
    assert role_of(wrapped, pre + "model.layers.0.self_attn.q_proj") == "language"
    assert language_model_layers(wrapped) == [pre + "model.layers.0", pre + "model.layers.1"]
    assert [wrapped.get_submodule(n) for n in language_model_layers(wrapped)] == list(model.model.layers)
    assert modules_in_role(wrapped, "head") == [pre + "lm_head"]
    assert unassigned_modules(wrapped) == []


@pytest.mark.parametrize("kind", ["compile", "ddp_like"])
def test_wrapped_model_blocks_keep_the_prefix(kind):
    model = _llama()
    wrapped, pre = _wrapped(kind, model)
    assert block_stacks(wrapped) == [[pre + "model.layers.0", pre + "model.layers.1"]]
    blocks = transformer_blocks(wrapped)
    assert [b.name for b in blocks] == [pre + "model.layers.0", pre + "model.layers.1"]
    assert blocks[0].role == "language"
    assert blocks[0].attention.q == pre + "model.layers.0.self_attn.q_proj"
    assert wrapped.get_submodule(blocks[0].ffn.output) is model.model.layers[0].mlp.down_proj


@pytest.mark.parametrize("kind", ["compile", "ddp_like"])
def test_skip_head_of_a_wrapped_model_keeps_the_head_in_float(kind):
    model = _llama()
    head = model.lm_head
    q_proj = model.model.layers[0].self_attn.q_proj
    wrapped, _ = _wrapped(kind, model)
    quantize_(wrapped, QuantConfig(4), skip=["@head"])
    assert model.lm_head is head and type(model.lm_head) is nn.Linear
    assert model.model.layers[0].self_attn.q_proj is not q_proj
    assert type(model.model.layers[0].self_attn.q_proj) is not nn.Linear


def test_wrapper_with_other_children_is_a_plain_module():
    """Only a wrapper whose single child is the model is looked through: a module that adds layers of its own
    beside ``module`` is the user's model, with no roles."""
    outer = _DDPLike(_llama())
    outer.extra = nn.Linear(4, 4)
    assert model_roles(outer) == {}
