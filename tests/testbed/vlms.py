"""Tiny vision-language models of real transformers classes, saved to a folder and loaded only through
`AutoProcessor` / `AutoModelForImageTextToText.from_pretrained`, as caption_images.py loads a hub model.

- `llava`: LlavaForConditionalGeneration (a 2-layer CLIPVisionModel tower on 28 x 28 crops, 4 image
  tokens, and a 2-layer Llama), LlavaProcessor with CLIPImageProcessor and LLaVA-1.5's chat template.
- `qwen2_vl`: Qwen2VLForConditionalGeneration (a 1-block vision tower, 2-layer Qwen2 with M-RoPE),
  Qwen2VLProcessor whose image processor keeps images at 56 x 56 to 112 x 112 pixels (4 to 16 image
  tokens, so a batch of different sizes is left-padded), and Qwen2-VL's chat template; with
  `full_size`, Qwen2-VL-2B's sizes (for benchmarks/bench_caption_images.py on a GPU).

- `idefics3`: Idefics3ForConditionalGeneration (SmolVLM's architecture: a 1-layer SigLIP-style tower on
  32 x 32 images, pixel shuffle to 4 image tokens, a 2-layer Llama), Idefics3Processor without image
  splitting, and SmolVLM's chat template.

Each tokenizer is a byte-level BPE trained here with the `tokenizers` library on a fixed text (no hub),
with the model's special tokens. The weights are random (seeded): the captions are noise, but a real
model's code path makes them. `build_vlm(kind, folder)` writes one; both are deterministic.
"""

from __future__ import annotations

from pathlib import Path

import torch

from testbed.models import bytes_to_unicode

WORDS = ('a photo of a red cat on a blue sofa next to the window the image shows a dog in the park '
         'in this image there is a man riding a bicycle along the river note this is a caption '
         'detailed description of the picture with trees sky clouds and a small house').split()
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
KINDS = ('llava', 'qwen2_vl', 'idefics3')
INIT = 0.2  # weight std (transformers' 0.02 makes a tiny model write the same caption for every image)

ASCII = bytes_to_unicode()  # byte-level BPE's byte -> printable character map


def bpe_tokenizer(special: list[str], bos: str | None, eos: str, pad: str, vocab_size: int = 300,
                  cls: str = 'PreTrainedTokenizerFast'):
    """A fast tokenizer of transformers class `cls`: byte-level BPE trained on WORDS over the bytes
    of printable ASCII and newline (so the noise a random model writes is readable), `special` tokens
    first (ids 0..)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=[ASCII[b] for b in [10, *range(32, 127)]],
                                  show_progress=False)
    tok.train_from_iterator([' '.join(WORDS)] * 20, trainer)
    return getattr(transformers, cls)(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=None, model_input_names=['input_ids', 'attention_mask'])


def build_llava(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = bpe_tokenizer(['<unk>', '<s>', '</s>', '<pad>', '<image>'], '<s>', '</s>', '<pad>')
    tok.add_special_tokens({'additional_special_tokens': ['<image>']})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32,
                              initializer_range=INIT)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, initializer_range=INIT)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(
        '<image>'), vision_feature_layer=-1, vision_feature_select_strategy='default',
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    images = CLIPImageProcessor(size={'shortest_edge': 28}, crop_size={'height': 28, 'width': 28})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy='default', num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


# Qwen2-VL-2B-Instruct's sizes (its config.json, written out here: no hub), for the GPU benchmark.
QWEN2_VL_2B = {'text': dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                            rope_theta=1e6, rope_scaling={'type': 'mrope', 'mrope_section': [16, 24, 24]},
                            tie_word_embeddings=True),
               'vision': dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
               'pixels': (56 * 56, 28 * 28 * 1280)}
TINY_QWEN2_VL = {'text': dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                              rope_scaling={'type': 'mrope', 'mrope_section': [2, 3, 3]},
                              tie_word_embeddings=True, initializer_range=INIT),
                 'vision': dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14,
                                spatial_merge_size=2, temporal_patch_size=2, initializer_range=INIT),
                 'pixels': (56 * 56, 112 * 112)}


def build_qwen2_vl(folder: Path, seed: int = 0, full_size: bool = False) -> Path:
    """The tiny Qwen2-VL, or with `full_size` one of Qwen2-VL-2B's sizes (random weights, bfloat16 on
    disk, no end-of-text token in its generation config: every caption runs to max_new_tokens)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    sizes = QWEN2_VL_2B if full_size else TINY_QWEN2_VL
    special = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|vision_start|>', '<|vision_end|>',
               '<|image_pad|>', '<|video_pad|>']
    tok = bpe_tokenizer(special, None, '<|im_end|>', '<|endoftext|>', cls='Qwen2TokenizerFast')
    tok.add_special_tokens({'additional_special_tokens': special[1:]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    text = {'vocab_size': len(tok), **sizes['text']}
    cfg = Qwen2VLConfig(text_config=text, vision_config=sizes['vision'], image_token_id=ids['<|image_pad|>'],
                        video_token_id=ids['<|video_pad|>'], vision_start_token_id=ids['<|vision_start|>'],
                        vision_end_token_id=ids['<|vision_end|>'], bos_token_id=None,
                        eos_token_id=ids['<|im_end|>'], pad_token_id=ids['<|endoftext|>'], **text)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = ids['<|endoftext|>']
    model.generation_config.eos_token_id = None if full_size else ids['<|im_end|>']
    model.generation_config.bos_token_id = None
    images = Qwen2VLImageProcessor(min_pixels=sizes['pixels'][0], max_pixels=sizes['pixels'][1])
    processor = Qwen2VLProcessor(image_processor=images, tokenizer=tok, chat_template=QWEN_TEMPLATE,
                                 video_processor=Qwen2VLVideoProcessor())
    (model.to(torch.bfloat16) if full_size else model).save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def build_idefics3(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    special = ['<|endoftext|>', '<|im_start|>', '<end_of_utterance>', '<fake_token_around_image>', '<image>',
               '<global-img>']
    tok = bpe_tokenizer(special, '<|im_start|>', '<end_of_utterance>', '<|endoftext|>')
    tok.add_special_tokens({'additional_special_tokens': special[1:]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8, initializer_range=INIT)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                initializer_range=INIT, pad_token_id=ids['<|endoftext|>'], bos_token_id=ids['<|im_start|>'],
                eos_token_id=ids['<end_of_utterance>'])
    cfg = Idefics3Config(vision_config=vision, text_config=text, image_token_id=ids['<image>'],
                         scale_factor=2, pad_token_id=ids['<|endoftext|>'])
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = ids['<|endoftext|>']
    model.generation_config.eos_token_id = ids['<end_of_utterance>']
    images = Idefics3ImageProcessor(do_image_splitting=False, size={'longest_edge': 32},
                                    max_image_size={'longest_edge': 32})
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4,
                                  chat_template=IDEFICS3_TEMPLATE)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def build_vlm(kind: str, folder: Path, seed: int = 0) -> Path:
    """Write the tiny model `kind` (one of KINDS) with its processor to `folder`."""
    builders = {'llava': build_llava, 'qwen2_vl': build_qwen2_vl, 'idefics3': build_idefics3}
    return builders[kind](Path(folder), seed)


def direct_captions(model_dir: Path, images: list, prompt: str, max_new_tokens: int) -> list[str]:
    """The reference a captioner is checked against: each PIL image alone through the model's processor
    (chat template, one user turn of the image and `prompt`) and `model.generate` (greedy), decoded."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    turn = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': prompt}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True)
    out = []
    for img in images:
        inputs = processor(images=[img], text=[text], return_tensors='pt')
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(processor.decode(ids[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))
    return out
