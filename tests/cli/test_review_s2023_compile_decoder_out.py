"""``medquant compile-decoder``: OUT_DIR appears only when the decoder is saved whole. A save that fails part way
(a full disk, an interrupt while the program packages are copied) leaves OUT_DIR as it was, so the same command
can be run again; the decoder compiled here is a stand-in whose ``save`` writes one package and fails."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import medquant.quant.aot
from medquant.cli import main
from tests.cli.tiny_folder import tiny_llama_folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("s2023_compile_out") / "src")


class _FailingSave:
    max_len, batch_size, chunks, cache_lengths, bound_layers = 8, 1, (), [8], 0
    closed = False

    def save(self, path):
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "step-8.pt2").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    def close(self):
        self.closed = True


@pytest.mark.parametrize("existing", [False, True])
def test_a_save_that_fails_leaves_out_dir_as_it_was(src, tmp_path, capsys, monkeypatch, existing):
    stand_in = _FailingSave()
    monkeypatch.setattr(medquant.quant.aot, "compile_decoder", lambda *a, **k: stand_in)
    out = tmp_path / "decoder dir"
    if existing:
        out.mkdir()
    assert main(["compile-decoder", str(src), str(out), "--max-len", "8", "--json"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert stand_in.closed
    if existing:
        assert out.is_dir() and not any(out.iterdir())
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["decoder dir"] if existing else [])


class _GoodSave(_FailingSave):
    def save(self, path):
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "step-8.pt2").write_bytes(b"program")
        (folder / "decoder.json").write_text("{}")
        return folder


@pytest.mark.parametrize("spelling", ["new", "empty", "dot"])
def test_the_saved_decoder_lands_in_out_dir(src, tmp_path, capsys, monkeypatch, spelling):
    monkeypatch.setattr(medquant.quant.aot, "compile_decoder", lambda *a, **k: _GoodSave())
    out = tmp_path / "decoder dir"
    if spelling != "new":
        out.mkdir()
    if spelling == "dot":  # the empty current folder
        monkeypatch.chdir(out)
    assert main(["compile-decoder", str(src), "." if spelling == "dot" else str(out), "--max-len", "8",
                 "--json"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["decoder.json", "step-8.pt2"]
    assert (out / "step-8.pt2").read_bytes() == b"program"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder dir"]  # no staging folder left
    if spelling == "dot":
        assert sorted(os.listdir(".")) == ["decoder.json", "step-8.pt2"]  # the current folder itself, not a copy
