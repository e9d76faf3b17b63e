"""``medquant info`` on a folder whose ``config.json`` is not a JSON object (broken JSON, a JSON list, not UTF-8):
one line naming the file and what is expected, as ``medquant verify`` says it, not Python's bare
``Expecting value: line 1 column 1`` / ``'list' object has no attribute 'get'`` that names no file."""
from __future__ import annotations

import json

import pytest

from medquant.cli import main


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"a": "\xff"}'], ids=["broken", "list", "latin1"])
def test_info_names_a_config_json_that_is_no_json_object(tmp_path, capsys, content):
    (tmp_path / "config.json").write_bytes(content)
    try:  # the reference: what the JSON parser makes of the file
        parsed = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        parsed = None
    assert not isinstance(parsed, dict)
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--debug" not in err  # the command's own message, not an unexpected exception
    assert str(tmp_path / "config.json") in err and "JSON object" in err
