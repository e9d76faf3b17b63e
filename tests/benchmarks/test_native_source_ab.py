"""benchmarks.native_source_ab: each child builds the library from its own source, the outputs are compared bit for
bit, and the table reports what the rows hold."""
from __future__ import annotations

import subprocess

import pytest

from benchmarks import native_source_ab as ab
from medquant.kernels import native


def test_source_text_reads_a_file_or_a_revision_and_names_a_bad_spec(tmp_path):
    src = tmp_path / "repo" / ab.SOURCE_PATH
    src.parent.mkdir(parents=True)
    src.write_bytes(b"/* committed */\n")
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    src.write_bytes(b"/* edited */\n")
    assert ab.source_text("HEAD", repo) == b"/* committed */\n"
    assert ab.source_text(str(src), repo) == b"/* edited */\n"
    with pytest.raises(ValueError, match="neither a file nor a git revision"):
        ab.source_text("no-such-rev", repo)


#: the gemm's activations as 15-bit instead of 16-bit integers: another build key and slightly other outputs
_X16 = b"const float t = amax / 32767.0f, inv = amax > 0.0f && !bad ? 32767.0f / amax : 0.0f;"
_X15 = b"const float t = amax / 16383.0f, inv = amax > 0.0f && !bad ? 16383.0f / amax : 0.0f;"


@pytest.mark.skipif(not native.native_status()["gemv4"], reason="needs the native library (AVX512F + BW)")
def test_pairs_build_each_source_and_compare_outputs_bit_for_bit():
    """Head = base with the gemm taking x as 15-bit integers: each child builds and loads its own library from its
    own source (the outputs of the gemm rows differ, so the code followed the source, not only the build key), and
    the table says so; the ratio is the median of the rounds' ratios."""
    base = native.SOURCE.read_bytes()
    assert base.count(_X16) == 1
    head = base.replace(_X16, _X15)
    gemm = native.native_status()["gemm"]
    rows = ab.run_pairs(base, head, [(64, 256)], [32, 128], bits=4, m=16, rounds=2, repeats=1, threads=1)
    assert [r["layer"] for r in rows] == ["64x256 g32", "64x256 g128"]
    for r in rows:
        if gemm:  # 16 rows of bfloat16 x: the blocked matmul (AVX512-VNNI)
            assert r["path"] == "gemm"
        assert r["identical"] is (not gemm)
        assert r["base_ms"] > 0 and r["head_ms"] > 0 and r["dense_bf16_ms"] > 0
        assert r["head_over_base_min"] <= r["head_over_base"] <= r["head_over_base_max"]
        assert r["head_over_dense"] == pytest.approx(r["head_ms"] / r["dense_bf16_ms"])
    result = {"date": "d", "base": "HEAD", "head": "working tree", "bits": 4, "m": 16, "rounds": 2, "repeats": 1,
              "threads": 1, "loadavg_before": [0.0], "loadavg_after": [0.0], "rows": rows}
    line = [ln for ln in ab.markdown(result).splitlines() if ln.startswith("| 64x256 g32 |")]
    assert len(line) == 1 and line[0].rstrip().endswith("| **no** |" if gemm else "| yes |")
    same = ab.run_pairs(base, base, [(64, 256)], [32], bits=4, m=16, rounds=1, repeats=1, threads=1)
    assert same[0]["identical"] is True


@pytest.mark.skipif(not native.native_status()["gemv4"], reason="needs the native library (AVX512F + BW)")
def test_a_pass_over_a_sequence_of_layers_reports_its_weight_bytes_and_rate():
    """``sequence``: one row per group, a pass over every layer in order, each its own weights; its bytes are the
    layers' buffers (codes, scales, zero points), the rates bytes over each source's time, the same outputs."""
    src = native.SOURCE.read_bytes()
    rows = ab.run_pairs(src, src, [], [32], bits=4, m=1, rounds=1, repeats=2, threads=1,
                        sequence=[(64, 256), (32, 256), (64, 256)])
    assert [r["layer"] for r in rows] == ["pass of 3 layers g32"] and rows[0]["identical"]
    r = rows[0]
    from torch import nn

    from medquant.quant import QuantConfig, QuantLinear

    expected = sum(t.numel() * t.element_size() for n in (64, 32, 64)
                   for t in QuantLinear.from_float(nn.Linear(256, n, bias=False), QuantConfig(4, group_size=32))
                   .buffers())
    assert r["bytes"] == expected
    assert r["base_gbs"] == pytest.approx(expected / r["base_ms"] / 1e6)
    md = ab.markdown({"base": "a", "head": "b", "bits": 4, "m": 1, "rounds": 1, "repeats": 2, "threads": 1,
                      "loadavg_before": [0.0], "loadavg_after": [0.0], "date": "d", "rows": rows,
                      "read_bandwidth_gbs": 30.0})
    assert "pass of 3 layers g32: 0 MB of weights" in md and "read bandwidth (a float32 sum) 30.0 GB/s" in md
    # head_env reaches the head's children only: with the native kernels switched off there, the head fails
    with pytest.raises(RuntimeError, match="the head child failed"):
        ab.run_pairs(src, src, [], [32], bits=4, m=1, rounds=1, repeats=1, threads=1, sequence=[(64, 256)],
                     head_env={native.ENV_NATIVE: "0"})


def test_child_on_a_source_that_does_not_build_fails_clearly(tmp_path, monkeypatch):
    """A source that does not compile fails its child, named (own cache folder: no build is found under its key,
    so the child compiles exactly the bytes it was given)."""
    monkeypatch.setenv(native.ENV_CACHE_DIR, str(tmp_path / "cache"))
    bad = tmp_path / "dequant.c"
    bad.write_text("this is not C\n")
    with pytest.raises(RuntimeError, match="the base child failed"):
        ab.run_pairs(bad.read_bytes(), native.SOURCE.read_bytes(), [(64, 256)], [32], bits=4, m=16, rounds=1,
                     repeats=1, threads=1)
