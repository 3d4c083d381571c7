"""The README and the docs render and cite only what exists: tables have header rows, links resolve."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
README_MAX_LINES = 200  # a front page: what it is, install, usage, the demo, links

# A table's separator row (`| --- | :-: |`); GitHub renders it only under a header row.
SEPARATOR = re.compile(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A repository path quoted in code style, e.g. `benchmarks/results/spurious.md`.
QUOTED_PATH = re.compile(r"`((?:benchmarks/results|docs)/[\w./-]+)`")


def citing_pages() -> List[Path]:
    """The pages whose links must resolve: the README, the docs and the results index."""
    return [README, *sorted((ROOT / "docs").rglob("*.md")), RESULTS / "README.md"]


def markdown_files() -> List[Path]:
    docs = sorted((ROOT / "docs").rglob("*.md"))
    benchmarks = sorted((ROOT / "benchmarks").rglob("*.md"))
    return [README, *docs, *benchmarks]


def headerless_tables(text: str) -> List[int]:
    """The 1-based line numbers of separator rows with no table row above them."""
    lines = text.splitlines()
    return [
        i + 1
        for i, line in enumerate(lines)
        if SEPARATOR.fullmatch(line) and (i == 0 or not lines[i - 1].strip().startswith("|"))
    ]


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> List[str]:
    return [anchor(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")]


def citations(path: Path) -> Iterator[Tuple[str, Path, str]]:
    """Every local file a page cites, as (what the page says, the file, the anchor or '')."""
    text = path.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        file, _, fragment = target.partition("#")
        yield target, (path.parent / file).resolve(), fragment
    for quoted in QUOTED_PATH.findall(text):
        yield quoted, ROOT / quoted.rstrip("/"), ""


def test_headerless_tables_are_found():
    text = "| a | b |\n| --- | --- |\n| 1 | 2 |\n\n|---|---|\n| 3 | 4 |\n"
    assert headerless_tables(text) == [5]


def test_anchor_matches_githubs():
    assert anchor(" Why 64 swap images and a threshold of 1.1") == "why-64-swap-images-and-a-threshold-of-11"
    assert anchor("How well the maps do: attribution quality") == "how-well-the-maps-do-attribution-quality"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_has_a_header_row(path):
    assert headerless_tables(path.read_text()) == [], f"{path.relative_to(ROOT)}: tables without a header row"


@pytest.mark.parametrize("path", citing_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_file_exists(path):
    missing = [cited for cited, file, _ in citations(path) if not file.exists()]
    assert missing == [], f"{path.relative_to(ROOT)} cites files that do not exist"


@pytest.mark.parametrize("path", citing_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_section_exists(path):
    broken = [
        cited
        for cited, file, fragment in citations(path)
        if fragment and file.suffix == ".md" and file.exists() and fragment not in anchors(file)
    ]
    assert broken == [], f"{path.relative_to(ROOT)} links sections that do not exist"


def test_the_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def test_the_readme_links_the_evidence_and_every_docs_page():
    text = README.read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md")
    assert [page for page in pages if f"(docs/{page})" not in text] == []


def expand_braces(pattern: str) -> List[str]:
    """``a_{x,y}.png`` -> ``["a_x.png", "a_y.png"]``, every combination of every brace."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [part.split(",") if i % 2 else [part] for i, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def indexed(index: str) -> List[str]:
    """The files and folders (ending in ``/``) that the results index names in code style."""
    return [name for quoted in re.findall(r"`([^`\s]+)`", index) for name in expand_braces(quoted)]


def test_expand_braces():
    assert expand_braces("s_{a,b}_{x,y}.png") == ["s_a_x.png", "s_a_y.png", "s_b_x.png", "s_b_y.png"]
    assert expand_braces("plain.md") == ["plain.md"]


def test_the_results_index_names_every_results_file():
    names = indexed((RESULTS / "README.md").read_text())
    files = [path.relative_to(RESULTS).as_posix() for path in RESULTS.rglob("*") if path.is_file()]
    unlisted = [
        file
        for file in files
        if file != "README.md" and file not in names and not any(file.startswith(n) for n in names if n.endswith("/"))
    ]
    assert unlisted == [], "benchmarks/results/README.md should list each result file (or remove the superseded)"


def test_the_readmes_demo_output_is_the_recorded_one():
    """The README's `make demo` block is copied from the results file it links, number for number."""
    block = re.search(r"```\n(caap-lightning demo:.*?)```", README.read_text(), re.S)
    assert block, "README has no demo output block"
    assert block.group(1) in (RESULTS / "demo.md").read_text()
