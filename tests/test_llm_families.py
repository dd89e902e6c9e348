"""precompute_latents.py for the families whose text encoder is a language model (Z-Image, Lumina-Image 2.0,
Qwen-Image, SANA, FLUX.2) or a masked T5 (Chroma): each stored text column, read back with
StreamingDataset, equals what that pipeline's own `encode_prompt` returns for each caption key's captions,
including a caption longer than the encoder's tokens, an empty one and non-ASCII text; variable-length
columns hold exactly the rows under the mask and their count.

Model folders are tiny but real (tests/testbed/llm_families.py); every run is in-process, once per module.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_latent_families import read_back
from test_precompute_latents import ok, refused, run
from testbed.corpus import make_jpeg
from testbed.families import CLIP_L, write_clip
from testbed.llm_families import OWN_VAES, PIPELINES, build_llm_family, pipeline_of, write_openclip
from testbed.mds_input import UNBUCKETED, VLM_COLUMNS, make_row, with_vlm_captions, write_mds_input
from testbed.models import write_clip_tokenizer
from testbed.readback import read_mds
from testbed.scripts import load_script, one_torch_thread, run_main

LONG = 'big old house on the beach at sunset with people ' * 120  # past every encoder's tokens (1058 at most)
CAPTIONS = ['a photo of a red cat', '', LONG, 'déjà vu: ein Café, 猫が好き, ÜBER ÄRGER',
            'a dog [IMG] on a[IMG]mat']  # FLUX.2's format_input cuts '[IMG]' (Pixtral's image token)
VLM_CAPTIONS = ['The image shows a small red cat on the beach. ' * 3, 'Ölgemälde', '', 'tree 42', LONG]
KEYS = ('caption', 'vlm_caption')
SAID: dict[str, list[str]] = {}  # family: what transformers logged during its run (the user's console)


class Said(logging.Handler):
    """The messages of transformers' loggers, kept."""

    def __init__(self, messages: list[str]):
        super().__init__()
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_in_process(*args) -> None:
    """The script's main() on this command line, in this process, which must succeed."""
    code, _, err = run_main('precompute_latents.py', *args)
    assert code == 0, err[-3000:]


def command(root: Path, folder: Path, out: Path, *extra) -> list:
    """One run's command line over the module's input (several shards: parts to resume)."""
    return ['--local', root / 'mds', '--bucket', UNBUCKETED, '--model_name', folder, '--remote_upload', out,
            '--resolutions', 64, '--batch-size', 3, '--part_size', 2, '--num_workers', 0, '--threads', 1,
            '--dtype', 'float32', '--storage_dtype', 'float32', '--latent_mode', 'mean',
            '--caption_keys', *KEYS, '--summary', out.parent / f'{out.name}.json', *extra]


@pytest.fixture(scope='module')
def outputs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{family: (its model folder, its output dataset)}: one run per family over one small input."""
    root = tmp_path_factory.mktemp('llm-families')
    rows = [make_row(i, make_jpeg(64 + 9 * i, 72, seed=i), f'f{i}.jpg', caption=CAPTIONS[i % 5])
            for i in range(5)]
    write_mds_input(str(root / 'mds'), with_vlm_captions(rows, VLM_CAPTIONS), bucketed=False,
                    size_limit=1 << 13, columns=VLM_COLUMNS)
    done = {}
    for i, family in enumerate(PIPELINES):
        folder = build_llm_family(root / family, family, seed=i)
        said = Said(SAID.setdefault(family, []))
        logging.getLogger('transformers').addHandler(said)
        try:
            run_in_process(*command(root, folder, root / f'out-{family}'))
        finally:
            logging.getLogger('transformers').removeHandler(said)
        done[family] = folder, root / f'out-{family}' / UNBUCKETED
    return done


def pipeline_text(pipe, family: str, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """Per caption, what the pipeline's encode_prompt hands its transformer: the embeddings (only the
    rows the mask keeps where the pipeline returns a list or a padded batch with a mask) and the mask."""
    with torch.inference_mode(), one_torch_thread():
        if family == 'zimage':  # a list of (rows under the mask, width)
            return [{'latents': e.numpy()} for e in pipe.encode_prompt(texts, 'cpu', False)[0]]
        if family == 'qwenimage':  # padded to the longest, with a mask (None: none padded)
            embeds, mask = pipe.encode_prompt(texts, 'cpu')
            n = mask.sum(1) if mask is not None else [embeds.shape[1]] * len(texts)
            return [{'latents': e[:k].numpy(), 'tail': e[k:].numpy()} for e, k in zip(embeds, n)]
        if family == 'flux2':  # padded, several layers side by side; no mask
            return [{'latents': e.numpy()} for e in pipe.encode_prompt(texts, device='cpu')[0]]
        if family == 'lumina2':
            embeds, mask = pipe.encode_prompt(texts, False, device='cpu')[:2]
        elif family == 'sana':  # with the instruction its __call__ passes by default
            chi = inspect.signature(type(pipe).__call__).parameters['complex_human_instruction'].default
            embeds, mask = pipe.encode_prompt(texts, False, device='cpu', complex_human_instruction=chi)[:2]
        else:  # chroma: (prompt_embeds, text_ids, prompt_attention_mask, ...)
            embeds, _, mask = pipe.encode_prompt(texts, None, device='cpu',
                                                 do_classifier_free_guidance=False)[:3]
        return [{'latents': e.numpy(), 'mask': m.bool().numpy()} for e, m in zip(embeds, mask)]


COLUMNS = {'zimage': {'latents': '_latents'}, 'qwenimage': {'latents': '_latents'},
           'flux2': {'latents': '_latents'}, 'sana': {'latents': '_latents', 'mask': '_mask'},
           'lumina2': {'latents': '_latents', 'mask': '_mask'},
           'chroma': {'latents': '_t5_latents', 'mask': '_t5_mask'}}


@pytest.mark.parametrize('family', list(PIPELINES))
def test_text_columns_equal_the_pipelines_encode_prompt(family, outputs):
    folder, out = outputs[family]
    convention = json.loads((out / 'convention.json').read_text())
    assert convention['family'] == family
    columns = convention['columns']
    got = read_mds(str(out))
    pipe = pipeline_of(folder, family)
    variable = family in ('zimage', 'qwenimage')
    for key in KEYS:
        texts = [s[key] for s in got]
        assert {LONG, ''} <= set(texts)
        want = pipeline_text(pipe, family, texts)
        for i, sample in enumerate(got):
            for part, suffix in COLUMNS[family].items():
                name = key + suffix
                if part == 'mask':
                    np.testing.assert_array_equal(np.frombuffer(sample[name], np.bool_), want[i]['mask'],
                                                  err_msg=f'{family} {name} {i}')
                else:
                    np.testing.assert_allclose(read_back(sample[name], columns[name]), want[i]['latents'],
                                               atol=1e-5, rtol=1e-5, err_msg=f'{family} {name} {i}')
            if variable:  # exactly the rows under the mask, and their count
                assert columns[key + '_latents']['shape'][0] == 'n'
                assert sample[key + '_length'] == len(want[i]['latents']) > 0
                assert not want[i].get('tail', np.zeros(0)).any()  # the pipeline's padding: zeros
    summary = json.loads((out.parent.parent / f'out-{family}.json').read_text())
    assert all(n >= 1 for n in summary['truncated_captions']['caption'].values())  # LONG was cut
    image = convention['image_latents']  # the family's own VAE class (an AutoencoderKL: the old record)
    assert image.get('vae_class', 'AutoencoderKL') == OWN_VAES.get(family, 'AutoencoderKL')
    assert all(len(s['latents_64']) for s in got)
    recorded = convention['text_encoders'][0]
    assert recorded['mask_applied'] and (not variable or recorded['variable'])


def test_z_image_loads_its_text_encoder_as_its_pipeline_does_without_a_head(outputs):
    """Z-Image's model_index.json names Qwen3Model, and its text_encoder/ holds no language-model head:
    loaded as Qwen3ForCausalLM it said 'newly initialized: lm_head ... You should probably TRAIN this model'
    on every run and held a head nobody uses (151,936 x 2,560 at full size: 0.78 GB in bfloat16)."""
    _, out = outputs['zimage']
    assert json.loads((out / 'convention.json').read_text())['text_encoders'][0]['class'] == 'Qwen3Model'
    assert not [m for m in SAID['zimage'] if 'newly initialized' in m or 'TRAIN' in m], SAID['zimage']


def test_an_sd35_folder_reads_as_sd3(tmp_path):
    """Stable Diffusion 3.5's model_index.json (stabilityai/stable-diffusion-3.5-large: the SD3 pipeline
    and components, an optional image encoder left out) names StableDiffusion3Pipeline: the sd3 layout,
    whose text encoders and VAE (CLIP-L, CLIP-G, T5-XXL; 16 channels, 1.5305 / 0.0609) SD 3.5 shares."""
    script = load_script('precompute_latents.py')
    (tmp_path / 'model_index.json').write_text(json.dumps({
        '_class_name': 'StableDiffusion3Pipeline', '_diffusers_version': '0.31.0.dev0',
        'feature_extractor': [None, None], 'image_encoder': [None, None],
        'scheduler': ['diffusers', 'FlowMatchEulerDiscreteScheduler'],
        'text_encoder': ['transformers', 'CLIPTextModelWithProjection'],
        'text_encoder_2': ['transformers', 'CLIPTextModelWithProjection'],
        'text_encoder_3': ['transformers', 'T5EncoderModel'], 'tokenizer': ['transformers', 'CLIPTokenizer'],
        'tokenizer_2': ['transformers', 'CLIPTokenizer'], 'tokenizer_3': ['transformers', 'T5TokenizerFast'],
        'transformer': ['diffusers', 'SD3Transformer2DModel'], 'vae': ['diffusers', 'AutoencoderKL']}))
    assert script.pick_family(str(tmp_path), 'auto').name == 'sd3'


@pytest.fixture(scope='module')
def clip_folder(tmp_path_factory) -> Path:
    """A transformers folder (no pipeline): a CLIPTextModel and its tokenizer side by side."""
    folder = tmp_path_factory.mktemp('clip')
    torch.manual_seed(7)
    write_clip(folder, CLIP_L, projection=False)
    write_clip_tokenizer(folder)
    return folder


def test_a_composed_run_says_what_each_column_is(outputs, clip_folder, tmp_path):
    """--text_encoder composes text encoders of other folders with --model_name's VAE: a CLIP from a
    transformers folder (SDXL's CLIP-L recipe: penultimate hidden state and pooled output, no mask) and
    Z-Image's Qwen3 from a pipeline folder's text_encoder/ (tokenizer/ beside it). convention.json names
    each column's recipe, shape and meaning; read back through it, each equals its encoder's output."""
    from transformers import CLIPTextModel, CLIPTokenizer

    zimage = outputs['zimage'][0]
    out = tmp_path / 'out'
    run_in_process('--local', zimage.parent / 'mds', '--bucket', UNBUCKETED, '--model_name', zimage,
                   '--remote_upload', out, '--text_encoder', f'clip-penultimate={clip_folder}',
                   '--text_encoder', f'qwen3-hidden-2={zimage}:text_encoder', '--resolutions', 64,
                   '--batch-size', 3, '--num_workers', 0, '--threads', 1, '--dtype', 'float32',
                   '--storage_dtype', 'float32', '--summary', tmp_path / 'summary.json')
    convention = json.loads((out / UNBUCKETED / 'convention.json').read_text())
    assert convention['family'] == 'composed'
    assert [(e['recipe'], e['folder'], e['subfolder']) for e in convention['text_encoders']] == [
        ('clip-penultimate', str(clip_folder), ''), ('qwen3-hidden-2', str(zimage), 'text_encoder')]
    columns = {c: spec for c, spec in convention['columns'].items() if c.startswith('caption_')}
    assert columns == {
        'caption_clip_penultimate_latents': {'dtype': 'float32', 'shape': [77, 32],
                                             'what': 'clip-penultimate penultimate'},
        'caption_clip_penultimate_pooled': {'dtype': 'float32', 'shape': [32],
                                            'what': 'clip-penultimate pooler_output'},
        'caption_qwen3_hidden_2_latents': {
            'dtype': 'float32', 'shape': ['n', 32], 'length_column': 'caption_qwen3_hidden_2_length',
            'what': 'qwen3-hidden-2 penultimate; only the n rows under the attention mask are stored, as the '
                    'pipeline passes them'},
        'caption_qwen3_hidden_2_length': {'dtype': 'int32', 'shape': [],
                                          'what': 'n of caption_qwen3_hidden_2_latents'}}
    got = read_mds(str(out / UNBUCKETED))
    texts = [s['caption'] for s in got]
    clip, tok = CLIPTextModel.from_pretrained(clip_folder).eval(), CLIPTokenizer.from_pretrained(clip_folder)
    with torch.inference_mode(), one_torch_thread():
        ids = tok(texts, padding='max_length', max_length=77, truncation=True, return_tensors='pt').input_ids
        res = clip(ids, output_hidden_states=True)
    qwen = pipeline_text(pipeline_of(zimage, 'zimage'), 'zimage', texts)
    for i, sample in enumerate(got):
        stored = {c: read_back(sample[c], spec) for c, spec in columns.items() if spec['dtype'] != 'int32'}
        np.testing.assert_allclose(stored['caption_clip_penultimate_latents'], res.hidden_states[-2][i],
                                   atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(stored['caption_clip_penultimate_pooled'], res.pooler_output[i],
                                   atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(stored['caption_qwen3_hidden_2_latents'], qwen[i]['latents'],
                                   atol=1e-5, rtol=1e-5)
        assert sample['caption_qwen3_hidden_2_length'] == len(qwen[i]['latents'])
    summary = json.loads((tmp_path / 'summary.json').read_text())  # the long caption cut by both, by recipe
    assert summary['truncated_captions']['caption'] == {'clip-penultimate (77 tokens)': 1,
                                                        'qwen3-hidden-2 (512 tokens)': 1}


def test_composed_refusals_are_one_line_before_a_model_loads(outputs, clip_folder, tmp_path):
    zimage = outputs['zimage'][0]
    base = ['--local', zimage.parent / 'mds', '--bucket', UNBUCKETED, '--model_name', zimage,
            '--remote_upload', tmp_path / 'out']
    cases = [  # (flags, what the line says)
        (['--text_encoder', f'clip-xxl={clip_folder}'], 'must be RECIPE=FOLDER[:SUBFOLDER] with a recipe of'),
        (['--text_encoder', 'clip-l'], 'must be RECIPE=FOLDER[:SUBFOLDER]'),
        (['--text_encoder', f't5={clip_folder}', '--text_encoder', f't5={clip_folder}'], 'given twice'),
        (['--text_encoder', f't5={clip_folder}', '--family', 'zimage'], 'a composed run has no family'),
        (['--text_encoder', f'clip-g={clip_folder}'],  # a CLIPTextModel where the recipe reads a projection
         f'{clip_folder} holds CLIPTextModel, but the clip-g recipe reads CLIPTextModelWithProjection; give '
         'that folder with the recipe of its encoder (clip-l, clip-penultimate)'),
        (['--text_encoder', f'qwen3-hidden-2={zimage}:text_encoder_2'], f'model folder {zimage} has no '
         'text_encoder_2/'),
        (['--text_encoder', f't5={tmp_path}/no-such-folder'], 'no such folder'),
    ]
    for flags, phrase in cases:
        assert phrase in refused(*base, *flags), flags
    assert not (tmp_path / 'out').exists()


def test_flux2_trimmed_keeps_the_rows_under_the_mask(outputs, tmp_path):
    """FLUX.2's transformer takes the padded Mistral states (the default output above); --t5_storage
    trimmed keeps only the rows under the attention mask, wherever the tokenizer pads, and their count:
    exactly those rows of the padded output."""
    folder, padded_out = outputs['flux2']
    out = tmp_path / 'out'
    run_in_process(*command(folder.parent, folder, out, '--t5_storage', 'trimmed'))
    columns = json.loads((out / UNBUCKETED / 'convention.json').read_text())['columns']
    padded_columns = json.loads((padded_out / 'convention.json').read_text())['columns']
    assert columns['caption_latents']['shape'] == ['n', 96]
    assert 'the pipeline passes the padded rows too' in columns['caption_latents']['what']
    side = pipeline_of(folder, 'flux2').tokenizer.tokenizer.padding_side
    for mine, full in zip(read_mds(str(out / UNBUCKETED)), read_mds(str(padded_out))):
        for key in KEYS:
            n = mine[f'{key}_length']
            rows = read_back(full[f'{key}_latents'], padded_columns[f'{key}_latents'])
            want = rows[len(rows) - n:] if side == 'left' else rows[:n]
            np.testing.assert_array_equal(read_back(mine[f'{key}_latents'], columns[f'{key}_latents']), want)
            assert 0 < n < 512 or mine[key] == LONG


def test_a_language_model_folder_of_either_head_is_accepted(tmp_path):
    """A recipe's folder may hold its class with or without a language-model head (gemma-2-2b is
    Gemma2ForCausalLM, Lumina 2's text encoder Gemma2Model; from_pretrained loads either as the other);
    a CLIP without the projection a recipe reads is still refused."""
    script = load_script('precompute_latents.py')
    (tmp_path / 'pipeline' / 'vae').mkdir(parents=True)
    for name, held, accepted in [('gemma2-hidden-2', 'Gemma2ForCausalLM', True), ('t5', 'Qwen3Model', False),
                                 ('qwen3-hidden-2', 'Qwen3Model', True), ('clip-g', 'CLIPTextModel', False)]:
        folder = tmp_path / held
        folder.mkdir(exist_ok=True)
        (folder / 'config.json').write_text(json.dumps({'architectures': [held]}))
        (folder / 'tokenizer.json').write_text('{}')  # a fast tokenizer's file: the class alone is checked
        family = script.composed([(name, str(folder), '')])
        if accepted:
            script.check_model_folder(str(tmp_path / 'pipeline'), family)
        else:
            with pytest.raises(script.UserError, match=f'holds {held}, but'):
                script.check_model_folder(str(tmp_path / 'pipeline'), family)


def test_a_variable_length_output_resumed_equals_the_uninterrupted_one(outputs, tmp_path):
    """Z-Image's output with its later parts lost (as a kill leaves it: no _done, no index) is finished by
    the same command, and every file equals the uninterrupted run's (the _done markers but their times)."""
    folder, full = outputs['zimage']
    out = tmp_path / 'out'
    shutil.copytree(full.parent, out)
    parts = sorted(p for p in (out / UNBUCKETED).iterdir() if p.is_dir())
    assert len(parts) >= 2
    for part in parts[1:]:
        shutil.rmtree(part)
    (out / UNBUCKETED / 'index.json').unlink()
    run_in_process(*command(folder.parent, folder, out))
    out = out / UNBUCKETED
    files = sorted(p.relative_to(full) for p in full.rglob('*') if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob('*') if p.is_file())
    for f in files:
        if f.name != '_done':
            assert (full / f).read_bytes() == (out / f).read_bytes(), f


def test_two_ranks_under_torchrun_write_the_one_process_output(root, outputs, tmp_path):
    """Z-Image (variable-length rows) under `torchrun --nproc_per_node 2`: both ranks take parts, and
    every sample equals the one-process run's byte for byte, text and latent columns alike."""
    folder, single = outputs['zimage']
    out = tmp_path / 'out'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}  # the one-process run's float math: one thread
    ok(run(root, *command(folder.parent, folder, out), env=env, torchrun=2))
    ranks = {json.loads(m.read_text())['rank'] for m in (out / UNBUCKETED).glob('*/_done')}
    assert ranks == {0, 1}
    want, got = read_mds(str(single)), read_mds(str(out / UNBUCKETED))
    assert [s['key'] for s in got] == [s['key'] for s in want] and len(got) == 5
    for a, b in zip(want, got):
        assert a == b
    assert json.loads((out / UNBUCKETED / 'convention.json').read_text()) == \
        json.loads((single / 'convention.json').read_text())


def test_an_openclip_folder_composes_as_its_text_tower_encodes(outputs, tmp_path, monkeypatch):
    """--text_encoder openclip=FOLDER reads OpenCLIP's own folder (open_clip_config.json + weights):
    caption_openclip_latents is the penultimate block's output (SDXL's reading of ViT-bigG, no final norm),
    computed here block by block; caption_openclip_pooled is open_clip's own encode_text (projected)."""
    import open_clip

    folder = write_openclip(tmp_path / 'openclip')
    zimage = outputs['zimage'][0]
    out = tmp_path / 'out'
    base = ['--local', zimage.parent / 'mds', '--bucket', UNBUCKETED, '--model_name', zimage,
            '--remote_upload', out]
    run_in_process(*base, '--text_encoder', f'openclip={folder}', '--resolutions', 64, '--batch-size', 3,
                   '--num_workers', 0, '--threads', 1, '--dtype', 'float32', '--storage_dtype', 'float32',
                   '--summary', tmp_path / 'summary.json')
    convention = json.loads((out / UNBUCKETED / 'convention.json').read_text())
    columns = {c: spec for c, spec in convention['columns'].items() if c.startswith('caption_')}
    assert columns == {
        'caption_openclip_latents': {'dtype': 'float32', 'shape': [77, 32], 'what': 'openclip penultimate'},
        'caption_openclip_pooled': {'dtype': 'float32', 'shape': [16], 'what': 'openclip text_embeds'}}
    got = read_mds(str(out / UNBUCKETED))
    model = open_clip.create_model(f'local-dir:{folder}').eval()
    ids = open_clip.get_tokenizer(f'local-dir:{folder}')([s['caption'] for s in got])
    with torch.inference_mode(), one_torch_thread():
        x = model.token_embedding(ids) + model.positional_embedding
        for block in model.transformer.resblocks[:-1]:
            x = block(x, attn_mask=model.attn_mask)
        pooled = model.encode_text(ids)
    for i, sample in enumerate(got):
        for column, want in (('caption_openclip_latents', x[i]), ('caption_openclip_pooled', pooled[i])):
            np.testing.assert_allclose(read_back(sample[column], columns[column]), want, atol=1e-5, rtol=1e-5)
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['truncated_captions']['caption'] == {'openclip (77 tokens)': 1}
    (folder / 'open_clip_model.safetensors').unlink()  # a folder without weights, then no open_clip at all
    assert 'holds no open_clip_model.safetensors' in refused(*base[:-1], tmp_path / 'o2', '--text_encoder',
                                                             f'openclip={folder}')
    monkeypatch.setitem(sys.modules, 'open_clip', None)
    assert 'needs the open_clip module, which is not installed: pip install open-clip-torch' in refused(
        *base[:-1], tmp_path / 'o2', '--text_encoder', f'openclip={folder}')
