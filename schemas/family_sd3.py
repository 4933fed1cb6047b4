"""Stable Diffusion 3.5 (Medium and Large) as a row of the family table: a rectified-flow MMDiT
(`SD3Transformer2DModel`) read by three text encoders, denoised by `FlowMatchEulerDiscreteScheduler`
with the checkpoint's `shift`.

Checked in diffusers 0.42.1's pipelines/stable_diffusion_3/: StableDiffusion3Pipeline,
...Img2ImgPipeline and ...InpaintPipeline (no depth or upscale class); the native size is
transformer.config.sample_size (128) x the VAE's scale (8) = 1024, and the latent grid is that
scale x the transformer's patch_size (2) = 16 px; CLIP-L (text_encoder) and CLIP-G
(text_encoder_2) are CLIPTextModelWithProjection, pooled, 77 tokens each; T5-XXL (text_encoder_3)
reads `max_sequence_length` tokens (256 by default, at most 512: `check_inputs` refuses more), and
with `text_encoder_3=None` the pipeline passes zeros of that length in its place. Only the
text-to-image pipeline takes skip-layer guidance (`skip_guidance_layers` and its scale, start and
stop).

Public configs (huggingface.co/stabilityai/stable-diffusion-3.5-medium and -large, transformer/
config.json): Medium num_layers 24, num_attention_heads 24, dual_attention_layers 0-12, qk_norm
rms_norm, patch_size 2, sample_size 128; Large num_layers 38, num_attention_heads 38, qk_norm
rms_norm, patch_size 2, sample_size 128. Both: scheduler/scheduler_config.json
FlowMatchEulerDiscreteScheduler with shift 3.0; vae/config.json latent_channels 16,
scaling_factor 1.5305, shift_factor 0.0609. The model card of Medium recommends skip-layer
guidance on layers 7, 8 and 9 (diffusers' docstring repeats it, with scale 2.8, start 0.01,
stop 0.2, its defaults).

dtype: bfloat16, as diffusers' SD3.5 docs and Stability's cards load it (the weights were published
in it). T5 v1.1 XXL's activations overflow float16's range; transformers 5.25's T5 (checked in
modeling_t5.py) copes by keeping the feed-forward output projection `wo` in float32
(`_keep_in_fp32_modules`) and clamping infinite float16 activations to the largest finite value.
So a float16 SD3 job runs without NaNs, but its T5 embeddings are clamped where bfloat16's are
not; model.drop_t5 leaves T5 out altogether.
"""

from __future__ import annotations

from sdfleet.schemas.families import CLIP_TOKENS, Family, TextEncoder, Variant, register
from sdfleet.schemas.family_flops import SD35_LARGE_FLOPS, SD35_MEDIUM_FLOPS

# What T5 reads where the spec names no generation.max_sequence_length (diffusers' default), and
# the most StableDiffusion3Pipeline.check_inputs accepts.
T5_DEFAULT_TOKENS = 256
T5_MAX_TOKENS = 512

# Skip-layer guidance's scale, start and stop where a job sets skip_guidance_layers alone:
# StableDiffusion3Pipeline's defaults (Stability's recommendation for SD3.5 Medium).
SKIP_LAYER_GUIDANCE_DEFAULTS = {
    "skip_layer_guidance_scale": 2.8,
    "skip_layer_guidance_start": 0.01,
    "skip_layer_guidance_stop": 0.2,
}

SD35_MEDIUM = Variant(
    name="sd3.5-medium",
    match={"num_layers": 24},
    flops=SD35_MEDIUM_FLOPS,
    max_sequence_length=T5_DEFAULT_TOKENS,
    max_sequence_limit=T5_MAX_TOKENS,
    skip_guidance_layers=(7, 8, 9),
)
SD35_LARGE = Variant(
    name="sd3.5-large",
    match={"num_layers": 38},
    flops=SD35_LARGE_FLOPS,
    max_sequence_length=T5_DEFAULT_TOKENS,
    max_sequence_limit=T5_MAX_TOKENS,
)

SD3 = Family(
    name="sd3",
    pipelines={
        "text-to-image": "StableDiffusion3Pipeline",
        "image-to-image": "StableDiffusion3Img2ImgPipeline",
        "inpaint": "StableDiffusion3InpaintPipeline",
    },
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", CLIP_TOKENS, pooled=True),  # CLIP ViT-L
        TextEncoder("text_encoder_2", "tokenizer_2", CLIP_TOKENS, pooled=True),  # OpenCLIP bigG
        TextEncoder("text_encoder_3", "tokenizer_3", T5_MAX_TOKENS, sequence=True, droppable=True),
    ),
    negative_prompt=True,
    cfg=True,
    dtype="bfloat16",
    latent_grid=16,
    denoiser="transformer",
    fallback_size=1024,
    # A checkpoint of another size than Medium or Large is estimated as Medium.
    flops=SD35_MEDIUM_FLOPS,
    variants=(SD35_MEDIUM, SD35_LARGE),
    max_sequence_length=T5_DEFAULT_TOKENS,
    scheduler_prefix="FlowMatch",
    skip_layer_guidance=SKIP_LAYER_GUIDANCE_DEFAULTS,
    input_size_keywords=True,
)

register(SD3)
