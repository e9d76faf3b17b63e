"""A single-file export (GGUF, ONNX) to a path that is a symbolic link writes the file the link names.

``os.replace(tmp, link)`` replaced the link itself with a new file beside it: the link's target kept the old model
while the path the user gave now held the new one, and the link was gone. The link is now followed (as the
compressed-tensors folder export follows a link), and a link to nothing is refused.
"""
from __future__ import annotations

import os

import pytest
from gguf import GGUFReader

from medquant import QuantConfig, quantize_
from medquant.deploy import ExportError, export
from medquant.deploy.registry import output_file_path
from medquant.testing.zoo import ZOO_BY_NAME


def _model(bits):
    model = ZOO_BY_NAME["llama"].build()
    quantize_(model, QuantConfig(bits=bits, group_size=32))
    return model


@pytest.mark.parametrize("absolute", [True, False])
def test_overwrite_through_a_link_replaces_its_target_and_keeps_the_link(tok_dir, tmp_path, absolute):
    store, here = tmp_path / "store", tmp_path / "here"
    store.mkdir()
    here.mkdir()
    export(_model(4), store / "real.gguf", format="gguf", source=tok_dir)
    old = (store / "real.gguf").read_bytes()
    link = here / "m.gguf"
    link.symlink_to(store / "real.gguf" if absolute else os.path.relpath(store / "real.gguf", here))
    target = os.readlink(link)
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        export(_model(8), link, format="gguf", source=tok_dir)
    export(_model(8), link, format="gguf", source=tok_dir, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == target  # the link, as it was
    new = (store / "real.gguf").read_bytes()
    assert new != old and new == link.read_bytes()
    types = {t.tensor_type.name for t in GGUFReader(str(store / "real.gguf")).tensors}
    assert "Q8_0" in types and "Q4_0" not in types  # the 8-bit model, in the link's target
    assert sorted(os.listdir(here)) == ["m.gguf"] and sorted(os.listdir(store)) == ["real.gguf"]  # no leftovers


def test_a_link_to_nothing_is_refused(tok_dir, tmp_path):
    link = tmp_path / "m.gguf"
    link.symlink_to(tmp_path / "missing" / "real.gguf")
    with pytest.raises(ExportError, match=r"m\.gguf is a symbolic link to .*missing/real\.gguf, which does not exist"):
        export(_model(4), link, format="gguf", source=tok_dir, overwrite=True)
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_the_file_a_link_names_is_the_file_written(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.onnx").write_bytes(b"x")
    (tmp_path / "l.onnx").symlink_to(tmp_path / "d" / "a.onnx")
    assert output_file_path(tmp_path / "l.onnx", True, suffix=".onnx", format="onnx") == tmp_path / "d" / "a.onnx"
    (tmp_path / "dl").symlink_to(tmp_path / "d")  # a link to a folder: model.onnx inside the folder it names
    assert output_file_path(tmp_path / "dl", True, suffix=".onnx", format="onnx") == tmp_path / "dl" / "model.onnx"
    (tmp_path / "e").mkdir()
    (tmp_path / "d" / "model.onnx").symlink_to(tmp_path / "e")  # a link to a folder where the file goes
    with pytest.raises(ExportError, match="is a folder"):
        output_file_path(tmp_path / "dl", True, suffix=".onnx", format="onnx")
