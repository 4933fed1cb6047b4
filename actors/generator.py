"""The worker: reads a shard's prompt rows, generates its images, writes and commits the shard.

`ShardGenerator` is a plain class; the dispatcher wraps it with `ray.remote` (one actor per GPU,
running up to two `run` calls at once), and tests or benchmarks can call it directly without Ray.

Two shards are in a worker at a time, and only the pipeline is exclusive: while shard n holds
the GPU, shard n+1 reads its prompt rows, and once shard n's last batch is generated, shard n+1
generates while shard n is encoded, written and committed. The GPU waits neither for S3 reads
nor for uploads.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdfleet.actors.batching import SampleFailed
from sdfleet.actors.curation import CurationScores, Curator
from sdfleet.actors.engine import Engine
from sdfleet.actors.gpu_turns import GpuTurns
from sdfleet.actors.judge import Evidence, Judge, Outcome
from sdfleet.actors.logs import configure_logging, remember_secrets
from sdfleet.actors.lora import lora_records
from sdfleet.actors.metrics import Metrics
from sdfleet.actors.model_content import pin_models
from sdfleet.actors.placement import node_cpu_threads, worker_identity
from sdfleet.actors.reader import read_shard_samples
from sdfleet.actors.records import (
    AttemptResult,
    AttemptSpend,
    Clock,
    Generated,
    Provenance,
    build_row,
    shard_stats,
)
from sdfleet.actors.safety import SafetyScore, load_detector
from sdfleet.actors.selection import BestOfN
from sdfleet.actors.storage import Storage
from sdfleet.actors.writer import (
    Encoded,
    ForeignCommit,
    ShardWriter,
    Spooled,
    decoded_rgb,
    encode_timed,
    publish_committed,
    read_stats,
)
from sdfleet.schemas import layout
from sdfleet.schemas.errors import Preempted, UserError
from sdfleet.schemas.layout import ShardStats
from sdfleet.schemas.plan import Plan
from sdfleet.schemas.samples import Sample, resolve_params

log = logging.getLogger("sdfleet")

# Images handed to the post-processing thread at a time. A detector call has a fixed cost (Keras'
# predict() builds an input pipeline per call) and holds the GIL for part of it; 16 images amortize
# that while still overlapping the next pipeline batch. Measured with bench/overhead.py.
POST_BATCH = 16


@dataclass
class ShardInput:
    """A shard's samples as read: every planned one, and those to generate with their prompts'
    token counts."""

    samples: list[Sample]
    todo: list[Sample]
    tokens: dict[str, int]  # prompt -> its tokens as the text encoder sees them
    seconds: float


@dataclass
class Scores:
    """A post batch's scores per image (None where no model scores), and the seconds by stage."""

    curation: list[CurationScores | None]
    safety: list[SafetyScore | None]
    seconds: dict[str, float]
    # The bytes curation scored (JPEG, WebP), reused for the tar where the image is kept as made.
    encoded: list[Encoded | None]


@dataclass
class PostBatch:
    """One post batch, scored and judged: its outcomes, the scoring time by stage, and the encoding
    of each image to keep (key -> future of its `Encoded`)."""

    outcomes: dict[str, Outcome]
    seconds: dict[str, float]
    encoding: dict[str, Future] = field(default_factory=dict)


@dataclass
class Wave:
    """What the pipeline made of some samples, handed on while it makes more."""

    posts: list[Future] = field(default_factory=list)  # a PostBatch each, in generation order
    # Key -> why the pipeline could not make it (an input too large for the GPU even alone).
    failed: dict[str, str] = field(default_factory=dict)
    gen_seconds: float = 0.0  # in the pipeline
    paused_seconds: float = 0.0  # another shard had the pipeline while this one waited on scores

    def add(self, other: Wave) -> None:
        self.posts += other.posts
        self.failed.update(other.failed)
        self.gen_seconds += other.gen_seconds
        self.paused_seconds += other.paused_seconds


class ShardGenerator:
    """One per GPU. Loads the pipeline and the detector once; `run(shard_id)` makes and commits a
    shard."""

    # What makes the images. bench/pipeline.py and bench/scale.py swap in engines with the same
    # interface that sleep at a GPU's rate or return at once, to measure everything around them.
    engine_class = Engine

    def __init__(self, plan: Plan, cpu_threads: int | None = None):
        configure_logging()
        for options in plan.spec.storage_options():
            remember_secrets(options)
        self.plan = plan
        self.spec = plan.spec
        self.worker = worker_identity()
        self.preempted = False
        if threading.current_thread() is threading.main_thread():
            # Spot reclaims and pod evictions send SIGTERM first: stop taking shards and abandon the
            # current one at the next batch, so the driver requeues it without counting an attempt.
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.storage = Storage(self.spec.output.uri, self.spec.output.storage_options)
        self.writer = ShardWriter(self.storage, self.spec.output.image_format)
        self.schema = plan.output_schema()
        self.metrics = Metrics(self.spec.name)
        self.judge = Judge.of(self.spec)
        self.turns = GpuTurns()
        # One thread scores for every shard of this worker: detectors are called from one thread
        # only (Keras' predict is not safe to call concurrently on one model). Encoding runs on a
        # pool beside it (`_load_models`): PNG costs as much CPU as scoring and Pillow's encoders
        # release the GIL, so one thread doing both halved the rate a worker could keep up with.
        self.post = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdfleet-post")
        # A failure no retry can change (output not writable, a model or weights that do not load
        # or are refused) is kept for `ready` to raise, so the driver stops the job at once.
        self.start_error: UserError | None = None
        try:
            self._probe_write_access()
            self._load_models(cpu_threads)
        except UserError as e:
            self.start_error = type(e)(
                f"{e} (worker {self.worker['actor']} on node {self.worker['node']})"
            )

    def _probe_write_access(self) -> None:
        """Write and delete a small object in the output before any model loads: a worker that may
        not write finds out now, not after generating a whole shard."""
        probe = f"{layout.PROBE_PREFIX}worker-{uuid.uuid4().hex}"
        self.storage.write_bytes(probe, b"")
        self.storage.delete(probe)

    def _load_models(self, cpu_threads: int | None) -> None:
        if cpu_threads is None:
            cpu_threads = node_cpu_threads(self.spec.resources.gpus_per_worker)
        # One set of parameters per sweep point: the shapes to size the batch for and to compile.
        shapes = [resolve_params(self.spec, "", None, "", point) for point in self.plan.points]
        # The checkpoints the driver resolved: a hub id's commit, a mirror copied at its hash.
        model = pin_models(self.spec.model, self.plan.content)
        self.engine = self.engine_class(
            model,
            cpu_threads=cpu_threads,
            options=self.spec.engine,
            batch_size=self.spec.resources.batch_size,
            warm_up=shapes,
            generation=self.spec.generation,
        )
        # On the post thread beside the detector, on the pipeline's device; first, as a detector may
        # read its embeddings.
        self.curator = (
            Curator(self.spec.curation, self.engine.device)
            if self.spec.curation.clip_model
            else None
        )
        self.detector = load_detector(
            self.spec.safety, self.engine.device, cpu_threads, self.curator
        )
        self.encoders = ThreadPoolExecutor(
            max_workers=cpu_threads or os.cpu_count() or 1, thread_name_prefix="sdfleet-encode"
        )

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("termination notice (SIGTERM): abandoning the current shard at the next batch")
        self.preempted = True

    def _check_preempted(self) -> None:
        if self.preempted:
            raise Preempted(
                f"SIGTERM on worker {self.worker['actor']} (node {self.worker['node']})"
            )

    def ready(self) -> dict[str, Any]:
        """Returns once the models are loaded; the dispatcher feeds only ready workers."""
        if self.start_error is not None:
            raise self.start_error
        return {**self.worker, "device": self.engine.device}

    def run(self, shard_id: int, attempt: int = 1) -> ShardStats:
        """Make and commit a shard; the stats in effect."""
        return self.run_attempt(shard_id, attempt).stats

    def run_attempt(self, shard_id: int, attempt: int = 1) -> AttemptResult:
        """`run`, saying too what this attempt used of the GPU, committed or not. An attempt that
        fails says it on its exception (`gpu_seconds`), which reaches the driver with it."""
        if self.start_error is not None:
            raise self.start_error
        spend = AttemptSpend()
        gpus = len(self.worker["gpu_ids"])
        ticket = self.turns.take()
        try:
            stats = self._run(shard_id, attempt, ticket, spend)
        except Exception as e:
            e.gpu_seconds = spend.gpu_seconds(gpus)  # read by the driver's budget
            raise
        finally:
            self.turns.release(ticket)
        return AttemptResult(stats, spend.gpu_seconds(gpus), spend.committed)

    def _run(self, shard_id: int, attempt: int, ticket: int, spend: AttemptSpend) -> ShardStats:
        clock = Clock()
        name = self.plan.shard_name(shard_id)
        # 1. A shard committed meanwhile (by a worker presumed dead, say) is not made twice.
        committed = self._committed(name)
        if committed is not None:
            return committed
        # 2. Read this shard's rows into samples, while the shard before it may still hold the GPU.
        shard = self._read(shard_id)
        # 3. Generate once it is this shard's turn; scoring, judging and encoding run beside it.
        made = self._generate(shard.todo, ticket, spend)
        made.stage_seconds["read"] += shard.seconds
        # 4. Judge what was not made; every planned sample then has its outcome.
        outcomes = [self._outcome(s, made) for s in shard.samples]
        # 5. Record one row per planned sample, and spool the shard's files to local disk.
        t0 = time.perf_counter()
        rows = self._rows(shard, outcomes)
        spooled = self._spool(name, rows, made)
        made.stage_seconds["write"] += time.perf_counter() - t0
        # 6. Stage, commit and publish the files with the stats file.
        try:
            stats = shard_stats(
                name, shard_id, attempt, clock, rows, made, spooled.sha256, self._provenance()
            )
            committed = self.writer.commit(name, spooled, stats)
        finally:
            spooled.close()
        spend.committed = (committed.worker_id, committed.started_ts) == (
            stats.worker_id,
            stats.started_ts,
        )
        self.metrics.record(committed)
        return committed

    def _committed(self, name: str) -> ShardStats | None:
        """The stats of this job's shard `name` if it is already committed."""
        stats_name = layout.stats_file(name)
        if not self.storage.exists(stats_name):
            return None
        committed = read_stats(self.storage, stats_name)
        if committed.fingerprint != self.plan.fingerprint:  # refused before any GPU time is spent
            raise ForeignCommit(self.storage, stats_name, committed, self.plan.fingerprint)
        log.info("shard %s is already committed; skipping", name)
        publish_committed(self.storage, committed)  # in case its writer died before publishing
        return committed

    def _read(self, shard_id: int) -> ShardInput:
        self._check_preempted()
        t0 = time.perf_counter()
        samples = read_shard_samples(self.plan, shard_id)
        todo = [s for s in samples if s.params is not None]
        # A plan made without the driver's checks (a bench, a notebook) leaves the size unset.
        for s in todo:
            if s.params.width is None and s.params.image is None:
                s.params.width = s.params.height = self.engine.default_size
        tokens = self.engine.count_tokens(sorted({s.prompt for s in todo}))
        return ShardInput(samples, todo, tokens, time.perf_counter() - t0)

    def _outcome(self, s: Sample, made: Generated) -> Outcome:
        """The sample's outcome: judged as its scores came in if it was made; if not, it failed
        (its row, or the pipeline, says why) or is a candidate slot best-of-N did not need."""
        if s.key in made.outcomes:
            return made.outcomes[s.key]
        error = made.failed.get(s.key, s.error)
        return Outcome.judged(self.judge, Evidence(made=False, error=error))

    def _rows(self, shard: ShardInput, outcomes: list[Outcome]) -> list[dict[str, Any]]:
        created_at = dt.datetime.now(dt.UTC)
        provenance = self._provenance()
        return [
            build_row(s, o, created_at, shard.tokens, provenance)
            for s, o in zip(shard.samples, outcomes)
        ]

    def _spool(self, name: str, rows: list[dict[str, Any]], made: Generated) -> Spooled:
        """The shard's tar and Parquet (and quarantine and embeddings files) on local disk."""
        embeddings = None
        if self.spec.curation.save_embeddings:
            embeddings = {
                k: o.evidence.curation.embedding
                for k, o in made.outcomes.items()
                if o.evidence.curation is not None
            }
        return self.writer.spool(
            name,
            rows,
            made.tar_images,
            self.schema,
            made.quarantined_images,
            embeddings,
            self.curator.clip.embedding_size if self.curator else 0,
        )

    def _provenance(self) -> Provenance:
        return Provenance(
            spec=self.spec,
            fingerprint=self.plan.fingerprint,
            worker=self.worker,
            dtype=self.engine.dtype,
            device=self.engine.device,
            batch_size=self.engine.batch_size,
            speed_ups=list(self.engine.applied),
            max_tokens=self.engine.max_tokens,
            scheduler_name=self.engine.scheduler_name,
            safety_model_sha256=self.detector.model_sha256 if self.detector else None,
            unsafe_classes=self.detector.unsafe_classes if self.detector else None,
            curation_models_sha256=self.curator.models_sha256 if self.curator else None,
            # bench/synthetic.py's stand-in engine has no micro-conditioning.
            size_conditioning=getattr(self.engine, "size_conditioning", None),
            refiner=getattr(getattr(self.engine, "refiner", None), "call_for", None),
            aesthetic_conditioning=getattr(self.engine, "aesthetic_conditioning", {}),
            vae_decode_dtype=getattr(self.engine, "vae_decode_dtype", None),
            family_record=getattr(self.engine, "family_record", {}),
            model_hash=self.plan.content.main_model_digest() if self.plan.content else None,
            loras=lora_records(self.engine),
            scheduler_mu=self._scheduler_mu(),
        )

    def _scheduler_mu(self):
        """The engine's schedule shift per sample, for a family that shifts by the image (FLUX.1);
        bench/synthetic.py's stand-in engine has none."""
        shifts = getattr(getattr(self.engine, "family", None), "dynamic_shift", False)
        return self.engine.scheduler_mu if shifts else None

    def _generate(self, todo: list[Sample], ticket: int, spend: AttemptSpend) -> Generated:
        """Generate `todo` during this shard's turn on the pipeline: all of it, or with best-of-N
        curation in rounds (`_best_of_n`). Scoring and judging run on the post thread, encoding on
        the encoder pool, while the pipeline makes the next batch."""
        with self.turns.turn(ticket, self._check_preempted):
            turn_start, started_ts = time.perf_counter(), time.time()
            try:
                if self.spec.curation.best_of_n:
                    wave = self._best_of_n(todo, ticket)
                else:
                    wave = self._wave(todo)
            finally:  # a turn that fails has used the GPU too
                spend.turn_seconds = time.perf_counter() - turn_start
            turn_seconds = spend.turn_seconds = spend.turn_seconds - wave.paused_seconds
            finished_ts = time.time()
        # The next shard has the GPU now; the rest of this one runs beside it.
        outcomes: dict[str, Outcome] = {}
        stage_seconds: Counter = Counter()
        for f in wave.posts:
            batch: PostBatch = f.result()
            outcomes.update(batch.outcomes)
            stage_seconds.update(batch.seconds)
            for key, job in batch.encoding.items():
                encoded: Encoded = job.result()
                stage_seconds.update(encoded.seconds)
                if outcomes[key].verdict.keeps_image:  # not a duplicate found after encoding began
                    outcomes[key].image, outcomes[key].image_sha256 = encoded.data, encoded.sha256
        return Generated(
            outcomes,
            wave.failed,
            wave.gen_seconds,
            turn_seconds,
            started_ts,
            finished_ts,
            stage_seconds,
        )

    def _wave(self, samples: list[Sample]) -> Wave:
        """Generate `samples` in batches, handing each POST_BATCH images to the post thread."""
        wave = Wave()
        made, arrays, seconds = [], [], []
        for batch, images, secs in self.engine.generate([s.params for s in samples]):
            self._check_preempted()
            wave.gen_seconds += secs
            for i, image in zip(batch, images):
                if isinstance(image, SampleFailed):
                    wave.failed[samples[i].key] = image.reason
                    continue
                made.append(samples[i])
                arrays.append(image)
                seconds.append(secs / len(batch))
            if len(made) >= POST_BATCH:
                wave.posts.append(self.post.submit(self._post_batch, made, arrays, seconds))
                made, arrays, seconds = [], [], []
        if made:
            wave.posts.append(self.post.submit(self._post_batch, made, arrays, seconds))
        return wave

    def _best_of_n(self, todo: list[Sample], ticket: int) -> Wave:
        """Best-of-N's rounds (`BestOfN`): each round is generated and judged before the next is
        chosen. While a round's last images are scored, the next shard may use the pipeline."""
        curation = self.spec.curation
        selection = BestOfN(todo, curation.images_per_prompt, curation.dedup_threshold)
        made, outcomes = Wave(), {}
        while round_ := selection.next_round():
            wave = self._wave(round_)
            if not all(f.done() for f in wave.posts):
                t0 = time.perf_counter()
                with self.turns.pause(ticket):
                    for f in wave.posts:
                        f.result()
                wave.paused_seconds += time.perf_counter() - t0
            for f in wave.posts:
                outcomes.update(f.result().outcomes)
            made.add(wave)
            selection.keep(round_, outcomes, self.judge)
        return made

    def _post_batch(self, samples: list[Sample], arrays: list, seconds: list[float]) -> PostBatch:
        """Score and judge generated images (seconds: the pipeline's time per image), and hand the
        images to keep to the encoder pool."""
        out = self.spec.output
        scores = self._score(samples, arrays)
        batch = PostBatch({}, scores.seconds)
        for sample, array, safety, curation, per_image, encoded in zip(
            samples, arrays, scores.safety, scores.curation, seconds, scores.encoded
        ):
            o = Outcome.judged(
                self.judge,
                Evidence(safety=safety, curation=curation),
                gen_seconds=per_image,
                size=(array.shape[1], array.shape[0]),
            )
            if o.verdict.blackout:
                array = np.zeros_like(array)
            if o.verdict.keeps_image and encoded is not None and not o.verdict.blackout:
                batch.encoding[sample.key] = Future()
                batch.encoding[sample.key].set_result(encoded)
            elif o.verdict.keeps_image:
                batch.encoding[sample.key] = self.encoders.submit(
                    encode_timed, array, out.image_format, out.quality
                )
            batch.outcomes[sample.key] = o
        return batch

    def _score(self, samples: list[Sample], arrays: list) -> Scores:
        """Curation's and the detector's scores per image."""
        seconds = {}
        curated, encoded = [None] * len(arrays), [None] * len(arrays)
        if self.curator is not None:  # before a blackout, so the scores are of what was generated
            stored, encoded = self._as_stored(arrays)
            t0 = time.perf_counter()
            curated = self.curator.score(stored, [s.params.prompt for s in samples])
            seconds["curate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.detector is None:
            safety = [None] * len(arrays)
        elif self.detector.reads_embeddings:  # the embedding curation just made, not a second one
            safety = self.detector.score_embeddings(np.stack([c.embedding for c in curated]))
        else:
            safety = self.detector.score(arrays)
        seconds["score"] = time.perf_counter() - t0
        return Scores(curated, safety, seconds, encoded)

    def _as_stored(self, arrays: list) -> tuple[list, list[Encoded | None]]:
        """The images as a reader of the tar decodes them, for curation to score (so `sdfleet
        score` on the output gives the rows' scores): JPEG and WebP encoded on the encoder pool
        (deterministic: the tar gets these very bytes) and decoded again; PNG, lossless, as made."""
        out = self.spec.output
        if out.image_format == "png":
            return arrays, [None] * len(arrays)
        encoded = [
            job.result()
            for job in [
                self.encoders.submit(encode_timed, a, out.image_format, out.quality) for a in arrays
            ]
        ]
        return [decoded_rgb(e.data) for e in encoded], encoded
