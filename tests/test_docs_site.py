"""The documentation site (mkdocs.yml) is complete: every page of its nav exists, every page under docs/ is in the
nav, every public package has an API page whose ``:::`` directives name importable objects, and every name of
``medquant.__all__`` appears in the API reference. (``mkdocs build --strict`` itself runs in ``.ci/run``.)"""
from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

import medquant

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
DIRECTIVE = re.compile(r"^::: *([\w.]+)", re.MULTILINE)
# pages the site's hook (mkdocs_hooks.py) generates at build time
GENERATED = {"results/plots.md"}
PUBLIC_PACKAGES = ["medquant", "medquant.quant", "medquant.kernels", "medquant.models", "medquant.io",
                   "medquant.calibrate", "medquant.deploy", "medquant.prune", "medquant.fairquant",
                   "medquant.distill", "medquant.qlora", "medquant.eval", "medquant.adaptive", "medquant.complexity",
                   "medquant.hf", "medquant.data", "medquant.pipeline", "medquant.training", "medquant.distributed",
                   "medquant.testing"]


def _config() -> dict:
    return yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))


def _nav_files(node) -> list[str]:
    if isinstance(node, str):
        return [node] if node.endswith(".md") else []
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    return []


def _api_pages() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((DOCS / "api").glob("*.md"))}


def _directive_targets(pages: dict[str, str]) -> list[str]:
    return [t for text in pages.values() for t in DIRECTIVE.findall(text)]


def _resolve(dotted: str):
    """The object a ``::: dotted.path`` directive renders (module, or attribute of the longest module prefix)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def _rendered_names(targets: list[str]) -> set[str]:
    """Public names the directives render: a module directive renders its ``__all__`` (mkdocstrings follows it;
    ``show_if_no_docstring`` is on, so undocumented names are listed too); an object directive renders itself."""
    out: set[str] = set()
    for target in targets:
        obj = _resolve(target)
        if hasattr(obj, "__path__") or type(obj).__name__ == "module":
            out.update(getattr(obj, "__all__", []))
        else:
            out.add(target.rsplit(".", 1)[-1])
    return out


def _missing_from_reference(names, pages: dict[str, str]) -> list[str]:
    rendered = _rendered_names(_directive_targets(pages))
    text = "\n".join(pages.values())
    return sorted(n for n in names if n not in rendered and f"`{n}`" not in text)


def test_nav_pages_exist_and_every_page_is_in_the_nav():
    nav = _nav_files(_config()["nav"])
    assert len(nav) == len(set(nav)), "a page appears twice in the nav"
    missing = [f for f in nav if f not in GENERATED and not (DOCS / f).is_file()]
    assert not missing, f"mkdocs.yml nav names pages that do not exist under docs/: {missing}"
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not on_disk - set(nav), f"pages under docs/ missing from the mkdocs.yml nav: {sorted(on_disk - set(nav))}"


def test_site_uses_material_mkdocstrings_and_the_hook():
    cfg = _config()
    assert cfg["theme"]["name"] == "material"
    plugins = {next(iter(p)) if isinstance(p, dict) else p: p for p in cfg["plugins"]}
    assert "mkdocstrings" in plugins
    options = plugins["mkdocstrings"]["mkdocstrings"]["handlers"]["python"]["options"]
    assert options["docstring_style"] == "google" and options["show_if_no_docstring"] is True
    for hook in cfg.get("hooks", []):
        assert (REPO / hook).is_file(), hook


def test_every_public_package_has_an_api_page_with_importable_directives():
    pages = _api_pages()
    targets = _directive_targets(pages)
    assert set(PUBLIC_PACKAGES) <= set(targets), f"no ::: directive for {sorted(set(PUBLIC_PACKAGES) - set(targets))}"
    for target in targets:
        _resolve(target)  # raises on a typo, before the (slow) site build
    nav = set(_nav_files(_config()["nav"]))
    assert {f"api/{name}" for name in pages} <= nav


def test_every_public_name_is_in_the_reference():
    missing = _missing_from_reference(medquant.__all__, _api_pages())
    assert not missing, f"public names of medquant.__all__ absent from docs/api: {missing}"
    for package in PUBLIC_PACKAGES[1:]:
        names = getattr(importlib.import_module(package), "__all__", [])
        assert not _missing_from_reference(names, _api_pages()), package


def test_the_check_catches_a_missing_name():
    # control: a name no page renders or mentions is reported; the same name mentioned in a page is not
    pages = {"x.md": "::: medquant.distill\n"}
    assert _missing_from_reference(["Distiller", "not_a_name"], pages) == ["not_a_name"]
    pages["y.md"] = "| `not_a_name` | ... |"
    assert _missing_from_reference(["Distiller", "not_a_name"], pages) == []
    with pytest.raises((ModuleNotFoundError, AttributeError)):
        _resolve("medquant.distill.NoSuchThing")


def test_plots_page_shows_every_benchmark_plot(tmp_path):
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", REPO / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.md").write_text("see `benchmarks/results/one.png`", encoding="utf-8")
    page = hooks._plots_page([Path("/r/one.png"), Path("/r/two.png")], tmp_path)
    assert "![one](plots/one.png)" in page and "![two](plots/two.png)" in page
    assert "[a](a.md)" in page.split("## two")[0] and "[a](a.md)" not in page.split("## two")[1]
    assert hooks._ROLE.sub(r"\1", "see :func:<code>f</code> and :class:<code>C</code>") == \
        "see <code>f</code> and <code>C</code>"


def test_links_to_benchmark_results_point_at_the_published_copy():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", REPO / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    name = next(p.name for p in sorted((REPO / "benchmarks" / "results").glob("*.json")))
    text = f"[data](../../benchmarks/results/{name}) and [other](../benchmarks/results/{name})"
    out = hooks.rewrite_result_links(text, "guides/page.md")
    # the repository-relative link from docs/guides/ is rewritten; a link that does not reach the repository root
    # (one ../ too few) and a missing file are left alone
    assert out == f"[data](../results/files/{name}) and [other](../benchmarks/results/{name})"
    missing = "[x](../../benchmarks/results/no_such_file.json)"
    assert hooks.rewrite_result_links(missing, "guides/page.md") == missing
