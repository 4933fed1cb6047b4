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
import functools
import hashlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdfleet.actors.curation import CurationScores, Curator, tally
from sdfleet.actors.batching import SampleFailed
from sdfleet.actors.engine import GENERATOR_DEVICE, Engine
from sdfleet.actors.inputs import InputImageReader, read_row_inputs, read_source_inputs
from sdfleet.actors.logs import configure_logging, remember_secrets
from sdfleet.actors.safety import SafetyScore, load_detector
from sdfleet.actors.storage import Storage
from sdfleet.actors.writer import ShardWriter, encode_image, publish_committed
from sdfleet.schemas import layout
from sdfleet.schemas.errors import UserError
from sdfleet.schemas.layout import ShardStats
from sdfleet.schemas.plan import Plan
from sdfleet.schemas.rows import (
    SOURCE_COLUMNS,
    STATUS_DUPLICATE,
    STATUS_FAILED,
    STATUS_FILTERED,
    STATUS_OK,
    STATUS_REJECTED,
    STATUS_SKIPPED,
)
from sdfleet.schemas.samples import Sample, resolve_params, sample_id, sample_key

log = logging.getLogger("sdfleet")

# Images handed to the post-processing thread at a time. A detector call has a fixed cost (Keras'
# predict() builds an input pipeline per call) and holds the GIL for part of it; 16 images amortize
# that while still overlapping the next pipeline batch. Measured with bench/overhead.py.
POST_BATCH = 16


def read_shard_samples(plan: Plan, shard_id: int) -> list[Sample]:
    """Read the prompt rows one shard needs (only the row groups it touches) and expand them."""
    spec, inp = plan.spec, plan.spec.input
    start, end = plan.shard_range(shard_id)
    n_points = len(plan.points)
    first_row, last_row = start // n_points, (end - 1) // n_points  # global rows, inclusive

    # 1. Read the rows, file by file; a shard may span the end of one file and the start of the next.
    source = plan.source_output
    if source is None:
        columns = [inp.prompt_column] + [
            c
            for c in (inp.id_column, inp.negative_prompt_column, inp.image_column, inp.mask_column)
            if c
        ]
    else:  # an earlier output's rows: keyed by their keys, their images in the shards' tars
        columns = [inp.prompt_column] + [
            c for c in (inp.negative_prompt_column, *SOURCE_COLUMNS) if c
        ]
    columns += [c for c in inp.passthrough_columns if c not in columns]
    rows: dict[
        int, tuple[str, int, dict[str, Any]]
    ] = {}  # global row -> (file stem, file offset, values)
    for f, offset in zip(plan.files, plan.row_offsets):
        lo, hi = max(first_row, offset), min(last_row, offset + f.rows - 1)
        if lo > hi:
            continue
        groups, group_start, skip = [], 0, None
        for g, n in enumerate(f.row_groups):
            if group_start + n > lo - offset and group_start <= hi - offset:
                if skip is None:
                    skip = lo - offset - group_start
                groups.append(g)
            group_start += n
        storage = Storage(f.uri, inp.storage_options)
        with storage.fs.open(storage.root, "rb") as fh:
            if source is None:
                table = (
                    pq.ParquetFile(fh)
                    .read_row_groups(groups, columns=columns)
                    .slice(skip, hi - lo + 1)
                )
            else:  # the file's ok rows, which are what the plan counted
                table = pq.ParquetFile(fh).read(columns=columns)
                table = table.filter(pc.equal(table.column("status"), STATUS_OK)).slice(
                    lo - offset, hi - lo + 1
                )
        # Text columns are read as bytes and decoded per row, so one non-UTF-8 row fails alone.
        text = {c for c in (inp.prompt_column, inp.negative_prompt_column) if c}
        values = {
            c: _as_bytes(table.column(c)) if c in text else table.column(c).to_pylist()
            for c in columns
        }
        for i in range(hi - lo + 1):
            rows[lo + i] = (f.stem, offset, {c: values[c][i] for c in columns})

    # 2. The image tasks' inputs, one read and decode per row (its sweep points share them).
    inputs = {}
    if source is not None:
        inputs = read_source_inputs(Storage(source, inp.storage_options), rows)
    elif inp.image_column:
        reader = InputImageReader(inp.uri, inp.storage_options)
        inputs = read_row_inputs(
            reader,
            {r: v[2][inp.image_column] for r, v in rows.items()},
            {r: v[2][inp.mask_column] for r, v in rows.items()} if inp.mask_column else None,
        )

    # 3. Expand each (row, sweep point) into a sample with its key, seed and parameters; with
    #    best-of-N, each prompt's candidate slots (consecutive samples) form one group.
    best_of_n, candidates = spec.curation.best_of_n, spec.curation.candidates
    samples = []
    for s in range(start, end):
        row = s // n_points
        stem, offset, values = rows[row]
        point = plan.points[s % n_points]
        key = sample_key(shard_id, s - start, plan.key_width)
        raw_id = values["key"] if source else values[inp.id_column] if inp.id_column else None
        prompt_id = f"{stem}:{row - offset}" if raw_id is None else str(raw_id)
        passthrough = {c: values[c] for c in inp.passthrough_columns}
        prompt, error = _decode(values[inp.prompt_column], "prompt")
        negative, negative_error = (None, None)
        if inp.negative_prompt_column:
            negative, negative_error = _decode(
                values[inp.negative_prompt_column], "negative prompt", allow_empty=True
            )
        if row in plan.duplicate_rows:
            error = f"duplicate prompt_id {prompt_id!r}: first at {plan.locate(plan.duplicate_rows[row])}"
        error = error or negative_error
        params = resolve_params(spec, prompt or "", negative, prompt_id, point)
        if row in inputs:
            if isinstance(inputs[row], str):
                error = error or inputs[row]
            else:
                params.image, params.mask = inputs[row]
        slot = {"group": s // candidates, "candidate": s % candidates} if best_of_n else {}
        origin = (
            {
                "source_output": source,
                "source_key": values["key"],
                "source_image_sha256": values["image_sha256"],
            }
            if source
            else {}
        )
        if error:
            samples.append(
                Sample(
                    key,
                    shard_id,
                    prompt_id,
                    None,
                    error,
                    passthrough,
                    prompt,
                    planned=params,
                    origin=origin,
                    **slot,
                )
            )
            continue
        samples.append(
            Sample(
                key, shard_id, prompt_id, params, None, passthrough, prompt, origin=origin, **slot
            )
        )
    return samples


def _as_bytes(column) -> list[bytes | None]:
    import pyarrow as pa

    target = (
        pa.large_binary()
        if pa.types.is_large_string(column.type) or pa.types.is_large_binary(column.type)
        else pa.binary()
    )
    return column.cast(target).to_pylist()


def _decode(
    raw: bytes | None, what: str, allow_empty: bool = False
) -> tuple[str | None, str | None]:
    """Text and None, or None and the reason this row cannot be generated."""
    if raw is None:
        return None, (None if allow_empty else f"{what} is null")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{what} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})"
    if not allow_empty and not text.strip():
        return None, f"{what} is empty or whitespace-only"
    return text, None


class Preempted(RuntimeError):
    """The worker got a termination notice (SIGTERM); its shard is abandoned and goes back uncounted."""


@dataclass
class Outcome:
    """What became of one generated image."""

    status: str
    gen_seconds: float
    image: bytes | None = None  # encoded bytes, for the main tar or the quarantine tar
    image_sha256: str | None = None
    quarantined: bool = False
    safety: SafetyScore | None = None
    flagged: bool | None = None
    size: tuple[int, int] | None = (
        None  # (width, height) as made: the image tasks' inputs decide it
    )
    curation: CurationScores | None = None
    rejected_by: str | None = None  # the curation gates it failed
    duplicate_of: str | None = None  # the key of the kept image it is too close to


@dataclass
class Generated:
    """What one shard's turn on the pipeline made."""

    outcomes: dict[str, Outcome]
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
            if o.image is not None and not o.quarantined
        }

    @functools.cached_property
    def quarantined_images(self) -> dict[str, bytes]:
        return {k: o.image for k, o in self.outcomes.items() if o.quarantined}


@dataclass
class Clock:
    """When a shard's work began, as a wall-clock string, epoch seconds and a monotonic counter."""

    started_at: str = field(default_factory=lambda: _now())
    started_ts: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)


class GpuTurns:
    """Hands the pipeline to one shard at a time. Shards take their first turn in the order they
    arrived (tickets). A shard may step aside (`pause`) while it waits on something else than the
    pipeline (best-of-N waits for a round's scores before it knows what to make next): the next
    shard generates meanwhile, and the paused one takes the pipeline back once it is free.

    A shard that ends before its turn (already committed, unreadable input) gives its ticket back,
    so the shard after it is not kept waiting.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._issued = 0
        self._next_first = 0  # the ticket whose first turn comes next
        self._passed: set[int] = set()  # tickets that had their first turn or gave theirs back
        self._holder: int | None = None

    def take(self) -> int:
        with self._cond:
            self._issued += 1
            return self._issued - 1

    @contextmanager
    def turn(self, ticket: int, check=lambda: None):
        """Wait for `ticket`'s turn (calling `check` while waiting), hold it for the block."""
        with self._cond:
            while self._holder is not None or self._next_first != ticket:
                check()
                self._cond.wait(timeout=0.5)
            self._holder = ticket
            self._pass(ticket)
        try:
            yield
        finally:
            self.release(ticket)

    @contextmanager
    def pause(self, ticket: int):
        """Inside `ticket`'s turn: let another shard have the pipeline for the block, then take it back."""
        with self._cond:
            self._holder = None
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                while self._holder is not None:
                    self._cond.wait(timeout=0.5)
                self._holder = ticket

    def release(self, ticket: int) -> None:
        """`ticket` is done with the pipeline (idempotent); the next ticket in line gets the turn."""
        with self._cond:
            self._pass(ticket)
            if self._holder == ticket:
                self._holder = None
            self._cond.notify_all()

    def _pass(self, ticket: int) -> None:
        self._passed.add(ticket)
        while self._next_first in self._passed:
            self._passed.discard(self._next_first)
            self._next_first += 1


class ShardGenerator:
    """One per GPU. Loads the pipeline and the detector once; `run(shard_id)` makes and commits a shard."""

    # What makes the images. bench/pipeline.py and bench/scale.py swap in engines with the same
    # interface that sleep at a GPU's rate or return at once, to measure everything around them.
    engine_class = Engine

    def __init__(self, plan: Plan, cpu_threads: int | None = None):
        configure_logging()
        for options in plan.spec.storage_options():
            remember_secrets(options)
        self.plan = plan
        self.spec = plan.spec
        self.worker = _worker_identity()
        self.preempted = False
        if threading.current_thread() is threading.main_thread():
            # Spot reclaims and pod evictions send SIGTERM first: stop taking shards and abandon the
            # current one at the next batch, so the driver requeues it without counting an attempt.
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.storage = Storage(self.spec.output.uri, self.spec.output.storage_options)
        self.writer = ShardWriter(self.storage, self.spec.output.image_format)
        self.schema = plan.output_schema()
        self.metrics = _Metrics(self.spec.name)
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
            cpu_threads = _node_cpu_threads(self.spec.resources.gpus_per_worker)
        # One set of parameters per sweep point: the shapes to size the batch for and to compile.
        shapes = [resolve_params(self.spec, "", None, "", point) for point in self.plan.points]
        self.engine = self.engine_class(
            self.spec.model,
            cpu_threads=cpu_threads,
            options=self.spec.engine,
            batch_size=self.spec.resources.batch_size,
            warm_up=shapes,
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
        if self.start_error is not None:
            raise self.start_error
        ticket = self.turns.take()
        try:
            return self._run(shard_id, attempt, ticket)
        finally:
            self.turns.release(ticket)

    def _run(self, shard_id: int, attempt: int, ticket: int) -> ShardStats:
        clock = Clock()
        name = self.plan.shard_name(shard_id)
        # 0. A shard committed meanwhile (by a worker presumed dead, say) is not made twice.
        if self.storage.exists(layout.stats_file(name)):
            committed = ShardStats.model_validate(self.storage.read_json(layout.stats_file(name)))
            if committed.fingerprint == self.plan.fingerprint:
                log.info("shard %s is already committed; skipping", name)
                publish_committed(
                    self.storage, committed
                )  # in case its writer died before publishing
                return committed

        # 1. Read this shard's rows and expand them into samples, while the shard before it may
        #    still hold the GPU.
        self._check_preempted()
        t0 = time.perf_counter()
        samples = read_shard_samples(self.plan, shard_id)
        todo = [s for s in samples if s.params is not None]
        for (
            s
        ) in todo:  # a plan made without the driver's checks (a bench, a notebook) leaves it unset
            if s.params.width is None and s.params.image is None:
                s.params.width = s.params.height = self.engine.default_size
        tokens = self.engine.count_tokens(sorted({s.prompt for s in todo}))
        read_seconds = time.perf_counter() - t0

        # 2. Generate once it is this shard's turn; scoring, acting and encoding run beside it.
        made = self._generate(todo, ticket)
        made.stage_seconds["read"] += read_seconds

        # 3. One row per planned sample: ok, filtered or failed, with its scores.
        t0 = time.perf_counter()
        created_at = dt.datetime.now(dt.timezone.utc)
        rows = [self._row(s, made.outcomes.get(s.key), created_at, tokens) for s in samples]

        # 4. Write the tar and the Parquet, then stage, commit and publish them with the stats file.
        embeddings = None
        if self.spec.curation.save_embeddings:
            embeddings = {
                k: o.curation.embedding for k, o in made.outcomes.items() if o.curation is not None
            }
        spooled = self.writer.spool(
            name,
            rows,
            made.tar_images,
            self.schema,
            made.quarantined_images,
            embeddings,
            self.curator.clip.embedding_size if self.curator else 0,
        )
        made.stage_seconds["write"] += time.perf_counter() - t0
        try:
            stats = self._stats(name, shard_id, attempt, clock, rows, made, spooled.sha256)
            committed = self.writer.commit(name, spooled, stats)
        finally:
            spooled.close()
        self.metrics.record(committed)
        return committed

    def _generate(self, todo: list[Sample], ticket: int) -> Generated:
        """Generate `todo` during this shard's turn on the pipeline: all of it, or with best-of-N
        curation in rounds (`_best_of_n`). Scoring and acting run on the post thread, encoding on
        the encoder pool, while the pipeline makes the next batch."""
        best_of_n = self.spec.curation.best_of_n
        results: list = []  # a future of (outcomes, timing, encoding) per post batch, in order
        with self.turns.turn(ticket, self._check_preempted):
            turn_start, started_ts = time.perf_counter(), time.time()
            paused: list[float] = []  # seconds another shard had the pipeline while this one waited
            gen_total = (
                self._best_of_n(todo, results, ticket, paused)
                if best_of_n
                else self._wave(todo, results)
            )
            turn_seconds, finished_ts = time.perf_counter() - turn_start - sum(paused), time.time()
        # The next shard has the GPU now; the rest of this one runs beside it.
        outcomes: dict[str, Outcome] = {}
        stage_seconds: Counter = Counter()
        for f in results:
            done, timing, encoding = f.result()
            outcomes.update(done)
            stage_seconds.update(timing)
            for key, job in encoding.items():
                o = outcomes[key]
                image, digest, timing = job.result()
                stage_seconds.update(timing)
                if (
                    o.status == STATUS_OK or o.quarantined
                ):  # not a duplicate found after encoding began
                    o.image, o.image_sha256 = image, digest
        if best_of_n:
            for s in todo:
                if (
                    s.key not in outcomes and s.error is None
                ):  # a candidate slot best-of-N did not need
                    outcomes[s.key] = Outcome(STATUS_SKIPPED, None)
        return Generated(outcomes, gen_total, turn_seconds, started_ts, finished_ts, stage_seconds)

    def _wave(self, samples: list[Sample], futures: list) -> float:
        """Generate `samples` in batches, handing each POST_BATCH images to the post thread (its
        futures go to `futures`); returns the seconds spent in the pipeline."""
        made, arrays, seconds = [], [], []
        total = 0.0
        for batch, images, secs in self.engine.generate([s.params for s in samples]):
            self._check_preempted()
            total += secs
            for i, image in zip(batch, images):
                if isinstance(image, SampleFailed):
                    samples[
                        i
                    ].error = image.reason  # no outcome: its row is failed, with the reason
                    continue
                made.append(samples[i])
                arrays.append(image)
                seconds.append(secs / len(batch))
            if len(made) >= POST_BATCH:
                futures.append(self.post.submit(self._finish_batch, made, arrays, seconds))
                made, arrays, seconds = [], [], []
        if made:
            futures.append(self.post.submit(self._finish_batch, made, arrays, seconds))
        return total

    def _best_of_n(
        self, todo: list[Sample], results: list, ticket: int, paused: list[float]
    ) -> float:
        """curation.images_per_prompt (k) of each prompt's candidate slots, in rounds: first the
        first k slots of every prompt, then, for each prompt with fewer than k kept, as many more
        as it lacks, until it has k or has tried them all. An image is kept if it passes safety and
        the gates and is no duplicate of one kept before it, so the kept images are the first k
        passing in slot (seed) order whatever the batching. While a round's last images are scored,
        the next shard may use the pipeline (its time goes to `paused`). Returns the pipeline's seconds."""
        cur = self.spec.curation
        k, threshold = cur.images_per_prompt, cur.dedup_threshold
        groups: dict[int, list[Sample]] = {}
        for s in todo:  # in key order, so each prompt's candidates in slot order
            groups.setdefault(s.group, []).append(s)
        tried = dict.fromkeys(groups, 0)
        kept: dict[int, list[tuple[str, np.ndarray]]] = {g: [] for g in groups}
        outcomes: dict[str, Outcome] = {}
        total = 0.0
        while True:
            # 1. This round's candidates: what each prompt still lacks, from its next untried slots.
            wave = []
            for g, candidates in groups.items():
                n = min(k - len(kept[g]), len(candidates) - tried[g])
                wave += candidates[tried[g] : tried[g] + n]
                tried[g] += n
            if not wave:
                return total
            # 2. Generate and score them; the next round depends on what passed.
            futures: list = []
            total += self._wave(wave, futures)
            if not all(f.done() for f in futures):
                t0 = time.perf_counter()
                with self.turns.pause(ticket):
                    for f in futures:
                        f.result()
                paused.append(time.perf_counter() - t0)
            for f in futures:
                outcomes.update(f.result()[0])
            results += futures
            # 3. Keep, in slot order, what passed and is not too close to an image kept before it.
            for s in wave:
                o = outcomes.get(s.key)
                if o is None or o.status != STATUS_OK:
                    continue
                if threshold is not None:
                    o.duplicate_of = next(
                        (
                            key
                            for key, e in kept[s.group]
                            if float(np.dot(e, o.curation.embedding)) >= threshold
                        ),
                        None,
                    )
                    if o.duplicate_of:
                        o.status = STATUS_DUPLICATE
                        continue
                kept[s.group].append((s.key, o.curation.embedding if o.curation else None))

    def _stats(
        self,
        name: str,
        shard_id: int,
        attempt: int,
        clock: Clock,
        rows: list[dict[str, Any]],
        made: Generated,
        sha256: dict[str, str],
    ) -> ShardStats:
        counts = Counter(r["status"] for r in rows)
        unsafe = self.detector.unsafe_classes if self.detector else None
        flagged_by_class = Counter(
            o.safety.top_class(unsafe) for o in made.outcomes.values() if o.flagged
        )
        # The GPU time this shard used is its turn: its reads and uploads overlap other shards' turns.
        gpu_seconds = made.turn_seconds * len(self.worker["gpu_ids"])
        return ShardStats(
            shard=name,
            shard_id=shard_id,
            fingerprint=self.plan.fingerprint,
            samples=len(rows),
            ok=counts[STATUS_OK],
            filtered=counts[STATUS_FILTERED],
            failed=counts[STATUS_FAILED],
            rejected=counts[STATUS_REJECTED],
            duplicate=counts[STATUS_DUPLICATE],
            skipped=counts[STATUS_SKIPPED],
            images_in_tar=len(made.tar_images),
            quarantined_images=len(made.quarantined_images),
            flagged=sum(flagged_by_class.values()),
            flagged_by_class=dict(sorted(flagged_by_class.items())),
            safety_detector=self.spec.safety.detector,
            safety_model_sha256=self.detector.model_sha256 if self.detector else None,
            attempt=attempt,
            batch_size=self.engine.batch_size,
            engine_speed_ups=list(self.engine.applied),
            dtype=self.engine.dtype,
            device=self.engine.device,
            worker_node=self.worker["node"],
            worker_id=self.worker["actor"],
            gpu_id=self.worker["gpu_id"],
            gen_seconds=round(made.gen_seconds, 4),
            gpu_seconds=round(gpu_seconds, 4),
            images_per_gpu_hour=round(len(made.tar_images) / gpu_seconds * 3600, 1)
            if gpu_seconds
            else None,
            # The writer sets the finish (and so the wall time) when the files are on storage.
            wall_seconds=round(time.perf_counter() - clock.t0, 4),
            started_at=clock.started_at,
            finished_at=_now(),
            started_ts=round(clock.started_ts, 3),
            generate_started_ts=round(made.started_ts, 3),
            generate_finished_ts=round(made.finished_ts, 3),
            finished_ts=round(time.time(), 3),
            tar_sha256=sha256[layout.tar_file(name)],
            parquet_sha256=sha256[layout.parquet_file(name)],
            stage_seconds={k: round(v, 4) for k, v in sorted(made.stage_seconds.items())},
            curation_models_sha256=self.curator.models_sha256 if self.curator else {},
            **(
                tally(rows, list(self.spec.sweep.axes), self.spec.curation.images_per_prompt)
                if self.curator
                else {}
            ),
        )

    def _finish_batch(self, samples: list[Sample], arrays: list, seconds: list[float]):
        """Score and act on generated images (seconds: the pipeline's time per image), and hand the
        images to keep to the encoder pool. Returns the outcomes, the scoring time, and the
        encoding of each image to keep: key -> future of (bytes, sha256, seconds per stage)."""
        safety, out = self.spec.safety, self.spec.output
        timing, curated = {}, [None] * len(arrays)
        if self.curator is not None:  # before a blackout, so the scores are of what was generated
            t0 = time.perf_counter()
            curated = self.curator.score(arrays, [s.params.prompt for s in samples])
            timing["curate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.detector is None:
            scores = [None] * len(arrays)
        elif self.detector.reads_embeddings:  # the embedding curation just made, not a second one
            scores = self.detector.score_embeddings(np.stack([c.embedding for c in curated]))
        else:
            scores = self.detector.score(arrays)
        timing["score"] = time.perf_counter() - t0
        outcomes, encoding = {}, {}
        for sample, array, score, curation, per_image in zip(
            samples, arrays, scores, curated, seconds
        ):
            key = sample.key
            flagged = None if score is None else score.nsfw_score >= safety.threshold
            o = Outcome(
                STATUS_OK,
                per_image,
                safety=score,
                flagged=flagged,
                size=(array.shape[1], array.shape[0]),
                curation=curation,
            )
            if flagged and safety.action in ("drop", "quarantine"):
                o.status = STATUS_FILTERED
                o.quarantined = safety.action == "quarantine"
            if flagged and safety.action == "blackout":
                array = np.zeros_like(array)
            if o.status == STATUS_OK and curation is not None:
                failed = curation.failed_gates(self.spec.curation.gates)
                if failed:
                    o.status, o.rejected_by = STATUS_REJECTED, ",".join(failed)
            if o.status == STATUS_OK or o.quarantined:
                encoding[key] = self.encoders.submit(_encode, array, out.image_format, out.quality)
            outcomes[key] = o
        return outcomes, timing, encoding

    def _row(
        self, s: Sample, o: Outcome | None, created_at, tokens: dict[str, int]
    ) -> dict[str, Any]:
        spec, p = self.spec, s.params
        row: dict[str, Any] = {
            "key": s.key,
            "shard_id": s.shard_id,
            "prompt_id": s.prompt_id,
            "prompt": s.prompt,
            "status": o.status if o else STATUS_FAILED,
            "error": s.error,
            "generator_device": GENERATOR_DEVICE,
            "model_source": spec.model.source,
            "model_revision": spec.model.revision,
            "dtype": self.engine.dtype,
            "image_format": spec.output.image_format,
            "image_sha256": o.image_sha256 if o else None,
            "device": self.engine.device,
            "worker_node": self.worker["node"],
            "worker_id": self.worker["actor"],
            "gpu_id": self.worker["gpu_id"],
            "gen_seconds": o.gen_seconds if o else None,
            "created_at": created_at,
            **s.origin,
            **s.passthrough,
        }
        if o is not None and o.curation is not None:
            row.update(
                clip_score=o.curation.clip_score,
                aesthetic_score=o.curation.aesthetic_score,
                punsafe=o.curation.punsafe,
                rejected_by=o.rejected_by,
                duplicate_of=o.duplicate_of,
            )
        if s.candidate is not None:
            row["candidate"] = s.candidate
        if o is not None and o.safety is not None:
            # Without a detector every safety column stays null rather than a misleading 0.
            row.update(
                nsfw_score=o.safety.nsfw_score,
                nsfw_scores=[{"label": k, "score": v} for k, v in o.safety.scores.items()],
                safety_detector=spec.safety.detector,
                safety_model_sha256=self.detector.model_sha256,
                safety_threshold=spec.safety.threshold,
                safety_action=spec.safety.action,
                safety_flagged=o.flagged,
            )
        planned = p or s.planned
        row.update(task=spec.model.task, vae_tiling=spec.engine.vae_tiling)
        if planned is not None:
            # A failed row too says what it was planned with, so it can be placed in a sweep.
            width, height = o.size if o is not None and o.size else (planned.width, planned.height)
            row.update(
                seed=planned.seed,
                scheduler=self.engine.scheduler_name(planned),
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
        if p is not None:
            n_tokens = tokens.get(p.prompt)
            row.update(
                prompt_tokens=n_tokens,
                prompt_truncated=None if n_tokens is None else n_tokens > self.engine.max_tokens,
                sample_id=sample_id(spec.model.source, spec.model.revision, p, row["scheduler"]),
                prompt=p.prompt,
            )
        return row


class _Metrics:
    """Counters and a latency histogram through ray.util.metrics: the Ray dashboard and Prometheus
    see them. Outside Ray they are not recorded."""

    def __init__(self, job: str):
        self.enabled = False
        try:
            import ray
            from ray.util import metrics
        except ImportError:
            return
        if not ray.is_initialized():
            return
        tags = ("job",)
        self.tags = {"job": job}
        self.counters = {
            key: metrics.Counter(f"sdfleet_{key}", description=text, tag_keys=tags)
            for key, text in (
                ("images_generated", "images generated (all statuses but failed)"),
                ("images_filtered", "images filtered by the safety detector"),
                ("images_failed", "samples that could not be generated"),
                ("gpu_seconds", "GPU-seconds held while making shards"),
                ("shards_committed", "shards committed"),
            )
        }
        # Shard latency from a few seconds (tiny shards) to hours (10,000 large images on one GPU).
        self.latency = metrics.Histogram(
            "sdfleet_shard_seconds",
            description="wall time per shard",
            boundaries=[1, 5, 15, 60, 300, 900, 3600, 10800],
            tag_keys=tags,
        )
        self.enabled = True

    def record(self, stats: ShardStats) -> None:
        if not self.enabled:
            return
        values = {
            "images_generated": stats.ok + stats.filtered,
            "images_filtered": stats.filtered,
            "images_failed": stats.failed,
            "gpu_seconds": stats.gpu_seconds,
            "shards_committed": 1,
        }
        for key, value in values.items():
            if value:
                self.counters[key].inc(value, tags=self.tags)
        self.latency.observe(stats.wall_seconds, tags=self.tags)


def _node_cpu_threads(gpus_per_worker: float) -> int | None:
    """CPU threads for torch in a GPU actor: the node's CPUs shared among the GPU actors it can hold.

    Fixed per node type, so CPU-side results never depend on how many actors happen to run.
    """
    try:
        import ray

        if not ray.is_initialized():
            return None
        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    except (ImportError, StopIteration):
        return None
    cpus, gpus = node["Resources"].get("CPU", 1), node["Resources"].get("GPU", 0)
    per_node = gpus / gpus_per_worker if gpus and gpus_per_worker else 1
    return max(1, int(cpus // max(1, per_node)))


def _encode(
    array: np.ndarray, image_format: str, quality: int
) -> tuple[bytes, str, dict[str, float]]:
    """One image's bytes, their sha256, and the seconds each took."""
    t0 = time.perf_counter()
    data = encode_image(array, image_format, quality)
    t1 = time.perf_counter()
    digest = hashlib.sha256(data).hexdigest()
    return data, digest, {"encode": t1 - t0, "hash": time.perf_counter() - t1}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _worker_identity() -> dict[str, Any]:
    """Node, actor and GPU as Ray sees them; the host name and pid outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            gpu_ids = [str(g) for g in ray.get_gpu_ids()]
            actor = ctx.get_actor_id()
            return {
                "node": ctx.get_node_id(),
                "actor": actor or f"{socket.gethostname()}:{os.getpid()}",
                "gpu_ids": gpu_ids,
                "gpu_id": ",".join(gpu_ids) or None,
            }
    except ImportError:
        pass
    return {
        "node": socket.gethostname(),
        "actor": f"pid:{os.getpid()}",
        "gpu_ids": [],
        "gpu_id": None,
    }
