"""The manual's pages (docs/**/*.md): every ```python block runs, page by page, and prints what the page
says; every page is in the site's navigation and every picture it shows is there."""

import re
from pathlib import Path

import pytest

from test_readme import ROOT, markdown_examples

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
LEARN = sorted(p for p in (DOCS / "learn").glob("*.md") if p.name != "index.md")  # the lessons


def _name(path: Path) -> str:
    return path.relative_to(DOCS).as_posix()


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in p.read_text(encoding="utf-8")], ids=_name)
def test_page_examples(page):
    result = markdown_examples(page)
    assert result.failed == 0


@pytest.mark.parametrize("page", LEARN, ids=_name)
def test_every_learn_page_runs_examples(page):
    assert markdown_examples(page).attempted >= 3


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:", 1)[1]
    listed = set(re.findall(r"([\w/.-]+\.md)\s*$", nav, re.MULTILINE))
    assert {_name(p) for p in PAGES} == listed


def test_pictures_exist_and_stay_small():
    shown = {(page.parent / src).resolve()
             for page in PAGES for src in re.findall(r"!\[[^\]]*\]\(([^)\s]+\.png)", page.read_text(encoding="utf-8"))}
    assert shown and all(path.is_file() for path in shown)
    assert sum(path.stat().st_size for path in DOCS.rglob("*.png")) < 400 * 1024
