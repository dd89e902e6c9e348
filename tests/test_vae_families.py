"""precompute_latents.py with the newer pipelines' VAEs, taken from a folder of their own with --vae
beside the tiny SD-2 text side: the stored latents are what each pipeline's own code makes of the same
crop, convention.json's inverse gives back what the VAE decodes, and --preview shows it.

One run per VAE (module-scoped), through the script's main() in this process (as `refused` runs it: the
command line without an interpreter and torch start-up each): 4 photo-like JPEGs at 64 px, mean mode,
float32. VAE folders are tiny models of the real classes (tests/testbed/vae_families.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_aspect_buckets import displayed, expected_crop, pixels_as_recorded, time_ids
from test_latents_preview import TILE, tile
from test_precompute_latents import reference_pixels, refused
from testbed.corpus import make_jpeg
from testbed.mds_input import UNBUCKETED, make_row, write_mds_input
from testbed.readback import read_mds
from testbed.scripts import one_torch_thread, run_main
from testbed.vae_families import build_vae

CLASSES = {'flux2': 'AutoencoderKLFlux2', 'qwenimage': 'AutoencoderKLQwenImage', 'sana': 'AutoencoderDC'}
# (channels, side) of a stored 64 px latent: FLUX.2 patchified 2x2 (4 x 4 channels, 8 / 2), Qwen-Image with
# its frame axis, DC-AE 32x down.
SHAPES = {'flux2': [16, 4, 4], 'qwenimage': [4, 1, 8, 8], 'sana': [4, 2, 2]}


@pytest.fixture(scope='module')
def vae_input(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('vae-input')
    rows = [make_row(i, make_jpeg(64 + 11 * i, 64 + 5 * (i % 2), seed=900 + i), f'v{i}.jpg')
            for i in range(4)]
    write_mds_input(str(folder), rows, bucketed=False, size_limit=1 << 14)
    return folder


@pytest.fixture(scope='module')
def vaes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('vaes')
    return {k: build_vae(root / k, k, seed=i) for i, k in enumerate(CLASSES)}


def in_process(*args) -> None:
    """A successful run of the command line through main() in this process."""
    code, _, err = run_main('precompute_latents.py', *args)
    assert code == 0, f'exit {code}: {err[-3000:]}'


def command(data: Path, model: Path, tmp: Path, *extra) -> list:
    return ['--remote_download', data, '--bucket', UNBUCKETED, '--local', tmp / 'cache', '--remote_upload',
            tmp / 'out', '--model_name', model, '--resolutions', 64, '--batch-size', 4, '--num_workers', 0,
            '--summary', tmp / 'summary.json', *extra]


@pytest.fixture(scope='module', params=list(CLASSES))
def finished(request, tiny_model, vaes, vae_input, tmp_path_factory) -> dict:
    """One run of the tiny SD-2 text side with the VAE of `--vae`, its preview of 2 samples; the DC-AE run
    also leaves the images out (--drop_columns jpg)."""
    kind, tmp = request.param, tmp_path_factory.mktemp(f'run-{request.param}')
    drop = ['--drop_columns', 'jpg'] if kind == 'sana' else []
    flags = ['--latent_mode', 'mean', '--dtype', 'float32', '--storage_dtype', 'float32', *drop]
    in_process(*command(vae_input, tiny_model, tmp, '--vae', vaes[kind], '--preview', 2, *flags))
    out = tmp / 'out' / UNBUCKETED
    return {'kind': kind, 'tmp': tmp, 'flags': flags, 'out': read_mds(str(out)),
            'input': read_mds(str(vae_input / UNBUCKETED)),
            'convention': json.loads((out / 'convention.json').read_text()),
            'png': np.asarray(Image.open(tmp / 'summary_preview.png').convert('RGB')),
            'vae': load_vae(vaes[kind], kind)}


def load_vae(folder: Path, kind: str):
    import diffusers

    return getattr(diffusers, CLASSES[kind]).from_pretrained(folder, low_cpu_mem_usage=False).eval()


def pipeline_latents(vae, kind: str, x: torch.Tensor) -> torch.Tensor:
    """What the pipeline's own code makes of pixels x (1, 3, H, W) in [-1, 1], with the latent mean."""
    import diffusers

    if kind == 'flux2':  # diffusers/pipelines/flux2/pipeline_flux2.py, Flux2Pipeline._encode_vae_image
        # (retrieve_latents argmax = the mean, _patchify_latents, (z - bn mean) / sqrt(bn var + eps)), run
        pipe = diffusers.Flux2Pipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None,
                                       transformer=None)
        return pipe._encode_vae_image(x, None)
    if kind == 'qwenimage':  # pipelines/qwenimage/pipeline_qwenimage_img2img.py, _encode_vae_image: the
        # image with a frame axis, (latents - latents_mean) * (1.0 / latents_std) per channel (its
        # retrieve_latents samples; the mean is taken here, as --latent_mode mean does)
        z = vae.encode(x.unsqueeze(2)).latent_dist.mean
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
        return (z - mean) * std
    # pipelines/sana/pipeline_sana_sprint_img2img.py, prepare_latents: encode(image).latent * scaling_factor
    return vae.encode(x).latent * vae.config.scaling_factor


def pipeline_inverse(vae, kind: str, stored: torch.Tensor) -> torch.Tensor:
    """What each pipeline's __call__ hands vae.decode for latents (1, ...) as the denoiser made them."""
    import diffusers

    if kind == 'flux2':  # pipeline_flux2.py, Flux2Pipeline.__call__ (output_type != 'latent')
        bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
        bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return diffusers.Flux2Pipeline._unpatchify_latents(stored * bn_std + bn_mean)
    if kind == 'qwenimage':  # pipeline_qwenimage.py, QwenImagePipeline.__call__
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
        return stored / std + mean
    return stored / vae.config.scaling_factor  # pipeline_sana.py, SanaPipeline.__call__


def convention_inverse(stored: np.ndarray, record: dict) -> np.ndarray:
    """The inverse as convention.json's image_latents states it, typed from its words and numbers."""
    c = (-1,) + (1,) * (stored.ndim - 1)
    z = stored / np.asarray(record['scaling_factor'], np.float32).reshape(c) \
        + np.asarray(record['shift_factor'], np.float32).reshape(c)
    if p := record.get('patchify'):  # unpatchify(s) = s.reshape(C, p, p, h, w).permute(0, 3, 1, 4, 2)...
        ch, h, w = z.shape
        z = z.reshape(ch // p // p, p, p, h, w).transpose(0, 3, 1, 4, 2).reshape(ch // p // p, h * p, w * p)
    return z


def image(vae, z: torch.Tensor) -> torch.Tensor:
    x = vae.decode(z).sample
    return x[:, :, 0] if x.dim() == 5 else x  # Qwen-Image's frame axis, as its pipeline drops it


def test_stored_latents_are_the_pipelines_and_decode_through_the_convention(finished):
    kind, vae, record = finished['kind'], finished['vae'], finished['convention']['image_latents']
    spec = finished['convention']['columns']['latents_64']
    assert spec['shape'] == SHAPES[kind] and spec['dtype'] == 'float32'
    assert record['vae_class'] == CLASSES[kind] and record['vae'].endswith(kind)  # the --vae folder
    assert finished['convention']['family'] == 'sd'  # the text side is the model's
    assert record['latent_mode'] == ('deterministic' if kind == 'sana' else 'mean')
    jpgs = {s['key']: s['jpg'] for s in finished['input']}
    with torch.inference_mode(), one_torch_thread():
        for sample in finished['out']:
            stored = np.frombuffer(sample['latents_64'], np.float32).reshape(spec['shape']).copy()
            want = pipeline_latents(vae, kind, reference_pixels(jpgs[sample['key']], 64, [64]))[0]
            np.testing.assert_allclose(stored, want.numpy(), atol=1e-5, rtol=1e-5, err_msg=sample['key'])
            # Read back through convention.json and decoded: the picture the pipeline's inverse decodes.
            mine = image(vae, torch.from_numpy(convention_inverse(stored, record))[None])
            theirs = image(vae, pipeline_inverse(vae, kind, torch.from_numpy(stored)[None]))
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
            assert 0 < float(theirs.std())  # a picture, not a constant


def test_preview_decodes_every_vae_through_the_convention(finished):
    """Row i, column 1 of the preview: the stored latent decoded by the pipeline's inverse, as 8 bits."""
    kind, vae, png = finished['kind'], finished['vae'], finished['png']
    spec = finished['convention']['columns']['latents_64']
    shown = [finished['out'][0], finished['out'][-1]]  # 2 of 4: the first and the last
    with torch.inference_mode(), one_torch_thread():
        for row, sample in enumerate(shown):
            stored = torch.tensor(np.frombuffer(sample['latents_64'], np.float32)).view(spec['shape'])
            x = image(vae, pipeline_inverse(vae, kind, stored[None]))[0]
            px = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            want = np.asarray(Image.fromarray(px).resize((TILE, TILE), Image.Resampling.BILINEAR), np.float32)
            assert np.abs(tile(png, row, 1) - want).max() <= 2, (kind, row)


def test_preview_only_finds_the_writers_vae_in_the_convention(finished, tiny_model, vae_input):
    """--preview_only without --vae decodes with the VAE convention.json names: the same picture."""
    again = finished['tmp'] / 'again.png'
    in_process(*command(vae_input, tiny_model, finished['tmp'], '--preview', 2, '--preview_only',
                        '--preview_path', again))
    assert np.array_equal(np.asarray(Image.open(again).convert('RGB')), finished['png'])


def test_drop_columns_leaves_the_images_out(finished):
    """--drop_columns jpg (the DC-AE run): every other input column and the latents, no image bytes; the
    other runs keep every input column, as the default always did."""
    got, inputs = finished['out'], finished['input']
    dropped = finished['kind'] == 'sana'
    added = {'caption_latents', 'latents_64'}
    assert [set(s) for s in got] == [(set(i) - {'jpg'} if dropped else set(i)) | added for i in inputs]
    assert [{k: s[k] for k in i if k != 'jpg'} for s, i in zip(got, inputs)] == \
        [{k: v for k, v in i.items() if k != 'jpg'} for i in inputs]
    assert finished['convention'].get('dropped_columns') == (['jpg'] if dropped else None)
    if dropped:  # the preview has no source crop to show
        assert tile(finished['png'], 0, 0).std() < 40  # a grey tile with its label


def test_a_rerun_with_another_vae_is_refused(finished, tiny_model, vaes, vae_input):
    """The VAE is part of what a part's _done marker records: resuming into the output with another
    --vae stops in one line, naming both VAEs (not a field of their records)."""
    kind = finished['kind']
    other = list(CLASSES)[(list(CLASSES).index(kind) + 1) % len(CLASSES)]
    line = refused(*command(vae_input, tiny_model, finished['tmp'], '--vae', vaes[other], *finished['flags']))
    assert f'was written with the VAE {vaes[kind]} ({CLASSES[kind]}), this run has {vaes[other]} ' \
           f'({CLASSES[other]}): rerun with the same flags' in line


def test_aspect_buckets_with_a_video_vae(tiny_model, vaes, vae_input, tmp_path):
    """--crop aspect --flip with Qwen-Image's VAE: buckets step by its side multiple (8 with the sd
    denoiser), each latent (4, 1, H/8, W/8) at its sample's bucket is the pipeline's of the recorded crop
    (and of the mirrored one), and the preview reads each at its bucket shape."""
    in_process(*command(vae_input, tiny_model, tmp_path, '--vae', vaes['qwenimage'], '--crop', 'aspect',
                        '--flip', '--latent_mode', 'mean', '--dtype', 'float32', '--storage_dtype', 'float32',
                        '--preview', 4))
    out = tmp_path / 'out' / UNBUCKETED
    convention = json.loads((out / 'convention.json').read_text())
    assert convention['crop']['step'] == 8 and convention['columns']['latents_64']['shape'] == [4, 1, 'H/8',
                                                                                               'W/8']
    assert json.loads((tmp_path / 'summary.json').read_text())['preview']['samples'] == [0, 1, 2, 3]
    vae, shapes = load_vae(vaes['qwenimage'], 'qwenimage'), set()
    with torch.inference_mode(), one_torch_thread():
        for sample in read_mds(str(out)):
            ids = time_ids(sample['add_time_ids_64'])
            (rw, rh), _, _ = expected_crop(displayed(sample['jpg']), (ids[5], ids[4]))
            shapes.add((ids[4], ids[5]))
            for column, mirrored in (('latents_64', False), ('latents_64_flipped', True)):
                x = pixels_as_recorded(sample['jpg'], ids, [(rw, rh, 64, ids)], mirrored)
                stored = np.frombuffer(sample[column], np.float32).reshape(4, 1, ids[4] // 8, ids[5] // 8)
                np.testing.assert_allclose(stored, pipeline_latents(vae, 'qwenimage', x)[0].numpy(),
                                           atol=1e-5, rtol=1e-5, err_msg=f'{sample["key"]} {column}')
    assert len(shapes) > 1  # not only squares


@pytest.mark.parametrize('case, phrase', [
    ('dc_resolution', '--resolutions 48: the AutoencoderDC VAE (32x down) with the sd denoiser (patch 1) '
                      'needs sides that are multiples of 32'),
    ('flux_side_multiple', '--resolutions 72: the AutoencoderKL VAE (8x down) with the flux denoiser '
                              '(patch 2) needs sides that are multiples of 16'),
    ('no_folder', '--vae {tmp}/nowhere: no such folder'),
    ('not_a_vae', "config.json has no `_class_name`"),
    ('unknown_class', '`_class_name` AutoencoderTiny is not a VAE this script knows'),
    ('drop_unknown', '--drop_columns jpeg: the input has no such column'),
])
def test_vae_refusals_are_one_line(case, phrase, tiny_model, vaes, vae_input, tmp_path):
    from testbed.families import build_tiny_family

    extra: list = []
    model = tiny_model
    if case == 'dc_resolution':
        extra = ['--vae', vaes['sana'], '--resolutions', 48]
    elif case == 'flux_side_multiple':
        model, extra = build_tiny_family(tmp_path / 'flux', 'flux'), ['--resolutions', 72]
    elif case == 'no_folder':
        extra = ['--vae', tmp_path / 'nowhere']
    elif case == 'not_a_vae':
        extra = ['--vae', f'{tiny_model}:text_encoder']
    elif case == 'unknown_class':
        (tmp_path / 'tiny').mkdir()
        (tmp_path / 'tiny' / 'config.json').write_text(json.dumps({'_class_name': 'AutoencoderTiny'}))
        extra = ['--vae', tmp_path / 'tiny']
    else:
        extra = ['--drop_columns', 'jpeg']
    assert phrase.format(tmp=tmp_path) in refused(*command(vae_input, model, tmp_path, *extra))
    assert not (tmp_path / 'out').exists()
