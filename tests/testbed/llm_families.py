"""Tiny pipeline folders of the families that encode text with a language model, loaded only through
`from_pretrained` (by precompute_latents.py and by the pipeline's own `from_pretrained`).

Each folder has a model_index.json naming its pipeline and components, and the REAL classes at toy sizes
(two layers, so hidden_states[-2] differs from the last):

- zimage:    text_encoder/ Qwen3Model (Z-Image's model_index.json names it: no language-model head, as its
  weights hold none), tokenizer/ Qwen2TokenizerFast with a Qwen3-style chat template.
- lumina2:   text_encoder/ Gemma2Model, tokenizer/ GemmaTokenizerFast (<bos> first).
- chroma:    text_encoder/ T5EncoderModel, tokenizer/ T5TokenizerFast (families.py's Unigram T5).
- qwenimage: text_encoder/ Qwen2_5_VLForConditionalGeneration (a one-block vision tower beside the
  language model), tokenizer/ Qwen2TokenizerFast.
- sana:      text_encoder/ Gemma2Model, tokenizer/ GemmaTokenizerFast.
- flux2:     text_encoder/ Mistral3ForConditionalGeneration with 31 language layers (FLUX.2 stacks
  hidden_states 10, 20 and 30), tokenizer/ a PixtralProcessor (LlamaTokenizerFast + a Mistral-style chat
  template with typed content, as the pipeline's AutoProcessor loads it).

The LLM tokenizers are real byte-level BPEs trained offline with `tokenizers` on a few hundred words (any
text, non-ASCII included, tokenizes), with the model's special tokens. VAEs: FLUX.1's AutoencoderKL layout
(16 channels, scaling 0.3611, shift 0.1159) for zimage, lumina2 and chroma; qwenimage, sana and flux2 get
their own classes, AutoencoderKLQwenImage, AutoencoderDC and AutoencoderKLFlux2 (vae_families.py's tiny
ones, whose latents tests/test_vae_families.py checks against the pipelines' code).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .families import VAES, WORDS, write_t5, write_t5_tokenizer, write_vae
from .vae_families import build_vae

LLM = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8)
# A Qwen3-style chat template (the real one's shape: <|im_start|>role\ncontent<|im_end|>\n, and the
# generation prompt, with empty think tags when enable_thinking is false).
QWEN_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
             "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
# Mistral's shape: <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST], content as typed parts.
MISTRAL_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
                "{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}"
                "[/INST]{% endif %}{% endfor %}")
PIPELINES = {'zimage': 'ZImagePipeline', 'lumina2': 'Lumina2Pipeline', 'chroma': 'ChromaPipeline',
             'qwenimage': 'QwenImagePipeline', 'sana': 'SanaPipeline', 'flux2': 'Flux2Pipeline'}
ENCODERS = {'zimage': ('Qwen3Model', 'Qwen2TokenizerFast'),
            'lumina2': ('Gemma2Model', 'GemmaTokenizerFast'), 'chroma': ('T5EncoderModel', 'T5TokenizerFast'),
            'qwenimage': ('Qwen2_5_VLForConditionalGeneration', 'Qwen2TokenizerFast'),
            'sana': ('Gemma2Model', 'GemmaTokenizerFast'), 'flux2': ('Mistral3ForConditionalGeneration',
                                                                      'PixtralProcessor')}


def bpe(specials: list[str], vocab_size: int = 400):
    """A byte-level BPE trained here on WORDS, with `specials` first (ids 0, 1, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = [' '.join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8)) + f' {i}' for i in range(300)]
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def write_qwen_tokenizer(folder: Path) -> int:
    """Qwen2TokenizerFast with Qwen's special tokens and chat template; returns its size."""
    from transformers import Qwen2TokenizerFast

    fast = Qwen2TokenizerFast(tokenizer_object=bpe(['<|endoftext|>', '<|im_start|>', '<|im_end|>']),
                              pad_token='<|endoftext|>', eos_token='<|im_end|>', unk_token=None,
                              bos_token=None, model_max_length=2048)
    fast.chat_template = QWEN_CHAT
    fast.save_pretrained(folder)
    return len(fast)


def write_gemma_tokenizer(folder: Path) -> int:
    """GemmaTokenizerFast (<bos> prepended, as Gemma's); returns its size."""
    from transformers import GemmaTokenizerFast

    fast = GemmaTokenizerFast(tokenizer_object=bpe(['<pad>', '<eos>', '<bos>', '<unk>']), pad_token='<pad>',
                              eos_token='<eos>', bos_token='<bos>', unk_token='<unk>', model_max_length=2048)
    fast.save_pretrained(folder)
    return len(fast)


def write_pixtral_processor(folder: Path) -> int:
    """A PixtralProcessor: Mistral's special tokens, <s> written by the chat template; returns its size."""
    from transformers import LlamaTokenizerFast, PixtralImageProcessor, PixtralProcessor

    specials = ['<unk>', '<s>', '</s>', '<pad>', '[INST]', '[/INST]', '[SYSTEM_PROMPT]', '[/SYSTEM_PROMPT]',
                '[IMG]', '[IMG_BREAK]', '[IMG_END]']
    tok = LlamaTokenizerFast(tokenizer_object=bpe(specials), bos_token='<s>', eos_token='</s>',
                             unk_token='<unk>', pad_token='<pad>', model_max_length=2048)
    PixtralProcessor(PixtralImageProcessor(), tok, patch_size=16, spatial_merge_size=2,
                     chat_template=MISTRAL_CHAT).save_pretrained(folder)
    return len(tok)


def write_llm(folder: Path, family: str, vocab: int) -> None:
    import transformers

    if family == 'zimage':
        model = transformers.Qwen3Model(transformers.Qwen3Config(vocab_size=vocab, **LLM))
    elif family == 'flux2':
        model = transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
            text_config=dict(model_type='mistral', vocab_size=vocab, **{**LLM, 'num_hidden_layers': 31}),
            vision_config=dict(model_type='pixtral', hidden_size=16, intermediate_size=16, head_dim=8,
                               num_hidden_layers=1, num_attention_heads=2, patch_size=16, image_size=64),
            image_token_index=8, spatial_merge_size=2))
    elif family in ('lumina2', 'sana'):
        model = transformers.Gemma2Model(transformers.Gemma2Config(vocab_size=vocab, pad_token_id=0, **LLM))
    else:  # qwenimage: mrope sections add up to head_dim / 2
        model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
            text_config=dict(vocab_size=vocab, rope_scaling={'type': 'mrope', 'mrope_section': [1, 1, 2]},
                             **{k: v for k, v in LLM.items() if k != 'head_dim'}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                               fullatt_block_indexes=[0])))
    model.save_pretrained(folder)


OWN_VAES = {'qwenimage': 'AutoencoderKLQwenImage', 'sana': 'AutoencoderDC', 'flux2': 'AutoencoderKLFlux2'}


def build_llm_family(folder: Path, family: str, seed: int = 0) -> Path:
    """A pipeline folder of `family` (one of PIPELINES) under `folder`, deterministic for a seed."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    torch.manual_seed(seed)
    if family in OWN_VAES:
        build_vae(folder / 'vae', family, seed)
    else:
        write_vae(folder / 'vae', *VAES['flux'])
    if family == 'chroma':
        write_t5(folder / 'text_encoder', write_t5_tokenizer(folder / 'tokenizer'))
    else:
        vocab = {'lumina2': write_gemma_tokenizer, 'sana': write_gemma_tokenizer,
                 'flux2': write_pixtral_processor}.get(family, write_qwen_tokenizer)(folder / 'tokenizer')
        write_llm(folder / 'text_encoder', family, vocab)
    FlowMatchEulerDiscreteScheduler().save_pretrained(folder / 'scheduler')
    model, tok = ENCODERS[family]
    (folder / 'model_index.json').write_text(json.dumps({
        '_class_name': PIPELINES[family], '_diffusers_version': '0.39.0',
        'vae': ['diffusers', OWN_VAES.get(family, 'AutoencoderKL')], 'text_encoder': ['transformers', model],
        'tokenizer': ['transformers', tok], 'scheduler': ['diffusers', 'FlowMatchEulerDiscreteScheduler'],
        'transformer': [None, None]}))
    return folder


def pipeline_of(folder: Path, family: str):
    """diffusers' own pipeline of `family`, from_pretrained from the folder without a denoiser or VAE: the
    reference whose `encode_prompt` the stored text columns must equal."""
    import diffusers

    return getattr(diffusers, PIPELINES[family]).from_pretrained(folder, transformer=None, vae=None)


# OpenCLIP's own layout of a CLIP (open_clip_config.json's model_cfg, as its hub repositories write it) at
# toy size: ViT-H-14's text tower is width 1024, 24 layers, 16 heads, embed_dim 1024; three layers here so the
# penultimate block differs from the last. The vocabulary stays OpenCLIP's (its SimpleTokenizer's 49408).
OPENCLIP_CFG = {'embed_dim': 16,
                'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 32, 'head_width': 16,
                               'patch_size': 16},
                'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 3}}


def write_openclip(folder: Path, seed: int = 0) -> Path:
    """An OpenCLIP CLIP saved as its hub folders hold one: open_clip_config.json and
    open_clip_model.safetensors."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = CLIP(**OPENCLIP_CFG)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, folder / 'open_clip_model.safetensors')
    (folder / 'open_clip_config.json').write_text(json.dumps({'model_cfg': OPENCLIP_CFG,
                                                              'preprocess_cfg': {}}))
    return folder
