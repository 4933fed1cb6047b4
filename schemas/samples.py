"""What one sample is, and the pure functions that name it: sweep points, seeds, keys, sample ids.

The planner (driver) and the generator (worker) both call these, so a shard means the same
samples on every machine and in every run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdfleet.schemas.tasks import TASK_PARAMETERS, TASKS

if TYPE_CHECKING:  # the engine imports this module on machines without pydantic (bench/gpu)
    from sdfleet.schemas.spec import JobSpec

# Keys are f"{shard:05d}{offset:04d}" (img2dataset's convention); the shard field widens past 99,999.
SHARD_DIGITS = 5
OFFSET_DIGITS = 4

# A sweep point's coordinates: the generation parameters a sweep varies (the seed through
# sweep.seeds, the others through sweep.axes), in the one order every listing of them uses (the
# spec's sweepable keys, the preview grid's axes). A point's identity is its values of these;
# which point comes first is the plan's order (`sweep_points`), never this one.
SWEEP_COORDINATES = (
    "guidance_scale",
    "num_inference_steps",
    "seed",
    "scheduler",
    "width",
    "height",
    "negative_prompt",
    *TASK_PARAMETERS,
    # The T5 families' own (SD3.5, FLUX.1): T5's tokens read, FLUX.1's true CFG. Rows of the
    # families that have them record them (schemas.family_spec, schemas.rows).
    "max_sequence_length",
    "true_cfg_scale",
    # The scale of a job's one LoRA (model.loras), per sample; rows of jobs with LoRAs have it.
    "lora_scale",
)
# What samples that go through the pipeline in one call share: every coordinate but the ones that
# may differ per sample within a call (the seed, the negative prompt), and the input image's size.
BATCH_COORDINATES = tuple(c for c in SWEEP_COORDINATES if c not in ("seed", "negative_prompt"))


def sweep_points(spec: JobSpec) -> list[dict[str, Any]]:
    """Every sweep point of one prompt, in plan order: axes in spec order, the seed index innermost.

    Seed innermost means one seed is drawn at every axis value, which is what an X/Y grid needs.
    """
    axes = spec.sweep.axes
    names = list(axes)
    points = []
    # With best-of-N curation the seeds are the candidate slots, sweep.seeds being 1.
    seeds = spec.sweep.num_seeds() * spec.curation.candidates
    for combo in itertools.product(*(axes[n] for n in names), range(seeds)):
        point = dict(zip(names, combo[:-1]))
        point["seed_index"] = combo[-1]
        points.append(point)
    return points


def derive_seed(base_seed: int, prompt_id: str, index: int) -> int:
    """A stable 63-bit seed from (base_seed, prompt_id, index): the same on every machine and Python.

    Python's hash() is salted per process, so a cryptographic hash is used instead; 63 bits keep
    the value a non-negative int64 for Parquet and for torch.Generator.manual_seed.
    """
    digest = hashlib.sha256(f"{base_seed}\x1f{prompt_id}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seed_for(spec: JobSpec, prompt_id: str, seed_index: int) -> int:
    if isinstance(spec.sweep.seeds, list):
        return spec.sweep.seeds[seed_index]
    return derive_seed(spec.sweep.base_seed, prompt_id, seed_index)


def key_width(num_shards: int) -> int:
    return max(SHARD_DIGITS, len(str(max(num_shards - 1, 0))))


def shard_name(shard_id: int, width: int = SHARD_DIGITS) -> str:
    return f"{shard_id:0{width}d}"


def sample_key(shard_id: int, offset: int, width: int = SHARD_DIGITS) -> str:
    return f"{shard_id:0{width}d}{offset:0{OFFSET_DIGITS}d}"


@dataclass
class GenerationParams:
    """What the pipeline is called with for one sample: enough to regenerate it with plain diffusers."""

    prompt: str
    negative_prompt: str
    seed: int
    num_inference_steps: int
    guidance_scale: float
    # The image's size. None for the image tasks until made: the input image decides it.
    width: int | None
    height: int | None
    scheduler: str | None  # None: the checkpoint's own scheduler
    # The image tasks' own parameters (None where the task has none), and the row's input.
    strength: float | None = None
    noise_level: int | None = None
    image: InputImage | None = None
    mask: InputImage | None = None
    # A T5 family's T5 tokens read and true CFG's scale (generation.* or a sweep axis; None: the
    # job-wide value the engine computes from the checkpoint).
    max_sequence_length: int | None = None
    true_cfg_scale: float | None = None
    # The job's one LoRA's scale at this sample (sweep.axes.lora_scale); None: model.loras' own.
    lora_scale: float | None = None

    def batch_key(self) -> tuple:
        """Samples that share it can go through the pipeline in one call."""
        size = self.image.size if self.image else None
        return (*(getattr(self, c) for c in BATCH_COORDINATES), size)


@dataclass(frozen=True)
class InputImage:
    """One row's input image or mask, decoded (RGB, or L for a mask, EXIF orientation applied),
    with the sha256 of the bytes it was decoded from and where they came from (None: inline)."""

    pixels: Any  # a PIL image
    sha256: str
    uri: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.size


@dataclass
class Sample:
    key: str
    shard_id: int
    prompt_id: str
    params: GenerationParams | None  # None when the row cannot be generated (see error)
    error: str | None = None
    passthrough: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None  # the row's text, kept for failed rows too (params is None there)
    planned: GenerationParams | None = (
        None  # what a failed row would have used (seed, guidance ...)
    )
    origin: dict[str, Any] = field(
        default_factory=dict
    )  # source_* columns, when the input is an output
    # Best-of-N: the (prompt, sweep point) group this candidate slot belongs to, and its slot there.
    group: int | None = None
    candidate: int | None = None


def resolve_params(
    spec: JobSpec, prompt: str, negative_prompt: str | None, prompt_id: str, point: dict[str, Any]
) -> GenerationParams:
    gen, task = spec.generation, TASKS[spec.model.task]
    if negative_prompt is None:
        negative_prompt = point.get("negative_prompt", gen.negative_prompt)
    return GenerationParams(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed_for(spec, prompt_id, point["seed_index"]),
        num_inference_steps=point.get("num_inference_steps", gen.num_inference_steps),
        guidance_scale=float(point.get("guidance_scale", gen.guidance_scale)),
        width=point.get("width", gen.width),
        height=point.get("height", gen.height),
        scheduler=point.get("scheduler", spec.model.scheduler),
        # The value the task runs with, its diffusers default when the spec leaves it out: rows
        # record what made the image, not what was written.
        strength=_first_set(point.get("strength"), gen.strength, task.strength),
        noise_level=_first_set(point.get("noise_level"), gen.noise_level, task.noise_level),
        max_sequence_length=point.get("max_sequence_length", gen.max_sequence_length),
        true_cfg_scale=point.get("true_cfg_scale", gen.true_cfg_scale),
        lora_scale=point.get("lora_scale"),
    )


def _first_set(*values):
    return next((v for v in values if v is not None), None)


def sample_id(
    model_source: str,
    model_revision: str | None,
    params: GenerationParams,
    scheduler: str,
    refiner: dict[str, Any] | None = None,
    components: dict[str, Any] | None = None,
    family: dict[str, Any] | None = None,
) -> str:
    """The identity of one image across jobs: everything that determines its pixels. refiner:
    a base + refiner sample's refiner columns (schemas.rows.REFINER_FIELDS). components: what
    replaced the checkpoint's own (vae_source, vae_revision) or adapts it (loras), set values only. family: the
    family's own inputs as its rows record them (`family_spec.record`: T5's sequence length,
    drop_t5, skip-layer guidance, true CFG, the scheduler's shift), set values only. Each adds nothing when unset, so a job without
    them keeps the ids it had."""
    payload = {
        "model_source": model_source,
        "model_revision": model_revision,
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "seed": params.seed,
        "scheduler": scheduler,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "width": params.width,
        "height": params.height,
    }
    # The image tasks' inputs and parameters, only where there are any: a text-to-image sample
    # keeps the id it had before there were other tasks.
    extra = {
        "strength": params.strength,
        "noise_level": params.noise_level,
        "input_image_sha256": params.image.sha256 if params.image else None,
        "mask_image_sha256": params.mask.sha256 if params.mask else None,
    }
    payload.update({k: v for k, v in extra.items() if v is not None})
    payload.update(refiner or {})
    payload.update({k: v for k, v in (components or {}).items() if v is not None})
    payload.update({k: v for k, v in (family or {}).items() if v is not None})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
