#!/usr/bin/env python3
"""Checks every Markdown link of the repository's documentation.

A relative link must name a file or directory that exists inside the repository, and a
`#fragment` must name a heading of the file it points to (GitHub's anchors: lower case,
punctuation dropped, spaces as hyphens, `-1`, `-2`... for repeated headings). Links to
http(s) addresses are not fetched. Links inside code blocks and code spans are not links.
Exits 1 listing every broken link, 0 when there is none.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files():
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [ROOT / name for name in listed if (ROOT / name).is_file()]


def prose_lines(path):
    """The lines of a Markdown file outside fenced code blocks, with their numbers."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading):
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path, cache={}):
    if path not in cache:
        seen = {}
        found = set()
        for _, line in prose_lines(path):
            match = HEADING.match(line)
            if not match:
                continue
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        cache[path] = found
    return cache[path]


def broken_links(path):
    for number, line in prose_lines(path):
        line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{number}: ({target})"
            if ROOT != resolved and ROOT not in resolved.parents:
                yield f"{where} points outside the repository"
            elif not resolved.exists():
                yield f"{where} names no file"
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                yield f"{where} names no heading of {resolved.relative_to(ROOT)}"


def main():
    problems = [problem for path in markdown_files() for problem in broken_links(path)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} broken documentation links", file=sys.stderr)
        return 1
    print(f"documentation links: {len(markdown_files())} files, every link resolves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
