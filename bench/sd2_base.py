"""The SD2-base architecture as configs, built with random weights (no download: same FLOPs).

`build_pipeline(path, width=1.0)` writes a diffusers pipeline whose UNet, VAE and text encoder have
SD2-base's shapes with every channel count multiplied by `width` (1.0 = full size: UNet 866M,
VAE 84M, text encoder 340M parameters). The benchmarks build what they measure from this file.
"""

from __future__ import annotations

from pathlib import Path

UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
)
VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    in_channels=3,
    out_channels=3,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
TEXT = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)


def _scaled(channels, width: float, multiple: int = 32):
    return tuple(max(multiple, round(c * width / multiple) * multiple) for c in channels)


def build_pipeline(path: str | Path, width: float = 1.0, text_layers: int | None = None) -> Path:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdfleet.jobs.tiny_clip import clip_tokenizer

    tokenizer = (
        clip_tokenizer()
    )  # a local CLIP BPE; only the embedding table differs from SD2's (FLOPs are the same)
    hidden = max(64, int(TEXT["hidden_size"] * width) // 64 * 64)
    torch.manual_seed(0)
    heads = tuple(max(1, round(h * width)) for h in UNET["attention_head_dim"])
    unet = UNet2DConditionModel(
        **{
            **UNET,
            "block_out_channels": _scaled(UNET["block_out_channels"], width),
            "attention_head_dim": heads,
            "cross_attention_dim": hidden,
        }
    )
    vae = AutoencoderKL(**{**VAE, "block_out_channels": _scaled(VAE["block_out_channels"], width)})
    text = CLIPTextModel(
        CLIPTextConfig(
            **{
                **TEXT,
                "hidden_size": hidden,
                "intermediate_size": hidden * 4,
                "num_attention_heads": max(1, hidden // 64),
                "num_hidden_layers": text_layers or TEXT["num_hidden_layers"],
            },
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
