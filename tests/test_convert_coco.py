"""convert_coco.py: a user turns a COCO-shaped val2014 folder and captions JSON into an MDS dataset."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streaming import MDSWriter
from testbed.coco import normalize_caption, write_coco_sample
from testbed.mds_input import ENDPOINT_VARIABLES, endpoint_only_in
from testbed.readback import read_mds
from testbed.scripts import run_script

N_IMAGES = 24


@pytest.fixture(scope='module')
def coco(tmp_path_factory) -> tuple[Path, Path]:
    """(data_path, annotation_path) of a 24-image COCO-shaped sample; tests must not change it."""
    return write_coco_sample(tmp_path_factory.mktemp('coco'), N_IMAGES, seed=0)


@pytest.fixture
def coco_copy(coco, tmp_path) -> tuple[Path, Path]:
    """A private copy of the sample that a test may damage."""
    data, ann = tmp_path / 'in' / 'val2014', tmp_path / 'in' / 'captions_val2014.json'
    shutil.copytree(coco[0], data)
    shutil.copy(coco[1], ann)
    return data, ann


def run(root: Path, data: Path, ann: Path, remote: str, *extra: str,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line, run in this process as its own would run it (testbed.scripts.run_script: no
    interpreter and streaming start-up per run); Ctrl-C's test runs a process of its own."""
    return run_script('convert_coco.py', '--data_path', data, '--annotation_path', ann, '--remote', remote,
                      *extra, env=env)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def summary(stdout: str) -> dict[str, int]:
    """The counts of the end-of-run summary, by label."""
    return {m[1]: int(m[2].replace(',', '')) for m in re.finditer(r'^  (\S.*?)\s+([\d,]+)$', stdout, re.M)}


def annotation(ann: Path) -> tuple[list[int], dict[int, list[str]], dict[int, str]]:
    """What the JSON says, read independently of the script: captioned ids in first-appearance order,
    normalized captions per id, file name per id."""
    doc = json.loads(ann.read_text())
    order, captions = [], {}
    for a in doc['annotations']:
        if a['image_id'] not in captions:
            order.append(a['image_id'])
            captions[a['image_id']] = []
        captions[a['image_id']].append(normalize_caption(a['caption']))
    return order, captions, {im['id']: im['file_name'] for im in doc['images']}


def published_choice(ids: list[int], n: int, seed: int = 0) -> list[int]:
    np.random.seed(seed)
    return [int(i) for i in np.random.choice(ids, n, replace=False)]


def objects(s3, keys: list[str]) -> dict[str, bytes]:
    return {k: s3.client().get_object(Bucket=s3.bucket, Key=k)['Body'].read() for k in keys}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what must stay as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def refused(result: subprocess.CompletedProcess, *words: str) -> None:
    """The run refused with exit 2 and one `error:` line holding `words`."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    assert all(w in lines[0] for w in words), (lines[0], words)


def shard_blob(folder: Path) -> bytes:
    return b''.join(p.read_bytes() for p in sorted(folder.glob('shard.*.mds')))


def check_samples(samples: list[dict], ids: list[int], data: Path, ann: Path, blob: bytes) -> None:
    """Samples are `ids` in order, with grouped clean captions and the files' exact bytes."""
    _, captions, names = annotation(ann)
    assert [int(s['image_id']) for s in samples] == ids
    for s in samples:
        original = (data / names[int(s['image_id'])]).read_bytes()
        assert s['file_name'] == names[int(s['image_id'])]
        assert s['captions'] == captions[int(s['image_id'])]
        assert all(c == c.strip() and '\n' not in c and '  ' not in c for c in s['captions'])
        assert isinstance(s['image'], Image.Image) and s['image'].format == 'JPEG'
        assert original in blob  # stored byte for byte, never re-encoded
        want = Image.open(io.BytesIO(original))
        assert (s['width'], s['height']) == want.size and s['width'].dtype == np.int32
        assert s['image_id'].dtype == np.int64
        assert np.array_equal(np.asarray(s['image']), np.asarray(want))
        # What its reader does with a sample: mosaicml/diffusion's StreamingCOCOCaption.__getitem__
        # (diffusion/datasets/coco/coco_captions.py, commit c44b512) converts sample['image'] to RGB
        # when its mode differs and tokenizes sample['captions'][0] (caption_selection 'first').
        image = s['image'] if s['image'].mode == 'RGB' else s['image'].convert('RGB')
        assert image.size == want.size and isinstance(s['captions'][0], str)


def test_subset_is_the_published_choice_with_exact_bytes_skipping_missing(root, coco_copy, tmp_path):
    data, ann = coco_copy
    ids = published_choice(annotation(ann)[0], 12)  # default seed 0, as the published pipeline
    names = annotation(ann)[2]
    for gone in (ids[0], ids[5]):
        (data / names[gone]).unlink()
    out = tmp_path / 'out'
    result = ok(run(root, data, ann, str(out), '--num_samples', '12', '--size_limit', '20kb',
                    '--skip_missing'))

    kept = [i for i in ids if i not in (ids[0], ids[5])]  # the rest of the choice, in its order
    check_samples(read_mds(str(out)), kept, data, ann, shard_blob(out))
    shards = sorted(p.name for p in out.glob('shard.*.mds'))
    assert len(shards) > 1
    assert sorted(p.name for p in out.iterdir()) == ['convert_coco.json', 'index.json'] + shards  # no staging
    counts = summary(result.stdout)
    assert counts['missing on disk (skipped)'] == 2 and counts['samples written'] == 10
    assert counts['files on disk without annotation (ignored)'] == 1
    assert counts['images chosen'] == 12 and counts['shards'] == len(shards)


def test_all_images_to_s3_and_a_failed_rerun_leaves_no_index(root, coco_copy, s3):
    data, ann = coco_copy
    remote = f's3://{s3.bucket}/coco/val'
    ok(run(root, data, ann, remote, '--num_samples', '0', '--size_limit', '20kb', env=s3.child_env()))
    keys = s3.list_keys(s3.bucket, 'coco/val/')
    assert 'coco/val/index.json' in keys and len(keys) > 2
    first = objects(s3, keys)
    order = annotation(ann)[0]
    samples = read_mds(remote, env=s3.env)
    check_samples(samples, order, data, ann, b''.join(first.values()))
    assert sorted({s['image'].mode for s in samples}) == ['L', 'RGB']  # COCO's grayscale JPEGs

    # A later file turns out not to be a JPEG: the run stops, and the old index is gone, so no
    # reader takes the remote (old and new shards mixed) for a whole dataset.
    _, _, names = annotation(ann)
    bad = data / names[order[-3]]
    good = bad.read_bytes()
    Image.new('RGB', (32, 32)).save(bad, format='PNG')
    result = run(root, data, ann, remote, '--num_samples', '0', '--size_limit', '20kb',
                 env=s3.child_env())
    assert result.returncode != 0
    assert f'{bad} is not a JPEG' in result.stderr and 'Traceback' not in result.stderr
    assert 'coco/val/index.json' not in s3.list_keys(s3.bucket, 'coco/val/')

    bad.write_bytes(good)
    ok(run(root, data, ann, remote, '--num_samples', '0', '--size_limit', '20kb', env=s3.child_env()))
    assert [int(s['image_id']) for s in read_mds(remote, env=s3.env)] == order
    assert objects(s3, s3.list_keys(s3.bucket, 'coco/val/')) == first  # same arguments, same bytes


@pytest.mark.parametrize('variable', ENDPOINT_VARIABLES)
def test_an_s3_compatible_endpoint_named_by_either_variable_is_written(variable, root, coco, s3):
    """The endpoint in streaming's S3_ENDPOINT_URL or in botocore's AWS_ENDPOINT_URL alone: the remote
    is listed (the claim check), written, and reads back whole."""
    data, ann = coco
    remote = f's3://{s3.bucket}/coco'
    ok(run(root, data, ann, remote, '--num_samples', '5', env=endpoint_only_in(s3, variable)))
    assert len(read_mds(remote, env=s3.env)) == 5


def test_ctrl_c_mid_run_leaves_no_index(root, tmp_path):
    data, ann = write_coco_sample(tmp_path / 'in', 300, seed=1, image_size=(320, 240), distinct_images=8)
    remote = tmp_path / 'out'
    cmd = [sys.executable, str(root / 'convert_coco.py'), '--data_path', str(data), '--annotation_path',
           str(ann), '--remote', str(remote), '--num_samples', '0', '--size_limit', '100kb',
           '--workers', '2']
    # the child must take Ctrl-C even where this process runs with SIGINT ignored (a background job)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while proc.poll() is None and not (remote / 'shard.00000.mds').exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip('the run finished before Ctrl-C arrived (machine too fast for this test)')
    assert f'interrupted: {remote} has no new index.json' in err and 'Traceback' not in err
    assert (remote / 'shard.00000.mds').exists() and not (remote / 'index.json').exists()


def test_unreachable_remote_is_one_clear_line(root, coco, s3, tmp_path):
    s3.stop()
    # One attempt per request: botocore's retries with back-off would only make the same line come later.
    result = run(root, *coco, f's3://{s3.bucket}/coco', '--num_samples', '3',
                 env=s3.child_env(AWS_MAX_ATTEMPTS='1'))
    assert result.returncode != 0
    assert f'cannot use remote s3://{s3.bucket}/coco' in result.stderr
    assert 'Traceback' not in result.stderr


def other_dataset(folder: Path) -> Path:
    """Somebody else's MDS dataset (3 shards) in `folder`."""
    with MDSWriter(out=str(folder), columns={'x': 'int'}, size_limit=100) as old:
        for i in range(30):
            old.write({'x': i})
    return folder


def test_another_dataset_at_remote_or_local_is_refused_and_left_intact(root, coco, s3, tmp_path):
    other = snapshot(other_dataset(tmp_path / 'other'))
    assert 'index.json' in other and len(other) > 3
    refused(run(root, *coco, str(tmp_path / 'other'), '--num_samples', '3'),
            f'--remote {tmp_path / "other"} holds files this script did not write (index.json, shard.')
    assert snapshot(tmp_path / 'other') == other
    # our marker does not make other files ours
    (tmp_path / 'mine' / 'photos').mkdir(parents=True)
    (tmp_path / 'mine' / 'convert_coco.json').write_text('{}')
    refused(run(root, *coco, str(tmp_path / 'mine'), '--num_samples', '3'), 'did not write (photos)')
    assert sorted(os.listdir(tmp_path / 'mine')) == ['convert_coco.json', 'photos']
    # as the staging folder it is left alone: only a subfolder of ours is used there, then removed
    ok(run(root, *coco, str(tmp_path / 'new'), '--local', str(tmp_path / 'other'), '--num_samples', '3'))
    assert snapshot(tmp_path / 'other') == other and sorted(os.listdir(tmp_path / 'other')) == sorted(other)
    assert len(read_mds(str(tmp_path / 'new'))) == 3
    # the same dataset in a bucket, with an object that has nothing to do with MDS beside it
    for name, data in [*other.items(), ('notes.txt', b'keep me')]:
        s3.client().put_object(Bucket=s3.bucket, Key=f'eval/{name}', Body=data)
    refused(run(root, *coco, f's3://{s3.bucket}/eval', '--num_samples', '3', env=s3.child_env()),
            f'--remote s3://{s3.bucket}/eval holds files', 'notes.txt')
    keys = s3.list_keys(s3.bucket, 'eval/')
    assert {k[len('eval/'):]: v for k, v in objects(s3, keys).items()} == {**other, 'notes.txt': b'keep me'}


@pytest.mark.parametrize('kind', ['folder', 's3'])
def test_rerun_over_its_own_output_replaces_it_leaving_no_stale_shard(root, coco_copy, s3, tmp_path, kind):
    data, ann = coco_copy
    if kind == 'folder':
        remote, env = str(tmp_path / 'out'), None

        def listing() -> list[str]:
            return sorted(os.listdir(remote))
    else:
        remote, env = f's3://{s3.bucket}/coco', s3.child_env()

        def listing() -> list[str]:
            return [k[len('coco/'):] for k in s3.list_keys(s3.bucket, 'coco/')]
    ok(run(root, data, ann, remote, '--num_samples', '0', '--size_limit', '20kb', env=env))
    assert len([n for n in listing() if n.startswith('shard.')]) > 3

    if kind == 'folder':  # a rerun that fails mid-way never looks complete, and is rerun later
        order, _, names = annotation(ann)
        bad = data / names[order[-2]]
        good = bad.read_bytes()
        bad.write_bytes(b'GIF89a not a jpeg at all')
        result = run(root, data, ann, remote, '--num_samples', '0', '--size_limit', '20kb')
        assert result.returncode == 2 and f'{bad} is not a JPEG' in result.stderr
        assert [n for n in listing() if not n.startswith('shard.')] == ['convert_coco.json']  # no index
        with pytest.raises(Exception):  # noqa: B017 (whatever streaming raises: there is no dataset)
            read_mds(remote)
        bad.write_bytes(good)
        (tmp_path / 'out' / '.shard.00002.mds.partial').write_bytes(b'half a shard')  # from a kill -9

    ok(run(root, data, ann, remote, '--num_samples', '5', '--compression', 'zstd', env=env))
    if kind == 'folder':
        index = json.loads((tmp_path / 'out' / 'index.json').read_text())
    else:
        index = json.loads(objects(s3, ['coco/index.json'])['coco/index.json'])
    shards = [s['zip_data']['basename'] for s in index['shards']]
    assert listing() == sorted(['convert_coco.json', 'index.json', *shards])  # nothing else is left
    want = published_choice(annotation(ann)[0], 5)
    assert [int(s['image_id']) for s in read_mds(remote, env=s3.env)] == want


Case = tuple[str, list[str], tuple[str, ...]]  # --remote, more flags, words of the error line


def _symlink_to_images(tmp: Path, data: Path, ann: Path) -> Case:
    (tmp / 'link').symlink_to(data)
    return str(tmp / 'link'), [], ('--remote', '--data_path', 'same place or one holds the other')


def _inside_images(tmp: Path, data: Path, ann: Path) -> Case:
    return f'{data}/../{data.name}/./mds', [], ('--remote', '--data_path')


def _annotation_folder(tmp: Path, data: Path, ann: Path) -> Case:
    copy = tmp / 'annotations' / 'captions.json'
    copy.parent.mkdir()
    shutil.copy(ann, copy)
    return f'file://{copy.parent}', ['--annotation_path', str(copy)], ('--remote', '--annotation_path')


def _remote_is_a_file(tmp: Path, data: Path, ann: Path) -> Case:
    (tmp / 'out').write_text('my notes')
    return str(tmp / 'out'), [], (f'--remote {tmp / "out"} is a file, not a folder',)


def _remote_under_a_file(tmp: Path, data: Path, ann: Path) -> Case:
    (tmp / 'notes').write_text('my notes')
    return str(tmp / 'notes' / 'out'), [], (f'cannot create --remote {tmp / "notes" / "out"}',)


@pytest.mark.parametrize('case', [_symlink_to_images, _inside_images, _annotation_folder, _remote_is_a_file,
                                  _remote_under_a_file])
def test_remote_that_overlaps_the_input_or_is_a_file_is_refused(root, coco_copy, tmp_path, case):
    data, ann = coco_copy
    before = snapshot(tmp_path)
    remote, flags, words = case(tmp_path, data, ann)
    refused(run(root, data, ann, remote, '--num_samples', '3', *flags), *words)
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before  # the input is intact
    assert not (tmp_path / 'out').is_dir() and not (data / 'mds').exists()
    assert not [p for p in tmp_path.rglob('*') if p.name in ('convert_coco.json', '.convert_coco.partial')]


def _truncate(data: Path, ann: Path) -> str:
    ann.write_text(ann.read_text()[:5000])
    return f'{ann} is not valid JSON: '


def _no_images(data: Path, ann: Path) -> str:
    ann.write_text(json.dumps({'annotations': []}))
    return f'{ann} has no "images" list'


def _unknown_image(data: Path, ann: Path) -> str:
    doc = json.loads(ann.read_text())
    doc['annotations'][3]['image_id'] = 999_999_999
    ann.write_text(json.dumps(doc))
    return f'{ann}: annotations[3]: image_id 999999999 is not in the "images" list'


def _caption_not_text(data: Path, ann: Path) -> str:
    doc = json.loads(ann.read_text())
    doc['annotations'][0]['caption'] = None
    ann.write_text(json.dumps(doc))
    return f'{ann}: annotations[0]: "caption" should be str, got None'


def _missing_files(data: Path, ann: Path) -> str:
    for p in sorted(data.iterdir())[:7]:
        p.unlink()
    return 'annotated images are missing in'


def _no_data_path(data: Path, ann: Path) -> str:
    shutil.rmtree(data)
    return f'image folder not found: {data}'


def _no_annotation(data: Path, ann: Path) -> str:
    ann.unlink()
    return f'annotation file not found: {ann}'


@pytest.mark.parametrize('damage', [_truncate, _no_images, _unknown_image, _caption_not_text,
                                    _missing_files, _no_data_path, _no_annotation])
def test_bad_input_gives_one_clear_line_and_writes_nothing(root, coco_copy, tmp_path, damage):
    data, ann = coco_copy
    message = damage(data, ann)
    result = run(root, data, ann, str(tmp_path / 'out'), '--num_samples', '0')
    assert result.returncode != 0
    assert message in result.stderr and 'Traceback' not in result.stderr
    assert not (tmp_path / 'out').exists()
    if damage is _missing_files:  # lists the first few, says how many more (and the way out)
        line = result.stderr.strip().splitlines()[-1]
        assert line.count('COCO_val2014_') == 5 and 'and ' in line and '--skip_missing' in line


def test_asking_for_more_images_than_exist_fails_instead_of_changing_the_set(root, coco, tmp_path):
    data, ann = coco
    result = run(root, data, ann, str(tmp_path / 'out'))  # default: the 10,000-image subset
    assert result.returncode != 0
    assert f'--num_samples 10000 asks for more images than the annotation has captioned images ' \
           f'({N_IMAGES})' in result.stderr
