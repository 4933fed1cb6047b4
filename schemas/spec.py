"""The job spec: validated data, loaded from YAML, overridable with ``--set a.b=c``.

No torch, ray or tensorflow here: the CLI and `sdfleet plan` import this module on a laptop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from sdfleet.schemas.curation_spec import CurationSpec
from sdfleet.schemas.detectors import DETECTOR_NAMES, DETECTORS, NO_DETECTOR, needs_clip_model_error
from sdfleet.schemas.errors import SpecError
from sdfleet.schemas.family_spec import SKIP_LAYER_GUIDANCE_KEYS
from sdfleet.schemas.fingerprint import fingerprint, fingerprint_fields
from sdfleet.schemas.loading import (
    apply_override,
    format_validation_error,
    override_key,
    resolve_relative_paths,
)
from sdfleet.schemas.locations import check_model_location
from sdfleet.schemas.lora import check_lora_scale, named_loras
from sdfleet.schemas.lora_spec import LoraSpec
from sdfleet.schemas.passthrough import PassthroughColumns
from sdfleet.schemas.refiner import RefinerSpec, check_refiner_task
from sdfleet.schemas.samples import SWEEP_COORDINATES
from sdfleet.schemas.schedulers import check_scheduler_name
from sdfleet.schemas.secrets import redact
from sdfleet.schemas.section import Section
from sdfleet.schemas.tasks import (
    MASKS_NOT_FROM_AN_OUTPUT,
    TASK_NAMES,
    TASK_PARAMETERS,
    TASKS,
    TEXT_TO_IMAGE,
)


class ModelSpec(Section):
    source: str = "stabilityai/stable-diffusion-2-base"
    revision: str | None = None
    # What the checkpoint does with each row (sdfleet.schemas.tasks): text-to-image, or one of the
    # SD2 model card's image-conditioned checkpoints, which take an input image per row.
    task: Literal[TASK_NAMES] = TEXT_TO_IMAGE
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    scheduler: str | None = "EulerDiscreteScheduler"
    scheduler_config: dict[str, Any] = Field(default_factory=dict)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # A VAE in place of the checkpoint's own (an AutoencoderKL folder: config.json and safetensors
    # weights), e.g. an fp16-fixed SDXL VAE: a hub id, a local folder or an s3:// folder (read
    # with model.storage_options); null: the checkpoint's.
    vae: str | None = None
    vae_revision: str | None = None
    refiner: RefinerSpec | None = None  # sdfleet.schemas.refiner
    # Load an SD3.5 checkpoint without its T5 encoder (text_encoder_3=None, tokenizer_3=None): the
    # pipeline passes zeros in T5's place, which saves its memory and time at a price in prompt
    # adherence. Only SD3 checkpoints have a T5 to drop (pre-flight checks).
    drop_t5: bool = False
    # LoRA adapters on the denoiser (sdfleet.schemas.lora), applied in order at their scales.
    loras: list[LoraSpec] = Field(default_factory=list)

    @field_validator("loras")
    @classmethod
    def _loras(cls, v: list[LoraSpec]) -> list[LoraSpec]:
        return named_loras(v)

    @model_validator(mode="after")
    def _refiner_fits_the_task(self):
        check_refiner_task(self.task, self.refiner)
        return self

    @field_validator("source", "vae")
    @classmethod
    def _source_not_empty(cls, v: str | None, info) -> str | None:
        return check_model_location(f"model.{info.field_name}", v)

    @field_validator("scheduler")
    @classmethod
    def _scheduler_is_class_name(cls, v: str | None) -> str | None:
        return check_scheduler_name(v)


class InputSpec(Section):
    uri: str
    prompt_column: str = "prompt"
    id_column: str | None = "prompt_id"
    negative_prompt_column: str | None = None
    passthrough_columns: PassthroughColumns = Field(default_factory=list)  # schemas.passthrough
    # Input images for the image tasks: encoded image bytes, or a URI (s3://..., or a path relative
    # to the input's folder) that must stay inside the input's folder. Masks: white = repaint.
    image_column: str | None = None
    mask_column: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)


class GenerationSpec(Section):
    num_inference_steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0)
    # null: text-to-image makes the checkpoint's own size (its UNet's sample size times the VAE's
    # scale factor: 512 for 512-base, 768 for 768-v); the image tasks make the input image's size
    # (times 4 for the upscaler), so these are for text-to-image only. Whether a size is on the
    # latent grid depends on the checkpoint's family: pre-flight checks it once it is read.
    width: int | None = Field(None, ge=8, le=8192)
    height: int | None = Field(None, ge=8, le=8192)
    negative_prompt: str = ""
    # How far from the input image image-to-image, depth-to-image and inpaint go (0: the input
    # itself, 1: all new); null: the task's diffusers default (0.8; 1.0 for inpaint).
    strength: float | None = Field(None, gt=0.0, le=1.0)
    # The noise the x4 upscaler adds to its low-resolution input (0 to the checkpoint's
    # max_noise_level, 350 for x4-upscaling); null: diffusers' default of 20.
    noise_level: int | None = Field(None, ge=0, le=1000)
    # The T5 tokens a T5 family's encoder reads (SD3.5, FLUX.1); null: the checkpoint's variant's
    # default. Over the variant's limit is refused before any worker starts.
    max_sequence_length: int | None = Field(None, ge=1)
    # True classifier-free guidance on a guidance-distilled family (FLUX.1): above 1, with a
    # negative prompt, a second (negative) transformer pass per step; 1: none.
    true_cfg_scale: float = Field(1.0, ge=1.0)
    # Skip-layer guidance (SD3.5 Medium, text-to-image, with guidance_scale > 1), as
    # StableDiffusion3Pipeline names it: the transformer layers skipped in an extra pass (Stability
    # recommends [7, 8, 9] for Medium), its scale and the share of the steps it runs between
    # start and stop; null: none, or with layers set the pipeline's defaults (2.8, 0.01, 0.2).
    skip_guidance_layers: list[int] | None = None
    skip_layer_guidance_scale: float | None = Field(None, ge=0.0)
    skip_layer_guidance_start: float | None = Field(None, ge=0.0, le=1.0)
    skip_layer_guidance_stop: float | None = Field(None, ge=0.0, le=1.0)

    @field_validator("skip_guidance_layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0 or len(set(v)) != len(v)):
            raise ValueError(
                f"generation.skip_guidance_layers={v}: give distinct transformer layer indices "
                "(>= 0), e.g. [7, 8, 9]; null for no skip-layer guidance"
            )
        return v

    @model_validator(mode="after")
    def _guidance_needs_layers(self):
        given = [k for k in SKIP_LAYER_GUIDANCE_KEYS if getattr(self, k) is not None]
        if given and self.skip_guidance_layers is None:
            raise ValueError(
                f"generation.{given[0]} is for skip-layer guidance: set "
                "generation.skip_guidance_layers too (e.g. [7, 8, 9]), or remove it"
            )
        start, stop = self.skip_layer_guidance_start, self.skip_layer_guidance_stop
        if start is not None and stop is not None and start >= stop:
            raise ValueError(
                f"generation.skip_layer_guidance_start={start} is not before "
                f"skip_layer_guidance_stop={stop}: skip-layer guidance would never run"
            )
        return self


# Keys a sweep axis may vary: a sweep point's coordinates but the seed (sweep.seeds varies it).
# Each is a per-sample generation parameter recorded in its own column.
SWEEPABLE = tuple(k for k in SWEEP_COORDINATES if k != "seed")


class SweepSpec(Section):
    seeds: int | list[int] = 1
    base_seed: int = 0
    axes: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"sweep.seeds={v}: give a count >= 1 or a list of seeds")
        if isinstance(v, list):
            if not v:
                raise ValueError("sweep.seeds=[] is empty: give a count >= 1 or a non-empty list")
            bad = [s for s in v if not 0 <= s < 2**63]
            if bad:
                raise ValueError(f"sweep.seeds has {bad[0]}, outside [0, 2**63)")
            if len(set(v)) != len(v):
                raise ValueError(
                    f"sweep.seeds={v} repeats a seed, which would generate duplicate images"
                )
        return v

    @field_validator("axes")
    @classmethod
    def _axes(cls, v: dict[str, list[Any]]):
        for key, values in v.items():
            if key not in SWEEPABLE:
                raise ValueError(
                    f"sweep.axes.{key} cannot be swept; sweepable keys are {', '.join(SWEEPABLE)}"
                )
            if not isinstance(values, list) or not values:
                raise ValueError(f"sweep.axes.{key}={values!r}: give a non-empty list of values")
            checked = []
            for x in values:
                # Validate each value exactly as the scalar key would be validated.
                if key == "scheduler":
                    checked.append(check_scheduler_name(x))
                    continue
                if key == "lora_scale":  # as model.loras[i].scale is
                    checked.append(check_lora_scale(x, "sweep.axes.lora_scale value"))
                    continue
                try:
                    checked.append(getattr(GenerationSpec(**{key: x}), key))
                except ValidationError as e:
                    msg = e.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"sweep.axes.{key} has {x!r}: {msg}") from None
            # Compared as read (4 and 4.0 are one true_cfg_scale): a repeat is a duplicate image.
            if len({json.dumps(x, sort_keys=True) for x in checked}) != len(values):
                raise ValueError(f"sweep.axes.{key}={values!r} repeats a value")
            v[key] = checked
        return v

    def num_seeds(self) -> int:
        return self.seeds if isinstance(self.seeds, int) else len(self.seeds)


class OutputSpec(Section):
    uri: str
    image_format: Literal["jpeg", "png", "webp"] = "jpeg"

    @field_validator("image_format", mode="before")
    @classmethod
    def _format_name(cls, v):
        aliases = {"jpg": "jpeg", "JPG": "jpeg", "JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
        if v in aliases:
            raise ValueError(
                f"did you mean {aliases[v]!r}? image_format is one of 'jpeg', 'png', 'webp'"
            )
        return v

    quality: int = Field(95, ge=1, le=100)
    # Keys are f"{shard:05d}{offset:04d}": four digits of offset, so at most 10,000 per shard.
    samples_per_shard: int = Field(1000, ge=1, le=10_000)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # Commits rely on the store refusing to create an object twice (S3 If-None-Match: *). A store
    # that ignores it is refused unless this says to go on without that guarantee; recorded in _job.json.
    allow_non_exclusive_commits: bool = False
    # A local uri on a multi-node cluster is refused unless this says every node mounts it at the
    # same path (NFS, Lustre, EFS): a shared mount cannot be told from a node's own disk by its path.
    shared_filesystem: bool = False


class SafetySpec(Section):
    detector: Literal[DETECTOR_NAMES] = "nsfw-detector"  # sdfleet.schemas.detectors
    # Detector weights: a local path, an s3:// copy (cached per node), or for clip-checker and
    # hf-classifier a hub id. nsfw-detector takes a Keras .h5 file or SavedModel folder;
    # laion-clip-nsfw the LAION NSFW head as safetensors, reading curation.clip_model's embedding.
    model: str | None = None
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    action: Literal["score", "drop", "blackout", "quarantine"] = "drop"
    unsafe_classes: list[str] | None = None
    # Pin the weights: sha256 of the file, or of a folder's files (as the rows' safety_model_sha256
    # records it); a worker refuses weights that hash otherwise.
    model_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("unsafe_classes")
    @classmethod
    def _classes(cls, v):
        if v is not None and not v:
            raise ValueError(
                "safety.unsafe_classes=[] would never flag anything; use action: score instead"
            )
        return v

    def resolved_unsafe_classes(self) -> list[str] | None:
        if self.unsafe_classes is not None:
            return self.unsafe_classes
        return DETECTORS[self.detector].default_unsafe_classes()

    def check_runnable(self) -> None:
        """Called before a job starts (not at parse time, so `sdfleet plan` works on any spec)."""
        if self.detector != NO_DETECTOR and not self.model:
            raise SpecError(
                f"safety.detector={self.detector!r} needs safety.model: the "
                f"{DETECTORS[self.detector].weights}; "
                "or set safety.detector: none to skip safety scoring"
            )


class ResourcesSpec(Section):
    # Images per pipeline call. "auto": on a GPU, the largest batch that fits its memory (measured
    # when the worker starts, at most 64); without a GPU, 8.
    batch_size: int | Literal["auto"] = "auto"
    # 0 asks for CPU workers (no GPU anywhere); fractions pack several workers on one GPU.
    gpus_per_worker: float = Field(1, ge=0)
    min_workers: int = Field(0, ge=0)
    max_workers: int = Field(8, ge=1)
    max_attempts: int = Field(3, ge=1)
    shard_timeout_s: float = Field(3600, gt=0)
    # torch CPU threads per worker; null = the node's CPUs divided among the workers it can hold.
    # CPU float results depend on it, so keep it fixed across the runs of one job on CPUs.
    cpu_threads: int | None = Field(None, ge=1)
    # Planning and spending. gpu_type picks a sustained throughput from jobs/gpu_throughput.yaml;
    # throughput_tflops overrides it with a figure you measured.
    gpu_type: str = "h100"
    throughput_tflops: float | None = Field(None, gt=0)
    gpu_hour_usd: float | None = Field(None, ge=0)
    # Stop starting new shards once the job's GPU-seconds (all runs) cost this much; rerun with
    # a higher cap to go on. Needs gpu_hour_usd.
    budget_usd: float | None = Field(None, gt=0)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value):
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024
        ):
            return value
        raise ValueError(f"batch_size must be an integer from 1 to 1024, or auto; got {value!r}")

    @model_validator(mode="after")
    def _budget_needs_price(self):
        if self.budget_usd is not None and self.gpu_hour_usd is None:
            raise ValueError(
                f"resources.budget_usd={self.budget_usd} needs resources.gpu_hour_usd, the price of one GPU-hour"
            )
        return self

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"resources.min_workers={self.min_workers} exceeds resources.max_workers={self.max_workers}"
            )
        return self


class EngineSpec(Section):
    """How the engine runs the pipeline. All but vae_tiling are lossless speed-ups: outputs stay
    within fp16 tolerance of plain diffusers.

    They are part of the fingerprint: a resumed job must make its images the same way.
    """

    # NHWC convolutions for the UNet and VAE: faster cuDNN kernels on tensor-core GPUs.
    channels_last: bool = True
    # One matmul for each attention's Q, K and V (diffusers' fuse_qkv_projections).
    fuse_qkv: bool = True
    # torch.compile of the UNet and the VAE decoder. "auto": on CUDA only (CPU compiles cost more
    # than they save on short jobs). Warm-up happens once per shape and is kept across shards.
    compile: Literal["auto", "on", "off"] = "auto"
    # Convert images to uint8 on the device and copy a quarter of the bytes to the host.
    uint8_on_device: bool = True
    # Where compiled graphs are saved for the next worker that compiles the same ones, which then
    # compiles nothing: "node" (the node-local cache), "off", or a folder or s3:// prefix shared by
    # a fleet. It holds compiled code: share it only where nothing but your jobs may write.
    compile_cache: str = "node"
    # Decode latents in overlapping tiles (diffusers' VAE tiling): the x4 upscaler's 2048² decode
    # then fits in a fraction of the memory. Not lossless (tiles are blended), so off unless asked
    # for, and recorded in each row's vae_tiling.
    vae_tiling: bool = False

    @field_validator("compile_cache")
    @classmethod
    def _compile_cache(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(
                "engine.compile_cache is empty; use node, off, a folder or an s3:// prefix"
            )
        return v


# The sections that reach storage, each with its own storage_options.
STORAGE_SECTIONS = ("model", "input", "output", "safety", "curation")


class JobSpec(Section):
    name: str = "sdfleet-job"
    model: ModelSpec = Field(default_factory=ModelSpec)
    input: InputSpec
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    output: OutputSpec
    safety: SafetySpec = Field(default_factory=SafetySpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    curation: CurationSpec = Field(default_factory=CurationSpec)

    @model_validator(mode="after")
    def _fits_the_task(self):
        """The input columns and generation keys the task takes, and none it would ignore. (That an
        image task has its images, from input.image_column or an earlier output, the planner checks.)"""
        name, task = self.model.task, TASKS[self.model.task]
        inp, gen, axes = self.input, self.generation, self.sweep.axes
        if not task.image and inp.image_column:
            raise ValueError(
                f"input.image_column={inp.image_column!r} is for the image tasks; model.task={name} "
                "takes none (set model.task: image-to-image, inpaint, depth-to-image or upscale)"
            )
        if task.mask and not inp.mask_column:
            raise ValueError(
                f"model.task={name} needs input.mask_column: the column of masks (white = "
                f"repaint) beside input.image_column in the input Parquet ({MASKS_NOT_FROM_AN_OUTPUT})"
            )
        if not task.mask and inp.mask_column:
            raise ValueError(
                f"input.mask_column={inp.mask_column!r} is for model.task=inpaint, not {name}"
            )
        for key in TASK_PARAMETERS:
            if key not in task.parameters and (getattr(gen, key) is not None or key in axes):
                takers = ", ".join(n for n, t in TASKS.items() if key in t.parameters)
                raise ValueError(
                    f"generation.{key} is for model.task {takers}; model.task={name} has no {key}"
                )
        cur = self.curation
        if DETECTORS[self.safety.detector].needs_clip_model and not cur.clip_model:
            raise ValueError(needs_clip_model_error(self.safety.detector))
        if cur.best_of_n:
            if self.sweep.seeds != 1:
                raise ValueError(
                    f"sweep.seeds={self.sweep.seeds}: with curation.images_per_prompt the seeds are the "
                    f"candidates, {cur.candidates} per prompt (curation.max_candidates); leave "
                    "sweep.seeds at 1"
                )
            if self.output.samples_per_shard % cur.candidates:
                n = cur.candidates
                raise ValueError(
                    f"output.samples_per_shard={self.output.samples_per_shard} is not a multiple of "
                    f"curation.max_candidates={n}: a prompt's candidates must share a shard; use "
                    f"{max(n, self.output.samples_per_shard // n * n)}"
                )
        if task.image:
            for key in ("width", "height"):
                if getattr(gen, key) is not None or key in axes:
                    raise ValueError(
                        f"generation.{key}: model.task={name} makes each image at its input "
                        f"image's size{' times 4' if task.scale == 4 else ''}; remove {key} "
                        "(or resize the input images)"
                    )
        return self

    @model_validator(mode="after")
    def _lora_sweep_has_one_lora(self):
        if "lora_scale" in self.sweep.axes and len(self.model.loras) != 1:
            raise ValueError(
                f"sweep.axes.lora_scale sets the scale of the job's one LoRA, but model.loras has "
                f"{len(self.model.loras)}: give exactly one (or sweep by running one job per scale)"
            )
        return self

    def fingerprint_fields(self) -> dict[str, Any]:
        """Every key that changes what is written, flattened to dotted names."""
        return fingerprint_fields(self.model_dump(mode="json"))

    def fingerprint(
        self,
        input_files: list[dict[str, Any]] | None = None,
        content: dict[str, Any] | None = None,
    ) -> str:
        return fingerprint(self.fingerprint_fields(), input_files, content)

    def redacted(self) -> dict[str, Any]:
        """The spec as a dict with credentials masked: safe for logs, _job.json and the dataset card."""
        data = self.model_dump(mode="json")
        for section in STORAGE_SECTIONS:
            data[section]["storage_options"] = redact(data[section]["storage_options"])
        return data

    def storage_options(self) -> list[dict[str, Any]]:
        """Every section's storage_options (for masking their secrets in logs)."""
        return [getattr(self, section).storage_options for section in STORAGE_SECTIONS]


# ---------------------------------------------------------------- loading


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, data, source)) from None


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read spec {str(path)!r}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    for assignment in overrides:
        apply_override(data, assignment, JobSpec)
    spec = parse_spec(data, str(path))
    keys = tuple(override_key(a) for a in overrides)
    return resolve_relative_paths(spec, path.absolute().parent, command_line_keys=keys)
