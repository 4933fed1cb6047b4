"""The SD3.5 (Medium, Large) and FLUX.1 (dev, schnell) architectures with random weights (no
download: same FLOPs), for bench/gpu.py. The full-size configs are bench/flops_dit.py's, each with
its source cited there; this file assembles them into a `StableDiffusion3Pipeline` or a
`FluxPipeline` and writes it, as bench/sdxl_base.py does for SDXL.

The tokenizers are the local ones (sdfleet.jobs.tiny's CLIP, sdfleet.jobs.tiny_t5's T5): only
the encoders' embedding tables differ from the published ones, which a lookup, not a matmul,
reads.
"""

from __future__ import annotations

from pathlib import Path

from flops import CLIP_BIG_G, CLIP_L
from flops_dit import (
    FLUX1_DEV,
    FLUX1_SCHNELL,
    FLUX_VAE,
    SD3_VAE,
    SD35_LARGE,
    SD35_MEDIUM,
    T5_XXL,
)

TRANSFORMERS = {
    ("sd3", "medium"): SD35_MEDIUM,
    ("sd3", "large"): SD35_LARGE,
    ("flux", "dev"): FLUX1_DEV,
    ("flux", "schnell"): FLUX1_SCHNELL,
}
# scheduler/scheduler_config.json of each (FlowMatchEulerDiscreteScheduler): SD3.5's fixed shift;
# FLUX.1-dev's shift by the image's token count; schnell's none (shift 1, no dynamic shifting).
SCHEDULERS = {
    ("sd3", "medium"): {"shift": 3.0},
    ("sd3", "large"): {"shift": 3.0},
    ("flux", "dev"): {
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    ("flux", "schnell"): {"shift": 1.0, "use_dynamic_shifting": False},
}


def models(family: str, variant: str, clip_tokenizer, t5_tokenizer) -> dict:
    """The pipeline's models and tokenizers on the current default device and dtype
    (`torch.device("meta")` builds them without memory)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    def clip(config: dict) -> CLIPTextConfig:
        return CLIPTextConfig(
            **{**config, "vocab_size": len(clip_tokenizer)},
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )

    t5 = T5EncoderModel(T5Config(**{**T5_XXL, "vocab_size": len(t5_tokenizer)}))
    torch.manual_seed(0)
    config = TRANSFORMERS[(family, variant)]
    if family == "sd3":
        return {
            "transformer": SD3Transformer2DModel(**config),
            "vae": AutoencoderKL(**SD3_VAE),
            "text_encoder": CLIPTextModelWithProjection(clip(CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(clip(CLIP_BIG_G)),
            "text_encoder_3": t5,
            "tokenizer": clip_tokenizer,
            "tokenizer_2": clip_tokenizer,
            "tokenizer_3": t5_tokenizer,
        }
    return {
        "transformer": FluxTransformer2DModel(**config),
        "vae": AutoencoderKL(**FLUX_VAE),
        "text_encoder": CLIPTextModel(clip(CLIP_L)),
        "text_encoder_2": t5,
        "tokenizer": clip_tokenizer,
        "tokenizer_2": t5_tokenizer,
    }


def build_pipeline(path: str | Path, family: str, variant: str) -> Path:
    """Write the full-size pipeline to `path` in bfloat16 (safetensors), as diffusers' docs run
    both families. Built in bfloat16 on the GPU where there is one: FLUX.1's 12B transformer
    would take 48 GB of float32 first. About 33 GB for FLUX.1, 25 GB for SD3.5 Large."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from sdfleet.jobs.tiny_clip import clip_tokenizer
    from sdfleet.jobs.tiny_t5 import t5_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            parts = models(family, variant, clip_tokenizer(), t5_tokenizer())
    finally:
        torch.set_default_dtype(default)
    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[(family, variant)])
    pipe = cls(**parts, scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
