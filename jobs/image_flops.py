"""The image tasks' FLOPs for `plan`, from their inputs' real sizes.

An image task's size is its input's, times the task's scale (the x4 upscaler: 4), so `plan` reads
the first shard's inputs as a worker does (`read_shard_samples`: the same reads, checks and
decoding) and counts each of its samples at the size it will be made at:

- image-to-image, inpaint, depth-to-image run `strength` x steps denoiser steps, as diffusers does
  (`int(steps * strength)`, at most steps);
- the upscaler denoises a latent of its input's size (`Task.latent_scale`), counted with the
  family's denoiser figure at the output size whose latent that is, and decodes to the output size.

The first shard's mean stands for every shard's: the estimate says how many inputs it read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdfleet.actors.reader import read_shard_samples
from sdfleet.schemas.families import Family
from sdfleet.schemas.family_spec import MAX_SEQUENCE_LENGTH, SAMPLE_KEYS, TRUE_CFG_SCALE
from sdfleet.schemas.plan import Plan
from sdfleet.schemas.samples import GenerationParams
from sdfleet.schemas.spec import JobSpec
from sdfleet.schemas.tasks import TASKS, TEXT_TO_IMAGE, Task


@dataclass(frozen=True)
class MeasuredInputs:
    """One image's FLOPs for each sample of the first shard that has an input, and their sizes."""

    tflop_per_image: list[float]
    input_sizes: list[tuple[int, int]]  # (width, height) of each input read
    samples: int  # the first shard's samples, with those that failed (no input to count)

    def sizes_text(self, most: int = 3) -> str:
        """The distinct input sizes, most common first: `64x64 (6), 96x64 (2)`."""
        counts: dict[tuple[int, int], int] = {}
        for size in self.input_sizes:
            counts[size] = counts.get(size, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv))
        shown = ", ".join(f"{w}x{h} ({n})" for (w, h), n in ranked[:most])
        return shown + (f", {len(ranked) - most} more sizes" if len(ranked) > most else "")


def measure_inputs(plan: Plan, family: Family) -> MeasuredInputs | None:
    """The first shard's samples counted at their inputs' sizes; None when the task reads no
    input image or no sample of that shard has one (then the family's fallback size stands)."""
    task = TASKS[plan.spec.model.task]
    if not task.image or not plan.num_samples:
        return None
    samples = read_shard_samples(plan, 0)
    made = [s.params for s in samples if s.params is not None and s.params.image is not None]
    if not made:
        return None
    return MeasuredInputs(
        [image_tflop(family, task, p, sequence_inputs(plan.spec, _swept(p))) for p in made],
        [p.image.size for p in made],
        len(samples),
    )


def image_tflop(family: Family, task: Task, params: GenerationParams, sequence: dict) -> float:
    """One image task sample's FLOPs at its input's size (sequence: `sequence_inputs`)."""
    in_w, in_h = params.image.size
    width, height = in_w * task.scale, in_h * task.scale
    steps = params.num_inference_steps
    if params.strength is not None:
        steps = min(int(steps * params.strength), steps)
    # Every family's figures are counted at the VAE's factor, text-to-image's latent_scale (8; a
    # transformer family's latent_grid is that times its patch, so it will not do here).
    vae_factor = TASKS[TEXT_TO_IMAGE].latent_scale
    denoised = None
    if task.latent_scale != vae_factor:
        denoised = width * height * (vae_factor // task.latent_scale) ** 2
    return family.tflop_per_image(width, height, steps, params.guidance_scale, denoised, **sequence)


def _swept(params: GenerationParams) -> dict[str, Any]:
    """A sample's values of the family keys a sweep may vary, where it has them."""
    values = {key: getattr(params, key) for key in SAMPLE_KEYS}
    return {key: value for key, value in values.items() if value is not None}


def sequence_inputs(spec: JobSpec, point: Mapping[str, Any] | None = None) -> dict:
    """What a transformer family's cost depends on beyond size, steps and guidance, at one sweep
    point (a swept value, else the spec's): the T5 length (None: the figures' own), the true-CFG
    scale (FLUX.1; 1: none) and whether T5 runs (SD3.5's model.drop_t5)."""
    gen, point = spec.generation, point or {}
    return {
        "sequence_length": point.get(MAX_SEQUENCE_LENGTH, gen.max_sequence_length),
        "true_cfg_scale": point.get(TRUE_CFG_SCALE, gen.true_cfg_scale) or 1.0,
        "sequence_encoder": not spec.model.drop_t5,
    }
