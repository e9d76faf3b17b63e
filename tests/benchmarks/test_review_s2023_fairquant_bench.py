"""``python -m benchmarks.fairquant`` on a tiny stand-in for the NIH loader, whose patient split (and so the test set
and its group counts) changes with the seed, as ``load_nih_sex(seed=...)`` does."""
import json

import torch

from benchmarks import fairquant


def _nih_like(data_dir=None, seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    n_test = 20 + 10 * seed  # another split per seed: other test images, other group counts

    def split(n, male_every):
        x = torch.rand(n, 1, 16, 16, generator=g)
        y = (x[:, :, 4:12, 4:12].mean((1, 2, 3)) > x.mean((1, 2, 3))).long()
        return x, y, (torch.arange(n) % male_every == 0).long()

    return {"train": split(40, 2), "val": split(10, 2), "test": split(n_test, 2 + seed),
            "info": {"name": "stand-in", "classes": ["normal", "abnormal"], "groups": ["F", "M"],
                     "split": f"by patient_id, seed {seed}, (0.6, 0.2, 0.2)"}}


def test_nih_group_counts_and_split_of_every_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fairquant, "load_nih_sex", _nih_like)
    monkeypatch.setattr(fairquant, "settings", lambda quick: {
        "archs": ["cnn"], "seeds": [0, 1], "epochs": {"nih": 1}, "ft_steps": {"nih": 1}, "calib_batches": 1})
    threads = torch.get_num_threads()
    out = tmp_path / "fq.json"
    try:
        assert fairquant.main(["--quick", "--datasets", "nih", "--no-progress", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    counts = {}  # the reference: each seed's own test split
    for seed in (0, 1):
        gt = _nih_like(seed=seed)["test"][2]
        counts[seed] = {str(k): int((gt == k).sum()) for k in (0, 1)}
    assert counts[0] != counts[1]
    for row in res["rows"]:
        assert row["n_by_group"] == counts[row["seed"]]
    fp32 = next(s for s in res["summary"] if s["method"] == "FP32")
    # the summary's counts stand next to accuracies averaged over both seeds: they must not be seed 0's alone
    assert fp32["n_by_group"] == {g: [counts[0][g], counts[1][g]] for g in ("0", "1")}
    table_row = next(ln for ln in res["table_markdown"].splitlines() if "| FP32 |" in ln)
    assert f"({counts[0]['0']}/{counts[1]['0']})" in table_row
    # the data record names the split of every seed, not the last one's
    split = res["data"]["nih"]["split"]
    assert "seed 0" in json.dumps(split) and "seed 1" in json.dumps(split)
