"""What a checkpoint's family asks of a job spec, once the checkpoint is read: the keys it refuses
(each in one line naming the family and the key) and the defaults it fills in where the spec set
none. Pre-flight runs both before any worker starts, so the plan, the fingerprint and every row
name the values the pipeline is called with.

SD2 and SDXL ask nothing (their specs pass through unchanged); FLUX.1 is guidance-distilled,
flow-matching and bfloat16 (`sdfleet.schemas.family_flux`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdfleet.schemas.errors import SpecError
from sdfleet.schemas.families import Family, Variant

if TYPE_CHECKING:
    from sdfleet.schemas.spec import JobSpec


def kind_name(family: Family, variant: Variant | None) -> str:
    """The checkpoint kind for messages: 'flux (FLUX.1-schnell)', or the family alone."""
    return f"{family.name} ({variant.name})" if variant else family.name


def sequence_limit(family: Family, variant: Variant | None) -> int | None:
    """The most T5 tokens the checkpoint may read; None: the family has no T5 encoder."""
    encoder = family.sequence_encoder
    if encoder is None:
        return None
    limit = variant.max_sequence_limit if variant else None
    return min(limit or encoder.max_tokens, encoder.max_tokens)


def sequence_length(family: Family, variant: Variant | None, requested: int | None) -> int | None:
    """The T5 tokens a call reads: the spec's, else the checkpoint kind's default, else the
    encoder's limit; None for a family without a T5 encoder."""
    limit = sequence_limit(family, variant)
    if limit is None:
        return None
    return requested or (variant.max_sequence_length if variant else None) or limit


def check_family_spec(spec: JobSpec, family: Family, variant: Variant | None) -> None:
    """The keys the checkpoint's family cannot run as written; a SpecError names the family, the
    checkpoint kind and the key."""
    _check_dtype_and_scheduler(spec, family, variant)
    _check_sequence_length(spec, family, variant)
    _check_guidance(spec, family, variant)


def _check_dtype_and_scheduler(spec: JobSpec, family: Family, variant: Variant | None) -> None:
    model, kind = spec.model, kind_name(family, variant)
    why = family.refused_dtypes.get(model.dtype)
    if why and "dtype" in model.model_fields_set:
        raise SpecError(f"model.dtype={model.dtype}: model.source is a {kind} checkpoint: {why}")
    names = [model.scheduler] if "scheduler" in model.model_fields_set else []
    names += spec.sweep.axes.get("scheduler", [])
    prefix = family.scheduler_prefix
    for name in names:
        if prefix and name is not None and not name.startswith(prefix):
            raise SpecError(
                f"model.scheduler={name}: a {kind} checkpoint is a flow-matching model and runs "
                f"{prefix}* schedulers only; remove model.scheduler to run the checkpoint's own"
            )


def _check_sequence_length(spec: JobSpec, family: Family, variant: Variant | None) -> None:
    requested = spec.generation.max_sequence_length
    if requested is None:
        return
    limit, kind = sequence_limit(family, variant), kind_name(family, variant)
    if limit is None:
        raise SpecError(
            f"generation.max_sequence_length={requested}: {kind} has no T5 encoder to read it; "
            "remove it"
        )
    if requested > limit:
        raise SpecError(
            f"generation.max_sequence_length={requested}: a {kind} checkpoint's T5 encoder reads "
            f"at most {limit} tokens; use {limit} or less"
        )


def _check_guidance(spec: JobSpec, family: Family, variant: Variant | None) -> None:
    """Guidance a guidance-distilled family would silently not do: a negative prompt without true
    CFG, true CFG where the pipeline has none, guidance on a checkpoint that takes none."""
    gen, axes, kind = spec.generation, spec.sweep.axes, kind_name(family, variant)
    if gen.true_cfg_scale != 1.0 and not family.true_cfg:
        raise SpecError(
            f"generation.true_cfg_scale={gen.true_cfg_scale}: {kind} has classifier-free guidance "
            "of its own (generation.guidance_scale); remove true_cfg_scale"
        )
    if family.cfg or not family.true_cfg:
        return
    negative = _negative_prompt_key(spec)
    if negative and gen.true_cfg_scale <= 1.0:
        raise SpecError(
            f"{negative}: a {kind} checkpoint is guidance-distilled (no unconditional pass), so a "
            "negative prompt does nothing unless generation.true_cfg_scale > 1 (true CFG: a "
            "second transformer pass per step); set true_cfg_scale (e.g. 4.0) or remove it"
        )
    if variant is not None and not variant.guidance:
        set_scale = "guidance_scale" in gen.model_fields_set and gen.guidance_scale != 0.0
        if set_scale or "guidance_scale" in axes:
            given = axes.get("guidance_scale", gen.guidance_scale)
            key = "sweep.axes" if "guidance_scale" in axes else "generation"
            raise SpecError(
                f"{key}.guidance_scale={given}: a {kind} checkpoint takes no guidance (it is "
                "timestep-distilled; its transformer has no guidance embedding and ignores it); "
                "remove guidance_scale, or set generation.true_cfg_scale > 1 with a negative "
                "prompt for true CFG"
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


def with_family_defaults(spec: JobSpec, family: Family, variant: Variant | None) -> JobSpec:
    """The spec with what the checkpoint's family runs where the spec set nothing: its dtype, its
    checkpoint's own scheduler (a flow-matching family), its kind's steps, guidance and T5
    tokens. Unchanged for SD2 and SDXL."""
    model, gen = spec.model, spec.generation
    model_update, gen_update = {}, {}
    if "dtype" not in model.model_fields_set and model.dtype in family.refused_dtypes:
        model_update["dtype"] = family.dtype
    if family.scheduler_prefix and "scheduler" not in model.model_fields_set:
        model_update["scheduler"] = None
    if variant is not None:
        for key in ("num_inference_steps", "guidance_scale"):
            default = getattr(variant, key)
            if default is not None and key not in gen.model_fields_set:
                gen_update[key] = default
    tokens = sequence_length(family, variant, gen.max_sequence_length)
    if tokens != gen.max_sequence_length:
        gen_update["max_sequence_length"] = tokens
    if not (model_update or gen_update):
        return spec
    return spec.model_copy(
        update={
            "model": model.model_copy(update=model_update),
            "generation": gen.model_copy(update=gen_update),
        }
    )
