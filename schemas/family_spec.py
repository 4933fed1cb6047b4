"""What a checkpoint's family asks of a job spec, once the checkpoint is read, and what its calls
and rows carry of its own keys (generation.max_sequence_length, model.drop_t5, skip-layer
guidance, true CFG, the flow-matching scheduler):

- `check_family_spec`: the keys the checkpoint cannot run as written, each refused in one line
  naming the checkpoint kind and the key, before any worker starts;
- `with_family_defaults`: the one place pre-flight fills in what the checkpoint runs where the spec
  set nothing (dtype, its own scheduler, its kind's steps and guidance, T5's sequence length,
  skip-layer guidance's scale, start and stop), so that the plan, the fingerprint and every row
  name the values the pipeline is called with;
- `call_inputs`: the family's keywords every pipeline call of the job passes, by diffusers' names;
- `record`: what each row records of them (schemas.rows' family columns).

Pure: pre-flight reads the checkpoint's configs, the engine the loaded pipeline's, and both ask
the same functions. SD2 and SDXL ask nothing (their specs, calls and rows stay as they were);
SD3.5 (`family_sd3`) and FLUX.1 (`family_flux`) are flow-matching T5 families.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdfleet.schemas.errors import SpecError
from sdfleet.schemas.families import Family
from sdfleet.schemas.tasks import TEXT_TO_IMAGE

if TYPE_CHECKING:
    from sdfleet.schemas.spec import GenerationSpec, JobSpec

# The family's keys as diffusers' keywords, the spec's keys and the rows' columns name them.
MAX_SEQUENCE_LENGTH = "max_sequence_length"
SKIP_GUIDANCE_LAYERS = "skip_guidance_layers"
# Skip-layer guidance's other keywords, as StableDiffusion3Pipeline names them (and the spec).
SKIP_LAYER_GUIDANCE_KEYS = (
    "skip_layer_guidance_scale",
    "skip_layer_guidance_start",
    "skip_layer_guidance_stop",
)
TRUE_CFG_SCALE = "true_cfg_scale"
DROP_T5 = "drop_t5"
# The flow-matching scheduler as it ran: its static `shift` (SD3.5's 3.0; null where it shifts by
# the image instead), and the `mu` a dynamically shifting family's call computed from the image's
# token count and the scheduler's config (FLUX.1-dev's; null where the scheduler does not read it).
SCHEDULER_SHIFT = "scheduler_shift"
SCHEDULER_MU = "scheduler_mu"
# The family keys a sweep may vary per sample (sweep.axes): each is at once a call keyword, a
# GenerationParams field and a row column, so one name serves all three.
SAMPLE_KEYS = (MAX_SEQUENCE_LENGTH, TRUE_CFG_SCALE)


# ------------------------------------------------------------------ calls and rows


def call_inputs(family: Family, denoiser_config: Mapping, gen: GenerationSpec | None) -> dict:
    """The family's own keywords every pipeline call of the job passes: T5's sequence length (the
    spec's, else the checkpoint's variant's default), where the job sets skip_guidance_layers
    skip-layer guidance with the pipeline's defaults filled in, and true CFG's scale. Empty for a
    family without them (SD2's and SDXL's calls stay as they were)."""
    inputs: dict[str, Any] = {}
    given = gen.max_sequence_length if gen is not None else None
    length = family.sequence_length(family.variant(denoiser_config), given)
    if length is not None:
        inputs[MAX_SEQUENCE_LENGTH] = length
    layers = gen.skip_guidance_layers if gen is not None else None
    if family.skip_layer_guidance and layers:
        inputs[SKIP_GUIDANCE_LAYERS] = list(layers)
        for key, default in family.skip_layer_guidance.items():
            given = getattr(gen, key)
            inputs[key] = default if given is None else given
    if family.true_cfg and family.takes_negative_prompt(family.variant(denoiser_config)):
        inputs[TRUE_CFG_SCALE] = gen.true_cfg_scale if gen is not None else 1.0
    return inputs


def per_sample(values: Mapping, params: Any) -> dict:
    """`values` (the job's `call_inputs`, or its `record`) with the sample's own value of each key
    a sweep may vary (SAMPLE_KEYS), where the family has the key and the sample (GenerationParams)
    sets it: what that sample's call passes, and what its row records."""
    out = dict(values)
    for key in SAMPLE_KEYS:
        given = getattr(params, key, None)
        if key in out and given is not None:
            out[key] = given
    return out


def record(family: Family, inputs: Mapping, drop_t5: bool, scheduler_shift: float | None) -> dict:
    """What each row of the family records of its job's own inputs (schemas.rows' family columns,
    in their order, but the per-call scheduler_mu): the call's T5 sequence length, whether T5 was
    dropped, skip-layer guidance (null where the job has none), true CFG's scale, the
    flow-matching scheduler's static shift as it ran."""
    row: dict[str, Any] = {}
    if family.sequence_encoder is not None:
        row[MAX_SEQUENCE_LENGTH] = inputs.get(MAX_SEQUENCE_LENGTH)
    if family.droppable_encoder is not None:
        row[DROP_T5] = bool(drop_t5)
    if family.skip_layer_guidance:
        row.update({k: inputs.get(k) for k in (SKIP_GUIDANCE_LAYERS, *SKIP_LAYER_GUIDANCE_KEYS)})
    if family.true_cfg:
        # 1.0 (none) where the checkpoint's pipeline takes no true_cfg_scale (FLUX.1 Fill's).
        row[TRUE_CFG_SCALE] = inputs.get(TRUE_CFG_SCALE, 1.0)
    if family.scheduler_prefix is not None:
        row[SCHEDULER_SHIFT] = scheduler_shift
    return row


# ------------------------------------------------------------------ pre-flight: defaults


def with_family_defaults(
    spec: JobSpec, family: Family, denoiser_config: Mapping, scheduler_class: str | None = None
) -> JobSpec:
    """The spec with what the checkpoint runs where the spec set nothing: the family's dtype where
    the spec's default is one it refuses; for a flow-matching family the checkpoint's own
    scheduler (`scheduler_class`, its scheduler_config.json's; None: the engine runs the loaded
    one); the checkpoint kind's steps and guidance; the family's call inputs (`call_inputs`).
    The spec itself for SD2 and SDXL."""
    model, gen = spec.model, spec.generation
    variant = family.variant(denoiser_config)
    model_update: dict[str, Any] = {}
    if "dtype" not in model.model_fields_set and model.dtype in family.refused_dtypes:
        model_update["dtype"] = family.dtype
    if family.scheduler_prefix is not None and "scheduler" not in model.model_fields_set:
        model_update["scheduler"] = scheduler_class
    gen_update = {
        key: getattr(variant, key)
        for key in ("num_inference_steps", "guidance_scale")
        if variant is not None
        and getattr(variant, key) is not None
        and key not in gen.model_fields_set
    }
    inputs = call_inputs(family, denoiser_config, gen)
    gen_update.update({k: v for k, v in inputs.items() if getattr(gen, k) != v})
    if not (model_update or gen_update):
        return spec
    return spec.model_copy(
        update={
            "model": model.model_copy(update=model_update),
            "generation": gen.model_copy(update=gen_update),
        }
    )


# ------------------------------------------------------------------ pre-flight: refusals


def check_family_spec(spec: JobSpec, family: Family, denoiser_config: Mapping, source: str) -> None:
    """The family's keys fit the checkpoint (model.source `source`, of `family`, its denoiser's
    config.json read); else a SpecError naming the checkpoint kind and the key, before any worker
    starts."""
    kind = family.kind(family.variant(denoiser_config))
    _check_dtype_and_scheduler(spec, family, kind)
    if spec.model.drop_t5 and family.droppable_encoder is None:
        raise SpecError(
            f"model.drop_t5: model.source {source} is {kind}, which has no T5 encoder to drop "
            "(SD3.5 checkpoints have one); remove model.drop_t5"
        )
    _check_sequence_length(spec, family, denoiser_config)
    _check_skip_layer_guidance(spec, family, denoiser_config, source)
    _check_guidance(spec, family, denoiser_config)


def _check_dtype_and_scheduler(spec: JobSpec, family: Family, kind: str) -> None:
    """A dtype the family cannot run, named in the spec; a flow-matching family gets one of its
    schedulers: model.scheduler where the spec names one, and every swept scheduler."""
    model = spec.model
    why = family.refused_dtypes.get(model.dtype)
    if why and "dtype" in model.model_fields_set:
        raise SpecError(f"model.dtype={model.dtype}: model.source is {kind}: {why}")
    prefix = family.scheduler_prefix
    if prefix is None:
        return
    given = [("model.scheduler", model.scheduler)] if "scheduler" in model.model_fields_set else []
    given += [("sweep.axes.scheduler", name) for name in spec.sweep.axes.get("scheduler", [])]
    for key, name in given:
        if name is not None and not name.startswith(prefix):
            raise SpecError(
                f"{key}={name}: {kind} is a flow-matching model and runs {prefix}* schedulers "
                f"only (e.g. {prefix}EulerDiscreteScheduler); use one, or leave model.scheduler "
                "out to run the checkpoint's own"
            )


def _check_sequence_length(spec: JobSpec, family: Family, denoiser_config: Mapping) -> None:
    """generation.max_sequence_length and every swept value: a family with T5, within its
    checkpoint kind's limit."""
    variant = family.variant(denoiser_config)
    limits, kind = family.sequence_limits(variant), family.kind(variant)
    given = _set_or_swept(spec, MAX_SEQUENCE_LENGTH, None)
    if given and limits is None:
        raise SpecError(
            f"{given[0]}={given[1]}: {kind} has no T5 encoder to read it; remove {given[0]}"
        )
    for key, given in _given(spec, MAX_SEQUENCE_LENGTH, None):
        if given > limits[1]:
            raise SpecError(
                f"{key}={given}: {kind}'s T5 encoder reads at most {limits[1]} tokens; use "
                f"{limits[1]} or less (default {limits[0]})"
            )


def _set_or_swept(spec: JobSpec, key: str, unset: Any) -> tuple[str, Any] | None:
    """(sweep.axes.<key>, its values) where the job sweeps the key, else (generation.<key>, its
    value) where that is not `unset`; None where the job leaves the key alone."""
    if key in spec.sweep.axes:
        return f"sweep.axes.{key}", spec.sweep.axes[key]
    value = getattr(spec.generation, key)
    return None if value == unset else (f"generation.{key}", value)


def _given(spec: JobSpec, key: str, unset: Any) -> list[tuple[str, Any]]:
    """(the spec key, its value) for generation.<key> where it is not `unset`, then for each value
    of sweep.axes.<key>: every value of the key some sample of the job runs with."""
    value = getattr(spec.generation, key)
    given = [] if value == unset else [(f"generation.{key}", value)]
    return given + [(f"sweep.axes.{key}", v) for v in spec.sweep.axes.get(key, [])]


def _check_skip_layer_guidance(
    spec: JobSpec, family: Family, denoiser_config: Mapping, source: str
) -> None:
    gen = spec.generation
    layers = gen.skip_guidance_layers
    if layers is None:
        return
    variant = family.variant(denoiser_config)
    key = f"generation.skip_guidance_layers={layers}"
    if not family.skip_layer_guidance or (variant is not None and not variant.skip_guidance_layers):
        has = "SD3.5 Medium has it, e.g. [7, 8, 9]"
        raise SpecError(
            f"{key}: model.source {source} is {family.kind(variant)}, which has no skip-layer "
            f"guidance ({has}); remove generation.skip_guidance_layers"
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
            f"{key}: model.source {source}'s transformer has {depth} layers (0 to {depth - 1}); "
            f"layer {max(layers)} is not one of them"
        )
    scales = [gen.guidance_scale, *spec.sweep.axes.get("guidance_scale", [])]
    if min(scales) <= 1:
        raise SpecError(
            f"{key}: skip-layer guidance runs only with classifier-free guidance, and "
            f"guidance_scale={min(scales)} has none; use a guidance_scale above 1"
        )


def _check_guidance(spec: JobSpec, family: Family, denoiser_config: Mapping) -> None:
    """Guidance a guidance-distilled family would silently not do: a negative prompt without true
    CFG, true CFG where the pipeline has none, guidance on a checkpoint that takes none."""
    gen, axes = spec.generation, spec.sweep.axes
    variant = family.variant(denoiser_config)
    kind = family.kind(variant)
    given = _set_or_swept(spec, TRUE_CFG_SCALE, 1.0)
    if not family.takes_negative_prompt(variant):
        key = _negative_prompt_key(spec) or (given and f"{given[0]}={given[1]}")
        if key:
            name = key.split("=")[0]
            raise SpecError(
                f"{key}: {kind}'s pipeline ({', '.join(family.tasks(variant).values())}) takes "
                f"no negative prompt, and so no true CFG; remove {name}"
            )
    if given and not family.true_cfg:
        raise SpecError(
            f"{given[0]}={given[1]}: {kind} has classifier-free guidance of its own "
            f"(generation.guidance_scale); remove {given[0]}"
        )
    if family.cfg or not family.true_cfg:
        return
    _check_negative_prompt(spec, kind)
    if variant is not None and not variant.guidance:
        set_scale = "guidance_scale" in gen.model_fields_set and gen.guidance_scale != 0.0
        if set_scale or "guidance_scale" in axes:
            given = axes.get("guidance_scale", gen.guidance_scale)
            key = "sweep.axes" if "guidance_scale" in axes else "generation"
            raise SpecError(
                f"{key}.guidance_scale={given}: {kind} takes no guidance (it is "
                "timestep-distilled; its transformer has no guidance embedding and ignores it); "
                "remove guidance_scale, or set generation.true_cfg_scale > 1 with a negative "
                "prompt for true CFG"
            )


def _check_negative_prompt(spec: JobSpec, kind: str) -> None:
    """A guidance-distilled family reads a negative prompt only with true CFG: every
    true_cfg_scale the job runs (generation's, or each swept value) above 1. A sweep that holds
    1.0 beside a negative prompt is refused too: its 1.0 points would ignore the prompt, the same
    images as a job without it."""
    negative = _negative_prompt_key(spec)
    if not negative:
        return
    gen, swept = spec.generation, spec.sweep.axes.get(TRUE_CFG_SCALE)
    if swept is None and gen.true_cfg_scale <= 1.0:
        raise SpecError(
            f"{negative}: {kind} is guidance-distilled (no unconditional pass), so a negative "
            "prompt does nothing unless generation.true_cfg_scale > 1 (true CFG: a second "
            "transformer pass per step); set true_cfg_scale (e.g. 4.0) or remove it"
        )
    unguided = [v for v in swept or [] if v <= 1.0]
    if unguided:
        raise SpecError(
            f"sweep.axes.true_cfg_scale has {unguided[0]}: with {negative}, {kind} is "
            "guidance-distilled and reads a negative prompt only with true_cfg_scale > 1, so "
            "those points would ignore it (the images of a job without it); sweep values above "
            "1 only, or run the no-true-CFG images as a job without the negative prompt"
        )


def _negative_prompt_key(spec: JobSpec) -> str | None:
    """The key that gives the job negative prompts, or None."""
    if spec.generation.negative_prompt:
        return f"generation.negative_prompt={spec.generation.negative_prompt!r}"
    if any(spec.sweep.axes.get("negative_prompt", [])):
        return "sweep.axes.negative_prompt"
    if spec.input.negative_prompt_column:
        return f"input.negative_prompt_column={spec.input.negative_prompt_column!r}"
    return None
