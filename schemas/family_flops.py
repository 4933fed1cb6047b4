"""FLOPs of the transformer families' variants (SD3.5 Medium and Large, FLUX.1 dev,
schnell and Fill), counted on meta tensors at each variant's native size and default T5 length by
bench/flops_dit.py, which also fits each part's polynomial in its tokens (`TokenFlops`).

Written by `python bench/flops.py --write` (then `ruff format`); `python bench/flops.py --check`
recounts and exits 1 where this file differs. The family rows' variants state these as their
`flops`.
"""

from sdfleet.schemas.flops import Flops, TokenCost, TokenFlops

VAE_DECODE = TokenCost(
    constant=0.0, image=0.000605618176, text=0.0, joint_pairs=0.0, image_pairs=2.048e-09
)
T5_XXL_ENCODER = TokenCost(
    constant=0.0, image=0.0, text=0.009261023232, joint_pairs=3.93216e-07, image_pairs=0.0
)

# sd3.5-medium: 2.243B transformer parameters. At 1024x1024 and T5 256 tokens:
# 11.2496 TFLOP per transformer forward, 915.5 per image at 40 steps x 2 pass(es).
SD35_MEDIUM_FLOPS = Flops(
    pixels=1024 * 1024,
    denoiser_tflop=11.2496,
    vae_decode_tflop=10.4722,
    text_tflop=2.5078,
    tokens=TokenFlops(
        denoiser=TokenCost(
            constant=0.001550057472,
            image=0.001604714496,
            text=0.00132907008,
            joint_pairs=1.47456e-07,
            image_pairs=7.9872e-08,
        ),
        vae_decode=VAE_DECODE,
        sequence_encoder=T5_XXL_ENCODER,
        clip_tflop=0.111162789888,
        clip_tokens=77,
        sequence_length=256,
    ),
)

# sd3.5-large: 8.057B transformer parameters. At 1024x1024 and T5 256 tokens:
# 31.1211 TFLOP per transformer forward, 1758.3 per image at 28 steps x 2 pass(es).
SD35_LARGE_FLOPS = Flops(
    pixels=1024 * 1024,
    denoiser_tflop=31.1211,
    vae_decode_tflop=10.4722,
    text_tflop=2.5078,
    tokens=TokenFlops(
        denoiser=TokenCost(
            constant=0.005405343744,
            image=0.00539475968,
            text=0.0053075968,
            joint_pairs=3.69664e-07,
            image_pairs=0.0,
        ),
        vae_decode=VAE_DECODE,
        sequence_encoder=T5_XXL_ENCODER,
        clip_tflop=0.111162789888,
        clip_tokens=77,
        sequence_length=256,
    ),
)

# flux1-dev: 11.901B transformer parameters. At 1024x1024 and T5 512 tokens:
# 74.3847 TFLOP per transformer forward, 3734.6 per image at 50 steps x 1 pass(es).
FLUX1_DEV_FLOPS = Flops(
    pixels=1024 * 1024,
    denoiser_tflop=74.3847,
    vae_decode_tflop=10.4722,
    text_tflop=4.858,
    tokens=TokenFlops(
        denoiser=TokenCost(
            constant=0.006557270016,
            image=0.012910854144,
            text=0.012935233536,
            joint_pairs=7.00416e-07,
            image_pairs=0.0,
        ),
        vae_decode=VAE_DECODE,
        sequence_encoder=T5_XXL_ENCODER,
        clip_tflop=0.01329850368,
        clip_tokens=0,
        sequence_length=512,
    ),
)

# flux1-schnell: 11.891B transformer parameters. At 1024x1024 and T5 256 tokens:
# 69.4666 TFLOP per transformer forward, 290.7 per image at 4 steps x 1 pass(es).
FLUX1_SCHNELL_FLOPS = Flops(
    pixels=1024 * 1024,
    denoiser_tflop=69.4666,
    vae_decode_tflop=10.4722,
    text_tflop=2.4099,
    tokens=TokenFlops(
        denoiser=TokenCost(
            constant=0.006536822784,
            image=0.012910854144,
            text=0.012935233536,
            joint_pairs=7.00416e-07,
            image_pairs=0.0,
        ),
        vae_decode=VAE_DECODE,
        sequence_encoder=T5_XXL_ENCODER,
        clip_tflop=0.01329850368,
        clip_tokens=0,
        sequence_length=256,
    ),
)

# flux1-fill: 11.902B transformer parameters. At 1024x1024 and T5 512 tokens:
# 74.3927 TFLOP per transformer forward, 3735.0 per image at 50 steps x 1 pass(es).
FLUX1_FILL_FLOPS = Flops(
    pixels=1024 * 1024,
    denoiser_tflop=74.3927,
    vae_decode_tflop=10.4722,
    text_tflop=4.858,
    tokens=TokenFlops(
        denoiser=TokenCost(
            constant=0.006557270016,
            image=0.012912820224,
            text=0.012935233536,
            joint_pairs=7.00416e-07,
            image_pairs=0.0,
        ),
        vae_decode=VAE_DECODE,
        sequence_encoder=T5_XXL_ENCODER,
        clip_tflop=0.01329850368,
        clip_tokens=0,
        sequence_length=512,
    ),
)
