"""Calibration text files saved with a UTF-8 byte order mark (Windows editors write one) are read without it: the
mark is not text, and U+FEFF is not whitespace, so ``str.strip()`` kept it at the start of the first paragraph, where
it was tokenized and calibrated on. Reference: the same text saved without the mark."""
from __future__ import annotations

import pytest

from medquant.cli.args import utf8_text

TEXT = "Heart size normal.\n\nNo focal consolidation.\n"


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path):
    marked, plain = tmp_path / "marked.txt", tmp_path / "plain.txt"
    marked.write_text(TEXT, encoding="utf-8-sig")
    plain.write_text(TEXT, encoding="utf-8")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    assert utf8_text(str(marked), "--calib") == utf8_text(str(plain), "--calib") == TEXT


def test_text_that_is_not_utf8_is_still_refused_naming_the_option(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Cœur normal".encode("latin-1", errors="replace") + b"\xe9")
    with pytest.raises(SystemExit, match="--calib-text: .*not UTF-8"):
        utf8_text(str(bad), "--calib-text")
