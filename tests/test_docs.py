"""The manuals hold together: README.md is the front page and each step's manual lives in docs/, so a link
that points at a moved file or a renamed heading, or a script whose docstring points at no manual, leaves a
user at a dead end. Every relative link in README.md and docs/*.md must resolve (the file exists; a
`#anchor` is made by a heading of that file, the way GitHub makes it), README.md must link every manual,
and every script's module docstring (a shell script's header comment) must name a manual in docs/ that
exists. Text only: no script runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
SCRIPTS = sorted([*ROOT.glob('*.py'), *ROOT.glob('*.sh')])
LINK = re.compile(r'!?\[([^\]]*)\]\(([^)\s]+)\)')  # [text](target) and ![alt](target), text across lines
HEADING = re.compile(r'^#{1,6}\s+(.+?)\s*#*\s*$')
MANUAL = re.compile(r'docs/[\w.-]+\.md(?:#[\w-]+)?')


def prose(page: Path) -> list[tuple[int, str]]:
    """(line number, line) of the page outside fenced code blocks (```, indented under a list item too)."""
    lines, fenced = [], False
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith('```'):
            fenced = not fenced
        elif not fenced:
            lines.append((n, line))
    return lines


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: the heading's text (links as their text) lower-cased,
    every character but letters, digits, '_', '-' and spaces dropped, each space a '-'; a repeated one
    gets -1, -2, ..."""
    made: set[str] = set()
    for _, line in prose(page):
        if m := HEADING.match(line):
            slug = re.sub(r'[^\w\- ]', '', LINK.sub(r'\1', m[1]).lower()).replace(' ', '-')
            n, unique = 0, slug
            while unique in made:
                n += 1
                unique = f'{slug}-{n}'
            made.add(unique)
    return made


def broken(page: Path, target: str) -> str | None:
    """Why a relative link `target` on `page` leads nowhere, or None when it resolves."""
    path, _, anchor = target.partition('#')
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return f'{dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist'
    if anchor and (dest.suffix != '.md' or anchor not in anchors(dest)):
        return f'no heading of {dest.relative_to(ROOT)} makes the anchor #{anchor}'
    return None


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link on the page (not http(s):, mailto: and the like)."""
    lines = prose(page)
    text = '\n'.join(line for _, line in lines)
    found = []
    for m in LINK.finditer(text):
        target = m[2]
        if not re.match(r'[a-z][a-z0-9+.-]*:', target):
            found.append((lines[text.count('\n', 0, m.start(2))][0], target))
    return found


def header(script: Path) -> str:
    """A Python script's module docstring, or a shell script's opening comment lines."""
    if script.suffix == '.py':
        return ast.get_docstring(ast.parse(script.read_text())) or ''
    head = []
    for line in script.read_text().splitlines():
        if not line.startswith('#'):
            break
        head.append(line)
    return '\n'.join(head)


def test_every_relative_link_in_the_readme_and_the_manuals_resolves():
    assert len(PAGES) > 10, PAGES  # README.md and the manuals in docs/
    dead = [f'{page.relative_to(ROOT)}:{n}: ({target}) {why}'
            for page in PAGES for n, target in links(page) if (why := broken(page, target))]
    assert not dead, '\n'.join(dead)
    assert sum(len(links(page)) for page in PAGES) > 30  # the pages do link: the parser found them


def test_the_readme_links_every_manual():
    assert len(PAGES) > 10, PAGES
    linked = {(ROOT / target.partition('#')[0]).resolve() for _, target in links(ROOT / 'README.md')}
    missing = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not missing, f'README.md does not link docs/{missing}: a manual nobody can find'


def test_every_script_names_its_manual_in_docs():
    assert {s.name for s in SCRIPTS} >= {
        'laion_download_all.sh', 'laion_download_aesthetic.sh', 'filter_metadata.py', 'laion_cloudwriter.py',
        'curate_images.py', 'caption_images.py', 'precompute_latents.py', 'convert_coco.py'}
    for script in SCRIPTS:
        named = MANUAL.findall(header(script))
        assert named, f'{script.name}: its docstring (header comment) names no manual docs/<name>.md'
        # every docs/ file the script cites, in its docstring or a comment, is there
        for ref in set(named) | set(MANUAL.findall(script.read_text())):
            why = broken(ROOT / 'README.md', ref)
            assert why is None, f'{script.name} cites {ref}: {why}'
