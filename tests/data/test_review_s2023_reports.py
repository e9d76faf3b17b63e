"""Review (s2023) of medquant.data.reports on the real IU reports (../shared/data)."""
from __future__ import annotations

import pytest

from medquant.data.reports import default_reports_path, load_iu_reports


@pytest.fixture(scope="module")
def every_report():
    path = default_reports_path()
    if not path.exists():
        pytest.skip(f"IU reports not found at {path}")
    return load_iu_reports(path)


def test_require_one_section_name_as_a_string(every_report):
    """require="findings" was iterated character by character: 'unknown section(s) ['f', 'i', 'n', ...]'."""
    want = [r.uid for r in every_report if r.split == "test" and r.findings]
    got = [r.uid for r in load_iu_reports(default_reports_path(), split="test", require="findings")]
    assert got == want and 0 < len(got) < len(every_report)
