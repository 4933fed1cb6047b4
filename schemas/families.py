"""What each model family is: its pipeline classes, text encoders, guidance, dtype, latent grid,
native size and FLOPs. The one owner of the family concept: the planner estimates cost from it,
the driver and the engine size images by it, bench/gpu reports MFU against it.

A family is a row, not a branch: SDXL, SD3.5 and FLUX.1 are rows added to `FAMILIES` (with their
pipeline classes in `pipelines`), and nothing that reads a row asks which family it is.

No torch, diffusers or pydantic here: `sdfleet plan` and bench/gpu (torch and diffusers only)
both import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TextEncoder:
    component: str  # the checkpoint's component (model_index.json key) holding the encoder
    tokenizer: str  # ... and the one holding its tokenizer
    max_tokens: int  # tokens it reads, start and end tokens included; the rest is truncated


@dataclass(frozen=True)
class Flops:
    """FLOPs of one image, counted on meta tensors at `pixels` output pixels; each part scales
    with latent pixels (the text encoder's does not)."""

    pixels: int  # the output size the figures were counted at (width x height)
    denoiser_tflop: float  # one denoiser forward for one image (CFG runs two)
    vae_decode_tflop: float
    text_tflop: float

    def tflop_per_image(self, width: int, height: int, steps: int, passes: int) -> float:
        """passes: denoiser forwards per step (2 with classifier-free guidance, else 1)."""
        scale = width * height / self.pixels
        return (
            self.denoiser_tflop * passes * steps * scale
            + self.vae_decode_tflop * scale
            + self.text_tflop
        )


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

    def pipeline(self, task: str) -> str:
        return self.pipelines[task]

    @property
    def max_tokens(self) -> int:
        """The prompt tokens the first text encoder reads (SD2: CLIP's 77)."""
        return self.text_encoders[0].max_tokens

    def denoiser_passes(self, guidance_scale: float) -> int:
        return 2 if self.cfg and guidance_scale > 1 else 1

    def tflop_per_image(self, width: int, height: int, steps: int, guidance_scale: float) -> float:
        return self.flops.tflop_per_image(
            width, height, steps, self.denoiser_passes(guidance_scale)
        )

    def native_size(self, sample_size: object, vae_scale: int) -> int | None:
        """The size a checkpoint was trained at: its denoiser's sample_size (latent pixels) times
        the VAE's scale (512-base: 64 x 8, 768-v: 96 x 8); None where its config names none."""
        return sample_size * vae_scale if isinstance(sample_size, int) and sample_size else None

    def check_size(self, name: str, value: int) -> int:
        """A width or height on the latent grid; else a ValueError that suggests the nearest ones
        (other sizes fail deep inside the denoiser with a shape error)."""
        grid = self.latent_grid
        if value % grid:
            lower = value - value % grid
            raise ValueError(
                f"{name}={value} is not divisible by {grid}; use e.g. {lower or grid} or "
                f"{lower + grid}"
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

FAMILIES: dict[str, Family] = {family.name: family for family in (SD2,)}

# A checkpoint's model_index.json `_class_name` -> its family.
_BY_PIPELINE = {cls: family for family in FAMILIES.values() for cls in family.pipelines.values()}


def family_of(pipeline_class: str | None) -> Family | None:
    """The family whose checkpoints name this pipeline class in model_index.json; None: unknown."""
    return _BY_PIPELINE.get(pipeline_class or "")


# The family a spec is checked and estimated against before its checkpoint is read (the only one
# so far; with more rows, the planner reads the checkpoint's with `family_of`).
DEFAULT_FAMILY = SD2
