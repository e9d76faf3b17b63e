"""benchmarks.common: the NIH patient split, the data directory, the versions / hardware record."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import datasets
from benchmarks.common.env import cpu_info, hardware, versions


def test_nih_patient_split_keeps_patients_together_and_rounds_to_nearest():
    rng = np.random.default_rng(1)
    pid = rng.integers(0, 264, size=1000)
    pid[:264] = np.arange(264)  # every patient present
    split = datasets.nih_patient_split(pid, seed=0)
    by_patient = {}
    for p, s in zip(pid, split):
        assert by_patient.setdefault(p, s) == s
    counts = {s: sum(v == s for v in by_patient.values()) for s in ("train", "val", "test")}
    assert counts == {"train": round(0.6 * 264), "val": round(0.8 * 264) - round(0.6 * 264),
                      "test": 264 - round(0.8 * 264)}
    # the same permutation as shuffling the sorted unique ids with default_rng(seed)
    patients = np.unique(pid)
    np.random.default_rng(0).shuffle(patients)
    assert set(patients[:158]) == {p for p, s in by_patient.items() if s == "train"}
    assert (datasets.nih_patient_split(pid, seed=0) == split).all()
    assert not (datasets.nih_patient_split(pid, seed=1) == split).all()


def test_data_dir_argument_then_env_then_the_repository_sibling(monkeypatch, tmp_path):
    assert datasets.data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("MEDQUANT_DATA_DIR", str(tmp_path / "env"))
    assert datasets.data_dir() == tmp_path / "env"
    monkeypatch.delenv("MEDQUANT_DATA_DIR")
    assert datasets.data_dir() == (Path(datasets.__file__).resolve().parents[3] / "shared" / "data").resolve()
    assert datasets.use_data_dir(tmp_path) == tmp_path and os.environ["MEDQUANT_DATA_DIR"] == str(tmp_path)


def test_cpu_info_reads_the_model_and_matrix_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n\n"
                 "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    info = cpu_info(str(f))
    assert info["model"] == "Test CPU 9000"
    assert info["flags"] == {"avx2": True, "avx512f": True, "avx512_bf16": True, "avx512_vnni": False,
                             "avx_vnni": False, "amx_bf16": False, "amx_int8": False, "amx_tile": True}
    assert cpu_info(str(tmp_path / "missing"))["model"] is None


def test_versions_and_hardware_records():
    v = versions("no_such_package_xyz")
    assert v["torch"] and v["medquant"] and v["no_such_package_xyz"] is None
    hw = hardware(note="x")
    assert hw["note"] == "x" and hw["cpus"] >= 1 and set(hw["cpu_flags"]) >= {"avx512f", "amx_tile"}


@pytest.mark.skipif(not (datasets.data_dir() / "nih_cxr14_sample1000_64").exists(), reason="NIH sample not found")
def test_both_users_of_the_nih_split_see_the_same_patients():
    from benchmarks.common.adaptive_experiment import load_dataset

    fq = datasets.load_nih_sex(seed=0)
    ad = load_dataset("nih", split_seed=0)
    for a, b in (("train", "train"), ("val", "calib"), ("test", "test")):
        assert len(fq[a][0]) == len(ad[b][0])
    assert [len(fq[s][0]) for s in ("train", "val", "test")] == [589, 145, 266]
