"""The platform job files: valid for mosaicml-cli, valid bash, and every command line of our
scripts inside them accepted by that script's own argument parser (a renamed flag breaks this)."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from testbed.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted((ROOT / 'mcloud').glob('*.yaml'))
SCRIPTS = {'laion_cloudwriter.py', 'precompute_latents.py', 'convert_coco.py', 'caption_images.py'}
SHELL_SCRIPTS = {'laion_download_all.sh', 'laion_download_aesthetic.sh'}
# The torchvision release built for each torch release a job image may ship.
TORCHVISION_FOR = {'2.5.1': '0.20.1', '2.6.0': '0.21.0', '2.7.0': '0.22.0', '2.7.1': '0.22.1'}


def _expand(text: str, env: dict[str, str]) -> str:
    """$VAR, ${VAR} and ${VAR:-default}, from the job's env_variables (else the default)."""
    def sub(m: re.Match) -> str:
        name, default = m.group(1) or m.group(3), m.group(2)
        return env.get(name, default if default is not None else f'<{name}>')
    return re.sub(r'\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)', sub, text)


def script_invocations(job: dict) -> list[tuple[str, list[str]]]:
    """(script, argv) for every line of the job's command that runs one of our scripts."""
    command = job['command'].replace('\\\n', ' ')
    found = []
    for line in command.splitlines():
        tokens = shlex.split(_expand(line, job.get('env_variables', {})), comments=True)
        tokens = [t for t in tokens if t not in ('&', '&&')]
        for i, tok in enumerate(tokens):
            if tok in SCRIPTS | SHELL_SCRIPTS:
                found.append((tok, tokens[i + 1:]))
    return found


def parse_with_script(script: str, argv: list[str]):
    """Run the script's own parse_args() on argv (SystemExit on a bad flag)."""
    module = load_script(script)
    old = sys.argv
    sys.argv = [script, *argv]
    try:
        return module.parse_args()
    finally:
        sys.argv = old


def test_there_are_both_jobs():
    assert {p.name for p in JOBS} == {'laion2b-en-interactive.yaml', 'precompute-latents.yaml',
                                      'caption-images.yaml', 'caption-images-vllm.yaml'}


@pytest.mark.parametrize('path', JOBS, ids=lambda p: p.name)
def test_job_validates_with_mcli_offline(path):
    from mcli.models.run_config import FinalRunConfig, RunConfig

    with warnings.catch_warnings():
        warnings.simplefilter('error')  # unknown fields are only warnings in mcli: make them fail
        final = FinalRunConfig.finalize_config(RunConfig.from_file(path))
    api = final.to_create_run_api_input()['runInput']
    assert api['command'].strip() and api['image']
    text = path.read_text()
    assert 'CHANGE-ME' in text  # placeholders are marked
    assert not re.search(r'(?i)(aws_secret_access_key|aws_access_key_id)\s*:', text)  # no credentials


@pytest.mark.parametrize('path', JOBS, ids=lambda p: p.name)
def test_job_command_is_valid_bash(path):
    job = yaml.safe_load(path.read_text())
    subprocess.run(['bash', '-n'], input=job['command'], text=True, check=True)


@pytest.mark.parametrize('path', JOBS, ids=lambda p: p.name)
def test_every_script_line_is_accepted_by_its_parser(path):
    job = yaml.safe_load(path.read_text())
    calls = script_invocations(job)
    assert calls, 'the job runs none of our scripts'
    for script, argv in calls:
        assert (ROOT / script).exists(), script
        if script.endswith('.py'):
            parse_with_script(script, argv)  # raises SystemExit(2) on an unknown or bad flag


def test_parser_check_catches_a_renamed_flag():
    with pytest.raises(SystemExit):
        parse_with_script('laion_cloudwriter.py', ['--local', '/tmp/x', '--remote', '/tmp/y',
                                                   '--no_such_flag'])


def test_download_job_runs_both_steps_and_fails_if_either_fails():
    job = yaml.safe_load((ROOT / 'mcloud' / 'laion2b-en-interactive.yaml').read_text())
    scripts = [s for s, _ in script_invocations(job)]
    assert 'laion_cloudwriter.py' in scripts
    assert SHELL_SCRIPTS & set(scripts)
    assert 'set -euo pipefail' in job['command'] and 'wait' in job['command']
    assert not job['compute'].get('gpus')


def test_latents_job_uses_torchrun_on_8_gpus():
    job = yaml.safe_load((ROOT / 'mcloud' / 'precompute-latents.yaml').read_text())
    assert job['compute']['gpus'] == 8
    assert re.search(r'torchrun .*--nproc_per_node 8', job['command'].replace('\\\n', ' '))
    assert '-- precompute_latents.py' in job['command']


def test_captions_job_uses_torchrun_on_8_gpus():
    job = yaml.safe_load((ROOT / 'mcloud' / 'caption-images.yaml').read_text())
    assert job['compute']['gpus'] == 8
    assert re.search(r'torchrun .*--nproc_per_node 8', job['command'].replace('\\\n', ' '))
    assert '-- caption_images.py' in job['command']


def test_vllm_captions_job_starts_the_server_waits_captions_and_stops_it():
    """vLLM in an environment of its own (it needs transformers >= 5), started in the background on
    127.0.0.1; the job waits until /v1/models answers (or stops if the server died), then captions through
    that endpoint on 8 ranks, and a trap stops the server however the job ends."""
    job = yaml.safe_load((ROOT / 'mcloud' / 'caption-images-vllm.yaml').read_text())
    command = job['command'].replace('\\\n', ' ')
    venv = re.search(r'^python -m venv (\S+)$', command, re.M)[1]
    assert f'{venv}/bin/pip install --quiet "vllm==$VLLM_VERSION"' in command
    assert re.fullmatch(r'\d+\.\d+\.\d+', job['env_variables']['VLLM_VERSION'])
    serve = re.search(rf'^{venv}/bin/vllm serve "\$MODEL_NAME" --host 127\.0\.0\.1 --port (\d+) .*'
                      r'--data-parallel-size 8 .*&$', command, re.M)
    assert serve and job['compute']['gpus'] == 8
    assert re.search(r'^SERVER=\$!$', command, re.M)
    assert re.search(r'^trap .*kill "\$SERVER".* EXIT$', command, re.M)
    wait = re.search(rf'until curl -sf http://127\.0\.0\.1:{serve[1]}/v1/models .*kill -0 "\$SERVER"',
                     command, re.S)
    (script, argv), = script_invocations(job)
    args = parse_with_script(script, argv)
    assert args.engine == 'openai' and args.endpoint == [f'http://127.0.0.1:{serve[1]}/v1']
    assert args.model_name == job['env_variables']['MODEL_NAME']
    assert serve.start() < wait.start() < command.index('-- caption_images.py')
    assert re.search(r'torchrun --nproc_per_node 8 -- caption_images\.py', command)


def image_torch(job: dict) -> tuple[str, str]:
    """(torch, python) versions of the job's mosaicml/pytorch image, read from its tag."""
    m = re.fullmatch(r'mosaicml/pytorch:(\d+\.\d+\.\d+)_cu\d+-python(3\.\d+)-ubuntu\d+\.\d+', job['image'])
    assert m, f'not a mosaicml/pytorch image tag: {job["image"]}'
    return m[1], m[2]


def torch_requirements(python: str) -> list[tuple[str, Requirement]]:
    """Every torch/torchvision requirement of the pinned packages (other than those two) and of
    everything they depend on, as installed here, with markers evaluated for `python`. A package's
    `torch` extra counts (diffusers and transformers state their torch minimum only there); what it
    adds beyond torch, and is not installed here, is not followed."""
    env = {**default_environment(), 'python_version': python, 'python_full_version': f'{python}.0'}
    pins = [Requirement(line).name for line in (ROOT / 'requirements.txt').read_text().splitlines()
            if line.strip() and not line.startswith('#')]
    todo = [p for p in pins if p not in ('torch', 'torchvision')]
    seen, found = set(), []
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            assert name not in map(canonicalize_name, pins), f'{name} is pinned but not installed'
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({**env, 'extra': e}) for e in ('', 'torch')):
                continue
            if canonicalize_name(req.name) in ('torch', 'torchvision'):
                found.append((name, req))
            else:
                todo.append(req.name)
    return found


@pytest.mark.parametrize('path', JOBS, ids=lambda p: p.name)
def test_job_keeps_the_image_torch_which_every_other_pin_accepts(path, tmp_path):
    job = yaml.safe_load(path.read_text())
    torch, python = image_torch(job)
    assert f'# The job uses the image\'s torch: {torch}' in path.read_text()  # the file says why
    # The job's own line that drops the torch pins from requirements.txt, run on a copy of it.
    drop = next(line for line in job['command'].splitlines() if 'requirements.txt' in line and 'grep' in line)
    (tmp_path / 'requirements.txt').write_text((ROOT / 'requirements.txt').read_text())
    subprocess.run(['bash', '-c', drop.replace('/tmp/', f'{tmp_path}/')], cwd=tmp_path, check=True)
    kept = (tmp_path / 'requirements-job.txt').read_text().splitlines()
    pins = (ROOT / 'requirements.txt').read_text().splitlines()
    assert kept == [p for p in pins if not re.match(r'(torch|torchvision)\b', p)]
    # pip installs the rest with torch and torchvision held at what the image has
    assert re.search(r'^  pip install --quiet -r /tmp/requirements-job\.txt -c /tmp/image-torch\.txt$',
                     path.read_text(), re.M)
    assert not re.search(r'pip install[^\n]* -r requirements\.txt', job['command'])
    assert 'import torch, torchvision' in job['command'] and '> /tmp/image-torch.txt' in job['command']
    versions = {'torch': torch, 'torchvision': TORCHVISION_FOR[torch]}
    needs = torch_requirements(python)
    assert {n for n, _ in needs} >= {'mosaicml-streaming', 'diffusers', 'transformers'}  # it sees them
    for name, req in needs:
        assert req.specifier.contains(versions[canonicalize_name(req.name)], prereleases=True), \
            f'{name} needs {req}, the image has {req.name} {versions[canonicalize_name(req.name)]}'
