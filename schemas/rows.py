"""The prompt-row contract (input) and the output-row contract (one Parquet row per planned sample)."""

from __future__ import annotations

import pyarrow as pa

from sdfleet.schemas.families import Family
from sdfleet.schemas.family_spec import (
    DROP_T5,
    MAX_SEQUENCE_LENGTH,
    SCHEDULER_MU,
    SCHEDULER_SHIFT,
    SKIP_GUIDANCE_LAYERS,
    SKIP_LAYER_GUIDANCE_KEYS,
    TRUE_CFG_SCALE,
)
from sdfleet.schemas.passthrough import PassthroughClash

STATUS_OK = "ok"
STATUS_FILTERED = "filtered"
STATUS_FAILED = "failed"
# Curation (curation.*): an image under a gate, one too close to an image already kept for its
# prompt, and a candidate slot that was not needed (its prompt had its images) and so not generated.
STATUS_REJECTED = "rejected"
STATUS_DUPLICATE = "duplicate"
STATUS_SKIPPED = "skipped"
STATUSES = (
    STATUS_OK,
    STATUS_FILTERED,
    STATUS_FAILED,
    STATUS_REJECTED,
    STATUS_DUPLICATE,
    STATUS_SKIPPED,
)

# Prompt rows: the prompt and negative prompt columns hold text, as strings or as UTF-8 bytes
# (a row whose bytes are not UTF-8 is recorded failed, not fatal); the id column may be any
# scalar (ints are common) and is stringified. Image and mask columns hold encoded images
# (binary) or URIs (strings): the same types.
TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())

NSFW_SCORES_TYPE = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))

OUTPUT_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("sample_id", pa.string()),
    pa.field("shard_id", pa.int64(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("prompt_id", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    # CLIP reads at most 77 tokens; longer prompts are generated truncated and say so here.
    pa.field("prompt_tokens", pa.int64()),
    pa.field("prompt_truncated", pa.bool_()),
    pa.field("seed", pa.int64()),
    pa.field("generator_device", pa.string()),
    pa.field("model_source", pa.string()),
    pa.field("model_revision", pa.string()),
    # What model.source was by content as the driver resolved it (sdfleet.schemas.content): the
    # hub commit, or a hash of an s3:// mirror's listing or a local folder's files.
    pa.field("model_hash", pa.string()),
    pa.field("scheduler", pa.string()),
    pa.field("num_inference_steps", pa.int64()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    # model.task, and the image tasks' inputs and parameters (null for text-to-image): the input
    # image's and mask's bytes by sha256, where they were read from (null: inline in the input's
    # Parquet), the strength or noise_level used.
    pa.field("task", pa.string()),
    pa.field("input_image_sha256", pa.string()),
    pa.field("input_image_uri", pa.string()),
    pa.field("mask_image_sha256", pa.string()),
    pa.field("mask_image_uri", pa.string()),
    pa.field("strength", pa.float64()),
    pa.field("noise_level", pa.int64()),
    # engine.vae_tiling, which changes pixels.
    pa.field("vae_tiling", pa.bool_()),
    # When the input is an earlier sdfleet output: which one, the source row's key, and the sha256
    # of its image as that output recorded it (the input image's bytes, checked on reading).
    pa.field("source_output", pa.string()),
    pa.field("source_key", pa.string()),
    pa.field("source_image_sha256", pa.string()),
    pa.field("dtype", pa.string()),
    pa.field("image_format", pa.string()),
    pa.field("image_sha256", pa.string()),
    pa.field("nsfw_score", pa.float32()),
    pa.field("nsfw_scores", NSFW_SCORES_TYPE),
    pa.field("safety_detector", pa.string()),
    pa.field("safety_threshold", pa.float64()),
    pa.field("safety_action", pa.string()),
    # Extensions: which detector weights scored the image, and whether it crossed the threshold
    # (with action `blackout` a flagged row stays `ok` and its tar image is black).
    pa.field("safety_model_sha256", pa.string()),
    pa.field("safety_flagged", pa.bool_()),
    # curation.*: CLIPScore against the prompt (as `sdfleet score` computes it), the LAION aesthetic
    # predictor's score, the LAION CLIP NSFW head's probability of unsafe; null where not configured.
    pa.field("clip_score", pa.float32()),
    pa.field("aesthetic_score", pa.float32()),
    pa.field("punsafe", pa.float32()),
    # Best-of-N: the row's candidate slot (0 = its prompt's first seed), the gates a rejected image
    # failed (comma-separated), and the key of the kept image a duplicate is too close to.
    pa.field("candidate", pa.int64()),
    pa.field("rejected_by", pa.string()),
    pa.field("duplicate_of", pa.string()),
    # `device` is the torch device that ran the pipeline ("cuda:0", "cpu"); `gpu_id` is the GPU
    # Ray assigned to the actor (a logical GPU on a CPU test cluster), null when none was assigned.
    pa.field("device", pa.string()),
    pa.field("worker_node", pa.string()),
    pa.field("worker_id", pa.string()),
    pa.field("gpu_id", pa.string()),
    pa.field("gen_seconds", pa.float64()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
]

OUTPUT_COLUMNS = [f.name for f in OUTPUT_FIELDS]

# What a shard Parquet of an earlier output must hold to be this job's input (besides the prompt).
SOURCE_COLUMNS = ("key", "status", "image_sha256", "image_format")

# Columns that describe the run rather than the image. They stay in the Parquet for provenance but
# are kept out of the tar's {key}.json, so a retried or resumed shard writes byte-identical tars.
# model_hash is one: a local folder's moves with its files' mtimes, whose pixels do not.
RUN_COLUMNS = (
    "model_hash",
    "device",
    "worker_node",
    "worker_id",
    "gpu_id",
    "gen_seconds",
    "created_at",
)


# SDXL's micro-conditioning as the call passed it, (height, width) or (top, left) as diffusers
# orders them: the size_conditioning_inputs keys of a family that has it.
SIZE_CONDITIONING_COLUMNS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)


def conditioning_column(keyword: str) -> str:
    """The column of a family's aesthetic-score conditioning (`Family.aesthetic_inputs`, SDXL's
    refiner) as the call passed it: `conditioning_` + diffusers' keyword. Not the keyword itself:
    `aesthetic_score` is curation's LAION aesthetic predictor's score of the image."""
    return f"conditioning_{keyword}"


# The dtype the latents were decoded in, for a family whose pipeline upcasts a float16 decode
# where the VAE's config says force_upcast (SDXL): a float16 row's pixels went through a float32
# decode with SDXL's own VAE, and a float16 one with an fp16-fixed VAE.
VAE_DECODE_DTYPE = "vae_decode_dtype"

# model.vae and model.vae_revision as the job ran them; only in a job that sets model.vae.
VAE_COLUMNS = ("vae_source", "vae_revision")


# model.loras as the sample ran them, only in a job that sets them: each LoRA's name, the spec's
# source and weight_name, the sha256 of the file's bytes the worker loaded, and its scale; and
# the sweep's lora_scale (null without that axis; the one LoRA's scale in `loras` says it too).
LORAS = "loras"
LORA_SCALE = "lora_scale"
LORAS_FIELD = pa.field(
    LORAS,
    pa.list_(
        pa.struct(
            [
                ("name", pa.string()),
                ("source", pa.string()),
                ("weight_name", pa.string()),
                ("sha256", pa.string()),
                ("scale", pa.float64()),
            ]
        )
    ),
)


def token_columns(encoder: int) -> tuple[str, str]:
    """The token count and truncation columns of the family's text encoder `encoder` (0: the
    first, whose columns every family has; 1: prompt_tokens_2, as diffusers names tokenizer_2)."""
    suffix = f"_{encoder + 1}" if encoder else ""
    return f"prompt_tokens{suffix}", f"prompt_truncated{suffix}"


def family_fields(family: Family | None) -> list[pa.Field]:
    """The columns a family adds to OUTPUT_FIELDS: one token count and truncation flag per text
    encoder after the first, and its micro-conditioning; none for SD2 (or an unknown family), so
    an SD2 job's schema stays as it was."""
    if family is None:
        return []
    fields = []
    for encoder in range(1, len(family.text_encoders)):
        tokens, truncated = token_columns(encoder)
        fields += [pa.field(tokens, pa.int64()), pa.field(truncated, pa.bool_())]
    if family.size_conditioning:
        fields += [pa.field(name, pa.list_(pa.int64())) for name in SIZE_CONDITIONING_COLUMNS]
    fields += [
        pa.field(conditioning_column(keyword), pa.float64())
        for keyword in family.aesthetic_inputs()
    ]
    if family.vae_upcast:
        fields.append(pa.field(VAE_DECODE_DTYPE, pa.string()))
    return fields + _family_input_fields(family)


def _family_input_fields(family: Family) -> list[pa.Field]:
    """The columns of a family's own inputs (`family_spec.record`, in its order): T5's
    sequence length as the call passed it (prompt_tokens_N counts T5's tokens against it),
    whether model.drop_t5 left T5 out, skip-layer guidance (null where the job has none), true
    CFG's scale (1: none), the flow-matching scheduler's static shift as it ran (null where it
    shifts by the image instead), and the `mu` a dynamically shifting family's call computed
    from the image's token count (null where its scheduler does not shift by it)."""
    fields = []
    if family.sequence_encoder is not None:
        fields.append(pa.field(MAX_SEQUENCE_LENGTH, pa.int64()))
    if family.droppable_encoder is not None:
        fields.append(pa.field(DROP_T5, pa.bool_()))
    if family.skip_layer_guidance:
        fields.append(pa.field(SKIP_GUIDANCE_LAYERS, pa.list_(pa.int64())))
        fields += [pa.field(key, pa.float64()) for key in SKIP_LAYER_GUIDANCE_KEYS]
    if family.true_cfg:
        fields.append(pa.field(TRUE_CFG_SCALE, pa.float64()))
    if family.scheduler_prefix is not None:
        fields.append(pa.field(SCHEDULER_SHIFT, pa.float64()))
    if family.dynamic_shift:
        fields.append(pa.field(SCHEDULER_MU, pa.float64()))
    return fields


# model.refiner's columns, only in a job with a refiner: what the refiner pipeline ran with (the
# base's denoising_end is the refiner's denoising_start; the aesthetic scores condition a refiner
# whose config says requires_aesthetics_score, null otherwise). Never `aesthetic_score`: that is
# curation's column.
REFINER_FIELDS = [
    pa.field("refiner_source", pa.string()),
    pa.field("refiner_revision", pa.string()),
    pa.field("denoising_end", pa.float64()),
    pa.field("refiner_denoising_start", pa.float64()),
    pa.field("refiner_num_inference_steps", pa.int64()),
    pa.field("refiner_guidance_scale", pa.float64()),
    pa.field("refiner_aesthetic_score", pa.float64()),
    pa.field("refiner_negative_aesthetic_score", pa.float64()),
]


def every_output_column() -> frozenset[str]:
    """Every column an output may have but the input's passthrough ones: the common columns, every
    registered family's own, model.refiner's and model.vae's."""
    from sdfleet.schemas.families import FAMILIES

    names = set(OUTPUT_COLUMNS) | {f.name for f in REFINER_FIELDS} | set(VAE_COLUMNS)
    names |= {LORAS, LORA_SCALE}
    return frozenset(names | {f.name for fam in FAMILIES.values() for f in family_fields(fam)})


def output_schema(
    passthrough: pa.Schema | None = None,
    family: Family | None = None,
    refiner: bool = False,
    vae: bool = False,
    loras: bool = False,
) -> pa.Schema:
    """The output schema: the family's own columns after the common ones (family: the
    checkpoint's, where it is known), the refiner's with model.refiner, model.vae's where the job
    sets it, model.loras' where it has any, then the input's passthrough columns under their output names and their own types
    (PassthroughClash: one is named as a column before it)."""
    fields = list(OUTPUT_FIELDS) + family_fields(family) + (REFINER_FIELDS if refiner else [])
    if vae:
        fields += [pa.field(name, pa.string()) for name in VAE_COLUMNS]
    if loras:
        fields += [LORAS_FIELD, pa.field(LORA_SCALE, pa.float64())]
    if passthrough is not None:
        names = {f.name for f in fields}
        clash = [f.name for f in passthrough if f.name in names]
        if clash:
            raise PassthroughClash(clash[0])
        fields.extend(passthrough)
    return pa.schema(fields)
