"""Where ``medquant quantize`` / ``pipeline`` / ``prune`` write, and reading back what they wrote: an output folder that is
the model folder itself is refused before any work (the float source would be replaced by its compressed copy),
and ``info`` / ``eval`` read a ``medquant pipeline`` checkpoint pruned per layer as
:func:`medquant.pipeline.load_compressed` does."""
from __future__ import annotations

import hashlib
import json

import pytest

from medquant.cli import main
from tests.cli.tiny_folder import report_text_file, tiny_llama_folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    tiny_llama_folder(root / "src")
    report_text_file(root)
    return root


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("spelling", ["same", "dotted", "link"])
@pytest.mark.parametrize("command", ["quantize", "pipeline", "prune"])
def test_an_output_folder_that_is_the_model_folder_is_refused_before_any_work(root, tmp_path, command, spelling,
                                                                              capsys, monkeypatch):
    import medquant.cli.prune

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(medquant.cli.prune, "_load", no_work)
    src = root / "src"
    out = {"same": str(src), "dotted": str(src / ".." / "src"), "link": str(tmp_path / "link")}[spelling]
    if spelling == "link":
        (tmp_path / "link").symlink_to(src, target_is_directory=True)
    before = _digest(src)
    argv = {"quantize": ["quantize", str(src), out, "--group-size", "32"],
            "pipeline": ["pipeline", str(src), "--out", out, "--train", "none", "--quant", "rtn", "--text",
                         str(root / "t.txt")],
            "prune": ["prune", str(src), "--out", out, "--calib-text", str(root / "t.txt")]}[command]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]  # argparse's usage, then the error in one line
    assert last.startswith(f"medquant {command}: error: ") and "is the model folder" in last
    assert _digest(src) == before


@pytest.mark.parametrize("quant", ["rtn", "none"])
def test_info_and_eval_read_a_pipeline_checkpoint_pruned_per_layer_as_load_compressed(root, quant, capsys):
    from transformers import AutoTokenizer

    from medquant.eval.lm import perplexity, token_batches
    from medquant.pipeline import load_compressed
    from medquant.quant.size import model_size

    out = root / f"per_layer_{quant}"
    assert main(["pipeline", str(root / "src"), "--out", str(out), "--heads", "0.25", "--ffn", "0.25",
                 "--layer-select", "--train", "none", "--quant", quant,
                 *(["--group-size", "32"] if quant != "none" else []),  # a skipped stage's option is refused
                 "--text", str(root / "t.txt"), "--calib-samples", "4", "--max-length", "16"]) == 0
    capsys.readouterr()
    ref = load_compressed(out).eval()
    widths = {ref.model.layers[i].mlp.up_proj.out_features for i in range(2)}
    assert max(widths) < 128  # pruned
    assert main(["info", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"] == model_size(ref).as_dict()
    assert report["layers_quantized"] == (14 if quant == "rtn" else 0)
    texts = [t for t in (root / "t.txt").read_text().splitlines() if t.strip()]
    tok = AutoTokenizer.from_pretrained(out)
    assert main(["eval", str(out), "--text", str(root / "t.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(
        perplexity(ref, token_batches(tok, texts, batch_size=8, max_length=512)), rel=1e-6)
