"""Attach VAE image latents and text-encoder caption latents of a diffusion model to an MDS dataset, once.

Streams one resolution bucket of what laion_cloudwriter.py wrote through the VAE and text encoders of
a diffusers pipeline (SD 1/2, SDXL, SD3, FLUX.1, mosaicml/diffusion's T5 + CLIP, Z-Image, Lumina 2, Chroma,
SANA, Qwen-Image, FLUX.2; or text encoders composed with --text_encoder), encoding captions
as its `encode_prompt` does, so that training does not re-encode them every epoch. The full manual
(columns and shapes, convention.json, aspect buckets, preview) is docs/precompute_latents.md; errors
and what to do: docs/errors.md.

Example (one GPU; `torchrun --nproc_per_node 8 -- precompute_latents.py ...` for eight):

    python precompute_latents.py --remote_download s3://my-bucket/laion/mds --bucket 3 \\
        --local /tmp/mds-cache --remote_upload s3://my-bucket/laion/latents \\
        --model_name stabilityai/stable-diffusion-2-base --batch-size 64

Reads `<remote_download>/<bucket name>[/<subfolder>]` (`--bucket 3` or `--bucket 256-512`), or
`<local>/<bucket name>` in place without `--remote_download`: images from `jpg` (bytes, or streaming's
jpeg, png or pil encoding), text from each `--caption_keys` column; and the model (hub name or folder).

Writes `<remote_upload>/<bucket name>[/<subfolder>]`: each input column but --drop_columns, the family's text
columns, `latents_<res>` per `--resolutions` entry, and `convention.json` (each new column's dtype and
shape, the VAE's normalisation and inverse: read the data back with it); under `--crop aspect` one dataset per
bucket group. Ends with a summary, printed and written as JSON (`--summary`); `--preview N` adds a PNG.

Resume: the work is split into parts of whole input shards, and each finished part gets a `_done`
marker with the settings that shape its bytes. Rerun the same command, with any number of processes,
to skip finished parts; other settings or another input are refused. Rank 0 merges `index.json` after
all ranks finish.

Exit codes: 0 done (undecodable images are skipped: each named in its part's `_done` marker, counted by
reason in the summary); 2 one `error:` line (a flag, the model, the input, the places, a rerun's other
settings, parts left unfinished, no sample at all because every image was skipped, no latent at all
because every image is smaller than --resolutions, a failed `--preview_only`); 128 + the signal after
SIGTERM (143) or Ctrl-C (130): finished parts are kept.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from traceback import walk_tb
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by import_torch() once the flags are checked (it takes seconds)
    import torch
    import torch.distributed as dist

import numpy as np
from PIL import ExifTags, Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from tqdm import tqdm

# Bucket edges on the shorter image side, as laion_cloudwriter.py buckets them: `--bucket 3` is '256-512'.
BUCKET_EDGES = (0, 64, 128, 256, 512, 768, 1024, 2**20)
BUCKET_NAMES = tuple(f'{lo}-{hi}' for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:]))
IMAGE_COLUMN = 'jpg'  # and each --caption_keys column (encoded 'str')
# streaming's encodings an image column may have (the file's bytes, or PIL opened on them; see stored-files)
IMAGE_ENCODINGS = ('bytes', 'jpeg', 'png', 'pil')
SHARD_RECORD = ('version', 'format', 'column_names', 'column_encodings', 'column_sizes', 'compression',
                'hashes', 'raw_data', 'zip_data', 'samples', 'size_limit')  # what streaming's MDSReader reads
# A family's text column for caption key k is named k + its suffix: caption_latents, vlm_caption_pooled,
# caption_T5_LATENTS (the mosaicml consumer's `<caption key>_<NAME>`); `caption` keeps the original names.
LATENT_COLUMN = 'latents_{res}'  # one per resolution
DONE_MARKER = '_done'  # per part; not *.json, so nothing takes it for an index
INDEX = 'index.json'
CONVENTION = 'convention.json'  # beside index.json: how every column was made and how to read it
WHITE = (255, 255, 255)
# --crop aspect: per-sample columns beside latents_<res> (one set per resolution)
BUCKET_COLUMN = 'aspect_bucket_{res}'  # int32: index into the resolution's bucket table; -1 when b''
TIME_IDS_COLUMN = 'add_time_ids_{res}'  # int32 x 6, SDXL's add_time_ids: original (h, w), crop (top, left),
#                                         target (h, w) = the bucket
DROPPED_COLUMN = 'caption_dropped'  # --caption_drop_prob > 0: int32 1 where the caption latents encode ''
FLIPPED = '{column}_flipped'  # --flip: the same for the horizontally mirrored crop
GROUPS = 'aspect_groups.json'  # beside index.json: the per-bucket datasets <out>/<group>/ and their sizes
MAX_ASPECT = 4.0  # --crop aspect: the default widest bucket, 4:1 (and 1:4)
ORIENTATION_SWAPS = (5, 6, 7, 8)  # EXIF orientations that turn the stored image by 90 degrees
STORAGE_DTYPES = ('float16', 'bfloat16', 'float32')  # torch dtype names
HUB_TIMEOUT = 10  # seconds for the one request that asks the hub whether --model_name exists
STAGING = '.staging'  # below --local: output files on their way to a remote
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class UserError(Exception):
    """A problem with the command line, the input or the environment: reported in one line."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the main process: stop, keep finished parts, report (not an Exception,
    so no `except Exception` turns it into a failure)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.stats: dict[str, Any] = {'samples': 0, 'seconds': 0.0, 'steady': 0.0}  # this rank's so far


# ----------------------------------------------------------------------------------------------
# Model families: each one is a row of data; the functions below run any row
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """One text encoder (a CLIP, a T5 or a decoder-only LLM) and what a pipeline takes from it: how the
    caption becomes its prompt, how that is tokenized, which hidden states are kept, how they are stored."""

    subfolder: str  # text_encoder, text_encoder_2, ...
    tokenizer: str  # the subfolder of its tokenizer
    model_class: str  # a transformers class
    tokenizer_class: str
    max_length: int  # tokens after padding and truncation; 0: the tokenizer's model_max_length
    hidden: str  # 'last' (last_hidden_state), 'penultimate' (hidden_states[-2]), 'stack' (the `layers`
    #              side by side per token, as FLUX.2 reshapes them) or '' (not used)
    pooled: str  # '' or the output field of the pooled vector ('text_embeds', 'pooler_output')
    mask: str  # attention mask given to the encoder: 'no', 'yes', or 'config' (config.use_attention_mask)
    t5: bool = False  # --t5_max_length and --t5_storage apply
    # Fields below are written to convention.json only where they differ from their defaults.
    template: str = ''  # '': the caption; 'chat': the tokenizer's chat template ('chat-parts': with the
    #                     content as a list of typed parts, as a processor's template takes it); else a
    #                     format string ('{}': the caption)
    system: str = ''  # 'chat': the system message before the user's caption ('' none)
    chat_options: tuple[tuple[str, Any], ...] = ()  # 'chat': apply_chat_template's keyword arguments
    remove: tuple[str, ...] = ()  # strings cut from the caption first (FLUX.2's format_input: '[IMG]')
    lower: bool = False  # the caption lower-cased and stripped first (SANA's _text_preprocessing)
    specials: bool = True  # the tokenizer adds its special tokens (False: the chat template wrote them)
    padding: str = 'max_length'  # or 'longest' (the batch's longest, as Qwen-Image pads)
    padding_side: str = ''  # set on the tokenizer when given (as the pipeline's __init__ does)
    prefix_tokens: bool = False  # max_length counts after the template's prefix (SANA: its tokens + 298)
    select: int = 0  # keep the first row and the last select - 1 rows of the padded output (SANA: 300)
    layers: tuple[int, ...] = ()  # hidden 'stack': these hidden_states indices
    drop: int = 0  # tokens dropped from the front of the masked rows (Qwen-Image: its template's first 34)
    variable: bool = False  # store only the rows under the attention mask (after `drop`) and their count
    trims: bool = False  # --t5_storage trimmed makes it `variable` too (FLUX.2: padded LLM states)
    mask_plus: int = 0  # the pipeline's returned mask also covers this many padding tokens (Chroma: 1)
    backbone: str = ''  # run this submodule (a ...ForCausalLM's `model`: the hidden states without logits)
    package: str = ''  # a module it needs beyond transformers (OpenCLIP's folders: open_clip)
    folder: str = ''  # the model folder or hub name ('': --model_name's pipeline)
    recipe: str = ''  # --text_encoder: the RECIPES name it was made from

    @property
    def source(self) -> str:
        """How messages and the fallback name it: its subfolder, or folder:subfolder when composed."""
        return f'{self.folder}:{self.subfolder}' if self.folder else self.subfolder

    def masked(self, config) -> bool:
        """Whether the pipeline gives this encoder (of `config`) the attention mask."""
        return self.mask == 'yes' or (self.mask == 'config'
                                      and bool(getattr(config, 'use_attention_mask', False)))

    def record(self) -> dict[str, Any]:
        """The fields after `t5` that differ from their defaults, as JSON (convention.json)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)[9:]  # after `t5`
               if getattr(self, f.name) != f.default}
        return {k: dict(v) if k == 'chat_options' else list(v) if isinstance(v, tuple) else v
                for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class TextColumn:
    """A stored text column per caption key (named key + suffix): output `what` ('hidden', 'pooled' or
    'mask') of the listed encoders, concatenated on the last axis."""

    suffix: str
    what: str
    encoders: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its pipeline classes, text encoders, text columns, and how to read them."""

    name: str
    pipelines: tuple[str, ...]  # model_index.json `_class_name` values that mean this family
    encoders: tuple[TextEncoder, ...]
    columns: tuple[TextColumn, ...]
    prompt_embeds: str  # the pipeline's encode_prompt outputs in terms of the columns
    storage: str = ''  # the one storage dtype the family's consumer reads ('': any --storage_dtype)
    trimmable: bool = True  # --t5_storage trimmed applies (False: the consumer reads padded T5 states)
    # The side multiple the denoiser needs beyond the VAE: the 2x2 patches its pipeline packs
    # (FluxPipeline._pack_latents, QwenImagePipeline._pack_latents) or its transformer's patch_size; 1 for a
    # UNet, SANA and FLUX.2 (whose 2x2 patchify is the VAE row's).
    patch: int = 1


def _clip(sub: str, tok: str, cls: str, hidden: str, pooled: str, mask: str = 'no') -> TextEncoder:
    return TextEncoder(sub, tok, cls, 'CLIPTokenizer', 0, hidden, pooled, mask)


def _t5(sub: str, tok: str, max_length: int, mask: str = 'no') -> TextEncoder:
    return TextEncoder(sub, tok, 'T5EncoderModel', 'T5TokenizerFast', max_length, 'last', '', mask, t5=True)


def _llm(cls: str, tok: str, max_length: int, hidden: str, **more) -> TextEncoder:
    """A pipeline's one language model in text_encoder/, masked."""
    return TextEncoder('text_encoder', 'tokenizer', cls, tok, max_length, hidden, '', 'yes', **more)


PROJ = 'CLIPTextModelWithProjection'
# The pipelines' fixed prompts (diffusers 0.39: Lumina2Pipeline.system_prompt, flux2's SYSTEM_MESSAGE,
# SanaPipeline.__call__'s complex_human_instruction, QwenImagePipeline.prompt_template_encode)
LUMINA2_SYSTEM = ('You are an assistant designed to generate superior images with the superior degree of '
                  'image-text alignment based on textual prompts or user prompts.')
FLUX2_SYSTEM = ('You are an AI that reasons about image descriptions. You give structured responses '
                'focusing on object relationships, object\nattribution and actions without speculation.')
SANA_INSTRUCTION = '\n'.join((
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable "
    'for image generation. Evaluate the level of detail in the user prompt:',
    '- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial '
    'relationships to create vivid and concrete scenes.',
    '- If the prompt is already detailed, refine and enhance the existing details slightly without '
    'overcomplicating.',
    'Here are examples of how to transform or refine prompts:',
    '- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, '
    'sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.',
    '- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing '
    'street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by '
    'towering glass skyscrapers.',
    'Please generate only the enhanced description for the prompt below and avoid including any additional '
    'commentary or evaluations:',
    'User Prompt: '))
QWEN_IMAGE_TEMPLATE = ('<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, '
                       'quantity, text, spatial relationships of the objects and background:<|im_end|>\n'
                       '<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n')
FAMILIES = {f.name: f for f in (
    Family('sd', ('StableDiffusionPipeline', 'StableDiffusionImg2ImgPipeline'),
           (_clip('text_encoder', 'tokenizer', 'CLIPTextModel', 'last', '', mask='config'),),
           (TextColumn('_latents', 'hidden', (0,)),),
           'prompt_embeds = caption_latents'),
    Family('sdxl', ('StableDiffusionXLPipeline', 'StableDiffusionXLImg2ImgPipeline'),
           (_clip('text_encoder', 'tokenizer', 'CLIPTextModel', 'penultimate', ''),
            _clip('text_encoder_2', 'tokenizer_2', PROJ, 'penultimate', 'text_embeds')),
           (TextColumn('_latents', 'hidden', (0, 1)), TextColumn('_pooled', 'pooled', (1,))),
           'prompt_embeds = caption_latents; pooled_prompt_embeds = caption_pooled'),
    Family('sd3', ('StableDiffusion3Pipeline',),
           (_clip('text_encoder', 'tokenizer', PROJ, 'penultimate', 'text_embeds'),
            _clip('text_encoder_2', 'tokenizer_2', PROJ, 'penultimate', 'text_embeds'),
            _t5('text_encoder_3', 'tokenizer_3', 256)),
           (TextColumn('_clip_latents', 'hidden', (0, 1)),
            TextColumn('_t5_latents', 'hidden', (2,)),
            TextColumn('_pooled', 'pooled', (0, 1))),
           'prompt_embeds = cat([pad(caption_clip_latents, (0, t5 width - clip width)), caption_t5_latents], '
           'dim=-2); pooled_prompt_embeds = caption_pooled', patch=2),
    Family('flux', ('FluxPipeline',),
           (_clip('text_encoder', 'tokenizer', 'CLIPTextModel', '', 'pooler_output'),
            _t5('text_encoder_2', 'tokenizer_2', 512)),
           (TextColumn('_t5_latents', 'hidden', (1,)), TextColumn('_pooled', 'pooled', (0,))),
           'prompt_embeds = caption_t5_latents; pooled_prompt_embeds = caption_pooled', patch=2),
    Family('mosaicml', ('FluxPipeline',),
           (_clip('text_encoder', 'tokenizer', 'CLIPTextModel', 'penultimate', 'pooler_output', mask='yes'),
            _t5('text_encoder_2', 'tokenizer_2', 512, mask='yes')),
           (TextColumn('_T5_LATENTS', 'hidden', (1,)),
            TextColumn('_T5_ATTENTION_MASK', 'mask', (1,)),
            TextColumn('_CLIP_LATENTS', 'hidden', (0,)),
            TextColumn('_CLIP_ATTENTION_MASK', 'mask', (0,)),
            TextColumn('_CLIP_POOLED_TEXT', 'pooled', (0,))),
           "mosaicml/diffusion's StreamingImageCaptionLatentsDataset reads these columns",
           # its reader does np.frombuffer(..., dtype=np.float32) on the latents and pooled vector
           # (diffusion/datasets/image_caption_latents.py), as its writer stores .float() bytes
           storage='float32', trimmable=False),
    Family('zimage', ('ZImagePipeline',),  # a list of each caption's rows under the mask; Qwen3Model as the
           # pipeline loads it (model_index.json): no language-model head, which its folder does not hold
           (_llm('Qwen3Model', 'Qwen2TokenizerFast', 512, 'penultimate', template='chat',
                 chat_options=(('add_generation_prompt', True), ('enable_thinking', True)), variable=True),),
           (TextColumn('_latents', 'hidden', (0,)),),
           'prompt_embeds = [caption_latents per sample] (caption_length rows each)', patch=2),
    Family('lumina2', ('Lumina2Pipeline', 'Lumina2Text2ImgPipeline'),
           (_llm('Gemma2Model', 'GemmaTokenizerFast', 256, 'penultimate',
                 template=LUMINA2_SYSTEM + ' <Prompt Start> {}', padding_side='right'),),
           (TextColumn('_latents', 'hidden', (0,)), TextColumn('_mask', 'mask', (0,))),
           'prompt_embeds = caption_latents; prompt_attention_mask = caption_mask', patch=2),
    Family('chroma', ('ChromaPipeline',),
           (dataclasses.replace(_t5('text_encoder', 'tokenizer', 512, mask='yes'), mask_plus=1),),
           (TextColumn('_t5_latents', 'hidden', (0,)), TextColumn('_t5_mask', 'mask', (0,))),
           'prompt_embeds = caption_t5_latents; prompt_attention_mask = caption_t5_mask (the tokens and the '
           'first padding token)', patch=2),
    Family('sana', ('SanaPipeline',),  # the instruction SanaPipeline.__call__ passes by default
           (_llm('Gemma2Model', 'GemmaTokenizerFast', 300 - 2, 'last', template=SANA_INSTRUCTION + '{}',
                 lower=True, padding_side='right', prefix_tokens=True, select=300),),
           (TextColumn('_latents', 'hidden', (0,)), TextColumn('_mask', 'mask', (0,))),
           'prompt_embeds = caption_latents; prompt_attention_mask = caption_mask'),
    Family('flux2', ('Flux2Pipeline',),
           (_llm('Mistral3ForConditionalGeneration', 'AutoTokenizer', 512, 'stack', layers=(10, 20, 30),
                 template='chat-parts', system=FLUX2_SYSTEM, chat_options=(('add_generation_prompt', False),),
                 remove=('[IMG]',), specials=False, backbone='model', trims=True),),
           (TextColumn('_latents', 'hidden', (0,)),),
           'prompt_embeds = caption_latents'),
    Family('qwenimage', ('QwenImagePipeline',),  # 1024 tokens after the template's first 34
           (_llm('Qwen2_5_VLForConditionalGeneration', 'Qwen2TokenizerFast', 1024 + 34, 'last',
                 template=QWEN_IMAGE_TEMPLATE, padding='longest', drop=34, variable=True, backbone='model'),),
           (TextColumn('_latents', 'hidden', (0,)),),
           'prompt_embeds = pad_sequence(caption_latents per sample (caption_length rows each)); '
           'prompt_embeds_mask = the rows each has', patch=2),
)}
# --text_encoder RECIPE=FOLDER[:SUBFOLDER]: a text encoder taken as a pipeline takes it, from any folder;
# it writes <caption key>_<recipe>_latents, and _pooled and _mask where it has them.
RECIPES = {
    'clip-l': _clip('', '', 'CLIPTextModel', 'last', 'pooler_output'),  # SD 1's; SD 2's (ViT-H) has it too
    'clip-penultimate': _clip('', '', 'CLIPTextModel', 'penultimate', 'pooler_output'),  # SDXL's CLIP-L
    'clip-g': _clip('', '', PROJ, 'penultimate', 'text_embeds'),  # SDXL's and SD3's CLIP-G (projected)
    't5': _t5('', '', 512),  # FLUX.1's: padded, no mask
    't5-masked': FAMILIES['chroma'].encoders[0],
    'qwen3-hidden-2': FAMILIES['zimage'].encoders[0],
    'qwen2.5-vl': FAMILIES['qwenimage'].encoders[0],
    'gemma2-hidden-2': FAMILIES['lumina2'].encoders[0],
    'gemma2-sana': FAMILIES['sana'].encoders[0],
    'mistral3-stack': FAMILIES['flux2'].encoders[0],
    # OpenCLIP's own folder (open_clip_config.json + open_clip_model.safetensors or
    # open_clip_pytorch_model.bin, as its hub repositories hold them), read as SDXL reads ViT-bigG:
    # the penultimate block's output and the projected pooled vector
    'openclip': TextEncoder('', '', 'OpenCLIPText', 'OpenCLIPTokenizer', 0, 'penultimate', 'text_embeds',
                            'no', package='open_clip'),
}


def composed(specs: list[tuple[str, str, str]]) -> Family:
    """The family of --text_encoder's (recipe, folder, subfolder) list: each recipe's encoder read from its
    folder (its tokenizer from the sibling tokenizer* subfolder of a text_encoder* one, else beside it)."""
    encoders, columns = [], []
    for i, (name, folder, sub) in enumerate(specs):
        tokenizer = sub.replace('text_encoder', 'tokenizer', 1) if sub.startswith('text_encoder') else sub
        encoders.append(enc := dataclasses.replace(RECIPES[name], subfolder=sub, tokenizer=tokenizer,
                                                   folder=folder, recipe=name))
        tag = '_' + re.sub(r'\W', '_', name)
        columns += [TextColumn(f'{tag}_latents', 'hidden', (i,))] + \
            [TextColumn(f'{tag}_pooled', 'pooled', (i,))] * bool(enc.pooled) + \
            [TextColumn(f'{tag}_mask', 'mask', (i,))] * (enc.mask == 'yes' and not enc.variable)
    return Family('composed', (), tuple(encoders), tuple(columns),
                  "each text column is one encoder's output, as its recipe says (text_encoders)")


# ----------------------------------------------------------------------------------------------
# Flags and their checks (before torch, the input or the models load)
# ----------------------------------------------------------------------------------------------

def number(cast: type, accepted, must: str):
    """An argparse `type=`: `cast` the text and refuse it, in argparse's own message, unless `accepted`."""
    def convert(text: str):
        with contextlib.suppress(ValueError):
            if accepted(value := cast(text)):
                return value
        raise argparse.ArgumentTypeError(f'{text}: must be {must}')
    return convert


POSITIVE = number(int, lambda v: v >= 1, 'a positive integer')
COUNT = number(int, lambda v: v >= 0, '0 or more')
SECONDS = number(float, lambda v: v > 0, 'positive seconds')
RESOLUTION = number(int, lambda v: v > 0 and v % 8 == 0, 'a positive multiple of 8 (the VAE downsamples 8x)')
PROBABILITY = number(float, lambda v: 0 <= v <= 1, 'a probability in [0, 1]')


def bucket_name(bucket: str) -> str:
    """`--bucket` as a folder name: an index into BUCKET_NAMES, a bucket name, or '' for none."""
    if bucket.isdigit():
        if int(bucket) >= len(BUCKET_NAMES):
            raise argparse.ArgumentTypeError(f'{bucket}: the bucket index must be 0..{len(BUCKET_NAMES) - 1} '
                                             f'({", ".join(BUCKET_NAMES)})')
        return BUCKET_NAMES[int(bucket)]
    return bucket


def text_encoder_spec(text: str) -> tuple[str, str, str]:
    """`--text_encoder RECIPE=FOLDER[:SUBFOLDER]` as (recipe, folder, subfolder)."""
    name, _, where = text.partition('=')
    if name not in RECIPES or not where:
        raise argparse.ArgumentTypeError(f'{text}: must be RECIPE=FOLDER[:SUBFOLDER] with a recipe of '
                                         f'{", ".join(RECIPES)}')
    package = RECIPES[name].package
    if package and importlib.util.find_spec(package) is None:
        raise argparse.ArgumentTypeError(f'{text}: the {name} recipe needs the {package} module, which is '
                                         'not installed: pip install open-clip-torch')
    folder, _, sub = where.partition(':') if not os.path.isdir(where) else (where, '', '')
    return name, folder, sub


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the original script's flags keep their names and meaning."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--local', default='/tmp/precompute-latents',
                   help='local cache folder (downloads, staging); without --remote_download the input '
                        'is read from <local>/<bucket name> in place')
    p.add_argument('--remote_download', default='',
                   help='remote (or local) root of the input MDS datasets, one per bucket')
    p.add_argument('--remote_upload', default='',
                   help='remote (or local) root to write the output datasets to (required)')
    p.add_argument('--bucket', default='', type=bucket_name,
                   help=f"bucket subfolder: an index into {', '.join(BUCKET_NAMES)} or a name; empty: none")
    p.add_argument('--subfolder', default='',
                   help='subfolder below the bucket folder, as laion_cloudwriter.py --subfolder writes')
    p.add_argument('--model_name', default='stabilityai/stable-diffusion-2-base',
                   help='diffusers pipeline of a known family (hub name or folder)')
    p.add_argument('--family', default='auto', choices=('auto', *FAMILIES),
                   help='model family; auto: from model_index.json (sd for a folder without one)')
    p.add_argument('--text_encoder', type=text_encoder_spec, action='append', default=[],
                   metavar='RECIPE=FOLDER[:SUBFOLDER]',
                   help='compose: encode captions with this text encoder (repeat for several) instead of the '
                        f"family's; recipes: {', '.join(RECIPES)} (openclip: OpenCLIP's own folder, with "
                        "pip install open-clip-torch); the VAE stays --model_name's")
    p.add_argument('--caption_keys', nargs='+', default=['caption'],
                   help="input text columns to encode, each into the family's columns named <key>_...")
    p.add_argument('--storage_dtype', choices=STORAGE_DTYPES, default=None,
                   help="dtype of the stored latents; default: the family consumer's (mosaicml: float32), "
                        'else float16')
    p.add_argument('--t5_max_length', type=COUNT, default=0,
                   help="T5 tokens per caption; 0: the family's (sd3 256, flux 512, mosaicml 512)")
    p.add_argument('--t5_storage', choices=('padded', 'trimmed'), default='padded',
                   help='trimmed: store T5 states (and flux2\'s) only up to the token count, plus a '
                        '<column>_length')
    p.add_argument('--text_batch_size', type=COUNT, default=0,
                   help='captions per text encoder call; 0: --batch-size (lower it for T5-XXL on small GPUs)')
    p.add_argument('--batch-size', dest='batch_size', type=POSITIVE, default=64,
                   help='samples per batch on each process')
    p.add_argument('--resolutions', type=RESOLUTION, nargs='+', default=[256, 512],
                   help='image resolutions to encode, multiples of 8; one latents_<res> column each')
    p.add_argument('--crop', choices=('center', 'aspect'), default='center',
                   help='center: the largest centered square; aspect: the nearest aspect-ratio bucket')
    p.add_argument('--max_aspect', type=number(float, lambda v: v >= 1, 'at least 1 (buckets span 1:max to '
                                                  'max:1)'), default=None,
                   help=f'--crop aspect: buckets span 1:max_aspect to max_aspect:1; default {MAX_ASPECT}')
    p.add_argument('--random_crop', action='store_true',
                   help='--crop aspect: a random crop offset (seeded per sample) instead of centred')
    p.add_argument('--flip', action='store_true',
                   help='also store latents_<res>_flipped: the latent of the horizontally mirrored crop')
    p.add_argument('--latent_mode', choices=('sample', 'mean'), default='sample',
                   help='store a sample of the latent distribution (seeded per sample) or its mean')
    p.add_argument('--seed', type=COUNT, default=0, help='seed of the per-sample noise in sample mode')
    p.add_argument('--vae', default='',
                   help='FOLDER[:SUBFOLDER]: take the VAE from there (no SUBFOLDER: FOLDER/vae, else '
                        'FOLDER), e.g. a FLUX.2 folder beside SDXL text encoders; its class '
                        f'({", ".join(VAES)}) is read from its config.json; empty: --model_name\'s vae/')
    p.add_argument('--drop_columns', nargs='+', default=[], metavar='COLUMN',
                   help='input columns to leave out of the output, e.g. jpg for latents without the images '
                        '(for trainers that never read them); default: every input column is kept')
    p.add_argument('--caption_drop_prob', type=PROBABILITY, default=0.0,
                   help="fraction of captions encoded as ''")
    p.add_argument('--device', choices=('auto', 'cuda', 'cpu'), default='auto',
                   help='where to run the models; auto: cuda:<LOCAL_RANK> when available')
    p.add_argument('--dtype', choices=('auto', 'float32', 'float16', 'bfloat16'), default='auto',
                   help='model dtype; auto: float16 on GPU, float32 on CPU (latents are stored float16)')
    p.add_argument('--num_workers', type=number(int, lambda v: v >= -1, '-1 (one per free core), 0 or more'),
                   default=-1,
                   help='DataLoader worker processes that read and decode; -1: cores per process - 1')
    p.add_argument('--threads', type=COUNT, default=0,
                   help='torch threads per process on CPU; 0: cores per process - --num_workers')
    p.add_argument('--prefetch_factor', type=POSITIVE, default=4, help='batches each worker prepares ahead')
    p.add_argument('--part_size', type=POSITIVE, default=5000,
                   help='samples per unit of work and of resume (whole input shards); keep it on reruns')
    p.add_argument('--size_limit', default='256mb', help='output shard size limit')
    p.add_argument('--compression', default='', help='output shard compression, e.g. zstd; empty: none')
    p.add_argument('--download_timeout', type=SECONDS, default=300, help='seconds per file download')
    p.add_argument('--download_retry', type=COUNT, default=2, help='retries per file download')
    p.add_argument('--dist_timeout', type=SECONDS, default=7 * 24 * 3600,
                   help='seconds ranks wait for each other at the final barrier')
    p.add_argument('--summary', default='',
                   help='where to write the JSON summary; empty: <local>/latents_summary_<bucket>.json')
    p.add_argument('--preview', type=COUNT, default=0,
                   help='write a PNG of this many samples: source crops beside their decoded latents')
    p.add_argument('--preview_path', default='',
                   help='where to write the preview PNG; empty: <summary>_preview.png')
    p.add_argument('--preview_only', action='store_true',
                   help='only write the --preview of the finished output at --remote_upload')
    p.add_argument('--wandb', action='store_true', help='log progress to Weights & Biases (if installed)')
    p.add_argument('--wandb_disabled', action='store_true', help='never log to wandb (the default)')
    p.add_argument('--wandb_name', default='baseline', help='wandb run name')
    p.add_argument('--wandb_project', default='laion-latents', help='wandb project')
    p.add_argument('--wandb_entity', default='mosaic-ml', help='wandb entity')
    return p.parse_args(argv)


def check_args(args: argparse.Namespace, pl: Places) -> None:
    """The checks across flags (each flag alone is checked by its argparse `type=` or `choices=`),
    before torch, streaming, the input or the models load; raises UserError."""
    if twice := sorted({r for r in args.resolutions if args.resolutions.count(r) > 1}):
        raise UserError(f'--resolutions {" ".join(map(str, args.resolutions))}: {twice[0]} is given twice; '
                        'list each resolution once (each makes one latents_<res> column)')
    for flag, names in (('--caption_keys', args.caption_keys), ('--drop_columns', args.drop_columns)):
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise UserError(f'{flag} {" ".join(names)}: {twice[0]} is given twice; list each once')
    if not args.remote_upload:
        raise UserError('--remote_upload is required: where to write the output dataset')
    if args.random_crop and args.crop != 'aspect':
        raise UserError('--random_crop: only with --crop aspect (a center square is always centred)')
    if args.text_encoder and args.family != 'auto':
        raise UserError(f'--family {args.family} with --text_encoder: a composed run has no family preset; '
                        'drop one of them')
    if len(recipes := [r for r, _, _ in args.text_encoder]) > len(set(recipes)):
        raise UserError('--text_encoder: a recipe is given twice; its columns would clash (give each once)')
    if args.max_aspect is not None and args.crop != 'aspect':
        raise UserError('--max_aspect: only with --crop aspect (a center square has one aspect ratio)')
    check_places(args, pl)


# >>> twin: places (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
@dataclasses.dataclass(frozen=True)
class Places:
    """Where a run reads, caches, stages and writes."""

    src: str  # the input dataset
    cache: str  # downloaded input shards; == src when the input is read in place (no --remote_download)
    out: str  # the output dataset
    staging: str  # local copies of output files on their way to a remote; deleted at the end


def places(args: argparse.Namespace) -> Places:
    """The run's places. A download cache belongs to one input and one output, so a run on another
    dataset (or into another output) never meets its shards."""
    out = join(args.remote_upload, args.bucket, args.subfolder)
    src = cache = join(args.local, args.bucket, args.subfolder)
    if args.remote_download:
        src = join(args.remote_download, args.bucket, args.subfolder)
        cache = join(args.local, args.bucket, args.subfolder, f'download-{digest(src, out)}')
    return Places(src, cache, out, join(args.local, STAGING, digest(out)))


def digest(*paths: str) -> str:
    """A short name for a combination of places (same places, any spelling: same name)."""
    return hashlib.sha1('\n'.join('/'.join(address(p)) for p in paths).encode()).hexdigest()[:12]
# <<< twin: places


# >>> twin: address (verbatim in caption_images.py, curate_images.py, laion_cloudwriter.py,
# precompute_latents.py; test_twins.py)
def address(path: str) -> tuple[str, ...]:
    """Where `path` points, comparable across spellings: ('s3://bucket', 'a', 'b') for a remote;
    ('', 'tmp', 'x') for a folder, after resolving relative paths, `.`, `..`, `~` and symlinks."""
    url = urllib.parse.urlparse(path)
    if url.scheme in ('', 'file'):
        real = os.path.realpath(os.path.expanduser(url.path if url.scheme else path))
        return ('',) + tuple(p for p in real.split('/') if p)
    return (f'{url.scheme.lower()}://{url.netloc.lower()}',) + tuple(p for p in url.path.split('/') if p)
# <<< twin: address


def check_places(args: argparse.Namespace, pl: Places) -> None:
    """Refuse a run whose input, download cache, staging folder and output overlap (the same place
    under any spelling, or one inside another): cache eviction, the staging clean-up or the output's
    index would delete or overwrite the other's files."""
    roles = [('the output', pl.out, '--remote_upload'),
             ('the input', pl.src, '--remote_download' if args.remote_download else '--local')]
    if pl.cache != pl.src:
        roles.append(('the download cache', pl.cache, '--local'))
    roles.append(('the staging folder', pl.staging, '--local'))
    for i, (what_a, a, flag_a) in enumerate(roles):
        for what_b, b, flag_b in roles[i + 1:]:
            x, y = address(a), address(b)
            relation = ('is the same place as' if x == y else 'is inside' if x[:len(y)] == y
                        else 'holds' if y[:len(x)] == x else '')
            if relation == 'holds' and (what_a, what_b) == ('the input', 'the staging folder'):
                continue  # an input read in place from --local: the staging clean-up deletes only itself
            if relation:
                raise UserError(f'{what_a} {shown(a)} ({flag_a}) {relation} {what_b} {shown(b)} ({flag_b}): '
                                'the run would delete or overwrite its files; give --remote_download, '
                                '--local and --remote_upload places of their own')


def shown(path: str) -> str:
    """`path`, and what it resolves to when that differs (a symlink, a relative path)."""
    where = address(path)
    real = where[0] + '/' + '/'.join(where[1:])  # where[0]: '' for a folder
    return path if real.rstrip('/') == path.rstrip('/') else f'{path} (= {real})'


# ----------------------------------------------------------------------------------------------
# The VAE: each diffusers VAE class is a row (read from its config.json `_class_name`); one function
# normalises any row's latents as its pipeline does, and convention.json states the inverse
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Vae:
    """A VAE class, and how its pipeline turns what it encodes into what the denoiser sees:
    stored = (patchify(z) - shift_factor[c]) * scaling_factor[c], per stored channel c."""

    class_name: str  # the diffusers class, its config's `_class_name`
    channels: str  # config key of the latent channels
    blocks: str  # config key of a list: the side halves len(list) + `halvings` times
    halvings: int
    norm: str  # where shift and scale come from: a key of NORMS
    code: str  # the diffusers code that states the normalisation (and its inverse)
    sampled: bool = True  # encode() gives a latent_dist (--latent_mode sample or mean); else a fixed .latent
    frames: bool = False  # a video VAE: pixels and latents carry a frame axis of 1, (N, C, 1, H, W)
    patch: int = 1  # its pipeline patchifies p x p before normalising: channels x p^2, side / p
    bucket_latents: int = 1  # a bucket's latent side is a multiple of this (8 for the UNet families)
    pixels: str = 'in_channels'  # config key of the input channels: 3, as the pictures are RGB


VAES = {v.class_name: v for v in (
    Vae('AutoencoderKL', 'latent_channels', 'block_out_channels', -1, 'factors',
        'diffusers/examples (e.g. dreambooth/train_dreambooth_lora_flux.py): (latent_dist.sample() - '
        "shift_factor) * scaling_factor; inverse: each pipeline's __call__, latents / scaling_factor + "
        'shift_factor', bucket_latents=8),
    Vae('AutoencoderKLFlux2', 'latent_channels', 'block_out_channels', -1, 'batch_norm',
        'diffusers/pipelines/flux2/pipeline_flux2.py: Flux2Pipeline._encode_vae_image, _patchify_latents; '
        'inverse: __call__ (latents * bn_std + bn_mean), _unpatchify_latents', patch=2),
    Vae('AutoencoderKLQwenImage', 'z_dim', 'temperal_downsample', 0, 'mean_std',
        'diffusers/pipelines/qwenimage/pipeline_qwenimage_img2img.py: QwenImageImg2ImgPipeline.'
        '_encode_vae_image; inverse: pipeline_qwenimage.py QwenImagePipeline.__call__', frames=True,
        pixels='input_channels'),
    Vae('AutoencoderDC', 'latent_channels', 'encoder_block_out_channels', -1, 'factors',
        'diffusers/pipelines/sana/pipeline_sana_sprint_img2img.py: vae.encode(image).latent * '
        'scaling_factor; inverse: pipeline_sana.py SanaPipeline.__call__, latents / scaling_factor',
        sampled=False),
)}
def factor_norm(cfg: dict, load) -> tuple[float, float]:
    """AutoencoderKL, AutoencoderDC: the config's shift_factor (none: 0) and scaling_factor."""
    return float(cfg.get('shift_factor') or 0.0), float(cfg['scaling_factor'])


def batch_norm_norm(cfg: dict, load) -> tuple[list[float], list[float]]:
    """AutoencoderKLFlux2: its batch norm's running mean, and 1 / sqrt(running_var + batch_norm_eps)
    (float32, as Flux2Pipeline computes bn_std), per patchified channel; read from the weights."""
    bn = load().bn
    std = torch.sqrt(bn.running_var.float() + cfg['batch_norm_eps'])
    return bn.running_mean.float().tolist(), (1.0 / std).tolist()


def mean_std_norm(cfg: dict, load) -> tuple[list[float], list[float]]:
    """AutoencoderKLQwenImage: the config's latents_mean, and 1.0 / latents_std in float32 (as
    QwenImageImg2ImgPipeline._encode_vae_image multiplies by it), per channel."""
    return [float(v) for v in cfg['latents_mean']], (1.0 / torch.tensor(cfg['latents_std'])).tolist()


NORMS = {'factors': factor_norm, 'batch_norm': batch_norm_norm, 'mean_std': mean_std_norm}


@dataclasses.dataclass(frozen=True)
class ImageLatents:
    """The run's VAE: where it is, its row, its own latent shape, and its pipeline's normalisation."""

    folder: str
    subfolder: str
    vae: Vae
    channels: int  # of the VAE's own latent (before a patchify)
    factor: int  # the VAE's own downsampling
    shift: float | tuple[float, ...]  # per stored channel, or one for all
    scale: float | tuple[float, ...]
    given: str  # --vae as given; '': the family's own vae/

    @property
    def stored(self) -> tuple[int, int]:
        """(channels, downsampling) of the stored latent."""
        return self.channels * self.vae.patch ** 2, self.factor * self.vae.patch

    def record(self, latent_mode: str, multiple: int) -> dict:
        """convention.json's `image_latents`: an AutoencoderKL of the model's own vae/ keeps the record
        it always had; any other VAE states where it is, what it is, the normalisation and its inverse."""
        channels, factor = self.stored
        record = {'scaled': True, 'latent_channels': channels, 'downsampling': factor,
                  'scaling_factor': self.scale if isinstance(self.scale, float) else list(self.scale),
                  'shift_factor': self.shift if isinstance(self.shift, float) else list(self.shift),
                  'latent_mode': latent_mode if self.vae.sampled else 'deterministic'}
        if self.vae.class_name == 'AutoencoderKL' and not self.given:
            return record
        return {**record, 'vae': self.given or f'{self.folder}:{self.subfolder}',
                'vae_class': self.vae.class_name, 'vae_latent_channels': self.channels,
                'vae_downsampling': self.factor, 'side_multiple': multiple, 'code': self.vae.code,
                **({'frames': 1} if self.vae.frames else {}),
                **({'patchify': self.vae.patch} if self.vae.patch > 1 else {}), **self.formulas()}

    def formulas(self) -> dict[str, str]:
        """The normalisation and its inverse in words a trainer can type (the record's numbers filled in)."""
        c, f, p, video = self.channels, self.factor, self.vae.patch, self.vae.frames
        z = f'z ({c}, {"1, " * video}H/{f}, W/{f}) = the VAE\'s ' + (
            'latent_dist sample or mean (latent_mode)' if self.vae.sampled else 'encode(x).latent') + \
            ' of x = pixels / 127.5 - 1' + (' with a frame axis, (3, 1, H, W)' if video else '')
        patchify = f'; patchify(z) = z.view({c}, h/{p}, {p}, w/{p}, {p}).permute(0, 2, 4, 1, 3).reshape(' \
                   f'{c * p * p}, h/{p}, w/{p}) (batch axis left out)' if p > 1 else ''
        unpatchify = f'; unpatchify(s) = s.reshape({c}, {p}, {p}, h, w).permute(0, 3, 1, 4, 2).reshape(' \
                     f'{c}, h*{p}, w*{p})' if p > 1 else ''
        frame = '[:, :, 0] (the frame axis)' if video else ''
        return {'normalise': f'stored = ({"patchify(z)" if p > 1 else "z"} - shift_factor[c]) * '
                             f'scaling_factor[c] per stored channel c (a number: all), {z}{patchify}',
                'inverse': f'z = {"unpatchify" if p > 1 else ""}(stored / scaling_factor[c] + '
                           f'shift_factor[c]){unpatchify}; image = vae.decode(z[None]).sample{frame}, '
                           'in [-1, 1]'}

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """The stored latents of the VAE's latents `z` (float32), as the row's pipeline computes them."""
        p = self.vae.patch
        if p > 1:  # Flux2Pipeline._patchify_latents
            n, c, h, w = z.shape
            z = z.view(n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(n, c * p * p, h // p,
                                                                                     w // p)
        shift, scale = (v if isinstance(v, float) else
                        torch.tensor(v, device=z.device).view(-1, *[1] * (z.dim() - 2))
                        for v in (self.shift, self.scale))
        return z * scale if isinstance(shift, float) and not shift else (z - shift) * scale


def vae_place(model_name: str, flag: str) -> tuple[str, str]:
    """(folder, subfolder) of `--vae FOLDER[:SUBFOLDER]` (no subfolder: FOLDER/vae when there is one, else
    FOLDER itself); without the flag the model's own vae/."""
    if not flag:
        return model_name, 'vae'
    if ':' in flag:
        folder, _, sub = flag.rpartition(':')
        return folder, sub
    return flag, 'vae' if os.path.isdir(os.path.join(flag, 'vae')) else ''


def find_vae(model_name: str, flag: str) -> ImageLatents:
    """The VAE of `--vae` (or the model's vae/): its row by its config's `_class_name`, its latent shape
    and normalisation; refused in one line when the class is unknown or the config lacks what its row
    reads."""
    import inspect

    import diffusers

    folder, sub = vae_place(model_name, flag)
    where = f'{folder}/{sub}' if sub else folder
    if flag and not os.path.isdir(where):
        raise UserError(f'--vae {flag}: no such folder {where}; give a VAE folder or FOLDER:SUBFOLDER '
                        '(e.g. black-forest-labs/FLUX.2-dev:vae as a downloaded folder)')
    with failing(f'cannot read the VAE config ({sub or "."}/) of {folder}: '):
        cfg = diffusers.AutoencoderKL.load_config(folder, subfolder=sub or None)
    name = cfg.get('_class_name', '')
    if not name:
        raise UserError(f'{where}/config.json has no `_class_name`: not a diffusers VAE folder; pass --vae '
                        'FOLDER[:SUBFOLDER] of a VAE')
    if name not in VAES:
        raise UserError(f'{where}/config.json: `_class_name` {name} is not a VAE this script knows '
                        f'({", ".join(VAES)}); pass --vae with one of those')
    row = VAES[name]
    init = inspect.signature(getattr(diffusers, name).__init__).parameters
    cfg = {**{k: p.default for k, p in init.items()}, **cfg}  # the class's defaults where the file is silent
    for key in (row.channels, row.blocks):
        if not isinstance(cfg.get(key), (int, list, tuple)):
            raise UserError(f'{where}/config.json has no usable `{key}`, which a {name} needs')
    if cfg.get(row.pixels) != 3:
        raise UserError(f'{where}/config.json: {name} with {row.pixels} {cfg.get(row.pixels)}, but the '
                        'images are RGB (3 channels): not a VAE of pictures; give '
                        f'{"--vae" if flag else "--model_name"} one whose config.json says 3')

    def load():  # the weights, on the CPU, for a row whose constants live there
        return load_module(folder, sub, name, torch.device('cpu'), torch.float32)

    with failing(f'{where}: cannot read the {name} normalisation ({row.norm}): '):
        shift, scale = NORMS[row.norm](cfg, load)
    return ImageLatents(folder, sub, row, int(cfg[row.channels]), 2 ** (len(cfg[row.blocks]) + row.halvings),
                        shift if isinstance(shift, float) else tuple(shift),
                        scale if isinstance(scale, float) else tuple(scale), flag)


def bucket_rule(image: ImageLatents, family: Family, resolutions: list[int]) -> tuple[int, int]:
    """(side multiple, bucket step) of a run: a side must be a multiple of the stored latent's factor x the
    denoiser's patch (Family.patch); the aspect buckets step by that, or by factor x 8 where the row keeps
    latent sides multiples of 8 (the UNet families, as always). Refuses a resolution that is no multiple."""
    factor = image.stored[1]
    multiple = factor * family.patch
    if bad := [r for r in resolutions if r % multiple]:
        raise UserError(f'--resolutions {bad[0]}: the {image.vae.class_name} VAE ({factor}x down) with the '
                        f'{family.name} denoiser (patch {family.patch}) needs sides that are '
                        f'multiples of {multiple}; use e.g. {max(multiple, bad[0] // multiple * multiple)}')
    return multiple, math.lcm(multiple, factor * image.vae.bucket_latents)


# ----------------------------------------------------------------------------------------------
# The plan (rank 0): the model, the input, the output's finished parts, the convention
# ----------------------------------------------------------------------------------------------

def check_output_format(size_limit: str, compression: str) -> None:
    """--size_limit and --compression as streaming's MDSWriter reads them."""
    from streaming.base.compression import get_compressions, is_compression
    from streaming.base.util import bytes_to_int

    size = -1
    with contextlib.suppress(ValueError, AttributeError):
        size = bytes_to_int(size_limit)
    if not 0 < size < 2**32:
        raise UserError(f'--size_limit {size_limit}: must be a shard size from 1b to below 4gb, such as '
                        '256mb or 67108864')
    if compression and not is_compression(compression):
        names = sorted({c.split(':')[0] for c in get_compressions()})
        raise UserError(f'--compression {compression}: streaming knows {", ".join(names)} (with an '
                        'optional level, e.g. zstd:7); leave it empty for none')


def check_family_flags(args: argparse.Namespace, family: Family) -> None:
    """Refuse the flags the family cannot apply or its consumer cannot read, naming the flag."""
    t5 = any(e.t5 for e in family.encoders)
    trims = any(e.t5 or e.trims for e in family.encoders)
    if family.storage and args.storage_dtype not in (None, family.storage):
        raise UserError(f'--storage_dtype {args.storage_dtype}: the {family.name} layout is read as '
                        f'{family.storage} by its consumer; drop the flag')
    if args.t5_storage == 'trimmed' and not (trims and family.trimmable):
        why = 'has no T5 encoder' if not trims else 'stays padded, as its consumer reads it'
        raise UserError(f'--t5_storage trimmed: the {family.name} layout {why}; drop the flag')
    if args.t5_max_length and not t5:
        raise UserError(f'--t5_max_length {args.t5_max_length}: the {family.name} layout has no T5 encoder; '
                        'drop the flag')


def check_model_name(model_name: str) -> None:
    """A --model_name that is no folder must be a hub name this machine can get: cached, or on a
    reachable hub. Fails in one line instead of minutes of retries or a message about None."""
    from huggingface_hub import HfApi, constants, utils
    from huggingface_hub.file_download import repo_folder_name

    try:
        utils.validate_repo_id(model_name)
    except utils.HFValidationError:
        raise UserError(f'--model_name {model_name}: no such folder, and not a hub model name '
                        '(owner/name); pass a model folder or a hub name such as '
                        'stabilityai/stable-diffusion-2-base') from None
    cached = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=model_name, repo_type='model'))
    if os.path.isdir(os.path.join(cached, 'snapshots')):
        return
    if constants.HF_HUB_OFFLINE:
        raise UserError(f'--model_name {model_name}: no such folder, and HF_HUB_OFFLINE is set but the hub '
                        f'cache {constants.HF_HUB_CACHE} has no copy; pass a model folder, or unset '
                        f'HF_HUB_OFFLINE (or run `huggingface-cli download {model_name}` first)')
    try:
        HfApi().model_info(model_name, timeout=HUB_TIMEOUT)
    except utils.GatedRepoError:
        raise UserError(f'--model_name {model_name}: a gated model; accept its terms on the hub and set '
                        'HF_TOKEN') from None
    except utils.RepositoryNotFoundError:
        raise UserError(f'--model_name {model_name}: no such folder, and not on the hub (mistyped? a private '
                        'model needs HF_TOKEN)') from None
    except Exception as err:
        raise UserError(f'--model_name {model_name}: no such folder, and the hub {constants.ENDPOINT} '
                        f'cannot be reached ({type(err).__name__}); check the network or pass a model '
                        'folder') from None


def read_model_index(model_name: str) -> dict | None:
    """model_index.json of a pipeline folder or hub name; None for a folder without one."""
    path = os.path.join(model_name, 'model_index.json')
    if not os.path.isdir(model_name):  # guessing the family of a hub model would be a silent mistake
        check_model_name(model_name)
        with failing(f'cannot read model_index.json of {model_name} (', '): check the name and the network, '
                     'or pass --family'):
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(model_name, 'model_index.json')
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise UserError(f'{path} is not valid JSON ({last_line(err)})') from None


def pick_family(model_name: str, flag: str) -> Family:
    """The family of `--family`, else of model_index.json's `_class_name` ('sd' for a folder without one);
    a `--family` whose pipelines do not include the folder's `_class_name` is refused, naming both."""
    index = read_model_index(model_name)
    name = (index or {}).get('_class_name', '')
    if flag != 'auto':
        family = FAMILIES[flag]
        if name and name not in family.pipelines:
            raise UserError(f'--family {flag}: {model_name}/model_index.json names {name}, but the {flag} '
                            f'layout is that of {" or ".join(family.pipelines)}; pass the family of that '
                            'folder (or --family auto)')
        return family
    if index is None:
        if os.path.isdir(os.path.join(model_name, 'text_encoder_2')):
            raise UserError(f'{model_name} has no model_index.json to tell its family: pass --family '
                            f'({", ".join(FAMILIES)})')
        return FAMILIES['sd']
    for family in FAMILIES.values():  # the first family that lists the pipeline (FluxPipeline: flux)
        if name in family.pipelines:
            return family
    known = sorted({p for f in FAMILIES.values() for p in f.pipelines})
    raise UserError(f'{model_name}/model_index.json names {name!r}, not a pipeline this script knows '
                    f'({", ".join(known)}); pass --family')


def check_model_folder(model_name: str, family: Family, own_vae: bool = True) -> None:
    """A local model folder must have vae/ and each text encoder and tokenizer subfolder of its family,
    each encoder of the class the family reads, or of its kin, and each tokenizer's files (check_encoder).
    A path that is no folder was refused by check_model_name."""
    for enc in family.encoders:
        if enc.folder and not os.path.isdir(enc.folder):
            check_model_name(enc.folder)
    layout = ', '.join(['vae/', *(f'{e.source}/ ({e.model_class}) + {e.tokenizer}/'
                                  for e in family.encoders)])  # for the messages
    for folder, sub in [(model_name, 'vae')] * own_vae + [(e.folder or model_name, s) for e in family.encoders
                                                           for s in (e.subfolder, e.tokenizer)]:
        if os.path.isdir(folder) and not os.path.isdir(os.path.join(folder, sub)):
            raise UserError(f'model folder {folder} has no {sub}/ (the {family.name} layout: {layout})')
    for enc in family.encoders:
        if os.path.isdir(enc.folder or model_name) and not enc.package:  # OpenCLIP's: read_config says
            check_encoder(enc, enc.folder or model_name, family.name, layout)


def check_encoder(enc: TextEncoder, folder: str, family: str, layout: str) -> None:
    """A local text encoder: its config.json is that of the class the recipe or layout reads (by
    `architectures`, else `model_type`), and its tokenizer's files are there; else one line that names
    what the folder holds and which recipe, subfolder or family would read it."""
    where = os.path.join(folder, enc.subfolder).rstrip('/')
    reader = f'the {enc.recipe} recipe' if enc.recipe else f'the {family} layout'
    config = read_config(where)
    if config is None or 'model_type' not in config and 'architectures' not in config:
        pipeline = os.path.isfile(os.path.join(where, 'model_index.json'))
        what = ('a pipeline (model_index.json)' if pipeline else f'a diffusers {config["_class_name"]}'
                if config and '_class_name' in config else 'no config.json of a transformers model')
        raise UserError(f'{where} holds {what}, not a text encoder: {reader} reads a {enc.model_class}'
                        + encoders_in(folder if enc.subfolder else where, enc))
    if not holds(config, enc.model_class):
        held = (config.get('architectures') or [None])[0] or f'a {config["model_type"]} model'
        if not enc.recipe:
            raise UserError(f'model folder {folder}: {enc.subfolder or "."}/ holds {held}, but {reader} '
                            f'expects {enc.model_class} there ({layout}); pass the family of that folder')
        fitting = [r for r, e in RECIPES.items() if not e.package and holds(config, e.model_class)]
        raise UserError(f'{where} holds {held}, but {reader} reads {enc.model_class}; ' + (
            f'give that folder with the recipe of its encoder ({", ".join(fitting)})' if fitting
            else 'give a folder that holds one'))
    tokenizer = os.path.join(folder, enc.tokenizer).rstrip('/')
    files = tokenizer_files(enc.tokenizer_class)
    if not any(all(os.path.isfile(os.path.join(tokenizer, f)) for f in group) for group in files):
        held = (read_config(tokenizer, 'tokenizer_config.json') or {}).get('tokenizer_class')
        raise UserError(f'{tokenizer} holds no {enc.tokenizer_class} files ('
                        + ' or '.join(' + '.join(g) for g in files) + ')' + f', but a {held}' * bool(held)
                        + f": {reader} reads {where}'s tokenizer there (a text_encoder* subfolder's in the "
                        "tokenizer* beside it); save the encoder's own tokenizer there")


def read_config(folder: str, name: str = 'config.json') -> dict | None:
    """A JSON file of a model folder as a dict; None when absent or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(folder, name)) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    return None


def holds(config: dict, model_class: str) -> bool:
    """Whether a config.json is that of `model_class` or its kin: by `architectures`, else by `model_type`
    (a composite config's part included, as a CLIP's text model is read from a whole CLIP's folder)."""
    if found := config.get('architectures'):
        return any(kin(model_class) == kin(c) for c in found)
    import transformers

    cfg = getattr(transformers, model_class).config_class
    part = config.get(cfg.base_config_key) if cfg.base_config_key else None
    return config.get('model_type') == cfg.model_type or (isinstance(part, dict)
                                                           and part.get('model_type') == cfg.model_type)


def encoders_in(folder: str, enc: TextEncoder) -> str:
    """A hint naming the text_encoder* subfolders of a pipeline `folder` that hold `enc`'s class."""
    subs = sorted(d for d in os.listdir(folder) if d.startswith('text_encoder')
                  and holds(read_config(os.path.join(folder, d)) or {}, enc.model_class)) \
        if os.path.isdir(folder) else []
    return f'; e.g. {enc.recipe or "RECIPE"}={folder}:{subs[0]}' if subs else ''


def tokenizer_files(class_name: str) -> list[tuple[str, ...]]:
    """The file sets a tokenizer class loads from (any one set): a fast one's tokenizer.json, or the
    files of its slow kind."""
    import transformers

    if class_name == 'AutoTokenizer':
        return [('tokenizer.json',), ('tokenizer_config.json',)]
    names = dict(getattr(transformers, class_name).vocab_files_names)
    fast = [(names.pop('tokenizer_file'),)] if 'tokenizer_file' in names else []
    return fast + [tuple(names.values())]


def kin(class_name: str) -> str:
    """A transformers class without its head: Qwen3ForCausalLM and Qwen3Model (loadable from each other's
    folders) give Qwen3; CLIPTextModel and CLIPTextModelWithProjection stay apart."""
    return re.sub(r'(For[A-Za-z]+|Model)$', '', class_name)


def load_tokenizers(model_name: str, family: Family) -> list:
    import transformers

    tokenizers = []
    for enc in family.encoders:
        folder = enc.folder or model_name
        with failing(f'cannot load the tokenizer ({enc.tokenizer}/) of {folder} as {enc.tokenizer_class}: '):
            tokenizers.append((OWN_CLASSES.get(enc.tokenizer_class) or getattr(
                transformers, enc.tokenizer_class)).from_pretrained(folder, subfolder=enc.tokenizer))
        if enc.padding_side:
            tokenizers[-1].padding_side = enc.padding_side
    return tokenizers


def token_lengths(family: Family, tokenizers: list, t5_max_length: int) -> list[int]:
    """Tokens per caption for each encoder, as the family's pipeline pads and truncates."""
    return [(t5_max_length or enc.max_length) if enc.t5 else (enc.max_length or tok.model_max_length)
            + (len(tok.encode(enc.template.split('{}')[0])) if enc.prefix_tokens else 0)
            for enc, tok in zip(family.encoders, tokenizers)]


def encoder_configs(model_name: str, family: Family, tokenizers: list, lengths: list[int]) -> list:
    """Each text encoder's config, checked to fit its tokenizer: ids inside the embedding table, lengths
    inside the positions."""
    from transformers import AutoConfig

    configs = []
    for enc, tok, length in zip(family.encoders, tokenizers, lengths):
        with failing(f'cannot read the config of {enc.subfolder}/ of {enc.folder or model_name}: '):
            cfg = getattr(OWN_CLASSES.get(enc.model_class), 'read_config', AutoConfig.from_pretrained)(
                enc.folder or model_name, subfolder=enc.subfolder)
        cfg = getattr(cfg, 'text_config', cfg)  # a vision-language model's language part
        if len(tok) > cfg.vocab_size:
            raise UserError(f'{enc.tokenizer}/ has {len(tok)} tokens but {enc.subfolder}/ embeds only '
                            f'{cfg.vocab_size}: the tokenizer does not belong to that text encoder')
        positions = getattr(cfg, 'max_position_embeddings', None)
        if positions is not None and length > positions:
            raise UserError(f'{enc.tokenizer}/ pads to {length} tokens but {enc.subfolder}/ has only '
                            f'{positions} positions: the tokenizer does not belong to that text encoder')
        configs.append(cfg)
    return configs


# >>> twin: paths (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
def is_remote(path: str) -> bool:
    return urllib.parse.urlparse(path).scheme not in ('', 'file')


def join(root: str, *names: str) -> str:
    """Join path pieces, dropping empty ones (works for local paths and URLs)."""
    return '/'.join([root.rstrip('/')] + [n.strip('/') for n in names if n])
# <<< twin: paths


def last_line(err: BaseException) -> str:
    """The last non-empty line of an exception's message."""
    text = str(err).strip() or type(err).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else text


@contextlib.contextmanager
def failing(before: str, after: str = ''):
    """Any failure inside (but a UserError) as the one line `before` + its last line + `after`."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        raise UserError(f'{before}{last_line(err)}{after}') from None


def fetch(url: str, dest: str, timeout: float) -> None:
    """Download one file from a remote (or copy a local one) to `dest`, atomically."""
    from streaming.base.storage.download import CloudDownloader

    if not is_remote(url) and not os.path.isfile(url):
        raise FileNotFoundError(f'{url} does not exist')
    with tempfile.TemporaryDirectory(dir=os.path.dirname(dest) or '.', ignore_cleanup_errors=True) as tmp_dir:
        CloudDownloader.direct_download(url, os.path.join(tmp_dir, 'f'), timeout)
        os.replace(os.path.join(tmp_dir, 'f'), dest)


# >>> twin: read-json (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
def read_json(url: str, timeout: float, object_hook: Callable[[dict], Any] | None = None) -> Any:
    """A JSON file at a remote (fetched to a temporary file) or in a folder (read in place)."""
    with contextlib.ExitStack() as stack:
        if is_remote(url):
            local = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), 'f')
            fetch(url, local, timeout)
            url = local
        with open(url) as f:
            return json.load(f, object_hook=object_hook)
# <<< twin: read-json


# >>> twin: put-text (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
def put_text(out_root: str, staging: str, relpath: str, text: str | Iterable[str]) -> None:
    """Write `text`, or its pieces in order, to `<out_root>/<relpath>` (local: atomically; remote: via
    `staging`)."""
    if not is_remote(out_root):
        path = os.path.join(out_root, relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + '.tmp', 'w') as f:
            f.writelines([text] if isinstance(text, str) else text)
        os.replace(path + '.tmp', path)
        return
    from streaming.base.storage.upload import CloudUploader

    folder, name = os.path.split(relpath)
    with tempfile.TemporaryDirectory(dir=staging, ignore_cleanup_errors=True) as local_dir:
        with open(os.path.join(local_dir, name), 'w') as f:
            f.writelines([text] if isinstance(text, str) else text)
        uploader = CloudUploader.get((local_dir, join(out_root, folder)), keep_local=False, exist_ok=True)
        uploader.upload_file(name)
# <<< twin: put-text


# >>> twin: parts (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
@dataclasses.dataclass(frozen=True)
class Part:
    """A unit of work: consecutive whole input shards, i.e. global sample ids [first, last)."""

    name: str
    shards: tuple[int, ...]
    first: int
    last: int


def plan_parts(shards: list[dict], part_size: int) -> list[Part]:
    """Group consecutive shards into parts of at least `part_size` samples (the last may be smaller)."""
    parts: list[Part] = []
    group: list[int] = []
    first = count = 0
    for i, shard in enumerate(shards):
        group.append(i)
        count += shard['samples']
        if count >= part_size or i == len(shards) - 1:
            parts.append(Part(f'{len(parts):05d}', tuple(group), first, first + count))
            first += count
            group, count = [], 0
    return parts
# <<< twin: parts


def read_input_index(src: str, cache: str, timeout: float) -> list[dict]:
    """The shard list of the input dataset at `src` (a copy is kept in `cache`): an MDS index with shards,
    and for a local input every shard file it lists there."""
    url = join(src, INDEX)
    if not is_remote(src) and not os.path.isfile(url):
        raise UserError(f'no input dataset at {src}: it has no {INDEX}{datasets_below(src)}')
    os.makedirs(cache, exist_ok=True)
    local = os.path.join(cache, INDEX)
    with failing(f'cannot read the input dataset index {url}: '):  # unreachable, missing, corrupt
        if url != local:
            fetch(url, local, timeout)
        with open(local) as f:
            obj = json.load(f, object_hook=shared_lists())
    shards = obj.get('shards') if isinstance(obj, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and set(SHARD_RECORD) <= s.keys()
                                               for s in shards):
        raise UserError(f'{url} is not an MDS index (a "shards" list of records with '
                        f'{", ".join(SHARD_RECORD)}); give the output of laion_cloudwriter.py or of '
                        "streaming's MDSWriter")
    if not shards:
        raise UserError(f'{url} lists no shards: the input dataset is empty, nothing to encode; check '
                        '--remote_download, --local, --bucket and --subfolder')
    for shard in shards:
        if shard.get('format') != 'mds':
            raise UserError(f'{url}: only MDS shards are supported, found {shard.get("format")!r}')
    gone = [] if is_remote(src) else [s['raw_data']['basename'] for s in shards if not any(
        os.path.isfile(os.path.join(src, f['basename'])) for f in (s['raw_data'], s['zip_data']) if f)]
    if gone:
        raise UserError(f'{src}: {len(gone)} of the {len(shards)} shard files its {INDEX} lists are not '
                        f'there ({gone[0]}{", ..." * (len(gone) > 1)}): the dataset is incomplete; copy them '
                        'there again, or rebuild it')
    return shards


def datasets_below(src: str) -> str:
    """A hint naming the datasets one folder below a local `src` (a forgotten --subfolder); '' for none."""
    below = sorted(d for d in os.listdir(src) if os.path.isfile(os.path.join(src, d, INDEX))) \
        if os.path.isdir(src) else []
    if not below:
        return '' if os.path.isdir(src) else ' (no such folder)'
    where = ', '.join(f'{src}/{d}/{INDEX}' for d in below[:3]) + ' ...' * (len(below) > 3)
    return f', but {where} {"exists" if len(below) == 1 else "exist"}: pass --subfolder {below[0]}'


# >>> twin: shared-lists (verbatim in caption_images.py, curate_images.py, precompute_latents.py;
# test_twins.py)
def shared_lists() -> Callable[[dict], dict]:
    """An object_hook for json.load of an MDS index.json: the lists its shard records repeat (the column
    names, encodings and sizes) are held once, so that a record takes ~0.9 KB instead of ~3.5 (rank 0
    holds the input's index while it plans: ~470k records in LAION-2B's biggest bucket). Nothing may
    change such a list in place."""
    seen: dict[tuple, list] = {}

    def shared(obj: dict) -> dict:
        for key, value in obj.items():
            if isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value):
                obj[key] = seen.setdefault((key, *value), value)
        return obj
    return shared
# <<< twin: shared-lists

# >>> twin: index-text (verbatim in caption_images.py, curate_images.py, precompute_latents.py;
# test_twins.py)
def index_text(shards: Iterable[dict]) -> Iterator[str]:
    """The text of an MDS index.json over `shards` (as `json.dumps({'version': 2, 'shards': [...]})` writes
    it), piece by piece: a merge writes each record as it reads it (~644k in LAION-2B's biggest bucket)."""
    yield '{"version": 2, "shards": ['
    for i, shard in enumerate(shards):
        yield ', ' * bool(i) + json.dumps(shard)
    yield ']}'
# <<< twin: index-text


# >>> twin: index-digest (verbatim in caption_images.py, curate_images.py, precompute_latents.py;
# test_twins.py)
def index_digest(shards: list[dict]) -> str:
    """The sha1 of an input's shard records as `json.dumps(shards, sort_keys=True)` writes them (its
    identity in the markers), taken record by record: never the whole index as one string, 0.6 GB at
    LAION-2B's biggest bucket."""
    digest = hashlib.sha1(b'[')
    for i, shard in enumerate(shards):
        digest.update((', ' * bool(i) + json.dumps(shard, sort_keys=True)).encode())
    digest.update(b']')
    return digest.hexdigest()
# <<< twin: index-digest


def input_columns(shards: list[dict], src: str, caption_keys: list[str]) -> dict[str, str]:
    """{column name: MDS encoding} of the input, checked for the columns the script reads: images in
    `jpg`, text in each caption key."""
    columns = dict(zip(shards[0]['column_names'], shards[0]['column_encodings']))
    if any(dict(zip(s['column_names'], s['column_encodings'])) != columns for s in shards[1:]):
        raise UserError(f'{src}: shards disagree on their columns')
    listed = ', '.join(f'{c} ({e})' for c, e in columns.items())
    if columns.get(IMAGE_COLUMN) not in IMAGE_ENCODINGS:
        what = 'has no' if IMAGE_COLUMN not in columns else f'has a {columns[IMAGE_COLUMN]}'
        raise UserError(f'{src}: the input {what} `{IMAGE_COLUMN}` column of images (columns: {listed}); '
                        f'this script reads each image from `{IMAGE_COLUMN}` (encoded '
                        f'{", ".join(IMAGE_ENCODINGS)}): write the dataset with its images there')
    for key in caption_keys:
        if key not in columns:
            raise UserError(f'{src}: the input has no `{key}` column (columns: {listed}); check '
                            '--caption_keys')
        if columns[key] != 'str':
            texts = ', '.join(c for c, e in columns.items() if e == 'str') or 'none'
            raise UserError(f"--caption_keys {key}: the input's `{key}` column holds {columns[key]}, not "
                            f"text (str); name text columns (the input's: {texts})")
    return columns


def output_names(out_root: str) -> list[str] | None:
    """Every file below `out_root`, as paths relative to it ([] when there is none; None when the
    store cannot list)."""
    if not is_remote(out_root):
        return [os.path.relpath(os.path.join(folder, f), out_root)
                for folder, _, files in os.walk(out_root) for f in files]
    from streaming.base.storage.upload import CloudUploader

    prefix = urllib.parse.urlparse(out_root).path.strip('/')
    try:
        with tempfile.TemporaryDirectory() as tmp:
            keys = CloudUploader.get((tmp, out_root), exist_ok=True).list_objects() or []
    except NotImplementedError:
        return None
    except Exception as err:
        raise UserError(f'cannot reach the output {out_root}: {last_line(err)}') from None
    return [k[len(prefix):].lstrip('/') if prefix else k for k in keys]


def check_output_is_ours(out_root: str, names: list[str] | None) -> None:
    """Refuse an output place that holds files, none of them the mark of this script's output (its
    convention.json, written before the first part, or a part's _done marker): another dataset, which
    the parts and the merged index would overwrite."""
    if not names or CONVENTION in names or any(n.endswith(f'/{DONE_MARKER}') for n in names):
        return
    shown_names = ', '.join(sorted(names)[:3]) + (f' and {len(names) - 3} more' if len(names) > 3 else '')
    raise UserError(f'--remote_upload {out_root} holds files this script did not write ({shown_names}), '
                    'perhaps another dataset; pass a new or empty --remote_upload, or remove those files')


def done_markers(out_root: str, parts: list[Part], names: list[str] | None,
                 timeout: float) -> Iterator[tuple[str, dict]]:
    """(part name, marker) of each part of `out_root` that a previous run finished (`names`: the output's
    files; None: probe every part), in part order: read 16 at a time and at most 256 ahead, so that a
    caller holds one marker at a time."""
    done = None if names is None else {n for n in names if n.endswith(f'/{DONE_MARKER}')}
    listed = [p.name for p in parts if done is None or f'{p.name}/{DONE_MARKER}' in done]

    def read_marker(name: str) -> tuple[str, dict | None]:
        with contextlib.suppress(Exception):  # absent or unreadable: the part is simply done again
            return name, read_json(join(out_root, name, DONE_MARKER), timeout)
        return name, None

    with ThreadPoolExecutor(16) as pool:
        for start in range(0, len(listed), 256):
            yield from ((n, m) for n, m in pool.map(read_marker, listed[start:start + 256]) if m is not None)


# >>> twin: named (verbatim in caption_images.py, curate_images.py, precompute_latents.py; test_twins.py)
# An image skipped, refused, failed or decoded with a warning (from PIL or libtiff) is named (sample id, key,
# reason or notes) in its part's marker or file, which holds at most --part_size names. A summary keeps
# their count per reason and the first FIRST_NAMED per reason (in part order) and says where the rest are,
# as laion_cloudwriter.py does its left-outs: the summary, and rank 0's memory as it reads the markers one
# at a time, stay the same size whatever their number (~20M images at 1% of LAION-2B).
FIRST_NAMED = 20


def named() -> dict:
    """No image named yet: {'by_reason': {reason: count}, 'first': {reason: [entry, ...]}}; a summary adds
    'in', where each one is named."""
    return {'by_reason': {}, 'first': {}}


def add_named(names: dict, entries: list[dict]) -> dict:
    """`names` with `entries` ({'id', 'key', and 'reason' or 'notes'}) added, each under its reason: the words
    before the first ': ' of its reason or first note (an error's type, 'HTTP 400 from <endpoint>', a
    warning's category)."""
    for entry in entries:
        reason = (entry.get('reason') or entry['notes'][0]).split(': ')[0][:100]
        names['by_reason'][reason] = names['by_reason'].get(reason, 0) + 1
        if len(first := names['first'].setdefault(reason, [])) < FIRST_NAMED:
            first.append(entry)
    return names


def named_lines(names: dict) -> list[str]:
    """The screen's account of named images: per reason, its count and its first three (the first with
    what was said of it)."""
    lines = []
    for reason, n in names['by_reason'].items():
        first = names['first'][reason]
        said = ' '.join((first[0].get('reason') or '; '.join(first[0]['notes'])).split())
        lines.append(f'{n} x {reason}: ' + ', '.join(f'sample {e["id"]} key={e["key"]!r}' for e in first[:3])
                     + ', ...' * (n > 3) + f' (first: {said[:120]})' * (said != reason))
    return lines + [f'(each named in {names["in"]})'] * bool(lines)
# <<< twin: named


def text_column_specs(family: Family, configs: list, lengths: list[int], storage: str,
                      t5_storage: str, keys: list[str]) -> dict[str, dict]:
    """{column: its record in the convention}: dtype, shape, and what it holds, for each caption key."""
    specs: dict[str, dict] = {}
    for key, col in [(k, c) for k in keys for c in family.columns]:
        name = key + col.suffix
        encs = [family.encoders[i] for i in col.encoders]
        length = encs[0].select or lengths[col.encoders[0]] - encs[0].drop  # rows stored when padded
        if col.what == 'mask':
            specs[name] = {'dtype': 'bool', 'shape': [length], 'what': f'{encs[0].tokenizer} attention mask'}
            continue
        dim = sum(configs[i].projection_dim if col.what == 'pooled' and e.pooled == 'text_embeds'  # projected
                  else (getattr(configs[i], 'hidden_size', None) or configs[i].d_model)  # T5: d_model
                  * max(1, len(e.layers) if col.what == 'hidden' else 0)  # 'stack': layers side by side
                  for i, e in zip(col.encoders, encs))
        what = ' + '.join(f'{e.recipe or e.subfolder} {e.pooled if col.what == "pooled" else e.hidden}'
                          + (f' {list(e.layers)}' if e.layers and col.what == 'hidden' else '') for e in encs)
        shape = [dim] if col.what == 'pooled' else [length, dim]
        specs[name] = {'dtype': storage, 'shape': shape, 'what': what}
        if col.what == 'hidden' and (encs[0].variable or t5_storage == 'trimmed' and encs[0].t5):
            n = name.removesuffix('_latents') + '_length'
            drop = f' after the first {encs[0].drop}' if encs[0].drop else ''
            rows = (f'the n rows under the attention mask{drop}' if encs[0].variable
                    else 'the first n rows (n = tokens incl. </s>)')
            passes = (', as the pipeline passes them' if not encs[0].trims else
                      ' (--t5_storage trimmed: the pipeline passes the padded rows too)') * encs[0].variable
            specs[name].update(shape=['n', dim], length_column=n,
                               what=f'{what}; only {rows} are stored{passes}')
            specs[n] = {'dtype': 'int32', 'shape': [], 'what': f'n of {name}'}
    return specs


def make_convention(args: argparse.Namespace, family: Family, tokenizers: list, vae: dict,
                    crop: CenterCrop) -> dict:
    """Everything a consumer needs to read the output without guessing (written as convention.json)."""
    lengths = token_lengths(family, tokenizers, args.t5_max_length)
    configs = encoder_configs(args.model_name, family, tokenizers, lengths)
    storage = args.storage_dtype or family.storage or 'float16'  # else the one its consumer reads
    columns = text_column_specs(family, configs, lengths, storage, args.t5_storage, args.caption_keys)
    if args.caption_drop_prob:
        columns[DROPPED_COLUMN] = {
            'dtype': 'int32', 'shape': [], 'what': "1: this sample's text columns encode '' (dropped with "
            'caption_drop_prob, drawn from numpy default_rng([seed, sample index, 0])); `caption` keeps the '
            'text; 0: they encode `caption`'}
    for r in crop.tables:
        columns.update(crop.specs(r, vae, storage, args.latent_mode))
        for name in (LATENT_COLUMN.format(res=r), TIME_IDS_COLUMN.format(res=r)):
            if args.flip and name in columns:
                columns[FLIPPED.format(column=name)] = {
                    **columns[name], 'what': columns[name]['what'] + '; of the horizontally mirrored crop'}
    record = crop.record(args.seed, args.flip)
    keys = {} if args.caption_keys == ['caption'] else {'caption_keys': args.caption_keys}  # as it always was
    dropped = {'dropped_columns': args.drop_columns} if args.drop_columns else {}
    return {**({'crop': record} if record else {}), **keys, **dropped,
        'family': family.name, 'model': args.model_name, 'pipeline': family.prompt_embeds,
        'text_encoders': [{'subfolder': e.subfolder, 'class': e.model_class, 'tokens': n, 'hidden': e.hidden,
                           'pooled': e.pooled, 'mask_applied': e.masked(c), **e.record()}
                          for e, n, c in zip(family.encoders, lengths, configs)],
        'image_latents': vae,
        'storage_dtype': storage, 't5_storage': args.t5_storage,
        'caption_drop_prob': args.caption_drop_prob, 'columns': columns,
    }


@dataclasses.dataclass
class Plan:
    """What rank 0 found and every rank needs."""

    places: Places
    family: Family
    tokenizers: list
    crop: CenterCrop
    shards: list[dict] | dict[int, tuple[int, dict]]  # the input's (a rank's: its parts', see numbered)
    columns: dict[str, str]
    parts: list[Part]  # every part (rank 0 only)
    pending: list[Part]  # the parts without a _done marker (a rank: its share, every world-th)
    finished: int  # the parts with one before this run
    settings: dict
    image: ImageLatents


def make_plan(args: argparse.Namespace, pl: Places, dtype: torch.dtype) -> Plan:
    """Rank 0: find the input, check it and the model, and list the parts still to do."""
    check_output_format(args.size_limit, args.compression)
    shards = read_input_index(pl.src, pl.cache, args.download_timeout)
    columns = input_columns(shards, pl.src, args.caption_keys)
    if unknown := [c for c in args.drop_columns if c not in columns]:
        raise UserError(f'--drop_columns {unknown[0]}: the input has no such column (columns: '
                        f'{", ".join(columns)})')
    family = composed(args.text_encoder) if args.text_encoder else pick_family(args.model_name, args.family)
    check_family_flags(args, family)
    if args.t5_storage == 'trimmed':  # an LLM's padded states: keep the rows under the mask, as variable
        family = dataclasses.replace(family, encoders=tuple(
            dataclasses.replace(e, variable=e.variable or e.trims) for e in family.encoders))
    check_model_folder(args.model_name, family, own_vae=not args.vae)
    image = find_vae(args.model_name, args.vae)
    multiple, step = bucket_rule(image, family, args.resolutions)
    tokenizers = load_tokenizers(args.model_name, family)
    crop = make_crop(args.crop, args.resolutions, step, args.max_aspect or MAX_ASPECT, args.random_crop)
    convention = make_convention(args, family, tokenizers, image.record(args.latent_mode, multiple), crop)
    new_columns = convention['columns']
    if clash := [c for c in new_columns if c in columns]:
        raise UserError(f'{pl.src} already has column(s) {", ".join(clash)}: is it an output of this script?')
    for c in args.drop_columns:
        del columns[c]
    columns.update({c: 'int32' if s['dtype'] == 'int32' and s['shape'] == [] else 'bytes'
                    for c, s in new_columns.items()})
    parts = plan_parts(shards, args.part_size)
    settings = {'model_name': args.model_name, 'latent_mode': args.latent_mode, 'seed': args.seed,
                'resolutions': sorted(args.resolutions), 'dtype': str(dtype).replace('torch.', ''),
                'caption_drop_prob': args.caption_drop_prob, 'part_size': args.part_size,
                'batch_size': args.batch_size, 'input_samples': parts[-1].last,
                'input_index': index_digest(shards)[:16]}
    if args.crop != 'center':  # center outputs keep the record they always had
        settings['crop'] = args.crop
    if args.drop_columns:
        settings['drop_columns'] = args.drop_columns
    settings['convention'] = convention  # last: a flag that differs is named before the record it changes
    names = output_names(pl.out)
    check_output_is_ours(pl.out, names)
    done = set()
    for part_name, marker in done_markers(pl.out, parts, names, args.download_timeout):
        if changed := what_changed(marker.get('settings', {}), settings):
            raise UserError(f'{pl.out}/{part_name} was written with {changed}: rerun with the same flags or '
                            'write to a new --remote_upload')
        done.add(part_name)
    pending = [p for p in parts if p.name not in done]
    os.makedirs(pl.staging, exist_ok=True)  # the mark that the output is ours, before its first part:
    put_text(pl.out, pl.staging, CONVENTION, json.dumps(convention, indent=1))
    return Plan(pl, family, tokenizers, crop, shards, columns, parts, pending, len(done), settings, image)


def what_changed(old: dict, new: dict) -> str:
    """What differs between a finished part's settings and this run's, said as the user gave it ('' when
    nothing): the first setting that differs, or where that lies in the convention and the text encoders
    or the VAE differ, those by name."""
    if not (differ := first_difference(old, new)):
        return ''
    key, a, b = differ
    before, now = old.get('convention') or {}, new['convention']
    for part, name, named in (('text_encoders', '--text_encoder' if now['family'] == 'composed' else
                               'the text encoders', encoders_named), ('image_latents', 'the VAE', vae_named)):
        if key.startswith('convention.') and before.get(part) != now[part]:
            return f'{name} {named(before)}, this run has {named(now)}'
    return f'{key}={shown_value(a)}, this run has {shown_value(b)}'


def encoders_named(convention: dict) -> str:
    """A convention's text encoders as given: RECIPE=FOLDER[:SUBFOLDER] each (a family's: its subfolders)."""
    return ' '.join(f'{e["recipe"]}={e["folder"]}' + f':{e["subfolder"]}' * bool(e['subfolder'])
                    if e.get('recipe') else f'{e.get("subfolder")}/ ({e.get("class")})'
                    for e in convention.get('text_encoders') or []) or 'none'


def vae_named(convention: dict) -> str:
    """A convention's VAE: where it is and its class (the model's own vae/ unless --vae named another)."""
    image = convention.get('image_latents') or {}
    where = image.get('vae') or f'{convention.get("model")}:vae'
    return f'{where} ({image.get("vae_class", "AutoencoderKL")})'


def shown_value(value: Any, width: int = 100) -> str:
    """A setting's value for a message: its repr, cut at the end only when longer than `width`."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 1] + '…'


def first_difference(old: Any, new: Any, path: str = '') -> tuple[str, Any, Any] | None:
    """(dotted key, old value, new value) of the first leaf where two settings records differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [k for k in old if k not in new] + list(new):
            if found := first_difference(old.get(k), new.get(k), f'{path}.{k}' if path else k):
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and old != new:
        return next(first_difference(a, b, f'{path}[{i}]')
                    for i, (a, b) in enumerate(zip(old, new)) if a != b)
    return None if old == new else (path, old, new)


def share_plan(args: argparse.Namespace, pl: Places, dtype: torch.dtype, rank: int, world: int) -> Plan:
    """Rank 0 makes the plan (or meets the error). Every rank receives what all need (the model's
    tokenizers, the convention: broadcast), then, scattered, only its share of the parts to do (every
    world-th) and their input shards: the input's index, ~0.5M shard records in LAION-2B's biggest bucket,
    stays whole on rank 0 alone, and only while it plans."""
    plan: Any = None
    shares: list[Any] = [None] * world
    if rank == 0:
        try:
            plan = make_plan(args, pl, dtype)
            for r in range(world):
                shares[r] = (mine := plan.pending[r::world], numbered(mine, plan.shards))
        except UserError as err:
            plan = err
    if world > 1:
        common = [plan if rank or isinstance(plan, UserError) else
                  dataclasses.replace(plan, shards={}, parts=[], pending=[])]
        dist.broadcast_object_list(common, src=0)
        plan = plan if rank == 0 else common[0]
    if isinstance(plan, UserError):
        raise plan
    received = shares[:1]  # rank 0 keeps its own
    if world > 1:
        dist.scatter_object_list(received, [None, *shares[1:]] if rank == 0 else None, src=0)
    pending, shards = shares[0] if rank == 0 else received[0]
    return dataclasses.replace(plan, pending=pending, shards=shards)


def numbered(parts: list[Part], shards: list[dict]) -> dict[int, tuple[int, dict]]:
    """{shard number: (its first sample id, its index record)} of the shards of `parts`."""
    table = {}
    for part in parts:
        first = part.first
        for n in part.shards:
            table[n] = (first, shards[n])
            first += shards[n]['samples']
    return table


# ----------------------------------------------------------------------------------------------
# Reading: shards, decoding, the crop rows, batches (runs in DataLoader workers)
# ----------------------------------------------------------------------------------------------

class ShardCache:
    """Input shards on local disk: downloaded (and decompressed) on first use, once per machine. `shards`:
    {shard number: (its first sample id, its index record)} of the shards this process reads (numbered)."""

    def __init__(self, shards: dict[int, tuple[int, dict]], remote: str | None, local: str, timeout: float,
                 retry: int):
        self.shards, self.readers = shards, {}
        self.starts = sorted((first, n) for n, (first, _) in shards.items())  # get()'s sample -> shard
        self.remote, self.local, self.timeout, self.retry = remote, local, timeout, retry
        self._stream_pid = -1  # the process self._stream and self._ready (shards made readable) belong to

    def reader(self, shard: int):
        """Shard `shard`'s streaming reader, made on first use."""
        if shard not in self.readers:
            from streaming.base.format import reader_from_json

            self.readers[shard] = reader_from_json(self.local, None, as_stored(self.shards[shard][1]))
        return self.readers[shard]

    def ensure(self, shard: int) -> None:
        """Make shard `shard` readable; a file lock keeps processes from fetching it twice."""
        if self._stream_pid != os.getpid():  # one client per process (DataLoader workers are forks)
            from streaming import Stream

            self._stream = Stream(remote=self.remote, local=self.local, download_retry=self.retry,
                                  download_timeout=self.timeout, keep_zip=False)
            self._stream_pid, self._ready = os.getpid(), set()
        if shard in self._ready:
            return
        reader = self.reader(shard)
        lock_path = os.path.join(self.local, f'.{reader.raw_data.basename.replace("/", "_")}.lock')
        with open(lock_path, 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._stream.prepare_shard(reader)
        self._ready.add(shard)

    def evict(self, shard: int) -> None:
        """Delete a shard's local files (only ever called for a downloaded copy)."""
        for raw, zipped in self.reader(shard).file_pairs:
            names = [info.basename for info in (raw, zipped) if info is not None]
            for name in names + [f'.{raw.basename.replace("/", "_")}.lock']:  # and ensure's lock
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.local, name))
        self.readers.pop(shard, None)

    def get(self, sample_id: int) -> dict[str, Any]:
        first, shard = self.starts[bisect.bisect_right(self.starts, (sample_id, math.inf)) - 1]
        self.ensure(shard)
        return self.reader(shard).get_item(sample_id - first)


# >>> twin: stored-files (verbatim in caption_images.py, curate_images.py, precompute_latents.py;
# test_twins.py)
# streaming's encodings whose stored bytes are a whole image file: read as those bytes and written back the
# same, never decoded to write them again (its writer saves a PIL image as a new JPEG at quality 75)
FILE_ENCODINGS = ('jpeg', 'png')


def as_stored(shard: dict) -> dict:
    """An input shard's record (of index.json), its FILE_ENCODINGS columns read as the bytes stored."""
    return {**shard, 'column_encodings': ['bytes' if e in FILE_ENCODINGS else e
                                          for e in shard['column_encodings']]}


def mds_writer(columns: dict[str, str], **kwargs):
    """streaming's MDSWriter that writes the FILE_ENCODINGS columns as the bytes `as_stored` read (the same
    image file), recorded under their own encoding, so a reader decodes them as before."""
    from streaming import MDSWriter

    class StoredBytesWriter(MDSWriter):
        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), 'column_encodings': [columns[c] for c in self.column_names]}

    return StoredBytesWriter(columns={c: 'bytes' if e in FILE_ENCODINGS else e for c, e in columns.items()},
                             **kwargs)
# <<< twin: stored-files


def empty_cache(cache_dir: str) -> None:
    """Delete what an earlier run left in this run's download folder, except the input's index: a
    shard a killed run left cannot be checked against the input (an MDS index states sizes, rarely
    hashes), so every shard a run reads is one it downloaded itself."""
    for entry in os.listdir(cache_dir) if os.path.isdir(cache_dir) else []:
        path = os.path.join(cache_dir, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif entry != INDEX:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def prefetch(parts: list[Part], cache: ShardCache, writer: PartWriter, ahead: int = 2) -> None:
    """A thread's work: download the shards of the next `ahead` parts while the current one is encoded.
    A failure is the workers' to report: they meet the same problem."""
    with contextlib.suppress(BaseException):
        for k, part in enumerate(parts):
            with writer.done_event:
                writer.done_event.wait_for(
                    lambda k=k: len(writer.finished_parts) + ahead > k or writer.error is not None)
            if writer.error is not None:
                return
            for shard in part.shards:
                cache.ensure(shard)


# >>> twin: decode (copied verbatim in caption_images.py, curate_images.py, laion_cloudwriter.py,
# precompute_latents.py; tests/test_twins.py checks the copies). The one decode rule of every script that
# looks at pixels, stated in docs/decoding.md.
DECODE_PIXEL_LIMIT = 2 * 89_478_485  # PIL's default bomb limit (2 x MAX_IMAGE_PIXELS), even if lifted
SIXTEEN_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N')  # grayscale modes, 0..65535
# 16-bit and 32-bit integer grayscale to 8 bits as tables PIL applies (an `I` image's values clipped to
# 0..65535 first): scaled by 255/65535 and rounded half to even, or (an `I` image within 0..255) clipped
EIGHT_BITS = {True: np.rint(np.arange(65536) * (255 / 65535)).astype(int).tolist(),
              False: np.clip(np.arange(65536), 0, 255).tolist()}


def decode(image: bytes | Image.Image, notes: list[str] | None = None) -> Image.Image:
    """An image column's value as a reader gives it (the stored bytes; a PIL image from streaming's jpeg,
    png or pil encodings) as the picture `to_rgb` states. What PIL warns and libtiff prints meanwhile is
    added to `notes` (when given), never printed."""
    with noted() as said:
        try:
            return to_rgb(opened(image))
        finally:
            if notes is not None:
                notes += said


def opened(image: bytes | Image.Image) -> Image.Image:
    """An image column's value as an image fresh from Image.open (a PIL image as it is)."""
    return image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image))


def to_rgb(img: Image.Image) -> Image.Image:
    """The 8-bit RGB picture a viewer shows of an image fresh from Image.open (a draft() allowed; nothing
    may have loaded it: after a failed load() a second one returns partial pixels without a word):
    - its first frame (animated GIF, APNG and WebP; MPO), at the size PIL decodes (after any draft());
    - refused (DecompressionBombError) above DECODE_PIXEL_LIMIT pixels, before anything is decoded;
    - EXIF orientation applied; a broken EXIF block turns nothing and loses nothing;
    - 16-bit grayscale scaled by 255/65535 (rounded half to even); 32-bit integer and float grayscale
      likewise when a value exceeds 255, else taken as 8-bit; clipped to 0..255; integers by a table (at
      most 4 bytes a pixel beside the image, not the 8 of a float64 copy);
    - transparency (an alpha band: RGBA, LA, PA; a tRNS chunk, 16-bit grayscale's key included, or GIF
      transparent index) over white;
    - every other mode (CMYK, LAB, YCbCr, palette, 1-bit) by PIL's convert('RGB'), ICC profiles ignored.
    Raises what PIL raises for bytes it cannot decode (truncated, corrupt, unknown)."""
    if img.width * img.height > DECODE_PIXEL_LIMIT:
        raise Image.DecompressionBombError(f'{img.width} x {img.height} pixels is over the limit of '
                                           f'{DECODE_PIXEL_LIMIT}: a decompression bomb?')
    img.load()
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose a good image
        ImageOps.exif_transpose(img, in_place=True)
    if img.mode in SIXTEEN_BIT or img.mode == 'I':
        table = EIGHT_BITS[img.mode != 'I' or img.getextrema()[1] > 255]
        if isinstance(key := img.info.get('transparency'), int) and 0 <= key < len(table):
            table = table[:key] + [255] + table[key + 1:]  # the tRNS key's pixels: white
        img = (img if img.mode == 'I' else img.convert('I')).point(table, 'L')
    elif img.mode == 'F':
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 255:
            arr *= 255 / 65535
        img = Image.fromarray(np.clip(np.rint(arr, out=arr), 0, 255, out=arr).astype(np.uint8))
    if img.has_transparency_data:
        rgba = img.convert('RGBA')
        img = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == 'RGB' else img.convert('RGB')


# What PIL warns (each time: a last warnings filter says 'always' for its UserWarnings and
# DecompressionBombWarning) and libtiff prints (its handlers are pointed here) while an image decodes
# would land inside progress bars and after summaries: in a thread inside noted() it is kept instead.
DECODING = threading.local()  # .notes: the list of this thread's innermost noted(); None outside


@contextlib.contextmanager
def noted() -> Iterator[list[str]]:
    """Inside, what PIL warns and libtiff prints in this thread goes to the list yielded (and then to an
    enclosing noted()'s), never to the console. Outside, PIL's warnings show as usual and libtiff's
    words are dropped (the error PIL raises for them stays)."""
    outer = getattr(DECODING, 'notes', None)
    DECODING.notes = notes = []
    try:
        yield notes
    finally:
        DECODING.notes = outer
        if outer is not None:
            outer += notes


def note_warning(message, category, filename, lineno, file=None, line=None, shown=warnings.showwarning):
    """warnings.showwarning: inside noted(), the warning is noted; outside, shown as before."""
    notes = getattr(DECODING, 'notes', None)
    if notes is None:
        return shown(message, category, filename, lineno, file, line)
    if (text := f'{category.__name__}: {str(message).strip()}') not in notes:
        notes.append(text)


def note_libtiff(module: bytes | None, fmt: bytes, args: int | None) -> None:
    """libtiff's error and warning handler (module, printf format, va_list): noted, or dropped."""
    notes = getattr(DECODING, 'notes', None)
    if notes is not None:
        text = ctypes.create_string_buffer(512)
        LIBC.vsnprintf(text, len(text), fmt, args)
        if (said := f'libtiff: {text.value.decode(errors="replace").strip()}') not in notes:
            notes.append(said)  # once: it may say the same of every strip


def quiet_libtiff() -> list:
    """Point the handlers of the libtiff PIL loaded (found in /proc/self/maps; Linux) at note_libtiff;
    returns what must stay referenced while they are set (nothing where libtiff is not found)."""
    with contextlib.suppress(OSError, AttributeError):
        with open('/proc/self/maps') as maps:
            path = next((ln.split()[-1] for ln in maps if '/libtiff' in ln), None)
        if path is not None:
            libtiff = ctypes.CDLL(path)
            handler = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)(note_libtiff)
            libtiff.TIFFSetErrorHandler(handler)
            libtiff.TIFFSetWarningHandler(handler)
            return [libtiff, handler]
    return []


LIBC = ctypes.CDLL(None)
LIBC.vsnprintf.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p)
LIBTIFF = quiet_libtiff()
warnings.showwarning = note_warning
warnings.filterwarnings('always', category=UserWarning, module=r'PIL\.', append=True)
warnings.filterwarnings('always', category=Image.DecompressionBombWarning, append=True)
# <<< twin: decode


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened, not yet decoded JPEG as shown: EXIF orientation applied."""
    w, h = img.size
    with contextlib.suppress(Exception):  # as in to_rgb: a broken EXIF block means no turn
        if img.getexif().get(ExifTags.Base.Orientation, 1) in ORIENTATION_SWAPS:
            return h, w
    return w, h


def bucket_table(res: int, step: int, max_aspect: float) -> tuple[tuple[int, int], ...]:
    """The (width, height) buckets of resolution `res`, sorted by aspect ratio (tall first).

    For each shorter side s = step, 2 step, ... <= res, the longer side is the largest multiple of
    `step` with s x long <= res x res, kept while long / s <= max_aspect, in both orientations. `step`
    is bucket_rule's: the VAE factor x 8 for the UNet families' VAE (a latent side is a multiple of 8), else
    the stored latent's factor x the denoiser's patch. E.g. 128 (step 64): 64x256, 128x128, 256x64.
    """
    pairs = set()
    for s in range(step, res + 1, step):
        long = res * res // s // step * step
        if long <= max_aspect * s:
            pairs |= {(long, s), (s, long)}
    return tuple(sorted(pairs, key=lambda p: p[0] / p[1]))


def nearest_bucket(size: tuple[int, int], table: tuple[tuple[int, int], ...]) -> int:
    """The bucket whose aspect ratio is nearest the image's (on a log scale; the first on a tie)."""
    aspect = math.log(size[0] / size[1])
    return min(range(len(table)), key=lambda i: abs(math.log(table[i][0] / table[i][1]) - aspect))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one image goes at one resolution: its bucket, the box of the decoded image resized (bilinear)
    to it, and for SDXL's add_time_ids the size it is resized to and the crop's top-left there."""

    bucket: int  # index into the resolution's bucket table
    width: int  # the bucket
    height: int
    box: tuple[float, float, float, float]  # in the decoded image
    resized_width: int
    resized_height: int
    left: int
    top: int

    def pixels(self, img: Image.Image) -> np.ndarray:
        return np.asarray(img.resize((self.width, self.height), Image.Resampling.BILINEAR, box=self.box))

    def time_ids(self, original: tuple[int, int], flipped: bool = False) -> list[int]:
        """SDXL's add_time_ids: original_size (h, w) + crops_coords_top_left (top, left) + target_size
        (h, w); for the mirrored crop, the left edge in the mirrored resized image."""
        left = self.resized_width - self.left - self.width if flipped else self.left
        return [original[1], original[0], self.top, left, self.height, self.width]


@dataclasses.dataclass(frozen=True)
class CenterCrop:
    """--crop center, a row: one bucket per resolution, the res x res square, cut as the image's largest
    centred square. The reader, encoder and writer run any crop row alike (see AspectCrop)."""

    tables: dict[int, tuple[tuple[int, int], ...]]
    random: bool = False
    grouped = False  # one dataset per bucket group

    def decode(self, data: bytes | Image.Image, rngs: dict[int, np.random.Generator | None]
               ) -> tuple[Image.Image, tuple[int, int], dict[int, Placement]]:
        """Decode once: (RGB image, its displayed size, {res: placement} for the resolutions it is large
        enough for). A JPEG decodes at the smallest DCT scale that still serves every placement."""
        img = opened(data)
        size = full = img.size
        if img.format == 'JPEG':  # its EXIF is in the header; elsewhere getexif() may load() the pixels,
            size = displayed_size(img)  # and a second load() after a failed one returns what it got
            img.draft(img.mode, self.draft(size, full))
        scaled = img.size != full
        img = to_rgb(img)
        if not scaled:  # decoded at full size: its own size is the truth (EXIF read after the pixels too)
            size = img.size
        return img, size, {r: p for r in self.tables if (p := self.place(size, img.size, r, rngs[r]))}

    def draft(self, size: tuple[int, int], full: tuple[int, int]) -> tuple[int, int]:
        """The JPEG decode size asked of PIL: the shorter side reaches the largest usable resolution."""
        need = max((r for r in self.tables if r <= min(full)), default=1)  # none: only check it decodes
        return need, need

    def place(self, size: tuple[int, int], decoded: tuple[int, int], res: int,
              rng: np.random.Generator | None) -> Placement | None:
        """The largest centred square of the decoded image; None when the shorter side is below `res`."""
        if res > min(size):
            return None
        w, h = decoded
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return Placement(0, res, res, (left, top, left + s, top + s), w, h, left, top)

    def group(self, placed: dict[int, Placement]) -> str:
        """The dataset below the output a sample goes to ('': the output itself)."""
        return ''

    def columns(self, placed: dict[int, Placement], size: tuple[int, int], flip: bool) -> dict[str, Any]:
        """Per-sample columns beside the latents."""
        return {}

    def specs(self, res: int, vae: dict, storage: str, latent_mode: str) -> dict[str, dict]:
        """The convention records of one resolution's columns."""
        side = res // vae['downsampling']
        return {LATENT_COLUMN.format(res=res): {
            'dtype': storage, 'shape': latent_shape(vae, side, side),
            'what': f"{normalised(vae, latent_mode)} of the {res}px center square; "
                    f"b'' when the shorter side is below {res}"}}

    def record(self, seed: int, flip: bool) -> dict:
        """The convention's `crop` record ({}: none, as center outputs always had)."""
        return {}


@dataclasses.dataclass(frozen=True)
class AspectCrop(CenterCrop):
    """--crop aspect, a row: the nearest bucket of each resolution's table, the image resized to cover it
    (aspect kept) and cropped, SDXL size conditioning stored, one dataset per bucket group."""

    step: int = 64  # bucket_rule's: the VAE factor x 8 for AutoencoderKL
    max_aspect: float = MAX_ASPECT
    grouped = True

    def draft(self, size: tuple[int, int], full: tuple[int, int]) -> tuple[int, int]:
        """The JPEG decode size asked of PIL: it covers every placement's resized size."""
        scale = max((max(p.resized_width / size[0], p.resized_height / size[1])
                     for r in self.tables if (p := self.place(size, size, r, None))), default=0.0)
        return max(1, math.ceil(full[0] * scale)), max(1, math.ceil(full[1] * scale))

    def place(self, size: tuple[int, int], decoded: tuple[int, int], res: int,
              rng: np.random.Generator | None) -> Placement | None:
        """The image's bucket, resize and crop (centred, or at an offset drawn from `rng`); None when
        covering the bucket would enlarge the image. The box maps the crop into the decoded image: the
        same samples as resizing the whole image and cropping (up to PIL's rounding, at most 1 level)."""
        table = self.tables[res]
        i = nearest_bucket(size, table)
        bw, bh = table[i]
        scale = max(bw / size[0], bh / size[1])
        if scale > 1:
            return None
        rw, rh = max(bw, round(size[0] * scale)), max(bh, round(size[1] * scale))
        if rng is None:
            left, top = (rw - bw) // 2, (rh - bh) // 2
        else:
            left, top = int(rng.integers(0, rw - bw + 1)), int(rng.integers(0, rh - bh + 1))
        sx, sy = decoded[0] / rw, decoded[1] / rh
        box = (left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)
        return Placement(i, bw, bh, box, rw, rh, left, top)

    def group(self, placed: dict[int, Placement]) -> str:
        """Its bucket at every resolution, e.g. '320x192_640x384' ('none' where it is too small), so
        every latent column of one group has one shape."""
        return '_'.join(f'{p.width}x{p.height}' if (p := placed.get(r)) else 'none' for r in self.tables)

    def columns(self, placed: dict[int, Placement], size: tuple[int, int], flip: bool) -> dict[str, Any]:
        """Per resolution its bucket index and SDXL add_time_ids (int32 bytes; also of the mirrored crop
        with --flip); -1 and b'' when the image is too small for it."""
        out: dict[str, Any] = {}
        for r in self.tables:
            p = placed.get(r)
            out[BUCKET_COLUMN.format(res=r)] = -1 if p is None else p.bucket
            for name, mirrored in [(TIME_IDS_COLUMN.format(res=r), False)] + \
                    [(FLIPPED.format(column=TIME_IDS_COLUMN.format(res=r)), True)] * flip:
                out[name] = b'' if p is None else np.array(p.time_ids(size, mirrored), np.int32).tobytes()
        return out

    def specs(self, res: int, vae: dict, storage: str, latent_mode: str) -> dict[str, dict]:
        f = vae['downsampling']
        return {
            LATENT_COLUMN.format(res=res): {
                'dtype': storage, 'shape': latent_shape(vae, f'H/{f}', f'W/{f}'),
                'shape_varies': f'per sample: W x H = the bucket (aspect_bucket_{res}; '
                                f'{TIME_IDS_COLUMN.format(res=res)}[4:6] is H, W)',
                'what': f"{normalised(vae, latent_mode)} of the image resized to cover "
                        f"its {res}px bucket and cropped to it; b'' when too small"},
            BUCKET_COLUMN.format(res=res): {'dtype': 'int32', 'shape': [],
                                            'what': f'index into crop.buckets["{res}"]; -1 when too small'},
            TIME_IDS_COLUMN.format(res=res): {
                'dtype': 'int32', 'shape': [6],
                'what': 'SDXL add_time_ids: original_size (h, w) + crops_coords_top_left (top, left, in '
                        "resized pixels) + target_size (h, w) = the bucket; b'' when too small"},
        }

    def record(self, seed: int, flip: bool) -> dict:
        return {'mode': 'aspect', 'step': self.step, 'max_aspect': self.max_aspect,
                'buckets': {str(r): [list(b) for b in t] for r, t in self.tables.items()},
                'assign': 'the bucket nearest the image aspect ratio w/h on a log scale (the first on a '
                          'tie); resized (bilinear, EXIF orientation applied) to cover it, aspect kept, then '
                          'cropped; computed as PIL resize((W, H), BILINEAR, box=(left, top, left + W, '
                          'top + H) x decoded size / resized size) of the decoded image',
                'position': f'random (numpy default_rng([{seed}, sample index, res, 2]))'
                            if self.random else 'centred (offset (resized - bucket) // 2)',
                'seed': seed, 'flip': flip,
                'too_small': "b'' (bucket -1) when covering the bucket would enlarge the image",
                'groups': f'one dataset per bucket group at <out>/<group>/ (see {GROUPS}); '
                          '<out>/index.json holds them all'}


def latent_shape(vae: dict, height: int | str, width: int | str) -> list:
    """A stored latent's shape in the convention: (C, h, w); (C, 1, h, w) with a video VAE's frame axis."""
    return [vae['latent_channels'], *[1] * vae.get('frames', 0), height, width]


def normalised(vae: dict, latent_mode: str) -> str:
    """What a latent column holds, in words (the convention's image_latents says it in full)."""
    if 'normalise' not in vae:  # an AutoencoderKL: the words it always had
        return f'(vae {latent_mode} - shift_factor) * scaling_factor'
    return f"image_latents.normalise ({vae['vae_class']}, {vae['latent_mode']})"


def make_crop(mode: str, resolutions: list[int], step: int, max_aspect: float, random: bool) -> CenterCrop:
    """The row of `--crop`: its bucket tables (refusing a resolution below the bucket step)."""
    if mode == 'center':
        return CenterCrop({r: ((r, r),) for r in sorted(resolutions)})
    tables = {r: bucket_table(r, step, max_aspect) for r in sorted(resolutions)}
    if small := [r for r, t in tables.items() if not t]:
        raise UserError(f'--crop aspect --resolutions {small[0]}: below the bucket step {step} (the stored '
                        'latent factor x the patch, x 8 for the UNet families); use resolutions of at least '
                        f'{step}')
    return AspectCrop(tables, random, step, max_aspect)


def sample_noise(seed: int, sample_id: int, res: int, shape: tuple[int, ...],
                 flipped: bool = False) -> np.ndarray:
    """Standard normal noise for one sample and resolution (and its mirrored crop: other noise), the
    same on every run and machine."""
    key = [seed, sample_id, res, 1] if flipped else [seed, sample_id, res]
    return np.random.default_rng(key).standard_normal(shape, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Job:
    """One batch: global sample ids [start, stop) of one part (the part's first when start == part.first,
    its last when stop == part.last)."""

    part: Part
    start: int
    stop: int


def make_jobs(parts: list[Part], batch_size: int) -> list[Job]:
    """Batches that never cross a part, so a part's batches are the same in every run (an empty part:
    one empty batch, which opens and closes it)."""
    return [Job(part, start, min(start + batch_size, part.last))
            for part in parts for start in range(part.first, part.last, batch_size) or [part.first]]


class BatchReader:
    """Item i = job i read, decoded, cropped and tokenized: everything the models need.

    `tokens` {caption key: [(ids, mask) per encoder]}, `cut` {caption key: [captions longer than each
    encoder's tokens]}.
    Per resolution r, one entry per crop shape in the batch: `pixels_r` (uint8 stacks N x h x w x 3),
    `noise_r` and `flip_noise_r` (sample mode; --flip), and `rows_r`, the batch row of each image in
    that order. Per row: `group` (the dataset it goes to) and `columns` (stored as they are).
    """

    def __init__(self, jobs: list[Job], cache: ShardCache, tokenizers: list, lengths: list[int],
                 crop: CenterCrop, latent_shape: tuple[int, int], latent_mode: str, seed: int,
                 caption_drop_prob: float, flip: bool = False, caption_keys: tuple[str, ...] = ('caption',),
                 *, encoders: tuple[TextEncoder, ...]):
        self.jobs, self.cache, self.tokenizers, self.lengths = jobs, cache, tokenizers, lengths
        self.encoders = encoders  # each tokenizer's: how a caption becomes its prompt and tokens
        self.crop, (self.channels, self.factor) = crop, latent_shape
        self.latent_mode, self.seed, self.flip = latent_mode, seed, flip
        self.caption_drop_prob, self.caption_keys = caption_drop_prob, caption_keys

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        job = self.jobs[index]
        batch: dict[str, Any] = {'job': job, 'samples': [], 'skipped': [], 'noted': [], 'group': [],
                                 'columns': []}
        shapes: dict[int, dict] = {r: {} for r in self.crop.tables}  # {res: {(h, w): {'pixels': [], ...}}}
        captions: dict[str, list[str]] = {k: [] for k in self.caption_keys}
        for sample_id in range(job.start, job.stop):
            sample = self.cache.get(sample_id)
            rngs = {r: np.random.default_rng([self.seed, sample_id, r, 2]) if self.crop.random else None
                    for r in self.crop.tables}
            try:
                with noted() as notes:  # PIL's warnings, libtiff's words: named in the marker, not printed
                    img, size, placed = self.crop.decode(sample['jpg'], rngs)
                    pixels = {r: p.pixels(img) for r, p in sorted(placed.items())}
            except Exception as err:  # PIL raises many types for bad bytes: every one is a skip
                reason = ('not an image format PIL can read' if isinstance(err, UnidentifiedImageError)
                          else f'{type(err).__name__}: {last_line(err)}')
                batch['skipped'].append({'id': sample_id, 'key': str(sample.get('key', '')),
                                         'reason': '; '.join([reason, *notes])})
                continue
            if notes:
                batch['noted'].append({'id': sample_id, 'key': str(sample.get('key', '')), 'notes': notes})
            row = len(batch['samples'])
            for r, px in pixels.items():
                group = shapes[r].setdefault(px.shape[:2], defaultdict(list))
                group['pixels'].append(px)
                group['rows'].append(row)
                if self.latent_mode == 'sample':
                    shape = (self.channels, px.shape[0] // self.factor, px.shape[1] // self.factor)
                    group['noise'].append(sample_noise(self.seed, sample_id, r, shape))
                    if self.flip:
                        group['flip_noise'].append(sample_noise(self.seed, sample_id, r, shape, flipped=True))
            dropped = bool(self.caption_drop_prob) and (  # encoded as ''; the same in every run
                np.random.default_rng([self.seed, sample_id, 0]).random() < self.caption_drop_prob)
            batch['samples'].append(sample)
            batch['group'].append(self.crop.group(placed))
            batch['columns'].append({**self.crop.columns(placed, size, self.flip),
                                     **({DROPPED_COLUMN: int(dropped)} if self.caption_drop_prob else {})})
            for key, texts in captions.items():
                texts.append('' if dropped else sample[key])
        encoders = list(zip(self.encoders, self.tokenizers, self.lengths))
        present = {k: [prompts(enc, tok, texts) for enc, tok, _ in encoders]
                   for k, texts in captions.items() if texts}
        batch['tokens'] = {k: [tokenize(tok, texts, n, enc.padding, enc.specials)
                               for (enc, tok, n), texts in zip(encoders, p)] for k, p in present.items()}
        batch['cut'] = {k: [sum(len(ids) > n for ids in tok(texts, verbose=False,
                                                            add_special_tokens=enc.specials).input_ids)
                            for (enc, tok, n), texts in zip(encoders, p)] for k, p in present.items()}
        for r, groups in shapes.items():
            batch[f'rows_{r}'] = [row for g in groups.values() for row in g['rows']]
            for key in ('pixels', 'noise', 'flip_noise'):
                batch[f'{key}_{r}'] = [torch.from_numpy(np.stack(g[key])) for g in groups.values() if g[key]]
        return batch


def prompts(enc: TextEncoder, tokenizer, captions: list[str]) -> list[str]:
    """The texts a pipeline tokenizes for `captions`: each caption in the encoder's template."""
    for cut in enc.remove:
        captions = [c.replace(cut, '') for c in captions]
    captions = [c.lower().strip() for c in captions] if enc.lower else captions
    if enc.template.startswith('chat'):
        def message(role: str, text: str) -> dict:
            return {'role': role, 'content': [{'type': 'text', 'text': text}] if enc.template == 'chat-parts'
                    else text}
        system = [message('system', enc.system)] if enc.system else []
        return [tokenizer.apply_chat_template(system + [message('user', c)], tokenize=False,
                                              **dict(enc.chat_options)) for c in captions]
    return [enc.template.format(c) for c in captions] if enc.template else captions


def tokenize(tokenizer, texts: list[str], length: int, padding: str = 'max_length',
             specials: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) padded (to `length`, or the longest) and truncated to `length`, as every
    family's encode_prompt does."""
    out = tokenizer(texts, padding=padding, truncation=True, max_length=length, return_tensors='pt',
                    add_special_tokens=specials)
    return out.input_ids, out.attention_mask


def no_collate(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def die_with_parent(parent: int, worker_id: int) -> None:
    """DataLoader worker start: get SIGKILL when the main process dies (kill -9, OOM killer, a lost
    node) instead of blocking forever on a queue nobody reads. SIGTERM ends a worker as usual (the
    main process's handler is not for workers); SIGINT is left to the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.excepthook = functools.partial(skip_lost_handoffs, sys.excepthook)
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # the main process died before prctl took effect
        os._exit(1)


def skip_lost_handoffs(hook, exc_type, exc, tb) -> None:
    """A worker's sys.excepthook. multiprocessing's resource sharer, which hands a batch's tensors to
    the main process, prints a traceback when the main process drops the connection mid-handoff, as it
    does when a signal stops it: that is the stop, not an error (a main process that goes on raises
    its own). Everything else goes to `hook`."""
    lost = issubclass(exc_type, (EOFError, OSError)) and any(
        frame.f_code.co_filename.endswith('resource_sharer.py') for frame, _ in walk_tb(tb))
    if not lost:
        hook(exc_type, exc, tb)


# ----------------------------------------------------------------------------------------------
# Encoding: the VAE and the family's text encoders
# ----------------------------------------------------------------------------------------------

def load_module(model_name: str, subfolder: str, class_name: str, device: torch.device,
                dtype: torch.dtype) -> torch.nn.Module:
    """One model of the pipeline (the VAE or a text encoder) on `device` in `dtype`, in eval mode."""
    import diffusers
    import transformers

    with failing(f'cannot load {subfolder}/ of {model_name} as {class_name}: '):
        if class_name in VAES:
            model = getattr(diffusers, class_name).from_pretrained(
                model_name, subfolder=subfolder or None, torch_dtype=dtype, low_cpu_mem_usage=False)
        else:
            model = (OWN_CLASSES.get(class_name) or getattr(transformers, class_name)).from_pretrained(
                model_name, subfolder=subfolder, dtype=dtype)
    model = model.to(device).eval()
    if device.type == 'cuda' and class_name in VAES and not VAES[class_name].frames:  # 4-d weights only
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return model


class OpenCLIPText:
    """OpenCLIP's CLIP text tower from its own folder, answering as a transformers text model does:
    hidden_states[-2] the penultimate block's output (no final norm, as transformers' and SDXL's),
    last_hidden_state ln_final of the last block's, text_embeds encode_text's projected pooled vector (not
    normalised)."""

    def __init__(self, model: torch.nn.Module, config: Any):
        self.model, self.config = model, config

    def to(self, *how) -> OpenCLIPText:
        self.model.to(*how)
        return self

    def eval(self) -> OpenCLIPText:
        self.model.eval()
        return self

    def parameters(self):
        return self.model.parameters()

    @staticmethod
    def read_config(folder: str, subfolder: str = '') -> Any:
        """The sizes the script checks, from open_clip_config.json's model_cfg."""
        path = os.path.join(folder, subfolder)
        weights = [n for n in ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin')
                   if os.path.isfile(os.path.join(path, n))]
        with open(os.path.join(path, 'open_clip_config.json')) as f:
            cfg = json.load(f)['model_cfg']
        if not weights or 'hf_model_name' in cfg['text_cfg']:
            raise UserError(f'{path} holds no open_clip_model.safetensors or open_clip_pytorch_model.bin, '
                            "or a Hugging Face text tower (use a transformers recipe): not OpenCLIP's CLIP")
        text = cfg['text_cfg']
        return argparse.Namespace(vocab_size=text.get('vocab_size', 49408), hidden_size=text['width'],
                                  max_position_embeddings=text.get('context_length', 77),
                                  projection_dim=cfg['embed_dim'])

    @classmethod
    def from_pretrained(cls, folder: str, subfolder: str = '', dtype: torch.dtype | None = None):
        import open_clip

        config = cls.read_config(folder, subfolder)
        model = open_clip.create_model('local-dir:' + os.path.join(folder, subfolder), precision='fp32')
        model.visual = None  # the text tower alone
        return cls(model, config).to(dtype) if dtype else cls(model, config)

    def __call__(self, input_ids: torch.Tensor, attention_mask=None, output_hidden_states: bool = True):
        out = self.model.forward_intermediates(text=input_ids, text_indices=2, normalize=False)
        penultimate, last = out['text_intermediates']
        return argparse.Namespace(hidden_states=(penultimate, last), text_embeds=out['text_features'],
                                  last_hidden_state=self.model.ln_final(last))


class OpenCLIPTokenizer:
    """OpenCLIP's tokenizer of that folder, called as a transformers tokenizer is: ids padded with 0 to
    its context length, cut there with <end_of_text> kept last (its own __call__); the mask up to that."""

    def __init__(self, tok):
        self.tok, self.model_max_length = tok, tok.context_length

    @classmethod
    def from_pretrained(cls, folder: str, subfolder: str = ''):
        import open_clip

        return cls(open_clip.get_tokenizer('local-dir:' + os.path.join(folder, subfolder)))

    def __len__(self) -> int:
        return self.tok.vocab_size

    def __call__(self, texts: list[str], max_length: int | None = None, **_) -> argparse.Namespace:
        if max_length is None:  # every token, uncut (to count the captions cut)
            return argparse.Namespace(input_ids=[[0] * (len(self.tok.encode(t)) + 2) for t in texts])
        ids = self.tok(texts, max_length)
        mask = torch.arange(ids.shape[1]) <= ids.argmax(1, keepdim=True)  # <end_of_text>: the largest id
        return argparse.Namespace(input_ids=ids, attention_mask=mask.long())


OWN_CLASSES = {c.__name__: c for c in (OpenCLIPText, OpenCLIPTokenizer)}  # beside transformers' classes


def load_encoder(enc: TextEncoder, model_name: str, device: torch.device,
                 dtype: torch.dtype) -> torch.nn.Module:
    """A text encoder on `device`: only its `backbone` where it has one (no language-model head there)."""
    if not enc.backbone:
        return load_module(enc.folder or model_name, enc.subfolder, enc.model_class, device, dtype)
    whole = load_module(enc.folder or model_name, enc.subfolder, enc.model_class, torch.device('cpu'), dtype)
    return getattr(whole, enc.backbone).to(device)


def load_vae(image: ImageLatents, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return load_module(image.folder, image.subfolder, image.vae.class_name, device, dtype)


def load_models(model_name: str, family: Family, device: torch.device, dtype: torch.dtype,
                image: ImageLatents):
    """(vae, [text encoders]) on `device` in `dtype`, in eval mode."""
    return (load_vae(image, device, dtype),
            [load_encoder(e, model_name, device, dtype) for e in family.encoders])


class Fallback:
    """Runs a model; when a reduced-precision model gives NaN or inf, reruns that batch on a float32
    copy of it (loaded from the folder once) and counts it. An SDXL VAE in float16 is the known case."""

    def __init__(self, model_name: str, family: Family, device: torch.device, image: ImageLatents):
        self.loaders = {'vae': functools.partial(load_vae, image, device),
                        **{e.source: functools.partial(load_encoder, e, model_name, device)
                           for e in family.encoders}}  # name: loader of a copy in the dtype given
        self.copies: dict[str, torch.nn.Module] = {}

    def __call__(self, name: str, model: torch.nn.Module, fn, used: list[str]):
        out = fn(model)
        if all(bool(torch.isfinite(t).all()) for t in out if t is not None):
            return out
        if next(model.parameters()).dtype == torch.float32:
            raise UserError(f'{name} gives NaN or inf even in float32: the model weights are broken')
        if name not in self.copies:
            self.copies[name] = self.loaders[name](torch.float32)
        used.append(name)
        return fn(self.copies[name])


def to_storage(t: torch.Tensor, storage: torch.dtype, name: str) -> torch.Tensor:
    """`t` in the storage dtype, ready to leave the GPU (bfloat16 travels as its raw 16 bits)."""
    out = t.to(storage)
    if storage == torch.float16 and not bool(torch.isfinite(out).all()):
        raise UserError(f'{name} overflows float16 storage: rerun with --storage_dtype bfloat16 or float32')
    return out.view(torch.int16) if storage == torch.bfloat16 else out


def encode_text(tokens: list[tuple[torch.Tensor, torch.Tensor]], family: Family, encoders: list,
                device: torch.device, chunk: int, fallback: Fallback,
                used: list[str]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The family's text columns for a batch of tokenized captions (in chunks of `chunk` captions), and
    each encoder's rows per caption (the tokens under the mask, less the dropped ones)."""
    outputs, lengths = [], []
    for enc, model, (ids, mask) in zip(family.encoders, encoders, tokens):
        def run(m, enc=enc, ids=ids, mask=mask):
            parts = []
            for s in range(0, len(ids), chunk):
                i, a = ids[s:s + chunk].to(device), mask[s:s + chunk].to(device)
                res = m(input_ids=i, attention_mask=a if enc.masked(m.config) else None,
                        output_hidden_states=enc.hidden in ('penultimate', 'stack'))
                parts.append((hidden_states(res, enc), getattr(res, enc.pooled) if enc.pooled else None))
            return [None if p[0] is None else torch.cat(p) for p in zip(*parts)]

        hidden, pooled = fallback(enc.source, model, run, used)
        outputs.append({'hidden': hidden, 'pooled': pooled, 'mask': mask.to(device).bool()})
        lengths.append(mask.sum(1) - enc.drop)
        if enc.variable:  # the rows under the mask first (left padding too), then the dropped ones gone
            order = (1 - mask).argsort(dim=1, stable=True).to(device)
            outputs[-1]['hidden'] = hidden.take_along_dim(order[..., None], 1)[:, enc.drop:]
        if enc.mask_plus:
            outputs[-1]['mask'] = torch.arange(mask.shape[1], device=device) < (
                mask.sum(1, keepdim=True).to(device) + enc.mask_plus)
        if enc.select:  # SANA's select_index: the first row and the last select - 1
            rows = [0, *range(mask.shape[1] - enc.select + 1, mask.shape[1])]
            outputs[-1].update(hidden=outputs[-1]['hidden'][:, rows], mask=outputs[-1]['mask'][:, rows])
    return ({col.suffix: torch.cat([outputs[i][col.what] for i in col.encoders], dim=-1)
             for col in family.columns}, lengths)


def hidden_states(res, enc: TextEncoder) -> torch.Tensor | None:
    """The hidden states the pipeline takes from an encoder's output `res`."""
    if enc.hidden == 'stack':  # (N, L, layers x width): FLUX.2's stack(dim=1).permute(0, 2, 1, 3).reshape
        return torch.stack([res.hidden_states[k] for k in enc.layers], dim=2).flatten(2)
    return (res.last_hidden_state if enc.hidden == 'last' else
            res.hidden_states[-2] if enc.hidden == 'penultimate' else None)


def encode_batch(batch: dict[str, Any], models: tuple, family: Family, resolutions: list[int],
                 device: torch.device, storage: torch.dtype, text_chunk: int, fallback: Fallback,
                 image: ImageLatents, flip: bool = False) -> dict[str, Any]:
    """Stored columns on the CPU (copies may still be in flight on a GPU: sync before reading), plus
    `_fallback`: the models that needed a float32 rerun for this batch."""
    vae, encoders = models
    used: list[str] = []
    out: dict[str, Any] = {'_lengths': {}}
    for key, tokens in batch['tokens'].items():
        columns, out['_lengths'][key] = encode_text(tokens, family, encoders, device, text_chunk, fallback,
                                                    used)
        for suffix, t in columns.items():
            t = t if t.dtype == torch.bool else to_storage(t, storage, key + suffix)
            out[key + suffix] = t.to('cpu', non_blocking=True)
    for r in resolutions:  # one VAE call per crop shape
        name, stacks = LATENT_COLUMN.format(res=r), batch[f'pixels_{r}']
        for column, noise, flipped in [(name, batch[f'noise_{r}'], False)] + \
                [(FLIPPED.format(column=name), batch[f'flip_noise_{r}'], True)] * flip:
            noise = noise or [None] * len(stacks)  # mean mode
            out[column] = [encode_pixels(vae, image, p.flip(2) if flipped else p, n, device, storage, name,
                                         fallback, used) for p, n in zip(stacks, noise)]
    out['_fallback'] = used
    return out


def encode_pixels(vae, image: ImageLatents, px: torch.Tensor, noise: torch.Tensor | None,
                  device: torch.device, storage: torch.dtype, name: str, fallback: Fallback,
                  used: list[str]) -> torch.Tensor:
    """Stored latents of a stack of uint8 images (N, H, W, 3): the VAE's mean (plus std x `noise` in
    sample mode; a deterministic VAE's latent), normalised as its pipeline does (ImageLatents.normalise);
    on the CPU (the copy may be in flight)."""
    def run(m):
        x = px.to(device, non_blocking=True).permute(0, 3, 1, 2).to(m.dtype) / 127.5 - 1
        out = m.encode(x.unsqueeze(2) if image.vae.frames else x)
        if not image.vae.sampled:
            return out.latent.float(), None
        return out.latent_dist.mean.float(), out.latent_dist.std.float()

    mean, std = fallback('vae', vae, run, used)
    z = mean if noise is None else mean + std * noise.to(device, non_blocking=True).view(mean.shape)
    return to_storage(image.normalise(z), storage, name).to('cpu', non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Writing: one MDSWriter per part and group, in a background thread so the models never wait for the disk
# ----------------------------------------------------------------------------------------------

class PartWriter(threading.Thread):
    """Turns encoded batches into output samples; finishes and marks each part after its last batch."""

    def __init__(self, plan: Plan, args: argparse.Namespace, cache: ShardCache, evict: bool):
        super().__init__(daemon=True)
        specs = plan.settings['convention']['columns']
        self.text_columns = [  # (column, its length column or '' when padded, caption key, encoder index)
            (k + c.suffix, specs[k + c.suffix].get('length_column', ''), k, c.encoders[0])
            for k in args.caption_keys for c in plan.family.columns]
        self.out_root, self.columns, self.settings = plan.places.out, plan.columns, plan.settings
        self.resolutions = list(plan.crop.tables)
        self.staging, self.cache, self.evict, self.args = plan.places.staging, cache, evict, args
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.finished_parts: list[str] = []
        self.done_event = threading.Condition()
        self.stopping = False  # abandon(); open_part() sets the part in hand, its writers and stats

    def abandon(self, timeout: float = 60) -> None:
        """Stop after the batch in hand: a part being closed is finished, an open one is left to a rerun."""
        self.stopping = True
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)
        self.join(timeout)

    def put(self, item) -> None:
        """Queue `item` for the thread; raises its error instead of waiting on a thread that stopped."""
        while self.error is None:
            with contextlib.suppress(queue.Full):
                return self.queue.put(item, timeout=1)
        raise self.error

    def writer_for(self, group: str):
        """The part's MDSWriter of a group, at <out>/<group>/<part> (via the staging folder for a remote)."""
        if group not in self.writers:
            folder = '/'.join(f for f in (group, self.part.name) if f)
            target = join(self.out_root, folder)
            out = (os.path.join(self.staging, folder), target) if is_remote(self.out_root) else target
            self.writers[group] = mds_writer(self.columns, out=out, compression=self.args.compression or None,
                                             size_limit=self.args.size_limit, exist_ok=True, max_workers=4)
        return self.writers[group]

    def open_part(self, part: Part) -> None:
        self.part, self.writers = part, {}  # the part's MDSWriter of each group ('': the output itself)
        self.stats = {'part': part.name, 'first_sample': part.first, 'num_samples': part.last - part.first,
                      'written': 0, 'skipped': [], 'noted': [], 'rank': int(os.environ.get('RANK', 0)),
                      'encoded': {str(r): 0 for r in self.resolutions}, 'fp32_fallback': Counter(),
                      'latent_bytes': 0, 'groups': Counter(), 'truncated': {}, 'started': time.time()}

    def write_batch(self, batch: dict[str, Any], latents: dict[str, Any]) -> None:
        images = {name: dict(zip(batch[f'rows_{r}'], latents[name])) for r in self.resolutions
                  for name in [LATENT_COLUMN.format(res=r)] + [FLIPPED.format(column=LATENT_COLUMN.format(
                      res=r))] * self.args.flip}
        for row, sample in enumerate(batch['samples']):
            out = {**{k: v for k, v in sample.items() if k not in self.args.drop_columns},
                   **batch['columns'][row]}
            for name, length_column, key, enc in self.text_columns:
                value = latents[name][row]
                if length_column:  # store the first n token states only
                    n = int(latents['_lengths'][key][enc][row])
                    out[length_column], value = n, value[:n]
                out[name] = value.tobytes()
            for name, rows in images.items():
                out[name] = rows[row].tobytes() if row in rows else b''
            for r in self.resolutions:
                self.stats['encoded'][str(r)] += row in images[LATENT_COLUMN.format(res=r)]
            group = batch['group'][row]
            self.writer_for(group).write(out)
            self.stats['groups'][group] += 1
            self.stats['latent_bytes'] += sum(len(v) if isinstance(v, bytes) else 4
                                              for k, v in out.items() if k not in sample)
        self.stats['written'] += len(batch['samples'])
        self.stats['skipped'] += batch['skipped']
        self.stats['noted'] += batch['noted']
        for key, cut in batch['cut'].items():  # captions cut per encoder
            self.stats['truncated'][key] = np.add(self.stats['truncated'].get(key, 0), cut).tolist()
        self.stats['fp32_fallback'].update(latents['_fallback'])

    def close_part(self, part: Part) -> None:
        with failing(f'writing part {part.name} to {self.out_root} failed (', '); rerun the same command to '
                     'resume'):
            for _, writer in sorted(self.writers.items()):
                writer.finish()
        self.stats.update(seconds=round(time.time() - self.stats.pop('started'), 3), settings=self.settings)
        with failing(f'marking part {part.name} done at {self.out_root} failed (',
                     '); rerun the same command to resume'):
            put_text(self.out_root, self.staging, f'{part.name}/{DONE_MARKER}', json.dumps(self.stats))
        if self.evict:
            for shard in part.shards:
                self.cache.evict(shard)
        with self.done_event:
            self.finished_parts.append(part.name)
            self.done_event.notify_all()

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None and not self.stopping:
                batch, latents, event = item
                if event is not None:
                    event.synchronize()
                latents = {k: v if k.startswith('_') else [row for t in v for row in t.numpy()]
                           if isinstance(v, list) else v.numpy()  # a list: one stack per crop shape
                           for k, v in latents.items()}
                job = batch['job']
                if job.start == job.part.first:
                    self.open_part(job.part)
                self.write_batch(batch, latents)
                if job.stop == job.part.last:
                    self.close_part(job.part)
        except BaseException as err:  # handed to the main thread, which reports it
            self.error = err
            with self.done_event:
                self.done_event.notify_all()


# ----------------------------------------------------------------------------------------------
# One rank's run
# ----------------------------------------------------------------------------------------------

def pick_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """--device (auto: cuda:<LOCAL_RANK> when available) and --dtype (auto: float16 on GPU, else float32)."""
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: no GPU is visible to torch')
    device = torch.device('cpu')
    if args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available()):
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    auto = torch.float16 if device.type == 'cuda' else torch.float32
    return device, auto if args.dtype == 'auto' else getattr(torch, args.dtype)


def make_loader(args: argparse.Namespace, plan: Plan, parts: list[Part], cache: ShardCache,
                device: torch.device) -> torch.utils.data.DataLoader:
    """The DataLoader of this rank's batches, its workers and this process's threads sharing its cores."""
    convention = plan.settings['convention']
    image = plan.image  # noise of the VAE's own latent shape; none for a deterministic VAE
    reader = BatchReader(make_jobs(parts, args.batch_size), cache, plan.tokenizers,
                         [e['tokens'] for e in convention['text_encoders']], plan.crop,
                         (image.channels, image.factor),
                         args.latent_mode if image.vae.sampled else 'mean', args.seed,
                         args.caption_drop_prob, args.flip, tuple(args.caption_keys),
                         encoders=plan.family.encoders)
    cores = max(1, (os.cpu_count() or 2) // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))  # per process
    workers = args.num_workers if args.num_workers >= 0 else max(1, cores - 1)
    if device.type == 'cpu':  # oversubscribed cores make torch's thread barriers crawl
        torch.set_num_threads(args.threads or max(1, cores - workers))
    return torch.utils.data.DataLoader(
        reader, batch_size=None, shuffle=False, num_workers=workers, collate_fn=no_collate,
        pin_memory=device.type == 'cuda', prefetch_factor=args.prefetch_factor if workers else None,
        worker_init_fn=functools.partial(die_with_parent, os.getpid()))


def run_rank(args: argparse.Namespace, plan: Plan, device: torch.device, dtype: torch.dtype,
             rank: int, world: int) -> dict[str, Any]:
    """Encode this rank's share of the unfinished parts; returns this rank's counters."""
    mine = plan.pending
    family, pl = plan.family, plan.places
    models = load_models(args.model_name, family, device, dtype, plan.image)
    storage = getattr(torch, plan.settings['convention']['storage_dtype'])
    fallback = Fallback(args.model_name, family, device, plan.image)
    remote = pl.src if pl.src != pl.cache else None
    cache = ShardCache(plan.shards, remote, pl.cache, args.download_timeout, args.download_retry)
    if remote is not None:
        if int(os.environ.get('LOCAL_RANK', 0)) == 0:
            empty_cache(pl.cache)
        if dist.is_initialized():
            dist.barrier()  # no rank downloads before its machine's cache is emptied
    os.makedirs(pl.staging, exist_ok=True)  # on every machine
    writer = PartWriter(plan, args, cache, evict=remote is not None)
    batches = iter(make_loader(args, plan, mine, cache, device))  # fork the workers before our threads run
    writer.start()
    threading.Thread(target=prefetch, args=(mine, cache, writer), daemon=True).start()
    wandb_run = start_wandb(args, rank)
    total = sum(p.last - p.first for p in mine)
    start, seen = time.time(), 0
    first_batch: tuple[float, int] | None = None  # (time, samples) once the first batch is encoded
    bar = tqdm(total=total, unit='sample', disable=rank != 0, dynamic_ncols=True,
               desc=f'rank 0/{world} latents' if world > 1 else 'latents', smoothing=0.1)
    try:
        with failing('reading or encoding failed: ', '; rerun the same command to resume'):
            for batch in batches:
                with torch.inference_mode():
                    latents = encode_batch(batch, models, family, list(plan.crop.tables), device, storage,
                                           args.text_batch_size or args.batch_size, fallback, plan.image,
                                           args.flip)
                event = torch.cuda.Event() if device.type == 'cuda' else None
                if event is not None:  # the writer waits for the copies to the CPU
                    event.record()
                writer.put((batch, latents, event))
                n = batch['job'].stop - batch['job'].start
                seen += n
                bar.update(n)
                first_batch = first_batch or (time.time(), seen)
                if wandb_run is not None:
                    wandb_run.log({'samples': seen, 'progress': seen / max(total, 1)})
            writer.put(None)
            writer.join()
    except Interrupted as stop:
        writer.abandon()
        stop.stats = {'samples': seen, 'seconds': time.time() - start, 'steady': 0.0}
        raise
    finally:
        bar.close()
    if writer.error is not None:
        raise writer.error if isinstance(writer.error, UserError) else UserError(
            f'writing failed: {last_line(writer.error)}; rerun the same command to resume')
    end = time.time()
    steady = (seen - first_batch[1]) / max(end - first_batch[0], 1e-9) if first_batch else 0.0
    return {'samples': seen, 'seconds': end - start, 'steady': steady}


def start_wandb(args: argparse.Namespace, rank: int):
    """A wandb run on rank 0 when asked for with --wandb and wandb is installed; else None."""
    if not args.wandb or args.wandb_disabled or rank != 0:
        return None
    try:
        import wandb
    except ImportError:
        print('warning: --wandb given but wandb is not installed; not logging', file=sys.stderr)
        return None
    return wandb.init(name=args.wandb_name, project=args.wandb_project, entity=args.wandb_entity)


def stop_on_signals() -> None:
    """SIGTERM (how platforms stop a job) and SIGINT raise Interrupted in the main thread; a second
    one of the same kind ends the process at once."""
    def handler(signum: int, frame) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise Interrupted(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


# ----------------------------------------------------------------------------------------------
# Merging and the summary (rank 0)
# ----------------------------------------------------------------------------------------------

def merge_parts(plan: Plan, part_groups: dict[str, list[str]], timeout: float) -> None:
    """Rank 0: index.json at the output root over every part, in part order; with --crop aspect also
    `<out>/<group>/index.json` per bucket group over its parts, and GROUPS listing the groups. Each index
    is written entry by entry as the parts' indexes are read: one part's at a time in memory."""
    hook, samples = shared_lists(), Counter()

    def entries(only: str | None = None) -> Iterator[dict]:
        """Every part's shard records (of group `only`: named from the group's folder), in part order."""
        for part in plan.parts:
            for group in part_groups[part.name]:
                if only not in (None, group):
                    continue
                folder = '/'.join(f for f in (group, part.name) if f)
                url = join(plan.places.out, folder, INDEX)
                with failing(f'reading {url} failed: ', '; rerun the same command'):
                    shards = read_json(url, timeout, hook)['shards']
                if only is not None:  # the group's listing
                    samples[group] += sum(s['samples'] for s in shards)
                yield from prefixed(shards, folder if only is None else part.name)

    if plan.crop.grouped:
        listing = {}
        for group in sorted({g for groups in part_groups.values() for g in groups}):
            put_text(plan.places.out, plan.places.staging, f'{group}/{INDEX}', index_text(entries(group)))
            sizes = [None if b == 'none' else [int(v) for v in b.split('x')] for b in group.split('_')]
            listing[group] = {'samples': samples[group],
                              'buckets': dict(zip(map(str, plan.crop.tables), sizes))}
        put_text(plan.places.out, plan.places.staging, GROUPS, json.dumps(listing, indent=1))
    put_text(plan.places.out, plan.places.staging, INDEX, index_text(entries()))


def prefixed(shards: list[dict], folder: str) -> list[dict]:
    """Shard records of an index, their file names made relative to `folder`'s parent."""
    files = ('raw_data', 'zip_data', 'raw_meta', 'zip_meta')
    return [{**s, **{k: {**s[k], 'basename': f'{folder}/{s[k]["basename"]}'} for k in files if s.get(k)}}
            for s in shards]


def summarize(args: argparse.Namespace, plan: Plan, run_stats: dict[str, Any], world: int,
              interrupted: str | None) -> tuple[dict, dict[str, list[str]]]:
    """(summary, {part: its groups}, which the merge reads): totals over every part (this run's and earlier
    runs'), read from the parts' markers one at a time. The images a part skipped or decoded with PIL's or
    libtiff's words are named in its marker; the summary counts them by reason and names the first."""
    out = plan.places.out
    encoders = [f'{e.get("recipe") or e["subfolder"]} ({e["tokens"]} tokens)'  # composed: by recipe
                for e in plan.settings['convention']['text_encoders']]
    truncated = {key: Counter(dict.fromkeys(encoders, 0)) for key in args.caption_keys}  # captions cut
    encoded, fallback, names = Counter(), Counter(), {'skipped': named(), 'noted': named()}
    written = latent_bytes = 0
    groups: dict[str, list[str]] = {}
    for part, m in done_markers(out, plan.parts, output_names(out), args.download_timeout):
        groups[part] = sorted(m.get('groups', {'': 0}))  # no 'groups': an older center run
        for k, fold in names.items():
            add_named(fold, m.get(k, []))
        encoded.update({r: m['encoded'].get(r, 0) for r in map(str, args.resolutions)})
        written, latent_bytes = written + m['written'], latent_bytes + m.get('latent_bytes', 0)
        fallback.update(m.get('fp32_fallback', {}))
        for key, cut in m.get('truncated', {}).items():
            truncated[key].update(dict(zip(encoders, cut)))
    count = {k: sum(fold['by_reason'].values()) for k, fold in names.items()}
    return {
        'input': plan.places.src, 'output': out, 'input_samples': plan.settings['input_samples'],
        'written': written, 'skipped': count['skipped'], 'family': plan.settings['convention']['family'],
        'latent_bytes_per_sample': round(latent_bytes / max(written, 1), 1),
        'fp32_fallback_batches': dict(fallback), 'truncated_captions': truncated, 'noted': count['noted'],
        **{f'{k}_names': {**fold, 'in': f'{out}/NNNNN/{DONE_MARKER}, under "{k}"'}
           for k, fold in names.items()},
        'encoded': {str(r): encoded[str(r)] for r in args.resolutions}, 'parts': len(plan.parts),
        'parts_this_run': len(groups) - plan.finished, 'parts_before': plan.finished,
        'parts_missing': [p.name for p in plan.parts if p.name not in groups], 'world_size': world,
        'samples_this_run_rank0': run_stats['samples'], 'seconds_rank0': round(run_stats['seconds'], 3),
        'samples_per_s_rank0': round(run_stats['samples'] / max(run_stats['seconds'], 1e-9), 2),
        'steady_samples_per_s_rank0': round(run_stats['steady'], 2),
        'settings': plan.settings, 'interrupted': interrupted,
    }, groups


def report(summary: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(summary, f, indent=2)
    lines = [
        f'input   {summary["input"]}: {summary["input_samples"]} samples',
        f'output  {summary["output"]}: {summary["written"]} samples written, {summary["skipped"]} skipped',
        'latents ' + ', '.join(f'{r}px: {n}' for r, n in summary['encoded'].items())
        + f'; family {summary["family"]}, {summary["latent_bytes_per_sample"]:.0f} bytes/sample added',
        f'parts   {summary["parts"]}: {summary["parts_this_run"]} done this run, {summary["parts_before"]} '
        f'before' + f', {len(summary["parts_missing"])} left' * bool(summary['parts_missing'])
        + f'; world size {summary["world_size"]}',
        f'speed   rank 0: {summary["samples_this_run_rank0"]} samples in {summary["seconds_rank0"]:.1f} s '
        f'({summary["samples_per_s_rank0"]:.1f} samples/s'
        + (f'; {summary["steady_samples_per_s_rank0"]:.1f} after the first batch)'
           if summary['steady_samples_per_s_rank0'] else ')'),
    ]
    if summary['written'] and (empty := [r for r, n in summary['encoded'].items() if not n]):
        lines.append(f'warning no image is large enough for {", ".join(empty)} px (images are not upscaled): '
                     + ', '.join(LATENT_COLUMN.format(res=r) for r in empty) + " is b'' in every sample")
    for key, cut in summary['truncated_captions'].items():
        lines.append(f'{key:<7} cut at the token limit: ' + ', '.join(f'{n} by {e}' for e, n in cut.items()))
    for name, n in summary['fp32_fallback_batches'].items():
        lines.append(f'float32 {name} gave NaN/inf in {summary["settings"]["dtype"]} for {n} batch(es): '
                     'those batches were re-encoded in float32')
    lines += [f'skipped {line}' for line in named_lines(summary['skipped_names'])]
    if summary['noted']:  # decoded and kept, but PIL warned or libtiff complained: counted, by what was said
        lines.append(f'noted   {summary["noted"]} image(s) decoded with a warning from PIL or libtiff (kept)')
        lines += [f'noted   {line}' for line in named_lines(summary['noted_names'])]
    if summary.get('interrupted'):
        lines.append(f'stopped by {summary["interrupted"]}: {len(summary["parts_missing"])} parts left, '
                     'no index.json yet; rerun the same command to resume')
    lines.append(f'summary {path}')
    print('\n'.join(lines), flush=True)


def nothing_written(summary: dict) -> str:
    """The error of a run in which every sample was skipped: no index.json is written."""
    reasons = Counter(summary['skipped_names']['by_reason'])
    said = ', '.join(f'{n} x {reason}' for reason, n in reasons.most_common(2))
    return (f'no sample written: each of the {summary["input_samples"]} input images was skipped ({said}), '
            f"so no {INDEX} either; each is named in {summary['skipped_names']['in']}: check the input's "
            f'`{IMAGE_COLUMN}` column')


def nothing_encoded(args: argparse.Namespace) -> str:
    """The error of a run that wrote samples but no latent at all: every image was too small."""
    bucket = re.fullmatch(r'(\d+)-(\d+)', args.bucket)
    holds = f' (--bucket {args.bucket}: shorter sides below {bucket[2]} px)' if bucket else ''
    return (f'no latent written: no image is large enough for --resolutions '
            f'{" ".join(map(str, args.resolutions))}{holds}, and images are not upscaled; rerun with smaller '
            '--resolutions and a new --remote_upload')


def summary_path(args: argparse.Namespace) -> str:
    return args.summary or os.path.join(args.local, f'latents_summary_{args.bucket or "dataset"}.json')


def report_interrupted(args: argparse.Namespace, plan: Plan, stop: Interrupted, world: int) -> None:
    """Rank 0 after a signal: the summary of what is done, marked interrupted (best effort)."""
    try:
        report(summarize(args, plan, stop.stats, world, str(stop))[0], summary_path(args))
    except Exception as err:  # an unreachable output must not hide the interruption
        print(f'warning: no summary: {last_line(err)}', file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Preview (--preview N): the stored latents decoded back into pictures, beside the crops they came from
# ----------------------------------------------------------------------------------------------

PREVIEW_TILE = 128  # px: the longer side of every tile (crops and decodes are resized to it, bilinear)
PREVIEW_GAP = 4  # px between tiles and around the grid
PREVIEW_LINE = 14  # px per line of text (Pillow's default font): one header line, two caption lines
PREVIEW_CAPTION_LINES = 2
PREVIEW_COLUMN = PREVIEW_TILE + PREVIEW_GAP  # px per tile, left to right
PREVIEW_ROW = PREVIEW_TILE + PREVIEW_GAP + PREVIEW_CAPTION_LINES * PREVIEW_LINE + PREVIEW_GAP  # px per sample
PREVIEW_TOP = PREVIEW_GAP + PREVIEW_LINE + PREVIEW_GAP  # px above the first row: the column labels
GREY, BLACK = (128, 128, 128), (0, 0, 0)


def stored_latent(sample: dict[str, Any], column: str, convention: dict,
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """A stored latent as float32, read as its convention record says: dtype, and the shape (C, h, w)
    as recorded, never assumed square. A shape that varies per sample (--crop aspect: [C, 'H/8',
    'W/8']) is the sample's bucket `size` (height, width) divided as the record says."""
    spec, blob = convention['columns'][column], sample[column]
    if spec['dtype'] == 'bfloat16':  # stored as its raw 16 bits
        arr = (np.frombuffer(blob, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        arr = np.frombuffer(blob, np.dtype(spec['dtype'])).astype(np.float32)
    shape = spec['shape']
    if size is not None and not isinstance(shape[-1], int):  # the last two are the sides
        shape = shape[:-2] + [side // int(str(d).split('/')[1]) for side, d in zip(size, shape[-2:])]
    return arr.reshape([d if isinstance(d, int) else -1 for d in shape])


def recorded_crop(img: Image.Image, time_ids: np.ndarray) -> Image.Image:
    """--crop aspect: the crop that the stored add_time_ids state (original (h, w), top-left in the
    resized image, target (h, w)), redone from the image: the crop's box in the image, resized to
    the target (the documented rule, apart from the encoder's code)."""
    oh, ow, top, left, th, tw = (int(v) for v in time_ids)
    scale = max(tw / ow, th / oh)
    rw, rh = max(tw, round(ow * scale)), max(th, round(oh * scale))
    sx, sy = img.width / rw, img.height / rh
    return img.resize((tw, th), Image.Resampling.BILINEAR,
                      box=(left * sx, top * sy, (left + tw) * sx, (top + th) * sy))


def source_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """The image's largest centered box of aspect width:height, resized to width x height (bilinear):
    the documented crop, computed here apart from the encoder's, so that a wrong crop there shows."""
    w, h = img.size
    cw, ch = min(w, round(h * width / height)), min(h, round(w * height / width))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))


def wrap(text: str, font, width: int, lines: int) -> list[str]:
    """`text` in at most `lines` lines of at most `width` px ('...' ends a cut text)."""
    out: list[str] = []
    for word in text.split():
        if out and font.getlength(f'{out[-1]} {word}') <= width:
            out[-1] = f'{out[-1]} {word}'
        else:
            out.append(word)
    return out if len(out) <= lines else out[:lines - 1] + [out[lines - 1] + ' ...']


# >>> twin: preview-font (verbatim in caption_images.py, curate_images.py, laion_cloudwriter.py,
# precompute_latents.py; test_twins.py)
def preview_font(size: float = 10) -> ImageFont.FreeTypeFont:
    """The font of every preview: DejaVu Sans, which matplotlib (a requirement) ships. It draws Latin,
    Greek, Cyrillic, Arabic, Hebrew and more (not Chinese, Japanese or Korean); Pillow's own font
    (ImageFont.load_default) has ASCII only and draws any other letter, even 'ü', as a box."""
    try:
        import matplotlib
    except ImportError:  # a preview with boxes, rather than none
        return ImageFont.load_default(size)
    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf', 'DejaVuSans.ttf'),
                              size)
# <<< twin: preview-font


def draw_grid(header: list[str], rows: list[tuple[list[Image.Image | str], str]]) -> Image.Image:
    """Column labels on top, then per row its tiles (an image, resized (bilinear) so that its longer side
    is PREVIEW_TILE; a str: a grey tile with that label) and its text."""
    font = preview_font()
    width = PREVIEW_GAP + len(header) * PREVIEW_COLUMN
    grid = Image.new('RGB', (width, PREVIEW_TOP + len(rows) * PREVIEW_ROW), WHITE)
    draw = ImageDraw.Draw(grid)
    for col, label in enumerate(header):
        draw.text((PREVIEW_GAP + col * PREVIEW_COLUMN, PREVIEW_GAP), label, fill=BLACK, font=font)
    for row, (tiles, text) in enumerate(rows):
        y = PREVIEW_TOP + row * PREVIEW_ROW
        for col, t in enumerate(tiles):
            x = PREVIEW_GAP + col * PREVIEW_COLUMN
            if isinstance(t, str):
                draw.rectangle((x, y, x + PREVIEW_TILE - 1, y + PREVIEW_TILE - 1), fill=GREY)
                draw.text((x + PREVIEW_GAP, y + PREVIEW_GAP), t, fill=WHITE, font=font)
            else:
                scale = PREVIEW_TILE / max(t.size)
                size = (max(1, round(t.width * scale)), max(1, round(t.height * scale)))
                grid.paste(t.resize(size, Image.Resampling.BILINEAR), (x, y))
        y += PREVIEW_TILE + PREVIEW_GAP  # the text below the tiles
        for i, line in enumerate(wrap(text, font, width - 2 * PREVIEW_GAP, PREVIEW_CAPTION_LINES)):
            draw.text((PREVIEW_GAP, y + i * PREVIEW_LINE), line, fill=BLACK, font=font)
    return grid


def preview_row(sample_id: int, sample: dict[str, Any], columns: list[tuple[int, str]], convention: dict,
                vae, device: torch.device) -> tuple[list[Image.Image | str], str]:
    """One sample's tiles (per stored resolution: source crop, decoded latent) and its text."""
    crop = CenterCrop({res: ((res, res),) for res, _ in columns})  # decoded as center mode decodes
    with noted():  # said of this image when it was encoded (in the summary): not again, after it
        img = crop.decode(sample['jpg'], dict.fromkeys(crop.tables))[0] if IMAGE_COLUMN in sample else None
    tiles: list[Image.Image | str] = []
    for res, column in columns:
        if not sample[column]:
            tiles += [f"b'' (< {res} px)"] * 2
            continue
        raw = sample.get(TIME_IDS_COLUMN.format(res=res))  # --crop aspect: the recorded crop
        ids = np.frombuffer(raw, np.int32).tolist() if raw else None
        latent = stored_latent(sample, column, convention, None if ids is None else (ids[4], ids[5]))
        z = vae_input(latent, convention['image_latents'])
        x = vae.decode(torch.from_numpy(z)[None].to(device, vae.dtype)).sample[0].float()  # as diffusers'
        x = x[:, 0] if x.dim() == 4 else x  # a video VAE's frame axis
        decoded = Image.fromarray(  # image processor turns it into an RGB picture
            ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
        tiles += ['no jpg column' if img is None else source_crop(img, *decoded.size) if ids is None
                  else recorded_crop(img, ids), decoded]
    caption = sample.get(convention.get('caption_keys', ['caption'])[0], '')
    return tiles, f'#{sample_id} (key {sample.get("key", "")}): {caption}'


def vae_input(latent: np.ndarray, record: dict) -> np.ndarray:
    """What the VAE decodes from a stored latent, by convention.json's `image_latents` inverse: stored /
    scaling_factor[c] + shift_factor[c] (a number: all channels), then unpatchified if it was patchified."""
    per_channel = (-1,) + (1,) * (latent.ndim - 1)
    z = (latent / np.asarray(record['scaling_factor'], np.float32).reshape(per_channel)
         + np.asarray(record['shift_factor'], np.float32).reshape(per_channel))
    if p := record.get('patchify', 0):  # Flux2Pipeline._unpatchify_latents, without the batch axis
        c, h, w = z.shape
        z = z.reshape(c // (p * p), p, p, h, w).transpose(0, 3, 1, 4, 2).reshape(c // (p * p), h * p, w * p)
    return z


def write_preview(args: argparse.Namespace, out_root: str, device: torch.device, path: str) -> list[int]:
    """Read a finished output back (its index.json, convention.json and the shards of the chosen
    samples, copied to a temporary folder) and write the preview PNG to `path`; returns the sample ids."""
    with failing(f'--preview: cannot read {CONVENTION} and {INDEX} of the output {out_root} (',
                 '); finish the run first (rerun without --preview_only)'):
        convention = read_json(join(out_root, CONVENTION), args.download_timeout)
        shards = read_json(join(out_root, INDEX), args.download_timeout)['shards']
    pattern = re.escape(LATENT_COLUMN).replace(re.escape('{res}'), r'(\d+)')
    columns = sorted((int(m[1]), c) for c in convention['columns'] if (m := re.fullmatch(pattern, c)))
    written = convention['image_latents'].get('vae', '')  # '': the model's own vae/
    image = find_vae(args.model_name, args.vae or written)  # the writer's VAE unless --vae names another
    if (args.vae or written) != written or (not written and convention['model'] != args.model_name):
        print(f'warning: --preview decodes with the VAE {image.folder}:{image.subfolder}; the output was '
              f'written with {written or convention["model"] + ":vae"}', file=sys.stderr)
    vae = load_module(image.folder, image.subfolder, image.vae.class_name, device, torch.float32)
    total = sum(s['samples'] for s in shards)  # ids spread evenly, the first and the last included
    ids = sorted({int(i) for i in np.linspace(0, total - 1, min(args.preview, total)).round()})
    os.makedirs(args.local, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.local, prefix='preview-') as tmp:
        cache = ShardCache(numbered(plan_parts(shards, 1), shards), out_root, tmp, args.download_timeout,
                           args.download_retry)
        with torch.inference_mode():
            rows = [preview_row(i, cache.get(i), columns, convention, vae, device) for i in ids]
    header = [label for res, c in columns for label in (f'source {res} px', f'decoded {c}')]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    draw_grid(header, rows).save(path)
    return ids


def preview(args: argparse.Namespace, out_root: str, device: torch.device, summary: str | None) -> None:
    """--preview: write the PNG, print its path, and record it in the summary JSON (when given)."""
    if args.preview < 1:
        raise UserError('--preview_only: give --preview N, the number of samples to show')
    path = args.preview_path or os.path.splitext(summary_path(args))[0] + '_preview.png'
    try:
        ids = write_preview(args, out_root, device, path)
    except UserError:
        raise
    except Exception as err:
        why = f'no preview drawn ({type(err).__name__}: {last_line(err)})'
        if args.preview_only:  # the one step asked for did not happen
            raise UserError(f'--preview_only: {why}; is --model_name the model that wrote the '
                            'output?') from None
        print(f'warning: {why}; the dataset is complete: rerun with --preview_only', file=sys.stderr,
              flush=True)
        return
    if summary is not None:
        with open(summary) as f:
            record = json.load(f)
        with open(summary, 'w') as f:
            json.dump({**record, 'preview': {'path': path, 'samples': ids}}, f, indent=2)
    print(f'preview {path} (samples {", ".join(map(str, ids))})', flush=True)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def import_torch() -> None:
    """torch into this module's namespace. The script does it after checking its flags (importing
    torch takes seconds: a mistyped flag fails at once); importing the module does it at once."""
    global torch, dist
    import torch
    import torch.distributed as dist


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pl = places(args)
    try:
        check_args(args, pl)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr, flush=True)
        sys.exit(2)
    import_torch()
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    stop_on_signals()
    plan = None
    try:
        if world > 1:
            dist.init_process_group('gloo', timeout=timedelta(seconds=args.dist_timeout))
        device, dtype = pick_device(args)
        if args.preview_only:
            if rank == 0:
                preview(args, pl.out, device, None)
            return
        plan = share_plan(args, pl, dtype, rank, world)
        stats = run_rank(args, plan, device, dtype, rank, world)
        if world > 1:
            dist.barrier()
        if rank == 0:
            summary, groups = summarize(args, plan, stats, world, None)
            if not summary['parts_missing'] and summary['written']:  # no index a reader would take for
                merge_parts(plan, groups, args.download_timeout)  # the whole set, nor one of nothing
            report(summary, summary_path(args))
            shutil.rmtree(pl.staging, ignore_errors=True)
            if summary['parts_missing']:
                raise UserError(f'parts {", ".join(summary["parts_missing"])} have no _done marker; '
                                'rerun the same command')
            if not summary['written']:
                raise UserError(nothing_written(summary))
            if not any(summary['encoded'].values()):
                raise UserError(nothing_encoded(args))
            if args.preview:
                preview(args, pl.out, device, summary_path(args))
    except UserError as err:
        print(f'error: {err}', file=sys.stderr, flush=True)
        sys.exit(2)
    except Interrupted as stop:
        if rank == 0 and plan is not None:
            report_interrupted(args, plan, stop, world)
        print(f'error: stopped by {stop}: finished parts are kept, the part in progress is not; rerun the '
              'same command to resume', file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
else:  # imported (benchmarks, tests): its functions need torch now
    import_torch()
