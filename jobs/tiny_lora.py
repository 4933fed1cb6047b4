"""Tiny, random LoRA adapters for the tiny pipelines (`jobs/tiny.py`, `jobs/tiny_flux.py`): the
real `save_lora_weights` file a trainer writes (peft's lora_A/lora_B pairs under `unet.` or
`transformer.`, safetensors, with diffusers' adapter metadata), small enough to load in a test.

lora_B is drawn at random (peft's own init leaves it zero, which would change nothing), from a
fixed seed, so one file always makes the same images and visibly different ones from the base.
"""

from __future__ import annotations

import json
import os
import pathlib

# The attention projections every family's denoiser names alike: what trainers target by default.
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' own name for a saved LoRA
RANK = 4


def write_tiny_lora(
    pipeline: str | os.PathLike, path: str | os.PathLike, seed: int = 0, scale: float = 0.2
) -> pathlib.Path:
    """A LoRA for the tiny pipeline at `pipeline` (its UNet or transformer), saved as
    `path/pytorch_lora_weights.safetensors`; returns that file. `scale`: the spread of the random
    weights: the tiny model's images change by tens of levels, yet a live (unfused) LoRA still
    matches plain diffusers within 1/255 (at 0.5 the tiny UNet amplifies float noise past that)."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # 1. The pipeline's denoiser alone, as its model_index.json names the pipeline class.
    pipeline = pathlib.Path(pipeline)
    cls = getattr(diffusers, diffusers.DiffusionPipeline.load_config(str(pipeline))["_class_name"])
    denoiser_name = "unet" if (pipeline / "unet").is_dir() else "transformer"
    config = json.loads((pipeline / denoiser_name / "config.json").read_text())
    denoiser = getattr(diffusers, config["_class_name"]).from_pretrained(
        str(pipeline / denoiser_name), use_safetensors=True
    )
    # 2. The adapter, its weights drawn from the seed (lora_B too).
    torch.manual_seed(seed)
    denoiser.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGET_MODULES, init_lora_weights=False)
    )
    state = get_peft_model_state_dict(denoiser)
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) * scale for k, v in state.items()}
    # 3. Saved as a trainer saves it: the pipeline class's own writer, safetensors.
    out = pathlib.Path(path)
    cls.save_lora_weights(
        str(out),
        **{f"{denoiser_name}_lora_layers": state},
        weight_name=LORA_FILE,
        safe_serialization=True,
    )
    return out / LORA_FILE
