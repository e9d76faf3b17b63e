"""mkdocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

* Every benchmark plot in ``benchmarks/results/*.png`` is published under ``results/plots/`` and shown on a
  generated page ``results/plots.md`` (one section per plot, linking the results page that discusses it), so a
  new plot appears on the site without a copy in ``docs/``.
* The other result files (``*.json``, ``*.md``) are published under ``results/files/``; a docs page linking one of
  them relative to the repository (``../../benchmarks/results/x.json``, which works when browsing the repository)
  gets the link rewritten to the published copy.
* Docstrings use Sphinx-style roles (``:func:`name```, ``:class:`...```); in the rendered HTML the role prefix is
  dropped so only the code-formatted name remains.
"""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

_ROOT = Path(__file__).resolve().parent
_RESULT_LINK = re.compile(r"\]\(((?:\.\./)+)benchmarks/results/([\w.\-]+)\)")
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc|const):(<code>)")


def _plots_page(pngs: list[Path], docs_dir: Path) -> str:
    lines = ["# Benchmark plots", "",
             ("Every plot the benchmarks wrote to `benchmarks/results/` (next to its JSON with the hardware, the "
              "versions and every number). The results page named under each plot explains the set-up, the "
              "controls and the caveats."), ""]
    pages = sorted((docs_dir / "results").glob("*.md"))
    for png in pngs:
        lines += [f"## {png.stem}", ""]
        refs = [p for p in pages if p.name != "plots.md" and png.stem in p.read_text(encoding="utf-8")]
        if refs:
            lines += ["Discussed in " + ", ".join(f"[{p.stem}]({p.name})" for p in refs) + ".", ""]
        json_file = png.with_suffix(".json")
        if json_file.exists():
            lines += [f"Data: `benchmarks/results/{json_file.name}`.", ""]
        lines += [f"![{png.stem}](plots/{png.name})", ""]
    return "\n".join(lines)


def _site_path(name: str) -> str:
    return f"results/plots/{name}" if name.endswith(".png") else f"results/files/{name}"


def on_files(files, config):
    results = _ROOT / "benchmarks" / "results"
    pngs = sorted(results.glob("*.png"))
    for f in sorted(results.glob("*")):
        if f.is_file() and f.suffix in (".png", ".json", ".md"):
            files.append(File.generated(config, _site_path(f.name), abs_src_path=str(f)))
    files.append(File.generated(config, "results/plots.md", content=_plots_page(pngs, Path(config["docs_dir"]))))
    return files


def rewrite_result_links(markdown: str, src_uri: str) -> str:
    """Links from the page ``src_uri`` (relative to docs/) to ``<repository>/benchmarks/results/NAME`` -> links
    to the published copy; other links are left alone."""
    depth = src_uri.count("/")

    def sub(m: re.Match) -> str:
        if m.group(1).count("../") != depth + 1 or not (_ROOT / "benchmarks" / "results" / m.group(2)).is_file():
            return m.group(0)
        return f"]({'../' * depth}{_site_path(m.group(2))})"

    return _RESULT_LINK.sub(sub, markdown)


def on_page_markdown(markdown, page, config, files):
    return rewrite_result_links(markdown, page.file.src_uri)


def on_page_content(html, page, config, files):
    return _ROLE.sub(r"\1", html)
