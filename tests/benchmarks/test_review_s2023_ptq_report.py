"""``benchmarks.ptq_methods --part report`` on a language-model part file shaped like ``run_lm``'s: each row's
calibration column says what the method was calibrated on, and the time column of an AWQ row counts its search."""
import argparse
import json

from benchmarks import ptq_methods


def _q(seconds, **extra):
    return {"seconds": seconds, "cpu_seconds": seconds, "torch_threads": 2, "rss_before_mb": 1.0,
            "peak_rss_mb": 2.0, "peak_above_start_mb": 1.0, "loadavg_1min_start_end": [0.0, 0.0], **extra}


def _lm_file(seqs: int, seq_len: int, awq_seqs: int, awq_search_s: float) -> dict:
    """What ``run_lm`` writes: AWQ rows carry ``awq_search_seconds`` and ``seconds_with_awq_search``."""
    rows = {"RTN": {"ppl": 20.0, "quantize": _q(1.0), "eval": _q(1.0)},
            "RTN+RS": {"ppl": 18.0, "quantize": _q(50.0), "eval": _q(1.0)},
            "AWQ": {"ppl": 16.0, "quantize": _q(1.0, seconds_with_awq_search=1.0 + awq_search_s),
                    "eval": _q(1.0), "awq_search_seconds": awq_search_s},
            "GPTQ": {"ppl": 12.0, "quantize": _q(300.0, calibration_tokens=seqs * seq_len,
                                                 calibration_sequences=seqs, calibration_ran_out=False),
                     "eval": _q(1.0)}}
    return {"part": "lm", "date": "2026-01-01T00:00:00+00:00",
            "calibration": {"sequences": seqs, "requested_sequences": seqs, "seq_len": seq_len,
                            "tokens": seqs * seq_len, "ran_out": False},
            "test": {"reports": 64, "max_tokens": 256, "batch": 8},
            "awq": {"calibration_sequences": awq_seqs, "grid": 10, "max_rows": 2048},
            "float": {"ppl": 10.0, "eval": _q(1.0)}, "configs": {"W4 g128 sym": rows}, "missing": [],
            "finished": "2026-01-01T00:01:00+00:00"}


def _report(tmp_path, monkeypatch, lm: dict) -> tuple[dict, str]:
    monkeypatch.setattr(ptq_methods, "RESULTS", tmp_path)
    (tmp_path / "ptq_methods_lm.json").write_text(json.dumps(lm))
    out = ptq_methods.report(argparse.Namespace(quick=False))
    return out, (tmp_path / "ptq_methods.md").read_text()


def _md_row(md: str, method: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| W4 g128 sym | {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_calibration_column_is_what_each_method_used(tmp_path, monkeypatch):
    lm = _lm_file(128, 512, awq_seqs=4, awq_search_s=41.0)
    out, md = _report(tmp_path, monkeypatch, lm)
    rows = out["lm"]["configs"]["W4 g128 sym"]
    # AWQ searched its scales on the file's awq.calibration_sequences, not on GPTQ's 128 sequences
    assert rows["AWQ"]["calibration"] == f"{lm['awq']['calibration_sequences']} x 512"
    assert _md_row(md, "AWQ")[2] == "4 x 512"
    # RTN+RS is round-to-nearest with searched ranges: no calibration data at all (like RTN)
    assert rows["RTN+RS"].get("calibration") is None
    assert _md_row(md, "RTN+RS")[2] == "-"
    assert rows["GPTQ"]["calibration"] == "128 x 512"


def test_awq_time_column_includes_its_search(tmp_path, monkeypatch):
    lm = _lm_file(128, 512, awq_seqs=4, awq_search_s=41.0)
    _, md = _report(tmp_path, monkeypatch, lm)
    awq = lm["configs"]["W4 g128 sym"]["AWQ"]
    # GPTQ's time includes its calibration work; AWQ's must include its search too (41 s + 1 s of rounding)
    assert _md_row(md, "AWQ")[6] == f"{awq['quantize']['seconds_with_awq_search']:.0f}"
    assert _md_row(md, "GPTQ")[6] == "300"


def test_time_target_needs_128_x_512_tokens(tmp_path, monkeypatch):
    out, _ = _report(tmp_path, monkeypatch, _lm_file(128, 256, awq_seqs=4, awq_search_s=41.0))
    target = out["targets"]["LM: GPTQ of SmolLM2 with 128 x 512 tokens in < 10 min"]
    assert target["met"] == "not measured (fewer tokens)"  # 128 x 256 is half the target's tokens
    out, _ = _report(tmp_path, monkeypatch, _lm_file(128, 512, awq_seqs=4, awq_search_s=41.0))
    assert out["targets"]["LM: GPTQ of SmolLM2 with 128 x 512 tokens in < 10 min"]["met"] is True
