"""What each `model.task` is: what its checkpoint looks like, and what each sample needs and may
vary. The one owner of the task concept: the spec validates against it, the planner checks
checkpoints with it, the engine calls pipelines by it. Which diffusers class runs a task is the
model family's (`sdfleet.schemas.families`).

No torch or diffusers here: `sdfleet plan` checks a checkpoint from its JSON configs alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    # The diffusers auto class that picks the pipeline for other families too (SDXL's img2img for
    # its refiner, say); None: the task exists for SD2 only and loads the family's own pipeline.
    auto_pipeline: str | None
    # The UNet's input channels: 4 latent channels plus the task's conditioning. It is what tells
    # an inpainting or depth checkpoint from a text-to-image one (the SD2 model card's five).
    unet_in_channels: int
    # A component the checkpoint must have besides the text-to-image ones (model_index.json).
    needs_component: str | None = None
    image: bool = False  # each row brings an input image (input.image_column)
    mask: bool = False  # ...and a mask, white = repaint (input.mask_column)
    # diffusers' defaults for the task's own parameters; None: the task has no such parameter.
    strength: float | None = None
    noise_level: int | None = None
    # Output pixels per input pixel along each side (the x4 upscaler: 4).
    scale: int = 1
    # Output pixels per latent pixel along each side: the VAE's factor, 8 but for the x4
    # upscaler's, whose denoiser runs on a latent of its input's size.
    latent_scale: int = 8

    @property
    def parameters(self) -> tuple[str, ...]:
        """The task parameters (generation.* keys, sweepable) it takes."""
        return tuple(k for k in TASK_PARAMETERS if getattr(self, k) is not None)


TEXT_TO_IMAGE = "text-to-image"

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(TEXT_TO_IMAGE, "AutoPipelineForText2Image", 4),
        Task("image-to-image", "AutoPipelineForImage2Image", 4, image=True, strength=0.8),
        Task(
            "inpaint",
            "AutoPipelineForInpainting",
            9,
            image=True,
            mask=True,
            strength=1.0,
        ),
        Task(
            "depth-to-image",
            None,
            5,
            needs_component="depth_estimator",
            image=True,
            strength=0.8,
        ),
        Task(
            "upscale",
            None,
            7,
            needs_component="low_res_scheduler",
            image=True,
            noise_level=20,
            scale=4,
            latent_scale=4,
        ),
    )
}

TASK_NAMES = tuple(TASKS)
# The task parameters any task has; each is a generation.* key and may be swept.
TASK_PARAMETERS = ("strength", "noise_level")

# The one answer to "can inpaint read an earlier output?": no. An output holds images and rows but
# no masks, and a mask column beside a table the user does not write could not be matched to its
# rows; the masks and their images come from one Parquet table the user writes. Said by the spec's
# check (no input.mask_column) and the planner's (input.uri is an output) alike.
MASKS_NOT_FROM_AN_OUTPUT = (
    "an sdfleet output holds no masks, so inpaint cannot take one as input.uri: write a Parquet "
    "table with each image (its bytes, e.g. read from the output's tars) and its mask, and set "
    "input.uri to it with input.image_column and input.mask_column"
)
