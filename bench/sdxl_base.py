"""The SDXL-base 1.0 architecture with random weights (no download: same FLOPs), for bench/gpu.py.

The full-size configs are bench/flops.py's, each with its source cited there; this file only
assembles them into a `StableDiffusionXLPipeline` (UNet 2.57B, VAE 84M, CLIP ViT-L and OpenCLIP
bigG text towers) and writes it, as bench/sd2_base.py does for SD2-base.
"""

from __future__ import annotations

from pathlib import Path

from flops import CLIP_BIG_G, CLIP_L, SDXL_UNET, SDXL_VAE
from sd2_base import SCHEDULER  # SDXL-base ships the same Euler config as SD2-base


def models(tokenizer) -> dict:
    """The pipeline's models (and tokenizers) on the current default device (`torch.device("meta")` builds them
    without memory). The text encoders' vocabulary is the local tokenizer's: only the embedding
    tables differ from SDXL's, which a lookup, not a matmul, reads."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(config: dict) -> CLIPTextConfig:
        return CLIPTextConfig(
            **{**config, "vocab_size": len(tokenizer)},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    torch.manual_seed(0)
    return {
        "vae": AutoencoderKL(**SDXL_VAE),
        "text_encoder": CLIPTextModel(text_config(CLIP_L)),
        "text_encoder_2": CLIPTextModelWithProjection(text_config(CLIP_BIG_G)),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "unet": UNet2DConditionModel(**SDXL_UNET),
    }


def build_pipeline(path: str | Path) -> Path:
    """Write the full-size pipeline to `path` in float16 (safetensors), as the bench loads it on
    a GPU: half the disk and load time of float32. About 7 GB."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from sdfleet.jobs.tiny_clip import clip_tokenizer

    pipe = StableDiffusionXLPipeline(
        **models(clip_tokenizer()),
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        force_zeros_for_empty_prompt=True,  # as stable-diffusion-xl-base-1.0's model_index.json
        add_watermarker=False,
    )
    pipe.to(torch.float16).save_pretrained(path, safe_serialization=True)
    return Path(path)
