"""Tiny VAEs of the newer pipelines' real classes, saved with save_pretrained (each a VAE folder of its
own, as `--vae FOLDER` takes it), loaded only through `from_pretrained`:

- flux2: AutoencoderKLFlux2, 8x down, 4 latent channels (FLUX.2: 32), a 2x2 patchify to 16 (128), and
  batch-norm running statistics set away from (0, 1) so that the normalisation shows.
- qwenimage: AutoencoderKLQwenImage, a video VAE (frame axis), 8x down, 4 channels (16), latents_mean and
  latents_std of its own.
- sana: AutoencoderDC, 32x down, 4 latent channels (32), scaling factor 0.41407 (SANA's).

`full_size=True`: the published configs' sizes with random weights (GPU benchmarks).
"""

from __future__ import annotations

from pathlib import Path

import torch

# Full size, from the published vae/config.json of black-forest-labs/FLUX.2-dev, Qwen/Qwen-Image and
# Efficient-Large-Model/Sana_1600M_1024px_diffusers (mit-han-lab/dc-ae-f32c32-sana-1.0).
FULL = {
    'flux2': dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=32,
                  norm_num_groups=32),
    'qwenimage': dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
    'sana': dict(latent_channels=32, encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                 decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                 encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                 encoder_block_types=('ResBlock',) * 3 + ('EfficientViTBlock',) * 3,
                 decoder_block_types=('ResBlock',) * 3 + ('EfficientViTBlock',) * 3,
                 encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
                 decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3, upsample_block_type='interpolate',
                 decoder_norm_types=('batch_norm',) * 3 + ('rms_norm',) * 3,
                 decoder_act_fns=('relu',) * 3 + ('silu',) * 3),
}
TINY = {
    'flux2': dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                  norm_num_groups=8),
    'qwenimage': dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    'sana': dict(latent_channels=4, encoder_block_out_channels=(8, 8, 16, 16, 16, 16),
                 decoder_block_out_channels=(8, 8, 16, 16, 16, 16), encoder_layers_per_block=(1,) * 6,
                 decoder_layers_per_block=(1,) * 6, encoder_block_types='ResBlock',
                 decoder_block_types='ResBlock',
                 encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6, attention_head_dim=8),
}
SANA_SCALING = 0.41407


def build_vae(folder: Path, kind: str, seed: int = 0, full_size: bool = False) -> Path:
    """A VAE folder of `kind` ('flux2', 'qwenimage' or 'sana'), deterministic for a seed."""
    from diffusers import AutoencoderDC, AutoencoderKLFlux2, AutoencoderKLQwenImage

    torch.manual_seed(seed)
    dims = (FULL if full_size else TINY)[kind]
    if kind == 'flux2':
        vae = AutoencoderKLFlux2(**dims)
        with torch.no_grad():  # statistics as training leaves them, not the initial (0, 1)
            vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.5)
            vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) * 2 + 0.25)
    elif kind == 'qwenimage':
        z = dims['z_dim']
        g = torch.Generator().manual_seed(seed)
        vae = AutoencoderKLQwenImage(**dims, latents_mean=(torch.randn(z, generator=g) * 0.5).tolist(),
                                     latents_std=(torch.rand(z, generator=g) * 2 + 0.5).tolist())
    else:
        vae = AutoencoderDC(**dims, scaling_factor=SANA_SCALING)
    (vae.half() if full_size else vae).save_pretrained(folder)
    return Path(folder)
