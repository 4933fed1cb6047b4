"""Tiny, random-weight SDXL pipelines (base and refiner) written to disk, as `jobs/tiny.py` does
for SD2: the real `from_pretrained` path (safetensors, configs, both tokenizers) offline and fast.

Each keeps what tells an SDXL checkpoint apart and shrinks the rest: the UNet's "text_time" added
embedding (the pooled text embedding plus the size and crop ids), two text encoders whose hidden
states are concatenated for cross-attention (the second a CLIPTextModelWithProjection, pooled),
SDXL's VAE scaling factor; the refiner has text_encoder_2 alone and an aesthetic-score id in place
of the target size (`requires_aesthetics_score`), as stable-diffusion-xl-refiner-1.0 has.
"""

from __future__ import annotations

import os
import pathlib

from sdfleet.jobs.tiny_clip import clip_text_encoder, clip_tokenizer

HIDDEN = 32  # each text encoder's width, and its pooled projection's
TIME_EMBED = 8  # per size, crop or aesthetic id (SDXL: 256)
# Ids in the added embedding: base original size, crop, target size (2 each); the refiner's
# target size gives way to one aesthetic score.
BASE_TIME_IDS, REFINER_TIME_IDS = 6, 5
# The inpainting checkpoint (diffusers/stable-diffusion-xl-1.0-inpainting-0.1's shape): the base
# with a 9-channel UNet (latents, mask, masked-image latents).
TINY_SDXL_VARIANTS = ("base", "refiner", "inpaint")


def _unet(cross_attention_dim: int, time_ids: int, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,  # 8 latent pixels x 8 = 64-pixel images
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        # SDXL's first block has no attention; its later ones do.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=HIDDEN + time_ids * TIME_EMBED,
    )


def _vae(force_upcast: bool = True):
    from diffusers import AutoencoderKL

    # Four blocks -> scale factor 8, as SDXL's; force_upcast as SDXL's VAE config says (an
    # fp16-fixed VAE says false: it decodes in float16 without overflowing).
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=force_upcast,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    # SDXL-base 1.0's shipped scheduler config.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
    )


def write_tiny_sdxl(path: str | os.PathLike, variant: str = "base") -> pathlib.Path:
    """Write a tiny SDXL base, refiner or inpainting checkpoint to `path` (safetensors) and return
    it. Seeded before each component, so the weights are the same on every run."""
    import torch
    from diffusers import (
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    if variant not in TINY_SDXL_VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(TINY_SDXL_VARIANTS)}")
    refiner = variant == "refiner"
    # 1. The text encoders: CLIP ViT-L's place (base only) and OpenCLIP bigG's, pooled.
    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = None if refiner else clip_text_encoder(tokenizer, HIDDEN)
    torch.manual_seed(1)
    text_encoder_2 = clip_text_encoder(tokenizer, HIDDEN, projection=True)
    # 2. The UNet reads both encoders' hidden states, concatenated (the refiner's: the second's).
    torch.manual_seed(0)
    unet = _unet(
        HIDDEN if refiner else 2 * HIDDEN,
        REFINER_TIME_IDS if refiner else BASE_TIME_IDS,
        in_channels=9 if variant == "inpaint" else 4,
    )
    torch.manual_seed(0)
    parts = {
        "vae": _vae(),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": None if refiner else tokenizer,
        "tokenizer_2": clip_tokenizer(),
        "unet": unet,
        "scheduler": _scheduler(),
        "add_watermarker": False,
    }
    # 3. The pipeline, with the flags each checkpoint's model_index.json holds.
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            **parts, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
        )
    elif variant == "inpaint":
        pipe = StableDiffusionXLInpaintPipeline(
            **parts, requires_aesthetics_score=False, force_zeros_for_empty_prompt=True
        )
    else:
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    out = pathlib.Path(path)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


TINY_SDXL_VAE = "tiny-sdxl-vae-fp16-fix"


def write_tiny_sdxl_vae(path: str | os.PathLike) -> pathlib.Path:
    """Write a tiny stand-in for an fp16-fixed SDXL VAE (madebyollin/sdxl-vae-fp16-fix's layout:
    an AutoencoderKL folder, config.json and safetensors): the tiny SDXL's VAE shape with other
    weights, so that an image decoded by it differs, and `force_upcast: false`, as the fix says."""
    import torch

    torch.manual_seed(7)
    out = pathlib.Path(path)
    _vae(force_upcast=False).save_pretrained(out, safe_serialization=True)
    return out
