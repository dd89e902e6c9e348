"""precompute_latents.py for each model family: the stored columns equal what diffusers' own pipeline of
that family computes (`encode_prompt`, and the VAE with its scaling and shift), the output says how it
was made (convention.json), and resuming, torchrun and bad input behave as for SD-2.

Model folders are tiny but real (tests/testbed/families.py), built once for this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_precompute_latents import (
    kill9_after_first_part,
    markers,
    ok,
    reference_pixels,
    refused,
    run,
)
from testbed.corpus import make_jpeg
from testbed.families import build_tiny_family, pipeline_of, write_t5
from testbed.mds_input import UNBUCKETED, VLM_COLUMNS, make_row, with_vlm_captions, write_mds_input
from testbed.readback import read_mds
from testbed.scripts import one_torch_thread

CAPTIONS = ['a photo of a red cat', '', 'big old house on the beach at sunset with people ' * 12,
            'painting of a city street at night', 'a dog', 'tree 42']
# Dense captions, as a vision-language model writes them: past CLIP's 77 tokens, and past T5's 256 / 512.
VLM_CAPTIONS = ['The image shows a small red cat on the beach at sunset, with people in the street. ' * 3,
                'a big old house with a green tree under a blue sky on a city street at night ' * 9,
                'a portrait painting of a new yellow car named number one on the beach ' * 60,
                'a dog', '', 'the sky']
KEYS = ('caption', 'vlm_caption')


@pytest.fixture(scope='module')
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('families')
    return {f: build_tiny_family(root / f, f, seed=i) for i, f in enumerate(('sdxl', 'sd3', 'flux'))}


def family_rows(n: int = 6) -> list[dict]:
    """Photo-like JPEGs with shorter sides 64-140 px (some below 128), captions long, short and empty."""
    rows = []
    for i in range(n):
        s = (64, 100, 140)[i % 3]
        rows.append(make_row(i, make_jpeg(s + 9 * i, s, seed=50 + i), f'f{i}.jpg', caption=CAPTIONS[i % 6]))
    return rows


@pytest.fixture(scope='module')
def family_input(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('family-input')
    write_mds_input(str(folder), with_vlm_captions(family_rows(), VLM_CAPTIONS), bucketed=False,
                    size_limit=1 << 14, columns=VLM_COLUMNS)
    return folder


def args_for(data: Path, model: Path, out: Path | None, tmp: Path, *extra) -> list:
    """The command line of one run (without --local and --remote_upload when `out` is None)."""
    where = ['--local', tmp / 'cache', '--remote_upload', out] if out else []
    return ['--remote_download', data, '--bucket', UNBUCKETED, *where, '--model_name', model,
            '--resolutions', 64, 128, '--batch-size', 4, '--part_size', 3, '--num_workers', 1,
            '--summary', tmp / 'summary.json', *extra]


def read_back(blob: bytes, spec: dict) -> np.ndarray:
    """A column as docs/precompute_latents.md's read-back snippet reads it (bfloat16: raw 16 bits,
    widened)."""
    if spec['dtype'] == 'bfloat16':
        arr = (np.frombuffer(blob, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        arr = np.frombuffer(blob, np.dtype(spec['dtype']))
    return arr.reshape([-1 if d == 'n' else d for d in spec['shape']]).astype(np.float32)


def pipeline_text(folder: Path, family: str, captions: list[str]) -> dict[str, np.ndarray]:
    """prompt_embeds and pooled_prompt_embeds from diffusers' pipeline of the family."""
    pipe = pipeline_of(folder, family)
    with torch.inference_mode(), one_torch_thread():
        if family == 'flux':
            embeds, pooled, _ = pipe.encode_prompt(captions, device='cpu')
        else:
            extra = [None] if family == 'sd3' else []
            out = pipe.encode_prompt(captions, None, *extra, device='cpu', do_classifier_free_guidance=False)
            embeds, pooled = out[0], out[2]
    return {'prompt_embeds': embeds.numpy(), 'pooled_prompt_embeds': pooled.numpy()}


def assemble(sample: dict, columns: dict, family: str, key: str = 'caption') -> dict[str, np.ndarray]:
    """The pipeline's outputs from the stored columns of caption `key` (named `<key>_...`), as
    docs/precompute_latents.md documents for each family."""
    col = {k: read_back(sample[k], s) for k, s in columns.items() if s['dtype'] != 'int32' and sample[k]}
    if family == 'sd3':
        clip, t5 = col[f'{key}_clip_latents'], col[f'{key}_t5_latents']
        clip = np.pad(clip, ((0, 0), (0, t5.shape[1] - clip.shape[1])))
        return {'prompt_embeds': np.concatenate([clip, t5]), 'pooled_prompt_embeds': col[f'{key}_pooled']}
    latents = f'{key}_latents' if family == 'sdxl' else f'{key}_t5_latents'
    return {'prompt_embeds': col[latents], 'pooled_prompt_embeds': col[f'{key}_pooled']}


def captions_cut(folder: Path, convention: dict, texts: list[str]) -> dict[str, int]:
    """How many of `texts` each text encoder's tokenizer cuts at its length (its tokens, specials included,
    beyond the convention's `tokens`), keyed as the summary names the encoders."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    cut = {}
    for i, enc in enumerate(convention['text_encoders']):
        cls = T5TokenizerFast if enc['class'] == 'T5EncoderModel' else CLIPTokenizer
        tok = cls.from_pretrained(folder, subfolder='tokenizer' if i == 0 else f'tokenizer_{i + 1}')
        cut[f'{enc["subfolder"]} ({enc["tokens"]} tokens)'] = sum(
            len(tok(t, verbose=False).input_ids) > enc['tokens'] for t in texts)
    return cut


@pytest.mark.parametrize('family', ['sdxl', 'sd3', 'flux'])
def test_stored_columns_equal_the_family_pipeline(family, root, folders, family_input, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / 'out'
    ok(run(root, *args_for(family_input, folders[family], out, tmp_path, '--latent_mode', 'mean',
                           '--storage_dtype', 'float32', '--dtype', 'float32', '--text_batch_size', 3,
                           '--caption_keys', *KEYS)))
    got = read_mds(str(out / UNBUCKETED))
    convention = json.loads((out / UNBUCKETED / 'convention.json').read_text())
    assert convention['family'] == family and convention['storage_dtype'] == 'float32'
    assert convention['caption_keys'] == list(KEYS)
    columns = convention['columns']
    summary = json.loads((tmp_path / 'summary.json').read_text())

    # Text, for each caption key: what diffusers' own encode_prompt computes for that key's texts; the
    # summary counts the captions each encoder cut at its length.
    for key in KEYS:
        texts = [s[key] for s in got]
        want = pipeline_text(folders[family], family, texts)
        for i, sample in enumerate(got):
            mine = assemble(sample, columns, family, key)
            for k in want:
                np.testing.assert_allclose(mine[k], want[k][i], atol=1e-5, rtol=1e-5,
                                           err_msg=f'{family} {key} {k} {i}')
        assert summary['truncated_captions'][key] == captions_cut(folders[family], convention, texts)
    assert all(summary['truncated_captions']['vlm_caption'].values())  # every encoder cut some

    # Image latents: (mean - shift) * scale of the VAE, with 16 channels where the family has them; b''
    # below a resolution.
    vae = AutoencoderKL.from_pretrained(folders[family], subfolder='vae').eval()
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    image = convention['image_latents']
    assert (image['scaling_factor'], image['shift_factor']) == (scale, shift)
    assert image['latent_mode'] == 'mean' and image['scaled']
    assert columns['latents_64']['shape'] == [16 if family != 'sdxl' else 4, 8, 8]
    with torch.inference_mode(), one_torch_thread():
        for sample in got:
            short = min(sample['width'], sample['height'])
            assert (sample['latents_128'] == b'') == (short < 128)
            for res in [r for r in (64, 128) if r <= short]:
                x = reference_pixels(sample['jpg'], res, [64, 128])
                ref = ((vae.encode(x).latent_dist.mean - shift) * scale)[0].numpy()
                lat = read_back(sample[f'latents_{res}'], columns[f'latents_{res}'])
                np.testing.assert_allclose(lat, ref, atol=1e-4, rtol=1e-4)

    # The summary states the bytes each sample gained, which the convention's shapes predict.
    per_sample = sum(len(s[c]) for s in got for c in columns) / len(got)
    assert summary['family'] == family and summary['latent_bytes_per_sample'] == round(per_sample, 1)


def test_sd2_caption_latents_equal_stable_diffusion_pipeline(root, tiny_model, family_input, tmp_path):
    """The SD-2 layout (float16 caption_latents, read as training code reads them) is what
    StableDiffusionPipeline.encode_prompt computes for the same captions, to float16 precision."""
    out = tmp_path / 'out'
    ok(run(root, *args_for(family_input, tiny_model, out, tmp_path, '--dtype', 'float32')))
    got = read_mds(str(out / UNBUCKETED))
    pipe = pipeline_of(tiny_model, 'sd')
    with torch.inference_mode(), one_torch_thread():
        want, _ = pipe.encode_prompt([s['caption'] for s in got], 'cpu', 1, False)
    for i, sample in enumerate(got):
        mine = np.frombuffer(sample['caption_latents'], np.float16).reshape(77, 1024).astype(np.float32)
        np.testing.assert_allclose(mine, want[i].numpy(), atol=2e-3, rtol=2e-3, err_msg=f'caption {i}')


def consumer_reads(sample: dict, caption_key: str = 'caption',
                   text_latent_keys: tuple[str, ...] = ('T5_LATENTS', 'CLIP_LATENTS'),
                   text_latent_shapes: tuple[tuple[int, int], ...] = ((512, 4096), (77, 768)),
                   attention_mask_keys: tuple[str, ...] = ('T5_ATTENTION_MASK', 'CLIP_ATTENTION_MASK'),
                   ) -> dict[str, torch.Tensor]:
    """mosaicml/diffusion's StreamingImageCaptionLatentsDataset.__getitem__ on the text columns, as its
    code does it (diffusion/datasets/image_caption_latents.py in mosaicml/diffusion, commit 49282fd; its
    writer, scripts/t5_precompute.py, stores `.cpu().float().numpy().tobytes()`): for each latent key,
    `np.frombuffer(sample[f'{caption_key}_{key}'], dtype=np.float32)` reshaped to its (seq, width), the
    mask `np.frombuffer(..., dtype=np.bool_)` as float reshaped to (-1,), and with the CLIP latents
    `<caption_key>_CLIP_POOLED_TEXT` as float32 reshaped to (width,). Its keyword defaults are kept; the
    test passes the tiny models' shapes."""
    out = {}
    for i in range(len(text_latent_keys)):
        latent_key = f'{caption_key}_{text_latent_keys[i]}'
        latent_shape = text_latent_shapes[i]
        attention_key = f'{caption_key}_{attention_mask_keys[i]}'
        text_latent = np.frombuffer(sample[latent_key], dtype=np.float32).copy()
        out[text_latent_keys[i]] = torch.from_numpy(text_latent).reshape(latent_shape)
        attention_mask = np.frombuffer(sample[attention_key], dtype=np.bool_).copy()
        out[attention_mask_keys[i]] = torch.from_numpy(attention_mask).to(dtype=torch.float).reshape(-1)
        if 'CLIP_LATENTS' in latent_key:
            clip_pooled = np.frombuffer(sample[f'{caption_key}_CLIP_POOLED_TEXT'], dtype=np.float32).copy()
            out['CLIP_POOLED'] = torch.from_numpy(clip_pooled).reshape(latent_shape[1])
    return out


def test_mosaicml_layout_is_what_its_consumer_reads(root, folders, family_input, tmp_path):
    """The mosaicml output with two caption keys, read by its consumer's own steps (consumer_reads, with
    its `caption_keys`), is for each key the T5 encoder run with its mask, CLIP-L's penultimate hidden
    state and pooled output run with its mask, all padded to the tokenizer's length; a --storage_dtype
    the consumer cannot read is refused in one line."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    flux = folders['flux']
    out = tmp_path / 'out'
    ok(run(root, *args_for(family_input, flux, out, tmp_path, '--family', 'mosaicml', '--dtype', 'float32',
                           '--caption_keys', *KEYS)))
    got = read_mds(str(out / UNBUCKETED))
    clip = CLIPTextModel.from_pretrained(flux, subfolder='text_encoder').eval()
    clip_tok = CLIPTokenizer.from_pretrained(flux, subfolder='tokenizer')
    t5 = T5EncoderModel.from_pretrained(flux, subfolder='text_encoder_2').eval()
    t5_tok = T5TokenizerFast.from_pretrained(flux, subfolder='tokenizer_2')
    shapes = ((512, t5.config.d_model), (77, clip.config.hidden_size))
    with torch.inference_mode(), one_torch_thread():
        for s, key in [(s, key) for s in got for key in KEYS]:
            read = consumer_reads(s, caption_key=key, text_latent_shapes=shapes)
            t5_in = t5_tok(s[key], padding='max_length', max_length=512, truncation=True,
                           return_tensors='pt')
            clip_in = clip_tok(s[key], padding='max_length', max_length=77, truncation=True,
                               return_tensors='pt')
            assert torch.equal(read['T5_ATTENTION_MASK'], t5_in.attention_mask[0].float())
            assert torch.equal(read['CLIP_ATTENTION_MASK'], clip_in.attention_mask[0].float())
            want = t5(t5_in.input_ids, attention_mask=t5_in.attention_mask)[0][0]
            torch.testing.assert_close(read['T5_LATENTS'], want, atol=1e-5, rtol=1e-5)
            res = clip(clip_in.input_ids, attention_mask=clip_in.attention_mask, output_hidden_states=True)
            torch.testing.assert_close(read['CLIP_LATENTS'], res.hidden_states[-2][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(read['CLIP_POOLED'], res.pooler_output[0], atol=1e-5, rtol=1e-5)
    convention = json.loads((out / UNBUCKETED / 'convention.json').read_text())
    assert convention['storage_dtype'] == 'float32'
    assert [c for c in convention['columns'] if not c.startswith('latents_')] == [  # the text columns
        f'{key}_{name}' for key in KEYS for name in ('T5_LATENTS', 'T5_ATTENTION_MASK', 'CLIP_LATENTS',
                                                     'CLIP_ATTENTION_MASK', 'CLIP_POOLED_TEXT')]
    # A dtype its consumer cannot read is refused before anything is written.
    assert 'mosaicml layout is read as float32' in refused(*args_for(
        family_input, flux, tmp_path / 'o2', tmp_path, '--family', 'mosaicml', '--storage_dtype', 'float16'))
    assert not (tmp_path / 'o2').exists()


def test_trimmed_t5_killed_and_resumed_equals_an_uninterrupted_run(root, folders, tmp_path):
    """Trimmed T5 rows survive kill -9 and resume (two ranks are test_precompute_latents')."""
    rows = family_rows(18)
    write_mds_input(str(tmp_path / 'mds'), rows, bucketed=False, size_limit=1 << 13)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    common = args_for(tmp_path / 'mds', folders['flux'], None, tmp_path, '--t5_storage', 'trimmed',
                      '--storage_dtype', 'bfloat16', '--seed', 3, '--batch-size', 2)
    ok(run(root, *common, '--local', tmp_path / 'c1', '--remote_upload', tmp_path / 'ref', env=env))

    out = tmp_path / 'out' / UNBUCKETED
    kill9_after_first_part(root, common, tmp_path / 'c2', tmp_path / 'out', out, env)
    assert 1 <= len(markers(out)) < 6
    ok(run(root, *common, '--local', tmp_path / 'c2', '--remote_upload', tmp_path / 'out', env=env))
    ref, got = read_mds(str(tmp_path / 'ref' / UNBUCKETED)), read_mds(str(out))
    assert [s['key'] for s in got] == [r['key'] for r in rows]  # each sample once, in order
    assert ref == got

    # Trimmed T5 rows: n = the caption's tokens (with </s>); padded again with zeros on read-back, the
    # first n rows are the pipeline's.
    columns = json.loads((out / 'convention.json').read_text())['columns']
    assert columns['caption_t5_latents']['shape'][0] == 'n'
    want = pipeline_text(folders['flux'], 'flux', [s['caption'] for s in got])
    for i, s in enumerate(got):
        n = s['caption_t5_length']
        t5 = read_back(s['caption_t5_latents'], columns['caption_t5_latents'])
        assert t5.shape[0] == n < 512 and n >= 1
        padded = np.zeros((512, t5.shape[1]), np.float32)
        padded[:n] = t5
        np.testing.assert_allclose(padded[:n], want['prompt_embeds'][i][:n], atol=3e-2, rtol=1e-2)
    assert len(got[1]['caption_t5_latents']) < len(got[2]['caption_t5_latents'])  # '' vs a long caption

    # Resuming into it with another convention is refused in one line.
    assert 'storage_dtype' in refused(*common, '--local', tmp_path / 'c2', '--remote_upload',
                                      tmp_path / 'out', '--storage_dtype', 'float16')


def linked(src: Path, dst: Path, skip: set[str]) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.name not in skip:
            (dst / p.name).symlink_to(p)
    return dst


@pytest.mark.parametrize('case, phrase', [
    ('unknown_family', "argument --family: invalid choice: 'sd4' (choose from 'auto', 'sd', 'sdxl'"),
    ('no_text_encoder_2', 'has no text_encoder_2/'),
    ('no_model_index', 'pass --family'),
    ('unknown_pipeline', "names 'KandinskyPipeline'"),
    ('tokenizer_mismatch', 'does not belong to that text encoder'),
    # a flag that contradicts the folder, or that the family cannot apply, is refused, not ignored
    ('sd_on_sdxl', '--family sd: ' + '{sdxl}/model_index.json names StableDiffusionXLPipeline, but the sd '
                   'layout is that of StableDiffusionPipeline'),
    ('flux_on_sdxl_folder', 'text_encoder_2/ holds CLIPTextModelWithProjection, but the flux layout expects '
                            'T5EncoderModel there'),
    ('trimmed_without_t5', '--t5_storage trimmed: the sdxl layout has no T5 encoder'),
    ('trimmed_mosaicml', '--t5_storage trimmed: the mosaicml layout stays padded'),
    ('t5_max_length_without_t5', '--t5_max_length 64: the sdxl layout has no T5 encoder'),
])
def test_family_errors_are_one_line(case, phrase, root, folders, family_input, tmp_path):
    flux, sdxl, extra = folders['flux'], folders['sdxl'], []
    phrase = phrase.format(sdxl=sdxl)
    if case == 'unknown_family':
        model, extra = flux, ['--family', 'sd4']
    elif case == 'sd_on_sdxl':
        model, extra = sdxl, ['--family', 'sd']
    elif case == 'flux_on_sdxl_folder':  # no model_index.json to contradict: the encoders' classes do
        model, extra = linked(sdxl, tmp_path / 'm', {'model_index.json'}), ['--family', 'flux']
    elif case == 'trimmed_without_t5':
        model, extra = sdxl, ['--t5_storage', 'trimmed']
    elif case == 'trimmed_mosaicml':
        model, extra = flux, ['--family', 'mosaicml', '--t5_storage', 'trimmed']
    elif case == 't5_max_length_without_t5':
        model, extra = sdxl, ['--t5_max_length', 64]
    elif case == 'no_text_encoder_2':
        model = linked(flux, tmp_path / 'm', {'text_encoder_2'})
    elif case == 'no_model_index':
        model = linked(flux, tmp_path / 'm', {'model_index.json'})
    elif case == 'unknown_pipeline':
        model = linked(flux, tmp_path / 'm', {'model_index.json'})
        (model / 'model_index.json').write_text(json.dumps({'_class_name': 'KandinskyPipeline'}))
    else:  # a T5 whose embedding table is smaller than its tokenizer's vocabulary
        model = linked(flux, tmp_path / 'm', {'text_encoder_2'})
        write_t5(model / 'text_encoder_2', 50)
    assert phrase in refused(*args_for(family_input, model, tmp_path / 'out', tmp_path, *extra))
    assert not (tmp_path / 'out').exists()


def test_vae_overflowing_in_float16_falls_back_to_float32_and_is_counted(root, folders, family_input,
                                                                         tmp_path):
    """An SDXL VAE gives NaN in float16; here one whose first convolution overflows float16 stands in."""
    from diffusers import AutoencoderKL

    model = linked(folders['sdxl'], tmp_path / 'm', {'vae'})
    vae = AutoencoderKL.from_pretrained(folders['sdxl'], subfolder='vae').eval()
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e6)  # weights beyond float16's range: inf, then NaN
    vae.save_pretrained(model / 'vae')
    proc = ok(run(root, *args_for(family_input, model, tmp_path / 'out', tmp_path, '--dtype', 'float16',
                                  '--device', 'cpu', '--latent_mode', 'mean')))
    summary = json.loads((tmp_path / 'summary.json').read_text())
    # Two parts of one batch each, both with 64 and 128 px images: four VAE batches, all re-encoded.
    assert summary['fp32_fallback_batches'] == {'vae': 4} and 'float32 vae' in proc.stdout
    got = read_mds(str(tmp_path / 'out' / UNBUCKETED))
    with torch.inference_mode(), one_torch_thread():
        for s in got:
            x = reference_pixels(s['jpg'], 64, [64, 128])
            want = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor)[0].numpy()
            lat = np.frombuffer(s['latents_64'], np.float16).reshape(want.shape).astype(np.float32)
            np.testing.assert_allclose(lat, want, atol=1e-2, rtol=1e-2)


def test_trimmed_t5_keeps_its_meaning_for_every_caption_key(root, folders, family_input, tmp_path):
    """--t5_storage trimmed with two caption keys: each key has its own `<key>_t5_length` (the caption's
    T5 tokens with </s>, cut at 512) and its first n rows are the pipeline's for that key's text."""
    from transformers import T5TokenizerFast

    flux, out = folders['flux'], tmp_path / 'out'
    ok(run(root, *args_for(family_input, flux, out, tmp_path, '--t5_storage', 'trimmed', '--dtype', 'float32',
                           '--storage_dtype', 'float32', '--resolutions', 64, '--caption_keys', *KEYS)))
    columns = json.loads((out / UNBUCKETED / 'convention.json').read_text())['columns']
    got = read_mds(str(out / UNBUCKETED))
    tok = T5TokenizerFast.from_pretrained(flux, subfolder='tokenizer_2')
    for key in KEYS:
        assert columns[f'{key}_t5_latents']['length_column'] == f'{key}_t5_length'
        want = pipeline_text(flux, 'flux', [s[key] for s in got])['prompt_embeds']
        for i, s in enumerate(got):
            n = s[f'{key}_t5_length']
            assert n == min(len(tok(s[key]).input_ids), 512), (key, i)
            t5 = read_back(s[f'{key}_t5_latents'], columns[f'{key}_t5_latents'])
            np.testing.assert_allclose(t5, want[i][:n], atol=1e-5, rtol=1e-5, err_msg=f'{key} {i}')
