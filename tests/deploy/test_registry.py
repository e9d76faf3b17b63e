"""The export dispatcher: unknown formats, duplicate registrations, missing packages, backend contract, reports."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from medquant.deploy import (
    ExportError,
    ExportReport,
    LayerExport,
    export,
    export_formats,
    format_description,
    register_export_format,
    registry,
)
from medquant.deploy.registry import check_format


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch):
    """Registrations made by a test disappear after it. The compressed-tensors backend registers itself when its
    module is first imported: import it before copying, so that its registration is not lost with the copy."""
    importlib.import_module("medquant.deploy.compressed_tensors")
    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))


def _recording_backend(calls):
    def backend(model, path, **options):
        calls.append((model, path, options))
        return ExportReport("toy", str(path), [LayerExport("fc", "int4 sym g32", "toy4", "exact repack")])

    return backend


def test_export_dispatches_to_the_registered_backend_with_its_options(tmp_path):
    calls = []
    register_export_format("toy", _recording_backend(calls), description="a toy format")
    model = torch.nn.Linear(4, 2)
    report = export(model, tmp_path / "x", format="toy", promote=True)
    assert calls == [(model, tmp_path / "x", {"promote": True})]
    assert report.counts() == {"exact repack": 1} and report.lossy() == []
    assert "toy" in export_formats() and format_description("toy") == "a toy format"
    assert {"compressed-tensors", "gguf", "onnx"} <= set(export_formats())


def test_unknown_format_names_the_available_ones():
    with pytest.raises(ExportError, match=r"unknown export format 'tflite'; available: .*compressed-tensors"):
        export(torch.nn.Linear(2, 2), "out", format="tflite")


def test_duplicate_registration_is_refused_unless_replace():
    register_export_format("toy", _recording_backend([]))
    with pytest.raises(ValueError, match="already registered"):
        register_export_format("toy", _recording_backend([]))
    calls = []
    register_export_format("toy", _recording_backend(calls), replace=True)
    export(torch.nn.Linear(2, 2), "out", format="toy")
    assert len(calls) == 1
    with pytest.raises(ValueError, match="non-empty string"):
        register_export_format("", _recording_backend([]))


def test_a_missing_package_is_named_before_the_backend_runs():
    calls = []
    register_export_format("needs-pkg", _recording_backend(calls), requires=("torch", "medquant_no_such_pkg"))
    with pytest.raises(ExportError, match="needs the package\\(s\\) medquant_no_such_pkg; install"):
        export(torch.nn.Linear(2, 2), "out", format="needs-pkg")
    with pytest.raises(ExportError, match="medquant_no_such_pkg"):
        check_format("needs-pkg")
    assert calls == []


def test_a_builtin_backend_module_that_is_missing_is_an_export_error(monkeypatch):
    monkeypatch.setitem(registry._BUILTIN, "vapour", "medquant.deploy.vapour_backend")
    with pytest.raises(ExportError, match="not available in this installation.*vapour_backend"):
        check_format("vapour")


def test_backend_contract_and_model_type_are_checked():
    register_export_format("bad", lambda model, path, **o: {"not": "a report"})
    with pytest.raises(TypeError, match="returned dict, not an ExportReport"):
        export(torch.nn.Linear(2, 2), "out", format="bad")
    with pytest.raises(ExportError, match="needs an nn.Module"):
        export({"weight": torch.zeros(2)}, "out", format="compressed-tensors")


def test_compressed_tensors_registers_itself_on_first_use():
    pytest.importorskip("compressed_tensors")
    check_format("compressed-tensors")
    assert "pack-quantized" in format_description("compressed-tensors")


def test_report_table_and_json():
    rows = [LayerExport("a", "int4 sym g32", "Q4_0", "exact repack"),
            LayerExport("b", "int4 asym g32", "Q4_1", "near-exact", 3e-5, "m = -z*s in fp16"),
            LayerExport("c", "float32", "F32", "float")]
    report = ExportReport("gguf", "m.gguf", rows, ["m.gguf"], ["a note"])
    text = report.table()
    assert "1 exact repack; 1 near-exact; 1 float -> m.gguf (gguf)" in text and "3e-05" in text
    assert "note: a note" in text
    data = json.loads(report.to_json())
    assert data["counts"] == {"exact repack": 1, "near-exact": 1, "float": 1}
    assert data["layers"][1]["max_abs_error"] == 3e-5
    assert [r.name for r in report.lossy()] == ["b"]
    assert "... 2 more rows" in report.table(max_rows=1)
    with pytest.raises(ValueError, match="how must be one of"):
        LayerExport("d", "int4", "x", "approximately")


def test_parse_size_reads_units_and_refuses_what_is_no_byte_count():
    """Decimal and binary units as documented (1000^k / 1024^k); an infinite, non-positive or unreadable size is an
    ExportError naming it (``"inf"`` raised OverflowError)."""
    from medquant.deploy import ExportError, parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2 GiB") == 2 * 2**30 and parse_size(1000) == 1000
    assert parse_size("1.5kb") == 1500
    for bad in ("inf", "-inf", "1e400GB"):
        with pytest.raises(ExportError, match="finite"):
            parse_size(bad)
    for bad in ("0", -5, True, "lots"):
        with pytest.raises(ExportError):
            parse_size(bad)


def test_publish_mode_gives_a_private_temporary_the_umask_mode(tmp_path):
    """mkstemp files (0600) become 0o666 & ~umask, mkdtemp folders (0700) 0o777 & ~umask; the umask is kept."""
    import os
    import stat
    import tempfile

    from medquant.deploy.registry import publish_mode

    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    folder = tempfile.mkdtemp(dir=tmp_path)
    old = os.umask(0o027)
    try:
        publish_mode(Path(name))
        publish_mode(Path(folder))
        assert os.umask(0o027) == 0o027  # still the caller's umask
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(name).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o750


def test_made_folders_removes_the_folders_it_created_when_the_block_fails(tmp_path):
    from medquant.deploy.registry import made_folders

    with pytest.raises(RuntimeError, match="failed"), made_folders(tmp_path / "a" / "b" / "c") as folder:
        assert folder.is_dir()
        raise RuntimeError("failed")
    assert not any(tmp_path.iterdir())
    (tmp_path / "a").mkdir()
    # a created folder that something else wrote into is kept
    with pytest.raises(RuntimeError, match="failed"), made_folders(tmp_path / "a" / "b" / "c"):
        (tmp_path / "a" / "b" / "other.txt").write_text("x")
        raise RuntimeError("failed")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a", "a/b", "a/b/other.txt"]
    with made_folders(tmp_path / "x" / "y"):  # a block that succeeds keeps them
        pass
    assert (tmp_path / "x" / "y").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ExportError, match=r"f exists and is not a folder; the export cannot create .*f/sub"), \
            made_folders(tmp_path / "f" / "sub"):
        raise AssertionError("not reached")
    assert (tmp_path / "f").read_text() == "x"
