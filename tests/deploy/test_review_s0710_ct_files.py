"""format="compressed-tensors": the report's ``files`` are the files the export wrote (``ExportReport.files``: "the
files written"), the code files of a remote-code model included: they were written into the folder (transformers'
``custom_object_save``) but left out of the report."""
from __future__ import annotations

import warnings

import pytest

import medquant as mq
from medquant.deploy import export
from tests.cli.test_cli_remote_code import CODE_FILES, tinymed_folder

pytest.importorskip("compressed_tensors")


def test_the_report_lists_every_file_of_a_remote_code_export(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tinymed_folder(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True).eval()
    mq.quantize_(model, mq.QuantConfig(4, symmetric=True, group_size=32), skip=["@head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export(model, tmp_path / "ct", format="compressed-tensors")
    written = sorted(p.name for p in (tmp_path / "ct").iterdir())
    assert set(CODE_FILES) <= set(written)
    assert sorted(report.files) == written
    assert len(report.files) == len(set(report.files))
