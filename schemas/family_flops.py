"""FLOPs per image of the T5 families' checkpoints at their native sizes (SD3.5 Medium and Large,
FLUX.1 dev and schnell), as `Flops` rows the family modules' variants reference.

# provisional: flops helper
Rounded figures until the counts on meta tensors land (the flops helper owns this module): one
transformer forward for one image at 1024², one VAE decode at 1024², the text encoders (T5-XXL at
256 tokens).
"""

from __future__ import annotations

from sdfleet.schemas.families import Flops

NATIVE_PIXELS = 1024 * 1024

# provisional: flops helper
SD35_MEDIUM_FLOPS = Flops(
    pixels=NATIVE_PIXELS, denoiser_tflop=22.0, vae_decode_tflop=10.5, text_tflop=1.5
)
# provisional: flops helper
SD35_LARGE_FLOPS = Flops(
    pixels=NATIVE_PIXELS, denoiser_tflop=71.0, vae_decode_tflop=10.5, text_tflop=1.5
)
# provisional: flops helper
# FLUX.1 dev and schnell share one 12B transformer (19 double + 38 single blocks): one forward at
# 1024x1024 (4096 image tokens + 512 text tokens); the 16-channel VAE's decode; CLIP-L and T5-XXL.
FLUX1_DEV_FLOPS = Flops(
    pixels=NATIVE_PIXELS, denoiser_tflop=110.0, vae_decode_tflop=10.5, text_tflop=1.5
)
FLUX1_SCHNELL_FLOPS = Flops(
    pixels=NATIVE_PIXELS, denoiser_tflop=110.0, vae_decode_tflop=10.5, text_tflop=1.5
)
