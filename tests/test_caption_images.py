"""caption_images.py as a user runs it: MDS in (as laion_cloudwriter.py writes it), MDS with captions out.

The models are tiny LLaVA, Qwen2-VL and Idefics3 (SmolVLM) folders of real transformers classes
(tests/testbed/vlms.py); the output is read back with StreamingDataset and checked against
`model.generate` called directly through the processor. One torchrun x2 run (resume after SIGTERM and
kill -9); everything else runs in one process.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageOps
from testbed.mds_input import COLUMNS, UNBUCKETED, make_row, rows_for, write_mds_input
from testbed.readback import environ, read_mds
from testbed.scripts import load_script, one_torch_thread, run_main
from testbed.vlms import KINDS, build_vlm, direct_captions

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # bitwise-equal float math in every process and rank
PROMPT = 'Describe this image.'
NEW_TOKENS = 8  # per caption: enough for the captions to differ per image


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope='module')
def vlms(tmp_path_factory) -> dict[str, Path]:
    return {kind: build_vlm(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


@pytest.fixture(scope='module')
def script():
    return load_script('caption_images.py')


@pytest.fixture(scope='module')
def dataset(corpus, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The test bed corpus (every size and format, three undecodable files) as one unbucketed MDS
    dataset of several shards, read in place from <local>/0-1048576."""
    local = tmp_path_factory.mktemp('local')
    rows = rows_for(list(corpus))
    write_mds_input(str(local), rows, bucketed=False, size_limit=1 << 15)
    return local, rows


def run(root: Path, *args, torchrun: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                str(torchrun), '--'] if torchrun else [sys.executable]
    return subprocess.run(launcher + [str(root / 'caption_images.py'), *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def flags(local: Path, upload: Path, model: Path, *more) -> list:
    return ['--local', local, '--bucket', UNBUCKETED, '--remote_upload', upload, '--model_name', model,
            '--prompt', PROMPT, '--max_new_tokens', NEW_TOKENS, '--batch-size', 4, '--part_size', 3, *more]


@pytest.fixture(scope='module')
def llava_run(vlms, dataset, tmp_path_factory) -> Path:
    """One uninterrupted run with the tiny LLaVA (main() in this process): the reference of the resume
    test."""
    out = tmp_path_factory.mktemp('llava-out')
    code, err = in_process(*flags(dataset[0], out, vlms['llava'], '--keep_raw', '--summary', out / 's.json',
                                  '--preview', 3))
    assert code == 0, err[-3000:]
    return out


# ---- what a user relies on -------------------------------------------------------------------

def reference_image(data: bytes) -> Image.Image:
    """The picture as a viewer shows it: EXIF orientation applied, transparency over white, RGB."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if img.mode in ('RGBA', 'LA', 'P'):
        rgba = img.convert('RGBA')
        img = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert('RGB')



@pytest.mark.parametrize('kind', KINDS)
def test_each_caption_equals_generate_through_the_processor_then_the_rules(kind, root, vlms, dataset,
                                                                          llava_run, script, tmp_path):
    local, rows = dataset
    if kind == 'llava':
        out = llava_run
    else:
        out = tmp_path / 'out'
        code, err = in_process(*flags(local, out, vlms[kind], '--keep_raw', '--summary', out / 's.json'))
        assert code == 0, err[-3000:]
    got = read_mds(str(out / UNBUCKETED))
    broken = {rows[i]['key'] for i, r in enumerate(rows) if r['url'].rsplit('/', 1)[1] in
              ('truncated.jpg', 'random.bin', 'empty.jpg')}
    want = [r for r in rows if r['key'] not in broken]
    assert [o['key'] for o in got] == [r['key'] for r in want]  # each decodable image once, in order
    for o, r in zip(got, want):
        assert {k: o[k] for k in COLUMNS} == {k: r[k] for k in COLUMNS}  # every input column unchanged
    raw = direct_captions(vlms[kind], [reference_image(s['jpg']) for s in want], PROMPT, NEW_TOKENS)
    assert [o['vlm_caption_raw'] for o in got] == raw
    assert [o['vlm_caption'] for o in got] == [script.clean(t, script.RULES)[0] for t in raw]
    assert len(set(raw)) > len(raw) // 2  # the images, not only the prompt, shape the text

    summary = json.loads((out / 's.json').read_text())
    assert summary['written'] == len(want) and summary['skipped'] == 3
    skipped = [s for m in markers(out / UNBUCKETED) for s in json.loads(Path(m).read_text())['skipped']]
    assert {s['key'] for s in skipped} == broken and all(s['reason'] for s in skipped)  # in their parts
    first = [s for f in summary['skipped_names']['first'].values() for s in f]  # the summary: the first
    assert sorted(first, key=lambda s: s['id']) == skipped  # per reason (at most 20), counted by reason
    assert sum(summary['skipped_names']['by_reason'].values()) == 3
    record = json.loads((out / UNBUCKETED / 'captions.json').read_text())
    assert record['settings']['prompts'] == {'vlm_caption': PROMPT}
    assert record['settings']['do_sample'] is False
    assert [r['name'] for r in record['rules']] == list(script.RULE_NAMES)
    assert record['counts']['written'] == len(want) and record['counts']['captions'] == summary['captions']
    assert summary['captions']['vlm_caption']['rules']['collapse_whitespace'] == \
        sum(' '.join(t.split()) != t for t in raw)
    assert record['columns'] == {'vlm_caption': 'str', 'vlm_caption_raw': 'str'}
    if kind == 'llava':  # --preview 3: three images spread over the output, beside their captions
        assert summary['preview']['samples'] == [0, (len(got) - 1) // 2, len(got) - 1]
        with Image.open(summary['preview']['path']) as png:
            assert png.format == 'PNG' and png.height > 3 * 160


def markers(out: Path) -> list[str]:
    return sorted(glob.glob(str(out / '*' / '_done')))


def kill9_after(root: Path, args: list, out: Path, after: int) -> None:
    """Run the script in its own process group; kill -9 the group (a lost node: no clean-up at all)
    once `out` has `after` _done markers."""
    proc = subprocess.Popen([sys.executable, str(root / 'caption_images.py'), *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while len(markers(out)) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)


def sigterm_after(out: Path, after: int) -> threading.Thread:
    """A thread that sends this process SIGTERM (how a platform stops a job) once `out` has `after`
    _done markers: main() running in this process's main thread receives it as a user's run does."""
    def watch() -> None:
        deadline = time.time() + 240
        while len(markers(out)) < after and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigterm_then_kill9_then_two_ranks_equal_an_uninterrupted_run(root, vlms, dataset, llava_run,
                                                                      tmp_path):
    local, _ = dataset
    args = flags(local, tmp_path / 'out', vlms['llava'], '--keep_raw', '--summary', tmp_path / 's.json')
    out = tmp_path / 'out' / UNBUCKETED
    total = len(markers(llava_run / UNBUCKETED))
    assert total >= 5

    watcher = sigterm_after(out, after=1)
    code, stderr = in_process(*args)
    watcher.join()
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert 'Traceback' not in stderr
    assert [ln for ln in stderr.splitlines() if ln.startswith('error:')] == [
        'error: stopped by SIGTERM: finished parts are kept, the part in progress is not; rerun the same '
        'command to resume']
    summary = json.loads((tmp_path / 's.json').read_text())
    assert summary['interrupted'] == 'SIGTERM' and summary['parts_missing']
    assert not (out / 'index.json').exists()  # no index a reader would take for the whole set
    after_term = len(markers(out))
    assert 1 <= after_term < total
    assert summary['parts_this_run'] == after_term and summary['parts_before'] == 0  # issue 34, item 13

    kill9_after(root, args, out, after=after_term + 1)
    after_kill = len(markers(out))
    assert after_term < after_kill < total and not (out / 'index.json').exists()

    finished = {m: Path(m).read_bytes() for m in markers(out)}
    res = ok(run(root, *args, torchrun=2))
    assert {m: Path(m).read_bytes() for m in finished} == finished  # finished parts were not redone
    summary = json.loads((tmp_path / 's.json').read_text())
    assert summary['parts_before'] == after_kill and summary['world_size'] == 2, res.stdout
    assert summary['parts_this_run'] == total - after_kill
    assert {json.loads(Path(m).read_text())['rank'] for m in markers(out)} >= {0, 1}  # both ranks worked
    ref, got = read_mds(str(llava_run / UNBUCKETED)), read_mds(str(out))
    assert len({o['key'] for o in got}) == len(got)  # no duplicates
    assert got == ref  # same samples, same columns, same captions
    assert summary['skipped'] == 3 and summary['written'] == len(ref)

    # Resuming into that output with another prompt would mix two kinds of captions: refused.
    err = refused(*args, '--prompt', 'Say something.')
    assert 'was written with prompts=' in err and "'Say something.'" in err


# ---- sampling --------------------------------------------------------------------------------

def test_sampling_is_seeded_per_sample_whatever_the_batch(script, vlms, dataset):
    """A sampled caption depends on its image and --seed alone: the same in a batch of three as alone."""
    _, rows = dataset
    args = script.parse_args(['--remote_upload', 'x', '--model_name', str(vlms['qwen2_vl']), '--prompt',
                              PROMPT, '--decoding', 'sample', '--max_new_tokens', '10', '--seed', '3'])
    model = script.load_transformers(args, script.transformers_settings(args))
    images = [script.decode(r['jpg']) for r in rows[4:7]]

    def captions(imgs, ids, a=args):
        return [r['vlm_caption'].text for r in script.generate_transformers(model, imgs, ids, a)]

    together, alone = captions(images, [4, 5, 6]), captions(images[2:], [6])
    again = captions(images, [4, 5, 6])
    assert together[2] == alone[0] and together == again
    other = captions(images, [4, 5, 6], script.parse_args(['--remote_upload', 'x', '--decoding', 'sample',
                                                            '--max_new_tokens', '10', '--seed', '4']))
    assert other != together  # another seed, other captions


# ---- post-processing rules -------------------------------------------------------------------

@pytest.mark.parametrize('rule, text, want', [
    ('cut_at_note', 'A red cat on a sofa. Note: the image is blurry.', 'A red cat on a sofa.'),
    ('cut_at_note', 'A note on the fridge says hello.', 'A note on the fridge says hello.'),
    ('strip_preamble', 'The image shows a red cat.', 'A red cat.'),
    ('strip_preamble', 'In this image, two dogs run.', 'Two dogs run.'),
    ('strip_preamble', 'This photograph depicts a bridge.', 'A bridge.'),
    ('strip_preamble', 'An image shows nothing special.', 'An image shows nothing special.'),
    ('drop_repeated_sentences', 'A cat. A dog. A cat. a  cat.', 'A cat. A dog.'),
    ('drop_repeated_sentences', 'A cat.  A dog.', 'A cat.  A dog.'),
    ('collapse_whitespace', '  A cat\n\non a\tsofa. ', 'A cat on a sofa.'),
])
def test_each_rule_as_documented(script, rule, text, want):
    assert {r.__name__: r for r in script.RULES}[rule](text) == want


def test_rules_run_in_table_order_and_each_change_is_named(script):
    text = 'The image shows a  cat.\n A  cat. Note: I am an AI.'
    assert script.clean(text, script.RULES) == ('A cat.', ['cut_at_note', 'strip_preamble',
                                                           'drop_repeated_sentences', 'collapse_whitespace'])
    assert script.clean('A cat.', script.RULES) == ('A cat.', [])


# ---- refusals: one line each, before the model loads -----------------------------------------

def in_process(*args) -> tuple[int, str]:
    """(exit code, stderr) of the script's main() run in this process (no interpreter and torch
    start-up per case)."""
    code, _, err = run_main('caption_images.py', *args)
    return code, err


def refused(*args) -> str:
    """The error line of a command line the script refuses: exit 2, one line, no traceback."""
    code, text = in_process(*args)
    assert code == 2 and 'Traceback' not in text, text[-3000:]
    errors = [ln for ln in text.splitlines() if 'error:' in ln]
    assert len(errors) == 1, text[-3000:]
    return errors[0]


def test_a_mistyped_flag_fails_before_torch_is_imported(root):
    code = ("import runpy, sys\n"
            "sys.argv = ['caption_images.py', '--remote_upload', 'x', '--decoding', 'beam']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as stop:\n"
            "    print(stop.code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ['2', 'False', 'False'], proc.stderr
    assert "argument --decoding: invalid choice: 'beam'" in proc.stderr.splitlines()[-1]


def test_every_refusal_is_one_line(vlms, dataset, tiny_model, tmp_path):
    local, _ = dataset
    base = flags(local, tmp_path / 'out', vlms['llava'])
    cases = [
        (['--max_new_tokens', 0], 'argument --max_new_tokens: 0 must be at least 1'),
        (['--batch-size', 'four'], "argument --batch-size: 'four' is not a number"),
        (['--rules', 'strip_preambel'], "argument --rules: invalid choice: 'strip_preambel'"),
        (['--bucket', 9], 'argument --bucket: 9: the bucket index must be 0..6'),
        (['--size_limit', '5tb'], 'argument --size_limit: 5tb: must be a shard size'),
        (['--compression', 'zip'], 'argument --compression: zip: streaming knows br, bz2'),
        (['--remote_upload', local], 'is the same place as the input'),
        (['--remote_upload', f'{local}/{UNBUCKETED}/../{UNBUCKETED}/sub', '--bucket', ''],
         'the output (--remote_upload)'),
        (['--local', tmp_path / 'nowhere'], 'cannot read the input dataset index'),
        (['--caption_key', 'caption'], 'already has a column caption: pass another --caption_key'),
        (['--model_name', tmp_path / 'no-model'], f'--model_name {tmp_path / "no-model"} is no folder, nor a '
                                                  'hub name (org/name): pass an image-text-to-text model'),
        (['--model_name', tiny_model], f'--model_name {tiny_model} is a diffusers pipeline folder '
                                       '(vae/config.json, text_encoder/config.json): pass an image-text-to-'
                                       'text model (a hub name such as Qwen/Qwen2-VL-2B-Instruct, or a '
                                       'folder with its config.json and processor)'),
        (['--model_name', tiny_model / 'text_encoder'], 'holds a clip_text_model model, which '
                                                        'AutoModelForImageTextToText does not load'),
    ]
    for extra, want in cases:
        line = refused(*base, *extra)
        assert want in line and len(line) < 300, (extra, line)  # not transformers' list of every model
    (tmp_path / 'taken' / UNBUCKETED).mkdir(parents=True)
    (tmp_path / 'taken' / UNBUCKETED / 'index.json').write_text('{}')
    line = refused(*flags(local, tmp_path / 'taken', vlms['llava']))
    assert 'holds files this script did not write (index.json, ...)' in line


def test_an_input_without_one_good_image_gives_an_empty_index(vlms, tmp_path):
    """... and a summary of one screen that counts the undecodable images by reason and names the first
    20, each one being named in its part's marker (issue 36: ~20M at LAION-2B's 1%)."""
    rows = [make_row(i, b'not an image', f'bad{i}.jpg') for i in range(25)]
    write_mds_input(str(tmp_path / 'local'), rows, bucketed=False, size_limit=1 << 11)
    code, out, _ = run_main('caption_images.py', *flags(tmp_path / 'local', tmp_path / 'out', vlms['llava'],
                                                        '--part_size', 10, '--summary', tmp_path / 's.json'))
    index = json.loads((tmp_path / 'out' / UNBUCKETED / 'index.json').read_text())
    assert code == 0 and sum(s['samples'] for s in index['shards']) == 0  # (streaming opens no empty set)
    summary, reason = json.loads((tmp_path / 's.json').read_text()), 'not an image format PIL can read'
    assert summary['skipped'] == 25 and summary['skipped_names']['by_reason'] == {reason: 25}
    assert [s['key'] for s in summary['skipped_names']['first'][reason]] == [r['key'] for r in rows[:20]]
    parts = markers(tmp_path / 'out' / UNBUCKETED)
    assert len(parts) > 1 and [s['key'] for m in parts for s in json.loads(Path(m).read_text())['skipped']] \
        == [r['key'] for r in rows]
    where = f'{tmp_path / "out" / UNBUCKETED}/NNNNN/_done, under "skipped"'
    assert summary['skipped_names']['in'] == where and f'skipped  (each named in {where})' in out
    assert f"skipped  25 x {reason}: sample 0 key='000000000', sample 1 key='000000001', sample 2 " \
           "key='000000002', ..." in out.splitlines()
    assert len(out.splitlines()) < 15 and len(json.dumps(summary)) < 8000  # the 20 first, not all 25


def test_s3_in_and_out(vlms, dataset, s3, tmp_path):
    """Input and output on S3 (moto on 127.0.0.1), the input by bucket index; shards are downloaded,
    then evicted."""
    _, rows = dataset
    buckets = write_mds_input(f's3://{s3.bucket}/mds', rows[:8], env=s3.env, cache=str(tmp_path / 'w'))
    cache = tmp_path / 'cache'
    with environ(s3.env):
        code, err = in_process('--remote_download', f's3://{s3.bucket}/mds', '--bucket', 2, '--local', cache,
                               '--remote_upload', f's3://{s3.bucket}/captioned', '--model_name',
                               vlms['llava'], '--max_new_tokens', 4, '--part_size', 1)
    assert code == 0, err[-3000:]
    got = read_mds(f's3://{s3.bucket}/captioned/128-256', env=s3.env)
    assert [o['key'] for o in got] == [r['key'] for r in buckets['128-256']] and got
    assert all(o['vlm_caption'] for o in got)
    keys = s3.list_keys(s3.bucket, 'captioned/128-256/')
    assert {'captioned/128-256/index.json', 'captioned/128-256/captions.json',
            'captioned/128-256/00000/_done'} <= set(keys)
    assert not glob.glob(str(cache / '**' / '*.mds'), recursive=True)  # downloaded shards evicted


def test_an_input_in_streamings_jpeg_encoding_is_captioned_and_its_images_kept_byte_for_byte(vlms, corpus,
                                                                                            tmp_path):
    """Many MDS datasets store images with streaming's `jpeg` encoding (its reader gives a PIL image):
    each is captioned, and written back as the very file stored (streaming's writer would save the PIL
    image again as a new JPEG at quality 75)."""
    jpegs = [it for it in corpus if it.data[:3] == b'\xff\xd8\xff'][:4]
    rows = rows_for(jpegs)
    write_mds_input(str(tmp_path / 'in'), [{**r, 'jpg': Image.open(io.BytesIO(r['jpg']))} for r in rows],
                    bucketed=False, columns={**COLUMNS, 'jpg': 'jpeg'})
    out = tmp_path / 'out'
    code, err = in_process(*flags(tmp_path / 'in', out, vlms['llava'], '--summary', out / 's.json'))
    assert code == 0, err[-3000:]
    stored = [s['jpg'].fp.getvalue() for s in read_mds(str(tmp_path / 'in' / UNBUCKETED))]
    got = read_mds(str(out / UNBUCKETED))
    assert [s['jpg'].fp.getvalue() for s in got] == stored  # the files, unchanged
    assert all(s['vlm_caption'] for s in got) and len(got) == len(rows)
