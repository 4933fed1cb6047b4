"""`model.refiner` in the engine: the refiner pipeline, loaded once per actor beside the base, and
the second half of every call. The base runs to `denoising_end` and hands its latents over
undecoded; the refiner continues from `denoising_start` (the same share of the schedule) and
decodes, as diffusers documents SDXL's "ensemble of expert denoisers".

The engine (sdfleet.actors.engine) owns the base and asks this module for the refined call; the
rows record what `call_for` says the refiner ran with.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sdfleet.actors.components import load_pretrained
from sdfleet.actors.engine import GENERATOR_DEVICE, scheduler_of
from sdfleet.actors.speed_ups import apply_speed_ups
from sdfleet.schemas.errors import ModelLoadError
from sdfleet.schemas.families import Family
from sdfleet.schemas.rows import SIZE_CONDITIONING_COLUMNS
from sdfleet.schemas.samples import GenerationParams

if TYPE_CHECKING:
    from sdfleet.schemas.spec import EngineSpec, ModelSpec

log = logging.getLogger("sdfleet")


@dataclass(frozen=True)
class RefinerCall:
    """What the refiner runs a sample with, as its row records it. The aesthetic scores condition
    a refiner whose config says requires_aesthetics_score (SDXL's); None for one that reads none."""

    denoising_start: float  # the base's denoising_end too
    num_inference_steps: int
    guidance_scale: float
    aesthetic_score: float | None
    negative_aesthetic_score: float | None


class Refiner:
    """The refiner pipeline on the base's device, in the base's dtype, with the base's scheduler
    class (built from the refiner's own scheduler config) and the same speed-ups."""

    def __init__(
        self,
        model: ModelSpec,
        family: Family,
        device: str,
        dtype: str,
        options: EngineSpec,
        shared: dict[str, Any] | None = None,
    ):
        """shared: the base's components the refiner takes in place of its own (model.vae's)."""
        self.spec = model.refiner
        self.scheduler_overrides = model.scheduler_config
        # 1. The family's refiner class, loaded as the base is: safetensors only.
        if family.refiner_pipeline is None:
            raise ModelLoadError(
                f"model.refiner.source {self.spec.source}: model.source {model.source} is an "
                f"{family.name} checkpoint, and {family.name} has no refiner; remove model.refiner"
            )
        self.pipe = self._load(
            family.refiner_pipeline, model.storage_options, device, dtype, shared or {}
        )
        self._scheduler_config = self.pipe.scheduler.config
        self._schedulers: dict[str, Any] = {}
        # 2. The aesthetic scores the pipeline conditions on where the call names none, passed
        #    explicitly so that the rows say what was used.
        self.aesthetic = self._aesthetic_scores()
        # 3. The engine's lossless speed-ups, on the refiner's UNet and VAE too.
        self.applied = apply_speed_ups(self.pipe, options)

    def _load(self, class_name: str, storage_options: dict, device: str, dtype: str, shared: dict):
        import diffusers

        pipe = load_pretrained(
            getattr(diffusers, class_name),
            "model.refiner.source",
            self.spec.source,
            self.spec.revision,
            storage_options,
            dtype,
            **shared,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def _aesthetic_scores(self) -> dict[str, float]:
        if not self.pipe.config.get("requires_aesthetics_score", False):
            return {}
        defaults = inspect.signature(type(self.pipe).__call__).parameters
        return {k: defaults[k].default for k in ("aesthetic_score", "negative_aesthetic_score")}

    def call_for(self, params: GenerationParams) -> RefinerCall:
        return RefinerCall(
            denoising_start=self.spec.denoising_start,
            num_inference_steps=self.spec.steps(params.num_inference_steps),
            guidance_scale=self.spec.guidance(params.guidance_scale),
            aesthetic_score=self.aesthetic.get("aesthetic_score"),
            negative_aesthetic_score=self.aesthetic.get("negative_aesthetic_score"),
        )

    @property
    def probe_steps(self) -> int:
        """Steps for a memory probe in which both the base and the refiner run a denoiser
        forward: each gets about its share of them, at least two."""
        share = min(self.spec.denoising_start, 1 - self.spec.denoising_start)
        return math.ceil(2 / share)

    def refine(
        self, base, inputs: dict[str, Any], batch: list[GenerationParams], scheduler: str
    ) -> Any:
        """One call of base + refiner on samples that share GenerationParams.batch_key(): the base
        with `inputs` (the engine's call) to the handover, as latents; then the refiner from there,
        with the same prompts and micro-conditioning, its own steps and guidance, and fresh
        per-sample generators (so that one row regenerates alone). Returns the refiner's output."""
        call = self.call_for(batch[0])
        latents = base(
            **{**inputs, "denoising_end": call.denoising_start, "output_type": "latent"}
        ).images
        self.pipe.scheduler = self._scheduler(scheduler)
        conditioning = {k: v for k, v in inputs.items() if k in SIZE_CONDITIONING_COLUMNS}
        return self.pipe(
            prompt=inputs["prompt"],
            negative_prompt=inputs["negative_prompt"],
            image=latents,
            denoising_start=call.denoising_start,
            num_inference_steps=call.num_inference_steps,
            guidance_scale=call.guidance_scale,
            generator=[torch.Generator(GENERATOR_DEVICE).manual_seed(p.seed) for p in batch],
            output_type=inputs["output_type"],
            **conditioning,
            **self.aesthetic,
        )

    def _scheduler(self, name: str):
        """The base's scheduler class, from the refiner's own scheduler config."""
        if name not in self._schedulers:
            self._schedulers[name] = scheduler_of(
                name, self._scheduler_config, self.scheduler_overrides
            )
        return self._schedulers[name]
