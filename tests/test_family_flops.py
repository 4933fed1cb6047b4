"""The transformer families' FLOPs (schemas/family_flops.py): polynomials in their tokens, solved
from meta-tensor counts by bench/flops_dit.py. Here the method is checked on tiny transformers
(fast) and the table for its own consistency; the full-size recount is test_flops.py's (slow)."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

from flops_dit import (
    DIT_MODELS,
    DitCount,
    build_transformer,
    fit_transformer,
    fit_vae,
    render,
    solve,
    transformer_flops,
)
from sdfleet.schemas import family_flops
from sdfleet.schemas.flops import Flops, TokenCost

VARIANTS = {
    "sd3.5-medium": family_flops.SD35_MEDIUM_FLOPS,
    "sd3.5-large": family_flops.SD35_LARGE_FLOPS,
    "flux1-dev": family_flops.FLUX1_DEV_FLOPS,
    "flux1-schnell": family_flops.FLUX1_SCHNELL_FLOPS,
    "flux1-fill": family_flops.FLUX1_FILL_FLOPS,
}
TINY_SD3 = dict(
    DIT_MODELS[0].transformer,
    num_layers=3,
    num_attention_heads=2,
    attention_head_dim=8,
    caption_projection_dim=16,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    dual_attention_layers=[0],
)
TINY_FLUX = dict(
    DIT_MODELS[2].transformer,
    num_layers=1,
    num_single_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=[4, 6, 6],
)


def test_an_integer_system_is_solved_exactly_across_magnitudes():
    # 3 + 7n + 5n^2 at n = 10, 1000, 10^7: the quadratic term dwarfs the others by 10^13.
    sizes = (10, 1000, 10**7)
    values = [3 + 7 * n + 5 * n * n for n in sizes]
    assert solve([[1, n, n * n] for n in sizes], values) == [3.0, 7.0, 5.0]


@pytest.mark.parametrize(
    "base, tiny",
    [
        (DIT_MODELS[0], TINY_SD3),
        (DIT_MODELS[2], TINY_FLUX),
        (DIT_MODELS[3], dict(TINY_FLUX, guidance_embeds=False)),
    ],
)
def test_a_transformers_polynomial_meets_a_count_at_a_size_and_length_it_was_not_fitted_at(
    base, tiny
):
    import torch

    model = replace(base, transformer=tiny)
    with torch.device("meta"):
        transformer = build_transformer(model)
    cost = fit_transformer(model, transformer)
    assert cost.joint_pairs > 0 and cost.image > 0 and cost.text > 0
    # Image-only attention where, and only where, the config has dual-attention layers.
    assert (cost.image_pairs > 0) == bool(tiny.get("dual_attention_layers"))
    for grid, text in ((80, 40), (20, model.clip_tokens + 600)):
        counted = transformer_flops(model, transformer, grid, text) / 1e12
        assert cost.tflop(grid * grid, text) == pytest.approx(counted, rel=1e-9)


def test_the_vae_decodes_cost_is_quadratic_in_latent_pixels_from_its_attention():
    from flops_dit import SD3_VAE, vae_decode_flops

    tiny = dict(SD3_VAE, block_out_channels=(8, 16, 32, 32), norm_num_groups=4)
    cost = fit_vae(tiny)
    assert cost.image_pairs > 0
    assert cost.tflop(48 * 48) == pytest.approx(vae_decode_flops(tiny, 48) / 1e12, rel=1e-9)


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variants_stated_figures_are_its_polynomials_at_its_native_size(name):
    flops = VARIANTS[name]
    assert flops.tokens is not None and flops.pixels == 1024 * 1024
    assert flops.stated_by_tokens() == []
    wrong = replace(flops, denoiser_tflop=flops.denoiser_tflop * 1.01)
    assert wrong.stated_by_tokens() and "denoiser" in wrong.stated_by_tokens()[0]


def test_attention_makes_a_transformers_image_cost_more_than_linear_in_pixels():
    flux = family_flops.FLUX1_DEV_FLOPS
    one = flux.tflop_per_image(1024, 1024, 1, 1) - flux.tflop_per_image(1024, 1024, 0, 1)
    four = flux.tflop_per_image(2048, 2048, 1, 1) - flux.tflop_per_image(2048, 2048, 0, 1)
    assert four > 4.1 * one  # a linear-in-pixels model would say 4x
    assert one == pytest.approx(flux.denoiser_tflop, rel=5e-4)
    # A UNet family's Flops (no tokens) still scale with pixels, as before.
    unet = Flops(pixels=100, denoiser_tflop=1.0, vae_decode_tflop=2.0, text_tflop=0.5)
    assert unet.tflop_per_image(20, 20, 10, 2) == 1.0 * 2 * 10 * 4 + 2.0 * 4 + 0.5


def test_t5s_sequence_length_costs_in_the_encoder_and_in_the_denoisers_sequence():
    dev = family_flops.FLUX1_DEV_FLOPS
    assert dev.tokens.sequence_length == 512
    at_256 = dev.tflop_per_image(1024, 1024, 50, 1, sequence_length=256)
    at_512 = dev.tflop_per_image(1024, 1024, 50, 1)
    assert at_512 == dev.tflop_per_image(1024, 1024, 50, 1, sequence_length=512) > at_256
    tokens = dev.tokens
    denoiser_gap = tokens.denoiser_tflop(1024 * 1024, 512) - tokens.denoiser_tflop(1024**2, 256)
    text_gap = tokens.text_tflop(512) - tokens.text_tflop(256)
    assert at_512 - at_256 == pytest.approx(50 * denoiser_gap + text_gap)
    # Each pass encodes its own prompt (CFG's second is the negative one).
    two = dev.tflop_per_image(1024, 1024, 50, 2)
    assert two - at_512 == pytest.approx(50 * dev.denoiser_tflop + dev.text_tflop, rel=5e-4)


def test_a_token_cost_is_its_polynomial():
    cost = TokenCost(constant=1, image=2, text=3, joint_pairs=4, image_pairs=5)
    assert cost.tflop(10, 5) == 1 + 20 + 15 + 4 * 225 + 5 * 100


def test_every_variant_in_the_family_table_states_a_counted_figure_at_its_default_t5_length():
    """The SD3.5 and FLUX.1 rows' variants cost what was counted, at the T5 length a job that
    names none reads (else plan would cost 256 tokens where the call reads 512)."""
    from sdfleet.schemas.families import FAMILIES

    for family in FAMILIES.values():
        for variant in family.variants:
            assert any(variant.flops is flops for flops in VARIANTS.values()), variant.name
            assert variant.flops.tokens.sequence_length == variant.max_sequence_length, variant.name


def test_the_written_table_states_the_counts_it_was_given():
    """`bench/flops.py --write`'s module, run, gives back each variant's Flops, with the parts
    every variant shares (the VAE, T5-XXL) named once."""
    counts = [DitCount(m, getattr(family_flops, m.constant).tokens, 0.0, 10**9) for m in DIT_MODELS]
    module = render(counts)
    assert module.count("VAE_DECODE = TokenCost(") == 1
    assert module.count("T5_XXL_ENCODER = TokenCost(") == 1
    written = {}
    exec("from sdfleet.schemas.flops import Flops, TokenCost, TokenFlops\n" + module, written)
    for m in DIT_MODELS:
        assert written[m.constant] == getattr(family_flops, m.constant), m.name
