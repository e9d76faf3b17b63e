"""Tensors that are views of part of a larger storage (``nn.Parameter(pos_embed[:, :n])``: a position table cut for
smaller images, a vocabulary trimmed) are saved, loaded back, and counted by ``model_size`` as the file stores them.

safetensors refuses to save a tensor whose storage no tensor of the state dict covers whole ("None is covering the
entire storage ... Or open an issue"), so ``medquant.save`` failed on such a model (``torch.save`` saves it), and
``model_size`` counted a view of a buffer in place of the buffer the file holds. References: plain torch (the
tensors), safetensors' own reader of the saved file, and a hand count of its header (``numel * dtype size``).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import medquant as mq
from medquant.io import WEIGHTS_NAME
from medquant.quant.size import model_size


class Cut(nn.Module):
    """A ViT-like position table cut to fewer positions (a view of the first part of the full table)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(8, 8)
        full = torch.randn(1, 17, 8, generator=g)
        self.pos = nn.Parameter(full[:, :5])


class Views(nn.Module):
    """A buffer and two parameters that are views of parts of it."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.proj = nn.Linear(4, 4)
        self.register_buffer("table", torch.randn(40, generator=g))
        self.a = nn.Parameter(self.table[4:8])
        self.b = nn.Parameter(self.table[20:24])


class Lone(nn.Module):
    """A view of a buffer's first rows, the buffer itself also stored."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.register_buffer("big", torch.randn(1000, generator=g))
        self.head = nn.Parameter(self.big[:5])


def _hand_count(path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


@pytest.mark.parametrize("cls", [Cut, Views, Lone])
def test_views_are_saved_and_load_back(cls, tmp_path):
    m = cls()
    mq.save(m, tmp_path / "ck")
    stored = load_file(str(tmp_path / "ck" / WEIGHTS_NAME))
    for k, t in m.state_dict().items():
        if k in stored:  # safetensors' own reader: the values as they are in the model
            assert torch.equal(stored[k], t), k
    back = mq.load(tmp_path / "ck", model=cls())
    for k, t in m.state_dict().items():
        assert back.state_dict()[k].shape == t.shape and torch.equal(back.state_dict()[k], t), k
    # a model built another way (its own storage for every tensor) loads the same values
    fresh = cls()
    with torch.no_grad():
        for p in list(fresh.parameters()) + list(fresh.buffers()):
            p.data = torch.zeros_like(p).contiguous()
    back = mq.load(tmp_path / "ck", model=fresh)
    for k, t in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], t), k


@pytest.mark.parametrize("cls", [Cut, Views, Lone])
def test_model_size_counts_what_the_file_holds(cls, tmp_path):
    m = cls()
    mq.save(m, tmp_path / "ck")
    assert model_size(m).tensor_bytes == _hand_count(tmp_path / "ck" / WEIGHTS_NAME)
