"""mkdocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

* Every benchmark plot in ``benchmarks/results/*.png`` is published under ``results/plots/`` and shown on a
  generated page ``results/plots.md`` (one section per plot, linking the results page that discusses it), so a
  new plot appears on the site without a copy in ``docs/``.
* Docstrings use Sphinx-style roles (``:func:`name```, ``:class:`...```); in the rendered HTML the role prefix is
  dropped so only the code-formatted name remains.
"""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

_ROOT = Path(__file__).resolve().parent
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


def on_files(files, config):
    pngs = sorted((_ROOT / "benchmarks" / "results").glob("*.png"))
    for png in pngs:
        files.append(File.generated(config, f"results/plots/{png.name}", abs_src_path=str(png)))
    files.append(File.generated(config, "results/plots.md", content=_plots_page(pngs, Path(config["docs_dir"]))))
    return files


def on_page_content(html, page, config, files):
    return _ROLE.sub(r"\1", html)
