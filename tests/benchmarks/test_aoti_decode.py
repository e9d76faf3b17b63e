"""benchmarks.aoti_decode: one round of the script on a small random LLaMA, through the public API only."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import aoti_decode as ad


@pytest.mark.slow
def test_one_round_records_paired_rates_ratios_and_the_token_check(tmp_path, monkeypatch):
    """The script's record, with real compiled programs: per contender prefill and decode rates, the AOT
    decoder's per-round ratios to ``static_decode_``'s, and its greedy tokens checked against ``generate``'s (a
    10-token prompt through chunks of 4: two full ones and a remainder of 2 through one-token steps; batch 2, every
    row checked), the control on the Python kernel (``$MEDQUANT_NATIVE_OP=0``: the AOT programs through the
    Python custom op) and the decoder saved and loaded with another copy of the model. The controls that only
    change a setting while compiling (split activations, handles written into the code) are checked with a
    stand-in decoder below: each real compile costs minutes on a 2-core CI machine."""
    from medquant.kernels import get_cpu_compute_dtype, set_cpu_compute_dtype

    monkeypatch.setattr(ad, "RESULTS", tmp_path)
    before = get_cpu_compute_dtype()
    try:  # float32 compute: no blocked matmul, the prompt chunks run the weight-only kernel (AOT lanes, every M)
        assert ad.main(["--model", "llama_small", "--rounds", "1", "--prompt", "10", "--new", "4", "--chunk", "4",
                        "--batch", "2", "--python-op-control", "--save-load", "--out", "t",
                        "--compute-dtype", "float32"]) == 0
    finally:
        set_cpu_compute_dtype(before)
    result = json.loads((tmp_path / "t.json").read_text())
    row = result["rows"][0]
    assert result["compute_dtype"] == "float32" and result["blocked_matmul"] is False  # bfloat16 compute only
    assert result["batch"] == 2 and row["same_tokens"] and row["tokens"] == 10 and row["tokens_agreeing"] == 10
    assert row["python_op_control_same_tokens"]  # the control decodes the same tokens through the Python kernel
    assert row["loaded_same_tokens"] and row["load_s"] > 0 and row["save_s"] > 0  # saved, loaded, same tokens
    for name in ("aot", "aot_python_op", "aot_loaded", "compiled"):
        for metric in ("decode", "prefill"):
            assert len(row[f"{name}_{metric}_tok_s"]) == 1 and row[f"{name}_{metric}_tok_s"][0] > 0
    for metric in ("decode", "prefill"):
        for base in ("compiled", "aot_python_op", "aot_loaded"):
            expected = row[f"aot_{metric}_tok_s"][0] / row[f"{base}_{metric}_tok_s"][0]
            assert row[f"aot_vs_{base}"][metric] == pytest.approx(expected)
    md = (tmp_path / "t.md").read_text()
    assert "compile_decoder (AOTInductor)" in md and "batch 2" in md and "prompt chunk 4, 1 rounds" in md
    assert "saved and loaded (load_decoder)" in md and "its tokens equal: True" in md
    assert "Compute dtype float32; large-M calls on the blocked matmul: no" in md


def test_each_control_is_compiled_under_its_own_setting_and_the_settings_are_restored(tmp_path, monkeypatch):
    """``--python-op-control``, ``--split-control`` and ``--int-handle-control``: each control decoder is built
    with its setting in force (``$MEDQUANT_NATIVE_OP=0``; native4 activations "split"; the lanes-by-tensor binding
    replaced, so handles are written into the code) and the main decoder with none of them; every setting is back
    after the run; the record has each control's token check, rates and ratio. Stand-in decoders (the eager
    model) and a static-cache ``generate`` without compiling: the script's bookkeeping, not the programs."""
    import os

    from medquant.kernels import get_cpu_native4_activations
    from medquant.quant import aot, decode

    lanes = aot._lanes_by_tensor
    seen = []

    def fake(model, max_len, *, chunk=None, batch_size=1, **kw):
        seen.append({"native_op": os.environ.get("MEDQUANT_NATIVE_OP"),
                     "activations": get_cpu_native4_activations(), "lanes": aot._lanes_by_tensor is lanes})
        return _EagerDecoder(model, max_len, chunk)

    real_static = decode.static_decode_
    monkeypatch.setattr(aot, "compile_decoder", fake)
    monkeypatch.setattr(decode, "static_decode_", lambda m, **kw: real_static(m, compile=False))
    monkeypatch.setattr(ad, "RESULTS", tmp_path)
    monkeypatch.delenv("MEDQUANT_NATIVE_OP", raising=False)
    default = get_cpu_native4_activations()
    assert ad.main(["--model", "llama_small", "--rounds", "2", "--prompt", "6", "--new", "3", "--chunk", "1",
                    "--python-op-control", "--split-control", "--int-handle-control", "--out", "t"]) == 0
    assert seen == [{"native_op": None, "activations": default, "lanes": True},  # the decoder under test
                    {"native_op": "0", "activations": default, "lanes": True},  # Python custom op
                    {"native_op": None, "activations": "split", "lanes": True},  # split activations
                    {"native_op": None, "activations": default, "lanes": False}]  # handles written into the code
    assert "MEDQUANT_NATIVE_OP" not in os.environ and get_cpu_native4_activations() == default
    assert aot._lanes_by_tensor is lanes
    result = json.loads((tmp_path / "t.json").read_text())
    row = result["rows"][0]
    assert result["native4_activations"] == default
    assert row["python_op_control_same_tokens"] and row["split_control_same_tokens"]
    assert row["int_handle_control_same_tokens"] and row["same_tokens"]
    for metric in ("decode", "prefill"):
        for base in ("compiled", "aot_python_op", "aot_int_handle", "aot_split"):
            a, b = row[f"aot_{metric}_tok_s"], row[f"{base}_{metric}_tok_s"]
            assert len(a) == len(b) == 2 and min(a + b) > 0
            assert row[f"aot_vs_{base}"][metric] == pytest.approx((a[0] / b[0] + a[1] / b[1]) / 2)
    md = (tmp_path / "t.md").read_text()
    assert "split into two" in md and "handles written into the code" in md


def test_llamacpp_comparison_needs_smollm2_at_batch_1():
    with pytest.raises(SystemExit):
        ad.main(["--model", "llama_small", "--llamacpp"])
    with pytest.raises(SystemExit):
        ad.main(["--llamacpp", "--batch", "2"])


class _EagerDecoder:
    """A stand-in for ``compile_decoder``'s decoder (the compiled programs are tested in tests/quant): the eager
    model over the whole sequence, so that the benchmark's own bookkeeping is tested without compiling."""

    def __init__(self, model, max_len: int, chunk: int, cache_lengths=None, shift: int = 0) -> None:
        self.model, self.max_len, self.chunk, self.compile_s, self.seq = model, max_len, chunk, 0.0, None
        self.export_s, self.bound_layers = 0.0, 0
        self.cache_lengths = [max_len] if cache_lengths == () else cache_lengths
        self.shift = shift  # > 0: the greedy token moves by that many ids (a decoder that disagrees)

    def prefill(self, ids):
        self.seq = ids
        return self._last()

    def feed(self, ids):
        self.seq = torch.cat([self.seq, ids], dim=1)
        return self._last()

    def _last(self):
        with torch.no_grad():
            return self.model(input_ids=self.seq).logits[:, -1].roll(self.shift, dims=-1)

    def close(self) -> None:
        pass


def test_chunk_ab_records_each_chunk_per_prompt_length_and_the_tokens(tmp_path, monkeypatch):
    """``--chunk-ab 1,4``: one decoder per prompt-program length, all for the same ``max_len`` (the longest prompt
    plus the new tokens and one); per round each prefills every prompt length and decodes after the longest;
    ratios against the first chunk are medians of per-round ratios; the table and the token check."""
    from medquant.quant import aot

    built = []

    def fake(model, max_len, *, chunk=None, **kw):
        built.append(_EagerDecoder(model, max_len, chunk))
        return built[-1]

    monkeypatch.setattr(aot, "compile_decoder", fake)
    monkeypatch.setattr(ad, "RESULTS", tmp_path)
    assert ad.main(["--model", "llama_small", "--chunk-ab", "1,4,2+4", "--chunk-ab-prompts", "3,9", "--rounds", "2",
                    "--new", "3", "--out", "t"]) == 0
    assert [(d.max_len, d.chunk) for d in built] == [(13, 1), (13, 4), (13, (2, 4))]
    assert built[0].seq.shape == (1, 9 + 3)  # the last round: the longest prompt, then 3 fed tokens
    result = json.loads((tmp_path / "t_chunks.json").read_text())
    row = result["rows"][0]
    assert row["chunks"] == ["1", "4", "2+4"] and row["prompts"] == [3, 9] and row["max_len"] == 13
    assert row["same_tokens"] and len(row["chunk2+4_prefill_9_tok_s"]) == 2
    for metric in ("prefill_3", "prefill_9", "decode"):
        a, b = row[f"chunk1_{metric}_tok_s"], row[f"chunk4_{metric}_tok_s"]
        assert len(a) == len(b) == 2 and min(a + b) > 0
        assert row[f"chunk4_vs_chunk1_{metric}"] == pytest.approx((b[0] / a[0] + b[1] / a[1]) / 2)
    md = (tmp_path / "t_chunks.md").read_text()
    assert "| chunk | prefill 3 tokens | prefill 9 tokens | decode |" in md and "| 1 (first: the baseline) |" in md
    with pytest.raises(SystemExit, match="two or more"):
        ad.main(["--model", "llama_small", "--chunk-ab", "4", "--out", "t"])
    with pytest.raises(SystemExit, match="comma lists of integers"):
        ad.main(["--model", "llama_small", "--chunk-ab", "4,4+x", "--out", "t"])


@pytest.mark.parametrize("disagree", [False, True])
def test_cache_lengths_ab_records_three_decoders_and_their_tokens(tmp_path, monkeypatch, disagree):
    """``--cache-lengths-ab 300``: a 300-position cache with the default cache lengths, the control with the
    programs for 300 only (``cache_lengths=()``), and a cache as long as the sequence; prefill and decode per
    round, ratios of medians, and whether all three chose the same greedy tokens (a decoder that chooses others is
    reported as such)."""
    from medquant.quant import aot

    built = []

    def fake(model, max_len, *, chunk=None, cache_lengths=None, **kw):
        lengths = [256, max_len] if cache_lengths is None else cache_lengths
        built.append(_EagerDecoder(model, max_len, chunk, lengths, shift=int(disagree and max_len == 15)))
        return built[-1]

    monkeypatch.setattr(aot, "compile_decoder", fake)
    monkeypatch.setattr(ad, "RESULTS", tmp_path)
    assert ad.main(["--model", "llama_small", "--cache-lengths-ab", "300", "--rounds", "2", "--prompt", "10",
                    "--new", "4", "--chunk", "1", "--out", "t"]) == 0
    assert [(d.max_len, d.chunk, d.cache_lengths) for d in built] == [(300, 1, [256, 300]), (300, 1, [300]),
                                                                      (15, 1, [256, 15])]
    row = json.loads((tmp_path / "t_cache_lengths.json").read_text())["rows"][0]
    assert row["cache_lengths"] == [256, 300] and row["short_max_len"] == 15 and row["max_len"] == 300
    assert row["same_tokens"] is (not disagree)
    for name in ("long", "long_max_len_only", "short"):
        for metric in ("decode", "prefill"):
            assert len(row[f"{name}_{metric}_tok_s"]) == 2 and min(row[f"{name}_{metric}_tok_s"]) > 0
    long, short = row["long_decode_tok_s"], row["short_decode_tok_s"]
    assert row["long_vs_short_decode"] == pytest.approx((long[0] / short[0] + long[1] / short[1]) / 2)
    md = (tmp_path / "t_cache_lengths.md").read_text()
    assert "| max_len 300, programs for max_len only (control) | [300] |" in md
    assert f"Same greedy tokens from all three: {not disagree}." in md
