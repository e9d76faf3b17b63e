"""The documentation's links resolve: relative Markdown links (file and #anchor) in README.md and docs/, and every
``docs/<page>.md`` path named in the code, the tests and the benchmarks."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOC_PATH = re.compile(r"\bdocs/[\w./-]+\.md")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, spaces to dashes, -N for
    repeats)."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_markdown_links_resolve():
    bad = []
    for md in _markdown_files():
        text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md.resolve()
            if not dest.exists():
                bad.append(f"{md.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{md.relative_to(REPO)}: {target} (no such heading)")
    assert not bad, "broken links:\n  " + "\n  ".join(bad)


def test_docs_pages_named_in_code_exist():
    bad = []
    for top in ("medquant", "tests", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for ref in DOC_PATH.findall(line):
                    if not (REPO / ref).exists():
                        bad.append(f"{path.relative_to(REPO)}:{i}: {ref}")
    assert not bad, "docs pages that do not exist:\n  " + "\n  ".join(bad)


def test_anchor_rule():
    assert "packed-layout-format-version-1" in {
        re.sub(r"[^\w\- ]", "", "Packed layout (format version 1)".lower()).replace(" ", "-")}
