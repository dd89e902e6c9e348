"""precompute_latents.py for the families whose text encoder is a language model (Z-Image, Lumina-Image 2.0,
Qwen-Image) or a masked T5 (Chroma): each stored text column, read back with StreamingDataset, equals what
that pipeline's own `encode_prompt` returns for each caption key's captions, including a caption longer
than the encoder's tokens, an empty one and non-ASCII text; variable-length columns hold exactly the rows
under the mask and their count.

Model folders are tiny but real (tests/testbed/llm_families.py); every run is in-process, once per module.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_latent_families import read_back
from test_precompute_latents import one_thread
from testbed.corpus import make_jpeg
from testbed.llm_families import PIPELINES, build_llm_family, pipeline_of
from testbed.mds_input import UNBUCKETED, VLM_COLUMNS, make_row, with_vlm_captions, write_mds_input
from testbed.readback import read_mds
from testbed.scripts import load_script

LONG = 'big old house on the beach at sunset with people ' * 120  # past every encoder's tokens (1058 at most)
CAPTIONS = ['a photo of a red cat', '', LONG, 'déjà vu: ein Café, 猫が好き, ÜBER ÄRGER', 'a dog']
VLM_CAPTIONS = ['The image shows a small red cat on the beach. ' * 3, 'Ölgemälde', '', 'tree 42', LONG]
KEYS = ('caption', 'vlm_caption')


def run_in_process(*args) -> None:
    """The script's main() on this command line, in this process (no interpreter and torch start-up per
    run); its signal handlers and torch's thread count are restored after."""
    script = load_script('precompute_latents.py')
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            script.main([str(a) for a in args])
    except SystemExit as stop:
        raise AssertionError(err.getvalue()[-3000:]) from stop
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def outputs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{family: (its model folder, its output dataset)}: one run per family over one small input."""
    root = tmp_path_factory.mktemp('llm-families')
    rows = [make_row(i, make_jpeg(64 + 9 * i, 72, seed=i), f'f{i}.jpg', caption=CAPTIONS[i % 5])
            for i in range(5)]
    write_mds_input(str(root / 'mds'), with_vlm_captions(rows, VLM_CAPTIONS), bucketed=False,
                    columns=VLM_COLUMNS)
    done = {}
    for i, family in enumerate(PIPELINES):
        folder = build_llm_family(root / family, family, seed=i)
        run_in_process('--local', root / 'mds', '--bucket', UNBUCKETED, '--model_name', folder,
                       '--remote_upload', root / f'out-{family}', '--resolutions', 64, '--batch-size', 3,
                       '--part_size', 3,
                       '--num_workers', 0, '--threads', 1, '--dtype', 'float32', '--storage_dtype', 'float32',
                       '--latent_mode', 'mean', '--caption_keys', *KEYS,
                       '--summary', root / f'{family}.json')
        done[family] = folder, root / f'out-{family}' / UNBUCKETED
    return done


def pipeline_text(pipe, family: str, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """Per caption, what the pipeline's encode_prompt hands its transformer: the embeddings (only the
    rows the mask keeps where the pipeline returns a list or a padded batch with a mask) and the mask."""
    with torch.inference_mode(), one_thread():
        if family == 'zimage':  # a list of (rows under the mask, width)
            return [{'latents': e.numpy()} for e in pipe.encode_prompt(texts, 'cpu', False)[0]]
        if family == 'qwenimage':  # padded to the longest, with a mask (None: none padded)
            embeds, mask = pipe.encode_prompt(texts, 'cpu')
            n = mask.sum(1) if mask is not None else [embeds.shape[1]] * len(texts)
            return [{'latents': e[:k].numpy(), 'tail': e[k:].numpy()} for e, k in zip(embeds, n)]
        if family == 'lumina2':
            embeds, mask = pipe.encode_prompt(texts, False, device='cpu')[:2]
        else:  # chroma: (prompt_embeds, text_ids, prompt_attention_mask, ...)
            embeds, _, mask = pipe.encode_prompt(texts, None, device='cpu',
                                                 do_classifier_free_guidance=False)[:3]
        return [{'latents': e.numpy(), 'mask': m.bool().numpy()} for e, m in zip(embeds, mask)]


COLUMNS = {'zimage': {'latents': '_latents'}, 'qwenimage': {'latents': '_latents'},
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
                mine = read_back(sample[name], columns[name])
                if part == 'mask':
                    mine = np.frombuffer(sample[name], np.bool_)
                    np.testing.assert_array_equal(mine, want[i]['mask'], err_msg=f'{family} {name} {i}')
                    continue
                np.testing.assert_allclose(mine, want[i]['latents'], atol=1e-5, rtol=1e-5,
                                           err_msg=f'{family} {name} {i}')
            if variable:  # exactly the rows under the mask, and their count
                assert columns[key + '_latents']['shape'][0] == 'n'
                assert sample[key + '_length'] == len(want[i]['latents']) > 0
                assert not want[i].get('tail', np.zeros(0)).any()  # the pipeline's padding: zeros
    summary = json.loads((out.parent.parent / f'{family}.json').read_text())
    assert all(n >= 1 for n in summary['truncated_captions']['caption'].values())  # LONG was cut
    recorded = convention['text_encoders'][0]
    assert recorded['mask_applied'] and (not variable or recorded['variable'])


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
