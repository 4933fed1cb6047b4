"""FLOPs per image of the T5 families' checkpoints, at each variant's native size.

# provisional: flops helper
The flops helper owns these figures (counted on meta tensors, with the script in the repo); until
its branch merges they are round estimates of the published architectures at 1024x1024.
"""

from __future__ import annotations

from sdfleet.schemas.families import Flops

# FLUX.1 dev and schnell share one 12B transformer (19 double + 38 single blocks): one forward at
# 1024x1024 (4096 image tokens + 512 text tokens) about 110 TFLOP; the 16-channel VAE's decode
# about 10.5; CLIP-L and T5-XXL about 1.5 at 256 tokens.
FLUX1_DEV_FLOPS = Flops(
    pixels=1024 * 1024, denoiser_tflop=110.0, vae_decode_tflop=10.5, text_tflop=1.5
)
FLUX1_SCHNELL_FLOPS = Flops(
    pixels=1024 * 1024, denoiser_tflop=110.0, vae_decode_tflop=10.5, text_tflop=1.5
)
