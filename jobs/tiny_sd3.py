"""A tiny, random-weight SD3.5 pipeline written to disk, as `jobs/tiny_sdxl.py` does for SDXL: the
real `from_pretrained` path (safetensors, configs, three tokenizers) offline and in seconds.

It keeps what tells an SD3 checkpoint apart and shrinks the rest: an MMDiT (`SD3Transformer2DModel`,
2x2 patches, a dual-attention block and RMS q/k norm as SD3.5 Medium has) reading CLIP-L's and
CLIP-G's hidden states side by side, padded to T5's width and followed by T5's sequence; both CLIPs'
pooled projections; a 16-channel VAE with SD3's scaling and shift factors; and
FlowMatchEulerDiscreteScheduler with SD3.5's shift. Its two layers match neither Medium (24) nor
Large (38): the family's defaults apply. The same folder runs image-to-image and inpaint
(StableDiffusion3Img2ImgPipeline and ...InpaintPipeline load it).
"""

from __future__ import annotations

import os
import pathlib

from sdfleet.jobs.tiny_clip import clip_text_encoder, clip_tokenizer
from sdfleet.jobs.tiny_t5 import T5_HIDDEN, t5_encoder, t5_tokenizer

# Each CLIP's width: the two side by side fill T5's (SD3.5: 768 + 1280 = 2048, padded to 4096).
CLIP_HIDDEN = T5_HIDDEN // 2
SAMPLE_SIZE = 8  # latent pixels: 8 x the VAE's 8 = 64-pixel images
LAYERS = 2
SHIFT = 3.0  # SD3.5 Medium's and Large's scheduler_config.json
# SD3's VAE (vae/config.json of both): 16 latent channels, decoded as latents / scaling + shift.
VAE_SCALING, VAE_SHIFT = 1.5305, 0.0609


def _transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=SAMPLE_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=LAYERS,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN,
        caption_projection_dim=16,  # = heads x head dim, as SD3.5's 1536 = 24 x 64
        pooled_projection_dim=2 * CLIP_HIDDEN,
        pos_embed_max_size=32,  # up to 32 patches a side: 512-pixel images
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),  # four blocks: scale factor 8, as SD3's
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=VAE_SCALING,
        shift_factor=VAE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def write_tiny_sd3(path: str | os.PathLike) -> pathlib.Path:
    """Write the tiny SD3 pipeline to `path` (safetensors) and return it. Seeded before each
    component, so the weights are the same on every run."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    # 1. The text encoders: CLIP-L's and CLIP-G's places (both with projections, pooled; the
    #    locally made CLIP tokenizer says model_max_length=77), then T5.
    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = clip_text_encoder(tokenizer, CLIP_HIDDEN, projection=True)
    torch.manual_seed(1)
    text_encoder_2 = clip_text_encoder(tokenizer, CLIP_HIDDEN, projection=True)
    text_encoder_3 = t5_encoder(seed=2)
    # 2. The MMDiT and the VAE, then the pipeline as stabilityai's model_index.json lists it.
    torch.manual_seed(0)
    transformer = _transformer()
    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer(),
    )
    out = pathlib.Path(path)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
