"""The model family table (sdfleet.schemas.families): its SD2 row holds today's figures exactly,
and the rules read from it (FLOPs, native size, latent grid) give what they gave before."""

from __future__ import annotations

import itertools

import pytest

from sdfleet.schemas.families import (
    DEFAULT_FAMILY,
    FAMILIES,
    SD2,
    SDXL,
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
    assert family_of("KandinskyV22Pipeline") is None and family_of(None) is None
    assert DEFAULT_FAMILY is SD2 and FAMILIES["sd2"] is SD2


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
    with pytest.raises(
        ValueError,
        match=r"width=100 is not divisible by 8, the latent grid of sd2 checkpoints; "
        r"use e.g. 96 or 104",
    ):
        SD2.check_size("width", 100)
    with pytest.raises(ValueError, match=r"height=4 is not divisible by 8, .* use e.g. 8 or 8"):
        SD2.check_size("height", 4)


def test_sdxl_row():
    """SDXL 1.0: three task classes, two CLIPs of 77 tokens (the second pooled), CFG, float16 with
    the VAE decoding in float32, size micro-conditioning, native 128 x 8 = 1024."""
    assert FAMILIES["sd2"] is SD2 and FAMILIES["sdxl"] is SDXL
    assert SDXL.pipeline("text-to-image") == "StableDiffusionXLPipeline"
    assert SDXL.pipeline("image-to-image") == "StableDiffusionXLImg2ImgPipeline"
    assert SDXL.pipeline("inpaint") == "StableDiffusionXLInpaintPipeline"
    assert set(SDXL.pipelines) < set(TASK_NAMES) and "upscale" not in SDXL.pipelines
    for cls in SDXL.pipelines.values():
        assert family_of(cls) is SDXL
    first, second = SDXL.text_encoders
    assert (first.component, first.tokenizer, first.max_tokens, first.pooled) == (
        "text_encoder",
        "tokenizer",
        77,
        False,
    )
    assert (second.component, second.tokenizer, second.max_tokens, second.pooled) == (
        "text_encoder_2",
        "tokenizer_2",
        77,
        True,
    )
    assert SDXL.negative_prompt and SDXL.cfg and SDXL.dtype == "float16" and SDXL.vae_upcast
    assert SDXL.latent_grid == 8 and SDXL.fallback_size == 1024
    assert SDXL.native_size(128, 8) == 1024
    assert SDXL.size_conditioning_defaults(1024, 768) == {
        "original_size": (768, 1024),
        "crops_coords_top_left": (0, 0),
        "target_size": (768, 1024),
    }
    with pytest.raises(
        ValueError, match="width=1020 is not divisible by 8, the latent grid of sdxl"
    ):
        SDXL.check_size("width", 1020)


def test_sd2_keeps_its_habits_under_the_new_fields():
    assert not SD2.size_conditioning and SD2.size_conditioning_defaults(512, 512) == {}
    assert not SD2.vae_upcast and SD2.refiner_flops is None
    assert not any(encoder.pooled for encoder in SD2.text_encoders)


def test_sdxl_flops_per_image():
    """bench/flops.py's counts at 1024²: UNet 6.7612 per forward, VAE decode 10.4704, both text
    encoders 0.2223; the refiner's UNet 7.2860 and text_encoder_2 0.1957."""
    cfg_50 = 6.7612 * 2 * 50 + 10.4704 + 0.2223
    assert SDXL.tflop_per_image(1024, 1024, 50, 5.0) == pytest.approx(cfg_50)
    assert SDXL.tflop_per_image(512, 512, 50, 1.0) == pytest.approx(
        (6.7612 * 50 + 10.4704) / 4 + 0.2223
    )
    refiner = SDXL.refiner_flops
    assert (refiner.denoiser_tflop, refiner.text_tflop) == (7.2860, 0.1957)


def test_a_task_without_a_pipeline_is_refused_naming_the_family():
    from sdfleet.schemas.errors import SpecError

    SDXL.check_task("inpaint", "x")
    SD2.check_task("upscale", "x")
    with pytest.raises(SpecError, match=r"model.task=upscale: .* sdxl has no pipeline for upscale"):
        SDXL.check_task("upscale", "x")


def test_a_family_adds_its_own_output_columns_and_sd2_none():
    """SD2's output schema is the one it always was; SDXL's adds the second encoder's token count
    and truncation flag and the six micro-conditioning inputs the call passes."""
    from sdfleet.schemas.rows import (
        SIZE_CONDITIONING_COLUMNS,
        VAE_DECODE_DTYPE,
        family_fields,
        output_schema,
    )

    assert family_fields(SD2) == [] and output_schema(None, SD2).equals(output_schema())
    assert SD2.size_conditioning_inputs(512, 512) == {}
    names = [f.name for f in family_fields(SDXL)]
    assert names == [
        "prompt_tokens_2",
        "prompt_truncated_2",
        *SIZE_CONDITIONING_COLUMNS,
        "conditioning_aesthetic_score",
        "conditioning_negative_aesthetic_score",
        VAE_DECODE_DTYPE,
    ]
    assert set(SDXL.size_conditioning_inputs(64, 48)) == set(SIZE_CONDITIONING_COLUMNS)
    assert SDXL.size_conditioning_inputs(64, 48)["negative_original_size"] == (48, 64)
    schema = output_schema(None, SDXL)
    assert schema.names[: len(output_schema().names)] == output_schema().names


def test_a_variant_is_picked_by_its_denoisers_config():
    from dataclasses import replace

    from sdfleet.schemas.families import SD2, Variant
    from sdfleet.schemas.flops import Flops

    small = Flops(pixels=64, denoiser_tflop=1.0, vae_decode_tflop=0.0, text_tflop=0.0)
    medium = Variant("medium", {"num_layers": 24}, small)
    large = Variant("large", {"num_layers": 38}, replace(small, denoiser_tflop=2.0))
    family = replace(SD2, variants=(medium, large))
    assert family.variant({"num_layers": 38, "other": 1}) is large
    assert family.variant({"num_layers": 24}) is medium
    assert family.variant({"num_layers": 12}) is None
    assert SD2.variant({"num_layers": 24}) is None


@pytest.mark.parametrize("module", ["family_flux", "family_sd3", "family_flops", "family_spec"])
def test_a_family_module_imported_first_finds_every_row(module):
    """The T5 families' rows live in modules of their own that build on families.py and register
    themselves: whichever is imported first in a fresh interpreter, FAMILIES holds them all."""
    import subprocess
    import sys

    code = (
        f"import sdfleet.schemas.{module}\n"
        "from sdfleet.schemas.families import FAMILIES, family_of\n"
        "print(sorted(FAMILIES), family_of('FluxPipeline').name,"
        " family_of('StableDiffusion3Pipeline').name)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['flux',", "'sd2',", "'sd3',", "'sdxl']", "flux", "sd3"]
