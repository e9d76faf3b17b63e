"""``medquant export --format compressed-tensors``: an OUT that is the ``--source`` folder itself is refused before the
model is loaded, as an OUT holding it is (the export replaces OUT as a whole folder)."""
from __future__ import annotations

import pytest

import medquant.cli.export
from medquant.cli import main
from tests.cli.tiny_folder import tiny_llama_folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A W8 folder (``medquant quantize``) and its compressed-tensors export (``medquant export``)."""
    root = tmp_path_factory.mktemp("s2023_export_source")
    tiny_llama_folder(root / "src")
    assert main(["quantize", str(root / "src"), str(root / "q8"), "--bits", "8", "--json"]) == 0
    assert main(["export", str(root / "q8"), str(root / "served"), "--format", "compressed-tensors", "--json"]) == 0
    return root


@pytest.mark.parametrize("spelling", ["same", "dotted"])
def test_out_that_is_the_source_folder_is_refused_before_loading(served, capsys, monkeypatch, spelling):
    monkeypatch.setattr(medquant.cli.export, "load_source",
                        lambda *a, **k: pytest.fail("the model was loaded before the arguments were checked"))
    before = sorted(p.name for p in (served / "served").iterdir())
    source = str(served / "served") if spelling == "same" else str(served / "served" / ".." / "served")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["export", str(served / "q8"), str(served / "served"), "--format", "compressed-tensors",
              "--source", source, "--overwrite"])
    line = next(x for x in capsys.readouterr().err.splitlines() if "error:" in x)
    assert e.value.code == 2 and line.startswith("medquant export: error: OUT") and "--source" in line
    assert sorted(p.name for p in (served / "served").iterdir()) == before
