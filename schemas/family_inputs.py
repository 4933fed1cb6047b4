"""The keys a model family adds to a job (generation.max_sequence_length, model.drop_t5,
skip-layer guidance): their checks against the checkpoint before any worker starts, the keywords
every pipeline call passes (the spec's values, or the family's and variant's defaults), and what
each row records of them. Pure: pre-flight reads the checkpoint's configs, the engine the loaded
pipeline's, and both ask the same functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdfleet.schemas.errors import SpecError
from sdfleet.schemas.families import Family
from sdfleet.schemas.tasks import TEXT_TO_IMAGE

if TYPE_CHECKING:
    from sdfleet.schemas.spec import GenerationSpec, JobSpec

MAX_SEQUENCE_LENGTH = "max_sequence_length"
SKIP_GUIDANCE_LAYERS = "skip_guidance_layers"
# Skip-layer guidance's other keywords, as StableDiffusion3Pipeline names them (and the spec).
SKIP_LAYER_GUIDANCE_KEYS = (
    "skip_layer_guidance_scale",
    "skip_layer_guidance_start",
    "skip_layer_guidance_stop",
)
DROP_T5 = "drop_t5"
SCHEDULER_SHIFT = "scheduler_shift"


def call_inputs(family: Family, denoiser_config: Mapping, gen: GenerationSpec | None) -> dict:
    """The family's own keywords every pipeline call of the job passes, by diffusers' name: T5's
    sequence length (the spec's, else the checkpoint's variant's default) and, where the job sets
    skip_guidance_layers, skip-layer guidance with the pipeline's defaults filled in. Empty for a
    family without them (SD2's and SDXL's calls stay as they were)."""
    inputs: dict[str, Any] = {}
    limits = family.sequence_limits(family.variant(denoiser_config))
    if limits is not None:
        given = gen.max_sequence_length if gen is not None else None
        inputs[MAX_SEQUENCE_LENGTH] = given or limits[0]
    layers = gen.skip_guidance_layers if gen is not None else None
    if family.skip_layer_guidance and layers:
        inputs[SKIP_GUIDANCE_LAYERS] = list(layers)
        for key, default in family.skip_layer_guidance.items():
            given = getattr(gen, key)
            inputs[key] = default if given is None else given
    return inputs


def record(family: Family, inputs: Mapping, drop_t5: bool, scheduler_shift: float | None) -> dict:
    """What each row of the family records of its own inputs (schemas.rows.family_fields' columns,
    in their order): the call's T5 sequence length, whether T5 was dropped, skip-layer guidance
    (null where the job has none), the flow-matching scheduler's shift as it ran."""
    row: dict[str, Any] = {}
    if family.sequence_encoder is not None:
        row[MAX_SEQUENCE_LENGTH] = inputs.get(MAX_SEQUENCE_LENGTH)
    if family.droppable_encoder is not None:
        row[DROP_T5] = bool(drop_t5)
    if family.skip_layer_guidance:
        row.update({k: inputs.get(k) for k in (SKIP_GUIDANCE_LAYERS, *SKIP_LAYER_GUIDANCE_KEYS)})
    if family.scheduler_prefix is not None:
        row[SCHEDULER_SHIFT] = scheduler_shift
    return row


def check_family_keys(spec: JobSpec, family: Family, denoiser_config: Mapping, source: str) -> None:
    """The family's keys fit the checkpoint (model.source `source`, of `family`, its denoiser's
    config.json read); else a SpecError naming the family and the key, before any worker starts."""
    what = _kind(family, denoiser_config)
    if spec.model.drop_t5 and family.droppable_encoder is None:
        raise SpecError(
            f"model.drop_t5: model.source {source} is {what} checkpoint, which has no T5 encoder "
            "to drop (SD3.5 checkpoints have one); remove model.drop_t5"
        )
    _check_sequence_length(spec.generation, family, denoiser_config, f"{what} checkpoint")
    _check_skip_layer_guidance(spec, family, denoiser_config, f"model.source {source}")
    _check_scheduler(spec, family)


def _kind(family: Family, denoiser_config: Mapping) -> str:
    """'an sd3' or 'an sd3.5-large (sd3)': the family, and the variant where one matches."""
    variant = family.variant(denoiser_config)
    return f"an {variant.name} ({family.name})" if variant else f"an {family.name}"


def _check_sequence_length(
    gen: GenerationSpec, family: Family, denoiser_config: Mapping, what: str
) -> None:
    given = gen.max_sequence_length
    if given is None:
        return
    limits = family.sequence_limits(family.variant(denoiser_config))
    if limits is None:
        raise SpecError(
            f"generation.max_sequence_length={given}: {what} has no T5 encoder reading a "
            "sequence length; remove generation.max_sequence_length"
        )
    if given > limits[1]:
        raise SpecError(
            f"generation.max_sequence_length={given}: the T5 encoder of {what} reads at most "
            f"{limits[1]} tokens; use {limits[1]} or less (default {limits[0]})"
        )


def _check_skip_layer_guidance(
    spec: JobSpec, family: Family, denoiser_config: Mapping, named: str
) -> None:
    gen = spec.generation
    layers = gen.skip_guidance_layers
    if layers is None:
        return
    key, what = f"generation.skip_guidance_layers={layers}", _kind(family, denoiser_config)
    variant = family.variant(denoiser_config)
    if not family.skip_layer_guidance or (variant is not None and not variant.skip_guidance_layers):
        has = "SD3.5 Medium has it, e.g. [7, 8, 9]"
        raise SpecError(
            f"{key}: {named} is {what} checkpoint, which has no skip-layer guidance ({has}); "
            "remove generation.skip_guidance_layers"
        )
    if spec.model.task != TEXT_TO_IMAGE:
        raise SpecError(
            f"{key}: {family.name}'s {spec.model.task} pipeline "
            f"({family.pipeline(spec.model.task)}) has no skip-layer guidance; it is for "
            "model.task=text-to-image"
        )
    depth = denoiser_config.get("num_layers")
    if isinstance(depth, int) and max(layers) >= depth:
        raise SpecError(
            f"{key}: {named}'s transformer has {depth} layers (0 to {depth - 1}); "
            f"layer {max(layers)} is not one of them"
        )
    scales = [gen.guidance_scale, *spec.sweep.axes.get("guidance_scale", [])]
    if min(scales) <= 1:
        raise SpecError(
            f"{key}: skip-layer guidance runs only with classifier-free guidance, and "
            f"guidance_scale={min(scales)} has none; use a guidance_scale above 1"
        )


def _check_scheduler(spec: JobSpec, family: Family) -> None:
    """A family whose denoiser works with one kind of scheduler only (flow matching) gets one of
    them: model.scheduler and every swept scheduler."""
    prefix = family.scheduler_prefix
    if prefix is None:
        return
    given = [("model.scheduler", spec.model.scheduler)]
    given += [("sweep.axes.scheduler", name) for name in spec.sweep.axes.get("scheduler", [])]
    for key, name in given:
        if name is not None and not name.startswith(prefix):
            raise SpecError(
                f"{key}={name}: {family.name} checkpoints are denoised by {prefix}* schedulers "
                f"only (e.g. {prefix}EulerDiscreteScheduler); use one, or null for the "
                "checkpoint's own"
            )


def unset_scheduler(spec: JobSpec, family: Family) -> bool:
    """The job leaves model.scheduler at the spec's default, and the family runs its own kind of
    scheduler only: the checkpoint's own scheduler runs (pre-flight writes its class in)."""
    return family.scheduler_prefix is not None and "scheduler" not in spec.model.model_fields_set
