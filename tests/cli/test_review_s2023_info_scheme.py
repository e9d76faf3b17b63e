"""``medquant info --json``: each quantized layer's ``symmetric`` is its scheme as stored (no zero points:
symmetric), also when the recipe left the choice to the bit-width (``symmetric=None``: asymmetric at <= 3 bits)."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from medquant.cli import main
from tests.cli.tiny_folder import tiny_llama_folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("s2023_info_scheme") / "src")


@pytest.mark.parametrize("bits, extra", [("3", []), ("4", []), ("3", ["--symmetric"])])
def test_symmetric_is_the_stored_scheme(src, tmp_path, capsys, bits, extra):
    out = tmp_path / "q"
    assert main(["quantize", str(src), str(out), "--bits", bits, "--group-size", "32", *extra, "--json"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out)["layers"] if r["quantized"]]
    assert rows
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the reference: zero points stored or not
        keys = set(f.keys())
    for r in rows:
        has_zeros = f"{r['name']}.zeros_{bits}" in keys
        assert r["symmetric"] is (not has_zeros), r
