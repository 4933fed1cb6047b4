"""The model family table (sdfleet.schemas.families): its SD2 row holds today's figures exactly,
and the rules read from it (FLOPs, native size, latent grid) give what they gave before."""

from __future__ import annotations

import itertools

import pytest

from sdfleet.schemas.families import (
    DEFAULT_FAMILY,
    FAMILIES,
    SD2,
    family_of,
    vae_scale_factor,
)
from sdfleet.schemas.tasks import TASK_NAMES


def test_sd2_has_a_pipeline_class_for_every_task_and_is_found_by_each():
    assert set(SD2.pipelines) == set(TASK_NAMES)
    assert SD2.pipeline("text-to-image") == "StableDiffusionPipeline"
    assert SD2.pipeline("upscale") == "StableDiffusionUpscalePipeline"
    for cls in SD2.pipelines.values():
        assert family_of(cls) is SD2
    assert family_of("FluxPipeline") is None and family_of(None) is None
    assert DEFAULT_FAMILY is SD2 and FAMILIES == {"sd2": SD2}


def test_every_pipeline_class_belongs_to_one_family():
    classes = [cls for family in FAMILIES.values() for cls in family.pipelines.values()]
    assert len(classes) == len(set(classes))


def test_sd2_row():
    assert SD2.max_tokens == 77 and SD2.text_encoders[0].component == "text_encoder"
    assert SD2.negative_prompt and SD2.cfg and SD2.dtype == "float16"
    assert SD2.latent_grid == 8 and SD2.fallback_size == 512


def test_flops_are_the_figures_sdfleet_plan_has_always_used():
    """One UNet forward with CFG 1.609 TFLOP, a VAE decode 2.51, the text encoder 0.09, at 512²,
    scaled by pixels; without CFG (guidance <= 1) the UNet's half. Bit for bit the old sum."""
    for w, h, steps, guidance in itertools.product(
        (64, 512, 768, 1000, 2048), (64, 512, 768), (1, 25, 50, 999), (0.0, 1.0, 1.5, 7.5)
    ):
        pixels = w * h / 512**2
        cfg = 1.0 if guidance > 1 else 0.5
        old = 1.609 * cfg * steps * pixels + 2.51 * pixels + 0.09
        assert SD2.tflop_per_image(w, h, steps, guidance) == old
    # bench/gpu's figure: 83 TFLOP per image at 50 steps, 512².
    assert round(SD2.tflop_per_image(512, 512, 50, 7.5), 2) == 83.05


def test_denoiser_passes_follow_cfg():
    assert SD2.denoiser_passes(7.5) == 2 and SD2.denoiser_passes(1.0) == 1


def test_native_size_is_sample_size_times_the_vae_scale():
    assert vae_scale_factor({"block_out_channels": [128, 256, 512, 512]}) == 8
    assert vae_scale_factor({}) == 8
    assert SD2.native_size(64, 8) == 512 and SD2.native_size(96, 8) == 768
    assert SD2.native_size(None, 8) is None and SD2.native_size(0, 8) is None


def test_sizes_must_be_on_the_latent_grid():
    assert SD2.check_size("width", 512) == 512
    with pytest.raises(ValueError, match=r"width=100 is not divisible by 8; use e.g. 96 or 104"):
        SD2.check_size("width", 100)
    with pytest.raises(ValueError, match=r"height=4 is not divisible by 8; use e.g. 8 or 8"):
        SD2.check_size("height", 4)
