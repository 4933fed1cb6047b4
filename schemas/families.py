"""What each model family is: its pipeline classes, text encoders, guidance, dtype, latent grid,
native size and FLOPs. The one owner of the family concept: the planner estimates cost from it,
the driver and the engine size images by it, bench/gpu reports MFU against it.

A family is a row, not a branch: SD2 and SDXL are rows of `FAMILIES` (SD3.5 and FLUX.1 will be
too, with their pipeline classes in `pipelines`), and nothing that reads a row asks which family
it is.

No torch, diffusers or pydantic here: `sdfleet plan` and bench/gpu (torch and diffusers only)
both import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sdfleet.schemas.errors import SpecError
from sdfleet.schemas.flops import Flops


@dataclass(frozen=True)
class TextEncoder:
    component: str  # the checkpoint's component (model_index.json key) holding the encoder
    tokenizer: str  # ... and the one holding its tokenizer
    max_tokens: int  # tokens it reads, start and end tokens included; the rest is truncated
    # Its pooled, projected embedding conditions the denoiser besides its hidden states (SDXL's
    # text_encoder_2, a CLIPTextModelWithProjection); else its hidden states alone do.
    pooled: bool = False
    # A T5 encoder (SD3.5's text_encoder_3, FLUX.1's text_encoder_2): it reads the job's
    # generation.max_sequence_length tokens (its variant's default where the spec names none), at
    # most max_tokens; a CLIP encoder always reads max_tokens.
    sequence: bool = False
    # model.drop_t5 may leave it out (SD3.5's T5: the pipeline passes zeros in its place).
    droppable: bool = False


@dataclass(frozen=True)
class Handover:
    """Base + refiner: the share of the schedule the base runs (its denoising_end, the refiner's
    denoising_start), and the refiner's own steps and guidance."""

    denoising_start: float
    refiner_steps: int
    guidance_scale: float

    def forwards(self, base_steps: int) -> tuple[int, int]:
        """The denoiser steps each side runs: diffusers cuts each evenly spaced schedule at the
        handover, so the base runs about `denoising_start` of its steps and the refiner the rest
        of its own (within one step: the cut falls between the schedule's timesteps)."""
        kept = round(self.refiner_steps * self.denoising_start)
        return round(base_steps * self.denoising_start), self.refiner_steps - kept


@dataclass(frozen=True)
class Variant:
    """A kind of checkpoint within a family that differs in cost or limits (SD3.5 Medium and
    Large; FLUX.1 dev and schnell), told apart by its denoiser's config.json: `match` holds the
    config values that identify it (e.g. {"num_layers": 24}). Families add the fields their
    variants differ in."""

    name: str
    match: Mapping[str, object]
    flops: Flops
    # The T5 tokens read where generation.max_sequence_length is not set, and the most it may be.
    max_sequence_length: int | None = None
    max_sequence_limit: int | None = None
    # False: the checkpoint takes no guidance at all (FLUX.1-schnell, timestep-distilled: its
    # transformer has no guidance embedding, and the pipeline ignores guidance_scale).
    guidance: bool = True
    # What a job that sets no generation.num_inference_steps or guidance_scale runs with (the
    # model card's); None: the spec's own default.
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    # Skip-layer guidance (diffusers' skip_guidance_layers): the denoiser layers the checkpoint's
    # makers recommend skipping (SD3.5 Medium: 7, 8, 9); empty: the variant has none, and a job
    # that asks for it is refused.
    skip_guidance_layers: tuple[int, ...] = ()
    # What tells the variant apart where no set of equal values can (FLUX.1 Fill: its
    # transformer's in_channels against its out_channels); None: `match` alone.
    rule: Callable[[Mapping], bool] | None = None
    # The tasks a checkpoint of the variant runs, and the class of each, in place of the family's
    # (FLUX.1 Fill's own checkpoint runs FluxFillPipeline and nothing else); None: the family's.
    pipelines: Mapping[str, str] | None = None
    # False: its pipeline takes no negative prompt, and so no true CFG (FluxFillPipeline).
    negative_prompt: bool = True

    def matches(self, denoiser_config: Mapping) -> bool:
        if self.rule is not None and not self.rule(denoiser_config):
            return False
        return all(denoiser_config.get(key) == value for key, value in self.match.items())


@dataclass(frozen=True)
class Family:
    name: str
    # The diffusers class model_index.json names for each task's checkpoint (`family_of` reads it).
    pipelines: Mapping[str, str]
    text_encoders: tuple[TextEncoder, ...]
    negative_prompt: bool  # the pipeline takes a negative prompt
    # Classifier-free guidance: a second, unconditional denoiser pass per step whenever
    # guidance_scale > 1 (a guidance-distilled family has none and passes guidance as an input).
    cfg: bool
    dtype: str  # the recommended model.dtype
    latent_grid: int  # width and height must be multiples of it (the VAE's downsampling)
    # The component whose config's sample_size gives the native latent size (SD2: the UNet).
    denoiser: str
    # The size made, probed and estimated where the checkpoint names none of its own.
    fallback_size: int
    flops: Flops
    # The denoiser is also conditioned on the image's sizes and crop (SDXL's micro-conditioning:
    # original_size, crops_coords_top_left, target_size, and their negative twins).
    size_conditioning: bool = False
    # The pipeline decodes in float32 where the VAE's config says force_upcast (SDXL's VAE
    # overflows in float16; an fp16-fixed VAE says false), so a float16 job decodes in float32.
    vae_upcast: bool = False
    # The family's refiner checkpoint, which continues the base's denoising (SDXL's): its
    # model_index.json class and its FLOPs; None: the family has none.
    refiner_pipeline: str | None = None
    refiner_flops: Flops | None = None
    # The aesthetic score and its negative a checkpoint of the family that says
    # requires_aesthetics_score is conditioned on (diffusers' defaults); None: no such checkpoint.
    aesthetic_score: tuple[float, float] | None = None
    # Checkpoint kinds that differ in cost or limits (`Variant`); empty: every checkpoint of the
    # family is alike and `flops` is its cost.
    variants: tuple[Variant, ...] = ()
    # The T5 tokens read where the checkpoint matches no variant and the spec names none (None:
    # the encoder's limit).
    max_sequence_length: int | None = None
    # The denoiser's latent size where its config names none (FluxPipeline's default_sample_size:
    # its transformer's config has no sample_size); None: the config's alone.
    default_sample_size: int | None = None
    # A flow-matching family: the prefix of the scheduler classes its denoiser works with
    # ("FlowMatch"); a scheduler the job names must be one, and a job that names none runs the
    # checkpoint's own (the spec's default EulerDiscreteScheduler predicts noise). None: any.
    scheduler_prefix: str | None = None
    # The pipeline shifts its flow-matching schedule by the image's token count: it computes `mu`
    # from the scheduler's config (base/max_image_seq_len, base/max_shift) per call, and a
    # scheduler with use_dynamic_shifting reads it (FLUX.1).
    dynamic_shift: bool = False
    # Skip-layer guidance in text-to-image (diffusers' skip_guidance_layers): the pipeline's
    # defaults for its scale, start and stop, by keyword; None: the family has none.
    skip_layer_guidance: Mapping[str, float] | None = None
    # The pipeline takes true_cfg_scale: with it > 1 and a negative prompt, a guidance-distilled
    # family runs a second, negative transformer pass per step (FLUX.1).
    true_cfg: bool = False
    # model.dtype values the family cannot run, each with why (FLUX.1's activations overflow
    # float16).
    refused_dtypes: Mapping[str, str] = field(default_factory=dict)
    # An image task's pipeline makes the checkpoint's native size unless told the input's (SDXL's
    # inpaint; SD3's and FLUX.1's image-to-image and inpaint would make 1024²): the engine passes
    # the input's size, floored to the latent grid, as width and height where it takes them.
    input_size_keywords: bool = False
    # engine.fuse_qkv fuses the transformer's attention, where its pipeline has no fusing method
    # of its own (FLUX.1; lossless). Not SD3.5's: in diffusers 0.42.1 the fused joint processor
    # also lands on Medium's dual-attention blocks, whose second attention has no text input.
    fuse_transformer_qkv: bool = False

    def variant(self, denoiser_config: Mapping) -> Variant | None:
        """The variant whose denoiser config this is; None: the family has none, or the config
        matches none of them (a fine-tune of another size: the family's own `flops` stand)."""
        return next((v for v in self.variants if v.matches(denoiser_config)), None)

    def tasks(self, variant: Variant | None = None) -> Mapping[str, str]:
        """The one owner of task -> pipeline class: the tasks a checkpoint of this variant (None:
        the family's base checkpoint) runs, and the diffusers class of each."""
        if variant is not None and variant.pipelines is not None:
            return variant.pipelines
        return self.pipelines

    def pipeline(self, task: str, variant: Variant | None = None) -> str:
        return self.tasks(variant)[task]

    def own_pipeline(self, class_name: str | None, task: str) -> str | None:
        """The class that runs `task` on a checkpoint whose model_index.json names `class_name`,
        where that class is a variant's own (FLUX.1 Fill's FluxFillPipeline: no diffusers auto
        pipeline maps to it); None: the task's auto pipeline picks the class."""
        for variant in self.variants:
            if variant.pipelines is not None and class_name in variant.pipelines.values():
                return variant.pipelines.get(task)
        return None

    def takes_negative_prompt(self, variant: Variant | None = None) -> bool:
        """The checkpoint's pipeline takes a negative prompt (and, where the family has it, true
        CFG's scale); FLUX.1 Fill's does not."""
        return self.negative_prompt and (variant is None or variant.negative_prompt)

    def check_task(self, task: str, source: str, variant: Variant | None = None) -> None:
        """The checkpoint has a pipeline for the task; else a SpecError naming the checkpoint kind
        and the key (the checkpoint's channel count alone would not say why: SDXL has no depth
        model, FLUX.1 Fill's checkpoint only inpaints)."""
        tasks = self.tasks(variant)
        if task in tasks:
            return
        if variant is not None and variant.pipelines is not None:
            only = " or ".join(f"model.task: {t}" for t in tasks)
            raise SpecError(
                f"model.task={task}: model.source {source} is {self.kind(variant)}, whose "
                f"{', '.join(tasks.values())} cannot do {task}; use {only}, or another "
                f"{self.name} checkpoint for {task}"
            )
        raise SpecError(
            f"model.task={task}: model.source {source} is {self.kind()}, and "
            f"{self.name} has no pipeline for {task}; it runs {', '.join(tasks)}"
        )

    def kind(self, variant: Variant | None = None) -> str:
        """The checkpoint kind as errors name it: 'an sd3 checkpoint', 'a flux (FLUX.1-dev)
        checkpoint'."""
        name = f"{self.name} ({variant.name})" if variant else self.name
        # "sd..." is read letter by letter: an ess-dee.
        article = "an" if name.startswith(("sd", "a", "e", "i", "o", "u")) else "a"
        return f"{article} {name} checkpoint"

    @property
    def sequence_encoder(self) -> TextEncoder | None:
        """The text encoder that reads generation.max_sequence_length tokens (T5); None: none."""
        return next((e for e in self.text_encoders if e.sequence), None)

    @property
    def droppable_encoder(self) -> TextEncoder | None:
        """The text encoder model.drop_t5 leaves out; None: the family has none to drop."""
        return next((e for e in self.text_encoders if e.droppable), None)

    def sequence_limits(self, variant: Variant | None) -> tuple[int, int] | None:
        """(the T5 tokens read by default, the most it may read) for a checkpoint of this variant
        (None: one that matches none), never over the encoder's max_tokens; None for a family
        without a sequence encoder."""
        encoder = self.sequence_encoder
        if encoder is None:
            return None
        default = (variant and variant.max_sequence_length) or self.max_sequence_length
        limit = min(
            (variant and variant.max_sequence_limit) or encoder.max_tokens, encoder.max_tokens
        )
        return min(default or limit, limit), limit

    def sequence_length(self, variant: Variant | None, requested: int | None) -> int | None:
        """The T5 tokens a call reads: the spec's, else the checkpoint kind's default; None for a
        family without a sequence encoder."""
        limits = self.sequence_limits(variant)
        return None if limits is None else requested or limits[0]

    @property
    def max_tokens(self) -> int:
        """The prompt tokens the first text encoder reads (SD2: CLIP's 77)."""
        return self.text_encoders[0].max_tokens

    def denoiser_passes(self, guidance_scale: float, true_cfg_scale: float = 1.0) -> int:
        """2 with classifier-free guidance (guidance_scale > 1 where the family has CFG; a
        guidance-distilled family's true_cfg_scale > 1), else 1. FLUX.1's pipeline runs true CFG
        for a row given a negative prompt, and the engine gives every row one (the empty prompt
        where it has none), so with true_cfg_scale > 1 every row runs two."""
        return 2 if (self.cfg and guidance_scale > 1) or true_cfg_scale > 1 else 1

    def tflop_per_image(
        self,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        denoised_pixels: int | None = None,
        *,
        sequence_length: int | None = None,
        true_cfg_scale: float = 1.0,
        sequence_encoder: bool = True,
    ) -> float:
        """sequence_length: generation.max_sequence_length (None: the figures' own);
        sequence_encoder: False where the job drops T5 (model.drop_t5)."""
        passes = self.denoiser_passes(guidance_scale, true_cfg_scale)
        return self.flops.tflop_per_image(
            width, height, steps, passes, denoised_pixels, sequence_length, sequence_encoder
        )

    def costed(self, denoiser_config: Mapping) -> Family:
        """The family costed as this checkpoint's variant: its `flops` the variant's (SD3.5
        Large's, FLUX.1-schnell's), or the family's own where no variant matches."""
        return self.costed_as(self.variant(denoiser_config))

    def costed_as(self, variant: Variant | None) -> Family:
        return self if variant is None else dataclasses.replace(self, flops=variant.flops)

    def tflop_per_refined_image(
        self, width: int, height: int, steps: int, guidance_scale: float, refiner: Handover
    ) -> float:
        """Base + refiner: the base's denoiser forwards up to the handover and the refiner's from
        it (each with its own CFG passes), both checkpoints' text encoders, and one VAE decode
        (the refiner's: the base hands latents over undecoded)."""
        if self.refiner_flops is None:
            raise SpecError(f"model.refiner: {self.name} has no refiner")
        base, refined = self.flops, self.refiner_flops
        base_steps, refiner_steps = refiner.forwards(steps)
        return (
            base.denoiser_tflop
            * self.denoiser_passes(guidance_scale)
            * base_steps
            * (width * height / base.pixels)
            + refined.denoiser_tflop
            * self.denoiser_passes(refiner.guidance_scale)
            * refiner_steps
            * (width * height / refined.pixels)
            + base.text_tflop
            + refined.text_tflop
            + refined.vae_decode_tflop * (width * height / refined.pixels)
        )

    def size_conditioning_defaults(self, width: int, height: int) -> dict[str, tuple[int, int]]:
        """The micro-conditioning diffusers passes where the call names none: the image's own
        size as original and target size, (height, width) as diffusers orders them, and no crop.
        The negative twins default to the same values. Empty for a family without it."""
        if not self.size_conditioning:
            return {}
        return {
            "original_size": (height, width),
            "crops_coords_top_left": (0, 0),
            "target_size": (height, width),
        }

    def size_conditioning_inputs(self, width: int, height: int) -> dict[str, tuple[int, int]]:
        """The micro-conditioning a call passes, negative twins included, so that its rows can
        record what the denoiser was conditioned on; empty for a family without it."""
        defaults = self.size_conditioning_defaults(width, height)
        return {**defaults, **{f"negative_{name}": value for name, value in defaults.items()}}

    def aesthetic_inputs(self) -> dict[str, float]:
        """The aesthetic-score conditioning a call passes to a checkpoint that says
        requires_aesthetics_score (SDXL's refiner), by diffusers' keyword; empty for a family
        without such checkpoints."""
        if self.aesthetic_score is None:
            return {}
        return dict(zip(("aesthetic_score", "negative_aesthetic_score"), self.aesthetic_score))

    def native_size(self, sample_size: object, vae_scale: int) -> int | None:
        """The size a checkpoint was trained at: its denoiser's sample_size (latent pixels) times
        the VAE's scale (512-base: 64 x 8, 768-v: 96 x 8; FLUX.1: its pipeline's 128 x 8); None where
        neither its config nor the family names one."""
        if not (isinstance(sample_size, int) and sample_size):
            sample_size = self.default_sample_size
        return sample_size * vae_scale if sample_size else None

    def check_size(self, name: str, value: int) -> int:
        """A width or height on the family's latent grid; else a ValueError that names the family
        and suggests the nearest sizes (other sizes fail deep inside the denoiser with a shape
        error)."""
        grid = self.latent_grid
        if value % grid:
            lower = value - value % grid
            raise ValueError(
                f"{name}={value} is not divisible by {grid}, the latent grid of {self.name} "
                f"checkpoints; use e.g. {lower or grid} or {lower + grid}"
            )
        return value


def vae_scale_factor(vae_config: Mapping) -> int:
    """Output pixels per latent pixel: 2 per VAE down block after the first (SD's VAE: 8)."""
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


CLIP_TOKENS = 77

SD2 = Family(
    name="sd2",
    pipelines={
        "text-to-image": "StableDiffusionPipeline",
        "image-to-image": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
        "depth-to-image": "StableDiffusionDepth2ImgPipeline",
        "upscale": "StableDiffusionUpscalePipeline",
    },
    text_encoders=(TextEncoder("text_encoder", "tokenizer", CLIP_TOKENS),),
    negative_prompt=True,
    cfg=True,
    dtype="float16",
    latent_grid=8,
    denoiser="unet",
    fallback_size=512,
    # SD2-base at 512x512, counted on meta tensors: one UNet forward 0.8045 TFLOP (CFG's two:
    # 1.609), one VAE decode 2.51, the text encoder 0.09.
    flops=Flops(pixels=512 * 512, denoiser_tflop=0.8045, vae_decode_tflop=2.51, text_tflop=0.09),
)

# SDXL 1.0 (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0). Checked in diffusers
# 0.42.1's pipeline_stable_diffusion_xl.py: the native size is unet.config.sample_size (128) x the
# VAE's scale (8) = 1024; original_size and target_size default to (height, width) and
# crops_coords_top_left to (0, 0); the VAE decodes after `vae.to(torch.float32)` when it is
# float16 and `vae.config.force_upcast` (AutoencoderKL's default, and SDXL's VAE config) is true.
# There is no depth or upscale class. bench/flops.py counts the FLOPs (`--check` compares).
SDXL = Family(
    name="sdxl",
    pipelines={
        "text-to-image": "StableDiffusionXLPipeline",
        "image-to-image": "StableDiffusionXLImg2ImgPipeline",  # and the refiner's checkpoint
        "inpaint": "StableDiffusionXLInpaintPipeline",
    },
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", CLIP_TOKENS),  # CLIP ViT-L
        TextEncoder("text_encoder_2", "tokenizer_2", CLIP_TOKENS, pooled=True),  # OpenCLIP bigG
    ),
    negative_prompt=True,
    cfg=True,
    dtype="float16",
    latent_grid=8,
    denoiser="unet",
    fallback_size=1024,
    # SDXL-base at 1024x1024: one UNet forward 6.7612 TFLOP (CFG's two: 13.52), one VAE decode
    # (in float32: same FLOPs) 10.47, both text encoders at batch 2 0.2223.
    flops=Flops(
        pixels=1024 * 1024, denoiser_tflop=6.7612, vae_decode_tflop=10.4704, text_tflop=0.2223
    ),
    size_conditioning=True,
    vae_upcast=True,
    input_size_keywords=True,
    # The refiner at 1024x1024: one UNet forward 7.2860, its VAE decode (the same VAE) 10.4704,
    # text_encoder_2 alone at batch 2 0.1957.
    refiner_pipeline="StableDiffusionXLImg2ImgPipeline",
    refiner_flops=Flops(
        pixels=1024 * 1024, denoiser_tflop=7.2860, vae_decode_tflop=10.4704, text_tflop=0.1957
    ),
    # StableDiffusionXLImg2ImgPipeline's and ...InpaintPipeline's defaults for the refiner.
    aesthetic_score=(6.0, 2.5),
)

FAMILIES: dict[str, Family] = {}
# A checkpoint's model_index.json `_class_name` -> its family.
_BY_PIPELINE: dict[str, Family] = {}


def register(family: Family) -> None:
    """Add a family's row to FAMILIES, and its pipeline classes to `family_of`."""
    FAMILIES[family.name] = family
    classes = [*family.pipelines.values()]
    classes += [c for v in family.variants for c in (v.pipelines or {}).values()]
    _BY_PIPELINE.update({cls: family for cls in classes})


for _family in (SD2, SDXL):
    register(_family)


def family_of(pipeline_class: str | None) -> Family | None:
    """The family whose checkpoints name this pipeline class in model_index.json; None: unknown."""
    return _BY_PIPELINE.get(pipeline_class or "")


# The family a spec is checked and estimated against before its checkpoint is read (where it is
# read, `family_of` names the checkpoint's own).
DEFAULT_FAMILY = SD2


# Rows kept in their own modules (the T5 families) build on this module's classes and register
# themselves on import; imported here, last, so that FAMILIES holds them whichever module is
# imported first (sdfleet.schemas imports this one before any other).
from sdfleet.schemas import family_flux, family_sd3  # noqa: E402, F401
