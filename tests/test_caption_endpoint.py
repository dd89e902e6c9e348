"""caption_images.py --engine openai as a user runs it, against a real OpenAI-compatible server on 127.0.0.1:
`transformers serve` of the test bed's tiny LLaVA (tests/testbed/openai_server.py), started once for the
module, with faults put around it: a proxy that answers 429 with Retry-After, cuts answers short and
refuses one image as a content filter would; a dead endpoint beside it; the server killed mid-run.

Every stored caption is checked against the server's answer for that image sent alone (the openai SDK,
one request per image and prompt) and against `generate` in this process (vlms.direct_captions), for
two prompts (two caption columns), and the in-process engine is checked to write the same columns.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from testbed.mds_input import COLUMNS, UNBUCKETED, rows_for, write_mds_input
from testbed.openai_server import RETRY_AFTER, FaultProxy, TransformersServe, free_port, pixels, png_data_url
from testbed.readback import environ, read_mds
from testbed.scripts import load_script, one_torch_thread, run_main
from testbed.vlms import build_vlm, direct_captions

PROMPTS = {'short': 'Describe this image.', 'long': 'Say what you see in this picture, in detail.'}
NEW_TOKENS = 8
SECRET = 'sk-planted-7f3c9a1e5b2d4c6e8a0f1b3d5e7c9a2b'  # the API key: it must be found nowhere
# corpus rows: small to large JPEGs, alpha PNG, grayscale, CMYK, EXIF-rotated, WebP, and a truncated JPEG
ROWS = (0, 1, 2, 5, 8, 14, 15, 16, 17, 18, 19)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One torch thread here, as the server has (OMP_NUM_THREADS=1): the same float math."""
    with one_torch_thread():
        yield


@pytest.fixture(scope='module')
def script():
    return load_script('caption_images.py')


@pytest.fixture(scope='module')
def llava(tmp_path_factory) -> Path:
    return build_vlm('llava', tmp_path_factory.mktemp('llava'))


@pytest.fixture(scope='module')
def server(llava, tmp_path_factory):
    with TransformersServe(llava, tmp_path_factory.mktemp('serve') / 'serve.log') as s:
        yield s


@pytest.fixture(scope='module')
def dataset(corpus, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The rows, read in place from <local>/0-1048576 (several shards: parts of 3 samples are 4 parts)."""
    local = tmp_path_factory.mktemp('local')
    rows = [rows_for(list(corpus))[i] for i in ROWS]
    write_mds_input(str(local), rows, bucketed=False, size_limit=1 << 15)
    return local, rows


@pytest.fixture(scope='module')
def pictures(script, dataset) -> dict[str, object]:
    """{key: the picture the decode rule gives} of every decodable row."""
    found = {}
    for row in dataset[1]:
        with contextlib.suppress(OSError):
            found[row['key']] = script.decode(row['jpg'])
    assert len(found) == len(ROWS) - 1
    return found


@pytest.fixture(scope='module')
def served(server, llava, pictures) -> dict[str, list[str]]:
    """{prompt key: the server's answer for each picture sent alone}, through the openai SDK."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key='unused', max_retries=0)
    answers = {}
    for key, prompt in PROMPTS.items():
        answers[key] = []
        for img in pictures.values():
            content = [{'type': 'image_url', 'image_url': {'url': png_data_url(img)}},
                       {'type': 'text', 'text': prompt}]
            stream = client.chat.completions.create(
                model=str(llava), max_tokens=NEW_TOKENS, temperature=0, stream=True,
                messages=[{'role': 'user', 'content': content}])
            answers[key].append(''.join(c.choices[0].delta.content or '' for c in stream if c.choices))
    return answers


def flags(local: Path, out: Path, model: Path, *more, engine: str = 'openai') -> list:
    prompts = [a for key, text in PROMPTS.items() for a in ('--prompt', f'{key}={text}')]
    return ['--local', local, '--bucket', UNBUCKETED, '--remote_upload', out, '--engine', engine,
            '--model_name', model, *prompts, '--max_new_tokens', NEW_TOKENS, '--keep_raw', '--part_size', 3,
            '--batch-size', 2, *(['--concurrency', 4] if engine == 'openai' else []), *more]


def markers(out: Path) -> list[str]:
    return sorted(glob.glob(str(out / '*' / '_done')))


@pytest.fixture(scope='module')
def proxied_run(server, llava, dataset, pictures, tmp_path_factory):
    """A run through the fault proxy, beside a dead endpoint whose URL holds the planted secret as its
    password; the key comes from an environment variable. The proxy refuses the alpha PNG, and answers 500
    to every request for one JPEG until the first run has ended; the same command then finishes."""
    local, rows = dataset
    out = tmp_path_factory.mktemp('proxied')
    refused = next(r['key'] for r in rows if r['url'].endswith('alpha.png'))
    failing = list(pictures)[4]
    dead = f'http://captioner:{SECRET}@127.0.0.1:{free_port()}/v1'
    first = {}
    faults = {'refuse': {pixels(pictures[refused])}, 'fail': {pixels(pictures[failing])}}
    with FaultProxy(server.url, **faults) as proxy, environ({'TEST_KEY': SECRET}):
        args = flags(local, out, llava, '--endpoint', dead, proxy.url, '--api_key_env', 'TEST_KEY',
                     '--retries', 2, '--price', 1.5, 4, '--summary', out / 'summary.json')
        first['code'], first['stdout'], first['stderr'] = run_main('caption_images.py', *args)
        first['summary'] = json.loads((out / 'summary.json').read_text())
        first['markers'] = {m: Path(m).read_bytes() for m in markers(out / UNBUCKETED)}
        first['index'] = (out / UNBUCKETED / 'index.json').exists()
        first['failed_files'] = [json.loads(f.read_text()) for f in (out / UNBUCKETED).glob('*/_failed')]
        proxy.fail.clear()
        rerun = time.time()
        code, stdout, stderr = run_main('caption_images.py', *args)
    return {'out': out, 'code': code, 'stdout': stdout, 'stderr': stderr, 'proxy': proxy, 'refused': refused,
            'failing': failing, 'first': first, 'rerun': rerun, 'local': local}


# ---- what a user relies on -------------------------------------------------------------------

def test_a_request_that_keeps_failing_leaves_its_part_to_a_rerun_which_does_only_that_part(
        proxied_run, pictures):
    first, proxy = proxied_run['first'], proxied_run['proxy']
    assert first['code'] == 2 and 'Traceback' not in first['stderr'], first['stderr'][-3000:]
    errors = [ln for ln in first['stderr'].splitlines() if ln.startswith('error:')]
    (failed,), = first['summary']['failed_names']['first'].values()
    assert errors == [f"error: parts {failed['part']} (1 of 4) have no _done marker (images failed after "
                      'their retries: 1, named above); rerun the same command']
    assert failed['key'] == proxied_run['failing'] and 'HTTP 500' in failed['reason']
    assert failed['reason'].endswith('(after 2 retries)')
    assert first['summary']['parts_missing'] == [failed['part']] and len(first['markers']) == 3
    assert first['failed_files'] == [[{k: failed[k] for k in ('id', 'key', 'reason')}]]  # named in its part
    where = f"{proxied_run['out'] / UNBUCKETED}/NNNNN/_failed of each part left unfinished"
    assert first['summary']['failed_names']['in'] == where
    assert f"sample {failed['id']} key='{failed['key']}'" in first['stdout']
    assert f'failed   (each named in {where})' in first['stdout']
    assert not first['index']  # no index a reader would take for the whole set
    assert not (proxied_run['out'] / UNBUCKETED / failed['part'] / '_failed').exists()  # gone once done

    # The rerun: the finished parts untouched, and only the unfinished part's images asked for again.
    assert {m: Path(m).read_bytes() for m in first['markers']} == first['markers']
    again = {pixels_of(proxy.bodies[k]) for k, a in proxy.arrivals.items() if a[-1][0] > proxied_run['rerun']}
    part = [o['key'] for o in read_mds(str(proxied_run['out'] / UNBUCKETED / failed['part']))]
    refused = {pixels(pictures[proxied_run['refused']])}  # refused again if it is in that part
    assert again - refused == {pixels(pictures[k]) for k in part} and failed['key'] in part


def test_each_caption_is_the_servers_answer_through_429s_cuts_a_refusal_and_a_dead_endpoint(
        script, proxied_run, served, pictures, llava, dataset):
    run, proxy = proxied_run, proxied_run['proxy']
    assert run['code'] == 0, run['stderr'][-3000:]
    got = read_mds(str(run['out'] / UNBUCKETED))
    keys = list(pictures)
    kept = [i for i, k in enumerate(keys) if k != run['refused']]
    assert [o['key'] for o in got] == [keys[i] for i in kept]  # each image once, in order; none lost
    for key in PROMPTS:
        assert [o[f'{key}_raw'] for o in got] == [served[key][i] for i in kept]
        assert [o[key] for o in got] == [script.clean(served[key][i], script.RULES)[0] for i in kept]
    assert len({o['short_raw'] for o in got}) > len(got) // 2  # the images, not only the prompt, shape them
    rows = {r['key']: r for r in dataset[1]}
    assert all({k: o[k] for k in COLUMNS} == {k: rows[o['key']][k] for k in COLUMNS} for o in got)

    # The faults were met and waited out: a 429's Retry-After, then a cut answer, then the answer.
    faulted = [a for a in proxy.arrivals.values() if a[0][1] == '429']
    assert len(faulted) >= 4
    for arrivals in faulted:
        assert [what for _, what in arrivals][:2] == ['429', 'cut'] and len(arrivals) == 3
        assert arrivals[1][0] - arrivals[0][0] >= RETRY_AFTER
    assert {what for a in proxy.arrivals.values() for _, what in a[-1:]} == {'whole', 'stream', '400'}
    assert sum(what == '500' for a in proxy.arrivals.values() for _, what in a) == 3  # 1 + --retries 2
    assert proxy.auth == {f'Bearer {SECRET}'}  # the key was sent, as a bearer token

    # The refused image is a counted, named skip beside the undecodable one.
    summary = json.loads((run['out'] / 'summary.json').read_text())
    reasons = {s['key']: s['reason'] for m in markers(run['out'] / UNBUCKETED)
               for s in json.loads(Path(m).read_text())['skipped']}  # each named in its part's marker
    assert summary['skipped'] == 2 and 'HTTP 400' in reasons[run['refused']]
    assert 'this image is not allowed' in reasons[run['refused']]
    assert summary['written'] == len(got) and summary['failed'] == 0 and not summary['parts_missing']

    # Token usage as the server reported it (the proxy's whole answers), per part and in sum; the cost.
    whole = proxy.usage.values()
    assert summary['tokens'] == sum(u['completion_tokens'] for u in whole) > 0
    assert summary['prompt_tokens'] == sum(u['prompt_tokens'] for u in whole)
    assert summary['no_usage'] == sum(a[-1][1] == 'stream' for a in proxy.arrivals.values())
    assert summary['cost_usd'] == round((summary['prompt_tokens'] * 1.5 + summary['tokens'] * 4) / 1e6, 4)
    parts = [json.loads(Path(m).read_text()) for m in markers(run['out'] / UNBUCKETED)]
    assert sum(p['tokens'] for p in parts) == summary['tokens'] and len(parts) == 4
    (part,), = [[f['part'] for f in fs] for fs in run['first']['summary']['failed_names']['first'].values()]
    rerun = read_mds(str(run['out'] / UNBUCKETED / part))
    assert run['first']['summary']['speed']['images'] == len(got) - 1  # all but the failing image
    assert summary['speed']['images'] == len(rerun) and summary['speed']['images_per_s'] > 0  # this run's
    assert 'images/s' in run['stdout'] and f'cost ${summary["cost_usd"]:.4f}' in run['stdout']

    # The record: endpoints without credentials, the served model's name, the decoding and the upload.
    record = json.loads((run['out'] / UNBUCKETED / 'captions.json').read_text())
    dead = [e for e in record['about'][0]['endpoints'] if e != proxy.url]
    assert len(dead) == 1 and dead[0].startswith('http://127.0.0.1:') and '@' not in dead[0]
    assert record['about'][0]['served_model'] == f'{llava}@main'
    assert record['settings']['temperature'] == 0 and record['settings']['upload'] == 'png'
    assert record['settings']['prompts'] == PROMPTS and record['counts']['tokens'] == summary['tokens']

    # The planted secret is nowhere: not printed, not in the summary, record, markers or shards.
    assert SECRET not in run['stdout'] + run['stderr']
    for path in [*run['out'].rglob('*'), *run['local'].rglob('*')]:
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_the_server_answers_as_generate_does_here_and_the_in_process_engine_writes_the_same(
        script, served, pictures, dataset, llava, tmp_path):
    """The same picture, the same model, greedy: the server's answer is `generate`'s in this process,
    and the transformers engine, given the same two prompts, writes the same columns."""
    for key, prompt in PROMPTS.items():
        assert served[key] == direct_captions(llava, list(pictures.values()), prompt, NEW_TOKENS)
    local, _ = dataset
    args = flags(local, tmp_path / 'out', llava, engine='transformers')
    code, _, err = run_main('caption_images.py', *args)
    assert code == 0, err[-3000:]
    got = read_mds(str(tmp_path / 'out' / UNBUCKETED))
    assert [o['key'] for o in got] == list(pictures)
    for key in PROMPTS:
        assert [o[f'{key}_raw'] for o in got] == served[key]


def test_server_killed_mid_run_then_two_ranks_finish_equal_to_one_process(root, server, llava, dataset,
                                                                          proxied_run, served, pictures,
                                                                          tmp_path):
    local, _ = dataset
    out = tmp_path / 'out' / UNBUCKETED
    args = flags(local, tmp_path / 'out', llava, '--endpoint', server.url, '--summary', tmp_path / 's.json')

    def kill_after_a_part() -> None:
        deadline = time.time() + 120
        while not markers(out) and time.time() < deadline:
            time.sleep(0.02)
        server.kill()

    watcher = threading.Thread(target=kill_after_a_part, daemon=True)
    watcher.start()
    code, _, stderr = run_main('caption_images.py', *args, '--retries', 2)
    watcher.join()
    finished = {m: Path(m).read_bytes() for m in markers(out)}
    assert code == 2 and 'Traceback' not in stderr, stderr[-3000:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith('error:')]
    assert len(errors) == 1 and 'have no _done marker (every endpoint stopped answering' in errors[0], stderr
    summary = json.loads((tmp_path / 's.json').read_text())
    assert summary['stopped'] and summary['parts_missing'] and 1 <= len(finished) < 4
    assert not (out / 'index.json').exists()

    server.start()  # back, on the same port; the rerun finishes the rest on two ranks
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--']
    proc = subprocess.run([*torchrun, str(root / 'caption_images.py'), *map(str, args)], capture_output=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'}, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {m: Path(m).read_bytes() for m in finished} == finished  # finished parts were not redone
    assert {json.loads(Path(m).read_text())['rank'] for m in markers(out)} >= {0, 1}
    got = read_mds(str(out))
    assert [o['key'] for o in got] == list(pictures)  # every image exactly once
    for key in PROMPTS:
        assert [o[f'{key}_raw'] for o in got] == served[key]
    one_process = read_mds(str(proxied_run['out'] / UNBUCKETED))  # the refused image aside, the same rows
    assert [o for o in got if o['key'] != proxied_run['refused']] == one_process


# ---- the picture sent, and refusals ----------------------------------------------------------

def pixels_of(body: dict) -> str:
    """pixels() of the picture a request sent."""
    return pixels(sent(body['messages'][0]['content'][0]['image_url']['url'])[1])


def sent(url: str):
    from PIL import Image

    head, data = url.split(',', 1)
    return head, Image.open(io.BytesIO(base64.b64decode(data)))


def test_png_sends_exactly_the_decoded_picture_and_jpeg_is_recorded(script, pictures):
    png = script.parse_args(['--remote_upload', 'x'])
    jpeg = script.parse_args(['--remote_upload', 'x', '--engine', 'openai', '--endpoint', 'http://h/v1',
                              '--model_name', 'm', '--upload', 'jpeg:85', '--upload_side', '64'])
    for img in pictures.values():
        head, got = sent(script.data_url(img, png))
        assert head == 'data:image/png;base64' and got.mode == 'RGB' and got.tobytes() == img.tobytes()
        head, got = sent(script.data_url(img, jpeg))
        assert head == 'data:image/jpeg;base64' and max(got.size) == min(64, max(img.size))
    assert script.openai_settings(jpeg) == {'model_name': 'm', 'temperature': 0, 'upload': 'jpeg:85',
                                            'upload_side': 64}


def test_sampling_asks_for_each_images_own_seed(script, server, llava, pictures):
    """--decoding sample sends the seed the transformers engine seeds each sample with: a rerun, in any
    batch or engine, asks for the same caption."""
    args = script.parse_args(['--remote_upload', 'x', '--engine', 'openai', '--endpoint', 'http://h/v1',
                              '--model_name', str(llava), '--decoding', 'sample', '--seed', '5',
                              '--top_p', '0.8'])
    with FaultProxy(server.url) as proxy:
        args.endpoint = [proxy.url]
        client = script.Client(args, script.openai_settings(args))
        reply = client.caption(next(iter(pictures.values())), 7)
    body, = proxy.bodies.values()
    assert body['seed'] == script.sample_seed(5, 7) and (body['temperature'], body['top_p']) == (0.7, 0.8)
    assert isinstance(reply['vlm_caption'], script.Reply)


def refused(*args) -> str:
    """The error line of a command line the script refuses: exit 2, one line, no traceback."""
    code, _, text = run_main('caption_images.py', *args)
    assert code == 2 and 'Traceback' not in text, text[-3000:]
    errors = [ln for ln in text.splitlines() if 'error:' in ln]
    assert len(errors) == 1, text[-3000:]
    return errors[0]


def test_every_refusal_is_one_line(server, llava, dataset, tmp_path):
    local, _ = dataset
    base = ['--local', local, '--bucket', UNBUCKETED, '--remote_upload', tmp_path / 'out']
    dead = f'http://127.0.0.1:{free_port()}/v1'
    cases = [
        (['--engine', 'openai'], '--engine openai needs --endpoint URL'),
        (['--engine', 'openai', '--endpoint', 'ftp://h/v1'], 'an endpoint is the http(s) URL of an API'),
        (['--upload', 'jpeg:0'], 'png (lossless) or jpeg:QUALITY (1-100)'),
        (['--prompt', 'caption=Say it.', '--model_name', llava], 'already has a column caption'),
        (['--engine', 'openai', '--endpoint', server.url], f'{server.url}/models lists 12 models (Menlo/'),
        (['--engine', 'openai', '--endpoint', dead], f'no endpoint answered GET /models ({dead}: '),
        (['--engine', 'openai', '--endpoint', server.url[:-3], '--model_name', llava],
         f'{server.url[:-3]} knows no such path or model: check --endpoint'),
    ]
    for extra, want in cases:
        line = refused(*base, *extra)
        assert want in line and len(line) < 400, (extra, line)
