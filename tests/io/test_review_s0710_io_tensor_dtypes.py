"""Every tensor dtype ``medquant.save`` writes, ``medquant.load`` reads back as it was saved; the others are refused
before anything is written.

safetensors stores complex64 (``C64``) and the float8 variants; the schema's header check knew only some of them,
so a model with a complex64 parameter (complex-valued MRI reconstruction layers) was saved into a folder that every
load refused (the checkpoint was lost), and a complex128 one failed inside safetensors with a bare
``KeyError: torch.complex128``. A float8 tensor loaded into a float32 model came back float32. Reference: plain torch
(the tensors themselves, their dtypes) and safetensors' own reader of the saved file.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import medquant as mq
from medquant.io import WEIGHTS_NAME


class Holder(nn.Module):
    """A Linear and one extra parameter of the given dtype."""

    def __init__(self, dtype: torch.dtype, build_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        g = torch.Generator().manual_seed(0)
        if dtype.is_complex:
            v = torch.randn(5, 2, generator=g, dtype=dtype)
        else:
            v = torch.randn(5, 2, generator=g).to(dtype)
        self.extra = nn.Parameter(v.to(build_dtype) if build_dtype is not None else v, requires_grad=False)


STORED = [torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
          torch.float8_e8m0fnu]


@pytest.mark.parametrize("dtype", STORED, ids=str)
def test_a_tensor_of_a_stored_dtype_loads_back_as_saved(dtype, tmp_path):
    torch.manual_seed(0)
    m = Holder(dtype)
    mq.save(m, tmp_path / "ck")
    on_disk = load_file(str(tmp_path / "ck" / WEIGHTS_NAME))["extra"]  # safetensors' own reader
    assert on_disk.dtype == dtype and torch.equal(on_disk.view(torch.uint8), m.extra.detach().view(torch.uint8))
    back = mq.load(tmp_path / "ck", model=Holder(dtype))
    assert back.extra.dtype == dtype
    assert torch.equal(back.extra.detach().view(torch.uint8), m.extra.detach().view(torch.uint8))
    for k, t in m.state_dict().items():
        assert torch.equal(back.state_dict()[k].view(torch.uint8), t.view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn], ids=str)
def test_the_saved_dtype_comes_back_in_a_model_built_in_another(dtype, tmp_path):
    """As for float16 / bfloat16 tensors: a load gives each tensor the dtype it was saved in."""
    m = Holder(dtype)
    mq.save(m, tmp_path / "ck")
    wider = torch.complex128 if dtype.is_complex else torch.float32
    back = mq.load(tmp_path / "ck", model=Holder(dtype, build_dtype=wider))
    assert back.extra.dtype == dtype
    assert torch.equal(back.extra.detach().view(torch.uint8), m.extra.detach().view(torch.uint8))


def test_a_dtype_safetensors_cannot_store_is_refused_before_writing(tmp_path):
    m = Holder(torch.complex128)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("mine")
    with pytest.raises(TypeError, match=r"extra.*complex128.*complex64"):
        mq.save(m, tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging folder left
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["keep.txt"]
