"""Declared twins: machinery that standalone scripts must each carry (they share no library code) is
written once and copied verbatim between marker comments, so that a fix lands in every copy at once:

    # >>> twin: <name> (copied verbatim in <scripts>; tests/test_twins.py checks the copies)
    ...
    # <<< twin: <name>

This test fails when the copies of a twin differ, when a twin stands in one script only, or when its
markers do not pair up. Edit one copy, then paste it over the others.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPEN = re.compile(r'^# >>> twin: ([\w-]+)\b.*$')
CLOSE = re.compile(r'^# <<< twin: ([\w-]+)\s*$')


def twins() -> dict[str, dict[str, str]]:
    """{twin name: {script: the text between its markers}} over the top-level scripts."""
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for script in sorted(ROOT.glob('*.py')):
        name, body = None, []
        for n, line in enumerate(script.read_text().splitlines(), 1):
            if m := OPEN.match(line):
                assert name is None, f'{script.name}:{n}: twin {m[1]} opens inside twin {name}'
                assert m[1] not in found or script.name not in found[m[1]], \
                    f'{script.name}:{n}: twin {m[1]} stands twice in one script'
                name, body = m[1], [line]
            elif m := CLOSE.match(line):
                assert m[1] == name, f'{script.name}:{n}: closes twin {m[1]}, but {name} is open'
                found[name][script.name] = '\n'.join(body + [line])
                name = None
            elif name is not None:
                body.append(line)
        assert name is None, f'{script.name}: twin {name} is never closed'
    return found


def test_every_twin_has_identical_copies():
    found = twins()
    # the machinery every step carries: a lost marker would leave a copy free to drift unseen
    assert {'decode', 'address', 'paths', 'places', 'put-text', 'parts', 'preview-font',
            'stored-files', 'named', 'index-digest', 'index-text', 'shared-lists',
            'streaming-dataset', 'read-json',
            'merge-parts'} <= set(found), \
        sorted(found)
    copies = {n: sorted(c) for n, c in found.items()}
    assert len(found['decode']) == len(found['address']) == len(found['preview-font']) == 4 \
        and len(found['parts']) == len(found['stored-files']) == len(found['named']) == 3, copies
    for name, copies in found.items():
        assert len(copies) >= 2, f'twin {name} stands only in {list(copies)}: a twin has two copies or more'
        (first, text), *others = copies.items()
        for script, other in others:
            assert other == text, (f'twin {name}: {script} differs from {first}; edit one copy and paste '
                                   'it over the others')


def test_previews_draw_letters_beyond_ascii():
    """Every preview draws with the preview-font twin's font, which has the letters of captions beyond
    ASCII; Pillow's own font draws each of them as the box it draws for a letter it lacks."""
    from PIL import ImageFont
    from testbed.scripts import load_script

    def boxed(font) -> list[str]:
        box = bytes(font.getmask('\U0010fffd'))  # a code point no font has: its box
        return [c for c in 'üßéñçøЖλשع' if bytes(font.getmask(c)) == box]

    assert boxed(load_script('curate_images.py').preview_font()) == []
    assert boxed(ImageFont.load_default()) == list('üßéñçøЖλשع')


def test_a_preview_opens_its_dataset_though_another_process_took_the_same_shared_memory_name(tmp_path):
    """streaming 0.13 looks for a free shared-memory name, then creates it (mosaicml/streaming#884): another
    process on the machine that creates that name in between (here, this test does, at that very moment)
    must not fail a preview at the end of a finished run. The twin opens the dataset again."""
    from multiprocessing.shared_memory import SharedMemory

    from streaming import MDSWriter
    from streaming.base.shared import prefix
    from testbed.scripts import load_script

    with MDSWriter(out=str(tmp_path), columns={'x': 'int'}) as w:
        w.write({'x': 7})
    create, raced = prefix.SharedMemory, []

    def other_process_first(name=None, create_it=None, size=0, *args, **kwargs):
        if create_it is True and not raced:  # the other process creates the name this one found free
            raced.append(SharedMemory(name, create=True, size=size))
        return create(name, create_it, size, *args, **kwargs)

    prefix.SharedMemory = other_process_first
    try:
        ds = load_script('curate_images.py').streaming_dataset(local=str(tmp_path))
        assert raced and ds.num_samples == 1 and ds[0]['x'] == 7
    finally:
        prefix.SharedMemory = create
        for shm in raced:
            shm.close()
            shm.unlink()
