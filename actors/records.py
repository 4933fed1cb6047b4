"""What a shard records: one row per planned sample and the shard's stats, built from its judged
outcomes and what made them. Builders only: no model and no I/O."""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdfleet.actors.curation import tally
from sdfleet.actors.engine import GENERATOR_DEVICE, PromptTokens
from sdfleet.actors.judge import Outcome
from sdfleet.actors.refiner import RefinerCall
from sdfleet.schemas import layout
from sdfleet.schemas.family_spec import MAX_SEQUENCE_LENGTH, SCHEDULER_MU, per_sample
from sdfleet.schemas.layout import ShardStats
from sdfleet.schemas.rows import (
    LORA_SCALE,
    LORAS,
    REFINER_FIELDS,
    STATUS_DUPLICATE,
    STATUS_FAILED,
    STATUS_FILTERED,
    STATUS_OK,
    STATUS_REJECTED,
    STATUS_SKIPPED,
    VAE_COLUMNS,
    VAE_DECODE_DTYPE,
    conditioning_column,
    token_columns,
)
from sdfleet.schemas.samples import GenerationParams, Sample, sample_id

if TYPE_CHECKING:
    from sdfleet.schemas.spec import JobSpec


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class Clock:
    """When a shard's work began, as a wall-clock string, epoch seconds and a monotonic counter."""

    started_at: str = field(default_factory=now)
    started_ts: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class AttemptSpend:
    """What one attempt at a shard held the pipeline for, committed or not: the budget counts it
    (`sdfleet.jobs.dispatch`). Filled in as the attempt goes, so a failure still says it."""

    turn_seconds: float = 0.0
    committed: bool = False  # this attempt's files are the shard's (it did not lose a race)

    def gpu_seconds(self, gpus: int) -> float:
        return round(self.turn_seconds * gpus, 4)


@dataclass(frozen=True)
class AttemptResult:
    """What a worker's attempt at a shard returns: the shard's stats in effect (its own, or those
    of a writer that committed first) and the GPU-seconds this attempt used."""

    stats: ShardStats
    gpu_seconds: float
    committed: bool


@dataclass
class Generated:
    """What one shard's turn on the pipeline made."""

    outcomes: dict[str, Outcome]  # of the images made, judged
    failed: dict[str, str]  # key -> why the pipeline could not make it
    gen_seconds: float  # in the pipeline
    turn_seconds: float  # holding the pipeline
    started_ts: float
    finished_ts: float
    stage_seconds: Counter  # post-processing time by stage (score, encode, hash)

    @functools.cached_property
    def tar_images(self) -> dict[str, bytes]:
        """Encoded images for the main tar: ok ones (blacked out if so acted on)."""
        return {
            k: o.image
            for k, o in self.outcomes.items()
            if o.image is not None and not o.verdict.quarantined
        }

    @functools.cached_property
    def quarantined_images(self) -> dict[str, bytes]:
        return {k: o.image for k, o in self.outcomes.items() if o.verdict.quarantined}


@dataclass(frozen=True)
class Provenance:
    """How a worker makes its shards, as its rows and stats record it."""

    spec: JobSpec
    fingerprint: str  # the plan's
    worker: dict[str, Any]  # node, actor, gpu_ids, gpu_id
    dtype: str
    device: str
    batch_size: int
    speed_ups: list[str]
    max_tokens: int
    scheduler_name: Callable[[GenerationParams], str]  # the scheduler a sample runs with
    safety_model_sha256: str | None  # None without a detector
    unsafe_classes: list[str] | None
    curation_models_sha256: dict[str, str] | None  # None without curation
    # The micro-conditioning a sample ran with (the engine's: from its size, or its input's).
    # None: none.
    size_conditioning: Callable[[GenerationParams], dict[str, tuple[int, int]]] | None = None
    # What model.refiner runs a sample with (the engine's); None: no refiner.
    refiner: Callable[[GenerationParams], RefinerCall] | None = None
    # The aesthetic-score conditioning every call passes, by diffusers' keyword (the engine's).
    aesthetic_conditioning: dict[str, float] = field(default_factory=dict)
    # The dtype the latents were decoded in (the engine's); None: a family that never upcasts.
    vae_decode_dtype: str | None = None
    model_hash: str | None = None  # model.source by content, as the driver resolved it
    # model.loras as the engine loaded them (`LoadedLora.record()` each); empty without.
    loras: list[dict[str, Any]] = field(default_factory=list)
    # The family's own inputs as every call of the job ran them, by column (the engine's: T5's
    # sequence length, drop_t5, skip-layer guidance, true CFG, the scheduler's static shift);
    # empty for SD2 and SDXL. And the `mu` a sample's call shifted its schedule by, where the
    # family shifts by the image (None: one that does not).
    family_record: dict[str, Any] = field(default_factory=dict)
    scheduler_mu: Callable[[GenerationParams], float | None] | None = None


def build_row(
    s: Sample,
    o: Outcome,
    created_at: dt.datetime,
    tokens: dict[str, PromptTokens | int],
    made: Provenance,
) -> dict[str, Any]:
    """The sample's row; its key order is the tar's JSON's too."""
    spec, verdict = made.spec, o.verdict
    row: dict[str, Any] = {
        "key": s.key,
        "shard_id": s.shard_id,
        "prompt_id": s.prompt_id,
        "prompt": s.prompt,
        "status": verdict.status,
        "error": verdict.error,
        "generator_device": GENERATOR_DEVICE,
        "model_source": spec.model.source,
        "model_revision": spec.model.revision,
        "model_hash": made.model_hash,
        "dtype": made.dtype,
        "image_format": spec.output.image_format,
        "image_sha256": o.image_sha256,
        "device": made.device,
        "worker_node": made.worker["node"],
        "worker_id": made.worker["actor"],
        "gpu_id": made.worker["gpu_id"],
        "gen_seconds": o.gen_seconds,
        "created_at": created_at,
        **s.origin,
        **s.passthrough,
    }
    if o.evidence.curation is not None:
        scores = o.evidence.curation
        row.update(
            clip_score=scores.clip_score,
            aesthetic_score=scores.aesthetic_score,
            punsafe=scores.punsafe,
            rejected_by=verdict.rejected_by,
            duplicate_of=verdict.duplicate_of,
        )
    if s.candidate is not None:
        row["candidate"] = s.candidate
    if o.evidence.safety is not None:
        # Without a detector every safety column stays null rather than a misleading 0.
        row.update(
            nsfw_score=o.evidence.safety.nsfw_score,
            nsfw_scores=[{"label": k, "score": v} for k, v in o.evidence.safety.scores.items()],
            safety_detector=spec.safety.detector,
            safety_model_sha256=made.safety_model_sha256,
            safety_threshold=spec.safety.threshold,
            safety_action=spec.safety.action,
            safety_flagged=verdict.flagged,
        )
    row.update(task=spec.model.task, vae_tiling=spec.engine.vae_tiling)
    components = _add_components(row, spec, made, s.params or s.planned)
    _add_parameters(row, s, o, made)
    if s.params is not None:
        _add_tokens(row, tokens.get(s.params.prompt), made)
        row.update(
            sample_id=sample_id(
                spec.model.source,
                spec.model.revision,
                s.params,
                row["scheduler"],
                {f.name: row[f.name] for f in REFINER_FIELDS} if made.refiner else None,
                components,
                {name: row[name] for name in made.family_record},  # as _add_parameters set
            ),
            prompt=s.params.prompt,
        )
    return row


def _add_components(
    row: dict[str, Any], spec: JobSpec, made: Provenance, planned: GenerationParams | None
) -> dict[str, Any]:
    """model.vae's and model.loras' columns where the job sets them (no key otherwise, so other
    jobs' rows and tars stay as they were), and the decode's dtype where the family may upcast
    it. Returns the components' columns, which are part of the sample's identity."""
    components: dict[str, Any] = {}
    if spec.model.vae is not None:
        components = dict(zip(VAE_COLUMNS, (spec.model.vae, spec.model.vae_revision), strict=True))
    if made.loras:
        # A lora_scale sweep sets the one LoRA's scale per sample.
        scale = planned.lora_scale if planned is not None else None
        loras = [{**lo, "scale": scale} for lo in made.loras] if scale is not None else made.loras
        components[LORAS] = loras
        row[LORA_SCALE] = scale
    row.update(components)
    if made.vae_decode_dtype is not None:
        row[VAE_DECODE_DTYPE] = made.vae_decode_dtype
    return components


def _add_tokens(row: dict[str, Any], counted: PromptTokens | int | None, made: Provenance) -> None:
    """prompt_tokens and prompt_truncated, and the same for each further text encoder (SDXL's
    prompt_tokens_2); an engine with one tokenizer may count in plain ints."""
    if counted is None or isinstance(counted, int):
        counted = PromptTokens((counted,), (made.max_tokens,))
    # T5's truncation against the length this sample's call read (a swept max_sequence_length).
    counted = counted.at_length(row.get(MAX_SEQUENCE_LENGTH))
    for encoder, n_tokens in enumerate(counted.counts):
        tokens, truncated = token_columns(encoder)
        row.update({tokens: n_tokens, truncated: counted.truncated(encoder)})


def _add_parameters(row: dict[str, Any], s: Sample, o: Outcome, made: Provenance) -> None:
    """What the sample was made with; a failed row too says what it was planned with, so it can
    be placed in a sweep."""
    planned = s.params or s.planned
    if planned is None:
        return
    width, height = o.size if o.size else (planned.width, planned.height)
    row.update(
        seed=planned.seed,
        scheduler=made.scheduler_name(planned),
        num_inference_steps=planned.num_inference_steps,
        guidance_scale=planned.guidance_scale,
        width=width,
        height=height,
        negative_prompt=planned.negative_prompt,
        strength=planned.strength,
        noise_level=planned.noise_level,
    )
    for name, given in (("input_image", planned.image), ("mask_image", planned.mask)):
        if given is not None:
            row.update({f"{name}_sha256": given.sha256, f"{name}_uri": given.uri})
    if made.size_conditioning is not None and s.params is not None:
        row.update({k: list(v) for k, v in made.size_conditioning(s.params).items()})
    if s.params is not None:
        row.update({conditioning_column(k): v for k, v in made.aesthetic_conditioning.items()})
    row.update(per_sample(made.family_record, planned))
    if made.scheduler_mu is not None:
        row[SCHEDULER_MU] = made.scheduler_mu(planned)
    if made.refiner is not None:
        _add_refiner(row, made.spec, made.refiner(planned))


def _add_refiner(row: dict[str, Any], spec: JobSpec, call: RefinerCall) -> None:
    """model.refiner's columns (schemas.rows.REFINER_FIELDS): what the refiner pipeline ran."""
    row.update(
        refiner_source=spec.model.refiner.source,
        refiner_revision=spec.model.refiner.revision,
        denoising_end=call.denoising_start,
        refiner_denoising_start=call.denoising_start,
        refiner_num_inference_steps=call.num_inference_steps,
        refiner_guidance_scale=call.guidance_scale,
        refiner_aesthetic_score=call.aesthetic_score,
        refiner_negative_aesthetic_score=call.negative_aesthetic_score,
    )


def shard_stats(
    name: str,
    shard_id: int,
    attempt: int,
    clock: Clock,
    rows: list[dict[str, Any]],
    generated: Generated,
    sha256: dict[str, str],
    made: Provenance,
) -> ShardStats:
    """The shard's stats file, from its rows and what its turn made (sha256: of its files)."""
    counts = Counter(r["status"] for r in rows)
    flagged_by_class = Counter(
        o.evidence.safety.top_class(made.unsafe_classes)
        for o in generated.outcomes.values()
        if o.verdict.flagged
    )
    # The GPU time this shard used is its turn: its reads and uploads overlap other shards' turns.
    gpu_seconds = generated.turn_seconds * len(made.worker["gpu_ids"])
    images = len(generated.tar_images)
    curation = made.spec.curation
    return ShardStats(
        shard=name,
        shard_id=shard_id,
        fingerprint=made.fingerprint,
        samples=len(rows),
        ok=counts[STATUS_OK],
        filtered=counts[STATUS_FILTERED],
        failed=counts[STATUS_FAILED],
        rejected=counts[STATUS_REJECTED],
        duplicate=counts[STATUS_DUPLICATE],
        skipped=counts[STATUS_SKIPPED],
        images_in_tar=images,
        quarantined_images=len(generated.quarantined_images),
        flagged=sum(flagged_by_class.values()),
        flagged_by_class=dict(sorted(flagged_by_class.items())),
        safety_detector=made.spec.safety.detector,
        safety_model_sha256=made.safety_model_sha256,
        attempt=attempt,
        batch_size=made.batch_size,
        engine_speed_ups=list(made.speed_ups),
        dtype=made.dtype,
        device=made.device,
        worker_node=made.worker["node"],
        worker_id=made.worker["actor"],
        gpu_id=made.worker["gpu_id"],
        gen_seconds=round(generated.gen_seconds, 4),
        gpu_seconds=round(gpu_seconds, 4),
        images_per_gpu_hour=round(images / gpu_seconds * 3600, 1) if gpu_seconds else None,
        # The writer sets the finish (and so the wall time) when the files are on storage.
        wall_seconds=round(time.perf_counter() - clock.t0, 4),
        started_at=clock.started_at,
        finished_at=now(),
        started_ts=round(clock.started_ts, 3),
        generate_started_ts=round(generated.started_ts, 3),
        generate_finished_ts=round(generated.finished_ts, 3),
        finished_ts=round(time.time(), 3),
        tar_sha256=sha256.get(layout.tar_file(name)),
        parquet_sha256=sha256[layout.parquet_file(name)],
        stage_seconds={k: round(v, 4) for k, v in sorted(generated.stage_seconds.items())},
        curation_models_sha256=made.curation_models_sha256 or {},
        **(
            tally(rows, list(made.spec.sweep.axes), curation.images_per_prompt)
            if made.curation_models_sha256 is not None
            else {}
        ),
    )
