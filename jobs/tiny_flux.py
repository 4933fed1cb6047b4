"""Tiny, random-weight FLUX.1 pipelines written to disk, as `jobs/tiny_sdxl.py` does for SDXL: the
real `from_pretrained` path (safetensors, configs, both tokenizers) offline and fast.

Each keeps what tells a FLUX.1 checkpoint apart and shrinks the rest: CLIP (pooled only) and a T5
encoder (`jobs/tiny_t5.py`) whose hidden states are the transformer's text tokens, a transformer
of one double and one single block over 2x2-packed latents with rotary position axes, a VAE with
a `shift_factor` (FLUX.1's latents are shifted, then scaled), and a flow-matching scheduler. The
dev-shaped checkpoint embeds guidance (`guidance_embeds: true`) and shifts its schedule by the
image's token count (`use_dynamic_shifting`), as black-forest-labs/FLUX.1-dev's configs say; the
schnell-shaped one has neither, as FLUX.1-schnell's say. The Fill-shaped one (FLUX.1-Fill-dev's
FluxFillPipeline) is dev's with a wider input: its transformer reads the noisy latents, the masked
image's latents and the mask packed 2x2 after an 8x8 space-to-depth (FluxFillPipeline's
prepare_mask_latents), so in_channels = 2 x out_channels + 8 x 8 x 4.
"""

from __future__ import annotations

import os
import pathlib

from sdfleet.jobs.tiny_clip import clip_text_encoder, clip_tokenizer
from sdfleet.jobs.tiny_t5 import T5_HIDDEN, t5_encoder, t5_tokenizer
from sdfleet.schemas.family_flux import FILL_MASK_CHANNELS

CLIP_HIDDEN = 32  # the CLIP encoder's width, and its pooled embedding's
TINY_FLUX_VARIANTS = ("dev", "schnell", "fill")
LATENT_CHANNELS = 16  # the VAE's 4 latent channels x the 2x2 packing


def _transformer(guidance_embeds: bool, fill: bool = False):
    from diffusers import FluxTransformer2DModel

    # The rotary axes' dims sum to the attention head's (16), as FLUX.1's (16, 56, 56) sum to
    # its 128.
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=2 * LATENT_CHANNELS + FILL_MASK_CHANNELS if fill else LATENT_CHANNELS,
        # Fill's only: dev's and schnell's configs leave it null (the same as in_channels).
        out_channels=LATENT_CHANNELS if fill else None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks -> scale factor 8, as FLUX.1's, so sizes sit on its 16-pixel grid; FLUX.1's
    # VAE has no quant convolutions and shifts its latents (its config: 0.1159, 0.3611).
    return AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _scheduler(dynamic: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler_config.json: shift 3.0 and dynamic shifting between 256 and 4096
    # image tokens (mu from 0.5 to 1.15); FLUX.1-schnell's: shift 1.0, no dynamic shifting.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if dynamic else 1.0,
        use_dynamic_shifting=dynamic,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def write_tiny_flux(path: str | os.PathLike, variant: str = "dev") -> pathlib.Path:
    """Write a tiny FLUX.1-dev-, -schnell- or -Fill-dev-shaped checkpoint to `path` (safetensors)
    and return it. Seeded before each component, so the weights are the same on every run."""
    import torch
    from diffusers import FluxFillPipeline, FluxPipeline

    if variant not in TINY_FLUX_VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(TINY_FLUX_VARIANTS)}")
    dev = variant != "schnell"  # Fill is dev's, guidance embedding and schedule alike
    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = clip_text_encoder(tokenizer, CLIP_HIDDEN)
    text_encoder_2 = t5_encoder(seed=1)
    torch.manual_seed(2)
    transformer = _transformer(guidance_embeds=dev, fill=variant == "fill")
    torch.manual_seed(3)
    pipe = (FluxFillPipeline if variant == "fill" else FluxPipeline)(
        scheduler=_scheduler(dynamic=dev),
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    out = pathlib.Path(path)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
