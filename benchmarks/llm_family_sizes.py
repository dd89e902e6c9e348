"""Bytes per sample and GPU memory of the weights for the families whose text encoder is a language model,
computed (not measured) from the published configs' sizes written below, for the tables of
docs/precompute_latents.md.

    python benchmarks/llm_family_sizes.py

Text: one caption key, float16 (`--storage_dtype` default), rows as precompute_latents.py stores them
(padded families: every row, plus the bool mask where the family stores one; variable-length families:
n rows plus the int32 count, n = a 20-token caption plus its template's tokens after any drop). Latents:
the 256 and 512 px columns both present. Weights: bfloat16 parameters of what the script puts on the GPU
(a ...ForConditionalGeneration's backbone keeps its vision tower; the language-model head stays on the
CPU), counted from the config.
"""

from __future__ import annotations

# Language models (config.json of the published checkpoint). head_dim: per attention head.
LLMS = {
    # Tongyi-MAI/Z-Image-Turbo text_encoder/ = Qwen3-4B (tied embeddings, q/k norms)
    'qwen3-4b': dict(vocab=151936, hidden=2560, layers=36, inter=9728, heads=32, kv=8, head_dim=128,
                     qkv_bias=False, qk_norm=True, norms=2),
    # Alpha-VLLM/Lumina-Image-2.0 and SANA text_encoder/ = Gemma-2-2B (Gemma2Model: no head; 4 norms a layer)
    'gemma2-2b': dict(vocab=256000, hidden=2304, layers=26, inter=9216, heads=8, kv=4, head_dim=256,
                      qkv_bias=False, qk_norm=False, norms=4),
    # Qwen/Qwen-Image text_encoder/ = Qwen2.5-VL-7B-Instruct's language model (q/k/v biases, own lm_head)
    'qwen2.5-vl-7b': dict(vocab=152064, hidden=3584, layers=28, inter=18944, heads=28, kv=4, head_dim=128,
                          qkv_bias=True, qk_norm=False, norms=2),
    # black-forest-labs/FLUX.2-dev text_encoder/ = Mistral-Small-3.1-24B-Instruct-2503's language model
    'mistral-small-3.1': dict(vocab=131072, hidden=5120, layers=40, inter=32768, heads=32, kv=8, head_dim=128,
                              qkv_bias=False, qk_norm=False, norms=2),
    # HiDream-I1 text_encoder_4 = Llama-3.1-8B-Instruct
    'llama-3.1-8b': dict(vocab=128256, hidden=4096, layers=32, inter=14336, heads=32, kv=8, head_dim=128,
                         qkv_bias=False, qk_norm=False, norms=2),
}
# Vision towers the ...ForConditionalGeneration classes load beside the language model (vision config:
# depth, width, MLP width (gated: 3 matrices), patch merger out width).
VISION = {
    'qwen2.5-vl-7b': dict(layers=32, hidden=1280, inter=3420, gated=True, merge_in=1280 * 4, out=3584),
    'mistral-small-3.1': dict(layers=24, hidden=1024, inter=4096, gated=True, merge_in=1024 * 4, out=5120),
}
T5_XXL = 4_762_310_656  # T5 v1.1 XXL encoder (docs/precompute_latents.md: the flux row), as Chroma loads it
CLIP_L, CLIP_G = 123_060_480, 694_659_840
# VAEs: (latent channels, downsampling, parameters). FLUX.1's and FLUX.2's AutoencoderKL widths (128, 256,
# 512, 512) count 84 M; AutoencoderKLQwenImage (Wan-2.1's video VAE) 127 M; DC-AE f32c32 (SANA) ~312 M.
VAES = {'flux1': (16, 8, 83.8e6), 'flux2': (32, 8, 84.0e6), 'qwenimage': (16, 8, 126.9e6),
        'dcae': (32, 32, 312.3e6)}


def llm_params(c: dict) -> int:
    attn = c['hidden'] * c['head_dim'] * (2 * c['heads'] + 2 * c['kv'])
    attn += c['head_dim'] * (c['heads'] + 2 * c['kv']) * c['qkv_bias'] + 2 * c['head_dim'] * c['qk_norm']
    layer = attn + 3 * c['hidden'] * c['inter'] + c['norms'] * c['hidden']
    return c['vocab'] * c['hidden'] + c['layers'] * layer + c['hidden']  # the head stays on the CPU


def vision_params(v: dict) -> int:
    layer = 4 * v['hidden'] ** 2 + (3 if v['gated'] else 2) * v['hidden'] * v['inter']
    return v['layers'] * layer + v['merge_in'] * v['merge_in'] + v['merge_in'] * v['out']


# family: (language model or 'T5', stored rows (padded: the length; variable: a 20-token caption's n),
#          width multiplier (stacked layers), mask bytes, int32 count, max rows, VAE)
FAMILIES = {
    'zimage': ('qwen3-4b', 20 + 8, 1, 0, 4, 512, 'flux1'),
    'lumina2': ('gemma2-2b', 256, 1, 256, 0, 256, 'flux1'),
    'chroma': ('T5', 512, 1, 512, 0, 512, 'flux1'),
    'qwenimage': ('qwen2.5-vl-7b', 20 + 5, 1, 0, 4, 1024, 'qwenimage'),
    'sana': ('gemma2-2b', 300, 1, 300, 0, 300, 'dcae'),
    'flux2': ('mistral-small-3.1', 512, 3, 0, 0, 512, 'flux2'),
    'hidream': ('llama-3.1-8b', 128, 32, 0, 0, 128, 'flux1'),  # every layer's states; + T5 and 2 CLIPs
}


def main() -> None:
    print('| family | text bytes per caption (float16) | + latents 256 & 512 px | total | at 2B rows '
          '| text encoder parameters | weights in bfloat16 (+ VAE) |')
    print('|---|---|---|---|---|---|---|')
    for name, (lm, rows, mult, mask, count, most, vae) in FAMILIES.items():
        width = 4096 if lm == 'T5' else LLMS[lm]['hidden']
        text = rows * width * mult * 2 + mask + count
        if name == 'hidream':  # + T5-XXL (128 rows) and the CLIP-L + CLIP-G pooled vectors
            text += 128 * 4096 * 2 + (768 + 1280) * 2
        channels, down, vae_params = VAES[vae]
        latents = sum(channels * (r // down) ** 2 * 2 for r in (256, 512))
        params = T5_XXL if lm == 'T5' else llm_params(LLMS[lm]) + (
            vision_params(VISION[lm]) if lm in VISION else 0)
        if name == 'hidream':  # as HiDream loads them: Llama with its head, T5-XXL, CLIP-L, CLIP-G
            params += LLMS[lm]['vocab'] * LLMS[lm]['hidden'] + T5_XXL + CLIP_L + CLIP_G
        variable = f' (n = {rows}; up to {most * width * 2 / 1e6:.2f} MB)' if count else ''
        total = text + latents
        print(f'| `{name}` | {text / 1e6:.2f} MB{variable} | {latents / 1e3:.0f} KB | {total / 1e6:.2f} MB '
              f'| {total * 2e9 / 1e15:.1f} PB | {params / 1e9:.2f} B | {params * 2 / 1e9:.1f} GB '
              f'(+ {vae_params * 2 / 1e9:.2f} GB) |')


if __name__ == '__main__':
    main()
