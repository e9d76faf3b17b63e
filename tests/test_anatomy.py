"""The anatomy table of docs/architecture.md ("Anatomy of a capability") matches the source tree.

The table has one row per capability: the package (or top-level module) of ``medquant/``, then the files that hold
its configuration, its modules / layers and its workflow (relative to the capability's folder; for a one-module
capability, to ``medquant/``), its command-line adapters (relative to ``medquant/cli/``) and its tests (relative to
the repository). This test reads the backticked ``*.py`` and ``tests/...`` names of each cell and checks them
against the file system, both ways, so the table cannot silently go out of date:

* every package and top-level module of ``medquant/`` (the CLI itself excepted: it is the adapter column) has a row,
  and no row names a capability that does not exist;
* every file a row names exists, and every module of a capability's folder is named in its row;
* every command-line module that adds a verb is some capability's adapter;
* ``tests/<package>/`` exists and is named in the row of each package (except where the table says why not).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "medquant"
DOC = REPO / "docs" / "architecture.md"
HEADING = "## Anatomy of a capability"
COLUMNS = ("capability", "config", "module", "workflow", "cli", "tests")
PY_NAME = re.compile(r"`([\w/]+\.py)`")
TEST_PATH = re.compile(r"`(tests/[\w/.]*)`")
CAPABILITY = re.compile(r"`medquant\.(\w+)`")
# the command-line modules that add no verb (the entry point, argument types)
CLI_SUPPORT = {"__init__.py", "__main__.py", "args.py"}
# packages whose row need not name tests/<package>/, each with the reason the table gives (their row must still
# name tests that exist)
NO_TEST_FOLDER: dict[str, str] = {}  # package -> why it has no tests/<package>/ (none today)


def anatomy_rows(text: str) -> dict[str, dict[str, str]]:
    """``capability -> {column: cell text}`` of the anatomy table in ``text``."""
    start = text.index(HEADING)
    end = text.find("\n## ", start + len(HEADING))
    section = text[start:end if end != -1 else None]
    rows: dict[str, dict[str, str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `medquant."):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS), f"anatomy row with {len(cells)} cells instead of {len(COLUMNS)}: {line}"
        name = CAPABILITY.match(cells[0])
        assert name, f"the first cell must name `medquant.<capability>`: {line}"
        assert name.group(1) not in rows, f"two rows for medquant.{name.group(1)}"
        rows[name.group(1)] = dict(zip(COLUMNS, cells))
    return rows


def source_files(cell: str) -> list[str]:
    return PY_NAME.findall(cell)


def capabilities() -> dict[str, Path]:
    """``name -> folder or module`` of every package and top-level module of medquant (the CLI excepted)."""
    found = {p.name: p for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    found.update({p.stem: p for p in SRC.glob("*.py") if p.name != "__init__.py"})
    found.pop("cli")
    return found


def _row(rows: dict[str, dict[str, str]], name: str) -> dict[str, str]:
    assert name in rows, f"medquant.{name} has no row in the anatomy table of {DOC.name}"
    return rows[name]


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, str]]:
    return anatomy_rows(DOC.read_text(encoding="utf-8"))


def test_every_capability_has_a_row_and_every_row_a_capability(rows):
    have = capabilities()
    assert sorted(set(have) - set(rows)) == [], f"capabilities missing from the anatomy table in {DOC.name}"
    assert sorted(set(rows) - set(have)) == [], f"anatomy rows for capabilities that do not exist in {SRC}"


def test_named_files_exist_and_name_every_module(rows):
    for name, path in capabilities().items():
        row = _row(rows, name)
        named = [f for col in ("config", "module", "workflow") for f in source_files(row[col])]
        base = path if path.is_dir() else SRC
        missing = sorted({f for f in named if not (base / f).is_file()})
        assert not missing, f"medquant.{name}: the anatomy table names files that do not exist: {missing}"
        if path.is_dir():
            modules = {p.name for p in path.glob("*.py")} - {"__init__.py"}
            unnamed = sorted(modules - set(named))
            assert not unnamed, (f"medquant.{name}: modules not placed in the anatomy table (config / module / "
                                 f"workflow): {unnamed}")
        else:
            assert path.name in named, f"medquant.{name}: its module {path.name} is not named in its row"


def test_cli_adapters_exist_and_every_verb_module_is_an_adapter(rows):
    adapters = {f for row in rows.values() for f in source_files(row["cli"])}
    missing = sorted(f for f in adapters if not (SRC / "cli" / f).is_file())
    assert not missing, f"the anatomy table names CLI adapters that do not exist in medquant/cli/: {missing}"
    verbs = {p.name for p in (SRC / "cli").glob("*.py")} - CLI_SUPPORT
    orphans = sorted(verbs - adapters)
    assert not orphans, f"CLI modules that are no capability's adapter in the anatomy table: {orphans}"


def test_tests_mirror_the_packages(rows):
    for name, path in capabilities().items():
        listed = TEST_PATH.findall(_row(rows, name)["tests"])
        missing = sorted(t for t in listed if not (REPO / t).exists())
        assert not missing, f"medquant.{name}: the anatomy table names tests that do not exist: {missing}"
        if not path.is_dir():
            continue
        folder = REPO / "tests" / name
        if name in NO_TEST_FOLDER:
            assert listed, f"medquant.{name}: no tests named ({NO_TEST_FOLDER[name]})"
            continue
        assert folder.is_dir(), f"medquant.{name} has no tests/{name}/"
        assert f"tests/{name}/" in listed, f"medquant.{name}: its row does not name tests/{name}/"


def test_the_parser_sees_what_is_wrong():
    # control: a table missing a module, naming a missing file, with a wrong cell count
    good = "| `medquant.x` (1) | - | `a.py` | `b.py` (`run`) | `c.py` | `tests/x/` |"
    text = f"{HEADING}\n\n| h | h | h | h | h | h |\n|---|---|---|---|---|---|\n{good}\n\n## Next\n| `medquant.y` |"
    rows = anatomy_rows(text)
    assert list(rows) == ["x"]
    assert source_files(rows["x"]["module"]) == ["a.py"] and source_files(rows["x"]["workflow"]) == ["b.py"]
    assert TEST_PATH.findall(rows["x"]["tests"]) == ["tests/x/"]
    with pytest.raises(AssertionError, match="cells"):
        anatomy_rows(text.replace(good, good + " extra |"))
