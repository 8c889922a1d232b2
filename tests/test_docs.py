"""README.md stays short, and README.md and docs/*.md link only to files that exist and state what is true
(where and when it was measured), never the project's own history."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
NARRATION = re.compile(r"\b(issue|session|round)s? ?#?\d+", re.I)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    """The anchors of a page's headings (a `#` line inside a code block is no heading)."""
    found, code = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        code ^= line.startswith("```")
        if line.startswith("#") and not code:
            found.add(slug(line.lstrip("#")))
    return found


def test_the_readme_has_at_most_250_lines():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def test_every_relative_link_points_to_a_file_that_exists():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_the_readme_links_every_doc():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme] == []


CODE = [p for folder in ("slimtune", "scripts", "bench") for p in sorted((ROOT / folder).rglob("*"))
        if p.suffix in (".py", ".sh", ".md", ".yaml", ".js", ".html") and "results" not in p.parts]


def test_no_line_narrates_the_project_history():
    """README, docs and the code (slimtune/, scripts/, bench/ but its recorded results) speak of the project only."""
    found = [f"{page.relative_to(ROOT)}:{n}: {line.strip()}"
             for page in PAGES + CODE for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
             if NARRATION.search(line)]
    assert found == []


def test_the_slug_and_narration_patterns():
    assert slug("Defaults through the Python API (8B, H200, 2026-12-05)") == \
        "defaults-through-the-python-api-8b-h200-2026-12-05"
    assert NARRATION.search("measured in session 9") and NARRATION.search("Issue #19: long records")
    assert not NARRATION.search("its terminal or ssh session closed")
    assert "all-of-it-at-once-as-slimtune-train-runyaml-does-into-a-folder-of-its-own-it-writes-only-where-it-may" \
        not in anchors(ROOT / "docs" / "api.md")  # a comment in a code block
