"""Review of the export dispatcher and ``medquant export``: a built-in format name registered before its backend
module was imported, OUT folders that hold the source checkpoint, single-file formats written into an existing
folder.

References: the file system itself (files byte-equal to what was there), ``onnx.load`` / ONNX Runtime for the file
written, plain torch for the model's output.
"""
from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

import medquant as mq
from medquant.cli import main
from medquant.deploy import ExportReport, LayerExport, export, register_export_format, registry
from medquant.testing.zoo import ZOO_BY_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUILTIN_SOURCE = '''
from medquant.deploy import ExportReport, LayerExport, register_export_format

def backend(model, path, **options):
    return ExportReport("toy-builtin", str(path), [LayerExport("fc", "int4 sym g32", "builtin", "exact repack")])

register_export_format("toy-builtin", backend, description="the built-in one")
'''


@pytest.fixture
def lazy_builtin(tmp_path, monkeypatch):
    """A built-in format whose backend module registers itself on first use (like gguf and compressed-tensors),
    not imported yet; registrations made by the test disappear after it."""
    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))
    monkeypatch.setattr(registry, "_BUILTIN", {**registry._BUILTIN, "toy-builtin": "mq_review_builtin"})
    (tmp_path / "mq_review_builtin.py").write_text(BUILTIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mq_review_builtin", raising=False)
    yield
    sys.modules.pop("mq_review_builtin", None)


def _user_backend(model, path, **options):
    return ExportReport("toy-builtin", str(path), [LayerExport("fc", "int4 sym g32", "user", "exact repack")])


def test_a_builtin_name_is_registered_before_its_module_is_imported(lazy_builtin):
    """Registering a built-in format's name without ``replace=True`` is refused as for any registered name (it was
    accepted while the backend module was not imported yet, and importing that module later -- ``import
    medquant.deploy.gguf`` -- then raised "already registered")."""
    assert "mq_review_builtin" not in sys.modules
    with pytest.raises(ValueError, match="'toy-builtin' is already registered"):
        register_export_format("toy-builtin", _user_backend)
    importlib.import_module("mq_review_builtin")  # importing the backend module still works
    assert export(torch.nn.Linear(2, 2), "out", format="toy-builtin").layers[0].target == "builtin"


def test_replacing_a_builtin_before_its_module_is_imported_survives_the_import(lazy_builtin):
    """``replace=True`` on a built-in name keeps the user's backend, and a later import of the built-in module
    neither raises nor puts the built-in back."""
    register_export_format("toy-builtin", _user_backend, description="mine", replace=True)
    importlib.import_module("mq_review_builtin")
    assert export(torch.nn.Linear(2, 2), "out", format="toy-builtin").layers[0].target == "user"
    assert registry.format_description("toy-builtin") == "mine"


def test_a_builtin_whose_module_is_missing_can_still_be_registered(monkeypatch):
    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))
    monkeypatch.setattr(registry, "_BUILTIN", {**registry._BUILTIN, "vapour": "medquant.deploy.vapour_backend"})
    register_export_format("vapour", _user_backend)
    assert export(torch.nn.Linear(2, 2), "out", format="vapour").layers[0].target == "user"


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("review_llama")
    model = mq.quantize_(ZOO_BY_NAME["llama"].build(), mq.QuantConfig(4, symmetric=True, group_size=32),
                         skip=["lm_head"])
    mq.save(model, root / "src")
    return root / "src"


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["src", "source"])
def test_overwrite_never_replaces_a_folder_that_holds_the_source(llama_src, tmp_path, capsys, where):
    """``medquant export runs/model runs --overwrite`` swapped the whole ``runs`` folder for the export: the source
    checkpoint (and everything else in ``runs``) was deleted. OUT holding SRC or ``--source`` is refused, exit 2,
    nothing touched."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(llama_src, runs / "model")
    (runs / "notes.txt").write_text("precious")
    (runs / "tok").mkdir()
    (runs / "tok" / "tokenizer_config.json").write_text("{}")
    before = _snapshot(runs)
    src = runs / "model" if where == "src" else llama_src
    extra = ["--source", str(runs / "tok")] if where == "source" else []
    with pytest.raises(SystemExit) as e:
        main(["export", str(src), str(runs), "--format", "compressed-tensors", "--overwrite", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"OUT {runs} holds {'SRC' if where == 'src' else '--source'}" in err
    assert _snapshot(runs) == before


def test_a_file_format_writes_into_an_existing_folder_without_overwrite(tmp_path, capsys):
    """``--format onnx`` (or gguf) with OUT a non-empty folder writes OUT/model.onnx beside the other files, as
    the Python API does; it was refused with "exists and is not empty; pass --overwrite to replace it", although
    --overwrite replaces only OUT/model.onnx."""
    import onnxruntime as ort

    model = ZOO_BY_NAME["vit"].build()
    mq.save(model, tmp_path / "float")
    out = tmp_path / "models"
    out.mkdir()
    (out / "keep.txt").write_text("kept")
    assert main(["export", str(tmp_path / "float"), str(out), "--format", "onnx", "--input-shape",
                 "1,3,32,32"]) == 0
    assert f"-> {out / 'model.onnx'} (onnx)" in capsys.readouterr().out
    assert (out / "keep.txt").read_text() == "kept"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "model.onnx"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(pixel_values=x).logits.numpy()
    np.testing.assert_allclose(sess.run(None, {"pixel_values": x.numpy()})[0], want, atol=1e-4, rtol=1e-4)
    # the file now exists: a second export needs --overwrite, which replaces that file only
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "float"), str(out), "--format", "onnx", "--input-shape", "1,3,32,32"])
    assert e.value.code == 2 and "model.onnx exists; pass overwrite=True" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "float"), str(out), "--format", "onnx", "--input-shape", "1,3,32,32",
                 "--overwrite"]) == 0
    assert (out / "keep.txt").read_text() == "kept"


def _float_and_pruned_rows(model_layer_name: str):
    """A config map giving ``model_layer_name`` 2 pruned rows and float16 rows otherwise (no integer rows)."""
    return {model_layer_name: mq.QuantConfig(16, channel_bits=(0,) * 2 + (16,) * 126)}


def test_a_layer_of_float_and_pruned_rows_is_written_as_float_without_promote(tmp_path):
    """A quantized layer without integer rows (float16 rows and pruned rows) is the float weight medquant computes
    with, which every format stores as float exactly; it was refused as "mixed" unless ``promote=True`` (which then
    requantized nothing). Reference: the tensor read back with safetensors equals ``dequantized_weight`` in float64,
    and the packed layers beside it are untouched."""
    from safetensors import safe_open

    from medquant.deploy.common import layer_weight, mixed_layers, quantized_layers

    name = "model.layers.0.self_attn.q_proj"
    model = ZOO_BY_NAME["llama"].build()
    mq.quantize_(model, {**_float_and_pruned_rows(name), "_default": mq.QuantConfig(4, symmetric=True,
                                                                                   group_size=32)},
                 skip=["lm_head"])
    layer = dict(quantized_layers(model))[name]
    assert layer.mixed and sorted(layer.bit_groups) == [0, 16]
    assert mixed_layers(model) == [] and layer_weight(layer) is None
    report = export(model, tmp_path / "ct", format="compressed-tensors")
    row = {r.name: r for r in report.layers}[name]
    assert (row.how, row.max_abs_error, row.scheme) == ("float", 0.0, "mixed {0: 2 rows, 16: 126 rows}")
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        got = f.get_tensor(f"{name}.weight").double()
    want = layer.dequantized_weight(torch.float64)
    assert torch.equal(got, want) and torch.count_nonzero(got.abs().sum(1)) == 126
    assert report.counts() == {"float": 3, "exact repack": 13}


def test_onnx_writes_a_float_and_pruned_layer_as_float_without_promote(tmp_path):
    """The same layer in an ONNX export: its initializer (read with onnx.numpy_helper) equals the dequantised
    weight, and ONNX Runtime's output equals the medquant model's."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from medquant.deploy.common import quantized_layers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4)).eval()
    mq.quantize_(model, _float_and_pruned_rows("0"))
    layer = dict(quantized_layers(model))["0"]
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    report = export(model, tmp_path / "m.onnx", format="onnx", example_inputs=x)
    assert {r.name: (r.how, r.max_abs_error) for r in report.layers}["0"] == ("float", 0.0)
    want = layer.dequantized_weight(torch.float64).numpy()
    inits = [numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer]
    assert any(a.shape == want.shape and np.array_equal(a, want) or a.shape == want.T.shape and
               np.array_equal(a, want.T) for a in inits)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], ref, atol=1e-5, rtol=1e-5)


def test_a_file_name_with_the_suffix_in_capitals_is_the_file(tmp_path):
    """``Net.ONNX`` names the file, as ``Net.onnx`` does (the suffix's case is not the user's intent); it became a
    folder ``Net.ONNX/`` holding ``model.onnx``. Reference: onnx.load of the file, ONNX Runtime's output."""
    import onnxruntime as ort

    from medquant.deploy.registry import output_file_path

    assert output_file_path(tmp_path / "m.GGUF", False, suffix=".gguf", format="gguf") == tmp_path / "m.GGUF"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)
    report = export(model, tmp_path / "Net.ONNX", format="onnx", example_inputs=x)
    assert report.path == str(tmp_path / "Net.ONNX") and (tmp_path / "Net.ONNX").is_file()
    sess = ort.InferenceSession(str(tmp_path / "Net.ONNX"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], want, atol=1e-6)


def test_requires_given_as_one_string_names_one_package(monkeypatch):
    """``requires="torch"`` is the package torch (it was read letter by letter: "needs the package(s) t, o, r, c,
    h" although torch is installed)."""
    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))
    register_export_format("needs-torch", _user_backend, requires="torch")
    assert export(torch.nn.Linear(2, 2), "out", format="needs-torch").layers[0].target == "user"
    register_export_format("needs-missing", _user_backend, requires="medquant_no_such_pkg")
    with pytest.raises(registry.ExportError, match=r"needs the package\(s\) medquant_no_such_pkg; install"):
        registry.check_format("needs-missing")
