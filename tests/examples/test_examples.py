"""Every script in examples/ runs with ``--smoke`` (tiny random models, a few real images / reports) as a user
would run it: a subprocess from the repository root, the real data in ``$MEDQUANT_DATA_DIR`` (or the
``../shared/data`` folder next to the checkout). What each one writes is checked against the library or the
file's own reader, not only its exit code."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
# the six runs share one fixture: about a minute on an idle 2-core machine, far more on a loaded one
pytestmark = pytest.mark.timeout(1800)


def _data_dir() -> Path:
    return Path(os.environ.get("MEDQUANT_DATA_DIR") or REPO.parent / "shared" / "data")


# script -> extra arguments ({tmp} is the test's folder); every example must be here
SMOKE = {
    "quantize_vlm.py": ["--out", "{tmp}/vlm"],
    "complexity_bits.py": ["--out", "{tmp}/bits.csv"],
    "fair_skin_lesions.py": ["--out", "{tmp}/fq"],
    "prune_distill_quantize.py": ["--out", "{tmp}/pdq"],
    "qlora_reports.py": ["--out", "{tmp}/adapter"],
    "export_for_serving.py": ["--out", "{tmp}/served"],
    "fast_cpu_decode.py": ["--out", "{tmp}/decode"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every example, two at a time (they are mostly single-threaded: on 2 cores this halves the wall time
    while keeping memory to two processes), and collect ``script -> (returncode, stdout, stderr, folder)``."""
    if not _data_dir().is_dir():
        pytest.skip(f"the real data is not at {_data_dir()} (set MEDQUANT_DATA_DIR)")
    env = {**os.environ, "MEDQUANT_DATA_DIR": str(_data_dir()), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}

    def run(script: str, tmp: Path) -> tuple[int, str, str, Path]:
        cmd = [sys.executable, str(EXAMPLES / script), "--smoke", *(a.format(tmp=tmp) for a in SMOKE[script])]
        proc = subprocess.run(cmd, check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        return proc.returncode, proc.stdout, proc.stderr, tmp

    folders = {script: tmp_path_factory.mktemp(script.removesuffix(".py")) for script in SMOKE}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {script: pool.submit(run, script, folders[script]) for script in SMOKE}
        return {script: f.result() for script, f in futures.items()}


def _run(runs, script: str) -> tuple[str, Path]:
    code, stdout, stderr, tmp = runs[script]
    assert code == 0, f"{script} --smoke failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout, tmp


def test_every_example_is_tested_and_listed_in_the_readme():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert set(scripts) == set(SMOKE), f"examples without a smoke run: {sorted(set(scripts) - set(SMOKE))}"
    checked = set(re.findall(r'_run\(runs, "(\w+\.py)"\)', Path(__file__).read_text(encoding="utf-8")))
    assert checked == set(SMOKE)
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    assert all(s in readme for s in scripts)


def test_quantize_vlm(runs):
    import medquant as mq
    from medquant.quant import QuantLinear

    out, tmp_path = _run(runs, "quantize_vlm.py")
    assert "next-token agreement" in out
    model = mq.load(tmp_path / "vlm")
    kinds = {name: isinstance(m, QuantLinear) for name, m in model.named_modules()
             if isinstance(m, QuantLinear) or type(m).__name__ == "Linear"}
    assert any(q for n, q in kinds.items() if "language_model" in n)
    assert not any(q for n, q in kinds.items() if "vision" in n or n.endswith("lm_head"))


def test_complexity_bits(runs):
    out, tmp_path = _run(runs, "complexity_bits.py")
    with open(tmp_path / "bits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and f"scored {len(rows)} images" in out
    level_bits = {"0": "2", "1": "4", "2": "8", "3": "32"}
    assert all(r["bits"] == level_bits[r["level"]] for r in rows)


def test_fair_skin_lesions(runs):
    import medquant as mq

    out, tmp_path = _run(runs, "fair_skin_lesions.py")
    assert "FairQuant + FQ-QAT" in out and "worst" in out
    assert "fairquant" in mq.load_extras(tmp_path / "fq")


def test_prune_distill_quantize(runs):
    import medquant as mq

    out, tmp_path = _run(runs, "prune_distill_quantize.py")
    assert "pruned 30% + distilled" in out and "AWQ int4" in out
    model = mq.load_pruned(tmp_path / "pdq")
    mlp = model.model.layers[0].mlp
    assert mlp.up_proj.out_features < 256  # the tiny model's FFN (256 neurons) lost 30%


def test_qlora_reports(runs):
    out, tmp_path = _run(runs, "qlora_reports.py")
    assert "labeler F1" in out
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_export_for_serving(runs):
    import json

    out, tmp_path = _run(runs, "export_for_serving.py")
    config = json.loads((tmp_path / "served" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    diff = float(re.search(r"largest logit difference ([0-9.e+-]+)", out).group(1))
    assert diff < 0.05


def test_fast_cpu_decode(runs):
    """The saved model and decoder, loaded here (``medquant.load``, ``load_decoder``, which checks the model's
    weights against the saved record), continue a prompt as transformers' ``generate`` does on the loaded model."""
    import torch

    import medquant as mq
    from medquant.quant import QuantLinear

    out, tmp_path = _run(runs, "fast_cpu_decode.py")
    assert "| W4 g32, compile_decoder | 8 |" in out and "saved decoder loaded" in out
    model = mq.load(tmp_path / "decode" / "model")
    assert isinstance(model.lm_head, QuantLinear)  # the head quantized too
    decoder = mq.load_decoder(tmp_path / "decode" / "decoder", model, progress=False)
    ids = torch.randint(1, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(decoder.generate(ids, 6), expected)
    decoder.close()
