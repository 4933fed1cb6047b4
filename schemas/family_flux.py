"""FLUX.1 (black-forest-labs/FLUX.1-dev and FLUX.1-schnell) as a row of the family table.

Checked in diffusers 0.42.1 (pipelines/flux/pipeline_flux.py and its img2img and inpaint twins):
- Classes: FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline (on the base checkpoint), and
  FluxFillPipeline, which runs FLUX.1-Fill-dev's own checkpoint and nothing else (pipeline_flux_fill.py):
  its transformer reads the noisy latents, the masked image's latents and the mask (8x8 pixels
  per latent pixel folded into channels), each packed 2x2, concatenated channel-wise; so its
  in_channels is 2 x out_channels + 256 (FLUX.1-Fill-dev: 384 = 64 + 64 + 256). It takes
  `strength` (default 1.0), but no negative prompt and no true_cfg_scale; its defaults are 50
  steps, guidance_scale 30 and max_sequence_length 512.
- Text: `tokenizer`/`text_encoder` CLIP ViT-L, of which only the pooled embedding is used, at
  `tokenizer.model_max_length` (77); `tokenizer_2`/`text_encoder_2` T5-XXL, whose hidden states
  are the transformer's text tokens, at the call's `max_sequence_length` (at most 512).
- Guidance: `guidance_scale` is an input of the transformer, embedded where its config says
  `guidance_embeds` (dev), ignored where not (schnell); no unconditional pass. A second, negative
  pass per step runs only with `true_cfg_scale > 1` and a negative prompt.
- Size: latents are packed 2x2, so width and height are multiples of vae_scale_factor * 2 = 16;
  the size made where none is given is `default_sample_size` (128) x vae_scale_factor (8) = 1024.
- Schedule: FlowMatchEulerDiscreteScheduler; each call computes `mu` from the image's token count
  (width/16 x height/16) and the scheduler config's base/max_image_seq_len and base/max_shift,
  which a scheduler with `use_dynamic_shifting` (dev's; not schnell's) shifts its sigmas by.

The published checkpoints (black-forest-labs/flux, src/flux/util.py configs "flux-dev" and
"flux-schnell"; their diffusers folders' transformer/config.json): the same 12B transformer,
19 double and 38 single blocks, `guidance_embed`/`guidance_embeds` true for dev and false for
schnell; T5 `max_length` 512 for dev and 256 for schnell. The diffusers FLUX docs: schnell's
`max_sequence_length` cannot be more than 256 and its guidance_scale is 0; dev runs 28 steps at
guidance 3.5 (FluxPipeline's defaults), schnell about 4 steps. bfloat16 is what both model cards
and the diffusers docs load; in float16 the transformer's activations overflow (inf/NaN images).
"""

from __future__ import annotations

from sdfleet.schemas.families import CLIP_TOKENS, Family, TextEncoder, Variant, register
from sdfleet.schemas.family_flops import FLUX1_DEV_FLOPS, FLUX1_FILL_FLOPS, FLUX1_SCHNELL_FLOPS

T5_TOKENS = 512  # what FluxPipeline lets max_sequence_length be at most
# The packed mask's channels a Fill transformer reads besides the two latents: the VAE's 8 x 8
# pixels per latent pixel, packed 2x2 (FluxFillPipeline.prepare_mask_latents).
FILL_MASK_CHANNELS = 8 * 8 * 4


def _reads_a_mask(config) -> bool:
    """A Fill transformer: its input is its output's latents twice (noisy, masked image) plus the
    packed mask. Read from the channel layout rather than the value 384, so that a Fill
    checkpoint of another width (sdfleet's tiny one: 288 = 16 + 16 + 256) is one too, and a
    control checkpoint (FLUX.1-Depth/Canny: 128 = 64 + 64, FluxControlPipeline) is not."""
    inputs = config.get("in_channels")
    outputs = config.get("out_channels") or inputs  # null: the same as in_channels (dev's)
    return isinstance(inputs, int) and inputs == 2 * outputs + FILL_MASK_CHANNELS


# First: a Fill transformer embeds guidance too, so dev's match alone would take it.
FLUX1_FILL = Variant(
    name="FLUX.1-Fill-dev",
    match={},
    rule=_reads_a_mask,
    flops=FLUX1_FILL_FLOPS,
    max_sequence_length=512,
    max_sequence_limit=512,
    num_inference_steps=50,
    guidance_scale=30.0,
    pipelines={"inpaint": "FluxFillPipeline"},
    negative_prompt=False,
)
FLUX1_DEV = Variant(
    name="FLUX.1-dev",
    match={"guidance_embeds": True},
    flops=FLUX1_DEV_FLOPS,
    max_sequence_length=512,
    max_sequence_limit=512,
    num_inference_steps=28,
    guidance_scale=3.5,
)
FLUX1_SCHNELL = Variant(
    name="FLUX.1-schnell",
    match={"guidance_embeds": False},
    flops=FLUX1_SCHNELL_FLOPS,
    max_sequence_length=256,
    max_sequence_limit=256,
    guidance=False,
    num_inference_steps=4,
    guidance_scale=0.0,
)

FLUX = Family(
    name="flux",
    pipelines={
        "text-to-image": "FluxPipeline",
        "image-to-image": "FluxImg2ImgPipeline",
        "inpaint": "FluxInpaintPipeline",
    },
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", CLIP_TOKENS, pooled=True),  # CLIP ViT-L
        TextEncoder("text_encoder_2", "tokenizer_2", T5_TOKENS, sequence=True),  # T5-XXL
    ),
    negative_prompt=True,  # read only with true_cfg_scale > 1
    cfg=False,  # guidance-distilled: guidance_scale is an input embedding
    dtype="bfloat16",
    latent_grid=16,
    denoiser="transformer",
    fallback_size=1024,
    flops=FLUX1_DEV_FLOPS,
    variants=(FLUX1_FILL, FLUX1_DEV, FLUX1_SCHNELL),
    default_sample_size=128,
    input_size_keywords=True,
    fuse_transformer_qkv=True,
    true_cfg=True,
    refused_dtypes={
        "float16": "FLUX.1's activations overflow float16 (inf/NaN, black images); use "
        "model.dtype: bfloat16, the dtype it was trained and is published in"
    },
    scheduler_prefix="FlowMatch",
    dynamic_shift=True,
)

register(FLUX)
