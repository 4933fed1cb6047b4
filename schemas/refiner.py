"""`model.refiner`: a second checkpoint that continues the base's denoising (SDXL's refiner, the
"ensemble of expert denoisers"). The base runs the first `denoising_start` of the schedule and
hands its latents over; the refiner runs the rest and decodes.

No torch here: the spec (and so `sdfleet plan`) imports it.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from sdfleet.schemas.locations import check_model_location
from sdfleet.schemas.section import Section
from sdfleet.schemas.tasks import TEXT_TO_IMAGE


class RefinerSpec(Section):
    # A hub id, a local folder or an s3:// folder, read with model.storage_options and loaded in
    # model.dtype, as the base is.
    source: str
    revision: str | None = None
    # Where the base stops (its denoising_end) and the refiner starts, as a share of the schedule.
    denoising_start: float = Field(0.8, gt=0.0, lt=1.0)
    # null: the sample's own steps and guidance (so a sweep over them sweeps the refiner too).
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0.0)

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        return check_model_location("model.refiner.source", v)

    def steps(self, sample_steps: int) -> int:
        return self.num_inference_steps or sample_steps

    def guidance(self, sample_guidance: float) -> float:
        return sample_guidance if self.guidance_scale is None else self.guidance_scale


def check_refiner_task(task: str, refiner: RefinerSpec | None) -> None:
    """A refiner continues a text-to-image base; the image tasks' pipelines take no latents."""
    if refiner is not None and task != TEXT_TO_IMAGE:
        raise ValueError(
            f"model.refiner is for model.task={TEXT_TO_IMAGE}; model.task={task} takes an input "
            "image, not a base's latents: remove model.refiner (or run the refiner as a second, "
            "image-to-image job on this one's output)"
        )
