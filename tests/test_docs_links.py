"""Every relative link of the README and the docs leads somewhere: the file exists and,
for ``file.md#anchor`` or ``#anchor``, so does a heading with that anchor (GitHub's rule:
lower case, punctuation dropped, spaces to hyphens, ``-1``, ``-2``... for repeats)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: [text](target) and ![alt](target); the target ends at whitespace or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced and indented code blocks, without inline code."""
    lines, fenced, previous_blank = [], False, True
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        indented_code = (
            previous_blank and line.startswith("    ") and line.lstrip()[:1] not in "*-|"
        )
        previous_blank = not line.strip() or (previous_blank and indented_code)
        if fenced or indented_code:
            continue
        lines.append(INLINE_CODE.sub("", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    return [m.group(1) for line in _prose_lines(path.read_text(encoding="utf-8"))
            for m in LINK.finditer(line)]  # fmt: skip


def _broken(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:...
            continue
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target} (no heading #{anchor} in {destination.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path):
    assert not _broken(page), f"{page.relative_to(ROOT)}: broken links {_broken(page)}"


def test_the_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Known limits\n\n## Known limits\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page's title (v2)\n[a](other.md#known-limits) [b](other.md#known-limits-1)\n"
        "[c](missing.md) [d](other.md#nowhere) [e](#pages-title-v2) [f](https://x.org/y)\n"
        "`[g](in-code.md)`\n\n```\n[h](fenced.md)\n```\n"
    )
    assert _broken(page) == ["missing.md (no such file)",
                             "other.md#nowhere (no heading #nowhere in other.md)"]  # fmt: skip


def test_the_readme_is_a_front_page_with_the_two_set_up_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    assert "    pip install -e . && selmix demo\n" in readme
    assert '    pip install -e ".[dev]" && python -m pytest\n' in readme
