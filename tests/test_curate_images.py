"""curate_images.py as a user runs it: cloudwriter-shaped MDS buckets in, curated MDS buckets out.

Models are a tiny CLIPModel and SiglipModel of the real classes with the real CLIP tokenizer
(tests/testbed/curate.py), loaded with from_pretrained; heads are state_dicts in the key layout of
LAION's improved aesthetic predictor. The output is read back with StreamingDataset and every score
is checked against the model and head applied to that image alone; the planted duplicates
(re-encoded, resized into another bucket, cropped, same bytes) must be found whatever the number of
ranks, and a run killed with -9 in each pass must resume to the same output.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from testbed.curate import (
    LAION_HEADS,
    UNDECODABLE,
    build_clip,
    build_siglip,
    plain_corpus,
    planted_corpus,
    write_aesthetic_head,
    write_linear_head,
)
from testbed.mds_input import COLUMNS, make_row, write_mds_input
from testbed.readback import read_mds, read_streams
from testbed.real import real_items
from testbed.scripts import c_stderr, load_script, one_torch_thread, run_main

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
# The tiny random CLIP maps every photo-like picture close together: the planted copies sit above
# 0.9998 and distinct pictures below 0.9993 (measured on this corpus), so the test threshold lies between.
THRESHOLD = 0.9996
CAPTION = 'caption'


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope='module')
def bed(tmp_path_factory) -> dict:
    """Models, heads, and the planted corpus as buckets '0-64' and '64-128' of several shards each."""
    t = tmp_path_factory.mktemp('curate')
    clip, siglip = build_clip(t / 'clip'), build_siglip(t / 'siglip')
    items, groups = planted_corpus()
    rows = [make_row(n, data, name) for n, (name, data) in enumerate(items)]
    buckets = write_mds_input(str(t / 'local'), rows, size_limit=1 << 12)
    return {'t': t, 'clip': clip, 'siglip': siglip, 'local': t / 'local', 'groups': groups,
            'names': {r['key']: r['url'].rsplit('/', 1)[1] for r in rows}, 'buckets': buckets,
            'aesthetic': write_aesthetic_head(t / 'aesthetic.pth', 16),
            'linear': write_linear_head(t / 'lin.pth', 16),
            'sig_head': write_aesthetic_head(t / 'sig.pth', 32, width=8)}


@contextlib.contextmanager
def quiet_main():
    """A script's main() in this process: its output swallowed, the signal handlers it installs undone."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def in_process(*args) -> tuple[int, str]:
    code, _, err = run_main('curate_images.py', *args)
    return code, err


def flags(bed: dict, out: Path, *more) -> list:
    return ['--local', bed['local'], '--bucket', 'all', '--remote_upload', out, '--model_name', bed['clip'],
            '--heads', f'aesthetic={bed["aesthetic"]}', f'linear={bed["linear"]}', '--caption_keys', CAPTION,
            '--dup_threshold', THRESHOLD, '--part_size', 3, '--batch-size', 4, '--num_workers', 0,
            '--dedup_parts', 3, '--clusters', 2, '--summary', out / 's.json', *more]


def read_all(out: Path) -> dict[str, list[dict]]:
    """{bucket: its rows read back} of every bucket with an index.json (a bucket left without rows has
    none: StreamingDataset cannot open a stream without samples)."""
    return {d.name: read_mds(str(d)) for d in sorted(out.iterdir()) if (d / 'index.json').exists()}


@pytest.fixture(scope='module')
def clip_run(bed) -> Path:
    out = bed['t'] / 'clip-out'
    code, err = in_process(*flags(bed, out, '--preview', 2))
    assert code == 0, err[-3000:]
    return out


def reference(model_dir: Path, samples: list[dict], captions: bool = True):
    """Each image alone: the processor, get_image_features, L2-normalised; each caption's text features."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
    script = load_script('curate_images.py')
    model = AutoModel.from_pretrained(model_dir).eval()
    proc, tok = AutoImageProcessor.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    img, txt = [], []
    with torch.no_grad():
        for s in samples:
            px = proc(images=script.decode(s['jpg']), return_tensors='pt')['pixel_values']
            img.append(torch.nn.functional.normalize(model.get_image_features(pixel_values=px), dim=-1)[0])
            if captions:
                t = tok([s[CAPTION]], padding='max_length', truncation=True,
                        max_length=model.config.text_config.max_position_embeddings, return_tensors='pt')
                txt.append(torch.nn.functional.normalize(model.get_text_features(**t), dim=-1)[0])
    return torch.stack(img), torch.stack(txt) if captions else None


def laion_mlp(path: Path, sizes: list[int], relu: bool = False) -> torch.nn.Module:
    """improved-aesthetic-predictor's MLP.layers as its SOURCE note (testbed/laion_heads/SOURCE) describes
    it: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear; with `relu` a
    ReLU after each Linear but the last (before its Dropout). Loaded strictly: the file's layer indices
    must be this module's."""
    nn, layers = torch.nn, []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        layers += [nn.ReLU()] if relu and i < len(sizes) - 2 else []
        layers += [nn.Dropout(0.2 if i < 2 else 0.1)] if i < len(sizes) - 3 else []
    mlp = nn.Sequential(*layers)
    state = torch.load(path, map_location='cpu')  # LAION saved its tensors on a GPU
    mlp.load_state_dict({k.removeprefix('layers.'): v for k, v in state.items()})
    return mlp.eval()


def test_scores_and_similarities_equal_the_model_on_each_image_alone(bed, clip_run):
    rows = [r for rs in read_all(clip_run).values() for r in rs]
    img, txt = reference(bed['clip'], rows)
    with torch.no_grad():
        aesthetic = laion_mlp(bed['aesthetic'], [16, 16, 2, 1, 1, 1])(img)[:, 0]
        lin = torch.nn.Linear(16, 1)
        lin.load_state_dict(torch.load(bed['linear']))
        linear = lin(img)[:, 0]
    got = {c: np.array([r[c] for r in rows]) for c in ('aesthetic', 'linear', 'clip_caption')}
    np.testing.assert_allclose(got['aesthetic'], aesthetic.numpy(), atol=1e-5)
    np.testing.assert_allclose(got['linear'], linear.numpy(), atol=1e-5)
    np.testing.assert_allclose(got['clip_caption'], (img * txt).sum(-1).numpy(), atol=1e-5)
    assert len(rows) == sum(len(v) for v in bed['buckets'].values()) - len(UNDECODABLE)  # no image lost
    summary = json.loads((clip_run / 's.json').read_text())
    parts = [json.loads(Path(m).read_text()) for m in markers(clip_run, '*/*/_done')]
    named = sorted(bed['names'][k['key']] for m in parts for k in m['skipped'])  # each in its part's marker
    assert named == sorted(UNDECODABLE) and summary['skipped'] == len(UNDECODABLE)
    first = [k for f in summary['skipped_names']['first'].values() for k in f]  # the first per reason
    assert sorted(bed['names'][k['key']] for k in first) == named
    assert sum(summary['skipped_names']['by_reason'].values()) == len(UNDECODABLE)


def groups_of(out: Path, names: dict[str, str]) -> tuple[list[set[str]], list[str]]:
    rows = [r for rs in read_all(out).values() for r in rs]
    groups: dict[int, set] = {}
    for r in rows:
        if r['dup_group'] >= 0:
            groups.setdefault(int(r['dup_group']), set()).add(names[r['key']])
    kept = sorted(names[r['key']] for r in rows if r['dup_group'] >= 0 and r['dup_keep'] == 1)
    return sorted(groups.values(), key=sorted), kept


def test_planted_duplicates_are_found_across_buckets_and_one_kept(bed, clip_run):
    groups, kept = groups_of(clip_run, bed['names'])
    # a rank's write pass reads the groups of its own parts: a file per part, each image in one of them
    work = clip_run / '_curate'
    files = sorted((work / 'dedup' / 'groups').glob('*/*.npz'))
    assert [f.relative_to(work / 'dedup' / 'groups').with_suffix('') for f in files] == \
        [d.relative_to(work / 'embed') for d in sorted((work / 'embed').glob('*/*'))]
    gids = np.concatenate([np.load(f)['gid'] for f in files])
    assert len(gids) == len(set(gids.tolist())) == 8  # the planted groups' members
    assert groups == sorted(bed['groups'], key=sorted)  # every planted group, no distinct image grouped
    # one per group: the largest image (b beats its 53x48 copy in the other bucket), then the lowest key
    assert kept == ['a', 'b', 'c', 'd']
    summary = json.loads((clip_run / 's.json').read_text())
    assert summary['in_groups'] == 8 and summary['kept_of_groups'] == 4
    record = json.loads((clip_run / '64-128' / 'curation.json').read_text())
    assert record['dedup']['dup_threshold'] == THRESHOLD and [s['column'] for s in record['scores']] == \
        ['aesthetic', 'linear', 'clip_caption']
    from PIL import Image
    with Image.open(summary['preview']['path']) as png:
        assert png.format == 'PNG' and png.height > 4 * 128
    shown = [members for title, members in summary['preview']['rows'] if title.startswith('duplicate group')]
    assert len(shown) == 2 and all(len(m) == 2 for m in shown)  # --preview 2: two planted pairs
    # the highest and lowest scored: every embedded image's score (bucket offsets: 0-64 holds one image)
    offsets = {'0-64': 0, '64-128': 1, '256-512': 1 + len(bed['buckets']['64-128'])}
    scored = [(float(score), int(i) + offsets[f.parent.parent.name]) for f in work.glob('embed/*/*/rows.npz')
              for z in [np.load(f)] for i, score in zip(z['id'], z['score:aesthetic'])]
    rows = dict(summary['preview']['rows'])
    assert rows['highest aesthetic'] == [g for _, g in sorted(scored, key=lambda x: (-x[0], x[1]))[:8]]
    assert rows['lowest aesthetic'] == [g for _, g in sorted(scored, key=lambda x: (x[0], -x[1]))[:8]]


def test_groups_are_the_connected_components_of_the_pairs():
    """The groups (connect(): scipy's connected components) on a random graph with ties of area and
    key, against a breadth-first search and the keep rule written out: largest area, then lowest key,
    then lowest run id."""
    script = load_script('curate_images.py')
    rng = np.random.default_rng(0)
    gid = np.sort(rng.choice(10**6, 3000, replace=False))
    edges = np.unique(np.sort(rng.choice(gid, (1200, 2)), axis=1), axis=0)
    edges = edges[edges[:, 0] != edges[:, 1]]
    area, key = rng.integers(1, 4, len(gid)), np.array([f'k{k}' for k in rng.integers(0, 4, len(gid))])
    neighbours: dict[int, set[int]] = {}
    for a, b in edges.tolist():
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    rank = {g: (-a, k, g) for g, a, k in zip(gid.tolist(), area.tolist(), key.tolist())}
    want: dict[int, int] = {}
    for start in gid.tolist():
        component, todo = {start}, [start]
        while todo:
            new = neighbours.get(todo.pop(), set()) - component
            component |= new
            todo += new
        want.update(dict.fromkeys(component, min(component, key=rank.get)))
    got = script.connect(edges, gid, area, key)
    assert got.tolist() == [want[g] for g in gid.tolist()]
    sizes = np.unique(got, return_counts=True)[1]
    assert sizes.max() > 5 and (sizes == 2).sum() > 100  # large and small groups, many ties broken


def test_siglip_scores_equal_the_model(bed):
    out = bed['t'] / 'siglip-out'
    code, err = in_process('--local', bed['local'], '--bucket', '64-128', '--remote_upload', out,
                           '--model_name', bed['siglip'], '--heads', f'aesthetic={bed["sig_head"]}',
                           '--caption_keys', CAPTION,
                           '--num_workers', 1, '--batch-size', 5, '--summary', out / 's.json')
    assert code == 0, err[-3000:]
    rows = read_mds(str(out / '64-128'))
    img, txt = reference(bed['siglip'], rows)
    with torch.no_grad():
        want = laion_mlp(bed['sig_head'], [32, 8, 1, 1, 1, 1])(img)[:, 0]
    np.testing.assert_allclose([r['aesthetic'] for r in rows], want.numpy(), atol=1e-5)
    np.testing.assert_allclose([r['clip_caption'] for r in rows], (img * txt).sum(-1).numpy(), atol=1e-5)


def test_laion_published_heads_score_as_their_own_mlp(bed, tmp_path):
    """LAION's two published heads (testbed/laion_heads), the linear one and the one with ReLUs, each
    scored as the predictor's own MLP scores it; the linear one also inside a checkpoint dict. The input
    stores its images with streaming's `jpeg` encoding (a PIL image per row): they are read, and
    written back byte for byte."""
    clip = build_clip(tmp_path / 'clip768', projection_dim=768)  # CLIP ViT-L/14's embedding size
    torch.save({'model': torch.load(LAION_HEADS['linear'], map_location='cpu'), 'epoch': 3},
               tmp_path / 'checkpoint.pth')
    items, _ = planted_corpus(distinct=4)
    rows = [make_row(n, data, name) for n, (name, data) in enumerate(items[:6])]
    write_mds_input(str(tmp_path / 'in'), [{**r, 'jpg': Image.open(io.BytesIO(r['jpg']))} for r in rows],
                    columns={**COLUMNS, 'jpg': 'jpeg'})
    out = tmp_path / 'out'
    code, err = in_process('--local', tmp_path / 'in', '--bucket', 'all', '--remote_upload', out,
                           '--model_name', clip, '--heads', f'linear={LAION_HEADS["linear"]}',
                           f'relu={LAION_HEADS["relu"]}', f'checkpoint={tmp_path / "checkpoint.pth"}',
                           '--dup_threshold', 1, '--clusters', 1, '--dedup_parts', 1, '--num_workers', 0,
                           '--summary', out / 's.json')
    assert code == 0, err[-3000:]
    got = [r for rs in read_all(out).values() for r in rs]
    files = {r['key']: r['jpg'].fp.getvalue() for r in got}  # before decoding loads (and closes) them
    img, _ = reference(clip, got, captions=False)
    with torch.no_grad():
        for column, relu in (('linear', False), ('relu', True), ('checkpoint', False)):
            mlp = laion_mlp(LAION_HEADS['relu' if relu else 'linear'], [768, 1024, 128, 64, 16, 1], relu)
            np.testing.assert_allclose([r[column] for r in got], mlp(img)[:, 0].numpy(), atol=1e-4)
    stored = {r['key']: r['jpg'].fp.getvalue() for rs in read_all(tmp_path / 'in').values() for r in rs}
    assert files == stored  # every image, unchanged
    record = json.loads((out / '64-128' / 'curation.json').read_text())
    assert [s['layout'] for s in record['scores']] == [
        "LAION's aesthetic predictor, linear (Dropouts between its Linear layers)",
        "LAION's aesthetic predictor with ReLUs (ReLU, Dropout between its Linear layers)",
        "LAION's aesthetic predictor, linear (Dropouts between its Linear layers)"]


def test_what_pil_says_of_a_kept_image_is_counted_and_named_never_printed(bed, tmp_path):
    """A JPEG with a broken EXIF block is curated, and PIL's warning about it (issue 34: "count and name,
    do not print") is named in its part's marker and counted by reason in the summary, as an undecodable
    file's reason carries what libtiff or PIL said of it."""
    real = {it.name: it.data for it in real_items()}
    items = [(name, real[name]) for name in ('bad_exif.jpg', 'webp_compressed.tif')]
    rows = [make_row(n, data, name) for n, (name, data) in enumerate(items + planted_corpus(2)[0][:2])]
    write_mds_input(str(tmp_path / 'in'), rows)
    with c_stderr() as printed:
        code, out, err = run_main('curate_images.py', '--local', tmp_path / 'in', '--bucket', 'all',
                                  '--remote_upload', tmp_path / 'out', '--model_name', bed['clip'],
                                  '--clusters', 1, '--dedup_parts', 1, '--num_workers', 0,
                                  '--summary', tmp_path / 's.json')
    assert code == 0, err[-3000:]
    parts = [json.loads(Path(m).read_text()) for m in markers(tmp_path / 'out', '*/*/_done')]
    (noted,), (skipped,) = ([x for m in parts for x in m[k]] for k in ('noted', 'skipped'))
    assert noted['key'] == rows[0]['key'] and noted['notes'][0].startswith('UserWarning: Corrupt EXIF data.')
    assert skipped['key'] == rows[1]['key'] and skipped['reason'] == (
        'OSError: decoder error -2; libtiff: WEBP compression support is not configured')
    summary = json.loads((tmp_path / 's.json').read_text())
    assert summary['noted'] == 1 and summary['noted_names']['first'] == {'UserWarning': [noted]}
    assert f"noted    1 x UserWarning: sample {noted['id']} key={noted['key']!r} (first: UserWarning: " \
           'Corrupt EXIF data.' in out
    assert len([r for rs in read_all(tmp_path / 'out').values() for r in rs]) == 3  # the EXIF one kept
    assert 'Warning' not in printed[0] + err and 'WEBP' not in printed[0] + err


@pytest.fixture(scope='module')
def plain(bed) -> dict:
    items, groups = plain_corpus()
    rows = [make_row(n, data, name) for n, (name, data) in enumerate(items)]
    write_mds_input(str(bed['t'] / 'plain'), rows)
    return {'local': bed['t'] / 'plain', 'groups': groups, 'names': {r['key']: name for r, (name, _) in
                                                                     zip(rows, items)}}


def test_plain_pictures_are_never_grouped_while_their_copies_are(bed, plain, tmp_path):
    """Solid colours, gradients, a page of text and two flags share a few dHashes with no detail; none
    is grouped with another, whatever --dup_threshold says. At 1 (no embedding pair) only the real photo's
    re-encoded and resized copies are grouped, by the hash they keep; at 0.999 the embedding groups every
    picture's copies, and still no two distinct pictures (the tiny CLIP's cosine of distinct ones here is
    at most 0.9989, of copies at least 0.9998, but the flags' copies 0.9977: they have none)."""
    hopper = [g for g in plain['groups'] if 'hopper' in g]
    for threshold, want in ((1, hopper), (0.999, plain['groups'])):
        out = tmp_path / str(threshold)
        code, err = in_process('--local', plain['local'], '--bucket', 'all', '--remote_upload', out,
                               '--model_name', bed['clip'], '--dup_threshold', threshold, '--clusters', 1,
                               '--dedup_parts', 1, '--num_workers', 0, '--summary', out / 's.json')
        assert code == 0, err[-3000:]
        assert groups_of(out, plain['names'])[0] == sorted(want, key=sorted), threshold


def test_filter_removes_what_polars_removes_on_the_read_back_rows(bed, clip_run):
    cond = 'aesthetic > 0 AND dup_keep = 1 AND width >= 80'
    out = bed['t'] / 'filtered'  # a rerun of the unfiltered run with a filter: only the output is rewritten
    shutil.copytree(clip_run, out)
    work = sorted(glob.glob(str(out / '_curate' / '**' / '*.npz'), recursive=True))
    before = {f: os.stat(f).st_mtime_ns for f in work}
    code, err = in_process(*flags(bed, out, '--filter', cond))
    assert code == 0, err[-3000:]
    assert {f: os.stat(f).st_mtime_ns for f in work} == before  # embeddings and dedup reused
    full = read_all(clip_run)
    assert sorted(full) == ['0-64', '64-128']  # 256-512 holds undecodable images only: nothing to read
    for bucket, rows in read_all(out).items():
        frame = pl.DataFrame([{k: v for k, v in r.items() if k != 'jpg'} for r in full[bucket]])
        assert [r['key'] for r in rows] == frame.filter(pl.sql_expr(cond))['key'].to_list()
        if bucket == '64-128':
            assert rows and len(rows) < len(full[bucket])
    summary = json.loads((out / 's.json').read_text())
    # the filter empties 0-64 (its one image is 53 px wide): it keeps curation.json, and no index.json is
    # left over from the unfiltered run, so a trainer that reads every bucket with one reads them all
    emptied = sorted(b for b, counts in summary['buckets'].items() if counts['written'] == 0)
    assert emptied == ['0-64', '256-512']
    for b in emptied:
        assert not (out / b / 'index.json').exists()
        assert json.loads((out / b / 'curation.json').read_text())['counts']['written'] == 0
    together = read_streams(sorted(d for d in out.iterdir() if (d / 'index.json').exists()))
    assert [r['key'] for r in together] == [r['key'] for rs in read_all(out).values() for r in rs]
    assert len(together) == summary['written']
    per_clause = {}
    for b in summary['buckets'].values():
        for label, n in b['removed_by_clause'].items():
            per_clause[label] = per_clause.get(label, 0) + n
    everything = pl.DataFrame([{k: v for k, v in r.items() if k != 'jpg'}
                               for rs in full.values() for r in rs])
    alive, want = everything, {}
    for clause in ('aesthetic > 0', 'dup_keep = 1', 'width >= 80'):
        want[clause] = alive.height - alive.filter(pl.sql_expr(clause)).height
        alive = alive.filter(pl.sql_expr(clause))
    assert per_clause == want


def markers(out: Path, pattern: str) -> list[str]:
    return sorted(glob.glob(str(out / pattern)))


def kill9_when(root: Path, args: list, out: Path, pattern: str) -> None:
    """Run the script in its own process group; kill -9 the group once `pattern` matches under `out`."""
    proc = subprocess.Popen([sys.executable, str(root / 'curate_images.py'), *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not markers(out, pattern) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)


def test_kill9_in_each_pass_then_two_ranks_equal_an_uninterrupted_run(root, bed, clip_run):
    out = bed['t'] / 'killed'
    args = flags(bed, out)
    kill9_when(root, args, out, '_curate/embed/*/*/_done')  # during the embedding pass
    embedded = markers(out, '_curate/embed/*/*/_done')
    assert embedded and not markers(out, '*/index.json')
    kill9_when(root, args, out, '_curate/dedup/shuffle/*/*/_done')  # during the dedup pass
    assert markers(out, '_curate/dedup/shuffle/*/*/_done') and not markers(out, '_curate/dedup/groups/*')
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                          '2', '--', str(root / 'curate_images.py'), *map(str, args)], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert read_all(out) == read_all(clip_run)  # same rows, same scores, same groups with 2 ranks
    assert json.loads((out / 's.json').read_text())['world_size'] == 2


def test_sigterm_keeps_finished_parts_and_a_rerun_completes(bed, clip_run):
    """SIGTERM (how a platform stops a job) to main() in this process, once a part is embedded."""
    out = bed['t'] / 'stopped'

    def watch() -> None:
        deadline = time.time() + 120
        while not markers(out, '_curate/embed/*/*/_done') and time.time() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code, err = in_process(*flags(bed, out))
    watcher.join()
    assert code == 128 + signal.SIGTERM and 'Traceback' not in err, err[-3000:]
    assert [ln for ln in err.splitlines() if ln.startswith('error:')] == [
        'error: stopped by SIGTERM: finished parts are kept, the part in progress is not; rerun the same '
        'command to resume']
    kept = {m: Path(m).read_bytes() for m in markers(out, '_curate/embed/*/*/_done')}
    assert kept and not markers(out, '*/index.json')
    code, err = in_process(*flags(bed, out))
    assert code == 0, err[-3000:]
    assert {m: Path(m).read_bytes() for m in kept} == kept  # finished parts were not redone
    assert read_all(out) == read_all(clip_run)


@pytest.fixture(scope='module')
def mistakes(bed) -> dict[str, Path]:
    """Inputs, heads and models a user gets wrong, each a few rows or bytes."""
    t = bed['t'] / 'mistakes'
    items, _ = planted_corpus(distinct=2)
    rows = [make_row(n, data, name) for n, (name, data) in enumerate(items[:3])]  # all in bucket 64-128
    write_mds_input(str(t / 'nested'), rows, subfolder='train')
    write_mds_input(str(t / 'png'), [{**r, 'png': r['jpg']} for r in rows],
                    columns={**{k: v for k, v in COLUMNS.items() if k != 'jpg'}, 'png': 'bytes'})
    write_mds_input(str(t / 'json'), [{**r, 'caption': None} for r in rows],
                    columns={**COLUMNS, 'caption': 'json'})
    (t / 'garbage' / '64-128').mkdir(parents=True)
    (t / 'garbage' / '64-128' / 'index.json').write_text('{"version": 2}')
    shutil.copytree(bed['local'] / '64-128', t / 'missing' / '64-128')
    (t / 'missing' / '64-128' / 'shard.00001.mds').unlink()
    with open(t / 'missing' / '64-128' / 'shard.00002.mds', 'r+b') as f:
        f.truncate(100)  # cut short
    for folder, name, text in (('pipeline', 'model_index.json', '{"_class_name": "StableDiffusionPipeline"}'),
                               ('text_encoder', 'config.json', '{"model_type": "clip_text_model"}')):
        (t / folder).mkdir()
        (t / folder / name).write_text(text)
    torch.save(torch.nn.Sequential(torch.nn.Linear(16, 1)), t / 'module.pth')  # the module, pickled
    (t / 'notes.pth').write_text('aesthetic head: see the wiki\n')
    torch.save({f'layers.{n}.{p}': torch.zeros(o, i) if p == 'weight' else torch.zeros(o)  # gaps 1, 2
                for n, (o, i) in ((0, (4, 16)), (2, (2, 4)), (5, (1, 2))) for p in ('weight', 'bias')},
               t / 'unknown_layout.pth')
    (t / 'a_file').write_text('')
    return {p.name: p for p in t.iterdir()}


def test_refusals_are_one_line_before_a_model_loads(bed, mistakes, tmp_path):
    """Each mistake is refused in one line that names it and says what to do, before the model loads
    (no case here takes a second), and nothing is written."""
    def refused(*more) -> str:
        code, text = in_process(*flags(bed, tmp_path / 'o', *more))
        assert code == 2 and 'Traceback' not in text, text[-3000:]
        [line] = [ln for ln in text.splitlines() if 'error:' in ln]
        assert 'rerun the same command' not in line  # a rerun cannot fix any of these
        return line

    m, head = mistakes, f'x={bed["linear"]}'
    assert 'no `alt` column' in refused('--caption_keys', 'alt')
    assert 'does not evaluate' in refused('--filter', 'nosuch > 1')
    assert 'do not chain' in refused('--heads', f'x={bed["sig_head"]}')  # a 32-wide head on 16-dim CLIP
    assert 'cannot read the config' in refused('--model_name', tmp_path / 'nothing')
    if not torch.cuda.is_available():
        assert refused('--device', 'cuda') == 'error: --device cuda: no GPU is visible to torch'
    assert "--dup_threshold: 'nan' is not a number" in refused('--dup_threshold', 'nan')
    # what the index's column encodings tell: a caption column must hold text
    assert '--caption_keys width: the column holds int32, not text' in refused('--caption_keys', 'width')
    assert '--caption_keys jpg: the column holds bytes, not text' in refused('--caption_keys', 'jpg')
    assert '--caption_keys caption: the column holds json, not text' in refused('--local', m['json'])
    # columns two flags would make
    assert refused('--heads', head, head).endswith(
        f'column x would be written twice, by --heads {head} and by --heads {head}: give each head a column '
        'name of its own and name each caption column once')
    assert 'column clip_caption would be written twice, by --caption_keys caption and by --caption_keys ' \
        'caption' in refused('--caption_keys', CAPTION, CAPTION)
    assert f'by --heads clip_caption={bed["linear"]} and by --caption_keys caption' in \
        refused('--heads', f'clip_caption={bed["linear"]}')
    assert 'dup_keep would be written twice' in refused('--heads', f'dup_keep={bed["linear"]}')
    # places
    assert f'{m["a_file"]} is a file, not a folder' in refused('--remote_upload', m['a_file'] / 'out')
    assert f'--preview_path {tmp_path} is a folder' in refused('--preview', 1, '--preview_path', tmp_path)
    assert f'--summary {tmp_path} is a folder' in refused('--summary', tmp_path)
    # heads
    assert 'holds pickled Python objects (a whole nn.Module?)' in refused('--heads', f'x={m["module.pth"]}')
    assert 'is not a file torch.save wrote' in refused('--heads', f'x={m["notes.pth"]}')
    assert refused('--heads', f'x={m["a_file"]}.pth').endswith('.pth: no such file')
    assert 'between its Linear layers (0, 2, 5) sit modules' in \
        refused('--heads', f'x={m["unknown_layout.pth"]}')
    # models
    assert 'holds a diffusers pipeline (model_index.json)' in refused('--model_name', m['pipeline'])
    assert 'is a clip_text_model model, not an image-text model' in refused('--model_name', m['text_encoder'])
    # inputs
    assert 'is not an MDS index.json' in refused('--local', m['garbage'])
    nested = str(m['nested'] / '64-128' / 'train' / 'index.json')
    assert f'{nested} exists: pass --subfolder train' in refused('--local', m['nested'])
    assert f'{nested} exists: pass --subfolder train' in refused('--local', m['nested'], '--bucket', '64-128')
    assert 'its images seem to be in `png` (bytes)' in refused('--local', m['png'])
    assert 'lists 2 shard files that are missing or not of the size it says (shard.00001.mds, ' \
        'shard.00002.mds)' in refused('--local', m['missing'])
    assert not (tmp_path / 'o').exists()  # nothing written by a refused run


def test_a_rerun_with_other_settings_says_what_changed(bed, clip_run, tmp_path):
    """The work of a run is reused only by the same settings; a rerun with others is told each one."""
    out, grown = tmp_path / 'out', tmp_path / 'input'
    shutil.copytree(clip_run, out)
    shutil.copytree(bed['local'], grown)
    shutil.rmtree(grown / '0-64')
    shutil.copytree(bed['local'] / '64-128', grown / '0-64')  # the bucket now holds other shards
    before = {p: p.stat().st_mtime_ns for p in out.rglob('*')}
    code, err = in_process(*flags(bed, out, '--local', grown, '--dup_threshold', 0.9,
                                  '--heads', f'aesthetic={bed["linear"]}', f'more={bed["linear"]}'))
    n = len(bed['buckets']['64-128'])
    shards = len(json.loads((grown / '0-64' / 'index.json').read_text())['shards'])
    assert code == 2 and err.strip().splitlines()[-1] == (
        f'error: {out}/_curate holds the work of a run with other settings: input 0-64: 1 shard of 1 sample '
        f'then, {shards} shards of {n} samples now; --dup_threshold 0.9996 then, 0.9 now; --heads '
        'aesthetic: another file (its sha1 differs); --heads linear: not in this run; --heads more: not in '
        'that run. Rerun with the flags and input it was made with, or write to a new --remote_upload')
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == before


def test_captioner_and_latents_read_the_curated_output(bed, clip_run, tiny_model):
    """The next steps read the curated buckets as they read the cloudwriter's (one cheap run each)."""
    from testbed.vlms import build_vlm
    want = read_all(clip_run)['64-128']
    read = ['--remote_download', clip_run, '--bucket', '64-128', '--batch-size', 8]
    llava = build_vlm('llava', bed['t'] / 'llava')
    with quiet_main():
        load_script('caption_images.py').main(list(map(str, [
            *read, '--local', bed['t'] / 'c1', '--remote_upload', bed['t'] / 'captioned',
            '--model_name', llava, '--max_new_tokens', 2])))
    got = read_mds(str(bed['t'] / 'captioned' / '64-128'))
    assert [{k: v for k, v in r.items() if k != 'vlm_caption'} for r in got] == want
    with quiet_main():
        load_script('precompute_latents.py').main(list(map(str, [
            *read, '--local', bed['t'] / 'c2', '--remote_upload', bed['t'] / 'latents',
            '--model_name', tiny_model, '--resolutions', 64, '--num_workers', 0])))
    got = read_mds(str(bed['t'] / 'latents' / '64-128'))
    assert [r['key'] for r in got] == [r['key'] for r in want] and all(r['latents_64'] for r in got)
    assert [r['aesthetic'] for r in got] == [r['aesthetic'] for r in want]  # the new columns travel on
